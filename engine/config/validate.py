"""Turn a composed config into validated stage parameters, or into errors that name the config key,
the bad value and what is allowed."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.config import compose_cache, registry
from engine.config.compose import check_run_name, interpolation_problem
from engine.contract import fetching, names
from engine.contract.stage import Stage
from engine.errors import ConfigError, config_key, did_you_mean
from engine.store.cache import KeyRecipe, key_recipe


class PipelineEntry(BaseModel):
    """One stage of `pipeline.stages`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    uses: str
    needs: dict[str, str] = Field(default_factory=dict)
    config: str | None = None  # config section holding the params; default: the stage's name
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    after: list[str] = Field(default_factory=list)  # ordering only: not an input, not in the key


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stages: dict[str, PipelineEntry]
    # "stage.metric" shown by `edgepipe runs`; default: the first numeric metric of the last stage.
    headline: str | None = None
    # which way the headline is better (what `run -m hydra/sweeper=optuna` optimises towards);
    # default: minimize a loss, error, drop or time (compare.lower_is_better), else maximize
    headline_direction: Literal["maximize", "minimize"] | None = None


@dataclass
class StageSpec:
    name: str
    entry: PipelineEntry
    cls: type[Stage]
    params: BaseModel
    section: str

    @property
    def type(self) -> str:
        return self.cls.name

    @property
    def sections(self) -> dict[str, str]:
        return self.cls.sections

    @cached_property
    def recipe(self) -> KeyRecipe:
        return key_recipe(self.cls, self.params)


