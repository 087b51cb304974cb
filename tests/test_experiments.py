"""The study's experiments on tiny data: Table II's five rows, reuse of finished runs, the repeat
statistics, and the per-tag comparison of two exports."""
import csv
import json
import shutil

import numpy as np
import pytest

from conftest import run_cli
from tagger.experiments import PAIRS

TINY = ["--epochs", "1", "--width", "0.25"]


def _metrics(models, name):
    return json.loads((models / name / "metrics.json").read_text())


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def table2(long_records, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("experiments")
    dirs = ["--runs-dir", tmp / "runs", "--models-dir", tmp / "models"]
    r = run_cli("tagger.experiments", "table2", "--data", long_records, "--runs", "1", *TINY, *dirs)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, dirs, r


def test_table2_has_five_rows_from_the_runs(table2):
    tmp, _, r = table2
    out = [line.split("Wrote ")[1].split("/table2.md")[0] for line in r.stdout.splitlines() if line.startswith("Wrote")][0]
    rows = _csv(f"{out}/table2.csv")
    assert [(int(row["length"]), int(row["stride"])) for row in rows] == list(PAIRS)
    for row in rows:
        m = _metrics(tmp / "models", row["run_names"])
        assert float(row["roc_auc_mean"]) == pytest.approx(m["test"]["roc_auc"], abs=5e-5)
        assert float(row["pr_auc_mean"]) == pytest.approx(m["test"]["pr_auc"], abs=5e-5)
        assert row["runs"] == "1" and float(row["roc_auc_std"]) == 0
        assert f"-l{row['length']}s{row['stride']}-" in row["run_names"]
    md = open(f"{out}/table2.md").read()
    assert md.count("\n| 1024 |") == 2 and md.count(" | 1 | ") == 5 and md.count(" ± 0.0000") == 10


def test_finished_runs_are_reused_and_repeat_statistics(table2, long_records):
    tmp, dirs, _ = table2
    r = run_cli("tagger.experiments", "table2", "--data", long_records, "--runs", "1", *TINY, *dirs)
    assert r.returncode == 0 and r.stderr.count("reused") == 5 and ": training" not in r.stderr, r.stderr[-2000:]

    r = run_cli("tagger.experiments", "repeat", "--arch", "cnn", "--length", "256", "--stride", "256", "--runs", "2",
                "--data", long_records, *TINY, *dirs)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("reused") == 1 and r.stderr.count(": training") == 1   # seed 0 is table2's run
    out = [line.split("Wrote ")[1].split("/repeat.md")[0] for line in r.stdout.splitlines() if line.startswith("Wrote")][0]
    runs = _csv(f"{out}/runs.csv")
    assert [row["seed"] for row in runs] == ["0", "1"]
    roc = [_metrics(tmp / "models", row["run"])["test"]["roc_auc"] for row in runs]
    summary = _csv(f"{out}/repeat.csv")[0]
    assert float(summary["roc_auc_mean"]) == pytest.approx(np.mean(roc), abs=5e-5)
    assert float(summary["roc_auc_std"]) == pytest.approx(np.std(roc, ddof=1), abs=5e-5)


def test_compare_two_models(table2):
    tmp, _, _ = table2
    a, b = sorted((tmp / "models").iterdir())[:2]
    out = tmp / "compare"
    r = run_cli("tagger.experiments", "compare", a, b, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _csv(out / "per_tag.csv")
    ma, mb = _metrics(tmp / "models", a.name), _metrics(tmp / "models", b.name)
    assert {row["tag"] for row in rows} == set(ma["test"]["per_tag"])
    counts = [int(row["train_count"]) for row in rows]
    assert counts == sorted(counts, reverse=True) and counts == sorted(ma["train_tag_counts"].values(), reverse=True)
    for row in rows:
        for m, key in ((ma, f"roc_auc_{a.name}"), (mb, f"roc_auc_{b.name}")):
            value = m["test"]["per_tag"][row["tag"]]["roc_auc"]
            assert row[key] == ("" if value is None else f"{value:.4f}")
    assert (out / "per_tag.png").read_bytes()[:4] == b"\x89PNG"
    # The paired bootstrap on the saved test predictions: the difference of the macro figures the
    # exports report, with its interval and the share of resamples in which the first is ahead.
    paired = json.loads((out / "paired.json").read_text())
    for key in ("roc_auc", "pr_auc"):
        result = paired[key]
        assert result["a"] == pytest.approx(ma["test"][key], abs=1e-6)
        assert result["b"] == pytest.approx(mb["test"][key], abs=1e-6)
        assert result["difference"] == pytest.approx(ma["test"][key] - mb["test"][key], abs=1e-6)
        low, high = result["interval"]
        assert low <= high and 0 <= result["share_of_resamples_a_ahead"] <= 1
    assert paired["resamples"] == 1000 and paired["clips"] == ma["test_clips"]
    assert "the share of resamples in which" in r.stdout and "probability" not in r.stdout


def test_compare_refuses_exports_evaluated_on_different_clips(table2, long_records, tmp_path):
    tmp, _, _ = table2
    a, b = sorted((tmp / "models").iterdir())[:2]
    other = tmp_path / "b"
    shutil.copytree(b, other)
    # The same predictions in another order: the pairing goes by clip id, so nothing changes.
    r = run_cli("tagger.experiments", "compare", a, b, "--out", tmp_path / "plain")
    assert r.returncode == 0, r.stderr[-2000:]
    saved = dict(np.load(other / "eval-test" / "predictions.npz"))
    order = np.random.default_rng(0).permutation(len(saved["clip_id"]))
    assert (order != np.arange(len(order))).any()
    per_clip = ("clip_id", "path", "group", "labels", "probabilities")
    np.savez(other / "eval-test" / "predictions.npz", **{k: v[order] if k in per_clip else v for k, v in saved.items()})
    r = run_cli("tagger.experiments", "compare", a, other, "--out", tmp_path / "shuffled")
    assert r.returncode == 0, r.stderr[-2000:]
    plain, shuffled = (json.loads((tmp_path / name / "paired.json").read_text()) for name in ("plain", "shuffled"))
    for key in ("roc_auc", "pr_auc"):
        assert shuffled[key] == plain[key]
    shutil.rmtree(other / "eval-test")
    r = run_cli("tagger.experiments", "compare", a, other, "--out", tmp_path / "none")
    assert r.returncode == 0 and "No paired bootstrap" in r.stdout and "tagger.evaluate" in r.stdout
    # Its report replaced by one of the train split, then by one of a test split of other clips.
    r = run_cli("tagger.evaluate", "--model", other, "--split", "train", "--bootstrap", "20", "--out",
                other / "eval-test")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("tagger.experiments", "compare", a, other, "--out", tmp_path / "none")
    assert r.returncode == 2 and "holds predictions of the train split" in r.stderr, r.stderr
    moved = tmp_path / "moved"                    # its test split: the valid split's records
    shutil.copytree(long_records, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["splits"]["test"] = manifest["splits"]["valid"]
    (moved / "manifest.json").write_text(json.dumps(manifest))
    r = run_cli("tagger.evaluate", "--model", other, "--data", moved, "--bootstrap", "20", "--out", other / "eval-test")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("tagger.experiments", "compare", a, other, "--out", tmp_path / "none")
    assert r.returncode == 2 and "different test clips" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_zoo_tables_every_family_asked_from_its_runs(tiny_records, tmp_path):
    """zoo: one row per family (here two, two seeds each, tiny), its figures from the metrics of its
    runs; the short-chunk family's export evaluates (tagger.evaluate, through serving_default's 16
    chunks) as training did."""
    dirs = ["--runs-dir", tmp_path / "runs", "--models-dir", tmp_path / "models"]
    r = run_cli("tagger.experiments", "zoo", "--archs", "cnn,samplecnn", "--runs", "2", "--data", tiny_records,
                "--epochs", "1", "--width", "0.125", "--batch-size", "4", "--out", tmp_path / "zoo", *dirs)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _csv(tmp_path / "zoo" / "zoo.csv")
    assert [row["family"] for row in rows] == ["cnn", "samplecnn"]
    for row in rows:
        runs = [_metrics(tmp_path / "models", name) for name in row["run_names"].split()]
        assert len(runs) == 2 and row["runs"] == "2" and row["failed"] == "0"
        aucs = [m["test"]["roc_auc"] for m in runs]
        assert float(row["roc_auc_mean"]) == pytest.approx(np.mean(aucs), abs=5e-5)
        assert float(row["roc_auc_std"]) == pytest.approx(np.std(aucs, ddof=1), abs=5e-5)
        assert int(row["trainable_params"]) == runs[0]["trainable_params"] > 0
        assert int(row["forward_flops_per_clip"]) == runs[0]["forward_flops_per_clip"] > 0
        assert float(row["train_clips_per_s"]) == pytest.approx(np.mean([m["train_clips_per_s"] for m in runs]),
                                                                 abs=0.01)
    flops = {row["family"]: int(row["forward_flops_per_clip"]) for row in rows}
    from tagger.models.flops import forward_flops
    from tagger.models.samplecnn import FILTERS, build_samplecnn
    chunk_model = build_samplecnn(11, filters=tuple(round(f * 0.125) for f in FILTERS))
    assert flops["samplecnn"] == 16 * forward_flops(chunk_model)        # the 16 chunks of a test clip
    table = (tmp_path / "zoo" / "zoo.md").read_text()
    assert table.count("\n| cnn |") == 1 and table.count("\n| samplecnn |") == 1 and "± " in table
    export = tmp_path / "models" / rows[1]["run_names"].split()[0]
    e = run_cli("tagger.evaluate", "--model", export, "--data", tiny_records, "--out", tmp_path / "eval")
    assert e.returncode == 0, e.stderr[-3000:]
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())["test"]["roc_auc"]
    assert again == pytest.approx(_metrics(tmp_path / "models", export.name)["test"]["roc_auc"], abs=1e-4)


@pytest.mark.parametrize("args, message", [
    (["table2", "--arch", "crnn"], "--arch is set by 'table2' itself"),
    (["table2", "--runs", "0"], "at least 1"),
    (["repeat", "--arch", "rnn"], "invalid choice"),
    (["repeat", "--data", "/no/such/records"], "no manifest.json"),
    (["compare", "/no/model/a", "/no/model/b"], "is neither a tagger export nor the name of one"),
    (["bogus"], "invalid choice"),
    (["zoo", "--archs", "cnn,vggish"], "unknown family vggish"),
    (["zoo", "--arch", "cnn"], "--arch is set by 'zoo' itself"),
])
def test_usage_errors(args, message):
    r = run_cli("tagger.experiments", *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_length_stride_that_does_not_fit_the_clips(tiny_records):
    r = run_cli("tagger.experiments", "table2", "--data", tiny_records, "--runs", "1", *TINY)
    assert r.returncode == 2 and "length 1024 / stride 1024 does not fit" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
