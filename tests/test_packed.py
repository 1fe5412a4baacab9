"""rl.packed: an adapter's tensors in one flat buffer for the object store."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from rl.packed import PackedTensors


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "layer.0.lora_A.weight": torch.randn(4, 6, generator=generator),
        "layer.0.lora_B.weight": torch.randn(6, 4, generator=generator).to(torch.bfloat16),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "strided": torch.randn(5, 7, generator=generator).t(),
    }


def test_packing_keeps_names_order_shapes_and_values_in_float32():
    original = tensors()
    packed = PackedTensors.pack(original)
    assert list(packed) == list(original) and len(packed) == 5
    assert packed.flat.dtype == np.float32 and packed.flat.size == 24 + 24 + 1 + 0 + 35
    for name, tensor in original.items():
        assert packed[name].dtype == torch.float32 and packed[name].shape == tensor.shape
        torch.testing.assert_close(packed[name], tensor.to(torch.float32), rtol=0, atol=0)


def test_a_pickled_pack_carries_the_buffer_and_unpacks_private_writable_copies():
    packed = PackedTensors.pack(tensors())
    packed["scalar"]  # unpacked once here: the unpacked copy must not travel
    copy = pickle.loads(pickle.dumps(packed, protocol=5))
    assert copy._tensors is None and copy.names == packed.names
    weight = copy["layer.0.lora_A.weight"]
    weight.add_(1.0)  # a reader may write to what it got ...
    assert not np.shares_memory(weight.numpy(), copy.flat)  # ... without touching the buffer
    torch.testing.assert_close(
        PackedTensors(copy.names, copy.shapes, copy.flat)["layer.0.lora_A.weight"] + 1.0, weight
    )


def test_names_shapes_and_values_that_disagree_are_refused():
    with pytest.raises(ValueError, match="2 names, 1 shapes"):
        PackedTensors(["a", "b"], [(2,)], np.zeros(2, dtype=np.float32))
    with pytest.raises(ValueError, match="3 values for 4 elements"):
        PackedTensors(["a"], [(2, 2)], np.zeros(3, dtype=np.float32))
