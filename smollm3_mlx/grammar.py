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

from .turn import TOOL_CALL_END, TOOL_CALL_START

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

# Compact JSON as json.dumps writes it (and SmolLM3 its tool calls); no free whitespace, so that
# a model cannot pad a value forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ToolChoice = Literal["auto", "none", "required"] | str | dict
# The bounds a schema that gives none gets (README, "What a schema means here"): no value runs on
# to the token limit, whatever the model writes.
DEFAULT_MAX_STRING = 256  # characters
DEFAULT_MAX_DIGITS = 15  # before the point (JavaScript's exact integers reach 9e15)
DEFAULT_FRACTION_DIGITS = 6  # after it
# json_object: any JSON object, its values bounded as `held_schema` bounds them.
_ANY = {
    "anyOf": [
        {"type": ["string", "number", "boolean", "null"]},
        {"type": "array", "items": {"$ref": "#/$defs/any"}},
        {
            "type": "object",  # keys bounded as strings are (llguidance has no propertyNames)
            "patternProperties": {f"^.{{0,{DEFAULT_MAX_STRING}}}$": {"$ref": "#/$defs/any"}},
            "additionalProperties": False,
        },
    ]
}
ANY_OBJECT = {
    "type": "object",
    "additionalProperties": {"$ref": "#/$defs/any"},
    "$defs": {"any": _ANY},
}


class ConstraintError(ValueError):
    """A response format, tool list or tool choice that cannot be enforced; raised before any
    token is generated. `param` names the part at fault: "response_format", "tools" or
    "tool_choice" (None: not known)."""

    def __init__(self, message: str, param: str | None = "response_format"):
        super().__init__(message)
        self.param = param


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
            schema = held_schema(self.schema or {})
            guidance = {**JSON_OPTIONS, **schema.get("x-guidance", {})}
            return "%json " + json.dumps({**schema, "x-guidance": guidance})
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
    [...]} or a list of strings. A JSON schema is held by `held_schema`'s rules.

    Raises:
        ConstraintError: anything else (the schema itself is checked when the constraint is made).
    """
    if spec is None or isinstance(spec, ResponseFormat):
        return spec
    if isinstance(spec, type) and hasattr(spec, "model_json_schema"):
        return ResponseFormat("json", schema=spec.model_json_schema(), model=spec)
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
        return ResponseFormat("json", schema=ANY_OBJECT)
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


# Keywords whose values are schemas: a map of them, one, or a list of them (JSON Schema 2020-12
# and draft 7); `const`, `enum`, `default` and `examples` hold values, never schemas.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONE = (
    "additionalProperties",
    "additionalItems",
    "unevaluatedProperties",
    "unevaluatedItems",
    "items",
    "contains",
    "not",
    "if",
    "then",
    "else",
    "propertyNames",
)
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")


def held_schema(schema: Any, *, root: str = "") -> Any:
    """`schema` as the grammar holds it: closed objects and bounded values (README, "What a
    schema means here"); with `root`, its local `$ref`s rewritten to where it is placed.

    - An object schema that does not say `additionalProperties` allows no other keys (as
      xgrammar's strict mode and llama.cpp's converter read it); one that says is honoured.
    - A string without `maxLength` takes DEFAULT_MAX_STRING characters at most.
    - An integer without bounds stays within DEFAULT_MAX_DIGITS digits; a number too, with at
      most DEFAULT_FRACTION_DIGITS after the point (as `multipleOf`, unless it gives one).
    - `root` ("/$defs/tool0"): the schema is placed there in a larger one, so that a
      reference ("#/$defs/A", "#") still points where it did.

    The caller's schema is not changed; the answer is checked against it, not against this.
    """
    if isinstance(schema, list):
        return [held_schema(s, root=root) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {k: held_schema(v, root=root) for k, v in value.items()}
        elif key in _SCHEMA_ONE + _SCHEMA_LISTS:
            out[key] = held_schema(value, root=root)
        elif key == "$ref" and root and isinstance(value, str) and value.startswith("#"):
            out[key] = "#" + root + value[1:]
    if schema.get("propertyNames") in ({}, True, {"type": "string"}):  # what every key is
        del out["propertyNames"]  # (Zod's records say it; llguidance has no propertyNames)
    if "enum" in out or "const" in out:
        return out
    types = out.get("type")
    types = set(types) if isinstance(types, list) else {types}
    if ("object" in types or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if "string" in types:
        out.setdefault("maxLength", DEFAULT_MAX_STRING)
    if types & {"integer", "number"}:
        top = 10**DEFAULT_MAX_DIGITS - 1
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -top
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = top
        if "number" in types and "multipleOf" not in out:
            out["multipleOf"] = 10.0**-DEFAULT_FRACTION_DIGITS
    return out


def _function(tool: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, parameters schema) of a tool in our form, OpenAI's {"type": "function",
    "function": {...}} or the Responses API's flat {"type": "function", "name": ...}."""
    f = tool.get("function", tool) if tool.get("type") == "function" else tool
    name, params = f.get("name"), f.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(name, str) or not isinstance(params, dict):
        raise ConstraintError(f"a tool needs a name and a parameters schema: {tool!r}", "tools")
    return name, params


def tool_call_schema(
    tools: Sequence[dict[str, Any]], only: Sequence[str] | None = None
) -> dict[str, Any]:
    """The JSON schema of a call: {"name": <an offered tool>, "arguments": <its parameters>},
    for the tools named in `only` (all when None). Each tool's parameters are held by
    `held_schema`'s rules and placed in `$defs`, where their own references still resolve."""
    options, defs = [], {}
    for i, (name, params) in enumerate(map(_function, tools)):
        if only is not None and name not in only:
            continue
        defs[f"tool{i}"] = held_schema(params, root=f"/$defs/tool{i}")
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": {"$ref": f"#/$defs/tool{i}"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    offered = {name for name, _ in map(_function, tools)}
    unknown = sorted(set(only or ()) - offered)
    if unknown or not options:
        raise ConstraintError(
            f"tool_choice names {', '.join(map(repr, unknown or only or ()))}, which is not an "
            "offered tool",
            "tool_choice",
        )
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "$defs": defs}


