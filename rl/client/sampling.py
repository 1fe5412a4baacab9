"""`SamplingClient`: samples one set of weights: a base model, a sampler checkpoint, or a sync.

    client = service.create_sampling_client(base_model="SmolLM2-135M-Instruct")
    client = service.create_sampling_client(model_path=saved.path)     # a sampler checkpoint
    client = training_client.save_weights_and_get_sampling_client()   # the current weights
    response = client.sample(prompt, num_samples=4, sampling_params=params).result()

Each call returns an `APIFuture` at once; any number may be in flight. Requests go to a pool of
sampler actors (samplers/pool.py) that the service keeps (rl/client/pools.py).

Logprobs, as in Tinker: `SampledSequence.logprobs` are the model's own logprobs of the sampled
tokens, with no temperature or top-k/top-p applied (`SamplingParams.logprobs_mode="model"`).
`logprobs_mode="sampled"` gives the logprobs of the distribution actually sampled from; with
vLLM that needs a sampler started with `SamplerConfig(logprobs_mode="sampled")`.

Stops: EOS always stops unless `stop=[]`; `stop` strings or token ids stop too, and the token
that completes a stop is kept in `tokens`. `temperature` is in [0, 2] (vLLM's range); 0 is
greedy, so every one of `num_samples` is the same sequence.

A sampling client is a snapshot, as in Tinker: it samples the weights it was made from for as
long as it lives (rl/client/pools.py, `AdapterBackup`, for merged-mode weight syncs).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from rl.checkpoint_format import read_sampler_checkpoint
from rl.client.pools import AdapterBackup, SamplerPools
from rl.errors import CheckpointError, InvalidRequestError
from rl.futures import APIFuture, chain, unwrap_ray_error
from rl.models import load_tokenizer, resolve_model
from rl.types import ModelInput, SampleResponse, SamplingParams, TensorData
from samplers.pool import SamplerPool, submit
from samplers.types import BASE, WeightsVersion
from samplers.validation import build_request

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class SamplingClient:
    def __init__(
        self,
        pool: SamplerPool,
        weights: WeightsVersion,
        base_model: str,
        sync_metrics: dict[str, float] | None = None,
        backup: AdapterBackup | None = None,
    ):
        self.pool = pool
        self.weights = weights
        self._base_model = base_model
        self.sync_metrics: dict[str, float] = dict(sync_metrics or {})
        self.backup = backup  # merged mode: its adapter, for after a later sync

    def sample(
        self,
        prompt: ModelInput,
        num_samples: int = 1,
        sampling_params: SamplingParams | None = None,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        *,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: TensorData | list[list[int]] | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
        owner: str = "",
    ) -> APIFuture[SampleResponse]:
        """`num_samples` completions of `prompt`. Bad input raises InvalidRequestError here.

        Beyond the sampled tokens and their logprobs, a request may ask for: the prompt's
        logprobs (`include_prompt_logprobs`) and top-k (`topk_prompt_logprobs`), both only
        for the last `prompt_logprobs_last_n` prompt tokens if set; the top-k at each sampled
        token (`topk_sample_logprobs`); the logprobs of chosen ids at chosen prompt positions
        (`target_prompt_logprobs`, [len(prompt) - 1, K] ids, row i at position i + 1, -1 or an
        unlisted sparse cell for none; the answer has the same shape and layout); and
        `prompt_alt_tokens_k` draws at every prompt position after the first.
        `owner` names whose turn the request takes in the pool's fair queue (the server passes
        the tenant); by default, the sampled model's."""
        assert self.pool.info is not None
        request = build_request(
            prompt,
            num_samples,
            sampling_params,
            self.pool.info,
            include_prompt_logprobs=include_prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs,
            topk_sample_logprobs=topk_sample_logprobs,
            target_prompt_logprobs=target_prompt_logprobs,
            prompt_alt_tokens_k=prompt_alt_tokens_k,
            prompt_logprobs_last_n=prompt_logprobs_last_n,
            weights=self.weights,
        )
        if owner:
            request = dataclasses.replace(request, owner=owner)
        if self.backup is not None:
            future = submit(self.backup.sample(self.pool, request))
        else:
            future = submit(self.pool.sample(request))
        if isinstance(target_prompt_logprobs, TensorData) and target_prompt_logprobs.is_sparse:
            layout = target_prompt_logprobs
            future = chain(future, lambda response: _in_layout(response, layout))
        return APIFuture(future)

    async def sample_async(
        self,
        prompt: ModelInput,
        num_samples: int = 1,
        sampling_params: SamplingParams | None = None,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        *,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: TensorData | list[list[int]] | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> SampleResponse:
        return await self.sample(
            prompt,
            num_samples,
            sampling_params,
            include_prompt_logprobs,
            topk_prompt_logprobs,
            topk_sample_logprobs=topk_sample_logprobs,
            target_prompt_logprobs=target_prompt_logprobs,
            prompt_alt_tokens_k=prompt_alt_tokens_k,
            prompt_logprobs_last_n=prompt_logprobs_last_n,
        )

    def compute_logprobs(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        """Logprob of each prompt token given the ones before it; entry 0 is None."""
        future = self.sample(
            prompt, 1, SamplingParams(max_tokens=1, temperature=0.0), include_prompt_logprobs=True
        )
        return APIFuture(chain(future.future(), lambda r: list(r.prompt_logprobs or [])))

    async def compute_logprobs_async(self, prompt: ModelInput) -> list[float | None]:
        return await self.compute_logprobs(prompt)

    def get_base_model(self) -> str:
        return self._base_model

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return pool_tokenizer(self.pool)

    def release_memory(self) -> bool:
        """Puts the engines serving this client to sleep (SamplerConfig.sleep_between_rollouts):
        their GPU memory is free for a colocated trainer until their next request or weight
        load wakes them. False where they have no sleep mode enabled (a no-op)."""
        return submit(self.pool.sleep()).result()


def create_sampling_client(
    pools: SamplerPools, model_path: str | None = None, base_model: str | None = None
) -> SamplingClient:
    """A client for `base_model`, or for the sampler checkpoint at `model_path`."""
    if model_path is None and base_model is None:
        raise InvalidRequestError("create_sampling_client needs model_path or base_model")
    if model_path is None:
        assert base_model is not None
        return SamplingClient(pools.base(resolve_model(base_model)), BASE, base_model)
    path, adapter_config, checkpoint_base = read_sampler_checkpoint(model_path)
    base = base_model or checkpoint_base
    pool = pools.lora(resolve_model(base))
    assert pool.info is not None
    rank = int(adapter_config.get("r", 0))
    if rank > pool.info.max_lora_rank:
        raise InvalidRequestError(
            f"checkpoint {model_path!r} has LoRA rank {rank}, above the sampler's max_lora_rank "
            f"{pool.info.max_lora_rank} (raise SamplerConfig.max_lora_rank)"
        )
    weights = pool.path_versions.get(path)
    if weights is None:
        weights = pool.new_version("adapter", path)
        try:
            submit(pool.push(weights, path)).result()
        except Exception as error:
            raise CheckpointError(
                f"the sampler cannot load checkpoint {model_path!r}: {unwrap_ray_error(error)}"
            ) from None
        pool.path_versions[path] = weights
    return SamplingClient(pool, weights, base)


def _in_layout(response: SampleResponse, layout: TensorData) -> SampleResponse:
    """The answer to a sparse `target_prompt_logprobs` in the request's sparse layout."""
    if response.target_prompt_logprobs is None:
        return response
    dense = response.target_prompt_logprobs.to_numpy()
    return response.model_copy(update={"target_prompt_logprobs": layout.with_values_of(dense)})


def pool_tokenizer(pool: SamplerPool) -> PreTrainedTokenizerBase:
    """The tokenizer of the model `pool` serves, loaded once per pool."""
    if pool.tokenizer is None:
        pool.tokenizer = load_tokenizer(pool.model_dir)
    return pool.tokenizer


__all__ = ["SamplingClient", "create_sampling_client", "pool_tokenizer"]
