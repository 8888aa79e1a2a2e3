"""Rules for layers with weights: they open spaces (producers), absorb the
previous space (consumers), or carry per-channel parameters (norms).

Each layer's width rule (``merged_width``) is registered with its channel rule:
a module's resizer sets the attributes that follow its tensors once they were
replaced by wider ones (``out_channels``, ``num_features``, ``num_groups``, ...);
a functional norm's rewrite scales the channel count in its arguments."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..layout import NO_CHANNELS, Layout, Segment, describe
from .heads import shared_head_basis
from .registry import FREE, PerNode, group_aware, register_rule, register_width
from .resize import input_ratio, scaled, set_arg


def _module_param(ctx, node: fx.Node, attr: str) -> str | None:
    mod = ctx.module(node)
    p = getattr(mod, attr, None)
    if p is None:
        return None
    return f"{node.target}.{attr}"


def _view_param(ctx, node: fx.Node, arg) -> tuple[str, tuple] | None:
    """The parameter behind a functional op's weight argument (a get_attr, maybe viewed)."""
    if arg is None:
        return None
    view = ctx.param_view(arg)
    if view is None:
        ctx.fail(node, "its weight is computed, not a parameter read with get_attr; fxzip cannot "
                       "fold a merge into it. Register a rule for the module that computes it.")
    return view.name, view.axes


def _channel_input(ctx, node: fx.Node, x, dim: int) -> tuple[Segment, ...] | None:
    """Segments of ``x`` along ``dim`` if that is its channel axis; ``None`` when ``x``
    carries no channels (the model input); fails if channels sit elsewhere."""
    lay = ctx.layout(x)
    if not lay.has_channels:
        return None
    nd = ctx.ndim(x)
    if lay.dim != dim % nd:
        ctx.fail(node, f"expects channels on axis {dim % nd} but its input {x.name} has them on axis "
                       f"{lay.dim} (shape {tuple(ctx.shape(x))}).")
    return lay.segments


def _weighted(ctx, node: fx.Node, x, weight: tuple[str, tuple] | None, bias: tuple[str, tuple] | None,
              in_dim: int, out_size: int, out_dim: int, groups: int, in_size: int) -> None:
    """Shared by conv/linear, module or functional: a dense layer is a producer of a
    new space and a consumer of its input's space; a depthwise one is per-channel."""
    segs_in = _channel_input(ctx, node, x, in_dim)
    nd_out = ctx.ndim(node)
    ctx.mark_layer(node)
    if groups != 1:
        if groups == in_size == out_size:  # depthwise, multiplier 1: a per-channel op
            if weight is not None and segs_in is not None:
                ctx.role(node, weight[0], weight[1][0], segs_in, "M")
            if bias is not None and segs_in is not None:
                ctx.role(node, bias[0], bias[1][0], segs_in, "M")
            ctx.set(node, Layout(out_dim % nd_out, segs_in) if segs_in else NO_CHANNELS, passthrough=True)
            return
        _grouped_conv(ctx, node, segs_in, weight, bias, out_size, out_dim, groups)
        return
    segs_out = ctx.new_space(node, out_size)
    if weight is not None:
        ctx.role(node, weight[0], weight[1][0], segs_out, "M")
        if segs_in is not None:
            ctx.role(node, weight[0], weight[1][1], segs_in, "U")
    if bias is not None:
        ctx.role(node, bias[0], bias[1][0], segs_out, "M")
    ctx.set(node, Layout(out_dim % nd_out, segs_out))


def _grouped_conv(ctx, node: fx.Node, segs_in, weight, bias, out_size: int, out_dim: int, groups: int) -> None:
    """Grouped (and depthwise with a channel multiplier) convolution: output group
    g reads only input group g, so both spaces are split into ``groups`` groups
    that share one group assignment; the folded weight stays block-diagonal."""
    if segs_in is None:
        ctx.fail(node, f"is a grouped convolution (groups={groups}) on the raw input; fxzip cannot keep its "
                       "groups aligned with an input it does not merge.")
    segs_out = ctx.new_space(node, out_size)
    ctx.set_groups(node, segs_in, groups)
    ctx.set_groups(node, segs_out, groups)
    ctx.tie_groups(node, segs_in, segs_out, groups)
    if weight is not None:
        ctx.role(node, weight[0], weight[1][0], segs_out, "M")
        ctx.role(node, weight[0], weight[1][1], segs_in, "U", groups=groups)
    if bias is not None:
        ctx.role(node, bias[0], bias[1][0], segs_out, "M")
    ctx.set(node, Layout(out_dim % ctx.ndim(node), segs_out))


