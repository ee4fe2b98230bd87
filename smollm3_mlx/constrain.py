"""Constrained decoding (JSON schema, regex, choices, tool calls) and thinking budgets.

A processor is `processor(tokens, logits) -> logits` (sample.py), `tokens` being every id so far,
the prompt included. Both kinds here carry state from step to step (`stateful = True`: prompt
lookup, whose verify pass shows processors speculative histories, is turned off for them). They
read where a turn stands from SmolLM3's own ids: `<think>`, `</think>`, `<tool_call>`, the eos ids.

The answer's grammar comes from grammar.py (llguidance, imported only when a constraint is made).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from .events import TOOL_CALL_START
from .grammar import (
    ConstraintError as ConstraintError,
    ResponseFormat as ResponseFormat,
    ToolChoice as ToolChoice,
    engine,
    ll_tokenizer as ll_tokenizer,
    make_answer_grammar as make_answer_grammar,
    make_response_format as make_response_format,
    one_line,
    tool_choice_mode as tool_choice_mode,
)

if TYPE_CHECKING:
    import numpy as np

    from .tokenizer import Tokenizer

# Qwen3's documented budget hand-off, ending with the newline SmolLM3 writes before </think>.
DEFAULT_HANDOFF = (
    "\n\nConsidering the limited time, I have to give the solution based on the thinking "
    "directly now.\n"
)


# The tokens a turn whose answer has a shape (a response format, a required or named tool call)
# keeps for that answer: its thinking closes by max_tokens - DEFAULT_ANSWER_RESERVE (README).
DEFAULT_ANSWER_RESERVE = 256
_CLOSE_TOKENS = 3  # <think>, </think> and the newline after it: neither thinking nor answer


def _force(logits: mx.array, token: int) -> mx.array:
    """Only `token` can be sampled (0 there, whatever the model said; -inf elsewhere)."""
    forced = mx.where(mx.arange(logits.shape[-1]) == token, 0.0, -mx.inf).astype(logits.dtype)
    return mx.broadcast_to(forced, logits.shape)


def _ids(tokens: mx.array) -> list[int]:
    ids = tokens.tolist()
    assert isinstance(ids, list)
    return ids  # type: ignore[return-value]


def _ban(logits: mx.array, ids: mx.array) -> mx.array:
    logits[..., ids] = -mx.inf
    return logits


def _stage(ids: Sequence[int], tokenizer: Tokenizer) -> tuple[str, int]:
    """Where a prompt leaves the turn: ("start" | "thinking" | "close" | "answer", think tokens).

    "start": an assistant header in think mode (the model may open `<think>`); "thinking":
    inside `<think>` (with that many tokens of it so far); "close": right after `</think>`, where
    the template writes a newline; "answer": past that (or a prompt with no chat markup).
    """
    marks = (tokenizer.im_start_id, tokenizer.think_start_id, tokenizer.think_end_id)
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] in marks:
            if ids[i] == tokenizer.think_start_id:
                return "thinking", len(ids) - i - 1
            if ids[i] == tokenizer.think_end_id:
                return ("close" if i == len(ids) - 1 else "answer"), 0
            return "start", 0
    return "answer", 0


def _newline(tokenizer: Tokenizer) -> int:
    ids = tokenizer.encode("\n")
    if len(ids) != 1:
        raise ConstraintError("the tokenizer has no single newline token")
    return ids[0]


class _Stepper:
    """Feeds a processor the ids that arrived since its previous call."""

    stateful = True

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.newline = _newline(tokenizer)
        self._eos = mx.array(list(tokenizer.eos_token_ids))  # built once, banned at many steps
        self._seen: int | None = None

    def _arrived(self, tokens: mx.array) -> list[int]:
        if self._seen is None:
            self._seen = tokens.size
            self._start(_ids(tokens))
            return []
        if tokens.size < self._seen:
            raise RuntimeError("a processor serves one generation; make a new one for the next")
        new = _ids(tokens[self._seen :]) if tokens.size > self._seen else []
        self._seen = tokens.size
        return new

    def _start(self, prompt: list[int]) -> None:
        raise NotImplementedError


class AnswerConstraint(_Stepper):
    """Constrains the answer to a grammar (`make_answer_grammar`); thinking stays free.

    The grammar starts after `</think>` and the newline the template writes after it (forced),
    or at the first token in no-think mode; in think mode the first token may also open
    `<think>`. End of turn is allowed exactly where the grammar is complete, and never inside
    the think block. `parse()` gives the value of a finished answer.
    """

    def __init__(self, tokenizer: Tokenizer, grammar: str, response_format=None):
        super().__init__(tokenizer)
        llg = engine()
        self.response_format = response_format
        lt = ll_tokenizer(tokenizer)
        bad, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, lt)
        if bad:
            raise ConstraintError(f"cannot constrain the answer: {one_line(messages[0])}")
        self.matcher = llg.LLMatcher(lt, grammar, log_level=0)
        if self.matcher.is_error():
            error = one_line(self.matcher.get_error())
            raise ConstraintError(f"cannot constrain the answer: {error}")
        import numpy as np  # here, so that importing the package stays light

        self._np = np
        self._bits = np.zeros((lt.vocab_size + 31) // 32, dtype=np.int32)
        self.stage = "answer"
        self.answer_ids: list[int] = []  # what the grammar has consumed
        # Once this many tokens are generated, a complete answer ends (no further call is
        # begun): set for a required shape, whose room must not go to extra calls.
        self.wrap_up_after: int | None = None
        self._generated = 0
        eos = tokenizer.eos_token_ids
        self.end = tokenizer.im_end_id if tokenizer.im_end_id in eos else min(eos)

    def _start(self, prompt: list[int]) -> None:
        self.stage, _ = _stage(prompt, self.tokenizer)

    def _advance(self, token: int) -> None:
        tok = self.tokenizer
        if self.stage == "start" and token == tok.think_start_id:
            self.stage = "thinking"
        elif self.stage == "thinking":
            if token == tok.think_end_id:
                self.stage = "close"
        elif self.stage == "close":
            self.stage = "answer"  # the forced newline
        elif token not in tok.eos_token_ids:
            self.stage = "answer"
            if not self.matcher.consume_token(token):
                raise RuntimeError(f"the answer left its grammar: {self.matcher.get_error()}")
            self.answer_ids.append(token)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        for token in self._arrived(tokens):
            self._generated += 1
            self._advance(token)
        if self.stage == "thinking":
            return _ban(logits, self._eos)
        if self.stage == "close":
            return _force(logits, self.newline)
        late = self.wrap_up_after is not None and self._generated >= self.wrap_up_after
        if late and self.complete:
            return _force(logits, self.end)
        return self._mask(logits)

    def mask(self) -> np.ndarray:
        """The tokens the grammar allows next, one bool each (plus `<think>` at the start)."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        np = self._np
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little").view(np.bool_)
        if self.stage == "start" and self.tokenizer.think_start_id is not None:
            allowed[self.tokenizer.think_start_id] = True
        return allowed

    def _mask(self, logits: mx.array) -> mx.array:
        allowed = self.mask()
        n = logits.shape[-1]
        if n > allowed.size:  # a padded output head: its extra rows are no tokens
            allowed = self._np.concatenate([allowed, self._np.zeros(n - allowed.size, bool)])
        return mx.where(mx.array(allowed[:n]), logits, -mx.inf)

    @property
    def complete(self) -> bool:
        """The answer so far is a whole value (end of turn allowed)."""
        return self.stage == "answer" and self.matcher.is_accepting()

    def text(self) -> str:
        return self.tokenizer.decode(self.answer_ids)

    def parse(self) -> Any:
        """The value of the answer (see `ResponseFormat.parse`).

        Raises:
            ValueError: the answer is not complete (cut by max_tokens or cancelled), or no
                response format was given.
        """
        if self.response_format is None:
            raise ValueError("no response format to parse the answer with")
        if not self.complete:
            raise ValueError(f"the answer is not complete: {self.text()!r}")
        return self.response_format.parse(self.text())


