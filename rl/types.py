"""The records that cross the client / engine boundary, named as in Tinker.

Every record is a pydantic model, so it pickles (Ray) and serialises to JSON (a later HTTP
server) without custom code. Tensors travel as `TensorData`: a flat list plus dtype and shape,
int64 or float32 only, as on Tinker's public wire.

Departures from Tinker: only text chunks exist in `ModelInput` (no image or audio chunks), and
`SamplingParams.logprobs_mode` is ours (see samplers/).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    import torch

DType = Literal["int64", "float32"]

# For raw Python lists the dtype comes from the key, as in Tinker.
INT_KEYS = frozenset({"target_tokens"})


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=False)


# ---------------------------------------------------------------------------------------------
# Model input


class EncodedTextChunk(_Record):
    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


class ModelInput(_Record):
    """A token sequence, as a list of chunks (text only here)."""

    chunks: list[EncodedTextChunk] = Field(default_factory=list)

    @classmethod
    def from_ints(cls, tokens: Sequence[int]) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=[int(t) for t in tokens])])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        return [t for chunk in self.chunks for t in chunk.tokens]

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: EncodedTextChunk) -> ModelInput:
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        return self.append(EncodedTextChunk(tokens=[int(token)]))


# ---------------------------------------------------------------------------------------------
# Tensors


class TensorData(_Record):
    """A tensor: flat row-major `data`, its `dtype` and `shape`; or, with the two sparse
    fields, a 2-D sparse CSR one (`data` holds the listed cells' values; the others read as
    the pad value of `to_numpy`, 0 by default)."""

    data: list[int] | list[float]
    dtype: DType
    shape: list[int] | None = None
    sparse_crow_indices: list[int] | None = None
    sparse_col_indices: list[int] | None = None

    @model_validator(mode="after")
    def _check_shape(self) -> TensorData:
        if self.sparse_crow_indices is None and self.sparse_col_indices is None:
            if self.shape is not None and math.prod(self.shape) != len(self.data):
                raise ValueError(
                    f"TensorData shape {self.shape} does not hold {len(self.data)} values"
                )
            return self
        crow, col = self.sparse_crow_indices or [], self.sparse_col_indices or []
        if self.shape is None or len(self.shape) != 2:
            raise ValueError(f"a sparse CSR TensorData needs a 2-D shape, got {self.shape}")
        rows, cols = self.shape
        if (
            len(crow) != rows + 1
            or crow[0] != 0
            or crow[-1] != len(self.data)
            or len(col) != len(self.data)
            or any(b < a for a, b in itertools.pairwise(crow))
            or any(not 0 <= c < cols for c in col)
        ):
            raise ValueError(
                f"sparse CSR TensorData of shape {self.shape}: crow_indices must run from 0 "
                f"to len(data)={len(self.data)} over {rows + 1} entries, and col_indices hold "
                f"one column in [0, {cols}) per value"
            )
        return self

    @property
    def is_sparse(self) -> bool:
        return self.sparse_crow_indices is not None

    def cells(self) -> list[tuple[int, int]]:
        """The (row, column) of each value of a sparse tensor, in `data` order."""
        crow, col = self.sparse_crow_indices or [], self.sparse_col_indices or []
        return [(r, col[i]) for r in range(len(crow) - 1) for i in range(crow[r], crow[r + 1])]

    def with_values_of(self, dense: np.ndarray) -> TensorData:
        """This tensor's layout (sparse or dense) holding the values of `dense` (same shape)."""
        if not self.is_sparse:
            return TensorData.from_numpy(dense)
        values = [dense[r, c].item() for r, c in self.cells()]
        dtype: DType = "int64" if np.issubdtype(dense.dtype, np.integer) else "float32"
        return self.model_copy(update={"data": values, "dtype": dtype})

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        dtype: DType = "int64" if np.issubdtype(array.dtype, np.integer) else "float32"
        if array.dtype == np.bool_:
            dtype = "int64"
        flat = array.astype(np.int64 if dtype == "int64" else np.float32).reshape(-1)
        return cls(data=flat.tolist(), dtype=dtype, shape=list(array.shape))

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> TensorData:
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()  # bf16 / fp16 are widened, as in Tinker
        return cls.from_numpy(tensor.numpy())

    def to_numpy(self, pad: float = 0) -> np.ndarray:
        """The dense array; a sparse tensor's unlisted cells hold `pad`."""
        dtype = np.int64 if self.dtype == "int64" else np.float32
        array = np.asarray(self.data, dtype=dtype)
        if self.is_sparse:
            assert self.shape is not None
            dense = np.full(self.shape, pad, dtype=dtype)
            for (r, c), value in zip(self.cells(), array, strict=True):
                dense[r, c] = value
            return dense
        return array.reshape(self.shape) if self.shape is not None else array

    def to_torch(self) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.to_numpy())

    def tolist(self) -> list[Any]:
        return self.to_numpy().tolist()


