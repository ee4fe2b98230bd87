"""Tokenizer, chat template rendering, streaming detokenizer and think-span splitting for SmolLM3.

Only `tokenizers` and `jinja2` are needed here: the runtime path must not import transformers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

THINK_START, THINK_END = "<think>", "</think>"
# Tags the model itself writes; `assistant_tags=True` keeps them as control ids in assistant turns.
ASSISTANT_TAGS = frozenset({THINK_START, THINK_END, "<tool_call>", "</tool_call>"})
_REPLACEMENT_CHAR = "\ufffd"
# A held-back tail this long is invalid bytes, not a split character (one is at most 4 bytes).
_MAX_HELD_TOKENS = 8


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


def _plain(obj: Any, on_str: Callable[[str], str]) -> Any:
    """Copy template inputs as plain JSON-like data, passing each string (keys too) to on_str."""
    if isinstance(obj, str):
        return on_str(str.__str__(obj))
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    if isinstance(obj, Mapping):
        return {_plain(k, on_str): _plain(v, on_str) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, on_str) for v in obj]
        return tuple(items) if isinstance(obj, tuple) else items
    # Like transformers: arbitrary objects may carry methods the sandbox doesn't know are unsafe
    return f"<{type(obj).__name__}>"


def _pick_mark(haystack: str) -> str:
    # Printable, so it survives the template's `tool | string` (repr); absent from the inputs
    mark = next((c for c in map(chr, range(0x20000, 0x2A6E0)) if c not in haystack), None)
    if mark is None:
        raise ValueError("no free marker character for the chat inputs")
    return mark


def _token_text(token: Any) -> str | None:
    # tokenizer_config.json spells tokens as strings or as AddedToken dicts
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    """SmolLM3's tokenizer: `tokenizers` for ids, a sandboxed Jinja environment for the template.

    Args:
        backend: The `tokenizers.Tokenizer` loaded from tokenizer.json.
        config: tokenizer_config.json as a dict.
        generation_config: generation_config.json as a dict (its `eos_token_id` adds stop ids).
        chat_template: Jinja source of the chat template, or None.
        now: Clock behind the template's `strftime_now`; pass a fixed one to freeze the date.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        config: dict | None = None,
        generation_config: dict | None = None,
        chat_template: str | None = None,
        now: Callable[[], datetime] = datetime.now,
    ):
        self.backend = backend
        self.config = config or {}
        self.chat_template = chat_template
        self.now = now
        added = backend.get_added_tokens_decoder()
        self._added = {tok.content: i for i, tok in added.items()}
        # Longest first: leftmost-longest matching, as tokenizers' added-token splitter does
        longest_first = sorted(self._added, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        # As in transformers, BOS comes from tokenizer_config (null: SmolLM3 never prepends it)
        self.bos_token_id = self.token_to_id(_token_text(self.config.get("bos_token")))
        eos = (generation_config or {}).get("eos_token_id")
        eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        eos_ids.add(self.token_to_id(_token_text(self.config.get("eos_token"))))
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids - {None})
        self.think_start_id = self.token_to_id(THINK_START)
        self.think_end_id = self.token_to_id(THINK_END)
        self.im_start_id = self.token_to_id("<|im_start|>")
        self.im_end_id = self.token_to_id("<|im_end|>")
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        self._special_vars = {n: _token_text(self.config[n]) for n in names if self.config.get(n)}
        self._template: tuple[str, jinja2.Template] | None = None  # (source, compiled)

    @classmethod
    def from_folder(
        cls, path: str | Path, *, now: Callable[[], datetime] = datetime.now
    ) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json, generation_config.json and the chat template.

        Args:
            path: A folder holding at least tokenizer.json.
            now: Clock behind the template's `strftime_now`.
        """
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer.json not found in {path}")

        def read_json(name: str) -> dict:
            file = path / name
            return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}

        config = read_json("tokenizer_config.json")
        template_file = path / "chat_template.jinja"
        template = config.get("chat_template")
        if template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        elif isinstance(template, list):  # older configs hold named templates
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(
            tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")),
            config=config,
            generation_config=read_json("generation_config.json"),
            chat_template=template,
            now=now,
        )

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Encode `text` without adding BOS/EOS.

        Args:
            text: The text to encode.
            allow_special: If True, added-token text like `<|im_end|>` or `<think>` becomes its
                control id; if False (the default) every added token, special or not, is plain text.
        """
        if allow_special or not self._added_re.search(text):
            return self.backend.encode(text, add_special_tokens=False).ids
        # tokenizers' `encode_special_tokens` skips only special=True tokens, so run normalizer,
        # pre-tokenizer and BPE ourselves: that pipeline never matches added tokens
        b = self.backend
        if b.normalizer is not None:
            text = b.normalizer.normalize_str(text)
        pieces = (
            [p for p, _ in b.pre_tokenizer.pre_tokenize_str(text)] if b.pre_tokenizer else [text]
        )
        return [t.id for piece in pieces for t in b.model.tokenize(piece)]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Decode ids to text; special tokens keep their text unless skip_special is set."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)

    def think_splitter(self, prompt: Iterable[int] = ()) -> ThinkSplitter:
        """A ThinkSplitter that starts in thinking mode if `prompt` ends inside `<think>`."""
        thinking = False
        for i in prompt:
            if i in (self.think_start_id, self.think_end_id):
                thinking = i == self.think_start_id
        return ThinkSplitter(self.think_start_id, self.think_end_id, thinking=thinking)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        enable_thinking: bool = True,
        tools: list[dict] | None = None,
        xml_tools: list[dict] | None = None,
        python_tools: list[dict] | None = None,
        assistant_tags: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render the chat template as transformers' `apply_chat_template` does.

        Message content is plain text for every role, assistant included: with tokenize=True,
        control tokens written in messages, tools or kwargs (`<|im_end|>`, `</think>`, ...) are
        encoded as text, and only the template's own scaffolding yields control ids. So past
        assistant turns holding `<think>...</think>` re-tokenize with the tags as text.

        The date comes from `self.now` (set it, or pass `now=` to `from_folder`, to freeze it).

        Args:
            messages: Chat messages, dicts with "role" and "content"; keys set to None are dropped.
            add_generation_prompt: Append the assistant header (plus an empty think block in
                /no_think mode).
            tokenize: Return token ids instead of the rendered string.
            enable_thinking: Reasoning mode, unless the system message says `/think` or `/no_think`.
            tools: JSON-schema tool definitions (SmolLM3 treats them as `xml_tools`).
            xml_tools: Tools called with `<tool_call>` JSON.
            python_tools: Tools called from `<code>` blocks.
            assistant_tags: With tokenize=True, let the tags the model writes itself (`<think>`,
                `</think>`, `<tool_call>`, `</tool_call>`) in assistant content through as control
                ids, so that a past answer re-tokenizes as it was generated (prompt-cache reuse).
            **kwargs: Further template variables.
        """
        template = self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template")
        # As transformers does: OpenAI-style `content=None` means the key is absent
        inputs = dict(
            messages=[{k: v for k, v in m.items() if v is not None} for m in messages],
            tools=tools,
            xml_tools=xml_tools,
            python_tools=python_tools,
            **kwargs,
        )
        flags = dict(add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
        if not tokenize:
            return self._render(template, {**_plain(inputs, str), **flags})
        # Break each control token in the inputs with a mark after its first char: the template
        # sees the same text (`"/think" in "</think>"` holds), but only scaffolding matches.
        mark = _pick_mark(repr(inputs) + template)

        def _mark(s: str, keep: frozenset[str] = frozenset()) -> str:
            return self._added_re.sub(
                lambda m: m[0] if m[0] in keep else m[0][0] + mark + m[0][1:], s
            )

        marked = _plain(inputs, _mark)
        if assistant_tags:
            for src, dst in zip(inputs["messages"], marked["messages"], strict=True):
                if src.get("role") == "assistant" and isinstance(src.get("content"), str):
                    dst["content"] = _mark(str.__str__(src["content"]), ASSISTANT_TAGS)
        rendered = self._render(template, {**marked, **flags})
        ids: list[int] = []
        pos = 0
        for m in self._added_re.finditer(rendered):
            ids += self.encode(rendered[pos : m.start()].replace(mark, ""))
            ids.append(self._added[m[0]])
            pos = m.end()
        return ids + self.encode(rendered[pos:].replace(mark, ""))

    def _render(self, source: str, variables: dict[str, Any]) -> str:
        if self._template is None or self._template[0] != source:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
            )
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: self.now().strftime(fmt)
            self._template = (source, env.from_string(source))
        return self._template[1].render({**self._special_vars, **variables})


class StreamingDetokenizer:
    """Turns generated ids into text segments that never end inside a UTF-8 character.

    Only the ids since the last clean boundary are decoded: each step is O(1) in the output length.
    The stream's text equals `decode(tokens)` whenever the bytes are valid UTF-8.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._decode = tokenizer.decode
        self.tokens: list[int] = []
        self._segments: list[str] = []
        self._start = 0  # first id not yet turned into a segment
        self._read = 0  # first segment not yet returned by last_segment

    def add_token(self, token_id: int) -> None:
        self.tokens.append(token_id)
        window = self.tokens[self._start :]
        piece = self._decode(window)
        # A trailing U+FFFD is an incomplete byte sequence: hold it until its remaining bytes arrive
        if piece.endswith(_REPLACEMENT_CHAR) and len(window) < _MAX_HELD_TOKENS:
            return
        self._emit(piece)

    def finalize(self) -> None:
        """Flush held-back ids, decoding whatever bytes they hold."""
        if self._start < len(self.tokens):
            self._emit(self._decode(self.tokens[self._start :]))

    def _emit(self, piece: str) -> None:
        self._segments.append(piece)
        self._start = len(self.tokens)

    @property
    def last_segment(self) -> str:
        """Text added since the previous read."""
        segment = "".join(self._segments[self._read :])
        self._read = len(self._segments)
        return segment

    @property
    def text(self) -> str:
        """All text emitted so far (held-back bytes excluded until they complete)."""
        return "".join(self._segments)


