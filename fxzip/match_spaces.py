"""Match every feature space: the plain matchers, MuDSC's dual-space matching,
and the report's row for each space (what was merged, how similar, why not).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, MutableMapping, Sequence

import torch
from tqdm.auto import tqdm

from .analysis import GraphAnalysis
from .grouped import blocks_of, identity_match, match_units
from .matching import Matcher, Similarity, mean_matched_correlation
from .mudsc import dual_space_match, unit_blocks
from .naming import space_label
from .report import SpaceReport
from .stats import SpaceStats
from .widths import WidthPlan

__all__ = ["match_spaces", "match_dual_space", "summarize", "report_rows", "note_widths"]


def match_spaces(analysis: GraphAnalysis, stats: MutableMapping[int, Any], matcher: Matcher, n_models: int, alpha: float,
                 beta: float, method: str, progress: bool = False, widths: Mapping[int, int] | None = None,
                 models: Sequence[Any] | None = None, release: bool = False
                 ) -> tuple[dict[int, Any], list[SpaceReport]]:
    """Match every space on its activations with ``matcher``, one unit of
    ``grouped.blocks_of`` at a time; returns the matches and the report's rows.

    Why one block at a time: a space's correlation matrix is as large as its
    Gram matrix ((2 x 3072)^2 float64 is 302 MB for a ViT-B MLP), so it is
    built for the block being matched, summarised for the report, and dropped
    before the next: the peak is one block's matrices, not every space's.
    ``models`` (their weights): to pair features constant on the data by their
    weights (``weight_signatures``); without them, in channel order.
    ``release``: drop each space's statistics from ``stats`` once it is matched
    (a merge that calibrated for itself: nothing reads them again, and the
    fold that follows needs the memory)."""
    states: list[dict[str, Any]] = []  # the weights, read only where constants need pairing

    def weights() -> list[dict[str, Any]]:
        if not states:
            states.extend(weight_states(models))
        return states

    matches: dict[int, Any] = {}
    summaries: dict[int, tuple[int, float]] = {}
    blocks = blocks_of(analysis)
    for block in tqdm(blocks, desc="fxzip match", disable=not progress, leave=False):
        sims = {i: Similarity.of(stats[i]) for i in block if i in stats}
        if models is not None:
            weight_signatures(analysis, weights, sims)
        for i, sim in sims.items():  # built for this match only; the report reads the statistics
            sim.disposable = sim is not stats[i] and isinstance(stats[i], SpaceStats)
        matches.update(match_units(analysis, block, sims, matcher, n_models, alpha=alpha, beta=beta,
                                   widths=widths or {}))
        summaries.update(summarize({i: stats[i] if sims[i].disposable else sims[i] for i in sims}, matches))
        del sims
        if release:
            for i in block:
                stats.pop(i, None)
    return matches, report_rows(analysis, summaries, matches, method)


def weight_states(models: Sequence[Any]) -> list[dict[str, Any]]:
    """Every model's weights as a state dict on CPU (matching runs on CPU)."""
    return [{k: v.detach().cpu() for k, v in (m if isinstance(m, dict) else m.state_dict()).items()}
            for m in models]


def weight_signatures(analysis: GraphAnalysis, states: Callable[[], Sequence[Mapping[str, Any]]],
                      sims: Mapping[int, Similarity]) -> None:
    """Give each similarity with two or more constant features in model 0 a
    ``signature``: per feature, the values of each of its weight slices
    (``mudsc.unit_blocks``: the rows it writes and the columns it reads),
    sorted. Sorting makes it independent of the neighbouring spaces' channel
    order, so it needs no other space's match: a permuted copy's dead unit
    has exactly its original's signature, and equal constants (which the data
    cannot tell apart) are paired to their true partners. ``states()`` gives
    the weights (asked for only when a space needs them)."""
    for i, sim in sims.items():
        size = analysis.spaces[i].size
        if int(sim.constant()[:size].sum()) < 2:
            continue
        pieces = [rows.double().sort(dim=1).values for _, rows in unit_blocks(analysis, states(), i)]
        if pieces:
            sim.signature = torch.cat(pieces, 1)


def summarize(sims: Mapping[int, "Similarity | SpaceStats"], matches: Mapping[int, Any]
              ) -> dict[int, tuple[int, float]]:
    """What the report keeps of each similarity (or statistics): its constant
    features and the mean correlation of the features each match put together."""
    return {i: (int(sim.constant().sum()),
                mean_matched_correlation(sim if isinstance(sim, SpaceStats) else sim.correlation(), matches[i].assign))
            for i, sim in sims.items()}


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

    states = weight_states(models)
    best, history = dual_space_match(analysis, states, units, activation, None,
                                     weight_similarity=weight_similarity, seed=seed, progress=progress,
                                     match_block=match_block, align=method == "mudsc_permute")
    matches = {sp.index: best.get(sp.index) or identity_match(n_models, sp.size) for sp in analysis.spaces}
    rows = report_rows(analysis, summarize(activation or {}, matches), matches, method)
    return matches, rows, {"mudsc": history}


def report_rows(analysis: GraphAnalysis, summaries: Mapping[int, tuple[int, float]], matches: Mapping[int, Any],
                method: str) -> list[SpaceReport]:
    """One row per space: its merge counts and mean matched correlation
    (``summaries``: constant features and that correlation, by space), or why
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
        if sp.index in summaries and sp.mergeable:
            constant, matched = summaries[sp.index]
            rows.append(SpaceReport(sp.index, sp.name, sp.size, True, m.within, m.cross, constant, matched,
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
