"""BatchNorm recalibration on a small photo dataset: test accuracy with and without
``train.bn_recalibrate``, and what it costs, side by side (the plain run is the peer).

The dataset is the test suite's: two classes of photo crops (scikit-learn's sample images) at
224 px, ``--per-class`` images each, split 60/10/30 by regions of the photos (tests/helpers_data.py
make_photo_folder: test crops share no pixel with training crops). Each model is trained from scratch by the real
train stage (engine.run.testing.run_stage) with the same seed, once with recalibration and once without;
the stage's wall time, its ``bn_recalibrate_seconds`` and the test accuracy are printed. Time nothing
while tests run (two torch processes on 2 cores slow each other 10x).

    .venv/bin/python bench/bn_recalibration.py                       # both archs, 300/class, 3 epochs
    .venv/bin/python bench/bn_recalibration.py --arch resnet18 --per-class 150 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

ARCHS = {"mobilenet_v3_small": {"arch": "mobilenet_v3_small", "bn_momentum": 0.1}, "resnet18": {"arch": "resnet18"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=list(ARCHS), action="append")
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="keep data and runs here (default: a temp folder)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    work = args.work or Path(tempfile.mkdtemp(prefix="bn_bench_"))
    data = make_data(work, args.per_class)
    print(f"{'model':<20} {'recalibrate':>11} {'test_acc':>8} {'val_acc':>7} {'train_eval':>10} "
          f"{'stage s':>8} {'recal s':>8}")
    for arch in args.arch or list(ARCHS):
        for recal in (False, True):
            row = train(data, work / f"{arch}_{'recal' if recal else 'plain'}", arch, recal, args.epochs)
            print(f"{arch:<20} {str(recal):>11} {row['test_acc']:>8.3f} {row['val_acc']:>7.3f} "
                  f"{row['train_eval_acc']:>10.3f} {row['seconds']:>8.1f} {row['bn_recalibrate_seconds'] or 0:>8.1f}")


def make_data(work: Path, per_class: int) -> Path:
    from helpers_data import make_photo_folder, photo_folder_dataset

    from engine.run.testing import run_stage

    data = work / f"data_{per_class}"
    if not (data / "labels.txt").is_file():
        make_photo_folder(work / f"photos_{per_class}", per_class=per_class)
        run_stage("dataset", photo_folder_dataset(work / f"photos_{per_class}"), {}, data)
    return data


def train(data: Path, out: Path, arch: str, recal: bool, epochs: int) -> dict:
    from engine.run.testing import run_stage

    params = {"epochs": epochs, "batch_size": 32, "lr": 3e-3, "accelerator": "cpu", "seed": 0,
              "augment": {"hflip": 0.5}, "model": ARCHS[arch], "bn_recalibrate": recal}
    t0 = time.perf_counter()
    headline = run_stage("train", params, {"data": data}, out)
    return {**json.loads((out / "metrics.json").read_text()), "seconds": time.perf_counter() - t0,
            "bn_recalibrate_seconds": headline["bn_recalibrate_seconds"]}


if __name__ == "__main__":
    main()
