"""``ncnn``: ``model.onnx`` -> ncnn ``model.ncnn.param`` / ``model.ncnn.bin`` with pnnx, verified with
the ncnn runtime against ONNX Runtime.

Input ``onnx``: an ``export_onnx`` output (``model.onnx``, ``io.json``, ``preprocess.json``, ``labels.txt``).
Output: ``model.ncnn.param``, ``model.ncnn.bin``, ``io.json``, ``parity.json``, ``pnnx.log``,
``preprocess.json``, ``labels.txt``.

Config section ``ncnn`` (conf/ncnn/default.yaml).

- pnnx (PyPI) runs as a subprocess on a copy of the ONNX file in a scratch folder: it writes its
  outputs next to its input (plus ``*.pnnx.*``, ``*_pnnx.py``, ``*_ncnn.py``, ``*.pnnxsim.onnx``); only
  the ncnn pair is kept. Everything it prints goes to ``pnnx.log``.
- ``fp16=false`` (default) keeps fp32 weights in the ``.bin``; pnnx's own default stores fp16, which
  moves logits by about 1e-3.
- pnnx names the blobs ``in0``/``out0`` whatever the ONNX names were. ``io.json`` records the names
  the ``.param`` really carries; deploy scripts must use those.
- The ``Input`` layer gets ``0=W 1=H 2=C`` (MaixHub/awnn converters need the shape; pnnx writes none).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from engine.contract.stage import NOT_IN_KEY, Context, Input, Params, Stage, StageError

PARAM_MAGIC = "7767517"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class NcnnConvert(Stage):
    """Convert an ONNX model to ncnn with pnnx; patch the Input shape; verify against ONNX Runtime."""

    name = "ncnn"
    peak_memory_mb = 600  # MB, for run --jobs: torch, ncnn and the pnnx child (~0.4 GB measured at 32 px)
    tools = ("pnnx", "ncnn", "torch")  # their versions are in the cache key
    version = 1
    inputs = {"onnx": Input(required=True, doc="export_onnx output: model.onnx, io.json, preprocess.json, labels.txt")}

    class Params(Params):
        # fp16 weights in model.ncnn.bin (half the size, logits move by ~1e-3); false keeps fp32
        fp16: bool = False
        # pnnx graph optimisation level (0, 1, 2: pnnx's default)
        optlevel: int = Field(2, ge=0, le=2)
        # write 0=W 1=H 2=C on the Input layer (MaixHub/awnn need it; ncnn itself ignores it)
        input_shape_in_param: bool = True
        # max abs logit difference allowed between ncnn and ONNX Runtime
        tolerance: float = Field(1e-3, gt=0)
        # sample inputs for the parity check: half random, half synthetic image-like pictures
        parity_samples: int = Field(8, ge=1, le=1024)
        seed: int = 0
        # give up on pnnx after this many seconds
        timeout_s: Annotated[int, NOT_IN_KEY] = Field(600, ge=1)

    def run(self, params: NcnnConvert.Params, inputs: Mapping[str, Path], out: Path, ctx: Context) -> dict[str, Any]:
        from stages.common import parity
        from stages.common.bundle import FORWARD, IO, check_bundle, copy_forward, read_io
        from stages.common.preprocess import Preprocess

        src = inputs["onnx"]
        check_bundle(src, ("model.onnx", IO, *FORWARD), input="onnx", hint="expected an export_onnx output")
        io_in = read_io(src)
        shape = [int(s) for s in io_in["input_shape"]]
        if len(shape) != 4:
            raise StageError(f"{src / 'io.json'}: input_shape {shape} is not [1, C, H, W]")
        shape[0] = 1
        c = shape[1]
        spec = Preprocess.load(src)

        ctx.progress(0, 3, "pnnx: converting")
        t0 = time.perf_counter()
        param_text, ins, outs = _convert(src / "model.onnx", shape, params, out)
        convert_s = time.perf_counter() - t0

        ctx.progress(1, 3, "parity check: ncnn vs ONNX Runtime")
        io = {"input": ins[0], "output": outs[0], "input_shape": shape}
        result = _parity(src, io_in, out, io, spec, params, c)

        ctx.progress(2, 3, "writing")
        (out / IO).write_text(json.dumps(io, indent=2) + "\n", encoding="utf-8")
        copy_forward(src, out)
        ctx.progress(3, 3, "done")
        return {
            "convert_seconds": round(convert_s, 3),
            "param_layers": len(param_layers(param_text)),
            "bin_bytes": (out / "model.ncnn.bin").stat().st_size,
            "fp16": params.fp16,
            **parity.metrics(result),
        }


def _convert(onnx: Path, shape: list[int], params: NcnnConvert.Params, out: Path) -> tuple[str, list[str], list[str]]:
    """pnnx in a scratch folder -> out/model.ncnn.param (Input shape patched) and .bin; (param text, input
    blobs, output blobs). Everything pnnx prints goes to out/pnnx.log."""
    log = out / "pnnx.log"
    _, c, h, w = shape
    param_text, bin_path, scratch = run_pnnx(onnx, shape, params, log)
    try:
        check_layers(param_text, log)
        ins, outs = param_io(param_text)
        if len(ins) != 1 or len(outs) != 1:
            raise StageError(f"the ncnn model has inputs {ins} and outputs {outs}; a classifier needs one of each "
                             f"(see {log})")
        if params.input_shape_in_param:
            param_text = patch_input_shape(param_text, w, h, c)
        (out / "model.ncnn.param").write_text(param_text, encoding="utf-8")
        shutil.copyfile(bin_path, out / "model.ncnn.bin")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return param_text, ins, outs


def _parity(src: Path, io_in: dict, out: Path, io: dict, spec, params: NcnnConvert.Params, channels: int) -> dict:
    """ncnn (the files just written) against ONNX Runtime (the input), through the backend registry."""
    from backends.base import load as load_backend
    from stages.common import parity

    reference = load_backend("onnx", src, io_in, batch=None)
    candidate = load_backend("ncnn", out, io)
    try:
        return parity.check_backends(
            reference, candidate, spec, params, out, what="ncnn vs ONNX Runtime", extra={"fp16_weights": params.fp16},
            channels=channels,
            hint=("fp16 weights move logits by ~1e-3: raise ncnn.tolerance or set ncnn.fp16=false" if params.fp16
                  else "Raise ncnn.tolerance only if you accept that difference"))
    finally:
        candidate.close()


# -- pnnx ----------------------------------------------------------------------------------------------
def pnnx_executable() -> Path:
    """The pnnx binary shipped in the ``pnnx`` wheel (found without importing the package, which
    imports torch)."""
    import importlib.util

    spec = importlib.util.find_spec("pnnx")
    if spec is None or not spec.submodule_search_locations:
        raise StageError("the pnnx package is not installed (pip install pnnx -c constraints.txt)")
    for folder in spec.submodule_search_locations:
        for name in ("pnnx", "pnnx.exe"):
            exe = Path(folder) / name
            if exe.is_file():
                return exe
    raise StageError("the pnnx package has no pnnx executable; reinstall it (pip install --force-reinstall pnnx)")


def _reason(text: str) -> str:
    """The most telling line of pnnx's output (its errors are free text)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        low = ln.lower()
        if any(k in low for k in ("error", "failed", "unsupported", "not supported", "exception", "abort",
                                  "terminate")):
            return ln[:200]
    return lines[-1][:200] if lines else "no output"


