"""Rockchip RK3566 (Radxa Zero 3, Orange Pi 3B, ...): 4x Cortex-A55, 1 TOPS NPU (one core), Linux
with Python. RKNN model + infer.py for rknn-toolkit-lite2. Shared code: boards/rockchip.py."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from pydantic import Field

from .rockchip import RK35Board


class RK3566(RK35Board):
    name: str = "rk3566"
    title: str = "RK3566 board"
    soc: str = "Rockchip RK3566 (4x Cortex-A55, 1 TOPS NPU, int8/fp16)"
    quantizer_options: Mapping[str, Any] = Field(default_factory=lambda: {"target": "rk3566", "do_quantization": True})
    sources: Mapping[str, str] = Field(default_factory=lambda: {
        "cpu_fallback": "librknnrt runs unsupported layers on the CPU: no operator is refused",
        "init_runtime": "rknn-toolkit-lite2: core_mask only on multi-core NPUs (RK3576/RK3588)",
    })

    init_runtime: ClassVar[str] = ""
