"""Run one stage directly, without Hydra or the cache: for a stage's own unit tests.

    metrics = run_stage("train", {"epochs": 1, ...}, {"data": data_dir}, tmp_path / "train")

Params are validated by the stage's model exactly as the engine does (sections included), so a test
that passes here passes in a pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.config import registry
from engine.contract.stage import Stage, invoke


def validate_params(stage: str | type[Stage], params: Mapping[str, Any]):
    from engine.errors import ConfigError

    cls = registry.get(stage) if isinstance(stage, str) else stage
    p = cls.Params.model_validate(dict(params))
    problems = [f"{field}: {problem}" for field, problem in cls.check(p)]
    if problems:
        raise ConfigError(problems)
    return p


def run_stage(
    stage: str | type[Stage],
    params: Mapping[str, Any],
    inputs: Mapping[str, Path] | None = None,
    out: Path | None = None,
    scratch: Path | None = None,
    sources: Mapping[str, Mapping[str, str]] | None = None,
    content_digests: Mapping[str, str] | None = None,
) -> Mapping[str, Any] | None:
    cls = registry.get(stage) if isinstance(stage, str) else stage
    p = validate_params(cls, params)
    if out is None:
        raise ValueError("out= is required")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    return invoke(cls, p, {k: Path(v) for k, v in (inputs or {}).items()}, out, scratch=scratch, sources=sources or {},
                  content_digests=content_digests or {})
