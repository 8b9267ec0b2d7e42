"""Rockchip RV1106 (Luckfox Pico Pro: RV1106G2, 128 MB DDR3L; Pico Max / Ultra: RV1106G3, 256 MB):
Cortex-A7, 1 TOPS int8 NPU. Same NPU and runtime as RV1103 (boards/rockchip.py); more RAM."""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import Field

from .rockchip import LuckfoxBoard


class RV1106(LuckfoxBoard):
    name: str = "rv1106"
    title: str = "Luckfox Pico Pro/Max (RV1106)"
    soc: str = "Rockchip RV1106 (Cortex-A7 1.2 GHz, 1 TOPS int8 NPU, 128 MB (G2) / 256 MB (G3) DDR3L in package)"
    # the smaller variant (RV1106G2, Luckfox Pico Pro); RV1106G3 boards: board.ram_mb=256
    ram_mb: float | None = 128
    ram_usable_fraction: float = 0.5
    flash_mb: float | None = 16
    quantizer_options: Mapping[str, Any] = Field(default_factory=lambda: {
        "target": "rv1106", "do_quantization": True, "dtype": "w8a8"})
    sources: Mapping[str, str] = Field(default_factory=lambda: {
        "ram_mb": "RV1106G2 128 MB / RV1106G3 256 MB DDR3L in package (Luckfox Pico Pro / Max); default: the smaller",
        "flash_mb": "issue #5 (16 MB class); configurable: board.flash_mb",
        "int8_only": "rknn_quantize: build(do_quantization=False) is refused for rv1106 by rknn-toolkit2 2.5.0",
        "cpu_fallback_ops": "measured with rknn-toolkit2 2.5.0 for rv1103 (same NPU) + airockchip/rknn-toolkit2 "
                            "issues #145 #217 #316 #359 #482 #557 #560, rknn_model_zoo #312 (all on rv1106)",
        "zero_copy": "rknn_inputs_set fails on rv1106 ('context config invalid', rknn-toolkit2 #335)",
    })
