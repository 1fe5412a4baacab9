"""Tinker's wire formats <-> engineroom's records.

The messages are the `tinker` SDK's own: its generated protobuf module (`tinker_public_pb2`)
for `forward_backward` requests and for the two results that SDK >= 0.25 reads as protobuf
(`ForwardBackwardOutput`, `SampleResponse`), and its pydantic types for the JSON bodies.
Nothing here copies a schema; this module only maps fields.

Decoding is the trust boundary: a body that does not parse raises `WireError` (HTTP 400), and
a parsed request whose content is wrong (an image chunk, a tensor whose bytes do not fill its
shape) raises `InvalidRequestError`, which the server turns into a failed future with category
"user" (the request keeps its place in the model's order, so nothing after it stalls).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from tinker.proto import tinker_public_pb2 as pb
from tinker.types import ModelInput as TinkerModelInput
from tinker.types import SamplingParams as TinkerSamplingParams

from rl.errors import InvalidRequestError
from rl.types import (
    Datum,
    ForwardBackwardOutput,
    ModelInput,
    PromptSpan,
    SampledSpan,
    SampleResponse,
    SamplingParams,
    TensorData,
    provenance_error,
    target_length,
)


class WireError(ValueError):
    """The request body is not a well-formed message; answered with HTTP 400."""


# Proto dtypes and the numpy dtype of their bytes. Public wire values are int64/float32;
# int32 and bfloat16 are widened, as the SDK does on its side.
_PROTO_DTYPES: dict[int, tuple[np.dtype, str]] = {
    pb.DTYPE_FLOAT32: (np.dtype("<f4"), "float32"),
    pb.DTYPE_INT64: (np.dtype("<i8"), "int64"),
    pb.DTYPE_INT32: (np.dtype("<i4"), "int64"),
    pb.DTYPE_BFLOAT16: (np.dtype("<u2"), "float32"),
}


@dataclass
class ForwardBackwardCall:
    """A decoded `forward_backward` request."""

    model_id: str
    seq_id: int
    forward_only: bool
    loss_fn: str
    loss_fn_config: dict[str, float] | None
    data: list[Datum] | None  # None when the content is bad: `error` says why
    error: InvalidRequestError | None = None
    loss_id: str | None = None  # loss_fn "custom": the create_custom_loss id (a text config)


def decode_forward_backward(body: bytes) -> ForwardBackwardCall:
    """Parses a protobuf `ForwardBackwardRequest`. Raises WireError when it does not parse or
    lacks its addressing; bad content is kept in `.error` so the call keeps its seq_id."""
    message = pb.ForwardBackwardRequest()
    try:
        message.ParseFromString(body)
    except DecodeError as e:
        raise WireError(
            f"forward_backward body is not a ForwardBackwardRequest protobuf: {e}"
        ) from None
    if not message.model_id:
        raise WireError("forward_backward request has no model_id")
    if message.seq_id < 1:
        raise WireError(f"forward_backward request has seq_id {message.seq_id}; expected >= 1")
    call = ForwardBackwardCall(
        model_id=message.model_id,
        seq_id=message.seq_id,
        forward_only=message.forward_only,
        loss_fn=message.loss_fn,
        loss_fn_config=None,
        data=None,
    )
    try:
        call.loss_fn_config = _loss_config(message)
        call.loss_id = _loss_id(message)
        call.data = [_datum(i, d) for i, d in enumerate(message.data)]
    except InvalidRequestError as e:
        call.error = e
    return call


def _loss_config(message: Any) -> dict[str, float] | None:
    """`loss_fn_config_v2` when set (it may hold text values), else the legacy float map."""
    if message.loss_fn_config_v2:
        config: dict[str, float] = {}
        for key, value in message.loss_fn_config_v2.items():
            if value.WhichOneof("value") == "text":
                if key == "loss_id" and message.loss_fn == "custom":
                    continue  # read by _loss_id
                raise InvalidRequestError(
                    f"loss_fn_config[{key!r}] = {value.text!r}: this server's losses take "
                    "numbers only"
                )
            config[key] = value.number
        return config
    return dict(message.loss_fn_config) or None


def _loss_id(message: Any) -> str | None:
    """The text `loss_id` of a `custom` call (the SDK's `forward_backward_custom` with a
    server-side loss sends only that, in `loss_fn_config_v2`)."""
    if message.loss_fn != "custom" or "loss_id" not in message.loss_fn_config_v2:
        return None
    value = message.loss_fn_config_v2["loss_id"]
    return value.text if value.WhichOneof("value") == "text" else None


def _datum(index: int, message: Any) -> Datum:
    tokens: list[int] = []
    for chunk in message.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise InvalidRequestError(
                f"datum {index}: model_input has a {kind!r} chunk; this server takes text only"
            )
        raw = chunk.encoded_text.tokens
        if len(raw) % 4:
            raise InvalidRequestError(f"datum {index}: token bytes are not int32 values")
        tokens.extend(np.frombuffer(raw, dtype="<i4").tolist())
    inputs = {
        key: _tensor(f"datum {index}: loss_fn_inputs[{key!r}]", tensor)
        for key, tensor in message.loss_fn_inputs.items()
    }
    model_input_spans, loss_fn_input_spans = _spans(index, message)
    try:
        datum = Datum(model_input=ModelInput.from_ints(tokens), loss_fn_inputs=inputs)
    except ValueError as e:
        raise InvalidRequestError(f"datum {index}: {e}") from None
    if model_input_spans is None:
        return datum
    error = provenance_error(
        len(tokens), target_length(datum), model_input_spans, loss_fn_input_spans
    )
    if error is not None:
        raise InvalidRequestError(f"datum {index}: {error}")
    return datum.model_copy(
        update={"model_input_spans": model_input_spans, "loss_fn_input_spans": loss_fn_input_spans}
    )


def _spans(
    index: int, message: Any
) -> tuple[list[PromptSpan | SampledSpan] | None, list[PromptSpan | SampledSpan] | None]:
    """Fields 3 and 4 (`model_input_spans`, `loss_fn_input_spans`). A repeated field has no
    presence on the wire: both empty is a datum without provenance, one empty is an empty list
    (which then fails the tiling check)."""
    if not message.model_input_spans and not message.loss_fn_input_spans:
        return None, None
    return (
        [_span(index, "model_input_spans", j, s) for j, s in enumerate(message.model_input_spans)],
        [
            _span(index, "loss_fn_input_spans", j, s)
            for j, s in enumerate(message.loss_fn_input_spans)
        ],
    )


def _span(index: int, field: str, j: int, message: Any) -> PromptSpan | SampledSpan:
    kind = message.WhichOneof("span")
    if kind is None:
        raise InvalidRequestError(
            f"datum {index}: {field}[{j}] is neither a prompt nor a sampled span"
        )
    arm = getattr(message, kind)
    record = PromptSpan if kind == "prompt_tokens" else SampledSpan
    try:
        return record(sequence_id=arm.sequence_id, offset=arm.offset, length=arm.length)
    except ValueError:
        raise InvalidRequestError(
            f"datum {index}: {field}[{j}] has sequence_id {arm.sequence_id!r}, offset "
            f"{arm.offset}, length {arm.length}; it needs a sequence_id, offset >= 0 and "
            "length >= 0"
        ) from None


def _tensor(where: str, message: Any) -> TensorData:
    if message.dtype not in _PROTO_DTYPES:
        raise InvalidRequestError(f"{where}: unknown dtype {message.dtype}")
    np_dtype, _ = _PROTO_DTYPES[message.dtype]
    shape = [int(n) for n in message.shape]
    if any(n < 0 for n in shape):
        raise InvalidRequestError(f"{where}: negative shape {shape}")
    if message.WhichOneof("encoding") == "sparse_csr":
        values = _buffer(where, message.sparse_csr.values, np_dtype)
        crow = _buffer(where, message.sparse_csr.crow_indices, np.dtype("<i8"))
        cols = _buffer(where, message.sparse_csr.col_indices, np.dtype("<i8"))
        array = _densify(where, shape, values, crow, cols)
    else:
        array = _buffer(where, message.dense, np_dtype)
        if shape and math.prod(shape) != array.size:
            raise InvalidRequestError(f"{where}: {array.size} values do not fill shape {shape}")
    array = _widen(array, message.dtype)
    return TensorData.from_numpy(array.reshape(shape) if shape else array)


def _buffer(where: str, raw: bytes, dtype: np.dtype) -> np.ndarray:
    if len(raw) % dtype.itemsize:
        raise InvalidRequestError(f"{where}: {len(raw)} bytes are not {dtype.name} values")
    return np.frombuffer(raw, dtype=dtype)


def _widen(array: np.ndarray, proto_dtype: int) -> np.ndarray:
    if proto_dtype == pb.DTYPE_BFLOAT16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    if proto_dtype == pb.DTYPE_INT32:
        return array.astype(np.int64)
    return array


def _densify(
    where: str, shape: list[int], values: np.ndarray, crow: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """A CSR tensor as a dense 2-D array; absent cells are 0 (the SDK's default pad)."""
    if len(shape) != 2 or len(crow) != shape[0] + 1 or len(cols) != len(values):
        raise InvalidRequestError(f"{where}: malformed sparse CSR tensor of shape {shape}")
    if len(crow) and (crow[0] != 0 or crow[-1] != len(values) or np.any(np.diff(crow) < 0)):
        raise InvalidRequestError(f"{where}: sparse row pointers are not monotone from 0")
    if len(cols) and (cols.min() < 0 or cols.max() >= shape[1]):
        raise InvalidRequestError(f"{where}: sparse column index out of range")
    dense = np.zeros(shape, dtype=values.dtype)
    rows = np.repeat(np.arange(shape[0]), np.diff(crow))
    dense[rows, cols] = values
    return dense


# -- results -------------------------------------------------------------------------------


def encode_forward_backward_output(output: ForwardBackwardOutput) -> bytes:
    """One `ArrayRecord` per run of consecutive datums whose outputs share trailing shapes
    (`[N]` targets and `[N, K]` targets differ), each field as one batched tensor."""
    message = pb.ForwardBackwardOutput(loss_fn_output_type=output.loss_fn_output_type)
    for key, value in output.metrics.items():
        message.metrics[key] = float(value)
    arrays = [{k: v.to_numpy() for k, v in out.items()} for out in output.loss_fn_outputs]
    start = 0
    while start < len(arrays):
        signature = _signature(arrays[start])
        end = start + 1
        while end < len(arrays) and _signature(arrays[end]) == signature:
            end += 1
        record = message.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=end - start)
        for key, (dtype, trailing) in signature:
            chunks = [arrays[i][key].astype(dtype).reshape(-1) for i in range(start, end)]
            sizes = np.cumsum([0] + [c.nbytes for c in chunks], dtype=np.int64)
            field = record.fields[key]
            field.data = b"".join(c.tobytes() for c in chunks)
            field.offsets = sizes.tobytes()
            field.dtype = pb.DTYPE_FLOAT32 if dtype == "<f4" else pb.DTYPE_INT64
            field.trailing_shape.extend(trailing)
        start = end
    return message.SerializeToString()


