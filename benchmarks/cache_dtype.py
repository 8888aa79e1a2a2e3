"""What keeping the refit's cached activations in float16 / bfloat16 costs (issue 24).

``fxzip.merge(..., refit=True, cache_dtype=...)`` keeps the sequential
executor's cache in half precision (``passes/sequential.py``). For each
committed CIFAR-10 (5+5) pair of ``eval_methods.py`` (no-BatchNorm nets, where
the refit matters: the GroupNorm ResNet-20 and the ViT), one calibration is
reused by three ZipIt + refit merges (cache in float32, float16, bfloat16),
and each row records the joint / per-task accuracy (``eval_methods``'s
protocol), the cache's peak bytes, the bound on the relative rounding the cache
reported (``rounding_rel_bound``), the refit's seconds and the largest relative weight difference
from the float32 refit.

    OMP_NUM_THREADS=1 python benchmarks/cache_dtype.py --arch vit resnet20gn --pairs 0 1 2
    python benchmarks/cache_dtype.py --smoke        # random tiny models, synthetic images

Results: ``benchmarks/results/cache_dtype.{json,md}`` (rows cached in the
JSON: a re-run computes only the missing ones).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import cifar_data  # noqa: E402
import eval_cifar as ec  # noqa: E402
import eval_methods as em  # noqa: E402
from common import machine, max_rel_weight_diff  # noqa: E402

import fxzip  # noqa: E402

DTYPES = (None, "float16", "bfloat16")


def run_pair(arch: str, pair: int, data, vecs, args, log) -> list[dict]:
    if args.smoke:
        models, infos = ec.random_pair(pair, lambda: em.build(arch, smoke=True))
    else:
        models, infos = em.load_pair(arch, em.CKPT[arch], pair)
    tasks = [list(infos[0]["classes"]), list(infos[1]["classes"])]
    calib, test = em.pair_data(arch, data, sorted(tasks[0] + tasks[1]), args, pair)
    cal = fxzip.calibrate(*models, data=calib, progress=False)
    rows, reference = [], None
    for dtype in DTYPES:
        t0 = time.perf_counter()
        merged = fxzip.merge(*models, data=cal, method="zipit", refit=True, cache_dtype=dtype,
                             progress=False).eval()
        rep = merged.meta["fxzip"]
        memory = rep.details["refit"]["memory"]
        row = {"arch": arch, "pair": pair, "cache_dtype": dtype or "float32", "merge_seconds": time.perf_counter() - t0,
               "refit_seconds": rep.seconds.get("refit"), "peak_bytes": memory["peak_bytes"],
               "rounding_rel_bound": memory.get("rounding_rel_bound", 0.0),
               "values_kept_in_own_dtype": memory.get("values_kept_in_own_dtype", 0),
               **ec.score(merged, test, tasks, vecs)}
        if reference is None:
            reference = merged
        row["max_rel_weight_diff_vs_float32"] = max_rel_weight_diff(reference, merged)
        log(f"{arch} pair {pair} cache {row['cache_dtype']:8s} joint {row['joint']:5.2f} avg {row['avg']:5.2f} "
            f"peak {row['peak_bytes'] / 2**20:7.1f} MiB rounding {row['rounding_rel_bound']:.2e} "
            f"weights {row['max_rel_weight_diff_vs_float32']:.2e} ({row['merge_seconds']:.1f}s)")
        rows.append(row)
    for row in rows:
        row["peak_vs_float32"] = row["peak_bytes"] / rows[0]["peak_bytes"]
        row["joint_minus_float32"] = row["joint"] - rows[0]["joint"]
    return rows


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["arch"], r["cache_dtype"]), []).append(r)
    return out


def markdown(result: dict) -> str:
    lines = ["# Refit with the cached activations in float16 / bfloat16", "",
             f"- Command: `{result['command']}`",
             "- Machine: {uname}; {cpu}, {cores} cores, {torch_threads} torch thread; torch {torch}; load average "
             "at start {load_avg_start}".format(**result["machine"]),
             "- Protocol: `benchmarks/eval_methods.py`'s (committed checkpoints, calibration images of both tasks, "
             f"{result['config']['calib_images']} per pair; {result['config']['test_per_class']} test images per "
             "class); one `fxzip.calibrate` per pair, reused by the three ZipIt (alpha 0.3, beta 0.125) + refit "
             "merges.",
             "- peak: the executor's cache peak (`report.details['refit']['memory']['peak_bytes']`); rounding: the "
             "bound on the relative rounding of a cached value (`rounding_rel_bound`); weights: the largest relative weight difference from "
             "the float32-cache refit of the same pair.",
             "- refit s: `report.seconds['refit']`, one torch thread; the 2-core machine may have had other jobs "
             "(the load average at start is in the Machine line), so compare seconds within a pair only roughly.",
             "", "Mean over pairs, per arch and cache: " + "; ".join(
                 f"{arch} {dt}: joint - float32 {sum(r['joint_minus_float32'] for r in rs) / len(rs):+.2f}, "
                 f"peak {sum(r['peak_vs_float32'] for r in rs) / len(rs):.2f}x"
                 for (arch, dt), rs in _groups(result["rows"]).items()), "",
             "| arch | pair | cache | joint | task A | task B | avg | joint - float32 | peak MiB | peak / float32 "
             "| rounding | weights vs float32 | refit s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['arch']} | {r['pair']} | {r['cache_dtype']} | {r['joint']:.2f} | {r['task_a']:.2f} | "
                     f"{r['task_b']:.2f} | {r['avg']:.2f} | {r['joint_minus_float32']:+.2f} | "
                     f"{r['peak_bytes'] / 2**20:.1f} | {r['peak_vs_float32']:.2f} | {r['rounding_rel_bound']:.1e} | "
                     f"{r['max_rel_weight_diff_vs_float32']:.1e} | {r['refit_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=["vit", "resnet20gn"], choices=("vit", "resnet20gn"))
    ap.add_argument("--pairs", type=int, nargs="+", default=[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--calib-images", type=int, default=1000)
    ap.add_argument("--calib-batch", type=int, default=250)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--test-batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cache_dtype")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.calib_images, args.calib_batch, args.test_per_class, args.pairs = 16, 8, 4, args.pairs[:1]
    torch.set_num_threads(args.threads)
    json_path = args.out.with_suffix(".json")
    prior = [] if args.smoke or not json_path.exists() else json.loads(json_path.read_text())["rows"]
    data = (ec.synthetic_data(n_train=200, n_test=100) if args.smoke else
            cifar_data.load_cifar10(args.data or (ec.DEFAULT_DATA if ec.DEFAULT_DATA.exists() else None)))
    vecs = ec.class_vectors()
    by_key: dict[tuple, list[dict]] = {}
    for r in prior:
        by_key.setdefault((r["arch"], r["pair"]), []).append(r)
    command = "python benchmarks/cache_dtype.py " + " ".join(shlex.quote(a) for a in
                                                           (argv if argv is not None else sys.argv[1:]))
    result: dict = {}
    for arch in args.arch:
        for pair in args.pairs:
            if (arch, pair) in by_key:
                continue
            by_key[arch, pair] = run_pair(arch, pair, data, vecs, args, lambda m: print(m, flush=True))
            result = {"command": command, "machine": machine(), "config": vars(args) | {"out": str(args.out)},
                      "rows": [r for key in sorted(by_key) for r in by_key[key]]}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(result, indent=1, default=str))
            args.out.with_suffix(".md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    main()
