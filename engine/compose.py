"""Hydra composition: config + groups + experiment + overrides, sweeps expanded into jobs, and the
`.hydra/` folder written the way Hydra writes it.

We use Hydra's compose API rather than `@hydra.main` so that a config is validated *before* a run
folder exists (an invalid config writes nothing to runs/), and so that one process runs every job of
a sweep against one cache. Override syntax, config groups, `+experiment=`, `hydra.sweeper.params`
and `hydra.run.dir` / `hydra.sweep.dir` behave as in any Hydra app.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

CONFIG_NAME = "config"
CONFIG_DIR_ENV = "EDGEPIPE_CONFIG_DIR"


class ComposeError(Exception):
    pass


OVERRIDE_SYNTAX = "https://hydra.cc/docs/advanced/override_grammar/basic/"


# Lines of Hydra/OmegaConf messages that say nothing to a user.
_NOISE = ("See https://", "Error parsing override", "full_key:", "object_type=", "reference_type=")


def one_line(text: str) -> str:
    """Hydra's multi-line messages as one line: no search-path dump, no 'See https://...' footer."""
    text = text.split("Config search path:")[0]
    lines = [ln.strip().rstrip(".:") for ln in text.splitlines()
             if ln.strip().strip("^") and not ln.strip().startswith(_NOISE)]
    return "; ".join(lines)


def parse_overrides(overrides: list[str], where: str = "override", config_loader=None) -> list:
    """Hydra's parsed overrides, one at a time so that an error names the item that is wrong."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create(config_loader=config_loader)
    parsed = []
    for text in overrides:
        try:
            (o,) = parser.parse_overrides([text])
        except (HydraException, ValueError) as e:
            hint = "" if "=" in text or text.startswith("~") else (
                " (not KEY=VALUE: a value with spaces must be quoted as one argument, key='a b')")
            raise ComposeError(f"{where} '{text}'{hint}: {one_line(str(e))} (syntax: {OVERRIDE_SYNTAX})") from None
        if not o.key_or_group:
            raise ComposeError(f"{where} '{text}': no key before '='; write KEY=VALUE, e.g. train.lr=0.01")
        parsed.append(o)
    return parsed


def yaml_problem(e: Exception) -> str:
    """A YAML error as 'FILE, line N: what' (a !!python/... tag: refused, nothing was constructed)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{mark.name}, line {mark.line + 1}" if mark else "a config file"
    problem = getattr(e, "problem", None) or str(e)
    tag = re.search(r"tag '(?:tag:yaml.org,2002:)?([^']+)'", problem)
    if tag:
        return (f"{where}: YAML tag '!!{tag.group(1)}' is not allowed; config files hold plain data "
                f"(strings, numbers, lists, mappings), nothing in them is run")
    return f"{where}: not valid YAML: {one_line(problem)}"


def _missing_config(e, overrides: list) -> str:
    """'+experiment=nosuch: ...' with the available options on the same line."""
    group = (e.missing_cfg_file or "").rpartition("/")[0]
    named = next((o.input_line for o in overrides if o.key_or_group == group), None)
    head = f"{named}: " if named else ""
    if e.options:
        return f"{head}no config '{e.missing_cfg_file}'; available {group or 'configs'}: {', '.join(e.options)}"
    return head + one_line(str(e))


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
    import yaml
    from hydra.errors import MissingConfigException

    parsed = parse_overrides(list(overrides))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None, job_name="edgepipe"):
            full = hydra_compose(CONFIG_NAME, overrides=list(overrides), return_hydra_config=True)
    except yaml.YAMLError as e:
        raise ComposeError(yaml_problem(e)) from None
    except MissingConfigException as e:
        raise ComposeError(f"{_missing_config(e, parsed)} (config folder: {config_dir})") from None
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        cause = f": {str(e.__cause__).splitlines()[0]}" if e.__cause__ and str(e.__cause__) else ""
        raise ComposeError(f"{one_line(str(e))}{cause} (config folder: {config_dir})") from None
    except OSError as e:  # Hydra's config source on a file that holds a scalar: it does not say which
        chosen = " ".join(o.input_line for o in parsed if "." not in o.key_or_group) or "config.yaml"
        raise ComposeError(f"{e}: every config file must hold a YAML mapping; check the files these choose: "
                           f"{chosen} (config folder: {config_dir})") from None
    HydraConfig.instance().set_config(full)  # makes ${hydra:...} resolvable
    run_dir, sweep_dir = _resolved_dir(full, "run"), _resolved_dir(full, "sweep")
    hydra_cfg = OmegaConf.create(OmegaConf.to_container(full.hydra, resolve=False))
    with open_dict(full):
        del full["hydra"]
    return Job(list(overrides), full, hydra_cfg, run_dir, sweep_dir)


def _resolved_dir(full: DictConfig, which: str) -> Path:
    """hydra.run.dir / hydra.sweep.dir with ${now:...} and ${runs_root} resolved."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return Path(str(full.hydra[which].dir))
    except OmegaConfBaseException as e:
        raise ComposeError(f"hydra.{which}.dir: {str(e).splitlines()[0]}") from None


def is_sweep(overrides: list[str]) -> bool:
    return any(o.is_sweep_override() for o in parse_overrides(overrides))


def expand_sweep(overrides: list[str], config_dir: Path | None = None) -> list[list[str]]:
    """Each job's override list: `hydra.sweeper.params` from the config, then the command line.
    Grid sweeps only (Hydra's BasicSweeper): a,b / choice() / range() / glob()."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path

    plain = [o.input_line for o in parse_overrides(overrides) if not o.is_sweep_override()]
    base = compose(plain, config_dir)
    node = OmegaConf.select(base.hydra_cfg, "sweeper.params")
    params = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else (node or {})
    # glob() sweeps list a config group's options: the parser needs the config folder for that
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(config_dir or default_config_dir())))
    parsed = (parse_overrides([f"{k}={v}" for k, v in params.items()], "hydra.sweeper.params", loader)
              + parse_overrides(list(overrides), config_loader=loader))
    for o in parsed:
        if o.is_sweep_override() and not o.is_discrete_sweep():
            raise ComposeError(f"override '{o.input_line}': {o.value_type.name.lower().replace('_sweep', '')}() "
                               f"needs an optimizing sweeper (Optuna, Nevergrad); edgepipe runs grid sweeps: "
                               f"a,b,c / choice(a,b) / range(start,stop,step)")
        if o.is_sweep_override() and next(iter(o.sweep_string_iterator()), None) is None:
            raise ComposeError(f"override '{o.input_line}': the sweep has no values")
    batches = BasicSweeper.split_arguments(parsed, None)
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
