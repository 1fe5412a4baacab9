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
