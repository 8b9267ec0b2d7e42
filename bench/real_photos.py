"""Every experiment on real photographs at its own input size, and finetune vs from scratch.

The data and weights are the tests' (tests/helpers_data.py): six classes of augmented crops cut from
photos that scikit-learn, matplotlib and scikit-image install (china, flower, grace_hopper, astronaut,
coffee, chelsea), and backbones pretrained first on ten OTHER photos, saved as torchvision state_dicts.
Each experiment runs through the real CLI (`edgepipe run +experiment=NAME dataset.path=...`) with the
same overrides as tests/e2e/test_real_photos.py; printed per experiment: top-1 of every backend its
evaluate stage scores (fp32 PyTorch, ONNX Runtime, ncnn, RKNN normal / mmse in the simulator) and the
int8 drop against `evaluate.quant_max_drop`, and `reference`: the independent reference the tests' floors
come from (tests/helpers_reference.py: a plain PyTorch loop with torchvision's model, transforms and
`update_bn` over a shuffled loader, trained on the very arrays of the run's dataset stage with the
experiment's epochs, lr and batch size). Then, per architecture, the finetuned model's test top-1
beside the same training from scratch (same data, epochs and seed).

With ``--boards``, each experiment runs once per board (``board=NAME``: rv1103_mobilenetv3 then
quantizes for that chip); every row says whether a package was written and, for each stage with an int8
search (search.json), which candidate shipped, why, how many were tried and how long the search took.
With ``--search-speed``, each such run is followed, in the same sitting, by the same run with the
search off (``quantize.search.enabled=false``: the pre-search pipeline, whose ``rknn`` stage is the
plain ``normal`` build): the cold run's seconds with and without the search, each summed over the
run's distinct cache keys from the run that built them (the experiment's first run must be the cold
one: a fresh --work folder).

Everything is kept under --work (edgepipe's own cache): a second run only prints.

    .venv/bin/python bench/real_photos.py                                   # every experiment
    .venv/bin/python bench/real_photos.py --experiments rv1103_mobilenetv3 --work /tmp/rp
    .venv/bin/python bench/real_photos.py --experiments rv1103_mobilenetv3 --boards rv1103 rv1106 rk3566 \
        --search-speed --work /tmp/rp-boards
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from helpers_data import (  # noqa: E402
    CHINESE_NAMES,
    REAL_PHOTO_EXPERIMENTS,
    make_real_photo_folder,
    pretrain_backbone,
    pretrained_env,
    real_photo_overrides,
    torchvision_file_name,
)
from helpers_reference import reference_top1  # noqa: E402

# one finetuning experiment per architecture whose pipeline has no `init` input (rv1103's train starts
# from its clip stage, which a from-scratch training cannot take)
FINETUNE_VS_SCRATCH = ("onnx_catsdogs", "v831_resnet18")
BACKENDS = ("reference", "pytorch", "torchscript", "onnx", "ncnn", "onnx_int8", "rknn", "rknn_normal", "rknn_mmse")


def photos(work: Path, size: int, per_class: int, chinese: bool) -> Path:
    folder = work / f"photos_{size}px_{per_class}{'_zh' if chinese else ''}"
    if not folder.is_dir():
        make_real_photo_folder(folder.with_suffix(".tmp"), size=size, per_class=per_class,
                               names=CHINESE_NAMES if chinese else None)
        folder.with_suffix(".tmp").rename(folder)
    return folder


def weights(work: Path, arch: str) -> Path:
    path = work / "torch_home" / "hub" / "checkpoints" / torchvision_file_name(arch)
    if not path.is_file():
        t0 = time.perf_counter()
        pretrain_backbone(arch, path.parent)
        print(f"pretrained {arch} on other photos in {time.perf_counter() - t0:.0f} s: {path}", flush=True)
    return path


# (stage type, cache key) -> seconds of the run in this sitting that built it (--search-speed)
BUILT: dict[tuple[str, str], float] = {}


def run(work: Path, *overrides: str) -> tuple[int, dict, float]:
    """`edgepipe run` in this process; (exit code, run.json, seconds)."""
    from engine.cli.commands import main

    before = set((work / "runs").glob("*/*/run.json"))
    t0 = time.perf_counter()
    rc = main(["run", f"runs_root={work / 'runs'}", *overrides])
    seconds = time.perf_counter() - t0
    record = own_record(work, before, list(overrides))
    for s in record["stages"].values():
        if s["status"] == "ran":
            BUILT.setdefault((s["type"], s["key"]), s["seconds"])
    return rc, record, seconds


def eval_metrics(record: dict, stage: str = "eval") -> dict:
    return json.loads((Path(record["stages"][stage]["path"]) / "metrics.json").read_text())


def experiment_overrides(work: Path, name: str, per_class: int) -> list[str]:
    """The real-photo overrides of ``name`` (data and weights built under ``work`` when missing)."""
    spec = REAL_PHOTO_EXPERIMENTS[name]
    data = photos(work, spec["size"], per_class, spec["chinese"])
    w = weights(work, spec["arch"]) if spec["arch"] else None
    os.environ.update(pretrained_env(w) if w is not None else {})  # `imagenet` is found there
    return real_photo_overrides(name, data, w)


def experiment_row(work: Path, name: str, per_class: int, board: str | None = None,
                   with_reference: bool = True) -> tuple[dict, dict]:
    spec = REAL_PHOTO_EXPERIMENTS[name]
    w = weights(work, spec["arch"]) if spec["arch"] else None
    rc, record, seconds = run(work, *experiment_overrides(work, name, per_class), *board_override(board))
    failed = {k: s.get("error") for k, s in record["stages"].items() if s["status"] == "failed"}
    row = {"experiment": name + (f" board={board}" if board else ""), "rc": rc, "seconds": round(seconds),
           "failed": failed, "packaged": packaged(record), "searches": searches(record)}
    if "eval" in record["stages"] and record["stages"]["eval"]["status"] != "failed":
        m = eval_metrics(record)
        row["samples"] = m["samples"]
        row["quant_max_drop"] = m["targets"]["quant_max_drop_points"]
        for backend, b in m["backends"].items():
            row[backend] = b["top1"]
            if "verdict" in b:  # a quantized row judged by the int8 gate
                row[f"{backend}_drop"] = b["drop_points"]
    if with_reference and record["stages"].get("data", {}).get("path"):
        row["reference"] = reference(record, spec, w)
    return row, record


def own_record(work: Path, before: set[Path], overrides: list[str]) -> dict:
    """run.json of the run just made with ``overrides`` (not `latest`: another bench may share the folder)."""
    for path in sorted(set((work / "runs").glob("*/*/run.json")) - before, reverse=True):
        record = json.loads(path.read_text())
        if record.get("overrides", [])[-len(overrides):] == overrides:
            return record
    return json.loads((work / "runs" / "latest" / "run.json").read_text())


def board_override(board: str | None) -> list[str]:
    return [f"board={board}"] if board else []


def packaged(record: dict) -> bool:
    """Whether the run wrote a board package (a package-type stage that ran or was cached)."""
    return any(s["type"] == "package" and s["status"] in ("ran", "cached") for s in record["stages"].values())


def searches(record: dict) -> dict:
    """Per stage with an int8 search (its search.json): the candidate that shipped, why, how many were
    tried and the search's seconds."""
    found = {}
    for name, s in record["stages"].items():
        search = read_json(Path(s["path"]) / "search.json") if s.get("path") else None
        if search is None:
            continue
        chosen = search.get("chosen") or {}
        found[name] = {"chosen": chosen.get("label"), "why": search.get("reason") or search.get("next_step"),
                       "tried": len(search.get("candidates") or []), "seconds": search.get("seconds")}
    return found


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def search_speed(work: Path, name: str, per_class: int, board: str | None, searched: dict) -> dict:
    """The same run with the search off, in the same sitting; the cold run's seconds with and without it:
    each run's distinct cache keys, each counted with the seconds of the run in this sitting that built
    it (a key two stages share is built once in a cold run)."""
    rc, record, _ = run(work, *experiment_overrides(work, name, per_class), *board_override(board),
                        "quantize.search.enabled=false")

    def cold(r: dict) -> float:
        return sum(BUILT.get(key, 0.0) for key in {(s["type"], s["key"]) for s in r["stages"].values()})

    on_rknn = searched["stages"].get("rknn", {}).get("seconds")
    return {"rc_off": rc, "cold_on_s": round(cold(searched), 1), "cold_off_s": round(cold(record), 1),
            "ratio": round(cold(searched) / cold(record), 3) if cold(record) else None,
            "rknn_stage_on_s": round(on_rknn, 1) if on_rknn is not None else None,
            "first_candidate_held": first_candidate_held(searched)}


