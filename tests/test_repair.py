"""Variance repair (``repair=True``, ``passes/repair.py``): what it guarantees,
checked against statistics measured independently on the merged model."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from helpers import assert_same_function, batches, capture, prepared
from torch import nn

import fxzip
from fxzip import zoo

REL = 1e-4


class NormFreeNet(nn.Module):
    """A residual CNN without norms: hidden features before ReLUs, and a stream
    whose blocks add a conv to it (the repair's two kinds of sites)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.b1c1 = nn.Conv2d(width, width, 3, padding=1)
        self.b1c2 = nn.Conv2d(width, width, 3, padding=1)
        self.b2c1 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.b2c2 = nn.Conv2d(2 * width, width, 3, padding=1)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.b1c2(F.relu(self.b1c1(x)))
        x = x + self.b2c2(F.relu(self.b2c1(F.relu(x))))
        return self.head(x.mean((2, 3)))


HIDDEN = ["stem", "b1c1", "b2c1"]  # a conv whose output goes straight into a ReLU
STREAM = {"b1c2": "add", "b2c2": "add_1"}  # a conv added to the stream: the point is the sum


def _features(model, data, names):
    gm = model if isinstance(model, fx.GraphModule) else fxzip.trace(model, (data[0],))
    seen = capture(gm, data, names)
    return {k: torch.cat([x.movedim(1, 0).reshape(x.shape[1], -1) for x in v], 1) for k, v in seen.items()}


def _close(got, want):
    return float((got - want).abs().max() / want.abs().max()) <= REL


def _models(data):
    return prepared(NormFreeNet(), data, seed=0), prepared(NormFreeNet(), data, seed=1)


def test_weight_average_repair_meets_the_targets_in_network_order():
    """W.Avg keeps channel i with channel i, so the targets are simply the mean of
    the two models' per-channel mean and std: computed here from the originals."""
    data = batches((16, 3, 16, 16), 3)
    a, b = _models(data)
    names = HIDDEN + list(STREAM.values())
    fa, fb = _features(a, data, names), _features(b, data, names)
    merged = fxzip.merge(a, b, data=data, method="weight_average", repair=True, progress=False)
    fm = _features(merged, data, names + ["b1c2", "b2c2"])
    for name in names:
        target_mean = (fa[name].mean(1) + fb[name].mean(1)) / 2
        target_std = (fa[name].std(1, correction=0) + fb[name].std(1, correction=0)) / 2
        assert _close(fm[name].mean(1), target_mean), name
        std = fm[name].std(1, correction=0)
        if name in HIDDEN:
            assert _close(std, target_std), name
        else:
            # a stream: the target std where a positive scale reaches it; elsewhere
            # the target is below what the stream's other term allows
            met = (std - target_std).abs() <= REL * target_std.abs().max()
            bounded = ~met
            assert (std[bounded] > target_std[bounded]).all(), name
    report = merged.meta["fxzip"].details["repair"]
    # one read of the data: the merged model and the two originals walked together
    assert report["sites"] == 5 and report["passes"] == 3 and report["data_reads"] == 1


def test_stream_scale_rule():
    """The scale of a stream site, ``Var(R + a D) = target``: the positive root
    nearest 1; out of reach, the positive variance minimiser, else 1 (never a
    sign flip of the branch); 1 for a constant branch."""
    from fxzip.passes.repair import _scale

    var_d = torch.tensor([1.0, 1.0, 1.0, 0.0, 4.0], dtype=torch.float64)
    cov = torch.tensor([0.0, -0.5, 0.5, 0.0, -2.0], dtype=torch.float64)
    var_r = torch.tensor([1.0, 1.0, 1.0, 1.0, 4.0], dtype=torch.float64)
    target = torch.tensor([1.25, 0.5, 0.5, 3.0, 4.0], dtype=torch.float64)
    a, bounded = _scale(var_d, cov, var_r, target, has_rest=True)
    assert a[0] == pytest.approx(0.5)  # roots +-0.5: the positive one
    assert a[1] == pytest.approx(0.5) and bool(bounded[1])  # min of 1 + a^2 - a is 0.75 at a = 0.5
    assert a[2] == 1.0 and bool(bounded[2])  # 1 + a^2 + a only grows for a > 0: scale kept
    assert a[3] == 1.0 and not bool(bounded[3])
    assert a[4] == pytest.approx(1.0)  # roots 0 and 1: 0 would delete the branch, 1 is nearest
    reached = var_r + a * a * var_d + 2 * a * cov
    assert reached[0] == pytest.approx(1.25) and reached[1] == pytest.approx(0.75)


@pytest.mark.parametrize("method", ["zipit", "permute"])
@pytest.mark.parametrize("make,shape", [
    (NormFreeNet, (16, 3, 16, 16)),
    (lambda: zoo.resnet20(norm="group"), (16, 3, 16, 16)),
    (lambda: zoo.cifar_vit(depth=2), (8, 3, 32, 32)),
], ids=["normfree", "resnet20gn", "vit"])
def test_repair_leaves_a_self_merge_exact(method, make, shape):
    data = batches(shape, 2)
    model = prepared(make(), data)
    merged = fxzip.merge(model, copy.deepcopy(model), data=data, method=method, repair=True, progress=False)
    assert merged.meta["fxzip"].details["repair"]["sites"] > 0
    assert_same_function(model, merged, data)


def test_repair_is_permutation_equivariant():
    """Merging A with a permuted copy of B gives the same function as merging A
    with B, repair included: the targets follow every unit to its merged place."""
    data = batches((16, 3, 16, 16), 3)
    a, b = _models(data)
    permuted = fxzip.permute_channels(b, seed=3, example_inputs=data[0])
    one = fxzip.merge(a, b, data=data, method="zipit", repair=True, progress=False)
    two = fxzip.merge(a, permuted, data=data, method="zipit", repair=True, progress=False)
    assert_same_function(one, two, data, tol=1e-4)
    plain = fxzip.merge(a, b, data=data, method="zipit", progress=False)
    assert max(float((p - q).abs().max()) for p, q in zip(one.state_dict().values(), plain.state_dict().values())) > 1e-3


def test_repair_needs_data_and_does_not_touch_the_inputs():
    data = batches((8, 3, 16, 16), 2)
    a, b = _models(data)
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    with pytest.raises(ValueError, match="repair=True measures the merged features on data"):
        fxzip.merge(a, b, data=None, method="weight_average", repair=True, example_inputs=data[0])
    fxzip.merge(a, b, data=data, repair=True, progress=False)
    for m, sd in zip((a, b), before):
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())
