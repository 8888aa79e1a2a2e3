"""Transformers and group structure (attention heads, GroupNorm groups, grouped
convolutions): the invariants of BRIEF section 4, plus the structure a merge
must keep (heads stay heads, units stay inside their group, q.k gets
cross-model matches only)."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from helpers import assert_heads_compute, assert_same_function, batches, prepared
from torch import nn

import fxzip
from fxzip.analysis import analyze
from fxzip.permute import random_assignment
from fxzip.trace import trace

# timm models named by the issue, at CPU-test sizes (64 px: 16 tokens for the ViTs; 4 of their
# 12 blocks, since every block is alike and each one adds the same spaces to match)
VITS = {
    "vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4, num_classes=10),
    "deit_tiny_distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, depth=4,
                                                     num_classes=10),
    # layer scale
    "deit3_small": lambda: timm.create_model("deit3_small_patch16_224", img_size=64, depth=4, num_classes=10),
}
CNNS = {
    # one bottleneck per stage: every GroupNorm / bottleneck / downsample construct, a quarter of the depth
    "resnet50_gn": lambda: timm.create_model("resnet50_gn", layers=(1, 1, 1, 1), num_classes=10),
    "resnext26ts": lambda: timm.create_model("resnext26ts", num_classes=10),
}
SHAPE = (8, 3, 64, 64)


def _prepared(make, n: int = 3, seed: int = 0):
    data = batches(SHAPE, n, seed)
    return prepared(make(), data, seed), data


def _analysis(model, data):
    return analyze(trace(model, (data[0],)))


@pytest.mark.parametrize("name", list(VITS) + list(CNNS))
def test_self_merge_is_identity(name):
    model, data = _prepared({**VITS, **CNNS}[name])
    twin = copy.deepcopy(model)
    calibration = fxzip.calibrate(model, twin, data=data, progress=False)  # traced and observed once
    for method in ("zipit", "permute", "mudsc"):
        merged = fxzip.merge(model, twin, data=calibration, method=method, reset_bn=False, progress=False)
        assert_same_function(model, merged, data)
    # data-free MuDSC: weights alone, norm statistics merged instead of reset
    merged = fxzip.merge(model, twin, data=None, example_inputs=data[0], method="mudsc",
                         weight_similarity=1.0, progress=False)
    assert_same_function(model, merged, data)


def test_vit_spaces_have_heads_and_ties():
    model, data = _prepared(VITS["vit_tiny"], n=1)
    a = _analysis(model, data)
    heads = model.blocks[0].attn.num_heads
    qk = [sp for sp in a.spaces if sp.bilinear]
    assert len(qk) == len(model.blocks)
    for sp in qk:
        assert sp.groups == heads and sp.size == model.embed_dim
        (v,) = [i for i in sp.tie if i != sp.index]
        assert a.spaces[v].groups == heads and not a.spaces[v].bilinear
        assert any(name.endswith("attn.proj.weight") and role == "U" for name, _, role in a.spaces[v].params)
    # class token and position embedding bind to the residual stream
    stream = [sp for sp in a.spaces if any(p == "cls_token" for p, _, _ in sp.params)]
    assert len(stream) == 1 and any(p == "pos_embed" for p, _, _ in stream[0].params)


def _head_permuted(model, data):
    """A copy of ``model`` with heads and units within heads permuted (checked to
    really move heads), plus the assignment used."""
    a = _analysis(model, data)
    assign = random_assignment(a, seed=3)
    qk = next(sp for sp in a.spaces if sp.bilinear)
    d = qk.group_size
    moved_heads = (assign[qk.index][0].view(qk.groups, d) // d)[:, 0]
    assert not torch.equal(moved_heads, torch.arange(qk.groups)), "seed gives the identity head order"
    return fxzip.permute_channels(model, seed=3, example_inputs=data[0])


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit_softmax"])
def test_vit_permuted_heads_merge_back(fused, monkeypatch):
    """Heads permuted (one order for q, k, v and proj) and units within heads:
    same function, and merging with the original recovers it exactly."""
    model, data = _prepared(VITS["vit_tiny"])
    for block in model.blocks:
        block.attn.fused_attn = fused
    permuted = _head_permuted(model, data)
    assert_same_function(model, permuted, data, tol=1e-4)  # summation order changes: not bit-exact
    for method, kwargs in (("permute", {}), ("zipit", {"beta": 0.0})):
        merged = fxzip.merge(model, permuted, data=data, method=method, reset_bn=False, progress=False, **kwargs)
        assert_same_function(model, merged, data)


def test_grouped_conv_permutation_recovery():
    model, data = _prepared(CNNS["resnext26ts"])
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    assert_same_function(model, permuted, data, tol=1e-4)
    for method, kwargs in (("permute", {}), ("zipit", {"beta": 0.0})):
        merged = fxzip.merge(model, permuted, data=data, method=method, reset_bn=False, progress=False, **kwargs)
        assert_same_function(model, merged, data)


def _assignments(models, data, **kwargs):
    cal = fxzip.calibrate(*models, data=data, progress=False)
    from fxzip.grouped import match_all
    from fxzip.matching import Similarity, get_matcher

    sims = {i: Similarity.of(st) for i, st in cal.stats.items()}
    method = kwargs.pop("method", "zipit")
    return cal.analysis, match_all(cal.analysis, sims, get_matcher(method), len(models), **kwargs)


def test_merged_heads_stay_heads_and_qk_is_cross_only():
    """Two unrelated ViTs, zipit with a generous budget: every merged head is
    made of whole heads (one head of each model), q.k spaces have no
    within-model merge, and the merged model runs with the same head count."""
    a_model, data = _prepared(VITS["vit_tiny"], seed=0)
    b_model, _ = _prepared(VITS["vit_tiny"], seed=1)
    analysis, matches = _assignments([a_model, b_model], data, alpha=0.5, beta=0.5)
    checked = 0
    for sp in analysis.spaces:
        if sp.groups == 1 or not sp.mergeable:
            continue
        d, assign = sp.group_size, matches[sp.index].assign
        for k in range(2):
            merged_group = (assign[k] // d).view(sp.groups, d)
            assert (merged_group == merged_group[:, :1]).all(), f"space {sp.index}: a head was split"
            assert sorted(merged_group[:, 0].tolist()) == list(range(sp.groups))
        if sp.bilinear:
            assert matches[sp.index].within == [0, 0]
        else:
            checked += matches[sp.index].within[0] > 0
    assert checked > 0, "beta=0.5 made no within-model merge in any v space: the test checks nothing"
    merged = fxzip.merge(a_model, b_model, data=data, alpha=0.5, beta=0.5, reset_bn=False, progress=False)
    # the result is a plain vit_tiny: its weights load into the timm class and compute the same function
    fresh = VITS["vit_tiny"]().eval()
    fresh.load_state_dict(merged.state_dict())
    assert_same_function(merged, fresh, data)


def test_group_norm_units_stay_in_their_group():
    a_model, data = _prepared(CNNS["resnet50_gn"], n=2, seed=0)
    b_model, _ = _prepared(CNNS["resnet50_gn"], n=2, seed=1)
    analysis, matches = _assignments([a_model, b_model], data, alpha=0.3, beta=0.5)
    grouped = [sp for sp in analysis.spaces if sp.groups > 1 and sp.mergeable]
    assert len(grouped) > 10
    for sp in grouped:
        d = sp.group_size
        for k in range(2):
            g = (matches[sp.index].assign[k] // d).view(sp.groups, d)
            assert (g == g[:, :1]).all(), f"space {sp.index}: units of one GroupNorm group were split"


class TinyGrouped(nn.Module):
    """Depthwise with a channel multiplier, a grouped conv and GroupNorm in one net."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.dw = nn.Conv2d(12, 24, 3, padding=1, groups=12)  # multiplier 2
        self.pw = nn.Conv2d(24, 24, 1)
        self.grouped = nn.Conv2d(24, 24, 3, padding=1, groups=3)
        self.gn = nn.GroupNorm(3, 24)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.dw(torch.relu(self.stem(x))))
        h = torch.relu(self.gn(self.grouped(torch.relu(self.pw(h)))))
        return self.fc(h.mean((2, 3)))


