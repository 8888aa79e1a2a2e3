"""Which probe policy (and whether variance repair or the refit) merges best: CIFAR-10 (5+5), every benchmark we have.

Issue 11's comparison. For every architecture with checkpoints (ResNet-20x1
BatchNorm, ResNet-20x1 GroupNorm, the small ViT; the ResNet-20x4 and
MobileNetV2 weights were lost, see their tables) and every evaluation pair,
one ``fxzip.calibrate`` per probe policy (the statistics depend on it), then
Permute and ZipIt full zips from it, each scored on the pair's test images
(joint and average per-task accuracy, ``eval_cifar.py``'s protocol). Variants
with ``repair=True`` add the variance repair (``fxzip.merge(..., repair=True)``)
to a policy.

The default policy is the one with the best mean joint accuracy over all
(architecture, method) cells; the table gives every policy's mean and
standard error per cell (std over pairs / sqrt(pairs)) and the paired
difference to today's ``"all"``.

Example::

    python benchmarks/probe_policy.py --archs resnet20x1 resnet20gn vit --pairs 0 1 2 --threads 1 \\
        --cache /tmp/probe_cache.json

``--smoke``: random-init tiny models and synthetic images, seconds (used by a test).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

import eval_cifar as ec  # noqa: E402
import eval_methods as em  # noqa: E402

import fxzip  # noqa: E402
from fxzip.evaluate import Ensemble  # noqa: E402
from fxzip.probes import PROBE_ALIASES, PROBE_POLICIES  # noqa: E402
from fxzip.zoo import resnet20  # noqa: E402

CKPT = {"resnet20x1": HERE / "checkpoints" / "cifar10_resnet20x1", **em.CKPT}
# ZipIt alpha / beta of each architecture's table (x1: the held-out grid; the others: fxzip's defaults)
ALPHA_BETA = {"resnet20x1": (1.0, 1.0), "resnet20gn": (0.3, 0.125), "vit": (0.3, 0.125),
              "mobilenetv2": (0.3, 0.125)}
METHODS = ("permute", "zipit")


def zipit_settings(arch: str, args) -> list[tuple[str, float, float]]:
    """(row label, alpha, beta) of the ZipIt rows of ``arch``: its table's setting (label "zipit") unless
    ``--zipit A/B ...`` names others; a named setting that is the table's keeps the label "zipit"."""
    if not getattr(args, "zipit", None):
        return [("zipit", *ALPHA_BETA[arch])]
    out = []
    for text in args.zipit:
        a, b = (float(x) for x in text.split("/"))
        out.append(("zipit" if (a, b) == ALPHA_BETA[arch] else f"zipit a{a:g} b{b:g}", a, b))
    return out


def methods_of(arch: str, args) -> list[str]:
    return ["permute"] + [label for label, _, _ in zipit_settings(arch, args)]


def build(arch: str, smoke: bool) -> torch.nn.Module:
    return resnet20(1, out_dim=ec.OUT_DIM) if arch == "resnet20x1" else em.build(arch, smoke)


def load_pair(arch: str, pair: int) -> tuple[list[torch.nn.Module], list[dict]]:
    if arch == "resnet20x1":
        return ec.load_pair(CKPT[arch], pair, 1)
    return em.load_pair(arch, CKPT[arch], pair)


def have_pair(arch: str, pair: int) -> bool:
    return ec.pair_available(CKPT[arch], pair)


def pair_sources(args) -> tuple[Any, torch.Tensor, Any, Any]:
    """(data, class vectors, get(arch, pair) -> (models, infos), have(arch, pair)) for the CIFAR pairs, or
    with ``args.smoke`` synthetic images and random-init tiny models (the protocol's sizes shrunk in
    ``args``): what every script on this protocol reads its pairs from."""
    if args.smoke:
        args.calib_images, args.calib_batch, args.test_per_class = 20, 10, 5
        vecs = F.normalize(torch.randn(10, ec.OUT_DIM, generator=torch.Generator().manual_seed(0)), dim=1)
        return (ec.synthetic_data(), vecs, lambda arch, p: ec.random_pair(p, lambda: build(arch, True)),
                lambda arch, p: True)
    import cifar_data

    return cifar_data.load_cifar10(args.data), ec.class_vectors(), load_pair, have_pair


def variants(policies: list[str], repair: list[str], refit: list[str] = ()) -> list[dict[str, Any]]:
    out = [{"probes": p, "repair": False, "refit": False} for p in policies]
    out += [{"probes": p, "repair": True, "refit": False} for p in repair]
    out += [{"probes": p, "repair": False, "refit": True} for p in refit]
    return out


def variant_name(v: dict[str, Any]) -> str:
    return v["probes"] + (" + repair" if v["repair"] else "") + (" + refit" if v.get("refit") else "")


