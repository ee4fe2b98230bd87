"""All terminal rendering (rich) lives here; the rest of the package never prints."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from ..events import AnswerDelta, Done, Error, Event, ThinkingDelta, ToolCall, ToolCallError

out = Console(highlight=False, soft_wrap=True, emoji=False)  # model text: no :emoji: codes
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


def error(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}")


def write(text: str) -> None:
    """Raw streamed text on stdout, unstyled (it may be piped)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def stats(r) -> None:
    """One dim footer line on stderr for a finished generation."""
    err.print(
        f"[dim]{r.prompt_tokens} prompt tokens at {r.prompt_tps:.1f} tok/s, "
        f"{r.generation_tokens} generated at {r.generation_tps:.2f} tok/s, "
        f"first token {r.time_to_first_token:.2f} s, peak memory {r.peak_memory:.2f} GB[/]"
    )


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(message)}")


_SAID: set[str] = set()


def text(value: str, what: str) -> str:
    """`value` as valid text (`tokenizer.valid_text`: what is not UTF-8 becomes U+FFFD); the
    first time, one warning line says so."""
    from ..tokenizer import valid_text

    fixed = valid_text(value)
    if fixed != value and what not in _SAID:
        _SAID.add(what)
        warn(f"{what} is not valid UTF-8: read with U+FFFD in place of what is not text")
    return fixed


def note(message: str) -> None:
    """A dim line on stderr (progress, hints): never mixed into piped answers."""
    err.print(f"[dim]{escape(message)}[/]")


@contextmanager
def progress(description: str) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar on stderr; yields the callback (done, total, name) that moves it."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        TextColumn("[dim]{task.fields[name]}"),
        console=err,
        transient=True,  # the summary line that follows says how it went
        disable=not err.is_terminal,  # no bar in logs and pipes
    ) as bar:
        task = bar.add_task(description, total=None, name="")

        def update(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, name=name)

        yield update


@contextmanager
def status(message: str) -> Iterator[None]:
    with err.status(f"[dim]{escape(message)}[/]", spinner="dots"):
        yield


def serving(url: str, model: str, auth: bool) -> None:
    """The server's ready line (on stdout, so that scripts can wait for it)."""
    err.print(f"[dim]serving {escape(model)} at {escape(url)}"
              f"{' (API key required)' if auth else ''}; Ctrl-C stops[/]")  # fmt: skip
    out.print(f"ready: {url}")


class PrefillProgress:
    """A turn's `prompt_progress`: once the prefill has taken a second, one line on stderr with
    the prompt tokens done and the rate, redrawn four times a second; gone when it ends (`stop`,
    at the first token or the end of the turn). Nothing when stderr is not a terminal."""

    DELAY = 1.0  # seconds before the line shows: a short prefill shows nothing

    def __init__(self) -> None:
        self.live: Live | None = None
        self.start, self.done, self.total = 0.0, 0, 0

    def __call__(self, done: int, total: int) -> None:
        if self.live is None and done == 0 and err.is_terminal:
            self.start = time.perf_counter()
            self.live = Live(self, console=err, transient=True, refresh_per_second=4)
            self.live.start()
        self.done, self.total = done, total

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def __rich__(self) -> Text:
        elapsed = time.perf_counter() - self.start
        if elapsed < self.DELAY:
            return Text("")
        rate = f", {self.done / elapsed:.2f} tok/s" if self.done else ""
        return Text(
            f"reading the prompt: {self.done} of {self.total} tokens{rate}, {elapsed:.0f} s "
            "(Ctrl-C stops)",
            style="dim",
        )


@contextmanager
def prefill_progress() -> Iterator[PrefillProgress]:
    show = PrefillProgress()
    try:
        yield show
    finally:
        show.stop()


def after_prefill(progress: PrefillProgress, items: Iterable) -> Iterator:
    """Pass `items` on, ending the prefill's progress line at the first."""
    for item in items:
        progress.stop()
        yield item


def welcome(model: str, think: bool, keep_thinking: bool) -> None:
    out.print(
        f"[bold]SmolLM3[/] [dim]{escape(model)}[/]\n"
        f"[dim]thinking {'on' if think else 'off'}, past reasoning "
        f"{'kept' if keep_thinking else 'dropped'}. /help for commands, Ctrl-C stops an answer, "
        "Ctrl-D exits.[/]"
    )


