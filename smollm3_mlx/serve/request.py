"""OpenAI requests checked and mapped to ours: prompt ids, sampling, thinking mode, tools.

Imports no MLX and no HTTP stack (server.py does the transport, engine.py the generation). Checks
are strict: wrong types, unknown roles and unsupported options are errors, never silently
ignored; what the model sees is rendered by the model's own chat template.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..files import parse_json
from ..grammar import ConstraintError, tool_choice_mode

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 4
THINKING_OFF_EFFORTS = ("none", "minimal")  # reasoning_effort values that turn thinking off
# The rest of what the openai SDK's ReasoningEffort allows: thinking on (SmolLM3 has no levels).
THINKING_ON_EFFORTS = ("low", "medium", "high", "xhigh", "max")


class RequestError(ValueError):
    """A request we refuse: an OpenAI-style 4xx with a message, the parameter and a code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, "invalid_request_error", self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Strict(BaseModel):
    # Strict: "0.5" is not a number and 1.0 is not an integer. Unknown keys are ignored, as
    # clients send many (user, metadata, store, ...) that change nothing here.
    model_config = ConfigDict(strict=True, extra="ignore")


class _Function(_Strict):
    name: str
    arguments: str


class _ToolCallIn(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: _Function


class _Part(_Strict):
    type: str
    text: str | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_Part] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[_ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class _FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class _Tool(_Strict):
    type: Literal["function"]
    function: _FunctionDef


class _StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: _StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[_Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_token_budget: int | None = Field(default=None, ge=0)  # vLLM's name for it
    answer_reserve: int | None = Field(default=None, ge=0)  # constrain.DEFAULT_ANSWER_RESERVE
    # Read only to refuse them (`unsupported`): they would change the answer, and are not done.
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


def parse(kind: type[_Sampling], data: Any) -> Any:
    """A checked request, or RequestError naming the first problem and where it is."""
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        raise RequestError(f"{where}: {first['msg']}" if where else first["msg"], where) from None


@dataclass(frozen=True)
class Settings:
    """What a request asks of generation, in our terms."""

    max_tokens: int | None  # None: as many as the context allows
    sampling: dict[str, Any]  # temperature, top_p, top_k, min_p, repetition_penalty: given only
    seed: int | None
    stop: tuple[str, ...]
    top_logprobs: int | None  # None: no logprobs


def settings(request: ChatRequest | CompletionRequest, served: Sequence[str]) -> Settings:
    """Check what every request kind shares, and map it to our settings."""
    if request.model not in served:
        raise RequestError(
            f"the model {request.model!r} does not exist; this server serves {served[0]!r}",
            "model",
            "model_not_found",
        )
    if request.n != 1:
        raise RequestError("n must be 1: this server generates one choice per request", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise RequestError(f"{name} is not supported; use repetition_penalty", name)
    if request.logit_bias:
        raise RequestError("logit_bias is not supported", "logit_bias")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or ())
    if len(stop) > MAX_STOP_STRINGS or not all(stop):
        raise RequestError(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings", "stop")
    if request.stream_options is not None and not request.stream:
        raise RequestError("stream_options needs stream: true", "stream_options")
    sampling = {
        k: getattr(request, k)
        for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        if getattr(request, k) is not None
    }
    if sampling.get("top_k") == -1:  # vLLM's spelling of "off"
        sampling["top_k"] = 0
    if isinstance(request, ChatRequest):
        max_tokens = request.max_completion_tokens or request.max_tokens
        if request.top_logprobs is not None and not request.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        top = (request.top_logprobs or 0) if request.logprobs else None
    else:
        max_tokens, top = request.max_tokens, request.logprobs
    return Settings(max_tokens, sampling, request.seed, tuple(stop), top)


def check_context(prompt_tokens: int, max_tokens: int | None, context: int) -> None:
    """400 with the numbers when the prompt, or the prompt and the asked-for answer, don't fit."""
    if prompt_tokens >= context:
        raise RequestError(
            f"This model's maximum context length is {context} tokens. However, your prompt is "
            f"{prompt_tokens} tokens, leaving no room for an answer. Please shorten it.",
            "messages",
            "context_length_exceeded",
        )
    if max_tokens is not None and prompt_tokens + max_tokens > context:
        raise RequestError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} "
            f"for the completion). Please reduce the prompt or max_tokens.",
            "max_tokens",
            "context_length_exceeded",
        )


def thinking(request: ChatRequest) -> bool:
    """The reasoning mode asked for (the template's default is on; /think in a system message
    still wins, as the template says)."""
    kwargs = request.chat_template_kwargs or {}
    unknown = set(kwargs) - {"enable_thinking"}
    if unknown:
        raise RequestError(
            f"chat_template_kwargs: only enable_thinking is supported, not {sorted(unknown)}",
            "chat_template_kwargs",
        )
    enable = kwargs.get("enable_thinking", True)
    if not isinstance(enable, bool):
        raise RequestError("chat_template_kwargs.enable_thinking must be true or false")
    effort = request.reasoning_effort
    if effort is not None:
        if effort not in (*THINKING_OFF_EFFORTS, *THINKING_ON_EFFORTS):
            efforts = ", ".join((*THINKING_OFF_EFFORTS, *THINKING_ON_EFFORTS))
            raise RequestError(f"reasoning_effort must be one of {efforts}", "reasoning_effort")
        enable = enable and effort not in THINKING_OFF_EFFORTS
    return enable


def unsupported(request: ChatRequest) -> None:
    """Refuse, in one line, what a client may send that this server does not do (never drop it
    silently): the legacy functions, audio, modalities other than text, predicted outputs, and
    speaker names (SmolLM3's template has none; a tool message's name is its call's, kept)."""
    if request.functions is not None or request.function_call is not None:
        param = "functions" if request.functions is not None else "function_call"
        raise RequestError(
            "functions and function_call are the deprecated form of tools and tool_choice: "
            "send those",
            param,
        )
    if request.audio is not None or (request.modalities or ["text"]) != ["text"]:
        param = "audio" if request.audio is not None else "modalities"
        raise RequestError("this model writes text only: no audio output", param)
    if request.prediction is not None:
        raise RequestError("predicted outputs (prediction) are not supported", "prediction")
    for i, m in enumerate(request.messages):
        if m.name is not None and m.role != "tool":
            raise RequestError(
                "a message's name is not supported: SmolLM3's chat template has no speaker names",
                f"messages.{i}.name",
            )


def tools(request: ChatRequest) -> list[dict[str, Any]] | None:
    """The function schemas to offer the model through the template, or None."""
    choice = request.tool_choice
    if choice == "none" or not request.tools:
        return None  # the model is not told of tools it may not call
    return [t.function.model_dump(exclude_none=True) for t in request.tools]


def constraint(request: ChatRequest) -> dict[str, Any]:
    """What constrained decoding must hold, as `constrain.make_turn_processors` takes it (its
    `room` aside): the answer's format, the tools that may be called and how, the thinking
    budget and the answer's reserve."""
    fmt = request.response_format
    if fmt is not None and fmt.get("type", "text") == "text":
        fmt = None
    choice = "auto" if request.tool_choice is None else request.tool_choice
    try:
        tool_choice_mode(choice)
    except ConstraintError as e:
        raise RequestError(str(e), e.param) from None
    wanted = {
        "response_format": fmt,
        "tools": tools(request),
        "tool_choice": choice,
        "parallel_tool_calls": request.parallel_tool_calls is not False,
        "think_budget": request.thinking_token_budget,
    }
    if request.answer_reserve is not None:
        wanted["answer_reserve"] = request.answer_reserve
    return wanted


def template_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """OpenAI messages as the template's: leading system messages joined, assistant turns kept
    as structure (reasoning, answer, tool calls: the template writes their tags as the model
    does, every text in them plain; `tokenizer.assistant_text`)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        text = _text(m, i)
        if m.role in ("system", "developer"):
            if any(o["role"] != "system" for o in out):
                raise RequestError(
                    "a system message must come before the conversation: SmolLM3's template "
                    "has one system block",
                    f"messages.{i}.role",
                )
            if out:
                out[0]["content"] += "\n\n" + text
            else:
                out.append({"role": "system", "content": text})
        elif m.role == "assistant":
            out.append(_assistant(m, text, i))
        elif m.role == "tool":
            if m.tool_call_id is None:
                raise RequestError(
                    "a tool message needs the tool_call_id it answers",
                    f"messages.{i}.tool_call_id",
                )
            out.append({"role": "tool", "content": text})
        else:
            out.append({"role": "user", "content": text})
    if out[-1]["role"] == "assistant":
        raise RequestError(
            "the last message is the assistant's: continuing an answer is not supported",
            f"messages.{len(out) - 1}.role",
        )
    return out


def _text(m: Message, i: int) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    pieces = []
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise RequestError(
                f"only text content is supported, not {part.type!r}",
                f"messages.{i}.content.{j}",
            )
        pieces.append(part.text)
    return "".join(pieces)


def _assistant(m: Message, text: str, i: int) -> dict[str, Any]:
    """An assistant turn as structure, spaced as SmolLM3 writes it (a newline each side of
    the reasoning, one after `</think>`)."""
    reasoning = m.reasoning_content or m.reasoning
    message: dict[str, Any] = {"role": "assistant", "content": ("\n" if reasoning else "") + text}
    if reasoning:
        message["reasoning_content"] = f"\n{reasoning.strip()}\n"
    calls = []
    for j, call in enumerate(m.tool_calls or ()):
        param = f"messages.{i}.tool_calls.{j}.function.arguments"
        try:
            arguments = parse_json(call.function.arguments or "{}")
        except ValueError as e:  # not JSON, or nested deeper than a reader of it could go
            raise RequestError(f"tool call arguments are not JSON: {e}", param) from None
        if not isinstance(arguments, dict):
            raise RequestError("tool call arguments are not a JSON object", param)
        calls.append({"name": call.function.name, "arguments": arguments})
    return message | ({"tool_calls": calls} if calls else {})


def completion_prompt(request: CompletionRequest, tokenizer: Tokenizer) -> list[int]:
    """The ids of a /v1/completions prompt: text as is (control tokens allowed), or ids."""
    if request.echo or request.suffix or (request.best_of or 1) != 1:
        raise RequestError("echo, suffix and best_of are not supported", "echo")
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise RequestError("one prompt per request (a list of prompts is n > 1)", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, allow_special=True)
    else:
        ids = list(prompt)
        if any(not 0 <= t < tokenizer.vocab_size for t in ids):
            raise RequestError(f"prompt ids must be in [0, {tokenizer.vocab_size})", "prompt")
    if not ids:
        raise RequestError("the prompt is empty", "prompt")
    return ids


def now() -> int:
    return int(time.time())
