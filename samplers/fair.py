"""Fair turns at a sampler pool: a window of work in flight, one queue per owner past it.

The engines serve in arrival order (vLLM's scheduler, the torch engine's one worker), so a
caller that submits 200 requests at once would make everyone else's request wait behind all
200. The pool therefore sends the engines only about what they run at once (the window, in
units: sequences); the rest wait here, one FIFO queue per owner, and are let in one per owner
in turn (round-robin) as units come back. A lone request of a second owner then waits for
about one batch of the first owner's, not for the whole burst.

Plain asyncio, no Ray: `FairGate` is a counter, a dict of queues and futures, all touched from
the one loop the pool runs on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Waiter:
    units: int
    admitted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class FairGate:
    """At most `capacity` units in flight (0: no bound); callers past it wait, one queue per
    owner, and are let in round-robin across owners, oldest first within one owner.

    A caller is let in while any room is left, whatever its size, so a request larger than the
    whole window still runs (alone, once the units before it come back) and nothing waits
    forever. Newcomers queue behind the waiters: no one overtakes a waiting owner's turn.
    """

    def __init__(self, capacity: int = 0):
        self.capacity = capacity
        self.used = 0
        # Owners with waiters, in turn order: the first is served next, then moves to the end.
        self._queues: dict[str, collections.deque[_Waiter]] = {}
        self._closed: BaseException | None = None

    def waiting(self) -> dict[str, int]:
        """Requests waiting per owner (safe to read from another thread: a snapshot)."""
        return {owner: len(queue) for owner, queue in list(self._queues.items())}

    @contextlib.asynccontextmanager
    async def turn(self, owner: str, units: int) -> AsyncIterator[None]:
        """Holds `units` of the window for the body; they come back however it ends."""
        await self.enter(owner, units)
        try:
            yield
        finally:
            self.leave(units)

    async def enter(self, owner: str, units: int) -> None:
        """Waits for `owner`'s turn and takes `units`; raises the close error once closed."""
        if self._closed is not None:
            raise self._closed
        if not self._queues and self._has_room():
            self.used += units
            return
        waiter = _Waiter(units)
        self._queues.setdefault(owner, collections.deque()).append(waiter)
        try:
            await waiter.admitted
        except asyncio.CancelledError:
            if waiter.admitted.done() and not waiter.admitted.cancelled():
                self.leave(units)  # let in just as it was cancelled: give the units back
            else:
                self._remove(owner, waiter)
            raise

    def resize(self, capacity: int) -> None:
        """Sets the window (0: no bound) and lets in the waiters it now has room for."""
        self.capacity = capacity
        self._admit()

    def leave(self, units: int) -> None:
        """Gives `units` back and lets the next waiters in."""
        self.used -= units
        self._admit()

    def close(self, error: BaseException) -> None:
        """Every waiter, and every later caller, gets `error`."""
        self._closed = error
        queues, self._queues = self._queues, {}
        for queue in queues.values():
            for waiter in queue:
                if not waiter.admitted.done():
                    waiter.admitted.set_exception(error)

    def _has_room(self) -> bool:
        return self.capacity <= 0 or self.used < self.capacity

    def _admit(self) -> None:
        while self._queues and self._has_room():
            owner = next(iter(self._queues))
            queue = self._queues.pop(owner)
            waiter = queue.popleft()
            if queue:
                self._queues[owner] = queue  # back at the end of the turn order
            if waiter.admitted.done():
                continue  # its caller was cancelled and has not run yet to leave the queue
            self.used += waiter.units
            waiter.admitted.set_result(None)

    def _remove(self, owner: str, waiter: _Waiter) -> None:
        queue = self._queues.get(owner)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        if not queue:
            del self._queues[owner]
