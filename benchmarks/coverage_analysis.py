"""What fxzip sees on every panel model, before any data: trace + analysis only.

    python benchmarks/coverage_analysis.py   # -> benchmarks/results/coverage_analysis.{json,md}

Why beside ``coverage.py``: the full benchmark calibrates three merges per model
on more samples than features (minutes per model on 2 cores), so a session
cannot always re-run all 61 models. Tracing and analysing take seconds; this
table says for every model whether fxzip accepts its structure (and which trace
path it took) or refuses it with which error, on one code state. Acceptance here
is necessary, not sufficient: only ``coverage.py`` checks the merged function.
Models are built exactly as ``coverage.py`` builds them (its ``create``, panel
and sizes), in this process, one after another.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import coverage  # noqa: E402  (the benchmark module beside this file)
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def analyse(name: str, size: int) -> dict:
    from fxzip.analysis import analyze
    from fxzip.trace import trace

    rec: dict = {"model": name, "size": size}
    start = time.perf_counter()
    stage = "create"
    try:
        model, _ = coverage.create(name, size, 0)
        x = coverage.images_batches(2, 2, size, 1000)[0]
        stage = "trace"
        gm = trace(model, x)
        concrete = any("fxzip_concrete_kind" in n.meta for n in gm.graph.nodes)
        rec["trace_path"] = "concrete shapes" if concrete else "symbolic"
        stage = "analysis"
        analysis = analyze(gm)
        rec.update(outcome="accepted", spaces=len(analysis.spaces),
                   mergeable=sum(sp.mergeable for sp in analysis.spaces),
                   grouped=sum(sp.groups > 1 for sp in analysis.spaces))
    except Exception as exc:  # noqa: BLE001 - every refusal is a result here
        msg = str(exc)
        rec.update(outcome="refused", stage=stage, error_type=type(exc).__name__,
                   message=coverage.first_lines(msg), category=coverage.classify(stage, type(exc).__name__, msg))
    rec["seconds"] = round(time.perf_counter() - start, 2)
    return rec


def markdown(result: dict) -> str:
    recs = result["records"]
    ok = [r for r in recs if r["outcome"] == "accepted"]
    lines = ["# fxzip coverage: trace + analysis only", "",
             f"- Command: `{result['command']}` ({result['started']}; commit `{result['commit']}`)",
             f"- Machine: {result['machine']}",
             "- Acceptance means fxzip traced the model and found its merge structure; whether the merge is exact "
             "is checked by `coverage.py` ([coverage.md](coverage.md)).", "",
             f"**{len(ok)} of {len(recs)} accepted.**", "",
             "| model | size | outcome | trace path | spaces (mergeable) | stage | category | message | s |",
             "|---|---:|---|---|---:|---|---|---|---:|"]
    for r in recs:
        spaces = f"{r['spaces']} ({r['mergeable']})" if r["outcome"] == "accepted" else ""
        lines.append(f"| {r['model']} | {r['size']} | {r['outcome']} | {r.get('trace_path', '')} | {spaces} | "
                     f"{r.get('stage', '')} | "
                     f"{coverage._cell(r.get('category'), 60)} | {coverage._cell(r.get('message'), 140)} | "
                     f"{r['seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {"command": "python benchmarks/coverage_analysis.py", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "commit": coverage.git_state().get("commit", "?")[:10],
              "machine": ", ".join(f"{k}: {v}" for k, v in coverage.machine().items()),
              "records": []}
    from tqdm.auto import tqdm
    for name in tqdm(coverage.PANEL, desc="analysis", unit="model"):
        result["records"].append(analyse(name, coverage.SIZES.get(name, coverage.DEFAULT_SIZE)))
    out = Path(args.out)
    (out / "coverage_analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "coverage_analysis.md").write_text(markdown(result))
    print(markdown(result).split("\n")[6])


if __name__ == "__main__":
    main()
