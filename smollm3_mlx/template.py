"""Chat templates compiled in a sandbox, with the control tokens the template writes made variables.

The template's literals ("<|im_start|>system\\n", raw text between tags) are rewritten at compile
time so that each control token in them is read from a variable. Rendering once with the real
strings gives the text transformers renders; rendering again with a private character in each of
those variables shows exactly where the template itself wrote a control token, whatever it did
to the input strings (strip, replace, split, join). See `Tokenizer.apply_chat_template`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.exceptions import TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

# Names no template uses: the variable standing for the i-th control token of the template
_CONTROL_VAR = "__smollm3_control_{}"
# transformers' marker for continue_final_message, appended to the final message and cut off
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}`: render the body, as transformers does untracked."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers replaces Jinja's tojson, which escapes HTML characters, with plain json.dumps
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def plain(obj: Any) -> Any:
    """Copy template inputs as plain JSON-like data (str subclasses become str)."""
    if isinstance(obj, str):
        return str.__str__(obj)
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    if isinstance(obj, Mapping):
        return {plain(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [plain(v) for v in obj]
        return tuple(items) if isinstance(obj, tuple) else items
    # Like transformers: arbitrary objects may carry methods the sandbox doesn't know are unsafe
    return f"<{type(obj).__name__}>"


class _ControlsAsVariables(NodeTransformer):
    """Rewrites every literal holding a control token into a concatenation reading a variable."""

    def __init__(self, control_re: re.Pattern[str]):
        self.control_re = control_re
        self.controls: list[str] = []

    def _split(self, text: str, literal: type[nodes.Expr], lineno: int) -> list[nodes.Expr]:
        parts: list[nodes.Expr] = []
        pos = 0
        for m in self.control_re.finditer(text):
            if m.start() > pos:
                parts.append(literal(text[pos : m.start()], lineno=lineno))
            if m[0] not in self.controls:
                self.controls.append(m[0])
            name = _CONTROL_VAR.format(self.controls.index(m[0]))
            parts.append(nodes.Name(name, "load", lineno=lineno))
            pos = m.end()
        if pos < len(text):
            parts.append(literal(text[pos:], lineno=lineno))
        return parts

    def visit_Const(self, node: nodes.Const) -> nodes.Node:
        if not isinstance(node.value, str) or not self.control_re.search(node.value):
            return node
        return nodes.Concat(self._split(node.value, nodes.Const, node.lineno), lineno=node.lineno)

    def visit_TemplateData(self, node: nodes.TemplateData) -> nodes.Node | list[nodes.Expr]:
        # Raw text between tags sits in an Output's list of nodes: the parts take its place
        if not self.control_re.search(node.data):
            return node
        return self._split(node.data, nodes.TemplateData, node.lineno)


@dataclass(frozen=True)
class CompiledTemplate:
    """A chat template compiled with its control tokens as variables.

    Attributes:
        source: The Jinja source.
        controls: The control tokens written in the template's literals, in variable order.
        variables: The template's undeclared variables (what a caller may set).
    """

    source: str
    controls: tuple[str, ...]
    variables: frozenset[str]
    _template: jinja2.Template

    def render(self, variables: Mapping[str, Any], controls: Mapping[str, str] = {}) -> str:
        """Render; `controls` maps a control token to the text written for it (default itself)."""
        names = {_CONTROL_VAR.format(i): controls.get(c, c) for i, c in enumerate(self.controls)}
        return self._template.render({**variables, **names})


def compile_template(source: str, control_re: re.Pattern[str]) -> CompiledTemplate:
    """Compile `source` sandboxed, as transformers does, with control tokens made variables.
    Its `strftime_now(format)` is a render variable (one clock for both renderings of a chat).

    Args:
        source: The Jinja source.
        control_re: Matches the control tokens (leftmost-longest, as the tokenizer splits them).
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    tree = env.parse(source)
    variables = frozenset(meta.find_undeclared_variables(tree))
    rewrite = _ControlsAsVariables(control_re)
    tree = rewrite.visit(tree)
    return CompiledTemplate(source, tuple(rewrite.controls), variables, env.from_string(tree))


def free_characters(haystack: str, n: int) -> list[str]:
    """`n` printable characters absent from `haystack` (printable: they survive `repr`)."""
    free = (c for c in map(chr, range(0x20000, 0x2A6E0)) if c not in haystack)
    chars = [c for _, c in zip(range(n), free, strict=False)]
    if len(chars) < n:
        raise ValueError("no free marker characters for the chat inputs")
    return chars


def cut_at_continue_tag(rendered: str, final: str | None = None) -> str:
    """Cut the rendering where the final message ends, as transformers' continue_final_message.

    Args:
        rendered: Rendered with CONTINUE_TAG appended to the final message.
        final: The final message as given: checked to appear in the rendering.
    """
    tag = CONTINUE_TAG.strip()
    if tag not in rendered or (final is not None and final.strip() not in rendered):
        raise ValueError(
            "continue_final_message: the final message does not appear in the rendered chat "
            "(the chat template deletes part of it)"
        )
    at = rendered.rindex(tag)
    # The template may trim spacing after the message: then the message ends trimmed too
    return rendered[:at] if rendered.startswith(CONTINUE_TAG, at) else rendered[:at].rstrip()
