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

import types

import torch.nn.functional as F

from .registry import (  # noqa: I001
    _FUNCTION_RULES,
    _METHOD_RULES,
    _MODULE_RULES,
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


_SPLIT_BY_EXPORT = (F.normalize,)
"""torch functions with a rule that export records as several ATen ops
(``F.normalize``: a norm over the channel axis, a clamp, a division), which
would lose what the rule knows (channel i in, channel i out); the other torch
functions are one ATen op each, renamed back by ``fxzip.aten_ops``."""


def _functions_kept_whole() -> set:
    """Functions with a channel rule that capture keeps as one call: the user's
    Python functions, and torch's that export would split."""
    return {fn for fn in _FUNCTION_RULES
            if isinstance(fn, types.FunctionType) and (not (fn.__module__ or "").startswith("torch")
                                                        or fn in _SPLIT_BY_EXPORT)}


def _has_module_rule(module) -> bool:
    """A module stays one call node when captured if a rule covers it: a rule
    registered for its own class, or for a torch class it is (``nn.Conv2d``'s
    rule covers ``nn.LazyConv2d``). A library's subclass of a torch layer with
    its own forward (timm's ``BatchNormAct2d``: a norm, then an activation) is
    not covered by its base's rule, so it is captured as the ops it runs."""
    cls = type(module)
    if cls in _MODULE_RULES:
        return True
    torch_defined = cls.__module__.startswith(("torch.nn", "torch.ao.nn"))
    return torch_defined and any(base in _MODULE_RULES for base in cls.__mro__)


def _op_has_rule(op: str, target) -> bool:
    table = {"call_function": _FUNCTION_RULES, "call_method": _METHOD_RULES}.get(op, {})
    return target in table


def _tell_the_tracer() -> None:
    """Capture is the layer below the rules: it asks these predicates instead
    of importing the registry (``fxzip.trace.set_opaque_functions``)."""
    from ..trace import set_op_rule, set_opaque_functions, set_whole_module

    set_opaque_functions(_functions_kept_whole)
    set_whole_module(_has_module_rule)
    set_op_rule(_op_has_rule)


_load_builtin_rules()
_tell_the_tracer()
