"""Send everything the process prints -- native code included -- to a log file for a while.

rknn-toolkit2 (and other converters) print from C/C++ code straight to file descriptors 1 and 2, so
``verbose=False`` or swapping ``sys.stdout`` alone does not keep the terminal clean. ``quiet`` points
the process's fd 1 and fd 2 at a log file (``os.dup2``), and ``sys.stdout``/``sys.stderr`` at those fds,
for the duration of a ``with`` block, then puts everything back -- also when the block raises.

    from stages.common.native_output import quiet

    with quiet(out / "rknn.log"):
        rknn.build(...)                # Python prints, logging, tqdm and printf() all land in the log

Notes
- Process-wide: output of *other threads* during the block goes to the log too. Keep blocks around
  the third-party calls only, and call ``ctx.progress``/``ctx.note`` outside them.
- The log is opened in append mode, so several blocks (build, analysis, inference) share one file.
- Blocks nest: an inner block redirects to its own file and restores the outer one.
- C stdio buffers are flushed (``fflush(NULL)``) on entry and exit, so text a native library buffered
  before the block does not end up in the log, and text it printed inside does not reach the terminal
  later.
- ``sys.stdout``/``sys.stderr`` are replaced by streams that write to *fd* 1/2 and are never closed:
  a library that grabbed ``sys.stderr`` inside the block (rknn-toolkit2 creates its logging handler
  on first use) keeps a valid stream afterwards, one that writes wherever fd 2 points at the time.
- A library that created a ``logging.StreamHandler`` *before* the block (rknn-toolkit2 does so when
  ``rknn.api`` is imported) holds whatever ``sys.stderr`` was then: under a progress display or
  pytest that object may not write to fd 2 at all. ``reroute_logger("rknnLogger")`` points such
  handlers at ``CurrentStderr()``, which writes to ``sys.stderr`` as it is at each call.
- For a subprocess, pass ``stdout=``/``stderr=`` to ``subprocess.run`` instead; ``quiet`` also works
  (children inherit fds 1/2).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["quiet", "active", "CurrentStderr", "reroute_logger"]

_lock = threading.RLock()
_depth = 0
_fd_streams: dict[int, io.TextIOWrapper] = {}


def _libc_fflush() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except Exception:  # noqa: BLE001 - non-glibc platforms
        pass


def _fd_stream(fd: int) -> io.TextIOWrapper:
    """A text stream over file descriptor ``fd`` that never closes it (one per fd, reused)."""
    stream = _fd_streams.get(fd)
    if stream is None:
        raw = io.BufferedWriter(io.FileIO(fd, "w", closefd=False))
        stream = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", line_buffering=True, write_through=True)
        _fd_streams[fd] = stream
    return stream


def _flush_python(*streams) -> None:
    for s in streams:
        try:
            if s is not None:
                s.flush()
        except Exception:  # noqa: BLE001 - flushing is best effort: a stream that cannot flush is left as it is
            pass


def active() -> bool:
    """True while some ``quiet`` block is redirecting this process's output."""
    return _depth > 0


@contextlib.contextmanager
def quiet(log_path: str | Path, header: str | None = None) -> Iterator[Path]:
    """Redirect fd 1/2 and ``sys.stdout``/``sys.stderr`` into ``log_path`` (appended) inside the block.

    ``header``, when given, is written to the log first (e.g. ``"== build"``). Yields the log path.
    """
    global _depth
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock:
        old_out, old_err = sys.stdout, sys.stderr
        _flush_python(old_out, old_err, sys.__stdout__, sys.__stderr__)
        _libc_fflush()
        log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        saved_out = saved_err = -1
        try:
            if header:
                os.write(log_fd, (header.rstrip("\n") + "\n").encode("utf-8", "replace"))
            saved_out = os.dup(1)
            saved_err = os.dup(2)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
        except BaseException:
            for fd in (saved_out, saved_err):
                if fd >= 0:
                    os.close(fd)
            os.close(log_fd)
            raise
        sys.stdout, sys.stderr = _fd_stream(1), _fd_stream(2)
        _depth += 1
    try:
        yield path
    finally:
        with _lock:
            _flush_python(sys.stdout, sys.stderr, _fd_streams.get(1), _fd_streams.get(2))
            _libc_fflush()
            try:
                os.dup2(saved_out, 1)
                os.dup2(saved_err, 2)
            finally:
                os.close(saved_out)
                os.close(saved_err)
                os.close(log_fd)
                sys.stdout, sys.stderr = old_out, old_err
                _depth -= 1


class CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is at the time of each call."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return False


def reroute_logger(name: str) -> None:
    """Point the plain ``StreamHandler``s of logger ``name`` at ``CurrentStderr()`` (see the notes)."""
    import logging

    for handler in logging.getLogger(name).handlers:
        if type(handler) is logging.StreamHandler and not isinstance(handler.stream, CurrentStderr):
            try:
                handler.setStream(CurrentStderr())
            except Exception:  # noqa: BLE001 - a closed old stream cannot be flushed
                handler.stream = CurrentStderr()
