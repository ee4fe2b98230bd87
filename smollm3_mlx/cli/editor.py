"""The chat prompt's line editor (prompt_toolkit): editing keys, history across sessions, pasting.

Imported only by the commands that read from a terminal. Enter sends; Esc then Enter (Alt+Enter
in most terminals) starts a new line; a paste, however many lines, arrives as one message
(bracketed paste) and is sent with Enter. The terminal is in raw mode while the editor reads,
so no line is cut at the kernel's 4095-character limit of canonical mode.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.output import create_output


def history_file() -> Path:
    """Where the typed messages are kept between sessions (XDG state folder)."""
    state = os.environ.get("XDG_STATE_HOME") or Path("~/.local/state").expanduser()
    return Path(state) / "smollm3-mlx" / "history"


def _keys() -> KeyBindings:
    keys = KeyBindings()

    @keys.add("enter")
    def _send(event) -> None:
        event.current_buffer.validate_and_handle()

    @keys.add("escape", "enter")  # Alt+Enter sends ESC CR
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    return keys


def _once(call: Callable[[], None]) -> Callable[[object], None]:
    done = []

    def handler(_app: object) -> None:
        if not done:
            done.append(True)
            call()

    return handler


def _history():
    """The history file, private to the user (messages can be), or none if it cannot be made."""
    path = history_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600))
    except OSError:
        return InMemoryHistory()
    return FileHistory(str(path))


class LineEditor:
    """Reads one message at a time from the terminal (EOFError on Ctrl-D, KeyboardInterrupt on
    Ctrl-C), keeping what was typed in the history file.

    Args:
        stderr: draw on stderr (for `generate`, whose stdout is the answer alone).
        on_shown: called once, when the prompt has first been drawn.
    """

    def __init__(self, *, stderr: bool = False, on_shown: Callable[[], None] | None = None) -> None:
        self.session: PromptSession[str] = PromptSession(
            output=create_output(stdout=sys.stderr) if stderr else None,
            history=_history(),
            key_bindings=_keys(),
            multiline=True,  # shows pasted lines as lines; Enter still sends (see _keys)
            prompt_continuation=lambda width, *_: "." * (width - 1) + " ",
            enable_open_in_editor=False,
        )
        if on_shown is not None:
            self.session.app.after_render += _once(on_shown)

    def ask(self, label: str, hint: str) -> str:
        """`label (hint) › ` then the user's message."""
        prompt = FormattedText(
            [("", "\n"), ("bold fg:ansicyan", label), ("dim", f" ({hint}) "),
             ("bold fg:ansicyan", "› ")]
        )  # fmt: skip
        return self.session.prompt(prompt)
