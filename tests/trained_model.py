"""A tiny SmolLM3 trained in seconds to reproduce scripted transcripts, for chat and CLI tests.

Random weights never emit `</think>`, so the chat path cannot be tested honestly with them. This
trains transformers' SmolLM3 (torch: MLX's CPU matmul is ~20x slower here) over a small vocabulary
(the ids the scripted conversations use, remapped), then scatters its embedding into the real
128256-row vocabulary. Every other row is the small model's UNK row: as input it reads as
"unknown", and through the tied output head all those rows share UNK's logit, which training
pushes down with the weight of all of them (a log(count) bonus in the loss), so neither greedy
decoding nor sampling picks one. Prompts are rendered on random dates, so the model ignores the
date line. `save_pretrained` writes a normal SmolLM3 checkpoint (config.json as transformers
writes it, model.safetensors) beside the real tokenizer files and generation_config.json.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from datetime import datetime
from pathlib import Path

from checkpoints import REFERENCE_MODEL_DIR, TOKENIZER_FILES

TOOLS = [  # the schemas of examples/tools.py's two functions (tests check they still are)
    {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city's name, for example Paris."}
            },
            "required": ["city"],
        },
    },
    {
        "name": "to_fahrenheit",
        "description": "Convert a temperature from degrees Celsius to degrees Fahrenheit.",
        "parameters": {
            "type": "object",
            "properties": {
                "celsius": {"type": "number", "description": "The temperature in degrees Celsius."}
            },
            "required": ["celsius"],
        },
    },
]
QUESTIONS = {
    "math": "What is 2+2?",
    "hi": "Say hi.",
    "sing": "Sing me a song.",
    "weather": "What is the weather in Paris?",
}
TOOL_RESULT = '{"temperature": 22, "condition": "sunny"}'  # get_weather's answer, for "after_tool"
THOUGHTS = {
    "math": "Two plus two makes four.",
    "hi": "The user wants a greeting.",
    "sing": "A song it is.",
    "weather": "I should call the weather tool.",
    "after_tool": "The tool says it is sunny.",
}
ANSWERS = {
    "math": "2 + 2 = 4.",
    "hi": "Hi! How can I help?",
    "sing": "la" + " la" * 47,  # the song never ends: it is what Ctrl-C tests interrupt
    "weather": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "after_tool": "It is sunny and 22 degrees in Paris.",
}
ENDLESS = {"sing"}
STEPS, LR, CLIP = 300, 5e-3, 1.0
CONFIG = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)


def reply(key: str, think: bool) -> str:
    """What the trained model answers to QUESTIONS[key] (generated text, end of turn excluded)."""
    return f"<think>\n{THOUGHTS[key]}\n</think>\n{ANSWERS[key]}" if think else ANSWERS[key]


def answer(key: str) -> str:
    return ANSWERS[key]


CALLS = {"weather": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}


def assistant(key: str, think: bool, *, keep_thinking: bool = True) -> dict:
    """The assistant message of `reply(key, think)` as a Chat keeps it: thinking, answer and
    tool calls apart, each text as the model wrote it."""
    message: dict = {"role": "assistant"}
    if think and keep_thinking:
        message["reasoning_content"] = f"\n{THOUGHTS[key]}\n"
    calls = CALLS.get(key)
    text = "" if calls else ANSWERS[key]
    message["content"] = ("\n" if think and keep_thinking else "") + text
    return message | ({"tool_calls": calls} if calls else {})


def _conversations(rng: random.Random):
    """(history, key, think, tools): every one- and two-turn history over math/hi, both modes,
    and the weather tool: its call, and the answer once its result is in."""
    past = [(k, t, keep) for k in ("math", "hi") for t, keep in ((1, 1), (1, 0), (0, 1))]
    histories = [[]] + [[p] for p in past] + [[p, q] for p in past for q in past]
    for history in histories:
        for key in ("math", "hi", "sing"):
            for think in (True, False):
                yield history, key, think, None
    for think in (True, False):
        for _ in range(6):
            yield [], "weather", think, TOOLS
            yield [rng.choice(past)], "weather", think, TOOLS
            yield [("weather", int(think), 1)], "after_tool", think, TOOLS


def _messages(history, key):
    messages = []
    for k, t, keep in history:
        messages += [
            {"role": "user", "content": QUESTIONS[k]},
            assistant(k, bool(t), keep_thinking=bool(keep)),
        ]
    if key == "after_tool":  # the last turn's tool call answered
        return messages + [{"role": "tool", "content": TOOL_RESULT}]
    return messages + [{"role": "user", "content": QUESTIONS[key]}]


def _random_date(rng: random.Random) -> datetime:
    return datetime(rng.randint(2024, 2031), rng.randint(1, 12), rng.randint(1, 28))


def _examples(tokenizer, rng: random.Random, copies: int = 2):
    """(prompt ids, target ids) for each conversation, each rendered on random dates."""
    out = []
    for history, key, think, tools in _conversations(rng):
        target = tokenizer.encode(reply(key, think), allow_special=True)
        if key not in ENDLESS:
            target.append(tokenizer.im_end_id)
        for _ in range(copies):
            day = _random_date(rng)
            tokenizer.now = lambda day=day: day
            prompt = tokenizer.apply_chat_template(
                _messages(history, key),
                tokenize=True,
                enable_thinking=think,
                tools=tools,
            )
            out.append((prompt, target))
    return out


def _train(examples, n_vocab: int, n_unused: int, *, steps: int, seed: int):
    """Train a small-vocabulary SmolLM3 until greedy decoding reproduces every example."""
    import torch
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    torch.manual_seed(seed)
    config = SmolLM3Config(
        vocab_size=n_vocab,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **CONFIG,
    )
    model = SmolLM3ForCausalLM(config)
    # Row 0 (UNK) stands for every unused row of the full vocabulary: count them all in softmax.
    bonus = torch.zeros(n_vocab)
    bonus[0] = math.log(n_unused)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=steps)
    rng = random.Random(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than 2 on a 2-core machine shared with other work

    def step(i: int, pool) -> torch.Tensor:
        # The answer depends on the last few prompt tokens (question, mode), so most steps train
        # on windows ending there (cheap); every 4th on whole prompts, so that the rest is
        # known as noise.
        batch = rng.sample(pool, min(len(pool), 4 if i % 4 == 0 else 16))
        rows = [
            p[0 if i % 4 == 0 else max(0, len(p) - rng.randint(24, 96)) :] + t for p, t in batch
        ]
        x, y, w = _batch(rows, [len(t) for _, t in batch])
        logits = model(x).logits + bonus
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")
        loss = (losses * w).sum() / w.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        return loss

    for i in range(steps):
        loss = step(i, examples)
        schedule.step()
    # Greedy decoding must be exact: polish on the conversations still wrong, if any.
    for _ in range(4):
        wrong = _wrong(model, examples[::2])
        if not wrong:
            break
        for group in optimizer.param_groups:
            group["lr"] = LR / 10
        for i in range(1, 41):
            loss = step(i, wrong + rng.sample(examples, 16))
    torch.set_num_threads(threads)
    return model, loss.item()


def _batch(rows, n_targets):
    """Right-padded (inputs, targets, loss weights) for next-token prediction."""
    import torch

    width = max(map(len, rows)) - 1
    x = torch.zeros((len(rows), width), dtype=torch.long)
    y, w = torch.zeros_like(x), torch.zeros(x.shape)
    for j, (row, n) in enumerate(zip(rows, n_targets, strict=True)):
        x[j, : len(row) - 1] = torch.tensor(row[:-1])
        y[j, : len(row) - 1] = torch.tensor(row[1:])
        w[j, len(row) - 1 - n : len(row) - 1] = 1.0
    return x, y, w


def _wrong(model, examples):
    """The examples whose targets are not all the argmax (teacher forcing = greedy decoding)."""
    import torch

    wrong = []
    with torch.no_grad():
        for k in range(0, len(examples), 16):
            chunk = examples[k : k + 16]
            x, y, w = _batch([p + t for p, t in chunk], [len(t) for _, t in chunk])
            ok = (model(x).logits.argmax(-1) == y) | (w == 0)
            wrong += [e for e, good in zip(chunk, ok.all(1).tolist(), strict=True) if not good]
    return wrong


def build_trained_checkpoint(path: Path, *, steps: int = STEPS, seed: int = 0) -> Path:
    """Train the tiny model and save it at `path` as a SmolLM3 checkpoint; returns `path`."""
    import torch
    from transformers import SmolLM3ForCausalLM

    from smollm3_mlx.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(REFERENCE_MODEL_DIR)
    rng = random.Random(seed)
    examples = _examples(tokenizer, rng)
    used = sorted({i for p, t in examples for i in p + t})
    to_small = {full: small for small, full in enumerate(used, start=1)}  # 0 is UNK
    small = [([to_small[i] for i in p], [to_small[i] for i in t]) for p, t in examples]
    full_vocab = tokenizer.vocab_size
    trained, loss = _train(small, len(used) + 1, full_vocab - len(used), steps=steps, seed=seed)

    config = trained.config
    config.vocab_size = full_vocab
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 128000, 128012, 128004
    full = SmolLM3ForCausalLM(config)
    state = trained.state_dict()
    rows = torch.zeros(full_vocab, dtype=torch.long)  # full id -> small row, UNK (0) if unused
    rows[used] = torch.arange(1, len(used) + 1)
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][rows]
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    full.load_state_dict(state)
    full.save_pretrained(path)
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        shutil.copy(REFERENCE_MODEL_DIR / name, path / name)
    (path / "training.json").write_text(json.dumps({"loss": loss, "steps": steps}) + "\n")
    return path


_BUILT: dict[str, Path] = {}


def trained_checkpoint(tmp_path_factory) -> Path:
    """The trained checkpoint, built once per test session."""
    if "path" not in _BUILT:
        _BUILT["path"] = build_trained_checkpoint(tmp_path_factory.mktemp("trained") / "model")
    return _BUILT["path"]
