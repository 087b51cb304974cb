"""The embedding store: round trip, resuming (what is pending after a rerun, a changed file superseded),
kills at chosen and at random moments in a child process, refusing another model's store, and reading
past what a kill leaves (an unfinished index line, a missing shard). Random arrays stand for embeddings;
the tracks' files are real, their size and mtime set here."""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from tagger.cli import UsageError
from tagger.store import Model, Store, Track, file_stamp, model_info

TAGS = ("rock", "pop", "jazz")
D = 16
MODEL = Model(name="model-a", fingerprint="a" * 64, tags=TAGS, window_seconds=3.0, hop_seconds=1.5)
TESTS = os.path.dirname(os.path.abspath(__file__))


def track_arrays(i, d=D):
    """Track i's (starts, embeddings, probabilities), 1 to 7 windows: the same in every process."""
    rng = np.random.default_rng(i)
    w = 1 + i % 7
    return (np.arange(w) * 1.5, rng.standard_normal((w, d)).astype(np.float32),
            rng.random((w, len(TAGS))).astype(np.float32))


def make_files(folder, n, first=0):
    """n real files, track_<i>.mp3, each of i + 1 bytes and mtime i seconds after 2020."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(first, first + n):
        path = os.path.join(folder, f"track_{i}.mp3")
        with open(path, "wb") as f:
            f.write(b"x" * (i + 1))
        os.utime(path, ns=(1_577_836_800_000_000_000 + i * 10**9,) * 2)
        paths.append(path)
    return paths


def add(writer, path, i):
    size, mtime_ns = file_stamp(path)
    starts, emb, probs = track_arrays(i)
    writer.add(path, size, mtime_ns, 1.5 * len(starts) + 1.5, starts, emb, probs)


def index_of(path):
    return int(os.path.basename(path)[len("track_"):-len(".mp3")])


def assert_exact(store, paths):
    """The store's tracks are exactly `paths`, each with its own arrays, bit for bit."""
    assert sorted(t.path for t in store.tracks()) == sorted(paths)
    names, means = store.means()
    assert means.dtype == np.float32 and means.shape == (len(paths), D)
    for name, mean in zip(names, means):
        starts, emb, probs = store.windows(name)
        ref = track_arrays(index_of(name))
        np.testing.assert_array_equal(starts, ref[0])
        np.testing.assert_array_equal(emb, ref[1])
        np.testing.assert_array_equal(probs, ref[2])
        np.testing.assert_array_equal(mean, ref[1].mean(axis=0))      # as tagger.predict.tag_files averages


def test_round_trip(tmp_path):
    paths = make_files(tmp_path / "music", 5)
    store = Store.create(str(tmp_path / "store"), MODEL)
    with store.writer(shard_tracks=2) as w:
        for i, p in enumerate(paths):
            add(w, p, i)
        w.fail(str(tmp_path / "music" / "broken.mp3"), "the decoder crashed\n(worker exit code -11)")
    assert_exact(store, paths)                          # the writer's store sees its commits
    again = Store.open(str(tmp_path / "store"), MODEL)
    assert_exact(again, paths)
    assert again.failed() == {str(tmp_path / "music" / "broken.mp3"): "the decoder crashed (worker exit code -11)"}
    assert again.model == Model(**{**MODEL.__dict__, "embedding_size": D})   # fixed by the first commit
    assert sorted(os.listdir(tmp_path / "store")) == ["index.jsonl", "shard-00000.npz", "shard-00001.npz",
                                                      "shard-00002.npz", "store.json", "writer.lock"]
    first = again.tracks()[0]
    size, mtime_ns = file_stamp(paths[0])
    assert first == Track(paths[0], size, mtime_ns, 3.0, "shard-00000.npz", 0, 1)
    with np.load(tmp_path / "store" / "shard-00001.npz") as z:          # the documented layout
        assert list(z["paths"]) == paths[2:4]
        np.testing.assert_array_equal(z["offsets"], [0, 3, 7])
        assert z["window_embeddings"].shape == (7, D) and z["window_probabilities"].shape == (7, len(TAGS))


