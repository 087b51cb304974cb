"""The converter: TFRecord round trip, bad files, resuming, settings checks, --plan, the demo."""
import glob
import json
import os
import shutil
import wave

import numpy as np
import pytest
import tensorflow as tf

from conftest import DECODERS, ROOT, SHARED_ANNOTATIONS, TINY_SAMPLES, run_cli
from tagger import audio, data, demo, prepare
from tagger.pool import run_tasks

FIXTURE_MP3 = os.path.join(ROOT, "tests", "fixtures", "tone.mp3")
CLIP_SECONDS = 2.0
CLIP = 32000


def _wav(path, x, rate=16000, channels=1):
    pcm = np.asarray(x, "<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())


def _release(root, files):
    """An MTAT-format release: files {relative path: writer(path) or bytes}, tags rock/piano."""
    rows = ['"clip_id"\t"rock"\t"piano"\t"mp3_path"']
    for i, (rel, content) in enumerate(files.items(), 1):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        else:
            path.write_bytes(content)
        rows.append(f'"{i}"\t"{i % 2}"\t"{int(i % 3 == 0)}"\t"{rel}"')
    (root / "annotations_final.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode())


def _read_all(out):
    manifest = data.load_manifest(str(out))
    records = {}
    for split in ("train", "valid", "test"):
        for path in data.shard_paths(str(out), manifest, split):
            for r in tf.data.TFRecordDataset(path):
                pcm, labels, clip_id, rel = data.parse_example(r, len(manifest["tags"]))
                assert int(clip_id) not in records, "a clip was written twice"
                records[int(clip_id)] = (split, rel.numpy().decode(), pcm.numpy(), labels.numpy())
    return manifest, records


@pytest.fixture
def messy_release(tmp_path):
    rng = np.random.default_rng(1)
    exact = rng.integers(-32768, 32767, CLIP, dtype=np.int16)
    t = np.arange(int(44100 * 2.5)) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)], 1) * 12000
    good = {
        "0/exact.wav": lambda p: _wav(p, exact),                                   # round trip target
        "1/tone.mp3": open(FIXTURE_MP3, "rb").read(),                              # the committed mp3
        "c/stereo44k.wav": lambda p: _wav(p, stereo.astype(np.int16).reshape(-1), 44100, channels=2),
        "d/short-but-ok.wav": lambda p: _wav(p, exact[:int(CLIP * 0.95)]),         # padded
        "e/long.wav": lambda p: _wav(p, np.tile(exact, 3)),                        # trimmed
    }
    bad = {
        "2/empty.mp3": b"",
        "3/corrupt.mp3": rng.bytes(5000),
        "4/too-short.wav": lambda p: _wav(p, exact[:4000]),
        "5/truncated.wav": lambda p: (_wav(p, exact), p.write_bytes(p.read_bytes()[:30])),
        "f/not-audio.ogg": b"this is a text file, not audio\n" * 50,
    }
    _release(tmp_path / "release", {**good, **bad})
    (tmp_path / "release" / "a").mkdir(exist_ok=True)
    return tmp_path / "release", exact, good, bad


def _prepare(release, out, *extra):
    return prepare.main(["--source", "mtat", "--mtat-dir", str(release), "--out", str(out),
                         "--clip-seconds", str(CLIP_SECONDS), "--workers", "2", *extra])


