"""Closed-form refit (``refit=True``, ``passes/refit.py``): invariants, and that
it solves exactly the ridge least-squares problem it states."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_heads_compute, assert_same_function, batches, prepared
from torch import nn

import fxzip
from fxzip import zoo


class TwoLayer(nn.Module):
    def __init__(self, d_in=12, hidden=16, d_out=6):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


MODELS = {
    "resnet20_bn": (lambda: zoo.resnet20(), (16, 3, 16, 16)),
    "resnet20_gn": (lambda: zoo.resnet20(norm="group"), (16, 3, 16, 16)),
    "vit": (lambda: zoo.cifar_vit(depth=2), (8, 3, 32, 32)),
    "mobilenet_like": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                              nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                                              nn.Conv2d(8, 16, 1, groups=2), nn.ReLU(),
                                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)),
                       (16, 3, 12, 12)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_refit_keeps_self_merge_and_permutation_recovery(name):
    make, shape = MODELS[name]
    data = batches(shape, 2)
    model = prepared(make(), data)
    merged = fxzip.merge(model, copy.deepcopy(model), data=data, refit=True, reset_bn=False, progress=False)
    assert merged.meta["fxzip"].details["refit"]["layers"] > 0
    assert_same_function(model, merged, data)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    for method, kwargs in [("permute", {}), ("zipit", {"beta": 0.0})]:
        merged = fxzip.merge(model, permuted, data=data, method=method, refit=True, reset_bn=False,
                             progress=False, **kwargs)
        assert_same_function(model, merged, data)


def test_refit_of_a_layer_that_sees_nothing_keeps_its_folded_weights():
    """A bias-free depthwise conv whose input channel is dead on the data (a ReLU that never fires, as
    in fine-tuned MobileNets) has an all-zero Gram in that group: the ridge, relative to the Gram's mean
    eigenvalue, was 0 there and the solve singular. That group now keeps its folded weights (the only
    minimiser of the penalty when the data says nothing); the self-merge invariant holds."""
    data = batches((16, 3, 12, 12), 2)
    model = prepared(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)), data)
    with torch.no_grad():
        model[0].weight[2].zero_()
        model[0].bias[2] = -1.0  # channel 2 is 0 everywhere
    merged = fxzip.merge(model, copy.deepcopy(model), data=data, refit=True, progress=False)
    assert_same_function(model, merged, data)
    other = prepared(copy.deepcopy(model), data, seed=3)
    with torch.no_grad():
        other[0].weight[2].zero_()
        other[0].bias[2] = -1.0
    merged = fxzip.merge(model, other, data=data, refit=True, progress=False)
    folded = fxzip.merge(model, other, data=data, progress=False)
    w, w_fold = merged.get_submodule("2").weight, folded.get_submodule("2").weight
    unit = int((folded.get_submodule("0").bias == -1.0).nonzero()[0])  # the dead unit's merged index
    assert torch.equal(w[unit], w_fold[unit])
    assert not torch.equal(w, w_fold)


def _ridge_lstsq(x: torch.Tensor, t: torch.Tensor, w_fold: torch.Tensor, lam: float) -> torch.Tensor:
    """min (1/n)||X W^T - T||^2 + lam ||W - W_fold||^2 as one stacked least squares."""
    n = x.shape[0]
    s = (n * lam) ** 0.5
    a = torch.cat([x, s * torch.eye(x.shape[1], dtype=x.dtype)])
    b = torch.cat([t, s * w_fold.T])
    return torch.linalg.lstsq(a, b, driver="gelsd").solution.T


def test_refit_is_the_ridge_least_squares_solution():
    """On a two-layer MLP: the refit weights of both layers equal a float64
    lstsq of the ridge-augmented system on the same activations (the second
    layer on the refit first layer's outputs), and the loss drops."""
    data = batches((64, 12), 3)
    a, b = prepared(TwoLayer(), data, seed=0), prepared(TwoLayer(), data, seed=1)
    folded = fxzip.merge(a, b, data=data, method="zipit", progress=False)
    merged = fxzip.merge(a, b, data=data, method="zipit", refit=True, progress=False)
    report = merged.meta["fxzip"]
    assign = next(s for s in report.spaces if s.name == "fc1" and s.matched).assignment
    assign = torch.tensor(assign)  # [model][unit] -> merged unit
    counts = torch.bincount(assign.flatten(), minlength=16).double()
    x = torch.cat(data).double()
    ones = torch.ones(len(x), 1, dtype=torch.float64)
    per_layer = report.details["refit"]["per_layer"]

    # layer 1: input = the data itself; target = mean of each cluster's fc1 outputs
    y = [m.fc1(torch.cat(data)).double().detach() for m in (a, b)]
    t1 = sum(torch.zeros_like(y[k]).index_add_(1, assign[k], y[k]) for k in range(2)) / counts
    w1_fold = torch.cat([folded.fc1.weight, folded.fc1.bias[:, None]], 1).double().detach()
    w1 = _ridge_lstsq(torch.cat([x, ones], 1), t1, w1_fold, per_layer["fc1"]["ridge"])
    got1 = torch.cat([merged.fc1.weight, merged.fc1.bias[:, None]], 1).double().detach()
    assert float((got1 - w1).abs().max() / w1.abs().max()) < 1e-6

    # layer 2: input = the merged model's hidden features after the refit of fc1
    h = torch.relu(torch.cat([x, ones], 1) @ got1.T)
    t2 = sum(m.fc2(m.act(m.fc1(torch.cat(data)))).double().detach() for m in (a, b)) / 2  # output: averaged
    w2_fold = torch.cat([folded.fc2.weight, folded.fc2.bias[:, None]], 1).double().detach()
    w2 = _ridge_lstsq(torch.cat([h, ones], 1), t2, w2_fold, per_layer["fc2"]["ridge"])
    got2 = torch.cat([merged.fc2.weight, merged.fc2.bias[:, None]], 1).double().detach()
    assert float((got2 - w2).abs().max() / w2.abs().max()) < 1e-6
    for layer in per_layer.values():
        assert layer["loss_refit"] < layer["loss_folded"]


def test_refit_arguments_are_checked_before_any_work():
    data = batches((8, 12), 1)
    a, b = TwoLayer(), TwoLayer()
    with pytest.raises(ValueError, match="refit fits the merged weights on data"):
        fxzip.merge(a, b, data=None, method="weight_average", refit=True, example_inputs=data[0])
    with pytest.raises(ValueError, match="positive ridge factor"):
        fxzip.merge(a, b, data=data, refit=-1.0, progress=False)


def test_partial_zip_refits_trunk_and_heads():
    """A partial zip's trunk is refit like a full zip; each head's first layers
    (holding W_k U_k) are refit to their own model's outputs. Both keep
    permutation recovery, and every head fit lowers its loss."""
    make, shape = MODELS["resnet20_bn"]
    data = batches(shape, 2)
    model = prepared(make(), data)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    merged = fxzip.merge(model, permuted, data=data, stop_at=9, refit=True, reset_bn=False, progress=False)
    fitted = merged.meta["fxzip"].details["refit"]
    assert fitted["layers"] > 0 and fitted["heads"]["layers"] == 2  # layer2.1.conv1 of each head
    assert_heads_compute(model, merged, data[:1], 2)
    other = prepared(make(), data, seed=5)
    merged = fxzip.merge(model, other, data=data, stop_at=9, refit=True, reset_bn=False, progress=False)
    for row in merged.meta["fxzip"].details["refit"]["heads"]["per_layer"].values():
        assert row["loss_refit"] < row["loss_folded"]
    assert not merged.meta["fxzip"].warnings


def test_partial_zip_refits_head_layers_behind_a_layer_norm():
    """A pre-norm ViT cut on its residual stream after block 0's attention: the
    block's MLP fc1 reads the trunk through the head's LayerNorm (norm2) and is
    refit (a permuted copy is still recovered exactly); the layers behind the
    next residual add are the head's own and are not."""
    make, shape = MODELS["vit"]
    data = batches(shape, 2)
    model = prepared(make(), data)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    merged = fxzip.merge(model, permuted, data=data, stop_at="add_1", refit=True, progress=False)
    heads = merged.meta["fxzip"].details["refit"]["heads"]
    assert sorted(heads["per_layer"]) == ["head0.blocks.0.mlp.fc1", "head1.blocks.0.mlp.fc1"]
    assert_heads_compute(model, merged, data[:1], 2)
