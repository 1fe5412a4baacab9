"""One RL run's steps: sampling, training, weight syncs and held-out evals, pipelined.

`run_pipeline` is a producer and a consumer on one asyncio loop. The producer samples batch j
with the newest sampling client once that client's weights include step j - k or later
(k = `max_steps_off_policy`); the consumer trains each batch (`train_step`), begins the weight
sync, and publishes the new sampling client when the samplers have loaded it. With k = 0 every
batch waits for the previous step's sync (on-policy); with k > 0 sampling runs ahead while the
trainer trains, and the consumer also trains the next batch while the samplers load.

A step's held-out eval (`evaluate`) runs before the next batch starts sampling, not beside it:
the samplers' work is the same either way, and the eval's figure is out sooner.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envs.base import EnvGroupBuilder, RLDataset
from rl.client import weight_sync
from rl.client.sampling import SamplingClient
from rl.client.service import ServiceClient
from rl.client.training import TrainingClient
from rl.client.weight_sync import PendingSync
from rl.console import echo, process_age_s, progress_bar, warn
from rl.loop.config import Config
from rl.loop.curriculum import next_stage
from rl.loop.datums import (
    add_entropy_bonus,
    add_kl_penalty,
    groups_to_datums,
    scale_advantages,
)
from rl.loop.dynamic_sampling import (
    DynamicBatch,
    count_informative,
    extra_batch_index,
    needs_more,
    top_up,
)
from rl.loop.metrics_log import MetricsLogger
from rl.loop.plot import write_run_curves
from rl.loop.rollouts import RolloutBatch, RolloutConfig, run_batch
from rl.loop.run_dir import CheckpointRecord, append_checkpoint, rng_state_to_json, save_state
from rl.loop.step_metrics import accuracy, rollout_metrics, train_metrics
from rl.types import AdamParams, Datum


@dataclass
class Run:
    """Everything one RL run holds between its steps."""

    config: Config
    service: ServiceClient
    client: TrainingClient
    base_client: SamplingClient | None  # the base model, for the KL penalty
    tokenizer: Any
    train_stages: list[RLDataset]  # the training data of each curriculum stage, the run's own first
    test_data: RLDataset
    rollout_config: RolloutConfig
    run_dir: Path
    rng: random.Random
    logger: MetricsLogger
    sync_mode: str | None  # None: the samplers' default
    startup: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # per-step metrics
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out accuracy)
    pending: dict[str, float] = field(default_factory=dict)  # logged with the next step
    stage: int = 0  # the curriculum stage of the step after the last one trained


@dataclass
class Policy:
    """The newest weights the samplers serve: version = optimizer steps they include."""

    client: SamplingClient
    version: int
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    evaluated: asyncio.Event = field(default_factory=asyncio.Event)  # no eval under way

    async def publish(self, pending: PendingSync, version: int) -> SamplingClient:
        """Finishes a sync on the samplers, then lets sampling use it."""
        client = await asyncio.to_thread(weight_sync.finish, pending)
        async with self.changed:
            self.client, self.version = client, version
            self.changed.notify_all()
        return client

    async def fresh_enough(self, step: int, max_steps_off_policy: int) -> SamplingClient:
        """The client to sample batch `step` with, once its weights are recent enough."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.version >= step - max_steps_off_policy)
        await self.evaluated.wait()
        return self.client


async def run_pipeline(run: Run, start: int) -> None:
    """Steps `start` .. num_steps - 1 (plus the baseline eval when starting from 0)."""
    config, t0 = run.config, time.perf_counter()
    policy = Policy(await sync(run), start)
    policy.evaluated.set()
    _report_startup(run)
    if start >= config.num_steps:
        await evaluate(run, start, policy.client, label="final")
        return
    ready: asyncio.Queue[tuple[int, DynamicBatch, int, float]] = asyncio.Queue()
    producer = asyncio.create_task(produce(run, policy, start, ready))
    loading: asyncio.Task | None = None  # a sync still loading on the samplers (off-policy)
    try:
        if start == 0:  # the first batch samples the same weights meanwhile
            await evaluate(run, 0, policy.client, label="baseline")
            run.startup["startup/baseline_done_s"] = process_age_s()
        last_end = time.perf_counter()
        for step in range(start, config.num_steps):
            waiting = time.perf_counter()
            _, batch, version, sample_s = await _next(ready, producer)
            metrics: dict[str, Any] = {"time/wait_sample_s": time.perf_counter() - waiting}
            if config.sampler.sleep_between_rollouts and config.max_steps_off_policy == 0:
                # On-policy: nothing samples until this step's sync, which wakes them.
                await asyncio.to_thread(policy.client.release_memory)
            metrics.update(await train_step(run, step, batch, sample_s))
            metrics.update({k: v for k, v in policy.client.sync_metrics.items() if "sync/" in k})
            loading, new_client = await _sync_step(run, policy, step, loading, metrics)
            now = time.perf_counter()
            metrics.update(_step_clock(run, step, start, version, now - last_end, now - t0))
            metrics["data/problem_ids"] = [builder_id(b) for b in batch.batch.builders]
            metrics["data/batch_index"] = step % len(run.train_stages[batch.stage])
            last_end = now
            await finish_step(run, policy, step, new_client, metrics)
    finally:
        if not producer.done():
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
        if loading is not None:  # cannot be cancelled midway: let it end
            await asyncio.gather(loading, return_exceptions=True)
    echo(f"done: {config.num_steps - start} steps in {time.perf_counter() - t0:.0f}s")


