"""The chat session an app holds: history, think mode, prompt-cache reuse, turns as events.

Each turn renders the whole conversation with the official template (the mode applies to all of it)
and prefills only the tokens past the longest prefix the prompt cache already holds. Nothing here
prints: `send` yields ThinkingDelta / AnswerDelta / ToolCall events and a final Done.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from .cache import check_kv_quantization
from .generate import DEFAULT_MAX_TOKENS, generate_step
from .sample import make_logits_processors, make_sampler

FILE_FORMAT, FILE_VERSION = "smollm3-mlx-chat", 1
ROLES = ("system", "user", "assistant", "tool")
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class ChatFileError(ValueError):
    """A conversation file that cannot be loaded; one line naming the file and the problem."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = DEFAULT_MAX_TOKENS  # thinking alone can take thousands

    @classmethod
    def from_model(cls, model, **overrides: Any) -> Sampling:
        """The model folder's generation_config.json defaults, then the `overrides` not None."""
        g = getattr(model, "generation_config", None)
        base = cls() if g is None else cls(**asdict(g))  # the same names
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class ThinkingDelta:
    text: str


@dataclass(frozen=True)
class AnswerDelta:
    text: str


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class TurnStats:
    prompt_tokens: int  # the whole rendered conversation
    cached_tokens: int  # reused from the prompt cache
    prefill_tokens: int  # processed this turn: prompt_tokens - cached_tokens
    generation_tokens: int
    thinking_tokens: int  # between <think> and </think>
    thinking_seconds: float
    time_to_first_token: float
    prompt_tps: float
    generation_tps: float
    seconds: float
    peak_memory: float  # GB


@dataclass(frozen=True)
class Done:
    thinking: str
    answer: str
    finish_reason: str  # "stop" (end of turn), "length" (max_tokens) or "cancelled"
    stats: TurnStats


Event = ThinkingDelta | AnswerDelta | ToolCall | Done


def split_thinking(text: str) -> tuple[str, str]:
    """(thinking, answer) of an assistant message's text."""
    m = re.match(r"\s*<think>(.*?)(?:</think>|$)(.*)", text, re.DOTALL)
    return (m[1].strip(), m[2].lstrip()) if m else ("", text)


