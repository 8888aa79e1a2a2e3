"""``fxzip sweep``: the papers' hyperparameter search as one command.

One calibration (``fxzip.calibrate``) serves a grid of methods, alpha/beta and
cut points; every merged model is scored on one labelled image folder per
model (model k's task: ``ImageFolder`` labels, i.e. class folders in sorted
order, compared with the first logits of model k's output, or of head k of a
partial zip). The result is a table, ``sweep.json``/``sweep.csv`` and the
papers' accuracy-versus-layers-zipped plot (``sweep.png``).

alpha/beta only matter to ``zipit``/``mudsc``; other methods run once per cut.

A full zip averages the models' output layers as if their outputs meant the
same thing; its rows carry the report's note saying so (``note``, and the
table's footnote names the partial zip that keeps one head per model).
"""
from __future__ import annotations

import csv
import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["SweepRow", "sweep", "task_accuracy", "write_outputs", "table", "best_per_depth", "distinct_merges",
           "ALPHA_BETA_METHODS", "ENSEMBLE"]

ALPHA_BETA_METHODS = ("zipit", "mudsc")
"""Methods whose result depends on alpha and beta."""
ENSEMBLE = "ensemble"
"""The method of a row with nothing zipped (k = 0): the models side by side."""


@dataclass
class SweepRow:
    method: str                 # "original": each model on its own task (the reference); ENSEMBLE: k = 0
    alpha: float | None
    beta: float | None
    stop_at: Any                # None: full zip
    cut: str                    # the cut point's name ("full": no cut)
    k: int                      # weight layers zipped
    m: int                      # weight layers on the longest path
    accuracy: list[float] = field(default_factory=list)  # per task (model), in checkpoint order
    macs: float = 0.0           # multiply-adds per input of the merged model (all heads)
    seconds: float = 0.0        # merge + evaluation time
    note: str = ""              # e.g. the report's "outputs averaged ..." message of a full zip

    @property
    def average(self) -> float:
        return sum(self.accuracy) / len(self.accuracy) if self.accuracy else float("nan")


@torch.no_grad()
def task_accuracy(model: nn.Module, loaders: Sequence[Any], progress: Callable[[str], None] | None = None
                  ) -> list[float]:
    """Accuracy of output k (head k, or the single output) on loader k's (x, label) batches,
    over the first ``n_k`` logits (n_k: classes of that folder, labels 0..n_k-1)."""
    model.eval()
    accuracy = []
    for k, loader in enumerate(loaders):
        classes = len(loader.dataset.classes) if hasattr(loader.dataset, "classes") else None
        correct = total = 0
        for x, y in loader:
            out = model(x)
            head = out[k] if isinstance(out, (tuple, list)) else out
            logits = head.flatten(1)
            if classes is not None:
                if logits.shape[1] < classes:
                    raise ValueError(f"eval set {k + 1} has {classes} classes but model {k}'s output has "
                                     f"{logits.shape[1]} logits: pass the eval folders in checkpoint order")
                logits = logits[:, :classes]
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
        accuracy.append(correct / max(1, total))
    return accuracy


def grid(methods: Sequence[str], alphas: Sequence[float], betas: Sequence[float]) -> list[tuple[str, Any, Any]]:
    """(method, alpha, beta) triples; alpha/beta are None for methods that ignore them."""
    points: list[tuple[str, Any, Any]] = []
    for method in methods:
        if method in ALPHA_BETA_METHODS:
            points += [(method, a, b) for a, b in itertools.product(alphas, betas)]
        else:
            points.append((method, None, None))
    return points


