"""What `GET /metrics` shows (Prometheus text, `prometheus_client`): the server's counters, its
queues, and the memory of the trainer and sampler actors.

Counting happens where things happen: `@metered` on the `ServerState` methods of the calls
(each call, its failure, the tokens of its result, the time to its result), `released` where a
model is released, `limited` where a limit refuses a call, and `RequestTimer` (ASGI middleware)
around every HTTP answer. Gauges are read at scrape time: the state's models and held calls,
the in-flight gate's queues, and `ActorMemory`, which asks the actors at most every few
seconds and keeps a scrape waiting half a second at most: a trainer runs one call at a time,
so during a long call its answer comes a scrape later, and the last one is shown meanwhile.

Every tenant's name and counts are in the labels: whoever can scrape `/metrics` sees them all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar

import ray
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rl.errors import CheckpointError, InvalidRequestError, NotFoundError
from rl.server.limits import InflightGate, LimitError
from rl.types import ForwardBackwardOutput, SampleResponse

if TYPE_CHECKING:
    from rl.client.service import ServiceClient
    from rl.server.config import ServerConfig
    from rl.server.futures import FutureStore
    from rl.server.provenance import SequenceStore

logger = logging.getLogger("rl.server")

# Seconds: an HTTP answer takes milliseconds (a long poll up to --long_poll_s), a call's
# result from milliseconds (a sample of a tiny model) to minutes (a large batch on CPU).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# The calls whose results count tokens, and what their tokens are.
TOKEN_KINDS = {"forward_backward": "trained", "forward": "forward", "sample": "sampled"}
# The failures retrieve_future reports with category "user" (rl/server/routes/futures.py).
USER_ERRORS = (InvalidRequestError, NotFoundError, CheckpointError, ValueError, KeyError, TypeError)


class Observed(Protocol):
    """What the gauges read: `ServerState`."""

    config: ServerConfig
    service: ServiceClient
    limits: InflightGate
    sequences: SequenceStore

    def models_alive(self) -> dict[str, int]: ...

    def held_calls(self) -> dict[str, int]: ...


class Metered(Protocol):
    """What `@metered` needs of the object whose methods it wraps: `ServerState`."""

    metrics: ServerMetrics
    futures: FutureStore


class ServerMetrics:
    """The registry of one server and its instruments (a registry per server, not the
    process-wide one: a test process runs several servers)."""

    def __init__(self, state: Observed):
        r = self.registry = CollectorRegistry()
        self.actors = ActorMemory(state.service)
        tenant_call = ["tenant", "call"]
        self.calls = Counter("engineroom_calls", "Calls made", tenant_call, registry=r)
        self.errors = Counter(
            "engineroom_errors", "Calls that failed", [*tenant_call, "category"], registry=r
        )
        self.tokens = Counter(
            "engineroom_tokens", "Tokens of finished calls", ["tenant", "kind"], registry=r
        )
        self.released_models = Counter(
            "engineroom_models_released", "Models released", ["tenant", "reason"], registry=r
        )
        self.limited_calls = Counter(
            "engineroom_limited", "Calls a limit refused", ["tenant", "limit"], registry=r
        )
        self.pending = Gauge(
            "engineroom_futures_pending",
            "Futures not finished",
            ["tenant", "encoding"],
            registry=r,
        )
        self.call_seconds = Histogram(
            "engineroom_call_seconds",
            "From a call's acceptance to its result",
            ["call"],
            buckets=BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "engineroom_http_request_seconds",
            "HTTP answer latency",
            ["route"],
            buckets=BUCKETS,
            registry=r,
        )
        self.responses = Counter(
            "engineroom_http_responses", "HTTP answers", ["route", "status"], registry=r
        )
        r.register(StateGauges(state, self.actors))
        self._lock = threading.Lock()
        self._watched: weakref.WeakSet[concurrent.futures.Future] = weakref.WeakSet()

    # -- counting --------------------------------------------------------------------------

    def failed(self, tenant: str, call: str, error: BaseException) -> None:
        category = "user" if isinstance(error, USER_ERRORS) else "server"
        self.errors.labels(tenant, call, category).inc()
        if isinstance(error, LimitError):
            self.limited(tenant, error.limit)

    def limited(self, tenant: str, limit: str) -> None:
        self.limited_calls.labels(tenant, limit).inc()

    def released(self, tenant: str, why: str) -> None:
        self.released_models.labels(tenant, release_reason(why)).inc()

    def answered(self, route: str, status: int, seconds: float) -> None:
        self.request_seconds.labels(route).observe(seconds)
        self.responses.labels(route, str(status)).inc()

    def watch(
        self, tenant: str, call: str, future: concurrent.futures.Future, encoding: str | None
    ) -> None:
        """Counts `future`'s failure, or its result's tokens, and its time, when it is done;
        a future watched already (a retried request gets the same one back) is not again.
        `encoding`: the retrieve_future encoding of its result; None for a future the client
        does not poll (a sampling session's start), which is not pending."""
        with self._lock:
            if future in self._watched:
                return
            self._watched.add(future)
        began = time.perf_counter()
        pending = self.pending.labels(tenant, encoding) if encoding is not None else None
        if pending is not None:
            pending.inc()

        def done(f: concurrent.futures.Future) -> None:
            if pending is not None:
                pending.dec()
            self.call_seconds.labels(call).observe(time.perf_counter() - began)
            error = f.exception() if not f.cancelled() else concurrent.futures.CancelledError()
            if error is not None:
                self.failed(tenant, call, error)
            elif call in TOKEN_KINDS:
                self.tokens.labels(tenant, TOKEN_KINDS[call]).inc(tokens_of(f.result()))

        future.add_done_callback(done)

    async def render(self) -> bytes:
        """The Prometheus text; off the event loop (the actors' memory is read first)."""
        return await asyncio.to_thread(self._render)

    def _render(self) -> bytes:
        self.actors.refresh()
        return generate_latest(self.registry)


S = TypeVar("S", bound=Metered)
P = ParamSpec("P")
R = TypeVar("R")
Method = Callable[Concatenate[S, str, P], R]


def metered(name: Callable[..., str] | None = None) -> Callable[[Method[S, P, R]], Method[S, P, R]]:
    """Counts a `ServerState` call method's calls and errors under its tenant (the first
    argument), and watches the future it returns (a request id, or a Future). The call type is
    the method's name, or `name(*args)` of the arguments after the tenant."""

    def wrap(method: Method[S, P, R]) -> Method[S, P, R]:
        @functools.wraps(method)
        def counted(self: S, tenant: str, /, *args: P.args, **kwargs: P.kwargs) -> R:
            call = name(*args) if name is not None else method.__name__
            self.metrics.calls.labels(tenant, call).inc()
            try:
                result = method(self, tenant, *args, **kwargs)
            except Exception as error:
                self.metrics.failed(tenant, call, error)
                raise
            if isinstance(result, str):  # a request id
                try:
                    item = self.futures.get(tenant, result)
                except NotFoundError:
                    return result
                self.metrics.watch(tenant, call, item.future, item.encoding)
            elif isinstance(result, concurrent.futures.Future):
                self.metrics.watch(tenant, call, result, None)
            return result

        return counted

    return wrap


def tokens_of(result: object) -> int:
    """Tokens of a call's result: one logprob per trained token, the sampled sequences'."""
    if isinstance(result, ForwardBackwardOutput):
        return sum(len(o["logprobs"].data) for o in result.loss_fn_outputs if "logprobs" in o)
    if isinstance(result, SampleResponse):
        return sum(len(s.tokens) for s in result.sequences)
    return 0


def release_reason(why: str) -> str:
    """The label of a release, from the words ServerState gives it (rl/server/state.py)."""
    if "heartbeat" in why:
        return "session_timeout"
    if "closed" in why:
        return "close"
    if "unload_model" in why:
        return "unload"
    return "other"  # e.g. the session ended while the model was being created


class StateGauges(Collector):
    """The gauges read at scrape time: models, queues, limits, and the actors' memory."""

    def __init__(self, state: Observed, actors: ActorMemory):
        self.state = state
        self.actors = actors

    def collect(self) -> Iterator[Metric]:
        gate = self.state.limits.snapshot()
        yield _family("engineroom_models_alive", "Models alive", self.state.models_alive())
        yield _family("engineroom_calls_held", "Calls held for their turn", self.state.held_calls())
        yield _family("engineroom_calls_inflight", "Calls in flight", gate["inflight"])
        yield _family("engineroom_calls_waiting", "Calls waiting for room", gate["waiting"])
        queued = CounterMetricFamily(
            "engineroom_calls_queued", "Calls that waited for room", labels=["tenant"]
        )
        for tenant, n in sorted(gate["queued_total"].items()):
            queued.add_metric([tenant], n)
        yield queued
        yield from _sequence_families(self.state.sequences)
        config = self.state.config
        caps = GaugeMetricFamily("engineroom_limit", "The server's caps", labels=["limit"])
        for limit in ("max_models_per_tenant", "max_inflight_per_tenant", "max_inflight_samples"):
            caps.add_metric([limit], getattr(config, limit))
        yield caps
        yield from self.actors.families()


def _sequence_families(store: SequenceStore) -> Iterator[Metric]:
    """The sampled-sequence records (rl/server/provenance.py): held, their bytes, and those
    dropped, by why (`expired`, `evicted`, `session ended`)."""
    held = store.snapshot()
    yield _family(
        "engineroom_sequences_recorded",
        "Sampled sequences recorded",
        {t: n for t, (n, _) in held.items()},
    )
    yield _family(
        "engineroom_sequence_record_bytes",
        "Bytes of the sequence records",
        {t: b for t, (_, b) in held.items()},
    )
    dropped = CounterMetricFamily(
        "engineroom_sequences_dropped", "Sequence records dropped", labels=["tenant", "reason"]
    )
    for (tenant, why), n in sorted(store.dropped().items()):
        dropped.add_metric([tenant, why], n)
    yield dropped


def _family(name: str, doc: str, values: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["tenant"])
    for tenant, n in sorted(values.items()):
        family.add_metric([tenant], n)
    return family


class ActorMemory:
    """The trainers' adapters and peak RSS (asked of the actor) and every actor's RSS (psutil
    on the actor's pid, when it runs on this node), read at most every `ttl_s`.

    An answer a busy trainer has not given within `wait_s` is read at a later refresh; until
    then the last one is shown. Whatever cannot be read (an actor on another node, a trainer
    without the method) is left out, not guessed."""

    def __init__(self, service: ServiceClient, ttl_s: float = 5.0, wait_s: float = 0.5):
        self.service = service
        self.ttl_s, self.wait_s = ttl_s, wait_s
        self._lock = threading.Lock()
        self._read_at = -float("inf")
        self._asked: dict[tuple[str, str], Any] = {}  # (base model, what) -> ObjectRef
        self._answers: dict[tuple[str, str], Any] = {}
        self._readings: dict[str, list[tuple[list[str], float]]] = {}

    def refresh(self) -> None:
        with self._lock:
            if time.monotonic() - self._read_at < self.ttl_s:
                return
            self._read_at = time.monotonic()
            try:
                self._readings = self._read()
            except Exception:  # Ray is going away; show nothing rather than fail the scrape
                logger.debug("reading the actors' memory failed", exc_info=True)
                self._readings = {}

    def families(self) -> Iterator[Metric]:
        with self._lock:
            readings = dict(self._readings)
        for name, doc, labels in _ACTOR_FAMILIES:
            family = GaugeMetricFamily(name, doc, labels=labels)
            for values, value in readings.get(name, []):
                family.add_metric(values, value)
            yield family

    def _read(self) -> dict[str, list[tuple[list[str], float]]]:
        hosts = dict(self.service.hosts)
        self._ask(hosts)
        held, resident, peak, rss = [], [], [], []
        for base, host in hosts.items():
            held.append(([base], float(len(host.clients))))
            if (base, "resident") in self._answers:
                resident.append(([base], float(len(self._answers[base, "resident"]))))
            elif (base, "no_paging") in self._answers:  # every adapter it holds is in the model
                resident.append(([base], float(len(host.clients))))
            if (base, "memory") in self._answers:
                peak.append(([base], self._answers[base, "memory"]["peak_rss_mib"] * 2**20))
            for rank, handle in enumerate(host.ranks):
                rss.append((["trainer", f"{base}#{rank}"], _local_rss(handle)))
        for key, pool in self.service.pools.started().items():
            for i, handle in enumerate(pool.actor_handles()):
                rss.append((["sampler", f"{key}#{i}"], _local_rss(handle)))
        return {
            "engineroom_trainer_adapters": held,
            "engineroom_trainer_adapters_resident": resident,
            "engineroom_trainer_peak_rss_bytes": peak,
            "engineroom_actor_rss_bytes": [(labels, v) for labels, v in rss if v is not None],
        }

    def _ask(self, hosts: dict[str, Any]) -> None:
        """Asks each trainer what has not been asked yet; reads what has been answered."""
        for base, host in hosts.items():
            resident = getattr(host.handle, "resident_adapter_ids", None)
            if resident is None:
                self._answers[base, "no_paging"] = True
            for what, method in (("memory", host.handle.memory_stats), ("resident", resident)):
                if method is not None and (base, what) not in self._asked:
                    self._asked[base, what] = method.remote()
        refs = list(self._asked.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.wait_s) if refs else ([], [])
        for key, ref in list(self._asked.items()):
            if ref in ready:
                del self._asked[key]
                try:
                    self._answers[key] = ray.get(ref)
                except Exception:  # the trainer died or restarted: asked again next time
                    self._answers.pop(key, None)


_ACTOR_FAMILIES = [
    ("engineroom_trainer_adapters", "Adapters the trainer holds", ["base_model"]),
    ("engineroom_trainer_adapters_resident", "Adapters in the model now", ["base_model"]),
    ("engineroom_trainer_peak_rss_bytes", "Peak RSS of the trainer", ["base_model"]),
    ("engineroom_actor_rss_bytes", "RSS of each actor on this node", ["role", "actor"]),
]


def _local_rss(handle: Any) -> float | None:
    """The RSS of the actor's process, when it runs on this node (Ray's actor table has its
    pid); None otherwise."""
    try:
        import psutil
        from ray._private.state import state as ray_state

        info = ray_state.actor_table(handle._actor_id.hex())
        if info["Address"]["NodeID"] != ray.get_runtime_context().get_node_id():
            return None
        return float(psutil.Process(info["Pid"]).memory_info().rss)
    except Exception:  # not found, gone, another node: left out
        return None


class RequestTimer:
    """ASGI middleware: each HTTP answer's latency and status, by route template."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.answered(f"{scope['method']} {route}", status, time.perf_counter() - began)


__all__ = ["ActorMemory", "RequestTimer", "ServerMetrics", "metered", "release_reason"]
