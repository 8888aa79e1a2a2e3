"""Cut points for partial zipping: where a graph can be split into a shared
trunk and one head per model.

A cut is a node that every data path from the model inputs to its output
passes through (a dominator of the output, found with networkx), holding one
whole feature space. Shape queries (``x.shape[-2:]`` feeding a final resize)
are not data paths. ``k`` counts weight layers (conv/linear) on the longest
input -> cut path, which is how the papers count (ResNet-20: m = 20, stage ends
7/20 and 13/20). Models that differ after a shared trunk share the cuts of
model 0 inside the common part (``fxzip.align``) that are cuts of every model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

import networkx as nx
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .align import CommonPart, GraphView, meta_shape, shape_nodes
from .analysis import GraphAnalysis
from .layout import Layout, Segment

logger = logging.getLogger(__name__)

__all__ = ["CutPoint", "cut_points", "find_cuts", "resolve_cut", "shared_cuts", "choose_cut"]

INPUT = "<input>"


@dataclass(frozen=True)
class CutPoint:
    name: str            # the node whose output the trunk hands to the heads ("<input>": nothing zipped)
    k: int               # weight layers zipped when cutting here
    m: int               # weight layers on the longest input -> output path (of model 0)
    space: int | None    # the feature space of the cut tensor
    dim: int | None      # its channel axis
    needs_gather: bool   # some head reads the cut through an index_select (identity shortcut, norm, ...)
    segments: tuple[Segment, ...] = ()  # the cut tensor's channel axis, in feature spaces (refined spaces: several)

    def __str__(self) -> str:
        return f"{self.name} ({self.k}/{self.m}{', gather' if self.needs_gather else ''})"


def cut_points(model: nn.Module, example_inputs: Any = None, *others: nn.Module) -> list[CutPoint]:
    """All cut points of ``model``, in network order; ``.name`` is accepted as ``stop_at``.

    With ``others``: the cut points ``model`` shares with every one of them
    (models that agree up to some layer and differ after it, e.g. another head).
    """
    from .trace import default_example, trace
    from .trunk import analyze_models

    example = default_example(model) if example_inputs is None else example_inputs
    gms = [trace(m, example) for m in (model, *others)]
    common, analysis = analyze_models(gms)
    if common is None:
        return find_cuts(gms[0], analysis)
    return shared_cuts(gms, common, analysis)


def _data_flow(gm: fx.GraphModule) -> tuple[nx.DiGraph, str]:
    """The graph of the paths that carry features, from a virtual source.

    A feature is a value computed from the data with the model's weights: the
    only kind a merge changes, so the only kind a head may read from the trunk
    at the cut alone. Values computed from the data without any weight (an
    attention or padding mask from ``attention_mask``, rotary cos/sin from the
    positions, the raw input a late layer reads again) are the same in models
    of one architecture: a head may read them from the trunk wherever they
    are, so they are no paths around a cut (a causal LM's residual stream is
    then a cut after every block, although the mask reaches every attention).
    (A value computed with buffers that differ between the models, such as a
    parameter-free ``BatchNorm(affine=False)`` on the raw input, is read as the
    trunk computes it, with the merged buffers, as the full zip computes it.)
    The source feeds the nodes where data first meets a weight (the stem, the
    embedding). Parameters themselves are no data paths (each head holds its
    own)."""
    nodes = list(gm.graph.nodes)
    shapes = shape_nodes(gm.graph)
    data: set[fx.Node] = set()       # computed from the inputs
    weighted: set[fx.Node] = set()   # computed with a parameter
    for n in nodes:
        if n in shapes:
            continue
        inputs = [i for i in n.all_input_nodes if i not in shapes]
        if (n.op == "placeholder" and n.meta.get("tensor_meta") is not None) or any(i in data for i in inputs):
            # only inputs that carry data: an optional argument left at None (timm's attn_mask) is none
            data.add(n)
        if _reads_parameter(gm, n) or any(i in weighted for i in inputs):
            weighted.add(n)
    features = data & weighted
    graph = nx.DiGraph()
    source = "\0source"
    graph.add_node(source)
    for n in nodes:
        if n not in features:
            continue
        graph.add_node(n.name)
        fed = [i for i in n.all_input_nodes if i in features]
        for inp in fed:
            graph.add_edge(inp.name, n.name)
        if not fed:  # where the data enters the weights
            graph.add_edge(source, n.name)
    return graph, source


def _reads_parameter(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` uses a parameter itself: a module with parameters (a
    batch norm's statistics come with its affine weights), or a parameter
    fetched by ``get_attr``. A buffer alone (a rotary frequency table, an
    index table) is no weight a merge changes."""
    if node.op == "get_attr":
        try:
            return isinstance(gm.get_parameter(node.target), nn.Parameter)
        except AttributeError:
            return False
    if node.op == "call_module":
        return any(True for _ in gm.get_submodule(node.target).parameters())
    return False