def sweep(models: Sequence[nn.Module], data: Any, eval_loaders: Sequence[Any], methods: Sequence[str],
          alphas: Sequence[float], betas: Sequence[float], stops: Sequence[Any], *, reset_bn: bool | None = None,
          max_batches: int | None = None, seed: int = 0, progress: bool = True,
          say: Callable[[str], None] = lambda s: None) -> list[SweepRow]:
    """Calibrate once, merge for every (method, alpha, beta, stop) and score each result.

    The first row is the reference: each original model on its own task.
    """
    from ..cuts import cut_points
    from ..merge import calibrate, merge

    start = time.perf_counter()
    example = next(iter(data))
    example = example[0] if isinstance(example, (tuple, list)) else example
    cuts = cut_points(models[0], example[:2], *models[1:])
    depth = cuts[0].m
    stops = expand_stops(stops, cuts)  # a bad --stop-at fails here, before any evaluation or calibration
    reference = [task_accuracy(m, [loader])[0] for m, loader in zip(models, eval_loaders)]
    rows = [SweepRow("original", None, None, None, "original", 0, depth, reference,
                     0.0, time.perf_counter() - start)]
    say("originals on their own tasks: " + ", ".join(f"{a:.3f}" for a in reference))
    cal = calibrate(*models, data=data, max_batches=max_batches, progress=progress)
    say(f"calibrated once on {cal.n_samples} samples in {time.perf_counter() - start:.1f}s")
    points = distinct_merges(grid(methods, alphas, betas), stops, cuts)
    for i, ((method, alpha, beta), stop) in enumerate(points, 1):
        t = time.perf_counter()
        kwargs = {} if alpha is None else {"alpha": alpha, "beta": beta}
        merged = merge(*models, data=cal, method=method, stop_at=stop, reset_bn=reset_bn, progress=False,
                       seed=seed, **kwargs)
        report = merged.meta["fxzip"]
        accuracy = task_accuracy(merged, eval_loaders)
        cut = report.cut
        if cut is not None and cut.k == 0:  # nothing zipped: the models side by side, whatever the method
            method, alpha, beta = ENSEMBLE, None, None
        row = SweepRow(method, alpha, beta, stop, "full" if cut is None else cut.name,
                       depth if cut is None else cut.k, depth, accuracy, float(report.macs.get("merged", 0.0)),
                       time.perf_counter() - t, report.outputs_averaged or "")
        rows.append(row)
        say(f"[{i}/{len(points)}] {_describe(row)}: " + ", ".join(f"{a:.3f}" for a in accuracy)
            + f" (avg {row.average:.3f}, {row.seconds:.1f}s)")
    return rows


def expand_stops(stops: Sequence[Any], cuts: Sequence[Any]) -> list[Any]:
    """``stops`` with "all" replaced by every cut point and the full zip (None),
    each checked against ``cuts`` now, before any calibration."""
    from ..cuts import resolve_cut

    found: list[Any] = []
    for stop in stops:
        for s in ([c.name for c in cuts] + [None]) if stop == "all" else [stop]:
            if s is not None:
                resolve_cut(s, cuts)  # raises, listing the cut points, for a name or k that is not one
            if s not in found:
                found.append(s)
    return found


def distinct_merges(points: Sequence[tuple[str, Any, Any]], stops: Sequence[Any], cuts: Sequence[Any]
                    ) -> list[tuple[tuple[str, Any, Any], Any]]:
    """Every (method point, stop) pair that gives a different model, so no
    merge runs twice: a cut with nothing zipped (k = 0) is the models side by
    side whatever the method (one row, ``ENSEMBLE``), and a cut with every
    weight layer zipped (k = m) is the full zip, which runs once when both are
    asked for (``--stop-at all``)."""
    from ..cuts import resolve_cut

    depth = cuts[0].m

    def key(stop: Any) -> Any:
        cut = None if stop is None else resolve_cut(stop, cuts)
        k = depth if cut is None else cut.k
        return "ensemble" if k == 0 else "full" if k == depth else cut.name

    keys = {stop: key(stop) for stop in stops}
    full_asked = None in stops
    kept: list[tuple[tuple[str, Any, Any], Any]] = []
    seen: set[tuple] = set()
    for point in points:
        for stop in stops:
            if keys[stop] == "full" and stop is not None and full_asked:
                continue  # the full zip's own row (stop None) stands for it
            what = ("ensemble",) if keys[stop] == "ensemble" else (point, keys[stop])
            if what not in seen:
                seen.add(what)
                kept.append((point, stop))
    return kept


def _describe(row: SweepRow) -> str:
    ab = f" alpha={row.alpha} beta={row.beta}" if row.alpha is not None else ""
    return f"{row.method}{ab} {row.cut} ({row.k}/{row.m})"


def best_per_depth(rows: Sequence[SweepRow]) -> list[SweepRow]:
    """The best average accuracy at each number of layers zipped (k > 0). One
    best over all rows would favour the least merged (the costliest) every
    time: a merge is chosen for a budget, so it is compared with the merges
    of the same depth."""
    best: dict[int, SweepRow] = {}
    for r in rows:
        if r.method not in ("original", ENSEMBLE) and (r.k not in best or r.average > best[r.k].average):
            best[r.k] = r
    return list(best.values())


