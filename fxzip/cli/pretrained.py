"""``fxzip merge`` of Hugging Face ``save_pretrained`` folders on text.

The same merge as for images (``fxzip.merge``, every option), with what a
language model needs around it: the folders are checked and their code never
run (``fxzip.hf``), the models must share one tokenizer, the text is
tokenized into rows of ``--seq-len`` tokens (``fxzip.text_data``), and a full
zip is written as a ``save_pretrained`` folder with the tokenizer beside it.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .commands import (
    UsageError,
    _calibration_loader,
    _check_out,
    _out_lock,
    _Say,
    check_merge_options,
    check_method_args,
    merge_device,
    merge_options,
    merged_width_arg,
    merging_line,
    parse_stop_at,
)

__all__ = ["check_pretrained_args", "merge_pretrained", "run_merge_pretrained"]

IMAGE_ONLY = ("model", "num_classes", "strip_prefix", "img_size", "crop_pct", "crop_mode", "interpolation")


def run_merge_pretrained(args: argparse.Namespace) -> int:
    """``fxzip merge DIR_A DIR_B --data TEXT --out OUT``: the checks, then the merge
    holding ``--out``'s lock."""
    check_pretrained_args(args)
    args.merged_width = merged_width_arg(args.merged_width)
    with _out_lock(args):
        return merge_pretrained(args)


def check_pretrained_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before a model is loaded."""
    from ..hf import check_pretrained_dir, is_pretrained_dir
    from ..text_data import check_text_path

    check_method_args(args)
    for ckpt in args.checkpoints:
        if not is_pretrained_dir(ckpt):
            raise UsageError(f"checkpoint {ckpt}: not a save_pretrained folder (no config.json), while "
                             f"{next(c for c in args.checkpoints if is_pretrained_dir(c))} is one; pass "
                             "Hugging Face folders only, or state_dict files with --model")
        try:
            check_pretrained_dir(ckpt)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    given = [f"--{name.replace('_', '-')}" for name in IMAGE_ONLY if getattr(args, name, None) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} {'are' if len(given) > 1 else 'is'} for image models of state_dict "
                         "files; a save_pretrained folder names its architecture in config.json: leave "
                         f"{'them' if len(given) > 1 else 'it'} out")
    if args.seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2 (a causal LM predicts each token from the ones before "
                         f"it), got {args.seq_len}")
    try:
        check_text_path(args.data)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.out is not None:
        _check_out(args)


def _shared_tokenizer(dirs: list[str], data: str) -> Any:
    """The models' one tokenizer; an error names the first difference."""
    from ..hf import load_tokenizer, tokenizer_difference

    tokenizers = [load_tokenizer(d) for d in dirs]
    missing = [d for d, t in zip(dirs, tokenizers) if t is None]
    if missing:
        if Path(data).suffix.lower() in (".pt", ".pth") and len(missing) == len(dirs):
            return None  # token ids given: no tokenizer is needed, none is written
        raise UsageError(f"{missing[0]} holds no tokenizer files (tokenizer.json, tokenizer_config.json): save it "
                         "beside the model (tokenizer.save_pretrained(folder)), or pass --data as a .pt of token ids")
    problem = tokenizer_difference(tokenizers, dirs)
    if problem is not None:
        raise UsageError(f"the models do not share a tokenizer: {problem}. Merged embeddings would be indexed by "
                         "two vocabularies; merge models trained with one tokenizer")
    return tokenizers[0]


def merge_pretrained(args: argparse.Namespace) -> int:
    """``fxzip merge DIR_A DIR_B --data TEXT --out OUT`` after the argument checks,
    holding ``--out``'s lock."""
    say = _Say(args.quiet)
    import torch

    from ..distributed import is_main, world_size
    from ..hf import load_pretrained
    from ..io import save
    from ..merge import merge
    from ..text_data import open_text
    from ..version import __version__

    torch.manual_seed(args.seed)
    stop_at = parse_stop_at(args.stop_at)
    processes = world_size()
    if not is_main():
        say = _Say(quiet=True)
    tokenizer = _shared_tokenizer(args.checkpoints, args.data)
    say(f"fxzip {__version__}: loading {len(args.checkpoints)} Hugging Face models")
    models = []
    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
    for ckpt in args.checkpoints:
        models.append(load_pretrained(ckpt, dtype))
        say(f"{ckpt}: {type(models[-1]).__name__}, {sum(p.numel() for p in models[-1].parameters()) / 1e6:.2f} M "
            "parameters")
    kinds = {type(m).__name__ for m in models}
    if len(kinds) > 1:
        raise UsageError(f"the folders hold different model classes ({', '.join(sorted(kinds))}); fxzip merges "
                         "models of one architecture")
    device = merge_device(getattr(args, "device", "cpu"))
    models = [m.to(device) for m in models]
    options = merge_options(args)
    check_merge_options(models, **options)
    to_device = None if device.type == "cpu" else (
        lambda batch: {k: v.to(device, non_blocking=True) for k, v in batch.items()})
    if tokenizer is None:  # token ids: the vocabulary bound comes from the model
        tokenizer = _VocabularyOnly(models[0])
    with open_text(args.data, tokenizer, args.seq_len, args.batch_size, strict=args.strict_data,
                   progress=not args.quiet) as source:
        say(f"data: {source.description}")
        spread = source.spread(args.max_batches, processes)
        if spread:
            say(spread)
        say(merging_line(args, stop_at, processes))
        loader, max_batches = _calibration_loader(source, args.batch_size, args.max_batches)
        result = merge(*models, data=loader, stop_at=stop_at, max_batches=max_batches, progress=not args.quiet,
                       seed=args.seed, inputs=to_device, **options)
        description, skipped = source.description, source.skipped_summary()
    if not is_main():
        return 0
    report = result.meta["fxzip"]
    report.settings = {
        "command": "fxzip merge", "checkpoints": [str(c) for c in args.checkpoints], "architecture": kinds.pop(),
        "data": str(args.data), "data_description": description, "seq_len": args.seq_len,
        "dtype": str(next(models[0].parameters()).dtype).replace("torch.", ""),
        "method": args.method, "alpha": args.alpha, "beta": args.beta, "stop_at": stop_at, "refit": args.refit,
        "repair": args.repair, "merged_width": args.merged_width, "probes": args.probes,
        "max_memory": args.max_memory, "cache_dtype": args.cache_dtype, "batch_size": args.batch_size,
        "max_batches": args.max_batches, "seed": args.seed, "processes": processes, "device": device.type,
        "strict_data": args.strict_data, **skipped,
    }
    say(f"saving to {args.out}")
    written_tokenizer = None if isinstance(tokenizer, _VocabularyOnly) else tokenizer
    out = save(result, args.out, pretrained=models[0], tokenizer=written_tokenizer,
               overwrite=getattr(args, "overwrite", False))
    if not args.quiet:
        print(report.table())
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out}: {', '.join(files)}")
    if (out / "config.json").exists():
        print(f"load it: transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    elif (out / "model.pt2").exists():
        print(f"load it: torch.export.load({str(out / 'model.pt2')!r}).module()(input_ids, attention_mask)  "
              f"-> {report.n_models} outputs, one per model")
    return 0


class _VocabularyOnly:
    """Stands for the tokenizer when the data are token ids: the bound on the ids
    is the model's input embedding size."""

    pad_token_id = None
    eos_token_id = None

    def __init__(self, model: Any):
        self.size = int(model.get_input_embeddings().num_embeddings)

    def __len__(self) -> int:
        return self.size

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UsageError("the folders hold no tokenizer, so --data must be token ids (.pt), not text")
