"""This checkout's engine overhead against another checkout's, taken in turns: wall seconds of `edgepipe
plan` and of a fully cached `edgepipe run`, each checkout with its own .venv, alternating which goes
first, so a change of load falls on both alike. For a change that should not cost time (a refactor):
the ratio should stay within noise (issue 25: within 10%).

    git worktree add /tmp/base HEAD~1 && (cd /tmp/base && make install)
    .venv/bin/python bench/engine_ab.py --base /tmp/base [--quickstart] [--repeat 15]

The 9-stage pipeline of cheap test stages (tests/engine_conf pipeline=nine) by default; --quickstart
the real quickstart (its first, cold run trains: about a minute per checkout). Not a test: figures from
one run on whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def wall(cmd: list[str], env: dict, cwd: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr.decode()[-2000:]}")
    return time.perf_counter() - t0


def workspace(repo: Path, quickstart: bool, tmp: str) -> tuple[list[str], dict, list[str]]:
    """(edgepipe command, environment, overrides) of one checkout, with its own runs/ and compose cache."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPIPE_")}
    env = {**clean, "EDGEPIPE_RUNS": f"{tmp}/runs", "EDGEPIPE_COMPOSE_CACHE": f"{tmp}/compose"}
    if quickstart:
        return [str(repo / ".venv" / "bin" / "edgepipe")], env, ["+experiment=quickstart"]
    env.update({"EDGEPIPE_CONFIG_DIR": str(repo / "tests" / "engine_conf"), "EDGEPIPE_PLUGINS": "engine_stages",
                "PYTHONPATH": str(repo / "tests")})
    return [str(repo / ".venv" / "bin" / "edgepipe")], env, ["pipeline=nine"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="the other checkout (with its own .venv)")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--quickstart", action="store_true", help="the real quickstart instead of the cheap stages")
    args = ap.parse_args()
    trees = {"base": args.base.resolve(), "this": HERE}
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs")
    times: dict[str, dict[str, list[float]]] = {name: {"plan": [], "run": []} for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        setups = {}
        for name, repo in trees.items():
            folder = Path(tmp) / name
            folder.mkdir()
            exe, env, overrides = workspace(repo, args.quickstart, str(folder))
            print(f"{name} ({repo}): cold run {wall([*exe, 'run', *overrides], env, str(folder)):.2f} s", flush=True)
            setups[name] = (exe, env, overrides, str(folder))
        for i in range(args.repeat):
            for name in list(trees)[:: 1 if i % 2 == 0 else -1]:  # who goes first alternates
                exe, env, overrides, folder = setups[name]
                times[name]["plan"].append(wall([*exe, "plan", *overrides], env, folder))
                times[name]["run"].append(wall([*exe, "run", *overrides], env, folder))
    for name in trees:
        plan, run = times[name]["plan"], times[name]["run"]
        print(f"  {name:<5} plan {statistics.median(plan):.3f} s (min {min(plan):.3f}), "
              f"fully cached run {statistics.median(run):.3f} s (min {min(run):.3f}), median of {args.repeat}")
    ratio = {k: statistics.median(times["this"][k]) / statistics.median(times["base"][k]) for k in ("plan", "run")}
    print(f"this/base: plan {ratio['plan']:.2f}x, fully cached run {ratio['run']:.2f}x")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
