"""A terminal transcript of ``fxzip inspect`` / ``merge`` / ``sweep`` as a user sees it (issue 13).

Builds the user's files in a work directory, trains the two models the README's
"Command line" transcript talks about, runs the commands as a user types them
(the venv's ``fxzip`` console script, in a pseudo-terminal so tqdm and the
progress lines behave as in a shell) and writes ``benchmarks/results/cli_transcript.md``
with every command's output and wall time, plus ``cli_transcript_sweep.png``.

The user's files (all offline, from scikit-learn's bundled 8x8 digits):

* ``train/0..9``: calibration images of all ten digits (the training split),
  32x32 RGB PNGs, one folder per digit as a user would keep them (``--max-batches``
  takes samples evenly spaced over the folder, so every digit is in the calibration);
* ``taskA/0..4``: held-out digits 0-4; ``taskB/5..9``: held-out digits 5-9
  (ImageFolder labels 0..4 in both);
* ``taskA.pth`` / ``taskB.pth``: ``timm.create_model("resnet18", num_classes=5)``
  trained (from different seeds) on the training split of digits 0-4 / 5-9, on
  tensors produced by the transform ``fxzip merge`` applies (timm's
  ``resolve_data_config`` + ``create_transform`` at ``--img-size 32``), saved
  as ``{"state_dict": ..., "epoch": n}`` like a training checkpoint. Cached in
  ``--workdir``: a re-run with the same work directory skips the training.

Usage::

    python benchmarks/cli_transcript.py                       # temp work dir, ~10 minutes on one core
    python benchmarks/cli_transcript.py --workdir /tmp/fxzip-cli   # keep (and reuse) the files
"""
from __future__ import annotations

import argparse
import datetime
import errno
import fcntl
import os
import platform
import pty
import re
import select
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SEED = 0
HELD_OUT = 0.3          # fraction of each digit held out for taskA/ taskB/
IMG = 32
COLUMNS = 110           # the pseudo-terminal's width

COMMANDS = [
    ("inspect", "fxzip inspect --model resnet18 --img-size 32"),
    ("merge (full zip)",
     "fxzip merge taskA.pth taskB.pth --model resnet18 --img-size 32 --data train/ --max-batches 10 --out merged/"),
    ("merge (partial zip, --stop-at 9)",
     "fxzip merge taskA.pth taskB.pth --model resnet18 --img-size 32 --data train/ --max-batches 10 "
     "--stop-at 9 --out partial/"),
    ("sweep",
     "fxzip sweep taskA.pth taskB.pth --model resnet18 --img-size 32 --data train/ --max-batches 10 "
     "--eval taskA/ taskB/ --methods zipit permute --alphas 0.3 0.5 --betas 0.125 --stop-at all --out sweep/"),
]

CHECK = '''\
import timm, torch
from torchvision.datasets import ImageFolder
from timm.data import resolve_data_config, create_transform

def accuracy(model, folder, head=None):
    tf = create_transform(**resolve_data_config({"input_size": (3, 32, 32)}, model=timm.create_model("resnet18")))
    data = torch.utils.data.DataLoader(ImageFolder(folder, transform=tf), batch_size=64)
    correct = total = 0
    with torch.no_grad():
        for x, y in data:
            out = model(x)
            out = out if head is None else out[head]
            correct += int((out.argmax(1) == y).sum()); total += len(y)
    return correct / total

full = timm.create_model("resnet18", num_classes=5, checkpoint_path="merged/model.safetensors").eval()
print(f"merged/model.safetensors (timm resnet18, one 5-logit output shared by both tasks): "
      f"taskA {accuracy(full, 'taskA/'):.3f}, taskB {accuracy(full, 'taskB/'):.3f}")
partial = torch.export.load("partial/model.pt2").module()
print(f"partial/model.pt2 (torch.export): head 0 on taskA {accuracy(partial, 'taskA/', 0):.3f}, "
      f"head 1 on taskB {accuracy(partial, 'taskB/', 1):.3f}")
'''


# ---------------------------------------------------------------- the user's files

