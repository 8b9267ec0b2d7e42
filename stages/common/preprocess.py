"""The one preprocessing definition of edgepipe: the validated settings (host side) and the functions.

Training, calibration, evaluation and the deploy scripts generated for boards all call the same
functions, so the pixels a model sees on a board are computed exactly like the ones it was trained on.
The functions live in ``stages/common/preprocess_numpy.py`` (numpy + Pillow only), which the package stage
copies verbatim into packages as ``preprocess.py``; they are re-exported here. This module adds the
pydantic model ``Preprocess`` that validates the config section and writes ``preprocess.json``
(boards read it back with ``preprocess_numpy.PreprocessSpec``, which needs no pydantic).

    spec = Preprocess.load("model_dir")   # then load_image / resize / normalize as in preprocess_numpy.py

Conventions (mean/std on the 0..1 scale, RGB order: see preprocess_numpy.py), and
- ``rknn_mean_std()`` / ``awnn_mean_norm()`` give the same normalisation in the 0..255 form that
  board toolchains take, in the model's input channel order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from stages.common.preprocess_numpy import (  # noqa: F401  (re-exported: the functions every stage calls)
    CHANNEL_ORDERS,
    FILENAME,
    INTERPOLATIONS,
    LAYOUTS,
    RESIZE_MODES,
    InputGeometry,
    PreprocessSpec,
    load_image,
    normalize,
    prepare,
    prepare_batch,
    resize,
    spec_file,
    to_channel_order,
)

# mean, std on the 0..1 scale, RGB order
PRESETS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # one value for all channels: 127.5 / 127.5 on 0..255, what single-mean boards (awnn) take
    "uniform": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

Triple = tuple[float, float, float]


class Preprocess(BaseModel, InputGeometry):
    """How an image becomes the model's input tensor (written to ``preprocess.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # (height, width); a single int means square
    input_size: tuple[int, int] = (32, 32)
    # stretch: resize to H x W ignoring aspect; letterbox: fit inside, pad with pad_value;
    # center_crop: scale the shorter side to fit, then crop the centre
    resize: Literal[RESIZE_MODES] = "stretch"
    interpolation: Literal[INTERPOLATIONS] = "bilinear"
    pad_value: int = 0
    # 0..1 scale, RGB order; a preset name ("imagenet", "uniform"), one number, or three numbers
    mean: Triple = PRESETS["uniform"][0]
    std: Triple = PRESETS["uniform"][1]
    channel_order: Literal[CHANNEL_ORDERS] = "RGB"
    layout: Literal[LAYOUTS] = "NCHW"

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
                    raise ValueError(f"{key}: unknown preset {value!r}; use one of {sorted(PRESETS)} "
                                     "or a list of 3 numbers")
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

    # -- convenience (height, width, input_shape, channel_index: preprocess_numpy.InputGeometry) -------------
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

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILENAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Preprocess:
        """Read ``preprocess.json`` from a folder (or the file itself)."""
        return cls.model_validate(json.loads(spec_file(path).read_text(encoding="utf-8")))
