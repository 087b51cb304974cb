"""Shared fixtures: a tiny MTAT-layout release (from the demo generator) and its TFRecords."""
import os
import subprocess
import sys

import pytest

import tagger  # noqa: F401  (first, as in our commands: its TensorFlow settings apply to the whole suite)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_ANNOTATIONS = os.path.join(ROOT, "..", "shared", "mtat", "annotations_final.csv.gz")
# Where the test command downloads musicnn's wheel (or $TAGGER_MUSICNN_WHEEL).
MUSICNN_WHEEL = os.environ.get("TAGGER_MUSICNN_WHEEL") or os.path.join(ROOT, "wheels", "musicnn-0.1.0-py3-none-any.whl")
TINY_SECONDS = 4.0  # long enough for the CNN at 256/256 and the CRNN's poolings
TINY_SAMPLES = int(TINY_SECONDS * 16000)
TINY_PARTS = {**{p: 3 for p in "0123456789ab"}, "c": 16, **{p: 3 for p in "def"}}

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tagger import audio  # noqa: E402  (after tagger, as above)

# Tests that need tensorflow-io, and the decoders a test runs with: tensorflow-io is skipped, saying
# why, where it does not load (the current stack).
needs_tfio = pytest.mark.skipif(audio.tfio_problem() is not None,
                                reason=f"tensorflow-io does not load here ({audio.tfio_problem()})")
DECODERS = [pytest.param("tfio", marks=needs_tfio), "soundfile"]


def run_cli(module, *args, cwd=ROOT, timeout=600, env=None):
    """Run `python -m module args...` in a fresh process; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_same_weights(a, b):
    """Two Keras weights files hold the same model and optimizer variables, bit for bit."""
    import h5py
    import numpy as np

    def read(path):
        values = {}
        with h5py.File(path) as f:
            f.visititems(lambda name, item: values.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset)
                         else None)
        return values

    first, second = read(a), read(b)
    assert first.keys() == second.keys() and any(k.startswith("optimizer") for k in first)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory):
    from tagger import demo
    root = tmp_path_factory.mktemp("tiny_release")
    demo.write_demo(str(root), seed=3, workers=1, clips_per_part=TINY_PARTS, clip_samples=TINY_SAMPLES)
    return str(root)


@pytest.fixture(scope="session")
def tiny_records(tiny_release, tmp_path_factory):
    from tagger import prepare
    out = str(tmp_path_factory.mktemp("tiny_records") / "tiny")
    status = prepare.main(["--source", "mtat", "--mtat-dir", tiny_release, "--out", out,
                           "--clip-seconds", str(TINY_SECONDS), "--shard-mb", "0.5", "--workers", "2"])
    assert status == 0
    return out


@pytest.fixture(scope="session")
def long_records(tmp_path_factory):
    """TFRecords of 10.24 s clips (the demo's length, where every CNN length/stride fits): 24 train,
    4 valid, 9 test."""
    from tagger import demo, prepare
    root = tmp_path_factory.mktemp("long_release")
    demo.write_demo(str(root), seed=5, workers=1,
                    clips_per_part={**{p: 2 for p in "0123456789ab"}, "c": 4, **{p: 3 for p in "def"}})
    out = str(tmp_path_factory.mktemp("long_records") / "long")
    assert prepare.main(["--source", "mtat", "--mtat-dir", str(root), "--out", out, "--clip-seconds", "10.24",
                         "--workers", "2"]) == 0
    return out


@pytest.fixture(scope="session")
def crnn_run(tiny_records, tmp_path_factory):
    """A tiny CRNN trained for two epochs on the tiny records, exported: (tmp folder, CompletedProcess)."""
    tmp = tmp_path_factory.mktemp("crnn_run")
    r = run_cli("tagger.train", "--data", tiny_records, "--runs-dir", tmp / "runs", "--models-dir", tmp / "models",
                "--run-name", "crnn", "--width", "0.125", "--batch-size", "4", "--arch", "crnn", "--epochs", "2",
                "--lr", "1e-3")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, r


@pytest.fixture(scope="session")
def wheel():
    """musicnn's wheel, which the test command fetches (pip download --no-deps musicnn==0.1.0 -d wheels):
    the tests that need it fail, naming the command, when it is missing."""
    if not os.path.isfile(MUSICNN_WHEEL):
        pytest.fail(f"{MUSICNN_WHEEL} is missing: fetch it with pip download --no-deps musicnn==0.1.0 -d wheels "
                    "(scripts/test, the README's test command, does)")
    return MUSICNN_WHEEL


@pytest.fixture(scope="session")
def converted(wheel, tmp_path_factory):
    """The wheel's four models converted by tagger.convert into a models folder."""
    out = tmp_path_factory.mktemp("converted")
    r = run_cli("tagger.convert", "musicnn", wheel, "--models-dir", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out
