"""Insert ``SpaceObserver`` modules at every probe point of every mergeable
space of a side-by-side graph (the "prepare" step of prepare/calibrate/convert)."""
from __future__ import annotations

from typing import Sequence

import torch.fx as fx
from torch import nn

from fxzip.analysis import GraphAnalysis
from fxzip.passes.real_tokens import maskable_nodes
from fxzip.probes import DEFAULT_PROBES, ProbePolicy, probe_policy, select_probes
from fxzip.stats import SpaceObserver, Workspace

__all__ = ["insert_observers", "OBSERVERS"]

OBSERVERS = "fxzip_observers"


def insert_observers(gm: fx.GraphModule, node_maps: Sequence[dict[str, fx.Node]],
                     analysis: GraphAnalysis, spaces: Sequence[int],
                     probes: str | ProbePolicy = DEFAULT_PROBES) -> fx.GraphModule:
    """Adds ``fxzip_observers.s<index>`` and one call per probe point the policy
    ``probes`` selects (``fxzip.probes``), placed right after the last model's
    copy of the probed node. The observers run one at a time and share one
    scratch ``Workspace``."""
    policy = probe_policy(probes)
    n_models = len(node_maps)
    maskable = maskable_nodes(gm.graph)
    holder = nn.Module()
    gm.add_module(OBSERVERS, holder)
    workspace = Workspace()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for index in spaces:
        sp = analysis.spaces[index]
        holder.add_module(f"s{index}", SpaceObserver(n_models, sp.size, workspace))
        for probe, weight in select_probes(sp, policy):
            copies = [m[probe.node] for m in node_maps]
            kwargs = {"dim": probe.dim, "offset": probe.offset}
            if weight != 1.0:
                kwargs["weight"] = weight
            if all(c in maskable for c in copies):
                kwargs["masked"] = True
            # after the last copy to run (with aligned models not always model N-1's)
            with gm.graph.inserting_after(max(copies, key=order.__getitem__)):
                gm.graph.call_module(f"{OBSERVERS}.s{index}", tuple(copies), kwargs)
    gm.graph.lint()
    gm.recompile()
    return gm
