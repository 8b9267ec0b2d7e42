"""onnx_quantize: ONNX Runtime static int8 (QDQ) through the int8 search contract, on the toy model (a
MobileNetV3-Small trained for a few seconds on 32-px colour pictures, tests/helpers_data.py): the int8
model it ships, checked against the float model run by plain onnxruntime; nodes kept in float; the
candidate cache; the onnx_int8 backend scored by evaluate; the float fallback."""

import json
import shutil

import numpy as np
import onnx
import pytest
from helpers_data import onnx_reference_logits, toy

from backends.base import recognise
from engine.contract.stage import StageError
from engine.run.testing import run_stage

# one calibrator and one subset: each test builds a handful of candidates, ~1 s each
FAST = {"calibrators": ["minmax"], "methods": ["channel", "layer"], "calib_images": [16]}


def quantize(out, scratch=None, calib=None, **params):
    t = toy()
    params = {"search": FAST, **params}
    run_stage("onnx_quantize", params, {"onnx": t.onnx, "calib": calib or t.calib, "data": t.data}, out,
              scratch=scratch)
    return json.loads((out / "search.json").read_text())


@pytest.fixture(scope="module")
def dim_calib(tmp_path_factory):
    """A calibration folder (the real calibration stage) of the toy's training pictures at 60% brightness:
    activation ranges too narrow, so every all-int8 candidate loses about 6 of the 32 val images."""
    from helpers_data import TOY_CLASSES, write_calibration, write_dataset_folder

    t = toy()
    root = tmp_path_factory.mktemp("dim")
    images, labels = np.load(t.data / "images_train.npy")[:32], np.load(t.data / "labels_train.npy")[:32]
    data = write_dataset_folder(root / "data", {"train": ((images * 0.6).astype(np.uint8), labels)}, TOY_CLASSES)
    return write_calibration(data, root / "calib", n=16)


