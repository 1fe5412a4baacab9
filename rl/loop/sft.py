"""Supervised fine-tuning (SFT) of a LoRA adapter on chat data: `python -m rl.loop.sft key=value ...`.

Data: chat JSONL, one `{"messages": [{"role": ..., "content": ...}, ...]}` per line, rendered
with the base model's chat template (envs.chat.ChatRenderer). Only assistant turns carry weight
(`train_on`); conversations are cut to `max_length` tokens, and one left with no trained token
is skipped.

Loss: `cross_entropy` sums -w * logprob over tokens (trainers.losses). Each batch's weights are
divided by the number of trained tokens in the batch, so the loss and its gradient are the
mean NLL per trained token of the batch (`train/loss`), whatever the batch size and answer
lengths. (tinker-cookbook instead normalises per conversation, which weighs every conversation
the same.) `eval/loss` is the same mean over all trained tokens of `eval_data`, from
`TrainingClient.forward` (no gradient).

Order: every epoch shuffles the conversations with the run's RNG and cuts them into
floor(n / batch_size) batches (the rest of that epoch's shuffle is left out).
Steps run to `num_epochs` epochs or `max_steps`, whichever ends first; the learning rate is
`learning_rate` times the schedule's multiplier of the step (`lr_multiplier`).

Pipelining: step s+1's forward_backward + optim_step are submitted before step s's results
are awaited (`pipeline_depth` steps ahead, tinker-cookbook's submit_ahead), so the trainer is
busy while this process logs. The client's queue runs calls in submission order, so an eval or
a save submitted between two steps sees exactly the weights after the first.

Run directory (`log_dir`): config.json, metrics.jsonl, checkpoints.jsonl, checkpoints/ (the
saved states), wandb/. Resume: running the same command again (after a crash or `kill -9`)
continues from the last record in checkpoints.jsonl: weights and Adam state come back through
`create_training_client_from_state_with_optimizer`, the data position and RNG state from the
record's `loop_state`; a changed setting that would alter the run (model, rank, data, batch
size, schedule, ...) is an error instead.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from rl.cli import flat_dict, parse_config
from rl.client.service import ServiceClient, make_service
from rl.client.training import TrainingClient
from rl.console import echo, link_ray_logs, route_logs
from rl.errors import (
    CheckpointError,
    EngineRoomError,
    InvalidRequestError,
    TrainerRestartedError,
)
from rl.futures import APIFuture
from rl.loop.metrics_log import MetricsLogger
from rl.loop.plot import write_run_curves
from rl.loop.run_dir import (
    CheckpointRecord,
    append_checkpoint,
    checkpoint_root,
    resume_after_restart,
    rng_from_json,
    rng_state_to_json,
    start_run,
)
from rl.loop.schedule import lr_multiplier
from rl.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    ModelInput,
    OptimStepResponse,
    SaveWeightsResponse,
    TensorData,
)
from trainers.config import TrainerConfig

DEFAULT_DATA = "examples/data/chat_sft.jsonl"


@dataclass(frozen=True)
class SFTConfig:
    base_model: str = "SmolLM2-135M-Instruct"
    """built-in name, local HF directory or hub name"""
    data: str = DEFAULT_DATA
    """training chat JSONL: one {'messages': [...]} per line"""
    eval_data: str = ""
    """held-out chat JSONL for eval/loss; '' = no eval"""
    log_dir: str = "runs/sft"
    """run directory (config, metrics, checkpoints); the same log_dir resumes the run. Use an
    absolute path under `ray job submit`, whose working dir is temporary"""
    on_existing: Literal["resume", "overwrite", "error"] = "resume"
    """when log_dir holds a run: resume it (same settings required), overwrite it, or error"""
    rank: int = 32
    """LoRA rank"""
    seed: int = 0
    """seed of the LoRA init and of the data order"""
    train_on: Literal["all_assistant_messages", "last_assistant_message"] = "all_assistant_messages"
    """which assistant turns are trained on"""
    max_length: int = 1024
    """conversations are cut to this many input tokens"""
    batch_size: int = 8
    """conversations per step"""
    num_epochs: int = 1
    """passes over the data"""
    max_steps: int = 0
    """stop after this many steps in all; 0 = all epochs"""
    learning_rate: float = 2e-4
    """peak AdamW learning rate"""
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    """decay after warmup: constant, linear or cosine"""
    warmup_steps: int = 0
    """steps of linear warmup from learning_rate / warmup_steps"""
    min_lr_ratio: float = 0.0
    """learning rate at the end of the decay, as a fraction"""
    adam_beta1: float = 0.9
    """AdamW beta1"""
    adam_beta2: float = 0.95
    """AdamW beta2"""
    adam_eps: float = 1e-8
    """AdamW epsilon"""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay"""
    grad_clip_norm: float = 0.0
    """clip the gradient to this global norm; 0 = no clipping"""
    eval_every: int = 10
    """eval loss before every N-th step and after the last; 0 = last only"""
    eval_batch_size: int = 16
    """conversations per forward call during eval"""
    save_every: int = 20
    """checkpoint after every N-th step and after the last; 0 = last only"""
    pipeline_depth: int = 1
    """steps submitted ahead of the one awaited; 0 = no pipelining"""
    wandb_project: str = ""
    """Weights & Biases project; '' = no W&B"""
    wandb_name: str = ""
    """W&B run name; '' = the log_dir's name"""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """the trainer's settings (trainers/config.py), set as trainer.<key>=...;
    trainer.checkpoint_dir '' = the run dir's checkpoints/"""
    verbose: bool = False
    """show Ray and transformers logs on the console (else under <log_dir>/logs/)"""

    # Keys this config had before the trainer's settings became a sub-config.
    RENAMED: ClassVar[dict[str, str]] = {
        name: f"trainer.{name}"
        for name in (
            "dtype", "num_threads", "world_size", "num_gpus", "resources", "placement_strategy",
            "gradient_checkpointing",
        )
    }  # fmt: skip
    # Settings that may change when a run resumes; any other change is an error. `data` may
    # move (e.g. into a Ray job's working dir) as long as its content, `data_sha256`, is equal.
    MAY_CHANGE_ON_RESUME: ClassVar[tuple[str, ...]] = (
        "data", "eval_data", "log_dir", "on_existing", "eval_every", "eval_batch_size",
        "save_every", "pipeline_depth", "wandb_project", "wandb_name", "verbose",
        "trainer.num_threads", "trainer.world_size", "trainer.num_cpus", "trainer.num_gpus",
        "trainer.resources", "trainer.placement_strategy", "trainer.schedule_timeout_s",
        "trainer.max_tokens_per_batch", "trainer.call_overhead_tokens",
        "trainer.gradient_checkpointing", "trainer.logprob_chunk_tokens",
        "trainer.checkpoint_dir",
    )  # fmt: skip

    def __post_init__(self) -> None:
        checks = {
            "rank": (self.rank >= 1, ">= 1"),
            "max_length": (self.max_length >= 2, ">= 2"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "num_epochs": (self.num_epochs >= 1, ">= 1"),
            "max_steps": (self.max_steps >= 0, ">= 0"),
            "learning_rate": (0 < self.learning_rate < math.inf, "> 0 and finite"),
            "warmup_steps": (self.warmup_steps >= 0, ">= 0"),
            "min_lr_ratio": (0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            "adam_beta1": (0 <= self.adam_beta1 < 1, "in [0, 1)"),
            "adam_beta2": (0 <= self.adam_beta2 < 1, "in [0, 1)"),
            "adam_eps": (0 <= self.adam_eps < math.inf, ">= 0"),
            "weight_decay": (0 <= self.weight_decay < math.inf, ">= 0"),
            "grad_clip_norm": (0 <= self.grad_clip_norm < math.inf, ">= 0"),
            "eval_every": (self.eval_every >= 0, ">= 0"),
            "eval_batch_size": (self.eval_batch_size >= 1, ">= 1"),
            "save_every": (self.save_every >= 0, ">= 0"),
            "pipeline_depth": (self.pipeline_depth >= 0, ">= 0"),
            "base_model": (bool(self.base_model), "non-empty"),
            "data": (bool(self.data), "non-empty"),
            "log_dir": (bool(self.log_dir), "non-empty"),
        }
        for key, (ok, requirement) in checks.items():
            if not ok:
                raise InvalidRequestError(
                    f"SFTConfig: {key}={getattr(self, key)!r} is invalid: must be {requirement}"
                )
        choices = {
            "lr_schedule": ("constant", "linear", "cosine"),
            "on_existing": ("resume", "overwrite", "error"),
            "train_on": ("all_assistant_messages", "last_assistant_message"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise InvalidRequestError(
                    f"SFTConfig: {key}={getattr(self, key)!r}, expected one of {list(allowed)}"
                )

    def trainer_config(self) -> TrainerConfig:
        """The trainer's config as the run uses it: saving into the run dir unless told
        otherwise."""
        if self.trainer.checkpoint_dir:
            return self.trainer
        checkpoints = str(checkpoint_root(self.log_dir).resolve())
        return dataclasses.replace(self.trainer, checkpoint_dir=checkpoints)


@dataclass
class SFTResult:
    """What a run did: the step it reached, and the records it logged in this invocation."""

    final_step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: CheckpointRecord | None = None
    resumed_from: int | None = None


# -- data --------------------------------------------------------------------------------------


def read_chat_jsonl(path: str | Path) -> list[list[dict[str, Any]]]:
    """The `messages` list of every line; a bad line is an error naming file and line."""
    conversations = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        where = f"{path}, line {i + 1}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{where}: not JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise InvalidRequestError(f"{where}: expected an object with a 'messages' list")
        conversations.append(row["messages"])
    if not conversations:
        raise InvalidRequestError(f"{path}: no conversations")
    return conversations


def render_datums(
    conversations: list[list[dict[str, Any]]],
    *,
    renderer: Any,
    train_on: str,
    max_length: int,
    where: str = "data",
) -> list[Datum]:
    """Conversations -> datums with weight 1 on trained tokens (before normalisation).

    Position i of the input predicts token i + 1; conversations left without a trained token
    after cutting to max_length are skipped.
    """
    from envs.chat import ChatTemplateError

    datums = []
    for i, messages in enumerate(conversations):
        try:
            tokens, weights = renderer.render_supervised(messages, train_on=train_on)
        except ChatTemplateError as e:
            raise InvalidRequestError(f"{where}, conversation {i}: {e}") from None
        tokens, weights = tokens[: max_length + 1], weights[: max_length + 1]
        if sum(weights[1:]) == 0:
            continue
        datums.append(
            Datum(
                model_input=ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": TensorData(data=tokens[1:], dtype="int64"),
                    "weights": TensorData(data=[float(w) for w in weights[1:]], dtype="float32"),
                },
            )
        )
    if not datums:
        raise InvalidRequestError(f"{where}: no conversation has a trained token")
    return datums


def trained_tokens(datum: Datum) -> float:
    return float(sum(datum.loss_fn_inputs["weights"].data))


def mean_per_token(batch: list[Datum]) -> list[Datum]:
    """The batch with weights divided by its total weight: summed loss = mean NLL per token."""
    total = sum(trained_tokens(d) for d in batch)
    return [
        Datum(
            model_input=d.model_input,
            loss_fn_inputs={
                "target_tokens": d.loss_fn_inputs["target_tokens"],
                "weights": TensorData(
                    data=[w / total for w in d.loss_fn_inputs["weights"].data], dtype="float32"
                ),
            },
        )
        for d in batch
    ]


class DataOrder:
    """Which conversations form each step's batch: a fresh shuffle per epoch.

    Indices are into the rendered conversations (those skipped for lack of trained tokens are
    not counted), and are logged per step as `data/batch_indices`.

    `state()` is the position after the batches taken so far: epoch, batches of it done, and
    the RNG state from just before that epoch's shuffle (replaying the shuffle restores it).
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int, state: dict[str, Any] | None = None
    ):
        self.num_items = num_items
        self.batch_size = batch_size
        self.batches_per_epoch = num_items // batch_size
        if self.batches_per_epoch == 0:
            raise InvalidRequestError(
                f"batch_size={batch_size} is larger than the {num_items} usable conversations"
            )
        if state is None:
            self.epoch, self.batch = 0, 0
            self._rng = random.Random(seed)
        else:
            try:
                self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
                self._rng = rng_from_json(state["rng_state"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(
                    f"checkpoint loop_state {e!r} is not a data position"
                ) from None
            if not 0 <= self.batch <= self.batches_per_epoch:
                raise CheckpointError(
                    f"checkpoint loop_state: batch {self.batch} of {self.batches_per_epoch}"
                )
        self._shuffle()

    def next_batch(self) -> list[int]:
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
            self._shuffle()
        start = self.batch * self.batch_size
        self.batch += 1
        return self._order[start : start + self.batch_size]

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "rng_state": self._epoch_rng_state}

    def _shuffle(self) -> None:
        self._epoch_rng_state = rng_state_to_json(self._rng)
        self._order = list(range(self.num_items))
        self._rng.shuffle(self._order)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- the loop ----------------------------------------------------------------------------------


@dataclass
class SFTRun:
    """Everything one fine-tune holds between its steps."""

    config: SFTConfig
    run_dir: Path
    run_config: dict[str, Any]
    client: TrainingClient
    datums: list[Datum]
    eval_datums: list[Datum]
    total: int  # steps in all


@dataclass
class _Step:
    """A step submitted to the trainer and not yet awaited."""

    step: int
    indices: list[int]
    epoch: int
    tokens: float
    learning_rate: float
    fwd_bwd: APIFuture[ForwardBackwardOutput]
    optim: APIFuture[OptimStepResponse]
    evals: list[APIFuture[ForwardBackwardOutput]] | None
    save: APIFuture[SaveWeightsResponse] | None
    loop_state: dict[str, Any]


def main(config: SFTConfig, service: ServiceClient | None = None) -> SFTResult:
    """Runs (or resumes) the fine-tune described by `config`; `service` is made if not given."""
    # Bad data fails here, before the run dir is touched or Ray is started.
    conversations = _read_file(config, "data")
    eval_conversations = _read_file(config, "eval_data") if config.eval_data else []
    run_dir = Path(config.log_dir)
    run_config = {**flat_dict(config), "data_sha256": file_sha256(config.data)}
    resume = start_run(
        run_dir,
        run_config,
        on_existing=config.on_existing,
        may_differ=SFTConfig.MAY_CHANGE_ON_RESUME,
    )
    log_route = route_logs(run_dir, config.verbose)
    own_service = service is None
    try:
        if service is None:
            service = make_service(config.trainer_config(), verbose=config.verbose)
            link_ray_logs(run_dir)
        run = setup(config, service, resume, conversations, eval_conversations, run_config)
        start = resume.step if resume else 0
        echo(
            f"sft: {len(run.datums)} conversations ({len(conversations) - len(run.datums)} "
            f"skipped), {run.total} steps, run dir {run_dir}"
            + (f", resuming at step {start}" if resume else "")
        )
        while True:
            order = _data_order(run, resume)
            with _logger(run, start) as logger:
                try:
                    result = run_steps(run, order, start, logger)
                    break
                except TrainerRestartedError as error:
                    resume = resume_after_restart(run.client, run_dir, error)
                    start = resume.step if resume else 0
        result.resumed_from = start if resume else None
        return result
    finally:
        if own_service and service is not None:
            service.close()
        log_route.close()


def setup(
    config: SFTConfig,
    service: ServiceClient,
    resume: CheckpointRecord | None,
    conversations: list[list[dict[str, Any]]],
    eval_conversations: list[list[dict[str, Any]]],
    run_config: dict[str, Any],
) -> SFTRun:
    """The training client (new, or from the checkpoint resumed) and the rendered data."""
    if resume is None:
        client = service.create_lora_training_client(
            config.base_model, rank=config.rank, seed=config.seed
        )
    else:
        client = service.create_training_client_from_state_with_optimizer(
            resume.state_path, base_model=config.base_model
        )
    from envs.chat import ChatRenderer

    render = functools.partial(
        render_datums,
        renderer=ChatRenderer(client.get_tokenizer()),
        train_on=config.train_on,
        max_length=config.max_length,
    )
    datums = render(conversations, where=config.data)
    eval_datums = render(eval_conversations, where=config.eval_data) if config.eval_data else []
    total = config.num_epochs * (len(datums) // config.batch_size)
    if config.max_steps:
        total = min(total, config.max_steps)
    run_dir = Path(config.log_dir)
    return SFTRun(config, run_dir, run_config, client, datums, eval_datums, total)


def _data_order(run: SFTRun, resume: CheckpointRecord | None) -> DataOrder:
    config = run.config
    state = resume.loop_state if resume else None
    return DataOrder(len(run.datums), config.batch_size, config.seed, state)


def _logger(run: SFTRun, start: int) -> MetricsLogger:
    config = run.config
    return MetricsLogger(
        run.run_dir,
        total_steps=run.total,
        start_step=start,
        wandb_project=config.wandb_project,
        wandb_name=config.wandb_name,
        config=run.run_config,
    )


def _read_file(config: SFTConfig, key: str) -> list[list[dict[str, Any]]]:
    path = getattr(config, key)
    if not Path(path).is_file():
        raise InvalidRequestError(f"{key}={path!r}: no such file")
    return read_chat_jsonl(path)


def run_steps(run: SFTRun, order: DataOrder, start: int, logger: MetricsLogger) -> SFTResult:
    """Steps `start` .. total - 1, `pipeline_depth` submitted ahead of the one awaited."""
    config = run.config
    result = SFTResult(final_step=start)
    pending: deque[_Step] = deque()
    clock = {"start": time.perf_counter(), "last": time.perf_counter()}

    def finish(item: _Step) -> None:
        metrics = _finish_step(item, clock)
        logger.log(item.step, metrics)
        result.history.append({"step": item.step, **metrics})
        result.final_step = item.step + 1
        if item.save is not None:
            record = CheckpointRecord(
                name=f"step-{item.step + 1:06d}",
                step=item.step + 1,
                state_path=item.save.result().path,
                loop_state=item.loop_state,
            )
            # Appended only once the state is on disk (a record never names a partial save)
            # and the step is logged (a run resumed from it has every step's metrics).
            append_checkpoint(run.run_dir, record)
            result.checkpoint = record
        if "eval/loss" in metrics:
            write_run_curves(run.run_dir)

    for step in range(start, run.total):
        pending.append(submit_step(run, order, step))
        while len(pending) > config.pipeline_depth:
            finish(pending.popleft())
    while pending:
        finish(pending.popleft())
    if run.eval_datums:
        # The final eval, logged one step past the last training step.
        eval_metrics = _eval_metrics(_submit_eval(run.client, run.eval_datums, config))
        logger.log(run.total, eval_metrics)
        result.history.append({"step": run.total, **eval_metrics})
    write_run_curves(run.run_dir)
    return result


def submit_step(run: SFTRun, order: DataOrder, step: int) -> _Step:
    """Queues step `step` (its eval first, where one is due) without waiting for it."""
    config, client = run.config, run.client
    evals = None
    if run.eval_datums and config.eval_every and step % config.eval_every == 0:
        evals = _submit_eval(client, run.eval_datums, config)
    indices = order.next_batch()
    batch = [run.datums[i] for i in indices]
    lr = config.learning_rate * lr_multiplier(
        config.lr_schedule, step, run.total, config.warmup_steps, config.min_lr_ratio
    )
    adam = AdamParams(
        learning_rate=lr,
        beta1=config.adam_beta1,
        beta2=config.adam_beta2,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        grad_clip_norm=config.grad_clip_norm,
    )
    # Both go on the client's queue before anything is awaited: they run back to back.
    fwd_bwd = client.forward_backward(mean_per_token(batch), "cross_entropy")
    optim = client.optim_step(adam)
    done = step + 1
    save = None
    if done == run.total or (config.save_every and done % config.save_every == 0):
        # Queued after this step's optim_step and before the next step's forward_backward,
        # so the state saved is exactly the one after `done` steps.
        save = client.save_state(f"step-{done:06d}", overwrite=True)
    tokens = sum(trained_tokens(d) for d in batch)
    return _Step(step, indices, order.epoch, tokens, lr, fwd_bwd, optim, evals, save, order.state())


def _finish_step(item: _Step, clock: dict[str, float]) -> dict[str, Any]:
    """Waits for a submitted step and returns its metrics."""
    metrics: dict[str, Any] = {}
    if item.evals is not None:
        metrics.update(_eval_metrics(item.evals))
    out = item.fwd_bwd.result()
    optim = item.optim.result()
    now = time.perf_counter()
    metrics.update(
        {
            "train/loss": out.metrics["loss:sum"] / max(out.metrics["weights:sum"], 1e-12),
            "train/tokens": item.tokens,
            "train/sequences": len(item.indices),
            "optim/lr": item.learning_rate,
            "optim/grad_norm": (optim.metrics or {}).get("grad_norm:mean", float("nan")),
            "data/epoch": item.epoch,
            "data/batch_indices": item.indices,
            "time/step_s": now - clock["last"],
            "time/elapsed_s": now - clock["start"],
        }
    )
    clock["last"] = now
    return metrics


def _submit_eval(
    client: TrainingClient, eval_datums: list[Datum], config: SFTConfig
) -> list[APIFuture[ForwardBackwardOutput]]:
    size = config.eval_batch_size
    return [
        client.forward(eval_datums[i : i + size], "cross_entropy")
        for i in range(0, len(eval_datums), size)
    ]


def _eval_metrics(futures: list[APIFuture[ForwardBackwardOutput]]) -> dict[str, float]:
    """Mean NLL per trained token over the whole eval set (raw 0/1 weights)."""
    outputs = [f.result() for f in futures]
    loss = sum(o.metrics["loss:sum"] for o in outputs)
    tokens = sum(o.metrics["weights:sum"] for o in outputs)
    return {"eval/loss": loss / max(tokens, 1e-12), "eval/tokens": tokens}


def cli(argv: Sequence[str] | None = None) -> int:
    """`python -m rl.loop.sft key=value ...` / `engineroom-sft`; a bad setting prints one line and
    exits with 2."""
    try:
        main(parse_config(SFTConfig, list(sys.argv[1:] if argv is None else argv)))
    except EngineRoomError as e:
        print(f"rl.loop.sft: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
