"""The documents' int8 claim, measured: on the real-photo set, per architecture, float top-1 and the
int8 drop of RKNN `normal`, `mmse`, `kl_divergence` and the int8 search's build, each with and without
clip_outliers, plus the seconds the search took.

Each cell comes from the engine: the `rv1103_mobilenetv3` experiment on the tests' real photos (the
overrides of bench/real_photos.py and tests/e2e/test_real_photos.py) with `model=ARCH`, `clip=none` for
the rows without clipping, and one more plain build, `rknn_kl` (`kl_divergence`), wired into evaluate
by overrides. Figures are read back from evaluate's metrics.json (test split: top-1, the gate's
`drop_points`, i.e. net images lost against the float ONNX model, in points) and the `rknn` stage's
search.json (chosen candidate, seconds). Nothing is recomputed here.

Weights: ResNet-18 and GeM-ResNet (torchvision's ResNet-18 weights) and MobileNetV3-Small finetune from
the tests' backbones pretrained on OTHER photos (helpers_data.pretrain_backbone); MobileNetV3-Large
from the same pretraining, at MobileNetV3-Small's settings (the builder has no Large entry: this script
adds it to the builder's tables before calling it).

``--candidates`` runs, per row, one search per all-int8 candidate (algorithms x methods x
``--calib-images``; the search limited to that candidate, hybrid off) and prints what the search saw
on the 24 val images (agreement and logit cosine with float, net images lost, holds) beside the test
drop evaluate measured on the 72 test images: can anything on val tell the candidates apart?

Everything is kept under --work (edgepipe's cache): a second run only prints; models run in the order
given and each row is printed when done.

    .venv/bin/python bench/int8_table.py --work /tmp/int8-table
    .venv/bin/python bench/int8_table.py --models mobilenet_v3_small resnet18 --work /tmp/int8-table
    .venv/bin/python bench/int8_table.py --candidates --models gem_resnet --clip yes --work /tmp/int8-table
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import real_photos  # noqa: E402  (puts the repository and tests/ on the path)
from helpers_data import PRETRAIN_SETTINGS, TORCHVISION_WEIGHTS  # noqa: E402

EXPERIMENT = "rv1103_mobilenetv3"
# architecture -> (model config, the torchvision weights it finetunes from)
MODELS = {"mobilenet_v3_small": ("mobilenet_v3_small", "mobilenet_v3_small"),
          "resnet18": ("resnet18", "resnet18"),
          "gem_resnet": ("gem_resnet", "resnet18"),  # model.pretrained=imagenet: torchvision's ResNet-18
          "mobilenet_v3_large": ("mobilenet_v3_large", "mobilenet_v3_large")}
# the builder's tables know Small and ResNet-18; Large is pretrained like Small
# `imagenet` is torchvision's DEFAULT, which for Large is IMAGENET1K_V2 (for Small and ResNet-18, V1)
TORCHVISION_WEIGHTS.setdefault("mobilenet_v3_large", "MobileNet_V3_Large_Weights.IMAGENET1K_V2")
PRETRAIN_SETTINGS.setdefault("mobilenet_v3_large", PRETRAIN_SETTINGS["mobilenet_v3_small"])
KL_STAGE = ["+pipeline.stages.rknn_kl={uses: rknn_quantize, needs: {onnx: onnx, calib: calib, data: data}, "
            "config: quantize, with: {algorithm: kl_divergence, search: {enabled: false}}, after: [preflight]}",
            "+pipeline.stages.eval.needs.rknn_kl=rknn_kl"]
BUILDS = (("normal", "rknn_normal"), ("mmse", "rknn_mmse"), ("kl_divergence", "rknn_kl"), ("chosen", "rknn"))


def row(work: Path, arch: str, clip: bool, per_class: int, more: tuple[str, ...] = ()) -> dict:
    rc, record, seconds = run_row(work, arch, clip, per_class, more)
    out = {"arch": arch, "clip": clip, "rc": rc, "run_s": round(seconds)}
    if record["stages"].get("eval", {}).get("status") not in ("ran", "cached"):
        out["failed"] = {k: s.get("error") for k, s in record["stages"].items() if s["status"] == "failed"}
        return out
    m = real_photos.eval_metrics(record)
    out["samples"] = m["samples"]
    out["float"] = m["backends"]["onnx"]["top1"]
    for label, stage in BUILDS:
        b = m["backends"].get(stage) or {}
        out[label] = b.get("drop_points")
    search = real_photos.read_json(Path(record["stages"]["rknn"]["path"]) / "search.json") or {}
    out["chosen_label"] = (search.get("chosen") or {}).get("label")
    out["search_s"] = search.get("seconds")
    out["tried"] = len(search.get("candidates") or [])
    return out


def run_row(work: Path, arch: str, clip: bool, per_class: int, more: tuple[str, ...] = ()) -> tuple[int, dict, float]:
    model, weights_arch = MODELS[arch]
    overrides = real_photos.experiment_overrides(work, EXPERIMENT, per_class)
    weights = real_photos.weights(work, weights_arch)
    os.environ.update(real_photos.pretrained_env(weights))
    extra = [f"model={model}", *([] if clip else ["clip=none"]), *KL_STAGE,
             "package.enforce_targets=false"]  # a build that misses is a figure here, not a failed run
    return real_photos.run(work, *overrides, *extra, *more)


def candidate_rows(work: Path, arch: str, clip: bool, per_class: int, calib_images: list[int]) -> list[dict]:
    """One search per all-int8 candidate: its val figures (search.json) beside its test drop (evaluate)."""
    out = []
    for size in calib_images:
        for algorithm in ("normal", "kl_divergence", "mmse"):
            for method in ("channel", "layer"):
                only = (f"quantize.search.algorithms=[{algorithm}]", f"quantize.search.methods=[{method}]",
                        f"quantize.search.calib_images=[{size}]", "quantize.search.hybrid.enabled=false")
                _, record, _ = run_row(work, arch, clip, per_class, only)
                label = f"{algorithm}/{method}/{size}"
                if record["stages"].get("eval", {}).get("status") not in ("ran", "cached"):
                    print(f"{label}: the run failed; left out", flush=True)
                    continue
                search = real_photos.read_json(Path(record["stages"]["rknn"]["path"]) / "search.json") or {}
                val = (search.get("candidates") or [{}])[0]
                test = real_photos.eval_metrics(record)["backends"]["rknn"]
                out.append({"arch": arch, "clip": clip, "label": label, "images": val.get("images"),
                            "agreement": val.get("agreement"), "cosine": val.get("cosine"),
                            "val_net_lost": val.get("lost_images", 0) - val.get("gained_images", 0),
                            "holds": val.get("holds"), "test_lost": test["lost_images"],
                            "test_gained": test["gained_images"], "test_images": test["samples"]})
                print(json.dumps(out[-1]), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--per-class", type=int, default=40, help="images per class (default 40)")
    ap.add_argument("--clip", choices=("both", "yes", "no"), default="both", help="the rows with clip_outliers")
    ap.add_argument("--candidates", action="store_true",
                    help="one search per all-int8 candidate: val figures beside the test drop")
    ap.add_argument("--calib-images", type=int, nargs="*", default=[32], help="with --candidates (default 32)")
    ap.add_argument("--work", type=Path, default=None, help="keep data, weights and runs here (default: a temp folder)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="edgepipe-int8-table-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.pop("EDGEPIPE_PLUGINS", None)
    clips = {"both": (True, False), "yes": (True,), "no": (False,)}[args.clip]
    if args.candidates:
        rows = [c for arch in args.models for clip in clips
                for c in candidate_rows(work, arch, clip, args.per_class, args.calib_images)]
        print(f"\nevery all-int8 candidate: the search's val figures beside evaluate's test drop, "
              f"{datetime.date.today()}")
        print("| model | clip_outliers | candidate | val: agreement with float | val: logit cosine | val: net lost | "
              "holds on val | test: lost / gained | test: net lost |")
        print("|---|---|---|---:|---:|---:|---|---:|---:|")
        for c in rows:
            print(f"| {c['arch']} | {'yes' if c['clip'] else 'no'} | {c['label']} | {c['agreement']:.3f} | "
                  f"{c['cosine']:.4f} | {c['val_net_lost']:+d} of {c['images']} | {c['holds']} | "
                  f"{c['test_lost']} / {c['test_gained']} | {c['test_lost'] - c['test_gained']:+d} of "
                  f"{c['test_images']} |")
        print(f"\n(work folder: {work})")
        return 0
    rows = []
    for arch in args.models:
        for clip in clips:
            rows.append(row(work, arch, clip, args.per_class))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nint8 drop on the real-photo test split (top-1 points lost against the float ONNX model; RKNN "
          f"{EXPERIMENT}'s target, simulator), {datetime.date.today()}")
    print("| model | clip_outliers | float top-1 | normal | mmse | kl_divergence | chosen (search) | search |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "float" not in r:
            print(f"| {r['arch']} | {'yes' if r['clip'] else 'no'} | run failed: {r.get('failed')} |||||")
            continue
        drop = lambda v: f"{v:+.2f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
        search = f"{r['chosen_label'] or 'nothing held'}, {r['tried']} tried, {r['search_s'] or 0:.0f} s"
        print(f"| {r['arch']} | {'yes' if r['clip'] else 'no'} | {r['float']:.1%} | {drop(r['normal'])} | "
              f"{drop(r['mmse'])} | {drop(r['kl_divergence'])} | {drop(r['chosen'])} | {search} |")
    print(f"\n(work folder: {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
