"""Tiny fixtures for the board, preflight and package tests, in the documented folder formats
(DEVELOPERS.md): an export_onnx folder written by hand from a torch module, a dataset folder of
generated images, and the real ncnn / calibration / rknn_quantize stages on top of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
LABELS = ["cat", "dog", "bird"]


def tiny_net(kind: str = "linear", classes: int = 3, seed: int = 0):
    """Small classifiers whose heads exercise the board checks.

    linear: conv -> relu -> global pool -> flatten -> Linear   (fits every board)
    gem:    GeM pooling, x.clamp(eps).pow(p) ... .pow(1/p)      (Pow: CPU fallback on rv1103)
    flat:   conv -> relu -> flatten of the 8x8 map -> Linear    (a real Flatten: awnn cannot)
    conv:   global pool -> 1x1 conv -> mean over H,W            (pnnx inserts a Reshape)
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.p = nn.Parameter(torch.full((1,), 3.0))
            if kind == "flat":
                self.fc = nn.Linear(16 * 8 * 8, classes)
            elif kind == "conv":
                self.fc = nn.Conv2d(16, classes, 1)
            else:
                self.fc = nn.Linear(16, classes)

        def forward(self, x):
            x = F.relu(self.conv2(F.relu(self.conv(x))))
            if kind == "flat":
                return self.fc(torch.flatten(x, 1))
            if kind == "gem":
                x = F.adaptive_avg_pool2d(x.clamp(min=1e-6).pow(self.p), 1).pow(1.0 / self.p)
                return self.fc(torch.flatten(x, 1))
            x = F.adaptive_avg_pool2d(x, 1)
            if kind == "conv":
                return self.fc(x).mean(dim=(2, 3))
            return self.fc(torch.flatten(x, 1))

    return Net().eval()


def export_onnx(out: Path, module=None, kind: str = "linear", size: int = 32, preprocess: dict | None = None,
                labels: list[str] | None = None) -> Path:
    """An export_onnx-style folder: model.onnx (legacy exporter, opset 13, input0/output0), io.json,
    preprocess.json, labels.txt."""
    import warnings

    import torch

    from stages.common.preprocess import Preprocess

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    module = module if module is not None else tiny_net(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, torch.zeros(1, 3, size, size), str(out / "model.onnx"), dynamo=False,
                          opset_version=13, input_names=["input0"], output_names=["output0"])
    (out / "io.json").write_text(json.dumps({"input": "input0", "output": "output0",
                                             "input_shape": [1, 3, size, size]}))
    Preprocess.model_validate({"input_size": size, "mean": "uniform", "std": "uniform", **(preprocess or {})}).save(out)
    (out / "labels.txt").write_text("".join(f"{label}\n" for label in (labels or LABELS)))
    return out