class ThinkSplitter:
    """Labels streamed text as "thinking" or "answer" by the `<think>`/`</think>` token ids.

    Args:
        think_start_id: Id of `<think>`.
        think_end_id: Id of `</think>`.
        thinking: Start inside a think block (the prompt ended with an open `<think>`).
    """

    def __init__(
        self, think_start_id: int | None, think_end_id: int | None, *, thinking: bool = False
    ):
        pairs = ((think_start_id, THINK_START), (think_end_id, THINK_END))
        self._tags = {i: tag for i, tag in pairs if i is not None}
        self._start_id = think_start_id
        self.thinking = thinking

    def feed(self, token_id: int, text: str) -> list[tuple[str, str]]:
        """Label `text`, the detokenizer's segment for `token_id`; tag tokens are dropped.

        Args:
            token_id: The generated id.
            text: The text that id released (may be empty, or carry held-back text of earlier ids).
        """
        tag = self._tags.get(token_id)
        if tag is None:
            return self._label(text)
        # Held-back bytes of earlier ids can arrive together with the tag's own text
        before, _, after = text.partition(tag)
        out = self._label(before)
        self.thinking = token_id == self._start_id
        return out + self._label(after)

    def _label(self, text: str) -> list[tuple[str, str]]:
        return [("thinking" if self.thinking else "answer", text)] if text else []
