"""The ``fxzip`` command line: the argument parser and ``main`` (console entry point
``fxzip = "fxzip.cli:main"``, re-exported by ``fxzip.cli``; ``python -m fxzip``).

Subcommands:

* ``fxzip demo [--seed N] [--epochs N] [--width N] [--pairs N] [--threads N]``: train pairs of small
  CNNs on disjoint halves of the 8x8 digits, merge them with every method and
  print the papers' table as mean ± std over the pairs (about a minute on 2
  CPU cores, offline).
* ``fxzip merge CKPT CKPT [CKPT ...] --model NAME --data PATH --out DIR [...]``:
  merge checkpoints of one architecture on calibration images and write the
  result with ``fxzip.save`` (``model.safetensors`` or ``model.pt2``,
  ``report.json``, ``report.md``); ``--refit [RIDGE]``, ``--repair``,
  ``--merged-width W|NAME=W`` and ``--probes POLICY`` are ``fxzip.merge``'s
  options of those names, ``--max-memory BYTES`` (``512M``, ``4G``) its
  ``max_memory``. ``torchrun --nproc-per-node K -m fxzip merge
  ...`` runs it in K processes, each calibrating on every K-th batch
  (``fxzip.distributed``); rank 0 writes the files.
* ``fxzip inspect --model NAME [--img-size N] [--json]``: the feature spaces and
  cut points fxzip finds in a model, before any data.
* ``fxzip sweep CKPT CKPT [...] --model NAME --data PATH --eval DIR DIR [...]``:
  one calibration (per probe policy), a grid of methods, alpha/beta, merge
  options (``--merged-width``, ``--refit``, ``--repair``, ``--probes``) and cut
  points, each merged model scored on one labelled folder per model; a table and the papers'
  accuracy-versus-layers-zipped plot.

Errors in the arguments or the inputs are printed as one message without a
traceback (set ``FXZIP_DEBUG=1`` for the traceback) and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

MERGE_EPILOG = """\
examples:
  fxzip merge a.pth b.pth --model resnet18 --data calib/ --out merged/
  fxzip merge a.pth b.pth --model resnet18 --data calib.tar.gz --out partial/ --stop-at 9
  fxzip merge a.safetensors b.safetensors --model mypkg.nets:make_net --data x.npy --out merged/
  fxzip merge lm_a/ lm_b/ --data corpus/ --seq-len 256 --out merged_lm/

--data: an image folder (ImageFolder layout, labels ignored), a .tar.gz of one, or a
.pt/.npy tensor N x C x H x W (uint8: images, preprocessed like files; float: model
inputs, used as they are). Images get the model's timm evaluation transform
(resize, center crop, normalise) at --img-size when given. For Hugging Face
save_pretrained folders (language models; no --model): a text file, a folder of
text files, a .jsonl with a "text" field per line, or a .pt of token ids (N x L,
or a dict with input_ids and attention_mask), in rows of --seq-len tokens;
statistics are over real tokens only (padding is masked out). The models must
share the tokenizer; code named in a folder (auto_map) is never run.

--refit, --repair, --merged-width, --probes: the options of fxzip.merge (refit=,
repair=, merged_width=, probes=). --refit alone uses the default ridge; --refit 0.01
sets it (put --refit after the checkpoints, or it takes the next one for its
value). Refit and repair read the data again: about one pass per layer (refit, then
repair, then the norm reset); the report's details say how many. --merged-width W
keeps W x n features in each space of n features (1.0: the papers' merge; the
number of checkpoints: the models side by side), the least similar apart; the
result no longer loads into the original class and is saved as model.pt2.
--merged-width NAME=W, repeated, widens only the spaces named (their names as in
the report or fxzip inspect). --probes: all (every tensor of a space that
something reads), last (only the last one: where a stream leaves its stage),
before_reduce (the feature map before global pooling, all tokens rather than the
class token), *_per_point (each place weighs the same, not each sample),
reference (last + before_reduce: where the reference ZipIt!/MuDSC codes read each
space; last_before_reduce is its old name).

