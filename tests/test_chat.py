"""The chat session, on a tiny SmolLM3 trained to reproduce scripted transcripts."""

from __future__ import annotations

import json
from datetime import datetime

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import REFERENCE_MODEL_DIR, requires_reference
from trained_model import (
    QUESTIONS,
    TOOL_RESULT,
    TOOLS,
    answer,
    assistant,
    reply,
    trained_checkpoint,
)

from smollm3_mlx import step
from smollm3_mlx.chat import Chat
from smollm3_mlx.chat_file import ChatFileError
from smollm3_mlx.events import AnswerDelta, Done, ThinkingDelta, ToolCall
from smollm3_mlx.loading import load
from smollm3_mlx.sample import Sampling
from smollm3_mlx.step import generate_step
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
    return assistant(key, think)


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
        messages, tokenize=True, enable_thinking=think, tools=tools
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
    assert chat.messages[-1] == assistant("math", True)
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
    prompt = chat.tokenizer.apply_chat_template(history, tokenize=True)
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
        chat.messages[:-1], tokenize=True, enable_thinking=False
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
    assert chat.messages[-1] == assistant("weather", True)  # as the model wrote it


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


def test_a_turn_cancelled_during_its_prefill_counts_the_prompt_tokens_it_read(loaded, monkeypatch):
    """The stats line after Ctrl-C in a long prefill says how much of the prompt was read."""
    monkeypatch.setattr(step, "default_prefill_step", lambda model: 8)
    seen = []

    def progress(done, total):
        seen.append((done, total))
        if done >= 16 and not cancelled:  # the first turn only
            cancelled.append(done)
            chat.cancel()

    cancelled: list[int] = []

    chat = session(loaded, think=False, prompt_progress=progress)
    *_, done = chat.send(QUESTIONS["hi"] + " Please." * 30)
    assert isinstance(done, Done) and done.finish_reason == "cancelled"
    total = seen[-1][1]
    assert seen[-1][0] == 16 < total - 8 and done.stats.prompt_tokens == total
    assert done.stats.prefill_tokens == 16 == chat.prompt_cache.offset
    *_, again = chat.send(QUESTIONS["hi"])  # the next turn reads the rest
    assert again.stats.cached_tokens == 16 and again.stats.prefill_tokens > total - 16


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


def test_the_async_entry_points_take_what_their_sync_twins_take(loaded):
    import asyncio

    chat = session(loaded)

    async def first(events):
        return await events.__anext__()

    with pytest.raises(TypeError):
        chat.send_tool_result("22 degrees", think_budget=5)
    with pytest.raises(TypeError):  # it took a budget the sync one refuses
        asyncio.run(first(chat.asend_tool_result("22 degrees", think_budget=5)))
    with pytest.raises(TypeError):
        asyncio.run(first(chat.asend("hi", budget=5)))
    assert chat.messages == []  # nothing was added


def test_a_saved_chat_keeps_its_thinking_budget_hand_off_and_tool_choice(loaded, tmp_path):
    settings = {"think_budget": 3, "handoff": "\n", "tool_choice": "none"}
    chat = session(loaded, **settings)
    path = chat.save(tmp_path / "chat.json")
    model, _ = loaded
    back = Chat.load(path, model, sampling=GREEDY)
    assert {k: getattr(back, k) for k in settings} == settings
    _, _, done = turn(back, QUESTIONS["math"])
    assert done.stats.thinking_tokens == 3  # the budget holds in the restored chat
    given = Chat.load(path, model, think_budget=None, tool_choice="auto")  # given now: they win
    assert (given.think_budget, given.handoff, given.tool_choice) == (None, "\n", "auto")
    data = json.loads(path.read_text())
    for key in settings:  # a file saved before these settings: the Chat keeps its own
        del data[key]
    path.write_text(json.dumps(data))
    older = session(loaded, **settings)
    older.restore(path)
    assert {k: getattr(older, k) for k in settings} == settings


@pytest.mark.parametrize(
    "field, value",
    [("think_budget", -1), ("think_budget", True), ("think_budget", "5"), ("handoff", 5),
     ("tool_choice", 3), ("tool_choice", {"function": "get_weather"})],
)  # fmt: skip
def test_a_saved_setting_of_the_wrong_kind_is_one_error_naming_it(loaded, tmp_path, field, value):
    path = session(loaded).save(tmp_path / "chat.json")
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    settings = {"think_budget": 7, "handoff": "Enough.", "tool_choice": "required"}
    chat = session(loaded, **settings)
    with pytest.raises(ChatFileError, match=f"'{field}' must be") as info:
        chat.restore(path)
    assert "\n" not in str(info.value)
    assert {k: getattr(chat, k) for k in settings} == settings  # nothing changed


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


