"""What ``fxzip merge``, ``inspect`` and ``sweep`` do (the argument parsing is in ``fxzip.cli.parser``).

Every argument is checked before any model is built or image decoded, so a
typo costs a second; errors are raised as ``UsageError`` and printed without a
traceback by ``fxzip.cli.main``.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

__all__ = ["UsageError", "run_merge", "run_inspect", "run_sweep", "merge_defaults", "parse_stop_at", "merge_device",
           "merged_width_arg", "check_merge_options"]


class UsageError(ValueError):
    """A command-line argument that cannot work, with the fix in the message."""


def merge_defaults() -> dict[str, Any]:
    """``fxzip.merge``'s keyword defaults (the CLI's defaults follow them)."""
    from ..merge import merge

    return {k: p.default for k, p in inspect.signature(merge).parameters.items()
            if p.default is not inspect.Parameter.empty}


def parse_stop_at(value: str | None) -> int | str | None:
    """``--stop-at``: an int k (weight layers zipped) or a cut point's name."""
    if value is None:
        return None
    return int(value) if value.lstrip("-").isdigit() else value


def merged_width_arg(entries: list[tuple[str | None, float]] | None) -> float | dict[str, float]:
    """``--merged-width`` entries ((None or a space's name, W), from the parser)
    as ``merge``'s ``merged_width``: one factor for every space, or a dict of
    the spaces named (the others stay at 1.0). The numbers themselves are the
    library's to check (``check_merge_options``)."""
    if not entries:
        return merge_defaults()["merged_width"]
    bare = [w for name, w in entries if name is None]
    named = [(name, w) for name, w in entries if name is not None]
    if bare and named:
        raise UsageError("--merged-width takes one factor W for every space, or NAME=W entries for the spaces "
                         "to widen (the others stay at 1.0), not both")
    if len(bare) > 1:
        raise UsageError(f"--merged-width W was given {len(bare)} times ({', '.join(f'{w:g}' for w in bare)}); give "
                         "one factor for every space, or NAME=W per space (fxzip sweep takes several)")
    if bare:
        return bare[0]
    widths: dict[str, float] = {}
    for name, w in named:
        if name in widths:
            raise UsageError(f"--merged-width names the space {name!r} twice")
        widths[name] = w
    return widths


def check_merge_options(models: list[Any], **options: Any) -> None:
    """The library's own checks of ``merge``'s options (``MergeOptions.checked``:
    the method, alpha/beta, refit, repair, merged_width, probes, with the
    models), run on the built models before any data is read, so that a bad
    combination fails with the library's message before any calibration work.
    Options not given are ``merge``'s defaults; the command line always has
    data."""
    from ..options import MergeOptions

    wanted = inspect.signature(MergeOptions.checked).parameters
    kwargs = {k: v for k, v in merge_defaults().items() if k in wanted}
    kwargs.update(options, progress=False)
    MergeOptions.checked(models, "--data", **kwargs)


def merge_device(name: str) -> Any:
    """``--device`` as a ``torch.device``; under torchrun a CUDA device is this
    rank's ``cuda:LOCAL_RANK``."""
    import os

    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is visible to this process; use --device cpu")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: fxzip merge runs on cpu or cuda")
    return device


class _Say:
    """Progress lines on stderr (results go to stdout), silent with --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


def check_grid_args(args: argparse.Namespace) -> None:
    """``fxzip sweep``'s grid axes: every method a method, every alpha / beta in [0, 1]."""
    from ..matching import MATCHERS
    from ..options import DUAL_SPACE

    methods = sorted(MATCHERS) + sorted(DUAL_SPACE)
    for method in args.methods:
        if method not in methods:
            raise UsageError(f"--methods {method!r} is not a method; choose from {', '.join(methods)}")
    for name, values in (("alphas", args.alphas), ("betas", args.betas)):
        if any(not 0.0 <= v <= 1.0 for v in values):
            raise UsageError(f"--{name} must be in [0, 1], got {values}")


