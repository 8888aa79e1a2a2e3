"""Rules for ops that keep every channel where it is: activations, dropout,
pooling over space, reductions over non-channel axes, and broadcasting
arithmetic (residual adds, gates, layer scales). None of them holds a channel
count, so all take wider channels as they are (``width=FREE``)."""
from __future__ import annotations

import operator
from dataclasses import replace

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..layout import NO_CHANNELS, Layout, describe
from .heads import per_head, position_in_head
from .registry import FREE, group_aware, map_aware, register_rule
from .shape import as_stack, join_stack

_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Hardtanh, nn.Softsign, nn.Tanhshrink,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
_UNARY_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu,
    F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, F.interpolate, torch.relu, torch.relu_, torch.sigmoid, torch.tanh,
    torch.exp, torch.abs, torch.sqrt, torch.rsqrt, torch.square, torch.clamp, torch.erf, torch.neg,
    operator.neg, operator.pos, torch.nn.functional.normalize,
)
_UNARY_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "sqrt", "rsqrt", "square",
    "clamp", "clamp_", "clamp_min", "clamp_max", "neg", "contiguous", "clone", "detach", "float", "half",
    "double", "bfloat16", "to", "type_as", "type", "erf", "sign",
)


_RESAMPLING = (F.interpolate, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
"""Unary ops that move values along spatial axes (not element-wise on a channel x channel map)."""


@register_rule(*_UNARY_MODULES, *_UNARY_FUNCTIONS, *_UNARY_METHODS, width=FREE)
@group_aware
@map_aware
def unary(ctx, node: fx.Node) -> None:
    """Channel i in, channel i out. For nonlinear ops this is the papers' approximation."""
    lay = ctx.layout(node.args[0])
    if isinstance(lay, Layout) and lay.cross_dim is not None and (
            node.target in _RESAMPLING or (node.op == "call_module" and type(ctx.module(node)) in _RESAMPLING)):
        ctx.fail(node, "resamples a channel x channel map along its axes; fxzip follows such maps through "
                       "element-wise ops only.")
    if isinstance(lay, Layout) and lay.param is not None and not lay.has_channels:
        # An elementwise function of a raw parameter (gamma.exp(), a per-head
        # gate's sigmoid, a clamped logit scale) is laid out like the parameter:
        # permuting its entries permutes the result, so the view is followed.
        src, out = ctx.shape(node.args[0]), ctx.shape(node)
        keep = src is not None and out is not None and tuple(src) == tuple(out)
        ctx.set(node, lay if keep else NO_CHANNELS, passthrough=True)
        return
    ctx.set(node, lay, passthrough=True)


@register_rule(nn.Softmax, nn.LogSoftmax, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax",
               "log_softmax", width=FREE)
@group_aware
@map_aware
def softmax(ctx, node: fx.Node) -> None:
    """Softmax commutes with a permutation of any axis, so channels pass through.
    Over a head or stack axis it mixes channel c of every part (split
    attention's radix softmax): the parts become one basis."""
    lay = ctx.layout(node.args[0])
    if node.op == "call_module":
        dim = ctx.module(node).dim
    else:
        dim = ctx.arg(node, 1, "dim")
    nd = ctx.ndim(node.args[0])
    if isinstance(lay, Layout) and dim is not None and nd is not None and lay.cross_dim is not None:
        # over one channel axis of a channel x channel map: the units of that space are
        # normalised against each other, so only cross-model matches keep it (as for q . k)
        if dim % nd == lay.group_dim:
            ctx.fail(node, "takes a softmax over the head axis of a channel x channel map; fxzip follows "
                           "softmaxes over its channel or token axes.")
        if dim % nd in (lay.dim, lay.cross_dim):
            ctx.mark_bilinear(lay.segments if dim % nd == lay.dim else lay.cross)
        ctx.set(node, lay, passthrough=True)
        return
    if isinstance(lay, Layout) and dim is not None and nd is not None and lay.dim is not None \
            and dim % nd in (lay.group_dim, lay.stack_dim):
        lay = join_stack(ctx, node, as_stack(ctx, node, lay, dim % nd))
    ctx.set(node, lay, passthrough=True)


_POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.LPPool2d: 2,
}
_POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3, F.pad: 0,
}


