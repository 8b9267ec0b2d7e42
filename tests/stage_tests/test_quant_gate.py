"""The int8 gate (stages/common/quant_gate.py): the rule on small splits, and the interval's coverage
checked by simulation (an independent reference: the interval must cover the true drop >= 95%)."""

import numpy as np
import pytest

from stages.common.quant_gate import agreement_and_cosine, drop_interval, judge, paired_drop


def _logits(pred, classes=4):
    out = np.zeros((len(pred), classes), np.float32)
    out[np.arange(len(pred)), pred] = 1.0
    return out


def _pair(n, lost, gained, classes=4):
    """n labelled images: float right everywhere except `gained` images; int8 loses `lost` of float's."""
    y = np.arange(n) % classes
    f = y.copy()
    q = y.copy()
    f[:gained] = (y[:gained] + 1) % classes  # float wrong, int8 right
    q[gained:gained + lost] = (y[gained:gained + lost] + 1) % classes  # int8 wrong, float right
    return y, _logits(f), _logits(q)


def test_one_image_on_72_holds_a_one_point_target_and_says_the_split_cannot_resolve_it():
    d = paired_drop(*_pair(72, lost=1, gained=0))
    assert (d.lost, d.gained, d.drop_points, d.resolution_points) == (1, 0, 1.3889, 1.3889)
    v = judge(d, 1.0)
    assert v.holds and v.allowed_images == 1 and not v.resolved
    assert "cannot resolve" in v.reason
    # the interval straddles the target: the data cannot tell, and the rule says what decides
    assert d.drop_ci95[0] < 1.0 < d.drop_ci95[1]


def test_two_images_on_72_miss_a_one_point_target():
    v = judge(paired_drop(*_pair(72, lost=2, gained=0)), 1.0)
    assert not v.holds and "net +2 images" in v.reason


def test_flips_both_ways_cancel_in_the_net_drop():
    d = paired_drop(*_pair(72, lost=3, gained=2))
    assert d.net_lost_images == 1 and judge(d, 1.0).holds


def test_a_zero_target_refuses_any_net_loss():
    assert not judge(paired_drop(*_pair(1000, lost=1, gained=0)), 0.0).holds
    assert judge(paired_drop(*_pair(1000, lost=1, gained=1)), 0.0).holds


def test_a_zero_target_is_resolved_on_any_split():
    """No net loss is a whole-image statement: more images would not decide it better, so the verdict
    must not say the split cannot resolve it."""
    v = judge(paired_drop(*_pair(72, lost=1, gained=0)), 0.0)
    assert not v.holds and v.resolved and "cannot resolve" not in v.reason


def test_a_large_split_resolves_the_target_in_whole_images():
    v10 = judge(paired_drop(*_pair(1000, lost=10, gained=0)), 1.0)
    v11 = judge(paired_drop(*_pair(1000, lost=11, gained=0)), 1.0)
    assert v10.resolved and v10.holds and not v11.holds


def test_no_flip_on_72_images_still_has_a_wide_interval():
    lo, hi = drop_interval(0, 0, 72)
    assert lo == -hi and 5.0 < hi < 6.5


@pytest.mark.parametrize("n,p_lost,p_gained", [(72, 0.03, 0.01), (200, 0.05, 0.0), (500, 0.02, 0.02)])
def test_the_interval_covers_the_true_drop_at_least_95_percent(n, p_lost, p_gained):
    rng = np.random.default_rng(0)
    truth = 100.0 * (p_lost - p_gained)
    draws = rng.multinomial(n, [p_lost, p_gained, 1 - p_lost - p_gained], size=400)
    covered = [lo <= truth <= hi for lo, hi in (drop_interval(int(b), int(c), n) for b, c, _ in draws)]
    assert np.mean(covered) >= 0.95


def test_agreement_and_cosine_need_no_labels():
    a = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.1]])
    b = np.array([[4.0, 0.0], [0.0, 3.0], [1.1, 1.0]])
    agree, cos = agreement_and_cosine(a, b)
    assert agree == pytest.approx(2 / 3)
    assert cos == pytest.approx((1 + 1 + (1.1 + 1.1) / (1.1**2 + 1)) / 3)
