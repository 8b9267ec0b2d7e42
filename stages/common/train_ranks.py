"""``train.devices > 1``: the train stage runs its DDP ranks itself, as torchrun workers.

Lightning's own DDP launcher re-runs ``sys.argv`` once per rank, which here is ``edgepipe run ...``: every
rank would compose the config, take the cache locks and run the pipeline again. So the stage starts
``python -m torch.distributed.run --standalone --nproc-per-node N -m stages.common.train_ranks JOB``
(PyTorch's own launcher: rendezvous, one process per device, and every rank stopped when one fails).
Lightning sees the torchelastic environment and joins it without launching anything. Each rank runs
the same ``Train.run`` on the same params; rank 0 writes the outputs and the headline, and any rank
that fails with a StageError writes its message, which the stage raises as its own.

The launcher and the ranks start with PYTHONSAFEPATH=1: the current folder (the user's project) is not
on their import path, so nothing there can stand in for edgepipe's modules.

On CPUs the ranks share the cores: each gets ``cores // devices`` threads (OpenMP threads that
outnumber the cores slow every rank down many times over).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from engine.contract.stage import Context, Stage, StageError, invoke


def launch(stage: type[Stage], p, inputs, out: Path, ctx: Context) -> dict[str, Any]:
    """Run ``p.devices`` ranks of the stage (the train stage's class) and return rank 0's headline."""
    log = out / "logs" / "ranks.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    ctx.note(f"training on {p.devices} devices (DDP, one process each); their output: logs/ranks.log")
    with tempfile.TemporaryDirectory(prefix="edgepipe-ddp-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({
            "params": p.model_dump(mode="json"),
            "inputs": {k: str(v) for k, v in inputs.items()},
            "out": str(out),
            "stage": ctx.stage,
            "content_digests": dict(ctx.content_digests),  # each rank refuses weights changed since the key
            "stage_class": f"{stage.__module__}:{stage.__qualname__}",  # named, not imported: no loop
            "result": str(Path(tmp) / "result.json"),
            "error": str(Path(tmp) / "error.json"),
        }), encoding="utf-8")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={p.devices}",
               "-m", "stages.common.train_ranks", str(job)]
        with open(log, "w", encoding="utf-8") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_rank_env(p.devices)).returncode
        result, error = Path(tmp) / "result.json", Path(tmp) / "error.json"
        if error.is_file():
            raise StageError(json.loads(error.read_text(encoding="utf-8"))["message"])
        if rc != 0 or not result.is_file():
            raise StageError(f"DDP training on {p.devices} devices failed (exit code {rc}); see {log}")
        return json.loads(result.read_text(encoding="utf-8"))


def _rank_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    # `python -m` puts the current folder first on the import path: a `stages/` (or `torch/`) folder
    # in the user's project would be imported in the launcher and every rank instead of ours
    env["PYTHONSAFEPATH"] = "1"
    if not env.get("OMP_NUM_THREADS", "").strip():  # unset or empty: torch would take every core per rank
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // devices))
    return env


def main(job_path: str) -> int:
    """One rank: the stage's run, as in a one-process run."""
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    module, _, name = job["stage_class"].partition(":")
    stage = getattr(importlib.import_module(module), name)
    rank = int(os.environ.get("RANK", 0))
    try:
        params = stage.Params.model_validate(job["params"])
        headline = invoke(stage, params, {k: Path(v) for k, v in job["inputs"].items()}, Path(job["out"]),
                          stage=job["stage"], content_digests=job["content_digests"])
    except StageError as e:
        Path(job["error"]).write_text(json.dumps({"message": f"rank {rank}: {e}"}), encoding="utf-8")
        return 1
    if rank == 0:
        Path(job["result"]).write_text(json.dumps(headline), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
