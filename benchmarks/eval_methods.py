"""CIFAR-10 (5+5) with every merge method: ResNet-20 GroupNorm, a small ViT, fine-tuned MobileNetV2.

Issue 5's benchmark, beside ``eval_cifar.py`` (issue 4's protocol and JSON schema).
For every pair ``p`` (models A and B of ``train_cifar.py`` / ``finetune_mobilenet.py``)
it computes the rows

    Model A, Model B, W.Avg, Permute, ZipIt m/m (full), MuDSC-zip (method="mudsc"),
    MuDSC-permute (method="mudsc_permute"), MuDSC data-free (method="mudsc",
    data=None, weight_similarity=1.0, example_inputs=...), [MuDSC data-free + norm
    reset, BatchNorm models only], ZipIt k/m partial zips (``--partial``), Ensemble

with the columns MACs (G per image at the arch's input size), joint, task A,
task B, average per-task accuracy, and the mean and std over pairs.

Protocol (as ``eval_cifar.py``, issue 4):

* calibration / norm-reset data: ``--calib-images`` augmented training images
  of both tasks (crop pad 4 + flip at 32 px; MobileNetV2: then bilinear to 64 px),
  fixed per pair (seed 1000 + pair); ``fxzip.calibrate`` runs once per pair and
  its ``Calibration`` is reused by every data method (W.Avg, Permute, ZipIt, the
  partial zips, MuDSC-zip, MuDSC-permute);
* norm statistics are reset on those images for every row, the originals
  included (``fxzip.reset_norm_stats``; a no-op for GroupNorm / LayerNorm
  models, which keep no running statistics). The data-free MuDSC row is the
  exception by definition: its BatchNorm statistics are merged with M (fxzip's
  data-free rule); for BatchNorm models a second row adds the reset;
* joint accuracy: single-head models take the argmax of cos over all 10 class
  vectors; multi-head models (partial zips, Ensemble) score each head on its own
  task's vectors, softmax(100 cos) per head, argmax over the concatenation
  (``fxzip.evaluate.evaluate``);
* ZipIt / MuDSC-zip use ``--alpha`` / ``--beta`` (default 0.3 / 0.125, fxzip's
  defaults); MuDSC uses ``weight_similarity`` 0.5 (fxzip's default) with data.

Outputs: ``benchmarks/results/cifar10_5+5_<arch>.{json,md,png}`` (``--out`` stem).

Examples::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_methods.py --arch resnet20gn --pairs 0 1 2 \\
        --calib-images 1000 --test-per-class 200 --data ../shared/data/cifar10-jpeg.tar.gz
    .venv/bin/python benchmarks/eval_methods.py --arch vit --smoke

``--smoke`` runs every code path on random-init (tiny) models and synthetic images in seconds
(``tests/test_benchmark_smoke_methods.py``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

import cifar_data  # noqa: E402
import eval_cifar as ec  # noqa: E402  (helper-6's protocol helpers, reused)

import fxzip  # noqa: E402
from fxzip.evaluate import Ensemble, count_macs  # noqa: E402
from fxzip.zoo import cifar_vit, resnet20  # noqa: E402

ARCHS = ("resnet20gn", "vit", "mobilenetv2")
CKPT = {"resnet20gn": HERE / "checkpoints" / "cifar10_resnet20gnx1",
        "vit": HERE / "checkpoints" / "cifar10_vitx1",
        "mobilenetv2": HERE / "checkpoints" / "cifar10_mobilenetv2_64px"}
# partial-zip cut points (layers zipped k of m): stage ends (ResNet-20), block ends (ViT), stage ends (MobileNetV2)
PARTIAL = {"resnet20gn": (7, 13, 19), "vit": (5, 9, 13), "mobilenetv2": (18, 30, 48)}
SIZE = {"resnet20gn": 32, "vit": 32, "mobilenetv2": 64}
DESCR = {"resnet20gn": "fxzip.zoo.resnet20(width=1, out_dim=384, norm='group') (GroupNorm, 4-32 groups)",
         "vit": "fxzip.zoo.cifar_vit(width=1, out_dim=384) (timm ViT, patch 4, dim 96, depth 4, 3 heads of 32)",
         "mobilenetv2": "torchvision mobilenet_v2 (ImageNet weights) + Linear(1280, 384), fine-tuned at 64 px "
                        "(benchmarks/finetune_mobilenet.py)"}
NORMS = {"resnet20gn": "GroupNorm only: no running statistics, so every norm reset is a no-op",
         "vit": "LayerNorm only: no running statistics, so every norm reset is a no-op",
         "mobilenetv2": "BatchNorm: statistics reset on the calibration images for every row (originals included) "
                        "except the data-free MuDSC row, whose statistics are merged with M"}


# --------------------------------------------------------------------------- #
# models and data
# --------------------------------------------------------------------------- #
def build(arch: str, smoke: bool = False) -> torch.nn.Module:
    if arch == "resnet20gn":
        return resnet20(1, out_dim=ec.OUT_DIM, norm="group")
    if arch == "vit":
        return cifar_vit(1, out_dim=ec.OUT_DIM, depth=2 if smoke else 4)
    if arch == "mobilenetv2":
        import torchvision

        m = torchvision.models.mobilenet_v2(width_mult=0.25 if smoke else 1.0)
        m.classifier[1] = torch.nn.Linear(m.last_channel, ec.OUT_DIM)
        return m
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")


def load_pair(arch: str, ckpt_dir: Path, pair: int) -> tuple[list[torch.nn.Module], list[dict]]:
    models, infos = [], []
    for name in ("A", "B"):
        info = json.loads((ckpt_dir / f"pair{pair}_{name}.json").read_text())
        m = build(arch)
        path = ec._checkpoint(ckpt_dir, pair, name)
        sd = torch.load(path, map_location="cpu", weights_only=True)
        m.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()})
        models.append(m.eval())
        infos.append(info)
    return models, infos


def pair_available(ckpt_dir: Path, pair: int) -> bool:
    return ec.pair_available(ckpt_dir, pair)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def pair_data(arch: str, data, classes, args, pair: int):
    size = SIZE[arch]
    calib = [_resize(x, size).contiguous() for x in
             ec.calib_batches(data, classes, args.calib_images, args.calib_batch, seed=1000 + pair)]
    test = [(_resize(x, size).contiguous(memory_format=torch.channels_last), y)
            for x, y in ec.test_batches(data, classes, batch=args.test_batch, per_class=args.test_per_class)]
    return calib, test


# --------------------------------------------------------------------------- #
# rows
# --------------------------------------------------------------------------- #
def row_specs(arch: str, partial, m: int, bn: bool, rows=None) -> list[tuple[str, str, dict | None]]:
    full = f"{m}/{m}"
    specs: list[tuple[str, str, dict | None]] = [
        ("Model A", "-", None), ("Model B", "-", None),
        ("W.Avg", full, {"method": "weight_average"}),
        ("Permute", full, {"method": "permute"}),
        (f"ZipIt {full}", full, {"method": "zipit", "zip": True}),
        ("MuDSC-zip", full, {"method": "mudsc", "zip": True}),
        ("MuDSC-permute", full, {"method": "mudsc_permute"}),
        ("MuDSC data-free", full, {"method": "mudsc", "zip": True, "data_free": True}),
    ]
    if bn:
        specs.append(("MuDSC data-free + reset", full, {"method": "mudsc", "zip": True, "data_free": True,
                                                         "reset": True}))
    else:  # variance repair (issue 11): what the norm reset does for BatchNorm, for every other net
        specs.append(("Permute + repair", full, {"method": "permute", "repair": True}))
        specs.append(("ZipIt + repair", full, {"method": "zipit", "zip": True, "repair": True}))
    for k in sorted((k for k in partial if 0 < k < m), reverse=True):  # cuts beyond a (smoke) model's depth dropped
        specs.append((f"ZipIt {k}/{m}", f"{k}/{m}", {"method": "zipit", "zip": True, "stop_at": k}))
    specs.append(("Ensemble", f"0/{m}", None))
    if rows is not None:
        specs = [sp for sp in specs if _row_key(sp[0], m) in rows]
    return specs


ROW_KEYS = ("Model A", "Model B", "W.Avg", "Permute", "ZipIt", "MuDSC-zip", "MuDSC-permute", "MuDSC data-free",
            "MuDSC data-free + reset", "Permute + repair", "ZipIt + repair", "partial", "Ensemble")


def _row_key(label: str, m: int) -> str:
    if label.startswith("ZipIt ") and label != "ZipIt + repair":
        return "ZipIt" if label == f"ZipIt {m}/{m}" else "partial"
    return label


def _macs(model: torch.nn.Module, size: int) -> float:
    return count_macs(model, torch.zeros(1, 3, size, size)) / 1e9


def eval_pair(arch, models, infos, data, vecs, args, pair: int, cache: dict, log, save) -> list[dict]:
    tasks = [list(infos[0]["classes"]), list(infos[1]["classes"])]
    classes = sorted(tasks[0] + tasks[1])
    calib, test = pair_data(arch, data, classes, args, pair)
    size = SIZE[arch]
    bn = any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in models[0].modules())
    m_layers = fxzip.cut_points(models[0], calib[0][:2])[-1].m
    stored: dict[str, Any] = {}
    cal = None
    rows = []
    for label, zipped, kw in row_specs(arch, args.partial, m_layers, bn, args.rows):
        key = (f"{arch}|pair{pair}|{label}|calib{args.calib_images}|test{args.test_per_class}|"
               f"a{args.alpha}|b{args.beta}|ws{args.weight_similarity}")
        if key in cache:
            rows.append(cache[key])
            log(f"  pair {pair} {label:24s} (cached)")
            continue
        t0 = time.perf_counter()
        row: dict[str, Any] = {"method": label, "zipped": zipped}
        try:
            if kw is None:  # originals (norm stats reset) and their ensemble, from one forward pass each
                if not stored:
                    originals = [ec.reset_copy(mm, calib) for mm in models]
                    outs = [ec._outputs(mm, test) for mm in originals]
                    offsets = torch.cumsum(torch.tensor([0] + [len(y) for _, y in test]), 0)
                    stored["test"] = [(torch.arange(int(offsets[i]), int(offsets[i + 1])), y)
                                      for i, (_, y) in enumerate(test)]
                    stored["lookups"] = [ec._Lookup(o) for o in outs]
                    stored["macs"] = [_macs(mm, size) for mm in originals] + [_macs(Ensemble(*originals), size)]
                i = {"Model A": 0, "Model B": 1, "Ensemble": 2}[label]
                model = stored["lookups"][i] if i < 2 else Ensemble(*stored["lookups"])
                row.update(macs_g=stored["macs"][i], **ec.score(model, stored["test"], tasks, vecs))
            else:
                kw = dict(kw)
                zip_ = kw.pop("zip", False)
                data_free = kw.pop("data_free", False)
                reset = kw.pop("reset", False)
                extra = {"alpha": args.alpha, "beta": args.beta} if zip_ else {}
                if kw["method"].startswith("mudsc"):
                    extra["weight_similarity"] = 1.0 if data_free else args.weight_similarity
                if data_free:
                    model = fxzip.merge(*models, data=None, example_inputs=calib[0][:2], progress=False,
                                        **kw, **extra)
                    if reset:
                        fxzip.reset_norm_stats(model, calib)
                else:
                    if cal is None:
                        cal = fxzip.calibrate(*models, data=calib, progress=False)
                        row["calibration_seconds"] = time.perf_counter() - t0
                    model = fxzip.merge(*models, data=cal, progress=False, **kw, **extra)
                model = model.eval()
                rep = model.meta.get("fxzip") if hasattr(model, "meta") else None
                if rep is not None and getattr(rep, "details", None) and "mudsc" in rep.details:
                    d = rep.details["mudsc"]
                    if isinstance(d, dict):
                        row["mudsc"] = {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool))}
                if rep is not None and "repair" in getattr(rep, "details", {}):
                    row["repair"] = rep.details["repair"]
                    row["repair_seconds"] = rep.seconds.get("repair")
                row.update(macs_g=_macs(model, size), **ec.score(model, test, tasks, vecs))
                if zip_:
                    row.update(alpha=args.alpha, beta=args.beta)
                if "weight_similarity" in extra:
                    row["weight_similarity"] = extra["weight_similarity"]
        except Exception as e:  # keep going; the error is reported in the results
            tb = traceback.format_exc()
            log(f"  pair {pair} {label}: ERROR {type(e).__name__}: {e}\n{tb}")
            row.update(macs_g=float("nan"), joint=float("nan"), task_a=float("nan"), task_b=float("nan"),
                       avg=float("nan"), error=f"{type(e).__name__}: {e}", traceback=tb)
        row["seconds"] = time.perf_counter() - t0
        if "error" not in row:
            cache[key] = row
            save()
        rows.append(row)
        log(f"  pair {pair} {label:24s} joint {row['joint']:5.1f}  A {row['task_a']:5.1f}  B {row['task_b']:5.1f}"
            f"  avg {row['avg']:5.1f}  MACs {row['macs_g']:.4f} G  ({row['seconds']:.1f}s)")
    return rows


def aggregate(per_pair: dict[int, list[dict]]) -> list[dict]:
    pairs = sorted(per_pair)
    out = []
    for i, first in enumerate(per_pair[pairs[0]]):
        rows = [per_pair[p][i] for p in pairs]
        ok = [r for r in rows if "error" not in r]
        agg: dict[str, Any] = {"method": first["method"], "zipped": None if first["zipped"] == "-" else first["zipped"]}
        if ok:
            agg["macs_g"] = round(float(np.mean([r["macs_g"] for r in ok])), 6)
            for col in ("joint", "task_a", "task_b", "avg"):
                mean, std = ec._mean_std([r[col] for r in ok])
                agg[col] = round(mean, 2)
                agg[f"{col}_std"] = round(std, 2)
        else:
            agg.update(macs_g=None, joint=None, joint_std=None, task_a=None, task_a_std=None, task_b=None,
                       task_b_std=None, avg=None, avg_std=None)
        agg["n_pairs"] = len(ok)
        agg["per_pair"] = {str(p): ({c: round(r[c], 2) for c in ("joint", "task_a", "task_b", "avg")}
                                    if "error" not in r else {"error": r["error"]}) for p, r in zip(pairs, rows)}
        agg["seconds_mean"] = round(float(np.mean([r["seconds"] for r in rows])), 2)
        for k in ("alpha", "beta", "weight_similarity"):
            if k in first:
                agg[k] = first[k]
        errs = [r["error"] for r in rows if "error" in r]
        if errs:
            agg["errors"] = errs
        out.append(agg)
    return out


# --------------------------------------------------------------------------- #
# reporting
# --------------------------------------------------------------------------- #
def _f(r: dict, col: str) -> str:
    if r.get(col) is None:
        return "error"
    return f"{r[col]:.1f} ± {r[col + '_std']:.1f}" if r.get(f"{col}_std") else f"{r[col]:.1f}"


def comparison_text(arch: str, rows: list[dict]) -> list[str]:
    by = {r["method"]: r for r in rows if r.get("joint") is not None}
    full = next((r for r in rows if r["method"].startswith("ZipIt") and r["zipped"] and
                 r["zipped"].split("/")[0] == r["zipped"].split("/")[1] and r.get("joint") is not None), None)
    out = []

    def cmp(a, b, name_a, name_b):
        """Paired over pairs: mean difference, its std, and in how many pairs a beats b."""
        if a is None or b is None:
            return
        common = [p for p in a["per_pair"] if "joint" in a["per_pair"][p] and "joint" in b["per_pair"].get(p, {})]
        if not common:
            return
        parts = []
        for col in ("joint", "avg"):
            d = np.array([a["per_pair"][p][col] - b["per_pair"][p][col] for p in common])
            sd = float(d.std(ddof=1)) if len(d) > 1 else 0.0
            parts.append(f"{col} {d.mean():+.1f} ± {sd:.1f} (higher in {int((d > 0).sum())}/{len(d)} pairs)")
        out.append(f"- {name_a} − {name_b}, paired over pairs: " + "; ".join(parts) + ".")

    cmp(by.get("MuDSC-zip"), full, "MuDSC-zip", "ZipIt (full)")
    cmp(by.get("MuDSC-permute"), by.get("Permute"), "MuDSC-permute", "Permute")
    cmp(by.get("MuDSC-zip"), by.get("Permute"), "MuDSC-zip", "Permute")
    cmp(by.get("MuDSC data-free"), by.get("W.Avg"), "MuDSC data-free", "W.Avg")
    cmp(by.get("ZipIt + repair"), full, "ZipIt + repair", "ZipIt (full)")
    cmp(by.get("Permute + repair"), by.get("Permute"), "Permute + repair", "Permute")
    ens = by.get("Ensemble")
    if by.get("ZipIt + repair") and full and ens and ens["joint"] > full["joint"]:
        gap = ens["joint"] - full["joint"]
        gain = by["ZipIt + repair"]["joint"] - full["joint"]
        out.append(f"- Repair closes {gain / gap:+.0%} of ZipIt's joint gap to the ensemble ({gain:+.1f} of "
                   f"{gap:.1f} points; the issue's goal is a third).")
    singles = [r for r in rows if r.get("joint") is not None and r["method"] not in ("Model A", "Model B")
               and r["zipped"] and r["zipped"].split("/")[0] == r["zipped"].split("/")[1]]
    if singles:
        best = max(singles, key=lambda r: r["joint"])
        out.append(f"- Best single (fully merged) model by joint accuracy: **{best['method']}** "
                   f"({best['joint']:.1f} joint, {best['avg']:.1f} avg).")
    wavg = by.get("W.Avg")
    if arch == "mobilenetv2" and wavg is not None and singles:
        others = [r for r in singles if r["method"] != "W.Avg"]
        beat = [r["method"] for r in others if r["joint"] > wavg["joint"]]
        out.append(f"- Fine-tuned from one pretrained start (the papers' warning): W.Avg reaches {wavg['joint']:.1f} "
                   f"joint / {wavg['avg']:.1f} avg; methods above it on joint: {', '.join(beat) or 'none'}.")
    return out


def write_markdown(path: Path, result: dict) -> None:
    s, rows = result["setting"], result["rows"]
    L = [f"# CIFAR-10 (5+5), {s['arch']}: every merge method", "",
         f"Model: {s['model']}. Pairs {s['pairs']} (mean ± std over pairs). Norms: {s['norms']}.", "",
         f"Command: `{s['command']}`", "",
         f"Machine: {s['device']}. Compute time (sum of the rows' measured seconds, all pairs) "
         f"{s['compute_seconds']:.0f} s; this invocation {s['wall_seconds']:.0f} s (rows from --cache are not "
         "recomputed).", "",
         f"Configuration: {s['calib_images']} calibration images per pair ({s['calib_data']}); "
         f"{s['test_images']}; ZipIt / MuDSC-zip alpha {s['alpha']}, beta {s['beta']} ({s['alpha_beta_source']}); "
         f"MuDSC weight_similarity {s['weight_similarity']} with data, 1.0 data-free; "
         f"fxzip MuDSC defaults otherwise (seeded random space order, stop after 5 sweeps without improvement).", "",
         "Base models (own-task 5-way accuracy on the full CIFAR-10 test split, from the training json):", ""]
    for k, v in s["base_models"].items():
        flag = " **below 90 % (flagged)**" if v["below_90"] else ""
        L.append(f"- {k}: {100 * v['test_acc']:.2f} % ({v.get('epochs')} epochs){flag}")
    L += ["", "| Method | Zipped | MACs (G) | Joint | Task A | Task B | Avg | s/pair |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        macs = f"{r['macs_g']:.4f}" if r.get("macs_g") is not None else "-"
        L.append(f"| {r['method']} | {r['zipped'] or '-'} | {macs} | {_f(r, 'joint')} | {_f(r, 'task_a')} | "
                 f"{_f(r, 'task_b')} | {_f(r, 'avg')} | {r['seconds_mean']:.1f} |")
    L += ["", "Per pair (joint / avg):", ""]
    for r in rows:
        L.append(f"- {r['method']}: " + "; ".join(
            f"pair {p}: " + (f"{v['joint']:.1f} / {v['avg']:.1f}" if "joint" in v else f"ERROR {v['error']}")
            for p, v in r["per_pair"].items()))
    L += ["", "## Comparison", ""] + result.get("comparison", [])
    if result.get("notes"):
        L += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    path.write_text("\n".join(L) + "\n")


def write_plot(path: Path, result: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    rows = [r for r in result["rows"] if r.get("joint") is not None]
    pts = []
    for r in rows:
        if (r["method"].startswith("ZipIt") and "repair" not in r["method"]) or r["method"] == "Ensemble":
            k, m = map(int, r["zipped"].split("/"))
            pts.append((k, r["joint"], r["joint_std"] or 0.0))
    pts.sort()
    fig, ax = plt.subplots(figsize=(6, 4))
    if pts:
        m = int(rows[-1]["zipped"].split("/")[1]) if rows[-1]["zipped"] else 1
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                    label="ZipIt (0 = ensemble)", capsize=3)
        marks = {"W.Avg": "x", "Permute": "s", "MuDSC-zip": "^", "MuDSC-permute": "v", "MuDSC data-free": "D",
                 "ZipIt + repair": "*", "Permute + repair": "P",
                 "MuDSC data-free + reset": "P"}
        for r in rows:
            if r["method"] in marks:
                ax.scatter([m], [r["joint"]], marker=marks[r["method"]], label=r["method"], zorder=3)
        for r in rows:
            if r["method"] in ("Model A", "Model B"):
                ax.axhline(r["joint"], ls=":", lw=1, color="gray")
        ax.set_xlabel(f"layers zipped (of {m})")
    ax.set_ylabel("joint accuracy (%)")
    ax.set_title(f"CIFAR-10 (5+5) {result['setting']['arch']}, pairs {result['setting']['pairs']}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- #
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", required=True, choices=ARCHS)
    ap.add_argument("--checkpoints", type=Path, default=None, help="default: benchmarks/checkpoints/<arch dir>")
    ap.add_argument("--pairs", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", type=str, default=None)
    ap.add_argument("--calib-images", type=int, default=1000)
    ap.add_argument("--calib-batch", type=int, default=250)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--test-batch", type=int, default=250)
    ap.add_argument("--partial", type=int, nargs="*", default=None, help="layers zipped k of the partial zips")
    ap.add_argument("--alpha", type=float, default=ec.DEFAULT_ALPHA)
    ap.add_argument("--beta", type=float, default=ec.DEFAULT_BETA)
    ap.add_argument("--alpha-beta-source", default="fxzip defaults (no held-out grid for this arch)")
    ap.add_argument("--weight-similarity", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="output stem (default results/cifar10_5+5_<arch>)")
    ap.add_argument("--cache", type=Path, default=None, help="json cache of finished rows (resume)")
    ap.add_argument("--rows", nargs="+", default=None, choices=ROW_KEYS,
                    help="compute only these rows (default: all); 'partial' = every partial zip")
    ap.add_argument("--note", action="append", default=[], help="extra line for the results' notes")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if a.partial is None:
        a.partial = PARTIAL[a.arch]
    if a.smoke:
        a.calib_images, a.calib_batch, a.test_per_class = min(a.calib_images, 16), 8, min(a.test_per_class, 4)
        a.pairs = a.pairs[:1]
    return a


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, flush=True))
    ckpt = args.checkpoints or CKPT[args.arch]
    out = args.out or HERE / "results" / f"cifar10_5+5_{args.arch}"
    out.parent.mkdir(parents=True, exist_ok=True)
    cache: dict = json.loads(args.cache.read_text()) if args.cache and args.cache.exists() else {}

    def save():
        if args.cache:
            args.cache.write_text(json.dumps(cache))

    if args.smoke:
        data = ec.synthetic_data(n_train=200, n_test=100)
        pairs = args.pairs
    else:
        data = cifar_data.load_cifar10(args.data or (ec.DEFAULT_DATA if ec.DEFAULT_DATA.exists() else None))
        pairs = [p for p in args.pairs if pair_available(ckpt, p)]
        missing = sorted(set(args.pairs) - set(pairs))
        if missing:
            log(f"pairs without both checkpoints (skipped): {missing}")
        if not pairs:
            raise SystemExit(f"no complete pair in {ckpt}")
    vecs = ec.class_vectors()
    per_pair, base, notes = {}, {}, []
    for p in pairs:
        models, infos = ec.random_pair(p, lambda: build(args.arch, smoke=True)) if args.smoke else load_pair(args.arch, ckpt, p)
        for name, info in zip("AB", infos):
            base[f"pair{p}_{name}"] = {"classes": info["classes"], "test_acc": info["test_acc"],
                                       "below_90": bool(info.get("below_90", info["test_acc"] < 0.9)),
                                       "epochs": info.get("epochs")}
        log(f"pair {p}: classes A {infos[0]['classes']} B {infos[1]['classes']}")
        t0 = time.time()
        per_pair[p] = eval_pair(args.arch, models, infos, data, vecs, args, p, cache, log, save)
        log(f"pair {p} done in {time.time() - t0:.0f}s")
    rows = aggregate(per_pair)
    n_test = 10 * args.test_per_class
    accs = [v["test_acc"] for v in base.values()]
    setting = {
        "dataset": "synthetic (smoke)" if args.smoke else "CIFAR-10 (5+5 disjoint class splits), JPEG copy",
        "arch": args.arch, "model": DESCR[args.arch], "width": 1,
        "loss": "CLIP-style: cross-entropy over 100 x cosine to fixed all-MiniLM-L6-v2 text embeddings "
                "of the model's own 5 classes",
        "pairs": pairs, "epochs": ec._one_or_list(sorted({v["epochs"] for v in base.values()}, key=str)),
        "calib_images": args.calib_images, "calib_batch": args.calib_batch,
        "calib_data": "random training images of both tasks, random crop pad 4 + flip"
                      + (", bilinear to 64 px" if SIZE[args.arch] == 64 else "") + ", fixed per pair (seed 1000 + pair)",
        "test_images": f"{n_test} CIFAR-10 test images per pair (the first {args.test_per_class} of each class)",
        "input_size": SIZE[args.arch], "norms": NORMS[args.arch],
        "alpha": args.alpha, "beta": args.beta, "alpha_beta_source": args.alpha_beta_source,
        "weight_similarity": args.weight_similarity, "partial": list(args.partial),
        "device": ec._device_text(torch.device("cpu")),
        "command": "python benchmarks/eval_methods.py " + " ".join(shlex.quote(a) for a in
                                                                  (argv if argv is not None else sys.argv[1:])),
        "base_model_min_task_acc": min(accs) if accs else None,
        "base_models": base, "below_90": any(v["below_90"] for v in base.values()),
        "smoke": args.smoke, "wall_seconds": time.time() - t_start,
        "compute_seconds": round(sum(r["seconds"] for rs in per_pair.values() for r in rs), 1),
        "timing_note": "wall_seconds: this invocation; compute_seconds: sum of every row's measured seconds, "
                       "including rows read back from --cache (computed by an earlier invocation)",
        "joint_protocol": "single head: argmax of cos over all 10 class vectors; multi-head: per-head "
                          "softmax(100 cos) over its task's classes, argmax over the concatenation",
    }
    if setting["below_90"]:
        notes.append("Base models below the 90 % own-task bar are flagged above; their rows are reported, "
                     "not dropped.")
    notes += [
        f"MACs: per image at {SIZE[args.arch]} px (fxzip.evaluate.count_macs); a full zip keeps one model's graph.",
        "Accuracies are on a subset of the CIFAR-10 test split (see Configuration), so a row's standard error per "
        "pair is about 1.5 points (joint, 1000 images); the base-model list above uses the full test split.",
    ] + list(args.note)
    result = {"setting": setting, "rows": rows, "per_pair": {str(p): r for p, r in per_pair.items()},
              "comparison": comparison_text(args.arch, rows), "notes": notes}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    write_markdown(out.with_suffix(".md"), result)
    setting["plot"] = out.with_suffix(".png").name if write_plot(out.with_suffix(".png"), result) else None
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    log(f"wrote {out}.json/.md/.png in {setting['wall_seconds']:.0f}s")
    return result


if __name__ == "__main__":
    main()
