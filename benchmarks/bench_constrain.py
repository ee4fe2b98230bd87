"""The cost of constrained decoding per generated token, llguidance against xgrammar.

    python benchmarks/bench_constrain.py [--random-tokens 200] [--no-xgrammar] [--step-seconds S]

Both engines are built from the real SmolLM3 tokenizer.json (128,256 tokens) without
transformers: llguidance from the `tokenizers` JSON, xgrammar from the vocabulary (byte-level
BPE). For each grammar, per generated token:

- llguidance: the mask alone (`LLMatcher` into a bitmask) and our whole processor
  (`constrain.AnswerConstraint`: advance the matcher, compute the mask, apply it to a
  (1, 128256) float32 logits row in MLX, evaluated);
- xgrammar: the mask (`GrammarMatcher.fill_next_token_bitmask`) plus `accept_token`.

Token streams: "documents" are valid values tokenized as the tokenizer does (what a model that
follows the format writes); "random" walks pick a uniformly random allowed token at each step
(what a random-weight model writes under the constraint: long strings of odd tokens, the hard
case for a mask). xgrammar runs on the documents only, and a document it rejects is counted.

The share of a decode step divides the processor's time by the full-size model's step as
BENCHMARKS.md measured it (4-bit SmolLM3-3B on this CPU: 0.490 tok/s, so 2.04 s a token;
--step-seconds for another machine's step). The processor does not grow with the model: it is
the same 128,256-entry mask whatever the model size.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from smollm3_mlx import constrain
from smollm3_mlx.grammar import engine, ll_tokenizer, make_answer_grammar, make_response_format
from smollm3_mlx.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(
    os.environ.get("SMOLLM3_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "smollm3-reference")
)
STEP_SECONDS = 1 / 0.490  # BENCHMARKS.md: q4 decode, 5 tokens after 4, smollm3-mlx

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 60},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 6},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string", "maxLength": 60},
                        "city": {"type": "string", "maxLength": 30},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                    },
                    "required": ["street", "city", "zip"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "address"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "maxItems": 12,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 12},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    "price": {"type": "number"},
                },
                "required": ["sku", "qty", "price"],
                "additionalProperties": False,
            },
        },
        "status": {"enum": ["new", "paid", "shipped", "delivered", "returned", "cancelled"]},
    },
    "required": ["id", "customer", "items", "status"],
    "additionalProperties": False,
}
ANY_OBJECT = {"type": "object"}
TOOLS = [
    {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
    {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "limit": {"type": "integer", "minimum": 1, "maximum": 50},
            },
            "required": ["query"],
        },
    },
]
PEOPLE = [
    {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["math", "poetry"]},
    {"name": 'Zoë "Z" Okonkwo-Ñúñez', "age": 41, "tags": ["naïve", "東京", "a\\b", "tab\there"]},
    {"name": "Li Wei", "age": 7, "tags": []},
]
ORDERS = [
    {
        "id": "ORD-004217",
        "customer": {
            "name": "Jean-Pierre Dubois",
            "address": {"street": "12 rue de la Paix", "city": "Paris", "zip": "75002"},
        },
        "items": [
            {"sku": f"SKU-{i:04d}", "qty": i % 7 + 1, "price": round(3.5 * i + 0.99, 2)}
            for i in range(1, 11)
        ],
        "status": "shipped",
    }
]
OBJECTS = [
    {
        "title": "Quarterly report",
        "values": [1, 2.5, -3e-4, True, None],
        "nested": {"deep": {"deeper": ["x", {"k": "v"}]}, "note": "line\nbreak \u00e9\u00e8"},
    }
]
CALLS = [
    {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}},
    {"name": "search", "arguments": {"query": "llguidance vs xgrammar masks", "limit": 5}},
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> str:
    ms = [v * 1e3 for v in values]
    return f"{len(ms):>6} {statistics.median(ms):>8.3f} {percentile(ms, 99):>8.3f} {max(ms):>8.3f}"


def cases(tokenizer: Tokenizer) -> list[tuple[str, str, list[list[int]], dict | None]]:
    """(name, llguidance grammar, documents as ids, the JSON schema for xgrammar or None)."""

    def docs(values: list) -> list[list[int]]:
        return [tokenizer.encode(json.dumps(v, ensure_ascii=False)) for v in values]

    grammar, fmt = make_answer_grammar, make_response_format
    call_ids = [tokenizer.token_to_id("<tool_call>"), tokenizer.token_to_id("</tool_call>")]
    tool_docs = [
        [call_ids[0], *tokenizer.encode("\n" + json.dumps(c) + "\n"), call_ids[1]] for c in CALLS
    ]
    date = "[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    return [
        ("person", grammar(tokenizer, fmt(PERSON)), docs(PEOPLE), PERSON),
        ("order (nested)", grammar(tokenizer, fmt(ORDER)), docs(ORDERS), ORDER),
        ("any object", grammar(tokenizer, fmt(ANY_OBJECT)), docs(OBJECTS), ANY_OBJECT),
        (
            "tool call (2 tools)",
            grammar(tokenizer, None, TOOLS, "required"),
            tool_docs,
            None,  # special tokens around the JSON: not an xgrammar JSON schema
        ),
        (
            "regex (dates)",
            grammar(tokenizer, fmt({"type": "regex", "pattern": f"{date}(, {date})*"})),
            [tokenizer.encode("2026-11-30, 1999-01-01, 2000-02-29")],
            None,
        ),
    ]


def llg_documents(tokenizer, grammar: str, documents: list[list[int]], prompt: list[int]):
    """(mask-only seconds, its CPU seconds, processor seconds) per token over the documents."""
    lt = ll_tokenizer(tokenizer)
    llg = engine()
    bits = np.zeros((lt.vocab_size + 31) // 32, dtype=np.int32)
    masks, cpu, steps = [], [], []
    logits = mx.random.normal((1, lt.vocab_size))
    mx.eval(logits)
    for ids in documents:
        matcher = llg.LLMatcher(lt, grammar, log_level=0)
        for t in ids:
            start, start_cpu = time.perf_counter(), time.thread_time()
            matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            masks.append(time.perf_counter() - start)
            cpu.append(time.thread_time() - start_cpu)
            assert (bits[t // 32] >> (t % 32)) & 1, "a document token outside the grammar"
            matcher.consume_token(t)
        processor = constrain.AnswerConstraint(tokenizer, grammar)
        for k in range(len(ids) + 1):
            tokens = mx.array(prompt + ids[:k], dtype=mx.uint32)
            start = time.perf_counter()
            mx.eval(processor(tokens, logits))
            steps.append(time.perf_counter() - start)
        assert processor.complete
    return masks, cpu, steps


def llg_random_walks(tokenizer, grammar: str, walks: int, tokens: int, seed: int):
    """(mask seconds, its CPU seconds) per token, on walks that pick a random allowed token
    at each step, and how many walks ended (the value complete, end of turn picked)."""
    lt = ll_tokenizer(tokenizer)
    llg = engine()
    bits = np.zeros((lt.vocab_size + 31) // 32, dtype=np.int32)
    eos = set(tokenizer.eos_token_ids)
    rng = np.random.default_rng(seed)
    times, cpu, ended = [], [], 0
    for _ in range(walks):
        matcher = llg.LLMatcher(lt, grammar, log_level=0)
        for _ in range(tokens):
            start, start_cpu = time.perf_counter(), time.thread_time()
            matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            times.append(time.perf_counter() - start)
            cpu.append(time.thread_time() - start_cpu)
            allowed = np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little"))
            t = int(rng.choice(allowed))
            if t in eos:
                ended += 1
                break
            assert matcher.consume_token(t), matcher.get_error()
    return times, cpu, ended


def xgr_documents(info, xgr, schema: dict, documents: list[list[int]]):
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(
        json.dumps(schema), any_whitespace=False, separators=(", ", ": ")
    )
    compile_s = time.perf_counter() - start
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    times, cpu, rejected = [], [], 0
    for ids in documents:
        matcher = xgr.GrammarMatcher(compiled)
        for t in ids:
            start, start_cpu = time.perf_counter(), time.thread_time()
            matcher.fill_next_token_bitmask(mask)
            ok = matcher.accept_token(t)
            times.append(time.perf_counter() - start)
            cpu.append(time.thread_time() - start_cpu)
            if not ok:
                rejected += 1
                break
    return times, cpu, rejected, compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--random-walks", type=int, default=4)
    parser.add_argument("--random-tokens", type=int, default=200, help="most tokens per walk")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-xgrammar", action="store_true")
    parser.add_argument("--step-seconds", type=float, default=STEP_SECONDS)
    args = parser.parse_args()
    print(f"{platform.platform()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    import llguidance

    print(f"llguidance {llguidance.__version__}, mlx {mx.__version__}")

    tokenizer = Tokenizer.from_folder(REFERENCE / "SmolLM3-3B")
    start = time.perf_counter()
    ll_tokenizer(tokenizer)
    print(f"llguidance tokenizer from tokenizer.json: {time.perf_counter() - start:.2f} s")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=True, enable_thinking=False
    )
    xgr = info = None
    if not args.no_xgrammar:
        start = time.perf_counter()
        import xgrammar as xgr

        version = importlib.metadata.version("xgrammar")
        print(f"xgrammar {version}: import {time.perf_counter() - start:.2f} s", end="")
        print(f" (imports torch: {'torch' in sys.modules})")
        start = time.perf_counter()
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        encoded = [""] * tokenizer.vocab_size
        for text, i in vocab.items():
            encoded[i] = text
        info = xgr.TokenizerInfo(
            encoded,
            xgr.VocabType.BYTE_LEVEL,
            vocab_size=tokenizer.vocab_size,
            stop_token_ids=sorted(tokenizer.eos_token_ids),
        )
        print(f"xgrammar tokenizer info from the vocabulary: {time.perf_counter() - start:.2f} s")

    header = f"{'grammar':<22} {'what':<46} {'tokens':>6} {'median':>8} {'p99':>8} {'max':>8}"
    print("\nper generated token, milliseconds\n" + header)
    totals: dict[str, list[float]] = {}
    for name, grammar, documents, schema in cases(tokenizer):
        start = time.perf_counter()
        constrain.AnswerConstraint(tokenizer, grammar)
        made = time.perf_counter() - start
        masks, cpu, steps = llg_documents(tokenizer, grammar, documents, prompt)
        walks, walks_cpu, ended = llg_random_walks(
            tokenizer, grammar, args.random_walks, args.random_tokens, args.seed
        )
        rows = [
            ("llguidance mask, documents", masks),
            ("llguidance mask, documents, CPU time", cpu),
            ("llguidance mask, random walks", walks),
            ("llguidance mask, random walks, CPU time", walks_cpu),
            ("our processor (mask+apply), docs", steps),
        ]
        if info is not None and schema is not None:
            xtimes, xcpu, rejected, compile_s = xgr_documents(info, xgr, schema, documents)
            rows.append((f"xgrammar mask+accept ({rejected} rejected)", xtimes))
            rows.append((f"xgrammar mask+accept, CPU time ({rejected} rejected)", xcpu))
        for what, times in rows:
            print(f"{name:<22} {what:<46} {summary(times)}")
            totals.setdefault(what.split(" (")[0], []).extend(times)
        extra = f", xgrammar compile {compile_s * 1e3:.1f} ms" if schema and info else ""
        print(f"{'':<22} constraint made in {made * 1e3:.1f} ms{extra}; {ended} walks ended")

    print("\nall grammars\n" + header)
    for what, times in totals.items():
        print(f"{'all':<22} {what:<46} {summary(times)}")

    ours = statistics.median(totals["our processor"])
    ours_p99 = percentile(totals["our processor"], 99)
    step = args.step_seconds
    print(
        f"\nshare of a {step:.2f} s decode step (the q4 3B on this CPU, from BENCHMARKS.md): ",
        end="",
    )
    print(f"median {ours / step:.4%}, p99 {ours_p99 / step:.4%}")


if __name__ == "__main__":
    main()
