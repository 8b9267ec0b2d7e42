"""Hydra composition: config + groups + experiment + overrides, sweeps expanded into jobs, and the
`.hydra/` folder written the way Hydra writes it.

We use Hydra's compose API rather than `@hydra.main` so that a config is validated *before* a run
folder exists (an invalid config writes nothing to runs/), and so that one process runs every job of
a sweep against one cache. Override syntax, config groups, `+experiment=`, `hydra.sweeper.params`
and `hydra.run.dir` / `hydra.sweep.dir` behave as in any Hydra app.

The config search path (first match wins, file by file): the user's folder (-cd DIR, else
$EDGEPIPE_CONFIG_DIR, else ./conf when it exists), then edgepipe's built-in conf/ (installed as the
package edgepipe_conf), then whatever `hydra.searchpath` adds. A user folder adds options to the
built-in groups and replaces a built-in file of the same name; with its own config.yaml it is the
primary config too (the built-in groups stay available behind it).
"""

from __future__ import annotations

import importlib.util
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import compose_cache
from engine.contract import names
from engine.errors import ComposeError as ComposeError  # re-exported: raised here

if TYPE_CHECKING:  # OmegaConf loads when a config is composed or read, not for a remembered plan
    from omegaconf import DictConfig

CONFIG_NAME = "config"
CONFIG_NAME_ENV = "EDGEPIPE_CONFIG_NAME"  # -cn/--config-name: another primary config than config.yaml
CONFIG_DIR_ENV = "EDGEPIPE_CONFIG_DIR"
BUILTIN_PACKAGE = "edgepipe_conf"  # conf/, installed under this name (setup.py)
BUILTIN_PROVIDER = "edgepipe"  # search-path provider names, as Hydra records them in hydra.runtime
USER_PROVIDER = "project"


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


def interpolation_problem(e: BaseException) -> str | None:
    """An interpolation that cannot be resolved (`${nope}`, `${oc.env:UNSET}`, `${now:...}` in a saved
    config read without Hydra) as one line naming its key; None for any other exception."""
    from omegaconf.errors import InterpolationResolutionError

    if not isinstance(e, InterpolationResolutionError):
        return None
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    reason = reason.replace("KeyError raised while resolving interpolation: ", "").replace('"', "")
    return (f"{e.full_key or 'a config value'}: its interpolation cannot be resolved ({reason}); an interpolation "
            f"names a key of the config (${{train.lr}}) or a variable that is set (${{oc.env:NAME,default}})")


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


def config_name() -> str:
    """The primary config's name: -cn/--config-name (through $EDGEPIPE_CONFIG_NAME), else config."""
    return os.environ.get(CONFIG_NAME_ENV) or CONFIG_NAME


def builtin_config_dir() -> Path | None:
    """The folder of edgepipe's built-in conf/: the installed package (a wheel's copy, or conf/ itself
    in an editable install), else a source checkout's conf/ next to engine/."""
    if importlib.util.find_spec(BUILTIN_PACKAGE) is not None:
        from importlib.resources import files

        return Path(str(files(BUILTIN_PACKAGE)))
    checkout = Path(__file__).resolve().parents[2] / "conf"
    return checkout if (checkout / f"{CONFIG_NAME}.yaml").is_file() else None


def user_config_dir(config_dir: Path | str | None = None) -> Path | None:
    """The user's folder searched before the built-ins: config_dir (-cd), else $EDGEPIPE_CONFIG_DIR,
    else ./conf when it exists; None when there is none (or it is the built-in folder itself)."""
    named, where = config_dir, "-cd/--config-dir"
    if named is None and os.environ.get(CONFIG_DIR_ENV):
        named, where = os.environ[CONFIG_DIR_ENV], CONFIG_DIR_ENV
    if named is not None:
        folder = Path(named).expanduser().resolve()
        if not folder.is_dir():
            raise ComposeError(f"{where} {named}: no such folder; name your config folder (it holds "
                               f"experiment/, model/, ... and optionally config.yaml)")
    else:
        folder = Path("conf").resolve()
        if not folder.is_dir():
            return None
    builtin = builtin_config_dir()
    return None if builtin is not None and folder == builtin.resolve() else folder


