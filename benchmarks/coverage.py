"""Coverage benchmark: which timm architectures fxzip traces, analyses and merges exactly.

    python benchmarks/coverage.py --jobs 2                # the whole panel -> benchmarks/results/coverage.{json,md}
    python benchmarks/coverage.py --resume                # keep models already recorded, run the rest
    python benchmarks/coverage.py --models resnet10t:32   # a subset (NAME or NAME:SIZE), merged into the result
    python benchmarks/coverage.py --merge-from DIR/coverage.json  # fold a run made with --out DIR into the result
    python benchmarks/coverage.py --library torchvision --jobs 1   # torchvision's panel -> coverage_torchvision.{json,md}
    python benchmarks/coverage.py --library transformers --jobs 1 --timeout 300   # -> coverage_transformers.{json,md}

``--library timm`` (the default): the panel below, built with ``timm.create_model(name,
pretrained=False, num_classes=10[, img_size=S])``. ``--library torchvision``: every model
``torchvision.models.list_models`` lists in the classification, segmentation, video and
optical-flow modules (``TV_FAMILIES``), built with ``torchvision.models.get_model(name,
weights=None, ...)`` (``create_torchvision``: ``num_classes=10`` where the builder takes it,
``weights_backbone=None``, ``aux_loss=True`` for the segmentation models that have an
auxiliary head, ``image_size`` / ``input_size`` for ViT / MaxViT) on the inputs each family
needs (``tv_input_spec``: images, clips (B, 3, T, H, W), or two images for optical flow;
recorded as ``input_spec``); its results go to ``coverage_torchvision.{json,md}``. Nothing is
downloaded. Outputs that are dicts (segmentation: 'out', 'aux') or lists (RAFT: one flow per
refinement) are compared tensor by tensor; the worst one is named in a failure.
``--library transformers``: the Hugging Face models of ``HF_MODELS`` (GPT-2, Llama with
multi-head and grouped-query attention, Qwen2, GPT-NeoX, OPT, BERT, T5, BART, ViT, DINOv2),
each built from its config class with small random sizes (``create_transformers``: hidden 64,
2 layers, 4 heads, vocabulary 100, ``use_cache=False``; nothing downloaded; the version is
pinned in ``benchmarks/requirements-hf.txt``), on token ids (B, 16) with a right-padding
attention mask (decoder token ids too for T5 / BART) or 32 px images, passed positionally in
the order of each forward (``hf_input_spec``; GPT-2's ``past_key_values`` before its mask is
passed as None); held-out batches of 4; results in ``coverage_transformers.{json,md}``. For every
model a fresh subprocess (``--one``, with a time limit, ``--timeout``) runs:

0. create: build the model and run it eagerly on a batch at its size;
   trace + analysis: ``fxzip.trace.trace`` and ``fxzip.analysis.analyze``, which
   also give the spaces and the probe points used to size the calibration set; whether
   the capture kept the batch dimension symbolic (``trace_batch``: the log record of
   ``fxzip.trace`` that says it cannot, and a run of the captured graph at another
   batch size) is recorded as ``batch_dim``;
   prepare: every parameter and floating buffer re-drawn at O(1) scale
   (``fxzip.zoo.redraw``, the tests' recipe), then batch-norm statistics recomputed with
   ``fxzip.reset_norm_stats``.
1. identity: ``fxzip.merge(model, deepcopy(model), data=batches, method="zipit",
   reset_bn=False)`` must compute the model's function on held-out batches:
   max|out_merged - out_model| <= 1e-5 * max|out_model| (in float32, or where that
   fails, in float64 copies of both: some random O(1)-weight models amplify float32
   rounding of a re-ordered sum chaotically; see ``verified_error``).
2. permute: ``p = fxzip.permute_channels(model, seed=1, example_inputs=x)`` must
   compute the model's function (the check of the analysis; compared in float64,
   as a permuted copy sums in another order and float32 rounding alone moves deep
   O(1)-weight models by 1-5e-5 of their output; a model that cannot run in
   float64 is compared with its own float32 noise floor instead, the error one
   rounding of every weight causes (``float32_noise_floor``: within
   ``NOISE_FACTOR`` of it counts as rounding, recorded as ``within_noise_floor``
   and not counted as "permuted copy exact")) and differ from it
   in at least one parameter; then ``fxzip.merge(model, p, data=batches,
   reset_bn=False)`` must compute the model's function again (same tolerance).

Calibration set size. fxzip pools every pixel / token of every probe point of a
space into its samples, so a space of C channels whose probes hold P positions
per image in total (P = numel / (batch * channel-axis length) summed over its
probe nodes, from the traced shapes) gets ``images * P`` samples. The benchmark
takes the smallest number of images (a multiple of ``--batch``, at least
``--min-images``, at most ``--max-images``) with ``images * P >= 2 * C + 1`` for
every mergeable space, i.e. more than twice as many samples as features
everywhere; a model that would need more than ``--max-images`` is recorded with
``samples_short`` true. Held-out batches (``--holdout`` batches of 8) are drawn
with another seed. Inputs are standard-normal images; every random draw is
seeded, so a run is deterministic for a given ``--seed`` (timings aside).

Each record states its outcome (pass, fail-identity, fail-permute,
nothing-permuted, fail-recovery, error, timeout), the stage that failed
(create, trace, analysis, prepare, calibrate, match, fold, verify, timeout),
the exception type, the first lines of the message, a category (stage + a
keyword class of the message, e.g. ``analysis: no channel rule for function
torch.roll``), times per stage, the number of spaces / mergeable spaces and the
parameter count. Results are written after every model, so an interrupted run
keeps what it finished (``--resume`` continues it). fxzip's sources are copied
to a temporary snapshot at the start and every model imports that copy (``--live``:
the working tree), so one run measures one code state even while fxzip is being
edited; every record names the commit, whether fxzip differed from it, and a
digest of the sources it imported.
"""
from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable

import common

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

TOL = 1e-5
DEFAULT_SIZE = 64

# The panel, in its order. Sizes other than 64 px are configuration:
# models whose windows / strides / position grids do not fit 64 px.
SIZES = {"halonet26t": 256, "botnet26t_256": 256, "inception_v4": 96, "efficientformer_l1": 224,
         "crossvit_tiny_240": 240}
PANEL = [
    "res2net50_14w_8s", "cs3darknet_s", "cspdarknet53", "vovnet39a", "ese_vovnet19b_dw", "selecsls42b",
    "hrnet_w18_small", "mixnet_s", "tinynet_a", "ghostnetv2_100", "repghostnet_050", "tresnet_m", "dm_nfnet_f0",
    "resnetv2_50x1_bit", "regnetz_b16", "efficientnetv2_rw_t", "mobilenetv4_conv_small", "mobileone_s0",
    "xception41", "gernet_s", "halonet26t", "botnet26t_256", "lambda_resnet26t", "convnext_nano_ols",
    "inception_v4", "resnest14d", "skresnet18", "beit_base_patch16_224", "vit_relpos_small_patch16_224",
    "vit_medium_patch16_gap_256", "vit_small_patch16_224", "flexivit_small", "swinv2_cr_tiny_ns_224",
    "maxvit_nano_rw_256", "davit_tiny", "gcvit_xxtiny", "focalnet_tiny_srf", "tiny_vit_5m_224",
    "efficientformer_l1", "efficientvit_m0", "mobilevitv2_050", "twins_svt_small", "convit_tiny",
    "tnt_s_patch16_224", "volo_d1_224", "crossvit_tiny_240", "mvitv2_tiny", "hiera_tiny_224", "levit_128s",
    "nest_tiny", "visformer_tiny", "coatnet_nano_rw_224", "caformer_s18", "convformer_s18", "sequencer2d_s",
    "mambaout_femto", "starnet_s1", "rdnet_tiny", "repvit_m0_9", "nextvit_small", "mobilenetv4_hybrid_medium",
]

# torchvision: the families (module of torchvision.models) and the inputs each needs. Sizes are
# the smallest each model accepts where it has one (found by running the model), else small
# enough for a 2-core CPU: classification 64 px (inception_v3 needs 75; vit_* are built for
# the size, ``image_size``, vit_h_14's patch of 14 divides 56; maxvit_t's four stages (/4 .. /32)
# must divide into its 7x7 partitions: 224); segmentation 64 px; video clips of 4 frames at
# 32 px (s3d's final 2x7x7 average pool needs 13 frames and 209 px; mvit_* are built for 16
# frames at 224 px, fixed by their builders); optical flow two images of 128 px (RAFT's
# correlation pyramid needs feature maps of 16 at stride 8).
TV_FAMILIES = {"classification": "", "segmentation": "segmentation", "video": "video",
               "optical_flow": "optical_flow"}
TV_DEFAULT_SIZE = {"classification": 64, "segmentation": 64, "video": 32, "optical_flow": 128}
TV_DEFAULT_FRAMES = 4
TV_SIZES = {"inception_v3": 75, "vit_h_14": 56, "maxvit_t": 224, "s3d": 209, "mvit_v1_b": 224, "mvit_v2_s": 224}
TV_FRAMES = {"s3d": 13, "mvit_v1_b": 16, "mvit_v2_s": 16}
TV_NUM_CLASSES = 10

