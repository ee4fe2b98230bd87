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

CALL_START, CALL_END = TOOL_CALL_START, TOOL_CALL_END  # (turn.py spells the tags once)
# Tags the model itself writes: a prefill names them as text (`Chat.send(prefill="<think>...")`);
# in a rendered chat they come from an assistant message's structure (`assistant_text`) only.
ASSISTANT_TAGS = frozenset({THINK_START, THINK_END, CALL_START, CALL_END})
# An assistant message's structure beside its "content" (the answer), as Chat and the server keep it
STRUCTURE_KEYS = ("reasoning_content", "reasoning_open", "tool_calls")
STRUCTURE_KEYS_SET = frozenset(STRUCTURE_KEYS)
_REPLACEMENT_CHAR = "\ufffd"
# A held-back tail this long is invalid bytes, not a split character (one is at most 4 bytes).
_MAX_HELD_TOKENS = 8


def valid_text(text: str) -> str:
    """`text` with what is not text replaced by U+FFFD: the rule at every text boundary.

    A Python str can hold lone surrogates, which no UTF-8 encoding has: bytes that were not UTF-8
    where Python escaped them (argv, `surrogateescape`), or half a pair (`"\\ud800"` in JSON).
    Escaped bytes are decoded as UTF-8 with replacement; any other lone surrogate is one U+FFFD.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte: UTF-16 joins true pairs
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def check_assistant(message: dict[str, Any]) -> None:
    """A ValueError (one line) unless an assistant message's structure is what `assistant_text`
    takes: `content` (the answer) a string; `reasoning_content` a string; `reasoning_open` true
    only when the answer has not begun; `tool_calls` a list of {"name": str, "arguments": {...}}."""
    content, reasoning = message.get("content", ""), message.get("reasoning_content")
    if not isinstance(content, str):
        raise ValueError("its content is not text")
    if reasoning is not None and not isinstance(reasoning, str):
        raise ValueError("its reasoning_content is not text")
    is_open = message.get("reasoning_open", False)
    if type(is_open) is not bool or (is_open and (reasoning is None or content)):
        raise ValueError("reasoning_open is true or false, true only with reasoning and no answer")
    calls = message.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        raise ValueError("its tool_calls are not a list")
    for j, call in enumerate(calls or ()):
        if not (isinstance(call, dict) and set(call) == {"name", "arguments"}):
            raise ValueError(f'tool call {j} is not {{"name": ..., "arguments": {{...}}}}')
        if not isinstance(call["name"], str) or not isinstance(call["arguments"], dict):
            raise ValueError(f"tool call {j} has no name or its arguments are not an object")
    if is_open and calls:
        raise ValueError("reasoning_open with tool calls")


def assistant_text(message: dict[str, Any], tags: dict[str, str] | None = None) -> str:
    """An assistant message as the model writes it, built from its structure: `<think>`, the
    reasoning, `</think>` (left out while `reasoning_open`), the answer, then each tool call as
    `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>` on a line of its own.

    Args:
        message: see `check_assistant`; the texts keep their whitespace as written.
        tags: the spelling of each tag (`apply_chat_template` puts a private character there).
    """
    tag = (tags or {}).get
    text, reasoning = "", message.get("reasoning_content")
    if reasoning is not None:
        text = tag(THINK_START, THINK_START) + reasoning
        text += "" if message.get("reasoning_open") else tag(THINK_END, THINK_END)
    text += message.get("content") or ""
    for call in message.get("tool_calls") or ():
        body = json.dumps(
            {"name": call["name"], "arguments": call["arguments"]}, ensure_ascii=False
        )
        newline = "\n" if text and not text.endswith("\n") else ""
        text += f"{newline}{tag(CALL_START, CALL_START)}\n{body}\n{tag(CALL_END, CALL_END)}"
    return text


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

        Raises:
            TypeError: `text` is not a str. What in a str is not text (lone surrogates) is
                encoded as U+FFFD (`valid_text`).
        """
        if not isinstance(text, str):
            raise TypeError(f"the text to encode must be a str, not {type(text).__name__}")
        text = valid_text(text)
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
        **kwargs: Any,
    ) -> str | list[int]:
        """Render the chat template as transformers' `apply_chat_template` does.

        With tokenize=True, control ids come only from the template's own literals (and the
        special tokens of tokenizer_config.json) and from the structure of assistant messages:
        every string in messages, tools or kwargs is plain text, even where the template cuts,
        strips or joins it into a control string (`<|im_/thinkend|>` in a system message, whose
        `/think` the template deletes), and even `<think>` or `</tool_call>` in an assistant's
        answer, reasoning or tool-call arguments. The rendered string (tokenize=False) cannot show
        that difference: feed the model the ids.

        The date comes from `self.now` (set it, or pass `now=` to `from_folder`, to freeze it).

        Args:
            messages: Chat messages, dicts with "role" and "content"; keys set to None are dropped.
                An assistant message may keep its turn's structure apart: `reasoning_content`,
                `reasoning_open`, `tool_calls` (see `assistant_text`, which writes its text and
                the only tags of the conversation that are control ids).
            add_generation_prompt: Append the assistant header (plus an empty think block in
                /no_think mode). Default: True, unless continue_final_message.
            tokenize: Return token ids instead of the rendered string.
            enable_thinking: Reasoning mode, unless the system message says `/think` or `/no_think`.
            tools: JSON-schema tool definitions (SmolLM3 treats them as `xml_tools`).
            xml_tools: Tools called with `<tool_call>` JSON.
            python_tools: Tools called from `<code>` blocks.
            continue_final_message: Leave the final message open, to be continued (assistant
                prefill): the rendering ends where its content does, as in transformers.
            **kwargs: Further variables of the template; any other name is a TypeError.

        Raises:
            TypeError: a keyword that is neither an option here nor a variable of the template.
            ValueError: continue_final_message with add_generation_prompt=True, or without a
                final message whose text the template keeps; an assistant message whose
                structure is malformed (`check_assistant`).
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
        structured = _checked_structure(inputs.pop("messages"))
        inputs.update(
            add_generation_prompt=not continue_final_message
            if add_generation_prompt is None
            else add_generation_prompt,
            enable_thinking=enable_thinking,
        )
        now = self.now()  # one date for both renderings of a tokenized chat
        inputs["strftime_now"] = lambda fmt: now.strftime(fmt)
        messages, final = _as_template_messages(structured, {}, continue_final_message)
        text = compiled.render({**self._special_vars, **inputs, "messages": messages})
        if final is not None:
            text = cut_at_continue_tag(text, final)
        if not tokenize:
            return text
        return self._template_ids(compiled, inputs, structured, text, continue_final_message)

    def _template_ids(
        self,
        compiled: CompiledTemplate,
        inputs: dict,
        structured: list[dict[str, Any]],
        text: str,
        cut: bool,
    ) -> list[int]:
        """Token ids of `text`, rendered from `inputs` and `structured` messages, with control
        ids only where the template (or its special-token variables) wrote them, or
        `assistant_text` wrote a tag from an assistant message's structure.

        The template renders again with a private character in place of each control token it
        writes and each structural tag; since that render must restore to `text`, every other
        character of `text` is known to be input or template text, and is encoded as plain text.
        """
        wanted = [*compiled.controls]
        for value in self._special_vars.values():
            wanted += self._added_re.findall(value)
        wanted += [t for t in (THINK_START, THINK_END, CALL_START, CALL_END) if t in self._added]
        wanted = list(dict.fromkeys(wanted))
        chars = free_characters(text + compiled.source, len(wanted))
        private = dict(zip(wanted, chars, strict=True))
        specials = {
            k: self._added_re.sub(lambda m: private[m[0]], v) for k, v in self._special_vars.items()
        }
        messages, _ = _as_template_messages(structured, private, cut)
        shadow = compiled.render({**specials, **inputs, "messages": messages}, private)
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


def _checked_structure(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages`, once every assistant message's structure is checked (`check_assistant`)."""
    for i, m in enumerate(messages):
        if m.get("role") == "assistant" and STRUCTURE_KEYS_SET & m.keys():
            try:
                check_assistant(m)
            except ValueError as e:
                raise ValueError(f"message {i}: {e}") from None
    return messages


def _as_template_messages(
    structured: list[dict[str, Any]], tags: dict[str, str], continue_final: bool
) -> tuple[list[dict[str, Any]], str | None]:
    """The messages the template reads: each structured assistant message's text written by
    `assistant_text` with these tag spellings; with `continue_final`, the final message tagged
    for `cut_at_continue_tag` (its content as given is returned)."""
    messages = []
    for m in structured:
        if m.get("role") == "assistant" and STRUCTURE_KEYS_SET & m.keys():
            rest = {k: v for k, v in m.items() if k not in STRUCTURE_KEYS_SET}
            m = {**rest, "content": assistant_text(m, tags)}
        messages.append(dict(m))
    final = _tag_final_message(messages) if continue_final else None
    return messages, final


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
