"""``fxzip.save`` / ``fxzip.load``: results as files a colleague can use.

A directory written by ``save`` (and by ``fxzip merge --out``) holds:

* a **full zip** (one model of the architecture's own parameter names and
  shapes): ``model.safetensors``, which loads strictly into the plain
  architecture, e.g. ``timm.create_model(NAME, num_classes=N,
  checkpoint_path=DIR/model.safetensors)``: no fxzip needed to use it;
* **every other result** (a partial zip: trunk + ``head0..headN-1``):
  ``model.pt2``, a ``torch.export`` program with a dynamic batch dimension that
  runs with ``torch.export.load(path).module()(x)`` alone (fxzip need not be
  installed: the program holds the graph and the weights, stored once;
  ``fxzip.load(DIR, model=gm)`` loads them into a GraphModule of the same
  structure). Folders written by earlier versions also hold
  ``state_dict.safetensors`` (the same weights again); ``load`` still reads
  them;
* ``report.json`` (``MergeReport.to_dict()`` plus how to rebuild the model,
  which files were written and, in ``manifest``, every other file's size in
  bytes; written last), ``report.md`` (the same, readable) and
  ``correlation.png`` (``MergeReport.plot``); ``fxzip merge`` adds
  ``cuts.png``.

The folder is written atomically (``fxzip.result_dir``): everything goes into
a temporary sibling folder that takes the directory's place by one rename, so
an interrupted save leaves the previous complete result or the new one. An
fxzip result (a ``report.json`` with fxzip's ``format`` key, and only the file
names above) is replaced by saving again; any other non-empty folder needs
``overwrite=True``.

``load`` rebuilds a result from such a directory: a partial zip from its
exported program (no architecture needed), a full zip from the architecture,
which is either passed (``model=``: a module, a name or a ``ModelSpec``) or
recorded in ``report.json`` (the CLI records the timm name or factory,
``num_classes`` and ``img_size``).
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx
from torch import nn

from .distributed import is_main
from .hf import CONFIG, check_pretrained_dir, is_pretrained_dir, load_pretrained, write_pretrained
from .model_spec import ModelSpec, _library_of, build_model, load_into, recorded_numbers, spec_from_record
from .passes.ties import tied_names
from .program_check import check_program
from .report import REPORT_FORMAT, MergeReport, _jsonable, versions

__all__ = ["save", "load", "load_report", "FULL_WEIGHTS", "PROGRAM", "STATE", "REPORT_JSON", "REPORT_MD"]

FULL_WEIGHTS = "model.safetensors"
PROGRAM = "model.pt2"
STATE = "state_dict.safetensors"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT = "correlation.png"


def is_full_zip(result: nn.Module) -> bool:
    """A full zip is one model of the input architecture (its state_dict loads into
    it); a partial zip has a ``trunk`` and one ``head`` per model, and a
    ``merged_width`` result wider layers (both are saved as programs)."""
    report = _report_of(result)
    if report is not None:
        return report.cut is None and not report.widened
    names = dict(result.named_children())
    return not ("trunk" in names and "head0" in names)


def save(result: nn.Module, directory: str | os.PathLike, *, model: ModelSpec | Mapping[str, Any] | None = None,
         example_inputs: Any = None, overwrite: bool = False,
         extra_files: Callable[[Path], Any] | None = None, pretrained: nn.Module | None = None,
         tokenizer: Any = None) -> Path:
    """Write ``result`` (what ``fxzip.merge`` returned) to ``directory``, atomically.

    Args:
        result: a merged model; its report (``result.meta["fxzip"]``) goes to
            ``report.json``/``report.md``.
        directory: created if needed (with its parents). An earlier fxzip
            result there is replaced as a whole (never a stale ``model.pt2``
            beside a new ``model.safetensors``); a non-empty folder that is not
            one (``fxzip.result_dir``: a ``report.json`` with fxzip's
            ``format`` key and only fxzip's file names) is refused unless
            ``overwrite=True``, which replaces it and everything in it.
        model: how to rebuild the plain architecture of a full zip (a
            ``ModelSpec`` or its dict: timm name or ``module:factory``,
            ``num_classes``, ``img_size``); recorded in ``report.json`` so that
            ``fxzip.load(directory)`` needs no arguments.
        example_inputs: an input batch for ``torch.export`` (partial zips). By
            default one is made from the input shapes recorded when the models
            were traced.
        overwrite: replace a non-empty folder that is not an fxzip result.
        extra_files: called with the temporary folder the result is written
            in, before ``report.json``; files it writes there become part of
            the result (``fxzip merge`` writes ``cuts.png`` so).
        pretrained: a Hugging Face ``transformers`` model of the merged
            architecture (one of the merged models; not changed): a full zip
            is then written as its ``save_pretrained`` folder (``config.json``,
            ``model.safetensors``), which ``from_pretrained`` loads without
            fxzip; a tie of input and output embeddings is kept only where it
            holds in the merged weights (``fxzip.hf``).
        tokenizer: saved beside the result (``tokenizer.save_pretrained``), so
            the folder is complete for ``from_pretrained`` and text generation.

    Returns:
        The directory, as a ``Path``.

    The files are written into a temporary sibling folder, fsynced, and put in
    ``directory``'s place by one rename (``fxzip.result_dir``): an interrupted
    save leaves the previous result or the new one, and the next save cleans up
    what it left. ``report.json`` is written last and lists every other file
    with its size (``manifest``). A second save to the same directory while one
    runs (another process) fails at once, naming its pid.

    Under ``torch.distributed`` (a process group of more than one rank) only
    rank 0 writes: every rank holds the same merge, and ranks writing the same
    files at once would race. Other ranks check the arguments and return the
    directory without writing, so ``save`` may be called on every rank or on
    rank 0 alone; it makes no collective call, so neither way can hang (a rank
    that reads the files afterwards waits on a ``dist.barrier()`` first).
    """
    from . import result_dir

    if not isinstance(result, nn.Module):
        raise TypeError(f"fxzip.save takes the module fxzip.merge returned, got a {type(result).__name__}")
    spec = ModelSpec.from_dict(model) if isinstance(model, Mapping) else model
    if spec is not None and not isinstance(spec, ModelSpec):
        raise TypeError(f"model= must be a ModelSpec or a dict with 'name', got {type(model).__name__}")
    out = Path(directory)
    if not is_main():
        return out
    report = _report_of(result)
    if report is not None:
        report.mark_head_only(result)
    info: dict[str, Any] = {"model": spec.to_dict() if spec is not None else None}
    with result_dir.writing(out, result_dir.MERGE, overwrite=overwrite, option="directory",
                            flag="overwrite=True") as stage:
        folder = stage.path
        if is_full_zip(result) and pretrained is not None:
            written = write_pretrained(result, pretrained, folder)
            info["files"] = {"weights": FULL_WEIGHTS, "pretrained": written}
            info["model"] = {"transformers": type(pretrained).__name__}
        elif is_full_zip(result):
            _save_tensors(result.state_dict(), folder / FULL_WEIGHTS)
            info["files"] = {"weights": FULL_WEIGHTS}
        else:  # the program holds the weights: stored once
            program, export_info = export_program(result, example_inputs)
            torch.export.save(program, str(folder / PROGRAM))
            info["files"] = {"program": PROGRAM}
            info["export"] = export_info
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
            info["files"]["tokenizer"] = sorted(set(os.listdir(folder)) - {FULL_WEIGHTS, PROGRAM, CONFIG}
                                                - set(info["files"].get("pretrained", ())))
        if report is not None:
            report.plot(folder / PLOT)
            info["files"]["plot"] = PLOT
        if extra_files is not None:
            extra_files(folder)
        if report is not None:
            (folder / REPORT_MD).write_text(report.to_markdown())
        data = report.to_dict() if report is not None else {"format": REPORT_FORMAT, "versions": versions()}
        data.update(_jsonable(info))
        data["manifest"] = stage.manifest(leave_out=[REPORT_JSON])
        (folder / REPORT_JSON).write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    return out


def load(directory: str | os.PathLike, model: nn.Module | ModelSpec | str | None = None) -> nn.Module:
    """Rebuild a result written by ``save`` (or ``fxzip merge --out``), in eval mode.

    * partial zip (``model.pt2``): the exported program's module; it returns
      one output per model. With ``model=`` (a GraphModule of the same
      structure, e.g. from ``fxzip.merge(..., stop_at=...)``), the program's
      weights are loaded into it instead. (Folders written by earlier
      versions also hold the weights in ``state_dict.safetensors``; they are
      read from there.)
    * full zip (``model.safetensors``): the plain architecture, taken from
      ``model`` (a module, loaded in place; a timm name or ``module:factory``;
      a ``ModelSpec``) or else from the ``model`` recorded in ``report.json``.

    A loaded GraphModule carries its report in ``.meta["fxzip"]``; for any
    result ``load_report(directory)`` returns it.

    A result folder is data from whoever wrote it: loading reads tensors
    (safetensors; a ``torch.export`` program of ATen operations, its weights
    unpickled with ``weights_only``) and JSON, and never imports or calls a
    name the folder carries. The architecture of a full zip comes from
    ``model`` or, when the caller passes none, from ``report.json`` only as a
    timm or torchvision registry name with plain arguments
    (``model_spec.spec_from_record``); a ``module:factory`` recorded there is
    refused, with the way to pass it.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory written by fxzip.save / fxzip merge --out")
    data = _read_json(root)
    if (root / PROGRAM).exists():
        from safetensors.torch import load_file

        # folders written before the weights were stored once also hold them in state_dict.safetensors
        state = load_file(str(root / STATE)) if (root / STATE).exists() else None
        if isinstance(model, nn.Module) and state is not None:
            loaded = load_into(model, state, str(root / STATE))
        else:
            check_program(root / PROGRAM)  # torch.export.load runs code from a tampered archive
            program = torch.export.load(str(root / PROGRAM))
            if isinstance(model, nn.Module):  # the weights the program holds, into the caller's module
                own = model.state_dict()
                weights = dict(program.state_dict)
                weights.update({k: v for k, v in program.constants.items()
                                if isinstance(v, torch.Tensor) and k in own and k not in weights})
                loaded = load_into(model, weights, str(root / PROGRAM))
            else:
                loaded = program.module()
                if state is not None:
                    _copy_weights(loaded, state, root / STATE)
    elif is_pretrained_dir(root) and model is None:  # a save_pretrained folder: transformers builds it
        loaded = load_pretrained(root)
    elif is_pretrained_dir(root) and isinstance(model, nn.Module) and (root / FULL_WEIGHTS).exists():
        from safetensors.torch import load_file

        check_pretrained_dir(root)
        state = load_file(str(root / FULL_WEIGHTS))
        for names in tied_names(model):  # save_pretrained writes a kept tie once
            present = [n for n in names if n in state]
            for n in names:
                if present and n not in state:
                    state[n] = state[present[0]]
        loaded = load_into(model, state, str(root / FULL_WEIGHTS))
        _eval(loaded)
    elif (root / FULL_WEIGHTS).exists():
        from safetensors.torch import load_file

        state = load_file(str(root / FULL_WEIGHTS))
        target = model if isinstance(model, nn.Module) else build_model(_architecture(root, data, model))
        loaded = load_into(target, state, str(root / FULL_WEIGHTS))
        _eval(loaded)
    else:
        raise FileNotFoundError(f"{root} holds neither {FULL_WEIGHTS} nor {PROGRAM}: not an fxzip result directory")
    if isinstance(loaded, fx.GraphModule) and "method" in data:
        loaded.meta["fxzip"] = MergeReport.from_dict(data)
    return loaded


def _architecture(root: Path, data: Mapping[str, Any], model: ModelSpec | str | None) -> ModelSpec:
    """The spec to build a full zip from: the caller's (trusted: a factory name it
    passes is its own code), else the record in report.json (untrusted: registry
    names only). A name passed without numbers takes the record's
    ``num_classes`` / ``img_size``."""
    source = str(root / REPORT_JSON)
    recorded = data.get("model")
    if isinstance(model, ModelSpec):
        return model
    if model is not None and not isinstance(model, str):
        raise TypeError(f"model= must be a module, a model name or a ModelSpec, got {type(model).__name__}")
    if recorded is None and model is None:
        raise ValueError(f"{root} holds a full zip ({FULL_WEIGHTS}) but no record of its architecture; pass model= "
                         "(the architecture as a module, e.g. timm.create_model(NAME, num_classes=N), or a ModelSpec)")
    if model is None:
        return spec_from_record(recorded, source)
    library = None if ":" in model else _library_or_fail(model)
    numbers = recorded_numbers(recorded, source) if isinstance(recorded, Mapping) else (None, None)
    return ModelSpec(model, *numbers, library=library)


def _library_or_fail(name: str) -> str:
    library = _library_of(name)
    if library is None:
        raise ValueError(f"model={name!r} is neither a timm nor a torchvision model name; pass the module itself, "
                         "or module.path:factory for your own code")
    return library


def load_report(directory: str | os.PathLike) -> MergeReport:
    """The ``MergeReport`` saved in ``directory/report.json``."""
    data = _read_json(Path(directory))
    if "method" not in data:
        raise ValueError(f"{directory}/{REPORT_JSON} holds no merge report (the result was saved without one)")
    return MergeReport.from_dict(data)


def export_program(result: nn.Module, example_inputs: Any = None) -> tuple[Any, dict[str, Any]]:
    """``torch.export`` of ``result`` with a dynamic batch dimension on every input,
    on the CPU (a GPU result is exported from a CPU copy, so the program runs on
    any machine; ``.to("cuda")`` is not needed to load it).

    A model whose graph fixes the batch size (e.g. a reshape to a literal batch)
    is exported for the example's batch size instead, with a warning and the
    reason in the returned info (it lands in ``report.json``).
    """
    device = next((t.device for t in list(result.parameters()) + list(result.buffers())), torch.device("cpu"))
    if device.type != "cpu":  # a program a colleague can run anywhere: exported from a CPU copy
        result = copy.deepcopy(result).cpu()
    args = _example_args(result) if example_inputs is None else (
        tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,))
    args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)
    was_training = result.training
    result.eval()
    try:
        try:
            program = torch.export.export(result, args, dynamic_shapes=dynamic)
            return program, {"dynamic_batch": True, "example_shapes": [_shape(a) for a in args]}
        except Exception as exc:  # torch.export raises many types for a specialised batch
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            warnings.warn(f"model.pt2 is exported for batch size {args[0].shape[0]} only: a dynamic batch "
                          f"dimension failed ({reason})", stacklevel=3)
            program = torch.export.export(result, args)
            return program, {"dynamic_batch": False, "reason": reason, "example_shapes": [_shape(a) for a in args]}
    finally:
        result.train(was_training)


