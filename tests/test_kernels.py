"""The speed layers of tagger.kernels, each against the stock Keras layer it replaces: values and gradients."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import tagger
from tagger.kernels import (FusedBatchNormalization, StridedConv1D, TapGradientConv2D, _conv2d_same_tap_gradient,
                            onednn_cpu)
from tagger.models.crnn import build_crnn


def _values_and_gradients(layer, x, call=None):
    """The layer's output and the gradients of a nonlinear loss with respect to its input and weights."""
    call = call or layer
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = call(x)
        loss = tf.reduce_sum(y * tf.sin(3 * y))
    return [y] + tape.gradient(loss, [x] + layer.trainable_weights)


@pytest.mark.parametrize("kernel", [(3, 3), (2, 4)])
@pytest.mark.parametrize("graph", [False, True])
def test_tap_gradient_convolution_equals_conv2d(kernel, graph):
    """The CRNN's convolutions: same values and same input, kernel and bias gradients as Keras's Conv2D,
    through the tap-gradient function itself (whichever path the layer takes on this machine)."""
    x = tf.constant(np.random.default_rng(2).normal(size=(3, 9, 14, 16)).astype(np.float32))
    ours, reference = TapGradientConv2D(8, kernel, padding="same"), keras.layers.Conv2D(8, kernel, padding="same")
    ours.build(x.shape)
    reference.build(x.shape)
    reference.set_weights([w + 0.1 for w in ours.get_weights()])   # a non-zero bias too
    ours.set_weights(reference.get_weights())
    forced = lambda h: tf.nn.bias_add(_conv2d_same_tap_gradient(h, ours.kernel), ours.bias)   # noqa: E731
    run = (lambda f: tf.function(f)()) if graph else (lambda f: f())
    for call in (forced, ours):
        got = run(lambda: _values_and_gradients(ours, x, call))
        want = run(lambda: _values_and_gradients(reference, x))
        for a, b in zip(got, want):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-4 * float(tf.reduce_max(tf.abs(b))))


def test_crnn_uses_the_tap_gradient_where_onednn_computes():
    """conftest imports tagger first, as our commands do, so the suite runs with oneDNN on, and the
    CRNN's many-channel convolutions take the tap-gradient path (the first, one channel, does not)."""
    if tagger.ONEDNN_DEFAULTED:      # not TF_ENABLE_ONEDNN_OPTS=0 from the user
        assert onednn_cpu() == (not tf.config.list_logical_devices("GPU"))
    graph = tf.function(build_crnn(5, 48000, filters=(8, 8, 8, 8))).get_concrete_function(
        tf.TensorSpec((2, 48000))).graph
    custom = [op for op in graph.get_operations() if op.type == "IdentityN"]
    assert len(custom) == (3 if onednn_cpu() else 0)


@pytest.mark.parametrize("length, stride", [(256, 256), (512, 256), (300, 200)])
def test_strided_conv1d_equals_conv1d(length, stride):
    """The CNN's strided convolution (a matrix product when length == stride) against Keras's Conv1D on
    every sub-clip: values and gradients."""
    x = tf.constant(np.random.default_rng(3).normal(size=(3, 4, 4000)).astype(np.float32))
    ours = StridedConv1D(6, length, stride, activation="relu")
    reference = keras.layers.Conv1D(6, length, strides=stride, activation="relu")
    ours.build(x.shape)
    reference.build((None, 4000, 1))
    reference.set_weights([w + 0.01 for w in ours.get_weights()])
    ours.set_weights(reference.get_weights())
    frames = (4000 - length) // stride + 1
    got = _values_and_gradients(ours, x)
    want = _values_and_gradients(reference, x, lambda h: tf.reshape(reference(tf.reshape(h, [12, 4000, 1])),
                                                                     [3, 4, frames, 6]))
    assert got[0].shape == (3, 4, frames, 6)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5 * float(tf.reduce_max(tf.abs(b))))



