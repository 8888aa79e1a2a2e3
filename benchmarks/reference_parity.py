"""Reference parity: the official ZipIt! and MuDSC codes against fxzip, on the same checkpoints, batches and evaluation.

Issue 25 item 1. For every cell (pair, width, calibration draw) four sides merge the same pair of
CIFAR-10 (5+5) ResNet-20 checkpoints (the reference pairs of ``/work/shared/refs``: ``train_ref.py``'s
model, which loads into fxzip and into both official model classes), each in its own subprocess
(``--one``), on the same calibration batches, scored by the same evaluation:

* ``official_zipit``: the ZipIt! code (github gstoica27/ZipIt; ``official_compare.official``): W.Avg,
  Permute, ZipIt a.3 b.125, ZipIt a1e-4 b.075;
* ``official_mudsc``: MuDSC's code (github zju-vipa/training_free_model_merging, homogeneous_tasks/;
  ``mudsc_compare.official``): zip-based MuDSC at its defaults a=0.5, b=1 for every balance factor
  (``--balance``, default 0.5; official ``fix_rate`` = fxzip ``weight_similarity``), MuDSC at a=0.3,
  b=0.125 (balance 0.5), and its plain zip at a=0.5, b=1 ("ZipIt a.5 b1"), for MuDSC minus ZipIt at
  both settings (a method added after a side ran is run alone and joined to its rows);
* ``fxzip_reference``: ``fxzip.merge(..., probes="reference", refit=False)``, every method above;
* ``fxzip_default``: the same with fxzip's default probes (``fxzip.probes.DEFAULT_PROBES``);
* ``fxzip_zipit_reference``: the ZipIt rows with probes="reference" and ``method="zipit_reference"``
  (``fxzip.matching.zipit_reference``: the ZipIt! code's greedy decision for decision, its cluster labels,
  budget rounding and sticky forbidden pairs) instead of fxzip's own rule (``method="zipit"``).

``refit=False`` (fxzip's default) is the papers' merge. Calibration draw d: ``torch.manual_seed(d)``, then
``official_compare.calib_batches(xtr, seed=d)`` (2000 augmented training images, batches of 500; draw 0
is exactly the batches of official_compare.py / mudsc_compare.py); every side records the sha1 of its
batches, and the report refuses a cell whose sides disagree on it. Evaluation: ``official_compare.evaluate``
on all 10000 test images (joint: argmax over the 10 class vectors; task: over the task's 5; avg: mean of
the two task accuracies). The calibration, evaluation, loading and both official drivers are imported
from ``/work/shared/refs`` (``--refs``), not copied.

Pairs: pair 0 is ``REFS/pair0_{A,B}_w{W}.pt``; pairs 1.. are ``benchmarks/checkpoints/ref/pair{p}_{A,B}_w{W}.pt``,
trained by ``train_ref.py`` (same seeds and recipe as pair 0) and stored as fp16 state dicts (about 0.55 MB
each at width 1). They are loaded back to float32 before anything else happens, so every side merges the
same fp16-rounded float32 weights; the conversion (``--convert``) also checks that the rounding moves each
model's task accuracy (its own BN statistics, fp32 evaluation) by less than 0.1 points, and records both
numbers in the checkpoint (``task_acc_fp32``, ``task_acc``).

Results: each (cell, side) is cached in ``--cache`` (JSON, written after every side: an interrupted run
resumes, computed sides are skipped), then ``benchmarks/results/reference_parity.{json,md}``: per method and
fxzip setting the mean over cells of the paired differences fxzip minus official (joint and avg) with
standard errors (sample std / sqrt(n) over cells), the cells equal to the reported digit (0.01), the goal
checks, and a per-cell table.

Official side needs (not fxzip dependencies): work trees of both official repositories
(``--zipit-repo``, ``--mudsc-repo``; e.g. ``git --git-dir=MIRROR --work-tree=DIR checkout -f HEAD``) and
their imports: einops, fvcore, scikit-learn, matplotlib, scipy (ZipIt!), timm (MuDSC's model file).

usage:
  python benchmarks/reference_parity.py --pairs 0 1 2 --widths 1 --draws 0 1   (run missing cells, write results)
  python benchmarks/reference_parity.py --report-only                          (results from the cache only)
  python benchmarks/reference_parity.py --train 3 --width 1 --train-dir /tmp/parity_train
        (train_ref.py pairs 0..2 into the folder, one thread, pair 0 copied from REFS so it is not retrained;
         then convert the finished pairs >= 1 to fp16 into benchmarks/checkpoints/ref/)
  python benchmarks/reference_parity.py --convert /tmp/parity_train --width 1  (the conversion alone)
  python benchmarks/reference_parity.py --one SIDE --pair P --width W --draw D  (one side, JSON lines; internal)
"""
from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import cpu_model, git_commit  # noqa: E402

RESULTS = HERE / "results"
CKPT_DIR = HERE / "checkpoints" / "ref"
DEFAULT_REFS = Path("/work/shared/refs")
DEFAULT_CACHE = Path("/work/paritycache/reference_parity_cells.json")
SIDES = ("official_zipit", "official_mudsc", "fxzip_reference", "fxzip_default", "fxzip_zipit_reference")
FXZIP_SIDES = ("fxzip_reference", "fxzip_default", "fxzip_zipit_reference")
ZIPIT_ONLY_SIDES = ("fxzip_zipit_reference",)  # sides that run the ZipIt rows only
ZIPIT_METHODS = ("W.Avg", "Permute", "ZipIt a.3 b.125", "ZipIt a1e-4 b.075")
FXZIP_KW = {"W.Avg": {"method": "weight_average"}, "Permute": {"method": "permute"},
            "ZipIt a.3 b.125": {"method": "zipit", "alpha": 0.3, "beta": 0.125},
            "ZipIt a1e-4 b.075": {"method": "zipit", "alpha": 0.0001, "beta": 0.075},
            "ZipIt a.5 b1": {"method": "zipit", "alpha": 0.5, "beta": 1.0}}
METRICS = ("joint", "task_a", "task_b", "avg")


def fmt(x: float) -> str:
    """0.5 -> '.5', 1.0 -> '1' (the method names of mudsc_compare.py)."""
    return f"{x:g}".lstrip("0") if 0 < x < 1 else f"{x:g}"


def mudsc_name(balance: float) -> str:
    return f"MuDSC a.5 b1 ws{fmt(balance)}"


MUDSC_AT_ZIPIT_DEFAULTS = "MuDSC a.3 b.125 ws.5"  # MuDSC at fxzip's (and the ZipIt! paper's) alpha / beta
ZIPIT_AT_MUDSC_DEFAULTS = "ZipIt a.5 b1"  # ZipIt at MuDSC's defaults, from MuDSC's code (its "_act" zip)
# MuDSC minus ZipIt at each alpha / beta (issue 25's goal), each row from its own official side
MUDSC_VS_ZIPIT = (("a.5 b1", "MuDSC a.5 b1 ws.5", ZIPIT_AT_MUDSC_DEFAULTS),
                  ("a.3 b.125", MUDSC_AT_ZIPIT_DEFAULTS, "ZipIt a.3 b.125"))


def methods_of(balances: list[float]) -> list[str]:
    return (list(ZIPIT_METHODS) + [ZIPIT_AT_MUDSC_DEFAULTS] + [mudsc_name(b) for b in balances]
            + [MUDSC_AT_ZIPIT_DEFAULTS])


def side_methods(side: str, methods: list[str]) -> list[str]:
    """The methods of ``methods`` that ``side`` produces rows for."""
    if side.startswith("official_"):
        return [m for m in methods if official_side_of(m) == side]
    if side in ZIPIT_ONLY_SIDES:
        return [m for m in methods if m.startswith("ZipIt")]
    return list(methods)


def missing_methods(cache: dict, key: str, side: str, methods: list[str]) -> list[str]:
    """What a cell's side still lacks: every wanted method when the side never ran, else the methods added
    since it ran (run alone and merged into its rows)."""
    have = {r["method"] for r in (cache["cells"].get(key, {}).get(side) or {}).get("rows", [])}
    return [m for m in side_methods(side, methods) if m not in have]


def official_side_of(method: str) -> str:
    return "official_mudsc" if method.startswith("MuDSC") or method == ZIPIT_AT_MUDSC_DEFAULTS else "official_zipit"


def cell_key(pair: int, width: int, draw: int) -> str:
    return f"p{pair}_w{width}_d{draw}"


# ---------------------------------------------------------------------------------------------------
# pure parts: cache, paired differences, report


def load_cache(path: Path) -> dict:
    if path.exists():
        with open(path) as f:
            return json.load(f)
    return {"cells": {}}


def save_cache(cache: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(cache, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def mean_se(xs: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (sample std, ddof=1, over sqrt(n)); no SE from one value."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, None
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def cell_rows(entry: dict, side: str) -> dict[str, dict]:
    side_entry = entry.get(side)
    if not side_entry:
        return {}
    return {r["method"]: r for r in side_entry["rows"]}


def paired(cache: dict, methods: list[str], setting: str) -> dict[str, dict]:
    """Per method: the cells where both the official side and fxzip ``setting`` have the method (and agree
    on the calibration batches), each with the differences fxzip minus official of joint and avg at the
    reported 0.01, and whether both equal the official's reported digits."""
    out = {}
    for method in methods:
        official = official_side_of(method)
        cells = []
        for key, entry in sorted(cache["cells"].items()):
            o, f = cell_rows(entry, official).get(method), cell_rows(entry, setting).get(method)
            if o is None or f is None:
                continue
            if entry[official]["calib_sha1"] != entry[setting]["calib_sha1"]:
                raise ValueError(f"cell {key}: {official} and {setting} merged different batches "
                                 f"({entry[official]['calib_sha1']} vs {entry[setting]['calib_sha1']})")
            dj = round(round(f["joint"], 2) - round(o["joint"], 2), 2)
            da = round(round(f["avg"], 2) - round(o["avg"], 2), 2)
            cells.append({"cell": key, "d_joint": dj, "d_avg": da, "equal": dj == 0 and da == 0})
        out[method] = cells
    return out


def settings_of(cache: dict) -> tuple[str, ...]:
    """The fxzip settings to report."""
    return FXZIP_SIDES


def summarize(cache: dict, methods: list[str]) -> list[dict]:
    rows = []
    for setting in settings_of(cache):
        for method, cells in paired(cache, methods, setting).items():
            row = {"method": method, "fxzip": setting, "official": official_side_of(method), "n": len(cells)}
            if cells:
                for m in ("joint", "avg"):
                    mu, se = mean_se([c[f"d_{m}"] for c in cells])
                    row[f"d_{m}"], row[f"se_{m}"] = round(mu, 4), None if se is None else round(se, 4)
                row["equal"] = sum(c["equal"] for c in cells)
            rows.append(row)
    return rows


def mudsc_minus_zipit(cache: dict) -> list[dict]:
    """MuDSC minus ZipIt at each alpha / beta of ``MUDSC_VS_ZIPIT``, paired over the cells, for the official
    codes (each row from the side that makes it) and for each fxzip setting that runs both."""
    out = []
    for setting, mudsc, zipit in MUDSC_VS_ZIPIT:
        for code in ("official",) + tuple(s for s in FXZIP_SIDES if s not in ZIPIT_ONLY_SIDES):
            diffs = []
            for _, entry in sorted(cache["cells"].items()):
                m = cell_rows(entry, official_side_of(mudsc) if code == "official" else code).get(mudsc)
                z = cell_rows(entry, official_side_of(zipit) if code == "official" else code).get(zipit)
                if m and z:
                    diffs.append(round(m["joint"] - z["joint"], 2))
            if diffs:
                mu, se = mean_se(diffs)
                out.append({"setting": setting, "mudsc": mudsc, "zipit": zipit, "code": code, "n": len(diffs),
                            "d_joint": round(mu, 4), "se_joint": None if se is None else round(se, 4)})
    return out


def goals(summary: list[dict]) -> list[str]:
    """The issue's goals, each with its verdict ('not decided' where a standard error needs 2 cells)."""
    lines = []
    for r in summary:
        if not r["n"]:
            continue
        m, s, n = r["method"], r["fxzip"], r["n"]
        if s == "fxzip_zipit_reference" and m.startswith("ZipIt"):
            ok = r["equal"] == n
            tag = "method=zipit_reference, probes=reference"
            lines.append(f"{m}, {tag} equals the official code on every cell: "
                         f"{'yes' if ok else 'NO'} ({r['equal']}/{n})")
        if s == "fxzip_default" and (m.startswith("ZipIt") or m.startswith("MuDSC")):
            lines.append(f"{m}, default probes: mean paired joint difference {r['d_joint']:+.2f} >= 0: "
                         f"{'yes' if r['d_joint'] >= 0 else 'NO'} (n={n})")
        if m in ("W.Avg", "Permute"):
            se = r["se_joint"]
            if se is None:
                lines.append(f"{m}, {s}: joint within one standard error: not decided (n={n}, no SE)")
            else:
                ok = abs(r["d_joint"]) <= se and abs(r["d_avg"]) <= (r["se_avg"] or 0)
                lines.append(f"{m}, {s}: joint {r['d_joint']:+.2f} ± {se:.2f}, avg {r['d_avg']:+.2f} ± "
                             f"{r['se_avg']:.2f}: within one SE: {'yes' if ok else 'NO'} (n={n})")
    return lines


def pm(mu, se) -> str:
    return f"{mu:+.2f}" + ("" if se is None else f" ± {se:.2f}")


def write_report(cache: dict, methods: list[str], wanted: list[str], header: dict, out: Path) -> dict:
    """``out``.json and ``out``.md from the cache. ``wanted``: the cell keys asked for (missing ones listed)."""
    summary = summarize(cache, methods)
    have = sorted(cache["cells"])
    missing = {k: [s for s in SIDES if not cache["cells"].get(k, {}).get(s)] for k in wanted}
    missing = {k: v for k, v in missing.items() if v}
    versus = mudsc_minus_zipit(cache)
    doc = {**header, "methods": methods, "cells": have, "missing": missing, "summary": summary,
           "goals": goals(summary), "mudsc_minus_zipit": versus, "per_cell": cache["cells"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".json"), "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    md = ["# Reference parity: official ZipIt! / MuDSC codes vs fxzip (issue 25)", "",
          f"Command: `{header.get('command', '')}`  ",
          f"Commit: {header.get('commit', '')}; date: {header.get('date', '')}  ",
          f"Machine: {header.get('machine', '')}  ",
          "Data: CIFAR-10 (5+5), ResNet-20 reference pairs; calibration 2000 augmented training images "
          "(draw d: torch.manual_seed(d), calib_batches(seed=d)), batches of 500; evaluation on all 10000 "
          "test images; fxzip with refit=False. Differences are fxzip minus official at the reported 0.01, "
          "mean over cells ± standard error (sample std / sqrt(n)); 'equal': cells whose joint and avg both "
          "equal the official's.", "",
          f"Cells: {', '.join(have) if have else 'none'}  ",
          "Missing: " + ("; ".join(f"{k} ({', '.join(v)})" for k, v in missing.items()) if missing else "none"),
          "", "## Paired differences", "",
          "| method | fxzip setting | official code | n | Δ joint | Δ avg | equal |", "|---|---|---|---|---|---|---|"]
    for r in summary:
        if not r["n"] and r["fxzip"] in ZIPIT_ONLY_SIDES:
            continue  # a diagnostic side runs only some methods
        if not r["n"]:
            md.append(f"| {r['method']} | {r['fxzip'][6:]} | {r['official'][9:]} | 0 | | | |")
            continue
        md.append(f"| {r['method']} | {r['fxzip'][6:]} | {r['official'][9:]} | {r['n']} | "
                  f"{pm(r['d_joint'], r['se_joint'])} | {pm(r['d_avg'], r['se_avg'])} | {r['equal']}/{r['n']} |")
    md += ["", "## Goals", ""] + [f"- {g}" for g in doc["goals"]]
    if versus:
        md += ["", "## MuDSC minus ZipIt (joint, paired over cells)", "",
               "| alpha / beta | MuDSC row | ZipIt row | code | n | Δ joint |", "|---|---|---|---|---|---|"]
        md += [f"| {v['setting']} | {v['mudsc']} | {v['zipit']} | {v['code'].replace('fxzip_', 'fxzip ')} | {v['n']} | "
               f"{pm(v['d_joint'], v['se_joint'])} |" for v in versus]
    md += ["", "## Per cell (joint / avg)", "",
           "| cell | method | official | " + " | ".join(f"fxzip {s[6:]}" for s in settings_of(cache))
           + " | batches sha1 |", "|---|---|---|" + "---|" * len(settings_of(cache)) + "---|"]
    for key in have:
        entry = cache["cells"][key]
        for side in ("official_zipit",):
            for name in ("Model A", "Model B"):
                r = cell_rows(entry, side).get(name)
                if r:
                    md.append(f"| {key} | {name} (BN reset) | {r['joint']:.2f} / {r['avg']:.2f} | | | |")
        for method in methods:
            cells = []
            for side in (official_side_of(method),) + settings_of(cache):
                r = cell_rows(entry, side).get(method)
                cells.append(f"{r['joint']:.2f} / {r['avg']:.2f}" if r else "—")
            sha = next((entry[s]["calib_sha1"] for s in SIDES if entry.get(s)), "")
            md.append(f"| {key} | {method} | {' | '.join(cells)} | {sha} |")
    with open(out.with_suffix(".md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return doc


# ---------------------------------------------------------------------------------------------------
# one side of one cell (runs in its own process)


def refs_import(refs: Path):
    sys.path.insert(0, str(refs))
    import mudsc_compare
    import official_compare
    import train_ref
    return train_ref, official_compare, mudsc_compare


def checkpoint_path(refs: Path, ckpt_dir: Path, pair: int, width: int, half: str) -> Path:
    name = f"pair{pair}_{half}_w{width}.pt"
    return (refs if pair == 0 else ckpt_dir) / name


def load_models(train_ref, refs: Path, ckpt_dir: Path, pair: int, width: int):
    """The pair as float32 ResNet-20s (fp16 checkpoints are cast back to float32), its tasks and the
    checkpoints' own task accuracies."""
    import torch
    models, tasks, accs = [], {}, []
    for h in "AB":
        ck = torch.load(checkpoint_path(refs, ckpt_dir, pair, width, h), map_location="cpu")
        sd = {k: v.float() if v.is_floating_point() else v for k, v in ck["state_dict"].items()}
        m = train_ref.ResNet20(width)
        m.load_state_dict(sd)
        models.append(m.eval())
        tasks[f"task_{h.lower()}"] = ck["classes"]
        accs.append(ck.get("task_acc"))
    return models, tasks, accs


def load_data(train_ref, args):
    import numpy as np
    import torch
    if args.data_npz:
        d = np.load(args.data_npz)
        d = {k: d[k] for k in d.files}
    else:
        d = train_ref.load_cifar(str(args.refs / ".." / "data" / "cifar10-jpeg.tar.gz"),
                                 os.path.join(tempfile.gettempdir(), "cifar10_uint8.npz"))
    return train_ref.to_input(d["x_train"]), train_ref.to_input(d["x_test"]), torch.from_numpy(d["y_test"])


def run_one(args) -> None:
    import torch
    torch.set_num_threads(args.threads)
    train_ref, oc, mc = refs_import(args.refs)
    xtr, xte, yte = load_data(train_ref, args)
    class_vecs = torch.load(args.refs / "class_vectors.pt")
    models, tasks, _ = load_models(train_ref, args.refs, args.ckpt_dir, args.pair, args.width)
    torch.manual_seed(args.draw)
    batches = oc.calib_batches(xtr, n=args.calib_images, bs=args.calib_bs, seed=args.draw)
    sha = hashlib.sha1(b"".join(x.numpy().tobytes() for x in batches)).hexdigest()[:12]
    methods = [m for m in methods_of(args.balance) if not args.methods or m in args.methods]

    def emit(name, model, secs=None, **extra):
        r = oc.evaluate(model, xte, yte, class_vecs, tasks)
        print(json.dumps({"method": name, **{k: round(v, 4) for k, v in r.items()},
                          **({} if secs is None else {"seconds": round(secs, 2)}), **extra,
                          "calib_sha1": sha}), flush=True)

    side = args.one
    if side == "official_zipit":
        for i, m in enumerate(models):
            emit(f"Model {'AB'[i]}", oc.reset_bn(copy.deepcopy(m), batches))
        ns = types.SimpleNamespace(zipit_repo=str(args.zipit_repo), width=args.width)
        for name, merged, secs in oc.official(ns, models, batches):
            if name in methods:
                emit(name, merged, secs)
    elif side == "official_mudsc":
        names = [m for m in methods if official_side_of(m) == "official_mudsc"]
        ns = types.SimpleNamespace(mudsc_repo=str(args.mudsc_repo), width=args.width, balance=args.balance,
                                   perm_balance=[])
        for name, merged, secs, extra in mc.official(ns, models, batches, names):
            emit(name, merged, secs, config=extra.get("config"))
    else:
        import fxzip
        from fxzip.probes import DEFAULT_PROBES
        probes = DEFAULT_PROBES if side == "fxzip_default" else "reference"
        exact = side == "fxzip_zipit_reference"
        if exact:
            methods = [m for m in methods if m.startswith("ZipIt")]
        kws = {**FXZIP_KW, **{mudsc_name(b): {"method": "mudsc", "alpha": 0.5, "beta": 1.0, "weight_similarity": b}
                              for b in args.balance},
               MUDSC_AT_ZIPIT_DEFAULTS: {"method": "mudsc", "alpha": 0.3, "beta": 0.125, "weight_similarity": 0.5}}
        bases = [oc.reset_bn(copy.deepcopy(m), batches) for m in models]
        for name in methods:
            kw = {**kws[name], "method": "zipit_reference"} if exact else kws[name]
            t = time.time()
            merged = fxzip.merge(*bases, data=batches, progress=False, probes=probes, refit=False, **kw)
            secs = time.time() - t
            emit(name, merged, secs, probes=probes, config=" ".join(f"{k}={v}" for k, v in kw.items()))


# ---------------------------------------------------------------------------------------------------
# the driver


def machine_line() -> str:
    import platform
    return f"{cpu_model()}, {os.cpu_count()} cores (shared), Python {platform.python_version()}"


def side_cmd(args, side: str, pair: int, width: int, draw: int, methods: list[str] | None = None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", side, "--pair", str(pair), "--width", str(width),
           "--draw", str(draw), "--refs", str(args.refs), "--ckpt-dir", str(args.ckpt_dir),
           "--zipit-repo", str(args.zipit_repo), "--mudsc-repo", str(args.mudsc_repo), "--threads", str(args.threads),
           "--calib-images", str(args.calib_images), "--calib-bs", str(args.calib_bs),
           "--balance", *[str(b) for b in args.balance]]
    if methods or args.methods:
        cmd += ["--methods", *(methods or args.methods)]
    if args.data_npz:
        cmd += ["--data-npz", str(args.data_npz)]
    return cmd


def run_cells(args) -> None:
    cache = load_cache(args.cache)
    cells = [(p, w, d) for w in args.widths for p in args.pairs for d in args.draws]
    wanted = [m for m in methods_of(args.balance) if not args.methods or m in args.methods]
    todo = [(c, s) for c in cells for s in args.sides if missing_methods(cache, cell_key(*c), s, wanted)]
    print(f"{len(cells)} cells x {len(args.sides)} sides: {len(todo)} to run, "
          f"{len(cells) * len(args.sides) - len(todo)} cached ({args.cache})", flush=True)
    for i, ((p, w, d), side) in enumerate(todo):
        key = cell_key(p, w, d)
        if not all(checkpoint_path(args.refs, args.ckpt_dir, p, w, h).exists() for h in "AB"):
            print(f"[{i + 1}/{len(todo)}] {key} {side}: no checkpoints, skipped", flush=True)
            continue
        t = time.time()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
        old = (cache["cells"].get(key, {}).get(side) or {}).get("rows", [])
        subset = missing_methods(cache, key, side, wanted) if old else None
        proc = subprocess.run(side_cmd(args, side, p, w, d, subset), capture_output=True, text=True, env=env,
                              cwd=ROOT)
        if proc.returncode != 0:
            print(f"[{i + 1}/{len(todo)}] {key} {side}: FAILED (rc {proc.returncode})\n{proc.stderr[-3000:]}",
                  flush=True)
            continue
        rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if old:  # the methods added since the side ran, next to its rows (the original models' rows again too)
            rows = old + [r for r in rows if r["method"] not in {o["method"] for o in old}]
        shas = {r["calib_sha1"] for r in rows}
        if len(shas) != 1:
            print(f"[{i + 1}/{len(todo)}] {key} {side}: rows disagree on the batches {shas}", flush=True)
            continue
        cache = load_cache(args.cache)  # re-read: keep what another run wrote meanwhile
        cache["cells"].setdefault(key, {})[side] = {"rows": rows, "calib_sha1": shas.pop(),
                                                    "seconds": round(time.time() - t, 1),
                                                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                                        timespec="seconds")}
        save_cache(cache, args.cache)
        brief = ", ".join(f"{r['method']} {r['joint']:.2f}/{r['avg']:.2f}" for r in rows)
        print(f"[{i + 1}/{len(todo)}] {key} {side} ({time.time() - t:.0f}s): {brief}", flush=True)


def report(args) -> dict:
    cache = load_cache(args.cache)
    wanted = [cell_key(p, w, d) for w in args.widths for p in args.pairs for d in args.draws]
    header = {"command": " ".join(["python", "benchmarks/reference_parity.py"] + sys.argv[1:]),
              "commit": git_commit(), "machine": machine_line(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    doc = write_report(cache, methods_of(args.balance), wanted, header, args.out)
    for g in doc["goals"]:
        print(g)
    print(f"wrote {args.out.with_suffix('.md')} and .json")
    return doc


# ---------------------------------------------------------------------------------------------------
# more pairs: training and the fp16 conversion


def convert(args) -> None:
    """Finished pairs >= 1 of ``args.convert`` (train_ref.py's output) -> fp16 state dicts in ``args.ckpt_dir``,
    after checking that fp16 rounding moves each model's task accuracy by < 0.1 points."""
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    train_ref, _, _ = refs_import(args.refs)
    src = Path(args.convert)
    ref_vecs = torch.load(args.refs / "class_vectors.pt")
    if (src / "class_vectors.pt").exists() and not torch.equal(torch.load(src / "class_vectors.pt"), ref_vecs):
        raise SystemExit(f"{src}/class_vectors.pt differs from {args.refs}/class_vectors.pt")
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    data = None
    for path in sorted(src.glob(f"pair*_?_w{args.width}.pt")):
        pair = int(path.name[4:].split("_")[0])
        out = args.ckpt_dir / path.name
        if pair == 0 or out.exists():
            continue
        if data is None:
            d = np.load(os.path.join(tempfile.gettempdir(), "cifar10_uint8.npz")) if not args.data_npz \
                else np.load(args.data_npz)
            data = train_ref.to_input(d["x_test"]), torch.from_numpy(d["y_test"])
        ck = torch.load(path, map_location="cpu")
        classes = torch.tensor(ck["classes"])
        xte, yte = data
        m_te = torch.isin(yte, classes)
        remap = torch.full((10,), -1, dtype=torch.long)
        remap[classes] = torch.arange(5)
        accs = []
        half = {k: v.half() if v.is_floating_point() else v for k, v in ck["state_dict"].items()}
        for sd in (ck["state_dict"], {k: v.float() if v.is_floating_point() else v for k, v in half.items()}):
            m = train_ref.ResNet20(ck["width"])
            m.load_state_dict(sd)
            accs.append(train_ref.accuracy(m, xte[m_te], remap[yte[m_te]], ref_vecs[classes]))
        shift = abs(accs[1] - accs[0])
        print(f"{path.name}: task accuracy fp32 {accs[0]:.2f}, fp16-rounded {accs[1]:.2f} (shift {shift:.2f})")
        if shift >= 0.1:
            raise SystemExit(f"{path.name}: fp16 rounding moves the task accuracy by {shift:.2f} >= 0.1 points")
        torch.save({"state_dict": half, "classes": ck["classes"], "width": ck["width"], "epochs": ck["epochs"],
                    "task_acc": accs[1], "task_acc_fp32": accs[0], "dtype": "float16",
                    "recipe": f"train_ref.py --width {ck['width']} --epochs {ck['epochs']} (seeds 100 * pair + half)"},
                   out)


def train(args) -> None:
    """train_ref.py pairs 0..P-1 into --train-dir on one thread (its set_num_threads(2) is overridden), pair 0
    copied from REFS first so it is not retrained; then the conversion."""
    tdir = Path(args.train_dir)
    tdir.mkdir(parents=True, exist_ok=True)
    for h in "AB":
        src = args.refs / f"pair0_{h}_w{args.width}.pt"
        if src.exists() and not (tdir / src.name).exists():
            shutil.copy(src, tdir / src.name)
    code = ("import runpy, sys, torch\n"
            f"torch.set_num_threads({args.threads}); torch.set_num_threads = lambda n: None\n"
            f"sys.argv = ['train_ref.py', {str(tdir)!r}, '--width', '{args.width}', '--epochs', '{args.epochs}',"
            f" '--pairs', '{args.train}']\n"
            f"runpy.run_path({str(args.refs / 'train_ref.py')!r}, run_name='__main__')\n")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    args.convert = str(tdir)
    convert(args)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, nargs="+", default=[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[1])
    ap.add_argument("--draws", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--balance", type=float, nargs="+", default=[0.5], help="MuDSC balance factors")
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    ap.add_argument("--methods", nargs="+", default=None, help="a subset of the methods (default: all)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=RESULTS / "reference_parity")
    ap.add_argument("--refs", type=Path, default=DEFAULT_REFS)
    ap.add_argument("--ckpt-dir", type=Path, default=CKPT_DIR)
    ap.add_argument("--zipit-repo", type=Path, default=Path("/work/official/zipit"))
    ap.add_argument("--mudsc-repo", type=Path, default=Path("/work/official/mudsc"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-images", type=int, default=2000)
    ap.add_argument("--calib-bs", type=int, default=500)
    ap.add_argument("--data-npz", type=Path, default=None,
                    help="a CIFAR-shaped npz (x_train, x_test, y_test uint8/int) instead of the CIFAR-10 archive")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--one", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--pair", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--width", type=int, default=1)
    ap.add_argument("--draw", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--train", type=int, default=None, metavar="P", help="train pairs 0..P-1 (pair 0 copied)")
    ap.add_argument("--train-dir", default=os.path.join(tempfile.gettempdir(), "parity_train"))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--convert", default=None, metavar="DIR", help="fp16-convert DIR's finished pairs >= 1")
    args = ap.parse_args(argv)
    args.refs = args.refs.resolve()
    if args.one:
        run_one(args)
    elif args.train is not None:
        train(args)
    elif args.convert:
        convert(args)
    else:
        if not args.report_only:
            run_cells(args)
        report(args)


if __name__ == "__main__":
    main()
