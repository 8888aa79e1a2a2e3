"""Shared fixtures: models re-drawn at O(1) scale, calibration batches, and the
invariant check.

Why re-draw: timm zero-initialises the last norm of every residual branch,
layer scales start at 1e-6 and fresh norm statistics are 0/1, so on a fresh
model a wrong fold is invisible. Every parameter is re-drawn at O(1) scale and
the batch-norm statistics are then recomputed on the test data (so no channel
is dead by accident and normalised activations stay O(1)).
"""
from __future__ import annotations

import torch
from torch import nn

import fxzip
from fxzip.zoo import redraw  # noqa: F401  (the tests import it from here)

TOL = 1e-5




def batches(shape: tuple[int, ...], n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


def prepared(model: nn.Module, data: list[torch.Tensor], seed: int = 0) -> nn.Module:
    """Eval-mode model with O(1) parameters and data-consistent norm statistics."""
    model = redraw(model.eval(), seed)
    fxzip.reset_norm_stats(model, data)
    return model


def max_rel_diff(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max(max_rel_diff(x, y) for x, y in zip(a, b))
    return float((a - b).abs().max() / a.abs().max())


def outputs(model: nn.Module, data: list[torch.Tensor]):
    with torch.no_grad():
        return [model(x) for x in data]


def assert_same_function(ref: nn.Module, other: nn.Module, data: list[torch.Tensor], tol: float = TOL) -> None:
    for want, got in zip(outputs(ref, data), outputs(other, data)):
        err = max_rel_diff(want, got)
        assert err <= tol, f"max |difference| / max |output| = {err:.3g} > {tol}"


def assert_heads_compute(ref: nn.Module, partial: nn.Module, data: list[torch.Tensor], n_heads: int,
                         tol: float = TOL) -> None:
    """Every head of a partial zip (a tuple, one output per model) computes ``ref``'s function."""
    for want, got in zip(outputs(ref, data), outputs(partial, data)):
        assert isinstance(got, tuple) and len(got) == n_heads
        for head in got:
            err = max_rel_diff(want, head)
            assert err <= tol, f"max |difference| / max |output| = {err:.3g} > {tol}"


def capture(gm, data, names) -> dict[str, list]:
    """The values of the named nodes of ``gm`` (a GraphModule) on every batch of
    ``data``, in float64: what a test compares a pass's statistics against."""
    import torch.fx as fx

    class _Capture(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in wanted:
                seen.setdefault(n.name, []).append(out.detach().double())
            return out

    wanted, seen = set(names), {}
    for x in data:
        _Capture(gm).run(x)
    return seen


def assert_merges_exactly(model: nn.Module, data: list[torch.Tensor], zipit: bool = True) -> None:
    """The three invariants on one model: its self-merge computes it; a permuted
    copy computes it too (the analysis is right); merging the copy back
    recovers it (with ``permute``, and with ``zipit`` unless told not to)."""
    assert_same_function(model, fxzip.merge(model, model, data=data, progress=False), data)
    permuted = fxzip.permute_channels(model, seed=1, example_inputs=data[0])
    assert_same_function(model, permuted, data)
    assert_same_function(model, fxzip.merge(model, permuted, data=data, method="permute", progress=False), data)
    if zipit:
        assert_same_function(model, fxzip.merge(model, permuted, data=data, progress=False), data)