def run_pair(arch: str, pair: int, models, infos, data, vecs, args, cache: dict, save, log) -> None:
    tasks = [list(infos[0]["classes"]), list(infos[1]["classes"])]
    classes = sorted(tasks[0] + tasks[1])
    calib, test = em.pair_data("resnet20gn" if arch == "resnet20x1" else arch, data, classes, args, pair)  # 32 px
    base_key = f"{arch}|pair{pair}|Ensemble"
    if base_key not in cache:
        originals = [ec.reset_copy(m, calib) for m in models]
        cache[base_key] = ec.score(Ensemble(*originals), test, tasks, vecs)
        for k, m in enumerate(originals):
            cache[f"{arch}|pair{pair}|Model {'AB'[k]}"] = ec.score(m, test, tasks, vecs)
        save()
    by_policy: dict[str, Any] = {}
    settings = {label: (a, b) for label, a, b in zipit_settings(arch, args)}
    for v in variants(args.policies, args.repair, args.refit):
        for label in methods_of(arch, args):
            method = "zipit" if label in settings else label
            key = f"{arch}|pair{pair}|{variant_name(v)}|{label}"
            if key in cache:
                continue
            t0 = time.perf_counter()
            if v["probes"] not in by_policy:
                by_policy = {v["probes"]: fxzip.calibrate(*models, data=calib, progress=False, probes=v["probes"])}
            extra = dict(zip(("alpha", "beta"), settings[label])) if method == "zipit" else {}
            if v["repair"]:
                extra["repair"] = True
            if v["refit"]:
                extra["refit"] = True
            merged = fxzip.merge(*models, data=by_policy[v["probes"]], method=method, progress=False,
                                 probes=v["probes"], **extra)
            row = ec.score(merged, test, tasks, vecs)
            row["seconds"] = round(time.perf_counter() - t0, 2)
            cache[key] = row
            save()
            log(f"  {arch} pair {pair} {variant_name(v):28s} {label:8s} joint {row['joint']:5.1f} "
                f"avg {row['avg']:5.1f} ({row['seconds']:.1f}s)")


