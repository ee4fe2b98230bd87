"""smollm3-mlx: run Hugging Face's SmolLM3-3B on Apple MLX.

Importing this package is cheap: heavy modules load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load": "loading",
    "load_model": "loading",
    "ModelLoadError": "loading",
    "GenerationConfig": "loading",
    "generate": "generate",
    "stream_generate": "generate",
    "generate_step": "generate",
    "GenerationResponse": "generate",
    "make_sampler": "sample",
    "make_logits_processors": "sample",
    "Tokenizer": "tokenizer",
    "ChatSession": "chat",
    "Sampling": "chat",
    "ThinkingDelta": "chat",
    "AnswerDelta": "chat",
    "ToolCall": "chat",
    "Done": "chat",
    "convert": "convert",
}

__all__ = [*_LAZY, "__version__"]

if TYPE_CHECKING:
    from .chat import AnswerDelta, ChatSession, Done, Sampling, ThinkingDelta, ToolCall
    from .convert import convert
    from .generate import GenerationResponse, generate, generate_step, stream_generate
    from .loading import GenerationConfig, ModelLoadError, load, load_model
    from .sample import make_logits_processors, make_sampler
    from .tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
