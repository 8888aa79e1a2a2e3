"""The rule tables and the functions that fill and read them (see the package
docstring, ``fxzip.rules``). The built-in rules import this module, not the
package, so registering them makes no import cycle.

Everything fxzip knows about an op is registered here, under the op's key: its
channel rule (what the analysis follows) and its width rule (how the op takes
wider channels under ``merged_width``; ``fxzip.widths`` plans with it and
``passes.widen`` applies it). A built-in op declares both in its rules module,
next to each other."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch.fx as fx

Rule = Callable[["object", fx.Node], None]

_MODULE_RULES: dict[type, Rule] = {}
_FUNCTION_RULES: dict[Callable, Rule] = {}
_METHOD_RULES: dict[str, Rule] = {}

FREE = "free"
"""Width rule: the op holds no channel count (activations, arithmetic, pooling,
concatenation, permutes, attention products, ``flatten``)."""
SIZES = "sizes"
"""Width rule: the op holds sizes in its arguments (``view``/``reshape``); the
widening pass rewrites the channel axes' sizes from the analysis's layouts."""
Resizer = Callable[..., None]
"""Width rule of a module class: ``resizer(module, old_shapes)`` fixes the
module's attributes after its tensors were replaced by wider ones
(``old_shapes``: each replaced tensor's shape). Of a function or method:
``rewrite(node, analysis, sizes)`` rewrites the node's size arguments
(``sizes``: merged features of each widened space)."""


@dataclass(frozen=True)
class PerNode:
    """A width rule that depends on the call, not only on the op:
    ``decide(node)`` gives ``FREE``, ``SIZES``, a rewrite or ``None`` (this call
    cannot take wider channels), e.g. ``x[...]`` slicing the channel axis."""

    decide: Callable[[fx.Node], Any]


_MODULE_WIDTHS: dict[type, Any] = {}
_FUNCTION_WIDTHS: dict[Callable, Any] = {}
_METHOD_WIDTHS: dict[str, Any] = {}

__all__ = ["register_rule", "unregister_rule", "rule_registered", "lookup_rule", "lookup_function_rule", "group_aware",
           "map_aware", "Rule", "FREE", "SIZES", "Resizer", "PerNode", "register_width", "lookup_width"]


def group_aware(rule: Rule) -> Rule:
    """Mark ``rule`` as correct for grouped layouts (``Layout.grouped``): head and
    stack axes, attention maps. Unmarked rules never see them."""
    rule.group_aware = True  # type: ignore[attr-defined]
    return rule


def map_aware(rule: Rule) -> Rule:
    """Mark a group-aware ``rule`` as correct for channel x channel maps
    (``Layout.cross_dim``, two channel axes); unmarked rules never see them."""
    rule.map_aware = True  # type: ignore[attr-defined]
    return rule


def register_rule(*keys: type | Callable | str, width: Any = None) -> Callable[[Rule], Rule]:
    """Decorator registering ``rule(ctx, node)`` for module classes (``call_module``
    nodes, looked up along the MRO), functions (``torch.roll``) or method names
    (``"roll"`` for ``x.roll(...)``). It replaces a rule registered for the same
    key, built-in ones included, for good; ``rule_registered`` (a context
    manager) does it for a ``with`` block only, ``unregister_rule`` undoes it.

    A rule tells the analysis where the node's output keeps its channels. It
    reads the node's inputs and writes its output through ``ctx``
    (``fxzip.analysis.Analyzer``):

    - ``ctx.layout(x)``: the input's ``Layout``: ``dim`` (its channel axis, or
      None), ``segments`` (the feature-space ranges along that axis, in order),
      ``length`` (elements along it), ``has_channels``, ``grouped`` (channels
      split over several axes, e.g. attention heads; only ``@group_aware`` rules
      see such tensors);
    - ``ctx.shape(x)``, ``ctx.ndim(x)``: the traced shape; ``ctx.arg(node, i,
      name, default)``: argument ``i`` or keyword ``name``; ``ctx.module(node)``:
      the module a ``call_module`` node runs;
    - ``ctx.set(node, layout, passthrough=False)``: the output's layout
      (``passthrough=True``: the op computes no new features, e.g. a reshape or a
      pool, so probes may look through it); a rule that sets nothing leaves the
      output without channels;
    - ``ctx.new_space(node, size)``: a new feature space (a layer's outputs);
      ``ctx.role(node, param, axis, segments, "M" | "U")``: parameter ``param``'s
      ``axis`` is laid out like ``segments``, as outputs ("M", merged like a
      layer's rows) or inputs ("U", like its columns); ``ctx.mark_layer(node)``:
      a weight layer (cut points count them);
    - ``ctx.unify(node, a, b)``: two sides must share one basis (a residual add);
      ``ctx.fix(segments, why)``: these channels must stay where they are;
      ``ctx.set_groups`` / ``ctx.tie_groups``: channel groups that move whole;
    - ``ctx.fail(node, message)``: refuse, naming the node (raise
      ``fxzip.AnalysisError``); say what the op does in the user's terms.

    ``width`` (optional) registers the ops' width rule with it: ``FREE``,
    ``SIZES``, a ``Resizer`` or ``PerNode`` (``register_width``).

    ``fxzip.rules.shape.channel_range(ctx, node, segments, lo, hi)`` gives the
    segments of channels ``lo .. hi`` (a slice; fxzip then matches the parts of
    the space apart). A worked example, a rule for ``torch.roll`` along the
    channels (README, "Extending"; run by ``tests/test_extending.py``)::

        import torch
        from fxzip.layout import Layout
        from fxzip.rules import group_aware, lookup_function_rule, rule_registered
        from fxzip.rules.shape import channel_range

        builtin_roll = lookup_function_rule(torch.roll)  # rolls over axes without channels

        @group_aware  # it sees what the built-in rule saw, and hands heads back to it
        def channel_roll(ctx, node):
            x = node.args[0]
            lay = ctx.layout(x)
            shifts, dims = ctx.arg(node, 1, "shifts"), ctx.arg(node, 2, "dims")
            if lay.grouped or not lay.has_channels or not isinstance(dims, int) \
                    or dims % ctx.ndim(x) != lay.dim:
                return builtin_roll(ctx, node)
            n = lay.length
            s = shifts % n  # out[c] = x[(c - s) % n]: the last s channels, then the first n - s
            rolled = channel_range(ctx, node, lay.segments, n - s, n) \
                + channel_range(ctx, node, lay.segments, 0, n - s)
            ctx.set(node, Layout(lay.dim, rolled), passthrough=True)

        with rule_registered(channel_roll, torch.roll, "roll"):
            merged = fxzip.merge(model_a, model_b, data=loader)
    """

    def deco(rule: Rule) -> Rule:
        for key in keys:
            _table(key)[key] = rule
        if width is not None:
            register_width(width, *keys)
        return rule

    return deco


def _kind(key: type | Callable | str, what: str) -> str:
    """Which table a key belongs in: a method name, a module class or a function."""
    if isinstance(key, str):
        return "method"
    if isinstance(key, type):
        return "module"
    if callable(key):
        return "function"
    raise TypeError(f"cannot register a {what} for {key!r}")


def _table(key: type | Callable | str) -> dict:
    return {"method": _METHOD_RULES, "module": _MODULE_RULES, "function": _FUNCTION_RULES}[_kind(key, "rule")]


def unregister_rule(*keys: type | Callable | str) -> None:
    """Forget the rules of ``keys`` (ops without a rule stop the analysis again,
    naming the op). A key with no rule is a KeyError: a typo should not pass."""
    for key in keys:
        table = _table(key)
        if key not in table:
            raise KeyError(f"no rule is registered for {key!r}")
        del table[key]


@contextmanager
def rule_registered(rule: Rule, *keys: type | Callable | str) -> Iterator[Rule]:
    """``rule`` registered for ``keys`` inside the ``with`` block only; the rules
    it replaced (built-in ones included) come back afterwards::

        with fxzip.rules.rule_registered(my_rule, MyBlock):
            merged = fxzip.merge(a, b, data=loader)
    """
    saved = [(key, _table(key).get(key)) for key in keys]
    register_rule(*keys)(rule)
    try:
        yield rule
    finally:
        for key, previous in saved:
            if previous is None:
                _table(key).pop(key, None)
            else:
                _table(key)[key] = previous


def lookup_rule(node: fx.Node, gm: fx.GraphModule) -> Rule | None:
    if node.op == "call_module":
        for cls in type(gm.get_submodule(node.target)).__mro__:
            if cls in _MODULE_RULES:
                return _MODULE_RULES[cls]
        return None
    if node.op == "call_function":
        return _FUNCTION_RULES.get(node.target)
    if node.op == "call_method":
        return _METHOD_RULES.get(node.target)
    return None


def lookup_function_rule(fn: Callable) -> Rule | None:
    """The rule registered for a plain function, if any."""
    return _FUNCTION_RULES.get(fn)


def _width_table(key: type | Callable | str) -> dict:
    return {"method": _METHOD_WIDTHS, "module": _MODULE_WIDTHS, "function": _FUNCTION_WIDTHS}[_kind(key, "width rule")]


def register_width(width: Any, *keys: type | Callable | str) -> None:
    """How ops ``keys`` (module classes, functions, method names) take wider
    channels under ``merged_width``: ``FREE``, ``SIZES`` (view-like: sizes
    rewritten), a ``Resizer`` (a module class's attributes; a function's size
    arguments) or ``PerNode``. An op without one keeps every space it touches at
    one model's width. Independent of the channel rule: registering, replacing
    or unregistering a rule leaves the width rule as it is."""
    for key in keys:
        _width_table(key)[key] = width


def lookup_width(node: fx.Node, gm: fx.GraphModule) -> Any:
    """The width rule of ``node`` (None: the op cannot take wider channels).
    Module classes are looked up along the MRO."""
    if node.op in ("placeholder", "output", "get_attr"):
        return FREE
    if node.op == "call_module":
        for cls in type(gm.get_submodule(node.target)).__mro__:
            if cls in _MODULE_WIDTHS:
                return _MODULE_WIDTHS[cls]
        return None
    if node.op == "call_method":
        width = _METHOD_WIDTHS.get(node.target)
    else:
        width = _FUNCTION_WIDTHS.get(node.target)
    return width.decide(node) if isinstance(width, PerNode) else width
