"""A blocking stream run in a thread of its own, its items handed to an asyncio event loop.

`Chat.asend` and its twins run a turn so: the loop stays free while the model computes, and
leaving the loop early (or cancelling the task) stops the stream within one of its steps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass
class _End:
    error: BaseException | None = None


async def off_loop(
    run: Callable[[threading.Event], Iterator[T]],
    *,
    name: str,
    before_exit: Callable[[], None] = lambda: None,
) -> AsyncIterator[T]:
    """The items of `run(stop)` as they come, computed in a new thread named `name`.

    Args:
        run: makes the stream; it ends soon after `stop` is set (set when the consumer leaves).
        before_exit: called in the thread as it ends (MLX asks each thread that ran work to
            free its streams: `mx.clear_streams`).

    An error of the stream is raised here; the thread has ended, and the stream finished its
    own clean-up, by the time this generator returns.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[T | _End] = asyncio.Queue()
    stop = threading.Event()

    def pump() -> None:
        end = _End()
        try:
            for item in run(stop):
                loop.call_soon_threadsafe(queue.put_nowait, item)
        except BaseException as e:  # handed to the awaiting task
            end = _End(e)
        before_exit()
        loop.call_soon_threadsafe(queue.put_nowait, end)

    worker = threading.Thread(target=pump, name=name, daemon=True)
    worker.start()
    item: T | _End | None = None
    try:
        while not isinstance(item := await queue.get(), _End):
            yield item
        if item.error is not None:
            raise item.error
    finally:
        stop.set()  # no-op once the stream is over
        while not isinstance(item, _End):  # let the stream end and clean up
            item = await queue.get()
        worker.join()


class Either:
    """Set when any of its events is set (a stream's own stop, or a cancel from elsewhere)."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)
