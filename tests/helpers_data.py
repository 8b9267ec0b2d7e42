"""The tests' data builders, in the documented folder formats (DEVELOPERS.md): generated pictures and
dataset-stage folders, model bundles and export_onnx folders, the rknn/evaluate toy, the users' input
layouts (class folders, digit file lists), the bad-data corpus, real photographs and really pretrained
weights. Plain functions (not fixtures), so any test module can import them:

    from helpers_data import make_array_dataset, make_model_dir, export_onnx, toy

Product files (labels.txt, preprocess.json, io.json) are written by the product's own writers
(stages.common.bundle.write_labels, Preprocess.save, stages.common.export.write_io), never by hand.
"""

from __future__ import annotations

import atexit
import functools
import gzip
import io
import json
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

# unicode and spaces on purpose
CLASSES = ["chat noir", "çà & ü", "猫 cat"]
# the board, preflight and package tests' classes
LABELS = ["cat", "dog", "bird"]


def write_labels(folder: Path, names) -> Path:
    """labels.txt through the product's one writer."""
    from stages.common import bundle

    return bundle.write_labels(Path(folder), names)


def write_preprocess(folder: Path, size: int | tuple[int, int] = 32, **kw) -> None:
    """preprocess.json through the product's model (Preprocess.save)."""
    from stages.common.preprocess import Preprocess

    Preprocess.model_validate({"input_size": size, **kw}).save(folder)


def write_dataset_folder(folder: Path, splits: dict, names, preprocess: dict | None = None, index: bool = True,
                         class_counts: dict | None = None) -> Path:
    """A dataset-stage output from ``splits`` ({split: (uint8 N x H x W x 3 images, int labels)}):
    images_/labels_<split>.npy, labels.txt (``names``), and with ``index`` index.csv (rows
    <split>/<i>.png); with ``class_counts`` (a dict) class_counts.json and an empty skipped.csv; with
    ``preprocess`` (Preprocess fields) preprocess.json. The one writer of the builders below."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, (images, labels) in splits.items():
        np.save(folder / f"images_{split}.npy", np.asarray(images, dtype=np.uint8))
        np.save(folder / f"labels_{split}.npy", np.asarray(labels, dtype=np.int64))
        rows += [f"{split}/{i}.png,{int(c)},{split}" for i, c in enumerate(labels)]
    if index:
        (folder / "index.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n", encoding="utf-8")
    write_labels(folder, names)
    if class_counts is not None:
        (folder / "class_counts.json").write_text(json.dumps(class_counts), encoding="utf-8")
        (folder / "skipped.csv").write_text("path,reason\n", encoding="utf-8")
    if preprocess is not None:
        write_preprocess(folder, **preprocess)
    return folder


# -- generated pictures and dataset folders -----------------------------------------------------------
def class_image(label: int, index: int, size: tuple[int, int] = (24, 20), seed: int = 0) -> np.ndarray:
    """A uint8 H x W x 3 picture whose class is easy to learn: a bright horizontal band whose row
    depends on the label, plus noise that depends on (label, index, seed)."""
    h, w = size
    rng = np.random.default_rng([seed, label, index])
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    band = h * (label + 1) // 5
    img[max(0, band - 2) : band + 2, :, :] = 230 - 40 * (label % 3)
    return img


def save_image(arr: np.ndarray, path: Path, fmt: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def make_image_folder(root: Path, per_class: int = 6, classes=CLASSES, ext: str = "png", nested: bool = False,
                      seed: int = 0) -> Path:
    """root/<class>/<i>.<ext> (or root/<class>/sub/<i>.<ext> for odd i when nested)."""
    root = Path(root)
    for c, name in enumerate(classes):
        for i in range(per_class):
            sub = Path(name) / ("sub" if nested and i % 2 else "") / f"img {i}.{ext}"
            save_image(class_image(c, i, seed=seed), root / sub)
    return root


def make_array_dataset(folder: Path, per_class: dict[str, int] | None = None, num_classes: int = 3, size: int = 32,
                       seed: int = 0, mean: str = "uniform") -> Path:
    """A dataset-stage output (arrays + labels.txt + preprocess.json ...) with learnable classes
    (class_image's bands)."""
    per_class = per_class or {"train": 12, "val": 4, "test": 4}
    splits = {}
    k = 0
    for split, n in per_class.items():
        images, labels = [], []
        for c in range(num_classes):
            for _ in range(n):
                images.append(class_image(c, k, size=(size, size), seed=seed))
                labels.append(c)
                k += 1
        splits[split] = (np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8), labels)
    return write_dataset_folder(folder, splits, [f"class {c}" for c in range(num_classes)],
                                preprocess={"size": size, "mean": mean, "std": mean}, class_counts={})


