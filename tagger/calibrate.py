"""A tag's decision threshold with a statistical guarantee, from a small labelled calibration sample.

A tag says "yes" where its score (higher: the tag more likely) is at or above the threshold. Two
controls, each a promise about examples drawn like the calibration sample:
- `max_miss` (class-conditional split conformal, Vovk's Mondrian conformal prediction): at most a
  share alpha of the tag's positives are missed, on average over calibration samples;
- `max_fdr` (Learn then Test with fixed-sequence testing, Angelopoulos, Bates et al. 2021): the share
  of "yes" decisions that are wrong (the false discovery rate, 1 - precision) is at most alpha, with
  probability at least 1 - delta over the calibration sample.
Both need the calibration examples drawn at random from the music the threshold will be used on
(positives for `max_miss`); examples picked by hand carry no guarantee. When the sample is too small
for the control, there is no threshold and the result says how many positive labels it would take.

numpy and scipy only: no TensorFlow here.
"""
import dataclasses
import math

import numpy as np
from scipy.stats import binom

# alpha * (n + 1) a hair under a whole number is that number: 0.1 * 30 must give rank 3 as it reads.
_ROUNDING = 1e-9


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A calibrated threshold, or why there is none.

    threshold: decide "yes" where score >= threshold; None where the control cannot be met.
    control: "max-miss" or "max-fdr"; alpha, delta: its levels (delta None for max-miss).
    positives, size: the calibration sample's positive labels and all its labels.
    needs: the fewest positive labels the control can be met with (at this alpha and delta).
    decisions, false_positives: the calibration examples at or above the threshold, and its negatives
        among them (None without a threshold).
    note: None, or one line saying why there is no threshold.
    """
    control: str
    alpha: float
    delta: float | None
    threshold: float | None
    positives: int
    size: int
    needs: int
    decisions: int | None = None
    false_positives: int | None = None
    note: str | None = None

    def as_dict(self):
        return dataclasses.asdict(self)


def _sample(scores, labels):
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"scores and labels must be two vectors of one length, not of shapes {s.shape}, {y.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite numbers")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return s, y.astype(bool)


def _level(value, name):
    if not 0 < value < 1:
        raise ValueError(f"{name} must be between 0 and 1 (exclusive), not {value}")
    return float(value)


def _unattainable(positives, needs):
    return f"not attainable with {positives} positive labels; needs {needs}"


def miss_rank(positives, alpha):
    """k = floor(alpha * (positives + 1)): max_miss's threshold is the k-th lowest positive score (none for 0)."""
    return math.floor(alpha * (positives + 1) + _ROUNDING)


def max_miss_needs(alpha):
    """The fewest positives max_miss can work with: ceil(1 / alpha) - 1 (k >= 1), as miss_rank rounds."""
    n = max(0, math.ceil(1 / alpha) - 1)
    while n > 0 and miss_rank(n - 1, alpha) >= 1:
        n -= 1
    while miss_rank(n, alpha) < 1:
        n += 1
    return n


def max_miss(scores, labels, alpha):
    """The threshold that misses at most a share `alpha` of the tag's positives.

    With the n calibration positives' scores sorted ascending, the threshold is the k-th of them,
    k = floor(alpha * (n + 1)); "yes" where score >= threshold.

    Guarantee: if the calibration positives and a new positive are exchangeable (e.g. all drawn
    independently from the music's positives for the tag), then
        P(score_new < threshold) <= k / (n + 1) <= alpha,
    the probability taken over the calibration sample and the new example together (marginal); it is
    k / (n + 1) exactly when scores have no ties. For one calibration sample the miss rate is itself
    random: with continuous scores it is Beta(k, n + 1 - k) distributed, above alpha with probability
    P(Binomial(n, alpha) <= k - 1), e.g. 0.39 with n = 9 at alpha = 0.1 (more positives make it
    rarer). Negatives play no part: this control says nothing about false positives.

    Not attainable (k = 0) with fewer than ceil(1 / alpha) - 1 positives; the result then has no
    threshold and the note "not attainable with N positive labels; needs M" (N: the calibration
    positives, M: that minimum).

    Returns a Calibration (control "max-miss").
    """
    s, y = _sample(scores, labels)
    alpha = _level(alpha, "alpha")
    pos = np.sort(s[y])
    n, needs = len(pos), max_miss_needs(alpha)
    base = dict(control="max-miss", alpha=alpha, delta=None, positives=n, size=len(s), needs=needs)
    k = miss_rank(n, alpha)
    if k < 1:
        return Calibration(threshold=None, note=_unattainable(n, needs), **base)
    t = float(pos[k - 1])
    return Calibration(threshold=t, decisions=int((s >= t).sum()), false_positives=int((s[~y] >= t).sum()), **base)


