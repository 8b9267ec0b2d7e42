"""Rockchip RK3588 / RK3588S (Orange Pi 5, Rock 5, ...): 4x A76 + 4x A55, 6 TOPS NPU in three cores,
Linux with Python. RKNN model + infer.py for rknn-toolkit-lite2. Shared code: boards/rockchip.py."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from pydantic import Field

from .rockchip import RK35Board


class RK3588(RK35Board):
    name: str = "rk3588"
    title: str = "RK3588 board"
    soc: str = "Rockchip RK3588 (4x Cortex-A76 + 4x A55, 6 TOPS NPU in 3 cores, int8/fp16)"
    quantizer_options: Mapping[str, Any] = Field(default_factory=lambda: {"target": "rk3588", "do_quantization": True})
    sources: Mapping[str, str] = Field(default_factory=lambda: {
        "cpu_fallback": "librknnrt runs unsupported layers on the CPU: no operator is refused",
        "init_runtime": "rknn-toolkit-lite2: core_mask=RKNNLite.NPU_CORE_AUTO on multi-core NPUs",
    })

    init_runtime: ClassVar[str] = "core_mask=RKNNLite.NPU_CORE_AUTO"
