"""A sampling engine on plain torch + transformers, with the vLLM engine's interface.

For machines without vLLM and for fast tests with tiny models; it runs on the GPU its actor
was given, else on the CPU. One request at a time: its `num_samples` completions decode
together as one batch with a KV cache; every row has the same length (the prompt is shared),
so no padding or attention mask is needed. Adapters are peft
adapters on the one base model, switched per request; merged syncs load a full state dict.

The sampling math follows vLLM's: temperature, then top-k, then top-p (smallest set whose
probability reaches top_p). Logprobs per `logprobs_mode`: "model" = log_softmax of the raw
logits (Tinker's semantics), "sampled" = of the processed distribution the token came from
(0.0 under greedy). Unlike vLLM the mode is honoured per request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from rl.errors import InvalidRequestError
from rl.types import PromptAltTokens, SampledSequence, SampleResponse, TensorData
from samplers.config import SamplerConfig
from samplers.types import EngineInfo, FullWeights, SampleRequest

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchEngine:
    def __init__(self, model_dir: str, config: SamplerConfig):
        # One worker thread: generation and weight changes never overlap, and weight changes
        # go ahead of queued requests (as between vLLM steps). The model is loaded on it too,
        # so the OpenMP threads serving it belong to that thread.
        self._worker = _Worker()
        self._worker.submit(lambda: self._load(model_dir, config), urgent=True).result()

    def _load(self, model_dir: str, config: SamplerConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(config.resolved_threads())
        # The GPU Ray gave this actor, if any (an actor without one sees none).
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = _DTYPES[config.resolved_dtype(on_gpu=self._device.type == "cuda")]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model = model.to(self._device)  # type: ignore[arg-type]
        model.eval()
        _untie_output_embeddings(model)
        self._base: nn.Module = model
        self._model: Any = model  # becomes a PeftModel once an adapter is loaded
        self._adapters: set[str] = set()
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model_max = int(getattr(model.config, "max_position_embeddings", 2048))
        param_dtype = next(model.parameters()).dtype
        self.info = EngineInfo(
            engine="torch",
            model_dir=model_dir,
            vocab_size=int(model.get_input_embeddings().weight.shape[0]),  # type: ignore[index]
            max_model_len=min(config.max_model_len or model_max, model_max),
            dtype=str(param_dtype).removeprefix("torch."),
            device=self._device.type,
            eos_token_id=_eos_token_id(model, self._tokenizer),
            logprobs_mode=config.logprobs_mode,
            max_logprobs=config.max_logprobs,
            lora_enabled=True,
            max_lora_rank=config.max_lora_rank,
        )

    # -- requests --------------------------------------------------------------------------

    async def sample(
        self, request: SampleRequest, adapter_path: str | None = None
    ) -> SampleResponse:
        return await asyncio.wrap_future(self._worker.submit(lambda: self._sample(request)))

    def _sample(self, request: SampleRequest) -> SampleResponse:
        adapter = (
            _adapter_name(request.weights.version) if request.weights.kind == "adapter" else None
        )
        with torch.inference_mode():
            if adapter is None and self._adapters:
                with self._model.disable_adapter():
                    return self._generate(request)
            if adapter is not None:
                if adapter not in self._adapters:
                    raise InvalidRequestError(
                        f"adapter version {request.weights.version} is not loaded"
                    )
                self._model.set_adapter(adapter)
            return self._generate(request)

    def _generate(self, request: SampleRequest) -> SampleResponse:
        params = request.params
        n = request.num_samples
        prompt = torch.tensor([request.prompt], device=self._device)
        out = self._model(input_ids=prompt, use_cache=True)
        logits = out.logits[0].float()  # [L, V]
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        generator = torch.Generator(self._device).manual_seed(seed)
        response = prompt_outputs(logits, request, generator)
        cache = out.past_key_values
        if n > 1:
            cache.batch_repeat_interleave(n)
        next_logits = logits[-1:].expand(n, -1)
        stop_ids, stop_strings = self._stops(params.stop)
        sequences = [_Growing() for _ in range(n)]
        for step in range(request.max_tokens):
            token, mode_logprobs = _sample_step(next_logits, params, generator)
            _append_step(sequences, token, mode_logprobs, request.topk_sample_logprobs)
            for sequence in sequences:
                if sequence.reason is None and (
                    sequence.tokens[-1] in stop_ids
                    or self._hit_stop_string(sequence.tokens, stop_strings)
                ):
                    sequence.reason = "stop"
            if all(s.reason is not None for s in sequences) or step == request.max_tokens - 1:
                break
            out = self._model(input_ids=token.view(n, 1), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            next_logits = out.logits[:, -1].float()
        response.sequences = [s.record(request.topk_sample_logprobs) for s in sequences]
        return response

    def _stops(self, stop: Any) -> tuple[set[int], list[str]]:
        """Stop ids and strings. EOS stops unless `stop == []` (Tinker: [] disables all)."""
        items = [stop] if isinstance(stop, str) else list(stop or [])
        ids = {s for s in items if isinstance(s, int)}
        if stop != [] and self.info.eos_token_id is not None:
            ids.add(self.info.eos_token_id)
        return ids, [s for s in items if isinstance(s, str)]

    def _hit_stop_string(self, tokens: list[int], stop_strings: list[str]) -> bool:
        if not stop_strings:
            return False
        text = self._tokenizer.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in stop_strings)

    # -- weights ---------------------------------------------------------------------------

    def load_adapter(self, version: int, path: str) -> None:
        self._worker.submit(lambda: self._load_adapter(version, path), urgent=True).result()

    def _load_adapter(self, version: int, path: str) -> None:
        from peft import PeftModel

        name = _adapter_name(version)
        if not self._adapters:
            self._model = PeftModel.from_pretrained(self._base, path, adapter_name=name)
            self._model.eval()
        else:
            self._model.load_adapter(path, adapter_name=name)
        self._adapters.add(name)

    def unload_adapter(self, version: int) -> None:
        self._worker.submit(lambda: self._unload_adapter(version), urgent=True).result()

    def _unload_adapter(self, version: int) -> None:
        name = _adapter_name(version)
        if name not in self._adapters:
            return
        if len(self._adapters) == 1:
            return  # peft keeps one adapter; the next load or a restart replaces it
        remaining = sorted(self._adapters - {name})
        self._model.set_adapter(remaining[0])
        self._model.delete_adapter(name)
        self._adapters.discard(name)

    def load_full_weights(self, weights: FullWeights) -> None:
        self._worker.submit(lambda: self._load_full_weights(weights), urgent=True).result()

    def _load_full_weights(self, weights: FullWeights) -> None:
        if self._adapters:
            raise RuntimeError("merged weights cannot be loaded into an engine serving adapters")
        state_dict = weights() if callable(weights) else weights
        with torch.no_grad():
            missing, unexpected = self._base.load_state_dict(state_dict, strict=False)
        if unexpected:
            raise InvalidRequestError(f"merged weights carry unknown keys, e.g. {unexpected[:3]}")
        known_missing = [k for k in missing if "rotary" not in k]
        if known_missing:
            raise InvalidRequestError(f"merged weights lack keys, e.g. {known_missing[:3]}")

    def reset_prefix_cache(self) -> bool:
        return True  # no cache survives a request here

    def shutdown(self) -> None:
        self._worker.stop()


class _Worker:
    """One thread running submitted functions in order; `urgent` ones jump the queue."""

    def __init__(self) -> None:
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        threading.Thread(target=self._run, name="torch-engine", daemon=True).start()

    def submit(self, fn: Callable[[], Any], urgent: bool = False) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((0 if urgent else 1, next(self._order), fn, future))
        return future

    def stop(self) -> None:
        self._queue.put((2, next(self._order), None, None))

    def _run(self) -> None:
        while True:
            _, _, fn, future = self._queue.get()
            if fn is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as error:
                future.set_exception(error)


# -- pure helpers ----------------------------------------------------------------------------


def _adapter_name(version: int) -> str:
    return f"v{version}"


def _eos_token_id(model: nn.Module, tokenizer: Any) -> int | None:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos if eos is not None else tokenizer.eos_token_id


def _untie_output_embeddings(model: Any) -> None:
    """Gives the output head its own weight, so a merged unembedding LoRA stays separate."""
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or output.weight is not inputs.weight:
        return
    output.weight = nn.Parameter(inputs.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False


def process_logits(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Logits of the distribution actually sampled from: / temperature, top-k, top-p masks.

    logits: [B, V] float32, temperature > 0. Masked entries are -inf.
    """
    logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the tokens before it already reach top_p.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@dataclass