def tool_choice_mode(tool_choice: ToolChoice) -> tuple[str, tuple[str, ...] | None]:
    """("auto" | "none" | "required", the tools that may be called (None: every one)).

    Forms: "auto", "none", "required"; a tool's name or {"type": "function", "function":
    {"name": ...}} (required, that one); {"type": "allowed_tools", "allowed_tools": {"mode":
    "auto" | "required", "tools": [{"type": "function", "function": {"name": ...}}]}} (the
    Responses API's flat spellings too). ConstraintError (param "tool_choice") for anything else.
    """
    if tool_choice in ("auto", "none", "required"):
        return tool_choice, None  # type: ignore[return-value]
    if isinstance(tool_choice, str):
        return "required", (tool_choice,)
    if isinstance(tool_choice, dict):
        if tool_choice.get("type") == "allowed_tools":
            allowed = tool_choice.get("allowed_tools", tool_choice)
            mode, listed = allowed.get("mode"), allowed.get("tools")
            names = [_named(t) for t in listed] if isinstance(listed, list) else [None]
            if mode in ("auto", "required") and listed and None not in names:
                return mode, tuple(names)  # type: ignore[arg-type]
        elif (name := _named(tool_choice)) is not None:
            return "required", (name,)
    raise ConstraintError(
        "tool_choice must be auto, none, required, a function's name, "
        f'{{"type": "function", "function": {{"name": ...}}}} or allowed_tools: {tool_choice!r}',
        "tool_choice",
    )


def _named(choice: Any) -> str | None:
    """The function a {"type": "function", "function": {"name": ...}} (or flat
    {"type": "function", "name": ...}) names, else None."""
    if not isinstance(choice, dict) or choice.get("type") != "function":
        return None
    name = (choice.get("function") or choice).get("name")
    return name if isinstance(name, str) else None


def make_answer_grammar(
    tokenizer: Tokenizer,
    response_format: ResponseFormat | None = None,
    tools: Sequence[dict[str, Any]] | None = None,
    tool_choice: ToolChoice = "auto",
    *,
    parallel_tool_calls: bool = True,
) -> str | None:
    """The whole answer as one llguidance Lark grammar, or None if nothing constrains it.

    Special tokens appear by id (`<[128015]>`), so that `<tool_call>` written as text is not a
    call. "auto": the value, or tool calls (free text around calls when there is no value);
    "none", or no tools: no `<tool_call>` at all; "required" / a name: one or more calls, and
    nothing else. `parallel_tool_calls=False`: one call at most.
    """
    mode, names = tool_choice_mode(tool_choice)
    if response_format is None and (not tools or mode == "none"):
        if mode == "required":
            raise ConstraintError(f"tool_choice {tool_choice!r} needs tools", "tool_choice")
        return None  # nothing to hold (a call is kept out by constrain.CallBan): no llguidance
    value = response_format.lark(engine()) if response_format else None
    call_ids = (tokenizer.token_to_id(TOOL_CALL_START), tokenizer.token_to_id(TOOL_CALL_END))
    if not tools or mode == "none":
        if mode == "required":
            raise ConstraintError(f"tool_choice {tool_choice!r} needs tools", "tool_choice")
        if value is not None:
            return f"start: {value}\n"
        return None  # a call is kept out by `CallBan` (no grammar needed for that)
    if None in call_ids:
        raise ConstraintError("this tokenizer has no <tool_call> token", "tools")
    schema = tool_call_schema(tools, names)
    more = '("\\n" call)*' if parallel_tool_calls else ""
    rules = (
        f'call: <[{call_ids[0]}]> "\\n" %json {json.dumps({**schema, "x-guidance": JSON_OPTIONS})}'
        f' "\\n" <[{call_ids[1]}]>\ncalls: call {more}\n'
    )
    if mode == "required":
        return "start: calls\n" + rules
    if value is not None:
        return f"start: {value} | calls\n" + rules
    free = f"free: {_free(tokenizer, call_ids)}\n"
    if parallel_tool_calls:
        return "start: free (call free)*\n" + free + rules
    return "start: free (call free)?\n" + free + rules


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
