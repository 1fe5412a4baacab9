"""A sharded trainer as Ray actors: N ranks in one torch.distributed group, called via rank 0.

Clients hold rank 0's actor and call it as they would a one-actor trainer, so every
`TrainingClient` call is one Ray call and each result comes back once. Rank 0 (`LeadRank`)
submits the same call to the other ranks and then runs it itself; as it runs one call at a
time, every rank runs the group's calls in one order, and their collectives pair up
(trainers/distributed.py). Calls that every rank's state must follow (adapters, batches,
loads, the merged export, which gathers sharded weights) run on all ranks; calls that only
read the adapter, whole on every rank (info, saves, the adapter export), run on rank 0 alone.

Every rank checks a batch itself before its model sees it, so a bad datum fails on all ranks
with the same error, before any collective, and changes nothing. Any other failure of a rank
leaves the others waiting in a collective, so a rank other than 0 then ends its process: the
others' collectives fail at once (its connections close) instead of at the timeout. Rank 0
waits for the others and raises `TrainerRankError` (naming the rank) when one died, hung, or
ended the call otherwise than rank 0 did: the group's state can no longer be trusted, and
rl/client/trainer_host.py rebuilds the whole group from the clients' restore points, as for a
one-actor trainer's death.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import traceback
from typing import Any

import ray

from rl.errors import EngineRoomError, TrainerRankError
from rl.futures import ray_get
from rl.types import LoraConfig
from trainers.config import TrainerConfig
from trainers.distributed import COLLECTIVE_TIMEOUT_S, GroupSpec
from trainers.trainer import LoraTrainer

# How long rank 0, having failed unexpectedly itself, waits to hear whether another rank died.
DEATH_NOTICE_S = 10.0


class LeadRank:
    """Rank 0: its own LoraTrainer, the other ranks' actors, and the trainer's public methods."""

    def __init__(self, base_model: str, config: TrainerConfig):
        self._trainer = LoraTrainer(base_model, config)
        self._peers: list[Any] = []  # ranks 1.. in order

    def rendezvous_address(self) -> str:
        """A free TCP port on this node, where the ranks meet (`GroupSpec.init_method`)."""
        host = ray.util.get_node_ip_address()
        with socket.socket() as probe:
            probe.bind((host, 0))
            return f"tcp://{host}:{probe.getsockname()[1]}"

    def join_group(self, spec: GroupSpec, peers: list[Any]) -> None:
        self._peers = list(peers)
        self._trainer.join_group(spec)

    # -- on every rank ---------------------------------------------------------------------

    def create_adapter(self, model_id: str, lora_config: LoraConfig) -> Any:
        if lora_config.seed is None:  # one seed for all ranks: the same initial adapter
            lora_config = lora_config.model_copy(update={"seed": secrets.randbits(31)})
        return self._on_all("create_adapter", model_id, lora_config)

    def create_adapter_from_state(self, *args: Any) -> Any:
        return self._on_all("create_adapter_from_state", *args)

    def release(self, *args: Any) -> Any:
        return self._on_all("release", *args)

    def forward(self, *args: Any) -> Any:
        return self._on_all("forward", *args)

    def forward_backward(self, *args: Any) -> Any:
        return self._on_all("forward_backward", *args)

    def optim_step(self, *args: Any) -> Any:
        return self._on_all("optim_step", *args)

    def load_state(self, *args: Any) -> Any:
        return self._on_all("load_state", *args)

    def merged_weights(self, *args: Any) -> Any:
        return self._on_all("merged_weights", *args)

    def memory_stats(self) -> dict[str, float]:
        """Rank 0's peak resident memory, and the sum over the ranks (MiB)."""
        peers = ray.get([peer.call.remote("memory_stats") for peer in self._peers])
        own = self._trainer.memory_stats()["peak_rss_mib"]
        return {
            "peak_rss_mib": own,
            "peak_rss_mib_all_ranks": own + sum(p["peak_rss_mib"] for p in peers),
        }

    # -- on rank 0 alone (every rank holds the same adapters) -------------------------------

    def get_info(self, *args: Any) -> Any:
        return self._trainer.get_info(*args)

    def base_model_path(self) -> str:
        return self._trainer.base_model_path()

    def save_state(self, *args: Any) -> Any:
        return self._trainer.save_state(*args)

    def save_weights_for_sampler(self, *args: Any) -> Any:
        return self._trainer.save_weights_for_sampler(*args)

    def adapter_weights(self, *args: Any) -> Any:
        return self._trainer.adapter_weights(*args)

    # -- internals ---------------------------------------------------------------------------

    def _on_all(self, method: str, *args: Any) -> Any:
        refs = [peer.call.remote(method, *args) for peer in self._peers]
        try:
            result = getattr(self._trainer, method)(*args)
        except BaseException as error:
            self._check_ranks(method, refs, error)
            raise
        self._check_ranks(method, refs, None)
        return result

    def _check_ranks(self, method: str, refs: list[Any], own_error: BaseException | None) -> None:
        """Waits for the other ranks' share of `method`; raises `TrainerRankError` unless
        each ended it as rank 0 did (`own_error`: rank 0's error, or None). A dead rank is
        named first, as the others' collectives then fail because of it."""
        world = len(refs) + 1
        unexpected = own_error is not None and not isinstance(own_error, EngineRoomError)
        # After an unexpected failure here the others may wait for rank 0 in a collective:
        # wait only long enough to learn whether one of them died first.
        timeout = DEATH_NOTICE_S if unexpected else COLLECTIVE_TIMEOUT_S
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        outcomes = [_outcome(ref, ref in ready) for ref in refs]  # ranks 1..
        for rank, (outcome, error) in enumerate(outcomes, start=1):
            if outcome == "died":
                raise TrainerRankError(rank, world, f"died during {method}: {error}")
        if unexpected:
            raise TrainerRankError(0, world, f"failed in {method}: {own_error!r}")
        for rank, (outcome, error) in enumerate(outcomes, start=1):
            if outcome == "hung":
                detail = f"did not finish {method} within {timeout:g} s"
                raise TrainerRankError(rank, world, detail)
            if outcome == "raised" and not _same_failure(own_error, error):
                raise TrainerRankError(rank, world, f"failed in {method}: {error!r}")
            if outcome == "ok" and own_error is not None:
                raise TrainerRankError(0, world, f"failed alone in {method}: {own_error!r}")


class PeerRank:
    """Ranks 1..: a LoraTrainer that rank 0 calls by method name."""

    def __init__(self, base_model: str, config: TrainerConfig):
        self._trainer = LoraTrainer(base_model, config)

    def call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self._trainer, method)(*args)
        except EngineRoomError:  # a rejected request: every rank rejects it alike
            raise
        except BaseException:  # the other ranks may wait for this one in a collective
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)


def _outcome(ref: Any, ready: bool) -> tuple[str, BaseException | None]:
    """How a rank ended its share of a call: ok, raised (its error), died, or hung."""
    if not ready:
        return "hung", None
    try:
        ray.get(ref)
    except ray.exceptions.RayActorError as error:
        return "died", RuntimeError(str(error).strip().splitlines()[0])
    except ray.exceptions.RayTaskError as error:
        return "raised", error.cause
    return "ok", None


def _same_failure(own: BaseException | None, other: BaseException | None) -> bool:
    """Whether two ranks rejected a call alike (a checked request error, the same message)."""
    return isinstance(own, EngineRoomError) and type(other) is type(own) and str(other) == str(own)


def start_ranks(base_model: str, config: TrainerConfig, options: list[dict[str, Any]]) -> list[Any]:
    """Starts one actor per rank (Ray `.options` per rank, rank 0 first), forms their group
    and shards the model; returns the actors, rank 0 first. Blocks until all have joined."""
    lead: Any = ray.remote(LeadRank).options(**options[0]).remote(base_model, config)  # type: ignore[attr-defined]
    peers: list[Any] = [
        ray.remote(PeerRank).options(**rank_options).remote(base_model, config)  # type: ignore[attr-defined]
        for rank_options in options[1:]
    ]
    ranks: list[Any] = [lead, *peers]
    try:
        address = ray_get(lead.rendezvous_address.remote())
        world = len(ranks)
        joined = [lead.join_group.remote(GroupSpec(0, world, address), peers)]
        joined += [
            peer.call.remote("join_group", GroupSpec(rank, world, address))
            for rank, peer in enumerate(peers, start=1)
        ]
        ray_get(joined)
    except BaseException:
        for actor in ranks:
            ray.kill(actor, no_restart=True)
        raise
    return ranks
