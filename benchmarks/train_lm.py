"""Train the language-model pairs of ``benchmarks/lm_merge.py`` on CPU.

Pair ``p``: model A learns the ``code`` domain from seed ``2p``, model B the
``prose`` domain from seed ``2p + 1`` (``benchmarks/lm_corpora.py``), both
Llama-style causal LMs (grouped-query attention, RMSNorm, SwiGLU, rotary;
width 256, 4 layers, 4 query heads over 2 key/value heads, untied input and
output embeddings, 4.5 M parameters) with one shared byte-level BPE
tokenizer. Recipe: AdamW (lr 2e-3, betas 0.9/0.95, weight decay 0.1 on
matrices only), 5% linear warm-up then cosine decay to 10%, batches of 16
rows of 256 tokens drawn with replacement from the packed training split
(seeded), gradient clipping at 1.0, float32.

Outputs (committed; fp16 weights, ~9 MB a model):
``benchmarks/checkpoints/lm/pair{p}_{domain}/`` is a ``save_pretrained``
folder with the tokenizer beside it, plus ``train.json`` (recipe, seeds,
loss curve, seconds, held-out loss on both domains). Resumable: training
state is saved every ``--save-every`` steps to ``.partial/`` (git-ignored)
and picked up again; a finished model is skipped.

    python benchmarks/train_lm.py --pairs 3 --steps 600
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_corpora  # noqa: E402

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "checkpoints" / "lm"
SEQ = 256


def config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                       tie_word_embeddings=False, use_cache=False, pad_token_id=0, eos_token_id=1,
                       bos_token_id=1, rope_theta=10000.0)


def rows(tokenizer, texts_path: str, seq: int = SEQ):
    """The packed rows of one split (``fxzip.text_data``): ids and mask, (N, seq)."""
    from fxzip.text_data import open_text

    source = open_text(texts_path, tokenizer, seq, batch_size=16, progress=False)
    return source.ids, source.mask


def held_out_loss(model, ids, mask, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over the real tokens of ``ids``."""
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            x, m = ids[i:i + batch], mask[i:i + batch]
            labels = x.masked_fill(m == 0, -100)
            logits = model(input_ids=x, attention_mask=m).logits[:, :-1].float()
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((target != -100).sum())
    model.train()
    return total / max(count, 1)


def learning_rate(step: int, steps: int, peak: float) -> float:
    warm = max(1, int(0.05 * steps))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_one(pair: int, domain: str, seed: int, tokenizer, data: dict, steps: int, save_every: int,
              lr: float, batch: int, out: Path = OUT) -> dict:
    from transformers import LlamaForCausalLM

    folder = out / f"pair{pair}_{domain}"
    if (folder / "train.json").exists():
        return json.loads((folder / "train.json").read_text())
    partial = out / ".partial" / f"pair{pair}_{domain}.pt"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config(len(tokenizer)))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    ids, mask = data[domain]["train"]
    start, curve, seconds = 0, [], 0.0
    if partial.exists():
        state = torch.load(partial, weights_only=False)  # our own file, written below
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start, curve, seconds = state["step"], state["curve"], state["seconds"]
        print(f"pair {pair} {domain}: resuming at step {start}", flush=True)
    model.train()
    t0 = time.perf_counter() - seconds
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        pick = torch.randint(0, len(ids), (batch,), generator=gen)
        x, m = ids[pick], mask[pick]
        loss = model(input_ids=x, attention_mask=m, labels=x.masked_fill(m == 0, -100)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append(round(loss.item(), 4))
        if (step + 1) % 25 == 0:
            print(f"pair {pair} {domain} step {step + 1}/{steps} loss {sum(curve[-25:]) / 25:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if (step + 1) % save_every == 0 and step + 1 < steps:
            partial.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                        "step": step + 1, "curve": curve, "seconds": time.perf_counter() - t0}, partial)
    seconds = time.perf_counter() - t0
    model.eval()
    held = {d: held_out_loss(model, *data[d]["eval"]) for d in lm_corpora.DOMAINS}
    folder.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info = {"pair": pair, "domain": domain, "seed": seed, "steps": steps, "batch": batch, "seq_len": SEQ, "lr": lr,
            "params": sum(p.numel() for p in model.parameters()), "seconds": round(seconds, 1),
            "threads": torch.get_num_threads(), "loss_curve": curve,
            "held_out_loss_fp32": held, "corpora": lm_corpora.provenance(), "torch": torch.__version__}
    (folder / "train.json").write_text(json.dumps(info, indent=1) + "\n")
    if partial.exists():
        partial.unlink()
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--first-pair", type=int, default=0)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT, help=f"default {OUT.relative_to(ROOT.parent)}")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = lm_corpora.train_tokenizer(args.out / "tokenizer")
    texts = lm_corpora.write_texts(args.out / "text")
    data = {d: {s: rows(tokenizer, texts[d][s]) for s in ("train", "eval")} for d in lm_corpora.DOMAINS}
    for d in lm_corpora.DOMAINS:
        print(f"{d}: {int(data[d]['train'][1].sum())} training tokens, {int(data[d]['eval'][1].sum())} held out",
              flush=True)
    for pair in range(args.first_pair, args.first_pair + args.pairs):
        for k, domain in enumerate(lm_corpora.DOMAINS):
            info = train_one(pair, domain, 2 * pair + k, tokenizer, data, args.steps, args.save_every, args.lr,
                             args.batch, args.out)
            print(f"pair {pair} {domain}: {info['seconds']} s, held-out loss {info['held_out_loss_fp32']}",
                  flush=True)


if __name__ == "__main__":
    main()
