"""What report.html shows for each stage type, read from the files the stages wrote: the dataset's counts
and skipped files, the training history, clip_outliers' per-layer weight ranges, each int8 build's
(rknn_quantize, onnx_quantize) worst layers and its int8 search's candidates, evaluate's backend
table, confusion matrices, misclassified and int8-vs-fp32 images, t-SNE and multi-crop results, and
the board packages. Every picture goes through report_figures.memo_png (drawn once per content).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from engine.contract import figures as figs
from engine.contract.plugins import backend_classes
from engine.report.run_view import RunView
from engine.report.summary import input_spec, mb, model_format, package_facts
from engine.store.runs import StageRecord

SKIPPED_SHOWN = 100  # skipped.csv rows listed; the count says how many there are
EVALUATE_VERSION = 4  # bump when the evaluate section shows something else: memoised by it
# 3: an rknn_board row is int8 without a reference row too (Backend.int8, not the kind "rknn")
# 4: the int8 gate's figures and verdict per quantized row (evaluate 4's metrics.json)


# -- dataset ------------------------------------------------------------------------------------------
def dataset_section(view: RunView, s: StageRecord, folder: Path) -> dict[str, Any]:
    counts = read_json(folder / "class_counts.json") or {}
    splits = [k for k in counts if isinstance(counts[k], dict)]
    classes = list(counts[splits[0]]) if splits else []
    rows = [[c] + [counts[k].get(c, 0) for k in splits] for c in classes]
    skipped = read_csv(folder / "skipped.csv")
    return {"splits": splits, "rows": rows, "skipped": skipped[:SKIPPED_SHOWN], "skipped_count": len(skipped),
            "spec": input_spec(folder),
            "problem": None if counts else f"no readable {folder / 'class_counts.json'}"}


# -- training -----------------------------------------------------------------------------------------
def train_section(view: RunView, s: StageRecord, folder: Path) -> dict[str, Any]:
    metrics = read_json(folder / "metrics.json") or {}
    epochs = metrics.get("epochs") or epochs_from_csv(folder / "logs" / "csv" / "metrics.csv")
    best = metrics.get("best_epoch")
    facts = {k: metrics[k] for k in ("arch", "mode", "epochs_run", "best_epoch", "val_acc", "test_acc",
                                     "train_eval_acc")
             if metrics.get(k) is not None}
    curves = None
    if epochs:
        curves = figs.png_uri(figs.memo_png(view.scratch, ("curves", figs.CURVES_VERSION, epochs, best),
                                            lambda: figs.curves_png(epochs, best)))
    return {"facts": {k: fmt(v) for k, v in facts.items()}, "curves": curves,
            "problem": None if epochs else f"no per-epoch history in {folder} (metrics.json or logs/csv/metrics.csv)"}


def epochs_from_csv(path: Path) -> list[dict[str, Any]]:
    """Lightning's CSV log has one row per logging call (0-based epochs): merge them per epoch."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for row in read_csv(path, header=True):
        try:
            epoch = int(row["epoch"]) + 1
        except (KeyError, ValueError):
            continue
        merged = by_epoch.setdefault(epoch, {"epoch": epoch})
        merged.update({k: float(v) for k, v in row.items() if k != "epoch" and v not in ("", None)})
    return [by_epoch[e] for e in sorted(by_epoch)]


# -- clip_outliers ------------------------------------------------------------------------------------
def clip_section(view: RunView, s: StageRecord, folder: Path) -> dict[str, Any]:
    report = read_json(folder / "clip_report.json") or {}
    layers = [r for r in report.get("layers") or []
              if all(f"{m}_{w}" in r for m in ("min", "max") for w in ("before", "after"))]
    summary = report.get("summary") or {}
    picture = None
    # BatchNorm scales sit near 1 and dwarf the conv ranges: drawn only when they were clipped
    drawn = [r for r in layers if r.get("kind") != "bn" or r.get("clipped")]
    if drawn:
        shown = [{k: r[k] for k in ("layer", "min_before", "max_before", "min_after", "max_after")} for r in drawn]
        picture = figs.png_uri(figs.memo_png(view.scratch, ("ranges", figs.RANGES_VERSION, shown),
                                             lambda: figs.weight_ranges_png(shown)))
    rows = [[r["layer"], r.get("kind", ""), "yes" if r.get("clipped") else (r.get("skipped_because") or "no"),
             f"{r['min_before']:.4g} .. {r['max_before']:.4g}", f"{r['min_after']:.4g} .. {r['max_after']:.4g}",
             pct(r.get("fraction_clipped"), 3)] for r in layers]
    facts = {k: fmt(v) for k, v in summary.items() if v is not None}
    return {"facts": facts, "picture": picture, "rows": rows,
            "problem": None if layers else f"no per-layer ranges in {folder / 'clip_report.json'}"}


