"""Can fxzip's channel analysis run on torch.export's graphs? A measured prototype.

The question behind it: fxzip traces with torch.fx, which stops at whatever
level a library chose (modules, functions wrapped for fx), so every library
brings names the analysis must learn. ``torch.export`` (non-strict) captures
any of them, with the batch dimension symbolic, into a graph of ATen ops. The
pre-dispatch ATen graph (no ``run_decompositions``) keeps ``linear``,
``conv2d``, ``layer_norm``, ``scaled_dot_product_attention`` whole, so heads and
groups stay visible, and a short table can rename each ATen op to the torch
function fxzip's rules already know (``aten.linear`` -> ``F.linear``, argument
order adapted where it differs). This script measures, per model:

* export: success (with a dynamic batch dimension), seconds, distinct ATen ops,
  and which of them the prototype table does not map yet;
* the analysis on the normalised export graph against today's fx path: the
  same number and sizes of feature spaces;
* a self-merge of the exported graph: max |merged - model| / max |model|.

The table here is a prototype for the measurement, not the library's: it
covers what the panel needs and says what it does not. Run::

    python benchmarks/export_prototype.py            # writes results/export_prototype.{json,md}
"""
from __future__ import annotations

import argparse
import json
import operator
import platform
import subprocess
import sys
import time
import traceback
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from common import RESULTS, ROOT, redraw

aten = torch.ops.aten


def _same(fn: Callable) -> Callable:
    return lambda n: ("call_function", fn, n.args, n.kwargs)


def _method(name: str) -> Callable:
    return lambda n: ("call_method", name, n.args, n.kwargs)


def _slice(n: fx.Node) -> tuple:
    defaults = [None, 0, None, None, 1]  # aten.slice.Tensor(self, dim=0, start=None, end=None, step=1)
    x, dim, start, end, step = list(n.args) + defaults[len(n.args):]
    index = (slice(None),) * dim + (slice(start, end, step),)
    return "call_function", operator.getitem, (x, index), {}


def _select(n: fx.Node) -> tuple:
    x, dim, index = n.args
    return "call_function", operator.getitem, (x, (slice(None),) * dim + (index,)), {}


def _identity(n: fx.Node) -> None:
    return None


NORMALISE: dict[Any, Callable] = {
    aten.conv1d: _same(F.conv1d), aten.conv2d: _same(F.conv2d), aten.linear: _same(F.linear),
    aten.relu: _same(torch.relu), aten.relu_: _same(torch.relu), aten.gelu: _same(F.gelu),
    aten.silu: _same(F.silu), aten.silu_: _same(F.silu), aten.sigmoid: _same(torch.sigmoid),
    aten.hardswish: _same(F.hardswish), aten.hardswish_: _same(F.hardswish),
    aten.hardsigmoid: _same(F.hardsigmoid), aten.tanh: _same(torch.tanh),
    aten.max_pool2d: _same(F.max_pool2d), aten.avg_pool2d: _same(F.avg_pool2d),
    aten.adaptive_avg_pool2d: _same(F.adaptive_avg_pool2d), aten.flatten: _same(torch.flatten),
    aten.cat: _same(torch.cat), aten.permute: _same(torch.permute), aten.transpose: _same(torch.transpose),
    aten.unbind: _same(torch.unbind), aten.select: _select, aten.pad: _same(F.pad), aten.chunk: _same(torch.chunk),
    aten.scaled_dot_product_attention: _same(F.scaled_dot_product_attention), aten.mean: _same(torch.mean),
    aten.softmax: _same(torch.softmax), aten.matmul: _same(torch.matmul), aten.mul: _same(torch.mul),
    aten.sub: _same(torch.sub), aten.add: _same(torch.add), aten.add_: _same(torch.add),
    aten.div: _same(torch.div), aten.neg: _same(torch.neg), aten.rsqrt: _same(torch.rsqrt),
    aten.pow: _same(torch.pow), aten.roll: _same(torch.roll),
    aten.view: _method("view"), aten.reshape: _method("reshape"), aten.expand: _method("expand"),
    aten.contiguous: _method("contiguous"), aten.unsqueeze: _method("unsqueeze"),
    aten.squeeze: _method("squeeze"), aten.sym_size: _method("size"), aten.new_zeros: _method("new_zeros"),
    aten.slice: _slice,
    aten.layer_norm: lambda n: ("call_function", F.layer_norm, n.args[:5], {}),
    aten.batch_norm: lambda n: ("call_function", F.batch_norm,
                                (n.args[0], n.args[3], n.args[4], n.args[1], n.args[2], *n.args[5:8]), {}),
    aten.dropout: _identity, aten.dropout_: _identity, aten.alias: _identity,
}
"""ATen overload packet -> (op, torch-level target, args, kwargs), or None for an
identity in eval mode."""


