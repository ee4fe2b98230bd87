"""What a command starts from: the model it names (the default one converted on first use),
loaded with its memory checked and limited, and the Chat over it; errors are one line."""

from __future__ import annotations

import atexit
import contextlib
import os
from pathlib import Path

import typer

from . import console
from .options import ChatSettings

DEFAULT_MODEL_NAME = "SmolLM3-3B-4bit"  # HuggingFaceTB/SmolLM3-3B, 4-bit mixed recipe


def default_model_dir() -> Path:
    home = os.environ.get("SMOLLM3_MLX_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "smollm3-mlx"
    )
    return Path(home).expanduser() / DEFAULT_MODEL_NAME


LIMITS = contextlib.ExitStack()  # MLX's memory limits for this process, released at exit
atexit.register(LIMITS.close)


def model_name(model: str | None) -> str:
    """`model`, or the default model's folder (downloaded and converted on first use)."""
    if model is not None:
        return model
    from ..convert import ConvertError, ConvertInterrupted, convert
    from ..hub import DEFAULT_REPO

    path = default_model_dir()
    if not (path / "config.json").exists():
        console.note(f"first run: downloading {DEFAULT_REPO} and converting it to 4-bit")
        console.note(f"into {path}")
        try:
            with console.progress("converting") as update:
                convert(DEFAULT_REPO, path, bits=4, recipe="mixed", progress=update,
                        note=console.note)  # fmt: skip
        except ConvertInterrupted as e:
            console.error(str(e))
            raise typer.Exit(128 + e.signum) from None
        except ConvertError as e:
            console.error(str(e))
            raise typer.Exit(1) from None
    return str(path)


def load_model(
    model: str | None, dtype: str, max_context: int | None = None, kv_bits: int | None = None,
    kv_group_size: int = 64, check_memory: bool = True, batch: int = 1,
):  # fmt: skip
    """Load `model` (see `model_name`): (model, tokenizer, name). First refuses a session that
    would not fit in memory (memory.py; `batch` rows, serve's --max-batch), unless check_memory
    is off; sets MLX's memory limits."""
    from ..checkpoint import ModelLoadError
    from ..loading import load
    from ..memory import MemoryBudgetError

    name = model_name(model)
    try:
        with console.status(f"loading {name}"):
            loaded = load(name, dtype=compute_dtype(dtype), max_context=max_context, lazy=True,
                          check_memory=False)  # fmt: skip
            budget_memory(loaded[0].info.path, dtype, max_context, kv_bits, kv_group_size,
                          check_memory, batch)  # fmt: skip
    except (ModelLoadError, MemoryBudgetError, OSError) as e:
        console.error(str(e))
        raise typer.Exit(1) from None
    import mlx.core as mx

    # The weights are read on MLX's own thread meanwhile; the first answer waits for them.
    mx.async_eval(loaded[0].parameters())
    return (*loaded, name)


def budget_memory(
    path: Path, dtype: str, max_context: int | None, kv_bits: int | None, kv_group_size: int,
    check_memory: bool, batch: int = 1,
) -> None:  # fmt: skip
    """Estimate the session's memory (config and headers only; memory.py), refuse it
    (MemoryBudgetError) unless `check_memory` is off, and set MLX's memory limits to it."""
    from ..memory import check_memory as check, estimate_memory, memory_limits

    est = estimate_memory(
        path, max_context=max_context, kv_bits=kv_bits, kv_group_size=kv_group_size,
        dtype=compute_dtype(dtype), batch=batch,
    )  # fmt: skip
    if check_memory:
        check(est)
    LIMITS.enter_context(memory_limits(est))


def compute_dtype(dtype: str) -> str | None:
    return None if dtype == "stored" else dtype


def open_chat(settings: ChatSettings, loaded: tuple | None = None):
    """The Chat for `chat`, `generate` and `cache-prompt`, over the model `loaded` (loaded here
    when None)."""
    import mlx.core as mx

    from ..cache_file import PromptCacheError
    from ..chat import Chat
    from ..sample import Sampling

    s = settings
    m, tokenizer, name = loaded or load_model(
        s.model, s.dtype, s.max_context, s.kv_bits, s.kv_group_size, s.memory_check
    )
    if s.seed is not None:
        mx.random.seed(s.seed)
    # The options given, over generation_config.json's defaults
    sampling = Sampling.from_model(
        m, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens
    )
    try:
        return Chat(
            m,
            tokenizer,
            think=s.think,
            system=s.system,
            keep_thinking=s.keep_thinking,
            sampling=sampling,
            model_name=name,
            kv_bits=s.kv_bits,
            kv_group_size=s.kv_group_size,
            kv_start=s.kv_start,
            prompt_lookup=s.prompt_lookup,
            think_budget=s.think_budget,
            prompt_cache=s.prompt_cache,
        )
    except (ValueError, PromptCacheError) as e:
        console.error(str(e))
        raise typer.Exit(1) from None
