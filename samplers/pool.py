"""A pool of sampler actors serving one base model: request spreading, retries, weight pushes.

Runs in the driver on one background asyncio loop (shared by every pool of the process), so
any number of `sample` futures can be in flight: each is a coroutine awaiting one actor call.

- Fair turns: at most `SamplerConfig.fair_window` sequences per actor are in flight on the
  actors (about what the engines run at once); past it requests wait in the pool, one queue
  per owner (`SampleRequest.turn_owner`), and are let in round-robin (samplers/fair.py).
  Weight pushes and the post-sync check (`sample_on_each`) do not wait for a turn.
- Spreading: each request goes to the live actor with the fewest requests in flight.
- Actor death: the requests that were in flight on it fail with a Ray actor error and are
  resubmitted to a live actor (at most `max_request_retries` times); each request's future is
  settled exactly once, so nothing is lost or answered twice. Ray restarts the actor
  (`max_restarts`); the pool waits for it in the background and then sends it work again.
  One that cannot be restarted any more is replaced. An engine that fails inside a live
  actor (`EngineFailedError`) counts as a death too. A slot whose actors keep dying at
  start (`max_restarts` replacements in a row) is given up, and calls end with the actor's
  own error message rather than a wait: a crash loop is reported, not retried forever.
- Weights: the pool remembers where every loadable weight version comes from (an ObjectRef
  of the trainer's adapter or merged weights, or a checkpoint path). An actor that lacks the
  version a request needs (restarted, or it unloaded an old version) answers
  `WeightsNotLoadedError`; the pool pushes the weights to it and resubmits.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from rl.errors import NotFoundError
from rl.futures import unwrap_ray_error
from rl.placement import Reservation, reserve
from rl.types import SampleResponse
from samplers.config import SamplerConfig
from samplers.fair import FairGate
from samplers.types import (
    EngineFailedError,
    EngineInfo,
    SampleRequest,
    WeightsNotLoadedError,
    WeightsSupersededError,
    WeightsVersion,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def event_loop() -> asyncio.AbstractEventLoop:
    """The process-wide loop all pools run on (a daemon thread, started on first use)."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(
                target=loop.run_forever, name="engineroom-sampling", daemon=True
            ).start()
            _loop = loop
        return _loop