def make_dataset(out: Path, size: int = 32, per_class: int = 4, labels: list[str] | None = None, seed: int = 0) -> Path:
    """A dataset-stage-like folder for the board tests: arrays and labels.txt only, generated images
    (class k: brighter channel k)."""
    labels = labels or LABELS
    rng = np.random.default_rng(seed)
    splits = {}
    for split in ("train", "val", "test"):
        imgs, labs = [], []
        for k in range(len(labels)):
            for _ in range(per_class):
                img = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
                img[..., k % 3] += np.uint8(100 + 30 * (k // 3))
                imgs.append(img)
                labs.append(k)
        splits[split] = (np.stack(imgs), labs)
    return write_dataset_folder(out, splits, labels, index=False)


def make_dataset_dir(
    folder: Path,
    counts: dict[str, list[int]] | None = None,
    size: int = 16,
    seed: int = 0,
) -> Path:
    """A dataset-stage-like output of random pictures. ``counts`` maps split -> images per class
    (default: train [12, 6, 3], val [2, 2, 2], test [2, 2, 2]). Each image's top-left pixel encodes its
    index in the split (R = index % 256, G = index // 256) so tests can tell which one was picked."""
    counts = counts or {"train": [12, 6, 3], "val": [2, 2, 2], "test": [2, 2, 2]}
    k = len(next(iter(counts.values())))
    rng = np.random.default_rng(seed)
    splits = {}
    for split, per_class in counts.items():
        labels = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in enumerate(per_class)])
        rng.shuffle(labels)
        images = rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8)
        for i in range(len(labels)):
            images[i, 0, 0, 0] = i % 256
            images[i, 0, 0, 1] = i // 256
        splits[split] = (images, labels)
    return write_dataset_folder(folder, splits, [f"class{i}" for i in range(k)], preprocess={"size": size},
                                class_counts=counts)


def pixel_index(image: np.ndarray) -> int:
    """The split index a make_dataset_dir image carries in its top-left pixel."""
    return int(image[0, 0, 0]) + 256 * int(image[0, 0, 1])


