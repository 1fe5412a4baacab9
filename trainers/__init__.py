"""The LoRA trainer: one base model, many adapters, each with its own optimizer and queue."""

from typing import TYPE_CHECKING, Any

from trainers.config import TrainerConfig

if TYPE_CHECKING:
    from trainers.trainer import LoraTrainer


def __getattr__(name: str) -> Any:
    # The engine (peft, and with it transformers: 2.4 s to import) loads on first use, so a
    # driver that only configures and places a trainer never imports it.
    if name == "LoraTrainer":
        from trainers.trainer import LoraTrainer

        return LoraTrainer
    raise AttributeError(f"module 'trainers' has no attribute {name!r}")


__all__ = ["LoraTrainer", "TrainerConfig"]
