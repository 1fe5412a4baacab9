"""The API records: conversions, validation, and clean serialisation (JSON and pickle)."""

import pickle

import numpy as np
import pytest
import torch

from rl import types


def test_model_input_roundtrip_and_chunks():
    mi = (
        types.ModelInput.from_ints([5, 6, 7])
        .append(types.EncodedTextChunk(tokens=[8]))
        .append_int(9)
    )
    assert mi.to_ints() == [5, 6, 7, 8, 9]
    assert mi.length == 5 and len(mi.chunks) == 3
    assert types.ModelInput.empty().length == 0


def test_tensor_data_conversions_keep_dtype_and_shape():
    ints = types.TensorData.from_numpy(np.arange(6, dtype=np.int32).reshape(2, 3))
    assert ints.dtype == "int64" and ints.shape == [2, 3]
    assert ints.to_torch().dtype == torch.int64 and ints.to_torch().shape == (2, 3)
    floats = types.TensorData.from_torch(torch.tensor([0.5, 1.5], dtype=torch.bfloat16))
    assert floats.dtype == "float32" and floats.to_numpy().dtype == np.float32
    assert floats.tolist() == [0.5, 1.5]
    with pytest.raises(ValueError, match="does not hold"):
        types.TensorData(data=[1, 2, 3], dtype="int64", shape=[2, 2])


def test_datum_accepts_lists_arrays_and_tensors():
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": [2, 3, 4],
            "weights": np.array([1.0, 0.0, 1.0]),
            "advantages": torch.tensor([0.5, 0.5, 0.5]),
        },
    )
    assert datum.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert datum.loss_fn_inputs["weights"].dtype == "float32"
    assert datum.loss_fn_inputs["advantages"].to_numpy().tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="target_tokens"):
        types.Datum(
            model_input=types.ModelInput.from_ints([1]), loss_fn_inputs={"target_tokens": [1.5]}
        )


def test_records_serialise_to_json_and_pickle():
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2]),
        loss_fn_inputs={"target_tokens": [2, 3], "weights": [1.0, 0.5]},
    )
    records = [
        datum,
        types.AdamParams(learning_rate=3e-4, grad_clip_norm=1.0),
        types.ForwardBackwardOutput(
            loss_fn_outputs=[{"logprobs": types.TensorData.from_numpy(np.array([-1.0, -2.0]))}],
            metrics={"loss:sum": 3.0},
        ),
        types.SamplingParams(max_tokens=8, stop=["\n"], seed=3),
        types.SampleResponse(
            sequences=[types.SampledSequence(stop_reason="stop", tokens=[1], logprobs=[-0.1])],
            prompt_logprobs=[None, -1.0],
        ),
        types.LoraConfig(rank=8, train_unembed=False),
    ]
    for record in records:
        assert type(record).model_validate_json(record.model_dump_json()) == record
        assert pickle.loads(pickle.dumps(record)) == record


def test_invalid_records_are_rejected():
    with pytest.raises(ValueError, match="learning_rate"):
        types.AdamParams(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="beta2"):
        types.AdamParams(beta2=1.0)
    with pytest.raises(ValueError, match="at least one"):
        types.LoraConfig(train_mlp=False, train_attn=False, train_unembed=False)
    with pytest.raises(ValueError, match="rank"):
        types.LoraConfig(rank=0)


def test_public_api_signatures_are_pinned():
    """The Tinker-shaped surface users code against; changing it breaks their loops."""
    import inspect

    import rl

    def params(fn):
        return list(inspect.signature(fn).parameters)

    assert params(rl.ServiceClient.create_lora_training_client) == [
        "self", "base_model", "rank", "seed", "train_mlp", "train_attn", "train_unembed",
        "user_metadata", "model_id",
    ]  # fmt: skip
    # model_id (the HTTP server passes Tinker's) is keyword-only: positional calls are as Tinker's.
    kind = inspect.signature(rl.ServiceClient.create_lora_training_client).parameters["model_id"]
    assert kind.kind is inspect.Parameter.KEYWORD_ONLY
    assert params(rl.TrainingClient.forward_backward) == [
        "self",
        "data",
        "loss_fn",
        "loss_fn_config",
    ]
    assert params(rl.TrainingClient.forward) == ["self", "data", "loss_fn", "loss_fn_config"]
    assert params(rl.TrainingClient.forward_backward_custom) == ["self", "data", "loss_fn"]
    assert params(rl.TrainingClient.optim_step) == ["self", "adam_params"]
    assert params(rl.TrainingClient.save_state) == ["self", "name", "overwrite"]
    assert params(rl.ServiceClient.create_training_client_from_state) == [
        "self",
        "path",
        "base_model",
        "model_id",
    ]
    assert list(types.AdamParams.model_fields) == [
        "learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm",
    ]  # fmt: skip
    assert types.AdamParams() == types.AdamParams(
        learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.0, grad_clip_norm=0.0
    )
    for name in ("forward_async", "forward_backward_async", "optim_step_async", "save_state_async"):
        assert inspect.iscoroutinefunction(getattr(rl.TrainingClient, name))


def test_the_public_client_methods_are_typed():
    """No `Any` in the signature of a public method of the three clients: mypy checks what
    users call (a Ray actor handle is `ActorHandle`; Tinker arguments we ignore are `object`)."""
    import inspect
    import typing

    import transformers

    import rl

    tokenizer_type = {"PreTrainedTokenizerBase": transformers.PreTrainedTokenizerBase}

    def mentions_any(hint: object) -> bool:
        return hint is typing.Any or any(mentions_any(a) for a in typing.get_args(hint))

    for cls in (rl.ServiceClient, rl.TrainingClient, rl.SamplingClient):
        for name in dir(cls):
            member = getattr(cls, name)
            if name.startswith("_") or not callable(member):
                continue
            # The tokenizer type is imported for type checking only (transformers is slow to
            # import and the driver needs it only on first use).
            hints = typing.get_type_hints(member, localns=tokenizer_type)
            untyped = [k for k, v in hints.items() if mentions_any(v)]
            assert not untyped, f"{cls.__name__}.{name}: {untyped} typed Any"
            params = [p for p in inspect.signature(member).parameters if p != "self"]
            assert set(params) <= set(hints), f"{cls.__name__}.{name} has unannotated parameters"


def test_sparse_tensor_data_reads_dense_and_keeps_its_layout():
    import numpy as np

    from rl.types import TensorData

    sparse = TensorData(
        data=[7, 11, 3], dtype="int64", shape=[3, 2],
        sparse_crow_indices=[0, 0, 2, 3], sparse_col_indices=[0, 1, 1],
    )  # fmt: skip
    assert sparse.cells() == [(1, 0), (1, 1), (2, 1)]
    assert sparse.to_numpy(pad=-1).tolist() == [[-1, -1], [7, 11], [-1, 3]]
    assert sparse.to_numpy().tolist() == [[0, 0], [7, 11], [0, 3]]
    values = np.arange(6, dtype=np.float32).reshape(3, 2)
    answer = sparse.with_values_of(values)
    assert answer.dtype == "float32" and answer.data == [2.0, 3.0, 5.0]
    assert answer.sparse_col_indices == [0, 1, 1]
    for crow, col in (([0, 1, 2], [0, 1]), ([0, 2, 1, 3], [0, 1, 1]), ([0, 0, 2, 3], [0, 2, 1])):
        with pytest.raises(ValueError, match="crow_indices"):
            TensorData(data=[1, 2, 3][: len(col)], dtype="int64", shape=[3, 2],
                       sparse_crow_indices=crow, sparse_col_indices=col)  # fmt: skip
