"""`ray job submit` runs the SFT command on a Ray cluster: a local head on loopback, a tiny job.

Auth: Ray 2.60 turns token auth on by default. The test keeps it on and gives every process
(the head, `ray job submit`, and through the head's environment the job itself) the same
fresh token in RAY_AUTH_MODE=token / RAY_AUTH_TOKEN, so nothing is written to ~/.ray.

The head is stopped by pid, not with `ray stop`, which stops every Ray on the machine: its
processes are the ones whose command line names this test's own --temp-dir, plus their
descendants (workers rename themselves `ray::...`, and the job's driver is a child of one).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from rl.loop.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
PACKAGES = ("rl", "trainers", "samplers", "envs")


def free_ports(n: int) -> list[int]:
    sockets = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def small_working_dir(target: Path, data: Path) -> Path:
    """The packages' sources and one data file: what Ray uploads for the job (~0.5 MB)."""
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(data, target / "train.jsonl")
    return target


def processes_of(temp_dir: Path) -> list[psutil.Process]:
    """This head's processes: those naming its temp dir, and everything they started."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(temp_dir) in part for part in proc.info["cmdline"] or ()):
            found[proc.pid] = proc
            with contextlib.suppress(psutil.NoSuchProcess):
                found.update({c.pid: c for c in proc.children(recursive=True)})
    return list(found.values())


def stop_head(temp_dir: Path) -> None:
    procs = processes_of(temp_dir)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def ray_head() -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray head on 127.0.0.1 with its own temp dir and ports; yields (dashboard url, env)."""
    # Short path: Ray's unix socket paths under it must fit in 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="erj", dir="/tmp"))
    temp_dir = base / "ray"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # The job runs `python` from the head's PATH: make that this venv's.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, agent_http, agent_grpc, metrics, runtime_env, client, node, objects = (
        free_ports(9)
    )
    workers = free_ports(12)
    start = [
        RAY, "start", "--head",
        f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
        f"--ray-client-server-port={client}", f"--node-manager-port={node}",
        f"--object-manager-port={objects}", f"--worker-port-list={','.join(map(str, workers))}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    try:
        started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_head(temp_dir)
        shutil.rmtree(base, ignore_errors=True)
        assert not processes_of(temp_dir), "the Ray head did not stop"


@pytest.mark.slow
def test_sft_runs_as_a_ray_job(ray_head, tiny_model, tmp_path):
    address, env = ray_head
    data = tmp_path / "train.jsonl"
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"Say {i}."},
                {"role": "assistant", "content": f"{i}."},
            ]
        }
        for i in range(8)
    ]
    data.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    work = small_working_dir(tmp_path / "work", data)
    log_dir = tmp_path / "run"  # absolute: the job's working dir is a temporary copy
    submit = [
        RAY, "job", "submit", "--address", address, "--working-dir", str(work), "--",
        "python", "-m", "rl.loop.sft", f"base_model={tiny_model}", "data=train.jsonl",
        f"log_dir={log_dir}", "max_steps=2", "batch_size=2", "rank=4", "max_length=48",
        "save_every=0", "eval_every=0", "trainer.dtype=float32", "trainer.num_threads=1",
    ]  # fmt: skip
    job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=400)
    output = job.stdout + job.stderr
    assert job.returncode == 0, output[-4000:]
    assert "succeeded" in output, output[-4000:]
    assert "sft: 8 conversations" in output  # the job's own log came back

    records = read_metrics(log_dir)
    assert [r["step"] for r in records] == [0, 1]
    assert all(r["train/loss"] > 0 for r in records)
