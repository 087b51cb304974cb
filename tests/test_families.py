"""The registry: every family through build, a training step, export and a TensorFlow-only reload; the
two short-chunk families' parameter counts and layout; the schedules and the coupled weight decay."""
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY_SAMPLES, assert_same_weights, run_cli
from tagger import config as configs
from tagger import data, export, models, schedules, train
from tagger.models.family import Chunks

SERVE = """
import json, sys, numpy as np, tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
clips, track, windows = np.load(sys.argv[2]), np.load(sys.argv[3]), np.load(sys.argv[5])
out = {"serve": m.signatures["serving_default"](waveform=tf.constant(clips))["probabilities"].numpy().tolist(),
       "embed": {k: v.numpy().tolist() for k, v in m.signatures["embed"](waveform=tf.constant(windows)).items()},
       "track": {k: v.numpy().tolist() for k, v in m.signatures["tag_track"](
           waveform=tf.constant(track), hop_seconds=tf.constant(0.0)).items()},
       "modules": sorted(k for k in sys.modules if k.split(".")[0] in ("tagger", "tensorflow_io"))}
json.dump(out, open(sys.argv[4], "w"))
"""


@pytest.mark.parametrize("name", models.names())
def test_every_family_trains_a_step_exports_and_serves_in_a_tensorflow_only_process(name, tiny_records, tmp_path):
    """What adding a family must give: its model builds for the data, one training step moves its
    weights, and its export serves clips (serving_default, the family's layout inside) and tracks of
    any length (tag_track, windows of the family's window) with TensorFlow alone, as Keras computes them,
    and tags a WAV file through tagger.predict with the same windows and probabilities."""
    family = models.get(name)
    manifest = data.load_manifest(tiny_records)
    cfg = configs.preset_config(family, tiny_records, width=0.125, batch_size=2, epochs=1, optimizer="adam", lr=1e-3,
                                schedule="constant")
    keras.utils.set_random_seed(0)
    model = train.compile_model(train.build_model(cfg, manifest), cfg)
    before = [w.copy() for w in model.get_weights()]
    ds = data.training_dataset(tiny_records, family.layout, 2, manifest, model.input_shape, seed=0)
    model.fit(ds, steps_per_epoch=1, epochs=1, verbose=0)
    assert max(np.abs(a - b).max() for a, b in zip(model.get_weights(), before)) > 1e-6
    windowing = family.layout.windowing(TINY_SAMPLES)
    window = windowing["samples"]
    info = {"clip_samples": TINY_SAMPLES, "window": windowing, "tags": manifest["tags"]}
    out = export.export(model, family.layout, str(tmp_path / name), manifest["tags"], TINY_SAMPLES,
                        {"config.json": info}, family.embedding)

    rng = np.random.default_rng(2)
    clips = rng.uniform(-0.5, 0.5, (2, TINY_SAMPLES)).astype(np.float32)
    pcm = rng.integers(-16000, 16000, 2 * window + window // 2).astype(np.int16)
    track = pcm.astype(np.float32) / 32768         # exactly what tagger.predict reads from the WAV file below
    starts = export.window_starts(len(track), window, windowing["hop"], windowing["lead"], windowing["end_aligned"])
    padded = np.pad(track, (windowing["lead"], export.padded_length(len(track), window, windowing["lead"])
                            - len(track) - windowing["lead"]))
    windows = np.stack([padded[s:s + window] for s in starts])
    np.save(tmp_path / "clips.npy", clips)
    np.save(tmp_path / "track.npy", track)
    np.save(tmp_path / "windows.npy", windows)
    (tmp_path / "serve.py").write_text(SERVE)
    r = subprocess.run([sys.executable, str(tmp_path / "serve.py"), out, str(tmp_path / "clips.npy"),
                        str(tmp_path / "track.npy"), str(tmp_path / "out.json"), str(tmp_path / "windows.npy")],
                       capture_output=True, text=True, cwd=str(tmp_path),
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["modules"] == []
    want = model(family.layout.model_input(tf.constant(clips), model.input_shape), training=False).numpy()
    np.testing.assert_allclose(got["serve"], want, atol=2e-5)
    per_window = model(family.layout.window_input(tf.constant(windows), model.input_shape), training=False).numpy()
    np.testing.assert_allclose(got["track"]["window_starts"], [s / 16000 for s in starts], atol=1e-5)
    np.testing.assert_allclose(got["track"]["window_probabilities"], per_window, atol=2e-5)
    np.testing.assert_allclose(got["track"]["probabilities"], per_window.mean(axis=0), atol=2e-5)
    from tagger.models.layers import embedding_model
    embedder = embedding_model(model, family.embedding, family.layout)
    features = embedder(family.layout.window_input(tf.constant(windows), model.input_shape), training=False).numpy()
    assert features.shape[0] == len(starts) and features.ndim == 2 and features.std() > 0
    np.testing.assert_allclose(got["embed"]["embedding"], features, atol=2e-5 * max(1.0, np.abs(features).max()))
    np.testing.assert_allclose(got["embed"]["probabilities"], per_window, atol=2e-5)

    import wave
    with wave.open(str(tmp_path / "track.wav"), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(16000)
        f.writeframes(pcm.tobytes())
    p = run_cli("tagger.predict", tmp_path / "track.wav", "--model", out, "--format", "json", "--timeline",
                "--top-k", "0", "--threshold", "0", "--embeddings", tmp_path / "emb")
    assert p.returncode == 0, p.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "emb" / "track.windows.npy"), features,
                               atol=3e-5 * max(1.0, np.abs(features).max()))
    np.testing.assert_allclose(np.load(tmp_path / "emb" / "track.mean.npy"), features.mean(axis=0),
                               atol=3e-5 * max(1.0, np.abs(features).max()))
    (tagged,) = json.loads(p.stdout)
    assert [w["start"] for w in tagged["windows"]] == pytest.approx([s / 16000 for s in starts])
    np.testing.assert_allclose([[w["tags"][t] for t in manifest["tags"]] for w in tagged["windows"]], per_window,
                               atol=3e-5)
    np.testing.assert_allclose([tagged["tags"][t] for t in manifest["tags"]], per_window.mean(axis=0), atol=3e-5)


def _trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_samplecnn_parameter_count_and_shapes():
    from tagger.models.samplecnn import build_samplecnn
    model = build_samplecnn(50)

    def block(cin, cout, taps):          # convolution weights and bias, batch-norm gamma and beta
        return taps * cin * cout + cout + 2 * cout
    count = (block(1, 128, 3) + 2 * block(128, 128, 3) + block(128, 256, 3) + 5 * block(256, 256, 3)
             + block(256, 512, 3) + block(512, 512, 1) + 512 * 50 + 50)
    assert count == 1869874 and _trainable(model) == count
    assert model.input_shape == (None, None, 59049) and model.output_shape == (None, 50)
    assert model.get_layer("relu1").output.shape[1:] == (19683, 128)          # 59,049 / 3
    assert model.get_layer("pool10").output.shape[1:] == (1, 512)             # 19,683 / 3^9


def test_shortres_parameter_count_and_shapes():
    from tagger.models.shortres import build_shortres
    model = build_shortres(50)

    def residual(cin, cout):             # two 3x3 convolutions and a 3x3 shortcut, each with a batch norm
        return (9 * cin * cout + cout) + (9 * cout * cout + cout) + (9 * cin * cout + cout) + 3 * 2 * cout
    widths = [1, 128, 128, 256, 256, 256, 256, 512]
    count = 2 + sum(residual(a, b) for a, b in zip(widths, widths[1:])) + (512 * 512 + 512) + 2 * 512 + 512 * 50 + 50
    assert count == 12104244 and _trainable(model) == count
    assert model.get_layer("log_mel").output.shape[1:] == (128, 231)           # 1 + 59,049 // 256 frames
    assert model.get_layer("res7_relu").output.shape[1:] == (1, 2, 512)        # 128 x 231 halved seven times
    assert model.get_layer("log_mel").fmax == 8000.0


def test_short_chunk_layout():
    """Training reads one chunk per clip at an offset drawn from (seed, epoch, clip id); evaluation reads
    16 evenly spaced chunks from the clip's start to its end, and the model averages their predictions."""
    layout = Chunks(59049, 16)
    starts = layout.starts(466000)
    assert len(starts) == 16 and starts[0] == 0 and starts[-1] == 466000 - 59049
    assert np.allclose(np.diff(starts), (466000 - 59049) / 15, atol=1)
    pcm = tf.range(64000)
    cuts = {(seed, clip): int(layout.training_piece(pcm, tf.constant(clip, tf.int64), seed)[0])
            for seed in range(40) for clip in (0, 1)}
    assert all(0 <= c <= 64000 - 59049 for c in cuts.values()) and len(set(cuts.values())) > 40
    assert cuts[(3, 1)] == int(layout.training_piece(pcm, tf.constant(1, tf.int64), 3)[0])     # stateless
    chunks = layout.model_input(tf.constant(np.arange(2 * 64000.0).reshape(2, 64000)), None)
    assert chunks.shape == (2, 16, 59049)
    np.testing.assert_array_equal(chunks[1, 5].numpy(), np.arange(64000, 128000)[layout.starts(64000)[5]:][:59049])
    from tagger.models.samplecnn import build_samplecnn
    model = build_samplecnn(3, filters=(4,) * 11)
    one_by_one = np.stack([model(chunks[:, i:i + 1], training=False).numpy() for i in range(16)], 1)
    np.testing.assert_allclose(model(chunks, training=False).numpy(), one_by_one.mean(axis=1), rtol=1e-5, atol=1e-6)
    with pytest.raises(models.DoesNotFit, match="shorter than a chunk"):
        models.get("samplecnn").build(50, 40000)


def test_chunks_drawn_in_training_change_every_epoch_and_replay(tiny_records):
    manifest = data.load_manifest(tiny_records)
    layout = models.get("shortres").layout

    def epochs(first, count):
        ds = data.training_dataset(tiny_records, layout, 36, manifest, (None, None, 59049), seed=1, first_epoch=first)
        return [x.numpy() for x, _ in ds.take(count)]

    e0, e1, e2 = epochs(0, 3)
    assert e0.shape == (36, 1, 59049) and not np.array_equal(e0, e1)
    np.testing.assert_array_equal(epochs(2, 1)[0], e2)          # a resumed run reads the same chunks


def test_schedule_phases():
    won = schedules.phases("won2020", "adam", 1e-4, 0.0, 200)
    assert [(p.start, p.end, p.optimizer, p.lr, p.reload_best) for p in won] == [
        (0, 80, "adam", 1e-4, False), (80, 100, "sgd", 1e-3, True), (100, 120, "sgd", 1e-4, True),
        (120, 200, "sgd", 1e-5, True)]
    assert all(p.nesterov and p.momentum == 0.9 for p in won[1:])
    assert won[2].same_optimizer(won[1]) and not won[1].same_optimizer(won[0])
    assert [(p.start, p.end) for p in schedules.phases("won2020", "adam", 1e-4, 0.0, 90)] == [(0, 80), (80, 90)]
    assert [(p.start, p.end) for p in schedules.phases("won2020:1,2,3", "adam", 1e-4, 0.0, 5)] == [
        (0, 1), (1, 2), (2, 3), (3, 5)]
    assert schedules.phases("constant", "sgd", 0.01, 0.9, 7) == [schedules.Phase(0, 7, "sgd", 0.01, 0.9)]


def test_won2020_schedule_reloads_the_best_epoch_and_resumes_exactly(tiny_records, tmp_path):
    """Switches at epochs 1, 2 and 3 of 4: each reloads the epoch with the lowest validation loss so far
    (named on stderr); a run stopped after epoch 2 and resumed ends with the uninterrupted run's weights."""
    args = ["--data", tiny_records, "--runs-dir", tmp_path / "runs", "--models-dir", tmp_path / "models",
            "--arch", "cnn", "--width", "0.125", "--batch-size", "4", "--epochs", "4", "--schedule", "won2020:1,2,3",
            "--weight-decay", "1e-4"]
    whole = run_cli("tagger.train", *args, "--run-name", "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    history = json.loads((tmp_path / "models" / "whole" / "metrics.json").read_text())["history"]
    for switch, lr in ((1, 0.001), (2, 0.0001), (3, 1e-05)):
        best = min(history[:switch], key=lambda h: h["val_loss"])["epoch"]
        assert (f"from epoch {switch + 1}, sgd (Nesterov), momentum 0.9 at learning rate {lr:g}; weights of "
                f"epoch {best} (lowest validation loss) reloaded") in whole.stderr
    config = json.loads((tmp_path / "models" / "whole" / "config.json").read_text())["config"]
    assert config["schedule"] == "won2020:1,2,3" and config["weight_decay"] == 1e-4
    assert run_cli("tagger.train", *args, "--run-name", "parts", "--stop-after", "2").returncode == 0
    parts = run_cli("tagger.train", *args, "--run-name", "parts")
    assert parts.returncode == 0 and "Resuming from epoch 2 of 4" in parts.stderr, parts.stderr[-3000:]
    assert_same_weights(*(tmp_path / "runs" / k / "checkpoint" / "epoch-0004.weights.h5" for k in ("whole", "parts")))


def _torch_rule(kind, w, grads, lr, decay, momentum=0.9, nesterov=True, betas=(0.9, 0.999)):
    """PyTorch's documented updates with `weight_decay` (torch.optim.Adam and SGD), in numpy: the decay
    is added to the gradient. Adam's epsilon is placed as Keras places it (outside the bias correction
    of v), so that only the decay rule is under test."""
    w, m, v, buf = w.astype(np.float64), 0.0, 0.0, None
    for t, g in enumerate(grads, 1):
        g = g + decay * w
        if kind == "adam":
            m = betas[0] * m + (1 - betas[0]) * g
            v = betas[1] * v + (1 - betas[1]) * g * g
            alpha = lr * np.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
            w = w - alpha * m / (np.sqrt(v) + 1e-7)
        else:
            buf = g if buf is None else momentum * buf + g
            w = w - lr * (g + momentum * buf if nesterov else buf)
    return w


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_weight_decay_is_coupled_as_pytorch_not_decoupled_as_keras(kind):
    """A linear model whose loss gradient is a fixed vector: our optimizer follows PyTorch's update with
    the decay in the gradient; Keras's own `weight_decay` (decoupled) lands elsewhere."""
    from tagger.optimizers import make_optimizer
    phase = schedules.Phase(0, 1, kind, 0.05, 0.9 if kind == "sgd" else 0.0, nesterov=kind == "sgd")
    start = np.array([1.0, -2.0, 0.5], np.float32)
    # d(loss)/dw for loss = direction . w, against the decay: Adam, which steps by the sign, turns round.
    direction = np.array([-0.03, 0.01, -0.02], np.float32)
    decay, steps = 0.1, 3

    def run(optimizer):
        w = keras.Variable(start.copy())
        for _ in range(steps):
            optimizer.apply([tf.constant(direction)], [w])
        return w.numpy()

    ours = run(make_optimizer(phase, weight_decay=decay))
    want = _torch_rule(kind, start, [direction] * steps, 0.05, decay)
    np.testing.assert_allclose(ours, want, rtol=1e-5)
    keras_cls = keras.optimizers.Adam if kind == "adam" else keras.optimizers.SGD
    kwargs = {} if kind == "adam" else {"momentum": 0.9, "nesterov": True}
    decoupled = run(keras_cls(0.05, weight_decay=decay, **kwargs))
    assert np.abs(decoupled - want).max() > 1e-3
    assert np.abs(run(make_optimizer(phase)) - ours).max() > 1e-3          # the decay does something
