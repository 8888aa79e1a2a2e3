"""``fxzip sweep``: the papers' hyperparameter search as one command.

One calibration (``fxzip.calibrate``) serves a grid of methods, alpha/beta and
cut points; every merged model is scored on one labelled image folder per
model (model k's task: ``ImageFolder`` labels, i.e. class folders in sorted
order, compared with the first logits of model k's output, or of head k of a
partial zip). The result is a table, ``sweep.json``/``sweep.csv`` and the
papers' accuracy-versus-layers-zipped plot (``sweep.png``).

alpha/beta only matter to ``zipit``/``mudsc``; other methods run once per cut.
The other axes are merge's options: ``merged_width`` (``weight_average``, which
has no similarity to choose which features stay apart, runs at 1.0 only),
``refit`` (a ridge factor, or None), ``repair`` (full zips only: a partial zip
runs without it, once) and ``probes`` (one calibration per policy; methods that
read no activations run once, on the first policy's).

A full zip averages the models' output layers as if their outputs meant the
same thing; its rows carry the report's note saying so (``note``, and the
table's footnote names the partial zip that keeps one head per model).
"""
from __future__ import annotations

import csv
import itertools
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..passes.refit import DEFAULT_RIDGE
from ..probes import DEFAULT_PROBES

__all__ = ["SweepRow", "Point", "sweep", "grid", "task_accuracy", "write_outputs", "table", "best_per_depth",
           "distinct_merges", "ALPHA_BETA_METHODS", "FIXED_WIDTH_METHODS", "ENSEMBLE"]

ALPHA_BETA_METHODS = ("zipit", "zipit_reference", "mudsc")
"""Methods whose result depends on alpha and beta."""
FIXED_WIDTH_METHODS = ("weight_average",)
"""Methods merged_width cannot widen (no similarity to choose which features stay apart): run at 1.0 only."""
ENSEMBLE = "ensemble"
"""The method of a row with nothing zipped (k = 0): the models side by side."""


@dataclass(frozen=True)
class Point:
    """One merge of the grid, all but its cut: ``fxzip.merge``'s options."""

    method: str
    alpha: float | None = None          # None: the method ignores alpha/beta
    beta: float | None = None
    merged_width: float = 1.0
    refit: float | None = None          # the refit's ridge factor; None: no refit
    repair: bool = False
    probes: str | None = DEFAULT_PROBES  # None: the method reads no activations (any calibration serves)

    def options(self) -> dict[str, Any]:
        """The keywords of ``fxzip.merge`` for this point (``probes``: the calibration's)."""
        kwargs: dict[str, Any] = {"method": self.method, "merged_width": self.merged_width,
                                  "refit": False if self.refit is None else self.refit, "repair": self.repair}
        if self.alpha is not None:
            kwargs.update(alpha=self.alpha, beta=self.beta)
        if self.probes is not None:
            kwargs["probes"] = self.probes
        return kwargs


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
    merged_width: float = 1.0   # merge's options (Point); defaults for the original and ensemble rows
    refit: float | None = None  # the refit's ridge factor; None: no refit
    repair: bool = False
    probes: str | None = None   # the calibration's probe policy; None: none read (original, ensemble, weight_average)

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


def grid(methods: Sequence[str], alphas: Sequence[float], betas: Sequence[float], widths: Sequence[float] = (1.0,),
         refits: Sequence[float | None] = (None,), repairs: Sequence[bool] = (False,),
         probes: Sequence[str] = (DEFAULT_PROBES,)) -> list[Point]:
    """Every combination, as ``Point``s, without the ones that are the same
    merge: alpha/beta are None for methods that ignore them, probes None for
    methods that read no activations; ``FIXED_WIDTH_METHODS`` run at width 1.0
    only (none of their points when 1.0 is not asked for)."""
    from ..options import MergeOptions

    points: list[Point] = []
    for method in methods:
        pairs = itertools.product(alphas, betas) if method in ALPHA_BETA_METHODS else [(None, None)]
        ws = [w for w in widths if w == 1.0] if method in FIXED_WIDTH_METHODS else widths
        ps = probes if MergeOptions(method=method).needs_activations else [None]
        for (a, b), w, r, rep, p in itertools.product(pairs, ws, refits, repairs, ps):
            point = Point(method, a, b, float(w), r, bool(rep), p)
            if point not in points:
                points.append(point)
    return points