def _signature(
    arrays: dict[str, np.ndarray],
) -> tuple[tuple[str, tuple[str, tuple[int, ...]]], ...]:
    return tuple(
        (key, ("<f4" if a.dtype.kind == "f" else "<i8", tuple(a.shape[1:])))
        for key, a in sorted(arrays.items())
    )


def encode_sample_response(response: SampleResponse) -> bytes:
    message = pb.SampleResponse()
    for sequence in response.sequences:
        out = message.sequences.add(
            stop_reason=pb.STOP_REASON_STOP
            if sequence.stop_reason == "stop"
            else pb.STOP_REASON_LENGTH,
            tokens=np.asarray(sequence.tokens, dtype="<i4").tobytes(),
        )
        if sequence.logprobs is not None:
            out.logprobs = np.asarray(sequence.logprobs, dtype="<f4").tobytes()
        if sequence.topk_logprobs is not None:
            _encode_topk(out.topk_sampled_logprobs, sequence.topk_logprobs)
    if response.prompt_logprobs is not None:
        values = [math.nan if lp is None else lp for lp in response.prompt_logprobs]
        message.prompt_logprobs = np.asarray(values, dtype="<f4").tobytes()
    if response.topk_prompt_logprobs is not None:
        _encode_topk(message.topk_prompt_logprobs, response.topk_prompt_logprobs)
    if response.target_prompt_logprobs is not None:
        _encode_tensor(message.target_prompt_logprobs, response.target_prompt_logprobs)
    if response.prompt_alt_tokens is not None:
        alt = response.prompt_alt_tokens
        k = len(alt.tokens[0]) if alt.tokens else 0
        _encode_tensor(
            message.prompt_alt_tokens.tokens,
            TensorData(data=[t for row in alt.tokens for t in row], dtype="int64",
                       shape=[len(alt.tokens), k]),
        )  # fmt: skip
        _encode_tensor(
            message.prompt_alt_tokens.logprobs,
            TensorData(data=[v for row in alt.logprobs for v in row], dtype="float32",
                       shape=[len(alt.logprobs), k]),
        )  # fmt: skip
    return message.SerializeToString()