--out: a full zip is model.safetensors, loadable with
timm.create_model(NAME, num_classes=N, checkpoint_path=DIR/model.safetensors) (of
Hugging Face folders: a save_pretrained folder with the tokenizer beside it,
AutoModelForCausalLM.from_pretrained(DIR)); a
partial zip is model.pt2 (torch.export.load(path).module()(x) -> one output per
model, no fxzip needed); both with report.json and report.md. The folder is
written atomically (a temporary sibling renamed into place); an earlier fxzip
result is replaced, any other non-empty folder needs --overwrite, and a second
command writing to the same --out fails at once.
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxzip", description="Merge models trained on different tasks (ZipIt!).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train two digit classifiers on disjoint classes, merge them, print the table",
        description="Digits 0-4 (task A) and 5-9 (task B): train, merge with every method, evaluate.",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of both models' init and data order (default 0)")
    demo.add_argument("--epochs", type=int, default=20, help="training epochs per model (default 20)")
    demo.add_argument("--pairs", type=int, default=3,
                      help="model pairs trained from different seeds; the table gives mean ± std over them "
                           "(default 3: one pair cannot tell two close methods apart)")
    demo.add_argument("--width", type=int, default=None, help="channels of the small CNNs (default 32)")
    demo.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: the 8x8 convs are too small to gain from more, "
        "and oversubscribed cores slow them down many times over)",
    )
    demo.set_defaults(func=_run_demo)
    _add_merge(sub)
    _add_inspect(sub)
    _add_sweep(sub)
    return parser


def _ridge(value: str) -> float:
    """``--refit RIDGE``: a number (the library says which numbers it takes)."""
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a ridge factor; --refit takes an optional number (e.g. --refit 0.01), so put it "
            "after the checkpoints") from None


_BYTE_UNITS = {None: 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
_BYTES = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])(?:I?B)?|B)?", re.IGNORECASE)


def byte_count(value: str) -> int:
    """``--max-memory BYTES``: a number of bytes, or one with a binary suffix
    (``512M``, ``4G``, ``1.5G``, ``64K``, ``2T``; ``B`` or ``iB`` may follow:
    ``4GB``, ``4GiB``), as ``fxzip.merge``'s ``max_memory``. Refused when
    parsing, before any model is built: a typo should not cost a calibration
    pass."""
    match = _BYTES.fullmatch(value.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a number of bytes; --max-memory takes bytes >= 0 with an optional suffix K, M, G "
            "or T (powers of 1024), e.g. --max-memory 512M or --max-memory 4G")
    unit = match.group(2).upper() if match.group(2) else None
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


def _width_entry(value: str) -> tuple[str | None, float]:
    """``--merged-width W`` or ``NAME=W``: (None or the space's name, W)."""
    name, _, number = value.rpartition("=")
    try:
        return (name or None) if "=" in value else None, float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: --merged-width takes a factor W (e.g. 1.5) or NAME=W for one space") from None


def _add_image_options(parser: argparse.ArgumentParser) -> None:
    """How --data images are read: the same flags for merge and sweep."""
    parser.add_argument("--crop-pct", type=float, metavar="F",
                        help="fraction of the resized image the center crop keeps, in (0, 1] (timm's crop_pct; "
                        "default: the model's data config)")
    parser.add_argument("--crop-mode", metavar="MODE",
                        help="timm's crop_mode: center, squash or border (default: the model's data config)")
    parser.add_argument("--interpolation", metavar="NAME",
                        help="resize interpolation, as timm names it: nearest, bilinear, bicubic, box, hamming, "
                        "lanczos (default: the model's data config)")
    parser.add_argument("--strict-data", action="store_true",
                        help="fail on the first image file that cannot be decoded (default: skip it with a warning "
                        "and count it in the report)")


