"""The errors the command line turns into one line, and the helpers that word them, in a module of
the standard library alone: catching them loads neither pydantic nor fsspec (config.py, remote.py and
registry.py re-export them)."""

from __future__ import annotations

import difflib
from typing import Any


class ConfigError(Exception):
    """One or more problems in the composed config; each line names a key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class RemoteError(Exception):
    """The remote cache cannot be used now (unreachable, refused): a runtime failure, one line."""


class PluginError(Exception):
    """A module named in $EDGEPIPE_PLUGINS that cannot be imported."""


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
