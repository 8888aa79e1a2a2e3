"""Concrete-shape tracing: torch.fx tracing in which every proxy knows its value.

Why: plain symbolic tracing cannot follow Python control flow on shapes
(``if H % self.window:``, ``for i in range(x.size(1))``, ``int(N ** 0.5)``),
yet fxzip specialises the graph to the calibration input's size anyway. This
tracer runs every op it records on real tensors of the (tiny) example input, so
shape questions get Python ints and shape control flow is specialised to the
example. The graph is still made of the torch-level ops the user's code called
(``nn.Module`` leaves, torch functions, tensor methods), which is what fxzip's
analysis understands -- unlike ``torch.export``'s aten graphs.

The batch size must stay symbolic (calibration batches and the merged model's
users have any batch size), so every op runs in two *universes* whose inputs
differ only in batch size. A shape entry equal in both is a constant; one that
differs is batch-dependent and stays a graph node (``x.size(0)``, ``B * N``),
so ``x.reshape(B, H, W, C)`` keeps ``B`` symbolic and bakes ``H, W, C``.

Python control flow on values the graph cannot specialise stops tracing with
:class:`UntraceableControlFlow`: on tensor *values* (``if x.sum() > 0``,
``.item()`` used in an ``if``) and on the batch size (``for b in range(B)``).
"""
from __future__ import annotations

import builtins
import functools
import inspect
import linecache
import operator
import os
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.proxy import Attribute

__all__ = ["ConcreteTracer", "ConcreteProxy", "UntraceableControlFlow", "universes", "drop_dead_sizes",
           "drop_proxies"]

# Results of these are tensor metadata (never tensor values): specialised when
# both universes agree, kept as graph nodes when they depend on the batch size.
_META_METHODS = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous", "is_floating_point",
    "is_complex", "is_signed", "element_size", "get_device", "storage_offset", "__len__", "type",
})
_META_FUNCTIONS = frozenset({builtins.getattr, builtins.len, torch.numel, torch.is_floating_point,
                             torch.is_complex, torch.is_tensor})
# torch factories and these methods of real tensors take sizes as ints, so a
# symbolic batch size cannot pass their argument parser: while tracing they
# record a node instead.
_FACTORIES = ("zeros", "ones", "empty", "full", "rand", "randn", "randint", "arange", "eye", "linspace")
_SIZED_METHODS = ("expand", "view", "reshape", "repeat", "tile", "broadcast_to", "unflatten", "narrow",
                  "new_zeros", "new_ones", "new_empty", "new_full")
_SAME_MEANS_EQUAL = {operator.eq: True, operator.ne: False}
_SKIP_FILES = (os.path.join("torch", "fx") + os.sep, os.path.join("torch", "_tensor.py"),
               os.path.join("torch", "overrides.py"), os.path.join("torch", "nn", "modules", "module.py"),
               __file__)

_TENSOR, _SIZE, _VALUE = "tensor", "size", "value"
_MODULE_CALL = nn.Module.__call__  # the unpatched call: tracing replaces it while it runs


class UntraceableControlFlow(Exception):
    """Python code turned a traced value the graph cannot specialise into a Python value.

    ``reason`` is ``"tensor values"`` or ``"the batch size"``; ``module`` the
    qualified name of the module whose forward did it ('' for the root);
    ``where`` the ``file:line: source`` of the user code; ``op`` the value's node.
    """

    def __init__(self, reason: str, conversion: str, module: str, where: str, op: str):
        self.reason, self.conversion, self.module, self.where, self.op = reason, conversion, module, where, op
        super().__init__(f"{conversion} of a value that depends on {reason} ({op}) in "
                         f"{module or 'the top-level forward'} at {where}")


