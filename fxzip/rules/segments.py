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
    appears; channels no range keeps are dead and fold like any other."""
    out: list[Segment] = []
    offset = 0
    for seg in segments:
        a, b = max(lo, offset), min(hi, offset + seg.length)
        if a < b:
            if (a - offset) % seg.inner or (b - offset) % seg.inner:
                ctx.fail(node, f"cuts the channel axis at element {a if (a - offset) % seg.inner else b}, inside "
                               f"one channel's {seg.inner} elements (a flattened C x H x W map); fxzip follows "
                               "only cuts between whole channels.")
            first = (a - offset) // seg.inner
            out.append(replace(seg, start=seg.start + first, size=(b - a) // seg.inner))
        offset += seg.length
    return tuple(out)