def make_dataset(out: Path, size: int = 32, per_class: int = 4, labels: list[str] | None = None, seed: int = 0) -> Path:
    """A dataset-stage-like folder of generated images (class k: brighter channel k)."""
    labels = labels or LABELS
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        imgs, labs = [], []
        for k in range(len(labels)):
            for _ in range(per_class):
                img = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
                img[..., k % 3] += np.uint8(100 + 30 * (k // 3))
                imgs.append(img)
                labs.append(k)
        np.save(out / f"images_{split}.npy", np.stack(imgs))
        np.save(out / f"labels_{split}.npy", np.asarray(labs, dtype=np.int64))
    (out / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
    return out


def write_images(out: Path, n: int = 5, size: int = 48, seed: int = 1) -> list[Path]:
    """JPEG/PNG test pictures of another size than the model input (the resize is exercised)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, (size, size + 8 * i, 3), dtype=np.uint8)
        p = out / (f"img{i}.jpg" if i % 2 else f"img{i}.png")
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def stage(name: str, params: dict, inputs: dict, out: Path):
    from engine.run.testing import run_stage

    return run_stage(name, params, inputs, out)


RKNNLITE_STUB = '''"""Stand-in for rknn-toolkit-lite2 in tests: runs the ONNX model ($STUB_ONNX) with the normalisation
rknn-toolkit2 bakes into a .rknn (mean_values/std_values on 0..255, model channel order), and logs
the calls to $STUB_LOG."""
import json
import os

import numpy as np


class RKNNLite:
    NPU_CORE_AUTO, NPU_CORE_0, NPU_CORE_1, NPU_CORE_2 = 0, 1, 2, 4

    def __init__(self, verbose=False, verbose_file=None):
        self.log = open(os.environ["STUB_LOG"], "a")

    def load_rknn(self, path):
        self.log.write(json.dumps({"load_rknn": os.path.basename(path)}) + "\\n")
        return 0 if os.path.isfile(path) else -1

    def init_runtime(self, **kwargs):
        import onnxruntime as ort

        self.log.write(json.dumps({"init_runtime": kwargs}) + "\\n")
        self.sess = ort.InferenceSession(os.environ["STUB_ONNX"], providers=["CPUExecutionProvider"])
        spec = json.load(open(os.environ["STUB_PREPROCESS"]))
        order = [0, 1, 2] if spec["channel_order"] == "RGB" else [2, 1, 0]
        self.mean = np.array([spec["mean"][i] * 255 for i in order], np.float32)
        self.std = np.array([spec["std"][i] * 255 for i in order], np.float32)
        return 0

    def inference(self, inputs, data_format=None):
        x = inputs[0]
        assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[0] == 1 and x.shape[-1] == 3, (x.dtype, x.shape)
        xf = ((x.astype(np.float32) - self.mean) / self.std).transpose(0, 3, 1, 2)
        name = self.sess.get_inputs()[0].name
        self.log.write(json.dumps({"inference": list(x.shape)}) + "\\n")
        return [self.sess.run(None, {name: np.ascontiguousarray(xf)})[0]]

    def release(self):
        self.log.write(json.dumps({"release": True}) + "\\n")
'''


def install_rknnlite_stub(root: Path) -> Path:
    """A fake `rknnlite` package under root (put root on PYTHONPATH)."""
    pkg = Path(root) / "rknnlite"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "api.py").write_text(RKNNLITE_STUB)
    return Path(root)


# -- experiment inputs in the users' layouts ----------------------------------------------------------
def _picture(rng, size: int, k: int) -> np.ndarray:
    img = rng.integers(0, 90, (size, size + 6, 3), dtype=np.uint8)
    img[..., k % 3] += np.uint8(120)
    if k >= 3:  # more classes than channels: stripes tell them apart
        img[:: 2 + k % 3] = 255 - img[:: 2 + k % 3]
    return img


def make_folder_dataset(root: Path, classes=("cat", "dog"), per_class: int = 12, size: int = 40, seed: int = 0) -> Path:
    """<root>/<class>/<n>.jpg: the `dataset=folder` layout."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (Path(root) / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_picture(rng, size, k)).save(Path(root) / name / f"{i:03d}.jpg", quality=95)
    return Path(root)


def make_digit_filelist(root: Path, count: int = 300, size: int = 28) -> Path:
    """The first ``count`` of scikit-learn's bundled 8x8 digits as ``size`` px grayscale PNGs, listed in
    <root>/train.txt and test.txt (every 5th) as `images/x.png----label` lines: MNIST-like digits in
    mnist_gem_resnet's layout, real enough for an accuracy floor."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    lines: dict[str, list[str]] = {"train": [], "test": []}
    for i in range(min(count, len(digits.target))):
        pixels = np.clip(np.round(digits.images[i] * 255 / 16), 0, 255).astype(np.uint8)
        rel = f"images/{i:05d}.png"
        Image.fromarray(pixels, "L").resize((size, size), Image.BILINEAR).save(root / rel)
        lines["test" if i % 5 == 0 else "train"].append(f"{rel}----{digits.target[i]}")
    for split, rows in lines.items():
        (root / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root


def make_pretrained(path: Path, arch: str = "mobilenet_v3_small") -> Path:
    """A local torchvision-format state_dict (random weights) standing in for downloaded weights."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None)
    torch.save(model.state_dict(), path)
    return Path(path)


def run_experiment(runs: Path, *overrides: str) -> dict:
    """`edgepipe run` in this process; returns the run's run.json."""
    from engine.cli.commands import main

    rc = main(["run", f"runs_root={runs}", *overrides])
    records = sorted(Path(runs).glob("*/*/run.json"), key=lambda p: p.stat().st_mtime)
    assert records, "no run folder written"
    record = json.loads(records[-1].read_text())
    failed = {n: s.get("error") for n, s in record["stages"].items() if s["status"] == "failed"}
    assert rc == 0 and not failed, failed or rc
    return record


RKNN_API = REPO / "tests" / "board_tests" / "rknn_api"


def build_c_demo(pkg: Path, work: Path) -> Path:
    """Build an RV1103/RV1106 package's C demo as its README says (CMake, RKNN_API_DIR, zero-copy)
    against the fake librknnmrt.so of tests/board_tests/rknn_api; returns the install folder."""
    import shutil
    import subprocess

    api = work / "librknn_api"
    (api / "include").mkdir(parents=True)
    (api / "armhf-uclibc").mkdir()
    shutil.copyfile(RKNN_API / "rknn_api.h", api / "include" / "rknn_api.h")
    subprocess.run(["gcc", "-shared", "-fPIC", "-std=c99", "-I", str(RKNN_API), str(RKNN_API / "fake_rknn.c"),
                    "-o", str(api / "armhf-uclibc" / "librknnmrt.so")], check=True)
    build, inst = work / "build", work / "install"
    for cmd in (["cmake", "-S", str(pkg), "-B", str(build), f"-DRKNN_API_DIR={api}"],
                ["cmake", "--build", str(build)], ["cmake", "--install", str(build), "--prefix", str(inst)]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    return inst
