"""A two-node Ray cluster on this machine: the trainer pinned to one node, the samplers to the
other by custom resources, and the RL loop (rl.loop.train) running across them.

Two `ray start` processes (a head and a second raylet joining it), each with one CPU and its
own custom resource (`trainer_node`, `sampler_node`), every port chosen free here, the
dashboard off, a fresh auth token (Ray's token authentication is on by default; the shared
~/.ray/auth_token is left alone), and their own temp dir. Teardown ends exactly those
processes: their process groups, then anything still running from their temp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).with_name("ray"))
ROOT = Path(__file__).resolve().parents[1]

# Runs in its own process (the test session's embedded Ray cannot connect elsewhere): the RL
# loop for two steps on the cluster of RAY_ADDRESS, then where each actor ran.
DRIVER = textwrap.dedent(
    """
    import json, sys
    import ray
    from rl.cli import parse_config
    from rl.loop.train import Config, main, service_for

    args = sys.argv[1:]
    service = service_for(parse_config(Config, args))
    trainer = main(args, service=service)

    def node_of(handle):
        return ray.get(handle.__ray_call__.remote(
            lambda _: ray.get_runtime_context().get_node_id()))

    (host,) = service.hosts.values()
    samplers = [h for pool in service.pools.started().values() for h in pool.actor_handles()]
    result = {
        "history": trainer.history,
        "trainer_node": node_of(host.handle),
        "sampler_nodes": [node_of(h) for h in samplers],
        "nodes": {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]},
    }
    service.close()
    print("RESULT " + json.dumps(result))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node_args(temp_dir: str, resource: str) -> list[str]:
    """One CPU, no GPU, one custom resource; every port of the node picked free (two raylets
    on one machine would otherwise collide on Ray's fixed defaults)."""
    ports = {
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--node-manager-port": _free_port(),
        "--object-manager-port": _free_port(),
    }
    return [
        "--num-cpus=1",
        "--num-gpus=0",
        f"--resources={json.dumps({resource: 1})}",
        f"--temp-dir={temp_dir}",
        "--node-ip-address=127.0.0.1",
        f"--object-store-memory={256 * 2**20}",
        "--disable-usage-stats",
        *(f"{flag}={port}" for flag, port in ports.items()),
        "--block",  # stays in the foreground: its process group is the node
    ]


def _stop(processes: list[subprocess.Popen], temp_dir: str) -> None:
    """Ends the nodes' process groups (TERM, then KILL), then any process of this cluster
    that left them (its command line names the cluster's temp dir)."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(p.poll() is None for p in processes):
            time.sleep(0.2)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if temp_dir.encode() in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)


@pytest.fixture
def two_nodes() -> Iterator[dict[str, str]]:
    """(environment for a driver of) a head node with `trainer_node` and a second node with
    `sampler_node`, both on this machine."""
    temp_dir = tempfile.mkdtemp(prefix="er2n-", dir="/tmp")  # short: Ray's socket paths
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    processes: list[subprocess.Popen] = []

    def start(args: list[str], log: str) -> None:
        with open(Path(temp_dir) / log, "w") as out:
            processes.append(
                subprocess.Popen(
                    [RAY, "start", *args],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            )

    try:
        start(
            [
                "--head",
                f"--port={port}",
                f"--ray-client-server-port={_free_port()}",
                f"--dashboard-port={_free_port()}",
                "--include-dashboard=false",
                *_node_args(temp_dir, "trainer_node"),
            ],
            "head.log",
        )
        driver_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
        _wait_for(driver_env, {"trainer_node"}, processes, temp_dir)
        start([f"--address=127.0.0.1:{port}", *_node_args(temp_dir, "sampler_node")], "node.log")
        _wait_for(driver_env, {"trainer_node", "sampler_node"}, processes, temp_dir)
        yield driver_env
    finally:
        _stop(processes, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


# Waits in one process (a Ray connection costs seconds, many more on a loaded machine) until
# the cluster lists the wanted resources.
PROBE = textwrap.dedent(
    """
    import sys, time, ray
    wanted = set(sys.argv[1:])
    while True:
        try:
            ray.init()
            break
        except ConnectionError:  # the head is not up yet
            time.sleep(1)
    while not wanted <= set(ray.cluster_resources()):
        time.sleep(0.5)
    """
)


def _wait_for(
    env: dict[str, str], resources: set[str], processes: list[subprocess.Popen], temp_dir: str
) -> None:
    """Until the cluster lists `resources` (each node's own); raises if a node process ended
    or the cluster is not up within 5 minutes."""
    probe = subprocess.Popen(
        [sys.executable, "-c", PROBE, *sorted(resources)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    try:
        while probe.poll() is None and time.monotonic() < deadline:
            ended = [p for p in processes if p.poll() is not None]
            if ended:
                logs = "".join(f.read_text()[-2000:] for f in Path(temp_dir).glob("*.log"))
                raise RuntimeError(f"a ray start process ended early:\n{logs}")
            time.sleep(0.5)
        if probe.poll() != 0:
            raise TimeoutError(f"the two-node cluster did not come up with {sorted(resources)}")
    finally:
        if probe.poll() is None:
            probe.kill()
            probe.wait()


@pytest.mark.slow
def test_rl_loop_with_trainer_and_samplers_on_two_nodes(two_nodes, tiny_model, tmp_path):
    args = {
        "base_model": tiny_model,
        "env": "examples.custom_env:build_datasets",
        "env_args": "num_test=4",
        "num_steps": 2,
        "groups_per_batch": 2,
        "group_size": 4,
        "max_tokens": 6,
        "rank": 8,
        "learning_rate": 1e-2,
        "remove_constant_groups": False,
        "dynamic_sampling_rounds": 0,  # the same groups on every replay of a step
        "eval_every": 0,
        "save_every": 0,
        "sampler.engine": "torch",
        "trainer.num_threads": 1,
        "sampler.num_threads": 1,
        "trainer.dtype": "float32",
        "trainer.resources": "trainer_node=1",
        "sampler.resources_per_actor": "sampler_node=0.5",
        "log_dir": str(tmp_path / "run"),
    }
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, *(f"{k}={v}" for k, v in args.items())],
        env={**two_nodes, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    nodes = result["nodes"]
    assert len(nodes) == 2
    trainer_node, sampler_nodes = result["trainer_node"], result["sampler_nodes"]
    # Each actor ran on the node that has its custom resource, and those are two nodes.
    assert "trainer_node" in nodes[trainer_node]
    assert sampler_nodes and all("sampler_node" in nodes[n] for n in sampler_nodes)
    assert trainer_node not in sampler_nodes
    # Weights crossed nodes each step (merged syncs, the CPU default), and the sync check
    # (samplers/sync_check.py: sampler vs trainer logprobs of a probe, after every sync) passed.
    history = result["history"]
    assert [step["step"] for step in history] == [0, 1]
    for step in history:
        assert step["sync/logprob_diff_mean"] < 1e-3
        assert abs(step["optim/kl_sample_train_v1"]) < 1e-3
        assert step["optim/grad_norm"] > 0
