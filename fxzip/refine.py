"""Refining feature spaces at the boundaries of slices and splits.

Why: a slice, split or chunk of a channel axis (a CSP stage's two halves, a
ghost module's concatenation trimmed to C channels, a partial residual
``x[:, :C] += s``, a split-and-gate MLP ``u, v = x.chunk(2, -1)``) lets part of
a space meet other tensors on its own. During the walk the rules therefore
record *ranges* of raw spaces (``Segment.start`` / ``Segment.size``) and links
between ranges of equal length ("channel ``sa + i`` of space ``a`` is channel
``sb + i`` of space ``b``"). At the end every raw space is cut at the
boundaries of every range that names it, cuts travel across links until
nothing changes (a cut inside one side of a link is a cut at the same offset
on the other side), and the pieces between cuts (*atoms*) are the units the
rest of fxzip matches. Linked atoms end up in one feature space; channels that
no slice keeps are atoms nobody reads (dead, folded like any other).

This is partition refinement: the coarsest split of every space in which
each recorded range is a union of whole atoms and links map atoms onto atoms.
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Iterable, Iterator

__all__ = ["Link", "Refinement"]


@dataclass(frozen=True)
class Link:
    """Channels ``a_start .. a_start + size`` of raw space ``a`` are the same
    basis as channels ``b_start .. b_start + size`` of raw space ``b``."""

    a: int
    a_start: int
    b: int
    b_start: int
    size: int
    node: str


class Refinement:
    """Collects ranges and links over raw spaces, then solves for atoms."""

    def __init__(self) -> None:
        self.sizes: dict[int, int] = {}
        self.links: list[Link] = []
        self.paired: list[tuple[int, int, int, int]] = []
        self.groups: list[tuple[int, int, int, int]] = []  # (raw, start, size, width)
        self._cuts: dict[int, set[int]] = {}
        self._atoms: dict[int, list[tuple[int, int, int]]] = {}  # raw -> [(lo, hi, atom id)]
        self.atom_sizes: dict[int, int] = {}
        self.atom_raw: dict[int, tuple[int, int]] = {}           # atom -> (raw, lo)

    def add_space(self, raw: int, size: int) -> None:
        self.sizes[raw] = size
        self._cuts[raw] = {0, size}

    def add_range(self, raw: int, start: int, size: int) -> None:
        if start < 0 or start + size > self.sizes[raw]:
            raise ValueError(f"range {start}..{start + size} outside a space of {self.sizes[raw]} channels")
        self._cuts[raw].update((start, start + size))

    def link(self, a: int, a_start: int, b: int, b_start: int, size: int, node: str) -> None:
        if (a, a_start) == (b, b_start) or size == 0:
            return
        self.add_range(a, a_start, size)
        self.add_range(b, b_start, size)
        self.links.append(Link(a, a_start, b, b_start, size, node))

    def pair_cuts(self, a: int, a_pos: int, b: int, b_pos: int) -> None:
        """A cut at ``a_pos`` of ``a`` implies one at ``b_pos`` of ``b`` and back:
        the boundaries of group ``g`` in two spaces whose groups are tied (a
        grouped conv's input and output), where the groups differ in width."""
        self.paired.append((a, a_pos, b, b_pos))

    def add_groups(self, raw: int, start: int, size: int, width: int) -> None:
        """Channels ``start .. start + size`` of ``raw`` form groups of ``width``
        (heads, a grouped conv's groups). A cut strictly inside one of them (a
        channel shuffle reads unit d of every group as one basis) cuts the range
        at every group boundary: each group becomes its own range, so no group
        has to move as a whole any more, and the cuts reach tied spaces through
        ``pair_cuts``."""
        self.groups.append((raw, start, size, width))

    def _split_groups(self) -> bool:
        changed = False
        for raw, start, size, width in self.groups:
            cuts = self._cuts[raw]
            if any(start < c < start + size and (c - start) % width for c in cuts):
                bounds = set(range(start, start + size + 1, width))
                if not bounds <= cuts:
                    cuts.update(bounds)
                    changed = True
        return changed

    def solve(self) -> None:
        """Propagate cuts across links to a fixed point, then number the atoms.

        Terminates: cuts only ever get added, and each space has finitely many
        positions. Each round is linear in links x cuts."""
        changed = True
        while changed:
            changed = False
            for ln in self.links:
                changed |= self._carry(ln.a, ln.a_start, ln.b, ln.b_start, ln.size)
                changed |= self._carry(ln.b, ln.b_start, ln.a, ln.a_start, ln.size)
            for a, a_pos, b, b_pos in self.paired:
                for src, sp, dst, dp in ((a, a_pos, b, b_pos), (b, b_pos, a, a_pos)):
                    if sp in self._cuts[src] and dp not in self._cuts[dst]:
                        self._cuts[dst].add(dp)
                        changed = True
            changed |= self._split_groups()
        next_id = 0
        for raw in sorted(self.sizes):
            bounds = sorted(self._cuts[raw])
            pieces = []
            for lo, hi in zip(bounds, bounds[1:]):
                pieces.append((lo, hi, next_id))
                self.atom_sizes[next_id] = hi - lo
                self.atom_raw[next_id] = (raw, lo)
                next_id += 1
            self._atoms[raw] = pieces

    def _carry(self, src: int, src_start: int, dst: int, dst_start: int, size: int) -> bool:
        inside = [c - src_start for c in self._cuts[src] if src_start < c < src_start + size]
        cuts = self._cuts[dst]
        before = len(cuts)
        cuts.update(dst_start + off for off in inside)
        return len(cuts) != before

    def atoms(self, raw: int, start: int, size: int) -> list[tuple[int, int]]:
        """``(atom, size)`` pairs covering channels ``start .. start + size`` of ``raw``."""
        pieces = self._atoms[raw]
        i = bisect_left(pieces, (start, -1, -1))
        out: list[tuple[int, int]] = []
        end = start + size
        while i < len(pieces) and pieces[i][0] < end:
            lo, hi, atom = pieces[i]
            if lo < start or hi > end:  # every range was registered, so this cannot happen
                raise AssertionError(f"range {start}..{end} of space {raw} is not a union of atoms")
            out.append((atom, hi - lo))
            i += 1
        return out

    def atom_edges(self) -> Iterator[tuple[int, int, str]]:
        """Pairs of atoms that links join (after ``solve`` they align one to one)."""
        for ln in self.links:
            left = self.atoms(ln.a, ln.a_start, ln.size)
            right = self.atoms(ln.b, ln.b_start, ln.size)
            for (x, nx_), (y, ny) in zip(left, right):
                if nx_ != ny:
                    raise AssertionError("linked ranges refined differently")
                yield x, y, ln.node

    def atoms_of(self, raw: int) -> Iterable[int]:
        return (atom for _, _, atom in self._atoms[raw])
