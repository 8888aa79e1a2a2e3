"""Match every feature space: the plain matchers, MuDSC's dual-space matching,
and the report's row for each space (what was merged, how similar, why not).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from tqdm.auto import tqdm

from .analysis import GraphAnalysis
from .grouped import blocks_of, identity_match, match_all, match_units
from .matching import Matcher, Similarity, mean_matched_correlation
from .mudsc import dual_space_match
from .naming import space_label
from .report import SpaceReport
from .widths import WidthPlan

__all__ = ["match_spaces", "match_dual_space", "report_rows", "note_widths"]


def match_spaces(analysis: GraphAnalysis, stats: Mapping[int, Any], matcher: Matcher, n_models: int, alpha: float,
                 beta: float, method: str, progress: bool = False, widths: Mapping[int, int] | None = None
                 ) -> tuple[dict[int, Any], list[SpaceReport]]:
    """Match every space on its activations with ``matcher`` (``grouped.match_all``);
    returns the matches and the report's rows."""
    sims = {i: Similarity.of(st) for i, st in stats.items()}
    bar = (lambda blocks: tqdm(blocks, desc="fxzip match", disable=not progress, leave=False))
    matches = match_all(analysis, sims, matcher, n_models, alpha=alpha, beta=beta, progress=bar, widths=widths or {})
    return matches, report_rows(analysis, sims, matches, method)


def match_dual_space(analysis: GraphAnalysis, models: Sequence[Any], stats: Mapping[int, Any], matcher: Matcher,
                     n_models: int, alpha: float, beta: float, method: str, weight_similarity: float, seed: int,
                     progress: bool, widths: Mapping[int, int] | None = None
                     ) -> tuple[dict[int, Any], list[SpaceReport], dict[str, Any]]:
    """MuDSC (``fxzip.mudsc``): the units it re-matches are ``grouped.blocks_of``,
    each matched by the group-aware ``match_units`` on the blended similarity."""
    activation = {i: Similarity.of(st) for i, st in stats.items()} if weight_similarity < 1.0 else None
    units = [block for block in blocks_of(analysis) if all(analysis.spaces[i].mergeable for i in block)]

    def match_block(unit, sims):
        return match_units(analysis, unit, sims, matcher, n_models, alpha=alpha, beta=beta, widths=widths or {})

    states = [{k: v.detach().cpu() for k, v in (m if isinstance(m, dict) else m.state_dict()).items()}
              for m in models]  # matching runs on CPU
    best, history = dual_space_match(analysis, states, units, activation, None,
                                     weight_similarity=weight_similarity, seed=seed, progress=progress,
                                     match_block=match_block, align=method == "mudsc_permute")
    matches = {sp.index: best.get(sp.index) or identity_match(n_models, sp.size) for sp in analysis.spaces}
    rows = report_rows(analysis, activation or {}, matches, method)
    return matches, rows, {"mudsc": history}


def report_rows(analysis: GraphAnalysis, sims: Mapping[int, Similarity], matches: Mapping[int, Any], method: str
                ) -> list[SpaceReport]:
    """One row per space: its merge counts and mean matched correlation, or why
    it was left as the identity."""
    rows: list[SpaceReport] = []
    for sp in analysis.spaces:
        m = matches[sp.index]
        notes = []
        if sp.groups > 1:
            notes.append(f"{sp.groups} groups" + (f", tied with {[i for i in sp.tie if i != sp.index]}"
                                                  if len(sp.tie) > 1 else ""))
        if sp.bilinear:
            notes.append("q.k: cross-model only")
        if m.budget_relaxed:
            notes.append("budget relaxed")
        if sp.index in sims and sp.mergeable:
            sim = sims[sp.index]
            rows.append(SpaceReport(sp.index, sp.name, sp.size, True, m.within, m.cross,
                                    int(sim.constant().sum()), mean_matched_correlation(sim.correlation(), m.assign),
                                    "; ".join(notes)))
        else:
            why = ("output" if sp.touches_output else "; ".join(sorted(set(sp.fixed)))[:60] if sp.fixed
                   else "no probe point" if not sp.probes else method)
            rows.append(SpaceReport(sp.index, sp.name, sp.size, method == "weight_average" and not sp.fixed
                                    and not sp.touches_output, m.within, m.cross, 0, float("nan"),
                                    "; ".join(["identity: " + why] + notes)))
    for row, sp in zip(rows, analysis.spaces):
        row.label = space_label(sp)  # what the space is: "layer1 stream (conv1, ...)", "layer2.0 hidden (conv1)"
        row.assignment = matches[sp.index].assign.tolist()  # [model][unit] -> merged unit (report.json)
    return rows


def note_widths(rows: list[SpaceReport], plan: WidthPlan) -> None:
    """Write the width plan into the report rows: merged sizes, and why a space
    asked to grow kept one model's width."""
    for row in rows:
        if row.index in plan.widths:
            row.merged = plan.widths[row.index]
        elif row.index in plan.kept:
            row.note = "; ".join(filter(None, [row.note, f"kept at one model's width: {plan.kept[row.index]}"]))
