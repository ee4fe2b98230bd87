"""The turn state and stop strings (smollm3_mlx.turn): pure, no model, no MLX."""

import pytest
from checkpoints import REFERENCE_MODEL_DIR, requires_reference

from smollm3_mlx.tokenizer import Tokenizer
from smollm3_mlx.turn import StopStrings, TurnIds, TurnState

HEADER, THINK, END_THINK, CALL, END_CALL, EOS = 1, 2, 3, 4, 5, 9
IDS = TurnIds(
    header=HEADER,
    think_start=THINK,
    think_end=END_THINK,
    call_start=CALL,
    call_end=END_CALL,
    eos=frozenset({EOS}),
)


@pytest.mark.parametrize(
    ("prompt", "phase", "count"),
    [
        ([], "answer", 0),  # no chat markup: the answer starts at once
        ([7, 8], "answer", 0),
        ([HEADER, 7], "start", 0),  # think mode: the model may open <think>
        ([HEADER, 7, THINK], "thinking", 0),
        ([HEADER, THINK, 7, 8], "thinking", 2),  # a prefilled thought counts for the budget
        ([HEADER, THINK, 7, END_THINK], "close", 0),
        ([HEADER, THINK, END_THINK, 7], "answer", 0),  # /no_think: the empty block and newline
        ([THINK, 7, HEADER, 8], "start", 0),  # the last mark decides, a header included
    ],
)
def test_the_prompt_sets_where_the_turn_starts(prompt, phase, count):
    state = TurnState(IDS, prompt)
    assert (state.phase, state.think_count) == (phase, count)
    assert state.closed == (phase in ("close", "answer"))


def test_a_thought_then_an_answer_with_a_tool_call():
    state = TurnState(IDS, [HEADER, 7])
    phases = [state.feed(t) for t in [THINK, 7, 8, END_THINK, 6, 7, CALL, 8, END_CALL, EOS]]
    assert phases == [
        "thinking",
        "thinking",
        "thinking",
        "close",
        "answer",
        "answer",
        "tool_call",
        "tool_call",
        "answer",
        "answer",
    ]
    assert (state.thinking_tokens, state.answer_tokens, state.think_count) == (2, 5, 2)
    assert state.closed and state.answering and not state.thinking


def test_the_end_of_sequence_id_changes_nothing():
    state = TurnState(IDS, [HEADER])
    assert state.feed(EOS) == "start"
    assert (state.answer_tokens, state.thinking_tokens) == (0, 0)
    state.feed(THINK)
    assert state.feed(EOS) == "thinking"


def test_an_answer_without_thinking_leaves_no_block_closed():
    state = TurnState(IDS, [HEADER])
    assert state.feed(7) == "answer"
    assert not state.closed  # a thinking budget still lets a block open
    assert state.feed(CALL) == "tool_call"


def test_a_second_think_block_counts_afresh_and_tags_are_not_counted():
    state = TurnState(IDS, [HEADER, THINK, 7, 7, 7])
    for t in [END_THINK, 6, THINK, 7]:
        state.feed(t)
    assert (state.think_count, state.thinking_tokens, state.answer_tokens) == (1, 1, 1)


def test_think_tags_inside_a_think_block_are_not_thinking_tokens():
    state = TurnState(IDS, [HEADER, THINK])
    state.feed(THINK)
    assert state.thinking and state.thinking_tokens == 0


def test_tool_call_ids_inside_a_think_block_stay_thinking():
    state = TurnState(IDS, [HEADER, THINK])
    assert [state.feed(t) for t in (CALL, END_CALL)] == ["thinking", "thinking"]
    assert state.thinking_tokens == 2


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_folder(REFERENCE_MODEL_DIR)


@requires_reference
def test_a_tokenizer_gives_its_marks(tok):
    ids = TurnIds.of(tok)
    assert ids.think_start == tok.think_start_id and ids.think_end == tok.think_end_id
    assert ids.call_start == tok.token_to_id("<tool_call>") is not None
    assert ids.eos == tok.eos_token_ids and ids.header == tok.im_start_id
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    assert TurnState(ids, prompt).phase == "start"
    assert TurnState(ids, [*prompt, tok.think_start_id]).thinking
    no_think = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=True, enable_thinking=False
    )
    assert TurnState(ids, no_think).phase == "answer"


def test_stop_strings_cut_before_the_first_and_hold_back_a_possible_start():
    stops = StopStrings(["END", "##"])
    assert stops.feed("one E") == "one "  # "E" may begin END
    assert stops.feed("N") == ""
    assert stops.feed("Dtwo") == "" and stops.hit
    assert stops.feed("more") == "" and stops.flush() == ""