def normalise(gm: fx.GraphModule) -> list[str]:
    """Rename the ATen ops of an exported graph to torch-level ops, in place;
    returns the ATen ops left as they are (what the table does not know)."""
    unknown = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        rewrite = NORMALISE.get(node.target.overloadpacket)
        if rewrite is None:
            unknown.add(str(node.target))
            continue
        new = rewrite(node)
        if new is None:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            continue
        node.op, node.target, node.args, node.kwargs = new
    gm.graph._codegen = fx.graph.CodeGen()  # positional inputs, flat outputs (no pytree specs)
    gm.graph.lint()
    gm.recompile()
    return sorted(unknown)


def panel() -> list[tuple[str, Callable[[], torch.nn.Module], tuple]]:
    import timm
    import torchvision

    def tm(name: str, size: int):
        return (f"timm/{name}", lambda: timm.create_model(name, num_classes=10), (torch.randn(4, 3, size, size),))

    def tv(name: str, size: int):
        return (f"torchvision/{name}", lambda: torchvision.models.get_model(name, weights=None, num_classes=10),
                (torch.randn(4, 3, size, size),))

    rows = [tm("resnet18", 64), tm("convnext_atto", 64), tm("efficientnet_b0", 64), tm("mobilenetv3_small_100", 64),
            tm("vit_tiny_patch16_224", 224), tm("swin_tiny_patch4_window7_224", 224),
            tv("resnet18", 64), tv("efficientnet_b0", 64), tv("convnext_tiny", 64), tv("swin_t", 64),
            tv("shufflenet_v2_x0_5", 64), tv("mobilenet_v3_small", 64)]
    try:
        import transformers as T
    except ImportError:
        return rows
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=100, max_position_embeddings=64)
    ids = (torch.randint(0, 100, (4, 16)), torch.ones(4, 16, dtype=torch.long))
    rows += [
        ("transformers/GPT2LMHeadModel",
         lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                               bos_token_id=0, eos_token_id=0)), ids),
        ("transformers/LlamaForCausalLM", lambda: T.LlamaForCausalLM(T.LlamaConfig(**small)), ids),
        ("transformers/LlamaForCausalLM-GQA",
         lambda: T.LlamaForCausalLM(T.LlamaConfig(**small, num_key_value_heads=2)), ids),
        ("transformers/BertForMaskedLM", lambda: T.BertForMaskedLM(T.BertConfig(**small)), ids),
    ]
    return rows


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in (out if isinstance(out, (list, tuple)) else []) for t in _tensors(o)]


