"""Thresholds with a guarantee: each control against its definition by exact enumeration, its guarantee
by simulation (Gaussian scores, where the true miss rate and FDR of any threshold are known in closed
form), and the sample sizes below which there is no threshold."""
import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import binom, norm

from tagger.calibrate import Calibration, max_fdr, max_miss

# The Monte Carlo checks allow 3 standard errors of their estimate over the draws: a correct
# procedure fails one of them with probability about 0.1 % (the draws are seeded: a failure repeats).
SE = 3


def gaussian_draws(rng, draws, n, base_rate, mu):
    """`draws` calibration samples of n examples: labels 1 with probability base_rate, scores N(mu, 1)
    for positives and N(0, 1) for negatives."""
    y = rng.random((draws, n)) < base_rate
    return rng.standard_normal((draws, n)) + mu * y, y


def true_fdr(t, base_rate, mu):
    """P(y = 0 | score >= t) under gaussian_draws' model."""
    neg, pos = (1 - base_rate) * norm.sf(t), base_rate * norm.sf(t - mu)
    return neg / (neg + pos)


# max-miss

@pytest.mark.parametrize("alpha", ["0.05", "0.1", "0.2", "0.25", "0.3", "0.5"])
def test_max_miss_by_exact_enumeration(alpha):
    """n + 1 exchangeable positives: each is the new one with probability 1 / (n + 1). The miss rate
    over those n + 1 cases is k / (n + 1), k = floor(alpha (n + 1)); with ties it can only be lower."""
    a = float(alpha)
    for n in range(0, 41):
        k = math.floor(Fraction(alpha) * (n + 1))
        for values in (np.arange(n + 1.0), np.arange(n + 1) // 3 * 1.0):      # distinct, then tied in threes
            misses = 0
            for new in range(n + 1):
                others = np.delete(values, new)
                result = max_miss(others, np.ones(n), a)
                assert (result.threshold is None) == (k == 0)
                misses += result.threshold is not None and values[new] < result.threshold
            if k and len(np.unique(values)) == n + 1:
                assert Fraction(misses, n + 1) == Fraction(k, n + 1) <= Fraction(alpha)
            else:
                assert Fraction(misses, n + 1) <= Fraction(k, n + 1)


@pytest.mark.parametrize("alpha,n", [("0.29", 99), ("0.58", 49), ("0.7", 89)])
def test_max_miss_ranks_alpha_as_written(alpha, n):
    """0.29 * 100 is 28.999999999999996 in floating point; the rank is 29, as alpha reads."""
    k = math.floor(Fraction(alpha) * (n + 1))
    assert math.floor(float(alpha) * (n + 1)) == k - 1
    scores = np.arange(n, dtype=float)
    assert max_miss(scores, np.ones(n), float(alpha)).threshold == scores[k - 1]


def test_max_miss_by_hand():
    # Positives 0.2, 0.4, 0.5, 0.9 (n = 4) at alpha 0.4: k = floor(0.4 * 5) = 2, the second lowest, 0.4.
    scores = [0.9, 0.1, 0.5, 0.45, 0.2, 0.4, 0.8]
    labels = [1, 0, 1, 0, 1, 1, 0]
    assert max_miss(scores, labels, 0.4) == Calibration(
        control="max-miss", alpha=0.4, delta=None, threshold=0.4, positives=4, size=7, needs=2, decisions=5,
        false_positives=2)


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.15, 0.2, 0.3, 1 / 3])
def test_max_miss_needs_enough_positives(alpha):
    needs = math.ceil(1 / alpha - 1e-12) - 1
    scores = np.linspace(0, 1, 3 * needs)
    labels = np.zeros(3 * needs, int)
    labels[::3][:needs - 1] = 1
    result = max_miss(scores, labels, alpha)
    assert result.threshold is None and result.needs == needs and result.positives == needs - 1
    assert result.note == f"not attainable with {needs - 1} positive labels; needs {needs}"
    labels[::3][:needs] = 1
    result = max_miss(scores, labels, alpha)
    assert result.threshold == scores[labels == 1].min() and result.note is None    # k = 1: the lowest