async def produce(
    run: Run, policy: Policy, start: int, ready: asyncio.Queue[tuple[int, DynamicBatch, int, float]]
) -> None:
    """Samples batch after batch, each with weights no older than the staleness bound, each
    from the curriculum stage its predecessor's sampled accuracy chose."""
    stage = run.stage
    for step in range(start, run.config.num_steps):
        client = await policy.fresh_enough(step, run.config.max_steps_off_policy)
        version, began = policy.version, time.perf_counter()
        batch = await sample_batch(run, step, client, stage)
        stage = batch.next_stage
        await ready.put((step, batch, version, time.perf_counter() - began))


async def sample_batch(run: Run, step: int, client: SamplingClient, stage: int = 0) -> DynamicBatch:
    """Step `step`'s groups from curriculum stage `stage`, topped up by at most
    `dynamic_sampling_rounds` extra rounds while fewer than `dynamic_sampling_min_groups` of
    them have rewards that differ (rl/loop/dynamic_sampling.py); with the next step's stage
    (rl/loop/curriculum.py)."""
    config, data = run.config, run.train_stages[stage]
    batch = await run_batch(batch_builders(data, step), client, run.rollout_config)
    sampled = DynamicBatch(
        batch, planned=len(batch.groups), sampled_groups=len(batch.groups), stage=stage
    )
    rounds, cap = config.dynamic_sampling_rounds, config.groups_per_batch
    while sampled.rounds < rounds and needs_more(batch, config.dynamic_sampling_min_groups, cap):
        index = extra_batch_index(step, sampled.rounds, rounds, len(data))
        extra = await run_batch(data.get_batch(index), client, run.rollout_config)
        top_up(batch, extra, cap)
        sampled.rounds += 1
        sampled.sampled_groups += len(extra.groups)
    sampled.next_stage = stage
    if len(run.train_stages) > 1:  # a curriculum: the step's own groups' accuracy decides
        planned = sampled.planned_groups
        sampled.next_stage = next_stage(
            stage,
            len(run.train_stages),
            accuracy(planned) if planned else None,
            config.curriculum_advance_at,
        )
    return sampled


async def _sync_step(
    run: Run, policy: Policy, step: int, loading: asyncio.Task | None, metrics: dict[str, Any]
) -> tuple[asyncio.Task | None, SamplingClient | None]:
    """Begins this step's weight sync; waits for it unless off-policy and no eval follows.
    Returns (the sync still loading, or None; the new client, if it was waited for)."""
    began, done = time.perf_counter(), step + 1
    if loading is not None:  # the previous step's sync (off-policy)
        hidden = (await loading).sync_metrics
        metrics["time/sync_hidden_s"] = hidden.get("time/sync_s", 0.0) + hidden.get(
            "time/sync_verify_s", 0.0
        )
    pending = await asyncio.to_thread(run.client.begin_weight_sync(run.sync_mode).result)
    evaluating = _evaluates_after(run.config, done)
    if evaluating:  # the next batch samples after the eval
        policy.evaluated.clear()
    loading = asyncio.create_task(policy.publish(pending, done))
    new_client = None
    if run.config.max_steps_off_policy == 0 or evaluating:
        new_client, loading = await loading, None
    metrics["time/sync_s"] = time.perf_counter() - began
    return loading, new_client


async def finish_step(
    run: Run, policy: Policy, step: int, new_client: SamplingClient | None, metrics: dict
) -> None:
    """Saves, evaluates and logs step `step` once its sync has begun."""
    config, done = run.config, step + 1
    metrics.update(run.pending)
    run.pending = {}
    saved = None
    if done == config.num_steps or (config.save_every and done % config.save_every == 0):
        saved = await asyncio.to_thread(save, run, done)
    evaluating = _evaluates_after(config, done)
    if evaluating:
        assert new_client is not None
        try:
            metrics.update(await evaluate(run, done, new_client))
        finally:
            policy.evaluated.set()
    run.logger.log(step, metrics)
    run.history.append({"step": step, **metrics})
    if saved is not None:  # after the step's metrics: a resume from it finds them logged
        append_checkpoint(run.run_dir, saved)
    if evaluating:  # the last step evaluates too, so the run ends with its curves
        await asyncio.to_thread(write_run_curves, run.run_dir)


