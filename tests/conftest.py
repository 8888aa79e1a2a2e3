"""pytest configuration: the shared helpers live in helpers.py (importable by tests).

The suite runs on pytest-xdist workers (``-n auto`` in pyproject.toml), one per
core. torch would give every worker a thread per core, and oversubscribed
intra-op threads make CPU tests several times slower than one thread each, so
each worker (and every subprocess a test starts, through ``OMP_NUM_THREADS``)
gets its share of the cores.
"""
from __future__ import annotations

import os

import pytest
import torch

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _workers > 1:
    _threads = max(1, (os.cpu_count() or 1) // _workers)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): small convs on a shared 2-core
    machine are many times slower with two oversubscribed threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