def test_only_an_assistant_turns_structure_writes_think_tags():
    tokenizer = Tokenizer.from_folder(REFERENCE_MODEL_DIR)
    messages = [  # a system message: the default one spells <think> tags as control ids
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<think>x</think>"},
        {"role": "assistant", "reasoning_content": "\ny <think>\n", "content": "\nz</think>"},
    ]
    as_text = [
        *messages[:2],
        {"role": "assistant", "content": "<think>\ny <think>\n</think>\nz</think>"},
    ]
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    plain = tokenizer.apply_chat_template(as_text, tokenize=True)
    think = tokenizer.think_start_id, tokenizer.think_end_id
    assert not set(think) & set(plain)
    assert [i for i in ids if i in think] == list(think)  # the structure's, not the texts'
    assert tokenizer.decode(ids) == tokenizer.decode(plain)


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


# Misuse: a random tiny model with a tiny tokenizer is enough where nothing is generated.
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from checkpoints import make_tiny_checkpoint

    return load(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "m", num_hidden_layers=2))


def saved_conversation(tiny, path):
    chat = Chat(*tiny, model_name="tiny", sampling=GREEDY)
    chat.messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    return chat.save(path)


SAVE_ON_A_FULL_DISK = """
import errno, resource, signal, sys
from smollm3_mlx import load
from smollm3_mlx.chat import Chat

chat = Chat(*load(sys.argv[1]))
chat.messages = [{"role": "user", "content": "x" * 50_000}]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that writes fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # the disk fills up midway
try:
    chat.save(sys.argv[2])
except OSError as e:
    sys.exit(f"error: {errno.errorcode[e.errno]}")
"""


def test_a_save_that_fails_midway_leaves_the_earlier_file_whole(tiny, tmp_path):
    import os
    import subprocess
    import sys

    from checkpoints import REPO_ROOT

    path = saved_conversation(tiny, tmp_path / "chat.json")
    before = path.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    model_dir = tiny[0].info.path
    proc = subprocess.run(
        [sys.executable, "-c", SAVE_ON_A_FULL_DISK, str(model_dir), str(path)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.stderr.strip() == "error: EFBIG"
    assert path.read_bytes() == before  # not cut at the limit: the old save, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json"]  # no temporary left
    Chat(*tiny).restore(path)


def test_save_replaces_the_file_keeping_its_permissions(tiny, tmp_path):
    path = saved_conversation(tiny, tmp_path / "chat.json")
    assert path.stat().st_mode & 0o777 == 0o644
    path.chmod(0o600)
    saved_conversation(tiny, path)
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("text", [123, None, b"hi", {"content": "hi"}, ["hi"]])
def test_send_takes_text_only_and_says_so_at_the_call(tiny, text):
    chat = Chat(*tiny)
    with pytest.raises(
        TypeError, match=f"^the user's message must be a str, not {type(text).__name__} "
    ):
        chat.send(text)  # the call itself, not the first event
    assert chat.messages == []
    with pytest.raises(TypeError, match="^the system message must be a str or None"):
        chat.system = text or 1


def get_weather(city: str) -> str:
    """Get the weather in a city."""
    return "sunny"


@pytest.mark.parametrize(
    "tools, shown, hint",
    [
        ("get_weather", "str ('get_weather')", "[get_weather]"),
        (get_weather, "function (<function get_weather", "[get_weather]"),
        ({"name": "get_weather"}, "dict ({'name': 'get_weather'})", "[...]"),
        (42, "int (42)", "[...]"),
    ],
)
def test_tools_not_given_as_a_list_say_what_was_given(tiny, tools, shown, hint):
    with pytest.raises(TypeError) as info:
        Chat(*tiny, tools=tools)
    message = str(info.value)
    assert message.startswith(f"tools must be a list of functions or JSON schemas, not {shown}"), (
        message
    )
    assert message.endswith(f"; pass tools={hint}")
    chat = Chat(*tiny)
    with pytest.raises(TypeError):
        chat.set_tools("get_weather")


TEMPERATURE = "temperature must be a finite number >= 0 (0 is greedy), not "


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(max_tokens=-5), "max_tokens must be a whole number >= 1, not -5"),
        (dict(max_tokens=0), "max_tokens must be a whole number >= 1, not 0"),
        (dict(temperature=-1), TEMPERATURE + "-1"),
        (dict(temperature=float("nan")), TEMPERATURE + "nan"),
        (dict(top_p=2), "top_p must be a number in (0, 1] (1 keeps all tokens), not 2"),
        (dict(top_k=-1), "top_k must be a whole number >= 0 (0 keeps all tokens), not -1"),
        (dict(min_p=1.5), "min_p must be a number in [0, 1] (0 keeps all tokens), not 1.5"),
        (dict(repetition_penalty=0), "repetition_penalty must be a finite number > 0 (1 is off), "
                                     "not 0"),
        (dict(prompt_lookup=-3), "prompt_lookup must be a whole number >= 0, not -3"),
        (dict(kv_start=-1), "kv_start must be a whole number >= 0, not -1"),
        (dict(max_context=0), "max_context must be a whole number >= 1, not 0"),
        (dict(sampling=None, temperature=True), TEMPERATURE + "True"),
    ],
)  # fmt: skip
def test_numeric_parameters_out_of_range_are_one_line_at_the_call(tiny, options, message):
    with pytest.raises(ValueError) as info:
        Chat(*tiny, **options)
    assert str(info.value) == message


