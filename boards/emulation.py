"""A package's self-test on its board's instruction set, on this machine: user-mode emulation.

qemu-user (Debian's ``qemu-user-static``) runs ARM binaries one process at a time, no kernel and no VM;
the ARM userland they need (a Debian ``bookworm`` root with Python 3.11, made by ``debootstrap
--foreign`` and unpacked with ``dpkg-deb -x``: the second stage would need binfmt_misc) and the
PyPI wheels a package needs on the board are built once and kept in the user's cache folder::

    ~/.cache/edgepipe/emulation/rootfs-<arch>-<recipe digest>/   (or $EDGEPIPE_EMULATION_CACHE)
    ~/.cache/edgepipe/emulation/site-<arch>-<recipe digest>/     (wheels unzipped: the PYTHONPATH)

each built in a temp folder beside it and renamed into place under a lock, so a second ``make test``
or ``edgepipe selftest --emulate`` reuses it. What a board family needs (its instruction set, Debian
packages, wheels, the self-test command) is an ``Emulation`` kept on the family's class
(``BoardProfile.emulation``); this module only knows how to build and run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from boards.errors import EmulationError as EmulationError  # re-exported: raised here

CACHE_ENV = "EDGEPIPE_EMULATION_CACHE"
SUITE = "bookworm"  # Debian 12: Python 3.11, glibc 2.36 (what Raspberry Pi OS and RK35 boards' Debian ship)
MIRROR = "http://deb.debian.org/debian"
PYTHON_VERSION = "3.11"
# bump when the way a userland is built changes (its folders are then built again)
ROOTFS_FORMAT = 2


@dataclass(frozen=True)
class Arch:
    debian: str  # Debian's architecture name
    qemu: str  # the qemu-user binary that runs it
    wheel_platforms: tuple[str, ...]  # PyPI platform tags of its wheels (none: Debian's packages only)
    cross_gcc: str | None = None  # Debian's cross compiler for C packages
    processor: str = ""  # CMAKE_SYSTEM_PROCESSOR of its CMake toolchain file


ARCHES = {
    "arm64": Arch("arm64", "qemu-aarch64-static",
                  ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64"),
                  processor="aarch64"),
    # PyPI has no armv7l wheels of numpy/Pillow: armhf userlands take Debian's python3-numpy/-pil
    "armhf": Arch("armhf", "qemu-arm-static", (), "arm-linux-gnueabihf-gcc", "arm"),
}
# the Debian package behind each tool, for the one-line `apt-get install` a missing tool gets
APT_PACKAGE = {"qemu-aarch64-static": "qemu-user-static", "qemu-arm-static": "qemu-user-static",
               "debootstrap": "debootstrap", "dpkg-deb": "dpkg", "arm-linux-gnueabihf-gcc": "gcc-arm-linux-gnueabihf",
               "cmake": "cmake"}


@dataclass(frozen=True)
class Emulation:
    """How a board family's package runs under qemu-user (kept on the family's class)."""

    arch: str  # a key of ARCHES
    debs: tuple[str, ...] = ("python3",)  # Debian packages of the userland (their dependencies come along)
    wheels: tuple[str, ...] = ()  # PyPI wheels for the arch, pinned (unzipped onto PYTHONPATH)
    # the self-test, run in the package folder; "python3" is the userland's Python. Empty: `cannot` says why
    command: tuple[str, ...] = ()
    # a printed line that marks where emulation ends (the NPU), with what it means
    stops_at: str = ""
    stops_note: str = ""
    cannot: str = ""  # why the emulator cannot run this board's self-test
    # a C program the package's CMakeLists.txt builds and its self-test command, run under qemu-user
    # against a stand-in runtime (boards/stand_in) after `command`
    c_selftest: tuple[str, ...] = ()
    checks: str = ""  # what the emulated run proves, and what is left for the board

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise ValueError(f"unknown emulated architecture {self.arch!r}; known: {', '.join(ARCHES)}")


# -- the cache --------------------------------------------------------------------------------------
def cache_root() -> Path:
    named = os.environ.get(CACHE_ENV)
    if named:
        return Path(named).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgepipe" / "emulation"


def _digest(recipe: Mapping) -> str:
    text = json.dumps(recipe, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def missing_tools(arch: str, compiler: bool = False) -> list[str]:
    """Debian packages of the tools that building and running ``arch`` need, those not on PATH
    (``compiler``: also those that build a package's C program)."""
    a = ARCHES[arch]
    tools = [a.qemu, "debootstrap", "dpkg-deb"] + ([a.cross_gcc, "cmake"] if compiler and a.cross_gcc else [])
    return sorted({APT_PACKAGE[t] for t in tools if not shutil.which(t)})


def install_hint(packages: Sequence[str]) -> str:
    return f"sudo apt-get install -y {' '.join(packages)}"


def _cached(name: str, build) -> Path:
    """``root/name``, made by ``build(temp folder)`` once: built beside it, renamed into place, under a
    lock (two processes never build the same folder; a killed build leaves only its temp folder, removed
    by the next build)."""
    from engine.contract.locks import held

    root = cache_root()
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with held(root / ".locks" / f"{name}.lock"):
        if final.is_dir():
            return final
        for stale in root.glob(f".tmp-{name}-*"):  # a killed build's (we hold the lock: nobody else builds it)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".tmp-{name}-{os.getpid()}"
        tmp.mkdir()
        print(f"emulation: building {final} (first use; about a minute, with network)", file=sys.stderr, flush=True)
        try:
            build(tmp)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _run_logged(cmd: list[str], log: Path, what: str) -> None:
    with open(log, "ab") as out:
        out.write(("$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise EmulationError(f"{what} failed (exit {r.returncode}: {tail[0][:200]}); the log is {log}", status=1)


def _as_root(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return cmd
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n", *cmd]
    raise EmulationError(f"building the ARM userland needs root for debootstrap: run it once as root or with "
                         f"passwordless sudo ({' '.join(cmd[:2])} ...)")


def rootfs(emu: Emulation) -> Path:
    """The Debian userland of ``emu`` (its Python and ``debs``), built on first use (~30 s and ~150 MB)."""
    recipe = {"arch": emu.arch, "suite": SUITE, "debs": sorted(emu.debs), "format": ROOTFS_FORMAT}
    name = f"rootfs-{emu.arch}-{_digest(recipe)}"

    def build(tmp: Path) -> None:
        log = cache_root() / f"{name}.log"
        log.unlink(missing_ok=True)
        target = tmp / "root"
        _run_logged(_as_root(["debootstrap", "--foreign", f"--arch={emu.arch}", "--variant=minbase",
                              f"--include={','.join(sorted(emu.debs))}", SUITE, str(target), MIRROR]),
                    log, f"debootstrap of the {emu.arch} userland")
        if os.geteuid() != 0:
            _run_logged(["sudo", "-n", "chown", "-R", f"{os.getuid()}:{os.getgid()}", str(target)], log, "chown")
        archives = target / "var" / "cache" / "apt" / "archives"
        for deb in sorted(archives.glob("*.deb")):  # the second stage needs binfmt_misc: unpacking is enough
            _run_logged(["dpkg-deb", "-x", str(deb), str(target)], log, f"unpacking {deb.name}")
            deb.unlink()
        _link_alternatives(target)
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=1))

    return _cached(name, build) / "root"


def _link_alternatives(root: Path) -> None:
    """The links update-alternatives would make (a package's postinst, never run here): numpy's
    libblas.so.3 / liblapack.so.3 live in usr/lib/<triplet>/{blas,lapack}/."""
    for lib in sorted(root.glob("usr/lib/*/*/lib*.so.*")):
        if lib.parent.name in ("blas", "lapack") and not (lib.parent.parent / lib.name).exists():
            (lib.parent.parent / lib.name).symlink_to(Path(lib.parent.name) / lib.name)


def site(emu: Emulation) -> Path | None:
    """``emu.wheels`` for its architecture and Python, unzipped into one folder (None: no wheels)."""
    if not emu.wheels:
        return None
    arch = ARCHES[emu.arch]
    if not arch.wheel_platforms:
        raise EmulationError(f"PyPI has no {emu.arch} wheels to take; list Debian packages in debs instead")
    recipe = {"arch": emu.arch, "python": PYTHON_VERSION, "wheels": sorted(emu.wheels)}
    name = f"site-{emu.arch}-{_digest(recipe)}"

    def build(tmp: Path) -> None:
        log = cache_root() / f"{name}.log"
        log.unlink(missing_ok=True)
        wheels = tmp / "wheels"
        platforms = [x for p in arch.wheel_platforms for x in ("--platform", p)]
        # --no-deps: the pins are the whole list (the host's resolver would pick x86-only extras)
        _run_logged([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps",
                     *platforms, "--python-version", PYTHON_VERSION, "--implementation", "cp",
                     "-d", str(wheels), *sorted(emu.wheels)], log, f"downloading the {emu.arch} wheels")
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(tmp / "site")
        shutil.rmtree(wheels)
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=1))

    return _cached(name, build) / "site"


