"""Your own tags from a few labelled tracks: linear probes on an embedding store, thresholds with a guarantee.

A probe is a logistic regression on the mean embeddings of an embedding store (tagger.store); suggest picks
the tracks most worth labelling next; calibrate gives the probe a decision threshold with a statistical
guarantee (tagger.calibrate).

    python -m tagger.probe suggest   --store STORE --tag NAME [--labels LABELS.csv] [-n 10] [--random]
                                     [--seed S] [--csv] [--probe PROBE]
    python -m tagger.probe fit       --store STORE --labels LABELS.csv --tag NAME [--out PROBE] [--seed S]
    python -m tagger.probe calibrate --store STORE --probe PROBE --labels CAL.csv
                                     (--max-miss ALPHA | --max-fdr ALPHA --confidence 1-DELTA)
    python -m tagger.probe apply     --store STORE [--probe PROBE ...] [--format table|json|csv]

The loop, for a tag of your own ("dreamy"):
1. `suggest --store S --tag dreamy -n 20 --csv > labels.csv`: with no probe yet, a k-center cover of the
   library (farthest-first: each track the farthest from those already labelled or picked). Fill in the
   label column: 1 (has the tag), 0 (has not); a blank label means not labelled yet.
2. `fit --store S --labels labels.csv --tag dreamy`: logistic regression on the tracks' mean embeddings,
   C chosen by cross-validation; writes S/probes/dreamy.json and prints the cross-validated ROC-AUC.
3. `suggest --store S --labels labels.csv --tag dreamy -n 20 --csv >> labels.csv`: now the tracks the
   probe is least sure of (probability nearest 0.5), spread out by k-center among the 5 n least sure.
   Label them, fit again; repeat while the cross-validated ROC-AUC improves.
4. `suggest --store S --labels labels.csv --tag dreamy --random -n 100 --csv > cal.csv`: a uniform random
   sample of the tracks not labelled so far. Label it: it is the calibration sample, never fitted on.
5. `calibrate --store S --probe S/probes/dreamy.json --labels cal.csv --max-fdr 0.1 --confidence 0.9`
   (or `--max-miss 0.1`): the threshold, recorded in the probe file. Too few positive labels for the
   control: no threshold, and a warning saying how many it needs.
6. `apply --store S [--format csv]`: every track's probability for each probe (all of S/probes/ by
   default), and its decision where the probe has a threshold.

Labels files: CSV with the columns path, tag, label (more columns are ignored); one file may hold several
tags, and a command reads the rows of its tag only. Repeated header lines (from `>>`) are skipped. A
path names a store track when it is one of the store's paths as written; else when its real path
(os.path.realpath: symlinks and `..` resolved), taken from the labels file's folder where relative, or
else from the current folder, is the real path of a store path (a relative store path taken from the
current folder).

Probabilities come from a class-balanced fit: they rank tracks, they are not the tag's frequency. The
threshold's guarantee holds for tracks drawn as the calibration sample was: uniformly from those not
labelled for training (suggest --random draws them so). A probe is tied to its store's model: one
fitted on another model's embeddings (another fingerprint, or windows at another hop) is refused.

No TensorFlow here: numpy, scipy and scikit-learn.
"""
import argparse
import csv
import dataclasses
import glob
import json
import os
import sys
import warnings

import numpy as np
from scipy.special import expit

from tagger import calibrate
from tagger.cli import EXIT_OK, ArgumentParser, UsageError, main_guard, plural, positive_int
from tagger.store import Store, atomic_write

PROG = "python -m tagger.probe"
FORMAT, VERSION = "tagger-probe", 1
COLUMNS = ("path", "tag", "label")
CS = np.logspace(-4, 2, 13)          # C on standardised embeddings, half a decade apart
MAX_FOLDS = 5
POOL = 5                             # suggest diversifies among the POOL * n least sure tracks


# Labels

@dataclasses.dataclass(frozen=True)
class Labels:
    """One tag's labels from a labels file: {store path: 0 or 1}, and `listed`, every store path the file
    names for the tag (also with a blank label)."""
    file: str
    tag: str
    labels: dict
    listed: frozenset
    tags: tuple = ()                 # every tag the file names

    def counts(self):
        positives = sum(self.labels.values())
        return positives, len(self.labels) - positives


