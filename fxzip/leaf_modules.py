"""Modules with a rule become one ``call_module`` node again after export.

``torch.export`` traces every module into its ops, which is what makes any
library capturable; but a module the analysis has a rule for (``nn.Conv2d``,
``nn.BatchNorm2d``, a user's registered leaf) is better seen whole: its rule
knows its weights by role, the passes fold, reset and refit it as a module,
and the merged model keeps calling it the way the user's code did. Every ATen
op carries the stack of modules that called it (``nn_module_stack``, one key
per call, so a module called twice gives two calls); the ops of one call of a
kept module, with the parameters only it reads, are replaced by one
``call_module`` node named after the module path, as torch.fx would have
recorded it.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.symbolic_shapes import optimization_hint
from torch.utils import _pytree as pytree

__all__ = ["regroup", "LeafCallError", "attr_at"]


class LeafCallError(ValueError):
    """A module that must stay whole was called in a way one node cannot hold."""


def _kept_call(node: fx.Node, model: nn.Module, kept: Callable[[nn.Module], bool]) -> tuple[str, str] | None:
    """(call key, module path) of the outermost kept module on the node's stack."""
    for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
        if not path:
            continue
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if kept(module):
            return key, path
    return None


def _own_attrs(members: list[fx.Node], path: str, module: nn.Module, model: nn.Module) -> list[fx.Node]:
    """The module's own parameters and buffers: get_attr nodes under its path
    (read by this call, and maybe by other calls of the same module), or of a
    tensor it shares with another module (tied embeddings: export reads the
    tensor under one of its names only)."""
    own = {id(t) for t in list(module.parameters()) + list(module.buffers())}
    attrs = []
    for node in members:
        for arg in node.all_input_nodes:
            if arg.op != "get_attr" or arg in attrs:
                continue
            if str(arg.target).startswith(path + ".") or id(attr_at(model, str(arg.target))) in own:
                attrs.append(arg)
    return attrs


def attr_at(owner: object, target: str) -> object:
    """``owner.a.b.c`` for ``target`` "a.b.c", or None where a part is missing."""
    value: object = owner
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _result_paths(module: nn.Module, given: fx.Node, produced: fx.Node) -> list[tuple] | None:
    """Where each element of the flat tuple ``produced`` (``aten.lstm``'s
    ``(out, h, c)``) sits in what the module returns (``nn.LSTM``'s
    ``(out, (h, c))``): the module is run once on zeros of the input's shape
    and its result flattened in order."""
    val, out_val = given.meta.get("val"), produced.meta.get("val")
    if not isinstance(val, torch.Tensor) or not isinstance(out_val, (tuple, list)):
        return None
    zeros = torch.zeros([int(optimization_hint(d)) for d in val.shape], dtype=val.dtype)
    with torch.no_grad():
        result = module(zeros)
    leaves, _ = pytree.tree_flatten_with_path(result)
    if len(leaves) != len(out_val):
        return None
    return [tuple(key.idx for key in keys) for keys, _ in leaves]


def _replace_tuple(graph: fx.Graph, module: nn.Module, path: str, given: fx.Node, members: list[fx.Node],
                   outputs: list[fx.Node]) -> bool:
    """A module returning a nested tuple: the outside reads ``getitem``s of one
    flat tuple; each becomes the same element of the module's own result."""
    producers = {o.args[0] for o in outputs if o.target is operator.getitem and isinstance(o.args[1], int)}
    if len(producers) != 1 or any(o.target is not operator.getitem for o in outputs):
        return False
    paths = _result_paths(module, given, next(iter(producers)))
    if paths is None:
        return False
    with graph.inserting_before(outputs[0]):
        call = graph.create_node("call_module", path, (given,), name=path.replace(".", "_"))
    call.meta["nn_module_stack"] = _outer_stack(outputs[0], path)
    for out in outputs:
        with graph.inserting_before(out):
            value = call
            for index in paths[out.args[1]]:
                value = graph.call_function(operator.getitem, (value, index))
        value.meta = dict(out.meta)
        out.replace_all_uses_with(value)
    _erase(graph, members)
    return True


