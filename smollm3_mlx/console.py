"""All terminal rendering (rich) lives here; the rest of the package never prints."""

from __future__ import annotations

import sys

from rich.console import Console

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def error(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}")


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
