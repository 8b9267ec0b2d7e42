"""Run folders: runs/<date>/<time>_<name>/ with .hydra/, run.json, report.md, report.html and stages/ links."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.contract import names
from engine.errors import RunFolderError as RunFolderError  # re-exported: raised here

RUN_JSON = "run.json"


@dataclass
class StageRecord:
    name: str
    type: str
    status: str = "pending"  # cached | ran | failed | skipped (| pending while running)
    key: str | None = None
    seconds: float = 0.0
    path: str | None = None  # the cache entry (absolute)
    digest: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None  # why it ran / was skipped
    error: str | None = None


@dataclass
class RunRecord:
    name: str
    run_dir: str
    runs_root: str
    started: float = field(default_factory=time.time)
    finished: float | None = None
    status: str = "running"  # running | ok | failed
    overrides: list[str] = field(default_factory=list)
    headline: dict[str, Any] | None = None
    stages: dict[str, StageRecord] = field(default_factory=dict)
    # What `reproduce` needs to explain a miss: the edgepipe that ran, the config search path it
    # composed from ([{provider, path, folder}], the user's folder first) and the folder it ran in
    # (relative paths in the config are read from there). Absent from older records.
    edgepipe_version: str | None = None
    config_sources: list[dict[str, Any]] = field(default_factory=list)
    cwd: str | None = None
    # What the report shows of the config without parsing .hydra/'s YAML: each stage's inputs
    # ({stage: {input: upstream stage}}) and the config group options composed (hydra.runtime.choices).
    # Absent from older records (read from .hydra/ then).
    needs: dict[str, dict[str, str]] | None = None
    choices: dict[str, Any] | None = None

    @property
    def seconds(self) -> float:
        return (self.finished or time.time()) - self.started

    def to_json(self) -> dict:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 3)
        return d

    def save(self) -> None:
        """Atomic write: readers never see a half-written run.json."""
        path = Path(self.run_dir) / RUN_JSON
        tmp = path.with_name(f".{RUN_JSON}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, default=str))
        os.replace(tmp, path)

    @classmethod
    def load(cls, run_dir: Path) -> RunRecord:
        """The record in run_dir/run.json, every field of the type it should be and every name that
        becomes a path (stage names, types, keys) allowed by engine.contract.names; RunFolderError
        naming the file and the field otherwise: the one place a run.json is read."""
        path = Path(run_dir) / RUN_JSON
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
            data.pop("seconds", None)
            raw_stages = data.pop("stages", {})
            _check_fields(data, _RUN_FIELDS, "")
            if not isinstance(raw_stages, dict):
                raise ValueError(f"stages: a JSON {type(raw_stages).__name__}, not an object")
            stages = {}
            for name, raw in raw_stages.items():
                if not isinstance(raw, dict):
                    raise ValueError(f"stages.{name}: a JSON {type(raw).__name__}, not an object")
                _check_fields(raw, _STAGE_FIELDS, f"stages.{name}.")
                for field_name, value in (("", name), ("name", raw["name"]), ("type", raw["type"]),
                                          ("key", raw.get("key"))):
                    why = value is not None and names.problem(value)
                    if why:
                        raise ValueError(f"stages.{name}{'.' + field_name if field_name else ''}: {value!r} "
                                         f"cannot name a folder ({why})")
                stages[name] = StageRecord(**raw)
            return cls(**data, stages=stages)
        except (ValueError, TypeError, AttributeError, RecursionError) as e:  # not JSON, or not a run record
            raise RunFolderError(f"{path} is not an edgepipe run record ({type(e).__name__}: {e}); "
                                 f"was it edited by hand?") from None


# The type each field of run.json must have (the dataclasses' annotations, checked on read: a record is
# read from a folder anyone may have edited or copied): (types, required).
_NUMBER, _TEXT, _NONE = (int, float), (str,), (type(None),)
_LAST_TIME = 1e11  # started/finished: seconds since 1970, up to the year 5138 (time.localtime takes them)
_RUN_FIELDS = {"name": (_TEXT, True), "run_dir": (_TEXT, True), "runs_root": (_TEXT, True),
               "started": (_NUMBER, False), "finished": (_NUMBER + _NONE, False), "status": (_TEXT, False),
               "overrides": ((list,), False), "headline": ((dict, type(None)), False),
               "edgepipe_version": (_TEXT + _NONE, False), "config_sources": ((list,), False),
               "cwd": (_TEXT + _NONE, False), "needs": ((dict, type(None)), False),
               "choices": ((dict, type(None)), False)}
_STAGE_FIELDS = {"name": (_TEXT, True), "type": (_TEXT, True), "status": (_TEXT, False),
                 "key": (_TEXT + _NONE, False), "seconds": (_NUMBER, False), "path": (_TEXT + _NONE, False),
                 "digest": (_TEXT + _NONE, False), "metrics": ((dict,), False), "reason": (_TEXT + _NONE, False),
                 "error": (_TEXT + _NONE, False)}


def _check_fields(data: dict, fields: dict[str, tuple[tuple[type, ...], bool]], prefix: str) -> None:
    """ValueError naming the first field of `data` missing, unknown or of another type than `fields` says."""
    for name, (types, required) in fields.items():
        if name not in data:
            if required:
                raise ValueError(f"{prefix}{name}: missing")
            continue
        value = data[name]
        if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
            raise ValueError(f"{prefix}{name}: {type(value).__name__} {_short(value)}, expected "
                             f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}")
        if name in ("started", "finished") and value is not None and not 0 <= value < _LAST_TIME:
            raise ValueError(f"{prefix}{name}: {value} is not a time (seconds since 1970)")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{prefix}{name}: {value} is not a finite number")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: not a field of a run record")
    for name in ("overrides",):
        if name in data and not all(isinstance(o, str) for o in data[name]):
            raise ValueError(f"{prefix}{name}: holds something other than text")
    headline = data.get("headline")
    if isinstance(headline, dict) and not isinstance(headline.get("key"), str):
        raise ValueError(f"{prefix}headline.key: missing or not text")
    if "config_sources" in data and not all(isinstance(c, dict) for c in data["config_sources"]):
        raise ValueError(f"{prefix}config_sources: holds something other than objects")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def link_stage(run_dir: Path, stage: str, target: Path) -> None:
    """runs/<run>/stages/<stage> -> the cache entry, as a relative link (the stage name checked: a link
    is made, and whatever stood there removed, only inside stages/)."""
    links = Path(run_dir) / "stages"
    links.mkdir(exist_ok=True)
    link = names.join(links, stage, what="stage name")
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(target, links))


def point_latest(runs_root: Path, run_dir: Path) -> None:
    latest = Path(runs_root) / "latest"
    tmp = Path(runs_root) / f".latest.{os.getpid()}"
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(run_dir, runs_root))
    os.replace(tmp, latest)


def iter_runs(runs_root: Path) -> Iterator[Path]:
    """Run folders under runs_root, newest first (by start time recorded in the folder name)."""
    root = Path(runs_root)
    if not root.is_dir():
        return iter(())
    found = [p.parent for p in root.glob("*/*/run.json")] + [p.parent for p in root.glob("*/*/*/run.json")]
    found = [p for p in found if "cache" not in p.relative_to(root).parts[:1]]
    return iter(sorted(found, key=lambda p: (p.stat().st_mtime, str(p)), reverse=True))


def resolve_run(runs_root: Path, ref: str) -> Path:
    """A run folder from a path, 'latest', or a unique part of a run folder's name."""
    p = Path(ref)
    if (p / RUN_JSON).is_file():
        return p
    if ref == "latest" and (Path(runs_root) / "latest" / RUN_JSON).is_file():
        return (Path(runs_root) / "latest").resolve()
    matches = [r for r in iter_runs(runs_root) if ref in str(r.relative_to(runs_root))]
    if len(matches) == 1 or (matches and ref == "latest"):
        return matches[0]
    if not matches:
        raise FileNotFoundError(f"no run matches '{ref}' under {runs_root} (try `edgepipe runs`)")
    listed = "\n  ".join(str(m) for m in matches[:10])
    raise FileNotFoundError(f"'{ref}' matches {len(matches)} runs; be more precise:\n  {listed}")


def previous_record(runs_root: Path, stage: str, prefer_name: str | None, limit: int = 50) -> StageRecord | None:
    """The newest record of a stage with this name that completed (for `plan`'s 'why')."""
    fallback = None
    for i, run_dir in enumerate(iter_runs(runs_root)):
        if i >= limit:
            break
        try:
            record = RunRecord.load(run_dir)
        except (OSError, RunFolderError):  # a damaged run.json is `show`'s to report, not plan's
            continue
        rec = record.stages.get(stage)
        if not rec or rec.status not in ("ran", "cached"):
            continue
        if prefer_name is None or record.name == prefer_name:
            return rec
        fallback = fallback or rec
    return fallback


def flat_metrics(metrics: Any, prefix: str = "") -> dict[str, Any]:
    """{'top1': {'onnx': 0.9}} -> {'top1.onnx': 0.9}; lists are left out (too long for a table)."""
    out: dict[str, Any] = {}
    if isinstance(metrics, dict):
        for k, v in metrics.items():
            out.update(flat_metrics(v, f"{prefix}{k}."))
    elif isinstance(metrics, (int, float, str, bool)) or metrics is None:
        out[prefix[:-1]] = metrics
    return out
