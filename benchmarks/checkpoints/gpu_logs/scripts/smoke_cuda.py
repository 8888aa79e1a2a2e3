"""CUDA smoke of fxzip: merges of random ResNet-20 pairs on the GPU, plus calibrate/merge timings."""
import sys
import time
import traceback

import torch

import fxzip
from fxzip.zoo import resnet20

print("fxzip from", fxzip.__file__, flush=True)
dev = torch.device("cuda")
ok = True
for width, nb in ((1, 3), (4, 4)):
    torch.manual_seed(0)
    a = resnet20(width, 384).to(dev).eval()
    b = resnet20(width, 384).to(dev).eval()
    data = [torch.randn(500, 3, 32, 32, device=dev) for _ in range(nb)]
    for kw in ({"method": "zipit"}, {"method": "permute"}, {"method": "weight_average"},
               {"method": "zipit", "stop_at": 13}):
        try:
            torch.cuda.synchronize()
            t = time.perf_counter()
            m = fxzip.merge(a, b, data=data, progress=False, **kw)
            with torch.no_grad():
                out = m(data[0][:8])
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            devs = sorted({str(p.device) for p in m.parameters()} | {str(p.device) for p in m.buffers()})
            shp = [tuple(o.shape) for o in out] if isinstance(out, tuple) else tuple(out.shape)
            print(f"OK width {width} {kw}: {dt:.2f}s out {shp} devices {devs}", flush=True)
        except Exception:
            ok = False
            print(f"FAIL width {width} {kw}", flush=True)
            traceback.print_exc()
    try:
        torch.cuda.synchronize()
        t = time.perf_counter()
        cal = fxzip.calibrate(a, b, data=data, progress=False)
        torch.cuda.synchronize()
        tcal = time.perf_counter() - t
        t = time.perf_counter()
        m = fxzip.merge(a, b, data=cal, method="zipit", alpha=0.3, beta=0.125, progress=False)
        torch.cuda.synchronize()
        tm = time.perf_counter() - t
        t = time.perf_counter()
        m = fxzip.merge(a, b, data=cal, method="zipit", alpha=0.3, beta=0.125, stop_at=7, progress=False)
        torch.cuda.synchronize()
        tp = time.perf_counter() - t
        print(f"TIMING width {width}: calibrate {nb * 500} images {tcal:.2f}s; zipit merge from calibration "
              f"{tm:.2f}s (incl. reset); partial 7/20 {tp:.2f}s", flush=True)
    except Exception:
        ok = False
        print(f"FAIL timing width {width}", flush=True)
        traceback.print_exc()
print("SMOKE_CUDA", "OK" if ok else "FAILED", flush=True)
sys.exit(0 if ok else 1)