def test_tiny_grouped_net_structure_and_merge_back():
    data = batches((32, 3, 8, 8), 3)
    model = prepared(TinyGrouped(), data)
    a = _analysis(model, data)
    sp = {name: next(s for s in a.spaces if s.producers[0] == name) for name in ("stem", "dw", "pw", "grouped")}
    assert (sp["stem"].groups, sp["dw"].groups, sp["dw"].group_size) == (12, 12, 2)
    assert (sp["pw"].groups, sp["grouped"].groups) == (3, 3)
    assert sp["stem"].tie == sp["dw"].tie == tuple(sorted((sp["stem"].index, sp["dw"].index)))
    assert sp["pw"].tie == sp["grouped"].tie == tuple(sorted((sp["pw"].index, sp["grouped"].index)))
    permuted = fxzip.permute_channels(model, seed=0, example_inputs=data[0])
    assert_same_function(model, permuted, data, tol=1e-4)
    for method, kwargs in (("permute", {}), ("zipit", {"beta": 0.0})):
        merged = fxzip.merge(model, permuted, data=data, method=method, reset_bn=False, progress=False, **kwargs)
        assert_same_function(model, merged, data)


def test_qk_norm_merges():
    """qk_norm=True (one LayerNorm over head_dim shared by all heads) is supported:
    one within-head assignment for every head (tests/test_attention_designs.py)."""
    data = batches((2, 3, 32, 32), 1)
    model = prepared(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, qk_norm=True),
                     data)
    merged = fxzip.merge(model, copy.deepcopy(model), data=data, reset_bn=False, progress=False)
    assert_same_function(model, merged, data)


