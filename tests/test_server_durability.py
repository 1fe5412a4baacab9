"""What the server's disk holds through `kill -9`, and the per-tenant checkpoint storage cap.

Durability: a real `python -m rl.server` (tiny model, torch sampler, its own --home) is killed
with SIGKILL, its whole process tree with it (the embedded Ray's GCS, raylet and workers), once
while a client trains and once while a client saves without pause, and started again on the
same home. Every checkpoint whose save returned must be listed and load with the loss it had;
no record or keys file may be broken; the key must still work; nothing half-written may be
listed. The fast tests pin the pieces: atomic, fsync'd writes and the repair a store does when
it opens (rl/server/store.py, rl/server/keys.py).

Storage cap: `--max_checkpoint_gib_per_tenant` refuses a save that would take a tenant over it
(rl/server/store.py `check_room`); deleting or expiring checkpoints frees room.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import tinker
from server_process import ROOT, free_port, server_command
from tinker import types

from rl.errors import InvalidRequestError
from rl.server import ServerConfig, build_service, start_in_thread
from rl.server import keys as keys_module
from rl.server import store as store_module
from rl.server.keys import KeyStore
from rl.server.store import GIB, RunRecord, RunStore
from samplers.config import SamplerConfig
from trainers.config import TrainerConfig

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
KIB = 1024

DATUM = types.Datum(
    model_input=types.ModelInput.from_ints([5, 9, 2, 7, 3, 8]),
    loss_fn_inputs={"target_tokens": [9, 2, 7, 3, 8, 4], "weights": [1.0] * 6},
)
PROBE = types.Datum(
    model_input=types.ModelInput.from_ints([1, 2, 3, 4, 5]),
    loss_fn_inputs={"target_tokens": [2, 3, 4, 5, 6], "weights": [1.0] * 5},
)


def record(run_id: str, tenant: str = "alice") -> RunRecord:
    now = time.time()
    return RunRecord(run_id, tenant, "base", 4, {}, None, now, now)


def fake_checkpoint(store: RunStore, run_id: str, checkpoint_id: str, nbytes: int) -> Path:
    """A checkpoint directory of `nbytes` bytes, as the trainer would leave it."""
    local = store.checkpoint_root / run_id.replace(":", "_") / checkpoint_id
    local.mkdir(parents=True, exist_ok=True)
    (local / "adapter_model.safetensors").write_bytes(b"w" * (nbytes - 2))
    (local / "engineroom.json").write_bytes(b"{}")
    return local


def save(store: RunStore, run_id: str, checkpoint_id: str, nbytes: int) -> str:
    fake_checkpoint(store, run_id, checkpoint_id, nbytes)
    kind, name = checkpoint_id.split("/")
    return store.add_checkpoint(run_id, kind, name, None, None)


def listed(store: RunStore, run_id: str, tenant: str = "alice") -> set[str]:
    return {cid for cid, _ in store.checkpoints(store.get(tenant, run_id))}


# -- atomic, durable writes -----------------------------------------------------------------


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """The paths fsync'd from now on."""
    paths: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return paths


