"""Accuracy-aware int8: one search contract that every quantization toolkit implements.

A toolkit (rknn-toolkit2, ONNX Runtime's static quantizer, ...) implements ``Quantizer``; ``search``
does the rest and knows nothing of any toolkit:

1. **All-int8 candidates, cheapest first** (``Quantizer.candidates()``: calibration algorithm x weight
   granularity x class-balanced calibration subset). Each is built, run on the **selection split**
   (val: never the split whose figure evaluate reports) and judged by ``stages.common.quant_gate.judge``,
   the one rule. The first candidate that holds is chosen.
2. **Early rejection** of a candidate that already trails: once one candidate ran the whole selection
   split, a later one's pass stops as soon as its net loss, less all that the rest of the split could
   still win back, exceeds both the target's allowance and the best complete candidate's net loss
   (``SelectionPass.feed`` returns False): it can neither hold nor become the best. The best candidate
   (the hybrid search's base, the one a failed search names) has therefore always run in full.
3. **Hybrid** (when no all-int8 candidate holds and ``hybrid`` is on): from the best candidate, its
   worst layers (the toolkit's ranking on the images where float and int8 disagree most) move to float
   ``step`` at a time; a step that makes the selection figure worse is taken back and the next layers
   of the ranking are tried instead; at most ``max_float_layers``.
   Then the toolkit's own hybrid builds, if it offers any (``toolkit_hybrid``, optional).
4. A **time budget** (``budget_s``): no new build starts once it is spent (cached candidates still count).

Every candidate is **cached on its own** under ``cache_dir/<key>/`` (the key: the toolkit's identity,
i.e. its name, version, model and calibration digests and settings, the selection split's digest and
the candidate), built in a temp folder and renamed into place, under a per-key lock: a second run, a
sweep or a wider search reuses what was built. A cached folder holds the toolkit's files plus
``candidate.json`` (this module's record) and ``selection_logits.npy``.

A toolkit exception, or an exception the toolkit only *logged* (some toolkit versions log one inside
mmse and still write a worse model), fails that candidate: the quantizer raises ``CandidateFailed``
(cached: the same inputs fail the same way) or any other exception (not cached).

The result (``SearchResult``) names the chosen candidate (cheapest that holds: all-int8 before hybrid,
fewer float layers first) and why, or, when nothing holds, the best candidate, its drop and the next
step (``SearchResult.line``).

Imports numpy (through quant_gate): import it inside a stage's ``run``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from engine.contract.locks import held
from stages.common.quant_gate import agreement_and_cosine, judge, paired_drop

RECORD = "candidate.json"
SELECTION_LOGITS = "selection_logits.npy"
# bump when what a cached candidate folder holds, or how it is judged from it, changes
FORMAT = 1


class CandidateFailed(Exception):
    """The toolkit failed this candidate (raised, or logged an exception): one line why."""


@dataclass(frozen=True)
class Candidate:
    """One way to quantize the model. Toolkit-neutral: what each value means is the toolkit's."""

    algorithm: str  # the calibration algorithm (rknn: normal/mmse/kl_divergence; ORT: minmax/entropy/percentile)
    granularity: str  # weight scales: "channel" or "layer"
    calib_images: int  # the size of the class-balanced, seeded calibration subset
    float_layers: tuple[str, ...] = ()  # layers kept in float (hybrid); () is all-int8
    variant: str = ""  # a toolkit's own extra (e.g. rknn "auto_hybrid"); "" for none

    @property
    def hybrid(self) -> bool:
        return bool(self.float_layers) or bool(self.variant)

    @property
    def label(self) -> str:
        text = f"{self.algorithm}/{self.granularity}/{self.calib_images}"
        if self.variant:
            text += f" {self.variant}"
        if self.float_layers:
            text += f" +{len(self.float_layers)} float"
        return text

    def key(self) -> str:
        """A stable text of every field (the float layers in their order), for cache keys."""
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["float_layers"] = list(self.float_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        return cls(algorithm=str(d["algorithm"]), granularity=str(d["granularity"]),
                   calib_images=int(d["calib_images"]), float_layers=tuple(str(x) for x in d.get("float_layers", ())),
                   variant=str(d.get("variant", "")))


@dataclass(frozen=True)
class LayerScore:
    """One layer of a toolkit's ranking: how far its output drifts from float, alone and accumulated."""

    name: str
    op_type: str
    cosine_alone: float | None  # the layer quantized alone, on float inputs
    cosine_accumulated: float | None  # the layer's output with every layer before it quantized too
    position: int = -1  # its place along the network (0: nearest the input; -1: unknown)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerScore:
        def num(v):
            return None if v is None else float(v)

        return cls(str(d["name"]), str(d.get("op_type", "")), num(d.get("cosine_alone")),
                   num(d.get("cosine_accumulated")), int(d.get("position", -1)))


class SelectionPass:
    """The selection split as one candidate sees it: the quantizer feeds its logits in order, the pass
    says when the candidate can no longer hold, and ranks the images by how much int8 disagrees."""

    def __init__(self, labels: np.ndarray, float_logits: np.ndarray, reject_above: int | None) -> None:
        self.labels = np.asarray(labels).reshape(-1)
        self.float_logits = np.asarray(float_logits, np.float32)
        self.n = len(self.labels)
        self.reject_above = reject_above  # net images lost beyond which the candidate is out (None: never)
        float_ok = self.float_logits.argmax(1) == self.labels
        # what the images from i on could still win back at most: those float gets wrong
        self._winnable_from = np.concatenate([np.cumsum(~float_ok[::-1])[::-1], [0]])
        self._float_ok = float_ok
        self._parts: list[np.ndarray] = []
        self.seen = 0
        self.rejected = False

    def feed(self, logits: np.ndarray) -> bool:
        """Take the next rows' logits; False once the net loss so far, less all that the rest could win
        back, exceeds ``reject_above`` (the candidate trails: stop its pass)."""
        logits = np.asarray(logits, np.float32).reshape(len(logits), -1)
        if self.seen + len(logits) > self.n:
            raise ValueError(f"fed {self.seen + len(logits)} rows for a selection split of {self.n}")
        self._parts.append(logits)
        self.seen += len(logits)
        if self.rejected:
            return False
        if self.reject_above is not None:
            self.rejected = self.net_lost_so_far() - self._winnable_from[self.seen] > self.reject_above
        return not self.rejected

    def net_lost_so_far(self) -> int:
        if not self.seen:
            return 0
        q_ok = self.logits().argmax(1) == self.labels[: self.seen]
        f_ok = self._float_ok[: self.seen]
        return int(np.sum(f_ok & ~q_ok)) - int(np.sum(~f_ok & q_ok))

    @property
    def complete(self) -> bool:
        return self.seen == self.n

    def logits(self) -> np.ndarray:
        return np.concatenate(self._parts) if self._parts else np.zeros((0, self.float_logits.shape[1]), np.float32)

    def disagreeing(self, k: int) -> list[int]:
        """Indices of up to ``k`` fed images where int8 disagrees most with float: top-1 flips first, then
        the lowest logit cosine (what a layer ranking should look at)."""
        q = self.logits().astype(np.float64)
        f = self.float_logits[: len(q)].astype(np.float64)
        if not len(q):
            return []
        norms = np.linalg.norm(f, axis=1) * np.linalg.norm(q, axis=1)
        cos = np.where(norms > 0, (f * q).sum(1) / np.where(norms > 0, norms, 1.0), 1.0)
        flipped = f.argmax(1) != q.argmax(1)
        order = np.lexsort((cos, ~flipped))  # flips first, then by cosine ascending
        return [int(i) for i in order[:k]]


@dataclass
class Built:
    """What a quantizer's build reports besides the selection logits it fed."""

    layers: list[LayerScore] = field(default_factory=list)  # its ranking, worst first (may be empty)
    facts: dict[str, Any] = field(default_factory=dict)  # anything the toolkit wants recorded (JSON-able)


class Quantizer(Protocol):
    """What a toolkit implements for ``search``."""

    name: str  # e.g. "rknn-toolkit2"

    def identity(self) -> dict[str, Any]:
        """Everything besides the candidate that makes a build: the toolkit's name and version, the model's
        and the calibration set's digests, target and settings. JSON-able; part of every cache key."""
        ...

    def candidates(self) -> list[Candidate]:
        """The all-int8 candidates to try, cheapest first."""
        ...

    def build(self, candidate: Candidate, folder: Path, selection: SelectionPass) -> Built:
        """Build ``candidate`` into ``folder`` (empty, the quantizer's own), feed the selection split's
        logits through ``selection.feed`` in order until it returns False; when the pass completed, store
        in ``folder`` what shipping the build needs (e.g. the test split's logits); rank the layers (worst
        first) on ``selection.disagreeing(k)``'s images. Raise ``CandidateFailed`` when the toolkit fails or
        logs an exception. ``candidate.float_layers`` are names from an earlier ranking of this quantizer.

        Optional: ``toolkit_hybrid(base) -> list[Candidate]``, the toolkit's own hybrid builds (e.g. rknn's
        ``auto_hybrid``), tried after the layer-by-layer hybrid search found nothing that holds."""
        ...


@dataclass
class Tried:
    """One candidate as the search judged it."""

    candidate: Candidate
    folder: Path | None  # its cache folder (None when it failed uncached)
    seconds: float  # the build's own time (when it was built, even if cached now)
    cached: bool  # taken from the cache in this search
    complete: bool = False  # the whole selection split ran (False: rejected early, or failed)
    failed: str | None = None
    holds: bool = False
    reason: str = ""
    n: int = 0
    lost: int = 0
    gained: int = 0
    top1: float | None = None
    float_top1: float | None = None
    agreement: float | None = None
    cosine: float | None = None
    layers: list[LayerScore] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    step: str = ""  # hybrid: "kept" / "stepped back"; empty for all-int8

    @property
    def net_lost(self) -> int:
        return self.lost - self.gained

    @property
    def drop_points(self) -> float | None:
        return None if not self.n else round(100.0 * self.net_lost / self.n, 4)

    def score(self) -> tuple:
        """Smaller is better: failed last, a pass rejected early before a complete one, then net images lost,
        then the lower cosine."""
        if self.failed is not None:
            return (2, 0, 0.0)
        return (0 if self.complete else 1, self.net_lost, -(self.cosine if self.cosine is not None else -1.0))

    def as_row(self) -> dict[str, Any]:
        c = self.candidate
        return {
            "label": c.label, "algorithm": c.algorithm, "method": c.granularity, "calibration_images": c.calib_images,
            "float_layers": list(c.float_layers), "variant": c.variant,
            "selection_top1": self.top1, "float_top1": self.float_top1, "agreement": self.agreement,
            "cosine": self.cosine, "images": self.n, "lost_images": self.lost, "gained_images": self.gained,
            "drop_points": self.drop_points, "holds": self.holds, "complete": self.complete, "failed": self.failed,
            "reason": self.reason, "seconds": round(self.seconds, 3), "cached": self.cached, "step": self.step,
            "folder": self.folder.name if self.folder else None,
            "layers": [asdict(x) for x in self.layers], "facts": self.facts,
        }


@dataclass
class SearchResult:
    tried: list[Tried]
    chosen: Tried | None
    reason: str  # why the chosen one ships, or why nothing does
    best: Tried | None  # the best candidate (the chosen one when one holds)
    next_step: str | None  # when nothing holds: what to try next
    budget_spent: bool
    seconds: float

    def line(self) -> str:
        """The one line for a search where nothing holds."""
        if self.best is None:
            return f"int8 search: no candidate could be built ({self.reason}); {self.next_step}"
        return (f"int8 search: no candidate holds the target on the selection split; best {self.best.candidate.label}: "
                f"{self.best.reason or self.best.failed}; next: {self.next_step}")

    def summary(self) -> dict[str, Any]:
        """What run.json (and so `edgepipe show`) says: the chosen candidate, why, and every one tried."""
        tried = "; ".join(f"{t.candidate.label}: " + ("failed" if t.failed else "holds" if t.holds else
                                                       "missed" if t.complete else "rejected early")
                          + (" (cached)" if t.cached else "") for t in self.tried)
        return {"chosen": self.chosen.candidate.label if self.chosen else None, "why": self.reason, "tried": tried}

    def as_dict(self) -> dict[str, Any]:
        index = {id(t): i for i, t in enumerate(self.tried)}
        return {
            "format": FORMAT, "seconds": round(self.seconds, 3), "budget_spent": self.budget_spent,
            "candidates": [t.as_row() for t in self.tried],
            "chosen": None if self.chosen is None else {
                "index": index[id(self.chosen)], "label": self.chosen.candidate.label, "reason": self.reason},
            "best": None if self.best is None else {"index": index[id(self.best)], "label": self.best.candidate.label},
            "reason": self.reason, "next_step": self.next_step,
        }


@dataclass(frozen=True)
class HybridSettings:
    enabled: bool = True
    max_float_layers: int = 8
    step: int = 2  # layers moved to float at a time


def search(quantizer: Quantizer, labels: np.ndarray, float_logits: np.ndarray, selection_digest: str,
           max_drop_points: float, budget_s: float | None, cache_dir: Path, *,
           hybrid: HybridSettings = HybridSettings(), progress: Callable[[str], None] | None = None,
           clock: Callable[[], float] = time.monotonic) -> SearchResult:
    """Candidates cheapest first until one holds ``max_drop_points`` on the selection split (``labels``,
    ``float_logits``: the float source on the same images; ``selection_digest`` names those images);
    then hybrid. See the module's text."""
    s = _Search(quantizer, np.asarray(labels).reshape(-1), np.asarray(float_logits, np.float32), selection_digest,
                max_drop_points, budget_s, cache_dir, progress or (lambda _msg: None), clock)
    for c in quantizer.candidates():
        t = s.attempt(c, s.bound())
        if t is not None and t.holds:
            return s.result(t, f"{c.label} holds on the selection split: {t.reason}")
    base = _best(s.tried)
    if hybrid.enabled and hybrid.max_float_layers > 0 and base is not None and base.layers:
        t = _hybrid(s, base, hybrid)
        if t is not None:
            return s.result(t, f"{t.candidate.label} holds on the selection split ({len(t.candidate.float_layers)} "
                               f"layer(s) in float; no all-int8 candidate did): {t.reason}")
    if hybrid.enabled and base is not None:
        for c in getattr(quantizer, "toolkit_hybrid", lambda _base: [])(base.candidate):
            t = s.attempt(c, s.bound())
            if t is not None and t.holds:
                return s.result(t, f"{c.label} holds on the selection split (the toolkit's own hybrid; neither an "
                                   f"all-int8 candidate nor the layer-by-layer search did): {t.reason}")
    best = _best(s.tried)
    why = "the time budget was spent" if s.spent else "every candidate was tried"
    return SearchResult(tried=s.tried, chosen=None, reason=f"no candidate holds ({why})", best=best,
                        next_step=next_step(best, s.spent, hybrid), budget_spent=s.spent, seconds=s.clock() - s.started)


class _Search:
    """The state of one search: what was tried, the budget, the cache."""

    def __init__(self, quantizer, labels, float_logits, selection_digest, max_drop_points, budget_s, cache_dir,
                 say, clock) -> None:
        self.quantizer, self.labels, self.float_logits = quantizer, labels, float_logits
        self.selection_digest, self.max_drop_points, self.budget_s = selection_digest, max_drop_points, budget_s
        self.cache_dir, self.say, self.clock = cache_dir, say, clock
        self.identity = dict(quantizer.identity())
        self.allowed = judge(paired_drop(labels, float_logits, float_logits), max_drop_points).allowed_images
        self.tried: list[Tried] = []
        self.started = clock()
        self.spent = False

    def bound(self) -> int | None:
        """Early rejection: net images lost beyond which a candidate can neither hold nor be the best
        (None until a candidate ran the whole split)."""
        complete = [t.net_lost for t in self.tried if t.complete and t.failed is None]
        return max(self.allowed, min(complete)) if complete else None

    def within_budget(self) -> bool:
        if self.budget_s is not None and self.clock() - self.started >= self.budget_s:
            self.spent = True
        return not self.spent

    def attempt(self, c: Candidate, reject_above: int | None) -> Tried | None:
        """``c`` judged, from the cache or built (None: not in the cache and the budget is spent)."""
        key = candidate_key(self.identity, self.selection_digest, c)
        t = self.cached(key, c, reject_above)
        if t is None:
            if not self.within_budget():
                return None
            self.say(f"int8 candidate {c.label}")
            t = self.build(key, c, reject_above)
        self.tried.append(t)
        return t

    def judged(self, c: Candidate, folder: Path | None, record: dict[str, Any], logits: np.ndarray | None,
               cached: bool) -> Tried:
        t = Tried(candidate=c, folder=folder, seconds=float(record.get("seconds", 0.0)), cached=cached,
                  failed=record.get("failed"), complete=bool(record.get("complete")),
                  layers=[LayerScore.from_dict(x) for x in record.get("layers", [])], facts=record.get("facts", {}))
        if t.failed is not None or logits is None or not len(logits):
            t.complete = False
            t.reason = t.failed or "no selection logits"
            return t
        m = len(logits)
        labels, float_logits = self.labels[:m], self.float_logits[:m]
        drop = paired_drop(labels, float_logits, logits)
        t.n, t.lost, t.gained = drop.n, drop.lost, drop.gained
        t.top1, t.float_top1 = round(drop.quant_top1, 6), round(drop.float_top1, 6)
        agreement, cosine = agreement_and_cosine(float_logits, logits)
        t.agreement, t.cosine = round(agreement, 6), round(cosine, 6)
        if t.complete:
            verdict = judge(drop, self.max_drop_points)
            t.holds, t.reason = verdict.holds, verdict.reason
        else:
            t.reason = (f"rejected after {m} of {len(self.labels)} selection images: net {t.net_lost:+d} images "
                        f"lost already, more than a candidate may lose to hold or to be the best")
        return t

    def cached(self, key: str, c: Candidate, reject_above: int | None) -> Tried | None:
        folder = self.cache_dir / key
        try:
            record = json.loads((folder / RECORD).read_text())
            if record.get("format") != FORMAT or Candidate.from_dict(record["candidate"]) != c:
                return None
            failed = record.get("failed") is not None
            logits = None if failed else np.load(folder / SELECTION_LOGITS, allow_pickle=False)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not failed and not record.get("complete"):
            # rejected early against another bound: is it rejected against this one too? (else run it in full)
            probe = SelectionPass(self.labels, self.float_logits, reject_above)
            if probe.feed(logits):
                return None
        return self.judged(c, folder, record, logits, cached=True)

    def build(self, key: str, c: Candidate, reject_above: int | None) -> Tried:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with held(self.cache_dir / ".locks" / f"{key}.lock"):
            t = self.cached(key, c, reject_above)  # built meanwhile by another process
            if t is not None:
                return t
            selection = SelectionPass(self.labels, self.float_logits, reject_above)
            record: dict[str, Any] = {"format": FORMAT, "candidate": c.as_dict(), "identity": self.identity}
            with _temp_folder(self.cache_dir, key) as tmp:
                t0 = time.perf_counter()
                try:
                    built = self.quantizer.build(c, tmp, selection)
                except CandidateFailed as e:  # the toolkit's own verdict: the same inputs fail the same way
                    record.update(failed=str(e) or type(e).__name__, seconds=round(time.perf_counter() - t0, 3))
                    _publish(tmp, self.cache_dir / key, record, None)
                    return self.judged(c, self.cache_dir / key, record, None, cached=False)
                except Exception as e:  # noqa: BLE001 - a toolkit failing its own way: this candidate only, uncached
                    record.update(failed=f"{type(e).__name__}: {e}".splitlines()[0][:240],
                                  seconds=round(time.perf_counter() - t0, 3))
                    return self.judged(c, None, record, None, cached=False)
                logits = selection.logits()
                record.update(seconds=round(time.perf_counter() - t0, 3), complete=selection.complete,
                              layers=[asdict(x) for x in built.layers], facts=built.facts)
                _publish(tmp, self.cache_dir / key, record, logits)
            return self.judged(c, self.cache_dir / key, record, logits, cached=False)

    def result(self, chosen: Tried, reason: str) -> SearchResult:
        return SearchResult(tried=list(self.tried), chosen=chosen, reason=reason, best=chosen, next_step=None,
                            budget_spent=self.spent, seconds=self.clock() - self.started)


def _hybrid(s: _Search, base: Tried, h: HybridSettings) -> Tried | None:
    """Move the base's worst layers to float ``h.step`` at a time; keep a step that makes the selection figure
    no worse, take back one that makes it worse and try the next layers of the ranking instead."""
    current = base
    ranking = [x.name for x in base.layers]
    rejected: set[str] = set()
    while True:
        floated = set(current.candidate.float_layers)
        room = h.max_float_layers - len(floated)
        nxt = [n for n in ranking if n not in floated and n not in rejected][: min(h.step, room)]
        if not nxt:
            return None
        c = replace(current.candidate, float_layers=current.candidate.float_layers + tuple(nxt))
        t = s.attempt(c, current.net_lost)  # losing more than the current build: a step back, stop early
        if t is None:  # the budget is spent
            return None
        if t.holds:
            t.step = "kept"
            return t
        if t.failed is None and t.complete and t.score() <= current.score():
            t.step = "kept"
            current = t
        else:
            t.step = "stepped back"
            rejected.update(nxt)


def _best(tried: Sequence[Tried]) -> Tried | None:
    usable = [t for t in tried if t.failed is None]
    return min(usable, key=lambda t: t.score()) if usable else None


def next_step(best: Tried | None, budget_spent: bool, h: HybridSettings) -> str:
    """What to try when nothing holds, most likely first."""
    if best is None:
        return "see the log of each candidate; check the float16 build against float32 first"
    steps = []
    if budget_spent:
        steps.append("a larger quantize.search.budget_s (candidates built so far are cached)")
    if not h.enabled:
        steps.append("hybrid quantization (quantize.search.hybrid.enabled=true)")
    steps.append("more calibration data (calibration.count, quantize.search.calib_images)")
    steps.append("quantization-aware training, or a ReLU variant of the model "
                 "(hard-swish and SE layers quantize poorly)")
    return "; ".join(steps)


def candidate_key(identity: dict[str, Any], selection_digest: str, c: Candidate) -> str:
    text = json.dumps({"format": FORMAT, "identity": identity, "selection": selection_digest, "candidate": c.key()},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@contextlib.contextmanager
def _temp_folder(cache_dir: Path, key: str) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_dir))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, dest: Path, record: dict[str, Any], logits: np.ndarray | None) -> None:
    """The record and logits into ``tmp``, then ``tmp`` renamed to ``dest`` in one step (a stale ``dest``,
    unreadable or of another format, is replaced)."""
    if logits is not None:
        np.save(tmp / SELECTION_LOGITS, logits)
    (tmp / RECORD).write_text(json.dumps(record, indent=1, default=str) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    os.rename(tmp, dest)
    tmp.mkdir()  # _temp_folder removes it