def fdr_p_values(decisions, false_positives, alpha):
    """The p-values of H0: FDR > alpha at thresholds with these decisions and false positives:
    P(Binomial(decisions, alpha) <= false_positives). Valid for a threshold fixed before the sample is
    seen: its false positives are Binomial(decisions, FDR), no fewer in distribution than
    Binomial(decisions, alpha) when FDR > alpha. 1 for no decision."""
    return binom.cdf(false_positives, decisions, alpha)


def max_fdr_needs(alpha, delta):
    """M = ceil(ln(delta) / ln(1 - alpha)): the fewest decisions, all correct, whose p-value
    (1 - alpha)^M is at most delta. A threshold with k false positives needs M + k or more decisions
    (its p-value is at least (1 - alpha)^(decisions - k)), so M positive labels at the least."""
    m = max(1, math.ceil(math.log(delta) / math.log1p(-alpha)))
    while fdr_p_values(m, 0, alpha) > delta:          # agree with the p-values to the last bit
        m += 1
    while m > 1 and fdr_p_values(m - 1, 0, alpha) <= delta:
        m -= 1
    return m


def max_fdr(scores, labels, alpha, delta):
    """The lowest threshold shown, at confidence 1 - `delta`, to keep the false discovery rate at or
    below `alpha`.

    Definitions: FDR(t) = P(y = 0 | score >= t), for a new example drawn as the calibration examples
    were (1 - precision, in the population, not in the sample). For a threshold t, its decisions are
    the calibration examples with score >= t and its false positives k the negatives among them.

    Procedure (Learn then Test, fixed-sequence): the candidates are the sample's distinct scores,
    highest first. A candidate with fewer than M = max_fdr_needs(alpha, delta) decisions cannot be
    shown safe whatever its labels (its p-value is above delta), so the sequence starts at the first
    with M or more. Each candidate is tested in turn, H0: FDR(t) > alpha, p-value
    P(Binomial(decisions, alpha) <= k); rejected while p <= delta; the first not rejected ends the
    sequence. The threshold is the last candidate rejected (the lowest); None where the first fails.

    Guarantee: P(FDR(threshold) > alpha) <= delta, the probability over the calibration sample,
    which must be drawn independently from the population the threshold is used on (the
    threshold's "yes" decisions then have a precision of at least 1 - alpha, unless the calibration
    sample was one of the unlucky delta). It holds when (a) scores have no ties and (b)
    P(y = 0 | score = s) does not increase with s (a higher score never makes the tag less likely:
    a monotone likelihood ratio). Each p-value is valid for a threshold fixed in advance, as LTT's
    proof takes them; (a) and (b) are what make candidates taken from the sample safe. Sketch: under
    (b) FDR(t) falls as t rises; let t* be the lowest t with FDR(t) <= alpha. Choosing a threshold
    below t* needs the first candidate tested below t* rejected; the calibration examples at or above
    t* are negatives with probability FDR(t*) = alpha each (by (a), FDR is continuous), those below
    with probability at least alpha (by (b)), so that candidate's k is at least Binomial(decisions,
    alpha) in distribution and it is rejected with probability at most delta. With ties or scores
    that rank badly the guarantee is not proven, only likely near.

    Not attainable with fewer than M positive labels (no threshold can then be rejected): the
    result's note says "not attainable with N positive labels; needs M" (N: the calibration
    positives). With enough positives the sample may still show no threshold safe (negatives among
    the highest scores); the note then says so.

    Returns a Calibration (control "max-fdr").
    """
    s, y = _sample(scores, labels)
    alpha, delta = _level(alpha, "alpha"), _level(delta, "delta")
    positives, needs = int(y.sum()), max_fdr_needs(alpha, delta)
    base = dict(control="max-fdr", alpha=alpha, delta=delta, positives=positives, size=len(s), needs=needs)
    if positives < needs:
        return Calibration(threshold=None, note=_unattainable(positives, needs), **base)
    order = np.argsort(-s, kind="mergesort")
    ranked, negative = s[order], ~y[order]
    last = np.r_[ranked[1:] != ranked[:-1], True]      # each distinct score's last (lowest-ranked) example
    candidates = ranked[last]
    decisions = np.flatnonzero(last) + 1
    false_positives = np.cumsum(negative)[last]
    first = int(np.argmax(decisions >= needs))          # exists: there are at least `needs` examples
    tested = fdr_p_values(decisions[first:], false_positives[first:], alpha) <= delta
    rejected = len(tested) if tested.all() else int(np.argmin(tested))
    if rejected == 0:
        return Calibration(threshold=None, note=(
            f"no threshold shown to keep the FDR at or below {alpha:g} at confidence {1 - delta:g}: the "
            f"{decisions[first]} highest-scored examples hold {false_positives[first]} negatives"), **base)
    i = first + rejected - 1
    return Calibration(threshold=float(candidates[i]), decisions=int(decisions[i]),
                       false_positives=int(false_positives[i]), **base)
