"""Helpers shared by the benchmark scripts (imported by plain name: the scripts run as
``python benchmarks/NAME.py``, so Python puts this folder first on ``sys.path``).

* ``HERE`` / ``ROOT`` / ``RESULTS`` / ``CHECKPOINTS``: the benchmark folder, the repository root, and where
  results and trained checkpoints live;
* :func:`redraw`: re-draw a model's weights at O(1) scale (random-init models whose merges are
  not degenerate), for the scripts that time merges without trained checkpoints.

The CIFAR-10 protocol helpers (data, class vectors, pairs, scoring) live in ``cifar_data.py``
and ``eval_cifar.py``, which the other CIFAR scripts import the same way.
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
CHECKPOINTS = HERE / "checkpoints"


def redraw(model, seed: int = 0):
    """Re-draw every floating parameter/buffer of ``model`` in place at O(1) scale.

    The same draws as ``tests/helpers.py``'s ``redraw`` (benchmarks/results/distributed.json was
    measured with that one): running variances in [0.5, 1.5), means and biases N(0, 0.3^2),
    vectors / scales +-[0.5, 1.5) with 20 % negative, weights He-normal.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_var":
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif leaf == "running_mean" or leaf == "bias":
                t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
            elif t.dim() <= 1 or "gamma" in leaf or "token" in leaf or "pos" in leaf or "scale" in leaf:
                sign = torch.where(torch.rand(t.shape, generator=gen) < 0.2, -1.0, 1.0)
                t.copy_(sign * (torch.rand(t.shape, generator=gen) + 0.5))
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
    return model