class _Resolver:
    """A labels file's path -> the store's path for that track (the rule in the module docstring)."""

    def __init__(self, store_paths, labels_file):
        self.paths, self.exact = store_paths, set(store_paths)
        self.base = os.path.dirname(os.path.abspath(labels_file))
        self._real = None

    def __call__(self, path):
        if path in self.exact:
            return path
        if not path:
            return None
        if self._real is None:       # only where some path is not written as the store writes it
            self._real = {}
            for p in self.paths:
                self._real.setdefault(os.path.realpath(p), p)
        tries = [path] if os.path.isabs(path) else [os.path.join(self.base, path), path]
        return next((self._real[r] for r in map(os.path.realpath, tries) if r in self._real), None)


def read_labels(labels_file, tag, store):
    """The Labels of `tag` in a labels file, checked: the columns are there, every label is 0, 1 or
    blank, every path (of this tag's rows) names a track of `store`, no track has two labels."""
    if not os.path.isfile(labels_file):
        raise UsageError(f"labels file {labels_file} does not exist: pass a CSV with the columns path,tag,label")
    try:
        with open(labels_file, newline="", encoding="utf-8-sig") as f:
            rows = [(line, row) for line, row in enumerate(csv.reader(f), 1)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"{labels_file} cannot be read as CSV ({type(e).__name__}: {e}): save it as UTF-8 CSV "
                         "with the columns path,tag,label") from None
    header = [c.strip().lower() for c in rows[0][1]] if rows else []
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise UsageError(f"{labels_file} has no {' or '.join(missing)} column (its first line: "
                         f"{','.join(header) or 'empty'}): its first line must name the columns path,tag,label")
    col = {c: header.index(c) for c in COLUMNS}
    resolve = _Resolver([t.path for t in store.tracks()], labels_file)
    labels, listed, lines, absent, tags = {}, set(), {}, [], set()
    for line, row in rows[1:]:
        row = row + [""] * (len(header) - len(row))
        if not any(c.strip() for c in row) or [c.strip().lower() for c in row[:len(header)]] == header:
            continue                 # blank lines, and the header again where a suggestion was appended
        path, row_tag, label = row[col["path"]], row[col["tag"]].strip(), row[col["label"]].strip()
        tags.add(row_tag)
        if row_tag != tag:
            continue
        if label not in ("", "0", "1"):
            raise UsageError(f"{labels_file} line {line}: label {label!r} of {path} is not 0 or 1: write 1 (has "
                             f"the tag {tag}), 0 (has not) or leave it blank (not labelled yet)")
        found = resolve(path)
        if found is None:
            absent.append((line, path))
            continue
        listed.add(found)
        if label:
            if labels.get(found, int(label)) != int(label):
                raise UsageError(f"{labels_file} labels {found} both 0 and 1 for tag {tag} (lines {lines[found]} "
                                 f"and {line}): keep one")
            labels[found], lines[found] = int(label), line
    if absent:
        line, path = absent[0]
        failed = store.failed().get(path)
        why = f" (it failed to embed: {failed})" if failed else ""
        verb = "is" if len(absent) == 1 else "are"
        raise UsageError(f"{labels_file}: {plural(len(absent), 'path')} labelled for tag {tag} {verb} not in the "
                         f"store {store.folder}, the first {path or '(empty)'} (line {line}){why}: "
                         "embed them into the store first (python -m tagger.embed), or fix the paths (as the "
                         "store writes them, or relative to the labels file's folder or the current folder)")
    return Labels(labels_file, tag, labels, frozenset(listed), tuple(sorted(tags)))


def require_labels(labels):
    """The Labels, refused (UsageError) where they hold no label of their tag."""
    if not labels.labels:
        named = f" (it labels {', '.join(labels.tags[:10])})" if labels.tags else ""
        raise UsageError(f"{labels.file} has no 0 or 1 label for tag {labels.tag}{named}: label some tracks (a "
                         f"row path,{labels.tag},1 or 0 each), or check the tag's spelling")
    return labels


# The probe: numbers

def standardiser(means):
    """(mean, scale) of a StandardScaler fitted on a store's mean embeddings (scale 1 where a feature is
    constant): the whole library's, not the few labelled tracks'."""
    from sklearn.preprocessing import StandardScaler
    scaler = StandardScaler().fit(np.asarray(means, np.float64))
    return scaler.mean_, scaler.scale_


