"""Checkpoints out to stock tools, PEFT adapters in: `python -m rl.client.export key=value ...`.

    to=peft        a checkpoint -> a PEFT adapter directory (`PeftModel.from_pretrained`, vLLM's
                   `LoRARequest`)
    to=merged      a checkpoint -> a Hugging Face model directory with the adapter merged into the
                   base weights, config and tokenizer included (`AutoModelForCausalLM`)
    to=checkpoint  a PEFT adapter trained elsewhere -> a checkpoint that
                   `create_training_client_from_state` and `load_state` continue from

A checkpoint holds standard PEFT files already (rl/checkpoint_format.py), so a PEFT export is
those two files without our metadata and optimizer state. Where stock tools and the trainer part:

- Tied embeddings. The trainer's `lm_head` adapter changes the output projection only. Where the
  base ties it to the input embedding (one tensor), a merge in place would change both, as
  peft's `merge_and_unload` does; the merged export unties them and saves `lm_head.weight`.
- The adapter's layout. The trainer adapts whole groups of modules (`rl.types.LoraConfig`:
  attention, MLP, unembedding) at its own `lora_alpha`. An import keeps the adapter's modules
  (lora_B rescaled so that scale * B @ A, and so every output, is unchanged) and gives the other
  modules of their groups a fresh adapter's start (lora_B = 0: no change to the outputs), from
  which they train.

On the client floor: it uses the trainer's LoRA vocabulary (trainers.lora) offline, with no Ray
and no actor. A `tinker://` path resolves to where the server keeps that checkpoint on this
machine; it is an operator's tool, reading the disk, not the server's run records.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from rl.checkpoint_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CheckpointMeta,
    checkpoint_path,
    read_checkpoint,
    write_checkpoint,
    write_peft_files,
)
from rl.cli import parse_config
from rl.errors import CheckpointError, EngineRoomError, InvalidRequestError
from rl.models import cache_dir, load_tokenizer, model_fingerprint, resolve_model
from rl.types import LoraConfig
from samplers.config import VLLM_LORA_RANKS
from samplers.merge import lora_scale
from trainers import lora
from trainers.config import TrainerConfig

Target = Literal["peft", "merged", "checkpoint"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
KINDS = ("weights", "sampler_weights")
# A LoRA tensor as peft saves it; `lora_embedding_A` (an Embedding's) matches so as to be named.
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(embedding_)?(?P<ab>[AB])(\.weight)?$")
# The LoraConfig flag of each group of modules the trainer adapts (trainers.lora).
_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("train_attn", lora.ATTN_MODULES),
    ("train_mlp", lora.MLP_MODULES),
    ("train_unembed", lora.UNEMBED_MODULES),
)
# adapter_config.json settings that a plain LoRA, as the trainer trains it, leaves unset.
_PLAIN_LORA_OFF = (
    "use_dora", "lora_bias", "modules_to_save", "fan_in_fan_out", "rank_pattern",
    "alpha_pattern", "target_parameters", "trainable_token_indices", "layer_replication",
)  # fmt: skip


@dataclass(frozen=True)
class ExportConfig:
    source: str = ""
    """What to convert: a checkpoint directory (<root>/<run>/weights/<name> or
    sampler_weights/<name>) or a tinker:// path; with to=checkpoint, a PEFT adapter directory"""
    out: str = ""
    """The directory to write; it must not exist unless overwrite=true"""
    to: Target = "peft"
    """peft: a PEFT adapter directory; merged: a Hugging Face model with the adapter merged in;
    checkpoint: import a PEFT adapter as a checkpoint a training client continues from"""
    base_model: str = ""
    """The base model (built-in name, local directory or hub name); '' = the one the source
    names. For to=peft, the name written into the adapter's adapter_config.json"""
    dtype: DType = "auto"
    """to=merged: the weights' dtype; auto = the base model's (the merge itself is in float32)"""
    checkpoint_root: str = ""
    """Where tinker:// paths resolve: the server's checkpoint directory (its
    --trainer.checkpoint_dir); '' = $ENGINEROOM_HOME/server/checkpoints, the server's default"""
    lora_alpha: float = TrainerConfig.lora_alpha
    """to=checkpoint: the lora_alpha of the trainer that will load it (TrainerConfig.lora_alpha)"""
    max_rank: int = VLLM_LORA_RANKS[-1]
    """to=checkpoint: the highest LoRA rank accepted (samplers serve up to
    sampler.max_lora_rank, which vLLM caps at 512)"""
    seed: int = 0
    """to=checkpoint: seeds lora_A of the modules the adapter lacks (lora_B starts at 0)"""
    overwrite: bool = False
    """Replace `out` if it exists"""


