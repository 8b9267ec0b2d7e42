"""Datasets at scale (issue 11): plan, the dataset stage, and `dvc status` side by side.

    .venv/bin/python bench/data_scale.py                                  # 100,000 files, 48 px, 10,000 photos
    .venv/bin/python bench/data_scale.py --n 5000 --size 32 --photo-n 500  # a few minutes on a busy machine
    .venv/bin/python bench/data_scale.py --photos-only --photo-n 3000      # parallel decoding only (~2 min)
    .venv/bin/python bench/data_scale.py --photos-only --photo-n 100000 --photo-distinct 500 --no-single --repeat 1
                                                                           # memory at 100,000 photos (~45 GB disk)
    .venv/bin/python bench/data_scale.py --dvc /tmp/dvcvenv/bin/dvc       # dvc from its own venv

Generates, in a temp folder, N small JPEGs (4 class folders, sources twice the input size) and prints
for them, through the `edgepipe` command (quickstart pipeline, dataset=folder): the first `plan`
(nothing indexed yet), the dataset stage's wall time and peak RSS, `plan` of the unchanged folder,
and after changing one file: `plan` and the dataset stage again (decoded images kept). Then
PHOTO-N photo-like JPEGs (448 px sources) decoded to 224 px by the stage in-process, as a first run
does (a fresh scratch folder: every image decoded, and kept), --repeat times per worker count in
turns: images/s (median), the speed-up of N workers over 1, the CPU seconds other processes took
during each run (Linux /proc/stat), and peak RSS above the interpreter's baseline after imports.
Use 2,000 photos or more: with a few hundred, starting the worker processes (~0.15 s) weighs on the
figure. With `dvc` (--dvc PATH, $EDGEPIPE_BENCH_DVC, else on PATH; install it in a venv of its own,
not edgepipe's) the same folder as the dependency of a one-stage dvc.yaml: `dvc repro` (first hash),
`dvc status` unchanged and after the change, and edgepipe's plan as a ratio of it. Figures from
runs on whatever else the machine is doing (the load average is printed): not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EDGEPIPE = Path(sys.executable).parent / "edgepipe"
CLASSES = ("a", "b", "c", "d")
PHOTO_SIZE = 224


def make_jpegs(folder: Path, n: int, size: int, distinct: int = 0) -> None:
    """n photo-like JPEGs (gradients and noise, twice the input size so resize does work). With
    ``distinct`` (> 0), only that many are generated (~27 ms each at 448 px) and the rest are copies
    of them with the file's number appended after the JPEG's end: distinct files (other bytes, so
    other sha256) that decode to the same pixels with the same work."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    side = max(size * 2, 32)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    for c in CLASSES:
        (folder / c).mkdir(parents=True, exist_ok=True)
    made: list[bytes] = []
    for i in range(n):
        c = i % len(CLASSES)
        path = folder / CLASSES[c] / f"{i:06d}.jpg"
        if distinct and i >= distinct:
            path.write_bytes(made[i % distinct] + i.to_bytes(4, "little"))
            continue
        base = (ramp[None, :, None] * (c + 1) / len(CLASSES) + ramp[:, None, None] * rng.random(3)) % 256
        img = np.clip(base + rng.normal(0, 20, (side, side, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(path, quality=90)
        if distinct:
            made.append(path.read_bytes())


def timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MB of the command's largest process) of one command; exits on failure."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr.decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat), else None."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def child(folder: str, workers: int, size: int, out: str) -> None:
    """Run the stage once in this process, as a first run (a fresh scratch folder beside ``out``); print
    one JSON line of figures, with the CPU time other processes took meanwhile (figures taken while
    the machine did other work are not the stage's)."""
    from engine.run.testing import run_stage
    from stages.dataset import Dataset

    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    busy0, own0 = busy_seconds(), own_cpu_seconds()
    t0 = time.perf_counter()
    m = run_stage(Dataset, {"kind": "folder", "path": folder, "workers": workers, "preprocess": {"input_size": size}},
                  {}, Path(out), scratch=Path(f"{out}.scratch"))
    seconds = time.perf_counter() - t0
    busy1, own1 = busy_seconds(), own_cpu_seconds()
    n = m["n_train"] + m["n_val"] + m["n_test"]
    print(json.dumps({"images": n, "seconds": seconds, "decoded": m["decoded"],
                      "others_cpu": None if busy0 is None else max(0.0, busy1 - busy0 - (own1 - own0)),
                      "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024,
                      "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                      "pixels_mb": n * size * size * 3 / 2**20}))


def find_dvc(named: str | None) -> str | None:
    return named or os.environ.get("EDGEPIPE_BENCH_DVC") or shutil.which("dvc")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="small JPEGs for plan and the stage (default 100000)")
    ap.add_argument("--size", type=int, default=48, help="their input size in pixels (default 48)")
    ap.add_argument("--photo-n", type=int, default=10_000,
                    help=f"photos decoded to {PHOTO_SIZE} px (default 10000; 0: skip)")
    ap.add_argument("--photo-distinct", type=int, default=0, metavar="K",
                    help="generate K photos, the rest copies with other trailing bytes (default 0: all generated)")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                    help="N of 'images/s at 1 and N workers'")
    ap.add_argument("--no-single", action="store_true", help="photo runs at N workers only (no 1-worker runs)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each unchanged plan/status and photo run (median)")
    ap.add_argument("--dvc", help="the dvc command (default: $EDGEPIPE_BENCH_DVC, else dvc on PATH)")
    ap.add_argument("--plan-only", action="store_true", help="plan and dvc figures only: no dataset stage, no photos")
    ap.add_argument("--photos-only", action="store_true", help="the photo figures only (images/s per worker count)")
    ap.add_argument("--child", nargs=4, metavar=("FOLDER", "WORKERS", "SIZE", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], int(a.child[1]), int(a.child[2]), a.child[3])
        return
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as tmp:
        tmp = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPIPE_")}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", EDGEPIPE_RUNS=str(tmp / "runs"),
                   EDGEPIPE_COMPOSE_CACHE=str(tmp / "compose"))
        if a.photos_only:
            photo_figures(a, tmp, env)
            print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            return
        t0 = time.perf_counter()
        make_jpegs(tmp / "data", a.n, a.size)
        print(f"{a.n} JPEGs of {a.size * 2} px generated in {time.perf_counter() - t0:.0f} s; input {a.size} px")
        edgepipe = Edgepipe(a, tmp, env)
        dvc = Dvc(find_dvc(a.dvc), a, tmp, env)
        rows = {"first plan / dvc repro (every file hashed)": [edgepipe.plan(), dvc.first()]}
        if not a.plan_only:
            seconds, peak = edgepipe.stage()
            rows["dataset stage, first run, s"] = [seconds, None]
            rows["  its peak RSS MB (largest process)"] = [peak, None]
        rows["plan unchanged / dvc status"] = [edgepipe.plan(a.repeat), dvc.status(a.repeat)]
        changed = tmp / "data" / CLASSES[0] / f"{0:06d}.jpg"
        changed.write_bytes(changed.read_bytes() + b"\0")  # one more byte after the JPEG's end: new content
        rows["plan, one file changed / dvc status"] = [edgepipe.plan(), dvc.status()]
        if not a.plan_only:
            seconds, peak = edgepipe.stage()
            rows["dataset stage, one file changed, s"] = [seconds, None]
            rows["  its peak RSS MB (one file changed)"] = [peak, None]
        print_rows(rows)
        if not dvc.cmd:
            print("dvc: not found (--dvc PATH, EDGEPIPE_BENCH_DVC, or dvc on PATH); its column is empty")
        if a.photo_n and not a.plan_only:
            photo_figures(a, tmp, env)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


class Edgepipe:
    """`edgepipe plan` and the dataset stage (`run --only data`) of the quickstart on the folder."""

    def __init__(self, a, tmp: Path, env: dict) -> None:
        self.tmp, self.env = tmp, env
        self.overrides = ["+experiment=quickstart", "dataset=folder", f"dataset.path={tmp / 'data'}",
                          f"preprocess.input_size={a.size}"]

    def plan(self, repeat: int = 1) -> float:
        return statistics.median(timed([str(EDGEPIPE), "plan", *self.overrides], self.env, self.tmp)[0]
                                 for _ in range(repeat))

    def stage(self) -> tuple[float, float]:
        seconds, peak = timed([str(EDGEPIPE), "run", "--only", "data", *self.overrides], self.env, self.tmp)
        rec = json.loads((self.tmp / "runs" / "latest" / "run.json").read_text())["stages"]["data"]
        print(f"  dataset stage: {seconds:.2f} s wall for the command, {rec['seconds']:.2f} s in the stage, "
              f"{rec['metrics']['decoded']} images decoded")
        return seconds, peak


class Dvc:
    """dvc on the same folder: a one-stage dvc.yaml (written here) whose dependency is data/."""

    def __init__(self, cmd: str | None, a, tmp: Path, env: dict) -> None:
        self.cmd, self.tmp, self.env = cmd, tmp, env
        if cmd:
            (tmp / "dvc.yaml").write_text("stages:\n  data:\n    cmd: 'true'\n    deps: [data]\n")
            subprocess.run([cmd, "init", "--no-scm", "-q"], cwd=tmp, env=env, check=True)

    def first(self) -> float | None:
        return timed([self.cmd, "repro", "-q"], self.env, self.tmp)[0] if self.cmd else None

    def status(self, repeat: int = 1) -> float | None:
        if not self.cmd:
            return None
        return statistics.median(timed([self.cmd, "status"], self.env, self.tmp)[0] for _ in range(repeat))


def print_rows(rows: dict[str, list]) -> None:
    print(f"{'':<44} {'edgepipe':>9} {'dvc':>9} {'ratio':>7}")
    for name, (ours, theirs) in rows.items():
        ratio = f"{ours / theirs:7.2f}" if ours and theirs else ""
        print(f"{name:<44} {_fmt(ours):>9} {_fmt(theirs):>9} {ratio}")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def photo_figures(a, tmp: Path, env: dict) -> None:
    photos = tmp / "photos"
    t0 = time.perf_counter()
    make_jpegs(photos, a.photo_n, PHOTO_SIZE, a.photo_distinct)
    print(f"{a.photo_n} photos generated in {time.perf_counter() - t0:.0f} s"
          + (f" ({a.photo_distinct} distinct, the rest copies with other trailing bytes)" if a.photo_distinct else ""))
    counts = [a.workers] if a.no_single else sorted({1, a.workers})
    print(f"\n{a.photo_n} photo-like JPEGs of {PHOTO_SIZE * 2} px -> {PHOTO_SIZE} px, the stage in-process, "
          f"{a.repeat} run(s) per worker count in turns:")
    runs: dict[int, list[dict]] = {w: [] for w in counts}
    for k in range(a.repeat):
        for w in counts:
            out = tmp / f"photos_out{w}_{k}"
            r = subprocess.run([sys.executable, __file__, "--child", str(photos), str(w), str(PHOTO_SIZE), str(out)],
                               cwd=ROOT, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"photos (workers={w}) failed:\n{r.stderr[-2000:]}")
            runs[w].append(json.loads(r.stdout.strip().splitlines()[-1]))
            shutil.rmtree(out)
            shutil.rmtree(f"{out}.scratch")
    rate = {w: [f["images"] / f["seconds"] for f in runs[w]] for w in counts}
    print(f"{'workers':>7} {'images/s (median)':>18} {'each run':>16} {'others CPU s':>16} {'peak RSS MB':>12} "
          f"{'worker MB':>10} {'pixels MB':>10}")
    for w in counts:
        others = [f["others_cpu"] for f in runs[w]]
        print(f"{w:>7} {statistics.median(rate[w]):>18.0f} {' '.join(f'{x:.0f}' for x in rate[w]):>16} "
              f"{' '.join('-' if x is None else f'{x:.1f}' for x in others):>16} "
              f"{max(r['peak_mb'] for r in runs[w]):>12.1f} {max(r['worker_peak_mb'] for r in runs[w]):>10.1f} "
              f"{runs[w][-1]['pixels_mb']:>10.1f}")
    if len(counts) > 1:
        w = counts[-1]
        print(f"{w} workers vs 1: {statistics.median(rate[w]) / statistics.median(rate[1]):.2f}x (medians); "
              f"'others CPU s' is what other processes took during each run: figures with more than a few "
              f"tenths there are not this stage's alone")


if __name__ == "__main__":
    main()
