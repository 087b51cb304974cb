"""Block-wise decoding with either decoder: the blocks of any file equal scipy's resampling of the whole
file, the two decoders give the same samples (mp3 within half a 16-bit step), and the predict windows
cut from the blocks equal the windows cut from the whole track."""
import math
import os
import wave

import numpy as np
import pytest
from scipy.signal import resample_poly

from conftest import DECODERS, ROOT, needs_tfio
from tagger import audio
from tagger.audio import AudioError, Stream
from tagger.export import window_starts
from tagger.predict import track_windows

FIXTURE_MP3 = os.path.join(ROOT, "tests", "fixtures", "tone.mp3")
HALF_A_16_BIT_STEP = 0.5 / 32768


def _noise_wav(path, seconds, rate, channels, seed=0):
    pcm = np.random.default_rng(seed).integers(-20000, 20000, (int(seconds * rate), channels)).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return pcm.astype(np.float64) / 32768


def _raw(path, decoder):
    """The whole file as the decoder's reader gives it: float32, (frames, channels)."""
    reader = audio.READERS[decoder](str(path))
    try:
        return audio._to_float(reader.read(0, reader.frames))
    finally:
        reader.close()


def _without_info_frame(src, dst):
    """An mp3 without its Xing/Info frame (the first MPEG frame, which LAME fills with the stream's length
    and gapless padding), as older encoders write them. Returns the MPEG frames left and samples per frame."""
    data = open(src, "rb").read()
    frames, at, first = [], 0, None
    while at + 4 <= len(data):
        h = int.from_bytes(data[at:at + 4], "big")
        if h >> 21 != 0x7FF:
            break
        version, bitrate, rate, padding = (h >> 19) & 3, (h >> 12) & 15, (h >> 10) & 3, (h >> 9) & 1
        mpeg1 = version == 3
        kbps = ([0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320] if mpeg1 else
                [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160])[bitrate]
        hz = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}[version][rate]
        size = (144 if mpeg1 else 72) * kbps * 1000 // hz + padding
        first = first if first is not None else (at, size)
        frames.append(1152 if mpeg1 else 576)
        at += size
    assert first[0] == 0 and (b"Info" in data[:first[1]] or b"Xing" in data[:first[1]])
    open(dst, "wb").write(data[first[1]:])
    return len(frames) - 1, frames[0]


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("rate, channels, block_seconds", [(44100, 2, 0.37), (22050, 1, 1.0), (16000, 2, 0.5),
                                                           (48000, 1, 3.0)])
def test_blocks_equal_resampling_the_whole_file(tmp_path, rate, channels, block_seconds, decoder):
    pcm = _noise_wav(tmp_path / "n.wav", 4.3, rate, channels)
    g = math.gcd(rate, 16000)
    reference = np.clip(resample_poly(pcm.mean(axis=1), 16000 // g, rate // g), -1, 1)
    stream = Stream(str(tmp_path / "n.wav"), block_seconds=block_seconds, decoder=decoder)
    blocks = list(stream)
    assert len(blocks) == math.ceil(4.3 / block_seconds - 1e-9) and len(stream) == len(reference)
    np.testing.assert_allclose(np.concatenate(blocks), reference, atol=2e-6)
    assert stream.info == {"rate": rate, "channels": channels}


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("fmt", ["MP3", "OGG", "FLAC"])
def test_compressed_blocks_equal_the_whole_decode(tmp_path, fmt, decoder):
    import soundfile
    path = str(tmp_path / f"n.{fmt.lower()}")
    x = np.random.default_rng(2).uniform(-0.5, 0.5, (3 * 44100, 2))
    soundfile.write(path, x, 44100, format=fmt)
    reference = np.clip(resample_poly(_raw(path, decoder).mean(axis=1), 160, 441), -1, 1)
    blocks = list(Stream(path, block_seconds=0.2, decoder=decoder))
    assert len(blocks) == 15
    np.testing.assert_allclose(np.concatenate(blocks), reference, atol=2e-6)


@needs_tfio
@pytest.mark.parametrize("fmt, subtype", [("WAV", "PCM_16"), ("WAV", "PCM_24"), ("WAV", "FLOAT"), ("FLAC", "PCM_16"),
                                          ("FLAC", "PCM_24"), ("OGG", "VORBIS")])
def test_both_decoders_give_the_same_samples(tmp_path, fmt, subtype):
    """wav, flac and ogg: the same samples to float32 rounding (wav and flac exactly; ogg's two builds of
    libvorbis round differently: measured 1.8e-7, under two units in the last place at full scale)."""
    import soundfile
    path = str(tmp_path / f"x.{fmt.lower()}")
    t = np.arange(int(2.5 * 22050)) / 22050
    x = np.stack([0.4 * np.sin(2 * np.pi * 440 * t), 0.3 * np.random.default_rng(0).uniform(-1, 1, len(t))], 1)
    soundfile.write(path, x, 22050, format=fmt, subtype=subtype)
    a, b = _raw(path, "tfio"), _raw(path, "soundfile")
    assert a.shape == b.shape == x.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=0 if fmt != "OGG" else 2 ** -22)
    np.testing.assert_allclose(np.concatenate(list(Stream(path, decoder="tfio"))),
                               np.concatenate(list(Stream(path, decoder="soundfile"))), rtol=0, atol=2 ** -22)


@needs_tfio
@pytest.mark.parametrize("source", ["fixture", "stereo44k"])
def test_mp3_decoders_agree_within_half_a_16_bit_step(tmp_path, source):
    """libmpg123 (soundfile) and tensorflow-io's mp3 decoder: the same length (gapless, with the LAME
    header; every frame without it) and samples within half a step of 16-bit PCM (measured: under 1e-6)."""
    import soundfile
    path = str(tmp_path / "x.mp3")
    if source == "fixture":
        path = FIXTURE_MP3
    else:
        t = np.arange(int(7.3 * 44100)) / 44100
        soundfile.write(path, np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 660 * t)], 1),
                        44100, format="MP3")
    _without_info_frame(path, tmp_path / "bare.mp3")
    for p in (path, str(tmp_path / "bare.mp3")):
        a, b = _raw(p, "tfio"), _raw(p, "soundfile")
        assert a.shape == b.shape, p
        assert np.abs(a - b).max() <= HALF_A_16_BIT_STEP, (p, np.abs(a - b).max())


