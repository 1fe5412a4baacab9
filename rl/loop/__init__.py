"""The training loops on the client API: RL (train.py) and supervised fine-tuning (sft.py).

train.py       `python -m rl.loop.train`: config, set-up, the RL run
pipeline.py    one RL step, held-out evaluation, the bounded-staleness pipeline
rollouts.py    episodes of an env's groups on a sampling client
datums.py      trajectories -> datums: advantages, layout, metrics
sft.py         `python -m rl.loop.sft`: supervised fine-tuning on chat data
run_dir.py     a run directory: its config, checkpoint records, resume
metrics_log.py metrics.jsonl and W&B
plot.py        curves.png of one or more runs
"""
