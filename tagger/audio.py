"""Decoding audio files: mp3, wav, flac and ogg at any rate and channel count, to 16 kHz mono.

Two decoders behind one interface: tensorflow-io (`tfio`) and libsndfile through `soundfile`. The
default, `auto`, is tensorflow-io where it imports and loads (its last release, 0.37.1, works up to
TensorFlow 2.16), else soundfile; `TAGGER_DECODER=tfio|soundfile` or a command's `--decoder` forces
one. wav, flac and ogg decode to the same samples either way (to float32 rounding); mp3 decoders differ
by about 1e-6 (docs/performance.md, Decoders). The only module that imports tensorflow_io. Nothing
here goes into a model or a SavedModel: it runs in the converter's worker processes and in
`tagger.predict`, never on the accelerator.

Files are read in blocks (`Stream`), mixed down and resampled block by block, so an hour-long
track never needs more than a block of audio in memory; `decode` joins the blocks of short files.
"""
import functools
import math
import os
import re
import threading

import numpy as np

from tagger.cli import UsageError, quiet_tensorflow

SAMPLE_RATE = 16000
EXTENSIONS = (".mp3", ".wav", ".flac", ".ogg")
BLOCK_SECONDS = 30.0
DECODERS = ("auto", "tfio", "soundfile")
DECODER_ENV = "TAGGER_DECODER"
NAMES = {"tfio": "tensorflow-io", "soundfile": "soundfile"}


class AudioError(Exception):
    """A file that cannot be used: missing, empty, not audio, corrupt or too short."""


# ----------------------------------------------------------------------------------------------
# Choosing a decoder

def requested_decoder():
    """The decoder asked for: $TAGGER_DECODER, else auto. A value outside DECODERS is a usage error."""
    name = os.environ.get(DECODER_ENV) or "auto"
    if name not in DECODERS:
        raise UsageError(f"{DECODER_ENV}={name}: choose one of {', '.join(DECODERS)}")
    return name


def add_decoder_flag(parser):
    parser.add_argument("--decoder", choices=DECODERS, default=None,
                        help=f"audio decoder: tfio (tensorflow-io), soundfile (libsndfile), or auto: tfio where "
                        f"it loads, else soundfile (default: ${DECODER_ENV}, else auto)")


def check_decoder_flag(parser, args):
    """Fill in args.decoder from --decoder, else $TAGGER_DECODER, else auto; a bad value is a usage error."""
    try:
        args.decoder = args.decoder or requested_decoder()
    except UsageError as e:
        parser.error(str(e))


@functools.lru_cache(maxsize=None)
def tfio_problem():
    """None when tensorflow-io imports and its audio kernels load here, else the reason in a few words."""
    quiet_tensorflow()
    try:
        import tensorflow_io
        from tensorflow_io.python.ops import core_ops
        core_ops.io_audio_readable_init     # loads the kernel library: undefined symbols show here
        return None if tensorflow_io.__version__ else "no version"
    except Exception as e:        # noqa: BLE001 - any failure to load means: not usable here
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[-1][:160] if text else ''}"


def resolve_decoder(name=None):
    """'tfio' or 'soundfile' for a requested name (None: $TAGGER_DECODER, else auto). Forcing tfio where
    it does not load is a usage error naming the way out."""
    name = name or requested_decoder()
    if name == "auto":
        return "tfio" if tfio_problem() is None else "soundfile"
    if name == "tfio" and tfio_problem() is not None:
        raise UsageError(f"the tfio decoder cannot be used here: tensorflow-io does not load ({tfio_problem()}); "
                         "use --decoder soundfile (or auto)")
    return name


def decoder_info(name):
    """{"name", "version"} of a resolved decoder, as manifests and run configs record it."""
    if name == "tfio":
        import tensorflow_io
        return {"name": NAMES[name], "version": tensorflow_io.__version__}
    import soundfile
    return {"name": NAMES[name], "version": soundfile.__version__, "libsndfile": soundfile.__libsndfile_version__}


