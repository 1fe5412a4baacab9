"""One trainer actor and the training clients it hosts: restarted and restored when it dies.

A trainer actor holds every hosted client's adapter, optimizer state and accumulated gradient
in memory; if its process dies (killed, out of memory, node lost) all of that is gone. The
first client call that meets the dead actor restarts it once for everyone (a `generation`
counter tells later callers it is done), inside the same resource reservation, and restores
every hosted client to its restore point: its last `save_state` (adapter + optimizer + step),
the checkpoint it was loaded from, or its initial adapter (the seed is recorded, so that is
the same adapter). Each client then decides for itself, from what it did since that point,
whether its next call can simply continue or must raise `TrainerRestartedError`
(rl/training_client.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import ray

from rl.futures import ray_get
from rl.resources import Reservation
from trainers.actor import start_trainer_actor
from trainers.config import TrainerConfig

if TYPE_CHECKING:
    from rl.training_client import TrainingClient

logger = logging.getLogger(__name__)


class TrainerHost:
    def __init__(self, base_model: str, config: TrainerConfig):
        self.base_model = base_model
        self.config = config
        self.handle, self.reservation = start_trainer_actor(base_model, config)
        try:
            ray_get(self.handle.base_model_path.remote())  # surfaces a bad model name here
        except BaseException:
            self.reservation.release()
            raise
        self.generation = 0  # restarts so far
        self.restart_seconds: list[float] = []  # how long each restart + restore took
        self.clients: list[TrainingClient] = []
        self._lock = threading.Lock()

    def current(self) -> tuple[Any, int]:
        """(actor, generation) now; waits while a restart is restoring the clients."""
        with self._lock:
            return self.handle, self.generation

    def restart(self, generation: int) -> None:
        """Restarts the actor and restores every hosted client, unless another caller has
        already done so since `generation` (the generation that caller saw die)."""
        with self._lock:
            if self.generation != generation:
                return
            began = time.perf_counter()
            logger.warning("the trainer of %s died; restarting it", self.base_model)
            with contextlib.suppress(Exception):  # make sure it is gone, freeing its bundle
                ray.kill(self.handle, no_restart=True)
            self.handle, _ = start_trainer_actor(self.base_model, self.config, self.reservation)
            ray_get(self.handle.base_model_path.remote())
            for client in self.clients:
                client._restore_on(self.handle)
            self.generation += 1
            self.restart_seconds.append(time.perf_counter() - began)
            logger.warning(
                "trainer of %s restarted, %d client(s) restored in %.1fs",
                self.base_model,
                len(self.clients),
                self.restart_seconds[-1],
            )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            ray.kill(self.handle)
        self.reservation.release()


def is_trainer_death(error: BaseException) -> bool:
    """Whether `error` says the trainer process is gone (not an error the trainer raised)."""
    return isinstance(error, ray.exceptions.RayActorError)


__all__ = ["Reservation", "TrainerHost", "is_trainer_death"]
