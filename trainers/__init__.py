"""The LoRA trainer: one base model, many adapters, each with its own optimizer state.

    config.py        TrainerConfig: device, dtype, threads, placement, batching, checkpoints
    trainer.py       LoraTrainer: the model, the adapters, forward/backward/optim/save/load
    actor.py         the trainer as a Ray actor (or a sharded group of them), thin
    sharded.py       a sharded trainer: N ranks in one torch.distributed group, via rank 0
    distributed.py   its collectives and the FSDP2 sharding of the base model
    losses.py        the built-in losses: pure functions in a name -> spec table
    validation.py    a batch checked before it touches the model, as tensors
    batching.py      datums grouped into few model calls with little padding
    packing.py       datums sharing a prefix packed into one row, the prefix computed once
    logprobs.py      target logprobs without a [tokens, vocab] tensor of the whole batch
    lora.py          peft plumbing: target modules, adapter exports

It imports the ground floor (rl/*.py) only; the client side is rl/client/.
"""

from typing import TYPE_CHECKING, Any

from trainers.config import TrainerConfig

if TYPE_CHECKING:
    from trainers.trainer import LoraTrainer


def __getattr__(name: str) -> Any:
    # The trainer (peft, and with it transformers: 2.4 s to import) loads on first use, so a
    # driver that only configures and places a trainer never imports it.
    if name == "LoraTrainer":
        from trainers.trainer import LoraTrainer

        return LoraTrainer
    raise AttributeError(f"module 'trainers' has no attribute {name!r}")


__all__ = ["LoraTrainer", "TrainerConfig"]
