"""Fold merge/unmerge assignments into the weights of one copy of the graph.

Why assignments rather than matrices: every merge fxzip builds is a clustering
(rows of M are ``1/|cluster|``, U is a 0/1 assignment), so ``M_k W U_k`` is an
``index_add`` along each channel axis: exact, O(size of W), and no dense
n x n matrix is ever built.
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
import torch.fx as fx

from fxzip.analysis import AxisRole, GraphAnalysis
from fxzip.assignment import axis_counts, axis_index, cluster_sizes, merged_features, merged_length
from fxzip.passes.ties import keep_or_untie

__all__ = ["axis_index", "all_tensors", "fold_state", "fold", "merged_features", "merged_length", "cluster_sizes"]


def block_diagonal(t: torch.Tensor, grouped: AxisRole, out_axis: int) -> torch.Tensor:
    """A grouped conv weight (C_out, C_in / g, ...) as the dense (C_out, C_in, ...)
    block-diagonal matrix it stands for, so it folds like any dense weight."""
    g = grouped.groups
    moved = t.movedim((out_axis, grouped.axis), (0, 1))
    c_out, c_in_g = moved.shape[:2]
    dense = moved.new_zeros((c_out, g, c_in_g) + moved.shape[2:])
    group_of_row = torch.arange(c_out, device=t.device) // (c_out // g)
    dense[torch.arange(c_out, device=t.device), group_of_row] = moved
    return dense.reshape((c_out, g * c_in_g) + moved.shape[2:]).movedim((0, 1), (out_axis, grouped.axis))


def block_diagonal_part(dense: torch.Tensor, grouped: AxisRole, out_axis: int) -> torch.Tensor:
    """Inverse of ``block_diagonal``: the diagonal blocks of a folded weight. Exact
    because grouped spaces share one group assignment (``GraphAnalysis.ties``)."""
    g = grouped.groups
    moved = dense.movedim((out_axis, grouped.axis), (0, 1))
    c_out, c_in = moved.shape[:2]
    blocks = moved.reshape((c_out, g, c_in // g) + moved.shape[2:])
    group_of_row = torch.arange(c_out, device=dense.device) // (c_out // g)
    part = blocks[torch.arange(c_out, device=dense.device), group_of_row]
    return part.movedim((0, 1), (out_axis, grouped.axis))


def _fold_tensor(tensors: Sequence[torch.Tensor], roles: Sequence[AxisRole],
                 assign: Mapping[int, torch.Tensor], counts: Mapping[int, torch.Tensor]) -> torch.Tensor:
    grouped = [r for r in roles if r.groups > 1]
    if grouped:
        (g_role,), out_role = grouped, next(r for r in roles if r.role == "M")
        dense_roles = [AxisRole(r.axis, r.segments, r.role) for r in roles]
        total = _fold_tensor([block_diagonal(t, g_role, out_role.axis) for t in tensors], dense_roles, assign,
                             counts)
        # merged_width adds whole groups: the group size stays, the count grows
        groups = g_role.groups * merged_length(out_role.segments, assign) // tensors[0].shape[out_role.axis]
        return block_diagonal_part(total, AxisRole(g_role.axis, g_role.segments, g_role.role, groups),
                                   out_role.axis)
    total = None
    for k, t in enumerate(tensors):
        out = t
        for r in roles:
            idx = axis_index(r.segments, assign, k).to(t.device)
            # index_add along a leading, contiguous axis: along axis 1 of a conv
            # weight torch's kernel is ~100x slower on a busy machine
            moved = out.movedim(r.axis, 0).contiguous()
            out = moved.new_zeros((merged_length(r.segments, assign),) + moved.shape[1:])
            out = out.index_add_(0, idx, moved).movedim(0, r.axis)
        total = out if total is None else total + out
    m_roles = [r for r in roles if r.role == "M"]
    for r in m_roles:
        c = axis_counts(r.segments, counts).to(total.device, total.dtype)
        shape = [1] * total.dim()
        shape[r.axis] = -1
        total = total / c.reshape(shape)
    if not m_roles:
        total = total / len(tensors)
    return total


def all_tensors(module: torch.nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The state dict plus non-persistent buffers. Why: a non-persistent buffer
    can still follow a space (timm's anti-aliasing filter has one row per
    channel), and a fold that skipped it would pair permuted weights with an
    unpermuted buffer."""
    out = dict(module.state_dict(keep_vars=keep_vars))
    for name, buf in module.named_buffers():
        out.setdefault(name, buf)
    return out


def fold_state(states: Sequence[Mapping[str, torch.Tensor]], analysis: GraphAnalysis,
               assign: Mapping[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Merged state dict from N models' state dicts.

    ``assign[space][k][i]`` is the merged channel that channel ``i`` of model
    ``k`` joins. Tensors with no channel axis are averaged; integer buffers
    (``num_batches_tracked``) come from the first model.
    """
    counts = {s: cluster_sizes(a) for s, a in assign.items()}
    resolved = {name: [AxisRole(r.axis, analysis.resolved(r.segments), r.role, r.groups) for r in roles]
                for name, roles in analysis.param_roles.items()}
    merged = {}
    for name, first in states[0].items():
        if not torch.is_floating_point(first):
            merged[name] = first.clone()
            continue
        tensors = [s[name] for s in states]
        merged[name] = _fold_tensor(tensors, resolved.get(name, ()), assign, counts).to(first.dtype)
    return merged


def fold(gm: fx.GraphModule, models: Sequence[fx.GraphModule | Mapping[str, torch.Tensor]], analysis: GraphAnalysis,
         assign: Mapping[int, torch.Tensor]) -> fx.GraphModule:
    """A copy of ``gm`` whose weights are the fold of ``models`` (same structure),
    or of state dicts under ``gm``'s names (models aligned by ``fxzip.align``)."""
    out = copy.deepcopy(gm)
    state = fold_state([m if isinstance(m, Mapping) else all_tensors(m) for m in models], analysis, assign)
    widened = {s: merged_features(a) for s, a in assign.items() if merged_features(a) != analysis.spaces[s].size}
    if widened:
        from .widen import widen

        widen(out, analysis, state, widened)
    keep_or_untie(out, state)
    with torch.no_grad():
        for name, tensor in all_tensors(out, keep_vars=True).items():
            if name in state:
                tensor.copy_(state[name])
    out.recompile()
    return out
