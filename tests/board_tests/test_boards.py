"""Board profiles and the preflight stage: every profile loads with sourced facts, limits can be tuned,
preflight rejects what a board cannot take (a Flatten for MaixII-Dock, per-channel normalisation for
awnn, models over the RAM/flash budget), flags CPU-fallback operators for RV1103 (GeM's Pow), and its
MaixII-Dock reshape prediction agrees with what pnnx really writes."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers_data import export_onnx, stage, tiny_net

import boards
from boards import BoardSettings, get_board, known_boards
from boards.graph import analyze
from engine.contract.stage import StageError

# the boards registered here: pyproject's entry points and, for a known family, boards/profiles/*.yaml
PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
BOARDS = sorted({*PYPROJECT["project"]["entry-points"]["edgepipe.boards"],
                 *(p.stem for p in (Path(boards.__file__).parent / "profiles").glob("*.yaml"))})
PROFILE_BOARDS = {name for name, ep in boards.board_entry_points().items() if ep.value.startswith("boards.profiles:")}


@pytest.fixture(scope="module")
def onnx_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("onnx")
    return {kind: export_onnx(base / kind, kind=kind) for kind in ("linear", "gem", "flat", "conv")}


def preflight(onnx_dir: Path, out: Path, board: str, **board_settings):
    return stage("preflight", {"board": {"name": board, **board_settings}}, {"onnx": onnx_dir}, out)


# -- profiles ---------------------------------------------------------------------------------------
def test_every_board_is_registered_with_its_facts():
    assert known_boards() == BOARDS
    for name in BOARDS:
        board = get_board(name)
        assert board.name == name
        facts = board.facts()
        json.dumps(facts)  # JSON-able: preflight.json and manifest.json record it
        assert board.title and board.soc and board.runtime and board.deploy_script
        assert "manifest.json" in board.package_files and "README.md" in board.package_files


def test_every_profile_file_is_a_registered_board_of_its_family():
    """A board of a known family is data (boards/profiles/<name>.yaml) behind one entry point."""
    import yaml

    from boards.profiles import FAMILIES, PROFILES

    files = sorted(PROFILES.glob("*.yaml"))
    assert {f.stem for f in files} == PROFILE_BOARDS
    for f in files:
        board = get_board(f.stem)
        assert f.stem in known_boards() and type(board) is FAMILIES[yaml.safe_load(f.read_text())["family"]]
    assert "init_runtime" not in get_board("rk3588").facts()  # preflight.json / manifests record what they did


@pytest.mark.parametrize("text, problem", [
    ("family: rockchip_c_demo\nname: newboard\ntitle: t\nsoc: s\nram: 64\n", "ram"),
    ("family: npu_of_the_future\nname: newboard\ntitle: t\nsoc: s\n", "family 'npu_of_the_future'"),
    ("family: rockchip_c_demo\nname: other\ntitle: t\nsoc: s\n", "must be the file's name"),
    ("- a list\n", "expected a mapping"),
])
def test_a_broken_profile_file_is_refused_naming_the_file(tmp_path, monkeypatch, text, problem):
    import boards.profiles

    monkeypatch.setattr(boards.profiles, "PROFILES", tmp_path)
    (tmp_path / "newboard.yaml").write_text(text)
    with pytest.raises(ValueError, match="newboard.yaml") as e:
        boards.profiles.load_profile("newboard")
    assert problem in str(e.value)


def test_a_new_board_of_a_known_family_is_one_data_file(tmp_path, monkeypatch):
    import boards.profiles
    from boards.rockchip import LuckfoxBoard

    rv1103 = get_board("rv1103")
    monkeypatch.setattr(boards.profiles, "PROFILES", tmp_path)
    (tmp_path / "rv1103b.yaml").write_text(
        "family: rockchip_c_demo\nname: rv1103b\ntitle: Luckfox Pico (RV1103B)\nsoc: Rockchip RV1103B\n"
        "ram_mb: 64\nflash_mb: 16\nquantizer_options: {target: rv1103b, do_quantization: true}\n")
    board = boards.profiles.rv1103b  # what the entry point "boards.profiles:rv1103b" loads
    assert isinstance(board, LuckfoxBoard) and board.ram_mb == 64 and board.model_format == "rknn"
    assert board.package_files == rv1103.package_files and "Pow" in board.cpu_fallback_ops


def test_rockchip_chips_are_one_table(tmp_path, monkeypatch):
    """boards/rockchip.py RKNN_CHIPS is the one list: rknn_quantize's targets, dtypes and int8-only chips
    come from it, every Rockchip board's target is in it, and a profile naming another chip is refused."""
    import typing

    import boards.profiles
    from boards.rockchip import RKNN_CHIPS
    from stages.rknn_quantize import RknnQuantize

    # rknn_quantize's validation takes exactly each chip's dtypes, and float16 only where the chip has it
    all_dtypes = typing.get_args(RknnQuantize.Params.model_fields["dtype"].annotation)
    for chip, c in RKNN_CHIPS.items():
        for dtype in all_dtypes:
            if dtype in c.dtypes:
                RknnQuantize.Params(target=chip, dtype=dtype)
            else:
                with pytest.raises(ValueError, match=f"dtype={dtype} is not supported on {chip}"):
                    RknnQuantize.Params(target=chip, dtype=dtype)
        if c.float16:
            RknnQuantize.Params(target=chip, do_quantization=False)
        else:
            with pytest.raises(ValueError, match=f"{chip} has no float16 NPU path"):
                RknnQuantize.Params(target=chip, do_quantization=False)
    with pytest.raises(ValueError, match="target"):
        RknnQuantize.Params(target="rv9999")
    monkeypatch.setattr(boards.profiles, "PROFILES", tmp_path)
    (tmp_path / "rv9999.yaml").write_text(
        "family: rockchip_c_demo\nname: rv9999\ntitle: T\nsoc: S\nquantizer_options: {target: rv9999}\n")
    with pytest.raises(ValueError, match="'rv9999' is not a Rockchip chip"):
        boards.profiles.load_profile("rv9999")