def _named(ctx, node, attr):
    name = _module_param(ctx, node, attr)
    if name is None:
        return None
    nd = getattr(ctx.module(node), attr).dim()
    return name, tuple(range(nd))


def _conv_along_channels(ctx, node: fx.Node, m: nn.Module, lay: Layout) -> bool:
    """A convolution whose input carries its channels on a *spatial* axis with
    kernel 1, stride 1 and no padding there (a lambda layer's Conv3d over
    ``(B, 1, H, W, V)`` mixing positions of every value channel alike): the
    channels pass untouched along that axis, and the conv's own output
    channels are a new space. The result has two channel axes: a channel x
    channel map (rows: the conv's space; columns: the input's). False when
    the conv is not of that kind."""
    axis = lay.dim - 2
    if lay.grouped or axis < 0 or axis >= len(m.kernel_size) or m.groups != 1:
        return False
    pad = 0 if isinstance(m.padding, str) else m.padding[axis]  # "same" pads nothing along a kernel of 1
    if m.kernel_size[axis] != 1 or m.stride[axis] != 1 or pad != 0:
        return False
    ctx.mark_layer(node)
    segs_out = ctx.new_space(node, m.out_channels)
    ctx.role(node, _module_param(ctx, node, "weight"), 0, segs_out, "M")
    if _module_param(ctx, node, "bias") is not None:
        ctx.role(node, _module_param(ctx, node, "bias"), 0, segs_out, "M")
    ctx.set(node, Layout(1, segs_out, cross_dim=lay.dim, cross=lay.segments))
    return True


def _resize_conv(module: nn.Module, old: Mapping[str, torch.Size]) -> None:
    weight = module.weight
    if module.groups > 1 and "weight" in old:
        module.groups = module.groups * weight.shape[0] // old["weight"][0]
    module.out_channels = weight.shape[0]
    module.in_channels = weight.shape[1] * module.groups


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, width=_resize_conv)
def conv_module(ctx, node: fx.Node) -> None:
    m = ctx.module(node)
    lay = ctx.layout(node.args[0])
    if not (lay.has_channels and lay.dim != 1 and _conv_along_channels(ctx, node, m, lay)):
        _weighted(ctx, node, node.args[0], _named(ctx, node, "weight"), _named(ctx, node, "bias"),
                  in_dim=1, out_size=m.out_channels, out_dim=1, groups=m.groups, in_size=m.in_channels)
    gain = _named(ctx, node, "gain")  # timm's ScaledStdConv2d: one gain per output channel
    if gain is not None:
        lay = ctx.layouts[node]
        if lay.has_channels:
            ctx.role(node, gain[0], 0, lay.segments, "M")


def _conv_function_width(node: fx.Node) -> str | None:
    """``F.conv*`` holds no channel count, except a grouped one's ``groups``."""
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    return FREE if groups == 1 else None


@register_rule(F.conv1d, F.conv2d, F.conv3d, width=PerNode(_conv_function_width))
def conv_function(ctx, node: fx.Node) -> None:
    w = ctx.arg(node, 1, "weight")
    groups = ctx.arg(node, 6, "groups", 1)
    wshape = ctx.shape(w)
    _weighted(ctx, node, node.args[0], _view_param(ctx, node, w), _view_param(ctx, node, ctx.arg(node, 2, "bias")),
              in_dim=1, out_size=wshape[0], out_dim=1, groups=groups, in_size=wshape[1] * groups)


def _resize_linear(module: nn.Module, old: Mapping[str, torch.Size]) -> None:
    module.out_features, module.in_features = module.weight.shape


