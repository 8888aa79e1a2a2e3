"""What a merge did, per space, as data and as a table.

``MergeReport.to_dict()`` / ``to_json()`` / ``to_markdown()`` are what
``fxzip.save`` writes (``report.json``, ``report.md``); ``MergeReport.from_dict``
reads them back, so a saved result keeps its report without fxzip's objects
being pickled.
"""
from __future__ import annotations

import json
import math
import platform
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

import torch.fx as fx

from .align import CommonPart
from .analysis import GraphAnalysis
from .cuts import CutPoint, find_cuts, shared_cuts
from .warn import warn_caller

__all__ = ["SpaceReport", "MergeReport", "COLUMNS", "OUTPUTS_AVERAGED", "output_warnings"]

REPORT_FORMAT = 1
"""Version of the ``report.json`` layout (bumped when a key changes meaning)."""

OUTPUTS_AVERAGED = "outputs averaged"
"""How the report's message about a full zip's averaged output layers begins
(``MergeReport.outputs_averaged``; ``fxzip sweep`` notes it on full-zip rows)."""

COLUMNS: dict[str, str] = {
    "space": "a feature space: tensors that share one channel basis, named by role and the modules that write it "
             "(a stream: several layers add into it; hidden: one layer's output)",
    "size": "channels (units) in the space (a->b: merged_width keeps b merged units)",
    "within/model": "units merged with another unit of the same model, per model (zipit's beta budget)",
    "cross": "merged units that combine units of different models",
    "const": "units whose activation was constant on the calibration data (no correlation to match on)",
    "corr": "mean correlation of the matched units (1: identical features; - : not matched)",
    "note": "groups/heads, ties, why the space kept the identity alignment (output, input, fixed op), "
            "or 'head only' (after a partial zip's cut: every model keeps its own units)",
}
"""The legend of the report's table (also in ``report.json`` and ``report.md``)."""


@dataclass
class SpaceReport:
    index: int
    name: str
    size: int
    matched: bool
    within: list[int]
    cross: int
    constant: int
    mean_corr: float
    note: str = ""
    label: str = ""  # what the space is, by role and module paths (fxzip.naming); name is its first producer
    head_only: bool = False  # partial zip: the space lies after the cut, so each head keeps its own units
    assignment: list = field(default_factory=list, repr=False)  # [model][unit] -> merged unit
    merged: int = 0  # merged units when merged_width widened the space (0: size)

    @property
    def title(self) -> str:
        return self.label or self.name

    @property
    def merged_size(self) -> int:
        return self.merged or self.size