def test_a_rerun_has_only_new_and_changed_files_pending(tmp_path):
    music = tmp_path / "music"
    paths = make_files(music, 6)
    store = Store.create(str(tmp_path / "store"), MODEL)
    with store.writer() as w:
        for i, p in enumerate(paths[:5]):
            add(w, p, i)
        size, mtime_ns = file_stamp(paths[5])
        w.fail(paths[5], "not audio", size, mtime_ns)
        w.fail(str(music / "gone.mp3"), "no such file")
    new = make_files(music, 1, first=10)
    os.utime(paths[1], ns=(1, 2))                                        # touched
    with open(paths[3], "ab") as f:                                      # rewritten, same mtime
        f.write(b"more")
    os.utime(paths[3], ns=(file_stamp(paths[4])[1] - 10**9,) * 2)
    everything = paths + [str(music / "gone.mp3")] + new
    store = Store.open(str(tmp_path / "store"), MODEL)
    # The failure with a stamp waits for the file to change; the one without is always retried.
    assert store.pending(everything) == [paths[1], paths[3], str(music / "gone.mp3"), new[0]]
    assert store.pending(everything, retry_failed=True) == [paths[1], paths[3], paths[5], str(music / "gone.mp3"),
                                                            new[0]]
    os.utime(paths[5], ns=(5, 6))
    assert paths[5] in store.pending(everything)
    with store.writer() as w:
        add(w, paths[1], 21)                                             # new arrays for the changed file
        add(w, paths[5], 5)                                              # the failed file now embeds
    store = Store.open(str(tmp_path / "store"))
    assert store.pending(everything) == [paths[3], str(music / "gone.mp3"), new[0]]
    assert [t.path for t in store.tracks()] == [paths[0], paths[2], paths[3], paths[4], paths[1], paths[5]]
    names, means = store.means()
    np.testing.assert_array_equal(means[names.index(paths[1])], track_arrays(21)[1].mean(axis=0))
    np.testing.assert_array_equal(store.windows(paths[1])[1], track_arrays(21)[1])
    assert store.failed() == {str(music / "gone.mp3"): "no such file"}
    with pytest.raises(KeyError):
        store.windows(str(music / "gone.mp3"))


CHILD = """
import os, sys
sys.path[:0] = [{root!r}, {tests!r}]
from test_store import MODEL, add
from tagger.store import Store
store = Store.open({folder!r}, MODEL)
paths = store.pending({paths!r})
w = store.writer(shard_tracks={shard_tracks})
{body}
"""


def child(folder, paths, shard_tracks, body):
    source = CHILD.format(root=ROOT, tests=TESTS, folder=str(folder), paths=paths, shard_tracks=shard_tracks,
                          body=body)
    return [sys.executable, "-c", source]


