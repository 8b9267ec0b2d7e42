"""adb, the connection rknn-toolkit2 uses to run a model on a board (``init_runtime(target=...,
device_id=...)``), checked before a stage spends minutes building for it.

``executable()`` is adb on PATH, else the copy rknn-toolkit2 ships (``rknn/3rdparty/platform-tools``);
``devices(adb)`` what ``adb devices`` lists; ``check_connected(serial, key)`` a one-line StageError
naming the config key, the serial and what adb sees (or that adb is missing and how to get it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

from engine.contract.stage import StageError


def executable() -> str | None:
    """adb on PATH, else the one rknn-toolkit2 ships, else None."""
    found = shutil.which("adb")
    if found:
        return found
    import importlib.util

    spec = importlib.util.find_spec("rknn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(folder) / "3rdparty" / "platform-tools" / "adb" / "linux-x86_64" / "adb"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    return None


def devices(adb: str) -> list[str]:
    """'SERIAL (state)' of every device `adb devices` lists. An adb server this call had to start is
    stopped again (the toolkit starts its own when it connects)."""
    was_running = server_running()
    try:
        res = subprocess.run([adb, "devices"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise StageError(f"`{adb} devices` failed: {e}") from None
    finally:
        if not was_running:
            subprocess.run([adb, "kill-server"], capture_output=True, timeout=30)
    rows = [ln.split() for ln in res.stdout.splitlines()[1:] if ln.strip() and not ln.startswith("*")]
    return [f"{r[0]} ({r[1]})" if len(r) > 1 else r[0] for r in rows]


def server_running() -> bool:
    """Whether an adb server listens on its port (ANDROID_ADB_SERVER_PORT, default 5037)."""
    port = int(os.environ.get("ANDROID_ADB_SERVER_PORT", "5037"))
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def seen() -> str:
    """What `adb devices` lists, for a message: 'A (device), B (offline)', 'no device', or that adb is missing."""
    adb = executable()
    if adb is None:
        return "nothing (adb is not installed)"
    return ", ".join(devices(adb)) or "no device"


def check_connected(serial: str, key: str) -> None:
    """A one-line StageError unless `adb devices` lists ``serial`` as a ready device: what it sees, or
    that adb is missing and how to get it. ``key`` is the config key that named the serial."""
    adb = executable()
    if adb is None:
        raise StageError(f"{key}={serial}: adb is not installed (neither on PATH nor in rknn-toolkit2): install "
                         f"it (Debian/Ubuntu: apt-get install adb), connect the board by USB and check with "
                         f"`adb devices`")
    listed = devices(adb)
    if f"{serial} (device)" in listed:
        return
    raise StageError(f"{key}={serial}: the board is not connected; `adb devices` ({adb}) lists "
                     f"{', '.join(listed) or 'no device'}: connect it by USB (or `adb connect IP:5555`), start "
                     f"rknn_server on it and use a serial `adb devices` shows")
