"""Tracing: any ``nn.Module`` (timm models included) to a ``GraphModule`` with shapes.

Two tracers, one contract (a graph of torch-level ops with ``nn.Module`` leaves
and ``tensor_meta`` on every node):

- **symbolic** (plain torch.fx) first: its graphs are not specialised to any
  input size, so a merged model keeps working at other resolutions.
- **concrete shapes** (``fxzip.concrete_trace``) when symbolic tracing cannot
  follow the model: its forward branches or loops on shapes (window padding,
  ``int(N ** 0.5)``, ``for i in range(x.size(1))``), or it contains timm's
  "no-trace" modules (``vgg``'s ``ConvMlp``, ``BatchNormAct2d``, MobileViT
  blocks), which must be traced *through* so their weight layers stay visible.
  Every op runs on the example as it is recorded, so shapes are Python ints and
  the control flow is specialised to the example's spatial size; the batch
  size stays symbolic (merging calibrates on a fixed input size anyway).
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import operator
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx import _symbolic_trace
from torch.fx.passes.shape_prop import ShapeProp

from .concrete_trace import ConcreteTracer, UntraceableControlFlow, drop_dead_sizes, drop_proxies

__all__ = ["TraceError", "trace", "register_leaf_module", "set_opaque_function", "example_from_data",
           "default_example"]


logger = logging.getLogger(__name__)


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


OpaqueFunction = Callable[[Callable], bool]
"""``opaque(fn)``: whether a function the tracer may wrap stays one opaque call node."""


def _nothing_opaque(fn: Callable) -> bool:
    return False


_opaque_function: OpaqueFunction = _nothing_opaque


def set_opaque_function(predicate: OpaqueFunction) -> None:
    """Say which of timm's no-trace functions stay opaque (one call node) when
    tracing; the others are traced through.

    Why a predicate set from outside: the answer is "those with a channel rule"
    (``fxzip.rules`` sets it when it loads), and the rules are a layer above
    tracing: the tracer asks, it does not import them. The predicate is asked
    whenever a tracer is built, so rules registered later count."""
    global _opaque_function
    _opaque_function = predicate


def _wrapped_functions(opaque: OpaqueFunction) -> tuple[Callable, ...]:
    """timm's no-trace functions that stay opaque: only those ``opaque`` accepts
    (those with a channel rule). The others (``window_partition``,
    ``window_reverse``, ...) are reshapes and permutes that the analysis follows
    op by op, so they are traced through (on the concrete path when they branch
    on shapes)."""
    _, functions = _timm_notrace()
    return tuple(f for f in functions if opaque(f))


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


def _kept_whole(m: nn.Module) -> bool:
    return type(m) in _USER_LEAVES or isinstance(m, _KNOWN_LEAVES)


def _is_torch_leaf(m: nn.Module) -> bool:
    mod = type(m).__module__
    return (mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")) and not isinstance(
        m, nn.Sequential
    )


class _Proxy(fx.Proxy):
    """torch.fx's proxy plus slice assignment, recorded as ``operator.setitem``
    (side-effectful, so kept in graph order and never removed as dead code)."""

    def __setitem__(self, index: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


class _Tracer(fx.Tracer):
    """Plain torch.fx: standard torch modules and timm's no-trace modules are leaves
    (a graph that still has no-trace leaves is re-traced with concrete shapes)."""

    def __init__(self, opaque: OpaqueFunction) -> None:
        notrace_modules, _ = _timm_notrace()
        super().__init__(autowrap_functions=_wrapped_functions(opaque))
        self.notrace_modules = notrace_modules
        self.record_stack_traces = True  # an op the analysis refuses is named with the code that called it

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _kept_whole(m) or type(m) in self.notrace_modules or _is_torch_leaf(m)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def call_module(self, m, forward, args, kwargs):
        if isinstance(m, nn.MultiheadAttention) and type(m) not in _USER_LEAVES:
            # traced as its functional decomposition so the analysis sees q, k, v and heads
            self.decomposed = True
            return _multihead_attention(m, self.path_of_module(m), *args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


class _ConcreteTracer(ConcreteTracer):
    """The fallback tracer: the same leaves as ``_Tracer``, except that timm's
    no-trace modules are traced through (every proxy already has a shape)."""

    def __init__(self, example: Sequence[Any], opaque: OpaqueFunction):
        super().__init__(example, autowrap_functions=_wrapped_functions(opaque))
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _kept_whole(m) or _is_torch_leaf(m)

    def call_module(self, m, forward, args, kwargs):
        if not self.executing and isinstance(m, nn.MultiheadAttention) and type(m) not in _USER_LEAVES:
            self.decomposed = True
            return _multihead_attention(m, self.path_of_module(m), *args, **kwargs)
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


@contextmanager
def _fx_wraps_seen_through(opaque: OpaqueFunction) -> Iterator[None]:
    """Functions a library registered with ``torch.fx.wrap`` (torchvision's
    ``stochastic_depth``, ``shifted_window_attention``, ...) are traced into
    the torch ops they run, unless ``opaque`` keeps them (a rule registered for
    the function wins). A library wraps a helper so that *its own* fx users get
    one call node; to the channel analysis that node would be an unknown op,
    while its body is ops the analysis knows. torch.fx patches every entry of
    its module-level table while any tracer runs, so the entries are hidden for
    the duration of fxzip's trace and put back afterwards."""
    table = _symbolic_trace._wrapped_fns_to_patch
    hidden = {key: frame for key, frame in table.items()
              if key[1] in frame and callable(frame[key[1]]) and not opaque(frame[key[1]])}
    for key in hidden:
        del table[key]
    try:
        yield
    finally:
        table.update(hidden)


