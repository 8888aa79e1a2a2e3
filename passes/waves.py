"""The wave schedule of the passes that fit a merged model layer by layer
(``refit(schedule="waves")``, ``repair(schedule="waves")``): a module
computing only some nodes, a no-grad loop over batches, and the depth levels
that group layers into waves (one read of the data each). The default
schedule of both reads the data once instead (``sequential.py``).

Why truncate: a wave of sites only needs the activations up to its deepest
node, and the passes run one wave per layer depth, so computing the rest of
the network every time would double their cost on a chain network.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.fx as fx

__all__ = ["truncated", "run_batches", "depth_levels"]


def truncated(gm: fx.GraphModule, names: Sequence[str]) -> fx.GraphModule:
    """A module returning the tuple of the named nodes' values, computing
    nothing after them."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    by_name: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        env[node] = graph.node_copy(node, lambda a: env[a])
        by_name[node.name] = env[node]
    graph.output(tuple(by_name[n] for n in names))
    out = fx.GraphModule(gm, graph)
    out.graph.eliminate_dead_code()
    out.recompile()
    return out


def run_batches(module: Callable, batches: Iterable[tuple]) -> Iterable[tuple]:
    with torch.no_grad():
        for batch in batches:
            yield module(*batch)


def depth_levels(gm: fx.GraphModule, marked: set[str]) -> dict[str, int]:
    """For every node, the most ``marked`` nodes on any path into it (itself
    included): a node of level l depends only on marked nodes of level < l
    through its inputs, so marked nodes of one input level can be fitted in
    one pass."""
    depth: dict[str, int] = {}
    for node in gm.graph.nodes:  # topological order
        d = max((depth[a.name] for a in node.all_input_nodes), default=0)
        depth[node.name] = d + 1 if node.name in marked else d
    return depth
