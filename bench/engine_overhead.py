"""Prints the engine's own overhead: wall seconds of `edgepipe plan` and of a fully cached
`edgepipe run` on a 9-stage pipeline of cheap stages (the size of the full deployment pipeline).

Target (issue 2): each at most 1.0 s on a 2-core machine. For scale: `dvc repro` with nothing to do
takes about 1.9 s on an equivalent 9-stage pipeline; Hydra's compose alone about 0.45 s.

    .venv/bin/python bench/engine_overhead.py [--repeat 5] [--quickstart]

--quickstart also measures the real 11-stage quickstart (real stage modules imported for validation;
it first runs the quickstart cold once, about 1-2 minutes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EDGEPIPE = Path(sys.executable).parent / "edgepipe"


def wall(cmd: list[str], env: dict, cwd: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quickstart", action="store_true", help="also time the real quickstart (runs it once cold)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "EDGEPIPE_RUNS": f"{tmp}/runs", "EDGEPIPE_CONFIG_DIR": str(REPO / "tests" / "engine_conf"),
               "EDGEPIPE_PLUGINS": "engine_stages", "PYTHONPATH": str(REPO / "tests")}
        base = [str(EDGEPIPE)]
        overrides = ["pipeline=nine"]
        cold = wall(base + ["run", *overrides], env, tmp)
        plan = [wall(base + ["plan", *overrides], env, tmp) for _ in range(args.repeat)]
        cached = [wall(base + ["run", *overrides], env, tmp) for _ in range(args.repeat)]
        python = [wall([sys.executable, "-c", "pass"], env, tmp) for _ in range(args.repeat)]
    print(f"9-stage pipeline, {args.repeat} repeats, median wall seconds (2-core target <= 1.0 s)")
    print(f"  python -c pass (interpreter start) {statistics.median(python):6.3f}")
    print(f"  edgepipe run, cold (cheap stages)  {cold:6.3f}")
    print(f"  edgepipe plan                      {statistics.median(plan):6.3f}  (max {max(plan):.3f})")
    print(f"  edgepipe run, fully cached         {statistics.median(cached):6.3f}  (max {max(cached):.3f})")
    if args.quickstart:
        with tempfile.TemporaryDirectory() as tmp:
            env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPIPE_")}
            env["EDGEPIPE_RUNS"] = f"{tmp}/runs"
            cmd = [str(EDGEPIPE), "run", "+experiment=quickstart"]
            cold = wall(cmd, env, tmp)
            plan = [wall([str(EDGEPIPE), "plan", "+experiment=quickstart"], env, tmp) for _ in range(args.repeat)]
            cached = [wall(cmd, env, tmp) for _ in range(args.repeat)]
        print("real quickstart (11 stages, real stage modules)")
        print(f"  edgepipe run, cold                 {cold:6.1f}")
        print(f"  edgepipe plan                      {statistics.median(plan):6.3f}  (max {max(plan):.3f})")
        print(f"  edgepipe run, fully cached         {statistics.median(cached):6.3f}  (max {max(cached):.3f})")


if __name__ == "__main__":
    main()