# transformers: small random configs built from their config classes (nothing is downloaded), caches off,
# eval mode. Text models take token ids (B, S) over a vocabulary of HF_VOCAB and, where their forward takes
# one, a padding mask (1 for the first L_i tokens of each sequence, L_i drawn in [S/2, S]); inputs are
# positional, in the order of the model's forward, so a parameter before the mask that the panel does not
# use is passed as None (GPT-2's past_key_values). Encoder-decoder models also take decoder_input_ids
# (B, S). Vision models take images (B, 3, S, S). Sizes: hidden 64, 2 layers, 4 heads (head dim 16),
# MLP 128; sequences of 16 tokens, images of 32 px in 8 px patches. "size" is the sequence length (text)
# or the image size (vision).
HF_VOCAB = 100
HF_BATCH = 4  # the example and held-out batches (calibration batches are --batch)
HF_SEQ = 16
HF_IMAGE = 32
_HF_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=HF_VOCAB, max_position_embeddings=64)
HF_MODELS: dict[str, dict[str, Any]] = {
    # name: family, model class, config class, config kwargs, positional inputs (the forward's names, in its
    # order; a name with "=None" is passed as None)
    "GPT2LMHeadModel": dict(family="causal LM", cls="GPT2LMHeadModel", config="GPT2Config",
                            kwargs=dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, vocab_size=HF_VOCAB,
                                        n_positions=64, bos_token_id=0, eos_token_id=0),
                            inputs=["input_ids", "past_key_values=None", "attention_mask"]),
    "LlamaForCausalLM": dict(family="causal LM", cls="LlamaForCausalLM", config="LlamaConfig",
                             kwargs=dict(_HF_TEXT, num_key_value_heads=4), inputs=["input_ids", "attention_mask"]),
    "LlamaForCausalLM-GQA": dict(family="causal LM", cls="LlamaForCausalLM", config="LlamaConfig",
                                 kwargs=dict(_HF_TEXT, num_key_value_heads=2),
                                 inputs=["input_ids", "attention_mask"]),
    "Qwen2ForCausalLM": dict(family="causal LM", cls="Qwen2ForCausalLM", config="Qwen2Config",
                             kwargs=dict(_HF_TEXT, num_key_value_heads=2), inputs=["input_ids", "attention_mask"]),
    "GPTNeoXForCausalLM": dict(family="causal LM", cls="GPTNeoXForCausalLM", config="GPTNeoXConfig",
                               kwargs=dict(_HF_TEXT), inputs=["input_ids", "attention_mask"]),
    "OPTForCausalLM": dict(family="causal LM", cls="OPTForCausalLM", config="OPTConfig",
                           kwargs=dict(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, num_hidden_layers=2,
                                       num_attention_heads=4, vocab_size=HF_VOCAB, max_position_embeddings=64),
                           inputs=["input_ids", "attention_mask"]),
    "BertForMaskedLM": dict(family="masked LM", cls="BertForMaskedLM", config="BertConfig",
                            kwargs=dict(_HF_TEXT), inputs=["input_ids", "attention_mask"]),
    "T5ForConditionalGeneration": dict(family="encoder-decoder", cls="T5ForConditionalGeneration",
                                       config="T5Config",
                                       kwargs=dict(d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                   num_decoder_layers=2, num_heads=4, vocab_size=HF_VOCAB,
                                                   relative_attention_num_buckets=8,
                                                   relative_attention_max_distance=16, decoder_start_token_id=0),
                                       inputs=["input_ids", "attention_mask", "decoder_input_ids"]),
    "BartForConditionalGeneration": dict(family="encoder-decoder", cls="BartForConditionalGeneration",
                                         config="BartConfig",
                                         kwargs=dict(d_model=64, encoder_layers=2, decoder_layers=2,
                                                     encoder_attention_heads=4, decoder_attention_heads=4,
                                                     encoder_ffn_dim=128, decoder_ffn_dim=128,
                                                     vocab_size=HF_VOCAB, max_position_embeddings=64),
                                         inputs=["input_ids", "attention_mask", "decoder_input_ids"]),
    "ViTForImageClassification": dict(family="vision", cls="ViTForImageClassification", config="ViTConfig",
                                      kwargs=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, image_size=HF_IMAGE, patch_size=8,
                                                  num_labels=10),
                                      inputs=["pixel_values"]),
    "Dinov2Model": dict(family="vision", cls="Dinov2Model", config="Dinov2Config",
                        kwargs=dict(hidden_size=64, mlp_ratio=2, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=HF_IMAGE, patch_size=8),
                        inputs=["pixel_values"]),
}
LIBRARIES = ("timm", "torchvision", "transformers")

STAGES = ("create", "trace", "analysis", "prepare", "calibrate", "match", "fold", "verify", "timeout")
OUTCOMES = ("pass", "fail-identity", "fail-permute", "nothing-permuted", "fail-recovery", "error", "timeout")


# ----------------------------------------------------------------------------- model and data



