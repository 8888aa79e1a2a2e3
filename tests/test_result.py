"""What a merge returns: a plain GraphModule of the input architecture, whose
norm statistics are reset exactly as ``fxzip.reset_norm_stats`` does."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from helpers import assert_same_function, batches, max_rel_diff, prepared
from torch import nn

import fxzip
from fxzip import zoo


def _two_resnet20(data):
    return prepared(zoo.resnet20(width=1), data, seed=0), prepared(zoo.resnet20(width=1), data, seed=1)


def test_full_zip_keeps_the_graph_and_loads_into_a_fresh_model():
    data = batches((32, 3, 16, 16), 3)
    a, b = _two_resnet20(data)
    merged = fxzip.merge(a, b, data=data, progress=False)
    reference = fxzip.trace(a, data[0])
    got = [(n.op, str(n.target)) for n in merged.graph.nodes]
    want = [(n.op, str(n.target)) for n in reference.graph.nodes]
    assert got == want, "a full zip must have exactly the input's nodes (no merge/unmerge left)"
    fresh = zoo.resnet20(width=1)
    fresh.load_state_dict(merged.state_dict(), strict=True)
    fresh.eval()
    assert_same_function(merged, fresh, data[:1])


def test_timm_state_dict_loads_strictly():
    data = batches((4, 3, 64, 64), 2)
    a = prepared(timm.create_model("efficientnet_b0", num_classes=10), data, seed=0)
    b = prepared(timm.create_model("efficientnet_b0", num_classes=10), data, seed=1)
    merged = fxzip.merge(a, b, data=data, method="permute", progress=False)
    timm.create_model("efficientnet_b0", num_classes=10).load_state_dict(merged.state_dict(), strict=True)


def test_torch_compile_matches():
    data = batches((8, 3, 16, 16), 2)
    a, b = _two_resnet20(data)
    merged = fxzip.merge(a, b, data=data, progress=False)
    compiled = torch.compile(merged, fullgraph=True)
    with torch.no_grad():
        want, got = merged(data[0]), compiled(data[0])
    assert max_rel_diff(want, got) < 1e-4


def test_reset_bn_equals_reset_norm_stats_after_merge():
    data = batches((8, 3, 64, 64), 2)
    a = prepared(timm.create_model("efficientnet_b0", num_classes=10), data, seed=0)
    b = prepared(timm.create_model("efficientnet_b0", num_classes=10), data, seed=1)
    plain = fxzip.merge(a, b, data=data, reset_bn=False, progress=False)
    before = {k: v.clone() for k, v in plain.state_dict().items() if "running" in k}
    reset = fxzip.merge(a, b, data=data, reset_bn=True, progress=False)
    fxzip.reset_norm_stats(plain, data)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, reset.state_dict()[k]), k
    changed = [k for k, v in before.items() if (v - plain.state_dict()[k]).abs().max() > 1e-3]
    assert len(changed) > len(before) // 2, "efficientnet's functional batch norms were not reset"


def test_reset_norm_stats_matches_torch_cumulative_average():
    """On module batch norms, the graph pass must equal nn.BatchNorm in train mode
    with momentum=None (a cumulative average), dropout off."""
    data = batches((16, 3, 16, 16), 3)
    model = prepared(zoo.resnet20(width=1), data)
    ours = fxzip.reset_norm_stats(copy.deepcopy(model), data)
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
            m.train()
    with torch.no_grad():
        for x in data:
            ref(x)
    for (k, v), (_, w) in zip(ours.state_dict().items(), ref.state_dict().items()):
        if "running" in k:
            torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6, msg=k)


def test_reset_norm_stats_does_not_touch_other_models():
    data = batches((8, 3, 16, 16), 2)
    model = prepared(zoo.resnet20(width=1), data)
    other = copy.deepcopy(model)
    fxzip.reset_norm_stats(model, batches((8, 3, 16, 16), 2, seed=5))
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())
    assert all(m.training is False for m in model.modules())


def test_weight_average_is_the_elementwise_mean():
    data = batches((16, 3, 16, 16), 2)
    a, b = _two_resnet20(data)
    merged = fxzip.merge(a, b, data=data, method="weight_average", reset_bn=False, progress=False)
    for k, v in merged.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (a.state_dict()[k] + b.state_dict()[k]) / 2, msg=k)


def test_report_table_and_timings():
    data = batches((16, 3, 16, 16), 2)
    a, b = _two_resnet20(data)
    merged = fxzip.merge(a, b, data=data, method="zipit", progress=False)
    report = merged.meta["fxzip"]
    text = str(report)
    assert "within/model" in text and "corr" in text
    matched = [s for s in report.spaces if s.matched]
    assert matched and all(s.cross + sum(s.within) == s.size for s in matched)
    assert {"trace", "analysis", "calibration", "matching", "folding", "reset"} <= set(report.seconds)


def test_backbone_without_head_warns_about_averaged_stream():
    data = batches((4, 3, 32, 32), 2)
    a = prepared(timm.create_model("resnet18", num_classes=0), data, seed=0)
    b = prepared(timm.create_model("resnet18", num_classes=0), data, seed=1)
    with pytest.warns(UserWarning, match="internal producers"):
        fxzip.merge(a, b, data=data, method="weight_average", progress=False)


def test_three_models_merge():
    data = batches((16, 3, 16, 16), 2)
    model = prepared(zoo.resnet20(width=1), data)
    merged = fxzip.merge(model, copy.deepcopy(model), copy.deepcopy(model), data=data, method="zipit",
                         alpha=1.0, beta=0.0, reset_bn=False, progress=False)
    assert_same_function(model, merged, data)
