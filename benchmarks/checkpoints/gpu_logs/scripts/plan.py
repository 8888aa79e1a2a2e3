"""Epochs for call 1 from the contended per-epoch times of the probe mix (each process trains 2 models)."""
import re
import sys
from pathlib import Path

B = float(sys.argv[2]) if len(sys.argv) > 2 else 420.0
CAP = {"bn": 200, "gn": 200, "vit": 300, "mb": 10}
FLOOR = {"bn": 30, "gn": 20, "vit": 20, "mb": 3}
t = {}
for f in Path(sys.argv[1]).glob("*.log"):
    arch = f.name.split("_")[0]
    lines = [m for m in re.finditer(r"epoch (\d+)/\d+: .*\((\d+)s\)", f.read_text())]
    if len(lines) >= 2:  # time per epoch after the first (cudnn autotune, start-up)
        (k1, s1), (k2, s2) = (map(int, lines[0].groups())), (map(int, lines[-1].groups()))
        per = (s2 - s1) / max(k2 - k1, 1) if k2 > k1 else s2 / k2
        t[arch] = max(t.get(arch, 0.0), per, s2 / k2 * 0.5)
E = {}
for arch in CAP:
    if arch in t and t[arch] > 0:
        e = int(B / (2 * t[arch]))
        e = e - e % (10 if e >= 20 else 1)
        E[arch] = max(FLOOR[arch], min(CAP[arch], e))
    else:
        E[arch] = None
print("PER_EPOCH_S", {k: round(v, 3) for k, v in t.items()})
print("EPOCHS", E["bn"], E["gn"], E["vit"], E["mb"])
