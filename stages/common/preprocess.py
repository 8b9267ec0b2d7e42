"""The one preprocessing definition of edgepipe.

Training, calibration, evaluation and the deploy scripts generated for boards all call the functions
below, so the pixels a model sees on a board are computed exactly like the ones it was trained on.

This module imports only numpy, Pillow and pydantic: the package stage copies it verbatim next to
generated deploy scripts.

    spec = Preprocess.load("model_dir")          # reads model_dir/preprocess.json
    img = load_image("cat.jpg")                  # PIL RGB, EXIF orientation applied
    arr = resize(img, spec)                      # uint8 H x W x 3, RGB
    x = normalize(arr[None], spec)               # float32 1 x 3 x H x W, in spec.channel_order

Conventions
- ``mean``/``std`` are on the 0..1 scale (like torchvision) and listed in **RGB** order whatever the
  channel order is: ``normalize`` computes ``(x / 255 - mean) / std`` on RGB pixels and then reorders
  the channels to ``channel_order``.
- ``rknn_mean_std()`` / ``awnn_mean_norm()`` give the same normalisation in the 0..255 form that
  board toolchains take, in the model's input channel order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO, Literal, Sequence, Union

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

FILENAME = "preprocess.json"

# mean, std on the 0..1 scale, RGB order
PRESETS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # one value for all channels: 127.5 / 127.5 on 0..255, what single-mean boards (awnn) take
    "uniform": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
}

Triple = tuple[float, float, float]


class Preprocess(BaseModel):
    """How an image becomes the model's input tensor (written to ``preprocess.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # (height, width); a single int means square
    input_size: tuple[int, int] = (32, 32)
    # stretch: resize to H x W ignoring aspect; letterbox: fit inside, pad with pad_value;
    # center_crop: scale the shorter side to fit, then crop the centre
    resize: Literal["stretch", "letterbox", "center_crop"] = "stretch"
    interpolation: Literal["nearest", "bilinear", "bicubic", "area"] = "bilinear"
    pad_value: int = 0
    # 0..1 scale, RGB order; a preset name ("imagenet", "uniform"), one number, or three numbers
    mean: Triple = PRESETS["uniform"][0]
    std: Triple = PRESETS["uniform"][1]
    channel_order: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"

    @model_validator(mode="before")
    @classmethod
    def _presets(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key, idx in (("mean", 0), ("std", 1)):
            value = data.get(key)
            if isinstance(value, str):
                if value not in PRESETS:
                    raise ValueError(f"{key}: unknown preset {value!r}; use one of {sorted(PRESETS)} or a list of 3 numbers")
                data[key] = PRESETS[value][idx]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                data[key] = (float(value),) * 3
            elif isinstance(value, (list, tuple)) and len(value) == 1:
                data[key] = (float(value[0]),) * 3
        size = data.get("input_size")
        if isinstance(size, int) and not isinstance(size, bool):
            data["input_size"] = (size, size)
        elif isinstance(size, (list, tuple)) and len(size) == 1:
            data["input_size"] = (size[0], size[0])
        if isinstance(data.get("channel_order"), str):
            data["channel_order"] = data["channel_order"].upper()
        return data

    @field_validator("input_size")
    @classmethod
    def _size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 1:
            raise ValueError(f"input_size must be positive, got {list(v)}")
        return v

    @field_validator("std")
    @classmethod
    def _std(cls, v: Triple) -> Triple:
        if min(v) <= 0:
            raise ValueError(f"std must be > 0, got {list(v)}")
        return v

    @field_validator("pad_value")
    @classmethod
    def _pad(cls, v: int) -> int:
        if not 0 <= v <= 255:
            raise ValueError("pad_value must be in 0..255")
        return v

    # -- convenience ------------------------------------------------------------------------------
    @property
    def height(self) -> int:
        return self.input_size[0]

    @property
    def width(self) -> int:
        return self.input_size[1]

    @property
    def input_shape(self) -> list[int]:
        """[1, 3, H, W]"""
        return [1, 3, self.height, self.width]

    def channel_index(self) -> list[int]:
        """Indices that take RGB channels to the model's channel order."""
        return [0, 1, 2] if self.channel_order == "RGB" else [2, 1, 0]

    def rknn_mean_std(self) -> tuple[list[float], list[float]]:
        """(mean_values, std_values) on 0..255 per channel, in the model's channel order (rknn config)."""
        idx = self.channel_index()
        mean = [round(self.mean[i] * 255.0, 6) for i in idx]
        std = [round(self.std[i] * 255.0, 6) for i in idx]
        return mean, std

    def awnn_mean_norm(self) -> tuple[float, float]:
        """(mean, norm) for toolchains that take one value for all channels: y = (x - mean) * norm
        on 0..255 pixels. Raises ValueError when the channels have different mean or std."""
        if len(set(self.mean)) != 1 or len(set(self.std)) != 1:
            raise ValueError(
                f"this target takes one mean/std for all channels, but preprocess has mean={list(self.mean)} "
                f"std={list(self.std)}; use preprocess=uniform (0.5/0.5) or equal values per channel"
            )
        return round(self.mean[0] * 255.0, 6), 1.0 / (self.std[0] * 255.0)

    # -- file I/O ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def save(self, directory: Union[str, Path]) -> Path:
        path = Path(directory) / FILENAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Preprocess":
        """Read ``preprocess.json`` from a folder (or the file itself)."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))


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
def resize(img: Union[Image.Image, np.ndarray], spec: Preprocess) -> np.ndarray:
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
def _constants(spec: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 1, 1, 3)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 1, 1, 3)
    return mean, std


def normalize(images: np.ndarray, spec: Preprocess) -> np.ndarray:
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


def to_channel_order(images: np.ndarray, spec: Preprocess) -> np.ndarray:
    """uint8 ... x 3 RGB -> the model's channel order, unnormalised (for boards whose NPU normalises)."""
    a = np.asarray(images)
    return np.ascontiguousarray(a[..., ::-1]) if spec.channel_order == "BGR" else a


def prepare(image: Union[str, Path, Image.Image, np.ndarray], spec: Preprocess) -> np.ndarray:
    """A file, PIL image or uint8 RGB array -> float32 1 x 3 x H x W model input."""
    if isinstance(image, (str, Path)):
        image = load_image(image)
    return normalize(resize(image, spec)[None], spec)


def prepare_batch(images: Sequence[Union[str, Path, Image.Image, np.ndarray]], spec: Preprocess) -> np.ndarray:
    arr = np.stack([resize(load_image(i) if isinstance(i, (str, Path)) else i, spec) for i in images])
    return normalize(arr, spec)