def search_path(user_dir: Path | None):
    """Hydra's search path: Hydra's own configs, the user's folder, the built-in conf/, then schemas."""
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery

    builtin = builtin_config_dir()
    if builtin is None and not (user_dir and (user_dir / f"{CONFIG_NAME}.yaml").is_file()):
        raise ComposeError(f"edgepipe's built-in configuration ({BUILTIN_PACKAGE}) is missing: reinstall "
                           f"edgepipe, or name a complete config folder with -cd DIR or {CONFIG_DIR_ENV}")
    path = create_config_search_path(None)  # pkg://hydra.conf, SearchPathPlugins, structured://
    schema = SearchPathQuery(provider="schema")
    if user_dir is not None:
        path.prepend(USER_PROVIDER, f"file://{user_dir}", anchor=schema)
    if builtin is not None:
        source = (f"pkg://{BUILTIN_PACKAGE}" if importlib.util.find_spec(BUILTIN_PACKAGE) else f"file://{builtin}")
        path.prepend(BUILTIN_PROVIDER, source, anchor=schema)
    return path


@contextmanager
def hydra_session(user_dir: Path | None):
    """Hydra initialised on edgepipe's search path (what initialize_config_dir does for one folder)."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra.core.global_hydra import GlobalHydra

    path = search_path(user_dir)
    GlobalHydra.instance().clear()
    version.setbase(None)
    Hydra.create_main_hydra2(task_name="edgepipe", config_search_path=path)
    try:
        yield
    finally:
        GlobalHydra.instance().clear()


def source_folder(schema: str, path: str) -> str:
    """Where a search-path entry is on disk (a pkg:// entry is resolved to its package folder)."""
    if schema == "pkg":
        try:
            from importlib.resources import files

            return str(files(path))
        except (ModuleNotFoundError, TypeError, ValueError):
            return f"pkg://{path} (not installed)"
    return str(Path(path).resolve()) if schema == "file" else f"{schema}://{path}"


def describe_sources(hydra_cfg: DictConfig) -> list[dict]:
    """hydra.runtime.config_sources without Hydra's own entries: [{provider, path, folder}]."""
    return [{"provider": s.provider, "path": f"{s.schema}://{s.path}", "folder": source_folder(s.schema, s.path)}
            for s in hydra_cfg.runtime.config_sources if s.provider not in ("hydra", "schema")]


def _where(user_dir: Path | None) -> str:
    folders = ([str(user_dir)] if user_dir else []) + [f"edgepipe's built-in {BUILTIN_PACKAGE}"]
    return f"config search path: {', then '.join(folders)}"


class Job:
    """One composed job: its overrides, its config (`cfg`: the job config, no `hydra` node,
    interpolations intact; `hydra_cfg`: the `hydra` node as composed), hydra.run.dir and
    hydra.sweep.dir resolved now (they hold ${now:...}), the search path it was composed from, its
    compose_cache key (plan_memo's key too) and the .hydra/ texts kept with it. A job taken from
    compose_cache makes its DictConfigs only when they are read: a plan and a fully cached run read
    only `name`, `runs_root`, `cache_remote` and `resolved_yaml`, which the entry keeps resolved."""

    def __init__(self, overrides: list[str], cfg: DictConfig | None, hydra_cfg: DictConfig | None,
                 run_dir: Path, sweep_dir: Path, sources: list[dict] | None = None, digest: str | None = None,
                 hydra_files: dict[str, str] | None = None, kept: compose_cache.Kept | None = None) -> None:
        self.overrides, self.run_dir, self.sweep_dir = overrides, run_dir, sweep_dir
        self.sources, self.digest, self.hydra_files = sources or [], digest, hydra_files
        self._cfg, self._hydra_cfg, self._kept = cfg, hydra_cfg, kept

    @property
    def cfg(self) -> DictConfig:
        if self._cfg is None:
            self._cfg, self._hydra_cfg = self._kept.configs()
        return self._cfg

    @property
    def hydra_cfg(self) -> DictConfig:
        if self._hydra_cfg is None:
            self._cfg, self._hydra_cfg = self._kept.configs()
        return self._hydra_cfg

    @property
    def _facts(self) -> compose_cache.Facts | None:
        return self._kept.facts if self._kept is not None and self._cfg is None else None

    @property
    def name(self) -> str:
        return self._facts.name if self._facts else str(self.cfg.name)

    @property
    def runs_root(self) -> Path:
        return Path(self._facts.runs_root if self._facts else str(self.cfg.runs_root))

    @property
    def cache_remote(self) -> str | None:
        """cache.remote, resolved (None: no remote)."""
        if self._facts:
            return self._facts.cache_remote
        from omegaconf import OmegaConf

        remote = OmegaConf.select(self.cfg, "cache.remote", default=None, throw_on_missing=False)
        return None if remote is None else str(remote)

    def choices(self) -> dict:
        """hydra.runtime.choices: the config group options composed ({group: option or None})."""
        if self._facts:
            return dict(self._kept.hydra_tree.get("runtime", {}).get("choices") or {})
        from omegaconf import OmegaConf

        node = OmegaConf.select(self.hydra_cfg, "runtime.choices", default=None)
        return dict(OmegaConf.to_container(node, resolve=False)) if node is not None else {}

    def resolved_yaml(self) -> str:
        """The job config resolved, as .hydra/resolved.yaml holds it."""
        if self._facts:
            return self._facts.resolved
        from omegaconf import OmegaConf

        return OmegaConf.to_yaml(self.cfg, resolve=True)


def compose(overrides: list[str], config_dir: Path | None = None) -> Job:
    user_dir = user_config_dir(config_dir)
    key = compose_cache.Key(overrides, [d for d in (user_dir, builtin_config_dir()) if d is not None])
    if (kept := compose_cache.load(key)) is not None:  # the same files, overrides, env and versions
        check_targets(kept.tree(), overrides, user_dir)  # a remembered config is checked all the same
        if kept.facts is not None:  # without importing OmegaConf
            run_dir, sweep_dir = kept.facts.dirs()
            return Job(list(overrides), None, None, run_dir, sweep_dir, kept.sources, key.digest, kept.hydra_files,
                       kept)
        from omegaconf import OmegaConf

        cfg, hydra_cfg = kept.configs()  # registers the resolvers hydra.run.dir needs
        full = OmegaConf.create(kept.tree())
        return Job(list(overrides), cfg, hydra_cfg, resolved_dir(full, "run"), resolved_dir(full, "sweep"),
                   kept.sources, key.digest, kept.hydra_files)  # without importing Hydra
    from hydra import compose as hydra_compose
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    parsed = parse_overrides(list(overrides))
    with hydra_session(user_dir), composition_errors(parsed, user_dir):
        full = hydra_compose(config_name(), overrides=list(overrides), return_hydra_config=True)
    check_targets(OmegaConf.to_container(full, resolve=False), overrides, user_dir)
    HydraConfig.instance().set_config(full)  # makes ${hydra:...} resolvable
    run_dir, sweep_dir = resolved_dir(full, "run"), resolved_dir(full, "sweep")
    hydra_cfg = OmegaConf.create(OmegaConf.to_container(full.hydra, resolve=False))
    with open_dict(full):
        del full["hydra"]
    job = Job(list(overrides), full, hydra_cfg, run_dir, sweep_dir, describe_sources(hydra_cfg))
    if compose_cache.store(key, job, hydra_dir_texts(job)):
        job.digest = key.digest
    return job


def check_run_name(cfg: DictConfig) -> list[str]:
    """The problem with the config's `name`, if any (config.validate and every remembered plan check it):
    it becomes part of a folder name under runs_root, so engine.contract.names' rule applies."""
    from omegaconf import OmegaConf

    return run_name_problems(OmegaConf.select(cfg, "name", default=None, throw_on_missing=False))


def run_name_problems(name) -> list[str]:
    if name is None:
        return []
    why = names.problem(str(name))
    return [f"name: {str(name)!r} is not a valid run name (it becomes a folder under runs_root); {why}"] if why else []


def check_targets(tree: dict, overrides: list[str], user_dir: Path | None) -> None:
    """A ComposeError naming the first value of the composed config (plain containers, with its
    `hydra` node) that would make Hydra call something off engine/targets.py's allow-list, and the
    config file (or override) it came from; checked before anything is instantiated or written."""
    from engine.config import targets

    for path, value, why in targets.refused(tree):
        raise ComposeError(f"{targets.dotted(path)}={_shown(value)} ({_origin(path, overrides, user_dir)}): {why}")
    for key, text, applied in _with_hydra_sweeper_params(tree):
        # a sweeper (Optuna's fixed params: every trial) sets it on each job: the same check on the result
        origin = _origin(["hydra", "sweeper", "params", key], overrides, user_dir)
        where = f"hydra.sweeper.params '{key}: {text}', {origin}"
        if applied is None:
            raise ComposeError(f"{where}: a sweeper param may not choose Hydra's config groups; choose them on "
                               f"the command line or in the defaults list")
        for path, value, why in targets.refused(applied):
            raise ComposeError(f"{targets.dotted(path)}={_shown(value)} ({where}): {why}")


def _shown(value) -> str:
    return repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."


def _with_hydra_sweeper_params(tree: dict):
    """(key, value as written, the tree with that value set) for each value of each `hydra.*` entry of
    hydra.sweeper.params (each value of a sweep); the tree is None for a Hydra config group."""
    import copy

    from engine.config import targets

    params = (tree.get("hydra") or {}).get("sweeper") or {}
    params = params.get("params") if isinstance(params, dict) else None
    for key, text in (params.items() if isinstance(params, dict) else ()):
        path = targets.hydra_param(key)
        if path is None or str(key).startswith("~"):
            continue  # the job's own keys: checked by validation; a deletion sets nothing
        if not path:
            yield key, text, None
            continue
        (o,) = parse_overrides([f"{key}={text}"], "hydra.sweeper.params")
        if o.is_sweep_override() and not o.is_discrete_sweep():
            raise ComposeError(f"hydra.sweeper.params '{key}: {text}': Hydra's own settings cannot be searched")
        for value in (list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]):
            applied = copy.deepcopy(tree)
            node = applied
            for part in path[:-1]:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            node[path[-1]] = value
            yield key, text, applied


