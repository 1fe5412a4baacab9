"""Server-side custom losses: `create_custom_loss` stores a traced loss graph per session,
and `forward_backward` with `loss_fn="custom"` and its `loss_id` runs it in the trainer.

A loss is rebuilt once at creation (trainers/custom_graph.py: the allow-list), so a graph
outside it fails there, naming the node. It is kept as plain data and travels with each call
to the trainer as `loss_fn_config = {"name", "inputs", "graph"}` (a few KiB), where it is
rebuilt once and cached by hash. A loss id is `<session>:loss:<custom_loss_seq_id>`; it names
a loss of its tenant's session only: another tenant's id is unknown, and a model of another
session cannot use it. A session's losses go when the session ends.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from tinker import types as tt

from rl.errors import InvalidRequestError, NotFoundError
from rl.server.provenance import session_of
from rl.server.wire import ForwardBackwardCall
from trainers import custom_graph

MAX_LOSSES_PER_SESSION = 256


@dataclass(frozen=True)
class StoredLoss:
    tenant: str
    session_id: str
    config: dict[str, Any]  # the trainer's loss_fn_config: {"name", "inputs", "graph"}


class CustomLosses:
    """The custom losses of every session, by loss id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._losses: dict[str, StoredLoss] = {}

    def create(self, tenant: str, request: tt.CreateCustomLossRequest) -> str:
        """Checks the graph against the allow-list and stores it; its loss id. The same
        request again (a retry) gets the same id."""
        config = {
            "name": request.name,
            "inputs": [i.model_dump(mode="json") for i in request.inputs],
            "graph": request.graph.model_dump(mode="json"),
        }
        custom_graph.build(config["name"], config["inputs"], config["graph"])
        loss_id = f"{request.session_id}:loss:{request.custom_loss_seq_id}"
        with self._lock:
            stored = self._losses.get(loss_id)
            if stored is not None:
                if stored.tenant == tenant and stored.config == config:
                    return loss_id
                raise InvalidRequestError(
                    f"custom_loss_seq_id {request.custom_loss_seq_id} of session "
                    f"{request.session_id!r} names another loss already"
                )
            count = sum(1 for s in self._losses.values() if s.session_id == request.session_id)
            if count >= MAX_LOSSES_PER_SESSION:
                raise InvalidRequestError(
                    f"session {request.session_id!r} has {count} custom losses, this server's "
                    "limit per session"
                )
            self._losses[loss_id] = StoredLoss(tenant, request.session_id, config)
        return loss_id

    def loss_config(self, tenant: str, call: ForwardBackwardCall) -> dict[str, Any] | None:
        """The `loss_fn_config` the trainer gets for `call`: for `custom`, the stored graph of
        its `loss_id`; otherwise the call's own."""
        if call.loss_fn != custom_graph.CUSTOM:
            return call.loss_fn_config
        if call.loss_id is None or call.loss_fn_config:
            raise InvalidRequestError(
                "loss_fn 'custom' takes loss_fn_config {'loss_id': <id>} only, the id that "
                "create_custom_loss returned (forward_backward_custom with its LossHandle)"
            )
        with self._lock:
            stored = self._losses.get(call.loss_id)
        if stored is None or stored.tenant != tenant:
            raise NotFoundError(f"custom loss {call.loss_id!r} not found")
        if session_of(call.model_id) != stored.session_id:
            raise InvalidRequestError(
                f"custom loss {call.loss_id!r} belongs to another session than model "
                f"{call.model_id!r}; create it with that model's ServiceClient"
            )
        return stored.config

    def end_session(self, session_id: str) -> None:
        """Forgets the session's losses."""
        with self._lock:
            for loss_id in [k for k, s in self._losses.items() if s.session_id == session_id]:
                del self._losses[loss_id]