def grid_axes(args: argparse.Namespace) -> list[Any]:
    """``fxzip sweep``'s axes as the grid takes them (in place; duplicates dropped):
    --refit as ridges or None, --repair as booleans; returns the --stop-at values
    (None: the full zip). Checks --eval-max."""
    if args.eval_max is not None and args.eval_max < 1:
        raise UsageError(f"--eval-max must be at least 1, got {args.eval_max}")
    args.refit = list(dict.fromkeys(_ridge_of(v) for values in args.refit for v in values))
    args.repair = {"off": [False], "on": [True], "both": [False, True]}[args.repair]
    args.merged_widths = list(dict.fromkeys(args.merged_widths))
    args.probes = list(dict.fromkeys(args.probes))
    return [None if s == "full" else "all" if s == "all" else parse_stop_at(s) for s in args.stop_at_values]


def check_method_args(args: argparse.Namespace) -> None:
    """The checks every ``fxzip merge`` shares, whatever the checkpoints: their
    count, the sizes, the method and alpha / beta."""
    from ..matching import MATCHERS
    from ..options import DUAL_SPACE

    if len(args.checkpoints) < 2:
        raise UsageError(f"fxzip merge needs at least two checkpoints, got {len(args.checkpoints)}")
    for name in ("img_size", "batch_size", "max_batches"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    methods = sorted(MATCHERS) + sorted(DUAL_SPACE)
    if args.method not in methods:
        raise UsageError(f"--method {args.method!r} is not a method; choose one of {', '.join(methods)}")
    for name in ("alpha", "beta"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UsageError(f"--{name} must be in [0, 1], got {getattr(args, name)}")


def _check_merge_args(args: argparse.Namespace) -> list[int | None]:
    """Everything that can be checked without building a model; returns the
    number of classes per checkpoint (None: read from the checkpoint)."""
    from .checkpoints import CHECKPOINT_SUFFIXES, check_model_name
    from .images import check_crop_options, check_data_path

    check_method_args(args)
    if getattr(args, "dtype", None) is not None:
        raise UsageError("--dtype is for Hugging Face save_pretrained folders; a state_dict checkpoint is merged in "
                         "the dtype of the model --model builds")
    if args.model is None:
        raise UsageError("--model NAME is required for state_dict checkpoints (a timm model name, or "
                         "module.path:factory for your own code); a Hugging Face save_pretrained folder names its "
                         "own architecture and needs none")
    for ckpt in args.checkpoints:
        p = Path(ckpt)
        if not p.is_file():
            raise UsageError(f"checkpoint {ckpt}: no such file")
        if not p.name.lower().endswith(CHECKPOINT_SUFFIXES):
            raise UsageError(f"checkpoint {ckpt}: unknown format; fxzip reads state_dict files "
                             f"({', '.join(CHECKPOINT_SUFFIXES)})")
    n = len(args.checkpoints)
    classes = args.num_classes
    if classes is not None and len(classes) not in (1, n):
        raise UsageError(f"--num-classes takes one value for all {n} checkpoints or one per checkpoint, "
                         f"got {len(classes)}")
    if classes is not None and any(c < 0 for c in classes):
        raise UsageError("--num-classes must not be negative")
    if args.out is not None:
        _check_out(args)
    check_model_name(args.model)
    check_data_path(args.data)
    check_crop_options(args.crop_pct, args.crop_mode, args.interpolation)
    return list(classes) * (n if len(classes) == 1 else 1) if classes is not None else [None] * n


def load_models(model: str, checkpoints: list[str], classes: list[int | None], img_size: int | None,
                say: Any = print, strip: str | None = None) -> tuple[list[Any], list[Any]]:
    """Build one model per checkpoint and load it strictly; ``classes[k]`` None
    reads the classifier's size from checkpoint k (timm models)."""
    from ..model_spec import WRAPPER_PREFIXES, ModelSpec, build_model, load_into, wrapper_prefix
    from ..options import check_finite
    from .checkpoints import classifier_classes, read_state_dict, strip_prefix

    read = []  # every file is read (and refused) before any model is built
    for path in checkpoints:
        state, entry = read_state_dict(path)
        read.append((strip_prefix(state, strip, path) if strip else state, entry))
    models, specs = [], []
    for path, n_cls, (state, entry) in zip(checkpoints, classes, read):
        say(f"{path}: {len(state)} tensors" + (f" from the checkpoint's {entry!r} entry" if entry else ""))
        if n_cls is None and ":" not in model:
            import timm.models

            names = timm.models.get_pretrained_cfg_value(model, "classifier") or ()
            names = [names] if isinstance(names, str) else list(names)
            found = [int(state[f"{p}{c}.weight"].shape[0]) for c in names for p in ("",) + WRAPPER_PREFIXES
                     if f"{p}{c}.weight" in state]  # a wrapper's prefix is removed by load_into
            if found:
                n_cls = found[0]
                say(f"{path}: {n_cls} classes (the size of its {names[0]}.weight; --num-classes overrides)")
        spec = ModelSpec(model, n_cls, img_size, library=None if ":" in model else "timm")
        net = build_model(spec)
        if n_cls is None:
            n_cls = classifier_classes(net, state)
            spec.num_classes = n_cls
        prefix = wrapper_prefix(state, net.state_dict())
        if prefix:
            say(f"{path}: every key starts with {prefix!r} (a wrapper's) and the model's do not: removed")
        models.append(load_into(net, state, path))
        check_finite(models[-1], f"checkpoint {path}")  # NaN would only fail later, deep in the matcher
        specs.append(spec)
    return models, specs


def _out_kind(args: argparse.Namespace) -> Any:
    from ..result_dir import MERGE, SWEEP

    return SWEEP if getattr(args, "command", "merge") == "sweep" else MERGE


def _check_out(args: argparse.Namespace) -> None:
    """``--out``: not a file; can be created; empty, an earlier result of this
    command, or ``--overwrite``; holds none of the inputs (``fxzip.result_dir``)."""
    from ..result_dir import check

    inputs = [*args.checkpoints, args.data, *(getattr(args, "eval", None) or [])]
    check(args.out, _out_kind(args), overwrite=getattr(args, "overwrite", False), protect=inputs)


@contextlib.contextmanager
def _out_lock(args: argparse.Namespace) -> Iterator[None]:
    """Hold ``--out``'s lock from the argument checks until the files are in
    place: a second command writing to the same ``--out`` fails at once. Cleans
    up what an interrupted run left there first. Under torchrun only rank 0
    (the writer) takes it."""
    from ..distributed import is_main
    from ..result_dir import lock, recover

    if args.out is None or not is_main():
        yield
        return
    with lock(args.out):
        for sentence in recover(args.out):
            print(f"fxzip {getattr(args, 'command', 'merge')}: {sentence}", file=sys.stderr)
        _check_out(args)
        yield


def run_merge(args: argparse.Namespace) -> int:
    """``fxzip merge``: checkpoints + images -> a merged model in ``--out``
    (Hugging Face folders + text: ``fxzip.cli.pretrained``)."""
    classes = _check_merge_args(args)
    args.merged_width = merged_width_arg(args.merged_width)
    with _out_lock(args):
        return _merge_and_save(args, classes)


def _merge_and_save(args: argparse.Namespace, classes: list[int | None]) -> int:
    """``fxzip merge`` after the argument checks, holding ``--out``'s lock."""
    say = _Say(args.quiet)
    import torch

    from ..distributed import is_main, sum_across_ranks, world_size
    from ..io import save
    from ..merge import merge
    from ..version import __version__
    from .images import open_data

    torch.manual_seed(args.seed)
    stop_at = parse_stop_at(args.stop_at)
    processes = world_size()
    if not is_main():  # several processes (torchrun): rank 0 speaks and writes
        say = _Say(quiet=True)
    say(f"fxzip {__version__}: building {len(args.checkpoints)} x {args.model}")
    models, specs = load_models(args.model, args.checkpoints, classes, args.img_size, say,
                                 strip=args.strip_prefix)
    device = merge_device(getattr(args, "device", "cpu"))
    models = [m.to(device) for m in models]
    options = merge_options(args)
    check_merge_options(models, **options)  # the library's message for a bad combination, before any data
    to_device = None if device.type == "cpu" else (lambda batch: batch.to(device, non_blocking=True))
    with open_data(args.data, models[0], args.img_size, args.batch_size, **_data_options(args)) as source:
        say(f"data: {source.description}")
        spread = source.spread(args.max_batches, processes)
        if spread:
            say(spread)
        say(merging_line(args, stop_at, processes))
        loader, max_batches = _calibration_loader(source, args.batch_size, args.max_batches)
        result = merge(*models, data=loader, stop_at=stop_at, reset_bn=False if args.no_reset_bn else None,
                       max_batches=max_batches, progress=not args.quiet, seed=args.seed, inputs=to_device,
                       **options)
        input_size = list(source.config["input_size"])
        transform = {k: source.config.get(k) for k in ("crop_pct", "crop_mode", "interpolation")}
        skipped = source.skipped_summary()  # under torchrun: every rank's count, rank 0's names
        skipped["skipped_files"] = sum_across_ranks(skipped["skipped_files"])
        example = next(iter(source.loader()))[:1].to(device)
    if not is_main():
        return 0
    report = result.meta["fxzip"]
    report.settings = {
        "command": "fxzip merge", "model": args.model, "checkpoints": [str(c) for c in args.checkpoints],
        "num_classes": [s.num_classes for s in specs], "img_size": args.img_size, "input_size": input_size,
        "data": str(args.data), "method": args.method, "alpha": args.alpha, "beta": args.beta,
        "stop_at": stop_at, "refit": args.refit, "repair": args.repair, "merged_width": args.merged_width,
        "probes": args.probes, "max_memory": args.max_memory, "cache_dtype": args.cache_dtype,
        "batch_size": args.batch_size,
        "max_batches": args.max_batches, "reset_bn": not args.no_reset_bn, "seed": args.seed, "processes": processes, "device": device.type,
        **transform, "strict_data": args.strict_data, **skipped,
    }
    _say_data_notes(report, skipped, args.quiet)
    say(f"saving to {args.out}")
    same = all(s == specs[0] for s in specs)
    cuts = None
    if same:  # one architecture: the cut points' costs (cuts.png), written with the result
        def cuts(folder: Path) -> None:
            _cut_costs(models[0], example, report, folder, len(models), say)
    out = save(result, args.out, model=specs[0] if same else None, overwrite=getattr(args, "overwrite", False),
               extra_files=cuts)
    if not args.quiet:
        print(report.table())
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out}: {', '.join(files)}")
    if (out / "model.safetensors").exists() and ":" not in args.model:
        kw = f", img_size={specs[0].img_size}" if specs[0].img_size else ""
        print(f"load it: timm.create_model({args.model!r}, num_classes={specs[0].num_classes}{kw}, "
              f"checkpoint_path={str(out / 'model.safetensors')!r})")
    elif (out / "model.pt2").exists():
        print(f"load it: torch.export.load({str(out / 'model.pt2')!r}).module()(x)  "
              f"-> {report.n_models} outputs, one per model")
    return 0


def merge_options(args: argparse.Namespace) -> dict[str, Any]:
    """``fxzip.merge``'s options from ``fxzip merge``'s arguments."""
    return {"method": args.method, "alpha": args.alpha, "beta": args.beta, "refit": args.refit,
            "repair": args.repair, "merged_width": args.merged_width, "probes": args.probes,
            "max_memory": args.max_memory, "cache_dtype": args.cache_dtype}


def merging_line(args: argparse.Namespace, stop_at: Any, processes: int) -> str:
    """The progress line that says how ``fxzip merge`` merges."""
    return (f"merging with {args.method} (alpha {args.alpha}, beta {args.beta}"
            + (f", stop at {stop_at!r}" if stop_at is not None else "")
            + _describe_options(args.refit, args.repair, args.merged_width, args.probes, args.max_memory,
                                args.cache_dtype)
            + (", batch-norm statistics kept" if getattr(args, "no_reset_bn", False) else "")
            + (f", {processes} processes, batch i on rank i % {processes}" if processes > 1 else "") + ")")


def _describe_options(refit: Any, repair: bool, merged_width: Any, probes: str, max_memory: int | None = None,
                      cache_dtype: str | None = None) -> str:
    """The progress line's words for the options that are not merge's defaults."""
    from ..passes.refit import DEFAULT_RIDGE

    words = []
    if max_memory is not None:
        words.append(f"at most {_mib(max_memory)} of cached activations"
                     + ("" if refit is not False or repair else " (unused: only --refit and --repair cache)"))
    if cache_dtype is not None:
        words.append(f"cached activations in {cache_dtype}"
                     + ("" if refit is not False or repair else " (unused: only --refit and --repair cache)"))
    if refit is not False:
        words.append(f"refit (ridge {DEFAULT_RIDGE if refit is True else refit:g})")
    if repair:
        words.append("repair")
    if isinstance(merged_width, dict):
        words.append("merged width " + ", ".join(f"{name}={w:g}" for name, w in merged_width.items()))
    elif merged_width != 1.0:
        words.append(f"merged width {merged_width:g}")
    if probes != merge_defaults()["probes"]:
        words.append(f"probes {probes}")
    return "".join(f", {w}" for w in words)


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.4g} MiB"


