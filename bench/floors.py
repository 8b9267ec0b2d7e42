"""The accuracy floors of the tests on generated pictures, from the independent reference.

For each test dataset: the dataset is built exactly as the test builds it (the same helpers, the same
dataset-stage settings or experiment overrides), then tests/helpers_reference.py -- a plain PyTorch loop
written without edgepipe's training code: torchvision's model and transforms, AdamW + cosine,
``torch.optim.swa_utils.update_bn`` over a shuffled loader -- trains on the very arrays the dataset stage
wrote, with the test's epochs, lr, batch size and input size, and scores that split. Printed per row:
the reference's top-1, n (the images the test's floor is measured on) and the floor: the reference less
two binomial standard deviations on n (at least one image, ``helpers_reference.binomial_margin``),
rounded down to 0.01. Each floor in the tests names its row here.

Three stand-ins, all plain torchvision: ``resnet18`` with ``model.stem=small`` is torchvision's ResNet-18
with the usual small-input stem (3x3 stride-1 first conv, no max-pool), and the toy model (a MobileNetV3-
Small at width 0.5 trained for 80 Adam steps by tests/helpers_data.py) is referenced by torchvision's
MobileNetV3-Small trained the same 10 epochs on the toy's arrays; for multi-crop (mean probability of
three windows of each wide original file) the reference scores the first window, the toy picture itself.

Everything is kept under --work: a second run only prints.

    OMP_NUM_THREADS=1 flock /tmp/edgepipe-cpu.lock .venv/bin/python bench/floors.py --work /tmp/floors
    .venv/bin/python bench/floors.py --work /tmp/floors --only ddp_digits toy
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from helpers_reference import binomial_margin, reference_top1  # noqa: E402

SMALL_STEM = "resnet18_small_stem"


def _register_small_stem_resnet() -> None:
    """torchvision has no small-input ResNet-18; register the usual one under a name of its own so the
    reference builds it through torchvision's get_model like any other architecture."""
    import torch
    import torchvision
    from torchvision.models._api import BUILTIN_MODELS, register_model

    if SMALL_STEM in BUILTIN_MODELS:
        return

    @register_model(SMALL_STEM)
    def resnet18_small_stem(weights=None, num_classes: int = 1000):
        model = torchvision.models.resnet18(weights=weights, num_classes=num_classes)
        model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = torch.nn.Identity()
        return model


def _experiment_data(work: Path, name: str, *overrides: str) -> Path:
    """The dataset stage of ``+experiment=name`` with the test's overrides, through the real CLI."""
    from engine.cli.commands import main

    runs = work / f"runs_{name}"
    record_path = runs / "latest" / "run.json"
    if not record_path.is_file():
        assert main(["run", f"runs_root={runs}", f"+experiment={name}", *overrides, "--only", "data"]) == 0
    return Path(json.loads(record_path.read_text())["stages"]["data"]["path"])


def _dataset_stage(out: Path, params: dict) -> Path:
    from engine.run.testing import run_stage

    if not (out / "labels.txt").is_file():
        run_stage("dataset", params, {}, out)
    return out


# tests/board_tests/test_package.py's overrides (FAST, MOBILENET)
FAST = ["preprocess.input_size=32", "calibration.count=4", "dataset.split.test=0.3"]
MOBILENET = [*FAST, "train.epochs=5", "train.batch_size=16"]


def quickstart_digits(work: Path) -> Path:  # tests/e2e/test_quickstart.py
    return _experiment_data(work, "quickstart")


def package_v831(work: Path) -> Path:  # test_package.py::test_experiment_v831_resnet18
    from helpers_data import make_folder_dataset

    folder = work / "two_classes"
    if not folder.is_dir():
        make_folder_dataset(folder, classes=("ok", "defect"), per_class=20)
    return _experiment_data(work, "v831_resnet18", f"dataset.path={folder}", "model.stem=small",
                            "model.pretrained=null", "train.mode=fromscratch", *FAST)


def package_rv1103(work: Path) -> Path:  # test_package.py::test_experiment_rv1103_mobilenetv3
    from helpers_data import make_folder_dataset

    folder = work / "binary"
    if not folder.is_dir():
        make_folder_dataset(folder, classes=("no", "yes"), per_class=40)
    return _experiment_data(work, "rv1103_mobilenetv3", f"dataset.path={folder}",
                            f"model.pretrained={pretrained(work)}", *MOBILENET)