def _origin(path: list, overrides: list[str], user_dir: Path | None) -> str:
    """Which override or config file sets the key at path (the last one merged wins), as best known."""
    keys = {".".join(str(p) for p in path[:n]) for n in range(1, len(path) + 1)}
    for o in reversed(parse_overrides(list(overrides))):
        if o.key_or_group in keys:
            return f"override '{o.input_line}'"
    try:
        for c in reversed(merged_configs(overrides, user_dir, with_hydra=True)):
            if _sets(Path(c["file"]), c["package"], path):
                return f"from {c['file']}"
    except Exception:  # noqa: BLE001 - finding the file is a courtesy: the key is named all the same
        pass
    return "config file not known"


def _sets(file: Path, package: str, path: list) -> bool:
    """Whether the YAML file, merged at package, holds a value at path."""
    import yaml

    prefix = [] if package in ("", "_global_") else package.split(".")
    if path[: len(prefix)] != prefix:
        return False
    node = yaml.safe_load(file.read_text(encoding="utf-8"))
    for part in path[len(prefix):]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return False
    return True


@contextmanager
def composition_errors(parsed: list, user_dir: Path | None):
    """Hydra's and the YAML parser's exceptions as one-line ComposeErrors."""
    import yaml
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except yaml.YAMLError as e:
        raise ComposeError(yaml_problem(e)) from None
    except MissingConfigException as e:
        raise ComposeError(f"{_missing_config(e, parsed)} ({_where(user_dir)})") from None
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        cause = f": {str(e.__cause__).splitlines()[0]}" if e.__cause__ and str(e.__cause__) else ""
        raise ComposeError(f"{one_line(str(e))}{cause} ({_where(user_dir)})") from None
    except OSError as e:  # Hydra's config source on a file that holds a scalar: it does not say which
        chosen = " ".join(o.input_line for o in parsed if "." not in o.key_or_group) or "config.yaml"
        raise ComposeError(f"{e}: every config file must hold a YAML mapping; check the files these choose: "
                           f"{chosen} ({_where(user_dir)})") from None