def sweep(models: Sequence[nn.Module], data: Any, eval_loaders: Sequence[Any], points: Sequence[Point],
          stops: Sequence[Any], *, reset_bn: bool | None = None, max_batches: int | None = None, seed: int = 0,
          progress: bool = True, say: Callable[[str], None] = lambda s: None,
          max_memory: int | None = None, cache_dtype: str | None = None) -> list[SweepRow]:
    """Calibrate once per probe policy, merge for every (point, stop) (``grid``,
    ``distinct_merges``) and score each result. ``max_memory``: merge's bound
    on the activations each refit and repair caches (bytes; None: no bound);
    ``cache_dtype``: the dtype they are cached in (merge's; None: their own).

    The first row is the reference: each original model on its own task.
    """
    from ..cuts import cut_points

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
    grid = merged_grid(models, data, points, stops, cuts, reset_bn=reset_bn, max_batches=max_batches, seed=seed,
                       progress=progress, say=say, max_memory=max_memory, cache_dtype=cache_dtype)
    for done, total, point, stop, merged, t in grid:
        report = merged.meta["fxzip"]
        accuracy = task_accuracy(merged, eval_loaders)
        cut = report.cut
        row = SweepRow(point.method, point.alpha, point.beta, stop, "full" if cut is None else cut.name,
                       depth if cut is None else cut.k, depth, accuracy, float(report.macs.get("merged", 0.0)),
                       time.perf_counter() - t, report.outputs_averaged or "", point.merged_width,
                       point.refit, point.repair, point.probes)
        rows.append(row)
        say(f"[{done}/{total}] {_describe(row)}: " + ", ".join(f"{a:.3f}" for a in accuracy)
            + f" (avg {row.average:.3f}, {row.seconds:.1f}s)")
    return rows


def merged_grid(models: Sequence[nn.Module], data: Any, points: Sequence[Point], stops: Sequence[Any],
                cuts: Sequence[Any], *, reset_bn: bool | None, max_batches: int | None, seed: int, progress: bool,
                say: Callable[[str], None], max_memory: int | None, cache_dtype: str | None
                ) -> Iterator[tuple[int, int, Point, Any, nn.Module, float]]:
    """Every distinct merge of ``points`` x ``stops`` (``distinct_merges``), one
    calibration per probe policy (a Calibration observes with one), each merged
    model yielded as (its number, how many, its point, its stop, the model, the
    ``perf_counter`` at its start) for the caller to score; a point with nothing
    zipped is yielded as the ``ENSEMBLE`` point. The image and the
    language-model sweeps share it."""
    from ..merge import calibrate, merge

    merges = distinct_merges(points, stops, cuts)
    policies = list(dict.fromkeys(p.probes for p, _ in merges if p.probes is not None)) or [DEFAULT_PROBES]
    done = 0
    for policy in policies:
        todo = [(p, stop) for p, stop in merges if (p.probes or policies[0]) == policy]
        t = time.perf_counter()
        cal = calibrate(*models, data=data, max_batches=max_batches, progress=progress, probes=policy)
        say(f"calibrated {'once ' if len(policies) == 1 else f'with probes {policy} '}on {cal.n_samples} samples "
            f"in {time.perf_counter() - t:.1f}s")
        for point, stop in todo:
            done += 1
            t = time.perf_counter()
            merged = merge(*models, data=cal, stop_at=stop, reset_bn=reset_bn, progress=False, seed=seed,
                           max_memory=max_memory, cache_dtype=cache_dtype, **{**point.options(), "probes": policy})
            cut = merged.meta["fxzip"].cut
            if cut is not None and cut.k == 0:  # nothing zipped: the models side by side, whatever the method
                point = Point(ENSEMBLE, probes=None)
            yield done, len(merges), point, stop, merged, t
        del cal  # its batches and statistics, before the next policy's


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


