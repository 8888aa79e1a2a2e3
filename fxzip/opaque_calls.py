"""A function with a user's channel rule stays one node through ``torch.export``.

Export records the ops a Python function runs, never the function; a rule the
user registered for the function (``@fxzip.register_rule(my_gate)``) must
still apply. While a model is captured, each such function is replaced, where
the model's code can reach it (module globals and module attributes, as
torch.fx's ``wrap`` patches them), by a call of one custom op,
``fxzip::opaque_call``: its tensors are the op's inputs, and an id says which
function to run on which other arguments. Export records that op as one node;
afterwards the node is turned back into a call of the user's function on the
same arguments, which runs as before and which its rule reads.
"""
from __future__ import annotations

import itertools
import sys
import types
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

__all__ = ["functions_kept_whole", "restore_calls"]


_CALLS: dict[int, tuple[Callable, Any, list[Any]]] = {}
"""call id -> (function, pytree spec of (args, kwargs), leaves with tensors as None)."""

_IDS = itertools.count()


def _run(tensors: list[torch.Tensor], call: int) -> Any:
    fn, spec, leaves = _CALLS[call]
    it = iter(tensors)
    args, kwargs = pytree.tree_unflatten([next(it) if leaf is None else leaf for leaf in leaves], spec)
    return fn(*args, **kwargs)


@torch.library.custom_op("fxzip::opaque_call", mutates_args=())
def _opaque_call(tensors: list[torch.Tensor], call: int) -> torch.Tensor:
    return _run(tensors, call).clone()  # a custom op may not return an alias of its input


@_opaque_call.register_fake
def _(tensors: list[torch.Tensor], call: int) -> torch.Tensor:
    return torch.empty_like(_run(tensors, call))


def _calling(fn: Callable) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if any(isinstance(leaf, (torch.SymInt, torch.SymFloat)) for leaf in leaves):
            return fn(*args, **kwargs)  # a size computed from the batch: captured as its ops
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        key = next(_IDS)
        _CALLS[key] = (fn, spec, [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves])
        return torch.ops.fxzip.opaque_call(tensors, key)
    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call


_FOUND: dict[tuple[frozenset, int], list[tuple[Any, str, Callable]]] = {}


def _places(functions: set[Callable]) -> list[tuple[Any, str, Callable]]:
    """(namespace, name, function) wherever a loaded module holds one of them;
    remembered until another module is imported or the functions change."""
    key = (frozenset(functions), len(sys.modules))
    if key not in _FOUND:
        _FOUND.clear()
        _FOUND[key] = _search(functions)
    return [(space, name, fn) for space, name, fn in _FOUND[key] if space.get(name) is fn]


def _search(functions: set[Callable]) -> list[tuple[Any, str, Callable]]:
    found = []
    for module in list(sys.modules.values()):
        space = getattr(module, "__dict__", None)
        if not isinstance(module, types.ModuleType) or not isinstance(space, dict):
            continue
        for name, value in list(space.items()):
            try:
                hit = value in functions
            except TypeError:  # unhashable values
                continue
            if hit:
                found.append((space, name, value))
    return found


@contextmanager
def functions_kept_whole(functions: set[Callable]) -> Iterator[None]:
    """While capturing, calls of ``functions`` are recorded as one op each."""
    places = _places(functions) if functions else []
    for space, name, fn in places:
        space[name] = _calling(fn)
    try:
        yield
    finally:
        for space, name, fn in places:
            space[name] = fn


def restore_calls(graph: fx.Graph) -> None:
    """Each ``fxzip::opaque_call`` node back to a call of the user's function."""
    for node in graph.nodes:
        if node.op != "call_function" or getattr(node.target, "overloadpacket", None) is not \
                torch.ops.fxzip.opaque_call:
            continue
        tensors, call = node.args
        fn, spec, leaves = _CALLS.pop(call)  # needed no more: the node calls the function itself
        it = iter(tensors)
        args, kwargs = pytree.tree_unflatten([next(it) if leaf is None else leaf for leaf in leaves], spec)
        node.target, node.args, node.kwargs = fn, tuple(args), dict(kwargs)
