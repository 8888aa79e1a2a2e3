"""Who owns a merged cluster in ZipIt's repeated matching: every model it contains (fxzip), or the reference code's rule.

fxzip's zipit counts a within-model merge when a cluster gains a feature of a
model it already contains (``owner="models"``); the ZipIt! reference code labels
a cluster by the model of its lowest-index member and forbids pairs by history
(``owner="reference"``, ``method="zipit_reference"``: see ``fxzip.matching.zipit``).
They differ only when alpha > 0 and beta < 1. This runs both on the CIFAR-10 (5+5) checkpoints
(``probe_policy.py``'s architectures, pairs and protocol), one calibration per
pair, at each architecture's alpha / beta and at the papers' alpha 0.3,
beta 0.125, and writes the paired comparison.

Example::

    python benchmarks/zipit_owner.py --archs resnet20x1 resnet20gn vit --pairs 0 1 2 --threads 1
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

import eval_cifar as ec  # noqa: E402
import eval_methods as em  # noqa: E402
import probe_policy as pp  # noqa: E402

import fxzip  # noqa: E402
from fxzip.matching import MATCHERS, zipit  # noqa: E402

OWNERS = ("models", "reference")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["resnet20x1", "resnet20gn", "vit"], choices=sorted(pp.CKPT))
    ap.add_argument("--pairs", type=int, nargs="+", default=[0, 1, 2])
    pp.add_protocol_args(ap)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "zipit_owner"))
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    command = "python benchmarks/zipit_owner.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                                      else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    for owner in OWNERS:
        MATCHERS[f"zipit_owner_{owner}"] = functools.partial(zipit, owner=owner)
    cache_path = Path(args.cache) if args.cache else None
    cache: dict = json.loads(cache_path.read_text()) if cache_path and cache_path.exists() else {}
    data, vecs, get, have = pp.pair_sources(args)
    settings = {a: sorted({pp.ALPHA_BETA[a], (0.3, 0.125)}, reverse=True) for a in args.archs}
    pairs = {a: [p for p in args.pairs if have(a, p)] for a in args.archs}
    for arch in args.archs:
        for p in pairs[arch]:
            models, infos = get(arch, p)
            tasks = [list(infos[0]["classes"]), list(infos[1]["classes"])]
            calib, test = em.pair_data("resnet20gn" if arch == "resnet20x1" else arch, data,
                                       sorted(tasks[0] + tasks[1]), args, p)
            cal = None
            for alpha, beta in settings[arch]:
                for owner in OWNERS:
                    key = f"{arch}|pair{p}|a{alpha}|b{beta}|{owner}"
                    if key in cache:
                        continue
                    cal = cal or fxzip.calibrate(*models, data=calib, progress=False)
                    merged = fxzip.merge(*models, data=cal, method=f"zipit_owner_{owner}", alpha=alpha, beta=beta,
                                         progress=False)
                    cache[key] = ec.score(merged, test, tasks, vecs)
                    print(f"{key}: joint {cache[key]['joint']:.1f} avg {cache[key]['avg']:.1f}", flush=True)
                    if cache_path:
                        cache_path.write_text(json.dumps(cache, indent=1))
    lines = ["# ZipIt cluster ownership: every contained model (fxzip) vs the reference code's rule",
             "", f"Command: `{command}`", "",
             f"Machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; wall time {(time.perf_counter() - t0) / 60:.1f} min; protocol of "
             f"probe_policy.py ({args.calib_images} calibration images, {args.test_per_class} test images per class, "
             "default probes).", "",
             "Joint / avg per-task accuracy (%), mean over pairs; diff = reference - models, paired mean ± standard "
             "error.", "", "| arch | alpha / beta | owner=models | owner=reference | joint diff | avg diff |",
             "|---|---|---|---|---|---|"]
    summary = []
    for arch in args.archs:
        for alpha, beta in settings[arch]:
            get_rows = lambda o: [cache[f"{arch}|pair{p}|a{alpha}|b{beta}|{o}"] for p in pairs[arch]]  # noqa: E731
            rm, rf = get_rows("models"), get_rows("reference")
            if not rm:
                continue
            dj = [f["joint"] - m["joint"] for m, f in zip(rm, rf)]
            da = [f["avg"] - m["avg"] for m, f in zip(rm, rf)]
            mean = lambda v: sum(v) / len(v)  # noqa: E731
            sem = lambda v: math.sqrt(sum((x - mean(v)) ** 2 for x in v) / max(1, len(v) - 1) / len(v))  # noqa: E731
            summary.append({"arch": arch, "alpha": alpha, "beta": beta, "joint_diff": mean(dj), "avg_diff": mean(da)})
            lines.append(f"| {arch} | {alpha} / {beta} | {mean([r['joint'] for r in rm]):.1f} / "
                         f"{mean([r['avg'] for r in rm]):.1f} | {mean([r['joint'] for r in rf]):.1f} / "
                         f"{mean([r['avg'] for r in rf]):.1f} | {mean(dj):+.1f} ± {sem(dj):.1f} | "
                         f"{mean(da):+.1f} ± {sem(da):.1f} |")
    overall = sum(s["joint_diff"] for s in summary) / max(1, len(summary))
    lines += ["", f"Mean joint difference over every row: {overall:+.2f} points (reference - models)."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + ".md").write_text("\n".join(lines) + "\n")
    result = {"command": command, "rows": cache, "summary": summary, "mean_joint_diff": overall}
    Path(str(out) + ".json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
