"""Sampling functions against hand-computed distributions; stop-string matching."""
from __future__ import annotations

import numpy as np
import pytest

from plainlm.generate import StopMatcher
from plainlm.sampling import SamplingParams, apply_penalties, filter_probs, sample

LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], np.float64)).astype(np.float32)


def P(**kw):
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    base.update(kw)
    return SamplingParams(**base)


def test_no_filter_keeps_the_distribution():
    ids, p = filter_probs(LOGITS, P())
    assert list(ids) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(p, [0.5, 0.2, 0.15, 0.1, 0.05], rtol=1e-6)


def test_top_k():
    ids, p = filter_probs(LOGITS, P(top_k=2))
    assert list(ids) == [0, 1]
    np.testing.assert_allclose(p, [0.5 / 0.7, 0.2 / 0.7], rtol=1e-6)


def test_top_p_smallest_prefix_reaching_mass():
    ids, p = filter_probs(LOGITS, P(top_p=0.8))      # 0.5 + 0.2 = 0.7 < 0.8 -> need 0.15 too
    assert list(ids) == [0, 1, 2]
    np.testing.assert_allclose(p, np.array([0.5, 0.2, 0.15]) / 0.85, rtol=1e-6)


def test_min_p():
    ids, _ = filter_probs(LOGITS, P(min_p=0.25))     # keep p >= 0.125
    assert list(ids) == [0, 1, 2]


def test_temperature_sharpens():
    ids, p = filter_probs(LOGITS, P(temperature=0.5))   # p_i ∝ p_i^2
    q = np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2
    np.testing.assert_allclose(p, q / q.sum(), rtol=1e-6)


def test_penalties_by_hand():
    logits = np.array([2.0, -1.0, 0.5, 3.0], np.float32)
    out = apply_penalties(logits, [0, 1, 1], P(repeat_penalty=2.0, presence_penalty=0.5,
                                               frequency_penalty=0.25))
    # token 0: 2/2 - 0.5 - 0.25*1 ; token 1: -1*2 - 0.5 - 0.25*2 ; others untouched
    np.testing.assert_allclose(out, [0.25, -3.0, 0.5, 3.0])


def test_greedy_and_seed():
    g = SamplingParams(temperature=0)
    assert sample(LOGITS, g, np.random.default_rng(0)) == 0
    r1, r2 = np.random.default_rng(7), np.random.default_rng(7)
    s1 = [sample(LOGITS, P(), r1) for _ in range(50)]
    s2 = [sample(LOGITS, P(), r2) for _ in range(50)]
    assert s1 == s2
    assert len(set(s1)) > 1


def test_sampling_frequencies_follow_the_distribution():
    rng = np.random.default_rng(0)
    draws = np.bincount([sample(LOGITS, P(top_k=2), rng) for _ in range(4000)], minlength=5)
    assert draws[2:].sum() == 0
    assert abs(draws[0] / 4000 - 0.5 / 0.7) < 0.03


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(min_p=2)])
def test_bad_params_rejected(bad):
    with pytest.raises(ValueError):
        P(**bad)


def test_stop_matcher_holds_back_prefixes():
    s = StopMatcher(["</end>"])
    out = s.push("hello </") + s.push("en")
    assert out == "hello "
    out += s.push("d> ignored")
    assert s.hit and out == "hello "


def test_stop_matcher_releases_false_alarm():
    s = StopMatcher(["STOP"])
    out = s.push("ST") + s.push("ART") + s.flush()
    assert out == "START" and not s.hit
