"""Models that agree from the input up to some layer and differ after it (another
number of classes, another task's decoder) merge as a partial zip at the last
cut they share; one architecture written by other code merges fully.

The models are matched by structure and data flow (``fxzip.align``), so the
shared weights are copied here by name or by order, independently of fxzip.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from helpers import TOL, assert_same_function, batches, max_rel_diff, prepared
from torch import nn

import fxzip


def channel_flip(x: torch.Tensor) -> torch.Tensor:
    """An op fxzip has no channel rule for (kept opaque by torch.fx.wrap)."""
    return x.flip(1)


torch.fx.wrap("channel_flip")


class Small(nn.Module):
    """A two-conv trunk and a head: none (the trunk is the output), a flip, a linear."""

    def __init__(self, head: str) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = head
        self.fc = nn.Linear(8, 3) if head == "linear" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        if self.head == "flip":
            return channel_flip(x).mean((2, 3))
        if self.head == "linear":
            return self.fc(x.mean((2, 3)))
        return x


def _copy_trunk(src: torch.nn.Module, dst: torch.nn.Module, rename=lambda name: name) -> None:
    """dst's parameters/buffers <- src's where ``rename(name)`` exists with the same shape."""
    have = src.state_dict()
    with torch.no_grad():
        for name, t in dst.state_dict().items():
            other = have.get(rename(name))
            if other is not None and other.shape == t.shape:
                t.copy_(other)


def _heads_compute_their_models(models, partial, data) -> None:
    for x in data:
        with torch.no_grad():
            got = partial(x)
            assert isinstance(got, tuple) and len(got) == len(models)
            for model, out in zip(models, got):
                want = model(x)
                if isinstance(want, dict):
                    assert isinstance(out, dict) and out.keys() == want.keys()
                    want, out = want["out"], out["out"]
                assert max_rel_diff(want, out) <= TOL


@pytest.fixture(scope="module")
def data():
    # 64 px: enough samples at layer4 (2x2) that no channel is constant, so a
    # channel-permuted model is matched back exactly
    return batches((8, 3, 64, 64), 2)


@pytest.fixture(scope="module")
def classifiers(data):
    """timm resnet18 with 10 and with 5 classes, the trunk's weights identical."""
    a = prepared(timm.create_model("resnet18", num_classes=10), data)
    b = timm.create_model("resnet18", num_classes=5).eval()
    torch.manual_seed(1)
    torch.nn.init.normal_(b.fc.weight)
    _copy_trunk(a, b)
    return a, b


@pytest.mark.parametrize("method, permuted, kwargs", [("zipit", True, {"beta": 0.0}), ("permute", True, {}),
                                                      ("weight_average", False, {})])
def test_other_num_classes_zip_the_trunk_and_keep_each_head(classifiers, data, method, permuted, kwargs):
    """With the trunk of model 1 channel-permuted, only a right match and the
    heads' unmerge (absorbed into fc, gathered nowhere) give its outputs back."""
    a, b = classifiers
    if permuted:
        b = fxzip.permute_channels(b, seed=3, example_inputs=data[0])
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    partial = fxzip.merge(a, b, data=data, method=method, reset_bn=False, progress=False, **kwargs)
    report = partial.meta["fxzip"]
    assert report.cut.name == "global_pool_flatten" and not report.cut.needs_gather
    assert "first differing node 'fc' (fc: Linear 512->10) vs model 1's 'fc' (fc: Linear 512->5)" in report.cut_reason
    assert "cut: " in report.table()
    _heads_compute_their_models((a, b), partial, data)
    for m, state in zip((a, b), before):  # the user's models are never modified
        assert all(torch.equal(t, state[k]) for k, t in m.state_dict().items())


def test_unrelated_weights_merge_at_the_last_shared_cut(data):
    a = prepared(timm.create_model("resnet18", num_classes=10), data)
    b = prepared(timm.create_model("resnet18", num_classes=5), data, seed=1)
    partial = fxzip.merge(a, b, data=data, progress=False)
    report = partial.meta["fxzip"]
    assert report.cut.name == "global_pool_flatten" and "'fc'" in report.cut_reason
    assert all(s.matched for s in report.spaces)  # the trunk's last space is no model output here
    out_a, out_b = partial(data[0])
    assert out_a.shape == (8, 10) and out_b.shape == (8, 5)