def test_incompatible_group_counts_are_rejected():
    class Clash(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 12, 3, padding=1)
            self.g1 = nn.GroupNorm(3, 12)
            self.g2 = nn.GroupNorm(4, 12)
            self.fc = nn.Linear(12, 2)

        def forward(self, x):
            h = self.conv(x)
            return self.fc((self.g1(h) + self.g2(h)).mean((2, 3)))

    with pytest.raises(fxzip.AnalysisError, match=r"grouped in incompatible ways.*3 groups at g1.*4 groups at g2"):
        fxzip.merge(Clash(), Clash(), data=batches((2, 3, 8, 8), 1), progress=False)


def _torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=3, hidden_dim=48, mlp_dim=96,
                             num_classes=10)


def test_nn_multihead_attention_is_traced_into_heads():
    """torchvision's ViT uses nn.MultiheadAttention: fxzip traces it as packed
    qkv -> heads -> SDPA -> out_proj, so heads are found, permuted heads merge
    back, and the result's state_dict keeps the module's keys."""
    data = batches((8, 3, 32, 32), 3)
    model = prepared(_torchvision_vit(), data)
    a = _analysis(model, data)
    assert sum(sp.bilinear for sp in a.spaces) == 2 and all(sp.groups == 3 for sp in a.spaces if sp.bilinear)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    assert_same_function(model, permuted, data, tol=1e-4)
    merged = fxzip.merge(model, permuted, data=data, method="permute", reset_bn=False, progress=False)
    assert_same_function(model, merged, data)
    fresh = _torchvision_vit().eval()
    fresh.load_state_dict(merged.state_dict())
    assert_same_function(merged, fresh, data)


def test_nn_multihead_cross_attention_is_rejected():
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.kv = nn.Linear(8, 16), nn.Linear(8, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 2)

        def forward(self, x):
            kv = self.kv(x)
            return self.fc(self.attn(self.q(x), kv, kv, need_weights=False)[0].mean(1))

    with pytest.raises(fxzip.TraceError, match=r"nn.MultiheadAttention 'attn'.*cross-attention"):
        fxzip.merge(Cross(), Cross(), data=batches((2, 5, 8), 1), progress=False)


def test_vit_cut_points_and_partial_zip():
    """Every block output of a ViT is a cut (timm's optional attn_mask input is not
    a data path), and a partial zip with a head-permuted copy gives each model's
    own outputs back."""
    data = batches((8, 3, 32, 32), 2)
    model = prepared(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=10),
                     data)
    cuts = fxzip.cut_points(model, data[0])
    assert [c.k for c in cuts] == [0, 1, 3, 5, 7, 9, 11, 13, 14]
    permuted = fxzip.permute_channels(model, seed=2, example_inputs=data[0])
    for stop_at in (5, 9):
        partial = fxzip.merge(model, permuted, data=data, method="permute", stop_at=stop_at, reset_bn=False,
                              progress=False)
        assert_heads_compute(model, partial, data, 2)


def test_partial_zip_at_every_cut_of_a_grouped_net():
    """Cuts read by a depthwise-multiplier or grouped conv: those weights hold one
    group's inputs, so the head reads the cut through a gather, not by absorbing U."""
    data = batches((32, 3, 8, 8), 2)
    model = prepared(TinyGrouped(), data)
    permuted = fxzip.permute_channels(model, seed=0, example_inputs=data[0])
    cuts = fxzip.cut_points(model, data[0])
    assert len(cuts) >= 4
    for cut in cuts[1:-1]:
        partial = fxzip.merge(model, permuted, data=data, method="permute", stop_at=cut.name, reset_bn=False,
                              progress=False)
        assert_heads_compute(model, partial, data, 2)


MORE = {
    "pvt_v2_b0": lambda: timm.create_model("pvt_v2_b0", num_classes=10),  # spatial-reduction attention, 1-head k/v
    "vit_tiny_r_s16_p8": lambda: timm.create_model("vit_tiny_r_s16_p8_224", img_size=64, num_classes=10),  # StdConv+GN
    "convnextv2_atto": lambda: timm.create_model("convnextv2_atto", num_classes=10),  # GRN (addcmul)
    "regnetx_002": lambda: timm.create_model("regnetx_002", num_classes=10),  # grouped convs
}


@pytest.mark.parametrize("name", list(MORE))
def test_more_families_self_merge_and_data_free_recovery(name):
    data = batches((4, 3, 64, 64), 2)
    model = prepared(MORE[name](), data)
    merged = fxzip.merge(model, copy.deepcopy(model), data=data, method="zipit", reset_bn=False, progress=False)
    assert_same_function(model, merged, data)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    merged = fxzip.merge(model, permuted, data=None, example_inputs=data[0], method="mudsc_permute",
                         weight_similarity=1.0, progress=False)
    assert_same_function(model, merged, data)