def ask(think: bool) -> str:
    """Read one line at the chat prompt (EOFError on Ctrl-D)."""
    mode = "think" if think else "no_think"
    return out.input(f"\n[bold cyan]you[/] [dim]({mode})[/] [bold cyan]›[/] ")


def chat_reader(on_shown: Callable[[], None] = lambda: None) -> Callable[[bool], str]:
    """What reads the chat's messages: the line editor on a terminal (editing keys, history,
    multi-line paste), plain lines from a pipe or a file. `on_shown` is called once the first
    prompt is on the screen (at once without the editor)."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        on_shown()
        return ask
    from .editor import LineEditor

    editor = LineEditor(on_shown=on_shown)
    return lambda think: editor.ask("you", "think" if think else "no_think")


def read_prompt() -> str:
    """`generate`'s prompt, typed in the terminal (the line editor draws on stderr)."""
    from .editor import LineEditor

    note("no prompt given: type it here (Enter sends, Esc then Enter starts a new line), "
         "or pass it as an argument, or pipe it in")  # fmt: skip
    try:
        return LineEditor(stderr=True).ask("prompt", "Ctrl-D: none")
    except EOFError:
        return ""


def info(message: str) -> None:
    out.print(f"[dim]{escape(message)}[/]")


def saved(path) -> None:
    out.print(f"[green]saved[/] {escape(str(path))}")


def help_commands(commands: dict[str, str]) -> None:
    table = Table(box=None, show_header=False, padding=(0, 2))
    for name, text in commands.items():
        table.add_row(f"[bold]{escape(name)}[/]", escape(text))
    out.print(table)


def session_stats(rows: dict[str, object]) -> None:
    table = Table(box=None, show_header=False, padding=(0, 2))
    for name, value in rows.items():
        table.add_row(f"[dim]{escape(name)}[/]", escape(str(value)))
    out.print(table)


def footer(stats, finish_reason: str = "stop") -> str:
    """The line after an answer (rich markup): tokens, speed, time to first token, memory."""
    mark = {"cancelled": "[yellow]interrupted[/] · ", "length": "[yellow]max tokens[/] · "}
    return f"{mark.get(finish_reason, '')}[dim]{escape(turn_summary(stats))}[/]"


def turn_summary(stats) -> str:
    return (
        f"{stats.generation_tokens} tokens, {stats.generation_tps:.1f} tok/s, "
        f"first token {stats.time_to_first_token:.2f} s "
        f"({stats.prefill_tokens} new of {stats.prompt_tokens} prompt tokens), "
        f"peak memory {stats.peak_memory:.2f} GB"
    )


def thought_for(tokens: int, seconds: float) -> str:
    return f"thought for {tokens} tokens, {seconds:.1f} s"


class TurnView:
    """Renders a turn's events: thinking dimmed and apart (or one summary line), then the answer.

    Args:
        target: the console answers go to (stdout for chat; generate keeps stdout for the answer
            alone and sends thinking to stderr).
        thinking_to: the console thinking goes to.
        hide_thinking: show "thought for N tokens, T s" instead of the reasoning.
        footer: end with the stats line (on `thinking_to`).
    """

    def __init__(self, *, hide_thinking=False, target=out, thinking_to=out, footer=True):
        self.hide, self.show_footer = hide_thinking, footer
        self.target, self.side = target, thinking_to
        self.state = "start"  # -> thinking -> thought -> answer
        self.think_tokens, self.think_start, self.think_text = 0, 0.0, ""

    def __call__(self, event: Event) -> None:
        match event:
            case ThinkingDelta():
                if self.state == "start":
                    self.state, self.think_start = "thinking", time.perf_counter()
                    if not self.hide:
                        self.side.print("[dim]thinking…[/]")
                self.think_tokens += 1
                text = event.text if self.think_text else event.text.lstrip("\n")
                self.think_text += text
                if not self.hide and text:
                    self.side.print(text, style="dim italic", end="", markup=False, highlight=False)
            case AnswerDelta():
                self._end_thinking()
                text = event.text if self.state == "answer" else event.text.lstrip("\n")
                if text:
                    self.state = "answer"
                    self.target.print(text, end="", markup=False, highlight=False)
            case ToolCall():
                args = ", ".join(f"{k}={v!r}" for k, v in event.arguments.items())
                self.side.print(f"\n[magenta]tool call[/] {escape(event.name)}({escape(args)})")
            case ToolCallError():
                self.side.print(f"\n[yellow]malformed tool call[/] ({escape(event.error)})")
            case Error():
                self._end_thinking()
                self.target.print()
                error(event.message)
            case Done():
                self._end_thinking()
                self.target.print()
                if self.show_footer:
                    self.side.print(footer(event.stats, event.finish_reason))

    def _end_thinking(self) -> None:
        if self.state != "thinking":
            return
        self.state = "thought"
        if self.hide:
            seconds = time.perf_counter() - self.think_start
            self.side.print(f"[dim]{thought_for(self.think_tokens, seconds)}[/]")
        else:
            self.side.print(("" if self.think_text.endswith("\n") else "\n") + "[dim]────[/]")