class _Growing:
    """One completion as it decodes; `reason` is set once it stops."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk: list[list[tuple[int, float]]] = field(default_factory=list)
    reason: Literal["stop", "length"] | None = None

    def record(self, k: int) -> SampledSequence:
        return SampledSequence(
            stop_reason=self.reason or "length",
            tokens=self.tokens,
            logprobs=self.logprobs,
            topk_logprobs=list(self.topk) if k else None,
        )


def _append_step(
    sequences: list[_Growing], token: torch.Tensor, mode_logprobs: torch.Tensor, k: int
) -> None:
    """Appends one decoded token (and its logprob, and top-k) to each unfinished sequence."""
    chosen = token.tolist()
    chosen_logprobs = mode_logprobs.gather(-1, token.view(-1, 1)).view(-1).tolist()
    rows = _topk_rows(mode_logprobs, k) if k else None
    for i, sequence in enumerate(sequences):
        if sequence.reason is not None:
            continue
        sequence.tokens.append(chosen[i])
        sequence.logprobs.append(chosen_logprobs[i])
        if rows is not None:
            sequence.topk.append(rows[i])


def _topk_rows(logprobs: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Each row's k best (token_id, logprob) pairs, best first; impossible tokens left out."""
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)
    return [
        [(i, v) for i, v in zip(row_ids, row_values, strict=True) if v != float("-inf")]
        for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
    ]