@register_rule(nn.Linear, width=_resize_linear)
def linear_module(ctx, node: fx.Node) -> None:
    m = ctx.module(node)
    _linear(ctx, node, node.args[0], _named(ctx, node, "weight"), _named(ctx, node, "bias"), m.out_features)


@register_rule(F.linear, width=FREE)
def linear_function(ctx, node: fx.Node) -> None:
    w, b = ctx.arg(node, 1, "weight"), ctx.arg(node, 2, "bias")
    computed = isinstance(b, fx.Node) and ctx.layout(b).has_channels  # e.g. a cat of q/k/v biases
    _linear(ctx, node, node.args[0], _view_param(ctx, node, w), None if computed else _view_param(ctx, node, b),
            ctx.shape(w)[0])
    out = ctx.layouts[node]
    if computed:
        if not out.has_channels or ctx.layout(b).dim != ctx.ndim(b) - 1:
            ctx.fail(node, f"adds the computed bias {b.name} ({describe(ctx.layout(b))}) to an output fxzip cannot "
                           "follow.")
        ctx.unify(node, out.segments, ctx.layout(b).segments)  # its parts follow the output channels


@register_rule(torch.addmm, width=FREE)
def addmm(ctx, node: fx.Node) -> None:
    """``torch.addmm(bias, x, w)`` = ``x @ w + bias``: a linear layer whose weight
    is stored (in, out), as GPT-2's ``Conv1D`` keeps it."""
    bias, x, w = node.args[:3]
    if ctx.arg(node, 3, "beta", 1) != 1 or ctx.arg(node, 4, "alpha", 1) != 1:
        ctx.fail(node, "scales the product or the bias (beta/alpha other than 1); fxzip folds addmm as a linear "
                       "layer only.")
    name, axes = _view_param(ctx, node, w)
    _linear(ctx, node, x, (name, (axes[1], axes[0])), _view_param(ctx, node, bias), ctx.shape(w)[1])


def _linear(ctx, node, x, weight, bias, out_features: int) -> None:
    lay = ctx.layout(x)
    nd = ctx.ndim(x)
    if lay.has_channels and lay.dim != nd - 1:
        # A linear map over a non-channel axis (token mixing): channels pass through,
        # the weight belongs to no space and is averaged.
        ctx.mark_layer(node)
        ctx.set(node, lay, passthrough=True)
        return
    _weighted(ctx, node, x, weight, bias, in_dim=-1, out_size=out_features, out_dim=-1, groups=1,
              in_size=lay.length)


@register_rule(nn.LSTM, nn.GRU, nn.RNN)
def recurrent(ctx, node: fx.Node) -> None:
    """A recurrent layer is a stack of producers: every (layer, direction) has
    its own hidden space, which its gate rows (``weight_ih``, ``weight_hh``,
    biases: one block per gate) produce and its ``weight_hh`` columns read
    back; the next layer reads the concatenation of the directions. Permuting
    a hidden space consistently commutes with the recurrence."""
    m = ctx.module(node)
    if getattr(m, "proj_size", 0):
        ctx.fail(node, "is an LSTM with proj_size > 0; fxzip folds plain recurrent layers only.")
    x = node.args[0]
    lay = ctx.layout(x)
    nd = ctx.ndim(x)
    if lay.has_channels and lay.dim != nd - 1:
        ctx.fail(node, f"reads channels on axis {lay.dim}; a recurrent layer reads them on the last axis.")
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[next(c for c in (nn.LSTM, nn.GRU, nn.RNN) if isinstance(m, c))]
    segs_in = lay.segments if lay.has_channels else None
    every = []
    ctx.mark_layer(node)
    for layer in range(m.num_layers):
        outs: list[Segment] = []
        for direction in range(2 if m.bidirectional else 1):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            hidden = ctx.new_space(node, m.hidden_size)
            ctx.role(node, f"{node.target}.weight_ih{suffix}", 0, hidden * gates, "M")
            if segs_in is not None:
                ctx.role(node, f"{node.target}.weight_ih{suffix}", 1, segs_in, "U")
            ctx.role(node, f"{node.target}.weight_hh{suffix}", 0, hidden * gates, "M")
            ctx.role(node, f"{node.target}.weight_hh{suffix}", 1, hidden, "U")
            if m.bias:
                ctx.role(node, f"{node.target}.bias_ih{suffix}", 0, hidden * gates, "M")
                ctx.role(node, f"{node.target}.bias_hh{suffix}", 0, hidden * gates, "M")
            outs.extend(hidden)
        every.extend(outs)
        if layer < m.num_layers - 1:
            # no tensor of the graph holds these features, so nothing can match them
            ctx.fix(outs, f"internal layer {layer} of the recurrent module {node.target}: no tensor to observe")
        segs_in = tuple(outs)
    # output: (.., directions * hidden); final states: (layers * directions, B, hidden), one space per row
    states = Layout(2, tuple(every), stack_dim=0)
    ctx.set(node, (Layout(ctx.ndim(x) - 1, segs_in), (states, states) if isinstance(m, nn.LSTM) else states))