def resolve_source(source: str, checkpoint_root: str | os.PathLike[str] = "") -> Path:
    """A checkpoint directory as given, or `tinker://<run id>/<kind>/<name>` as the directory
    the server keeps it in under `checkpoint_root` (default: the server's)."""
    if not isinstance(source, str) or not source:
        raise InvalidRequestError("source= must name a checkpoint directory or a tinker:// path")
    if not source.startswith("tinker://"):
        return Path(source).expanduser()
    parts = source.removeprefix("tinker://").split("/")
    if len(parts) != 3 or parts[1] not in KINDS:
        raise InvalidRequestError(
            f"{source!r}: expected tinker://<run id>/<weights|sampler_weights>/<name>"
        )
    root = Path(checkpoint_root).expanduser() if checkpoint_root else _server_checkpoints()
    path = checkpoint_path(root, parts[0], parts[1], parts[2])
    if not path.is_dir():
        raise CheckpointError(
            f"{source!r}: no checkpoint at {path}; checkpoint_root= must be the server's "
            "checkpoint directory (--trainer.checkpoint_dir, or <its --home>/checkpoints)"
        )
    return path


def _server_checkpoints() -> Path:
    """The server's checkpoint directory when neither --home nor --trainer.checkpoint_dir is set
    (rl.server.config.ServerConfig.trainer_config)."""
    return cache_dir() / "server" / "checkpoints"


def export_peft(
    source: str | os.PathLike[str], out: str | os.PathLike[str], *, base_model: str = "",
    overwrite: bool = False,
) -> Path:  # fmt: skip
    """Writes checkpoint `source` as a PEFT adapter directory `out`. `base_model` replaces the
    base its adapter_config.json names (by default the directory the trainer loaded)."""
    checkpoint = read_checkpoint(source, with_optimizer=False)
    adapter_config = dict(checkpoint.adapter_config)
    if base_model:
        adapter_config["base_model_name_or_path"] = base_model
    with _new_directory(Path(out), overwrite) as tmp:
        write_peft_files(tmp, adapter_config, checkpoint.weights)
    return Path(out)


def export_merged(
    source: str | os.PathLike[str], out: str | os.PathLike[str], *, base_model: str = "",
    dtype: DType = "auto", overwrite: bool = False,
) -> Path:  # fmt: skip
    """Writes the base model with checkpoint `source` merged in, as a Hugging Face model
    directory `out` (weights, config, generation config, tokenizer)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    checkpoint = read_checkpoint(source, with_optimizer=False)
    model_dir = _checked_base(str(source), checkpoint.meta, base_model)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    output_name = _output_module(model)
    if any(f".{output_name}.lora_" in key for key in checkpoint.weights):
        _untie_output(model)
    merged = PeftModel.from_pretrained(model, str(source)).merge_and_unload()
    merged.to(_save_dtype(dtype, model.config))  # type: ignore[arg-type]
    with _new_directory(Path(out), overwrite) as tmp:
        merged.save_pretrained(tmp)  # type: ignore[operator]
        load_tokenizer(model_dir).save_pretrained(tmp)
    return Path(out)


def _checked_base(source: str, meta: CheckpointMeta, base_model: str) -> str:
    """The local directory (or hub name) of the checkpoint's base model, or of `base_model`
    once it is known to be the same architecture."""
    from transformers import AutoConfig

    name = base_model or meta.base_model
    model_dir = resolve_model(name)
    fingerprint = model_fingerprint(AutoConfig.from_pretrained(model_dir))
    if fingerprint != meta.fingerprint:
        raise CheckpointError(
            f"checkpoint {source!r} was trained on {meta.base_model!r}; base model {name!r} "
            f"({model_dir}) is a different architecture (fingerprint {fingerprint}, the "
            f"checkpoint's {meta.fingerprint})"
        )
    return model_dir


def _output_module(model: torch.nn.Module) -> str:
    output = model.get_output_embeddings()  # type: ignore[operator]
    return next(name for name, module in model.named_modules() if module is output)


def _untie_output(model: Any) -> None:
    """Gives the output projection its own copy of a weight it shares with the input
    embedding, and says so in the config, so that a merge changes the output side only."""
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if output.weight.data_ptr() != embedding.weight.data_ptr():
        return
    output.weight = torch.nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config()
    if text_config is not model.config:
        text_config.tie_word_embeddings = False


def _save_dtype(dtype: DType, config: Any) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


@contextlib.contextmanager
def _new_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside `out` that becomes `out` when the block succeeds (and is
    removed when it fails), so that `out` is never half written."""
    if out.exists() and not overwrite:
        raise CheckpointError(f"{str(out)!r} exists; pass overwrite=true to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- import ------------------------------------------------------------------------------------


def import_peft(
    adapter_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, base_model: str = "",
    lora_alpha: float = TrainerConfig.lora_alpha, max_rank: int = VLLM_LORA_RANKS[-1],
    seed: int = 0, overwrite: bool = False,
) -> Path:  # fmt: skip
    """Writes the PEFT adapter at `adapter_dir` as a checkpoint at `out` (no optimizer state,
    step 0) for a trainer with `lora_alpha` on `base_model` (default: the base the adapter
    names). Raises CheckpointError naming what the trainer cannot take, or where the adapter
    and the base model disagree."""
    from transformers import AutoConfig, AutoModelForCausalLM

    where = str(adapter_dir)
    adapter_config, weights = _read_peft(Path(adapter_dir).expanduser())
    rank = _check_supported(where, adapter_config, max_rank)
    name = base_model or adapter_config.get("base_model_name_or_path") or ""
    if not name:
        raise CheckpointError(f"PEFT adapter {where!r} names no base model; pass base_model=")
    model_dir = resolve_model(name)
    hf_config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):  # the module tree and shapes, no weights
        model = AutoModelForCausalLM.from_config(hf_config)
    suffixes = _adapted_modules(where, weights, model, f"{name!r} ({model_dir})", rank)
    lora_config = LoraConfig(
        rank=rank, seed=seed, **{flag: bool(suffixes & set(group)) for flag, group in _GROUPS}
    )
    layout_config, shapes = _trainer_layout(model, lora_config, lora_alpha, model_dir)
    scale = lora_scale(adapter_config) / (lora_alpha / rank)
    state = _trainer_weights(shapes, weights, scale, seed)
    meta = CheckpointMeta(
        base_model=name,
        fingerprint=model_fingerprint(hf_config),
        lora_config=lora_config,
        step=0,
        has_optimizer=False,
    )
    return write_checkpoint(Path(out), meta, layout_config, state, None, overwrite=overwrite)