def _calibration_loader(source: Any, batch_size: int, max_batches: int | None) -> tuple[Any, int | None]:
    """``source``'s loader and the ``max_batches`` to pass to merge. Under
    torch.distributed this rank's shard: the batches one process reads (at most
    ``max_batches``), batch i on rank i % world_size (no shuffling, no repeated
    samples: the merge is one process's on the same batches)."""
    from ..distributed import shard_batches, world_size

    if world_size() == 1:
        return source.loader(), max_batches
    sampler = shard_batches(len(source.dataset), batch_size, max_batches)
    return source.loader(batch_sampler=sampler), None


def _data_options(args: argparse.Namespace) -> dict[str, Any]:
    """``open_data``'s keywords from --crop-pct, --crop-mode, --interpolation and --strict-data."""
    return {"crop_pct": args.crop_pct, "crop_mode": args.crop_mode, "interpolation": args.interpolation,
            "strict": args.strict_data}


def _say_data_notes(report: Any, skipped: dict[str, Any], quiet: bool = False) -> None:
    """On stderr, even with --quiet: the files left out of the calibration, and
    (fxzip merge --quiet; without it the report's table says it) that the
    models' output layers were averaged."""
    if skipped["skipped_files"]:
        n = skipped["skipped_files"]
        print(f"fxzip: note: {n} file{'s' if n > 1 else ''} of --data could not be decoded and "
              f"{'were' if n > 1 else 'was'} skipped (first: {', '.join(skipped['skipped_examples'][:3])}); "
              "--strict-data fails instead", file=sys.stderr)
    averaged = getattr(report, "outputs_averaged", None)
    if averaged and quiet:
        print(f"fxzip: note: {averaged}", file=sys.stderr)


