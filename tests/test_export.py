"""Export and import (rl.client.export): checkpoints out to stock peft and transformers with the
trainer's logprobs, PEFT adapters trained elsewhere in with their losses, and clear refusals.

Logprobs are compared token by token in float32 on the tiny random model, after a few optimizer
steps (the adapter then moves the logprobs by far more than the tolerance)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rl import types
from rl.checkpoint_format import read_checkpoint
from rl.client.export import cli, export_merged, export_peft, import_peft, resolve_source
from rl.errors import CheckpointError, InvalidRequestError
from trainers import LoraTrainer, TrainerConfig

LR = types.AdamParams(learning_rate=2e-2)
TOLERANCE = 1e-4  # nats; float32 on one machine gives 0 to 2e-6


def datum(rng: random.Random, length: int) -> types.Datum:
    tokens = [rng.randrange(2000) for _ in range(length + 1)]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length},
    )


def batch(seed: int, lengths=(7, 12)) -> list[types.Datum]:
    rng = random.Random(seed)
    return [datum(rng, n) for n in lengths]


def hf_logprobs(model: torch.nn.Module, d: types.Datum) -> torch.Tensor:
    """Per-token logprobs of the datum's targets under a transformers (or peft) model."""
    tokens = torch.tensor([d.model_input.to_ints()])
    targets = d.loss_fn_inputs["target_tokens"].to_torch().long()
    with torch.no_grad():
        logits = model(tokens).logits[0].float()
    return logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]


def trainer_logprobs(trainer: LoraTrainer, model_id: str, data) -> list[torch.Tensor]:
    return [o["logprobs"].to_torch() for o in trainer.forward(model_id, data).loss_fn_outputs]


def max_diff(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True))


def base(model_dir: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def peft_adapter(model_dir: str, out: Path, seed: int = 0, **config) -> PeftModel:
    """A random, non-zero adapter made and saved by stock peft, as one trained elsewhere is."""
    torch.manual_seed(seed)
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **config}
    model = get_peft_model(base(model_dir), PeftLoraConfig(init_lora_weights=False, **config))
    model.eval().save_pretrained(out)
    return model


@pytest.fixture(scope="module")
def trainer(tiny_model, tmp_path_factory) -> LoraTrainer:
    root = tmp_path_factory.mktemp("ckpt")
    return LoraTrainer(tiny_model, TrainerConfig(dtype="float32", checkpoint_dir=str(root)))


@pytest.fixture(scope="module")
def trained(trainer) -> str:
    """An adapter on every group, lm_head of the tied tiny model included, three steps in,
    saved as 'weights/s3' and 'sampler_weights/s3' of run 'exp:train:0'."""
    model_id = "exp:train:0"
    trainer.create_adapter(model_id, types.LoraConfig(rank=4, seed=1))
    for step in range(3):
        trainer.forward_backward(model_id, batch(step), "cross_entropy")
        trainer.optim_step(model_id, LR)
    trainer.save_state(model_id, "s3")
    trainer.save_weights_for_sampler(model_id, "s3")
    return model_id


def saved(trainer: LoraTrainer, model_id: str, kind: str) -> Path:
    return trainer.config.resolved_checkpoint_dir() / "exp_train_0" / kind / "s3"