# ----------------------------------------------------------------------------------------------
# Readers: one open file, read in order as (frames, channels) arrays of any numeric type

class _TfioReader:
    def __init__(self, path):
        quiet_tensorflow()
        import tensorflow_io as tfio
        self.path = path
        with _tfio_errors(path):
            self._audio = tfio.audio.AudioIOTensor(path)
            self.frames, self.channels = (int(d) for d in self._audio.shape.numpy())
            self.rate = int(self._audio.rate.numpy())

    def read(self, start, stop):
        with _tfio_errors(self.path):
            return self._audio[start:stop].numpy()

    def close(self):
        pass


class _tfio_errors:
    """Turns tensorflow-io's errors about the file into AudioError("not decodable audio (reason)")."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        import tensorflow as tf
        # What tensorflow-io raises for a file it cannot read: unknown or unsupported format, corrupt
        # data, a file that ends early. Other errors (memory, a bug) are not about the file: they go up.
        unreadable = (tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError, tf.errors.DataLossError,
                      tf.errors.UnimplementedError, tf.errors.NotFoundError)
        if kind is not None and issubclass(kind, unreadable):
            text = re.sub(r"\{\{function_node [^}]*\}\}|\[Op:[^\]]*\]", "", getattr(error, "message", str(error)))
            raise AudioError(f"not decodable audio ({_last_line(text, self.path, kind)})") from None
        return False


class _SoundfileReader:
    """libsndfile through soundfile, read in order. libsndfile trusts an mp3's Xing/Info header for its
    length and, without one, estimates it from the first frames and stops reading there (libsndfile
    issue #1001: a 7 s VBR file read as 3 s). Read through a pipe, it reads to the stream's end: an mp3
    without the header is counted that way first, then decoded through a second pipe."""

    COUNT_MAX = 2 ** 63 - 1

    def __init__(self, path):
        import soundfile
        self.path, self._file = path, None
        try:
            with _soundfile_errors(path):
                self._file = soundfile.SoundFile(path)
                self.rate, self.channels, self.frames = self._file.samplerate, self._file.channels, self._file.frames
                if self._file.format == "MP3" and self._headerless():
                    self._file.close()
                    self.frames = self._count(self._open_pipe())
                    self._file = self._open_pipe()
                elif self.frames >= self.COUNT_MAX:    # a length libsndfile does not know (an ogg without EOS)
                    self._file.close()
                    self.frames = self._count(soundfile.SoundFile(path))
                    self._file = soundfile.SoundFile(path)
                else:
                    self.frames = max(self.frames, self._claimed_frames())
        except BaseException:
            self.close()
            raise
        self._position = 0

    def _claimed_frames(self):
        """The frames a WAV header claims where the file holds fewer (cut short): libsndfile quietly reads
        what is there and notes it in its log; claimed, the read stops short and the file fails as with
        tensorflow-io (decoding stopped at ...)."""
        log = self._file.extra_info
        data = re.search(r"^data\s*:\s*(\d+) \(should be \d+\)", log, re.M)
        align = re.search(r"Block Align\s*:\s*(\d+)", log)
        return int(data.group(1)) // int(align.group(1)) if data and align and int(align.group(1)) else 0

    def _open_pipe(self):
        """The file through a pipe fed by a thread: libsndfile then reads to the end of the stream. The
        thread ends when the file is read, or when the reader closes its end (a broken pipe)."""
        import soundfile
        read_end, write_end = os.pipe()

        def feed():
            try:
                with os.fdopen(write_end, "wb") as sink, open(self.path, "rb") as source:
                    for chunk in iter(lambda: source.read(1 << 16), b""):
                        sink.write(chunk)
            except (OSError, ValueError):      # the reader closed its end, or the file went away
                pass
        threading.Thread(target=feed, daemon=True, name="tagger-pipe").start()
        # libsndfile owns the read end from here on, and closes it also when it cannot open the stream.
        return soundfile.SoundFile(read_end, closefd=True)

    def _headerless(self):
        probe = self._open_pipe()
        try:
            return probe.frames >= self.COUNT_MAX
        finally:
            probe.close()

    def _count(self, f):
        buf = np.empty((1 << 16, self.channels), np.float32)
        total = 0
        try:
            while True:
                n = len(f.read(out=buf))
                if not n:
                    return total
                total += n
        finally:
            f.close()

    def read(self, start, stop):
        if start != self._position:
            raise ValueError(f"_SoundfileReader reads in order: asked for {start}, at {self._position}")
        buf = np.empty((stop - start, self.channels), np.float32)
        with _soundfile_errors(self.path):
            got = self._file.read(out=buf)
        self._position += len(got)
        return got

    def close(self):
        if self._file is not None:
            self._file.close()


class _soundfile_errors(_tfio_errors):
    """Turns libsndfile's errors about the file into AudioError("not decodable audio (reason)")."""

    def __exit__(self, kind, error, traceback):
        import soundfile
        if kind is not None and issubclass(kind, soundfile.LibsndfileError):
            text = getattr(error, "error_string", None) or str(error)
            raise AudioError(f"not decodable audio ({_last_line(text, self.path, kind)})") from None
        return False


def _last_line(text, path, kind):
    text = text.replace(path, "").strip()
    return (text.splitlines()[-1].strip(" :.") if text else kind.__name__)[:120]


READERS = {"tfio": _TfioReader, "soundfile": _SoundfileReader}


# ----------------------------------------------------------------------------------------------
# Streams

class Stream:
    """An open audio file read in blocks of float32 mono samples at `sample_rate`.

    `len(stream)` is the number of output samples (known before reading: the container's frame
    count, resampled), `info` = {"rate", "channels"} of the file. Iterating yields the blocks in
    order; together they equal `scipy.signal.resample_poly` of the whole mixed-down file.
    `decoder`: "tfio", "soundfile" or "auto"/None (resolve_decoder). Raises AudioError with a one-line
    reason, on opening or midway through a corrupt file.
    """

    def __init__(self, path, sample_rate=SAMPLE_RATE, block_seconds=BLOCK_SECONDS, decoder=None):
        self.path = path
        if not os.path.exists(path):
            raise AudioError("file not found")
        if os.path.getsize(path) == 0:
            raise AudioError("empty file")
        self._reader = READERS[resolve_decoder(decoder)](path)
        self.frames, channels, rate = self._reader.frames, self._reader.channels, self._reader.rate
        if self.frames <= 0 or channels <= 0 or rate <= 0:
            self._reader.close()
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
        samples = self._reader.read(start, stop)
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
        try:
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
        finally:
            self._reader.close()


def decode(path, sample_rate=SAMPLE_RATE, decoder=None):
    """Decode a whole file to float32 mono in [-1, 1] at `sample_rate`.

    Returns (waveform, info) with info = {"rate": original rate, "channels": original channels}.
    Raises AudioError with a one-line reason. For long files iterate over `Stream` instead.
    """
    stream = Stream(path, sample_rate, decoder=decoder)
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


def load_clip(path, clip_samples, min_samples, offset=0.0, decoder=None, sample_rate=SAMPLE_RATE):
    """Decode one dataset clip to exactly `clip_samples` int16 samples, trimming or zero-padding.

    The clip starts `offset` seconds into the file, or earlier where the file ends before a whole clip
    from there (so it ends with the file); offset "middle" centres it. Only the blocks up to the
    clip's end are decoded. Returns (pcm, info) with info["padded"] the number of zeros added. Raises
    AudioError when the file is unusable or shorter than `min_samples`.
    """
    stream = Stream(path, sample_rate, decoder=decoder)
    if offset == "middle":
        start = max(0, (len(stream) - clip_samples) // 2)
    else:
        start = min(int(round(offset * sample_rate)), max(0, len(stream) - clip_samples))
    blocks, have = [], 0
    blocks_of = iter(stream)
    for block in blocks_of:
        blocks.append(block)
        have += len(block)
        if have >= start + clip_samples:
            blocks_of.close()          # the file is closed now, not when collected
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
