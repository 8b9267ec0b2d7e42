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