def fit_logistic(x, y, seed=0):
    """Logistic regression of labels `y` (0/1) on standardised features `x`, class-balanced, C chosen
    from CS by ROC-AUC over min(5, positives, negatives) seeded stratified folds (at least 2 of each
    class needed). Ties in the folds' mean ROC-AUC go to the smallest C (the most regularised).

    Returns {"coef", "intercept", "C", "folds", "cv_roc_auc"}: cv_roc_auc is the folds' mean ROC-AUC at
    the chosen C, a little optimistic (C was chosen on the same folds)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    y = np.asarray(y, int)
    folds = min(MAX_FOLDS, int(y.sum()), int(len(y) - y.sum()))
    if folds < 2:
        raise ValueError(f"need at least 2 positives and 2 negatives, not {int(y.sum())} and {int(len(y) - y.sum())}")

    def model(c):
        return LogisticRegression(C=c, class_weight="balanced", max_iter=10_000, tol=1e-6, random_state=seed)
    # The folds by hand, not LogisticRegressionCV, whose attributes and defaults change across the
    # scikit-learn releases of the two tested stacks.
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)     # the largest Cs on separable labels
        scores = [np.mean([roc_auc_score(y[test], model(c).fit(x[train], y[train]).decision_function(x[test]))
                           for train, test in splits]) for c in CS]
        best = min(range(len(CS)), key=lambda i: (-scores[i], CS[i]))
        final = model(CS[best]).fit(x, y)
    auc = float(scores[best])
    return {"coef": final.coef_[0].tolist(), "intercept": float(final.intercept_[0]), "C": float(CS[best]),
            "folds": folds, "cv_roc_auc": auc if np.isfinite(auc) else None}


def logits(probe, means):
    """Each track's logit under a probe: standardised with the probe's scaler, then coef . x + intercept."""
    z = (np.asarray(means, np.float64) - probe["scaler"]["mean"]) / probe["scaler"]["scale"]
    return z @ np.asarray(probe["coef"], np.float64) + probe["intercept"]


def _min_sq_dist(x, centres):
    """Each row of x's squared distance to its nearest centre, through matrix products, in chunks."""
    cc = (centres ** 2).sum(1)
    out = np.empty(len(x))
    step = max(1, 2 ** 22 // len(centres))
    for lo in range(0, len(x), step):
        xs = x[lo:lo + step]
        out[lo:lo + step] = np.maximum(((xs ** 2).sum(1)[:, None] + cc - 2 * xs @ centres.T).min(1), 0)
    return out


def k_center(points, n, chosen=(), candidates=None):
    """Farthest-first traversal (Gonzalez 1985): n indices of `candidates` (default: all points), each the
    candidate farthest (Euclidean) from its nearest point among `chosen` (e.g. the labelled tracks) and
    the picks before it; with nothing chosen, the first is the candidate nearest the candidates' mean.
    A 2-approximation of the n centres that cover the candidates with the smallest radius."""
    points = np.asarray(points, np.float64)
    candidates = np.arange(len(points)) if candidates is None else np.asarray(candidates, int)
    x = points[candidates]
    picks = []
    d2 = _min_sq_dist(x, points[np.asarray(chosen, int)]) if len(chosen) else np.full(len(x), np.inf)
    for k in range(min(n, len(x))):
        j = int(np.argmax(d2)) if len(chosen) or k else int(np.argmin(((x - x.mean(0)) ** 2).sum(1)))
        picks.append(int(candidates[j]))
        d2 = np.minimum(d2, ((x - x[j]) ** 2).sum(1))
        d2[j] = -1                   # never again, even where the rest coincide with chosen points
    return picks


def most_uncertain(points, scores, candidates, n, pool=POOL):
    """n of `candidates`: the one whose logit is nearest 0, then farthest-first among the pool * n with
    the smallest |logit| (uncertain, and not all alike)."""
    candidates = np.asarray(candidates, int)
    if n < 1 or not len(candidates):
        return []
    top = candidates[np.argsort(np.abs(scores[candidates]), kind="stable")[:pool * n]]
    return [int(top[0])] + k_center(points, n - 1, chosen=[top[0]], candidates=top[1:])


def random_sample(candidates, n, seed):
    """n of `candidates` drawn uniformly without replacement (numpy's default_rng(seed))."""
    candidates = np.asarray(candidates, int)
    size = max(0, min(n, len(candidates)))
    return [int(i) for i in np.random.default_rng(seed).choice(candidates, size, replace=False)]


def learning_curve(store_means, truth, seeds, budgets, strategy="active"):
    """A simulation of the labelling loop with `truth` (0/1 per track) as the labeller: for each seed
    and each budget (ascending, labels accumulated), the ROC-AUC on the tracks not labelled of a probe
    fitted on `budget` labels. The first label is a random track; then "active": suggest's choices
    (k-center until a probe can be fitted, then the least sure, diversified), or "random": uniform.

    Returns a (len(seeds), len(budgets)) array; nan where the labels hold fewer than 2 of a class."""
    from sklearn.metrics import roc_auc_score
    mean, scale = standardiser(store_means)
    points = (np.asarray(store_means, np.float64) - mean) / scale
    truth = np.asarray(truth, int)
    out = np.full((len(seeds), len(budgets)), np.nan)
    for s, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        labelled, fitted = [int(rng.integers(len(points)))], None
        for b in np.argsort(budgets, kind="stable"):
            rest = np.setdiff1d(np.arange(len(points)), labelled)
            need = budgets[b] - len(labelled)
            if strategy == "random":
                labelled += random_sample(rest, need, rng.integers(2 ** 32))
            elif fitted is None:
                labelled += k_center(points, need, chosen=labelled, candidates=rest)
            else:
                labelled += most_uncertain(points, points @ fitted["coef"] + fitted["intercept"], rest, need)
            y = truth[labelled]
            if min(y.sum(), len(y) - y.sum()) >= 2:
                fitted = fit_logistic(points[labelled], y, seed)
                rest = np.setdiff1d(np.arange(len(points)), labelled)
                out[s, b] = roc_auc_score(truth[rest], points[rest] @ fitted["coef"] + fitted["intercept"])
    return out


# Probe files

def default_probe_path(store_folder, tag):
    if not tag or tag in (".", "..") or "/" in tag or os.sep in tag:
        raise UsageError(f"tag {tag!r} cannot name a file: pass --out (fit) or --probe")
    return os.path.join(store_folder, "probes", f"{tag}.json")


def load_probe(path):
    """A probe file's contents, refused (UsageError) where it is missing or not a probe."""
    if not os.path.isfile(path):
        raise UsageError(f"probe {path} does not exist: fit one (python -m tagger.probe fit --store STORE "
                         "--labels LABELS.csv --tag NAME)")
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        d = len(doc["coef"])
        if not d or len(doc["scaler"]["mean"]) != d or len(doc["scaler"]["scale"]) != d:
            raise ValueError("coef and scaler sizes differ")
        if not isinstance(doc["intercept"], (int, float)) or not isinstance(doc["fitted_on"], list):
            raise TypeError("intercept or fitted_on of the wrong type")
        missing = [k for k in ("tag", "cv_roc_auc", "calibration") if k not in doc] + \
            [f"model.{k}" for k in ("name", "fingerprint") if k not in doc["model"]]
        if missing:
            raise KeyError(", ".join(missing))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"{path} is not a tagger probe ({type(e).__name__}: {e}): pass a file python -m "
                         "tagger.probe fit wrote") from None
    if doc.get("version", 0) > VERSION:
        raise UsageError(f"{path} was written by a newer tagger (probe format {doc['version']}): update tagger")
    return doc