def test_keys_file_writes_are_atomic_and_durable(tmp_path, monkeypatch, fsynced):
    keys = KeyStore(tmp_path / "keys.json")
    alice = keys.add("alice")
    assert str(tmp_path) in fsynced  # the rename is durable, not only the bytes
    assert any(p.startswith(str(tmp_path / ".keys.json.")) for p in fsynced)
    before = (tmp_path / "keys.json").read_bytes()

    def cut_off(*args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(keys_module.os, "replace", cut_off)
    with pytest.raises(OSError, match="disk full"):
        keys.add("bob")
    monkeypatch.undo()
    assert (tmp_path / "keys.json").read_bytes() == before  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json"]  # no temp file left
    assert [e.name for e in keys.entries()] == ["alice"]  # memory agrees with the disk
    assert keys.tenant_for(alice) == "alice"
    assert (tmp_path / "keys.json").stat().st_mode & 0o777 == 0o600
    # Another process's change is seen, even within the clock's granularity.
    bob = KeyStore(tmp_path / "keys.json").add("bob")
    assert keys.tenant_for(bob) == "bob"


def test_run_records_and_checkpoints_are_durable_before_a_save_returns(
    tmp_path, monkeypatch, fsynced
):
    store = RunStore(tmp_path / "home", tmp_path / "ckpt")
    store.create(record("s:train:0"))
    local = fake_checkpoint(store, "s:train:0", "weights/a", KIB)
    fsynced.clear()
    store.add_checkpoint("s:train:0", "weights", "a", None, None)
    for path in (
        local / "adapter_model.safetensors",
        local,
        local.parent,  # where the trainer's rename into place is recorded
        local.parent.parent,
        tmp_path / "ckpt",
        tmp_path / "home" / "runs",
    ):
        assert str(path) in fsynced, path
    # The checkpoint's files are on disk before the record that lists it.
    assert fsynced.index(str(local.parent)) < fsynced.index(str(tmp_path / "home" / "runs"))

    on_disk = (tmp_path / "home" / "runs" / "s_train_0.json").read_bytes()

    def cut_off(*args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store_module, "write_atomically", cut_off)
    fake_checkpoint(store, "s:train:0", "weights/b", KIB)
    with pytest.raises(OSError, match="disk full"):
        store.add_checkpoint("s:train:0", "weights", "b", None, None)
    with pytest.raises(OSError, match="disk full"):
        store.delete("alice", "s:train:0", "weights/a")
    monkeypatch.undo()
    assert (tmp_path / "home" / "runs" / "s_train_0.json").read_bytes() == on_disk
    assert listed(store, "s:train:0") == {"weights/a"}  # memory agrees with the disk
    assert local.is_dir()


def test_a_store_opening_after_a_kill_repairs_what_saves_left(tmp_path, caplog):
    home, root = tmp_path / "home", tmp_path / "ckpt"
    store = RunStore(home, root)
    store.create(record("s:train:0"))
    for cid in ("weights/a", "weights/b", "sampler_weights/c"):
        save(store, "s:train:0", cid, KIB)
    run_dir = root / "s_train_0"
    # What kills leave: a half-written save; an overwrite cut off between its two renames;
    # the old copy of an overwrite that finished; a save that finished but was never
    # recorded (its answer never went out); a record write cut off.
    (run_dir / "weights" / ".d.tmp-x1y2").mkdir()
    (run_dir / "weights" / ".d.tmp-x1y2" / "adapter_config.json").write_text("{")
    os.replace(run_dir / "weights" / "b", run_dir / "weights" / ".b.old-4242")
    fake_checkpoint(store, "s:train:0", "sampler_weights/.c.old-17", 10)
    fake_checkpoint(store, "s:train:0", "weights/e", KIB)
    (home / "runs" / ".s_train_0.json.k3j4").write_text('{"run_id": ')
    (home / "runs" / "broken.json").write_text("{not json")

    reopened = RunStore(home, root)
    assert listed(reopened, "s:train:0") == {"weights/a", "weights/b", "sampler_weights/c"}
    assert sorted(p.name for p in (run_dir / "weights").iterdir()) == ["a", "b"]
    assert sorted(p.name for p in (run_dir / "sampler_weights").iterdir()) == ["c"]
    assert (run_dir / "weights" / "b" / "adapter_model.safetensors").stat().st_size == KIB - 2
    assert sorted(p.name for p in (home / "runs").iterdir()) == ["broken.json", "s_train_0.json"]
    # An unreadable record is reported by name and left alone; the other runs are served.
    assert "broken.json" in caplog.text and "not served" in caplog.text
    assert reopened.tenant_bytes("alice") == 3 * KIB


# -- the storage cap ------------------------------------------------------------------------


def test_storage_cap_counts_a_tenants_checkpoints_and_frees_on_delete(tmp_path):
    store = RunStore(tmp_path / "home", tmp_path / "ckpt")
    cap = 2.5 * KIB / GIB
    store.create(record("a:train:0"))
    store.create(record("a:train:1"))
    store.create(record("b:train:0", tenant="bob"))

    def check(run_id: str, cid: str, tenant: str = "alice") -> None:
        kind, name = cid.split("/")
        store.check_room(tenant, run_id, kind, name, cap)

    check("a:train:0", "weights/1")  # nothing used: the first of a run counts as 0
    save(store, "a:train:0", "weights/1", KIB)
    check("a:train:0", "weights/2")  # 1 KiB + about 1 KiB <= 2.5 KiB
    save(store, "a:train:0", "weights/2", KIB)
    assert store.tenant_bytes("alice") == 2 * KIB
    with pytest.raises(InvalidRequestError) as refused:
        check("a:train:0", "weights/3")  # 2 KiB + about 1 KiB > 2.5 KiB
    message = str(refused.value)
    for words in ("'alice'", "2,048 bytes", "1,024 bytes", "--max_checkpoint_gib_per_tenant"):
        assert words in message
    assert "delete_checkpoint_from_tinker_path" in message and "TTL" in message
    check("a:train:0", "weights/2")  # an overwrite frees what it replaces
    check("a:train:1", "sampler_weights/s")  # another run's first: counted as 0
    save(store, "a:train:1", "sampler_weights/s", KIB // 2)
    with pytest.raises(InvalidRequestError):
        check("a:train:1", "sampler_weights/t")
    check("b:train:0", "weights/1", tenant="bob")  # another tenant has room of its own
    with pytest.raises(InvalidRequestError, match="checkpoint name"):
        store.check_room("alice", "a:train:0", "weights", "../escape", cap)
    store.check_room("alice", "a:train:0", "weights", "3", 0)  # 0: no cap

    store.delete("alice", "a:train:0", "weights/1")  # deleting frees room
    assert store.tenant_bytes("alice") == KIB + KIB // 2
    check("a:train:0", "weights/3")
    store.set_ttl("alice", "a:train:1", "sampler_weights/s", 1)  # so does expiry
    time.sleep(1.1)
    assert store.tenant_bytes("alice") == KIB
    # Measured from the files on disk: a restarted server counts the same.
    assert RunStore(tmp_path / "home", tmp_path / "ckpt").tenant_bytes("alice") == KIB


def test_storage_cap_flag_is_checked():
    with pytest.raises(InvalidRequestError, match="max_checkpoint_gib_per_tenant"):
        ServerConfig(max_checkpoint_gib_per_tenant=-1)


@pytest.fixture(scope="module")
def capped(ray_local, tiny_model, tmp_path_factory):
    """An in-process server whose cap is a byte: a tenant's first checkpoint fits, no more."""
    config = ServerConfig(
        port=0,
        home=str(tmp_path_factory.mktemp("capped")),
        models=tiny_model,
        long_poll_s=2.0,
        max_checkpoint_gib_per_tenant=1 / GIB,
        sampler=SamplerConfig(engine="torch", num_threads=1, num_cpus_per_actor=0.05),
        trainer=TrainerConfig(dtype="float32", num_threads=1, num_cpus=0.1),
    )
    keys = KeyStore(config.resolved_keys_file())
    tenants = {"alice": keys.add("alice"), "bob": keys.add("bob")}
    service = build_service(config)
    running = start_in_thread(config, service)
    yield running.url, tenants
    running.stop()
    service.close()


def test_a_save_over_the_cap_is_refused_until_space_is_freed(capped, tiny_model, monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    url, tenants = capped
    alice = tinker.ServiceClient(base_url=url, api_key=tenants["alice"])
    client = alice.create_lora_training_client(tiny_model, rank=4, seed=1).result()
    client.forward_backward([PROBE], "cross_entropy")
    client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    first = client.save_state("first").result().path
    for save_call in (
        lambda: client.save_state("second"),
        lambda: client.save_weights_for_sampler("s"),
    ):
        with pytest.raises(tinker.RequestFailedError, match="max_checkpoint_gib_per_tenant") as e:
            save_call().result()
        assert e.value.category == types.RequestErrorCategory.User
        assert "'alice'" in str(e.value) and "delete_checkpoint_from_tinker_path" in str(e.value)
    rest = tinker.RestClient(base_url=url, api_key=tenants["alice"])
    assert [c.tinker_path for c in rest.list_checkpoints(client.model_id).result().checkpoints] == [
        first
    ]
    # Refused saves changed nothing, and the client trains on.
    client.forward_backward([PROBE], "cross_entropy")
    assert client.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["step:max"] == 2
    bob = tinker.ServiceClient(base_url=url, api_key=tenants["bob"])
    other = bob.create_lora_training_client(tiny_model, rank=4, seed=2).result()
    assert other.save_state("mine").result().path  # bob's room is his own

    rest.delete_checkpoint_from_tinker_path(first).result()
    again = client.save_state("second").result().path
    assert [c.tinker_path for c in rest.list_checkpoints(client.model_id).result().checkpoints] == [
        again
    ]


# -- kill -9 of a real server process --------------------------------------------------------

# A tenant's script; prints one JSON line per event. "train": three steps with a save_state
# after each (and the probe's loss then), a sampler checkpoint, then a step left in flight.
# "save": saves the same state over and over.
CLIENT = """
import json, sys, time, tinker
from tinker import types
url, key, model, mode = sys.argv[1:]
def emit(**event):
    print(json.dumps(event), flush=True)
datum = types.Datum(model_input=types.ModelInput.from_ints([5, 9, 2, 7, 3, 8]),
    loss_fn_inputs={"target_tokens": [9, 2, 7, 3, 8, 4], "weights": [1.0] * 6})
probe = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3, 4, 5]),
    loss_fn_inputs={"target_tokens": [2, 3, 4, 5, 6], "weights": [1.0] * 5})
client = tinker.ServiceClient(base_url=url, api_key=key).create_lora_training_client(
    model, rank=4, seed=1).result()
emit(model_id=client.model_id)
def loss():
    return client.forward([probe], "cross_entropy").result().metrics["loss:sum"]
if mode == "train":
    for step in range(1, 4):
        client.forward_backward([datum], "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        emit(path=client.save_state(f"step-{step}").result().path, loss=loss(), step=step)
    emit(sampler=client.save_weights_for_sampler("last").result().path)
    client.forward_backward([datum], "cross_entropy")
    client.optim_step(types.AdamParams(learning_rate=1e-2))
    emit(training=True)
    time.sleep(600)
else:
    client.forward_backward([datum], "cross_entropy")
    client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    value = loss()
    for i in range(100000):
        emit(path=client.save_state(f"save-{i}").result().path, loss=value, step=1)
"""


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path


def start_server(home: Path, model: str) -> Server:
    """`python -m rl.server` in a session of its own, so its whole tree can be killed."""
    port = free_port()
    log = home / f"server-{port}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            server_command(port, home, model),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RAY_ADDRESS": "", "TINKER_TELEMETRY": "0"},
            start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 180
    while "engineroom Tinker server on" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            kill_tree(process)
            raise AssertionError(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return Server(process, f"http://127.0.0.1:{port}", log)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL to the server's process group and, by pid, to every process it started (the
    embedded Ray's GCS, raylet and workers); returns once none is left."""
    tree = {process.pid}
    with contextlib.suppress(psutil.NoSuchProcess):
        tree |= {p.pid for p in psutil.Process(process.pid).children(recursive=True)}
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30
    while left := [pid for pid in tree | in_session(process.pid) if alive(pid)]:
        assert time.monotonic() < deadline, f"processes {left} outlived SIGKILL"
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def in_session(sid: int) -> set[int]:
    found = set()
    for pid in psutil.pids():
        with contextlib.suppress(OSError):
            if os.getsid(pid) == sid:
                found.add(pid)
    return found


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Client:
    """A tenant's script in a process of its own, its events read as they come."""

    def __init__(self, server: Server, key: str, model: str, mode: str):
        self.process = subprocess.Popen(
            [sys.executable, "-c", CLIENT, server.url, key, model, mode],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=open(server.log.with_suffix(f".{mode}-client.log"), "w"),  # noqa: SIM115
            text=True,
            env={**os.environ, "TINKER_TELEMETRY": "0"},
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stopped = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.events.put(json.loads(line))

    def next(self, timeout: float = 120) -> dict[str, Any]:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the client said nothing for {timeout} s") from None

    def stop(self) -> list[dict[str, Any]]:
        """Ends the client; the events it had sent and no one read."""
        if self.stopped:
            return []
        self.stopped = True
        self.process.kill()
        self.process.wait()
        time.sleep(0.2)  # the reader thread drains the pipe
        return [self.events.get() for _ in range(self.events.qsize())]


def check_disk(home: Path) -> list[Path]:
    """Every run record and the keys file parse; returns what saves left half-written."""
    for path in (home / "runs").glob("*.json"):
        RunRecord.from_json(json.loads(path.read_text()))
    assert json.loads((home / "keys.json").read_text())["keys"]
    return [p for p in (home / "checkpoints").glob("*/*/.*")]


def check_saves(url: str, key: str, model_id: str, saved: dict[str, float]) -> Any:
    """Every save that returned is listed and loads, with the loss it had; whatever else is
    listed (a save whose answer the kill cut off) loads too, with the one loss of a client
    that saved one state over and over. Returns a client resumed from the last save."""
    rest = tinker.RestClient(base_url=url, api_key=key)
    runs = rest.list_training_runs(limit=100).result().training_runs
    assert model_id in {r.training_run_id for r in runs}
    listed = {c.tinker_path for c in rest.list_checkpoints(model_id).result().checkpoints}
    assert set(saved) <= listed, set(saved) - listed
    service = tinker.ServiceClient(base_url=url, api_key=key)
    resumed = {}
    for path in sorted(p for p in listed if "/weights/" in p):
        resumed[path] = service.create_training_client_from_state_with_optimizer(path).result()
        loss = resumed[path].forward([PROBE], "cross_entropy").result().metrics["loss:sum"]
        expected = saved[path] if path in saved else set(saved.values()).pop()
        assert loss == pytest.approx(expected, rel=1e-6), path
    return resumed[list(saved)[-1]]


@pytest.mark.slow
def test_kill_9_keeps_every_save_that_returned(tiny_model, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    key = KeyStore(home / "keys.json").add("alice")
    server = start_server(home, tiny_model)
    clients: list[Client] = []
    try:
        # 1. Killed while training: three saves and a sampler checkpoint returned, a step is
        # in flight.
        clients.append(client := Client(server, key, tiny_model, "train"))
        model_id = client.next(180)["model_id"]
        saved = {e["path"]: e["loss"] for e in (client.next() for _ in range(3))}
        sampler_path = client.next()["sampler"]
        assert client.next()["training"]
        kill_tree(server.process)
        client.stop()
        check_disk(home)
        server = start_server(home, tiny_model)
        assert check_disk(home) == []  # the restart removed whatever a save left
        resumed = check_saves(server.url, key, model_id, saved)
        resumed.forward_backward([DATUM], "cross_entropy")  # at step 3, with its Adam state
        step = resumed.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics
        assert step["step:max"] == 4
        rest = tinker.RestClient(base_url=server.url, api_key=key)  # the same key
        assert rest.get_weights_info_by_tinker_path(sampler_path).result().lora_rank == 4

        # 2. Killed at a random moment of a loop of saves.
        clients.append(client := Client(server, key, tiny_model, "save"))
        model_id = client.next(180)["model_id"]
        saved = {e["path"]: e["loss"] for e in (client.next() for _ in range(2))}
        time.sleep(random.uniform(0.0, 0.5))
        kill_tree(server.process)
        saved |= {e["path"]: e["loss"] for e in client.stop() if "path" in e}
        print("left by the save the kill cut off:", check_disk(home))
        server = start_server(home, tiny_model)
        assert check_disk(home) == []
        check_saves(server.url, key, model_id, saved)
        # Nothing on disk but what is listed: a half-written save is neither.
        listed = tinker.RestClient(base_url=server.url, api_key=key).list_checkpoints(model_id)
        run_dir = home / "checkpoints" / model_id.replace(":", "_")
        assert {f"{p.parent.name}/{p.name}" for p in run_dir.glob("*/*")} == {
            c.checkpoint_id for c in listed.result().checkpoints
        }
    finally:
        kill_tree(server.process)
        for client in clients:
            client.stop()
        for log in sorted(home.glob("*.log")):  # shown when the test fails
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")
