"""``fxzip inspect``: what fxzip sees in a model before any data.

The feature spaces of the analysis (which layers write and read each one, its
size, groups and ties, whether it is fixed and why), the cut points of a
partial zip with their depth ``k`` and cost, or, for a model fxzip cannot merge,
the node and the reason. Costs are multiply-adds per input (batch of one)
counted node by node with torch's flop counter, so a cut's trunk and head add
up to the whole model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["Inspection", "inspect_model", "inspect_graph", "node_macs"]


@dataclass
class Inspection:
    model: str
    input_size: list[int]
    spaces: list[dict[str, Any]] = field(default_factory=list)
    cuts: list[dict[str, Any]] = field(default_factory=list)
    macs: int = 0
    params: int = 0
    layers: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        from ..report import versions

        return {"model": self.model, "input_size": self.input_size, "macs": self.macs, "params": self.params,
                "weight_layers": self.layers, "error": self.error, "spaces": self.spaces, "cuts": self.cuts,
                "versions": versions()}

    def text(self) -> str:
        size = "x".join(map(str, self.input_size))
        lines = [f"{self.model} at {size}: {self.params / 1e6:.2f}M parameters, {self.macs / 1e6:.2f}M MACs "
                 "per input" + (f", {self.layers} weight layers" if self.error is None else "")]
        if self.error is not None:
            return "\n".join(lines + ["", f"fxzip cannot merge this model: {self.error}"])
        merged = sum(1 for s in self.spaces if s["mergeable"])
        lines += ["", f"feature spaces: {len(self.spaces)} ({merged} matched, {len(self.spaces) - merged} kept "
                      "as they are)"]
        for s in self.spaces:
            shape = f"{s['size']} channels" + (f" in {s['groups']} groups of {s['size'] // s['groups']}"
                                               if s["groups"] > 1 else "")
            extra = []
            if s["tied_with"]:
                extra.append(f"tied with {', '.join(map(str, s['tied_with']))}")
            if s["bilinear"]:
                extra.append("q.k: cross-model matches only")
            if s["rigid"]:
                extra.append("rigid: units keep their place in a group")
            status = "matched" if s["mergeable"] else f"fixed ({s['fixed']})"
            lines.append(f"  [{s['index']}] {s['label']}: {shape}, {status}" + (f"; {'; '.join(extra)}" if extra else ""))
            lines.append(f"      written by {_listing(s['producers'])}")
            if s["consumers"]:
                lines.append(f"      read by {_listing(s['consumers'])}")
        depth = self.cuts[0]["m"] if self.cuts else None
        lines += ["", "cut points (stop_at= / --stop-at; MACs per input for 2 models: shared trunk + 2 heads)"
                  + (f"\n  k/{depth}: weight layers zipped, counted along the longest input-to-output path "
                     f"({depth} of the {self.layers}; side branches such as downsample shortcuts are not on it)"
                     if depth is not None else "")]
        head = ["k", "name", "trunk MACs", "head MACs", "2-model total", "gather"]
        rows = [[f"{c['k']}/{c['m']}", c["name"], f"{c['trunk_macs'] / 1e6:.2f}M", f"{c['head_macs'] / 1e6:.2f}M",
                 f"{(c['trunk_macs'] + 2 * c['head_macs']) / 1e6:.2f}M", "yes" if c["needs_gather"] else ""]
                for c in self.cuts]
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
        lines += ["", "gather: some layer after the cut reads it through an index (a shortcut or a norm), "
                      "not a weight that absorbs the unmerge"]
        return "\n".join(lines)


def _listing(names: list[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def node_macs(gm: fx.GraphModule, example: tuple) -> dict[str, int]:
    """Multiply-adds of every node of ``gm`` on ``example`` (half of torch's flop count)."""
    macs: dict[str, int] = {}
    counter = FlopCounterMode(display=False)

    class Counting(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            before = counter.get_total_flops()
            out = super().run_node(n)
            macs[n.name] = (counter.get_total_flops() - before) // 2
            return out

    with torch.no_grad(), counter:
        Counting(gm).run(*example)
    return macs


def inspect_graph(name: str, gm: fx.GraphModule, example: tuple) -> Inspection:
    """The analysis and cut points of a traced model (``example``: a batch of one)."""
    from ..analysis import analyze
    from ..cuts import INPUT, find_cuts
    from ..naming import space_label

    found = Inspection(name, list(example[0].shape[1:]) if example and hasattr(example[0], "shape") else [])
    found.params = sum(p.numel() for p in gm.parameters())
    macs = node_macs(gm, example)
    found.macs = sum(macs.values())
    try:
        analysis = analyze(gm)
    except ValueError as exc:  # AnalysisError: names the node and the reason
        found.error = str(exc)
        return found
    found.layers = len(analysis.layers)
    paths = {n.name: n.target for n in gm.graph.nodes if n.op == "call_module"}
    where = lambda names: [paths.get(n, n) for n in names]  # module paths where there is a module
    for sp in analysis.spaces:
        fixed = ("model output" if sp.touches_output else "; ".join(sorted(set(sp.fixed))) if sp.fixed else "")
        found.spaces.append({
            "index": sp.index, "name": paths.get(sp.name, sp.name), "label": space_label(sp), "size": sp.size, "groups": sp.groups,
            "tied_with": [i for i in sp.tie if i != sp.index], "bilinear": sp.bilinear, "rigid": sp.rigid,
            "mergeable": sp.mergeable, "fixed": fixed, "producers": where(sp.producers),
            "consumers": where(sp.consumers), "params": len(sp.params), "probes": len(sp.probes),
        })
    inputs = {i.name: [i] for i in gm.graph.nodes}
    for n in gm.graph.nodes:
        inputs[n.name] = n.all_input_nodes
    for cut in find_cuts(gm, analysis):
        trunk = _ancestors(cut.name, inputs) if cut.name != INPUT else set()
        trunk_macs = sum(macs.get(n, 0) for n in trunk)
        found.cuts.append({"name": cut.name, "k": cut.k, "m": cut.m, "needs_gather": cut.needs_gather,
                           "space": cut.space, "trunk_macs": trunk_macs, "head_macs": found.macs - trunk_macs})
    return found


def _ancestors(name: str, inputs: dict[str, list[fx.Node]]) -> set[str]:
    seen, todo = {name}, [name]
    while todo:
        for inp in inputs[todo.pop()]:
            if inp.name not in seen:
                seen.add(inp.name)
                todo.append(inp.name)
    return seen


def inspect_model(model: str, img_size: int | None = None, num_classes: int | None = None,
                  checkpoint: str | None = None) -> Inspection:
    """Build ``model`` (timm name or ``module:factory``; weights from ``checkpoint``
    when given), trace it at its data config's input size and inspect it."""
    from ..model_spec import ModelSpec, build_model, load_into
    from ..trace import trace
    from .checkpoints import read_state_dict
    from .images import data_config

    state = None
    if checkpoint is not None:
        state, _ = read_state_dict(checkpoint)
        if num_classes is None and ":" not in model:
            import timm.models

            names = timm.models.get_pretrained_cfg_value(model, "classifier") or ()
            names = [names] if isinstance(names, str) else list(names)
            num_classes = next((int(state[f"{c}.weight"].shape[0]) for c in names if f"{c}.weight" in state), None)
    net = build_model(ModelSpec(model, num_classes, img_size))
    if state is not None:
        load_into(net, state, checkpoint)
    size = data_config(net, img_size)["input_size"]
    example = (torch.randn(2, *size),)  # shapes for tracing; costs are counted on a batch of one
    try:
        gm = trace(net, example)
    except ValueError as exc:  # TraceError
        found = Inspection(model, list(size), params=sum(p.numel() for p in net.parameters()))
        found.error = str(exc)
        return found
    return inspect_graph(model, gm, (example[0][:1],))


def plot_cuts(found: Inspection, n_models: int, path: Any, chosen: str | None = None) -> bool:
    """``cuts.png``: multiply-adds per input of an ``n_models`` partial zip at every cut
    (shared trunk + one head per model) against the layers zipped, with one model and
    the ensemble for reference. False (nothing written) when the model has no cuts."""
    from matplotlib.figure import Figure
    if not found.cuts:
        return False
    ks = [c["k"] for c in found.cuts]
    total = [(c["trunk_macs"] + n_models * c["head_macs"]) / 1e6 for c in found.cuts]
    fig = Figure(figsize=(6.5, 4.0))
    ax = fig.subplots()
    ax.plot(ks, total, "o-", label=f"partial zip of {n_models} models")
    ax.axhline(found.macs * n_models / 1e6, color="0.5", linestyle="--", label=f"ensemble of {n_models}")
    ax.axhline(found.macs / 1e6, color="0.3", linestyle=":", label="one model (a full zip)")
    for c, t in zip(found.cuts, total):
        if c["name"] == chosen:
            ax.plot([c["k"]], [t], "o", color="tab:red", markersize=10, label=f"this merge: {c['name']}")
    ax.set_xlabel("weight layers zipped (k)")
    ax.set_ylabel("MACs per input (M)")
    ax.set_title(f"{found.model}: cost of a partial zip at each cut point")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True