def explain(overrides: list[str], config_dir: Path | None = None) -> dict:
    """The search path and, for every config file merged (in merge order), the search-path entry it
    came from: what `edgepipe plan --info` prints."""
    job = compose(overrides, config_dir)  # the same one-line errors as any other verb
    return {"search_path": job.sources, "configs": merged_configs(overrides, user_config_dir(config_dir))}


def merged_configs(overrides: list[str], user_dir: Path | None, with_hydra: bool = False) -> list[dict]:
    """Every config file merged, in merge order ({config, package, provider, file}), from Hydra's
    defaults list; with_hydra: Hydra's own (launcher, sweeper, logging) first."""
    from hydra._internal.defaults_list import create_defaults_list
    from hydra.core.global_hydra import GlobalHydra

    with hydra_session(user_dir), composition_errors(parse_overrides(list(overrides)), user_dir):
        loader = GlobalHydra.instance().config_loader()
        parsed, repo = loader._parse_overrides_and_create_caching_repo(config_name(), list(overrides))
        defaults = create_defaults_list(repo=repo, config_name=config_name(), overrides_list=parsed,
                                        prepend_hydra=with_hydra, skip_missing=False).defaults
        configs: list[dict] = []
        for d in defaults:
            source = next((s for s in repo.get_sources() if d.config_path and s.is_config(d.config_path)), None)
            if source is None or any(c["config"] == d.config_path for c in configs):
                continue
            configs.append({"config": d.config_path, "package": d.package or "_global_",
                            "provider": source.provider,
                            "file": str(Path(source_folder(source.scheme(), source.path)) / f"{d.config_path}.yaml")})
    return configs


