"""Tokenizer, chat template rendering and streaming detokenizer for SmolLM3.

Only `tokenizers` and `jinja2` are needed here: the runtime path must not import transformers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from jinja2.exceptions import TemplateError

from .template import (
    CONTINUE_TAG,
    CompiledTemplate,
    compile_template,
    cut_at_continue_tag,
    free_characters,
    plain,
)
from .turn import THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START

# Tags the model itself writes; `assistant_tags=True` keeps them as control ids in assistant turns.
ASSISTANT_TAGS = frozenset({THINK_START, THINK_END, TOOL_CALL_START, TOOL_CALL_END})
_REPLACEMENT_CHAR = "\ufffd"
# A held-back tail this long is invalid bytes, not a split character (one is at most 4 bytes).
_MAX_HELD_TOKENS = 8


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
        self._added_ids = frozenset(added)
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
        self._special_vars: dict[str, str] = {
            n: text for n in names if (text := _token_text(self.config.get(n)))
        }
        self._template: CompiledTemplate | None = None

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

    def encode(self, text: str, *, allow_special: bool | Collection[str] = False) -> list[int]:
        """Encode `text` without adding BOS/EOS.

        Args:
            text: The text to encode.
            allow_special: If True, added-token text like `<|im_end|>` or `<think>` becomes its
                control id; if False (the default) every added token, special or not, is plain
                text; a collection of added tokens (ASSISTANT_TAGS): only those.
        """
        if not isinstance(allow_special, bool):
            allowed = frozenset(allow_special)
            ids: list[int] = []
            pos = 0
            for m in self._added_re.finditer(text):
                if m[0] in allowed:
                    ids += self.encode(text[pos : m.start()])
                    ids.append(self._added[m[0]])
                    pos = m.end()
            return ids + self.encode(text[pos:])
        ids = self.backend.encode(text, add_special_tokens=False).ids
        # Judged on the ids, not the text: a normalizer could make an added token of other text
        if allow_special or self._added_ids.isdisjoint(ids):
            return ids
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

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool | None = None,
        tokenize: bool = False,
        enable_thinking: bool = True,
        tools: list[dict] | None = None,
        xml_tools: list[dict] | None = None,
        python_tools: list[dict] | None = None,
        continue_final_message: bool = False,
        assistant_tags: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render the chat template as transformers' `apply_chat_template` does.

        With tokenize=True, control ids come only from the template's own literals (and the
        special tokens of tokenizer_config.json): every string in messages, tools or kwargs is
        plain text, even where the template cuts, strips or joins it into a control string
        (`<|im_/thinkend|>` in a system message, whose `/think` the template deletes). So past
        assistant turns holding `<think>...</think>` re-tokenize with the tags as text, unless
        `assistant_tags` says otherwise. The rendered string (tokenize=False) cannot show that
        difference: feed the model the ids.

        The date comes from `self.now` (set it, or pass `now=` to `from_folder`, to freeze it).

        Args:
            messages: Chat messages, dicts with "role" and "content"; keys set to None are dropped.
            add_generation_prompt: Append the assistant header (plus an empty think block in
                /no_think mode). Default: True, unless continue_final_message.
            tokenize: Return token ids instead of the rendered string.
            enable_thinking: Reasoning mode, unless the system message says `/think` or `/no_think`.
            tools: JSON-schema tool definitions (SmolLM3 treats them as `xml_tools`).
            xml_tools: Tools called with `<tool_call>` JSON.
            python_tools: Tools called from `<code>` blocks.
            continue_final_message: Leave the final message open, to be continued (assistant
                prefill): the rendering ends where its content does, as in transformers.
            assistant_tags: With tokenize=True, let the tags the model writes itself (`<think>`,
                `</think>`, `<tool_call>`, `</tool_call>`) in assistant content through as control
                ids, so that a past answer re-tokenizes as it was generated (prompt-cache reuse).
            **kwargs: Further variables of the template; any other name is a TypeError.

        Raises:
            TypeError: a keyword that is neither an option here nor a variable of the template.
            ValueError: continue_final_message with add_generation_prompt=True, or without a
                final message whose text the template keeps.
        """
        compiled = self._compiled()
        unknown = sorted(set(kwargs) - compiled.variables)
        if unknown:
            raise TypeError(
                f"apply_chat_template got {', '.join(unknown)}: neither an option nor a variable "
                "of the chat template"
            )
        if continue_final_message and add_generation_prompt:
            raise ValueError(
                "continue_final_message and add_generation_prompt are not compatible: the first "
                "continues the final message, the second opens a new assistant message"
            )
        # As transformers does: OpenAI-style `content=None` means the key is absent
        inputs = plain(
            dict(
                messages=[{k: v for k, v in m.items() if v is not None} for m in messages],
                tools=tools,
                xml_tools=xml_tools,
                python_tools=python_tools,
                **kwargs,
            )
        )
        final = _tag_final_message(inputs["messages"]) if continue_final_message else None
        inputs.update(
            add_generation_prompt=not continue_final_message
            if add_generation_prompt is None
            else add_generation_prompt,
            enable_thinking=enable_thinking,
        )
        now = self.now()  # one date for both renderings of a tokenized chat
        inputs["strftime_now"] = lambda fmt: now.strftime(fmt)
        text = compiled.render({**self._special_vars, **inputs})
        if final is not None:
            text = cut_at_continue_tag(text, final)
        if not tokenize:
            return text
        return self._template_ids(compiled, inputs, text, assistant_tags, final is not None)

    def _template_ids(
        self, compiled: CompiledTemplate, inputs: dict, text: str, assistant_tags: bool, cut: bool
    ) -> list[int]:
        """Token ids of `text`, rendered from `inputs`, with control ids only where the template
        (or its special-token variables) wrote them.

        The template renders again with a private character in place of each control token it
        writes; since that render must restore to `text`, every other character of `text` is
        known to be input or template text, and is encoded as plain text.
        """
        wanted = [*compiled.controls]
        for value in self._special_vars.values():
            wanted += self._added_re.findall(value)
        wanted += sorted(ASSISTANT_TAGS) if assistant_tags else []
        wanted = list(dict.fromkeys(wanted))
        chars = free_characters(text + compiled.source, len(wanted))
        private = dict(zip(wanted, chars, strict=True))

        def hide(s: str, only: frozenset[str] | None = None) -> str:
            return self._added_re.sub(
                lambda m: private[m[0]] if only is None or m[0] in only else m[0], s
            )

        specials = {k: hide(v) for k, v in self._special_vars.items()}
        if assistant_tags:
            inputs = {**inputs, "messages": [dict(m) for m in inputs["messages"]]}
            for m in inputs["messages"]:
                if m.get("role") == "assistant" and isinstance(m.get("content"), str):
                    m["content"] = hide(m["content"], ASSISTANT_TAGS)
        shadow = compiled.render({**specials, **inputs}, private)
        if cut:
            shadow = cut_at_continue_tag(shadow)
        restore = {ord(c): s for s, c in private.items()}
        if shadow.translate(restore) != text:
            raise TemplateError(
                "the chat template treats control-token text in its inputs differently from its "
                "own: cannot tell the control tokens it writes from input text"
            )
        ids: list[int] = []
        pos = 0
        for m in re.finditer(f"[{''.join(chars)}]" if chars else "(?!)", shadow):
            ids += self.encode(shadow[pos : m.start()])
            ids.append(self._added[restore[ord(m[0])]])
            pos = m.end()
        return ids + self.encode(shadow[pos:])

    def _compiled(self) -> CompiledTemplate:
        source = self.chat_template
        if source is None:
            raise ValueError("this tokenizer has no chat template")
        if self._template is None or self._template.source != source:
            self._template = compile_template(source, self._added_re)
        return self._template


def _tag_final_message(messages: list[dict[str, Any]]) -> str:
    """Append transformers' continue tag to the final message; return its content as given."""
    final = messages[-1].get("content") if messages else None
    if not isinstance(final, str):
        raise ValueError("continue_final_message: the final message has no text content")
    messages[-1]["content"] = final + CONTINUE_TAG
    return final


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
