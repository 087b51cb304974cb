"""Layers that exist for speed, and the hardware probing that decides where they apply.

Each layer computes what a stock Keras layer computes (same variables, same values up to float32
rounding, except where a docstring says otherwise) and is tested against it in tests/test_kernels.py.
The model families use them by name; what each gains is measured in docs/performance.md.
"""
import os
import re

import keras
import tensorflow as tf
from keras import layers


@keras.saving.register_keras_serializable(package="tagger")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras's BatchNormalization over the last axis of 3-D (batch, steps, channels) or 4-D NHWC
    inputs, computed by TensorFlow's fused kernel (one op forward, one backward) instead of Keras 3's
    moments-and-arithmetic graph, which costs the CRNN most of its CPU training time. Same variables
    and the same normalisation; the kernel takes 16-bit inputs as they are and keeps its statistics
    in float32, as Keras's layer does. A 3-D input runs as (batch, 1, steps, channels).

    One difference from Keras's layer, kept on purpose: in training, the moving variance is updated
    with the batch variance corrected by Bessel's factor N / (N - 1) (N: values per channel in the
    batch), the unbiased estimate that TensorFlow's fused kernel returns and that PyTorch's
    BatchNorm uses for its running variance, where Keras's layer updates with the biased variance.
    The outputs in training (normalised by the biased batch variance) and in inference are the same
    as Keras's.
    """

    def call(self, inputs, training=None, mask=None):
        rank = len(inputs.shape)
        if rank not in (3, 4) or self.axis not in (-1, rank - 1) or mask is not None:
            return super().call(inputs, training=training, mask=mask)
        x = tf.expand_dims(inputs, 1) if rank == 3 else inputs
        gamma = self.gamma if self.scale else tf.ones_like(self.moving_mean)
        beta = self.beta if self.center else tf.zeros_like(self.moving_mean)
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, epsilon=self.epsilon, is_training=True)
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(
                self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        else:
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, mean=self.moving_mean, variance=self.moving_variance,
                epsilon=self.epsilon, is_training=False)
        return tf.squeeze(outputs, 1) if rank == 3 else outputs


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
                x = x[..., :frames * self.stride]       # a copy of the batch: the CNN's input needs none
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


def cpu_cores():
    """The cores this process may run on (its affinity where the system tells it, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # macOS, Windows
        return os.cpu_count() or 1


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


def overlap_add(t, a, b):
    """`t` with its axes a < b (lengths A, B) replaced by one axis, at a, of length A + B - 1 whose
    element x is the sum of t[..., p, ..., q, ...] over p + q = x: the overlap-add of B taps shifted
    along A (or the reverse). Pads the longer axis by the shorter's length (at most 2 x the memory)
    and reads the sums off a reshape ('skewing'): no loop over the taps."""
    rank = len(t.shape)
    short, long_ = (a, b) if t.shape[a] <= t.shape[b] else (b, a)
    rest = [d for d in range(rank) if d not in (a, b)]
    t = tf.transpose(t, rest + [short, long_])
    s, n = t.shape[-2], t.shape[-1]
    lead = tf.shape(t)[:-2]
    t = tf.pad(t, [[0, 0]] * (rank - 1) + [[0, s]])                       # each row s + n long
    t = tf.reshape(t, tf.concat([lead, [s * (n + s)]], 0))[..., :s * (n + s - 1)]
    t = tf.reduce_sum(tf.reshape(t, tf.concat([lead, [s, n + s - 1]], 0)), axis=-2)   # row p shifted by p
    return tf.transpose(t, list(range(a)) + [rank - 2] + list(range(a, rank - 2)))


def _single_channel_input_gradient(dy, kernel, input_shape, padding):
    """The gradient of conv2d (stride 1) with respect to its one-channel input: each kernel tap's
    contribution dy @ kernel_tap as one matrix product (over groups of kernel rows), the taps' shifted
    maps summed by `overlap_add`. oneDNN's Conv2DBackpropInput for one input channel and a large
    kernel (musicnn's 7 x 67 timbral filters) is 5 to 10 x slower."""
    kh, kw, _, channels = kernel.shape
    ho, wo = dy.shape[1], dy.shape[2]
    rows = max(1, min(kh, (1 << 20) // (ho * wo * kw)))                     # about 4 MB of products a clip
    taps = tf.reshape(kernel, [kh, kw, channels])
    flat = tf.reshape(dy, [-1, channels])
    total = None
    for r0 in range(0, kh, rows):
        g = min(rows, kh - r0)
        p = tf.matmul(flat, tf.reshape(taps[r0:r0 + g], [g * kw, channels]), transpose_b=True)
        p = tf.reshape(p, tf.concat([tf.shape(dy)[:1], [ho, wo, g, kw]], 0))
        p = overlap_add(p, 2, 4) if kw > 1 else p[..., 0]                    # (n, ho, wo + kw - 1, g)
        p = overlap_add(p, 1, 3) if g > 1 else p[..., 0]                     # (n, ho + g - 1, wo + kw - 1)
        p = tf.pad(p, [[0, 0], [r0, kh - r0 - g], [0, 0]])
        total = p if total is None else total + p
    if padding == "SAME":
        top, left = (kh - 1) // 2, (kw - 1) // 2
        total = total[:, top:top + input_shape[1], left:left + input_shape[2]]
    return total[..., None]


@keras.saving.register_keras_serializable(package="tagger")
class SingleChannelConv2D(layers.Conv2D):
    """Keras's Conv2D (same variables, same values) whose input gradient, for a stride-1 convolution of
    a one-channel input, is one matrix product per group of kernel rows and an overlap-add
    (`_single_channel_input_gradient`) instead of TensorFlow's Conv2DBackpropInput; the kernel
    gradient is TensorFlow's own. musicnn's front end convolves the batch-normalised spectrogram with
    204 filters of 7 x 38 and 7 x 67 (and long temporal ones): there Conv2DBackpropInput took most of
    a training step on a CPU (docs/performance.md). Other convolutions are Conv2D's own."""

    def convolution_op(self, inputs, kernel):
        if not (inputs.shape[-1] == 1 and self.strides == (1, 1) and self.dilation_rate == (1, 1)
                and self.groups == 1 and self.data_format == "channels_last"):
            return super().convolution_op(inputs, kernel)
        padding = self.padding.upper()

        @tf.custom_gradient
        def conv(x, k):
            def grad(dy):
                dk = tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=tf.shape(k), out_backprop=dy,
                                                     strides=[1, 1, 1, 1], padding=padding)
                return _single_channel_input_gradient(dy, k, x.shape, padding), dk
            return tf.nn.conv2d(x, k, 1, padding), grad

        return conv(tf.convert_to_tensor(inputs), tf.convert_to_tensor(kernel))