def make_answer_constraint(
    tokenizer: Tokenizer,
    response_format: Any = None,
    *,
    tools: Sequence[dict[str, Any]] | None = None,
    tool_choice: ToolChoice = "auto",
    parallel_tool_calls: bool = True,
) -> AnswerConstraint | None:
    """A processor holding the answer to `response_format` and well-formed tool calls, or None
    when there is nothing to constrain. Errors come here, before any token.

    Args:
        tokenizer: the model's Tokenizer (the grammar works on its full vocabulary).
        response_format: see `make_response_format`.
        tools: the offered tools (JSON schemas with a name and parameters).
        tool_choice: "auto", "none", "required", a tool's name, or OpenAI's dicts for those
            (see `tool_choice_mode`).
        parallel_tool_calls: False: one call at most.

    Raises:
        ConstraintError: an invalid or unsupported schema, pattern, tool list or tool choice;
            its `param` says which.
    """
    fmt = make_response_format(response_format)
    grammar = make_answer_grammar(
        tokenizer, fmt, tools, tool_choice, parallel_tool_calls=parallel_tool_calls
    )
    if grammar is None:
        return None
    try:
        return AnswerConstraint(tokenizer, grammar, fmt)
    except ConstraintError as e:
        raise ConstraintError(str(e), _at_fault(tokenizer, fmt)) from None


