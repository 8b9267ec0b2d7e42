"""rknn_quantize on the real rknn-toolkit2 2.5.0 x86 simulator, with a small trained model at 32 px,
and stages.common.native_output (the fd-level redirection every toolkit call runs under)."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_data import onnx_reference_logits, toy
from helpers_data import wide_dataset as make_wide_dataset
from PIL import Image
from pydantic import ValidationError

from engine.contract.stage import StageError
from engine.run.testing import run_stage, validate_params


@pytest.fixture(scope="module")
def normal_build(tmp_path_factory) -> Path:
    t = toy()
    out = tmp_path_factory.mktemp("rknn") / "normal"
    metrics = run_stage("rknn_quantize", {"target": "rv1103", "algorithm": "normal"},
                        {"onnx": t.onnx, "calib": t.calib, "data": t.data}, out)
    (out.parent / "metrics.json").write_text(json.dumps(metrics))
    return out


def test_normal_build_outputs(normal_build):
    out = normal_build
    names = {p.name for p in out.iterdir()}
    assert not list(Path.cwd().glob("check*.onnx"))  # the toolkit's scratch files stay out of the user's folder
    assert names == {"model.rknn", "build.json", "error_analysis.txt", "layers.json", "rknn.log", "test_logits.npy",
                     "val_logits.npy", "io.json", "preprocess.json", "labels.txt"}
    build = json.loads((out / "build.json").read_text())
    assert build["target"] == "rv1103" and build["algorithm"] == "normal" and build["dtype"] == "w8a8"
    # mean/std come from preprocess.json (imagenet preset) on the 0..255 scale, never typed
    assert build["mean_values"] == pytest.approx([123.675, 116.28, 103.53])
    assert build["std_values"] == pytest.approx([58.395, 57.12, 57.375])
    assert build["build_s"] > 0 and build["rss_peak_mb"] > 100
    assert build["accuracy_analysis"] == "ok"
    # every build runs the val split too (evaluate's label-free agreement and cosine read it)
    assert np.load(out / "val_logits.npy").shape == (32, 4) and build["simulator_val"]["samples"] == 32
    layers = json.loads((out / "layers.json").read_text())["layers"]
    assert [x["position"] for x in layers] == list(range(len(layers))) and layers[-1]["op_type"]
    metrics = json.loads((out.parent / "metrics.json").read_text())
    assert set(metrics) == {"build_s", "rss_peak_mb", "sim_top1"}
    assert (out / "model.rknn").stat().st_size > 10_000
    log = (out / "rknn.log").read_text(errors="replace")
    assert "rknn building" in log


def test_simulator_logits_agree_with_onnxruntime(normal_build):
    t = toy()
    logits = np.load(normal_build / "test_logits.npy")
    ref = onnx_reference_logits(t)
    labels = np.load(t.data / "labels_test.npy")
    assert logits.shape == ref.shape == (len(labels), 4)
    assert np.mean(logits.argmax(1) == ref.argmax(1)) >= 0.95
    # int8 logits: close in scale, not bit-exact
    scale = np.abs(ref).max()
    assert np.abs(logits - ref).max() < 0.5 * scale
    sim = json.loads((normal_build / "build.json").read_text())["simulator"]
    assert sim["samples"] == len(labels)
    assert sim["top1"] == pytest.approx(float(np.mean(logits.argmax(1) == labels)))


def test_error_analysis_kept_and_dumps_deleted(normal_build):
    text = (normal_build / "error_analysis.txt").read_text()
    assert text.count("# sample ") == 2  # accuracy_analysis_samples default
    assert "simulator_error" in text and "cos" in text
    leftovers = [p for p in normal_build.rglob("*") if p.name in ("golden", "simulator", "map_name_to_file.txt")
                 or p.name.startswith((".snapshot", ".dataset"))]
    assert leftovers == []
    size = sum(p.stat().st_size for p in normal_build.rglob("*") if p.is_file())
    assert size < 5_000_000


def test_simulator_refuses_a_loaded_rknn(normal_build, tmp_path):
    """Why the simulator runs inside rknn_quantize: rknn-toolkit2 2.5.0 refuses init_runtime() on the
    simulator for a model loaded with load_rknn (it needs load_onnx + build in the same session)."""
    from rknn.api import RKNN

    from stages.common.native_output import quiet

    with quiet(tmp_path / "t.log"):
        r = RKNN(verbose=False)
        try:
            assert r.load_rknn(str(normal_build / "model.rknn")) == 0
            ret = r.init_runtime()
        finally:
            r.release()
    assert ret == -1
    assert "not support inference on the simulator" in (tmp_path / "t.log").read_text()


def test_mmse_build_is_quiet_and_notes(tmp_path, capfd, caplog):
    """A whole mmse build (+ analysis + simulator) prints nothing on fd 1/2 and says it takes minutes."""
    t = toy()
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="edgepipe.stage.rknn_quantize"):
        metrics = run_stage("rknn_quantize", {"algorithm": "mmse", "accuracy_analysis_samples": 1, "data_limit": 16},
                            {"onnx": t.onnx, "calib": t.calib, "data": t.data}, tmp_path / "out")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert any("mmse quantization takes minutes" in r.getMessage() for r in caplog.records)
    assert np.load(tmp_path / "out" / "test_logits.npy").shape == (16, 4)
    assert metrics["sim_top1"] >= 0.84  # reference loop 95.3% on toy test images, n=16 - 2 SD = 0.84; bench/floors.py
    assert (tmp_path / "out" / "error_analysis.txt").read_text().count("# sample ") == 1
    assert "rknn building done" in (tmp_path / "out" / "rknn.log").read_text(errors="replace")


def test_bgr_model_kl_divergence_layer(tmp_path):
    """A model trained on BGR input: mean/std are reversed into the model's channel order, the RGB
    calibration PNGs are swapped by the toolkit (quant_img_RGB2BGR) and the simulator is fed BGR."""
    t = toy("BGR")
    run_stage("rknn_quantize", {"algorithm": "kl_divergence", "method": "layer", "accuracy_analysis_samples": 0},
              {"onnx": t.onnx, "calib": t.calib, "data": t.data}, tmp_path / "out")
    build = json.loads((tmp_path / "out" / "build.json").read_text())
    assert build["mean_values"] == pytest.approx([103.53, 116.28, 123.675])
    assert build["channel_order"] == "BGR" and build["accuracy_analysis"] == "skipped"
    logits = np.load(tmp_path / "out" / "test_logits.npy")
    ref = onnx_reference_logits(t)  # normalize() emits BGR for this preprocess.json
    assert np.mean(logits.argmax(1) == ref.argmax(1)) >= 0.9


def test_float16_build_without_calibration(tmp_path):
    from stages.common.sampling import limited

    t = toy()
    metrics = run_stage("rknn_quantize", {"target": "rk3588", "do_quantization": False, "data_limit": 8},
                        {"onnx": t.onnx, "data": t.data}, tmp_path / "out")
    build = json.loads((tmp_path / "out" / "build.json").read_text())
    assert build["dtype"] == "float16" and build["calibration_images"] == 0
    assert build["accuracy_analysis"] == "skipped"
    logits = np.load(tmp_path / "out" / "test_logits.npy")
    ref = onnx_reference_logits(t)[limited(np.load(t.data / "labels_test.npy"), 8)]  # data_limit's sample
    assert np.abs(logits - ref).max() < 0.05 * np.abs(ref).max()  # fp16: close
    assert "sim_top1" in metrics


def test_fp16_on_rv1103_is_a_config_error():
    with pytest.raises(ValidationError, match="rv1103 has no float16"):
        validate_params("rknn_quantize", {"target": "rv1103", "do_quantization": False})
    with pytest.raises(ValidationError, match="rv1106 has no float16"):
        validate_params("rknn_quantize", {"target": "rv1106", "do_quantization": False})
    validate_params("rknn_quantize", {"target": "rk3566", "do_quantization": False})


def test_dtype_per_target_and_unknown_keys():
    with pytest.raises(ValidationError, match="w8a16 is not supported on rv1103"):
        validate_params("rknn_quantize", {"target": "rv1103", "dtype": "w8a16"})
    validate_params("rknn_quantize", {"target": "rk3562", "dtype": "w8a16"})
    validate_params("rknn_quantize", {"target": "rk3576", "dtype": "w4a16"})
    with pytest.raises(ValidationError):
        validate_params("rknn_quantize", {"dtype": "int8"})
    with pytest.raises(ValidationError):
        validate_params("rknn_quantize", {"mean_values": [0, 0, 0]})  # never typed by the user


def test_corrupt_onnx_gives_short_stage_error(tmp_path, capfd):
    t = toy()
    bad = tmp_path / "onnx"
    shutil.copytree(t.onnx, bad)
    data = (bad / "model.onnx").read_bytes()
    (bad / "model.onnx").write_bytes(data[: len(data) // 3])
    capfd.readouterr()
    with pytest.raises(StageError) as ei:
        run_stage("rknn_quantize", {}, {"onnx": bad, "calib": t.calib}, tmp_path / "out")
    msg = str(ei.value)
    assert msg.startswith("rknn build failed: load_onnx: ")
    assert "\n" not in msg and len(msg) < 400 and "Traceback" not in msg
    # the engine moves a failed stage's folder to runs/<run>/failed/<stage>/ and rewrites this path
    assert msg.endswith(f"; see {tmp_path / 'out' / 'rknn.log'}")
    assert "Error parsing message" in (tmp_path / "out" / "rknn.log").read_text(errors="replace")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_missing_inputs_are_named(tmp_path):
    t = toy()
    with pytest.raises(StageError, match="needs a `calib` input"):
        run_stage("rknn_quantize", {}, {"onnx": t.onnx}, tmp_path / "a")
    broken = tmp_path / "onnx"
    shutil.copytree(t.onnx, broken)
    (broken / "io.json").unlink()
    with pytest.raises(StageError, match="io.json is missing"):
        run_stage("rknn_quantize", {}, {"onnx": broken, "calib": t.calib}, tmp_path / "b")


# -- stages.common.native_output ------------------------------------------------------------------------------
def test_quiet_captures_native_output_and_restores_on_error(tmp_path, capfd):
    from stages.common.native_output import active, quiet

    libc = ctypes.CDLL(None)
    log = tmp_path / "q.log"
    capfd.readouterr()
    with pytest.raises(RuntimeError):
        with quiet(log, header="== block"):
            assert active()
            print("python stdout")
            print("python stderr", file=sys.stderr)
            libc.printf(b"native printf without newline")
            libc.puts(b"")
            subprocess.run(["echo", "child process"], check=True)
            raise RuntimeError("boom")
    assert not active()
    print("after")
    libc.printf(b"native after\n")
    libc.fflush(None)
    captured = capfd.readouterr()
    assert "after" in captured.out and "native after" in captured.out
    assert "python" not in captured.out + captured.err and "child" not in captured.out
    text = log.read_text()
    for s in ("== block", "python stdout", "python stderr", "native printf without newline", "child process"):
        assert s in text


def test_quiet_nests_and_keeps_grabbed_streams_valid(tmp_path, capfd):
    from stages.common.native_output import quiet

    outer, inner = tmp_path / "outer.log", tmp_path / "inner.log"
    with quiet(outer):
        handler = logging.StreamHandler(sys.stderr)  # a library grabbing sys.stderr inside the block
        with quiet(inner):
            print("to inner")
        print("to outer")
    lg = logging.getLogger("test_quiet_grab")
    lg.addHandler(handler)
    try:
        capfd.readouterr()
        lg.warning("after the blocks")  # must not raise 'I/O operation on closed file'
        assert "after the blocks" in capfd.readouterr().err
    finally:
        lg.removeHandler(handler)
    assert inner.read_text() == "to inner\n"
    assert outer.read_text() == "to outer\n"
    os.write(1, b"fd 1 still open\n")  # fds 1/2 are restored, not closed, after nested blocks
    os.write(2, b"fd 2 still open\n")
    captured = capfd.readouterr()
    assert "fd 1 still open" in captured.out and "fd 2 still open" in captured.err


# -- multi-crop in the simulator (evaluate.multicrop) ------------------------------------------------------
@pytest.fixture(scope="module")
def wide_dataset(tmp_path_factory) -> tuple[Path, Path]:
    return make_wide_dataset(tmp_path_factory.mktemp("wide"))


def test_simulator_runs_the_crops_and_evaluate_scores_them(wide_dataset, tmp_path):
    t = toy()
    data, src = wide_dataset
    multicrop = {"enabled": True, "crops": 3, "root": str(src)}
    rk = tmp_path / "rknn"
    run_stage("rknn_quantize", {"accuracy_analysis_samples": 0, "multicrop": multicrop},
              {"onnx": t.onnx, "calib": t.calib, "data": data}, rk)
    crops = np.load(rk / "test_crop_logits.npy")
    n = len(np.load(data / "labels_test.npy"))
    assert crops.shape == (n, 3, 4)
    assert json.loads((rk / "build.json").read_text())["simulator"]["crops"] == {"crops": 3, "samples": n}
    out = tmp_path / "eval"
    metrics = run_stage("evaluate", {"multicrop": multicrop}, {"data": data, "onnx": t.onnx, "rknn": rk}, out)
    pred = np.load(out / "predictions.npz")
    assert np.array_equal(pred["rknn.crop_logits"], crops)
    # the int8 crops agree with ONNX Runtime's crops of the same files
    assert np.mean(crops.argmax(-1) == pred["onnx.crop_logits"].argmax(-1)) >= 0.9
    assert set(metrics["multicrop_top1_mean"]) == {"onnx", "rknn"}
    md = (out / "eval.md").read_text()
    assert re.search(r"^\| rknn \| [\d.]+% \| [\d.]+% \| [\d.]+% \| \d+ \|$", md, re.M), md
    # crops computed for 3 windows do not stand for 4
    with pytest.raises(StageError, match=r"holds \[3\] crops per image, evaluate.multicrop.crops=4"):
        run_stage("evaluate", {"multicrop": {**multicrop, "crops": 4}}, {"data": data, "rknn": rk}, tmp_path / "e4")


def test_the_vote_is_not_in_the_builds_key():
    """Only what makes the crops rebuilds the model: the vote is evaluate's business."""
    from engine.store.cache import key_params

    base = {"enabled": True, "crops": 3, "root": "/x"}
    keys = [key_params(validate_params("rknn_quantize", {"multicrop": {**base, **extra}}))[0]
            for extra in ({}, {"vote_threshold": 0.9, "negative_class": "red"}, {"crops": 4})]
    assert keys[0] == keys[1] != keys[2]
    off = [key_params(validate_params("rknn_quantize", {"multicrop": m}))[0]
           for m in ({}, {"enabled": False, "crops": 5, "root": "/y"})]
    assert off[0] == off[1]  # disabled: its settings make nothing


