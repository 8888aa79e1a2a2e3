"""What ``fxzip merge`` of two language models costs from the command line, against its floor.

Issue 26's cost goal: a merge of two of ``lm_merge.py``'s causal LMs from the
command line, on 1000 sequences of 256 tokens, within 1.5x the floor (the two
models' forward passes plus one merged forward over the same rows, in the same
batches), without refit; with refit, the ratio reported.

    python benchmarks/lm_cli_cost.py                     # pair 0, 1000 rows, with and without --refit
    python benchmarks/lm_cli_cost.py --rows 64 --out /tmp/x   # a quick run (the tests' smoke run)

The rows: packed rows of 256 tokens of the domains' training texts
(``lm_corpora.py``; tokenized with the pair's tokenizer), half from each where
a domain has enough and the rest from the other, saved as
a ``.pt`` of ``input_ids`` / ``attention_mask`` (what ``--data`` reads). Each
merge is ``python -m fxzip merge A B --data rows.pt --seq-len 256 --batch-size
B --out OUT --quiet`` in a fresh process, timed from start to exit (Python and
library imports, loading, the merge, saving the ``save_pretrained`` folder);
the merge's own phases are the ``seconds`` of its ``report.json``. The floor is
measured in this process with the same thread count right before and right
after each merge, and the two are averaged, so a change of the machine's load
during the merge hits both alike (model A stands in for the merged model: it
has its architecture). Results: ``benchmarks/results/lm_cli_cost.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_corpora  # noqa: E402
from common import git_commit  # noqa: E402
from lm_merge import CHECKPOINTS, SEQ  # noqa: E402
from perf import floor_seconds  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 1.5


def make_rows(checkpoints: Path, rows: int, out: Path) -> tuple[Path, dict[str, int]]:
    """``rows`` packed rows of ``SEQ`` tokens from the domains' training texts,
    half from each where a domain has enough, the rest from the other; returns
    the ``.pt`` and the rows taken per domain."""
    from fxzip.text_data import open_text

    tokenizer = lm_corpora.train_tokenizer(checkpoints / "tokenizer")
    texts = lm_corpora.write_texts(checkpoints / "text")
    pools = {}
    for domain in lm_corpora.DOMAINS:
        with open_text(texts[domain]["train"], tokenizer, SEQ, batch_size=64, progress=False) as source:
            batches = list(source.loader())
        pools[domain] = (torch.cat([b["input_ids"] for b in batches]), torch.cat([b["attention_mask"] for b in batches]))
    available = {d: pool[0].shape[0] for d, pool in pools.items()}
    if sum(available.values()) < rows:
        raise ValueError(f"the training texts hold {sum(available.values())} rows of {SEQ} tokens ({available}); "
                         "ask for fewer --rows")
    take = {d: min(available[d], rows // len(pools)) for d in pools}
    for d in pools:  # what one domain lacks, the other gives
        take[d] += min(available[d] - take[d], rows - sum(take.values()))
    ids = torch.cat([pools[d][0][:n] for d, n in take.items()])
    mask = torch.cat([pools[d][1][:n] for d, n in take.items()])
    path = out / f"rows_{rows}x{SEQ}.pt"
    torch.save({"input_ids": ids, "attention_mask": mask}, path)
    return path, take


def _batches(path: Path, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = torch.load(path)
    ids, mask = data["input_ids"], data["attention_mask"]
    return [(ids[i:i + batch_size], mask[i:i + batch_size]) for i in range(0, ids.shape[0], batch_size)]


class _Logits(torch.nn.Module):
    """A causal LM called on (input_ids, attention_mask), as the merge calls it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids=batch[0], attention_mask=batch[1]).logits


def cli_merge(dirs: list[Path], rows: Path, batch_size: int, out: Path, threads: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "fxzip", "merge", *map(str, dirs), "--data", str(rows), "--seq-len", str(SEQ),
           "--batch-size", str(batch_size), "--out", str(out), "--quiet", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"command": " ".join(["fxzip", *cmd[3:]]), "wall_s": wall, "seconds": report.get("seconds", {}),
            "details": {k: {kk: v for kk, v in d.items() if kk in ("layers", "passes", "data_reads", "schedule")}
                        for k, d in report.get("details", {}).items() if k == "refit" and isinstance(d, dict)}}


