"""Merging two causal language models trained from different seeds on different text.

For every pair of ``benchmarks/train_lm.py`` (model A: the ``code`` domain,
model B: the ``prose`` domain; ``benchmarks/lm_corpora.py``), the rows of
``fxzip sweep`` for Hugging Face folders (``fxzip.cli.sweep_lm.sweep_lm``):

* reference rows: each model alone on both domains; the oracle (each domain
  scored by its own model: the ensemble when the domain is known); the
  mixture (per sequence ``(p_A(x) + p_B(x)) / 2``: the ensemble when it is not);
* merges: W.Avg, Permute, ZipIt, ZipIt + refit and MuDSC as full zips (one
  output, scored on both domains), and every method as partial zips at the
  cut points nearest to a quarter, half and three quarters of the weight
  layers (head k scored on domain k).

Perplexity on each domain's held-out documents (lower is better), the mean
log-perplexity over the two domains (the rows' summary), MACs per token at
256 tokens. Calibration: both domains' calibration documents (never trained
on), packed into rows of 256 tokens, evenly spaced, ``--calib-rows`` of them.
Models are merged in float32 (the checkpoints are fp16).

    python benchmarks/train_lm.py --pairs 3 --steps 400     # the checkpoints (committed)
    python benchmarks/lm_merge.py --pairs 0 1 2              # -> results/lm_merge.{json,md,png}

Resumable: each pair's rows are cached in ``--cache`` (one JSON per pair)
and a pair already there is not recomputed.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import lm_corpora  # noqa: E402
from train_lm import OUT as CHECKPOINTS  # noqa: E402
from train_lm import SEQ  # noqa: E402

RESULTS = ROOT / "results"
FRACTIONS = (0.25, 0.5, 0.75)
METHODS = [("W.Avg", "weight_average", None), ("Permute", "permute", None), ("ZipIt", "zipit", None),
           ("ZipIt + refit", "zipit", 1e-3), ("MuDSC", "mudsc", None)]


def _points():
    import inspect

    from fxzip.cli.sweep import Point
    from fxzip.merge import merge

    defaults = {k: p.default for k, p in inspect.signature(merge).parameters.items()}
    points = {}
    for label, method, ridge in METHODS:
        matched = method in ("zipit", "mudsc")
        points[label] = Point(method, defaults["alpha"] if matched else None, defaults["beta"] if matched else None,
                              refit=ridge, probes=None if method == "weight_average" else defaults["probes"])
    return points


def _label(row, points) -> str:
    for label, point in points.items():
        if row.method == point.method and row.refit == point.refit:
            return label
    return row.method


def run_pair(pair: int, calib_rows: int, eval_max: int | None, say, checkpoints: Path = CHECKPOINTS) -> dict:
    from fxzip.cli.sweep_lm import sweep_lm
    from fxzip.cuts import cut_points
    from fxzip.hf import load_pretrained
    from fxzip.text_data import open_text

    dirs = [checkpoints / f"pair{pair}_{d}" for d in lm_corpora.DOMAINS]
    missing = [str(d) for d in dirs if not (d / "train.json").exists()]
    if missing:
        raise FileNotFoundError(f"pair {pair}: no trained model in {missing}; run benchmarks/train_lm.py first")
    models = [load_pretrained(d, torch.float32) for d in dirs]
    tokenizer = lm_corpora.train_tokenizer(checkpoints / "tokenizer")
    texts = lm_corpora.write_texts(checkpoints / "text")
    calib = checkpoints / "text" / "calib_both.jsonl"
    calib.write_text("".join(Path(texts[d]["calib"]).read_text() for d in lm_corpora.DOMAINS))
    source = open_text(calib, tokenizer, SEQ, batch_size=8, progress=False)
    source.spread(max(1, calib_rows // 8))
    domains = []
    for d in lm_corpora.DOMAINS:
        held = open_text(texts[d]["eval"], tokenizer, SEQ, batch_size=8, progress=False)
        if eval_max is not None:
            held.spread(max(1, eval_max // 8))
        domains.append(list(held.loader()))
    first = next(iter(source.loader()))
    cuts = cut_points(models[0], (first["input_ids"][:2], first["attention_mask"][:2]), *models[1:])
    m = cuts[0].m
    stops = [None] + list(dict.fromkeys(min((c for c in cuts if 0 < c.k < m), key=lambda c: abs(c.k - f * m)).name
                                        for f in FRACTIONS))
    points = _points()
    t = time.perf_counter()
    rows = sweep_lm(models, list(source.loader()), domains, list(points.values()), stops, progress=False, say=say)
    out = []
    for row in rows:
        data = asdict(row)
        data["label"] = "ensemble" if row.method == "ensemble" else (row.method if row.reference else _label(row, points))
        out.append(data)
    return {"pair": pair, "rows": out, "seconds": round(time.perf_counter() - t, 1), "calib": source.description,
            "eval": [f"{len(d)} batches" for d in domains], "stops": [s for s in stops if s is not None],
            "depth": m}


def _key(row: dict) -> tuple:
    return (row["label"], row["cut"])


def aggregate(pairs: list[dict]) -> list[dict]:
    """Rows by (label, cut), mean and std over pairs of each domain's perplexity
    and of the mean log-perplexity, with the per-pair values."""
    table: dict[tuple, list[dict]] = {}
    for p in pairs:
        for row in p["rows"]:
            table.setdefault(_key(row), []).append(row)
    out = []
    for (label, cut), rows in table.items():
        ppl = list(zip(*[r["perplexity"] for r in rows]))
        mean_log = [sum(r["nll"]) / len(r["nll"]) for r in rows]
        out.append({"label": label, "cut": cut, "k": rows[0]["k"], "m": rows[0]["m"], "pairs": len(rows),
                    "perplexity": [statistics.mean(d) for d in ppl],
                    "perplexity_std": [statistics.stdev(d) if len(d) > 1 else 0.0 for d in ppl],
                    "mean_log_ppl": statistics.mean(mean_log),
                    "mean_log_ppl_std": statistics.stdev(mean_log) if len(mean_log) > 1 else 0.0,
                    "per_pair_mean_log_ppl": mean_log, "macs_per_token": rows[0]["macs_per_token"],
                    "reference": rows[0]["reference"]})
    return out


def goals(pairs: list[dict]) -> list[str]:
    """The issue's goals, checked pair by pair."""
    lines = []
    for p in pairs:
        by = {_key(r): r for r in p["rows"]}

        def mlp(label, cut="full"):
            r = by.get((label, cut if label not in ("oracle", "mixture", "model0", "model1") else "-"))
            return None if r is None else sum(r["nll"]) / len(r["nll"])

        zipit, wavg, perm = mlp("ZipIt"), mlp("W.Avg"), mlp("Permute")
        refit, oracle = mlp("ZipIt + refit"), mlp("oracle")
        if None in (zipit, wavg, perm, refit, oracle):
            continue
        best = min(wavg, perm)
        closed = (best - refit) / (best - oracle) if best != oracle else float("nan")
        lines.append(f"pair {p['pair']}: ZipIt {zipit:.3f} vs W.Avg {wavg:.3f} / Permute {perm:.3f} mean log-ppl "
                     f"({'beats both' if zipit < best else 'does not beat both'}); ZipIt + refit closes "
                     f"{closed:.0%} of the gap from the better of W.Avg / Permute ({best:.3f}) to the oracle "
                     f"({oracle:.3f}) (goal 50%)")
        half = [r for r in p["rows"] if r["label"] in ("ZipIt", "ZipIt + refit") and r["cut"] not in ("full", "-")]
        orow = by.get(("oracle", "-"))
        for r in half:
            ratio = [a / b for a, b in zip(r["perplexity"], orow["perplexity"])]
            lines.append(f"pair {p['pair']}: {r['label']} partial at {r['cut']} ({r['k']}/{r['m']}): perplexity "
                         + ", ".join(f"{x:.3f}x" for x in ratio) + " of the oracle's per domain (goal <= 1.10x "
                         "at half the layers)")
    return lines


