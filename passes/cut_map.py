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
The head layers reading the mapped features are then refit on what they now
receive; both fits run in one walk over the data (``passes.head_refit``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .refit import _Normal

__all__ = ["CUT_MAP"]

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
