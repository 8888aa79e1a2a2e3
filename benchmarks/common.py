"""Helpers shared by the benchmark scripts (imported by plain name: the scripts run as
``python benchmarks/NAME.py``, so Python puts this folder first on ``sys.path``).

* ``HERE`` / ``ROOT`` / ``RESULTS`` / ``CHECKPOINTS``: the benchmark folder, the repository root, and where
  results and trained checkpoints live;
* ``redraw`` (``fxzip.zoo.redraw``, the tests' too): re-draw a model's weights at O(1) scale
  (random-init models whose merges are not degenerate), for the scripts that time merges without
  trained checkpoints.

The CIFAR-10 protocol helpers (data, class vectors, pairs, scoring) live in ``cifar_data.py``
and ``eval_cifar.py``, which the other CIFAR scripts import the same way.
"""
from __future__ import annotations

from pathlib import Path

from fxzip.zoo import redraw  # noqa: F401  (re-exported for the scripts)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
CHECKPOINTS = HERE / "checkpoints"