def test_a_kill_loses_only_the_uncommitted_tracks(tmp_path):
    paths = make_files(tmp_path / "music", 9)
    folder = str(tmp_path / "store")
    Store.create(folder, MODEL)
    # Seven tracks at three a shard: two commits, a seventh and a failure buffered, then the process dies.
    body = ("from test_store import index_of\n"
            "for p in paths[:7]:\n    add(w, p, index_of(p))\n"
            "w.fail(paths[8], 'not audio', 9, 9)\n"
            "assert w.committed == 6\n"
            "os._exit(1)")
    done = subprocess.run(child(folder, paths, 3, body), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    store = Store.open(folder, MODEL)
    assert_exact(store, paths[:6])
    assert store.failed() == {} and store.ignored == 0
    assert store.pending(paths) == paths[6:]
    with store.writer() as w:                 # the dead writer's lock went with it
        for p in store.pending(paths):
            add(w, p, index_of(p))
    assert_exact(Store.open(folder, MODEL), paths)


def assert_index_names_whole_shards(folder):
    """Every whole index line names a shard that is there and holds its row."""
    with open(os.path.join(folder, "index.jsonl"), "rb") as f:
        lines = f.read().split(b"\n")
    for line in lines[:-1]:
        entry = json.loads(line)
        if "shard" in entry:
            with np.load(os.path.join(folder, entry["shard"])) as z:
                assert z["paths"][entry["row"]] == entry["path"]


# Python's audit hooks see each step of a commit: the rename that puts the shard in place ("os.rename",
# also raised by os.replace), then the index opened for the append ("open"). The child dies at one.
KILL_AT = {"before the shard's rename": "event == 'os.rename' and args[1].endswith('.npz')",
           "between the shard's rename and the index": "event == 'open' and str(args[0]).endswith('index.jsonl') "
                                                       "and 'a' in str(args[1])"}


@pytest.mark.parametrize("step", KILL_AT)
def test_a_kill_at_each_step_of_a_commit(tmp_path, step):
    paths = make_files(tmp_path / "music", 5)
    folder = str(tmp_path / "store")
    Store.create(folder, MODEL)
    body = ("from test_store import index_of\n"
            "for p in paths[:2]:\n    add(w, p, index_of(p))\n"
            "assert w.committed == 2\n"
            f"sys.addaudithook(lambda event, args: os._exit(3) if {KILL_AT[step]} else None)\n"
            "for p in paths[2:4]:\n    add(w, p, index_of(p))\n")
    done = subprocess.run(child(folder, paths, 2, body), capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert_index_names_whole_shards(folder)
    store = Store.open(folder, MODEL)
    assert store.ignored == 0
    assert_exact(store, paths[:2])
    assert store.pending(paths) == paths[2:]
    with store.writer(shard_tracks=2) as w:
        for p in store.pending(paths):
            add(w, p, index_of(p))
    assert_index_names_whole_shards(folder)
    assert_exact(Store.open(folder, MODEL), paths)


def test_sigkill_at_random_moments_keeps_every_commit_whole(tmp_path):
    paths = make_files(tmp_path / "music", 60)
    folder = str(tmp_path / "store")
    Store.create(folder, MODEL)
    body = ("from test_store import index_of\n"
            "for p in paths:\n"
            "    add(w, p, index_of(p))\n"
            "    print(w.committed, flush=True)\n"
            "w.close()\nprint('done', flush=True)")
    chance = random.Random(0)
    committed_before = set()
    for round_ in range(6):
        proc = subprocess.Popen(child(folder, paths, 2, body), stdout=subprocess.PIPE, text=True)
        reported = 0
        for line in proc.stdout:             # let it commit at least once, then kill it at a random moment
            if line.strip() == "done":
                break
            reported = int(line)
            if reported >= 2 and round_ < 5:
                time.sleep(chance.uniform(0, 0.02))
                proc.send_signal(signal.SIGKILL)
                break
        proc.stdout.close()
        proc.wait(timeout=60)
        store = Store.open(folder, MODEL)
        assert_index_names_whole_shards(folder)
        committed = [t.path for t in store.tracks()]
        assert_exact(store, committed)
        assert committed_before <= set(committed) and len(committed) >= len(committed_before) + reported
        assert store.pending(paths) == [p for p in paths if p not in set(committed)]
        committed_before = set(committed)
        if round_ == 5:
            assert proc.returncode == 0
    assert_exact(store, paths)


def test_another_models_store_is_refused_in_one_line(tmp_path):
    folder = str(tmp_path / "store")
    Store.create(folder, MODEL)
    other = Model(name="model-b", fingerprint="b" * 64, tags=TAGS, window_seconds=3.0, hop_seconds=1.5)
    for action in (Store.open, Store.create):
        with pytest.raises(UsageError) as e:
            action(folder, other)
        assert str(e.value) == f"{folder} holds embeddings of model-a, not model-b: use another --out"
    retrained = Model(**{**MODEL.__dict__, "fingerprint": "c" * 64})
    with pytest.raises(UsageError, match=f"of model-a \\(fingerprint {'a' * 12}\\), not model-a \\({'c' * 12}\\)"):
        Store.open(folder, retrained)
    with pytest.raises(UsageError, match="holds windows every 1.5 s, not 3 s: use another --out, or --hop 1.5"):
        Store.open(folder, Model(**{**MODEL.__dict__, "hop_seconds": 3.0}))
    assert Store.open(folder, Model(**{**MODEL.__dict__, "name": "renamed"})).model == MODEL    # same weights
    assert Store.open(folder).model == MODEL
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    for make, message in ((Store.create, "is not empty and holds no embedding store"),
                          (Store.open, "is not an embedding store \\(no store.json\\)")):
        with pytest.raises(UsageError, match=message):
            make(str(tmp_path / "notes"), MODEL)
    with pytest.raises(UsageError, match="is remote"):
        Store.create("gs://bucket/store", MODEL)


def test_an_unfinished_index_line_and_a_missing_shard_are_left_out(tmp_path, capsys):
    paths = make_files(tmp_path / "music", 6)
    folder = str(tmp_path / "store")
    store = Store.create(folder, MODEL)
    with store.writer(shard_tracks=2) as w:
        for i, p in enumerate(paths[:4]):
            add(w, p, i)
    with open(os.path.join(folder, "index.jsonl"), "ab") as f:
        f.write(b'{"path": "' + paths[4].encode() + b'", "size": 5, "mt')           # killed mid-append
    open(os.path.join(folder, "shard-00007.npz.tmp-99"), "wb").close()              # killed mid-shard
    capsys.readouterr()
    store = Store.open(folder, MODEL)
    assert store.ignored == 1
    assert capsys.readouterr().err == (f"{folder}: left out 1 index line (an interrupted commit or a missing "
                                       "shard); their files count as not embedded\n")
    assert_exact(store, paths[:4])
    with store.writer() as w:            # the next commit starts on a line of its own
        add(w, paths[4], 4)
    assert not os.path.exists(os.path.join(folder, "shard-00007.npz.tmp-99"))
    store = Store.open(folder, MODEL)
    assert store.ignored == 0 and capsys.readouterr().err == ""
    assert_exact(store, paths[:5])
    os.remove(os.path.join(folder, "shard-00000.npz"))
    store = Store.open(folder, MODEL)
    assert store.ignored == 2 and "left out 2 index lines" in capsys.readouterr().err
    assert_exact(store, paths[2:5])
    assert store.pending(paths) == [paths[0], paths[1], paths[5]]


def test_a_damaged_shard_is_named_in_one_line(tmp_path):
    paths = make_files(tmp_path / "music", 2)
    folder = str(tmp_path / "store")
    store = Store.create(folder, MODEL)
    with store.writer() as w:
        add(w, paths[0], 0)
    shard = os.path.join(folder, "shard-00000.npz")
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(UsageError) as e:
        Store.open(folder).means()
    assert str(e.value).startswith(f"{shard} is damaged (") and "\n" not in str(e.value)
    assert str(e.value).endswith("): delete it and run again to embed its tracks again")


def test_one_writer_at_a_time(tmp_path):
    store = Store.create(str(tmp_path / "store"), MODEL)
    with store.writer():
        with pytest.raises(UsageError, match="is being written by another process"):
            store.writer()
    store.writer().close()                # free again


def test_arrays_that_do_not_fit_are_refused(tmp_path):
    path, = make_files(tmp_path / "music", 1)
    store = Store.create(str(tmp_path / "store"), MODEL)
    starts, emb, probs = track_arrays(3)
    with store.writer() as w:
        w.add(path, 1, 1, 6.0, starts, emb, probs)
        for bad in ((starts, emb[:, :-1], probs), (starts, emb, probs[:, :2]), (starts[:-1], emb, probs),
                    (starts[:0], emb[:0], probs[:0])):
            with pytest.raises(ValueError, match="do not fit this store"):
                w.add(path, 1, 1, 6.0, *bad)
    with store.writer() as w, pytest.raises(ValueError, match=f"\\(w, {D}\\)"):
        w.add(path, 1, 1, 6.0, *track_arrays(3, d=D + 1))            # the first commit fixed the size


def test_a_store_of_one_track(tmp_path):
    path, = make_files(tmp_path / "music", 1, first=4)
    size, mtime_ns = file_stamp(path)
    store = Store.from_track(str(tmp_path / "one"), MODEL, path, size, mtime_ns, 9.0, *track_arrays(4))
    assert_exact(Store.open(str(tmp_path / "one"), MODEL), [path])
    assert store.pending([path]) == []


def test_model_info_of_an_export(tmp_path):
    export = tmp_path / "my-export"
    (export / "variables").mkdir(parents=True)
    config = {"tags": list(TAGS), "sample_rate": 16000, "clip_samples": 48000,
              "window": {"samples": 48128, "hop": 47872, "lead": 256, "end_aligned": False}}
    (export / "config.json").write_text(json.dumps(config))
    (export / "variables" / "variables.index").write_bytes(b"weights' checksums")
    info = model_info(str(export))
    expected = hashlib.sha256(json.dumps(config).encode() + b"weights' checksums").hexdigest()
    assert info == Model(name="my-export", fingerprint=expected, tags=TAGS, window_seconds=48128 / 16000,
                         hop_seconds=47872 / 16000, path=str(export))
    assert model_info(str(export) + "/", hop_seconds=1.0).hop_seconds == 1.0
    del config["window"]                                # an older export: clip-length windows
    (export / "config.json").write_text(json.dumps(config))
    old = model_info(str(export))
    assert (old.window_seconds, old.hop_seconds) == (3.0, 3.0) and old.fingerprint != expected
