"""How many tokens one model call of the trainer may hold, from the memory it has.

A forward_backward keeps every layer's activations of one model call until that call's
backward, so the trainer's peak is its resident weights plus one call's activations, and a
batch of any size fits once its calls are small enough (trainers/batching.py cuts it; the
losses are sums, so the calls' gradients add up to the batch's). The activations of a call of
T padded tokens at padded length S are, per token (measured on SmolLM2-135M and tiny Llamas on
CPU: 2.2-2.7 MB/token for SmolLM2 at S = 128-512 in float32, ~0.62 MB for a tiny model whose
vocabulary projection dominates):

    act_bytes x layers x (12 x hidden + 5 x intermediate + 1.2 x heads x S)
    + 4 x 3 x vocab                       (logits, log-softmax and their gradient, in float32)

the last term replaced by a fixed 4 x 3 x vocab x chunk when the output head runs in chunks
(TrainerConfig.logprob_chunk_tokens). A call also needs about twice the weights' bytes beside
its activations (gradients, autograd's buffers). `MemoryBudget` turns that, with a safety
factor, into tokens per call from the memory free at the time of the call, and raises its
estimate whenever a call measured more than it predicted (peak resident memory on CPU, the
allocator's peak on GPU); it never lowers it, since memory a process keeps after freeing it
hides what a call needs.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SAFETY = 1.25  # over the estimate: the formula's constants are fitted, not derived
HEADROOM = 0.10  # of the machine's (or GPU's) memory, kept free: Ray's OOM killer acts at 95%
GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """What a model call's activation memory depends on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    param_bytes: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShape:
        config: Any = getattr(model, "config", None)
        hidden = int(getattr(config, "hidden_size", 0) or 0)
        return cls(
            layers=int(getattr(config, "num_hidden_layers", 0) or 0),
            hidden=hidden,
            intermediate=int(getattr(config, "intermediate_size", 0) or 4 * hidden),
            heads=int(getattr(config, "num_attention_heads", 0) or 1),
            vocab=int(getattr(config, "vocab_size", 0) or 0),
            param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        )


def bytes_per_token(shape: ModelShape, seq_len: int, act_bytes: int, head_chunk: int) -> float:
    """Activation bytes one padded token of a forward_backward call holds (see the module)."""
    per_layer = 12 * shape.hidden + 5 * shape.intermediate + 1.2 * shape.heads * seq_len
    head = 0 if head_chunk else 4 * 3 * shape.vocab
    return act_bytes * shape.layers * per_layer + head


class MemoryBudget:
    """Tokens per model call that the free memory holds, learnt upward from measured calls."""

    def __init__(
        self,
        shape: ModelShape,
        device: torch.device,
        act_bytes: int,
        head_chunk: int,
        limit_bytes: int | None = None,
    ):
        self.shape = shape
        self.device = device
        self.act_bytes = act_bytes
        self.head_chunk = head_chunk
        self.limit_bytes = limit_bytes  # the whole process's, when set (TrainerConfig)
        self.factor = SAFETY  # over the formula; raised when a call measures more

    def call_bytes(self, tokens: int, seq_len: int) -> float:
        """The memory a call of `tokens` padded tokens at padded length `seq_len` needs."""
        fixed = 2 * self.shape.param_bytes + 4 * 3 * self.shape.vocab * self.head_chunk
        per_token = bytes_per_token(self.shape, seq_len, self.act_bytes, self.head_chunk)
        return self.factor * (fixed + tokens * per_token)

    def tokens_per_call(self, seq_len: int) -> int:
        """The most padded tokens of length-`seq_len` rows one call may hold now (>= 1)."""
        fixed = self.call_bytes(0, seq_len)
        per_token = self.call_bytes(1, seq_len) - fixed
        return max(1, int((free_bytes(self.device, self.limit_bytes) - fixed) / per_token))

    def observe(self, tokens: int, seq_len: int, used_bytes: int) -> None:
        """A call of `tokens` at `seq_len` took `used_bytes` above what was resident before."""
        predicted = self.call_bytes(tokens, seq_len) / self.factor
        if predicted > 0 and used_bytes * SAFETY > self.factor * predicted:
            self.factor = used_bytes * SAFETY / predicted

    @contextlib.contextmanager
    def measure(self, tokens: int, seq_len: int) -> Iterator[None]:
        """Measures the call run inside and `observe`s it."""
        before = _reset_peak(self.device)
        yield
        self.observe(tokens, seq_len, max(0, _peak(self.device) - before))


def free_bytes(device: torch.device, limit_bytes: int | None = None) -> int:
    """Memory a call may take now: what the device has free less a headroom, and within the
    process's limit when one is set."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        allowed = free - int(HEADROOM * total)
        if limit_bytes is not None:
            allowed = min(allowed, limit_bytes - torch.cuda.memory_allocated(device))
        return max(0, allowed)
    # Memory this process freed but malloc kept is resident, yet a call can reuse it.
    info, reusable = _meminfo(), _malloc_free_bytes()
    allowed = info["MemAvailable"] - int(HEADROOM * info["MemTotal"]) + reusable
    cgroup = _cgroup_free()
    if cgroup is not None:
        allowed = min(allowed, cgroup + reusable)
    if limit_bytes is not None:
        allowed = min(allowed, limit_bytes - _status("VmRSS") + reusable)
    return max(0, allowed)


def _reset_peak(device: torch.device) -> int:
    """Resets the peak-memory mark; returns the memory in use now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with contextlib.suppress(OSError):  # the peak then stays the process's, which is more
        Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status("VmHWM")


def _status(key: str) -> int:
    """A memory figure of this process from /proc/self/status, bytes (0 where unreadable)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes; a generous fallback where it is unreadable."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = int(value.split()[0]) * 1024
    if "MemAvailable" not in out or "MemTotal" not in out:
        return {"MemAvailable": 8 * GIB, "MemTotal": 16 * GIB}
    return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _malloc_free_bytes() -> int:
    """Bytes malloc holds free for this process (glibc's mallinfo2; 0 elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return int(libc.mallinfo2().fordblks)
    return 0


def _cgroup_free() -> int | None:
    """Bytes left under this cgroup's (v2) memory limit, None without one."""
    root = Path("/sys/fs/cgroup")
    with contextlib.suppress(OSError, ValueError):
        limit = (root / "memory.max").read_text().strip()
        if limit != "max":
            used = int((root / "memory.current").read_text())
            return int(limit) - used - int(HEADROOM * int(limit))
    return None