def check_model(probe, probe_path, store):
    """Refuse (UsageError) a probe fitted on another model's embeddings than `store` holds."""
    ours, theirs = probe["model"], store.model
    if ours["fingerprint"] != theirs.fingerprint or not np.isclose(ours.get("hop_seconds", theirs.hop_seconds),
                                                                   theirs.hop_seconds, rtol=0, atol=1e-9):
        raise UsageError(f"probe {probe_path} was fitted on embeddings of {ours['name']} (fingerprint "
                         f"{ours['fingerprint'][:12]}, hop {ours.get('hop_seconds')} s), but {store.folder} holds "
                         f"{theirs.name}'s ({theirs.fingerprint[:12]}, hop {theirs.hop_seconds:g} s): fit a probe "
                         f"on this store (python -m tagger.probe fit --store {store.folder} ...)")


def write_probe(path, probe):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, (json.dumps(probe, indent=1) + "\n").encode())


def describe(probe):
    """One line on a probe's decision: its control, the threshold and the calibration behind it, or why
    there is none."""
    c = probe.get("calibration")
    if not c:
        return "not calibrated (python -m tagger.probe calibrate)"
    if c["threshold"] is None:
        return f"no threshold: {c['note']}"
    control = f"{c['control']} {c['alpha']:g}"
    if c["delta"] is not None:
        control += f" at {100 * (1 - c['delta']):g} % confidence"
    return (f"{control}: yes where probability >= {c['threshold_probability']:.4g} (logit {c['threshold']:+.4g}), "
            f"calibrated on {plural(c['size'], 'label')} ({c['positives']} positive)")


