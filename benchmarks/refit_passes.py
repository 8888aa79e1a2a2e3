"""Refit cost and order: exact network-order waves against one pass on the folded model's inputs.

Issue 12 asks whether one pass over the data (every layer fitted on the
*folded* model's inputs) is close enough to the exact refit (each layer on
inputs that already reflect the refit of the layers before it, one pass per
layer depth). For each architecture and pair: ZipIt (the architecture's
alpha / beta) folded, then both refits on the same calibration images, each
scored on the test images, with its passes and seconds, against the
forward-pass floor (one pass of the merged model over the calibration images).

Example::

    python benchmarks/refit_passes.py --archs resnet20x1 vit --pairs 0 1 2 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent

import eval_cifar as ec  # noqa: E402
import eval_methods as em  # noqa: E402
import probe_policy as pp  # noqa: E402

import fxzip  # noqa: E402
from fxzip.passes.refit import refit  # noqa: E402
from fxzip.passes.side_by_side import side_by_side  # noqa: E402


def _assign(report) -> dict[int, torch.Tensor]:
    return {s.index: torch.tensor(s.assignment) for s in report.spaces}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["resnet20x1", "vit"], choices=sorted(pp.CKPT))
    ap.add_argument("--pairs", type=int, nargs="+", default=[0, 1, 2])
    pp.add_protocol_args(ap)
    ap.add_argument("--out", default=str(HERE / "results" / "refit_passes"))
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    command = "python benchmarks/refit_passes.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                                       else argv))
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
            for mode in ("sequential", "one_pass"):
                m = copy.deepcopy(folded)
                t0 = time.perf_counter()
                res = refit(m, cal.analysis, joint, node_maps, _assign(folded.meta["fxzip"]), cal.batches,
                            one_pass=mode == "one_pass")
                seconds = time.perf_counter() - t0
                fxzip.reset_norm_stats(m, calib)
                row[mode] = {**ec.score(m, test, tasks, vecs), "passes": res.passes, "seconds": seconds,
                             "x_floor": seconds / floor}
            rows.append(row)
            print(f"{arch} pair {p}: folded {row['folded']['joint']:.1f}, sequential {row['sequential']['joint']:.1f}"
                  f" ({row['sequential']['passes']} passes, {row['sequential']['seconds']:.1f}s), one pass "
                  f"{row['one_pass']['joint']:.1f} ({row['one_pass']['seconds']:.1f}s); floor {floor:.2f}s",
                  flush=True)
    lines = ["# Refit: exact network order against one pass on the folded model's inputs", "",
             f"Command: `{command}`", "",
             f"Machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads. ZipIt at each architecture's alpha / beta, {args.calib_images} "
             f"calibration images, {args.test_per_class} test images per class; norm statistics reset after "
             "every variant (a no-op without BatchNorm). Floor: one forward pass of the merged model over the "
             "calibration images.", "",
             "| arch | pair | folded joint | sequential joint | passes | s | x floor | one-pass joint | s | x floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sq, op = r["sequential"], r["one_pass"]
        lines.append(f"| {r['arch']} | {r['pair']} | {r['folded']['joint']:.1f} | {sq['joint']:.1f} | {sq['passes']} | "
                     f"{sq['seconds']:.1f} | {sq['x_floor']:.0f} | {op['joint']:.1f} | {op['seconds']:.1f} | "
                     f"{op['x_floor']:.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + ".md").write_text("\n".join(lines) + "\n")
    Path(str(out) + ".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))
    return {"rows": rows}


if __name__ == "__main__":
    main()