# -- evaluate -----------------------------------------------------------------------------------------
def evaluate_section(view: RunView, s: StageRecord, folder: Path) -> dict[str, Any]:
    """_evaluate_section, memoised by the stage's key and the keys of the stages it reads (an entry
    never changes under its key), so a cached run's report reads no arrays; not kept when it names
    a path of this run folder."""
    needs = view.needs.get(s.name, {})
    if s.key is None:
        return _with_packages(view, needs, _evaluate_section(view, s, folder))
    shown = ("evaluate", EVALUATE_VERSION, s.key, sorted((i, up, view.key(up)) for i, up in needs.items()),
             figs.fonts_shown())
    run_dir = json.dumps(str(view.run_dir))[1:-1].encode()  # as it reads inside JSON
    section = figs.memo_json(view.scratch, shown, lambda: _evaluate_section(view, s, folder),
                             keep=lambda data: run_dir not in data)
    return _with_packages(view, needs, section)


def _with_packages(view: RunView, needs: dict[str, str], section: dict[str, Any]) -> dict[str, Any]:
    """Each backend row's packages and what became of them (this run's, so never memoised)."""
    for r in section.get("rows") or []:
        r["shipped_by"] = shipped_by(view, needs.get(r["input"]))
    return section


def _evaluate_section(view: RunView, s: StageRecord, folder: Path) -> dict[str, Any]:
    from engine.report.images import ImagePictures, tsne  # numpy

    report = read_json(folder / "metrics.json") or {}
    backends = report.get("backends") or {}
    if not backends:
        return {"split": "?", "samples": "?", "problem": f"no readable {view.shown(folder / 'metrics.json')}"}
    classes = report.get("classes") or []
    ref = report.get("reference")
    needs = view.needs.get(s.name, {})
    rows = [backend_row(n, row, ref, view.folder(needs[n]) if n in needs else None) for n, row in backends.items()]
    int8 = [r for r in rows if r["int8"] and r["top1"] is not None]
    best = max(int8, key=lambda r: r["top1"])["name"] if int8 else None
    for r in rows:
        r["best_int8"] = r["name"] == best
    pictures = ImagePictures(view, folder, needs.get("data"), report, classes)
    per_backend = [{"name": n, "confusion": confusion_uri(view, folder, n, row, classes),
                    "wrong": pictures.misclassified(n)} for n, row in backends.items()]
    disagree = [pictures.disagreement(r["name"], ref) for r in rows if r["int8"] and ref]
    multicrop = [[n, row["multicrop"].get("crops"), pct(row.get("top1")), pct(row["multicrop"].get("top1_mean")),
                  pct(row["multicrop"].get("top1_vote")), row["multicrop"].get("undecided")]
                 for n, row in backends.items() if isinstance(row.get("multicrop"), dict)]
    return {"split": report.get("split", "?"), "samples": report.get("samples", "?"), "reference": ref,
            "classes": classes, "rows": rows, "per_backend": per_backend, "disagree": disagree,
            "tsne": tsne(view, folder, classes), "multicrop": multicrop, "unresolved": unresolved(report),
            "images_problem": pictures.problem, "problem": None}


def unresolved(report: dict[str, Any]) -> list[str]:
    """One sentence per quantized row whose split cannot resolve the int8 target (one image > the target)."""
    target = (report.get("targets") or {}).get("quant_max_drop_points")
    return [f"{name}: the {report.get('split', '?')} split cannot resolve the {fmt(target)}-point target: one image "
            f"= {points(row.get('resolution_points'))} points > {fmt(target)}; the verdict is the rule's, in whole "
            f"images, and the interval shows how far the true drop may lie"
            for name, row in (report.get("backends") or {}).items()
            if isinstance(row, dict) and row.get("resolved") is False]


