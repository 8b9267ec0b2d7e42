"""Fixtures for the rknn_quantize and evaluate tests: a toy dataset, a small trained model and the
folders the upstream stages would hand over (model bundle, ONNX bundle, calibration set).

Everything is built once per test session into a temporary folder (``toy()``), and it is real: a
zoo model trained for a few seconds on a colour task so its logits are confident and agreement
between backends means something.

    from helpers_rknn import toy
    t = toy()                      # t.data, t.model, t.onnx, t.calib (folders), t.spec
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIZE = 32
CLASSES = ["red", "green", "blue", "yellow"]
_COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 60, 220], [230, 210, 40]], dtype=np.float32)


@dataclass(frozen=True)
class Toy:
    root: Path
    data: Path    # dataset folder: images_{train,val,test}.npy, labels_*.npy, index.csv, labels.txt, preprocess.json
    model: Path   # model bundle folder: model.pt, preprocess.json, labels.txt
    onnx: Path    # export_onnx folder: model.onnx, io.json, preprocess.json, labels.txt
    calib: Path   # calibration folder: images/*.png, dataset.txt


def toy_images(n: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x size x size x 3 RGB pictures: a grey noisy background with a filled rectangle whose
    colour is the class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n)
    imgs = np.empty((n, size, size, 3), np.uint8)
    for i, c in enumerate(labels):
        bg = rng.uniform(60, 190)
        img = np.full((size, size, 3), bg, np.float32)
        h, w = rng.integers(size // 3, size - 2, 2)
        y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        img[y:y + h, x:x + w] = _COLOURS[c] + rng.normal(0, 15, 3)
        img += rng.normal(0, 8, img.shape)
        imgs[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return imgs, labels.astype(np.int64)


def write_dataset(folder: Path, spec, n_train=256, n_test=64, seed=0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n, s in (("train", n_train, seed), ("val", 32, seed + 1), ("test", n_test, seed + 2)):
        x, y = toy_images(n, s, spec.height)
        np.save(folder / f"images_{split}.npy", x)
        np.save(folder / f"labels_{split}.npy", y)
        rows += [f"{split}/{i}.png,{int(c)},{split}" for i, c in enumerate(y)]
    (folder / "index.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    (folder / "labels.txt").write_text("".join(c + "\n" for c in CLASSES))
    spec.save(folder)
    return folder


def train_model(data: Path, spec, steps: int = 80, seed: int = 0):
    """A MobileNetV3-Small (width 0.5) from the model zoo, trained for a few seconds on the toy task.

    One torch thread: on a busy 2-core machine more threads make this tiny model 10-20x slower.
    torchvision's MobileNetV3 uses BatchNorm momentum 0.01, so after so few steps the running
    statistics are re-estimated over the train split (cumulative average) before eval mode."""
    import torch

    from stages.common.models import build_model
    from stages.common.preprocess import normalize

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        arch = {"arch": "mobilenet_v3_small", "width_mult": 0.5, "dropout": 0.0}
        module = build_model(arch, len(CLASSES))
        x = torch.from_numpy(normalize(np.load(data / "images_train.npy"), spec))
        y = torch.from_numpy(np.load(data / "labels_train.npy"))
        opt = torch.optim.Adam(module.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(seed)
        module.train()
        for _ in range(steps):
            idx = torch.randint(0, len(x), (32,), generator=g)
            loss = torch.nn.functional.cross_entropy(module(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        with torch.no_grad():
            module(x)
    finally:
        torch.set_num_threads(threads)
    return module.eval(), arch


def write_model_bundle(folder: Path, module, arch, spec) -> Path:
    from stages.common.models import save_model

    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder / "model.pt", module, arch, len(CLASSES))
    spec.save(folder)
    (folder / "labels.txt").write_text("".join(c + "\n" for c in CLASSES))
    return folder


def export_onnx_folder(model_dir: Path, out: Path) -> Path:
    """The real export_onnx stage (no stand-in: a broken stage must fail the tests that use it)."""
    from engine.run.testing import run_stage

    run_stage("export_onnx", {}, {"model": model_dir}, out)
    return out


def write_calibration(data: Path, out: Path, n: int = 16) -> Path:
    """The real calibration stage: images/ + dataset.txt (relative to the folder) from the train split."""
    from engine.run.testing import run_stage

    run_stage("calibration", {"count": n, "split": "train"}, {"data": data}, out)
    return out


def make_toy(root: Path, channel_order: str = "RGB") -> Toy:
    from stages.common.preprocess import Preprocess

    spec = Preprocess(input_size=(SIZE, SIZE), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                      channel_order=channel_order)
    data = write_dataset(root / "data", spec)
    module, arch = train_model(data, spec)
    model = write_model_bundle(root / "model", module, arch, spec)
    onnx = export_onnx_folder(model, root / "onnx")
    calib = write_calibration(data, root / "calib")
    return Toy(root, data, model, onnx, calib)


@functools.cache
def toy(channel_order: str = "RGB") -> Toy:
    root = Path(tempfile.mkdtemp(prefix=f"edgepipe-toy-{channel_order.lower()}-"))
    atexit.register(shutil.rmtree, root, True)
    return make_toy(root, channel_order)


def onnx_reference_logits(t: Toy, n: int | None = None) -> np.ndarray:
    """onnxruntime logits of the toy's ONNX model on its test split (the model's own preprocessing)."""
    from backends.base import load as load_backend
    from stages.common.preprocess import Preprocess, normalize

    spec = Preprocess.load(t.onnx)
    x = normalize(np.load(t.data / "images_test.npy")[:n], spec)
    return load_backend("onnx", t.onnx, {"input": "input0"}, batch=None).logits(x)


def wide_dataset(root: Path, n: int = 48) -> tuple[Path, Path]:
    """(dataset folder, original files) of ``n`` wide 64x32 pictures of the toy's colours, the object in
    both halves, which the dataset stage stretches to 32x32: what multi-crop is for."""
    import json

    from PIL import Image

    from engine.run.testing import run_stage

    src = root / "images"
    imgs, labels = toy_images(n, seed=7, size=SIZE)
    for i, (a, c) in enumerate(zip(imgs, labels)):
        (src / CLASSES[c]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate([a, a[:, ::-1]], axis=1)).save(src / CLASSES[c] / f"{i:03d}.png")
    pre = json.loads((toy().data / "preprocess.json").read_text())
    run_stage("dataset", {"kind": "folder", "path": str(src), "classes": CLASSES, "preprocess": pre,
                          "split": {"val": 0.1, "test": 0.5}}, {}, root / "data")
    return root / "data", src
