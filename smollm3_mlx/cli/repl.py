"""The interactive chat: the model loads in the background while the prompt shows, /commands,
and turns that Ctrl-C answers now or stops instead of ending the chat."""

from __future__ import annotations

import os
import signal
import sys
import threading

import typer

from . import console
from .launch import budget_memory, compute_dtype, model_name, open_chat
from .options import ChatSettings


class Loading:
    """`chat` loads the model and tokenizer in a thread of its own while its prompt shows, so
    that a person can type at once; the first answer waits only for what is left.

    What can be checked without the weights (the folder, its config) is checked before the
    prompt, so that a wrong -m is one line at once, not after the first message. The thread
    starts once the prompt is drawn: parsing tokenizer.json holds the GIL for a second, which
    would otherwise hold the prompt back.
    """

    def __init__(self, settings: ChatSettings):
        from ..checkpoint import ModelLoadError
        from ..hub import resolve_model_path
        from ..memory import MemoryBudgetError

        s = settings
        self.name = model_name(s.model)
        try:  # a hub repo id downloads here, in the open, before the prompt
            self.path = resolve_model_path(self.name)
            # before the prompt: a bad folder, or a session that cannot fit, is one line now
            budget_memory(
                self.path, s.dtype, s.max_context, s.kv_bits, s.kv_group_size, s.memory_check
            )
        except (ModelLoadError, MemoryBudgetError, OSError) as e:
            console.error(str(e))
            raise typer.Exit(1) from None
        self.result: tuple | None = None
        self.error: BaseException | None = None
        # Set as the thread ends, its MLX streams cleared. Waits are on it, never on the thread's
        # join: Python 3.11 marks a thread stopped when Ctrl-C interrupts a join of it.
        self.done = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(compute_dtype(s.dtype), s.max_context), name="smollm3-mlx load"
        )

    def start(self) -> None:
        if self.thread.ident is None:
            self.thread.start()

    def _run(self, dtype: str | None, max_context: int | None) -> None:
        import mlx.core as mx

        from ..loading import load

        try:
            self.result = load(  # weights too; memory was checked in __init__
                self.path, dtype=dtype, max_context=max_context, check_memory=False
            )
        except BaseException as e:  # handed to the main thread by `wait`
            self.error = e
        finally:
            mx.clear_streams()  # MLX asks it of a thread that ran MLX work, before it ends
            self.done.set()

    def wait(self) -> tuple:
        """(model, tokenizer, name) once loaded; a load error is one line and exit 1."""
        from ..checkpoint import ModelLoadError

        self.start()
        if not self.done.is_set():
            with console.status("loading the model"):
                while not self.done.wait(0.05):  # short waits: Ctrl-C is seen at once
                    pass
        if isinstance(self.error, (ModelLoadError, OSError)):
            console.error(str(self.error))
            raise typer.Exit(1) from None
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return (*self.result, self.name)

    def abandon(self) -> None:
        """Ctrl-C while the model loads: end the process now, with 130. The loading thread is
        inside MLX, and cannot be stopped there; waiting for it would take the rest of the load,
        and a process that exits beside it aborts ("terminate called without an active
        exception"). Nothing is being written: leaving without Python's shutdown is safe."""
        if self.thread.ident is not None and not self.done.is_set():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)

    def finish(self) -> None:
        """Let the loading thread end before the process does (a Ctrl-C meanwhile abandons it)."""
        if self.thread.ident is None:
            return
        try:
            while not self.done.wait(0.05):
                pass
        except KeyboardInterrupt:
            self.abandon()
        self.thread.join()  # past `done`: the thread is only returning


COMMANDS = {
    "/help": "this list",
    "/think": "think before answering, from the next turn on",
    "/no_think": "answer directly, from the next turn on",
    "/system TEXT": "set the system message (no TEXT: clear it)",
    "/reset": "start over (the system message stays)",
    "/save FILE": "save the conversation as JSON",
    "/load FILE": "load a saved conversation",
    "/save_cache FILE": "save the prompt cache (chat --prompt-cache FILE takes up from it)",
    "/stats": "session statistics",
    "/exit": "quit (or Ctrl-D)",
    "Ctrl-C": "while it thinks: answer now; while it answers: stop the turn",
}


