"""smollm3-mlx: run Hugging Face's SmolLM3-3B on Apple MLX.

Importing this package is cheap: heavy modules load on first use.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from ._version import __version__

_LAZY = {
    "load": "loading",
    "load_model": "loading",
    "ModelLoadError": "checkpoint",
    "ModelInfo": "model",
    "generate": "generate",
    "stream_generate": "generate",
    "generate_step": "step",
    "GenerationResponse": "generate",
    "BatchGenerator": "batch",
    "stream_batch": "batch",
    "batch_generate": "batch",
    "make_sampler": "sample",
    "make_logits_processors": "sample",
    "Sampling": "sample",
    "KVSettings": "cache",
    "PromptCache": "cache",
    "Tokenizer": "tokenizer",
    "Chat": "chat",
    "ChatBusyError": "chat",
    "ChatFileError": "chat_file",
    "NotTextWarning": "chat_file",
    "TurnStats": "events",
    "Event": "events",
    "ThinkingDelta": "events",
    "AnswerDelta": "events",
    "ToolCall": "events",
    "ToolCallDelta": "events",
    "ToolCallError": "events",
    "Error": "events",
    "Done": "events",
    "EventParser": "events",
    "TurnState": "turn",
    "TurnIds": "turn",
    "tool_schema": "tools",
    "ConstraintError": "constrain",
    "ResponseFormat": "constrain",
    "make_response_format": "constrain",
    "make_answer_constraint": "constrain",
    "make_think_budget": "constrain",
    "convert": "convert",
    "estimate_memory": "memory",
    "MemoryBudgetError": "memory",
    "MemoryEstimate": "memory",
    "PromptCacheError": "cache_file",
    "PromptCacheMismatch": "cache_file",
}

__all__ = [*_LAZY, "__version__"]

if TYPE_CHECKING:
    from .batch import (
        BatchGenerator as BatchGenerator,
        batch_generate as batch_generate,
        stream_batch as stream_batch,
    )
    from .cache import (
        KVSettings as KVSettings,
        PromptCache as PromptCache,
    )
    from .cache_file import (
        PromptCacheError as PromptCacheError,
        PromptCacheMismatch as PromptCacheMismatch,
    )
    from .chat import (
        Chat as Chat,
        ChatBusyError as ChatBusyError,
    )
    from .chat_file import (
        ChatFileError as ChatFileError,
        NotTextWarning as NotTextWarning,
    )
    from .checkpoint import (
        ModelLoadError as ModelLoadError,
    )
    from .constrain import (
        ConstraintError as ConstraintError,
        ResponseFormat as ResponseFormat,
        make_answer_constraint as make_answer_constraint,
        make_response_format as make_response_format,
        make_think_budget as make_think_budget,
    )
    from .convert import (
        convert as convert,
    )
    from .events import (
        AnswerDelta as AnswerDelta,
        Done as Done,
        Error as Error,
        Event as Event,
        EventParser as EventParser,
        ThinkingDelta as ThinkingDelta,
        ToolCall as ToolCall,
        ToolCallDelta as ToolCallDelta,
        ToolCallError as ToolCallError,
        TurnStats as TurnStats,
    )
    from .generate import (
        GenerationResponse as GenerationResponse,
        generate as generate,
        stream_generate as stream_generate,
    )
    from .loading import (
        load as load,
        load_model as load_model,
    )
    from .memory import (
        MemoryBudgetError as MemoryBudgetError,
        MemoryEstimate as MemoryEstimate,
        estimate_memory as estimate_memory,
    )
    from .model import (
        ModelInfo as ModelInfo,
    )
    from .sample import (
        Sampling as Sampling,
        make_logits_processors as make_logits_processors,
        make_sampler as make_sampler,
    )
    from .step import (
        generate_step as generate_step,
    )
    from .tokenizer import (
        Tokenizer as Tokenizer,
    )
    from .tools import (
        tool_schema as tool_schema,
    )
    from .turn import (
        TurnIds as TurnIds,
        TurnState as TurnState,
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    # Importing the submodules `generate` and `convert` binds them to the package's attributes of
    # the same name; keep those names for the functions, as `from smollm3_mlx import generate`
    # promises (the submodules stay importable as `from smollm3_mlx.generate import ...`).
    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _LAZY and _LAZY[name] == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