@pytest.mark.parametrize("decoder", DECODERS)
def test_round_trip_and_bad_files(messy_release, tmp_path, capsys, decoder):
    release, exact, good, bad = messy_release
    assert _prepare(release, tmp_path / "out", "--decoder", decoder) == 0
    manifest, records = _read_all(tmp_path / "out")
    assert manifest["decoder"] == audio.decoder_info(decoder)
    by_path = {r[1]: r for r in records.values()}
    assert set(by_path) == set(good)
    np.testing.assert_array_equal(by_path["0/exact.wav"][2], exact)            # bit for bit
    np.testing.assert_array_equal(by_path["e/long.wav"][2], exact)             # trimmed to the clip
    padded = by_path["d/short-but-ok.wav"][2]
    assert len(padded) == CLIP and not padded[int(CLIP * 0.95):].any()
    assert manifest["padded"] >= 1
    stereo = by_path["c/stereo44k.wav"][2].astype(np.float32) / 32768
    assert stereo.shape == (CLIP,) and np.abs(stereo).max() > 0.3             # mixed down, resampled
    spectrum = np.abs(np.fft.rfft(stereo[:32000]))
    assert abs(np.argmax(spectrum) * 16000 / 32000 - 440) < 3 or abs(np.argmax(spectrum) * 0.5 - 660) < 3
    tone = by_path["1/tone.mp3"][2].astype(np.float32) / 32768
    assert abs(np.argmax(np.abs(np.fft.rfft(tone))) * 16000 / len(tone) - 330) < 3
    assert {s["path"] for s in manifest["skipped"]} == set(bad)
    assert all(s["reason"] for s in manifest["skipped"])
    assert manifest["splits"]["train"]["clips"] == 2 and manifest["splits"]["valid"]["clips"] == 1
    labels = {r[1]: list(r[3]) for r in records.values()}
    assert labels["0/exact.wav"] == [1.0, 0.0]                                  # clip 1: rock
    assert sum(manifest["tag_counts"]["train"].values()) == sum(sum(r[3]) for r in records.values() if r[0] == "train")
    out = capsys.readouterr().out
    assert "5 files skipped" in out and "manifest.json" in out
    assert not glob.glob(str(tmp_path / "out" / "*.tmp*"))


def test_decoder_crash_costs_one_file():
    results = {i: (ok, v) for i, ok, v in run_tasks(_crash_on_odd, [(n,) for n in range(6)], 2)}
    assert [results[i][0] for i in range(6)] == [True, False, True, False, True, False]
    assert results[0][1] == 0 and "crashed" in results[1][1]


def _crash_on_odd(n):
    if n % 2:
        os.abort()   # what a segfaulting decoder does to its process
    return n * n


def test_interrupted_run_resumes_without_duplicates(messy_release, tmp_path):
    release = messy_release[0]
    out = tmp_path / "out"
    assert _prepare(release, out, "--shard-mb", "0.07") == 0                   # one clip a shard
    shards = sorted(glob.glob(str(out / "*.tfrecord")))
    assert len(shards) >= 5
    _, before = _read_all(out)
    # An interruption: two shards never renamed into place, one half-written temporary left behind.
    for lost in shards[1:3]:
        os.rename(lost, lost + ".tmp-99999")
    with open(shards[1] + ".tmp-99999", "r+b") as f:
        f.truncate(100)
    kept = {s: os.stat(s).st_mtime_ns for s in shards if s not in shards[1:3]}
    assert _prepare(release, out, "--shard-mb", "0.07") == 0
    manifest, after = _read_all(out)
    assert {k: (v[0], v[1]) for k, v in after.items()} == {k: (v[0], v[1]) for k, v in before.items()}
    assert all(os.stat(s).st_mtime_ns == m for s, m in kept.items())           # finished shards kept


def test_rerun_with_other_settings_is_refused(messy_release, tmp_path, capsys):
    release = messy_release[0]
    assert _prepare(release, tmp_path / "out", "--decoder", "soundfile") == 0
    assert _prepare(release, tmp_path / "out", "--split", "clean", "--decoder", "soundfile") == 2
    assert "other settings (split differ)" in capsys.readouterr().err
    # another decoder does not finish a folder (its samples would mix two decoders' mp3s)
    status = _prepare(release, tmp_path / "out", "--decoder", "auto")
    err = capsys.readouterr().err
    if audio.resolve_decoder("auto") == "soundfile":       # auto is soundfile where tensorflow-io does not load
        assert status == 0
    else:
        assert status == 2 and "other settings (decoder differ)" in err and "pass that --decoder" in err


