"""Refit cost and order: the sequential executor against the wave schedule (and one pass on the folded inputs).

The exact refit fits each layer on inputs that already reflect the refit of
the layers before it. Two schedules compute it (``fxzip.passes.refit``):
``waves`` reads the data once per layer depth, each time through the merged
graph and the originals truncated after the wave's nodes; ``sequential``
(the default) reads it once and walks the merged graph and the originals
node by node over cached activations. They must give the same weights (up to
the order of float sums: the max relative weight difference is recorded) and
the same accuracy. ``spill`` is the sequential schedule with a memory budget
(``--spill-fraction`` of its unbounded peak): the weights must be bit for bit
the unbounded ones. ``one_pass`` fits every layer on the *folded* model's
inputs in a single wave (the approximation issue 12 asked about).

For each architecture and pair: ZipIt (the architecture's alpha / beta)
folded, then each mode on the same calibration images, scored on the test
images, with its passes (model passes over the data: one per model graph run
over the whole set), reads of the data, seconds and the forward-pass floor
(one pass of the merged model over the calibration images).

Example::

    nice -n 10 python benchmarks/refit_passes.py --archs resnet20x1 vit --pairs 0 1 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent

import eval_cifar as ec  # noqa: E402
import eval_methods as em  # noqa: E402
import probe_policy as pp  # noqa: E402
from common import max_rel_weight_diff  # noqa: E402

import fxzip  # noqa: E402
from fxzip.passes.refit import refit  # noqa: E402
from fxzip.passes.side_by_side import side_by_side  # noqa: E402

MODES = ("waves", "sequential", "spill", "one_pass")
CODE = ("passes/refit.py", "passes/sequential.py", "passes/waves.py", "passes/side_by_side.py",
        "benchmarks/refit_passes.py")  # what the commit line vouches for
MB = 2 ** 20


def _assign(report) -> dict[int, torch.Tensor]:
    return {s.index: torch.tensor(s.assignment) for s in report.spaces}


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *CODE],
                               cwd=HERE.parent, capture_output=True, text=True, check=True).stdout.strip()
        return sha + (" (with uncommitted changes to the refit's code)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["resnet20x1", "vit"], choices=sorted(pp.CKPT))
    ap.add_argument("--pairs", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--spill-fraction", type=float, default=0.25,
                    help="spill mode: max_memory as this fraction of the unbounded sequential peak")
    pp.add_protocol_args(ap)
    ap.add_argument("--out", default=str(HERE / "results" / "refit_passes"))
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    command = "python benchmarks/refit_passes.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                                       else argv))
    modes = [m for m in MODES if m in args.modes]
    if "spill" in modes and "sequential" not in modes:
        ap.error("--modes spill needs sequential (its budget is a fraction of the sequential peak)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.calib_images, args.calib_batch, args.test_per_class = 20, 10, 5
        data = ec.synthetic_data()
        vecs = F.normalize(torch.randn(10, ec.OUT_DIM, generator=torch.Generator().manual_seed(0)), dim=1)
        get = lambda arch, p: ec.random_pair(p, lambda: pp.build(arch, True))  # noqa: E731
    else:
        import cifar_data

        data, vecs, get = cifar_data.load_cifar10(args.data), ec.class_vectors(), pp.load_pair
    load_start, commit = os.getloadavg(), _commit()  # the code this process imports: HEAD when it starts
    rows = []
    for arch in args.archs:
        for p in args.pairs:
            models, infos = get(arch, p)
            tasks = [list(infos[0]["classes"]), list(infos[1]["classes"])]
            calib, test = em.pair_data("resnet20gn" if arch == "resnet20x1" else arch, data,
                                       sorted(tasks[0] + tasks[1]), args, p)
            alpha, beta = pp.ALPHA_BETA[arch]
            cal = fxzip.calibrate(*models, data=calib, progress=False)
            folded = fxzip.merge(*models, data=cal, alpha=alpha, beta=beta, reset_bn=False, progress=False)
            t0 = time.perf_counter()
            with torch.no_grad():
                for x in calib:
                    folded(x)
            floor = time.perf_counter() - t0
            row = {"arch": arch, "pair": p, "forward_floor_s": floor,
                   "folded": ec.score(fxzip.reset_norm_stats(copy.deepcopy(folded), calib), test, tasks, vecs)}
            joint, node_maps = side_by_side(cal.models, cal.common)
            fitted = {}
            for mode in modes:
                m = copy.deepcopy(folded)
                kwargs = {"schedule": "waves"} if mode == "waves" else {"one_pass": True} if mode == "one_pass" \
                    else {}
                if mode == "spill":
                    kwargs["max_memory"] = int(args.spill_fraction * row["sequential"]["memory"]["peak_bytes"])
                t0 = time.perf_counter()
                res = refit(m, cal.analysis, joint, node_maps, _assign(folded.meta["fxzip"]), cal.batches, **kwargs)
                seconds = time.perf_counter() - t0
                fitted[mode] = copy.deepcopy(m)  # before the norm reset: the weights the schedules fitted
                fxzip.reset_norm_stats(m, calib)
                row[mode] = {**ec.score(m, test, tasks, vecs), "passes": res.passes, "data_reads": res.data_reads,
                             "seconds": seconds, "x_floor": seconds / floor, "memory": res.memory}
            if "waves" in fitted and "sequential" in fitted:
                row["max_rel_weight_diff"] = max_rel_weight_diff(fitted["waves"], fitted["sequential"])
                row["waves_over_sequential_s"] = row["waves"]["seconds"] / row["sequential"]["seconds"]
            if "spill" in fitted:
                row["spill_bit_identical"] = all(torch.equal(a, b) for a, b in zip(
                    fitted["sequential"].state_dict().values(), fitted["spill"].state_dict().values()))
            rows.append(row)
            print(f"{arch} pair {p}: folded {row['folded']['joint']:.1f}, " + ", ".join(
                f"{mode} {row[mode]['joint']:.1f} ({row[mode]['passes']} passes, {row[mode]['seconds']:.1f}s)"
                for mode in modes) + f"; floor {floor:.2f}s", flush=True)
    lines = _markdown(rows, modes, args, command, commit, load_start)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + ".md").write_text("\n".join(lines) + "\n")
    Path(str(out) + ".json").write_text(json.dumps({"command": command, "commit": commit, "modes": modes,
                                                    "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))
    return {"rows": rows}


def _markdown(rows: list[dict], modes: list[str], args, command: str, commit: str, load_start) -> list[str]:
    f1 = lambda x: f"{x:.1f}"  # noqa: E731
    lines = ["# Refit: the sequential executor against the wave schedule", "",
             f"Command: `nice -n 10 {command}`", "", f"Commit: {commit} (HEAD when the run started)", "",
             f"Machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, load average {load_start[0]:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end (other jobs share the cores). ZipIt at each architecture's "
             f"alpha / beta, {args.calib_images} calibration images in batches of {args.calib_batch}, "
             f"{args.test_per_class} test images per class; norm statistics reset after every variant (a no-op "
             "without BatchNorm). Passes: model passes over the calibration data (one per model graph run over "
             "the whole set, truncated or not: the merged model and each of the 2 originals); reads: how many "
             "times the calibration batches were read. Floor: one forward pass of the merged model over the "
             "calibration images. Seconds of each mode measured in the same process, one after the other.", ""]
    if "waves" in modes and "sequential" in modes:
        lines += ["| arch | pair | folded joint | waves joint | sequential joint | passes (waves / seq) | "
                  "reads (waves / seq) | s waves | s seq | waves / seq | x floor (waves / seq) | seq peak MB | "
                  "max rel weight diff |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            w, s = r["waves"], r["sequential"]
            lines.append(f"| {r['arch']} | {r['pair']} | {f1(r['folded']['joint'])} | {f1(w['joint'])} | "
                         f"{f1(s['joint'])} | {w['passes']} / {s['passes']} | {w['data_reads']} / {s['data_reads']} "
                         f"| {f1(w['seconds'])} | {f1(s['seconds'])} | {r['waves_over_sequential_s']:.1f}x | "
                         f"{w['x_floor']:.0f} / {s['x_floor']:.0f} | {s['memory']['peak_bytes'] / MB:.0f} | "
                         f"{r['max_rel_weight_diff']:.1e} |")
        lines.append("")
    if "spill" in modes:
        lines += [f"Spill: the sequential schedule with `max_memory` = {args.spill_fraction} x its unbounded peak.",
                  "", "| arch | pair | budget MB | peak MB | spilled MB | reloads | s | x sequential | "
                  "weights bit-identical |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            m, s = r["spill"]["memory"], r["sequential"]
            lines.append(f"| {r['arch']} | {r['pair']} | {m['max_memory'] / MB:.0f} | {m['peak_bytes'] / MB:.0f} | "
                         f"{m['spilled_bytes'] / MB:.0f} | {m['reloads']} | {f1(r['spill']['seconds'])} | "
                         f"{r['spill']['seconds'] / s['seconds']:.2f} | {r['spill_bit_identical']} |")
        lines.append("")
    if "one_pass" in modes:
        lines += ["One pass: every layer fitted on the folded model's inputs (one wave).", "",
                  "| arch | pair | folded joint | one-pass joint | passes | s | x floor |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            o = r["one_pass"]
            lines.append(f"| {r['arch']} | {r['pair']} | {f1(r['folded']['joint'])} | {f1(o['joint'])} | "
                         f"{o['passes']} | {f1(o['seconds'])} | {o['x_floor']:.0f} |")
    return lines


if __name__ == "__main__":
    main()
