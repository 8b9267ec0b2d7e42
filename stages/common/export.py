"""Helpers shared by the stages that convert a ``model.pt`` bundle (export_onnx, export_torchscript):
load the bundle folder, check its input channels, write ``io.json``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.contract.stage import StageError
from stages.common.bundle import FORWARD, IO, check_bundle


def load_bundle_folder(src: Path):
    """(module in eval mode, Preprocess, bundle info) from a model folder; StageError naming the
    missing file otherwise."""
    from stages.common.models import load_model, read_bundle
    from stages.common.preprocess import Preprocess

    check_bundle(src, ("model.pt", *FORWARD), input="model", hint="expected a train/clip_outliers output")
    try:
        spec = Preprocess.load(src)
    except Exception as e:  # a broken file is the user's to fix
        raise StageError(f"cannot read {src / 'preprocess.json'}: {e}") from e
    info = read_bundle(src / "model.pt")
    module = load_model(src / "model.pt")
    return module, spec, {"arch": info.get("arch") or {}, "num_classes": info.get("num_classes")}


def check_channels(info: Mapping[str, Any], shape: list[int], section: str) -> None:
    in_ch = (info.get("arch") or {}).get("in_channels", 3)
    if in_ch != shape[1]:
        raise StageError(
            f"the model takes {in_ch} input channels but preprocess.json gives {shape[1]} (RGB); "
            f"{section} cannot export a model whose input the preprocessing does not produce"
        )


def write_io(out: Path, input_name: str, output_name: str, shape: list[int]) -> None:
    io = {"input": input_name, "output": output_name, "input_shape": [int(s) for s in shape]}
    (out / IO).write_text(json.dumps(io, indent=2) + "\n", encoding="utf-8")