def test_stop_at_earlier_works_later_names_the_difference(classifiers, data):
    a, b = classifiers
    shared = fxzip.cut_points(a, data[0], b)
    own = fxzip.cut_points(a, data[0])
    assert [c.name for c in shared] == [c.name for c in own if c.name != "fc"]
    permuted = fxzip.permute_channels(b, seed=4, example_inputs=data[0])
    for stop_at in ("layer3_1_act2", "layer4_0_act2"):  # the second is read by a shortcut: a gather
        partial = fxzip.merge(a, permuted, data=data, method="permute", stop_at=stop_at, reset_bn=False,
                              progress=False)
        assert partial.meta["fxzip"].cut.name == stop_at
        _heads_compute_their_models((a, b), partial, data)
    for stop_at in ("fc", own[-1].m):
        with pytest.raises(ValueError, match=r"beyond the part the models share.*first differing node 'fc'"):
            fxzip.merge(a, b, data=data, stop_at=stop_at, progress=False)


def test_timm_and_torchvision_resnet18_are_one_architecture(data):
    a = prepared(timm.create_model("resnet18", num_classes=10), data)
    b = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # same parameter order, other names (act1/relu, global_pool/avgpool, ...)
        for (_, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            tb.copy_(ta)
    assert_same_function(a, b, data)
    b = fxzip.permute_channels(b, seed=5, example_inputs=data[0])  # torchvision's names, shuffled channels
    merged = fxzip.merge(a, b, data=data, reset_bn=False, progress=False)
    assert merged.meta["fxzip"].cut is None  # a full zip
    assert list(merged.state_dict()) == list(a.state_dict())
    assert_same_function(a, merged, data)
    fresh = timm.create_model("resnet18", num_classes=10)
    fresh.load_state_dict(merged.state_dict())
    assert_same_function(a, fresh.eval(), data)


def test_deeplabv3_and_resnet50_share_the_stem_and_first_stages():
    """deeplab names the ResNet 'backbone.*', reads the input's shape first (for the
    final resize), dilates stages 3-4 and returns a dict."""
    data = batches((2, 3, 32, 32), 2)
    seg = prepared(torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                                      num_classes=4), data)
    cls = torchvision.models.resnet50(weights=None, num_classes=10).eval()
    torch.manual_seed(2)
    torch.nn.init.normal_(cls.fc.weight, std=0.05)
    _copy_trunk(seg, cls, rename=lambda name: f"backbone.{name}")
    shared = fxzip.cut_points(seg, data[0], cls)
    assert shared[-1].name == "backbone_layer2_3_relu_2"
    assert len(shared) < len(fxzip.cut_points(seg, data[0]))
    partial = fxzip.merge(seg, cls, data=data, reset_bn=False, progress=False)
    report = partial.meta["fxzip"]
    assert report.cut.name == "backbone_layer2_3_relu_2"
    assert "first differing node 'backbone_layer3_0_conv2'" in report.cut_reason
    _heads_compute_their_models((seg, cls), partial, data)


@pytest.mark.parametrize("heads", [("none", "flip"), ("flip", "linear"), ("linear", "none")])
def test_heads_are_never_analyzed(heads):
    """An op without a channel rule in a head, or a model output right after the
    trunk, does not block the merge: only model 0's share of the trunk is analyzed."""
    data = batches((8, 3, 8, 8), 2)
    a = prepared(Small(heads[0]), data)
    b = prepared(Small(heads[1]), data, seed=1)
    _copy_trunk(a, b)
    b = fxzip.permute_channels(b, seed=1, example_inputs=data[0]) if heads[1] == "linear" else b
    partial = fxzip.merge(a, b, data=data, reset_bn=False, progress=False)
    assert partial.meta["fxzip"].cut.name == "relu_1"
    _heads_compute_their_models((a, b), partial, data)
