"""The engine's own overhead: wall seconds of `edgepipe plan` and of a fully cached `edgepipe run`,
side by side with `dvc repro` with nothing to do on an equivalent dvc.yaml (written here), as a ratio.

    .venv/bin/python bench/engine_overhead.py [--repeat 5] [--quickstart] [--dvc PATH]

The 9-stage pipeline of cheap test stages (tests/engine_conf pipeline=nine, the size of the full
deployment pipeline) always; --quickstart also the real 11-stage quickstart (real stage modules
imported for validation; it first runs the quickstart cold once, a few minutes). The dvc.yaml has one
stage per edgepipe stage with the same dependencies (each stage's `needs`), each a `cat` of its
dependencies' outputs into its own. Targets (issue 11): cached run and plan <= 0.5x `dvc repro`.
dvc: --dvc PATH, $EDGEPIPE_BENCH_DVC, else `dvc` on PATH (install it in a venv of its own:
python3 -m venv /tmp/dvcvenv && /tmp/dvcvenv/bin/pip install dvc). A composed config is kept by
engine/compose_cache.py (in a temp folder here): the cold run composes, the rest find it. Figures
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
EDGEPIPE = Path(sys.executable).parent / "edgepipe"


def wall(cmd: list[str], env: dict, cwd: str | Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr.decode()[-2000:]}")
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


def measure(title: str, env: dict, overrides: list[str], repeat: int, dvc: str | None, tmp: Path) -> None:
    base = [str(EDGEPIPE)]
    job = subprocess.run(base + ["run", "--cfg", "job", *overrides], env=env, cwd=tmp, capture_output=True,
                         text=True, check=True)
    stages = yaml.safe_load(job.stdout)["pipeline"]["stages"]
    cold = wall(base + ["run", *overrides], env, tmp)
    noop_cmd = _dvc_project(dvc, stages, env, tmp) if dvc else None
    plan, cached, noop = [], [], []
    for _ in range(repeat):  # in turns, so a change of load falls on both sides alike
        plan.append(wall(base + ["plan", *overrides], env, tmp))
        cached.append(wall(base + ["run", *overrides], env, tmp))
        if noop_cmd:
            noop.append(wall(*noop_cmd))
    python = [wall([sys.executable, "-c", "pass"], env, tmp) for _ in range(repeat)]
    print(f"{title}: {len(stages)} stages, {repeat} repeats, median wall seconds")
    print(f"  python -c pass (interpreter start) {statistics.median(python):6.3f}")
    print(f"  edgepipe run, cold                 {cold:6.3f}")
    print(f"  edgepipe plan                      {statistics.median(plan):6.3f}  (max {max(plan):.3f})")
    print(f"  edgepipe run, fully cached         {statistics.median(cached):6.3f}  (max {max(cached):.3f})")
    if not noop:
        print("  dvc: not found (--dvc PATH, EDGEPIPE_BENCH_DVC, or dvc on PATH)")
        return
    print(f"  dvc repro, nothing to do           {statistics.median(noop):6.3f}  (max {max(noop):.3f})")
    print(f"  ratio: cached run {statistics.median(cached) / statistics.median(noop):.2f}x, plan "
          f"{statistics.median(plan) / statistics.median(noop):.2f}x of dvc repro (target <= 0.5x)")


def _dvc_project(dvc: str, stages: dict, env: dict, tmp: Path) -> tuple[list[str], dict, Path]:
    """The equivalent dvc.yaml, reproduced once: returns `dvc repro` (nothing to do) as wall()'s args."""
    proj = tmp / "dvc"
    proj.mkdir()
    (proj / "dvc.yaml").write_text(dvc_yaml(stages))
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=proj, env=env, check=True)
    wall([dvc, "repro", "-q"], env, proj)
    return [dvc, "repro"], env, proj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quickstart", action="store_true", help="also time the real quickstart (runs it once cold)")
    ap.add_argument("--dvc", help="the dvc command (default: $EDGEPIPE_BENCH_DVC, else dvc on PATH)")
    args = ap.parse_args()
    dvc = args.dvc or os.environ.get("EDGEPIPE_BENCH_DVC") or shutil.which("dvc")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPIPE_")}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**clean, "EDGEPIPE_RUNS": f"{tmp}/runs", "EDGEPIPE_COMPOSE_CACHE": f"{tmp}/compose",
               "EDGEPIPE_CONFIG_DIR": str(REPO / "tests" / "engine_conf"), "EDGEPIPE_PLUGINS": "engine_stages",
               "PYTHONPATH": str(REPO / "tests")}
        measure("9-stage pipeline of cheap stages", env, ["pipeline=nine"], args.repeat, dvc, Path(tmp))
    if args.quickstart:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**clean, "EDGEPIPE_RUNS": f"{tmp}/runs", "EDGEPIPE_COMPOSE_CACHE": f"{tmp}/compose"}
            measure("real quickstart", env, ["+experiment=quickstart"], args.repeat, dvc, Path(tmp))
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