def package_mnist(work: Path) -> Path:  # test_package.py::test_experiment_mnist_gem_resnet
    from helpers_data import make_digit_filelist

    folder = work / "mnist_lists"
    if not folder.is_dir():
        make_digit_filelist(folder, count=500)
    return _experiment_data(work, "mnist_gem_resnet", f"dataset.path={folder}", "preprocess.input_size=16")


def package_catsdogs(work: Path) -> Path:  # test_package.py::test_experiment_onnx_catsdogs
    from helpers_data import make_folder_dataset

    folder = work / "catsdogs"
    if not folder.is_dir():
        make_folder_dataset(folder, classes=("cat", "dog"), per_class=40)
    return _experiment_data(work, "onnx_catsdogs", f"dataset.path={folder}", f"model.pretrained={pretrained(work)}",
                            *MOBILENET)


def bn_photos(work: Path) -> Path:  # tests/stage_tests/test_bn_recalibration.py's `data` fixture
    from helpers_data import make_photo_folder, photo_folder_dataset

    folder = work / "photos"
    if not folder.is_dir():
        make_photo_folder(folder)
    return _dataset_stage(work / "photos_data", photo_folder_dataset(folder))


def ddp_digits(work: Path) -> Path:  # tests/e2e/test_train_ddp.py's `digits` fixture
    return _dataset_stage(work / "ddp_digits", {"kind": "digits", "split": {"val": 0.0, "test": 0.2},
                                                "preprocess": {"input_size": 32}})


