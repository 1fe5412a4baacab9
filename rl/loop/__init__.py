"""The training loops on the client API: RL (train.py) and supervised fine-tuning (sft.py).

    config.py        the RL loop's Config: its keys and the preset
    train.py         `python -m rl.loop.train`: set-up, and the run to its last step
    pipeline.py      one RL step, held-out evaluation, the bounded-staleness pipeline
    rollouts.py      episodes of an env's groups on a sampling client
    datums.py        trajectories -> datums: advantages, layout, the KL penalty
    step_metrics.py  the metrics of an RL step
    sft.py           `python -m rl.loop.sft`: supervised fine-tuning on chat data
    run_dir.py       a run directory: its config, checkpoint records, resume
    metrics_log.py   metrics.jsonl and W&B
    plot.py          curves.png of one or more runs

They import the client (rl.client), the envs and the actors' configs, never the server.
"""
