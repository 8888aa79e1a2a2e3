"""The traced models, their analysis, and the per-space statistics observed on data.

A ``Calibration`` is what the capture and calibrate stages of a merge produce;
``fxzip.calibrate`` returns it so that several merges (methods, alpha/beta,
cut points) share one pass over the data.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from . import distributed as _dist
from . import pipeline
from .align import CommonPart
from .analysis import GraphAnalysis
from .data import Batches
from .passes.observe import OBSERVERS, insert_observers
from .passes.side_by_side import side_by_side
from .probes import DEFAULT_PROBES, PROBE_POLICIES, ProbePolicy
from .trace import trace_models
from .trunk import analyze_models

__all__ = ["Calibration", "capture", "device_dtype"]


class Calibration:
    """Traced models, their analysis and (once run) per-space statistics.

    Pass it as ``data`` to ``merge`` to try several methods, alpha/beta values
    or cut points on one set of statistics: calibration runs once.
    """

    def __init__(self, originals: Sequence[nn.Module], models: list[fx.GraphModule], analysis: GraphAnalysis,
                 batches: Batches, seconds: dict[str, float], common: CommonPart | None = None,
                 probes: ProbePolicy = PROBE_POLICIES[DEFAULT_PROBES]):
        self.originals = list(originals)
        self.probes = probes
        self.models, self.analysis, self.batches = models, analysis, batches
        self.common = common  # None: node-for-node identical graphs; else the alignment (fxzip.align)
        self.seconds = seconds
        self.spaces = [sp.index for sp in analysis.spaces if sp.mergeable and sp.probes]
        self.stats: dict = {}
        self.n_batches = self.n_samples = 0

    def run(self, progress: bool = True) -> "Calibration":
        if not self.stats and self.spaces:
            self.stats, self.n_batches, self.n_samples = observe(self.models, self.analysis, self.spaces,
                                                                 self.batches, progress, self.common, self.probes)
        return self

    def reused_for(self, models: Sequence[nn.Module], probes: ProbePolicy | None = None) -> "Calibration":
        if len(models) != len(self.originals) or any(a is not b for a, b in zip(models, self.originals)):
            raise ValueError("this Calibration was computed for other models; pass the same model objects, "
                             "in the same order, as to fxzip.calibrate")
        if probes is not None and probes != self.probes:
            raise ValueError(f"this Calibration observed the models with probes={self.probes.name!r}, not "
                             f"{probes.name!r}; pass probes= to fxzip.calibrate instead (statistics depend on it)")
        return self


def capture(models: Sequence[nn.Module], data: Iterable[Any], max_batches: int | None, inputs: Any,
            probes: ProbePolicy = PROBE_POLICIES[DEFAULT_PROBES]) -> Calibration:
    """Read the first batch, trace every model on it and analyse the traced
    graphs (aligning them unless they are node-for-node identical). Under
    ``torch.distributed`` a failure on one rank is raised on every rank."""
    seconds: dict[str, float] = {}
    with _dist.ranks_agree("reading its data, tracing and analysing the models"):
        batches = Batches(data, max_batches, inputs, models[0])
        with pipeline.timed(seconds, "trace"):
            gms = trace_models(models, batches.example)
        with pipeline.timed(seconds, "analysis"):
            common, analysis = analyze_models(gms)  # aligns the models unless their graphs are identical
    return Calibration(models, gms, analysis, batches, seconds, common, probes)


def observe(gms: Sequence[fx.GraphModule], analysis: GraphAnalysis, spaces: list[int], batches: Batches,
            progress: bool, common: CommonPart | None = None,
            probes: ProbePolicy = PROBE_POLICIES[DEFAULT_PROBES]) -> tuple[dict, int, int]:
    """One pass over the data through the models side by side, observers at
    every probe point of ``spaces``; returns each space's statistics and the
    batches and samples seen (summed over ranks under ``torch.distributed``)."""
    joint, node_maps = side_by_side(gms, common)
    insert_observers(joint, node_maps, analysis, spaces, probes)
    device, _ = device_dtype(gms[0])
    joint.get_submodule(OBSERVERS).to(device)  # statistics accumulate where the features are (GPU models)
    _dist.agree_shifts(joint.get_submodule(OBSERVERS))  # several processes: one shift, rank 0's
    joint.eval()
    observers = list(joint.get_submodule(OBSERVERS).children())
    workspace = observers[0].workspace if observers else None  # shared by all of them
    n_batches = n_samples = 0
    with torch.no_grad():
        for batch in tqdm(batches, total=len(batches) or None, desc="fxzip calibrate", disable=not progress,
                          leave=False):
            if workspace is not None:  # statistics over real tokens only (fxzip.keyword_inputs)
                mask = batches.padding_mask(batch)
                workspace.real_tokens = None if mask is None else mask.to(device)
            joint(*batch)
            n_batches += 1
            n_samples += int(batch[0].shape[0]) if batch and hasattr(batch[0], "shape") else 0
    holder = joint.get_submodule(OBSERVERS)
    n_batches, n_samples = _dist.reduce_observers(holder, n_batches, n_samples)  # sums of every rank, once
    return {i: holder.get_submodule(f"s{i}").stats() for i in spaces}, n_batches, n_samples


def device_dtype(m: nn.Module) -> tuple[str, str]:
    """The device and dtype of a model's first floating tensor."""
    for t in list(m.parameters()) + list(m.buffers()):
        if t.is_floating_point():
            return str(t.device), str(t.dtype)
    return "cpu", "none"


