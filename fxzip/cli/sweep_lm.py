"""``fxzip sweep`` of Hugging Face ``save_pretrained`` folders: language models
scored by perplexity on one held-out text per domain.

``fxzip sweep DIR_A DIR_B --data TEXT --eval TEXT_A TEXT_B --out OUT`` runs the
image sweep's grid (``--methods``, ``--alphas``, ``--betas``, ``--merged-width``,
``--refit``, ``--repair``, ``--probes``, ``--stop-at``) on one calibration per
probe policy, and scores every result on each domain's held-out text (``--eval``,
one per model, in checkpoint order; read like ``--data``, in rows of ``--seq-len``
tokens; ``--eval-max N`` keeps N rows spread evenly over the text).

Rows, each with the perplexity on every domain (lower is better), the mean
log-perplexity over the domains (the row's summary) and the multiply-adds per
token at the evaluation's sequence length (``fxzip.lm_eval.macs_per_token``):

* ``model<k>``: model k alone, on every domain;
* ``oracle``: domain k scored by model k (the ensemble when the domain is known;
  its cost is the ensemble's, every model run, as the partial zip with nothing
  zipped, whose scores it equals);
* ``mixture``: the sequence-level mixture p(x) = (p_1(x) + ... + p_N(x)) / N of
  the models, scored per token (the ensemble when the domain is not known);
* every merge of the grid: a full zip's one output on every domain, a partial
  zip's head k on domain k (a partial zip with nothing zipped is ``ensemble``).

The models are scored once per domain (the reference rows are computed from
those scores). Outputs as for images: a printed table, ``sweep.json``,
``sweep.csv`` and ``sweep.png`` (mean log-perplexity against MACs per token),
written atomically into ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .commands import UsageError, _out_lock, _Say, _sweep_points, check_grid_args, grid_axes
from .pretrained import _shared_tokenizer, _VocabularyOnly, check_pretrained_args

__all__ = ["LMRow", "run_sweep_pretrained", "sweep_lm", "lm_table", "write_lm_outputs", "REFERENCE_METHODS",
           "ORACLE", "MIXTURE"]

ORACLE = "oracle"
"""Domain k scored by model k (the ensemble when the domain is known)."""
MIXTURE = "mixture"
"""The sequence-level mixture of the models (the ensemble when the domain is not known)."""


def _alone(k: int) -> str:
    return f"model{k}"


@dataclass
class LMRow:
    method: str                   # model<k> (model k alone), ORACLE, MIXTURE, ENSEMBLE (k = 0) or a merge method
    alpha: float | None
    beta: float | None
    stop_at: Any                  # None: full zip (or a reference row)
    cut: str                      # the cut point's name ("full": no cut; "-": a reference row)
    k: int                        # weight layers zipped
    m: int                        # weight layers on the longest path
    perplexity: list[float] = field(default_factory=list)  # per domain (--eval), in checkpoint order
    nll: list[float] = field(default_factory=list)         # per domain: log-perplexity (nats per token)
    tokens: list[int] = field(default_factory=list)        # per domain: targets scored
    macs_per_token: float = 0.0   # multiply-adds per position at the evaluation's sequence length (all heads)
    seconds: float = 0.0          # merge + evaluation time
    note: str = ""                # e.g. the report's "outputs averaged ..." message of a full zip
    merged_width: float = 1.0     # merge's options (fxzip.cli.sweep.Point); defaults for the reference rows
    refit: float | None = None
    repair: bool = False
    probes: str | None = None
    reference: bool = False       # model<k>, ORACLE, MIXTURE: no merge

    @property
    def mean_log_perplexity(self) -> float:
        """The mean over domains of the log-perplexity (lower is better)."""
        return sum(self.nll) / len(self.nll) if self.nll else float("nan")


REFERENCE_METHODS = (ORACLE, MIXTURE)
"""The reference rows besides each model alone (``model<k>``)."""


# the command

def run_sweep_pretrained(args: argparse.Namespace) -> int:
    """``fxzip sweep DIR_A DIR_B --data TEXT --eval TEXT_A TEXT_B``: every check
    that needs no model, then the sweep holding ``--out``'s lock."""
    stops = check_sweep_args(args)
    with _out_lock(args):
        return _sweep_and_write(args, stops)


