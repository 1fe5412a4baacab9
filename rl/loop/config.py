"""The RL loop's config: every key of `python -m rl.loop.train`, documented where declared.

The defaults are a preset tuned for SmolLM2-135M-Instruct on a 2-core CPU with vLLM: arithmetic
level 1 (a + b, operands <= 10), 12 groups x 8 samples, 16 tokens, LoRA rank 16, lr 1e-3, ppo,
20 steps. The prompt asks for the equation with its result ("3 + 7 = 10") and the reward weighs
that format as much as the answer (envs/arithmetic.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from rl.errors import InvalidRequestError
from rl.loop.run_dir import checkpoint_root
from rl.loop.schedule import LR_SCHEDULES, lr_multiplier
from samplers.config import SamplerConfig, vllm_lora_rank
from trainers.config import TrainerConfig
from trainers.losses import LOSSES, resolve_config

BUILTIN_ENVS = {
    "arithmetic": "envs.arithmetic:build_datasets",
    "math_word": "envs.math_word:build_datasets",
    "guess_number": "envs.guess_number:build_datasets",
}


def _trainer_preset() -> TrainerConfig:
    return TrainerConfig(dtype="float32", max_tokens_per_batch=2048)


def _sampler_preset() -> SamplerConfig:
    return SamplerConfig(enforce_eager=True, max_model_len=1024, dtype="fast")


@dataclass(frozen=True)
class Config:
    # -- task ------------------------------------------------------------------------------
    env: str = "arithmetic"
    """arithmetic | math_word | guess_number, or 'module:function' returning (train, test)
    datasets; called as fn(renderer, batch_size=, group_size=, seed=, **env_args)"""
    env_args: str = "level=1,num_test=100"
    """extra keyword arguments for the env's build function, 'k=v,k=v' (ints/floats parsed)"""
    base_model: str = "SmolLM2-135M-Instruct"
    """built-in name, local HF directory or hub name"""
    seed: int = 0
    """seed of the data order, the adapter init and the loop's RNG"""
    # -- batch and sampling ---------------------------------------------------------------
    num_steps: int = 20
    """optimizer steps (batches) to run in total"""
    groups_per_batch: int = 12
    """problems per step"""
    group_size: int = 8
    """samples per problem; advantages compare rewards within a group"""
    max_tokens: int = 16
    """most tokens sampled per turn"""
    temperature: float = 1.0
    """sampling temperature of training rollouts"""
    dynamic_sampling_rounds: int = 3
    """DAPO-style dynamic sampling, bounded: while a step's batch holds fewer than
    `dynamic_sampling_min_groups` groups whose rewards differ, sample up to this many extra
    rounds of `groups_per_batch` fresh problems and add their non-constant groups (0 = off).
    Once most groups come back all right (or all wrong), it keeps a step training on several
    groups instead of a full-size update on one or two; each round costs a sampling pass"""
    dynamic_sampling_min_groups: int = 8
    """the non-constant groups a batch should hold before dynamic sampling stops (at most
    `groups_per_batch` count); the batch keeps at most `groups_per_batch` of them"""
    curriculum: str = ""
    """harder training problems once the current ones are solved: stages of env_args
    overrides separated by ';' ('level=2;level=3' for arithmetic). The step after one whose
    own samples were right `curriculum_advance_at` of the time or more trains on the next
    stage's problems; held-out evals stay on env_args's test set (rl/loop/curriculum.py).
    Keeps batches informative without extra sampling passes, but held-out accuracy on an easier
    first stage can fall after a move (docs/rl-loop.md) ('' = off)"""
    curriculum_advance_at: float = 0.9
    """the sampled accuracy of a step that moves the next step to the next curriculum stage"""
    # -- optimisation -----------------------------------------------------------------------
    rank: int = 16
    """LoRA rank"""
    train_unembed: bool = True
    """LoRA on the output head too, besides the 7 linear modules"""
    learning_rate: float = 1e-3
    """AdamW learning rate (the peak, under a schedule)"""
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    """learning rate over the run after warmup: constant, or decaying linearly or by a cosine
    to `min_lr_ratio` x learning_rate at `num_steps` (rl/loop/schedule.py, as rl.loop.sft)"""
    warmup_steps: int = 0
    """steps of linear warmup from learning_rate / warmup_steps (0 = none)"""
    min_lr_ratio: float = 0.0
    """the decayed learning rate at the end of the run, as a fraction of learning_rate"""
    scale_lr_by_signal: bool = False
    """multiply each step's learning rate by the share of the batch's groups whose rewards
    differ (at most groups_per_batch count, so the factor is <= 1). Adam makes a step about
    learning_rate long whatever the gradient's scale, so without it a step trained on 1 group
    moves the adapter as far as one trained on 12. Use it with remove_constant_groups when
    late steps train on a few groups and held-out accuracy dips"""
    adam_beta2: float = 0.95
    """AdamW beta2"""
    grad_clip_norm: float = 1.0
    """clip the gradient to this norm (0 = off)"""
    loss_fn: Literal["importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce"] = (
        "ppo"
    )
    """policy loss (trainers/losses.py); all correct the sampler/trainer gap via logprobs"""
    clip_low: float | None = None
    """ppo/cispo/gspo clip_low_threshold (None = the loss default)"""
    clip_high: float | None = None
    """ppo/cispo/gspo clip_high_threshold (None = the loss default)"""
    dro_beta: float | None = None
    """dro beta (None = the loss default)"""
    loss_reduction: Literal["token_mean", "sum"] = "token_mean"
    """token_mean: the policy loss is divided by the tokens sampled in the batch (as DAPO and
    TRL's loss_type='dapo'); sum: Tinker's summed loss, whose gradient grows with the batch
    (advantages are scaled, so only losses linear in them: not dro)"""
    num_substeps: int = 1
    """optimizer steps per batch (the batch is split into this many)"""
    normalize_advantages: bool = False
    """divide advantages by the group's reward std"""
    remove_constant_groups: bool = True
    """skip groups whose rewards are all equal"""
    kl_penalty_coef: float = 0.0
    """KL penalty to the base model in the advantages (0 = off)"""
    entropy_coef: float = 0.0
    """entropy bonus in the advantages: each sampled token's advantage moves by this times
    its surprisal less the batch's mean (rl/loop/datums.py `add_entropy_bonus`), which slows
    the policy's entropy collapse (0 = off)"""
    max_steps_off_policy: int = 0
    """0: on-policy. k > 0: sample up to k steps ahead while training (off-policy)"""
    # -- eval, logging, checkpoints --------------------------------------------------------
    eval_every: int = 5
    """held-out eval every N steps, plus before the first and after the last"""
    eval_temperature: float = 0.0
    """eval sampling temperature (0 = greedy)"""
    save_every: int = 5
    """checkpoint every N steps (0 = only at the end)"""
    log_dir: str = "runs/rl"
    """run directory: metrics.jsonl, samples, checkpoints"""
    on_existing: Literal["resume", "overwrite", "error"] = "resume"
    """what to do when log_dir holds a run: resume it, start over, or refuse"""
    wandb_project: str = ""
    """W&B project ('' = no W&B)"""
    wandb_name: str = ""
    """W&B run name ('' = the log dir's name)"""
    log_samples: int = 4
    """sample completions logged (samples.jsonl, W&B table) per eval"""
    verbose: bool = False
    """show Ray, vLLM and transformers logs on the console (else under <log_dir>/logs/)"""
    # -- rollout errors ---------------------------------------------------------------------
    error_policy: Literal["fail", "retry", "drop"] = "retry"
    """a failed rollout: fail the run, retry the sample call, or drop it (counted)"""
    max_retries: int = 2
    """sample-call retries per rollout under error_policy=retry"""
    rollout_timeout_s: float = 0.0
    """per sample call (0 = none); a timeout is a failure"""
    # -- the actors -------------------------------------------------------------------------
    trainer: TrainerConfig = field(default_factory=_trainer_preset)
    """the trainer's settings (trainers/config.py); the preset computes in float32 and plans
    model calls of up to 2,048 tokens (~3 GB for SmolLM2). trainer.checkpoint_dir '' = the run
    dir's checkpoints/"""
    sampler: SamplerConfig = field(default_factory=_sampler_preset)
    """the samplers' settings (samplers/config.py); the preset runs vLLM without graph
    compilation (it starts ~1 min sooner on CPU; compiled, it samples ~1.3x faster, which 20
    steps do not win back) with a 1,024-token context, in bfloat16 where that is native
    (dtype 'fast': a GPU, or a CPU with AMX; float32 elsewhere); sampler.max_lora_rank, left
    at its default, fits `rank`"""

    # Keys this config had before the actors' settings became sub-configs.
    RENAMED: ClassVar[dict[str, str]] = {
        "sampler_engine": "sampler.engine",
        "sampler_dtype": "sampler.dtype",
        "sync_mode": "sampler.sync_mode",
        "enforce_eager": "sampler.enforce_eager",
        "max_context": "sampler.max_model_len",
        "sampler_threads": "sampler.num_threads",
        "sampler_num_gpus": "sampler.num_gpus_per_actor",
        "sampler_resources": "sampler.resources_per_actor",
        "sampler_gpu_memory_utilization": "sampler.gpu_memory_utilization",
        "sampler_tensor_parallel_size": "sampler.tensor_parallel_size",
        "sleep_between_rollouts": "sampler.sleep_between_rollouts",
        "trainer_dtype": "trainer.dtype",
        "trainer_threads": "trainer.num_threads",
        "trainer_world_size": "trainer.world_size",
        "trainer_max_tokens": "trainer.max_tokens_per_batch",
        "trainer_num_gpus": "trainer.num_gpus",
        "trainer_resources": "trainer.resources",
        "trainer_placement_strategy": "trainer.placement_strategy",
        "trainer_gradient_checkpointing": "trainer.gradient_checkpointing",
    }
    # Keys that may change when a run resumes: where and how fast it runs, not what it learns.
    MAY_CHANGE_ON_RESUME: ClassVar[tuple[str, ...]] = (
        "num_steps", "eval_every", "save_every", "on_existing", "wandb_project", "wandb_name",
        "log_samples", "error_policy", "max_retries", "rollout_timeout_s", "verbose",
        "trainer.num_threads", "trainer.world_size", "trainer.num_cpus", "trainer.num_gpus",
        "trainer.resources", "trainer.placement_strategy", "trainer.schedule_timeout_s",
        "trainer.max_tokens_per_batch", "trainer.call_overhead_tokens",
        "trainer.gradient_checkpointing", "trainer.logprob_chunk_tokens",
        "sampler.num_threads", "sampler.num_actors", "sampler.num_cpus_per_actor",
        "sampler.num_gpus_per_actor", "sampler.resources_per_actor",
        "sampler.gpu_memory_utilization", "sampler.tensor_parallel_size", "sampler.kv_cache_gib",
        "sampler.sleep_between_rollouts", "sampler.max_restarts", "sampler.max_request_retries",
        "sampler.actor_ready_timeout_s", "sampler.schedule_timeout_s",
    )  # fmt: skip

    def __post_init__(self) -> None:
        for name in ("num_steps", "groups_per_batch", "group_size", "max_tokens", "rank"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name}={getattr(self, name)} must be >= 1")
        non_negative = (
            "temperature", "eval_temperature", "kl_penalty_coef", "entropy_coef",
            "max_steps_off_policy", "eval_every", "save_every", "log_samples", "max_retries",
            "rollout_timeout_s", "grad_clip_norm",
        )  # fmt: skip
        for name in non_negative:
            value = getattr(self, name)
            if not value >= 0 or not math.isfinite(value):
                raise InvalidRequestError(f"{name}={value} must be a finite number >= 0")
        if not (0 < self.learning_rate < 1):
            raise InvalidRequestError(f"learning_rate={self.learning_rate} must be in (0, 1)")
        self._check_schedule_and_sampling()
        if not (1 <= self.num_substeps <= self.groups_per_batch * self.group_size):
            raise InvalidRequestError(f"num_substeps={self.num_substeps} out of range")
        if self.env not in BUILTIN_ENVS and ":" not in self.env:
            raise InvalidRequestError(
                f"env={self.env!r}: expected one of {sorted(BUILTIN_ENVS)} or 'module:function'"
            )
        resolve_config(self.loss_fn, self.loss_config())  # unknown / bad loss keys fail here
        nonlinear = {"dro": "a quadratic term", "stable_reinforce": "a KL term"}
        if self.loss_reduction == "token_mean" and self.loss_fn in nonlinear:
            raise InvalidRequestError(
                "loss_reduction=token_mean scales the advantages, which is the token mean only "
                f"for losses linear in them; {self.loss_fn} has {nonlinear[self.loss_fn]}: use "
                "loss_reduction=sum"
            )
        parse_env_args(self.env_args)
        self.curriculum_stages()

    def _check_schedule_and_sampling(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise InvalidRequestError(
                f"lr_schedule={self.lr_schedule!r}: expected one of {list(LR_SCHEDULES)}"
            )
        if not (0 <= self.warmup_steps < self.num_steps):
            raise InvalidRequestError(
                f"warmup_steps={self.warmup_steps} must be >= 0 and < num_steps={self.num_steps}"
            )
        if not (0 <= self.min_lr_ratio <= 1):
            raise InvalidRequestError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.dynamic_sampling_rounds < 0:
            raise InvalidRequestError(
                f"dynamic_sampling_rounds={self.dynamic_sampling_rounds} must be >= 0"
            )
        if self.dynamic_sampling_min_groups < 1:
            raise InvalidRequestError(
                f"dynamic_sampling_min_groups={self.dynamic_sampling_min_groups} must be >= 1"
            )
        if not (0 <= self.curriculum_advance_at <= 1):
            raise InvalidRequestError(
                f"curriculum_advance_at={self.curriculum_advance_at} must be in [0, 1]"
            )

    def curriculum_stages(self) -> list[dict[str, Any]]:
        """The env_args of each curriculum stage after the first: env_args updated by it."""
        if not self.curriculum.strip():
            return []
        base = parse_env_args(self.env_args)
        stages = []
        for i, part in enumerate(self.curriculum.split(";")):
            stage = parse_env_args(part)
            if not stage:
                raise InvalidRequestError(
                    f"curriculum stage {i + 1} of {self.curriculum!r} is empty"
                )
            stages.append(base | stage)
        return stages

    def learning_rate_at(self, step: int, informative_groups: int | None = None) -> float:
        """The learning rate of optimizer step `step` (0-based) under the schedule; with
        `scale_lr_by_signal`, times min(informative_groups / groups_per_batch, 1)."""
        lr = self.learning_rate * lr_multiplier(
            self.lr_schedule, step, self.num_steps, self.warmup_steps, self.min_lr_ratio
        )
        if self.scale_lr_by_signal and informative_groups is not None:
            lr *= min(informative_groups / self.groups_per_batch, 1.0)
        return lr

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

    def actor_configs(self) -> tuple[TrainerConfig, SamplerConfig]:
        """The trainer's and the samplers' configs as the run uses them: saving into the run
        dir unless told otherwise, LoRA slots that fit `rank` unless told otherwise."""
        trainer, sampler = self.trainer, self.sampler
        if not trainer.checkpoint_dir:
            trainer = dataclasses.replace(
                trainer, checkpoint_dir=str(checkpoint_root(self.log_dir))
            )
        if sampler.max_lora_rank == SamplerConfig.max_lora_rank:
            sampler = dataclasses.replace(sampler, max_lora_rank=vllm_lora_rank(self.rank))
        return trainer, sampler


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
