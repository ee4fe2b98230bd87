"""Response formats and tool calls as one llguidance grammar for the answer.

A response format (JSON Schema, Pydantic class, OpenAI's spellings, regex, choice of strings)
and the offered tools with their tool choice become a single Lark grammar, special tokens
referenced by id. llguidance (Rust core, no Python dependencies) is imported only when a
grammar is built; BENCHMARKS.md ("Constrained decoding") says why it and not xgrammar.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .events import TOOL_CALL_END, TOOL_CALL_START

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

# Compact JSON as json.dumps writes it (and SmolLM3 its tool calls); no free whitespace, so that
# a model cannot pad a value forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ToolChoice = Literal["auto", "none", "required"] | str | dict


class ConstraintError(ValueError):
    """A response format, tool list or tool choice that cannot be enforced; raised before any
    token is generated."""


@dataclass(frozen=True, eq=False)
class ResponseFormat:
    """What an answer must be: a JSON value of `schema`, a full match of `pattern`, or one of
    `choices`. Made by `make_response_format`."""

    kind: Literal["json", "regex", "choice"]
    schema: dict[str, Any] | None = None
    pattern: str | None = None
    choices: tuple[str, ...] = ()
    model: Any = None  # a Pydantic model class: `parse` returns an instance

    def lark(self, llg: Any) -> str:
        """The value as a Lark expression for llguidance."""
        if self.kind == "json":
            guidance = {**JSON_OPTIONS, **(self.schema or {}).get("x-guidance", {})}
            return "%json " + json.dumps({**(self.schema or {}), "x-guidance": guidance})
        if self.kind == "regex":
            return "/" + llg.regex_to_lark(self.pattern) + "/"
        return " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choices)

    def parse(self, text: str) -> Any:
        """The value of a complete answer: JSON decoded (a model instance for a Pydantic
        class), the text itself for a regex or a choice (the grammar has matched it; Python's
        `re` speaks another regex dialect than llguidance's, so it does not judge).

        Raises:
            ValueError: not JSON, or not one of the choices (an answer cut short), or a Pydantic
                model's own validation refused it.
        """
        if self.kind == "regex":
            return text
        if self.kind == "choice":
            if text not in self.choices:
                raise ValueError(f"not one of the choices: {text!r}")
            return text
        if self.model is not None:
            return self.model.model_validate_json(text)
        return json.loads(text)


def make_response_format(spec: Any) -> ResponseFormat | None:
    """A ResponseFormat from what an app passes; None for no constraint (None, {"type": "text"}).

    Accepted: a JSON Schema dict; a Pydantic model class (read through `model_json_schema()`);
    OpenAI's {"type": "json_schema", "json_schema": {"schema": ...}} and {"type": "json_object"};
    {"type": "regex", "pattern": ...} or a compiled `re.Pattern`; {"type": "choice", "choices":
    [...]} or a list of strings.

    Raises:
        ConstraintError: anything else (the schema itself is checked when the constraint is made).
    """
    if spec is None or isinstance(spec, ResponseFormat):
        return spec
    if isinstance(spec, type) and hasattr(spec, "model_json_schema"):
        # Fields a model does not declare are dropped when it parses: never generate them.
        return ResponseFormat("json", schema=_closed(spec.model_json_schema()), model=spec)
    if isinstance(spec, re.Pattern):
        return ResponseFormat("regex", pattern=spec.pattern)
    if isinstance(spec, (list, tuple)):
        spec = {"type": "choice", "choices": list(spec)}
    if not isinstance(spec, dict):
        raise ConstraintError(f"a response format is a JSON schema dict, not {type(spec).__name__}")
    kind = spec.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json", schema={"type": "object"})
    if kind == "json_schema":
        schema = (spec.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ConstraintError('a "json_schema" response format needs json_schema.schema')
        return ResponseFormat("json", schema=schema)
    if kind == "regex":
        if not isinstance(spec.get("pattern"), str):
            raise ConstraintError('a "regex" response format needs a "pattern" string')
        return ResponseFormat("regex", pattern=spec["pattern"])
    if kind == "choice":
        choices = spec.get("choices")
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise ConstraintError("a choice needs a list of non-empty strings")
        return ResponseFormat("choice", choices=tuple(choices))
    return ResponseFormat("json", schema=spec)


def _closed(schema: Any) -> Any:
    """A copy where every object schema that does not say allows no undeclared properties."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _function(tool: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, parameters schema) of a tool in our form or OpenAI's {"type": "function", ...}."""
    f = tool.get("function", tool) if tool.get("type") == "function" else tool
    name, params = f.get("name"), f.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(name, str) or not isinstance(params, dict):
        raise ConstraintError(f"a tool needs a name and a parameters schema: {tool!r}")
    if params.get("type") == "object" and "additionalProperties" not in params:
        # Arguments past the signature cannot be passed to the function: leave them out.
        params = {**params, "additionalProperties": False}
    return name, params


def tool_call_schema(tools: Sequence[dict[str, Any]], only: str | None = None) -> dict[str, Any]:
    """The JSON schema of a call: {"name": <an offered tool>, "arguments": <its parameters>}."""
    options = []
    for name, params in map(_function, tools):
        if only is None or name == only:
            options.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": name}, "arguments": params},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
            )
    if not options:
        raise ConstraintError(f"tool_choice names {only!r}, which is not an offered tool")
    return options[0] if len(options) == 1 else {"anyOf": options}