def _run_trace(tracer: fx.Tracer, model: nn.Module) -> fx.GraphModule:
    try:
        with torch.no_grad(), _fx_wraps_seen_through(_opaque_function):
            graph = tracer.trace(model)
    finally:
        drop_proxies(model)  # forward code may have cached a proxy on a module
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    if isinstance(tracer, ConcreteTracer):
        drop_dead_sizes(gm.graph)
    if getattr(tracer, "decomposed", False):
        gm.graph.eliminate_dead_code()  # attention weights nobody reads (need_weights=True by default)
    gm.recompile()
    return gm


def _symbolic(model: nn.Module) -> fx.GraphModule | None:
    """Plain torch.fx tracing; ``None`` when timm no-trace modules ended up as
    leaves (they hide weight layers, so the model needs the concrete tracer)."""
    tracer = _Tracer(_opaque_function)
    gm = _run_trace(tracer, model)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if type(m) in tracer.notrace_modules and not _kept_whole(m):
                return None
    return gm


_ADVICE = ("Fixes: remove Python control flow that depends on tensor values, wrap the offending function "
           "with torch.fx.wrap, or mark the offending submodule with fxzip.register_leaf_module and give it "
           "a rule with fxzip.register_rule.")


def _control_flow_error(model: nn.Module, exc: UntraceableControlFlow) -> TraceError:
    where = "the top-level forward"
    if exc.module:
        where = f"module '{exc.module}' ({type(model.get_submodule(exc.module)).__name__})"
    return TraceError(
        f"torch.fx cannot trace {type(model).__name__}: Python control flow in {where} depends on "
        f"{exc.reason}: {exc.conversion} of `{exc.op}` at {exc.where}\n"
        "fxzip traces with the example's concrete shapes, so branches and loops on shapes are fine, but "
        f"a branch on {exc.reason} would be fixed to what this one example did. {_ADVICE}"
    )


def _run_error(model: nn.Module, data_shapes: list, exc: BaseException) -> TraceError:
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    return TraceError(
        f"running {type(model).__name__} on a batch of shape {data_shapes} failed: "
        f"{type(root).__name__}: {str(root).splitlines()[0] if str(root) else ''}. "
        "Check that the data has the shape the model expects."
    )


def _propagate(gm: fx.GraphModule, model: nn.Module, example: tuple, quiet: bool = True) -> None:
    """ShapeProp. torch's ShapeProp prints a traceback to stderr before raising;
    fxzip raises its own error (the cause chained), so that print is hidden:
    a user sees one message, not torch.fx's internals first."""
    _keep_unused_state(gm, model)
    gm.eval()
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        ShapeProp(gm).propagate(*example)


def trace(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> fx.GraphModule:
    """Trace a *copy* of ``model`` (in eval mode) and propagate shapes.

    The copy matters: tracing shares submodules with the traced root, and fxzip
    must never change the user's model (not even its train/eval flag).
    Every node gets ``node.meta['tensor_meta']`` from ``ShapeProp``.
    Symbolic tracing is tried first; if it or running its graph fails, the model
    is traced with concrete shapes (specialised to the example's spatial size).
    """
    check_model(model)
    example = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    check_inputs(model, example)
    data_shapes = [tuple(t.shape) for t in example if isinstance(t, torch.Tensor)]
    # Shapes are all tracing needs: two samples are as good as the whole batch.
    example = tuple(t[:2] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in example)
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model).eval()
        try:
            _propagate(gm, gm, example)
        except Exception as exc:
            raise _run_error(model, data_shapes, exc) from exc
        return gm
    try:
        return _trace_copy(model, example, data_shapes)
    except Exception as exc:  # a clearer reason when the images do not fit a fixed-size patch embedding
        problem = _image_size_problem(model, example)
        if problem is None:
            raise
        raise ValueError(problem) from exc


