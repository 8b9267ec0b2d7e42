"""The int8 gate: what a quantized build lost against its float source, and whether that holds a target.

One rule for every place that judges a quantized build (evaluate's rows, the quantization search on
its selection split, the package stage through evaluate's ``target_met``), so they cannot disagree.

Both models see the same images, so the comparison is paired: only the images on which they differ
(the flips) carry information. ``lost`` images were right in float and wrong in int8, ``gained`` the
other way round; the net drop is ``(lost - gained) / n``.

The rule (``judge``), in whole images because that is what a split can resolve:

- ``allowed_images = ceil(max_drop_points * n / 100)``: the target rounded *up* to whole images. A
  1-point target on 72 images allows one image (1.39 points); on 1,000 images, ten; a 0-point target
  allows none.
- A build **holds** when its net loss ``lost - gained`` is at most ``allowed_images``, else it
  **misses**. Nothing else decides: the interval below is reported, not used, so a build is never
  refused or passed on an interval's width alone.
- ``resolved`` says whether the data can tell at all (one image is at most the target's points, or
  the target is 0: no net loss, which any split decides);
  when it cannot, evaluate and the search say so in words, and the interval shows how far the truth
  may lie from the figure.

The 95% interval on the drop (``drop_ci95``, points) is exact on the flips and needs no resampling:
Clopper-Pearson intervals for the flip rate ``(lost + gained) / n`` and for the share of the flips
that are losses, each at 97.5%, combined (Bonferroni), so together they cover the drop at least 95%
of the time. With no flip on 72 images it is still [-5.9, +5.9]: 72 agreeing images cannot rule out
a 6% flip rate.

Label-free figures, for any split (labels or not): ``agreement`` (same top-1 as float) and
``logit_cosine`` (mean cosine between the two logit vectors).

Imports numpy and scipy (scipy only for the interval): import it inside a stage's ``run``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# each of the two Clopper-Pearson intervals is taken at 1 - ALPHA / 2, so together they cover 1 - ALPHA
ALPHA = 0.05
CI_METHOD = ("exact: Clopper-Pearson intervals on the flip rate and on the lost share of the flips, "
             "each at 97.5%, combined (covers the drop at least 95%)")


@dataclass(frozen=True)
class PairedDrop:
    """A quantized build against its float source on the same labelled images."""

    n: int
    lost: int  # right in float, wrong in the quantized build
    gained: int  # wrong in float, right in the quantized build
    float_top1: float
    quant_top1: float
    drop_points: float  # (lost - gained) / n in top-1 points
    drop_ci95: tuple[float, float]  # points
    resolution_points: float  # one image, in points

    @property
    def net_lost_images(self) -> int:
        return self.lost - self.gained

    def as_row(self) -> dict:
        row = asdict(self)
        row["drop_ci95"] = list(self.drop_ci95)
        row["lost_images"], row["gained_images"] = row.pop("lost"), row.pop("gained")
        return row


@dataclass(frozen=True)
class Verdict:
    holds: bool
    allowed_images: int
    resolved: bool  # one image is at most the target: the split can tell the target apart
    reason: str  # one line: why it holds or misses, in images and points


def paired_drop(labels: np.ndarray, float_logits: np.ndarray, quant_logits: np.ndarray) -> PairedDrop:
    """The paired comparison of two N x C logit arrays on the same N labelled images."""
    y = np.asarray(labels).reshape(-1)
    n = int(len(y))
    if n == 0 or len(float_logits) != n or len(quant_logits) != n:
        raise ValueError(f"paired_drop needs logits for every one of the {n} labels "
                         f"(got {len(float_logits)} and {len(quant_logits)})")
    f_ok = np.asarray(float_logits).argmax(1) == y
    q_ok = np.asarray(quant_logits).argmax(1) == y
    lost, gained = int(np.sum(f_ok & ~q_ok)), int(np.sum(~f_ok & q_ok))
    return PairedDrop(
        n=n, lost=lost, gained=gained,
        float_top1=float(f_ok.mean()), quant_top1=float(q_ok.mean()),
        drop_points=round(100.0 * (lost - gained) / n, 4),
        drop_ci95=drop_interval(lost, gained, n),
        resolution_points=round(100.0 / n, 4),
    )


def drop_interval(lost: int, gained: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """A (1 - alpha) interval on the net drop (points), exact on the flips (see the module's text)."""
    from scipy.stats import beta

    def clopper_pearson(k: int, m: int, level: float) -> tuple[float, float]:
        a = 1.0 - level
        lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, m - k + 1))
        hi = 1.0 if k == m else float(beta.ppf(1 - a / 2, k + 1, m - k))
        return lo, hi

    flips = lost + gained
    level = 1.0 - alpha / 2
    rate_lo, rate_hi = clopper_pearson(flips, n, level)
    share_lo, share_hi = clopper_pearson(lost, flips, level) if flips else (0.0, 1.0)
    # drop = rate * (2 share - 1): linear in each, so its extremes are at the corners of the box
    corners = [r * (2 * s - 1) for r in (rate_lo, rate_hi) for s in (share_lo, share_hi)]
    return round(100.0 * min(corners), 2), round(100.0 * max(corners), 2)


def judge(drop: PairedDrop, max_drop_points: float) -> Verdict:
    """The gate's rule: holds when the net loss in images is at most the target rounded up to whole images."""
    allowed = math.ceil(max_drop_points * drop.n / 100.0 - 1e-9)
    # a 0-point target is whole images already (no net loss): any split tells it apart
    resolved = max_drop_points == 0 or drop.resolution_points <= max_drop_points
    holds = drop.net_lost_images <= allowed
    net = drop.net_lost_images
    said = (f"net {net:+d} image{'s' if abs(net) != 1 else ''} of {drop.n} ({drop.drop_points:+.2f} points; "
            f"{drop.lost} lost, {drop.gained} gained; 95% interval {drop.drop_ci95[0]:+.2f} to "
            f"{drop.drop_ci95[1]:+.2f})")
    limit = f"{allowed} image{'s' if allowed != 1 else ''} allowed by the {max_drop_points:g}-point target"
    reason = f"{said} {'<=' if holds else '>'} {limit}"
    if not resolved:
        reason += f"; one image is {drop.resolution_points:.3g} points here, so this split cannot resolve the target"
    return Verdict(holds=holds, allowed_images=allowed, resolved=resolved, reason=reason)


def agreement_and_cosine(float_logits: np.ndarray, quant_logits: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean logit cosine) of two N x C logit arrays: needs no labels."""
    a = np.asarray(float_logits, np.float64)
    b = np.asarray(quant_logits, np.float64)
    if len(a) == 0 or a.shape != b.shape:
        raise ValueError(f"agreement_and_cosine needs two logit arrays of one shape (got {a.shape} and {b.shape})")
    agreement = float((a.argmax(1) == b.argmax(1)).mean())
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, (a * b).sum(1) / np.where(norms > 0, norms, 1.0), 1.0)
    return agreement, float(cos.mean())