@register_rule(nn.Embedding)
def embedding(ctx, node: fx.Node) -> None:
    m = ctx.module(node)
    segs = ctx.new_space(node, m.embedding_dim)
    ctx.role(node, f"{node.target}.weight", 1, segs, "M")
    ctx.set(node, Layout(ctx.ndim(node) - 1, segs))


# -- norms ---------------------------------------------------------------------

def _per_channel(ctx, node: fx.Node, x, params: list[tuple[str, tuple] | None], dim: int) -> None:
    """Norm-like op: output in the input's space; its vectors merge with M."""
    lay = ctx.layout(x)
    nd = ctx.ndim(x)
    if lay.has_channels and lay.dim != dim % nd:
        ctx.fail(node, f"normalises channels on axis {dim % nd} but the input's channels are on axis {lay.dim}.")
    for p in params:
        if p is not None and lay.has_channels:
            ctx.role(node, p[0], p[1][-1], lay.segments, "M")
    ctx.set(node, lay, passthrough=True)


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def batch_norm_module(ctx, node: fx.Node) -> None:
    params = [_named(ctx, node, a) for a in ("weight", "bias", "running_mean", "running_var")]
    _per_channel(ctx, node, node.args[0], params, dim=1)


def _resize_batch_norm(module: nn.Module, old: Mapping[str, torch.Size]) -> None:
    ref = module.weight if module.weight is not None else module.running_mean
    module.num_features = ref.shape[0]