def _example_args(result: nn.Module) -> tuple:
    """Random inputs of the shapes recorded on the graph's placeholders (batch of 2:
    torch.export specialises a batch of 1)."""
    if not isinstance(result, fx.GraphModule):
        raise ValueError("pass example_inputs= to fxzip.save: the result is not a GraphModule with recorded "
                         "input shapes")
    args = []
    for node in result.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None:
            if node.args:  # an optional input with a default (timm's attn_mask=None)
                break
            raise ValueError(f"input {node.name!r} has no recorded shape; pass example_inputs= to fxzip.save")
        shape = list(meta.shape)
        if shape:
            shape[0] = max(2, shape[0])
        device = next((t.device for t in result.parameters()), torch.device("cpu"))
        if meta.dtype.is_floating_point:
            args.append(torch.randn(shape, dtype=meta.dtype, device=device))
        else:
            args.append(torch.zeros(shape, dtype=meta.dtype, device=device))
    return tuple(args)


def _shape(a: Any) -> Any:
    return list(a.shape) if isinstance(a, torch.Tensor) else None


def _save_tensors(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses tensors that share memory (tied weights): every entry
    is written as its own contiguous copy, under the state_dict's own names."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(path),
              metadata={"format": "pt", "producer": "fxzip"})


def _copy_weights(module: nn.Module, state: Mapping[str, torch.Tensor], source: Path) -> None:
    """Weights of the saved GraphModule into the exported program's module (its
    parameters and buffers keep the GraphModule's names; constants the program
    folded in, such as the heads' gather indices, are not replaced)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        raise ValueError(f"{source} does not match model.pt2 (missing {missing[:4]}, shapes differ {wrong[:4]}); "
                         "the directory mixes files of two results: save the result again")
    module.load_state_dict({k: state[k] for k in own}, strict=True)


def _eval(module: nn.Module) -> None:
    module.eval()


def _read_json(root: Path) -> dict[str, Any]:
    path = root / REPORT_JSON
    return json.loads(path.read_text()) if path.exists() else {}


def _report_of(result: nn.Module) -> MergeReport | None:
    meta = getattr(result, "meta", None)
    report = meta.get("fxzip") if isinstance(meta, dict) else None
    return report if isinstance(report, MergeReport) else None
