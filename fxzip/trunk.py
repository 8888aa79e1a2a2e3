"""The analysis a merge of models that share only a trunk needs.

Why only model 0's common part is analyzed: what follows the shared trunk is
each model's own head, read through its unmerge; its spaces are never matched.
Analyzing it could only hurt: an op fxzip has no rule for, or the model output
(a fixed space) right after the trunk, would block a merge that never touches
them. So the analysis runs on a copy of model 0's graph cut back to the common
part, whose output is whatever the heads read; that output is not a model
output, so it constrains nothing.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch.fx as fx

from .align import CommonPart, common_part, graph_difference
from .analysis import GraphAnalysis, analyze

__all__ = ["analyze_models", "analyze_common"]

logger = logging.getLogger(__name__)

_TRUNK_OUTPUT = "model output"  # the reason the analysis gives spaces its output reads


def analyze_models(gms: Sequence[fx.GraphModule]) -> tuple[CommonPart | None, GraphAnalysis]:
    """``(None, analysis)`` for node-for-node identical graphs (the fast path);
    otherwise the models' common part and the analysis of model 0's share of it
    (its whole graph when the graphs are one architecture)."""
    if graph_difference(gms) is None:
        return None, analyze(gms[0])
    common = common_part(gms)
    if common.full:
        logger.info("the models' graphs differ in names or node order but not in structure: aligned as one "
                    "architecture (model 0's names are kept)")
    else:
        logger.info("the models share %d of model 0's %d nodes from the input; %s", len(common.prefix),
                    len(common.views[0].nodes), common.difference)
    return common, analyze(gms[0]) if common.full else analyze_common(gms[0], common)


def analyze_common(gm: fx.GraphModule, common: CommonPart) -> GraphAnalysis:
    """Analysis of model 0's graph cut back to the common part (same node names)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    kept = [n for n in gm.graph.nodes if n.name in common.prefix]
    for n in kept:
        new = graph.node_copy(n, lambda a: env[a])
        new.meta = dict(n.meta)
        if new.name != n.name:
            raise RuntimeError(f"fxzip internal error: node '{n.name}' renamed to '{new.name}' in the trunk graph")
        env[n] = new
    graph.output(tuple(env[n] for n in kept if _read_after(n, common)))
    analysis = analyze(fx.GraphModule(gm, graph))
    for sp in analysis.spaces:  # the trunk's output is read by heads, not returned: it fixes nothing
        sp.fixed = [why for why in sp.fixed if why != _TRUNK_OUTPUT]
        sp.touches_output = False
    return analysis


def _read_after(node: fx.Node, common: CommonPart) -> bool:
    """Some model reads ``node`` (as data, not only its shape) outside the common part."""
    for k, view in enumerate(common.views):
        mine = common.maps[k].get(node.name)
        if mine is None:
            continue
        for reader in view.readers[view.resolve(mine)]:
            if reader.op == "output" or (reader not in common.images[k] and reader not in view.shape
                                         and view.resolve(reader) not in common.images[k]):
                return True
    return False