def test_fatal_problems_exit_2_in_one_line(tmp_path):
    (tmp_path / "bad.csv").write_text("not,an,mtat,file\n")
    cases = [
        ["--source", "mtat", "--mtat-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o1")],
        ["--source", "mtat", "--out", str(tmp_path / "o2")],
        ["--source", "nonsense", "--out", str(tmp_path / "o3")],
        ["--source", "csv", "--csv", str(tmp_path / "bad.csv"), "--audio-root", str(tmp_path), "--out", str(tmp_path / "o4")],
        ["--source", "mtat", "--mtat-dir", str(tmp_path), "--out", str(tmp_path / "o5"), "--workers", "0"],
        ["--source", "demo", "--out", "/proc/no-such-dir/demo"],                # unwritable output folder
        ["--source", "csv", "--csv", str(tmp_path / "bad.csv"), "--audio-root", str(tmp_path), "--out",
         str(tmp_path / "o6"), "--split", "artist"],                            # a CSV's split is its own
    ]
    shutil.copy(tmp_path / "bad.csv", tmp_path / "annotations_final.csv")
    for args in cases:
        r = run_cli("tagger.prepare", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert "error:" in r.stderr


def test_nothing_convertible_exits_2_and_keeps_the_manifest(tmp_path):
    _release(tmp_path / "release", {"0/a.mp3": b"junk" * 100, "c/b.wav": b""})
    assert _prepare(tmp_path / "release", tmp_path / "out") == 2
    manifest = json.load(open(tmp_path / "out" / "manifest.json"))
    assert len(manifest["skipped"]) == 2


@pytest.mark.skipif(not os.path.exists(SHARED_ANNOTATIONS), reason="real annotations not here")
def test_plan_on_the_real_annotations(tmp_path):
    import gzip
    (tmp_path / "mtat").mkdir()
    (tmp_path / "mtat" / "annotations_final.csv").write_bytes(gzip.decompress(open(SHARED_ANNOTATIONS, "rb").read()))
    r = run_cli("tagger.prepare", "--source", "mtat", "--mtat-dir", tmp_path / "mtat", "--out", tmp_path / "plan",
                "--plan", "--split", "clean")
    assert r.returncode == 1, r.stderr            # the annotations alone: every mp3 is missing
    assert "train 15,247, valid 1,529, test 4,332" in r.stdout
    assert "Missing or empty audio files under" in r.stdout and "train 15,247 of 15,247, valid 1,529 of 1,529" in r.stdout
    rows = open(tmp_path / "plan" / "plan.tsv").read().splitlines()
    assert rows[0] == "split\tclip_id\tmp3_path" and len(rows) == 1 + 15247 + 1529 + 4332
    assert len(open(tmp_path / "plan" / "missing.tsv").read().splitlines()) == 1 + 15247 + 1529 + 4332
    assert json.load(open(tmp_path / "plan" / "tags.json"))[:3] == ["guitar", "classical", "slow"]


def test_plan_counts_missing_and_empty_files(tmp_path):
    """--plan stats every planned file: a part folder deleted and an empty file are counted per split,
    listed in missing.tsv, exit status 1; a complete release passes with 0."""
    x = np.zeros(CLIP, np.int16)
    files = {f"{part}/clip{i}.wav": (lambda p: _wav(p, x)) for part in "0c" for i in range(3)}
    files["d/empty.wav"] = b""
    files["e/fine.wav"] = lambda p: _wav(p, x)
    _release(tmp_path / "release", files)
    plan = ["--source", "mtat", "--mtat-dir", tmp_path / "release", "--plan", "--top-tags", "2"]
    shutil.rmtree(tmp_path / "release" / "0")
    r = run_cli("tagger.prepare", *plan, "--out", tmp_path / "a")
    assert r.returncode == 1, r.stderr
    assert "train 3 of 3, valid 0 of 3, test 1 of 2 (e.g. 0/clip0.wav)" in r.stdout
    assert sorted(open(tmp_path / "a" / "missing.tsv").read().splitlines()[1:]) == [
        "test\td/empty.wav", "train\t0/clip0.wav", "train\t0/clip1.wav", "train\t0/clip2.wav"]
    _release(tmp_path / "whole", {k: v for k, v in files.items() if k != "d/empty.wav"})
    r = run_cli("tagger.prepare", "--source", "mtat", "--mtat-dir", tmp_path / "whole", "--plan", "--top-tags", "2",
                "--out", tmp_path / "b")
    assert r.returncode == 0 and "All 7 planned audio files are there" in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "b" / "missing.tsv").exists()


