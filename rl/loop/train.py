"""The RL loop's entry point: its config, the run's set-up, and the run to its last step.

    python -m rl.loop.train                    # the tuned preset (the `Config` defaults)
    python -m rl.loop.train env=math_word learning_rate=1e-4 max_steps_off_policy=1
    python -m rl.loop.train trainer.num_gpus=1 sampler.engine=vllm
    python -m rl.loop.train help               # every key, documented

Each step (rl/loop/pipeline.py; the same algorithm written out in one short file, on the client
API alone, is examples/rl_loop.py):

    sample    every group of the batch concurrently with the newest sampling client (rollouts)
    score     advantages = total reward - group mean (datums), optional KL penalty to the base
    train     `num_substeps` x (forward_backward(loss_fn) + optim_step), submitted back to back
    sync      the weights go to the samplers and are checked there (rl/client/weight_sync.py)

On-policy and off-policy share one pipeline: batch j may be sampled with the weights of any step
>= j - `max_steps_off_policy`. With 0 (on-policy) it waits for the previous step's sync; with
k > 0 a producer samples up to k batches ahead while the trainer works, and the loss corrects
the gap through the sampler's logprobs that every datum carries (`importance_sampling`, `ppo`
and `cispo` use the ratio to them). Unlike tinker-cookbook's async mode, no batch is older than
k. Off-policy, the trainer also goes on with the next batch while the samplers load the new
weights; `time/sync_s` is then the time the loop waited for syncs, and `time/sync_hidden_s`
the previous sync's full duration.

The defaults are the preset of rl/loop/config.py (SmolLM2-135M-Instruct on arithmetic).

Held-out eval (temperature `eval_temperature`, 0 = greedy) runs before step 0 (the baseline),
every `eval_every` steps and after the last one. Checkpoints every `save_every` steps hold
weights, optimizer and loop state; a run restarted with the same `log_dir` resumes from the
last one (data position and RNG included), e.g. after kill -9. If the trainer dies mid-run, the
run goes back to its last checkpoint in this process (rl/loop/run_dir.py, `resume_after_restart`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import random
import secrets
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from envs.base import RLDataset
from envs.chat import ChatRenderer
from rl.cli import flat_dict, parse_config
from rl.client.service import ServiceClient, make_service
from rl.client.training import TrainingClient
from rl.console import echo, link_ray_logs, process_age_s, route_logs
from rl.errors import InvalidRequestError, TrainerRestartedError
from rl.loop.config import BUILTIN_ENVS, Config, parse_env_args
from rl.loop.metrics_log import MetricsLogger
from rl.loop.pipeline import Run, run_pipeline
from rl.loop.rollouts import RolloutConfig
from rl.loop.run_dir import (
    CheckpointRecord,
    resume_after_restart,
    rng_from_json,
    start_run,
)
from rl.models import load_tokenizer, resolve_model


def service_for(config: Config) -> ServiceClient:
    """The service a run of `config` uses (Ray from RAY_ADDRESS, else embedded)."""
    trainer, sampler = config.actor_configs()
    return make_service(trainer, sampler, verbose=config.verbose)


# -- datasets ------------------------------------------------------------------------------


def build_datasets(
    config: Config, renderer: ChatRenderer, env_args: dict[str, Any] | None = None
) -> tuple[RLDataset, RLDataset]:
    """The (train, test) datasets the config names (with `env_args` instead of the config's)."""
    target = BUILTIN_ENVS.get(config.env, config.env)
    module_name, _, attr = target.partition(":")
    try:
        fn: Callable[..., Any] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise InvalidRequestError(f"env={config.env!r}: cannot load {target!r}: {e}") from None
    kwargs = parse_env_args(config.env_args) if env_args is None else env_args
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


# -- set-up and run --------------------------------------------------------------------------


def run(config: Config, service: ServiceClient | None = None) -> Run:
    """Runs (or resumes) the loop to `num_steps`; the Run holds its per-step metrics."""
    route = route_logs(Path(config.log_dir), config.verbose)
    own_service = service is None
    state: Run | None = None
    try:
        state, start = setup(config, service)
        service = state.service
        while True:
            try:
                asyncio.run(run_pipeline(state, start))
                return state
            except TrainerRestartedError as error:  # the trainer died: steps were lost
                start = back_to_last_checkpoint(state, error)
    finally:
        if state is not None:
            state.logger.close()
            service = state.service
        if own_service and service is not None:
            service.close()
        route.close()


def setup(config: Config, service: ServiceClient | None) -> tuple[Run, int]:
    """Starts (or reaches) everything a run needs; returns it and the step to start at.

    Ray starts while the tokenizer and the datasets load in a thread (not the other way round:
    Ray's processes die with the thread that started them), and the samplers start while the
    trainer loads: both take seconds to tens of seconds."""
    run_dir = Path(config.log_dir)
    model_dir = resolve_model(config.base_model)  # a bad model name fails first
    startup: dict[str, float] = {}
    with concurrent.futures.ThreadPoolExecutor(1) as threads:
        loading = threads.submit(_load_task, config, model_dir)
        own_service = service is None
        service = service or service_for(config)
        startup["startup/ray_s"] = process_age_s()
        tokenizer, train_stages, test_data = loading.result()
        record = start_run(
            run_dir,
            flat_dict(config),
            on_existing=config.on_existing,
            may_differ=Config.MAY_CHANGE_ON_RESUME,
        )
        startup["startup/setup_s"] = process_age_s()
        if own_service:
            link_ray_logs(run_dir)
        model_id = f"{service.session_id}:train:rl-{secrets.token_hex(4)}"
        sync_mode = None if config.sampler.sync_mode == "auto" else config.sampler.sync_mode
        samplers = threads.submit(service.pools.for_sync, model_dir, model_id, sync_mode)
        # The trainer's errors come first; the samplers' start is awaited after.
        client, rng, start = _training_client(config, service, record, model_id)
        startup["startup/trainer_s"] = process_age_s()
        samplers.result()  # a sampler that cannot start fails the run here
        startup["startup/samplers_s"] = process_age_s()
    state = Run(
        config=config,
        service=service,
        client=client,
        base_client=(
            service.create_sampling_client(base_model=config.base_model)
            if config.kl_penalty_coef > 0
            else None
        ),
        tokenizer=tokenizer,
        train_stages=train_stages,
        test_data=test_data,
        rollout_config=rollout_config(config, client.get_info().model_data.max_context_length),
        run_dir=run_dir,
        rng=rng,
        logger=metrics_logger(config, start),
        sync_mode=sync_mode,
        startup=startup,
        stage=_saved_stage(record, len(train_stages)),
    )
    return state, start


def _training_client(
    config: Config, service: ServiceClient, record: CheckpointRecord | None, model_id: str
) -> tuple[TrainingClient, random.Random, int]:
    """(client, loop RNG, first step): a new adapter, or the checkpoint `record` resumed."""
    if record is None:
        client = service.create_lora_training_client(
            config.base_model,
            rank=config.rank,
            seed=config.seed,
            model_id=model_id,
            train_unembed=config.train_unembed,
        )
        return client, random.Random(config.seed), 0
    client = service.create_training_client_from_state_with_optimizer(
        record.state_path, base_model=config.base_model, model_id=model_id
    )
    echo(f"resuming {config.log_dir} at step {record.step} from {record.state_path}")
    return client, rng_from_json(record.loop_state["rng"]), record.step


def rollout_config(config: Config, model_context: int) -> RolloutConfig:
    """How training rollouts sample: within the model's and the samplers' context."""
    return RolloutConfig(
        max_tokens=config.max_tokens,
        temperature=config.temperature,
        max_context=min(model_context, config.sampler.max_model_len or model_context),
        error_policy=config.error_policy,
        max_retries=config.max_retries,
        timeout_s=config.rollout_timeout_s,
    )


def metrics_logger(config: Config, start: int) -> MetricsLogger:
    """The run's metrics logger from step `start` (it drops records of later steps)."""
    return MetricsLogger(
        Path(config.log_dir),
        total_steps=config.num_steps,
        start_step=start,
        wandb_project=config.wandb_project,
        wandb_name=config.wandb_name,
        config=flat_dict(config),
    )


def back_to_last_checkpoint(state: Run, error: TrainerRestartedError) -> int:
    """After a trainer restart lost steps: the run goes on from its last checkpoint in this
    process, as a new process would resume it (same data order, same RNG)."""
    record = resume_after_restart(state.client, state.run_dir, error)
    if record is None:
        state.rng, start = random.Random(state.config.seed), 0
    else:
        state.rng, start = rng_from_json(record.loop_state["rng"]), record.step
    state.stage = _saved_stage(record, len(state.train_stages))
    state.history = [h for h in state.history if h["step"] < start]
    state.evals = [(step, accuracy) for step, accuracy in state.evals if step < start]
    state.logger.close()
    state.logger = metrics_logger(state.config, start)
    return start


def _saved_stage(record: CheckpointRecord | None, num_stages: int) -> int:
    """The curriculum stage a resumed run goes on at (0 for a new run)."""
    stage = 0 if record is None else int(record.loop_state.get("curriculum_stage", 0))
    if not 0 <= stage < num_stages:
        raise InvalidRequestError(
            f"the checkpoint's curriculum stage {stage} is not one of this run's {num_stages}"
            " stages: resume with the curriculum the run began with"
        )
    return stage


def _load_task(config: Config, model_dir: str) -> tuple[Any, list[RLDataset], RLDataset]:
    """The tokenizer, the training datasets of each curriculum stage (the first is the run's
    own) and the test dataset (which checks the env)."""
    tokenizer = load_tokenizer(model_dir)
    renderer = ChatRenderer(tokenizer)
    train_data, test_data = build_datasets(config, renderer)
    harder = [build_datasets(config, renderer, args)[0] for args in config.curriculum_stages()]
    return tokenizer, [train_data, *harder], test_data


def main(argv: Sequence[str] | None = None, service: ServiceClient | None = None) -> Run:
    config = parse_config(Config, list(sys.argv[1:] if argv is None else argv))
    echo(
        f"rl.loop.train: {config.num_steps} steps of {config.env} ({config.env_args}) on "
        f"{config.base_model}, run dir {config.log_dir} (settings: config.json, logs: logs/)"
    )
    return run(config, service)


def cli(argv: Sequence[str] | None = None) -> int:
    """`python -m rl.loop.train` / `engineroom-train`: a bad setting prints one line, exit 2."""
    try:
        main(argv)
    except InvalidRequestError as error:
        print(f"rl.loop.train: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