def to_tensor_data(value: Any, key: str = "") -> TensorData:
    """Converts a list, numpy array, torch tensor or TensorData into TensorData."""
    if isinstance(value, TensorData):
        return value
    if isinstance(value, dict):
        return TensorData.model_validate(value)
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if type(value).__module__.startswith("torch"):
        return TensorData.from_torch(value)
    if isinstance(value, (list, tuple)):
        dtype = np.int64 if key in INT_KEYS else np.float32
        try:
            array = np.asarray(value, dtype=dtype)
        except (TypeError, ValueError) as e:
            raise ValueError(f"loss_fn_inputs[{key!r}] is not a numeric array: {e}") from None
        if key in INT_KEYS and not all(_is_integral(v) for v in np.asarray(value).reshape(-1)):
            raise ValueError(f"loss_fn_inputs[{key!r}] must hold integers")
        return TensorData.from_numpy(array)
    raise TypeError(f"loss_fn_inputs[{key!r}]: cannot convert {type(value).__name__} to TensorData")


def _is_integral(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) or (
        isinstance(value, (float, np.floating)) and float(value).is_integer()
    )


# ---------------------------------------------------------------------------------------------
# Training records


class PromptSpan(_Record):
    """A run of datum positions that are positions [offset, offset + length) of the prompt of
    the sampling request that produced `sequence_id` (Tinker's `PromptProvenanceSpan`)."""

    sequence_id: str = Field(min_length=1)
    offset: int = Field(default=0, ge=0)
    length: int = Field(ge=0)
    kind: Literal["prompt"] = "prompt"


class SampledSpan(_Record):
    """A run of datum positions that are positions [offset, offset + length) of the sampled
    tokens of `sequence_id` (Tinker's `SampledProvenanceSpan`)."""

    sequence_id: str = Field(min_length=1)
    offset: int = Field(default=0, ge=0)
    length: int = Field(ge=0)
    kind: Literal["sampled"] = "sampled"


ProvenanceSpan = Annotated[PromptSpan | SampledSpan, Field(discriminator="kind")]


def provenance_error(
    model_input_length: int,
    target_length: int | None,
    model_input_spans: Sequence[PromptSpan | SampledSpan] | None,
    loss_fn_input_spans: Sequence[PromptSpan | SampledSpan] | None,
) -> str | None:
    """What is wrong with a datum's provenance spans, or None: they come as a pair, and each
    list tiles its field (lengths sum to `model_input`'s length / `target_tokens`' length;
    `target_length` None skips the second check, as for [N, K] targets)."""
    if (model_input_spans is None) != (loss_fn_input_spans is None):
        return (
            "provenance spans come as a pair: set both model_input_spans and "
            "loss_fn_input_spans, or neither"
        )
    for name, spans, expected in (
        ("model_input_spans", model_input_spans, model_input_length),
        ("loss_fn_input_spans", loss_fn_input_spans, target_length),
    ):
        if spans is None or expected is None:
            continue
        total = sum(span.length for span in spans)
        if total != expected:
            field = "model_input" if name == "model_input_spans" else "target_tokens"
            return (
                f"{name} cover {total} positions but {field} has {expected}; the spans must "
                "tile it exactly"
            )
    return None


class Datum(_Record):
    """One training example: the input tokens and the per-token inputs of the loss.

    Position i of `model_input` predicts `loss_fn_inputs["target_tokens"][i]`; every entry of
    `loss_fn_inputs` has length `model_input.length` (or shape `[N, K]` for top-K targets).

    `model_input_spans` / `loss_fn_input_spans` (both or neither) say which sampled sequence
    each position came from (Tinker's provenance, `Datum.with_provenance`): consecutive runs
    tiling `model_input` and `target_tokens`. The server resolves them against its record of
    sampled sequences (rl/server/provenance.py) and strips them; the trainer never reads them.
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)
    model_input_spans: list[ProvenanceSpan] | None = None
    loss_fn_input_spans: list[ProvenanceSpan] | None = None

    @field_validator("loss_fn_inputs", mode="before")
    @classmethod
    def _convert_inputs(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {str(k): to_tensor_data(v, str(k)) for k, v in value.items()}

    @model_validator(mode="after")
    def _check_spans(self) -> Datum:
        if self.model_input_spans is None and self.loss_fn_input_spans is None:
            return self
        error = provenance_error(
            self.model_input.length,
            target_length(self),
            self.model_input_spans,
            self.loss_fn_input_spans,
        )
        if error is not None:
            raise ValueError(error)
        return self


def target_length(datum: Datum) -> int | None:
    """The length of a datum's 1-D `target_tokens`; None when absent or [N, K]."""
    targets = datum.loss_fn_inputs.get("target_tokens")
    if targets is None:
        return None
    if targets.shape is None:
        return len(targets.data)
    return targets.shape[0] if len(targets.shape) == 1 else None


