"""Pack call-2 outputs by priority into <= 62 MiB of tar parts under $OUT."""
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import torch

OUT = Path(os.environ["OUT"])
C2 = Path("/tmp/c2")
REPO = Path.cwd()
CAP = 61 * 2**20
res = REPO / "benchmarks" / "results"
(C2 / "results").mkdir(parents=True, exist_ok=True)
for f in res.glob("cifar10_5+5_resnet20x4*"):
    shutil.copy(f, C2 / "results" / f.name)
x4 = REPO / "benchmarks" / "checkpoints" / "cifar10_resnet20x4"
x4h = C2 / "cifar10_resnet20x4"
x4h.mkdir(parents=True, exist_ok=True)
for j in sorted(x4.glob("*.json")):
    shutil.copy(j, x4h / j.name)
fp16 = []
for pt in sorted(x4.glob("*_final.pt")):
    sd = torch.load(pt, map_location="cpu", weights_only=True)
    dst = x4h / pt.name.replace("_final.pt", "_final_fp16.pt")
    torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}, dst)
    fp16.append(dst)
eval_ok = (C2 / "results" / "cifar10_5+5_resnet20x4.json").exists()
items = [C2 / "logs", C2 / "results", *sorted(x4h.glob("*.json"))]
items += sorted((C2 / "cifar10_resnet20x1").glob("*")) if (C2 / "cifar10_resnet20x1").exists() else []
rest = []
for d in ("cifar10_resnet20gnx1", "cifar10_vitx1"):
    if (C2 / d).exists():
        rest += sorted((C2 / d).glob("*"))
items += (rest + fp16) if eval_ok else (fp16 + rest)


def size(p):
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


total, chosen, left = 0, [], []
for it in items:
    s = size(it)
    if total + s <= CAP:
        chosen.append(it)
        total += s
    else:
        left.append(it)
with tarfile.open("/tmp/c2.tar", "w") as tf:
    for it in chosen:
        tf.add(it, arcname=str(it.relative_to(C2)))
print(f"eval_ok {eval_ok}; packed {len(chosen)} items, {total / 2**20:.1f} MiB; left out: {[str(p) for p in left]}")
subprocess.run(f"split -b 15M -d /tmp/c2.tar {OUT}/c2.tar.part-", shell=True, check=True)