async def train_step(run: Run, step: int, sampled: DynamicBatch, sample_s: float) -> dict[str, Any]:
    """Scores the batch and trains on it: `num_substeps` x (forward_backward + optim_step).
    The `env/` metrics describe the step's own groups, not those dynamic sampling added."""
    config, batch = run.config, sampled.batch
    metrics: dict[str, Any] = {"time/sample_s": sample_s, **batch.metrics()}
    if sampled.planned_groups:
        metrics.update(rollout_metrics(sampled.planned_groups))
        metrics["env/accuracy"] = accuracy(sampled.planned_groups)
    metrics["train/informative_groups"] = float(count_informative(batch.groups))
    if config.dynamic_sampling_rounds:
        metrics.update(sampled.metrics())
    if config.curriculum:
        metrics["curriculum/stage"] = float(sampled.stage)
        if sampled.next_stage != sampled.stage:
            echo(
                f"step {step + 1}: sampled accuracy {metrics.get('env/accuracy', 0):.0%}; the "
                f"next steps train on curriculum stage {sampled.next_stage}"
            )
    run.stage = sampled.next_stage
    for message in batch.errors:
        warn(f"step {step + 1}: dropped a rollout: {message}")
    began = time.perf_counter()
    datums = await score(run, batch, metrics)
    metrics["time/score_s"] = time.perf_counter() - began
    began = time.perf_counter()
    if datums:
        chunks = _split(datums, config.num_substeps)
        informative = int(metrics["train/informative_groups"])
        metrics["optim/lr"] = config.learning_rate_at(step, informative)
        adam = AdamParams(
            learning_rate=metrics["optim/lr"],
            beta2=config.adam_beta2,
            eps=1e-8,
            grad_clip_norm=config.grad_clip_norm,
        )
        # Submit every substep before waiting: the trainer runs them back to back.
        futures = [
            (
                run.client.forward_backward(chunk, config.loss_fn, config.loss_config()),
                run.client.optim_step(adam),
            )
            for chunk in chunks
        ]
        outputs = [await fwd_bwd for fwd_bwd, _ in futures]
        steps = [await optim for _, optim in futures]
        metrics.update(train_metrics(datums, outputs))
        grad_norms = [r.metrics.get("grad_norm:mean", math.nan) for r in steps if r.metrics]
        if grad_norms:
            metrics["optim/grad_norm"] = grad_norms[-1]
    metrics["optim/num_datums"] = float(len(datums))
    metrics["time/train_s"] = time.perf_counter() - began
    tokens = sum(d.model_input.length for d in datums)
    metrics["perf/train_tokens_per_s"] = tokens / max(metrics["time/train_s"], 1e-9)
    return metrics


async def score(run: Run, batch: RolloutBatch, metrics: dict[str, Any]) -> list[Datum]:
    """The batch's datums: group-relative advantages, the KL penalty, the token-mean scale."""
    config = run.config
    datums = groups_to_datums(
        batch.groups,
        normalize_std=config.normalize_advantages,
        remove_constant=config.remove_constant_groups,
    )
    if datums and run.base_client is not None:
        metrics.update(await add_kl_penalty(datums, run.base_client, config.kl_penalty_coef))
    if datums and config.entropy_coef > 0:
        add_entropy_bonus(datums, config.entropy_coef)
    sampled = sum(
        len(t.action_tokens) for g in batch.groups for tr in g.trajectories for t in tr.transitions
    )
    if datums and config.loss_reduction == "token_mean":
        # Over every sampled token, those of skipped constant groups too (as TRL's dapo).
        datums = scale_advantages(datums, 1.0 / sampled)
    metrics["perf/sample_tokens_per_s"] = sampled / max(metrics["time/sample_s"], 1e-9)
    return datums


