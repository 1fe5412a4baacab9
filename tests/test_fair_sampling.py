"""Fair turns at the sampler pool: the gate's round-robin and window accounting (plain
asyncio), and a torch-engine pool on the tiny model where one owner's burst does not make
another owner's single request wait behind all of it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import pytest

from rl.types import SamplingParams
from samplers.config import SamplerConfig
from samplers.fair import FairGate
from samplers.pool import SamplerPool, SamplerUnavailableError, submit
from samplers.types import SampleRequest

# -- the gate, without Ray ---------------------------------------------------------------


async def _hold(gate: FairGate, owner: str, units: int, log: list[str], release: asyncio.Event):
    async with gate.turn(owner, units):
        log.append(owner)
        await release.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_waiters_are_let_in_round_robin_across_owners():
    async def main() -> list[str]:
        gate = FairGate(capacity=1)
        log: list[str] = []
        go = asyncio.Event()
        first = asyncio.create_task(_hold(gate, "A", 1, log, go))
        await _settle()
        # Queued while A holds the window: A three more, then B one, then C two.
        waiters = [
            asyncio.create_task(_hold(gate, owner, 1, log, go))
            for owner in ["A", "A", "A", "B", "C", "C"]
        ]
        await _settle()
        assert gate.waiting() == {"A": 3, "B": 1, "C": 2}
        go.set()  # each one leaves as soon as it is in: the order is the gate's alone
        await asyncio.gather(first, *waiters)
        assert gate.used == 0 and gate.waiting() == {}
        return log

    assert asyncio.run(main()) == ["A", "A", "B", "C", "A", "C", "A"]


def test_window_counts_units_and_lets_an_oversized_request_in_alone():
    async def main() -> None:
        gate = FairGate(capacity=4)
        await gate.enter("A", 3)
        await gate.enter("A", 1)  # 3 < 4: room left
        late = asyncio.create_task(gate.enter("B", 1))
        await _settle()
        assert not late.done() and gate.used == 4
        gate.leave(3)
        await _settle()
        assert late.done() and gate.used == 2
        gate.leave(1)
        gate.leave(1)
        await gate.enter("C", 10)  # larger than the window: in, since the window is empty
        blocked = asyncio.create_task(gate.enter("D", 1))
        await _settle()
        assert not blocked.done() and gate.used == 10
        gate.leave(10)
        await blocked
        assert gate.used == 1

    asyncio.run(main())


def test_window_zero_is_no_bound():
    async def main() -> None:
        gate = FairGate(capacity=0)
        for _ in range(1000):
            await gate.enter("A", 64)
        assert gate.used == 64_000 and gate.waiting() == {}

    asyncio.run(main())


def test_units_come_back_on_error_and_on_cancel():
    async def main() -> None:
        gate = FairGate(capacity=1)
        with pytest.raises(ValueError):
            async with gate.turn("A", 1):
                raise ValueError("the actor call failed")
        assert gate.used == 0
        # Cancelled while waiting: leaves its queue, takes nothing.
        await gate.enter("A", 1)
        waiting = asyncio.create_task(gate.enter("B", 1))
        await _settle()
        waiting.cancel()
        await _settle()
        assert waiting.cancelled() and gate.waiting() == {} and gate.used == 1
        # Cancelled just as it was let in (before it ran): its units come back.
        admitted = asyncio.create_task(gate.enter("B", 1))
        behind = asyncio.create_task(gate.enter("C", 1))
        await _settle()
        gate.leave(1)  # lets B in...
        admitted.cancel()  # ...and B is cancelled before it runs
        await _settle()
        assert admitted.cancelled()
        assert behind.done() and gate.used == 1  # B's unit went on to C
        gate.leave(1)
        assert gate.used == 0

    asyncio.run(main())


def test_a_cancelled_waiter_does_not_block_the_next_turn():
    async def main() -> None:
        gate = FairGate(capacity=1)
        await gate.enter("A", 1)
        gone = asyncio.create_task(gate.enter("B", 1))
        nxt = asyncio.create_task(gate.enter("C", 1))
        await _settle()
        gone.cancel()  # cancelled, but not yet run to leave the queue when A leaves
        gate.leave(1)
        await _settle()
        assert nxt.done() and gate.used == 1 and gate.waiting() == {}

    asyncio.run(main())


def test_close_fails_waiters_and_later_callers():
    async def main() -> None:
        gate = FairGate(capacity=1)
        await gate.enter("A", 1)
        waiters = [asyncio.create_task(gate.enter(o, 1)) for o in ["A", "B", "B"]]
        await _settle()
        gate.close(SamplerUnavailableError("pool shut down"))
        for waiter in waiters:
            with pytest.raises(SamplerUnavailableError, match="shut down"):
                await waiter
        with pytest.raises(SamplerUnavailableError):
            await gate.enter("C", 1)
        gate.leave(1)  # the one in flight still gives its units back
        assert gate.used == 0 and gate.waiting() == {}

    asyncio.run(main())


def test_config_window_defaults_per_engine():
    from samplers.types import EngineInfo

    def info(engine, extra):
        return EngineInfo(engine, "m", 10, 10, "float32", "cpu", None, "model", 0, False, 0, extra)

    assert SamplerConfig().resolved_fair_window(info("torch", {})) == 8
    assert SamplerConfig().resolved_fair_window(info("vllm", {"max_num_seqs": 1024})) == 1024
    assert SamplerConfig(fair_window=0).resolved_fair_window(info("vllm", {})) == 0
    with pytest.raises(Exception, match="fair_window"):
        SamplerConfig(fair_window=-1)


# -- a real pool: Ray, the torch engine, the tiny model -----------------------------------

PROMPT = [1, 504, 3458, 314, 4649, 314, 253]


def _request(owner: str, i: int) -> SampleRequest:
    params = SamplingParams(max_tokens=16, seed=i, stop=[])
    return SampleRequest(f"{owner}{i}", PROMPT, 1, params, 16, owner=owner)


def _start_pool(tiny_model: str, window: int) -> SamplerPool:
    config = SamplerConfig(
        engine="torch",
        dtype="float32",
        num_actors=1,
        num_cpus_per_actor=0.05,
        num_threads=1,
        max_model_len=256,
        fair_window=window,
    )
    return SamplerPool(tiny_model, config, enable_lora=False, label=f"fair-{window}").start()


def _finish_order(pool: SamplerPool) -> list[str]:
    """Owner A submits 40 requests at once, then owner B one; the owners in finishing order."""
    done: list[str] = []  # appended on the pool's loop thread, where futures settle
    futures: list[concurrent.futures.Future] = []
    for owner, i in [("A", i) for i in range(40)] + [("B", 0)]:
        future = submit(pool.sample(_request(owner, i)))
        future.add_done_callback(lambda _, o=owner: done.append(o))
        futures.append(future)
    for future in futures:
        assert len(future.result(timeout=120).sequences[0].tokens) == 16
    return done


@pytest.mark.parametrize("window", [None, 0])
def test_one_owners_burst_does_not_hold_back_anothers_request(ray_local, tiny_model, window):
    """With the window (the torch engine's default: 8), B's request waits for about one
    window of A's, so most of A's burst finishes after it; with no window (0), the engine
    serves in arrival order and B's request comes (almost) last: the assertion needs fairness.
    """
    pool = _start_pool(tiny_model, window)
    try:
        order = _finish_order(pool)
        after_b = len(order) - 1 - order.index("B")
        if window is None:
            assert after_b >= 20, order  # 40 - (8 in flight + one turn of A's)
        else:
            assert after_b < 10, order
        assert pool.waiting() == {}
    finally:
        pool.close()


def test_close_fails_the_waiting_requests(ray_local, tiny_model):
    pool = _start_pool(tiny_model, 1)
    futures = [submit(pool.sample(_request("A", i))) for i in range(20)]
    deadline = time.monotonic() + 30
    while not pool.waiting() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.waiting(), "no request waited for its turn"
    pool.close()
    failed = 0
    for future in futures:
        try:
            future.result(timeout=60)
        except SamplerUnavailableError:
            failed += 1
    assert failed >= 10