def run_pnnx(onnx_path: Path, shape: list[int], params: NcnnConvert.Params, log: Path) -> tuple[str, Path, Path]:
    """Run pnnx on a copy of ``onnx_path`` in a scratch folder; returns (param text, bin path, scratch
    folder -- the caller removes it). pnnx's output is written to ``log``. The scratch folder is made
    next to ``log`` (in the stage's temp folder), so a run killed mid-conversion leaves it where
    `edgepipe gc` and the next run of the same key clean up, not in the system temp folder."""
    exe = pnnx_executable()
    scratch = Path(tempfile.mkdtemp(prefix=".pnnx-", dir=log.parent))
    try:
        model = scratch / "model.onnx"
        shutil.copyfile(onnx_path, model)
        cmd = [
            str(exe), model.name,
            "inputshape=[" + ",".join(str(int(s)) for s in shape) + "]f32",
            f"fp16={1 if params.fp16 else 0}",
            f"optlevel={params.optlevel}",
            "device=cpu",
        ]
        try:
            proc = subprocess.run(cmd, cwd=scratch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=params.timeout_s, check=False)
            text = proc.stdout.decode("utf-8", "replace")
            rc = proc.returncode
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode("utf-8", "replace")
            log.write_text("$ " + " ".join(cmd) + "\n" + _ANSI.sub("", text), encoding="utf-8")
            raise StageError(f"pnnx did not finish in {params.timeout_s} s (ncnn.timeout_s); log: {log}") from None
        log.write_text("$ " + " ".join(cmd) + "\n" + _ANSI.sub("", text) + f"\n[exit code {rc}]\n", encoding="utf-8")
        param, binf = scratch / "model.ncnn.param", scratch / "model.ncnn.bin"
        if rc != 0 or not param.is_file() or not binf.is_file():
            what = f"exit code {rc}" if rc >= 0 else f"killed by signal {-rc}"
            raise StageError(f"pnnx failed to convert model.onnx to ncnn ({what}): {_reason(_ANSI.sub('', text))}; "
                             f"log: {log}")
        return param.read_text(encoding="utf-8"), binf, scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def check_layers(param_text: str, log: Path) -> None:
    """StageError naming every operator pnnx left in the param that the ncnn runtime does not have
    (pnnx writes an operator it cannot map under its ONNX/pnnx name, e.g. ``Det`` or ``pnnx.Expression``)."""
    import ncnn

    bad: dict[str, list[str]] = {}
    for typ, name, _, _ in param_layers(param_text):
        if ncnn.layer_to_index(typ) < 0:
            bad.setdefault(typ, []).append(name)
    if bad:
        ops = ", ".join(f"{t} (layer {', '.join(n[:3])}{'...' if len(n) > 3 else ''})" for t, n in bad.items())
        raise StageError(
            f"ncnn has no operator for {ops}: pnnx could not map it to an ncnn layer. Change the model "
            f"to avoid it (see {log})"
        )


