"""Assistant prefill: `continue_final_message` as transformers renders it, and options the
renderer does not know are refused, never dropped."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from checkpoints import REFERENCE_MODEL_DIR, frozen_hf_tokenizer, requires_reference

from smollm3_mlx.tokenizer import ASSISTANT_TAGS, Tokenizer

pytestmark = requires_reference
FROZEN = datetime(2025, 11, 5, 12, 0)

PREFILLS = ["{", '{"city": "Par', "The answer is", "Hello  ", "\n\nLeading newlines", "a\n"]
HISTORY = [
    {"role": "system", "content": "You answer in JSON."},
    {"role": "user", "content": "Weather in Paris?"},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_folder(REFERENCE_MODEL_DIR, now=lambda: FROZEN)


@pytest.fixture(scope="module")
def hf():
    with frozen_hf_tokenizer(FROZEN) as tokenizer:
        yield tokenizer


@pytest.mark.parametrize("think", [True, False], ids=["think", "no_think"])
@pytest.mark.parametrize("prefill", PREFILLS, ids=json.dumps)
def test_continue_final_message_matches_transformers(tok, hf, think, prefill):
    messages = [*HISTORY, {"role": "assistant", "content": prefill}]
    kw = {"enable_thinking": think, "continue_final_message": True}
    expected = hf.apply_chat_template(messages, tokenize=False, **kw)
    assert tok.apply_chat_template(messages, **kw) == expected
    expected_ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
    assert tok.apply_chat_template(messages, tokenize=True, **kw) == expected_ids
    # Left open: no end of turn after the prefill, and no new assistant header
    assert expected_ids[-1] != tok.im_end_id
    assert expected.count("<|im_start|>assistant") == 1


def test_continue_a_cut_off_thinking_answer(tok, hf):
    """A cut-off answer continues inside its think block: the message's open reasoning writes
    the tag as its control id, every other byte as transformers renders it."""
    partial = "<think>\nParis is in France, so"
    messages = [*HISTORY, {"role": "assistant", "content": partial}]
    expected = hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert expected.endswith("<|im_start|>assistant\n" + partial)
    rest = partial.removeprefix("<think>")
    opened = {"role": "assistant", "reasoning_content": rest, "reasoning_open": True}
    ids = tok.apply_chat_template([*HISTORY, opened], tokenize=True, continue_final_message=True)
    assert tok.decode(ids) == expected
    tail = [tok.im_start_id, *tok.encode("assistant\n"), tok.think_start_id, *tok.encode(rest)]
    assert ids[-len(tail) :] == tail
    # The same text as the message's content is plain text
    plain = tok.apply_chat_template(messages, tokenize=True, continue_final_message=True)
    assert tok.think_start_id not in plain and tok.decode(plain) == expected


def test_continue_final_message_refuses_what_transformers_refuses(tok, hf):
    messages = [*HISTORY, {"role": "assistant", "content": "{"}]
    for renderer in (tok, hf):
        with pytest.raises(ValueError, match="add_generation_prompt"):
            renderer.apply_chat_template(
                messages, continue_final_message=True, add_generation_prompt=True
            )
    with pytest.raises(ValueError, match="final message"):
        tok.apply_chat_template([], continue_final_message=True)
    with pytest.raises(ValueError, match="final message"):
        tok.apply_chat_template([{"role": "assistant"}], continue_final_message=True)


def test_unknown_options_are_refused_not_dropped(tok, hf):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TypeError, match="continue_final_mesage, return_dict"):
        tok.apply_chat_template(messages, continue_final_mesage=True, return_dict=True)
    with pytest.raises(TypeError, match="documents"):
        tok.apply_chat_template(messages, documents=[{"title": "a", "text": "b"}])
    # A variable the template reads is a template variable, as in transformers
    rendered = tok.apply_chat_template(messages, custom_instructions="Be brief.")
    assert "Be brief.\n\n" in rendered
    assert rendered == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, custom_instructions="Be brief."
    )


def test_encode_lets_only_the_named_tags_through(tok):
    """How a prefilled answer is tokenized: the tags the model writes itself are control ids,
    every other added token stays text."""
    text = "a<think>b<|im_end|>c</think>"
    ids = tok.encode(text, allow_special=ASSISTANT_TAGS)
    assert ids == [
        *tok.encode("a"),
        tok.think_start_id,
        *tok.encode("b<|im_end|>c"),
        tok.think_end_id,
    ]
    assert tok.im_end_id not in ids and tok.decode(ids) == text


# The Chat and the CLI, on the tiny trained model (it answers QUESTIONS with `reply`)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from trained_model import trained_checkpoint

    from smollm3_mlx.loading import load

    return load(trained_checkpoint(tmp_path_factory))


def _chat(loaded, **kwargs):
    from smollm3_mlx.chat import Chat
    from smollm3_mlx.sample import Sampling

    model, tokenizer = loaded
    return Chat(model, tokenizer, sampling=Sampling(temperature=0.0, top_p=1.0), **kwargs)


def _split(events):
    from smollm3_mlx.events import AnswerDelta, Done, ThinkingDelta

    thinking = "".join(e.text for e in events if isinstance(e, ThinkingDelta))
    answer = "".join(e.text for e in events if isinstance(e, AnswerDelta))
    assert isinstance(events[-1], Done)
    return thinking, answer, events[-1]


def _clean_cut(tok, text: str, at: int) -> str:
    """A prefix of `text` of about `at` tokens that tokenizes as it does inside `text`."""
    ids = tok.encode(text, allow_special=ASSISTANT_TAGS)
    while tok.encode(tok.decode(ids[:at]), allow_special=ASSISTANT_TAGS) != ids[:at]:
        at += 1
    return tok.decode(ids[:at])


def _streams(text: str) -> tuple[str, str]:
    """(thinking, answer) as the events stream `text`: split at the tags, tags left out."""
    if "</think>" not in text:
        return "", text
    thinking, answer = text.split("</think>")
    return thinking.removeprefix("<think>"), answer


@pytest.mark.parametrize("think", [True, False], ids=["think", "no_think"])
def test_send_with_prefill_continues_the_answer(loaded, think):
    from trained_model import QUESTIONS, THOUGHTS, assistant, reply

    chat = _chat(loaded, think=think)
    full = reply("hi", think)
    prefill = _clean_cut(chat.tokenizer, full, 4 if think else 2)
    # A prefill names the think tag as the model writes it: the message opens its reasoning
    start = {"reasoning_content": prefill.removeprefix("<think>"), "reasoning_open": True}
    opened = [
        {"role": "user", "content": QUESTIONS["hi"]},
        {"role": "assistant", **(start if think else {"content": prefill})},
    ]
    prompt = chat.tokenizer.apply_chat_template(
        opened, tokenize=True, continue_final_message=True, enable_thinking=think
    )
    thinking, answer, done = _split(list(chat.send(QUESTIONS["hi"], prefill=prefill)))
    # The prefill streams first, as if the model had written it; the model went on from there
    assert (thinking, answer) == _streams(full)
    assert (done.thinking, done.answer) == (THOUGHTS["hi"] if think else "", "Hi! How can I help?")
    assert chat.messages[-1] == assistant("hi", think)
    # What the model read: the answer left open after the prefill, as transformers renders it
    assert done.stats.prompt_tokens == len(prompt) and prompt[-1] != chat.tokenizer.im_end_id


def test_continue_answer_finishes_a_cut_off_answer(loaded):
    from trained_model import QUESTIONS, assistant, reply

    full = reply("hi", True)
    chat = _chat(loaded, think=True)
    start = _clean_cut(chat.tokenizer, full, 6)
    chat.sampling = chat.sampling.updated(
        max_tokens=len(chat.tokenizer.encode(start, allow_special=ASSISTANT_TAGS))
    )
    *_, first = chat.send(QUESTIONS["hi"])
    assert first.finish_reason == "length"
    cut = {"reasoning_content": start.removeprefix("<think>"), "reasoning_open": True}
    assert chat.messages[-1] == {"role": "assistant", **cut, "content": ""}

    chat.sampling = chat.sampling.updated(max_tokens=64)
    thinking, answer, done = _split(list(chat.continue_answer()))
    assert done.finish_reason == "stop"
    assert (thinking, answer) == _streams(full[len(start) :])  # only what was added streams
    assert done.answer == "Hi! How can I help?"  # Done holds the whole answer
    assert chat.messages[-1] == assistant("hi", True)


def test_continue_answer_needs_an_answer_to_continue(loaded):
    chat = _chat(loaded)
    with pytest.raises(TypeError, match="prefill"):
        chat.send("hi", prefill=123)  # type: ignore[arg-type]
    assert chat.messages == []
    with pytest.raises(ValueError, match="nothing to continue"):
        chat.continue_answer()
    chat.messages.append({"role": "user", "content": "hi"})
    with pytest.raises(ValueError, match="nothing to continue"):
        chat.continue_answer()


def _cli(*args: str):
    import os
    import subprocess
    import sys

    from checkpoints import REPO_ROOT

    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "smollm3_mlx.cli", "generate", "--temp", "0", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path, "COLUMNS": "200"},
        timeout=300,
    )


def test_cli_generate_prefill_prints_the_whole_answer(tmp_path_factory):
    from trained_model import ANSWERS, QUESTIONS, THOUGHTS, trained_checkpoint

    model = str(trained_checkpoint(tmp_path_factory))
    r = _cli("-m", model, "--no-think", "--prefill", "Hi!", QUESTIONS["hi"])
    assert (r.returncode, r.stdout) == (0, ANSWERS["hi"] + "\n"), r.stderr
    r = _cli("-m", model, "--format", "json", "--prefill", "<think>\nThe user", QUESTIONS["hi"])
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert (data["thinking"], data["answer"]) == (THOUGHTS["hi"], ANSWERS["hi"])
    r = _cli("-m", model, "--raw", "--prefill", "{", "<|im_start|>user\nhi")
    assert r.returncode == 2 and r.stdout == "" and "--prefill" in r.stderr
