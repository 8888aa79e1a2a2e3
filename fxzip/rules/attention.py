"""Rules for attention: ``q @ k^T``, ``attn @ v`` and
``F.scaled_dot_product_attention``.

What they record, and why:

* q and k are one space (``unify``): the logits ``q . k`` are preserved only if
  both are merged with the same matching. The space is *bilinear*: no weight
  layer absorbs its U, so the matching there is restricted to cross-model
  matches (see ``fxzip.grouped``).
* the heads of q/k and the heads of v are *tied*: head h's attention pattern
  weighs head h's values, so one head assignment serves both spaces.
* an attention map keeps only the head axis (``Layout.group_dim``).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..layout import NO_CHANNELS, Layout
from . import group_aware, register_rule
from .elementwise import binary


def _batch_axis(axis: int | None, nd: int, out_nd: int) -> int | None:
    """Where a batch axis of a matmul operand lands in the broadcast output."""
    return None if axis is None else axis + out_nd - nd


@register_rule(operator.matmul, torch.matmul, "matmul", torch.bmm, "bmm")
@group_aware
def matmul(ctx, node: fx.Node) -> None:
    a, b = node.args[0], node.args[1]
    la, lb = ctx.layout(a), ctx.layout(b)
    na, nb, out_nd = ctx.ndim(a), ctx.ndim(b), ctx.ndim(node)
    if na is None or nb is None or out_nd is None or na < 2 or nb < 2:
        if la.has_channels or lb.has_channels or la.grouped or lb.grouped:
            ctx.fail(node, "a matrix-vector product on channels; fxzip follows only batched matrix products.")
        ctx.set(node, NO_CHANNELS)
        return
    if la.stack_dim is not None or lb.stack_dim is not None:
        ctx.fail(node, "multiplies a stacked q/k/v tensor; unbind it first.")
    ga, gb = _batch_axis(la.group_dim, na, out_nd), _batch_axis(lb.group_dim, nb, out_nd)
    # q @ k^T: the contraction runs over the channels of both
    if la.dim == na - 1 and lb.dim == nb - 2:
        if ga != gb:
            ctx.fail(node, f"contracts channels of {a.name} and {b.name} whose head axes differ ({ga} vs {gb}).")
        ctx.unify(node, la.segments, lb.segments)
        ctx.mark_bilinear(la.segments)
        ctx.set(node, Layout(None, la.segments, group_dim=ga) if ga is not None else NO_CHANNELS)
        return
    # attn @ v: channels (and heads) of v pass, the contraction runs over tokens
    if lb.dim == nb - 1 and not la.has_channels:
        if la.group_dim is not None or lb.group_dim is not None:
            if ga != gb:
                ctx.fail(node, f"multiplies attention with head axis {ga} by values with head axis {gb}.")
            if la.group_dim is not None:
                ctx.tie_groups(node, la.segments, lb.segments)
            else:
                _untracked_heads(ctx, node, a, lb, out_nd)
        ctx.set(node, Layout(out_nd - 1, lb.segments, group_dim=gb), passthrough=True)
        return
    if not (la.has_channels or lb.has_channels or la.grouped or lb.grouped):
        ctx.set(node, NO_CHANNELS)
        return
    ctx.fail(node, f"multiplies {a.name} ({la}) by {b.name} ({lb}); fxzip follows q @ k^T and attn @ v. A product "
                   "that contracts channels with a computed matrix is a layer whose weight is not a parameter: "
                   "register a rule for it.")


def _untracked_heads(ctx, node: fx.Node, a: fx.Node, values: Layout, out_nd: int) -> None:
    """An attention map fxzip did not build (a mask, an external score) weighing
    per-head values: heads cannot move unless it is shared by all heads."""
    shape = ctx.shape(a)
    g = values.group_dim
    lead = out_nd - len(shape)
    if g is not None and g - lead >= 0 and shape[g - lead] != 1:
        ctx.fix(values.segments, f"untracked tensor: {a.name} weighs each head at {node.name}")


@register_rule(F.scaled_dot_product_attention)
@group_aware
def scaled_dot_product_attention(ctx, node: fx.Node) -> None:
    q, k, v = (ctx.arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    lq, lk, lv = ctx.layout(q), ctx.layout(k), ctx.layout(v)
    nq, nk, nv = ctx.ndim(q), ctx.ndim(k), ctx.ndim(v)
    out_nd = ctx.ndim(node)
    if not (lq.has_channels or lk.has_channels or lv.has_channels):
        ctx.set(node, NO_CHANNELS)
        return
    for name, lay, nd in (("query", lq, nq), ("key", lk, nk), ("value", lv, nv)):
        if not lay.has_channels or lay.dim != nd - 1 or lay.stack_dim is not None:
            ctx.fail(node, f"its {name} has {lay}; fxzip needs q, k and v with channels on the last axis "
                           "(timm and torch attention layouts).")
    heads = {_batch_axis(l.group_dim, n, out_nd) for l, n in ((lq, nq), (lk, nk), (lv, nv))}
    if len(heads) != 1:
        ctx.fail(node, "q, k and v split into heads on different axes (or only some of them).")
    if ctx.arg(node, 7, "enable_gqa", False):
        ctx.fail(node, "grouped-query attention (enable_gqa=True) shares k/v heads between q heads; not supported.")
    ctx.unify(node, lq.segments, lk.segments)
    ctx.mark_bilinear(lq.segments)
    group_dim = heads.pop()
    if group_dim is not None:
        ctx.tie_groups(node, lq.segments, lv.segments)
    mask = ctx.arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node) and ctx.shape(mask) is not None:
        lm = ctx.layout(mask)
        if lm.has_channels or lm.grouped:
            ctx.fail(node, f"its attention mask {mask.name} carries channels.")
        shape = ctx.shape(mask)
        lead = out_nd - len(shape)
        if group_dim is not None and group_dim - lead >= 0 and shape[group_dim - lead] != 1:
            why = f"untracked tensor: mask {mask.name} varies per head at {node.name}"
            ctx.fix(lq.segments, why)
            ctx.fix(lv.segments, why)
    ctx.set(node, Layout(out_nd - 1, lv.segments, group_dim=group_dim), passthrough=True)


def _register_timm_helpers() -> None:
    """timm wraps the mask resolution of its explicit attention path as an fx
    leaf; it builds a mask from the (channel-free) ``attn_mask`` argument and
    only reads ``attn`` for its dtype/device, so its result has no channels."""
    try:
        from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
    except ImportError:  # older/newer timm without them: nothing to register
        return

    @register_rule(resolve_self_attn_mask)
    @group_aware
    def attention_mask(ctx, node: fx.Node) -> None:
        ctx.set(node, NO_CHANNELS)

    @register_rule(maybe_add_mask)
    @group_aware
    def add_mask(ctx, node: fx.Node) -> None:
        """``scores + mask`` when a mask is given, else ``scores``."""
        scores, mask = node.args[0], ctx.arg(node, 1, "attn_mask")
        if isinstance(mask, fx.Node) and ctx.shape(mask) is not None:
            binary(ctx, node)
        else:
            ctx.set(node, ctx.layout(scores), passthrough=True)


_register_timm_helpers()