@dataclass
class MergeReport:
    method: str
    n_models: int
    spaces: list[SpaceReport]
    seconds: dict[str, float] = field(default_factory=dict)
    calib_batches: int = 0
    calib_samples: int = 0
    warnings: list[str] = field(default_factory=list)
    cut: object = None  # the CutPoint of a partial zip (None: full zip)
    macs: dict[str, float] = field(default_factory=dict)  # per input: merged, original, ensemble
    details: dict = field(default_factory=dict)  # method-specific, e.g. details["mudsc"]: the sweep history
    cut_reason: str = ""  # why the partial zip was cut where it was (e.g. the models differ after it)
    settings: dict = field(default_factory=dict)  # how the merge was run (filled by the CLI / fxzip.save)

    @property
    def outputs_averaged(self) -> str | None:
        """The message saying that the models' output layers were averaged as if
        their outputs meant the same thing (a full zip of models with heads), with
        the partial zip that keeps one head per model; None otherwise."""
        return next((w for w in self.warnings if w.startswith(OUTPUTS_AVERAGED)), None)

    @property
    def widened(self) -> bool:
        """Some space keeps more units than one model has (``merged_width``): the
        result no longer has the architecture's shapes."""
        return any(row.merged and row.merged != row.size for row in self.spaces)

    def to_dict(self) -> dict[str, Any]:
        """Everything in the report as JSON-safe data (NaN correlations become None).

        Versions of python/torch/timm/fxzip are recorded so that a result can
        be traced back to the code that produced it. ``assignment`` maps a
        space's index to its assignment of every unit: ``[model][unit]`` is the
        merged unit that unit of that model went to.
        """
        cut = None
        if self.cut is not None:
            c = self.cut
            cut = {"name": getattr(c, "name", str(c)), "k": getattr(c, "k", None), "m": getattr(c, "m", None),
                   "space": getattr(c, "space", None), "dim": getattr(c, "dim", None),
                   "needs_gather": getattr(c, "needs_gather", None)}
        return {
            "format": REPORT_FORMAT,
            "method": self.method,
            "n_models": self.n_models,
            "zip": "full" if self.cut is None else "partial",
            "cut": cut,
            "cut_reason": self.cut_reason,
            "settings": _jsonable(self.settings),
            "calibration": {"batches": self.calib_batches, "samples": self.calib_samples},
            "columns": dict(COLUMNS),
            "spaces": [_jsonable({k: v for k, v in asdict(s).items() if k != "assignment"}) for s in self.spaces],
            "assignment": {str(s.index): s.assignment for s in self.spaces if s.assignment},
            "seconds": _jsonable(self.seconds),
            "macs": _jsonable(self.macs),
            "warnings": list(self.warnings),
            "details": _jsonable(self.details),
            "versions": versions(),
        }

    def to_json(self, indent: int | None = 1) -> str:
        """``to_dict()`` as strict JSON (no NaN/Infinity: other tools must parse it)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MergeReport":
        """The report back from ``to_dict()`` / a ``report.json`` (the cut comes back
        as a ``CutPoint`` without its channel segments)."""
        names = {f.name for f in fields(SpaceReport)}
        rows = [SpaceReport(**{k: (float("nan") if k == "mean_corr" and v is None else v)
                               for k, v in row.items() if k in names}) for row in data.get("spaces", [])]
        for row in rows:
            row.assignment = list(data.get("assignment", {}).get(str(row.index), []))
        cut = data.get("cut")
        if cut is not None:
            cut = CutPoint(cut["name"], cut["k"], cut["m"], cut.get("space"), cut.get("dim"),
                           bool(cut.get("needs_gather")))
        calib = data.get("calibration", {})
        return cls(data["method"], data["n_models"], rows, dict(data.get("seconds", {})),
                   calib.get("batches", 0), calib.get("samples", 0), list(data.get("warnings", [])), cut,
                   dict(data.get("macs", {})), dict(data.get("details", {})), data.get("cut_reason", ""),
                   dict(data.get("settings", {})))

    def to_markdown(self) -> str:
        """A readable ``report.md``: what was merged and how, the per-space table
        with a legend for every column, cost and time."""
        zipped = f"partial zip at `{self.cut}`" if self.cut is not None else "full zip"
        lines = ["# fxzip merge report", "",
                 f"{self.method}: {self.n_models} models, {zipped}, {len(self.spaces)} feature spaces, "
                 f"calibrated on {self.calib_samples} samples ({self.calib_batches} batches).", ""]
        if self.cut_reason:
            lines += [f"Cut: {self.cut_reason}", ""]
        if self.settings:
            lines += ["| setting | value |", "|---|---|"]
            lines += [f"| {k} | {_md(v)} |" for k, v in self.settings.items()] + [""]
        head = list(COLUMNS)
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(_md(c) for c in _cells(s)) + " |" for s in self.spaces]
        lines += ["", "Columns:", ""] + [f"- **{k}**: {v}" for k, v in COLUMNS.items()] + [""]
        if self.macs:
            lines.append("Multiply-adds per input: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in self.macs.items())
                         + ".")
        if self.seconds:
            lines.append("Time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()) + ".")
        if self.warnings:
            lines += ["", "Warnings:", ""] + [f"- {w}" for w in self.warnings]
        v = versions()
        lines += ["", "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + "."]
        return "\n".join(lines) + "\n"

    def table(self, legend: bool = True) -> str:
        """The per-space table, network order; ``legend``: one line per column after it."""
        head = list(COLUMNS)
        rows = [_cells(s) for s in self.spaces]
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        zipped = f"partial zip at {self.cut}" if self.cut is not None else "full zip"
        lines = [f"fxzip {self.method}: {self.n_models} models, {zipped}, {len(self.spaces)} spaces, "
                 f"{self.calib_batches} batches"]
        if self.cut_reason:
            lines.append(f"cut: {self.cut_reason}")
        lines += [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        if self.macs:
            lines.append("MACs per input: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in self.macs.items()))
        if self.seconds:
            lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        lines += [f"warning: {w}" for w in self.warnings]
        if legend:
            lines += ["columns:"] + [f"  {k}: {v}" for k, v in COLUMNS.items()]
        return "\n".join(lines)

    def mark_head_only(self, result: Any) -> "MergeReport":
        """Mark the spaces a partial zip's heads keep as they were (written only after
        the cut), from the result's graph: the trunk's nodes keep their names, the
        heads' are prefixed ``head<k>_``. Their rows had been matched like the
        others, which told nothing about the merged model. Idempotent."""
        graph = getattr(result, "graph", None)
        if self.cut is None or graph is None:
            return self
        trunk = {n.name for n in graph.nodes if not re.match(r"head\d+_", n.name)}
        for row in self.spaces:
            if row.name not in trunk and not row.head_only:
                row.head_only = True
        return self

    def plot(self, path: Any = None) -> Any:
        """Matched correlation and merges (within a model, across models) per space
        in network order, as a matplotlib figure; saved to ``path`` when given.
        matplotlib is imported here rather than at the top so ``import fxzip`` stays fast."""
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
        rows = self.spaces
        x = list(range(len(rows)))
        fig = Figure(figsize=(max(6.0, 0.35 * len(rows) + 2), 6.5))
        top, bottom = fig.subplots(2, 1, sharex=True)
        corr = [float("nan") if s.mean_corr is None or not s.matched or s.head_only else s.mean_corr for s in rows]
        top.plot(x, corr, "o-", color="tab:blue")
        top.set_ylabel("matched correlation")
        top.set_ylim(min([0.0] + [c for c in corr if c == c]), 1.0)
        top.set_title(f"fxzip {self.method}: {self.n_models} models"
                      + (f", partial zip at {getattr(self.cut, 'name', self.cut)}" if self.cut is not None else ""))
        within = [sum(s.within) / max(1, s.size * self.n_models) if s.matched and not s.head_only else 0.0
                  for s in rows]
        cross = [s.cross / max(1, s.size) if s.matched and not s.head_only else 0.0 for s in rows]
        bottom.bar(x, cross, color="tab:green", label="cross-model merges / size")
        bottom.bar(x, within, bottom=cross, color="tab:orange", label="within-model merges / (size x models)")
        bottom.set_ylabel("fraction of units")
        bottom.set_ylim(0.0, 1.35)  # room for the legend above the bars
        bottom.legend(loc="upper left", fontsize="small", ncol=2)
        head_only = [i for i, s in enumerate(rows) if s.head_only]
        if head_only:
            for ax in (top, bottom):
                ax.axvspan(head_only[0] - 0.5, head_only[-1] + 0.5, color="0.9", zorder=0)
            top.text(head_only[0], 0.95, "heads (after the cut)", fontsize="small", va="top")
        bottom.set_xticks(x)
        bottom.set_xticklabels([s.name for s in rows], rotation=90, fontsize="x-small")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig

    def __str__(self) -> str:
        return self.table()


def _cells(s: SpaceReport) -> list[str]:
    if s.head_only:
        return [s.title, str(s.size), "-", "-", "-", "-", "head only: each model keeps its own units"]
    size = f"{s.size}->{s.merged}" if s.merged and s.merged != s.size else str(s.size)
    return [s.title, size, ",".join(map(str, s.within)) if s.matched else "-",
            str(s.cross) if s.matched else "-", str(s.constant),
            "-" if s.mean_corr is None or math.isnan(s.mean_corr) else f"{s.mean_corr:.3f}", s.note]


def versions() -> dict[str, str]:
    """Versions of the software a result depends on (timm only when installed)."""
    import torch

    from .version import __version__

    found = {"fxzip": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import timm

        found["timm"] = timm.__version__
    except ImportError:
        pass
    return found


def _md(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _jsonable(value: Any) -> Any:
    """``value`` with NaN/inf as None, tuples as lists, tensors as lists and
    other objects as their ``str``: a report must always serialise."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # tensors, numpy arrays and scalars
        return _jsonable(value.tolist())
    return str(value)


