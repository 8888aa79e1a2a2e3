"""ATen ops of an exported graph, renamed to the torch-level ops the rules know.

``torch.export`` records a model as ATen ops (``aten.conv2d``, ``aten.view``,
``aten.add.Tensor``), whatever library wrote it; fxzip's channel rules are
written for torch-level ops (``F.conv2d``, ``Tensor.view``, ``torch.add``),
which are what users register rules for and read in error messages. One table
bridges the two, so the analysis sees one vocabulary from every library.

Most ATen ops need no entry: ``torch.<name>`` is generated from the same
schema, so the arguments carry over one for one (``aten.softmax.int(x, dim)``
is ``torch.softmax(x, dim)``). The table lists the exceptions: ops whose
torch-level function takes its arguments in another order (``batch_norm``,
``embedding``), Python wrappers that rules are keyed on (``F.layer_norm``,
``F.hardswish``), views that are indexing (``slice``, ``select``, ``index``
become ``operator.getitem``, as Python's ``x[...]`` is traced), the graph's
own bookkeeping (shape asserts, dropout in eval mode) that is dropped, and
in-place ops, which are made out of place (later readers of the mutated
tensor read the op's result instead: the graph stays functional, so a pass
may move or remove a node without changing what the others compute).

An op with no torch-level name is kept as the ATen op: it runs as it did,
and the analysis names it if a feature space reaches it.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from .leaf_modules import attr_at

__all__ = ["normalise", "is_aten", "CONSTANT"]

aten = torch.ops.aten

Rewrite = Callable[[fx.Node], "tuple[str, Any, tuple, dict] | None"]
"""node -> (op, target, args, kwargs), or None: the node is an identity (its first argument)."""


def _function(fn: Callable) -> Rewrite:
    return lambda n: ("call_function", fn, tuple(n.args), dict(n.kwargs))


def _method(name: str) -> Rewrite:
    return lambda n: ("call_method", name, tuple(n.args), dict(n.kwargs))


def _identity(n: fx.Node) -> None:
    return None


def _index(dim: int, item: Any) -> tuple:
    return (slice(None),) * dim + (item,)


def _positive(dim: int, n: fx.Node) -> int:
    """A negative axis counted from the front (``x[..., a:b]`` would need an
    Ellipsis the rules read less well than explicit slices)."""
    if dim >= 0:
        return dim
    meta = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
    if meta is None:
        raise _Unmapped
    return dim + meta.dim()


class _Unmapped(Exception):
    """The rewrite does not apply to this call; the ATen op is kept."""


def _slice(n: fx.Node) -> tuple:
    x, dim, start, end, step = (list(n.args) + [0, None, None, 1][len(n.args) - 1:])[:5]
    dim = _positive(n.kwargs.get("dim", dim), n)
    if start == 0:
        start = None
    if isinstance(end, int) and end >= 2 ** 62:  # aten's "to the end"
        end = None
    return "call_function", operator.getitem, (x, _index(dim, slice(start, end, None if step == 1 else step))), {}


def _select(n: fx.Node) -> tuple:
    x, dim, index = n.args
    return "call_function", operator.getitem, (x, _index(_positive(dim, n), index)), {}


_CONSTANT_INDEX_LIMIT = 4096

CONSTANT = "fxzip_export_constant"
"""``node.meta`` key: a get_attr of a tensor export made (a constant in the
code), not one of the model's parameters or buffers."""


def _as_written(index: Any, owner: Any) -> Any:
    """A constant index export lifted into the module (Python's
    ``x[:, [0, 2, 4]]`` becomes a ``lifted_tensor_0`` attribute) back to the
    list the code wrote, so rules and messages read the user's indices."""
    if not (isinstance(index, fx.Node) and index.op == "get_attr" and owner is not None
            and index.meta.get(CONSTANT)):
        return index
    value = attr_at(owner, str(index.target))
    if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() <= _CONSTANT_INDEX_LIMIT \
            and not value.is_floating_point() and not isinstance(value, torch.nn.Parameter):
        return value.tolist()
    return index


