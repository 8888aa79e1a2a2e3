"""Probe policies: which tensors of a feature space a calibration observes.

A space is often visible at several places: a residual stream at the output of
every block of its stage, a classifier's input both as the feature map and as
its global average. The analysis lists every *probe point* (a tensor of the
space that something other than a channel-wise op reads, in graph order, each
with the tensor it was reduced from when a pool, token mean or class-token
select made it, ``analysis.Probe.unreduced``). A policy picks among them:

``points``
    ``"all"``: every probe point pools its samples into one statistic (the
    stream as every block sees it). ``"last"``: only the last probed tensor in
    graph order: for a residual stream, where it leaves its stage (the input of
    the next stage, or the head's input), as the ZipIt! reference graphs probe.
``before_reduce``
    Probe a sample-reducing reader's input instead of its output: the feature
    map before global pooling (H x W samples per image instead of one), all
    tokens instead of the class token. The correlation of one pooled value per
    image is a much noisier estimate than that of every pixel.
``per_point``
    With several points, weight each equally (every sample of a point counts
    ``1 / samples of that point``) instead of every sample equally, so a large
    early feature map does not outvote the later ones.

Policies are plain data; the presets in ``PROBE_POLICIES`` are what
``fxzip.merge(..., probes=...)`` and ``fxzip.calibrate`` accept by name.

``"reference"`` is where the reference codes read a space (ZipIt!'s graphs,
gstoica27/ZipIt, and MuDSC's ``get_resnet_perm``, zju-vipa/training_free_model_merging):
a stream once, where it leaves its stage, and the last stream as the map before
global pooling, i.e. ``points="last"`` with ``before_reduce``. With it fxzip's zip
reproduces the official ZipIt! on the reference pair (issue 25). Its old name
``"last_before_reduce"`` is kept as an alias (``PROBE_ALIASES``): the same
``ProbePolicy`` object, so either name gives bit-identical merges.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from .analysis import FeatureSpace, Probe

__all__ = ["ProbePolicy", "PROBE_POLICIES", "PROBE_ALIASES", "DEFAULT_PROBES", "probe_policy", "select_probes"]


@dataclass(frozen=True)
class ProbePolicy:
    points: str = "all"
    before_reduce: bool = False
    per_point: bool = False

    def __post_init__(self) -> None:
        if self.points not in ("all", "last"):
            raise ValueError(f"ProbePolicy.points must be 'all' or 'last', got {self.points!r}")

    @property
    def name(self) -> str:
        """The preset's name (its current name, never an alias), else the policy's repr."""
        for key, policy in PROBE_POLICIES.items():
            if policy == self:
                return key
        return repr(self)


PROBE_POLICIES: dict[str, ProbePolicy] = {
    "all": ProbePolicy("all"),
    "all_per_point": ProbePolicy("all", per_point=True),
    "last": ProbePolicy("last"),
    "before_reduce": ProbePolicy("all", before_reduce=True),
    "before_reduce_per_point": ProbePolicy("all", before_reduce=True, per_point=True),
    "reference": ProbePolicy("last", before_reduce=True),
}

PROBE_ALIASES: dict[str, str] = {"last_before_reduce": "reference"}
"""Old preset names and the name each now has; ``PROBE_POLICIES`` holds them too
(the same object), so code and command lines written with the old name keep working."""
PROBE_POLICIES.update({old: PROBE_POLICIES[new] for old, new in PROBE_ALIASES.items()})

DEFAULT_PROBES = "all"
"""The default policy (chosen by ``benchmarks/probe_policy.py``; see its results)."""

ProbesArg = Union[str, ProbePolicy]


def probe_policy(probes: ProbesArg) -> ProbePolicy:
    """``probes`` as a ``ProbePolicy`` (a preset name or a policy)."""
    if isinstance(probes, ProbePolicy):
        return probes
    if isinstance(probes, str) and probes in PROBE_POLICIES:
        return PROBE_POLICIES[probes]
    raise ValueError(f"unknown probes={probes!r}; choose one of {sorted(PROBE_POLICIES)} "
                     "or pass an fxzip.ProbePolicy(points='all'|'last', before_reduce=..., per_point=...)")


def select_probes(space: FeatureSpace, policy: ProbePolicy) -> list[tuple[Probe, float]]:
    """The probe points ``policy`` observes for ``space``, each with the weight
    of one of its samples (1.0 unless ``per_point``). Points that become one
    tensor under ``before_reduce`` (a map read by both a pool and a conv) are
    observed once."""
    points: list[Probe] = []
    for probe in space.probes:
        chosen = probe.unreduced if policy.before_reduce and probe.unreduced is not None else probe
        key = (chosen.node, chosen.dim, chosen.offset)
        if all((p.node, p.dim, p.offset) != key for p in points):
            points.append(chosen)
    if policy.points == "last" and points:
        # every part of the last probed tensor (q and k of one q.k space are two
        # parts of one qkv output)
        points = [p for p in points if p.node == points[-1].node]
    if not policy.per_point or len(points) < 2:
        return [(p, 1.0) for p in points]
    fewest = min(p.samples for p in points)
    if fewest <= 0:
        return [(p, 1.0) for p in points]
    return [(p, fewest / p.samples) for p in points]