def summarize(cache: dict, archs: list[str], pairs: dict[str, list[int]], names: list[str],
              methods: dict[str, list[str]] | None = None) -> dict:
    """Per (variant, arch, method): mean, sem over pairs, and the paired difference to 'all'."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for name in names:
        table[name] = {}
        for arch in archs:
            for method in (methods or {}).get(arch, METHODS):
                vals = [cache[f"{arch}|pair{p}|{name}|{method}"]["joint"] for p in pairs[arch]]
                ref = [cache[f"{arch}|pair{p}|all|{method}"]["joint"] for p in pairs[arch]]
                avgs = [cache[f"{arch}|pair{p}|{name}|{method}"]["avg"] for p in pairs[arch]]
                table[name][f"{arch}|{method}"] = {
                    "joint": _mean(vals), "joint_sem": _sem(vals), "avg": _mean(avgs),
                    "diff_vs_all": _mean([a - b for a, b in zip(vals, ref)]),
                    "diff_vs_all_sem": _sem([a - b for a, b in zip(vals, ref)]),
                    "per_pair": vals}
        cells = list(table[name].values())
        table[name]["mean_joint"] = _mean([c["joint"] for c in cells])
    return table


def _mean(v: list[float]) -> float:
    return sum(v) / len(v) if v else float("nan")


def _sem(v: list[float]) -> float:
    if len(v) < 2:
        return float("nan")
    m = _mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v))


def write_markdown(path: Path, result: dict) -> None:
    s, table = result["setting"], result["table"]
    archs = s["archs"]
    methods = s.get("methods") or {a: list(METHODS) for a in archs}
    cols = [f"{a} {m}" for a in archs for m in methods[a]]
    lines = ["# Probe policy and variance repair: CIFAR-10 (5+5) full zips", "",
             f"Command: `{s['command']}`", "",
             f"Machine: {s['machine']}; wall time of this invocation {s['wall_seconds'] / 60:.1f} min (rows read "
             "from --cache are not recomputed; each row's seconds are in the JSON). Pairs: "
             + ", ".join(f"{a} {s['pairs'][a]}" for a in archs) + f"; calibration {s['calib_images']} augmented "
             f"training images of both tasks per pair; test: {s['test_images']}; ZipIt alpha / beta per "
             "architecture as its table: " + ", ".join(f"{a} {ALPHA_BETA[a][0]} / {ALPHA_BETA[a][1]}"
                                                        for a in archs) + " (a column 'zipit aA bB' is that setting instead).", "",
             "Joint accuracy (%), mean ± standard error over pairs; in brackets the paired difference to "
             "`all` (today's policy). Last column: the mean over every architecture and method.", "",
             "| probes | " + " | ".join(cols) + " | mean |", "|---|" + "---|" * (len(cols) + 1)]
    for name, cells in table.items():
        vals = []
        for a in archs:
            for m in methods[a]:
                c = cells[f"{a}|{m}"]
                diff = "" if name == "all" else f" ({c['diff_vs_all']:+.1f})"
                vals.append(f"{c['joint']:.1f} ± {c['joint_sem']:.1f}{diff}")
        lines.append(f"| {name} | " + " | ".join(vals) + f" | {cells['mean_joint']:.1f} |")
    lines += ["", "Reference rows (joint %, mean over pairs): "
              + "; ".join(f"{a}: ensemble {result['reference'][a]['Ensemble']:.1f}, models A/B "
                          f"{result['reference'][a]['Model A']:.1f} / {result['reference'][a]['Model B']:.1f}"
                          for a in archs), "",
              f"Best mean joint accuracy without repair: **{result['best_policy']}**.", ""]
    lines += [f"- {n}" for n in s.get("notes", [])]
    path.write_text("\n".join(lines) + "\n")


def add_protocol_args(ap: argparse.ArgumentParser) -> None:
    """The data / calibration / test options every script of this family shares."""
    ap.add_argument("--data", default=str(ec.DEFAULT_DATA))
    ap.add_argument("--calib-images", type=int, default=1000)
    ap.add_argument("--calib-batch", type=int, default=500)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--test-batch", type=int, default=500)
    ap.add_argument("--threads", type=int, default=0)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["resnet20x1", "resnet20gn", "vit"],
                    choices=sorted(CKPT))
    ap.add_argument("--pairs", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--policies", nargs="+", default=[p for p in PROBE_POLICIES if p not in PROBE_ALIASES],
                    choices=sorted(PROBE_POLICIES))
    ap.add_argument("--repair", nargs="*", default=[], choices=sorted(PROBE_POLICIES),
                    help="policies to also run with repair=True")
    ap.add_argument("--refit", nargs="*", default=[], choices=sorted(PROBE_POLICIES),
                    help="policies to also run with refit=True")
    add_protocol_args(ap)
    ap.add_argument("--zipit", nargs="+", default=None, metavar="A/B",
                    help="ZipIt alpha/beta settings, e.g. 0.3/0.125 0.0001/0.075 (default: each architecture's "
                         "table's: " + ", ".join(f"{a} {x:g}/{y:g}" for a, (x, y) in ALPHA_BETA.items()) + ")")
    ap.add_argument("--cache", default=None, help="JSON of finished rows (resumable)")
    ap.add_argument("--out", default=str(HERE / "results" / "probe_policy"))
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    t0 = time.perf_counter()
    args = parse_args(argv)
    command = "python benchmarks/probe_policy.py " + " ".join(shlex.quote(a) for a in
                                                             (sys.argv[1:] if argv is None else argv))
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    if args.threads:
        torch.set_num_threads(args.threads)
    if "all" not in args.policies:
        args.policies = ["all"] + args.policies  # the reference every difference is taken against
    cache_path = Path(args.cache) if args.cache else None
    cache: dict = json.loads(cache_path.read_text()) if cache_path and cache_path.exists() else {}

    def save() -> None:
        if cache_path:
            tmp = cache_path.with_name(cache_path.name + ".tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            os.replace(tmp, cache_path)

    data, vecs, get, have = pair_sources(args)
    pairs = {a: [p for p in args.pairs if have(a, p)] for a in args.archs}
    archs = [a for a in args.archs if pairs[a]]
    for arch in archs:
        for p in pairs[arch]:
            log(f"{arch} pair {p}")
            models, infos = get(arch, p)
            run_pair(arch, p, models, infos, data, vecs, args, cache, save, log)
    names = [variant_name(v) for v in variants(args.policies, args.repair, args.refit)]
    methods = {a: methods_of(a, args) for a in archs}
    table = summarize(cache, archs, pairs, names, methods)
    plain = [n for n in names if not n.endswith("repair") and not n.endswith("refit")]
    best = max(plain, key=lambda n: table[n]["mean_joint"])
    reference = {a: {r: _mean([cache[f"{a}|pair{p}|{r}"]["joint"] for p in pairs[a]])
                     for r in ("Ensemble", "Model A", "Model B")} for a in archs}
    n_test = args.test_per_class * 10
    setting = {"command": command, "archs": archs, "pairs": pairs, "methods": methods, "calib_images": args.calib_images,
               "test_images": f"the first {args.test_per_class} CIFAR-10 test images of each class ({n_test})",
               "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                          f"{torch.get_num_threads()} threads", "smoke": args.smoke, "notes": args.note,
               "wall_seconds": round(time.perf_counter() - t0, 1)}
    result = {"setting": setting, "table": table, "best_policy": best, "reference": reference,
              "rows": {k: v for k, v in cache.items() if k.split("|")[0] in archs}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + ".json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(Path(str(out) + ".md"), result)
    log(Path(str(out) + ".md").read_text())
    return result


if __name__ == "__main__":
    main()
