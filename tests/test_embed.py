"""tagger.embed end to end, in real subprocesses with a real export (the tiny CRNN) and real WAV files:
the store's windows against `tagger.predict --embeddings` on the same files, a failed file recorded, a
run killed mid-way and resumed (only the uncommitted tracks embedded again, the committed shards left
alone), a changed file embedded again, and another model's store refused before TensorFlow loads.

The decoder is soundfile throughout (tfio would load TensorFlow in every decoding worker: seconds per run
here); wav files decode to the same samples with either."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
import wave

import numpy as np
import pytest

from conftest import ROOT, run_cli
from tagger.store import Store

DECODER = ("--decoder", "soundfile")
CLIPS = 5


def read_wav(path):
    with wave.open(str(path)) as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (1, 2, 16000)
        return np.frombuffer(f.readframes(f.getnframes()), "<i2")


def write_wav(path, samples):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(16000)
        f.writeframes(np.asarray(samples, "<i2").tobytes())
    return str(path)


def embed(*args):
    return run_cli("tagger.embed", *args, *DECODER)


def summary(stderr):
    """(embedded, failed, already there) from the run's summary line."""
    m = re.search(r"Embedded ([\d,]+) tracks? in .* ([\d,]+) failed, ([\d,]+) already in the store", stderr)
    assert m, stderr
    return tuple(int(g.replace(",", "")) for g in m.groups())