def dominators(gm: fx.GraphModule) -> set[str]:
    """Names of the nodes every data path to the output passes through."""
    flow, source = _data_flow(gm)
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    idom = nx.immediate_dominators(flow, source)
    found, cur = set(), output.name
    while cur != source:
        cur = idom[cur]
        found.add(cur)
    return found


def find_cuts(gm: fx.GraphModule, analysis: GraphAnalysis, layers: Iterable[str] | None = None) -> list[CutPoint]:
    """Cuts of ``gm``; ``layers`` overrides the weight layers counted (default:
    the analysis's), for a graph analyzed only in part."""
    nodes = list(gm.graph.nodes)
    flow, source = _data_flow(gm)
    output = next(n for n in reversed(nodes) if n.op == "output")
    layers = set(analysis.layers if layers is None else layers)
    depth: dict[str, int] = {source: 0}
    for n in nodes:
        if n.name in flow:
            preds = [depth[p] for p in flow.predecessors(n.name) if p in depth]
            depth[n.name] = (max(preds) if preds else 0) + (n.name in layers)
    m = depth[output.name]
    doms = dominators(gm)
    cuts = [CutPoint(INPUT, 0, m, None, None, False)]
    by_key: dict[tuple[int, int], CutPoint] = {}
    for n in nodes:
        if n.name not in doms or n.op in ("placeholder", "get_attr"):
            continue
        lay = analysis.layouts.get(n.name)
        if not isinstance(lay, Layout) or not lay.has_channels or lay.grouped \
                or any(s.inner != 1 for s in lay.segments):
            continue
        segments = analysis.resolved(lay.segments)
        cut = CutPoint(n.name, depth[n.name], m, segments[0].space, lay.dim, _needs_gather(n, analysis), segments)
        by_key[(cut.k, tuple(s.space for s in segments))] = cut  # the last node of a run of channel-wise ops wins
    order = {n.name: i for i, n in enumerate(nodes)}
    cuts += sorted(by_key.values(), key=lambda c: order[c.name])
    return cuts


def shared_cuts(gms: Sequence[fx.GraphModule], common: CommonPart, analysis: GraphAnalysis) -> list[CutPoint]:
    """Cuts of model 0 inside the common part that are cuts of every model.

    ``analysis`` covers model 0's common part (``fxzip.trunk``); model 0's other
    weight layers are counted by structure so that ``m`` is still its depth.
    ``needs_gather`` looks at every model's head (``absorbing_readers``).
    """
    layers = set(analysis.layers) | {n.name for n in gms[0].graph.nodes
                                     if n.name not in common.prefix and _is_weight_layer(gms[0], n)}
    doms = [dominators(gm) for gm in gms]
    shared = []
    for cut in find_cuts(gms[0], analysis, layers):
        if cut.name != INPUT:
            if cut.name not in common.prefix:
                continue
            mine = [common.views[k].resolve(common.maps[k][cut.name]) for k in range(len(gms))]
            if not all(node.name in doms[k] for k, node in enumerate(mine)):
                continue
            cut = replace(cut, needs_gather=any(bool(gathering_readers(common.views[k], node, cut.dim))
                                                for k, node in enumerate(mine)))
        shared.append(cut)
    return shared