def _index_tensor(n: fx.Node) -> tuple:
    x, indices = n.args
    owner = n.graph.owning_module
    index = tuple(slice(None) if i is None else _as_written(i, owner) for i in indices)
    return "call_function", operator.getitem, (x, index), {}


def _batch_norm(n: fx.Node) -> tuple:
    x, weight, bias, mean, var, training, momentum, eps = list(n.args)[:8]
    return "call_function", F.batch_norm, (x, mean, var, weight, bias, training, momentum, eps), {}


def _layer_norm(n: fx.Node) -> tuple:
    return "call_function", F.layer_norm, tuple(n.args)[:5], {}


def _group_norm(n: fx.Node) -> tuple:
    return "call_function", F.group_norm, tuple(n.args)[:5], {}


def _embedding(n: fx.Node) -> tuple:
    weight, ids, padding_idx = (list(n.args) + [-1])[:3]
    return "call_function", F.embedding, (ids, weight, None if padding_idx == -1 else padding_idx), {}


def _vector_norm(n: fx.Node) -> tuple:
    """``aten.linalg_vector_norm(x, ord, dim, keepdim)`` (what ``x.norm`` and
    ``F.normalize`` run) as ``x.norm(p=, dim=, keepdim=)``."""
    x, ord_, dim, keepdim = (list(n.args) + [2, None, False][len(n.args) - 1:])[:4]
    return "call_method", "norm", (x,), {"p": ord_, "dim": dim, "keepdim": keepdim}


def _rsub(n: fx.Node) -> tuple:
    """``aten.rsub(x, other)``, Python's ``other - x``."""
    x, other, alpha = (list(n.args) + [1])[:3]
    if alpha != 1:
        raise _Unmapped
    return "call_function", operator.sub, (other, x), {}


def _upsample(mode: str) -> Rewrite:
    """``aten.upsample_<mode>.vec(x, output_size, [align_corners,] scale_factors)``,
    what ``F.interpolate`` runs, as ``F.interpolate`` (the rules' resampling op)."""
    aligned = mode in ("linear", "bilinear", "bicubic", "trilinear")

    def rewrite(n: fx.Node) -> tuple:
        args = list(n.args)
        x, size = args[0], args[1]
        align = args[2] if aligned and len(args) > 2 else None
        scale = None
        if n.target._overloadname == "vec":
            scale = args[3 if aligned else 2] if len(args) > (3 if aligned else 2) else None
        elif size is None:
            raise _Unmapped
        kwargs = {"size": size, "scale_factor": scale, "mode": mode}
        if align is not None:
            kwargs["align_corners"] = align
        return "call_function", F.interpolate, (x,), kwargs
    return rewrite


def _to(n: fx.Node) -> tuple:
    """``aten._to_copy(x, dtype=...)`` / ``aten.to.dtype(x, dtype)``: ``x.to(...)``."""
    return "call_method", "to", tuple(n.args), {k: v for k, v in n.kwargs.items() if k in ("dtype", "device")}


