"""``merge``'s options, checked before any work: a mistake costs seconds, not a calibration run.

``MergeOptions.checked`` validates every argument of ``fxzip.merge`` (and the
models themselves: count, devices, NaN weights) and turns them into the settled
values the stages read: the matcher object, the probe policy, the effective
``reset_bn``, the refit's ridge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from .align import architecture_difference
from .calibration import device_dtype
from .matching import MATCHERS, Matcher, get_matcher
from .passes.refit import DEFAULT_RIDGE
from .passes.sequential import LOW_PRECISION
from .probes import DEFAULT_PROBES, PROBE_POLICIES, ProbePolicy, probe_policy
from .trace import check_model, default_example

__all__ = ["MergeOptions", "DUAL_SPACE", "check_models", "check_finite", "check_same_architecture"]

DUAL_SPACE = {"mudsc": "zipit", "mudsc_permute": "permute"}
"""MuDSC methods and the matcher each re-runs on the blended similarity."""


@dataclass(frozen=True)
class MergeOptions:
    """The settled options of one merge (see ``fxzip.merge`` for each)."""

    method: str = "zipit"
    matcher: Matcher | None = None
    alpha: float = 0.3
    beta: float = 0.125
    stop_at: Any = None
    reset_bn: bool = True
    weight_similarity: float = 0.5
    seed: int = 0
    probes: ProbePolicy = PROBE_POLICIES[DEFAULT_PROBES]
    repair: bool = False
    ridge: float | None = None
    """The refit's ridge factor; ``None``: no refit."""
    merged_width: float | Mapping[str, float] = 1.0
    progress: bool = True
    data_free: bool = False
    max_memory: int | None = None
    """Bytes of cached activations the refit and the repair may hold; ``None``: no bound."""
    cache_dtype: torch.dtype | None = None
    """The dtype the refit and the repair keep cached activations in (opt-in
    float16 / bfloat16; ``None``: their own, exact)."""

    @property
    def dual_space(self) -> bool:
        return self.method in DUAL_SPACE

    @property
    def needs_activations(self) -> bool:
        """Whether the matcher compares features by their activations (and so
        needs the calibration pass)."""
        return self.method != "weight_average" and not (self.dual_space and self.weight_similarity == 1.0)

    @classmethod
    def checked(cls, models: Sequence[nn.Module], data: Any, *, method: str, alpha: float, beta: float,
                stop_at: Any, reset_bn: bool | None, weight_similarity: float, example_inputs: Any, seed: int,
                probes: Any, repair: bool, refit: bool | float, merged_width: float | Mapping[str, float],
                progress: bool, max_memory: int | None = None,
                cache_dtype: "torch.dtype | str | None" = None) -> "MergeOptions":
        """Validate ``merge``'s arguments, in the order a user would fix them;
        raise ``ValueError`` naming the argument and the fix."""
        matcher = check_models(models, method, alpha, beta)
        _check_width_arg(merged_width, method, len(models))
        policy = probe_policy(probes)
        if repair and data is None:
            raise ValueError("repair=True measures the merged features on data; pass data=..., or repair=False for "
                             "a data-free merge.")
        if refit is not False and data is None:
            raise ValueError("refit fits the merged weights on data; pass data=..., or refit=False for a data-free "
                             "merge.")
        ridge = DEFAULT_RIDGE if refit is True else float(refit) if refit is not False else None
        if ridge is not None and not ridge > 0:
            raise ValueError(f"refit must be True or a positive ridge factor, got {refit!r}")
        if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, int)
                                       or max_memory < 0):
            raise ValueError(f"max_memory must be a number of bytes >= 0 (or None for no bound), got {max_memory!r}")
        cache = check_cache_dtype(cache_dtype)
        reset = _check_data_free(models, data, method, weight_similarity, reset_bn, example_inputs)
        return cls(method, matcher, alpha, beta, stop_at, reset, weight_similarity, seed, policy, repair, ridge,
                   merged_width, progress, data is None, max_memory, cache)


def check_cache_dtype(dtype: "torch.dtype | str | None") -> torch.dtype | None:
    """``cache_dtype`` as a torch dtype: None, or float16 / bfloat16 given as a
    dtype or its name ("float16", "fp16", "half", "bfloat16", "bf16")."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in LOW_PRECISION:
        return dtype
    names = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in names:
        return names[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"cache_dtype keeps the refit's and the repair's cached activations in a lower precision: "
                     f"torch.float16 or torch.bfloat16 (or None, the default: their own dtype, exact), got {dtype!r}")


def check_models(models: Sequence[nn.Module], method: str = "weight_average", alpha: float = 0.0,
                 beta: float = 0.0) -> Matcher:
    """The models (at least two, real modules, finite, on one device and dtype)
    and the method with its alpha/beta; returns the method's matcher."""
    if len(models) < 2:
        raise ValueError(f"merge needs at least two models, got {len(models)}")
    for k, m in enumerate(models):
        check_model(m, f"model {k}")  # a state_dict or a torch.compile wrapper: says what to pass instead
    for k, m in enumerate(models):
        check_finite(m, f"model {k}")  # NaN would only fail later, deep in the matcher
    devices = [device_dtype(m) for m in models]
    if len(set(devices)) > 1:
        raise ValueError(
            "models live on different devices/dtypes: "
            + ", ".join(f"model {k}: {d} {t}" for k, (d, t) in enumerate(devices))
            + ". Move them to one, e.g. model.to('cpu', torch.float32), before merging."
        )
    if method not in MATCHERS and method not in DUAL_SPACE:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(MATCHERS) + sorted(DUAL_SPACE)}")
    matcher = get_matcher(DUAL_SPACE.get(method, method))
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if method in ("zipit", "zipit_reference", "mudsc") and alpha == 0 and len(models) > 2:
        raise ValueError("zipit with alpha=0 never lets a merged cluster re-enter the pool, so only pairs "
                         f"form; merging {len(models)} models needs alpha > 0.")
    return matcher


