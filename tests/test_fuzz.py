"""Fuzzing the converter: an MTAT-layout release whose annotations list 50 damaged audio files (random
bytes, truncated headers, zero length, a valid header over a garbage body, the wrong extension) among
good ones. prepare never crashes, converts every good file and lists every damaged one."""
import json

import numpy as np
import pytest
import soundfile

from conftest import DECODERS
from tagger import prepare

FORMATS = {"wav": "WAV", "flac": "FLAC", "ogg": "OGG", "mp3": "MP3"}
SECONDS = 2.0


def _good_bytes(tmp_path, ext, seed):
    rng = np.random.default_rng(seed)
    rate = (16000, 22050, 44100)[seed % 3]
    t = np.arange(int(SECONDS * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 800) * t) + 0.02 * rng.standard_normal(len(t))
    path = tmp_path / f"good-{seed}.{ext}"
    soundfile.write(str(path), x, rate, format=FORMATS[ext])
    return path.read_bytes()


def _damaged(kind, ext, good, rng):
    if kind == "random":
        return rng.bytes(int(rng.integers(1, 20000)))
    if kind == "truncated-header":
        return good[:int(rng.integers(2, 40))]
    if kind == "empty":
        return b""
    if kind == "garbage-body":          # the real header, then noise instead of the coded audio
        return good[:int(rng.integers(44, 120))] + rng.bytes(int(rng.integers(200, 5000)))
    if kind == "wrong-extension":       # something else with an audio name
        return rng.choice([b"\x89PNG\r\n\x1a\n" + rng.bytes(3000), b'{"not": "audio"}\n' * 50,
                           b"ID3" + rng.bytes(500), "clip_id\tmp3_path\n".encode() * 100])
    raise ValueError(kind)


@pytest.mark.parametrize("decoder", DECODERS)
def test_fifty_damaged_files_among_good_ones(tmp_path, decoder):
    rng = np.random.default_rng(7)
    release, out = tmp_path / "release", tmp_path / "out"
    exts = list(FORMATS)
    good_bytes = {ext: _good_bytes(tmp_path, ext, i) for i, ext in enumerate(exts)}
    entries = []          # (relative path, content, damaged?)
    for i in range(16):
        ext = exts[i % 4]
        entries.append((f"{'0123456789abcdef'[i]}/good-{i}.{ext}", _good_bytes(tmp_path, ext, 10 + i), False))
    kinds = ["random", "truncated-header", "empty", "garbage-body", "wrong-extension"]
    for i in range(50):
        kind, ext = kinds[i % 5], exts[(i // 5) % 4]
        part = "0123456789abcdef"[i % 16]
        entries.append((f"{part}/damaged-{i:02d}-{kind}.{ext}", _damaged(kind, ext, good_bytes[ext], rng), True))
    rows = ['"clip_id"\t"rock"\t"piano"\t"mp3_path"']
    for i, (rel, content, _) in enumerate(entries, 1):
        (release / rel).parent.mkdir(parents=True, exist_ok=True)
        (release / rel).write_bytes(content)
        rows.append(f'"{i}"\t"{i % 2}"\t"{int(i % 3 == 0)}"\t"{rel}"')
    (release / "annotations_final.csv").write_text("\r\n".join(rows) + "\r\n")

    status = prepare.main(["--source", "mtat", "--mtat-dir", str(release), "--out", str(out),
                           "--clip-seconds", str(SECONDS), "--workers", "2", "--decoder", decoder])
    assert status == 0
    manifest = json.loads((out / "manifest.json").read_text())
    converted = sum(s["clips"] for s in manifest["splits"].values())
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {rel for rel, _, damaged in entries if damaged}
    assert converted == 16 and all(reason and "\n" not in reason for reason in skipped.values())
    assert not any("function_node" in reason or "[Op:" in reason for reason in skipped.values())   # readable