def _cut_costs(model: Any, example: Any, report: Any, out: Path, n_models: int, say: Any) -> None:
    """Write ``cuts.png`` (MACs of a partial zip at every cut point) into ``out``,
    the result's temporary folder (``fxzip.save``'s ``extra_files``): it is
    part of the result, in place with it or not at all."""
    from ..trace import trace
    from .inspection import inspect_graph, plot_cuts

    found = inspect_graph(str(report.settings.get("model", "")), trace(model, example), (example,))
    chosen = getattr(report.cut, "name", None)
    if found.error is None and plot_cuts(found, n_models, out / "cuts.png", chosen):
        say(f"cut points: {len(found.cuts)} (cuts.png)")


def run_inspect(args: argparse.Namespace) -> int:
    """``fxzip inspect``: what fxzip sees in a model before any data."""
    from .checkpoints import check_model_name
    from .inspection import inspect_model

    if args.img_size is not None and args.img_size < 1:
        raise UsageError(f"--img-size must be at least 1, got {args.img_size}")
    check_model_name(args.model)
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file")
    found = inspect_model(args.model, img_size=args.img_size, num_classes=args.num_classes,
                          checkpoint=args.checkpoint)
    if args.json:
        print(json.dumps(found.to_dict(), indent=1, allow_nan=False))
    else:
        print(found.text())
    return 0 if found.error is None else 1


