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

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import networkx as nx
import torch
import torch.fx as fx

from .layout import NO_CHANNELS, Layout, ParamView, Segment
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
    """Channels ``offset .. offset + size`` along axis ``dim`` of node ``node``."""

    node: str
    dim: int
    offset: int
    size: int


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
    """The state rules read and write while walking one graph."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.layouts: dict[fx.Node, Any] = {}
        self.passthrough: set[fx.Node] = set()
        self.links = nx.Graph()
        self.sizes: dict[int, int] = {}
        self.producers: dict[int, list[str]] = {}
        self.consumers: dict[int, list[str]] = {}
        self.fixed: dict[int, list[str]] = {}
        self.param_roles: dict[str, list[AxisRole]] = {}
        self._outputs: set[int] = set()
        self.layers: list[str] = []
        self.consumed: dict[str, list[tuple[str, int, tuple[Segment, ...]]]] = {}
        self.groups: dict[int, list[tuple[int, str]]] = {}
        self.group_links = nx.Graph()
        self.bilinear: set[int] = set()
        self.aliases: dict[int, tuple[Segment, ...]] = {}

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
        self.sizes[sid] = size
        self.links.add_node(sid)
        self.producers[sid] = [node.name]
        self.consumers[sid] = []
        return (Segment(sid, size),)

    def unify(self, node: fx.Node, a: Sequence[Segment], b: Sequence[Segment]) -> None:
        """Both sides must be the same basis (a residual add, a gate, ...)."""
        a, b = self.expand(a), self.expand(b)
        if [(s.size, s.inner) for s in a] != [(s.size, s.inner) for s in b]:
            raise AnalysisError(
                f"node '{node.name}' ({_describe(node)}) combines channel axes with different "
                f"structure: {_segs(a)} vs {_segs(b)}. fxzip can only join tensors whose channels "
                "come from the same concatenation of feature spaces."
            )
        for sa, sb in zip(a, b):
            self.links.add_edge(sa.space, sb.space)

    def role(self, node: fx.Node, param: str, axis: int, segments: Sequence[Segment], role: str,
             groups: int = 1) -> None:
        segments = self.expand(segments)
        entry = AxisRole(axis, tuple(segments), role, groups)
        have = self.param_roles.setdefault(param, [])
        for old in have:
            if old.axis == axis:
                if old.role != role:
                    raise AnalysisError(
                        f"parameter '{param}' axis {axis} is used both as an output ({'M'}) and an "
                        f"input ({'U'}) channel axis (at node '{node.name}'); fxzip cannot merge tied "
                        "weights used that way."
                    )
                self.unify(node, old.segments, segments)
                return
        have.append(entry)
        if role == "U":
            self.consumed.setdefault(node.name, []).append((param, axis, tuple(segments)))
            for s in segments:
                self.consumers[s.space].append(node.name)

    def mark_layer(self, node: fx.Node) -> None:
        """``node`` is a weight layer (conv/linear): what cut points count."""
        self.layers.append(node.name)

    def fix(self, segments: Iterable[Segment], why: str) -> None:
        for s in self.expand(segments):
            self.fixed.setdefault(s.space, []).append(why)

    # -- group structure ---------------------------------------------------------
    def expand(self, segments: Sequence[Segment]) -> tuple[Segment, ...]:
        """Segments with every split space replaced by its parts."""
        out: list[Segment] = []
        for seg in segments:
            if seg.space in self.aliases:
                out.extend(self.expand(tuple(Segment(p.space, p.size, seg.inner) for p in self.aliases[seg.space])))
            else:
                out.append(seg)
        return tuple(out)

    def split_space(self, node: fx.Node, segment: Segment, parts: int) -> tuple[Segment, ...]:
        """Split a freshly produced space into ``parts`` equal spaces (a fused qkv
        projection is three projections). Only a space nothing has joined or read
        yet can be split: afterwards every reference to it means its parts."""
        raw = segment.space
        if raw in self.aliases or self.links.degree(raw) or self.consumers.get(raw) or raw in self.fixed \
                or raw in self.groups or segment.size % parts:
            self.fail(node, f"splits a feature space of {segment.size} channels into {parts} parts after it was "
                            "already joined with other tensors; fxzip splits a fused projection only right "
                            "after the layer that produces it.")
        pieces = []
        for _ in range(parts):
            sid = len(self.sizes)
            self.sizes[sid] = segment.size // parts
            self.links.add_node(sid)
            self.producers[sid] = list(self.producers[raw])
            self.consumers[sid] = []
            pieces.append(Segment(sid, segment.size // parts))
        self.aliases[raw] = tuple(pieces)
        self.links.remove_node(raw)
        return tuple(Segment(p.space, p.size, segment.inner) for p in pieces)

    def set_groups(self, node: fx.Node, segments: Sequence[Segment], groups: int) -> None:
        """Units of these channels move only inside blocks of ``length / groups``
        consecutive channels (heads, GroupNorm groups, grouped-conv groups)."""
        segments = self.expand(segments)
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
            self.groups.setdefault(seg.space, []).append((seg.size // width, node.name))

    def tie_groups(self, node: fx.Node, a: Sequence[Segment], b: Sequence[Segment]) -> None:
        """Group ``g`` of ``a`` and group ``g`` of ``b`` must move together (the heads
        of q/k and of v in one attention; a grouped conv's input and output)."""
        for sa in self.expand(a):
            for sb in self.expand(b):
                self.group_links.add_edge(sa.space, sb.space, node=node.name)

    def mark_bilinear(self, segments: Sequence[Segment]) -> None:
        """The space is read as ``q . k`` (no weight absorbs U): only cross-model
        matches keep that product (see ``fxzip.grouped``)."""
        for seg in self.expand(segments):
            self.bilinear.add(seg.space)

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
                kind = {"call_module": "module", "call_function": "function", "call_method": "method"}[node.op]
                raise AnalysisError(
                    f"fxzip has no channel rule for {kind} {_describe(node)} at node '{node.name}' "
                    f"(input shapes {[tuple(s) for s in map(_shape, _flat_nodes(node)) if s is not None]}). "
                    f"Register one with @fxzip.register_rule({_key_hint(node)}) - see fxzip.rules "
                    "for examples - or make the op a no-channel op."
                )
            self.set(node, NO_CHANNELS)
            return
        if not getattr(rule, "group_aware", False):
            grouped = [a for a in _flat_nodes(node) if _grouped(self.layout(a))]
            if grouped:
                self.fail(node, f"reads {grouped[0].name}, whose channels are spread over several axes "
                                f"(attention heads or a stacked q/k/v: {self.layout(grouped[0])}); this op has no "
                                "group-aware rule. Register one with @fxzip.register_rule(...) and mark it "
                                "@fxzip.rules.group_aware once it handles head axes.")
        rule(self, node)
        if node not in self.layouts:
            self.set(node, NO_CHANNELS)

    def _mark_outputs(self, node: fx.Node) -> None:
        for arg in _flat_nodes(node):
            lay = self.layout(arg)
            for item in (lay if isinstance(lay, tuple) else (lay,)):
                if isinstance(item, Layout) and item.has_channels:
                    self.fix(item.segments, "model output")
                    for s in item.segments:
                        self._outputs.add(s.space)

    def _finish(self) -> GraphAnalysis:
        self._expand_aliases()
        components = sorted((sorted(c) for c in nx.connected_components(self.links)), key=lambda c: c[0])
        space_of = {raw: idx for idx, comp in enumerate(components) for raw in comp}
        spaces = []
        for idx, comp in enumerate(components):
            size = self.sizes[comp[0]]
            for raw in comp:
                if self.sizes[raw] != size:
                    raise AnalysisError(
                        f"spaces produced at {self.producers[comp[0]]} ({size} channels) and "
                        f"{self.producers[raw]} ({self.sizes[raw]} channels) are joined but differ in size"
                    )
            sp = FeatureSpace(idx, size)
            for raw in comp:
                sp.producers += self.producers[raw]
                sp.consumers += self.consumers[raw]
                sp.fixed += self.fixed.get(raw, [])
                sp.touches_output |= raw in self._outputs
                sp.touches_input |= any(why.startswith("model input") for why in self.fixed.get(raw, []))
                sp.bilinear |= raw in self.bilinear
            sp.groups = self._space_groups(sp, comp)
            spaces.append(sp)
        ties = self._resolve_ties(spaces, space_of)
        for name, roles in self.param_roles.items():
            for r in roles:
                for s in r.segments:
                    spaces[space_of[s.space]].params.append((name, r.axis, r.role))
        self._collect_probes(spaces, space_of)
        return GraphAnalysis(spaces, self.param_roles, {n.name: l for n, l in self.layouts.items()}, space_of,
                             list(self.layers), dict(self.consumed), ties)

    def _expand_aliases(self) -> None:
        """Replace every reference to a split (fused) space by its parts."""
        if not self.aliases:
            return
        self.param_roles = {name: [AxisRole(r.axis, self.expand(r.segments), r.role, r.groups) for r in roles]
                            for name, roles in self.param_roles.items()}
        self.consumed = {n: [(p, a, self.expand(segs)) for p, a, segs in items] for n, items in self.consumed.items()}

        def fix_layout(lay: Any) -> Any:
            if isinstance(lay, tuple):
                return tuple(fix_layout(x) for x in lay)
            if isinstance(lay, Layout) and lay.segments:
                return Layout(lay.dim, self.expand(lay.segments), lay.param, lay.group_dim, lay.stack_dim)
            return lay

        self.layouts = {n: fix_layout(l) for n, l in self.layouts.items()}

    def _space_groups(self, sp: FeatureSpace, comp: Sequence[int]) -> int:
        """One group count per space: every op that groups it must agree."""
        seen = {(g, where) for raw in comp for g, where in self.groups.get(raw, [])}
        counts = {g for g, _ in seen}
        if len(counts) > 1:
            detail = ", ".join(f"{g} groups at {where}" for g, where in sorted(seen))
            raise AnalysisError(
                f"the feature space produced at {sp.producers[:3]} ({sp.size} channels) is grouped in "
                f"incompatible ways ({detail}); fxzip keeps every group whole, so all group counts of one "
                "space must be equal."
            )
        return counts.pop() if counts else 1

    def _resolve_ties(self, spaces: list[FeatureSpace], space_of: dict[int, int]) -> list[tuple[int, ...]]:
        """Blocks of spaces that share one group assignment (connected components
        of the tie graph); each grouped space is at least its own block."""
        graph = nx.Graph()
        graph.add_nodes_from(sp.index for sp in spaces if sp.groups > 1)
        for a, b, data in self.group_links.edges(data=True):
            sa, sb = spaces[space_of[a]], spaces[space_of[b]]
            if sa.groups != sb.groups:
                raise AnalysisError(
                    f"node '{data['node']}' ties the groups of {sa.producers[:2]} ({sa.groups} groups) to "
                    f"those of {sb.producers[:2]} ({sb.groups} groups); tied spaces need equal group counts."
                )
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

    def _collect_probes(self, spaces: list[FeatureSpace], space_of: dict[int, int]) -> None:
        """A probe point is a tensor of the space that something other than a
        channel-wise op reads: the features a next layer actually sees (after the
        nonlinearity, as in the papers). All probe points of a space pool their
        samples (every pixel / token of every probe is one sample)."""
        for node in self.gm.graph.nodes:
            lay = self.layouts.get(node)
            if not isinstance(lay, Layout) or not lay.has_channels or lay.grouped:
                continue
            if not node.users or all(u in self.passthrough for u in node.users):
                continue
            offset = 0
            for seg in lay.segments:
                if seg.inner == 1:
                    spaces[space_of[seg.space]].probes.append(Probe(node.name, lay.dim, offset, seg.size))
                offset += seg.length


def analyze(gm: fx.GraphModule) -> GraphAnalysis:
    """Run every rule over ``gm`` (which must carry ``tensor_meta`` from tracing)."""
    return Analyzer(gm).run()


# -- helpers -----------------------------------------------------------------

def _carries(lay: Any) -> bool:
    if isinstance(lay, tuple):
        return any(_carries(x) for x in lay)
    return isinstance(lay, Layout) and (lay.has_channels or lay.grouped)


def _grouped(lay: Any) -> bool:
    if isinstance(lay, tuple):
        return any(_grouped(x) for x in lay)
    return isinstance(lay, Layout) and lay.grouped


def _flat_nodes(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n))
    return out


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        root = node.graph.owning_module
        mod = root.get_submodule(node.target) if root is not None else None
        return f"call_module {node.target} ({type(mod).__name__})"
    if node.op == "call_function":
        t = node.target
        return f"call_function {getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', t)}".replace("_operator.", "operator.")
    return f"{node.op} {node.target}"


def _key_hint(node: fx.Node) -> str:
    if node.op == "call_module":
        root = node.graph.owning_module
        return type(root.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return repr(node.target)
    return getattr(node.target, "__name__", str(node.target))


def _segs(segs: Sequence[Segment]) -> str:
    return "[" + ", ".join(f"{s.size}x{s.inner}" if s.inner > 1 else str(s.size) for s in segs) + "]"