def _is_weight_layer(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Conv/linear by structure (what the analysis's rules count as layers)."""
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    return n.op == "call_function" and n.target in (F.conv1d, F.conv2d, F.conv3d, F.linear)


def gathering_readers(view: GraphView, node: fx.Node, dim: int | None) -> set[fx.Node]:
    """Readers of the cut ``node`` that need its channels in model k's order (a
    gather): all but the absorbing ones and shape queries."""
    return {r for r in view.readers[node] if r not in view.shape} - absorbing_readers(view, node, dim)


def absorbing_readers(view: GraphView, node: fx.Node, dim: int | None) -> set[fx.Node]:
    """Readers of ``node`` in ``view``'s graph whose weight absorbs the unmerge,
    found by structure (heads of other models are not analyzed): an ungrouped
    conv reading channels on axis 1, or a linear reading them on the last axis,
    called once, with ``node`` as its only input."""
    found = set()
    shape = meta_shape(node)
    for reader in view.readers[node]:
        if reader.op != "call_module" or view.calls[reader.target] > 1 or not reader.args \
                or not isinstance(reader.args[0], fx.Node) or view.resolve(reader.args[0]) is not node \
                or reader.kwargs or any(isinstance(a, fx.Node) for a in reader.args[1:]):
            continue
        m = view.module(reader)
        conv = isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups == 1 and dim == 1
        linear = isinstance(m, nn.Linear) and shape is not None and dim == len(shape) - 1
        if conv or linear:
            found.add(reader)
    return found


def absorbing_users(node: fx.Node, analysis: GraphAnalysis) -> set[fx.Node]:
    """Users of ``node`` that read it as the input of a weight layer whose weight
    can absorb the unmerge (a conv/linear called once)."""
    calls: dict[Any, int] = {}
    for n in node.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    found = set()
    lay = analysis.layouts.get(node.name)
    read = analysis.resolved(lay.segments) if isinstance(lay, Layout) else ()
    for user in node.users:
        if user.name not in analysis.consumed or not user.args or user.args[0] is not node:
            continue
        if any(analysis.resolved(segs) != read for _, _, segs in analysis.consumed[user.name]):
            continue  # its weight also reads other spaces (a recurrent layer's own state)
        if any(r.groups > 1 for p, _, _ in analysis.consumed[user.name] for r in analysis.param_roles.get(p, ())):
            continue  # a grouped conv's weight holds one group's inputs: it reads through a gather
        if user.op == "call_module" and calls[user.target] > 1:
            continue
        if user.op != "call_module" and any(isinstance(a, fx.Node) and a.op != "get_attr" and a is not node
                                            for a in user.args[1:3]):
            continue
        found.add(user)
    return found


def _needs_gather(node: fx.Node, analysis: GraphAnalysis) -> bool:
    return bool(set(node.users) - absorbing_users(node, analysis))


def resolve_cut(stop_at: Any, cuts: Sequence[CutPoint]) -> CutPoint:
    """``stop_at`` as a cut's name, a ``CutPoint`` or an int k (the last cut with ``.k <= k``)."""
    if isinstance(stop_at, CutPoint):
        stop_at = stop_at.name
    if isinstance(stop_at, bool):
        raise TypeError("stop_at must be a cut point name, a CutPoint or an int, not a bool")
    if isinstance(stop_at, int):
        m = cuts[0].m
        if not 0 <= stop_at <= m:
            raise ValueError(f"stop_at={stop_at} is out of range: this model has {m} weight layers on its "
                             f"longest path, so stop_at must be in [0, {m}].")
        return [c for c in cuts if c.k <= stop_at][-1]
    for c in cuts:
        if c.name == stop_at:
            return c
    listing = ", ".join(str(c) for c in cuts)
    raise ValueError(f"stop_at={stop_at!r} is not a cut point of this model. Cut points (name (k/m)): {listing}")


def choose_cut(stop_at: Any, cuts: Sequence[CutPoint], common: CommonPart) -> tuple[CutPoint | None, str]:
    """The cut of a merge of aligned models (``cuts``: the shared ones) and why.

    Models that differ after a shared trunk are zipped up to the last cut they
    share unless ``stop_at`` picks an earlier one; a later one is an error.
    """
    if common.full:
        return (None, "") if stop_at is None else (resolve_cut(stop_at, cuts), f"stop_at={stop_at!r}")
    last = cuts[-1]
    if stop_at is None:
        if last.name == INPUT:
            raise ValueError(f"{common.difference}. The models share no cut point before it, so there is "
                             "nothing to merge: fxzip merges models of one architecture, or models that agree "
                             "from the input up to some layer (see fxzip.cut_points(a, x, b)).")
        logger.info("partial zip at %s, the last cut point the models share", last)
        return last, f"the last cut point the models share; {common.difference}"
    name = stop_at.name if isinstance(stop_at, CutPoint) else stop_at
    beyond = (isinstance(name, str) and common.after_common(name)) \
        or (isinstance(name, int) and not isinstance(name, bool) and last.k < name <= last.m)
    if beyond:
        raise ValueError(f"stop_at={name!r} lies beyond the part the models share: {common.difference}. "
                         f"The last cut point they share is {last}.")
    return resolve_cut(stop_at, cuts), f"stop_at={name!r}; {common.difference}"
