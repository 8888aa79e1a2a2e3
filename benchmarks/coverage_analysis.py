"""What fxzip sees on every panel model, before any data: trace + analysis only.

    python benchmarks/coverage_analysis.py   # -> benchmarks/results/coverage_analysis.{json,md}
    python benchmarks/coverage_analysis.py --library torchvision   # -> coverage_analysis_torchvision.{json,md}
    python benchmarks/coverage_analysis.py --library torchvision --models raft_small  # re-run some, kept with the rest
    python benchmarks/coverage_analysis.py --library transformers   # -> coverage_analysis_transformers.{json,md}

Why beside ``coverage.py``: the full benchmark calibrates three merges per model
on more samples than features (minutes per model on 2 cores), so a session
cannot always re-run all 61 models. Tracing and analysing take seconds; this
table says for every model whether fxzip accepts its structure (and whether the
capture kept the batch dimension symbolic: ``coverage.trace_batch``, the log
record of ``fxzip.trace`` that says it cannot, checked by running the captured
graph at another batch size) or refuses it with which error, on one code state. Acceptance here
is necessary, not sufficient: only ``coverage.py`` checks the merged function.
Models are built exactly as ``coverage.py`` builds them (its ``create``, panel
and sizes; for ``--library torchvision`` its ``create_torchvision``, panel and
input specs; for ``--library transformers`` its ``create_transformers`` and
``hf_input_spec``), in this process, one after another. With ``--models`` only those
are analysed; their records replace the ones already in the output file (the
update, its command and commit are listed; each such record names its commit).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import coverage  # noqa: E402  (the benchmark module beside this file)
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def analyse(name: str, size: int, library: str = "timm") -> dict:
    from fxzip.analysis import analyze

    rec: dict = {"model": name, "size": size}
    spec = coverage.input_spec(library, name, size)
    if library != "timm":
        rec.update(family=spec["family"], input=spec["text"], input_spec=spec)
    start = time.perf_counter()
    stage = "create"
    try:
        model, kwargs = coverage.build(library, name, size, 0)
        b = spec.get("batch", 2)  # 2 samples (transformers: its batch of 4)
        x = coverage.input_batches(spec, b, b, 1000)[0]
        if library != "timm":
            rec.update(create_kwargs=kwargs, params=sum(p.numel() for p in model.parameters()))
            with torch.no_grad():
                coverage.call(model, x)  # the model runs on these inputs (else: a create failure, not a trace one)
        stage = "trace"
        gm, rec["batch_dim"] = coverage.trace_batch(model, x, spec)
        stage = "analysis"
        analysis = analyze(gm)
        rec.update(outcome="accepted", spaces=len(analysis.spaces),
                   mergeable=sum(sp.mergeable for sp in analysis.spaces),
                   grouped=sum(sp.groups > 1 for sp in analysis.spaces))
        if library != "timm":  # what coverage.py's calibration will need (images for > 2x samples per feature)
            rec["images_needed"] = coverage.sample_plan(gm, analysis)["images_needed"]
    except Exception as exc:  # noqa: BLE001 - every refusal is a result here
        msg = str(exc)
        rec.update(outcome="refused", stage=stage, error_type=type(exc).__name__,
                   message=coverage.first_lines(msg), category=coverage.classify(stage, type(exc).__name__, msg))
    rec["seconds"] = round(time.perf_counter() - start, 2)
    return rec


def markdown(result: dict) -> str:
    recs = result["records"]
    ok = [r for r in recs if r["outcome"] == "accepted"]
    library = result.get("library", "timm")
    cov = coverage.result_name(library)
    lines = ["# fxzip coverage: trace + analysis only" + ("" if library == "timm" else f" ({library})"), "",
             f"- Command: `{result['command']}` ({result['started']}; commit `{result['commit']}`{_code(result)})"]
    lines += [f"- Command: `{u['command']}` ({u['started']}; commit `{u['commit']}`{_code(u)}; re-ran "
              f"{', '.join(u['models'])})" for u in result.get("updates", [])]
    lines += [f"- Machine: {result['machine']}"]
    if library == "torchvision":
        lines += [f"- Config: {json.dumps(result['config'])}; models built with "
                  "`torchvision.models.get_model(name, weights=None, ...)` (`create_kwargs` in the json), the "
                  "inputs in the table (B = 2 standard-normal samples)"]
    elif library == "transformers":
        lines += [f"- Config: {json.dumps(result['config'])}; models built from their config classes with small "
                  "random sizes, `use_cache=False`, eval mode (`create_kwargs` in the json; nothing downloaded), "
                  f"the positional inputs in the table (B = {coverage.HF_BATCH}: token ids, a right-padding mask, "
                  "images)"]
    lines += ["- Batch: `symbolic` where the captured graph keeps the batch dimension symbolic (it computes the "
              "model's output at another batch size), `fixed (B=N): reason` where the capture logged that the "
              "batch size cannot stay symbolic (logger `fxzip.trace`) and captured that batch size only."]
    lines += [f"- Acceptance means fxzip traced the model and found its merge structure; whether the merge is exact "
              f"is checked by `coverage.py` ([{cov}.md]({cov}.md)).", "",
              f"**{len(ok)} of {len(recs)} accepted.**", ""]
    if library == "timm":
        lines += ["| model | size | outcome | batch | spaces (mergeable) | stage | category | message | s |",
                  "|---|---:|---|---|---:|---|---|---|---:|"]
    else:
        lines += family_table(recs)
        groups: dict[str, list[str]] = {}
        for r in recs:
            if r["outcome"] != "accepted":
                groups.setdefault(r.get("category") or "?", []).append(r["model"])
        if groups:
            lines += ["| category | count | models |", "|---|---:|---|"]
            for cat, models in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
                lines.append(f"| {coverage._cell(cat, 200)} | {len(models)} | {', '.join(models)} |")
            lines.append("")
        lines += ["Other: refused at create (the model does not build or run on its inputs). Images needed: "
                  "calibration images for more than twice as many samples as features in every mergeable space "
                  "(`coverage.py` draws at least 16, rounded up to its batch of 32, at most 4096).", "",
                  "| model | family | input | params (M) | outcome | batch | spaces (mergeable) | images needed | "
                  "stage | category | message | s |",
                  "|---|---|---|---:|---|---|---:|---:|---|---|---|---:|"]
    for r in recs:
        spaces = f"{r['spaces']} ({r['mergeable']})" if r["outcome"] == "accepted" else ""
        batch = coverage._cell(coverage.batch_cell(r.get("batch_dim")), 80)
        if library == "timm":
            head = f"| {r['model']} | {r['size']} | {r['outcome']} | {batch} | {spaces} | "
        else:
            params = f"{r['params'] / 1e6:.1f}" if r.get("params") is not None else ""
            head = (f"| {r['model']} | {r.get('family', '')} | {r.get('input', r['size'])} | {params} | "
                    f"{r['outcome']} | {batch} | {spaces} | {r.get('images_needed', '')} | ")
        lines.append(head + f"{r.get('stage', '')} | "
                     f"{coverage._cell(r.get('category'), 60)} | {coverage._cell(r.get('message'), 140)} | "
                     f"{r['seconds']} |")
    return "\n".join(lines) + "\n"


def _code(run: dict) -> str:
    """' + uncommitted fxzip changes, fxzip source digest D' where the run recorded them."""
    text = " + uncommitted fxzip changes" if run.get("fxzip_dirty") else ""
    return text + (f", fxzip source digest `{run['fxzip_digest']}`" if run.get("fxzip_digest") else "")


def family_table(recs: list[dict]) -> list[str]:
    order = list(dict.fromkeys(r.get("family", "?") for r in recs))
    lines = ["| family | models | accepted | refused at trace | refused at analysis | other |",
             "|---|---:|---:|---:|---:|---:|"]
    for f in order + ["all"]:
        rs = [r for r in recs if f == "all" or r.get("family", "?") == f]
        ok = sum(r["outcome"] == "accepted" for r in rs)
        tr = sum(r.get("stage") == "trace" for r in rs)
        an = sum(r.get("stage") == "analysis" for r in rs)
        lines.append(f"| {f} | {len(rs)} | {ok} | {tr} | {an} | {len(rs) - ok - tr - an} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--library", choices=coverage.LIBRARIES, default="timm",
                    help="whose panel (as coverage.py): timm (default; results/coverage_analysis.{json,md}), "
                         "torchvision (results/coverage_analysis_torchvision.{json,md}) or transformers "
                         "(results/coverage_analysis_transformers.{json,md})")
    ap.add_argument("--models", nargs="+", metavar="NAME[:SIZE]",
                    help="only these; their records replace those in the output file (default: the whole panel)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    command = "python benchmarks/coverage_analysis.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:])
    state = coverage.git_state()
    commit = state.get("commit", "?")[:10]
    code = {"fxzip_dirty": state.get("fxzip_dirty", False),
            "fxzip_digest": coverage.source_digest(coverage.ROOT / "fxzip", coverage.ROOT / "passes")}
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    out = Path(args.out)
    path = out / f"{coverage.result_name(args.library, 'coverage_analysis')}.json"
    result = {"command": command, "started": started, "commit": commit, **code,
              "machine": ", ".join(f"{k}: {v}" for k, v in coverage.machine(args.library).items()),
              "records": []}
    if args.library != "timm":
        batch = coverage.HF_BATCH if args.library == "transformers" else 2
        result = {"library": args.library, **result,
                  "config": {"library": args.library, "seed": 0, "batch": batch, "torch_threads": 1}}
    todo = coverage.parse_models(args.models, args.library)
    kept: dict[str, dict] = {}
    if args.models and path.exists():  # an update: the other records (and the first run's header) stay
        result = json.loads(path.read_text())
        result.setdefault("updates", []).append({"command": command, "started": started, "commit": commit, **code,
                                                 "models": [m for m, _ in todo]})
        kept = {r["model"]: r for r in result["records"]}
    from tqdm.auto import tqdm
    for name, size in tqdm(todo, desc="analysis", unit="model"):
        rec = analyse(name, size, args.library)
        if args.models and path.exists():
            rec["commit"] = commit
        kept[name] = rec
    result["records"] = [kept[k] for k in coverage._order(kept, args.library)]
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    path.with_suffix(".md").write_text(md)
    print(next(line for line in md.split("\n") if line.startswith("**")))


if __name__ == "__main__":
    main()
