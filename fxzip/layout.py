"""Where a tensor keeps its channels: the vocabulary shared by rules and analysis.

A tensor has at most one *channel axis* (``Layout.dim``). Along that axis the
elements are a concatenation of ``Segment``s; each segment holds channels
``start .. start + size`` of one feature space, and every channel occupies
``inner`` contiguous elements (``start > 0`` or a short ``size``: a slice of
the space; see ``fxzip.refine``). ``inner > 1`` arises when a C x H x W map is flattened (a following
Linear then sees ``kron(U, I_HW)``), several segments arise from ``torch.cat``.
A tensor read from a parameter by view ops carries a ``ParamView`` instead:
which parameter axis each tensor axis is, so an op that combines it with a
channel tensor (layer scale, position embedding) can bind the parameter to
that space.

Attention and other grouped ops spread one space over two axes: after
``reshape(B, N, H, D)`` element ``[h, d]`` of the channel axes is unit
``h * D + d``; ``group_dim`` is the head axis and ``dim`` the axis of units
within a head. A fused projection reshaped to ``(3, H, D)`` also has a
``stack_dim``: index ``i`` along it is ``segments[i]`` (q, k, v), each its own
space. An attention map ``softmax(q k^T)`` keeps only the head axis
(``group_dim`` set, ``dim`` None): its heads must follow the heads of the
values it multiplies. A *channel x channel map* (``k^T v`` contracted over
tokens: XCiT's cross-covariance attention, DaViT's channel attention) has two
channel axes: ``dim`` holds the rows' space, ``cross_dim`` the columns',
whose channels are ``cross``; the map is consumed by a product that contracts
one of them with another tensor's channels.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["Segment", "ParamView", "Layout", "describe"]


@dataclass(frozen=True)
class Segment:
    space: int
    size: int
    inner: int = 1
    start: int = 0

    @property
    def length(self) -> int:
        return self.size * self.inner


@dataclass(frozen=True)
class ParamView:
    """A tensor that is a view of parameter ``name``: ``axes[d]`` is the parameter
    axis behind tensor axis ``d`` (``None`` for an inserted size-1 axis)."""

    name: str
    axes: tuple[int | None, ...]


@dataclass(frozen=True)
class Layout:
    dim: int | None = None
    segments: tuple[Segment, ...] = ()
    param: ParamView | None = None
    group_dim: int | None = None
    stack_dim: int | None = None
    cross_dim: int | None = None
    cross: tuple[Segment, ...] = ()

    @property
    def has_channels(self) -> bool:
        return self.dim is not None

    @property
    def grouped(self) -> bool:
        """Channels spread over several axes (heads, a stacked q/k/v, a channel x
        channel map): only rules marked ``group_aware`` may see such a tensor."""
        return self.group_dim is not None or self.stack_dim is not None or self.cross_dim is not None

    @property
    def tracked_axes(self) -> tuple[int, ...]:
        """Every axis that carries channels, heads or stacked parts."""
        return tuple(d for d in (self.dim, self.group_dim, self.stack_dim, self.cross_dim) if d is not None)

    def permuted(self, perm: list[int]) -> "Layout":
        """The layout after ``x.permute(perm)``: every tracked axis moves."""
        where = {old: new for new, old in enumerate(perm)}
        pick = lambda d: None if d is None else where[d]  # noqa: E731
        axes = self.param.axes if self.param is not None else None
        param = ParamView(self.param.name, tuple(axes[p] for p in perm)) if axes is not None else None
        return replace(self, dim=pick(self.dim), group_dim=pick(self.group_dim), stack_dim=pick(self.stack_dim),
                       cross_dim=pick(self.cross_dim), param=param)

    def shifted(self, by: int) -> "Layout":
        """Every tracked axis moved by ``by`` (broadcasting added leading axes)."""
        pick = lambda d: None if d is None else d + by  # noqa: E731
        return replace(self, dim=pick(self.dim), group_dim=pick(self.group_dim), stack_dim=pick(self.stack_dim),
                       cross_dim=pick(self.cross_dim))

    @property
    def length(self) -> int:
        return sum(s.length for s in self.segments)

    def moved(self, dim: int | None) -> "Layout":
        return replace(self, dim=dim)


NO_CHANNELS = Layout()


def describe(lay: Layout) -> str:
    """A layout in a user's terms, for error messages: which axis holds what."""
    parts = []
    n = sum(s.size for s in lay.segments)
    if lay.dim is not None and lay.group_dim is not None:
        parts.append(f"{n} channels split into groups (attention heads, or a channel shuffle's groups) along axis "
                     f"{lay.group_dim}, the channels of each group along axis {lay.dim}")
    elif lay.dim is not None:
        parts.append(f"{n} channels on axis {lay.dim}")
    elif lay.group_dim is not None:
        parts.append(f"one entry per attention head (or channel group) on axis {lay.group_dim}")
    if lay.stack_dim is not None:
        parts.append(f"stacked parts (e.g. q/k/v) on axis {lay.stack_dim}")
    if lay.cross_dim is not None:
        parts.append(f"a second channel axis {lay.cross_dim} ({sum(s.size for s in lay.cross)} units)")
    if lay.param is not None:
        parts.append(f"a view of parameter {lay.param.name}")
    return ", ".join(parts) or "no channels"
