"""CIFAR-10 (5+5), ResNet-20 with ordinary cross-entropy heads: partial zips where the heads differ.

The papers' cross-entropy setting. Each model of a pair (``benchmarks/train_cifar.py --head ce``)
ends in its own 5-way Linear classifier over its own classes: no shared class vectors, so the two
last layers have the same shape but unrelated meanings. Only the user can say not to zip them, so
every merge here is a partial zip (``stop_at=k``: the first k of the 20 weight layers are zipped,
each model keeps the rest as its head) at each stage cut of ResNet-20 (k = 7, 13, 19: the outputs
of stages 1, 2 and 3; k = 19 zips everything but the classifiers). A full zip is not a row: it
would average two unrelated classifiers.

Rows per pair: ZipIt k/20 and Permute k/20 for every k, and the Ensemble (both models, 0/20
zipped). Columns: MACs (G, per 32x32 image), joint accuracy, task A, task B, avg per-task.
Protocol, as ``benchmarks/eval_cifar.py`` (whose helpers this script uses): calibration and
norm-reset data are ``--calib-images`` augmented training images of both tasks per pair (seed
1000 + pair), the same images for every row; every model is a multi-head model (a tuple of one
5-way output per task), scored per head on its own task, and the joint prediction is the argmax
over the concatenated per-head softmaxes (``fxzip.evaluate.evaluate``). The models' own-task
accuracies are in the setting. ZipIt's alpha and beta: ``--alpha``/``--beta`` (default fxzip's
0.3 / 0.125), no grid.

Outputs (``--out`` stem, default ``benchmarks/results/cifar10_5+5_resnet20x{width}_ce``): ``.json``
(the schema of the other CIFAR results: setting, rows with mean / std / per-pair values) and ``.md``.

    python benchmarks/eval_cifar_ce.py --width 1 --pairs 0 1 2
    python benchmarks/eval_cifar_ce.py --smoke     # random-init models, synthetic images (seconds)
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
ROOT = HERE.parent

import cifar_data  # noqa: E402
import eval_cifar as ev  # noqa: E402

import fxzip  # noqa: E402
from fxzip.evaluate import Ensemble, evaluate  # noqa: E402
from fxzip.zoo import resnet20  # noqa: E402

HEAD_CLASSES = 5


def load_pair(ckpt_dir: Path, pair: int, width: int) -> tuple[list[torch.nn.Module], list[dict]]:
    models, infos = [], []
    for name in ("A", "B"):
        info = json.loads((ckpt_dir / f"pair{pair}_{name}.json").read_text())
        if info.get("head") != "ce":
            raise ValueError(f"{ckpt_dir}/pair{pair}_{name}: not a cross-entropy-head model "
                             "(train it with benchmarks/train_cifar.py --head ce)")
        m = resnet20(width, out_dim=HEAD_CLASSES)
        state = torch.load(ev._checkpoint(ckpt_dir, pair, name), map_location="cpu", weights_only=True)
        m.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()})
        models.append(m.eval())
        infos.append(info)
    return models, infos


def score(model: torch.nn.Module, test: list, tasks: list[list[int]]) -> dict[str, float]:
    r = evaluate(model, test, tasks)
    return {"joint": 100 * r.joint, "task_a": 100 * r.per_task[0], "task_b": 100 * r.per_task[1],
            "avg": 100 * r.avg}


def eval_pair(models, infos, data, args, pair: int, log) -> list[dict]:
    tasks = [list(infos[0]["classes"]), list(infos[1]["classes"])]
    classes = sorted(tasks[0] + tasks[1])
    calib = ev.calib_batches(data, classes, args.calib_images, args.calib_batch, seed=1000 + pair)
    test = ev.test_batches(data, classes, per_class=args.test_per_class)
    cal = fxzip.calibrate(*models, data=calib, progress=False)
    rows = []
    for k in sorted(args.stop_at, reverse=True):
        for method in ("zipit", "permute"):
            t0 = time.perf_counter()
            extra = {"alpha": args.alpha, "beta": args.beta} if method == "zipit" else {}
            merged = fxzip.merge(*models, data=cal, method=method, stop_at=k, progress=False, **extra)
            row = {"method": f"{'ZipIt' if method == 'zipit' else 'Permute'} {k}/20", "zipped": f"{k}/20",
                   "macs_g": ev.macs_g(merged), **score(merged, test, tasks),
                   "seconds": time.perf_counter() - t0, **extra}
            rows.append(row)
            log(f"  pair {pair} {row['method']:14s} joint {row['joint']:5.1f}  A {row['task_a']:5.1f}  "
                f"B {row['task_b']:5.1f}  avg {row['avg']:5.1f}")
    t0 = time.perf_counter()
    ensemble = Ensemble(*[ev.reset_copy(m, calib) for m in models])
    rows.append({"method": "Ensemble", "zipped": "0/20", "macs_g": ev.macs_g(ensemble),
                 **score(ensemble, test, tasks), "seconds": time.perf_counter() - t0})
    log(f"  pair {pair} Ensemble       joint {rows[-1]['joint']:5.1f}  avg {rows[-1]['avg']:5.1f}")
    return rows


def write_markdown(path: Path, result: dict) -> None:
    s, rows = result["setting"], result["rows"]
    lines = [f"# CIFAR-10 (5+5), ResNet-20x{s['width']} with cross-entropy heads: partial zips", ""]
    if s["smoke"]:
        lines += ["**SMOKE RUN: random-init models and synthetic images; the numbers mean nothing.**", ""]
    accs = s["base_model_task_acc_range"]
    lines += [
        f"Base models: {s['epochs']} epochs ({s['base_model_training_device']}), own-task 5-way test accuracy "
        + (f"{100 * accs[0]:.1f}-{100 * accs[1]:.1f} %." if accs else "n/a (random init)."), "",
        f"Setting: {s['dataset']}; model `{s['model']}`; loss: {s['loss']}; pairs {s['pairs']} (mean ± std over "
        f"pairs, ddof=1); ZipIt alpha = {s['alpha']}, beta = {s['beta']} ({s['alpha_beta_source']}); "
        f"calibration / norm-reset data: {s['calib_images']} augmented training images of both tasks per pair; "
        f"test: {s['test_images']}; {s['device']}; wall time {s['wall_seconds'] / 60:.1f} min.", "",
        f"Command: `{s['command']}`", "",
        "Every row is a multi-head model (one 5-way head per task); joint = argmax over the concatenated "
        "per-head softmaxes. Accuracies in %, MACs in G per 32x32 image. k/20 = weight layers zipped "
        "(7, 13, 19: after stages 1, 2, 3; 19 keeps only the classifiers apart).", "",
        "| Method | Zipped | MACs (G) | Joint | Task A | Task B | Avg |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['zipped']} | {r['macs_g']:.4f} | {ev._fmt(r, 'joint')} | "
                     f"{ev._fmt(r, 'task_a')} | {ev._fmt(r, 'task_b')} | {ev._fmt(r, 'avg')} |")
    lines += ["", "Per pair (joint / avg):", "", "| Method | " + " | ".join(f"pair {p}" for p in s["pairs"]) + " |",
              "|---|" + "---|" * len(s["pairs"])]
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join(
            f"{r['per_pair'][str(p)]['joint']:.1f} / {r['per_pair'][str(p)]['avg']:.1f}" for p in s["pairs"]) + " |")
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--width", type=int, default=1)
    ap.add_argument("--pairs", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", type=str, default=str(ev.DEFAULT_DATA), help="CIFAR-10 JPEG tree or .tar.gz")
    ap.add_argument("--checkpoints", type=str, default=None,
                    help="default benchmarks/checkpoints/cifar10_resnet20x{width}_ce")
    ap.add_argument("--calib-images", type=int, default=2000)
    ap.add_argument("--calib-batch", type=int, default=500)
    ap.add_argument("--stop-at", type=int, nargs="+", default=[7, 13, 19], help="stage cuts of ResNet-20")
    ap.add_argument("--alpha", type=float, default=ev.DEFAULT_ALPHA)
    ap.add_argument("--beta", type=float, default=ev.DEFAULT_BETA)
    ap.add_argument("--test-per-class", type=int, default=None, help="test images per class (default: all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=str, default=None, help="output stem")
    ap.add_argument("--smoke", action="store_true", help="random-init models + synthetic images (for tests)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.calib_images, args.calib_batch = min(args.calib_images, 20), min(args.calib_batch, 10)
        args.test_per_class = min(args.test_per_class or 5, 5)
    return args


def main(argv: list[str] | None = None) -> dict:
    t_start = time.perf_counter()
    args = parse_args(argv)
    command = "python benchmarks/eval_cifar_ce.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else list(argv)))
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else HERE / "results" / f"cifar10_5+5_resnet20x{args.width}_ce"
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(args.checkpoints) if args.checkpoints else \
        HERE / "checkpoints" / f"cifar10_resnet20x{args.width}_ce"
    if args.smoke:
        data = ev.synthetic_data()
        get_pair = lambda p: ev.random_pair(p, lambda: resnet20(args.width, out_dim=HEAD_CLASSES))  # noqa: E731
        pairs, dataset = list(args.pairs), "synthetic random uint8 images (smoke)"
    else:
        data = cifar_data.load_cifar10(args.data)
        get_pair = lambda p: load_pair(ckpt_dir, p, args.width)  # noqa: E731
        pairs = [p for p in args.pairs if ev.pair_available(ckpt_dir, p)]
        dataset = f"CIFAR-10 (5+5 disjoint class splits), JPEG copy {Path(args.data).name}"
        if not pairs:
            raise SystemExit(f"no pair of {args.pairs} has checkpoints in {ckpt_dir}; train them with "
                             f"python benchmarks/train_cifar.py --head ce --width {args.width} --pairs ...")
    per_pair, infos_all = {}, {}
    for p in pairs:
        log(f"pair {p}")
        models, infos = get_pair(p)
        infos_all[p] = infos
        per_pair[p] = eval_pair(models, infos, data, args, p, log)
    rows = ev.aggregate(per_pair)
    accs = [i["test_acc"] for p in pairs for i in infos_all[p] if i.get("test_acc") == i.get("test_acc")]
    n_test = sum(len(b[1]) for b in ev.test_batches(data, list(range(10)), per_class=args.test_per_class))
    setting = {
        "dataset": dataset, "model": f"fxzip.zoo.resnet20(width={args.width}, out_dim={HEAD_CLASSES})",
        "width": args.width, "head": "ce",
        "loss": "cross-entropy over an ordinary 5-way linear head per model (own classes, no shared class vectors)",
        "pairs": pairs, "pairs_missing": [p for p in args.pairs if p not in pairs],
        "epochs": ev._one_or_list(sorted({i.get("epochs") for p in pairs for i in infos_all[p]})),
        "stop_at": sorted(args.stop_at), "calib_images": args.calib_images, "calib_batch": args.calib_batch,
        "test_images": f"{n_test} CIFAR-10 test images (both tasks"
                       + (f"; the first {args.test_per_class} of each class)" if args.test_per_class else ")"),
        "device": ev._device_text(torch.device("cpu")), "command": command,
        "base_model_task_acc_range": [min(accs), max(accs)] if accs else None,
        "base_model_training_device": ev._one_or_list(sorted({ev._short_device(i.get("device")) for p in pairs
                                                              for i in infos_all[p]})),
        "base_models": {f"pair{p}_{n}": {"classes": i["classes"], "test_acc": i.get("test_acc")}
                        for p in pairs for n, i in zip("AB", infos_all[p])},
        "alpha": args.alpha, "beta": args.beta, "alpha_beta_source": "fxzip defaults, no grid"
        if (args.alpha, args.beta) == (ev.DEFAULT_ALPHA, ev.DEFAULT_BETA) else "given on the command line",
        "joint_protocol": "multi-head: per-head softmax over its task's 5 logits, argmax over the concatenation",
        "smoke": bool(args.smoke), "wall_seconds": time.perf_counter() - t_start,
    }
    result = {"setting": setting, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(out.with_suffix(".md"), result)
    log(f"wrote {out.with_suffix('.json')} and .md")
    return result


if __name__ == "__main__":
    main()
