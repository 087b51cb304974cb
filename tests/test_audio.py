"""Block-wise decoding: the blocks of any file equal scipy's resampling of the whole file, and the
predict windows cut from the blocks equal the windows cut from the whole track."""
import math
import os
import wave

import numpy as np
import pytest
from scipy.signal import resample_poly

from tagger.audio import AudioError, Stream
from tagger.export import window_starts
from tagger.predict import track_windows


def _noise_wav(path, seconds, rate, channels, seed=0):
    pcm = np.random.default_rng(seed).integers(-20000, 20000, (int(seconds * rate), channels)).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return pcm.astype(np.float64) / 32768


@pytest.mark.parametrize("rate, channels, block_seconds", [(44100, 2, 0.37), (22050, 1, 1.0), (16000, 2, 0.5),
                                                           (48000, 1, 3.0)])
def test_blocks_equal_resampling_the_whole_file(tmp_path, rate, channels, block_seconds):
    pcm = _noise_wav(tmp_path / "n.wav", 4.3, rate, channels)
    g = math.gcd(rate, 16000)
    reference = np.clip(resample_poly(pcm.mean(axis=1), 16000 // g, rate // g), -1, 1)
    stream = Stream(str(tmp_path / "n.wav"), block_seconds=block_seconds)
    blocks = list(stream)
    assert len(blocks) == math.ceil(4.3 / block_seconds - 1e-9) and len(stream) == len(reference)
    np.testing.assert_allclose(np.concatenate(blocks), reference, atol=2e-6)
    assert stream.info == {"rate": rate, "channels": channels}


@pytest.mark.parametrize("fmt", ["MP3", "OGG"])
def test_compressed_blocks_equal_the_whole_decode(tmp_path, fmt):
    import soundfile
    import tensorflow_io as tfio
    path = str(tmp_path / f"n.{fmt.lower()}")
    x = np.random.default_rng(2).uniform(-0.5, 0.5, (3 * 44100, 2))
    soundfile.write(path, x, 44100, format=fmt)
    whole = tfio.audio.AudioIOTensor(path).to_tensor().numpy().mean(axis=1)
    reference = np.clip(resample_poly(whole, 160, 441), -1, 1)
    blocks = list(Stream(path, block_seconds=0.2))
    assert len(blocks) == 15
    np.testing.assert_allclose(np.concatenate(blocks), reference, atol=2e-6)


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


def test_unreadable_files_raise_one_line_reasons(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "junk.ogg").write_bytes(os.urandom(5000))
    for name, reason in (("missing.wav", "file not found"), ("empty.wav", "empty file"), ("junk.ogg", "not decodable")):
        with pytest.raises(AudioError, match=reason) as e:
            list(Stream(str(tmp_path / name)))
        assert "\n" not in str(e.value)
