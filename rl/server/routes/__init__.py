"""The routes of Tinker's protocol, one `APIRouter` per concern; `create_app` (rl/server/app.py)
mounts each under `/api/v1`. Handlers read the `ServerState` and the `KeyStore` from
`request.app.state`, through the dependencies of `common.py`.

    common.py     the tenant (X-API-Key) and state dependencies, the future answer, JSON bodies
    sessions.py   healthz, client config, sessions, heartbeats, telemetry, server capabilities
    training.py   training models: create, forward_backward, create_custom_loss, optim_step,
                  save, load
    refused.py    the protocol's endpoints this server does not implement: a 400 that says why
    sampling.py   sampling sessions and `asample`
    futures.py    `retrieve_future`: the long poll that answers every future
    runs.py       the REST side: training runs, checkpoints (list, delete, TTL), weights info
    metrics.py    `GET /metrics` (at the root, not under `/api/v1`): Prometheus text
    openai.py     the OpenAI door, under `/oai/api/v1`: chat completions, completions, models
    anthropic.py  the Anthropic door, under `/anthropic/api/v1`: messages, count_tokens
    door.py       what both doors share: the key from `x-api-key` or `Authorization: Bearer`,
                  errors in each API's own shape
"""
