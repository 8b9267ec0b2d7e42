"""Quantization quality on the digits test split: fp32 (PyTorch) vs ONNX Runtime vs RKNN int8 `normal`
vs `mmse` (rknn-toolkit2's x86 simulator, target rv1103), each without and with `clip_outliers`
applied to the trained weights, side by side.

Target (issue 4): RKNN `mmse` within 1.0 top-1 point of fp32; ONNX agrees 100% with PyTorch.

Every step is the real stage run through engine.run.testing.run_stage (dataset, train, clip_outliers,
export_onnx, calibration, rknn_quantize, evaluate); a stage whose output folder already holds
`.done` under --work is reused, so a second run only prints.

    .venv/bin/python bench/quant_quality.py                         # resnet18, 32 px, 6 epochs
    .venv/bin/python bench/quant_quality.py --arch mobilenet_v3_small --epochs 10 --work /tmp/qq
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def stage(name: str, params: dict, inputs: dict, out: Path, log: list) -> dict:
    from engine.run.testing import run_stage

    done = out / ".done"
    if done.is_file():
        return json.loads(done.read_text())
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    metrics = run_stage(name, params, inputs, out) or {}
    seconds = time.perf_counter() - t0
    log.append((out.name, seconds))
    print(f"  {out.name:<22} {seconds:7.1f} s", flush=True)
    done.write_text(json.dumps(metrics))
    return dict(metrics)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18", help="model.arch (resnet18, mobilenet_v3_small, ...)")
    ap.add_argument("--stem", default="imagenet", help="resnet stem: imagenet (cheap at 32 px) or small")
    ap.add_argument("--size", type=int, default=32, help="preprocess.input_size")
    ap.add_argument("--preprocess", default="imagenet", help="mean/std preset (imagenet, uniform)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--target", default="rv1103")
    ap.add_argument("--calib", type=int, default=50, help="calibration images")
    ap.add_argument("--percentile", type=float, default=99.99, help="clip_outliers percentile")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="keep (and reuse) stage outputs here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    work = args.work or Path(tempfile.mkdtemp(prefix="edgepipe-qq-"))
    work.mkdir(parents=True, exist_ok=True)
    model = {"arch": args.arch}
    if args.arch.startswith("resnet") or args.arch == "gem_resnet":
        model["stem"] = args.stem
    pre = {"input_size": args.size, "mean": args.preprocess, "std": args.preprocess}
    print(f"digits, {args.arch} at {args.size} px ({args.preprocess} mean/std), {args.epochs} epochs, "
          f"rknn target {args.target}, {args.calib} calibration images; work folder {work}", flush=True)
    log: list = []

    stage("dataset", {"kind": "digits", "seed": args.seed, "preprocess": pre}, {}, work / "data", log)
    stage("train", {"epochs": args.epochs, "seed": args.seed, "model": model, "accelerator": "cpu",
                    "augment": {"rotation": 10}}, {"data": work / "data"}, work / "train", log)
    stage("calibration", {"count": args.calib, "seed": args.seed}, {"data": work / "data"}, work / "calib", log)
    stage("clip_outliers", {"method": "percentile", "percentile": args.percentile, "model": model},
          {"model": work / "train"}, work / "clip", log)

    rows = {}
    for variant, src in (("no clip", work / "train"), (f"clip p{args.percentile:g}", work / "clip")):
        tag = "raw" if src.name == "train" else "clip"
        onnx = work / f"onnx_{tag}"
        stage("export_onnx", {}, {"model": src}, onnx, log)
        builds = {}
        for algo in ("normal", "mmse"):
            out = work / f"rknn_{tag}_{algo}"
            builds[algo] = stage("rknn_quantize", {"target": args.target, "algorithm": algo},
                                 {"onnx": onnx, "calib": work / "calib", "data": work / "data"}, out, log)
            builds[algo]["build"] = json.loads((out / "build.json").read_text())
        # fp32 reference: the unclipped trained model, for both variants
        ev = stage("evaluate", {}, {"data": work / "data", "fp32": work / "train", "fp32_variant": src, "onnx": onnx,
                                    "rknn_normal": work / f"rknn_{tag}_normal",
                                    "rknn_mmse": work / f"rknn_{tag}_mmse"}, work / f"eval_{tag}", log)
        rows[variant] = (ev, builds)

    n = json.loads((work / "eval_raw" / "metrics.json").read_text())["samples"]
    print()
    print(f"top-1 on the digits test split ({n} images); fp32 = that variant's PyTorch model; Δ = top-1 points vs "
          f"the unclipped fp32 model; max|Δlogit| = vs the unclipped fp32 logits")
    head = (f"{'variant':<14} {'fp32':>7} {'onnx':>7} {'agree':>7} {'rknn normal':>12} {'Δ':>6} {'rknn mmse':>10} "
            f"{'Δ':>6}  {'max|Δlogit| n/m':>15}  {'build normal/mmse':>18}  {'peak MB':>8}  mmse ≤ 1.0 pt")
    print(head)
    print("-" * len(head))
    for variant, (ev, builds) in rows.items():
        t = ev["top1"]
        fp32 = t["fp32"]
        dn, dm = (t["rknn_normal"] - fp32) * 100, (t["rknn_mmse"] - fp32) * 100
        peak = max(b["build"]["rss_peak_mb"] for b in builds.values())
        ok = "yes" if -dm <= 1.0 else "NO"
        mad = ev["max_abs_diff"]
        print(f"{variant:<14} {t['fp32_variant']:>7.2%} {t['onnx']:>7.2%} {ev['agreement']['onnx']:>7.1%} "
              f"{t['rknn_normal']:>12.2%} {dn:>+6.2f} {t['rknn_mmse']:>10.2%} {dm:>+6.2f}  "
              f"{mad['rknn_normal']:>7.2f}/{mad['rknn_mmse']:<7.2f}  "
              f"{builds['normal']['build']['build_s']:>7.1f} s /{builds['mmse']['build']['build_s']:>6.1f} s  "
              f"{peak:>8.0f}  {ok}")
    print()
    print(f"fp32 (unclipped) top-1 {rows['no clip'][0]['top1']['fp32']:.2%}; ONNX max abs logit diff vs PyTorch "
          f"{rows['no clip'][0]['max_abs_diff']['onnx']:.2g}; simulator agreement with fp32: "
          + ", ".join(f"{v} normal {ev['agreement']['rknn_normal']:.1%} / mmse {ev['agreement']['rknn_mmse']:.1%}"
                      for v, (ev, _) in rows.items()))
    print("stage seconds: " + (", ".join(f"{k} {s:.0f}" for k, s in log) or "(all reused from --work)"))
    print(f"eval tables: {work}/eval_raw/eval.md, {work}/eval_clip/eval.md")


if __name__ == "__main__":
    main()
