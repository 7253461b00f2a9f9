"""Threads of the plugin's own that run deliveries: one per delivery in flight.

Each delivery waits for two fsyncs; the more of them are in flight, the more
the file system merges into one journal commit. asyncio's default executor has
``cpu_count + 4`` threads shared with the rest of the server, so most of the
runner's ``[delivery] workers`` concurrent attempts would queue behind six of
them. The hand-off is also leaner than ``asyncio.to_thread``: a C queue, the
asyncio future completed straight from the thread, no ``concurrent.futures``
future, condition or semaphore per call.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_STOP = None


class Workers:
    """Up to ``size`` threads, started as deliveries need them, fed through one queue."""

    def __init__(self, size: int, name: str = "maildir") -> None:
        self.size = max(1, size)
        self.name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in one of the threads; its result or exception."""
        if self._closed:
            raise RuntimeError("the maildir delivery threads have stopped")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((loop, future, fn, args))
        if self._idle <= 0 and len(self._threads) < self.size:
            self._spawn()
        return await future

    def close(self) -> None:
        """Let every thread finish the delivery it is doing, then stop."""
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._queue.put(_STOP)

    def _spawn(self) -> None:
        with self._lock:
            if self._closed or len(self._threads) >= self.size:
                return
            thread = threading.Thread(target=self._work, daemon=True,
                                      name=f"{self.name}-{len(self._threads)}")
            self._threads.append(thread)
            self._idle += 1  # counted idle until its first get
        thread.start()

    def _work(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            with self._lock:
                self._idle -= 1
            if item is _STOP:
                return
            loop, future, fn, args = item
            try:
                result = fn(*args)
            except BaseException as e:  # handed to the awaiting task, as to_thread does
                _post(loop, future, _fail, e)
            else:
                _post(loop, future, _succeed, result)
            del item, loop, future, fn, args
            with self._lock:
                self._idle += 1


def _post(loop: asyncio.AbstractEventLoop, future: asyncio.Future, set_state, value) -> None:
    try:
        loop.call_soon_threadsafe(set_state, future, value)
    except RuntimeError:  # the loop is closed: nobody waits any more
        pass


def _succeed(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
