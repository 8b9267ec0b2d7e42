"""Small generated datasets for the data/training tests (plain functions, importable by any test).

    from helpers_data import make_image_folder, make_array_dataset, write_idx
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# unicode and spaces on purpose
CLASSES = ["chat noir", "çà & ü", "猫 cat"]


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
    """A dataset-stage output (arrays + labels.txt + preprocess.json ...) with learnable classes."""
    from stages.common.preprocess import Preprocess

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    per_class = per_class or {"train": 12, "val": 4, "test": 4}
    rows = []
    k = 0
    for split, n in per_class.items():
        images, labels = [], []
        for c in range(num_classes):
            for i in range(n):
                images.append(class_image(c, k, size=(size, size), seed=seed))
                labels.append(c)
                rows.append(f"{split}/{k}.png,{c},{split}")
                k += 1
        arr = np.stack(images).astype(np.uint8) if images else np.zeros((0, size, size, 3), np.uint8)
        np.save(folder / f"images_{split}.npy", arr)
        np.save(folder / f"labels_{split}.npy", np.asarray(labels, dtype=np.int64))
    (folder / "labels.txt").write_text("".join(f"class {c}\n" for c in range(num_classes)), encoding="utf-8")
    (folder / "index.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n", encoding="utf-8")
    (folder / "class_counts.json").write_text(json.dumps({}), encoding="utf-8")
    (folder / "skipped.csv").write_text("path,reason\n", encoding="utf-8")
    Preprocess.model_validate({"input_size": size, "mean": mean, "std": mean}).save(folder)
    return folder


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


def make_photo_folder(root: Path, per_class: int = 100, size: int = 256, seed: int = 0) -> Path:
    """A two-class folder of photo crops (JPEG): class ``china`` from scikit-learn's china.jpg, class
    ``flower`` from its flower.jpg (both ship with scikit-learn). Each image is a random square crop
    (90-300 px, random place, random mirror) resized to ``size``: real photographic texture, the
    few-hundred-photos-per-class case of a bird feeder or MaixHub project."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    rng = np.random.default_rng(seed)
    for name, photo in zip(("china", "flower"), photos.images):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        h, w, _ = photo.shape
        for i in range(per_class):
            side = int(rng.integers(90, 300))
            y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
            crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crop.save(folder / f"{name}_{i:04d}.jpg", quality=90)
    return root


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
    from PIL import ImageEnhance

    h, w, _ = photo.shape
    side = max(8, int(min(h, w) * rng.uniform(*scale)))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        crop = enhance(crop).enhance(float(rng.uniform(0.75, 1.25)))
    return crop


def make_real_photo_folder(root: Path, size: int = 256, per_class: int = 30, photos=CLASS_PHOTOS,
                           names: dict[str, str] | None = None, seed: int = 0) -> Path:
    """root/<class>/<photo>_<i>.jpg: ``per_class`` augmented crops (JPEG, ``size`` px square: build at
    or above the experiment's input size) of each photo in ``photos``; a class is named by its photo,
    or by ``names[photo]`` (e.g. CHINESE_NAMES). Seeded: the same arguments give the same files."""
    root = Path(root)
    for k, photo_name in enumerate(photos):
        photo = real_photo(photo_name)
        rng = np.random.default_rng([seed, k])
        folder = root / (names or {}).get(photo_name, photo_name)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            augmented_crop(photo, rng, size).save(folder / f"{photo_name}_{i:03d}.jpg", quality=90)
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
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
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
# but v831_resnet18's 20 (from scratch, as shipped today) become 5 finetuned, as issue 22 ships it;
# batches of 16 give the 144 training images 9 steps an epoch.
# mnist_gem_resnet is not here: it reads digit file lists (labels 0..9), it keeps its own digits.
REAL_PHOTO_EXPERIMENTS = {
    "quickstart": {"size": 64, "arch": None, "chinese": False, "overrides": ["dataset=folder"]},
    "v831_resnet18": {"size": 256, "arch": "resnet18", "chinese": False, "overrides": ["train.epochs=5"]},
    "rv1103_mobilenetv3": {"size": 256, "arch": "mobilenet_v3_small", "chinese": True, "overrides": []},  # its 10 epochs
    "onnx_catsdogs": {"size": 256, "arch": "mobilenet_v3_small", "chinese": False, "overrides": []},  # its 5 epochs
}
REAL_PHOTO_SPLIT = ["dataset.split.test=0.3", "dataset.split.val=0.1", "train.batch_size=16"]


def real_photo_overrides(experiment: str, data: Path, weights: Path | None) -> list[str]:
    """`edgepipe run` arguments for ``experiment`` on the real-photo folder ``data``."""
    spec = REAL_PHOTO_EXPERIMENTS[experiment]
    return [f"+experiment={experiment}", f"dataset.path={data}", *REAL_PHOTO_SPLIT, *spec["overrides"],
            *(pretrained_override(weights) if weights is not None else [])]
