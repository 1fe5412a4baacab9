"""The limits a lab sets per tenant: models alive at once, and calls in flight at once.

- Models (`--max_models_per_tenant`): creating one more model than the cap (training clients
  alive or being created, counted per tenant) is refused at once with a 400 that names the cap
  and how to free one. Not a 429: the SDK would retry that (for up to five minutes) before
  showing why, and the cap does not free itself while it waits.
- Calls in flight (`--max_inflight_per_tenant`): the calls of a tenant handed to the trainer or
  the samplers and not finished. Past the cap, a training call is still accepted (its request
  id is answered as always) but waits here, in the order it came, until one of the tenant's
  calls finishes: the SDK retries a training call's 429 for five minutes only
  (`InternalClientHolder.execute_with_retries`), so a 429 could fail it; a queue cannot. A
  sample call past the cap gets 429 with Retry-After (rl/server/routes/sampling.py): the SDK's
  sampling client retries a 429 for as long as it takes.

Either cap 0 means no cap.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import sys
import threading
from collections.abc import Callable

from rl.errors import InvalidRequestError
from rl.futures import settle

Start = Callable[[], concurrent.futures.Future]


class LimitError(InvalidRequestError):
    """A call refused by a limit of the server; `limit` names it (a metrics label)."""

    def __init__(self, message: str, limit: str):
        super().__init__(message)
        self.limit = limit


def check_models(tenant: str, alive: int, cap: int) -> None:
    """Raises LimitError when `tenant`, holding `alive` models, may not create another."""
    if cap > 0 and alive >= cap:
        raise LimitError(
            f"tenant {tenant!r} has {alive} models alive, this server's cap "
            f"(--max_models_per_tenant={cap}); free one first: close a session you are done "
            "with (ServiceClient.close), or release one model with POST /api/v1/unload_model "
            "{'model_id': ...}. Their checkpoints stay, to resume from later.",
            "models",
        )


class InflightGate:
    """At most `cap` calls of each tenant in flight; the training calls over it wait, FIFO.

    Calls are dispatched by one drainer at a time (whichever thread finds work to do), outside
    the lock, so a tenant's calls reach their training clients in the order they came, and a
    call that finishes at once cannot deadlock against its own dispatch. Finished calls wake
    the drainer on a thread of its own, never on the thread (Ray's, the samplers' loop) that
    finished them."""

    def __init__(self, cap: int):
        self.cap = cap if cap > 0 else sys.maxsize
        self._lock = threading.Lock()
        self._inflight: collections.Counter[str] = collections.Counter()
        self._waiting: dict[str, collections.deque[tuple[concurrent.futures.Future, Start]]] = (
            collections.defaultdict(collections.deque)
        )
        self._queued_total: collections.Counter[str] = collections.Counter()
        self._draining = False
        self._waker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engineroom-gate")

    def run(self, tenant: str, start: Start) -> concurrent.futures.Future:
        """The future of `start()`, called now if `tenant` has room, else when it has."""
        proxy: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            waiting = self._waiting[tenant]
            if waiting or self._inflight[tenant] >= self.cap:
                self._queued_total[tenant] += 1
            waiting.append((proxy, start))
        self._drain()
        return proxy

    def has_room(self, tenant: str) -> bool:
        with self._lock:
            return self._inflight[tenant] < self.cap

    def track(self, tenant: str, future: concurrent.futures.Future) -> None:
        """Counts a call started elsewhere (a sample) in flight until `future` is done."""
        with self._lock:
            self._inflight[tenant] += 1
        future.add_done_callback(lambda _: self._finished(tenant))

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Per tenant: calls in flight, calls waiting, calls that ever waited."""
        with self._lock:
            return {
                "inflight": {t: n for t, n in self._inflight.items() if n},
                "waiting": {t: len(q) for t, q in self._waiting.items() if q},
                "queued_total": dict(self._queued_total),
            }

    def close(self) -> None:
        self._waker.shutdown(wait=False)

    def _finished(self, tenant: str) -> None:
        with self._lock:
            self._inflight[tenant] -= 1
            wake = any(self._waiting.values())
        if wake:
            with contextlib.suppress(RuntimeError):  # shut down: the server is stopping
                self._waker.submit(self._drain)

    def _drain(self) -> None:
        with self._lock:
            if self._draining:
                return  # the drainer at work picks up what was just added
            self._draining = True
        while True:
            with self._lock:
                picked = self._pick()
                if picked is None:
                    self._draining = False
                    return
                tenant, proxy, start = picked
                self._inflight[tenant] += 1
            self._dispatch(tenant, proxy, start)

    def _pick(self) -> tuple[str, concurrent.futures.Future, Start] | None:
        for tenant, waiting in self._waiting.items():
            if waiting and self._inflight[tenant] < self.cap:
                proxy, start = waiting.popleft()
                return tenant, proxy, start
        return None

    def _dispatch(self, tenant: str, proxy: concurrent.futures.Future, start: Start) -> None:
        try:
            inner = start()
        except BaseException as error:  # a synchronous rejection fails this call only
            inner = concurrent.futures.Future()
            inner.set_exception(error)

        def done(f: concurrent.futures.Future) -> None:
            settle(proxy, f.result)
            self._finished(tenant)

        inner.add_done_callback(done)


__all__ = ["InflightGate", "LimitError", "check_models"]