# -- the .param file (pure functions) ------------------------------------------------------------------
def _split_layer(line: str) -> tuple[list[str], list[str], list[str]] | None:
    """(head tokens: type name nbottom ntop, bottoms + tops, key=value params) of a layer line."""
    tokens = line.split()
    if len(tokens) < 4 or not (tokens[2].isdigit() and tokens[3].isdigit()):
        return None
    nb, nt = int(tokens[2]), int(tokens[3])
    end = 4 + nb + nt
    if len(tokens) < end:
        return None
    return tokens[:4], tokens[4:end], tokens[end:]


def patch_input_shape(param_text: str, w: int, h: int, c: int) -> str:
    """Set ``0=W 1=H 2=C`` on every ``Input`` layer line of an ncnn ``.param`` text.

    pnnx writes ``Input in0 0 1 in0`` with no shape; the MaixHub/awnn toolchain needs it. Keys 0/1/2
    already present are replaced (so patching twice changes nothing), other keys are kept after
    them, and the rest of the file -- including pnnx's column alignment -- is left byte for byte.
    """
    out = []
    for i, line in enumerate(param_text.splitlines(keepends=True)):
        body = line.rstrip("\r\n")
        ending = line[len(body):]
        parts = _split_layer(body) if i >= 2 else None
        if parts is None or parts[0][0] != "Input":
            out.append(line)
            continue
        head, blobs, kv = parts
        # keep the original text up to the last blob name (pnnx pads columns with spaces)
        m = re.match(r"\s*" + r"\S+\s+" * (len(head) + len(blobs) - 1) + r"\S+", body)
        prefix = m.group(0)
        shape = {"0": str(int(w)), "1": str(int(h)), "2": str(int(c))}
        others = [t for t in kv if t.split("=", 1)[0] not in shape]
        params = [f"{k}={v}" for k, v in shape.items()] + others
        out.append(prefix + " " + " ".join(params) + ending)
    return "".join(out)


def param_layers(param_text: str) -> list[tuple[str, str, list[str], list[str]]]:
    """(type, name, bottoms, tops) of every layer of a ``.param`` text."""
    lines = param_text.splitlines()
    if not lines or lines[0].strip() != PARAM_MAGIC:
        raise ValueError(f"not an ncnn text param file (first line is not {PARAM_MAGIC})")
    layers = []
    for line in lines[2:]:
        parts = _split_layer(line)
        if parts is None:
            continue
        (typ, name, nb, _nt), blobs, _ = parts
        layers.append((typ, name, blobs[: int(nb)], blobs[int(nb):]))
    return layers


def param_io(param_text: str) -> tuple[list[str], list[str]]:
    """(input blob names, output blob names): the tops of ``Input`` layers, and the blobs some layer
    produces that no layer consumes."""
    layers = param_layers(param_text)
    inputs = [t for typ, _, _, tops in layers if typ == "Input" for t in tops]
    consumed = {b for _, _, bottoms, _ in layers for b in bottoms}
    outputs = [t for typ, _, _, tops in layers if typ != "Input" for t in tops if t not in consumed]
    return inputs, outputs