def universes(example: Sequence[Any]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The example inputs and a copy one sample larger: only the batch size differs."""
    bigger = tuple(torch.cat([t, t[:1]]) if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in example)
    return tuple(example), bigger


def _has_tensor(value: Any) -> bool:
    found = False

    def visit(v: Any) -> Any:
        nonlocal found
        found = found or isinstance(v, torch.Tensor)
        return v

    map_aggregate(value, visit)
    return found


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _describe(node: fx.Node) -> str:
    """``gt(sum_1, 0)`` / ``x.item()``: the op that produced a value, in one line."""
    if node.op in ("placeholder", "get_attr"):
        return str(node.target)
    args = ", ".join(str(a) for a in node.args[1 if node.op == "call_method" else 0:])
    if node.op == "call_method":
        return f"{node.args[0]}.{node.target}({args})"
    return f"{getattr(node.target, '__name__', node.target)}({args})"


def _user_line() -> str:
    """``file:line: source`` of the innermost frame that is neither torch nor this tracer."""
    frame = inspect.currentframe()
    while frame is not None and any(s in frame.f_code.co_filename for s in _SKIP_FILES):
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    source = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    return f"{frame.f_code.co_filename}:{frame.f_lineno}: {source}"


class ConcreteProxy(fx.Proxy):
    """A proxy that carries its value in both universes.

    ``kind`` is "tensor" (a tensor or a structure of tensors), "size" (shape
    metadata that depends on the batch size) or "value" (a Python value read
    out of tensor data, e.g. ``.item()``).
    """

    def __init__(self, node: fx.Node, tracer: "ConcreteTracer", values: tuple[Any, Any], kind: str):
        super().__init__(node, tracer)
        self.values = values
        self.kind = kind

    def __getattr__(self, k: str) -> Any:
        if k.startswith("__") or k in ("values", "kind", "node", "tracer"):
            raise AttributeError(k)
        value = getattr(self.values[0], k)
        if callable(value) and not isinstance(value, torch.Tensor):
            return Attribute(self, k)  # a method: recorded when called
        return self.tracer.create_proxy("call_function", builtins.getattr, (self, k), {})

    def __len__(self) -> int:
        return self.tracer.length(self)

    def __setitem__(self, index: Any, value: Any) -> None:
        """``x[:, :C] += y`` (a partial residual): recorded as ``operator.setitem``,
        which torch.fx keeps as a side effect, and applied to the values."""
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})

    def __int__(self) -> int:
        return self.tracer.to_python(self, int)

    def __index__(self) -> int:
        return self.tracer.to_python(self, operator.index)

    def __float__(self) -> float:
        return self.tracer.to_python(self, float)


class ConcreteTracer(fx.Tracer):
    """``fx.Tracer`` whose proxies carry concrete values computed as the graph is recorded.

    Subclasses choose leaves (``is_leaf_module``) and may override
    ``call_module`` as usual; while the tracer runs an op on real values
    (``executing``) module calls and attribute reads must run plainly, which
    this class's ``call_module``/``getattr`` do.
    """

    def __init__(self, example: Sequence[Any], autowrap_functions: tuple[Callable, ...] = ()):
        super().__init__(autowrap_functions=autowrap_functions)
        self._universes = universes(example)
        self._executing = False
        self._placeholders: dict[str, tuple[Any, Any]] = {}
        self.op_error: BaseException | None = None  # set when the model's own code failed on the example

    @property
    def executing(self) -> bool:
        return self._executing

    # ----------------------------------------------------------- recording
    def trace(self, root: nn.Module | Callable, concrete_args: Any = None) -> fx.Graph:
        """``fx.Tracer.trace`` with torch's factories (``torch.zeros(B, C)``) and the
        size-taking methods of real tensors (``self.table.expand(B, -1)``)
        recording a node when a batch-dependent size is passed to them."""
        patched: list[tuple[Any, str, Any, bool]] = []
        try:
            for owner, names, method in ((torch, _FACTORIES, False), (torch.Tensor, _SIZED_METHODS, True)):
                for name in names:
                    fn = getattr(owner, name)
                    patched.append((owner, name, fn, name in vars(owner)))
                    setattr(owner, name, self._recording(name, fn, method))
            return super().trace(root, concrete_args)
        finally:
            for owner, name, fn, own in reversed(patched):
                if own:
                    setattr(owner, name, fn)
                else:
                    delattr(owner, name)

    def _recording(self, name: str, fn: Callable, method: bool) -> Callable:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            proxies: list[Any] = []
            map_aggregate((args, kwargs), lambda a: proxies.append(a) if isinstance(a, ConcreteProxy) else None)
            if proxies and not self._executing:
                if method:
                    return self.create_proxy("call_method", name, args, kwargs)
                return self.create_proxy("call_function", fn, args, kwargs)
            return fn(*args, **kwargs)

        return call

    def create_args_for_root(self, root_fn: Callable, is_module: bool, concrete_args: Any = None):
        """One placeholder per example input; later parameters keep their defaults
        (a ``mask=None`` stays ``None``, so ``if mask is not None`` is not taken)."""
        params = list(inspect.signature(inspect.unwrap(root_fn)).parameters.values())
        args: list[Any] = []
        if is_module:
            args.append(self.root)
            params = params[1:]
        count = len(self._universes[0])
        names: list[str] = []
        for p in params:
            if len(names) == count:
                break
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                names.append(p.name)
            elif p.kind == p.VAR_POSITIONAL:
                names += [f"{p.name}_{i}" for i in range(count - len(names))]
            else:
                break
        if len(names) < count:
            raise TypeError(f"forward takes {len(names)} positional inputs, got {count} example inputs")
        for i, name in enumerate(names):
            self._placeholders[name] = (self._universes[0][i], self._universes[1][i])
            args.append(self.create_proxy("placeholder", name, (), {}))
        return root_fn, args

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                     type_expr: Any = None, proxy_factory_fn: Callable | None = None) -> Any:
        """Run the op in both universes, then record it -- or, for shape metadata
        equal in both, return the Python value and record nothing."""
        values = (self._run(kind, target, args, kwargs, 0), self._run(kind, target, args, kwargs, 1))
        result = self._kind(kind, target, args, values)
        if result == _SIZE and _same(*values) and self._reads_metadata(kind, target, args):
            return values[0]

        def factory(node: fx.Node) -> ConcreteProxy:
            node.meta["fxzip_concrete_kind"] = result
            return ConcreteProxy(node, self, values, result)

        return super().create_proxy(kind, target, args, kwargs, name, type_expr, factory)

    def _run(self, kind: str, target: Any, args: tuple, kwargs: dict, u: int) -> Any:
        if kind == "placeholder":
            return self._placeholders[target][u]

        def concrete(a: Any) -> Any:
            if isinstance(a, ConcreteProxy):
                return a.values[u]
            if isinstance(a, Attribute) and isinstance(a.root, ConcreteProxy):
                return getattr(a.root.values[u], a.attr)
            return a

        a, kw = map_aggregate(args, concrete), map_aggregate(kwargs, concrete)
        self._executing = True  # module calls and attribute reads run plainly from here
        try:
            with torch.no_grad():
                if kind == "get_attr":
                    value: Any = self.root
                    for part in target.split("."):
                        value = getattr(value, part)
                    return value
                if kind == "call_function":
                    return target(*a, **kw)
                if kind == "call_method":
                    return getattr(a[0], target)(*a[1:], **kw)
                if kind == "call_module":
                    return _MODULE_CALL(self.root.get_submodule(target), *a, **kw)
            raise ValueError(f"unknown node kind {kind!r}")
        except Exception as exc:
            self.op_error = exc
            raise
        finally:
            self._executing = False

    @staticmethod
    def _reads_metadata(kind: str, target: Any, args: tuple) -> bool:
        """A shape query (``x.size(1)``, ``x.shape[2:]``): equal in both universes
        means independent of the batch size. Arithmetic on a batch size is not
        (``B // 4`` is 0 for both B=2 and B=3), so it always stays a node."""
        if kind == "call_method":
            return target in _META_METHODS
        if kind == "call_function" and target is operator.getitem:
            return isinstance(args[0], ConcreteProxy) and args[0].kind == _SIZE
        return kind == "call_function" and target in _META_FUNCTIONS

    @staticmethod
    def _kind(kind: str, target: Any, args: tuple, values: tuple[Any, Any]) -> str:
        if kind in ("placeholder", "get_attr") or _has_tensor(values[0]) or _has_tensor(values[1]):
            return _TENSOR
        proxies: list[ConcreteProxy] = []
        map_aggregate(args, lambda a: proxies.append(a) if isinstance(a, ConcreteProxy) else None)
        if any(p.kind == _VALUE for p in proxies):
            return _VALUE
        if all(p.kind == _SIZE for p in proxies):
            return _SIZE  # arithmetic on sizes (and math.* on them)
        if kind == "call_method" and target in _META_METHODS:
            return _SIZE
        if kind == "call_function" and target in _META_FUNCTIONS:
            return _SIZE
        return _VALUE

    # ------------------------------------------------- plain execution inside ops
    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if self._executing:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._executing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # ------------------------------------------------ Python values from proxies
    def _refuse(self, obj: ConcreteProxy, conversion: str) -> UntraceableControlFlow:
        reason = "the batch size" if obj.kind == _SIZE else "tensor values"
        return UntraceableControlFlow(reason, conversion, self.scope.module_path, _user_line(), _describe(obj.node))

    def to_bool(self, obj: fx.Proxy) -> bool:
        """Shape equalities that hold in both universes (``assert x.shape[0] ==
        y.shape[0]``) are specialised; any other truth value of a batch size or of
        tensor data would silently fix one branch, so it stops tracing."""
        if isinstance(obj, ConcreteProxy) and obj.kind == _SIZE:
            want = _SAME_MEANS_EQUAL.get(obj.node.target)
            if want is not None and bool(obj.values[0]) == bool(obj.values[1]) == want:
                return want
        raise self._refuse(obj, "bool()") if isinstance(obj, ConcreteProxy) else super().to_bool(obj)

    def to_python(self, obj: ConcreteProxy, convert: Callable[[Any], Any]) -> Any:
        raise self._refuse(obj, f"{getattr(convert, '__name__', convert)}()")

    def length(self, obj: ConcreteProxy) -> int:
        n0, n1 = len(obj.values[0]), len(obj.values[1])
        if n0 != n1:
            raise UntraceableControlFlow("the batch size", "len()", self.scope.module_path, _user_line(),
                                         _describe(obj.node))
        return n0

    def iter(self, obj: fx.Proxy) -> Iterator:
        if not isinstance(obj, ConcreteProxy):
            return super().iter(obj)
        return iter([obj[i] for i in range(self.length(obj))])

    def keys(self, obj: fx.Proxy) -> Any:
        if isinstance(obj, ConcreteProxy) and isinstance(obj.values[0], dict):
            return list(obj.values[0].keys())
        return super().keys(obj)


def drop_dead_sizes(graph: fx.Graph) -> None:
    """Remove shape nodes nobody reads: ``B, C, H, W = x.shape`` records ``x.shape``
    for ``B`` even when only the constants ``C, H, W`` are used."""
    for node in reversed(list(graph.nodes)):
        if not node.users and node.meta.get("fxzip_concrete_kind") == _SIZE:
            graph.erase_node(node)


def drop_proxies(model: nn.Module) -> None:
    """Tracing runs forward code that may cache what it computed on the module
    (timm's LeViT/EfficientFormer cache attention biases per device). A cached
    proxy would leak into the next trace or the returned module: drop it."""
    for module in model.modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, fx.Proxy):
                delattr(module, key)
            elif isinstance(value, dict) and not key.startswith("_"):
                for k in [k for k, v in value.items() if isinstance(v, fx.Proxy)]:
                    del value[k]

