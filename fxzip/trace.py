"""Capture: any ``nn.Module`` (timm, torchvision, Hugging Face, a user's own)
to a ``GraphModule`` of torch-level ops with shapes.

One path, ``torch.export`` (non-strict): it runs the model's own Python on
fake tensors and records every torch op it reaches, so a library's helpers
(functions it wrapped for torch.fx, modules it marks as not traceable, its
attention and masking utilities) are never an opaque name: they are the ops
they run. Control flow on shapes is specialised to the example, with the batch
dimension kept symbolic where the model allows (a model that branches on the
batch size is captured for that batch size, and says so); a branch on data
values is refused with the line that takes it.

Three steps turn the export into the graph the analysis reads:

- ``fxzip.leaf_modules.regroup``: each call of a module with a channel rule
  (``nn.Conv2d``, ``nn.BatchNorm2d``, a registered leaf) is one
  ``call_module`` node again, named after its path, so rules see weights by
  role and passes fold, reset and refit modules;
- ``fxzip.aten_ops.normalise``: ATen ops renamed to torch-level ops (one
  table), in-place ops made out of place;
- ``ShapeProp`` on the example: ``tensor_meta`` on every node.

The graph's parameters keep their ``state_dict`` names, so a merged model
loads into the user's class with ``load_state_dict``.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import linecache
import logging
import os
import traceback
import types
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from .aten_ops import CONSTANT, HasRule, normalise
from .keyword_inputs import positional_from_dict
from .leaf_modules import LeafCallError, attr_at, regroup
from .opaque_calls import functions_kept_whole, restore_calls

__all__ = ["TraceError", "trace", "trace_models", "check_batch_size", "captured_batch_size", "register_leaf_module", "set_opaque_functions", "set_whole_module", "set_op_rule",
           "example_from_data", "default_example"]


logger = logging.getLogger(__name__)


class TraceError(ValueError):
    """The model cannot be captured as a graph."""


_USER_LEAVES: set[type] = set()


def register_leaf_module(cls: type) -> type:
    """Keep ``cls`` whole (one call node) when capturing (use with ``fxzip.register_rule``).

    A module class with a registered rule is kept whole anyway; registering it
    as a leaf also keeps it whole before its rule exists, so the analysis then
    names it instead of following its ops."""
    _USER_LEAVES.add(cls)
    return cls


OpaqueFunctions = Callable[[], "set[Callable]"]
"""``opaque()``: the functions that stay one call node when captured."""

WholeModule = Callable[[nn.Module], bool]
"""``whole(module)``: whether a module stays one call node (it has a channel rule)."""


def _no_functions() -> set[Callable]:
    return set()


def _no_module_rule(module: nn.Module) -> bool:
    return False


_opaque_functions: OpaqueFunctions = _no_functions
_whole_module: WholeModule = _no_module_rule


def set_opaque_functions(functions: OpaqueFunctions) -> None:
    """Say which functions stay one call node when capturing (the user's
    functions with a channel rule); the others are captured as the ops they run.

    Why set from outside: the answer is "those with a channel rule"
    (``fxzip.rules`` sets it when it loads), and the rules are a layer above
    capture: capture asks, it does not import them. It is asked at every
    capture, so rules registered later count."""
    global _opaque_functions
    _opaque_functions = functions


_op_has_rule: HasRule = lambda op, target: False  # noqa: E731


def set_op_rule(predicate: HasRule) -> None:
    """Say which torch-level ops have a channel rule, so an ATen op with both a
    function and a method of its name becomes the one the rules know."""
    global _op_has_rule
    _op_has_rule = predicate


def set_whole_module(predicate: WholeModule) -> None:
    """Say which modules stay one call node (those with a channel rule); set by
    ``fxzip.rules`` as ``set_opaque_functions`` is."""
    global _whole_module
    _whole_module = predicate


def _known_leaves() -> tuple[type, ...]:
    """Modules kept whole because their forward computes the weight it uses
    (timm's weight-standardised convs): captured op by op, the conv would read
    a computed tensor fxzip cannot fold into. Whole, they are convs whose
    standardisation commutes with permuting input and output channels."""
    try:
        from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
    except ImportError:
        return ()
    return (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)


_KNOWN_LEAVES = _known_leaves()


def _must_stay_whole(m: nn.Module) -> bool:
    return type(m) in _USER_LEAVES or isinstance(m, _KNOWN_LEAVES)


def _kept_whole(m: nn.Module) -> bool:
    return _must_stay_whole(m) or _whole_module(m)


def _multihead_attention(m: nn.MultiheadAttention, name: str, query, key, value, key_padding_mask=None,
                         need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                         is_causal: bool = False):
    """``nn.MultiheadAttention`` (eval mode, self-attention) as the ops it runs:
    packed in-projection, heads, scaled dot-product attention, out-projection.
    (Its own forward takes a fused fast path in eval mode, one opaque op.)
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
def _attention_as_ops(model: nn.Module) -> Iterator[None]:
    """Every ``nn.MultiheadAttention`` of the model (not a registered leaf) runs
    as ``_multihead_attention`` while it is captured, so the analysis sees q, k,
    v and heads; the class is patched on the instances only, and put back."""
    patched = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention) and type(m) not in _USER_LEAVES and not _kept_whole(m):
            m.forward = (lambda self, n: lambda *a, **k: _multihead_attention(self, n, *a, **k))(m, name)
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _batch_dims(example: tuple) -> tuple:
    """One symbolic batch size shared by every tensor input's first axis."""
    batch = torch.export.Dim("batch")
    return tuple({0: batch} if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in example)


