"""The LoRA trainer: one base model, many adapters, each with its own optimizer and queue."""

from trainers.config import TrainerConfig
from trainers.engine import LoraTrainer

__all__ = ["LoraTrainer", "TrainerConfig"]
