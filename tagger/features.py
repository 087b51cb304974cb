"""The audio front end as Keras layers: polyphase resampling and a librosa-exact log-mel spectrogram.

Both layers are pure TensorFlow at call time (their constants are built with numpy once, at
construction), so they run on the accelerator inside the model and travel with a SavedModel that
loads without tagger, numpy tricks or tensorflow-io.
"""
import math

import keras
import numpy as np
import tensorflow as tf


def kaiser_lowpass(num_taps, cutoff, beta=5.0):
    """`scipy.signal.firwin(num_taps, cutoff, window=('kaiser', beta))`, cutoff relative to Nyquist."""
    m = np.arange(num_taps) - (num_taps - 1) / 2.0
    h = cutoff * np.sinc(cutoff * m) * np.kaiser(num_taps, beta)
    return h / h.sum()  # unit gain at DC, as firwin's scale=True


def polyphase_kernel(up, down):
    """The filter of `scipy.signal.resample_poly(x, up, down)` laid out as one strided convolution.

    Returns (kernel [width, up], n_pre_remove, taps_per_phase): output phase r of the upsampled-and-
    filtered signal is the correlation of x, left-padded by `taps_per_phase - 1` zeros, with
    `kernel[:, r]` at stride `down`; interleaving the phases and dropping the first `n_pre_remove`
    samples gives scipy's output.
    """
    max_rate = max(up, down)
    half_len = 10 * max_rate
    h = kaiser_lowpass(2 * half_len + 1, 1.0 / max_rate) * up
    n_pre_pad = down - half_len % down
    n_pre_remove = (half_len + n_pre_pad) // down
    h = np.concatenate([np.zeros(n_pre_pad), h])
    taps_per_phase = -(-len(h) // up)
    h = np.concatenate([h, np.zeros(taps_per_phase * up - len(h))])
    shifts = [(down * r) // up for r in range(up)]
    width = taps_per_phase + max(shifts)
    kernel = np.zeros((width, up))
    for r in range(up):
        phase = h[(down * r) % up::up][:taps_per_phase]
        # y_r[q] = sum_j phase[j] * x[down*q + shift - j]: a correlation with the reversed phase.
        kernel[shifts[r]:shifts[r] + taps_per_phase, r] = phase[::-1]
    return kernel, n_pre_remove, taps_per_phase


def block_matrices(kernel, up, down, k):
    """`kernel` ([width, up], from `polyphase_kernel`) as matrices that map blocks of `down * k` input
    samples to blocks of `up * k` interleaved output samples: output block b is
    `sum_j input_block[b + j] @ matrices[j]`, j < len(matrices)."""
    width = kernel.shape[0]
    block = down * k
    m = -(-(down * (k - 1) + width) // block)
    w = np.zeros((m * block, up * k))
    for i in range(k):
        w[down * i:down * i + width, up * i:up * (i + 1)] = kernel
    return [w[j * block:(j + 1) * block] for j in range(m)]


@keras.saving.register_keras_serializable(package="tagger")
class Resample(keras.layers.Layer):
    """Rational-rate resampling along the last axis, equal to `scipy.signal.resample_poly`.

    Input (..., samples) float32; output (..., ceil(samples * up / down)).

    The polyphase filter runs as matrix products on blocks of `down * k` samples (32 or more: 8
    phases of 4 samples for 16 -> 12 kHz), each output block from two or more consecutive input
    blocks: one product of every input block with the matrices side by side, then a sum of shifted
    column groups. The matrices hold zeros where a strided convolution skips, about twice its
    multiply-adds, yet on a CPU the CRNN's front end, computed clip by clip, runs 1.5 x faster on 2
    cores than with the convolution (`tf.nn.conv1d`, whose three output channels keep oneDNN far
    from its speed); batched, and on 16 cores, the two are about even (README, Performance).
    """

    def __init__(self, input_rate=16000, output_rate=12000, **kwargs):
        super().__init__(**kwargs)
        self.input_rate = int(input_rate)
        self.output_rate = int(output_rate)
        g = math.gcd(self.input_rate, self.output_rate)
        self.up, self.down = self.output_rate // g, self.input_rate // g
        kernel, self.n_pre_remove, taps = polyphase_kernel(self.up, self.down)
        self.left_pad = taps - 1
        self.width = kernel.shape[0]
        self.block_phases = max(1, -(-32 // self.down))      # k: output samples per phase and block
        matrices = block_matrices(kernel, self.up, self.down, self.block_phases)
        self.matrix = tf.constant(np.concatenate(matrices, axis=1), tf.float32)   # [down * k, m * up * k]

    def output_length(self, n_in):
        return -(-n_in * self.up // self.down)

    def compute_output_shape(self, input_shape):
        n = input_shape[-1]
        return (*input_shape[:-1], None if n is None else self.output_length(n))

    def call(self, x):
        if self.up == self.down:
            return x
        shape = tf.shape(x)
        n_in = shape[-1]
        flat = tf.reshape(x, [-1, n_in])
        n_out = (n_in * self.up + self.down - 1) // self.down
        per_phase = (self.n_pre_remove + n_out + self.up - 1) // self.up
        k, o = self.block_phases, self.up * self.block_phases      # o: output samples per block
        m = self.matrix.shape[1] // o                                  # blocks each output block reads
        blocks = (per_phase + k - 1) // k
        total = self.down * k * (blocks + m - 1)
        padded = tf.pad(flat, [[0, 0], [self.left_pad, tf.maximum(total - n_in - self.left_pad, 0)]])
        padded = tf.reshape(padded[:, :total], [tf.shape(flat)[0], blocks + m - 1, self.down * k])
        # One product of every block with all m matrices (fewer, larger ops than m products of
        # overlapping slices: 1.06 to 1.13 x the front end on 2 cores); output block b sums
        # column group j of block b + j.
        products = tf.matmul(padded, self.matrix)
        y = tf.add_n([products[:, j:j + blocks, j * o:(j + 1) * o] for j in range(m)])
        y = tf.reshape(y, [tf.shape(flat)[0], blocks * o])
        y = y[:, self.n_pre_remove:self.n_pre_remove + n_out]
        return tf.reshape(y, tf.concat([shape[:-1], [n_out]], 0))

    def get_config(self):
        return {**super().get_config(), "input_rate": self.input_rate, "output_rate": self.output_rate}


def hz_to_mel(f):
    """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz, logstep = 1000.0, np.log(6.4) / 27.0
    mel = f / f_sp
    return np.where(f >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mel)


def mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz, logstep = 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def slaney_mel_matrix(sample_rate, fft_length, num_mel_bins, fmin=0.0, fmax=None):
    """`librosa.filters.mel(..., htk=False, norm='slaney')`: triangles on the Slaney scale, area-normalised.

    Returns [fft_length // 2 + 1, num_mel_bins] float64.
    """
    fmax = sample_rate / 2.0 if fmax is None else fmax
    fft_freqs = np.fft.rfftfreq(fft_length, 1.0 / sample_rate)
    mel_freqs = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), num_mel_bins + 2))
    fdiff = np.diff(mel_freqs)
    ramps = mel_freqs[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_freqs[2:num_mel_bins + 2] - mel_freqs[:num_mel_bins]))[:, None]
    return weights.T


# How LogMelSpectrogram compresses the mel power: dB (librosa's power_to_db), or musicnn's log10(10000 x + 1).
COMPRESSIONS = ("db", "musicnn")
# Clips of a batch that LogMelSpectrogram computes at the same time on a CPU (about 10 MB each for 29 s).
PARALLEL_CLIPS = 16


@keras.saving.register_keras_serializable(package="tagger")
class LogMelSpectrogram(keras.layers.Layer):
    """Log-power mel spectrogram in dB, equal to librosa's defaults.

    `librosa.power_to_db(librosa.feature.melspectrogram(y, sr, n_fft, hop_length, n_mels),
    ref=1.0, amin=1e-10, top_db=None)`: centred frames with zero padding, periodic Hann window,
    power 2, Slaney mel filters (from `fmin` to `fmax`, default half the sample rate: librosa's
    `fmin`, `fmax`). Input (batch, samples); output (batch, num_mel_bins, frames) with
    frames = 1 + samples // sequence_stride.

    With `input_rate` (the rate of the incoming waveform, when it is not `sample_rate`), the input is
    first resampled to `sample_rate` by `Resample`, i.e. `scipy.signal.resample_poly`, and frames
    counts the resampled samples.

    `center=False` frames the input as it comes (librosa's `center=False`): 1 + (samples -
    fft_length) // sequence_stride frames, the first starting at sample 0. `compression="musicnn"`
    replaces the dB scale by musicnn's `log10(10000 * mel + 1)` (Pons & Serra 2019).

    On a CPU the batch is computed clip by clip, resampling and spectrogram together: the clips run
    side by side on TensorFlow's inter-op threads, where one batched FFT keeps few cores busy, and
    each works on a few MB of intermediates instead of a batch's hundreds (`tf.map_fn` over the
    clips' indices, up to `PARALLEL_CLIPS` clips at a time). Same values, faster on many cores
    (measured in the README's Performance). With a GPU visible when the layer is traced, the batch
    is one set of batched ops (`batched`), as GPUs want; a model traced (exported) on one kind of
    machine keeps that graph.
    """

    def __init__(self, sample_rate=12000, fft_length=512, sequence_stride=256, num_mel_bins=96,
                 amin=1e-10, input_rate=None, fmin=0.0, fmax=None, center=True, compression="db", **kwargs):
        super().__init__(**kwargs)
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression {compression!r}: one of {', '.join(COMPRESSIONS)}")
        self.center = bool(center)
        self.compression = compression
        self.sample_rate = int(sample_rate)
        self.input_rate = self.sample_rate if input_rate is None else int(input_rate)
        self.resample = (Resample(self.input_rate, self.sample_rate, dtype="float32")
                         if self.input_rate != self.sample_rate else None)
        self.fft_length = int(fft_length)
        self.sequence_stride = int(sequence_stride)
        self.num_mel_bins = int(num_mel_bins)
        self.amin = float(amin)
        self.fmin = float(fmin)
        self.fmax = None if fmax is None else float(fmax)
        self.mel_rows = tf.constant(     # [num_mel_bins, bins]
            slaney_mel_matrix(self.sample_rate, self.fft_length, self.num_mel_bins, self.fmin, self.fmax).T,
            tf.float32)

    def build(self, input_shape):
        if self.resample is not None:
            self.resample.build(input_shape)

    def num_frames(self, samples):
        """Frames of a waveform of `samples` samples at `input_rate`."""
        if self.resample is not None:
            samples = self.resample.output_length(samples)
        if not self.center:
            return 1 + (samples - self.fft_length) // self.sequence_stride
        return 1 + samples // self.sequence_stride

    def compute_output_shape(self, input_shape):
        n = input_shape[-1]
        return (input_shape[0], self.num_mel_bins, None if n is None else self.num_frames(n))

    def call(self, x):
        if tf.config.list_logical_devices("GPU"):
            return self.batched(x)
        # Over the clips' indices, not the clips: each iteration slices its own clip, in parallel,
        # where mapping over `x` would first copy the whole batch into a list, in one op.
        y = tf.map_fn(lambda i: self.batched(x[i:i + 1])[0], tf.range(tf.shape(x)[0]),
                      fn_output_signature=tf.float32, parallel_iterations=PARALLEL_CLIPS)
        y.set_shape([x.shape[0], *y.shape[1:]])
        return y

    def batched(self, x):
        """The spectrogram of the whole batch as one set of batched ops (what `call` does on a GPU)."""
        if self.resample is not None:
            x = self.resample(x)
        if self.center:
            half = self.fft_length // 2
            x = tf.pad(x, [[0, 0], [half, half]])  # zero padding, as librosa's center=True
        stft = tf.signal.stft(x, frame_length=self.fft_length, frame_step=self.sequence_stride,
                              fft_length=self.fft_length,
                              window_fn=lambda n, dtype: tf.signal.hann_window(n, periodic=True, dtype=dtype))
        power = tf.math.square(tf.math.real(stft)) + tf.math.square(tf.math.imag(stft))
        # (mel, bins) x (frames, bins)^T: the output in (mel, frames) order, no transpose after.
        mel = tf.matmul(tf.broadcast_to(self.mel_rows, [tf.shape(power)[0], *self.mel_rows.shape]), power,
                        transpose_b=True)
        if self.compression == "musicnn":
            return tf.math.log(10000.0 * mel + 1.0) * (1.0 / math.log(10.0))
        return tf.math.log(tf.maximum(mel, self.amin)) * (10.0 / math.log(10.0))

    def get_config(self):
        return {**super().get_config(), "sample_rate": self.sample_rate, "fft_length": self.fft_length,
                "sequence_stride": self.sequence_stride, "num_mel_bins": self.num_mel_bins,
                "amin": self.amin, "input_rate": self.input_rate, "fmin": self.fmin, "fmax": self.fmax,
                "center": self.center, "compression": self.compression}
