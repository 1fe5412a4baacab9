"""Sessions end when their heartbeats stop: a thread that looks for them.

The SDK beats every 10 s while its process lives. A session whose last beat is older than
`ServerConfig.session_timeout_s` is ended (`ServerState.expire_sessions`): its training clients
and sampling sessions are released from the trainer and the samplers, as at `close()` or
`unload_model`. Its runs and checkpoints stay, listed and loadable. The default timeout, an hour,
outlasts a network blip and a laptop closed for a meeting; a client that comes back later
finds its models released, with the checkpoint to resume from in the error.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

logger = logging.getLogger("rl.server")


class Expiring(Protocol):
    def expire_sessions(self, now: float) -> list[str]: ...


class SessionReaper:
    """Calls `state.expire_sessions` every few seconds on a daemon thread until `stop()`."""

    def __init__(self, state: Expiring, timeout_s: float):
        self._state = state
        self._stop = threading.Event()
        # Often enough that a session ends within a tenth of the timeout of its last beat.
        self._every_s = min(30.0, max(0.5, timeout_s / 10))
        self._thread = threading.Thread(target=self._run, name="engineroom-reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            try:
                self._state.expire_sessions(time.time())
            except Exception:  # a release that failed is tried again on the next round
                logger.exception("ending idle sessions failed")
