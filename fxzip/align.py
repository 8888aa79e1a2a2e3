"""Align traced models by structure and data flow, not by names or node order.

Why: one architecture written by different code (timm's and torchvision's
resnet18) traces to graphs with other node and parameter names, other helper
modules (``nn.Identity`` placeholders, ``nn.Flatten`` vs ``torch.flatten``) and
sometimes another node order (torchvision's deeplabv3 reads the input's shape
before anything else). What a node computes and what it reads say whether two
nodes are the same; names do not. Walking model 0's graph from its inputs in
data-flow order, each node is paired with the not-yet-paired node of model k
that reads the paired inputs and computes the same thing (op, module type and
configuration, parameter shapes, output shape). Parameters are bound lazily,
when a node reading them is paired.

The model-0 nodes paired in every model, whose whole ancestry is therefore
paired too, are the *common part*: a partial zip shares it as the trunk. Shape
queries (``x.shape[-2:]``) are paired like any node when something shared reads
them, but they are not data paths: a model may read its input's shape where
another does not.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["CommonPart", "GraphView", "architecture_difference", "common_part", "describe", "graph_difference",
           "shape_nodes"]

ALIAS_MODULES: tuple[type, ...] = (nn.Identity, nn.modules.dropout._DropoutNd)
"""Modules that compute the identity on a traced (eval-mode) model."""

_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda"}
_SHAPE_METHODS = {"size", "dim", "numel"}
_IGNORED_CONFIG = {"training", "inplace", "momentum"}  # no effect on what a traced (eval) model computes


def shape_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes computing Python values or constants from shapes, not from the data."""
    out: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] in _SHAPE_ATTRS:
            out.add(n)
        elif n.op == "call_method" and n.target in _SHAPE_METHODS:
            out.add(n)
        elif n.op in ("call_function", "call_method") and n.all_input_nodes \
                and all(i in out for i in n.all_input_nodes):
            out.add(n)
    return out


# ----------------------------------------------------------------- one graph

