"""What the user sees in the terminal: a rich progress display while stages run, one row per running
stage (`run --jobs N` runs several at once); one line per finished stage, and a line naming the
stages running whenever more than one does, when the output is not a terminal; a summary table at
the end. Stage threads and the relay of worker processes call it at the same time: a lock keeps
each call whole."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from rich.console import Console
from rich.table import Table

from engine.store.runs import RunRecord, StageRecord, flat_metrics

STATUS_STYLE = {"cached": "green", "ran": "cyan", "failed": "bold red", "skipped": "yellow",
                "will run": "cyan", "pending": "dim",
                "ok": "green", "running": "yellow"}

PLAIN_EVERY = 15.0  # seconds between progress lines per stage when the output is not a terminal

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def headline_metric(metrics: dict) -> str:
    """The first two result numbers of a stage (timings and sizes left out) for the summary table."""
    flat = [(k, v) for k, v in flat_metrics(metrics).items()
            if isinstance(v, float) and not k.endswith(("seconds", "_s", "_mb", "bytes"))]
    return ", ".join(f"{k}={v:.4g}" for k, v in flat[:2])


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
            console.print(f"edgepipe: {title}")

    def started(self, rec: StageRecord) -> None:
        with self._lock:
            self._running.append(rec.name)
            self._running.sort(key=lambda name: self._order.get(name, len(self._order)))
            if self.live:
                self._tasks[rec.name] = self.progress.add_task(rec.type, stage=rec.name, total=None)
            elif len(self._running) > 1:
                console.print(f"  running  {', '.join(self._running)}")

    def update(self, name: str, completed: float | None = None, total: float | None = None,
               description: str | None = None, important: bool = False) -> None:
        with self._lock:
            self._update(name, completed, total, description, important)

    def _update(self, name: str, completed: float | None, total: float | None, description: str | None,
                important: bool) -> None:
        if self.live and name in self._tasks:
            kw = {k: v for k, v in (("completed", completed), ("total", total), ("description", description))
                  if v is not None}
            self.progress.update(self._tasks[name], **kw)
            if important and description:
                self.progress.console.print(f"  {name}: {description}")
        elif description and not self.live:
            # Plain output (CI, pipes): notes always, progress at most every PLAIN_EVERY seconds.
            now = time.monotonic()
            if important or now - self._last_plain.get(name, -PLAIN_EVERY) >= PLAIN_EVERY:
                self._last_plain[name] = now
                console.print(f"  {name}: {description}")

    def finished(self, rec: StageRecord) -> None:
        with self._lock:
            if rec.name in self._running:
                self._running.remove(rec.name)
            self._finished(rec)

    def _finished(self, rec: StageRecord) -> None:
        if self.live and rec.name in self._tasks:
            self.progress.remove_task(self._tasks.pop(rec.name))
        style = STATUS_STYLE.get(rec.status, "")
        extra = f"  {rec.error}" if rec.error else (f"  ({rec.reason})" if rec.status == "skipped" else "")
        line = f"  [{style}]{rec.status:<8}[/] {rec.name:<16} {rec.seconds:7.1f} s{extra}"
        (self.progress.console if self.live else console).print(line)

    def close(self) -> None:
        if self.live:
            self.progress.stop()


def summary(record: RunRecord) -> None:
    table = Table(title=f"{record.name} — {record.status}", title_justify="left")
    for col in ("stage", "status", "seconds", "key", "metrics"):
        table.add_column(col, justify="right" if col == "seconds" else "left", no_wrap=col != "metrics")
    for s in record.stages.values():
        table.add_row(s.name, f"[{STATUS_STYLE.get(s.status, '')}]{s.status}[/]", f"{s.seconds:.1f}",
                      (s.key or "")[:8], headline_metric(s.metrics))
    console.print(table)
    console.print(f"run folder: {record.run_dir}")
    for s in record.stages.values():
        if s.error:
            err_console.print(f"[bold red]{s.name} failed:[/] {s.error}")