@pytest.mark.parametrize("decoder", DECODERS)
def test_an_mp3_without_its_info_frame_is_read_to_its_end(tmp_path, decoder):
    """Without the Xing/Info frame libsndfile guesses the length short (libsndfile #1001) and stops there;
    the soundfile decoder reads it through a pipe instead: every MPEG frame's samples."""
    import soundfile
    frames, per_frame = _without_info_frame(FIXTURE_MP3, tmp_path / "bare.mp3")
    assert soundfile.SoundFile(str(tmp_path / "bare.mp3")).frames < frames * per_frame     # the guess
    stream = Stream(str(tmp_path / "bare.mp3"), decoder=decoder)
    assert stream.frames == frames * per_frame
    assert sum(len(b) for b in stream) == len(stream) == frames * per_frame


@pytest.mark.parametrize("length, clip, hop, block", [(100, 30, 30, 7), (100, 30, 12, 41), (20, 30, 30, 8),
                                                      (95, 30, 25, 200), (61, 30, 30, 1)])
def test_track_windows_equal_slices_of_the_whole_track(length, clip, hop, block):
    x = np.random.default_rng(1).standard_normal(length).astype(np.float32)
    starts = window_starts(length, clip, hop)
    got = list(track_windows((x[i:i + block] for i in range(0, length, block)), length, clip, starts))
    whole = np.pad(x, (0, max(0, clip - length)))
    assert len(got) == len(starts)
    for s, w in zip(starts, got):
        np.testing.assert_array_equal(w, whole[s:s + clip])


@pytest.mark.parametrize("decoder", DECODERS)
def test_unreadable_files_raise_one_line_reasons(tmp_path, decoder):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "junk.ogg").write_bytes(os.urandom(5000))
    (tmp_path / "text.mp3").write_bytes(b"not audio at all\n" * 300)
    _noise_wav(tmp_path / "whole.wav", 2.0, 16000, 1)
    (tmp_path / "cut.wav").write_bytes((tmp_path / "whole.wav").read_bytes()[:30])
    for name, reason in (("missing.wav", "file not found"), ("empty.wav", "empty file"), ("junk.ogg", "not decodable"),
                         ("text.mp3", "not decodable"), ("cut.wav", "not decodable|no audio samples")):
        with pytest.raises(AudioError, match=reason) as e:
            list(Stream(str(tmp_path / name), decoder=decoder))
        assert "\n" not in str(e.value)


def test_decoder_choice(monkeypatch):
    """auto is tensorflow-io where it loads, else soundfile; forcing tfio where it does not load, or an
    unknown $TAGGER_DECODER, is a usage error."""
    from tagger.cli import UsageError
    loads = audio.tfio_problem() is None
    assert audio.resolve_decoder("auto") == ("tfio" if loads else "soundfile")
    assert audio.resolve_decoder("soundfile") == "soundfile"
    if loads:
        assert audio.resolve_decoder("tfio") == "tfio"
    else:
        with pytest.raises(UsageError, match="use --decoder soundfile"):
            audio.resolve_decoder("tfio")
    monkeypatch.setenv("TAGGER_DECODER", "soundfile")
    assert audio.resolve_decoder() == "soundfile"
    monkeypatch.setenv("TAGGER_DECODER", "ffmpeg")
    with pytest.raises(UsageError, match="TAGGER_DECODER=ffmpeg: choose one of auto, tfio, soundfile"):
        audio.resolve_decoder()
    info = audio.decoder_info("soundfile")
    assert info["name"] == "soundfile" and info["version"] and info["libsndfile"]


def test_only_the_files_problems_become_one_line_reasons(tmp_path):
    """Each decoder's errors about the file become AudioError("not decodable audio (reason)"); others
    (memory, a bug) go up as they are."""
    import soundfile
    import tensorflow as tf
    path = str(tmp_path / "x.mp3")
    with pytest.raises(AudioError, match=r"^not decodable audio \(bad header\)$"):
        with audio._tfio_errors(path):
            raise tf.errors.InvalidArgumentError(None, None, f"{path}: bad header")
    with pytest.raises(tf.errors.ResourceExhaustedError):
        with audio._tfio_errors(path):
            raise tf.errors.ResourceExhaustedError(None, None, "out of memory")
    (tmp_path / "x.ogg").write_bytes(b"OggS" + bytes(200))
    with pytest.raises(AudioError, match=r"^not decodable audio \(File contains data in an unimplemented format\)$"):
        with audio._soundfile_errors(str(tmp_path / "x.ogg")):
            soundfile.SoundFile(str(tmp_path / "x.ogg"))
    for mapper in (audio._tfio_errors, audio._soundfile_errors):
        with pytest.raises(ValueError):
            with mapper(path):
                raise ValueError("a bug")
