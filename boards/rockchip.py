"""What Rockchip NPU boards share: an int8 RKNN model from rknn-toolkit2, normalisation inside the
model (mean_values/std_values on 0..255), uint8 NHWC input on the board.

- ``LuckfoxBoard`` (RV1103 / RV1106, Luckfox Pico): int8 only, a small RAM, and a runtime
  (librknnmrt) without CPU kernels for many operators: an op the compiler places on the CPU makes
  ``rknn_init`` fail on the board ("unsupport cpu Pow op"). Package: model.rknn + a C demo on the
  RKNN runtime API + CMakeLists for the arm-rockchip830-linux-uclibcgnueabihf toolchain.
- ``RK35Board`` (RK3566 / RK3588, boards with Python): librknnrt runs CPU fallbacks; package:
  model.rknn + infer.py for rknn-toolkit-lite2.

Which ops land on the CPU was measured here with rknn-toolkit2 2.5.0, target rv1103, on small
conv -> op -> conv graphs (the compiler's layer table, `Target` column): Min, Exp, Sqrt, Div by a
tensor, Pow with a non-integer exponent, LayerNormalization (exNorm) and AveragePool with
count_include_pad=0 went to the CPU; Max, Softmax, Sigmoid, HardSwish, HardSigmoid, GELU, ReduceMean,
Resize (nearest x2), Transpose (small) and Pow with exponent 3 stayed on the NPU. gem_resnet's
second Pow (exponent 1/p) goes to the CPU; resnet18 / mobilenet_v3 (either head) run fully on the NPU.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from pydantic import Field, model_validator

from . import BoardProfile, Finding, ModelFormat, PackageContext, limit_findings
from .emulation import Emulation
from .stand_in import RUNTIME_LIB, RUNTIME_SUBDIR

if TYPE_CHECKING:  # pragma: no cover
    from stages.common.preprocess import Preprocess

    from .graph import GraphInfo, Node

TOOLKIT = "rknn-toolkit2 2.5.0"


class RknnChip(NamedTuple):
    dtypes: tuple[str, ...]  # the quantized_dtype values the toolkit builds for the chip
    float16: bool  # build(do_quantization=False) works: the NPU has a float16 path


# The one list of Rockchip chips: every target_platform the toolkit builds for, measured with
# rknn-toolkit2 2.5.0 (RKNN.config raises for every other dtype; build(do_quantization=False) fails
# where float16 is False). rknn_quantize's targets and checks come from it and a board profile's
# quantizer target must be one of them: a new chip of the family is one row here (plus a
# profiles/<name>.yaml and its entry point when edgepipe packages for a board with it).
RKNN_CHIPS: dict[str, RknnChip] = {
    "rv1103": RknnChip(("w8a8", "w16a16i_dfp"), float16=False),
    "rv1106": RknnChip(("w8a8", "w16a16i_dfp"), float16=False),
    "rv1103b": RknnChip(("w8a8", "w16a16i_dfp"), float16=False),
    "rv1106b": RknnChip(("w8a8", "w16a16i_dfp"), float16=False),
    "rk3562": RknnChip(("w8a8", "w8a16", "w16a16i_dfp"), float16=True),
    "rk3566": RknnChip(("w8a8", "w16a16i_dfp"), float16=True),
    "rk3568": RknnChip(("w8a8", "w16a16i_dfp"), float16=True),
    "rk3576": RknnChip(("w8a8", "w16a16i_dfp", "w4a16"), float16=True),
    "rk3588": RknnChip(("w8a8", "w16a16i_dfp"), float16=True),
}

# op -> message; "(#N)" cites airockchip/rknn-toolkit2 issues where the board runtime refused the op
_RUNTIME_LACKS = "the RV1103/RV1106 runtime has no CPU kernel for it, so rknn_init fails on the board"
LUCKFOX_CPU_FALLBACK = {
    "Pow": ("rknn-toolkit2 places Pow with a non-integer or computed exponent on the CPU (measured: GeM "
            f"pooling's x**(1/p)); {_RUNTIME_LACKS} ('unsupport cpu Pow op', rknn_model_zoo#312). GeM "
            "pooling (model.arch=gem_resnet) needs it: use model.arch=resnet18 (average pooling) for this board"),
    "Min": (f"placed on the CPU (measured); {_RUNTIME_LACKS} ('unsupport cpu Min op', #482); use Clip/ReLU6 "
            "(torch.clamp with constant bounds) instead of an element-wise minimum"),
    "Exp": f"placed on the CPU (measured); {_RUNTIME_LACKS}",
    "Sqrt": f"placed on the CPU (measured); {_RUNTIME_LACKS}",
    "Div": (f"division by a tensor is placed on the CPU (measured); {_RUNTIME_LACKS}; multiply by a "
            "constant instead"),
    "LayerNormalization": f"becomes exNorm on the CPU (measured); {_RUNTIME_LACKS} (#359)",
    "AveragePool": (f"with count_include_pad=0 and padding it is placed on the CPU (measured, #217); "
                    f"{_RUNTIME_LACKS}; use count_include_pad=True or no padding"),
    "ArgMax": f"has no NPU kernel; {_RUNTIME_LACKS} (#557); take the arg-max in the application",
    "Transpose": (f"large transposes fall back to the CPU (#145, #316); {_RUNTIME_LACKS}; avoid permutes of "
                  "big feature maps"),
    "Resize": f"some Resize modes fall back to the CPU (#560); {_RUNTIME_LACKS}",
}


class RockchipBoard(BoardProfile):
    model_format: ModelFormat = "rknn"
    input_layout: str = "NHWC uint8 RGB (the model normalises: mean_values/std_values inside the .rknn)"
    quantizer: str | None = TOOLKIT
    weight_bytes: float = 1.0  # int8
    activation_bytes: float = 1.0

    @model_validator(mode="after")
    def _known_chip(self) -> RockchipBoard:
        target = self.quantizer_options.get("target")
        if target not in RKNN_CHIPS:
            raise ValueError(f"quantizer_options.target {target!r} is not a Rockchip chip rknn-toolkit2 builds for "
                             f"({', '.join(RKNN_CHIPS)}; boards/rockchip.py RKNN_CHIPS)")
        return self

    def op_applies(self, g: GraphInfo, node: Node, level: str) -> bool:
        if node.op == "Pow":
            exponent = g.constant(node.inputs[1]) if len(node.inputs) > 1 else None
            if exponent is None:
                return True
            return not (exponent.size == 1 and float(exponent.reshape(-1)[0]).is_integer())
        if node.op == "Div":
            return len(node.inputs) > 1 and g.constant(node.inputs[1]) is None
        if node.op == "AveragePool":
            return not node.attrs.get("count_include_pad", 0) and any(node.attrs.get("pads", []) or [0])
        return True

    def normalisation_for(self, spec: Preprocess) -> dict[str, Any]:
        out = super().normalisation_for(spec)
        out["where"] = "inside model.rknn (rknn config mean_values/std_values); feed uint8 RGB"
        return out

    def check_package(self, model_dir: Path, model_file: Path) -> list[Finding]:
        out = super().check_package(model_dir, model_file)
        build = model_dir / "build.json"
        if build.is_file():
            import json

            target = json.loads(build.read_text()).get("target")
            want = self.quantizer_options.get("target")
            if target and want and target != want:
                out.append(Finding(level="error", check="target",
                                   message=f"model.rknn was built for {target}, not {want} ({self.title}); set "
                                           f"quantize.target={want} (or board={target})"))
        return out


class LuckfoxBoard(RockchipBoard):
    """RV1103 / RV1106 (Luckfox Pico): int8 NPU, librknnmrt, a C demo."""

    runtime: str = "librknnmrt (RKNN runtime C API, zero-copy)"
    cpu_fallback_ops: dict[str, str] = Field(default_factory=lambda: dict(LUCKFOX_CPU_FALLBACK))
    package_files: tuple[str, ...] = ("model.rknn", "labels.txt", "main.c", "CMakeLists.txt", "prepare_input.py",
                                      "preprocess.py", "preprocess.json", "README.md", "manifest.json")
    deploy_script: str = "main.c (RKNN runtime C API) built with CMakeLists.txt"

    toolchain: ClassVar[str] = "arm-rockchip830-linux-uclibcgnueabihf"
    # Cortex-A7, 32-bit: an armhf Debian userland (glibc; the board's is uClibc) with Debian's numpy and
    # Pillow (PyPI has no armv7l wheels of them)
    emulation: ClassVar[Emulation | None] = Emulation(
        "armhf", debs=("python3", "python3-numpy", "python3-pil"),
        command=("python3", "prepare_input.py", "--selftest"), c_selftest=("rknn_classify", "--selftest"),
        checks="the image path (prepare_input.py, preprocess.py, Pillow) on armhf, and the C demo built by its "
               "CMakeLists.txt (-Wall -Wextra -Werror) for armhf with its --selftest against a stand-in runtime "
               "that replays golden/; the NPU's numbers need librknnmrt and the NPU: run ./rknn_classify "
               "--selftest on the board")

    def check_package(self, model_dir: Path, model_file: Path) -> list[Finding]:
        out = super().check_package(model_dir, model_file)
        log = model_dir / "rknn.log"
        if log.is_file():
            out += self.check_rknn_log(log.read_text(errors="replace"))
        return out

    def check_rknn_log(self, text: str) -> list[Finding]:
        """The compiler's layer table (in rknn.log when quantize.verbose_log=true): layers placed on
        the CPU, and the runtime memory it reports."""
        out: list[Finding] = []
        rows = re.findall(r"\]\s+\d+\s+(\w+)\s+(?:INT8|UINT8|INT16|INT32|INT64|FLOAT16|FLOAT)\s+(CPU|NPU)\s+\S+\s+\S+"
                          r".*?\s(\S+)\s*$", text, re.M)
        cpu = [(op, name) for op, target, name in rows if target == "CPU"
               and op not in ("InputOperator", "OutputOperator")]
        if cpu:
            ops = ", ".join(f"{op} ({name})" for op, name in cpu[:6])
            out.append(Finding(level="error", check="cpu_fallback",
                               message=f"rknn-toolkit2 placed {len(cpu)} layer(s) on the CPU: {ops}; "
                                       f"{_RUNTIME_LACKS}: change the model (see preflight's warnings)"))
        internal = re.search(r"Total Internal Memory Size:\s*([\d.]+)\s*(KB|MB)", text)
        weight = re.search(r"Total Weight Memory Size:\s*([\d.]+)\s*(KB|MB)", text)
        if internal and weight and self.ram_mb:
            mb = sum(float(m.group(1)) / (1024 if m.group(2) == "KB" else 1) for m in (internal, weight))
            out += limit_findings("ram", mb, self.ram_mb * self.ram_usable_fraction,
                          f"the RKNN runtime needs {mb:.1f} MB (weights + internal, from rknn.log)",
                          f"the budget of {self.ram_usable_fraction:.0%} of {self.title}'s {self.ram_mb:g} MB RAM",
                          "lower preprocess.input_size or use a smaller model")
        return out

    def write_package(self, pkg: PackageContext) -> None:
        pkg.copy(pkg.model_file, "model.rknn")
        pkg.write_labels()
        project = "rknn_classify"
        pkg.copy_template("rknn_c/main.c", "main.c")
        pkg.render("rknn_c/CMakeLists.txt.tmpl", "CMakeLists.txt", project=project, board_title=self.title,
                   runtime_subdir=RUNTIME_SUBDIR, runtime_lib=RUNTIME_LIB, toolkit=TOOLKIT,
                   compile_definitions="EDGEPIPE_ZERO_COPY=1",
                   zero_copy_note="RV1103/RV1106's librknnmrt offers only the zero-copy I/O API (rknn_create_mem)")
        pkg.copy_preprocess()
        pkg.copy_template("rknn_c/prepare_input.py", "prepare_input.py")
        h, w = pkg.spec.height, pkg.spec.width
        pkg.render("rknn_c/README.md.tmpl", "README.md", board_title=self.title, soc=self.soc, project=project,
                   height=h, width=w, toolchain=self.toolchain, toolkit=TOOLKIT,
                   target=self.quantizer_options.get("target", ""), top_k=pkg.top_k,
                   n_classes=len(pkg.labels), notes=_notes(pkg))


class RK35Board(RockchipBoard):
    """RK3566 / RK3588: librknnrt with CPU fallbacks, Python on the board (rknn-toolkit-lite2)."""

    runtime: str = "librknnrt + rknn-toolkit-lite2 (Python)"
    package_files: tuple[str, ...] = ("model.rknn", "labels.txt", "infer.py", "selftest.py", "preprocess.py",
                                      "preprocess.json", "README.md", "manifest.json")
    deploy_script: str = "infer.py (rknn-toolkit-lite2, numpy, Pillow)"

    # aarch64 with the real rknn-toolkit-lite2 wheel: everything up to init_runtime, which needs the NPU
    emulation: ClassVar[Emulation | None] = Emulation(
        "arm64", wheels=("numpy==1.26.4", "pillow==13.0.0", "rknn-toolkit-lite2==2.5.0", "ruamel.yaml==0.19.1",
                         "psutil==7.2.2"),
        command=("python3", "infer.py", "--selftest"), stops_at="init_runtime failed",
        stops_note="infer.py imported rknn-toolkit-lite2 and loaded model.rknn on aarch64; init_runtime needs "
                   "the NPU (librknnrt and its driver), so the golden samples run only on the board")

    # RKNNLite.init_runtime arguments (core_mask exists on multi-core NPUs only); rendered into
    # infer.py, left out of facts() (preflight.json and the manifest record the profile as before)
    init_runtime: str = Field("", exclude=True)

    def write_package(self, pkg: PackageContext) -> None:
        pkg.copy(pkg.model_file, "model.rknn")
        pkg.write_labels()
        pkg.copy_preprocess()
        pkg.render("rknnlite/infer.py.tmpl", "infer.py", board_title=self.title, init_runtime=self.init_runtime,
                   top_k=pkg.top_k)
        pkg.copy_template("selftest.py", "selftest.py")
        pkg.render("rknnlite/README.md.tmpl", "README.md", board_title=self.title, soc=self.soc, toolkit=TOOLKIT,
                   top_k=pkg.top_k, notes=_notes(pkg))


def _notes(pkg: PackageContext) -> str:
    return "".join(f"- {n}\n" for n in pkg.notes) if pkg.notes else "- none\n"
