"""Which engine serves a model: vLLM where its installed build can serve it, else torch.

A model that vLLM cannot serve does not fail at start-up but at the first forward pass (vLLM's
CPU attention has kernels for some head sizes only: a tiny model with hidden 64 and 4 heads,
head size 16, crashes the engine with "Unsupported CPU attention configuration"). So before a
pool starts, the model's config is checked against what the installed vLLM declares it
supports: the architecture (its model registry) and, on CPU, the attention head size and dtype
(its CPU attention backend). The check asks vLLM itself, so a newer build that supports more
is taken at its word; on GPU only the architecture is checked (the GPU attention backend is
picked at start-up from many).

engine="auto": an unservable model falls back to the torch engine with a one-line warning.
engine="vllm": it is an error at once, before any actor starts.

Asking vLLM means importing its model registry and CPU attention backend: 5-9 s on this
machine, in the driver, before the first sampler actor can start. What it answers depends on
the installed build only, so the answers are kept in a file per build
(`<cache>/vllm/facts-<key>.json`, keyed by the package's path and install time; see
rl.models.cache_dir) and later processes read them from there in milliseconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rl.errors import InvalidRequestError
from samplers.config import SamplerConfig, resolve_engine

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def engine_config_for(model_dir: str, config: SamplerConfig, on_gpu: bool) -> SamplerConfig:
    """`config` with the engine that will serve `model_dir` ("vllm" or "torch")."""
    engine = resolve_engine(config)
    if engine == "torch":
        return dataclasses.replace(config, engine="torch")
    reason = vllm_unsupported_reason(model_dir, config.resolved_dtype(on_gpu), on_gpu)
    if reason is None:
        return dataclasses.replace(config, engine="vllm")
    if config.engine == "vllm":
        raise InvalidRequestError(
            f"SamplerConfig.engine='vllm' cannot serve {model_dir}: {reason}. "
            "Use engine='torch' (or 'auto', which falls back to it)."
        )
    if model_dir not in _warned:
        _warned.add(model_dir)
        logger.warning(
            "vLLM cannot serve %s (%s); sampling with the torch engine", model_dir, reason
        )
    return dataclasses.replace(config, engine="torch")


def vllm_unsupported_reason(model_dir: str, dtype: str, on_gpu: bool) -> str | None:
    """Why the installed vLLM cannot serve `model_dir` in `dtype`, or None where it can (as
    far as can be known without starting it)."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_dir)
    architectures = list(getattr(hf_config, "architectures", None) or [])
    supported = _supported_architectures()
    if architectures and not any(a in supported for a in architectures):
        return f"architecture {', '.join(architectures)} is not in vLLM's model registry"
    if on_gpu:
        return None
    head_sizes, dtypes = _cpu_attention_limits()
    head_size = _head_size(hf_config)
    if head_size is not None and head_size not in head_sizes:
        return (
            f"attention head size {head_size}; vLLM's CPU attention supports "
            f"{', '.join(map(str, head_sizes))}"
        )
    if dtype not in dtypes:
        return f"dtype {dtype}; vLLM's CPU attention supports {', '.join(dtypes)}"
    return None


def _head_size(hf_config: object) -> int | None:
    head_dim = getattr(hf_config, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    hidden = getattr(hf_config, "hidden_size", None)
    heads = getattr(hf_config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


@functools.cache
def _supported_architectures() -> frozenset[str]:
    def ask() -> list[str]:
        from vllm.model_executor.models import ModelRegistry

        return sorted(ModelRegistry.get_supported_archs())

    return frozenset(_vllm_fact("architectures", ask))


@functools.cache
def _cpu_attention_limits() -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(head sizes, dtypes) vLLM's CPU attention backend declares."""

    def ask() -> list[list[Any]]:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        dtypes = [str(d).removeprefix("torch.") for d in CPUAttentionBackend.supported_dtypes]
        return [list(CPUAttentionBackend.get_supported_head_sizes()), dtypes]

    head_sizes, dtypes = _vllm_fact("cpu_attention", ask)
    return tuple(int(h) for h in head_sizes), tuple(str(d) for d in dtypes)


def _vllm_fact(name: str, ask: Callable[[], Any]) -> Any:
    """`ask()`'s answer about the installed vLLM, from its facts file if there (see the
    module docstring); asked and stored otherwise."""
    path = _facts_path()
    facts: dict[str, Any] = {}
    if path is not None:
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(path.read_text())
            facts = loaded if isinstance(loaded, dict) else {}
    if name not in facts:
        facts[name] = ask()
        if path is not None:
            with contextlib.suppress(OSError):
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                partial.write_text(json.dumps(facts, sort_keys=True))
                partial.replace(path)
    return facts[name]


@functools.cache
def _facts_path() -> Path | None:
    """The facts file of the installed vLLM build, keyed by where its package is and when it
    was installed (no import, no scan of the installed distributions); None without vLLM."""
    from rl.models import cache_dir

    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        return None
    origin = Path(spec.origin)
    build = f"{origin}:{origin.stat().st_mtime_ns}"
    return cache_dir() / "vllm" / f"facts-{hashlib.sha256(build.encode()).hexdigest()[:16]}.json"
