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
* weights a layer computes for positions (``w @ v`` contracting ``w``'s
  channels with an axis of ``v`` that holds none: VOLO's window weights, a
  dense Synthesizer's token weights) are read by position: they stay in place,
  and so do the heads of ``v`` they weigh one by one.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..layout import NO_CHANNELS, Layout, describe
from .heads import per_head, shared_head_basis
from .registry import FREE, group_aware, map_aware, register_rule
from .shape import channel_range


def _batch_axis(axis: int | None, nd: int, out_nd: int) -> int | None:
    """Where a batch axis of a matmul operand lands in the broadcast output."""
    return None if axis is None else axis + out_nd - nd


@register_rule(operator.matmul, torch.matmul, "matmul", torch.bmm, "bmm", width=FREE)
@group_aware
@map_aware
def matmul(ctx, node: fx.Node) -> None:
    a, b = node.args[0], node.args[1]
    la, lb = ctx.layout(a), ctx.layout(b)
    na, nb, out_nd = ctx.ndim(a), ctx.ndim(b), ctx.ndim(node)
    if na is None or nb is None or out_nd is None or na < 2 or nb < 2:
        if la.has_channels or lb.has_channels or la.grouped or lb.grouped:
            ctx.fail(node, "a matrix-vector product on channels; fxzip follows only batched matrix products.")
        ctx.set(node, NO_CHANNELS)
        return
    ga, gb = _batch_axis(la.group_dim, na, out_nd), _batch_axis(lb.group_dim, nb, out_nd)
    if la.dim == na - 1 and lb.dim == nb - 1 and nb - 2 not in lb.tracked_axes and la.cross_dim is None \
            and lb.cross_dim is None and lb.stack_dim is None:
        _weights_over_positions(ctx, node, a, b, la, lb, gb, out_nd)
        return
    if la.stack_dim is not None or lb.stack_dim is not None:
        ctx.fail(node, "multiplies a stacked q/k/v tensor; unbind it first.")
    if lb.cross_dim == nb - 1 and lb.dim == nb - 2 and la.dim == na - 1 and la.cross_dim is None:
        _channels_times_map(ctx, node, a, la, lb, ga, gb, out_nd)
        return
    if la.cross_dim == na - 1 and lb.dim == nb - 2 and lb.cross_dim is None and lb.stack_dim is None:
        _map_times_channels(ctx, node, a, b, la, lb, ga, gb, out_nd)
        return
    if la.cross_dim is not None or lb.cross_dim is not None:
        ctx.fail(node, f"multiplies {a.name} ({describe(la)}) by {b.name} ({describe(lb)}); fxzip follows a channel "
                       "x channel map only into a product that contracts its column axis with another tensor's "
                       "channels (map @ v) or its row axis with channels on the last axis (q @ map).")
    # q @ k^T: the contraction runs over the channels of both
    if la.dim == na - 1 and lb.dim == nb - 2:
        if (ga is None) != (gb is None):
            # the heads of one side were folded into the batch and back (MViT's pooled keys): that side has
            # one within-head basis on a plain axis, so every head of the other side reads it alike
            basis = shared_head_basis(ctx, node, a, la)
            ctx.unify(node, basis, shared_head_basis(ctx, node, b, lb))
            ctx.mark_bilinear(basis)
            ctx.set(node, NO_CHANNELS)
            return
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
                ctx.tie_groups(node, la.segments, lb.segments, ctx.shape(node)[gb])
            else:
                _untracked_heads(ctx, node, a, lb, out_nd)
        ctx.set(node, Layout(out_nd - 1, lb.segments, group_dim=gb), passthrough=True)
        return
    # v @ attn^T with channels on v's rows (EfficientViT's (B, C, N) layout): the contraction
    # runs over tokens, channels pass as rows
    if la.has_channels and not la.grouped and la.dim == na - 2 and not lb.has_channels and not lb.grouped:
        ctx.set(node, Layout(out_nd - 2, la.segments), passthrough=True)
        return
    # attn @ v where attn's channels are its heads (a head-mixing Linear made it: talking heads)
    if lb.dim == nb - 1 and lb.group_dim is not None and la.has_channels and not la.grouped \
            and _batch_axis(la.dim, na, out_nd) == gb and la.dim < na - 2:
        if not per_head(ctx, node, Layout(None, lb.segments, group_dim=gb), a, la, out_nd):
            ctx.fail(node, f"weighs the heads of {b.name} by {a.name}, whose channels ({describe(la)}) are not "
                           "one per head.")
        ctx.set(node, Layout(out_nd - 1, lb.segments, group_dim=gb), passthrough=True)
        return
    if not (la.has_channels or lb.has_channels or la.grouped or lb.grouped):
        ctx.set(node, NO_CHANNELS)
        return
    # q @ table^T: channels read against a parameter (a relative position table shared by the heads)
    if la.dim == na - 1 and la.stack_dim is None and not lb.has_channels and not lb.grouped \
            and lb.param is not None and lb.param.axes[nb - 2] is not None:
        _against_table(ctx, node, a, la, lb, nb, ga, out_nd)
        return
    if la.dim == na - 2 and lb.dim == nb - 1:
        _channel_map(ctx, node, a, b, la, lb, ga, gb, out_nd)
        return
    ctx.fail(node, f"multiplies {a.name} ({describe(la)}) by {b.name} ({describe(lb)}); fxzip follows q @ k^T "
                   "and attn @ v. A product "
                   "that contracts channels with a computed matrix is a layer whose weight is not a parameter: "
                   "register a rule for it.")


def _weights_over_positions(ctx, node: fx.Node, a: fx.Node, b: fx.Node, la: Layout, lb: Layout, gb: int | None,
                            out_nd: int) -> None:
    """``w @ v`` where the channels of ``w`` (its last axis) are contracted with
    an axis of ``v`` that holds no channels: positions. VOLO's outlook
    attention computes the weights of every k x k window position with a
    Linear (``attn(x).reshape(B, N, heads, k*k, k*k)``) and multiplies the
    unfolded values' window positions by them; a dense Synthesizer weighs
    tokens so. Channel i of ``w`` weighs position i whichever model computed
    it, so those channels are read by position and stay in place (the same
    unit in every model), whatever axes they were split over; ``v``'s channels
    pass. Where ``w`` differs along ``v``'s head axis, head h of ``w`` weighs
    head h of ``v`` and ``w`` cannot move, so ``v``'s heads stay in place as
    well (its units still move inside every head)."""
    ctx.fix(la.segments, f"read by position: {a.name}'s channels weigh positions of {b.name} at {node.name}")
    if gb is not None:
        shape = ctx.shape(a)
        lead = out_nd - len(shape)
        if gb - lead >= 0 and shape[gb - lead] != 1:
            heads = ctx.shape(b)[lb.group_dim]
            ctx.fix(ctx.head_space(node, lb.segments, heads), f"the heads of {b.name} are weighed per head by "
                                                                 f"{a.name}, whose channels stay in place, at "
                                                                 f"{node.name}")
    ctx.set(node, Layout(out_nd - 1, lb.segments, group_dim=gb), passthrough=True)


def _channel_map(ctx, node: fx.Node, a: fx.Node, b: fx.Node, la: Layout, lb: Layout, ga: int | None,
                 gb: int | None, out_nd: int) -> None:
    """``k^T @ v`` contracted over tokens (XCiT's cross-covariance ``q k^T``,
    DaViT's channel attention): a channel x channel map, rows in ``a``'s space
    and columns in ``b``'s, per head. Heads of both sides are tied."""
    if ga != gb:
        ctx.fail(node, f"multiplies {a.name} and {b.name} over tokens with head axes {ga} and {gb}; fxzip follows "
                       "channel x channel maps per head of both.")
    if ga is not None:
        ctx.tie_groups(node, la.segments, lb.segments, ctx.shape(node)[ga])
    ctx.set(node, Layout(out_nd - 2, la.segments, group_dim=ga, cross_dim=out_nd - 1, cross=lb.segments))


def _channels_times_map(ctx, node: fx.Node, a: fx.Node, la: Layout, lb: Layout, ga: int | None, gb: int | None,
                        out_nd: int) -> None:
    """``q @ lam`` with ``lam`` a channel x channel map (a lambda layer's
    ``k^T v``): q's channels are contracted with the map's rows (one space,
    read bilinearly like q . k) and the map's columns pass. A map without a
    head axis serves every head of q alike: one within-head basis, and the
    output holds one copy of the columns' space per head (a stack)."""
    if gb is not None and ga != gb:
        ctx.fail(node, f"multiplies {a.name} (head axis {ga}) by a channel x channel map with head axis {gb}.")
    if ga is not None and gb is None:
        if len(lb.cross) != 1:
            ctx.fail(node, f"reads a channel x channel map whose columns are {len(lb.cross)} concatenated spaces "
                           f"with every head of {a.name}; fxzip follows one space there.")
        ctx.unify(node, shared_head_basis(ctx, node, a, la), lb.segments)
        ctx.mark_bilinear(la.segments)
        heads = ctx.shape(a)[la.group_dim]
        ctx.set(node, Layout(out_nd - 1, lb.cross * heads, stack_dim=ga), passthrough=True)
        return
    ctx.unify(node, la.segments, lb.segments)
    ctx.mark_bilinear(la.segments)
    if ga is not None:
        ctx.tie_groups(node, la.segments, lb.cross, ctx.shape(node)[ga])
    ctx.set(node, Layout(out_nd - 1, lb.cross, group_dim=ga), passthrough=True)


def _map_times_channels(ctx, node: fx.Node, a: fx.Node, b: fx.Node, la: Layout, lb: Layout, ga: int | None,
                        gb: int | None, out_nd: int) -> None:
    """A channel x channel map times a tensor with channels on its rows
    (``softmax(q k^T) @ v`` of channel attention): the map's columns and
    ``b``'s channels are contracted, so they are one space, and it is read
    like q . k (bilinear); the rows' space passes, with the tokens of ``b``."""
    if ga != gb:
        ctx.fail(node, f"multiplies the channel map {a.name} (head axis {ga}) by {b.name} (head axis {gb}).")
    ctx.unify(node, la.cross, lb.segments)
    ctx.mark_bilinear(la.cross)
    if ga is not None:
        ctx.tie_groups(node, la.segments, lb.segments, ctx.shape(node)[ga])
    ctx.set(node, Layout(out_nd - 2, la.segments, group_dim=ga), passthrough=True)


def _against_table(ctx, node: fx.Node, a: fx.Node, la: Layout, lb: Layout, nb: int, ga: int | None,
                   out_nd: int) -> None:
    """``q @ table^T`` with ``table`` a parameter (BoTNet/HaloNet's relative
    position keys, one row per relative offset): the table's channel axis is
    read like k's, so it follows q's space (``M``) and the space is bilinear.
    A table without a head axis is read by every head alike: one within-head
    basis (``shared_head_basis``). The result holds logits, no channels."""
    lead = out_nd - nb
    if ga is not None and ga - lead >= 0 and lb.param.axes[ga - lead] is not None \
            and ctx.shape(node.args[1])[ga - lead] != 1:
        ctx.fail(node, f"reads {a.name}'s heads against a table with one slice per head; fxzip follows "
                       "tables shared by all heads here.")
    basis = shared_head_basis(ctx, node, a, la)
    ctx.role(node, lb.param.name, lb.param.axes[nb - 2], basis, "M")
    ctx.mark_bilinear(la.segments)
    ctx.set(node, Layout(None, la.segments, group_dim=ga) if ga is not None else NO_CHANNELS)


def _untracked_heads(ctx, node: fx.Node, a: fx.Node, values: Layout, out_nd: int) -> None:
    """An attention map fxzip did not build (a mask, an external score) weighing
    per-head values: heads cannot move unless it is shared by all heads."""
    shape = ctx.shape(a)
    g = values.group_dim
    lead = out_nd - len(shape)
    if g is not None and g - lead >= 0 and shape[g - lead] != 1:
        ctx.fix(values.segments, f"untracked tensor: {a.name} weighs each head at {node.name}")


@register_rule(F.scaled_dot_product_attention, width=FREE)
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
            ctx.fail(node, f"its {name} has {describe(lay)}; fxzip needs q, k and v with channels on the last axis "
                           "(timm and torch attention layouts).")
    if ctx.arg(node, 7, "enable_gqa", False):
        ctx.fail(node, "grouped-query attention (enable_gqa=True) shares each k/v head between several q heads; "
                       "fxzip follows one k/v head per q head, or one k/v head shared by all (multi-query).")
    heads = {_batch_axis(l.group_dim, n, out_nd) for l, n in ((lq, nq), (lk, nk), (lv, nv))}
    if len(heads) != 1:
        out = _multi_query(ctx, node, (q, lq, nq), (k, lk, nk), (v, lv, nv), out_nd)
        ctx.set(node, out, passthrough=True)
        return
    ctx.unify(node, lq.segments, lk.segments)
    ctx.mark_bilinear(lq.segments)
    group_dim = heads.pop()
    if group_dim is not None:
        # with the head count, a head of q cut out on its own (qk_norm, q/k/v inside heads) cuts v there too
        ctx.tie_groups(node, lq.segments, lv.segments, ctx.shape(node)[group_dim])
    mask = ctx.arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node) and ctx.shape(mask) is not None:
        lm = ctx.layout(mask)
        logits = Layout(None, lq.segments, group_dim=group_dim)
        shape = ctx.shape(mask)
        lead = out_nd - len(shape)
        if group_dim is not None and not lm.grouped and per_head(ctx, node, logits, mask, lm, out_nd):
            pass  # a per-head bias (relative position table or MLP): follows the heads
        elif lm.has_channels or lm.grouped:
            ctx.fail(node, f"its attention mask {mask.name} carries channels ({describe(lm)}) that are not one "
                           "per head; "
                           "fxzip follows masks and biases that are shared by all heads or vary per head only.")
        elif group_dim is not None and group_dim - lead >= 0 and shape[group_dim - lead] != 1:
            why = f"untracked tensor: mask {mask.name} varies per head at {node.name}"
            ctx.fix(lq.segments, why)
            ctx.fix(lv.segments, why)
    ctx.set(node, Layout(out_nd - 1, lv.segments, group_dim=group_dim), passthrough=True)