_DATA_DEPENDENT = ("GuardOnDataDependentSymNode", "DataDependentOutputException")


def _export(model: nn.Module, small: tuple, example: tuple) -> tuple[torch.export.ExportedProgram, bool]:
    """Non-strict export of two samples with a symbolic batch size, else of the
    whole example with its batch size fixed; (program, whether the batch size
    stayed symbolic)."""
    with torch.no_grad(), _attention_as_ops(model), functions_kept_whole(_opaque_functions()), \
            _warnings_hidden():
        try:
            return torch.export.export(model, small, dynamic_shapes=_batch_dims(small), strict=False), True
        except Exception as exc:  # noqa: BLE001 - retried with a fixed batch size, reported if that fails
            if _data_dependent(exc):
                raise
            logger.info("%s: the batch size cannot stay symbolic (%s); capturing it for batches of %d, "
                        "the merged graph takes only that batch size", type(model).__name__, _gist(exc),
                        _batch_size(example))
        return torch.export.export(model, example, strict=False), False


@contextmanager
def _warnings_hidden() -> Iterator[None]:
    """export warns about its own internals (deprecations, guards it adds);
    none of it is the user's to act on."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _batch_size(example: tuple) -> int:
    return next((t.shape[0] for t in example if isinstance(t, torch.Tensor) and t.dim() > 0), 0)


def _gist(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _data_dependent(exc: BaseException) -> bool:
    text = str(exc)
    return "data-dependent" in text or "data dependent" in text or type(exc).__name__ in _DATA_DEPENDENT


def _user_line(exc: BaseException) -> str:
    """The model's own line that branched on a value: the innermost frame of
    the exception's traceback outside torch and fxzip (non-strict export runs
    the model's Python, so its frame is on the stack)."""
    skip = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep,
            os.path.dirname(contextlib.__file__) + os.sep)
    frames = []
    seen: BaseException | None = exc
    while seen is not None:
        frames = [f for f in traceback.extract_tb(seen.__traceback__)
                  if not os.path.abspath(f.filename).startswith(skip)] or frames
        seen = seen.__cause__ or seen.__context__
    if not frames:
        return _gist(exc)
    frame = frames[-1]
    code = (frame.line or linecache.getline(frame.filename, frame.lineno or 0)).split("  #")[0].strip()
    return f"{frame.filename}:{frame.lineno} in {frame.name}" + (f": `{code}`" if code else "")