def _sample_step(
    logits: torch.Tensor, params: Any, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws one token per row; returns (tokens [B], logprobs [B, V] per logprobs_mode).

    "model": log_softmax of the raw logits. "sampled": of the processed distribution the token
    came from; under greedy that is a point mass (0.0 at the token, -inf elsewhere)."""
    if params.temperature == 0:
        token = torch.argmax(logits, dim=-1)
        if params.logprobs_mode != "sampled":
            return token, torch.log_softmax(logits, dim=-1)
        return token, torch.full_like(logits, float("-inf")).scatter(-1, token.view(-1, 1), 0.0)
    processed = torch.log_softmax(
        process_logits(logits, params.temperature, params.top_k, params.top_p), dim=-1
    )
    token = torch.multinomial(processed.exp(), 1, generator=generator).view(-1)
    if params.logprobs_mode == "sampled":
        return token, processed
    return token, torch.log_softmax(logits, dim=-1)


def prompt_outputs(
    logits: torch.Tensor, request: SampleRequest, generator: torch.Generator
) -> SampleResponse:
    """What a request asks about its prompt, from the prompt's logits [L, V]: the logprob of
    each prompt token and the top-k at each position (None before `prompt_logprobs_last_n`
    and at position 0), the logprobs of `target_prompt_logprobs`, and `prompt_alt_tokens_k`
    draws per position."""
    response = SampleResponse(sequences=[])
    logprobs = torch.log_softmax(logits[:-1], dim=-1)  # row i predicts prompt[i + 1]
    if request.include_prompt_logprobs:
        prompt = torch.tensor(request.prompt, device=logits.device)
        chosen = logprobs.gather(-1, prompt[1:].view(-1, 1)).view(-1).tolist()
        response.prompt_logprobs = request.scored_prompt(chosen)
    if request.topk_prompt_logprobs:
        rows = _topk_rows(logprobs, request.topk_prompt_logprobs)
        response.topk_prompt_logprobs = request.scored_prompt(rows)
    if request.target_prompt_logprobs is not None:
        response.target_prompt_logprobs = target_logprobs(logprobs, request.target_prompt_logprobs)
    if request.prompt_alt_tokens_k:
        response.prompt_alt_tokens = alt_tokens(
            logits[:-1], request.params, request.prompt_alt_tokens_k, generator
        )
    return response


def target_logprobs(logprobs: torch.Tensor, targets: tuple[tuple[int, ...], ...]) -> TensorData:
    """Logprobs [P-1, V] at the dense target ids [P-1, K]; 0.0 where an id is -1."""
    ids = torch.tensor(targets, dtype=torch.int64, device=logprobs.device).view(len(targets), -1)
    values = logprobs.gather(-1, ids.clamp(min=0)).masked_fill(ids < 0, 0.0)
    return TensorData.from_torch(values)


def alt_tokens(
    logits: torch.Tensor, params: Any, k: int, generator: torch.Generator
) -> PromptAltTokens:
    """k draws per row of logits [P-1, V], with replacement, after temperature, top-k and top-p;
    their logprobs per `logprobs_mode`, as for sampled tokens."""
    if logits.shape[0] == 0:
        return PromptAltTokens(tokens=[], logprobs=[])
    if params.temperature == 0:
        draws = torch.argmax(logits, dim=-1, keepdim=True).expand(-1, k)
        processed = torch.full_like(logits, float("-inf")).scatter(-1, draws[:, :1], 0.0)
    else:
        processed = torch.log_softmax(
            process_logits(logits, params.temperature, params.top_k, params.top_p), dim=-1
        )
        draws = torch.multinomial(processed.exp(), k, replacement=True, generator=generator)
    mode = processed if params.logprobs_mode == "sampled" else torch.log_softmax(logits, dim=-1)
    return PromptAltTokens(tokens=draws.tolist(), logprobs=mode.gather(-1, draws).tolist())
