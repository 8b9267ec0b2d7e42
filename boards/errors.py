"""The exceptions of boards/, in one module (standard library only). Each raising module re-exports
its own."""

from __future__ import annotations


class UnknownBoard(KeyError):
    """UnknownBoard(name, known_names)."""

    def __str__(self) -> str:
        return f"unknown board {self.args[0]!r}; known boards: {', '.join(self.args[1])}"


class GoldenError(ValueError):
    """The inputs cannot give golden samples that belong together (a user wiring error)."""


class EmulationError(Exception):
    """Something the user must install or fix (exit status 2), or a build that failed (1); one line."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status
