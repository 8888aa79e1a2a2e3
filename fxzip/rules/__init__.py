"""One registry of channel rules, keyed by what a graph node calls.

A rule is ``rule(ctx, node) -> None``. It reads the layouts of the node's
inputs from ``ctx`` (an ``fxzip.analysis.Analyzer``), sets the node's output
layout, joins spaces that must share one basis, and declares the role of every
parameter it touches ("M": rows merged like outputs, "U": columns unmerged like
inputs). Keys are module classes (``call_module``, looked up along the MRO),
callables (``call_function``) and method names (``call_method``).

Register your own::

    @fxzip.register_rule(MyBlock)            # a leaf module
    def my_block(ctx, node): ...

An op with no rule whose inputs carry channels stops the analysis with an
error naming the op, so nothing is ever guessed. The same holds for tensors
whose channels are spread over several axes (attention heads): only rules
marked ``@group_aware`` see them; any other rule stops the analysis.

How an op takes wider channels under ``merged_width`` is registered with its
rule, in the same registry: ``@register_rule(MyBlock, width=my_resizer)``
(``FREE``, ``SIZES``, a resizer or ``PerNode``; ``register_width`` alone).
"""
from __future__ import annotations

from .registry import (
    FREE,
    SIZES,
    PerNode,
    Resizer,
    Rule,
    group_aware,
    lookup_function_rule,
    lookup_rule,
    lookup_width,
    map_aware,
    register_rule,
    register_width,
    rule_registered,
    unregister_rule,
)

__all__ = ["register_rule", "unregister_rule", "rule_registered", "lookup_rule", "lookup_function_rule",
           "group_aware", "map_aware", "Rule", "register_width", "lookup_width", "FREE", "SIZES", "PerNode",
           "Resizer"]


def _load_builtin_rules() -> None:
    from . import attention, einsum, elementwise, layers, shape  # noqa: F401  (registration side effects)


def _has_function_rule(fn) -> bool:
    """A function with a channel rule can stay one opaque call node when traced
    (timm's no-trace helpers such as ``maybe_add_mask``); the rest are traced
    through so the analysis sees their ops."""
    return lookup_function_rule(fn) is not None


def _tell_the_tracer() -> None:
    """Tracing is the layer below the rules: it asks this predicate instead of
    importing the registry (``fxzip.trace.set_opaque_function``)."""
    from ..trace import set_opaque_function

    set_opaque_function(_has_function_rule)


_load_builtin_rules()
_tell_the_tracer()