def check_sweep_args(args: argparse.Namespace) -> list[Any]:
    """The checks of ``fxzip merge`` for folders (``fxzip.cli.pretrained``) and of
    the image sweep's grid, and each ``--eval`` text; returns the stops."""
    from ..text_data import check_text_path

    args.method = args.methods[0]
    args.alpha, args.beta = args.alphas[0], args.betas[0]
    args.stop_at = None
    check_pretrained_args(args)
    check_grid_args(args)
    if len(args.eval) != len(args.checkpoints):
        raise UsageError(f"--eval takes one held-out text per checkpoint ({len(args.checkpoints)}: domain k is "
                         f"model k's), got {len(args.eval)}")
    for path in args.eval:
        try:
            check_text_path(path)
        except ValueError as exc:
            raise UsageError(str(exc).replace("--data", "--eval", 1)) from None
    return grid_axes(args)


def _sweep_and_write(args: argparse.Namespace, stops: list[Any]) -> int:
    say = _Say(args.quiet)
    import torch

    from ..hf import load_pretrained
    from ..text_data import open_text
    from ..version import __version__

    torch.manual_seed(args.seed)
    tokenizer = _shared_tokenizer(args.checkpoints, args.data)
    say(f"fxzip {__version__}: loading {len(args.checkpoints)} Hugging Face models")
    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
    models = [load_pretrained(ckpt, dtype) for ckpt in args.checkpoints]
    kinds = {type(m).__name__ for m in models}
    if len(kinds) > 1:
        raise UsageError(f"the folders hold different model classes ({', '.join(sorted(kinds))}); fxzip merges "
                         "models of one architecture")
    points = _sweep_points(args, models, say)
    if tokenizer is None:  # token ids: the vocabulary bound comes from the model
        tokenizer = _VocabularyOnly(models[0])
    domains, described = [], []
    for path in args.eval:
        try:
            opened = open_text(path, tokenizer, args.seq_len, args.batch_size, strict=args.strict_data,
                               progress=not args.quiet)
        except ValueError as exc:  # text_data names the option --data
            raise UsageError(str(exc).replace("--data", "--eval")) from None
        with opened as source:
            if int(source.mask.sum()) < 2:
                raise UsageError(f"--eval {path}: {source.description}; a domain needs at least two tokens (each "
                                 "token is scored from the ones before it)")
            kept = _keep_rows(source, args.eval_max)
            say(f"eval {path}: {source.description}" + (f"; {kept}" if kept else ""))
            described.append(source.description + (f"; {kept}" if kept else ""))
            domains.append(list(source.loader()))
    with open_text(args.data, tokenizer, args.seq_len, args.batch_size, strict=args.strict_data,
                   progress=not args.quiet) as source:
        say(f"data: {source.description}")
        spread = source.spread(args.max_batches)
        if spread:
            say(spread)
        rows = sweep_lm(models, source.loader(), domains, points, stops,
                        reset_bn=False if args.no_reset_bn else None, max_batches=args.max_batches, seed=args.seed,
                        progress=not args.quiet, say=say, max_memory=args.max_memory, cache_dtype=args.cache_dtype)
        description, skipped = source.description, source.skipped_summary()
    print(lm_table(rows, args.eval))
    if skipped["skipped_files"]:
        print(f"fxzip: note: {skipped['skipped_files']} file(s) of --data were not UTF-8 and were skipped (first: "
              f"{', '.join(skipped['skipped_examples'][:3])}); --strict-data fails instead", file=sys.stderr)
    if args.out:
        settings = {"command": "fxzip sweep", "kind": "language models", "checkpoints": list(args.checkpoints),
                    "architecture": kinds.pop(), "dtype": str(next(models[0].parameters()).dtype).split(".")[-1],
                    "data": args.data, "data_description": description,
                    "eval": list(args.eval), "eval_descriptions": described, "seq_len": args.seq_len,
                    "methods": args.methods, "alphas": args.alphas, "betas": args.betas,
                    "stop_at": args.stop_at_values, "merged_widths": args.merged_widths, "refit": args.refit,
                    "repair": args.repair, "probes": args.probes, "max_memory": args.max_memory,
                    "cache_dtype": args.cache_dtype, "batch_size": args.batch_size, "max_batches": args.max_batches,
                    "eval_max": args.eval_max, "reset_bn": not args.no_reset_bn, "seed": args.seed,
                    "strict_data": args.strict_data, **skipped}
        files = write_lm_outputs(rows, Path(args.out), settings, overwrite=getattr(args, "overwrite", False))
        print(f"wrote {args.out}: {', '.join(files)}")
    return 0