def build_images(workdir: Path) -> dict:
    """train/, taskA/ and taskB/ (class folders); returns the training split."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(SEED)
    train_idx, held_idx = [], []
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == d))
        n_held = int(round(HELD_OUT * len(idx)))
        held_idx += idx[:n_held].tolist()
        train_idx += idx[n_held:].tolist()
    train_idx = rng.permutation(train_idx).tolist()   # the training order

    def image(i: int):
        gray = (digits.images[i] / 16.0 * 255.0).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").resize((IMG, IMG), Image.BILINEAR).convert("RGB")

    stamp = workdir / ".images_v2"  # v2: train/ in class folders
    if not stamp.exists():
        for name in ("train", "taskA", "taskB"):
            shutil.rmtree(workdir / name, ignore_errors=True)
        for i in train_idx:
            folder = workdir / "train" / str(int(digits.target[i]))
            folder.mkdir(parents=True, exist_ok=True)
            image(i).save(folder / f"{i:04d}.png")
        for i in held_idx:
            d = int(digits.target[i])
            folder = workdir / ("taskA" if d < 5 else "taskB") / str(d)
            folder.mkdir(parents=True, exist_ok=True)
            image(i).save(folder / f"{i:04d}.png")
        stamp.write_text("done\n")
    return {"train": [(image(i), int(digits.target[i])) for i in train_idx],
            "held": [(image(i), int(digits.target[i])) for i in held_idx],
            "n_train": len(train_idx), "n_held": len(held_idx)}


def cli_transform():
    """The transform ``fxzip merge --model resnet18 --img-size 32`` applies (fxzip/cli/images.py)."""
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("resnet18", pretrained=False, num_classes=5)
    channels = resolve_data_config({}, model=model)["input_size"][0]
    config = resolve_data_config({"input_size": (channels, IMG, IMG)}, model=model)
    return create_transform(**config, is_training=False), config


def tensors(pairs, digits, offset, transform):
    xs = [transform(img) for img, d in pairs if d in digits]
    ys = [d - offset for img, d in pairs if d in digits]
    return torch.stack(xs), torch.tensor(ys)


@torch.no_grad()
def evaluate(model, x, y) -> float:
    model.eval()
    return float(sum(int((model(x[i:i + 256]).argmax(1) == y[i:i + 256]).sum()) for i in range(0, len(x), 256))
                 / len(x))


def train_model(path: Path, data: dict, digits: range, seed: int, transform, log, epochs: int = 8,
                target: float = 0.95, max_seconds: float = 90.0) -> dict:
    """Train (or read back) one resnet18 on ``digits``; returns its record."""
    import timm

    x, y = tensors(data["train"], digits, digits.start, transform)
    xv, yv = tensors(data["held"], digits, digits.start, transform)
    if path.exists():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = timm.create_model("resnet18", pretrained=False, num_classes=5)
        model.load_state_dict(ckpt["state_dict"])
        record = {"epochs": int(ckpt["epoch"]), "seconds": float(ckpt.get("seconds", 0.0)), "cached": True}
    else:
        torch.manual_seed(seed)
        model = timm.create_model("resnet18", pretrained=False, num_classes=5)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
        steps = epochs * ((len(x) + 63) // 64)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.2)
        gen = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        epoch = 0
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), 64):
                b = order[i:i + 64]
                loss = torch.nn.functional.cross_entropy(model(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            acc = evaluate(model, xv, yv)
            log(f"  {path.name} epoch {epoch}: loss {loss.item():.3f}, held-out accuracy {acc:.3f} "
                f"({time.perf_counter() - start:.0f}s)")
            if time.perf_counter() - start > max_seconds:
                break
        record = {"epochs": epoch, "seconds": time.perf_counter() - start, "cached": False}
        torch.save({"state_dict": model.state_dict(), "epoch": epoch, "seconds": record["seconds"],
                    "digits": list(digits), "seed": seed}, path)
    record["train_accuracy"] = evaluate(model, x, y)
    record["heldout_accuracy"] = evaluate(model, xv, yv)
    record["n_train"], record["n_held"] = len(x), len(xv)
    log(f"{path.name}: digits {digits.start}-{digits.stop - 1}, {record['epochs']} epochs"
        + (" (cached)" if record["cached"] else f" in {record['seconds']:.0f}s")
        + f", accuracy train {record['train_accuracy']:.3f}, held-out {record['heldout_accuracy']:.3f}")
    return record


# ---------------------------------------------------------------- running commands in a terminal

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BAR_KEY = re.compile(r"^([^:\[]{1,60}):\s")


def run_in_terminal(argv: list[str], cwd: Path, env: dict) -> tuple[int, str, float]:
    """Run ``argv`` with stdout and stderr on one pseudo-terminal (as in a shell);
    returns (exit status, raw output, wall seconds)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, COLUMNS, 0, 0))
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    break
                raise
            if not data:
                break
            chunks.append(data)
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        elif proc.poll() is not None:
            break
    rc = proc.wait()
    seconds = time.perf_counter() - start
    os.close(master)
    return rc, b"".join(chunks).decode("utf-8", "replace"), seconds