def create(name: str, size: int, seed: int = 0):
    """``timm.create_model`` at ``size`` px; ``img_size`` is passed where the model takes it."""
    import timm
    import torch

    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 10, "img_size": size}
    try:
        model = timm.create_model(name, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        kwargs.pop("img_size")
        model = timm.create_model(name, **kwargs)
    return model.eval(), {k: v for k, v in kwargs.items()}


@functools.lru_cache(maxsize=1)
def tv_panel() -> tuple[tuple[str, str], ...]:
    """(model, family) of every torchvision model in ``TV_FAMILIES``, family by family, as
    ``list_models`` orders them."""
    import importlib

    import torchvision.models as tvm

    out = []
    for family, sub in TV_FAMILIES.items():
        module = importlib.import_module(f"torchvision.models.{sub}") if sub else tvm
        out += [(name, family) for name in tvm.list_models(module=module)]
    return tuple(out)


def tv_family(name: str) -> str:
    return dict(tv_panel()).get(name, "classification")


def tv_default_size(name: str) -> int:
    return TV_SIZES.get(name, TV_DEFAULT_SIZE[tv_family(name)])


def tv_input_spec(name: str, size: int) -> dict:
    """The inputs of one torchvision model at spatial ``size``: per-sample shapes of its
    positional inputs (the batch axis comes first)."""
    family = tv_family(name)
    if family == "video":
        shapes = [[3, TV_FRAMES.get(name, TV_DEFAULT_FRAMES), size, size]]
        names = ["x"]
    elif family == "optical_flow":
        shapes, names = [[3, size, size], [3, size, size]], ["image1", "image2"]
    else:
        shapes, names = [[3, size, size]], ["x"]
    text = ", ".join(f"{n}: (B, {', '.join(map(str, s))})" for n, s in zip(names, shapes))
    return {"family": family, "inputs": shapes, "names": names, "text": text}


def hf_default_size(name: str) -> int:
    return HF_IMAGE if HF_MODELS.get(name, {}).get("family") == "vision" else HF_SEQ


def hf_input_spec(name: str, size: int) -> dict:
    """The positional inputs of one transformers model (``HF_MODELS``) at sequence length (text) or image
    size (vision) ``size``: per-sample shapes (None for an input passed as None) and their kinds ("ids":
    token ids, "mask": a padding mask, "none", "image")."""
    entry = HF_MODELS.get(name, {"family": "?", "inputs": ["input_ids"]})
    shapes, names, kinds = [], [], []
    for arg in entry["inputs"]:
        arg_name, _, none = arg.partition("=")
        names.append(arg_name)
        if none:
            shapes.append(None)
            kinds.append("none")
        elif arg_name == "pixel_values":
            shapes.append([3, size, size])
            kinds.append("image")
        else:
            shapes.append([size])
            kinds.append("mask" if arg_name.endswith("attention_mask") else "ids")
    text = ", ".join(f"{n}: None" if k == "none" else
                     f"{n}: (B, {', '.join(map(str, s))}){' int64 < ' + str(HF_VOCAB) if k == 'ids' else ''}"
                     f"{' padding mask' if k == 'mask' else ''}" for n, s, k in zip(names, shapes, kinds))
    return {"family": entry["family"], "inputs": shapes, "names": names, "kinds": kinds, "text": text,
            "batch": HF_BATCH}


def create_transformers(name: str, size: int, seed: int = 0):
    """``HF_MODELS[name]``: its model class on its config class with the panel's small sizes, caches off
    (``use_cache=False``), in eval mode; nothing is downloaded. Vision models are built for ``size`` px."""
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    entry = HF_MODELS[name]
    kwargs = dict(entry["kwargs"], use_cache=False)
    if entry["family"] == "vision":
        kwargs["image_size"] = size
    else:
        for key in ("max_position_embeddings", "n_positions"):
            if key in kwargs:
                kwargs[key] = max(kwargs[key], size)
    torch.manual_seed(seed)
    config = getattr(transformers, entry["config"])(**kwargs)
    model = getattr(transformers, entry["cls"])(config).eval()
    model.config.use_cache = False
    return model, {"class": entry["cls"], "config": entry["config"], **kwargs,
                   "attn_implementation": getattr(model.config, "_attn_implementation", None)}


def input_spec(library: str, name: str, size: int) -> dict:
    if library == "torchvision":
        return tv_input_spec(name, size)
    if library == "transformers":
        return hf_input_spec(name, size)
    return {"family": "image", "inputs": [[3, size, size]], "names": ["x"], "text": f"x: (B, 3, {size}, {size})"}


def create_torchvision(name: str, size: int, seed: int = 0):
    """``torchvision.models.get_model(name, weights=None, ...)`` in eval mode, for the inputs of
    ``tv_input_spec``: ``num_classes`` where the builder takes it (classification, video,
    segmentation), no backbone weights, segmentation's auxiliary head where it has one, and the
    image size ViT (``image_size``) and MaxViT (``input_size``) are built for."""
    import inspect

    import torch
    import torchvision.models as tvm

    torch.manual_seed(seed)
    family = tv_family(name)
    params = inspect.signature(tvm.get_model_builder(name)).parameters
    kwargs: dict[str, Any] = {"weights": None}
    if family in ("classification", "video", "segmentation"):
        kwargs["num_classes"] = TV_NUM_CLASSES
    if "weights_backbone" in params:
        kwargs["weights_backbone"] = None
    if "aux_loss" in params:
        kwargs["aux_loss"] = True
    if name.startswith("vit_"):
        kwargs["image_size"] = size
    if name.startswith("maxvit_"):
        kwargs["input_size"] = (size, size)
    model = tvm.get_model(name, **kwargs)
    return model.eval(), {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}


def build(library: str, name: str, size: int, seed: int = 0):
    if library == "torchvision":
        return create_torchvision(name, size, seed)
    if library == "transformers":
        return create_transformers(name, size, seed)
    return create(name, size, seed)


def library_panel(library: str) -> list[tuple[str, int]]:
    """(model, size) of a library's panel."""
    if library == "torchvision":
        return [(m, tv_default_size(m)) for m, _ in tv_panel()]
    if library == "transformers":
        return [(m, hf_default_size(m)) for m in HF_MODELS]
    return [(m, SIZES.get(m, DEFAULT_SIZE)) for m in PANEL]


def panel_names(library: str) -> list[str]:
    if library == "torchvision":
        return [m for m, _ in tv_panel()]
    return list(HF_MODELS) if library == "transformers" else list(PANEL)


def default_size(library: str, name: str) -> int:
    if library == "torchvision":
        return tv_default_size(name)
    if library == "transformers":
        return hf_default_size(name)
    return SIZES.get(name, DEFAULT_SIZE)


def input_batches(spec: dict, n_images: int, batch: int, seed: int) -> list:
    """Standard-normal batches for ``spec``: tensors for one input (exactly ``images_batches``
    for images), tuples of tensors for several (RAFT's image pair)."""
    import torch

    shapes = spec["inputs"]
    kinds = spec.get("kinds") or ["image"] * len(shapes)
    if len(shapes) == 1 and kinds[0] == "image" and len(shapes[0]) == 3 and shapes[0][1] == shapes[0][2]:
        return images_batches(n_images, batch, shapes[0][1], seed, shapes[0][0])
    gen = torch.Generator().manual_seed(seed)
    out, left = [], n_images
    while left > 0:
        b = min(batch, left)
        xs = tuple(_draw(kind, b, s, gen) for s, kind in zip(shapes, kinds))
        out.append(xs if len(xs) > 1 else xs[0])
        left -= b
    return out


def _draw(kind: str, b: int, shape: list | None, gen):
    """One input of a batch of ``b``: standard-normal (images, clips), token ids below ``HF_VOCAB``, a
    right-padding mask (the first L_i of S positions 1, L_i uniform in [S/2, S]), or None."""
    import torch

    if kind == "none":
        return None
    if kind == "ids":
        return torch.randint(0, HF_VOCAB, (b, *shape), generator=gen)
    if kind == "mask":
        seq = shape[-1]
        lengths = torch.randint(seq // 2, seq + 1, (b,), generator=gen)
        return (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return torch.randn((b, *shape), generator=gen)


def call(model, x):
    """Run ``model`` on one batch: a tensor, or a tuple of its positional inputs."""
    return model(*x) if isinstance(x, tuple) else model(x)


def _all_inputs(batch):
    """fxzip's ``inputs=`` for batches that are tuples of model inputs (not (x, y) pairs)."""
    return batch


def images_batches(n_images: int, batch: int, size: int, seed: int, channels: int = 3):
    import torch

    gen = torch.Generator().manual_seed(seed)
    out, left = [], n_images
    while left > 0:
        b = min(batch, left)
        out.append(torch.randn((b, channels, size, size), generator=gen))
        left -= b
    return out


def sample_plan(gm, analysis) -> dict:
    """Samples per image of every mergeable space (pixels / tokens summed over its
    probe points, from the traced shapes) and the images needed for > 2x as many
    samples as features in every space."""
    import math

    nodes = {n.name: n for n in gm.graph.nodes}
    placeholder = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    batch = int(placeholder.meta["tensor_meta"].shape[0]) if placeholder is not None else 1
    need, tightest = 0, None
    for sp in analysis.spaces:
        if not (sp.mergeable and sp.probes):
            continue
        per_image = 0.0
        for pr in sp.probes:
            meta = nodes[pr.node].meta.get("tensor_meta")
            shape = tuple(getattr(meta, "shape", ()) or ())
            if not shape:
                continue
            per_image += math.prod(shape) / shape[pr.dim] / batch
        per_image = max(per_image, 1.0)
        images = math.floor(2 * sp.size / per_image) + 1
        if images > need:
            need, tightest = images, {"space": sp.name, "size": sp.size, "samples_per_image": per_image}
    return {"images_needed": need, "tightest_space": tightest}


class _LogRecords:
    """The records one logger emits at INFO and above while the context is open (the logger's level is
    lowered for that time and restored)."""

    def __init__(self, name: str):
        import logging

        self.logger, self.records = logging.getLogger(name), []
        self.handler = logging.Handler(logging.INFO)
        self.handler.emit = self.records.append

    def __enter__(self) -> list:
        import logging

        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)
        return self.records

    def __exit__(self, *exc) -> bool:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)
        return False


def trace_batch(model, x, spec: dict, seed: int = 2000):
    """``fxzip.trace.trace(model, x)`` and whether the batch dimension stayed symbolic: (gm, info).

    ``info["batch"]``: "symbolic", or "fixed (B=N)" where the capture logged (logger ``fxzip.trace``) that
    "the batch size cannot stay symbolic" (``info["reason"]``: its reason, export's error). Checked, not
    only read: the captured graph runs on a batch of another size (one more than ``x``'s) and must compute
    the model's output there (``info["other_batch"]``: size, whether it ran, its relative difference or
    error). A graph that says symbolic and fails there is labelled "symbolic (fails at B=N)"."""
    import torch

    from fxzip.trace import trace

    with _LogRecords("fxzip.trace") as records:
        gm = trace(model, x)
    fixed = [r for r in records if "cannot stay symbolic" in r.getMessage()]
    first = x[0] if isinstance(x, tuple) else x
    n = int(first.shape[0]) + 1
    info: dict[str, Any] = {"batch": f"fixed (B={n - 1})" if fixed else "symbolic"}
    if fixed:
        rec = fixed[0]
        info["reason"] = str(rec.args[1]) if isinstance(rec.args, tuple) and len(rec.args) > 1 else \
            first_lines(rec.getMessage(), 1, 300)
    other = input_batches(spec, n, n, seed)[0]
    try:
        with torch.no_grad():
            err = max_rel_diff(call(model, other), call(gm, other))
        info["other_batch"] = {"size": n, "runs": True, "rel_err": err}
        if not fixed and err > TOL:
            info["batch"] = f"symbolic (differs at B={n})"
    except Exception as exc:  # noqa: BLE001 - the answer: it does not run at that batch size
        info["other_batch"] = {"size": n, "runs": False, "error": f"{type(exc).__name__}: "
                                                                   f"{first_lines(str(exc), 1, 200)}"}
        if not fixed:
            info["batch"] = f"symbolic (fails at B={n})"
    return gm, info


def batch_cell(info: dict | None) -> str:
    """The batch dimension as a table shows it: 'symbolic', or 'fixed (B=N): reason'."""
    if not info:
        return ""
    text = info["batch"]
    if info.get("reason"):
        text += f": {info['reason']}"
    other = info.get("other_batch") or {}
    if info["batch"].startswith("fixed") and other.get("runs"):
        text += f" (runs at B={other['size']})"
    return text


def rel_diffs(want, got, path: str = "") -> list[tuple[float, str]]:
    """(max relative difference, where) of every tensor of an output structure: a tensor,
    a tuple / list (RAFT's flow predictions) or a dict (segmentation's 'out' and 'aux'),
    nested. Structures must agree (same keys, same lengths); other leaves must be equal."""
    import torch

    if isinstance(want, dict):
        if not isinstance(got, dict) or list(want) != list(got):
            raise ValueError(f"outputs differ in structure at output{path}: keys {list(want)} vs "
                             f"{list(got) if isinstance(got, dict) else type(got).__name__}")
        return [d for k in want for d in rel_diffs(want[k], got[k], f"{path}[{k!r}]")]
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(want) != len(got):
            raise ValueError(f"outputs differ in structure at output{path}: {len(want)} items vs "
                             f"{len(got) if isinstance(got, (tuple, list)) else type(got).__name__}")
        return [d for i, (a, b) in enumerate(zip(want, got)) for d in rel_diffs(a, b, f"{path}[{i}]")]
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            raise ValueError(f"outputs differ in shape at output{path}: {tuple(want.shape)} vs "
                             f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}")
        if want.numel() == 0:
            return [(0.0, path)]
        scale = float(want.abs().max())
        return [(float((want - got).abs().max()) / (scale if scale > 0 else 1.0), path)]
    return [(0.0 if want == got else float("inf"), path)]


def max_rel_diff(want, got) -> float:
    return max(e for e, _ in rel_diffs(want, got))


def function_error(ref, other, data) -> float:
    import torch

    with torch.no_grad():
        return max(max_rel_diff(call(ref, x), call(other, x)) for x in data)


NOISE_FACTOR = 10  # a permuted copy within this many float32 noise floors differs by rounding alone


def float32_noise_floor(model, data, seed: int = 0) -> float:
    """How far the model's own output moves when every weight moves by one
    float32 rounding (a random relative change of +-2^-24): the error a
    re-ordered float32 sum can cause in this model.

    Why: a permuted copy sums in another order. Most models are then checked in
    float64, where rounding vanishes; a model that cannot run in float64 (RAFT
    builds float32 coordinate grids, and the capture keeps dtype casts) and
    amplifies rounding over many steps (RAFT's 12 refinements: 4e-4) can only
    be compared with its own sensitivity. A wrong analysis moves the output by
    O(1), far above this floor."""
    import torch

    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(noisy.parameters()) + [b for b in noisy.buffers() if b.is_floating_point()]:
            sign = torch.randint(0, 2, t.shape, generator=g).to(t.dtype) * 2 - 1
            t.mul_(1 + sign * 2.0 ** -24)
    return function_error(model, noisy, data)


def worst_output(ref, other, data, dtype: str = "float32") -> str:
    """Which tensor of a structured output (dict, list) differs most: '' for a plain tensor."""
    import torch

    try:
        if dtype == "float64":
            ref, other = copy.deepcopy(ref).double(), copy.deepcopy(other).double()
            data = [_double(x) for x in data]
        with torch.no_grad():
            diffs = [d for x in data for d in rel_diffs(call(ref, x), call(other, x))]
    except Exception:  # noqa: BLE001 - only a detail of a failure's message
        return ""
    err, path = max(diffs, key=lambda d: d[0])
    return f" (worst: output{path}, {err:.3g})" if path else ""


def _node_op(gm, name: str) -> str:
    """'node NAME (op)' of a traced node, the op as the analysis' messages name it."""
    node = next((n for n in gm.graph.nodes if n.name == name), None)
    if node is None:
        return f"node '{name}'"
    if node.op == "call_module":
        op = f"module {node.target} ({type(gm.get_submodule(node.target)).__name__})"
    elif node.op == "call_method":
        op = f"method Tensor.{node.target}"
    elif node.op == "call_function":
        op = f"function {getattr(node.target, '__module__', '') or ''}.{getattr(node.target, '__name__', node.target)}"
    else:
        op = node.op
    return f"node '{name}' ({op})"


def wrong_matches(model, merged, x, permuted_seed: int | None = None) -> dict | None:
    """Where a merge that should be exact matched units wrongly: the merge's report
    (``merged.meta['fxzip']``, every space's assignment) against the right answer, the
    identity for a self-merge, else the permutation ``permute_channels(seed=permuted_seed)``
    applied (recomputed from the model's own trace and analysis). Returns the spaces with
    units merged with a non-partner, in graph order (None where it cannot tell)."""
    try:
        from fxzip.analysis import analyze
        from fxzip.permute import random_assignment
        from fxzip.trace import trace

        rep = getattr(merged, "meta", {}).get("fxzip")
        if rep is None:
            return None
        gm = trace(model, x)
        analysis = analyze(gm)
        truth = random_assignment(analysis, permuted_seed) if permuted_seed is not None else {}
        by_index = {sp.index: sp for sp in analysis.spaces}  # by index: q.k and v spaces share their node's name
        spaces = []
        for row in rep.spaces:
            sp = by_index.get(row.index)
            if sp is not None and sp.name != row.name:
                return {"error": f"the report's space {row.index} is {row.name!r}, the model's trace has {sp.name!r}"}
            if sp is None or len(row.assignment) < 2:
                continue
            a, b = row.assignment[0], row.assignment[1]
            perm = truth[sp.index][0].tolist() if sp.index in truth else list(range(len(a)))
            bad = sum(1 for u in range(len(a)) if a[u] != b[perm[u]])
            if bad:
                spaces.append({"space": row.name, "label": row.label, "size": row.size, "wrong": bad,
                               "constant": row.constant, "node": _node_op(gm, row.name)})
        return {"spaces_checked": len(rep.spaces), "wrong_spaces": len(spaces), "spaces": spaces[:10]}
    except Exception as exc:  # noqa: BLE001 - a diagnosis only
        return {"error": f"{type(exc).__name__}: {first_lines(str(exc), 1, 200)}"}


def _wrong_text(diag: dict | None) -> str:
    if not diag or not diag.get("spaces"):
        return "" if not diag or "error" not in diag else f"; (no diagnosis: {diag['error']})"
    first = diag["spaces"][0]
    return (f"; {diag['wrong_spaces']} of {diag['spaces_checked']} spaces matched units to a non-partner, the first "
            f"at {first['node']}: {first['wrong']} of {first['size']} units ({first['constant']} constant on the "
            f"calibration data)")


def _double(x):
    """float64 copies of the floating inputs of a batch (token ids, masks and None stay as they are)."""
    def one(t):
        return t.double() if t is not None and t.is_floating_point() else t
    return tuple(one(t) for t in x) if isinstance(x, tuple) else one(x)


def function_error_f64(ref, other, data) -> float | None:
    """``function_error`` with float64 copies of both models and the data (None where
    a model does not run in float64). A permuted copy sums in another order, which
    in float32 alone moves deep O(1)-weight models by ~1e-5 of their output; in
    float64 that noise is ~1e-13 and anything left is a wrong permutation."""
    try:
        a, b = copy.deepcopy(ref).double(), copy.deepcopy(other).double()
        return function_error(a, b, [_double(x) for x in data])
    except Exception:  # noqa: BLE001 - e.g. a float32 constant created inside forward
        return None


def float64_reference(model, gm, data) -> tuple[Any, dict]:
    """The reference of the float64 comparisons: the model, or its captured graph where that graph run in
    float64 does not compute the model's float64 function (export bakes into the graph dtypes the model's
    code reads at run time: T5's ``torch.zeros(..., dtype=float32)`` position bias makes a float64 copy of
    the graph call SDPA with a float32 mask). A permuted copy or a merge of that graph inherits the baked
    dtypes, so in float64 it must equal the captured graph, not the model; the float32 comparisons stay
    against the model. Returns (the captured graph, or None for the model; a record)."""
    err = function_error_f64(model, gm, data)
    info = {"graph_f64_rel_err": err}
    if err is None or err <= TOL:
        return None, {**info, "reference": "model"}
    return gm, {**info, "reference": "captured graph (it differs from the model in float64)"}


def verified_error(ref, other, data, ref64: Callable[[], Any] | None = None) -> tuple[float, float, str]:
    """(error, float32 error, dtype of the error that counts) of a merged model
    that should compute ``ref``'s function. The float32 comparison counts when it
    passes; when it does not, float64 copies decide (where both models run in
    float64): the merged GraphModule folds and sums in another order, and some
    O(1)-weight models amplify float32 rounding chaotically (tiny_vit_5m_224: a
    permuted copy exact to 4e-14 in float64 differs by 0.53 in float32), so only
    the float64 error tells a wrong merge from rounding. ``ref64()``: where the
    float64 comparison fails, the float64 reference to use instead (the model's
    own captured graph where that is not faithful in float64, ``float64_reference``)
    or None (the model)."""
    err32 = function_error(ref, other, data)
    if err32 <= TOL:
        return err32, err32, "float32"
    err64 = function_error_f64(ref, other, data)
    if err64 is not None and err64 > TOL and ref64 is not None and ref64() is not None:
        err64 = function_error_f64(ref64(), other, data)
    return (err32, err32, "float32") if err64 is None else (err64, err32, "float64")


# ----------------------------------------------------------------------------- classification

_FXZIP_FILES = [  # (path fragment, stage), matched against the deepest fxzip frame
    ("fxzip/trace.py", "trace"), ("fxzip/analysis.py", "analysis"), ("fxzip/rules/", "analysis"),
    ("fxzip/layout.py", "analysis"), ("fxzip/cuts.py", "analysis"), ("fxzip/data.py", "calibrate"),
    ("fxzip/stats.py", "calibrate"), ("passes/observe.py", "calibrate"), ("passes/side_by_side.py", "calibrate"),
    ("fxzip/matching.py", "match"), ("fxzip/grouped.py", "match"), ("fxzip/mudsc.py", "match"),
    ("passes/fold.py", "fold"), ("passes/split.py", "fold"), ("passes/reset_norm.py", "prepare"),
    ("fxzip/norm.py", "prepare"), ("fxzip/permute.py", "match"), ("fxzip/calibration.py", "calibrate"),
    ("fxzip/match_spaces.py", "match"), ("fxzip/options.py", "match"), ("fxzip/stages.py", "fold"),
]
_MERGE_FUNCS = {"calibrate": "calibrate"}


def stage_of(exc: BaseException, default: str) -> str:
    """The pipeline stage an exception came from: its type where fxzip says
    (TraceError, AnalysisError), else the deepest fxzip frame of its traceback."""
    import fxzip

    if isinstance(exc, fxzip.TraceError):
        return "trace"
    if isinstance(exc, fxzip.AnalysisError):
        return "analysis"
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        path = fr.filename.replace(os.sep, "/")
        for frag, stage in _FXZIP_FILES:
            if frag in path:
                return stage
        if path.endswith("fxzip/merge.py"):
            return _MERGE_FUNCS.get(fr.name, "fold" if fr.name == "merge" else default)
    return default


def _op_of(desc: str, kind: str = "") -> str:
    """'a.b (Cls)' (kind 'module') or 'call_module a.b (Cls)' -> 'Cls'; 'torch.roll' or
    'call_function torch.functional.roll' -> 'torch.roll'; 'Tensor.roll' or 'call_method roll' -> 'Tensor.roll'."""
    m = re.search(r"\((\w+)\)\s*$", desc)
    if (desc.startswith("call_module") or kind == "module") and m:
        return m.group(1)
    body = desc.split(" ", 1)[-1].strip() if desc.startswith("call_") else desc.strip()
    if desc.startswith("call_method") or (kind == "method" and not body.startswith("Tensor.")):
        return f"Tensor.{body}"
    parts = [p for p in body.split(".") if p]
    if len(parts) >= 2 and parts[0] in ("torch", "timm", "torchvision"):
        return f"{parts[0]}.{parts[-1]}"
    return ".".join(parts[-2:]) if len(parts) >= 2 else body


# (regex on the message, label); the first match wins. A label may use the match.
KEYWORDS: list[tuple[str, Callable[[re.Match], str] | str]] = [
    (r"no channel rule for (module|function|method) (.+?) at node",
     lambda m: f"no channel rule for {m.group(1)} {_op_of(m.group(2), m.group(1))}"),
    (r"torch\.fx cannot trace \w+: (\w+): (.*)", lambda m: f"cannot trace ({m.group(1)}: {_gist(m.group(2))})"),
    (r"running \w+ on a batch of shape .* failed", "shape propagation failed"),
    (r"indexes the channel axis", "indexes the channel axis"),
    (r"splits a feature space|splits channels made of", "splits a feature space"),
    (r"normalises each attention head", "qk_norm (LayerNorm per head)"),
    (r"adds the parameter .* per head", "per-head parameter added to attention logits"),
    (r"one entry per attention head", "attention: q/k/v heads not channels-last"),
    (r"rotary", "rotary embeddings"),
    (r"grouped-query", "grouped-query attention"),
    (r"head ax[ie]s|head layout|stacked q/k/v|channel groups|split into groups|group axis", "head axes"),
    (r"grouped in incompatible ways|ties the groups", "incompatible group counts"),
    (r"straddles", "group straddles concatenated spaces"),
    (r"combines channel axes with different structure", "joins different channel structures"),
    (r"reshapes|interleaves channels|through reshape", "reshape across the channel axis"),
    (r"weight is computed", "computed weight"),
    (r"concatenates", "concatenation"),
    (r"pads axis", "pads the channel axis"),
    (r"pools over axis", "pools over the channel axis"),
    (r"normalises over", "norm over more than the channel axis"),
    (r"expects channels on axis|normalises channels on axis|channels on axis", "channel axis mismatch"),
    (r"multiplies|matrix-vector", "product fxzip does not follow"),
    (r"repeats the channel axis", "repeats the channel axis"),
    (r"unbinds the channel axis", "unbinds the channel axis"),
    (r"used both as an output", "tied weight used as input and output"),
    (r"differ in architecture|graphs of different length", "traced copies differ"),
    (r"joined but differ in size", "joined spaces differ in size"),
]


def _gist(text: str, n: int = 70) -> str:
    """The first clause of a message with names and numbers blanked, so equal causes group."""
    text = text.strip().splitlines()[0] if text.strip() else ""
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r"\b\d+\b", "N", text)
    return text[:n].rstrip()


