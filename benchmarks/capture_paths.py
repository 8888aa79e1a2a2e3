"""Capture paths side by side: fxzip's torch.fx trace + analysis vs torch.export (non-strict) and core ATen.

    python benchmarks/capture_paths.py            # -> benchmarks/results/capture_paths.{json,md}
    python benchmarks/capture_paths.py --models timm:resnet18 tv:raft_small --timeout 300

Measurements for a design question (should fxzip's analysis run on a torch.export graph instead of a
torch.fx symbolic trace?); this script only measures. For every panel model, each part runs in its own
subprocess with a timeout, so a hang or a crash costs one cell, not the run:

* ``fx``: ``fxzip.trace(model, x)`` then ``fxzip.analyze(gm)``: outcome (or stage + first line of the
  error), seconds of each, graph nodes, the distinct call targets, and which of them are *library names*
  (a call_function target whose ``__module__`` is not under torch / operator / builtins, or a call_module
  whose class is not a ``torch.nn`` module);
* ``export``: ``torch.export.export(model, (x,), strict=False)`` (the pre-dispatch training-IR ATen graph,
  no decompositions): seconds, nodes, distinct ATen ops, ``nn_module_stack`` coverage (fraction of
  call_function nodes carrying it, and whether the paths it names are the model's own module paths),
  whether ``ep.state_dict`` keys equal ``model.state_dict()`` keys; then ``ep.run_decompositions()``
  (core ATen): seconds, nodes, distinct ops, the same two checks, and which ops disappear / appear;
* ``dynamic``: the same export with the batch dimension a ``torch.export.Dim``; if it succeeds, the
  exported module is run at another batch size and compared with the eager model.

Inputs are random, CPU, batch 2, one torch thread. Models: timm and torchvision with random weights,
a plain ``nn.TransformerEncoder`` (batch_first), a small ``nn.Sequential`` with GroupNorm and RMSNorm (the
one row with those two norms), and, when ``transformers`` is importable (else the rows are marked skipped),
tiny random GPT-2 and Llama causal LMs (2 layers, width 64, vocabulary 128, ``use_cache=False``).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import common

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
PARTS = ("fx", "export", "dynamic")

# name -> (source, constructor name, input spec). Input specs: ("img", size) one image batch,
# ("img2", size) two image batches (optical flow), ("seq", length, width) a (B, L, D) sequence,
# ("ids", length) token ids.
PANEL: dict[str, tuple] = {
    "timm:resnet18": ("timm", "resnet18", ("img", 64)),
    "timm:convnext_atto": ("timm", "convnext_atto", ("img", 64)),
    "timm:efficientnet_b0": ("timm", "efficientnet_b0", ("img", 64)),
    "timm:vit_tiny_patch16_224": ("timm", "vit_tiny_patch16_224", ("img", 224)),
    "timm:swin_tiny_patch4_window7_224": ("timm", "swin_tiny_patch4_window7_224", ("img", 224)),
    "timm:mobilenetv3_small_100": ("timm", "mobilenetv3_small_100", ("img", 64)),
    "timm:levit_128s": ("timm", "levit_128s", ("img", 224)),
    "timm:coat_lite_tiny": ("timm", "coat_lite_tiny", ("img", 224)),
    "timm:maxvit_nano_rw_256": ("timm", "maxvit_nano_rw_256", ("img", 256)),
    "tv:resnet18": ("tv", "resnet18", ("img", 64)),
    "tv:efficientnet_b0": ("tv", "efficientnet_b0", ("img", 64)),
    "tv:convnext_tiny": ("tv", "convnext_tiny", ("img", 64)),
    "tv:maxvit_t": ("tv", "maxvit_t", ("img", 224)),
    "tv:swin_t": ("tv", "swin_t", ("img", 224)),
    "tv:shufflenet_v2_x0_5": ("tv", "shufflenet_v2_x0_5", ("img", 64)),
    "tv:vit_b_16": ("tv", "vit_b_16", ("img", 224)),
    "tv:raft_small": ("tv", "raft_small", ("img2", 128)),
    "tv:deeplabv3_mobilenet_v3_large": ("tv", "deeplabv3_mobilenet_v3_large", ("img", 128)),
    "nn:TransformerEncoder": ("nn", "TransformerEncoder", ("seq", 16, 64)),
    # not in the panel: the only row with GroupNorm and RMSNorm (the transformers rows, which would
    # have RMSNorm, need `transformers`)
    "nn:GroupNorm_RMSNorm": ("nn", "GroupNorm_RMSNorm", ("img", 32)),
    "hf:GPT2LMHeadModel": ("hf", "GPT2LMHeadModel", ("ids", 16)),
    "hf:LlamaForCausalLM": ("hf", "LlamaForCausalLM", ("ids", 16)),
}
BATCH = 2          # example batch (export specialises a dynamic dim whose example is 0 or 1)
OTHER_BATCH = 3    # the dynamic export is run at this batch too

# High-level ATen ops whose presence before / after run_decompositions() the table reports.
WATCHED = ["aten.linear", "aten.matmul", "aten.scaled_dot_product_attention", "aten.layer_norm",
           "aten.native_layer_norm", "aten.group_norm", "aten.native_group_norm", "aten.rms_norm",
           "aten.batch_norm", "aten._native_batch_norm_legit_no_training",
           "aten._native_batch_norm_legit_functional", "aten.conv2d", "aten.convolution",
           "aten.addmm", "aten.mm", "aten.bmm", "aten.einsum", "aten.softmax", "aten._softmax",
           "aten.gelu", "aten.silu", "aten.hardswish", "aten.adaptive_avg_pool2d", "aten.mean",
           "aten.view", "aten.reshape", "aten.permute", "aten.transpose"]
TORCH_SIDE = {"torch", "operator", "_operator", "builtins"}


# ----------------------------------------------------------------------------- models and inputs

def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


def build(key: str):
    """The model (eval mode, random weights) and a function batch -> example inputs (a tuple)."""
    import torch
    src, name, spec = PANEL[key]
    torch.manual_seed(0)
    if src == "timm":
        import timm
        model = timm.create_model(name, pretrained=False)
    elif src == "tv":
        import torchvision.models as tvm
        import torchvision.models.optical_flow as flow
        import torchvision.models.segmentation as seg
        if name == "raft_small":
            model = flow.raft_small(weights=None)
        elif name.startswith("deeplabv3"):
            model = getattr(seg, name)(weights=None, weights_backbone=None)
        else:
            model = getattr(tvm, name)(weights=None)
    elif src == "nn" and name == "GroupNorm_RMSNorm":
        nn = torch.nn
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.RMSNorm(32),
                              nn.Linear(32, 10))
    elif src == "nn":
        layer = torch.nn.TransformerEncoderLayer(d_model=spec[2], nhead=4, dim_feedforward=2 * spec[2],
                                                 batch_first=True)
        model = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    elif src == "hf":
        import transformers as tf
        if name == "GPT2LMHeadModel":
            cfg = tf.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=128, n_positions=64)
            model = tf.GPT2LMHeadModel(cfg)
        else:
            cfg = tf.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 hidden_size=64, intermediate_size=128, vocab_size=128,
                                 max_position_embeddings=64)
            model = tf.LlamaForCausalLM(cfg)
        model.config.use_cache = False
    else:
        raise KeyError(key)
    model.eval()

    def inputs(batch: int) -> tuple:
        g = torch.Generator().manual_seed(batch)
        if spec[0] == "img":
            return (torch.randn(batch, 3, spec[1], spec[1], generator=g),)
        if spec[0] == "img2":
            return tuple(torch.randn(batch, 3, spec[1], spec[1], generator=g) for _ in range(2))
        if spec[0] == "seq":
            return (torch.randn(batch, spec[1], spec[2], generator=g),)
        return (torch.randint(0, 128, (batch, spec[1]), generator=g),)
    return model, inputs


def spec_text(key: str) -> str:
    spec = PANEL[key][2]
    return {"img": lambda: f"{BATCH}x3x{spec[1]}x{spec[1]}", "img2": lambda: f"2 x ({BATCH}x3x{spec[1]}x{spec[1]})",
            "seq": lambda: f"{BATCH}x{spec[1]}x{spec[2]}", "ids": lambda: f"{BATCH}x{spec[1]} ids"}[spec[0]]()


# ----------------------------------------------------------------------------- helpers

def first_line(exc: BaseException, limit: int = 600) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:limit]


def first_lines(exc: BaseException, n: int = 3, limit: int = 600) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: " + " | ".join(lines[:n])[:limit]


def fx_target(gm, node) -> tuple[str, bool]:
    """(name, is a library name) of an fx call node."""
    if node.op == "call_module":
        cls = type(gm.get_submodule(node.target))
        mod = cls.__module__ or ""
        return f"module:{mod}.{cls.__qualname__}", not (mod == "torch.nn" or mod.startswith("torch.nn."))
    if node.op == "call_method":
        return f"Tensor.{node.target}", False
    t = node.target
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    if not mod and hasattr(t, "__self__"):  # builtin methods bound to a module object
        mod = getattr(getattr(t, "__self__"), "__name__", "") or ""
    return f"{mod}.{name}" if mod else name, mod.split(".")[0] not in TORCH_SIDE


def aten_name(target) -> str:
    """'aten.conv2d.default' for an OpOverload; 'operator.getitem' etc. for Python callables."""
    import torch
    if isinstance(target, torch._ops.OpOverload) or isinstance(target, torch._ops.HigherOrderOperator):
        s = str(target)
        return s if not isinstance(target, torch._ops.HigherOrderOperator) else f"higher_order.{target.name()}"
    mod = getattr(target, "__module__", None) or ""
    return f"{mod}.{getattr(target, '__name__', str(target))}".lstrip(".")


def packet(op: str) -> str:
    """'aten.conv2d.default' -> 'aten.conv2d' (the overload packet)."""
    parts = op.split(".")
    return ".".join(parts[:2]) if parts[0] in ("aten", "prims", "quantized_decomposed") and len(parts) >= 3 else op


def n_calls(graph) -> int:
    return sum(n.op in ("call_function", "call_method", "call_module") for n in graph.nodes)


def graph_ops(graph) -> dict[str, int]:
    return dict(Counter(aten_name(n.target) for n in graph.nodes if n.op == "call_function"))


def module_stack_stats(graph, module_paths: set[str]) -> dict:
    """Fraction of call_function nodes with a non-empty nn_module_stack, and of those whose every named
    path is one of the model's own ``named_modules()`` paths (after stripping export's prefixes)."""
    calls = [n for n in graph.nodes if n.op == "call_function"]
    with_stack = [n for n in calls if n.meta.get("nn_module_stack")]
    valid, deep, samples = 0, 0, []
    for n in with_stack:
        paths = [v[0] for v in n.meta["nn_module_stack"].values()]
        paths = [p[len("L['self']."):] if p.startswith("L['self'].") else p for p in paths]
        if all(p in module_paths for p in paths):
            valid += 1
        if paths and paths[-1]:
            deep += 1
    step = max(1, len(with_stack) // 4)
    for n in with_stack[::step][:4]:
        path, cls = list(n.meta["nn_module_stack"].values())[-1]
        samples.append(f"{n.name} ({aten_name(n.target)}) -> {path or '<root>'} [{str(cls).split('.')[-1]}]")
    frac = (lambda k: round(k / len(calls), 3) if calls else None)
    return {"call_function_nodes": len(calls), "with_stack": frac(len(with_stack)),
            "paths_are_model_modules": round(valid / len(with_stack), 3) if with_stack else None,
            "below_root": frac(deep), "samples": samples}


def state_dict_map(ep_keys, model_keys) -> dict:
    a, b = set(ep_keys), set(model_keys)
    return {"equal": a == b, "graph_keys": len(a), "model_keys": len(b),
            "missing_in_graph": sorted(b - a)[:5], "n_missing": len(b - a),
            "extra_in_graph": sorted(a - b)[:5], "n_extra": len(a - b)}


def sd_cell(d: dict | None) -> str:
    if not d:
        return ""
    if d["equal"]:
        return "yes"
    return "no (" + ", ".join(x for x in (f"-{d['n_missing']} missing" if d["n_missing"] else "",
                                          f"+{d['n_extra']} extra" if d["n_extra"] else "") if x) + ")"


def flat_tensors(out) -> list:
    import torch
    from torch.utils._pytree import tree_flatten
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        out = out.to_tuple()
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


# ----------------------------------------------------------------------------- the three parts (child)

def plain_fx(model) -> dict:
    """torch.fx.symbolic_trace on a copy, for reference: which library names plain fx stops at."""
    import copy

    import torch.fx
    try:
        t0 = time.perf_counter()
        gm = torch.fx.symbolic_trace(copy.deepcopy(model))
        targets = {}
        for n in gm.graph.nodes:
            if n.op in ("call_function", "call_method", "call_module"):
                name, lib = fx_target(gm, n)
                targets[name] = lib
        return {"ok": True, "s": round(time.perf_counter() - t0, 3), "nodes": len(gm.graph.nodes),
                "targets": sorted(targets), "library_targets": sorted(k for k, v in targets.items() if v)}
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "error": first_line(exc)}


def part_fx(key: str) -> dict:
    import fxzip
    rec: dict = {}
    stage = "create"
    try:
        model, inputs = build(key)
        rec["plain_fx"] = plain_fx(model)
        x = inputs(BATCH)
        stage = "trace"
        t0 = time.perf_counter()
        gm = fxzip.trace(model, x if len(x) > 1 else x[0])
        rec["trace_s"] = round(time.perf_counter() - t0, 3)
        rec["trace_path"] = "concrete" if any("fxzip_concrete_kind" in n.meta for n in gm.graph.nodes) else "symbolic"
        rec["nodes"] = len(gm.graph.nodes)
        rec["calls"] = n_calls(gm.graph)
        targets: dict[str, bool] = {}
        for n in gm.graph.nodes:
            if n.op in ("call_function", "call_method", "call_module"):
                name, lib = fx_target(gm, n)
                targets[name] = lib
        rec["targets"] = sorted(targets)
        rec["library_targets"] = sorted(k for k, v in targets.items() if v)
        rec["state_dict"] = state_dict_map(gm.state_dict().keys(), model.state_dict().keys())
        stage = "analysis"
        t0 = time.perf_counter()
        an = fxzip.analyze(gm)
        rec["analysis_s"] = round(time.perf_counter() - t0, 3)
        rec["spaces"] = len(an.spaces)
        rec["mergeable"] = sum(sp.mergeable for sp in an.spaces)
        rec["ok"] = True
    except Exception as exc:  # noqa: BLE001 - every refusal is a result
        rec.update(ok=False, stage=stage, error=first_line(exc), error_more=first_lines(exc))
    return rec


def _summary(program, paths: set, model_keys: list) -> dict:
    """Nodes, calls, ops, module-stack coverage and state_dict names of an exported program."""
    graph = program.graph
    return {"nodes": len(graph.nodes), "calls": n_calls(graph), "ops": graph_ops(graph),
            "module_stack": module_stack_stats(graph, paths),
            "state_dict": state_dict_map(program.state_dict.keys(), model_keys)}


def part_export(key: str) -> dict:
    import torch
    rec: dict = {}
    stage = "create"
    try:
        model, inputs = build(key)
        x = inputs(BATCH)
        paths = {n for n, _ in model.named_modules(remove_duplicate=False)}
        msd = list(model.state_dict().keys())
        stage = "export"
        t0 = time.perf_counter()
        ep = torch.export.export(model, x, strict=False)
        rec["export_s"] = round(time.perf_counter() - t0, 3)
        rec["export"] = {**_summary(ep, paths, msd), "constants": sorted(ep.constants)[:5],
                         "n_constants": len(ep.constants)}
        ops = rec["export"]["ops"]
        rec["ok"] = True
        stage = "run_decompositions"
        t0 = time.perf_counter()
        core = ep.run_decompositions()
        rec["decomp_s"] = round(time.perf_counter() - t0, 3)
        rec["core"] = _summary(core, paths, msd)
        cops = rec["core"]["ops"]
        pre, post = {packet(o) for o in ops}, {packet(o) for o in cops}
        rec["disappear"] = sorted(pre - post)
        rec["appear"] = sorted(post - pre)
        rec["core_ok"] = True
    except Exception as exc:  # noqa: BLE001
        rec.update(stage=stage, error=first_line(exc), error_more=first_lines(exc))
        rec.setdefault("ok", False)
        rec.setdefault("core_ok", False)
    return rec


def part_dynamic(key: str) -> dict:
    import torch
    from torch.export import Dim
    rec: dict = {}
    stage = "create"
    try:
        model, inputs = build(key)
        x = inputs(BATCH)
        batch = Dim("batch")
        stage = "export"
        t0 = time.perf_counter()
        ep = torch.export.export(model, x, dynamic_shapes=tuple({0: batch} for _ in x), strict=False)
        rec["export_s"] = round(time.perf_counter() - t0, 3)
        rec["ok"] = True
        stage = f"run at batch {OTHER_BATCH}"
        y = inputs(OTHER_BATCH)
        with torch.no_grad():
            got, want = flat_tensors(ep.module()(*y)), flat_tensors(model(*y))
        rec["other_batch_runs"] = True
        rec["other_batch_max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(got, want)) \
            if got and len(got) == len(want) and all(a.shape == b.shape for a, b in zip(got, want)) else None
    except Exception as exc:  # noqa: BLE001
        rec.update(stage=stage, error=first_line(exc), error_more=first_lines(exc))
        rec.setdefault("ok", False)
    return rec


def child(key: str, part: str, to: str) -> None:
    import torch
    torch.set_num_threads(1)
    import warnings
    warnings.filterwarnings("ignore")
    rec = {"fx": part_fx, "export": part_export, "dynamic": part_dynamic}[part](key)
    Path(to).write_text(json.dumps(rec))


# ----------------------------------------------------------------------------- driver

def git_state() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.rstrip()
    return {"commit": git("rev-parse", "HEAD").strip()[:10],
            "dirty_library_files": [ln[3:] for ln in git("status", "--porcelain", "--", "fxzip", "passes").splitlines()]}


def machine() -> dict:
    return common.machine(("torch", "torchvision", "timm", "transformers"))


def run_part(key: str, part: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        to = Path(tmp) / "rec.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", key, part, str(to)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "stage": "timeout", "error": f"timeout after {timeout:.0f} s",
                    "wall_s": round(time.perf_counter() - t0, 1)}
        wall = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0 or not to.exists():
            tail = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()][-1:] or [""]
            return {"ok": False, "stage": "process", "error": f"exit {proc.returncode}: {tail[0][:300]}",
                    "wall_s": wall}
        rec = json.loads(to.read_text())
        rec["wall_s"] = wall
        return rec


# ----------------------------------------------------------------------------- report

def _cell(s, n: int = 110) -> str:
    s = "" if s is None else str(s)
    s = s.replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= n else s[: n - 1] + "…"


def _fmt(v, nd=2):
    return "" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def summary(result: dict) -> dict:
    recs = [r for r in result["records"] if not r.get("skipped")]
    fx_ok = [r for r in recs if r["fx"].get("ok")]
    fx_traced = [r for r in recs if "nodes" in r["fx"]]
    plain = [r for r in recs if r["fx"].get("plain_fx", {}).get("ok")]
    ex_ok = [r for r in recs if r["export"].get("ok")]
    core_ok = [r for r in recs if r["export"].get("core_ok")]
    dyn_ok = [r for r in recs if r["dynamic"].get("ok")]

    def union(rs, f):
        return set().union(*(f(r) for r in rs)) if rs else set()
    fx_union = union(fx_traced, lambda r: r["fx"]["targets"])
    lib_union = union(fx_traced, lambda r: r["fx"]["library_targets"])
    plain_lib_union = union(plain, lambda r: r["fx"]["plain_fx"]["library_targets"])
    pre_union = union(ex_ok, lambda r: r["export"]["export"]["ops"])
    core_union = union(core_ok, lambda r: r["export"]["core"]["ops"])
    both = [r for r in recs if r["fx"].get("ok") and r["export"].get("core_ok")]
    common = [r for r in fx_traced if r["export"].get("core_ok")]

    def tot(rs, f):
        return round(sum(f(r) for r in rs), 1)
    return {
        "models": len(recs),
        "fx_trace_ok": len(fx_traced), "fx_analysis_ok": len(fx_ok), "plain_fx_ok": len(plain),
        "export_ok": len(ex_ok), "core_ok": len(core_ok), "dynamic_ok": len(dyn_ok),
        "dynamic_other_batch_runs": sum(bool(r["dynamic"].get("other_batch_runs")) for r in recs),
        "fx_ok_export_fail": [r["model"] for r in recs if r["fx"].get("ok") and not r["export"].get("ok")],
        "export_ok_fx_fail": [r["model"] for r in recs if r["export"].get("ok") and not r["fx"].get("ok")],
        "union_fx_targets": len(fx_union), "union_fx_library_targets": len(lib_union),
        "union_fx_library_names": sorted(lib_union),
        "models_with_library_targets": sum(bool(r["fx"]["library_targets"]) for r in fx_traced),
        "union_plain_fx_library_targets": len(plain_lib_union), "union_plain_fx_library_names": sorted(plain_lib_union),
        "plain_fx_models_with_library_targets": sum(bool(r["fx"]["plain_fx"]["library_targets"]) for r in plain),
        "union_export_ops": len(pre_union), "union_export_packets": len({packet(o) for o in pre_union}),
        "union_core_ops": len(core_union), "union_core_packets": len({packet(o) for o in core_union}),
        "union_fx_target_names": sorted(fx_union), "union_export_op_names": sorted(pre_union),
        "union_core_op_names": sorted(core_union),
        "common_models": len(common),
        "common_union_fx_targets": len(union(common, lambda r: r["fx"]["targets"])),
        "common_union_export_ops": len(union(common, lambda r: r["export"]["export"]["ops"])),
        "common_union_core_ops": len(union(common, lambda r: r["export"]["core"]["ops"])),
        "both_ok_models": len(both),
        "both_ok_seconds": {"fx_trace": tot(both, lambda r: r["fx"]["trace_s"]),
                            "fx_analysis": tot(both, lambda r: r["fx"]["analysis_s"]),
                            "export": tot(both, lambda r: r["export"]["export_s"]),
                            "run_decompositions": tot(both, lambda r: r["export"]["decomp_s"])},
        "module_stack_all_nodes": sum(r["export"]["export"]["module_stack"]["with_stack"] == 1.0 for r in ex_ok),
        "module_stack_paths_valid": sum(r["export"]["export"]["module_stack"]["paths_are_model_modules"] == 1.0
                                        for r in ex_ok),
        "core_module_stack_all_nodes": sum(r["export"]["core"]["module_stack"]["with_stack"] == 1.0
                                           for r in core_ok),
        "state_dict_equal_export": sum(r["export"]["export"]["state_dict"]["equal"] for r in ex_ok),
        "state_dict_equal_core": sum(r["export"]["core"]["state_dict"]["equal"] for r in core_ok),
        "state_dict_equal_fx": sum(r["fx"]["state_dict"]["equal"] for r in fx_traced),
        "state_dict_fx_all_model_keys": sum(r["fx"]["state_dict"]["n_missing"] == 0 for r in fx_traced),
    }


def markdown(result: dict) -> str:
    recs = [r for r in result["records"] if not r.get("skipped")]
    skipped = [r for r in result["records"] if r.get("skipped")]
    s = result["summary"]
    L = ["# Capture paths: fxzip's torch.fx trace + analysis vs torch.export (non-strict) and core ATen", "",
         f"- Command: `{result['command']}` ({result['started']}; commit `{result['commit']}`"
         + (f"; uncommitted library files at run time: {', '.join(result['dirty_library_files'])}"
            if result["dirty_library_files"] else "") + ")",
         f"- Machine: {result['machine']}, load_avg_end: {result.get('load_avg_end')}",
         f"- torch {result['versions']['torch']}, torchvision {result['versions']['torchvision']}, "
         f"timm {result['versions']['timm']}, transformers {result['versions']['transformers']}",
         f"- CPU, 1 torch thread, random weights, eval mode, batch {BATCH}; each part (fx, export, dynamic) in "
         f"its own subprocess (timeout {result['timeout_s']:.0f} s). Seconds: wall time of the call alone "
         "(imports and model construction excluded), on a shared 2-core machine.",
         "- fx = `fxzip.trace(model, x)` + `fxzip.analyze(gm)`; plain fx = `torch.fx.symbolic_trace(model)`, "
         "for reference; export = `torch.export.export(model, (x,), strict=False)` (training IR, no "
         "decompositions); core = `ep.run_decompositions()` (default core ATen table); dynamic = export with "
         f"`dynamic_shapes` batch `Dim`, then the exported module run at batch {OTHER_BATCH} against the eager model.",
         "- nodes (calls): all graph nodes (export graphs: parameters and buffers are placeholders) and the "
         "call_function / call_method / call_module nodes among them. ops: distinct call targets.",
         "- *lib* = distinct fx call targets that are library names: call_function targets whose `__module__` "
         "is not under torch / operator / builtins, call_module targets whose class is not a `torch.nn` module.",
         "- *stack* = fraction of the export graph's call_function nodes with a non-empty `nn_module_stack`; "
         "*paths ok* = fraction of those whose every path is one of `model.named_modules(remove_duplicate=False)`; "
         "*sd* = the graph's `state_dict` keys equal `model.state_dict()` keys (else how many are missing / extra).",
         ""]
    for r in skipped:
        L.append(f"- Skipped: {r['model']}: {r['skipped']}")
    if skipped:
        L.append("")
    nc = (lambda d: f"{d['nodes']} ({d['calls']})" if d and "nodes" in d else "")
    L += ["## fx path, per model", "",
          "| model | input | plain fx: targets (lib) | fxzip trace | trace path | trace s | nodes (calls) | "
          "targets (lib) | sd | analysis | analysis s | spaces (mergeable) |",
          "|---|---|---|---|---|---:|---:|---:|---|---|---:|---:|"]
    for r in recs:
        fx = r["fx"]
        pf = fx.get("plain_fx", {})
        pfs = f"{len(pf['targets'])} ({len(pf['library_targets'])})" if pf.get("ok") else ("fail" if pf else "")
        traced = "nodes" in fx
        ts = "ok" if traced else f"fail ({fx.get('stage')})"
        an = "ok" if fx.get("ok") else ("fail" if traced else "")
        L.append(f"| {r['model']} | {r['input']} | {pfs} | {ts} | {fx.get('trace_path', '')} | {_fmt(fx.get('trace_s'))} | "
                 f"{nc(fx)} | " + (f"{len(fx['targets'])} ({len(fx['library_targets'])})" if traced else "")
                 + f" | {sd_cell(fx.get('state_dict'))} | {an} | {_fmt(fx.get('analysis_s'))} | "
                 + (f"{fx['spaces']} ({fx['mergeable']})" if fx.get("ok") else "") + " |")
    L += ["", "## export path, per model", "",
          "| model | export | export s | nodes (calls) | ops | stack | paths ok | sd | core ATen | decomp s | "
          "nodes (calls) | ops | sd | dynamic batch | dyn. export s |",
          "|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---|---|---:|"]
    for r in recs:
        ex, dy = r["export"], r["dynamic"]
        e, c = ex.get("export", {}), ex.get("core", {})
        exs = "ok" if ex.get("ok") else f"fail ({ex.get('stage')})"
        cs = "ok" if ex.get("core_ok") else ("" if not ex.get("ok") else f"fail ({ex.get('stage')})")
        if dy.get("ok"):
            d = dy.get("other_batch_max_abs_diff")
            dys = f"ok (b{OTHER_BATCH} max diff {d:.1e})" if d is not None else \
                ("ok" if dy.get("other_batch_runs") else f"ok; b{OTHER_BATCH} fails")
        else:
            dys = f"fail ({dy.get('stage')})"
        L.append(f"| {r['model']} | {exs} | {_fmt(ex.get('export_s'))} | {nc(e)} | {len(e['ops']) if e else ''} | "
                 f"{_fmt(e['module_stack']['with_stack']) if e else ''} | "
                 f"{_fmt(e['module_stack']['paths_are_model_modules']) if e else ''} | {sd_cell(e.get('state_dict'))} | "
                 f"{cs} | {_fmt(ex.get('decomp_s'))} | {nc(c)} | {len(c['ops']) if c else ''} | "
                 f"{sd_cell(c.get('state_dict'))} | {dys} | {_fmt(dy.get('export_s'))} |")
    L += ["", "## Errors", "", "First line of each error; for export errors whose first line is generic, the "
          "next lines too.", "", "| model | part | stage | error |", "|---|---|---|---|"]
    for r in recs:
        for part in PARTS:
            p = r[part]
            if p.get("error"):
                msg = p["error_more"] if part != "fx" and p.get("error_more") else p["error"]
                L.append(f"| {r['model']} | {part} | {p.get('stage')} | {_cell(msg, 420)} |")
            pf = p.get("plain_fx", {}) if part == "fx" else {}
            if pf and not pf.get("ok"):
                L.append(f"| {r['model']} | plain fx (reference) | symbolic_trace | {_cell(pf['error'], 300)} |")
    L += ["", "## Library names", "",
          "| model | library-name targets in fxzip's graph | in plain `torch.fx.symbolic_trace`'s graph |",
          "|---|---|---|"]
    for r in recs:
        if "library_targets" in r["fx"]:
            pf = r["fx"].get("plain_fx", {})
            pl = (", ".join(pf["library_targets"]) or "-") if pf.get("ok") else "(trace failed)"
            L.append(f"| {r['model']} | {_cell(', '.join(r['fx']['library_targets']) or '-', 400)} | "
                     f"{_cell(pl, 400)} |")
    L += ["", "## High-level ops before / after `run_decompositions()`", "",
          "Per model: ops (overload packets) of the export graph that are gone from core ATen, and those "
          "core ATen adds.", "", "| model | gone in core ATen | new in core ATen |", "|---|---|---|"]
    for r in recs:
        if r["export"].get("core_ok"):
            L.append(f"| {r['model']} | {_cell(', '.join(x.replace('aten.', '') for x in r['export']['disappear']), 500)}"
                     f" | {_cell(', '.join(x.replace('aten.', '') for x in r['export']['appear']), 500)} |")
    watched_rows = []
    for op in WATCHED:
        pre = sum(any(packet(o) == op for o in r["export"]["export"]["ops"]) for r in recs if r["export"].get("ok"))
        post = sum(any(packet(o) == op for o in r["export"]["core"]["ops"]) for r in recs
                   if r["export"].get("core_ok"))
        watched_rows.append(f"| `{op}` | {pre} | {post} |")
    L += ["", f"Watched ops: number of models whose graph has the op (export: {s['export_ok']} graphs, core: "
          f"{s['core_ok']} graphs).", "", "| op | export graphs | core ATen graphs |", "|---|---:|---:|"] + watched_rows
    L += ["", "## `nn_module_stack` samples (export graph)", "",
          "*below root*: fraction of call_function nodes whose innermost module is not the root model.", ""]
    for r in recs:
        if r["export"].get("ok"):
            ms = r["export"]["export"]["module_stack"]
            cms = r["export"].get("core", {}).get("module_stack")
            L.append(f"- {r['model']}: stack {ms['with_stack']}, paths ok {ms['paths_are_model_modules']}, "
                     f"below root {ms['below_root']}" + (f"; core ATen: stack {cms['with_stack']}, paths ok "
                                                         f"{cms['paths_are_model_modules']}" if cms else "")
                     + "; e.g. " + "; ".join(f"`{x}`" for x in ms["samples"][:2]))
    sec = s["both_ok_seconds"]
    L += ["", "## Union of distinct ops over the panel", "",
          "| graph | distinct targets / ops | overload packets |", "|---|---:|---:|",
          f"| fx (fxzip.trace, {s['fx_trace_ok']} graphs) | {s['union_fx_targets']} "
          f"(library names: {s['union_fx_library_targets']}) | |",
          f"| export, no decompositions ({s['export_ok']} graphs) | {s['union_export_ops']} | "
          f"{s['union_export_packets']} |",
          f"| core ATen ({s['core_ok']} graphs) | {s['union_core_ops']} | {s['union_core_packets']} |", "",
          f"Over the {s['common_models']} models that have all three graphs (fxzip trace, export, core ATen): "
          f"fx {s['common_union_fx_targets']} targets, export {s['common_union_export_ops']} ops, core ATen "
          f"{s['common_union_core_ops']} ops.", "",
          "<details><summary>the union lists</summary>", "",
          "fx targets: " + ", ".join(f"`{x}`" for x in s["union_fx_target_names"]), "",
          "export ops: " + ", ".join(f"`{x}`" for x in s["union_export_op_names"]), "",
          "core ATen ops: " + ", ".join(f"`{x}`" for x in s["union_core_op_names"]), "", "</details>", "",
          "## What this says (numbers from the tables above)", "",
          f"- Coverage, {s['models']} models: fxzip trace {s['fx_trace_ok']}, trace + analysis {s['fx_analysis_ok']}; "
          f"export {s['export_ok']}, core ATen {s['core_ok']}; dynamic-batch export {s['dynamic_ok']} "
          f"(of which run at batch {OTHER_BATCH}: {s['dynamic_other_batch_runs']}). Plain `torch.fx.symbolic_trace`: "
          f"{s['plain_fx_ok']}.",
          f"- fx + analysis passes but export fails: {', '.join(s['fx_ok_export_fail']) or 'none'}; "
          f"export passes but fx + analysis fails: {', '.join(s['export_ok_fx_fail']) or 'none'}.",
          f"- Time, summed over the {s['both_ok_models']} models where fx + analysis and export + decomposition all "
          f"pass: fxzip trace {sec['fx_trace']} s + analysis {sec['fx_analysis']} s; export {sec['export']} s, "
          f"then run_decompositions {sec['run_decompositions']} s.",
          f"- Op vocabulary (union over the panel): fx {s['union_fx_targets']} distinct targets; export "
          f"{s['union_export_ops']} ops ({s['union_export_packets']} packets); core ATen {s['union_core_ops']} ops "
          f"({s['union_core_packets']} packets); over the {s['common_models']} models with all three graphs: "
          f"{s['common_union_fx_targets']} / {s['common_union_export_ops']} / {s['common_union_core_ops']}.",
          f"- Library names: fxzip's graphs hold {s['union_fx_library_targets']} (in {s['models_with_library_targets']}"
          f" of {s['fx_trace_ok']} models); plain torch.fx's hold {s['union_plain_fx_library_targets']} (in "
          f"{s['plain_fx_models_with_library_targets']} of the {s['plain_fx_ok']} models it traces).",
          f"- nn_module_stack: on every call_function node in {s['module_stack_all_nodes']} of {s['export_ok']} "
          f"export graphs; every path a module path of the model in {s['module_stack_paths_valid']} of "
          f"{s['export_ok']}; on every node after run_decompositions in {s['core_module_stack_all_nodes']} of "
          f"{s['core_ok']}.",
          f"- state_dict names: export's equal the model's in {s['state_dict_equal_export']} of {s['export_ok']}, "
          f"core ATen's in {s['state_dict_equal_core']} of {s['core_ok']}; fxzip's GraphModule's in "
          f"{s['state_dict_equal_fx']} of {s['fx_trace_ok']} (all model keys present in "
          f"{s['state_dict_fx_all_model_keys']}).",
          f"- Dynamic batch: {s['dynamic_ok']} of {s['models']} exports succeed.", ""]
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None, help="panel keys (default: all), e.g. timm:resnet18")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per model and part")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", nargs=3, metavar=("KEY", "PART", "TO"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    keys = args.models or list(PANEL)
    have_hf = hf_available()
    cmd = "python benchmarks/capture_paths.py" + (" " + " ".join(shlex.quote(a) for a in sys.argv[1:])
                                                   if sys.argv[1:] else "")
    gs, mach = git_state(), machine()
    result = {"command": cmd, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": gs["commit"],
              "dirty_library_files": gs["dirty_library_files"],
              "machine": ", ".join(f"{k}: {v}" for k, v in mach.items()), "versions": mach,
              "timeout_s": args.timeout, "records": []}
    for key in keys:
        rec = {"model": key, "input": spec_text(key)}
        if PANEL[key][0] == "hf" and not have_hf:
            rec["skipped"] = ("`import transformers` fails (not installed in .venv); PyPI lists transformers "
                              "5.23.0 (in the workplace's package list), so `pip install transformers` would "
                              "make these rows run")
            result["records"].append(rec)
            print(f"{key}: skipped", flush=True)
            continue
        for part in PARTS:
            rec[part] = run_part(key, part, args.timeout)
            print(f"{key} {part}: {'ok' if rec[part].get('ok') else rec[part].get('error')} "
                  f"({rec[part].get('wall_s')} s)", flush=True)
        result["records"].append(rec)
    result["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    result["summary"] = summary(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capture_paths.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "capture_paths.md").write_text(markdown(result))
    print(f"wrote {out / 'capture_paths.md'}")


if __name__ == "__main__":
    main()