def write(pairs: list[dict], settings: dict, checkpoints: Path = CHECKPOINTS, results: Path = RESULTS) -> None:
    rows = aggregate(pairs)
    results.mkdir(exist_ok=True)
    (results / "lm_merge.json").write_text(json.dumps({"settings": settings, "pairs": pairs, "rows": rows},
                                                      indent=1) + "\n")
    d0, d1 = lm_corpora.DOMAINS
    lines = ["# Merging two causal LMs trained on different text (code / prose)", "",
             f"Command: `{settings['command']}` ({settings['date']}; commit `{settings['commit']}`; "
             f"{settings['machine']}).", "",
             "Models: `benchmarks/train_lm.py` (Llama-style, width 256, 4 layers, GQA 4/2, SwiGLU, RMSNorm, rotary, "
             "4.5 M parameters, byte-level BPE of 3072 tokens shared; A on the stdlib's source, B on the language "
             "reference's topics; checkpoints in `benchmarks/checkpoints/lm/`, fp16, merged in float32). "
             f"Pairs: {[p['pair'] for p in pairs]}"
             + (f" (only {len(pairs)} of the 3 pairs the benchmark plans; the others are not trained yet: "
                "`train_lm.py` resumes them)" if len(pairs) < 3 else "")
             + f". Calibration and evaluation: {settings['data']}.", "",
             "Perplexity on each domain's held-out documents (lower is better), mean ± std over pairs; mean log "
             "ppl: the mean over the two domains of the log-perplexity; a full zip is scored with its one "
             "output on both domains, a partial zip's head k on domain k; MACs per token at 256 tokens.", "",
             f"| row | cut | k/m | ppl {d0} | ppl {d1} | mean log ppl | MACs/token |", "|---|---|---|---|---|---|---|"]
    order = {label: i for i, label in enumerate(["model0", "model1", "oracle", "mixture", "ensemble"]
                                                 + [m[0] for m in METHODS])}
    for r in sorted(rows, key=lambda r: (order.get(r["label"], 99), -r["k"] if r["cut"] != "full" else -999)):
        ppl = " | ".join(f"{m:.2f} ± {s:.2f}" for m, s in zip(r["perplexity"], r["perplexity_std"]))
        lines.append(f"| {r['label']} | {r['cut']} | {r['k']}/{r['m']} | {ppl} | {r['mean_log_ppl']:.3f} ± "
                     f"{r['mean_log_ppl_std']:.3f} | {r['macs_per_token'] / 1e6:.2f} M |")
    lines += ["", "model0 = A (code), model1 = B (prose); oracle = each domain by its own model; mixture = "
              "per-sequence mixture of both (both run: 2x MACs).", "", "## Goals, pair by pair", ""]
    lines += [f"- {g}" for g in goals(pairs)]
    lines += ["", "## Training", ""]
    for p in pairs:
        for d in lm_corpora.DOMAINS:
            info = json.loads((checkpoints / f"pair{p['pair']}_{d}" / "train.json").read_text())
            lines.append(f"- pair {p['pair']} {d}: seed {info['seed']}, {info['steps']} steps of {info['batch']} x "
                         f"{info['seq_len']} tokens, {info['seconds']:.0f} s on {info['threads']} thread(s); "
                         f"held-out loss (fp32, nats) " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                                    info["held_out_loss_fp32"].items()))
    (results / "lm_merge.md").write_text("\n".join(lines) + "\n")
    _plot(rows, results / "lm_merge.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in [m[0] for m in METHODS]:
        pts = sorted((r["macs_per_token"], r["mean_log_ppl"]) for r in rows if r["label"] == label)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    for r in rows:
        if r["reference"]:
            ax.scatter(r["macs_per_token"], r["mean_log_ppl"], marker="*" if r["label"] == "oracle" else "x",
                       color="black")
            ax.annotate(r["label"], (r["macs_per_token"], r["mean_log_ppl"]), fontsize=8)
    ax.set_xlabel("MACs per token")
    ax.set_ylabel("mean log-perplexity over the two domains (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--calib-rows", type=int, default=512, help="calibration rows of 256 tokens (default 512)")
    ap.add_argument("--eval-max", type=int, help="at most this many held-out rows per domain (default all)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/lm_merge_cache"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoints", type=Path, default=CHECKPOINTS, help="train_lm.py's --out")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    say = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    args.cache.mkdir(parents=True, exist_ok=True)
    pairs = []
    for pair in args.pairs:
        cached = args.cache / f"pair{pair}.json"
        if cached.exists():
            pairs.append(json.loads(cached.read_text()))
            continue
        say(f"pair {pair}")
        result = run_pair(pair, args.calib_rows, args.eval_max, say, args.checkpoints)
        cached.write_text(json.dumps(result) + "\n")
        pairs.append(result)
    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    settings = {"command": "python benchmarks/lm_merge.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit,
                "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
                "data": f"{args.calib_rows} calibration rows of {SEQ} tokens; held-out rows "
                        f"{'all' if args.eval_max is None else args.eval_max} per domain",
                "corpora": lm_corpora.provenance()}
    write(pairs, settings, args.checkpoints, args.results)
    for line in goals(pairs):
        print(line)


if __name__ == "__main__":
    main()