class ChatSession:
    """A conversation with a loaded model: messages, think mode, sampling and the prompt cache.

    Args:
        model, tokenizer: as returned by `load`.
        think: reasoning mode for the next turns (SmolLM3's /think vs /no_think).
        system: an optional system message.
        keep_thinking: keep past reasoning in the history (else only answers are kept).
        sampling: defaults from the model's generation_config.json.
        tools: JSON-schema tool definitions offered to the model.
        model_name: recorded in saved conversations.
        kv_bits, kv_group_size: quantize the KV cache to 4 or 8 bits.

    The cache rotates within the model's `max_context` (see `load`): past it, the oldest turns
    are dropped from the cache, never the system block, and the chat goes on in bounded memory.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        think: bool = True,
        system: str | None = None,
        keep_thinking: bool = True,
        sampling: Sampling | None = None,
        tools: list[dict] | None = None,
        model_name: str | None = None,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.think, self.keep_thinking, self.tools = think, keep_thinking, tools
        self.sampling = sampling or Sampling.from_model(model)
        self.model_name = model_name or str(getattr(model, "path", "") or "")
        self.messages: list[dict[str, Any]] = []
        self.last: TurnStats | None = None
        check_kv_quantization(model.args.head_dim, kv_bits, kv_group_size)
        self.kv = {"bits": kv_bits, "group_size": kv_group_size}
        self._cache: list | None = None  # made at the first turn, once the system block is known
        self._full: list[int] = []  # the ids the cache stands for (it lacks the dropped ones)
        self._cancel = threading.Event()
        self.system = system

    @property
    def system(self) -> str | None:
        m = self.messages[:1]
        return m[0]["content"] if m and m[0]["role"] == "system" else None

    @system.setter
    def system(self, text: str | None) -> None:
        if self.system is not None:
            del self.messages[0]
        if text:
            self.messages.insert(0, {"role": "system", "content": text})

    @property
    def cached_tokens(self) -> int:
        return min(c.offset for c in self._cache) if self._cache else 0

    def reset(self) -> None:
        """Forget the conversation, keeping the system message, mode and sampling."""
        self.messages = self.messages[:1] if self.system is not None else []

    def cancel(self) -> None:
        """Stop the turn being generated (thread- and signal-safe); its partial answer is kept."""
        self._cancel.set()

    def render(self, *, add_generation_prompt: bool = True) -> list[int]:
        return self.tokenizer.apply_chat_template(
            self.messages,
            tokenize=True,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=self.think,
            tools=self.tools,
            assistant_tags=True,
        )

    def send(self, text: str) -> Iterator[Event]:
        """Add a user message and stream the assistant's turn as events, ending with Done."""
        self._cancel.clear()
        self.messages.append({"role": "user", "content": text})
        try:
            prompt = self.render()
        except Exception:
            self.messages.pop()
            raise
        reused = self._reuse(prompt)
        s, tok = self.sampling, self.tokenizer
        detokenizer, splitter = tok.detokenizer(), tok.think_splitter(prompt)
        generated: list[int] = []
        finish, n_think, think_start, think_end = "length", 0, None, None
        mx.reset_peak_memory()
        start = first = time.perf_counter()
        steps = generate_step(
            mx.array(prompt[reused:], dtype=mx.uint32),
            self.model,
            max_tokens=s.max_tokens,
            sampler=make_sampler(s.temperature, s.top_p, s.top_k, s.min_p),
            logits_processors=make_logits_processors(s.repetition_penalty),
            prompt_cache=self._cache,
        )
        try:
            for token, _ in steps:
                if not generated:
                    first = time.perf_counter()
                generated.append(token)
                if token in tok.eos_token_ids:
                    finish = "stop"
                    break
                detokenizer.add_token(token)
                was_thinking = splitter.thinking
                parts = splitter.feed(token, detokenizer.last_segment)
                if was_thinking and splitter.thinking:  # inside the block, tags excluded
                    n_think += 1
                elif splitter.thinking or was_thinking:  # a tag
                    now = time.perf_counter()
                    think_start, think_end = (
                        (now, None) if splitter.thinking else (think_start, now)
                    )
                yield from _deltas(parts)
                if self._cancel.is_set():
                    finish = "cancelled"
                    break
        except GeneratorExit:  # the caller closed the stream: a cancel too
            self._record(generated, "cancelled")
            raise
        finally:
            steps.close()
            self._settle(prompt + generated)
        detokenizer.finalize()
        yield from _deltas(splitter.feed(-1, detokenizer.last_segment))

        thinking, answer = self._record(generated, finish)
        for m in _TOOL_CALL.finditer(answer):
            call = _parse_tool_call(m[1])
            if call is not None:
                yield call
        end, n = time.perf_counter(), len(generated)
        ttft = first - start
        self.last = TurnStats(
            prompt_tokens=len(prompt),
            cached_tokens=reused,
            prefill_tokens=len(prompt) - reused,
            generation_tokens=n,
            thinking_tokens=n_think,
            thinking_seconds=((think_end or end) - (think_start or first)) if n_think else 0.0,
            time_to_first_token=ttft,
            prompt_tps=(len(prompt) - reused) / ttft if ttft > 0 else 0.0,
            generation_tps=(n - 1) / (end - first) if n > 1 and end > first else 0.0,
            seconds=end - start,
            peak_memory=mx.get_peak_memory() / 1e9,
        )
        yield Done(thinking, answer, finish, self.last)

    def _record(self, generated: list[int], finish: str) -> tuple[str, str]:
        """Add the assistant message (marked if interrupted); returns (thinking, answer)."""
        body = self.tokenizer.decode(generated[:-1] if finish == "stop" else generated)
        thinking, answer = split_thinking(body)
        message = {"role": "assistant", "content": answer}
        if self.keep_thinking or not thinking:
            message["content"] = body
        if finish == "cancelled":
            message["interrupted"] = True
        self.messages.append(message)
        return thinking, answer

    def _reuse(self, prompt: list[int]) -> int:
        """Trim the cache to its common prefix with `prompt`; returns how many ids need no prefill.

        The cache holds full[:keep] + full[keep + dropped:]. A change past the dropped span trims
        back to it; a change inside it keeps only the system block.
        """
        if self._cache is None:
            window = getattr(self.model, "max_context", None)
            starts = [i for i, t in enumerate(prompt) if t == self.tokenizer.im_start_id]
            keep = starts[1] if len(starts) > 1 else 0  # the system block, up to the first turn
            keep = min(keep, window // 2) if window else keep
            self._cache = self.model.make_cache(window, keep, **self.kv)
        n = 0
        for a, b in zip(self._full, prompt[:-1], strict=False):  # leave one id to prefill
            if a != b:
                break
            n += 1
        keep, dropped = self._cache[0].keep, self._cache[0].dropped
        if dropped and n < keep + dropped:
            n, dropped = min(n, keep), 0
        for c in self._cache:
            c.trim(c.offset - (n - dropped))
            c.dropped = dropped
        self._full = prompt[:n]
        return n

    def _settle(self, ids: list[int]) -> None:
        """Record what the cache holds after a turn, however it ended (all layers alike)."""
        n = min(c.offset for c in self._cache)
        for c in self._cache:
            c.trim(c.offset - n)
        self._full = ids[: n + self._cache[0].dropped]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "model": self.model_name,
            "think": self.think,
            "keep_thinking": self.keep_thinking,
            "sampling": asdict(self.sampling),
            "tools": self.tools,
            "messages": self.messages,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return path

    def load(self, path: str | Path) -> dict[str, Any]:
        """Replace the conversation, mode and sampling with a saved one; on error nothing changes.

        Raises:
            ChatFileError: unreadable, not JSON, or not a conversation this program saved.
        """
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ChatFileError(f"{path}: cannot read a conversation ({e})") from None
        try:
            state = _validate(data)
        except ValueError as e:
            raise ChatFileError(f"{path}: not a smollm3-mlx conversation ({e})") from None
        self.messages, self.think, self.keep_thinking, self.sampling, self.tools = state
        return data


def _deltas(parts: list[tuple[str, str]]) -> Iterator[ThinkingDelta | AnswerDelta]:
    for kind, text in parts:
        yield ThinkingDelta(text) if kind == "thinking" else AnswerDelta(text)


def _parse_tool_call(raw: str) -> ToolCall | None:
    try:
        call = json.loads(raw)
        return ToolCall(str(call["name"]), dict(call.get("arguments") or {}))
    except (ValueError, KeyError, TypeError):
        return None  # left in the answer text as the model wrote it


def _validate(data: Any):
    """(messages, think, keep_thinking, sampling, tools) of a saved conversation, or ValueError."""

    def need(ok: bool, problem: str) -> None:
        if not ok:
            raise ValueError(problem)

    need(isinstance(data, dict) and data.get("format") == FILE_FORMAT, f"no {FILE_FORMAT!r}")
    need(data.get("version") == FILE_VERSION, f"version {data.get('version')!r}, not 1")
    messages, sampling, tools = data.get("messages"), data.get("sampling"), data.get("tools")
    need(isinstance(messages, list), "'messages' is not a list")
    for i, m in enumerate(messages):
        need(isinstance(m, dict) and m.get("role") in ROLES, f"message {i} has no known role")
        need(isinstance(m.get("content"), str), f"message {i} has no text content")
    for key in ("think", "keep_thinking"):
        need(isinstance(data.get(key), bool), f"{key!r} is not true or false")
    types = {f.name: f.type for f in fields(Sampling)}
    need(isinstance(sampling, dict) and set(sampling) <= set(types), "'sampling' is not known")
    for k, v in sampling.items():
        need(type(v) in (int, float), f"sampling {k!r} is not a number")
    need(tools is None or isinstance(tools, list), "'tools' is not a list")
    sampling = Sampling(
        **{k: (int if types[k] == "int" else float)(v) for k, v in sampling.items()}
    )
    return [dict(m) for m in messages], data["think"], data["keep_thinking"], sampling, tools
