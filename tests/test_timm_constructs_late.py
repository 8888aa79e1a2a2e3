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

VOLO's outlook attention (timm ``volo``): the values are unfolded
(``F.unfold``: channel c, window position p at element ``c * k * k + p``),
split into ``(heads, head_dim, k * k)``, weighed per head by k*k x k*k
weights a Linear computes, and folded back (``F.fold``). The weights' channels
are read by position (they stay in place) and so the values' heads stay in
place, their units still move. Its class attention reshapes one class token
``(B, 1, C) -> (B, heads, 1, head_dim)`` and its auxiliary head takes a
max over tokens (values, indices). Weights computed by a layer for positions
without heads (a dense Synthesizer's token weights) are read by position too.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
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


class Outlook(nn.Module):
    """VOLO's outlook attention (timm ``OutlookAttention``, stride 1) in a
    residual block on a channels-last map."""

    def __init__(self, dim: int = 8, heads: int = 2, kernel: int = 3) -> None:
        super().__init__()
        self.heads, self.kernel = heads, kernel
        self.embed = nn.Conv2d(3, dim, 3, padding=1)
        self.v = nn.Linear(dim, dim)
        self.attn = nn.Linear(dim, kernel ** 4 * heads)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        k, heads = self.kernel, self.heads
        v = self.v(x).permute(0, 3, 1, 2)
        v = F.unfold(v, k, padding=k // 2).reshape(b, heads, c // heads, k * k, h * w).permute(0, 1, 4, 3, 2)
        attn = self.attn(x).reshape(b, h * w, heads, k * k, k * k).permute(0, 2, 1, 3, 4)
        attn = (attn * (c // heads) ** -0.5).softmax(dim=-1)
        y = (attn @ v).permute(0, 1, 4, 3, 2).reshape(b, c * k * k, h * w)
        y = F.fold(y, output_size=(h, w), kernel_size=k, padding=k // 2)
        x = x + self.proj(y.permute(0, 2, 3, 1))
        return self.head(x.mean((1, 2)))


def test_outlook_attention_unfolded_values_split_into_heads():
    """``F.unfold`` then ``(C * k * k) -> (heads, head_dim, k * k)``: heads of
    the values with the window positions on an axis of their own; the
    Linear's window weights are read by position, so they stay in place and
    so do the values' heads; ``F.fold`` puts the windows back."""
    data = batches((4, 3, 5, 5), 3)
    model = prepared(Outlook(), data)
    sp = _spaces(model, data[0])
    assert not sp["attn"].mergeable, "the window weights are read by position"
    values = sp["v"]
    assert values.groups == 2 and values.mergeable and not values.rigid
    assert any(not s.mergeable for s in sp.values() if s.index in values.tie), \
        "the values' heads are weighed per head by weights that stay in place: their heads stay too"
    assert sp["embed"].mergeable and sp["proj"] is sp["embed"]
    assert_merges_exactly(model, data)


class ClassQuery(nn.Module):
    """VOLO's / CaiT's class attention: the query of one token, ``(B, 1, C) ->
    (B, heads, 1, head_dim)``, against keys and values of every token."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(6, dim)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, n, c = x.shape
        d = c // self.heads
        k, v = self.kv(x).reshape(b, n, 2, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.q(x[:, :1]).reshape(b, self.heads, 1, d)
        cls = ((q * d ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.head(self.proj(cls.transpose(1, 2).reshape(b, 1, c))[:, 0])


def test_class_query_of_one_token_split_into_heads():
    """A size-1 axis the reshape moves (the one token) is not a head axis of
    size 1 (a one-head fused k/v): the query has 2 heads, tied to v's."""
    data = batches((4, 5, 6), 3)
    model = prepared(ClassQuery(), data)
    sp = _spaces(model, data[0])
    assert sp["q"].groups == 2 and sp["q"].bilinear and sp["q"].mergeable
    assert_merges_exactly(model, data)


class TokenMax(nn.Module):
    """A head on every token and the max over tokens (VOLO's auxiliary head:
    ``aux(x).max(1)[0]``), on a trunk whose features merge."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.hidden, self.aux = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.hidden(torch.relu(self.embed(x))))
        values, where = h.max(1)
        return self.aux(values) + 0.5 * self.aux(h).max(1)[0]


def test_max_over_tokens_keeps_the_channels():
    data = batches((4, 5, 6), 3)
    model = prepared(TokenMax(), data)
    assert _spaces(model, data[0])["hidden"].mergeable
    assert_merges_exactly(model, data)


class DenseSynthesizer(nn.Module):
    """Token-mixing weights computed by a Linear (a dense Synthesizer): the
    Linear's channels weigh the tokens of the values, read by position."""

    def __init__(self, tokens: int = 5) -> None:
        super().__init__()
        self.embed, self.w, self.v = nn.Linear(6, 8), nn.Linear(8, tokens), nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.embed(x))
        return self.head((x + self.w(x).softmax(-1) @ self.v(x)).mean(1))


def test_weights_computed_by_a_layer_are_read_by_position():
    data = batches((4, 5, 6), 3)
    model = prepared(DenseSynthesizer(), data)
    sp = _spaces(model, data[0])
    assert not sp["w"].mergeable and any("read by position" in why for why in sp["w"].fixed)
    assert sp["v"].mergeable
    assert_merges_exactly(model, data)