_TABLE: dict[Any, Rewrite] = {
    # layers whose rules are keyed on the functional wrapper, or whose arguments differ
    aten.batch_norm: _batch_norm, aten.layer_norm: _layer_norm, aten.group_norm: _group_norm,
    aten.embedding: _embedding, aten.linalg_vector_norm: _vector_norm, aten.linear: _function(F.linear), aten.rms_norm: _function(F.rms_norm),
    aten.hardswish: _function(F.hardswish), aten.hardsigmoid: _function(F.hardsigmoid),
    aten.gelu: _function(F.gelu), aten.silu: _function(F.silu), aten.mish: _function(F.mish),
    aten.leaky_relu: _function(F.leaky_relu), aten.elu: _function(F.elu), aten.hardtanh: _function(F.hardtanh),
    aten.softplus: _function(F.softplus), aten.relu6: _function(F.relu6),
    aten.scaled_dot_product_attention: _function(F.scaled_dot_product_attention),
    aten.pad: _function(F.pad), aten.grid_sampler: _function(torch.grid_sampler),
    aten.max_pool1d: _function(F.max_pool1d), aten.max_pool2d: _function(F.max_pool2d),
    aten.max_pool3d: _function(F.max_pool3d), aten.avg_pool1d: _function(F.avg_pool1d),
    aten.avg_pool2d: _function(F.avg_pool2d), aten.avg_pool3d: _function(F.avg_pool3d),
    aten.adaptive_avg_pool1d: _function(F.adaptive_avg_pool1d),
    aten.adaptive_avg_pool2d: _function(F.adaptive_avg_pool2d),
    aten.adaptive_avg_pool3d: _function(F.adaptive_avg_pool3d),
    aten.upsample_nearest1d: _upsample("nearest"), aten.upsample_nearest2d: _upsample("nearest"),
    aten.upsample_nearest3d: _upsample("nearest"), aten.upsample_linear1d: _upsample("linear"),
    aten.upsample_bilinear2d: _upsample("bilinear"), aten.upsample_bicubic2d: _upsample("bicubic"),
    aten.upsample_trilinear3d: _upsample("trilinear"), aten._upsample_nearest_exact2d: _upsample("nearest-exact"),
    aten.rsub: _rsub,
    # indexing and views, as Python's x[...] and tensor methods are traced
    aten.slice: _slice, aten.select: _select, aten.index: _index_tensor,
    aten.split_with_sizes: _function(torch.split),
    aten.view: _method("view"), aten.expand: _method("expand"), aten.contiguous: _method("contiguous"),
    aten.repeat: _method("repeat"), aten.new_zeros: _method("new_zeros"), aten.new_ones: _method("new_ones"),
    aten.new_full: _method("new_full"), aten.new_empty: _method("new_empty"), aten.sym_size: _method("size"),
    aten.sym_numel: _method("numel"), aten.unfold: _method("unfold"), aten.type_as: _method("type_as"),
    aten.to: _to, aten._to_copy: _to, aten.expand_as: _method("expand_as"), aten.view_as: _method("view_as"),
    # identities in eval mode (a clone stays: an in-place op may write into it)
    aten.dropout: _identity, aten.feature_dropout: _identity, aten.alpha_dropout: _identity,
    aten.feature_alpha_dropout: _identity, aten.alias: _identity, aten.detach: _identity,
    aten.lift_fresh_copy: _identity, aten.clone: _method("clone"),
}

_DROPPED = {aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size,
            aten._assert_async, aten.sym_constrain_range}
"""Checks export adds for itself (dtypes, shape ranges): they compute nothing."""


def is_aten(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload)


HasRule = Callable[[str, Any], bool]
"""``has_rule(op, target)``: whether the analysis has a rule for ``("call_function", torch.add)``
or ``("call_method", "add")``."""


def _generic(packet: torch._ops.OpOverloadPacket, has_rule: HasRule) -> Rewrite | None:
    """``torch.<name>`` (same schema, same arguments) or the ``Tensor`` method of
    that name, whichever the analysis has a rule for (then whichever exists);
    None when torch has neither."""
    name = packet.__name__
    candidates: list[tuple[str, Any]] = []
    for space in (torch, torch._C._nn):
        fn = getattr(space, name, None)
        if callable(fn) and not isinstance(fn, type):
            candidates.append(("call_function", fn))
    if hasattr(torch.Tensor, name):
        candidates.append(("call_method", name))
    ranked = [c for c in candidates if has_rule(*c)] + candidates
    if not ranked:
        return None
    op, target = ranked[0]
    return _function(target) if op == "call_function" else _method(target)


def _out_of_place(packet: torch._ops.OpOverloadPacket) -> torch._ops.OpOverloadPacket | None:
    """``aten.relu_`` -> ``aten.relu``: in-place ops by ATen's naming (a name
    ending in one underscore whose out-of-place twin exists)."""
    name = packet.__name__
    if not name.endswith("_") or name.endswith("__"):
        return None
    return getattr(aten, name[:-1], None)


_WRITES_INTO_VIEW = {aten.copy_: 1, aten.fill_: 1}
"""In-place writes whose first argument may be a slice of another tensor
(Python's ``x[..., a:b] = y``), with the position of the value written."""


