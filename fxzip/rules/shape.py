"""Rules for ops that move, join or split axes: the channel axis is followed
through them, or the analysis stops with the reason."""
from __future__ import annotations

import builtins
import math
import operator
from dataclasses import replace
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..layout import NO_CHANNELS, Layout, ParamView, Segment, describe
from ..trace import check_batch_size
from .heads import link_heads, shared_head_basis
from .registry import FREE, SIZES, PerNode, group_aware, map_aware, register_rule, register_width
from .segments import channel_range

_AXIS_WORDS = {"dim": "channel axis", "group_dim": "group axis (heads)", "stack_dim": "stacked axis (q/k/v)"}

_HEADS = ("fxzip follows a reshape of the channel axis when it keeps channels whole: flattening C x H x W "
          "into features, or splitting C into (groups, channels per group) as attention heads and channel "
          "shuffles do (also with the window positions of an F.unfold after each channel: (heads, head_dim, "
          "k * k)); for another reshape, register a rule (fxzip.register_rule, README 'Extending').")


@register_rule(builtins.getattr, "size", "dim", "numel", check_batch_size, width=FREE)
@group_aware
def no_tensor(ctx, node: fx.Node) -> None:
    """Shape queries return Python values, not features (and the batch-size
    guard of a graph captured for one batch size returns nothing)."""
    ctx.set(node, NO_CHANNELS, passthrough=True)


@register_rule("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor")
@group_aware
@map_aware
def fresh_tensor(ctx, node: fx.Node) -> None:
    """``x.new_zeros(size)`` and its kin take only ``x``'s dtype and device: the
    result is a new tensor of the given size (a mask built in the forward, as
    torchvision's shifted windows do), not features of ``x``. No width rule:
    the size may name a channel count, so a space that reaches one keeps one
    model's width."""
    ctx.set(node, NO_CHANNELS, passthrough=True)


def _groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of source and destination axes with equal products (size-1 axes
    attach to the run before them)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        gi, gj = [], []
        pi = pj = 1
        if i < len(src):
            gi.append(i); pi = src[i]; i += 1
        if j < len(dst):
            gj.append(j); pj = dst[j]; j += 1
        while pi != pj:
            if pi < pj and i < len(src):
                gi.append(i); pi *= src[i]; i += 1
            elif j < len(dst):
                gj.append(j); pj *= dst[j]; j += 1
            else:
                break
        while i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            gi.append(i); i += 1
        while j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            gj.append(j); j += 1
        groups.append((gi, gj))
    return groups


