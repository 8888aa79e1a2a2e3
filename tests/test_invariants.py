"""The invariants of BRIEF section 4 on every supported architecture:
a self-merge is the identity, a permuted copy computes the same function and
merges back, whatever the matcher."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from helpers import assert_same_function, batches, prepared

import fxzip
from fxzip import zoo

MATCHERS = ["weight_average", "permute", "zipit"]

# name -> (constructor, batch shape, number of batches)
SMALL = {
    "resnet20": (lambda: zoo.resnet20(width=1), (32, 3, 16, 16), 4),
    "vgg_cnn": (lambda: zoo.vgg_cnn(width=1, image_size=16), (32, 3, 16, 16), 4),
    "mlp": (lambda: zoo.mlp(48, hidden=(32, 32)), (128, 48), 4),
}
TIMM = {
    "resnet18": (lambda: timm.create_model("resnet18", num_classes=10), (16, 3, 64, 64), 4),
    "resnet50": (lambda: timm.create_model("resnet50", num_classes=10), (8, 3, 32, 32), 2),
    "convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=10), (8, 3, 64, 64), 3),
    "mobilenetv3_small_100": (lambda: timm.create_model("mobilenetv3_small_100", num_classes=10), (16, 3, 64, 64), 3),
    "efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=10), (8, 3, 64, 64), 3),
}


def _model_and_data(spec):
    make, shape, n = spec
    data = batches(shape, n)
    return prepared(make(), data), data


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("method", MATCHERS)
def test_self_merge_small(name, method):
    model, data = _model_and_data(SMALL[name])
    merged = fxzip.merge(model, copy.deepcopy(model), data=data, method=method, reset_bn=False, progress=False)
    assert_same_function(model, merged, data)


@pytest.mark.parametrize("name", list(TIMM))
def test_self_merge_timm(name):
    model, data = _model_and_data(TIMM[name])
    for method in MATCHERS:
        merged = fxzip.merge(model, copy.deepcopy(model), data=data, method=method, reset_bn=False,
                             progress=False)
        assert_same_function(model, merged, data)


def test_self_merge_vgg11_once():
    """timm's vgg11 needs the shape-specialised trace through ConvMlp. Its 7x7 pre-logits conv
    holds 103M of the 133M parameters; a 256-wide hidden layer (``mlp_ratio``) keeps the same
    graph and trace at an eighth of the size, so the test runs in seconds."""
    data = batches((4, 3, 64, 64), 2)
    model = prepared(timm.create_model("vgg11", num_classes=10, mlp_ratio=1 / 16), data)
    merged = fxzip.merge(model, copy.deepcopy(model), data=data, method="zipit", reset_bn=False, progress=False)
    assert_same_function(model, merged, data)


@pytest.mark.parametrize("name", ["resnet20", "vgg_cnn", "mlp", "resnet18", "convnext_atto", "efficientnet_b0"])
def test_permutation_recovery(name):
    spec = SMALL.get(name) or TIMM[name]
    model, data = _model_and_data(spec)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    assert_same_function(model, permuted, data)
    changed = [k for k, v in model.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, permuted.state_dict()[k])]
    assert len(changed) > len(model.state_dict()) // 3, "permute_channels left most weights untouched"
    for method, kwargs in [("permute", {}), ("zipit", {"beta": 0.0})]:
        merged = fxzip.merge(model, permuted, data=data, method=method, reset_bn=False, progress=False, **kwargs)
        assert_same_function(model, merged, data)


def test_dead_channels_self_merge_is_identity():
    """Channels that never fire on the data are constant: no NaN, and the
    tie-breaks keep a self-merge exact on those batches."""
    data = batches((32, 3, 16, 16), 3)
    model = prepared(zoo.resnet20(width=1), data)
    with torch.no_grad():
        model.layer1[0].bn1.bias[:5] = -100.0  # five channels of the block's inner space never fire
    for method in MATCHERS:
        merged = fxzip.merge(model, copy.deepcopy(model), data=data, method=method, reset_bn=False,
                             progress=False)
        for p in merged.parameters():
            assert torch.isfinite(p).all()
        assert_same_function(model, merged, data)
        report = merged.meta["fxzip"]
        if method != "weight_average":
            assert sum(s.constant for s in report.spaces) >= 10  # 5 per model in that space


def test_rescaled_copies_the_data_cannot_tell_apart_find_their_partners():
    """Calibration data on one ray: every active hidden unit of relu(W t d) is
    t times a constant, so all of them correlate exactly 1 with each other (a
    relative-position MLP on its fixed table of offsets, with sparse ReLU units,
    is such a space). Correlation alone ties them; the partners are the ones of
    equal scale, and only those pairings compute the model's function on
    inputs off the ray."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3)).eval()
    with torch.no_grad():
        model[0].bias.zero_()
        model[0].weight[:, 0] = torch.linspace(0.5, 2.0, 12)  # every unit fires on the ray, each at its own scale
    direction = torch.tensor([1.0, 0.0])
    g = torch.Generator().manual_seed(1)
    calibration = [torch.rand(64, 1, generator=g) * direction for _ in range(3)]
    held_out = [torch.randn(64, 2, generator=g) for _ in range(2)]
    permuted = fxzip.permute_channels(model, seed=3, example_inputs=held_out[0])
    assert not torch.equal(permuted.get_parameter("0.weight"), model[0].weight)
    for method in ("zipit", "permute"):
        merged = fxzip.merge(model, permuted, data=calibration, method=method, progress=False)
        assert_same_function(model, merged, held_out)


def test_units_dead_on_the_calibration_data_find_their_partners():
    """Hidden units that never fire on the calibration data but do on other
    inputs: the data cannot tell them apart, so a permuted copy's are paired by
    their weights; in channel order the merge would compute another function
    on the held-out inputs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    dead = [2, 5, 9, 13]
    with torch.no_grad():
        model[0].weight[dead] = -model[0].weight[dead].abs()  # <= 0 on positive inputs
        model[0].bias[dead] = 0.0
    perm = torch.tensor([13, 0, 1, 9, 3, 4, 5, 6, 7, 8, 2, 10, 11, 12, 14, 15])  # dead units reordered
    permuted = copy.deepcopy(model)
    with torch.no_grad():
        permuted[0].weight.copy_(model[0].weight[perm])
        permuted[0].bias.copy_(model[0].bias[perm])
        permuted[2].weight.copy_(model[2].weight[:, perm])
    g = torch.Generator().manual_seed(1)
    calibration = [torch.rand(64, 8, generator=g) for _ in range(3)]  # positive: the units stay at 0
    held_out = [torch.randn(64, 8, generator=g) for _ in range(2)]
    for method, kwargs in [("zipit", {}), ("permute", {})]:
        merged = fxzip.merge(model, permuted, data=calibration, method=method, progress=False, **kwargs)
        assert sum(s.constant for s in merged.meta["fxzip"].spaces) >= 2 * len(dead)
        assert_same_function(model, merged, held_out)