def _as_setitem(graph: fx.Graph, node: fx.Node, views: set[fx.Node]) -> bool:
    """``aten.copy_(x[idx], y)`` / ``fill_`` / ``index_put_(x, idx, y)`` as
    ``operator.setitem(x, idx, y)``, as torch.fx records Python's slice
    assignment (the rules know it; it mutates ``x`` in place as before)."""
    packet = node.target.overloadpacket
    if packet is aten.index_put_:
        x, indices, value = node.args[:3]
        if len(node.args) > 3 and node.args[3] or node.kwargs.get("accumulate"):
            return False
        index = tuple(slice(None) if i is None else i for i in indices)
    elif packet in _WRITES_INTO_VIEW:
        dest, value = node.args[0], node.args[_WRITES_INTO_VIEW[packet]]
        if not (isinstance(dest, fx.Node) and dest in views and dest.target is operator.getitem):
            return False
        x, index = dest.args
    else:
        return False
    node.replace_all_uses_with(node.args[0])
    node.op, node.target, node.args, node.kwargs = "call_function", operator.setitem, (x, index, value), {}
    return True


def _functionalise(graph: fx.Graph, node: fx.Node, views: set[fx.Node]) -> bool:
    """Make an in-place op on a computed tensor out of place: the nodes after it
    that read the mutated tensor read its result. Only when the mutated tensor
    is not a view of another (then the mutation shows through the base as well,
    and the op is kept in place)."""
    packet = node.target.overloadpacket
    twin = _out_of_place(packet)
    if twin is None:
        return False
    mutated = node.args[0]
    if not isinstance(mutated, fx.Node) or mutated.op not in ("call_function", "call_method"):
        return False
    if mutated in views:
        return False
    overload = getattr(twin, node.target._overloadname, None)
    if overload is None:
        return False
    order = {n: i for i, n in enumerate(graph.nodes)}
    later = [u for u in mutated.users if u is not node and order[u] > order[node]]
    for user in later:
        user.replace_input_with(mutated, node)
    node.target = overload
    return True


def _scalars_as_written(node: fx.Node) -> None:
    """``int[1]`` arguments back to the int Python code passes (``torch.roll(x,
    3, 1)`` is recorded as ``aten.roll(x, [3], [1])``): a rule written against
    the torch-level call reads them as the user wrote them."""
    schema = node.target._schema
    args = list(node.args)
    for i, (arg, spec) in enumerate(zip(args, schema.arguments)):
        if getattr(spec, "N", None) == 1 and isinstance(arg, (list, tuple)) and len(arg) == 1:
            args[i] = arg[0]
    node.args = tuple(args)
    node.kwargs = {k: v[0] if isinstance(v, (list, tuple)) and len(v) == 1 and any(
        a.name == k and getattr(a, "N", None) == 1 for a in schema.arguments) else v for k, v in node.kwargs.items()}


def normalise(gm: fx.GraphModule, has_rule: HasRule = lambda op, target: False) -> list[str]:
    """Rename the ATen ops of an exported graph to torch-level ops, in place.

    Returns the ATen ops left as they are (no torch-level name), for the log."""
    graph = gm.graph
    kept: set[str] = set()
    views = {n for n in graph.nodes if n.op == "call_function" and is_aten(n.target) and n.target.is_view}
    for node in list(graph.nodes):
        if node.op != "call_function" or not is_aten(node.target):
            continue
        if node.target.overloadpacket in _DROPPED:
            graph.erase_node(node)
            continue
        if _as_setitem(graph, node, views):
            continue
        _functionalise(graph, node, views)
        _scalars_as_written(node)
        packet = node.target.overloadpacket
        rewrite = _TABLE.get(packet) or _generic(packet, has_rule)
        if rewrite is None:
            kept.add(str(packet))
            continue
        try:
            new = rewrite(node)
        except _Unmapped:
            kept.add(str(packet))
            continue
        if new is None:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            continue
        node.op, node.target, node.args, node.kwargs = new
    return sorted(kept)
