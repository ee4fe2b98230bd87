"""Startup: process start to ready-for-input of `smollm3-mlx chat` vs `mlx_lm.chat`, same folder.

Each command is started in a pseudo-terminal (pexpect) and timed until its input prompt (the "›"
both print) appears; the runs alternate between the two and the medians are reported, after one
untimed run of each so that the weights are in the page cache for all. Then where our time goes
(imports, building the model, reading the weights, the tokenizer, the chat session) and what
mlx-lm's imports alone cost.

    python benchmarks/bench_startup.py [--bits 4] [--runs 5] [--first-token --baseline DIR]

`smollm3-mlx chat` shows its prompt at once and loads in the background, so ready-for-input no
longer includes the load: --first-token also times Enter (pressed the moment the prompt shows)
to the end of a one-token answer, for this checkout and, with --baseline, for another source
tree of smollm3-mlx (e.g. a worktree of the commit before), so that the two can be compared.

The converted folder is the one benchmarks/bench_generate.py builds (and builds it if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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
from smollm3_mlx import chat, generate, loading, tokenizer
import smollm3_mlx.cli.app
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


def _spawn(command: list[str], folder: Path, source: str | None = None) -> pexpect.spawn:
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    if source:
        env["PYTHONPATH"] = source
    return pexpect.spawn(
        command[0], [*command[1:], str(folder)], env=env, encoding="utf-8", timeout=900
    )


def _end(child: pexpect.spawn) -> None:
    child.kill(signal.SIGKILL)  # this child only
    child.expect(pexpect.EOF)  # waits until it is gone, however loaded the machine
    child.close()


def ready_time(command: list[str], folder: Path) -> float:
    """Seconds from spawning `command folder` to its input prompt."""
    start = time.perf_counter()
    child = _spawn(command, folder)
    try:
        child.expect("›")
        return time.perf_counter() - start
    finally:
        _end(child)


def first_token_time(folder: Path, source: str | None = None) -> tuple[float, float]:
    """(ready for input, Enter to the end of a one-token answer) of `smollm3-mlx chat`, Enter
    pressed the moment the prompt shows; `source`: the smollm3-mlx source tree to run."""
    command = [sys.executable, "-m", "smollm3_mlx.cli", "chat", "--no-think", "--max-tokens",
               "1", "--temp", "0", "--model"]  # fmt: skip
    start = time.perf_counter()
    child = _spawn(command, folder, source)
    try:
        child.expect("›")
        ready = time.perf_counter()
        child.send("Hi.\r")
        child.expect(r"1 tokens?, ")  # the turn's footer
        return ready - start, time.perf_counter() - ready
    finally:
        _end(child)


def wall(code: str, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True)
    return time.perf_counter() - start


def _first_tokens(folder: Path, runs: int, baseline: str | None) -> None:
    sources = {"this checkout": str(Path(__file__).resolve().parents[1])}
    if baseline:
        sources[f"baseline {baseline}"] = str(Path(baseline).resolve())
    first_token_time(folder, sources["this checkout"])  # untimed
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in sources}
    for _ in range(runs):
        for name, source in sources.items():
            times[name].append(first_token_time(folder, source))
    print(f"\nEnter pressed as soon as the prompt shows (`chat --no-think --max-tokens 1`, "
          f"message `Hi.`), median of {runs}:\n")  # fmt: skip
    print("| smollm3-mlx | ready for input (s) | Enter to answer (s) | start to answer (s) |")
    print("|---|---:|---:|---:|")
    for name, t in times.items():
        ready, enter = statistics.median(r for r, _ in t), statistics.median(e for _, e in t)
        total = statistics.median(r + e for r, e in t)
        print(f"| {name} | {ready:.2f} | {enter:.2f} | {total:.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--first-token", action="store_true", help="also time Enter to a token")
    parser.add_argument("--folder", type=Path, help="a model folder (default: the random 3B)")
    parser.add_argument("--baseline", help="another smollm3-mlx source tree, for --first-token")
    args = parser.parse_args()
    folder = args.folder or model_folder(args.bits)

    print(f"# Startup: smollm3-mlx chat vs mlx_lm.chat\n\n{machine()}")
    print("command: python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]))
    for command in COMMANDS.values():  # untimed: the page cache
        ready_time(command, folder)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.runs):
        for name, command in COMMANDS.items():
            times[name].append(ready_time(command, folder))
    ours, theirs = (statistics.median(times[n]) for n in COMMANDS)
    print(f"\nfolder {folder}, median of {args.runs} runs\n")
    print("| command | ready for input (s), median | runs (s) |\n|---|---:|---|")
    for name, runs in times.items():
        print(f"| `{name} --model FOLDER` | {statistics.median(runs):.2f} | "
              f"{', '.join(f'{t:.2f}' for t in runs)} |")  # fmt: skip
    print(f"\nours / mlx_lm.chat: {ours / theirs:.2f} (mlx-lm is {theirs - ours:.2f} s slower)")

    python = statistics.median(wall("pass") for _ in range(args.runs))
    imports = statistics.median(wall("import mlx_lm.chat") for _ in range(args.runs)) - python
    ours_imports = statistics.median(
        wall("import smollm3_mlx.cli.app, smollm3_mlx.chat") for _ in range(args.runs)
    )
    print(f"\nPython start: {python:.2f} s; imports beyond it: mlx_lm.chat {imports:.2f} s, "
          f"smollm3_mlx.cli + chat {ours_imports - python:.2f} s")  # fmt: skip

    if args.first_token:
        _first_tokens(folder, args.runs, args.baseline)

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