def measure(name: str, make: Callable[[], torch.nn.Module], inputs: tuple) -> dict[str, Any]:
    import fxzip
    from fxzip.trace import _propagate

    row: dict[str, Any] = {"model": name}
    model = redraw(make().eval(), 0)
    if hasattr(model, "config"):
        model.config.use_cache = False
    kwargs = {"input_ids": inputs[0], "attention_mask": inputs[1]} if name.startswith("transformers") else None
    start = time.perf_counter()
    try:
        batch = torch.export.Dim("batch", min=1)
        if kwargs is None:
            ep = torch.export.export(model, inputs, dynamic_shapes=({0: batch},), strict=False)
        else:
            ep = torch.export.export(model, (), kwargs, dynamic_shapes={k: {0: batch} for k in kwargs}, strict=False)
        row["export_s"] = round(time.perf_counter() - start, 2)
    except Exception as exc:  # noqa: BLE001 - the measurement records it
        row["export"] = _first_line(exc)
        return row
    row["export"] = "ok"
    unlifted = ep.module()
    gm = fx.GraphModule(unlifted, unlifted.graph)
    row["aten_ops"] = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
    row["unmapped"] = normalise(gm)
    row["state_dict_names_kept"] = set(gm.state_dict()) == set(model.state_dict())
    with_stack = [n for n in gm.graph.nodes if n.op == "call_function"]
    row["nn_module_stack"] = round(sum("nn_module_stack" in n.meta for n in with_stack) / max(len(with_stack), 1), 3)
    try:
        _propagate(gm, gm, inputs)
        start = time.perf_counter()
        analysis = fxzip.analyze(gm)
        row["analysis_s"] = round(time.perf_counter() - start, 2)
        row["spaces_export"] = sorted(s.size for s in analysis.spaces)
        row["mergeable_export"] = sum(s.mergeable for s in analysis.spaces)
    except Exception as exc:  # noqa: BLE001
        row["analysis"] = _first_line(exc)
        return row
    try:
        fx_spaces = fxzip.analyze(fxzip.trace(model, inputs[0] if kwargs is None else inputs)).spaces
        row["spaces_fx"] = sorted(s.size for s in fx_spaces)
        row["mergeable_fx"] = sum(s.mergeable for s in fx_spaces)
    except Exception as exc:  # noqa: BLE001
        row["fx"] = _first_line(exc)
    try:
        merged = fxzip.merge(gm, gm, data=[inputs, tuple(t[:3] for t in inputs)], inputs=lambda b: b,
                             progress=False, reset_bn=False)
        with torch.no_grad():
            want, got = _tensors(model(*inputs) if kwargs is None else model(**kwargs)), _tensors(merged(*inputs))
        row["self_merge_error"] = float(max((a - b).abs().max() / a.abs().max() for a, b in zip(want, got)))
    except Exception as exc:  # noqa: BLE001
        row["merge"] = _first_line(exc)
        row["merge_where"] = traceback.format_exc().strip().splitlines()[-3][:200]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(RESULTS / "export_prototype"))
    parser.add_argument("--models", nargs="*", help="names from the panel (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows = []
    for name, make, inputs in panel():
        if args.models and name not in args.models and name.split("/")[-1] not in args.models:
            continue
        row = measure(name, make, inputs)
        print(json.dumps(row)[:400], flush=True)
        rows.append(row)
    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    setting = {"command": "python " + " ".join(sys.argv), "commit": commit, "torch": torch.__version__,
               "machine": f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} torch thread",
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(args.out + ".json", "w") as f:
        json.dump({"setting": setting, "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(_markdown(setting, rows))


def _markdown(setting: dict, rows: list[dict]) -> str:
    lines = ["# torch.export + a normalisation table under fxzip's analysis (prototype measurement)", "",
             f"Command: `{setting['command']}` ({setting['date']}; commit `{setting['commit']}`; torch "
             f"{setting['torch']}; {setting['machine']}). Random weights (O(1) redraw), batch 4, dynamic batch "
             "dimension (`Dim('batch', min=1)`), non-strict export without decompositions; the analysis runs on "
             "the exported graph after the ATen ops are renamed to torch-level ops by the table in "
             "`benchmarks/export_prototype.py`.", "",
             "A self-merge is exact whenever the graph runs, whatever is merged; the mergeable spaces say what "
             "is: an op the table leaves unmapped (`aten.embedding` here) makes its output untracked, so a "
             "language model's residual stream is then kept like the model input, not merged.", "",
             "| model | export (s) | ATen ops | unmapped | spaces = fx path | mergeable export / fx | "
             "self-merge rel. error | state_dict names kept | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = ("-" if "spaces_export" not in r or "spaces_fx" not in r else
                "yes" if r["spaces_export"] == r["spaces_fx"] else
                f"no ({len(r.get('spaces_export', []))} vs {len(r.get('spaces_fx', []))})"
                if "spaces_fx" in r and "spaces_export" in r else "-")
        note = r.get("merge") or r.get("analysis") or r.get("fx") or ("" if r["export"] == "ok" else r["export"])
        err = f"{r['self_merge_error']:.1e}" if "self_merge_error" in r else "-"
        lines.append(f"| {r['model']} | {r.get('export_s', '-')} | {len(r.get('aten_ops', []))} | "
                     f"{', '.join(r.get('unmapped', [])) or '-'} | {same} | "
                     f"{r.get('mergeable_export', '-')} / {r.get('mergeable_fx', '-')} | {err} | "
                     f"{r.get('state_dict_names_kept', '-')} | {note[:160].replace('|', '/')} |")
    ops = sorted({o for r in rows for o in r.get("aten_ops", [])})
    exported = sum(r["export"] == "ok" for r in rows)
    merged = sum(r.get("self_merge_error", 1.0) <= 1e-5 for r in rows)
    fx_ok = sum("spaces_fx" in r for r in rows)
    same = sum("mergeable_fx" in r and r.get("mergeable_export") == r["mergeable_fx"] for r in rows)
    nothing = [r["model"] for r in rows if r.get("mergeable_export") == 0]
    lines += ["", f"Exported with a dynamic batch: {exported} of {len(rows)}; analysed and self-merged exactly "
              f"(<= 1e-5) on the export graph: {merged} of {len(rows)}, of which {same} merge as many spaces as "
              f"the fx path; merging nothing on the export graph: {', '.join(nothing) or 'none'}. Today's fx "
              f"path traces and analyses {fx_ok} of {len(rows)}. Distinct ATen ops over the panel: {len(ops)}; "
              f"the prototype table maps {len(NORMALISE)} op packets (ops it leaves unmapped and no analysed "
              "tensor reaches, such as the mask arithmetic of the language models, do not stop the analysis).", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