def _erase(graph: fx.Graph, members: list[fx.Node]) -> None:
    """The call's ops, and its parameters' get_attr nodes unless another call
    of the module still reads them."""
    for node in reversed(members):
        if not node.users:
            graph.erase_node(node)


def _is_size(node: fx.Node) -> bool:
    """A shape value (the symbolic batch size read off the model input): the
    module computes its own when called whole."""
    return isinstance(node.meta.get("val"), (int, torch.SymInt))


def _reads_a_tuple(outputs: list[fx.Node]) -> bool:
    return bool(outputs) and all(o.target is operator.getitem and isinstance(o.args[0], fx.Node)
                                 and isinstance(o.args[0].meta.get("val"), (tuple, list)) for o in outputs)


def _replace(graph: fx.Graph, module: nn.Module, path: str, members: list[fx.Node], strict: bool) -> bool:
    inside = set(members)
    inputs: list[fx.Node] = []
    for node in members:
        for arg in node.all_input_nodes:
            if arg not in inside and arg not in inputs and not _is_size(arg):
                inputs.append(arg)
    outputs = [n for n in members if n.op != "get_attr" and any(u not in inside for u in n.users)]
    if len(inputs) == 1 and _reads_a_tuple(outputs) and \
            _replace_tuple(graph, module, path, inputs[0], members, outputs):
        return True
    if len(inputs) != 1 or len(outputs) != 1:
        if strict:
            raise LeafCallError(
                f"module '{path}' must stay whole (it is a registered leaf) but this call of it reads "
                f"{len(inputs)} tensors from outside ({', '.join(n.name for n in inputs)}) and gives "
                f"{len(outputs)} results to the rest of the model; fxzip keeps whole modules called with one "
                "tensor that return one tensor. Register a rule for the functions it calls instead, or "
                "split it into modules of one input and one output.")
        return False
    (result,) = outputs
    with graph.inserting_before(result):
        call = graph.create_node("call_module", path, (inputs[0],), name=path.replace(".", "_"))
    call.meta = {k: v for k, v in result.meta.items() if k in ("stack_trace", "val", "tensor_meta")}
    call.meta["nn_module_stack"] = _outer_stack(result, path)
    result.replace_all_uses_with(call)
    _erase(graph, members)
    return True


def _outer_stack(node: fx.Node, path: str) -> dict:
    """The caller's stack down to and including the module itself."""
    stack = {}
    for key, value in (node.meta.get("nn_module_stack") or {}).items():
        stack[key] = value
        if value[0] == path:
            break
    return stack


def regroup(gm: fx.GraphModule, model: nn.Module, kept: Callable[[nn.Module], bool],
            must_stay_whole: Callable[[nn.Module], bool] = lambda m: False) -> int:
    """Replace each call of a module ``kept`` accepts by one ``call_module`` node,
    in place; returns how many calls were replaced. A call that one node cannot
    hold (several tensors in or out) keeps its ops, unless ``must_stay_whole``
    says the module has no other way to be analysed (then ``LeafCallError``)."""
    graph = gm.graph
    calls: dict[str, tuple[str, list[fx.Node]]] = {}
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        found = _kept_call(node, model, kept)
        if found is not None:
            key, path = found
            calls.setdefault(key, (path, []))[1].append(node)
    replaced = 0
    for path, members in calls.values():
        # export's own guard calls, and size arithmetic (shared with the rest of the graph: export
        # computes ``B * W`` once, inside whichever module needs it first)
        members = [n for n in members if n.op != "call_module" and not _is_size(n)]
        if not members:
            continue
        module = model.get_submodule(path)
        members = _own_attrs(members, path, module, model) + members
        replaced += _replace(graph, module, path, members, strict=must_stay_whole(module))
    return replaced