def first_candidate_held(record: dict) -> bool | None:
    for s in record["stages"].values():
        search = read_json(Path(s["path"]) / "search.json") if s.get("path") else None
        if search is not None and search.get("candidates"):
            return bool(search["candidates"][0].get("holds"))
    return None


def reference(record: dict, spec: dict, weights_file: Path | None) -> float:
    """The plain PyTorch loop's test top-1 on the run's own dataset arrays, with its training settings."""
    import yaml

    cfg = yaml.safe_load((Path(record["run_dir"]) / ".hydra" / "config.yaml").read_text(encoding="utf-8"))
    train = cfg["train"]
    arch = spec["arch"] or cfg["model"]["arch"]
    result = reference_top1(Path(record["stages"]["data"]["path"]), arch,
                            weights_file if train.get("mode") == "finetune" else None,
                            epochs=train["epochs"], lr=train["lr"], batch_size=train["batch_size"],
                            hflip=train["augment"].get("hflip", 0.0), seed=cfg.get("seed", 0) or 0)
    return result["test_top1"]


def scratch_vs_finetune(work: Path, name: str, record: dict, per_class: int) -> dict:
    """The train stage of ``name`` again from scratch (same data, epochs, seed): its test accuracy
    beside the finetuned one's."""
    spec = REAL_PHOTO_EXPERIMENTS[name]
    data = photos(work, spec["size"], per_class, spec["chinese"])
    overrides = real_photo_overrides(name, data, None)
    scratch_rc, scratch, _ = run(work, *overrides, "train.mode=fromscratch", "model.pretrained=null", "--only", "train")
    finetuned = record["stages"]["train"]["metrics"]
    return {"experiment": name, "arch": spec["arch"], "finetune": finetuned.get("test_acc"),
            "scratch": scratch["stages"]["train"]["metrics"].get("test_acc") if scratch_rc == 0 else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", nargs="*", default=list(REAL_PHOTO_EXPERIMENTS))
    ap.add_argument("--per-class", type=int, default=40, help="images per class (default 40)")
    ap.add_argument("--work", type=Path, default=None, help="keep data, weights and runs here (default: a temp folder)")
    ap.add_argument("--boards", nargs="*", default=[None], metavar="BOARD",
                    help="run each experiment once per board (board=BOARD; default: the experiment's own)")
    ap.add_argument("--search-speed", action="store_true",
                    help="after each run with an int8 search, the same run with quantize.search.enabled=false: "
                         "cold seconds with and without the search")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="edgepipe-real-photos-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.pop("EDGEPIPE_PLUGINS", None)
    rows, records, speeds = [], {}, []
    for name in args.experiments:
        for board in args.boards or [None]:
            # the reference does not depend on the board: once per experiment
            row, record = experiment_row(work, name, args.per_class, board, with_reference=name not in records)
            records.setdefault(name, record)
            rows.append(row)
            print(json.dumps(row, ensure_ascii=False), flush=True)
            if args.search_speed and row["searches"]:
                speeds.append({"experiment": row["experiment"],
                               **search_speed(work, name, args.per_class, board, record)})
                print(json.dumps(speeds[-1]), flush=True)
    print(f"\n{'experiment':<20} {'n':>4} " + " ".join(f"{b:>12}" for b in BACKENDS) + "  int8 drop (target)")
    for row in rows:
        cells = " ".join(f"{row[b]:>12.2%}" if b in row else f"{'-':>12}" for b in BACKENDS)
        drops = ", ".join(f"{b} {row[f'{b}_drop']:.2f}" for b in BACKENDS if f"{b}_drop" in row)
        target = f" (<= {row['quant_max_drop']:g})" if drops else ""
        status = "" if row["rc"] == 0 else f"  run exit {row['rc']}: {row['failed']}"
        print(f"{row['experiment']:<20} {row.get('samples', '-'):>4} {cells}  {drops}{target}{status}")
    for row in rows:
        for stage, found in row["searches"].items():
            print(f"{row['experiment']}: {'package written' if row['packaged'] else 'NO package'}; int8 search "
                  f"({stage}): {found['chosen'] or 'nothing holds'} after {found['tried']} candidate(s), "
                  f"{found['seconds'] or 0:.0f} s: {found['why']}")
    for sp in speeds:
        print(f"{sp['experiment']}: cold run {sp['cold_on_s']:.0f} s with the search, {sp['cold_off_s']:.0f} s "
              f"without ({sp['ratio']}x; the search's rknn stage {sp['rknn_stage_on_s']} s; first candidate "
              f"held: {sp['first_candidate_held']})")
    print(f"\n{'finetune vs scratch':<20} {'arch':<20} {'finetune':>9} {'scratch':>9}   (train stage's test_acc)")
    for name in FINETUNE_VS_SCRATCH:
        if name not in records or records[name]["stages"].get("train", {}).get("status") not in ("ran", "cached"):
            continue
        arch = REAL_PHOTO_EXPERIMENTS[name]["arch"]
        r = scratch_vs_finetune(work, name, records[name], args.per_class)
        fmt = lambda v: f"{v:>9.2%}" if v is not None else f"{'failed':>9}"  # noqa: E731
        print(f"{name:<20} {arch:<20} {fmt(r['finetune'])} {fmt(r['scratch'])}", flush=True)
    print(f"\n(work folder: {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
