"""The SFT loop (rl.loop.sft) and its metrics logger (rl.loop.metrics_log), on a tiny random model.

Covers: the loss falls, learning-rate schedules by value, eval loss, metrics.jsonl, and the
W&B offline run (read back from its `.wandb` file), plus config and data errors.
"""

from __future__ import annotations

import json
import math
import random
import struct
import time
from pathlib import Path

import pytest

from rl.checkpoint_format import read_checkpoint
from rl.cli import parse_config
from rl.errors import InvalidRequestError
from rl.loop.metrics_log import MetricsLogger, read_metrics, timed
from rl.loop.run_dir import load_checkpoints, read_run_config
from rl.loop.sft import DataOrder, SFTConfig, lr_multiplier, main, mean_per_token, read_chat_jsonl
from rl.types import Datum, ModelInput, TensorData
from trainers.config import TrainerConfig


def write_chat_data(path: Path, n: int, seed: int) -> str:
    """Small arithmetic chats: some with a system prompt, some with two assistant turns."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            messages = [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
            if i % 3 == 0:
                messages.insert(0, {"role": "system", "content": "Answer briefly."})
            if i % 4 == 0:
                messages += [
                    {"role": "user", "content": "And doubled?"},
                    {"role": "assistant", "content": f"Doubled it is {2 * (a + b)}."},
                ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("chat")
    return write_chat_data(root / "train.jsonl", 48, 0), write_chat_data(root / "eval.jsonl", 8, 1)


# -- W&B offline run files ---------------------------------------------------------------------


def wandb_history(run_dir: Path) -> list[dict[str, object]]:
    """The history rows of the offline W&B run(s) under `run_dir/wandb`, read from the
    `.wandb` file (a LevelDB-style log of protobuf `Record`s: 7-byte file header, 32 KiB
    blocks, 7-byte record headers; full / first / middle / last fragments)."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {run_dir}"
    for path in files:
        data = path.read_bytes()
        ident, magic, _ = struct.unpack("<4sHB", data[:7])
        assert ident == b":W&B" and magic == 0xBEE1
        pos, payload = 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # block tail too short for a header: padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if pos + 7 + length > len(data):  # a record still being written
                break
            chunk = data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind == 0:
                break
            payload = chunk if kind in (1, 2) else payload + chunk
            if kind in (2, 3):
                continue
            record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        (item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
    return rows


# -- pure parts --------------------------------------------------------------------------------


def test_lr_schedules_by_value():
    # 10 steps, no warmup: p = step / 10.
    assert [lr_multiplier("constant", s, 10) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [lr_multiplier("linear", s, 10) for s in (0, 5, 9)] == pytest.approx([1.0, 0.5, 0.1])
    cosine = [lr_multiplier("cosine", s, 10) for s in (0, 5, 9)]
    assert cosine == pytest.approx([1.0, 0.5, (1 + math.cos(0.9 * math.pi)) / 2])
    # Warmup of 4 over 12 steps: 0.25, 0.5, 0.75, 1, then decay over the remaining 8.
    warm = [lr_multiplier("linear", s, 12, warmup_steps=4) for s in range(12)]
    assert warm[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert warm[8] == pytest.approx(0.5)
    # min_lr_ratio: linear decays towards 0.2 instead of 0.
    assert lr_multiplier("linear", 5, 10, min_ratio=0.2) == pytest.approx(0.6)
    assert lr_multiplier("cosine", 5, 10, min_ratio=0.2) == pytest.approx(0.6)


def test_data_order_is_a_shuffle_per_epoch_and_restores_from_its_state():
    order = DataOrder(num_items=10, batch_size=3, seed=7)  # 3 batches per epoch, 1 left out
    batches = [order.next_batch() for _ in range(3)]
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == 9 and all(len(b) == 3 for b in batches)
    state = json.loads(json.dumps(order.state()))  # as it goes through checkpoints.jsonl
    rest = [order.next_batch() for _ in range(4)]
    assert order.epoch == 2
    assert [i for b in rest[:3] for i in b] != flat  # epoch 1 has a new shuffle
    again = DataOrder(num_items=10, batch_size=3, seed=7, state=state)
    assert [again.next_batch() for _ in range(4)] == rest
    with pytest.raises(InvalidRequestError, match="batch_size=11"):
        DataOrder(num_items=10, batch_size=11, seed=0)


def test_batch_weights_make_the_summed_loss_a_mean_per_token():
    def datum(weights: list[float]) -> Datum:
        n = len(weights)
        return Datum(
            model_input=ModelInput.from_ints(list(range(n))),
            loss_fn_inputs={
                "target_tokens": TensorData(data=list(range(1, n + 1)), dtype="int64"),
                "weights": TensorData(data=weights, dtype="float32"),
            },
        )

    batch = mean_per_token([datum([0, 1, 1]), datum([1, 1, 1, 1, 0, 0])])
    weights = [w for d in batch for w in d.loss_fn_inputs["weights"].data]
    assert weights == pytest.approx([0, 1 / 6, 1 / 6, 1 / 6, 1 / 6, 1 / 6, 1 / 6, 0, 0])


def test_bad_config_values_and_files_are_clear_errors(tmp_path, chat_data):
    with pytest.raises(InvalidRequestError, match="learning_rate"):
        parse_config(SFTConfig, ["learning_rate=-1"])
    with pytest.raises(InvalidRequestError, match="batch_size"):
        parse_config(SFTConfig, ["batch_size=0"])
    with pytest.raises(InvalidRequestError, match="unknown config key 'lr'"):
        parse_config(SFTConfig, ["lr=1e-3"])
    with pytest.raises(InvalidRequestError, match="lr_schedule"):
        parse_config(SFTConfig, ["lr_schedule=exponential"])
    # A missing or malformed data file fails before anything starts or is written.
    run_dir = tmp_path / "run"
    with pytest.raises(InvalidRequestError, match="no such file"):
        main(SFTConfig(data=str(tmp_path / "missing.jsonl"), log_dir=str(run_dir)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(Path(chat_data[0]).read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(InvalidRequestError, match="line 2"):
        main(SFTConfig(data=str(bad), log_dir=str(run_dir)))
    assert not run_dir.exists()
    assert len(read_chat_jsonl(chat_data[0])) == 48


# -- the logger --------------------------------------------------------------------------------


def test_metrics_logger_writes_jsonl_and_an_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    with MetricsLogger(
        run_dir, total_steps=3, wandb_project="engineroom-tests", config={"lr": 1e-3}
    ) as logger:
        for step in range(3):
            metrics = {"train/loss": 2.0 - step, "optim/lr": 1e-3, "data/batch_indices": [step]}
            with timed(metrics, "time/step_s"):
                pass
            logger.log(step, metrics)
        table = logger.log_samples(
            2, [{"prompt": "1+1", "completion": "2", "reward": 1.0}, {"prompt": "2+2"}]
        )
        with pytest.raises(InvalidRequestError, match="prefix"):
            logger.log(3, {"loss": 1.0})
    assert table.columns == ["prompt", "completion", "reward"]
    assert table.data[1] == ["2+2", None, None]

    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert [r["train/loss"] for r in records] == [2.0, 1.0, 0.0]
    assert records[1]["data/batch_indices"] == [1] and records[0]["time/step_s"] >= 0
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples[0] == {
        "step": 2,
        "key": "samples",
        "prompt": "1+1",
        "completion": "2",
        "reward": 1.0,
    }

    # `finish()` can return a moment before W&B's service process has flushed the run file.
    deadline = time.monotonic() + 30.0
    while True:
        history = [row for row in wandb_history(run_dir) if "train/loss" in row]
        if len(history) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [(row["step"], row["train/loss"]) for row in history] == [(0, 2.0), (1, 1.0), (2, 0.0)]
    assert "data/batch_indices" not in history[0]  # lists stay in metrics.jsonl only
    assert list(run_dir.glob("wandb/offline-run-*/files/media/table/samples_*.table.json"))

    # A restart from step 1 drops the records of steps >= 1 (they are redone), and a line
    # cut short by a kill does not break reading.
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train/lo')
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2]
    with MetricsLogger(run_dir, total_steps=3, start_step=1, console=False) as logger:
        logger.log(1, {"train/loss": 5.0})
    assert [(r["step"], r["train/loss"]) for r in read_metrics(run_dir)] == [(0, 2.0), (1, 5.0)]


# -- the loop ----------------------------------------------------------------------------------


def sft_config(
    tiny_model: str, chat_data: tuple[str, str], log_dir: Path, **overrides
) -> SFTConfig:
    settings = dict(
        base_model=tiny_model,
        data=chat_data[0],
        eval_data=chat_data[1],
        log_dir=str(log_dir),
        rank=8,
        batch_size=4,
        max_steps=10,
        learning_rate=5e-3,
        lr_schedule="linear",
        warmup_steps=2,
        eval_every=5,
        save_every=5,
        max_length=96,
        trainer=TrainerConfig(dtype="float32"),
    )
    settings.update(overrides)
    return SFTConfig(**settings)  # type: ignore[arg-type]


def test_sft_lowers_the_loss_and_logs_everything(service, tiny_model, chat_data, tmp_path):
    log_dir = tmp_path / "run"
    config = sft_config(tiny_model, chat_data, log_dir, wandb_project="engineroom-tests")
    result = main(config, service=service)
    assert result.final_step == 10 and result.resumed_from is None

    records = read_metrics(log_dir)
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(10))
    losses = [r["train/loss"] for r in train]
    assert sum(losses[-3:]) / 3 < losses[0] * 0.85, losses
    # The learning rate follows warmup 2 + linear decay, by value.
    expected = [5e-3 * lr_multiplier("linear", s, 10, warmup_steps=2) for s in range(10)]
    assert [r["optim/lr"] for r in train] == pytest.approx(expected)
    assert all(len(r["data/batch_indices"]) == 4 and r["train/tokens"] > 0 for r in train)
    assert all(r["optim/grad_norm"] > 0 for r in train)

    # Eval before steps 0 and 5, and after the last (logged at step 10); it falls too.
    evals = {r["step"]: r["eval/loss"] for r in records if "eval/loss" in r}
    assert sorted(evals) == [0, 5, 10]
    assert evals[10] < evals[0]
    assert records[-1]["step"] == 10 and "train/loss" not in records[-1]

    # Checkpoints after steps 5 and 10, both loadable with their optimizer state.
    checkpoints = load_checkpoints(log_dir)
    assert [c.step for c in checkpoints] == [5, 10]
    for c in checkpoints:
        assert read_checkpoint(c.state_path, with_optimizer=True).meta.step == c.step
    assert checkpoints[-1].loop_state["batch"] == 10
    assert read_run_config(log_dir)["rank"] == 8

    # The W&B offline run holds the same numbers.
    history = wandb_history(log_dir)
    wb_train = {row["step"]: row["train/loss"] for row in history if "train/loss" in row}
    assert wb_train == pytest.approx({r["step"]: r["train/loss"] for r in train})
    wb_eval = {row["step"]: row["eval/loss"] for row in history if "eval/loss" in row}
    assert wb_eval == pytest.approx(evals)


def test_sft_trains_on_assistant_tokens_only(service, tiny_model, chat_data, tmp_path):
    """last_assistant_message trains on fewer tokens than all_assistant_messages."""
    tokens = {}
    for train_on in ("all_assistant_messages", "last_assistant_message"):
        config = sft_config(
            tiny_model,
            chat_data,
            tmp_path / train_on,
            train_on=train_on,
            max_steps=1,
            eval_data="",
            batch_size=48,
            pipeline_depth=0,
        )
        result = main(config, service=service)
        tokens[train_on] = result.history[0]["train/tokens"]
    # 12 of the 48 chats have a second answer ("Doubled it is N.<|im_end|>").
    assert tokens["last_assistant_message"] < tokens["all_assistant_messages"]


def test_pipelining_changes_nothing_but_timing(service, tiny_model, chat_data, tmp_path):
    """Submitting steps ahead (with saves and evals queued between them) gives the same
    losses, evals and checkpoints as waiting for each step."""
    runs = {}
    for depth in (0, 3):
        config = sft_config(
            tiny_model,
            chat_data,
            tmp_path / f"depth{depth}",
            max_steps=6,
            eval_every=2,
            save_every=2,
            pipeline_depth=depth,
        )
        main(config, service=service)
        records = read_metrics(tmp_path / f"depth{depth}")
        runs[depth] = (
            {r["step"]: r["train/loss"] for r in records if "train/loss" in r},
            {r["step"]: r["eval/loss"] for r in records if "eval/loss" in r},
            [c.step for c in load_checkpoints(tmp_path / f"depth{depth}")],
        )
    assert runs[0][2] == runs[3][2] == [2, 4, 6]
    assert sorted(runs[0][0]) == list(range(6)) and sorted(runs[0][1]) == [0, 2, 4, 6]
    assert runs[0][0] == pytest.approx(runs[3][0], rel=1e-6)
    assert runs[0][1] == pytest.approx(runs[3][1], rel=1e-6)
