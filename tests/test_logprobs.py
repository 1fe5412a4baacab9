"""Chunked target logprobs (trainers/logprobs.py) equal the plain computation, values and
gradients; activation checkpointing gives the trainer's gradients unchanged; a bfloat16 base
keeps float32 adapters and optimizer state."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rl.types import AdamParams, Datum, LoraConfig, ModelInput
from trainers.config import TrainerConfig
from trainers.logprobs import target_logprobs
from trainers.trainer import LoraTrainer

VOCAB = 300


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random 2-layer Llama (no tokenizer: the trainer needs none)."""
    path = tmp_path_factory.mktemp("small") / "model"
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def _plain(head: torch.nn.Module, hidden, targets, softcap=None):
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, dim=-1).gather(-1, targets)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunks_equal_the_plain_computation_values_and_grads(softcap):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False)
    hidden = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 40, (50, 3))
    upstream = torch.randn(50, 3)  # a loss that weighs every logprob differently

    grads = []
    for chunk in (0, 7):
        hidden.grad, head.weight.grad = None, None
        logprobs = target_logprobs(head, hidden, targets, softcap, chunk_tokens=chunk)
        (logprobs * upstream).sum().backward()
        grads.append((logprobs.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    expected = _plain(head, hidden, targets, softcap).detach()
    assert grads[0][0].dtype == torch.float32 and grads[0][0].shape == (50, 3)
    torch.testing.assert_close(grads[0][0], expected)
    for plain, chunked in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the forward-only path (no checkpointing) too
        torch.testing.assert_close(target_logprobs(head, hidden, targets, softcap, 7), expected)


def _datums() -> list[Datum]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for length in (9, 23, 14):
        tokens = torch.randint(0, VOCAB, (length + 1,), generator=generator).tolist()
        out.append(
            Datum(
                model_input=ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length},
            )
        )
    return out


def _step(model: str, tmp_path, **config) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(logprobs, adapter gradients) of one forward_backward on a fresh adapter that had
    one optimizer step (so LoRA B is not zero and every adapter matrix gets a gradient)."""
    trainer = LoraTrainer(
        model, TrainerConfig(dtype="float32", checkpoint_dir=str(tmp_path), **config)
    )
    trainer.create_adapter("m", LoraConfig(rank=4, seed=3))
    trainer.forward_backward("m", _datums(), "cross_entropy")
    trainer.optim_step("m", AdamParams(learning_rate=1e-2))
    calls: list[int] = []
    first_layer = trainer._base.model.layers[0]
    first_layer.register_forward_pre_hook(lambda *_: calls.append(1))
    out = trainer.forward_backward("m", _datums(), "cross_entropy")
    # One bucket (3 datums): the layer runs once, and once more when checkpointed (the
    # recomputation in the backward pass), so the setting is not inert.
    assert len(calls) == (2 if config.get("gradient_checkpointing") else 1)
    logprobs = [o["logprobs"].to_torch() for o in out.loss_fn_outputs]
    grads = [p.grad.clone() for p in trainer._adapters["m"].params]
    return logprobs, grads


@pytest.mark.parametrize(
    "setting", [{"logprob_chunk_tokens": 5}, {"gradient_checkpointing": True}], ids=str
)
def test_trainer_gives_the_same_logprobs_and_grads(small_model, tmp_path, setting):
    plain_logprobs, plain_grads = _step(small_model, tmp_path, logprob_chunk_tokens=0)
    logprobs, grads = _step(small_model, tmp_path, **setting)
    assert len(grads) == len(plain_grads) > 0
    assert all(g.abs().sum() > 0 for g in plain_grads)  # every adapter matrix takes part
    for got, want in zip(logprobs, plain_logprobs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_bfloat16_base_keeps_float32_adapters_and_optimizer_state(small_model, tmp_path):
    trainer = LoraTrainer(
        small_model, TrainerConfig(dtype="bfloat16", checkpoint_dir=str(tmp_path))
    )
    for seed, model_id in enumerate(("a", "b")):  # the second adapter is added, not created
        trainer.create_adapter(model_id, LoraConfig(rank=4, seed=seed))
        trainer.forward_backward(model_id, _datums(), "cross_entropy")
        trainer.optim_step(model_id, AdamParams(learning_rate=1e-3))
    base = {p.dtype for n, p in trainer._base.named_parameters() if "lora_" not in n}
    assert base == {torch.bfloat16}
    for adapter in trainer._adapters.values():
        assert {p.dtype for p in adapter.params} == {torch.float32}
        states = adapter.optimizer.state.values()
        assert {s["exp_avg"].dtype for s in states} == {torch.float32}