# -- export ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["weights", "sampler_weights"])
def test_peft_export_gives_our_logprobs_in_stock_peft(trainer, trained, tiny_model, tmp_path, kind):
    out = export_peft(saved(trainer, trained, kind), tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    data = batch(10)
    ours = trainer_logprobs(trainer, trained, data)
    plain = [hf_logprobs(base(tiny_model), d) for d in data]
    assert max_diff(ours, plain) > 0.05  # the adapter matters
    model = PeftModel.from_pretrained(base(tiny_model), str(out)).eval()
    assert "lm_head" in model.peft_config["default"].target_modules
    assert max_diff(ours, [hf_logprobs(model, d) for d in data]) <= TOLERANCE


def test_merged_export_gives_our_logprobs_in_transformers(trainer, trained, tmp_path):
    out = export_merged(saved(trainer, trained, "sampler_weights"), tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    # The lm_head adapter changed the output projection only: untied, the embedding as before.
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    original = base(trainer.model_path)
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    data = batch(11)
    ours = trainer_logprobs(trainer, trained, data)
    assert max_diff(ours, [hf_logprobs(model, d) for d in data]) <= TOLERANCE
    assert AutoTokenizer.from_pretrained(out)("hello").input_ids


def test_merged_export_keeps_tied_embeddings_and_casts(trainer, tmp_path):
    """Without an lm_head adapter the merged model stays tied; dtype= sets the saved weights'."""
    model_id = "exp:train:untied"
    trainer.create_adapter(model_id, types.LoraConfig(rank=4, seed=2, train_unembed=False))
    trainer.forward_backward(model_id, batch(0), "cross_entropy")
    trainer.optim_step(model_id, LR)
    path = trainer.save_weights_for_sampler(model_id, "s1").path
    out = export_merged(path, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.tie_word_embeddings is True
    data = batch(12)
    ours = trainer_logprobs(trainer, model_id, data)
    assert max_diff(ours, [hf_logprobs(model, d) for d in data]) <= TOLERANCE
    half = export_merged(path, tmp_path / "bf16", dtype="bfloat16")
    assert AutoModelForCausalLM.from_pretrained(half).dtype == torch.bfloat16
    trainer.release(model_id)


def test_tinker_paths_resolve_under_the_checkpoint_root(trainer, trained, tmp_path, capsys):
    root = trainer.config.resolved_checkpoint_dir()
    source = "tinker://exp:train:0/sampler_weights/s3"
    assert resolve_source(source, root) == saved(trainer, trained, "sampler_weights")
    assert cli([f"source={source}", f"checkpoint_root={root}", f"out={tmp_path / 'a'}"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*checkpoint_root="):
        resolve_source("tinker://exp:train:0/weights/nope", root)
    with pytest.raises(InvalidRequestError, match="expected tinker://"):
        resolve_source("tinker://exp:train:0/adapters/s3", root)
    assert cli([f"source={source}", f"checkpoint_root={root}", f"out={tmp_path / 'a'}"]) == 2
    assert "exists; pass overwrite=true" in capsys.readouterr().err


def test_export_refuses_another_base_model(trainer, trained, other_tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match="different architecture"):
        export_merged(
            saved(trainer, trained, "weights"), tmp_path / "m", base_model=other_tiny_model
        )
    assert not (tmp_path / "m").exists()


# -- import ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"lora_alpha": 8},  # q_proj and v_proj, at another alpha than the trainer's
        {"lora_alpha": 16, "use_rslora": True, "target_modules": ["o_proj", "down_proj"]},
    ],
)
def test_imported_adapter_continues_with_its_own_loss(trainer, tiny_model, tmp_path, config):
    theirs = peft_adapter(tiny_model, tmp_path / "peft", **config)
    path = import_peft(tmp_path / "peft", tmp_path / "ckpt", base_model=tiny_model)
    model_id = f"imported:{len(config)}"
    info = trainer.create_adapter_from_state(model_id, str(path), False)
    assert info.lora_config.rank == 4
    data = batch(20)
    ours = trainer_logprobs(trainer, model_id, data)
    assert max_diff(ours, [hf_logprobs(theirs, d) for d in data]) <= TOLERANCE
    loss = trainer.forward(model_id, data).metrics["loss:sum"]
    assert loss == pytest.approx(-sum(float(hf_logprobs(theirs, d).sum()) for d in data), abs=1e-3)
    # It trains on, the modules the adapter lacked included (their lora_B leaves 0).
    before = read_checkpoint(path, with_optimizer=False).weights
    trainer.forward_backward(model_id, data, "cross_entropy")
    trainer.optim_step(model_id, LR)
    after = trainer.save_weights_for_sampler(model_id, "next").path
    weights = read_checkpoint(after, with_optimizer=False).weights
    fresh = [k for k, v in before.items() if ".lora_B." in k and not v.any()]
    assert fresh and all(weights[k].any() for k in fresh)
    assert trainer.forward(model_id, data).metrics["loss:sum"] < loss
    trainer.release(model_id)


def test_export_then_import_is_the_same_adapter(trainer, trained, tmp_path):
    exported = export_peft(saved(trainer, trained, "sampler_weights"), tmp_path / "peft")
    path = import_peft(exported, tmp_path / "ckpt")
    original = read_checkpoint(saved(trainer, trained, "sampler_weights"), with_optimizer=False)
    imported = read_checkpoint(path, with_optimizer=False)
    assert imported.meta.lora_config.model_dump(
        exclude={"seed"}
    ) == original.meta.lora_config.model_dump(exclude={"seed"})
    assert imported.meta.fingerprint == original.meta.fingerprint
    assert imported.weights.keys() == original.weights.keys()
    assert all(torch.equal(imported.weights[k], original.weights[k]) for k in original.weights)


def test_a_training_client_continues_from_an_import(service, tiny_model, tmp_path):
    theirs = peft_adapter(tiny_model, tmp_path / "peft", seed=5)
    path = str(import_peft(tmp_path / "peft", tmp_path / "ckpt", base_model=tiny_model))
    data = batch(30)
    expected = [hf_logprobs(theirs, d) for d in data]
    client = service.create_training_client_from_state(path)
    other = service.create_lora_training_client(
        tiny_model, rank=4, train_mlp=False, train_unembed=False
    )
    other.load_state(path).result()
    for c in (client, other):
        outputs = c.forward(data).result().loss_fn_outputs
        assert max_diff([o["logprobs"].to_torch() for o in outputs], expected) <= TOLERANCE
    client.forward_backward(data, "cross_entropy").result()
    assert client.optim_step(LR).result().metrics["step:max"] == 1.0


def refusals(tiny_model: str, other_tiny_model: str, vllm_tiny_model: str):
    """(case, how to make the adapter directory, import arguments, what the error says)."""

    def made(model_dir: str, **config):
        return lambda out: peft_adapter(model_dir, out, **config)

    def only_bin(out: Path) -> None:
        peft_adapter(tiny_model, out)
        torch.save(load_file(out / "adapter_model.safetensors"), out / "adapter_model.bin")
        (out / "adapter_model.safetensors").unlink()

    return [
        ("no directory", lambda out: None, {}, "is not a directory"),
        ("pickled weights", only_bin, {}, "safe_serialization=True"),
        ("rank", made(tiny_model, r=8), {"max_rank": 4}, "rank 8, above max_rank=4"),
        ("module", made(tiny_model, target_modules=["q_proj", "embed_tokens"]), {},
         "adapts modules the trainer does not: embed_tokens"),
        ("dora", made(tiny_model, use_dora=True), {}, "use_dora=True"),
        ("bias", made(tiny_model, bias="lora_only"), {}, "bias='lora_only'"),
        ("deeper base", made(other_tiny_model), {}, "'model.layers.2.self_attn.q_proj', which base"),
        ("wider base", made(vllm_tiny_model), {}, r"lora_A of model.layers.0.self_attn.q_proj has shape \[4, 128\].* must be \[4, 64\]"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(8))
def test_import_refusals_say_what_and_where(
    case, tiny_model, other_tiny_model, vllm_tiny_model, tmp_path
):
    name, make, kwargs, message = refusals(tiny_model, other_tiny_model, vllm_tiny_model)[case]
    make(tmp_path / "peft")
    with pytest.raises(CheckpointError, match=message) as error:
        import_peft(tmp_path / "peft", tmp_path / "ckpt", base_model=tiny_model, **kwargs)
    assert str(tmp_path / "peft") in str(error.value), name
    assert not (tmp_path / "ckpt").exists()


def test_import_from_the_command_line(tiny_model, tmp_path, capsys):
    peft_adapter(tiny_model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_model  # the default base
    args = [f"source={tmp_path / 'peft'}", f"out={tmp_path / 'ckpt'}", "to=checkpoint"]
    assert cli(args) == 0
    meta = read_checkpoint(tmp_path / "ckpt", with_optimizer=False).meta
    assert (meta.base_model, meta.step, meta.has_optimizer) == (tiny_model, 0, False)
    assert cli([*args, "max_rank=2"]) == 2
    assert "above max_rank=2" in capsys.readouterr().err


@pytest.mark.slow
def test_stock_vllm_serves_an_exported_adapter(vllm_tiny_model, tmp_path, monkeypatch):
    """vLLM's own `LLM` with a `LoRARequest` on the export: the trainer's prompt logprobs."""
    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    config = TrainerConfig(dtype="float32", checkpoint_dir=str(tmp_path / "ckpt"))
    trainer = LoraTrainer(vllm_tiny_model, config)
    trainer.create_adapter("vllm", types.LoraConfig(rank=4, seed=1))
    for step in range(3):
        trainer.forward_backward("vllm", batch(step), "cross_entropy")
        trainer.optim_step("vllm", LR)
    out = export_peft(trainer.save_weights_for_sampler("vllm", "s3").path, tmp_path / "adapter")
    probe = batch(40, lengths=(15,))
    ours = trainer_logprobs(trainer, "vllm", probe)[0]
    tokens = [
        *probe[0].model_input.to_ints(),
        int(probe[0].loss_fn_inputs["target_tokens"].data[-1]),
    ]
    llm = LLM(
        vllm_tiny_model,
        dtype="float32",
        enforce_eager=True,
        enable_lora=True,
        max_lora_rank=8,
        max_loras=1,
        max_model_len=256,
        kv_cache_memory_bytes=2**28,
    )
    try:
        # Eager: vLLM would compile a logprobs helper on the first request (~30 s on 2 CPUs).
        with torch.compiler.set_stance("force_eager"):
            (result,) = llm.generate(
                {"prompt_token_ids": tokens},
                SamplingParams(max_tokens=1, prompt_logprobs=0),
                lora_request=LoRARequest("exported", 1, str(out)),
            )
        assert result.prompt_logprobs is not None
        theirs = [result.prompt_logprobs[i][t].logprob for i, t in enumerate(tokens) if i > 0]
        assert (torch.tensor(theirs) - ours).abs().max().item() <= TOLERANCE
        assert (
            torch.tensor(theirs) - hf_logprobs(base(vllm_tiny_model), probe[0])
        ).abs().max() > 0.05
    finally:
        del llm