def _encode_tensor(message: Any, tensor: TensorData) -> None:
    """A public `Tensor`: dense bytes, or sparse CSR with int64 indices (the SDK's codec)."""
    dtype = "<i8" if tensor.dtype == "int64" else "<f4"
    message.dtype = pb.DTYPE_INT64 if tensor.dtype == "int64" else pb.DTYPE_FLOAT32
    message.shape.extend(tensor.shape or [len(tensor.data)])
    values = np.asarray(tensor.data, dtype=dtype).tobytes()
    if tensor.is_sparse:
        message.sparse_csr.values = values
        message.sparse_csr.crow_indices = np.asarray(tensor.sparse_crow_indices, "<i8").tobytes()
        message.sparse_csr.col_indices = np.asarray(tensor.sparse_col_indices, "<i8").tobytes()
    else:
        message.dense = values


def _encode_topk(message: Any, rows: list[list[tuple[int, float]] | None]) -> None:
    """[L, k] token ids and logprobs; empty cells (and position 0) are (0, -99999.0)."""
    k = max((len(row) for row in rows if row), default=0)
    ids = np.zeros((len(rows), k), dtype="<i4")
    logprobs = np.full((len(rows), k), -99999.0, dtype="<f4")
    for i, row in enumerate(rows):
        for j, (token, logprob) in enumerate(row or []):
            ids[i, j], logprobs[i, j] = token, logprob
    message.token_ids = ids.tobytes()
    message.logprobs = logprobs.tobytes()
    message.k = k
    message.length = len(rows)