def open_store(folder):
    store = Store.open(folder)
    paths, means = store.means()
    if not paths:
        raise UsageError(f"{folder} holds no embedded tracks yet: embed a library into it first (python -m "
                         f"tagger.embed LIBRARY --model MODEL --out {folder})")
    return store, paths, means


# Commands

def run_fit(args):
    store, paths, means = open_store(args.store)
    out = args.out or default_probe_path(args.store, args.tag)
    labels = require_labels(read_labels(args.labels, args.tag, store))
    positives, negatives = labels.counts()
    if min(positives, negatives) < 2:
        raise UsageError(f"tag {args.tag} has {plural(positives, 'positive')} and {plural(negatives, 'negative')} "
                         f"among the labelled tracks: label at least 2 of each (python -m tagger.probe suggest "
                         f"--store {args.store} --labels {args.labels} --tag {args.tag})")
    old = None
    if os.path.exists(out):          # refuse to replace what is not a probe of this store's model
        old = load_probe(out)
        check_model(old, out, store)
        if old["tag"] != args.tag:
            raise UsageError(f"probe {out} is tag {old['tag']}'s, not {args.tag}'s: pass another --out")
    mean, scale = standardiser(means)
    rows = [i for i, p in enumerate(paths) if p in labels.labels]
    y = np.array([labels.labels[paths[i]] for i in rows])
    fitted = fit_logistic((means[rows] - mean) / scale, y, args.seed)
    m = store.model
    probe = {"format": FORMAT, "version": VERSION, "tag": args.tag,
             "model": {"name": m.name, "fingerprint": m.fingerprint, "hop_seconds": m.hop_seconds,
                       "embedding_size": int(means.shape[1])},
             "store": os.path.abspath(args.store), "labels": os.path.abspath(args.labels),
             "counts": {"positives": positives, "negatives": negatives}, "seed": args.seed,
             "scaler": {"fitted_on": "store", "mean": mean.tolist(), "scale": scale.tolist()},
             **fitted, "Cs": CS.tolist(), "calibration": None, "fitted_on": [paths[i] for i in rows]}
    write_probe(out, probe)
    auc = "n/a" if fitted["cv_roc_auc"] is None else f"{fitted['cv_roc_auc']:.3f}"
    print(f"Tag {args.tag}: fitted on {positives} positive and {negatives} negative labels; C {fitted['C']:g} "
          f"chosen by {fitted['folds']}-fold cross-validation, cross-validated ROC-AUC {auc} (a little optimistic: "
          f"C was chosen on the same folds)")
    if old is not None and old.get("calibration"):
        print("The probe's earlier calibration no longer applies: calibrate again on a fresh random sample",
              file=sys.stderr)
    print(f"Wrote {out} (not calibrated: python -m tagger.probe calibrate --store {args.store} --probe {out} "
          "--labels CAL.csv --max-miss 0.1)")
    return EXIT_OK


def run_suggest(args):
    store, paths, means = open_store(args.store)
    labels = read_labels(args.labels, args.tag, store) if args.labels else Labels(None, args.tag, {}, frozenset())
    probe_path = args.probe or default_probe_path(args.store, args.tag)
    probe = None
    if args.probe or os.path.exists(probe_path):
        probe = load_probe(probe_path)
        check_model(probe, probe_path, store)
        if probe["tag"] != args.tag:
            raise UsageError(f"probe {probe_path} is tag {probe['tag']}'s, not {args.tag}'s: pass --tag "
                             f"{probe['tag']}, or the probe of {args.tag}")
    known = set(labels.labels) | set(probe["fitted_on"] if probe else ())
    chosen = [i for i, p in enumerate(paths) if p in known]
    candidates = [i for i, p in enumerate(paths) if p not in known]
    if args.random:
        picks = random_sample(candidates, args.count, args.seed)
        how = f"a uniform random sample (seed {args.seed}) of the {plural(len(candidates), 'track')} not labelled"
    else:
        mean, scale = standardiser(means)
        points = (np.asarray(means, np.float64) - mean) / scale
        if probe is None:
            picks = k_center(points, args.count, chosen=chosen, candidates=candidates)
            how = (f"a k-center cover of the standardised embeddings (no probe {probe_path} yet), from "
                   f"{plural(len(chosen), 'labelled track')}")
        else:
            picks = most_uncertain(points, logits(probe, means), candidates, args.count)
            how = (f"the least sure under {probe_path} (probability nearest 0.5), spread out among the "
                   f"{min(POOL * args.count, len(candidates))} least sure")
    if args.csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(COLUMNS)
        w.writerows([paths[i], args.tag, ""] for i in picks)
    else:
        sys.stdout.write("".join(paths[i] + "\n" for i in picks))
    print(f"{plural(len(picks), 'track')} to label for tag {args.tag}: {how}"
          + (f" (only {len(candidates)} not labelled)" if len(picks) < args.count else ""), file=sys.stderr)
    return EXIT_OK


