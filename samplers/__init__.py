"""Sampler side: vLLM / torch engines in Ray actors, pools of them, and weight sync checks.

    config.py      SamplerConfig: the one flat config (engine, sizes, actors, sync mode)
    types.py       records between client, pool, actor and engine
    validation.py  a `sample` call checked against the engine's limits
    engine*.py     the engine interface, the vLLM engine and the torch engine
    actor.py       the thin Ray actor around one engine
    pool.py        spreading requests over actors, retries after deaths, weight pushes
    sync.py        the sampler-vs-trainer probe check after each weight sync

The client side is `rl/client/sampling.py`.
"""

from samplers.config import SamplerConfig

__all__ = ["SamplerConfig"]
