"""A Tinker-compatible HTTP server over engineroom's client: the official `tinker` SDK and
tinker-cookbook run against it unmodified.

    python -m rl.server                       # prints TINKER_BASE_URL and, the first time, a key
    export TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-...
    python my_tinker_script.py                # `import tinker`, unchanged

Layout: `app.py` (the FastAPI app: body limit, error answers), `routes/` (the HTTP routes,
one module per concern: sessions, training, sampling, futures, runs, metrics), `state.py`
(sessions, models, samplers, per-model order), `custom_losses.py` (create_custom_loss graphs,
per session), `lifecycle.py` (sessions ended when their heartbeats stop), `limits.py`
(per-tenant caps), `metrics.py` (`GET /metrics`), `futures.py`
(request futures, seq_id ordering), `store.py` (durable runs and checkpoints, storage caps),
`wire.py` (protobuf and JSON <-> engineroom records), `keys.py` (API keys), `config.py`;
the OpenAI and Anthropic doors: `chat.py` (chat templates, text, tool calls, server-sent
events), `openai_compat.py`, `anthropic_compat.py` (each API's bodies), `inference.py`
(which weights a `model` names, one sampling client per tenant and model).
The training and sampling are the in-process client API's (`rl.ServiceClient`): the server
adds names, order, tenancy and the wire, not a second trainer or sampler.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rl.server.config import ServerConfig

if TYPE_CHECKING:
    from rl.client.service import ServiceClient


def build_service(config: ServerConfig) -> ServiceClient:
    """The ServiceClient the server drives: an embedded Ray, or RAY_ADDRESS's cluster."""
    from rl.client.service import make_service  # Ray: not for `python -m rl.server keys`

    return make_service(config.trainer_config(), config.sampler, verbose=config.verbose)


@dataclass
class RunningServer:
    """A server running on a background thread (tests, benchmarks); `stop()` ends it."""

    url: str
    server: Any
    thread: threading.Thread
    state: Any

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.state.close()


def start_in_thread(config: ServerConfig, service: Any) -> RunningServer:
    """Serves `config` with `service` on a thread; returns once the port is bound."""
    import uvicorn

    from rl.server.app import create_app
    from rl.server.keys import KeyStore
    from rl.server.state import ServerState

    state = ServerState(config, service)
    app = create_app(state, KeyStore(config.resolved_keys_file()))
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=config.port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="engineroom-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {config.host}:{config.port}")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(f"http://{config.host}:{port}", server, thread, state)


__all__ = ["RunningServer", "ServerConfig", "build_service", "start_in_thread"]
