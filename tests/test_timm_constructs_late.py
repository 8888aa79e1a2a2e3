"""Constructs the analysis used to refuse, each in a tiny module with random
weights, merged exactly: a self-merge is the identity, a permuted copy
computes the same function and merges back (``assert_merges_exactly``).

Depthwise convolutions with a channel multiplier (``Conv2d(C, k * C, groups=C)``)
tie input channel c to the c-th group of k outputs. Where the same space is
also grouped coarser (a grouped conv on the same input, a GroupNorm or a
grouped residual on the output, a second multiplier conv reading the
output), the coarser count is kept and every finer group keeps its place
inside it (the spaces become rigid: groups move as wholes). A dense layer
writing the multiplier's output space (a residual branch, a concatenation)
adds no group structure: those were already accepted and are the controls.
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_merges_exactly, batches, prepared
from torch import nn

import fxzip

pytestmark = pytest.mark.usefixtures("one_thread")

C, K = 4, 2  # multiplier conv: C input channels, K outputs per input channel


class Multiplier(nn.Module):
    """A depthwise conv with channel multiplier K in the company of ``mode``."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.dw = nn.Conv2d(C, K * C, 3, padding=1, groups=C)
        if mode in ("dense_add", "grouped_input", "group_norm", "dense_cat"):
            self.res = nn.Conv2d(C, K * C, 1)
        if mode == "grouped_input":
            self.grouped = nn.Conv2d(C, C, 3, padding=1, groups=2)
        if mode == "grouped_residual":
            self.res = nn.Conv2d(C, K * C, 1, groups=2)
        if mode == "group_norm":
            self.norm = nn.GroupNorm(2, K * C)
        if mode == "chained":
            self.dw2 = nn.Conv2d(K * C, 2 * K * C, 3, padding=1, groups=K * C)
            self.res = nn.Conv2d(C, 2 * K * C, 1)
        width = {"dense_cat": 2 * K * C, "chained": 2 * K * C}.get(mode, K * C)
        self.pw = nn.Conv2d(width, 6, 1)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        if self.mode == "grouped_input":
            x = torch.relu(self.grouped(x))
        if self.mode == "dense_cat":
            y = torch.cat([self.dw(x), self.res(x)], 1)
        elif self.mode == "chained":
            y = self.dw2(torch.relu(self.dw(x))) + self.res(x)
        else:
            y = self.dw(x) + self.res(x)
        if self.mode == "group_norm":
            y = self.norm(y)
        return self.head(self.pw(torch.relu(y)).mean((2, 3)))


def _spaces(model: nn.Module, x: torch.Tensor) -> dict[str, fxzip.analysis.FeatureSpace]:
    """Every space by each of its producers (a layer may produce several: a fused k/v)."""
    analysis = fxzip.analyze(fxzip.trace(model, x))
    return {p: sp for sp in analysis.spaces for p in reversed(sp.producers)}


@pytest.mark.parametrize("mode", ["dense_add", "dense_cat"])
def test_multiplier_conv_with_a_dense_writer_control(mode):
    """Controls: a dense layer writing the multiplier's output space adds no
    groups; the output keeps C groups of K, tied to the C input channels."""
    data = batches((8, 3, 8, 8), 3)
    model = prepared(Multiplier(mode), data)
    sp = _spaces(model, data[0])
    assert (sp["dw"].groups, sp["dw"].group_size, sp["dw"].rigid) == (C, K, False)
    assert sp["dw"].tie == tuple(sorted((sp["stem"].index, sp["dw"].index)))
    assert_merges_exactly(model, data)


@pytest.mark.parametrize("mode", ["grouped_input", "group_norm", "grouped_residual", "chained"])
def test_multiplier_conv_grouped_coarser_keeps_the_coarser_groups(mode):
    data = batches((8, 3, 8, 8), 3)
    model = prepared(Multiplier(mode), data)
    sp = _spaces(model, data[0])
    coarse = C if mode == "chained" else 2
    # the coarser count on both sides of the multiplier, its finer groups kept in place (rigid)
    assert sp["dw"].groups == coarse and sp["dw"].rigid and sp["dw"].mergeable
    assert sp["stem"].index in sp["dw"].tie
    assert_merges_exactly(model, data)


def test_multiplier_conv_grouped_incompatibly_is_refused():
    class Clash(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 6, 3, padding=1)
            self.dw = nn.Conv2d(6, 12, 3, padding=1, groups=6)  # 6 groups of 2
            self.norm = nn.GroupNorm(4, 12)                        # 4 groups of 3: they do not nest
            self.fc = nn.Linear(12, 2)

        def forward(self, x):
            return self.fc(self.norm(self.dw(self.stem(x))).mean((2, 3)))

    with pytest.raises(fxzip.AnalysisError, match=r"grouped in incompatible ways.*4 groups at norm.*6 groups at dw"):
        fxzip.analyze(fxzip.trace(Clash(), batches((2, 3, 8, 8), 1)[0]))
