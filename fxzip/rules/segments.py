"""Ranges of a channel axis as segments of feature spaces: the one helper the
shape rules and the attention-head rules share (``fxzip.rules.shape`` re-exports
it as the documented ``channel_range``)."""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch.fx as fx

from ..layout import Segment

__all__ = ["channel_range"]


def channel_range(ctx, node: fx.Node, segments: Sequence[Segment], lo: int, hi: int) -> tuple[Segment, ...]:
    """Elements ``lo .. hi`` of a channel axis laid out as ``segments``, as
    ranges of their spaces. A range that starts or ends inside a space refines
    it (``fxzip.refine``): the parts are matched separately wherever the space
    appears; channels no range keeps are dead and fold like any other.

    A cut between the elements of one unit (a unit spread over several
    elements: a channel of a flattened C x H x W map, or units of several
    spaces interleaved by a channel shuffle) cannot move with the unit: that
    unit stays in place in every model (fixed), and the elements on each side
    of the cut are a fixed space of their own, one unit per element."""
    out: list[Segment] = []
    offset = 0
    for seg in segments:
        a, b = max(lo, offset), min(hi, offset + seg.length)
        if a < b:
            first = -(-(a - offset) // seg.inner)  # the first whole unit at or after a
            last = (b - offset) // seg.inner       # the end of the last whole unit before b
            if offset + first * seg.inner > a:
                out.append(_cut_unit(ctx, node, seg, first - 1, min(b, offset + first * seg.inner) - a))
            if first < last:
                out.append(replace(seg, start=seg.start + first, size=last - first))
            if first <= last and offset + last * seg.inner < b:
                out.append(_cut_unit(ctx, node, seg, last, b - offset - last * seg.inner))
        offset += seg.length
    return tuple(out)


def _cut_unit(ctx, node: fx.Node, seg: Segment, unit: int, elements: int) -> Segment:
    """``elements`` elements of unit ``unit`` of ``seg``, cut off the rest of it."""
    why = (f"fixed: {node.name} cuts one unit of {seg.inner} elements apart (a flattened C x H x W map's "
           "channel, or units interleaved by a channel shuffle), so it keeps its place")
    ctx.fix((replace(seg, start=seg.start + unit, size=1),), why)
    piece = ctx.new_space(node, elements)
    ctx.fix(piece, why)
    return piece[0]