_ADVICE = ("Fixes: remove Python control flow that depends on tensor values (or move it out of forward), "
           "or mark the offending submodule with fxzip.register_leaf_module and give it a rule with "
           "fxzip.register_rule.")


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
    """Capture a *copy* of ``model`` (in eval mode) and propagate shapes.

    The copy matters: fxzip must never change the user's model (not even its
    train/eval flag). Every node gets ``node.meta['tensor_meta']`` from
    ``ShapeProp``; a ``GraphModule`` is taken as the graph it already is.
    """
    check_model(model)
    example = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    check_inputs(model, example)
    data_shapes = [tuple(t.shape) for t in example if isinstance(t, torch.Tensor)]
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model).eval()
        try:
            fixed = captured_batch_size(gm)
            _propagate(gm, gm, _two_samples(example) if fixed is None else first_samples(example, fixed))
        except Exception as exc:
            raise _run_error(model, data_shapes, exc) from exc
        return gm
    try:
        return _capture(model, example, data_shapes)
    except Exception as exc:  # a clearer reason when the images do not fit a fixed-size patch embedding
        problem = _image_size_problem(model, example)
        if problem is None:
            raise
        raise ValueError(problem) from exc


def trace_models(models: Sequence[nn.Module], example_inputs: Any) -> list[fx.GraphModule]:
    """``trace`` of every model, capturing each architecture once: a model built
    like an earlier one (same classes, module settings, parameter names, shapes
    and dtypes, same ties, no hooks) gets a copy of that model's graph over its
    own weights. Sound because a non-strict export never reads parameter
    values (a branch on one is refused), so the graph depends on the
    architecture only; it halves the capture time of a merge of two models."""
    captured: dict[Any, fx.GraphModule] = {}
    out = []
    for model in models:
        key = _architecture(model)
        if key is None or key not in captured or isinstance(model, fx.GraphModule):
            gm = trace(model, example_inputs)
            if key is not None:
                captured[key] = gm
        else:
            gm = _same_graph(captured[key], model)
        out.append(gm)
    return out


_SETTINGS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, type, types.FunctionType,
             types.BuiltinFunctionType)


class _Unknown(Exception):
    """A module setting fxzip cannot compare."""