def test_board_modules_do_not_import_torch():
    code = ("import sys, boards, boards.graph, stages.preflight, stages.package\n"
            "[boards.get_board(n) for n in boards.known_boards()]\n"
            "assert 'torch' not in sys.modules and 'onnx' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_settings_tune_limits_and_are_validated():
    board = get_board("rv1106", BoardSettings(name="rv1106", ram_mb=256, flash_mb=128, ram_usable_fraction=0.75))
    assert (board.ram_mb, board.flash_mb, board.ram_usable_fraction) == (256, 128, 0.75)
    assert get_board("rv1106").ram_mb == 128  # the profile itself is untouched
    with pytest.raises(ValueError, match="unknown board 'rv1107'.*rv1106"):
        BoardSettings(name="rv1107")
    with pytest.raises(ValueError, match="rknn_target='rk3588'"):
        get_board("rv1103", {"name": "rv1103", "rknn_target": "rk3588"})
    with pytest.raises(ValueError):
        BoardSettings(name="rv1103", ram_usable_fraction=1.5)


# -- preflight --------------------------------------------------------------------------------------
@pytest.mark.parametrize("board", BOARDS)
def test_preflight_passes_a_small_linear_head_model_on_every_board(onnx_dirs, tmp_path, board):
    metrics = preflight(onnx_dirs["linear"], tmp_path / "out", board)
    report = json.loads((tmp_path / "out" / "preflight.json").read_text())
    assert report["passed"] and report["board"] == board and metrics["board"] == board
    assert report["model"]["input"] == "input0" and report["model"]["input_shape"] == [1, 3, 32, 32]
    assert report["estimates"]["params"] > 0 and report["profile"]["name"] == board
    assert not [f for f in report["findings"] if f["level"] == "error"]


def test_preflight_rejects_a_flatten_for_maixii_dock(onnx_dirs, tmp_path):
    with pytest.raises(StageError) as e:
        preflight(onnx_dirs["flat"], tmp_path / "out", "maixii_dock")
    msg = str(e.value)
    assert "Flatten '/Flatten'" in msg and "(1, 16, 8, 8)" in msg and "awnn" in msg
    assert "model.head=linear" in msg  # what to change
    # the same model is fine where reshapes are no problem
    preflight(onnx_dirs["flat"], tmp_path / "rk", "rv1103")


def test_preflight_rejects_a_head_that_makes_pnnx_reshape(onnx_dirs, tmp_path):
    with pytest.raises(StageError, match=r"ReduceMean '/ReduceMean' consumes the globally pooled tensor"):
        preflight(onnx_dirs["conv"], tmp_path / "out", "maixii_dock")


def test_preflight_rejects_per_channel_normalisation_for_maixii_dock(tmp_path):
    d = export_onnx(tmp_path / "onnx", kind="linear", preprocess={"mean": "imagenet", "std": "imagenet"})
    with pytest.raises(StageError) as e:
        preflight(d, tmp_path / "out", "maixii_dock")
    assert "one mean and one norm" in str(e.value) and "preprocess=uniform" in str(e.value)
    assert "0.485" in str(e.value)
    preflight(d, tmp_path / "rv", "rv1103")  # rknn takes per-channel mean/std


def test_preflight_flags_pow_for_rv1103(onnx_dirs, tmp_path):
    metrics = preflight(onnx_dirs["gem"], tmp_path / "out", "rv1103")
    assert metrics["warnings"] == 1 and metrics["warning_checks"] == ["cpu_fallback"]
    report = json.loads((tmp_path / "out" / "preflight.json").read_text())
    (pow_,) = [f for f in report["findings"] if f["check"] == "cpu_fallback"]
    assert pow_["level"] == "warning" and pow_["message"].startswith("Pow '/Pow_1'")  # the 1/p one, not the p=3
    assert "model.arch=resnet18" in pow_["message"] and "rknn_init" in pow_["message"]
    # strict: warnings fail the stage
    with pytest.raises(StageError, match="Pow '/Pow_1'"):
        stage("preflight", {"board": {"name": "rv1103"}, "strict": True}, {"onnx": onnx_dirs["gem"]}, tmp_path / "s")
    # a board whose runtime has CPU kernels takes it silently
    assert preflight(onnx_dirs["gem"], tmp_path / "rk", "rk3588")["warnings"] == 0


def test_preflight_checks_ram_and_flash_budgets(onnx_dirs, tmp_path):
    # tiny model: 1,443 int8 weights + 5,120 activations = 0.0063 MB; half of 0.004 MB is usable
    with pytest.raises(StageError, match=r"ram: working memory estimate 6.4 KB .* exceeds the budget of 50% of .* RAM "
                                         r"\(0.002 MB\)"):
        preflight(onnx_dirs["linear"], tmp_path / "ram", "rv1103", ram_mb=0.004)
    with pytest.raises(StageError, match=r"flash: model weights 1.4 KB \(1,443 parameters .* "
                                         r"exceeds the flash budget .* \(0.001 MB\).*board.flash_mb"):
        preflight(onnx_dirs["linear"], tmp_path / "flash", "rv1103", flash_mb=0.001)
    # the onnxruntime board has no limits unless the user sets them
    with pytest.raises(StageError, match="ram"):
        preflight(onnx_dirs["linear"], tmp_path / "ort", "onnxruntime", ram_mb=0.01)  # float32: 0.026 MB


def test_preflight_checks_the_bundle_is_consistent(tmp_path):
    d = export_onnx(tmp_path / "onnx", kind="linear")
    (d / "preprocess.json").write_text((d / "preprocess.json").read_text().replace("32", "64"))
    with pytest.raises(StageError, match=r"preprocess.json input_size \[64, 64\] differs from the ONNX input 32x32"):
        preflight(d, tmp_path / "out", "onnxruntime")
    with pytest.raises(StageError, match="model.onnx is missing"):
        preflight(tmp_path, tmp_path / "out2", "onnxruntime")


def test_memory_estimate_is_the_peak_of_live_activations(tmp_path):
    d = export_onnx(tmp_path / "onnx", kind="linear")
    g = analyze(d / "model.onnx")
    # input 3x32x32 + conv 8x16x16 alive together is the peak (then 8x16x16 + 16x8x8, ...)
    assert g.peak_activation_elems == 3 * 32 * 32 + 8 * 16 * 16
    assert g.n_params == sum(p.numel() for p in tiny_net("linear").parameters()) - 1  # GeM's p is unused
    est = get_board("rv1103").estimates(g)
    assert est["working_mb"] == pytest.approx((g.n_params + g.peak_activation_elems) / 2**20, abs=1e-3)


# -- MaixII-Dock: the reshape prediction against pnnx -----------------------------------------------
def _pnnx_reshapes(onnx: Path, work: Path) -> list[str]:
    """Convert with pnnx (as the ncnn stage does) and list the reshape-type layers of the param."""
    from boards.maixii_dock import NCNN_RESHAPE_LAYERS, parse_param

    work.mkdir(parents=True)
    pnnx = Path(sys.executable).with_name("pnnx")
    subprocess.run([str(pnnx), str(onnx), "inputshape=[1,3,32,32]", "fp16=0", f"ncnnparam={work}/m.param",
                    f"ncnnbin={work}/m.bin", f"pnnxparam={work}/p.param", f"pnnxbin={work}/p.bin",
                    f"pnnxpy={work}/p.py", f"pnnxonnx={work}/p.onnx", f"ncnnpy={work}/n.py"],
                   cwd=work, check=True, capture_output=True)
    return [t for t, _ in parse_param(work / "m.param")["layers"] if t in NCNN_RESHAPE_LAYERS]


def _check_prediction(tmp_path: Path, modules: dict) -> None:
    from concurrent.futures import ThreadPoolExecutor

    board = get_board("maixii_dock")
    dirs = {k: export_onnx(tmp_path / k, module=m) for k, m in modules.items()}
    predicted = {k: [f.node for f in board.check_onnx(analyze(d / "model.onnx")) if f.check == "reshape"]
                 for k, d in dirs.items()}
    with ThreadPoolExecutor(2) as pool:
        actual = dict(zip(dirs, pool.map(lambda k: _pnnx_reshapes(dirs[k] / "model.onnx", tmp_path / f"{k}_pnnx"),
                                         dirs)))
    for k in dirs:
        assert bool(predicted[k]) == bool(actual[k]), (k, predicted[k], actual[k])
        assert bool(actual[k]) == (k not in ("linear", "r18_linear", "mnv3_linear")), (k, actual[k])


def test_maixii_reshape_prediction_matches_pnnx(tmp_path):
    """preflight predicts from the ONNX whether the ncnn param pnnx writes holds reshape-type layers
    (which awnn cannot run); the package stage checks the real param. They must agree."""
    _check_prediction(tmp_path, {k: tiny_net(k) for k in ("linear", "conv")})  # ~4 s of pnnx each


@pytest.mark.slow
def test_maixii_reshape_prediction_matches_pnnx_on_the_model_zoo(tmp_path):
    from stages.common.models import build_model

    archs = {"r18_linear": dict(arch="resnet18", stem="small"),
             "r18_conv": dict(arch="resnet18", stem="small", head="conv"),
             "mnv3_linear": dict(arch="mobilenet_v3_small"),
             "mnv3_conv": dict(arch="mobilenet_v3_small", head="conv"),
             "gem_linear": dict(arch="gem_resnet", stem="small")}
    _check_prediction(tmp_path, {**{k: build_model(a, 3).eval() for k, a in archs.items()},
                                 **{k: tiny_net(k) for k in ("flat", "gem")}})


def test_rknn_log_layers_on_the_cpu_fail_the_luckfox_package():
    log = ("D RKNN: [01:05:13.422] ID   OpType             DataType Target InputShape                               "
           "OutputShape            Cycles(DDR/NPU/Total)    RW(KB)       FullName\n"
           "D RKNN: [01:05:13.422] 0    InputOperator      INT8     CPU    \\                                        "
           "(1,3,32,32)            0/0/0                    0            InputOperator:input0\n"
           "D RKNN: [01:05:13.422] 3    Pow                INT8     NPU    (1,8,32,32),(1)                          "
           "(1,8,32,32)            0/0/0                    16           Pow:/pool/Pow\n"
           "D RKNN: [01:05:13.422] 6    Pow                INT8     CPU    (1,8,1,1),(1)                            "
           "(1,8,1,1)              0/0/0                    0            Pow:/pool/Pow_1\n"
           "D RKNN: [01:05:13.422] 9    OutputOperator     INT8     CPU    (1,3)                                    "
           "\\                      0/0/0                    0            OutputOperator:output0\n"
           "D RKNN: [01:05:13.430] Total Internal Memory Size: 40000KB\n"
           "D RKNN: [01:05:13.430] Total Weight Memory Size: 0.8125KB\n")
    found = get_board("rv1103").check_rknn_log(log)
    assert [f.check for f in found] == ["cpu_fallback", "ram"]
    assert "Pow (Pow:/pool/Pow_1)" in found[0].message and found[0].level == "error"
    assert "39.1 MB" in found[1].message and found[1].level == "error"  # > 32 MB (half of 64)
    assert get_board("rv1106").check_rknn_log(log)[1:] == []  # 39 of 64 usable MB
    near = get_board("rv1106", {"name": "rv1106", "ram_mb": 96}).check_rknn_log(log)[1]
    assert near.level == "warning" and "81%" in near.message  # 39 of 48 usable MB


# -- experiments: switching the board on the command line ------------------------------------------
def test_board_override_switches_rknn_target_preflight_and_package(tmp_path):
    from engine.config.compose import compose
    from engine.config.validate import validate

    job = compose(["+experiment=rv1103_mobilenetv3", f"dataset.path={tmp_path}", "board=rv1106"])
    _, specs = validate(job.cfg)
    assert specs["rknn_mmse"].params.target == specs["rknn_normal"].params.target == "rv1106"
    assert (specs["rknn_normal"].params.algorithm, specs["rknn_mmse"].params.algorithm) == ("normal", "mmse")
    assert specs["preflight"].params.board.name == "rv1106" and specs["package"].params.board == "rv1106"
    assert specs["rknn_mmse"].entry.after == specs["rknn_normal"].entry.after == ["preflight"]
    job = compose(["+experiment=v831_resnet18", f"dataset.path={tmp_path}"])
    _, specs = validate(job.cfg)
    assert specs["ncnn"].entry.after == ["preflight"] and specs["package"].params.board == "maixii_dock"
    assert specs["preflight"].params.board.name == "maixii_dock"
