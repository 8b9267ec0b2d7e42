"""Rockchip RV1103 (Luckfox Pico, Pico Mini, Pico Plus): Cortex-A7, 0.5 TOPS int8 NPU, 64 MB DDR2
in the package. RKNN int8 only; a C demo on librknnmrt. Shared code: boards/rockchip.py."""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import Field

from .rockchip import LuckfoxBoard


class RV1103(LuckfoxBoard):
    name: str = "rv1103"
    title: str = "Luckfox Pico (RV1103)"
    soc: str = "Rockchip RV1103 (Cortex-A7 1.2 GHz, 0.5 TOPS int8 NPU, 64 MB DDR2 in package)"
    # Luckfox boots rkipc (camera pipeline) and the NPU allocates from CMA: keep half the RAM for them
    ram_mb: float | None = 64
    ram_usable_fraction: float = 0.5
    # the model budget in the 16 MB class of SPI flash partitions; Pico Mini B / Plus carry 128 MB
    # SPI NAND for the whole firmware, bare Pico / Mini A boot from an SD card (raise board.flash_mb)
    flash_mb: float | None = 16
    max_input_size: int | None = None
    quantizer_options: Mapping[str, Any] = Field(default_factory=lambda: {
        "target": "rv1103", "do_quantization": True, "dtype": "w8a8"})
    sources: Mapping[str, str] = Field(default_factory=lambda: {
        "ram_mb": "RV1103 integrates 64 MB DDR2 (Luckfox Pico Mini B spec: RAM 64MB, Flash 128MB, NPU 0.5 TOPS)",
        "flash_mb": "issue #5 (16 MB class); configurable: board.flash_mb",
        "int8_only": "rknn_quantize: build(do_quantization=False) is refused for rv1103 by rknn-toolkit2 2.5.0",
        "cpu_fallback_ops": "measured with rknn-toolkit2 2.5.0 (layer table Target column) + airockchip/rknn-toolkit2 "
                            "issues #145 #217 #316 #359 #482 #557 #560, rknn_model_zoo #312",
        "zero_copy": "rknpu2 examples/RV1106_RV1103 use rknn_create_mem/rknn_set_io_mem; rknn_inputs_set fails "
                     "on rv1106 ('context config invalid', rknn-toolkit2 #335)",
    })