def _at_fault(tokenizer: Tokenizer, fmt: ResponseFormat | None) -> str:
    """Which part of a grammar that does not compile is at fault: the response format if it
    fails alone, else the tools."""
    if fmt is None:
        return "tools"
    bad, _ = engine().LLMatcher.validate_grammar_with_warnings(
        f"start: {fmt.lark(engine())}\n", ll_tokenizer(tokenizer)
    )
    return "response_format" if bad else "tools"


def answer_shaped(
    response_format: Any = None,
    tools: Sequence[dict[str, Any]] | None = None,
    tool_choice: ToolChoice = "auto",
) -> bool:
    """Whether the answer has a required shape: a response format, or a required or named tool
    call (what `DEFAULT_ANSWER_RESERVE` keeps room for)."""
    if make_response_format(response_format) is not None:
        return True
    return bool(tools) and tool_choice_mode(tool_choice)[0] == "required"


def reserved_think_budget(
    budget: int | None, room: int | None, reserve: int = DEFAULT_ANSWER_RESERVE
) -> int | None:
    """The thinking budget of a turn whose answer has a shape: `budget` when one is given (it
    wins), else what `room` (the tokens the turn may generate; None: unbounded) leaves once
    `reserve` tokens are kept for the answer."""
    if budget is not None or room is None:
        return budget
    return max(0, room - reserve - _CLOSE_TOKENS)


class CallBan:
    """Keeps `<tool_call>` out of a turn that may not call a tool (no tools offered, or
    tool_choice "none"): the id is never sampled, so no call is opened or parsed. Stateless."""

    def __init__(self, tokenizer: Tokenizer):
        call = tokenizer.token_to_id(TOOL_CALL_START)
        self._ids = None if call is None else mx.array([call])

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        return logits if self._ids is None else _ban(logits, self._ids)


def make_turn_processors(
    tokenizer: Tokenizer,
    *,
    response_format: Any = None,
    tools: Sequence[dict[str, Any]] | None = None,
    tool_choice: ToolChoice = "auto",
    parallel_tool_calls: bool = True,
    think_budget: int | None = None,
    answer_reserve: int = DEFAULT_ANSWER_RESERVE,
    room: int | None = None,
    handoff: str = DEFAULT_HANDOFF,
    stop: threading.Event | None = None,
) -> tuple[list[Any], AnswerConstraint | None]:
    """A turn's processors (the thinking budget, the answer constraint, the ban on calls; those
    it needs) and its answer constraint: what Chat and the server both hold a turn to.

    An answer with a shape (`answer_shaped`) gets its thinking closed so that `answer_reserve`
    of the `room` (the tokens the turn may generate) are left for it, unless a `think_budget`
    is given. The other arguments are those of `make_answer_constraint` and `make_think_budget`.

    Raises:
        ConstraintError: see `make_answer_constraint` (before any token).
    """
    constraint = make_answer_constraint(
        tokenizer,
        response_format,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel_tool_calls,
    )
    if answer_shaped(response_format, tools, tool_choice) and tokenizer.think_end_id is not None:
        think_budget = reserved_think_budget(think_budget, room, answer_reserve)
        if constraint is not None and room is not None:  # the reserve is for one shape
            constraint.wrap_up_after = max(room - answer_reserve, 0)
    budget = make_think_budget(tokenizer, think_budget, handoff=handoff, stop=stop)
    ban = make_call_ban(tokenizer, tools, tool_choice)
    return [p for p in (budget, constraint, ban) if p is not None], constraint


