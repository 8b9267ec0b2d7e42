"""Peak memory of dataset, train and evaluate on a large split (issue 11: none loads a whole split).

    .venv/bin/python bench/split_memory.py                           # 100,000 JPEGs at 32 px, 90 % test
    .venv/bin/python bench/split_memory.py --n 20000 --data /tmp/d   # keep the generated folder in /tmp/d

Generates N small JPEGs (bench/data_scale.py's generator; --data keeps them for a second run), then
runs each stage in a process of its own, in turn: the dataset stage (split test = --test, decoded
images kept in a scratch folder beside the outputs), one short epoch of training (MobileNetV3-Small,
--train-batches batches), and evaluate of the PyTorch model on the whole test split. For each it
prints wall seconds, peak RSS of the process, its baseline (after imports, before the stage runs)
and the split's size in memory, so the figure to read is peak minus baseline against the split;
"child MB" is the peak of its largest child process: the dataset stage's decoding workers (0 when
nothing was decoded), for train and evaluate a helper some library forks (it counts the parent's
pages it shares until it execs: not memory of its own).
Figures from runs on whatever else the machine is doing: not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def child(stage: str, work: Path, size: int, test: float, batches: int) -> None:
    """Run one stage here and print one JSON line of figures."""
    from engine.run.testing import run_stage

    if stage == "dataset":
        from stages.dataset import Dataset as cls

        params = {"kind": "folder", "path": str(work / "data"), "preprocess": {"input_size": size},
                  "split": {"val": 0.02, "test": test}}
        inputs, scratch = {}, work / "scratch"
    elif stage == "train":
        import torch  # in the baseline, as for evaluate

        from stages.train import Train as cls

        params = {"epochs": 1, "batch_size": 64, "limit_train_batches": batches, "seed": 0,
                  "model": {"arch": "mobilenet_v3_small"}}
        inputs, scratch = {"data": work / "dataset"}, None
    else:
        import torch  # noqa: F401

        from stages.evaluate import Evaluate as cls

        params, inputs, scratch = {}, {"data": work / "dataset", "pytorch": work / "train"}, None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    run_stage(cls, params, inputs, work / stage, scratch=scratch)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "baseline_mb": base, "peak_mb": peak, "children_peak_mb": children}))


def split_mb(work: Path, split: str) -> float:
    import numpy as np

    return np.load(work / "dataset" / f"images_{split}.npy", mmap_mode="r").nbytes / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="JPEGs (default 100000)")
    ap.add_argument("--size", type=int, default=32, help="input size in pixels (default 32)")
    ap.add_argument("--test", type=float, default=0.9, help="share of the test split (default 0.9)")
    ap.add_argument("--train-batches", type=int, default=20, help="batches of the one training epoch (default 20)")
    ap.add_argument("--data", type=Path, help="a folder to keep the work in (default: a temp folder)")
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "WORK"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], Path(a.child[1]), a.size, a.test, a.train_batches)
        return
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as tmp:
        work = a.data or Path(tmp)
        if not (work / "data").is_dir():
            sys.path.insert(0, str(ROOT))
            from data_scale import make_jpegs

            t0 = time.perf_counter()
            make_jpegs(work / "data", a.n, a.size)
            print(f"{a.n} JPEGs of {a.size * 2} px generated in {time.perf_counter() - t0:.0f} s")
        env = {**os.environ, "OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))}
        print(f"{'stage':<9} {'seconds':>8} {'peak RSS MB':>12} {'baseline MB':>12} {'above MB':>9} {'child MB':>9}")
        for stage in ("dataset", "train", "evaluate"):
            r = subprocess.run([sys.executable, __file__, "--child", stage, str(work), "--size", str(a.size),
                                "--test", str(a.test), "--train-batches", str(a.train_batches)],
                               cwd=ROOT.parent, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{stage} failed:\n{r.stderr[-3000:]}")
            f = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{stage:<9} {f['seconds']:>8.1f} {f['peak_mb']:>12.0f} {f['baseline_mb']:>12.0f} "
                  f"{f['peak_mb'] - f['baseline_mb']:>9.0f} {f['children_peak_mb']:>9.0f}")
        print(f"splits: train {split_mb(work, 'train'):.0f} MB, test {split_mb(work, 'test'):.0f} MB of pixels")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
