"""A one-minute, offline ZipIt! demo on scikit-learn's 8x8 digits.

The setting is the papers' disjoint class split in miniature: digits 0-4 are
task A, digits 5-9 task B. Pairs of :func:`fxzip.zoo.small_cnn` models are
trained from different random initializations, each on its own task only,
then merged without any training by every method fxzip offers, and scored
with the papers' protocol (:mod:`fxzip.evaluate`): cost in multiply-adds,
joint accuracy (task unknown), per-task accuracy (task known) and their
average. The ensemble of both models is the upper bound.

Why several pairs: float rounding differs between CPU instruction sets, and
training amplifies it, so one pair's ranking of two close methods is noise
(ZipIt and Permute swapped places between AVX2 and AVX-512 machines). The
demo reports the mean and spread over pairs and calls a difference only when
it exceeds the pair-to-pair spread. ZipIt's alpha / beta are chosen as the
library recommends: on held-out training digits, never on the test digits.

Run it with ``fxzip demo`` (or ``python -m fxzip demo``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from fxzip.evaluate import Ensemble, EvalResult, count_macs, evaluate

TASKS: list[list[int]] = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
METHODS: list[tuple[str, str]] = [("W.Avg", "weight_average"), ("Permute", "permute"), ("ZipIt", "zipit")]
# Channels of small_cnn. At 16 the two halves barely fit into one model and
# every merge loses 20-40 points per task; at 32 the methods separate as in
# the papers (W.Avg far below, Permute/ZipIt within a few points of the
# ensemble) and the demo still runs in well under a minute.
WIDTH = 32
SPLIT_SEED = 0  # the train/test split never changes with --seed: only the models do


@dataclass
class DigitsData:
    """The digits as ``(N, 1, 8, 8)`` float images, standardized with train statistics."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_val: Tensor | None = None
    y_val: Tensor | None = None


def load_digits(test_fraction: float = 0.3, val_fraction: float = 0.0) -> DigitsData:
    """scikit-learn's bundled 8x8 digits (no download), with a fixed stratified
    split; ``val_fraction`` of the training digits are held out (not trained
    on) for choosing hyperparameters."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=SPLIT_SEED, stratify=y.numpy()
    )
    idx_val = idx_train[:0]
    if val_fraction > 0:
        idx_train, idx_val = train_test_split(idx_train, test_size=val_fraction, random_state=SPLIT_SEED,
                                              stratify=y.numpy()[idx_train])
    x_train, x_test, x_val = x[idx_train], x[idx_test], x[idx_val]
    mean, std = x_train.mean(), x_train.std()
    return DigitsData((x_train - mean) / std, y[idx_train], (x_test - mean) / std, y[idx_test],
                      (x_val - mean) / std if val_fraction > 0 else None, y[idx_val] if val_fraction > 0 else None)


def task_subset(x: Tensor, y: Tensor, task: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The samples of ``x, y`` whose label belongs to ``task``."""
    mask = torch.isin(y, torch.tensor(list(task)))
    return x[mask], y[mask]


def masked_cross_entropy(logits: Tensor, y: Tensor, task: Sequence[int]) -> Tensor:
    """Cross-entropy over the logits of ``task``'s classes only.

    Why masking keeps one shared label space: output unit ``c`` is always
    class ``c`` (the model has all 10 outputs), but a model trained on task A
    never sees digits 5-9, so a plain 10-way cross-entropy would teach it
    that classes 5-9 never occur and push their logits down. Restricting
    the softmax to the task's own logits means the other units get no
    gradient at all: unit ``c`` of model A and unit ``c`` of model B both
    mean "class c", and neither model has learned anything contradicting the
    other's classes (those rows simply keep their small random init). That
    is what lets a merge average the two classifier layers row by row (the
    model output is never permuted) and be scored over all 10 classes: the
    role the shared text embeddings play in the papers' CLIP-style training.
    """
    idx = torch.tensor(list(task), device=logits.device)
    target = torch.searchsorted(idx, y)  # class id -> position within the (sorted) task
    return F.cross_entropy(logits.index_select(1, idx), target)


