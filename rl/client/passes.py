"""Shared passes: the `forward` and `forward_backward` calls that a trainer's clients have
waiting at the same time go to the trainer together, as one pass over the base model.

Each training client runs one call at a time (its ordered queue), so what waits here is at
most one call per client. A dispatcher thread per trainer takes everything waiting, sends it
as one `LoraTrainer.forward_backward_many` (each row of the pass with its own adapter:
trainers/mixed.py) or, when one call waits alone, as that call, and hands each client its
own result. While a pass runs, the next calls gather for the next one, so a small call waits
for at most about one pass, whoever sent the rest.
"""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass, field
from typing import Any

from rl.futures import ray_get
from rl.types import ForwardBackwardOutput
from trainers.mixed import Call


@dataclass
class _Waiting:
    actor: Any
    call: Call
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class SharedPasses:
    """The waiting calls of one trainer, and the thread that sends them in passes."""

    def __init__(self, name: str):
        self._waiting: list[_Waiting] = []
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._dispatch, name=f"passes-{name}", daemon=True)
        self._thread.start()

    def run(self, actor: Any, call: Call) -> ForwardBackwardOutput:
        """`call` on `actor` (a trainer) in the next pass; its result, or its error."""
        waiting = _Waiting(actor, call)
        with self._ready:
            if self._closed:
                raise RuntimeError("the trainer's client side is closed")
            self._waiting.append(waiting)
            self._ready.notify()
        return waiting.future.result()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()

    def _dispatch(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._waiting or self._closed)
                if self._closed and not self._waiting:
                    return
                batch, self._waiting = self._waiting, []
            for actor in {id(w.actor): w.actor for w in batch}.values():
                _send([w for w in batch if w.actor is actor])


def _send(batch: list[_Waiting]) -> None:
    """One pass for `batch` (calls on one actor): each waiter gets its own result."""
    try:
        if len(batch) == 1:
            (only,) = batch
            call = only.call
            method = only.actor.forward_backward if call.backward else only.actor.forward
            results: list[Any] = [
                ray_get(method.remote(call.model_id, call.data, call.loss_fn, call.loss_fn_config))
            ]
        else:
            actor = batch[0].actor
            results = ray_get(actor.forward_backward_many.remote([w.call for w in batch]))
    except BaseException as error:  # the trainer died, or the request did not reach it
        for waiting in batch:
            waiting.future.set_exception(error)
        return
    for waiting, result in zip(batch, results, strict=True):
        if isinstance(result, BaseException):
            waiting.future.set_exception(result)
        else:
            waiting.future.set_result(result)