def int8_logits(folder, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input0": x[i:i + 1]})[0] for i in range(len(x))])


def test_int8_model_holds_against_the_float_reference(tmp_path):
    from stages.common.preprocess import Preprocess, normalize

    t = toy()
    search = quantize(tmp_path / "q", max_drop=1.0)
    out = tmp_path / "q"
    # chosen on val (32 images), never the test split evaluate reports
    assert search["selection"] == {"split": "val", "images": 32, "max_drop_points": 1.0,
                                   "float_top1": pytest.approx(search["candidates"][0]["float_top1"])}
    assert search["shipped"] == "int8" and search["chosen"]["label"].startswith("minmax/")
    assert sorted(p.name for p in out.iterdir()) == ["int8.json", "io.json", "labels.txt", "model.onnx",
                                                     "preprocess.json", "quantize.log", "search.json"]
    model = onnx.load(str(out / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    weights = {i.name: i for i in model.graph.initializer}
    int8_weights = [w for w in weights.values() if w.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 50  # every Conv/Gemm weight of the MobileNet
    # what onnxruntime 1.18.1 (the aarch64 board's) reads: IR <= 10, opset <= 21, no contrib ops
    assert model.ir_version <= 10 and all(o.version <= 21 for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    record = json.loads((out / "int8.json").read_text())
    assert record["calibrator"] == "minmax" and record["float_nodes"] == [] and record["selection_split"] == "val"

    # accuracy on the test split, against the float model's predictions through plain onnxruntime
    x = normalize(np.load(t.data / "images_test.npy"), Preprocess.load(t.onnx))
    labels = np.load(t.data / "labels_test.npy")
    ref = onnx_reference_logits(t)
    got = int8_logits(out, x)
    assert not np.allclose(got, ref, atol=1e-4)  # really another model
    agreement = float((got.argmax(1) == ref.argmax(1)).mean())
    assert agreement >= 0.9, agreement
    assert (got.argmax(1) == labels).mean() >= (ref.argmax(1) == labels).mean() - 0.07  # at most 4 of 64 lost


def test_fused_int8_kernels_compute_the_exact_qdq_graph(tmp_path):
    """What evaluate measures here is what an exact integer CPU (ARM) computes: ONNX Runtime's fused x86
    kernels against the same QDQ graph run unfused in float agree within the int8 backend's golden
    tolerance (identical here; with 8-bit weights AVX2 saturates: 12% of the logits' range apart)."""
    import onnxruntime as ort

    from backends.base import by_kind
    from stages.common.preprocess import Preprocess, normalize

    t = toy()
    quantize(tmp_path / "q")
    x = normalize(np.load(t.data / "images_test.npy")[:16], Preprocess.load(t.onnx))
    fused = int8_logits(tmp_path / "q", x)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(tmp_path / "q" / "model.onnx"), so, providers=["CPUExecutionProvider"])
    unfused = np.concatenate([sess.run(None, {"input0": x[i:i + 1]})[0] for i in range(len(x))])
    atol, rtol = by_kind("onnx_int8").golden_tolerance
    diff = float(np.abs(fused - unfused).max())
    assert diff <= atol + rtol * float(fused.max() - fused.min()), diff


def test_excluded_nodes_stay_float(tmp_path):
    from stages.common import ort_quant
    from stages.common.preprocess import Preprocess

    t = toy()
    graph = onnx.load(str(t.onnx / "model.onnx")).graph
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    keep = [convs[0], convs[3]]
    x = ort_quant.calibration_inputs(t.calib, Preprocess.load(t.onnx), 8, seed=0)
    ort_quant.quantize(t.onnx / "model.onnx", tmp_path / "m.onnx", x, "input0", "minmax", True, exclude=keep)
    assert ort_quant.float_nodes(tmp_path / "m.onnx") == set(keep)
    model = onnx.load(str(tmp_path / "m.onnx"))
    init = {i.name: i for i in model.graph.initializer}
    produced_by = {o: n.op_type for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "Conv":
            weight = node.input[1]
            if node.name in keep:  # the float initializer itself
                assert init[weight].data_type == onnx.TensorProto.FLOAT
            else:  # an int8 initializer through DequantizeLinear
                assert produced_by.get(weight) == "DequantizeLinear"


def test_calibration_subset_is_the_one_stratified_sample(tmp_path):
    """ONNX Runtime's calibration subsets are drawn by stages.common.sampling.select, the rule
    rknn_quantize's search and the calibration stage use (no second sampler): the same images, in the
    same order, for every size and seed."""
    from PIL import Image

    from stages.common import ort_quant
    from stages.common.preprocess import Preprocess, normalize
    from stages.common.sampling import select

    t = toy()
    spec = Preprocess.load(t.onnx)
    files, labels = ort_quant.calibration_files(t.calib)
    assert len(set(labels)) > 1  # a class-labelled set: the stratified rule has something to do
    for count, seed in ((5, 0), (7, 3), (len(files), 1)):
        picked = [files[i] for i in select(np.asarray(labels), count, seed)]
        expected = normalize(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in picked]), spec)
        np.testing.assert_array_equal(ort_quant.calibration_inputs(t.calib, spec, count, seed), expected)


def test_hybrid_keeps_the_ranked_nodes_in_float(tmp_path, dim_calib):
    """The dim calibration loses images: the hybrid step ranks the nodes on the images where float and
    int8 disagree most and moves them to float; each candidate's graph has exactly its float nodes."""
    search = quantize(tmp_path / "q", calib=dim_calib, max_drop=1.0,
                      search={**FAST, "methods": ["channel"], "hybrid": {"max_float_layers": 3, "step": 1}})
    first, *hybrid = search["candidates"]
    assert first["float_layers"] == [] and not first["holds"] and first["layers"], first
    ranking = [layer["name"] for layer in first["layers"]]
    assert hybrid and all(c["float_layers"] and set(c["float_layers"]) <= set(ranking) for c in hybrid)
    for c in hybrid:  # each candidate's graph, as it was built, holds exactly its float nodes
        assert sorted(c["facts"]["float_nodes"]) == sorted(c["float_layers"])
    if search["shipped"] == "int8":
        record = json.loads((tmp_path / "q" / "int8.json").read_text())
        assert record["float_nodes"] and set(record["float_nodes"]) == set(search["candidates"][
            search["chosen"]["index"]]["float_layers"])


def test_candidates_are_cached_and_reused(tmp_path, dim_calib):
    scratch = tmp_path / "scratch"
    kw = {"calib": dim_calib, "max_drop": 1.0}
    hybrid = {"max_float_layers": 2, "step": 1}
    one = quantize(tmp_path / "a", scratch=scratch, search={**FAST, "hybrid": hybrid}, **kw)
    assert len(one["candidates"]) >= 3  # two all-int8, then hybrid
    assert [c["cached"] for c in one["candidates"]] == [False] * len(one["candidates"])
    assert len(list((scratch / "candidates").glob("*/model.onnx"))) == len(one["candidates"])
    # the same search again: nothing is built, the same model ships
    two = quantize(tmp_path / "b", scratch=scratch, search={**FAST, "hybrid": hybrid}, **kw)
    assert [c["cached"] for c in two["candidates"]] == [True] * len(two["candidates"])
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    # a wider search reuses what was built and builds only the new candidates
    wider = quantize(tmp_path / "c", scratch=scratch, search={**FAST, "calibrators": ["minmax", "percentile"],
                                                              "hybrid": {"enabled": False}}, **kw)
    cached = {c["label"]: c["cached"] for c in wider["candidates"]}
    assert cached["minmax/channel/16"] and cached["minmax/layer/16"] and not cached["percentile/channel/16"]
    # the output does not depend on the cache: without scratch, the same bytes
    quantize(tmp_path / "d", search={**FAST, "hybrid": hybrid}, **kw)
    assert (tmp_path / "d" / "model.onnx").read_bytes() == (tmp_path / "a" / "model.onnx").read_bytes()


def test_float_ships_when_nothing_holds_and_fail_says_why(tmp_path, dim_calib):
    t = toy()
    nothing = {**FAST, "methods": ["channel"], "hybrid": {"enabled": False}}
    search = quantize(tmp_path / "q", calib=dim_calib, search=nothing)
    assert search["shipped"] == "float" and search["chosen"] is None and search["best"]["label"]
    out = tmp_path / "q"
    assert not (out / "int8.json").exists()
    assert (out / "model.onnx").read_bytes() == (t.onnx / "model.onnx").read_bytes()
    assert recognise(out).kind == "onnx"  # the float model's folder reads as float
    with pytest.raises(StageError) as e:
        quantize(tmp_path / "f", calib=dim_calib, search=nothing, fallback="fail")
    line = str(e.value)
    assert "\n" not in line and "no candidate holds" in line and "best minmax/channel/16" in line


def test_report_shows_the_search_with_the_shipped_candidate_marked(tmp_path, dim_calib):
    """The run's report has a section per onnx_quantize stage, built by the helper rknn_quantize's uses:
    the candidates tried with the shipped one marked and why; when nothing holds, why, and the best
    candidate's worst nodes. run.json's metrics (so `edgepipe show`) say the same."""
    from helpers_browser import HtmlPage

    from engine.report.page import REPORT_HTML
    from engine.report.run_report import write_report
    from engine.store.runs import RunRecord, StageRecord

    t = toy()
    shipped = run_stage("onnx_quantize", {"search": FAST}, {"onnx": t.onnx, "calib": t.calib, "data": t.data},
                        tmp_path / "int8")
    nothing = {**FAST, "methods": ["channel"], "hybrid": {"enabled": False}}
    float_ships = run_stage("onnx_quantize", {"search": nothing}, {"onnx": t.onnx, "calib": dim_calib,
                                                                    "data": t.data}, tmp_path / "float")
    good, bad = (json.loads((tmp_path / f / "search.json").read_text()) for f in ("int8", "float"))
    assert good["chosen"] and bad["chosen"] is None and bad["candidates"][0]["layers"]
    assert shipped["search"]["chosen"] == good["chosen"]["label"] and shipped["search"]["why"] == good["reason"]
    assert float_ships["search"] == {"chosen": None, "why": bad["reason"], "tried": "minmax/channel/16: missed"}

    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("pipeline:\n  stages:\n    q_int8: {uses: onnx_quantize}\n"
                                                    "    q_float: {uses: onnx_quantize}\n")
    record = RunRecord(name="onnx-int8", run_dir=str(run_dir), runs_root=str(tmp_path / "runs"), status="ok",
                       stages={"q_int8": StageRecord("q_int8", "onnx_quantize", "ran", path=str(tmp_path / "int8")),
                               "q_float": StageRecord("q_float", "onnx_quantize", "ran",
                                                      path=str(tmp_path / "float"))})
    write_report(record)
    text = " ".join(" ".join(HtmlPage((run_dir / REPORT_HTML).read_text(encoding="utf-8")).text).split())
    assert "int8 build (q_int8)" in text and "int8 build (q_float)" in text, text
    chosen = good["candidates"][good["chosen"]["index"]]
    assert f"{chosen['label']} shipped" in text and good["reason"] in text
    assert bad["reason"] in text and "shipped" not in text[text.index("int8 build (q_float)"):]
    assert "Worst layers of the best candidate, minmax/channel/16 (each node reverted to float alone)" in text
    scored = [x for x in bad["candidates"][0]["layers"] if x["cosine_alone"] is not None]
    assert scored and min(scored, key=lambda x: x["cosine_alone"])["name"] in text


def test_onnx_int8_backend_is_recognised_and_scored_by_evaluate(tmp_path):
    t = toy()
    quantize(tmp_path / "q")
    int8 = tmp_path / "q"
    assert recognise(int8).kind == "onnx_int8" and recognise(t.onnx).kind == "onnx"
    # without int8.json the same folder is a float ONNX folder: the float backend's folders stay its own
    plain = tmp_path / "plain"
    shutil.copytree(int8, plain)
    (plain / "int8.json").unlink()
    assert recognise(plain).kind == "onnx"

    run_stage("evaluate", {}, {"data": t.data, "onnx": t.onnx, "onnx_int8": int8}, tmp_path / "eval")
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())["backends"]
    assert rows["onnx"]["kind"] == "onnx" and rows["onnx_int8"]["kind"] == "onnx_int8"
    row = rows["onnx_int8"]
    # scored against the float ONNX reference with the quantized target, on the test split
    assert row["target"].startswith("top-1 drop <=") and row["agreement"] >= 0.9
    labels = np.load(t.data / "labels_test.npy")
    from stages.common.preprocess import Preprocess, normalize

    x = normalize(np.load(t.data / "images_test.npy"), Preprocess.load(t.onnx))
    assert row["top1"] == pytest.approx(float((int8_logits(int8, x).argmax(1) == labels).mean()))
