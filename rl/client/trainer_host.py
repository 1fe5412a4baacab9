"""One trainer actor and the training clients it hosts: restarted and restored when it dies.

A trainer actor holds every hosted client's adapter, optimizer state and accumulated gradient
in memory; if its process dies (killed, out of memory, node lost) all of that is gone. The
first client call that meets the dead actor restarts it once for everyone (a `generation`
counter tells later callers it is done), inside the same resource reservation, and restores
every hosted client to its restore point: its last `save_state` (adapter + optimizer + step),
the checkpoint it was loaded from, or its initial adapter (the seed is recorded, so that is
the same adapter). Each client then decides for itself, from what it did since that point,
whether its next call can simply continue or must raise `TrainerRestartedError`
(rl/client/training.py).

A sharded trainer (`TrainerConfig.world_size` > 1) is hosted the same way: clients call its
rank 0, and the death of any rank (rank 0 raises `TrainerRankError` naming it) rebuilds the
whole group, in the same reservations, from the same restore points.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Protocol

import ray

from rl.client.passes import SharedPasses
from rl.errors import TrainerRankError
from rl.futures import ray_get
from rl.placement import Reservation
from trainers.actor import reserve_trainer, start_trainer
from trainers.config import TrainerConfig

logger = logging.getLogger(__name__)


class Restorable(Protocol):
    """A client the host restores on a restarted trainer (rl/client/training.py)."""

    def restore_on(self, actor: Any) -> None: ...


class TrainerHost:
    def __init__(self, base_model: str, config: TrainerConfig):
        self.base_model = base_model
        self.config = config
        self.reservations = reserve_trainer(base_model, config)
        try:
            self.ranks = start_trainer(base_model, config, self.reservations)
            ray_get(self.ranks[0].base_model_path.remote())  # surfaces a bad model name here
        except BaseException:
            for reservation in self.reservations:
                reservation.release()
            raise
        self.generation = 0  # restarts so far
        self.last_failure = ""  # which rank died, as the last restart was told
        self.restart_seconds: list[float] = []  # how long each restart + restore took
        self.clients: list[Restorable] = []
        self._lock = threading.Lock()
        # Calls of several clients waiting together share a pass; a sharded trainer runs
        # each call alone.
        self.passes = SharedPasses(base_model) if config.world_size == 1 else None

    @property
    def handle(self) -> Any:
        """The actor clients call: the trainer, or rank 0 of a sharded one."""
        return self.ranks[0]

    def current(self) -> tuple[Any, int]:
        """(actor, generation) now; waits while a restart is restoring the clients."""
        with self._lock:
            return self.handle, self.generation

    def restart(self, generation: int, error: BaseException | None = None) -> None:
        """Restarts the trainer and restores every hosted client, unless another caller has
        already done so since `generation` (the generation that caller saw die of `error`)."""
        with self._lock:
            if self.generation != generation:
                return
            began = time.perf_counter()
            self.last_failure = self._describe(error)
            why = f" ({self.last_failure})" if self.last_failure else ""
            logger.warning("the trainer of %s died%s; restarting it", self.base_model, why)
            self._kill()  # make sure every rank is gone, freeing its bundle
            self.ranks = start_trainer(self.base_model, self.config, self.reservations)
            ray_get(self.handle.base_model_path.remote())
            for client in self.clients:
                client.restore_on(self.handle)
            self.generation += 1
            self.restart_seconds.append(time.perf_counter() - began)
            logger.warning(
                "trainer of %s restarted, %d client(s) restored in %.1fs",
                self.base_model,
                len(self.clients),
                self.restart_seconds[-1],
            )

    def release(self, client: Restorable, model_id: str) -> None:
        """Deletes `model_id`'s adapter from the trainer; the client is no longer restored."""
        with self._lock:
            if client in self.clients:
                self.clients.remove(client)
            try:
                ray_get(self.handle.release.remote(model_id))
            except BaseException as error:
                if not is_trainer_death(error):  # a dead trainer holds nothing any more
                    raise

    def close(self) -> None:
        if self.passes is not None:
            self.passes.close()
        self._kill()
        for reservation in self.reservations:
            reservation.release()

    def _kill(self) -> None:
        for actor in self.ranks:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)

    def _describe(self, error: BaseException | None) -> str:
        """Why the trainer died, in one line ("" when it is not known): out of memory, or
        which rank of a sharded trainer. Never Ray's own report, which runs to pages."""
        if error is not None and is_out_of_memory(error):
            return "it ran out of memory; Ray's memory monitor ended it"
        if isinstance(error, TrainerRankError):
            return str(error)
        if self.config.world_size > 1:  # clients call rank 0 only: it is the one that died
            return f"trainer rank 0 of {self.config.world_size} died"
        return ""


def is_trainer_death(error: BaseException) -> bool:
    """Whether `error` says the trainer process is gone (not an error the trainer raised)."""
    return is_out_of_memory(error) or isinstance(
        error, (ray.exceptions.RayActorError, TrainerRankError)
    )


def is_out_of_memory(error: BaseException) -> bool:
    """Whether Ray's memory monitor ended the process: Ray reports it as its own error, or as
    the actor's death with the monitor's report as the cause."""
    if isinstance(error, ray.exceptions.OutOfMemoryError):
        return True
    return isinstance(error, ray.exceptions.RayActorError) and any(
        words in str(error) for words in _OOM_WORDS
    )


# What Ray's memory monitor writes when it kills a worker (its report, many lines, follows).
_OOM_WORDS = ("running low on memory", "memory usage threshold", "OutOfMemoryError")


__all__ = ["Reservation", "TrainerHost", "is_out_of_memory", "is_trainer_death"]
