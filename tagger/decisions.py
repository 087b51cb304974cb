"""Decisions and how far a figure can be trusted: per-tag thresholds, F1, bootstrap intervals.

Thresholds are chosen per tag on one split's clip predictions by a named rule:
- `f1`: the threshold with the highest F1;
- `precision:P`: the lowest threshold whose precision is at least P (the most recall at that precision);
- `recall:R`: the highest threshold whose recall is at least R.
A tag decides "yes" where its probability is at or above its threshold. A tag with fewer than
MIN_POSITIVES positives, or whose rule cannot be met, gets no threshold (null in thresholds.json,
+inf in the SavedModel's `decide` signature) and a note saying why.

Intervals are 95 % bootstrap percentile intervals. Resampling draws the test set's artists with
replacement (each drawn artist brings all its clips), or its clips where no artists are named; the
figures of a resample are computed on the clips' multiplicities as sample weights, for every resample
at once (numpy, no loop over resamples). A tag that has no positive (or no negative) clip in a resample
has no AUC there and is left out of that resample's macro average; how often is reported.

No TensorFlow here.
"""
import argparse
import math

import numpy as np

MIN_POSITIVES = 5
RULES_HELP = "f1, precision:P or recall:R (P, R in (0, 1], e.g. precision:0.8)"


def parse_rule(text):
    """argparse type for a threshold rule: 'f1', 'precision:P' or 'recall:R'; returned normalised."""
    name, colon, value = text.strip().partition(":")
    if name == "f1" and not colon:
        return "f1"
    if name in ("precision", "recall") and colon:
        try:
            level = float(value)
        except ValueError:
            level = math.nan
        if 0 < level <= 1:
            return f"{name}:{level:g}"
    raise argparse.ArgumentTypeError(f"threshold rule {text!r} does not parse: use {RULES_HELP}")


def _curve(y, p):
    """Distinct scores from high to low with the true and false positives of deciding at each."""
    order = np.argsort(-p, kind="mergesort")
    s, t = p[order], y[order].astype(bool)
    last = np.r_[s[1:] != s[:-1], True]
    return s[last], np.cumsum(t)[last], np.cumsum(~t)[last]


def choose_threshold(y, p, rule, min_positives=MIN_POSITIVES):
    """(threshold or None, note or None) of one tag from its labels `y` and probabilities `p`."""
    y, p = np.asarray(y).astype(bool), np.asarray(p, dtype=np.float64)
    positives = int(y.sum())
    if positives < min_positives:
        return None, f"{positives} positives (fewer than {min_positives})"
    scores, tp, fp = _curve(y, p)
    precision, recall = tp / (tp + fp), tp / positives
    name, _, level = rule.partition(":")
    if name == "f1":
        return float(scores[np.argmax(2 * tp / (tp + fp + positives))]), None
    if name == "precision":
        ok = np.flatnonzero(precision >= float(level))
        if not len(ok):
            return None, f"precision {level} is not reached"
        return float(scores[ok[-1]]), None
    return float(scores[np.flatnonzero(recall >= float(level))[0]]), None


def clip_keys(pred):
    """A short key per clip of predictions ({"clip_id", "path"}), sorted: what thresholds.json records of
    the clips its thresholds were chosen on, so no figure is reported on them."""
    import hashlib
    return sorted(hashlib.sha1(f"{int(c)}\t{p}".encode()).hexdigest()[:16] for c, p in zip(pred["clip_id"], pred["path"]))


def choose_thresholds(y, p, tags, rule, split, data, min_positives=MIN_POSITIVES, clip_keys=None):
    """thresholds.json's content: the rule, where the thresholds were chosen (and `clip_keys`, on which
    clips), and per tag its threshold (None where it has none), the positives behind it and a note
    where it has none."""
    per_tag = {}
    for i, tag in enumerate(tags):
        threshold, note = choose_threshold(y[:, i], p[:, i], rule, min_positives)
        per_tag[tag] = {"threshold": threshold, "positives": int(np.asarray(y)[:, i].sum()), "note": note}
    return {"rule": rule, "split": split, "data": data, "clips": int(len(y)), "min_positives": min_positives,
            "tags": per_tag, **({"clip_keys": clip_keys} if clip_keys is not None else {})}


def threshold_vector(thresholds, tags):
    """Per-tag thresholds in `tags` order as floats, +inf where a tag has none (or is not listed)."""
    per_tag = thresholds["tags"]
    return np.array([math.inf if per_tag.get(t, {}).get("threshold") is None else per_tag[t]["threshold"]
                     for t in tags], dtype=np.float64)


def without_threshold(thresholds):
    """The tags of a thresholds.json that have no threshold, with the note saying why."""
    return {t: v["note"] for t, v in thresholds["tags"].items() if v["threshold"] is None}


# ----------------------------------------------------------------------------------------------
# Figures on weighted clips: one row of weights per resample

