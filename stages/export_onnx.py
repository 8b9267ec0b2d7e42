"""``export_onnx``: a ``model.pt`` bundle -> ``model.onnx``, checked and verified against PyTorch.

Input ``model``: a folder with ``model.pt``, ``preprocess.json``, ``labels.txt`` (train, clip_outliers).
Output: ``model.onnx`` (weights inside, no external ``.data`` file), ``io.json``, ``parity.json``,
``preprocess.json``, ``labels.txt``.

Config section ``export`` (conf/export/onnx.yaml, conf/export/onnx_dynamic.yaml).
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from engine.contract.stage import Context, Input, Params, Stage, StageError


class ExportOnnx(Stage):
    """Export a trained model to ONNX with fixed I/O names; verify it with onnx.checker and ONNX
    Runtime against PyTorch on sample inputs."""

    name = "export_onnx"
    # MB, for run --jobs: torch + onnx + onnxruntime for the parity check (~1.1 GB measured at 32 px)
    peak_memory_mb = 1200
    tools = ("torch", "onnx", "onnxruntime")  # their versions are in the cache key
    config_section = "export"
    version = 1
    inputs = {"model": Input(required=True, doc="model bundle folder: model.pt, preprocess.json, labels.txt")}

    class Params(Params):
        # ONNX opset. 13 is what rknn-toolkit2 and most board converters take best.
        opset: int = Field(13, ge=9, le=20)
        input_name: str = "input0"
        output_name: str = "output0"
        # False: batch fixed at 1 (what board converters want). True: the batch dimension is named
        # "batch" and any batch size runs (servers, onnxruntime boards).
        dynamic_batch: bool = False
        # run onnxslim over the exported graph (constant folding, op fusion); names are kept
        simplify: bool = False
        # max abs logit difference allowed between ONNX Runtime and PyTorch
        tolerance: float = Field(1e-3, gt=0)
        # sample inputs for the parity check: half random, half synthetic image-like pictures
        parity_samples: int = Field(8, ge=1, le=1024)
        seed: int = 0

        @field_validator("input_name", "output_name")
        @classmethod
        def _name(cls, v: str) -> str:
            if not v or any(c.isspace() for c in v):
                raise ValueError("a tensor name must be non-empty and hold no spaces")
            return v

    def run(self, params: ExportOnnx.Params, inputs: Mapping[str, Path], out: Path, ctx: Context) -> dict[str, Any]:
        from backends.base import load as load_backend
        from stages.common import parity
        from stages.common.bundle import copy_forward
        from stages.common.export import check_channels, load_bundle_folder, write_io

        if params.input_name == params.output_name:
            raise StageError("export.input_name and export.output_name must differ")
        src = inputs["model"]
        module, spec, bundle_info = load_bundle_folder(src)
        shape = spec.input_shape  # [1, 3, H, W]
        check_channels(bundle_info, shape, "export")

        ctx.progress(0, 3, "exporting ONNX")
        path = out / "model.onnx"
        t0 = time.perf_counter()
        export_onnx(module, path, shape, params, ctx)
        export_s = time.perf_counter() - t0

        if params.simplify:
            ctx.progress(1, 3, "simplifying (onnxslim)")
            simplify_onnx(path, ctx)
        ops = check_onnx(path, params.input_name, params.output_name)

        ctx.progress(2, 3, "parity check vs PyTorch")
        batch = params.parity_samples if params.dynamic_batch else None  # a dynamic model runs the whole batch
        result = parity.check_backends(
            load_backend("torch", src, batch=None),
            load_backend("onnx", out, {"input": params.input_name}, batch=batch),
            spec, params, out, what="ONNX Runtime vs PyTorch", extra={"batch": batch or 1}, channels=shape[1],
            hint="Raise export.tolerance only if you accept that difference")

        write_io(out, params.input_name, params.output_name, shape)
        copy_forward(src, out)
        ctx.progress(3, 3, "done")
        return {
            "opset": params.opset,
            "export_seconds": round(export_s, 3),
            "onnx_bytes": path.stat().st_size,
            "onnx_ops": len(ops),
            **parity.metrics(result),
        }


# -- helpers ---------------------------------------------------------------------------------------------
def export_onnx(module, path: Path, shape: list[int], params: ExportOnnx.Params, ctx: Context) -> None:
    import torch

    dummy = torch.zeros(*shape, dtype=torch.float32)
    dynamic_axes = {params.input_name: {0: "batch"}, params.output_name: {0: "batch"}} if params.dynamic_batch else None
    from stages.common.native_output import quiet

    # the exporter prints from native code on failure ("Torch IR graph at exception: ..."): keep the
    # terminal clean; the StageError below carries the reason
    with tempfile.TemporaryDirectory(prefix="edgepipe-onnx-") as tmp, quiet(Path(tmp) / "export.log"), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # dynamo=False on purpose: torch 2.14's default exporter (dynamo=True) needs onnxscript, which
            # pulls numpy 2 and breaks rknn-toolkit2; it also cannot emit opset 13 and writes the weights
            # to a separate .data file. The legacy TorchScript-based exporter gives opset 13 with our I/O
            # names kept and the weights inside the .onnx, in well under a second for our models.
            torch.onnx.export(
                module,
                (dummy,),
                str(path),
                dynamo=False,
                export_params=True,
                opset_version=params.opset,
                do_constant_folding=True,
                input_names=[params.input_name],
                output_names=[params.output_name],
                dynamic_axes=dynamic_axes,
            )
        except Exception as e:  # exporter failures are shown without its traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StageError(f"torch.onnx.export failed (opset {params.opset}): {first}") from e
    for w in caught:
        ctx.log.debug("torch.onnx.export: %s", w.message)
    # `out` was empty before the export: anything else in it now is an external-data file
    extra = sorted(p.name for p in path.parent.iterdir() if p.name != path.name)
    if extra:  # never expected for models < 2 GB; the contract wants one self-contained file
        raise StageError(f"the ONNX exporter wrote external data files {extra}; the model must fit in one .onnx")


def simplify_onnx(path: Path, ctx: Context) -> None:
    import onnx
    import onnxslim

    model = onnx.load(str(path))
    try:
        slim = onnxslim.slim(model)
    except Exception as e:
        raise StageError(f"onnxslim failed on {path.name}: {type(e).__name__}: {e}; set export.simplify=false") from e
    if slim is None:
        raise StageError(f"onnxslim returned no model for {path.name}; set export.simplify=false")
    onnx.save(slim, str(path), save_as_external_data=False)
    ctx.log.info("onnxslim: %d -> %d nodes", len(model.graph.node), len(slim.graph.node))


def check_onnx(path: Path, input_name: str, output_name: str) -> list[str]:
    """onnx.checker (full check, with shape inference) and the I/O names; returns the op types."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise StageError(f"onnx.checker rejects {path.name}: {str(e).strip().splitlines()[0]}") from e
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    ins = [i.name for i in model.graph.input if i.name not in inits]
    outs = [o.name for o in model.graph.output]
    if ins != [input_name] or outs != [output_name]:
        raise StageError(f"exported ONNX has inputs {ins} / outputs {outs}, expected [{input_name}] / [{output_name}]")
    return sorted({n.op_type for n in model.graph.node})
