"""The in-process client: Tinker's API over Ray actors (`import rl as tinker` reaches it).

    service.py       ServiceClient: connects to Ray, owns the trainer hosts and sampler pools
    trainer_host.py  one trainer actor (or sharded group) per base model, restarted if it dies
    training.py      TrainingClient: one LoRA adapter, its calls in order on its queue
    weight_sync.py   trainer -> samplers: push the weights, check them with a probe
    sampling.py      SamplingClient: samples one set of weights
    pools.py         SamplerPools: the sampler pools of a service, started on first use

Each object is handed what it needs by the one that owns it (the service its hosts and pools,
a training client its host and the pools), never its owner: the arrows run one way.
"""