def make_call_ban(
    tokenizer: Tokenizer,
    tools: Sequence[dict[str, Any]] | None = None,
    tool_choice: ToolChoice = "auto",
) -> CallBan | None:
    """A CallBan when no call may be made (no tools, or tool_choice "none"), else None."""
    if tools and tool_choice_mode(tool_choice)[0] != "none":
        return None
    return CallBan(tokenizer)


class ThinkBudget(_Stepper):
    """Closes the think block after `budget` thinking tokens, or as soon as `stop` is set.

    The close is what SmolLM3 writes: the hand-off text (ending in a newline), `</think>`, and
    the newline after it. The hand-off counts as thinking, so a forced close leaves exactly
    `budget` tokens between `<think>` and `</think>`; a hand-off longer than that is left out.
    After a forced close the answer has at least one token, and no turn opens a second block.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        budget: int | None = None,
        *,
        handoff: str = DEFAULT_HANDOFF,
        stop: threading.Event | None = None,
    ):
        super().__init__(tokenizer)
        if budget is not None and (not isinstance(budget, int) or budget < 0):
            raise ValueError(f"the thinking budget must be a whole number >= 0, not {budget!r}")
        if tokenizer.think_end_id is None:
            raise ValueError("this tokenizer has no </think> token")
        self.think_end: int = tokenizer.think_end_id
        start = tokenizer.think_start_id
        self._tags = mx.array([self.think_end] + ([] if start is None else [start]))
        self.budget, self.stop = budget, stop
        self.handoff = tokenizer.encode(handoff) if handoff else []
        self.thinking, self.closed, self.answering, self.count = False, False, False, 0
        self.queue: list[int] = []  # forced ids still to come

    def _start(self, prompt: list[int]) -> None:
        stage, self.count = _stage(prompt, self.tokenizer)
        self.thinking, self.closed = stage == "thinking", stage in ("close", "answer")

    def _advance(self, token: int) -> None:
        if self.queue:
            self.queue = self.queue[1:] if token == self.queue[0] else []
            self.answering = not self.queue  # the forced close is written: the answer is next
        if token == self.tokenizer.think_start_id:
            self.thinking, self.count = True, 0
        elif token == self.tokenizer.think_end_id:
            self.thinking, self.closed = False, True
        elif self.thinking:
            self.count += 1

    def _idle(self, tokens: mx.array) -> bool:
        """Nothing can be due yet: leave the new ids unread, so that the next step is queued
        without waiting for this one (generate_step's overlap)."""
        if self._seen is None or self.queue:
            return False
        if self.closed:
            return True
        if self.stop is not None and self.stop.is_set():
            return False
        unread = tokens.size - self._seen  # at most that many more thinking tokens
        return self.budget is None or self.count + unread + len(self.handoff) < self.budget

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if not self._idle(tokens):
            for token in self._arrived(tokens):
                self._advance(token)
            if not self.queue and self.thinking:
                self._close_if_due()
        if self.queue:
            return _force(logits, self.queue[0])
        if not self.closed:
            return logits
        if self.answering:  # after a forced close, an answer (not an empty one) follows
            self.answering = False
            return _ban(_ban(logits, self._tags), self._eos)
        return _ban(logits, self._tags)  # one think block a turn: no tag once it is closed

    def _close_if_due(self) -> None:
        handoff = self.handoff
        if self.budget is not None and self.count + len(handoff) > self.budget:
            handoff = []  # no room left for it
        due = self.budget is not None and self.count + len(handoff) >= self.budget
        if due or (self.stop is not None and self.stop.is_set()):
            self.queue = [*handoff, self.think_end, self.newline]


def make_think_budget(
    tokenizer: Tokenizer,
    budget: int | None = None,
    *,
    handoff: str = DEFAULT_HANDOFF,
    stop: threading.Event | None = None,
) -> ThinkBudget | None:
    """A processor bounding the thinking (None when there is no budget and no stop flag).

    Args:
        tokenizer: the model's Tokenizer.
        budget: the most tokens between `<think>` and `</think>`.
        handoff: text written before `</think>` when the close is forced ("" for none).
        stop: set it (from any thread) to close the thinking at the next step: "answer now".
    """
    if budget is None and stop is None:
        return None
    return ThinkBudget(tokenizer, budget, handoff=handoff, stop=stop)
