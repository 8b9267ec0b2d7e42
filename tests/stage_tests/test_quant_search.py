"""The int8 search contract (stages/common/quant_search.py) with a scripted quantizer: the loop's logic
(cheapest first, early rejection, budget, the hybrid step back, the cache of candidates, failures)
without a toolkit. The RKNN implementation runs for real in test_rknn.py."""

import json
from pathlib import Path

import numpy as np
import pytest

from stages.common.quant_search import (
    Built,
    Candidate,
    CandidateFailed,
    HybridSettings,
    LayerScore,
    SelectionPass,
    search,
)

N = 40  # selection images; a 1-point target allows ceil(0.4) = 1 image
CLASSES = 4
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")


def _onehot(pred):
    out = np.full((len(pred), CLASSES), 0.1, np.float32)
    out[np.arange(len(pred)), pred] = 1.0
    return out


LABELS = np.arange(N) % CLASSES
FLOAT = _onehot(LABELS)  # float is right on every image


class Scripted:
    """A quantizer whose candidates lose a scripted number of images (the first ones of the split)."""

    name = "scripted"

    def __init__(self, losses, *, hybrid=None, fail=(), crash=(), version="1"):
        self.losses = dict(losses)  # (algorithm, granularity, calib_images) -> images lost, all-int8
        self.hybrid = hybrid or (lambda float_layers, base_loss: base_loss)  # images lost with those layers in float
        self.fail, self.crash, self.version = set(fail), set(crash), version
        self.built: list[Candidate] = []
        self.fed: dict[Candidate, int] = {}

    def identity(self):
        return {"toolkit": self.name, "version": self.version, "model": "digest-of-the-model"}

    def candidates(self):
        return [Candidate(a, g, n) for (a, g, n) in self.losses]

    def build(self, c, folder: Path, selection: SelectionPass) -> Built:
        self.built.append(c)
        base = (c.algorithm, c.granularity, c.calib_images)
        if base in self.fail:
            (folder / "model.bin").write_text("a worse model the toolkit wrote anyway")
            raise CandidateFailed("mmse: the toolkit logged an exception (see its log)")
        if base in self.crash:
            raise RuntimeError("toolkit crashed")
        lost = self.hybrid(c.float_layers, self.losses[base])
        pred = LABELS.copy()
        pred[:lost] = (LABELS[:lost] + 1) % CLASSES
        logits = _onehot(pred)
        fed = 0
        for start in range(0, N, 4):
            fed += 4
            if not selection.feed(logits[start:start + 4]):
                break
        self.fed[c] = fed
        (folder / "model.bin").write_text(c.label)
        ranking = [LayerScore(x, "Conv", 0.99 - 0.01 * i, 0.98 - 0.02 * i) for i, x in enumerate(LAYERS)]
        return Built(layers=ranking, facts={"disagreeing": selection.disagreeing(3)})


def _search(q, tmp_path, target=1.0, **kw):
    kw.setdefault("budget_s", None)
    return search(q, LABELS, FLOAT, "val-digest", target, cache_dir=tmp_path / "cache", **kw)


def test_the_first_candidate_that_holds_is_chosen_and_nothing_after_it_is_built(tmp_path):
    q = Scripted({("normal", "channel", 32): 3, ("normal", "channel", 64): 1, ("mmse", "channel", 64): 0})
    r = _search(q, tmp_path)
    assert r.chosen is not None and r.chosen.candidate == Candidate("normal", "channel", 64)
    assert [c.calib_images for c in q.built] == [32, 64]
    assert r.chosen.holds and "normal/channel/64 holds" in r.reason
    # the record a report or search.json reads
    row = r.as_dict()
    assert row["chosen"]["index"] == 1 and [c["holds"] for c in row["candidates"]] == [False, True]


def test_a_candidate_that_already_trails_is_rejected_before_its_selection_pass_ends(tmp_path):
    q = Scripted({("normal", "channel", 32): 3, ("normal", "layer", 32): 12, ("mmse", "channel", 32): 0})
    r = _search(q, tmp_path)
    first, second = r.tried[:2]
    # the first candidate runs in full; the second has lost 4 images after 4 rows, more than the 1 the
    # target allows and the 3 the best so far lost, with nothing left to win back (float is right on all)
    assert q.fed[first.candidate] == N and first.complete
    assert q.fed[second.candidate] == 4 and not second.complete and not second.holds
    assert "rejected after 4 of 40" in second.reason
    assert r.chosen.candidate.algorithm == "mmse"


def test_no_new_build_starts_once_the_budget_is_spent(tmp_path):
    ticks = iter(range(0, 1000, 10))  # each clock reading is 10 s later
    q = Scripted({("normal", "channel", 32): 3, ("kl_divergence", "channel", 32): 2, ("mmse", "channel", 32): 0})
    r = _search(q, tmp_path, budget_s=15, clock=lambda: next(ticks), hybrid=HybridSettings(enabled=False))
    assert len(q.built) < 3 and r.chosen is None and r.budget_spent
    assert "budget" in r.reason and "budget_s" in r.next_step


def test_hybrid_steps_back_when_a_layer_in_float_makes_it_worse(tmp_path):
    def hybrid(float_layers, base_loss):  # conv1 in float hurts; conv2 helps; conv2 + conv3 holds
        if "conv1" in float_layers:
            return base_loss + 2
        return base_loss - 2 * len(float_layers)

    q = Scripted({("normal", "channel", 32): 5}, hybrid=hybrid)
    r = _search(q, tmp_path, hybrid=HybridSettings(enabled=True, max_float_layers=4, step=1))
    floats = [t.candidate.float_layers for t in r.tried]
    assert floats == [(), ("conv1",), ("conv2",), ("conv2", "conv3")]
    assert [t.step for t in r.tried[1:]] == ["stepped back", "kept", "kept"]
    assert r.chosen.candidate.float_layers == ("conv2", "conv3") and "2 layer(s) in float" in r.reason


