"""Rules and matchers registered for a block of code only (issue 13, item 7):
what they replaced comes back afterwards."""
from __future__ import annotations

import pytest
import torch
from helpers import assert_same_function, prepared
from torch import nn

import fxzip
from fxzip.matching import MATCHERS, matcher_registered, unregister_matcher, weight_average
from fxzip.rules import rule_registered, unregister_rule
from fxzip.rules.registry import _MODULE_RULES


class Doubling(nn.Module):
    """A leaf fxzip knows nothing about (channel-wise: x * 2)."""

    def forward(self, x):
        return x * 2


fxzip.register_leaf_module(Doubling)


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), Doubling(), nn.Conv2d(8, 4, 3))


def test_a_rule_registered_for_a_block_only():
    data = [torch.randn(4, 3, 10, 10)]
    a, b = prepared(net(), data, 0), prepared(net(), data, 1)
    with pytest.raises(ValueError, match="Doubling"):
        fxzip.merge(a, b, data=data, progress=False)
    elementwise = _MODULE_RULES[nn.ReLU]  # x * 2 treats channels as ReLU does: one by one
    with rule_registered(elementwise, Doubling):
        merged = fxzip.merge(a, a, data=data, progress=False, reset_bn=False)
    assert_same_function(a, merged, data)
    with pytest.raises(ValueError, match="Doubling"):
        fxzip.merge(a, b, data=data, progress=False)  # gone again
    with rule_registered(lambda ctx, node: None, nn.ReLU):
        assert _MODULE_RULES[nn.ReLU] is not elementwise
    assert _MODULE_RULES[nn.ReLU] is elementwise  # a built-in rule it replaced comes back
    with pytest.raises(KeyError, match="no rule is registered"):
        unregister_rule(Doubling)


def test_a_matcher_registered_for_a_block_only():
    data = [torch.randn(4, 3, 10, 10)]
    a = prepared(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)), data, 0)
    with matcher_registered("plain_average", weight_average):
        merged = fxzip.merge(a, a, data=data, method="plain_average", progress=False)
        assert merged.meta["fxzip"].method == "plain_average"
    assert "plain_average" not in MATCHERS
    with pytest.raises(ValueError, match="unknown method 'plain_average'"):
        fxzip.merge(a, a, data=data, method="plain_average", progress=False)
    with pytest.raises(KeyError, match="no matcher is registered"):
        unregister_matcher("plain_average")