# Width: the plain batch norms are resized; SyncBatchNorm and the instance norms
# (and the functional forms) keep their spaces at one model's width.
register_width(_resize_batch_norm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@register_rule(F.batch_norm, F.instance_norm)
def batch_norm_function(ctx, node: fx.Node) -> None:
    names = ("running_mean", "running_var", "weight", "bias")
    params = [_view_param(ctx, node, ctx.arg(node, i + 1, n)) if ctx.arg(node, i + 1, n) is not None else None
              for i, n in enumerate(names)]
    _per_channel(ctx, node, node.args[0], params, dim=1)


def _resize_layer_norm(module: nn.Module, old: Mapping[str, torch.Size]) -> None:
    ref = module.weight if module.weight is not None else None
    if ref is None:
        raise ValueError("a LayerNorm without affine parameters cannot be widened here")
    module.normalized_shape = tuple(ref.shape)


@register_rule(nn.LayerNorm, width=_resize_layer_norm)
@group_aware
def layer_norm_module(ctx, node: fx.Node) -> None:
    m = ctx.module(node)
    _layer_norm(ctx, node, node.args[0], tuple(m.normalized_shape), _named(ctx, node, "weight"), _named(ctx, node, "bias"))


def _rewrite_layer_norm(node: fx.Node, analysis, sizes: Mapping[int, int]) -> None:
    """``F.layer_norm(x, normalized_shape, ...)`` over the channel axis (last):
    the last normalised size grows with the channels."""
    shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
    shape = list(shape) if isinstance(shape, (tuple, list)) else [shape]
    shape[-1] = scaled(shape[-1], input_ratio(node, analysis, sizes), node)
    set_arg(node, 1, "normalized_shape", tuple(shape))


@register_rule(F.layer_norm, width=_rewrite_layer_norm)
@group_aware
def layer_norm_function(ctx, node: fx.Node) -> None:
    shape = tuple(ctx.arg(node, 1, "normalized_shape"))
    w, b = ctx.arg(node, 2, "weight"), ctx.arg(node, 3, "bias")
    _layer_norm(ctx, node, node.args[0], shape, _view_param(ctx, node, w) if w is not None else None,
                _view_param(ctx, node, b) if b is not None else None)


def _layer_norm(ctx, node, x, normalized_shape, weight, bias) -> None:
    lay = ctx.layout(x)
    nd = ctx.ndim(x)
    if lay.grouped:
        _head_norm(ctx, node, x, lay, normalized_shape, weight, bias)
        return
    if lay.has_channels and len(normalized_shape) != 1:
        ctx.fail(node, f"normalises over {normalized_shape}, more than the channel axis; fxzip merges "
                       "layer norms over the channel axis only.")
    _per_channel(ctx, node, x, [weight, bias], dim=nd - 1 if lay.has_channels else 0)


def _head_norm(ctx, node, x, lay: Layout, normalized_shape, weight, bias) -> None:
    """One LayerNorm over head_dim shared by all heads (timm's ``qk_norm=True``):
    its weight follows the one within-head basis of ``shared_head_basis`` (the
    attention's other heads are cut per head by the head tie)."""
    nd = ctx.ndim(x)
    if lay.stack_dim is not None or lay.group_dim is None or lay.dim != nd - 1 or len(normalized_shape) != 1:
        ctx.fail(node, f"normalises {describe(lay)} over {normalized_shape}; fxzip follows a norm over the channels of "
                       "each head (q/k norm) of a layout with one head axis.")
    first = shared_head_basis(ctx, node, x, lay)
    for p in (weight, bias):
        if p is not None:
            ctx.role(node, p[0], p[1][-1], first, "M")
    ctx.set(node, lay, passthrough=True)


def _resize_group_norm(module: nn.Module, old: Mapping[str, torch.Size]) -> None:
    if module.weight is None:
        raise ValueError("a GroupNorm without affine parameters cannot be widened here")
    channels = module.weight.shape[0]
    module.num_groups = module.num_groups * channels // module.num_channels
    module.num_channels = channels


@register_rule(nn.GroupNorm, width=_resize_group_norm)
def group_norm_module(ctx, node: fx.Node) -> None:
    m = ctx.module(node)
    _group_norm(ctx, node, m.num_groups, m.num_channels, _named(ctx, node, "weight"), _named(ctx, node, "bias"))


def _rewrite_group_norm(node: fx.Node, analysis, sizes: Mapping[int, int]) -> None:
    """``F.group_norm(x, num_groups, ...)``: whole groups were added."""
    groups = node.args[1] if len(node.args) > 1 else node.kwargs["num_groups"]
    set_arg(node, 1, "num_groups", scaled(groups, input_ratio(node, analysis, sizes), node))


@register_rule(F.group_norm, width=_rewrite_group_norm)
def group_norm_function(ctx, node: fx.Node) -> None:
    x = node.args[0]
    groups = ctx.arg(node, 1, "num_groups")
    w, b = ctx.arg(node, 2, "weight"), ctx.arg(node, 3, "bias")
    _group_norm(ctx, node, groups, ctx.shape(x)[1], _view_param(ctx, node, w) if w is not None else None,
                _view_param(ctx, node, b) if b is not None else None)


def _group_norm(ctx, node, groups: int, channels: int, weight, bias) -> None:
    """Channels are normalised together within a group: they may move only
    inside it (groups as wholes), or the merged statistics mix groups."""
    lay = ctx.layout(node.args[0])
    if groups not in (1, channels) and lay.has_channels:
        ctx.set_groups(node, lay.segments, groups)
    _per_channel(ctx, node, node.args[0], [weight, bias], dim=1)
