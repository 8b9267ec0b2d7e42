"""Boards of a known family as data: one ``<name>.yaml`` here per board, holding the profile's field
values plus ``family``, which names the class with the family's behaviour. A new board of a known
family is a YAML file here (boards.board_entry_points lists every file here as the board
``boards.profiles:<name>``) and its config option, conf/board/<name>.yaml.

The files are read with ``yaml.safe_load`` and validated by the family's pydantic model (unknown keys
are refused); nothing in them runs code.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from .. import BoardProfile
from ..rockchip import LuckfoxBoard, RK35Board

PROFILES = Path(__file__).resolve().parent

# `family:` in a profile file -> the class that holds the family's behaviour
FAMILIES: dict[str, type[BoardProfile]] = {
    "rockchip_c_demo": LuckfoxBoard,  # Rockchip NPU, librknnmrt, a C demo (RV1103 / RV1106)
    "rockchip_rknnlite": RK35Board,  # Rockchip NPU, librknnrt, Python with rknn-toolkit-lite2 (RK3566 / RK3588)
}


def load_profile(name: str) -> BoardProfile:
    """The profile in ``<name>.yaml``, validated by its family's class."""
    path = PROFILES / f"{name}.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of profile fields")
    family = data.pop("family", None)
    if family not in FAMILIES:
        raise ValueError(f"{path}: family {family!r} is not one of {', '.join(sorted(FAMILIES))}")
    if data.get("name") != name:
        raise ValueError(f"{path}: name {data.get('name')!r} must be the file's name, {name!r}")
    try:
        return FAMILIES[family].model_validate(data)
    except ValidationError as e:
        raise ValueError(f"{path}: {e}") from None


def __getattr__(name: str) -> BoardProfile:
    """``boards.profiles:<name>`` (what an entry point names) is the profile in ``<name>.yaml``."""
    if name.startswith("_") or not (PROFILES / f"{name}.yaml").is_file():
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} (no {name}.yaml in {PROFILES})")
    return load_profile(name)
