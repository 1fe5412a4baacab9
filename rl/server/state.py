"""What the server holds: sessions, training clients, sampling clients, futures, run records.

Every method takes the calling tenant first and finds objects only among that tenant's: an
object of another tenant raises NotFoundError with the same words as an unknown id. The
training and sampling work itself is the in-process client API's (`rl.ServiceClient`,
`TrainingClient`, `SamplingClient`); this module only names things the way Tinker clients
expect (`<session>:train:<n>`, `<session>:sample:<n>`, `tinker://` paths) and orders calls.

What a restart keeps: run records and checkpoints (rl/server/store.py). What it loses: models
and sampling sessions that live only in memory; a client resumes from a saved checkpoint.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tinker import types as tt

from rl.client import weight_sync
from rl.client.sampling import SamplingClient
from rl.client.service import ServiceClient
from rl.client.training import TrainingClient
from rl.client.weight_sync import PendingSync
from rl.errors import InvalidRequestError, NotFoundError
from rl.futures import chain, settle
from rl.models import resolve_model
from rl.server.config import ServerConfig
from rl.server.custom_losses import CustomLosses
from rl.server.door_cache import SamplerCache
from rl.server.futures import Encoding, FutureStore, ModelOrder, failed, flatten
from rl.server.lifecycle import SessionReaper
from rl.server.limits import InflightGate, check_models
from rl.server.metrics import ServerMetrics, metered
from rl.server.provenance import SequenceStore, record_sample, resolve, sequence_ids, session_of
from rl.server.store import RunRecord, RunStore, tinker_path
from rl.server.wire import ForwardBackwardCall, model_input, sampling_params, tensor_data
from rl.types import AdamParams, SampleResponse

logger = logging.getLogger("rl.server")
_RELEASED_KEPT = 10_000  # released model ids remembered, for their error message

# One pool for the blocking client-API calls (starting actors, weight syncs): a few at once.
_blocking = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="engineroom-server")


@dataclass
class Session:
    tenant: str
    created: float
    last_heartbeat: float
    finished: bool = False
    tags: list[str] = field(default_factory=list)


@dataclass
class Model:
    tenant: str
    client: TrainingClient
    order: ModelOrder = field(default_factory=ModelOrder)


@dataclass
class Sampler:
    tenant: str
    client: SamplingClient
    base_model: str
    model_path: str | None  # the tinker:// path it was made from
    local_path: str | None = None  # that checkpoint's directory here


class ServerState:
    def __init__(self, config: ServerConfig, service: ServiceClient):
        self.config = config
        self.service = service
        # Checkpoints are where the service's trainer writes them.
        self.runs = RunStore(config.resolved_home(), service.checkpoint_dir)
        self.futures = FutureStore()
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._models: dict[str, Model] = {}
        self._creating: dict[str, tuple[str, str]] = {}  # model id -> (tenant, request id)
        self._samplers: dict[str, Sampler] = {}
        # The OpenAI and Anthropic doors' sampling clients.
        self.door_samplers = SamplerCache(service, config.door_idle_s, self._sampled_in_session)
        self._sampler_starts: dict[str, tuple[str, concurrent.futures.Future]] = {}
        # Model ids released (session ended, unload_model) -> why, for a clear error later.
        self._released: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._served = self._served_models(config)
        self.limits = InflightGate(config.max_inflight_per_tenant)
        self.custom_losses = CustomLosses()  # create_custom_loss graphs, per session
        # Records of sampled sequences (record_stability_info), for provenance spans.
        self.sequences = SequenceStore(
            config.sequence_record_ttl_s, int(config.max_sequence_record_mib_per_tenant * 2**20)
        )
        self.metrics = ServerMetrics(self)
        self._reaper = SessionReaper(self, config.session_timeout_s)

    # -- models this server serves ---------------------------------------------------------

    @staticmethod
    def _served_models(config: ServerConfig) -> dict[str, str]:
        """Each accepted base-model name (and its local directory) -> the name to load."""
        served: dict[str, str] = {}
        for name in config.model_names():
            served[name] = name
            with contextlib.suppress(InvalidRequestError):  # reported when asked for
                served[resolve_model(name)] = name
        return served

    def base_model(self, name: str | None) -> str:
        if not name or name not in self._served:
            raise InvalidRequestError(
                f"base model {name!r} is not served here; this server serves "
                f"{sorted(set(self._served.values()))} (start it with --models to add one)"
            )
        return name

    def capabilities(self) -> tt.GetServerCapabilitiesResponse:
        return tt.GetServerCapabilitiesResponse(
            supported_models=[
                tt.SupportedModel(
                    model_name=name,
                    max_context_length=self.config.max_context_length,
                    trainable=True,
                    sampleable=True,
                )
                for name in self.config.model_names()
            ]
        )

    # -- sessions --------------------------------------------------------------------------

    def create_session(self, tenant: str, request: tt.CreateSessionRequest) -> str:
        session_id = uuid.uuid4().hex[:16]
        now = time.time()
        with self._lock:
            self._sessions[session_id] = Session(tenant, now, now, tags=list(request.tags))
        return session_id

    def session(self, tenant: str, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or session.tenant != tenant:
            raise NotFoundError(f"session {session_id!r} not found")
        return session

    def heartbeat(self, tenant: str, session_id: str) -> bool:
        """False when the session has finished (the SDK then stops its heartbeat)."""
        session = self.session(tenant, session_id)
        session.last_heartbeat = time.time()
        return not session.finished

    @metered()
    def finish_session(self, tenant: str, session_id: str) -> None:
        """The SDK's `close`: the session ends now (its heartbeat gets 410, it makes no new
        model), and its models and samplers are released in the background: a release waits
        for the trainer's call under way, which must not hold up the answer."""
        self.session(tenant, session_id)
        ended = self._end(session_id)
        if ended is not None:
            _blocking.submit(self._release_all, *ended, "its session was closed")

    def expire_sessions(self, now: float) -> list[str]:
        """Ends the sessions whose last heartbeat is older than the timeout; their ids."""
        timeout = self.config.session_timeout_s
        with self._lock:
            stale = [
                session_id
                for session_id, s in self._sessions.items()
                if not s.finished and now - s.last_heartbeat > timeout
            ]
            # Sessions ended a timeout ago are forgotten (a heartbeat then gets 404, not 410).
            for session_id, s in list(self._sessions.items()):
                if s.finished and now - s.last_heartbeat > 2 * timeout:
                    del self._sessions[session_id]
        for session_id in stale:
            self.end_session(session_id, f"its session sent no heartbeat for {timeout:g} s")
        self.door_samplers.release_idle(now)
        return stale

    def end_session(self, session_id: str, why: str) -> None:
        """Ends the session and releases every model and sampler of it, now; its runs and
        checkpoints stay."""
        ended = self._end(session_id)
        if ended is not None:
            self._release_all(*ended, why)

    def _end(self, session_id: str) -> tuple[list[str], list[str]] | None:
        """Marks the session finished: (its model ids, its sampler ids); None if it was."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.finished:
                return None
            session.finished = True
            prefix = f"{session_id}:"
            models = [m for m in self._models if m.startswith(prefix)]
            samplers = [s for s in self._samplers if s.startswith(prefix)]
        self.sequences.end_session(session_id)  # provenance is session-scoped
        self.custom_losses.end_session(session_id)
        return models, samplers

    def _release_all(self, models: list[str], samplers: list[str], why: str) -> None:
        for model_id in models:
            self._release_model(model_id, why)
        for sampler_id in samplers:
            self._release_sampler(sampler_id)
        logger.info("released %d model(s) and %d sampler(s): %s", len(models), len(samplers), why)

    @metered()
    def unload_model(self, tenant: str, model_id: str) -> None:
        """Releases the model now (its adapter, optimizer state and sampler weights)."""
        self.model(tenant, model_id)  # another tenant's or an unknown one: NotFoundError
        self._release_model(model_id, "unload_model was called for it")

    def close(self) -> None:
        self._reaper.stop()
        self.limits.close()

    def _release_model(self, model_id: str, why: str) -> None:
        with self._lock:
            model = self._models.pop(model_id, None)
            self._creating.pop(model_id, None)
            if model is None:
                return
            self._released[model_id] = why
            while len(self._released) > _RELEASED_KEPT:
                self._released.popitem(last=False)
        self.metrics.released(model.tenant, why)
        self.service.release(model.client, why)

    def _release_sampler(self, sampler_id: str) -> None:
        """Forgets a sampling session; a checkpoint's weights leave the samplers with the last
        session that samples them (a sync's leave with its training client)."""
        with self._lock:
            sampler = self._samplers.pop(sampler_id, None)
            self._sampler_starts.pop(sampler_id, None)
            local = sampler.local_path if sampler is not None else None
        if local is None or self._sampled_in_session(local) or self.door_samplers.holds(local):
            return
        self.service.pools.release_checkpoint(local)

    def _sampled_in_session(self, local: str) -> bool:
        """Whether a sampling session samples the checkpoint at `local`."""
        with self._lock:
            return any(s.local_path == local for s in self._samplers.values())

    # -- training clients ------------------------------------------------------------------

    @metered()
    def create_model(self, tenant: str, request: tt.CreateModelRequest) -> str:
        """Starts creating the model; returns the request id of its future."""
        self.session(tenant, request.session_id)
        model_id = f"{request.session_id}:train:{request.model_seq_id}"
        base = self.base_model(request.base_model)
        lora = request.lora_config or tt.LoraConfig(rank=32)
        if getattr(request.optimizer_config, "type", "adamw") != "adamw":
            raise InvalidRequestError("this server has the AdamW optimizer only")

        def create() -> tt.CreateModelResponse:
            client = self.service.create_lora_training_client(
                base,
                rank=lora.rank,
                seed=lora.seed,
                train_mlp=lora.train_mlp,
                train_attn=lora.train_attn,
                train_unembed=lora.train_unembed,
                model_id=model_id,
            )
            self._add_model(tenant, model_id, client, request.user_metadata)
            return tt.CreateModelResponse(model_id=model_id)

        return self._start_model(tenant, model_id, create)

    @metered()
    def create_model_from_state(self, tenant: str, request: tt.LoadWeightsRequest) -> str:
        """`load_weights` with session addressing: a new model from a checkpoint (seq 0)."""
        assert request.session_id is not None and request.model_seq_id is not None
        self.session(tenant, request.session_id)
        model_id = f"{request.session_id}:train:{request.model_seq_id}"
        resolved = self.runs.resolve(tenant, request.path)
        base = self.base_model(request.base_model or resolved.run.base_model)
        create_fn = (
            self.service.create_training_client_from_state_with_optimizer
            if request.optimizer
            else self.service.create_training_client_from_state
        )

        def create() -> tt.LoadWeightsResponse:
            client = create_fn(str(resolved.local), base, model_id=model_id)
            metadata = request.user_metadata or resolved.run.user_metadata
            self._add_model(tenant, model_id, client, metadata)
            return tt.LoadWeightsResponse(path=request.path)

        return self._start_model(tenant, model_id, create)

    def _start_model(self, tenant: str, model_id: str, create: Callable[[], object]) -> str:
        with self._lock:
            if model_id in self._creating and self._creating[model_id][0] == tenant:
                return self._creating[model_id][1]  # a retried request: the same future
            if model_id in self._models:
                raise InvalidRequestError(f"model {model_id!r} exists already")
            check_models(tenant, self._models_alive()[tenant], self.config.max_models_per_tenant)
            request_id = self.futures.add(tenant, _blocking.submit(create), "json", model_id)
            self._creating[model_id] = (tenant, request_id)
            return request_id

    def models_alive(self) -> dict[str, int]:
        """Models per tenant, those being created included (what the model cap counts)."""
        with self._lock:
            return dict(self._models_alive())

    def _models_alive(self) -> collections.Counter[str]:
        """The same, for a caller that holds the lock."""
        alive = collections.Counter(m.tenant for m in self._models.values())
        for model_id, (tenant, request_id) in self._creating.items():
            if model_id in self._models:
                continue
            with contextlib.suppress(NotFoundError):  # forgotten: it finished long ago
                if not self.futures.get(tenant, request_id).future.done():
                    alive[tenant] += 1
        return alive

    def held_calls(self) -> dict[str, int]:
        """Calls held for their seq_id's turn, per tenant."""
        with self._lock:
            models = list(self._models.values())
        held: collections.Counter[str] = collections.Counter()
        for model in models:
            held[model.tenant] += len(model.order.waiting())
        return dict(held)

    def _add_model(
        self,
        tenant: str,
        model_id: str,
        client: TrainingClient,
        user_metadata: dict[str, Any] | None,
    ) -> None:
        info = client.get_info()
        now = time.time()
        self.runs.create(
            RunRecord(
                run_id=model_id,
                tenant=tenant,
                base_model=client.base_model,
                lora_rank=info.lora_rank,
                lora=info.lora_config.model_dump(),
                user_metadata={str(k): str(v) for k, v in (user_metadata or {}).items()} or None,
                created=now,
                last_request_time=now,
            )
        )
        with self._lock:
            self._models[model_id] = Model(tenant, client)
            session = self._sessions.get(model_id.split(":", 1)[0])
        if session is None or session.finished:  # it ended while the model was made
            self._release_model(model_id, "its session ended while it was being created")

    def model(self, tenant: str, model_id: str) -> Model:
        with self._lock:
            model = self._models.get(model_id)
        if model is None or model.tenant != tenant:
            try:
                run = self.runs.get(tenant, model_id)
            except NotFoundError:
                raise NotFoundError(f"model {model_id!r} not found") from None
            why = self._released.get(model_id, "the server restarted since it was created")
            raise NotFoundError(
                f"model {model_id!r} is not loaded: it was released ({why}). Resume it from "
                f"{self._last_checkpoint(run)} with create_training_client_from_state_with_optimizer"
            )
        self.runs.touch(model_id)
        return model

    def _last_checkpoint(self, run: RunRecord) -> str:
        saved = [
            (e.created, cid) for cid, e in self.runs.checkpoints(run) if cid.startswith("weights/")
        ]
        if not saved:
            return "a checkpoint (it saved none with save_state)"
        kind, name = max(saved)[1].split("/", 1)
        return f"its last checkpoint, {tinker_path(run.run_id, kind, name)},"

    def get_info(self, tenant: str, model_id: str) -> tt.GetInfoResponse:
        info = self.model(tenant, model_id).client.get_info()
        return tt.GetInfoResponse(
            type="get_info",
            model_id=model_id,
            model_data=tt.ModelData(
                arch=info.model_data.arch,
                model_name=info.model_name,
                tokenizer_id=info.model_data.tokenizer_id,
            ),
            is_lora=True,
            lora_rank=info.lora_rank,
            model_name=info.model_name,
        )

    def in_order(
        self,
        tenant: str,
        model_id: str,
        seq_id: int | None,
        start: Callable[[TrainingClient], concurrent.futures.Future],
        encoding: Encoding = "json",
    ) -> str:
        """Runs `start(client)` on its seq_id's turn; returns the request id."""
        model = self.model(tenant, model_id)
        if seq_id is None:
            raise InvalidRequestError("the request has no seq_id")
        return model.order.submit(
            seq_id,
            lambda: self.limits.run(tenant, lambda: start(model.client)),
            lambda future: self.futures.add(tenant, future, encoding, model_id),
        )

    @metered(lambda call: "forward" if call.forward_only else "forward_backward")
    def forward_backward(self, tenant: str, call: ForwardBackwardCall) -> str:
        def start(client: TrainingClient) -> concurrent.futures.Future:
            if call.error is not None or call.data is None:
                raise call.error or InvalidRequestError("the request has no data")
            # Spans are resolved on the call's turn: against the records as they are then.
            session_id = session_of(call.model_id)
            resolved = resolve(self.sequences, tenant, session_id, call.loss_fn, call.data)
            method = client.forward if call.forward_only else client.forward_backward
            config = self.custom_losses.loss_config(tenant, call)  # custom: loss_id -> graph
            future = method(resolved.data, call.loss_fn, config).future()
            if resolved.used:  # a training request that used them restarts their TTL

                def used(f: concurrent.futures.Future) -> None:
                    if not f.cancelled() and f.exception() is None:
                        self.sequences.touch(tenant, resolved.used)

                future.add_done_callback(used)
            return future

        return self.in_order(tenant, call.model_id, call.seq_id, start, "forward_backward")

    @metered()
    def create_custom_loss(self, tenant: str, request: tt.CreateCustomLossRequest) -> str:
        """Stores the session's traced loss (rl/server/custom_losses.py); the request id of
        its future, which holds the loss id, or a user error naming what the graph breaks."""
        self.session(tenant, request.session_id)
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            loss_id = self.custom_losses.create(tenant, request)
            future.set_result(tt.CreateCustomLossResponse(loss_id=loss_id))
        except InvalidRequestError as error:
            future.set_exception(error)
        return self.futures.add(tenant, future, "json")

    @metered()
    def optim_step(self, tenant: str, request: tt.OptimStepRequest) -> str:
        params = request.optim_params

        def start(client: TrainingClient) -> concurrent.futures.Future:
            if not isinstance(params, tt.AdamParams):
                raise InvalidRequestError("this server has the AdamW optimizer only")
            adam = AdamParams(**params.model_dump(exclude={"type"}, exclude_none=True))
            return chain(
                client.optim_step(adam).future(),
                lambda r: tt.OptimStepResponse(metrics=r.metrics),
            )

        return self.in_order(tenant, request.model_id, request.seq_id, start)

    @metered()
    def save_weights(self, tenant: str, request: tt.SaveWeightsRequest) -> str:
        name = request.path or f"state-{request.seq_id}"
        cap = self.config.max_checkpoint_gib_per_tenant

        def start(client: TrainingClient) -> concurrent.futures.Future:
            self.runs.check_room(tenant, request.model_id, "weights", name, cap)

            def record(_: Any) -> tt.SaveWeightsResponse:
                path = self.runs.add_checkpoint(
                    request.model_id, "weights", name, request.user_metadata, request.ttl_seconds
                )
                return tt.SaveWeightsResponse(path=path)

            return chain(client.save_state(name, overwrite=request.overwrite).future(), record)

        return self.in_order(tenant, request.model_id, request.seq_id, start)

    @metered()
    def save_weights_for_sampler(
        self, tenant: str, request: tt.SaveWeightsForSamplerRequest
    ) -> str:
        if request.path is not None:
            return self._save_sampler_checkpoint(tenant, request)
        if request.sampling_session_seq_id is None:
            raise InvalidRequestError(
                "save_weights_for_sampler needs path or sampling_session_seq_id"
            )
        sampler_id = f"{session_of(request.model_id)}:sample:{request.sampling_session_seq_id}"

        def start(client: TrainingClient) -> concurrent.futures.Future:
            def finish(pending: PendingSync) -> concurrent.futures.Future:
                # The samplers load the weights outside the model's queue (later training
                # calls need not wait), in the blocking pool.
                return _blocking.submit(self._finish_sync, tenant, sampler_id, client, pending)

            begun = client.begin_weight_sync().future()
            return flatten(chain(begun, finish))

        return self.in_order(tenant, request.model_id, request.seq_id, start)

    def _finish_sync(
        self, tenant: str, sampler_id: str, client: TrainingClient, pending: PendingSync
    ) -> tt.SaveWeightsForSamplerResponseInternal:
        sampling_client = weight_sync.finish(pending)
        with self._lock:
            self._samplers[sampler_id] = Sampler(tenant, sampling_client, client.base_model, None)
        return tt.SaveWeightsForSamplerResponseInternal(sampling_session_id=sampler_id)

    def _save_sampler_checkpoint(
        self, tenant: str, request: tt.SaveWeightsForSamplerRequest
    ) -> str:
        name = request.path
        assert name is not None
        cap = self.config.max_checkpoint_gib_per_tenant

        def start(client: TrainingClient) -> concurrent.futures.Future:
            self.runs.check_room(tenant, request.model_id, "sampler_weights", name, cap)

            def record(_: Any) -> tt.SaveWeightsForSamplerResponseInternal:
                path = self.runs.add_checkpoint(
                    request.model_id,
                    "sampler_weights",
                    name,
                    request.user_metadata,
                    request.ttl_seconds,
                )
                return tt.SaveWeightsForSamplerResponseInternal(path=path)

            return chain(client.save_weights_for_sampler(name).future(), record)

        return self.in_order(tenant, request.model_id, request.seq_id, start)

    @metered()
    def load_weights(self, tenant: str, request: tt.LoadWeightsRequest) -> str:
        """Legacy addressing: load into an existing model, in its order."""
        assert request.model_id is not None
        resolved = self.runs.resolve(tenant, request.path)

        def start(client: TrainingClient) -> concurrent.futures.Future:
            load = client.load_state_with_optimizer if request.optimizer else client.load_state
            return chain(
                load(str(resolved.local)).future(),
                lambda _: tt.LoadWeightsResponse(path=request.path),
            )

        return self.in_order(tenant, request.model_id, request.seq_id, start)

    # -- sampling --------------------------------------------------------------------------

    @metered()
    def create_sampling_session(
        self, tenant: str, request: tt.CreateSamplingSessionRequest
    ) -> concurrent.futures.Future:
        """A future of the sampler id; a retried request waits on the same start."""
        self.session(tenant, request.session_id)
        sampler_id = f"{request.session_id}:sample:{request.sampling_session_seq_id}"
        with self._lock:
            started = self._sampler_starts.get(sampler_id)
            if started is not None and started[0] == tenant:
                return started[1]
            if sampler_id in self._samplers:
                raise InvalidRequestError(f"sampling session {sampler_id!r} exists already")
        if request.model_path:
            resolved = self.runs.resolve(tenant, request.model_path)
            base = self.base_model(request.base_model or resolved.run.base_model)
            local: str | None = str(resolved.local)
        else:
            base = self.base_model(request.base_model)
            local = None

        def start() -> str:
            if local is None:
                client = self.service.create_sampling_client(base_model=base)
            else:
                client = self.service.create_sampling_client(model_path=local, base_model=base)
            with self._lock:
                self._samplers[sampler_id] = Sampler(
                    tenant, client, base, request.model_path, local
                )
            return sampler_id

        future = _blocking.submit(start)
        with self._lock:
            self._sampler_starts[sampler_id] = (tenant, future)
        return future

    def sampler(self, tenant: str, sampler_id: str) -> Sampler:
        with self._lock:
            sampler = self._samplers.get(sampler_id)
        if sampler is None or sampler.tenant != tenant:
            raise NotFoundError(f"sampler {sampler_id!r} not found")
        return sampler

    @metered()
    def sample(self, tenant: str, request: tt.SampleRequest) -> str:
        if not request.sampling_session_id:
            raise InvalidRequestError("asample needs a sampling_session_id")
        sampler = self.sampler(tenant, request.sampling_session_id)
        # Filed first: the sequence ids (and so the records) are made from its request id.
        result: concurrent.futures.Future = concurrent.futures.Future()
        request_id = self.futures.add(tenant, result, "sample")
        try:
            targets = request.target_prompt_logprobs
            future = sampler.client.sample(
                model_input(request.prompt),
                request.num_samples,
                sampling_params(request.sampling_params),
                include_prompt_logprobs=bool(request.prompt_logprobs),
                topk_prompt_logprobs=request.topk_prompt_logprobs,
                topk_sample_logprobs=request.topk_sample_logprobs,
                target_prompt_logprobs=None if targets is None else tensor_data(targets),
                prompt_alt_tokens_k=request.prompt_alt_tokens_k,
                prompt_logprobs_last_n=request.prompt_logprobs_last_n,
                owner=tenant,
            ).future()
            if request.record_stability_info:  # recorded before the client can see the result
                future = chain(future, self._recorder(tenant, request, request_id))
        except (InvalidRequestError, NotFoundError, ValueError) as error:
            future = failed(error)  # bad input: a failed future with category "user"
        future.add_done_callback(lambda f: settle(result, f.result))
        self.limits.track(tenant, result)
        return request_id

    def _recorder(
        self, tenant: str, request: tt.SampleRequest, request_id: str
    ) -> Callable[[SampleResponse], SampleResponse]:
        """Records each sequence of the sample's response under its id (rl/server/provenance.py)."""
        sampler_id = request.sampling_session_id
        assert sampler_id is not None
        ids = sequence_ids(sampler_id, request_id, request.num_samples)
        prompt = model_input(request.prompt).to_ints()
        params = request.sampling_params

        def record(response: SampleResponse) -> SampleResponse:
            records = record_sample(
                session_of(sampler_id),
                sampler_id,
                prompt,
                [(s.tokens, s.logprobs) for s in response.sequences],
                params.temperature,
                params.top_k,
                params.top_p,
            )
            self.sequences.add(tenant, dict(zip(ids, records, strict=True)))
            return response

        return record

    def sampling_busy(self) -> bool:
        return self.futures.inflight("sample") >= self.config.max_inflight_samples


__all__ = ["Model", "Sampler", "ServerState", "Session", "tinker_path"]
