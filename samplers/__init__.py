"""Sampler side: vLLM / torch engines in Ray actors, pools of them, and weight sync checks.

    config.py         SamplerConfig: engine, sizes, actors, how weights are synced (sync_mode)
    types.py          records between client, pool, actor and engine
    validation.py     a `sample` call checked against the engine's limits
    engine.py         the engine interface both engines implement, and the factory
    engine_vllm.py    the vLLM engine (vllm_swap.py: whole-layer weight swaps on CPU)
    engine_torch.py   the torch + transformers engine
    engine_choice.py  which engine can serve a model, asked of the installed vLLM
    merge.py          LoRA adapters merged into base weights, sampler-side
    actor.py          the thin Ray actor around one engine
    pool.py           spreading requests over actors, retries after deaths, weight pushes
    sync_check.py     the sync check: sampler vs trainer logprobs of a probe after a weight sync

It imports the ground floor (rl/*.py) only; the client side is rl/client/.
"""

from samplers.config import SamplerConfig

__all__ = ["SamplerConfig"]
