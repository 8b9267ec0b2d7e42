"""What a config file may make Python call, load or start: the one allow-list.

Hydra turns some config values into calls: every `_target_` it instantiates (the launcher and sweeper,
recursively with any nested `_target_`, e.g. `hydra.sweeper.sampler`; every `hydra.callbacks` entry),
the factories and classes of a logging config (`()`, `class`), and the function Optuna's sweeper
names in `hydra.sweeper.custom_search_space`. Other values decide what code the processes a job
starts load or run: `hydra.job.env_set` (every process a sweep job starts inherits it), the
launchers' options (a Ray runtime_env's `pip`/`py_modules`/`worker_process_setup_hook`, submitit's
`setup` lines, a folder whose pickles a worker loads) and the sweepers' params (Optuna applies its
fixed params to every trial). A config comes from a colleague and is data: so every such value
anywhere in the composed config (the job's and `hydra.*`, at any depth, lists too) must be one of
these lists before anything is instantiated, started or written; compose.check_targets refuses the
rest, and applies each `hydra.*` sweeper param to the config before asking.

Allow-lists, not block-lists: Hydra's own block-list (os.system, subprocess, ...) is not enough
(`pathlib.Path.write_text` as a callback writes a `.pth` file into site-packages), nor was one of
environment variables (`OPENSSL_CONF` names a library to load, `AWS_CONFIG_FILE` a command to run).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
SUBMITIT_SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
RAY_LAUNCHER = "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"

# Hydra's launcher and sweeper plugins (the classes their own configs name). edgepipe's own configs
# name no `_target_` today; a class edgepipe adds for Hydra to instantiate goes here too. Not Ray's
# AWS launcher: its config is shell commands run on the cluster and folders synced both ways.
ALLOWED_TARGETS = frozenset({
    BASIC_LAUNCHER, JOBLIB_LAUNCHER, SUBMITIT_LOCAL, SUBMITIT_SLURM, RAY_LAUNCHER,
    "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
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

# The environment variables a config may set (hydra.job.env_set around each sweep job, a Ray job's
# runtime_env.env_vars), each with the values it may take: how many threads and which GPUs a job
# uses, nothing that names a file, a library, a command or a key. README "Safety" says why each.
_COUNT = r"[1-9][0-9]{0,3}"
_GPU = r"(?:[0-9]{1,3}|(?:GPU|MIG)-[0-9A-Za-z/-]{1,80})"
ALLOWED_ENV: dict[str, re.Pattern] = {
    "OMP_NUM_THREADS": re.compile(rf"{_COUNT}(?:,{_COUNT})*"),  # OpenMP: torch, onnxruntime, ncnn
    "MKL_NUM_THREADS": re.compile(_COUNT),
    "OPENBLAS_NUM_THREADS": re.compile(_COUNT),
    "NUMEXPR_NUM_THREADS": re.compile(_COUNT),
    "NUMEXPR_MAX_THREADS": re.compile(_COUNT),
    "VECLIB_MAXIMUM_THREADS": re.compile(_COUNT),
    "BLIS_NUM_THREADS": re.compile(_COUNT),
    "CUDA_VISIBLE_DEVICES": re.compile(rf"|-1|{_GPU}(?:,{_GPU})*"),
    "CUBLAS_WORKSPACE_CONFIG": re.compile(r":[0-9]{1,6}:[0-9]{1,4}(?::[0-9]{1,6}:[0-9]{1,4})?"),
}
ENV_HINT = (f"a config may set only {', '.join(ALLOWED_ENV)} (thread counts and GPUs); "
            f"set anything else in your shell")

HINT = ("a config may name only Hydra's launcher and sweeper plugins and Optuna's samplers and pruners "
        "as _target_; nothing else in a config file is run")


def allowed(target: Any) -> bool:
    return isinstance(target, str) and (target in ALLOWED_TARGETS or bool(_OPTUNA_CLASS.fullmatch(target)))


def refused(tree: dict) -> Iterator[tuple[list, Any, str]]:
    """(key path, value, why) of every value in tree (a composed config as plain containers, with its
    `hydra` node) that would make Python call, load or start something not on the lists above."""
    for path, key, value in _items(tree, []):
        if key == "_target_" and not allowed(value):
            yield path, value, f"not an allowed _target_; {HINT}"
    hydra = _mapping(tree, "hydra")
    for name, callback in _mapping(hydra, "callbacks").items():
        if not isinstance(callback, dict) or "_target_" not in callback:
            yield ["hydra", "callbacks", name], callback, f"a Hydra callback without an allowed _target_; {HINT}"
    yield from _refused_sweeper(_mapping(hydra, "sweeper"))
    yield from refused_env(_mapping(hydra, "job").get("env_set"), ["hydra", "job", "env_set"])
    for section in _LOGGING:
        yield from _refused_logging(_mapping(hydra, section), ["hydra", section])
    launcher = _mapping(hydra, "launcher")
    if allowed(launcher.get("_target_")):  # another one is refused above
        yield from _refused_options(launcher, LAUNCHER_OPTIONS.get(launcher["_target_"], {}), ["hydra", "launcher"],
                                    _launcher_name(launcher["_target_"]))


def refused_env(env: Any, at: list) -> Iterator[tuple[list, Any, str]]:
    """Every variable of env (a mapping of name to value) off ALLOWED_ENV, or with a value it may not take."""
    if env is None:
        return
    if not isinstance(env, dict):
        yield at, env, "expected a mapping of environment variables to values"
        return
    for name, value in env.items():
        pattern = ALLOWED_ENV.get(str(name))
        if pattern is None:
            yield at + [name], value, f"not a variable a config may set; {ENV_HINT}"
        elif isinstance(value, bool) or not isinstance(value, (str, int)) or not pattern.fullmatch(str(value)):
            yield at + [name], value, f"not a value {name} may take here (e.g. {name}=4)"


def hydra_param(key: Any) -> list[str] | None:
    """A sweeper param's key path when it sets a `hydra.*` key (`++hydra.job.env_set.X` -> [hydra, job,
    env_set, X]), [] for a Hydra config group (`hydra/launcher`), None for the job's own keys."""
    name = str(key).lstrip("+~")
    if name.startswith("hydra/"):
        return []
    return name.split(".") if name == "hydra" or name.startswith("hydra.") else None


# -- sweepers ---------------------------------------------------------------------------------------------
def _refused_sweeper(sweeper: dict) -> Iterator[tuple[list, Any, str]]:
    at = ["hydra", "sweeper"]
    if sweeper.get("custom_search_space") is not None:
        yield (at + ["custom_search_space"], sweeper["custom_search_space"],
               "Optuna would call the function it names; leave it unset (search with hydra.sweeper.params)")
    for key, value in _mapping(sweeper, "search_space").items():
        if hydra_param(key) is not None:
            yield at + ["search_space", key], value, "Hydra's own settings cannot be searched"
    storage = sweeper.get("storage")
    if storage is not None and not (isinstance(storage, str) and _SQLITE_HERE.fullmatch(storage)
                                    and ".." not in storage.split("/")):
        yield (at + ["storage"], storage, "Optuna's storage may only be a SQLite file under the folder you run "
               "from (sqlite:///study.db)")


_SQLITE_HERE = re.compile(r"sqlite:///[\w.-][\w./-]{0,200}")


# -- launchers --------------------------------------------------------------------------------------------
# Each launcher's options, as Hydra passes them to it: a key that is not listed is refused, and a
# listed key's value must pass its check. What a launcher option could load or run is not listed:
# joblib's temp_folder and submitit's submitit_folder (folders whose pickles the workers load, kept
# in the sweep folder), submitit's `setup` (shell lines) and sbatch options such as --export or
# --output, Ray's runtime_env (pip, py_modules, working_dir, worker_process_setup_hook, conda,
# container...) except env_vars, Ray's address (a cluster's head sends back pickles; set RAY_ADDRESS
# in your shell) and its dashboard.
Check = Callable[[Any], str | None]


def _plain(value: Any) -> str | None:
    """A number, a flag or a short line of text (it may end up in a job script: no newline)."""
    if value is None or isinstance(value, (bool, int, float)):
        return None
    if isinstance(value, str) and len(value) <= 200 and value.isprintable():
        return None
    return "expected a number, true/false or one line of text"


def _number(value: Any) -> str | None:
    ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
    return None if ok else "expected a number"


def _one_of(*choices: Any) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"allowed here: {', '.join(map(str, choices))}"
    return check


def _exactly(expected: Any, why: str) -> Check:
    return lambda value: None if value == expected else why


def _resources(value: Any) -> str | None:
    ok = value is None or (isinstance(value, dict) and all(isinstance(k, str) and k.isprintable() and
                                                           _number(v) is None for k, v in value.items()))
    return None if ok else "expected a mapping of resource names to numbers"


def _runtime_env(value: Any) -> str | None:
    """A Ray runtime_env: env_vars only, of the variables env_set may set."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"env_vars"}:
        return ("a Ray runtime_env may only set env_vars (py_modules, pip, working_dir, "
                "worker_process_setup_hook, conda, container... install or run code)")
    problem = next(refused_env(value.get("env_vars"), ["env_vars"]), None)
    return None if problem is None else f"env_vars.{problem[0][-1]}: {problem[2]}"


_QUEUE = {"timeout_min": _number, "cpus_per_task": _number, "gpus_per_node": _number, "tasks_per_node": _number,
          "mem_gb": _number, "nodes": _number, "name": _plain, "stderr_to_stdout": _plain,
          "submitit_folder": _exactly("${hydra.sweep.dir}/.submitit/%j", "submitit's workers load the pickles in "
                                      "this folder: it stays in the sweep folder (${hydra.sweep.dir}/.submitit/%j)")}
# sbatch options (submitit writes `#SBATCH --KEY=VALUE`) that choose resources and scheduling only
_SBATCH = ("time", "mail_user", "mail_type", "nice", "reservation", "licenses", "hint", "wckey", "begin",
           "deadline", "requeue", "exclusive", "gpus", "gpus_per_node", "ntasks_per_node", "mem", "nodelist",
           "distribution", "cpu_freq")
_RAY_REMOTE = {"num_cpus": _number, "num_gpus": _number, "memory": _number, "resources": _resources,
               "max_calls": _number, "max_retries": _number, "accelerator_type": _plain,
               "scheduling_strategy": _one_of("DEFAULT", "SPREAD"), "runtime_env": _runtime_env}
LAUNCHER_OPTIONS: dict[str, dict] = {
    BASIC_LAUNCHER: {},
    JOBLIB_LAUNCHER: {
        "n_jobs": _number, "backend": _one_of(None, "loky", "threading", "multiprocessing"),
        "prefer": _one_of(None, "processes", "threads"), "require": _one_of(None, "sharedmem"),
        "verbose": _number, "timeout": _number, "pre_dispatch": _plain, "batch_size": _plain,
        "max_nbytes": _plain, "mmap_mode": _one_of(None, "r+", "r", "w+", "c"),
        "temp_folder": _one_of(None)},
    SUBMITIT_LOCAL: _QUEUE,
    SUBMITIT_SLURM: {
        **_QUEUE, **dict.fromkeys(("partition", "qos", "comment", "constraint", "exclude", "gres", "mem_per_gpu",
                                   "mem_per_cpu", "account"), _plain),
        **dict.fromkeys(("cpus_per_gpu", "gpus_per_task", "signal_delay_s", "max_num_timeout",
                         "array_parallelism"), _number),
        "additional_parameters": dict.fromkeys(_SBATCH, _plain),
        "setup": _one_of(None, []),
    },
    RAY_LAUNCHER: {"ray": {
        "init": {"address": _one_of(None, "auto", "local"), "num_cpus": _number, "num_gpus": _number,
                 "resources": _resources, "object_store_memory": _number, "local_mode": _one_of(None, False, True),
                 "ignore_reinit_error": _one_of(None, False, True), "include_dashboard": _one_of(None, False),
                 "namespace": _plain, "log_to_driver": _one_of(None, False, True), "logging_level": _plain,
                 "runtime_env": _runtime_env},
        "remote": _RAY_REMOTE}},
}


def _launcher_name(target: str) -> str:
    return {BASIC_LAUNCHER: "basic", JOBLIB_LAUNCHER: "joblib", SUBMITIT_LOCAL: "submitit_local",
            SUBMITIT_SLURM: "submitit_slurm", RAY_LAUNCHER: "ray"}.get(target, target)


def _refused_options(node: Any, schema: dict, at: list, launcher: str) -> Iterator[tuple[list, Any, str]]:
    if node is None and at[-1] != "launcher":
        return
    if not isinstance(node, dict):
        yield at, node, "expected a mapping"
        return
    for key, value in node.items():
        check = schema.get(key)
        if key == "_target_" and at == ["hydra", "launcher"]:
            continue  # checked with every _target_
        if check is None:
            yield (at + [key], value, f"not an option a config may give the {launcher} launcher (allowed: "
                   f"{', '.join(schema) or 'none'}); see README 'Safety'")
        elif isinstance(check, dict):
            yield from _refused_options(value, check, at + [key], launcher)
        elif (problem := check(value)) is not None:
            yield at + [key], value, problem


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
