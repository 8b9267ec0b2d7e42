"""`package`: a converted model -> a folder and a zip ready to copy to a board.

Inputs
- ``model`` (required): a model bundle of the format the board takes: an ``export_onnx`` folder
  (onnxruntime), an ``ncnn`` folder (maixii_dock), an ``rknn_quantize`` folder (rv1103, rv1106,
  rk3566, rk3588). Its ``preprocess.json`` and ``labels.txt`` travel with it.
- ``eval`` (optional): an ``evaluate`` folder; its per-backend accuracy goes into the manifest. With
  ``package.enforce_targets`` (on in the built-in experiments) a shipped model that missed its target
  there (the rows whose ``model_digest`` is the ``model`` input's) is refused: engine.contract.stage.Refusal,
  one line naming the row with evaluate's verdict (for a quantized build: net images lost, the 95%
  interval, the images the target allows) and the next step (ship a build that holds, score more test
  images, quantize.search), nothing written; rows of models only compared (RKNN ``normal`` beside the
  shipped ``mmse``) are reported by evaluate, never fatal here.
- ``calib`` (optional; required for maixii_dock): a ``calibration`` folder; MaixHub quantizes with
  its ``images/``.
- ``data`` (optional): the ``dataset`` folder; a class-stratified sample of its test images becomes the package's golden
  samples (``golden/``, manifest ``selftest``) for ``infer.py --selftest`` / ``./rknn_classify
  --selftest`` on the board (boards/golden.py). RKNN packages take the expected outputs from the
  ``rknn_quantize`` stage's simulator run (its ``data`` input must be wired too).

Config section ``package`` (conf/package/default.yaml: ``board: ${board.name}``); a pipeline entry
overrides it with ``with: {board: rv1103}``. The ``board`` section's limits apply when it names the
same board.

Outputs: ``package/`` (the board's files, README.md and ``manifest.json``) and ``package.zip`` (the
same files under one folder, deterministic: fixed timestamps).
What each board's package holds is written by its profile (boards/<name>.py, ``write_package``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from backends.base import by_kind, registered
from boards import BoardName, BoardSettings, Finding, PackageContext, get_board, write_zip
from boards.golden import GoldenError, write_golden
from engine.contract.hashing import sha256_file
from engine.contract.stage import Input, Params, Refusal, Stage, StageError
from stages.common.bundle import FORWARD, check_bundle, read_io, read_labels

PACKAGE_FORMAT = "edgepipe.package/1"


class Package(Stage):
    name = "package"
    # 2: the manifest's accuracy says whether each backend met its target (target_met)
    # 3: preprocess.py is stages/common/preprocess_numpy.py (numpy + Pillow only); selftest.py and golden/ samples
    # 4: the packaged preprocess.py shares InputGeometry with the host model
    # 5: golden outputs through the backend registry (ONNX Runtime with 1 thread), RKNN READMEs name the board row;
    # 6: the C demo reads labels.txt whole (a long label no longer splits in two), READMEs name `selftest --emulate`
    # 7: the onnxruntime package records which model ships (manifest `quantization`, notes) and an int8
    #    ONNX model's golden samples take int8's tolerance
    # 8: the maixii_dock package says in its manifest (`quantization`) and notes that MaixHub makes the int8 model
    # 9: the golden samples' `source` says when they are quantize.data_limit's stratified sample
    # 10: golden samples are a seeded class-stratified sample of the test split (manifest `rows`), not its first
    #     images (one or two classes: the split is stored in class order)
    version = 10
    inputs = {
        "model": Input(required=True, doc="model bundle: export_onnx, ncnn or rknn_quantize folder"),
        "eval": Input(required=False, doc="evaluate folder (metrics.json): accuracy per backend in the manifest"),
        "calib": Input(required=False, doc="calibration folder (images/): required for maixii_dock"),
        "data": Input(required=False,
                      doc="dataset folder: a class-stratified sample of its test images becomes the self-test's "
                          "golden samples"),
    }
    sections = {"board_settings": "board"}
    # rknn-toolkit2 writes different model.rknn bytes for the same build (see rknn_quantize); the
    # manifest and the zip carry its sha256. Left out of the output digest, like rknn_quantize does.
    volatile_outputs = ("package/model.rknn", "package/manifest.json", "package.zip")
    # its scripts and C sources run under `edgepipe selftest` and on the board: a package from
    # cache.remote is taken only when signed (README "Trust model")
    outputs_execute = True

    class Params(Params):
        # the board to package for (conf/package/default.yaml: ${board.name})
        board: BoardName = "onnxruntime"
        # classes shown per image by the generated scripts
        top_k: int = Field(5, ge=1)
        # run the board's checks on the converted model (flash size, reshape layers, CPU layers)
        check: bool = True
        # the `board` section (limits); applied when it names the same board
        board_settings: BoardSettings | None = None
        # refuse (exit 1, nothing written) a model that missed evaluate's targets (the `eval` input);
        # false: packaged anyway, the miss noted and in the manifest's accuracy
        enforce_targets: bool = False

    def run(self, p: Package.Params, inputs, out: Path, ctx) -> dict[str, Any]:
        from stages.common.preprocess import Preprocess

        settings = p.board_settings if p.board_settings and p.board_settings.name == p.board else None
        board = get_board(p.board, settings)
        model_dir = inputs["model"]
        model_file = _model_file(board, model_dir)
        # the model file too: a model.onnx is checked before anything reads it (stages.common.onnx_files)
        check_bundle(model_dir, (model_file.name, *FORWARD), input="model", hint="model bundles carry it forward")
        spec = Preprocess.load(model_dir)
        io = read_io(model_dir)
        needs_io = by_kind(board.model_format).needs_io
        if needs_io and not io:
            raise StageError(f"input model: {model_dir / 'io.json'} is missing ({needs_io})")
        findings = _check_model(board, model_dir, model_file, p.check)
        _check_targets(inputs.get("eval"), ctx, p.enforce_targets, board.name)

        pkg_dir = out / "package"
        pkg_dir.mkdir()
        pkg = PackageContext(board=board, model_dir=model_dir, model_file=model_file, spec=spec, io=io,
                             labels=read_labels(model_dir), pkg=pkg_dir, calib_dir=inputs.get("calib"),
                             data_dir=inputs.get("data"), top_k=p.top_k,
                             notes=[f.message for f in findings if f.level != "info"])
        ctx.progress(None, None, f"writing the {board.title} package")
        try:  # first: its notes reach the README
            selftest = write_golden(pkg, pkg.data_dir, c_demo="main.c" in board.package_files)
        except GoldenError as e:
            raise StageError(f"input data: {e}") from None
        try:
            board.write_package(pkg)
        except (ValueError, FileNotFoundError) as e:
            raise StageError(f"package for {board.name}: {e}") from None

        accuracy = _accuracy(inputs["eval"]) if "eval" in inputs else {}
        manifest = _manifest(pkg, findings, accuracy, selftest, {name: _source(ctx, name) for name in sorted(inputs)})
        (pkg_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

        top = f"edgepipe_{board.name}"
        members = [(f"{top}/{f.relative_to(pkg_dir)}", f) for f in sorted(pkg_dir.rglob("*")) if f.is_file()]
        write_zip(out / "package.zip", members)
        return {"board": board.name, "files": len(members), "model_mb": round(model_file.stat().st_size / 2**20, 3),
                "zip_mb": round((out / "package.zip").stat().st_size / 2**20, 3),
                **{f"acc_{b}": v["top1"] for b, v in accuracy.items() if isinstance(v.get("top1"), (int, float))}}


def _model_file(board, model_dir: Path) -> Path:
    """The model file of the board's format in the `model` input (its format is a backend kind,
    backends/); a one-line error naming what the folder holds otherwise."""
    fmt = board.model_format
    backend = by_kind(fmt)
    model_file = model_dir / backend.model_file
    if not model_file.is_file():
        found = [b.kind for b in registered() if b.companion_of is None and b.recognises(model_dir)]
        raise StageError(
            f"board {board.name} ({board.title}) takes a {fmt} model ({backend.model_file}), but the `model` input "
            f"{model_dir} holds {', '.join(found) + ' model' if found else 'no model file'}; wire package's "
            f"`model` to a {backend.producer} stage")
    return model_file


def _check_model(board, model_dir: Path, model_file: Path, enforce: bool) -> list[Finding]:
    """The board's checks (flash size, reshape layers, CPU layers); errors stop the stage when enforced."""
    try:
        findings = board.check_package(model_dir, model_file)
    except ValueError as e:
        raise StageError(f"input model: {e}") from None
    errors = [f for f in findings if f.level == "error"]
    if errors and enforce:
        raise StageError(f"{model_file.name} does not fit {board.title}:\n"
                         + "\n".join(f"  - {f.check}: {f.message}" for f in errors)
                         + "\n  (package.check=false packages it anyway)")
    return findings


