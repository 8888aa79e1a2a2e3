"""Merging with several processes (``fxzip.distributed``, issue 14).

Two CPU processes (gloo, ``torch.multiprocessing`` spawn, one torch thread
each) merge a BatchNorm ResNet-20 and a small ViT, two different models each,
every rank on its half of the batches; the parent merges the same models on
all batches in one process (one thread too: the float32 block products then
run the same kernels). Both ranks must hold identical statistics, assignments
and weights (bit for bit), equal to one process's up to the order of the
float64 additions. Then the failure modes, each of which must raise on every
rank within seconds, and ``fxzip merge`` under ``torchrun``.

One spawn runs every case (starting a process that imports fxzip takes
seconds here); the workers save what they computed and the tests compare.
"""
from __future__ import annotations

import copy
import os
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import batches, max_rel_diff, prepared

import fxzip
from fxzip import distributed as fd
from fxzip import zoo

WORLD = 2
SPAWN_TIMEOUT = 240  # seconds for the whole spawn (imports included); a hang fails instead of blocking CI
FAIL_WITHIN = 5.0  # seconds: a failure mode must raise on every rank this fast

# name -> (architecture, input shape, number of batches, merge keywords, sharding)
CASES = {
    "cnn_full": ("cnn", (8, 3, 16, 16), 4, {"reset_bn": True}, "halves"),
    "cnn_partial": ("cnn", (8, 3, 16, 16), 4, {"stop_at": 7, "reset_bn": True}, "halves"),
    "vit_full": ("vit", (4, 3, 16, 16), 4, {}, "strided"),
    "vit_mudsc_partial": ("vit", (4, 3, 16, 16), 4, {"method": "mudsc", "stop_at": 5}, "strided"),
    "vit_refit_repair": ("vit", (4, 3, 16, 16), 4, {"refit": True, "repair": True}, "strided"),
}


def _tolerance(name: str) -> float:
    """1e-5; a refit writes float32 weights solved in float64, and a last-ulp
    difference there (from the float64 sums' order) feeds every later layer's
    fit, so those weights agree to 1e-4."""
    return 1e-4 if CASES[name][3].get("refit") else 1e-5


def _models(arch: str, shape, n_batches: int):
    """Two different models (seeds 0 and 1) and the calibration batches; the same
    on every rank and in the parent."""
    data = batches(shape, n_batches, seed=7)
    make = (lambda: zoo.resnet20(width=1)) if arch == "cnn" else (
        lambda: zoo.cifar_vit(depth=2, patch_size=4, img_size=16, out_dim=10))
    torch.manual_seed(0)
    a, b = prepared(make(), data, seed=0), prepared(make(), data, seed=1)
    return a, b, data


def _shard(data: list, how: str, rank: int, world: int) -> list:
    if how == "halves":
        per = len(data) // world
        return data[rank * per:(rank + 1) * per]
    return data[rank::world]


def _summary(cal, merged) -> dict:
    report = merged.meta["fxzip"]
    return {"stats": {i: (st.count, st.total.clone(), st.gram.clone(), st.shift.clone()) for i, st in cal.stats.items()},
            "assign": [row.assignment for row in report.spaces],
            "state": {k: v.clone() for k, v in merged.state_dict().items()},
            "batches": report.calib_batches, "samples": report.calib_samples}


def _run_case(name: str, rank: int = 0, world: int = 1) -> dict:
    arch, shape, n_batches, kwargs, how = CASES[name]
    with fd.local():  # the models are built alike on every rank, each on all batches
        a, b, data = _models(arch, shape, n_batches)
    shard = _shard(data, how, rank, world) if world > 1 else data
    cal = fxzip.calibrate(a, b, data=shard, progress=False)
    merged = fxzip.merge(a, b, data=cal, progress=False, seed=3, **kwargs)
    return _summary(cal, merged)


