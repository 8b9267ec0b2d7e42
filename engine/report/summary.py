"""The summary of report.html: the parameters that differ from the defaults, the model and its parameter
count, the size on disk of every model file, the input spec and the board packages. Read from the run
folder and the stage outputs; no torch (model.pt's parameter count comes from its pickled metadata,
read by an unpickler that builds nothing but shapes).
"""

from __future__ import annotations

import collections
import json
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

from engine.contract.plugins import backend_classes

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # state_dict entries that are not parameters
CHANGES_SHOWN = 60


def model_format(folder: Path) -> tuple[str, int] | None:
    """(format, bytes on disk) of the model a stage folder holds, or None: the first registered backend
    (engine/config/registry.py) whose files the folder holds all of, by its report name."""
    for backend in backend_classes():
        if backend.report_name is None:  # stored logits, not a model file format
            continue
        paths = [folder / f for f in backend.model_files()]
        if all(p.is_file() for p in paths):
            return backend.report_name, sum(p.stat().st_size for p in paths)
    return None


def mb(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:.2f} MB"


# -- model.pt metadata, without torch -----------------------------------------------------------------
class _Anything:
    """Stands in for torch classes named in the pickle (storages, dtypes): takes anything, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass


def _tensor_shape(storage: Any, offset: Any, size: Any, *rest: Any) -> tuple[int, ...]:
    return tuple(size)


def _parameter(data: Any, *rest: Any) -> Any:
    return data


class _ShapesOnly(pickle.Unpickler):
    """Rebuilds model.pt's dicts with each tensor replaced by its shape; refuses any other global, so
    nothing in the file can run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _tensor_shape
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _parameter
        if module == "torch" or module.startswith("torch."):
            return _Anything
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in model.pt")

    def persistent_load(self, pid: Any) -> None:
        return None


def model_facts(model_pt: Path) -> dict[str, Any] | None:
    """{arch, num_classes, parameters} of an edgepipe model.pt (edgepipe.model/1), or None."""
    try:
        with zipfile.ZipFile(model_pt) as z:
            name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
            with z.open(name) as f:
                bundle = _ShapesOnly(f).load()
        shapes = {k: s for k, s in bundle["state_dict"].items() if isinstance(s, tuple)}
        if not all(_is_shape(s) for s in shapes.values()):
            return None  # facts that cannot be true are left out
        params = sum(math.prod(s) for k, s in shapes.items() if not str(k).endswith(BUFFERS))
        if params > MAX_COUNT:
            return None
        arch = bundle.get("arch") or {}
        num_classes = bundle.get("num_classes")
        return {"arch": str(arch.get("arch", "?") if isinstance(arch, dict) else arch)[:80],
                "num_classes": num_classes if _is_count(num_classes) else "?", "parameters": params}
    except (OSError, StopIteration, KeyError, TypeError, AttributeError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile, EOFError):
        return None


MAX_COUNT = 10**15  # more parameters, classes or elements than any model holds: the file lies


def _is_count(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_COUNT


def _is_shape(shape: Any) -> bool:
    """A tensor's shape as torch pickles it: a few dimensions, each a count, whose product is one too (a
    planted file's huge integers would otherwise reach the report's number formatting)."""
    return (isinstance(shape, tuple) and len(shape) <= 16 and all(_is_count(d) for d in shape)
            and math.prod(shape) <= MAX_COUNT)


# -- preprocess.json and packages ---------------------------------------------------------------------
def input_spec(folder: Path) -> dict[str, str] | None:
    try:
        p = json.loads((folder / "preprocess.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    size = p.get("input_size")
    return {"input size (H x W)": " x ".join(map(str, size)) if isinstance(size, list) else str(size),
            "resize": f"{p.get('resize', '?')} ({p.get('interpolation', '?')})",
            "mean (0..1)": str(p.get("mean")), "std (0..1)": str(p.get("std")),
            "channel order / layout": f"{p.get('channel_order', '?')} / {p.get('layout', '?')}"}


def package_facts(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / "package" / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    board = manifest.get("board") or {}
    model = manifest.get("model") or {}
    return {"board": board.get("name", "?"), "title": board.get("title", ""),
            "model": model.get("file", ""), "model_size": mb(model.get("bytes")),
            # which model ships and who makes its int8 (the board's words: manifest `quantization`)
            "quantization": str((manifest.get("quantization") or {}).get("note", "")),
            "zip": (folder / "package.zip") if (folder / "package.zip").is_file() else None}


# -- what differs from the defaults -------------------------------------------------------------------
def config_changes(run_dir: Path, config_sources: list[dict[str, Any]]) -> list[list[str]] | None:
    """[key, default, this run] for every value of .hydra/config.yaml that differs from the config composed
    without overrides from the same config folders; pipeline.* is left out (the config table names the
    pipeline). None when either cannot be read."""
    from omegaconf import OmegaConf

    try:
        ran = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=False)
        default = _default_config(config_sources)
    except Exception:  # noqa: BLE001 - a missing .hydra/ or a config folder gone: the summary says so
        return None
    a, b = _flat(default), _flat(ran)
    # keys only the default has belong to a config group option this run replaced (the config row names it)
    keys = [k for k in b if not k.startswith("pipeline.") and a.get(k, "-") != b[k]]
    return [[k, _show(a.get(k, "-")), _show(b[k])] for k in keys]


def _default_config(config_sources: list[dict[str, Any]]) -> dict:
    """The config `edgepipe run` composes with no overrides from the run's user config folder. Hydra's
    global state (which a running sweep may hold) is put back afterwards."""
    from hydra import compose as hydra_compose
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from engine.config.compose import CONFIG_NAME, USER_PROVIDER, hydra_session

    user = next((Path(s["folder"]) for s in config_sources if s.get("provider") == USER_PROVIDER), None)
    gh = GlobalHydra.instance()
    saved = gh.hydra if gh.is_initialized() else None
    try:
        with hydra_session(user):
            cfg = hydra_compose(CONFIG_NAME, overrides=[])
    finally:
        if saved is not None:
            gh.clear()
            gh.initialize(saved)
    return OmegaConf.to_container(cfg, resolve=False)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _show(v: Any) -> str:
    return json.dumps(v, default=str) if not isinstance(v, str) else v
