"""Every path to TFRecords, runs, reports and exports goes through tf.io.gfile: the whole train ->
evaluate -> tables chain on TensorFlow's in-memory filesystem (ram://), as it would on gs://."""
import json
import os
import uuid

import numpy as np
import pytest
import tensorflow as tf


@pytest.fixture
def ram():
    return f"ram://{uuid.uuid4().hex}"


def _copy_records(local, remote):
    for name in os.listdir(local):
        if os.path.isfile(os.path.join(local, name)):
            tf.io.gfile.copy(os.path.join(local, name), f"{remote}/{name}", overwrite=True)


def test_train_evaluate_and_export_on_a_remote_filesystem(tiny_records, ram, capsys):
    from tagger import data, evaluate, models, train
    _copy_records(tiny_records, f"{ram}/records")
    layout = models.get("crnn").layout
    local = data.dataset(tiny_records, "valid", layout, 4)
    remote = data.dataset(f"{ram}/records", "valid", layout, 4)
    for (xa, ya), (xb, yb) in zip(local, remote):
        np.testing.assert_array_equal(xa.numpy(), xb.numpy())
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())

    config = train.config_from_args(["--arch", "cnn", "--data", f"{ram}/records", "--epochs", "1", "--width", "0.25",
                                     "--runs-dir", f"{ram}/runs", "--models-dir", f"{ram}/models", "--run-name", "r"])
    assert train.run(config) == 0
    for folder, names in ((f"{ram}/runs/r", ["config.json", "metrics.json", "per_tag.csv", "per_tag.png",
                                             "checkpoint/state.json"]),
                          (f"{ram}/models/r", ["saved_model.pb", "tags.json", "config.json", "metrics.json",
                                               "thresholds.json", "model.keras", "eval-test/predictions.npz"])):
        for name in names:
            assert tf.io.gfile.exists(f"{folder}/{name}"), f"{folder}/{name}"
    assert tf.io.gfile.glob(f"{ram}/runs/r/train/events.out.tfevents.*")
    export = tf.saved_model.load(f"{ram}/models/r")
    assert set(export.signatures) == {"serving_default", "tag_track", "tag_windows", "tag_names", "embed", "decide"}
    metrics = json.loads(tf.io.gfile.GFile(f"{ram}/models/r/metrics.json").read())

    assert evaluate.main(["--model", f"{ram}/models/r"]) == 0
    again = json.loads(tf.io.gfile.GFile(f"{ram}/models/r/eval-test/metrics.json").read())["test"]
    assert again["roc_auc"] == pytest.approx(metrics["test"]["roc_auc"], abs=1e-4)
    with tf.io.gfile.GFile(f"{ram}/models/r/eval-test/per_tag.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_tables_and_plans_on_a_remote_filesystem(ram):
    from tagger import experiments, files
    from tuning import search
    rows = [{"length": 256, "stride": 256, "runs": 1, "failed": 0, "roc_auc_mean": 0.8, "roc_auc_std": 0.0,
             "pr_auc_mean": 0.5, "pr_auc_std": 0.0, "run_names": "x"}]
    experiments.write_tables(f"{ram}/t2", "table2", rows, ["length", "stride"], "title")
    assert files.read_text(f"{ram}/t2/table2.csv").splitlines()[1].startswith("256,256,1,0,0.8000")
    cells = {(0.9, 0.01): {"val_auc": 0.7, "diverged": False, "curve": [0.6, 0.7], "trial": "0"}}
    search.write_table(f"{ram}/s", cells, {"momentum": (0.9,), "lr": (0.01,)},
                       search.search_config(search.parse_args(["--arch", "cnn"]))[0])
    assert files.read_text(f"{ram}/s/table.csv") == "momentum,0.01\n0.9,0.7000\n"
    assert "**0.7000**" in files.read_text(f"{ram}/s/table.md")