NORM_STATISTICS = ("running_mean", "running_var")
"""Buffers that must be finite like parameters (a diverged batch norm)."""


def check_finite(model: nn.Module, who: str = "the model") -> None:
    """Raise ``ValueError`` naming the first tensor of ``model`` that holds NaN or
    Inf: every parameter, and every floating buffer, except that a buffer other
    than a norm's running statistics may hold -Inf (attention masks and
    padding biases use -Inf on purpose; NaN and +Inf are never meant). Costs one
    sum per tensor (NaN and Inf propagate into it), and an exact count only when
    the sum is not finite."""
    tensors = [("parameter", n, t) for n, t in model.named_parameters()]
    tensors += [("buffer", n, t) for n, t in model.named_buffers()]
    for kind, name, t in tensors:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        data = t.detach()
        total = data.sum(dtype=torch.float32) if data.element_size() < 4 else data.sum()
        if bool(torch.isfinite(total)):
            continue
        nan, pos, neg = int(torch.isnan(data).sum()), int(torch.isposinf(data).sum()), int(torch.isneginf(data).sum())
        if kind == "buffer" and not name.endswith(NORM_STATISTICS) and nan == 0 and pos == 0:
            continue  # -Inf only: a mask
        if nan + pos + neg == 0:
            continue  # the sum overflowed; every value is finite
        what = ", ".join(f"{n} {label}" for n, label in ((nan, "NaN"), (pos, "+Inf"), (neg, "-Inf")) if n)
        raise ValueError(f"{who}'s {kind} {name!r} holds {what} (of {data.numel()} values): the model diverged "
                         "in training or its weights were corrupted when saved; use a checkpoint from before the "
                         "divergence, or re-export it")


def check_same_architecture(gms: Sequence[fx.GraphModule]) -> None:
    """Raise ``ValueError`` unless the traced models are one architecture,
    compared by structure and data flow, not by names (``fxzip.align``: timm's
    and torchvision's resnet18 are one). The message names the first difference
    in the user's terms: module path, type, configuration and shapes. ``merge``
    itself also accepts models that differ after a shared trunk (a partial zip)."""
    difference = architecture_difference(gms)
    if difference is not None:
        raise ValueError(difference)


def _check_data_free(models, data, method: str, weight_similarity: float, reset_bn: bool | None,
                     example_inputs: Any) -> bool:
    """Validate the data-free options before any work; returns the effective reset_bn."""
    if not 0.0 <= weight_similarity <= 1.0:
        raise ValueError(f"weight_similarity must be in [0, 1], got {weight_similarity}")
    if data is not None:
        return True if reset_bn is None else reset_bn
    if reset_bn:
        raise ValueError("reset_bn=True needs data to recompute the norm statistics on; with data=None they "
                         "are merged like the weights. Pass data=..., or reset_bn=False.")
    if method in DUAL_SPACE and weight_similarity != 1.0:
        raise ValueError(f"data=None leaves method={method!r} no activations to compare; a data-free MuDSC merge "
                         "matches on weights alone: pass weight_similarity=1.0 (or give data).")
    if method not in DUAL_SPACE and method != "weight_average":
        raise ValueError(f"method={method!r} matches features by their activations and needs data; for a data-free "
                         "merge use method='mudsc' (or 'mudsc_permute') with weight_similarity=1.0.")
    if example_inputs is None:
        default_example(models[0])  # raises, naming example_inputs, when the model declares no input size
    return False


def _check_width_arg(merged_width: Any, method: str, n_models: int) -> None:
    """merged_width's type and range, before any work (per-space names are
    checked once the model is traced)."""
    values = list(merged_width.values()) if isinstance(merged_width, Mapping) else [merged_width]
    for w in values:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 1.0 <= float(w) <= n_models:
            raise ValueError(f"merged_width must be a number from 1.0 (one model's width) to {n_models} (the "
                             f"{n_models} models side by side), or a dict of such numbers, got {w!r}")
    if any(float(w) > 1.0 for w in values) and method == "weight_average":
        raise ValueError("weight_average has no similarity to choose which features to keep apart; use "
                         "merged_width=1.0 with it, or method='zipit' / 'permute' to widen")
