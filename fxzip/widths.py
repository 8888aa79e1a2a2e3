"""``merged_width``: how many merged features each space keeps.

A merge as the papers do it keeps ``n`` features per space (one model's
width); keeping ``m > n`` leaves the ``m - n`` least similar features apart,
and ``m = N * n`` is the ensemble side by side. The result is the same graph
with wider layers, so every op a widened space flows through must either not
care about the width or be resizable. Which is which is per-op knowledge, kept
with each op's channel rule in ``fxzip.rules`` (``register_rule(..., width=)``,
``fxzip.rules.registry.lookup_width``):

* ``FREE`` ops hold no channel count (activations, arithmetic, pooling,
  concatenation, permutes, attention products, ``flatten``);
* ``SIZES`` ops hold sizes in their arguments (``view``/``reshape``); the
  widening pass rewrites the channel axes' sizes from the analysis's layouts;
* modules with a ``Resizer`` (convolutions, linear layers, norms) get their
  attributes (``out_channels``, ``num_features``, ``num_groups``, ...) updated
  after their tensors were replaced;
* anything else that touches a space (a channel slice, ``expand`` with a
  channel count, a module fxzip cannot resize) keeps that space, and every
  space tied to it, at one model's width; the report says where and why.

This module plans the widths from those rules (``plan_widths``). Register more
with ``register_width_rule`` (or ``width=`` when registering the op's channel
rule with ``fxzip.register_rule``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch.fx as fx

from .analysis import GraphAnalysis, _layout_segments
from .rules.registry import FREE, SIZES, Resizer, register_width
from .rules.registry import lookup_width as width_rule
from .rules.resize import layout_sizes as layout_sizes

__all__ = ["FREE", "SIZES", "WidthPlan", "plan_widths", "register_width_rule", "width_rule"]


def register_width_rule(kind: str | Resizer, *keys: type | Callable | str) -> None:
    """How ops ``keys`` (module classes, functions, method names) take wider
    channels: ``FREE``, ``SIZES`` (view-like: sizes rewritten) or, for a module
    class, a ``Resizer``. Registered with the ops' channel rules
    (``fxzip.rules.registry.register_width``)."""
    register_width(kind, *keys)


@dataclass
class WidthPlan:
    """Merged features per space index (only spaces that grow), and the spaces
    that were asked to grow but cannot, with the reason in the user's terms."""

    widths: dict[int, int] = field(default_factory=dict)
    kept: dict[int, str] = field(default_factory=dict)


def _requested(merged_width: float | Mapping[str, float], analysis: GraphAnalysis, n_models: int
               ) -> dict[int, float]:
    """Per space index, the factor the user asked for (a number for every space,
    or a dict keyed by the report's space name or label)."""
    def check(name: str, w: Any) -> float:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 1.0 <= float(w) <= n_models:
            raise ValueError(f"merged_width{name} must be a number from 1 (one model's width) to {n_models} "
                             f"(the {n_models} models side by side), got {w!r}")
        return float(w)

    if not isinstance(merged_width, Mapping):
        w = check("", merged_width)
        return {sp.index: w for sp in analysis.spaces}
    from .naming import space_label

    by_name = {}
    for sp in analysis.spaces:
        by_name[sp.name] = sp.index
        by_name.setdefault(space_label(sp), sp.index)
    out = {}
    for name, w in merged_width.items():
        if name not in by_name:
            raise ValueError(f"merged_width names a space {name!r} the model does not have; spaces are named as in "
                             f"the report (fxzip inspect lists them), e.g. {sorted(by_name)[:4]}")
        out[by_name[name]] = check(f"[{name!r}]", w)
    return out


def plan_widths(gm: fx.GraphModule, analysis: GraphAnalysis, merged_width: float | Mapping[str, float],
                n_models: int) -> WidthPlan:
    """Merged features per space for ``merged_width``: ``round(w * n)``, by whole
    groups for grouped spaces (heads stay heads), the same group count for
    spaces tied together. Spaces that are not matched (inputs, outputs, fixed)
    and spaces some op cannot widen keep one model's width."""
    plan = WidthPlan()
    wanted = {i: w for i, w in _requested(merged_width, analysis, n_models).items() if w > 1.0}
    if not wanted:
        return plan
    for node in gm.graph.nodes:
        node.meta["fxzip_layout"] = analysis.layouts.get(node.name)
    blocked: dict[int, str] = {}
    for node in gm.graph.nodes:
        touched = {analysis.space_of[s.space] for n in [node, *node.all_input_nodes]
                   for s in _layout_segments(analysis.layouts.get(n.name))}
        if not touched & set(wanted) or width_rule(node, gm) is not None:
            continue
        why = _describe(node, gm)
        for i in touched:
            blocked.setdefault(i, why)
    for node in gm.graph.nodes:
        node.meta.pop("fxzip_layout", None)
    blocks = [tuple(b) for b in analysis.ties] + [(sp.index,) for sp in analysis.spaces
                                                   if not any(sp.index in b for b in analysis.ties)]
    for block in blocks:
        spaces = [analysis.spaces[i] for i in block]
        w = max((wanted.get(i, 1.0) for i in block), default=1.0)
        if w <= 1.0 or not all(sp.mergeable and not sp.rigid for sp in spaces):
            continue
        why = next((blocked[i] for i in block if i in blocked), None)
        if why is not None:
            for i in block:
                plan.kept[i] = why
            continue
        # grouped spaces grow by whole groups (heads stay heads), others by units
        units = spaces[0].groups if spaces[0].groups > 1 else spaces[0].size
        merged_units = min(n_models * units, max(units, round(w * units)))
        if merged_units > units:
            for sp in spaces:
                plan.widths[sp.index] = merged_units * (sp.size // units)
    return plan


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return (f"module {node.target} ({type(gm.get_submodule(node.target)).__name__}) cannot be resized "
                "(fxzip.widths.register_width_rule)")
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{name} at node {node.name} holds a channel count or slice (fxzip.widths.register_width_rule)"