def test_hybrid_stops_at_max_float_layers(tmp_path):
    q = Scripted({("normal", "channel", 32): 5}, hybrid=lambda fl, b: b)  # float layers never help
    r = _search(q, tmp_path, hybrid=HybridSettings(enabled=True, max_float_layers=2, step=1))
    assert r.chosen is None
    assert all(len(t.candidate.float_layers) <= 2 for t in r.tried)


def test_a_second_search_builds_nothing_and_decides_the_same(tmp_path):
    losses = {("normal", "channel", 32): 12, ("normal", "channel", 64): 3, ("mmse", "channel", 64): 1}
    first = _search(Scripted(losses), tmp_path)
    again = Scripted(losses)
    second = _search(again, tmp_path)
    assert again.built == [] and all(t.cached for t in second.tried)
    assert second.chosen.candidate == first.chosen.candidate == Candidate("mmse", "channel", 64)
    # another toolkit version is another build
    other = Scripted(losses, version="2")
    _search(other, tmp_path)
    assert len(other.built) == 3


def test_a_candidate_rejected_early_is_built_again_when_a_looser_bound_could_keep_it(tmp_path):
    off = HybridSettings(enabled=False)
    _search(Scripted({("normal", "channel", 32): 3, ("mmse", "channel", 32): 6}), tmp_path, hybrid=off)
    # the same search again: the early rejection (net 4 after 4 rows > 3) is reused
    same = Scripted({("normal", "channel", 32): 3, ("mmse", "channel", 32): 6})
    _search(same, tmp_path, hybrid=off)
    assert same.built == []
    # a best of 5 lost images: 4 after 4 rows proves nothing, so mmse runs again, in full this time
    looser = Scripted({("normal", "channel", 64): 5, ("mmse", "channel", 32): 6})
    r = _search(looser, tmp_path, hybrid=off)
    assert [c.algorithm for c in looser.built] == ["normal", "mmse"] and looser.fed[looser.built[1]] == 8
    assert not r.tried[1].complete


def test_an_exception_the_toolkit_logged_fails_the_candidate_and_is_cached(tmp_path):
    losses = {("mmse", "channel", 32): 0, ("mmse", "layer", 32): 0}
    q = Scripted(losses, fail={("mmse", "channel", 32)})
    r = _search(q, tmp_path)
    assert r.tried[0].failed.startswith("mmse: the toolkit logged") and not r.tried[0].holds
    assert r.chosen.candidate.granularity == "layer"
    again = Scripted(losses, fail={("mmse", "channel", 32)})
    _search(again, tmp_path)
    assert again.built == []


def test_a_crash_fails_the_candidate_without_caching_it(tmp_path):
    losses = {("normal", "channel", 32): 0}
    r = _search(Scripted(losses, crash={("normal", "channel", 32)}), tmp_path)
    assert r.chosen is None and "RuntimeError: toolkit crashed" in r.tried[0].failed
    assert r.best is None and "no candidate could be built" in r.line()
    q = Scripted(losses)
    assert _search(q, tmp_path).chosen is not None and len(q.built) == 1


def test_when_nothing_holds_the_line_names_the_best_candidate_its_drop_and_the_next_step(tmp_path):
    q = Scripted({("normal", "channel", 32): 3, ("mmse", "channel", 32): 2}, hybrid=lambda fl, b: b)
    r = _search(q, tmp_path, target=0.0, hybrid=HybridSettings(enabled=False))
    assert r.chosen is None and r.best.candidate.algorithm == "mmse"
    line = r.line()
    assert "mmse/channel/32" in line and "net +2 images of 40" in line
    assert "hybrid quantization" in line and "quantization-aware training" in line
    # every candidate is in the cache, each with its record
    records = sorted((tmp_path / "cache").glob("*/candidate.json"))
    assert len(records) == 2 and all(json.loads(p.read_text())["complete"] for p in records)


def test_the_ranking_images_are_the_flips_first():
    sel = SelectionPass(LABELS, FLOAT, 1.0)
    pred = LABELS.copy()
    pred[[5, 9]] = (LABELS[[5, 9]] + 1) % CLASSES
    sel.feed(_onehot(pred))
    assert sorted(sel.disagreeing(2)) == [5, 9]


def test_candidate_keys_differ_by_every_field_and_float_layer_order():
    variants = [Candidate("normal", "channel", 32), Candidate("mmse", "channel", 32), Candidate("normal", "layer", 32),
                Candidate("normal", "channel", 64), Candidate("normal", "channel", 32, ("a", "b")),
                Candidate("normal", "channel", 32, ("b", "a")), Candidate("normal", "channel", 32, (), "x")]
    assert len({c.key() for c in variants}) == 7
    hybrid = Candidate("n", "layer", 8, ("a",))
    assert Candidate.from_dict(json.loads(hybrid.key())) == hybrid


@pytest.mark.parametrize("c,label", [(Candidate("mmse", "channel", 64), "mmse/channel/64"),
                                     (Candidate("normal", "layer", 32, ("a", "b")), "normal/layer/32 +2 float")])
def test_labels(c, label):
    assert c.label == label