def _check_targets(eval_dir: Path | None, ctx, enforce: bool, board: str) -> None:
    """A shipped model that missed evaluate's target: refused when enforced, else noted. The shipped
    rows are those evaluate scored from this very model folder (same engine digest)."""
    if eval_dir is None:
        if enforce:
            raise StageError("package.enforce_targets=true needs the `eval` input: wire package's `eval` to the "
                             "evaluate stage that scores the shipped model (or set package.enforce_targets=false)")
        return
    digest = ctx.sources.get("model", {}).get("digest")
    rows = _eval_rows(eval_dir)
    shipped = {name: row for name, row in rows.items() if digest and row.get("model_digest") == digest}
    if not shipped:
        if enforce:
            raise StageError("package.enforce_targets=true, but the evaluate stage (input eval) did not score the "
                             "shipped model (input model): add it to that stage's needs, or set "
                             "package.enforce_targets=false")
        return
    missed = [f"{name} {row['missed']}" for name, row in shipped.items() if row.get("missed")]
    if missed and enforce:
        gated = any("allowed_images" in row for row in shipped.values() if row.get("missed"))
        raise Refusal(f"{'; '.join(missed)}: the {board} package is not written (package.enforce_targets=true)"
                      + (_next_step(rows, shipped) if gated else ""))
    for line in missed:
        ctx.note(f"{line}: packaged anyway (package.enforce_targets=false)")