def test_an_empty_split_is_warned_about_and_refused_by_train_before_tensorflow(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    lines = ["path,tags,split"] + [f"s{i}.wav,rock,{'train' if i < 2 else 'valid'}" for i in range(3)]
    for i in range(3):
        _wav(audio / f"s{i}.wav", np.zeros(CLIP, np.int16))
    (tmp_path / "songs.csv").write_text("\n".join(lines) + "\n")
    r = run_cli("tagger.prepare", "--source", "csv", "--csv", tmp_path / "songs.csv", "--audio-root", audio,
                "--out", tmp_path / "out", "--clip-seconds", "2", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "warning: the converted data has no clips in the test split" in r.stderr
    code = ("import sys\nfrom tagger import train\nstatus = train.main(['--data', sys.argv[1], '--arch', 'cnn'])\n"
            "print(status, any(m.split('.')[0] == 'tensorflow' for m in sys.modules))")
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert done.stderr.strip().splitlines() == [
        f"python -m tagger.train: error: --data {tmp_path / 'out'}: the test split is empty (manifest.json): prepare "
        "the data again with clips in every split (see tagger.prepare --plan)"]


@pytest.mark.parametrize("offset, start", [("1.5", 24000), ("middle", 32000), ("5", 64000), ("0", 0)])
def test_clip_offset_chooses_the_part_of_a_longer_file(tmp_path, offset, start):
    """A 6 s file, 2 s clips: the clip starts at the offset, or ends with the file where the file is too
    short for a whole clip from there; middle centres it."""
    audio = tmp_path / "audio"
    audio.mkdir()
    x = np.random.default_rng(4).integers(-20000, 20000, 6 * 16000).astype(np.int16)
    _wav(audio / "long.wav", x)
    (tmp_path / "songs.csv").write_text("path,tags,split\nlong.wav,rock,train\n")
    args = ["--source", "csv", "--csv", str(tmp_path / "songs.csv"), "--audio-root", str(audio),
            "--out", str(tmp_path / "out"), "--clip-seconds", "2", "--workers", "1", "--clip-offset", offset]
    assert prepare.main(args) == 0
    manifest, records = _read_all(tmp_path / "out")
    np.testing.assert_array_equal(records[1][2], x[start:start + CLIP])
    assert manifest["clip_offset"] == (offset if offset == "middle" else float(offset))
    assert prepare.main(args[:-1] + ["2.5"]) == 2           # another offset: the folder is refused
    settings = tmp_path / "out" / "prepare_settings.json"
    if offset == "0":                                       # a record from before --clip-offset: offset 0
        settings.write_text(json.dumps({k: v for k, v in json.load(open(settings)).items() if k != "clip_offset"}))
        assert prepare.main(args) == 0


def test_csv_source(tmp_path):
    rng = np.random.default_rng(0)
    audio = tmp_path / "audio"
    audio.mkdir()
    lines = ["path,tags,split"]
    for i in range(6):
        _wav(audio / f"s{i}.wav", rng.integers(-9000, 9000, CLIP))
        lines.append(f"s{i}.wav,{'rock;loud' if i % 2 else 'rock'},{['train', 'valid', 'test'][i % 3]}")
    (tmp_path / "songs.csv").write_text("\n".join(lines) + "\n")
    assert prepare.main(["--source", "csv", "--csv", str(tmp_path / "songs.csv"), "--audio-root", str(audio),
                         "--out", str(tmp_path / "out"), "--clip-seconds", "2", "--workers", "1"]) == 0
    manifest, records = _read_all(tmp_path / "out")
    assert manifest["tags"] == ["rock", "loud"]
    assert {s: v["clips"] for s, v in manifest["splits"].items()} == {"train": 2, "valid": 2, "test": 2}


def test_demo_is_deterministic_for_a_seed(tmp_path):
    parts = {"0": 2, "c": 1, "d": 1}
    a = demo.write_demo(str(tmp_path / "a"), seed=5, clips_per_part=parts, clip_samples=TINY_SAMPLES)
    b = demo.write_demo(str(tmp_path / "b"), seed=5, workers=2, clips_per_part=parts, clip_samples=TINY_SAMPLES)
    demo.write_demo(str(tmp_path / "c"), seed=6, clips_per_part=parts, clip_samples=TINY_SAMPLES)
    assert open(a, "rb").read() == open(b, "rb").read()
    for rel in ("0/demo-00001.wav", "c/demo-00003.wav"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
        assert (tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()


def test_demo_tags_vary_independently():
    tags = [demo.synthesize(np.random.default_rng([0, i]), 16000)[1] for i in range(300)]
    rates = {t: np.mean([t in s for s in tags]) for t in demo.TAGS}
    assert all(0.2 < r < 0.5 for r in rates.values()), rates
    pair = np.mean([("guitar" in s) and ("drums" in s) for s in tags])
    assert abs(pair - rates["guitar"] * rates["drums"]) < 0.06


def test_tiny_records_are_readable(tiny_records):
    from tagger.models import SubClips
    manifest = data.load_manifest(tiny_records)
    ds = data.dataset(tiny_records, "train", SubClips(10), 4, manifest, input_shape=(None, 10, TINY_SAMPLES // 10))
    waves, labels = next(iter(ds))
    assert waves.shape == (4, 10, TINY_SAMPLES // 10)
    assert labels.shape == (4, len(manifest["tags"]))
    assert -1.0 <= float(tf.reduce_min(waves)) and float(tf.reduce_max(waves)) < 1.0
    kept, _ = next(iter(data.dataset(tiny_records, "train", SubClips(10), 4, manifest, input_shape=(None, 10, 6000))))
    assert kept.shape == (4, 10, 6000)
    np.testing.assert_array_equal(kept.numpy(), waves.numpy()[..., :6000])


# ----------------------------------------------------------------------------------------------
# Artists, leakage, tag maps, --min-count, --tag-report

needs_real = pytest.mark.skipif(not os.path.exists(SHARED_ANNOTATIONS), reason="real annotations not here")
EXAMPLE_MAP = os.path.join(ROOT, "docs", "examples", "mtat_synonyms.tagmap")


@pytest.fixture(scope="module")
def real_release(tmp_path_factory):
    """The real annotations file alone (no audio), and its clips."""
    import gzip
    from tagger import mtat
    root = tmp_path_factory.mktemp("mtat")
    (root / "annotations_final.csv").write_bytes(gzip.decompress(open(SHARED_ANNOTATIONS, "rb").read()))
    return root, mtat.load_annotations(str(root / "annotations_final.csv"))


def _plan_run(release, out, capsys, *extra):
    """prepare --plan on the real annotations: (stdout, stderr); every mp3 is missing, so status 1."""
    status = prepare.main(["--source", "mtat", "--mtat-dir", str(release), "--out", str(out), "--plan", *extra])
    captured = capsys.readouterr()
    assert status == 1, captured.err
    return captured.out, captured.err


@needs_real
@pytest.mark.parametrize("split, shared, leaked", [("folder", 57, 3328), ("artist", 0, 0)])
def test_plan_reports_artist_leakage_and_writes_artists_tsv(real_release, tmp_path, capsys, split, shared, leaked):
    from tagger import artists, mtat
    root, (_, clips) = real_release
    out, _ = _plan_run(root, tmp_path / "plan", capsys, "--split", split)
    plan = [line.split("\t") for line in open(tmp_path / "plan" / "plan.tsv").read().splitlines()[1:]]
    test_clips = sum(s == "test" for s, _, _ in plan)
    assert f"Artist leakage: {shared} of 229 artists in more than one split" in out
    assert f"{leaked:,} of {test_clips:,} test clips by an artist also in train" in out
    by_artist = artists.read_artists(tmp_path / "plan")
    assert by_artist == {int(clip_id): mtat.artist(path) for _, clip_id, path in plan}
    assert len(by_artist) == len(clips) - len(mtat.CORRUPT_CLIPS)
    where = {}
    for s, clip_id, _ in plan:
        where.setdefault(by_artist[int(clip_id)], set()).add(s)
    assert sum(len(v) > 1 for v in where.values()) == shared


@needs_real
def test_tag_report_lists_the_four_synonym_pairs(real_release, tmp_path, capsys):
    """Each of the four pairs with its co-occurrence over the planned clips; male vocal / female vocal
    (alike by name, hardly ever together) not."""
    from tagger import mtat
    root, (_, clips) = real_release
    out, _ = _plan_run(root, tmp_path / "plan", capsys, "--tag-report")
    planned = [c for s in mtat.split_clips(clips, mtat.CANONICAL_TAGS).values() for c in s]
    for rare, common in [("classic", "classical"), ("woman", "female"), ("vocals", "vocal"), ("no vocals", "no vocal")]:
        a, b = (sum(t in c.labels for c in planned) for t in (rare, common))
        both = sum({rare, common} <= c.labels for c in planned)
        first, second = (rare, common) if a <= b else (common, rare)
        line = next((x for x in out.splitlines() if x.startswith(f"  {first} ~ {second} (by ")), None)
        assert line, (first, second, out)
        assert (f"{both:,} clips carry both, {both / min(a, b):.0%} of the {min(a, b):,} {first} clips and "
                f"{both / max(a, b):.0%} of the {max(a, b):,} {second} clips") in line
    assert "female vocal ~ male vocal" not in out and "male vocal ~ female vocal" not in out
    pairs = open(tmp_path / "plan" / "tag_pairs.tsv").read().splitlines()
    assert pairs[0].split("\t")[:3] == ["tag", "other", "found_by"] and 4 <= len(pairs) - 1 <= 20
    counts = {row.split("\t")[0]: row.split("\t")[1:] for row in open(tmp_path / "plan" / "tag_counts.tsv")}
    split = mtat.split_clips(clips, mtat.CANONICAL_TAGS)
    assert counts["choral"] == [str(sum("choral" in c.labels for c in split[s])) + ("\n" if s == "test" else "")
                                for s in mtat.SPLITS]


@needs_real
def test_tag_map_merges_before_the_tags_are_chosen_and_min_count_drops(real_release, tmp_path, capsys):
    from tagger import mtat
    root, (columns, clips) = real_release
    mapping = {"classic": "classical", "woman": "female", "vocals": "vocal", "no vocals": "no vocal"}
    merged = [{mapping.get(t, t) for t in c.labels} for c in clips]
    counts = {t: sum(t in labels for labels in merged) for t in {mapping.get(t, t) for t in columns}}
    top = sorted(counts, key=lambda t: -counts[t])[:50]
    folder = mtat.split_clips(clips, ())
    train = {c.clip_id for c in folder["train"]}
    train_counts = {t: sum(t in labels for c, labels in zip(clips, merged) if c.clip_id in train) for t in top}
    min_count = sorted(train_counts.values())[5]           # leaves out the 5 rarest in train (fewer on a tie)
    out, _ = _plan_run(root, tmp_path / "plan", capsys, "--tag-map", EXAMPLE_MAP, "--min-count", str(min_count),
                       "--tag-report")
    tags = json.load(open(tmp_path / "plan" / "tags.json"))
    assert not {"classic", "woman", "vocals", "no vocals"} & set(tags)
    assert set(tags) == {t for t in top if train_counts[t] >= min_count}
    assert [counts[t] for t in tags] == sorted((counts[t] for t in tags), reverse=True)   # count order, not MTAT's
    assert len(tags) < 50 and f"--min-count {min_count} left out {50 - len(tags)} tags" in out
    assert "Tag map" in out and "4 tags renamed or merged, 0 dropped" in out
    rows = {r.split("\t")[0]: r.split("\t")[1:] for r in open(tmp_path / "plan" / "tag_counts.tsv").read().splitlines()}
    classical = [sum(bool({"classic", "classical"} & c.labels) for c in folder[s]) for s in mtat.SPLITS]
    assert rows["classical"] == [str(n) for n in classical]                 # labels merged by OR


@needs_real
def test_a_tag_map_that_keeps_the_canonical_tags_still_chooses_by_count(real_release, tmp_path, capsys):
    """Six tags from outside the 50 merged into one that outnumbers the 50th: with a map the output tags
    are the top 50 by count, not MTAT's canonical list."""
    from tagger import mtat
    root, (columns, clips) = real_release
    counts = mtat.tag_counts(clips)
    outside = sorted((t for t in columns if t not in mtat.CANONICAL_TAGS), key=lambda t: -counts[t])[:6]
    (tmp_path / "six.map").write_text("".join(f"{t} -> merged six\n" for t in outside))
    _plan_run(root, tmp_path / "plan", capsys, "--tag-map", str(tmp_path / "six.map"))
    tags = json.load(open(tmp_path / "plan" / "tags.json"))
    merged = sum(bool(set(outside) & c.labels) for c in clips)
    assert merged > min(counts[t] for t in mtat.CANONICAL_TAGS)
    assert "merged six" in tags and tags != list(mtat.CANONICAL_TAGS)


def test_the_artist_split_warns_of_tags_it_cannot_fill(tmp_path, capsys):
    """Too few clips for 10 positives of each tag in valid and test: the proportions still hold and the
    short tags are named with their counts."""
    names = [f"{part}/band{i}-album-01-song-0-29.mp3" for i, part in enumerate("0123456789ab" * 3 + "ccc" + "def" * 3)]
    _release(tmp_path / "release", {n: b"x" for n in names})
    assert prepare.main(["--source", "mtat", "--mtat-dir", str(tmp_path / "release"), "--out", str(tmp_path / "plan"),
                         "--plan", "--split", "artist"]) == 0
    captured = capsys.readouterr()
    plan = [line.split("\t") for line in open(tmp_path / "plan" / "plan.tsv").read().splitlines()[1:]]
    assert [sum(s == split for s, _, _ in plan) for split in ("train", "valid", "test")] == [36, 3, 9]
    # _release tags clip i rock where i is odd, piano where i is a multiple of 3
    tagged = {"rock": lambda i: i % 2, "piano": lambda i: i % 3 == 0}
    count = {(tag, split): sum(s == split and bool(has(int(i))) for s, i, _ in plan)
             for tag, has in tagged.items() for split in ("valid", "test")}
    short = ", ".join(f"{t} (valid {count[t, 'valid']}, test {count[t, 'test']})" for t in tagged)
    assert f"the artist split leaves 2 tags with fewer than 10 positives in valid or test: {short}" in captured.err
    assert "Artist leakage: 0 of 48 artists" in captured.out


def test_a_bad_tag_map_exits_2_in_one_line_before_tensorflow(tmp_path):
    _release(tmp_path / "release", {"0/a.wav": b"", "c/b.wav": b"", "d/c.wav": b""})
    (tmp_path / "unknown.tagmap").write_text("rock -> stone\npaino -> keys\n")
    (tmp_path / "garbled.tagmap").write_text("# fine\nrock => stone\n")
    code = ("import sys\nfrom tagger import prepare\nstatus = prepare.main(sys.argv[1:])\n"
            "print(status, any(m.split('.')[0] == 'tensorflow' for m in sys.modules))")
    import subprocess
    import sys
    for name, words in [("unknown.tagmap", ["line 2", "'paino'", "annotations_final.csv (its tag columns)",
                                            "did you mean 'piano'"]),
                        ("garbled.tagmap", ["line 2", "old -> new"]), ("absent.tagmap", ["no tag map at"])]:
        for plan in ([], ["--plan"]):
            args = ["--source", "mtat", "--mtat-dir", tmp_path / "release", "--out", tmp_path / "out",
                    "--tag-map", tmp_path / name, *plan]
            done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                                  cwd=ROOT)
            assert done.stdout.split() == ["2", "False"], done.stderr
            assert len(done.stderr.strip().splitlines()) == 1 and all(w in done.stderr for w in words), done.stderr


def _songs(tmp_path, rows, header="path,tags,artist"):
    audio = tmp_path / "audio"
    audio.mkdir(exist_ok=True)
    for row in rows:
        _wav(audio / row.split(",")[0], np.random.default_rng(len(row)).integers(-9000, 9000, CLIP))
    (tmp_path / "songs.csv").write_text("\n".join([header] + rows) + "\n")
    return ["--source", "csv", "--csv", str(tmp_path / "songs.csv"), "--audio-root", str(audio),
            "--clip-seconds", str(CLIP_SECONDS), "--workers", "1"]


def test_csv_artists_keep_together_in_the_random_split(tmp_path, capsys):
    rows = [f"s{i}.wav,{'rock' if i % 3 else 'piano'},band {i % 40}" for i in range(160)]
    args = _songs(tmp_path, rows)
    assert prepare.main(args + ["--out", str(tmp_path / "plan"), "--plan", "--seed", "4"]) == 0
    from tagger import artists
    by_artist = artists.read_artists(tmp_path / "plan")
    assert by_artist == {i + 1: f"band {i % 40}" for i in range(160)}
    where = {}
    for line in open(tmp_path / "plan" / "plan.tsv").read().splitlines()[1:]:
        split, clip_id, _ = line.split("\t")
        where.setdefault(by_artist[int(clip_id)], set()).add(split)
    assert all(len(s) == 1 for s in where.values()) and len(set().union(*where.values())) > 1
    assert "Artist leakage: 0 of 40 artists" in capsys.readouterr().out
    # without the artist column, the row-by-row split of before; no artists.tsv, and leakage not known
    (tmp_path / "songs.csv").write_text("path,tags\n" + "".join(r.rsplit(",", 1)[0] + "\n" for r in rows))
    assert prepare.main(args + ["--out", str(tmp_path / "plan"), "--plan", "--seed", "4"]) == 0
    assert artists.read_artists(tmp_path / "plan") is None
    assert "Artist leakage: not known (the CSV has no artist column)" in capsys.readouterr().out


def test_manifest_records_leakage_and_the_map_and_a_resume_checks_them(tmp_path, capsys):
    rows = ["a.wav,rock;loud,x,train", "b.wav,rock,y,train", "c.wav,piano;rock,x,valid", "d.wav,rock;piano,z,test",
            "e.wav,piano,y,test"]
    args = _songs(tmp_path, rows, "path,tags,artist,split")
    (tmp_path / "stone.tagmap").write_text("rock -> stone\nloud ->\n")
    mapped = args + ["--out", str(tmp_path / "mapped"), "--tag-map", str(tmp_path / "stone.tagmap"), "--min-count", "2"]
    assert prepare.main(mapped) == 0
    manifest = json.load(open(tmp_path / "mapped" / "manifest.json"))
    assert manifest["tags"] == ["stone"]                     # piano: 0 in train, under --min-count 2
    assert manifest["tag_map"] == {"rock": "stone", "loud": None} and manifest["min_count"] == 2
    assert manifest["tags_dropped"] == ["piano"]
    stone = {s: sum("rock" in r.split(",")[1] for r in rows if r.endswith(s)) for s in ("valid", "test")}
    assert manifest["few_positives"] == {"minimum": 10, "tags": {"stone": stone}}
    assert manifest["leakage"] == {"artists": 3, "shared": 2, "shared_by_pair": {"train/valid": 1, "train/test": 1,
                                                                                 "valid/test": 0},
                                   "test_clips": 2, "test_clips_with_train_artist": 1}
    assert open(tmp_path / "mapped" / "artists.tsv").read() == "clip_id\tartist\n1\tx\n2\ty\n3\tx\n4\tz\n5\ty\n"
    (tmp_path / "other.tagmap").write_text("rock -> stone\n")
    assert prepare.main(mapped[:-4] + ["--tag-map", str(tmp_path / "other.tagmap"), "--min-count", "2"]) == 2
    assert "other settings (tag_map differ)" in capsys.readouterr().err
    assert prepare.main(mapped[:-2]) == 2                   # without --min-count: piano comes back too
    assert "other settings (tags, min_count differ)" in capsys.readouterr().err
    # without a split column the split is drawn, artist by artist: the seed is recorded, another one refused
    (tmp_path / "songs.csv").write_text("path,tags,artist\n" + "".join(r.rsplit(",", 1)[0] + "\n" for r in rows))
    plain = args + ["--out", str(tmp_path / "plain"), "--seed", "4"]
    assert prepare.main(plain) == 0
    settings = tmp_path / "plain" / "prepare_settings.json"
    recorded = json.load(open(settings))
    assert recorded["tag_map"] is None and recorded["min_count"] is None and recorded["seed"] == 4
    assert prepare.main(plain[:-1] + ["5"]) == 2
    assert "seed differ" in capsys.readouterr().err
    # a folder prepared before tag maps: its record has no tag_map, min_count or seed, and resumes
    settings.write_text(json.dumps({k: v for k, v in recorded.items() if k not in ("tag_map", "min_count", "seed")}))
    assert prepare.main(plain) == 0
    assert prepare.main(plain + ["--tag-map", str(tmp_path / "other.tagmap")]) == 2
    assert "tag_map differ" in capsys.readouterr().err
