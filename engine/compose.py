"""Hydra composition: config + groups + experiment + overrides, sweeps expanded into jobs, and the
`.hydra/` folder written the way Hydra writes it.

We use Hydra's compose API rather than `@hydra.main` so that a config is validated *before* a run
folder exists (an invalid config writes nothing to runs/), and so that one process runs every job of
a sweep against one cache. Override syntax, config groups, `+experiment=`, `hydra.sweeper.params`
and `hydra.run.dir` / `hydra.sweep.dir` behave as in any Hydra app.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

CONFIG_NAME = "config"
CONFIG_DIR_ENV = "EDGEPIPE_CONFIG_DIR"


class ComposeError(Exception):
    pass


def default_config_dir() -> Path:
    """$EDGEPIPE_CONFIG_DIR, else ./conf when it holds config.yaml, else the repo's conf/."""
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV]).resolve()
    local = Path("conf")
    if (local / f"{CONFIG_NAME}.yaml").is_file():
        return local.resolve()
    return (Path(__file__).resolve().parent.parent / "conf").resolve()


@dataclass
class Job:
    overrides: list[str]
    cfg: DictConfig  # the job config (no `hydra` node), interpolations intact
    hydra_cfg: DictConfig  # the `hydra` node as composed (for .hydra/hydra.yaml and sweeper params)
    run_dir: Path  # hydra.run.dir, resolved now (it holds ${now:...})
    sweep_dir: Path  # hydra.sweep.dir, resolved now


def compose(overrides: list[str], config_dir: Path | None = None) -> Job:
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    config_dir = Path(config_dir or default_config_dir())
    if not (config_dir / f"{CONFIG_NAME}.yaml").is_file():
        raise ComposeError(f"{config_dir}/{CONFIG_NAME}.yaml not found; run edgepipe from the project folder "
                           f"or set {CONFIG_DIR_ENV}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None, job_name="edgepipe"):
            full = hydra_compose(CONFIG_NAME, overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ComposeError(f"{e}\n(config folder: {config_dir})") from None
    HydraConfig.instance().set_config(full)  # makes ${hydra:...} resolvable
    try:
        run_dir, sweep_dir = Path(str(full.hydra.run.dir)), Path(str(full.hydra.sweep.dir))
    except OmegaConfBaseException as e:
        raise ComposeError(f"hydra.run.dir / hydra.sweep.dir: {e}") from None
    hydra_cfg = OmegaConf.create(OmegaConf.to_container(full.hydra, resolve=False))
    with open_dict(full):
        del full["hydra"]
    return Job(list(overrides), full, hydra_cfg, run_dir, sweep_dir)


def is_sweep(overrides: list[str]) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return any(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(overrides))


def expand_sweep(overrides: list[str], config_dir: Path | None = None) -> list[list[str]]:
    """Each job's override list: `hydra.sweeper.params` from the config, then the command line."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    base = compose(plain, config_dir)
    node = OmegaConf.select(base.hydra_cfg, "sweeper.params")
    params = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else (node or {})
    from_config = [f"{k}={v}" for k, v in params.items()]
    batches = BasicSweeper.split_arguments(parser.parse_overrides(from_config + list(overrides)), None)
    return [job for batch in batches for job in batch]


def write_hydra_dir(run_dir: Path, job: Job) -> None:
    """runs/<run>/.hydra/{config,hydra,overrides}.yaml, as Hydra writes them."""
    d = Path(run_dir) / ".hydra"
    d.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(job.cfg, d / "config.yaml", resolve=False)
    OmegaConf.save(OmegaConf.create({"hydra": job.hydra_cfg}), d / "hydra.yaml", resolve=False)
    OmegaConf.save(OmegaConf.create(job.overrides), d / "overrides.yaml")
    # The resolved config too: what every stage actually saw, for reading without Hydra.
    OmegaConf.save(job.cfg, d / "resolved.yaml", resolve=True)