def _eval_folder(path: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"--eval {path}: not a directory; each --eval is a labelled image folder (ImageFolder "
                         "layout: one sub-folder per class, in the order of the model's logits)")
    if not any(c.is_dir() for c in p.iterdir()):
        raise UsageError(f"--eval {path}: no class folders in it; labels come from sub-folders (ImageFolder layout)")


def run_sweep(args: argparse.Namespace) -> int:
    """``fxzip sweep``: one calibration, a grid of merges, each scored per task."""

    args.method = args.methods[0]
    args.alpha, args.beta = args.alphas[0], args.betas[0]
    args.stop_at = None
    classes = _check_merge_args(args)
    check_grid_args(args)
    if len(args.eval) != len(args.checkpoints):
        raise UsageError(f"--eval takes one labelled folder per checkpoint ({len(args.checkpoints)}), "
                         f"got {len(args.eval)}")
    for folder in args.eval:
        _eval_folder(folder)
    stops = grid_axes(args)
    with _out_lock(args):
        return _sweep_and_write(args, classes, stops)


def _ridge_of(refit: bool | float) -> float | None:
    """merge's ``refit`` argument as the ridge it means (None: no refit). A
    ridge the library refuses (<= 0) stays as it is, for its check to name."""
    from ..passes.refit import DEFAULT_RIDGE

    return None if refit is False else DEFAULT_RIDGE if refit is True else float(refit)


