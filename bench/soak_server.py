"""A soak of the Tinker server: tenants that train, sample, save, load and walk away, for minutes.

    .venv/bin/python bench/soak_server.py                    # tiny random model, torch sampler, 10 min
    .venv/bin/python bench/soak_server.py duration_s=60      # a quick one
    .venv/bin/python bench/soak_server.py model=SmolLM2-135M-Instruct

One real `python -m rl.server` on loopback (its own --home in a work directory, a key per tenant,
a short --session_timeout_s so that walked-away sessions are really ended during the soak), and
`tenants` processes of the official `tinker` SDK, each running a seeded random mix until the
deadline: create a training client (fresh, or from its last `save_state`), forward_backward of
small (1-4 datums x 16-64 tokens) and large (`large_datums` x `large_tokens`) batches, forward,
optim_step, save_state, load_state_with_optimizer, save_weights_and_get_sampling_client +
sample, save_weights_for_sampler, create_sampling_client of a saved sampler checkpoint (or of the
base model) + sample, unload_model, deleting its older checkpoints, close, and walking away: the
process exits without a word (no close), and the next process of that tenant opens a new session.
A tenant also calls, now and then, a model it unloaded itself (or a sampling client of one): those
calls must fail, and their errors are counted as expected; every other error is unexpected.

Every call is a JSON line in its tenant's log (type, start, latency, ok or error class and
message). The driver weighs the server's process tree (the server, Ray's GCS and raylet, the
trainer and sampler actors: summed RSS, psutil) and times `GET /api/v1/healthz` (a call type of
its own: a blocked event loop shows there) every `memory_every_s`, and reads `GET /metrics` at
the end. Printed, and written as JSON to `out`: requests, errors (expected / unexpected, the
first unexpected ones in full; calls still unanswered when the run ended apart), p50 / p99
latency per call type and per minute, and the tree's memory at the end of the warm-up (the
first `warmup_fraction` of the run) and at the end: the least sample of the run's 15-25% and of
its 90-100%, since a large batch holds gigabytes while it runs and returns them; the drift
between the two, the windows' medians, and the peak. Exit code 1 when there was an unexpected
error or the drift exceeds `max_drift`.

Bounded: tenants stop at the deadline, any still running `grace_s` later are killed, and a wall
alarm ends everything; the server's tree and the tenants are killed by PID at the end, also on
Ctrl-C or failure.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rl.cli import parse_config

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


@dataclass(frozen=True)
class Config:
    model: str = "tiny"
    """"tiny": a random 2-layer Llama (hidden 128, SmolLM2's tokenizer) built in the work
    directory; else a model the server serves (built-in name or local HF directory)"""
    sampler_engine: str = "torch"
    """--sampler.engine: torch | vllm | auto"""
    trainer_dtype: str = "float32"
    """--trainer.dtype"""
    trainer_threads: int = 1
    """--trainer.num_threads"""
    sampler_threads: int = 1
    """--sampler.num_threads"""
    session_timeout_s: float = 60.0
    """--session_timeout_s: a walked-away session is ended this long after its last heartbeat"""
    server_flags: str = "--sampler.sync_mode adapter"
    """more flags for `python -m rl.server`, one string. Adapter mode: every training client's
    synced weights on one LoRA engine. The server's CPU default, merged, starts an engine (a
    Ray actor of 0.25 CPU) per training client that syncs, and on 2 cores only 4 sampler
    actors fit beside the trainer (see bench/README.md)"""
    tenants: int = 8
    """tenant processes at once, each with a key (tenant) of its own"""
    duration_s: float = 600.0
    """how long the tenants run, from when the server is up"""
    warmup_fraction: float = 0.2
    """the share of the run before memory is taken as the baseline"""
    rank: int = 8
    """LoRA rank of the training clients"""
    large_datums: int = 64
    """datums of a large forward_backward"""
    large_tokens: int = 128
    """tokens per datum of a large forward_backward"""
    think_s: float = 1.0
    """mean pause of a tenant between two actions (uniform in 0 - 2x)"""
    call_timeout_s: float = 300.0
    """a call not answered by then is an unexpected error, and its tenant walks away"""
    memory_every_s: float = 5.0
    """seconds between two weighings of the server's process tree"""
    grace_s: float = 120.0
    """after the deadline, how long tenants may finish their last call before they are killed"""
    settle_s: float = 0.0
    """after the tenants end, how long to keep weighing the idle server (walked-away sessions
    end after session_timeout_s)"""
    max_drift: float = 0.10
    """the memory drift (end / warm-up end - 1) above which the soak fails"""
    startup_timeout_s: float = 300.0
    """how long the server may take to start"""
    seed: int = 0
    """seed of the tenants' mixes (tenant i, process g: seed/i/g)"""
    out: str = "bench/results/soak_server.json"
    """where the JSON report goes"""
    work_dir: str = ""
    """the server's home, logs and the tenants' call logs; "" = a new temp directory"""


