"""The chat session, on a tiny SmolLM3 trained to reproduce scripted transcripts."""

from __future__ import annotations

import json
from datetime import datetime

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import REFERENCE_MODEL_DIR, requires_reference
from trained_model import QUESTIONS, TOOL_RESULT, TOOLS, answer, reply, trained_checkpoint

from smollm3_mlx.chat import (
    AnswerDelta,
    Chat,
    ChatFileError,
    Done,
    Sampling,
    ThinkingDelta,
    ToolCall,
)
from smollm3_mlx.generate import generate_step
from smollm3_mlx.loading import load
from smollm3_mlx.tokenizer import Tokenizer

pytestmark = requires_reference
GREEDY = Sampling(temperature=0.0, top_p=1.0)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load(trained_checkpoint(tmp_path_factory))


def session(loaded, **kwargs) -> Chat:
    model, tokenizer = loaded
    return Chat(model, tokenizer, sampling=kwargs.pop("sampling", GREEDY), **kwargs)


def turn(chat: Chat, text: str) -> tuple[str, str, Done]:
    """(streamed thinking, streamed answer, Done) of one turn."""
    events = list(chat.send(text))
    thinking = "".join(e.text for e in events if isinstance(e, ThinkingDelta))
    streamed = "".join(e.text for e in events if isinstance(e, AnswerDelta))
    assert isinstance(events[-1], Done)
    return thinking, streamed, events[-1]


def _user(key):
    return {"role": "user", "content": QUESTIONS[key]}


def _called(think):
    return [_user("weather"), _assistant("weather", think)]


def _tool():
    return {"role": "tool", "content": TOOL_RESULT}


def _assistant(key, think):
    return {"role": "assistant", "content": reply(key, think)}


SCRIPTS = [
    ("think then answer", [_user("math")], "math", True, None),
    ("direct answer", [_user("hi")], "hi", False, None),
    ("think, greeting", [_user("hi")], "hi", True, None),
    ("no-think math", [_user("math")], "math", False, None),
    ("tool call", [_user("weather")], "weather", True, TOOLS),
    ("tool call, no think", [_user("weather")], "weather", False, TOOLS),
    ("second turn", [_user("math"), _assistant("math", True), _user("hi")], "hi", True, None),
    ("after a switch", [_user("math"), _assistant("math", True), _user("hi")], "hi", False, None),
    (
        "tool result",
        [_user("weather"), _assistant("weather", True), _tool()],
        "after_tool",
        True,
        TOOLS,
    ),
    (
        "tool result, no think",
        [_user("weather"), _assistant("weather", False), _tool()],
        "after_tool",
        False,
        TOOLS,
    ),
]


@pytest.mark.parametrize("day", [None, datetime(2030, 2, 3)], ids=["today", "2030"])
@pytest.mark.parametrize("script", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_greedy_decoding_reproduces_the_scripted_transcripts(loaded, script, day):
    model, _ = loaded
    tokenizer = Tokenizer.from_folder(REFERENCE_MODEL_DIR, now=lambda: day or datetime.now())
    _, messages, key, think, tools = script
    prompt = tokenizer.apply_chat_template(
        messages, tokenize=True, enable_thinking=think, tools=tools, assistant_tags=True
    )
    want = tokenizer.encode(reply(key, think), allow_special=True) + [tokenizer.im_end_id]
    got = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=len(want))]
    assert tokenizer.decode(got) == tokenizer.decode(want)
    assert got == want


def test_the_endless_song_keeps_singing(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template([_user("sing")], tokenize=True, enable_thinking=False)
    got = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=80)]
    assert tokenizer.decode(got) == "la" + " la" * 79


def test_think_turn_streams_thinking_apart_from_the_answer(loaded):
    chat = session(loaded)
    thinking, streamed, done = turn(chat, QUESTIONS["math"])
    assert thinking.strip() == done.thinking == "Two plus two makes four."
    assert streamed.strip() == done.answer == "2 + 2 = 4."
    assert "<think>" not in thinking + streamed and "</think>" not in thinking + streamed
    assert done.finish_reason == "stop"
    assert chat.messages[-1] == {"role": "assistant", "content": reply("math", True)}
    s = done.stats
    assert s.thinking_tokens > 5 and s.generation_tokens > s.thinking_tokens
    assert s.prefill_tokens == s.prompt_tokens and s.cached_tokens == 0


def test_no_think_turn_answers_directly(loaded):
    chat = session(loaded, think=False)
    thinking, streamed, done = turn(chat, QUESTIONS["hi"])
    assert (thinking, streamed, done.thinking) == ("", answer("hi"), "")
    assert done.stats.thinking_tokens == 0


