"""Per-tag thresholds, decision metrics and bootstrap intervals: the rules against brute force over
sklearn, the vectorised figures against sklearn with sample weights, the intervals' coverage by
simulation, and the whole path on a trained export (thresholds.json, the `decide` signature, predict's
rule, evaluate's report, compare's paired bootstrap)."""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import (average_precision_score, f1_score, precision_score, recall_score,
                             roc_auc_score)

from conftest import ROOT, run_cli
from tagger import decisions


@pytest.mark.parametrize("text,rule", [("f1", "f1"), ("precision:0.8", "precision:0.8"), ("recall:1", "recall:1"),
                                       (" precision:.50 ", "precision:0.5")])
def test_rules_parse(text, rule):
    assert decisions.parse_rule(text) == rule


@pytest.mark.parametrize("text", ["f2", "precision", "precision:0", "precision:1.5", "recall:x", "f1:0.5", ""])
def test_bad_rules_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="does not parse"):
        decisions.parse_rule(text)


def _tag(seed, n=400, rate=0.15):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < rate).astype(int)
    p = np.round(np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1), 3)     # rounded: ties, as real scores have
    return y, p


@pytest.mark.parametrize("seed", range(4))
def test_thresholds_by_each_rule_against_brute_force(seed):
    y, p = _tag(seed)
    candidates = np.unique(p)
    f1 = [f1_score(y, p >= t) for t in candidates]
    t, note = decisions.choose_threshold(y, p, "f1")
    assert note is None and f1_score(y, p >= t) == pytest.approx(max(f1))
    precision = np.array([precision_score(y, p >= t, zero_division=0) for t in candidates])
    t, _ = decisions.choose_threshold(y, p, "precision:0.6")
    assert t == candidates[np.flatnonzero(precision >= 0.6)[0]]          # the lowest that reaches it
    recall = np.array([recall_score(y, p >= t) for t in candidates])
    t, _ = decisions.choose_threshold(y, p, "recall:0.9")
    assert t == candidates[np.flatnonzero(recall >= 0.9)[-1]]            # the highest that reaches it


def test_tags_without_a_threshold_say_why():
    y, p = _tag(0)
    few = np.zeros_like(y)
    few[:4] = 1
    assert decisions.choose_threshold(few, p, "f1") == (None, "4 positives (fewer than 5)")
    assert decisions.choose_threshold(y, 1 - p * 0.999, "precision:1") == (None, "precision 1 is not reached")
    chosen = decisions.choose_thresholds(np.stack([y, few], 1), np.stack([p, p], 1), ["a", "b"], "f1", "valid", "d")
    assert chosen["tags"]["a"]["positives"] == y.sum() and chosen["tags"]["b"]["threshold"] is None
    assert decisions.without_threshold(chosen) == {"b": "4 positives (fewer than 5)"}
    assert list(decisions.threshold_vector(chosen, ["b", "a"])) == [np.inf, chosen["tags"]["a"]["threshold"]]


def test_weighted_figures_equal_sklearn_with_sample_weights():
    rng = np.random.default_rng(7)
    y = np.stack([_tag(s)[0] for s in range(3)], 1)
    p = np.stack([_tag(s)[1] for s in range(3)], 1)
    thresholds = np.array([0.5, np.inf, 0.62])
    W = rng.integers(0, 4, (6, len(y)))
    out = decisions.figures(W, y, p, thresholds)
    for b, w in enumerate(W):
        for i in range(3):
            assert out["roc_auc"][b, i] == pytest.approx(roc_auc_score(y[:, i], p[:, i], sample_weight=w), abs=1e-6)
            assert out["pr_auc"][b, i] == pytest.approx(average_precision_score(y[:, i], p[:, i], sample_weight=w),
                                                        abs=1e-6)
        decided = p >= thresholds
        for i in (0, 2):
            assert out["f1"][b, i] == pytest.approx(f1_score(y[:, i], decided[:, i], sample_weight=w))
            assert out["precision"][b, i] == pytest.approx(precision_score(y[:, i], decided[:, i], sample_weight=w))
            assert out["recall"][b, i] == pytest.approx(recall_score(y[:, i], decided[:, i], sample_weight=w))
        assert np.isnan(out["f1"][b, 1])
        assert out["micro_f1"][b] == pytest.approx(
            f1_score(y[:, [0, 2]], decided[:, [0, 2]], average="micro", sample_weight=w))