def weighted_auc(W, y, p):
    """ROC-AUC and average precision (as sklearn computes them, ties included) of one tag under each
    row of whole-number clip weights `W` (resamples, clips). Returns two arrays of length resamples, nan where a row
    has no positive or no negative weight."""
    order = np.argsort(-p, kind="mergesort")
    s, t = p[order], y[order].astype(bool)
    last = np.r_[s[1:] != s[:-1], True]
    ends = np.flatnonzero(last)
    Wo = W[:, order]
    # Weights are whole numbers: summed exactly as integers, then divided in float64. One running sum
    # over all clips, one over the (few) positives; the false positives are the difference.
    total = np.cumsum(Wo, axis=1)[:, ends]
    positives = np.flatnonzero(t)
    upto = np.searchsorted(positives, ends, side="right")
    running = np.hstack([np.zeros((len(W), 1), dtype=total.dtype), np.cumsum(Wo[:, positives], axis=1)])
    tp = running[:, upto].astype(np.float64)
    fp = total - tp
    pos, neg = tp[:, -1], fp[:, -1]
    zero = np.zeros((len(W), 1))
    tp0, fp0 = np.hstack([zero, tp]), np.hstack([zero, fp])
    dtp = np.diff(tp0, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        roc = np.sum(np.diff(fp0, axis=1) * (tp0[:, 1:] + tp0[:, :-1]), axis=1) / (2 * pos * neg)
        precision = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1), 0.0)
        ap = np.sum(dtp * precision, axis=1) / pos
    defined = (pos > 0) & (neg > 0)
    return np.where(defined, roc, np.nan), np.where(defined, ap, np.nan)


def weighted_counts(W, y, decided):
    """True positives, false positives and false negatives of one tag's decisions under each row of W."""
    y = y.astype(bool)
    return tuple(W[:, mask].sum(axis=1, dtype=np.float64) for mask in (y & decided, ~y & decided, y & ~decided))


def f1_from_counts(tp, fp, fn):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)


def figures(W, y, p, thresholds=None):
    """Every figure under each row of clip weights W: per-tag ROC-AUC, PR-AUC (resamples, tags), and
    with `thresholds` (+inf: none) per-tag precision, recall, F1 and micro F1 at them."""
    W = np.atleast_2d(np.asarray(W)).astype(np.int32)   # multiplicities
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    tags = y.shape[1]
    out = {"roc_auc": np.empty((len(W), tags)), "pr_auc": np.empty((len(W), tags))}
    for i in range(tags):
        out["roc_auc"][:, i], out["pr_auc"][:, i] = weighted_auc(W, y[:, i], p[:, i])
    if thresholds is not None:
        counts = np.zeros((3, len(W), tags))
        for i in range(tags):
            if np.isfinite(thresholds[i]):
                counts[:, :, i] = weighted_counts(W, y[:, i], p[:, i] >= thresholds[i])
        tp, fp, fn = counts
        has = np.isfinite(thresholds)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["precision"] = np.where(has & (tp + fp > 0), tp / (tp + fp), np.nan)
            out["recall"] = np.where(has & (tp + fn > 0), tp / (tp + fn), np.nan)
        out["f1"] = np.where(has, f1_from_counts(tp, fp, fn), np.nan)
        out["micro_f1"] = f1_from_counts(*(c[:, has].sum(axis=1) for c in (tp, fp, fn))) if has.any() \
            else np.full(len(W), np.nan)
    return out


def macro(values):
    """The mean over tags of each row, tags without a value (nan) left out; nan where none has one."""
    counts = np.sum(~np.isnan(values), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, np.nansum(values, axis=1) / np.maximum(counts, 1), np.nan)


# ----------------------------------------------------------------------------------------------
# The bootstrap

def resample_weights(groups, resamples, rng):
    """(resamples, clips) multiplicities: as many groups (artists, or clips) as there are, drawn with
    replacement; each drawn group brings all its clips."""
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    k = int(inverse.max()) + 1
    counts = rng.multinomial(k, np.full(k, 1.0 / k), size=resamples)
    return counts[:, inverse.ravel()]


def bootstrap(y, p, groups, resamples=1000, seed=0, thresholds=None, chunk=100, extra=None):
    """Every figure of `figures` over `resamples` resamples of the groups, computed `chunk` resamples at
    a time (bounded memory). `extra`: more probability matrices scored on the same resamples (a paired
    comparison). Returns {name: (resamples, ...) array}, with "macro_roc_auc", "macro_pr_auc" (and
    "macro_f1") per resample, and the same under "extra" for each extra matrix."""
    rng = np.random.default_rng(seed)
    parts, extra_parts = [], [[] for _ in (extra or ())]
    for start in range(0, resamples, chunk):
        W = resample_weights(groups, min(chunk, resamples - start), rng)
        parts.append(figures(W, y, p, thresholds))
        for k, other in enumerate(extra or ()):
            extra_parts[k].append(figures(W, y, other))

    def join(chunks):
        out = {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
        out["macro_roc_auc"], out["macro_pr_auc"] = macro(out["roc_auc"]), macro(out["pr_auc"])
        if "f1" in out:
            out["macro_f1"] = macro(out["f1"])
        return out
    result = join(parts)
    result["extra"] = [join(c) for c in extra_parts]
    return result


def interval(samples, level=0.95):
    """The percentile interval [low, high] of the samples (nan left out); None where none is finite."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return [float(low), float(high)]
