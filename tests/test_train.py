"""Training end to end on tiny TFRecords: smoke runs, export round trip, evaluation, errors."""
import json
import os
import re
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from conftest import ROOT, TINY_SAMPLES, assert_same_weights, run_cli
from tagger import models
from tagger.evaluate import tag_metrics

TINY = ["--width", "0.125", "--batch-size", "4"]


def _train(tmp_path, data, *args, name):
    r = run_cli("tagger.train", "--data", data, "--runs-dir", tmp_path / "runs", "--models-dir",
                tmp_path / "models", "--run-name", name, *TINY, *args)
    return r


def test_crnn_smoke_run_writes_everything(crnn_run, tiny_records):
    tmp, r = crnn_run
    export = tmp / "models" / "crnn"
    for name in ("saved_model.pb", "tags.json", "config.json", "metrics.json", "model.keras"):
        assert (export / name).exists(), name
    metrics = json.loads((export / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["roc_auc"] <= 1.0 and metrics["epochs"] == 2
    assert len(metrics["history"]) == 2 and {"auc", "pr_auc", "val_auc", "loss"} <= set(metrics["history"][0])
    config = json.loads((export / "config.json").read_text())
    assert config["seed"] == 0 and config["data_split"] == "folder" and len(config["manifest_sha256"]) == 64
    import tensorflow as tf
    assert config["versions"]["tensorflow"] == tf.__version__
    manifest = json.load(open(os.path.join(tiny_records, "manifest.json")))
    assert config["decoder"] == manifest["decoder"] and manifest["decoder"]["name"] in ("tensorflow-io", "soundfile")
    tags = json.loads((export / "tags.json").read_text())
    assert tags == json.load(open(os.path.join(tiny_records, "tags.json")))
    run_dir = tmp / "runs" / "crnn"
    assert (run_dir / "per_tag.csv").exists() and (run_dir / "per_tag.png").read_bytes()[:4] == b"\x89PNG"
    assert list((run_dir / "train").glob("events.out.tfevents.*")) and list((run_dir / "validation").glob("events.*"))
    assert "Test ROC-AUC" in r.stdout and str(export) in r.stdout
    assert not list((tmp / "models").glob("*.tmp-*"))
    # says what it runs on, and what it does between the last epoch and the result
    assert re.search(r"^Devices: CPU only, \d+ cores", r.stderr, re.M), r.stderr[-2000:]
    settings = next(line for line in r.stderr.splitlines() if line.startswith("Settings: "))
    assert "optimizer=adam" in settings and " momentum=" not in settings     # SGD's setting, not Adam's
    assert "then evaluating on the test split (9 clips)..." in r.stderr and f"Exporting the SavedModel to {export}/" in r.stderr


def test_running_a_finished_run_again_changes_nothing(crnn_run, tiny_records):
    tmp, first = crnn_run
    export = tmp / "models" / "crnn"
    (export / "eval-test").mkdir(exist_ok=True)
    (export / "eval-test" / "kept.txt").write_text("an earlier evaluation")
    before = {p: p.stat().st_mtime_ns for p in [*export.rglob("*"), *(tmp / "runs").rglob("*")]}
    args = first.args[first.args.index("tagger.train") + 1:]
    r = run_cli("tagger.train", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("crnn is finished: test ROC-AUC ") and f"its export is {export}/" in r.stdout
    assert {p: p.stat().st_mtime_ns for p in [*export.rglob("*"), *(tmp / "runs").rglob("*")]} == before
    r = run_cli("tagger.train", *args[:-2], "--lr", "2e-3", "--stop-after", "1")   # other settings: refused
    assert r.returncode == 2 and "other settings (lr differ)" in r.stderr


TRACK = """
import sys, json, numpy as np, tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
out = {}
for name in sys.argv[2:]:
    track = np.load(name)
    r = m.signatures["tag_track"](waveform=tf.constant(track), hop_seconds=tf.constant(0.0))
    out[name] = {k: v.numpy().tolist() for k, v in r.items()}
json.dump(out, open("track.json", "w"))
"""


def test_tag_track_windows_a_track_of_any_length(crnn_run, tmp_path):
    from tagger.export import window_starts
    export = crnn_run[0] / "models" / "crnn"
    rng = np.random.default_rng(1)
    tracks = {"long.npy": rng.uniform(-0.5, 0.5, int(2.5 * TINY_SAMPLES)).astype(np.float32),
              "short.npy": rng.uniform(-0.5, 0.5, TINY_SAMPLES // 3).astype(np.float32)}
    for name, x in tracks.items():
        np.save(tmp_path / name, x)
    (tmp_path / "track.py").write_text(TRACK)
    r = subprocess.run([sys.executable, "track.py", str(export), *tracks], capture_output=True, text=True,
                       cwd=str(tmp_path), env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "track.json").read_text())
    import tensorflow as tf
    serve = tf.saved_model.load(str(export)).signatures["serving_default"]
    for name, x in tracks.items():
        starts = window_starts(len(x), TINY_SAMPLES, TINY_SAMPLES)
        np.testing.assert_allclose(got[name]["window_starts"], [s / 16000 for s in starts], atol=1e-5)
        padded = np.pad(x, (0, max(0, TINY_SAMPLES - len(x))))
        windows = np.stack([padded[s:s + TINY_SAMPLES] for s in starts])
        want = serve(waveform=tf.constant(windows))["probabilities"].numpy()
        np.testing.assert_allclose(got[name]["window_probabilities"], want, atol=1e-5)
        np.testing.assert_allclose(got[name]["probabilities"], want.mean(axis=0), atol=1e-5)
    assert window_starts(int(2.5 * TINY_SAMPLES), TINY_SAMPLES, TINY_SAMPLES) == [0, TINY_SAMPLES, int(1.5 * TINY_SAMPLES)]


FRESH = """
import sys, json, numpy as np, tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
x = np.load(sys.argv[2])
out = m.signatures["serving_default"](waveform=tf.constant(x))
np.save(sys.argv[3], out["probabilities"].numpy())
tags = [t.decode() for t in m.signatures["tag_names"]()["tags"].numpy()]
json.dump({"tags": tags, "modules": sorted(k for k in sys.modules if k.split(".")[0] in ("tagger", "tensorflow_io"))},
          open(sys.argv[4], "w"))
"""


def test_export_round_trip_in_a_fresh_tensorflow_only_process(crnn_run, tmp_path):
    from tagger.models import load_model
    export = crnn_run[0] / "models" / "crnn"
    x = np.random.default_rng(0).uniform(-1, 1, (3, TINY_SAMPLES)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    r = subprocess.run([sys.executable, str(script), str(export), str(tmp_path / "x.npy"), str(tmp_path / "y.npy"),
                        str(tmp_path / "info.json")], capture_output=True, text=True, cwd=str(tmp_path),
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["modules"] == []
    assert info["tags"] == json.loads((export / "tags.json").read_text())
    model = load_model(str(export / "model.keras"))
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), model(x, training=False).numpy(), atol=1e-5)


def test_evaluate_cli_matches_training_metrics(crnn_run, tiny_records, tmp_path):
    export = crnn_run[0] / "models" / "crnn"
    r = run_cli("tagger.evaluate", "--model", export, "--data", tiny_records, "--out", tmp_path / "eval")
    assert r.returncode == 0, r.stderr[-3000:]
    ours = json.loads((tmp_path / "eval" / "metrics.json").read_text())["test"]["roc_auc"]
    trained = json.loads((export / "metrics.json").read_text())["test"]["roc_auc"]
    assert abs(ours - trained) < 1e-4


def test_resume_after_sigkill(tiny_records, tmp_path):
    args = ["tagger.train", "--data", tiny_records, "--runs-dir", tmp_path / "runs", "--models-dir",
            tmp_path / "models", "--run-name", "killed", "--arch", "cnn", "--epochs", "6", *TINY]
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, "-m", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "runs" / "killed" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["epoch"] >= 2:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "models" / "killed").exists()
    done = json.loads(state.read_text())["epoch"]
    assert 2 <= done < 6
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Resuming from epoch {done} of 6" in r.stderr
    metrics = json.loads((tmp_path / "models" / "killed" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("args", [["--arch", "cnn"], ["--arch", "crnn", "--lr", "1e-3"],
                                  ["--arch", "cnn", "--strategy", "mirrored", "--devices", "2", "--batch-size", "2"]],
                         ids=["cnn", "crnn", "mirrored"])
def test_a_run_stopped_and_resumed_ends_as_an_uninterrupted_one(tiny_records, tmp_path, args):
    """Each epoch's order is a function of (seed, epoch): a run stopped after epoch 2 and resumed reads the
    batches an uninterrupted run reads, and ends with the same weights and optimizer state."""
    r = _train(tmp_path, tiny_records, *args, "--epochs", "3", name="whole")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _train(tmp_path, tiny_records, *args, "--epochs", "3", "--stop-after", "2", name="parts")
    assert r.returncode == 0 and "Stopped after epoch 2 of 3" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "models" / "parts").exists()
    r = _train(tmp_path, tiny_records, *args, "--epochs", "3", name="parts")
    assert r.returncode == 0 and "Resuming from epoch 2 of 3" in r.stderr, r.stderr[-3000:]
    assert_same_weights(*(tmp_path / "runs" / name / "checkpoint" / "epoch-0003.weights.h5" for name in ("whole", "parts")))
    metrics = [json.loads((tmp_path / "models" / name / "metrics.json").read_text()) for name in ("whole", "parts")]
    assert metrics[0]["test"]["roc_auc"] == metrics[1]["test"]["roc_auc"]
    assert [h["loss"] for h in metrics[0]["history"]] == [h["loss"] for h in metrics[1]["history"]]


def test_same_seed_same_result(tiny_records, tmp_path):
    aucs = []
    for name in ("a", "b"):
        r = _train(tmp_path, tiny_records, "--arch", "cnn", "--epochs", "2", "--seed", "7", name=name)
        assert r.returncode == 0, r.stderr[-3000:]
        aucs.append(json.loads((tmp_path / "models" / name / "metrics.json").read_text())["test"]["roc_auc"])
    assert round(aucs[0], 3) == round(aucs[1], 3)


def test_nan_loss_stops_with_status_1(tiny_records, tmp_path):
    r = _train(tmp_path, tiny_records, "--arch", "cnn", "--epochs", "3", "--optimizer", "sgd", "--lr", "1e12",
               "--momentum", "0.99", name="nan")
    assert r.returncode == 1, r.stderr[-3000:]
    line = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(line) == 1 and "NaN" in line[0] and "--lr" in line[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "models" / "nan").exists()


@pytest.mark.parametrize("args, message", [
    (["--arch", "rnn"], "invalid choice"),
    (["--data", "/no/such/folder"], "no manifest.json"),
    (["--epochs", "0"], "must be at least 1"),
    (["--momentum", "1.5"], "momentum"),
    (["--arch", "cnn", "--length", "512"], "together"),
    (["--length", "512", "--stride", "512"], "--length is not a setting of crnn (crnn's own: --gru-units, "
                                             "--bn-momentum)"),
    (["--arch", "cnn", "--gru-units", "8"], "--gru-units is not a setting of cnn"),
    (["--arch", "cnn", "--length", "0", "--stride", "1"], "--length 0 must be at least 1"),
    (["--bn-momentum", "1"], "--bn-momentum 1.0 must be in [0, 1)"),
    (["--schedule", "cosine"], "unknown schedule (known: constant, won2020"),
    (["--schedule", "won2020:3,2,1"], "three increasing epochs"),
    (["--weight-decay", "-1"], "--weight-decay -1.0 must be 0 or more"),
    (["--precision", "float64"], "invalid choice"),
    (["--arch", "samplecnn", "--length", "256", "--stride", "256"], "--length is not a setting of samplecnn "
                                                                    "(samplecnn's own: none)"),
    (["--arch", "shortres", "--schedule", "won2021"], "--schedule won2021: unknown schedule"),
    (["--arch", "resnet"], "invalid choice: 'resnet' (choose from %s)" % ", ".join(map(repr, models.names()))),
])
def test_train_usage_errors_are_one_line_exit_2(args, message):
    r = run_cli("tagger.train", *args)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def test_commands_check_arguments_before_importing_tensorflow():
    """Flags, the registry's families and their presets are read without TensorFlow."""
    code = ("import sys\nfrom tagger import train, prepare, evaluate, predict, experiments, bench, models\n"
            "from tuning import search\n"
            "train.config_from_args(['--arch', 'cnn'])\nprepare.parse_args(['--source', 'demo', '--out', 'x'])\n"
            "predict.parse_args(['a.wav'])\nevaluate.parse_args(['--model', 'm'])\n"
            "experiments.parse_args(['zoo', '--runs', '1'])\nbench.parse_args(['--quick'])\n"
            "search.search_config(search.parse_args(['--arch', 'shortres']))\n"
            "print(train.config_from_args(['--arch', 'samplecnn']).run_name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    name, modules = r.stdout.strip().splitlines()
    assert modules == "[]" and name.startswith("samplecnn-w0.25-demo-adam-lr0.001-b16-e40")


def test_length_stride_that_does_not_fit_the_clip(tiny_records, tmp_path):
    r = _train(tmp_path, tiny_records, "--arch", "cnn", "--length", "4096", "--stride", "4096", name="x")
    assert r.returncode == 2
    assert "does not fit" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_refuses_a_model_and_data_that_disagree(crnn_run, tmp_path):
    from tagger import prepare
    audio = tmp_path / "audio"
    audio.mkdir()
    import wave
    for i in range(3):
        with wave.open(str(audio / f"{i}.wav"), "wb") as f:
            f.setnchannels(1), f.setsampwidth(2), f.setframerate(16000)
            f.writeframes(np.zeros(TINY_SAMPLES, "<i2").tobytes())
    (tmp_path / "x.csv").write_text("path,tags,split\n0.wav,jazz,train\n1.wav,jazz,valid\n2.wav,blues,test\n")
    assert prepare.main(["--source", "csv", "--csv", str(tmp_path / "x.csv"), "--audio-root", str(audio),
                         "--out", str(tmp_path / "other"), "--clip-seconds", "4", "--workers", "1"]) == 0
    r = run_cli("tagger.evaluate", "--model", crnn_run[0] / "models" / "crnn", "--data", tmp_path / "other")
    assert r.returncode == 2 and "disagree on tags" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("tagger.evaluate", "--model", tmp_path / "nothing")
    assert r.returncode == 2 and "neither a tagger export nor the name of one" in r.stderr


def test_single_class_tag_is_undefined_not_a_crash():
    from sklearn.metrics import average_precision_score, roc_auc_score
    rng = np.random.default_rng(0)
    y = (rng.uniform(size=(40, 3)) < 0.5).astype(int)
    y[:, 1] = 0                                   # no positives for the second tag
    p = rng.uniform(size=(40, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = tag_metrics(y, p, ["a", "b", "c"])
    assert any("only one class" in str(w.message) for w in caught)
    assert m["per_tag"]["b"]["roc_auc"] is None and m["undefined"] == ["b"]
    keep = [0, 2]
    assert m["roc_auc"] == pytest.approx(np.mean([roc_auc_score(y[:, i], p[:, i]) for i in keep]))
    assert m["pr_auc"] == pytest.approx(np.mean([average_precision_score(y[:, i], p[:, i]) for i in keep]))
    assert json.loads(json.dumps(m))["per_tag"]["b"]["pr_auc"] is None


def test_restore_best_exports_the_best_validation_epoch(tiny_records, tmp_path):
    r = _train(tmp_path, tiny_records, "--arch", "cnn", "--epochs", "4", "--restore-best", name="best")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "models" / "best" / "metrics.json").read_text())
    history = metrics["history"]
    best = max(history, key=lambda h: h["val_auc"])["epoch"]
    assert metrics["restore_best"] is True and metrics["exported_epoch"] == best
    assert json.loads((tmp_path / "models" / "best" / "config.json").read_text())["config"]["restore_best"] is True


MIRRORED_STEP = """
import sys, numpy as np, tensorflow as tf, keras
from tagger import config as configs, data, models, train
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
manifest = data.load_manifest(sys.argv[1])
family = models.get("cnn")
config = configs.preset_config(family, sys.argv[1], epochs=1, batch_size=4, optimizer="sgd", lr=0.05, momentum=0.9,
                               width=0.25, precision=sys.argv[2], weight_decay=float(sys.argv[3]))
keras.utils.set_random_seed(0)
one = train.compile_model(train.build_model(config, manifest), config)
x, y = next(iter(data.dataset(sys.argv[1], "train", family.layout, 12, manifest, input_shape=one.input_shape)))
batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
keras.utils.set_random_seed(0)
with strategy.scope():
    two = train.compile_model(train.build_model(config, manifest), config, replicas=2)
start = [w.copy() for w in one.get_weights()]
one.fit(batches, verbose=0)
two.fit(batches, verbose=0)
moved = max(np.abs(a - b).max() for a, b in zip(one.get_weights(), start))
diff = max(np.abs(a - b).max() for a, b in zip(one.get_weights(), two.get_weights()))
print(moved, diff)
"""


@pytest.mark.parametrize("precision, tolerance, weight_decay", [("float32", 1e-4, 0.0), ("mixed_float16", 1e-2, 0.0),
                                                               ("float32", 1e-4, 0.2)])
def test_mirrored_training_updates_like_one_device(tiny_records, tmp_path, precision, tolerance, weight_decay):
    """3 SGD steps, 2 replicas x 2 clips vs 4 clips on one device; float16 with its loss scaling too (its
    rounding differs between the two, an update off by the number of replicas would not); coupled weight
    decay too (each replica adds its share of it). Relative to how far the weights moved."""
    (tmp_path / "step.py").write_text(MIRRORED_STEP)
    r = subprocess.run([sys.executable, str(tmp_path / "step.py"), tiny_records, precision, str(weight_decay)],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    moved, diff = map(float, r.stdout.split())
    assert moved > 1e-3 and diff < tolerance * moved, (moved, diff)


def test_mirrored_strategy_on_two_cpu_devices_trains_and_exports(tiny_records, tmp_path):
    r = _train(tmp_path, tiny_records, "--arch", "crnn", "--lr", "1e-3", "--epochs", "1", "--batch-size", "2",
               "--strategy", "mirrored", "--devices", "2", name="mirrored")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Training on 2 replicas" in r.stderr and "global batch 4" in r.stderr
    config = json.loads((tmp_path / "models" / "mirrored" / "config.json").read_text())
    assert config["replicas"] == 2 and config["global_batch_size"] == 4 and config["learning_rate"] == 1e-3
    metrics = json.loads((tmp_path / "models" / "mirrored" / "metrics.json").read_text())
    e = run_cli("tagger.evaluate", "--model", tmp_path / "models" / "mirrored", "--out", tmp_path / "eval")
    assert e.returncode == 0, e.stderr[-3000:]
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())["test"]
    assert again["roc_auc"] == pytest.approx(metrics["test"]["roc_auc"], abs=1e-4)


def test_mixed_precision_run_exports_a_float32_savedmodel(tiny_records, tmp_path):
    """--precision mixed_bfloat16 end to end: recorded in config.json, told when this CPU has no bf16
    units; the export is a float32 copy of the trained weights (served in a fresh TensorFlow-only
    process as Keras computes it), and metrics.json describes that copy (tagger.evaluate agrees)."""
    import keras

    from tagger.kernels import emulated_precision
    r = _train(tmp_path, tiny_records, "--arch", "crnn", "--epochs", "1", "--lr", "1e-3",
               "--precision", "mixed_bfloat16", name="bf16")
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("no units for --precision mixed_bfloat16" in r.stderr) == emulated_precision("mixed_bfloat16")
    export = tmp_path / "models" / "bf16"
    assert json.loads((export / "config.json").read_text())["config"]["precision"] == "mixed_bfloat16"
    x = np.random.default_rng(1).uniform(-1, 1, (3, TINY_SAMPLES)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "fresh.py").write_text(FRESH)
    f = subprocess.run([sys.executable, str(tmp_path / "fresh.py"), str(export), str(tmp_path / "x.npy"),
                        str(tmp_path / "y.npy"), str(tmp_path / "info.json")], capture_output=True, text=True,
                       cwd=str(tmp_path), env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert f.returncode == 0, f.stderr[-3000:]
    served = np.load(tmp_path / "y.npy")
    assert served.dtype == np.float32 and json.loads((tmp_path / "info.json").read_text())["modules"] == []
    model = keras.saving.load_model(str(export / "model.keras"))
    assert {layer.compute_dtype for layer in model.layers} == {"float32"}
    np.testing.assert_allclose(served, model(x, training=False).numpy(), atol=1e-5)
    e = run_cli("tagger.evaluate", "--model", export, "--out", tmp_path / "eval")
    assert e.returncode == 0, e.stderr[-3000:]
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())["test"]
    assert again["roc_auc"] == pytest.approx(json.loads((export / "metrics.json").read_text())["test"]["roc_auc"],
                                             abs=1e-6)


def test_float16_training_scales_its_loss_also_across_replicas():
    """mixed_float16 needs loss scaling (float16 gradients underflow); under MirroredStrategy the scaled
    loss is also divided by the replicas (_replica_mean), where Keras does not divide it itself."""
    import keras

    from tagger import train
    from tagger.models.cnn import build_cnn
    from tagger.optimizers import keras_divides_by_replicas
    divisor = 1 if keras_divides_by_replicas() else 2
    config = train.config_from_args(["--arch", "cnn", "--precision", "mixed_float16", "--data", "x"])
    assert config.run_name.endswith("-fp16")
    one = train.compile_model(build_cnn(5, 6400, filters=4, precision=config.precision), config).optimizer
    two = train.compile_model(build_cnn(5, 6400, filters=4, precision=config.precision), config, replicas=2).optimizer
    assert isinstance(one, keras.optimizers.LossScaleOptimizer) and isinstance(two, keras.optimizers.LossScaleOptimizer)
    assert float(one.scale_loss(1.0)) > 1 and float(two.scale_loss(1.0)) == float(one.scale_loss(1.0)) / divisor
    plain = train.config_from_args(["--arch", "cnn", "--data", "x"])
    assert not isinstance(train.compile_model(build_cnn(5, 6400, filters=4), plain).optimizer,
                          keras.optimizers.LossScaleOptimizer)


def test_a_run_folder_resumes_only_with_its_own_settings(tmp_path):
    """A config.json written before --precision existed resumes (it was float32); another --lr or
    --precision is refused with the fields that differ; the output folders do not count."""
    import dataclasses

    from tagger import train
    from tagger.cli import UsageError
    config = train.config_from_args(["--arch", "crnn", "--data", "x"])
    older = {k: v for k, v in config.settings().items() if k != "precision"}
    (tmp_path / "config.json").write_text(json.dumps({"config": older}))
    train.check_run_folder(str(tmp_path), dataclasses.replace(config, runs_dir="elsewhere"))
    for changed, field in ((dict(lr=0.5), "lr"), (dict(precision="mixed_bfloat16"), "precision")):
        with pytest.raises(UsageError, match=f"other settings \\({field} differ\\)"):
            train.check_run_folder(str(tmp_path), dataclasses.replace(config, **changed))
    train.check_run_folder(str(tmp_path / "new"), config)      # no config.json yet: a new run


def test_devices_without_mirrored_is_a_usage_error():
    r = run_cli("tagger.train", "--devices", "2")
    assert r.returncode == 2 and "--strategy mirrored" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "neither a tagger export"),
    (["--model", "m", "--batch-size", "0"], "at least 1"),
    (["--model", "m", "--split", "holdout"], "invalid choice"),
    (["--model", "m", "--unknown-flag"], "unrecognized arguments"),
])
def test_evaluate_usage_errors_are_one_line_exit_2(args, message):
    r = run_cli("tagger.evaluate", *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_evaluate_on_a_data_folder_without_manifest(crnn_run, tmp_path):
    r = run_cli("tagger.evaluate", "--model", crnn_run[0] / "models" / "crnn", "--data", tmp_path)
    assert r.returncode == 2 and "no manifest.json" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
