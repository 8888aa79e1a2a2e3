"""Cut points for partial zipping: where a graph can be split into a shared
trunk and one head per model.

A cut is a node that every data path from the model inputs to its output
passes through (a dominator of the output, found with networkx), holding one
whole feature space. ``k`` counts weight layers (conv/linear) on the longest
input -> cut path, which is how the papers count (ResNet-20: m = 20, stage ends
7/20 and 13/20).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import networkx as nx
import torch.fx as fx
from torch import nn

from .analysis import GraphAnalysis, analyze
from .layout import Layout

__all__ = ["CutPoint", "cut_points", "find_cuts", "resolve_cut"]

INPUT = "<input>"


@dataclass(frozen=True)
class CutPoint:
    name: str            # the node whose output the trunk hands to the heads ("<input>": nothing zipped)
    k: int               # weight layers zipped when cutting here
    m: int               # weight layers on the longest input -> output path
    space: int | None    # the feature space of the cut tensor
    dim: int | None      # its channel axis
    needs_gather: bool   # some head reads the cut through an index_select (identity shortcut, norm, ...)

    def __str__(self) -> str:
        return f"{self.name} ({self.k}/{self.m}{', gather' if self.needs_gather else ''})"


def cut_points(model: nn.Module, example_inputs: Any = None) -> list[CutPoint]:
    """All cut points of ``model``, in network order; ``.name`` is accepted as ``stop_at``."""
    from .permute import default_example
    from .trace import trace

    example = default_example(model) if example_inputs is None else example_inputs
    gm = trace(model, example)
    return find_cuts(gm, analyze(gm))


def find_cuts(gm: fx.GraphModule, analysis: GraphAnalysis) -> list[CutPoint]:
    nodes = list(gm.graph.nodes)
    graph = nx.DiGraph()
    source = "\0source"
    graph.add_node(source)
    for n in nodes:
        graph.add_node(n.name)
        for inp in n.all_input_nodes:
            graph.add_edge(inp.name, n.name)
        if n.op == "placeholder" and n.meta.get("tensor_meta") is not None:
            # only inputs that carry data: an optional argument left at None (timm's
            # attn_mask) reaches every attention without being a data path
            graph.add_edge(source, n.name)
    reachable = nx.descendants(graph, source) | {source}
    flow = graph.subgraph(reachable)
    output = next(n for n in reversed(nodes) if n.op == "output")
    layers = set(analysis.layers)
    depth: dict[str, int] = {source: 0}
    for n in nodes:
        if n.name in reachable:
            preds = [depth[p] for p in flow.predecessors(n.name) if p in depth]
            depth[n.name] = (max(preds) if preds else 0) + (n.name in layers)
    m = depth[output.name]
    idom = nx.immediate_dominators(flow, source)
    dominators, cur = set(), output.name
    while cur != source:
        cur = idom[cur]
        dominators.add(cur)
    cuts = [CutPoint(INPUT, 0, m, None, None, False)]
    by_key: dict[tuple[int, int], CutPoint] = {}
    for n in nodes:
        if n.name not in dominators or n.op in ("placeholder", "get_attr"):
            continue
        lay = analysis.layouts.get(n.name)
        if not isinstance(lay, Layout) or not lay.has_channels or len(lay.segments) != 1 \
                or lay.segments[0].inner != 1:
            continue
        space = analysis.space_index(lay.segments[0].space)
        cut = CutPoint(n.name, depth[n.name], m, space, lay.dim, _needs_gather(n, analysis))
        by_key[(cut.k, space)] = cut  # the last node of a run of channel-wise ops wins
    cuts += sorted(by_key.values(), key=lambda c: [x.name for x in nodes].index(c.name))
    return cuts


def absorbing_users(node: fx.Node, analysis: GraphAnalysis) -> set[fx.Node]:
    """Users of ``node`` that read it as the input of a weight layer whose weight
    can absorb the unmerge (a conv/linear called once)."""
    calls: dict[Any, int] = {}
    for n in node.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    found = set()
    for user in node.users:
        if user.name not in analysis.consumed or not user.args or user.args[0] is not node:
            continue
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