def test_sampling_refuses_values_out_of_range():
    assert Sampling(temperature=0, top_p=1, top_k=0, min_p=0, max_tokens=1, seed=0) is not None
    for field, value in [("seed", -1), ("seed", 2**64), ("top_p", 0), ("max_tokens", 2.0),
                         ("temperature", float("inf")), ("top_k", 1.5)]:  # fmt: skip
        with pytest.raises(ValueError, match=f"^{field} must be "):
            Sampling(**{field: value})
        with pytest.raises(ValueError, match=f"^{field} must be "):
            Sampling().updated(**{field: value})


def _without(key):
    return lambda d: d.pop(key)


def _set(path, value):
    def edit(d):
        *where, last = path
        for k in where:
            d = d[k]
        d[last] = value

    return edit


@pytest.mark.parametrize(
    "edit, problem",
    [
        (_without("model"), "'model' is missing or not a string"),
        (_without("think"), "'think' is missing or not true or false"),
        (_without("messages"), "'messages' is missing or not a list"),
        (_without("sampling"), "'sampling' is missing or not an object"),
        (_without("format"), 'no "format": \'smollm3-mlx-chat\''),
        (_without("version"), "version None, not 2"),
        (_set(["version"], True), "version True, not 2"),
        (_set(["model"], 7), "'model' is missing or not a string"),
        (_set(["sampling", "temperature"], float("nan")), "sampling: " + TEMPERATURE + "nan"),
        (_set(["sampling", "temperature"], -5), "sampling: " + TEMPERATURE + "-5"),
        (_set(["sampling", "top_p"], 7),
         "sampling: top_p must be a number in (0, 1] (1 keeps all tokens), not 7"),
        (_set(["sampling", "max_tokens"], 1e400),
         "sampling: max_tokens must be a whole number >= 1, not inf"),
        (_set(["sampling", "hot"], 1), "unknown sampling field 'hot'"),
        (_set(["messages", 0, "content"], 123), "message 0 has no text content"),
        (_set(["messages", 1, "mood"], "x"), "message 1 has an unknown field 'mood'"),
        (_set(["messages", 1, "interrupted"], "yes"), "message 1: 'interrupted' is not bool"),
        (_set(["messages", 0], "hi"), "message 0 is not an object"),
        (_set(["tools"], "get_weather"), "'tools' is not a list"),
    ],
)  # fmt: skip
def test_every_missing_or_wrong_field_of_a_chat_file_is_one_line(tiny, tmp_path, edit, problem):
    path = saved_conversation(tiny, tmp_path / "chat.json")
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    chat = Chat(*tiny, system="Be brief.")
    before = (list(chat.messages), chat.think, chat.sampling)
    with pytest.raises(ChatFileError) as info:
        chat.restore(path)
    assert str(info.value) == f"{path}: not a smollm3-mlx conversation ({problem})"
    assert (chat.messages, chat.think, chat.sampling) == before


def test_text_that_is_not_text_is_read_with_replacement_characters(tiny, tmp_path):
    """Lone surrogates (bytes that were not UTF-8, half a pair) in what a Chat is given become
    U+FFFD, with one warning; the turn runs and the conversation can be saved."""
    from smollm3_mlx.chat_file import NotTextWarning

    chat = Chat(*tiny, sampling=GREEDY.updated(max_tokens=2))
    with pytest.warns(NotTextWarning, match="the system message is not valid text"):
        chat.system = "Be \udcff brief."
    with pytest.warns(NotTextWarning) as warned:
        *_, done = chat.send("a\ud800", prefill="x\udce9")
    said = sorted(str(w.message).split(" is ")[0] for w in warned)
    assert said == ["the prefill", "the user's message"]
    assert isinstance(done, Done)
    with pytest.warns(NotTextWarning, match="a tool result is not valid text"):
        list(chat.send_tool_result("\ud800"))
    assert [m["content"][:3] for m in chat.messages[:2]] == ["Be ", "a\ufffd"]
    assert chat.messages[2]["content"].startswith("x\ufffd")  # the prefill, then the model's
    assert chat.messages[3] == {"role": "tool", "content": "\ufffd"}
    Chat(*tiny).restore(chat.save(tmp_path / "chat.json"))