@pytest.mark.parametrize("shape", [(6, 40, 8), (4, 5, 9, 8)])
def test_fused_batch_norm_equals_keras_but_updates_the_moving_variance_unbiased(shape):
    """Training and inference outputs and the training gradients are Keras's BatchNormalization's; the
    moving mean is updated as Keras does; the moving variance with the batch variance times N / (N - 1)
    (N values per channel: Bessel's correction, as PyTorch), where Keras uses the biased variance."""
    rng = np.random.default_rng(6)
    x = tf.constant(rng.normal(2.0, 3.0, size=shape).astype(np.float32))
    momentum, epsilon = 0.9, 1e-5
    ours = FusedBatchNormalization(momentum=momentum, epsilon=epsilon)
    reference = keras.layers.BatchNormalization(momentum=momentum, epsilon=epsilon)
    ours.build(x.shape)
    reference.build(x.shape)
    start = [rng.uniform(0.5, 1.5, 8).astype(np.float32), rng.normal(size=8).astype(np.float32),
             rng.normal(size=8).astype(np.float32), rng.uniform(0.5, 2.0, 8).astype(np.float32)]
    ours.set_weights(start)
    reference.set_weights(start)
    np.testing.assert_allclose(ours(x, training=False).numpy(), reference(x, training=False).numpy(), atol=1e-5)
    got = _values_and_gradients(ours, x, lambda h: ours(h, training=True))
    want = _values_and_gradients(reference, x, lambda h: reference(h, training=True))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4 * float(tf.reduce_max(tf.abs(b))))
    values = x.numpy().reshape(-1, 8).astype(np.float64)
    n = len(values)
    mean, biased = values.mean(axis=0), values.var(axis=0)
    # One call in training each (in _values_and_gradients): one update.
    expect_mean = momentum * start[2] + (1 - momentum) * mean
    expect_unbiased = momentum * start[3] + (1 - momentum) * biased * n / (n - 1)
    expect_biased = momentum * start[3] + (1 - momentum) * biased
    np.testing.assert_allclose(ours.moving_mean.numpy(), expect_mean, rtol=1e-5)
    np.testing.assert_allclose(reference.moving_mean.numpy(), expect_mean, rtol=1e-5)
    np.testing.assert_allclose(ours.moving_variance.numpy(), expect_unbiased, rtol=1e-5)
    np.testing.assert_allclose(reference.moving_variance.numpy(), expect_biased, rtol=1e-5)
    assert not np.allclose(expect_unbiased, expect_biased, rtol=1e-4)


def test_overlap_add_sums_shifted_taps():
    rng = np.random.default_rng(8)
    t = rng.normal(size=(2, 5, 3, 4)).astype(np.float32)
    want = np.zeros((2, 7, 4), np.float32)
    for p in range(5):
        for q in range(3):
            want[:, p + q] += t[:, p, q]
    from tagger.kernels import overlap_add
    np.testing.assert_allclose(overlap_add(tf.constant(t), 1, 2).numpy(), want, rtol=1e-5, atol=1e-6)
    swapped = np.transpose(t, (0, 2, 1, 3))                   # the shorter axis first
    np.testing.assert_allclose(overlap_add(tf.constant(swapped), 1, 2).numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel, padding", [((7, 12), "valid"), ((9, 1), "same"), ((4, 6), "same"), ((3, 3), "same")])
@pytest.mark.parametrize("graph", [False, True])
def test_single_channel_convolution_equals_conv2d(kernel, padding, graph):
    """musicnn's front-end convolutions: same values and input, kernel and bias gradients as Keras's
    Conv2D, for valid and same padding, even and odd kernels."""
    from tagger.kernels import SingleChannelConv2D
    x = tf.constant(np.random.default_rng(9).normal(size=(3, 20, 17, 1)).astype(np.float32))
    ours = SingleChannelConv2D(5, kernel, padding=padding, activation="relu")
    reference = keras.layers.Conv2D(5, kernel, padding=padding, activation="relu")
    ours.build(x.shape)
    reference.build(x.shape)
    reference.set_weights([w + 0.1 for w in ours.get_weights()])
    ours.set_weights(reference.get_weights())
    run = (lambda f: tf.function(f)()) if graph else (lambda f: f())
    got = run(lambda: _values_and_gradients(ours, x))
    want = run(lambda: _values_and_gradients(reference, x))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5 * float(tf.reduce_max(tf.abs(b))))