def _next_step(rows: dict[str, dict[str, Any]], shipped: dict[str, dict[str, Any]]) -> str:
    """What to do about a quantized build that missed: ship one evaluate found holding (named by its
    evaluate input, which the built-in pipelines name like the stage), score more images, or search."""
    kinds = {row.get("kind") for row in shipped.values()}
    holding = [row.get("input", name) for name, row in rows.items()
               if name not in shipped and row.get("target_met") is True and "allowed_images" in row
               and row.get("kind") in kinds]
    ship = (f"ship {holding[0]}, which holds it (pipeline.stages.package.needs.model={holding[0]})" if holding
            else "ship another build (pipeline.stages.package.needs.model=<its stage>)")
    return f". Next: {ship}, score more test images, or let quantize.search try builds until one holds"


def _eval_rows(eval_dir: Path) -> dict[str, dict[str, Any]]:
    """evaluate's metrics.json rows by backend ({} without them); a missing file is a one-line error."""
    path = eval_dir / "metrics.json"
    if not path.is_file():
        raise StageError(f"input eval: {path} is missing (wire package's `eval` to an evaluate stage)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise StageError(f"input eval: {path} is not JSON ({e})") from None
    table = data.get("backends", data) if isinstance(data, dict) else {}
    return {k: v for k, v in table.items() if isinstance(v, dict)} if isinstance(table, dict) else {}


def _manifest(pkg: PackageContext, findings: list[Finding], accuracy: dict, selftest, sources: dict) -> dict[str, Any]:
    """package/manifest.json: the board, the model and its input/output, preprocessing, accuracy,
    sources, checks, notes, every file's sha256 and the self-test."""
    board, spec, io, model_file = pkg.board, pkg.spec, pkg.io, pkg.model_file
    files = {str(f.relative_to(pkg.pkg)): sha256_file(f) for f in sorted(pkg.pkg.rglob("*")) if f.is_file()}
    return {
        "format": PACKAGE_FORMAT,
        "board": {k: board.facts()[k] for k in ("name", "title", "soc", "runtime", "quantizer",
                                                 "quantizer_options", "deploy_script")},
        "model": {"file": _packaged_name(board.model_format, model_file, files), "format": board.model_format,
                  "sha256": sha256_file(model_file), "bytes": model_file.stat().st_size},
        "input": {"name": io.get("input"), "shape": io.get("input_shape", spec.input_shape),
                  "size_hw": [spec.height, spec.width], "resize": spec.resize,
                  "interpolation": spec.interpolation, "channel_order": spec.channel_order,
                  "on_board": board.input_layout},
        "output": {"name": io.get("output"), "classes": len(pkg.labels)},
        "normalisation": board.normalisation_for(spec),
        "preprocess": spec.to_dict(),
        "labels": pkg.labels,
        "accuracy": accuracy,
        "source": sources,
        "checks": [f.model_dump() for f in findings],
        "notes": pkg.notes,
        "files": files,
        "selftest": selftest,
        **pkg.extra_manifest,
    }


def _packaged_name(kind: str, model_file: Path, files: dict) -> str:
    """The model file's name in the package: its backend's packaged name when the board wrote it there."""
    name = by_kind(kind).packaged_as
    return name if name in files else model_file.name


def _source(ctx, name: str) -> dict[str, Any]:
    """Where an input came from: stage type, pipeline name, cache key and output digest, as the engine
    hands them over (ctx.sources; nothing machine-specific: the manifest must not change between machines)."""
    return {k: v for k, v in ctx.sources.get(name, {}).items() if k in ("type", "stage", "key", "digest")}


def _accuracy(eval_dir: Path) -> dict[str, dict[str, Any]]:
    """Per-backend numbers from an evaluate folder's metrics.json: {backend: {top1: ..., ...}}."""
    out: dict[str, dict[str, Any]] = {}
    for backend, m in _eval_rows(eval_dir).items():
        if any(k in m for k in ("top1", "accuracy")):
            # scalars only (not per-class tables or confusion matrices); target_met is a bool, missed
            # the one-line miss; model_digest is the engine's, not the model's
            out[backend] = {k: v for k, v in m.items()
                            if isinstance(v, (int, float, str, bool)) and k != "model_digest"}
            if "top1" not in out[backend] and "accuracy" in m:
                out[backend]["top1"] = m["accuracy"]
    return out
