"""Assignments: where each model's features go in the merged model.

A matcher returns, per feature space, ``assign[k, i]``: the merged feature that
feature ``i`` of model ``k`` joins. These helpers turn that into sizes and
indices along a tensor axis laid out as ``Segment`` s (``fxzip.layout``), for
every pass that folds, refits or splits weights, and for MuDSC's weight-space
similarity: one definition, below the passes.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .layout import Segment

__all__ = ["merged_features", "cluster_sizes", "merged_length", "axis_index", "axis_counts"]


def merged_features(assign: torch.Tensor) -> int:
    """Features a space keeps after the merge: its size, or more under
    ``merged_width`` (matchers number merged features 0, 1, ... densely)."""
    return int(assign.max()) + 1 if assign.numel() else 0


def cluster_sizes(assign: torch.Tensor) -> torch.Tensor:
    """How many original features (of all models) each merged feature averages:
    the row sums that make M an average."""
    n = merged_features(assign)
    return torch.stack([torch.bincount(a.long(), minlength=n) for a in assign]).sum(0)


def merged_length(segments: Sequence[Segment], assign: Mapping[int, torch.Tensor]) -> int:
    """Elements of an axis laid out as ``segments`` in the merged model."""
    return sum(merged_features(assign[s.space]) * s.inner for s in segments)


def axis_index(segments: Sequence[Segment], assign: Mapping[int, torch.Tensor], k: int) -> torch.Tensor:
    """For an axis laid out as ``segments``, where each element of model ``k`` goes."""
    parts, offset = [], 0
    for seg in segments:
        a = assign[seg.space][k].to(torch.long)
        inner = torch.arange(seg.inner)
        parts.append((offset + a[:, None] * seg.inner + inner[None, :]).reshape(-1))
        offset += merged_features(assign[seg.space]) * seg.inner
    return torch.cat(parts)


def axis_counts(segments: Sequence[Segment], counts: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """``counts`` per merged feature (``cluster_sizes``) spread over an axis laid out as ``segments``."""
    return torch.cat([counts[s.space].repeat_interleave(s.inner) for s in segments])