def resolved_dir(full: DictConfig, which: str) -> Path:
    """hydra.run.dir / hydra.sweep.dir with ${now:...} and ${runs_root} resolved."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return Path(str(full.hydra[which].dir))
    except OmegaConfBaseException as e:
        raise ComposeError(f"hydra.{which}.dir: {str(e).splitlines()[0]}") from None


def is_sweep(overrides: list[str]) -> bool:
    if compose_cache.composed_as_one_job(overrides):  # spares importing Hydra's parser
        return False
    return any(o.is_sweep_override() for o in parse_overrides(overrides))


def expand_sweep(overrides: list[str], config_dir: Path | None = None) -> list[list[str]]:
    """Each job's override list: `hydra.sweeper.params` from the config, then the command line.
    Grid sweeps (Hydra's BasicSweeper): a,b / choice() / range() / glob(); engine/sweep.py runs them
    on Hydra's launchers, and Optuna searches too."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    plain = [o.input_line for o in parse_overrides(overrides) if not o.is_sweep_override()]
    base = compose(plain, config_dir)
    sweeper = base.hydra_cfg.runtime.choices.get("hydra/sweeper", "basic")
    if sweeper != "basic":  # `run -m` hands it to the plugin (engine/sweep.py); plan/dag cannot
        raise ComposeError(f"hydra/sweeper={sweeper} draws its jobs while it runs, so they cannot be listed "
                           f"beforehand; plan one job's values without -m, or run the search with run -m")
    from omegaconf import OmegaConf

    node = OmegaConf.select(base.hydra_cfg, "sweeper.params")
    params = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else (node or {})
    # glob() sweeps list a config group's options: the parser needs the config folder for that
    loader = ConfigLoaderImpl(config_search_path=search_path(user_config_dir(config_dir)))
    parsed = (parse_overrides([f"{k}={v}" for k, v in params.items()], "hydra.sweeper.params", loader)
              + parse_overrides(list(overrides), config_loader=loader))
    for o in parsed:
        if o.is_sweep_override() and not o.is_discrete_sweep():
            raise ComposeError(f"override '{o.input_line}': {o.value_type.name.lower().replace('_sweep', '')}() "
                               f"needs an optimizing sweeper (add hydra/sweeper=optuna to `run -m`); the grid "
                               f"sweeper takes a,b,c / choice(a,b) / range(start,stop,step)")
        if o.is_sweep_override() and next(iter(o.sweep_string_iterator()), None) is None:
            raise ComposeError(f"override '{o.input_line}': the sweep has no values")
    batches = BasicSweeper.split_arguments(parsed, None)
    return [job for batch in batches for job in batch]


def write_hydra_dir(run_dir: Path, job: Job) -> None:
    """runs/<run>/.hydra/{config,hydra,overrides}.yaml, as Hydra writes them, and resolved.yaml."""
    d = Path(run_dir) / ".hydra"
    d.mkdir(parents=True, exist_ok=True)
    for name, text in (job.hydra_files or hydra_dir_texts(job)).items():
        (d / name).write_text(text, encoding="utf-8")
    write_resolved(run_dir, job)


def hydra_dir_texts(job: Job) -> dict[str, str]:
    """The unresolved .hydra/ files of a job (OmegaConf.save's text): the same for every run of a
    composition, so compose_cache keeps them with it (dumping them is a tenth of a cached run)."""
    from omegaconf import OmegaConf

    return {"config.yaml": OmegaConf.to_yaml(job.cfg, resolve=False),
            "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": job.hydra_cfg}), resolve=False),
            "overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(job.overrides))}


def write_resolved(run_dir: Path, job: Job) -> None:
    """.hydra/resolved.yaml: the config resolved, what every stage actually saw, for reading without
    Hydra (a sweep job's other .hydra/ files are written by Hydra's run_job)."""
    d = Path(run_dir) / ".hydra"
    d.mkdir(parents=True, exist_ok=True)
    (d / "resolved.yaml").write_text(job.resolved_yaml(), encoding="utf-8")
