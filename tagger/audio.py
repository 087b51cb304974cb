"""Decoding audio files: mp3, wav, flac and ogg at any rate and channel count, to 16 kHz mono.

The only module that imports tensorflow_io. Nothing here goes into a model or a SavedModel: it
runs in the converter's worker processes and in `tagger.predict`, never on the accelerator.
"""
import math
import os

import numpy as np

from tagger.cli import quiet_tensorflow

SAMPLE_RATE = 16000
EXTENSIONS = (".mp3", ".wav", ".flac", ".ogg")


class AudioError(Exception):
    """A file that cannot be used: missing, empty, not audio, corrupt or too short."""


def decode(path, sample_rate=SAMPLE_RATE):
    """Decode a whole file to float32 mono in [-1, 1] at `sample_rate`.

    Returns (waveform, info) with info = {"rate": original rate, "channels": original channels}.
    Raises AudioError with a one-line reason.
    """
    quiet_tensorflow()
    if not os.path.exists(path):
        raise AudioError("file not found")
    if os.path.getsize(path) == 0:
        raise AudioError("empty file")
    import tensorflow as tf
    import tensorflow_io as tfio
    try:
        audio = tfio.audio.AudioIOTensor(path)
        rate = int(audio.rate.numpy())
        samples = audio.to_tensor().numpy()
    except (tf.errors.OpError, ValueError, RuntimeError) as e:
        reason = getattr(e, "message", str(e)).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise AudioError(f"not decodable audio ({reason[:120]})") from None
    if samples.ndim != 2 or samples.shape[0] == 0 or rate <= 0:
        raise AudioError("no audio samples")
    x = _to_float(samples).mean(axis=1)
    if not np.all(np.isfinite(x)):
        raise AudioError("decoded samples are not finite")
    if rate != sample_rate:
        from scipy.signal import resample_poly
        g = math.gcd(rate, sample_rate)
        x = resample_poly(x, sample_rate // g, rate // g).astype(np.float32)
    return np.clip(x, -1.0, 1.0).astype(np.float32), {"rate": rate, "channels": int(samples.shape[1])}


def _to_float(samples):
    if samples.dtype == np.int16:
        return samples.astype(np.float32) / 32768.0
    if samples.dtype == np.int32:
        return samples.astype(np.float32) / 2147483648.0
    if samples.dtype == np.uint8:
        return (samples.astype(np.float32) - 128.0) / 128.0
    return samples.astype(np.float32)


def to_int16(x):
    """float in [-1, 1] -> int16 PCM (x * 32768, rounded and clipped): the inverse of data.py's scaling."""
    return np.clip(np.round(np.asarray(x, np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def load_clip(path, clip_samples, min_samples, sample_rate=SAMPLE_RATE):
    """Decode one dataset clip to exactly `clip_samples` int16 samples, trimming or zero-padding.

    Returns (pcm, info) with info["padded"] the number of zeros added. Raises AudioError when the
    file is unusable or shorter than `min_samples`.
    """
    x, info = decode(path, sample_rate)
    if len(x) < min_samples:
        raise AudioError(f"too short: {len(x) / sample_rate:.2f} s, at least {min_samples / sample_rate:.2f} s "
                         "needed (--min-seconds)")
    pcm = to_int16(x[:clip_samples])
    padded = clip_samples - len(pcm)
    if padded > 0:
        pcm = np.concatenate([pcm, np.zeros(padded, np.int16)])
    return pcm, {**info, "padded": max(padded, 0)}