class _Slot:
    """Where a node sits in an op's arguments (compared by position only)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Slot)

    def __repr__(self) -> str:
        return "<in>"


@dataclass
class _Form:
    key: tuple
    template: Any
    inputs: list[fx.Node]
    commutative: bool = False


_ACTIVATION_MODULES = {nn.ReLU: F.relu, nn.SiLU: F.silu, nn.Sigmoid: torch.sigmoid, nn.Tanh: torch.tanh,
                       nn.Hardswish: F.hardswish, nn.GELU: F.gelu}
_UNARY = {torch.relu: F.relu, torch.relu_: F.relu, F.relu: F.relu, F.relu_: F.relu, "relu": F.relu, "relu_": F.relu,
          F.silu: F.silu, torch.sigmoid: torch.sigmoid, F.sigmoid: torch.sigmoid, "sigmoid": torch.sigmoid,
          torch.tanh: torch.tanh, "tanh": torch.tanh, F.hardswish: F.hardswish}
_BINARY = {operator.add: operator.add, operator.iadd: operator.add, torch.add: operator.add, "add": operator.add,
           "add_": operator.add, operator.mul: operator.mul, operator.imul: operator.mul, torch.mul: operator.mul,
           "mul": operator.mul, "mul_": operator.mul}
_FLATTEN = {torch.flatten: 0, "flatten": 0}  # default start_dim


class GraphView:
    """One traced graph as alignment reads it: aliases resolved, forms, readers."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self._by_name = {n.name: n for n in self.nodes}
        self.alias: dict[fx.Node, fx.Node] = {}
        self.sources: set[fx.Node] = set()
        self.shape = shape_nodes(gm.graph)
        self.readers: dict[fx.Node, list[fx.Node]] = {n: [] for n in self.nodes}
        self.calls: dict[Any, int] = {}
        for n in self.nodes:
            if n.op == "call_module":
                self.calls[n.target] = self.calls.get(n.target, 0) + 1
                if isinstance(gm.get_submodule(n.target), ALIAS_MODULES) and len(n.args) == 1 \
                        and isinstance(n.args[0], fx.Node) and not n.kwargs:
                    self.alias[n] = self.resolve(n.args[0])
                    continue
            if n.op == "get_attr" or (n.op in ("call_function", "call_method", "call_module")
                                      and all(i in self.sources for i in n.all_input_nodes)):
                self.sources.add(n)
            for i in {self.resolve(i) for i in n.all_input_nodes}:
                self.readers[i].append(n)
        self._forms: dict[fx.Node, _Form] = {}

    def resolve(self, node: fx.Node) -> fx.Node:
        """The node an alias (an ``nn.Identity``, an eval-mode dropout) passes on."""
        return self.alias.get(node, node)

    def named(self, name: str) -> fx.Node:
        return self._by_name[name]

    def output(self) -> fx.Node:
        return next(n for n in reversed(self.nodes) if n.op == "output")

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    def form(self, n: fx.Node) -> _Form:
        if n not in self._forms:
            self._forms[n] = self._form(n)
        return self._forms[n]

    def _form(self, n: fx.Node) -> _Form:
        if n.op == "get_attr":
            t = _attr(self.gm, n.target)
            return _Form(("get_attr", _shape_of(t), getattr(t, "dtype", None)), (), [])
        if n.op == "output":
            return self._generic(("output",), n.args, {})
        if n.op == "call_module":
            m = self.module(n)
            if type(m) in _ACTIVATION_MODULES:
                extra = (getattr(m, "approximate", "none"),) if isinstance(m, nn.GELU) else ()
                return self._generic(("fn", _ACTIVATION_MODULES[type(m)]) + extra, n.args[:1], {})
            if isinstance(m, nn.Flatten):
                return self._generic(("fn", torch.flatten, m.start_dim, m.end_dim), n.args[:1], {})
            state = tuple((k, _shape_of(t), t.dtype) for k, t in m.state_dict().items())
            return self._generic(("module", type(m), _config(m), state), n.args, n.kwargs)
        target = n.target
        if n.op == "call_method" or callable(target):
            if _hashable(target) and target in _UNARY:
                extra = (_arg(n, 1, "approximate", "none"),) if target is F.gelu else ()
                return self._generic(("fn", _UNARY[target]) + extra, n.args[:1], {})
            if _hashable(target) and target in _BINARY and len(n.args) == 2 and _arg(n, 2, "alpha", 1) == 1:
                form = self._generic(("fn", _BINARY[target]), n.args, {})
                form.commutative = True
                return form
            if _hashable(target) and target in _FLATTEN:
                start = _arg(n, 1, "start_dim", _FLATTEN[target])
                return self._generic(("fn", torch.flatten, start, _arg(n, 2, "end_dim", -1)), n.args[:1], {})
            if target is torch.cat or target is torch.concat:
                return self._generic(("fn", torch.cat, _arg(n, 1, "dim", 0)), n.args[:1], {})
        return self._generic((n.op, target), n.args, n.kwargs)

    def _generic(self, key: tuple, args: Any, kwargs: Any) -> _Form:
        inputs: list[fx.Node] = []

        def slot(a: fx.Node) -> _Slot:
            inputs.append(self.resolve(a))
            return _Slot()

        template = fx.node.map_arg((tuple(args), dict(kwargs)), slot)
        return _Form(key, template, inputs)


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. tensors among an op's constant arguments
        return False


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _arg(n: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(n.args) > index:
        return n.args[index]
    return n.kwargs.get(name, default)


def _attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _shape_of(t: Any) -> tuple | None:
    return tuple(t.shape) if hasattr(t, "shape") else None


def _config(m: nn.Module) -> tuple:
    """A module's public plain attributes (kernel sizes, strides, eps, ...);
    ``(3, 3)`` and ``3`` are one configuration, like torch's own constructors."""
    items = []
    for k, v in sorted(vars(m).items()):
        if k.startswith("_") or k in _IGNORED_CONFIG:
            continue
        plain = _plain(v)
        if plain is not _SKIP:
            items.append((k, plain))
    return tuple(items)


_SKIP = object()


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.dtype):
        return str(v)
    if isinstance(v, (tuple, list)):
        items = tuple(_plain(x) for x in v)
        if any(x is _SKIP for x in items):
            return _SKIP
        return items[0] if items and all(x == items[0] for x in items) else items
    return _SKIP


