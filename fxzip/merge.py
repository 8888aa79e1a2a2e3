"""``fxzip.merge`` and ``fxzip.calibrate``: the public entry points, each a
list of stages (``fxzip.stages``) run over one state.

Every argument is checked (``MergeOptions.checked``) before any forward pass
over the data, so a mistake costs seconds, not a calibration run.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
import torch.fx as fx
from torch import nn

from . import distributed as _dist
from .calibration import Calibration
from .options import MergeOptions, check_models
from .pipeline import run_stages
from .probes import DEFAULT_PROBES, ProbePolicy, probe_policy
from .stages import CALIBRATE_STAGES, MERGE_STAGES, MergeState

__all__ = ["merge", "calibrate", "Calibration"]


def merge(*models: nn.Module, data: Iterable[Any] | None, method: str = "zipit", alpha: float = 0.3,
          beta: float = 0.125, stop_at: Any = None, reset_bn: bool | None = None, max_batches: int | None = None,
          inputs: Callable[[Any], Any] | None = None, progress: bool = True, weight_similarity: float = 0.5,
          example_inputs: Any = None, seed: int = 0, probes: str | ProbePolicy = DEFAULT_PROBES,
          repair: bool = False, refit: bool | float = False,
          merged_width: float | Mapping[str, float] = 1.0, max_memory: int | None = None,
          cache_dtype: torch.dtype | str | None = None) -> fx.GraphModule:
    """Merge models of one architecture, trained on different tasks, into one.

    Args:
        models: two or more models (any ``nn.Module`` torch.fx can trace), never
            modified. Matched by structure and data flow, not names (timm's and
            torchvision's resnet18 merge fully, under model 0's names). Models
            that differ after a shared trunk (another head) give a partial zip
            at the last cut point they share.
        data: unlabeled calibration batches (a DataLoader, or a list of tensors
            or of (x, y) tuples; a few hundred images suffice), or a
            ``Calibration`` from ``fxzip.calibrate`` to reuse its statistics.
            ``None``: a data-free merge (``"weight_average"``, or ``"mudsc"`` /
            ``"mudsc_permute"`` with ``weight_similarity=1.0``), traced on
            ``example_inputs``. Under ``torch.distributed``: this rank's shard,
            unshuffled and unpadded; every rank returns the same model
            (``fxzip.distributed``).
        method: "zipit", "permute", "weight_average" (or a registered matcher),
            or MuDSC's dual-space matching over zipit ("mudsc") or permute
            ("mudsc_permute").
        alpha, beta: zipit's repeated-matching factor and within-model budget.
        stop_at: partial zip at a cut point (its name, a ``CutPoint``, or k: the
            last cut with at most k layers zipped; 0 zips nothing); the result
            returns one output per model (``fxzip.cut_points``).
        reset_bn: recompute batch-norm statistics on ``data`` (default: when there
            is data; else they are merged like the weights). A partial zip's
            norms that no merged weight feeds keep their model's statistics.
        max_batches: use at most this many batches of ``data`` (per rank).
        inputs: picks the model input out of a batch, e.g. ``lambda b: b["image"]``.
        weight_similarity: MuDSC's balance ``w * S_weights + (1 - w) * S_activations``.
        example_inputs: an input batch for tracing when ``data`` is None (timm
            models with a declared input size need none).
        seed: seeds MuDSC's order of re-matching spaces.
        probes: where each space is observed (``fxzip.probes``): "all", "last",
            "before_reduce", combinations, or a ``ProbePolicy``; a
            ``Calibration`` passed as ``data`` must have been made with it.
        repair: REPAIR variance repair of full zips, folded into the layers
            (``fxzip.passes.repair``; for GroupNorm, LayerNorm, norm-free nets
            and transformers, where the norm reset does not do it).
        refit: closed-form least-squares refit of every weight layer to the
            matched average of the originals' outputs, on the merged model's own
            inputs (``fxzip.passes.refit``); ``True`` or a ridge factor. A
            partial zip's trunk is refit before the split, each head after it.
            Runs before ``repair`` and the norm reset. Both read the data once
            (``fxzip.passes.sequential``) and cache activations.
        max_memory: bytes of cached activations the refit and the repair may
            hold; the rest is spilled to disk and read back bit for bit (the
            result does not change; ``report.details["refit"]["memory"]``
            gives the peak held). ``None``: no bound.
        cache_dtype: keep those cached activations in ``torch.float16`` or
            ``torch.bfloat16`` (opt-in: half the memory of float32, but the
            refit and repair then see rounded inputs; the largest relative
            rounding is ``report.details["refit"]["memory"]["rounding_rel_bound"]``).
            ``None`` (the default): their own dtype, exact.
        merged_width: merged features per space as a multiple of one model's
            width (``fxzip.widths``): 1.0 as the papers merge, N the ensemble
            side by side; in between the least similar features stay apart. A
            dict maps report space names to factors. The result then no longer
            loads into the original class (``fxzip.save`` exports a program).

    Returns:
        Full zip: a ``GraphModule`` with the architecture's nodes and parameter
        shapes (its ``state_dict`` loads into a fresh model). Partial zip: a
        ``GraphModule`` with submodules ``trunk`` and ``head0..headN-1``.
        ``result.meta["fxzip"]`` is a ``MergeReport`` (``.cut`` and
        ``.cut_reason`` say where a partial zip was cut and why; ``.details``
        what the refit and repair cost).
    """
    # several processes: this rank's data is its shard; ranks must agree on everything else
    data = _dist.check_ranks(models, data, {k: v for k, v in locals().items() if k not in _PER_RANK})
    options = MergeOptions.checked(
        models, data, method=method, alpha=alpha, beta=beta, stop_at=stop_at, reset_bn=reset_bn,
        weight_similarity=weight_similarity, example_inputs=example_inputs, seed=seed, probes=probes, repair=repair,
        refit=refit, merged_width=merged_width, progress=progress and _dist.is_main(), max_memory=max_memory,
        cache_dtype=cache_dtype)
    state = MergeState(models, options, data, max_batches, inputs, example_inputs)
    if isinstance(data, Calibration):  # its models are traced and analysed, its statistics maybe observed
        state.calibration = data.reused_for(models, options.probes)
        state.seconds = dict(state.calibration.seconds)
    return run_stages(MERGE_STAGES, state).graph_module


_PER_RANK = ("models", "data", "max_batches", "inputs", "progress", "example_inputs", "max_memory")
"""merge's arguments that may differ between ranks (the rest must agree)."""


def calibrate(*models: nn.Module, data: Iterable[Any], max_batches: int | None = None,
              inputs: Callable[[Any], Any] | None = None, progress: bool = True,
              probes: str | ProbePolicy = DEFAULT_PROBES) -> Calibration:
    """Trace, analyze and calibrate once; then ``merge(*models, data=calibration, ...)``
    as often as you like (the hyperparameter grid of the papers costs one pass).
    ``probes``: the probe policy (see ``merge``); merges of this calibration use it.
    Under ``torch.distributed`` ``data`` is this rank's shard (see ``merge``)."""
    data = _dist.check_ranks(models, data, {"probes": probes}, "fxzip.calibrate")
    check_models(models)
    options = MergeOptions(probes=probe_policy(probes), progress=progress and _dist.is_main())
    state = run_stages(CALIBRATE_STAGES, MergeState(models, options, data, max_batches, inputs))
    state.calibration.seconds.update(state.seconds)
    return state.calibration