def classify(stage: str, error_type: str | None, message: str) -> str:
    for pattern, label in KEYWORDS:
        m = re.search(pattern, message, flags=re.S)
        if m:
            return f"{stage}: {label(m) if callable(label) else label}"
    return f"{stage}: {error_type}: {_gist(message)}" if error_type else f"{stage}: {_gist(message)}"


def first_lines(text: str, n: int = 2, limit: int = 400) -> str:
    lines = [l for l in str(text).strip().splitlines() if l.strip()]
    return " | ".join(lines[:n])[:limit]


# ----------------------------------------------------------------------------- one model

class _Stage:
    """Times a stage into ``rec['seconds']`` and keeps ``rec['running']`` current (so a
    timed-out worker's record says where it was)."""

    def __init__(self, rec: dict, key: str, stage: str, save: Callable[[], None]):
        self.rec, self.key, self.stage, self.save = rec, key, stage, save

    def __enter__(self):
        self.rec["running"] = self.stage
        self.save()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.rec["seconds"][self.key] = round(time.perf_counter() - self.t0, 3)
        return False


def _error(rec: dict, exc: BaseException, default_stage: str) -> dict:
    stage = stage_of(exc, default_stage)
    msg = str(exc)
    return {"outcome": "error", "stage": stage, "error_type": type(exc).__name__, "message": first_lines(msg),
            "category": classify(stage, type(exc).__name__, msg)}


