"""Assistant prefill: `continue_final_message` as transformers renders it, and options the
renderer does not know are refused, never dropped."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from checkpoints import REFERENCE_MODEL_DIR, requires_reference

from smollm3_mlx.tokenizer import Tokenizer

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
    from transformers import AutoTokenizer
    from transformers.utils import chat_template_utils

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return FROZEN

    saved = chat_template_utils.datetime
    chat_template_utils.datetime = Frozen
    yield AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    chat_template_utils.datetime = saved


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
    """A cut-off answer continues inside its think block: with assistant_tags the tag the model
    wrote is its control id again, every other byte as transformers renders it."""
    partial = "<think>\nParis is in France, so"
    messages = [*HISTORY, {"role": "assistant", "content": partial}]
    expected = hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert expected.endswith("<|im_start|>assistant\n" + partial)
    ids = tok.apply_chat_template(
        messages, tokenize=True, continue_final_message=True, assistant_tags=True
    )
    assert tok.decode(ids) == expected
    rest = partial.removeprefix("<think>")
    tail = [tok.im_start_id, *tok.encode("assistant\n"), tok.think_start_id, *tok.encode(rest)]
    assert ids[-len(tail) :] == tail
    # Without assistant_tags the same text is plain text
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