def train_on_task(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    task: Sequence[int],
    epochs: int,
    seed: int,
    lr: float = 0.05,
    batch_size: int = 32,
    desc: str = "train",
) -> nn.Module:
    """SGD on one task's samples, in place; returns ``model`` in eval mode.

    One-cycle schedule (warm-up, then cosine decay), the small-scale version
    of the papers' warm-up + decay recipe; 30 epochs reach 99-100% on each
    task's own test digits.
    """
    x, y = task_subset(x, y, sorted(task))
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(y) // batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    bar = tqdm(range(epochs), desc=desc, leave=False, dynamic_ncols=True)
    for _ in bar:
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            loss = masked_cross_entropy(model(x[batch]), y[batch], sorted(task))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(batch)
        bar.set_postfix(loss=f"{total / len(y):.3f}")
    return model.eval()


def train_pair(data: DigitsData, seed: int, epochs: int, width: int = WIDTH) -> tuple[nn.Module, nn.Module]:
    """Model A on task A and model B on task B, from different initializations."""
    from fxzip.zoo import small_cnn

    models = []
    for t, task in enumerate(TASKS):
        torch.manual_seed(seed * 1000 + t)  # different init per model, reproducible per --seed
        model = small_cnn(out_dim=10, in_channels=1, width=width)
        desc = f"train model {chr(65 + t)}"
        models.append(train_on_task(model, data.x_train, data.y_train, task, epochs, seed * 1000 + t, desc=desc))
    return models[0], models[1]


GRID = [(alpha, beta) for alpha in (1.0, 0.3) for beta in (1.0, 0.5, 0.125)]
"""ZipIt alpha / beta tried on the held-out digits (a corner of the papers' grid)."""


@dataclass
class PairResult:
    """One trained pair: every method's test result and MACs, and ZipIt's
    held-out accuracy for every grid point. ``inputs`` keeps what the ZipIt
    row is merged from once the grid over all pairs has chosen."""

    rows: dict[str, tuple[int, EvalResult]]
    grid: dict[tuple[float, float], float]
    inputs: tuple | None = field(default=None, repr=False)


def run_pair(a: nn.Module, b: nn.Module, data: DigitsData, alpha_beta: tuple[float, float] | None = None
             ) -> PairResult:
    """Merge with every method and score every model. With ``alpha_beta`` None,
    ZipIt's grid is scored on the held-out digits (its test row is filled in by
    ``finish_pair`` once the grid over every pair has chosen)."""
    import fxzip

    calib = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=128, shuffle=False)
    test = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=256, shuffle=False)
    a = fxzip.reset_norm_stats(copy.deepcopy(a), calib)
    b = fxzip.reset_norm_stats(copy.deepcopy(b), calib)
    cal = fxzip.calibrate(a, b, data=calib, progress=False)
    example = data.x_test[:1]
    rows: dict[str, tuple[int, EvalResult]] = {}
    for name, model in [("Model A", a), ("Model B", b)]:
        rows[name] = (count_macs(model, example), evaluate(model, test, TASKS))
    for name, method in METHODS:
        if method == "zipit":
            continue  # after the grid (finish_pair)
        merged = fxzip.merge(a, b, data=cal, method=method, progress=False)
        rows[name] = (count_macs(merged, example), evaluate(merged, test, TASKS))
    grid = {}
    if data.x_val is not None:
        val = DataLoader(TensorDataset(data.x_val, data.y_val), batch_size=256, shuffle=False)
        for alpha, beta in GRID:
            merged = fxzip.merge(a, b, data=cal, method="zipit", alpha=alpha, beta=beta, progress=False)
            grid[(alpha, beta)] = evaluate(merged, val, TASKS).avg
    rows["Ensemble"] = (count_macs(Ensemble(a, b), example), evaluate(Ensemble(a, b), test, TASKS))
    return PairResult(rows, grid, (a, b, cal, test, example))


