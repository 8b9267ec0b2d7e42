"""A run folder as the report reads it: the run's record, each stage's output folder, the pipeline's
wiring. The report's sections and its pictures both read runs through this."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.store.runs import RunRecord, StageRecord

FEATURES = "features.npz"  # evaluate's penultimate-layer features of the PyTorch model: features, labels
TSNE_SEED = 0


@dataclass
class RunView:
    """A run folder as the report reads it: the record, its stage folders and the pipeline's wiring."""

    record: RunRecord
    run_dir: Path
    scratch: Path | None  # runs/cache/.scratch/report, where pictures are memoised
    needs: dict[str, dict[str, str]] = field(default_factory=dict)  # stage -> {input: upstream stage}

    def folder(self, stage: str) -> Path | None:
        s = self.record.stages.get(stage)
        return stage_dir(self.run_dir, s) if s else None

    def shown(self, path: Path | None) -> str:
        """A file the report names in a message: relative to the run folder when it lies in it
        (stages/eval/features.npz), so that a memoised section does not name one run's folder."""
        if path is None:
            return "none"
        try:
            return str(Path(path).relative_to(self.run_dir))
        except ValueError:
            return str(path)

    def key(self, stage: str) -> str | None:
        s = self.record.stages.get(stage)
        return s.key if s else None


def stage_dir(run_dir: Path, s: StageRecord) -> Path | None:
    """The stage's outputs: its stages/ link (relative: survives a copied run folder, when the cache came
    along), else the cache entry, else the failed/ folder a stage that raised leaves behind."""
    for folder in (run_dir / "stages" / s.name, Path(s.path) if s.path else None, run_dir / "failed" / s.name):
        if folder is not None and folder.is_dir():
            return folder
    return None