_PAD_MODULES = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
                nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
                nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)


@register_rule(*_POOL_MODULES, *_POOL_FUNCTIONS, *_PAD_MODULES, width=FREE)
def pool(ctx, node: fx.Node) -> None:
    """Pooling/padding over trailing spatial axes; channels must not be pooled."""
    x = node.args[0]
    lay = ctx.layout(x)
    if lay.has_channels:
        nd = ctx.ndim(x)
        if node.op == "call_module" and isinstance(ctx.module(node), _PAD_MODULES):
            _pad(ctx, node, lay, list(ctx.module(node).padding), nd)
            return
        if node.op == "call_module":
            k = next(v for c, v in _POOL_MODULES.items() if isinstance(ctx.module(node), c))
        elif node.target is F.pad:
            _pad(ctx, node, lay, list(ctx.arg(node, 1, "pad")), nd)
            return
        else:
            k = _POOL_FUNCTIONS[node.target]
        if lay.dim >= nd - k:
            ctx.fail(node, f"pools over axis {lay.dim}, which holds channels.")
    ctx.set(node, lay, passthrough=True)


@register_rule(F.grid_sample, torch.grid_sampler, width=FREE)
def grid_sample(ctx, node: fx.Node) -> None:
    """``F.grid_sample(x, grid)``: every channel of ``x`` (B, C, H, W) resampled
    at the same positions (RAFT's correlation lookup, spatial transformers), so
    the channels pass through on axis 1. The grid's last axis holds the (x, y)
    coordinates: when a layer computed them (RAFT's flow head), that space is
    read by position here, so it stays in place."""
    x, grid = node.args[0], ctx.arg(node, 1, "grid")
    lay = ctx.layout(x)
    grid_lay = ctx.layout(grid) if isinstance(grid, fx.Node) else None
    if isinstance(grid_lay, Layout) and (grid_lay.has_channels or grid_lay.grouped):
        if grid_lay.grouped or grid_lay.dim != ctx.ndim(grid) - 1:
            ctx.fail(node, f"samples at a grid ({grid.name}) whose channels are not on its last (coordinate) axis.")
        ctx.fix(grid_lay.segments, f"sampling coordinates: {grid.name} is the grid of {node.name}")
    if lay.has_channels and lay.dim != 1:
        ctx.fail(node, f"resamples the spatial axes of {x.name}, whose channels are on axis {lay.dim}, not 1.")
    ctx.set(node, lay, passthrough=True)


def _pad(ctx, node: fx.Node, lay: Layout, pad: list, nd: int) -> None:
    """Padding (last axis first, two values per axis) must leave the channel axis alone."""
    pairs = [pad[i:i + 2] for i in range(0, len(pad), 2)]
    padded = [nd - 1 - i for i, p in enumerate(pairs) if any(v != 0 for v in p)]
    if lay.dim in padded:
        ctx.fail(node, f"pads axis {lay.dim}, which holds channels.")
    ctx.set(node, lay, passthrough=True)



_REDUCTIONS = ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp")


@register_rule(*_REDUCTIONS, torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, width=FREE)
@group_aware
def reduce(ctx, node: fx.Node) -> None:
    """Reductions over non-channel axes keep channels (global pooling). A
    reduction over the channel axis leaves a channel-free tensor (e.g. the mean
    of a hand-written layer norm), which is then only broadcast back."""
    x = node.args[0]
    lay = ctx.layout(x)
    if lay.grouped:
        _reduce_grouped(ctx, node, lay)
        return
    if not lay.has_channels:
        ctx.set(node, NO_CHANNELS, passthrough=True)
        return
    nd = ctx.ndim(x)
    dims = ctx.arg(node, 1, "dim")
    keepdim = ctx.arg(node, 2, "keepdim", False)
    if dims is None:
        ctx.set(node, NO_CHANNELS)
        return
    dims = [d % nd for d in (dims if isinstance(dims, (tuple, list)) else (dims,))]
    if node.op == "call_method" and node.target in ("max", "min") and not isinstance(ctx.arg(node, 1, "dim"), int):
        ctx.fail(node, "max/min with a tensor argument is not a reduction fxzip follows.")
    if lay.dim in dims:
        ctx.set(node, NO_CHANNELS)
        return
    new_dim = lay.dim if keepdim else lay.dim - sum(d < lay.dim for d in dims)
    if node.target in ("max", "min") and node.op == "call_method":
        # (values, indices) over an axis without channels: both hold one entry per channel (the largest value
        # of channel c and where it is), so both keep the channels (VOLO's token-wise max of its aux head)
        ctx.set(node, (lay.moved(new_dim), lay.moved(new_dim)))
        return
    ctx.set(node, lay.moved(new_dim), passthrough=True)


