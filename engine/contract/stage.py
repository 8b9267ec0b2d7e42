"""The contract between the engine and a stage.

A stage is a class with a name (what ``uses:`` in a pipeline names), a version (bump it when the
output for the same inputs changes), a pydantic ``Params`` model, the inputs it takes, and a
``run`` method that reads only its inputs and writes only under ``out``.

Stages are registered through the ``edgepipe.stages`` entry-point group (see pyproject.toml), so the
engine never imports ``stages/`` itself. Heavy libraries (torch, onnxruntime, rknn) are imported
inside ``run`` so that planning and fully cached runs stay fast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from engine.errors import Refusal as Refusal  # re-exported: what a stage raises
from engine.errors import StageError as StageError


class Params(BaseModel):
    """Base for stage parameter models: unknown keys are errors, values are validated strictly enough
    that a typo in YAML never silently falls back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _Marker:
    def __init__(self, what: str) -> None:
        self.what = what

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"<{self.what}>"


# A parameter that names a file or folder whose *content* is an input of the stage (a dataset
# folder, a pretrained weights file). The engine adds the content digest to the stage's cache key,
# so editing a file in the folder re-runs the stage even though the path string is the same.
HASH_CONTENT = _Marker("hash content")
ContentPath = Annotated[Path, HASH_CONTENT]

# A parameter that cannot change the outputs (worker count, progress refresh rate): left out of the
# cache key so changing it re-uses the cache.
NOT_IN_KEY = _Marker("not in key")

# A parameter a validator computes from files (a digest of files outside a dataset's folder): while
# it is set, the validated params are not remembered between commands (engine/plan_memo.py), since
# those files may change without any config file changing.
FROM_FILES = _Marker("computed from files")


class PublishedDigest(_Marker):
    """On a field holding ``{"sha256": prefix, "url": url}`` for the HASH_CONTENT file field ``of``
    names: a file its publisher names by a sha256 prefix (torchvision's weights). The key's content
    digest of ``of`` is then the published one whenever the file is absent (``plan`` before ``run``
    downloads it) or its sha256 starts with the prefix, so the key is the same before and after the
    download; a file with other bytes is keyed by its own digest (the stage that loads it warns that
    it is not the publisher's file, and refuses a file whose bytes are no longer those the key holds:
    Context.content_digests). Not itself in the key; `plan` names the URL of a file not there
    yet."""

    def __init__(self, of: str) -> None:
        super().__init__(f"published digest of {of}")
        self.of = of


@dataclass(frozen=True)
class Input:
    """One named input of a stage: the output folder of the upstream stage wired to it."""

    required: bool = True
    doc: str = ""


@dataclass
class Context:
    """What the engine hands a running stage besides its params and inputs."""

    stage: str  # the stage's name in the pipeline (not its type)
    out: Path
    log: logging.Logger
    # progress(completed, total, description, important) updates this stage's row in the display.
    _progress: Callable[[float | None, float | None, str | None, bool], None] = field(
        default=lambda c, t, d, i: None, repr=False
    )
    # A folder of this stage type's own reusable intermediates, shared by every run of the cache
    # (runs/cache/.scratch/<type>; the dataset stage keeps decoded images there). Not an output: what
    # a stage reads from it must be keyed by everything that made it, and written atomically.
    # None (engine.run.testing.run_stage unless given one): keep nothing.
    scratch: Path | None = None
    # Where each input came from, by input name: {"type", "stage", "key", "digest"} of the upstream
    # output (what a package records as its sources). Empty under engine.run.testing.run_stage unless given.
    sources: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # The digest each content path (HASH_CONTENT field, by dotted path: "model.pretrained") entered this
    # stage's cache key with: the file's sha256 or "published-sha256:PREFIX" (PublishedDigest). A stage
    # that reads such a file can tell that it changed after the key was made (its outputs would be
    # stored as those of other bytes). Empty under engine.run.testing.run_stage unless given.
    content_digests: Mapping[str, str] = field(default_factory=dict)

    def progress(
        self, completed: float | None = None, total: float | None = None, description: str | None = None
    ) -> None:
        """Frequent updates (every batch is fine): shown live on a terminal, sampled in plain logs."""
        self._progress(completed, total, description, False)

    def note(self, message: str) -> None:
        """A short line the user should see now (e.g. 'mmse quantization takes minutes')."""
        self.log.info(message)
        self._progress(None, None, message, True)