def readable(raw: str) -> str:
    """Terminal output without progress redraws: each line's carriage-return
    segments are kept as separate lines, except that consecutive redraws of one
    tqdm bar keep only their last state, and blanked-out (cleared) bars vanish."""
    text = ANSI.sub("", raw.replace("\r\n", "\n"))
    lines = []
    for line in text.split("\n"):
        kept: list[str] = []
        for seg in line.split("\r"):
            if not seg.strip():
                continue
            m, prev = BAR_KEY.match(seg), BAR_KEY.match(kept[-1]) if kept else None
            if m and prev and m.group(1) == prev.group(1):
                kept[-1] = seg.rstrip()
            else:
                kept.append(seg.rstrip())
        lines += kept if kept else [""]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def tree(path: Path) -> list[str]:
    if not path.is_dir():
        return ["(missing)"]
    return [f"{p.relative_to(path)}  ({p.stat().st_size / 1024:.1f} KiB)" for p in sorted(path.rglob("*"))
            if p.is_file()]


def machine_line() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--short", "fxzip/"], cwd=ROOT, capture_output=True,
                           text=True).stdout.split("\n")
    import timm

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "head": head,
            "dirty": [d.strip() for d in dirty if d.strip()]}


# ---------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the user's files go (default: a temporary directory); reused on re-runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "cli_transcript.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and OMP_NUM_THREADS for fxzip")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fxzip-cli-")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    load_start = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    machine = machine_line()

    log(f"work directory: {workdir}")
    t = time.perf_counter()
    data = build_images(workdir)
    transform, config = cli_transform()
    log(f"images: {data['n_train']} in train/, {data['n_held']} held out in taskA/ taskB/ "
        f"({time.perf_counter() - t:.1f}s)")
    records = {
        "taskA.pth": train_model(workdir / "taskA.pth", data, range(0, 5), 1, transform, log),
        "taskB.pth": train_model(workdir / "taskB.pth", data, range(5, 10), 2, transform, log),
    }

    bindir = Path(sys.executable).parent
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(args.threads), "COLUMNS": str(COLUMNS), "TERM": env.get("TERM", "xterm"),
                "PATH": f"{bindir}{os.pathsep}{env.get('PATH', '')}"})
    env.pop("FXZIP_DEBUG", None)
    runs = []
    for title, command in COMMANDS:
        out_dir = next((a for a in command.split() if a.endswith("/") and a not in ("train/", "taskA/", "taskB/")),
                       None)
        if out_dir:
            shutil.rmtree(workdir / out_dir, ignore_errors=True)
        log(f"\n$ {command}")
        rc, raw, seconds = run_in_terminal(shlex.split(command), workdir, env)
        log(f"-> exit {rc}, {seconds:.1f}s")
        runs.append({"title": title, "command": command, "rc": rc, "seconds": seconds, "text": readable(raw),
                     "files": tree(workdir / out_dir) if out_dir else None, "out": out_dir})
    (workdir / "check.py").write_text(CHECK)
    log("\n$ python check.py")
    rc, raw, seconds = run_in_terminal([sys.executable, "check.py"], workdir, env)
    log(f"-> exit {rc}, {seconds:.1f}s")
    runs.append({"title": "load the results (timm, torch.export)", "command": "python check.py", "rc": rc,
                 "seconds": seconds, "text": readable(raw), "files": None, "out": None, "source": CHECK})

    png = workdir / "sweep" / "sweep.png"
    if png.exists():
        shutil.copyfile(png, RESULTS / "cli_transcript_sweep.png")
    load_end = os.getloadavg()
    write_markdown(args.out, machine, load_start, load_end, started, data, records, runs, config, png.exists(),
                   args.threads)
    log(f"\nwrote {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if all(r["rc"] == 0 for r in runs) else 1


def write_markdown(path: Path, machine: dict, load_start, load_end, started, data, records, runs, config,
                   have_png: bool, threads: int) -> None:
    fmt = lambda load: " / ".join(f"{v:.2f}" for v in load)  # noqa: E731
    dirty = (f" (working tree: uncommitted changes to {', '.join(machine['dirty'])})" if machine["dirty"] else "")
    lines = [
        "# `fxzip` on the command line: a terminal transcript",
        "",
        "Written by `python benchmarks/cli_transcript.py` (issue 13); re-run it to regenerate this file and",
        "`cli_transcript_sweep.png`. Two timm `resnet18` (5 classes each) trained on the 8x8 digits",
        "upscaled to 32x32 RGB, A on digits 0-4 and B on digits 5-9, merged with the commands a user types.",
        "",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, "
        f"torch {machine['torch']}, timm {machine['timm']}",
        f"- fxzip at `{machine['head']}`{dirty}",
        f"- started {started:%Y-%m-%d %H:%M} UTC; load average (1/5/15 min) {fmt(load_start)} at the start, "
        f"{fmt(load_end)} at the end. **Other jobs (a test suite, a benchmark) shared these cores**, so the",
        "  wall times below are upper bounds of what an idle machine gives.",
        f"- every command ran with `OMP_NUM_THREADS={threads}` (one torch thread) in a pseudo-terminal",
        f"  ({COLUMNS} columns), stdout and stderr together, as in a shell; tqdm's carriage-return redraws",
        "  are reduced to each bar's last state, nothing else is changed. Bars that clear themselves when",
        "  done (`fxzip match`, `fxzip reset norms`) are kept at their last drawn state, which can be short",
        "  of 100% (tqdm redraws at most every 0.1 s); in a real terminal they vanish.",
        "",
        "## The user's files",
        "",
        "From scikit-learn's bundled digits (`load_digits`, 1797 8x8 images; nothing is downloaded), upscaled",
        f"(bilinear) to 32x32 RGB PNG. Seed {SEED}; {int(HELD_OUT * 100)}% of each digit held out.",
        "",
        f"- `train/0..9`: {data['n_train']} calibration images of all ten digits (the training split), one",
        "  folder per digit; `--max-batches 10` takes 320 of them evenly spaced over the folder, so every",
        "  digit is in the calibration.",
        f"- `taskA/0..4`, `taskB/5..9`: the {data['n_held']} held-out images, one folder per class",
        "  (ImageFolder labels 0..4 in both).",
        "- `taskA.pth`, `taskB.pth`: `timm.create_model(\"resnet18\", num_classes=5, pretrained=False)`, trained",
        "  from seeds 1 / 2 with AdamW + one-cycle (lr 2e-3, batch 64) on the training split of their",
        "  digits, on tensors made by the transform `fxzip merge --img-size 32` applies",
        f"  (`resolve_data_config` + `create_transform`: resize to {int(IMG / config['crop_pct'])}, center crop "
        f"{IMG}, mean {tuple(round(m, 3) for m in config['mean'])}, std "
        f"{tuple(round(s, 3) for s in config['std'])}); saved as",
        "  `{\"state_dict\": ..., \"epoch\": n, ...}` like a training checkpoint.",
        "",
        "| checkpoint | digits | train images | epochs | training time | train acc | held-out acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in records.items():
        digits = "0-4" if name == "taskA.pth" else "5-9"
        when = "cached" if r["cached"] and not r["seconds"] else f"{r['seconds']:.0f}s" + (
            " (cached)" if r["cached"] else "")
        lines.append(f"| `{name}` | {digits} | {r['n_train']} | {r['epochs']} | {when} | "
                     f"{r['train_accuracy']:.3f} | {r['heldout_accuracy']:.3f} ({r['n_held']} images) |")
    lines += ["", "## Wall times", "", "| command | exit | wall time |", "|---|---|---|"]
    for r in runs:
        lines.append(f"| `{r['command']}` | {r['rc']} | {r['seconds']:.1f}s |")
    lines += ["", "(wall clock from starting the process to its exit, including Python and torch start-up)", ""]
    for r in runs:
        lines += [f"## {r['title']}", ""]
        if r.get("source"):
            lines += ["`check.py`:", "", "```python", r["source"].rstrip(), "```", ""]
        lines += ["```", f"$ {r['command']}", r["text"], "```", "",
                  f"exit status {r['rc']}, wall time **{r['seconds']:.1f}s**.", ""]
        if r["files"] is not None:
            lines += [f"`{r['out']}` holds:", ""] + [f"- `{f}`" for f in r["files"]] + [""]
        if r["title"] == "sweep" and have_png:
            lines += ["`sweep/sweep.png` (copied to `cli_transcript_sweep.png`):", "",
                      "![fxzip sweep: accuracy versus layers zipped](cli_transcript_sweep.png)", ""]
    path.write_text("\n".join(lines).rstrip() + "\n")


if __name__ == "__main__":
    sys.exit(main())
