"""Tagging audio files with an export: formats, lengths, rates, bad files, and tag_track's numbers."""
import json
import os
import shutil
import subprocess
import sys
import wave

import numpy as np
import pytest

from conftest import DECODERS, ROOT, TINY_SAMPLES, needs_tfio, run_cli
from tagger.export import window_starts

FIXTURE_MP3 = os.path.join(ROOT, "tests", "fixtures", "tone.mp3")


def _wav(path, seconds, rate=16000, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(n)
    pcm = np.round(np.clip(x, -1, 1) * 32767).astype("<i2")
    if channels == 2:
        pcm = np.stack([pcm, pcm[::-1]], 1)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())


@pytest.fixture(scope="module")
def music(tmp_path_factory):
    root = tmp_path_factory.mktemp("music")
    (root / "album").mkdir()
    _wav(root / "plain.wav", 6.0)
    shutil.copy(FIXTURE_MP3, root / "album" / "tone.mp3")
    _wav(root / "album" / "stereo44k.wav", 5.0, rate=44100, channels=2)
    _wav(root / "short.wav", 2.0)
    _wav(root / "album" / "three-minutes.wav", 180.0, seed=3)
    return root


def _predict(model, *args):
    return run_cli("tagger.predict", *args, "--model", model)


def test_json_for_every_kind_of_file(crnn_run, music):
    model = crnn_run[0] / "models" / "crnn"
    tags = json.loads((model / "tags.json").read_text())
    r = _predict(model, music, "--format", "json", "--timeline", "--top-k", "0", "--threshold", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    doc = {os.path.relpath(d["path"], music): d for d in json.loads(r.stdout)}
    assert set(doc) == {"plain.wav", "album/tone.mp3", "album/stereo44k.wav", "short.wav", "album/three-minutes.wav"}
    assert doc["short.wav"]["duration"] == pytest.approx(2.0) and len(doc["short.wav"]["windows"]) == 1
    assert doc["album/stereo44k.wav"]["duration"] == pytest.approx(5.0, abs=1e-3)
    long = doc["album/three-minutes.wav"]
    assert long["duration"] == pytest.approx(180.0)
    starts = window_starts(180 * 16000, TINY_SAMPLES, TINY_SAMPLES)
    assert [w["start"] for w in long["windows"]] == pytest.approx([s / 16000 for s in starts])
    for d in doc.values():
        probs = list(d["tags"].values())
        assert sorted(d["tags"]) == sorted(tags) and all(0 <= p <= 1 for p in probs)
        assert probs == sorted(probs, reverse=True)                      # most probable first
        mean = np.mean([[w["tags"][t] for t in tags] for w in d["windows"]], axis=0)
        np.testing.assert_allclose([d["tags"][t] for t in tags], mean, atol=1e-5)


def test_table_csv_threshold_and_hop(crnn_run, music):
    model = crnn_run[0] / "models" / "crnn"
    r = _predict(model, music / "plain.wav", "--top-k", "2", "--threshold", "0")
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and "(6.0 s)" in r.stdout
    assert len(r.stdout.split("s)")[1].split(",")) == 2
    r = _predict(model, music / "plain.wav", "--threshold", "1.0")
    assert "(no tag decided)" in r.stdout
    r = _predict(model, music / "album" / "three-minutes.wav", "--format", "csv", "--timeline", "--hop", "30",
                 "--threshold", "0")
    rows = r.stdout.strip().splitlines()
    windows = len(window_starts(180 * 16000, TINY_SAMPLES, 30 * 16000))
    assert rows[0] == "path,start,rank,tag,probability" and len(rows) - 1 == 5 * windows   # --top-k 5


def test_top_k_and_threshold_filter_every_format(crnn_run, music):
    """The table, JSON and CSV keep the same tags: those at or above --threshold (which overrides the
    export's own), at most --top-k of them, most probable first; CSV numbers in one format. (The
    stored per-tag thresholds: test_decisions.)"""
    import csv
    import io
    model = crnn_run[0] / "models" / "crnn"
    track = music / "plain.wav"
    full = json.loads(_predict(model, track, "--format", "json", "--top-k", "0", "--threshold", "0").stdout)[0]["tags"]
    ranked = list(full.items())
    assert [p for _, p in ranked] == sorted(full.values(), reverse=True)
    threshold = (ranked[1][1] + ranked[2][1]) / 2          # between the second and the third tag
    for k, thr, expected in (("3", 0, ranked[:3]), ("0", threshold, ranked[:2]), ("1", threshold, ranked[:1])):
        extra = ["--top-k", k, "--threshold", str(thr)]
        doc = json.loads(_predict(model, track, "--format", "json", "--timeline", *extra).stdout)[0]
        assert list(doc["tags"].items()) == expected
        assert all(len(w["tags"]) <= len(expected) and list(w["tags"].values()) == sorted(w["tags"].values(),
                   reverse=True) for w in doc["windows"])
        rows = list(csv.DictReader(io.StringIO(_predict(model, track, "--format", "csv", *extra).stdout)))
        assert [(r["tag"], float(r["probability"])) for r in rows] == [(t, pytest.approx(p, abs=1e-6))
                                                                       for t, p in expected]
        assert [r["rank"] for r in rows] == [str(i) for i in range(1, len(expected) + 1)]
        assert all(len(r["duration"].split(".")[1]) == 6 and len(r["probability"].split(".")[1]) == 6 for r in rows)
        table = _predict(model, track, *extra).stdout
        assert [part.rsplit(" ", 1)[0] for part in table.split("s)  ")[1].strip().split(", ")] == [t for t, _ in expected]


@needs_tfio
def test_both_decoders_tag_alike(crnn_run, music):
    """Every kind of file (mp3, 44.1 kHz stereo, 16 kHz, 3 minutes) tags the same with either decoder."""
    model = crnn_run[0] / "models" / "crnn"
    tagged = {}
    for decoder in ("tfio", "soundfile"):
        r = _predict(model, music, "--format", "json", "--top-k", "0", "--threshold", "0", "--decoder", decoder)
        assert r.returncode == 0, r.stderr[-2000:]
        tagged[decoder] = {d["path"]: d for d in json.loads(r.stdout)}
    assert tagged["tfio"].keys() == tagged["soundfile"].keys() and len(tagged["tfio"]) == 5
    for path, a in tagged["tfio"].items():
        b = tagged["soundfile"][path]
        assert a["duration"] == b["duration"] and a["tags"].keys() == b["tags"].keys()
        # the same samples give the same tags; mp3's decoders differ by up to half a 16-bit step
        np.testing.assert_allclose([a["tags"][t] for t in a["tags"]], [b["tags"][t] for t in a["tags"]],
                                   atol=1e-4 if path.endswith(".mp3") else 1e-6, err_msg=path)


def test_a_reader_that_stops_early_gets_no_traceback(crnn_run, music):
    """`predict ... | head -1`: the pipe closes while predict still writes (half a megabyte of CSV here,
    beyond any pipe buffer); predict ends quietly."""
    model = crnn_run[0] / "models" / "crnn"
    p = subprocess.Popen([sys.executable, "-m", "tagger.predict", str(music / "album" / "three-minutes.wav"),
                          "--model", str(model), "--format", "csv", "--timeline", "--hop", "0.25", "--top-k", "0",
                          "--threshold", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert p.stdout.readline().decode() == "path,start,rank,tag,probability\n"
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141 and "Traceback" not in err and "Error" not in err, err[-2000:]


def test_a_corrupt_file_among_good_ones(crnn_run, music, tmp_path):
    model = crnn_run[0] / "models" / "crnn"
    (tmp_path / "broken.mp3").write_bytes(b"\x00garbage" * 300)
    (tmp_path / "empty.wav").write_bytes(b"")
    r = _predict(model, music / "plain.wav", tmp_path / "broken.mp3", tmp_path / "empty.wav", music / "short.wav",
                 "--format", "json")
    assert r.returncode == 1
    assert [os.path.basename(d["path"]) for d in json.loads(r.stdout)] == ["plain.wav", "short.wav"]
    lines = r.stderr.strip().splitlines()
    assert any(ln.startswith(str(tmp_path / "broken.mp3")) for ln in lines)
    assert any(ln.startswith(str(tmp_path / "empty.wav")) and "empty" in ln for ln in lines)
    assert lines[-1] == "2 of the 4 files could not be tagged" and "Traceback" not in r.stderr
    r = _predict(model, tmp_path / "broken.mp3")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == "The file could not be tagged"


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/model", "x.wav"], "is neither a tagger export nor the name of one in"),
    (["/no/such/file.wav"], "does not exist"),
    (["--top-k", "-1", "x.wav"], "-1 must be 0 or more"),
    (["--format", "xml", "x.wav"], "invalid choice"),
    (["--plot", __file__, "x.wav"], "is a file: name a folder"),
    (["--decoder", "ffmpeg", "x.wav"], "invalid choice"),
])
def test_usage_errors(args, message, crnn_run, tmp_path):
    model_args = [] if "--model" in args else ["--model", str(crnn_run[0] / "models" / "crnn")]
    r = run_cli("tagger.predict", *args, *model_args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_an_unknown_decoder_in_the_environment_is_a_usage_error():
    for module, args in (("tagger.predict", ["x.wav"]), ("tagger.prepare", ["--source", "demo", "--out", "x"])):
        r = run_cli(module, *args, env={"TAGGER_DECODER": "ffmpeg"})
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "TAGGER_DECODER=ffmpeg: choose one of auto, tfio, soundfile" in r.stderr


def test_folder_without_audio_and_no_model(crnn_run, tmp_path):
    (tmp_path / "notes.txt").write_text("no audio here")
    r = run_cli("tagger.predict", tmp_path, "--model", crnn_run[0] / "models" / "crnn")
    assert r.returncode == 2 and "no audio files" in r.stderr, r.stderr
    r = run_cli("tagger.predict", tmp_path, cwd=str(tmp_path))     # no saved_models/ here
    assert r.returncode == 2 and "no exported model" in r.stderr, r.stderr


TRACK = """
import sys, json, tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
audio, rate = tf.audio.decode_wav(tf.io.read_file(sys.argv[2]))
out = m.signatures["tag_track"](waveform=tf.reduce_mean(audio, 1), hop_seconds=tf.constant(0.0))
json.dump({"rate": int(rate), "p": out["probabilities"].numpy().tolist(),
           "modules": sorted(k for k in sys.modules if k.split(".")[0] in ("tagger", "tensorflow_io"))},
          open("out.json", "w"))
"""


def test_tag_track_in_a_tensorflow_only_process_gives_the_cli_numbers(crnn_run, music, tmp_path):
    model = crnn_run[0] / "models" / "crnn"
    (tmp_path / "track.py").write_text(TRACK)
    track = music / "album" / "three-minutes.wav"
    r = subprocess.run([sys.executable, "track.py", str(model), str(track)], cwd=str(tmp_path), capture_output=True,
                       text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["rate"] == 16000 and out["modules"] == []
    cli = json.loads(_predict(model, track, "--format", "json", "--top-k", "0", "--threshold", "0").stdout)[0]["tags"]
    tags = json.loads((model / "tags.json").read_text())
    np.testing.assert_allclose([cli[t] for t in tags], out["p"], atol=1e-5)


def test_saved_model_cli_lists_the_signatures(crnn_run):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    r = subprocess.run([cli, "show", "--dir", str(crnn_run[0] / "models" / "crnn"), "--all"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("serving_default", "tag_track", "tag_windows", "embed", "tag_names", "decide"):
        assert f"signature_def['{name}']" in r.stdout


def test_decoding_ahead_keeps_order_and_hands_over_its_errors():
    """The decoder thread's items arrive in order, at most `size` ahead, and its exception is raised in
    the consumer after the items before it."""
    from tagger.predict import ahead
    produced = []

    def items():
        for i in range(5):
            produced.append(i)
            yield i
        raise RuntimeError("decoder crashed")
    got = []
    with pytest.raises(RuntimeError, match="decoder crashed"):
        for item in ahead(items(), 2):
            got.append(item)
            assert len(produced) - len(got) <= 3        # 2 queued, 1 waiting to be
    assert got == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_file_that_fails_midway_loses_its_windows_and_no_other(tmp_path, decoder):
    """A WAV whose data stops at half of what its header says fails after some of its windows were
    decoded and batched with other files' (the decoder runs ahead in a thread): its windows are dropped,
    the files before and after it keep every window, each row the window it came from."""
    from tagger.predict import tag_files
    _wav(tmp_path / "before.wav", 7.0, seed=1)
    _wav(tmp_path / "broken.wav", 100.0, seed=2)           # decoded in blocks of 30 s
    _wav(tmp_path / "after.wav", 5.0, seed=3)
    data = (tmp_path / "broken.wav").read_bytes()
    (tmp_path / "broken.wav").write_bytes(data[:44 + (len(data) - 44) // 2])        # the header still says 100 s
    window = {"samples": 16000, "hop": 16000, "lead": 0, "end_aligned": True}
    calls, errors = [], []

    def serving(windows):                    # each window's first samples stand for its probabilities
        calls.append(len(windows))
        return {"probabilities": windows[:, :3]}
    paths = [str(tmp_path / n) for n in ("before.wav", "broken.wav", "after.wav")]
    results = tag_files(paths, serving, window, 16000, 3, lambda path, why: errors.append((path, why)), decoder)
    assert [r["path"] for r in results] == [paths[0], paths[2]]
    assert len(errors) == 1 and errors[0][0] == paths[1], errors
    reason = errors[0][1]          # tensorflow-io: "not decodable audio (Read less bytes than requested)"
    assert "\n" not in reason and (reason.startswith("decoding stopped at 30.0 s of 100.0 s") or
                                   reason.startswith("not decodable audio")), reason
    assert sum(calls) > 7 + 5 + 20           # most of the broken file's first 30 s went through the model
    for r in results:
        audio = np.frombuffer(open(r["path"], "rb").read()[44:], "<i2").astype(np.float32) / 32768
        assert len(r["window_probabilities"]) == len(r["starts"]) == int(r["duration"])
        np.testing.assert_array_equal(r["window_probabilities"], [audio[s * 16000:s * 16000 + 3] for s in range(
            len(r["starts"]))])
