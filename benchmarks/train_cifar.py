"""Train pairs of CLIP-style models on disjoint CIFAR-10 class splits (CPU or GPU).

The reference recipe of the ZipIt! paper (BRIEF section 5):

* pair ``p`` draws a fresh random 5/5 class split from seed ``p``
  (:func:`cifar_data.random_class_split`); model A learns the first five
  classes, model B the other five, from different random initialisations;
* the model outputs a 384-d embedding; its logits are
  ``100 * cosine(embedding, class vectors of its own 5 classes)`` with the
  fixed text embeddings of ``benchmarks/data/cifar10_class_embeddings.npy``
  (so both models share one output space); loss = cross-entropy;
* SGD lr 0.4, momentum 0.9, weight decay 5e-4 (Nesterov off), batch 500,
  triangular learning rate per iteration: linear warm-up from 0 over the
  first ``--warmup`` fraction of the iterations (default 0.2), then linear
  decay to 0 at the end; random crop (pad 4) + horizontal flip.

Architectures (``--arch``):

* ``resnet20``   -- ``fxzip.zoo.resnet20(width, out_dim=384)`` (BatchNorm, the papers' model);
* ``resnet20gn`` -- ``fxzip.zoo.resnet20(width, out_dim=384, norm='group')`` (GroupNorm with
  4-32 groups; a fixture for group-structured merging), same SGD recipe;
* ``vit``        -- ``fxzip.zoo.cifar_vit(width, out_dim=384)``: timm VisionTransformer,
  patch 4, dim 96*width, depth 4, 3*width heads of 32, class-token pooling
  (29.1 M multiply-adds per image at width 1). A ViT trained from scratch on
  25,000 images needs an adaptive optimiser, so its defaults differ: AdamW lr 1e-3,
  betas (0.9, 0.999), weight decay 0.05 (not on biases, norms, class token and
  position embedding), gradient-norm clipping at 1.0, warm-up fraction 0.1, same
  batch 500, triangular schedule, augmentation and loss. Every default can be
  overridden on the command line.

Heads (``--head``): ``clip`` (default; the papers' CIFAR setting above: a 384-d embedding
scored by cosine to fixed class vectors, so both models share one output space) or ``ce``: an
ordinary 5-way Linear classifier over the model's own classes (``out_dim=5``), trained with
cross-entropy on its logits, so the two models' heads have the same shape but unrelated meanings
(the papers' cross-entropy setting; merged with ``stop_at`` by ``benchmarks/eval_cifar_ce.py``).
``--head ce`` writes to ``benchmarks/checkpoints/cifar10_{arch}x{width}_ce`` by default.

Devices: ``--device cpu`` (default; ``--threads`` intra-op threads, channels_last
fp32) or ``--device cuda`` (the whole uint8 training set on the GPU, crop + flip
vectorised on the GPU with offsets drawn once per epoch, bf16 autocast,
channels_last, ``cudnn.benchmark``; one host sync per epoch). The final
evaluation is always fp32 (no autocast).

Outputs under ``--out`` (default ``benchmarks/checkpoints/cifar10_{arch}x{width}``),
per model ``pair{p}_{A|B}``:

* ``pair{p}_{m}_final.pt`` -- the trained ``state_dict`` in fp32, nothing else
  (meant to be committed; ~1.2 MB for ResNet-20x1, ~2 MB for the ViT);
* ``pair{p}_{m}.json``     -- arch, split, seeds, recipe, epochs, device, throughput,
  own-task 5-way test accuracy, and ``below_90`` (flag, also printed, when
  accuracy < 90 %);
* ``pair{p}_{m}_resume.pt`` -- model + optimizer + epoch + RNG state, written
  every ``--resume-every`` epochs; deleted when the model is finished unless
  ``--keep-resume`` (git-ignore ``*_resume.pt``).

Finished models (final + json with the same arch, width and epoch count) are
skipped, so the command can be re-run after an interruption and continues where
it stopped.

Examples::

    .venv/bin/python benchmarks/train_cifar.py --width 1 --pairs 0 1 2 3 \\
        --epochs 20 --data ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/train_cifar.py --device cuda --arch vit --pairs 0 --models A --epochs 200

``--benchmark N`` only times ``N`` training iterations and prints throughput.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

import cifar_data  # noqa: E402

try:  # plain import when fxzip's package __init__ works; else load zoo.py alone
    from fxzip import zoo as _zoo  # noqa: E402
except Exception:  # pragma: no cover - robustness while the package is young
    import importlib.util

    _spec = importlib.util.spec_from_file_location("fxzip_zoo", ROOT / "fxzip" / "zoo.py")
    assert _spec is not None and _spec.loader is not None
    _zoo = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_zoo)
resnet20 = _zoo.resnet20

EMBEDDINGS = HERE / "data" / "cifar10_class_embeddings.npy"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
ACC_FLAG = 0.90
ARCHS = ("resnet20", "resnet20gn", "vit")

# Per-architecture defaults of the recipe (any of them can be overridden on the command line).
RECIPES: dict[str, dict] = {
    "resnet20": {"optimizer": "sgd", "lr": 0.4, "momentum": 0.9, "weight_decay": 5e-4, "warmup": 0.2,
                 "clip_grad": 0.0},
    "resnet20gn": {"optimizer": "sgd", "lr": 0.4, "momentum": 0.9, "weight_decay": 5e-4, "warmup": 0.2,
                   "clip_grad": 0.0},
    "vit": {"optimizer": "adamw", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.05, "warmup": 0.1,
            "clip_grad": 1.0},
}


def build_model(arch: str, width: int, out_dim: int = 384) -> torch.nn.Module:
    """The benchmark model ``arch`` at ``width`` with an ``out_dim`` embedding output."""
    if arch == "resnet20":
        return resnet20(width=width, out_dim=out_dim)
    if arch == "resnet20gn":
        return resnet20(width=width, out_dim=out_dim, norm="group")
    if arch == "vit":
        return _zoo.cifar_vit(width=width, out_dim=out_dim)
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")


def model_description(arch: str, width: int, out_dim: int = 384) -> str:
    return {"resnet20": f"fxzip.zoo.resnet20(width={width}, out_dim={out_dim})",
            "resnet20gn": f"fxzip.zoo.resnet20(width={width}, out_dim={out_dim}, norm='group')",
            "vit": f"fxzip.zoo.cifar_vit(width={width}, out_dim={out_dim})"}[arch]


def class_vectors(path: Path = EMBEDDINGS) -> torch.Tensor:
    """(10, 384) unit-norm class text embeddings in standard class-id order."""
    v = torch.from_numpy(np.load(path)).float()
    return F.normalize(v, dim=1)


def clip_logits(emb: torch.Tensor, vecs: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """``scale * cosine(emb, vecs)``: (N, D) x (K, D) -> (N, K)."""
    return scale * F.normalize(emb.float(), dim=1) @ vecs.t()


def head_logits(out: torch.Tensor, vecs: torch.Tensor, head: str) -> torch.Tensor:
    """The 5 own-class logits of a model output: CLIP-style cosine logits, or (``head="ce"``)
    the output itself, an ordinary 5-way classifier over the model's own classes."""
    return out.float() if head == "ce" else clip_logits(out, vecs)