# Relative weights of a tenant's actions, among those possible at the time (a model to train,
# a checkpoint to load, ...); a tenant with no model creates one.
ACTIONS: dict[str, float] = {
    "create": 3,
    "forward_backward_small": 30,
    "forward_backward_large": 1,  # ~25 s of the trainer on the tiny model: more saturates it
    "forward": 4,
    "optim_step": 15,
    "save_state": 5,
    "load_state": 2,
    "sync_and_sample": 8,
    "save_sampler": 3,
    "sample_saved": 5,
    "sample_base": 2,
    "unload": 2,
    "call_released": 2,
    "close": 1,
    "walk_away": 1,
}
MAX_MODELS = 3  # training clients a tenant's session holds at once
KEEP_CHECKPOINTS = 2  # of each kind per tenant; older ones are deleted
VOCAB = 49_000  # token ids drawn below SmolLM2's vocabulary (49,152)


# -- the tenants ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TenantSpec:
    """What one tenant process needs: who it is, where the server is, when to stop."""

    config: Config
    index: int
    name: str
    key: str
    url: str
    base_model: str
    generation: int
    deadline: float  # time.time()
    work: str

    @property
    def log_path(self) -> Path:
        return Path(self.work) / "tenants" / f"{self.name}.jsonl"

    @property
    def state_path(self) -> Path:
        return Path(self.work) / "tenants" / f"{self.name}.state.json"


@dataclass
class Saved:
    """A tenant's checkpoints (tinker:// paths), kept across its processes."""

    states: list[str] = field(default_factory=list)
    samplers: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Saved:
        return cls(**json.loads(path.read_text())) if path.exists() else cls()

    def store(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, path)