def reshape_layout(src: Sequence[int], dst: Sequence[int], lay: Layout, node: fx.Node, ctx) -> Layout:
    if lay.param is not None and not lay.has_channels:
        return _reshape_param(src, dst, lay.param)
    if lay.grouped:
        return _reshape_grouped(src, dst, lay, node, ctx)
    if not lay.has_channels:
        return NO_CHANNELS
    for gi, gj in _groups(src, dst):
        if lay.dim not in gi:
            continue
        pre = math.prod(src[k] for k in gi if k < lay.dim)
        post = math.prod(src[k] for k in gi if k > lay.dim)
        big_out = [k for k in gj if dst[k] != 1]
        if len(big_out) <= 1:
            out_dim = big_out[0] if big_out else gj[0]
            segs = tuple(replace(s, inner=s.inner * post) for s in lay.segments) * pre
            if pre > 64:
                ctx.fail(node, f"interleaves channels with a non-channel axis of size {pre}; {_HEADS}")
            return Layout(out_dim, segs)
        if pre != 1:
            moved = _heads_into_batch(ctx, node, lay, pre, post, [dst[k] for k in big_out]) \
                or _blocks_out_of_batch(ctx, node, lay, pre, post, [dst[k] for k in big_out])
            if moved is not None:
                return Layout(big_out[1], moved)
            ctx.fail(node, f"reshapes {tuple(src)} -> {tuple(dst)} across the channel axis {lay.dim}; {_HEADS}")
        # one source axis split into several: channels must land on the first one,
        # whole channels at a time (an unflatten of C*H*W back to C, H, W)
        tail = math.prod(dst[k] for k in big_out[1:])
        if all((s.inner * post) % tail == 0 for s in lay.segments):
            return Layout(big_out[0], tuple(replace(s, inner=s.inner * post // tail) for s in lay.segments))
        copies = _copies_apart(lay.segments, [dst[k] for k in big_out]) if post == 1 else None
        if copies is not None:
            return Layout(big_out[1], copies)
        moved_one = sum(d == 1 for d in dst) <= sum(d == 1 for d in src)  # no size-1 axis is new
        split = _split_channels(ctx, node, lay, post, big_out, gj, dst, moved_one)
        if split is not None:
            return split
        ctx.fail(node, f"reshapes the channel axis {lay.dim} of {tuple(src)} into {tuple(dst[k] for k in gj)}; {_HEADS}")
    ctx.fail(node, f"cannot follow the channel axis through reshape {tuple(src)} -> {tuple(dst)}")


def _split_channels(ctx, node: fx.Node, lay: Layout, post: int, big_out: list[int], gj: list[int],
                    dst: Sequence[int], moved_one: bool = False) -> Layout | None:
    """One channel axis split into several: into groups of elements, heads
    ``(H, D)`` or a fused projection's ``(parts, H, D)``. Channels whose units
    span ``inner`` elements each (an ``F.unfold``: channel c, kernel position
    p at element ``c * k * k + p``) may also shed trailing axes that take only
    positions inside every unit: ``(C * k * k) -> (H, D, k * k)`` is heads of
    the C channels with the kernel positions on an axis of their own,
    channel-free, as VOLO's outlook attention and other unfold-then-attend
    blocks split it. None when the split is none of these.

    ``moved_one``: the reshape adds no size-1 axis (a single token moved,
    ``(B, 1, C) -> (B, H, 1, D)``: the class query of class attention), so
    a size-1 axis among the new ones is not a head axis of size 1."""
    if post == 1 and len(big_out) == 2 and any(s.inner != 1 for s in lay.segments):
        return _split_elements(ctx, node, lay, [dst[k] for k in big_out], big_out)
    if post == 1 and all(s.inner == 1 for s in lay.segments) and 2 <= len(big_out) <= 3:
        if len(big_out) == 2 and len(gj) == 3 and dst[gj[1]] == 1 and not moved_one:
            big_out = list(gj)  # (parts, 1 head, head_dim): a fused k/v of a one-head attention
        return _split_heads(ctx, node, lay, [dst[k] for k in big_out], big_out)
    for j in range(2, len(big_out)):
        tail = math.prod(dst[k] for k in big_out[j:])
        if tail > 1 and all((s.inner * post) % tail == 0 for s in lay.segments):
            # the axes from big_out[j] on hold positions inside every unit: they carry no channels
            shed = Layout(lay.dim, tuple(replace(s, inner=s.inner * post // tail) for s in lay.segments))
            return _split_channels(ctx, node, shed, 1, big_out[:j], big_out[:j], dst)
    return None


def _heads_into_batch(ctx, node: fx.Node, lay: Layout, pre: int, post: int,
                      out: list[int]) -> tuple[Segment, ...] | None:
    """``(B, H * D, ...) -> (B * H, D, ...)``: the heads become entries of the
    batch axis (BoTNet, HaloNet, MViT's pooling, attention written before
    ``scaled_dot_product_attention`` took a head axis). Everything applied to
    the folded tensor is applied to every head alike (a shared relative
    position table, a depthwise pooling conv over head_dim), so all heads must
    use one within-head basis: head ``h``'s channels are linked to head 0's,
    unit by unit (whole heads therefore stay in place; units move, the same way
    in every head). The result's channel axis holds that basis of ``D`` units.
    None when the reshape is not such a fold."""
    if post != 1 or len(out) != 2 or any(s.inner != 1 for s in lay.segments):
        return None
    outer, width = out
    if outer % pre or width <= 0 or lay.length % width or (outer // pre) * width != lay.length:
        return None
    heads = outer // pre
    return link_heads(ctx, node, lay.segments, heads) if heads >= 2 else None


def _blocks_out_of_batch(ctx, node: fx.Node, lay: Layout, pre: int, post: int,
                         out: list[int]) -> tuple[Segment, ...] | None:
    """``(B * H, D, ...) -> (B, H * D, ...)``: the inner factor ``H`` of the axes
    before the channels joins the channel axis as ``H`` consecutive blocks, each
    a copy of the channel basis (the merge back of heads folded into the batch;
    every block is read in the same basis, whatever the factor stood for)."""
    if post != 1 or len(out) != 2:
        return None
    outer, joined = out
    if pre % outer or joined != (pre // outer) * lay.length:
        return None
    blocks = pre // outer
    if blocks > 64:
        ctx.fail(node, f"joins {blocks} entries of a leading axis into the channel axis; {_HEADS}")
    return lay.segments * blocks


def _copies_apart(segments: tuple[Segment, ...], out: list[int]) -> tuple[Segment, ...] | None:
    """A channel axis that is ``r`` copies of one block of channels (heads and
    batch entries folded into it by ``_blocks_out_of_batch`` or a flatten),
    split as ``(k, rest)`` with ``k`` dividing ``r``: every slice along the new
    leading axis is ``r / k`` copies of the block, in the same basis, so that
    axis carries no channels. None for any other split."""
    if len(out) != 2:
        return None
    n = len(segments)
    period = next((p for p in range(1, n // 2 + 1) if n % p == 0 and segments == segments[:p] * (n // p)), n)
    reps = n // period
    if reps < 2 or reps % out[0]:
        return None
    return segments[:period] * (reps // out[0])


def _split_elements(ctx, node: fx.Node, lay: Layout, sizes: list[int], axes: list[int]) -> Layout:
    """``C -> (G, C / G)`` of a channel axis whose units span several elements
    each (a channel shuffle of an earlier shuffle's output, or of a
    concatenation with one): groups of elements. Each group is cut out as its
    own range (``channel_range``), so no unit moves from one group to
    another; the groups themselves stay in place. The usual next step, the
    shuffle's merge back (``interleave``), ties what its groups hold."""
    groups, width = sizes
    segs: list[Segment] = []
    for g in range(groups):
        segs.extend(channel_range(ctx, node, lay.segments, g * width, (g + 1) * width))
    return Layout(axes[1], tuple(segs), group_dim=axes[0])


def interleave(ctx, node: fx.Node, segments: tuple[Segment, ...], groups: int) -> tuple[Segment, ...]:
    """A channel shuffle's merge back: element ``d * G + g`` of the result is
    element ``d`` of group ``g`` (``segments`` holds the G groups one after
    the other). Whatever moves element ``d`` of one group must move element
    ``d`` of every group the same way, so the groups are read in cells of
    elements: each cell holds whole units of every group, and a unit of the
    result is one cell of every group.

    Where every group has units of one size (a shuffle of one space, or of
    equal spaces side by side) the cell is a unit and the groups are linked
    unit by unit: one basis, each unit spread over ``G`` elements. Where they
    differ (a shuffle of ``[x1; b]``, x1 a half of an earlier shuffle's output
    whose units span 2 elements, b a new branch with 1 element per unit) a
    cell holds one unit of x1 and two of b: the result's units are a new
    space whose groups (one unit each) are tied to the cells of every part
    (b's pairs are rigid: unit 2k and 2k + 1 of b move together, in their
    order, with unit k of x1). The cells are found per run of elements where
    every group keeps one segment; a unit cut by another group's segment
    boundary stays in place (``channel_range``)."""
    total = sum(seg.length for seg in segments)
    if total % groups:
        ctx.fail(node, f"merges {groups} groups of channels back into {total} elements.")
    width = total // groups
    parts = [channel_range(ctx, node, segments, g * width, (g + 1) * width) for g in range(groups)]
    bounds = {0, width}
    while True:  # cut every group where any group's segments end, up to a fixed point
        parts = [_cut_at(ctx, node, p, bounds) for p in parts]
        edges = {e for p in parts for e in _edges(p)}
        if edges <= bounds:
            break
        bounds |= edges
    if len({len(p) for p in parts}) != 1:
        raise AssertionError("groups cut at the same offsets hold different numbers of segments")
    out: list[Segment] = []
    for pieces in zip(*parts):
        cell = math.lcm(*(seg.inner for seg in pieces))
        if all(seg.inner == cell for seg in pieces):  # units of one size: one basis, unit by unit
            for seg in pieces[1:]:
                ctx.unify(node, (pieces[0],), (seg,))
            out.append(replace(pieces[0], inner=cell * groups))
            continue
        length = pieces[0].length
        cells = length // cell
        (units,) = ctx.new_space(node, cells)
        ctx.set_groups(node, (units,), cells)
        for seg in pieces:
            ctx.set_groups(node, (seg,), cells)
            if cell // seg.inner > 1:
                ctx.mark_rigid((seg,), f"{node.name} interleaves {cell // seg.inner} units of it with one unit of "
                                       "another part (a channel shuffle of a concatenation)")
            ctx.tie_groups(node, (seg,), (units,), cells)
        out.append(replace(units, inner=cell * groups))
    return tuple(out)


def _edges(segments: Sequence[Segment]) -> set[int]:
    """Element offsets where the segments begin and end."""
    out, at = {0}, 0
    for seg in segments:
        at += seg.length
        out.add(at)
    return out


def _cut_at(ctx, node: fx.Node, segments: tuple[Segment, ...], bounds: set[int]) -> tuple[Segment, ...]:
    """``segments`` cut at every element offset in ``bounds``."""
    cuts = sorted(bounds)
    out: list[Segment] = []
    for lo, hi in zip(cuts, cuts[1:]):
        out.extend(channel_range(ctx, node, segments, lo, hi))
    return tuple(out)


def _split_heads(ctx, node: fx.Node, lay: Layout, sizes: list[int], axes: list[int]) -> Layout:
    """``C -> (H, D)``: heads of one space. ``3C -> (3, H, D)``: a fused projection
    becomes three spaces (q, k, v), each with H heads; a freshly produced space
    is split, a concatenation of equal spaces is used as it is."""
    if len(sizes) == 2:
        ctx.set_groups(node, lay.segments, sizes[0])
        return Layout(axes[1], lay.segments, group_dim=axes[0])
    parts, heads, _ = sizes
    segs = lay.segments
    if heads == 1:  # one head: a stack of plain spaces, nothing to group
        axes = [axes[0], axes[2]]
    if len(segs) == 1:
        pieces = ctx.split_space(node, segs[0], parts)
    else:  # a concatenation: each part must be one range of one space
        width = lay.length // parts
        ranges = [channel_range(ctx, node, segs, i * width, (i + 1) * width) for i in range(parts)]
        if any(len(r) != 1 for r in ranges):
            ctx.fail(node, f"splits channels made of {len(segs)} concatenated spaces into {parts} parts that "
                           "straddle them; each part must lie inside one space.")
        pieces = tuple(r[0] for r in ranges)
    if heads == 1:
        return Layout(axes[1], tuple(pieces), stack_dim=axes[0])
    for piece in pieces:
        ctx.set_groups(node, (piece,), heads)
    return Layout(axes[2], tuple(pieces), group_dim=axes[1], stack_dim=axes[0])


def as_stack(ctx, node: fx.Node, lay: Layout, axis: int | None = None) -> Layout:
    """A head layout whose head axis turns out to be a *stack* of parts that
    share one basis (a radix or path axis of split attention: softmax or sum
    over it, or a product with a plain tensor of the branches). Each group
    becomes its own range; ``join_stack`` then links them. A layout that
    already has a stacked axis is returned as it is when ``axis`` (the axis
    the op runs over) is that stacked axis, whatever its groups (a channel
    axis split as (parts, groups, channels): a softmax over the parts)."""
    if lay.stack_dim is not None and (lay.group_dim is None or axis == lay.stack_dim):
        return lay
    if lay.stack_dim is not None or lay.group_dim is None or lay.dim is None:
        ctx.fail(node, f"treats the group axis of a tensor ({describe(lay)}) as a stack of parts; fxzip "
                       "follows that only for tensors with one group axis and one channel axis.")
    groups = ctx.shape(node.args[0])[lay.group_dim] if isinstance(node.args[0], fx.Node) else None
    total = sum(s.size for s in lay.segments)
    groups = groups or 1
    width = total // groups
    parts = [channel_range(ctx, node, lay.segments, i * width, (i + 1) * width) for i in range(groups)]
    if any(len(p) != 1 for p in parts):
        ctx.fail(node, "stacks parts that straddle concatenated spaces.")
    return Layout(lay.dim, tuple(p[0] for p in parts), stack_dim=lay.group_dim)


def join_stack(ctx, node: fx.Node, lay: Layout) -> Layout:
    """Every part of a stack is one basis (an op mixes channel c of every part)."""
    for part in lay.segments[1:]:
        ctx.unify(node, lay.segments[:1], (part,))
    return lay


def _reshape_grouped(src: Sequence[int], dst: Sequence[int], lay: Layout, node: fx.Node, ctx) -> Layout:
    """Reshapes of head layouts: axes without channels may change freely; the
    head and head_dim axes merge back into one channel axis (``(B, N, H, D) ->
    (B, N, C)``; head_dim-major ``(B, N, D, H) -> (B, N, C)`` with one basis
    shared by the heads; ``(B, H, D, P, L) -> (B, C * P, L)`` with channel-free
    positions after head_dim, which become the elements of every channel, as
    ``F.fold`` reads them), and the head axis may fold into channel-free axes
    (the batch) with one basis shared by the heads."""
    tracked = {"dim": lay.dim, "group_dim": lay.group_dim, "stack_dim": lay.stack_dim, "cross_dim": lay.cross_dim}
    new: dict[str, int | None] = {k: None for k in tracked}
    merged_back = False
    positions = 1  # elements per channel after a merge back (positions that followed each channel)
    folded = repeated = None
    for gi, gj in _groups(src, dst):
        inside = {k: v for k, v in tracked.items() if v is not None and v in gi}
        if not inside:
            continue
        big_in = [k for k in gi if src[k] != 1]
        big_out = [k for k in gj if dst[k] != 1]
        if len(inside) == 1 and len(big_in) <= 1 and len(big_out) <= 1:
            (key, _), = inside.items()
            new[key] = big_out[0] if big_out else gj[0]
            continue
        if set(inside) == {"group_dim"} and _repeats_heads(node, lay, gi, src) and len(big_out) == 1:
            new["group_dim"] = big_out[0]
            repeated = _repeated_heads(ctx, node, lay, src[lay.group_dim], src[lay.group_dim + 1])
            continue
        if set(inside) == {"group_dim"} and lay.stack_dim is None and lay.dim is not None and len(big_out) == 1:
            # the head axis merged with channel-free axes (heads folded into the batch, MViT):
            # whatever is applied to the result is applied to every head alike
            folded = shared_head_basis(ctx, node, node.args[0], lay)
            continue
        if set(inside) == {"dim", "group_dim"} and big_in == [lay.group_dim, lay.dim] and len(big_out) == 1 \
                and lay.stack_dim is None:
            new["dim"] = big_out[0]
            merged_back = True
            continue
        if set(inside) == {"dim", "group_dim"} and big_in[:2] == [lay.group_dim, lay.dim] and len(big_out) == 1 \
                and lay.stack_dim is None and lay.cross_dim is None:
            # (heads, head_dim, positions) merged back: the positions after each channel become its elements
            # (the inverse of an unfold's channel axis split into heads; F.fold sums them back into pixels)
            new["dim"] = big_out[0]
            merged_back = True
            positions = math.prod(src[k] for k in big_in[2:])
            continue
        if set(inside) == {"dim", "stack_dim"} and big_in == [lay.stack_dim, lay.dim] and len(big_out) == 1 \
                and lay.group_dim is None:  # a stack flattened: its parts concatenate
            new["dim"] = big_out[0]
            merged_back = True
            continue
        if set(inside) == {"dim", "group_dim"} and big_in == [lay.dim, lay.group_dim] and len(big_out) == 1 \
                and lay.stack_dim is None and lay.cross_dim is None:
            # merged back head_dim-major (a channel shuffle; NesT's heads): element d * H + h is element d
            # of head h; heads with units of one size share one within-head basis (unit d repeated H times,
            # inner = H), heads of different units are read in cells (``interleave``)
            folded = interleave(ctx, node, lay.segments, src[lay.group_dim])
            new["dim"] = big_out[0]
            continue
        if lay.cross_dim is not None:
            ctx.fail(node, f"reshapes {tuple(src)} -> {tuple(dst)} mixing the two channel axes ({lay.dim} and "
                           f"{lay.cross_dim}) of a channel x channel map with other axes; fxzip follows such a map "
                           "until a matrix product contracts one of its channel axes.")
        ctx.fail(node, f"reshapes {tuple(src)} -> {tuple(dst)} mixing the channel groups of a tensor ({describe(lay)}) "
                       "with other axes; fxzip follows channel groups (attention heads, a channel shuffle) only "
                       "until (groups, channels per group) are merged back into one channel axis.")
    if (folded is not None or merged_back) and lay.cross_dim is not None:
        ctx.fail(node, f"reshapes a channel x channel map ({describe(lay)}) across its group axes.")
    if folded is not None:
        return Layout(new["dim"], folded)
    if repeated is not None:
        return Layout(new["dim"], repeated, group_dim=new["group_dim"])
    if merged_back:
        return Layout(new["dim"], tuple(replace(s, inner=s.inner * positions) for s in lay.segments))
    return Layout(new["dim"], lay.segments, group_dim=new["group_dim"], stack_dim=new["stack_dim"],
                  cross_dim=new["cross_dim"], cross=lay.cross)


def _repeats_heads(node: fx.Node, lay: Layout, axes: Sequence[int], src: Sequence[int]) -> bool:
    """Whether the reshape merges the head axis with the axis right after it,
    along which its input is broadcast (stride 0: ``k[:, :, None].expand(B, H,
    r, N, D)``), i.e. every head repeated ``r`` times: grouped-query attention's
    ``repeat_kv``."""
    big = [a for a in axes if src[a] != 1]
    if lay.dim is None or lay.stack_dim is not None or lay.cross_dim is not None \
            or big != [lay.group_dim, lay.group_dim + 1]:
        return False
    meta = node.args[0].meta.get("tensor_meta")
    stride = getattr(meta, "stride", None)
    return stride is not None and stride[lay.group_dim + 1] == 0


def _repeated_heads(ctx, node: fx.Node, lay: Layout, heads: int, repeats: int) -> tuple[Segment, ...]:
    """Heads repeated ``repeats`` times each (grouped-query attention: key/value
    head g serves query heads g*r .. g*r + r - 1). The repeated tensor is a new
    space of ``heads`` groups of ``repeats`` heads, its groups tied to the
    heads it repeats, so a key/value head and the query heads it serves move
    as one; positions inside a head are fixed on both sides, since each copy
    must keep the same within-head order as its original."""
    size = sum(seg.size for seg in lay.segments)
    if any(seg.inner != 1 for seg in lay.segments):
        ctx.fail(node, "repeats attention heads whose channels are spread over several elements each; fxzip "
                       "follows repeated heads (grouped-query attention) of plain head layouts only.")
    ctx.set_groups(node, lay.segments, heads)
    repeated = ctx.new_space(node, size * repeats)
    ctx.set_groups(node, repeated, heads)
    ctx.tie_groups(node, lay.segments, repeated, heads)
    why = f"{node.name} repeats every head {repeats} times (grouped-query attention)"
    ctx.mark_rigid(lay.segments, why)
    ctx.mark_rigid(repeated, why)
    return repeated


def _reshape_param(src, dst, view: ParamView) -> Layout:
    """Views of parameters: size-1 axes may come and go (gamma.reshape(1, -1, 1, 1));
    a parameter axis kept whole on its own stays tracked, axes merged or split
    around it lose their parameter axis (a looked-up table (N*N, heads) viewed
    as (N, N, heads) keeps its head axis)."""
    big_src = [view.axes[k] for k, s in enumerate(src) if s != 1]
    big_dst = [k for k, s in enumerate(dst) if s != 1]
    axes: list[int | None] = [None] * len(dst)
    if [src[k] for k, s in enumerate(src) if s != 1] == [dst[k] for k in big_dst]:
        for k, a in zip(big_dst, big_src):
            axes[k] = a
    else:
        for gi, gj in _groups(src, dst):
            bi, bj = [k for k in gi if src[k] != 1], [k for k in gj if dst[k] != 1]
            if len(bi) == 1 and len(bj) == 1 and src[bi[0]] == dst[bj[0]]:
                axes[bj[0]] = view.axes[bi[0]]
        if all(a is None for a in axes):
            return NO_CHANNELS
    return Layout(param=ParamView(view.name, tuple(axes)))


@register_rule(torch.flatten, "flatten", "view", "reshape", torch.reshape, "unflatten", torch.unflatten,
               nn.Flatten, nn.Unflatten, "squeeze", "unsqueeze", torch.squeeze, torch.unsqueeze, "view_as",
               "reshape_as")
@group_aware
@map_aware
def reshape(ctx, node: fx.Node) -> None:
    src, dst = ctx.shape(node.args[0]), ctx.shape(node)
    if src is None or dst is None:
        ctx.set(node, NO_CHANNELS)
        return
    before = ctx.layout(node.args[0])
    try:
        after = reshape_layout(tuple(src), tuple(dst), before, node, ctx)
    except ValueError:
        if not (isinstance(before, Layout) and ctx.pinned(before.segments + before.cross)):
            raise
        # channels another op already reads by position (fixed: the same in every model) spread over
        # other axes (a depth-to-space, RAFT's convex upsampling of the flow): they are positions now
        ctx.set(node, NO_CHANNELS)
        return
    # Only a reshape that keeps whole channels on their own axis is channel-wise;
    # one that interleaves them with pixels (flatten of C x H x W) makes its input
    # the place to probe the space.
    # So does a split into heads: the heads are read by attention, not channel-wise.
    ctx.set(node, after, passthrough=after.segments == before.segments
            and not (after.grouped and not before.grouped))


# Widths: flatten and squeeze hold no channel count; view/reshape hold sizes the
# widening pass rewrites from the layouts. unflatten, view_as and reshape_as hold
# sizes it does not rewrite, so their spaces keep one model's width.
register_width(FREE, torch.flatten, "flatten", nn.Flatten, "squeeze", "unsqueeze", torch.squeeze, torch.unsqueeze)
register_width(SIZES, "view", "reshape", torch.reshape)


_SWAPS = ("transpose", torch.transpose, "swapaxes", torch.swapaxes, "swapdims", torch.swapdims)
"""Ops that swap two axes (one op under three names, as method and function)."""
_SWAP_KWARGS = (("dim0", "axis0"), ("dim1", "axis1"))


def _swapped_axes(node: fx.Node) -> tuple[int, int]:
    given = list(node.args[1:3])
    for names in _SWAP_KWARGS[len(given):]:
        given.append(next(node.kwargs[k] for k in names if k in node.kwargs))
    return given[0], given[1]


def _perm_of(node: fx.Node, nd: int) -> list[int]:
    if node.target in _SWAPS:
        d0, d1 = (d % nd for d in _swapped_axes(node))
        perm = list(range(nd))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    if node.target == "t":
        return [1, 0] if nd == 2 else [0]
    dims = node.args[1:] if node.op == "call_method" else node.args[1]
    if node.op == "call_method" and len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    if not dims:
        dims = node.kwargs.get("dims", ())
    return [d % nd for d in dims]


@register_rule("permute", torch.permute, *_SWAPS, "t", width=FREE)
@group_aware
@map_aware
def permute(ctx, node: fx.Node) -> None:
    x = node.args[0]
    lay = ctx.layout(x)
    nd = ctx.ndim(x)
    perm = _perm_of(node, nd)
    if lay.has_channels or lay.grouped:
        ctx.set(node, lay.permuted(perm), passthrough=True)
    elif lay.param is not None:
        ctx.set(node, Layout(param=ParamView(lay.param.name, tuple(lay.param.axes[p] for p in perm))), passthrough=True)
    else:
        ctx.set(node, NO_CHANNELS)


@register_rule("expand", "expand_as", "repeat")
@group_aware
def expand(ctx, node: fx.Node) -> None:
    """Broadcasting a tensor to more axes/size-1 axes; a channel axis (and a
    head or stacked axis) must keep its size."""
    x = node.args[0]
    lay = ctx.layout(x)
    src, dst = ctx.shape(x), ctx.shape(node)
    shift = len(dst) - len(src)
    if lay.grouped:
        if lay.cross_dim is not None or any(dst[d + shift] != src[d] for d in lay.tracked_axes):
            ctx.fail(node, f"repeats an axis of a tensor whose channels are split into groups ({describe(lay)}); "
                           "fxzip follows broadcasts along the other axes only.")
        ctx.set(node, lay.shifted(shift), passthrough=True)
        return
    if lay.has_channels:
        if dst[lay.dim + shift] != src[lay.dim]:
            ctx.fail(node, "repeats the channel axis.")
        ctx.set(node, lay.moved(lay.dim + shift), passthrough=True)
    elif lay.param is not None:
        axes = (None,) * shift + tuple(a if src[k] == dst[k + shift] else None for k, a in enumerate(lay.param.axes))
        ctx.set(node, Layout(param=ParamView(lay.param.name, axes)), passthrough=True)
    else:
        ctx.set(node, NO_CHANNELS)


@register_rule("repeat_interleave", torch.repeat_interleave)
@group_aware
def repeat_interleave(ctx, node: fx.Node) -> None:
    """Repeating along a batch or token axis (a global query shared by every
    window) keeps every tracked axis; repeating channels or heads would copy
    units, which no merge can follow."""
    x = node.args[0]
    lay = ctx.layout(x)
    dim = ctx.arg(node, 2, "dim")
    if not isinstance(lay, Layout) or not (lay.has_channels or lay.grouped):
        ctx.set(node, NO_CHANNELS)
        return
    nd = ctx.ndim(x)
    if dim is None or dim % nd in (lay.dim, lay.group_dim, lay.stack_dim):
        ctx.fail(node, "repeats channels or heads (or flattens them); fxzip can only repeat along axes that hold "
                       "no channels.")
    ctx.set(node, lay, passthrough=True)


@register_rule(torch.cat, torch.concat, torch.concatenate, width=FREE)
@group_aware
def cat(ctx, node: fx.Node) -> None:
    """Along the channel axis the segments concatenate; along any other axis all
    parts must share the channel basis (class token + patch tokens)."""
    parts = list(node.args[0])
    dim = ctx.arg(node, 1, "dim", 0)
    nd = ctx.ndim(node)
    dim %= nd
    lays = [ctx.layout(p) for p in parts]
    if any(isinstance(l, Layout) and l.grouped for l in lays):
        _cat_grouped(ctx, node, parts, lays, dim)
        return
    chan = [l for l in lays if l.has_channels]
    if not chan and nd == 1 and any(l.param is not None for l in lays):
        _cat_params(ctx, node, parts, lays)
        return
    if not chan:
        ctx.set(node, NO_CHANNELS)
        return
    cdim = chan[0].dim
    if any(l.dim != cdim for l in chan):
        ctx.fail(node, "concatenates tensors whose channels sit on different axes.")
    if dim == cdim:
        segs: list[Segment] = []
        for p, l in zip(parts, lays):
            segs.extend(l.segments if l.has_channels else _untracked_part(ctx, node, p, cdim))
        ctx.set(node, Layout(cdim, tuple(segs)))
        return
    for p, l in zip(parts, lays):
        if l.has_channels:
            ctx.unify(node, chan[0].segments, l.segments)
        elif l.param is not None and l.param.axes[cdim] is not None:
            ctx.role(node, l.param.name, l.param.axes[cdim], chan[0].segments, "M")
        else:
            ctx.fix(chan[0].segments, f"untracked tensor: {p.name} joins it at {node.name}")
    ctx.set(node, chan[0], passthrough=True)


def _untracked_part(ctx, node: fx.Node, part: fx.Node, dim: int) -> tuple[Segment, ...]:
    """A channel-free tensor concatenated with features along their channel axis
    (the model input fed again, a flow field or coordinates computed in the
    forward): its channels are a space of their own that stays in place, as the
    model input's channels do, so the layers reading the concatenation keep
    those input columns as they are."""
    segs = ctx.new_space(node, ctx.shape(part)[dim])
    ctx.fix(segs, f"untracked tensor: {part.name} is concatenated with features at {node.name}")
    return segs


def _cat_grouped(ctx, node: fx.Node, parts: list, lays: list, dim: int) -> None:
    """Head layouts joined along a token axis (EVA's class token kept out of the
    rotary embedding, then put back): one basis, one head assignment."""
    axes = lambda l: (l.dim, l.group_dim, l.stack_dim)  # noqa: E731
    l0 = lays[0]
    if _head_positions_rejoined(ctx, node, lays, dim):
        return
    if _heads_joined_with_shared_basis(ctx, node, parts, lays, dim):
        return
    if any(not l.grouped or axes(l) != axes(l0) for l in lays) or dim in axes(l0):
        ctx.fail(node, f"concatenates tensors whose channels are split into groups "
                       f"({'; '.join(describe(l) for l in lays)}) along axis {dim}; fxzip follows such a "
                       "concatenation only when every part has its groups and channels on the same axes and the "
                       "concatenation is along another axis (e.g. tokens).")
    for l in lays[1:]:
        if l0.stack_dim is not None and len(l.segments) != len(l0.segments):
            ctx.fail(node, "concatenates stacks of different length.")
        ctx.unify(node, l0.segments, l.segments)
        ctx.tie_groups(node, l0.segments, l.segments)
    ctx.set(node, l0, passthrough=True)


def _heads_joined_with_shared_basis(ctx, node: fx.Node, parts: list, lays: list, dim: int) -> bool:
    """Head layouts joined along a channel-free axis with tensors whose heads
    were folded into the batch and unfolded again (MViT's pooling: the class
    token of every head is kept aside, the other tokens of all heads pooled as
    one batch, then the class token put back in front of them). The folded
    part has one within-head basis shared by every head (its heads sit on a
    plain axis), so the joined tensor has it too: every grouped part's heads
    are linked unit by unit to head 0 (whole heads stay in place, units move
    alike in every head) and joined to the shared basis. True when the parts
    are of that form; False leaves the caller to refuse them."""
    shape = ctx.shape(node)
    grouped = [l for l in lays if isinstance(l, Layout) and l.grouped]
    plain = [l for l in lays if isinstance(l, Layout) and l.has_channels and not l.grouped]
    if shape is None or not plain or len(grouped) + len(plain) != len(lays):
        return False
    g0 = grouped[0]
    if any(l.dim is None or l.stack_dim is not None or l.cross_dim is not None or l.group_dim is None
           or (l.dim, l.group_dim) != (g0.dim, g0.group_dim) for l in grouped):
        return False
    if any(l.dim != g0.dim for l in plain) or dim in (g0.dim, g0.group_dim):
        return False
    basis = None
    for p, l in zip(parts, lays):
        segs = shared_head_basis(ctx, node, p, l) if l.grouped else l.segments
        if basis is None:
            basis = segs
        else:
            ctx.unify(node, basis, segs)
    ctx.set(node, Layout(g0.dim, basis), passthrough=True)
    return True


def _head_positions_rejoined(ctx, node: fx.Node, lays: list, dim: int) -> bool:
    """Parts of every head read by position, put back together along the
    head's channel axis (a partial rotary embedding: the rotated first
    positions of each head, then the rest, as GPT-NeoX and Phi write it): the
    heads with their channels again, positions inside a head fixed (reading
    them by position fixed them) and whole heads free to move."""
    l0 = lays[0]
    nd, shape = ctx.ndim(node), ctx.shape(node)
    if dim != nd - 1 or shape is None or l0.group_dim is None:
        return False
    if any(l.dim is not None or l.group_dim != l0.group_dim or l.stack_dim is not None or l.cross_dim is not None
           or l.segments != l0.segments for l in lays):
        return False
    if shape[l0.group_dim] * shape[dim] != sum(s.size for s in l0.segments):
        return False  # not every position of every head
    ctx.set(node, Layout(dim, l0.segments, group_dim=l0.group_dim), passthrough=True)
    return True


def _cat_params(ctx, node: fx.Node, parts: list, lays: list) -> None:
    """A vector concatenated from parameters (BEiT's ``cat((q_bias, k_bias,
    v_bias))`` passed as a Linear's bias) is a channel vector of a new space:
    each parameter is bound to its range, so when an op joins the vector to
    a space (the Linear's output) the parameters follow that space's ranges.
    A part that is no parameter pins its range."""
    segs = ctx.new_space(node, ctx.shape(node)[0])
    offset = 0
    for p, l in zip(parts, lays):
        n = ctx.shape(p)[0] if isinstance(p, fx.Node) and ctx.shape(p) is not None else None
        if n is None:
            ctx.fail(node, f"concatenates parameters with {p!r}, whose length fxzip does not know.")
        piece = (replace(segs[0], start=offset, size=n),)
        if n and l.param is not None and l.param.axes[0] is not None:
            ctx.role(node, l.param.name, l.param.axes[0], piece, "M")
        elif n:
            ctx.fix(piece, f"untracked tensor: {p.name} is concatenated with parameters at {node.name}")
        offset += n
    ctx.set(node, Layout(0, segs))


@register_rule(torch.roll, "roll")
@group_aware
def roll(ctx, node: fx.Node) -> None:
    """A cyclic shift (Swin's shifted windows) over axes without channels keeps
    every channel where it is; rolling a tracked axis would mix channels."""
    x = node.args[0]
    lay = ctx.layout(x)
    if not isinstance(lay, Layout) or not (lay.has_channels or lay.grouped):
        ctx.set(node, NO_CHANNELS)
        return
    nd = ctx.ndim(x)
    dims = ctx.arg(node, 2, "dims")
    dims = () if dims is None else [d % nd for d in (dims if isinstance(dims, (tuple, list)) else (dims,))]
    tracked = {lay.dim, lay.group_dim, lay.stack_dim} - {None}
    if not dims or tracked & set(dims):
        ctx.fail(node, f"rolls {'the flattened tensor' if not dims else f'axes {dims}'} of {describe(lay)}, which "
                       "moves channels; fxzip follows rolls over axes without channels. To merge across a roll "
                       "of the channels, register a rule for it (fxzip.rules.rule_registered; README 'Extending' "
                       "works this one through).")
    ctx.set(node, lay, passthrough=True)


@register_rule(torch.stack, width=FREE)
def stack(ctx, node: fx.Node) -> None:
    """A new axis over tensors of one basis (outputs of parallel branches)."""
    if isinstance(node.args[0], fx.Node):  # a sequence made by one op (torch.meshgrid, unbind)
        lay = ctx.layout(node.args[0])
        if any(isinstance(l, Layout) and (l.has_channels or l.grouped)
               for l in (lay if isinstance(lay, tuple) else (lay,))):
            ctx.fail(node, f"stacks the tensors of {node.args[0].name}, a sequence made by one op, that carry "
                           "channels; fxzip follows stacks of separately computed tensors.")
        ctx.set(node, NO_CHANNELS)
        return
    parts = list(node.args[0])
    nd = ctx.ndim(node)
    dim = ctx.arg(node, 1, "dim", 0) % nd
    lays = [ctx.layout(p) for p in parts]
    chan = [l for l in lays if l.has_channels]
    if not chan:
        ctx.set(node, NO_CHANNELS)
        return
    for p, l in zip(parts, lays):
        if l.has_channels:
            if l.dim != chan[0].dim:
                ctx.fail(node, "stacks tensors whose channels sit on different axes.")
            ctx.unify(node, chan[0].segments, l.segments)
        else:
            ctx.fix(chan[0].segments, f"untracked tensor: {p.name} is stacked with it at {node.name}")
    ctx.set(node, chan[0].moved(chan[0].dim + (dim <= chan[0].dim)), passthrough=True)


@register_rule(nn.Unfold, F.unfold, torch._C._nn.im2col)
def unfold(ctx, node: fx.Node) -> None:
    """im2col: (B, C, H, W) -> (B, C * kh * kw, L); every channel becomes a block
    of kh * kw elements, like a flattened map. (``torch._C._nn.im2col``: the op
    ``F.unfold`` runs, as a capture records it.)"""
    x = node.args[0]
    lay = ctx.layout(x)
    if not lay.has_channels:
        ctx.set(node, NO_CHANNELS)
        return
    if lay.dim != 1:
        ctx.fail(node, f"unfolds a tensor whose channels are on axis {lay.dim}, not 1.")
    per_channel = ctx.shape(node)[1] // lay.length
    ctx.set(node, Layout(1, tuple(replace(s, inner=s.inner * per_channel) for s in lay.segments)))


@register_rule(nn.Fold, F.fold, torch._C._nn.col2im, width=FREE)
def fold(ctx, node: fx.Node) -> None:
    """col2im, the inverse of ``unfold``: (B, C * kh * kw, L) -> (B, C, H, W),
    the kh * kw elements of every channel summed into the pixels they cover
    (VOLO's outlook attention puts its windows back so). Channel c keeps its
    place; a block that does not hold whole channels would mix them."""
    x = node.args[0]
    lay = ctx.layout(x)
    if not lay.has_channels:
        ctx.set(node, NO_CHANNELS)
        return
    nd, out = ctx.ndim(x), ctx.shape(node)
    if lay.grouped or lay.dim != nd - 2:
        ctx.fail(node, f"folds a tensor whose channels are not on the axis before its last ({describe(lay)}, "
                       f"shape {tuple(ctx.shape(x))}); fxzip follows F.fold of (B, C * kh * kw, L).")
    out_dim = len(out) - 3
    block = lay.length // out[out_dim]
    if lay.length % out[out_dim] or any(s.inner % block for s in lay.segments):
        ctx.fail(node, f"sums blocks of {block} elements of the channel axis ({describe(lay)}) into "
                       f"{out[out_dim]} channels; fxzip follows a fold whose blocks hold whole channels (each "
                       "channel's kernel positions, as F.unfold laid them out).")
    ctx.set(node, Layout(out_dim, tuple(replace(s, inner=s.inner // block) for s in lay.segments)))


@register_rule("unfold")
@group_aware
def unfold_windows(ctx, node: fx.Node) -> None:
    """``x.unfold(dim, size, step)``: sliding windows along one axis, the window
    positions appended as a new last axis (HaloNet's overlapping key/value
    blocks). Windows along a channel-free axis leave every tracked axis where
    it is; windows across channels would read several channels as positions."""
    x = node.args[0]
    lay = ctx.layout(x)
    nd = ctx.ndim(x)
    dim = ctx.arg(node, 1, "dimension")
    if not isinstance(dim, int) or nd is None:
        ctx.fail(node, "unfolds along an axis fxzip cannot tell.")
    dim %= nd
    if dim in (lay.dim, lay.group_dim, lay.stack_dim):
        ctx.fail(node, f"takes sliding windows along the channel axis {dim} of {x.name}; fxzip follows windows "
                       "along spatial or token axes only.")
    ctx.set(node, lay if lay.param is None else NO_CHANNELS)


@register_rule(torch.split, "split", torch.chunk, "chunk", torch.tensor_split, "tensor_split", torch.unbind, "unbind")
@group_aware
def split(ctx, node: fx.Node) -> None:
    """Splits produce a tuple; ``getitem`` picks a part. Splitting the channel
    axis must fall on segment boundaries (a cat undone); unbinding a stacked
    q/k/v axis gives each part its own space."""
    x = node.args[0]
    lay = ctx.layout(x)
    out_meta = node.meta.get("tensor_meta")
    if not isinstance(out_meta, (tuple, list)):
        ctx.set(node, NO_CHANNELS)
        return
    name = node.target if isinstance(node.target, str) else node.target.__name__
    dim = ctx.arg(node, 1 if name == "unbind" else 2, "dim", 0)
    nd = ctx.ndim(x)
    dim %= nd
    if lay.grouped:
        ctx.set(node, _split_grouped(ctx, node, lay, name, dim, len(out_meta)), passthrough=True)
        return
    if not lay.has_channels:
        ctx.set(node, tuple(NO_CHANNELS for _ in out_meta))
        return
    if name == "unbind":
        if dim == lay.dim:
            ctx.fail(node, "unbinds the channel axis.")
        new = lay.dim - (dim < lay.dim)
        ctx.set(node, tuple(lay.moved(new) for _ in out_meta), passthrough=True)
        return
    if dim != lay.dim:
        ctx.set(node, tuple(lay for _ in out_meta), passthrough=True)
        return
    sizes = [m.shape[dim] for m in out_meta]
    pieces, lo = [], 0
    for size in sizes:
        pieces.append(Layout(dim, channel_range(ctx, node, lay.segments, lo, lo + size)))
        lo += size
    ctx.set(node, tuple(pieces), passthrough=True)


# Width: unbind holds no count; split, chunk and tensor_split hold part sizes or counts.
register_width(FREE, torch.unbind, "unbind")


@register_rule("narrow", torch.narrow)
def narrow(ctx, node: fx.Node) -> None:
    """``x.narrow(dim, start, length)``: a slice."""
    x = node.args[0]
    lay = ctx.layout(x)
    if not lay.has_channels:
        ctx.set(node, NO_CHANNELS)
        return
    nd = ctx.ndim(x)
    dim = ctx.arg(node, 1, "dim") % nd
    start, length = ctx.arg(node, 2, "start"), ctx.arg(node, 3, "length")
    if isinstance(start, fx.Node) or isinstance(length, fx.Node):
        ctx.fail(node, "narrows with a computed start or length; fxzip needs them as numbers.")
    if dim != lay.dim:
        ctx.set(node, lay, passthrough=True)
        return
    start %= lay.length
    ctx.set(node, Layout(lay.dim, channel_range(ctx, node, lay.segments, start, start + length)), passthrough=True)


def _drop_axis(lay: Layout, axis: int) -> dict[str, int | None]:
    """Tracked axes after removing ``axis``."""
    out = {}
    for key in ("dim", "group_dim", "stack_dim"):
        d = getattr(lay, key)
        out[key] = None if d is None else d - (d > axis)
    return out


def _split_head_channels(ctx, node: fx.Node, lay: Layout, name: str, dim: int) -> tuple[Layout, ...]:
    """``(B, H, N, 3 * D).chunk(3, -1)``: q, k and v interleaved inside every head
    (MaxViT, CoAtNet; TinyViT's split into parts of different widths). Part
    ``p`` of all heads is a new space of ``H`` groups whose head ``h`` is
    linked to part ``p`` of head ``h`` of the input. Spaces are ranges of a
    producer's channels, and the q part of every head is not one range, so
    the refinement cuts the producer into one atom per (head, part): units
    still move within each head (q and k together), heads stay in place."""
    if name == "unbind" or lay.stack_dim is not None or lay.group_dim is None:
        ctx.fail(node, f"splits the channels of each head of {describe(lay)}; fxzip follows a split of the head "
                       "channels "
                       "into parts (chunk/split) of a layout with one head axis only.")
    sizes = [m.shape[dim] for m in node.meta["tensor_meta"]]
    heads = ctx.shape(node.args[0])[lay.group_dim]
    width = sum(sizes)
    if width * heads != sum(s.length for s in lay.segments):
        ctx.fail(node, f"splits head channels of {describe(lay)} whose heads do not hold {width} channels each.")
    out, offset = [], 0
    for size in sizes:
        (part,) = ctx.new_space(node, size * heads)
        for h in range(heads):
            lo = h * width + offset
            ctx.unify(node, channel_range(ctx, node, lay.segments, lo, lo + size),
                      (replace(part, start=h * size, size=size),))
        ctx.set_groups(node, (part,), heads)
        out.append(Layout(lay.dim, (part,), group_dim=lay.group_dim))
        offset += size
    ctx.regroup(lay.segments, width)
    return tuple(out)


def _split_grouped(ctx, node: fx.Node, lay: Layout, name: str, dim: int, parts: int) -> tuple[Layout, ...]:
    if dim == lay.stack_dim:
        if name != "unbind" and not (parts == len(lay.segments)):
            ctx.fail(node, "splits a stacked q/k/v axis into parts other than its spaces.")
        axes = _drop_axis(lay, dim) if name == "unbind" else {"dim": lay.dim, "group_dim": lay.group_dim,
                                                              "stack_dim": None}
        return tuple(Layout(axes["dim"], (seg,), group_dim=axes["group_dim"]) for seg in lay.segments)
    if dim == lay.dim:
        return _split_head_channels(ctx, node, lay, name, dim)
    if dim == lay.group_dim:
        ctx.fail(node, f"splits the group axis of a tensor ({describe(lay)}) into {parts} parts; fxzip keeps channel "
                       "groups (attention heads) together.")
    if name == "unbind":
        axes = _drop_axis(lay, dim)
        return tuple(Layout(axes["dim"], lay.segments, group_dim=axes["group_dim"], stack_dim=axes["stack_dim"])
                     for _ in range(parts))
    return tuple(lay for _ in range(parts))


def _getitem_width(node: fx.Node) -> str | None:
    """Width of ``x[...]``: ``FREE`` when it selects along other axes only
    (``x[:, 0]``, a tuple's item), else None (a channel slice holds a count).
    Reads the layout ``fxzip.widths.plan_widths`` puts in ``node.meta``."""
    src = node.args[0]
    lay = src.meta.get("fxzip_layout") if isinstance(src, fx.Node) else None
    index = node.args[1]
    if not isinstance(index, tuple):
        index = (index,)
    if isinstance(lay, tuple) or lay is None:
        return FREE if isinstance(node.args[1], int) or lay is None else None
    if any(i is Ellipsis for i in index):
        return None
    full = slice(None, None, None)
    return FREE if all(a >= len(index) or index[a] == full for a in lay.tracked_axes) else None


@register_rule(operator.getitem, width=PerNode(_getitem_width))
@group_aware
def getitem(ctx, node: fx.Node) -> None:
    src = node.args[0]
    lay = ctx.layout(src)
    idx = node.args[1]
    if isinstance(lay, tuple):
        ctx.set(node, lay[idx] if isinstance(idx, int) else NO_CHANNELS, passthrough=True)
        return
    if isinstance(lay, Layout) and lay.grouped and lay.dim is None and ctx.shape(node) is not None:
        # heads read by position already (a partial rotary's rotated part, sliced again into halves)
        ctx.set(node, _index_grouped(ctx, node, lay, idx), passthrough=True)
        return
    if not isinstance(lay, Layout) or (not lay.has_channels and lay.param is None):
        ctx.set(node, NO_CHANNELS)
        return
    if ctx.shape(node) is None:
        ctx.set(node, NO_CHANNELS)
        return
    if lay.param is not None and not lay.has_channels:
        ctx.set(node, _index_param(ctx, node, lay.param, idx))  # a table lookup keeps the other axes
        return
    if lay.grouped:
        ctx.set(node, _index_grouped(ctx, node, lay, idx), passthrough=True)
        return
    index = idx if isinstance(idx, tuple) else (idx,)
    nd = ctx.ndim(src)
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in index:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (nd - n_real))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (nd - sum(1 for i in expanded if i is not None)))
    src_dim, out_dim = 0, 0
    for i in expanded:
        if i is None:
            out_dim += 1
            continue
        if src_dim == lay.dim:
            ctx.set(node, Layout(out_dim, _sliced(ctx, node, lay, i)), passthrough=True)
            return
        if isinstance(i, fx.Node):
            if sum(isinstance(j, fx.Node) for j in expanded) != 1 or ctx.ndim(i) is None:
                ctx.fail(node, "uses several index tensors on a tensor with channels; fxzip follows one index "
                               "tensor on a non-channel axis (a table lookup).")
            out_dim += ctx.ndim(i)  # one index tensor: its axes replace the indexed axis in place
            src_dim += 1
            continue
        if not isinstance(i, int):
            out_dim += 1
        src_dim += 1
    ctx.fail(node, "cannot follow the channel axis through this indexing.")


def _index_param(ctx, node: fx.Node, view: ParamView, idx: Any) -> Layout:
    """``table[index]`` (a relative position table looked up per token pair):
    axes kept whole stay axes of the parameter, the looked-up axis becomes the
    index tensor's axes (no parameter axis); anything else is opaque."""
    index = idx if isinstance(idx, tuple) else (idx,)
    nd = len(view.axes)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        real = sum(1 for i in index if i is not None and i is not Ellipsis)
        index = index[:at] + (slice(None),) * (nd - real) + index[at + 1:]
    index = index + (slice(None),) * (nd - sum(1 for i in index if i is not None))
    if sum(isinstance(i, fx.Node) for i in index) > 1:
        return NO_CHANNELS
    axes: list[int | None] = []
    src = 0
    for i in index:
        if i is None:
            axes.append(None)
            continue
        if isinstance(i, fx.Node):
            if ctx.ndim(i) is None or ctx.layout(i).has_channels:
                return NO_CHANNELS
            axes.extend([None] * ctx.ndim(i))
        elif isinstance(i, slice):
            axes.append(view.axes[src] if i == slice(None) else None)
        elif not isinstance(i, int):
            return NO_CHANNELS
        src += 1
    if len(axes) != ctx.ndim(node) or all(a is None for a in axes):
        return NO_CHANNELS
    return Layout(param=ParamView(view.name, tuple(axes)))


def _sliced(ctx, node: fx.Node, lay: Layout, index: Any) -> tuple[Segment, ...]:
    """The channels a basic index keeps: a slice with step 1 is a range."""
    if isinstance(index, slice) and index == slice(None):
        return lay.segments
    if not isinstance(index, slice) or any(isinstance(v, fx.Node) for v in (index.start, index.stop, index.step)):
        ctx.fail(node, f"indexes the channel axis with {index!r}; fxzip follows slices of channels "
                       "(x[:, a:b]), not single channels or index tensors.")
    lo, hi, step = index.indices(lay.length)
    if step != 1:
        ctx.fail(node, f"slices the channel axis with step {step}; fxzip follows contiguous slices only.")
    return channel_range(ctx, node, lay.segments, lo, max(lo, hi))


@register_rule(operator.setitem)
def setitem(ctx, node: fx.Node) -> None:
    """``x[:, a:b] = y`` / ``x[:, a:b] += y`` (a partial residual): the slice of
    ``x``'s channels and ``y`` are one basis. ``x`` keeps its layout."""
    x, index, value = node.args
    lay = ctx.layout(x)
    if not lay.has_channels:
        if isinstance(value, fx.Node) and ctx.layout(value).has_channels:
            ctx.fail(node, "writes channels into a tensor fxzip does not follow.")
        ctx.set(node, NO_CHANNELS)
        return
    index = index if isinstance(index, tuple) else (index,)
    nd = ctx.ndim(x)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (nd - len(index) + 1) + index[at + 1:]
    if any(i is None for i in index) or len(index) > nd:
        ctx.fail(node, "assigns through an index with new axes; fxzip follows basic slices only.")
    index = index + (slice(None),) * (nd - len(index))
    if any(isinstance(i, int) for i in index):
        ctx.fail(node, "assigns into single positions; fxzip follows slice assignments only.")
    target = _sliced(ctx, node, lay, index[lay.dim])
    vlay = ctx.layout(value)
    if isinstance(value, fx.Node) and vlay.has_channels:
        vshape = ctx.shape(value)
        if vlay.dim + (nd - len(vshape)) != lay.dim:
            ctx.fail(node, f"assigns {value.name} with channels on axis {vlay.dim} into channels on axis {lay.dim}.")
        ctx.unify(node, target, vlay.segments)
    elif isinstance(value, fx.Node) and ctx.shape(value) is not None:
        ctx.fix(target, f"untracked tensor: {value.name} is written into it at {node.name}")
    ctx.set(node, NO_CHANNELS)


def _index_grouped(ctx, node: fx.Node, lay: Layout, idx: Any) -> Layout:
    """Basic indexing of a head layout: an int on the stacked q/k/v axis picks
    that part; head and head_dim axes must be kept whole."""
    index = idx if isinstance(idx, tuple) else (idx,)
    nd = ctx.ndim(node.args[0])
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in index:
        expanded.extend([slice(None)] * (nd - n_real) if i is Ellipsis else [i])
    expanded.extend([slice(None)] * (nd - sum(1 for i in expanded if i is not None)))
    tracked = {"dim": lay.dim, "group_dim": lay.group_dim, "stack_dim": lay.stack_dim}
    new: dict[str, int | None] = {k: None for k in tracked}
    segments = lay.segments
    rigid_part = False
    src_dim = out_dim = 0
    for i in expanded:
        if i is None:
            out_dim += 1
            continue
        if not isinstance(i, (int, slice)):
            ctx.fail(node, f"indexes a tensor split into attention heads with {i!r}; only ints and slices are "
                               "followed.")
        key = next((k for k, v in tracked.items() if v == src_dim), None)
        if key is not None:
            if isinstance(i, slice) and i == slice(None):
                new[key] = out_dim
            elif key == "stack_dim" and isinstance(i, int):
                segments = (lay.segments[i],)
            elif key == "dim" and isinstance(i, slice) and lay.group_dim is not None and lay.stack_dim is None:
                # a part of every head read by position (x[..., ::2]: the rotation pairs of a rotary
                # embedding): positions inside a head are fixed from here on, whole heads still move;
                # the result is tracked by its head axis only
                ctx.mark_rigid(segments, f"{node.name} reads the head channels by position ({i!r})")
                rigid_part = True
            else:
                ctx.fail(node, f"indexes the {_AXIS_WORDS[key]} of a tensor split into attention heads with {i!r}; "
                               "fxzip keeps heads and their channels whole.")
        if isinstance(i, slice):
            out_dim += 1
        src_dim += 1
    if rigid_part:
        return Layout(None, segments, group_dim=new["group_dim"])
    return Layout(new["dim"], segments, group_dim=new["group_dim"], stack_dim=new["stack_dim"])