def write_idx(path: Path, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write an MNIST-format idx file (unsigned bytes); .gz names are gzip-compressed."""
    path = Path(path)
    a = np.ascontiguousarray(array, dtype=np.uint8)
    data = struct.pack(">HBB", 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
    if compress if compress is not None else path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


# -- the bad-data corpus ------------------------------------------------------------------------
def jpeg_bytes(arr: np.ndarray, exif_orientation: int | None = None, mode: str = "RGB") -> bytes:
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    else:
        img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_bad_corpus(folder: Path) -> dict[str, str]:
    """Files for one class folder: returns {file name: 'bad' | 'good'}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = {}
    base = class_image(0, 99, size=(20, 20))
    (folder / "zero.jpg").write_bytes(b"")
    kinds["zero.jpg"] = "bad"
    good = jpeg_bytes(np.tile(base, (4, 4, 1)))
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    kinds["truncated.jpg"] = "bad"
    (folder / "notes.jpg").write_text("this is not an image\n", encoding="utf-8")
    kinds["notes.jpg"] = "bad"
    (folder / "readme.txt").write_text("not an image either\n", encoding="utf-8")
    kinds["readme.txt"] = "bad"
    (folder / "cmyk.jpg").write_bytes(jpeg_bytes(base, mode="CMYK"))
    kinds["cmyk.jpg"] = "good"
    sixteen = (np.linspace(0, 65535, 400).reshape(20, 20)).astype(np.uint16)
    Image.fromarray(sixteen).save(folder / "gray16.png")
    kinds["gray16.png"] = "good"
    Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.png")
    kinds["palette.png"] = "good"
    rgba = np.dstack([base, np.full(base.shape[:2], 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    kinds["rgba.png"] = "good"
    Image.fromarray(base[..., 0]).save(folder / "gray.png")
    kinds["gray.png"] = "good"
    # 40 wide x 20 high, left half white; EXIF 6 = rotate 90 degrees clockwise when displayed
    exif_img = np.zeros((20, 40, 3), np.uint8)
    exif_img[:, :20] = 255
    (folder / "exif_rotated.jpg").write_bytes(jpeg_bytes(exif_img, exif_orientation=6))
    kinds["exif_rotated.jpg"] = "good"
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # hidden: ignored, not reported
    return kinds


def make_photo_folder(root: Path, per_class: int = 140, size: int = 240) -> Path:
    """A two-class split_folders set of photo crops (JPEG): class ``china`` from scikit-learn's
    china.jpg, class ``flower`` from its flower.jpg, each split cut from its own tiles of the photo
    (make_real_photo_folder: no test pixel was seen in training). Real photographic texture, the
    few-hundred-photos-per-class case of a bird feeder or MaixHub project; 140 per class: 84 train,
    14 val, 42 test images. Read it with photo_folder_dataset."""
    return make_real_photo_folder(root, size=size, per_class=per_class, photos=("china", "flower"))


def photo_folder_dataset(folder: Path, input_size: int = 224) -> dict:
    """The dataset stage's params for make_photo_folder's folder at ``input_size`` (ImageNet mean/std)."""
    return {"kind": "split_folders", "path": folder,
            "preprocess": {"input_size": input_size, "mean": "imagenet", "std": "imagenet"}}


def write_images(out: Path, n: int = 5, size: int = 48, seed: int = 1) -> list[Path]:
    """JPEG/PNG test pictures of another size than the model input (the resize is exercised)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, (size, size + 8 * i, 3), dtype=np.uint8)
        p = out / (f"img{i}.jpg" if i % 2 else f"img{i}.png")
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths



def stage(name: str, params: dict, inputs: dict, out: Path):
    from engine.run.testing import run_stage

    return run_stage(name, params, inputs, out)



def package(board: str, inputs: dict, out: Path, **params) -> tuple[Path, dict]:
    """The real package stage for ``board``: (the package folder, its manifest.json)."""
    stage("package", {"board": board, **params}, inputs, out)
    return out / "package", json.loads((out / "package" / "manifest.json").read_text())


# -- model bundles and export_onnx folders -------------------------------------------------------------
def _perturb(module, seed: int) -> None:
    """Give batch-norm layers non-trivial running statistics/affine params (deterministic)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def make_module(arch: str | dict = "mobilenet_v3_small", num_classes: int = 4, seed: int = 0):
    """A model-zoo module, random-init (no weights exist here) with its batch-norm statistics perturbed
    so that the logits are not all alike."""
    import torch

    from stages.common.models import build_model

    torch.manual_seed(seed)
    module = build_model(arch, num_classes)
    _perturb(module, seed)
    return module.eval()


def make_model_dir(
    folder: Path,
    arch: str | dict = "mobilenet_v3_small",
    num_classes: int = 4,
    size: int | tuple[int, int] = 32,
    seed: int = 0,
    module=None,
    **preprocess,
) -> Path:
    """A train-stage-like output: model.pt (bundle), preprocess.json, labels.txt."""
    from stages.common.models import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module = module if module is not None else make_module(arch, num_classes, seed)
    save_model(folder / "model.pt", module, arch if isinstance(arch, dict) else {"arch": arch}, num_classes)
    write_preprocess(folder, size, **preprocess)
    write_labels(folder, [f"class{i}" for i in range(num_classes)])
    return folder


def tiny_net(kind: str = "linear", classes: int = 3, seed: int = 0):
    """Small classifiers whose heads exercise the board checks.

    linear: conv -> relu -> global pool -> flatten -> Linear   (fits every board)
    gem:    GeM pooling, x.clamp(eps).pow(p) ... .pow(1/p)      (Pow: CPU fallback on rv1103)
    flat:   conv -> relu -> flatten of the 8x8 map -> Linear    (a real Flatten: awnn cannot)
    conv:   global pool -> 1x1 conv -> mean over H,W            (pnnx inserts a Reshape)
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.p = nn.Parameter(torch.full((1,), 3.0))
            if kind == "flat":
                self.fc = nn.Linear(16 * 8 * 8, classes)
            elif kind == "conv":
                self.fc = nn.Conv2d(16, classes, 1)
            else:
                self.fc = nn.Linear(16, classes)

        def forward(self, x):
            x = F.relu(self.conv2(F.relu(self.conv(x))))
            if kind == "flat":
                return self.fc(torch.flatten(x, 1))
            if kind == "gem":
                x = F.adaptive_avg_pool2d(x.clamp(min=1e-6).pow(self.p), 1).pow(1.0 / self.p)
                return self.fc(torch.flatten(x, 1))
            x = F.adaptive_avg_pool2d(x, 1)
            if kind == "conv":
                return self.fc(x).mean(dim=(2, 3))
            return self.fc(torch.flatten(x, 1))

    return Net().eval()


def export_onnx(out: Path, module=None, kind: str = "linear", size: int = 32, preprocess: dict | None = None,
                labels: list[str] | None = None) -> Path:
    """An export_onnx-style folder: model.onnx (legacy exporter, opset 13, input0/output0), io.json,
    preprocess.json, labels.txt."""
    import warnings

    import torch

    from stages.common.export import write_io

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    module = module if module is not None else tiny_net(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, torch.zeros(1, 3, size, size), str(out / "model.onnx"), dynamo=False,
                          opset_version=13, input_names=["input0"], output_names=["output0"])
    write_io(out, "input0", "output0", [1, 3, size, size])
    write_preprocess(out, **{"size": size, "mean": "uniform", "std": "uniform", **(preprocess or {})})
    write_labels(out, labels or LABELS)
    return out


# -- users' input layouts ----------------------------------------------------------
def _picture(rng, size: int, k: int) -> np.ndarray:
    img = rng.integers(0, 90, (size, size + 6, 3), dtype=np.uint8)
    img[..., k % 3] += np.uint8(120)
    if k >= 3:  # more classes than channels: stripes tell them apart
        img[:: 2 + k % 3] = 255 - img[:: 2 + k % 3]
    return img


def make_folder_dataset(root: Path, classes=("cat", "dog"), per_class: int = 12, size: int = 40, seed: int = 0) -> Path:
    """<root>/<class>/<n>.jpg: the `dataset=folder` layout."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (Path(root) / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_picture(rng, size, k)).save(Path(root) / name / f"{i:03d}.jpg", quality=95)
    return Path(root)


def make_digit_filelist(root: Path, count: int = 300, size: int = 28) -> Path:
    """The first ``count`` of scikit-learn's bundled 8x8 digits as ``size`` px grayscale PNGs, listed in
    <root>/train.txt and test.txt (every 5th) as `images/x.png----label` lines: MNIST-like digits in
    mnist_gem_resnet's layout, real enough for an accuracy floor."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    lines: dict[str, list[str]] = {"train": [], "test": []}
    for i in range(min(count, len(digits.target))):
        pixels = np.clip(np.round(digits.images[i] * 255 / 16), 0, 255).astype(np.uint8)
        rel = f"images/{i:05d}.png"
        Image.fromarray(pixels, "L").resize((size, size), Image.BILINEAR).save(root / rel)
        lines["test" if i % 5 == 0 else "train"].append(f"{rel}----{digits.target[i]}")
    for split, rows in lines.items():
        (root / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root


def make_pretrained(path: Path, arch: str = "mobilenet_v3_small") -> Path:
    """A local torchvision-format state_dict (random weights) standing in for downloaded weights."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None)
    torch.save(model.state_dict(), path)
    return Path(path)


def run_experiment(runs: Path, *overrides: str) -> dict:
    """`edgepipe run` in this process; returns the run's run.json."""
    from engine.cli.commands import main

    rc = main(["run", f"runs_root={runs}", *overrides])
    records = sorted(Path(runs).glob("*/*/run.json"), key=lambda p: p.stat().st_mtime)
    assert records, "no run folder written"
    record = json.loads(records[-1].read_text())
    failed = {n: s.get("error") for n, s in record["stages"].items() if s["status"] == "failed"}
    assert rc == 0 and not failed, failed or rc
    return record


# -- the rknn_quantize / evaluate toy -----------------------------------------------------------------
# A toy dataset, a small trained model and the folders the upstream stages would hand over (model
# bundle, ONNX bundle, calibration set), built once per test session into a temporary folder
# (``toy()``), and real: a zoo model trained for a few seconds on a colour task so its logits are
# confident and agreement between backends means something.
#
#     t = toy()                      # t.data, t.model, t.onnx, t.calib (folders)
TOY_SIZE = 32
TOY_CLASSES = ["red", "green", "blue", "yellow"]
_COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 60, 220], [230, 210, 40]], dtype=np.float32)


@dataclass(frozen=True)
class Toy:
    root: Path
    data: Path    # dataset folder: images_{train,val,test}.npy, labels_*.npy, index.csv, labels.txt, preprocess.json
    model: Path   # model bundle folder: model.pt, preprocess.json, labels.txt
    onnx: Path    # export_onnx folder: model.onnx, io.json, preprocess.json, labels.txt
    calib: Path   # calibration folder: images/*.png, dataset.txt


def toy_images(n: int, seed: int, size: int = TOY_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x size x size x 3 RGB pictures: a grey noisy background with a filled rectangle whose
    colour is the class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(TOY_CLASSES), n)
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
    splits = {split: toy_images(n, s, spec.height)
              for split, n, s in (("train", n_train, seed), ("val", 32, seed + 1), ("test", n_test, seed + 2))}
    write_dataset_folder(folder, splits, TOY_CLASSES)
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
        module = build_model(arch, len(TOY_CLASSES))
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
    save_model(folder / "model.pt", module, arch, len(TOY_CLASSES))
    spec.save(folder)
    write_labels(folder, TOY_CLASSES)
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

    spec = Preprocess(input_size=(TOY_SIZE, TOY_SIZE), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
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
    from engine.run.testing import run_stage

    src = root / "images"
    imgs, labels = toy_images(n, seed=7, size=TOY_SIZE)
    for i, (a, c) in enumerate(zip(imgs, labels)):
        (src / TOY_CLASSES[c]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate([a, a[:, ::-1]], axis=1)).save(src / TOY_CLASSES[c] / f"{i:03d}.png")
    pre = json.loads((toy().data / "preprocess.json").read_text())
    run_stage("dataset", {"kind": "folder", "path": str(src), "classes": TOY_CLASSES, "preprocess": pre,
                          "split": {"val": 0.1, "test": 0.5}}, {}, root / "data")
    return root / "data", src


# -- board runtimes: the rknn-toolkit-lite2 stand-in, the C demo on a fake librknnmrt.so ------------------
RKNNLITE_STUB = '''"""Stand-in for rknn-toolkit-lite2 in tests: runs the ONNX model ($STUB_ONNX) with the normalisation
rknn-toolkit2 bakes into a .rknn (mean_values/std_values on 0..255, model channel order), and logs
the calls to $STUB_LOG."""
import json
import os

import numpy as np


class RKNNLite:
    NPU_CORE_AUTO, NPU_CORE_0, NPU_CORE_1, NPU_CORE_2 = 0, 1, 2, 4

    def __init__(self, verbose=False, verbose_file=None):
        self.log = open(os.environ["STUB_LOG"], "a")

    def load_rknn(self, path):
        self.log.write(json.dumps({"load_rknn": os.path.basename(path)}) + "\\n")
        return 0 if os.path.isfile(path) else -1

    def init_runtime(self, **kwargs):
        import onnxruntime as ort

        self.log.write(json.dumps({"init_runtime": kwargs}) + "\\n")
        self.sess = ort.InferenceSession(os.environ["STUB_ONNX"], providers=["CPUExecutionProvider"])
        spec = json.load(open(os.environ["STUB_PREPROCESS"]))
        order = [0, 1, 2] if spec["channel_order"] == "RGB" else [2, 1, 0]
        self.mean = np.array([spec["mean"][i] * 255 for i in order], np.float32)
        self.std = np.array([spec["std"][i] * 255 for i in order], np.float32)
        return 0

    def inference(self, inputs, data_format=None):
        x = inputs[0]
        assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[0] == 1 and x.shape[-1] == 3, (x.dtype, x.shape)
        xf = ((x.astype(np.float32) - self.mean) / self.std).transpose(0, 3, 1, 2)
        name = self.sess.get_inputs()[0].name
        self.log.write(json.dumps({"inference": list(x.shape)}) + "\\n")
        return [self.sess.run(None, {name: np.ascontiguousarray(xf)})[0]]

    def release(self):
        self.log.write(json.dumps({"release": True}) + "\\n")
'''


def install_rknnlite_stub(root: Path) -> Path:
    """A fake `rknnlite` package under root (put root on PYTHONPATH)."""
    pkg = Path(root) / "rknnlite"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "api.py").write_text(RKNNLITE_STUB)
    return Path(root)


RKNN_API = REPO / "tests" / "board_tests" / "rknn_api"


def build_c_demo(pkg: Path, work: Path) -> Path:
    """Build an RV1103/RV1106 package's C demo as its README says (CMake, RKNN_API_DIR, zero-copy)
    against the fake librknnmrt.so of tests/board_tests/rknn_api; returns the install folder."""
    import subprocess

    api = work / "librknn_api"
    (api / "include").mkdir(parents=True)
    (api / "armhf-uclibc").mkdir()
    shutil.copyfile(RKNN_API / "rknn_api.h", api / "include" / "rknn_api.h")
    subprocess.run(["gcc", "-shared", "-fPIC", "-std=c99", "-I", str(RKNN_API), str(RKNN_API / "fake_rknn.c"),
                    "-o", str(api / "armhf-uclibc" / "librknnmrt.so")], check=True)
    build, inst = work / "build", work / "install"
    for cmd in (["cmake", "-S", str(pkg), "-B", str(build), f"-DRKNN_API_DIR={api}"],
                ["cmake", "--build", str(build)], ["cmake", "--install", str(build), "--prefix", str(inst)]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    return inst


# -- real photographs shipped inside installed packages ------------------------------------------------
# Generated pictures (one bright band or colour per class) are learnt at 32 px in one epoch and survive
# any int8 scheme; real photographs at 224 px are what users train on, and what breaks first. These
# builders cut augmented crops out of the photos scikit-learn, matplotlib and scikit-image install.
# The test classes and the pretraining photos are disjoint: "pretrained" weights never saw a test class.
CLASS_PHOTOS = ("china", "flower", "grace_hopper", "astronaut", "coffee", "chelsea")
PRETRAIN_PHOTOS = ("rocket", "hubble_deep_field", "immunohistochemistry", "retina", "camera", "brick", "grass",
                   "gravel", "coins", "moon")
# the same six classes under Chinese names (labels.txt, packages and report pictures in UTF-8)
CHINESE_NAMES = {"china": "寺庙", "flower": "花", "grace_hopper": "人像", "astronaut": "宇航员", "coffee": "咖啡",
                 "chelsea": "猫"}


def real_photo(name: str) -> np.ndarray:
    """One photograph shipped inside an installed package, as uint8 H x W x 3 RGB (grey ones stacked)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    elif name == "grace_hopper":
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            img = np.asarray(Image.open(f).convert("RGB"))
    else:
        from skimage import data

        img = getattr(data, name)()
    img = np.asarray(img, dtype=np.uint8)
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]


def augmented_crop(photo: np.ndarray, rng: np.random.Generator, size: int,
                   scale: tuple[float, float] = (0.3, 0.75)) -> Image.Image:
    """A square crop of ``photo`` at a random place and scale (``scale``: a share of its shorter side),
    maybe mirrored, with brightness/contrast/saturation each jittered by up to 25%, resized to ``size``."""
    h, w, _ = photo.shape
    side = max(8, int(min(h, w) * rng.uniform(*scale)))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return _jittered(photo[y:y + side, x:x + side], rng, size)


def _jittered(crop: np.ndarray, rng: np.random.Generator, size: int) -> Image.Image:
    """``crop`` resized to ``size``, maybe mirrored, brightness/contrast/saturation each jittered by up to 25%."""
    from PIL import ImageEnhance

    image = Image.fromarray(crop).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(float(rng.uniform(0.75, 1.25)))
    return image


# Test images share no pixel with training images: each photo is cut into a grid of 2 x 3 tiles (3 x 2
# for a portrait photo), every tile belongs to one split, and a crop never leaves its tile. The splits'
# tiles alternate over the photo, so every split sees every part of the scene (a split that held only
# the astronaut's flag could not be told from the astronaut by anything). Shares of the crops: 60%
# train, 10% val, 30% test (40 a class: 24 / 4 / 12).
PHOTO_TILE_SPLITS = (("train", "test", "train"),
                     ("test", "train", "val"))
PHOTO_SPLIT_SHARES = {"val": 0.1, "test": 0.3}
# a crop's side, as a share of its tile's shorter side (tiles are 150-256 px on the class photos)
PHOTO_CROP_SCALE = (0.6, 1.0)


def photo_tiles(shape: tuple[int, ...]) -> dict[str, list[tuple[int, int, int, int]]]:
    """{split: [(top, left, height, width) of each tile of that split]} for a photo of ``shape``."""
    h, w = shape[:2]
    rows, cols = len(PHOTO_TILE_SPLITS), len(PHOTO_TILE_SPLITS[0])
    if h > w:  # portrait: the grid turned, so tiles stay about square
        rows, cols = cols, rows
    tiles: dict[str, list] = {"train": [], "val": [], "test": []}
    for r in range(rows):
        for c in range(cols):
            split = PHOTO_TILE_SPLITS[r][c] if h <= w else PHOTO_TILE_SPLITS[c][r]
            top, left = h * r // rows, w * c // cols
            tiles[split].append((top, left, h * (r + 1) // rows - top, w * (c + 1) // cols - left))
    return tiles


def split_counts(per_class: int) -> dict[str, int]:
    """Crops per split of a class of ``per_class`` (40: train 24, val 4, test 12)."""
    counts = {s: round(per_class * share) for s, share in PHOTO_SPLIT_SHARES.items()}
    return {"train": per_class - sum(counts.values()), **counts}


def crop_boxes(shape: tuple[int, ...], per_class: int,
               rng: np.random.Generator) -> dict[str, list[tuple[int, int, int]]]:
    """{split: [(top, left, side) of each square crop]}: split_counts(per_class) crops, dealt over the
    split's tiles in turn, each inside its tile at a random place and PHOTO_CROP_SCALE."""
    boxes: dict[str, list] = {}
    for split, tiles in photo_tiles(shape).items():
        boxes[split] = []
        for i in range(split_counts(per_class)[split]):
            top, left, th, tw = tiles[i % len(tiles)]
            side = int(min(th, tw) * rng.uniform(*PHOTO_CROP_SCALE))
            boxes[split].append((top + int(rng.integers(0, th - side + 1)),
                                 left + int(rng.integers(0, tw - side + 1)), side))
    return boxes


def crop_box_of(name: str) -> tuple[int, int, int]:
    """The (top, left, side) a make_real_photo_folder file name records (..._y<top>x<left>s<side>.jpg)."""
    import re

    top, left, side = re.search(r"_y(\d+)x(\d+)s(\d+)\.jpg$", name).groups()
    return int(top), int(left), int(side)


def make_real_photo_folder(root: Path, size: int = 256, per_class: int = 30, photos=CLASS_PHOTOS,
                           names: dict[str, str] | None = None, seed: int = 0) -> Path:
    """root/<split>/<class>/<photo>_<i>_y<top>x<left>s<side>.jpg (dataset kind split_folders):
    ``per_class`` augmented crops (JPEG, ``size`` px square: build at or above the experiment's input
    size) of each photo in ``photos``, split_counts(per_class) of them per split, cut from that split's
    tiles only (photo_tiles), the box each was cut from in its name. A class is named by its photo, or
    by ``names[photo]`` (e.g. CHINESE_NAMES). Seeded: the same arguments give the same files."""
    root = Path(root)
    for k, photo_name in enumerate(photos):
        photo = real_photo(photo_name)
        rng = np.random.default_rng([seed, k])
        for split, boxes in crop_boxes(photo.shape, per_class, rng).items():
            folder = root / split / (names or {}).get(photo_name, photo_name)
            folder.mkdir(parents=True, exist_ok=True)
            for i, (top, left, side) in enumerate(boxes):
                crop = _jittered(photo[top:top + side, left:left + side], rng, size)
                crop.save(folder / f"{photo_name}_{i:03d}_y{top}x{left}s{side}.jpg", quality=90)
    return root


# -- really pretrained weights -----------------------------------------------------------------------
# A backbone trained first on OTHER photos (PRETRAIN_PHOTOS, none of them a test class), saved as the
# architecture's torchvision state_dict (its keys and shapes, 1000-class head included) under
# torchvision's own file name: what `model.pretrained` is given by users who downloaded ImageNet
# weights. Trained at a small size to stay cheap: conv weights do not depend on the input size.
TORCHVISION_WEIGHTS = {"resnet18": "ResNet18_Weights.IMAGENET1K_V1",
                       "mobilenet_v3_small": "MobileNet_V3_Small_Weights.IMAGENET1K_V1"}


def torchvision_file_name(arch: str) -> str:
    """The file name torchvision gives ``arch``'s ImageNet weights in $TORCH_HOME/hub/checkpoints."""
    from torchvision.models import get_weight

    return get_weight(TORCHVISION_WEIGHTS[arch]).url.rsplit("/", 1)[1]


# Pretraining sizes, measured by a linear probe of the frozen features at 224 px on the test classes
# (BatchNorm recalibrated, 96 held-out crops): MobileNetV3-Small random 0.54-0.60, pretrained at 64 px
# 0.77, at 96 px on crops of a third of the area (the 224-px crops' scale) 0.83. ResNet-18 at 96 px
# costs 2.25x its 64 px (minutes on 2 cores): it stays at 64.
PRETRAIN_SETTINGS = {"mobilenet_v3_small": {"size": 96, "scale": (0.12, 0.35)},
                     "resnet18": {"size": 64, "scale": (0.3, 0.75)}}


def pretrain_backbone(arch: str, folder: Path, per_class: int = 40, epochs: int = 12, seed: int = 0) -> Path:
    """Train the model zoo's ``arch`` to tell the PRETRAIN_PHOTOS apart (crops at PRETRAIN_SETTINGS'
    size, ImageNet mean/std) and save it as torchvision's state_dict at folder/<torchvision's file name>."""
    import torch

    from stages.common.models import build_model

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k, name in enumerate(PRETRAIN_PHOTOS):
        photo = real_photo(name)
        images += [np.asarray(augmented_crop(photo, rng, **PRETRAIN_SETTINGS[arch])) for _ in range(per_class)]
        labels += [k] * per_class
    mean, std = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
                 torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255 - mean) / std
    y = torch.tensor(labels)
    model = build_model(arch, len(PRETRAIN_PHOTOS)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(x) // 32)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x) - 31, 32):
            idx = order[i:i + 32]
            batch = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, x[idx], x[idx].flip(3))
            loss = torch.nn.functional.cross_entropy(model(batch), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return save_as_torchvision(model, arch, Path(folder) / torchvision_file_name(arch))


# Pretraining takes minutes (ResNet-18: ~2 on one thread) and gives the same file for the same recipe,
# so it is kept between sessions in a test-data cache, as the ARM userlands are (boards/emulation.py):
# <$EDGEPIPE_TEST_DATA_CACHE, else ~/.cache/edgepipe/test-data>/backbone-<arch>-<recipe digest>/. The
# digest covers what the file depends on: the code that makes it (pretrain_backbone, the photos and
# their crops, the model zoo's build_model), the versions of torch, torchvision and the packages the
# photos ship in, and torch's thread count (float sums differ between one and two threads).
# EDGEPIPE_TEST_DATA_CACHE=off pretrains every session. Built as the shared test artefacts are
# (helpers_shared.built_once_in: under a file lock, a half-built folder built again). A fresh machine
# pays the minutes once; `make test`'s figures in README say which they include.
TEST_DATA_CACHE_ENV = "EDGEPIPE_TEST_DATA_CACHE"


def data_cache_folder() -> Path | None:
    import os

    named = os.environ.get(TEST_DATA_CACHE_ENV)
    if named:
        return None if named.lower() in ("off", "0", "false", "no") else Path(named).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgepipe" / "test-data"


def backbone_recipe_digest(arch: str) -> str:
    import hashlib
    import inspect
    from importlib.metadata import version

    import torch

    h = hashlib.sha256(json.dumps([arch, PRETRAIN_SETTINGS[arch], PRETRAIN_PHOTOS, torch.get_num_threads(),
                                   [version(d) for d in ("torch", "torchvision", "numpy", "pillow", "scikit-image",
                                                         "scikit-learn", "matplotlib")]]).encode())
    for made_by in (pretrain_backbone, real_photo, augmented_crop, _jittered, save_as_torchvision):
        h.update(inspect.getsource(made_by).encode())
    for zoo in ("models.py", "models_torch.py"):
        h.update((REPO / "stages" / "common" / zoo).read_bytes())
    return h.hexdigest()[:16]


def cached_backbone(arch: str, folder: Path) -> Path:
    """pretrain_backbone(arch, folder), taken from the test-data cache when this recipe was trained
    before (on this machine, by any session or xdist worker: one trains, the others wait for it)."""
    from helpers_shared import built_once_in

    cache = data_cache_folder()
    if cache is None:
        return pretrain_backbone(arch, folder)
    kept = built_once_in(cache, f"backbone-{arch}-{backbone_recipe_digest(arch)}",
                         lambda out: pretrain_backbone(arch, out))
    target = Path(folder) / torchvision_file_name(arch)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kept / target.name, target)
    return target


def save_as_torchvision(model, arch: str, path: Path) -> Path:
    """``model``'s weights in torchvision's ``arch`` state_dict (strictly loadable by it): tensors of the
    same shape are copied, the 1000-class head gets the trained rows first and keeps the rest."""
    import torch
    import torchvision

    reference = getattr(torchvision.models, arch)(weights=None)
    state = reference.state_dict()
    for key, tensor in model.state_dict().items():
        target = state[key]
        if target.shape == tensor.shape:
            state[key] = tensor.detach().clone()
        else:  # the head: 1000 rows there, one per pretraining class here
            target[: tensor.shape[0]] = tensor.detach()
    reference.load_state_dict(state, strict=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def pretrained_override(weights: Path) -> list[str]:
    """The overrides that make an experiment finetune from ``weights``, a torchvision file named as
    torchvision names it in <torch home>/hub/checkpoints/: the user's path, `model.pretrained=imagenet`
    resolved through torchvision's weights API, with $TORCH_HOME set by ``pretrained_env``."""
    return ["model.pretrained=imagenet", "train.mode=finetune"]


def pretrained_env(weights: Path) -> dict[str, str]:
    """The environment under which ``pretrained_override`` finds ``weights``: its torch home."""
    return {"TORCH_HOME": str(weights.parents[2])}


# Every experiment on real photos at its own input size: photo size (at or above the input size), the
# architecture whose pretrained weights it finetunes from (None: trained from scratch, as shipped),
# whether its class folders have Chinese names (the Luckfox documents' case), and its epochs: its own,
# but v831_resnet18's 20 become 2 finetuned (issue 32: 5 epochs, as issue 22 first had it, took the
# train stage 291 s of one thread, 2 take 135 s; the reference is no lower at 2, see its floor); still
# every training image, at 224 px, with BatchNorm recalibrated over all of them before each validation;
# batches of 16 give the 144 training images 9 steps an epoch.
# mnist_gem_resnet is not here: it reads digit file lists (labels 0..9), it keeps its own digits.
REAL_PHOTO_EXPERIMENTS = {
    "quickstart": {"size": 64, "arch": None, "chinese": False, "overrides": []},
    "v831_resnet18": {"size": 256, "arch": "resnet18", "chinese": False, "overrides": ["train.epochs=2"]},
    # its 10 epochs
    "rv1103_mobilenetv3": {"size": 256, "arch": "mobilenet_v3_small", "chinese": True, "overrides": []},
    "onnx_catsdogs": {"size": 256, "arch": "mobilenet_v3_small", "chinese": False, "overrides": []},  # its 5 epochs
}
# make_real_photo_folder writes train/val/test folders: the splits are its tiles, not the stage's ratios
REAL_PHOTO_SPLIT = ["dataset=split_folders", "train.batch_size=16"]


def real_photo_overrides(experiment: str, data: Path, weights: Path | None) -> list[str]:
    """`edgepipe run` arguments for ``experiment`` on the real-photo folder ``data``."""
    spec = REAL_PHOTO_EXPERIMENTS[experiment]
    return [f"+experiment={experiment}", f"dataset.path={data}", *REAL_PHOTO_SPLIT, *spec["overrides"],
            *(pretrained_override(weights) if weights is not None else [])]
