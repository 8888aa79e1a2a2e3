"""Tensors a model shares between modules (tied input and output embeddings).

A tie is a claim about the merged model too: one tensor must serve both
roles. It survives a fold when both roles give the same merged tensor (a
permutation, plain pair averaging: each model's merge, transposed, equals its
unmerge divided by N); after a zip that merges units within a model, MuDSC's
weighting, a merged width or a refit of one of its modules, the roles give
different tensors, and writing both into one tensor would leave one of them
silently wrong. So the check is numerical, per tie: kept where it holds, and
otherwise the tensor is untied (each name gets its own parameter) and the
untied names are recorded in ``gm.meta["fxzip_untied"]`` for the report.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

__all__ = ["tied_names", "untie", "keep_or_untie", "UNTIED"]

UNTIED = "fxzip_untied"
"""``gm.meta`` key: the groups of parameter names whose tie was broken."""


def tied_names(module: nn.Module) -> list[list[str]]:
    """Groups of names (two or more) under which one parameter or buffer is registered."""
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in module.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(tensor), []).append(name)
    for name, tensor in module.named_buffers(remove_duplicate=False):
        by_tensor.setdefault(id(tensor), []).append(name)
    return [names for names in by_tensor.values() if len(names) > 1]


def untie(module: nn.Module, names: list[str]) -> None:
    """Every name after the first gets its own copy of the shared tensor."""
    for name in names[1:]:
        owner_path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        shared = getattr(owner, leaf)
        if isinstance(shared, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad))
        else:
            owner.register_buffer(leaf, shared.detach().clone())
    if hasattr(module, "meta"):
        module.meta.setdefault(UNTIED, []).append(sorted(names))


def _same(values: list[torch.Tensor]) -> bool:
    first = values[0]
    scale = float(first.abs().max()) if first.numel() else 0.0
    return all(v.shape == first.shape and torch.allclose(v, first, rtol=1e-6, atol=1e-7 * scale) for v in values[1:])


def keep_or_untie(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Before ``state`` is written into ``module``: untie each tie whose names
    ``state`` gives different values."""
    for names in tied_names(module):
        values = [state[n] for n in names if n in state]
        if len(values) > 1 and not _same(values):
            untie(module, names)