def meta_shape(node: fx.Node) -> Any:
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return None
    if hasattr(meta, "shape"):
        return tuple(meta.shape)
    if isinstance(meta, (tuple, list)):
        return tuple(tuple(m.shape) if hasattr(m, "shape") else None for m in meta)
    return None


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """A node in the user's terms: module path, type, sizes."""
    if node.op == "call_module":
        return f"'{node.name}' ({node.target}: {_summary(gm.get_submodule(node.target))})"
    what = getattr(node.target, "__name__", str(node.target))
    shape = meta_shape(node)
    kind = {"call_function": "function", "call_method": "method"}.get(node.op, node.op)
    return f"'{node.name}' ({kind} {what}" + (f" -> shape {shape}" if shape else "") + ")"


def _name(gm: fx.GraphModule, node: fx.Node) -> str:
    """A node as the user knows it: its module path, else its graph name."""
    if node.op == "call_module":
        return f"'{node.target}'"
    if node.op == "placeholder":
        return f"the input '{node.name}'"
    return f"'{node.name}'"


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return getattr(node.target, "__name__", str(node.target))


def _call_text(gm: fx.GraphModule, node: fx.Node) -> str:
    """``flatten(x, 1)``: the call with its inputs by name and its constants."""
    def text(a: Any) -> str:
        if isinstance(a, fx.Node):
            return a.name
        if isinstance(a, (tuple, list)):
            inner = ", ".join(text(x) for x in a)
            return f"({inner}{',' if len(a) == 1 and isinstance(a, tuple) else ''})" if isinstance(a, tuple) \
                else f"[{inner}]"
        return repr(a)

    args = [text(a) for a in (node.args[1:] if node.op == "call_method" else node.args)]
    args += [f"{k}={text(v)}" for k, v in node.kwargs.items()]
    head = f"{text(node.args[0])}.{node.target}" if node.op == "call_method" and node.args else _op_name(gm, node)
    return f"{head}({', '.join(args)})"


def _shape_text(shape: Any) -> str:
    if shape is None:
        return "none"
    return str(tuple(shape))


