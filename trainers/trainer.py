"""The LoRA trainer: one base model (transformers) and many LoRA adapters (peft) over it.

Each adapter is one training client, addressed by its model id, with its own AdamW state,
step count and accumulated gradient. Only the active adapter takes part in a forward pass, so
one client's calls never touch another's weights or gradients. This class is plain Python;
`trainers.actor` hosts it in a Ray actor, whose one-call-at-a-time execution makes every
method atomic. In a sharded trainer (`TrainerConfig.world_size` > 1) every rank runs every
call and computes its share of the batch (trainers/distributed.py); with one rank the
collectives are the identity.

Guarantee for bad input: every check runs before the model is touched, and any failure after
that (a non-finite loss or gradient) restores the gradients to what they were before the call.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import math
import resource
import secrets
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from transformers import AutoModelForCausalLM

from rl.checkpoint_format import CheckpointMeta, checkpoint_path, read_checkpoint, write_checkpoint
from rl.errors import CheckpointError, EngineRoomError, InvalidRequestError, NotFoundError
from rl.models import model_fingerprint, resolve_model
from rl.packed import PackedTensors
from rl.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    LoadWeightsResponse,
    LoraConfig,
    ModelData,
    OptimStepResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    TensorData,
)
from trainers import distributed, lora
from trainers.batching import plan_buckets
from trainers.config import TrainerConfig
from trainers.logprobs import target_logprobs
from trainers.losses import LOSSES, per_datum_loss
from trainers.memory import GIB, MemoryBudget, ModelShape
from trainers.mixed import Call, MixedBatch, adapters_of_rows, tokens_with_adapter
from trainers.packing import TrieRow, pack_bucket, plan_rows
from trainers.paging import PagedAdapter, page_in, page_out
from trainers.validation import PreparedBatch, prepare_batch


@dataclass
class Adapter:
    name: str  # peft adapter name (model ids may hold characters peft dislikes)
    lora_config: LoraConfig
    params: list[torch.nn.Parameter]  # empty while paged out
    optimizer: torch.optim.AdamW | None  # None while paged out
    step: int = 0
    pending_backwards: int = 0  # forward_backward calls since the last optim_step
    paged: PagedAdapter | None = None  # its state, while out of the model (trainers/paging.py)
    last_used: int = 0  # the trainer's call count at its last call (least recent pages out)

    @property
    def adam(self) -> torch.optim.AdamW:
        """The optimizer of a resident adapter."""
        assert self.optimizer is not None, "the adapter is paged out"
        return self.optimizer


class LoraTrainer:
    def __init__(self, base_model: str, config: TrainerConfig | None = None):
        self.config = config or TrainerConfig()
        torch.set_num_threads(self.config.resolved_threads())
        self.base_model = base_model
        self.model_path = resolve_model(base_model)
        self.device = _pick_device(self.config.device)
        on_gpu = self.device.type == "cuda"
        dtype_name = self.config.resolved_dtype(on_gpu)
        model = AutoModelForCausalLM.from_pretrained(
            self.model_path,
            dtype=getattr(torch, dtype_name),
            attn_implementation=self.config.resolved_attention(on_gpu, dtype_name),
        )
        model.requires_grad_(False)
        if self.config.gradient_checkpointing:
            lora.enable_checkpointing(model)
        # A sharded trainer's model stays on the CPU until it is sharded (`join_group`).
        self._base = model if self.config.world_size > 1 else model.to(self.device)  # type: ignore[arg-type]
        self._group = distributed.Group()
        self._peft: PeftModel | None = None
        self._adapters: dict[str, Adapter] = {}
        self._calls = 0  # calls on adapters so far: their recency (least recent pages out)
        self.shared_passes = 0  # passes that ran several adapters' calls together
        self._paging_dir = self.config.resolved_checkpoint_dir() / f".paged-{secrets.token_hex(4)}"
        self._active: str | None = None
        self._names = (f"adapter{i}" for i in itertools.count())
        hf_config = model.config
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_context = int(getattr(hf_config, "max_position_embeddings", 0) or 2**31 - 1)
        self.fingerprint = model_fingerprint(hf_config)
        self._softcap = getattr(hf_config, "final_logit_softcapping", None)
        limit = self.config.memory_limit_gib
        self._budget = MemoryBudget(
            ModelShape.of(model),
            self.device,
            act_bytes=torch.finfo(getattr(torch, dtype_name)).bits // 8,
            head_chunk=self.config.resolved_chunk_tokens(on_gpu),
            limit_bytes=int(limit * GIB) if limit else None,
        )

    # -- adapters -------------------------------------------------------------------------

    def create_adapter(self, model_id: str, lora_config: LoraConfig) -> GetInfoResponse:
        if model_id in self._adapters:
            raise InvalidRequestError(f"model id {model_id!r} exists already")
        seed = lora_config.seed if lora_config.seed is not None else secrets.randbits(31)
        lora_config = lora_config.model_copy(update={"seed": seed})
        name, params = self._inject(lora_config)
        optimizer = torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.95), eps=1e-12)
        self._adapters[model_id] = Adapter(name, lora_config, params, optimizer)
        self._touch(model_id)
        return self.get_info(model_id)

    def _inject(self, lora_config: LoraConfig) -> tuple[str, list[torch.nn.Parameter]]:
        """A new peft adapter for `lora_config` in the model: (its peft name, its parameters)."""
        name = next(self._names)
        peft_config = lora.peft_config(self._base, lora_config, self.config.lora_alpha)
        # LoRA A is drawn from the global torch RNG: seed it locally so the same seed gives
        # the same adapter whatever ran before, and nothing else's randomness shifts.
        # peft warns that an lm_head adapter on tied embeddings is not tied to the input
        # embedding; that is intended: the unembed adapter changes the output projection only.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
            torch.manual_seed(lora_config.seed or 0)
            if self._peft is None:
                self._peft = get_peft_model(self._base, peft_config, adapter_name=name)
            else:
                self._peft.add_adapter(name, peft_config)
        if self._peft.active_adapter not in self._peft.peft_config:
            # Every adapter was deleted: peft still names the last one active (get_base_model
            # and others then fail); the new one is active until a call activates another.
            self._peft.active_adapter = name
        params = [p for n, p in self._peft.named_parameters() if f".{name}." in n]
        for p in params:
            p.requires_grad_(True)
        self._active = None
        return name, params

    def create_adapter_from_state(
        self, model_id: str, path: str, with_optimizer: bool
    ) -> GetInfoResponse:
        checkpoint = read_checkpoint(path, with_optimizer=with_optimizer)
        self._check_compatible(path, checkpoint.meta)
        self.create_adapter(model_id, checkpoint.meta.lora_config)
        try:
            self.load_state(model_id, path, with_optimizer)
        except BaseException:
            self.release(model_id)
            raise
        return self.get_info(model_id)

    def release(self, model_id: str) -> None:
        """Deletes the adapter, its optimizer state and gradients, and gives the memory back
        to the OS (malloc keeps freed pages otherwise)."""
        adapter = self._record(model_id)
        del self._adapters[model_id]
        if adapter.paged is not None and adapter.paged.path is not None:
            adapter.paged.path.unlink(missing_ok=True)
        self._delete_from_model(adapter.name)
        self._active = None
        del adapter
        self._free_memory()

    def adapter_ids(self) -> list[str]:
        """The model ids of the adapters this trainer holds, resident or paged out."""
        return list(self._adapters)

    def resident_adapter_ids(self) -> list[str]:
        """Those of them in the model now."""
        return [m for m, a in self._adapters.items() if a.paged is None]

    def get_info(self, model_id: str) -> GetInfoResponse:
        adapter = self._record(model_id)
        return GetInfoResponse(
            model_id=model_id,
            model_data=ModelData(
                arch=type(self._base).__name__,
                model_name=self.base_model,
                tokenizer_id=self.model_path,
                vocab_size=self.vocab_size,
                max_context_length=self.max_context,
            ),
            lora_rank=adapter.lora_config.rank,
            model_name=self.base_model,
            lora_config=adapter.lora_config,
        )

    def base_model_path(self) -> str:
        return self.model_path

    def join_group(self, spec: distributed.GroupSpec) -> None:
        """Joins a sharded trainer's process group and shards the base model over it."""
        assert not self._adapters, "join the group before creating adapters"
        self._group = distributed.join(spec, self.device)
        distributed.shard_base(self._base, self._group)

    # -- training ----------------------------------------------------------------------------

    def forward(
        self,
        model_id: str,
        data: list[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
    ) -> ForwardBackwardOutput:
        """Logprobs of the target tokens and the loss's metrics; no gradient."""
        self._adapter(model_id)
        batch = self._prepare(data, loss_fn, loss_fn_config)
        self._activate(model_id)
        local: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for bucket, bucket_logprobs in self._bucket_logprobs(batch):
                if bucket:  # not an idle call
                    local.update(zip(bucket, bucket_logprobs, strict=True))
            logprobs = self._group.gather(local, len(batch.datums))
            _, metrics = self._loss(batch, range(len(logprobs)), logprobs)
        return _output(logprobs, metrics)

    def forward_backward(
        self,
        model_id: str,
        data: list[Datum],
        loss_fn: str,
        loss_fn_config: dict[str, float] | None = None,
    ) -> ForwardBackwardOutput:
        """Adds the gradient of the summed loss to the adapter's accumulated gradient."""
        adapter = self._adapter(model_id)
        batch = self._prepare(data, loss_fn, loss_fn_config)
        self._activate(model_id)
        # This call's gradient is computed alone, summed over the ranks, then added to the
        # accumulated one; on any failure the accumulated one is put back untouched.
        saved = [p.grad for p in adapter.params]
        for p in adapter.params:
            p.grad = None
        local: dict[int, torch.Tensor] = {}
        failure: str | None = None
        try:
            # Built-in losses are sums over tokens, so each bucket's share is backpropagated
            # as soon as it is computed: peak memory is one bucket's activations, not the batch's.
            # A non-finite loss is backpropagated all the same (and the gradient dropped), so
            # that every rank makes the same calls.
            with torch.enable_grad():
                for bucket, bucket_logprobs in self._bucket_logprobs(batch):
                    if not bucket:  # an idle call of a sharded trainer: no loss of its own
                        if bucket_logprobs[0].requires_grad:
                            bucket_logprobs[0].backward()
                        continue
                    loss, _ = self._loss(batch, bucket, bucket_logprobs)
                    if failure is None and not torch.isfinite(loss):
                        failure = (
                            f"the {loss_fn!r} loss is {loss.item()}; check the advantages and "
                            "the sampler logprobs (a huge logprob gap overflows the ratio)"
                        )
                    loss.backward()
                    for i, lp in zip(bucket, bucket_logprobs, strict=True):
                        local[i] = lp.detach()
            self._group.sum_grads(adapter.params, contributed=bool(local))
            failure = self._group.first_failure(failure)
            if failure is not None:
                raise InvalidRequestError(failure)
            if not all(p.grad is None or torch.isfinite(p.grad).all() for p in adapter.params):
                raise InvalidRequestError(f"the {loss_fn!r} loss gave a non-finite gradient")
            logprobs = self._group.gather(local, len(batch.datums))
        except BaseException:
            for p, grad in zip(adapter.params, saved, strict=True):
                p.grad = grad
            raise
        for p, grad in zip(adapter.params, saved, strict=True):
            if grad is not None:
                p.grad = grad if p.grad is None else grad + p.grad
        adapter.pending_backwards += 1
        with torch.no_grad():  # metrics over the whole batch (means do not add up per bucket)
            _, metrics = self._loss(batch, range(len(logprobs)), logprobs)
        return _output(logprobs, metrics)

    def forward_backward_many(
        self, calls: list[Call]
    ) -> list[ForwardBackwardOutput | EngineRoomError]:
        """`forward` and `forward_backward` calls of different adapters as one pass over the
        base model (trainers/mixed.py), as many adapters at a time as may be resident: each
        call gets the outputs and gradients it would get alone. A call with bad input, or
        whose loss or gradient is not finite, fails alone: its error takes its place."""
        results: list[ForwardBackwardOutput | EngineRoomError | None] = [None] * len(calls)
        ready: list[tuple[int, Call, PreparedBatch]] = []
        for i, call in enumerate(calls):
            try:
                if any(c.model_id == call.model_id for c in calls[:i]):
                    raise InvalidRequestError(f"{call.model_id!r} has two calls in one pass")
                self._record(call.model_id)
                ready.append((i, call, self._prepare(call.data, call.loss_fn, call.loss_fn_config)))
            except EngineRoomError as error:
                results[i] = error
        size = self.config.max_resident_adapters or len(ready) or 1
        for start in range(0, len(ready), size):
            self._shared_pass(ready[start : start + size], results)
            self.shared_passes += 1
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _shared_pass(
        self,
        group: list[tuple[int, Call, PreparedBatch]],
        results: list[ForwardBackwardOutput | EngineRoomError | None],
    ) -> None:
        """One pass for `group`'s calls (one per adapter); fills their places in `results`."""
        adapters = [self._adapter(call.model_id) for _, call, _ in group]
        for adapter, (_, call, _) in zip(adapters, group, strict=True):
            for p in adapter.params:  # only the backward calls' adapters take gradients
                p.requires_grad_(call.backward)
        self._active = None  # no single adapter is active in a mixed pass
        merged = PreparedBatch("", {}, [d for _, _, b in group for d in b.datums])
        owners = [k for k, (_, _, b) in enumerate(group) for _ in b.datums]
        mixed = MixedBatch(owners, [a.name for a in adapters])
        starts = [owners.index(k) for k in range(len(group))]
        saved = [[p.grad for p in a.params] for a in adapters]
        for adapter, (_, call, _) in zip(adapters, group, strict=True):
            for p in adapter.params:  # a call's gradient is computed alone, then added
                p.grad = None if call.backward else p.grad
        try:
            local, losses = self._mixed_pass(group, merged, mixed, starts)
        except BaseException:
            for adapter, grads in zip(adapters, saved, strict=True):
                for p, grad in zip(adapter.params, grads, strict=True):
                    p.grad = grad
            raise
        for k, ((i, call, batch), adapter) in enumerate(zip(group, adapters, strict=True)):
            logprobs = [local[starts[k] + j] for j in range(len(batch.datums))]
            results[i] = self._finish_call(call, batch, adapter, saved[k], losses[k], logprobs)

    def _mixed_pass(
        self,
        group: list[tuple[int, Call, PreparedBatch]],
        merged: PreparedBatch,
        mixed: MixedBatch,
        starts: list[int],
    ) -> tuple[dict[int, torch.Tensor], list[bool]]:
        """Runs the buckets of a mixed pass, each call's loss backpropagated for its own
        adapter; (logprobs by merged datum index, whether each call's losses were finite)."""
        local: dict[int, torch.Tensor] = {}
        finite = [True] * len(group)
        with torch.enable_grad():
            for bucket, bucket_logprobs in self._bucket_logprobs(merged, mixed):
                total = None
                for k, (_, call, batch) in enumerate(group):
                    mine = [
                        (i, lp)
                        for i, lp in zip(bucket, bucket_logprobs, strict=True)
                        if mixed.owners[i] == k
                    ]
                    if not mine or not call.backward:
                        continue
                    loss, _ = self._loss(
                        batch, [i - starts[k] for i, _ in mine], [lp for _, lp in mine]
                    )
                    finite[k] = finite[k] and bool(torch.isfinite(loss))
                    total = loss if total is None else total + loss
                if total is not None:
                    total.backward()
                local.update(
                    (i, lp.detach()) for i, lp in zip(bucket, bucket_logprobs, strict=True)
                )
        return local, finite

    def _finish_call(
        self,
        call: Call,
        batch: PreparedBatch,
        adapter: Adapter,
        saved: list[torch.Tensor | None],
        finite: bool,
        logprobs: list[torch.Tensor],
    ) -> ForwardBackwardOutput | EngineRoomError:
        """One call of a mixed pass: its gradient added to the adapter's accumulated one (or
        the accumulated one put back, when the call failed), and its output."""
        if call.backward:
            grads_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in adapter.params)
            if not finite or not grads_ok:
                for p, grad in zip(adapter.params, saved, strict=True):
                    p.grad = grad
                what = "loss" if not finite else "loss's gradient"
                return InvalidRequestError(
                    f"the {call.loss_fn!r} {what} is not finite; check the advantages and the "
                    "sampler logprobs (a huge logprob gap overflows the ratio)"
                )
            for p, grad in zip(adapter.params, saved, strict=True):
                if grad is not None:
                    p.grad = grad if p.grad is None else grad + p.grad
            adapter.pending_backwards += 1
        with torch.no_grad():
            _, metrics = self._loss(batch, range(len(logprobs)), logprobs)
        return _output(logprobs, metrics)

    def optim_step(self, model_id: str, params: AdamParams) -> OptimStepResponse:
        """One AdamW step on the accumulated gradient, then the gradient is cleared.

        With no gradient accumulated since the last step this is an error, not a no-op: it
        almost always means a forward_backward was lost or skipped.
        """
        adapter = self._adapter(model_id)
        if adapter.pending_backwards == 0:
            raise InvalidRequestError(
                f"optim_step for {model_id!r}: no gradient accumulated since the last step "
                "(call forward_backward first)"
            )
        grads = [p.grad for p in adapter.params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        if params.grad_clip_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(adapter.params, params.grad_clip_norm, grad_norm)
        for group in adapter.adam.param_groups:
            group.update(
                lr=params.learning_rate,
                betas=(params.beta1, params.beta2),
                eps=params.eps,
                weight_decay=params.weight_decay,
            )
        adapter.adam.step()
        adapter.adam.zero_grad(set_to_none=True)
        adapter.step += 1
        adapter.pending_backwards = 0
        return OptimStepResponse(
            metrics={
                "grad_norm:mean": float(grad_norm),
                "learning_rate:mean": params.learning_rate,
                "step:max": float(adapter.step),
            }
        )

    # -- checkpoints -------------------------------------------------------------------------

    def save_state(self, model_id: str, name: str, overwrite: bool = False) -> SaveWeightsResponse:
        """Adapter weights + optimizer state + step, to `<root>/<run>/weights/<name>`."""
        path = self._checkpoint_path(model_id, "weights", name)
        adapter = self._adapter(model_id)
        write_checkpoint(
            path,
            self._meta(adapter, has_optimizer=True),
            lora.adapter_config_dict(self._peft_model(), adapter.name, self.model_path),
            lora.adapter_state_dict(self._peft_model(), adapter.name),
            adapter.adam.state_dict(),
            overwrite=overwrite,
        )
        return SaveWeightsResponse(path=str(path))

    def save_weights_for_sampler(self, model_id: str, name: str) -> SaveWeightsForSamplerResponse:
        """Adapter weights in standard PEFT format, to `<root>/<run>/sampler_weights/<name>`."""
        path = self._checkpoint_path(model_id, "sampler_weights", name)
        adapter = self._adapter(model_id)
        write_checkpoint(
            path,
            self._meta(adapter, has_optimizer=False),
            lora.adapter_config_dict(self._peft_model(), adapter.name, self.model_path),
            lora.adapter_state_dict(self._peft_model(), adapter.name),
            None,
            overwrite=True,
        )
        return SaveWeightsForSamplerResponse(path=str(path))

    def load_state(self, model_id: str, path: str, with_optimizer: bool) -> LoadWeightsResponse:
        """Replaces the adapter's weights (and optimizer state and step, if asked) from `path`.

        Everything is read and checked before anything is replaced.
        """
        adapter = self._adapter(model_id)
        checkpoint = read_checkpoint(path, with_optimizer=with_optimizer)
        self._check_compatible(path, checkpoint.meta)
        if checkpoint.meta.lora_config.model_dump(
            exclude={"seed"}
        ) != adapter.lora_config.model_dump(exclude={"seed"}):
            raise CheckpointError(
                f"checkpoint {path!r} has LoRA config {checkpoint.meta.lora_config} but "
                f"{model_id!r} has {adapter.lora_config}"
            )
        alpha = checkpoint.adapter_config.get("lora_alpha", self.config.lora_alpha)
        if alpha != self.config.lora_alpha:  # the same weights would scale differently here
            raise CheckpointError(
                f"checkpoint {path!r} was trained with lora_alpha={alpha}, but this trainer "
                f"runs lora_alpha={self.config.lora_alpha} (TrainerConfig.lora_alpha)"
            )
        current = lora.adapter_state_dict(self._peft_model(), adapter.name)
        shapes = {k: tuple(v.shape) for k, v in current.items()}
        loaded = {k: tuple(v.shape) for k, v in checkpoint.weights.items()}
        if shapes != loaded:
            raise CheckpointError(f"checkpoint {path!r}: adapter tensors do not match this model")
        optimizer = None
        if checkpoint.optimizer is not None:
            optimizer = torch.optim.AdamW(adapter.params, lr=0.0)
            try:
                optimizer.load_state_dict(checkpoint.optimizer)
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"checkpoint {path!r}: bad optimizer state: {e}") from None
        set_peft_model_state_dict(self._peft_model(), checkpoint.weights, adapter_name=adapter.name)
        if optimizer is not None:
            adapter.optimizer = optimizer
            adapter.step = checkpoint.meta.step
        adapter.adam.zero_grad(set_to_none=True)
        adapter.pending_backwards = 0
        return LoadWeightsResponse(path=str(path))

    # -- exports for the samplers ------------------------------------------------------------

    def adapter_weights(self, model_id: str) -> tuple[dict[str, Any], PackedTensors]:
        """The adapter's config and PEFT-format weights, packed for the object store."""
        adapter = self._adapter(model_id)
        peft_model = self._peft_model()
        return (
            lora.adapter_config_dict(peft_model, adapter.name, self.model_path),
            PackedTensors.pack(lora.adapter_state_dict(peft_model, adapter.name, copy=False)),
        )

    def merged_weights(self, model_id: str) -> dict[str, torch.Tensor]:
        """The merged model's weights; in a sharded trainer every rank gathers the sharded
        weights with the others, and rank 0 alone returns them."""
        adapter = self._adapter(model_id)
        merged = lora.merged_state_dict(self._peft_model(), adapter.name, self._group.full)
        return merged if self._group.rank == 0 else {}

    def memory_stats(self) -> dict[str, float]:
        """Peak resident memory of this process (MiB), the padded tokens the last batch's model
        calls could hold, and the memory budget's factor over its estimate."""
        return {
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "call_tokens": float(getattr(self, "last_call_tokens", 0)),
            "memory_factor": self._budget.factor,
            "shared_passes": float(self.shared_passes),
        }

    # -- internals ---------------------------------------------------------------------------

    def _record(self, model_id: str) -> Adapter:
        """The adapter's record, resident or paged out."""
        adapter = self._adapters.get(model_id)
        if adapter is None:
            known = ", ".join(sorted(self._adapters)) or "none"
            raise NotFoundError(f"unknown model id {model_id!r} (this trainer holds: {known})")
        return adapter

    def _adapter(self, model_id: str) -> Adapter:
        """The adapter, in the model: paged in if it was out (and the least recently used one
        paged out, past TrainerConfig.max_resident_adapters)."""
        adapter = self._record(model_id)
        if adapter.paged is not None:
            self._page_in(adapter)
        self._touch(model_id)
        return adapter

    def _touch(self, model_id: str) -> None:
        self._calls += 1
        self._adapters[model_id].last_used = self._calls
        bound = self.config.max_resident_adapters
        resident = [(a.last_used, m) for m, a in self._adapters.items() if a.paged is None]
        for _, victim in sorted(resident)[: max(0, len(resident) - bound) if bound else 0]:
            self._page_out(self._adapters[victim])
        on_host = [a for a in self._adapters.values() if a.paged and not a.paged.on_disk]
        on_host.sort(key=lambda a: a.last_used)
        for adapter in on_host[: max(0, len(on_host) - self.config.max_host_adapters)]:
            assert adapter.paged is not None
            adapter.paged.to_disk(self._paging_dir / f"{adapter.name}.safetensors")
        if len(on_host) > self.config.max_host_adapters:
            self._free_memory(collect=False)  # what went to disk leaves memory now

    def _page_out(self, adapter: Adapter) -> None:
        """Moves the adapter's weights, gradients and AdamW state out of the model."""
        adapter.paged = page_out(adapter.params, adapter.adam)
        adapter.optimizer = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _page_in(self, adapter: Adapter) -> None:
        """Brings a paged-out adapter back into the model, exactly as it left."""
        assert adapter.paged is not None
        adapter.optimizer = torch.optim.AdamW(adapter.params, lr=0.0, betas=(0.9, 0.95), eps=1e-12)
        page_in(adapter.params, adapter.paged, adapter.optimizer)
        adapter.paged = None

    def _delete_from_model(self, name: str) -> None:
        with warnings.catch_warnings():  # "adapter X was active which is now deleted": we know
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            self._peft_model().delete_adapter(name)

    def _free_memory(self, collect: bool = True) -> None:
        """Gives freed memory back: the device cache, and the pages malloc keeps (after a
        garbage collection, unless only tensors with no cycles were freed)."""
        if collect:
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)

    def _peft_model(self) -> PeftModel:
        assert self._peft is not None, "no adapter created yet"
        return self._peft

    def _activate(self, model_id: str) -> None:
        if self._active != model_id:
            adapter = self._adapters[model_id]
            self._peft_model().set_adapter(adapter.name)
            for p in adapter.params:  # set_adapter may reset requires_grad; we own it
                p.requires_grad_(True)
            self._active = model_id

    def _prepare(
        self, data: list[Datum], loss_fn: str, loss_fn_config: dict[str, float] | None
    ) -> PreparedBatch:
        return prepare_batch(
            data,
            loss_fn,
            loss_fn_config,
            vocab_size=self.vocab_size,
            max_context=self.max_context,
        )

    def _bucket_logprobs(
        self, batch: PreparedBatch, mixed: MixedBatch | None = None
    ) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
        """Yields (datum indices, their target logprobs), one model call per bucket, for
        this rank's share of the batch; target logprobs are [N] or [N, K], fp32.

        Datums that share a prefix go into prefix-tree rows (trainers/packing.py); rows, or
        datums, are bucketed by length (few model calls, little padding). The vocabulary
        projection runs only on real (unpadded) positions. A rank with fewer buckets than
        another then yields ([], [a scalar of the model's graph]) per missing call. With
        `mixed`, the datums belong to several adapters (trainers/mixed.py): rows never mix
        adapters, buckets do.
        """
        causal_lm: Any = self._peft_model().get_base_model()
        decoder, lm_head = causal_lm.get_decoder(), causal_lm.get_output_embeddings()
        lengths = [d.length for d in batch.datums]
        share = self._group.share(lengths)
        owners = [mixed.owners[i] for i in share] if mixed else [0] * len(share)
        rows = []
        for owner in sorted(set(owners)):
            mine = [j for j, o in zip(share, owners, strict=True) if o == owner]
            rows += self._plan_rows(batch, mine)
        sizes = [row.size for row in rows]
        buckets = [
            [rows[j] for j in bucket]
            for bucket in plan_buckets(
                sizes, self._call_tokens(max(sizes, default=1)), self.config.call_overhead_tokens
            )
        ]
        for _ in range(self._group.max_calls(len(buckets)) - len(buckets)):
            idle = torch.zeros(1, 1, dtype=torch.int64, device=self.device)
            hidden = decoder(input_ids=idle, use_cache=False).last_hidden_state
            yield [], [hidden.float().sum() * 0.0]
        for bucket in buckets:
            width = max(row.size for row in bucket)
            # The caller's backward of this bucket runs before the generator resumes, so the
            # measurement covers the call's whole peak.
            with self._budget.measure(len(bucket) * width, width):
                if mixed is not None:  # each adapter's rows one slice (trainers/mixed.py)
                    bucket.sort(key=lambda row: mixed.owners[row.members[0]])
                if all(len(row.members) == 1 for row in bucket):
                    datums = [row.members[0] for row in bucket]
                    yield self._padded_logprobs(batch, datums, decoder, lm_head, mixed)
                else:
                    yield self._tree_logprobs(batch, bucket, decoder, lm_head, mixed)

    def _plan_rows(self, batch: PreparedBatch, indices: list[int]) -> list[TrieRow]:
        """Rows for the datums `indices`: prefix-tree rows where prefixes are shared."""
        sequences = [batch.datums[i].tokens.tolist() for i in indices]
        if self._shares_prefixes:
            rows = plan_rows(
                sequences,
                self.config.shared_prefix_min_tokens,
                self.config.shared_prefix_row_tokens,
            )
        else:
            rows = [TrieRow([j], [s], len(s)) for j, s in enumerate(sequences)]
        for row in rows:  # positions in `indices` -> datum indices
            row.members = [indices[j] for j in row.members]
        return rows

    def _call_tokens(self, longest: int) -> int:
        """Padded tokens one model call may hold: what the free memory holds at the batch's
        longest row (trainers/memory.py), within TrainerConfig.max_tokens_per_batch."""
        tokens = self._budget.tokens_per_call(longest)
        cap = self.config.max_tokens_per_batch
        self.last_call_tokens = min(tokens, cap) if cap else tokens
        return self.last_call_tokens

    @property
    def _shares_prefixes(self) -> bool:
        attention = self._base.config._attn_implementation
        return self.config.shared_prefix_row_tokens > 0 and attention in ("sdpa", "eager")

    def _padded_logprobs(
        self,
        batch: PreparedBatch,
        bucket: list[int],
        decoder: Any,
        lm_head: Any,
        mixed: MixedBatch | None = None,
    ) -> tuple[list[int], list[torch.Tensor]]:
        """One datum per row, right-padded."""
        lengths = [batch.datums[i].length for i in bucket]
        width = max(lengths)
        ids = torch.zeros(len(bucket), width, dtype=torch.int64)
        mask = torch.zeros(len(bucket), width, dtype=torch.int64)
        for row, (i, length) in enumerate(zip(bucket, lengths, strict=True)):
            ids[row, :length] = batch.datums[i].tokens
            mask[row, :length] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        with adapters_of_rows(decoder, mixed, bucket):
            hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        # The output head and log-softmax in chunks of tokens on GPU (trainers/logprobs.py);
        # datums with fewer top-K targets than others are padded with token 0, cut after.
        targets = [batch.datums[i].inputs["target_tokens"] for i in bucket]
        flat = [t.reshape(n, -1) for n, t in zip(lengths, targets, strict=True)]
        k = max(f.shape[1] for f in flat)
        padded = torch.cat([torch.nn.functional.pad(f, (0, k - f.shape[1])) for f in flat])
        token_datums = torch.repeat_interleave(torch.tensor(bucket), torch.tensor(lengths))
        bucket_logprobs = self._head_logprobs(
            lm_head,
            hidden[mask.bool()],  # [tokens of the bucket, H]
            padded.to(self.device),
            mixed,
            token_datums,
        )
        rows = torch.split(bucket_logprobs, lengths)
        picked = [
            row[:, : f.shape[1]].reshape(t.shape)
            for row, f, t in zip(rows, flat, targets, strict=True)
        ]
        return bucket, picked

    def _tree_logprobs(
        self,
        batch: PreparedBatch,
        rows: list[TrieRow],
        decoder: Any,
        lm_head: Any,
        mixed: MixedBatch | None = None,
    ) -> tuple[list[int], list[torch.Tensor]]:
        """Prefix-tree rows: each shared token and each shared (position, targets) once."""
        members = [i for row in rows for i in row.members]
        targets = {i: batch.datums[i].inputs["target_tokens"] for i in members}
        flat = {i: t.reshape(batch.datums[i].length, -1) for i, t in targets.items()}
        packed = pack_bucket(rows, flat, self._base.dtype)
        row_datums = [row.members[0] for row in rows]  # a row's datums share one adapter
        with adapters_of_rows(decoder, mixed, row_datums):
            hidden = decoder(
                input_ids=packed.input_ids.to(self.device),
                position_ids=packed.position_ids.to(self.device),
                attention_mask=packed.mask.to(self.device),
                use_cache=False,
            ).last_hidden_state
        head_logprobs = self._head_logprobs(
            lm_head,
            hidden[packed.head_rows.to(self.device), packed.head_nodes.to(self.device)],
            packed.head_targets.to(self.device),
            mixed,
            torch.tensor(row_datums)[packed.head_rows],
        )
        picked = [
            head_logprobs[pick.to(self.device)][:, : flat[i].shape[1]].reshape(targets[i].shape)
            for i, pick in zip(packed.datums, packed.picks, strict=True)
        ]
        return packed.datums, picked

    def _head_logprobs(
        self,
        lm_head: Any,
        hidden_T_H: torch.Tensor,
        targets_T_K: torch.Tensor,
        mixed: MixedBatch | None,
        token_datums: torch.Tensor,
    ) -> torch.Tensor:
        """Target logprobs through the output head; with `mixed`, each adapter's tokens
        (`token_datums`: the datum of each token) through that adapter's head."""
        chunk = self.config.resolved_chunk_tokens(self.device.type == "cuda")
        if mixed is None:
            return target_logprobs(lm_head, hidden_T_H, targets_T_K, self._softcap, chunk)
        token_owners = torch.tensor(mixed.owners)[token_datums]
        order, parts = [], []
        for owner in token_owners.unique().tolist():
            where = (token_owners == owner).nonzero().squeeze(1)
            with tokens_with_adapter(lm_head, mixed.names[owner]):
                parts.append(
                    target_logprobs(
                        lm_head, hidden_T_H[where], targets_T_K[where], self._softcap, chunk
                    )
                )
            order.append(where)
        back = torch.empty_like(token_owners)
        back[torch.cat(order)] = torch.arange(len(token_owners))
        return torch.cat(parts)[back.to(self.device)]

    def _loss(
        self, batch: PreparedBatch, indices: Iterable[int], logprobs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss over the datums `indices` (in that order), whose logprobs are given."""
        datums = [batch.datums[i] for i in indices]
        if batch.custom is not None:  # a loss sent as a graph (trainers/custom_graph.py)
            return batch.custom.batch_loss(logprobs, [d.inputs for d in datums], self.device)
        spec = LOSSES[batch.loss_fn]
        if spec.per_datum:  # one call per datum (a sequence-level loss: gspo)
            inputs_D = [
                {k: v.to(self.device) for k, v in d.inputs.items() if k != "target_tokens"}
                for d in datums
            ]
            return per_datum_loss(spec.fn, logprobs, inputs_D, batch.loss_fn_config)
        flat = torch.cat(logprobs)
        inputs = {
            key: torch.cat([d.inputs[key] for d in datums]).to(self.device)
            for key in datums[0].inputs
            if key != "target_tokens"
        }
        loss, metrics = spec.fn(flat, inputs, batch.loss_fn_config)
        return loss, metrics

    def _checkpoint_path(self, model_id: str, kind: str, name: str) -> Path:
        path = checkpoint_path(self.config.resolved_checkpoint_dir(), model_id, kind, name)
        self._record(model_id)  # after the name's check, as before any other
        return path

    def _meta(self, adapter: Adapter, *, has_optimizer: bool) -> CheckpointMeta:
        return CheckpointMeta(
            base_model=self.base_model,
            fingerprint=self.fingerprint,
            lora_config=adapter.lora_config,
            step=adapter.step,
            has_optimizer=has_optimizer,
        )

    def _check_compatible(self, path: str, meta: CheckpointMeta) -> None:
        if meta.fingerprint != self.fingerprint:
            raise CheckpointError(
                f"checkpoint {path!r} was made for base model {meta.base_model!r}, "
                f"not for {self.base_model!r} (architectures differ)"
            )


def _output(logprobs: list[torch.Tensor], metrics: dict[str, float]) -> ForwardBackwardOutput:
    return ForwardBackwardOutput(
        loss_fn_outputs=[{"logprobs": TensorData.from_torch(lp)} for lp in logprobs],
        metrics={k: v for k, v in metrics.items() if math.isfinite(v)},
    )


def _pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("trainer device 'cuda' asked for, but no GPU is visible")
    return torch.device(setting)
