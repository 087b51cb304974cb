"""KerasTuner searches on tiny data: Table I's shape and best cell, HParams logging, resuming after
SIGKILL, the CRNN's learning-rate curves, and KerasTuner's distributed mode on localhost."""
import csv
import dataclasses
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_cli
from tagger.cli import UsageError

TINY = ["--width", "0.25", "--batch-size", "4"]


def _search(*args, env=None):
    return run_cli("tuning.search", *args, env=env)


def _trials(out):
    """{trial_id: trial.json} as KerasTuner wrote them."""
    trials = {}
    for path in glob.glob(os.path.join(out, "tuner", "trial_*", "trial.json")):
        with open(path) as f:
            trial = json.load(f)
        trials[trial["trial_id"]] = trial
    return trials


def _score(trial):
    return trial["metrics"]["metrics"]["val_auc"]["observations"][0]["value"][0]


def _hparams_in_events(run_dir):
    """The hyperparameter values the HParams plugin recorded in a trial's TensorBoard folder."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import plugin_data_pb2
    values = {}
    for path in glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                    if data.HasField("session_start_info"):
                        values.update({k: p.number_value for k, p in data.session_start_info.hparams.items()})
    return values


def _read_table(out):
    with open(os.path.join(out, "table.csv")) as f:
        return list(csv.reader(f))


def test_cnn_grid_table_and_hparams(tiny_records, tmp_path):
    out = tmp_path / "search"
    r = _search("--arch", "cnn", "--data", tiny_records, "--epochs", "2", "--momentum", "0.9,0",
                "--lr", "0.01,0.05,0.1", "--out", out, *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    table = _read_table(out)
    assert table[0] == ["momentum", "0.01", "0.05", "0.1"] and [row[0] for row in table[1:]] == ["0.9", "0"]
    trials = _trials(out)
    assert len(trials) == 6 and all(t["status"] == "COMPLETED" for t in trials.values())
    cells = {(row[0], lr): float(row[i + 1].split()[0]) for row in table[1:] for i, lr in enumerate(table[0][1:])}
    for t in trials.values():
        hp = t["hyperparameters"]["values"]
        assert cells[(f"{hp['momentum']:g}", f"{hp['lr']:g}")] == pytest.approx(_score(t), abs=5e-5)
        assert _hparams_in_events(out / "tensorboard" / t["trial_id"]) == pytest.approx(hp)
    best = max(trials.values(), key=_score)
    bold = [line for line in (out / "table.md").read_text().splitlines() if "**" in line]
    assert len(bold) == 1 and bold[0].startswith(f"| {best['hyperparameters']['values']['momentum']:g} |")
    assert f"**{_score(best):.4f}**" in bold[0]
    assert f"trial {best['trial_id']}" in r.stdout and str(out / "table.md") in r.stdout


def test_an_interrupted_search_resumes_without_redoing_trials(tiny_records, tmp_path):
    out = tmp_path / "search"
    args = ["--arch", "cnn", "--data", tiny_records, "--epochs", "2", "--momentum", "0.9",
            "--lr", "0.001,0.002,0.005,0.01", "--out", str(out), *TINY]
    proc = subprocess.Popen([sys.executable, "-m", "tuning.search", *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while sum(t["status"] == "COMPLETED" for t in _trials(out).values()) < 2 and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {i: t for i, t in _trials(out).items() if t["status"] == "COMPLETED"}
    assert 2 <= len(finished) < 4, "the search finished before it could be interrupted"
    stamps = {i: os.path.getmtime(out / "tuner" / f"trial_{i}" / "trial.json") for i in finished}

    r = _search(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    trials = _trials(out)
    assert len(trials) == 4 and all(t["status"] == "COMPLETED" for t in trials.values())
    for i, t in finished.items():
        assert os.path.getmtime(out / "tuner" / f"trial_{i}" / "trial.json") == stamps[i]
        assert _score(trials[i]) == _score(t)
        assert len(glob.glob(str(out / "tensorboard" / i / "execution0" / "train" / "events.*"))) == 1
    assert r.stdout.count("Trial ") - r.stdout.count("Best") <= 2 * (4 - len(finished))
    assert all("not run" not in cell for row in _read_table(out) for cell in row)


def test_crnn_learning_rate_curves(tiny_records, tmp_path):
    out = tmp_path / "search"
    r = _search("--arch", "crnn", "--data", tiny_records, "--epochs", "2", "--lr", "1e-3,3e-3", "--out", out,
                "--width", "0.125", "--batch-size", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "val_auc_per_epoch.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["epoch", "lr=0.001", "lr=0.003"] and [row[0] for row in rows[1:]] == ["1", "2"]
    trials = {t["hyperparameters"]["values"]["lr"]: t for t in _trials(out).values()}
    for col, lr in ((1, 0.001), (2, 0.003)):
        curve = [float(row[col]) for row in rows[1:]]
        assert max(curve) == pytest.approx(_score(trials[lr]), abs=5e-5)
    assert (out / "val_auc_per_epoch.png").read_bytes()[:4] == b"\x89PNG"
    assert _read_table(out)[0] == ["optimizer", "0.001", "0.003"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_chief_and_two_workers_on_localhost(tiny_records, tmp_path):
    out = tmp_path / "search"
    args = ["--arch", "cnn", "--data", tiny_records, "--epochs", "1", "--momentum", "0.9,0", "--lr", "0.01,0.02",
            "--out", str(out), *TINY]
    base = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3", "KERASTUNER_ORACLE_IP": "127.0.0.1",
            "KERASTUNER_ORACLE_PORT": str(_free_port())}
    procs = {}
    for tuner_id in ("chief", "tuner0", "tuner1"):
        procs[tuner_id] = subprocess.Popen([sys.executable, "-m", "tuning.search", *args], cwd=ROOT,
                                           env={**base, "KERASTUNER_TUNER_ID": tuner_id}, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)
        if tuner_id == "chief":
            time.sleep(2)
    outputs = {k: p.communicate(timeout=400) for k, p in procs.items()}
    for k, p in procs.items():
        assert p.returncode == 0, (k, outputs[k][1][-3000:])
    ran = {k: (outputs[k][0] + outputs[k][1]).count(" - val_auc: ") for k in procs}   # one line per epoch
    assert ran["chief"] == 0 and ran["tuner0"] + ran["tuner1"] == 4
    assert "the chief writes the tables" in outputs["tuner0"][0]
    table = _read_table(out)
    assert len(table) == 3 and all(len(row) == 3 for row in table)
    assert all("not run" not in cell for row in table for cell in row)


@pytest.mark.parametrize("args, message", [
    (["--arch", "rnn"], "invalid choice"),
    (["--arch", "cnn", "--lr", "0.1,-2"], "learning rates must be"),
    (["--arch", "cnn", "--momentum", "1.5"], "momenta must be"),
    (["--arch", "crnn", "--momentum", "0.9"], "--momentum goes with a search over SGD; the crnn search tunes adam's"),
    (["--arch", "crnn", "--length", "512"], "--length is not a setting of crnn"),
    (["--arch", "cnn", "--length", "512"], "together"),
    (["--arch", "cnn", "--epochs", "0"], "at least 1"),
    (["--arch", "cnn", "--precision", "half"], "invalid choice"),
    (["--arch", "cnn", "--data", "/no/such/records"], "no manifest.json"),
])
def test_usage_errors(args, message):
    r = _search(*args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_precision_reaches_the_trials_and_names_the_folder():
    from tuning.search import default_out, parse_args, search_config
    config, _ = search_config(parse_args(["--arch", "crnn", "--precision", "mixed_bfloat16"]))
    assert config.precision == "mixed_bfloat16" and default_out(config).endswith("-bf16")
    config, _ = search_config(parse_args(["--arch", "crnn"]))
    assert config.precision == "float32" and not default_out(config).endswith("-bf16")


def test_a_length_stride_that_does_not_fit_the_clips(tiny_records):
    r = _search("--arch", "cnn", "--data", tiny_records, "--length", "4096", "--stride", "4096", *TINY)
    assert r.returncode == 2 and "does not fit" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_a_search_recorded_before_a_setting_existed_resumes(tmp_path):
    """search.json written before --precision existed lacks it: it was float32, so the same flags resume."""
    from tuning.search import check_search_folder, parse_args, search_config, search_settings
    config, grid = search_config(parse_args(["--arch", "crnn"]))
    settings = search_settings(config, grid)
    older = {**settings, "config": {k: v for k, v in settings["config"].items() if k != "precision"}}
    (tmp_path / "search.json").write_text(json.dumps(older))
    check_search_folder(str(tmp_path), config, grid)
    with pytest.raises(UsageError, match=r"other settings \(config differ\)"):
        check_search_folder(str(tmp_path), dataclasses.replace(config, precision="mixed_bfloat16"), grid)
    (tmp_path / "search.json").write_text(json.dumps(settings))     # the current record: resumes too
    check_search_folder(str(tmp_path), config, grid)


def test_another_search_in_the_same_folder_is_refused(tiny_records, tmp_path):
    out = tmp_path / "search"
    out.mkdir()
    (out / "search.json").write_text(json.dumps({"config": {}, "grid": {"lr": [1.0]}}))
    r = _search("--arch", "cnn", "--data", tiny_records, "--epochs", "1", "--lr", "0.01", "--momentum", "0",
                "--out", out, *TINY)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "holds a search with other settings (config, grid differ)" in r.stderr.strip().splitlines()[-1]
