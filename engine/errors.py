"""Every exception the engine raises, in one module of the standard library alone (as DVC keeps
dvc/exceptions.py): the CLI catches them and prints one line, and catching them loads neither
pydantic nor fsspec. The module that raises one re-exports it (engine.contract.stage.StageError is
what a stage imports). Also the helpers that word config problems."""

from __future__ import annotations

import difflib
from typing import Any


class UsageError(Exception):
    """A command line edgepipe cannot take (an unknown option, a missing value): one line, exit 2."""


class ConfigError(Exception):
    """One or more problems in the composed config; each line names a key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class RemoteError(Exception):
    """The remote cache cannot be used now (unreachable, refused): a runtime failure, one line."""


class PluginError(Exception):
    """A module named in $EDGEPIPE_PLUGINS that cannot be imported."""


class StageError(Exception):
    """A failure a stage explains itself: the message is shown to the user without a traceback.

    Use it for bad input (name the file or the config key and what to do) and for third-party tool
    failures (a short reason plus the path of the log that holds the details).
    """


class Refusal(StageError):
    """A stage declining sound inputs by a rule the user set (package.enforce_targets: a model that
    missed its evaluate targets is not packaged). The run fails, but stages that do not depend on the
    refusing one still run (another package of the same run): their inputs are fine."""


class ComposeError(Exception):
    pass


class UnknownStageType(KeyError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.name = name
        self.known = known


class CorruptEntry(Exception):
    """A cache entry whose files no longer match its manifest."""


class Refused(Exception):
    """A remote entry not taken (malformed, unsigned, too big, a file that differs): warned, computed here."""


class BadSignature(Refused):
    """Signed, but not with this key."""


class NotPushable(Exception):
    """An entry push leaves alone, and why."""


class UnsafeName(ValueError):
    """A name that cannot become a path component (engine.contract.names): the message names it and the rule."""


class RunFolderError(ValueError):
    """A run folder whose run.json or .hydra/ files cannot be read; the message names the file."""


class CompareError(ValueError):
    """Nothing to compare, or a metric that no job has; the message says what to pass instead."""


class DotMissing(FileNotFoundError):
    """`dot` is not installed; the message says how to install it."""


class InitError(ValueError):
    """The folder cannot hold a project (it is a file)."""


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def config_key(spec: Any, field_path: str) -> str:
    """The config key a (dotted) params field comes from: `model.pretrained`, `dataset.path`."""
    head, _, rest = field_path.partition(".")
    if head in spec.entry.with_:
        base = f"pipeline.stages.{spec.name}.with.{head}"
    else:
        base = spec.sections.get(head, f"{spec.section}.{head}")
    return f"{base}.{rest}" if rest else base
