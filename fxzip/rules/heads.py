"""Tensors laid out along a head axis: what follows the head assignment.

An attention's heads may carry their own parameters or tensors: a relative
position table indexed per head (``table[index]`` of shape (N, N, heads)), a
position MLP whose output channels are the heads (Swin-V2, ViT-relpos), a
per-head gate (ConViT's ``sigmoid(gating_param)``), a per-head logit scale,
talking-heads weights. Wherever such a tensor meets a head layout, its axis on
the head axis is bound to the attention's *head space* (``Analyzer.head_space``:
one unit per head, tied to the heads): permuting or matching heads then moves
it too, and a merged head gets the average of the matched heads' entries.
"""
from __future__ import annotations

import torch.fx as fx

from ..layout import Layout
from .segments import channel_range

__all__ = ["link_heads", "per_head", "position_in_head", "shared_head_basis"]


def per_head(ctx, node: fx.Node, heads: Layout, x: fx.Node, lay: Layout, out_nd: int) -> bool:
    """``x`` (not grouped) is broadcast against the head layout ``heads`` at
    ``node``. If it varies along the head axis and along no other tracked axis,
    bind it to the head space and return True; otherwise False (the caller
    decides: pin the heads or fail)."""
    g = heads.group_dim
    shape = ctx.shape(x)
    if g is None or shape is None or not isinstance(lay, Layout):
        return False
    lead = out_nd - len(shape)
    gx = g - lead
    if gx < 0 or shape[gx] == 1:
        return False
    for other in (heads.stack_dim, heads.cross_dim):
        if other is not None and other - lead >= 0 and shape[other - lead] != 1:
            return False  # varies per stacked part or per channel of a map: not a per-head tensor
    count = shape[gx]
    if lay.has_channels and (lay.dim != gx or lay.length != count):
        return False
    if not lay.has_channels and (lay.param is None or lay.param.axes[gx] is None):
        return False
    if heads.dim is not None and heads.dim - lead >= 0 and shape[heads.dim - lead] != 1:
        # per head and per position inside the head (a rotated copy of the heads): the
        # positions inside a head are fixed, whole heads still move
        ctx.mark_rigid(heads.segments, f"{x.name} varies per head channel at {node.name}")
    if lay.has_channels:
        ctx.unify(node, ctx.head_space(node, heads.segments, count), lay.segments)
        return True
    ctx.role(node, lay.param.name, lay.param.axes[gx], ctx.head_space(node, heads.segments, count), "M")
    return True


def position_in_head(ctx, node: fx.Node, heads: Layout, x: fx.Node, out_nd: int) -> bool:
    """A channel-free ``x`` (a rotary sin/cos table) that varies along the head
    channel axis but is the same for every head: it reads each unit by its
    position inside the head, so those positions are fixed (``mark_rigid``)
    and whole heads still move. True when that is the case."""
    shape = ctx.shape(x)
    if heads.dim is None or heads.group_dim is None or shape is None:
        return False
    lead = out_nd - len(shape)
    varies = lambda d: d is not None and d - lead >= 0 and shape[d - lead] != 1  # noqa: E731
    if not varies(heads.dim) or varies(heads.group_dim) or varies(heads.stack_dim) or varies(heads.cross_dim):
        return False
    ctx.mark_rigid(heads.segments, f"{x.name} varies along the head channels at {node.name}")
    return True


def shared_head_basis(ctx, node: fx.Node, x: fx.Node, lay: Layout) -> tuple:
    """A tensor applied to every head alike along head_dim (one LayerNorm over
    head_dim, a relative position table read by every head): position ``d`` of
    every head meets the same entry, so every head must use one within-head
    assignment. Head ``h``'s units are linked to head 0's (one basis of
    head_dim units, which the shared tensor follows); heads therefore stay in
    place and units move the same way in every head. Returns head 0's
    channels of ``x`` (the basis). A layout without heads is its own basis."""
    if lay.group_dim is None:
        return lay.segments
    heads = ctx.shape(x)[lay.group_dim]
    if not heads:
        ctx.fail(node, f"cannot tell the number of heads of {x.name}.")
    return link_heads(ctx, node, lay.segments, heads)


def link_heads(ctx, node: fx.Node, segments, heads: int) -> tuple:
    """Link block ``h`` of ``heads`` equal blocks of ``segments`` to block 0,
    unit by unit, and return block 0 (the shared basis)."""
    width = sum(s.length for s in segments) // heads
    first = channel_range(ctx, node, segments, 0, width)
    for h in range(1, heads):
        ctx.unify(node, first, channel_range(ctx, node, segments, h * width, (h + 1) * width))
    return first
