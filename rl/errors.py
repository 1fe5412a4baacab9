"""Errors raised to the caller. Each says what is wrong and where (datum index, field)."""


class EngineRoomError(Exception):
    """Base class of the errors this project raises on purpose."""


class InvalidRequestError(EngineRoomError, ValueError):
    """The request is malformed; nothing was changed by it."""


class NotFoundError(EngineRoomError, KeyError):
    """An unknown model id, checkpoint or sampler."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class CheckpointError(EngineRoomError, ValueError):
    """A checkpoint that cannot be loaded here (missing, corrupt, or for another model)."""


class WeightSyncError(EngineRoomError, RuntimeError):
    """A weight sync did not take effect: the sampler still answers with other weights."""


class TrainerRankError(EngineRoomError, RuntimeError):
    """A rank of a sharded trainer died, hung, or ended a call otherwise than rank 0 did: the
    group's state is lost, and it is rebuilt as a one-actor trainer is after its death."""

    def __init__(self, rank: int, world_size: int, detail: str):
        self.rank = rank
        self.world_size = world_size
        self.detail = detail
        super().__init__(f"trainer rank {rank} of {world_size} {detail}")

    def __reduce__(self):  # keep the fields through pickling
        return (type(self), (self.rank, self.world_size, self.detail))


class TrainerRestartedError(EngineRoomError, RuntimeError):
    """The trainer actor died and was restarted; this training client was restored to its
    last saved state, and the calls it made since then are lost (they must be redone)."""

    def __init__(self, model_id: str, step: int, lost: list[str], cause: str = ""):
        self.model_id = model_id
        self.step = step
        self.lost = list(lost)
        self.cause = cause  # what died, when known (e.g. "trainer rank 1 of 2 died during ...")
        why = f" ({cause})" if cause else ""
        super().__init__(
            f"the trainer of training client {model_id!r} died{why} and was restarted; the client "
            f"was restored to its last save (step {step}), and {len(lost)} call(s) since then "
            f"were lost: {', '.join(lost)}. Redo them from that state (rl.loop.train and rl.loop.sft "
            "resume from their last checkpoint)."
        )

    def __reduce__(self):  # keep the fields through pickling
        return (type(self), (self.model_id, self.step, self.lost, self.cause))


class TrainerOutOfMemoryError(EngineRoomError, RuntimeError):
    """The trainer ran out of memory during a call (Ray's memory monitor ended its process);
    it was restarted, and the call did not take effect."""

    def __init__(self, what: str):
        super().__init__(
            f"{what}; the machine's memory ran out (another process took it, or the trainer's "
            "estimate was short). The trainer was restarted and the call did not take effect: "
            "retry it, or cap the trainer's memory (trainer.memory_limit_gib)"
        )