def submit(coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    return asyncio.run_coroutine_threadsafe(coroutine, event_loop())


class SamplerUnavailableError(RuntimeError):
    """No sampler actor could serve a request (all dead, or retries exhausted)."""


# What ends an actor's part in a call: Ray reports the process gone, or its engine broke.
_DEATHS = (RayActorError, EngineFailedError)


@dataclass
class _Slot:
    index: int
    handle: Any
    reservation: Reservation
    incarnation: str | None = None
    inflight: int = 0
    reviving: asyncio.Task | None = None
    pushes: dict[WeightsVersion, asyncio.Task] = field(default_factory=dict)
    last_error: str | None = None  # the actor's own words on its last death, where known
    broken: bool = False  # its actors kept dying at start: given up

    @property
    def live(self) -> bool:
        return self.incarnation is not None


class SamplerPool:
    """Sampler actors for one base model (`enable_lora`: adapter versions can be served)."""

    def __init__(self, model_dir: str, config: SamplerConfig, *, enable_lora: bool, label: str):
        self.model_dir = model_dir
        self.config = config
        self.enable_lora = enable_lora
        self.label = label
        self.info: EngineInfo | None = None
        self._slots: list[_Slot] = []
        self._sources: dict[WeightsVersion, Any] = {}
        self._history: dict[str, collections.deque[WeightsVersion]] = {}
        self._latest_merged: dict[str, WeightsVersion] = {}
        self._version_ids = itertools.count(1)
        self._turns = itertools.count()
        self._any_live: asyncio.Event | None = None
        self._gate = FairGate()  # its window is set once the engines are up
        self._closed = False
        # Kept for the sampling client: checkpoint path -> its version, last probe scores per
        # training client (for the sync check), the tokenizer (loaded on first need).
        self.path_versions: dict[str, WeightsVersion] = {}
        self.probe_scores: dict[str, Any] = {}
        self.tokenizer: Any = None

    # -- lifecycle (called from user threads) ----------------------------------------------

    def start(self) -> SamplerPool:
        """Reserves each actor's resources (a bounded wait, here in the caller's thread, not
        on the shared loop), starts the actors and waits until every engine is up."""
        reservations: list[Reservation] = []
        try:
            for index in range(self.config.num_actors):
                reservations.append(
                    reserve(
                        f"sampler actor {index} of pool {self.label}",
                        self.config.num_cpus_per_actor,
                        self._num_gpus(),
                        self.config.schedule_timeout_s,
                        self.config.resources_per_actor,
                    )
                )
            submit(self._start(reservations)).result()
        except BaseException:
            self._closed = True
            for reservation in reservations:
                reservation.release()
            raise
        return self

    async def _start(self, reservations: list[Reservation]) -> None:
        self._any_live = asyncio.Event()
        self._slots = [
            _Slot(i, self._new_actor(reservation), reservation)
            for i, reservation in enumerate(reservations)
        ]
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(slot.handle.ready.remote() for slot in self._slots)),
                self.config.actor_ready_timeout_s,
            )
        except _DEATHS as error:
            raise SamplerUnavailableError(
                f"a sampler actor of pool {self.label} failed to start: "
                f"{_own_words(error) or error}"
            ) from None
        for slot, (incarnation, info) in zip(self._slots, results, strict=True):
            slot.incarnation = incarnation
            self.info = info
        assert self.info is not None
        self._gate.resize(self.config.resolved_fair_window(self.info) * len(self._slots))
        self._any_live.set()

    def _num_gpus(self) -> float:
        return self.config.resolved_gpus(ray.cluster_resources().get("GPU", 0))

    def _new_actor(self, reservation: Reservation) -> Any:
        """An actor inside `reservation` (a replacement reuses its predecessor's)."""
        from samplers.actor import SamplerActor
        from samplers.engine_vllm import engine_env

        config = self.config
        # Ray gives each worker OMP_NUM_THREADS = its CPU reservation; OpenMP reads it when
        # torch loads, before the actor runs, and vLLM's CPU kernels then run ~20% slower
        # than with all cores even after torch.set_num_threads. So it is set here.
        env = {**engine_env(), "OMP_NUM_THREADS": str(config.resolved_threads())}
        return (
            ray.remote(SamplerActor)
            .options(
                **reservation.actor_options(),
                max_restarts=config.max_restarts,
                max_task_retries=0,  # the pool resubmits, to a live actor, not Ray
                max_concurrency=1000,
                runtime_env={"env_vars": env},
            )
            .remote(self.model_dir, config, self.enable_lora)
        )

    def close(self) -> None:
        """Kills the actors; pending requests fail."""
        self._closed = True
        closed = SamplerUnavailableError(f"sampler pool {self.label} was shut down")
        event_loop().call_soon_threadsafe(self._gate.close, closed)
        for slot in self._slots:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(slot.handle, no_restart=True)
            slot.reservation.release()

    def actor_handles(self) -> list[Any]:
        return [slot.handle for slot in self._slots]

    def inflight(self) -> list[int]:
        return [slot.inflight for slot in self._slots]

    def waiting(self) -> dict[str, int]:
        """Requests waiting for their turn, per owner (a snapshot; for metrics)."""
        return self._gate.waiting()

    # -- requests --------------------------------------------------------------------------

    async def sample(self, request: SampleRequest) -> SampleResponse:
        """Serves one request, in its owner's turn, on the least busy live actor; survives
        actor deaths (retries keep the request's place in the window)."""
        self.check_loadable(request.weights)
        async with self._gate.turn(request.turn_owner(), request.num_samples):
            return await self._sample_retrying(request)

    async def _sample_retrying(self, request: SampleRequest) -> SampleResponse:
        deaths = 0
        while True:
            slot = await self._pick()
            try:
                return await self._sample_on(slot, request)
            except _DEATHS as error:
                deaths += 1
                if deaths > self.config.max_request_retries:
                    raise SamplerUnavailableError(
                        f"request failed on {deaths} sampler actors that died; the last one: "
                        f"{slot.last_error or _own_words(error) or error}"
                    ) from None
                logger.warning("sampler actor %d died; resubmitting request", slot.index)

    async def sample_on_each(self, request: SampleRequest) -> list[SampleResponse]:
        """The same request on every live actor (to verify each one after a sync).

        An actor that dies meanwhile is left out: it gets the weights pushed again when it
        is back. Waits for at least one live actor; raises if none answers.
        """
        await self._pick()
        answers = await self._on_each_live(lambda slot: self._sample_on(slot, request))
        if not answers:
            raise SamplerUnavailableError(
                f"every sampler actor of {self.label} died meanwhile{self._last_words()}"
            )
        return answers

    async def _sample_on(self, slot: _Slot, request: SampleRequest) -> SampleResponse:
        for _ in range(3):
            incarnation = slot.incarnation
            slot.inflight += 1
            try:
                return await slot.handle.sample.remote(request)
            except WeightsNotLoadedError:
                await self._push_to(slot, request.weights)
            except _DEATHS as error:
                self._mark_down(slot, incarnation, error)
                raise
            finally:
                slot.inflight -= 1
        raise SamplerUnavailableError(
            f"sampler actor {slot.index} keeps losing {request.weights.describe()}"
        )

    async def _pick(self) -> _Slot:
        assert self._any_live is not None
        deadline = time.monotonic() + self.config.actor_ready_timeout_s
        while True:
            if self._closed:
                raise SamplerUnavailableError(f"sampler pool {self.label} was shut down")
            if all(slot.broken for slot in self._slots):
                raise SamplerUnavailableError(
                    f"every sampler actor of pool {self.label} keeps dying as it starts"
                    f"{self._last_words()}"
                )
            live = [slot for slot in self._slots if slot.live]
            if live:
                # Fewest in flight; ties rotate, so one-at-a-time callers use every actor too.
                turn = next(self._turns) % len(self._slots)
                n = len(self._slots)
                return min(live, key=lambda slot: (slot.inflight, (slot.index - turn) % n))
            self._any_live.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SamplerUnavailableError(
                    f"no live sampler actor in pool {self.label}{self._last_words()}"
                )
            try:
                await asyncio.wait_for(self._any_live.wait(), remaining)
            except TimeoutError:
                continue

    # -- actor deaths ------------------------------------------------------------------------

    def _last_words(self) -> str:
        """The actors' own errors on their last deaths, for a message ("" when unknown)."""
        words = sorted({slot.last_error for slot in self._slots if slot.last_error})
        return f"; the actor's error: {' | '.join(words)}" if words else ""

    def _mark_down(
        self, slot: _Slot, incarnation: str | None, error: BaseException | None = None
    ) -> None:
        words = _own_words(error) if error is not None else None
        if words:
            slot.last_error = words
        if slot.incarnation is None or slot.incarnation != incarnation:
            return  # already known, or a late error from an earlier incarnation
        slot.incarnation = None
        slot.pushes.clear()
        slot.reviving = asyncio.get_running_loop().create_task(self._revive(slot))

    async def _revive(self, slot: _Slot) -> None:
        """Waits for Ray to restart the actor; replaces it when it is dead for good, and
        gives the slot up when its replacements keep dying too (a crash loop)."""
        dead_answers = 0
        replaced = 0
        while not self._closed:
            try:
                incarnation, _ = await slot.handle.ready.remote()
            except (ActorUnavailableError, EngineFailedError):
                await asyncio.sleep(0.5)  # restarting, or about to end and restart
                continue
            except RayActorError as error:
                # Calls in flight at the death also end here; twice in a row means DEAD.
                slot.last_error = _own_words(error) or slot.last_error
                dead_answers += 1
                if dead_answers >= 2:
                    if replaced >= self.config.max_restarts:
                        logger.error(
                            "sampler actor %d keeps dying as it starts; giving it up: %s",
                            slot.index,
                            slot.last_error,
                        )
                        slot.broken = True
                        assert self._any_live is not None
                        self._any_live.set()  # wake callers waiting for an actor
                        return
                    logger.warning("sampler actor %d cannot restart; replacing it", slot.index)
                    with contextlib.suppress(Exception):
                        ray.kill(slot.handle, no_restart=True)
                    slot.handle = self._new_actor(slot.reservation)
                    replaced += 1
                    dead_answers = 0
                await asyncio.sleep(0.5)
                continue
            slot.incarnation = incarnation
            assert self._any_live is not None
            self._any_live.set()
            logger.info("sampler actor %d is back (%s)", slot.index, incarnation)
            return

    async def sleep(self) -> bool:
        """Puts every live engine to sleep until its next request (vLLM sleep mode); whether
        they sleep. An actor that dies meanwhile is left out (it restarts awake)."""
        slept = await self._on_each_live(lambda slot: slot.handle.sleep.remote())
        return any(slept)

    # -- weights -----------------------------------------------------------------------------

    def new_version(self, kind: str, model_id: str) -> WeightsVersion:
        """A version id never used before in this pool (vLLM LoRA ids must be unique)."""
        return WeightsVersion(kind, model_id, next(self._version_ids))  # type: ignore[arg-type]

    def check_loadable(self, weights: WeightsVersion) -> None:
        latest = self._latest_merged.get(weights.model_id)
        if weights.kind == "merged" and latest is not None and latest.version > weights.version:
            raise WeightsSupersededError(weights, f"sampler pool {self.label}")
        if weights.kind == "adapter" and weights not in self._sources:
            raise NotFoundError(
                f"{weights.describe()} is no longer loadable: only the last "
                f"{self.config.max_versions_per_model} versions of a training client stay "
                "available (SamplerConfig.max_versions_per_model); use a newer sampling client"
            )

    def is_registered(self, weights: WeightsVersion) -> bool:
        """Whether the pool still knows where `weights` come from (to push them again)."""
        return weights in self._sources

    def register(self, weights: WeightsVersion, source: Any) -> None:
        """Remembers where `weights` come from (ObjectRef or path), for pushes and re-pushes."""
        if weights.kind == "merged":
            old = self._latest_merged.get(weights.model_id)
            if old is not None:
                self._sources.pop(old, None)
            self._latest_merged[weights.model_id] = weights
        elif weights.kind == "adapter":
            history = self._history.setdefault(weights.model_id, collections.deque())
            history.append(weights)
            while len(history) > self.config.max_versions_per_model:
                self._sources.pop(history.popleft(), None)
        self._sources[weights] = source

    def versions_of(self, model_id: str) -> list[WeightsVersion]:
        """The adapter versions of training client `model_id` this pool can load."""
        return list(self._history.get(model_id, ()))

    async def forget(self, versions: list[WeightsVersion]) -> None:
        """Drops `versions` (adapters): no request may use them any more, and every actor
        unloads them once their running requests finish."""
        for weights in versions:
            self._sources.pop(weights, None)
            history = self._history.get(weights.model_id)
            if history is not None and weights in history:
                history.remove(weights)
                if not history:
                    del self._history[weights.model_id]
            self.probe_scores.pop(weights.model_id, None)
        self.path_versions = {p: w for p, w in self.path_versions.items() if w not in versions}
        ids = [w.version for w in versions]
        await self._on_each_live(lambda slot: slot.handle.retire.remote(ids))

    async def push(self, weights: WeightsVersion, source: Any) -> dict[str, float]:
        """Registers `weights` and loads them on every live actor; returns timings."""
        self.register(weights, source)
        # An actor that died is left out: it gets the weights when it is back.
        timings: dict[str, float] = {}
        for result in await self._on_each_live(lambda slot: self._push_to(slot, weights)):
            for key, value in result.items():
                timings[key] = max(timings.get(key, 0.0), value)
        return timings

    async def _on_each_live(self, call: Callable[[_Slot], Awaitable[T]]) -> list[T]:
        """`call` on every live actor at once: the results of those that did not die
        meanwhile; any other error is raised."""
        results = await asyncio.gather(
            *(call(slot) for slot in self._slots if slot.live), return_exceptions=True
        )
        answers = [r for r in results if not isinstance(r, _DEATHS)]
        for result in answers:
            if isinstance(result, BaseException):
                raise result
        return answers  # type: ignore[return-value]

    async def _push_to(self, slot: _Slot, weights: WeightsVersion) -> dict[str, float]:
        """Loads `weights` on one actor, once (concurrent callers share the load)."""
        self.check_loadable(weights)  # merged weights that a later sync replaced: not again
        task = slot.pushes.get(weights)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(slot, weights))
            slot.pushes[weights] = task
            task.add_done_callback(lambda _: slot.pushes.pop(weights, None))
        return await task

    async def _load(self, slot: _Slot, weights: WeightsVersion) -> dict[str, float]:
        source = self._sources.get(weights)
        if source is None:
            self.check_loadable(weights)
            raise NotFoundError(f"{weights.describe()} is not known to sampler pool {self.label}")
        incarnation = slot.incarnation
        try:
            if weights.kind == "merged":
                return await slot.handle.load_merged.remote(weights, source)
            return await slot.handle.load_adapter.remote(weights, source)
        except _DEATHS as error:
            self._mark_down(slot, incarnation, error)
            raise


def _own_words(error: BaseException) -> str | None:
    """The actor's own error in a death report: an engine failure's message, or the last
    line of the traceback of an actor that failed in its constructor. None for a plain
    death (killed, out of memory), where Ray knows nothing more than that it ended."""
    if isinstance(error, EngineFailedError):
        return str(unwrap_ray_error(error))
    if isinstance(error, RayActorError) and error.actor_init_failed:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return lines[-1] if lines else None
    return None
