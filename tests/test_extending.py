"""The README's "Extending" example, run (issue 13, item 7): a rule for
``torch.roll`` along the channels, which fxzip's built-in rule refuses.

A roll by ``s`` of ``C`` channels puts the last ``s`` channels first:
``out[c] = x[(c - s) % C]``. The rule says so in channel ranges of the input's
feature space (``channel_range``); fxzip then matches the two ranges apart, so
every merge, permutation and fold keeps ``roll`` exact.
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_same_function, batches, prepared
from torch import nn

import fxzip
from fxzip.layout import Layout
from fxzip.rules import group_aware, lookup_function_rule, rule_registered
from fxzip.rules.shape import channel_range

builtin_roll = lookup_function_rule(torch.roll)  # fxzip's own: rolls over axes without channels


@group_aware  # like the built-in rule it replaces, it sees attention heads too (and hands them back)
def channel_roll(ctx, node):
    x = node.args[0]
    lay = ctx.layout(x)
    shifts, dims = ctx.arg(node, 1, "shifts"), ctx.arg(node, 2, "dims")
    if lay.grouped or not lay.has_channels or not isinstance(dims, int) or dims % ctx.ndim(x) != lay.dim:
        return builtin_roll(ctx, node)  # a roll over other axes (Swin's shifted windows): the built-in rule
    n = lay.length  # elements along the channel axis
    s = shifts % n
    rolled = channel_range(ctx, node, lay.segments, n - s, n) + channel_range(ctx, node, lay.segments, 0, n - s)
    ctx.set(node, Layout(lay.dim, rolled), passthrough=True)


class RolledNet(nn.Module):
    """A small CNN that rolls its channels by 3, once as a function, once as a method."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.roll(x, shifts=3, dims=1)
        x = torch.relu(self.bn2(self.conv2(x))) + x.roll(-2, 1)
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def data():
    return batches((8, 3, 8, 8), 2)


def test_without_the_rule_the_roll_is_refused_by_name(data):
    model = prepared(RolledNet(), data)
    with pytest.raises(fxzip.AnalysisError, match=r"node 'roll' \(function torch.roll\): rolls axes \[1\] of 8 "
                       r"channels on axis 1, which moves channels.*register a rule"):
        fxzip.merge(model, model, data=data, progress=False)


def test_with_the_rule_merges_are_exact(data):
    model = prepared(RolledNet(), data)
    with rule_registered(channel_roll, torch.roll, "roll"):
        merged = fxzip.merge(model, model, data=data, reset_bn=False, progress=False)
        assert_same_function(model, merged, data)  # self-merge: the identity
        permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
        assert_same_function(model, permuted, data)  # channels really moved through the rolls
        assert not torch.equal(permuted.state_dict()["conv2.weight"], model.state_dict()["conv2.weight"])
        for method, kwargs in (("permute", {}), ("zipit", {"beta": 0.0})):
            recovered = fxzip.merge(model, permuted, data=data, method=method, reset_bn=False, progress=False,
                                    **kwargs)
            assert_same_function(model, recovered, data)  # the permutation is found back
    assert lookup_function_rule(torch.roll) is builtin_roll  # the built-in rule is back after the block


def test_a_wrong_rule_is_caught(data):
    """The tests above can fail: a rule that says the roll keeps channels in
    place (the built-in spatial behaviour) gives a merge that is not the identity
    once the channels are permuted."""
    model = prepared(RolledNet(), data)

    def keeps_channels(ctx, node):
        ctx.set(node, ctx.layout(node.args[0]), passthrough=True)

    with rule_registered(keeps_channels, torch.roll, "roll"):
        permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
        with torch.no_grad():
            assert not torch.allclose(model(data[0]), permuted(data[0]), atol=1e-3)


# -- a matcher: the README's example, registered for a block

def hungarian(stats, n_models, size, **_):
    """Model k's feature j joins the model-0 feature it is most correlated with,
    one to one (a linear sum assignment per model): fxzip's "permute", written out."""
    from scipy.optimize import linear_sum_assignment

    from fxzip.matching import Match

    corr = stats.correlation().nan_to_num(0.0)  # features stacked [model 0 | model 1 | ...]
    assign = [torch.arange(size)]
    for k in range(1, n_models):
        rows, cols = linear_sum_assignment(corr[:size, k * size:(k + 1) * size].numpy(), maximize=True)
        a = torch.empty(size, dtype=torch.long)
        a[torch.as_tensor(cols)] = torch.as_tensor(rows)
        assign.append(a)
    return Match(torch.stack(assign), within=[0] * n_models, cross=size * (n_models - 1))


def test_a_registered_matcher_recovers_a_permutation(data):
    from fxzip.matching import MATCHERS, matcher_registered
    from fxzip.zoo import small_cnn

    model = prepared(small_cnn(out_dim=5, in_channels=3, width=8), data)
    permuted = fxzip.permute_channels(model, seed=2, example_inputs=data[0])
    with matcher_registered("hungarian", hungarian):
        merged = fxzip.merge(model, permuted, data=data, method="hungarian", reset_bn=False, progress=False)
    assert "hungarian" not in MATCHERS
    assert merged.meta["fxzip"].method == "hungarian"
    assert_same_function(model, merged, data)
