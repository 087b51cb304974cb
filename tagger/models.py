"""The study's two architectures as Keras functional models, chosen by name through `BUILDERS`.

Both take 16 kHz float32 waveforms in [-1, 1]:
- `build_cnn`: Dieleman & Schrauwen (2014) on raw audio; input (batch, 10, samples), the clip cut
  into 10 consecutive sub-clips whose predictions are averaged inside the model, each sub-clip
  without the few samples after the strided convolution's last frame (`cnn_input_samples`). It reads
  the 16 kHz samples directly, as the PyTorch peer in ../shared/bench does (`sample_rate=12000`
  resamples first, inside the model).
- `build_crnn`: Choi et al. (2017) on log-mel spectrograms of the clip resampled to 12 kHz inside
  the model; input (batch, clip_samples).

`precision` is a Keras dtype policy for the convolutional layers: "float32" (the default), or
"mixed_bfloat16" / "mixed_float16" (16-bit arithmetic, float32 weights) for GPUs and CPUs with
16-bit matrix units. The front end, the GRUs and the output layers stay float32 in every case.
"""
import os
import re

import keras
import tensorflow as tf
from keras import layers

from tagger.features import LogMelSpectrogram, Resample

INPUT_RATE = 16000


@keras.saving.register_keras_serializable(package="tagger")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras's BatchNormalization over the channels of NHWC images, computed by TensorFlow's fused
    kernel (one op forward, one backward) instead of Keras 3's moments-and-arithmetic graph, which
    costs the CRNN most of its CPU training time. Same variables, same update rule; the kernel takes
    16-bit inputs as they are and keeps its statistics in float32, as Keras's layer does.
    """

    def call(self, inputs, training=None, mask=None):
        if len(inputs.shape) != 4 or self.axis not in (-1, 3) or mask is not None:
            return super().call(inputs, training=training, mask=mask)
        gamma = self.gamma if self.scale else tf.ones_like(self.moving_mean)
        beta = self.beta if self.center else tf.zeros_like(self.moving_mean)
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, epsilon=self.epsilon, is_training=True)
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(
                self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
            return outputs
        outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
            inputs, gamma, beta, mean=self.moving_mean, variance=self.moving_variance,
            epsilon=self.epsilon, is_training=False)
        return outputs


@keras.saving.register_keras_serializable(package="tagger")
class StridedConv1D(layers.Layer):
    """Keras's `Conv1D(filters, length, strides=stride)` (valid padding) along the last axis of
    (batch, ..., samples) inputs, without a channel axis: output (batch, ..., frames, filters). Same
    kernel shape (length, 1, filters), initializer and arithmetic as Conv1D.

    When the length equals the stride (256/256 and the other non-overlapping settings), the samples are
    cut into frames and the convolution is one matrix product, its weight gradient another: on CPU,
    TensorFlow's Conv2DBackpropFilter for a one-channel input and a long kernel is slower (256/256,
    forward and backward for 10 clips, 2 cores: 19 -> 12 ms with oneDNN, 25-35 -> 14 ms without).
    Overlapping frames run as Conv1D does (its forward is faster there, its training no slower).
    """

    def __init__(self, filters, length, stride, activation=None, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.length, self.stride = int(filters), int(length), int(stride)
        self.activation = keras.activations.get(activation)

    def build(self, input_shape):
        if input_shape[-1] is None or None in input_shape[1:-1]:
            raise ValueError(f"{self.name} needs a known number of samples and sub-clips, got {input_shape}")
        self.kernel = self.add_weight(name="kernel", shape=(self.length, 1, self.filters),
                                      initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")

    def frames(self, samples):
        return (samples - self.length) // self.stride + 1

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.frames(input_shape[-1]), self.filters)

    def call(self, x):
        inner = list(x.shape[1:-1])
        frames = self.frames(x.shape[-1])
        if self.length == self.stride:
            if x.shape[-1] != frames * self.stride:
                x = x[..., :frames * self.stride]       # a copy of the batch: build_cnn's input needs none
            y = tf.matmul(tf.reshape(x, [-1, self.stride]), tf.reshape(self.kernel, [self.stride, self.filters]))
        else:
            y = tf.nn.conv1d(tf.reshape(x, [-1, x.shape[-1], 1]), self.kernel, self.stride, "VALID")
        # MatMul -> BiasAdd -> Relu: a pattern TensorFlow's graph optimizer fuses into one kernel.
        y = self.activation(tf.nn.bias_add(y, self.bias))
        return tf.reshape(y, [-1, *inner, frames, self.filters])

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "length": self.length, "stride": self.stride,
                "activation": keras.activations.serialize(self.activation)}


def onednn_cpu():
    """True when TensorFlow computes on the CPU (no GPU visible) with oneDNN's kernels (see tagger/__init__.py)."""
    try:
        from tensorflow.python.util import _pywrap_util_port
        onednn = _pywrap_util_port.IsMklEnabled()
    except (ImportError, AttributeError):
        onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "1"
    return onednn and not tf.config.list_logical_devices("GPU")


