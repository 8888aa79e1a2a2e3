"""The probe default, decided from every committed comparison of probe policies (issue 25 item 2).

Two sources, each a set of paired cells (one merge per policy on the same models, calibration
images and test images, so a cell's difference between two policies is free of the pair's own
level):

* ``probe_policy_settings.json`` (``probe_policy.py --zipit ...``): the CIFAR-10 (5+5) tables'
  pairs (ResNet-20 x1, GroupNorm ResNet-20, ViT; 3 pairs each), every policy, Permute and ZipIt
  at the named alpha/beta settings; a cell is (architecture, method, pair);
* ``reference_parity.json`` (``reference_parity.py``): the reference ResNet-20 pairs at the
  official codes' protocol, fxzip's default policy against ``"reference"``, Permute, ZipIt at
  both of the codes' settings and MuDSC; a cell is (pair, width, draw, method). W.Avg is left
  out (it reads no statistics).

For every policy: the mean over cells of its joint accuracy minus ``"all"``'s (the current
default), with the standard error of that mean, per source and pooled. The cells of one pair
share its models, so the standard error treats them as more independent than they are: it is
a lower bound, said in the report. The policy with the best pooled mean becomes the default
only if it beats ``"all"`` by more than two standard errors; otherwise ``"all"`` stays, and
the report says why.

    python benchmarks/probe_decision.py     (reads benchmarks/results/, writes probe_decision.{json,md})
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT = "all"
NO_STATISTICS = ("W.Avg",)


def mean_se(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    mu = sum(xs) / len(xs)
    if len(xs) < 2:
        return mu, float("nan")
    return mu, math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def policy_cells(result: dict) -> dict[str, list[dict]]:
    """probe_policy.py's rows as paired cells: {policy: [{cell, diff}]} against ``"all"``."""
    rows, setting = result["rows"], result["setting"]
    methods = setting.get("methods") or {a: ["permute", "zipit"] for a in setting["archs"]}
    out: dict[str, list[dict]] = {}
    for policy in result["table"]:
        if policy == DEFAULT or "+" in policy:  # repair / refit rows are not probe policies
            continue
        for arch in setting["archs"]:
            for method in methods[arch]:
                for pair in setting["pairs"][arch]:
                    mine, base = (rows.get(f"{arch}|pair{pair}|{p}|{method}") for p in (policy, DEFAULT))
                    if mine and base:
                        out.setdefault(policy, []).append(
                            {"cell": f"{arch} {method} pair {pair}", "diff": mine["joint"] - base["joint"]})
    return out


def parity_cells(result: dict) -> dict[str, list[dict]]:
    """reference_parity.py's fxzip sides as paired cells: probes="reference" against the default."""
    cells = []
    for key, entry in sorted(result["per_cell"].items()):
        ref, dflt = ({r["method"]: r for r in entry.get(side, {}).get("rows", [])}
                     for side in ("fxzip_reference", "fxzip_default"))
        for method in sorted(set(ref) & set(dflt)):
            if method in NO_STATISTICS or dflt[method].get("probes") != DEFAULT:
                continue
            cells.append({"cell": f"{key} {method}", "diff": ref[method]["joint"] - dflt[method]["joint"]})
    return {"reference": cells} if cells else {}


def decide(sources: dict[str, dict[str, list[dict]]]) -> dict:
    policies = sorted({p for cells in sources.values() for p in cells})
    table = []
    for policy in policies:
        row = {"policy": policy}
        pooled: list[float] = []
        for name, cells in sources.items():
            diffs = [c["diff"] for c in cells.get(policy, [])]
            pooled += diffs
            row[name] = dict(zip(("mean", "se"), mean_se(diffs)), n=len(diffs))
        row["pooled"] = dict(zip(("mean", "se"), mean_se(pooled)), n=len(pooled))
        table.append(row)
    best = max(table, key=lambda r: r["pooled"]["mean"], default=None)
    switch = best is not None and best["pooled"]["mean"] > 2 * best["pooled"]["se"] > 0
    return {"table": table, "best": best["policy"] if best else None,
            "default": best["policy"] if switch else DEFAULT, "switch": switch}


def fmt(cell: dict) -> str:
    if not cell["n"]:
        return "-"
    se = "" if math.isnan(cell["se"]) else f" ± {cell['se']:.2f}"
    return f"{cell['mean']:+.2f}{se} (n={cell['n']})"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy-json", default=str(RESULTS / "probe_policy_settings.json"))
    ap.add_argument("--parity-json", default=str(RESULTS / "reference_parity.json"))
    ap.add_argument("--out", default=str(RESULTS / "probe_decision"))
    args = ap.parse_args(argv)
    policy = json.loads(Path(args.policy_json).read_text())
    parity = json.loads(Path(args.parity_json).read_text())
    sources = {"cifar_tables": policy_cells(policy), "reference_pairs": parity_cells(parity)}
    decision = decide(sources)
    doc = {"inputs": {"cifar_tables": args.policy_json, "reference_pairs": args.parity_json},
           "policy_command": policy["setting"]["command"], "parity_command": parity.get("command"),
           **decision, "cells": sources}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    names = list(sources)
    lines = ["# The probe default: every policy against `all`, paired (issue 25 item 2)", "",
             "Command: `python benchmarks/probe_decision.py` (reads the two results below, computes nothing "
             "else)  ",
             f"CIFAR tables: `{doc['policy_command']}`  ",
             f"Reference pairs: `{doc['parity_command']}`", "",
             "Joint accuracy of the policy minus `all`'s on the same models and data, mean over cells ± "
             "standard error. A CIFAR-table cell is (architecture, method at one alpha/beta, pair); a "
             "reference-pair cell is (pair, width, calibration draw, method). Cells of one pair share its "
             "models, so the standard errors are lower bounds. The reference pairs compare only `all` and "
             "`reference` (the official codes' placement).", "",
             "| policy | " + " | ".join(n.replace("_", " ") for n in names) + " | pooled |",
             "|---|" + "---|" * (len(names) + 1)]
    for row in decision["table"]:
        lines.append(f"| {row['policy']} | " + " | ".join(fmt(row[n]) for n in names) + f" | {fmt(row['pooled'])} |")
    best = next((r for r in decision["table"] if r["policy"] == decision["best"]), None)
    below = best is not None and best["pooled"]["mean"] <= 0
    lines += ["", f"Best alternative to `all`: **{decision['best']}**"
              + (f" ({fmt(best['pooled'])})" if best else "")
              + ("; every policy is below `all` on the pooled mean" if below else "")
              + ". Rule: a policy replaces `all` only if it beats it by more than two standard errors of the "
              "pooled mean.", "",
              f"Decision: the default is **`{decision['default']}`**"
              + ("." if decision["switch"] else
                 " (no policy beats it by more than two standard errors).")]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return doc


if __name__ == "__main__":
    main()
