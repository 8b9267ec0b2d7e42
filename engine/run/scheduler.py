"""Independent stages of one run at the same time (`edgepipe run --jobs N --max-memory SIZE`).

Readiness comes from graphlib.TopologicalSorter (prepare / get_ready / done). Each started stage gets
a thread of this process, which does what it does at --jobs 1 (the per-key lock, the cache lookup,
the temp folder, publishing), while the stage's own `run` goes to a worker process
(concurrent.futures.ProcessPoolExecutor with one spawned worker, kept for later stages so heavy
imports are paid once per worker): torch stages in threads of one process would share one OpenMP
pool, rknn-toolkit2 is not known to be thread-safe, and a process that dies (out of memory) takes
only its own stage with it. Each worker gets cores/jobs OpenMP/MKL threads (unless OMP_NUM_THREADS
is set), so two torch processes on two cores do not spin against each other. Progress and log
records come back to this process through one queue.

A stage is started only when its declared peak memory (`Stage.peak_memory`) fits the budget left
by the stages running; one larger than the whole budget runs alone, with a warning.
"""

from __future__ import annotations

import bisect
import concurrent.futures as cf
import graphlib
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

log = logging.getLogger("edgepipe")

MAX_DEFAULT_JOBS = 4  # the widest point of the built-in pipelines: ncnn, preflight, rknn normal and mmse
MEMORY_FRACTION = 0.75  # of the memory available when the run starts: the default --max-memory
TERMINATE_GRACE_S = 10.0  # an interrupted worker's time to unwind (end its own children) before SIGKILL
_UNITS = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}


# ---------------------------------------------------------------------------------------- settings
def cpu_count() -> int:
    """The cores this process may use (its affinity, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_jobs() -> int:
    """min(4, cores // 2): each worker keeps at least two threads, because a stage running alone on
    one thread (training, while the others wait for it) loses more than parallel branches gain;
    on 2 cores this is 1, the in-process path. No built-in pipeline has more than four stages that can
    run at once."""
    return max(1, min(MAX_DEFAULT_JOBS, cpu_count() // 2))


def default_memory_mb() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**20 * MEMORY_FRACTION


def parse_size(text: str) -> float:
    """'8G', '512M', '1.5GB', '2048' (MiB) -> MiB; ValueError on anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2).upper()]


def threads_per_stage(jobs: int) -> int:
    return max(1, cpu_count() // max(1, jobs))


# ---------------------------------------------------------------------------------------- the loop
def run_parallel(order: list[str], upstream: Mapping[str, Iterable[str]], *, jobs: int, budget_mb: float,
                 memory_mb: Callable[[str], float], skip: Callable[[str], bool],
                 start: Callable[[str], None], finished: Callable[[str], None],
                 interrupt: Callable[[], None]) -> None:
    """Run every stage of `order` (a topological order) once its upstream stages are done.

    skip(name) -> True when the stage is not to run (it records why itself); start(name) runs it to
    completion (in a thread of a pool of `jobs`); finished(name) is called in this thread after it.
    Among stages ready at the same time the earlier in `order` starts first, so --jobs 1 would run
    them exactly in `order`. On KeyboardInterrupt, interrupt() stops the workers, the stages running
    are waited for (they record themselves as interrupted) and the interrupt is raised again.
    """
    rank = {name: i for i, name in enumerate(order)}
    sorter = graphlib.TopologicalSorter({n: [u for u in upstream[n] if u in rank] for n in order})
    sorter.prepare()
    waiting: list[tuple[int, str]] = []  # ready, not started, by position in `order`
    running: dict[cf.Future, str] = {}
    warned: set[str] = set()
    pool = cf.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="edgepipe-stage")
    try:
        while sorter.is_active():
            for name in sorter.get_ready():
                bisect.insort(waiting, (rank[name], name))
            progressed = False
            for item in list(waiting):
                if skip(item[1]):
                    waiting.remove(item)
                    sorter.done(item[1])
                    progressed = True
            if progressed:
                continue  # what they unblocked is ready now
            for item in _startable(waiting, running, jobs, budget_mb, memory_mb, warned):
                waiting.remove(item)
                running[pool.submit(start, item[1])] = item[1]
            if not running:  # nothing ready can start and nothing runs: a bug, not a user error
                raise RuntimeError(f"scheduler stalled with {[n for _, n in waiting]} waiting")
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: rank[running[f]]):
                name = running.pop(future)
                future.result()  # a failing stage records itself; this raises only on engine errors
                finished(name)
                sorter.done(name)
    except BaseException:
        interrupt()
        for future in running:
            try:
                future.result()
            except BaseException:  # noqa: BLE001 - each records itself; the first error is raised below
                pass
        raise
    finally:
        pool.shutdown(wait=True)


