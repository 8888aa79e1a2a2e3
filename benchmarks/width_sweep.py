"""merged_width sweep, with and without the refit: joint accuracy against MACs, CIFAR-10 (5+5).

Issue 12's curve. For every architecture and evaluation pair: one
``fxzip.calibrate`` (reused by every row of the pair), then full zips with
ZipIt (the architecture's alpha / beta, as ``probe_policy.py``) and Permute
at ``merged_width`` 1.0 .. 1.4, each without and (where asked) with
``refit=True``; each row scored on the pair's test images (joint and average
per-task accuracy, ``eval_cifar.py``'s protocol) with the merged model's
multiply-adds relative to one model (``report.macs``). Reference rows: both
originals (norm statistics reset on the calibration images) and their
ensemble (both side by side, 2x the MACs).

Partial zips (``--stops K ...`` without refit, ``--refit-stops K ...`` with it):
``stop_at=K`` (K weight layers zipped, a shared trunk up to that cut, one head
per model after it; ``fxzip.cut_points`` lists the K that exist) at merged_width
1.0, for the same methods and from the same per-pair calibration; with refit
the trunk is refit before the split and each head's first layers after it.
They are separate curves ("ZipIt partial", "ZipIt partial + refit", ...) on
the plot and a table of their own; the goal considers every configuration,
widened or partial.

Goal checked (issue 12): at most 1.3x one model's MACs, some configuration
within 3 joint points of the ensemble on ResNet-20 x1.

Rows go into a resumable ``--cache`` JSON; the plain rows of every pair run
before any refit row (and the partial refit rows before the full-zip refit
rows), so a cut-off run leaves the cheap curves finished. Every new row records
the commit it was computed at, and refit rows the merge's refit passes and
seconds. ``--read-cache`` also takes a results JSON this script wrote
(``width_sweep.json``): its rows seed the cache, stamped with that run's commit.

Example::

    python benchmarks/width_sweep.py --archs resnet20x1 --pairs 0 1 2 --threads 1 \\
        --refit-widths 1.0 1.2 1.3 1.4 --refit-methods zipit --cache /tmp/ws_cache.json
    python benchmarks/width_sweep.py --archs resnet20x1 --pairs 0 1 2 --threads 1 --widths --methods zipit \\
        --stops 19 17 15 13 7 --refit-methods zipit --refit-widths --refit-stops 15 17 13 19 7 \\
        --read-cache benchmarks/results/width_sweep.json --cache /tmp/ws_cache.json

``--smoke``: random-init tiny models and synthetic images, seconds (used by a test).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

import eval_cifar as ec  # noqa: E402
import eval_methods as em  # noqa: E402
import probe_policy as pp  # noqa: E402

import fxzip  # noqa: E402
from fxzip.evaluate import Ensemble  # noqa: E402

WIDTHS = (1.0, 1.1, 1.2, 1.3, 1.4)
METHODS = ("zipit", "permute")
GOAL_MACS, GOAL_POINTS = 1.3, 3.0


def row_key(arch: str, pair: int, method: str, width: float, refit: bool, stop: int | None = None) -> str:
    if stop is not None:  # partial zip (merged_width 1.0)
        return f"{arch}|pair{pair}|{method}|stop{stop}|refit{int(refit)}"
    return f"{arch}|pair{pair}|{method}|w{width:g}|refit{int(refit)}"


def curve_name(method: str, refit: bool, partial: bool = False) -> str:
    return ({"zipit": "ZipIt", "permute": "Permute"}[method] + (" partial" if partial else "")
            + (" + refit" if refit else ""))


def plan(args, arch: str) -> list[tuple[bool, str, float, int | None]]:
    """(refit, method, width, stop) in run order (stop None: full zip): every plain row (full, then partial),
    then the partial refit rows, then the full-zip refit rows. Partial rows only for ``--stop-archs``."""
    partial = args.stop_archs is None or arch in args.stop_archs
    out = [(False, m, w, None) for m in args.methods for w in args.widths]
    out += [(False, m, 1.0, k) for m in args.methods for k in (args.stops if partial else [])]
    out += [(True, m, 1.0, k) for m in args.refit_methods for k in (args.refit_stops if partial else [])]
    out += [(True, m, w, None) for m in args.refit_methods for w in args.refit_widths]
    return out


class PairState:
    """A pair's models, data and one calibration, built on first use."""

    def __init__(self, arch, pair, get, data, args):
        self.arch, self.pair, self.get, self.data, self.args = arch, pair, get, data, args
        self._ready = False

    def ready(self, cache: dict, save) -> "PairState":
        if self._ready:
            return self
        self.models, infos = self.get(self.arch, self.pair)
        self.tasks = [list(infos[0]["classes"]), list(infos[1]["classes"])]
        classes = sorted(self.tasks[0] + self.tasks[1])
        # resnet20x1 uses the 32 px protocol of the GroupNorm ResNet-20, as probe_policy.py
        self.calib, self.test = em.pair_data("resnet20gn" if self.arch == "resnet20x1" else self.arch,
                                             self.data, classes, self.args, self.pair)
        t0 = time.perf_counter()
        self.cal = fxzip.calibrate(*self.models, data=self.calib, progress=False)
        cache[f"{self.arch}|pair{self.pair}|calibration_seconds"] = round(time.perf_counter() - t0, 2)
        self._ready = True
        return self


def run_references(st: PairState, vecs, cache: dict, save, log, commit: str = "") -> None:
    arch, pair = st.arch, st.pair
    key = f"{arch}|pair{pair}|Ensemble"
    if key in cache:
        return
    st.ready(cache, save)
    originals = [ec.reset_copy(m, st.calib) for m in st.models]
    t0 = time.perf_counter()
    row = ec.score(Ensemble(*originals), st.test, st.tasks, vecs)
    row.update(arch=arch, pair=pair, method="ensemble", macs_ratio=float(len(originals)),
               seconds=round(time.perf_counter() - t0, 2), commit=commit)
    for k, m in enumerate(originals):
        r = ec.score(m, st.test, st.tasks, vecs)
        r.update(arch=arch, pair=pair, method=f"model {'AB'[k]}", macs_ratio=1.0, commit=commit)
        cache[f"{arch}|pair{pair}|Model {'AB'[k]}"] = r
    cache[key] = row
    save()
    log(f"  {arch} pair {pair} ensemble joint {row['joint']:5.1f}  models "
        f"{cache[f'{arch}|pair{pair}|Model A']['joint']:.1f} / {cache[f'{arch}|pair{pair}|Model B']['joint']:.1f}")


def run_row(st: PairState, method: str, width: float, refit: bool, vecs, cache: dict, save, log,
            retry_errors: bool, stop: int | None = None, commit: str = "") -> None:
    arch, pair = st.arch, st.pair
    key = row_key(arch, pair, method, width, refit, stop)
    if key in cache and not (retry_errors and "error" in cache[key]):
        return
    st.ready(cache, save)
    alpha, beta = pp.ALPHA_BETA[arch]
    extra = {"alpha": alpha, "beta": beta} if method == "zipit" else {}
    if stop is not None:
        extra["stop_at"] = stop
    row: dict[str, Any] = {"arch": arch, "pair": pair, "method": method, "merged_width": width, "refit": refit,
                           "stop_at": stop, "commit": commit}
    if method == "zipit":
        row.update(alpha=alpha, beta=beta)
    t0 = time.perf_counter()
    try:
        merged = fxzip.merge(*st.models, data=st.cal, method=method, progress=False, refit=refit,
                             merged_width=width, **extra)
        report = merged.meta["fxzip"]
        row["merge_seconds"] = {k: round(float(v), 2) for k, v in report.seconds.items()}
        if refit:
            row["refit_passes"] = report.details["refit"]["passes"]
        if report.cut is not None:
            row["cut"] = {"name": report.cut.name, "k": report.cut.k, "m": report.cut.m}
        macs = dict(report.macs)
        row.update(ec.score(merged.eval(), st.test, st.tasks, vecs))
        row.update(macs={k: float(v) for k, v in macs.items()}, macs_ratio=macs["merged"] / macs["original"],
                   ensemble_macs_ratio=macs["ensemble"] / macs["original"])
    except Exception as e:  # recorded (and listed in the markdown), not retried unless --retry-errors
        row.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        log(row["traceback"])
    row["seconds"] = round(time.perf_counter() - t0, 2)
    cache[key] = row
    save()
    where = f"w {width:g}" if stop is None else f"stop_at {stop}"
    if "error" in row:
        log(f"  {arch} pair {pair} {curve_name(method, refit, stop is not None):24s} {where}: ERROR {row['error']}")
    else:
        fit = (f", refit {row['merge_seconds'].get('refit', float('nan')):.1f}s in {row['refit_passes']} passes"
               if refit else "")
        log(f"  {arch} pair {pair} {curve_name(method, refit, stop is not None):24s} {where}: joint "
            f"{row['joint']:5.1f} avg {row['avg']:5.1f} MACs x{row['macs_ratio']:.3f} ({row['seconds']:.1f}s{fit})")


# --------------------------------------------------------------------------- #
# summary
# --------------------------------------------------------------------------- #
def _mean(v: list[float]) -> float:
    return sum(v) / len(v) if v else float("nan")


def _std(v: list[float]) -> float:
    if len(v) < 2:
        return float("nan")
    m = _mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def summarize(cache: dict, arch: str, pairs: list[int], todo: list[tuple[bool, str, float, int | None]]) -> dict:
    ref = {}
    for name in ("Ensemble", "Model A", "Model B"):
        rows = [cache[f"{arch}|pair{p}|{name}"] for p in pairs if f"{arch}|pair{p}|{name}" in cache]
        ref[name] = {"joint": _mean([r["joint"] for r in rows]), "joint_std": _std([r["joint"] for r in rows]),
                     "avg": _mean([r["avg"] for r in rows]), "avg_std": _std([r["avg"] for r in rows]),
                     "pairs": [r["pair"] for r in rows], "commits": sorted({r.get("commit") or "?" for r in rows})}
    orig = [(cache[f"{arch}|pair{p}|Model A"]["joint"] + cache[f"{arch}|pair{p}|Model B"]["joint"]) / 2
            for p in pairs if f"{arch}|pair{p}|Model A" in cache]
    ref["originals_mean"] = {"joint": _mean(orig), "joint_std": _std(orig)}
    cells, missing, errors = [], [], []
    order = lambda t: (t[3] is not None, t[0], METHODS.index(t[1]), t[2], -(t[3] or 0))  # noqa: E731
    for refit, method, width, stop in sorted(dict.fromkeys(todo), key=order):
        rows, gaps = [], []
        for p in pairs:
            key = row_key(arch, p, method, width, refit, stop)
            r = cache.get(key)
            if r is None:
                missing.append(key)
            elif "error" in r:
                errors.append((key, r["error"]))
            else:
                rows.append(r)
                ens = cache.get(f"{arch}|pair{p}|Ensemble")
                if ens is not None:
                    gaps.append(r["joint"] - ens["joint"])
        if not rows:
            continue
        passes = [r["refit_passes"] for r in rows if "refit_passes" in r]
        fit_s = [r["merge_seconds"]["refit"] for r in rows if "refit" in r.get("merge_seconds", {})]
        cut = next((r["cut"] for r in rows if "cut" in r), None)
        cells.append({"method": method, "refit": refit, "merged_width": width, "stop_at": stop, "cut": cut,
                      "curve": curve_name(method, refit, stop is not None),
                      "pairs": [r["pair"] for r in rows],
                      "commits": sorted({r.get("commit") or "?" for r in rows}),
                      "refit_passes": sorted(set(passes)), "refit_seconds": _mean(fit_s) if fit_s else float("nan"),
                      "refit_seconds_range": [min(fit_s), max(fit_s)] if fit_s else None,
                      "joint": _mean([r["joint"] for r in rows]), "joint_std": _std([r["joint"] for r in rows]),
                      "avg": _mean([r["avg"] for r in rows]), "avg_std": _std([r["avg"] for r in rows]),
                      "macs_ratio": _mean([r["macs_ratio"] for r in rows]),
                      "macs_ratio_range": [min(r["macs_ratio"] for r in rows), max(r["macs_ratio"] for r in rows)],
                      "gap_to_ensemble": _mean(gaps), "gap_to_ensemble_std": _std(gaps),
                      "seconds": _mean([r["seconds"] for r in rows])})
    return {"reference": ref, "cells": cells, "missing": missing, "errors": errors}


def goal(summary: dict) -> dict:
    """Best configuration at <= 1.3x one model's MACs and its gap to the ensemble."""
    ens = summary["reference"]["Ensemble"]["joint"]
    ok = [c for c in summary["cells"] if c["macs_ratio"] <= GOAL_MACS + 1e-9]
    if not ok or math.isnan(ens):
        return {"met": None, "best": None, "ensemble": ens}
    best = max(ok, key=lambda c: c["joint"])
    return {"met": best["joint"] >= ens - GOAL_POINTS, "best": best, "ensemble": ens,
            "gap": best["joint"] - ens}


def crossing(cells: list[dict], curve_cells: list[dict], target: float) -> dict:
    """Where the MACs reach ``target`` x one model (MACs depend on the width only, so every cell
    of the architecture gives the MACs-per-width curve: linear between sweep points, a quadratic fit
    beyond), and one curve's joint accuracy there (linear in width; nan outside that curve's widths)."""
    import numpy as np

    macs: dict[float, list[float]] = {}
    for c in cells:
        macs.setdefault(c["merged_width"], []).append(c["macs_ratio"])
    pts = sorted((w, _mean(v)) for w, v in macs.items())
    width, extrapolated = float("nan"), True
    for (w0, m0), (w1, m1) in zip(pts, pts[1:]):
        if m0 <= target <= m1 and m1 > m0:
            width, extrapolated = w0 + (target - m0) / (m1 - m0) * (w1 - w0), False
            break
    else:
        if len(pts) >= 3 and pts[-1][1] < target:
            a, b, c = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 2)
            roots = [r.real for r in np.roots([a, b, c - target]) if abs(r.imag) < 1e-9 and r.real > pts[-1][0]]
            if roots:
                width = float(min(roots))
    own = sorted((c["merged_width"], c["joint"]) for c in curve_cells)
    joint = float("nan")
    for (w0, j0), (w1, j1) in zip(own, own[1:]):
        if w0 <= width <= w1:
            joint = j0 + (width - w0) / (w1 - w0) * (j1 - j0)
    return {"width": width, "joint": joint, "extrapolated": extrapolated}


