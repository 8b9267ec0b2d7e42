"""The exceptions of the code stages share, in one module of the standard library alone (a decoding
worker imports it without pydantic). Each raising module re-exports its own."""

from __future__ import annotations

from engine.errors import StageError


class ToolkitFailure(Exception):
    def __init__(self, what: str, exc: BaseException | None) -> None:
        super().__init__(what)
        self.what = what
        self.exc = exc
        self.board = False  # set when the call ran against a connected board


class WeightsUnavailable(FileNotFoundError):
    """Published weights that are not on this machine and cannot be fetched now. A FileNotFoundError
    on purpose: raised inside params validation it passes through pydantic, and the command line shows
    it as one line with the exit code of a config error, before anything runs."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: the run diverged."""

    def __init__(self, epoch: int, batch: int, value: float) -> None:
        super().__init__(f"training loss {value} at epoch {epoch}, batch {batch}")
        self.epoch, self.batch, self.value = epoch, batch, value


class StoreError(Exception):
    """A pack this run found could not be read back (removed meanwhile, or the disk failed)."""


class WeightsError(StageError):
    """A weights file that is missing or does not fit the model (the message lists the keys)."""


class WeightsChanged(StageError):
    """A weights file whose bytes are not those the stage's cache key was made from (it changed after
    `run` computed the key): trained on, its outputs would be stored as those of the other bytes."""