async def evaluate(
    run: Run, step: int, client: SamplingClient, label: str = "eval"
) -> dict[str, float]:
    """Held-out accuracy of `client` on every test batch."""
    config, began = run.config, time.perf_counter()
    eval_config = dataclasses.replace(
        run.rollout_config, temperature=config.eval_temperature, error_policy="retry"
    )
    builders = [b for i in range(len(run.test_data)) for b in run.test_data.get_batch(i)]
    with progress_bar(len(builders), f"{label} eval", unit="problem") as bar:
        counted = [_Counted(b, bar) for b in builders]
        batch = await run_batch(counted, client, eval_config)
    env_metrics = rollout_metrics(batch.groups)
    metrics = {
        "eval/accuracy": accuracy(batch.groups),
        "eval/reward_mean": env_metrics.get("env/reward_mean", math.nan),
        "eval/num_problems": float(len(builders)),
        "eval/step": float(step),  # the weights measured (logged with the step before)
        "time/eval_s": time.perf_counter() - began,
    }
    if "env/format" in env_metrics:  # the env's format check, where it has one
        metrics["eval/format"] = env_metrics["env/format"]
    run.evals.append((step, metrics["eval/accuracy"]))
    shown = f"accuracy {metrics['eval/accuracy']:.0%}"
    if "eval/format" in metrics:
        shown += f", format {metrics['eval/format']:.0%}"
    echo(
        f"[{label}] after {step} steps: held-out {shown} "
        f"({len(builders)} problems, {metrics['time/eval_s']:.0f}s)"
    )
    if config.log_samples:
        run.logger.log_samples(step, _sample_rows(run, batch, config.log_samples))
    if label == "baseline":  # logged with the first step's metrics
        run.pending = {f"baseline/{k.split('/')[1]}": v for k, v in metrics.items()}
    return metrics


async def sync(run: Run) -> SamplingClient:
    """Pushes the current weights to the samplers; returns the client that samples them."""
    return await run.client.save_weights_and_get_sampling_client_async(sync_mode=run.sync_mode)


def save(run: Run, step: int) -> CheckpointRecord:
    """The state after `step` steps on disk, and its record (with the loop's RNG as of now)."""
    loop_state = {"rng": rng_state_to_json(run.rng), "step": step, "curriculum_stage": run.stage}
    return save_state(run.client, f"step{step:06d}", step, loop_state)


def batch_builders(dataset: RLDataset, step: int) -> list[EnvGroupBuilder]:
    """Step `step`'s batch; the dataset repeats once exhausted."""
    return dataset.get_batch(step % len(dataset))


def builder_id(builder: EnvGroupBuilder) -> int:
    """A short stable id of a group's problem, to log (and test) the data order."""
    problem = getattr(builder, "problem", None) or getattr(builder, "secret", None)
    return zlib.crc32(repr(problem if problem is not None else builder).encode()) % 10**8


def _evaluates_after(config: Config, done: int) -> bool:
    return done == config.num_steps or (config.eval_every > 0 and done % config.eval_every == 0)


def _step_clock(
    run: Run, step: int, start: int, version: int, step_s: float, total_s: float
) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "time/step_s": step_s,
        "time/total_s": total_s,
        "async/staleness": float(step - version),
        "progress/step": float(step),
    }
    if step == start:
        metrics.update(run.startup)
    return metrics


def _report_startup(run: Run) -> None:
    startup = run.startup
    startup["startup/synced_s"] = process_age_s()
    parts = {k.split("/")[1]: v for k, v in startup.items()}
    echo(
        "started: samplers sample {synced_s:.0f}s after the process began (setup "
        "{setup_s:.0f}s, Ray {ray_s:.0f}s, trainer {trainer_s:.0f}s, samplers {samplers_s:.0f}s, "
        "first sync {synced_s:.0f}s)".format(**parts)
    )


def _sample_rows(run: Run, batch: RolloutBatch, n: int) -> list[dict[str, Any]]:
    groups = run.rng.sample(batch.groups, min(n, len(batch.groups)))
    rows = []
    for group in groups:
        trajectory = group.trajectories[0]
        rows.append(
            {
                "prompt": run.tokenizer.decode(trajectory.transitions[0].observation[-60:]),
                "completion": run.tokenizer.decode(trajectory.transitions[-1].action_tokens),
                "reward": group.total_rewards()[0],
            }
        )
    return rows


@dataclass(frozen=True)
class _Counted(EnvGroupBuilder):
    """A group builder that advances a progress bar when its group is scored (evals)."""

    inner: EnvGroupBuilder
    bar: Any

    async def make_envs(self) -> Sequence[Any]:
        return await self.inner.make_envs()

    async def compute_group_rewards(self, trajectories: Sequence[Any], envs: Sequence[Any]) -> Any:
        rewards = await self.inner.compute_group_rewards(trajectories, envs)
        self.bar.update(1)
        return rewards

    def logging_tags(self) -> list[str]:
        return self.inner.logging_tags()


async def _next(queue: asyncio.Queue, producer: asyncio.Task) -> Any:
    """The next sampled batch, or the producer's error if it failed first."""
    getter = asyncio.ensure_future(queue.get())
    await asyncio.wait({getter, producer}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    producer.result()  # raises the rollout error
    raise RuntimeError("the sampling producer stopped early")


def _split(items: list[Datum], n: int) -> list[list[Datum]]:
    size = math.ceil(len(items) / n)
    return [items[i : i + size] for i in range(0, len(items), size)]