def _reduce_grouped(ctx, node: fx.Node, lay: Layout) -> None:
    """Over heads (an attention map averaged over heads) the result no longer
    depends on the head order; over other axes the head axes just move."""
    nd = ctx.ndim(node.args[0])
    dims = ctx.arg(node, 1, "dim")
    keepdim = ctx.arg(node, 2, "keepdim", False)
    if dims is None or node.target in ("max", "min"):
        ctx.fail(node, f"reduces a tensor whose channels are split into groups ({describe(lay)}) in a way fxzip does not "
                       "follow.")
    dims = [d % nd for d in (dims if isinstance(dims, (tuple, list)) else (dims,))]
    stacked = lay.stack_dim if lay.stack_dim is not None else lay.group_dim
    if lay.dim is not None and lay.dim not in dims and stacked in dims and len(dims) == 1:
        # a sum over a radix / path axis: the parts are added, so they are one basis
        parts = join_stack(ctx, node, as_stack(ctx, node, lay, stacked))
        move = (lambda d: d) if keepdim else (lambda d: None if d is None else d - (stacked < d))  # noqa: E731
        group = parts.group_dim if parts.stack_dim is not None else None  # the parts' groups stay groups
        ctx.set(node, Layout(move(lay.dim), parts.segments[:1], group_dim=move(group)), passthrough=True)
        return
    if lay.group_dim in dims or lay.dim in dims:
        if lay.dim is not None and lay.dim not in dims:
            ctx.fail(node, "reduces over heads but keeps head channels; fxzip cannot follow that.")
        ctx.set(node, NO_CHANNELS)
        return
    move = (lambda d: d) if keepdim else (lambda d: d - sum(r < d for r in dims))
    ctx.set(node, Layout(None if lay.dim is None else move(lay.dim), lay.segments, group_dim=move(lay.group_dim)),
            passthrough=True)


_BINARY = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    operator.isub, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
    torch.minimum, "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum",
    operator.pow, operator.ipow, torch.pow, "pow", "pow_",
)


@register_rule(*_BINARY, width=FREE)
@group_aware
@map_aware
def binary(ctx, node: fx.Node) -> None:
    """Broadcasting arithmetic. Two channel tensors must share one basis (residual
    add, gating multiply); a parameter broadcast along the channel axis follows
    that space (layer scale, position embedding); any other full-size tensor
    without channels (the raw input, or something fxzip cannot follow) pins the
    space to the identity alignment."""
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else ctx.arg(node, 1, "other")
    broadcast(ctx, node, [a, b])


@register_rule(torch.addcmul, "addcmul", torch.addcdiv, "addcdiv", width=FREE)
@group_aware
def addcmul(ctx, node: fx.Node) -> None:
    """``input + value * t1 * t2`` (or ``/ t2``): broadcasting over three operands
    (ConvNeXt-V2's GlobalResponseNorm)."""
    operands = [ctx.arg(node, i, n) for i, n in enumerate(("input", "tensor1", "tensor2"))]
    broadcast(ctx, node, operands)


@register_rule(torch.where, "where", width=FREE)
@group_aware
def where(ctx, node: fx.Node) -> None:
    """``torch.where(condition, x, y)``: each element comes from ``x`` or ``y``,
    so ``x`` and ``y`` broadcast as in arithmetic (T5's position bias, one
    channel per head, selected against a mask); a condition with channels would
    pick per unit, which no permutation of one side follows."""
    condition = ctx.arg(node, 0, "condition")
    if isinstance(condition, fx.Node) and ctx.layout(condition).has_channels:
        ctx.fail(node, f"selects with a condition that has channels ({describe(ctx.layout(condition))}); fxzip "
                       "follows torch.where with a channel-free condition (a mask).")
    broadcast(ctx, node, [ctx.arg(node, 1, "input"), ctx.arg(node, 2, "other")])


