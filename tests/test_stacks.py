"""The two tested stacks (scripts/test runs the suite on each): an export written on one loads and
serves, with TensorFlow alone, on the other, both ways, with the same numbers."""
import json
import os
import subprocess
import sys
import wave

import numpy as np
import pytest

from conftest import ROOT

OTHER = os.environ.get("TAGGER_OTHER_PYTHON")
pytestmark = pytest.mark.skipif(not OTHER, reason="needs the other stack's Python in $TAGGER_OTHER_PYTHON "
                                "(scripts/test sets it when it runs both stacks)")

# TensorFlow alone: no tagger, no tensorflow-io.
TRACK = """
import json, sys
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
audio, rate = tf.audio.decode_wav(tf.io.read_file(sys.argv[2]))
out = model.signatures["tag_track"](waveform=tf.reduce_mean(audio, 1), hop_seconds=tf.constant(0.0))
print(json.dumps({"tensorflow": tf.__version__, "p": out["probabilities"].numpy().tolist(),
                  "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("tagger", "tensorflow_io"))}))
"""


def _tag(python, export, wav, tmp_path):
    script = tmp_path / "track.py"
    script.write_text(TRACK)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([python, str(script), str(export), str(wav)], cwd=str(tmp_path), capture_output=True,
                       text=True, env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["modules"] == []
    return out


def _wav(path, seconds=9.0):
    t = np.arange(int(seconds * 16000)) / 16000
    x = 0.3 * np.sin(2 * np.pi * 330 * t) * (1 + np.sin(2 * np.pi * 2 * t)) / 2
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(16000)
        f.writeframes((x * 32767).astype("<i2").tobytes())
    return path


def _same_numbers(export, tmp_path):
    wav = _wav(tmp_path / "track.wav")
    here, there = _tag(sys.executable, export, wav, tmp_path), _tag(OTHER, export, wav, tmp_path)
    assert here["tensorflow"] != there["tensorflow"], "the two stacks run the same TensorFlow"
    np.testing.assert_allclose(here["p"], there["p"], atol=1e-5)


def test_an_export_written_here_serves_on_the_other_stack(crnn_run, tmp_path):
    _same_numbers(crnn_run[0] / "models" / "crnn", tmp_path)


def test_an_export_written_on_the_other_stack_serves_here(tiny_records, tmp_path):
    r = subprocess.run([OTHER, "-m", "tagger.train", "--arch", "cnn", "--data", tiny_records, "--epochs", "1",
                        "--width", "0.125", "--batch-size", "4", "--runs-dir", str(tmp_path / "runs"),
                        "--models-dir", str(tmp_path / "models"), "--run-name", "other"],
                       env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True,
                       text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    export = tmp_path / "models" / "other"
    import tensorflow as tf
    assert json.loads((export / "config.json").read_text())["versions"]["tensorflow"] != tf.__version__
    _same_numbers(export, tmp_path)
