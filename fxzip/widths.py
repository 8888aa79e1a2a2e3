"""``merged_width``: how many merged features each space keeps, and which ops
let a space grow.

A merge as the papers do it keeps ``n`` features per space (one model's
width); keeping ``m > n`` leaves the ``m - n`` least similar features apart,
and ``m = N * n`` is the ensemble side by side. The result is the same graph
with wider layers, so every op a widened space flows through must either not
care about the width or be resizable:

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

Register more with ``register_width_rule``, as channel rules are registered
with ``fxzip.register_rule``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .analysis import GraphAnalysis, _layout_segments
from .layout import Layout

__all__ = ["FREE", "SIZES", "WidthPlan", "plan_widths", "register_width_rule", "width_rule"]

FREE = "free"
SIZES = "sizes"
Resizer = Callable[..., None]
"""For a module class, ``resizer(module, old_shapes)`` fixes the module's
attributes after its tensors were replaced by wider ones (``old_shapes``: each
replaced tensor's shape). For a function or method, ``rewrite(node, analysis,
sizes)`` rewrites the node's size arguments (``sizes``: merged features of each
widened space)."""

_MODULES: dict[type, str | Resizer] = {}
_FUNCTIONS: dict[Callable, str] = {}
_METHODS: dict[str, str] = {}


def register_width_rule(kind: str | Resizer, *keys: type | Callable | str) -> None:
    """How ops ``keys`` (module classes, functions, method names) take wider
    channels: ``FREE``, ``SIZES`` (view-like: sizes rewritten) or, for a module
    class, a ``Resizer``."""
    for key in keys:
        if isinstance(key, str):
            _METHODS[key] = kind  # type: ignore[assignment]
        elif isinstance(key, type):
            _MODULES[key] = kind
        elif callable(key):
            _FUNCTIONS[key] = kind  # type: ignore[assignment]
        else:
            raise TypeError(f"cannot register a width rule for {key!r}")


def width_rule(node: fx.Node, gm: fx.GraphModule) -> str | Resizer | None:
    """The width rule of ``node`` (None: the op cannot take wider channels)."""
    if node.op in ("placeholder", "output", "get_attr"):
        return FREE
    if node.op == "call_module":
        for cls in type(gm.get_submodule(node.target)).__mro__:
            if cls in _MODULES:
                return _MODULES[cls]
        return None
    if node.op == "call_method":
        return _METHODS.get(node.target)
    if node.target is operator.getitem:
        return FREE if _keeps_channel_axes(node) else None
    if node.target in (F.conv1d, F.conv2d, F.conv3d):
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        return FREE if groups == 1 else None
    return _FUNCTIONS.get(node.target)


def _keeps_channel_axes(node: fx.Node) -> bool:
    """``x[...]`` that selects along other axes only (``x[:, 0]``, a tuple's item)."""
    src = node.args[0]
    lay = src.meta.get("fxzip_layout") if isinstance(src, fx.Node) else None
    index = node.args[1]
    if not isinstance(index, tuple):
        index = (index,)
    if isinstance(lay, tuple) or lay is None:
        return isinstance(node.args[1], int) or lay is None
    if any(i is Ellipsis for i in index):
        return False
    full = slice(None, None, None)
    return all(a >= len(index) or index[a] == full for a in lay.tracked_axes)


def _conv(module: nn.Module, old: Mapping[str, torch.Size]) -> None:
    weight = module.weight
    if module.groups > 1 and "weight" in old:
        module.groups = module.groups * weight.shape[0] // old["weight"][0]
    module.out_channels = weight.shape[0]
    module.in_channels = weight.shape[1] * module.groups


def _linear(module: nn.Module, old: Mapping[str, torch.Size]) -> None:
    module.out_features, module.in_features = module.weight.shape


def _batch_norm(module: nn.Module, old: Mapping[str, torch.Size]) -> None:
    ref = module.weight if module.weight is not None else module.running_mean
    module.num_features = ref.shape[0]


def _layer_norm(module: nn.Module, old: Mapping[str, torch.Size]) -> None:
    ref = module.weight if module.weight is not None else None
    if ref is None:
        raise ValueError("a LayerNorm without affine parameters cannot be widened here")
    module.normalized_shape = tuple(ref.shape)


def _group_norm(module: nn.Module, old: Mapping[str, torch.Size]) -> None:
    if module.weight is None:
        raise ValueError("a GroupNorm without affine parameters cannot be widened here")
    channels = module.weight.shape[0]
    module.num_groups = module.num_groups * channels // module.num_channels
    module.num_channels = channels


def _input_ratio(node: fx.Node, analysis: GraphAnalysis, sizes: Mapping[int, int]) -> float:
    lay = analysis.layouts.get(node.args[0].name) if isinstance(node.args[0], fx.Node) else None
    return layout_sizes(lay, sizes, analysis)[2] if isinstance(lay, Layout) else 1.0


def _scaled(value: int, ratio: float, node: fx.Node) -> int:
    scaled = value * ratio
    if abs(scaled - round(scaled)) > 1e-9:
        raise ValueError(f"node {node.name} holds {value} channels, which merged_width cannot scale by "
                         f"{ratio:.3f}; keep this space at merged_width 1")
    return int(round(scaled))


def _set_arg(node: fx.Node, index: int, name: str, value: Any) -> None:
    if len(node.args) > index:
        node.args = node.args[:index] + (value,) + node.args[index + 1:]
    else:
        node.kwargs = {**node.kwargs, name: value}


def _functional_layer_norm(node: fx.Node, analysis: GraphAnalysis, sizes: Mapping[int, int]) -> None:
    """``F.layer_norm(x, normalized_shape, ...)`` over the channel axis (last):
    the last normalised size grows with the channels."""
    shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
    shape = list(shape) if isinstance(shape, (tuple, list)) else [shape]
    shape[-1] = _scaled(shape[-1], _input_ratio(node, analysis, sizes), node)
    _set_arg(node, 1, "normalized_shape", tuple(shape))


def _functional_group_norm(node: fx.Node, analysis: GraphAnalysis, sizes: Mapping[int, int]) -> None:
    """``F.group_norm(x, num_groups, ...)``: whole groups were added."""
    groups = node.args[1] if len(node.args) > 1 else node.kwargs["num_groups"]
    _set_arg(node, 1, "num_groups", _scaled(groups, _input_ratio(node, analysis, sizes), node))


def _register_builtin() -> None:
    from .rules import elementwise as ew

    register_width_rule(FREE, *ew._UNARY_MODULES, *ew._UNARY_FUNCTIONS, *ew._UNARY_METHODS,
                        *ew._POOL_MODULES, *ew._POOL_FUNCTIONS, *ew._PAD_MODULES, *ew._REDUCTIONS, *ew._BINARY,
                        torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var,
                        nn.Softmax, nn.LogSoftmax, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
                        "softmax", "log_softmax", torch.addcmul, "addcmul", torch.addcdiv, "addcdiv",
                        torch.flatten, "flatten", nn.Flatten, "squeeze", "unsqueeze", torch.squeeze,
                        torch.unsqueeze, "permute", torch.permute, "transpose", torch.transpose, "swapaxes", "t",
                        torch.cat, torch.concat, torch.concatenate, torch.stack, torch.unbind, "unbind",
                        operator.matmul, torch.matmul, "matmul", torch.bmm, "bmm", F.scaled_dot_product_attention,
                        torch.einsum, torch.functional.einsum, F.linear, getattr, "size", "dim", "numel")
    register_width_rule(SIZES, "view", "reshape", torch.reshape)
    register_width_rule(_conv, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    register_width_rule(_linear, nn.Linear)
    register_width_rule(_functional_layer_norm, F.layer_norm)
    register_width_rule(_functional_group_norm, F.group_norm)
    register_width_rule(_batch_norm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    register_width_rule(_layer_norm, nn.LayerNorm)
    register_width_rule(_group_norm, nn.GroupNorm)


_register_builtin()


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


def layout_sizes(lay: Layout, sizes: Mapping[int, int], analysis: GraphAnalysis) -> tuple[int, int, float]:
    """(old length, new length, group ratio) of a layout's channel axis under
    merged ``sizes`` (space index -> merged features, widened spaces only)."""
    old = new = 0
    for s in lay.segments:
        i = analysis.space_of[s.space]
        old += s.length
        new += sizes.get(i, s.size) * s.inner
    ratio = new / old if old else 1.0
    return old, new, ratio