def toy_data(work: Path) -> Path:  # tests/helpers_data.py's toy(): test_evaluate.py, test_rknn.py
    from helpers_data import TOY_SIZE, write_dataset

    from stages.common.preprocess import Preprocess

    out = work / "toy"
    if not (out / "labels.txt").is_file():
        spec = Preprocess(input_size=(TOY_SIZE, TOY_SIZE), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        write_dataset(out, spec)
    return out


def wide_windows(work: Path) -> Path:  # test_evaluate.py::test_multicrop_on_original_files (wide_dataset)
    """The toy's arrays with, as the test split, the original of each test image of tests/helpers_data.py's
    wide_dataset (48 wide 64x32 files: a toy picture beside its mirror image, split 50% test by the
    dataset stage): its left 32x32 window, multi-crop's first crop, the toy picture itself."""
    import csv
    import shutil

    import numpy as np
    from helpers_data import TOY_CLASSES, toy_images
    from PIL import Image

    out = work / "wide_windows"
    if (out / "labels.txt").is_file():
        return out
    toy = toy_data(work)
    src = work / "wide" / "images"
    pictures, labels = toy_images(48, seed=7)
    for i, (a, c) in enumerate(zip(pictures, labels)):  # as wide_dataset writes them
        (src / TOY_CLASSES[c]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate([a, a[:, ::-1]], axis=1)).save(src / TOY_CLASSES[c] / f"{i:03d}.png")
    data = _dataset_stage(work / "wide" / "data", {
        "kind": "folder", "path": str(src), "classes": TOY_CLASSES, "split": {"val": 0.1, "test": 0.5},
        "preprocess": json.loads((toy / "preprocess.json").read_text())})
    with open(data / "index.csv", newline="", encoding="utf-8") as f:
        test = [int(Path(r["path"]).stem) for r in csv.DictReader(f) if r["split"] == "test"]
    assert np.array_equal(labels[test], np.load(data / "labels_test.npy"))
    shutil.copytree(toy, out.with_suffix(".tmp"))
    np.save(out.with_suffix(".tmp") / "images_test.npy", pictures[test])
    np.save(out.with_suffix(".tmp") / "labels_test.npy", labels[test])
    out.with_suffix(".tmp").rename(out)
    return out


def two_bands(work: Path) -> Path:  # test_train.py::test_finetune_onto_the_same_classes_in_swapped_order...
    from helpers_data import make_array_dataset

    out = work / "birds"
    if not (out / "labels.txt").is_file():
        make_array_dataset(out, {"train": 12, "val": 6, "test": 6}, num_classes=2)
    return out


def pretrained(work: Path) -> Path:
    """tests/helpers_data.py's make_pretrained: the random torchvision state_dict the tests start from."""
    from helpers_data import make_pretrained

    path = work / "mobilenet_v3_small.pth"
    return path if path.is_file() else make_pretrained(path)


# name -> (dataset builder, reference settings, [(what the floor guards, split, n)])
# settings: the test's arch (SMALL_STEM for model.stem=small), weights, epochs, lr, batch size, hflip
ROWS = {
    "quickstart_digits": (quickstart_digits, dict(arch="resnet18", epochs=6, lr=3e-3, batch_size=64),
                          [("test_quickstart fp32 top-1", "test", None)]),
    "package_v831": (package_v831, dict(arch=SMALL_STEM, epochs=3, lr=1e-3, batch_size=8, hflip=0.5),
                     [("test_experiment_v831_resnet18 every backend", "test", None)]),
    "package_rv1103": (package_rv1103, dict(arch="mobilenet_v3_small", weights=True, epochs=5, lr=3e-4, batch_size=16,
                                            hflip=0.5),
                       [("test_experiment_rv1103_mobilenetv3 pytorch/onnx", "test", None),
                        ("test_experiment_rv1103_mobilenetv3 rknn (quantize.data_limit=8)", "test", 8)]),
    "package_mnist": (package_mnist, dict(arch=SMALL_STEM, epochs=2, lr=1e-3, batch_size=16),
                      [("test_experiment_mnist_gem_resnet pytorch/onnx", "test", None)]),
    "package_catsdogs": (package_catsdogs, dict(arch="mobilenet_v3_small", weights=True, epochs=5, lr=3e-4,
                                                batch_size=16, hflip=0.5),
                         [("test_experiment_onnx_catsdogs pytorch/onnx", "test", None)]),
    "bn_photos_mobilenet": (bn_photos, dict(arch="mobilenet_v3_small", epochs=3, lr=3e-3, batch_size=32, hflip=0.5),
                            [("test_bn_recalibration mobilenet_v3_small", "test", None)]),
    "ddp_digits": (ddp_digits, dict(arch="resnet18", epochs=3, lr=3e-3, batch_size=64),
                   [("test_train_ddp test_acc", "test", None)]),
    "toy": (toy_data, dict(arch="mobilenet_v3_small", epochs=10, lr=3e-3, batch_size=32),
            [("test_evaluate toy model top-1", "test", None),
             ("test_rknn mmse sim_top1 (data_limit=16)", "test", 16)]),
    "wide_windows": (wide_windows, dict(arch="mobilenet_v3_small", epochs=10, lr=3e-3, batch_size=32),
                     [("test_evaluate multicrop_top1_mean (wide_dataset)", "test", None)]),
    "two_bands": (two_bands, dict(arch="mobilenet_v3_small", epochs=3, lr=3e-3, batch_size=8),
                  [("test_train swapped-classes val_acc", "val", None)]),
}


def floor(top1: float, n: int) -> float:
    """The reference less two binomial standard deviations on n images, rounded down to 0.01."""
    return math.floor((top1 - binomial_margin(top1, n)) * 100 + 1e-9) / 100


def reference(work: Path, name: str) -> dict:
    """The reference's figures for row ``name``, computed once and kept in work/<name>.json."""
    saved = work / f"{name}.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    build, settings, _ = ROWS[name]
    settings = dict(settings)
    data = build(work)
    weights = pretrained(work) if settings.pop("weights", False) else None
    _register_small_stem_resnet()
    result = reference_top1(data, weights=weights, **settings)
    saved.write_text(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--work", type=Path, default=None, help="keep data and results here (default: a temp folder)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="edgepipe-floors-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.pop("EDGEPIPE_PLUGINS", None)
    print(f"{'dataset':<20} {'floor of':<62} {'reference':>9} {'n':>4} {'floor':>6}")
    for name in args.only:
        result = reference(work, name)
        for what, split, n in ROWS[name][2]:
            top1, n = result[f"{split}_top1"], n or result[f"n_{split}"]
            print(f"{name:<20} {what:<62} {top1:>9.2%} {n:>4} {floor(top1, n):>6.2f}", flush=True)
    print(f"\n(work folder: {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
