"""`edgepipe reproduce RUN_DIR`: re-compose a run from its saved config and check it.

Without --verify every stage must hit the cache under the key the original run recorded (same
config, same code version, same input data). With --verify every stage is recomputed into a scratch
cache and its outputs compared with the original: by digest, or for stages that declare themselves
non-deterministic (or whose bytes differ), by their metrics within a tolerance.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from engine.config.compose import one_line, yaml_problem
from engine.contract import names
from engine.errors import ConfigError
from engine.report.display import Display, console, safe
from engine.run.pipeline import Options, Pipeline
from engine.store import runs


def load_run(run_dir: Path):
    """A run folder's saved config (runs_root set to the cache it used) and its run.json record."""
    cfg_path = run_dir / ".hydra" / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: is {run_dir} an edgepipe run folder?")
    record = runs.RunRecord.load(run_dir)
    try:
        cfg = OmegaConf.load(cfg_path)
    except yaml.YAMLError as e:
        raise runs.RunFolderError(f"saved config {yaml_problem(e)}") from None
    except (OmegaConfBaseException, ValueError) as e:
        raise runs.RunFolderError(f"{cfg_path} is not a valid saved config ({one_line(str(e))})") from None
    if not isinstance(cfg, DictConfig):
        raise runs.RunFolderError(f"{cfg_path} is not a valid saved config (not a mapping)")
    cfg.runs_root = record.runs_root  # the cache the original run used
    return cfg, record


def reproduce(run_dir: Path, verify: bool = False, tolerance: float = 0.01) -> int:
    run_dir = Path(run_dir)
    cfg, original = load_run(run_dir)
    try:
        pipeline = Pipeline(cfg, Path(original.runs_root))
    except ConfigError as e:  # e.g. a relative dataset.path, read from another folder than the run's
        raise ConfigError(e.problems + [f"note: {hint}" for hint in _hints(original)]) from None
    only = list(original.stages)
    items = pipeline.plan(Options(only=only), run_name=original.name)
    problems = []
    for item in items:
        old = original.stages.get(item.name)
        if old and old.key and item.key and old.key != item.key:
            problems.append(f"{item.name}: key {item.key[:10]} != original {old.key[:10]} ({item.reason})")
        elif item.status != "cached":
            problems.append(f"{item.name}: not in the cache ({item.reason})")
    for p in problems:
        console.print(f"  [red]✗[/] {safe(p)}")
    for hint in _hints(original) if problems else []:
        console.print(f"  [yellow]note[/]: {safe(hint)}")
    if problems and not verify:
        console.print(f"[red]not reproduced[/]: {len(problems)} of {len(items)} stages miss the cache")
        return 1
    if not problems:
        console.print(f"[green]reproduced[/]: all {len(items)} stages hit the cache with the original keys")
    if not verify:
        return 0
    return _verify(cfg, original, tolerance)


def _hints(original: runs.RunRecord) -> list[str]:
    """What differs from the original run's circumstances (an upgrade, another folder)."""
    from engine import __version__

    hints = []
    if original.edgepipe_version and original.edgepipe_version != __version__:
        hints.append(f"the run was made with edgepipe {original.edgepipe_version}, this is {__version__}: "
                     f"a stage whose code changed computes a new key")
    if original.cwd and Path(original.cwd).resolve() != Path.cwd().resolve():
        hints.append(f"the run was made in {original.cwd}; relative paths in its config are read from the "
                     f"current folder: run reproduce from there")
    return hints


def _verify(cfg, original: runs.RunRecord, tolerance: float) -> int:
    scratch = Path(original.runs_root) / ".verify" / time.strftime("%Y%m%d-%H%M%S")
    scratch.mkdir(parents=True)
    try:
        cfg.runs_root = str(scratch)
        pipeline = Pipeline(cfg, scratch)
        record = runs.RunRecord(name=f"verify-{original.name}", run_dir=str(scratch), runs_root=str(scratch))
        display = Display(f"verify {original.run_dir}", list(original.stages))
        try:
            pipeline.execute(record, Options(only=list(original.stages), no_cache=True), display)
        finally:
            display.close()
        bad = 0
        for name, old in original.stages.items():
            new = record.stages.get(name)
            if new is None or new.status != "ran":
                console.print(f"  [red]✗[/] {safe(name)}: {safe(new.status if new else 'missing')} "
                              f"{safe(new.error if new else '')}")
                bad += 1
                continue
            if new.digest == old.digest:
                console.print(f"  [green]✓[/] {safe(name)}: identical outputs")
                continue
            diffs = _metric_diffs(old.metrics, new.metrics, tolerance)
            if diffs is None:
                console.print(f"  [yellow]~[/] {safe(name)}: outputs differ byte-wise and the stage reports no metrics")
            elif diffs:
                bad += 1
                console.print(f"  [red]✗[/] {safe(name)}: metrics differ beyond {tolerance}: {safe('; '.join(diffs))}")
            else:
                console.print(f"  [green]✓[/] {safe(name)}: outputs differ byte-wise, metrics within {tolerance}")
        console.print("[green]verified[/]" if not bad else f"[red]{bad} stages differ[/]")
        return 1 if bad else 0
    finally:  # only what it made: nothing behind a link out of runs_root
        names.remove_tree(scratch, within=Path(original.runs_root))


def _metric_diffs(old: dict, new: dict, tolerance: float) -> list[str] | None:
    a, b = runs.flat_metrics(old), runs.flat_metrics(new)
    numeric = [k for k in a if isinstance(a[k], (int, float)) and isinstance(b.get(k), (int, float))]
    if not numeric:
        return None
    # Timings are not results: they are never compared.
    return [f"{k}: {a[k]} -> {b[k]}" for k in numeric
            if not k.endswith(("seconds", "_s", "peak_mb", "time")) and abs(a[k] - b[k]) > tolerance]
