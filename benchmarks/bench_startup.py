"""Startup: process start to ready-for-input of `smollm3-mlx chat` vs `mlx_lm.chat`, same folder.

Each command is started in a pseudo-terminal (pexpect) and timed until its input prompt (the "›"
both print) appears; the runs alternate between the two and the medians are reported, after one
untimed run of each so that the weights are in the page cache for all. Then where our time goes
(imports, building the model, reading the weights, the tokenizer, the chat session) and what
mlx-lm's imports alone cost.

    python benchmarks/bench_startup.py [--bits 4] [--runs 5]

The converted folder is the one benchmarks/bench_generate.py builds (and builds it if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pexpect

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import machine, model_folder  # noqa: E402

BIN = Path(sys.executable).parent
COMMANDS = {
    "smollm3-mlx chat": [str(BIN / "smollm3-mlx"), "chat", "--model"],
    "mlx_lm.chat": [str(BIN / "mlx_lm.chat"), "--model"],
}
# Where our startup goes, timed inside one process (argv[1]: the folder).
BREAKDOWN = """
import json, sys, time
t = [time.perf_counter()]
import mlx.core as mx
t.append(time.perf_counter())
from smollm3_mlx import chat, cli, generate, loading, tokenizer
t.append(time.perf_counter())
model = loading.load_model(sys.argv[1], lazy=True)
t.append(time.perf_counter())
mx.eval(model.parameters())
t.append(time.perf_counter())
tok = tokenizer.Tokenizer.from_folder(sys.argv[1])
t.append(time.perf_counter())
session = chat.Chat(model, tok)
t.append(time.perf_counter())
heavy = [m for m in ("transformers", "torch", "mlx_lm") if m in sys.modules]
print(json.dumps({"steps": [b - a for a, b in zip(t, t[1:])], "heavy": heavy}))
"""
STEPS = ["import mlx.core", "import smollm3_mlx (cli, chat, ...)", "build model, read headers",
         "read the weights (mx.eval)", "tokenizer", "chat session"]  # fmt: skip


def ready_time(command: list[str], folder: Path) -> float:
    """Seconds from spawning `command folder` to its input prompt."""
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    start = time.perf_counter()
    child = pexpect.spawn(
        command[0], [*command[1:], str(folder)], env=env, encoding="utf-8", timeout=900
    )
    try:
        child.expect("›")
        seconds = time.perf_counter() - start
    finally:
        child.close(force=True)  # this child only
    return seconds


def wall(code: str, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    folder = model_folder(args.bits)

    print(f"# Startup: smollm3-mlx chat vs mlx_lm.chat\n\n{machine()}")
    print("command: python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]))
    for command in COMMANDS.values():  # untimed: the page cache
        ready_time(command, folder)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.runs):
        for name, command in COMMANDS.items():
            times[name].append(ready_time(command, folder))
    ours, theirs = (statistics.median(times[n]) for n in COMMANDS)
    print(f"\nq{args.bits} folder {folder}, median of {args.runs} runs\n")
    print("| command | ready for input (s), median | runs (s) |\n|---|---:|---|")
    for name, runs in times.items():
        print(f"| `{name} --model FOLDER` | {statistics.median(runs):.2f} | "
              f"{', '.join(f'{t:.2f}' for t in runs)} |")  # fmt: skip
    print(f"\nours / mlx_lm.chat: {ours / theirs:.2f} (mlx-lm is {theirs - ours:.2f} s slower)")

    python = statistics.median(wall("pass") for _ in range(args.runs))
    imports = statistics.median(wall("import mlx_lm.chat") for _ in range(args.runs)) - python
    ours_imports = statistics.median(
        wall("import smollm3_mlx.cli, smollm3_mlx.chat") for _ in range(args.runs)
    )
    print(f"\nPython start: {python:.2f} s; imports beyond it: mlx_lm.chat {imports:.2f} s, "
          f"smollm3_mlx.cli + chat {ours_imports - python:.2f} s")  # fmt: skip

    steps = []
    for _ in range(args.runs):
        out = subprocess.run(
            [sys.executable, "-c", BREAKDOWN, str(folder)], check=True, capture_output=True,
            text=True,
        )  # fmt: skip
        result = json.loads(out.stdout.strip().splitlines()[-1])
        steps.append(result["steps"])
    print(f"\nWhere our startup goes (in one process, median of {args.runs}; heavy modules "
          f"imported: {result['heavy'] or 'none'}):\n")  # fmt: skip
    print("| step | seconds |\n|---|---:|")
    for i, step in enumerate(STEPS):
        print(f"| {step} | {statistics.median(s[i] for s in steps):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
