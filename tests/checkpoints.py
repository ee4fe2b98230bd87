"""Tiny SmolLM3 checkpoints built by transformers (the reference implementation), for the tests.

transformers and torch are imported lazily: they are test-only dependencies and slow to import.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_DIR = Path(
    os.environ.get("SMOLLM3_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "smollm3-reference")
)
REFERENCE_MODEL_DIR = REFERENCE_DIR / "SmolLM3-3B"

requires_reference = pytest.mark.skipif(
    not (REFERENCE_MODEL_DIR / "tokenizer.json").exists(),
    reason=f"SmolLM3 reference files not found at {REFERENCE_DIR} "
    "(set SMOLLM3_REFERENCE_DIR to the folder holding SmolLM3-3B/tokenizer.json)",
)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)

# A byte-level tokenizer with SmolLM3's chat and think tokens, for tiny models that need a
# loadable folder but not the real 128256-token vocabulary (it fits in TINY's 512 rows).
TINY_SPECIAL = ["<|im_start|>", "<|im_end|>"]
TINY_ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>"]
TINY_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}"
)


def write_tiny_tokenizer(path: Path) -> Path:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja of a 262-token tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(TINY_SPECIAL)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TINY_ADDED])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "chat_template.jinja").write_text(TINY_TEMPLATE)
    return path


TINY = dict(
    initializer_range=0.2,  # peaky attention, so that a position bug moves the logits
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    pad_token_id=None,
    bos_token_id=None,
    eos_token_id=None,
)


def make_tiny_checkpoint(
    path: Path,
    *,
    dtype: str = "float32",
    seed: int = 0,
    rope_scaling: dict | None = None,
    spelling: str = "v5",
    with_tokenizer: bool = False,
    tiny_tokenizer: bool = True,
    **overrides,
) -> Path:
    """Save a random SmolLM3 with `SmolLM3ForCausalLM.save_pretrained`.

    spelling "v5" keeps the config as transformers 5 writes it (`rope_parameters`); "v4" rewrites
    the RoPE settings as transformers 4 spelled them (`rope_theta` + `rope_scaling`), as the real
    SmolLM3-3B config.json does. with_tokenizer gives the model the real 128256-token vocabulary
    and copies the real tokenizer files beside it; otherwise (unless tiny_tokenizer is False) the
    tiny tokenizer of `write_tiny_tokenizer` goes beside it, so that the folder is a whole model.
    """
    import torch
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    args = {**TINY, **overrides}
    if with_tokenizer:
        args.update(
            vocab_size=128256, bos_token_id=128000, eos_token_id=128012, pad_token_id=128004
        )
    theta = args.pop("rope_theta")
    rope_parameters = {"rope_type": "default", "rope_theta": theta}
    if rope_scaling is not None:
        rope_parameters = {"rope_theta": theta, **rope_scaling}
    config = SmolLM3Config(rope_parameters=rope_parameters, **args)
    torch.manual_seed(seed)
    model = SmolLM3ForCausalLM(config).to(getattr(torch, dtype)).eval()
    # Random init leaves norms at 1; perturb them so that a norm-weight bug cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)

    if spelling == "v4":
        cfg = json.loads((path / "config.json").read_text())
        rp = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rp.pop("rope_theta")
        rope_type = rp.pop("rope_type")
        cfg["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rp}
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    if with_tokenizer:
        for name in TOKENIZER_FILES:
            shutil.copy(REFERENCE_MODEL_DIR / name, path / name)
        shutil.copy(REFERENCE_MODEL_DIR / "generation_config.json", path / "generation_config.json")
    elif tiny_tokenizer:
        write_tiny_tokenizer(path)
    return path


def hf_logits(path: Path, ids) -> np.ndarray:
    """float32 logits of the checkpoint at `path`, computed by transformers."""
    import torch
    from transformers import SmolLM3ForCausalLM

    model = SmolLM3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([list(ids)]))
    return out.logits[0].float().numpy()