def _failure_cases(rank: int) -> dict:
    """Each failure mode on both ranks: (exception type, message, seconds)."""
    a, b, data = _models("cnn", (8, 3, 16, 16), 2)
    shard = data[rank:rank + 1]
    cases = {
        "no data": lambda: fxzip.merge(a, b, data=shard if rank == 0 else [], progress=False),
        "different models": lambda: fxzip.merge(a, b if rank == 0 else _nudged(b), data=shard, progress=False),
        "different settings": lambda: fxzip.merge(a, b, data=shard, alpha=0.3 if rank == 0 else 0.5, progress=False),
        "trace fails on one rank": lambda: fxzip.merge(
            a, b, data=shard if rank == 0 else [torch.randn(8, 4, 16, 16)], progress=False),
        "reset on one empty rank": lambda: fxzip.reset_norm_stats(copy.deepcopy(a), shard if rank == 0 else []),
    }
    out = {}
    for key, call in cases.items():
        start = time.perf_counter()
        try:
            call()
            out[key] = (None, "no error", time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - recorded for the parent to check
            out[key] = (type(exc).__name__, str(exc), time.perf_counter() - start)
    return out


def _nudged(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.get_parameter("layer2.1.conv1.weight")[0, 0, 0, 0] += 1e-3
    return other


CLI_ARGS = ["merge", "m0.pt", "m1.pt", "--model", "mynets:make", "--num-classes", "4", "--data", "x.pt",
            "--batch-size", "8", "--quiet"]


def _cli_files(root: Path) -> None:
    """Two checkpoints of a module:factory CNN and a float tensor file of 3 batches."""
    (root / "mynets.py").write_text("from fxzip.zoo import small_cnn\n\n"
                                    "def make(num_classes=10):\n"
                                    "    return small_cnn(out_dim=num_classes, in_channels=3, width=8)\n")
    from fxzip.zoo import small_cnn

    data = batches((8, 3, 16, 16), 3)
    for seed in (0, 1):
        model = prepared(small_cnn(out_dim=4, in_channels=3, width=8), data, seed)
        torch.save(model.state_dict(), root / f"m{seed}.pt")
    torch.save(torch.cat(data), root / "x.pt")


def _run_cli(root: Path, out: str) -> int:
    from fxzip.cli import main

    cwd = os.getcwd()
    sys.path.insert(0, str(root))
    os.chdir(root)
    try:
        return main(CLI_ARGS + ["--out", out])
    finally:
        os.chdir(cwd)
        sys.path.remove(str(root))
        sys.modules.pop("mynets", None)


def _save_on_every_rank(root: Path, rank: int) -> bool:
    """``fxzip.save`` called on every rank: whether this rank wrote its directory."""
    a, b, data = _models("cnn", (8, 3, 16, 16), 1)
    merged = fxzip.merge(a, b, data=None, method="weight_average", example_inputs=data[0], progress=False)
    out = fxzip.save(merged, root / f"saved_by_rank{rank}")
    return out == root / f"saved_by_rank{rank}" and (out / "model.safetensors").exists()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # what torchrun sets: fxzip's own start-up (fd.from_env, as `fxzip merge` uses it) makes the gloo group
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    results: dict = {}
    try:
        with fd.from_env():
            assert fd.active() and fd.rank() == rank and fd.world_size() == world
            for name in CASES:
                results[name] = _run_case(name, rank, world)
            results["failures"] = _failure_cases(rank)
            results["cli"] = _run_cli(Path(out_dir), "two")
            results["saved"] = _save_on_every_rank(Path(out_dir), rank)
        results["destroyed"] = not dist.is_initialized()
    except Exception:  # noqa: BLE001 - the parent shows it
        results["crash"] = traceback.format_exc()
    finally:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results (one spawn) and one process's on all batches."""
    out = tmp_path_factory.mktemp("dist")
    _cli_files(out)
    # a spawned child imports this module by the name pytest gave it: "tests.test_distributed" when a
    # file path is given on the command line, which needs the repository root on the children's sys.path
    root = str(Path(__file__).resolve().parents[1])
    sys.path.append(root)
    try:
        ctx = mp.start_processes(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    finally:
        sys.path.remove(root)
    threads = torch.get_num_threads()
    deadline = time.monotonic() + SPAWN_TIMEOUT
    try:
        torch.set_num_threads(1)  # the references, computed while the workers start
        try:
            reference = {name: _run_case(name) for name in CASES}
            assert _run_cli(out, "one") == 0
        finally:
            torch.set_num_threads(threads)
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} ranks did not finish within {SPAWN_TIMEOUT} s (a hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    got = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(got):
        assert "crash" not in res, f"rank {r}:\n{res['crash']}"
    return got, reference, out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) / scale if scale else float((a - b).abs().max()) if a.numel() else 0.0


@pytest.mark.parametrize("name", list(CASES))
def test_every_rank_holds_the_same_statistics_and_weights_bit_for_bit(ranks, name):
    got, _, _ = ranks
    r0, r1 = got[0][name], got[1][name]
    assert r0["stats"].keys() == r1["stats"].keys()
    for i in r0["stats"]:
        for x, y in zip(r0["stats"][i], r1["stats"][i]):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert r0["assign"] == r1["assign"]
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_on_halves_equal_one_process_on_all_batches(ranks, name):
    got, reference, _ = ranks
    dist_res, ref = got[0][name], reference[name]
    assert (dist_res["batches"], dist_res["samples"]) == (ref["batches"], ref["samples"])
    assert ref["stats"], "no statistics: nothing was compared"
    for i, (count, total, gram, shift) in ref["stats"].items():
        d_count, d_total, d_gram, d_shift = dist_res["stats"][i]
        assert d_count == count and torch.equal(d_shift, shift), f"space {i}: count or shift"
        assert _rel(d_total, total) <= 1e-6 and _rel(d_gram, gram) <= 1e-6, f"space {i}"
    assert dist_res["assign"] == ref["assign"]
    for k, want in ref["state"].items():
        if want.is_floating_point():
            assert _rel(dist_res["state"][k], want) <= _tolerance(name), k
        else:
            assert torch.equal(dist_res["state"][k], want), k
    if CASES[name][3].get("reset_bn"):  # the norm reset really ran on both halves: counts of one process
        tracked = [k for k in ref["state"] if k.endswith("num_batches_tracked")]
        assert tracked and all(int(dist_res["state"][k]) == int(ref["state"][k]) for k in tracked)


def test_one_process_differs_from_each_rank_alone(ranks):
    """The comparison above can fail: a rank merging its half alone (no
    all-reduce) gets other statistics and weights."""
    got, reference, _ = ranks
    with fd.local():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            arch, shape, n, kwargs, how = CASES["cnn_full"]
            a, b, data = _models(arch, shape, n)
            cal = fxzip.calibrate(a, b, data=_shard(data, how, 0, WORLD), progress=False)
            alone = _summary(cal, fxzip.merge(a, b, data=cal, progress=False, seed=3, **kwargs))
        finally:
            torch.set_num_threads(threads)
    ref = reference["cnn_full"]
    assert max(_rel(alone["stats"][i][2], ref["stats"][i][2]) for i in ref["stats"]) > 1e-3
    assert max(_rel(alone["state"][k], v) for k, v in ref["state"].items() if v.is_floating_point()) > 1e-3


EXPECTED = {
    "no data": "rank 1 got no data",
    "different models": "model 1 has different values in tensor 'layer2.1.conv1.weight'",
    "different settings": "alpha is 0.3 on rank 0 but 0.5 on rank 1",
    "trace fails on one rank": "rank 1 failed while reading its data, tracing",
    "reset on one empty rank": "rank 1 got no data",
}


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_failure_modes_raise_on_every_rank_before_any_pass(ranks, mode):
    got, _, _ = ranks
    for r in range(WORLD):
        kind, message, seconds = got[r]["failures"][mode]
        assert kind is not None, f"rank {r} did not raise for {mode!r}"
        assert seconds < FAIL_WITHIN, f"rank {r} took {seconds:.1f} s to raise for {mode!r}"
        if mode == "trace fails on one rank" and r == 1:
            assert kind != "DistributedError"  # the failing rank raises its own error
        else:
            assert kind == "DistributedError" and EXPECTED[mode] in message, (r, message)


def test_shard_batches_partitions_one_process_batches():
    parts = [fd.shard_batches(23, 5, rank=r, world_size=3) for r in range(3)]
    assert parts[0][0] == [0, 1, 2, 3, 4] and parts[1][0] == [5, 6, 7, 8, 9]
    flat = sorted(i for p in parts for b in p for i in b)
    assert flat == list(range(23))  # no sample repeated or dropped (DistributedSampler pads)
    assert [len(p) for p in parts] == [2, 2, 1]
    assert sum(len(p) for p in (fd.shard_batches(23, 5, 3, rank=r, world_size=2) for r in range(2))) == 3


def test_without_a_process_group_nothing_is_collective():
    assert not fd.active() and fd.is_main() and fd.world_size() == 1
    assert fd.sum_across_ranks({"a": 3, "b": [torch.ones(2)]})["a"] == 3


def test_fxzip_merge_in_two_processes_equals_one_process(ranks, capsys):
    """``fxzip merge`` in two processes (the group made from torchrun's
    environment, the data file sharded by batches) writes what one process
    writes, on rank 0 only, and leaves no process group behind."""
    import json

    from safetensors.torch import load_file

    got, _, root = ranks
    assert [g["cli"] for g in got] == [0, 0] and all(g["destroyed"] for g in got)
    one, two = (load_file(str(root / d / "model.safetensors")) for d in ("one", "two"))
    assert one.keys() == two.keys()
    for k in one:
        if one[k].is_floating_point() and one[k].abs().max() > 0:
            assert max_rel_diff(one[k], two[k]) <= 1e-5, k
        else:
            assert torch.equal(one[k], two[k]), k
    report = json.loads((root / "two" / "report.json").read_text())
    assert report["calibration"]["batches"] == 3  # both ranks' batches (2 + 1)
    assert report["settings"]["processes"] == 2


def test_save_writes_on_rank_0_only(ranks):
    """``fxzip.save`` called on every rank: rank 0 writes, the others return
    the directory without writing (no race on the files, no collective)."""
    got, _, _ = ranks
    assert [g["saved"] for g in got] == [True] + [False] * (WORLD - 1)


def test_sweep_refuses_torchrun(monkeypatch, capsys):
    from fxzip.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sweep", "a.pt", "b.pt", "--model", "resnet18", "--data", "x", "--eval", "p", "q"]) == 2
    assert "runs in one process" in capsys.readouterr().err


@pytest.mark.parametrize("device, message", [("tpu9", "is not a device"), ("meta", "runs on cpu or cuda")]
                         + ([] if torch.cuda.is_available() else [("cuda", "no CUDA device is visible")]))
def test_merge_device_is_checked_before_any_process_group(monkeypatch, capsys, device, message):
    from fxzip.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: the check comes before the group would be made
    assert main(["merge", "a.pt", "b.pt", "--model", "resnet18", "--data", "x", "--out", "o", "--device", device]) == 2
    assert message in capsys.readouterr().err and not dist.is_initialized()
