"""The server's side of Tinker futures, and the per-model order of execution.

Every long call answers at once with a request id; the client polls `retrieve_future` until the
result is there. `FutureStore` holds each request's `concurrent.futures.Future` with its owner
(another tenant's id is "not found") and what the result is encoded as.

`ModelOrder` runs one model's calls in `seq_id` order. The SDK numbers a training client's
calls 1, 2, 3, ... and sends the next only after the previous was accepted, except the chunks
of one large `forward_backward`, which arrive at once with the first chunk last. A call whose
turn has not come is held; when the missing one arrives, it and every consecutive held call
are dispatched, in order, to the training client's own ordered queue. A repeated seq_id (a
retry of a request whose answer was lost) gets the same request id back, not a second run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from rl.errors import NotFoundError
from rl.futures import settle

Encoding = Literal["json", "forward_backward", "sample"]
# Finished results are kept this long after they finish, for clients that poll late.
RESULT_TTL_S = 3600.0


@dataclass
class Pending:
    tenant: str
    future: concurrent.futures.Future
    encoding: Encoding
    model_id: str | None = None
    finished_at: float | None = None


class FutureStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, Pending] = {}

    def add(
        self,
        tenant: str,
        future: concurrent.futures.Future,
        encoding: Encoding,
        model_id: str | None = None,
    ) -> str:
        request_id = uuid.uuid4().hex
        item = Pending(tenant, future, encoding, model_id)
        with self._lock:
            self._prune()
            self._items[request_id] = item

        def finished(_: concurrent.futures.Future) -> None:
            item.finished_at = time.monotonic()

        future.add_done_callback(finished)
        return request_id

    def get(self, tenant: str, request_id: str) -> Pending:
        with self._lock:
            item = self._items.get(request_id)
        if item is None or item.tenant != tenant:
            raise NotFoundError(f"request {request_id!r} not found")
        return item

    async def wait(self, item: Pending, timeout: float) -> bool:
        """True when the request finished within `timeout` seconds."""
        if item.future.done():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(item.future)), timeout)
        except TimeoutError:
            return False
        except Exception:
            return True  # failed: the caller reads the exception
        return True

    def inflight(self, encoding: Encoding) -> int:
        with self._lock:
            return sum(
                1 for i in self._items.values() if i.encoding == encoding and not i.future.done()
            )

    def _prune(self) -> None:
        now = time.monotonic()
        expired = [
            rid
            for rid, item in self._items.items()
            if item.finished_at is not None and now - item.finished_at > RESULT_TTL_S
        ]
        for rid in expired:
            del self._items[rid]


def flatten(future: concurrent.futures.Future) -> concurrent.futures.Future:
    """A future whose result is itself a future, as one future."""
    outer: concurrent.futures.Future = concurrent.futures.Future()

    def done(f: concurrent.futures.Future) -> None:
        if f.exception() is not None:
            outer.set_exception(f.exception())
        else:
            f.result().add_done_callback(lambda g: settle(outer, g.result))

    future.add_done_callback(done)
    return outer


def failed(error: BaseException) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_exception(error)
    return future


@dataclass
class ModelOrder:
    """Holds one model's calls until their seq_id's turn; see the module docstring."""

    next_seq: int = 1
    held: dict[int, tuple[concurrent.futures.Future, Callable[[], concurrent.futures.Future]]] = (
        field(default_factory=dict)
    )
    seen: dict[int, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def submit(
        self,
        seq_id: int,
        start: Callable[[], concurrent.futures.Future],
        register: Callable[[concurrent.futures.Future], str],
    ) -> str:
        """Queues `start` (called on its turn; it enqueues the work and returns its future).
        `register` files the request's future and returns its request id."""
        with self.lock:
            if seq_id in self.seen:
                return self.seen[seq_id]
            if seq_id < self.next_seq:
                raise ValueError(
                    f"seq_id {seq_id} is below this model's next expected seq_id {self.next_seq}"
                )
            outer: concurrent.futures.Future = concurrent.futures.Future()
            request_id = register(outer)
            self.seen[seq_id] = request_id
            self.held[seq_id] = (outer, start)
            while self.next_seq in self.held:
                future, call = self.held.pop(self.next_seq)
                self.next_seq += 1
                _dispatch(future, call)
            for old in [s for s in self.seen if s < self.next_seq - 4096]:
                del self.seen[old]
            return request_id

    def waiting(self) -> list[int]:
        with self.lock:
            return sorted(self.held)


def _dispatch(
    outer: concurrent.futures.Future, call: Callable[[], concurrent.futures.Future]
) -> None:
    try:
        inner = call()
    except BaseException as error:  # a synchronous rejection: the request fails, order goes on
        outer.set_exception(error)
        return
    inner.add_done_callback(lambda f: settle(outer, f.result))


__all__ = ["FutureStore", "ModelOrder", "Pending", "failed", "flatten"]