class Stage:
    """Base class of every stage type."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    Params: ClassVar[type[BaseModel]] = Params
    inputs: ClassVar[Mapping[str, Input]] = {}
    # The config section read when a pipeline entry names none and no section is named like the
    # stage (default: the type's name; e.g. export_onnx reads `export`).
    config_section: ClassVar[str | None] = None
    # Params fields filled from other top-level config sections: {"model": "model"} makes
    # `model=mobilenet_v3_small` and `model.width=...` reach this stage, and errors name `model.*`.
    sections: ClassVar[Mapping[str, str]] = {}
    # True for stages such as ``evaluate`` that accept any further named inputs (each backend).
    extra_inputs: ClassVar[bool] = False
    # A stage whose output is not a pure function of params + inputs (none should be) can say so here;
    # ``reproduce --verify`` then compares its metrics within a tolerance rather than its digests.
    deterministic: ClassVar[bool] = True
    # Output files (glob patterns relative to the output folder) kept for people but read by no
    # downstream stage, e.g. timings or a build log with dates: stored and listed in the manifest, left
    # out of the output digest so a re-run that differs only in them still cuts off downstream stages.
    volatile_outputs: ClassVar[tuple[str, ...]] = ()
    # Distributions (pip names) whose version shapes the outputs, e.g. ("rknn-toolkit2",): their
    # installed versions (package metadata, nothing imported) are part of the cache key, so an upgrade
    # re-runs the stage and `plan` names it (rknn-toolkit2 2.5.0 -> 2.6.0).
    tools: ClassVar[tuple[str, ...]] = ()
    # True when what the stage writes is run as code by a later stage or command: a TorchScript file
    # (torch.jit.load runs its ops, file I/O included), a board package's scripts and C sources
    # (`edgepipe selftest`, the board). An entry of such a stage is taken from cache.remote only when
    # signed with the team's key ($EDGEPIPE_REMOTE_KEY); otherwise it is computed here (engine/store/
    # cache.py, README "Trust model"). Model formats that runtimes read as data (ONNX, ncnn, RKNN,
    # weights) are checked where they are loaded instead.
    outputs_execute: ClassVar[bool] = False

    # Rough peak memory of one run of the stage in MB (resident, the process included): with
    # `run --jobs N` a stage starts only when it fits --max-memory beside the stages running.
    peak_memory_mb: ClassVar[int] = 500

    @classmethod
    def peak_memory(cls, params: Any) -> float:
        """Peak memory (MB) for these params; override when it depends on them (rknn mmse vs normal)."""
        return cls.peak_memory_mb

    @classmethod
    def check(cls, params: Any) -> Iterable[tuple[str, str]]:
        """Checks across the sections a stage reads, run at validation (before anything runs): a
        board and the normalisation it must express. Yield (params field path, problem); the engine
        names the config key that field came from (`preprocess.mean`, not `preprocess`)."""
        return ()

    @classmethod
    def check_inputs(cls, params: Any, wired: set[str]) -> Iterable[tuple[str, str]]:
        """Like ``check``, knowing which inputs the pipeline wires: a stage that needs either an input
        or a file named in its params says so at validation, naming the key."""
        return ()

    def run(self, params: Any, inputs: Mapping[str, Path], out: Path, ctx: Context) -> Mapping[str, Any] | None:
        """Compute the outputs into ``out`` (an empty folder). Return metrics (JSON-able) or None."""
        raise NotImplementedError


def invoke(cls: type[Stage], params: Any, inputs: Mapping[str, Path], out: Path, stage: str | None = None,
           progress: Callable[[float | None, float | None, str | None, bool], None] | None = None,
           **context: Any) -> dict | None:
    """The one way a stage runs: its Context built, its `run` called, its metrics returned (None when
    it returns none). The pipeline (in process), the scheduler's workers, the DDP ranks and
    engine.run.testing all come here, as Kedro's runners share one task. `stage`: its name in the
    pipeline (default: its type's); `context`: Context's scratch and sources."""
    name = stage or cls.name
    if progress is not None:
        context["_progress"] = progress
    ctx = Context(stage=name, out=out, log=logging.getLogger(f"edgepipe.stage.{name}"), **context)
    return cls().run(params, dict(inputs), out, ctx)

