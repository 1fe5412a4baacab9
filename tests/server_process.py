"""`python -m rl.server` as a real process on loopback, for the tests that drive it with other
programs (tinker-cookbook, lm-evaluation-harness)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int, home: Path, model: str) -> list[str]:
    """`python -m rl.server` on loopback `port`, home `home`, serving `model` with the torch
    sampler and a float32 trainer, one thread each."""
    return [
        sys.executable, "-m", "rl.server", "--port", str(port), "--home", str(home),
        "--models", model, "--sampler.engine", "torch", "--trainer.dtype", "float32",
        "--trainer.num_threads", "1", "--sampler.num_threads", "1",
    ]  # fmt: skip


@contextlib.contextmanager
def server_process(model: str, home: Path) -> Iterator[tuple[str, str]]:
    """A server of `model` (torch sampler, float32) with its home at `home`; yields (base url,
    the API key it printed). Stopped with SIGINT, as a user stops it."""
    port = free_port()
    log = open(home / "server.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        server_command(port, home, model),
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        key = None
        deadline = time.monotonic() + 180
        while key is None:
            assert process.poll() is None, (home / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not start"
            match = re.search(r"TINKER_API_KEY=(tml-\S+)", (home / "server.log").read_text())
            key = match.group(1) if match else None
            time.sleep(0.5)
        assert httpx.get(f"{url}/api/v1/healthz").json() == {"status": "ok"}
        yield url, key
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