# --------------------------------------------------------------------------- #
# output
# --------------------------------------------------------------------------- #
def _pm(m: float, s: float) -> str:
    if math.isnan(m):
        return "-"
    return f"{m:.1f}" + ("" if math.isnan(s) else f" ± {s:.1f}")


def zipped(c: dict) -> str:
    """'k/m' layers zipped of a partial cell."""
    m = (c.get("cut") or {}).get("m")
    return f"{c['stop_at']}/{m}" if m else f"{c['stop_at']}"


def config_name(c: dict) -> str:
    if c["stop_at"] is not None:
        return f"stop_at {c['stop_at']} ({zipped(c)} zipped)"
    return f"merged_width {c['merged_width']:g}"


def reading(arch: str, s: dict) -> list[str]:
    g, ref = s["goal"], s["reference"]
    out = []
    if g["best"] is None:
        out.append(f"- {arch}: no finished configuration at <= {GOAL_MACS}x MACs; the goal cannot be judged.")
    else:
        b = g["best"]
        verdict = "**met**" if g["met"] else "**not met**"
        if arch != "resnet20x1":
            verdict = verdict.replace("**", "") + " (the issue sets this goal for ResNet-20 x1 only; shown for comparison)"
        out.append(f"- {arch}, goal (some configuration within {GOAL_POINTS:g} joint points of the ensemble at "
                   f"<= {GOAL_MACS}x one model's MACs; every configuration of the tables, widened or partial, "
                   f"{len([c for c in s['cells'] if c['macs_ratio'] <= GOAL_MACS + 1e-9])} within the budget): "
                   f"{verdict}. Best at <= {GOAL_MACS}x: {b['curve']} {config_name(b)} ({b['macs_ratio']:.3f}x MACs"
                   + ("" if len(b["pairs"]) == s["n_pairs"] else f", pairs {b['pairs']} only") + "), joint "
                   f"{_pm(b['joint'], b['joint_std'])} against the ensemble's {g['ensemble']:.1f} "
                   f"({g['gap']:+.1f}; paired per pair {_pm(b['gap_to_ensemble'], b['gap_to_ensemble_std'])}); "
                   f"the originals average {ref['originals_mean']['joint']:.1f}.")
        within = [c for c in s["cells"] if c["macs_ratio"] <= GOAL_MACS + 1e-9]
        per_curve = {}
        for c in within:
            if c["curve"] not in per_curve or c["joint"] > per_curve[c["curve"]]["joint"]:
                per_curve[c["curve"]] = c
        out.append(f"- {arch}, best of each curve at <= {GOAL_MACS}x MACs (ensemble {g['ensemble']:.1f}): " + "; ".join(
            f"{c['curve']} {config_name(c)} {c['joint']:.1f} at {c['macs_ratio']:.2f}x ({c['joint'] - g['ensemble']:+.1f})"
            for c in per_curve.values()) + ".")
    for curve in dict.fromkeys(c["curve"] for c in s["cells"] if c["stop_at"] is not None):
        cs = sorted((c for c in s["cells"] if c["curve"] == curve), key=lambda c: c["macs_ratio"])
        ens = [c for c in cs if c["gap_to_ensemble"] >= -GOAL_POINTS]
        out.append(f"- {arch} {curve}: " + ", ".join(
            f"{config_name(c)} {c['joint']:.1f} at {c['macs_ratio']:.2f}x ({c['gap_to_ensemble']:+.1f})" for c in cs)
            + (f"; within {GOAL_POINTS:g} of the ensemble from {config_name(ens[0])} ({ens[0]['macs_ratio']:.2f}x MACs) on"
               if ens else f"; no point within {GOAL_POINTS:g} of the ensemble") + ".")
    for curve, cx in s["crossings"].items():
        cs = sorted((c for c in s["cells"] if c["curve"] == curve), key=lambda c: c["merged_width"])
        last = cs[-1]
        n = "" if len(last["pairs"]) == s["n_pairs"] else f", pairs {last['pairs']} only"
        at_last = (f"its widest finished point (merged_width {last['merged_width']:g}, {last['macs_ratio']:.2f}x MACs{n})"
                   f" has joint {last['joint']:.1f}, {last['gap_to_ensemble']:+.1f} from the ensemble (paired)")
        if math.isnan(cx["width"]):
            out.append(f"- {arch} {curve}: the MACs of the sweep do not reach the ensemble's 2x; {at_last}.")
        elif not math.isnan(cx["joint"]):
            out.append(f"- {arch} {curve}: reaches the ensemble's MACs (2x) at merged_width ~{cx['width']:.2f}, "
                       f"joint ~{cx['joint']:.1f} there ({cx['joint'] - g['ensemble']:+.1f} from the ensemble).")
        else:
            how = "by a quadratic fit of MACs against width" if cx["extrapolated"] else "between sweep points"
            end = (": below the ensemble at nearly the ensemble's cost, so the curve does not reach the ensemble "
                   "at equal MACs" if last["macs_ratio"] >= 1.9 and last["gap_to_ensemble"] < 0
                   else " (the curve is not finished up to the ensemble's cost)")
            out.append(f"- {arch} {curve}: the MACs reach the ensemble's 2x at merged_width ~{cx['width']:.2f} "
                       f"({how}), beyond this curve's widths; {at_last}{end}.")
    return out


def write_markdown(path: Path, result: dict) -> None:
    st = result["setting"]
    by_commit: dict[str, int] = {}
    for r in result["rows"].values():
        if isinstance(r, dict):
            by_commit[r.get("commit") or "?"] = by_commit.get(r.get("commit") or "?", 0) + 1
    L = ["# merged_width sweep and partial zips, with and without refit: CIFAR-10 (5+5)", "",
         f"Command: `{st['command']}`", "",
         f"Machine: {st['machine']}. Commit of this invocation: {st['commit']}. Wall time of this invocation "
         f"{st['wall_seconds'] / 60:.1f} min (rows read from --cache are not recomputed; every row's seconds, "
         "merge + scoring, are in the JSON and the table).", "",
         "Rows by the commit they were computed at (the tables' commit column says which): "
         + ", ".join(f"{c}: {n} rows" for c, n in sorted(by_commit.items())) + ".", "",
         "Configuration: " + "; ".join([
             f"pairs {st['pairs']}",
             f"{st['calib_images']} augmented training images of both tasks per pair for the calibration "
             "(fixed per pair, seed 1000 + pair; one `fxzip.calibrate` per pair, reused by every row)",
             f"test: {st['test_images']}",
             "ZipIt alpha / beta per architecture as probe_policy.py: " + ", ".join(
                 f"{a} {pp.ALPHA_BETA[a][0]} / {pp.ALPHA_BETA[a][1]}" for a in st["archs"]),
             "probes 'all', refit ridge 1e-3 (fxzip defaults), norm statistics reset on the calibration images "
             "(BatchNorm only)",
             f"widths {st['widths']} for {st['methods']} without refit, {st['refit_widths']} for "
             f"{st['refit_methods']} with refit",
             f"partial zips (merged_width 1.0, stop_at = layers zipped; {', '.join(st.get('stop_archs', [])) or 'none'}"
             f" only) {st.get('stops', [])} for {st['methods']} without refit, {st.get('refit_stops', [])} for "
             f"{st['refit_methods']} with refit",
             "MACs: `report.macs` merged / original (one model); ensemble = both models side by side (2x)"]) + ".",
         ""]
    for arch in st["archs"]:
        s = result["summary"][arch]
        ref = s["reference"]
        L += [f"## {arch}", "",
              "Joint and average per-task accuracy (%), mean ± std over pairs; Δ ens: paired joint difference to "
              "the ensemble (mean ± std over pairs); s/row: merge + scoring; refit s / passes: the merge's refit "
              "time (`report.seconds['refit']`, mean over pairs) and `report.details['refit']['passes']` (not "
              "recorded before the partial-zip rows: -); commit: the commit the rows were computed at.", "",
              "Full zips, widened:", "",
              "| configuration | merged_width | MACs (x one model) | joint | avg | Δ ens (joint) | pairs | s/row "
              "| refit s / passes | commit |",
              "|---|---|---|---|---|---|---|---|---|---|"]

        def fit(c):
            if not c["refit"] or not c["refit_passes"]:
                return "-"
            return f"{c['refit_seconds']:.0f} / {', '.join(map(str, c['refit_passes']))}"

        def macs_cell(c):
            lo, hi = c["macs_ratio_range"]
            return f"{c['macs_ratio']:.3f}" + ("" if hi - lo < 5e-4 else f" ({lo:.3f}-{hi:.3f})")

        for c in (c for c in s["cells"] if c["stop_at"] is None):
            L.append(f"| {c['curve']} | {c['merged_width']:g} | {macs_cell(c)} | {_pm(c['joint'], c['joint_std'])} | "
                     f"{_pm(c['avg'], c['avg_std'])} | {_pm(c['gap_to_ensemble'], c['gap_to_ensemble_std'])} | "
                     f"{len(c['pairs'])} | {c['seconds']:.0f} | {fit(c)} | {', '.join(c['commits'])} |")
        for name in ("Ensemble", "Model A", "Model B"):
            r = ref[name]
            L.append(f"| {name} | - | {2.0 if name == 'Ensemble' else 1.0:.3f} | {_pm(r['joint'], r['joint_std'])} | "
                     f"{_pm(r['avg'], r['avg_std'])} | - | {len(r['pairs'])} | - | - | {', '.join(r['commits'])} |")
        partial = [c for c in s["cells"] if c["stop_at"] is not None]
        if partial:
            L += ["", "Partial zips (merged_width 1.0; a shared trunk up to the cut, one head per model after it; "
                  "zipped: weight layers in the trunk / on the longest path; cut: the node the heads read):", "",
                  "| configuration | stop_at | zipped | cut | MACs (x one model) | joint | avg | Δ ens (joint) | pairs "
                  "| s/row | refit s / passes | commit |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for c in partial:
                L.append(f"| {c['curve']} | {c['stop_at']} | {zipped(c)} | {(c.get('cut') or {}).get('name', '-')} | "
                         f"{macs_cell(c)} | {_pm(c['joint'], c['joint_std'])} | {_pm(c['avg'], c['avg_std'])} | "
                         f"{_pm(c['gap_to_ensemble'], c['gap_to_ensemble_std'])} | {len(c['pairs'])} | "
                         f"{c['seconds']:.0f} | {fit(c)} | {', '.join(c['commits'])} |")
            L.append(f"| Ensemble | 0 | 0 | - | 2.000 | {_pm(ref['Ensemble']['joint'], ref['Ensemble']['joint_std'])} "
                     f"| {_pm(ref['Ensemble']['avg'], ref['Ensemble']['avg_std'])} | - | "
                     f"{len(ref['Ensemble']['pairs'])} | - | - | {', '.join(ref['Ensemble']['commits'])} |")
        L += ["", "MACs ratio per merged_width (mean over pairs; the same for refit, which keeps the shapes): "
              + "; ".join(f"{w}: " + ", ".join(f"{m} {x:.3f}" for m, x in sorted(v.items()))
                          for w, v in sorted(s["macs_by_width"].items(), key=lambda kv: float(kv[0]))), ""]
        L += ["Reading:", ""] + reading(arch, s) + [""]
        if s["missing"] or s["errors"]:
            L += ["Missing rows:", ""]
            by_config: dict[str, list[str]] = {}
            for k in s["missing"]:  # arch|pairP|method|wW|refitR or arch|pairP|method|stopK|refitR
                _, pair, method, w, r = k.split("|")
                where = f"merged_width {w[1:]}" if w.startswith("w") else f"stop_at {w[4:]}"
                by_config.setdefault(f"{curve_name(method, r == 'refit1', w.startswith('stop'))} {where}",
                                     []).append(pair[4:])
            L += [f"- {c}: pairs {', '.join(ps)} not run ({st['missing_reason']})" for c, ps in by_config.items()]
            L += [f"- `{k}`: failed: {e}" for k, e in s["errors"]]
            L.append("")
    L += ["Plot (`width_sweep.png`): joint accuracy against multiply-adds relative to one model, one line per "
          "method with and without refit, widened full zips (solid / dashed) and partial zips (dash-dot / dotted, "
          "open markers) (mean over the pairs finished; error bars: std over pairs; the label by each point is its "
          "merged_width, or k/m layers zipped for a partial zip; Permute's partial points are drawn 0.008 to the right of their "
          "MACs so that they do not hide ZipIt's), the ensemble as a star at 2x, the originals' mean joint accuracy as a "
          "dotted line, the 1.3x budget as a red line and the band within 3 points of the ensemble shaded.", ""]
    if st.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in st["notes"]]
    path.write_text("\n".join(L) + "\n")


def write_plot(path: Path, result: dict) -> bool:
    try:
        from matplotlib.figure import Figure
    except Exception:
        return False
    archs = result["setting"]["archs"]
    fig = Figure(figsize=(6.4 * len(archs), 5.2), layout="constrained")
    axes = fig.subplots(1, len(archs), squeeze=False)[0]
    style = {"ZipIt": ("C0", "-", "o"), "ZipIt + refit": ("C0", "--", "s"),
             "Permute": ("C1", "-", "^"), "Permute + refit": ("C1", "--", "v"),
             "ZipIt partial": ("C2", "-.", "o"), "ZipIt partial + refit": ("C2", ":", "s"),
             "Permute partial": ("C3", "-.", "^"), "Permute partial + refit": ("C3", ":", "v")}
    for ax, arch in zip(axes, archs):
        s = result["summary"][arch]
        ref = s["reference"]
        for curve, (color, ls, mk) in style.items():
            cs = sorted((c for c in s["cells"] if c["curve"] == curve), key=lambda c: c["macs_ratio"])
            if not cs:
                continue
            part = cs[0]["stop_at"] is not None
            dx = 0.008 if part and cs[0]["method"] == "permute" else 0.0  # ZipIt's and Permute's partial points overlap
            ax.errorbar([c["macs_ratio"] + dx for c in cs], [c["joint"] for c in cs],
                        yerr=[0 if math.isnan(c["joint_std"]) else c["joint_std"] for c in cs],
                        color=color, ls=ls, marker=mk, capsize=3, label=curve,
                        mfc="white" if part else color)
            for c in cs:
                above = part and c["method"] == "zipit"  # partial labels: ZipIt above, Permute below the point
                ax.annotate(zipped(c) if part else f"{c['merged_width']:g}", (c["macs_ratio"] + dx, c["joint"]),
                            fontsize=6, xytext=(-14 if above else 3, 5 if above else -9), textcoords="offset points",
                            color=color)
        e = ref["Ensemble"]
        if not math.isnan(e["joint"]):
            ax.errorbar([2.0], [e["joint"]], yerr=[0 if math.isnan(e["joint_std"]) else e["joint_std"]],
                        color="k", marker="*", ms=12, capsize=3, ls="none", label="ensemble (2 models)")
            ax.axhspan(e["joint"] - GOAL_POINTS, e["joint"], color="k", alpha=0.06,
                       label=f"within {GOAL_POINTS:g} of the ensemble")
        o = ref["originals_mean"]["joint"]
        if not math.isnan(o):
            ax.axhline(o, color="gray", ls=":", lw=1, label="originals (mean joint of A and B)")
        ax.axvline(GOAL_MACS, color="r", ls=":", lw=1, label=f"{GOAL_MACS:g}x MACs (goal)")
        ax.set_xlabel("multiply-adds relative to one model")
        ax.set_ylabel("joint accuracy (%)")
        ax.set_title(f"CIFAR-10 (5+5) {arch}, pairs {result['setting']['pairs'][arch]}", fontsize=10)
        ax.grid(alpha=0.3)
    handles: dict = {}
    for ax in axes:  # one legend for every panel, below them
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=4, fontsize=8)
    fig.savefig(path, dpi=120)
    return True


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "fxzip", "passes"],
                               cwd=ROOT, capture_output=True, text=True).stdout.split()
        dirty = [d for d in dirty if "/" in d]
        return head + (f" (working tree with uncommitted changes to {', '.join(dirty)})" if dirty else "")
    except Exception:
        return "unknown"