def run_calibrate(args):
    if args.max_fdr is not None and args.confidence is None:
        raise UsageError("--max-fdr needs --confidence 1-DELTA (e.g. --confidence 0.9): the share of calibration "
                         "samples whose threshold keeps the FDR at or below ALPHA")
    if args.max_miss is not None and args.confidence is not None:
        raise UsageError("--confidence goes with --max-fdr: --max-miss holds on average over calibration samples")
    store, paths, means = open_store(args.store)
    probe = load_probe(args.probe)
    check_model(probe, args.probe, store)
    tag = probe["tag"]
    labels = require_labels(read_labels(args.labels, tag, store))
    used = [p for p in labels.labels if p in set(probe["fitted_on"])]
    if used:
        raise UsageError(f"{len(used)} of the calibration tracks {'was' if len(used) == 1 else 'were'} used to fit "
                         f"the probe (the first {used[0]}): calibrate on a fresh random sample (python -m "
                         f"tagger.probe suggest --store {args.store} --tag {tag} --probe {args.probe} --random --csv)")
    row = {p: i for i, p in enumerate(paths)}
    cal = sorted(labels.labels, key=row.get)
    scores = logits(probe, means[[row[p] for p in cal]])
    y = np.array([labels.labels[p] for p in cal])
    if args.max_miss is not None:
        result = calibrate.max_miss(scores, y, args.max_miss)
    else:
        result = calibrate.max_fdr(scores, y, args.max_fdr, round(1 - args.confidence, 12))
    t = result.threshold
    probe["calibration"] = {**result.as_dict(), "score": "logit",
                            "threshold_probability": None if t is None else float(expit(t)),
                            "labels": os.path.abspath(args.labels)}
    write_probe(args.probe, probe)
    print(f"Tag {tag}: {describe(probe)}; wrote {args.probe}")
    if t is None:
        print(f"{PROG}: warning: tag {tag} has no threshold: {result.note}; label more of a random sample "
              f"(python -m tagger.probe suggest --random) and calibrate again", file=sys.stderr)
    return EXIT_OK


def run_apply(args):
    store, paths, means = open_store(args.store)
    probe_paths = args.probe or sorted(glob.glob(os.path.join(glob.escape(args.store), "probes", "*.json")))
    if not probe_paths:
        raise UsageError(f"{args.store} has no probes (probes/*.json): fit one (python -m tagger.probe fit "
                         f"--store {args.store} --labels LABELS.csv --tag NAME), or pass --probe")
    results = []
    for path in probe_paths:
        probe = load_probe(path)
        check_model(probe, path, store)
        if any(r["tag"] == probe["tag"] for r in results):
            raise UsageError(f"two probes of tag {probe['tag']} ({path} and another): pass one of them")
        z = logits(probe, means)
        c = probe.get("calibration") or {}
        decided = None if c.get("threshold") is None else z >= c["threshold"]
        report = {"tag": probe["tag"], "probe": path, "cv_roc_auc": probe["cv_roc_auc"], "calibration": c or None,
                  "decided": None if decided is None else int(decided.sum()), "summary": describe(probe)}
        results.append({**report, "probabilities": expit(z), "decisions": decided})
    write_scores(paths, results, args.format)
    return EXIT_OK