@pytest.fixture(scope="module")
def clips(tiny_release, crnn_run, tmp_path_factory):
    """(export, clips, library, reference): CLIPS 4 s demo clips' samples; a library of them, a 14 s
    track (three clips and half of another: an end-aligned last window), a 2 s one (zero-padded) and a
    broken file; `tagger.predict --embeddings` of the library: {file name: (windows, features)}."""
    export = crnn_run[0] / "models" / "crnn"
    sources = [sorted(glob.glob(os.path.join(tiny_release, part, "*.wav")))[0] for part in "01234"]
    samples = [read_wav(p) for p in sources]
    lib = tmp_path_factory.mktemp("embed_lib")
    for i, s in enumerate(samples):
        write_wav(lib / f"clip{i}.wav", s)
    write_wav(lib / "long.wav", np.concatenate([*samples[:3], samples[3][:len(samples[3]) // 2]]))
    write_wav(lib / "short.wav", samples[4][:32000])
    (lib / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00 not a wave file at all")
    out = tmp_path_factory.mktemp("embed_ref")
    r = run_cli("tagger.predict", lib, "--model", export, "--embeddings", out, *DECODER)
    assert r.returncode == 1 and "broken.wav" in r.stderr, r.stderr[-3000:]    # the broken file fails
    with open(out / "index.csv") as f:
        names = {os.path.basename(row.split(",")[1]): row.split(",")[0] for row in f.read().splitlines()[1:]}
    reference = {name: np.load(out / f"{stem}.windows.npy") for name, stem in names.items()}
    assert len(reference) == CLIPS + 2 and reference["long.wav"].shape[0] == 4
    return export, samples, lib, reference


def assert_windows(store, path, expected, starts=None):
    got_starts, emb, probs = store.windows(path)
    np.testing.assert_allclose(emb, expected, atol=1e-5, rtol=0, err_msg=path)
    assert probs.shape == (len(emb), len(store.model.tags)) and np.all((probs >= 0) & (probs <= 1))
    if starts is not None:
        np.testing.assert_allclose(got_starts, starts)


def test_embeds_a_library_as_predict_does(clips, tmp_path):
    export, _, lib, reference = clips
    out = tmp_path / "store"
    r = embed(lib, "--model", export, "--out", out, "--workers", "2", "--batch-size", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert summary(r.stderr) == (CLIPS + 2, 1, 0)
    assert re.search(r"1 file could not be embedded.*\n  .*broken\.wav: not decodable audio", r.stderr)
    assert "Traceback" not in r.stderr

    store = Store.open(str(out))
    assert sorted(t.path for t in store.tracks()) == sorted(str(lib / n) for n in reference)
    for name, windows in reference.items():
        assert_windows(store, str(lib / name), windows)
    assert_windows(store, str(lib / "long.wav"), reference["long.wav"], starts=[0, 4, 8, 10])
    assert {t.path: t.duration for t in store.tracks()}[str(lib / "short.wav")] == 2.0
    names, means = store.means()
    np.testing.assert_allclose(means, [reference[os.path.basename(n)].mean(axis=0) for n in names], atol=1e-5)
    failed = store.failed()
    assert list(failed) == [str(lib / "broken.wav")] and failed[str(lib / "broken.wav")].startswith("not decodable")
    assert not glob.glob(str(out / ".decoding-*"))

    r = embed(lib, "--model", export, "--out", out)        # nothing to do: the broken file is skipped
    assert r.returncode == 0 and f"all {CLIPS + 2} tracks are in" in r.stderr, r.stderr
    assert "skipped 1 file that failed before" in r.stderr


def test_a_killed_run_resumes_where_it_stopped(clips, tmp_path):
    export, samples, _, reference = clips
    lib = tmp_path / "lib"
    lib.mkdir()
    paths = [write_wav(lib / f"t{i:02d}.wav", np.tile(samples[i % CLIPS], 8)) for i in range(30)]
    expected = {p: np.tile(reference[f"clip{i % CLIPS}.wav"], (8, 1)) for i, p in enumerate(paths)}
    out = tmp_path / "store"
    common = ("--model", export, "--out", out, "--commit-every", "2", "--workers", "1")

    # A first run, of six files named in a list (relative to the folder it runs in).
    (tmp_path / "first.txt").write_text("".join(f"lib/{os.path.basename(p)}\n" for p in paths[:6]))
    r = run_cli("tagger.embed", "--list", "first.txt", *common, *DECODER, cwd=tmp_path)
    assert r.returncode == 0 and summary(r.stderr) == (6, 0, 0), r.stderr[-3000:]

    # A second run of all 30, stopped once it has committed a shard of its own, and killed.
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tagger.embed", lib, *map(str, common), *DECODER], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"},
                                stdout=log, stderr=log)
        index = out / "index.jsonl"
        try:
            while proc.poll() is None and index.read_bytes().count(b"\n") < 8:
                time.sleep(0.002)
            proc.send_signal(signal.SIGSTOP)                              # frozen while we look
            committed = {t.path for t in Store.open(str(out)).tracks()}
        finally:
            proc.kill()
            proc.wait()
    assert 6 < len(committed) < 30, f"the run ended before it was killed: {(tmp_path / 'killed.log').read_text()}"
    shards = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "shard-*.npz"))}
    whole_lines = index.read_bytes()[:index.read_bytes().rfind(b"\n") + 1]

    r = embed(lib, *common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert summary(r.stderr) == (30 - len(committed), 0, len(committed))
    assert {p: os.stat(p).st_mtime_ns for p in shards} == shards          # committed shards left alone
    assert index.read_bytes().startswith(whole_lines)
    lines = [json.loads(line) for line in index.read_bytes().splitlines()]
    assert sorted(e["path"] for e in lines if "shard" in e) == sorted(paths)      # every track once
    store = Store.open(str(out))
    assert store.ignored == 0 and sorted(t.path for t in store.tracks()) == sorted(paths)
    for p in paths:
        assert_windows(store, p, expected[p], starts=np.arange(8) * 4.0)
    assert not glob.glob(str(out / ".decoding-*"))                        # the killed run's scratch too

    r = embed(lib, *common)
    assert r.returncode == 0 and "all 30 tracks are in" in r.stderr and "Embedded" not in r.stderr, r.stderr
    assert index.read_bytes().count(b"\n") == len(lines)


def test_a_changed_file_is_embedded_again(clips, tmp_path):
    export, samples, _, reference = clips
    lib = tmp_path / "lib"
    lib.mkdir()
    paths = [write_wav(lib / f"t{i}.wav", samples[i]) for i in range(3)]
    out = tmp_path / "store"
    assert embed(lib, "--model", export, "--out", out).returncode == 0
    mtime = os.stat(paths[0]).st_mtime_ns
    write_wav(paths[0], samples[3])                       # the same size, other samples
    os.utime(paths[0], ns=(mtime + 10**9,) * 2)           # and a newer mtime, whatever the clock's resolution
    r = embed(lib, "--model", export, "--out", out)
    assert r.returncode == 0 and summary(r.stderr) == (1, 0, 2), r.stderr[-3000:]
    store = Store.open(str(out))
    assert_windows(store, paths[0], reference["clip3.wav"])
    for i in (1, 2):
        assert_windows(store, paths[i], reference[f"clip{i}.wav"])
    assert len(store.tracks()) == 3


SNIPPET = """
import json, os, sys
from tagger import embed, store

def status(*args):
    try:
        return embed.main([str(a) for a in args])
    except SystemExit as e:             # argparse's usage errors
        return e.code

export, lib, tmp = sys.argv[1:]
other = os.path.join(tmp, "other")
store.Store.create(other, store.Model(name="other", fingerprint="0" * 64, tags=("a",), window_seconds=4.0,
                                      hop_seconds=4.0))
same = os.path.join(tmp, "same")
store.Store.create(same, store.model_info(export))
open(os.path.join(tmp, "file"), "w").close()
os.mkdir(os.path.join(tmp, "silent"))
open(os.path.join(tmp, "list.txt"), "w").write("nowhere.wav\\n")
before = {d: sorted(os.listdir(d)) + [open(os.path.join(d, "store.json")).read()] for d in (other, same)}
print(json.dumps([
    status(lib, "--model", export, "--out", other),
    status(lib, "--model", export, "--out", same, "--hop", "2"),
    status(os.path.join(tmp, "missing"), "--model", export, "--out", os.path.join(tmp, "new")),
    status(os.path.join(tmp, "silent"), "--model", export, "--out", os.path.join(tmp, "new")),
    status("--list", os.path.join(tmp, "list.txt"), "--model", export, "--out", os.path.join(tmp, "new")),
    status(lib, "--model", export, "--out", os.path.join(tmp, "file")),
    status(lib, "--model", export, "--out", os.path.join(tmp, "new"), "--hop", "0"),
    status(lib, "--model", export, "--out", os.path.join(tmp, "new"), "--workers", "0"),
    status(lib, "--model", os.path.join(tmp, "nomodel"), "--out", os.path.join(tmp, "new")),
]))
after = {d: sorted(os.listdir(d)) + [open(os.path.join(d, "store.json")).read()] for d in (other, same)}
print(after == before, os.path.exists(os.path.join(tmp, "new")))
print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")))
"""


def test_arguments_and_another_models_store_are_refused_before_tensorflow(clips, tmp_path):
    export, _, lib, _ = clips
    r = subprocess.run([sys.executable, "-c", SNIPPET, str(export), str(lib), str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    statuses, untouched, modules = r.stdout.strip().splitlines()
    assert json.loads(statuses) == [2] * 9 and untouched == "True False" and modules == "[]"
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 9 and all(e.startswith("python -m tagger.embed: error: ") for e in errors), r.stderr
    assert "other holds embeddings of other, not crnn: use another --out" in errors[0]
    assert "holds windows every 4 s, not 2 s" in errors[1]
    assert "missing does not exist" in errors[2] and "no audio files" in errors[3]
    assert "list.txt: 1 path missing" in errors[4] and "nowhere.wav" in errors[4]
    assert "is a file" in errors[5] and "--hop" in errors[6] and "--workers" in errors[7]
    assert "neither a tagger export" in errors[8]
