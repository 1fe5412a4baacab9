"""Futures returned by every client call, and the per-client ordered queue behind them.

`APIFuture` wraps a `concurrent.futures.Future`: `.result()` blocks, `await fut` and
`await fut.result_async()` suspend. `OrderedQueue` runs one client's calls one at a time in
submission order on a worker thread, so `forward_backward` then `optim_step` submitted back to
back execute in that order, and a two-pass call (`forward_backward_custom`) is never interleaved
with a later call of the same client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Generator, Iterator
from typing import Any, Generic, TypeVar

import ray

T = TypeVar("T")


def unwrap_ray_error(error: BaseException) -> BaseException:
    """A Ray task error becomes the exception the actor raised, with its message intact."""
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = error.cause
        if isinstance(cause, BaseException):
            return cause
    return error


def ray_get(ref: Any) -> Any:
    """`ray.get` that raises the actor's own exception instead of Ray's wrapper."""
    try:
        return ray.get(ref)
    except BaseException as e:
        raise unwrap_ray_error(e) from None


def settle(target: concurrent.futures.Future, compute: Callable[[], Any]) -> None:
    """Sets `target` to `compute()`'s value, or to the exception it raised."""
    try:
        target.set_result(compute())
    except BaseException as error:
        target.set_exception(error)


def chain(
    inner: concurrent.futures.Future, fn: Callable[[Any], Any] = lambda x: x
) -> concurrent.futures.Future:
    """A future of `fn(inner's result)`; `fn` runs in the thread that finished `inner`."""
    outer: concurrent.futures.Future = concurrent.futures.Future()
    inner.add_done_callback(lambda f: settle(outer, lambda: fn(f.result())))
    return outer


class APIFuture(Generic[T]):
    def __init__(self, future: concurrent.futures.Future[T]):
        self._future = future

    def result(self, timeout: float | None = None) -> T:
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise
        except BaseException as e:
            raise unwrap_ray_error(e) from None

    async def result_async(self, timeout: float | None = None) -> T:
        wrapped = asyncio.wrap_future(self._future)
        try:
            return await asyncio.wait_for(wrapped, timeout) if timeout else await wrapped
        except (TimeoutError, asyncio.CancelledError):
            raise
        except BaseException as e:
            raise unwrap_ray_error(e) from None

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()

    def future(self) -> concurrent.futures.Future[T]:
        return self._future

    def done(self) -> bool:
        return self._future.done()

    @classmethod
    def completed(cls, value: T) -> APIFuture[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        future.set_result(value)
        return cls(future)


class OrderedQueue:
    """Runs submitted callables one at a time, in submission order, on one daemon thread."""

    def __init__(self, name: str):
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], T]) -> APIFuture[T]:
        with self._lock:
            return APIFuture(self._executor.submit(fn))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Turns:
    """Tickets handed out in order; `turn(ticket)` waits until every earlier ticket's turn
    has ended (used to finish a client's weight syncs in the order they began)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._issued = 0
        self._done = 0

    def take(self) -> int:
        with self._cv:
            self._issued += 1
            return self._issued - 1

    @contextlib.contextmanager
    def turn(self, ticket: int) -> Iterator[None]:
        with self._cv:
            self._cv.wait_for(lambda: self._done == ticket)
        try:
            yield
        finally:
            with self._cv:
                self._done += 1
                self._cv.notify_all()
