"""pytest configuration: the shared helpers live in helpers.py (importable by tests).

The suite runs on pytest-xdist workers (``-n auto`` in pyproject.toml), one per
core. torch would give every worker a thread per core, and oversubscribed
intra-op threads make CPU tests several times slower than one thread each, so
each worker (and every subprocess a test starts, through ``OMP_NUM_THREADS``)
gets its share of the cores.
"""
from __future__ import annotations

import os

import torch

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _workers > 1:
    _threads = max(1, (os.cpu_count() or 1) // _workers)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)