# -- running ----------------------------------------------------------------------------------------
def python_command(emu: Emulation) -> list[str]:
    """The userland's Python 3.11, run by qemu-user (absolute paths it opens are looked up in the
    userland first: qemu's -L)."""
    root = rootfs(emu)
    return [ARCHES[emu.arch].qemu, "-L", str(root), str(root / "usr" / "bin" / f"python{PYTHON_VERSION}")]


def python_env(emu: Emulation, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an emulated Python: only the userland's packages and the wheels (nothing of
    this machine's Python leaks in), no bytecode written into the package."""
    wheels = site(emu)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update({"PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1", "LC_ALL": "C.UTF-8"})
    if wheels is not None:
        env["PYTHONPATH"] = str(wheels)
    env.update(extra or {})
    return env


def run_python(emu: Emulation, args: Sequence[str | Path], cwd: Path,
               env: Mapping[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python3 ARGS`` in ``cwd`` on the emulated board."""
    return subprocess.run([*python_command(emu), *map(str, args)], cwd=cwd, env=python_env(emu, env),
                          capture_output=True, text=True, timeout=timeout)


def cross_compile(emu: Emulation, sources: Sequence[Path], out: Path, flags: Sequence[str] = (),
                  libs: Sequence[str] = ()) -> None:
    """Build C sources for the board with Debian's cross compiler; a warning is an error (-Werror)."""
    gcc = ARCHES[emu.arch].cross_gcc
    if gcc is None:
        raise EmulationError(f"no cross compiler is known for {emu.arch}")
    cmd = [gcc, "-O2", "-Wall", "-Wextra", "-Werror", *flags, *map(str, sources), "-o", str(out), *libs]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines() or [""]
        first = next((line for line in lines if "error" in line), lines[0])
        raise EmulationError(f"{gcc} failed: {first}", status=1)


def cmake_toolchain(emu: Emulation, folder: Path) -> Path:
    """A CMake toolchain file for Debian's cross compiler of ``emu``'s architecture (its sysroot is
    /usr/<triplet>), written into ``folder``."""
    arch = ARCHES[emu.arch]
    if arch.cross_gcc is None:
        raise EmulationError(f"no cross compiler is known for {emu.arch}")
    triplet = arch.cross_gcc.removesuffix("-gcc")
    path = folder / f"{triplet}.cmake"
    path.write_text(f"""# Debian's {triplet} cross compiler (boards/emulation.py)
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR {arch.processor})
set(CMAKE_C_COMPILER {arch.cross_gcc})
set(CMAKE_FIND_ROOT_PATH /usr/{triplet})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
""")
    return path


def cmake_build(emu: Emulation, source: Path, work: Path, defines: Mapping[str, str]) -> Path:
    """A package's C program built by its own CMakeLists.txt (its flags, its install rules) for ``emu``'s
    instruction set, with Debian's cross compiler through a toolchain file: configured in work/build,
    installed into work/install (returned). A failure is one line, the compiler's first error."""
    source, work = Path(source).resolve(), Path(work).resolve()
    build, install = work / "build", work / "install"
    toolchain = cmake_toolchain(emu, work)
    steps = [("configure", ["cmake", "-S", str(source), "-B", str(build), f"-DCMAKE_TOOLCHAIN_FILE={toolchain}",
                            *(f"-D{k}={v}" for k, v in defines.items())]),
             ("build", ["cmake", "--build", str(build)]),
             ("install", ["cmake", "--install", str(build), "--prefix", str(install)])]
    for what, cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            lines = [line.strip() for line in (r.stdout + r.stderr).splitlines() if line.strip()] or [""]
            at = next((i for i, line in enumerate(lines) if "error" in line.lower()), len(lines) - 1)
            first = " ".join(lines[at:at + 2]) if lines[at].startswith("CMake Error") else lines[at]
            raise EmulationError(f"{source / 'CMakeLists.txt'}: the {emu.arch} {what} failed: {first}", status=1)
    return install


def run_binary(emu: Emulation, args: Sequence[str | Path], cwd: Path, env: Mapping[str, str] | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """An ARM executable on the emulated board, its C library from the cross compiler's sysroot."""
    gcc = ARCHES[emu.arch].cross_gcc
    if gcc is None:
        raise EmulationError(f"no cross compiler (and so no C library) is known for {emu.arch}")
    sysroot = Path("/usr") / gcc.removesuffix("-gcc")  # Debian's cross libc: /usr/arm-linux-gnueabihf
    return subprocess.run([ARCHES[emu.arch].qemu, "-L", str(sysroot), *map(str, args)], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


# -- `edgepipe selftest PACKAGE [--emulate]` ---------------------------------------------------------
def package_folder(path: Path, scratch: Path) -> Path:
    """The package folder behind PATH: the folder itself, a package stage's output (its package/), or
    package.zip unpacked into ``scratch``."""
    path = Path(path)
    if path.is_file() and path.suffix == ".zip":
        try:
            with zipfile.ZipFile(path) as zf:
                for member in zf.namelist():  # a zip naming files outside its folder is not a package
                    if member.startswith("/") or ".." in Path(member).parts:
                        raise EmulationError(f"{path}: member {member!r} points outside the package; rebuild it")
                zf.extractall(scratch)
        except zipfile.BadZipFile as e:
            raise EmulationError(f"{path}: not a zip file ({e}); copy the package again") from None
        # the package stage's zip holds one folder, edgepipe_<board>/
        path = next((d for d in [scratch, *sorted(scratch.iterdir())] if (d / "manifest.json").is_file()), scratch)
    if (path / "package" / "manifest.json").is_file():
        return path / "package"
    if not (path / "manifest.json").is_file():
        raise EmulationError(f"{path}: not an edgepipe package (no manifest.json); give the package folder, "
                             f"its package.zip, or the package stage's output folder")
    return path