def _merge_seconds(merged) -> dict:
    rep = getattr(merged, "meta", {}).get("fxzip")
    return {k: round(v, 3) for k, v in getattr(rep, "seconds", {}).items()}


def check_model(name: str, size: int = DEFAULT_SIZE, factory: Callable[[], Any] | None = None, seed: int = 0,
                batch: int = 32, min_images: int = 16, max_images: int = 4096, holdout: int = 2,
                save: Callable[[dict], None] | None = None, library: str = "timm") -> dict:
    """Run the coverage checks on one model in this process; returns its record.

    ``factory``: build the model yourself (a tiny custom module in tests);
    default ``create(name, size)`` (``create_torchvision`` for ``library="torchvision"``).
    ``save(record)`` is called at every stage."""
    import torch

    import fxzip
    from fxzip.analysis import analyze
    from fxzip.trace import captured_batch_size, trace

    rec: dict[str, Any] = {"model": name, "size": size, "outcome": None, "stage": None, "category": None,
                           "error_type": None, "message": "", "seconds": {}, "checks": {}, "warnings": [],
                           "code": code_state()}
    spec = input_spec(library, name, size)
    if library != "timm":
        rec.update(library=library, family=spec["family"], input_spec=spec)
    several = len(spec["inputs"]) > 1
    fx_inputs = {"inputs": _all_inputs} if several else {}  # batches are tuples of inputs, not (x, y)
    t_start = time.perf_counter()
    persist = (lambda: save(rec)) if save else (lambda: None)

    def done(**fields) -> dict:
        rec.update(fields)
        rec.pop("running", None)
        rec["seconds"]["total"] = round(time.perf_counter() - t_start, 3)
        persist()
        return rec

    # 0. create, eager forward, trace, analysis ------------------------------------------
    try:
        with _Stage(rec, "create", "create", persist):
            if factory is not None:
                torch.manual_seed(seed)
                model, rec["create_kwargs"] = factory().eval(), {"factory": getattr(factory, "__name__", "?")}
            else:
                model, rec["create_kwargs"] = build(library, name, size, seed)
            rec["params"] = sum(p.numel() for p in model.parameters())
            hb = spec.get("batch", 8)  # held-out batch size (8; transformers: HF_BATCH)
            holdout_data = input_batches(spec, hb * holdout, hb, seed + 1000)
            with torch.no_grad():
                call(model, holdout_data[0])
    except Exception as exc:  # noqa: BLE001 - every failure is a result here
        msg = str(exc)
        return done(outcome="error", stage="create", error_type=type(exc).__name__, message=first_lines(msg),
                    category=classify("create", type(exc).__name__, msg))
    x = holdout_data[0]
    try:
        with _Stage(rec, "trace", "trace", persist):
            gm, rec["batch_dim"] = trace_batch(model, x, spec)
        with _Stage(rec, "analysis", "analysis", persist):
            analysis = analyze(gm)
    except Exception as exc:  # noqa: BLE001
        return done(**_error(rec, exc, rec["running"]))
    rec["spaces"] = len(analysis.spaces)
    rec["mergeable_spaces"] = sum(1 for sp in analysis.spaces if sp.mergeable)
    rec["probed_spaces"] = sum(1 for sp in analysis.spaces if sp.mergeable and sp.probes)
    rec["max_space"] = max((sp.size for sp in analysis.spaces if sp.mergeable), default=0)
    plan = sample_plan(gm, analysis)
    fixed = captured_batch_size(gm)
    if fixed is not None:  # the model branches on the batch size: every batch must have the captured one
        batch = rec["fixed_batch"] = fixed
    images = max(min_images, plan["images_needed"])
    images = -(-images // batch) * batch
    rec["samples_short"] = images > max_images
    images = min(images, max(max_images, batch))
    rec.update(images=images, batch=batch, tightest_space=plan["tightest_space"])
    del gm
    data = input_batches(spec, images, batch, seed)

    # prepare: O(1) parameters, batch-norm statistics on the data ------------------------
    try:
        with _Stage(rec, "prepare", "prepare", persist):
            from fxzip.zoo import redraw

            redraw(model, seed)
            fxzip.reset_norm_stats(model, data, max_batches=8, **fx_inputs)
    except Exception as exc:  # noqa: BLE001
        return done(**_error(rec, exc, "prepare"))

    reference: dict[str, Any] = {}

    def ref64():
        """The float64 reference where the model's is not usable (``float64_reference``; asked only when a
        float64 comparison fails; the prepared model traced once)."""
        if "ref" not in reference:
            reference["ref"], rec["float64_reference"] = float64_reference(model, trace(model, x), holdout_data)
        return reference["ref"]

    # 1. self-merge identity -------------------------------------------------------------
    identity: dict[str, Any] = {}
    rec["checks"]["identity"] = identity
    try:
        with _Stage(rec, "identity_merge", "identity merge", persist), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged = fxzip.merge(model, copy.deepcopy(model), data=data, method="zipit", reset_bn=False,
                                 progress=False, **fx_inputs)
        rec["warnings"] += sorted({first_lines(str(w.message), 1, 200) for w in caught})[:5]
        identity["merge_seconds"] = _merge_seconds(merged)
        with _Stage(rec, "identity_verify", "identity verify", persist):
            err, err32, dtype = verified_error(model, merged, holdout_data, ref64)
        where = ""
        if err > TOL:
            identity["wrong_matches"] = wrong_matches(model, merged, x)
            where = worst_output(model, merged, holdout_data, dtype) + _wrong_text(identity["wrong_matches"])
        del merged
        identity.update(max_rel_err=err, max_rel_err_f32=err32, check_dtype=dtype,
                        outcome="pass" if err <= TOL else "fail-identity")
        if err > TOL:
            identity.update(stage="verify", message=f"self-merge differs: max rel err {err:.3g} > {TOL}{where}",
                            category="verify: self-merge differs from the model")
    except Exception as exc:  # noqa: BLE001
        identity.update(_error(rec, exc, "verify" if "verify" in rec["running"] else "match"))

    # 2. permutation recovery ------------------------------------------------------------
    perm: dict[str, Any] = {}
    rec["checks"]["permute"] = perm
    try:
        with _Stage(rec, "permute", "permute_channels", persist):
            p = fxzip.permute_channels(model, seed=1, example_inputs=x)
        with _Stage(rec, "permute_verify", "permute verify", persist):
            err32 = function_error(model, p, holdout_data)
            err64 = function_error_f64(model, p, holdout_data)
            if err64 is not None and err64 > TOL and ref64() is not None:
                err64 = function_error_f64(ref64(), p, holdout_data)
            err = err32 if err64 is None else err64
            if err64 is None and err32 > TOL:  # no float64 check: compare with the model's float32 noise floor
                perm["float32_noise_floor"] = floor = float32_noise_floor(model, holdout_data, seed)
                if err32 <= NOISE_FACTOR * floor:
                    perm["within_noise_floor"] = True
                    err = 0.0  # rounding alone: the analysis is right
            own, theirs = model.state_dict(), p.state_dict()
            common = [k for k in own if k in theirs and theirs[k].shape == own[k].shape]
            changed = [k for k in common if not torch.equal(own[k], theirs[k])]
        perm.update(permuted_rel_err=err32 if perm.get("within_noise_floor") else err, permuted_rel_err_f32=err32,
                    permuted_check_dtype=("float32 noise floor" if perm.get("within_noise_floor") else "float32")
                    if err64 is None else "float64", params_compared=len(common), params_changed=len(changed))
        if err > TOL:
            where = worst_output(model, p, holdout_data, perm["permuted_check_dtype"]) if library != "timm" else ""
            perm.update(outcome="fail-permute", stage="verify",
                        message=f"permuted copy computes another function: max rel err {err:.3g} > {TOL} "
                                f"({perm['permuted_check_dtype']}){where}",
                        category="verify: permuted copy differs (analysis)")
        elif not changed:
            perm.update(outcome="nothing-permuted", stage="verify",
                        message=f"no parameter changed ({len(common)} compared, "
                                f"{rec['mergeable_spaces']} mergeable spaces)",
                        category="verify: nothing permuted")
        else:
            with _Stage(rec, "recovery_merge", "recovery merge", persist), warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                merged = fxzip.merge(model, p, data=data, method="zipit", reset_bn=False, progress=False,
                                     **fx_inputs)
            perm["merge_seconds"] = _merge_seconds(merged)
            with _Stage(rec, "recovery_verify", "recovery verify", persist):
                err, err32, dtype = verified_error(model, merged, holdout_data, ref64)
            perm.update(recovery_rel_err=err, recovery_rel_err_f32=err32, recovery_check_dtype=dtype)
            if err <= TOL:
                perm["outcome"] = "pass"
            else:
                perm["wrong_matches"] = wrong_matches(model, merged, x, permuted_seed=1)
                where = worst_output(model, merged, holdout_data, dtype) + _wrong_text(perm["wrong_matches"])
                perm.update(outcome="fail-recovery", stage="verify",
                            message=f"merge with its permutation differs: max rel err {err:.3g} > {TOL}{where}",
                            category="verify: merge with the permuted copy differs")
    except Exception as exc:  # noqa: BLE001
        perm.update(_error(rec, exc, "verify" if "verify" in rec["running"] else "fold"))

    # overall: the first check that did not pass -------------------------------------------
    for check in (identity, perm):
        if check.get("outcome") != "pass":
            return done(**{k: check.get(k) for k in ("outcome", "stage", "category", "error_type", "message")})
    return done(outcome="pass", stage=None, category=None, error_type=None, message="")


# ----------------------------------------------------------------------------- code / machine

def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def source_digest(fxzip_dir: Path, passes_dir: Path) -> str:
    """sha256 of fxzip's sources (``passes`` named as in the repository), the same
    for the working tree and a snapshot of it."""
    h = hashlib.sha256()
    files = [(f"fxzip/{f.relative_to(fxzip_dir)}", f) for f in fxzip_dir.rglob("*.py")
             if f.relative_to(fxzip_dir).parts[0] != "passes"]
    files += [(f"passes/{f.relative_to(passes_dir)}", f) for f in passes_dir.rglob("*.py")]
    for rel, f in sorted(files):
        h.update(rel.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def code_state() -> dict:
    """The commit, whether fxzip's sources differ from it, and a digest of the
    sources this process imports (a snapshot, in a driven run: several engineers
    change the working tree while a run goes on)."""
    import fxzip
    import fxzip.passes

    state = json.loads(os.environ["FXZIP_COVERAGE_CODE"]) if os.environ.get("FXZIP_COVERAGE_CODE") else \
        git_state()
    state = {**state, "fxzip_digest": source_digest(Path(fxzip.__file__).parent,
                                                    Path(fxzip.passes.__file__).parent)}
    state["fxzip_path"] = str(Path(fxzip.__file__).parent)
    return state


def git_state() -> dict:
    dirty = _git("status", "--porcelain", "--", "fxzip", "passes")
    return {"commit": _git("rev-parse", "HEAD"), "fxzip_dirty": bool(dirty) and dirty != "unknown"}


def snapshot(dest: Path) -> dict:
    """Copy fxzip (with ``passes`` as ``fxzip/passes``, as installed) into ``dest``, so
    every model of a run imports the same code; returns the code state of the copy."""
    import shutil

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")

    def ignore_passes(folder: str, names: list[str]) -> set[str]:
        """``fxzip/passes`` (a link to ``passes`` in a checkout that has one) is copied from ``passes``."""
        skip = set(ignore(folder, names))
        return skip | ({"passes"} & set(names) if Path(folder) == ROOT / "fxzip" else set())

    state = git_state()
    shutil.copytree(ROOT / "fxzip", dest / "fxzip", ignore=ignore_passes)
    shutil.copytree(ROOT / "passes", dest / "fxzip" / "passes", ignore=ignore)
    state["fxzip_digest"] = source_digest(dest / "fxzip", dest / "fxzip" / "passes")
    state["snapshot"] = True
    return state


def machine(library: str = "timm") -> dict:
    return common.machine(("torch", "timm") if library == "timm" else ("torch", "timm", library))


# ----------------------------------------------------------------------------- driver

def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def run_one(name: str, size: int, args) -> dict:
    """``check_model`` in a fresh subprocess with a time limit."""
    with tempfile.TemporaryDirectory() as tmp:
        rec_file = Path(tmp) / "record.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--size", str(size), "--record-file",
               str(rec_file), "--seed", str(args.seed), "--batch", str(args.batch), "--min-images",
               str(args.min_images), "--max-images", str(args.max_images), "--library", args.library]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "PYTHONWARNINGS": "ignore"}
        if args.snapshot_dir:  # the snapshot comes first on sys.path (the editable install's finder is last)
            env["PYTHONPATH"] = os.pathsep.join([args.snapshot_dir] + [p for p in [env.get("PYTHONPATH")] if p])
            env["FXZIP_COVERAGE_CODE"] = json.dumps({k: v for k, v in args.code.items() if k != "fxzip_digest"})
        t0 = time.perf_counter()
        timed_out, proc = False, None
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=str(ROOT),
                                  env=env, check=False)
        except subprocess.TimeoutExpired:
            timed_out = True
        wall = round(time.perf_counter() - t0, 1)
        rec = json.loads(rec_file.read_text()) if rec_file.exists() else {"model": name, "size": size,
                                                                            "seconds": {}, "checks": {}}
    rec["wall_s"] = wall
    if timed_out:
        where = rec.pop("running", None) or "create"
        rec.update(outcome="timeout", stage="timeout", error_type=None, running_at_timeout=where,
                   message=f"no result after {args.timeout:.0f} s (was in stage {where})",
                   category=f"timeout (in {where})")
    elif rec.get("outcome") is None:
        tail = ((proc.stderr or "") + (proc.stdout or "")).strip().splitlines()[-3:] if proc else []
        where = rec.pop("running", None) or "create"
        rec.update(outcome="error", stage=_CRASH_STAGE.get(where, where), running_at_crash=where, error_type=f"exit {proc.returncode if proc else '?'}",
                   message=first_lines(" | ".join(tail) or "worker died without a record", 3),
                   category=f"{where}: worker crashed (exit {proc.returncode if proc else '?'})")
    return rec


