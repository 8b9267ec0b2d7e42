"""Cheap stages for the engine's tests (registered through EDGEPIPE_PLUGINS=engine_stages).

Each execution appends '<stage name> <key params>' to the file named by $EDGEPIPE_TEST_COUNTER, so
tests can count how often a stage really ran across processes and sweeps."""

from __future__ import annotations

import os
import time
from typing import Annotated

from engine.contract.stage import NOT_IN_KEY, ContentPath, Input, Params, Refusal, Stage, StageError


def _count(ctx, what: str) -> None:
    counter = os.environ.get("EDGEPIPE_TEST_COUNTER")
    if counter:
        with open(counter, "a") as f:
            f.write(f"{ctx.stage} {what}\n")


class Source(Stage):
    name = "t_source"
    tools = ("pyyaml",)  # a real installed distribution: its version is in the key (tests fake an upgrade)

    class Params(Params):
        value: int = 1
        # Neither changes the output, so neither is in the cache key.
        sleep: Annotated[float, NOT_IN_KEY] = 0.0
        chatter: Annotated[int, NOT_IN_KEY] = 0
        # hold the stage (and its cache lock) until this file exists: lets a test make two processes
        # overlap for certain instead of hoping a sleep is long enough
        wait_for: Annotated[str | None, NOT_IN_KEY] = None

    def run(self, p, inputs, out, ctx):
        _count(ctx, f"value={p.value}")
        (out / "started").write_text("")  # a killed run must not leave this in the cache
        time.sleep(p.sleep)
        deadline = time.monotonic() + 120
        while p.wait_for and not os.path.exists(p.wait_for):
            if time.monotonic() > deadline:
                raise StageError(f"t_source.wait_for: {p.wait_for} did not appear within 120 s")
            time.sleep(0.02)
        (out / "value.txt").write_text(str(p.value))
        return {"value": p.value}


class Scale(Stage):
    name = "t_scale"
    config_section = "scale"
    inputs = {"x": Input(doc="a folder with value.txt")}

    class Params(Params):
        factor: int = 2
        modulo: int | None = None  # lets a test make different params give identical outputs
        sleep: float = 0.0

    def run(self, p, inputs, out, ctx):
        _count(ctx, f"factor={p.factor}")
        time.sleep(p.sleep)
        v = int((inputs["x"] / "value.txt").read_text()) * p.factor
        if p.modulo:
            v %= p.modulo
        (out / "value.txt").write_text(str(v))
        (out / "run.log").write_text(f"computed at {time.time()}\n")  # volatile: not in the digest
        return {"value": float(v)}


class Add(Stage):
    name = "t_add"
    extra_inputs = True

    def run(self, p, inputs, out, ctx):
        _count(ctx, "")
        total = sum(int((d / "value.txt").read_text()) for d in inputs.values())
        (out / "value.txt").write_text(str(total))
        return {"sum": float(total)}


class Fail(Stage):
    name = "t_fail"
    inputs = {"x": Input(required=False)}

    class Params(Params):
        message: str = "this stage always fails"
        refuse: bool = False  # raise engine.contract.stage.Refusal: independent stages still run

    def run(self, p, inputs, out, ctx):
        _count(ctx, "")
        (out / "partial.txt").write_text("half")
        raise (Refusal if p.refuse else StageError)(p.message)


class Folder(Stage):
    name = "t_folder"

    class Params(Params):
        path: ContentPath

    def run(self, p, inputs, out, ctx):
        _count(ctx, "")
        if not p.path.is_dir():
            raise StageError(f"t_folder.path: {p.path} is not a folder")
        names = sorted(f.name for f in p.path.iterdir() if f.is_file())
        (out / "value.txt").write_text(str(sum(len((p.path / n).read_bytes()) for n in names)))
        return {"files": len(names)}


class Noisy(Stage):
    """A non-deterministic stage, like an RKNN build or training on another machine: new bytes on every
    run, and a score that moves by $EDGEPIPE_TEST_DRIFT (default 0) from 0.5. Its build time varies
    too, and is a timing, never a result."""

    name = "t_noisy"
    deterministic = False
    inputs = {"x": Input(required=False)}

    def run(self, p, inputs, out, ctx):
        _count(ctx, "")
        (out / "model.bin").write_bytes(os.urandom(16))
        return {"score": 0.5 + float(os.environ.get("EDGEPIPE_TEST_DRIFT", "0")), "build_s": time.time() % 1000}


class Meet(Stage):
    """For `run --jobs N` tests: appends '<stage> start|end <time> <pid>' to $EDGEPIPE_TEST_SPANS, and
    with `meet: OTHER` waits (up to 60 s) until stage OTHER has started, so a test knows two stages ran
    at the same time without timing anything. `hold_for` keeps it running until a file exists;
    `memory_mb` is its declared peak memory."""

    name = "t_meet"
    inputs = {"x": Input(required=False)}

    class Params(Params):
        factor: int = 1
        meet: Annotated[str | None, NOT_IN_KEY] = None
        hold_for: Annotated[str | None, NOT_IN_KEY] = None
        memory_mb: Annotated[int, NOT_IN_KEY] = 0

    @classmethod
    def peak_memory(cls, params):
        return params.memory_mb or cls.peak_memory_mb

    def run(self, p, inputs, out, ctx):
        spans = os.environ["EDGEPIPE_TEST_SPANS"]
        _count(ctx, f"factor={p.factor}")
        with open(spans, "a") as f:
            f.write(f"{ctx.stage} start {time.time()} {os.getpid()}\n")
        (out / "started").write_text("")  # an interrupted run must not leave this in the cache
        deadline = time.monotonic() + 60
        while p.meet and f"{p.meet} start" not in open(spans).read():
            if time.monotonic() > deadline:
                raise StageError(f"t_meet.meet: stage {p.meet} did not start within 60 s")
            time.sleep(0.02)
        while p.hold_for and not os.path.exists(p.hold_for):
            time.sleep(0.02)
        value = sum(int((d / "value.txt").read_text()) for d in inputs.values()) + p.factor
        (out / "value.txt").write_text(str(value))
        with open(spans, "a") as f:
            f.write(f"{ctx.stage} end {time.time()} {os.getpid()}\n")
        return {"value": float(value)}
