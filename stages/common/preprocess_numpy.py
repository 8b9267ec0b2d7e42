"""Image -> model input: the preprocessing functions of edgepipe, on numpy and Pillow only.

Training, calibration, evaluation and the deploy scripts generated for boards all call the functions
below, so the pixels a model sees on a board are computed exactly like the ones it was trained on.
The package stage copies this file verbatim into packages as ``preprocess.py``: it must import
nothing but numpy, Pillow and the standard library (boards often lack pydantic's compiled core).
The validating model of the settings, ``stages.common.preprocess.Preprocess`` (pydantic), stays on
the host; the functions take it or the plain ``PreprocessSpec`` below, which reads the same
``preprocess.json``.

    spec = PreprocessSpec.load("model_dir")      # reads model_dir/preprocess.json
    img = load_image("cat.jpg")                  # PIL RGB, EXIF orientation applied
    arr = resize(img, spec)                      # uint8 H x W x 3, RGB
    x = normalize(arr[None], spec)               # float32 1 x 3 x H x W, in spec.channel_order

Conventions
- ``mean``/``std`` are on the 0..1 scale (like torchvision) and listed in **RGB** order whatever the
  channel order is: ``normalize`` computes ``(x / 255 - mean) / std`` on RGB pixels and then reorders
  the channels to ``channel_order``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

FILENAME = "preprocess.json"

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
}
# the values each setting takes (the host-side pydantic model uses the same tuples)
RESIZE_MODES = ("stretch", "letterbox", "center_crop")
INTERPOLATIONS = tuple(_RESAMPLE)
CHANNEL_ORDERS = ("RGB", "BGR")
LAYOUTS = ("NCHW",)


class InputGeometry:
    """What both spellings of the settings (this module's PreprocessSpec, the host's pydantic
    Preprocess) derive from their ``input_size`` (height, width) and ``channel_order``."""

    @property
    def height(self) -> int:
        return self.input_size[0]

    @property
    def width(self) -> int:
        return self.input_size[1]

    @property
    def input_shape(self) -> list:
        """[1, 3, H, W]"""
        return [1, 3, self.height, self.width]

    def channel_index(self) -> list:
        """Indices that take RGB channels to the model's channel order."""
        return [0, 1, 2] if self.channel_order == "RGB" else [2, 1, 0]


def spec_file(path: Union[str, Path]) -> Path:
    """``preprocess.json`` of a folder, or the file itself."""
    path = Path(path)
    return path / FILENAME if path.is_dir() else path


