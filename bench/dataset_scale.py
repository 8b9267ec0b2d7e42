"""Dataset stage at scale: images/s and peak memory for dataset.workers=1 and 2 (issue 11).

    .venv/bin/python bench/dataset_scale.py                      # 2,000 JPEGs at 64 px (small, the default)
    .venv/bin/python bench/dataset_scale.py --n 100000 --size 224  # the real figure (needs ~15 GB of disk)

Generates N JPEGs (4 class folders) in a temp folder, runs the dataset stage on them in a fresh
process per worker count and prints, side by side: images/s, the stage process's peak RSS above its
baseline after imports (resource.getrusage), the largest decoding worker's peak RSS, and the size of
the decoded arrays; then, with decoded images kept in a scratch folder (as the engine does), the
seconds of a first run and of a re-run after changing one file. Figures from one run on whatever
else the machine is doing: not a test.
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

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("a", "b", "c", "d")


def make_jpegs(folder: Path, n: int, size: int) -> None:
    """n photo-like JPEGs (gradients and noise, larger than the input size so resize does work)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    side = max(size * 2, 32)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    for c in CLASSES:
        (folder / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % len(CLASSES)
        base = (ramp[None, :, None] * (c + 1) / len(CLASSES) + ramp[:, None, None] * rng.random(3)) % 256
        img = np.clip(base + rng.normal(0, 20, (side, side, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / CLASSES[c] / f"{i:06d}.jpg", quality=90)


def child(folder: str, workers: int, size: int, out: str, scratch: str) -> None:
    """Run the stage once; print one JSON line of figures."""
    from engine.testing import run_stage
    from stages.dataset import Dataset

    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    m = run_stage(Dataset, {"kind": "folder", "path": folder, "workers": workers,
                            "preprocess": {"input_size": size}}, {}, Path(out),
                  scratch=Path(scratch) if scratch != "-" else None)
    seconds = time.perf_counter() - t0
    n = m["n_train"] + m["n_val"] + m["n_test"]
    print(json.dumps({
        "images": n,
        "seconds": seconds,
        "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024,
        "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "pixels_mb": n * size * size * 3 / 2**20,
        "decoded": m["decoded"],
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="number of JPEGs (default 2000)")
    ap.add_argument("--size", type=int, default=64, help="input size in pixels (default 64)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--child", nargs=5, metavar=("FOLDER", "WORKERS", "SIZE", "OUT", "SCRATCH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], int(a.child[1]), int(a.child[2]), a.child[3], a.child[4])
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as tmp:
        data = Path(tmp) / "data"
        make_jpegs(data, a.n, a.size)
        print(f"{a.n} JPEGs, input {a.size} px, {os.cpu_count()} CPUs")
        print(f"{'workers':>7} {'images/s':>9} {'peak RSS MB':>12} {'worker MB':>10} {'pixels MB':>10}")

        def stage(name: str, workers: int, scratch: str = "-") -> dict:
            r = subprocess.run([sys.executable, __file__, "--child", str(data), str(workers), str(a.size),
                                str(Path(tmp) / name), scratch], cwd=ROOT, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{name} (workers={workers}) failed:\n{r.stderr[-2000:]}")
            return json.loads(r.stdout.strip().splitlines()[-1])

        for w in a.workers:
            f = stage(f"out{w}", w)
            print(f"{w:>7} {f['images'] / f['seconds']:>9.0f} {f['peak_mb']:>12.1f} {f['worker_peak_mb']:>10.1f} "
                  f"{f['pixels_mb']:>10.1f}")
        w, scratch = max(a.workers), str(Path(tmp) / "scratch")
        first = stage("kept_first", w, scratch)
        changed = data / CLASSES[0] / f"{0:06d}.jpg"
        changed.write_bytes(changed.read_bytes() + b"\0")  # one more byte after the JPEG's end: new content
        again = stage("kept_changed", w, scratch)
        print(f"decoded images kept (workers={w}): first run {first['seconds']:.1f} s ({first['decoded']} decoded), "
              f"after changing one file {again['seconds']:.1f} s ({again['decoded']} decoded)")


if __name__ == "__main__":
    main()