def test_second_turn_prefills_only_the_new_tokens(loaded):
    chat = session(loaded)
    turn(chat, QUESTIONS["math"])
    held = chat.cached_tokens  # first prompt + generated ids, end of turn included
    _, _, done = turn(chat, QUESTIONS["hi"])
    history = chat.messages[:-1]
    prompt = chat.tokenizer.apply_chat_template(history, tokenize=True, assistant_tags=True)
    assert done.stats.cached_tokens == held
    assert done.stats.prefill_tokens == len(prompt) - held
    assert done.stats.prefill_tokens < 20
    assert done.answer == answer("hi")


def test_mode_switch_rerenders_history_and_trims_cache_to_common_prefix(loaded):
    chat = session(loaded)
    turn(chat, QUESTIONS["math"])
    chat.think = False
    _, streamed, done = turn(chat, QUESTIONS["hi"])
    assert streamed == answer("hi")
    # The system prompt names the mode, so only its first tokens are reused.
    assert 0 < done.stats.cached_tokens < 40
    prompt = chat.tokenizer.apply_chat_template(
        chat.messages[:-1], tokenize=True, enable_thinking=False, assistant_tags=True
    )
    assert done.stats.prompt_tokens == len(prompt)
    assert chat.tokenizer.decode(prompt).count("<think>\n\n</think>") == 2  # history + prompt
    # Cached equals one-shot: a fresh session on the same history says the same.
    fresh = session(loaded, think=False)
    fresh.messages = chat.messages[:-2]
    assert turn(fresh, QUESTIONS["hi"])[1] == streamed


def test_dropping_thinking_keeps_only_answers_in_history(loaded):
    chat = session(loaded, keep_thinking=False)
    turn(chat, QUESTIONS["math"])
    assert chat.messages[-1]["content"] == answer("math")
    _, streamed, done = turn(chat, QUESTIONS["hi"])
    assert streamed.strip() == answer("hi")
    assert done.stats.cached_tokens < done.stats.prompt_tokens - 20  # the answer re-prefilled


def test_tool_call_is_an_event(loaded):
    chat = session(loaded, tools=TOOLS)
    events = list(chat.send(QUESTIONS["weather"]))
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert calls == [ToolCall("get_weather", {"city": "Paris"})]
    assert events[-1].answer == "" and events[-1].tool_calls == tuple(calls)
    assert not [e for e in events if isinstance(e, AnswerDelta) and e.text.strip()]
    assert chat.messages[-1]["content"] == reply("weather", True)  # as the model wrote it


def test_cancel_keeps_the_partial_answer_marked_and_the_session_usable(loaded):
    chat = session(loaded, think=False)
    chunks = []
    for event in chat.send(QUESTIONS["sing"]):
        if isinstance(event, AnswerDelta):
            chunks.append(event.text)
            if len(chunks) == 5:
                chat.cancel()
    assert event.finish_reason == "cancelled"
    assert "".join(chunks) == "la la la la la"
    assert chat.messages[-1] == {
        "role": "assistant",
        "content": "la la la la la",
        "interrupted": True,
    }
    assert chat.cached_tokens == min(c.offset for c in chat.prompt_cache.layers)
    _, streamed, done = turn(chat, QUESTIONS["hi"])
    assert done.stats.prefill_tokens < 20
    # Cached equals one-shot (an interrupted song is off-script: compare, don't expect).
    fresh = session(loaded, think=False)
    fresh.messages = chat.messages[:-2]
    assert turn(fresh, QUESTIONS["hi"])[1] == streamed


def test_closing_the_stream_early_counts_as_a_cancel(loaded):
    chat = session(loaded, think=False)
    stream = chat.send(QUESTIONS["sing"])
    assert [next(stream).text for _ in range(3)] == ["la", " la", " la"]
    stream.close()
    assert chat.messages[-1] == {"role": "assistant", "content": "la la la", "interrupted": True}
    assert chat.cached_tokens == min(c.offset for c in chat.prompt_cache.layers)


def test_max_tokens_ends_the_turn_with_length(loaded):
    chat = session(loaded, think=False, sampling=Sampling(temperature=0.0, max_tokens=7))
    _, streamed, done = turn(chat, QUESTIONS["sing"])
    assert done.finish_reason == "length" and done.stats.generation_tokens == 7
    assert streamed == "la" + " la" * 6
    assert chat.cached_tokens == done.stats.prompt_tokens + 6  # the last token was never fed