def distinct_merges(points: Sequence[Point], stops: Sequence[Any], cuts: Sequence[Any]) -> list[tuple[Point, Any]]:
    """Every (point, stop) pair that gives a different model, so no merge runs
    twice: a cut with nothing zipped (k = 0) is the models side by side
    whatever the method and options (one row, ``ENSEMBLE``, merged with the
    first point's method at width 1.0, no refit, no repair); a cut with every
    weight layer zipped (k = m) is the full zip, which runs once when both are
    asked for (``--stop-at all``); a partial zip runs without ``repair``
    (which changes full zips only), once."""
    from ..cuts import resolve_cut

    depth = cuts[0].m

    def key(stop: Any) -> Any:
        cut = None if stop is None else resolve_cut(stop, cuts)
        k = depth if cut is None else cut.k
        return "ensemble" if k == 0 else "full" if k == depth else cut.name

    keys = {stop: key(stop) for stop in stops}
    full_asked = None in stops
    kept: list[tuple[Point, Any]] = []
    seen: set[tuple] = set()
    for point in points:
        for stop in stops:
            if keys[stop] == "full" and stop is not None and full_asked:
                continue  # the full zip's own row (stop None) stands for it
            run = point
            if keys[stop] == "ensemble":
                run, what = replace(point, merged_width=1.0, refit=None, repair=False), ("ensemble",)
            else:
                run = point if keys[stop] == "full" else replace(point, repair=False)
                what = (run, keys[stop])
            if what not in seen:
                seen.add(what)
                kept.append((run, stop))
    return kept


def _describe(row: SweepRow) -> str:
    ab = f" alpha={row.alpha} beta={row.beta}" if row.alpha is not None else ""
    return f"{row.method}{ab}{_options_label(row)} {row.cut} ({row.k}/{row.m})"


def _refit_text(ridge: float | None) -> str:
    return "off" if ridge is None else "on" if ridge == DEFAULT_RIDGE else f"{ridge:g}"


OPTION_COLUMNS: tuple[tuple[str, str, Any, Callable[[Any], str]], ...] = (
    ("width", "merged_width", 1.0, lambda w: f"{w:g}"),
    ("refit", "refit", None, _refit_text),
    ("repair", "repair", False, lambda r: "on" if r else "off"),
    ("probes", "probes", DEFAULT_PROBES, lambda p: "-" if p is None else p),
)
"""The table's columns for merge's options: (header, SweepRow field, default, text)."""