def out_dim_of(head: str, vecs_all: torch.Tensor) -> int:
    return 5 if head == "ce" else vecs_all.shape[1]


def lr_at(it: int, total: int, peak: float, warmup: float) -> float:
    """Triangular schedule: 0 -> peak over ``warmup*total`` iterations -> 0 at ``total``."""
    w = max(1, int(round(warmup * total)))
    return float(np.interp(it, [0, w, total], [0.0, peak, 0.0]))


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    fused = {"fused": True} if args.device.type == "cuda" else {}
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay, nesterov=False)
    # AdamW: no weight decay on 1-d parameters (biases, norm affines) and on tokens / position embeddings
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or n in ("cls_token", "pos_embed", "reg_token") else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999), **fused)


# --------------------------------------------------------------------------- #
# data on the device
# --------------------------------------------------------------------------- #
class DeviceData:
    """uint8 NCHW images and labels of one task, resident on ``device``.

    Each epoch draws the shuffle, crop offsets and flips with a CPU generator
    (resumable), moves them to the device once, and builds every batch there.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, device: torch.device, pad: int = 4) -> None:
        self.device, self.pad = device, pad
        self.x = x.to(device)
        self.y = y.to(device)
        self.mean = torch.tensor(cifar_data.CIFAR_MEAN, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(cifar_data.CIFAR_STD, device=device).view(1, 3, 1, 1) * 255.0

    def __len__(self) -> int:
        return len(self.x)

    def normalize(self, xb: torch.Tensor) -> torch.Tensor:
        return ((xb.float() - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def epoch(self, batch_size: int, generator: torch.Generator, augment: bool = True):
        n, p = len(self.x), self.pad
        order = torch.randperm(n, generator=generator)
        oy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5
        order, oy, ox, flip = (t.to(self.device) for t in (order, oy, ox, flip))
        _, c, h, w = self.x.shape
        ar_h = torch.arange(h, device=self.device)
        ar_w = torch.arange(w, device=self.device)
        ar_c = torch.arange(c, device=self.device)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            xb = self.x[idx]
            if augment:
                b = len(idx)
                xp = F.pad(xb, (p, p, p, p))
                rows = oy[i:i + b, None] + ar_h[None, :]
                cols = torch.where(flip[i:i + b, None], ar_w.flip(0)[None, :], ar_w[None, :]) + ox[i:i + b, None]
                xb = xp[torch.arange(b, device=self.device)[:, None, None, None], ar_c[None, :, None, None],
                        rows[:, None, :, None], cols[:, None, None, :]]
            yield self.normalize(xb), self.y[idx]

    def plain(self, batch_size: int = 1000):
        for i in range(0, len(self.x), batch_size):
            yield self.normalize(self.x[i:i + batch_size]), self.y[i:i + batch_size]


def _autocast(args: argparse.Namespace):
    if args.device.type == "cuda" and args.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, vecs: torch.Tensor, bs: int = 1000,
             device: torch.device | None = None, head: str = "clip") -> float:
    """Own-task accuracy, fp32 (no autocast), on ``device`` (default: the model's)."""
    model.eval()
    device = device or next(model.parameters()).device
    correct = torch.zeros((), dtype=torch.long, device=device)
    if device.type == "cpu":
        for xb, yb in cifar_data.batches(x, y, bs):
            xb = xb.contiguous(memory_format=torch.channels_last)
            correct += (head_logits(model(xb), vecs, head).argmax(1) == yb).sum()
    else:
        for xb, yb in DeviceData(x, y, device).plain(bs):
            correct += (head_logits(model(xb), vecs.to(device), head).argmax(1) == yb).sum()
    return int(correct) / len(x)


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def model_plan(pair: int) -> dict[str, dict]:
    """Split and seeds of the two models of ``pair``."""
    a, b = cifar_data.random_class_split(seed=pair)
    return {
        "A": {"classes": a, "init_seed": 2 * pair, "data_seed": 10_000 + 2 * pair},
        "B": {"classes": b, "init_seed": 2 * pair + 1, "data_seed": 10_000 + 2 * pair + 1},
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def recipe_dict(args: argparse.Namespace) -> dict:
    opt = ({"optimizer": "SGD", "lr": args.lr, "momentum": args.momentum, "nesterov": False}
           if args.optimizer == "sgd" else
           {"optimizer": "AdamW", "lr": args.lr, "betas": [0.9, 0.999],
            "weight_decay_excludes": "biases, norm weights, cls_token, pos_embed"})
    return {**opt, "weight_decay": args.weight_decay, "batch_size": args.batch_size,
            "schedule": f"triangular per iteration, warm-up fraction {args.warmup}, linear decay to 0",
            "grad_clip_norm": args.clip_grad or None,
            "loss": ("cross-entropy over an ordinary 5-way linear head (own classes, no shared class vectors)"
                     if args.head == "ce" else "cross-entropy over 100*cosine to own-class text embeddings"),
            "augmentation": "random crop 32 pad 4 + horizontal flip",
            "precision": "bf16 autocast, fp32 weights" if (args.device.type == "cuda" and args.amp) else "fp32",
            **({} if args.head == "ce" else {"class_embeddings": str(EMBEDDINGS.relative_to(ROOT))})}


def train_one(args: argparse.Namespace, data: cifar_data.CIFAR10, vecs_all: torch.Tensor,
              pair: int, name: str, plan: dict) -> dict:
    from tqdm import tqdm

    out: Path = args.out
    dev: torch.device = args.device
    stem = f"pair{pair}_{name}"
    final_p, json_p, resume_p = out / f"{stem}_final.pt", out / f"{stem}.json", out / f"{stem}_resume.pt"
    if final_p.exists() and json_p.exists():
        info = json.loads(json_p.read_text())
        same = (info.get("epochs") == args.epochs and info.get("width") == args.width
                and info.get("arch", "resnet20") == args.arch and info.get("head", "clip") == args.head)
        if same:
            print(f"[skip] {stem}: finished ({info['epochs']} epochs, own-task test acc "
                  f"{100 * info['test_acc']:.2f}%{'  BELOW 90%' if info.get('below_90') else ''})", flush=True)
            return info
        print(f"[warn] {stem}: a finished model with arch={info.get('arch', 'resnet20')} "
              f"epochs={info.get('epochs')} exists; requested {args.arch} {args.epochs}; retraining would "
              "overwrite it. Pass a different --out or delete it. Skipping.", flush=True)
        return info

    classes = plan["classes"]
    sub = data.subset(classes)
    if args.max_train_images:  # smoke tests only: a fixed random subset of the training images
        keep = torch.randperm(len(sub.x_train), generator=torch.Generator().manual_seed(0))[:args.max_train_images]
        sub.x_train, sub.y_train = sub.x_train[keep], sub.y_train[keep]
    vecs = vecs_all[classes].to(dev)
    torch.manual_seed(plan["init_seed"])
    model = build_model(args.arch, args.width, out_dim_of(args.head, vecs_all)).to(
        dev, memory_format=torch.channels_last)
    opt = make_optimizer(model, args)
    gen = torch.Generator().manual_seed(plan["data_seed"])
    iters_per_epoch = math.ceil(len(sub.x_train) / args.batch_size)
    total = iters_per_epoch * args.epochs
    start_epoch, history, prev_seconds = 0, [], 0.0
    if resume_p.exists():
        ck = torch.load(resume_p, map_location=dev, weights_only=False)
        if (ck["epochs"] == args.epochs and ck["classes"] == classes and ck["width"] == args.width
                and ck.get("arch", "resnet20") == args.arch and ck.get("head", "clip") == args.head):
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            gen.set_state(ck["generator"])
            start_epoch, history = ck["epoch"], ck["history"]
            prev_seconds = history[-1]["seconds"] if history else 0.0
            print(f"[resume] {stem} from epoch {start_epoch}/{args.epochs}", flush=True)
        else:
            print(f"[warn] {stem}: resume file is for a different run (arch/epochs/width/split); starting over",
                  flush=True)

    gpu = dev.type == "cuda"
    dd = DeviceData(sub.x_train, sub.y_train, dev) if gpu else None
    print(f"[train] {stem}: {args.arch}x{args.width} on {dev}, classes {classes} "
          f"{[cifar_data.CIFAR10_CLASSES[c] for c in classes]}, init seed {plan['init_seed']}, "
          f"{args.epochs} epochs x {iters_per_epoch} iters", flush=True)
    t0 = time.time()
    bar = tqdm(total=total, initial=start_epoch * iters_per_epoch, desc=stem, unit="it", disable=args.no_bar,
               dynamic_ncols=True, mininterval=args.tqdm_interval, file=sys.stdout)
    for epoch in range(start_epoch, args.epochs):
        model.train()
        tl = torch.zeros((), device=dev)
        tc = torch.zeros((), dtype=torch.long, device=dev)
        tn = 0
        it = epoch * iters_per_epoch
        source = (dd.epoch(args.batch_size, gen) if gpu else
                  ((xb.contiguous(memory_format=torch.channels_last), yb) for xb, yb in
                   cifar_data.batches(sub.x_train, sub.y_train, args.batch_size, shuffle=True,
                                      train_augment=True, generator=gen)))
        for xb, yb in source:
            lr = lr_at(it + 1, total, args.lr, args.warmup)  # step 1 already has lr > 0
            for g in opt.param_groups:
                g["lr"] = lr
            with _autocast(args):
                emb = model(xb)
            logits = head_logits(emb, vecs, args.head)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            opt.step()
            tl += loss.detach() * len(yb)
            tc += (logits.detach().argmax(1) == yb).sum()
            tn += len(yb)
            it += 1
            bar.update(1)
        rec = {"epoch": epoch + 1, "train_loss": float(tl) / tn, "train_acc": int(tc) / tn,
               "seconds": prev_seconds + time.time() - t0}
        if args.eval_every and (epoch + 1) % args.eval_every == 0 and epoch + 1 < args.epochs:
            rec["test_acc"] = evaluate(model, sub.x_test, sub.y_test, vecs, head=args.head)
        history.append(rec)
        bar.set_postfix(ep=epoch + 1, loss=f"{rec['train_loss']:.3f}", acc=f"{100 * rec['train_acc']:.1f}",
                        refresh=False)
        if args.resume_every and ((epoch + 1) % args.resume_every == 0) and epoch + 1 < args.epochs:
            _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                          "epochs": args.epochs, "width": args.width, "arch": args.arch, "head": args.head,
                          "classes": classes,
                          "plan": plan, "generator": gen.get_state(), "history": history}, resume_p)
        if (epoch + 1) % args.log_every == 0 or epoch + 1 == args.epochs:
            bar.write(f"  {stem} epoch {epoch + 1}/{args.epochs}: loss {rec['train_loss']:.4f} "
                      f"train acc {100 * rec['train_acc']:.2f}% ({rec['seconds']:.0f}s)"
                      + (f" test acc {100 * rec['test_acc']:.2f}%" if "test_acc" in rec else ""))
            sys.stdout.flush()
    bar.close()
    train_seconds = time.time() - t0

    test_acc = evaluate(model, sub.x_test, sub.y_test, vecs, head=args.head)
    below = test_acc < ACC_FLAG
    state = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous().clone()
             for k, v in model.state_dict().items()}
    _atomic_save(state, final_p)
    images_this_run = (args.epochs - start_epoch) * len(sub.x_train)
    info = {
        "arch": args.arch,
        "head": args.head,
        "model": model_description(args.arch, args.width, out_dim_of(args.head, vecs_all)),
        "width": args.width,
        "pair": pair,
        "name": name,
        "classes": classes,
        "class_names": [cifar_data.CIFAR10_CLASSES[c] for c in classes],
        "init_seed": plan["init_seed"],
        "data_seed": plan["data_seed"],
        "split_seed": pair,
        "epochs": args.epochs,
        "iterations": total,
        "train_images": len(sub.x_train),
        "recipe": recipe_dict(args),
        "test_acc": test_acc,
        "test_acc_note": "5-way accuracy on the model's own classes, CIFAR-10 test set (JPEG copy), fp32",
        "below_90": below,
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "final_train_acc": history[-1]["train_acc"] if history else None,
        "history": history,
        "train_seconds_this_run": train_seconds,
        "train_images_per_second_this_run": images_this_run / train_seconds if train_seconds > 0 else None,
        "device": _device_name(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "command": "python benchmarks/train_cifar.py " + " ".join(args.argv),
        "checkpoint": final_p.name,
    }
    json_p.write_text(json.dumps(info, indent=2) + "\n")
    msg = (f"[done] {stem}: own-task test acc {100 * test_acc:.2f}% ({args.arch}x{args.width}, {args.epochs} ep, "
           f"{train_seconds:.0f}s, {info['train_images_per_second_this_run'] or 0:.0f} img/s)")
    if below:
        msg += f"  *** BELOW {100 * ACC_FLAG:.0f}% -- flagged in {json_p.name} ***"
    print(msg, flush=True)
    if not args.keep_resume and resume_p.exists():
        resume_p.unlink()
    return info


def benchmark(args: argparse.Namespace, data: cifar_data.CIFAR10, vecs_all: torch.Tensor) -> None:
    plan = model_plan(0)["A"]
    sub = data.subset(plan["classes"])
    dev: torch.device = args.device
    vecs = vecs_all[plan["classes"]].to(dev)
    torch.manual_seed(0)
    model = build_model(args.arch, args.width, out_dim_of(args.head, vecs_all)).to(
        dev, memory_format=torch.channels_last)
    opt = make_optimizer(model, args)
    for g in opt.param_groups:
        g["lr"] = args.lr * 0.1
    gen = torch.Generator().manual_seed(0)
    gpu = dev.type == "cuda"
    dd = DeviceData(sub.x_train, sub.y_train, dev) if gpu else None
    warm = 5 if gpu else 1

    def source():
        while True:
            if gpu:
                yield from dd.epoch(args.batch_size, gen)
            else:
                for xb, yb in cifar_data.batches(sub.x_train, sub.y_train, args.batch_size, True, True, gen):
                    yield xb.contiguous(memory_format=torch.channels_last), yb

    times = []
    t = time.perf_counter()
    for i, (xb, yb) in enumerate(source()):
        if i == warm + args.benchmark:
            break
        if i == warm:
            if gpu:
                torch.cuda.synchronize()
            t = time.perf_counter()
        with _autocast(args):
            emb = model(xb)
        loss = F.cross_entropy(head_logits(emb, vecs, args.head), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        opt.step()
        if not gpu and i >= warm:
            times.append(time.perf_counter() - t)
            t = time.perf_counter()
    if gpu:
        torch.cuda.synchronize()
        s = (time.perf_counter() - t) / args.benchmark
    else:
        s = float(np.mean(times))
    t = time.perf_counter()
    ev = evaluate(model, sub.x_test[:2000], sub.y_test[:2000], vecs, head=args.head)  # noqa: F841
    ev_s = time.perf_counter() - t
    ipe = math.ceil(len(sub.x_train) / args.batch_size)
    print(json.dumps({
        "arch": args.arch, "width": args.width, "device": _device_name(dev), "threads": torch.get_num_threads(),
        "batch_size": args.batch_size, "iterations_timed": args.benchmark, "seconds_per_iteration": s,
        "train_images_per_second": args.batch_size / s,
        "eval_images_per_second": 2000 / ev_s,
        "iterations_per_epoch": ipe, "seconds_per_epoch_5_classes": s * ipe,
        "gpu_max_memory_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if gpu else None,
    }, indent=2), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--arch", default="resnet20", choices=ARCHS)
    ap.add_argument("--head", default="clip", choices=["clip", "ce"],
                    help="clip: 384-d embedding scored by cosine to fixed class text vectors (the papers' CIFAR "
                         "setting); ce: an ordinary 5-way linear classifier over the model's own classes")
    ap.add_argument("--width", type=int, default=1)
    ap.add_argument("--pairs", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--models", nargs="+", default=["A", "B"], choices=["A", "B"])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--data", type=str, default=None,
                    help=f"CIFAR-10 .tar.gz or folder (train/<class>/*.jpg); default {DEFAULT_DATA} if it exists, "
                         "else the decoded cache, else torchvision download when online")
    ap.add_argument("--out", type=str, default=None,
                    help="output folder; default benchmarks/checkpoints/cifar10_{arch}x{width}")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--no-amp", dest="amp", action="store_false", help="cuda: train in fp32 instead of bf16 autocast")
    ap.add_argument("--optimizer", choices=["sgd", "adamw"], default=None, help="default: per arch (see docstring)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate; default per arch (0.4 SGD, 1e-3 ViT)")
    ap.add_argument("--momentum", type=float, default=None)
    ap.add_argument("--weight-decay", type=float, default=None)
    ap.add_argument("--clip-grad", type=float, default=None, help="gradient-norm clipping (0: off); default per arch")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--warmup", type=float, default=None, help="fraction of iterations of linear warm-up")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--eval-every", type=int, default=0, help="also report test accuracy every N epochs (0: end only)")
    ap.add_argument("--resume-every", type=int, default=1, help="write the resume file every N epochs (0: never)")
    ap.add_argument("--keep-resume", action="store_true", help="keep *_resume.pt after a model finishes")
    ap.add_argument("--log-every", type=int, default=1, help="print an epoch line every N epochs")
    ap.add_argument("--tqdm-interval", type=float, default=10.0, help="seconds between progress-bar refreshes")
    ap.add_argument("--no-bar", action="store_true", help="no progress bar (epoch lines only)")
    ap.add_argument("--max-train-images", type=int, default=0, help="smoke tests only: train on this many images")
    ap.add_argument("--benchmark", type=int, default=0, metavar="N", help="only time N iterations and exit")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for k, v in RECIPES[args.arch].items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    args.device = torch.device(args.device)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    suffix = "_ce" if args.head == "ce" else ""
    args.out = Path(args.out if args.out else HERE / "checkpoints" / f"cifar10_{args.arch}x{args.width}{suffix}")
    data_path = args.data if args.data else (str(DEFAULT_DATA) if DEFAULT_DATA.exists() else None)
    data = cifar_data.load_cifar10(data_path)
    vecs_all = class_vectors()

    if args.benchmark:
        benchmark(args, data, vecs_all)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"fxzip CIFAR-10 training: {args.arch} width {args.width}, pairs {args.pairs}, models {args.models}, "
          f"{args.epochs} epochs, {args.optimizer} lr {args.lr}, device {args.device}, "
          f"{torch.get_num_threads()} thread(s), out {args.out}", flush=True)
    summary = []
    for p in args.pairs:
        plan = model_plan(p)
        for name in args.models:
            info = train_one(args, data, vecs_all, p, name, plan[name])
            summary.append((f"pair{p}_{name}", info.get("test_acc"), info.get("below_90")))
    print("summary (own-task 5-way test accuracy):", flush=True)
    for stem, acc, below in summary:
        print(f"  {stem}: {100 * acc:.2f}%" + ("  BELOW 90%" if below else ""), flush=True)
    flagged = [s for s, _, b in summary if b]
    if flagged:
        print(f"WARNING: {len(flagged)} model(s) below 90% own-task accuracy: {flagged}", flush=True)


if __name__ == "__main__":
    main()