def _refit_values(value: str) -> tuple[bool | float, ...]:
    """``fxzip sweep --refit`` values: off, on, both (off and on) or a ridge factor."""
    words: dict[str, tuple[bool | float, ...]] = {"off": (False,), "on": (True,), "both": (False, True)}
    if value in words:
        return words[value]
    try:
        return (float(value),)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: --refit takes off, on, both or ridge factors") from None


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    from fxzip.cli.commands import merge_defaults
    from fxzip.passes.refit import DEFAULT_RIDGE
    from fxzip.probes import DEFAULT_PROBES, PROBE_POLICIES

    defaults = merge_defaults()
    sweep = sub.add_parser(
        "sweep", help="one calibration, a grid of methods, alpha/beta, merge options and cut points, each scored "
        "per task",
        description="Calibrate once (once per --probes policy), merge for every combination of --methods, --alphas, --betas, --merged-width, "
        "--refit, --repair, --probes and --stop-at, and score every result on one labelled image folder per model "
        "(--eval, in checkpoint order; labels are the class folders in sorted order, compared with the first logits "
        "of that model's output). Prints a table; --out writes sweep.json, sweep.csv and sweep.png (accuracy versus "
        "layers zipped, one curve per setting).")
    sweep.add_argument("checkpoints", nargs="+", metavar="CKPT",
                       help="state_dict files, one per model; or Hugging Face save_pretrained folders (language "
                       "models, scored by perplexity: see --eval)")
    sweep.add_argument("--model", metavar="NAME", help="timm model name or module.path:factory; required for "
                       "state_dict files (a save_pretrained folder names its own)")
    sweep.add_argument("--data", required=True, metavar="PATH", help="calibration inputs (as for fxzip merge)")
    sweep.add_argument("--eval", required=True, nargs="+", metavar="DIR|TEXT",
                       help="one labelled image folder (ImageFolder layout) per checkpoint: model k's task. For "
                       "Hugging Face folders: one held-out text per checkpoint (read like --data, in rows of "
                       "--seq-len tokens): model k's domain. Each row of the table then gives the perplexity on "
                       "every domain (a full zip's one output; a partial zip's head k on domain k), the mean "
                       "log-perplexity and the multiply-adds per token, beside each model alone, the oracle "
                       "(domain k by model k) and the sequence-level mixture of the models")
    sweep.add_argument("--seq-len", type=int, default=256, metavar="N",
                       help="Hugging Face folders: tokens per calibration and evaluation sequence (default 256)")
    sweep.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="Hugging Face folders: load, merge and score in this dtype (default: the checkpoints' "
                       "own; as for fxzip merge)")
    sweep.add_argument("--out", metavar="DIR", help="write sweep.json, sweep.csv and sweep.png here (atomically: "
                       "an earlier sweep there is replaced as a whole)")
    sweep.add_argument("--overwrite", action="store_true",
                       help="replace --out even if it is a non-empty folder that is not an fxzip sweep")
    sweep.add_argument("--methods", nargs="+", default=[defaults["method"]], metavar="M",
                       help=f"methods to try (default {defaults['method']})")
    sweep.add_argument("--alphas", nargs="+", type=float, default=[defaults["alpha"]], metavar="A",
                       help=f"zipit/mudsc alpha values (default {defaults['alpha']})")
    sweep.add_argument("--betas", nargs="+", type=float, default=[defaults["beta"]], metavar="B",
                       help=f"zipit/mudsc beta values (default {defaults['beta']})")
    sweep.add_argument("--stop-at", dest="stop_at_values", nargs="+", default=["full"], metavar="K|NAME|full|all",
                       help="cut points: k, a name, 'full' (full zip) or 'all' (every cut point and the full zip); "
                       "default full")
    sweep.add_argument("--merged-width", dest="merged_widths", nargs="+", type=float, default=[1.0], metavar="W",
                       help="merged widths: W times one model's features per space (1.0 default, up to the number "
                       "of checkpoints); multiplies MACs (up to W^2); weight_average runs at 1.0 only")
    sweep.add_argument("--refit", nargs="+", type=_refit_values, default=[(False,)], metavar="off|on|both|RIDGE",
                       help="refit each merged layer to the originals' outputs: off (default), on (ridge "
                       f"{DEFAULT_RIDGE:g}), both (every merge with and without) or ridge factors; each refit costs "
                       "about one more pass over the data per layer")
    sweep.add_argument("--repair", choices=("off", "on", "both"), default="off",
                       help="REPAIR of full zips (nets without batch norm): off (default), on, or both; costs about "
                       "one more pass over the data per layer")
    sweep.add_argument("--max-memory", type=byte_count, metavar="BYTES",
                       help="as for fxzip merge: bound the activations each refit and repair caches (512M, 4G)")
    sweep.add_argument("--cache-dtype", choices=("float16", "bfloat16"),
                       help="as for fxzip merge: keep those activations in float16 / bfloat16 (opt-in; rounding "
                       "reported)")
    sweep.add_argument("--probes", nargs="+", choices=sorted(PROBE_POLICIES), default=[DEFAULT_PROBES],
                       metavar="POLICY", help=f"probe policies, one calibration each: "
                       f"{', '.join(sorted(PROBE_POLICIES))} (default {DEFAULT_PROBES}; see fxzip merge --help)")
    sweep.add_argument("--num-classes", type=int, nargs="+", metavar="N", help="as for fxzip merge")
    sweep.add_argument("--strip-prefix", metavar="PREFIX", help="as for fxzip merge")
    sweep.add_argument("--img-size", type=int, metavar="N", help="as for fxzip merge")
    _add_image_options(sweep)
    sweep.add_argument("--batch-size", type=int, default=32, help="calibration and evaluation batch size")
    sweep.add_argument("--max-batches", type=int,
                       help="calibrate on at most this many batches (per process), of samples spread evenly "
                            "over the data")
    sweep.add_argument("--eval-max", type=int, metavar="N", help="score on at most N images per task (a seeded "
                       "random subset); of text: N sequences per domain, evenly spaced over it")
    sweep.add_argument("--no-reset-bn", action="store_true", help="keep merged batch-norm statistics")
    sweep.add_argument("--seed", type=int, default=defaults["seed"], help="random seed (default 0)")
    sweep.add_argument("--quiet", action="store_true", help="no progress lines")
    sweep.set_defaults(func=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> int:
    from fxzip.cli.commands import UsageError, run_sweep

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("fxzip sweep runs in one process; run it without torchrun (fxzip merge takes "
                         "torchrun --nproc-per-node K)")
    from fxzip.hf import is_pretrained_dir

    if any(is_pretrained_dir(c) for c in args.checkpoints):  # Hugging Face folders, scored by perplexity
        from fxzip.cli.sweep_lm import run_sweep_pretrained

        return run_sweep_pretrained(args)
    if args.model is None:
        raise UsageError("--model is required for state_dict files (a timm model name or module.path:factory); "
                         "only Hugging Face save_pretrained folders name their own architecture")
    return run_sweep(args)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    from fxzip.cli.commands import merge_defaults
    from fxzip.passes.refit import DEFAULT_RIDGE
    from fxzip.probes import DEFAULT_PROBES, PROBE_POLICIES

    defaults = merge_defaults()
    merge = sub.add_parser(
        "merge", help="merge checkpoints of one architecture on calibration images, save the result",
        description="Merge two or more checkpoints of one architecture, trained on different tasks, into one "
        "model (ZipIt!) on unlabeled calibration images, and save it with its report.",
        epilog=MERGE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    merge.add_argument("checkpoints", nargs="+", metavar="CKPT",
                       help="state_dict files (.pt/.pth/.bin/.ckpt: a 'state_dict', 'state_dict_ema' or 'model' "
                       "entry is unwrapped; .safetensors), one per model, at least two; or Hugging Face "
                       "save_pretrained folders (config.json, weights, tokenizer files)")
    merge.add_argument("--model", metavar="NAME",
                       help="timm model name (built with pretrained=False), or module.path:factory for your own "
                       "code; required for state_dict files (a save_pretrained folder names its own)")
    merge.add_argument("--data", required=True, metavar="PATH", help="calibration inputs (see below)")
    merge.add_argument("--seq-len", type=int, default=256, metavar="N",
                       help="Hugging Face folders: tokens per calibration sequence (default 256); text is "
                       "tokenized with the models' tokenizer, documents packed with an end-of-text token between")
    merge.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="Hugging Face folders: load and merge in this dtype (default: the checkpoints' own; "
                       "float32 gives exact statistics of half-precision checkpoints at twice the memory)")
    merge.add_argument("--out", required=True, metavar="DIR",
                       help="directory for the result files (written atomically: an earlier result there is "
                       "replaced as a whole)")
    merge.add_argument("--overwrite", action="store_true",
                       help="replace --out even if it is a non-empty folder that is not an fxzip result")
    merge.add_argument("--num-classes", type=int, nargs="+", metavar="N",
                       help="classes of the models: one value for all, or one per checkpoint (default: read from "
                       "each checkpoint's classifier)")
    merge.add_argument("--strip-prefix", metavar="PREFIX",
                       help="remove PREFIX from every key of the checkpoints (a wrapper's, e.g. 'net.'); 'module.', "
                       "'model.' and '_orig_mod.' are removed without it when every key carries them and the "
                       "model's own keys do not")
    merge.add_argument("--img-size", type=int, metavar="N",
                       help="input size in pixels: the data is resized to it, and timm models that take img_size "
                       "(ViTs) are built for it (default: the model's data config)")
    merge.add_argument("--method", default=defaults["method"],
                       help=f"zipit, zipit_reference (ZipIt!'s code, decision for decision), permute, weight_average, mudsc, "
                            f"mudsc_permute (default {defaults['method']})")
    merge.add_argument("--alpha", type=float, default=defaults["alpha"],
                       help=f"zipit's repeated-matching factor (default {defaults['alpha']})")
    merge.add_argument("--beta", type=float, default=defaults["beta"],
                       help=f"zipit's within-model merge budget (default {defaults['beta']})")
    merge.add_argument("--stop-at", metavar="K|NAME",
                       help="partial zip: zip the first K weight layers (the last cut with k <= K), or stop at the "
                       "cut point NAME (see fxzip inspect)")
    merge.add_argument("--refit", nargs="?", const=True, default=False, type=_ridge, metavar="RIDGE",
                       help="refit each merged layer by least squares to the originals' matched outputs on --data "
                       f"(RIDGE default {DEFAULT_RIDGE:g}); costs about one more pass over the data per layer")
    merge.add_argument("--repair", action="store_true",
                       help="REPAIR: give each merged feature its originals' mean and std (nets without batch "
                       "norm; full zips only); costs about one more pass over the data per layer")
    merge.add_argument("--max-memory", type=byte_count, metavar="BYTES",
                       help="bound the activations --refit and --repair cache (bytes, or with a suffix: 512M, "
                       "4G); the rest is spilled to a temporary folder and read back bit for bit (same result, "
                       "slower). Default: no bound")
    merge.add_argument("--cache-dtype", choices=("float16", "bfloat16"),
                       help="keep the activations --refit and --repair cache in float16 or bfloat16: half the "
                       "memory of float32, but the fits see rounded inputs (the largest relative rounding is in "
                       "report.json). Default: their own dtype, exact")
    merge.add_argument("--merged-width", action="append", type=_width_entry, metavar="W|NAME=W",
                       help="keep W times one model's features per space (1.0 default, up to the number of "
                       "checkpoints); multiplies MACs (up to W^2); repeat NAME=W to widen named spaces only")
    merge.add_argument("--probes", choices=sorted(PROBE_POLICIES), default=DEFAULT_PROBES, metavar="POLICY",
                       help=f"where calibration observes each space: {', '.join(sorted(PROBE_POLICIES))} "
                       f"(default {DEFAULT_PROBES}; see below)")
    _add_image_options(merge)
    merge.add_argument("--batch-size", type=int, default=32, help="calibration batch size (default 32)")
    merge.add_argument("--max-batches", type=int,
                       help="calibrate on at most this many batches (per process), of samples spread evenly "
                            "over the data")
    merge.add_argument("--no-reset-bn", action="store_true",
                       help="keep the merged batch-norm statistics instead of recomputing them on the data")
    merge.add_argument("--seed", type=int, default=defaults["seed"], help="random seed (default 0)")
    merge.add_argument("--device", default="cpu",
                       help="where to merge: cpu (default), cuda or cuda:N. Under torchrun --nproc-per-node K, "
                       "cuda puts rank r on cuda:LOCAL_RANK (NCCL), cpu uses gloo")
    merge.add_argument("--quiet", action="store_true", help="no progress, no table: only the files written")
    merge.set_defaults(func=_run_merge)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    inspect = sub.add_parser(
        "inspect", help="show the feature spaces and cut points fxzip finds in a model (no data needed)",
        description="Trace and analyze a model as fxzip merge would: each feature space with its layers, size, "
        "groups and ties, whether it is fixed and why; the cut points of a partial zip with k and MACs; for a "
        "model fxzip cannot merge, the node and the reason (exit status 1).")
    inspect.add_argument("--model", required=True, metavar="NAME", help="timm model name or module.path:factory")
    inspect.add_argument("--img-size", type=int, metavar="N", help="input size (default: the model's data config)")
    inspect.add_argument("--num-classes", type=int, metavar="N", help="classes of the classifier")
    inspect.add_argument("--checkpoint", metavar="CKPT", help="load these weights first (checks that they fit)")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(func=_run_inspect)


def _run_merge(args: argparse.Namespace) -> int:
    from fxzip.cli.commands import merge_device, run_merge
    from fxzip.distributed import from_env
    from fxzip.hf import is_pretrained_dir

    merge_device(args.device)  # a bad --device fails here, before any process group
    if any(is_pretrained_dir(c) for c in args.checkpoints):  # Hugging Face folders, merged on text
        from fxzip.cli.pretrained import run_merge_pretrained

        run_merge = run_merge_pretrained
    with from_env(args.device):  # under torchrun: one process group (gloo; NCCL for cuda), the data sharded by rank
        return run_merge(args)


def _run_inspect(args: argparse.Namespace) -> int:
    from fxzip.cli.commands import run_inspect

    return run_inspect(args)


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from fxzip.cli.demo import WIDTH, run  # imported lazily: keeps `fxzip --help` fast

    if args.epochs < 1:
        raise SystemExit("fxzip demo: --epochs must be at least 1")
    if args.pairs < 1:
        raise SystemExit("fxzip demo: --pairs must be at least 1")
    torch.set_num_threads(max(1, args.threads))
    run(seed=args.seed, epochs=args.epochs, width=args.width or WIDTH, pairs=args.pairs)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (``sys.argv[1:]`` when None), run the subcommand, return its exit code."""
    args = _build_parser().parse_args(argv)
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return status
    except BrokenPipeError:
        # the reader went away (fxzip inspect --json | head -1): stop quietly, as a process killed by
        # SIGPIPE would; stdout goes to devnull so the interpreter's final flush does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        if os.environ.get("FXZIP_DEBUG"):
            raise
        print(f"fxzip {args.command}: interrupted" + (f"; {args.out} is as it was before (or, if the files "
              "were already in place, the new result)" if getattr(args, "out", None) else ""), file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # fxzip's own errors (bad arguments, models it cannot merge) are ValueErrors with the fix in the
        # message: print it alone; FXZIP_DEBUG=1 shows the traceback for a bug report
        if os.environ.get("FXZIP_DEBUG"):
            raise
        print(f"fxzip {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