@dataclass(frozen=True)
class PreprocessSpec(InputGeometry):
    """The settings of ``preprocess.json`` as a plain record (what deploy scripts read)."""

    input_size: tuple = (32, 32)  # (height, width)
    resize: str = "stretch"
    interpolation: str = "bilinear"
    pad_value: int = 0
    mean: tuple = (0.5, 0.5, 0.5)  # 0..1 scale, RGB order
    std: tuple = (0.5, 0.5, 0.5)
    channel_order: str = "RGB"
    layout: str = "NCHW"

    @classmethod
    def from_dict(cls, data: Any) -> "PreprocessSpec":
        """From a dumped ``Preprocess`` (what the host wrote); ValueError names what is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown}; known: {sorted(known)}")
        spec = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
        for key, allowed in (("resize", RESIZE_MODES), ("interpolation", INTERPOLATIONS),
                             ("channel_order", CHANNEL_ORDERS), ("layout", LAYOUTS)):
            if getattr(spec, key) not in allowed:
                raise ValueError(f"{key}: {getattr(spec, key)!r} is not one of {list(allowed)}")
        for key in ("mean", "std"):
            if len(getattr(spec, key)) != 3:
                raise ValueError(f"{key}: expected 3 numbers, got {list(getattr(spec, key))}")
        if len(spec.input_size) != 2 or min(spec.input_size) < 1 or min(spec.std) <= 0:
            raise ValueError(f"input_size {list(spec.input_size)} / std {list(spec.std)} out of range")
        return spec

    @classmethod
    def load(cls, path: Union[str, Path]) -> "PreprocessSpec":
        """Read ``preprocess.json`` from a folder (or the file itself)."""
        path = spec_file(path)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


# -- decoding ---------------------------------------------------------------------------------------
def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img)
        if mode == "F":
            a = np.asarray(a, dtype=np.float64)
            a = a * 255.0 if a.size and float(np.nanmax(a)) <= 1.0 else a
        else:  # 16-bit (or 32-bit int) grayscale: scale 0..65535 to 0..255
            a = np.asarray(a, dtype=np.float64) / 257.0
        a = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        # transparent pixels composite onto black (pad_value-independent and deterministic)
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX...


def load_image(path: Union[str, Path, BinaryIO]) -> Image.Image:
    """Decode an image file (path or binary file object) fully into an RGB PIL image with its EXIF orientation applied.

    Grayscale, palette, RGBA/LA (composited on black), CMYK and 16-bit images become 8-bit RGB.
    Raises OSError/ValueError (from Pillow) for unreadable, truncated, empty or non-image files.
    """
    with Image.open(path) as img:
        img.load()  # decode now: truncated files fail here, not later
        try:
            oriented = ImageOps.exif_transpose(img)
        except Exception:  # a broken EXIF block must not lose an otherwise good image
            oriented = img
        if oriented is None:
            oriented = img
        rgb = _to_rgb(oriented)
        rgb.load()
        return rgb if rgb is not img else img.copy()


# -- resizing ---------------------------------------------------------------------------------------
def resize(img: Union[Image.Image, np.ndarray], spec) -> np.ndarray:
    """Resize an RGB image to ``spec.input_size`` with ``spec.resize``; returns uint8 H x W x 3 (RGB)."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8))
    if img.mode != "RGB":
        img = _to_rgb(img)
    th, tw = spec.input_size
    w, h = img.size
    resample = _RESAMPLE[spec.interpolation]
    if spec.resize == "stretch" or (w, h) == (tw, th):
        out = img if (w, h) == (tw, th) else img.resize((tw, th), resample)
    elif spec.resize == "letterbox":
        scale = min(tw / w, th / h)
        nw, nh = max(1, min(tw, round(w * scale))), max(1, min(th, round(h * scale)))
        inner = img.resize((nw, nh), resample)
        out = Image.new("RGB", (tw, th), (spec.pad_value,) * 3)
        out.paste(inner, ((tw - nw) // 2, (th - nh) // 2))
    else:  # center_crop
        scale = max(tw / w, th / h)
        nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
        scaled = img.resize((nw, nh), resample)
        left, top = (nw - tw) // 2, (nh - th) // 2
        out = scaled.crop((left, top, left + tw, top + th))
    arr = np.asarray(out, dtype=np.uint8)
    return np.ascontiguousarray(arr)


# -- normalisation ----------------------------------------------------------------------------------
def _constants(spec) -> tuple:
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 1, 1, 3)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 1, 1, 3)
    return mean, std


def normalize(images: np.ndarray, spec) -> np.ndarray:
    """uint8 N x H x W x 3 RGB (or one H x W x 3 image) -> float32 N x 3 x H x W in the model's
    channel order: ``(x / 255 - mean) / std``."""
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"normalize expects N x H x W x 3 uint8 RGB, got shape {a.shape}")
    mean, std = _constants(spec)
    x = a.astype(np.float32) / np.float32(255.0)
    x = (x - mean) / std
    x = x.transpose(0, 3, 1, 2)
    if spec.channel_order == "BGR":
        x = x[:, ::-1]
    return np.ascontiguousarray(x, dtype=np.float32)


def to_channel_order(images: np.ndarray, spec) -> np.ndarray:
    """uint8 ... x 3 RGB -> the model's channel order, unnormalised (for boards whose NPU normalises)."""
    a = np.asarray(images)
    return np.ascontiguousarray(a[..., ::-1]) if spec.channel_order == "BGR" else a


def prepare(image: Union[str, Path, Image.Image, np.ndarray], spec) -> np.ndarray:
    """A file, PIL image or uint8 RGB array -> float32 1 x 3 x H x W model input."""
    if isinstance(image, (str, Path)):
        image = load_image(image)
    return normalize(resize(image, spec)[None], spec)


def prepare_batch(images: Sequence[Union[str, Path, Image.Image, np.ndarray]], spec) -> np.ndarray:
    arr = np.stack([resize(load_image(i) if isinstance(i, (str, Path)) else i, spec) for i in images])
    return normalize(arr, spec)