def converted(r) -> None:
    """The summary of a finished conversion (a ConvertResult)."""
    out.print(
        f"[green]converted[/] {escape(str(r.path))}: {r.bits}-bit {r.recipe}, "
        f"{r.bits_per_weight:.2f} bits per weight, {r.size_bytes / 1e9:.2f} GB, {r.seconds:.1f} s"
    )
    if r.upload_repo:
        out.print(f"[green]uploaded[/] https://huggingface.co/{r.upload_repo}")


@contextmanager
def bench_progress(what: str, total: int) -> Iterator[Callable]:
    """`bench`'s progress on stderr: run N of M and the time left, and each run's numbers as it
    ends (in logs too); yields the callback `bench` calls after each run with a RunReport."""
    start = time.perf_counter()
    with Progress(
        SpinnerColumn(), TextColumn("[dim]{task.description}"), console=err, transient=True,
        disable=not err.is_terminal,
    ) as bar:  # fmt: skip
        task = bar.add_task(f"timing {what}: run 1 of {total}")

        def on_run(r) -> None:
            left = (time.perf_counter() - start) / r.done * (r.total - r.done)
            decode = f", decode {r.decode_tps:.2f} tok/s" if r.decode_tps else ""
            eta = f", about {_duration(left)} left" if r.done < r.total else ""
            bar.console.print(
                f"[dim]run {r.done} of {r.total}: {escape(r.runtime)} prefill "
                f"{r.prefill_tps:.1f} tok/s{decode}{eta}[/]"
            )
            if r.done < r.total:
                bar.update(task, description=f"timing {what}: run {r.done + 1} of {r.total}{eta}")

        yield on_run


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _full_width(renderable) -> None:
    """On a terminal, fit the screen; in a file or a pipe, never cut a column (`smoll…`)."""
    if out.is_terminal:
        out.print(renderable)
    else:
        Console(highlight=False, emoji=False, width=10_000, file=sys.stdout).print(renderable)


def bench_results(model: str, results) -> None:
    """The table of `smollm3-mlx bench`: one row per runtime, ratios against the first (ours)."""
    ours = results[0]
    table = Table(title=f"{escape(model)}", title_justify="left", box=None, padding=(0, 2))
    for column in ("runtime", "computes in", "prefill tok/s", "decode tok/s", "first token",
                   "peak memory", "ours/this prefill", "ours/this decode"):  # fmt: skip
        table.add_column(column, justify="left" if column[0] in "rc" else "right")
    for r in results:
        table.add_row(
            escape(r.runtime),
            escape(r.dtype),
            f"{r.prefill_tps:.1f}",
            f"{r.decode_tps:.2f}",
            f"{r.time_to_first_token:.2f} s",
            f"{r.peak_memory:.2f} GB",
            f"{ours.prefill_tps / r.prefill_tps:.2f}x" if r.prefill_tps else "-",
            f"{ours.decode_tps / r.decode_tps:.2f}x" if r.decode_tps else "-",
        )
    _full_width(table)
    out.print(
        f"[dim]{ours.prompt_tokens}-token random prompt, {ours.generation_tokens} tokens greedy, "
        f"median of {ours.runs} runs[/]"
    )


def memory_estimate(est, available: tuple[int, str]) -> None:
    table = Table(box=None, show_header=False, pad_edge=False)
    for name, n, what in est.rows():
        style = "bold" if name == "total" else None
        table.add_row(name, f"{n / 1e9:6.2f} GB", f"[dim]{what}[/]", style=style)
    out.print(table)
    budget, source = available
    if budget:
        fits = "[green]fits[/]" if est.total <= budget else "[red]does not fit[/]"
        out.print(f"available {budget / 1e9:.2f} GB ({source}): {fits}")
