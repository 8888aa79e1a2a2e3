"""Feature-space analysis: which tensors of a traced model share a channel basis.

Rules (``fxzip.rules``) walk the graph in order and give each tensor a
``Layout``. Every weight layer opens a new space on its output; ops that must
see one basis on both sides (a residual add, a gating multiply, a cat along a
non-channel axis) record an edge between spaces. The spaces are the connected
components of that networkx graph. For each space the analysis collects its
producers, consumers, the parameter axes that follow it, its probe points and
whether it must stay fixed (it reaches the model output, or meets a tensor
fxzip cannot follow, such as the raw input).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Iterable, Sequence

import networkx as nx
import torch
import torch.fx as fx

from .layout import NO_CHANNELS, Layout, ParamView, Segment, describe
from .refine import Refinement
from .rules import lookup_rule

__all__ = ["AnalysisError", "AxisRole", "Probe", "FeatureSpace", "GraphAnalysis", "Analyzer", "analyze"]


class AnalysisError(ValueError):
    """The channel structure of the model cannot be determined."""


@dataclass(frozen=True)
class AxisRole:
    """Parameter ``axis`` is laid out like ``segments``; ``role`` is "M" (rows,
    merged with M: producers and per-channel parameters) or "U" (columns,
    absorbed with U: consumers). ``groups > 1``: the axis holds only one group's
    input channels (a grouped convolution's weight, shape (C_out, C_in / g, ...));
    output channel ``o`` reads the inputs of group ``o // (C_out / g)``."""

    axis: int
    segments: tuple[Segment, ...]
    role: str
    groups: int = 1


@dataclass(frozen=True)
class Probe:
    """Channels ``offset .. offset + size`` along axis ``dim`` of node ``node``.

    ``samples``: elements per channel of the probed tensor (batch x pixels or
    tokens) for the example batch. ``unreduced``: when the probed tensor is a
    sample-reducing view of an earlier tensor of the same channels (a global
    pool, a token mean, a class-token select, a strided pool), that earlier
    tensor, the one just before the first reduction; see ``fxzip.probes``."""

    node: str
    dim: int
    offset: int
    size: int
    samples: int = 0
    unreduced: "Probe | None" = None


@dataclass
class FeatureSpace:
    index: int
    size: int
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    params: list[tuple[str, int, str]] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    touches_input: bool = False
    touches_output: bool = False
    groups: int = 1
    tie: tuple[int, ...] = ()
    bilinear: bool = False
    rigid: bool = False
    """Units keep their position inside their group (rotary embeddings, a
    space grouped at nested counts): only whole groups move."""

    @property
    def group_size(self) -> int:
        return self.size // self.groups

    @property
    def mergeable(self) -> bool:
        """Only spaces free of fixed constraints get matched; the others keep the
        identity alignment (every model's channel i is the same feature)."""
        return not self.fixed and not self.touches_output

    @property
    def name(self) -> str:
        return self.producers[0] if self.producers else f"space{self.index}"


@dataclass
class GraphAnalysis:
    spaces: list[FeatureSpace]
    param_roles: dict[str, list[AxisRole]]
    layouts: dict[str, Any]
    space_of: dict[int, int]
    layers: list[str] = field(default_factory=list)
    consumed: dict[str, list[tuple[str, int, tuple[Segment, ...]]]] = field(default_factory=dict)
    ties: list[tuple[int, ...]] = field(default_factory=list)

    def space_index(self, raw: int) -> int:
        return self.space_of[raw]

    def resolved(self, segments: Sequence[Segment]) -> tuple[Segment, ...]:
        return tuple(Segment(self.space_of[s.space], s.size, s.inner) for s in segments)


def _shape(node: Any) -> torch.Size | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


class Analyzer:
    """The state rules read and write while walking one graph.

    Rules name *ranges* of raw spaces (``Segment.start``/``size``); every
    constraint is recorded against ranges and resolved only at the end, when
    ``fxzip.refine`` has cut each raw space into the atoms that slices and
    splits require. So a rule may slice a space that other nodes already
    joined, read whole or split elsewhere."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.layouts: dict[fx.Node, Any] = {}
        self.passthrough: set[fx.Node] = set()
        self.refinement = Refinement()
        self.producers: dict[int, list[str]] = {}
        self.param_roles: dict[str, list[AxisRole]] = {}
        self.layers: list[str] = []
        self.consumed: dict[str, list[tuple[str, int, tuple[Segment, ...]]]] = {}
        # constraints on ranges, resolved to atoms in _finish
        self._consumers: list[tuple[Segment, str]] = []
        self._fixed: list[tuple[Segment, str]] = []
        self._outputs: list[Segment] = []
        self._groups: list[tuple[Segment, int, str]] = []
        self._ties: list[tuple[tuple[Segment, ...], tuple[Segment, ...], str, int | None]] = []
        self._bilinear: list[Segment] = []
        self._rigid: list[tuple[Segment, str]] = []
        self._head_spaces: dict[tuple[Segment, ...], tuple[Segment, ...]] = {}

    @property
    def sizes(self) -> dict[int, int]:
        return self.refinement.sizes

    # -- reading -------------------------------------------------------------
    def layout(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            return self.layouts.get(arg, NO_CHANNELS)
        return NO_CHANNELS

    def shape(self, arg: Any) -> torch.Size | None:
        return _shape(arg)

    def ndim(self, arg: Any) -> int | None:
        s = _shape(arg)
        return None if s is None else len(s)

    def module(self, node: fx.Node) -> torch.nn.Module:
        return self.gm.get_submodule(node.target)

    def arg(self, node: fx.Node, index: int, name: str, default: Any = None) -> Any:
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(name, default)

    def param_view(self, arg: Any) -> ParamView | None:
        lay = self.layout(arg)
        return lay.param if isinstance(lay, Layout) else None

    # -- writing -------------------------------------------------------------
    def set(self, node: fx.Node, layout: Any, passthrough: bool = False) -> None:
        self.layouts[node] = layout
        if passthrough:
            self.passthrough.add(node)

    def new_space(self, node: fx.Node, size: int) -> tuple[Segment, ...]:
        sid = len(self.sizes)
        self.refinement.add_space(sid, size)
        self.producers[sid] = [node.name]
        return (Segment(sid, size),)

    def unify(self, node: fx.Node, a: Sequence[Segment], b: Sequence[Segment]) -> None:
        """Both sides must be the same basis (a residual add, a gate, ...). The
        two sides may be cut differently (a concatenation added to one space):
        they are linked channel by channel, which refines both."""
        if sum(s.length for s in a) != sum(s.length for s in b) or not _same_inner(a, b):
            raise AnalysisError(
                f"node '{node.name}' ({_describe(node)}) combines channel axes with different "
                f"structure: {_segs(a)} vs {_segs(b)}. fxzip can only join tensors whose channels "
                "line up one to one."
            )
        i = j = off_a = off_b = 0
        while i < len(a) and j < len(b):
            sa, sb = a[i], b[j]
            n = min(sa.size - off_a, sb.size - off_b)
            self.refinement.link(sa.space, sa.start + off_a, sb.space, sb.start + off_b, n, node.name)
            off_a += n
            off_b += n
            if off_a == sa.size:
                i, off_a = i + 1, 0
            if off_b == sb.size:
                j, off_b = j + 1, 0

    def role(self, node: fx.Node, param: str, axis: int, segments: Sequence[Segment], role: str,
             groups: int = 1) -> None:
        entry = AxisRole(axis, tuple(segments), role, groups)
        have = self.param_roles.setdefault(param, [])
        for old in have:
            if old.axis == axis:
                if old.role != role:
                    raise AnalysisError(
                        f"parameter '{param}' axis {axis} is used both as output channels (like a layer's "
                        f"outputs) and as input channels (like a layer's inputs), at node '{node.name}'; "
                        "fxzip cannot merge weights shared that way."
                    )
                self.unify(node, old.segments, segments)
                return
        have.append(entry)
        if role == "U":
            self.consumed.setdefault(node.name, []).append((param, axis, tuple(segments)))
            self._consumers.extend((s, node.name) for s in segments)

    def mark_layer(self, node: fx.Node) -> None:
        """``node`` is a weight layer (conv/linear): what cut points count."""
        self.layers.append(node.name)

    def fix(self, segments: Iterable[Segment], why: str) -> None:
        self._fixed.extend((s, why) for s in segments)

    def pinned(self, segments: Sequence[Segment]) -> bool:
        """Whether every channel of ``segments`` is already fixed by some rule
        (read by position: it keeps the identity alignment in every model), so
        an op may treat them as positions rather than features."""
        for seg in segments:
            covered = sorted((f.start, f.start + f.size) for f, _ in self._fixed if f.space == seg.space)
            at = seg.start
            for lo, hi in covered:
                if lo <= at < hi:
                    at = hi
            if at < seg.start + seg.size:
                return False
        return bool(segments)

    # -- group structure ---------------------------------------------------------
    def split_space(self, node: fx.Node, segment: Segment, parts: int) -> tuple[Segment, ...]:
        """``parts`` equal slices of one segment (a fused qkv projection is three
        projections): each slice becomes its own space unless something links it."""
        if segment.size % parts:
            self.fail(node, f"splits {segment.size} channels into {parts} equal parts.")
        width = segment.size // parts
        return tuple(replace(segment, size=width, start=segment.start + i * width) for i in range(parts))

    def set_groups(self, node: fx.Node, segments: Sequence[Segment], groups: int) -> None:
        """Units of these channels move only inside blocks of ``length / groups``
        consecutive channels (heads, GroupNorm groups, grouped-conv groups)."""
        total = sum(s.size for s in segments)
        if groups <= 1:
            return
        if total % groups:
            self.fail(node, f"groups {groups} do not divide {total} channels.")
        width = total // groups
        for seg in segments:
            if seg.size % width:
                self.fail(node, f"a group of {width} channels straddles two concatenated feature spaces "
                                f"({_segs(segments)}); fxzip cannot keep such groups whole.")
            self._groups.append((seg, width, node.name))

    def tie_groups(self, node: fx.Node, a: Sequence[Segment], b: Sequence[Segment], groups: int | None = None) -> None:
        """Group ``g`` of ``a`` and group ``g`` of ``b`` must move together (the heads
        of q/k and of v in one attention; a grouped conv's input and output).
        With ``groups`` given, a slice that cuts one side between groups cuts
        the other side between the same groups (split attention's radix)."""
        self._ties.append((tuple(a), tuple(b), node.name, groups))
        if groups:
            for g in range(1, groups):
                (ra, pa), (rb, pb) = _group_start(a, g, groups), _group_start(b, g, groups)
                self.refinement.pair_cuts(ra, pa, rb, pb)

    def regroup(self, segments: Sequence[Segment], width: int) -> None:
        """The heads of ``segments`` (groups of ``width``) were split into parts,
        each part its own grouped space linked head by head: those part
        groupings replace this one (a head is no longer one atom)."""
        self._groups = [g for g in self._groups if not (g[0] in segments and g[1] == width)]

    def head_space(self, node: fx.Node, segments: Sequence[Segment], heads: int) -> tuple[Segment, ...]:
        """One channel per head of the grouped channels ``segments``: the space a
        head axis is laid out like. Per-head parameters (relative position
        tables, per-head gates and logit scales), tensors whose channel axis
        is a head axis (a position MLP's per-head output) and head-mixing
        layers (talking heads) bind to it. It has ``heads`` one-unit groups
        tied to the groups of ``segments``, so head ``h`` of it moves with
        head ``h`` there; a merged head's parameters are the average of the
        matched heads'. One per grouped space."""
        key = tuple(segments)
        if key not in self._head_spaces:
            seg = self.new_space(node, heads)
            self.set_groups(node, seg, heads)
            self.tie_groups(node, segments, seg, heads)
            self._head_spaces[key] = seg
        return self._head_spaces[key]

    def mark_rigid(self, segments: Sequence[Segment], why: str) -> None:
        """Every unit of these grouped channels keeps its position inside its
        group (a rotary embedding rotates pairs by a frequency set by their
        position): groups may move as wholes, units inside them may not."""
        self._rigid.extend((s, why) for s in segments)

    def mark_bilinear(self, segments: Sequence[Segment]) -> None:
        """The space is read as ``q . k`` (no weight absorbs U): only cross-model
        matches keep that product (see ``fxzip.grouped``)."""
        self._bilinear.extend(segments)

    def fail(self, node: fx.Node, message: str) -> None:
        raise AnalysisError(f"node '{node.name}' ({_describe(node)}): {message}")

    # -- walking -------------------------------------------------------------
    def run(self) -> GraphAnalysis:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.set(node, NO_CHANNELS)
            elif node.op == "get_attr":
                s = _shape(node)
                self.set(node, Layout(param=ParamView(node.target, tuple(range(len(s))))) if s is not None else NO_CHANNELS)
            elif node.op == "output":
                self._mark_outputs(node)
            else:
                self._apply_rule(node)
        return self._finish()

    def _apply_rule(self, node: fx.Node) -> None:
        rule = lookup_rule(node, self.gm)
        if rule is None:
            if any(_carries(self.layout(a)) for a in _flat_nodes(node)):
                raise AnalysisError(
                    f"fxzip has no channel rule for {_describe(node)} at node '{node.name}'{_source_of(node)} "
                    f"(input shapes {[tuple(s) for s in map(_shape, _flat_nodes(node)) if s is not None]}): "
                    "fxzip must know how an op moves the channels of its inputs before it merges across it, "
                    f"and never guesses. Register a rule with @fxzip.register_rule({_key_hint(node)}) (README, "
                    "'Extending', works one through for torch.roll; the built-in rules are in fxzip.rules)."
                )
            self.set(node, NO_CHANNELS)
            return
        if not getattr(rule, "group_aware", False):
            grouped = [a for a in _flat_nodes(node) if _grouped(self.layout(a))]
            if grouped and all(_attention_map(self.layout(a)) for a in grouped):
                self._heads_as_channels(node, grouped, rule)
                return
            if grouped:
                self.fail(node, f"reads '{grouped[0].name}', whose channels are split over several axes "
                                f"({describe(self.layout(grouped[0]))}), and the rule of this op handles "
                                "channels on one axis only. Register a rule with @fxzip.register_rule(...) "
                                "and mark it @fxzip.rules.group_aware once it handles channels split over axes.")
        if not getattr(rule, "map_aware", False):
            maps = [a for a in _flat_nodes(node) if isinstance(self.layout(a), Layout) and
                    self.layout(a).cross_dim is not None]
            if maps:
                self.fail(node, f"reads {maps[0].name}, a channel x channel map (two channel axes: "
                                f"{describe(self.layout(maps[0]))}); fxzip follows such maps through element-wise ops, "
                                "softmax, transposes and the matrix product that contracts one of its axes.")
        rule(self, node)
        if node not in self.layouts:
            self.set(node, NO_CHANNELS)

    def _heads_as_channels(self, node: fx.Node, maps: list[fx.Node], rule) -> None:
        """An attention map keeps only its head axis; for an op that does not
        know head layouts (a Linear over the head axis: talking heads) the map
        is a tensor with one channel per head, in the attention's head space."""
        saved = {a: self.layouts[a] for a in maps}
        for a in maps:
            lay = saved[a]
            heads = _shape(a)[lay.group_dim]
            self.layouts[a] = Layout(lay.group_dim, self.head_space(node, lay.segments, heads))
        try:
            rule(self, node)
        finally:
            self.layouts.update(saved)
        if node not in self.layouts:
            self.set(node, NO_CHANNELS)

    def _mark_outputs(self, node: fx.Node) -> None:
        for arg in _flat_nodes(node):
            lay = self.layout(arg)
            for item in (lay if isinstance(lay, tuple) else (lay,)):
                if isinstance(item, Layout) and item.has_channels:
                    self.fix(item.segments, "model output")
                    self._outputs.extend(item.segments)

    # -- resolving ranges into atoms and spaces ----------------------------------
    def _finish(self) -> GraphAnalysis:
        ref = self.refinement
        for seg in self._all_segments():
            ref.add_range(seg.space, seg.start, seg.size)
        for seg, width, _ in self._groups:
            ref.add_groups(seg.space, seg.start, seg.size, width)
        ref.solve()
        self._to_atoms()
        links = nx.Graph()
        links.add_nodes_from(ref.atom_sizes)
        links.add_edges_from((a, b) for a, b, _ in ref.atom_edges())
        components = sorted((sorted(c) for c in nx.connected_components(links)), key=lambda c: c[0])
        space_of = {atom: idx for idx, comp in enumerate(components) for atom in comp}
        per_atom = self._atom_facts()
        spaces = []
        for idx, comp in enumerate(components):
            sp = FeatureSpace(idx, ref.atom_sizes[comp[0]])
            for atom in comp:
                facts = per_atom[atom]
                sp.producers += [p for p in facts["producers"] if p not in sp.producers]
                sp.consumers += [c for c in facts["consumers"] if c not in sp.consumers]
                sp.fixed += facts["fixed"]
                sp.touches_output |= facts["output"]
                sp.touches_input |= any(why.startswith("model input") for why in facts["fixed"])
                sp.bilinear |= facts["bilinear"]
                sp.rigid |= facts["rigid"]
            sp.groups = self._space_groups(sp, [g for atom in comp for g in per_atom[atom]["groups"]])
            spaces.append(sp)
        ties = self._resolve_ties(spaces, space_of)
        for name, roles in self.param_roles.items():
            for r in roles:
                for s in r.segments:
                    spaces[space_of[s.space]].params.append((name, r.axis, r.role))
        self._collect_probes(spaces, space_of)
        return GraphAnalysis(spaces, self.param_roles, {n.name: l for n, l in self.layouts.items()}, space_of,
                             list(self.layers), dict(self.consumed), ties)

    def _all_segments(self) -> Iterable[Segment]:
        """Every range any rule named: each must become a union of atoms."""
        for lay in self.layouts.values():
            yield from _layout_segments(lay)
        for roles in self.param_roles.values():
            for r in roles:
                yield from r.segments
        for items in self.consumed.values():
            for _, _, segs in items:
                yield from segs
        yield from (s for s, _ in self._consumers)
        yield from (s for s, _ in self._fixed)
        yield from self._outputs
        yield from (s for s, _, _ in self._groups)
        for a, b, _, _ in self._ties:
            yield from a
            yield from b
        yield from self._bilinear
        yield from (s for s, _ in self._rigid)

    def expand(self, segments: Sequence[Segment]) -> tuple[Segment, ...]:
        """Raw-space ranges as whole atoms (valid once the refinement is solved)."""
        out: list[Segment] = []
        for seg in segments:
            out.extend(Segment(atom, size, seg.inner) for atom, size in
                       self.refinement.atoms(seg.space, seg.start, seg.size))
        return tuple(out)

    def _to_atoms(self) -> None:
        """Rewrite every recorded layout and parameter role in atoms, so the rest
        of fxzip sees whole spaces only."""
        self.param_roles = {name: [AxisRole(r.axis, self.expand(r.segments), r.role, r.groups) for r in roles]
                            for name, roles in self.param_roles.items()}
        self.consumed = {n: [(p, a, self.expand(segs)) for p, a, segs in items] for n, items in self.consumed.items()}

        def fix_layout(lay: Any) -> Any:
            if isinstance(lay, tuple):
                return tuple(fix_layout(x) for x in lay)
            if isinstance(lay, Layout) and (lay.segments or lay.cross):
                return replace(lay, segments=self.expand(lay.segments), cross=self.expand(lay.cross))
            return lay

        self.layouts = {n: fix_layout(l) for n, l in self.layouts.items()}

    def _atom_facts(self) -> dict[int, dict[str, Any]]:
        """Producers, consumers, fixes, groups and flags of every atom."""
        ref = self.refinement
        facts = {atom: {"producers": list(self.producers[raw]), "consumers": [], "fixed": [], "output": False,
                         "bilinear": False, "rigid": False, "groups": []} for atom, (raw, _) in ref.atom_raw.items()}
        for seg, name in self._consumers:
            for atom, _ in ref.atoms(seg.space, seg.start, seg.size):
                if name not in facts[atom]["consumers"]:
                    facts[atom]["consumers"].append(name)
        for seg, why in self._fixed:
            for atom, _ in ref.atoms(seg.space, seg.start, seg.size):
                facts[atom]["fixed"].append(why)
        for seg in self._outputs:
            for atom, _ in ref.atoms(seg.space, seg.start, seg.size):
                facts[atom]["output"] = True
        for seg in self._bilinear:
            for atom, _ in ref.atoms(seg.space, seg.start, seg.size):
                facts[atom]["bilinear"] = True
        for seg, _ in self._rigid:
            for atom, _ in ref.atoms(seg.space, seg.start, seg.size):
                facts[atom]["rigid"] = True
        for seg, width, where in self._groups:
            for atom, size in ref.atoms(seg.space, seg.start, seg.size):
                lo = ref.atom_raw[atom][1]
                if (lo - seg.start) // width == (lo - seg.start + size - 1) // width and size < width:
                    continue  # a part of one group (the refinement cut every group apart): any order keeps it
                if (lo - seg.start) % width or size % width:
                    raise AnalysisError(
                        f"a slice or split cuts through a group of {width} channels (groups set at node "
                        f"'{where}': heads, GroupNorm groups or a grouped convolution); fxzip keeps every group "
                        "whole, so slices must fall on group boundaries."
                    )
                facts[atom]["groups"].append((size // width, where))
        return facts

    def _space_groups(self, sp: FeatureSpace, seen_list: list[tuple[int, str]]) -> int:
        """One group count per space: every op that groups it must agree, or
        the counts must nest (each divides the next: 2 GroupNorm groups over a
        depthwise conv's 4 one-channel groups, 4 query heads in 2 key/value
        groups). Nested counts take the coarsest, and its groups then move only
        as wholes with every unit in place (``rigid``), which keeps every finer
        group whole and in its place too; a two-level matching (groups, then
        units) has no level for groups inside groups. A finer count of one-unit
        groups (a depthwise conv's input channels) constrains nothing by itself,
        only through its tie, which ``_resolve_ties`` reads."""
        seen = set(seen_list)
        counts = {g for g, _ in seen}
        ordered = sorted(counts)
        if len(counts) > 1 and all(b % a == 0 for a, b in zip(ordered, ordered[1:])):
            if any(g < sp.size for g in ordered[1:]):
                sp.rigid = True
            return ordered[0]
        if len(counts) > 1:
            detail = ", ".join(f"{g} groups at {where}" for g, where in sorted(seen))
            raise AnalysisError(
                f"the feature space produced at {sp.producers[:3]} ({sp.size} channels) is grouped in "
                f"incompatible ways ({detail}); fxzip keeps every group whole, so the group counts of one "
                "space must be equal or nest (each a multiple of the next coarser one)."
            )
        return counts.pop() if counts else 1

    def _resolve_ties(self, spaces: list[FeatureSpace], space_of: dict[int, int]) -> list[tuple[int, ...]]:
        """Blocks of spaces that share one group assignment (connected components
        of the tie graph); each grouped space is at least its own block.

        Tied spaces share one group count. Where their counts nest (a depthwise
        conv with a channel multiplier ties input channel c to its c-th group of
        outputs, and another op groups that input or output coarser: a grouped
        conv, a GroupNorm), the finer side takes the coarser count: a tie of
        finer groups is a tie of the coarser groups made of them. Each finer
        group must then stay at its place inside its coarser group on both
        sides, or the two sides would arrange them differently, so both spaces
        become rigid (groups move as wholes, units in place); the coarsening
        travels along ties until every tie joins equal counts."""
        pairs = []
        for a_segs, b_segs, where, groups in self._ties:
            for sa_atom, sb_atom, fine in self._tied_atoms(a_segs, b_segs, groups):
                pairs.append((spaces[space_of[sa_atom.space]], spaces[space_of[sb_atom.space]], fine, where))
        coarsened = {sp.index for sp in spaces if sp.rigid}
        changed = True
        while changed:
            changed = False
            for sa, sb, fine, where in pairs:
                if sa.groups == sb.groups:
                    # a tie of groups finer than the (coarsened) count: their places are fixed on both sides
                    if sa.groups > 1 and fine and fine > sa.groups and {sa.index, sb.index} & coarsened \
                            and not (sa.rigid and sb.rigid):
                        sa.rigid = sb.rigid = True
                        coarsened |= {sa.index, sb.index}
                        changed = True
                    continue
                lo, hi = sorted((sa, sb), key=lambda sp: sp.groups)
                if lo.groups == 1 or hi.groups % lo.groups:
                    raise AnalysisError(
                        f"node '{where}' ties the groups of {sa.producers[:2]} ({sa.groups} groups) to "
                        f"those of {sb.producers[:2]} ({sb.groups} groups); tied spaces need equal group "
                        "counts, or counts that nest (one a multiple of the other)."
                    )
                hi.groups = lo.groups
                lo.rigid = hi.rigid = True
                coarsened |= {lo.index, hi.index}
                changed = True
        graph = nx.Graph()
        graph.add_nodes_from(sp.index for sp in spaces if sp.groups > 1)
        for sa, sb, _, _ in pairs:
            if sa.groups == sb.groups == 1:
                continue  # parts of a stack: nothing left to tie
            graph.add_edge(sa.index, sb.index)
        blocks = sorted(tuple(sorted(c)) for c in nx.connected_components(graph))
        for block in blocks:
            for i in block:
                spaces[i].tie = block
        # a space split into one-unit groups and tied to nothing is not grouped at all
        for sp in spaces:
            if sp.groups == sp.size and len(sp.tie) <= 1:
                sp.groups, sp.tie = 1, ()
        return [b for b in blocks if spaces[b[0]].groups > 1]

    def _tied_atoms(self, a_segs: Sequence[Segment], b_segs: Sequence[Segment],
                    groups: int | None) -> Iterable[tuple[Segment, Segment, int | None]]:
        """Pairs of atoms a tie joins, each with the number of tied groups the
        atom of ``a`` holds (None when unknown or not whole). With the group
        count known, group ``g`` of ``a`` meets group ``g`` of ``b`` only: an
        atom of ``a`` is tied to the atoms of ``b`` that hold the same groups
        (cuts at group boundaries carried across by ``pair_cuts`` make them
        line up), so parts of a tied space cut apart keep group assignments of
        their own. Without it every atom of one side is tied to every atom of
        the other."""
        a_atoms, b_atoms = self.expand(a_segs), self.expand(b_segs)
        if not groups:
            return [(x, y, None) for x in a_atoms for y in b_atoms]

        def spans(atoms):  # (first, end) of each atom in groups, as fractions of a group
            total, at, out = sum(s.size for s in atoms), 0, []
            for atom in atoms:
                out.append((Fraction(at * groups, total), Fraction((at + atom.size) * groups, total)))
                at += atom.size
            return out

        a_spans, b_spans = spans(a_atoms), spans(b_atoms)

        def whole(lo: Fraction, hi: Fraction) -> int | None:
            return int(hi - lo) if (hi - lo).denominator == 1 else None

        return [(x, y, whole(xa, xb)) for x, (xa, xb) in zip(a_atoms, a_spans) for y, (ya, yb) in zip(b_atoms, b_spans)
                if xa < yb and ya < xb]

    def _collect_probes(self, spaces: list[FeatureSpace], space_of: dict[int, int]) -> None:
        """A probe point is a tensor of the space that something other than a
        channel-wise op reads: the features a next layer actually sees (after the
        nonlinearity, as in the papers), in graph order. Which of them a
        calibration observes, and with what weight, is ``fxzip.probes``' policy."""
        for node in self.gm.graph.nodes:
            lay = self.layouts.get(node)
            if not isinstance(lay, Layout) or not lay.has_channels or lay.grouped:
                continue
            if not node.users or all(u in self.passthrough for u in node.users):
                continue
            before = self._before_reduction(node, lay)
            offset = 0
            for seg in lay.segments:
                if seg.inner == 1:
                    unreduced = None if before is None else Probe(before[0].name, before[1].dim, offset, seg.size,
                                                                  _samples(before[0], before[1].dim))
                    spaces[space_of[seg.space]].probes.append(
                        Probe(node.name, lay.dim, offset, seg.size, _samples(node, lay.dim), unreduced))
                offset += seg.length

    def _before_reduction(self, node: fx.Node, lay: Layout) -> tuple[fx.Node, Layout] | None:
        """Walk back from ``node`` through channel-preserving single-input ops
        (flatten, pooling, token select, norms, activations) while the channel
        segments stay the same; return the tensor just before the earliest step
        that reduced the number of samples, if any step did. The channels sit at
        the same offsets there (same segments), possibly on another axis."""
        found = None
        n_cur = _samples(node, lay.dim)
        while node in self.passthrough:
            parents = [a for a in _flat_nodes(node)
                       if isinstance(self.layouts.get(a), Layout) and self.layouts[a].has_channels]
            if len(parents) != 1:
                break
            parent, parent_lay = parents[0], self.layouts[parents[0]]
            if parent_lay.grouped or parent_lay.segments != lay.segments:
                break
            n_parent = _samples(parent, parent_lay.dim)
            if n_parent > n_cur > 0:
                found = (parent, parent_lay)
            node, lay, n_cur = parent, parent_lay, n_parent
        return found


def analyze(gm: fx.GraphModule) -> GraphAnalysis:
    """Run every rule over ``gm`` (which must carry ``tensor_meta`` from tracing)."""
    return Analyzer(gm).run()


# -- helpers -----------------------------------------------------------------

def _samples(node: fx.Node, dim: int | None) -> int:
    """Elements per channel of ``node``'s tensor (0 when its shape is unknown)."""
    shape = _shape(node)
    if shape is None or dim is None or shape[dim] == 0:
        return 0
    return int(torch.Size(shape).numel()) // int(shape[dim])


def _carries(lay: Any) -> bool:
    if isinstance(lay, tuple):
        return any(_carries(x) for x in lay)
    return isinstance(lay, Layout) and (lay.has_channels or lay.grouped)


def _layout_segments(lay: Any) -> Iterable[Segment]:
    if isinstance(lay, tuple):
        for x in lay:
            yield from _layout_segments(x)
    elif isinstance(lay, Layout):
        yield from lay.segments


def _group_start(segments: Sequence[Segment], g: int, groups: int) -> tuple[int, int]:
    """(raw space, channel) where group ``g`` of ``groups`` equal groups starts."""
    at = g * sum(s.size for s in segments) // groups
    for seg in segments:
        if at < seg.size:
            return seg.space, seg.start + at
        at -= seg.size
    raise AssertionError("group start beyond the segments")


def _same_inner(a: Sequence[Segment], b: Sequence[Segment]) -> bool:
    """Channels line up one to one only if both sides give each channel the
    same number of elements wherever they overlap."""
    def per_element(segs):
        return [(s.inner, s.length) for s in segs]
    i = j = 0
    ra = rb = 0
    pa, pb = per_element(a), per_element(b)
    while i < len(pa) and j < len(pb):
        if pa[i][0] != pb[j][0]:
            return False
        ra, rb = ra or pa[i][1], rb or pb[j][1]
        n = min(ra, rb)
        ra, rb = ra - n, rb - n
        if ra == 0:
            i += 1
        if rb == 0:
            j += 1
    return True


def _attention_map(lay: Any) -> bool:
    """Only a head axis is tracked (``softmax(q k^T)``): heads, no channels."""
    return isinstance(lay, Layout) and lay.dim is None and lay.group_dim is not None and lay.stack_dim is None


def _grouped(lay: Any) -> bool:
    if isinstance(lay, tuple):
        return any(_grouped(x) for x in lay)
    return isinstance(lay, Layout) and lay.grouped


def _flat_nodes(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n))
    return out


def _source_of(node: fx.Node) -> str:
    """`` (in channel_flip, models.py:42)``: the innermost frame of the user's (or
    a library's) code that called the op, when the tracer recorded it; ops of
    a helper the tracer saw through are found by the helper's name."""
    trace = node.stack_trace or ""
    skip = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)
    found = [f for f in re.findall(r'File "([^"]+)", line (\d+), in (\S+)', trace)
             if not os.path.abspath(f[0]).startswith(skip)]
    if not found:
        return ""
    path, line, function = found[-1]
    return f" (in {function}, {os.path.basename(path)}:{line})"


def _describe(node: fx.Node) -> str:
    """``module layer1.0.conv1 (Conv2d)``, ``function torch.roll``, ``method Tensor.roll``."""
    if node.op == "call_module":
        root = node.graph.owning_module
        mod = root.get_submodule(node.target) if root is not None else None
        return f"module {node.target} ({type(mod).__name__})"
    if node.op == "call_function":
        return f"function {_function_name(node.target)}"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    return f"{node.op} {node.target}"


def _function_name(t: Any) -> str:
    module = getattr(t, "__module__", "") or ""
    name = getattr(t, "__name__", str(t))
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    if module.startswith("torch") and getattr(torch, name, None) is t:
        return f"torch.{name}"  # torch.functional.roll -> torch.roll
    if module.startswith("torch.nn.functional") or getattr(torch.nn.functional, name, None) is t:
        return f"torch.nn.functional.{name}"
    return f"{module}.{name}" if module else name


def _key_hint(node: fx.Node) -> str:
    if node.op == "call_module":
        root = node.graph.owning_module
        return type(root.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return repr(node.target)
    return _function_name(node.target)


def _segs(segs: Sequence[Segment]) -> str:
    """Channels in words: ``64 channels``, ``32 + 32 channels (concatenated)``."""
    text = " + ".join(str(s.size) for s in segs) + " channels" + (" (concatenated)" if len(segs) > 1 else "")
    inner = sorted({s.inner for s in segs if s.inner > 1})
    if inner:
        text += f" of {'/'.join(map(str, inner))} elements each (a flattened C x H x W map)"
    return text
