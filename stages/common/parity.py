"""Parity checks between two backends of the same model, shared by every converting stage.

Each converting stage (``export_onnx``, ``export_torchscript``, ``ncnn``) runs the model it produced
and the model it started from, both loaded through the backend registry (``backends.base``, the
``edgepipe.backends`` entry points), on the same inputs and records how far apart the logits are, so
a conversion is verified, never assumed:

    reference = load_backend("torch", src, batch=None)          # one sample at a time
    candidate = load_backend("onnx", out, {"input": "input0"})
    result = check_backends(reference, candidate, spec, params, out, what="ONNX Runtime vs PyTorch",
                            hint="Raise export.tolerance only if you accept that difference")

``check_backends`` draws the inputs (``sample_inputs``), compares (``compare``), writes
``parity.json`` and raises StageError above the tolerance (``check``). This module holds only what
is not a backend: inputs, the comparison and its rule, the report.

Inputs come in two kinds: ``random`` (standard normal in the normalised space, which also exercises
values outside the range real pixels reach) and ``synthetic`` (image-like uint8 pictures -- smooth
gradients, filled shapes, mild noise -- put through ``stages.common.preprocess.normalize``, i.e.
exactly the values a real image gives). The export stages only see a model bundle, not the dataset,
so "real-looking" inputs are drawn rather than read.

The pass/fail rule is scale-aware (``RULE``)::

    max_abs_diff <= tolerance + RTOL * (max - min of the reference logits)

``tolerance`` (the stage's ``tolerance`` setting) bounds the difference for ordinary logits; the
relative part lets a legitimate model whose logits run into the thousands through: float32 carries
about 7 significant digits, so two correct backends differ there by 1e-3 or more (0.0078 was seen
on logits in the thousands), while a wrong conversion misses by a sizeable fraction of the range.
For logits spanning 20, RTOL adds 0.002. ``parity.json`` records both figures: ``max_abs_diff``
and ``max_rel_diff`` (``max_abs_diff`` over the reference range), with ``allowed_abs_diff``, ``rtol``
and ``rule``. Top-1 agreement is recorded as well; it follows from the rule: with every logit within
``allowed`` of the reference, the top-1 class can only change on a sample whose two best reference
logits are within ``2 * allowed`` of each other (a tie at that precision).

"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.contract.stage import StageError

if TYPE_CHECKING:  # pragma: no cover
    from stages.common.preprocess import Preprocess

KINDS = ("random", "synthetic")
# relative part of the pass rule: a fraction of the reference logits' range (max - min)
RTOL = 1e-4
RULE = "max_abs_diff <= tolerance + rtol * reference_range"


# -- inputs -----------------------------------------------------------------------------------------
def synthetic_images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``count`` image-like uint8 N x H x W x 3 RGB pictures: a smooth two-colour gradient, a few
    filled ellipses and rectangles, and mild pixel noise. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy /= max(height - 1, 1)
    xx /= max(width - 1, 1)
    out = np.empty((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        angle = rng.uniform(0, 2 * math.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]
        for _ in range(int(rng.integers(1, 5))):
            colour = rng.uniform(0, 255, 3)
            cy, cx = rng.uniform(0, 1, 2)
            ry, rx = rng.uniform(0.08, 0.4, 2)
            if rng.random() < 0.5:
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            else:
                mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
            img[mask] = colour
        img += rng.normal(0, 6, img.shape)
        out[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def sample_inputs(
    spec: Preprocess, count: int = 8, seed: int = 0, channels: int = 3
) -> tuple[np.ndarray, list[str]]:
    """``count`` float32 model inputs (N x C x H x W) and their kinds: the first half ``random``
    (standard normal), the rest ``synthetic`` (image-like pictures normalised with ``spec``)."""
    from stages.common.preprocess import normalize

    if count < 1:
        raise ValueError("count must be >= 1")
    h, w = spec.height, spec.width
    n_random = count // 2
    n_synth = count - n_random
    rng = np.random.default_rng(seed)
    random = rng.standard_normal((n_random, channels, h, w)).astype(np.float32)
    synth = normalize(synthetic_images(n_synth, h, w, seed=seed + 1), spec)
    if channels != synth.shape[1]:
        raise ValueError(f"synthetic images have {synth.shape[1]} channels, the model takes {channels}")
    x = np.ascontiguousarray(np.concatenate([random, synth]), dtype=np.float32)
    return x, ["random"] * n_random + ["synthetic"] * n_synth


# -- comparison ---------------------------------------------------------------------------------------
def _stats(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    finite = bool(np.isfinite(got).all())
    return {
        "samples": int(len(ref)),
        "max_abs_diff": float(diff.max()) if finite else float("inf"),
        "mean_abs_diff": float(diff.mean()) if finite else float("inf"),
        "top1_agreement": float(np.mean(ref.argmax(1) == got.argmax(1))) if len(ref) else 1.0,
    }


def allowed_abs_diff(reference: np.ndarray, tolerance: float, rtol: float = RTOL) -> float:
    """The largest max abs logit difference that passes (``RULE``): ``tolerance`` plus ``rtol`` times
    the range (max - min) of the reference logits."""
    ref = np.asarray(reference, dtype=np.float64)
    return float(tolerance) + float(rtol) * (float(ref.max() - ref.min()) if ref.size else 0.0)


def compare(
    reference: np.ndarray,
    candidate: np.ndarray,
    kinds: Sequence[str] | None = None,
    *,
    reference_name: str,
    candidate_name: str,
    tolerance: float,
    rtol: float = RTOL,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Compare two N x K logit arrays: max/mean abs difference, top-1 agreement, overall and per
    input kind; ``passed`` is ``max_abs_diff <= tolerance + rtol * (reference max - min)`` (and all
    candidate values finite)."""
    ref = np.asarray(reference, dtype=np.float32).reshape(len(reference), -1)
    got = np.asarray(candidate, dtype=np.float32).reshape(len(candidate), -1)
    if ref.shape != got.shape:
        raise StageError(
            f"{candidate_name} gives outputs of shape {list(got.shape)}, {reference_name} {list(ref.shape)}"
        )
    result: dict[str, Any] = {"reference": reference_name, "candidate": candidate_name}
    result.update(_stats(ref, got))
    span = float(ref.max() - ref.min()) if ref.size else 0.0
    allowed = allowed_abs_diff(ref, tolerance, rtol)
    result["max_rel_diff"] = (result["max_abs_diff"] / span if span > 0
                              else (0.0 if result["max_abs_diff"] == 0 else float("inf")))
    result["tolerance"] = float(tolerance)
    result["rtol"] = float(rtol)
    result["allowed_abs_diff"] = allowed
    result["rule"] = RULE
    result["passed"] = bool(np.isfinite(got).all()) and result["max_abs_diff"] <= allowed
    result["reference_logit_range"] = [float(ref.min()), float(ref.max())] if ref.size else [0.0, 0.0]
    if kinds is not None:
        kinds = list(kinds)
        result["by_kind"] = {
            k: _stats(ref[[i for i, kk in enumerate(kinds) if kk == k]],
                      got[[i for i, kk in enumerate(kinds) if kk == k]])
            for k in dict.fromkeys(kinds)
        }
    if extra:
        result.update(extra)
    return result


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_parity(path: str | Path, result: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.write_text(json.dumps(_json_safe(dict(result)), indent=2) + "\n", encoding="utf-8")
    return path


def check(result: Mapping[str, Any], what: str, report: str | Path | None = None, hint: str = "") -> None:
    """Raise StageError when ``result`` did not pass, saying by how much it missed the allowed
    difference (the tolerance plus its share of the reference logit range).

    The message carries every number the user needs. ``report`` (a path shown in the message) is for
    files that outlive the failure: the engine deletes a failed stage's output folder."""
    if result.get("passed"):
        return
    tol = result["tolerance"]
    allowed = result.get("allowed_abs_diff", tol)
    diff = result["max_abs_diff"]
    where = f" (details: {report})" if report else ""
    if not math.isfinite(diff):
        msg = f"{what}: the converted model gives NaN/inf outputs{where}"
    else:
        lo, hi = result.get("reference_logit_range", (0.0, 0.0))
        msg = (
            f"{what}: max abs logit difference {diff:.3g} is {diff - allowed:.3g} above the tolerance {allowed:.3g} "
            f"({diff / allowed:.1f}x; {tol:g} + {result.get('rtol', 0.0):g} x the reference logit range "
            f"{hi - lo:.3g}); top-1 agreement {result['top1_agreement']:.1%} on {result['samples']} samples{where}"
        )
    if hint:
        msg += f". {hint}"
    raise StageError(msg)


def check_backends(reference, candidate, spec, params, out: Path, *, what: str, hint: str = "",
                   extra: Mapping[str, Any] | None = None, channels: int = 3) -> dict[str, Any]:
    """Both backends on ``params.parity_samples`` sample inputs (seed ``params.seed``), compared with
    ``params.tolerance``; writes ``out/parity.json``, raises StageError when it misses (``check``)."""
    x, kinds = sample_inputs(spec, params.parity_samples, params.seed, channels=channels)
    result = compare(reference.logits(x), candidate.logits(x), kinds, reference_name=reference.name,
                     candidate_name=candidate.name, tolerance=params.tolerance,
                     extra={"seed": params.seed, **(extra or {})})
    write_parity(Path(out) / "parity.json", result)
    check(result, what, hint=hint)
    return result


def metrics(result: Mapping[str, Any], prefix: str = "parity_") -> dict[str, Any]:
    """The headline numbers of a parity result, for a stage's returned metrics."""
    return {
        f"{prefix}max_abs_diff": result["max_abs_diff"],
        f"{prefix}top1_agreement": result["top1_agreement"],
        f"{prefix}samples": result["samples"],
    }
