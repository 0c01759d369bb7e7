"""How a worker runs its handler: one chunk at a time in its own thread, several in threads, or several as
tasks of an async handler on an event loop. Every runner calls back with the same Result; none touches the
database (the worker's one thread that does is the coordinator, see worker.py)."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

from .handler import ChunkTask, DoNotRetry, Handler, RetryAfter
from .lease import Held


class Result(NamedTuple):
    """What a handler made of one chunk: None for error means it completed. (A tuple: one is made per chunk,
    and a frozen dataclass costs three times as much to build.)"""

    held: Held
    took: float  # seconds
    error: str | None = None
    retry: bool = True  # False: DoNotRetry
    deferral: RetryAfter | None = None


def describe(exc: BaseException) -> str:
    """``Type: message`` and the last frames of the traceback, for chunk_errors."""
    frames = traceback.format_exception(exc, limit=-3)
    return f"{type(exc).__name__}: {exc}\n" + "".join(frames[:-1]).rstrip()


def outcome(held: Held, started: float, exc: BaseException | None) -> Result:
    took = time.monotonic() - started
    if exc is None:
        return Result(held, took)
    if isinstance(exc, RetryAfter):
        return Result(held, took, f"RetryAfter: {exc}", deferral=exc)
    return Result(held, took, describe(exc), retry=not isinstance(exc, DoNotRetry))


def is_async(handler: Handler) -> bool:
    """``async def`` handlers, and instances of a class whose ``__call__`` is one."""
    method = None if inspect.isroutine(handler) else vars(type(handler)).get("__call__")
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(method)


class Runner:
    """Runs one task; ``done`` gets its Result, from whatever thread ran it."""

    def __init__(self, handler: Handler, done: Callable[[Result], None]) -> None:
        self.handler, self.done = handler, done

    def start(self, held: Held, task: ChunkTask) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing more will start; running handlers are left to finish (or to the process's end)."""


class InlineRunner(Runner):
    """--concurrency 1 with a plain handler: in the calling thread, as the pool always ran it."""

    def start(self, held: Held, task: ChunkTask) -> None:
        started = time.monotonic()
        try:
            self.handler(task)
        except Exception as exc:
            self.done(outcome(held, started, exc))
        else:
            self.done(Result(held, time.monotonic() - started))


class ThreadRunner(Runner):
    """A plain handler, N chunks at once in N threads."""

    def __init__(self, handler: Handler, done: Callable[[Result], None], threads: int) -> None:
        super().__init__(handler, done)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="handler")

    def start(self, held: Held, task: ChunkTask) -> None:
        started = time.monotonic()
        self.pool.submit(self.handler, task).add_done_callback(
            lambda future: self.done(outcome(held, started, future.exception()))
        )

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class AsyncRunner(Runner):
    """An ``async def`` handler: its chunks run as tasks of one event loop, in a thread of its own, so the
    coordinator and the lease keeper never wait on it."""

    def __init__(self, handler: Handler, done: Callable[[Result], None]) -> None:
        super().__init__(handler, done)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="handler-loop", daemon=True)
        self.thread.start()

    def start(self, held: Held, task: ChunkTask) -> None:
        started = time.monotonic()
        coroutine: Any = self.handler(task)
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)

        def finished(f: Future[Any]) -> None:
            if not f.cancelled():  # cancelled: the loop stopped with the process; the chunk is handed back
                self.done(outcome(held, started, f.exception()))

        future.add_done_callback(finished)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def make_runner(handler: Handler, concurrency: int, done: Callable[[Result], None]) -> Runner:
    if is_async(handler):
        return AsyncRunner(handler, done)
    if concurrency > 1:
        return ThreadRunner(handler, done, concurrency)
    return InlineRunner(handler, done)
