"""Sipeed MaixII-Dock (Allwinner V831, MaixPy3): an ncnn model that MaixHub's online converter turns
into an int8 awnn model, run by ``maix.nn`` (model_type "awnn").

What the profile enforces:
- normalisation: awnn takes one mean and one norm for all channels, ``(x - mean) * norm`` on 0..255
  pixels (``mean*255``, ``1/(std*255)``); per-channel values that differ are an error;
- no reshape-type layer in the ncnn param (awnn has no Flatten/Reshape/Permute). What matters is the
  param pnnx writes, not the ONNX: measured here with pnnx (fp16=0) on the model zoo,
  ``global pool -> flatten -> Linear`` becomes ``Pooling -> InnerProduct`` with no reshape at all,
  while a global pool whose 1-D result feeds anything else (a 1x1 conv followed by a mean, GeM's
  second Pow, a 4-D graph output) makes pnnx insert a ``Reshape`` layer; flattening a feature map
  bigger than 1x1 gives a real ``Flatten``. ``preflight`` predicts this from the ONNX; ``package``
  checks the real param.
- the param's Input layer carries the input shape (``0=W 1=H 2=3``), as MaixHub's converter needs.

Package: the MaixHub upload zip (``images/`` with the calibration images and nothing else, the
.param and .bin), ``classes_label.py``, ``main.py`` for MaixPy3 and a README.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from . import BoardProfile, Finding, ModelFormat, PackageContext, write_zip
from .emulation import Emulation
from .graph import RESHAPE_OPS

if TYPE_CHECKING:  # pragma: no cover
    from stages.common.preprocess import Preprocess

    from .graph import GraphInfo, Node

# ncnn layers awnn cannot take
NCNN_RESHAPE_LAYERS = ("Reshape", "Flatten", "Permute", "Squeeze", "ExpandDims")
# ONNX ops of a ResNet-18 classifier (what Sipeed's V831 examples run, resnet18_1000_awnn.param);
# anything else converts, but its awnn support has not been verified here
RESNET_OPS = frozenset({"Conv", "BatchNormalization", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "Add",
                        "Concat", "Gemm", "Flatten", "Identity", "Dropout", "Clip", "Constant"})
# ops pnnx keeps on the 1-D blob that an ncnn global Pooling produces (no Reshape needed)
_KEEPS_1D = frozenset({"Flatten", "Reshape", "Squeeze", "Gemm", "MatMul", "Relu", "Clip", "HardSigmoid", "HardSwish",
                       "Sigmoid", "Identity", "Dropout", "Conv"})
_FIX = ("pool globally right before the classifier: model.head=linear (pnnx turns global pool -> flatten -> "
        "Linear into Pooling -> InnerProduct, no reshape layer)")
UPLOAD_ZIP = "maixhub_upload.zip"
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp")


class MaixIIDock(BoardProfile):
    name: str = "maixii_dock"
    title: str = "MaixII-Dock (V831)"
    soc: str = "Allwinner V831 (Cortex-A7 800 MHz, 0.2 TOPS NPU, 64 MB DDR2 in package)"
    runtime: str = "MaixPy3 maix.nn (awnn int8, converted online by MaixHub)"
    model_format: ModelFormat = "ncnn"
    input_layout: str = "HWC uint8 RGB camera frame; maix.nn normalises with one mean/norm and quantizes"
    normalisation: str = "uniform"
    ram_mb: float | None = 64
    ram_usable_fraction: float = 0.5
    flash_mb: float | None = None  # models live on the TF card
    weight_bytes: float = 1.0  # awnn int8
    activation_bytes: float = 1.0
    quantizer: str | None = "awnn (MaixHub online converter: ncnn .param/.bin + images/ -> int8 awnn model)"
    quantizer_options: Mapping[str, Any] = Field(default_factory=lambda: {"model_type": "awnn"})
    package_files: tuple[str, ...] = (UPLOAD_ZIP, "model.param", "model.bin", "classes_label.py", "main.py",
                                      "README.md", "manifest.json")
    deploy_script: str = "main.py (MaixPy3: maix.nn.load with model_type awnn, camera loop)"
    # Cortex-A7, 32-bit: armhf. main.py runs on MaixPy3's maix.nn, which exists only on the board
    emulation: ClassVar[Emulation | None] = Emulation(
        "armhf", debs=("python3", "python3-numpy", "python3-pil"),
        cannot="main.py runs on MaixPy3's maix.nn (the awnn int8 model MaixHub converts), which exists only "
               "on the board: copy the package and run python3 main.py --selftest there")
    sources: Mapping[str, str] = Field(default_factory=lambda: {
        "normalisation": "MaixPy3 maix.nn.load docs (sipeed_wiki maix/nn.md): (x - mean) * norm, one value per "
                         "channel list, e.g. mean 127.5 / norm 0.0078125",
        "no_reshape": "issue #5 (awnn has no view/flatten/reshape); which ONNX graphs give reshape layers under "
                      "pnnx was measured here on the model zoo",
        "blob_names": "maix.nn.load opt inputs/outputs are keyed by the param's blob names (pnnx: in0/out0)",
        "ram_mb": "V831 integrates 64 MB DDR2",
    })

    def normalisation_for(self, spec: Preprocess) -> dict[str, Any]:
        out = super().normalisation_for(spec)
        try:
            mean, norm = spec.awnn_mean_norm()
            out.update(awnn_mean=mean, awnn_norm=norm, where="main.py options mean/norm: (x - mean) * norm")
        except ValueError as e:
            out["awnn_error"] = str(e)
        return out

    # -- preflight --------------------------------------------------------------------------------
    def extra_checks(self, g: GraphInfo, spec: Preprocess | None) -> list[Finding]:
        pooled, out = self._pooled_chains(g)
        out = self._relayouts(g, pooled) + out
        other = sorted(set(n.op for n in g.nodes) - RESNET_OPS)
        if other:
            out.append(Finding(level="warning", check="op",
                               message=f"ops outside a ResNet-18's (the V831 examples' model) are not verified with "
                                       f"awnn here: {', '.join(other)}; check MaixHub's conversion report"))
        return out

    def _relayouts(self, g: GraphInfo, pooled: Mapping[str, Any]) -> list[Finding]:
        """Reshape-type ops become real ncnn Flatten/Reshape/Permute layers unless they act on the
        1-D blob of a global pooling (pnnx folds those away) or on an already flat tensor."""
        out = []
        for node in g.nodes:
            if node.op not in RESHAPE_OPS or not node.inputs or node.inputs[0] in pooled:
                continue
            shape = g.shape(node.inputs[0])
            if shape is None or len(shape) > 2:
                out.append(Finding(level="error", check="reshape", node=node.name,
                                   message=f"{node.label()} re-lays out a {shape or 'tensor of unknown shape'} tensor "
                                           f"that does not come straight from a global pooling: it becomes an ncnn "
                                           f"{_ncnn_name(node.op)} layer, which awnn cannot run; {_FIX}"))
        return out

    def _pooled_chains(self, g: GraphInfo) -> tuple[dict, list[Finding]]:
        """Follow global poolings the way pnnx converts them: an ncnn global Pooling gives a 1-D blob.
        Flatten, Linear, 1x1 convs, activations and element-wise ops among pooled tensors keep it 1-D;
        an element-wise op with a feature map (squeeze-excitation) ends the chain; any other consumer
        (a mean, a Pow, a wider conv) or a 4-D graph output makes pnnx insert a Reshape."""
        out: list[Finding] = []
        const = set(g.constants)
        pooled: dict[str, Node] = {}  # tensor -> the global pooling it derives from
        for node in g.nodes:
            ins = [i for i in node.inputs if i]
            if ins and all(i in const for i in ins):
                const.update(node.outputs)
                continue
            if node.op in ("GlobalAveragePool", "GlobalMaxPool"):
                pooled.update({t: node for t in node.outputs})
                continue
            live = [i for i in ins if i not in const]
            from_pool = [i for i in live if i in pooled]
            if not from_pool:
                continue
            pool = pooled[from_pool[0]]
            elementwise = node.op in ("Mul", "Add", "Sub", "Div")
            if len(from_pool) == len(live):
                kernel = node.attrs.get("kernel_shape") or []
                if elementwise or (node.op in _KEEPS_1D and (node.op != "Conv" or all(int(k) == 1 for k in kernel))):
                    pooled.update({t: pool for t in node.outputs})
                    continue
            elif elementwise:
                continue  # scales a feature map: the result is a map again
            out.append(Finding(level="error", check="reshape", node=node.name,
                               message=f"{node.label()} consumes the globally pooled tensor of {pool.label()}: pnnx "
                                       f"inserts an ncnn Reshape before it (measured: the 1x1-conv + mean head, GeM "
                                       f"pooling), and awnn cannot run it; {_FIX}"))
        shape = g.output_shape
        if g.output_name in pooled and shape is not None and len(shape) > 2:
            pool = pooled[g.output_name]
            out.append(Finding(level="error", check="reshape", node=pool.name,
                               message=f"the graph output '{g.output_name}' is {shape} after {pool.label()}: pnnx adds "
                                       f"an ncnn Reshape to give the 1-D pooled blob that shape, and awnn cannot run "
                                       f"it; {_FIX}"))
        return pooled, out

    # -- package ----------------------------------------------------------------------------------
    def check_package(self, model_dir: Path, model_file: Path) -> list[Finding]:
        out = super().check_package(model_dir, model_file)
        param = parse_param(model_file)
        bad = [(t, n) for t, n in param["layers"] if t in NCNN_RESHAPE_LAYERS]
        if bad:
            listed = ", ".join(f"{t} '{n}'" for t, n in bad[:5])
            out.append(Finding(level="error", check="reshape",
                               message=f"{model_file.name} holds {listed}: awnn (MaixHub's converter) cannot run "
                                       f"reshape-type layers; {_FIX}"))
        return out

    def write_package(self, pkg: PackageContext) -> None:
        param_file = pkg.model_file
        bin_file = param_file.with_name(param_file.name[: -len(".param")] + ".bin")
        if not bin_file.is_file():
            raise FileNotFoundError(f"{bin_file} is missing next to {param_file}")
        info = parse_param(param_file)
        h, w = pkg.spec.height, pkg.spec.width
        inp, outp = pkg.io.get("input"), pkg.io.get("output")
        blobs = info["blobs"]
        for key, name in (("input", inp), ("output", outp)):
            if name not in blobs:
                raise ValueError(f"io.json {key} blob '{name}' is not in {param_file.name} (its blobs: "
                                 f"{', '.join(sorted(blobs)[:8])}...); the ncnn stage must record the param's names")
        shape = info["input_shape"].get(inp)
        if shape != (w, h, 3):
            raise ValueError(f"{param_file.name}: the Input layer of '{inp}' carries {shape or 'no shape'} "
                             f"(0=W 1=H 2=C), expected ({w}, {h}, 3); MaixHub's converter needs the patched param "
                             f"that the ncnn stage writes")
        if pkg.calib_dir is None:
            raise ValueError("wire a `calib` input (a calibration stage) to the package stage: MaixHub quantizes "
                             "with the images/ folder of the upload zip")
        images = sorted(p for p in (pkg.calib_dir / "images").iterdir() if p.suffix.lower() in IMAGE_EXT) \
            if (pkg.calib_dir / "images").is_dir() else []
        if not images:
            raise ValueError(f"{pkg.calib_dir / 'images'} holds no images for MaixHub's quantization")

        pkg.copy(param_file, "model.param")
        pkg.copy(bin_file, "model.bin")
        write_zip(pkg.pkg / UPLOAD_ZIP, [(f"images/{p.name}", p) for p in images]
                   + [("model.param", param_file), ("model.bin", bin_file)])
        (pkg.pkg / "classes_label.py").write_text(
            "# class names in output order (from labels.txt)\nlabels = [\n"
            + "".join(f"    {label!r},\n" for label in pkg.labels) + "]\n", encoding="utf-8")
        mean, norm = pkg.spec.awnn_mean_norm()
        pkg.render("maixii/main.py.tmpl", "main.py", input_name=inp, output_name=outp, height=h, width=w,
                   n_classes=len(pkg.labels), mean=repr(mean), norm=repr(norm), top_k=pkg.top_k)
        if pkg.spec.resize != "stretch":
            pkg.notes.append(f"training resized images with '{pkg.spec.resize}'; main.py feeds camera frames "
                             f"captured at {w}x{h}, so framing can differ slightly from training")
        pkg.extra_manifest["maixhub_upload"] = {"zip": UPLOAD_ZIP, "images": len(images),
                                                "files": ["images/", "model.param", "model.bin"]}
        # said plainly in the manifest, the README's notes and the run's report (its package section)
        note = (f"int8 is not built here: MaixHub's online converter makes the V831's int8 (awnn) model from "
                f"{UPLOAD_ZIP} (this float ncnn model and its {len(images)} calibration images); edgepipe neither "
                f"searches nor measures it (evaluate's ncnn row is the float model)")
        pkg.extra_manifest["quantization"] = {"shipped": "float", "kind": "ncnn", "int8_by": "MaixHub", "note": note}
        pkg.notes.append(note)
        pkg.render("maixii/README.md.tmpl", "README.md", board_title=self.title, height=h, width=w,
                   n_images=len(images), input_name=inp, output_name=outp, mean=repr(mean), norm=repr(norm),
                   notes="".join(f"- {n}\n" for n in pkg.notes) or "- none\n")


def _ncnn_name(op: str) -> str:
    return {"Transpose": "Permute", "Unsqueeze": "ExpandDims"}.get(op, op)


def parse_param(path: Path) -> dict[str, Any]:
    """Layers (type, name), every blob name, and the Input layers' 0=W 1=H 2=C of an ncnn .param."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].strip() != "7767517":
        raise ValueError(f"{path} is not an ncnn param file (magic 7767517 missing)")
    layers, blobs, input_shape = [], set(), {}
    for line in lines[2:]:
        parts = line.split()
        if len(parts) < 4:
            continue
        ltype, lname, n_in, n_out = parts[0], parts[1], int(parts[2]), int(parts[3])
        names = parts[4: 4 + n_in + n_out]
        blobs.update(names)
        layers.append((ltype, lname))
        if ltype == "Input":
            kv = dict(re.findall(r"(-?\d+)=(\S+)", " ".join(parts[4 + n_in + n_out:])))
            if all(k in kv for k in ("0", "1", "2")):
                input_shape[names[-1]] = (int(kv["0"]), int(kv["1"]), int(kv["2"]))
    return {"layers": layers, "blobs": blobs, "input_shape": input_shape}