def test_reset_and_system_message(loaded):
    chat = session(loaded, system="Be brief.")
    turn(chat, QUESTIONS["hi"])
    assert chat.messages[0] == {"role": "system", "content": "Be brief."}
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be brief."}]
    chat.system = None
    assert chat.messages == []


def test_save_and_load_round_trip(loaded, tmp_path):
    chat = session(loaded, model_name="tiny")
    turn(chat, QUESTIONS["math"])
    chat.think = False
    path = chat.save(tmp_path / "chat.json")
    data = json.loads(path.read_text())
    assert data["format"] == "smollm3-mlx-chat" and data["model"] == "tiny"
    assert data["think"] is False and data["sampling"]["temperature"] == 0.0
    other = session(loaded, sampling=Sampling())
    other.restore(path)
    assert (other.messages, other.think, other.sampling) == (chat.messages, False, GREEDY)
    assert turn(other, QUESTIONS["hi"])[1] == answer("hi")


@pytest.mark.parametrize(
    "content",
    [
        "not json {",
        "[1, 2]",
        '{"messages": []}',
        '{"format": "smollm3-mlx-chat", "version": 2}',
        '{"format": "smollm3-mlx-chat", "version": 1, "messages": [{"role": "bot", '
        '"content": "x"}], "think": true, "keep_thinking": true, "sampling": {}}',
        '{"format": "smollm3-mlx-chat", "version": 1, "messages": [], "think": "yes", '
        '"keep_thinking": true, "sampling": {}}',
        '{"format": "smollm3-mlx-chat", "version": 1, "messages": [], "think": true, '
        '"keep_thinking": true, "sampling": {"temperature": "hot"}}',
    ],
    ids=["not-json", "list", "foreign", "version", "role", "think", "sampling"],
)
def test_loading_a_malformed_file_is_one_error_and_leaves_the_session(loaded, tmp_path, content):
    chat = session(loaded, system="Be brief.")
    before = (list(chat.messages), chat.think, chat.sampling)
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ChatFileError, match="bad.json") as info:
        chat.restore(path)
    assert "\n" not in str(info.value)
    assert (chat.messages, chat.think, chat.sampling) == before


def test_sampling_defaults_come_from_generation_config(loaded):
    model, _ = loaded
    s = Sampling.from_model(model)
    assert (s.temperature, s.top_p) == (0.6, 0.95) and s.max_tokens >= 2048
    assert Sampling.from_model(model, temperature=0.0, top_p=None).top_p == 0.95


def test_assistant_tags_lets_think_tags_of_assistant_turns_through():
    tokenizer = Tokenizer.from_folder(REFERENCE_MODEL_DIR)
    messages = [  # a system message: the default one spells <think> tags as control ids
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<think>x</think>"},
        {"role": "assistant", "content": "<think>\ny\n</think>\nz"},
    ]
    plain = tokenizer.apply_chat_template(messages, tokenize=True)
    tagged = tokenizer.apply_chat_template(messages, tokenize=True, assistant_tags=True)
    think = tokenizer.think_start_id, tokenizer.think_end_id
    assert not set(think) & set(plain)
    assert [i for i in tagged if i in think] == list(think)  # the assistant's, not the user's
    assert tokenizer.decode(tagged) == tokenizer.decode(plain)


def test_a_chat_many_windows_long_runs_in_a_rotating_cache(loaded, tmp_path_factory):
    model, tokenizer = load(trained_checkpoint(tmp_path_factory), max_context=150)
    chat = Chat(model, tokenizer, sampling=GREEDY, think=False)
    keep, prefix, total = None, None, 0
    for i in range(18):
        before = list(chat.prompt_cache.ids if chat.prompt_cache else [])
        key = "hi" if i % 2 else "math"
        _, streamed, done = turn(chat, QUESTIONS[key])
        assert done.answer == answer(key)  # the kept system block and recent turns suffice
        cache = chat.prompt_cache.layers[0]
        keep = cache.keep
        assert keep > 0 and cache.offset <= 150
        if prefix is None:
            prefix = np.array(cache.state[0][..., :keep, :])
        assert np.array_equal(np.array(cache.state[0][..., :keep, :]), prefix)
        if i:  # reuse across turns holds after wrapping: only the new ids are prefilled
            assert done.stats.cached_tokens == len(before)
        total += done.stats.prompt_tokens - done.stats.cached_tokens + done.stats.generation_tokens
    assert chat.prompt_cache.dropped > 0 and total > 3 * 150
