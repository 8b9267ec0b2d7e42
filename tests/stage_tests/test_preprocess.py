"""stages/common/preprocess.py: the one preprocessing definition (numpy + Pillow only)."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_data import jpeg_bytes, make_bad_corpus
from PIL import Image

from stages.common.preprocess import (
    PRESETS,
    Preprocess,
    load_image,
    normalize,
    prepare,
    resize,
    to_channel_order,
)

DEPLOY_MODULE = Path(__file__).resolve().parents[2] / "stages" / "common" / "preprocess_numpy.py"


def test_presets_sizes_and_validation():
    p = Preprocess(input_size=64, mean="imagenet", std="imagenet")
    assert p.input_size == (64, 64) and (p.height, p.width) == (64, 64)
    assert p.mean == PRESETS["imagenet"][0] and p.std == PRESETS["imagenet"][1]
    assert p.input_shape == [1, 3, 64, 64]
    u = Preprocess.model_validate({"input_size": [24, 40], "mean": "uniform", "std": 0.5, "channel_order": "bgr"})
    assert u.input_size == (24, 40) and u.mean == (0.5, 0.5, 0.5) and u.std == (0.5, 0.5, 0.5)
    assert u.channel_order == "BGR"
    e = Preprocess(mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6])
    assert e.mean == (0.1, 0.2, 0.3)
    for bad in ({"mean": "cifar"}, {"std": [0, 1, 1]}, {"resize": "crop"}, {"input_size": 0}, {"unknown": 1},
                {"layout": "NHWC"}, {"pad_value": 300}):
        with pytest.raises(ValueError):
            Preprocess.model_validate(bad)


def test_save_load_roundtrip(tmp_path):
    p = Preprocess(input_size=(48, 32), resize="letterbox", mean="imagenet", std="imagenet", channel_order="BGR")
    p.save(tmp_path)
    assert Preprocess.load(tmp_path) == p
    assert Preprocess.load(tmp_path / "preprocess.json") == p
    assert p.to_dict()["input_size"] == [48, 32]


def test_board_mean_std_helpers():
    u = Preprocess(mean="uniform", std="uniform")
    assert u.rknn_mean_std() == ([127.5] * 3, [127.5] * 3)
    mean, norm = u.awnn_mean_norm()
    assert mean == 127.5 and norm == pytest.approx(1 / 127.5)
    im = Preprocess(mean="imagenet", std="imagenet")
    m, s = im.rknn_mean_std()
    assert m == pytest.approx([123.675, 116.28, 103.53]) and s == pytest.approx([58.395, 57.12, 57.375])
    mb, _ = Preprocess(mean="imagenet", std="imagenet", channel_order="BGR").rknn_mean_std()
    assert mb == pytest.approx([103.53, 116.28, 123.675])
    with pytest.raises(ValueError, match="one mean/std for all channels"):
        im.awnn_mean_norm()


def test_normalize_values_layout_and_channel_order():
    arr = np.zeros((2, 4, 5, 3), np.uint8)
    arr[..., 0] = 255  # red
    u = Preprocess(input_size=(4, 5))
    x = normalize(arr, u)
    assert x.dtype == np.float32 and x.shape == (2, 3, 4, 5) and x.flags["C_CONTIGUOUS"]
    assert np.all(x[:, 0] == 1.0) and np.all(x[:, 1:] == -1.0)
    xb = normalize(arr, Preprocess(input_size=(4, 5), channel_order="BGR"))
    assert np.all(xb[:, 2] == 1.0) and np.all(xb[:, :2] == -1.0)
    im = Preprocess(mean="imagenet", std="imagenet")
    one = normalize(arr[0], im)  # a single H x W x 3 image gets a batch axis
    assert one.shape == (1, 3, 4, 5)
    assert one[0, 0, 0, 0] == pytest.approx((1.0 - 0.485) / 0.229, rel=1e-6)
    assert to_channel_order(arr, Preprocess(channel_order="BGR"))[0, 0, 0].tolist() == [0, 0, 255]
    with pytest.raises(ValueError):
        normalize(np.zeros((2, 3, 4, 5), np.uint8), u)


def test_resize_modes():
    img = np.zeros((20, 40, 3), np.uint8)  # 2:1, left half red, right half blue
    img[:, :20, 0] = 255
    img[:, 20:, 2] = 255
    stretch = resize(img, Preprocess(input_size=16))
    assert stretch.shape == (16, 16, 3) and stretch.dtype == np.uint8
    box = resize(img, Preprocess(input_size=16, resize="letterbox", pad_value=7))
    assert box.shape == (16, 16, 3)
    assert np.all(box[:4] == 7) and np.all(box[-4:] == 7)  # 16 x 8 content centred, padded top/bottom
    assert box[8, 2, 0] == 255 and box[8, 13, 2] == 255
    crop = resize(img, Preprocess(input_size=16, resize="center_crop"))
    # shorter side -> 16 (32 x 16), centre crop keeps columns 8..24: half red, half blue
    assert crop.shape == (16, 16, 3)
    assert crop[8, 1, 0] == 255 and crop[8, 14, 2] == 255
    same = resize(img, Preprocess(input_size=(20, 40)))
    assert np.array_equal(same, img)
    rect = resize(Image.fromarray(img), Preprocess(input_size=(10, 30), resize="letterbox"))
    assert rect.shape == (10, 30, 3)


def test_load_image_conversions(tmp_path):
    kinds = make_bad_corpus(tmp_path)
    for name, kind in kinds.items():
        if kind == "good":
            img = load_image(tmp_path / name)
            assert img.mode == "RGB", name
        else:
            with pytest.raises((OSError, ValueError)):
                load_image(tmp_path / name)
    g16 = np.asarray(load_image(tmp_path / "gray16.png"))
    assert g16[0, 0].tolist() == [0, 0, 0] and g16[-1, -1].tolist() == [255, 255, 255]
    # EXIF orientation 6: the stored 40x20 picture is shown rotated 90 degrees clockwise (20x40)
    rot = load_image(tmp_path / "exif_rotated.jpg")
    assert rot.size == (20, 40)
    a = np.asarray(rot).mean(axis=(1, 2))
    assert a[:20].mean() > 200 and a[20:].mean() < 50  # the white left half is now on top
    # RGBA composited on black: alpha 128 halves the colour
    rgba = np.asarray(load_image(tmp_path / "rgba.png")).astype(int)
    src = np.asarray(Image.open(tmp_path / "rgba.png"))[..., :3].astype(int)
    assert np.abs(rgba - src * 128 / 255).max() <= 1
    # file objects work too
    assert load_image(io.BytesIO(jpeg_bytes(np.zeros((4, 4, 3), np.uint8)))).size == (4, 4)


def test_prepare_is_load_resize_normalize(tmp_path):
    arr = (np.arange(30 * 20 * 3) % 251).astype(np.uint8).reshape(30, 20, 3)
    Image.fromarray(arr).save(tmp_path / "a.png")
    spec = Preprocess(input_size=16, resize="center_crop", mean="imagenet", std="imagenet")
    x = prepare(tmp_path / "a.png", spec)
    assert np.array_equal(x, normalize(resize(load_image(tmp_path / "a.png"), spec)[None], spec))


def test_deploy_module_depends_on_numpy_pillow_only(tmp_path):
    """stages/common/preprocess_numpy.py is what packages carry as preprocess.py: no pydantic on the board."""
    tree = ast.parse(DEPLOY_MODULE.read_text(encoding="utf-8"))
    top = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            top.add(node.module.split(".")[0])
    allowed = {"numpy", "PIL", "__future__"} | set(sys.stdlib_module_names)
    assert top <= allowed, top - allowed
    # copied verbatim next to a deploy script, it imports and works on its own, reading what the host wrote
    (tmp_path / "preprocess.py").write_text(DEPLOY_MODULE.read_text(encoding="utf-8"), encoding="utf-8")
    Preprocess(input_size=8, mean="imagenet", std="imagenet", channel_order="BGR").save(tmp_path)
    code = ("import sys, numpy as np, preprocess as pp; s = pp.PreprocessSpec.load('.');"
            "assert s.channel_order == 'BGR' and s.mean == (0.485, 0.456, 0.406);"
            "x = pp.normalize(np.zeros((1, 8, 8, 3), np.uint8), s); assert x.shape == (1, 3, 8, 8);"
            "assert not {'torch', 'engine', 'stages', 'pydantic'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, env={"PYTHONPATH": str(tmp_path)})
