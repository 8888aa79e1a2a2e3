"""Tracing: any ``nn.Module`` (timm models included) to a ``GraphModule`` with shapes.

Why two passes: timm marks some modules as "no trace" because their forward
branches on the input's shape (``vgg``'s ``ConvMlp``) or is wrapped for speed
(``BatchNormAct2d``). Treating them as opaque leaves would hide weight layers
from the analysis, so fxzip first traces with those modules as leaves to learn
the shape each one is called with, then traces again *through* them, handing
each one a proxy whose ``shape``/``size()``/``dim()`` are the concrete values.
The result is a graph specialised to the example input's spatial size, which is
what merging needs (the analysis works on concrete shapes anyway).
"""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["TraceError", "trace", "register_leaf_module", "example_from_data"]


class TraceError(ValueError):
    """The model cannot be turned into a torch.fx graph."""


_USER_LEAVES: set[type] = set()


def register_leaf_module(cls: type) -> type:
    """Keep ``cls`` opaque during tracing (use with ``fxzip.register_rule``).

    A leaf hides its internals from the analysis, so it needs a rule that says
    how it treats channels; without one the analysis fails loudly.
    """
    _USER_LEAVES.add(cls)
    return cls


def _timm_notrace() -> tuple[set[type], list[Callable]]:
    try:
        from timm.layers import _fx as timm_fx
    except Exception:  # timm is optional for plain torch models
        return set(), []
    return set(timm_fx.get_notrace_modules()), list(timm_fx.get_notrace_functions())


def _known_leaves() -> tuple[type, ...]:
    """Modules kept whole because their forward computes the weight it uses
    (timm's weight-standardised convs): traced through, the conv would read a
    computed tensor fxzip cannot fold into. As leaves they are convs whose
    standardisation commutes with permuting input and output channels."""
    try:
        from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
    except ImportError:
        return ()
    return (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)


_KNOWN_LEAVES = _known_leaves()


def _is_torch_leaf(m: nn.Module) -> bool:
    mod = type(m).__module__
    return (mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")) and not isinstance(
        m, nn.Sequential
    )


class _ShapedProxy(fx.Proxy):
    """A proxy that answers shape questions with concrete values."""

    def __init__(self, node: fx.Node, tracer: fx.Tracer, shape: torch.Size):
        super().__init__(node, tracer)
        self._fxzip_shape = torch.Size(shape)

    @property
    def shape(self) -> torch.Size:  # type: ignore[override]
        return self._fxzip_shape

    @property
    def ndim(self) -> int:  # type: ignore[override]
        return len(self._fxzip_shape)

    def size(self, dim: int | None = None):  # type: ignore[override]
        return self._fxzip_shape if dim is None else self._fxzip_shape[dim]

    def dim(self) -> int:  # type: ignore[override]
        return len(self._fxzip_shape)


class _Tracer(fx.Tracer):
    """Standard torch modules are leaves; timm's no-trace modules are leaves only in
    the shape-recording pass, and traced through with concrete shapes otherwise."""

    def __init__(self, leaf_timm: bool, leaf_shapes: dict[str, list[list]] | None = None):
        notrace_modules, notrace_fns = _timm_notrace()
        super().__init__(autowrap_functions=tuple(notrace_fns))
        self.notrace_modules = notrace_modules
        self.leaf_timm = leaf_timm
        self.leaf_shapes = leaf_shapes or {}
        self._calls: dict[str, int] = defaultdict(int)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m) in _USER_LEAVES or isinstance(m, _KNOWN_LEAVES):
            return True
        if type(m) in self.notrace_modules:
            return self.leaf_timm
        return _is_torch_leaf(m)

    def call_module(self, m, forward, args, kwargs):
        if isinstance(m, nn.MultiheadAttention) and type(m) not in _USER_LEAVES:
            # traced as its functional decomposition so the analysis sees q, k, v and heads
            self.decomposed = True
            return _multihead_attention(m, self.path_of_module(m), *args, **kwargs)
        if not self.leaf_timm and type(m) in self.notrace_modules and type(m) not in _USER_LEAVES:
            qualname = self.path_of_module(m)
            calls = self.leaf_shapes.get(qualname)
            idx = self._calls[qualname]
            self._calls[qualname] += 1
            if calls is not None and idx < len(calls):
                shapes = calls[idx]
                args = tuple(
                    _ShapedProxy(a.node, self, s) if isinstance(a, fx.Proxy) and s is not None else a
                    for a, s in zip(args, shapes + [None] * len(args))
                )
        return super().call_module(m, forward, args, kwargs)


