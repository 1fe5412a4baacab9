"""The sharded trainer's collectives and the sharding of its base model (FSDP2), without Ray.

A trainer with `world_size` N is N processes (ranks) in one torch.distributed group: gloo on
the CPU, NCCL on GPUs. Only the frozen base weights of the decoder layers are sharded
(`fully_shard` per layer, under the decoder as FSDP's root); the embedding, the final norm and
the unembedding stay whole on every rank, as does every LoRA adapter and its optimizer state.
peft adds an adapter's modules after sharding, so FSDP never manages them: each rank keeps a
plain replica, the call's gradient is summed over the ranks (one all-reduce), and every rank
then takes the same optimizer step on the same numbers. So a checkpoint does not depend on
the world size, and the sampler export is the same PEFT directory as with one rank.

Every rank runs every call on the whole (validated) batch and takes its share of the datums.
FSDP gathers a layer's weights in its forward (and again in its backward) with a collective
that all ranks must enter together, so a rank with fewer model calls makes idle one-token
calls until it has made as many as the busiest rank.

A world of one (`Group()`) makes every collective the identity, so the one-rank trainer runs
the same code with no process group.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# How long a rank waits in a collective for the others before failing. A rank that dies
# closes its connections and the others fail at once; this bounds a rank that hangs.
COLLECTIVE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class GroupSpec:
    """Where and as whom one rank joins its trainer's process group."""

    rank: int
    world_size: int
    init_method: str  # "tcp://<rank 0's address>:<free port>"


class Group:
    """This rank's view of its trainer's group; the world of one by default."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None):
        self.rank = rank
        self.world_size = world_size
        self.device = device or torch.device("cpu")

    def share(self, lengths: list[int]) -> list[int]:
        """The datum indices this rank computes (see `split`)."""
        return split(lengths, self.world_size)[self.rank]

    def max_calls(self, calls: int) -> int:
        """The most model calls any rank makes for this batch."""
        if self.world_size == 1:
            return calls
        count = torch.tensor([calls], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return int(count.item())

    def sum_grads(self, params: list[torch.nn.Parameter], contributed: bool) -> None:
        """Replaces each `.grad` by its sum over the ranks, in one all-reduce. A rank that
        computed no datum (`contributed` False) adds nothing; a gradient no rank computed
        stays None, as with one rank (AdamW skips such parameters)."""
        if self.world_size == 1:
            return
        own = [p.grad if contributed else None for p in params]
        flat = torch.cat(
            [
                *(
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for p, g in zip(params, own, strict=True)
                ),
                torch.tensor([float(g is not None) for g in own], device=self.device),
            ]
        ).to(self.device, torch.float32)
        dist.all_reduce(flat)
        sizes = [p.numel() for p in params]
        *grads, present = torch.split(flat, [*sizes, len(params)])
        for p, grad, seen in zip(params, grads, present.tolist(), strict=True):
            p.grad = grad.view_as(p).to(p.dtype) if seen else None

    def gather(self, local: dict[int, torch.Tensor], count: int) -> list[torch.Tensor]:
        """Every rank's `{datum index: tensor}` in datum order, on every rank."""
        if self.world_size == 1:
            return [local[i] for i in range(count)]
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, {i: t.detach().cpu() for i, t in local.items()})
        merged = {i: t for part in parts for i, t in part.items()}
        return [merged[i].to(self.device) for i in range(count)]

    def first_failure(self, message: str | None) -> str | None:
        """The lowest rank's failure message, on every rank, so all raise the same error."""
        if self.world_size == 1:
            return message
        messages: list[Any] = [None] * self.world_size
        dist.all_gather_object(messages, message)
        return next((m for m in messages if m is not None), None)

    def full(self, tensor: torch.Tensor) -> torch.Tensor:
        """A sharded base weight gathered whole (a collective); other tensors as they are."""
        from torch.distributed.tensor import DTensor

        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def split(lengths: list[int], world_size: int) -> list[list[int]]:
    """Datum indices per rank, balanced by tokens: longest first, each to the rank with the
    fewest tokens so far (ties to the lower rank); each rank's indices in datum order."""
    load = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        rank = min(range(world_size), key=lambda r: load[r])
        shares[rank].append(i)
        load[rank] += lengths[i]
    return [sorted(share) for share in shares]


def join(spec: GroupSpec, device: torch.device) -> Group:
    """Joins the process group (blocks until every rank has joined)."""
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=spec.init_method,
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    return Group(spec.rank, spec.world_size, device)


def shard_base(model: torch.nn.Module, group: Group) -> None:
    """Shards the decoder layers' weights over the group (FSDP2) and moves what stays whole
    (embedding, final norm, unembedding) to the group's device."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    decoder: Any = model.get_decoder()  # type: ignore[operator]
    layers = next((m for m in decoder.children() if isinstance(m, torch.nn.ModuleList)), None)
    if layers is None:
        raise ValueError(f"{type(decoder).__name__} has no list of layers to shard")
    mesh = init_device_mesh(group.device.type, (group.world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    # The decoder is FSDP's root (it is what the trainer calls), so that each layer gives
    # its gathered weights back after its forward; it shards nothing of its own.
    whole = set(decoder.parameters()) - set(layers.parameters())
    fully_shard(decoder, mesh=mesh, ignored_params=whole)
    for param in model.parameters():
        if not isinstance(param, DTensor):
            param.data = param.data.to(group.device)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(group.device)
