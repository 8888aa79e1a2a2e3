"""Least-squares maps where a partial zip's heads gather the merged features.

A head reads the trunk's merged features ``z`` at the cut. A weight layer
reading them absorbs the unmerge (``W_k U_k``) and the head refit re-solves it
on ``z``; every other reader (an identity shortcut, a norm, a layer scale, a
transformer's residual stream) gets the 0/1 gather ``U_k z``: each of model
k's channels becomes the merged feature of its cluster, and nothing corrects
what that loses. With the refit on, the gather is replaced by the best linear
reconstruction of model k's own features ``x_k`` from the merged ones::

    M_k = argmin_M  E || M z~ - x_k ||^2 + lambda || M - [U_k, 0] ||^2,   z~ = [z, 1]

solved in closed form with the refit's normal equations and ridge
(``passes.refit``: float64 sums, ``lambda`` relative to the Gram's mean
eigenvalue). It costs ``C_merged x C_k`` multiply-adds per position per head
(a ``Linear`` over the channel axis, counted in the MACs like any layer).

Why it can only help on the calibration data: at ``M = U_k`` the penalty is
0, so the solution's reconstruction error is at most the gather's. And when
the models are one (a self-merge, a permuted copy) ``U_k z = x_k`` exactly, so
the gather is the solution and comes back unchanged: the invariants hold.
The head layers reading the mapped features are then refit by
``refit_heads`` on what they now receive.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from fxzip.distributed import sum_fields_across_ranks

from .real_tokens import RealTokens
from .refit import RefitLayer, RefitResult, _fit, _Normal
from .split import UNMERGE
from .waves import truncated

__all__ = ["fit_cut_maps", "CUT_MAP"]

CUT_MAP = "cutmap{head}"
"""Module path (on the partial zip's root) of head ``head``'s map."""


@dataclass
class _Site:
    gather: fx.Node
    head: int
    source: str
    dim: int
    normal: _Normal | None = None
    module: nn.Linear | None = None
    rank: int = 0


def _channels_last(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])


def fit_cut_maps(split: fx.GraphModule, models: Sequence[fx.GraphModule], batches: Iterable[tuple],
                 ridge: float) -> RefitResult:
    """Replace every head's gather of the cut (``passes.split``) by its fitted
    least-squares map, in place. One read of the data: the split model up to
    the cut and each model with a gather up to its cut node."""
    sites = [_Site(n, n.meta[UNMERGE].head, n.meta[UNMERGE].source, n.meta[UNMERGE].dim)
             for n in split.graph.nodes if UNMERGE in n.meta]
    if not sites:
        return RefitResult([], 0, [], "one pass")
    inputs = list(dict.fromkeys(s.gather.args[0].name for s in sites))
    mine = truncated(split, inputs)
    theirs = {s.head: truncated(models[s.head], [s.source]) for s in sites}
    tokens = RealTokens(split.graph)  # padded positions are no samples
    for batch in batches:
        mask = tokens.mask(batch) if tokens else None
        with torch.no_grad():
            zs = dict(zip(inputs, mine(*batch)))
            for s in sites:
                z, x = zs[s.gather.args[0].name], theirs[s.head](*batch)[0]
                if s.module is None:
                    s.module = _gather_as_linear(split, s, z.shape[s.dim], x.shape[s.dim]).to(z.device, z.dtype)
                    s.normal, s.rank = _Normal(s.module), z.dim()
                keep = tokens.positions(s.gather.args[0], mask, z.movedim(s.dim, -1).shape[:-1])
                s.normal.add(_channels_last(z, s.dim), _channels_last(x, s.dim).double(), keep)
    normals = [s.normal for s in sites]
    sum_fields_across_ranks(normals, "gram", "cross", "tt", "n")
    layers = []
    for s in sites:
        name = CUT_MAP.format(head=s.head)
        layer = RefitLayer(name, name, s.gather.args[0].name, ())
        _fit(layer, s.module, s.normal, ridge)
        split.add_module(name, s.module)
        _rewire(split.graph, s, name)
        layers.append(layer)
    split.graph.eliminate_dead_code()
    split.graph.lint()
    split.recompile()
    return RefitResult(layers, 1 + len(theirs), [], "one pass", 1)


def _gather_as_linear(split: fx.GraphModule, site: _Site, merged: int, own: int) -> nn.Linear:
    """The gather ``U_k`` as a Linear (one 1 per row, bias 0): the ridge's anchor."""
    index = site.gather.args[2]
    idx = split.get_buffer(index.target) if isinstance(index, fx.Node) else torch.as_tensor(index)
    if idx.numel() != own:
        raise RuntimeError(f"head {site.head}'s gather at {site.source} picks {idx.numel()} channels, its model has "
                           f"{own} there")
    lin = nn.Linear(merged, own)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[torch.arange(own), idx.to(torch.long).cpu()] = 1.0
        lin.bias.zero_()
    return lin


def _rewire(graph: fx.Graph, site: _Site, target: str) -> None:
    """``index_select(z, dim, U_k)`` -> ``movedim(map(movedim(z, dim, -1)), -1, dim)``."""
    z = site.gather.args[0]
    last = site.dim in (-1, site.rank - 1)
    with graph.inserting_before(site.gather):
        moved = z if last else graph.call_function(torch.movedim, (z, site.dim, -1))
        mapped = graph.call_module(target, (moved,))
        back = mapped if last else graph.call_function(torch.movedim, (mapped, -1, site.dim))
    for node, suffix in ((moved, "in"), (mapped, "map"), (back, "out")):
        if node is not z:
            node.name = graph._graph_namespace.create_name(f"{target}_{suffix}", node)
    site.gather.replace_all_uses_with(back)
    graph.erase_node(site.gather)