_CRASH_STAGE = {"identity merge": "merge", "recovery merge": "merge", "permute_channels": "permute",
                "identity verify": "verify", "permute verify": "verify", "recovery verify": "verify"}
"""The stage a worker that died without a record was in (within a merge it cannot tell which)."""


def parse_models(items: list[str] | None, library: str = "timm") -> list[tuple[str, int]]:
    if not items:
        return library_panel(library)
    out = []
    for it in items:
        name, _, size = it.partition(":")
        out.append((name, int(size) if size else default_size(library, name)))
    return out


def result_name(library: str, stem: str = "coverage") -> str:
    """``coverage`` for timm (as always), ``coverage_torchvision`` / ``coverage_transformers`` for the others."""
    return stem if library == "timm" else f"{stem}_{library}"


def panel_entries(library: str) -> list[dict]:
    if library == "timm":
        return [{"model": m, "size": SIZES.get(m, DEFAULT_SIZE)} for m in PANEL]
    out = []
    for m, size in library_panel(library):
        spec = input_spec(library, m, size)
        out.append({"model": m, "size": size, "family": spec["family"], "input": spec["text"]})
    return out


def _result(library: str, runs: list, records: dict) -> dict:
    head = {} if library == "timm" else {"library": library}
    return {**head, "panel": panel_entries(library), "tolerance": TOL, "runs": runs,
            "records": [records[k] for k in _order(records, library)]}