class AdamParams(_Record):
    """AdamW hyperparameters for one `optim_step` (decoupled weight decay, as torch.optim.AdamW)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0  # 0 = no clipping; the norm is reported either way

    @model_validator(mode="after")
    def _check(self) -> AdamParams:
        checks = {
            "learning_rate": self.learning_rate >= 0,
            "beta1": 0 <= self.beta1 < 1,
            "beta2": 0 <= self.beta2 < 1,
            "eps": self.eps >= 0,
            "weight_decay": self.weight_decay >= 0,
            "grad_clip_norm": self.grad_clip_norm >= 0,
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if not ok or not math.isfinite(value):
                raise ValueError(f"AdamParams.{name}={value} is out of range")
        return self


class ForwardBackwardOutput(_Record):
    """Per-datum outputs (`logprobs` of the target tokens) and `name:reduction` metrics."""

    loss_fn_output_type: str = "ArrayRecord"
    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float]


class OptimStepResponse(_Record):
    metrics: dict[str, float] | None = None


class LoraConfig(_Record):
    rank: int = 32
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True

    @model_validator(mode="after")
    def _check(self) -> LoraConfig:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not (self.train_unembed or self.train_mlp or self.train_attn):
            raise ValueError("at least one of train_mlp, train_attn, train_unembed must be True")
        return self


class ModelData(_Record):
    arch: str
    model_name: str
    tokenizer_id: str
    vocab_size: int
    max_context_length: int


class GetInfoResponse(_Record):
    model_id: str
    model_data: ModelData
    is_lora: bool = True
    lora_rank: int
    model_name: str
    lora_config: LoraConfig
    type: Literal["get_info"] = "get_info"


class SaveWeightsResponse(_Record):
    path: str
    type: Literal["save_weights"] = "save_weights"


class SaveWeightsForSamplerResponse(_Record):
    path: str
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"


class LoadWeightsResponse(_Record):
    path: str
    type: Literal["load_weights"] = "load_weights"


# ---------------------------------------------------------------------------------------------
# Sampling records


class SamplingParams(_Record):
    """How to sample. `stop`: strings or token ids; None keeps EOS stopping, [] disables it."""

    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    # "model": logprobs of the model's own distribution (temperature not applied), as Tinker.
    # "sampled": logprobs of the distribution actually sampled from (temperature applied).
    logprobs_mode: Literal["model", "sampled"] = "model"


class SampledSequence(_Record):
    stop_reason: Literal["stop", "length"]
    tokens: list[int]
    logprobs: list[float] | None = None
    topk_logprobs: list[list[tuple[int, float]] | None] | None = None
    """With `topk_sample_logprobs=k`: per sampled token, the k most likely (token_id, logprob)
    pairs at that position, best first, in the same mode as `logprobs`."""


class PromptAltTokens(_Record):
    """`prompt_alt_tokens_k` draws at every prompt position after the first: row i holds k
    tokens drawn (with replacement, at the request's temperature, top-k and top-p) from the
    distribution over prompt token i + 1, and their logprobs in the mode of `logprobs`."""

    tokens: list[list[int]]
    logprobs: list[list[float]]


class SampleResponse(_Record):
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    """Logprob of each prompt token given those before it; None where not scored (position 0,
    and positions before `prompt_logprobs_last_n`)."""
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    """Per prompt position: (token_id, logprob) pairs, best first; None where not scored."""
    target_prompt_logprobs: TensorData | None = None
    """Float32 [len(prompt) - 1, K]: the logprob of each id the request's
    `target_prompt_logprobs` named (row i at prompt position i + 1); 0.0 where it had -1."""
    prompt_alt_tokens: PromptAltTokens | None = None
    type: Literal["sample"] = "sample"