def _multi_query(ctx, node: fx.Node, q, k, v, out_nd: int) -> Layout:
    """Multi-query attention: q has heads, one k/v head is broadcast to all of
    them (a size-1 head axis). Every q head is read against the same k units,
    so each q head is unified with k (one within-head assignment, shared by all
    heads and by k); heads cannot move (they share k), so q's group structure
    reduces to that shared basis. The output is one copy of v per head: a
    stack of v's space along the head axis, which the ``proj`` reading the
    merged-back heads consumes block by block."""
    (qn, lq, nq), (kn, lk, nk), (vn, lv, nv) = q, k, v
    g = _batch_axis(lq.group_dim, nq, out_nd)
    for name, x, lay, nd in (("key", kn, lk, nk), ("value", vn, lv, nv)):
        shape = ctx.shape(x)
        lead = out_nd - nd
        if g is None or lay.group_dim is not None or (g - lead >= 0 and shape[g - lead] != 1):
            ctx.fail(node, f"q, k and v split into heads on different axes (or only some of them): its {name} "
                           f"has {describe(lay)}; fxzip follows one k/v head per q head or one shared by all q heads.")
    if len(lv.segments) != 1:
        ctx.fail(node, "multi-query attention whose values are a concatenation of spaces; not supported.")
    heads = ctx.shape(qn)[lq.group_dim]
    width = sum(s.length for s in lq.segments) // heads
    for h in range(heads):
        ctx.unify(node, channel_range(ctx, node, lq.segments, h * width, (h + 1) * width), lk.segments)
    ctx.mark_bilinear(lq.segments)
    return Layout(out_nd - 1, lv.segments * heads, stack_dim=g)