def _sweep_points(args: argparse.Namespace, models: list[Any], say: Any) -> list[Any]:
    """The grid of ``fxzip sweep`` (``fxzip.cli.sweep.grid``), every point
    checked by the library (``check_merge_options``) before any data is read."""
    from .sweep import FIXED_WIDTH_METHODS, grid

    points = grid(args.methods, args.alphas, args.betas, args.merged_widths, args.refit, args.repair, args.probes)
    for method in args.methods:
        if method in FIXED_WIDTH_METHODS and any(w != 1.0 for w in args.merged_widths):
            if not any(p.method == method for p in points):  # no width it can run at: the library says why
                check_merge_options(models, method=method, merged_width=max(args.merged_widths))
            say(f"{method} runs at --merged-width 1 only (it has no similarity to choose which features to keep "
                "apart)")
    for point in points:
        check_merge_options(models, **point.options(), max_memory=args.max_memory, cache_dtype=args.cache_dtype)
    return points


def _sweep_and_write(args: argparse.Namespace, classes: list[int | None], stops: list[Any]) -> int:
    """``fxzip sweep`` after the argument checks, holding ``--out``'s lock."""
    say = _Say(args.quiet)
    import torch
    from torch.utils.data import DataLoader, Subset

    from .images import data_config, image_transform, open_data
    from .sweep import sweep, table, write_outputs

    torch.manual_seed(args.seed)
    models, specs = load_models(args.model, args.checkpoints, classes, args.img_size, say,
                                 strip=args.strip_prefix)
    points = _sweep_points(args, models, say)
    config = data_config(models[0], args.img_size, args.crop_pct, args.crop_mode, args.interpolation)
    from torchvision.datasets import ImageFolder

    loaders = []
    for folder in args.eval:
        dataset = ImageFolder(folder, transform=image_transform(config))
        if args.eval_max is not None and len(dataset) > args.eval_max:
            pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:args.eval_max]
            subset = Subset(dataset, sorted(pick.tolist()))
            subset.classes = dataset.classes  # type: ignore[attr-defined]
            dataset = subset
        say(f"eval {folder}: {len(dataset)} images, {len(getattr(dataset, 'classes', []))} classes")
        loaders.append(DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=0))
    with open_data(args.data, models[0], args.img_size, args.batch_size, **_data_options(args)) as source:
        say(f"data: {source.description}")
        spread = source.spread(args.max_batches)
        if spread:
            say(spread)
        rows = sweep(models, source.loader(), loaders, points, stops, reset_bn=False if args.no_reset_bn else None,
                     max_batches=args.max_batches, seed=args.seed, progress=not args.quiet, say=say,
                     max_memory=args.max_memory, cache_dtype=args.cache_dtype)
        skipped = source.skipped_summary()
    print(table(rows))
    _say_data_notes(None, skipped)
    if args.out:
        settings = {"command": "fxzip sweep", "model": args.model, "checkpoints": list(args.checkpoints),
                    "num_classes": [s.num_classes for s in specs], "data": args.data, "eval": list(args.eval),
                    "img_size": args.img_size, "input_size": list(config["input_size"]), "methods": args.methods,
                    "alphas": args.alphas, "betas": args.betas, "stop_at": args.stop_at_values,
                    "merged_widths": args.merged_widths, "refit": args.refit, "repair": args.repair,
                    "probes": args.probes, "max_memory": args.max_memory, "cache_dtype": args.cache_dtype,
                    "batch_size": args.batch_size, "max_batches": args.max_batches, "eval_max": args.eval_max,
                    "reset_bn": not args.no_reset_bn, "seed": args.seed,
                    **{k: config.get(k) for k in ("crop_pct", "crop_mode", "interpolation")},
                    "strict_data": args.strict_data, **skipped}
        files = write_outputs(rows, Path(args.out), settings, overwrite=getattr(args, "overwrite", False))
        print(f"wrote {args.out}: {', '.join(files)}")
    return 0
