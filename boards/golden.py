"""Golden samples for a package's self-test: does the board compute what was measured here?

The package stage takes ``SAMPLES`` images of the dataset's test split (its optional ``data`` input),
a seeded class-stratified sample (manifest ``rows``), and writes into ``package/golden/``:

- ``image_NN.png``: the image as the dataset holds it (uint8 RGB at the input size, lossless);
- ``input.npy``: the exact tensors the runtime takes after preprocessing (ONNX: float32 N x 3 x H x W,
  normalised; RKNN: uint8 N x H x W x 3 in the model's channel order, the NPU normalises);
- ``expected.npy``: float32 N x classes, what the packaged model file itself gave on them here
  (ONNX Runtime on this machine; RKNN: rknn-toolkit2's simulator, int8 outputs dequantized, from
  ``rknn_quantize``'s ``test_logits.npy`` for the same test split);
- MaixII-Dock: the same from the float ncnn model (ncnn on this machine). MaixHub converts it to an
  int8 awnn model that is not measured here, so MaixPy3's ``main.py --selftest`` compares top-1 only
  (``top1_min`` of the samples must agree) and has only the image path (maix.nn takes images);
- RV1103/RV1106 (C demo): ``input_NN.rgb`` (raw bytes of input.npy's rows) and ``golden.txt``, the
  same numbers as text for ``./rknn_classify --selftest``.

The manifest's ``selftest`` section records them with their sha256, the tolerance
(``atol + rtol * (max - min of expected)``) and the expected top-1. The deploy scripts' ``--selftest``
(``boards/templates/selftest.py``; ``main.c``) run the tensor path (input.npy -> runtime) and the
image path (image -> preprocess.py -> runtime) and tell runtime numerics from preprocessing.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np

from backends.base import BackendError, shipped
from boards.errors import GoldenError as GoldenError  # re-exported: raised here
from engine.contract.hashing import sha256_file

from . import PackageContext

GOLDEN_DIR = "golden"
SAMPLES = 8
# The tolerance (atol, rtol of the expected logits' range), the rule, the input layout and where the
# expected outputs were measured are the backend's facts (Backend.golden_*, backends/).


def write_golden(pkg: PackageContext, data_dir: Path | None, c_demo: bool = False) -> dict[str, Any] | None:
    """Write ``golden/`` for the package's format; returns the manifest's ``selftest`` section, or
    None (with a note) when the inputs hold nothing to make golden samples from."""
    fmt = pkg.board.model_format
    backend = shipped(pkg.model_dir, fmt)  # an int8 ONNX model on an ONNX board: int8's tolerance
    if backend.golden_tolerance is None:
        pkg.notes.append(f"no golden samples for the self-test: not implemented for {fmt} models yet")
        return None
    if data_dir is None:
        pkg.notes.append("no golden samples for the self-test: wire package's `data` input to the dataset stage")
        return None
    samples = _golden_samples(pkg, data_dir)
    if samples is None:
        return None
    images, labels, rows, inputs, expected, measured, source = samples
    n = len(expected)
    out = pkg.pkg / GOLDEN_DIR
    out.mkdir()
    names = _write_images(pkg.pkg, images)
    np.save(out / "input.npy", inputs)
    np.save(out / "expected.npy", expected.astype(np.float32))
    atol, rtol = backend.golden_tolerance
    tolerance = float(atol + rtol * (float(expected.max()) - float(expected.min())))
    top1 = [int(i) for i in expected.argmax(1)]
    if c_demo:
        _write_c_golden(out, inputs, expected, top1, tolerance)
    files = sorted(str(f.relative_to(pkg.pkg)) for f in out.iterdir())
    return {
        "samples": n,
        "source": source,
        "images": names,
        "input": f"{GOLDEN_DIR}/input.npy",
        "input_layout": backend.golden_input_layout,
        "expected": f"{GOLDEN_DIR}/expected.npy",
        "expected_top1": top1,
        "labels": [int(v) for v in labels],
        "rows": [int(r) for r in rows],  # their rows in the dataset's test split
        "measured_with": measured,
        "atol": atol, "rtol": rtol, "tolerance": round(tolerance, 9),
        "rule": backend.golden_rule,
        "top1_min": n - backend.golden_top1_slack if n > backend.golden_top1_slack else n,
        "sha256": {f: sha256_file(pkg.pkg / f) for f in files},
    }


def _golden_samples(pkg: PackageContext, data_dir: Path):
    """(images, labels, runtime inputs, expected outputs, where they were measured, which images) of a
    seeded class-stratified sample of the test split (stages.common.sampling.limited: the split is
    stored in class order, so its first images would be one or two classes; where RKNN simulated fewer
    under quantize.data_limit, the sample is drawn from the rows it simulated), the expected outputs
    from the packaged model through the backend registry; None (with a note) when there is nothing to
    take them from."""
    from stages.common.preprocess import normalize, to_channel_order
    from stages.common.sampling import limited
    from stages.common.splits import load_split

    all_images, labels = load_split(data_dir, "test", size=(pkg.spec.height, pkg.spec.width))
    n = min(SAMPLES, len(all_images))
    if n == 0:
        pkg.notes.append("no golden samples for the self-test: the dataset's test split is empty")
        return None
    backend = shipped(pkg.model_dir, pkg.board.model_format)
    if backend.precomputed:  # RKNN: the simulator's outputs, stored by rknn_quantize for this test split
        if not (pkg.model_dir / backend.logits_file).is_file():
            pkg.notes.append(f"no golden samples for the self-test: the {backend.producer} stage ran without its "
                             f"`data` input (no {backend.logits_file})")
            return None
        stored = _stored_logits(backend, pkg, data_dir)
        simulated = limited(labels, len(stored))  # the rows of stored's logits, ascending
        picked = limited(labels[simulated], n)  # positions among them
        rows = simulated[picked]
        images = np.ascontiguousarray(all_images[rows])
        source = (f"a seeded class-stratified sample of {n} of the dataset's {len(labels)} test images"
                  if len(stored) >= len(labels) else
                  f"a seeded class-stratified sample of {n} of quantize.data_limit's seeded class-stratified sample "
                  f"of {len(stored)} test images")
        return (images, labels[rows], rows, to_channel_order(images, pkg.spec), stored[picked], _measured(backend),
                source)
    rows = limited(labels, n)
    images = np.ascontiguousarray(all_images[rows])
    inputs = normalize(images, pkg.spec)
    runner = backend(pkg.model_dir, pkg.io, batch=None)
    try:
        expected = np.asarray(runner.logits(inputs), np.float32).reshape(n, -1)
    finally:
        runner.close()
    return (images, labels[rows], rows, inputs, expected, _measured(backend),
            f"a seeded class-stratified sample of {n} of the dataset's {len(labels)} test images")


def _measured(backend) -> str:
    from importlib import metadata

    return backend.golden_measured_with.format(version=metadata.version("onnxruntime"), machine=platform.machine())


def _stored_logits(backend, pkg: PackageContext, data_dir: Path) -> np.ndarray:
    runner = backend(pkg.model_dir, pkg.io)
    try:
        runner.check_data(data_dir, "test", pkg.labels)
    except BackendError as e:
        raise GoldenError(f"{pkg.model_dir}: {e}; wire package's `data` to the dataset the {backend.producer} "
                          f"stage simulated") from None
    return np.asarray(runner.stored_logits(), np.float32)


def _write_images(pkg_dir: Path, images: np.ndarray) -> list[str]:
    """image_NN.png (lossless) of each golden image; their names relative to the package."""
    from PIL import Image

    names = [f"{GOLDEN_DIR}/image_{i:02d}.png" for i in range(len(images))]
    for name, img in zip(names, images):
        Image.fromarray(img, "RGB").save(pkg_dir / name)
    return names


def _write_c_golden(out: Path, inputs: np.ndarray, expected: np.ndarray, top1: list[int], tolerance: float) -> None:
    """input_NN.rgb and golden.txt for the C demo (no npy or JSON parser there)."""
    n, h, w, _ = inputs.shape
    lines = ["edgepipe-golden 1",
             f"samples {n} classes {expected.shape[1]} height {h} width {w} tolerance {tolerance!r}"]
    for i in range(n):
        name = f"input_{i:02d}.rgb"
        (out / name).write_bytes(np.ascontiguousarray(inputs[i], np.uint8).tobytes())
        lines.append(" ".join([name, str(top1[i]), *(repr(float(v)) for v in expected[i])]))
    (out / "golden.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