def finish_pair(pair: PairResult, alpha: float, beta: float) -> None:
    """ZipIt's test row at the chosen alpha / beta."""
    import fxzip

    a, b, cal, test, example = pair.inputs
    merged = fxzip.merge(a, b, data=cal, method="zipit", alpha=alpha, beta=beta, progress=False)
    rows = dict(pair.rows)
    ensemble = rows.pop("Ensemble")
    rows["ZipIt"] = (count_macs(merged, example), evaluate(merged, test, TASKS))
    rows["Ensemble"] = ensemble
    pair.rows, pair.inputs = rows, None


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return m, sd


def format_summary(pairs: Sequence[PairResult]) -> str:
    """The papers' table with mean ± std over pairs (percent)."""
    names = list(pairs[0].rows)
    header = ["Method", "MACs", "Joint", "Task A", "Task B", "Avg"]
    body = []
    for name in names:
        results = [p.rows[name][1] for p in pairs]
        cells = []
        for get in (lambda r: r.joint, lambda r: r.per_task[0], lambda r: r.per_task[1], lambda r: r.avg):
            m, sd = _mean_std([100 * get(r) for r in results])
            cells.append(f"{m:.1f} ± {sd:.1f}" if len(pairs) > 1 else f"{m:.1f}")
        body.append([name, f"{pairs[0].rows[name][0] / 1e6:.2f}M", *cells])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    fmt = lambda row: "  ".join(  # noqa: E731
        cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(header), "-" * len(fmt(header)), *(fmt(row) for row in body)])


def verdict(pairs: Sequence[PairResult], first: str, second: str) -> str:
    """``first`` against ``second`` on joint accuracy, paired over the pairs:
    a winner only when the mean difference exceeds its standard deviation."""
    diffs = [100 * (p.rows[first][1].joint - p.rows[second][1].joint) for p in pairs]
    m, sd = _mean_std(diffs)
    ahead = sum(d > 0 for d in diffs)
    head = f"{first} vs {second}: {m:+.1f} joint points (std {sd:.1f} over {len(pairs)} pairs; {first} ahead in " \
           f"{ahead} of {len(pairs)})"
    if len(pairs) < 2:
        return head + ": one pair cannot tell a difference from noise (use --pairs 3)"
    if abs(m) <= sd:
        return head + ": within the pair-to-pair spread, a tie"
    return head + f": {first if m > 0 else second} is better"


def run(seed: int = 0, epochs: int = 20, width: int = WIDTH, pairs: int = 3, verbose: bool = True
        ) -> list[PairResult]:
    """Train ``pairs`` pairs, choose ZipIt's alpha / beta on held-out digits,
    merge and evaluate; print the table of means and the verdicts."""
    start = time.perf_counter()
    data = load_digits(val_fraction=0.2)
    results = []
    for p in range(pairs):
        a, b = train_pair(data, seed * 100 + p, epochs, width)
        results.append(run_pair(a, b, data))
    scores = {ab: sum(r.grid[ab] for r in results) / len(results) for ab in GRID}
    alpha, beta = max(GRID, key=lambda ab: scores[ab])  # ties: first in grid order
    for r in results:
        finish_pair(r, alpha, beta)
    if verbose:
        print(f"digits 8x8: task A = classes 0-4, task B = classes 5-9; {len(data.y_train)} train / "
              f"{len(data.y_val)} held-out / {len(data.y_test)} test images; small_cnn width {width}, "
              f"{pairs} pairs (seeds {seed * 100}..{seed * 100 + pairs - 1}), {epochs} epochs")
        print(f"ZipIt alpha {alpha}, beta {beta}: best held-out avg accuracy over the grid "
              + ", ".join(f"{a_}/{b_} {100 * scores[(a_, b_)]:.1f}" for a_, b_ in GRID))
        print(format_summary(results))
        print(verdict(results, "ZipIt", "Permute"))
        print(verdict(results, "ZipIt", "W.Avg"))
        print(f"(accuracies in %, mean ± std over pairs; MACs per image; {time.perf_counter() - start:.1f}s)")
    return results