def command(chat, line: str) -> bool:
    """Run a /command; False means exit."""
    from ..chat_file import ChatFileError

    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit", "/bye"):
        return False
    if name == "/help":
        console.help_commands(COMMANDS)
    elif name in ("/think", "/no_think"):
        chat.think = name == "/think"
        console.info(f"thinking {'on' if chat.think else 'off'} from the next turn")
    elif name == "/system":
        chat.system = arg or None
        console.info(f"system message {'set' if arg else 'cleared'}")
    elif name == "/reset":
        chat.reset()
        console.info("conversation cleared")
    elif name == "/save" and arg:
        try:
            console.saved(chat.save(arg))
        except OSError as e:
            console.error(f"{arg}: {e.strerror or e}")
    elif name == "/load" and arg:
        try:
            saved = chat.restore(arg)
        except ChatFileError as e:
            console.error(str(e))
            return True
        console.info(
            f"loaded {len(chat.messages)} messages, thinking {'on' if chat.think else 'off'}"
            + (f" (saved with {saved.model})" if saved.model != chat.model_name else "")
        )
    elif name == "/save_cache" and arg:
        try:
            console.saved(chat.save_prompt_cache(arg))
        except OSError as e:  # a full disk among them
            console.error(f"{arg}: {e.strerror or e}")
        except ValueError as e:  # nothing to save yet
            console.error(str(e))
    elif name == "/stats":
        console.session_stats(_stats(chat))
    elif name in ("/save", "/load", "/save_cache"):
        console.error(f"usage: {name} FILE")
    else:
        console.error(f"unknown command {name}; /help lists them")
    return True


def _stats(chat) -> dict[str, object]:
    s = chat.sampling
    rows: dict[str, object] = {
        "model": chat.model_name,
        "thinking": "on" if chat.think else "off",
        "past reasoning": "kept" if chat.keep_thinking else "dropped",
        "messages": len(chat.messages),
        "cached tokens": chat.cached_tokens,
        "sampling": f"temperature {s.temperature}, top-p {s.top_p}, max tokens {s.max_tokens}",
    }
    if chat.last is not None:
        rows["last turn"] = console.turn_summary(chat.last)
    return rows


def interrupt(chat) -> None:
    """Ctrl-C during a turn: while the model thinks, answer now; else (or a second time while
    the thinking closes) stop the turn, keeping the partial answer."""
    if not chat.stop_thinking():
        chat.cancel()


def turn(chat, text: str, view) -> None:
    """One turn; Ctrl-C answers now or stops it (see interrupt) instead of killing the chat.
    A long prefill shows its progress; Ctrl-C stops it after the current forward chunk."""
    previous = signal.signal(signal.SIGINT, lambda *_: interrupt(chat))
    try:
        with console.prefill_progress() as progress:
            chat.prompt_progress = progress
            for event in console.after_prefill(progress, chat.send(text)):
                view(event)
    finally:
        chat.prompt_progress = None
        signal.signal(signal.SIGINT, previous)


def run(loading: Loading, settings: ChatSettings) -> None:
    """Read lines until /exit or Ctrl-D; the Chat is opened (`launch.open_chat`) at the first
    line, once `loading` is done."""
    think, keep_thinking = settings.think, settings.keep_thinking
    try:
        console.welcome(loading.name, think, keep_thinking)
        session = None
        ask = console.chat_reader(on_shown=loading.start)
        while True:
            try:
                line = ask(session.think if session else think)
            except EOFError:
                console.info("")
                break
            except KeyboardInterrupt:
                console.info("\n(/exit or Ctrl-D to quit)")
                continue
            line = console.text(line, "the message")
            if not line.strip():
                continue
            if session is None:
                session = open_chat(settings, loading.wait())
            if line.startswith("/"):
                if not command(session, line):
                    break
                continue
            turn(session, line, console.TurnView(hide_thinking=settings.hide_thinking))
    except KeyboardInterrupt:  # while waiting for the model
        loading.abandon()
        raise typer.Exit(130) from None
    finally:
        loading.finish()  # never leave a thread inside MLX at exit