def _keep_rows(source: Any, n: int | None) -> str | None:
    """Keep ``n`` rows of ``source`` evenly spaced over it (as ``spread``), or all."""
    import torch

    total = len(source.ids)
    if n is None or n >= total:
        return None
    index = torch.tensor([i * total // n for i in range(n)], dtype=torch.long)
    source.ids, source.mask = source.ids[index], source.mask[index]
    return f"--eval-max {n}: {n} of the {total} sequences, evenly spaced over the text"


# the sweep

def sweep_lm(models: Sequence[Any], data: Any, domains: Sequence[Sequence[Any]], points: Sequence[Any],
             stops: Sequence[Any], *, reset_bn: bool | None = None, max_batches: int | None = None, seed: int = 0,
             progress: bool = True, say: Callable[[str], None] = lambda s: None, max_memory: int | None = None,
             cache_dtype: str | None = None) -> list[LMRow]:
    """The reference rows, then one row per distinct merge of ``points`` x ``stops``
    (``fxzip.cli.sweep.distinct_merges``), calibrating once per probe policy.
    ``domains``: per model, the batches of its held-out text (dicts of
    input_ids and attention_mask), re-iterable."""
    from ..cuts import cut_points
    from ..lm_eval import sequence_log_likelihoods
    from .sweep import expand_stops, merged_grid

    start = time.perf_counter()
    first = next(iter(data))
    cuts = cut_points(models[0], (first["input_ids"][:2], first["attention_mask"][:2]), *models[1:])
    depth = cuts[0].m
    stops = expand_stops(stops, cuts)  # a bad --stop-at fails here, before any scoring or calibration
    example = _example(domains)
    scores = [[sequence_log_likelihoods(m, domain) for domain in domains] for m in models]
    macs = [_macs(m, example) for m in models]
    rows = _reference_rows(scores, macs, depth, time.perf_counter() - start)
    for r in rows:
        say(f"{r.method}: perplexity " + ", ".join(f"{p:.4g}" for p in r.perplexity))
    grid = merged_grid(models, data, points, stops, cuts, reset_bn=reset_bn, max_batches=max_batches, seed=seed,
                       progress=progress, say=say, max_memory=max_memory, cache_dtype=cache_dtype)
    for done, total, point, stop, merged, t in grid:
        report = merged.meta["fxzip"]
        cut = report.cut
        if cut is None:  # a full zip: its one output on every domain
            merged_scores = [sequence_log_likelihoods(merged, domain) for domain in domains]
        else:  # a partial zip: head k on domain k
            merged_scores = [sequence_log_likelihoods(merged, domain, head=k) for k, domain in enumerate(domains)]
        results = [_perplexity(s) for s in merged_scores]
        row = LMRow(point.method, point.alpha, point.beta, stop, "full" if cut is None else cut.name,
                    depth if cut is None else cut.k, depth, [r.perplexity for r in results],
                    [r.nll for r in results], [r.tokens for r in results], _macs(merged, example),
                    time.perf_counter() - t, report.outputs_averaged or "", point.merged_width, point.refit,
                    point.repair, point.probes)
        rows.append(row)
        say(f"[{done}/{total}] {_describe(row)}: perplexity " + ", ".join(f"{p:.4g}" for p in row.perplexity)
            + f" (mean log {row.mean_log_perplexity:.4f}, {row.seconds:.1f}s)")
    return rows


def _example(domains: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """One row of the evaluation's length, for the MACs (the first domain's first row)."""
    batch = domains[0][0]
    return {"input_ids": batch["input_ids"][:1], "attention_mask": batch["attention_mask"][:1]}


def _macs(model: Any, example: dict[str, Any]) -> float:
    from ..lm_eval import macs_per_token

    return macs_per_token(model, example)


def _perplexity(scores: Any) -> Any:
    from ..lm_eval import perplexity_of

    return perplexity_of(scores)


def _reference_rows(scores: list[list[Any]], macs: list[float], depth: int, seconds: float) -> list[LMRow]:
    """model<k> alone on every domain, the oracle (domain k by model k) and the
    mixture, from ``scores[model][domain]`` (``SequenceScores``)."""
    from ..lm_eval import mixture_of

    n = len(scores)

    def row(method: str, results: list[Any], cost: float) -> LMRow:
        return LMRow(method, None, None, None, "-", 0, depth, [r.perplexity for r in results],
                     [r.nll for r in results], [r.tokens for r in results], cost, seconds / (n + 2),
                     reference=True)

    rows = [row(_alone(k), [_perplexity(s) for s in scores[k]], macs[k]) for k in range(n)]
    rows.append(row(ORACLE, [_perplexity(scores[d][d]) for d in range(n)], sum(macs)))
    rows.append(row(MIXTURE, [mixture_of([scores[k][d] for k in range(n)]) for d in range(n)], sum(macs)))
    return rows


def _describe(row: LMRow) -> str:
    from .sweep import _options_label

    ab = f" alpha={row.alpha} beta={row.beta}" if row.alpha is not None else ""
    return f"{row.method}{ab}{_options_label(row)} {row.cut} ({row.k}/{row.m})"


# the outputs

def best_per_depth(rows: Sequence[LMRow]) -> list[LMRow]:
    """The lowest mean log-perplexity at each number of layers zipped (k > 0), among the merges."""
    from .sweep import ENSEMBLE

    best: dict[int, LMRow] = {}
    for r in rows:
        if not r.reference and r.method != ENSEMBLE and (
                r.k not in best or r.mean_log_perplexity < best[r.k].mean_log_perplexity):
            best[r.k] = r
    return list(best.values())


def lm_table(rows: Sequence[LMRow], domains: Sequence[str] | None = None) -> str:
    """The sweep as a text table: perplexity per domain, mean log-perplexity, MACs
    per token; ``*`` marks the lowest mean log-perplexity at each k; merge's
    options get a column each when some merge is not at the default."""
    from ..report import OUTPUTS_AVERAGED
    from .sweep import ENSEMBLE, OPTION_COLUMNS

    n = max(len(r.perplexity) for r in rows)
    best = best_per_depth(rows)
    merges = [r for r in rows if not r.reference and r.method != ENSEMBLE]
    options = [(head, name, text) for head, name, default, text in OPTION_COLUMNS
               if any(getattr(r, name) not in (default, None) for r in merges)]
    head = (["method", "alpha", "beta"] + [h for h, _, _ in options] + ["cut", "k/m"] + [f"ppl{d}" for d in range(n)]
            + ["mean log ppl", "MACs/token", "time", "note"])
    body = []
    for r in rows:
        star = " *" if any(r is b for b in best) else ""
        merged = not r.reference and r.method != ENSEMBLE
        body.append([r.method + star, "-" if r.alpha is None else f"{r.alpha:g}",
                     "-" if r.beta is None else f"{r.beta:g}"]
                    + [text(getattr(r, name)) if merged else "-" for _, name, text in options]
                    + [r.cut, "-" if r.reference else f"{r.k}/{r.m}"] + [f"{p:.4g}" for p in r.perplexity]
                    + [f"{r.mean_log_perplexity:.4f}", _macs_text(r.macs_per_token), f"{r.seconds:.1f}s",
                       f"{OUTPUTS_AVERAGED} (1)" if r.note.startswith(OUTPUTS_AVERAGED) else ""])
    widths = [max(len(row[i]) for row in body + [head]) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    averaged = next((r.note for r in rows if r.note.startswith(OUTPUTS_AVERAGED)), None)
    named = "; ".join(f"ppl{d}: {p}" for d, p in enumerate(domains)) if domains else ""
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body]
                     + ["ppl d: perplexity on --eval d (lower is better) of a full zip's one output, a partial "
                        "zip's head d; MACs per token at the evaluation's length",
                        "model<k>: model k alone; oracle: domain d by model d; mixture: p(x) = mean over k of "
                        "p_k(x) per sequence; k/m: weight layers zipped; * lowest mean log ppl at its k"]
                     + ([named] if named else []) + ([f"(1) {averaged}"] if averaged else []))


def _macs_text(macs: float) -> str:
    if not macs:
        return "-"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if macs >= scale:
            return f"{macs / scale:.3g}{unit}"
    return f"{macs:.3g}"


def write_lm_outputs(rows: Sequence[LMRow], out: Path, settings: dict[str, Any], *,
                     overwrite: bool = False) -> list[str]:
    """``sweep.json`` (settings, versions, rows; completed last with ``manifest``),
    ``sweep.csv`` and ``sweep.png``, written atomically as the image sweep's
    (``fxzip.cli.sweep.write_outputs``)."""
    from ..result_dir import SWEEP, writing

    with writing(out, SWEEP, overwrite=overwrite) as stage:
        files = _write_files(rows, stage.path, settings)
        marker = stage.path / SWEEP.marker
        data = json.loads(marker.read_text())
        data["manifest"] = stage.manifest(leave_out=[SWEEP.marker])
        marker.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    return files


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _write_files(rows: Sequence[LMRow], out: Path, settings: dict[str, Any]) -> list[str]:
    from ..report import _jsonable, versions

    out.mkdir(parents=True, exist_ok=True)
    records = []
    for r in rows:
        record = {**asdict(r), "mean_log_perplexity": r.mean_log_perplexity}
        record["perplexity"] = [_finite(p) for p in r.perplexity]  # an overflowing exp is null, its nll stays
        records.append(record)
    (out / "sweep.json").write_text(json.dumps(_jsonable({"settings": settings, "versions": versions(),
                                                          "rows": records}), indent=1, allow_nan=False) + "\n")
    n = max(len(r.perplexity) for r in rows)
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "reference", "alpha", "beta", "merged_width", "refit", "repair", "probes",
                         "stop_at", "cut", "k", "m"] + [f"ppl{d}" for d in range(n)] + [f"nll{d}" for d in range(n)]
                        + ["mean_log_perplexity", "macs_per_token", "seconds", "note"])
        for r in rows:
            writer.writerow([r.method, r.reference, r.alpha, r.beta, r.merged_width, r.refit, r.repair, r.probes,
                             r.stop_at, r.cut, r.k, r.m] + r.perplexity + r.nll
                            + [r.mean_log_perplexity, r.macs_per_token, round(r.seconds, 3), r.note])
    _plot(rows, out / "sweep.png")
    return ["sweep.json", "sweep.csv", "sweep.png"]


