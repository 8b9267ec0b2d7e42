"""What a config file may make Python call: the one allow-list.

Hydra turns some config values into calls: every `_target_` it instantiates (the launcher and sweeper,
recursively with any nested `_target_`, e.g. `hydra.sweeper.sampler`; every `hydra.callbacks` entry),
the factories and classes of a logging config (`()`, `class`), and the function Optuna's sweeper
names in `hydra.sweeper.custom_search_space`; and `hydra.job.env_set` decides what code the processes
a job starts load. A config comes from a colleague and is data: so every such value anywhere in the
composed config (the job's and `hydra.*`, at any depth, lists too) must be one of these before
anything is instantiated or written; compose.check_targets refuses the rest.

Hydra's own block-list (os.system, subprocess, ...) is not enough: `pathlib.Path.write_text` as a
callback writes a `.pth` file into site-packages, which the next Python start runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

# Hydra's launcher and sweeper plugins (the classes their own configs name). edgepipe's own configs
# name no `_target_` today; a class edgepipe adds for Hydra to instantiate goes here too.
ALLOWED_TARGETS = frozenset({
    "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
    "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
    "hydra_plugins.hydra_ray_launcher.ray_aws_launcher.RayAWSLauncher",
    "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
})
# Optuna's samplers and pruners (and their parts, optuna.samplers.nsgaii.UniformCrossover): a public
# class of those packages, nothing else of them (no function, no private module).
_OPTUNA_CLASS = re.compile(r"optuna\.(?:samplers|pruners)(?:\.[a-z][a-z0-9]*)*\.[A-Z][A-Za-z0-9]*")

# What a logging config (hydra.job_logging, hydra.hydra_logging) may construct, and the log files it
# may write: those of Hydra's own logging configs (a handler writing a file the config names, with a
# format the config names, would write any text anywhere).
ALLOWED_LOGGING = frozenset({"logging.StreamHandler", "logging.FileHandler", "logging.NullHandler",
                             "logging.Formatter", "colorlog.ColoredFormatter"})
HYDRA_LOG_FILES = frozenset({"${hydra.runtime.output_dir}/${hydra.job.name}.log",  # job_logging=default
                             "hydra-${hydra.job.name}.log"})  # hydra_logging=hydra_debug
_LOGGING = ("job_logging", "hydra_logging")

# Environment variables a sweep job sets (hydra.job.env_set, around each job: every process it starts
# inherits them) that decide what code a process loads: a library preloaded, a sitecustomize.py on
# the Python path, another interpreter or tool first on PATH. Set those in your shell, not a config.
_LOADER_ENV = re.compile(r"(?:LD_|DYLD_|PYTHON)\w*|PATH|BASH_ENV|ENV", re.IGNORECASE)

HINT = ("a config may name only Hydra's launcher and sweeper plugins and Optuna's samplers and pruners "
        "as _target_; nothing else in a config file is run")


def allowed(target: Any) -> bool:
    return isinstance(target, str) and (target in ALLOWED_TARGETS or bool(_OPTUNA_CLASS.fullmatch(target)))


def refused(tree: dict) -> Iterator[tuple[list, Any, str]]:
    """(key path, value, why) of every value in tree (a composed config as plain containers, with its
    `hydra` node) that would make Python call something not on the lists above."""
    for path, key, value in _items(tree, []):
        if key == "_target_" and not allowed(value):
            yield path, value, f"not an allowed _target_; {HINT}"
    hydra = _mapping(tree, "hydra")
    for name, callback in _mapping(hydra, "callbacks").items():
        if not isinstance(callback, dict) or "_target_" not in callback:
            yield ["hydra", "callbacks", name], callback, f"a Hydra callback without an allowed _target_; {HINT}"
    sweeper = _mapping(hydra, "sweeper")
    if sweeper.get("custom_search_space") is not None:
        yield (["hydra", "sweeper", "custom_search_space"], sweeper["custom_search_space"],
               "Optuna would call the function it names; leave it unset (search with hydra.sweeper.params)")
    for name, value in _mapping(_mapping(hydra, "job"), "env_set").items():
        if _LOADER_ENV.fullmatch(str(name)):
            yield (["hydra", "job", "env_set", name], value,
                   "a config may not set a variable that decides what code a process loads; set it in your shell")
    for section in _LOGGING:
        yield from _refused_logging(_mapping(hydra, section), ["hydra", section])


def _mapping(node: dict, key: str) -> dict:
    value = node.get(key)
    return value if isinstance(value, dict) else {}


def _refused_logging(config: dict, at: list) -> Iterator[tuple[list, Any, str]]:
    for path, key, value in _items(config, at):
        if key in ("()", "class") and value not in ALLOWED_LOGGING:
            yield path, value, f"not an allowed logging class (allowed: {', '.join(sorted(ALLOWED_LOGGING))})"
        elif key == "filename" and value not in HYDRA_LOG_FILES:
            yield path, value, f"a log file may only be one of Hydra's own: {', '.join(sorted(HYDRA_LOG_FILES))}"
        elif key == ".":  # attributes set after construction (a handler's baseFilename)
            yield path, value, "a logging config may not set attributes ('.')"


def _items(node: Any, at: list) -> Iterator[tuple[list, Any, Any]]:
    """(path, key, value) of every mapping item under node, at any depth, through lists too."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield at + [key], key, value
            yield from _items(value, at + [key])
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _items(value, at + [i])


def dotted(path: list) -> str:
    """hydra.callbacks.x._args_[0]._target_"""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