def _fmt_path(parts: list[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _deep_merge(base: dict, extra: Mapping) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _deep_merge(merged[k], v) if isinstance(v, Mapping) and isinstance(merged.get(k), dict) else v
    return merged


def _section(cfg: DictConfig, key: str) -> Any:
    try:
        node = OmegaConf.select(cfg, key, default=None)
        if node is None:
            return None
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    except InterpolationResolutionError as e:  # ${nope}, ${oc.env:UNSET}: a config error naming the key
        raise ConfigError([interpolation_problem(e)]) from None


def _describe(err: Mapping[str, Any], model: type[BaseModel], origin: Mapping[str, str], section: str) -> str:
    """One pydantic error as `config.key.path: what is wrong; what is allowed`."""
    loc = list(err["loc"])
    head = str(loc[0]) if loc else ""
    prefix = origin.get(head, f"{section}.{head}" if head else section)
    where = _fmt_path([prefix, *loc[1:]])
    if err["type"] == "extra_forbidden":
        fields = _fields_at(model, loc[:-1])
        return f"{where}: unknown key{did_you_mean(str(loc[-1]), fields)}; allowed keys: {', '.join(fields)}"
    if err["type"] == "missing":
        return f"{where}: required, not set"
    if err["type"] == "value_error" and _fields_at(model, loc):
        return _describe_model_check(err, model, loc, origin, where)
    given = f"{err['input']!r} is not allowed: " if "input" in err else ""
    return f"{where}: {given}{err['msg']}"


def _describe_model_check(err: Mapping[str, Any], model: type[BaseModel], loc: list[Any],
                          origin: Mapping[str, str], where: str) -> str:
    """A model validator's error (it has no field location): named by the field its message starts
    with (`do_quantization=false: ...` -> `quantize.do_quantization=false: ...`), else by the section;
    never with the whole section's values, which hide the one that matters."""
    text = str(err.get("ctx", {}).get("error") or err["msg"])
    first = re.match(r"[A-Za-z_]\w*", text)
    if first and first.group() in _fields_at(model, loc):
        field = first.group()
        key = origin.get(field, f"{where}.{field}") if not loc else f"{where}.{field}"
        return f"{key}{text[len(field):]}" if text[len(field):][:1] in ("=", ":", " ") else f"{key}: {text}"
    return f"{where}: {text}"


def _fields_at(model: type[BaseModel], loc: list[Any]) -> list[str]:
    """The field names of the (nested) model found by following loc from model."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or _as_model(current) is None:
            continue
        field = _as_model(current).model_fields.get(str(part))
        current = field.annotation if field else None
    found = _as_model(current)
    return sorted(found.model_fields) if found else []


def _as_model(annotation: Any) -> type[BaseModel] | None:
    for a in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def load_pipeline(cfg: DictConfig) -> PipelineSpec:
    raw = _section(cfg, "pipeline")
    if not isinstance(raw, Mapping) or not raw.get("stages"):
        raise ConfigError(["pipeline.stages: no stages defined; choose a pipeline with pipeline=NAME "
                           "(see conf/pipeline/)"])
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError([_describe(err, PipelineSpec, {}, "pipeline") for err in e.errors()]) from None


def section_of(cfg: DictConfig, name: str, entry: PipelineEntry, cls: type[Stage]) -> str:
    """The config section a stage reads: `config:` if given, else a section named like the stage,
    else the stage type's own section (`data: {uses: dataset}` reads `dataset`)."""
    if entry.config:
        return entry.config
    if OmegaConf.select(cfg, name, default=None) is not None:
        return name
    return cls.config_section or cls.name


def assemble_params(cfg: DictConfig, name: str, entry: PipelineEntry, cls: type[Stage]) -> tuple[dict, dict[str, str]]:
    """The raw params of one stage and, for each top-level params key, the config path it came from."""
    section = section_of(cfg, name, entry, cls)
    raw = _section(cfg, section)
    if raw is None:
        raw = {}
    elif not isinstance(raw, Mapping):
        raise ConfigError([f"{section}: expected a mapping of parameters for stage '{name}', got {raw!r}"])
    params = dict(raw)
    origin = {k: f"{section}.{k}" for k in params}
    for field, src in cls.sections.items():
        params[field] = _section(cfg, src)
        origin[field] = src
        if params[field] is None:
            del params[field]
    params = _deep_merge(params, entry.with_)
    origin.update({k: f"pipeline.stages.{name}.with.{k}" for k in entry.with_})
    return params, origin


def validate_stage(cfg: DictConfig, name: str, entry: PipelineEntry, cls: type[Stage]) -> BaseModel:
    params, origin = assemble_params(cfg, name, entry, cls)
    try:
        return cls.Params.model_validate(params)
    except ValidationError as e:
        section = section_of(cfg, name, entry, cls)
        raise ConfigError(
            [f"{_describe(err, cls.Params, origin, section)}  [stage '{name}', type {cls.name}]" for err in e.errors()]
        ) from None


def _missing_paths(spec: StageSpec) -> list[str]:
    """Files and folders the stage's params name as content inputs, but which do not exist (a file
    whose published digest stands for it is downloaded by `run`)."""
    content = spec.recipe.content  # the same walk that puts their content in the cache key
    return [f"{config_key(spec, field)}: {path} does not exist (a file or folder this stage reads)  "
            f"[stage '{spec.name}', type {spec.cls.name}]"
            for field, path in content.items() if not Path(path).exists() and field not in spec.recipe.published]


def shadowed_overrides(overrides: list[str], specs: Mapping[str, StageSpec]) -> list[str]:
    """Command-line overrides that no stage sees because every stage reading that section replaces
    the key with its pipeline `with:` (e.g. `quantize.algorithm=mmse` in a pipeline that builds a
    normal and an mmse variant)."""
    notes = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        section, _, field = key.partition(".")
        head = field.split(".", 1)[0]
        readers = [s for s in specs.values() if s.section == section]
        if head and readers and all(head in s.entry.with_ for s in readers):
            where = ", ".join(f"pipeline.stages.{s.name}.with.{head}" for s in readers)
            notes.append(f"{override} has no effect: {where} set{'s' if len(readers) == 1 else ''} it")
    return notes


def unvalidated_override_problems(cfg: DictConfig, overrides: list[str], specs: Mapping[str, StageSpec]) -> list[str]:
    """Command-line overrides whose value no stage validates -- every stage reading the section replaces
    the key with `with:`, or no stage of this pipeline reads the section -- checked against the stage
    types that read it (else the type whose own section it is): a bad value is an error even where it
    would have no effect, never a run that silently ignores it."""
    problems: list[str] = []
    for override in overrides:
        if override.startswith("~") or "=" not in override:
            continue
        section, _, field = override.lstrip("+").split("=", 1)[0].partition(".")
        head = field.split(".", 1)[0]
        readers = [s for s in specs.values() if s.section == section]
        if not head or any(head not in s.entry.with_ for s in readers):
            continue  # validated as some stage's params already
        entries = [(s.name,
                    s.entry.model_copy(update={"with_": {k: v for k, v in s.entry.with_.items() if k != head}}),
                    s.cls)
                   for s in readers] or [(section, PipelineEntry(uses=cls.name, config=section), cls)
                                         for cls in _types_owning(section)]
        for name, entry, cls in entries:
            try:
                params, origin = assemble_params(cfg, name, entry, cls)
                cls.Params.model_validate(params)
            except ValidationError as e:
                problems += [f"{_describe(err, cls.Params, origin, section)}  [stage type {cls.name}]"
                             for err in e.errors() if err["loc"][:1] == (head,)]
            except Exception:  # noqa: BLE001 - anything else is reported by the stages that do read it
                continue
    return list(dict.fromkeys(problems))


def _types_owning(section: str) -> list[type[Stage]]:
    found = []
    for name in registry.known_types():
        try:
            cls = registry.get(name)
        except Exception:  # noqa: BLE001 - a broken plugin is reported where it is used
            continue
        if (cls.config_section or cls.name) == section:
            found.append(cls)
    return found


def _cross_checks(spec: StageSpec) -> list[str]:
    """The stage type's own checks across sections (Stage.check), named by config key."""
    return [f"{config_key(spec, field)}: {problem}  [stage '{spec.name}', type {spec.cls.name}]"
            for field, problem in [*spec.cls.check(spec.params),
                                   *spec.cls.check_inputs(spec.params, set(spec.entry.needs))]]


def validate(cfg: DictConfig) -> tuple[PipelineSpec, dict[str, StageSpec]]:
    """Validate the whole pipeline: stage types and every stage's params. Collects all problems.
    Validators find what names resolved to before in compose_cache's sealed memo."""
    with fetching.memo(compose_cache.resolved_memo()):
        return _validate(cfg)


def _validate(cfg: DictConfig) -> tuple[PipelineSpec, dict[str, StageSpec]]:
    pipeline = load_pipeline(cfg)
    problems: list[str] = check_run_name(cfg)
    specs: dict[str, StageSpec] = {}
    for name, entry in pipeline.stages.items():
        why = names.problem(name)
        if why:  # it names the run's stages/<name> link and failed/<name> folder
            problems.append(f"pipeline.stages: stage name {name!r} cannot name a folder (the run keeps "
                            f"stages/<name> and failed/<name>); {why}")
            continue
        try:
            cls = registry.get(entry.uses)
        except registry.UnknownStageType as e:
            problems.append(
                f"pipeline.stages.{name}.uses: unknown stage type '{entry.uses}'{did_you_mean(entry.uses, e.known)}; "
                f"known types: {', '.join(e.known)}"
            )
            continue
        try:
            specs[name] = StageSpec(name, entry, cls, validate_stage(cfg, name, entry, cls),
                                    section_of(cfg, name, entry, cls))
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        problems.extend(_missing_paths(specs[name]))
        problems.extend(_cross_checks(specs[name]))
    if problems:
        raise ConfigError(problems)
    return pipeline, specs