def _summary(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return f"Linear {m.in_features}->{m.out_features}"
    if isinstance(m, nn.modules.conv._ConvNd):
        extra = "".join(f", {k} {_plain(getattr(m, k))}" for k in ("kernel_size", "stride", "dilation", "groups")
                        if k == "kernel_size" or _plain(getattr(m, k)) != 1)
        return f"{type(m).__name__} {m.in_channels}->{m.out_channels}{extra}"
    return f"{type(m).__name__}({m.extra_repr()})"


# ------------------------------------------------------------ two graphs

class _Pairing:
    """Model 0's graph paired with model k's, greedily in data-flow order."""

    def __init__(self, v0: GraphView, vk: GraphView):
        self.v0, self.vk = v0, vk
        self.map: dict[fx.Node, fx.Node] = {}
        self.used: set[fx.Node] = set()
        self.params: dict[str, str] = {}
        self.modules: dict[str, str] = {}
        self.modules_used: dict[str, str] = {}
        p0 = [n for n in v0.nodes if n.op == "placeholder"]
        pk = [n for n in vk.nodes if n.op == "placeholder"]
        for a, b in zip(p0, pk):
            self._commit({a: b})
        for n0 in v0.nodes:
            if n0.op in ("placeholder", "output") or n0 in v0.sources:
                continue
            if n0 in v0.alias:
                if v0.alias[n0] in self.map:
                    self.map[n0] = self.map[v0.alias[n0]]
                continue
            data = [i for i in v0.form(n0).inputs if i not in v0.sources]
            if not data or not all(i in self.map for i in data):
                continue
            for ck in vk.readers[self.map[data[0]]]:
                if ck in self.used or ck in vk.alias or ck.op == "output":
                    continue
                trial: dict[fx.Node, fx.Node] = {n0: ck}
                if self._same(n0, ck, trial):
                    self._commit(trial)
                    break
        self.full = len(p0) == len(pk) and self._covers_all()

    def _same(self, n0: fx.Node, nk: fx.Node, trial: dict[fx.Node, fx.Node]) -> bool:
        f0, fk = self.v0.form(n0), self.vk.form(nk)
        if not (_equal(f0.key, fk.key) and _equal(f0.template, fk.template) and meta_shape(n0) == meta_shape(nk)):
            return False
        if n0.op == "call_module" and fk.key[0] == "module" and fk.key[3]:  # a module with state: one partner
            if self.modules.get(n0.target, nk.target) != nk.target \
                    or self.modules_used.get(nk.target, n0.target) != n0.target:
                return False
        orders = [fk.inputs]
        if f0.commutative and len(fk.inputs) == 2:
            orders.append(fk.inputs[::-1])
        for inputs in orders:
            attempt = dict(trial)
            if len(inputs) == len(f0.inputs) and all(self._same_input(a, b, attempt)
                                                     for a, b in zip(f0.inputs, inputs)):
                trial.update(attempt)
                return True
        return False

    def _same_input(self, a0: fx.Node, ak: fx.Node, trial: dict[fx.Node, fx.Node]) -> bool:
        if a0 in self.map:
            return self.map[a0] is ak
        if a0 in trial:
            return trial[a0] is ak
        if a0 in self.v0.sources and ak in self.vk.sources and ak not in self.used and ak not in trial.values():
            trial[a0] = ak  # a parameter (or something computed from parameters only): bound here
            return self._same(a0, ak, trial)
        return False

    def _commit(self, pairs: dict[fx.Node, fx.Node]) -> None:
        for a, b in pairs.items():
            self.map[a] = b
            self.used.add(b)
            if a.op == "get_attr":
                self.params.update(_state_pairs(self.v0.gm, a.target, self.vk.gm, b.target))
            elif a.op == "call_module" and b.op == "call_module":
                self.modules[a.target] = b.target
                self.modules_used[b.target] = a.target
                self.params.update(_state_pairs(self.v0.gm, a.target, self.vk.gm, b.target))

    def _covers_all(self) -> bool:
        v0, vk = self.v0, self.vk
        if any(n not in self.map for n in v0.nodes if n.op != "output" and n not in v0.sources):
            return False
        if any(n not in self.used for n in vk.nodes
               if n.op != "output" and n not in vk.sources and n not in vk.alias):
            return False
        o0, ok = v0.form(v0.output()), vk.form(vk.output())
        return _equal(o0.template, ok.template) and all(self.map.get(a) is b for a, b in zip(o0.inputs, ok.inputs))

    # -- where the graphs part -------------------------------------------------
    def first_difference(self, k: int) -> tuple[int, str]:
        """(position in model 0's graph, message) of the first model-0 data node
        model k has no partner for; model k's extra nodes or outputs otherwise."""
        v0, vk = self.v0, self.vk
        for n0 in v0.nodes:
            if n0 in self.map or n0.op in ("placeholder", "output") or n0 in v0.sources or n0 in v0.shape:
                continue
            data = [i for i in v0.form(n0).inputs if i not in v0.sources and i not in v0.shape]
            after = data[0] if data else None
            other = self._counterpart(n0, after)
            where = f"after {_name(v0.gm, after)}" if after is not None and after.op != "placeholder" \
                else "at the input"
            if other is not None:
                theirs = f"model {k}'s {describe(vk.gm, other)}: {self.why(n0, other, k)}"
            else:
                theirs = f"nothing like it in model {k}"
            return v0.order[n0], (f"model 0 and model {k} differ {where}: first differing node "
                                  f"{describe(v0.gm, n0)} vs {theirs}")
        for nk in vk.nodes:
            if nk in self.used or nk.op in ("placeholder", "output") or nk in vk.sources or nk in vk.shape \
                    or nk in vk.alias:
                continue
            return len(v0.nodes), f"model {k} computes {describe(vk.gm, nk)} where model 0 has nothing like it"
        return len(v0.nodes), f"model 0 and model {k} return different tensors"

    def why(self, n0: fx.Node, nk: fx.Node, k: int) -> str:
        """What differs between model 0's ``n0`` and model k's ``nk``, in the
        user's terms: the operation or module type, the module's configuration
        and parameter shapes, the constant arguments, the inputs, the shapes."""
        v0, vk = self.v0, self.vk
        f0, fk = v0.form(n0), vk.form(nk)
        parts: list[str] = []
        if not _equal(f0.key[:2], fk.key[:2]):
            parts.append(f"another operation ({_op_name(v0.gm, n0)} vs {_op_name(vk.gm, nk)})")
        elif f0.key[0] == "module":
            m0, mk = v0.module(n0), vk.module(nk)
            c0, ck = dict(_config(m0)), dict(_config(mk))
            order = [a for a in vars(m0) if a in c0] + [a for a in vars(mk) if a in ck and a not in c0]
            for attr in order:  # the constructor's order: channels, kernel, stride, padding, ...
                if not _equal(c0.get(attr), ck.get(attr)):
                    parts.append(f"{attr} {c0.get(attr, 'unset')} vs {ck.get(attr, 'unset')}")
            s0, sk = m0.state_dict(), mk.state_dict()
            for name in list(s0) + [key for key in sk if key not in s0]:
                a, b = _shape_of(s0.get(name)), _shape_of(sk.get(name))
                if a != b:
                    parts.append(f"{name} {_shape_text(a)} vs {_shape_text(b)}")
        elif not _equal(f0.key, fk.key) or not _equal(f0.template, fk.template):
            parts.append(f"other arguments ({_call_text(v0.gm, n0)} vs {_call_text(vk.gm, nk)})")
        s0, sk = meta_shape(n0), meta_shape(nk)
        if s0 != sk:
            parts.append(f"output shape {_shape_text(s0)} vs {_shape_text(sk)}")
        if not parts:
            data0 = [i for i in f0.inputs if i not in v0.sources]
            datak = [i for i in fk.inputs if i not in vk.sources]
            want = [self.map.get(i) for i in data0]
            if want != datak and (not f0.commutative or want != datak[::-1]):
                theirs = ", ".join(_name(vk.gm, i) for i in datak) or "parameters only"
                mine = ", ".join(_name(v0.gm, i) for i in data0) or "parameters only"
                paired = ", ".join(_name(vk.gm, i) if i is not None else "nothing" for i in want)
                parts.append(f"it reads other tensors: model 0's reads {mine} (in model {k}: {paired}), "
                             f"model {k}'s reads {theirs}")
            elif n0.op == "call_module" and nk.op == "call_module":
                parts.append(f"the module is shared differently (model 0 calls {n0.target} "
                             f"{v0.calls.get(n0.target, 1)} time(s), model {k} calls {nk.target} "
                             f"{vk.calls.get(nk.target, 1)} time(s))")
            else:
                parts.append("its parameters or constants differ in shape or value")
        if s0 == sk and s0 is not None:
            parts.append(f"output shape {_shape_text(s0)} in both")
        return "; ".join(parts)

    def _counterpart(self, n0: fx.Node, after: fx.Node | None) -> fx.Node | None:
        if after is None or after not in self.map:
            return None
        candidates = [c for c in self.vk.readers[self.map[after]]
                      if c not in self.used and c not in self.vk.alias and c.op != "output"]
        key = self.v0.form(n0).key
        for c in candidates:
            ck = self.vk.form(c).key
            if ck[:2] == key[:2] or (ck[0] == key[0] == "module" and ck[1] is key[1]):
                return c
        return candidates[0] if candidates else None


def _state_pairs(gm0: nn.Module, t0: str, gmk: nn.Module, tk: str) -> dict[str, str]:
    a, b = _attr(gm0, t0), _attr(gmk, tk)
    if isinstance(a, nn.Module) and isinstance(b, nn.Module):
        return {f"{t0}.{key}": f"{tk}.{key}" for key in a.state_dict() if key in b.state_dict()}
    return {t0: tk}


# ------------------------------------------------------------- all models

@dataclass
class CommonPart:
    """What every model shares with model 0.

    ``maps[k]`` maps model-0 node names of the common part (and parameters
    read there) to model k's nodes (``maps[0]`` is the identity); ``params[k]``
    maps model-0 ``state_dict`` keys to model k's. ``prefix``: the model-0 node
    names in the common part. ``full``: the graphs are one architecture (a full
    zip is possible). ``difference``: the first difference, in user's terms.
    """

    views: list[GraphView]
    maps: list[dict[str, fx.Node]]
    params: list[dict[str, str]]
    prefix: set[str]
    full: bool
    difference: str = ""
    images: list[set[fx.Node]] = field(default_factory=list)

    def state(self, k: int) -> dict[str, torch.Tensor]:
        """Model k's state dict under model 0's names (model 0's own tensor where
        model k has no counterpart: such entries lie outside the common part)."""
        s0 = self.views[0].gm.state_dict()
        if k == 0:
            return s0
        sk = self.views[k].gm.state_dict()
        return {name: sk[self.params[k][name]] if name in self.params[k] else t for name, t in s0.items()}

    def after_common(self, name: str) -> bool:
        """``name`` is a node of model 0 outside the common part."""
        return any(n.name == name for n in self.views[0].nodes) and name not in self.prefix


def common_part(gms: Sequence[fx.GraphModule]) -> CommonPart:
    """Align every model to model 0; the common part is what all of them share."""
    v0 = GraphView(gms[0])
    views, pairings = [v0], []
    for gm in gms[1:]:
        vk = GraphView(gm)
        views.append(vk)
        pairings.append(_Pairing(v0, vk))
    common = set(v0.nodes) - {v0.output()}
    for p in pairings:
        common &= set(p.map)
    differences = [p.first_difference(k) for k, p in enumerate(pairings, start=1) if not p.full]
    full = not differences
    maps = [{n.name: n for n in v0.nodes if n in common}] + [{a.name: b for a, b in p.map.items() if a in common}
                                             for p in pairings]
    params = [{name: name for name in gms[0].state_dict()}] + [p.params for p in pairings]
    images = [set(m.values()) for m in maps]
    return CommonPart(views, maps, params, {n.name for n in common}, full,
                      min(differences)[1] if differences else "", images)


def architecture_difference(gms: Sequence[fx.GraphModule]) -> str | None:
    """``None`` when the traced models are one architecture (node and module
    names may differ: timm's and torchvision's resnet18 are one); otherwise the
    first difference in structure, in the user's terms (module path, type,
    configuration, parameter and output shapes, what a node reads)."""
    if graph_difference(gms) is None:
        return None
    common = common_part(gms)
    if common.full:
        return None
    return (f"{common.difference}. fxzip merges models of one architecture (names may differ); models that "
            "agree from the input up to some layer merge as a partial zip (see fxzip.cut_points(a, x, b)).")


def graph_difference(gms: Sequence[fx.GraphModule]) -> str | None:
    """Why the traced graphs are not node-for-node identical (``None`` when they
    are: the fast path, no alignment needed). Node names count here, so this is
    no verdict on the architecture: see ``architecture_difference``."""
    ref = list(gms[0].graph.nodes)
    ref_index = {n: i for i, n in enumerate(ref)}
    for k, gm in enumerate(gms[1:], start=1):
        nodes = list(gm.graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        for a, b in zip(ref, nodes):
            same_call = a.op == b.op and (a.target == b.target or a.op in ("placeholder", "output"))
            if same_call and a.op == "call_module":
                same_call = type(gms[0].get_submodule(a.target)) is type(gm.get_submodule(b.target))
            if same_call and a.op != "placeholder":  # the same inputs (by position) and constants
                same_call = _equal(_by_position(a, ref_index), _by_position(b, index))
            sa, sb = meta_shape(a), meta_shape(b)
            if not same_call or sa != sb:
                return (f"model 0 and model {k} differ in architecture at node '{a.name}': "
                        f"{_what(gms[0], a)} -> shape {sa} vs {_what(gm, b)} -> shape {sb}. "
                        "fxzip merges models of one architecture; a full zip also needs equal output "
                        "layers (a partial zip that stops before them is planned: see fxzip.cut_points).")
        if len(nodes) != len(ref):
            return (f"model 0 and model {k} trace to graphs of different length "
                    f"({len(ref)} vs {len(nodes)} nodes): they are not one architecture.")
        sa, sb = gms[0].state_dict(), gm.state_dict()
        for name, t in sa.items():
            if name not in sb or sb[name].shape != t.shape:
                other = tuple(sb[name].shape) if name in sb else "missing"
                return (f"model 0 and model {k} differ in parameter '{name}': {tuple(t.shape)} vs "
                        f"{other}. fxzip merges models of one architecture.")
    return None


def _by_position(node: fx.Node, index: dict[fx.Node, int]) -> Any:
    """A node's arguments with every node replaced by its position in the graph."""
    return fx.node.map_arg((tuple(node.args), dict(node.kwargs)), lambda a: ("node", index[a]))


def _what(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    return f"{node.op} {getattr(node.target, '__name__', node.target)}"