def run(pair: int, rows: int, batch_size: int, threads: int, checkpoints: Path, work: Path,
        refit_options: list[list[str]]) -> dict:
    from fxzip.hf import load_pretrained

    torch.set_num_threads(threads)
    dirs = [checkpoints / f"pair{pair}_{d}" for d in lm_corpora.DOMAINS]
    missing = [str(d) for d in dirs if not (d / "config.json").exists()]
    if missing:
        raise FileNotFoundError(f"no trained model in {missing}; run benchmarks/train_lm.py first")
    data, per_domain = make_rows(checkpoints, rows, work)
    batches = _batches(data, batch_size)
    models = [_Logits(load_pretrained(d, torch.float32)).eval() for d in dirs]
    with torch.no_grad():  # warm-up, outside every measurement
        for m in models:
            m((batches[0][0][:2], batches[0][1][:2]))
    runs = []
    for extra in refit_options:
        before = floor_seconds(models, models[0], batches)
        merged = cli_merge(dirs, data, batch_size, work / f"out{len(runs)}", threads, extra)
        after = floor_seconds(models, models[0], batches)
        floor = (before[0] + after[0]) / 2
        merge_call = merged["seconds"].get("total", sum(merged["seconds"].values()))
        runs.append({"options": extra, **merged, "floor_before_s": before[0], "floor_after_s": after[0],
                     "floor_s": floor, "ratio_cli": merged["wall_s"] / floor, "ratio_merge_call": merge_call / floor,
                     "load": os.getloadavg()[0]})
    return {"pair": pair, "rows": rows, "rows_per_domain": per_domain, "seq_len": SEQ, "batch_size": batch_size, "threads": threads,
            "checkpoints": [str(d) for d in dirs], "runs": runs}


def write_results(result: dict, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_cli_cost.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# `fxzip merge` of two causal LMs from the command line, against the forward-pass floor", "",
        f"Command: `{command}` ({result['when']}; commit `{result['commit']}`; {result['machine']}).", "",
        f"Pair {result['pair']} of `lm_merge.py` (`benchmarks/checkpoints/lm/`, fp16 checkpoints loaded in float32), "
        f"{result['rows']} rows of {result['seq_len']} tokens from the domains' training texts "
        f"({', '.join(f'{d} {n}' for d, n in result['rows_per_domain'].items())}), batches of "
        f"{result['batch_size']}, {result['threads']} torch thread(s) in the merge and in the floor. Floor: the two "
        "models' forward passes plus one more (standing in for the merged model) over the same batches, measured "
        "in this process right before and right after each merge and averaged. *CLI*: the whole `fxzip merge` "
        "process (imports, loading, merge, saving); *merge call*: the merge's own phases (`report.json`).", "",
        "| options | CLI s | merge call s | floor s | CLI / floor | merge call / floor | phases (s) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["runs"]:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items() if k != "total")
        call = r["seconds"].get("total", sum(r["seconds"].values()))
        lines.append(f"| {' '.join(r['options']) or '(papers merge)'} | {r['wall_s']:.1f} | {call:.1f} | "
                     f"{r['floor_s']:.1f} | **{r['ratio_cli']:.2f}** | {r['ratio_merge_call']:.2f} | {phases} |")
    for r in result["runs"]:
        drift = max(r["floor_before_s"], r["floor_after_s"]) / min(r["floor_before_s"], r["floor_after_s"])
        if drift > 1.25:  # the machine's load moved during the merge: its ratio is not a measurement
            lines += ["", f"Unreliable: `{' '.join(r['options']) or '(papers merge)'}`'s floor was "
                      f"{r['floor_before_s']:.1f} s before the merge and {r['floor_after_s']:.1f} s after it "
                      f"({drift:.2f}x): the machine's load changed during the run, so its ratio is not a "
                      "measurement; re-run it on a quiet machine."]
    plain = [r for r in result["runs"] if not r["options"]]
    if plain:
        ok = plain[0]["ratio_cli"] <= GOAL
        lines += ["", f"Goal (without refit, the whole command within {GOAL}x the floor): "
                  f"{'met' if ok else 'not met'} ({plain[0]['ratio_cli']:.2f}x)."]
    (out / "lm_cli_cost.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", type=int, default=0)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-refit-row", action="store_true", help="only the merge without --refit")
    ap.add_argument("--checkpoints", type=Path, default=CHECKPOINTS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    options = [[]] if args.no_refit_row else [[], ["--refit"]]
    with tempfile.TemporaryDirectory() as work:
        result = run(args.pair, args.rows, args.batch_size, args.threads, args.checkpoints, Path(work), options)
    result.update(when=time.strftime("%Y-%m-%d %H:%M:%S"), commit=git_commit(),
                  machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    command = "python benchmarks/lm_cli_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_results(result, args.out, command.strip())
    print((args.out / "lm_cli_cost.md").read_text())


if __name__ == "__main__":
    main()