# -- JSON bodies ---------------------------------------------------------------------------


def model_input(value: TinkerModelInput) -> ModelInput:
    """A Tinker `ModelInput` (already validated by its pydantic type) as ours: text only."""
    tokens: list[int] = []
    for chunk in value.chunks:
        if getattr(chunk, "type", None) != "encoded_text":
            raise InvalidRequestError(
                f"prompt has a {getattr(chunk, 'type', '?')!r} chunk; this server takes text only"
            )
        tokens.extend(int(t) for t in chunk.tokens)  # type: ignore[union-attr]
    return ModelInput.from_ints(tokens)


def tensor_data(value: Any) -> TensorData:
    """A Tinker `TensorData` JSON body (dense or sparse CSR) as ours."""
    try:
        return TensorData(
            data=list(value.data),
            dtype=value.dtype,
            shape=list(value.shape) if value.shape is not None else None,
            sparse_crow_indices=value.sparse_crow_indices,
            sparse_col_indices=value.sparse_col_indices,
        )
    except ValueError as e:
        raise InvalidRequestError(f"target_prompt_logprobs: {e}") from None


def sampling_params(value: TinkerSamplingParams) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=value.max_tokens,
            seed=value.seed,
            stop=list(value.stop) if isinstance(value.stop, (list, tuple)) else value.stop,  # type: ignore[arg-type]
            temperature=value.temperature,
            top_k=value.top_k,
            top_p=value.top_p,
        )
    except ValueError as e:
        raise InvalidRequestError(f"sampling_params: {e}") from None


__all__ = [
    "ForwardBackwardCall",
    "WireError",
    "decode_forward_backward",
    "encode_forward_backward_output",
    "encode_sample_response",
    "model_input",
    "sampling_params",
    "tensor_data",
]