def _options_label(row: SweepRow) -> str:
    """The options of a row that are not merge's defaults, as words (a series' label, a progress line)."""
    words = []
    if row.merged_width != 1.0:
        words.append(f"width={row.merged_width:g}")
    if row.refit is not None:
        words.append("refit" + ("" if row.refit == DEFAULT_RIDGE else f"={row.refit:g}"))
    if row.repair:
        words.append("repair")
    if row.probes not in (None, DEFAULT_PROBES):
        words.append(f"probes={row.probes}")
    return "".join(" " + w for w in words)


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
    ``note`` marks the full zips whose output layers were averaged (explained under the table). Merge's
    options (width, refit, repair, probes) get a column each when some merge row is not at the default
    (``sweep.json`` and ``sweep.csv`` always have them)."""
    from ..report import OUTPUTS_AVERAGED

    n = max(len(r.accuracy) for r in rows)
    best = best_per_depth(rows)
    merges = [r for r in rows if r.method not in ("original", ENSEMBLE)]
    options = [(head, name, text) for head, name, default, text in OPTION_COLUMNS
               if any(getattr(r, name) not in (default, None) for r in merges)]  # probes None: none read
    head = (["method", "alpha", "beta"] + [h for h, _, _ in options] + ["cut", "k/m"] + [f"task{k}" for k in range(n)]
            + ["avg", "MACs", "time", "note"])
    body = []
    for r in rows:
        star = " *" if any(r is b for b in best) else ""
        chosen = [text(getattr(r, name)) if r.method not in ("original", ENSEMBLE) else "-"
                  for _, name, text in options]
        body.append([r.method + star, "-" if r.alpha is None else f"{r.alpha:g}",
                     "-" if r.beta is None else f"{r.beta:g}"] + chosen + [r.cut, f"{r.k}/{r.m}"
                     if r.method != "original" else "-"] + [f"{a:.3f}" for a in r.accuracy] + [f"{r.average:.3f}",
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
        writer.writerow(["method", "alpha", "beta", "merged_width", "refit", "repair", "probes", "stop_at", "cut",
                         "k", "m"] + [f"task{k}" for k in range(n)] + ["average", "macs", "seconds", "note"])
        for r in rows:
            writer.writerow([r.method, r.alpha, r.beta, r.merged_width, r.refit, r.repair, r.probes, r.stop_at,
                             r.cut, r.k, r.m] + r.accuracy + [r.average, r.macs, round(r.seconds, 3), r.note])
    files = ["sweep.json", "sweep.csv"]
    _plot(rows, out / "sweep.png")
    return files + ["sweep.png"]


def plot_series(rows: Sequence[Any]) -> dict[str, list[Any]]:
    """Rows grouped into one curve per method, alpha / beta and option set (the
    image and the language-model sweep plots share it)."""
    series: dict[str, list[Any]] = {}
    for r in rows:
        key = r.method + (f" a={r.alpha:g} b={r.beta:g}" if r.alpha is not None else "") + _options_label(r)
        series.setdefault(key, []).append(r)
    return series


def series_colors(n: int) -> list[Any]:
    """Distinct colours for ``n`` curves: matplotlib's 10 cycle colours, or tab20 beyond 10."""
    if n <= 10:
        return [f"C{i}" for i in range(10)]
    from matplotlib import colormaps

    return [colormaps["tab20"](i) for i in range(20)]


def series_style(points: Sequence[Any]) -> tuple[str, str]:
    """Line style and marker of a curve: refit dashed, repaired diamonds, refit squares, one point no line."""
    first = points[0]
    style = "none" if len(points) == 1 else "--" if first.refit is not None else "-"
    marker = "D" if first.repair else "s" if first.refit is not None else "o"
    return style, marker


def _plot(rows: Sequence[SweepRow], path: Path) -> None:
    """``sweep.png``: average accuracy versus layers zipped, one labelled curve per
    setting (method, alpha/beta, and merge's options that are not the default:
    width, refit, repair, probes); refit curves dashed with square markers,
    repaired ones with diamonds. Each curve starts at the models side by side
    (k = 0) when that row was run; a setting with one merge (a repaired full
    zip) is a point. Many curves put the legend beside the plot."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ensemble = next((r for r in rows if r.method == ENSEMBLE), None)
    series = plot_series([r for r in rows if r.method not in ("original", ENSEMBLE)])
    many = len(series) > 6
    fig = Figure(figsize=(10.5 if many else 6.5, 4.5))
    ax = fig.subplots()
    colors = series_colors(len(series))
    for i, (key, points) in enumerate(series.items()):
        style, marker = series_style(points)
        if len(points) > 1 and ensemble is not None:
            points = points + [ensemble]
        points = sorted(points, key=lambda r: r.k)
        ax.plot([r.k for r in points], [r.average for r in points], marker=marker, linestyle=style,
                color=colors[i % len(colors)], label=key)
    if ensemble is not None:
        ax.plot([0], [ensemble.average], "ks", label="nothing zipped (the models side by side)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    reference = next((r for r in rows if r.method == "original"), None)
    if reference is not None:
        ax.axhline(reference.average, color="0.5", linestyle="--", label="originals (each on its task)")
    ax.set_xlabel("weight layers zipped (k)")
    ax.set_ylabel("average task accuracy")
    ax.set_title("fxzip sweep: accuracy versus layers zipped")
    if many:
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