def broadcast(ctx, node: fx.Node, operands: list) -> None:
    """The shared logic of elementwise ops over any number of broadcast operands."""
    out_nd = ctx.ndim(node)
    if out_nd is None:
        ctx.set(node, NO_CHANNELS)
        return
    ops = [(x, ctx.layout(x)) for x in operands if isinstance(x, fx.Node) and ctx.shape(x) is not None]
    if any(l.grouped for _, l in ops):
        _binary_grouped(ctx, node, ops, out_nd)
        return
    chan = [(x, l, l.dim + out_nd - ctx.ndim(x)) for x, l in ops if l.has_channels]
    out_shape = ctx.shape(node)
    if len(chan) > 1 and out_shape is not None:
        # a one-channel tensor (a spatial gate, a focal modulator) broadcasts over
        # the channels of the others: the same value for every channel
        wide = [(x, l, d) for x, l, d in chan if l.length > 1 or out_shape[d] == 1]
        chan = wide or chan[:1]
    if not chan:
        # a parameter with constants (``1 - sigmoid(gate)``) stays laid out like the parameter
        views = [l for _, l in ops if l.param is not None]
        if len(views) == 1 and len(ops) == 1 and tuple(ctx.shape(ops[0][0])) == tuple(out_shape or ()):
            ctx.set(node, views[0], passthrough=True)
            return
        ctx.set(node, NO_CHANNELS, passthrough=True)
        return
    x0, l0, d0 = chan[0]
    for x1, l1, d1 in chan[1:]:
        if d0 != d1:
            ctx.fail(node, f"combines {x0.name} (channels on axis {d0}) with {x1.name} (channels on axis {d1}).")
        ctx.unify(node, l0.segments, l1.segments)
    for x, l in ops:
        if l.has_channels:
            continue
        shape = ctx.shape(x)
        d = d0 - (out_nd - len(shape))
        if d < 0 or shape[d] == 1:
            continue  # broadcast along channels: the same value for every channel
        if l.param is not None and l.param.axes[d] is not None:
            ctx.role(node, l.param.name, l.param.axes[d], l0.segments, "M")
        else:
            source = "model input" if any(n.op == "placeholder" for n in _ancestors(x)) else "untracked tensor"
            ctx.fix(l0.segments, f"{source}: meets channel-free {x.name} at {node.name}")
    ctx.set(node, l0.moved(d0), passthrough=True)


def _binary_grouped(ctx, node: fx.Node, ops: list, out_nd: int) -> None:
    """Arithmetic on head layouts (``q * scale``, ``attn + mask``): two head
    tensors must have the same axes and join their spaces; a channel-free
    tensor must broadcast over every head axis, or the heads are pinned."""
    grouped = [(x, l.shifted(out_nd - ctx.ndim(x))) for x, l in ops if l.grouped]
    stacks = {l.stack_dim for _, l in grouped if l.group_dim is None and l.stack_dim is not None}
    if stacks:  # a head axis on the same axis as another operand's stack is that stack
        grouped = [(x, as_stack(ctx, node, l) if l.group_dim in stacks and l.stack_dim is None else l)
                   for x, l in grouped]
        if len(grouped) == 1 or all(l.group_dim is None for _, l in grouped):
            _binary_stack(ctx, node, ops, grouped, out_nd)
            return
    grouped = _positions_rejoined(ctx, node, grouped)
    x0, l0 = grouped[0]
    axes = lambda l: (l.dim, l.group_dim, l.stack_dim, l.cross_dim)  # noqa: E731
    for x, l in grouped[1:]:
        if axes(l) != axes(l0):
            ctx.fail(node, f"combines {x0.name} ({describe(l0)}) and {x.name} ({describe(l)}), whose "
                           "channel groups sit on different axes.")
        if l0.stack_dim is not None and len(l.segments) != len(l0.segments):
            ctx.fail(node, f"combines {x0.name} and {x.name}, stacks of different length.")
        ctx.unify(node, l0.segments, l.segments)
        ctx.unify(node, l0.cross, l.cross)
        ctx.tie_groups(node, l0.segments, l.segments)
    for x, l in ops:
        if l.grouped:
            continue
        if per_head(ctx, node, l0, x, l, out_nd):
            continue  # a per-head tensor or parameter: follows the heads (fxzip.rules.heads)
        if not l.has_channels and position_in_head(ctx, node, l0, x, out_nd):
            continue  # the same for every head, per position inside it (rotary sin/cos)
        if l.has_channels and not ctx.pinned(l.segments):
            ctx.fail(node, f"combines {x0.name}, whose channels are split into groups ({describe(l0)}), with "
                           f"{x.name}, whose channels sit on one axis that is not the group axis.")
        # channels another op already pinned (the same in every model) are positions here, like an
        # untracked tensor's (RAFT's flow field against the convex-upsampling weights)
        shape = ctx.shape(x)
        lead = out_nd - len(shape)
        for d in (v for v in axes(l0) if v is not None):
            if d - lead < 0 or shape[d - lead] == 1:
                continue
            if l.param is not None:
                ctx.fail(node, f"combines the parameter {l.param.name} with {x0.name} ({describe(l0)}) along "
                               "a channel or stacked axis within the heads; fxzip binds parameters per head (one entry per head), "
                               "not per head channel.")
            ctx.fix(l0.segments + l0.cross, f"untracked tensor: {x.name} varies per head at {node.name}")
    ctx.set(node, l0, passthrough=True)