def test_max_miss_guarantee_by_simulation():
    """The true miss rate of each draw's threshold is Phi(t - mu). Its mean over draws is the marginal
    miss rate: at most alpha, and for continuous scores exactly the mean of k / (n + 1). How often it
    exceeds alpha follows the Beta(k, n + 1 - k) law of one sample's miss rate."""
    rng = np.random.default_rng(1)
    draws, n, base_rate, mu, alpha = 4000, 150, 0.25, 2.0, 0.1
    scores, labels = gaussian_draws(rng, draws, n, base_rate, mu)
    results = [max_miss(s, y, alpha) for s, y in zip(scores, labels)]
    assert all(r.threshold is not None for r in results)
    t = np.array([r.threshold for r in results])
    positives = labels.sum(axis=1)
    k = np.floor(alpha * (positives + 1) + 1e-9)
    miss = norm.cdf(t - mu)
    se = miss.std() / math.sqrt(draws)
    assert miss.mean() <= alpha + SE * se
    assert abs(miss.mean() - (k / (positives + 1)).mean()) <= SE * se
    violated = miss > alpha
    expected = binom.cdf(k - 1, positives, alpha).mean()          # P(Beta(k, n + 1 - k) > alpha), per draw
    assert abs(violated.mean() - expected) <= SE * math.sqrt(expected * (1 - expected) / draws)
    # And directly: one new positive per draw is missed at most a share alpha of the time.
    new = rng.standard_normal(draws) + mu
    assert (new < t).mean() <= alpha + SE * math.sqrt(alpha * (1 - alpha) / draws)


# max-fdr

def reference_max_fdr(scores, labels, alpha, delta):
    """max_fdr's procedure written out from its definition: exact binomial tails from math.comb, a loop
    over the distinct scores from the highest."""
    def p_value(n, k):
        return sum(Fraction(math.comb(n, i)) * Fraction(alpha) ** i * (1 - Fraction(alpha)) ** (n - i)
                   for i in range(k + 1))

    needs = 1
    while (1 - Fraction(alpha)) ** needs > Fraction(delta):
        needs += 1
    chosen = None
    for t in sorted(set(scores), reverse=True):
        n = sum(s >= t for s in scores)
        k = sum(s >= t and not y for s, y in zip(scores, labels))
        if n < needs:
            continue
        if p_value(n, k) > Fraction(delta):
            break
        chosen = t
    return chosen


@pytest.mark.parametrize("scores", [list(range(10, 0, -1)), [9, 9, 8, 7, 7, 7, 5, 4, 4, 1]])
def test_max_fdr_by_exact_enumeration(scores):
    """Every labelling of ten examples (distinct scores, then ties) against the procedure written out."""
    alpha, delta = 0.3, 0.2                                   # M = 5: 0.7^5 = 0.168 <= 0.2 < 0.7^4
    found = 0
    for labels in itertools.product((0, 1), repeat=len(scores)):
        result = max_fdr(scores, labels, alpha, delta)
        expected = reference_max_fdr(scores, labels, alpha, delta)
        assert result.threshold == expected, labels
        found += expected is not None
        assert (result.note is None) == (expected is not None)
    assert 0 < found < 2 ** len(scores)


def test_max_fdr_by_hand():
    # alpha 0.5, delta 0.25: M = 2 (0.5^2 = 0.25). Candidates from the top: 0.9 (1 decision) is
    # skipped; 0.8: 2 decisions, 0 negatives, p = 1/4, rejected; 0.7: 3, 0, p = 1/8, rejected;
    # 0.6: 4 decisions, 1 negative, p = (1 + 4) / 16 > 1/4: the sequence ends, the threshold is 0.7.
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    labels = [1, 1, 1, 0, 1, 1, 0]
    assert max_fdr(scores, labels, 0.5, 0.25) == Calibration(
        control="max-fdr", alpha=0.5, delta=0.25, threshold=0.7, positives=5, size=7, needs=2, decisions=3,
        false_positives=0)