def test_bootstrap_resamples_whole_groups_and_leaves_out_tags_without_positives():
    groups = np.repeat(["a", "b", "c", "d"], [1, 2, 3, 4])
    W = decisions.resample_weights(groups, 50, np.random.default_rng(0))
    assert W.shape == (50, 10) and (W.sum(axis=1) > 0).all()
    for row in W:       # clips of one artist share one multiplicity, and four artists are drawn
        assert all(len(set(row[groups == g])) == 1 for g in "abcd")
        assert sum(row[groups == g][0] for g in "abcd") == 4
    y = np.zeros((10, 2), int)
    y[[0, 5], 0], y[[1, 2, 6, 9], 1] = 1, 1
    p = np.linspace(0, 1, 20).reshape(10, 2)
    boot = decisions.bootstrap(y, p, groups, 200, seed=1)
    lost = np.isnan(boot["roc_auc"])
    assert lost[:, 0].any() and not lost.all()
    keep = ~lost[:, 0] & ~lost[:, 1]
    np.testing.assert_allclose(boot["macro_roc_auc"][keep], boot["roc_auc"][keep].mean(axis=1))
    only = lost[:, 0] & ~lost[:, 1]      # the average of the resamples that lost tag 0 is tag 1's alone
    np.testing.assert_allclose(boot["macro_roc_auc"][only], boot["roc_auc"][only, 1])


def test_artist_intervals_cover_the_true_auc_and_clip_intervals_do_not():
    """Clips clustered by artist (an artist's offset shifts all its scores; artists differ in how many
    of their clips carry the tag): the population ROC-AUC is Phi(d / 2). Over 400 data sets, the 95 %
    interval from resampling artists holds it near 95 % of the time; resampling clips, as if they were
    independent, far less often."""
    rng = np.random.default_rng(1)
    artists, per_artist, d = 50, 12, 1.0
    true = norm.cdf(d / 2)
    group = np.repeat(np.arange(artists), per_artist)
    covered = {"artist": 0, "clip": 0}
    draws = 400
    for k in range(draws):
        y = (rng.random(artists * per_artist) < rng.beta(0.6, 1.4, artists)[group]).astype(int)
        s = d * y + rng.normal(0, 1, artists)[group] + rng.normal(0, 1, artists * per_artist)
        for unit, groups in (("artist", group), ("clip", np.arange(len(y)))):
            low, high = decisions.interval(decisions.bootstrap(y[:, None], s[:, None], groups, 300, seed=k)
                                           ["macro_roc_auc"])
            covered[unit] += low <= true <= high
    artist, clip = covered["artist"] / draws, covered["clip"] / draws
    # Within 0.05 of 95 %: four Monte Carlo standard errors over 400 draws (0.011), and percentile
    # intervals from 50 clusters run a little narrow (0.89 to 0.95 over other seeds of this test).
    assert 0.90 <= artist <= 0.99, artist
    assert clip <= 0.85 and clip < artist - 0.1, (clip, artist)


# ----------------------------------------------------------------------------------------------
# The whole path on a trained export

@pytest.fixture(scope="module")
def export(crnn_run):
    return crnn_run[0] / "models" / "crnn"


