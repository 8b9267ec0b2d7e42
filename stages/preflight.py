"""`preflight`: check the exported ONNX against the target board before any slow conversion.

Input ``onnx``: an ``export_onnx`` folder (model.onnx, io.json, preprocess.json). Params: the ``board``
section (conf/board/NAME.yaml: ``name`` plus optional limits), pulled in through ``sections``, and
``strict``. The ``preprocess`` section is pulled in too, so that what the board cannot take in it
(per-channel normalisation on MaixII-Dock) is a config error at validation, before training starts.
Reads the graph with the ``onnx`` package only (milliseconds to a second), runs the board profile's
checks (boards/), and

- fails with a StageError listing every error (the operator or limit, and what to change);
- writes ``preflight.json`` (board facts, estimates, every finding) and returns the warnings as
  metrics, so `edgepipe runs` shows them.

Conversion stages that must not start on a model the board cannot take list it in their pipeline
entry: ``after: [preflight]`` (ordering only; not an input, not part of their cache key).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

from boards import BoardSettings, Finding, get_board
from engine.contract.stage import NOT_IN_KEY, Input, Params, Stage, StageError
from stages.common.preprocess import Preprocess


class Preflight(Stage):
    name = "preflight"
    peak_memory_mb = 300  # MB, for run --jobs: onnx only (~0.3 GB measured)
    version = 1
    inputs = {"onnx": Input(required=True, doc="export_onnx folder: model.onnx, io.json, preprocess.json")}
    sections = {"board": "board", "preprocess": "preprocess"}

    class Params(Params):
        # the `board` section: which board and its tunable limits
        board: BoardSettings = BoardSettings()
        # fail on warnings too (CPU-fallback operators, limits above 80 %)
        strict: bool = False
        # the `preprocess` section, for the checks at validation (check() below); run() reads the
        # input's preprocess.json, which the input digest already covers: not in the key
        preprocess: Annotated[Preprocess | None, NOT_IN_KEY] = None

    @classmethod
    def check(cls, p: Preflight.Params) -> Iterable[tuple[str, str]]:
        try:
            board = get_board(p.board.name, p.board)
        except ValueError as e:  # board.rknn_target that is not the board's
            return [("board.rknn_target", str(e).removeprefix("board.rknn_target="))]
        if p.preprocess is None:
            return []
        return [(f"preprocess.{field}", problem) for field, problem in board.preprocess_problems(p.preprocess)]

    def run(self, p: Preflight.Params, inputs, out: Path, ctx) -> dict[str, Any]:
        from boards.graph import analyze

        src = inputs["onnx"]
        model = src / "model.onnx"
        if not model.is_file():
            raise StageError(f"input onnx: {model} is missing (wire preflight's `onnx` to an export_onnx stage)")
        spec = Preprocess.load(src) if (src / "preprocess.json").is_file() else None
        io = json.loads((src / "io.json").read_text()) if (src / "io.json").is_file() else None

        board = get_board(p.board.name, p.board)
        ctx.progress(None, None, f"checking {model.name} for {board.title}")
        try:
            graph = analyze(model)
        except Exception as e:  # noqa: BLE001 - an unreadable model is the user's to fix
            raise StageError(f"input onnx: cannot read {model}: {e}") from None
        findings = board.check_onnx(graph, spec, io)
        strict = p.strict or p.board.strict
        errors = [f for f in findings if f.level == "error" or (strict and f.level == "warning")]
        warnings = [f for f in findings if f.level == "warning"]

        report = {
            "board": board.name,
            "title": board.title,
            "model": {"input": graph.input_name, "input_shape": list(graph.input_shape or []),
                      "output": graph.output_name, "output_shape": list(graph.output_shape or []),
                      "opset": graph.opset, "ops": dict(sorted(graph.op_types().items())),
                      "file_mb": round(graph.file_bytes / 2**20, 3)},
            "estimates": board.estimates(graph),
            "limits": {"flash_mb": board.flash_mb, "ram_mb": board.ram_mb,
                       "ram_usable_fraction": board.ram_usable_fraction},
            "strict": strict,
            "passed": not errors,
            "findings": [f.model_dump() for f in findings],
            "profile": board.facts(),
        }
        (out / "preflight.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        for f in warnings:
            ctx.log.warning("preflight %s: %s", board.name, f.line())
        if errors:
            raise StageError(_message(board.title, errors))
        return {
            "board": board.name,
            "warnings": len(warnings),
            "warning_checks": sorted({f.check for f in warnings}),
            "warning_messages": [f.message for f in warnings],
            "model_mb_est": report["estimates"]["model_mb"],
            "working_mb_est": report["estimates"]["working_mb"],
        }


def _message(title: str, errors: list[Finding]) -> str:
    lines = [f"the model does not fit {title} ({len(errors)} problem{'s' if len(errors) > 1 else ''}):"]
    lines += [f"  - {f.level if f.level != 'error' else f.check}: {f.message}" for f in errors]
    return "\n".join(lines)