def confusion_uri(view: RunView, folder: Path, name: str, row: dict[str, Any], classes: list[str]) -> str | None:
    """The backend's confusion matrix drawn from metrics.json with the fonts installed now (evaluate's
    own PNG, from a cache entry maybe drawn before a CJK font was, only when the numbers are missing)."""
    cm = row.get("confusion")
    if not (isinstance(cm, list) and len(cm) == len(classes) and all(isinstance(r, list) for r in cm)):
        return png_file_uri(folder / f"confusion_{safe_name(name)}.png")
    title = f"{name} ({row.get('kind', '')}): top-1 {pct(row.get('top1'))} on {row.get('samples', '?')}"
    return figs.png_uri(figs.memo_png(view.scratch, ("confusion", figs.CONFUSION_VERSION, cm, classes, title),
                                      lambda: figs.confusion_png(cm, classes, title)))


def backend_row(name: str, row: dict[str, Any], reference: str | None, model_folder: Path | None) -> dict[str, Any]:
    verdict = {True: "pass", False: "fail", None: ""}[row.get("target_met")]
    per_class = row.get("per_class") or {}
    found = model_format(model_folder) if model_folder else None
    return {"name": name, "input": row.get("input", name),
            "kind": row.get("kind", "") + (f" ({row['detail']})" if row.get("detail") else ""),
            "samples": row.get("samples", ""), "top1": row.get("top1"), "top1_text": pct(row.get("top1")),
            "change": f"{-row['drop_points'] + 0.0:+.2f}" if "drop_points" in row else "",
            "agreement": pct(row.get("agreement")),
            "max_abs_diff": f"{row['max_abs_diff']:.3g}" if "max_abs_diff" in row else "",
            "size": mb(found[1]) if found else "", "int8": is_int8(row),
            "verdict": "reference" if name == reference else verdict, "target": row.get("target", ""),
            "missed": row.get("missed", ""), "gate": gate_cells(row),
            "per_class": {c: pct(v, 1) for c, v in per_class.items()}}


def gate_cells(row: dict[str, Any]) -> dict[str, Any] | None:
    """A quantized row's int8 gate (stages.common.quant_gate, as evaluate wrote it) as text; None for others
    and for rows an older evaluate wrote."""
    if "lost_images" not in row:
        return None
    ci = row.get("drop_ci95") or ["", ""]
    splits = row.get("label_free_splits") or []
    return {"lost": row["lost_images"], "gained": row.get("gained_images", ""),
            "drop": f"{row['drop_points']:+.2f}" if isinstance(row.get("drop_points"), (int, float)) else "",
            "interval": f"{ci[0]:+.2f} to {ci[1]:+.2f}" if all(isinstance(v, (int, float)) for v in ci) else "",
            "resolution": points(row.get("resolution_points")), "allowed": row.get("allowed_images", ""),
            "cosine": f"{row['logit_cosine']:.4f}" if isinstance(row.get("logit_cosine"), (int, float)) else "",
            "agreement": pct(row.get("agreement")),
            "over": f"{' + '.join(splits)} ({row.get('label_free_images', '?')} images)" if splits else "",
            "holds": row.get("target_met") is True, "verdict": row.get("verdict", "")}


def shipped_by(view: RunView, model_stage: str | None) -> list[dict[str, str]]:
    """The package stages whose `model` is model_stage, with what became of them (a package refused for
    a missed target failed): a miss there is fatal, a miss elsewhere only reported."""
    if model_stage is None:
        return []
    return [{"stage": pkg, "status": rec.status} for pkg, wiring in view.needs.items()
            if wiring.get("model") == model_stage and (rec := view.record.stages.get(pkg)) and rec.type == "package"]


def is_int8(row: dict[str, Any]) -> bool:
    """A quantized backend: evaluate scored it against the top-1 drop target, or its backend class says
    it is int8 (RKNN builds; the registry through the entry points, engine/config/registry.py)."""
    return (str(row.get("target", "")).startswith("top-1 drop")
            or row.get("kind") in {cls.kind for cls in backend_classes() if cls.int8})


# -- rknn_quantize, onnx_quantize: where int8 hurts, and the int8 search ------------------------------
WORST_SHOWN = 10  # layers in each worst-layers table
COSINE_VERSION = 1  # bump when the cosine picture is drawn differently