def drive(args) -> dict:
    out = Path(args.out)
    path = out / f"{result_name(args.library)}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    records: dict[str, dict] = {r["model"]: r for r in result.get("records", [])}
    command = "python benchmarks/coverage.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:])
    args.snapshot_dir, args.code = None, git_state()
    args.code["fxzip_digest"] = source_digest(ROOT / "fxzip", ROOT / "passes")
    tmp = None
    if not args.live:
        tmp = tempfile.TemporaryDirectory(prefix="fxzip_coverage_")
        args.snapshot_dir, args.code = tmp.name, snapshot(Path(tmp.name))
        check = subprocess.run([sys.executable, "-c", "import fxzip; print(fxzip.__file__)"], capture_output=True,
                               text=True, cwd="/", env={**os.environ, "PYTHONPATH": tmp.name}, check=False)
        if check.returncode != 0 or not check.stdout.strip().startswith(tmp.name):
            raise SystemExit(f"the snapshot of fxzip does not import ({check.stdout.strip()}): "
                             f"{check.stderr.strip()[-1000:]}")
    try:
        return _drive(args, out, path, result, records, command)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _drive(args, out: Path, path: Path, result: dict, records: dict, command: str) -> dict:
    from tqdm.auto import tqdm

    run = {"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(args.library),
           "code": args.code, "config": {k: getattr(args, k) for k in ("timeout", "seed", "batch", "min_images",
                                                                          "max_images", "jobs")}}
    if args.library != "timm":
        run["config"] = {"library": args.library, **run["config"]}
    runs = result.get("runs", []) if records else []
    runs.append(run)
    todo = [(m, s) for m, s in parse_models(args.models, args.library) if not (args.resume and m in records)]
    run["models"] = [m for m, _ in todo]
    bar = tqdm(total=len(todo), desc="coverage", unit="model", dynamic_ncols=True, disable=args.quiet)
    # Workers are subprocesses with one torch thread each; this process only waits and writes the result,
    # so --jobs N uses N cores and the json is written by one thread only (as results arrive).
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_one, name, size, args): (name, size) for name, size in todo}
        for fut in as_completed(futures):
            name, size = futures[fut]
            rec = fut.result()
            bar.update(1)
            bar.set_postfix_str(f"{name} @ {size}")
            _record(args, out, path, runs, records, name, size, rec)
    bar.close()
    run["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    run["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    result = _result(args.library, runs, records)
    _write_json(path, result)
    path.with_suffix(".md").write_text(markdown(result))
    return result


def _record(args, out: Path, path: Path, runs: list, records: dict, name: str, size: int, rec: dict) -> None:
    """Store one model's record and rewrite coverage.json / coverage.md, so an interrupted run keeps it."""
    from tqdm.auto import tqdm

    records[name] = rec
    result = _result(args.library, runs, records)
    _write_json(path, result)
    path.with_suffix(".md").write_text(markdown(result))
    if not args.quiet:
        unit = "" if rec.get("family") in ("causal LM", "masked LM", "encoder-decoder") else "px"  # tokens
        tqdm.write(f"{name:32s} {size:4d}{unit:2s}  {rec['outcome']:16s} {rec.get('stage') or '':9s} "
                   f"{rec.get('wall_s', 0):6.1f}s  {rec.get('category') or ''}")


def _order(records: dict, library: str = "timm") -> list[str]:
    names = panel_names(library)
    pos = {m: i for i, m in enumerate(names)}
    return sorted(records, key=lambda m: (pos.get(m, len(names)), m))


# ----------------------------------------------------------------------------- report

def _cell(text: Any, n: int = 110) -> str:
    s = "" if text is None else str(text)
    s = s.replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= n else s[: n - 1] + "…"


def markdown(result: dict) -> str:
    recs = result["records"]
    panel = {p["model"] for p in result["panel"]}
    in_panel = [r for r in recs if r["model"] in panel]
    last = result["runs"][-1]
    m = last["machine"]
    library = result.get("library", "timm")
    if library == "timm":
        lines = ["# fxzip coverage benchmark", "",
                 "Self-merge identity and permutation recovery on timm architectures (random O(1) weights, "
                 "`pretrained=False`, `num_classes=10`); see the docstring of `benchmarks/coverage.py`.", ""]
    elif library == "transformers":
        lines = [f"# fxzip coverage benchmark: {library}", "",
                 "Self-merge identity and permutation recovery on Hugging Face transformers architectures: small "
                 "random configs built from their config classes (nothing downloaded; hidden 64, 2 layers, 4 heads, "
                 f"vocabulary {HF_VOCAB}, `use_cache=False`, eval mode, weights re-drawn at O(1) scale), token ids "
                 f"(B, {HF_SEQ}) with a right-padding attention mask (and decoder token ids for the encoder-decoder "
                 f"models) or images (B, 3, {HF_IMAGE}, {HF_IMAGE}), passed positionally in the order of each "
                 "model's forward (the input column; config in `create_kwargs` of the json); see the docstring of "
                 "`benchmarks/coverage.py`. Outputs (`ModelOutput`s) are compared tensor by tensor; held-out "
                 f"batches of {HF_BATCH}; calibration \"images\" are sequences for the text models. The captured "
                 "graph keeps as float32 the dtypes the model's code reads at run time (`x.dtype`, "
                 "`weight.dtype`): a float64 copy of the permuted or merged graph still rounds to float32 there "
                 "(Llama, Qwen2: rotary cos/sin and RMSNorm outputs; float64 errors up to ~1e-6, float32 "
                 "rounding) or does not run (DINOv2: `pixel_values.to(float32)` before a float64 conv; compared "
                 "in float32 then); a graph whose float64 copy differs from the model's is the float64 "
                 "reference itself (`float64_reference` in the json). Requirements: "
                 "`benchmarks/requirements-hf.txt` (`pip install -e \".[hf]\"`).",
                 ""]
    else:
        lines = [f"# fxzip coverage benchmark: {library}", "",
                 f"Self-merge identity and permutation recovery on {library} architectures (random O(1) weights, "
                 "`torchvision.models.get_model(name, weights=None, ...)`, `num_classes=10` where the builder "
                 "takes it, the inputs of each model in the table), every model of the classification, "
                 "segmentation, video and optical-flow modules; see the docstring of `benchmarks/coverage.py`. "
                 "Outputs that are dicts or lists are compared tensor by tensor.", ""]
    for run in result["runs"]:
        c = run["code"]
        lines.append(f"- Command: `{run['command']}` ({run['started']}; {len(run.get('models', []))} models; "
                     f"commit `{c['commit'][:10]}`{' + uncommitted fxzip changes' if c['fxzip_dirty'] else ''}, "
                     f"fxzip source digest `{c['fxzip_digest']}`{', snapshot taken at start' if c.get('snapshot') else ''})")
    lines += [f"- Machine: `{m['uname']}`; {m['cpu']}, {m['cores']} cores (shared), 1 torch thread per model; "
              f"Python {m['python']}, torch {m['torch']}, "
              + (f"timm {m['timm']}" if library == "timm" else f"{library} {m.get(library, '?')}"),
              f"- Config: {json.dumps(last['config'])}; tolerance max|out_merged - out_model| <= "
              f"{result['tolerance']:g} * max|out_model| on held-out batches; each model in a fresh subprocess.",
              ""]
    digests = sorted({r.get("code", {}).get("fxzip_digest", "?") for r in recs})
    if len(digests) > 1:
        lines += [f"Note: the records come from {len(digests)} different fxzip source states "
                  f"(digests {', '.join(digests)}); see each record's `code` in coverage.json.", ""]
    n_pass = sum(r["outcome"] == "pass" for r in in_panel)
    n_identity = sum(r.get("checks", {}).get("identity", {}).get("outcome") == "pass" for r in in_panel)
    counts = {o: sum(r["outcome"] == o for r in in_panel) for o in OUTCOMES}
    lines += ["## Summary", "",
              f"**Self-merge identity: {n_identity} of {len(panel)}** ({100 * n_identity / len(panel):.0f} %); "
              f"**all checks (identity, permuted copy, recovery): {n_pass} of {len(panel)}** "
              f"({len(in_panel)} of the panel recorded)"
              + (". Outcomes: " + ", ".join(f"{o} {n}" for o, n in counts.items() if n) if in_panel else "")
              + ".", ""]
    stage_counts: dict[str, int] = {}
    for r in in_panel:
        if r["outcome"] != "pass":
            stage_counts[r.get("stage") or "?"] = stage_counts.get(r.get("stage") or "?", 0) + 1
    if library != "timm":
        lines += family_table(result["panel"], in_panel)
    if stage_counts:
        lines += ["Failures by stage: " + ", ".join(f"{s} {n}" for s, n in
                                                    sorted(stage_counts.items(), key=lambda kv: -kv[1])) + ".", ""]
    groups: dict[str, list[str]] = {}
    for r in in_panel:
        if r["outcome"] != "pass":
            groups.setdefault(r.get("category") or "?", []).append(r["model"])
    if groups:
        lines += ["| category | count | models |", "|---|---:|---|"]
        for cat, models in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            lines.append(f"| {_cell(cat, 200)} | {len(models)} | {', '.join(models)} |")
        lines.append("")
    lines += ["## Per model", "",
              "Spaces: mergeable / all. Batch: whether the captured graph keeps the batch dimension symbolic "
              "(it computes the model's output at another batch size) or was captured for one batch size, with "
              "the capture's reason (`trace_batch`). Images: calibration images per merge (`*`: fewer than "
              "needed for 2x samples per feature). Errors: identity / permuted copy / recovery (max relative "
              "difference).", ""]
    if library == "timm":
        lines += ["| model | size | params (M) | outcome | stage | category | message | spaces | batch | images | "
                  "errors | time (s) |", "|---|---:|---:|---|---|---|---|---:|---|---:|---|---:|"]
    else:
        lines += ["| model | family | input | params (M) | outcome | stage | category | message | spaces | batch | "
                  "images | errors | time (s) |", "|---|---|---|---:|---|---|---|---|---:|---|---:|---|---:|"]
    for r in recs:
        idn, per = r.get("checks", {}).get("identity", {}), r.get("checks", {}).get("permute", {})
        errs = [idn.get("max_rel_err"), per.get("permuted_rel_err"), per.get("recovery_rel_err")]
        err_s = " / ".join("-" if e is None else f"{e:.1e}" for e in errs) if any(e is not None for e in errs) \
            else ""
        spaces = f"{r['mergeable_spaces']} / {r['spaces']}" if "spaces" in r else ""
        images = f"{r['images']}{'*' if r.get('samples_short') else ''}" if "images" in r else ""
        params = f"{r['params'] / 1e6:.1f}" if r.get("params") is not None else ""
        name = r["model"] if r["model"] in panel else f"{r['model']} (not in panel)"
        size = r["size"] if library == "timm" else \
            f"{r.get('family', '')} | {r.get('input_spec', {}).get('text', r['size'])}"
        lines.append(f"| {name} | {size} | {params} | {r['outcome']} | {r.get('stage') or ''} | "
                     f"{_cell(r.get('category'), 80)} | {_cell(r.get('message'), 110 if library == 'timm' else 320)} | "
                     f"{spaces} | {_cell(batch_cell(r.get('batch_dim')), 80)} | {images} | "
                     f"{err_s} | {r.get('wall_s', r.get('seconds', {}).get('total', 0)):.1f} |")
    lines.append("")
    return "\n".join(lines)


def _le_tol(err: float | None) -> bool:
    return err is not None and err <= TOL


def family_table(panel: list[dict], recs: list[dict]) -> list[str]:
    """Per family: models, recorded, and how many pass each check (identity, permuted copy
    computes the model's function, recovery = all checks)."""
    fam = {p["model"]: p.get("family", "?") for p in panel}
    order = list(dict.fromkeys(fam.values()))
    lines = ["| family | models | recorded | identity | permuted copy exact | recovery (all checks) |",
             "|---|---:|---:|---:|---:|---:|"]
    for f in order + ["all"]:
        rs = [r for r in recs if f == "all" or fam.get(r["model"]) == f]
        n = sum(1 for v in fam.values() if f == "all" or v == f)
        ident = sum(r.get("checks", {}).get("identity", {}).get("outcome") == "pass" for r in rs)
        perm = sum(_le_tol(r.get("checks", {}).get("permute", {}).get("permuted_rel_err")) for r in rs)
        lines.append(f"| {f} | {n} | {len(rs)} | {ident} | {perm} | {sum(r['outcome'] == 'pass' for r in rs)} |")
    return lines + [""]


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", choices=LIBRARIES, default="timm",
                    help="whose panel: timm's 61 models (default; results/coverage.{json,md}), torchvision's "
                         "classification, segmentation, video and optical-flow models "
                         "(results/coverage_torchvision.{json,md}) or 11 small random transformers models "
                         "(results/coverage_transformers.{json,md})")
    ap.add_argument("--models", nargs="+", metavar="NAME[:SIZE]", help="a subset (default: the whole panel)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per model (default 300)")
    ap.add_argument("--resume", action="store_true", help="skip models already recorded in the output json")
    ap.add_argument("--out", default=str(RESULTS),
                    help="output folder (coverage.json, coverage.md; coverage_{torchvision,transformers}.* for "
                         "the other libraries)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32, help="calibration batch size")
    ap.add_argument("--min-images", type=int, default=16)
    ap.add_argument("--max-images", type=int, default=4096)
    ap.add_argument("--jobs", type=int, default=1,
                    help="models checked at once, each a subprocess with one torch thread (default 1; "
                         "at most the number of cores, or time limits measure contention)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--live", action="store_true",
                    help="import fxzip from the working tree for every model (default: a snapshot taken at start)")
    ap.add_argument("--merge-from", nargs="+", metavar="JSON",
                    help="fold the records of these coverage.json files into --out's and rewrite the report")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE, help=argparse.SUPPRESS)
    ap.add_argument("--record-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        import torch

        torch.set_num_threads(1)
        rec_file = Path(args.record_file) if args.record_file else None
        save = (lambda rec: _write_json(rec_file, rec)) if rec_file else None
        rec = check_model(args.one, args.size, seed=args.seed, batch=args.batch, min_images=args.min_images,
                          max_images=args.max_images, save=save, library=args.library)
        if rec_file is None:
            print(json.dumps(rec, indent=1))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.merge_from:
        merge_results(Path(args.out), [Path(f) for f in args.merge_from], args.library)
        return
    drive(args)


def merge_results(out: Path, others: list[Path], library: str = "timm") -> dict:
    """Fold the records and runs of other coverage.json files (runs made with another
    ``--out``, e.g. side by side) into ``out``: a later file's record of a model
    replaces the earlier one; every run stays listed, so the report names each
    record's command and code state."""
    path = out / f"{result_name(library)}.json"
    result = json.loads(path.read_text())
    records = {r["model"]: r for r in result["records"]}
    for other in others:
        extra = json.loads(other.read_text())
        result["runs"] += extra["runs"]
        records.update({r["model"]: r for r in extra["records"]})
    seen: set[str] = set()  # a run resumed from another's output lists that one's runs again
    result["runs"] = [run for run in result["runs"]
                      if not (json.dumps(run, sort_keys=True) in seen or seen.add(json.dumps(run, sort_keys=True)))]
    result["records"] = [records[k] for k in _order(records, library)]
    _write_json(path, result)
    path.with_suffix(".md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    main()