def _trace_copy(model: nn.Module, example: tuple, data_shapes: list) -> fx.GraphModule:
    """Symbolic tracing of a copy, else concrete-shape tracing (see ``trace``)."""
    copied = copy.deepcopy(model).eval()
    symbolic_error: Exception | None = None
    try:
        gm = _symbolic(copied)
        if gm is not None:
            _propagate(gm, copied, example, quiet=True)
            return gm
    except TraceError:
        raise
    except Exception as exc:  # torch.fx raises many types here
        symbolic_error = exc
    gist = f"{type(symbolic_error).__name__}: {(str(symbolic_error).splitlines() or [''])[0][:200]}" if symbolic_error else \
        "timm no-trace modules would hide weight layers"
    logger.info("%s: torch.fx symbolic tracing failed (%s); tracing with concrete shapes, so the graph is "
                "specialised to the example's size %s", type(model).__name__, gist, data_shapes)
    return _concrete(copy.deepcopy(model).eval(), example, data_shapes, symbolic_error)


def check_model(model: Any, which: str = "the model") -> None:
    """Refuse, with the fix, what users pass instead of a plain module: a
    state_dict, or a ``torch.compile`` wrapper (it hides the forward fxzip traces)."""
    from collections.abc import Mapping

    if isinstance(model, Mapping):
        raise TypeError(f"{which} is a {type(model).__name__} (a state_dict?), not an nn.Module: build the "
                        "architecture and load the weights first, e.g. model = timm.create_model(NAME, "
                        "num_classes=N); model.load_state_dict(state_dict)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
        raise TypeError(f"{which} is a torch.compile wrapper ({type(model).__name__}); fxzip traces the module's "
                        "own forward: pass the original module (model._orig_mod), and compile the merged result "
                        "instead")


def check_inputs(model: nn.Module, example: tuple) -> None:
    """Catch, before tracing, inputs the model cannot take and that torch would
    report as something else: a dtype that is not the model's (``expected scalar
    type Double``). (A ViT built for another image size is diagnosed when tracing
    fails: ``_image_size_problem``.)"""
    params = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    dtype = params[0].dtype if params else None
    for t in example:
        if not isinstance(t, torch.Tensor) or dtype is None:
            continue
        if t.dtype == torch.uint8:
            raise TypeError(f"the data is uint8 (raw pixels) but the model computes in {dtype}: convert and "
                            "normalise it as in training, e.g. x.float() / 255, then the model's mean/std")
        if t.is_floating_point() and t.dtype != dtype:
            raise TypeError(f"the data is {t.dtype} but the model's parameters are {dtype}: convert one to the "
                            f"other, e.g. x.to({dtype}) in the DataLoader (or model.to({t.dtype}))")


def _image_size_problem(model: nn.Module, example: tuple) -> str | None:
    """Why tracing failed when a timm patch embedding with a fixed image size does
    not match the images (its assertion would print a Proxy). Asked only after a
    failure: inner patch embeddings (Visformer's ``patch_embed1..3``) are built for
    the feature maps they read, not for the images, and trace fine."""
    images = next((t for t in example if isinstance(t, torch.Tensor) and t.dim() == 4), None)
    if images is None:
        return None
    for name, m in model.named_modules():
        size = getattr(m, "img_size", None)
        if getattr(m, "strict_img_size", False) and isinstance(size, tuple) and len(size) == 2 \
                and not getattr(m, "dynamic_img_size", False) and tuple(images.shape[-2:]) != tuple(size):
            h, w = images.shape[-2:]
            return (f"'{name}' ({type(m).__name__}) was built for {size[0]}x{size[1]} images but the data is "
                    f"{h}x{w}: build the model for the data's size, e.g. timm.create_model(NAME, "
                    f"img_size={h if h == w else (h, w)}), or resize the data to {size[0]}x{size[1]}")
    return None


def _concrete(model: nn.Module, example: tuple, data_shapes: list,
              symbolic_error: Exception | None) -> fx.GraphModule:
    """The fallback; its errors say whether the model's control flow, the data or
    the tracer is at fault."""
    tracer = _ConcreteTracer(example, _opaque_function)
    try:
        gm = _run_trace(tracer, model)
    except TraceError:
        raise
    except UntraceableControlFlow as exc:
        raise _control_flow_error(model, exc) from exc
    except Exception as exc:
        if exc is tracer.op_error:  # the model's own code failed on the example
            raise _run_error(model, data_shapes, exc) from exc
        symbolic = "" if symbolic_error is None else f"{type(symbolic_error).__name__}: {symbolic_error}\n"
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}: {symbolic}"
            f"Tracing with concrete shapes failed: {type(exc).__name__}: {exc}\n"
            f"fxzip needs a traceable forward. {_ADVICE}"
        ) from exc
    try:
        _propagate(gm, model, example)
    except Exception as exc:
        raise _run_error(model, data_shapes, exc) from exc
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


def default_example(model: nn.Module) -> torch.Tensor:
    """An input of the shape timm's config declares, for APIs called without data.

    A timm model built with ``img_size=`` keeps its pretrained config's size
    (224), so the size its patch embedding was built for wins."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None and isinstance(built, tuple) and len(built) == 2:
        size = (size[0], *built)
    if size is None:
        raise TypeError(
            f"{type(model).__name__} declares no input size; pass example_inputs=<a batch of inputs> "
            "so fxzip can trace it and learn its shapes."
        )
    return torch.randn(2, *size)
