"""tagger.probe: a tag's probe learns the tag, apply agrees with scikit-learn in every format, suggest
follows its rules (farthest-first, least sure, uniform), calibrate records tagger.calibrate's threshold
and refuses tracks fitted on, and every bad input ends in one line, exit 2, the store untouched.

The stores are real (tagger.store), their embeddings synthetic: 200 tracks in 16 dimensions around four
Gaussian cluster centres, the tag's positives (about a quarter) shifted along one direction, so the truth
of every track is known. The commands run in-process (main returns the exit status)."""
import csv
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from scipy.stats import chisquare
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from conftest import ROOT
from tagger import calibrate, probe
from tagger.probe import main
from tagger.store import Model, Store

N, D, TAG = 200, 16, "dreamy"
MODEL = Model(name="model-a", fingerprint="a" * 64, tags=("rock", "pop"), window_seconds=3.0, hop_seconds=1.5)


def synthetic(seed=0):
    """(means (N, D) float32, truth (N,) 0/1)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2, (4, D))
    shift = np.zeros(D)
    shift[:4] = 2.0
    truth = (rng.random(N) < 0.25).astype(int)
    x = centres[rng.integers(4, size=N)] + rng.standard_normal((N, D)) + truth[:, None] * shift
    return x.astype(np.float32), truth


def make_store(folder, x, model=MODEL):
    """A store of one window per track (its mean is the window), the files named but not on disk."""
    music = os.path.join(os.path.realpath(os.path.dirname(folder)), "music")
    paths = [os.path.join(music, f"track_{i:03d}.mp3") for i in range(len(x))]
    with Store.create(folder, model).writer() as w:
        for i, (path, e) in enumerate(zip(paths, x)):
            w.add(path, 1000 + i, i, 30.0, [0.0], e[None], np.zeros((1, len(model.tags))))
    return paths


@pytest.fixture
def lib(tmp_path):
    x, truth = synthetic()
    store = str(tmp_path / "store")
    paths = make_store(store, x)
    z = StandardScaler().fit_transform(x.astype(np.float64))
    return SimpleNamespace(tmp=tmp_path, store=store, x=x, z=z, truth=truth, paths=paths,
                           probe=os.path.join(store, "probes", f"{TAG}.json"))


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def write_labels(path, rows, header=("path", "tag", "label")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def training_set(truth, positives=10, negatives=20, seed=1):
    rng = np.random.default_rng(seed)
    return np.sort(np.r_[rng.choice(np.flatnonzero(truth == 1), positives, replace=False),
                         rng.choice(np.flatnonzero(truth == 0), negatives, replace=False)])


def fit(lib, capsys, rows=None):
    """Fit the tag on a training set (10 positives, 20 negatives); returns (labels file, rows, probe)."""
    rows = training_set(lib.truth) if rows is None else rows
    labels = write_labels(lib.tmp / "labels.csv", [(lib.paths[i], TAG, lib.truth[i]) for i in rows])
    code, out, err = cli(capsys, "fit", "--store", lib.store, "--labels", labels, "--tag", TAG)
    assert code == 0, err
    with open(lib.probe) as f:
        return labels, rows, json.load(f)


def probe_logits(doc, z):
    """The probe's logits from its coefficients, on the test's own standardisation of the store."""
    return z @ np.array(doc["coef"]) + doc["intercept"]


def snapshot(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def assert_farthest_first(z, picks, chosen, candidates):
    """Each pick is a candidate at the largest distance from its nearest chosen point or earlier pick."""
    chosen, left = list(chosen), set(candidates)
    for pick in picks:
        rest = sorted(left)
        nearest = cdist(z[rest], z[chosen]).min(1)
        assert nearest[rest.index(pick)] >= nearest.max() - 1e-9
        chosen.append(pick)
        left.remove(pick)


# fit

def test_fit_learns_the_tag_and_records_the_model(lib, capsys):
    labels, rows, doc = fit(lib, capsys)
    assert doc["format"] == "tagger-probe" and doc["tag"] == TAG
    assert doc["model"] == {"name": "model-a", "fingerprint": MODEL.fingerprint, "hop_seconds": 1.5,
                            "embedding_size": D}
    assert doc["store"] == os.path.abspath(lib.store) and doc["labels"] == os.path.abspath(labels)
    assert doc["counts"] == {"positives": 10, "negatives": 20} and doc["folds"] == 5
    assert sorted(doc["fitted_on"]) == sorted(lib.paths[i] for i in rows)
    assert doc["calibration"] is None and doc["C"] in probe.CS
    # The scaler is the whole store's, as sklearn fits it.
    scaler = StandardScaler().fit(lib.x.astype(np.float64))
    np.testing.assert_allclose(doc["scaler"]["mean"], scaler.mean_, rtol=1e-12)
    np.testing.assert_allclose(doc["scaler"]["scale"], scaler.scale_, rtol=1e-12)
    # The coefficients are sklearn's logistic regression at the chosen C (up to the solver's tolerance).
    ref = LogisticRegression(C=doc["C"], class_weight="balanced", max_iter=10_000, tol=1e-10)
    ref.fit(lib.z[rows], lib.truth[rows])
    np.testing.assert_allclose(probe_logits(doc, lib.z), ref.decision_function(lib.z), atol=1e-3)
    # It learnt the tag: in cross-validation, and on the 170 tracks it never saw.
    held_out = np.setdiff1d(np.arange(N), rows)
    assert doc["cv_roc_auc"] > 0.8
    assert roc_auc_score(lib.truth[held_out], probe_logits(doc, lib.z[held_out])) > 0.9


def test_fit_keeps_blank_labels_and_appended_headers_out(lib, capsys):
    """A labels file with a suggestion appended (its header again, blank labels) fits as without them."""
    _, rows, first = fit(lib, capsys)
    labels = str(lib.tmp / "labels.csv")
    with open(labels, "a") as f:
        f.write(f"path,tag,label\n{lib.paths[0]},{TAG},\n\n{lib.paths[1]},rock,1\n")
    assert cli(capsys, "fit", "--store", lib.store, "--labels", labels, "--tag", TAG)[0] == 0
    with open(lib.probe) as f:
        again = json.load(f)
    assert again["counts"] == first["counts"] and again["coef"] == first["coef"]


def test_label_paths_match_as_written_relative_or_real(lib, monkeypatch):
    """The rule: as the store writes it; else real paths, relative ones from the labels file's folder,
    then from the current folder."""
    os.makedirs(lib.tmp / "labels")
    os.symlink(lib.tmp / "music", lib.tmp / "link")
    labels = write_labels(lib.tmp / "labels" / "l.csv", [
        (lib.paths[0], TAG, 1),                                   # as written
        ("../music/track_001.mp3", TAG, 0),                       # from the labels file's folder
        ("music/track_002.mp3", TAG, 1),                          # from the current folder
        (str(lib.tmp / "link" / "track_003.mp3"), TAG, 0),        # through a symlink
        (str(lib.tmp / "music" / ".." / "music" / "track_004.mp3"), TAG, 1)])
    monkeypatch.chdir(lib.tmp)
    got = probe.read_labels(labels, TAG, Store.open(lib.store))
    assert got.labels == {lib.paths[0]: 1, lib.paths[1]: 0, lib.paths[2]: 1, lib.paths[3]: 0, lib.paths[4]: 1}


# apply

def test_apply_agrees_with_sklearn_in_every_format(lib, capsys):
    _, _, doc = fit(lib, capsys)
    model = LogisticRegression()
    model.classes_, model.coef_, model.intercept_ = (np.array([0, 1]), np.array([doc["coef"]]),
                                                     np.array([doc["intercept"]]))
    expected = model.predict_proba(StandardScaler().fit(lib.x).transform(lib.x))[:, 1]

    code, out, err = cli(capsys, "apply", "--store", lib.store, "--format", "json")
    assert code == 0 and err == ""
    got = json.loads(out)
    assert [p["tag"] for p in got["probes"]] == [TAG] and got["probes"][0]["summary"].startswith("not calibrated")
    assert [t["path"] for t in got["tracks"]] == lib.paths
    assert all("decision" not in t["tags"][TAG] for t in got["tracks"])
    np.testing.assert_allclose([t["tags"][TAG]["probability"] for t in got["tracks"]], expected, atol=2e-6)

    code, out, err = cli(capsys, "apply", "--store", lib.store, "--probe", lib.probe, "--format", "csv")
    assert code == 0 and err.startswith(f"{TAG}: not calibrated")
    rows = list(csv.DictReader(out.splitlines()))
    assert [r["path"] for r in rows] == lib.paths and {r["tag"] for r in rows} == {TAG}
    assert all(r["decision"] == "" for r in rows)
    np.testing.assert_allclose([float(r["probability"]) for r in rows], expected, atol=2e-6)

    code, out, err = cli(capsys, "apply", "--store", lib.store, "--probe", lib.probe)
    assert code == 0
    lines = [line.split("  ") for line in out.splitlines()]
    assert [path for path, _ in lines] == lib.paths
    np.testing.assert_allclose([float(s.split(" ")[1]) for _, s in lines], expected, atol=6e-4)


@pytest.mark.parametrize("other", [dataclasses.replace(MODEL, name="model-b", fingerprint="b" * 64),
                                   dataclasses.replace(MODEL, hop_seconds=3.0)], ids=["fingerprint", "hop"])
def test_another_models_store_is_refused(lib, capsys, other):
    labels, _, _ = fit(lib, capsys)
    other_store = str(lib.tmp / "other")
    make_store(other_store, lib.x, other)
    before, probe_before = snapshot(other_store), snapshot(os.path.dirname(lib.probe))
    for args in (["apply", "--store", other_store, "--probe", lib.probe],
                 ["fit", "--store", other_store, "--labels", labels, "--tag", TAG, "--out", lib.probe],
                 ["suggest", "--store", other_store, "--tag", TAG, "--probe", lib.probe],
                 ["calibrate", "--store", other_store, "--probe", lib.probe, "--labels", labels, "--max-miss", "0.1"]):
        code, out, err = cli(capsys, *args)
        assert code == 2 and out == "", args
        assert err.count("\n") == 1 and f"probe {lib.probe} was fitted on embeddings of model-a" in err, args
    assert snapshot(other_store) == before and snapshot(os.path.dirname(lib.probe)) == probe_before


# suggest

def test_suggest_before_positives_is_a_k_center_cover(lib, capsys):
    negatives = np.flatnonzero(lib.truth == 0)[:3]
    labels = write_labels(lib.tmp / "labels.csv", [(lib.paths[i], TAG, 0) for i in negatives])
    code, out, err = cli(capsys, "suggest", "--store", lib.store, "--labels", labels, "--tag", TAG, "-n", "8")
    assert code == 0 and "k-center" in err
    picks = [lib.paths.index(p) for p in out.splitlines()]
    assert len(set(picks)) == 8 and not set(picks) & set(negatives)
    assert_farthest_first(lib.z, picks, negatives, np.setdiff1d(np.arange(N), negatives))

    # No labels at all: the track nearest the library's mean first, then farthest-first.
    code, out, _ = cli(capsys, "suggest", "--store", lib.store, "--tag", TAG, "-n", "6", "--csv")
    rows = list(csv.DictReader(out.splitlines()))
    assert [(r["tag"], r["label"]) for r in rows] == [(TAG, "")] * 6
    picks = [lib.paths.index(r["path"]) for r in rows]
    assert picks[0] == np.argmin(((lib.z - lib.z.mean(0)) ** 2).sum(1))
    assert_farthest_first(lib.z, picks[1:], picks[:1], np.setdiff1d(np.arange(N), picks[:1]))


def test_suggest_after_a_probe_picks_the_least_sure(lib, capsys):
    labels, rows, doc = fit(lib, capsys)
    code, out, err = cli(capsys, "suggest", "--store", lib.store, "--labels", labels, "--tag", TAG, "-n", "5")
    assert code == 0 and "least sure" in err
    picks = [lib.paths.index(p) for p in out.splitlines()]
    unlabelled = np.setdiff1d(np.arange(N), rows)
    margin = np.abs(probe_logits(doc, lib.z))
    pool = unlabelled[np.argsort(margin[unlabelled])[:25]]
    assert picks[0] == pool[0] and set(picks) <= set(pool) and len(set(picks)) == 5
    assert_farthest_first(lib.z, picks[1:], picks[:1], np.setdiff1d(pool, picks[:1]))


def test_suggest_random_is_seeded_uniform_and_leaves_the_labelled_out(lib, capsys):
    labels, rows, _ = fit(lib, capsys)
    args = ["suggest", "--store", lib.store, "--labels", labels, "--tag", TAG, "--random", "-n", "10"]
    first = cli(capsys, *args, "--seed", "3")[1].splitlines()
    assert cli(capsys, *args, "--seed", "3")[1].splitlines() == first
    assert cli(capsys, *args, "--seed", "4")[1].splitlines() != first
    assert len(set(first)) == 10 and not set(first) & {lib.paths[i] for i in rows}
    # Uniform: over 600 seeds every candidate is drawn about as often (chi-square).
    candidates = np.setdiff1d(np.arange(N), rows)
    counts = np.bincount(np.concatenate([probe.random_sample(candidates, 10, s) for s in range(600)]), minlength=N)
    assert counts[rows].sum() == 0
    assert chisquare(counts[candidates]).pvalue > 1e-3


# calibrate

def calibration_file(lib, capsys, labels, n, name="cal.csv", extra=()):
    code, out, _ = cli(capsys, "suggest", "--store", lib.store, "--labels", labels, "--tag", TAG, "--random",
                       "-n", n, "--csv")
    assert code == 0
    picks = [lib.paths.index(r["path"]) for r in csv.DictReader(out.splitlines())] + list(extra)
    return write_labels(lib.tmp / name, [(lib.paths[i], TAG, lib.truth[i]) for i in picks]), np.array(picks)


def test_calibrate_records_the_threshold_and_apply_decides_with_it(lib, capsys):
    labels, _, doc = fit(lib, capsys)
    cal, picks = calibration_file(lib, capsys, labels, 150)
    z, y = probe_logits(doc, lib.z), lib.truth
    for flags, expected, words in (
            (["--max-miss", "0.1"], calibrate.max_miss(z[picks], y[picks], 0.1), "max-miss 0.1:"),
            (["--max-fdr", "0.25", "--confidence", "0.9"], calibrate.max_fdr(z[picks], y[picks], 0.25, 0.1),
             "max-fdr 0.25 at 90 % confidence:")):
        code, out, err = cli(capsys, "calibrate", "--store", lib.store, "--probe", lib.probe, "--labels", cal, *flags)
        assert code == 0 and err == "" and words in out
        with open(lib.probe) as f:
            c = json.load(f)["calibration"]
        assert expected.threshold is not None
        assert c["threshold"] == pytest.approx(expected.threshold, abs=1e-9)
        assert (c["control"], c["alpha"], c["size"], c["positives"]) == (
            expected.control, expected.alpha, 150, int(y[picks].sum()))
        assert c["delta"] == (None if expected.delta is None else pytest.approx(0.1))
        assert c["score"] == "logit" and c["labels"] == os.path.abspath(cal)
        code, out, err = cli(capsys, "apply", "--store", lib.store, "--format", "csv")
        decided = z >= c["threshold"]
        assert [r["decision"] for r in csv.DictReader(out.splitlines())] == [str(int(d)) for d in decided]
        assert words in err and "calibrated on 150 labels" in err
        assert f"{decided.sum()} of 200 tracks decided yes" in err


def test_calibrate_with_too_few_positives_warns_and_records_none(lib, capsys):
    labels, _, _ = fit(lib, capsys)
    cal, picks = calibration_file(lib, capsys, labels, 12)
    positives = int(lib.truth[picks].sum())
    assert positives < 9                                  # max-miss 0.1 needs 9
    code, out, err = cli(capsys, "calibrate", "--store", lib.store, "--probe", lib.probe, "--labels", cal,
                         "--max-miss", "0.1")
    assert code == 0
    assert err.count("\n") == 1 and f"not attainable with {positives} positive labels; needs 9" in err
    with open(lib.probe) as f:
        c = json.load(f)["calibration"]
    assert c["threshold"] is None and c["needs"] == 9 and c["size"] == 12
    code, out, err = cli(capsys, "apply", "--store", lib.store, "--format", "json")
    summary = json.loads(out)["probes"][0]["summary"]
    assert summary == f"no threshold: not attainable with {positives} positive labels; needs 9"


def test_calibrate_refuses_tracks_the_probe_was_fitted_on(lib, capsys):
    labels, rows, _ = fit(lib, capsys)
    cal, _ = calibration_file(lib, capsys, labels, 30, extra=rows[:3])
    before = snapshot(lib.store)
    code, out, err = cli(capsys, "calibrate", "--store", lib.store, "--probe", lib.probe, "--labels", cal,
                         "--max-miss", "0.1")
    assert code == 2 and err.count("\n") == 1
    assert "3 of the calibration tracks were used to fit the probe" in err and "suggest" in err
    assert snapshot(lib.store) == before


def test_refit_drops_the_calibration_and_spares_other_tags_probes(lib, capsys):
    labels, rows, _ = fit(lib, capsys)
    cal, _ = calibration_file(lib, capsys, labels, 60)
    code, _, _ = cli(capsys, "calibrate", "--store", lib.store, "--probe", lib.probe, "--labels", cal,
                     "--max-miss", "0.2")
    assert code == 0
    code, _, err = cli(capsys, "fit", "--store", lib.store, "--labels", labels, "--tag", TAG)
    assert code == 0 and "earlier calibration no longer applies" in err
    with open(lib.probe) as f:
        assert json.load(f)["calibration"] is None
    rock = write_labels(lib.tmp / "rock.csv", [(lib.paths[i], "rock", lib.truth[i]) for i in rows])
    before = snapshot(lib.store)
    code, _, err = cli(capsys, "fit", "--store", lib.store, "--labels", rock, "--tag", "rock", "--out", lib.probe)
    assert code == 2 and f"probe {lib.probe} is tag dreamy's, not rock's: pass another --out" in err
    assert snapshot(lib.store) == before


# Bad input: one line, exit 2, nothing changed

def bad_cases(lib):
    p, t = lib.paths, lib.truth
    train = [(p[i], TAG, t[i]) for i in training_set(t)]
    negatives = [(p[i], TAG, 0) for i in np.flatnonzero(t == 0)[:12]]
    one = negatives + [(p[int(np.flatnonzero(t == 1)[0])], TAG, 1)]
    absent = train + [("/nowhere/a.mp3", TAG, 1), ("/nowhere/b.mp3", TAG, 0)]
    not_probe = lib.tmp / "not_probe.json"
    not_probe.write_text("{}")

    def labels(rows, header=("path", "tag", "label")):
        return write_labels(lib.tmp / f"bad-{next(numbers)}.csv", rows, header)
    numbers = iter(range(100))

    def fit_with(file):
        return ["fit", "--store", lib.store, "--labels", file, "--tag", TAG]
    return {
        "no path column": (fit_with(labels(train, ("file", "tag", "label"))), "has no path column"),
        "not in the store": (fit_with(labels(absent)), "2 paths labelled for tag dreamy are not in the store "
                             f"{lib.store}, the first /nowhere/a.mp3 (line 32)"),
        "label not 0 or 1": (fit_with(labels(train + [(p[0], TAG, "yes")])), "line 32: label 'yes' of"),
        "no positives": (fit_with(labels(negatives)), "tag dreamy has 0 positives and 12 negatives among the "
                         "labelled tracks: label at least 2 of each (python -m tagger.probe suggest"),
        "one positive": (fit_with(labels(one)), "tag dreamy has 1 positive and 12 negatives"),
        "no labels of the tag": (fit_with(labels([(p[0], "rock", 1)])),
                                 "no 0 or 1 label for tag dreamy (it labels rock)"),
        "two labels of a track": (fit_with(labels(train + [(p[0], TAG, 1), (p[0], TAG, 0)])), "both 0 and 1"),
        "missing labels file": (fit_with(str(lib.tmp / "none.csv")), "labels file"),
        "missing store": (["apply", "--store", str(lib.tmp / "nostore")], "is not an embedding store"),
        "missing probe": (["apply", "--store", lib.store, "--probe", str(lib.tmp / "no.json")], "does not exist: fit"),
        "no probes": (["apply", "--store", lib.store], "has no probes"),
        "not a probe": (["apply", "--store", lib.store, "--probe", str(not_probe)], "is not a tagger probe"),
        "max-fdr without confidence": (["calibrate", "--store", lib.store, "--probe", lib.probe, "--labels",
                                        labels(train), "--max-fdr", "0.1"], "--max-fdr needs --confidence"),
    }


CASES = ["no path column", "not in the store", "label not 0 or 1", "no positives", "one positive",
         "no labels of the tag", "two labels of a track", "missing labels file", "missing store", "missing probe",
         "no probes", "not a probe", "max-fdr without confidence"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(lib, capsys, case):
    args, words = bad_cases(lib)[case]
    before = snapshot(lib.store)
    code, out, err = cli(capsys, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("python -m tagger.probe: error: ") and words in err, err
    assert snapshot(lib.store) == before


def test_bad_flags_exit_2(lib, capsys):
    for args in (["calibrate", "--store", lib.store, "--probe", "p", "--labels", "l", "--max-miss", "1.5"],
                 ["calibrate", "--store", lib.store, "--probe", "p", "--labels", "l"],
                 ["suggest", "--store", lib.store, "--tag", TAG, "-n", "0"]):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


# The learning curve, and no TensorFlow

def test_learning_curve_rises_above_chance_for_both_strategies(lib):
    for strategy in ("active", "random"):
        curve = probe.learning_curve(lib.x, lib.truth, seeds=[0, 1], budgets=[40, 8], strategy=strategy)
        assert curve.shape == (2, 2) and np.isfinite(curve[:, 0]).all()
        assert (curve[:, 0] > 0.85).all(), (strategy, curve)


def test_commands_import_no_tensorflow(lib, capsys):
    labels, _, _ = fit(lib, capsys)
    script = ("import sys; from tagger.probe import main; "
              f"codes = [main(['fit', '--store', {lib.store!r}, '--labels', {labels!r}, '--tag', 'dreamy']), "
              f"main(['suggest', '--store', {lib.store!r}, '--tag', 'dreamy']), "
              f"main(['apply', '--store', {lib.store!r}])]; "
              "sys.exit(f'tensorflow imported' if 'tensorflow' in sys.modules else max(codes))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr
