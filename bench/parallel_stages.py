"""Stages in parallel: the quickstart's cold wall time at `run --jobs 1` and `--jobs 2`, and the ratio.

Each run is the `edgepipe` command itself, cold, in a fresh temporary runs root (nothing cached,
nothing shared between the two), one after the other, on an otherwise idle machine — the figures
mean nothing while other work competes for the cores. Also printed per run: each stage's seconds
from run.json, and the worker processes' peak RSS from edgepipe.log (what the stages declare as
`peak_memory_mb` is checked against it).

    .venv/bin/python bench/parallel_stages.py                       # the quickstart as shipped (minutes)
    .venv/bin/python bench/parallel_stages.py --small --only ncnn,rknn_normal  # checks the script quickly
    .venv/bin/python bench/parallel_stages.py --jobs 1 4 -- train.epochs=2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EDGEPIPE = Path(sys.executable).parent / "edgepipe"
SMALL = ["train.epochs=1", "train.limit_train_batches=2", "train.bn_recalibrate_images=64"]


def cold_run(jobs: int, overrides: list[str], only: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"edgepipe-bench-j{jobs}-") as tmp:
        env = {**os.environ, "EDGEPIPE_RUNS": str(Path(tmp) / "runs")}
        env.pop("EDGEPIPE_PLUGINS", None)
        t0 = time.perf_counter()
        select = ["--only", only] if only else []
        proc = subprocess.run([str(EDGEPIPE), "run", "--jobs", str(jobs), *select, "+experiment=quickstart",
                               *overrides],
                              cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"--jobs {jobs}: edgepipe exited with {proc.returncode}:\n{proc.stdout[-3000:]}")
        latest = Path(tmp) / "runs" / "latest"
        run = json.loads((latest / "run.json").read_text())
        log = (latest / "edgepipe.log").read_text()
        rss = {m[0]: float(m[1]) for m in re.findall(r"stage (\S+): worker peak RSS (\d+) MB", log)}
        return {"wall": wall, "stages": {k: v["seconds"] for k, v in run["stages"].items()}, "rss": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, nargs=2, default=[1, 2], metavar=("A", "B"), help="the two --jobs to compare")
    ap.add_argument("--small", action="store_true", help="1 epoch of 2 batches (checks the script, not a figure)")
    ap.add_argument("--only", help="these stages and what they need (checks the script, not a figure)")
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides for both runs (after --)")
    a = ap.parse_args()
    overrides = (SMALL if a.small else []) + a.overrides
    print(f"quickstart cold, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, overrides: "
          f"{' '.join(overrides) or '(none)'}")
    results = {}
    for jobs in a.jobs:
        results[jobs] = r = cold_run(jobs, overrides, a.only)
        print(f"--jobs {jobs}: {r['wall']:.1f} s wall")
        for name, seconds in r["stages"].items():
            peak = f"  worker peak RSS {r['rss'][name]:.0f} MB" if name in r["rss"] else ""
            print(f"    {name:<14} {seconds:7.1f} s{peak}")
    one, two = (results[j]["wall"] for j in a.jobs)
    print(f"ratio --jobs {a.jobs[1]} / --jobs {a.jobs[0]}: {two / one:.2f} (load average now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
