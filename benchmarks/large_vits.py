"""Issue 23's two cost goals for large ViTs, on the export capture.

* trace + analysis of timm's ``vit_base_patch16_224`` (224 px) on one core;
* ``fxzip.merge`` of torchvision's ``vit_b_16`` with its copy at 224 px, 3
  batches of 8, on the machine's two cores: seconds of the merge call (and of
  its phases, ``report.seconds``), the peak resident memory of the process
  (``ru_maxrss``), and the self-merge's error. The forward passes alone (the
  two models over the three batches, what any calibration must run) are
  timed in the same process for scale.

Random weights (nothing downloaded; vit_b_16's redrawn to O(1), its head
is zero-initialised). Each part runs in its own process, so
one's memory peak does not hide the other's. Run::

    python benchmarks/large_vits.py   # writes results/large_vits.{json,md}
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import subprocess
import sys
import time

import torch
from common import RESULTS, ROOT, redraw


def trace_vit_base() -> dict:
    import timm

    import fxzip

    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224)
    start = time.perf_counter()
    gm = fxzip.trace(model, x)
    traced = time.perf_counter() - start
    analysis = fxzip.analyze(gm)
    total = time.perf_counter() - start
    return {"trace_s": round(traced, 2), "trace_analysis_s": round(total, 2), "spaces": len(analysis.spaces),
            "mergeable": sum(s.mergeable for s in analysis.spaces)}


def merge_vit_b_16() -> dict:
    import torchvision

    import fxzip

    torch.manual_seed(0)
    # O(1) redrawn weights: torchvision zero-initialises the head, so the model's output would be 0
    model = redraw(torchvision.models.vit_b_16(weights=None, num_classes=10).eval(), 0)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 3, 224, 224, generator=g) for _ in range(3)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    other = copy.deepcopy(model)
    merged = fxzip.merge(model, other, data=data, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        want, got = model(data[0]), merged(data[0])
        start = time.perf_counter()
        for m in (model, other):
            for x in data:
                m(x)
        forwards = time.perf_counter() - start
    phases = {k: round(v, 1) for k, v in merged.meta["fxzip"].seconds.items()}
    return {"merge_s": round(seconds, 1), "peak_rss_mb": round(peak / 1024), "rss_before_merge_mb": round(before / 1024),
            "self_merge_rel_error": float((want - got).abs().max() / want.abs().max()),
            "phases_s": phases, "forwards_s": round(forwards, 1), "threads": torch.get_num_threads()}


PARTS = {"trace_vit_base": trace_vit_base, "merge_vit_b_16": merge_vit_b_16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", choices=list(PARTS), help="run one part in this process (used by the driver)")
    args = parser.parse_args()
    torch.set_num_threads(1 if args.one == "trace_vit_base" else 2)  # the goals: one core; the 2-core machine
    if args.one:
        print(json.dumps(PARTS[args.one]()))
        return
    rows = {}
    for name in PARTS:
        out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        rows[name] = json.loads(lines[-1]) if lines else {"error": out.stderr.strip().splitlines()[-1:]}
        print(name, rows[name], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    setting = {"command": "python benchmarks/large_vits.py", "commit": commit,
               "torch": torch.__version__, "machine": f"{platform.node()} {platform.machine()}, 2 cores; 1 torch "
               "thread for the trace, 2 for the merge",
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg_end": list(__import__("os").getloadavg())}
    (RESULTS / "large_vits.json").write_text(json.dumps({"setting": setting, "rows": rows}, indent=1))
    t, m = rows["trace_vit_base"], rows["merge_vit_b_16"]
    md = ["# Large ViTs on the export capture (issue 23's cost goals)", "",
          f"Command: `{setting['command']}` ({setting['date']}; commit `{commit}`; torch {setting['torch']}; "
          f"{setting['machine']}; load average at the end {setting['load_avg_end']}). Random weights; each part in "
          "its own process.", "",
          "| goal | measured |", "|---|---|",
          f"| trace + analysis of timm vit_base_patch16_224 (224 px) under 10 s on one core | "
          f"{t.get('trace_analysis_s', t)} s (capture {t.get('trace_s', '-')} s; {t.get('spaces', '-')} spaces, "
          f"{t.get('mergeable', '-')} mergeable) |",
          f"| merge of torchvision vit_b_16 with its copy, 224 px, 3 batches of 8: under 60 s | "
          f"{m.get('merge_s', m)} s (phases: {m.get('phases_s', '-')}; the 6 forward passes alone: "
          f"{m.get('forwards_s', '-')} s) |",
          f"| ... within 4 GB peak resident memory of the process | {m.get('peak_rss_mb', '-')} MB "
          f"({m.get('rss_before_merge_mb', '-')} MB before the merge call) |",
          f"| self-merge error (max relative) | {m.get('self_merge_rel_error', '-')} |", ""]
    (RESULTS / "large_vits.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
