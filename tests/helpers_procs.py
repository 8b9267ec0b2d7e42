"""Helpers for tests that run the CLI as separate processes (locks, SIGKILL): read a process's output
while it runs, wait for a condition, and kill whatever a failing test leaves behind."""

from __future__ import annotations

import threading
import time

# the runner's note (plain output) when another process holds the lock of the stage's key
WAITING = "waiting for another process computing it"


class Output:
    """Collects a spawned CLI's stdout line by line (in a thread) so a test can wait for a line."""

    def __init__(self, proc) -> None:
        self.proc, self.lines, self._new = proc, [], threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()
        with self._new:  # end of output: a waiter need not sit out its timeout
            self._new.notify_all()

    def wait_for(self, text: str, timeout: float = 60) -> None:
        with self._new:
            ok = self._new.wait_for(lambda: any(text in ln for ln in self.lines) or self.proc.poll() is not None,
                                    timeout)
        assert ok and any(text in ln for ln in self.lines), f"never printed {text!r}:\n{self.text()}"

    def finish(self, timeout: float = 120) -> str:
        self.proc.wait(timeout=timeout)
        self._thread.join(timeout)
        return self.text()

    def text(self) -> str:
        return "".join(self.lines)


def until(predicate, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Spawner:
    """ws.spawn with unbuffered output (lines arrive as printed); kill_all() at teardown."""

    def __init__(self, ws, monkeypatch) -> None:
        monkeypatch.setenv("PYTHONUNBUFFERED", "1")
        self.ws, self.started = ws, []

    def __call__(self, *args: str):
        self.started.append(self.ws.spawn(*args))
        return self.started[-1]

    def kill_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
