"""A SmolLM3-shaped stand-in trained for a few minutes on real text, for the quantization benchmark.

Recipes cannot be told apart on random weights (every matrix is equally sensitive) and the real
3B is not here. This trains transformers' SmolLM3 (the reference implementation; torch, since
MLX's CPU backend is far slower at training) with SmolLM3's shape where it matters to quantization:
NoPE every 4th layer, GQA, and the tied 128,256-row embedding over the real tokenizer, which holds
most of the parameters of a small model. The text is the Python standard library's own source
(real, local, deterministic): files whose name hashes to 0 mod 8 are held out for evaluation.

    nice -n 10 python benchmarks/bench_quant_standin.py [--steps N] [--minutes M]

The checkpoint (bf16 safetensors, config.json, the real tokenizer files) is cached in
$SMOLLM3_BENCH_CACHE or benchmarks/.cache/smollm3-standin-16m; `held_out_text()` is the eval text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sysconfig
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SMOLLM3_BENCH_CACHE", REPO_ROOT / "benchmarks" / ".cache"))
STANDIN = CACHE / "smollm3-standin-16m"
REFERENCE = REPO_ROOT.parent.parent / "shared" / "smollm3-reference" / "SmolLM3-3B"
REFERENCE = Path(os.environ.get("SMOLLM3_REFERENCE_DIR", REFERENCE.parent)) / "SmolLM3-3B"
COPIED = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
COPIED += ["chat_template.jinja", "generation_config.json"]
SHAPE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    no_rope_layer_interval=4,
    max_position_embeddings=4096,
)
SEQ, BATCH, LR, SEED = 128, 2, 3e-3, 0
SAVE_EVERY = 600  # seconds: a checkpoint on the way, usable if the run is cut short


def _stdlib_files(held_out: bool) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)
    pick = [p for p in files if (hashlib.sha256(p.name.encode()).digest()[0] % 8 == 0) == held_out]
    return pick


def training_text() -> str:
    return "\n\n".join(p.read_text(errors="replace") for p in _stdlib_files(held_out=False))


def held_out_text(chars: int = 60_000) -> str:
    """Source files the stand-in never trained on, the first `chars` characters."""
    return "\n\n".join(p.read_text(errors="replace") for p in _stdlib_files(held_out=True))[:chars]


def build(steps: int, minutes: float, out: Path = STANDIN) -> Path:
    """Train for `steps` steps or `minutes` of wall time, whichever ends first (the machine is
    shared: a time budget keeps the run bounded); the learning rate decays over the budget."""
    import torch
    from tokenizers import Tokenizer
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    ids = Tokenizer.from_file(str(REFERENCE / "tokenizer.json")).encode(training_text()).ids
    data = torch.tensor(ids, dtype=torch.long)
    print(f"training text: {len(ids):,} tokens")
    base = json.loads((REFERENCE / "config.json").read_text())
    keep = ("vocab_size", "rope_theta", "rms_norm_eps", "bos_token_id", "eos_token_id")
    config = SmolLM3Config(
        **{k: base[k] for k in keep}, **SHAPE, tie_word_embeddings=True, pad_token_id=128004
    )
    model = SmolLM3ForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n:,}")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(SEED)
    start = saved = time.perf_counter()
    step, budget = 0, minutes * 60
    for step in range(steps):
        done = max(step / steps, (time.perf_counter() - start) / budget)
        if done >= 1:
            break
        lr = LR * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * (1 - done))
        for group in opt.param_groups:
            group["lr"] = lr
        at = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=gen)
        batch = torch.stack([data[i : i + SEQ] for i in at.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            took = time.perf_counter() - start
            print(f"step {step}: loss {loss.item():.3f} ({took:.0f} s)", flush=True)
        if time.perf_counter() - saved > SAVE_EVERY:
            _save(model, out, step)
            saved = time.perf_counter()
    _save(model, out, step)
    print(f"saved {out} after {step} steps, {time.perf_counter() - start:.0f} s")
    return out


def _save(model, out: Path, step: int) -> None:
    import torch

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    model.to(torch.float32)
    for name in COPIED:
        shutil.copyfile(REFERENCE / name, tmp / name)
    (tmp / "training.json").write_text(json.dumps({"steps": step, "batch": BATCH, "seq": SEQ}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--out", type=Path, default=STANDIN)
    args = parser.parse_args()
    build(args.steps, args.minutes, args.out)


if __name__ == "__main__":
    main()
