"""Calling rknn-toolkit2 from a stage: its output into a log, its failures as one line.

``toolkit(log, header)`` wraps toolkit calls: everything the toolkit prints (native code included)
goes to ``log`` (``stages.common.native_output``), its scratch files (``check*.onnx``) into a temp folder,
and an exception it raises becomes ``ToolkitFailure`` naming the call (``config``, ``build``,
``init_runtime``, ...). ``ok(call, ret)`` turns a non-zero return code into one. ``reason(failure,
log)`` is the one-line why: the exception's last ``XxxError: message`` line, else the log's last
``E`` line. ``logged_exception(log, since)`` finds an exception the toolkit only logged. ``PeakRss``
samples this process's resident memory while a build runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.contract.stage import StageError
from stages.common.errors import ToolkitFailure as ToolkitFailure  # re-exported: raised here

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def ok(what: str, ret: Any) -> Any:
    if isinstance(ret, int) and not isinstance(ret, bool) and ret != 0:
        raise ToolkitFailure(what, None)
    return ret


@contextlib.contextmanager
def toolkit(log_path: Path, header: str | None) -> Iterator[None]:
    """``quiet`` around toolkit calls; an exception the toolkit raises becomes ``ToolkitFailure``."""
    from stages.common.native_output import quiet

    # The toolkit writes check*.onnx (and more) into the working folder: give it a scratch one.
    cwd = os.getcwd()
    scratch = tempfile.mkdtemp(prefix="edgepipe-rknn-")
    try:
        with quiet(log_path, header=header), warnings.catch_warnings():
            # the toolkit's Python warnings (pkg_resources deprecation, ...) belong in its log too
            warnings.simplefilter("default")
            warnings.showwarning = _warning_to_stderr
            os.chdir(scratch)
            yield
    except (ToolkitFailure, StageError):
        raise
    except Exception as e:  # the toolkit raises ValueError/RuntimeError/... with tracebacks
        what = "rknn-toolkit2"
        for frame in reversed(_frames(e.__traceback__)):
            if frame.f_code.co_name in _CALLS:
                what = frame.f_code.co_name
                break
        raise ToolkitFailure(what, e) from e
    finally:
        os.chdir(cwd)
        shutil.rmtree(scratch, ignore_errors=True)


def _warning_to_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


_CALLS = ("config", "load_onnx", "build", "export_rknn", "accuracy_analysis", "init_runtime", "inference")


def _frames(tb) -> list:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def reason(failure: ToolkitFailure, log_path: Path) -> str:
    """One line: the exception's last 'XxxError: message' line, else the log's last error line (also when
    the exception says no more than its type: the toolkit logs the why, then raises a bare RuntimeError)."""
    said = _from_exception(failure.exc) if failure.exc is not None else None
    if said is None or re.fullmatch(r"\w*(?:Error|Exception)", said):
        return _from_log(log_path) or said or "the toolkit returned an error"
    return said


def _from_exception(exc: BaseException) -> str | None:
    text = _ANSI.sub("", str(exc))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = re.match(r"^(?:[\w]+\.)*(\w*(?:Error|Exception)): (.+)$", ln)
        if m:  # "google.protobuf.message.DecodeError: Error parsing message" -> "DecodeError: ..."
            generic = m.group(1) in ("ValueError", "RuntimeError", "Exception", "AssertionError")
            return _short(m.group(2) if generic else f"{m.group(1)}: {m.group(2)}")
    return _short(lines[-1]) if lines else type(exc).__name__


def _from_log(log_path: Path) -> str | None:
    """The log's last 'E ...' line that is neither a traceback header nor the version banner."""
    try:
        log = _ANSI.sub("", log_path.read_text(errors="replace"))
    except OSError:
        return None
    for ln in reversed(log.splitlines()):
        m = re.match(r"^E (.+)$", ln.strip())
        if m and not m.group(1).startswith("rknn-toolkit2 version") and not m.group(1).endswith(
                "Traceback (most recent call last):"):
            call, _, rest = m.group(1).partition(": ")  # "init_runtime: why": the message names the call already
            return _short(rest if call in _CALLS and rest else m.group(1))
    return None


# ``E`` lines rknn-toolkit2 logs during builds that complete with a sound model: not failures. Each with
# where it was seen and why it is harmless.
BENIGN_ERRORS = (
    # 2.5.0, every rk3566 build of MobileNetV3-Small at 224 px (normal, kl_divergence, mmse; channel and
    # layer): RKNNModelBuildPass logs "E RKNN: Unkown op target: 0" after warning that the classifier's
    # Reshape shape tensors have no qtype; every layer of its layer table still has a target (NPU or CPU)
    # and the build's simulator top-1 on the real-photo test split equals rv1103's (bench/real_photos.py)
    "Unkown op target: 0",
)


def logged_exception(log_path: Path, since: int = 0) -> str | None:
    """One line for an exception the toolkit logged after byte ``since`` of its log (a traceback or an
    ``E`` line other than BENIGN_ERRORS) though the call returned success, else None: some toolkit
    versions log one inside mmse and still write a (worse) model."""
    try:
        with open(log_path, "rb") as f:
            f.seek(since)
            text = _ANSI.sub("", f.read().decode(errors="replace"))
    except OSError:
        return None
    lines = [ln.strip() for ln in text.splitlines()]
    errors = [ln for ln in lines if re.match(r"^E \S", ln) and not ln.startswith("E rknn-toolkit2 version")
              and not any(ln.endswith(benign) for benign in BENIGN_ERRORS)]
    if not errors and not any(ln.startswith("Traceback (most recent call last)") for ln in lines):
        return None
    for ln in reversed(lines):
        m = re.match(r"^(?:E \S+: )?(?:[\w]+\.)*(\w*(?:Error|Exception)): (.+)$", ln)
        if m:
            return _short(f"{m.group(1)}: {m.group(2)}")
    return _short(errors[-1][2:]) if errors else "a traceback"


def _short(s: str, limit: int = 240) -> str:
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("rknn-toolkit2")
    except metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def maxrss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


class PeakRss:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)

    def _sample(self, proc) -> None:
        while True:
            try:
                self.peak = max(self.peak, proc.memory_info().rss)
            except Exception:  # noqa: BLE001
                return
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        import psutil

        proc = psutil.Process()
        self.peak = proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, args=(proc,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return False