def tenant_main(spec: TenantSpec) -> None:
    """A tenant process: its mix until the deadline, then close; a crash is logged, exit 1."""
    stderr = os.open(
        spec.log_path.with_suffix(".stderr.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND
    )
    os.dup2(stderr, 1)
    os.dup2(stderr, 2)
    try:
        Tenant(spec).run()
    except BaseException as error:  # anything the per-call handling did not catch
        with open(spec.log_path, "a") as log:
            crash = _record(spec.name, spec.generation, "tenant_crash", time.time(), 0.0, error)
            log.write(json.dumps(crash))
            log.write("\n")
        os._exit(1)
    os._exit(0)


def _record(
    who: str, generation: int, call: str, began: float, seconds: float,
    error: BaseException | None, expect_error: bool = False, note: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One call's log line; a timeout is never an expected error."""
    return {
        "tenant": who,
        "gen": generation,
        "call": call,
        "t": began,
        "s": round(seconds, 6),
        "ok": error is None,
        "expect_error": expect_error and not isinstance(error, TimeoutError),
        "error": type(error).__name__ if error is not None else None,
        "message": str(error)[:600] if error is not None else note,
        "cut": False,  # a call still unanswered when the run ended (see Tenant.write)
    }


class Tenant:
    """One tenant's session(s) in one process: a seeded random walk over the SDK's calls."""

    def __init__(self, spec: TenantSpec):
        import tinker

        self.tinker, self.spec, self.config = tinker, spec, spec.config
        self.rng = random.Random(f"{self.config.seed}/{spec.index}/{spec.generation}")
        self.log = open(spec.log_path, "a", buffering=1)  # noqa: SIM115 (the process's life)
        self.saved = Saved.load(spec.state_path)
        self.service = tinker.ServiceClient(base_url=spec.url, api_key=spec.key)
        self.rest = tinker.RestClient(base_url=spec.url, api_key=spec.key)
        self.models: list[Any] = []  # training clients alive
        self.released: list[Any] = []  # training clients this tenant unloaded
        self.synced: dict[str, Any] = {}  # model id -> its last synced sampling client
        self.stepped: set[Any] = set()  # models with no forward_backward since their last step
        self.names = (f"g{spec.generation}-{i}" for i in range(10**9))

    @property
    def end(self) -> float:
        """When the tenant's last calls must be answered: before the driver kills it."""
        return self.spec.deadline + self.config.grace_s - 15

    @property
    def timeout(self) -> float:
        """A call's timeout: `call_timeout_s`, or less near the end, so that a call unanswered
        by then is logged (as cut off at the end) before the driver kills the tenant."""
        return max(1.0, min(self.config.call_timeout_s, self.end - time.time()))

    def run(self) -> None:
        while time.time() < self.spec.deadline:
            action = self.pick()
            getattr(self, f"act_{action}")()
            time.sleep(self.rng.uniform(0, 2 * self.config.think_s))
        self.call("close", lambda: self.service.close("success").result(timeout=self.timeout))

    def pick(self) -> str:
        possible = {
            "create": len(self.models) < MAX_MODELS,
            "load_state": bool(self.saved.states),
            # The server refuses a step with no gradient since the last one.
            "optim_step": any(m not in self.stepped for m in self.models),
            "sample_saved": bool(self.saved.samplers),
            "call_released": bool(self.released),
            "sample_base": True,
            "close": True,
            "walk_away": True,
        }
        if not self.models:
            return "create"
        names = [a for a in ACTIONS if possible.get(a, True)]
        return self.rng.choices(names, [ACTIONS[a] for a in names])[0]

    # -- logging ---------------------------------------------------------------------------

    def write(self, call: str, began: float, seconds: float, error: BaseException | None,
              expect_error: bool = False, note: str | None = None) -> None:  # fmt: skip
        spec = self.spec
        record = _record(
            spec.name, spec.generation, call, began, seconds, error, expect_error, note
        )
        # A timeout at the end is a call the run's end cut off, not one that hung for
        # `call_timeout_s`: counted apart.
        record["cut"] = isinstance(error, TimeoutError) and time.time() >= self.end - 1
        self.log.write(json.dumps(record))
        self.log.write("\n")

    def call(
        self, name: str, fn: Callable[[], Any], expect_error: bool = False
    ) -> tuple[bool, Any]:
        """(ok, result) of `fn()`, logged; a timeout makes the tenant walk away."""
        began, start = time.time(), time.perf_counter()
        try:
            result = fn()
        except Exception as error:
            self.write(name, began, time.perf_counter() - start, error, expect_error)
            if isinstance(error, TimeoutError):
                self.walk_away("after a call timed out")
            return False, None
        self.write(name, began, time.perf_counter() - start, None, expect_error)
        return True, result

    def train_call(self, name: str, client: Any, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """A call on a live training client; one that failed is dropped (the SDK keeps a
        failed client's error for its later calls), so that one error is counted once."""
        ok, result = self.call(name, fn)
        if not ok and client in self.models:
            self.models.remove(client)
        return ok, result

    # -- data ------------------------------------------------------------------------------

    def datums(self, rows: int, length: int) -> list[Any]:
        types = self.tinker.types
        out = []
        for _ in range(rows):
            tokens = [self.rng.randrange(1, VOCAB) for _ in range(length + 1)]
            out.append(
                types.Datum(
                    model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length},
                )
            )
        return out

    def sample(self, sampler: Any, name: str, expect_error: bool = False) -> None:
        """1-4 prompts at once (8-32 tokens, 1-4 samples of 8-32 tokens), each call logged
        with its own latency."""
        types = self.tinker.types
        pending = []
        for _ in range(self.rng.randint(1, 4)):
            prompt = [self.rng.randrange(1, VOCAB) for _ in range(self.rng.randint(8, 32))]
            params = types.SamplingParams(max_tokens=self.rng.randint(8, 32), temperature=1.0)
            began, start = time.time(), time.perf_counter()
            done: dict[str, float] = {}
            try:
                future = sampler.sample(
                    types.ModelInput.from_ints(prompt), self.rng.randint(1, 4), params
                ).future()
            except Exception as refused:
                self.write(name, began, time.perf_counter() - start, refused, expect_error)
                continue
            future.add_done_callback(lambda _, d=done: d.setdefault("t", time.perf_counter()))
            pending.append((began, start, future, done))
        concurrent.futures.wait([f for _, _, f, _ in pending], timeout=self.timeout)
        for began, start, future, done in pending:
            error = future.exception(0) if future.done() else TimeoutError("no answer in time")
            self.write(name, began, done.get("t", time.perf_counter()) - start, error, expect_error)
        if not all(future.done() for _, _, future, _ in pending):
            self.walk_away("after a sample timed out")

    # -- actions ---------------------------------------------------------------------------

    def act_create(self) -> None:
        service, timeout = self.service, self.timeout
        if self.saved.states and self.rng.random() < 0.5:
            path = self.rng.choice(self.saved.states)
            ok, client = self.call(
                "create_training_client_from_state_with_optimizer",
                lambda: service.create_training_client_from_state_with_optimizer(path).result(
                    timeout=timeout
                ),
            )
        else:
            seed = self.rng.randrange(10**6)
            ok, client = self.call(
                "create_lora_training_client",
                lambda: service.create_lora_training_client(
                    self.spec.base_model, rank=self.config.rank, seed=seed
                ).result(timeout=timeout),
            )
        if ok:
            self.models.append(client)
            self.stepped.add(client)

    def act_forward_backward_small(self) -> None:
        client = self.rng.choice(self.models)
        data = self.datums(self.rng.randint(1, 4), self.rng.randint(16, 64))
        self.train_call(
            "forward_backward_small",
            client,
            lambda: client.forward_backward(data, "cross_entropy").result(timeout=self.timeout),
        )
        self.stepped.discard(client)

    def act_forward_backward_large(self) -> None:
        client = self.rng.choice(self.models)
        data = self.datums(self.config.large_datums, self.config.large_tokens)
        self.train_call(
            "forward_backward_large",
            client,
            lambda: client.forward_backward(data, "cross_entropy").result(timeout=self.timeout),
        )
        self.stepped.discard(client)

    def act_forward(self) -> None:
        client = self.rng.choice(self.models)
        data = self.datums(self.rng.randint(1, 4), self.rng.randint(16, 64))
        self.train_call(
            "forward",
            client,
            lambda: client.forward(data, "cross_entropy").result(timeout=self.timeout),
        )

    def act_optim_step(self) -> None:
        client = self.rng.choice([m for m in self.models if m not in self.stepped])
        adam = self.tinker.types.AdamParams(learning_rate=1e-4)
        self.train_call(
            "optim_step", client, lambda: client.optim_step(adam).result(timeout=self.timeout)
        )
        self.stepped.add(client)

    def act_save_state(self) -> None:
        client, name = self.rng.choice(self.models), next(self.names)
        ok, saved = self.train_call(
            "save_state", client, lambda: client.save_state(name).result(timeout=self.timeout)
        )
        if ok:
            self.saved.states.append(saved.path)
            self.trim(self.saved.states)

    def act_load_state(self) -> None:
        client, path = self.rng.choice(self.models), self.rng.choice(self.saved.states)
        self.train_call(
            "load_state_with_optimizer",
            client,
            lambda: client.load_state_with_optimizer(path).result(timeout=self.timeout),
        )
        self.stepped.add(client)  # a load leaves no gradient to step with

    def act_save_sampler(self) -> None:
        client, name = self.rng.choice(self.models), next(self.names)
        ok, saved = self.train_call(
            "save_weights_for_sampler",
            client,
            lambda: client.save_weights_for_sampler(name).result(timeout=self.timeout),
        )
        if ok:
            self.saved.samplers.append(saved.path)
            self.trim(self.saved.samplers)

    def trim(self, paths: list[str]) -> None:
        """Deletes this tenant's checkpoints of one kind past the newest few."""
        while len(paths) > KEEP_CHECKPOINTS:
            delete = self.rest.delete_checkpoint_from_tinker_path(paths.pop(0))
            self.call("delete_checkpoint", functools.partial(delete.result, self.timeout))
        self.saved.store(self.spec.state_path)

    def act_sync_and_sample(self) -> None:
        client = self.rng.choice(self.models)
        ok, sampler = self.train_call(
            "save_weights_and_get_sampling_client",
            client,
            lambda: client.save_weights_and_get_sampling_client().result(timeout=self.timeout),
        )
        if ok:
            self.synced[client.model_id] = sampler
            self.sample(sampler, "sample")

    def act_sample_saved(self) -> None:
        path = self.rng.choice(self.saved.samplers)
        ok, sampler = self.call(
            "create_sampling_client:path",
            lambda: self.service.create_sampling_client(model_path=path).result(
                timeout=self.timeout
            ),
        )
        if ok:
            self.sample(sampler, "sample")

    def act_sample_base(self) -> None:
        ok, sampler = self.call(
            "create_sampling_client:base",
            lambda: self.service.create_sampling_client(base_model=self.spec.base_model).result(
                timeout=self.timeout
            ),
        )
        if ok:
            self.sample(sampler, "sample")

    def act_unload(self) -> None:
        """POST /api/v1/unload_model: the SDK has no call for it."""
        import httpx

        client = self.models.pop(self.rng.randrange(len(self.models)))

        def unload() -> None:
            httpx.post(
                f"{self.spec.url}/api/v1/unload_model",
                json={"model_id": client.model_id},
                headers={"X-API-Key": self.spec.key},
                timeout=self.timeout,
            ).raise_for_status()

        ok, _ = self.call("unload_model", unload)
        if ok:
            self.released = [*self.released[-4:], client]

    def act_call_released(self) -> None:
        """A call on a model this tenant unloaded, or on a sampling client of it: an expected
        error."""
        client = self.rng.choice(self.released)
        sampler = self.synced.get(client.model_id)
        if sampler is not None and self.rng.random() < 0.5:
            self.sample(sampler, "sample:released", expect_error=True)
            return
        data = self.datums(1, 16)
        self.call(
            "forward_backward:released",
            lambda: client.forward_backward(data, "cross_entropy").result(timeout=self.timeout),
            expect_error=True,
        )

    def act_close(self) -> None:
        """Closes the session (its models are released) and opens a new one."""
        self.call("close", lambda: self.service.close("success").result(timeout=self.timeout))
        self.service = self.tinker.ServiceClient(base_url=self.spec.url, api_key=self.spec.key)
        self.models, self.released, self.synced = [], [], {}

    def act_walk_away(self) -> None:
        self.walk_away("")  # on purpose

    def walk_away(self, why: str) -> None:
        """Ends the process without closing the session; the tenant comes back in a new one."""
        self.write("walk_away", time.time(), 0.0, None, note=why or None)
        self.log.close()
        os._exit(0)


# -- the server and its memory --------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(config: Config, work: Path, model: str) -> Server:
    """`python -m rl.server` in a session of its own (so its whole tree can be found and
    killed); returns once it serves."""
    port = free_port()
    log = work / "server.log"
    flags = [
        "--port", str(port), "--home", str(work / "home"),
        "--keys_file", str(work / "keys.json"), "--models", model,
        "--sampler.engine", config.sampler_engine, "--trainer.dtype", config.trainer_dtype,
        "--trainer.num_threads", str(config.trainer_threads),
        "--sampler.num_threads", str(config.sampler_threads),
        "--session_timeout_s", str(config.session_timeout_s),
        *shlex.split(config.server_flags),
    ]  # fmt: skip
    print(f"server: python -m rl.server {shlex.join(flags)}", flush=True)
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "rl.server", *flags],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RAY_ADDRESS": "", "TINKER_TELEMETRY": "0"},
            start_new_session=True,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + config.startup_timeout_s
    while "engineroom Tinker server on" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return server


def server_tree(server: Server) -> list[Any]:
    """The server's process and every process in its session (Ray's GCS, raylet, workers)."""
    import psutil

    sid = server.process.pid
    found = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(sid)
        found = {p.pid: p for p in [root, *root.children(recursive=True)]}
    for pid in psutil.pids():
        with contextlib.suppress(OSError):
            if pid not in found and os.getsid(pid) == sid:
                found[pid] = psutil.Process(pid)
    return list(found.values())


def process_label(process: Any) -> str:
    """A short name: Ray's worker title (`ray::TrainerActor...`) or the command."""
    cmd = process.cmdline() or [process.name()]
    if cmd[0].startswith("ray::"):
        return cmd[0].split(" ")[0][:48]
    if "python" in Path(cmd[0]).name and len(cmd) > 1:
        if cmd[1] == "-m":
            return f"-m {cmd[2]}" if len(cmd) > 2 else cmd[1]
        script = next((w for w in cmd[1:] if not w.startswith("-")), cmd[1])
        return Path(script).name[:48]
    return Path(cmd[0]).name[:48]


def weigh(server: Server) -> tuple[int, dict[str, int]]:
    """(summed RSS of the server's tree, RSS by process label), bytes. Shared pages count
    once per process."""
    import psutil

    total, by_label = 0, collections.Counter[str]()
    for process in server_tree(server):
        try:
            rss = process.memory_info().rss
            label = process_label(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        total += rss
        by_label[label] += rss
    return total, dict(by_label)


def kill_server(server: Server) -> None:
    """SIGINT (Ray shuts down), then SIGKILL by pid to whatever of its tree is left."""
    import psutil

    tree = server_tree(server)
    with contextlib.suppress(ProcessLookupError):
        server.process.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while True:
        left = [p for p in {*tree, *server_tree(server)} if _alive(p)]
        if not left or time.monotonic() > deadline:
            break
        for p in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        time.sleep(0.2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.process.wait(timeout=5)
    if left:
        print(f"warning: processes {[p.pid for p in left]} outlived SIGKILL", flush=True)


def _alive(process: Any) -> bool:
    import psutil

    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def scrape_metrics(url: str) -> dict[str, Any]:
    """The gauges and counters of GET /metrics worth keeping, summed over tenants."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    kept = (
        "engineroom_models_alive", "engineroom_trainer_adapters",
        "engineroom_trainer_adapters_resident", "engineroom_trainer_peak_rss_bytes",
        "engineroom_actor_rss_bytes", "engineroom_errors", "engineroom_models_released",
        "engineroom_calls_queued", "engineroom_limited", "engineroom_futures_pending",
        "engineroom_calls_inflight", "engineroom_calls_waiting", "engineroom_calls",
    )  # fmt: skip
    text = httpx.get(f"{url}/metrics", timeout=60).text
    out: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        if family.name not in kept:
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "tenant")
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] += sample.value
    return dict(sorted(out.items()))


# -- the run --------------------------------------------------------------------------------


@dataclass
class Run:
    """What the driver keeps while the soak runs."""

    started: float  # time.time() when the tenants start
    deadline: float
    specs: list[TenantSpec]
    processes: dict[int, Any] = field(default_factory=dict)  # tenant index -> Process
    generations: int = 0
    crashes: list[str] = field(default_factory=list)
    killed_at_end: int = 0
    memory: list[tuple[float, int, dict[str, int]]] = field(default_factory=list)


def start_tenant(run: Run, index: int, generation: int) -> None:
    spec = dataclasses.replace(run.specs[index], generation=generation)
    run.specs[index] = spec
    process = multiprocessing.get_context("spawn").Process(
        target=tenant_main, args=(spec,), name=spec.name, daemon=True
    )
    process.start()
    run.processes[index] = process
    run.generations += 1


def supervise(config: Config, run: Run, server: Server) -> None:
    """Keeps every tenant running until the deadline (a tenant that walked away comes back in
    a new process), weighs the server's tree, and ends the tenants after the grace."""
    next_weigh = 0.0
    for index in range(len(run.specs)):
        start_tenant(run, index, 0)
    while True:
        now = time.time()
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited:\n{server.log.read_text()[-3000:]}")
        for index, process in list(run.processes.items()):
            if process.is_alive():
                continue
            process.join()
            if process.exitcode != 0:
                run.crashes.append(
                    f"{process.name} gen {run.specs[index].generation}: exit {process.exitcode}"
                )
            del run.processes[index]
            if now < run.deadline - 5:  # not worth a new process in the last seconds
                start_tenant(run, index, run.specs[index].generation + 1)
        if now >= next_weigh:
            total, by_label = weigh(server)
            run.memory.append((now - run.started, total, by_label))
            probe(server)
            next_weigh = now + config.memory_every_s
        if not run.processes or now > run.deadline + config.grace_s:
            break
        time.sleep(0.5)
    run.killed_at_end = stop_tenants(run)


def probe(server: Server) -> None:
    """GET /api/v1/healthz, logged as the driver's call `healthz`: a server whose event loop
    is blocked answers it late or not at all (10 s timeout)."""
    import httpx

    began, start = time.time(), time.perf_counter()
    error: BaseException | None = None
    try:
        httpx.get(f"{server.url}/api/v1/healthz", timeout=10).raise_for_status()
    except Exception as e:
        error = e
    record = _record("driver", 0, "healthz", began, time.perf_counter() - start, error)
    with open(server.log.parent / "tenants" / "driver.jsonl", "a") as log:
        log.write(json.dumps(record) + "\n")


def stop_tenants(run: Run) -> int:
    """SIGKILL by pid to the tenants still running; how many there were."""
    left = [p for p in run.processes.values() if p.is_alive()]
    for process in left:
        process.kill()
    for process in run.processes.values():
        process.join(timeout=10)
    run.processes.clear()
    return len(left)


def settle(config: Config, run: Run, server: Server) -> None:
    """Weighs the idle server for `settle_s` after the tenants ended."""
    end = time.time() + config.settle_s
    while time.time() < end:
        total, by_label = weigh(server)
        run.memory.append((time.time() - run.started, total, by_label))
        time.sleep(config.memory_every_s)


def prepare(config: Config, work: Path) -> tuple[str, list[tuple[str, str]]]:
    """(the model the server serves, [(tenant, key)]): the tiny model is built here."""
    from rl.server.keys import KeyStore

    model = config.model
    if model == "tiny":
        from rl.models import build_tiny_model

        model = build_tiny_model(work / "tiny-model", hidden_size=128)
    keys = KeyStore(work / "keys.json")
    return model, [(f"tenant{i}", keys.add(f"tenant{i}")) for i in range(config.tenants)]


def soak(config: Config, work: Path) -> dict[str, Any]:
    if (work / "tenants").exists():
        raise SystemExit(f"{work} holds an earlier soak's logs; give a new work_dir")
    (work / "tenants").mkdir()
    model, keys = prepare(config, work)
    os.environ["TINKER_TELEMETRY"] = "0"  # the tenants' environment
    server = start_server(config, work, model)
    print(f"server up at {server.url}: {config.tenants} tenants for {config.duration_s:g} s")
    started = time.time()
    deadline = started + config.duration_s
    specs = [
        TenantSpec(config, i, name, key, server.url, model, 0, deadline, str(work))
        for i, (name, key) in enumerate(keys)
    ]
    run = Run(started, deadline, specs)
    try:
        supervise(config, run, server)
        seconds = time.time() - started
        settle(config, run, server)
        try:
            metrics = scrape_metrics(server.url)
        except Exception as error:  # a server that does not answer: reported, not fatal
            metrics = {"error": f"GET /metrics failed: {type(error).__name__}: {error}"}
    finally:
        stop_tenants(run)
        kill_server(server)
    return report(config, run, work, seconds, metrics)


# -- the report -----------------------------------------------------------------------------


def read_calls(work: Path) -> list[dict[str, Any]]:
    calls = []
    for path in sorted((work / "tenants").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line cut off by a kill
                calls.append(json.loads(line))
    return calls


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def unexpected(c: dict[str, Any]) -> bool:
    return not c["ok"] and not c["expect_error"] and not c["cut"]


def call_table(calls: list[dict[str, Any]], minutes: float) -> dict[str, dict[str, Any]]:
    """Per call type: requests, per minute, ok, expected / unexpected errors, calls cut off by
    the end, expected errors that did not happen, p50 / p99 latency of the calls that
    succeeded (ms)."""
    table: dict[str, dict[str, Any]] = {}
    by_call: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for c in calls:
        by_call[c["call"]].append(c)
    for name, rows in sorted(by_call.items()):
        ok_s = [r["s"] for r in rows if r["ok"]]
        table[name] = {
            "requests": len(rows),
            "per_min": round(len(rows) / minutes, 1),
            "ok": len(ok_s),
            "expected_errors": sum(not r["ok"] and r["expect_error"] for r in rows),
            "unexpected_errors": sum(unexpected(r) for r in rows),
            "cut_at_end": sum(r["cut"] for r in rows),
            "expected_error_missing": sum(r["ok"] and r["expect_error"] for r in rows),
            "p50_ms": round(percentile(ok_s, 0.5) * 1000, 1) if ok_s else None,
            "p99_ms": round(percentile(ok_s, 0.99) * 1000, 1) if ok_s else None,
        }
    return table


def by_minute(calls: list[dict[str, Any]], started: float) -> list[dict[str, Any]]:
    """Per minute of the run: requests, unexpected errors, and the p50 / p99 of small
    forward_backward calls and of samples (ms), to see whether latency grows."""
    minutes: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for c in calls:
        minutes[int((c["t"] - started) // 60)].append(c)
    out = []
    for minute, rows in sorted(minutes.items()):
        entry: dict[str, Any] = {
            "minute": minute,
            "requests": len(rows),
            "unexpected": sum(unexpected(r) for r in rows),
        }
        for call in ("forward_backward_small", "sample"):
            s = [r["s"] for r in rows if r["call"] == call and r["ok"]]
            entry[f"{call}_p50_ms"] = round(percentile(s, 0.5) * 1000) if s else None
            entry[f"{call}_p99_ms"] = round(percentile(s, 0.99) * 1000) if s else None
        out.append(entry)
    return out


def memory_summary(config: Config, run: Run) -> dict[str, Any]:
    """The tree's RSS at the warm-up's end and at the end, as the least sample of the run's
    15-25% and 90-100% (the memory held between calls: a large batch holds gigabytes while it
    runs, and returns them), their drift; the medians of those windows, the peak, and RSS by
    process at those two points."""
    d = config.duration_s
    warm_lo, warm_hi = (
        max(0.0, config.warmup_fraction - 0.05) * d,
        (config.warmup_fraction + 0.05) * d,
    )
    in_run = [m for m in run.memory if m[0] <= d]
    warm = [m for m in in_run if warm_lo <= m[0] <= warm_hi] or in_run[:1]
    end = [m for m in in_run if m[0] >= 0.9 * d] or in_run[-1:]
    warm_min, end_min = min(warm, key=lambda m: m[1]), min(end, key=lambda m: m[1])
    peak = max(run.memory, key=lambda m: m[1])

    def by_process(m: tuple[float, int, dict[str, int]]) -> dict[str, float]:
        return {k: round(v / MIB, 1) for k, v in sorted(m[2].items(), key=lambda kv: -kv[1])}

    return {
        "warmup_end_mib": round(warm_min[1] / MIB, 1),
        "end_mib": round(end_min[1] / MIB, 1),
        "drift": round(end_min[1] / warm_min[1] - 1, 4),
        "warmup_end_median_mib": round(statistics.median(m[1] for m in warm) / MIB, 1),
        "end_median_mib": round(statistics.median(m[1] for m in end) / MIB, 1),
        "peak_mib": round(peak[1] / MIB, 1),
        "peak_at_s": round(peak[0], 1),
        "after_settle_mib": round(run.memory[-1][1] / MIB, 1) if config.settle_s else None,
        "by_process_warmup_end": by_process(warm_min),
        "by_process_end": by_process(end_min),
        "by_process_peak": by_process(peak),
        "series_mib": [[round(t, 1), round(total / MIB, 1)] for t, total, _ in run.memory],
    }


def report(
    config: Config, run: Run, work: Path, seconds: float, metrics: dict[str, Any]
) -> dict[str, Any]:
    calls = read_calls(work)
    table = call_table(calls, seconds / 60)
    surprises = [c for c in calls if unexpected(c)]
    memory = memory_summary(config, run)
    failed = bool(surprises or run.crashes) or memory["drift"] > config.max_drift
    return {
        "config": asdict(config),
        "host": host(),
        "work_dir": str(work),
        "duration_s": round(seconds, 1),
        "tenant_processes": run.generations,
        "tenant_crashes": run.crashes,
        "tenants_killed_at_end": run.killed_at_end,
        "requests": sum(t["requests"] for t in table.values()),
        "expected_errors": sum(t["expected_errors"] for t in table.values()),
        "unexpected_errors": len(surprises),
        "cut_at_end": sum(t["cut_at_end"] for t in table.values()),
        "first_unexpected": surprises[:8],
        "calls": table,
        "minutes": by_minute(calls, run.started),
        "memory": memory,
        "metrics": metrics,
        "passed": not failed,
    }


def host() -> dict[str, Any]:
    import psutil

    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        "unknown",
    )  # fmt: skip
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }


def print_report(r: dict[str, Any]) -> None:
    print(f"\nsoak: {r['duration_s']:.0f} s, {r['config']['tenants']} tenants "
          f"({r['tenant_processes']} processes), model {r['config']['model']}, "
          f"{r['host']['cores']} cores, {r['host']['cpu']}")  # fmt: skip
    print(f"{'call':48s} {'requests':>8s} {'/min':>6s} {'ok':>6s} {'exp.err':>7s} "
          f"{'unexp.':>6s} {'cut':>4s} {'p50 ms':>8s} {'p99 ms':>8s}")  # fmt: skip
    for name, t in r["calls"].items():
        p50 = "-" if t["p50_ms"] is None else f"{t['p50_ms']:.0f}"
        p99 = "-" if t["p99_ms"] is None else f"{t['p99_ms']:.0f}"
        print(f"{name:48s} {t['requests']:8d} {t['per_min']:6.1f} {t['ok']:6d} "
              f"{t['expected_errors']:7d} {t['unexpected_errors']:6d} {t['cut_at_end']:4d} "
              f"{p50:>8s} {p99:>8s}")  # fmt: skip
    print(f"requests {r['requests']}, expected errors {r['expected_errors']}, "
          f"unexpected errors {r['unexpected_errors']} (target 0), cut off by the end "
          f"{r['cut_at_end']}, tenant crashes {len(r['tenant_crashes'])}, killed at the end "
          f"{r['tenants_killed_at_end']}")  # fmt: skip
    for c in r["first_unexpected"]:
        print(f"  unexpected: {c['tenant']} {c['call']} {c['error']}: {c['message']}")
    for crash in r["tenant_crashes"]:
        print(f"  crash: {crash}")
    m = r["memory"]
    print(f"server tree RSS (least of each window): warm-up end {m['warmup_end_mib']:,.0f} MiB, "
          f"end {m['end_mib']:,.0f} MiB, drift {m['drift']:+.1%} (target <= "
          f"{r['config']['max_drift']:.0%}); medians {m['warmup_end_median_mib']:,.0f} / "
          f"{m['end_median_mib']:,.0f} MiB; peak {m['peak_mib']:,.0f} MiB at {m['peak_at_s']:.0f} s")  # fmt: skip
    print("per minute (requests, unexpected, forward_backward_small p50/p99 ms, sample p50/p99 ms): "
          + "; ".join(f"{e['requests']} {e['unexpected']} {e['forward_backward_small_p50_ms']}/"
                      f"{e['forward_backward_small_p99_ms']} {e['sample_p50_ms']}/{e['sample_p99_ms']}"
                      for e in r["minutes"]))  # fmt: skip
    if m["after_settle_mib"] is not None:
        print(f"  after settling {r['config']['settle_s']:g} s: {m['after_settle_mib']:,.0f} MiB")
    for point in ("warmup_end", "end", "peak"):
        parts = ", ".join(f"{k} {v:,.0f}" for k, v in list(m[f"by_process_{point}"].items())[:8])
        print(f"  by process at {point.replace('warmup_', 'warm-up ')} (MiB): {parts}")
    print("metrics at the end:")
    for name, value in r["metrics"].items():
        if not name.startswith("engineroom_calls_total"):
            print(f"  {name} {value:g}" if isinstance(value, float) else f"  {name}: {value}")
    print("PASSED" if r["passed"] else "FAILED")


# -- main -----------------------------------------------------------------------------------


@contextlib.contextmanager
def wall_alarm(seconds: float) -> Iterator[None]:
    """Raises TimeoutError in the main thread after `seconds`; SIGTERM raises
    KeyboardInterrupt, so that the cleanup runs either way."""

    def expired(*_: Any) -> None:
        raise TimeoutError(f"the soak ran past its wall deadline ({seconds:.0f} s)")

    def interrupted(*_: Any) -> None:
        raise KeyboardInterrupt

    old_alarm = signal.signal(signal.SIGALRM, expired)
    old_term = signal.signal(signal.SIGTERM, interrupted)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_alarm)
        signal.signal(signal.SIGTERM, old_term)


def main(config: Config) -> int:
    print(f"config: {asdict(config)}", flush=True)
    work = Path(config.work_dir or tempfile.mkdtemp(prefix="soak-server-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work}", flush=True)
    wall = config.startup_timeout_s + config.duration_s + config.grace_s + config.settle_s + 180
    with wall_alarm(wall):
        result = soak(config, work)
    print_report(result)
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"report: {out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(parse_config(Config, sys.argv[1:])))