# The CPU flags of units that compute each 16-bit type natively (elsewhere TensorFlow converts in software).
CPU_16BIT_FLAGS = {"mixed_bfloat16": ("avx512_bf16", "amx_bf16"), "mixed_float16": ("avx512_fp16", "amx_fp16")}


def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^flags\s*:\s*(.*)$", f.read(), re.M)
    except OSError:
        return set()
    return set(m.group(1).split()) if m else set()


def emulated_precision(precision):
    """True when a mixed `precision` would run on a CPU (no GPU visible) without units for its 16-bit type."""
    flags = CPU_16BIT_FLAGS.get(precision)
    return bool(flags) and not tf.config.list_logical_devices("GPU") and not cpu_flags() & set(flags)


def _conv2d_same_tap_gradient(x, kernel):
    """`tf.nn.conv2d(x, kernel, 1, "SAME")` whose kernel gradient is one matrix product per kernel tap,
    sum over (batch, height, width) of shifted inputs x output gradients; the input gradient is
    TensorFlow's own. Same values; oneDNN's backward-weights kernel for a (16, 48, 720, 64) input and 128
    filters takes 4.3 s on 2 CPU cores, the nine products 0.9 s.
    """
    kh, kw = kernel.shape[:2]

    @tf.custom_gradient
    def conv(x, kernel):
        def grad(dy):
            dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=kernel, out_backprop=dy,
                                                strides=[1, 1, 1, 1], padding="SAME")
            h, w = tf.shape(x)[1], tf.shape(x)[2]
            padded = tf.pad(x, [[0, 0], [(kh - 1) // 2, kh // 2], [(kw - 1) // 2, kw // 2], [0, 0]])
            taps = []
            for a in range(kh):
                for b in range(kw):
                    # One shifted copy of the input alive at a time: each waits for the previous product.
                    with tf.control_dependencies(taps[-1:]):
                        taps.append(tf.einsum("nhwc,nhwf->cf", padded[:, a:a + h, b:b + w], dy))
            return dx, tf.reshape(tf.stack(taps), tf.shape(kernel))
        return tf.nn.conv2d(x, kernel, 1, "SAME"), grad

    return conv(tf.convert_to_tensor(x), tf.convert_to_tensor(kernel))   # a variable read outside: plain tensors inside


@keras.saving.register_keras_serializable(package="tagger")
class TapGradientConv2D(layers.Conv2D):
    """Keras's Conv2D (same variables, same values) whose kernel gradient, for a stride-1 "same"
    float32 convolution of a many-channel input computed by oneDNN on a CPU, is matrix products per
    kernel tap (`_conv2d_same_tap_gradient`); everywhere else (a GPU, TensorFlow's own CPU kernels,
    where these products are slower, 16-bit precision) it is Conv2D's own.
    """

    def convolution_op(self, inputs, kernel):
        if (self.strides == (1, 1) and self.dilation_rate == (1, 1) and self.padding == "same"
                and self.groups == 1 and self.data_format == "channels_last" and inputs.shape[-1] >= 8
                and inputs.dtype == tf.float32 and onednn_cpu()):
            return _conv2d_same_tap_gradient(inputs, kernel)
        return super().convolution_op(inputs, kernel)


def cnn_frames(sub_clip_samples, length, stride, sample_rate=INPUT_RATE, input_rate=INPUT_RATE):
    """Time steps left after the strided convolution and the two poolings (0: the clip is too short)."""
    n = -(-sub_clip_samples * sample_rate // input_rate) if sample_rate != input_rate else sub_clip_samples
    frames = (n - length) // stride + 1 if n >= length else 0
    return frames // 4 // 4


def cnn_input_samples(sub_clip_samples, length, stride, sample_rate=INPUT_RATE, input_rate=INPUT_RATE):
    """Samples of each sub-clip that the CNN takes: the sub-clip less the tail after the strided
    convolution's last frame, which no frame reads (8 of 46,600 samples at 256/256). The data pipeline
    and the export cut the tail off as they cut the sub-clips (`tagger.data.to_sub_clips`), so the
    model's frames are contiguous in memory from the start: slicing them out inside the model copied
    every batch, and without that copy the CNN trains 1.13 x faster on 16 CPU cores (README,
    Performance). Resampling inside the model (`sample_rate` != `input_rate`) needs every sample.
    """
    if sample_rate != input_rate or sub_clip_samples < length:
        return sub_clip_samples
    return sub_clip_samples - (sub_clip_samples - length) % stride


def build_cnn(num_tags, sub_clip_samples, length=256, stride=256, num_sub_clips=10, filters=32,
              dense_units=100, sample_rate=INPUT_RATE, input_rate=INPUT_RATE, precision="float32", name="cnn"):
    """Raw-audio CNN: Conv1D(filters, length, stride) -> [Conv1D(filters, 8, same) -> MaxPool(4)] x 2
    -> Dense(dense_units) -> Dense(num_tags, sigmoid), ReLU after the convolutions and the first dense
    layer, applied to each sub-clip; the sub-clip probabilities are averaged. Sub-clips of
    `sub_clip_samples`; the input is (batch, num_sub_clips, cnn_input_samples(...)), their first samples.

    The strided convolution is `StridedConv1D` (Conv1D's weights and arithmetic as matrix products);
    the other 1-D layers run as 2-D layers with a kernel height of 1 over (sub-clip, time), so the 10
    sub-clips need no reshape into the batch: the weights and arithmetic are exactly Conv1D's.
    """
    if cnn_frames(sub_clip_samples, length, stride, sample_rate, input_rate) < 1:
        raise ValueError(f"sub-clips of {sub_clip_samples} samples are too short for length {length} / "
                         f"stride {stride}: the two poolings leave no time step")
    samples = cnn_input_samples(sub_clip_samples, length, stride, sample_rate, input_rate)
    waves = keras.Input((num_sub_clips, samples), name="waveform")
    x = (Resample(input_rate, sample_rate, name="resample", dtype="float32")(waves) if sample_rate != input_rate
         else waves)
    x = StridedConv1D(filters, length, stride, activation="relu", name="strided_conv", dtype=precision)(x)
    for i in (1, 2):
        x = layers.Conv2D(filters, (1, 8), padding="same", activation="relu", name=f"conv{i}", dtype=precision)(x)
        x = layers.MaxPooling2D((1, 4), name=f"pool{i}", dtype=precision)(x)
    x = layers.Reshape((num_sub_clips, -1), name="flatten", dtype=precision)(x)
    x = layers.Dense(dense_units, activation="relu", name="dense", dtype=precision)(x)
    x = layers.Dense(num_tags, activation="sigmoid", name="sub_clip_probabilities", dtype="float32")(x)
    probs = layers.GlobalAveragePooling1D(name="probabilities", dtype="float32")(x)
    return keras.Model(waves, probs, name=name)


def build_crnn(num_tags, clip_samples, gru_units=32, filters=(64, 128, 128, 128),
               pools=((2, 2), (3, 3), (4, 4), (4, 4)), num_mel_bins=96, fft_length=512,
               sequence_stride=256, pad_frames=37, sample_rate=12000, input_rate=INPUT_RATE,
               bn_momentum=0.99, precision="float32", name="crnn"):
    """CRNN: LogMelSpectrogram (resampling to `sample_rate` first) -> `pad_frames` zero frames at
    each end of time (Choi et al.'s ZeroPadding2D) -> four [Conv2D 3x3 -> BatchNorm -> ELU ->
    MaxPool] blocks -> two GRU layers over time, each followed by an ELU layer -> Dense(num_tags,
    sigmoid).

    The GRUs keep their default tanh/sigmoid so that cuDNN serves them on a GPU, and float32 under a
    mixed `precision`: they are a small part of the work, and recurrence accumulates 16-bit rounding.
    """
    f32 = dict(dtype="float32")
    waves = keras.Input((clip_samples,), name="waveform")
    # Resampling inside the log-mel layer: on a CPU it computes both clip by clip (faster).
    x = LogMelSpectrogram(sample_rate, fft_length, sequence_stride, num_mel_bins, input_rate=input_rate,
                          name="log_mel", **f32)(waves)
    x = layers.Reshape((num_mel_bins, -1, 1), name="add_channel", **f32)(x)
    x = layers.ZeroPadding2D(((0, 0), (pad_frames, pad_frames)), name="pad_time", **f32)(x)
    for i, (f, pool) in enumerate(zip(filters, pools), 1):
        x = TapGradientConv2D(f, 3, padding="same", name=f"conv{i}", dtype=precision)(x)
        x = FusedBatchNormalization(momentum=bn_momentum, name=f"bn{i}", dtype=precision)(x)
        # ELU then max pooling, computed in the other order: ELU is strictly increasing, so it
        # commutes with max (same values, same argmax, same gradients) and runs on a tensor 4 to 16
        # times smaller.
        x = layers.MaxPooling2D(pool, name=f"pool{i}", dtype=precision)(x)
        x = layers.ELU(name=f"elu{i}", dtype=precision)(x)
    if x.shape[1] != 1 or not x.shape[2]:
        raise ValueError(f"{num_mel_bins} mel bins / {clip_samples} samples do not pool down to one "
                         f"frequency row and at least one time step (got {x.shape[1]} x {x.shape[2]})")
    x = layers.Reshape((x.shape[2], filters[-1]), name="to_sequence", **f32)(x)
    x = layers.GRU(gru_units, return_sequences=True, name="gru1", **f32)(x)
    x = layers.ELU(name="gru1_elu", **f32)(x)
    x = layers.GRU(gru_units, name="gru2", **f32)(x)
    x = layers.ELU(name="gru2_elu", **f32)(x)
    probs = layers.Dense(num_tags, activation="sigmoid", name="probabilities", **f32)(x)
    return keras.Model(waves, probs, name=name)


BUILDERS = {"cnn": build_cnn, "crnn": build_crnn}
