"""Bad inputs to fxzip.merge fail with a clear error before any calibration work;
good inputs are never modified and give deterministic results."""

from __future__ import annotations

import re

import pytest
import torch
import torch.fx
from torch import nn

import fxzip
from fxzip import zoo
from fxzip.stats import SpaceObserver


def channel_flip(x: torch.Tensor) -> torch.Tensor:
    """An op fxzip has no rule for, kept opaque by torch.fx.wrap."""
    return x.flip(1)


torch.fx.wrap("channel_flip")


@pytest.fixture
def observer_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calibration batches seen by any SpaceObserver (fxzip code, not torch)."""
    calls: list[int] = []
    forward = SpaceObserver.forward

    def counting(self, *features, **kwargs):
        calls.append(1)
        return forward(self, *features, **kwargs)

    monkeypatch.setattr(SpaceObserver, "forward", counting)
    return calls


def images(channels: int = 3, size: int = 8, n: int = 1, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, channels, size, size, generator=g) for _ in range(n)]


def cnn(seed: int, out_dim: int = 10, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.small_cnn(out_dim=out_dim, in_channels=3, **kwargs)


def merge(*models, **kwargs):
    kwargs.setdefault("data", images())
    kwargs.setdefault("progress", False)
    return fxzip.merge(*models, **kwargs)


# ------------------------------------------------------------- architecture

class Act(nn.Module):
    def __init__(self, act: type[nn.Module]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = act()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(self.act(self.conv(x)))))


def test_different_layer_types_name_the_node(observer_calls: list[int]) -> None:
    """Models that differ after a shared layer: a partial zip there, the report says why;
    asking for more than they share fails before any calibration."""
    with pytest.raises(ValueError, match=r"stop_at='fc' lies beyond .*first differing node 'act'"):
        merge(Act(nn.ReLU), Act(nn.GELU), stop_at="fc")
    assert observer_calls == []
    report = merge(Act(nn.ReLU), Act(nn.GELU)).meta["fxzip"]
    assert report.cut.name == "conv" and "first differing node 'act'" in report.cut_reason


def test_different_widths_name_the_first_node() -> None:
    with pytest.raises(ValueError, match=r"node 'conv1'"):
        merge(cnn(0, width=16), cnn(1, width=8))


def test_different_widths_are_rejected(observer_calls: list[int]) -> None:
    with pytest.raises(ValueError, match=r"differ.*conv1.*one architecture"):
        merge(cnn(0, width=16), cnn(1, width=8))
    assert observer_calls == []


def test_different_output_sizes_zip_the_shared_trunk() -> None:
    a, b = cnn(0, out_dim=10), cnn(1, out_dim=5)
    partial = merge(a, b)
    assert "differ" in partial.meta["fxzip"].cut_reason and "'fc" in partial.meta["fxzip"].cut_reason
    x = images()[0]
    with torch.no_grad():
        out_a, out_b = partial(x)
    assert out_a.shape == a(x).shape and out_b.shape == b(x).shape


def test_third_model_differs(observer_calls: list[int]) -> None:
    with pytest.raises(ValueError, match=r"model 0 and model 2 differ"):
        merge(cnn(0), cnn(1), cnn(2, width=8), alpha=0.5)
    assert observer_calls == []


# ---------------------------------------------------------------- tracing

class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if x.sum() > 0:
            h = torch.relu(h)
        return self.fc(h.mean((2, 3)))


def test_untraceable_model(observer_calls: list[int]) -> None:
    with pytest.raises(fxzip.TraceError, match=r"cannot capture Branchy: Python control flow depends on tensor "
                       r"values at .*test_errors.py:\d+ in forward: `if x.sum\(\) > 0:`") as info:
        merge(Branchy(), Branchy())
    assert isinstance(info.value, ValueError)
    assert "register_leaf_module" in str(info.value)
    assert observer_calls == []


def test_trace_advice_names_real_functions() -> None:
    with pytest.raises(fxzip.TraceError) as info:
        merge(Branchy(), Branchy())
    named = set(re.findall(r"fxzip\.(\w+)", str(info.value)))
    assert named and all(hasattr(fxzip, name) for name in named), named


# --------------------------------------------------------------- analysis

class Unknown(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = torch.fft.fft(h).real if self.op == "fft" else channel_flip(h)
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("op,name", [("fft", "fft"), ("wrapped", "flip")])
def test_unknown_op_on_channels(op: str, name: str, observer_calls: list[int]) -> None:
    """A helper a library wrapped for torch.fx (``channel_flip``) is captured as
    the ops it runs: the error names the op, ``torch.flip``, and the line."""
    with pytest.raises(fxzip.AnalysisError, match=rf"no channel rule for .*{name}.*test_errors.py:\d+.*register_rule"):
        merge(Unknown(op), Unknown(op))
    assert observer_calls == []


def test_depthwise_and_layer_like_group_norm_are_fine() -> None:
    """The boundaries of the group check: groups == C (depthwise) and GroupNorm(1, C) merge."""

    class Ok(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.gn = nn.GroupNorm(1, 8)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.gn(self.dw(torch.relu(self.conv(x))))).mean((2, 3)))

    torch.manual_seed(0)
    a = Ok()
    out = merge(a, Ok(), method="permute")
    assert isinstance(out, torch.fx.GraphModule)


# ------------------------------------------------------------------- data

def test_empty_data(observer_calls: list[int]) -> None:
    with pytest.raises(ValueError, match="empty"):
        merge(cnn(0), cnn(1), data=[])
    with pytest.raises(ValueError, match="empty"):
        merge(cnn(0), cnn(1), data=iter([]))
    assert observer_calls == []


def test_no_data(observer_calls: list[int]) -> None:
    with pytest.raises(ValueError, match="needs data"):
        merge(cnn(0), cnn(1), data=None)
    with pytest.raises(TypeError, match="single tensor"):
        merge(cnn(0), cnn(1), data=torch.randn(4, 3, 8, 8))
    assert observer_calls == []


def test_wrong_input_shape(observer_calls: list[int]) -> None:
    with pytest.raises(ValueError, match=r"shape \[\(4, 1, 8, 8\)\](.|\n)*shape the model expects"):
        merge(cnn(0), cnn(1), data=images(channels=1))
    assert observer_calls == []


def test_dict_batches_with_keys_the_forward_does_not_take(observer_calls: list[int]) -> None:
    """A dict batch is laid out along the forward's parameters by name; a key it
    does not take is named with the parameters and the way out (``inputs=``)."""
    data = [{"image": x} for x in images()]
    with pytest.raises(TypeError, match=r"\['image'\] that the model's forward does not take \(its parameters: "
                                        r"\['x'\]\).*inputs="):
        merge(cnn(0), cnn(1), data=data)
    assert observer_calls == []


# ---------------------------------------------------------------- arguments

def test_different_dtypes(observer_calls: list[int]) -> None:
    with pytest.raises(ValueError, match=r"devices/dtypes.*float32.*float64"):
        merge(cnn(0), cnn(1).double())
    assert observer_calls == []


def test_too_few_models(observer_calls: list[int]) -> None:
    with pytest.raises(ValueError, match="at least two models, got 1"):
        merge(cnn(0))
    with pytest.raises(ValueError, match="at least two models, got 0"):
        merge()
    with pytest.raises(TypeError, match="not an nn.Module"):
        merge(cnn(0), cnn(1).state_dict())
    assert observer_calls == []


def test_unknown_method(observer_calls: list[int]) -> None:
    with pytest.raises(ValueError, match=r"unknown method 'zipp'.*permute.*weight_average.*zipit"):
        merge(cnn(0), cnn(1), method="zipp")
    assert observer_calls == []


@pytest.mark.parametrize("kwargs,match", [(dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"),
                                          (dict(beta=2.0), "beta"), (dict(beta=-1e-9), "beta"),
                                          (dict(max_batches=0), "max_batches")])
def test_out_of_range_arguments(kwargs: dict, match: str, observer_calls: list[int]) -> None:
    with pytest.raises(ValueError, match=match):
        merge(cnn(0), cnn(1), **kwargs)
    assert observer_calls == []


def test_alpha_zero_with_three_models(observer_calls: list[int]) -> None:
    with pytest.raises(ValueError, match=r"alpha=0.*3 models"):
        merge(cnn(0), cnn(1), cnn(2), alpha=0.0)
    assert observer_calls == [], "alpha=0 with 3 models must fail before calibration"


def test_stop_at_that_is_not_a_cut_lists_the_cut_points(observer_calls: list[int]) -> None:
    with pytest.raises(ValueError, match=r"not a cut point.*Cut points"):
        merge(cnn(0), cnn(1), stop_at="no_such_node")
    with pytest.raises(ValueError, match=r"out of range.*\[0, "):
        merge(cnn(0), cnn(1), stop_at=999)
    assert observer_calls == []


# ------------------------------------------------- no mutation, determinism

def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {name: m.training for name, m in model.named_modules()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "ptr": {k: v.data_ptr() for k, v in model.state_dict().items()},
    }


@pytest.mark.parametrize("method", ["zipit", "weight_average"])
def test_inputs_are_never_mutated(method: str, observer_calls: list[int]) -> None:
    a, b = cnn(0), cnn(1)
    # non-trivial batch-norm statistics, and one submodule in eval mode
    with torch.no_grad():
        for m in (a, b):
            m.train()
            m(images()[0])
            m.bn2.eval()
    before = [snapshot(a), snapshot(b)]
    merged = merge(a, b, method=method)
    assert (len(observer_calls) > 0) == (method != "weight_average")  # the counter sees calibration
    for model, snap in zip((a, b), before):
        after = snapshot(model)
        assert after["training"] == snap["training"]
        assert after["grad"] == snap["grad"]
        assert after["ptr"] == snap["ptr"]
        assert after["state"].keys() == snap["state"].keys()
        for k, v in snap["state"].items():
            assert torch.equal(after["state"][k], v), k
    # the result shares no storage with the inputs
    inputs = {v.data_ptr() for m in (a, b) for v in m.state_dict().values()}
    assert not inputs & {v.data_ptr() for v in merged.state_dict().values()}


def test_merge_is_deterministic() -> None:
    a, b = cnn(0), cnn(1)
    first = merge(a, b).state_dict()
    second = merge(a, b).state_dict()
    assert first.keys() == second.keys()
    for k in first:
        assert torch.equal(first[k], second[k]), k
    # the result is a new model, not a copy of an input (which would be trivially deterministic)
    for model in (a, b):
        state = model.state_dict()
        assert any(not torch.equal(first[k], state[k]) for k in first if first[k].is_floating_point())


# ------------------------------------------------------------------- data-free merges

def test_data_free_needs_a_weight_only_method(observer_calls: list[int]) -> None:
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"method='zipit' matches features by their activations.*mudsc"):
        fxzip.merge(cnn(0), cnn(1), data=None, example_inputs=x)
    with pytest.raises(ValueError, match=r"no activations.*weight_similarity=1.0"):
        fxzip.merge(cnn(0), cnn(1), data=None, example_inputs=x, method="mudsc")
    with pytest.raises(ValueError, match=r"reset_bn=True needs data"):
        fxzip.merge(cnn(0), cnn(1), data=None, example_inputs=x, method="mudsc", weight_similarity=1.0,
                    reset_bn=True)
    with pytest.raises(TypeError, match=r"example_inputs"):
        fxzip.merge(cnn(0), cnn(1), data=None, method="mudsc", weight_similarity=1.0)
    with pytest.raises(ValueError, match=r"weight_similarity must be in \[0, 1\]"):
        fxzip.merge(cnn(0), cnn(1), data=[x], method="mudsc", weight_similarity=1.5)
    assert observer_calls == []
