"""Sliced and split feature spaces (``fxzip.refine``): each construct in a small
model written here, checked by the two invariants (a self-merge is the
identity; a permuted copy computes the same function and merges back), and
the test asserts that ``permute_channels`` really moved the sliced weights."""
from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_heads_compute, assert_same_function, batches, prepared
from torch import nn

import fxzip
from fxzip.analysis import analyze
from fxzip.refine import Refinement
from fxzip.trace import trace


class CSPBlock(nn.Module):
    """A CSP stage: split the features in two, transform one half, concatenate."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.inner = nn.Sequential(nn.Conv2d(c // 2, c // 2, 3, padding=1), nn.BatchNorm2d(c // 2), nn.ReLU())
        self.fuse = nn.Conv2d(c, c, 1)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        a, b = x.split(x.shape[1] // 2, dim=1)
        b = self.inner(b) + b
        x = F.relu(self.fuse(torch.cat([a, b], dim=1)))
        return self.head(x.mean((2, 3)))


class GhostBlock(nn.Module):
    """A ghost module: primary conv + cheap depthwise conv, concatenated, then
    trimmed to an odd channel count (the cheap branch's last channel is dead)."""

    def __init__(self, out: int = 11):
        super().__init__()
        init = (out + 1) // 2
        self.out = out
        self.primary = nn.Sequential(nn.Conv2d(3, init, 1), nn.BatchNorm2d(init), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(init, init, 3, padding=1, groups=init), nn.BatchNorm2d(init), nn.ReLU())
        self.proj = nn.Conv2d(out, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x1 = self.primary(x)
        x2 = self.cheap(x1)
        y = torch.cat([x1, x2], dim=1)[:, :self.out]
        return self.head(F.relu(self.proj(y)).mean((2, 3)))


class PartialResidual(nn.Module):
    """``x[:, :C] += shortcut``: part of a wider space joins a residual stream."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.c = c
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.wide = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x):
        s = F.relu(self.stem(x))
        y = self.wide(s)
        y[:, :self.c] += s
        return self.head(F.relu(y).mean((2, 3)))


class SplitGateMLP(nn.Module):
    """gMLP's spatial gating unit: ``u, v = x.chunk(2, -1)``; ``u * spatial(v)``."""

    def __init__(self, dim: int = 12, tokens: int = 6, hidden: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.norm = nn.LayerNorm(hidden)
        self.spatial = nn.Linear(tokens, tokens)
        self.fc2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):  # (B, tokens, dim)
        h = F.gelu(self.fc1(x))
        u, v = h.chunk(2, dim=-1)
        v = self.spatial(self.norm(v).transpose(1, 2)).transpose(1, 2)
        x = x + self.fc2(u * v)
        return self.head(x.mean(1))


class ConcatIntoResidual(nn.Module):
    """A concatenation of two spaces added to one wider space (dual-path style):
    the wider space is refined to match the concatenation."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 10, 3, padding=1)
        self.c = nn.Conv2d(3, 16, 1)
        self.d = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1) + self.c(x)
        y = F.relu(self.d(F.relu(y)))
        return self.head(y.mean((2, 3)))


class NarrowSlices(nn.Module):
    """Overlapping reads: ``narrow`` and a slice of the same space, plus a tail
    that nothing reads."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.p = nn.Conv2d(5, 4, 1)
        self.q = nn.Conv2d(6, 4, 1)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        y = F.relu(self.a(x))
        z = self.p(y.narrow(1, 0, 5)) + self.q(y[:, 3:9])
        return self.head(F.relu(z).mean((2, 3)))


class ChannelShuffle(nn.Module):
    """ShuffleNet: a grouped conv, channels shuffled across its 2 groups, a
    second grouped conv, a residual add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.a = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.b = nn.Conv2d(8, 8, 1, groups=2)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.a(x))
        n, c, h, w = y.shape
        y = y.reshape(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(F.relu(self.b(y) + x).mean((2, 3)))


CONSTRUCTS = {
    "csp_split": (CSPBlock, (16, 3, 8, 8)),
    "ghost_cat_slice": (GhostBlock, (16, 3, 8, 8)),
    "partial_residual": (PartialResidual, (16, 3, 8, 8)),
    "split_gate_mlp": (SplitGateMLP, (32, 6, 12)),
    "concat_into_residual": (ConcatIntoResidual, (16, 3, 8, 8)),
    "narrow_overlap": (NarrowSlices, (16, 3, 8, 8)),
    "channel_shuffle": (ChannelShuffle, (16, 3, 8, 8)),
}


def _setup(name):
    make, shape = CONSTRUCTS[name]
    data = batches(shape, 4)
    return prepared(make(), data), data


@pytest.mark.parametrize("name", list(CONSTRUCTS))
def test_self_merge(name):
    model, data = _setup(name)
    for method in ("zipit", "permute"):
        merged = fxzip.merge(model, copy.deepcopy(model), data=data, method=method, reset_bn=False, progress=False)
        assert_same_function(model, merged, data)


@pytest.mark.parametrize("name", list(CONSTRUCTS))
def test_permutation_recovery(name):
    model, data = _setup(name)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    assert_same_function(model, permuted, data)
    moved = {k for k, v in model.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, permuted.state_dict()[k])}
    # the layers on both sides of every slice really moved
    sliced_layers = {"csp_split": ["stem.weight", "inner.0.weight", "fuse.weight"],
                     "ghost_cat_slice": ["primary.0.weight", "cheap.0.weight", "proj.weight"],
                     "partial_residual": ["stem.weight", "wide.weight"],
                     "split_gate_mlp": ["fc1.weight", "norm.weight", "fc2.weight"],
                     "concat_into_residual": ["a.weight", "b.weight", "c.weight", "d.weight"],
                     "narrow_overlap": ["a.weight", "p.weight", "q.weight"],
                     "channel_shuffle": ["a.weight", "b.weight"]}[name]
    assert set(sliced_layers) <= moved, f"not permuted: {set(sliced_layers) - moved}"
    merged = fxzip.merge(model, permuted, data=data, method="zipit", beta=0.0, reset_bn=False, progress=False)
    assert_same_function(model, merged, data)


def test_csp_halves_are_separate_spaces():
    model, data = _setup("csp_split")
    analysis = analyze(trace(model, data[0]))
    stem = [sp for sp in analysis.spaces if "stem" in sp.producers]
    assert sorted(sp.size for sp in stem) == [8, 8]


def test_split_gate_ties_the_halves():
    """u * v joins the two halves of fc1's output into one space, so each
    channel of u moves with the same channel of v."""
    model, data = _setup("split_gate_mlp")
    analysis = analyze(trace(model, data[0]))
    fc1 = [sp for sp in analysis.spaces if "fc1" in sp.producers]
    assert len(fc1) == 1 and fc1[0].size == 16


def test_ghost_slice_refines_the_primary_space():
    """The cheap branch is depthwise, so both halves of the concatenation are the
    primary conv's space; trimming to 11 channels cuts it into 5 + 1."""
    model, data = _setup("ghost_cat_slice")
    analysis = analyze(trace(model, data[0]))
    primary = [sp for sp in analysis.spaces if "primary_0" in sp.producers]
    assert sorted(sp.size for sp in primary) == [1, 5] and all(sp.probes for sp in primary)


def test_unread_channels_are_dead_spaces():
    model, data = _setup("narrow_overlap")
    analysis = analyze(trace(model, data[0]))
    a = sorted((sp.size, bool(sp.probes)) for sp in analysis.spaces if "a" in sp.producers)
    assert a == [(2, True), (3, False), (3, True), (4, True)]  # 0:3, 3:5, 5:9 read; 9:12 dead


def test_refinement_carries_cuts_across_links():
    ref = Refinement()
    ref.add_space(0, 10)
    ref.add_space(1, 10)
    ref.link(0, 0, 1, 0, 10, "add")   # spaces 0 and 1 are one basis
    ref.add_range(0, 0, 4)             # a slice of space 0 at channel 4
    ref.link(1, 5, 1, 0, 5, "mul")    # the two halves of space 1 are one basis
    ref.solve()
    # the cut at 4 reaches space 1, the halves carry it to 9, space 0 gets 5 and 9 back
    assert [size for _, size in ref.atoms(0, 0, 10)] == [4, 1, 4, 1]
    assert [size for _, size in ref.atoms(1, 0, 10)] == [4, 1, 4, 1]


def test_step_slice_names_the_problem():
    class Strided(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.b(self.a(x)[:, ::2])

    with pytest.raises(fxzip.AnalysisError, match="step 2"):
        analyze(trace(Strided(), torch.randn(2, 3, 4, 4)))


def test_channel_shuffle_links_its_groups_into_one_basis():
    """After a shuffle, channel ``d * g + h`` is unit d of group h: the g groups
    are linked unit by unit (one within-group basis, moved alike in every
    group), and the reader sees each unit repeated g times."""
    model, data = _setup("channel_shuffle")
    analysis = analyze(trace(model, data[0]))
    shuffled = [sp for sp in analysis.spaces if sp.producers == ["a"]]
    # a's 8 channels are one basis of 4 units (both groups linked), which b's 2 groups
    # cut in two; the stream is cut at the groups' boundary, and no group moves whole
    assert sorted(sp.size for sp in shuffled) == [2, 2]
    assert sorted(sp.size for sp in analysis.spaces if "stem" in sp.producers) == [4, 4]
    assert all(sp.groups == 1 for sp in analysis.spaces)


class GhostStack(nn.Module):
    """Two ghost blocks with a residual stream: block outputs are made of
    refined atoms, and are still cut points of a partial zip."""

    def __init__(self):
        super().__init__()
        self.g1 = GhostBlock(11)
        self.g1.proj = nn.Conv2d(11, 11, 3, padding=1)
        self.g2 = nn.Conv2d(11, 11, 3, padding=1)
        self.head = nn.Linear(11, 10)

    def forward(self, x):
        x1 = self.g1.primary(x)
        y = torch.cat([x1, self.g1.cheap(x1)], dim=1)[:, :11]
        y = y + F.relu(self.g1.proj(y))
        y = y + F.relu(self.g2(y))
        return self.head(y.mean((2, 3)))


def test_partial_zip_at_cuts_made_of_refined_spaces():
    data = batches((16, 3, 8, 8), 3)
    model = prepared(GhostStack(), data)
    cuts = fxzip.cut_points(model, data[0])
    multi = [c for c in cuts if len(c.segments) > 1]
    assert multi, [str(c) for c in cuts]
    permuted = fxzip.permute_channels(model, seed=2, example_inputs=data[0])
    for cut in cuts:
        for other in (copy.deepcopy(model), permuted):
            partial = fxzip.merge(model, other, data=data, stop_at=cut, beta=0.0, reset_bn=False, progress=False)
            assert_heads_compute(model, partial, data, 2)


class PaddedPartialResidual(nn.Module):
    """A partial residual behind shape control flow: traced on the concrete path,
    where ``x[:, :C] += y`` is recorded the same way."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = F.relu(self.a(x))
        if y.shape[-1] % 2:
            y = F.pad(y, (0, 1, 0, 1))
        z = self.b(y)
        z[:, :y.shape[1]] += y
        return self.head(F.relu(z).mean((2, 3)))


def test_partial_residual_added_into_a_slice_in_place():
    data = batches((16, 3, 7, 7), 3)
    model = prepared(PaddedPartialResidual(), data)
    assert any(n.target is operator.setitem for n in trace(model, data[0]).graph.nodes)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    assert not torch.equal(permuted.state_dict()["a.weight"], model.state_dict()["a.weight"])
    assert_same_function(model, permuted, data)
    merged = fxzip.merge(model, permuted, data=data, beta=0.0, reset_bn=False, progress=False)
    assert_same_function(model, merged, data)
