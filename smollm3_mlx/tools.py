"""Tools for the model: JSON schemas from Python functions, and running the calls it makes."""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal, Union

Tool = Callable[..., Any] | dict[str, Any]


def tool_schemas(
    tools: Sequence[Tool] | None,
) -> tuple[list[dict[str, Any]], dict[str, Callable[..., Any]]]:
    """The schemas of `tools` (functions or JSON schemas), and the functions by name.

    Raises:
        TypeError: `tools` is not a list (one function, a name, a schema given alone).
        ValueError: a tool neither a function nor a JSON schema with a name, or a function
            that cannot be described (see `tool_schema`).
    """
    if tools is not None and (
        isinstance(tools, (str, bytes, dict)) or callable(tools) or not hasattr(tools, "__iter__")
    ):  # one tool, or its name, given where a list of tools belongs
        name = tools if isinstance(tools, str) else getattr(tools, "__name__", None)
        hint = f"[{name}]" if isinstance(name, str) and name.isidentifier() else "[...]"
        raise TypeError(
            f"tools must be a list of functions or JSON schemas, not {type(tools).__name__} "
            f"({tools!r:.40}); pass tools={hint}"
        )
    schemas, functions = [], {}
    for tool in tools or ():
        if callable(tool):
            schema = tool_schema(tool)
            functions[schema["name"]] = tool
        elif isinstance(tool, dict) and isinstance(tool.get("name"), str):
            schema = tool
        else:
            raise ValueError(f"a tool must be a function or a JSON schema with a name: {tool!r}")
        schemas.append(schema)
    return schemas, functions


def run_tool(function: Callable[..., Any] | None, name: str, arguments: dict[str, Any]) -> str:
    """Call a tool: its result, or its error, as text for the model."""
    if function is None:
        return f"Error: there is no tool named {name!r}"
    try:
        return as_text(function(**arguments))
    except Exception as e:  # the model reads the error and may try again
        return f"Error: {type(e).__name__}: {e}"


def as_text(result: object) -> str:
    """A tool result as the model reads it: strings as they are, anything else as JSON."""
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)


_JSON_TYPES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    tuple: "array",
    dict: "object",
    type(None): "null",
}


def _json_type(hint: Any) -> dict[str, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        options = [_json_type(a) for a in args if a is not type(None)]
        return options[0] if len(options) == 1 else {"anyOf": options}
    if origin is Literal:
        return {"type": _JSON_TYPES.get(type(args[0]), "string"), "enum": list(args)}
    if origin in (list, tuple, Sequence) and args:
        return {"type": "array", "items": _json_type(args[0])}
    if hint in _JSON_TYPES or origin in _JSON_TYPES:
        return {"type": _JSON_TYPES[origin or hint]}
    raise ValueError(f"no JSON type for {hint!r}")


def tool_schema(function: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema of a Python function, from its type hints and Google-style docstring.

    Raises:
        ValueError: a parameter without a type hint, of a type JSON has no name for, or *args.
    """
    name = function.__name__
    doc = inspect.getdoc(function) or ""
    summary = " ".join(doc.split("\n\n")[0].split()) if doc else ""
    args_doc = re.search(r"^Args:\n((?:[ \t]+.*\n?|\n)*)", doc, re.MULTILINE)
    described = dict(
        re.findall(
            r"^[ \t]+(\w+)(?: \([^)]*\))?:[ \t]*(.*)$", args_doc[1] if args_doc else "", re.M
        )
    )
    hints = typing.get_type_hints(function)
    properties, required = {}, []
    for p in inspect.signature(function).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ValueError(f"tool {name}: *{p.name} cannot be described to the model")
        if p.name not in hints:
            raise ValueError(f"tool {name}: parameter {p.name} has no type hint")
        try:
            properties[p.name] = _json_type(hints[p.name])
        except ValueError as e:
            raise ValueError(f"tool {name}: parameter {p.name}: {e}") from None
        if p.name in described:
            properties[p.name]["description"] = described[p.name]
        if p.default is p.empty:
            required.append(p.name)
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return {"name": name, "description": summary, "parameters": parameters}
