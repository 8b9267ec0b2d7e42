"""The engine's own overhead on every built-in experiment: wall seconds of `edgepipe plan` and of a
fully cached `edgepipe run`, side by side with `dvc status` and `dvc repro` (nothing to do) on a
dvc.yaml of the same DAG shape (written here), as ratios.

    .venv/bin/python bench/engine_overhead.py [--repeat 5] [--dvc PATH] [--only quickstart,...] [--cheap] [--plan-only]

Each experiment of conf/experiment/ (and, with --cheap, the 9-stage pipeline of cheap test stages,
tests/engine_conf pipeline=nine) is first run cold once, on generated data and with settings that
make the cold run short without changing its DAG (one epoch, 32 px, few calibration images: see
COLD; the engine's work on a cached run does not depend on them), then timed in turns with dvc.
Experiments that start from torchvision's weights by name (`model.pretrained: imagenet`) find them in
a torch cache of the bench's own ($TORCH_HOME: randomly initialised state_dicts under torchvision's
file names, as the tests place them); nothing is downloaded. The dvc.yaml has one stage per edgepipe
stage with the same dependencies (each stage's `needs` and `after`), each a `cat` of its
dependencies' outputs into its own. Goal (issue 33): plan and cached run <= 0.25x DVC. dvc: --dvc
PATH, $EDGEPIPE_BENCH_DVC, else `dvc` on PATH (install it in a venv of its own: python3 -m venv
/tmp/dvcvenv && /tmp/dvcvenv/bin/pip install dvc). Composed configs and validated plans are kept in a
temp folder (engine/compose_cache.py, plan_memo): the cold run fills it, like any first run. Figures
from one run on whatever else the machine is doing (the load average is printed): not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
EDGEPIPE = Path(sys.executable).parent / "edgepipe"
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))

# Settings for the one cold run of each experiment: the same stages and wiring, less work.
_SMALL = ["train.epochs=1", "preprocess.input_size=32", "calibration.count=4", "package.enforce_targets=false"]
_RKNN = ["quantize.accuracy_analysis_samples=0", "quantize.data_limit=8", "export.tolerance=0.05"]
COLD = {"quickstart": [*_SMALL, *_RKNN], "rv1103_mobilenetv3": [*_SMALL, *_RKNN],
        "v831_resnet18": [*_SMALL, "export.tolerance=0.05"], "onnx_catsdogs": _SMALL,
        "mnist_gem_resnet": _SMALL}


class Failed(Exception):
    pass


def wall(cmd: list[str], env: dict, cwd: str | Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if r.returncode != 0:
        raise Failed(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr.decode()[-2000:]}")
    return time.perf_counter() - t0


def dvc_yaml(stages: dict) -> str:
    """One dvc stage per edgepipe stage: deps = the outputs of the stages it needs (and runs after)."""
    out = {}
    for name, spec in stages.items():
        upstream = sorted(set((spec.get("needs") or {}).values()) | set(spec.get("after") or []))
        deps = [f"{u}.out" for u in upstream]
        cmd = f"cat {' '.join(deps)} > {name}.out" if deps else f"echo {name} > {name}.out"
        out[name] = {"cmd": cmd, **({"deps": deps} if deps else {}), "outs": [f"{name}.out"]}
    return yaml.safe_dump({"stages": out}, sort_keys=False)


def measure(title: str, env: dict, overrides: list[str], repeat: int, dvc: str | None, tmp: Path,
            plan_only: bool = False) -> dict:
    base = [str(EDGEPIPE)]
    job = subprocess.run(base + ["run", "--cfg", "job", *overrides], env=env, cwd=tmp, capture_output=True,
                         text=True, check=True)
    stages = yaml.safe_load(job.stdout)["pipeline"]["stages"]
    # plan_only: no cold run (seconds, not minutes): the plan of a config validated once, nothing cached
    cold = wall(base + ["plan" if plan_only else "run", *overrides], env, tmp)
    dvc_proj = _dvc_project(dvc, stages, env, tmp) if dvc else None
    times: dict[str, list[float]] = {"plan": [], "cached": [], "status": [], "repro": []}
    for _ in range(repeat):  # in turns, so a change of load falls on both sides alike
        times["plan"].append(wall(base + ["plan", *overrides], env, tmp))
        if not plan_only:
            times["cached"].append(wall(base + ["run", *overrides], env, tmp))
        if dvc_proj:
            times["status"].append(wall([dvc, "status"], env, dvc_proj))
            if not plan_only:
                times["repro"].append(wall([dvc, "repro"], env, dvc_proj))
    med = {k: statistics.median(v) if v else None for k, v in times.items()}
    print(f"{title}: {len(stages)} stages, first {'plan' if plan_only else 'run (cold)'} {cold:.1f} s, "
          f"{repeat} repeats, median wall seconds")
    print(f"  edgepipe plan {med['plan']:.3f} (max {max(times['plan']):.3f})"
          + ("" if plan_only else f", fully cached run {med['cached']:.3f} (max {max(times['cached']):.3f})"))
    if dvc_proj:
        repro = "" if plan_only else f", dvc repro (nothing to do) {med['repro']:.3f}"
        print(f"  dvc status {med['status']:.3f}{repro}")
        print(f"  ratio: plan {med['plan'] / med['status']:.2f}x dvc status"
              + ("" if plan_only else f", cached run {med['cached'] / med['repro']:.2f}x dvc repro")
              + " (goal <= 0.25x)")
    else:
        print("  dvc: not found (--dvc PATH, EDGEPIPE_BENCH_DVC, or dvc on PATH)")
    sys.stdout.flush()
    return {"title": title, "stages": len(stages), **med}


def _dvc_project(dvc: str, stages: dict, env: dict, tmp: Path) -> Path:
    """The equivalent dvc.yaml, reproduced once: the folder where `dvc status`/`dvc repro` have nothing to do."""
    proj = tmp / "dvc"
    proj.mkdir()
    (proj / "dvc.yaml").write_text(dvc_yaml(stages))
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=proj, env=env, check=True)
    wall([dvc, "repro", "-q"], env, proj)
    return proj


def experiment_setup(experiment: str, tmp: Path) -> tuple[list[str], dict]:
    """Generated data for the experiment (overrides) and a torch cache holding the weights it names."""
    from helpers_data import make_digit_filelist, make_folder_dataset, make_pretrained, torchvision_file_name

    text = (REPO / "conf" / "experiment" / f"{experiment}.yaml").read_text()
    env: dict = {}
    if "pretrained: imagenet" in text:
        arch = "resnet18" if "override /model: resnet18" in text else "mobilenet_v3_small"
        checkpoints = tmp / "torch_home" / "hub" / "checkpoints"
        checkpoints.mkdir(parents=True)
        make_pretrained(checkpoints / torchvision_file_name(arch), arch)
        env["TORCH_HOME"] = str(tmp / "torch_home")
    if "override /dataset: digits" in text:
        return [], env
    if "override /dataset: filelist" in text:
        return [f"dataset.path={make_digit_filelist(tmp / 'lists', count=120)}"], env
    return [f"dataset.path={make_folder_dataset(tmp / 'images', per_class=20)}"], env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dvc", help="the dvc command (default: $EDGEPIPE_BENCH_DVC, else dvc on PATH)")
    ap.add_argument("--only", help=f"comma-separated experiments (default: all of {', '.join(EXPERIMENTS)})")
    ap.add_argument("--cheap", action="store_true", help="also the 9-stage pipeline of cheap test stages")
    ap.add_argument("--plan-only", action="store_true",
                    help="time plan vs dvc status only, without the cold runs (seconds instead of minutes)")
    args = ap.parse_args()
    dvc = args.dvc or os.environ.get("EDGEPIPE_BENCH_DVC") or shutil.which("dvc")
    chosen = args.only.split(",") if args.only else EXPERIMENTS
    if unknown := sorted(set(chosen) - set(EXPERIMENTS)):
        sys.exit(f"--only: no experiment {', '.join(unknown)} (known: {', '.join(EXPERIMENTS)})")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs")
    # PYTHONDONTWRITEBYTECODE (set in some sandboxes) would compile every edited module on each command:
    # a user's Python keeps bytecode, so the bench does too
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("EDGEPIPE_") and k not in ("TORCH_HOME", "PYTHONDONTWRITEBYTECODE")}
    rows = []
    if args.cheap:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**clean, "EDGEPIPE_RUNS": f"{tmp}/runs", "EDGEPIPE_COMPOSE_CACHE": f"{tmp}/compose",
                   "EDGEPIPE_CONFIG_DIR": str(REPO / "tests" / "engine_conf"), "EDGEPIPE_PLUGINS": "engine_stages",
                   "PYTHONPATH": str(REPO / "tests")}
            rows.append(measure("pipeline=nine (cheap test stages)", env, ["pipeline=nine"], args.repeat, dvc,
                                Path(tmp), args.plan_only))
    for experiment in chosen:
        with tempfile.TemporaryDirectory() as tmp:
            data, torch_env = experiment_setup(experiment, Path(tmp))
            env = {**clean, **torch_env, "EDGEPIPE_RUNS": f"{tmp}/runs", "EDGEPIPE_COMPOSE_CACHE": f"{tmp}/compose"}
            try:
                rows.append(measure(experiment, env, [f"+experiment={experiment}", *data, *COLD[experiment]],
                                    args.repeat, dvc, Path(tmp), args.plan_only))
            except Failed as e:  # one experiment's failure leaves the others' figures
                print(f"{experiment}: {e}", flush=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if dvc:
        print("\n| experiment | stages | `plan` | `dvc status` | ratio | cached `run` | `dvc repro` | ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            cached = ("| - | - | - |" if r["cached"] is None else
                      f"| {r['cached']:.2f} s | {r['repro']:.2f} s | {r['cached'] / r['repro']:.2f}x |")
            print(f"| {r['title']} | {r['stages']} | {r['plan']:.2f} s | {r['status']:.2f} s | "
                  f"{r['plan'] / r['status']:.2f}x {cached}")


if __name__ == "__main__":
    main()