def _frozen(value: Any) -> Any:
    if isinstance(value, _SETTINGS):
        return value
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((_frozen(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return ("set", frozenset(_frozen(v) for v in value))
    raise _Unknown


def _architecture(model: nn.Module) -> Any:
    """What a capture depends on besides parameter values, or None when the
    model holds something that may change it unseen (hooks, settings fxzip
    cannot compare)."""
    if not isinstance(model, nn.Module):
        return None
    modules = []
    try:
        for name, m in model.named_modules(remove_duplicate=False):
            if m._forward_hooks or m._forward_pre_hooks:
                return None
            settings = tuple((key, _frozen(value)) for key, value in sorted(vars(m).items())
                             if key not in ("_parameters", "_buffers", "_modules") and not
                             (key.startswith("_") and key.endswith("hooks")))
            modules.append((name, type(m), settings))
    except _Unknown:
        return None
    state = model.state_dict(keep_vars=True)
    shared: dict[int, list[str]] = {}
    for k, v in state.items():
        shared.setdefault(id(v), []).append(k)
    return (tuple(modules), tuple((k, tuple(v.shape), v.dtype) for k, v in state.items()),
            tuple(tuple(names) for names in shared.values() if len(names) > 1))


def _same_graph(captured: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """``captured``'s graph over a copy of ``model`` (built like the captured one)."""
    copied = sharing_copy(model)
    graph = fx.Graph()
    output = graph.output(graph.graph_copy(captured.graph, {}))
    output.meta = dict(next(n for n in captured.graph.nodes if n.op == "output").meta)
    graph._codegen = captured.graph._codegen
    root = _root(graph, copied, captured)
    gm = fx.GraphModule(root, graph, type(model).__name__)
    _keep_unused_state(gm, copied)
    _in_model_order(gm, copied)
    gm.eval()
    return gm


def sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules, in eval mode, over the same parameter and
    buffer tensors.

    Why share: the capture must not touch the user's model (not even its
    train/eval flag), so it works on a copy; but it never writes a weight
    (export reads shapes only), and every pass that writes weights does so on
    a copy of its own (the fold, the heads of a partial zip). Copying the
    tensors too held every model's weights twice: 0.7 GB of a ViT-B merge."""
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo).eval()


def first_samples(example: tuple, n: int) -> tuple:
    """The first ``n`` samples of every batched input."""
    return tuple(t[:n] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in example)


def _two_samples(example: tuple) -> tuple:
    """Shapes are all capture needs: two samples are as good as the whole batch
    (two, not one: a batch of one would be captured as a fixed size)."""
    def cut(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        return t[:2] if t.shape[0] >= 2 else torch.cat([t, t])
    return tuple(cut(t) for t in example)


def _capture(model: nn.Module, example: tuple, data_shapes: list) -> fx.GraphModule:
    """Export a copy, regroup whole modules, normalise the ops, propagate shapes."""
    copied = sharing_copy(model)
    small = _two_samples(example)
    try:
        program, symbolic_batch = _export(copied, small, example)
    except TraceError:
        raise
    except Exception as exc:
        failed = _eager_failure(copied, small)
        if failed is not None:  # the model's own code fails on this data: the data is at fault
            raise _run_error(model, data_shapes, failed) from failed
        raise _capture_error(model, data_shapes, exc) from exc
    unlifted = program.module()
    graph = unlifted.graph
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        graph.erase_node(node)
    for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
        graph.erase_node(node)  # state the forward never reads (``num_batches_tracked``) returns unread
    try:
        regroup(unlifted, copied, _kept_whole, _must_stay_whole)
    except LeafCallError as exc:
        raise TraceError(str(exc)) from None
    restore_calls(graph)
    for node in graph.nodes:
        if node.op == "get_attr" and attr_at(copied, str(node.target)) is None:
            node.meta[CONSTANT] = True
    unmapped = normalise(unlifted, _op_has_rule)
    if unmapped:
        logger.debug("%s: ATen ops kept as they are: %s", type(model).__name__, ", ".join(unmapped))
    _outputs_as_returned(graph, program.call_spec.out_spec)
    if not symbolic_batch:
        _check_batch_size(graph, _batch_size(example))
    graph._codegen = fx.graph.CodeGen()  # positional inputs, the outputs as they are (no pytree specs)
    gm = fx.GraphModule(_root(graph, copied, unlifted), graph, type(model).__name__)
    gm.graph.lint()
    gm.recompile()
    try:
        _propagate(gm, copied, example if not symbolic_batch else small)
    except Exception as exc:
        raise _run_error(model, data_shapes, exc) from exc
    _in_model_order(gm, copied)
    return gm


def _in_model_order(gm: fx.GraphModule, model: nn.Module) -> None:
    """Submodules, parameters and buffers in the order the user's model has
    them (export lists what functional ops read before the modules it calls),
    so ``state_dict()`` lists its keys as the model's does."""
    for path, ours in gm.named_modules():
        if ours is gm and path:
            continue
        theirs = attr_at(model, path) if path else model
        if not isinstance(theirs, nn.Module) or ours is theirs:
            continue
        for table in ("_modules", "_parameters", "_buffers"):
            mine, order = getattr(ours, table), list(getattr(theirs, table))
            rank = {name: i for i, name in enumerate(order)}
            items = sorted(mine.items(), key=lambda kv: rank.get(kv[0], len(rank)))
            mine.clear()
            mine.update(items)


def check_batch_size(x: torch.Tensor, size: int) -> None:
    """The guard of a graph captured for one batch size (the model branches on
    it): another batch size would run the branches taken for ``size``."""
    if x.shape[0] != size:
        raise ValueError(f"this graph was captured for batches of {size} (the model's forward branches or loops "
                         f"on the batch size) and got a batch of {x.shape[0]}: use batches of {size}, e.g. "
                         "DataLoader(..., drop_last=True)")


torch.fx.node._side_effectful_functions.add(check_batch_size)


def captured_batch_size(gm: fx.GraphModule) -> int | None:
    """The batch size ``gm`` was captured for, where it carries the guard of
    ``check_batch_size``; ``None`` where any batch size runs."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is check_batch_size:
            return int(node.args[1])
    return None


def _check_batch_size(graph: fx.Graph, size: int) -> None:
    first = next((n for n in graph.nodes if n.op == "placeholder"
                  and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() > 0), None)
    if first is None:
        return
    with graph.inserting_after(first):
        graph.call_function(check_batch_size, (first, size))


def _outputs_as_returned(graph: fx.Graph, out_spec: pytree.TreeSpec) -> None:
    """The graph returns what the model returns: export flattens the result
    into a tuple of tensors; it is put back into the model's structure (a
    tensor, a tuple, torchvision's dict). A structure of another class
    (Hugging Face's ``ModelOutput``) comes back as a plain dict or tuple of
    the same entries, which is what a GraphModule can return."""
    output = next(n for n in graph.nodes if n.op == "output")
    flat = output.args[0]
    value = pytree.tree_unflatten(list(flat) if isinstance(flat, (list, tuple)) else [flat], out_spec)
    output.args = (_plain(value),)


def _plain(value: Any) -> Any:
    from collections.abc import Mapping

    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not isinstance(value, fx.Node):
        return type(value)(_plain(v) for v in value) if type(value) in (list, tuple) else tuple(map(_plain, value))
    return value


def _root(graph: fx.Graph, model: nn.Module, unlifted: nn.Module) -> dict[str, Any]:
    """What the graph reads, by name: the user's modules and parameters (so the
    state_dict keeps its names), and export's own constants."""
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        target = str(node.target)
        root[target] = attr_at(model, target)
        if root[target] is None:
            root[target] = attr_at(unlifted, target)
    return root


def _eager_failure(model: nn.Module, example: tuple) -> BaseException | None:
    """Asked only after export failed: does the model fail on the example in
    plain eager mode too?"""
    try:
        with torch.no_grad():
            model(*example)
    except Exception as exc:  # noqa: BLE001 - returned to be reported
        return exc
    return None


def _capture_error(model: nn.Module, data_shapes: list, exc: BaseException) -> TraceError:
    if _data_dependent(exc):
        return TraceError(
            f"fxzip cannot capture {type(model).__name__}: Python control flow depends on tensor values at "
            f"{_user_line(exc)}\nfxzip captures with the example's shapes, so branches and loops on shapes are "
            f"fine, but a branch on values would be fixed to what this one example did. {_ADVICE}")
    return TraceError(f"fxzip cannot capture {type(model).__name__} with torch.export: {_gist(exc)}\n{_ADVICE}")


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


def example_from_data(batch: Any, inputs: Callable[[Any], Any] | None = None,
                      parameters: Sequence[inspect.Parameter] | None = None) -> Any:
    """Pick the model input out of one element of ``data``: a tensor, or the first
    element of a tuple/list, a dict of keyword inputs laid out along the
    forward's ``parameters`` (``fxzip.keyword_inputs``), or whatever
    ``inputs(batch)`` returns."""
    if inputs is not None:
        batch = inputs(batch)
        return positional_from_dict(batch, parameters) if isinstance(batch, Mapping) and parameters else batch
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        if parameters is None:
            raise TypeError(
                "data yields dicts; pass inputs=lambda batch: batch['<key>'] to say which entry is the model input"
            )
        return positional_from_dict(batch, parameters)
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