def _positions_rejoined(ctx, node: fx.Node, grouped: list) -> list:
    """``q * cos + rotate_half(q) * sin`` (Llama's rotary embedding): one operand
    keeps the heads and their channels, the other was rebuilt from parts of every
    head read by position (``x[..., :d/2]``, ``x[..., d/2:]``: tracked by its head
    axis only). Element ``[h, d]`` of both is head ``h``'s position ``d``, so the
    sum is the heads with their channels, positions inside a head fixed (the
    rebuilt operand already fixed them; fixed again here, where it matters) and
    whole heads still free to move."""
    full = [(x, l) for x, l in grouped if l.dim is not None and l.group_dim is not None]
    if not full:
        return grouped
    x0, l0 = full[0]
    out = []
    for x, l in grouped:
        rebuilt = (l.dim is None and l.group_dim == l0.group_dim and l.stack_dim == l0.stack_dim
                   and l.cross_dim is None and l0.cross_dim is None and ctx.shape(x) == ctx.shape(x0))
        if rebuilt:
            ctx.mark_rigid(l0.segments, f"{x.name} is rebuilt from {x0.name}'s head channels by position at "
                                        f"{node.name}")
            l = replace(l0, segments=l.segments)  # noqa: E741 - the same element-to-unit map as l0
        out.append((x, l))
    return out


def _binary_stack(ctx, node: fx.Node, ops: list, stacks: list, out_nd: int) -> None:
    """Stacks of parts (split attention's per-path weights) times the stacked
    branches: part p of every operand is one basis; a plain tensor with its
    channels on the stack's channel axis is every part at once."""
    x0, l0 = stacks[0]
    for x, l in stacks[1:]:
        if (l.dim, l.stack_dim) != (l0.dim, l0.stack_dim) or len(l.segments) != len(l0.segments):
            ctx.fail(node, f"combines stacks {describe(l0)} ({x0.name}) and {describe(l)} ({x.name}) that do not "
                           "line up.")
        for a, b in zip(l0.segments, l.segments):
            ctx.unify(node, (a,), (b,))
    for x, l in ops:
        if l.grouped:
            continue
        shape = ctx.shape(x)
        lead = out_nd - len(shape)
        if l.has_channels:
            if l.dim + lead != l0.dim:
                ctx.fail(node, f"combines the stack {x0.name} with {x.name}, whose channels sit on another axis.")
            for part in l0.segments:
                ctx.unify(node, (part,), l.segments)
            continue
        for d in (l0.dim, l0.stack_dim):
            if d - lead >= 0 and shape[d - lead] != 1:
                ctx.fix(l0.segments, f"untracked tensor: {x.name} varies along the stack at {node.name}")
    ctx.set(node, l0, passthrough=True)


def _ancestors(node: fx.Node, limit: int = 64) -> list[fx.Node]:
    seen, stack, out = set(), [node], []
    while stack and len(out) < limit:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        out.append(n)
        stack.extend(n.all_input_nodes)
    return out