def rknn_section(view: RunView, s: StageRecord, folder: Path) -> dict[str, Any]:
    """An RKNN build: its worst layers by accuracy_analysis (layers.json) as a table and its cosine along
    the network as a picture; with quantize.search, the candidates tried (search.json), the shipped one
    marked, each missed candidate with its own worst layers."""
    build = read_json(folder / "build.json") or {}
    facts = {k: fmt(build[k]) for k in ("target", "algorithm", "method", "dtype", "calibration_images")
             if build.get(k) is not None}
    if build.get("float_layers"):
        facts["layers in float"] = f"{len(build['float_layers'])} ({build.get('float_layer_dtype')})"
    layers = (read_json(folder / "layers.json") or {}).get("layers") or []
    section = int8_section(view, facts, layers, read_json(folder / "search.json"), "accuracy_analysis")
    if section["search"] is None and not layers:
        section["problem"] = f"no per-layer analysis in {folder} (quantize.accuracy_analysis_samples=0?)"
    return section


def onnx_quantize_section(view: RunView, s: StageRecord, folder: Path) -> dict[str, Any]:
    """ONNX Runtime's int8 (onnx_quantize): what ships (int8.json, or the float model when no candidate
    held), its search's candidates (search.json) with the shipped one marked, and the worst nodes of the
    shipped build (or of the best candidate) when the search ranked them."""
    search = read_json(folder / "search.json") or {}
    int8 = read_json(folder / "int8.json") or {}
    facts = {"toolkit": fmt(search.get("toolkit", "onnxruntime")), "ships": search.get("shipped", "?")}
    if int8:
        facts.update({"calibrator": fmt(int8.get("calibrator")),
                      "weights": "per channel" if int8.get("per_channel") else "per tensor",
                      "calibration_images": fmt(int8.get("calibration_images")),
                      "nodes in float": fmt(len(int8.get("float_nodes") or []))})
    chosen = (search.get("chosen") or {}).get("index")
    candidates = search.get("candidates") or []
    layers = candidates[chosen].get("layers") or [] if isinstance(chosen, int) and chosen < len(candidates) else []
    return int8_section(view, facts, sorted(layers, key=lambda x: x.get("position", 0)), search or None,
                        "each node reverted to float alone")


def int8_section(view: RunView, facts: dict[str, str], layers: list[dict[str, Any]],
                 search: dict[str, Any] | None, ranked_by: str) -> dict[str, Any]:
    """The part every int8 stage's section shares (quant_search's search.json, whatever the toolkit): the
    shipped build's worst layers and cosine picture (the best candidate's when nothing shipped; ``ranked_by``
    says how the toolkit scored them) and the candidates tried, the shipped one marked."""
    layers_of = "the shipped build" if search is not None else "the build"
    best = (search or {}).get("best") or {}
    candidates = (search or {}).get("candidates") or []
    if not layers and isinstance(best.get("index"), int) and best["index"] < len(candidates):
        # nothing shipped: where int8 hurts the best candidate
        layers = sorted(candidates[best["index"]].get("layers") or [], key=lambda x: x.get("position", 0))
        layers_of = f"the best candidate, {best.get('label', '')}"
    return {"facts": facts, "worst": worst_layers(layers), "cosine": cosine_uri(view, layers, ranked_by),
            "layers_of": layers_of, "ranked_by": ranked_by,
            "search": search_rows(search) if search is not None else None, "problem": None}


def worst_layers(layers: list[dict[str, Any]], shown: int = WORST_SHOWN) -> list[list[str]]:
    """[layer, op type, cosine alone, cosine accumulated] of the worst layers (lowest cosine alone)."""
    scored = [x for x in layers if isinstance(x.get("cosine_alone"), (int, float))]
    scored.sort(key=lambda x: x["cosine_alone"])
    return [[x.get("name", ""), x.get("op_type", ""), f"{x['cosine_alone']:.5f}",
             f"{x['cosine_accumulated']:.5f}" if isinstance(x.get("cosine_accumulated"), (int, float)) else ""]
            for x in scored[:shown]]


