"""The checkpoint format: one home for its layout, its names, its writing and its reading.

    <root>/<run>/weights/<name>/          save_state: adapter + optimizer
    <root>/<run>/sampler_weights/<name>/  save_weights_for_sampler: adapter only

`<run>` is the model id with ':' and '/' replaced (`run_directory`); `<name>` is one path
component (`check_checkpoint_name`). The trainer writes, the samplers load sampler checkpoints
as standard PEFT adapters, and the server's run records point at the same directories.

Each holds `adapter_config.json` + `adapter_model.safetensors` (standard PEFT) and
`engineroom.json` (base model, its fingerprint, LoRA config, step); `weights/` also holds
`optimizer.pt`. A directory is written under a temporary name, fsync'd and renamed into place,
so a process killed mid-save (or a machine losing power) never leaves a half-written checkpoint
behind, and one whose save returned is on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rl.durable import fsync_directory, fsync_tree
from rl.errors import CheckpointError, InvalidRequestError
from rl.types import LoraConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER = "optimizer.pt"
METADATA = "engineroom.json"
FORMAT_VERSION = 1


def run_directory(model_id: str) -> str:
    """The directory name of a training run's checkpoints under the checkpoint root."""
    return model_id.replace(":", "_").replace("/", "_")


def check_checkpoint_name(name: str) -> str:
    """A checkpoint name is one path component: no '/', no '..', nothing hidden or empty."""
    if not isinstance(name, str) or not name or name.strip() != name:
        raise InvalidRequestError(f"checkpoint name {name!r} must be a non-empty string")
    if "/" in name or "\\" in name or ".." in name or name.startswith(".") or "\x00" in name:
        raise InvalidRequestError(
            f"checkpoint name {name!r} must not contain '/', '\\' or '..' or start with '.'"
        )
    if len(name) > 200:
        raise InvalidRequestError(f"checkpoint name {name!r} is longer than 200 characters")
    return name


def checkpoint_path(root: Path, model_id: str, kind: str, name: str) -> Path:
    """Where checkpoint `name` of kind `kind` ("weights" / "sampler_weights") of a run lives."""
    return root / run_directory(model_id) / kind / check_checkpoint_name(name)


@dataclass
class CheckpointMeta:
    base_model: str
    fingerprint: str
    lora_config: LoraConfig
    step: int
    has_optimizer: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "base_model": self.base_model,
            "fingerprint": self.fingerprint,
            "lora_config": self.lora_config.model_dump(),
            "step": self.step,
            "has_optimizer": self.has_optimizer,
        }


@dataclass
class LoadedCheckpoint:
    meta: CheckpointMeta
    adapter_config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None


def write_peft_files(
    directory: Path, adapter_config: dict[str, Any], weights: Mapping[str, torch.Tensor]
) -> None:
    """A standard PEFT adapter: `adapter_config.json` + `adapter_model.safetensors` (keys as
    PEFT saves them, which `lora.adapter_state_dict` gives)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / ADAPTER_WEIGHTS))


def write_checkpoint(
    path: Path,
    meta: CheckpointMeta,
    adapter_config: dict[str, Any],
    weights: dict[str, torch.Tensor],
    optimizer: dict[str, Any] | None,
    *,
    overwrite: bool,
) -> Path:
    if path.exists() and not overwrite:
        raise CheckpointError(f"checkpoint {str(path)!r} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        write_peft_files(tmp, adapter_config, weights)
        if optimizer is not None:
            torch.save(optimizer, tmp / OPTIMIZER)
        (tmp / METADATA).write_text(json.dumps(meta.to_json(), indent=2))
        fsync_tree(tmp)  # on disk before the rename makes it the checkpoint
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_directory(path.parent)  # the rename itself
    return path


def read_checkpoint(path: str | os.PathLike[str], *, with_optimizer: bool) -> LoadedCheckpoint:
    """Reads and checks a checkpoint directory; raises CheckpointError naming what is wrong."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a directory")
    meta_path = root / METADATA
    for required in (meta_path, root / ADAPTER_CONFIG, root / ADAPTER_WEIGHTS):
        if not required.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} has no {required.name}")
    try:
        raw = json.loads(meta_path.read_text())
        meta = CheckpointMeta(
            base_model=raw["base_model"],
            fingerprint=raw["fingerprint"],
            lora_config=LoraConfig.model_validate(raw["lora_config"]),
            step=int(raw["step"]),
            has_optimizer=bool(raw["has_optimizer"]),
        )
        adapter_config = json.loads((root / ADAPTER_CONFIG).read_text())
        weights = load_file(str(root / ADAPTER_WEIGHTS))
    except (KeyError, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable: {e}") from None
    optimizer = None
    if with_optimizer:
        if not meta.has_optimizer or not (root / OPTIMIZER).is_file():
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds no optimizer state (a sampler checkpoint?); "
                "load it without the optimizer"
            )
        optimizer = torch.load(root / OPTIMIZER, map_location="cpu", weights_only=True)
    return LoadedCheckpoint(meta, adapter_config, weights, optimizer)


def read_sampler_checkpoint(model_path: str) -> tuple[str, dict[str, Any], str]:
    """(resolved directory, adapter_config, base model) of a saved sampler checkpoint."""
    if not isinstance(model_path, str) or not model_path:
        raise InvalidRequestError(f"model_path must be a non-empty string, got {model_path!r}")
    if model_path.startswith("tinker://"):
        raise InvalidRequestError(
            f"model_path {model_path!r}: tinker:// paths are not served here; pass the local "
            "path returned by save_weights_for_sampler"
        )
    root = Path(model_path).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"model_path {model_path!r} is not a directory")
    try:
        adapter_config = json.loads((root / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"model_path {model_path!r} has no readable adapter_config.json: {e}"
        ) from None
    if not (root / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"model_path {model_path!r} has no adapter_model.safetensors")
    base = adapter_config.get("base_model_name_or_path")
    meta = root / METADATA
    if meta.is_file():
        with contextlib.suppress(ValueError):
            base = json.loads(meta.read_text()).get("base_model", base)
    if not isinstance(base, str) or not base:
        raise CheckpointError(f"model_path {model_path!r} does not name its base model")
    return str(root.resolve()), adapter_config, base