def read_rows(path: Path) -> dict:
    """A cache JSON's rows, or a results JSON's (its "rows", each stamped with the run's commit where it has none)."""
    data = json.loads(path.read_text())
    if isinstance(data.get("setting"), dict) and isinstance(data.get("rows"), dict):
        commit = str(data["setting"].get("commit", "?")).split(" ")[0]
        return {k: ({"commit": commit, **v} if isinstance(v, dict) and not v.get("commit") else v)
                for k, v in data["rows"].items()}
    return data


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["resnet20x1", "vit"], choices=sorted(pp.CKPT))
    ap.add_argument("--pairs", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS, help="rows without refit")
    ap.add_argument("--widths", type=float, nargs="*", default=list(WIDTHS))
    ap.add_argument("--refit-methods", nargs="*", default=list(METHODS), choices=METHODS, help="rows with refit")
    ap.add_argument("--refit-widths", type=float, nargs="*", default=list(WIDTHS))
    ap.add_argument("--stops", type=int, nargs="*", default=[],
                    help="partial zips (stop_at = layers zipped, merged_width 1.0) without refit, for --methods")
    ap.add_argument("--refit-stops", type=int, nargs="*", default=[],
                    help="partial zips with refit, for --refit-methods (run before the full-zip refit rows)")
    ap.add_argument("--stop-archs", nargs="*", default=None, choices=sorted(pp.CKPT),
                    help="architectures the --stops / --refit-stops rows are for (default: every one of --archs)")
    pp.add_protocol_args(ap)
    ap.add_argument("--cache", default=None, help="JSON of finished rows (resumable)")
    ap.add_argument("--read-cache", nargs="*", default=[],
                    help="more cache JSONs to read rows from (never written; --cache wins on a clash); a results "
                         "JSON of this script (width_sweep.json) gives its rows, stamped with its commit")
    ap.add_argument("--retry-errors", action="store_true", help="re-run rows the cache holds as failed")
    ap.add_argument("--only-cached", action="store_true", help="render the tables from --cache, run nothing")
    ap.add_argument("--missing-reason", default="not computed by this invocation")
    ap.add_argument("--commit", default=None, help="the commit the rows were computed at (default: this checkout's)")
    ap.add_argument("--machine-note", default="", help="appended to the machine line (load, sharing)")
    ap.add_argument("--out", default=str(HERE / "results" / "width_sweep"))
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    t0 = time.perf_counter()
    args = parse_args(argv)
    command = "python benchmarks/width_sweep.py " + " ".join(shlex.quote(a) for a in
                                                            (sys.argv[1:] if argv is None else argv))
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    if args.threads:
        torch.set_num_threads(args.threads)
    cache_path = Path(args.cache) if args.cache else None
    cache: dict = {}
    for extra in args.read_cache:  # rows of other runs (e.g. one process per architecture), read only
        cache.update(read_rows(Path(extra)))
    if cache_path and cache_path.exists():
        cache.update(json.loads(cache_path.read_text()))

    def save() -> None:
        if cache_path:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_name(cache_path.name + ".tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            os.replace(tmp, cache_path)

    if args.smoke:
        args.calib_images, args.calib_batch, args.test_per_class = 20, 10, 5
        data = ec.synthetic_data()
        vecs = F.normalize(torch.randn(10, ec.OUT_DIM, generator=torch.Generator().manual_seed(0)), dim=1)
        get = lambda arch, p: ec.random_pair(p, lambda: pp.build(arch, True))  # noqa: E731
        have = lambda arch, p: True  # noqa: E731
    else:
        data, vecs, get, have = None, None, pp.load_pair, pp.have_pair
    pairs = {a: [p for p in args.pairs if have(a, p)] for a in args.archs}
    archs = [a for a in args.archs if pairs[a]]
    todo = {a: plan(args, a) for a in archs}
    commit = args.commit or _commit()
    if not args.only_cached:
        if data is None:
            import cifar_data

            data, vecs = cifar_data.load_cifar10(args.data), ec.class_vectors()
        for arch in archs:
            states = {p: PairState(arch, p, get, data, args) for p in pairs[arch]}
            for p, stt in states.items():
                log(f"{arch} pair {p}: references")
                run_references(stt, vecs, cache, save, log, commit)
            # every plain row before any refit row; each configuration on every pair before the next one,
            # so a cut-off run leaves whole rows of the table (the calibrations stay in memory)
            for refit, method, width, stop in todo[arch]:
                for p, stt in states.items():
                    run_row(stt, method, width, refit, vecs, cache, save, log, args.retry_errors, stop, commit)
            del states
    summary = {}
    for arch in archs:
        s = summarize(cache, arch, pairs[arch], todo[arch])
        macs_by_width: dict[str, dict[str, float]] = {}
        full = [c for c in s["cells"] if c["stop_at"] is None]
        for c in full:
            macs_by_width.setdefault(f"{c['merged_width']:g}", {})[c["method"]] = c["macs_ratio"]
        s["macs_by_width"] = macs_by_width
        s["n_pairs"] = len(pairs[arch])
        s["goal"] = goal(s)
        s["crossings"] = {}
        for curve in dict.fromkeys(c["curve"] for c in full):
            s["crossings"][curve] = crossing(full, [c for c in full if c["curve"] == curve], 2.0)
        summary[arch] = s
    try:
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    n_test = args.test_per_class * 10
    setting = {"command": command, "archs": archs, "pairs": pairs, "calib_images": args.calib_images,
               "test_images": f"the first {args.test_per_class} CIFAR-10 test images of each class ({n_test})",
               "widths": args.widths, "methods": args.methods, "refit_widths": args.refit_widths,
               "refit_methods": args.refit_methods, "stops": args.stops, "refit_stops": args.refit_stops,
               "stop_archs": [a for a in archs if args.stop_archs is None or a in args.stop_archs],
               "commit": commit,
               "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                          f"{torch.get_num_threads()} threads; load average (1/5/15 min) at the end {load}"
                          + (f"; {args.machine_note}" if args.machine_note else ""),
               "missing_reason": args.missing_reason, "smoke": args.smoke, "notes": args.note,
               "wall_seconds": round(time.perf_counter() - t0, 1)}
    rows = {k: v for k, v in cache.items() if k.split("|")[0] in archs}
    result = {"setting": setting, "summary": summary, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + ".json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    write_markdown(Path(str(out) + ".md"), result)
    result["plot"] = write_plot(Path(str(out) + ".png"), result)
    log(Path(str(out) + ".md").read_text())
    return result


if __name__ == "__main__":
    main()