def search_rows(search: dict[str, Any]) -> dict[str, Any]:
    """search.json as the template shows it: one row per candidate, the chosen one marked."""
    chosen = (search.get("chosen") or {}).get("index")
    rows = []
    for i, c in enumerate(search.get("candidates") or []):
        if c.get("failed"):
            verdict = "failed"
        elif c.get("holds"):
            verdict = "holds"
        else:
            verdict = "missed" if c.get("complete") else "rejected early"
        rows.append({"label": c.get("label", ""), "algorithm": c.get("algorithm", ""), "method": c.get("method", ""),
                     "calibration_images": c.get("calibration_images", ""),
                     "float_layers": len(c.get("float_layers") or []), "step": c.get("step", ""),
                     "top1": pct(c.get("selection_top1")), "agreement": pct(c.get("agreement")),
                     "cosine": f"{c['cosine']:.4f}" if isinstance(c.get("cosine"), (int, float)) else "",
                     "images": f"-{c.get('lost_images', 0)} +{c.get('gained_images', 0)}" if c.get("images") else "",
                     "verdict": verdict, "reason": c.get("failed") or c.get("reason", ""),
                     "seconds": fmt(c.get("seconds")), "cached": "cached" if c.get("cached") else "built",
                     "chosen": i == chosen, "worst": worst_layers(c.get("layers") or [], 5)})
    selection = search.get("selection") or {}
    return {"rows": rows, "chosen": chosen is not None, "reason": search.get("reason", ""),
            "next_step": search.get("next_step"), "target": search.get("target_points"),
            "split": selection.get("split", "val"), "images": selection.get("images", "?"),
            "float_top1": pct(selection.get("float_top1")), "float_dtype": search.get("float_layer_dtype", ""),
            "seconds": fmt(search.get("seconds")), "budget_spent": bool(search.get("budget_spent"))}


def cosine_uri(view: RunView, layers: list[dict[str, Any]], ranked_by: str) -> str | None:
    points = [[x.get("position", i), x.get("cosine_alone"), x.get("cosine_accumulated"), x.get("name", "")]
              for i, x in enumerate(layers) if isinstance(x.get("cosine_alone"), (int, float))]
    if not points:
        return None
    return figs.png_uri(figs.memo_png(view.scratch, ("rknn cosine", COSINE_VERSION, points, ranked_by),
                                      lambda: cosine_png(points, ranked_by)))


def cosine_png(points: list[list[Any]], ranked_by: str) -> bytes:
    """Cosine (int8 simulator vs float) of each layer along the network, alone and accumulated; the five
    worst named. Drawn only when the memo misses (matplotlib is imported here, not on the page path)."""
    import io

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"font.family": figs.font_families()}):
        fig = Figure(figsize=(min(max(6.0, 0.06 * len(points) + 4), 16), 3.6), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        xs = list(range(len(points)))
        ax.plot(xs, [p[2] if p[2] is not None else float("nan") for p in points], color="tab:gray",
                label="accumulated (every layer before it in int8 too)")
        ax.plot(xs, [p[1] for p in points], color="tab:blue", marker=".", linewidth=0.8,
                label="alone (float inputs)")
        for i in sorted(xs, key=lambda i: points[i][1])[:5]:
            ax.annotate(str(points[i][3]).rsplit("/", 2)[-2] if "/" in str(points[i][3]) else str(points[i][3]),
                        (i, points[i][1]), fontsize=6, rotation=30, color="tab:red")
        ax.set_xlabel("layer along the network (input -> output)")
        ax.set_ylabel("cosine vs float")
        ax.set_title(f"where int8 hurts: per-layer cosine ({ranked_by})")
        ax.legend(fontsize=7, loc="lower left")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# -- package ------------------------------------------------------------------------------------------
def package_section(view: RunView, s: StageRecord, folder: Path) -> dict[str, Any]:
    facts = package_facts(folder)
    link = view.run_dir / "stages" / s.name
    base = link if link.exists() else folder
    return {**facts, "folder": str(base / "package"), "zip": str(base / "package.zip") if facts["zip"] else "",
            "error": s.error if s.status == "failed" else ""}


# -- small helpers ------------------------------------------------------------------------------------
def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_csv(path: Path, header: bool = False) -> list:
    """Rows after the header (as lists), or as dicts with header=True; [] when unreadable."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if header:
                return list(csv.DictReader(f))
            return list(csv.reader(f))[1:]
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def png_file_uri(path: Path) -> str | None:
    try:
        return figs.png_uri(path.read_bytes())
    except OSError:
        return None


def safe_name(name: str) -> str:
    """evaluate's file-name rule for confusion_<backend>.png (stages.evaluate._safe)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def pct(v: Any, digits: int = 2) -> str:
    return f"{v:.{digits}%}" if isinstance(v, (int, float)) and not isinstance(v, bool) else ""


def fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def points(v: Any) -> str:
    """Top-1 points as evaluate's eval.md writes one image's weight (1.39)."""
    return f"{v:.3g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else ""


READERS = {"dataset": dataset_section, "train": train_section, "clip_outliers": clip_section,
           "rknn_quantize": rknn_section, "onnx_quantize": onnx_quantize_section, "evaluate": evaluate_section,
           "package": package_section}