def tool_choice_mode(tool_choice: ToolChoice) -> tuple[str, str | None]:
    """("auto" | "none" | "required" | "named", the named function); ConstraintError when
    `tool_choice` is none of those forms."""
    if isinstance(tool_choice, dict):  # OpenAI: {"type": "function", "function": {"name": ...}}
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise ConstraintError(f"tool_choice {tool_choice!r} names no function")
        return "named", name
    if tool_choice in ("auto", "none", "required"):
        return tool_choice, None
    if isinstance(tool_choice, str):
        return "named", tool_choice
    raise ConstraintError(f"tool_choice must be auto, none, required or a name: {tool_choice!r}")


def make_answer_grammar(
    tokenizer: Tokenizer,
    response_format: ResponseFormat | None = None,
    tools: Sequence[dict[str, Any]] | None = None,
    tool_choice: ToolChoice = "auto",
) -> str | None:
    """The whole answer as one llguidance Lark grammar, or None if nothing constrains it.

    Special tokens appear by id (`<[128015]>`), so that `<tool_call>` written as text is not a
    call. "auto": the value, or tool calls (free text around calls when there is no value);
    "none": no `<tool_call>`; "required" / a name: one or more calls, and nothing else.
    """
    llg = engine()
    mode, name = tool_choice_mode(tool_choice)
    value = response_format.lark(llg) if response_format else None
    call_ids = (tokenizer.token_to_id(TOOL_CALL_START), tokenizer.token_to_id(TOOL_CALL_END))
    if not tools or mode == "none":
        if mode in ("required", "named"):
            raise ConstraintError(f"tool_choice {tool_choice!r} needs tools")
        if value is not None:
            return f"start: {value}\n"
        if tools and None not in call_ids:
            return f"start: {_free(tokenizer, call_ids)}\n"
        return None
    if None in call_ids:
        raise ConstraintError("this tokenizer has no <tool_call> token")
    schema = tool_call_schema(tools, name)
    rules = (
        f'call: <[{call_ids[0]}]> "\\n" %json {json.dumps({**schema, "x-guidance": JSON_OPTIONS})}'
        f' "\\n" <[{call_ids[1]}]>\ncalls: call ("\\n" call)*\n'
    )
    if mode != "auto":
        return "start: calls\n" + rules
    if value is not None:
        return f"start: {value} | calls\n" + rules
    return f"start: free (call free)*\nfree: {_free(tokenizer, call_ids)}\n" + rules


def _free(tokenizer: Tokenizer, banned: Sequence[int | None]) -> str:
    """Any answer text: every token but `banned`, the think tags and end of turn."""
    ids = {*banned, *tokenizer.eos_token_ids, tokenizer.think_start_id, tokenizer.think_end_id}
    return "<[^" + ",".join(str(i) for i in sorted(i for i in ids if i is not None)) + "]>*"


_ENGINE: dict[str, Any] = {}
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def engine() -> Any:
    """The llguidance module (imported on first use)."""
    if "llg" not in _ENGINE:
        try:
            import llguidance
        except ImportError:  # pragma: no cover - a runtime dependency
            raise ConstraintError(
                "constrained output needs llguidance: pip install llguidance"
            ) from None
        _ENGINE["llg"] = llguidance
    return _ENGINE["llg"]


def ll_tokenizer(tokenizer: Tokenizer) -> Any:
    """llguidance's view of the tokenizer (from tokenizer.json; ~1 s, made once per tokenizer)."""
    with _LOCK:
        if tokenizer not in _TOKENIZERS:
            _TOKENIZERS[tokenizer] = engine().LLTokenizer(
                tokenizer.backend.to_str(), eos_token=sorted(tokenizer.eos_token_ids)
            )
        return _TOKENIZERS[tokenizer]


def one_line(message: str) -> str:
    """llguidance's message on one line: its first line, without its place in our grammar (the
    user never wrote that), plus a regex error's own `error:` line."""
    lines = message.strip().splitlines()
    first = re.sub(r"^at \d+\(\d+\): ", "", lines[0])
    detail = next((line for line in lines[1:] if line.startswith("error: ")), None)
    return f"{first} {detail[len('error: ') :]}" if detail else first