def output_warnings(analysis: GraphAnalysis, gms: Sequence[fx.GraphModule] = (),
                    common: CommonPart | None = None) -> list[str]:
    """Messages for the report of a full zip about what happens to the output
    space. A stream that also feeds the network inside is a ``warnings.warn``
    (change the call: add a head, or cut earlier). Output layers (a classifier)
    are averaged as if the models' outputs meant the same thing, which is what a
    shared label space or a CLIP-style embedding wants and what two heads of
    different tasks do not: that is said in the report every time (not as a
    Python warning: it is not a mistake in the call), with the partial zip
    that keeps one head per model."""
    out = []
    heads = []
    for sp in analysis.spaces:
        if sp.touches_output and len(sp.producers) > 1 and sp.consumers:
            msg = (f"the output space ({sp.size} channels) also contains internal producers "
                   f"{sp.producers[:6]}{'...' if len(sp.producers) > 6 else ''}: the whole stream is averaged "
                   "without matching (e.g. a backbone with num_classes=0). Add a head, or cut earlier.")
            warn_caller(msg)
            out.append(msg)
        elif sp.touches_output and sp.producers:
            heads.append(sp)
    if heads:
        out.append(outputs_averaged_note(heads, gms, analysis, common))
    return out


def outputs_averaged_note(heads: list, gms: Sequence[fx.GraphModule], analysis: GraphAnalysis,
                          common: CommonPart | None) -> str:
    """The report's note that the output layers were averaged, naming the last cut before them."""
    layers = sorted({p for sp in heads for p in sp.producers})
    cut = None
    if gms:
        try:
            cuts = find_cuts(gms[0], analysis) if common is None else shared_cuts(gms, common, analysis)
            before = [c for c in cuts if c.k < c.m and c.space not in {sp.index for sp in heads}]
            cut = before[-1] if before else None
        except Exception:  # noqa: BLE001 - only a suggestion; the merge does not depend on it
            cut = None
    if cut is not None and cut.k > 0:
        suggest = (f"the partial zip at the last cut before them keeps one head per model: "
                   f"stop_at={cut.name!r} (fxzip merge --stop-at {cut.name}; {cut.k} of {cut.m} layers zipped)")
    else:
        suggest = "a partial zip keeps one head per model (stop_at=..., fxzip merge --stop-at; see fxzip.cut_points)"
    sizes = ", ".join(f"{sp.size}" for sp in heads)
    return (f"{OUTPUTS_AVERAGED}: the models' output layers ({', '.join(layers[:6])}{'...' if len(layers) > 6 else ''}"
            f"; {sizes} outputs) are averaged as if their outputs meant the same thing (one label set, a shared "
            f"vocabulary, or a shared embedding). If the models' outputs mean different things (e.g. classes 0-4 "
            f"and 5-9 of two classifiers), the merged outputs mean neither: {suggest}.")