def table(rows: Sequence[SweepRow]) -> str:
    """The sweep as a text table; ``*`` marks the best average accuracy at each number of layers zipped;
    ``note`` marks the full zips whose output layers were averaged (explained under the table)."""
    from ..report import OUTPUTS_AVERAGED

    n = max(len(r.accuracy) for r in rows)
    best = best_per_depth(rows)
    head = ["method", "alpha", "beta", "cut", "k/m"] + [f"task{k}" for k in range(n)] + ["avg", "MACs", "time",
                                                                                       "note"]
    body = []
    for r in rows:
        star = " *" if any(r is b for b in best) else ""
        body.append([r.method + star, "-" if r.alpha is None else f"{r.alpha:g}",
                     "-" if r.beta is None else f"{r.beta:g}", r.cut, f"{r.k}/{r.m}" if r.method != "original"
                     else "-"] + [f"{a:.3f}" for a in r.accuracy] + [f"{r.average:.3f}",
                     f"{r.macs / 1e6:.1f}M" if r.macs else "-", f"{r.seconds:.1f}s",
                     f"{OUTPUTS_AVERAGED} (1)" if r.note.startswith(OUTPUTS_AVERAGED) else ""])
    widths = [max(len(row[i]) for row in body + [head]) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
    averaged = next((r.note for r in rows if r.note.startswith(OUTPUTS_AVERAGED)), None)
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body]
                     + ["task k: accuracy of model k's output (head k of a partial zip) on eval folder k; "
                        "k/m: weight layers zipped; * best average at its k"]
                     + ([f"(1) {averaged}"] if averaged else []))


def write_outputs(rows: Sequence[SweepRow], out: Path, settings: dict[str, Any], *,
                  overwrite: bool = False) -> list[str]:
    """``sweep.json`` (settings, versions, rows; completed last with ``manifest``,
    every other file's size), ``sweep.csv`` and ``sweep.png`` (average accuracy
    versus layers zipped, one line per method/alpha/beta), written atomically:
    into a temporary folder that takes ``out``'s place (``fxzip.result_dir``).
    An earlier sweep in ``out`` is replaced; another non-empty folder needs
    ``overwrite``."""
    from ..result_dir import SWEEP, writing

    with writing(out, SWEEP, overwrite=overwrite) as stage:
        files = _write_files(rows, stage.path, settings)
        marker = stage.path / SWEEP.marker
        data = json.loads(marker.read_text())
        data["manifest"] = stage.manifest(leave_out=[SWEEP.marker])
        marker.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    return files


def _write_files(rows: Sequence[SweepRow], out: Path, settings: dict[str, Any]) -> list[str]:
    """The files of ``write_outputs``, into the folder ``out``."""
    from ..report import _jsonable, versions

    out.mkdir(parents=True, exist_ok=True)
    records = [{**asdict(r), "average": r.average} for r in rows]
    (out / "sweep.json").write_text(json.dumps(_jsonable({"settings": settings, "versions": versions(),
                                                          "rows": records}), indent=1, allow_nan=False) + "\n")
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.writer(f)
        n = max(len(r.accuracy) for r in rows)
        writer.writerow(["method", "alpha", "beta", "stop_at", "cut", "k", "m"] + [f"task{k}" for k in range(n)]
                        + ["average", "macs", "seconds", "note"])
        for r in rows:
            writer.writerow([r.method, r.alpha, r.beta, r.stop_at, r.cut, r.k, r.m] + r.accuracy
                            + [r.average, r.macs, round(r.seconds, 3), r.note])
    files = ["sweep.json", "sweep.csv"]
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    series: dict[str, list[SweepRow]] = {}
    ensemble = next((r for r in rows if r.method == ENSEMBLE), None)
    for r in rows:
        if r.method not in ("original", ENSEMBLE):
            key = r.method + (f" a={r.alpha:g} b={r.beta:g}" if r.alpha is not None else "")
            series.setdefault(key, []).append(r)
    for key, points in series.items():
        points = sorted(points + ([ensemble] if ensemble is not None else []), key=lambda r: r.k)
        ax.plot([r.k for r in points], [r.average for r in points], "o-", label=key)
    if ensemble is not None:
        ax.plot([0], [ensemble.average], "ks", label="nothing zipped (the models side by side)")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    reference = next((r for r in rows if r.method == "original"), None)
    if reference is not None:
        ax.axhline(reference.average, color="0.5", linestyle="--", label="originals (each on its task)")
    ax.set_xlabel("weight layers zipped (k)")
    ax.set_ylabel("average task accuracy")
    ax.set_title("fxzip sweep: accuracy versus layers zipped")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    return files + ["sweep.png"]
