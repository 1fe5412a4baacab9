"""A curriculum: a run's training problems move to a harder stage once it solves the current ones.

Once the policy gets most of a level's problems right, most groups come back all right and
teach nothing; dynamic sampling finds the few that still differ by sampling more problems of
the same kind. A curriculum instead makes the problems harder, where groups differ again, at
no extra sampling cost. Stages are `env_args` overrides (`curriculum='level=2;level=3'` for
arithmetic): stage 0 is the run's own `env_args`, stage k > 0 that with the k-th override. The
step after one whose own samples were right at least `curriculum_advance_at` of the time
trains on the next stage; a run never moves back. Held-out evals stay on stage 0's test set,
the task the run is for.

A step's stage follows from the previous step's stage and sampled accuracy alone, so a run's
stages are fixed by what it sampled; the stage of the next step is saved with each checkpoint
and a resumed run goes on from it.
"""

from __future__ import annotations


def next_stage(stage: int, num_stages: int, accuracy: float | None, advance_at: float) -> int:
    """The stage of the step after one at `stage` whose own samples were right `accuracy` of
    the time (None: it has none, e.g. every rollout failed); stages run 0 .. num_stages - 1."""
    if accuracy is not None and accuracy >= advance_at and stage + 1 < num_stages:
        return stage + 1
    return stage