def _startable(waiting: list[tuple[int, str]], running: Mapping[cf.Future, str], jobs: int, budget_mb: float,
               memory_mb: Callable[[str], float], warned: set[str]) -> list[tuple[int, str]]:
    """The waiting stages to start now: free slots, in order, each only if its memory fits what runs.
    A stage larger than the whole budget starts only when nothing runs, and nothing starts beside it."""
    used = sum(memory_mb(n) for n in running.values())
    busy = len(running)
    chosen = []
    for item in waiting:
        if busy >= jobs:
            break
        need = memory_mb(item[1])
        if need > budget_mb:
            if busy == 0:
                if item[1] not in warned:
                    warned.add(item[1])
                    log.warning("stage %s declares %.0f MB peak memory, more than --max-memory %.0f MB; "
                                "running it alone", item[1], need, budget_mb)
                chosen.append(item)
            break  # nothing later starts: what runs drains, so this one's turn comes
        if used + need <= budget_mb:
            chosen.append(item)
            used += need
            busy += 1
    return chosen


# ------------------------------------------------------------------------------- worker processes
class StageProcesses:
    """Runs stage `run` calls in worker processes and relays their progress and log records.

    A worker is a ProcessPoolExecutor of one spawned process, taken by one stage at a time and kept
    for the next stage when it is done (so torch and the toolkit are imported once per worker, as at
    --jobs 1 once per run); one whose process died is dropped, which fails only the stage it ran.
    One queue carries ('progress', stage, completed, total, description, important) and ('log',
    LogRecord) back; a thread of this process hands them to the display and to logging."""

    def __init__(self, jobs: int, on_progress: Callable[..., None]) -> None:
        import multiprocessing  # here: a run at --jobs 1 (every cached run) needs none of it

        self.context = multiprocessing.get_context("spawn")
        self.queue = self.context.Queue()
        self.threads = threads_per_stage(jobs)
        self.on_progress = on_progress
        self.interrupted = threading.Event()
        self._idle: list[cf.ProcessPoolExecutor] = []
        self._all: list[cf.ProcessPoolExecutor] = []
        self._lock = threading.Lock()
        self._pump = threading.Thread(target=self._relay, name="edgepipe-relay", daemon=True)
        self._pump.start()

    def _take(self) -> cf.ProcessPoolExecutor:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            worker = cf.ProcessPoolExecutor(max_workers=1, mp_context=self.context, initializer=_worker_init,
                                            initargs=(self.queue, os.getpid(), self.threads))
            self._all.append(worker)
            return worker

    def _give_back(self, worker: cf.ProcessPoolExecutor) -> None:
        with self._lock:
            self._idle.append(worker)

    def _relay(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            try:
                if item[0] == "progress":
                    self.on_progress(*item[1:])
                else:
                    record = item[1]
                    logging.getLogger(record.name).handle(record)
            except Exception:  # a display hiccup must not stop the relay
                log.debug("relay failed", exc_info=True)

    def call(self, stage_cls: type, stage_name: str, params: Any, inputs: Mapping, out: Any,
             context: Mapping[str, Any], display: Any = None) -> tuple[dict, dict[str, str]]:
        """The stage's (metrics, library versions), computed in a worker process. Exceptions of the
        stage come back as they are; a worker that dies becomes a StageError naming how it ended."""
        from engine.contract.stage import StageError

        worker = self._take()
        try:
            result = worker.submit(_worker_run, stage_cls, stage_name, params, dict(inputs), out,
                                   dict(context)).result()
        except cf.process.BrokenProcessPool:
            worker.shutdown(wait=False)  # its process is gone: never handed out again
            if self.interrupted.is_set():
                raise KeyboardInterrupt from None
            raise StageError("the stage's worker process died (killed, e.g. for lack of memory: see `dmesg`; "
                             "rerun with a smaller --jobs or --max-memory)") from None
        except BaseException:
            self._give_back(worker)  # the stage raised; its process is fine
            if self.interrupted.is_set():  # e.g. its pnnx child ended by the terminal's Ctrl-C
                raise KeyboardInterrupt from None
            raise
        self._give_back(worker)
        return result

    def stop_workers(self) -> None:
        """Ask every worker process to stop (SIGTERM: the stage unwinds as on Ctrl-C), then kill what
        is left after a grace period. The workers are this process's multiprocessing children (the
        runner starts no other)."""
        self.interrupted.set()
        import multiprocessing

        children = multiprocessing.active_children()
        for p in children:
            p.terminate()
        deadline = time.monotonic() + TERMINATE_GRACE_S
        for p in children:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()

    def close(self) -> None:
        for worker in self._all:
            worker.shutdown(wait=True)
        self.queue.put(None)
        self._pump.join(timeout=10)
        self.queue.close()


# Set in each worker process by _worker_init.
_queue: Any = None


def _worker_init(queue: Any, parent_pid: int, threads: int) -> None:
    global _queue
    _queue = queue
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    from logging.handlers import QueueHandler  # here: a run at --jobs 1 needs none of it

    root = logging.getLogger()
    root.handlers[:] = [QueueHandler(_LogQueue(queue))]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    # Ctrl-C in a terminal reaches the whole process group: the parent decides (it sends SIGTERM).
    # A handler, not SIG_IGN, so the stage's own children (pnnx) still stop on Ctrl-C.
    signal.signal(signal.SIGINT, lambda *_: None)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


class _LogQueue:
    """QueueHandler's queue: records go back tagged, beside the progress messages."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def put_nowait(self, record: logging.LogRecord) -> None:
        self.queue.put(("log", record))


def _exit_with_parent(parent_pid: int) -> None:
    """A worker whose edgepipe was killed (SIGKILL) ends its own children and itself: its stage's
    temp folder is never published, so nothing half-written enters the cache."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):
            child.kill()
    finally:
        os._exit(1)


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _worker_run(stage_cls: type, stage_name: str, params: Any, inputs: dict, out: Any,
                context: dict) -> tuple[dict, dict[str, str]]:
    from engine.contract.stage import invoke
    from engine.store.cache import library_versions

    def progress(c, t, d, i):
        _queue.put(("progress", stage_name, c, t, d, i))

    signal.signal(signal.SIGTERM, _raise_interrupt)  # stop_workers: unwind like Ctrl-C at --jobs 1
    peak = _PeakRss()
    try:
        metrics = invoke(stage_cls, params, inputs, out, stage=stage_name, progress=progress, **context) or {}
        # What the stage really held, beside its declaration, in the run's edgepipe.log (for tuning
        # Stage.peak_memory_mb and --max-memory).
        log.info("stage %s: worker peak RSS %.0f MB (declared %.0f MB)", stage_name, peak.stop() / 2**20,
                 stage_cls.peak_memory(params))
        return dict(metrics), library_versions()
    finally:
        peak.stop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.stdout.flush()
        sys.stderr.flush()


class _PeakRss:
    """The largest resident memory of this worker and its children (pnnx) while a stage runs,
    sampled every 0.1 s by a thread."""

    def __init__(self) -> None:
        import psutil

        self.peak = 0
        self._proc = psutil.Process()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while True:
            try:
                procs = [self._proc, *self._proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except Exception:  # noqa: BLE001 - a child that ended between listing and reading
                pass
            if self._done.wait(0.1):
                return

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak
