"""Give a graph the wider layers that ``merged_width`` asks for.

The fold computes every merged tensor at its merged size; this pass puts them
in place: tensors that grew replace the module's (parameters stay parameters,
buffers buffers), each resized module's attributes follow its tensors
(the width rules registered with each op's channel rule in ``fxzip.rules``:
``in_channels``, ``num_features``, ``num_groups``, ...), and the channel sizes written into ``view``/``reshape`` calls are
rewritten from the analysis's layouts. The graph keeps its nodes; only sizes
change, so the result is a GraphModule that no longer loads into the original
class.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.fx as fx
from torch import nn

from fxzip.analysis import GraphAnalysis
from fxzip.layout import Layout
from fxzip.rules.registry import SIZES
from fxzip.rules.registry import lookup_width as width_rule
from fxzip.rules.resize import layout_sizes

__all__ = ["widen", "replace_tensors"]


def widen(gm: fx.GraphModule, analysis: GraphAnalysis, state: Mapping[str, torch.Tensor],
          sizes: Mapping[int, int]) -> None:
    """In place: ``state``'s tensors whose shape differs from ``gm``'s replace
    them; modules and view sizes follow. ``sizes``: merged features of every
    widened space (index -> features)."""
    replace_tensors(gm, state)
    for node in gm.graph.nodes:
        rule = width_rule(node, gm)
        if rule == SIZES:
            _rewrite_sizes(node, analysis, sizes)
        elif node.op != "call_module" and callable(rule):
            rule(node, analysis, sizes)
    gm.recompile()


def replace_tensors(gm: fx.GraphModule, tensors: Mapping[str, torch.Tensor]) -> None:
    """Put ``tensors`` (state-dict names) in ``gm`` where their shape differs
    from the current one (parameters stay parameters, buffers buffers), then let
    each changed module's resizer update its attributes. Also what a partial
    zip's head needs when its first layer absorbs a widened unmerge."""
    old_shapes: dict[str, dict[str, torch.Size]] = {}
    for name, tensor in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_name)
        current = getattr(owner, leaf)
        if current is None or current.shape == tensor.shape:
            continue
        old_shapes.setdefault(owner_name, {})[leaf] = current.shape
        if isinstance(current, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(tensor.detach().clone(), requires_grad=current.requires_grad))
        else:
            persistent = leaf not in owner._non_persistent_buffers_set
            owner.register_buffer(leaf, tensor.detach().clone(), persistent=persistent)
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in old_shapes:
            rule = width_rule(node, gm)
            if not callable(rule):
                raise ValueError(f"module {node.target} ({type(gm.get_submodule(node.target)).__name__}) has "
                                 "tensors on a widened space but no resizer; keep that space at merged_width 1")
            rule(gm.get_submodule(node.target), old_shapes[node.target])


def _rewrite_sizes(node: fx.Node, analysis: GraphAnalysis, sizes: Mapping[int, int]) -> None:
    """``x.view(a, b, c)`` / ``x.reshape((a, b, c))`` / ``torch.reshape(x, s)``:
    the sizes of the output's channel axes (channels, or heads of a grouped
    layout) become the merged ones; other axes and ``-1`` stay."""
    lay = analysis.layouts.get(node.name)
    if not isinstance(lay, Layout) or not lay.segments:
        return
    old, new, ratio = layout_sizes(lay, sizes, analysis)
    if old == new:
        return
    if node.op == "call_method":
        shape: list[Any] = list(node.args[1:])
        packed = len(shape) == 1 and isinstance(shape[0], (tuple, list))
    else:
        shape = [node.args[1] if len(node.args) > 1 else node.kwargs["shape"]]
        packed = True
    dims = list(shape[0]) if packed else shape
    if lay.group_dim is not None:  # heads: whole heads were added, units per head stay
        at, grow = lay.group_dim, ratio
    else:
        at, grow = lay.dim, new / old
    if at is None or at >= len(dims):
        return
    value = dims[at]
    if isinstance(value, int) and value != -1:
        scaled = value * grow
        if abs(scaled - round(scaled)) > 1e-9:
            raise ValueError(f"node {node.name} reshapes {value} channels, which merged_width cannot scale "
                             f"by {grow:.3f}; keep this space at merged_width 1")
        dims[at] = int(round(scaled))
    if packed:
        dims = type(shape[0])(dims)
        node.args = (node.args[0], dims) + tuple(node.args[2:]) if node.op != "call_method" else (node.args[0], dims)
    else:
        node.args = (node.args[0], *dims)