def test_thresholds_are_stored_with_the_export_and_decide_in_the_savedmodel(export, tiny_records):
    thresholds = json.loads((export / "thresholds.json").read_text())
    tags = json.loads((export / "tags.json").read_text())
    assert thresholds["rule"] == "f1" and thresholds["split"] == "valid" and list(thresholds["tags"]) == tags
    manifest = json.loads(open(f"{tiny_records}/manifest.json").read())
    for tag, t in thresholds["tags"].items():
        assert t["positives"] == manifest["tag_counts"]["valid"][tag]
        assert (t["threshold"] is None) == (t["positives"] < 5 or t["note"] is not None)
    assert any(t["threshold"] is not None for t in thresholds["tags"].values())
    # A fresh process with TensorFlow alone: decide = serving_default's probabilities at the thresholds.
    code = (
        "import json, sys, numpy as np, tensorflow as tf\n"
        "m = tf.saved_model.load(sys.argv[1])\n"
        "x = tf.constant(np.random.default_rng(0).uniform(-0.5, 0.5, (3, json.load(open(sys.argv[1] + "
        "'/config.json'))['clip_samples'])).astype('float32'))\n"
        "d = m.signatures['decide'](waveform=x)\n"
        "p = m.signatures['serving_default'](waveform=x)['probabilities'].numpy()\n"
        "print(json.dumps({'p': p.tolist(), 'decisions': d['decisions'].numpy().tolist(), "
        "'dp': d['probabilities'].numpy().tolist(), 't': [str(v) for v in d['thresholds'].numpy()]}))\n")
    r = subprocess.run([sys.executable, "-c", code, str(export)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    cut = decisions.threshold_vector(thresholds, tags).astype(np.float32)
    np.testing.assert_array_equal(np.array(out["t"], dtype=np.float32), cut)
    np.testing.assert_array_equal(out["dp"], out["p"])
    np.testing.assert_array_equal(out["decisions"], np.array(out["p"], np.float32) >= cut)


def test_training_reports_f1_and_intervals(export, crnn_run):
    metrics = json.loads((export / "metrics.json").read_text())["test"]
    report = json.loads((export / "eval-test" / "metrics.json").read_text())["test"]
    assert metrics["roc_auc"] == report["roc_auc"] and metrics["micro_f1"] == report["micro_f1"]
    low, high = metrics["roc_auc_ci"]
    assert low <= metrics["roc_auc"] <= high and metrics["macro_f1"] is not None
    assert metrics["bootstrap"]["resamples"] == 1000 and metrics["bootstrap"]["unit"] == "artist"
    pred = np.load(export / "eval-test" / "predictions.npz")
    y, p = pred["labels"], pred["probabilities"]
    assert metrics["roc_auc"] == pytest.approx(np.mean([roc_auc_score(y[:, i], p[:, i]) for i in range(y.shape[1])
                                                        if 0 < y[:, i].sum() < len(y)]), abs=1e-6)
    thresholds = json.loads((export / "thresholds.json").read_text())
    has = [i for i, t in enumerate(pred["tags"]) if thresholds["tags"][t]["threshold"] is not None]
    cut = decisions.threshold_vector(thresholds, list(pred["tags"]))
    assert metrics["micro_f1"] == pytest.approx(f1_score(y[:, has], p[:, has] >= cut[has], average="micro"))
    rows = (export / "eval-test" / "per_tag.csv").read_text().splitlines()
    assert rows[0].startswith("tag,roc_auc,roc_auc_low,roc_auc_high") and "f1" in rows[0]
    assert "macro F1" in crnn_run[1].stdout and "95 % bootstrap intervals" in crnn_run[1].stdout


def _predict(export, music, *args):
    r = run_cli("tagger.predict", music, "--model", export, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def song(tmp_path_factory, tiny_release):
    """One of the tiny release's test clips, alone in a folder."""
    folder = tmp_path_factory.mktemp("song")
    shutil.copy(sorted(Path(tiny_release, "d").iterdir())[0], folder / "a.wav")
    return folder / "a.wav"


def test_predict_decides_by_the_stored_thresholds_in_every_format(export, song, tmp_path):
    everything = json.loads(_predict(export, song, "--format", "json", "--top-k", "0", "--threshold", "0").stdout)
    probs = everything[0]["tags"]
    thresholds = json.loads((export / "thresholds.json").read_text())["tags"]
    decided = sorted((t for t, p in probs.items() if thresholds[t]["threshold"] is not None
                      and p >= thresholds[t]["threshold"]), key=lambda t: -probs[t])
    doc = json.loads(_predict(export, song, "--format", "json", "--top-k", "0").stdout)
    assert list(doc[0]["tags"]) == decided
    capped = json.loads(_predict(export, song, "--format", "json", "--top-k", "1").stdout)
    assert list(capped[0]["tags"]) == decided[:1]
    rows = _predict(export, song, "--format", "csv", "--top-k", "0").stdout.splitlines()[1:]
    assert [row.split(",")[3] for row in rows] == decided
    table = _predict(export, song, "--top-k", "0").stdout
    assert (table.count(" 0.") == len(decided)) if decided else "(no tag decided)" in table
    over = json.loads(_predict(export, song, "--format", "json", "--top-k", "0", "--threshold", "0.5").stdout)
    assert list(over[0]["tags"]) == sorted((t for t, p in probs.items() if p >= 0.5), key=lambda t: -probs[t])
    # An export without thresholds: the top-k, said once.
    old = tmp_path / "old"
    shutil.copytree(export, old)
    (old / "thresholds.json").unlink()
    r = _predict(old, song, "--format", "json", "--top-k", "3")
    assert list(json.loads(r.stdout)[0]["tags"]) == sorted(probs, key=lambda t: -probs[t])[:3]
    assert r.stderr.count("has no per-tag thresholds") == 1


def test_evaluate_with_a_rule_never_touches_the_export(export, tiny_records, tmp_path):
    before = (export / "thresholds.json").read_bytes()
    r = run_cli("tagger.evaluate", "--model", export, "--threshold-rule", "recall:0.5", "--bootstrap", "200",
                "--out", tmp_path / "report")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (export / "thresholds.json").read_bytes() == before
    chosen = json.loads((tmp_path / "report" / "thresholds.json").read_text())
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())["test"]
    assert chosen["rule"] == "recall:0.5" and metrics["thresholds"]["rule"] == "recall:0.5"
    assert metrics["bootstrap"]["resamples"] == 200 and "macro F1" in r.stdout
    # Stored thresholds were chosen on valid: F1 there is refused, the AUCs are still reported.
    r = run_cli("tagger.evaluate", "--model", export, "--split", "valid", "--bootstrap", "50", "--out", tmp_path / "v")
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "v" / "metrics.json").read_text())["valid"]
    assert "macro_f1" not in metrics and "chosen on clips of this split" in metrics["f1_note"] and "no F1" in r.stdout
    # The same clips in another folder (converted again: another manifest): still refused.
    copy = tmp_path / "again"
    shutil.copytree(tiny_records, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "created": "later"}))
    r = run_cli("tagger.evaluate", "--model", export, "--data", copy, "--split", "valid", "--bootstrap", "20",
                "--out", tmp_path / "v2")
    assert r.returncode == 0 and "no F1" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("args,message", [
    (["--bootstrap", "0"], "--bootstrap"),
    (["--threshold-rule", "precision:2"], "does not parse"),
    (["--threshold-rule", "f1", "--split", "valid"], "evaluate on --split test"),
])
def test_evaluate_bad_flags_exit_2_before_tensorflow(args, message):
    r = run_cli("tagger.evaluate", "--model", "/no/such/model", *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_evaluate_with_a_tag_map_merges_labels_by_or_and_scores_by_max(export, tmp_path):
    tags = json.loads((export / "tags.json").read_text())
    (tmp_path / "tags.map").write_text(f"# two merged, one dropped, one renamed\n{tags[1]} -> {tags[0]}\n{tags[2]} ->\n"
                                       f"{tags[3]} -> renamed\n")
    r = run_cli("tagger.evaluate", "--model", export, "--tag-map", tmp_path / "tags.map", "--bootstrap", "20",
                "--out", tmp_path / "mapped")
    assert r.returncode == 0, r.stderr[-2000:]
    raw, mapped = (np.load(path / "predictions.npz") for path in (export / "eval-test", tmp_path / "mapped"))
    assert list(mapped["tags"]) == [tags[0], "renamed", *tags[4:]]
    np.testing.assert_array_equal(mapped["clip_id"], raw["clip_id"])
    np.testing.assert_array_equal(mapped["labels"][:, 0], raw["labels"][:, :2].max(axis=1))
    np.testing.assert_array_equal(mapped["labels"][:, 1:], raw["labels"][:, 3:])
    np.testing.assert_allclose(mapped["probabilities"][:, 0], raw["probabilities"][:, :2].max(axis=1), atol=1e-6)
    np.testing.assert_allclose(mapped["probabilities"][:, 1:], raw["probabilities"][:, 3:], atol=1e-6)
    metrics = json.loads((tmp_path / "mapped" / "metrics.json").read_text())
    assert metrics["tag_map"] == {tags[1]: tags[0], tags[2]: None, tags[3]: "renamed"}
    stored = json.loads((export / "thresholds.json").read_text())["tags"]
    assert metrics["test"]["per_tag"][tags[0]]["threshold"] is None       # merged: its stored one no longer fits
    assert tags[0] in metrics["test"]["thresholds"]["without"]
    assert metrics["test"]["per_tag"]["renamed"]["threshold"] == stored[tags[3]]["threshold"]   # renamed: kept


def test_an_unknown_tag_in_the_map_exits_2_before_tensorflow(export, tmp_path):
    (tmp_path / "bad.map").write_text("no such tag -> guitar\n")
    code = ("import sys\nfrom tagger import evaluate\n"
            f"status = evaluate.main(['--model', {str(export)!r}, '--tag-map', {str(tmp_path / 'bad.map')!r}])\n"
            "assert not any(m.split('.')[0] in ('tensorflow', 'keras') for m in sys.modules)\nsys.exit(status)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "'no such tag' is not a tag of the model" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_paired_bootstrap_is_sklearn_on_each_resample():
    rng = np.random.default_rng(3)
    y = (rng.random((60, 2)) < 0.3).astype(int)
    a, b = rng.random((60, 2)) + 0.3 * y, rng.random((60, 2)) + 0.1 * y
    groups = np.repeat(np.arange(12), 5)
    boot = decisions.bootstrap(y, a, groups, 30, seed=4, chunk=7, extra=[b])
    rng = np.random.default_rng(4)
    weights = np.concatenate([decisions.resample_weights(groups, min(7, 30 - s), rng) for s in range(0, 30, 7)])
    for k, w in enumerate(weights):
        def macro(p):
            return np.mean([roc_auc_score(y[:, i], p[:, i], sample_weight=w) for i in range(2)
                            if 0 < (w * y[:, i]).sum() < w.sum()] or [np.nan])
        assert boot["macro_roc_auc"][k] == pytest.approx(macro(a), nan_ok=True)
        assert boot["extra"][0]["macro_roc_auc"][k] == pytest.approx(macro(b), nan_ok=True)
