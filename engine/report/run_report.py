"""A run's report.md (a table of its stages, the targets it missed, its errors) and its report.html,
written at the end of every run and by `edgepipe report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.contract.markdown import code, escape  # values are text, never markup
from engine.store.runs import RunRecord, flat_metrics


def write_report(record: RunRecord) -> None:
    from engine.report import page  # matplotlib and jinja2 load only when a report is written

    lines = [f"# {escape(record.name)}", "", f"- folder: {code(record.run_dir)}",
             f"- status: **{escape(record.status)}**",
             f"- seconds: {record.seconds:.1f}"]
    if record.overrides:
        lines.append(f"- overrides: {code(' '.join(record.overrides))}")
    if record.headline:
        lines.append(f"- headline: {escape(record.headline['key'])} = {escape(record.headline['value'])}")
    if record.edgepipe_version:
        lines.append(f"- edgepipe {escape(record.edgepipe_version)}, configs from: "
                     + ", ".join(code(s['folder']) for s in record.config_sources))
    lines += ["", "| stage | type | status | seconds | key | metrics |", "|---|---|---|---|---|---|"]
    for s in record.stages.values():
        metrics = ", ".join(f"{k}={_short(v)}" for k, v in flat_metrics(s.metrics).items())
        lines.append(f"| {escape(s.name)} | {escape(s.type)} | {escape(s.status)} | {s.seconds:.1f} | "
                     f"{code(s.key or '')} | {escape(metrics)} |")
    missed = [(s.name, backend, text) for s in record.stages.values()
              if isinstance((s.metrics or {}).get("missed"), dict)
              for backend, text in s.metrics["missed"].items()]  # evaluate's misses, shipped or not
    if missed:
        lines += ["", "## Targets missed", ""] + [f"- {escape(st)}: **{escape(b)}** {escape(text)}"
                                                  for st, b, text in missed]
    gates = int8_verdicts(record)
    if gates:
        lines += ["", "## int8 builds against fp32", ""] + [f"- {escape(st)}: **{escape(b)}** {escape(text)}"
                                                            for st, b, text in gates]
    errors = [s for s in record.stages.values() if s.error]
    if errors:
        lines += ["", "## Errors", ""] + [f"- **{escape(s.name)}**: {escape(s.error)}" for s in errors]
    lines += ["", "Stage outputs are linked under `stages/`; the exact config is in `.hydra/`.", ""]
    (Path(record.run_dir) / "report.md").write_text("\n".join(lines))
    page.write_html(record)


def int8_verdicts(record: RunRecord) -> list[tuple[str, str, str]]:
    """(stage, backend, "holds: ..." / "misses: ...") for every row evaluate judged with the int8 gate,
    read from its metrics.json (the verdict in images, the interval, and whether the split resolves it)."""
    found = []
    for s in record.stages.values():
        if s.type != "evaluate" or not s.path:
            continue
        try:
            rows = json.loads((Path(s.path) / "metrics.json").read_text(encoding="utf-8")).get("backends") or {}
        except (OSError, ValueError, AttributeError):
            continue
        found += [(s.name, name, f"{'holds' if row.get('target_met') else 'misses'}: {row['verdict']}")
                  for name, row in rows.items() if isinstance(row, dict) and isinstance(row.get("verdict"), str)]
    return found


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