def test_stop_strings_release_a_tail_that_began_none():
    stops = StopStrings(["END"])
    assert stops.feed("a #E") == "a #"
    assert stops.feed("x") == "Ex"
    assert stops.feed("EN") == ""
    assert stops.flush() == "EN" and not stops.hit


def test_the_earliest_stop_string_wins():
    stops = StopStrings(["cd", "b"])
    assert stops.feed("abcd") == "a"


def test_no_stop_strings_pass_text_at_once():
    stops = StopStrings()
    assert stops.feed("E") == "E" and stops.flush() == ""


def test_split_labels_text_by_the_think_tag_ids():
    state = TurnState(IDS, [HEADER])
    stream = [
        (THINK, "<think>"),
        (7, "\nstep"),
        (8, " one\n"),
        (END_THINK, "</think>"),
        (6, "\n42"),
    ]
    out = [piece for token, text in stream for piece in state.split(token, text)]
    assert out == [("thinking", "\nstep"), ("thinking", " one\n"), ("answer", "\n42")]
    assert (state.thinking_tokens, state.answer_tokens) == (2, 1)


def test_held_back_text_may_arrive_with_a_tags_own_text():
    state = TurnState(IDS, [HEADER, THINK])
    assert state.split(7, "") == []
    assert state.split(END_THINK, "\ufffd</think>ok") == [("thinking", "\ufffd"), ("answer", "ok")]
    assert state.split(None, "end") == [("answer", "end")]
    assert state.answer_tokens == 0  # text alone feeds no id


@requires_reference
def test_split_with_the_real_tokenizer(tok):
    ids = tok.encode("<think>\nLet me see 🤗\n</think>\nThe answer is 42.", allow_special=True)
    prompt = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=True)
    state, detok, out = TurnState(TurnIds.of(tok), prompt), tok.detokenizer(), {}
    for i in ids:
        detok.add_token(i)
        for kind, text in state.split(i, detok.last_segment):
            out[kind] = out.get(kind, "") + text
    assert out == {"thinking": "\nLet me see 🤗\n", "answer": "\nThe answer is 42."}


class _Pieces:
    """A stand-in tokenizer: each id is one piece of text (the marks spell their tags)."""

    TEXT = {HEADER: "<|im_start|>", THINK: "<think>", END_THINK: "</think>", CALL: "<tool_call>"}
    TEXT |= {END_CALL: "</tool_call>", 6: "\n", 7: "END", 8: "ok "}
    im_start_id, think_start_id, think_end_id, eos_token_ids = HEADER, THINK, END_THINK, {EOS}

    def token_to_id(self, text):
        return {"<tool_call>": CALL, "</tool_call>": END_CALL}.get(text)

    def detokenizer(self):
        pieces = self.TEXT

        class Detokenizer:
            last = ""

            def add_token(self, token):
                self.last += pieces[token]

            @property
            def last_segment(self):
                out, self.last = self.last, ""
                return out

            def finalize(self):
                pass

        return Detokenizer()


def _stream(prompt, ids, stop=("END",)):
    from smollm3_mlx.generate import _TextStream

    text, out = _TextStream(_Pieces(), stop, prompt), []
    for token in ids:
        piece, stopped = text.add(token)
        if stopped:
            return "".join(out) + text.end("stop")[0], "stop"
        out.append(piece)
    piece, finish = text.end("length")
    return "".join(out) + piece, finish


def test_stop_strings_are_matched_in_the_answer_not_the_reasoning_or_a_tool_call():
    thought = [THINK, 8, 7, 8, END_THINK, 6]
    assert _stream([HEADER], [*thought, 8, 8]) == ("<think>ok ENDok </think>\nok ok ", "length")
    assert _stream([HEADER], [*thought, 8, 7, 8]) == ("<think>ok ENDok </think>\nok ", "stop")
    call = [CALL, 7, END_CALL, 8]
    assert _stream([HEADER], call) == ("<tool_call>END</tool_call>ok ", "length")


def test_all_of_a_plain_prompts_text_is_searched():
    assert _stream([], [8, 7, 8]) == ("ok ", "stop")
    assert _stream([], [8, 8], stop=("ok ok",)) == ("", "stop")


def test_held_back_answer_text_goes_out_before_text_not_searched():
    assert _stream([], [7, CALL, 8], stop=("ENDX",)) == ("END<tool_call>ok ", "length")