@pytest.mark.parametrize("alpha,delta", [(0.1, 0.1), (0.05, 0.1), (0.2, 0.05), (0.1, 0.01)])
def test_max_fdr_needs_enough_positives(alpha, delta):
    """M positives scored above every negative are just enough (p = (1 - alpha)^M <= delta); M - 1 are not."""
    needs = math.ceil(math.log(delta) / math.log(1 - alpha))
    assert (1 - alpha) ** needs <= delta < (1 - alpha) ** (needs - 1)
    for positives in (needs - 1, needs):
        scores = np.r_[np.linspace(2, 3, positives), np.linspace(0, 1, 50)]
        labels = np.r_[np.ones(positives, int), np.zeros(50, int)]
        result = max_fdr(scores, labels, alpha, delta)
        assert result.needs == needs and result.positives == positives and result.size == positives + 50
        if positives < needs:
            assert result.threshold is None
            assert result.note == f"not attainable with {positives} positive labels; needs {needs}"
        else:
            assert (result.threshold, result.decisions, result.false_positives) == (2.0, needs, 0)


def test_max_fdr_says_when_the_sample_shows_no_threshold_safe():
    scores = np.arange(100.0)[::-1]
    labels = np.ones(100, int)
    labels[[0, 2, 4, 6, 8]] = 0                           # negatives among the highest
    result = max_fdr(scores, labels, 0.1, 0.1)
    assert result.threshold is None and result.positives == 95
    assert result.note == ("no threshold shown to keep the FDR at or below 0.1 at confidence 0.9: the 22 "
                           "highest-scored examples hold 5 negatives")


def test_max_fdr_guarantee_by_simulation():
    """P(FDR(threshold) > alpha) <= delta over calibration draws, FDR from the closed form. The same draws
    show the check has teeth: the threshold where the sample's own precision just reaches 1 - alpha
    (no confidence step) exceeds alpha about half the time."""
    rng = np.random.default_rng(2)
    draws, n, base_rate, mu, alpha, delta = 2000, 400, 0.3, 3.0, 0.1, 0.1
    scores, labels = gaussian_draws(rng, draws, n, base_rate, mu)
    violated, naive_violated, found = 0, 0, 0
    for s, y in zip(scores, labels):
        result = max_fdr(s, y, alpha, delta)
        if result.threshold is not None:
            found += 1
            violated += true_fdr(result.threshold, base_rate, mu) > alpha
            assert result.false_positives == (~y & (s >= result.threshold)).sum()
        order = np.argsort(-s)
        precision = np.cumsum(y[order]) / np.arange(1, n + 1)
        naive_violated += true_fdr(s[order][np.flatnonzero(precision >= 1 - alpha)[-1]], base_rate, mu) > alpha
    tolerance = SE * math.sqrt(delta * (1 - delta) / draws)
    assert violated / draws <= delta + tolerance
    assert found >= 0.95 * draws                             # 120 positives on average: rarely none
    assert naive_violated / draws > delta + tolerance


def test_bad_inputs_are_refused():
    for alpha in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="alpha must be between 0 and 1"):
            max_miss([1, 2], [1, 0], alpha)
    with pytest.raises(ValueError, match="delta must be between 0 and 1"):
        max_fdr([1, 2], [1, 0], 0.1, 1)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        max_fdr([1, 2], [1, 2], 0.1, 0.1)
    with pytest.raises(ValueError, match="finite"):
        max_miss([1, np.nan], [1, 0], 0.1)
    with pytest.raises(ValueError, match="one length"):
        max_miss([1, 2, 3], [1, 0], 0.1)


def test_results_are_plain_data():
    result = max_fdr([3, 2, 1], [1, 1, 0], 0.5, 0.25)
    assert json.loads(json.dumps(result.as_dict())) == result.as_dict()
    assert result.as_dict()["threshold"] == 2.0
