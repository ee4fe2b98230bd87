"""What the commands share: each option declared once as an `Annotated` alias, and the settings
value a chat is opened from (`launch.open_chat`, the repl)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from . import console


def in_range(name: str, low: float, high: float | None = None, *, above: bool = False) -> Callable:
    """An option callback: a value outside [low, high] (or <= low when `above`) is one line."""
    if high is not None:
        wanted = (
            f"{'more than' if above else 'from'} {low} {'and at most' if above else 'to'} {high}"
        )
    else:
        wanted = f"{'more than' if above else 'at least'} {low}"

    def check(value: float | None) -> float | None:
        if value is None:
            return value
        bad = not math.isfinite(value) or value < low or (above and value == low)
        if bad or (high is not None and value > high):
            console.error(f"{name} must be {wanted}, not {value}")
            raise typer.Exit(2)
        return value

    return check


def _kv_bits(bits: int | None) -> int | None:
    if bits is not None and bits not in (4, 8):
        console.error(f"--kv-bits must be 4 or 8, not {bits}")
        raise typer.Exit(2)
    return bits


Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        metavar="FOLDER|REPO",
        help="Local model folder or hub repo id. Default: the converted model in the cache "
        "(SMOLLM3_MLX_HOME, else ~/.cache/smollm3-mlx), made on first use by downloading "
        "HuggingFaceTB/SmolLM3-3B and converting it to 4-bit.",
        show_default=False,
    ),
]
DType = Annotated[
    str,
    typer.Option(
        metavar="DTYPE",
        help="Compute dtype: auto (float32 on the CPU, stored dtype on the GPU), "
        "float32, bfloat16 or float16.",
    ),
]
MaxTokens = Annotated[
    int,
    typer.Option(
        metavar="N",
        help="The most tokens per answer, thinking included.",
        callback=in_range("--max-tokens", 1),
    ),
]
Temperature = Annotated[
    float | None,
    typer.Option(
        "--temp",
        metavar="T",
        help="Sampling temperature (default from generation_config.json; 0 is greedy).",
        callback=in_range("--temp", 0),
    ),
]
TopP = Annotated[
    float | None,
    typer.Option(
        metavar="P",
        help="Nucleus sampling mass (default from generation_config.json; 1 keeps all).",
        callback=in_range("--top-p", 0, 1, above=True),
    ),
]
Seed = Annotated[
    int | None,
    typer.Option(metavar="N", help="Random seed.", callback=in_range("--seed", 0, 2**64 - 1)),
]
Think = Annotated[
    bool,
    typer.Option(
        "--think/--no-think", help="Reasoning mode: think before answering (SmolLM3's /think)."
    ),
]
HideThinking = Annotated[
    bool,
    typer.Option(
        "--hide-thinking",
        help='Show one line ("thought for 812 tokens, 9.4 s") instead of the reasoning.',
    ),
]
KeepThinking = Annotated[
    bool,
    typer.Option(
        "--keep-thinking/--drop-thinking",
        help="Keep past reasoning in the history sent back to the model (the default), or drop "
        "it and keep only the answers (shorter prompts; the model no longer sees how it "
        "reasoned).",
    ),
]
System = Annotated[str | None, typer.Option(metavar="TEXT", help="A system message.")]
MaxContext = Annotated[
    int | None,
    typer.Option(
        metavar="N",
        help="The longest context in tokens. Default: the window the model was trained on "
        "(max_position_embeddings in its config.json). Past it, up to twice it (or the YaRN "
        "factor its config names), switches on YaRN. chat keeps going past it by dropping the "
        "oldest turns (never the system block); generate refuses a longer prompt.",
        show_default=False,
        callback=in_range("--max-context", 1),
    ),
]
KVBits = Annotated[
    int | None,
    typer.Option(
        metavar="BITS",
        help="Quantize the KV cache to 4 or 8 bits (less memory).",
        callback=_kv_bits,
    ),
]
KVGroupSize = Annotated[
    int, typer.Option(metavar="N", help="KV quantization group size: 32, 64 or 128.")
]
PromptLookup = Annotated[
    int,
    typer.Option(
        metavar="N",
        callback=in_range("--prompt-lookup", 0),
        help="Prompt-lookup decoding: draft up to N tokens from text already in the context and "
        "check them in one pass; the output is the same. It pays where a pass over a few tokens "
        "costs about one step (GPUs); on the CPU it does not (BENCHMARKS.md). 0: off.",
    ),
]
KVStart = Annotated[
    int,
    typer.Option(
        metavar="N",
        help="With --kv-bits: keep the KV cache dense until it holds this many tokens.",
        callback=in_range("--kv-start", 0),
    ),
]
ThinkBudget = Annotated[
    int | None,
    typer.Option(
        "--think-budget",
        metavar="N",
        callback=in_range("--think-budget", 0),
        help="Close the reasoning after N tokens (with a short hand-off sentence and </think>, "
        "as the model closes it) and answer.",
    ),
]
MemoryCheck = Annotated[
    bool,
    typer.Option(
        "--memory-check/--no-memory-check",
        help="Before loading, refuse a session that would need more memory than the machine "
        "offers (smollm3-mlx estimate shows the numbers).",
    ),
]


@dataclass(frozen=True)
class ChatSettings:
    """The options a chat is opened with, one value from the command down to the Chat."""

    model: str | None = None
    dtype: str = "auto"
    think: bool = True
    system: str | None = None
    keep_thinking: bool = True
    hide_thinking: bool = False
    max_tokens: int = 8192
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    max_context: int | None = None
    kv_bits: int | None = None
    kv_group_size: int = 64
    kv_start: int = 0
    prompt_lookup: int = 0
    think_budget: int | None = None
    memory_check: bool = True
    prompt_cache: Path | None = None
