"""Decoding audio files: mp3, wav, flac and ogg at any rate and channel count, to 16 kHz mono.

The only module that imports tensorflow_io. Nothing here goes into a model or a SavedModel: it
runs in the converter's worker processes and in `tagger.predict`, never on the accelerator.

Files are read in blocks (`stream`), mixed down and resampled block by block, so an hour-long
track never needs more than a block of audio in memory; `decode` joins the blocks of short files.
"""
import math
import os
import re

import numpy as np

from tagger.cli import quiet_tensorflow

SAMPLE_RATE = 16000
EXTENSIONS = (".mp3", ".wav", ".flac", ".ogg")
BLOCK_SECONDS = 30.0


class AudioError(Exception):
    """A file that cannot be used: missing, empty, not audio, corrupt or too short."""


class Stream:
    """An open audio file read in blocks of float32 mono samples at `sample_rate`.

    `len(stream)` is the number of output samples (known before reading: the container's frame
    count, resampled), `info` = {"rate", "channels"} of the file. Iterating yields the blocks in
    order; together they equal `scipy.signal.resample_poly` of the whole mixed-down file.
    Raises AudioError with a one-line reason, on opening or midway through a corrupt file.
    """

    def __init__(self, path, sample_rate=SAMPLE_RATE, block_seconds=BLOCK_SECONDS):
        quiet_tensorflow()
        self.path = path
        if not os.path.exists(path):
            raise AudioError("file not found")
        if os.path.getsize(path) == 0:
            raise AudioError("empty file")
        import tensorflow_io as tfio
        with _decoder_errors(path):
            self._audio = tfio.audio.AudioIOTensor(path)
            self.frames, channels = (int(d) for d in self._audio.shape.numpy())
            rate = int(self._audio.rate.numpy())
        if self.frames <= 0 or channels <= 0 or rate <= 0:
            raise AudioError("no audio samples")
        self.info = {"rate": rate, "channels": channels}
        g = math.gcd(rate, sample_rate)
        self._up, self._down = sample_rate // g, rate // g
        # resample_poly's filter reaches 10 * max(up, down) upsampled samples each side; `margin`
        # input samples of context (a multiple of `down`, so blocks stay on the output grid) make
        # each block's output exact.
        reach = 10 * max(self._up, self._down) / self._up
        self._margin = 0 if self._up == self._down else self._down * math.ceil((reach + 2) / self._down)
        self._block = self._down * max(1, round(block_seconds * rate / self._down))
        self.length = -(-self.frames * self._up // self._down)

    def __len__(self):
        return self.length

    def _read(self, start, stop):
        """Input samples [start, stop) mixed down to float32, validated."""
        with _decoder_errors(self.path):
            samples = self._audio[start:stop].numpy()
        if samples.ndim != 2 or samples.shape[0] != stop - start:
            raise AudioError(f"decoding stopped at {start / self.info['rate']:.1f} s of "
                             f"{self.frames / self.info['rate']:.1f} s (truncated or corrupt)")
        x = _to_float(samples).mean(axis=1)
        if not np.all(np.isfinite(x)):
            raise AudioError("decoded samples are not finite")
        return x

    def __iter__(self):
        from scipy.signal import resample_poly
        n, m, up, down = self.frames, self._margin, self._up, self._down
        buf, buf_start, read_to = np.zeros(0, np.float32), 0, 0
        for s in range(0, n, self._block):
            e = min(s + self._block, n)
            need = min(e + m, n)
            if need > read_to:
                buf = np.concatenate([buf, self._read(read_to, need)])
                read_to = need
            if up == down:
                y = buf[s - buf_start:e - buf_start]
            else:
                a = max(0, s - m)      # a multiple of `down`, like s and m
                y = resample_poly(buf[a - buf_start:], up, down)
                first = (s - a) * up // down
                y = y[first:first + -(-(e - s) * up // down)]
            yield np.clip(y, -1.0, 1.0).astype(np.float32)
            keep = max(0, e - m)
            buf, buf_start = buf[keep - buf_start:], keep


class _decoder_errors:
    """Turns tensorflow-io's errors about the file into AudioError("not decodable audio (reason)")."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        import tensorflow as tf
        # What tensorflow-io raises for a file it cannot read: unknown or unsupported format, corrupt
        # data, a file that ends early. Other errors (memory, a bug) are not about the file: they go up.
        unreadable = (tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError, tf.errors.DataLossError,
                      tf.errors.UnimplementedError, tf.errors.NotFoundError)
        if kind is not None and issubclass(kind, unreadable):
            text = re.sub(r"\{\{function_node [^}]*\}\}|\[Op:[^\]]*\]", "", getattr(error, "message", str(error)))
            text = text.replace(self.path, "").strip()
            reason = text.splitlines()[-1].strip(" :") if text else kind.__name__
            raise AudioError(f"not decodable audio ({reason[:120]})") from None
        return False


def decode(path, sample_rate=SAMPLE_RATE):
    """Decode a whole file to float32 mono in [-1, 1] at `sample_rate`.

    Returns (waveform, info) with info = {"rate": original rate, "channels": original channels}.
    Raises AudioError with a one-line reason. For long files iterate over `Stream` instead.
    """
    stream = Stream(path, sample_rate)
    return np.concatenate(list(stream)), stream.info


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


def load_clip(path, clip_samples, min_samples, offset=0.0, sample_rate=SAMPLE_RATE):
    """Decode one dataset clip to exactly `clip_samples` int16 samples, trimming or zero-padding.

    The clip starts `offset` seconds into the file, or earlier where the file ends before a whole clip
    from there (so it ends with the file); offset "middle" centres it. Only the blocks up to the
    clip's end are decoded. Returns (pcm, info) with info["padded"] the number of zeros added. Raises
    AudioError when the file is unusable or shorter than `min_samples`.
    """
    stream = Stream(path, sample_rate)
    if offset == "middle":
        start = max(0, (len(stream) - clip_samples) // 2)
    else:
        start = min(int(round(offset * sample_rate)), max(0, len(stream) - clip_samples))
    blocks, have = [], 0
    for block in stream:
        blocks.append(block)
        have += len(block)
        if have >= start + clip_samples:
            break
    x = np.concatenate(blocks)[start:start + clip_samples]
    if len(x) < min_samples:
        raise AudioError(f"too short: {len(x) / sample_rate:.2f} s, at least {min_samples / sample_rate:.2f} s "
                         "needed (--min-seconds)")
    pcm = to_int16(x)
    padded = clip_samples - len(pcm)
    if padded > 0:
        pcm = np.concatenate([pcm, np.zeros(padded, np.int16)])
    return pcm, {**stream.info, "padded": max(padded, 0)}
