"""Tiny SmolLM3 checkpoints built by transformers (the reference implementation), for the tests.

transformers and torch are imported lazily: they are test-only dependencies and slow to import.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_REFERENCE_DIR = REPO_ROOT.parent / "shared" / "smollm3-reference"

# Outside this workplace the reference folder is absent: the few files the tests need are then
# fetched once from the hub into the Hugging Face cache, at a pinned commit, and checked against
# the sha256 sums of the files the tests were written against (PROVENANCE.md of the folder).
REFERENCE_REPO = "HuggingFaceTB/SmolLM3-3B"
# The commit of the snapshot folders that public projects show for this repo; PROVENANCE.md
# has no hub commit, so the sums below, not the commit, are what vouch for the files.
REFERENCE_REVISION = "a07cc9a04f16550a088caea529712d1d335b0ac1"
REFERENCE_SHA256 = {
    "config.json": "cef25c6da5422f151c06095e524529d9baed243ec9dc4ae7e045618b1ae06e3b",
    "generation_config.json": "3458d62b3f9654f4bbe285223b0f4e5a1e67cae61c92bb6aeaadf04468bf9e01",
    "tokenizer_config.json": "59a64b39f05ee0acf7479bbccf99a44d9e481c1a4a494eb03838ae3c35eb29be",
    "special_tokens_map.json": "12403efb970f069ba62ddf3b66166a27254be4a198166b61ad1ee604bd3a4515",
    "chat_template.jinja": "3e0e275a527f249670056e0078e474eadbdd007c134b4fdfae5a7b3089702814",
    "model.safetensors.index.json": (
        "e3a7254c086c4a78f95ad5864f435d165ffed1ed8998326ce5107b4423c15b76"
    ),
    "tokenizer.json": "7b6a500b662a34eb3f0374db856ba4ad7de4c81040571d78dc0d357238930005",
}
SKIP_REASON = "SmolLM3 reference files unavailable"


def fetch_reference(revision: str = REFERENCE_REVISION) -> tuple[Path | None, str]:
    """(a folder holding SmolLM3-3B/ with the files of REFERENCE_SHA256, "") from the hub, or
    (None, why not). Once in the cache, the files are found there without a request."""
    from huggingface_hub import constants, hf_hub_download

    files = {}
    for name, sha256 in REFERENCE_SHA256.items():
        try:
            files[name] = Path(hf_hub_download(REFERENCE_REPO, name, revision=revision))
        except Exception as e:  # offline, unreachable, removed: the first failure says it all
            first = (str(e).strip().splitlines() or [""])[0]
            return None, f"fetching {REFERENCE_REPO} failed: {type(e).__name__}: {first}"
        if hashlib.sha256(files[name].read_bytes()).hexdigest() != sha256:
            return None, f"{name} of {REFERENCE_REPO}@{revision[:12]} is not the pinned file"
    folder = Path(constants.HF_HOME) / "smollm3-mlx-reference" / revision
    link = folder / "SmolLM3-3B"
    if link.resolve() != files["config.json"].parent.resolve():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".SmolLM3-3B.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(files["config.json"].parent, target_is_directory=True)
        os.replace(tmp, link)
    return folder, ""


def _reference_dir() -> tuple[Path, str]:
    """The reference folder, and why it is unusable ("" when it is usable)."""
    named = os.environ.get("SMOLLM3_REFERENCE_DIR")
    folder = Path(named) if named else SHARED_REFERENCE_DIR
    if (folder / "SmolLM3-3B" / "tokenizer.json").exists():
        return folder, ""
    if named:
        return folder, f"not found at SMOLLM3_REFERENCE_DIR={named}"
    fetched, why = fetch_reference()
    return (fetched, "") if fetched else (folder, why)


REFERENCE_DIR, REFERENCE_MISSING = _reference_dir()
REFERENCE_MODEL_DIR = REFERENCE_DIR / "SmolLM3-3B"

requires_reference = pytest.mark.skipif(
    bool(REFERENCE_MISSING), reason=f"{SKIP_REASON}: {REFERENCE_MISSING}"
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


@contextmanager
def frozen_hf_tokenizer(now: datetime) -> Iterator:
    """transformers' tokenizer of the reference folder, its chat template's clock reading `now`."""
    from transformers import AutoTokenizer
    from transformers.utils import chat_template_utils

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return now

    saved = chat_template_utils.datetime
    chat_template_utils.datetime = Frozen
    try:
        yield AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    finally:
        chat_template_utils.datetime = saved