def _read_peft(root: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    if not root.is_dir():
        raise CheckpointError(f"PEFT adapter {str(root)!r} is not a directory")
    if not (root / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"PEFT adapter {str(root)!r} has no {ADAPTER_CONFIG}")
    if not (root / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(
            f"PEFT adapter {str(root)!r} has no {ADAPTER_WEIGHTS}"
            + (
                " (only adapter_model.bin: save it with safe_serialization=True)"
                if (root / "adapter_model.bin").is_file()
                else ""
            )
        )
    try:
        return json.loads((root / ADAPTER_CONFIG).read_text()), load_file(root / ADAPTER_WEIGHTS)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"PEFT adapter {str(root)!r} is unreadable: {e}") from None


def _check_supported(where: str, config: Mapping[str, Any], max_rank: int) -> int:
    """The adapter's rank, once its config asks for nothing the trainer does not train."""
    departures = {
        "peft_type": config.get("peft_type", "LORA") != "LORA",
        "bias": config.get("bias", "none") != "none",
        **{key: bool(config.get(key)) for key in _PLAIN_LORA_OFF},
    }
    found = [f"{key}={config.get(key)!r}" for key, departs in departures.items() if departs]
    if found:
        raise CheckpointError(
            f"PEFT adapter {where!r} has settings the trainer does not train with: "
            f"{', '.join(found)} (it trains plain LoRA: peft_type 'LORA', bias 'none', "
            f"and none of {', '.join(_PLAIN_LORA_OFF)})"
        )
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise CheckpointError(f"PEFT adapter {where!r}: rank r={rank!r} must be an integer >= 1")
    if rank > max_rank:
        raise CheckpointError(
            f"PEFT adapter {where!r} has rank {rank}, above max_rank={max_rank} (vLLM serves "
            f"ranks up to {VLLM_LORA_RANKS[-1]}; samplers up to their sampler.max_lora_rank)"
        )
    return rank


def _adapted_modules(
    where: str, weights: Mapping[str, torch.Tensor], model: torch.nn.Module, base: str, rank: int
) -> set[str]:
    """The module-name suffixes the adapter adapts, once each of its tensors is a LoRA matrix
    of rank `rank` that fits a Linear module of `base` the trainer can adapt."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = _KEY.match(key)
        if match is not None:
            pairs.setdefault(match["module"], {})[match["ab"]] = tensor
    if not pairs:
        raise CheckpointError(f"PEFT adapter {where!r} holds no LoRA weights")
    modules = dict(model.named_modules())
    for name in pairs:
        if name not in modules:
            raise CheckpointError(
                f"PEFT adapter {where!r} adapts module {name!r}, which base model {base} does "
                "not have: it was trained on another base model"
            )
    supported = {s for _, group in _GROUPS for s in group}
    unsupported = {
        name.rsplit(".", 1)[-1]
        for name in pairs
        if not isinstance(modules[name], torch.nn.Linear)
        or name.rsplit(".", 1)[-1] not in supported
    }
    if unsupported:
        raise CheckpointError(
            f"PEFT adapter {where!r} adapts modules the trainer does not: "
            f"{', '.join(sorted(unsupported))} (it adapts the Linear modules "
            f"{', '.join(sorted(supported))})"
        )
    others = sorted(key for key in weights if _KEY.match(key) is None)
    if others:
        raise CheckpointError(
            f"PEFT adapter {where!r}: tensor {others[0]!r} is not a LoRA matrix (the trainer "
            "trains LoRA matrices only, no full weights)"
        )
    for name, pair in pairs.items():
        _check_pair(where, name, pair, modules[name], base, rank)
    return {name.rsplit(".", 1)[-1] for name in pairs}


def _check_pair(
    where: str, name: str, pair: Mapping[str, torch.Tensor], module: Any, base: str, rank: int
) -> None:
    """lora_A and lora_B of module `name` are there, at the shapes `module` and `rank` give."""
    for ab, expected in (("A", (rank, module.in_features)), ("B", (module.out_features, rank))):
        if ab not in pair:
            raise CheckpointError(f"PEFT adapter {where!r}: module {name!r} has no lora_{ab}")
        if tuple(pair[ab].shape) != expected:
            raise CheckpointError(
                f"PEFT adapter {where!r}: lora_{ab} of {name} has shape "
                f"{list(pair[ab].shape)}, but on base model {base} (rank {rank}) it must be "
                f"{list(expected)}: the adapter was trained on another base model, or its "
                "tensors' rank is not its config's r"
            )


def _trainer_layout(
    model: torch.nn.Module, lora_config: LoraConfig, lora_alpha: float, model_dir: str
) -> tuple[dict[str, Any], dict[str, torch.Size]]:
    """(adapter_config, {key: shape}) of the adapter a trainer makes for `lora_config`."""
    from peft import get_peft_model, get_peft_model_state_dict

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        peft_model = get_peft_model(model, lora.peft_config(model, lora_config, lora_alpha))  # type: ignore[arg-type]
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    shapes = {key: value.shape for key, value in state.items()}
    return lora.adapter_config_dict(peft_model, "default", model_dir), shapes


def _trainer_weights(
    shapes: Mapping[str, torch.Size],
    weights: Mapping[str, torch.Tensor],
    scale: float,
    seed: int,
) -> dict[str, torch.Tensor]:
    """The trainer's adapter tensors: the imported ones (lora_B times `scale`), and a fresh
    adapter's for the rest (lora_A as peft draws it, lora_B zero)."""
    missing = sorted(set(weights) - set(shapes))
    if missing:  # every adapted module is in a group the trainer adapts whole
        raise CheckpointError(f"the trainer's adapter has no tensor {missing[0]!r}")
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if key in weights:
            tensor = weights[key].to(torch.float32)
            state[key] = (tensor * scale if ".lora_B." in key else tensor).contiguous()
        elif ".lora_A." in key:
            state[key] = torch.nn.init.kaiming_uniform_(
                torch.empty(shape), a=math.sqrt(5), generator=generator
            )
        else:
            state[key] = torch.zeros(shape)
    return state


# -- command line ------------------------------------------------------------------------------


def convert(config: ExportConfig) -> Path:
    """Runs the conversion `config` describes; returns the directory written."""
    if not config.out:
        raise InvalidRequestError("out= is required: the directory to write")
    if config.to == "checkpoint":
        return import_peft(
            config.source,
            config.out,
            base_model=config.base_model,
            lora_alpha=config.lora_alpha,
            max_rank=config.max_rank,
            seed=config.seed,
            overwrite=config.overwrite,
        )
    source = resolve_source(config.source, config.checkpoint_root)
    if config.to == "merged":
        return export_merged(
            source,
            config.out,
            base_model=config.base_model,
            dtype=config.dtype,
            overwrite=config.overwrite,
        )
    return export_peft(source, config.out, base_model=config.base_model, overwrite=config.overwrite)


def cli(argv: Sequence[str] | None = None) -> int:
    """`python -m rl.client.export key=value ...`; prints the directory written, or one line
    of error (exit status 2)."""
    try:
        path = convert(parse_config(ExportConfig, list(sys.argv[1:] if argv is None else argv)))
    except EngineRoomError as e:
        print(f"rl.client.export: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