def write_scores(paths, results, fmt, out=None, err=None):
    """Every track's probability (and decision, where calibrated) under each probe, as tagger.predict
    writes its tags: table (one line a track), json ({"probes", "tracks"}), csv (one row per track and
    tag). The per-tag summary goes in the json, to stderr with the others."""
    out, err = out or sys.stdout, err or sys.stderr

    def decision(r, i):
        return None if r["decisions"] is None else bool(r["decisions"][i])

    if fmt == "json":
        probes = [{k: v for k, v in r.items() if k not in ("probabilities", "decisions")} for r in results]
        tracks = [{"path": p, "tags": {r["tag"]: {"probability": round(float(r["probabilities"][i]), 6),
                                                  **({} if r["decisions"] is None else {"decision": decision(r, i)})}
                                       for r in results}} for i, p in enumerate(paths)]
        json.dump({"probes": probes, "tracks": tracks}, out, indent=1)
        out.write("\n")
        return
    for r in results:
        extra = "" if r["decided"] is None else f"; {r['decided']} of {plural(len(paths), 'track')} decided yes"
        err.write(f"{r['tag']}: {r['summary']}{extra}\n")
    if fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["path", "tag", "probability", "decision"])
        for i, p in enumerate(paths):
            for r in results:
                d = decision(r, i)
                w.writerow([p, r["tag"], f"{r['probabilities'][i]:.6f}", "" if d is None else int(d)])
    else:
        for i, p in enumerate(paths):
            out.write(f"{p}  " + "  ".join(f"{r['tag']} {r['probabilities'][i]:.3f}" + {None: "", True: " yes",
                      False: " no"}[decision(r, i)] for r in results) + "\n")


# Command line

def level(text):
    """argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number between 0 and 1 (exclusive)")
    return value


def parse_args(argv):
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{fit,apply,suggest,calibrate}")

    def command(name, text):
        s = sub.add_parser(name, help=text, description=text, prog=f"{PROG} {name}")
        s.add_argument("--store", required=True, metavar="STORE", help="the embedding store folder")
        return s

    f = command("fit", "fit a tag's probe on the labelled tracks' mean embeddings")
    f.add_argument("--labels", required=True, metavar="LABELS.csv", help="CSV with the columns path,tag,label")
    f.add_argument("--tag", required=True, metavar="NAME", help="the tag to fit")
    f.add_argument("--out", metavar="PROBE", help="the probe file (default: STORE/probes/NAME.json)")
    f.add_argument("--seed", type=int, default=0, help="seeds the cross-validation folds")
    a = command("apply", "score every track of the store with probes")
    a.add_argument("--probe", nargs="+", metavar="PROBE", help="probe files (default: all of STORE/probes/)")
    a.add_argument("--format", choices=("table", "json", "csv"), default="table",
                   help="table: one line a track; json: {probes, tracks}; csv: one row per track and tag "
                   "(path, tag, probability, decision)")
    s = command("suggest", "the tracks most worth labelling next for a tag")
    s.add_argument("--tag", required=True, metavar="NAME", help="the tag to label")
    s.add_argument("--labels", metavar="LABELS.csv", help="the labels so far (default: none)")
    s.add_argument("--probe", metavar="PROBE", help="the tag's probe (default: STORE/probes/NAME.json, if there)")
    s.add_argument("-n", "--count", type=positive_int, default=10, help="how many tracks")
    s.add_argument("--random", action="store_true", help="a uniform random sample of the tracks not labelled: "
                   "the calibration sample")
    s.add_argument("--seed", type=int, default=0, help="seeds --random")
    s.add_argument("--csv", action="store_true", help="print a labels file (path,tag,label) to fill in, not paths")
    c = command("calibrate", "a probe's threshold from a labelled random sample")
    c.add_argument("--probe", required=True, metavar="PROBE", help="the probe file (the threshold is written there)")
    c.add_argument("--labels", required=True, metavar="CAL.csv", help="labels of a random sample (suggest --random) "
                   "the probe was not fitted on")
    control = c.add_mutually_exclusive_group(required=True)
    control.add_argument("--max-miss", type=level, metavar="ALPHA", help="miss at most this share of the positives")
    control.add_argument("--max-fdr", type=level, metavar="ALPHA", help="at most this share of the yes decisions "
                         "wrong (with --confidence)")
    c.add_argument("--confidence", type=level, metavar="1-DELTA", help="with --max-fdr: the probability, over "
                   "calibration samples, that the FDR is kept (e.g. 0.9)")
    return p.parse_args(argv)


def run(args):
    return {"fit": run_fit, "apply": run_apply, "suggest": run_suggest, "calibrate": run_calibrate}[args.command](args)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return main_guard(PROG, run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
