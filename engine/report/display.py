"""What the user sees in the terminal: a rich progress display while stages run, one row per running
stage (`run --jobs N` runs several at once); one line per finished stage, and a line naming the
stages running whenever more than one does, when the output is not a terminal; a summary table at
the end. Stage threads and the relay of worker processes call it at the same time: a lock keeps
each call whole."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.store.runs import RunRecord, StageRecord, flat_metrics

STATUS_STYLE = {"cached": "green", "ran": "cyan", "failed": "bold red", "skipped": "yellow",
                "will run": "cyan", "pending": "dim",
                "ok": "green", "running": "yellow"}

PLAIN_EVERY = 15.0  # seconds between progress lines per stage when the output is not a terminal

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


# C0 controls but tab and newline, DEL, C1 controls (ESC starts CSI and OSC sequences: colours, links,
# a rewritten title or clipboard), and the Unicode marks that reorder how text reads
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def plain(value: Any) -> str:
    """A value from run.json, a manifest, a config or a stage's error as text a terminal shows as it
    is: every control character written out (ESC as \\x1b), so none of them reaches the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", str(value))


def safe(value: Any) -> str:
    """plain(value) for Rich: its markup (`[/]`, `[link=...]`) escaped too, so it is shown, not applied."""
    return escape(plain(value))


def headline_metric(metrics: dict) -> str:
    """The first two result numbers of a stage (timings and sizes left out) for the summary table."""
    flat = [(k, v) for k, v in flat_metrics(metrics).items()
            if isinstance(v, float) and not k.endswith(("seconds", "_s", "_mb", "bytes"))]
    return ", ".join(f"{safe(k)}={v:.4g}" for k, v in flat[:2])


class Display:
    """Progress for one run. Live (animated) on a terminal, plain lines otherwise (CI, pipes)."""

    def __init__(self, title: str, stages: Iterable[str]) -> None:
        self.live = console.is_terminal
        self.title = title
        self._tasks: dict[str, int] = {}
        self._last_plain: dict[str, float] = {}
        self._running: list[str] = []
        self._order = {name: i for i, name in enumerate(stages)}  # running stages listed in pipeline order
        self._lock = threading.RLock()
        if self.live:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                SpinnerColumn(), TextColumn("[bold]{task.fields[stage]:<14}"), BarColumn(bar_width=24),
                TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True,
            )
            self.progress.start()
        else:
            console.print(f"edgepipe: {safe(title)}")

    def started(self, rec: StageRecord) -> None:
        with self._lock:
            self._running.append(rec.name)
            self._running.sort(key=lambda name: self._order.get(name, len(self._order)))
            if self.live:
                self._tasks[rec.name] = self.progress.add_task(safe(rec.type), stage=safe(rec.name), total=None)
            elif len(self._running) > 1:
                console.print(f"  running  {', '.join(map(safe, self._running))}")

    def update(self, name: str, completed: float | None = None, total: float | None = None,
               description: str | None = None, important: bool = False) -> None:
        with self._lock:
            self._update(name, completed, total, description, important)

    def _update(self, name: str, completed: float | None, total: float | None, description: str | None,
                important: bool) -> None:
        description = None if description is None else safe(description)
        if self.live and name in self._tasks:
            kw = {k: v for k, v in (("completed", completed), ("total", total), ("description", description))
                  if v is not None}
            self.progress.update(self._tasks[name], **kw)
            if important and description:
                self.progress.console.print(f"  {safe(name)}: {description}")
        elif description and not self.live:
            # Plain output (CI, pipes): notes always, progress at most every PLAIN_EVERY seconds.
            now = time.monotonic()
            if important or now - self._last_plain.get(name, -PLAIN_EVERY) >= PLAIN_EVERY:
                self._last_plain[name] = now
                console.print(f"  {safe(name)}: {description}")

    def finished(self, rec: StageRecord) -> None:
        with self._lock:
            if rec.name in self._running:
                self._running.remove(rec.name)
            self._finished(rec)

    def _finished(self, rec: StageRecord) -> None:
        if self.live and rec.name in self._tasks:
            self.progress.remove_task(self._tasks.pop(rec.name))
        style = STATUS_STYLE.get(rec.status, "")
        extra = f"  {safe(rec.error)}" if rec.error else (f"  ({safe(rec.reason)})" if rec.status == "skipped" else "")
        line = f"  [{style}]{safe(rec.status):<8}[/] {safe(rec.name):<16} {rec.seconds:7.1f} s{extra}"
        (self.progress.console if self.live else console).print(line)

    def close(self) -> None:
        if self.live:
            self.progress.stop()


def summary(record: RunRecord) -> None:
    table = Table(title=f"{safe(record.name)} — {safe(record.status)}", title_justify="left")
    for col in ("stage", "status", "seconds", "key", "metrics"):
        table.add_column(col, justify="right" if col == "seconds" else "left", no_wrap=col != "metrics")
    for s in record.stages.values():
        table.add_row(safe(s.name), styled_status(s.status), f"{s.seconds:.1f}",
                      safe((s.key or "")[:8]), headline_metric(s.metrics))
    console.print(table)
    console.print(f"run folder: {safe(record.run_dir)}")
    for s in record.stages.values():
        if s.error:
            err_console.print(f"[bold red]{safe(s.name)} failed:[/] {safe(s.error)}")


def styled_status(status: Any) -> str:
    """A status in its colour, as Rich markup (one read from run.json shown as text)."""
    return f"[{STATUS_STYLE.get(status, '')}]{safe(status)}[/]" if isinstance(status, str) else safe(status)