def _plot(rows: Sequence[LMRow], path: Path) -> None:
    """``sweep.png``: mean log-perplexity against MACs per token, one curve per
    setting (method, alpha/beta, merge's options) through its cut points (and
    the models side by side, when run); each model alone, the oracle and the
    mixture as markers, the oracle's level as a dashed line."""
    from matplotlib.figure import Figure

    from .sweep import ENSEMBLE, plot_series, series_colors, series_style

    ensemble = next((r for r in rows if r.method == ENSEMBLE), None)
    series = plot_series([r for r in rows if not r.reference and r.method != ENSEMBLE])
    many = len(series) > 6
    fig = Figure(figsize=(10.5 if many else 6.5, 4.5))
    ax = fig.subplots()
    colors = series_colors(len(series))
    for i, (key, points) in enumerate(series.items()):
        style, marker = series_style(points)
        if len(points) > 1 and ensemble is not None:
            points = points + [ensemble]
        points = sorted(points, key=lambda r: (r.macs_per_token, r.k))
        ax.plot([r.macs_per_token for r in points], [r.mean_log_perplexity for r in points], marker=marker,
                linestyle=style, color=colors[i % len(colors)], label=key)
    if ensemble is not None:
        ax.plot([ensemble.macs_per_token], [ensemble.mean_log_perplexity], "ks",
                label="nothing zipped (the models side by side)")
    for r in rows:
        if r.reference and r.method not in REFERENCE_METHODS:
            ax.plot([r.macs_per_token], [r.mean_log_perplexity], "v", color="0.45", linestyle="none",
                    label="each model alone" if r.method == _alone(0) else None)
            ax.annotate(r.method, (r.macs_per_token, r.mean_log_perplexity), textcoords="offset points",
                        xytext=(4, 4), fontsize="x-small", color="0.35")
    oracle = next((r for r in rows if r.method == ORACLE), None)
    mixture = next((r for r in rows if r.method == MIXTURE), None)
    if oracle is not None:
        ax.axhline(oracle.mean_log_perplexity, color="0.5", linestyle="--", linewidth=1)
        ax.plot([oracle.macs_per_token], [oracle.mean_log_perplexity], "k*", markersize=10, linestyle="none",
                label="oracle (domain k by model k)")
    if mixture is not None:
        ax.plot([mixture.macs_per_token], [mixture.mean_log_perplexity], "kX", linestyle="none",
                label="mixture (sequence-level: mean of the p_k(x))")
    ax.set_xlabel("multiply-adds per token")
    ax.set_ylabel("mean log-perplexity over domains (lower is better)")
    ax.set_title("fxzip sweep: log-perplexity versus cost")
    if many:
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
