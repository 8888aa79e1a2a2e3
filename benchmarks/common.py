"""Helpers shared by the benchmark scripts (imported by plain name: the scripts run as
``python benchmarks/NAME.py``, so Python puts this folder first on ``sys.path``).

* ``HERE`` / ``ROOT`` / ``RESULTS`` / ``CHECKPOINTS``: the benchmark folder, the repository root, and where
  results and trained checkpoints live;
* ``machine``: the facts every result file records about the machine it ran on;
* ``git_commit``: the commit the scripts ran at (short), "unknown" outside a clone;
* ``max_rel_weight_diff``: how far two models' weights are apart (largest |a - b| / max |a|);
* ``redraw`` (``fxzip.zoo.redraw``, the tests' too): re-draw a model's weights at O(1) scale
  (random-init models whose merges are not degenerate), for the scripts that time merges without
  trained checkpoints.

The CIFAR-10 protocol helpers (data, class vectors, pairs, scoring) live in ``cifar_data.py``
and ``eval_cifar.py``, which the other CIFAR scripts import the same way.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
CHECKPOINTS = HERE / "checkpoints"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def machine(packages: tuple[str, ...] = ("torch", "timm")) -> dict:
    """uname, CPU model, cores, Python and the versions of ``packages`` (read
    from their metadata, without importing them: seconds each), one torch
    thread, and the load average when the run started."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    try:
        uname = subprocess.run(["uname", "-a"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        uname = " ".join(platform.uname())
    return {"uname": uname, "cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            **{pkg: ver(pkg) for pkg in packages}, "torch_threads": 1,
            "load_avg_start": [round(v, 2) for v in os.getloadavg()]}


def git_commit(length: int = 10) -> str:
    """The repository's HEAD, ``length`` hex digits ("unknown" without git or a clone)."""
    try:
        out = subprocess.run(["git", "rev-parse", f"--short={length}", "HEAD"], capture_output=True, text=True,
                             cwd=ROOT).stdout.strip()
    except OSError:
        return "unknown"
    return out or "unknown"


def max_rel_weight_diff(a, b) -> float:
    """Largest |a - b| / max |a| over the floating tensors of two models' state dicts (same order)."""
    worst = 0.0
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        if p.is_floating_point() and p.numel():
            worst = max(worst, float((p - q).abs().max() / p.abs().max().clamp_min(1e-30)))
    return worst


def __getattr__(name: str):
    """``from common import redraw`` (``fxzip.zoo.redraw``), imported on first use
    so that a driver reading only ``machine`` or the paths does not import torch."""
    if name == "redraw":
        from fxzip.zoo import redraw

        return redraw
    raise AttributeError(name)