# -- on-board evaluation (quantize.board_eval) ---------------------------------------------------------------
def _adb_server_up() -> bool:
    from stages.common.adb import server_running

    return server_running()


def test_board_eval_without_a_board_lists_what_adb_sees(tmp_path):
    """No board here: a one-line error before any build, listing what `adb devices` (the toolkit's own adb
    when none is on PATH) sees; an adb server the check started is stopped again."""
    from stages.common.adb import executable

    t = toy()
    server_before = _adb_server_up()
    with pytest.raises(StageError) as e:
        run_stage("rknn_quantize", {"board_eval": {"device_id": "NOBOARD42"}},
                  {"onnx": t.onnx, "calib": t.calib, "data": t.data}, tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("quantize.board_eval.device_id=NOBOARD42: ")
    adb = executable()
    if adb is None:
        assert "adb is not installed" in msg and "apt-get install adb" in msg
    else:
        assert f"the board is not connected; `adb devices` ({adb}) lists " in msg
        listed = subprocess.run([adb, "devices"], capture_output=True, text=True).stdout
        if not server_before:
            subprocess.run([adb, "kill-server"], capture_output=True)
        if not [ln for ln in listed.splitlines()[1:] if ln.strip() and not ln.startswith("*")]:
            assert "lists no device" in msg
    assert not (tmp_path / "out" / "model.rknn").exists()  # refused before minutes of building
    for _ in range(50):  # kill-server returns before the server has closed its port
        if _adb_server_up() == server_before:
            break
        time.sleep(0.1)
    assert _adb_server_up() == server_before


def test_board_eval_needs_the_test_split(tmp_path):
    t = toy()
    with pytest.raises(StageError, match=r"quantize.board_eval.device_id needs the rknn_quantize stage's `data` input"):
        run_stage("rknn_quantize", {"board_eval": {"device_id": "X"}}, {"onnx": t.onnx, "calib": t.calib},
                  tmp_path / "o")


def test_the_toolkits_bundled_adb_is_found():
    """rknn-toolkit2 ships adb (rknn/3rdparty/platform-tools): a board can be reached without installing it."""
    from stages.common.adb import executable

    adb = executable()
    assert adb is not None and os.access(adb, os.X_OK)


def test_the_rknn_stages_read_evaluate_multicrop_and_board_eval_from_the_config(tmp_path):
    """Through real Hydra composition: the RKNN builds take evaluate.multicrop's crops (their vote stays out
    of the key) and quantize.board_eval.device_id."""
    from engine.config.compose import compose
    from engine.config.validate import validate
    from engine.store.cache import key_params

    def rknn_keys(*overrides):
        job = compose(["+experiment=rv1103_mobilenetv3", f"dataset.path={tmp_path}", *overrides])
        _, specs = validate(job.cfg)
        return specs, [key_params(specs[s].params)[0] for s in ("rknn_normal", "rknn_mmse")]

    on = ["evaluate.multicrop.enabled=true", f"evaluate.multicrop.root={tmp_path}"]
    specs, base = rknn_keys(*on)
    assert specs["rknn_mmse"].params.multicrop.crops == specs["eval"].params.multicrop.crops == 3
    assert rknn_keys(*on, "evaluate.multicrop.vote_threshold=0.9")[1] == base
    assert rknn_keys(*on, "evaluate.multicrop.crops=4")[1] != base
    assert rknn_keys()[1] != base
    specs, _ = rknn_keys("quantize.board_eval.device_id=ABC123")
    assert specs["rknn_normal"].params.board_eval.device_id == "ABC123"


def test_a_board_that_fails_in_the_toolkit_is_one_line(tmp_path, monkeypatch):
    """Past the adb check (a board that was listed, then went away or runs no rknn_server): the real
    toolkit's init_runtime(target, device_id) fails and the stage says so in one line, with what adb sees."""
    msg = _on_a_missing_board(monkeypatch, {"accuracy_analysis_samples": 0}, tmp_path / "out")
    assert "\n" not in msg and msg.startswith("rknn on board NOBOARD42 failed: init_runtime: ")
    assert "NOBOARD42' not found" in msg  # the toolkit's reason from rknn.log, not its bare RuntimeError
    assert "`adb devices` lists " in msg and "rknn_server" in msg and "rknn.log" in msg


def _on_a_missing_board(monkeypatch, params: dict, out: Path, scratch: Path | None = None) -> str:
    """The toy's rknn_quantize with board_eval on a board past the adb check that is not there (listed,
    then gone, or no rknn_server): the real toolkit's init_runtime(target, device_id) fails; the
    stage's one-line error."""
    from stages.common import adb

    t = toy()
    tool = adb.executable()
    server_before = adb.server_running()
    monkeypatch.setattr(adb, "check_connected", lambda serial, key: None)
    try:
        with pytest.raises(StageError) as e:
            run_stage("rknn_quantize", {**params, "data_limit": 4, "board_eval": {"device_id": "NOBOARD42"}},
                      {"onnx": t.onnx, "calib": t.calib, "data": t.data}, out, scratch=scratch)
    finally:
        if tool and not server_before:  # the toolkit starts an adb server of its own
            subprocess.run([tool, "kill-server"], capture_output=True)
    return str(e.value)


# -- quantize.search: the int8 search on the real toolkit (stages/common/quant_search.py) ------------------
SEARCH = {"enabled": True, "calib_images": [8, 16], "hybrid": {"enabled": False}}


@pytest.fixture(scope="module")
def weak_toy(tmp_path_factory):
    """The toy trained for 3 steps only (logits near ties) and calibrated on images darkened to a tenth
    of their brightness (activation ranges far too small, so real images saturate): int8 flips val images
    whatever the calibration subset and the thread count."""
    from helpers_data import (
        TOY_SIZE,
        export_onnx_folder,
        train_model,
        write_calibration,
        write_dataset,
        write_model_bundle,
    )

    from stages.common.preprocess import Preprocess

    root = tmp_path_factory.mktemp("weak")
    spec = Preprocess(input_size=(TOY_SIZE, TOY_SIZE), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    data = write_dataset(root / "data", spec)
    module, arch = train_model(data, spec, steps=3)
    onnx = export_onnx_folder(write_model_bundle(root / "model", module, arch, spec), root / "onnx")
    calib = write_calibration(data, root / "calib")
    for png in (calib / "images").glob("*.png"):
        with Image.open(png) as im:
            dark = (np.asarray(im.convert("RGB"), np.float32) * 0.1).astype(np.uint8)
        Image.fromarray(dark).save(png)
    return {"onnx": onnx, "calib": calib, "data": data}


def _search_json(out: Path) -> dict:
    return json.loads((out / "search.json").read_text())


def test_the_search_ships_the_first_candidate_that_holds_and_a_second_run_builds_nothing(tmp_path):
    t = toy()
    inputs = {"onnx": t.onnx, "calib": t.calib, "data": t.data}
    first = tmp_path / "first"
    metrics = run_stage("rknn_quantize", {"search": SEARCH}, inputs, first, scratch=tmp_path / "scratch")
    assert {"model.rknn", "test_logits.npy", "val_logits.npy", "layers.json", "search.json", "build.json",
            "error_analysis.txt", "rknn.log", "io.json", "preprocess.json", "labels.txt"} == {
               p.name for p in first.iterdir()}
    record = _search_json(first)
    chosen = record["candidates"][record["chosen"]["index"]]
    # cheapest first: normal, channel, the smaller subset; judged on val (32 images), never on test
    assert chosen["label"] == "normal/channel/8" and chosen["holds"] and chosen["images"] == 32
    assert record["selection"] == {"split": "val", "images": 32, "float_top1": pytest.approx(chosen["float_top1"])}
    assert "holds on the selection split" in record["chosen"]["reason"]
    # run.json's metrics (what `edgepipe show` prints): what was tried and why this one ships
    assert metrics["search"] == {"chosen": "normal/channel/8", "why": record["chosen"]["reason"],
                                 "tried": "normal/channel/8: holds"}
    assert np.load(first / "val_logits.npy").shape == (32, 4) and np.load(first / "test_logits.npy").shape == (64, 4)
    build = json.loads((first / "build.json").read_text())
    assert build["calibration_images"] == 8 and build["simulator_val"]["samples"] == 32
    # the worst layers by accuracy_analysis, on the val images where float and int8 disagree most
    layers = chosen["layers"]
    assert layers and {"name", "op_type", "cosine_alone", "cosine_accumulated", "position"} <= set(layers[0])
    assert layers[0]["cosine_alone"] == min(x["cosine_alone"] for x in layers)
    # a second run (another output folder, the same scratch) takes every candidate from the cache: the
    # toolkit's .rknn files differ byte for byte between two builds, so equal bytes mean no build
    second = tmp_path / "second"
    run_stage("rknn_quantize", {"search": SEARCH}, inputs, second, scratch=tmp_path / "scratch")
    assert all(c["cached"] for c in _search_json(second)["candidates"])
    assert (second / "model.rknn").read_bytes() == (first / "model.rknn").read_bytes()


def test_when_nothing_holds_the_stage_fails_with_one_line_and_every_candidate_stays_cached(weak_toy, tmp_path):
    params = {"max_drop": 0.0, "search": {"enabled": True, "calib_images": [1], "methods": ["layer"],
                                          "algorithms": ["normal"],
                                          "hybrid": {"enabled": True, "max_float_layers": 2, "step": 2}}}
    with pytest.raises(StageError) as e:
        run_stage("rknn_quantize", params, weak_toy, tmp_path / "out", scratch=tmp_path / "scratch")
    line = str(e.value)
    assert "\n" not in line
    assert line.startswith("int8 search: no candidate holds the target on the selection split; best normal/layer/1")
    assert "> 0 images allowed by the 0-point target" in line and "next: more calibration data" in line
    record = _search_json(tmp_path / "out")
    assert record["chosen"] is None and len(record["candidates"]) == 2  # all-int8, then 2 layers in int16
    assert record["float_layer_dtype"] == "int16"  # rv1103: the toolkit refuses float16 layers there
    assert record["candidates"][1]["float_layers"] == [x["name"] for x in record["candidates"][0]["layers"][:2]]
    cached = list((tmp_path / "scratch" / "candidates").glob("*/candidate.json"))
    assert len(cached) == 2
    with pytest.raises(StageError, match="no candidate holds"):
        run_stage("rknn_quantize", params, weak_toy, tmp_path / "again", scratch=tmp_path / "scratch")
    assert all(c["cached"] for c in _search_json(tmp_path / "again")["candidates"])


def test_an_exception_the_toolkit_only_logs_fails_that_candidate(tmp_path, monkeypatch):
    """Some toolkit versions log an exception inside mmse and still write a worse model (return 0):
    that candidate fails and the search goes on. The toolkit here does not, so its build is made to."""
    from rknn.api import RKNN

    t = toy()
    real_config, real_build = RKNN.config, RKNN.build

    def config(self, *a, **kw):
        self._method = kw.get("quantized_method")
        return real_config(self, *a, **kw)

    def build(self, *a, **kw):
        ret = real_build(self, *a, **kw)
        if self._method == "channel":  # as the toolkit logs it: on stderr, through its logger
            os.write(2, b"E build: Traceback (most recent call last):\n  File \"rknn/api/mmse_quant2.py\"\n"
                        b"E build: ValueError: mmse: clip range search diverged\n")
        return ret

    monkeypatch.setattr(RKNN, "config", config)
    monkeypatch.setattr(RKNN, "build", build)
    search = {**SEARCH, "algorithms": ["mmse"], "calib_images": [2]}
    run_stage("rknn_quantize", {"search": search}, {"onnx": t.onnx, "calib": t.calib, "data": t.data},
              tmp_path / "out", scratch=tmp_path / "scratch")
    failed, chosen = _search_json(tmp_path / "out")["candidates"]
    assert failed["label"] == "mmse/channel/2" and not failed["holds"]
    assert failed["failed"] == ("the toolkit logged an exception while building: ValueError: mmse: clip range "
                                "search diverged; see its log")
    assert chosen["label"] == "mmse/layer/2" and chosen["holds"]


def test_an_error_line_the_toolkit_logs_for_sound_rk3566_builds_does_not_fail_the_search(tmp_path):
    """rknn-toolkit2 2.5.0 logs "E RKNN: Unkown op target: 0" in every rk3566 build of a MobileNetV3 (the
    toy's and the real-photo run's) and still writes a sound model: the search on rk3566 ships its
    first candidate. (Taken for a logged exception, it failed every candidate, and the real-photo run
    with board=rk3566 wrote no package.)"""
    t = toy()
    out = tmp_path / "out"
    run_stage("rknn_quantize", {"target": "rk3566", "search": SEARCH}, {"onnx": t.onnx, "calib": t.calib,
                                                                        "data": t.data}, out)
    assert "E RKNN: " in (out / "rknn.log").read_text() and "Unkown op target: 0" in (out / "rknn.log").read_text()
    record = _search_json(out)
    first = record["candidates"][0]
    assert first["failed"] is None and first["holds"] and record["chosen"]["index"] == 0, first


def test_board_eval_after_the_search_runs_the_shipped_build_on_the_board(tmp_path, monkeypatch):
    """The board runs the chosen model.rknn loaded in a new session (only the simulator refuses a loaded
    one): past the adb check, the real toolkit's init_runtime(target, device_id) fails without a board,
    in one line, after the search chose."""
    msg = _on_a_missing_board(monkeypatch, {"search": SEARCH}, tmp_path / "out", scratch=tmp_path / "scratch")
    assert msg.startswith("rknn on board NOBOARD42 failed: init_runtime: ")
    assert _search_json(tmp_path / "out")["chosen"]["label"] == "normal/channel/8"


def test_search_settings_and_the_target_are_not_in_the_key_without_the_search():
    plain = validate_params("rknn_quantize", {}).model_dump()
    assert validate_params("rknn_quantize", {"max_drop": 3.0, "search": {"budget_s": 5}}).model_dump() == plain
    on = validate_params("rknn_quantize", {"max_drop": 3.0, "search": {"enabled": True}})
    assert on.max_drop == 3.0 and on.search.enabled
    with pytest.raises(ValidationError, match="search.enabled=true searches int8 builds"):
        validate_params("rknn_quantize", {"target": "rk3588", "do_quantization": False, "search": {"enabled": True}})


@pytest.mark.parametrize("board", ["rv1103", "rv1106", "rk3566"])
def test_the_board_experiment_searches_and_packages_the_searchs_build(tmp_path, board):
    from engine.config.compose import compose
    from engine.config.validate import validate

    job = compose(["+experiment=rv1103_mobilenetv3", f"dataset.path={tmp_path}", f"board={board}"])
    _, specs = validate(job.cfg)
    assert specs["rknn"].params.search.enabled and specs["rknn"].params.target == board
    assert specs["rknn"].params.max_drop == job.cfg.evaluate.quant_max_drop
    # the plain builds beside it are evaluated side by side, unsearched
    assert not specs["rknn_normal"].params.search.enabled and not specs["rknn_mmse"].params.search.enabled
    assert specs["package"].entry.needs["model"] == "rknn" and specs["eval"].entry.needs["rknn"] == "rknn"
    job = compose(["+experiment=rv1103_mobilenetv3", f"dataset.path={tmp_path}",
                   "pipeline.stages.package.needs.model=rknn_mmse"])
    _, specs = validate(job.cfg)
    assert specs["package"].entry.needs["model"] == "rknn_mmse"


def test_the_quickstart_does_not_search():
    from engine.config.compose import compose
    from engine.config.validate import validate

    _, specs = validate(compose(["+experiment=quickstart"]).cfg)
    assert not any(s.params.search.enabled for s in specs.values() if s.cls.name == "rknn_quantize")


def test_the_report_shows_the_candidates_the_shipped_one_and_where_int8_hurts(weak_toy, tmp_path):
    """A search that shipped and one where nothing held (its failed/ folder), reported from a run folder
    whose record points at the stage outputs: the candidates with the shipped one marked, the worst
    layers (layers.json) as a table, the cosine picture."""
    from helpers_browser import HtmlPage, assert_picture, embedded_pngs

    from engine.report.page import write_html
    from engine.store.runs import RunRecord, StageRecord

    t = toy()
    run_stage("rknn_quantize", {"search": SEARCH}, {"onnx": t.onnx, "calib": t.calib, "data": t.data},
              tmp_path / "shipped", scratch=tmp_path / "scratch")
    params = {"max_drop": 0.0, "search": {**SEARCH, "calib_images": [1], "methods": ["layer"],
                                          "algorithms": ["normal"]}}
    with pytest.raises(StageError) as e:
        run_stage("rknn_quantize", params, weak_toy, tmp_path / "failed", scratch=tmp_path / "scratch")
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("pipeline:\n  stages:\n    rknn: {uses: rknn_quantize}\n")
    record = RunRecord(name="search", run_dir=str(run_dir), runs_root=str(tmp_path / "runs"), status="failed", stages={
        "rknn": StageRecord("rknn", "rknn_quantize", "ran", path=str(tmp_path / "shipped")),
        "weak": StageRecord("weak", "rknn_quantize", "failed", path=str(tmp_path / "failed"), error=str(e.value))})
    html = write_html(record).read_text(encoding="utf-8")
    page = " ".join(" ".join(HtmlPage(html).text).split())
    assert "normal/channel/8 shipped" in page and "normal/channel/8 holds on the selection split" in page
    assert re.search(r"normal/layer/1 normal layer 1 0 [\d.]+% [\d.]+% [\d.]+ -\d+ \+\d+ missed ?: "
                     r"net \+\d+ images? of 32", page), page
    assert re.search(r"no candidate holds \(every candidate was tried\) ?; next: hybrid quantization \(quantize.search",
                     page)
    worst = min(json.loads((tmp_path / "shipped" / "layers.json").read_text())["layers"],
                key=lambda x: x["cosine_alone"])
    assert f"{worst['name']} {worst['op_type']} {worst['cosine_alone']:.5f}" in page
    pngs = embedded_pngs(HtmlPage(html))
    assert "Worst layers of the best candidate, normal/layer/1" in page  # where nothing shipped
    assert len(pngs) == 2  # the cosine along the network: the shipped build, the best candidate
    for png in pngs:
        assert_picture(png)