def _multihead_attention(m: nn.MultiheadAttention, name: str, query, key, value, key_padding_mask=None,
                         need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                         is_causal: bool = False):
    """``nn.MultiheadAttention`` (eval mode, self-attention) as the ops it runs:
    packed in-projection, heads, scaled dot-product attention, out-projection.
    Its parameters are read in place, so the state_dict keeps its keys."""
    unsupported = []
    if not (query is key and key is value):
        unsupported.append("cross-attention (query, key and value are different tensors)")
    if not m._qkv_same_embed_dim:
        unsupported.append("kdim/vdim different from embed_dim (separate q/k/v weights)")
    if m.bias_k is not None or m.add_zero_attn:
        unsupported.append("add_bias_kv / add_zero_attn")
    if key_padding_mask is not None or attn_mask is not None or is_causal:
        unsupported.append("masks (key_padding_mask, attn_mask, is_causal)")
    if unsupported:
        raise TraceError(
            f"nn.MultiheadAttention '{name}': fxzip merges self-attention with packed q/k/v weights and no "
            f"masks; this call uses {', '.join(unsupported)}. Register the module with "
            "fxzip.register_leaf_module and a rule with fxzip.register_rule, or reformulate it with "
            "separate nn.Linear layers and F.scaled_dot_product_attention."
        )
    heads, head_dim = m.num_heads, m.head_dim
    x = query if m.batch_first else query.transpose(0, 1)
    qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias).unflatten(-1, (3, heads, head_dim)).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)
    out = F.linear(out.transpose(1, 2).flatten(2), m.out_proj.weight, m.out_proj.bias)
    if not m.batch_first:
        out = out.transpose(0, 1)
    weights = None
    if need_weights:
        weights = ((q * head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        if average_attn_weights:
            weights = weights.mean(1)
    return out, weights


def _record_leaf_shapes(gm: fx.GraphModule, notrace: set[type]) -> dict[str, list[list]]:
    shapes: dict[str, list[list]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        if type(gm.get_submodule(node.target)) not in notrace:
            continue
        arg_shapes = []
        for a in node.args:
            meta = a.meta.get("tensor_meta") if isinstance(a, fx.Node) else None
            arg_shapes.append(getattr(meta, "shape", None))
        shapes[node.target].append(arg_shapes)
    return shapes


def _run_trace(tracer: _Tracer, model: nn.Module) -> fx.GraphModule:
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    if getattr(tracer, "decomposed", False):
        gm.graph.eliminate_dead_code()  # attention weights nobody reads (need_weights=True by default)
        gm.recompile()
    return gm


def trace(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> fx.GraphModule:
    """Trace a *copy* of ``model`` (in eval mode) and propagate shapes.

    The copy matters: tracing shares submodules with the traced root, and fxzip
    must never change the user's model (not even its train/eval flag).
    Every node gets ``node.meta['tensor_meta']`` from ``ShapeProp``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    example = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    data_shapes = [tuple(t.shape) for t in example if isinstance(t, torch.Tensor)]
    # Shapes are all tracing needs: two samples are as good as the whole batch.
    example = tuple(t[:2] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in example)
    model = copy.deepcopy(model).eval()
    if isinstance(model, fx.GraphModule):
        gm = model
    else:
        notrace, _ = _timm_notrace()
        try:
            first = _run_trace(_Tracer(leaf_timm=True), model)
            leaf_shapes: dict[str, list[list]] = {}
            if any(n.op == "call_module" and type(first.get_submodule(n.target)) in notrace
                   for n in first.graph.nodes):
                with torch.no_grad():
                    ShapeProp(first).propagate(*example)
                leaf_shapes = _record_leaf_shapes(first, notrace)
            gm = _run_trace(_Tracer(leaf_timm=False, leaf_shapes=leaf_shapes), model)
        except TraceError:
            raise
        except Exception as exc:  # torch.fx raises many types here
            raise TraceError(
                f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}\n"
                "fxzip needs a symbolically traceable forward. Fixes: remove Python control flow "
                "that depends on tensor values, wrap the offending function with "
                "torch.fx.wrap, or mark the offending submodule with "
                "fxzip.register_leaf_module and give it a rule with fxzip.register_rule."
            ) from exc
    _keep_unused_state(gm, model)
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example)
    except Exception as exc:
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        raise TraceError(
            f"running {type(model).__name__} on a batch of shape {data_shapes} failed: "
            f"{type(root).__name__}: {str(root).splitlines()[0] if str(root) else ''}. "
            "Check that the data has the shape the model expects."
        ) from exc
    return gm


def _keep_unused_state(gm: fx.GraphModule, model: nn.Module) -> None:
    """GraphModule drops parameters/buffers the forward never reads (e.g. the
    ``num_batches_tracked`` of a functional batch norm). Put them back so the
    result's ``state_dict`` loads strictly into the original architecture."""
    have = set(gm.state_dict().keys())
    persistent = model.state_dict()
    for name, tensor in persistent.items():
        if name in have:
            continue
        owner_path, _, leaf = name.rpartition(".")
        owner = gm
        for part in owner_path.split(".") if owner_path else []:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        src_owner = model.get_submodule(owner_path) if owner_path else model
        if leaf in src_owner._parameters:
            owner.register_parameter(leaf, src_owner._parameters[leaf])
        else:
            owner.register_buffer(leaf, tensor)


def example_from_data(batch: Any, inputs: Callable[[Any], Any] | None = None) -> Any:
    """Pick the model input out of one element of ``data``: a tensor, or the first
    element of a tuple/list, or whatever ``inputs(batch)`` returns."""
    if inputs is not None:
        return inputs(batch)
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        raise TypeError(
            "data yields dicts; pass inputs=lambda batch: batch['<key>'] to say which entry is the model input"
        )
    raise TypeError(
        f"data yields {type(batch).__name__}; expected a tensor or a tuple/list whose first element "
        "is the input tensor. Pass inputs=callable to pick the input from a batch."
    )
