"""The study's two architectures: shapes, parameter counts worked out by hand, and overfitting one batch."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tagger.models.cnn import build_cnn, cnn_frames, cnn_input_samples
from tagger.models.crnn import build_crnn

MTAT_SUB_CLIP = 46600     # 466,000 samples / 10 at 16 kHz
MTAT_CLIP = 466000


def _trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("length, stride, total, samples", [
    # 46,600 samples at 16 kHz; frames = (46600 - length) // stride + 1, then two poolings by 4.
    # conv1 = length * 32 + 32; conv2 = conv3 = 8 * 32 * 32 + 32 = 8,224; out = 100 * 50 + 50 = 5,050;
    # dense = steps * 32 * 100 + 100. The input: the samples up to the end of the last frame,
    # length + (frames - 1) * stride.
    (256, 256, 8224 + 8224 + 8224 + (11 * 32 * 100 + 100) + 5050, 46592),   # 182 frames -> 45 -> 11: 65,022
    (512, 256, 16416 + 8224 + 8224 + (11 * 32 * 100 + 100) + 5050, 46592),  # 181 -> 45 -> 11: 73,214
    (512, 512, 16416 + 8224 + 8224 + (5 * 32 * 100 + 100) + 5050, 46592),   # 91 -> 22 -> 5: 54,014
    (1024, 512, 32800 + 8224 + 8224 + (5 * 32 * 100 + 100) + 5050, 46592),  # 90 -> 22 -> 5: 70,398
    (1024, 1024, 32800 + 8224 + 8224 + (2 * 32 * 100 + 100) + 5050, 46080),  # 45 -> 11 -> 2: 60,798
])
def test_cnn_parameter_counts(length, stride, total, samples):
    assert total in (65022, 73214, 54014, 70398, 60798)
    model = build_cnn(50, MTAT_SUB_CLIP, length, stride)
    assert model.count_params() == total
    assert model.input_shape == (None, 10, samples) and cnn_input_samples(MTAT_SUB_CLIP, length, stride) == samples
    assert model.output_shape == (None, 50)


def test_cnn_sub_clip_shapes():
    model = build_cnn(50, MTAT_SUB_CLIP)
    assert tuple(model.get_layer("strided_conv").output.shape[1:]) == (10, 182, 32)
    assert tuple(model.get_layer("flatten").output.shape[1:]) == (10, 11 * 32)
    assert cnn_frames(MTAT_SUB_CLIP, 256, 256) == 11
    # The study's 12 kHz variant: 34,950 samples -> 136 frames -> 34 -> 8.
    at_12k = build_cnn(50, MTAT_SUB_CLIP, sample_rate=12000)
    assert at_12k.get_layer("resample").output.shape[-1] == 34950
    assert tuple(at_12k.get_layer("flatten").output.shape[1:]) == (10, 8 * 32)


def test_demo_clip_fits_every_length_stride_pair():
    from tagger.demo import CLIP_SAMPLES
    for length, stride in [(1024, 1024), (1024, 512), (512, 512), (512, 256), (256, 256)]:
        assert cnn_frames(CLIP_SAMPLES // 10, length, stride) >= 1


def test_cnn_takes_its_sub_clips_less_the_tail_no_frame_reads(tmp_path):
    """At 256/256, sub-clips of 6,500 samples give 25 frames, which read the first 6,400: the model
    takes those, cut off by the data pipeline's function, with the probabilities of the same layers
    reading whole sub-clips; its export serves whole clips. At 12 kHz every sample counts."""
    from tagger import export, models
    from tagger.data import to_sub_clips
    model = build_cnn(5, 6500, filters=4, dense_units=8)
    assert model.input_shape == (None, 10, 6400)
    assert build_cnn(5, 6500, sample_rate=12000).input_shape == (None, 10, 6500)
    clips = np.random.default_rng(5).uniform(-1, 1, (3, 65000)).astype(np.float32)
    sub = to_sub_clips(tf.constant(clips), 10, 6400).numpy()
    np.testing.assert_array_equal(sub, clips.reshape(3, 10, 6500)[..., :6400])
    x = tf.constant(clips.reshape(3, 10, 6500))
    for name in ("strided_conv", "conv1", "pool1", "conv2", "pool2", "flatten", "dense", "sub_clip_probabilities",
                 "probabilities"):
        x = model.get_layer(name)(x)
    np.testing.assert_allclose(model(sub).numpy(), x.numpy(), atol=1e-6)
    out = export.export(model, models.get("cnn").layout, str(tmp_path / "cnn"), list("abcde"), 65000, {})
    served = tf.saved_model.load(out).signatures["serving_default"](waveform=tf.constant(clips))
    np.testing.assert_allclose(served["probabilities"].numpy(), model(sub).numpy(), atol=1e-6)


def test_cnn_averages_its_sub_clips():
    model = build_cnn(5, 6400, filters=4, dense_units=8)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 10, 6400)).astype(np.float32)
    per_sub = keras.Model(model.input, model.get_layer("sub_clip_probabilities").output)(x).numpy()
    np.testing.assert_allclose(model(x).numpy(), per_sub.mean(axis=1), atol=1e-6)


def test_crnn_parameter_count_and_shapes():
    model = build_crnn(50, MTAT_CLIP)
    conv = 640 + 73856 + 147584 + 147584          # 3*3*in*out + out: 1->64, 64->128, 128->128, 128->128
    bn = 4 * (64 + 128 + 128 + 128)                # gamma, beta, moving mean and variance
    gru = 3 * (128 * 32 + 32 * 32 + 2 * 32) + 3 * (32 * 32 + 32 * 32 + 2 * 32)   # Keras reset_after: 15,552 + 6,336
    dense = 32 * 50 + 50
    assert conv + bn + gru + dense == 394994
    assert model.count_params() == 394994
    assert _trainable(model) == 394994 - 2 * (64 + 128 + 128 + 128)
    assert tuple(model.get_layer("log_mel").output.shape[1:]) == (96, 1366)
    assert tuple(model.get_layer("pad_time").output.shape[1:]) == (96, 1440, 1)
    assert tuple(model.get_layer("to_sequence").output.shape[1:]) == (15, 128)
    assert model.output_shape == (None, 50)


def test_crnn_blocks_equal_the_study_order_elu_then_pool():
    """The model pools before its ELU (faster); values and gradients equal ELU-then-pool's."""
    model = build_crnn(5, 48000, filters=(4, 8, 8, 8))
    x = tf.constant(np.random.default_rng(1).uniform(-1, 1, (2, 48000)).astype(np.float32))

    def study_order(x, training):
        h = model.get_layer("pad_time")(model.get_layer("add_channel")(
            model.get_layer("log_mel")(x)))
        for i in range(1, 5):
            h = model.get_layer(f"bn{i}")(model.get_layer(f"conv{i}")(h), training=training)
            h = model.get_layer(f"pool{i}")(model.get_layer(f"elu{i}")(h))
        h = model.get_layer("gru1_elu")(model.get_layer("gru1")(model.get_layer("to_sequence")(h)))
        return model.get_layer("probabilities")(model.get_layer("gru2_elu")(model.get_layer("gru2")(h)))

    np.testing.assert_allclose(model(x, training=False).numpy(), study_order(x, False).numpy(), atol=1e-6)
    grads = []
    for fn in (lambda: model(x, training=True), lambda: study_order(x, True)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(fn() ** 2)
        grads.append(tape.gradient(loss, model.trainable_variables))
    for a, b in zip(*grads):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)


SIXTEEN_BIT = {"cnn": {"strided_conv", "conv1", "pool1", "conv2", "pool2", "flatten", "dense"},
               "crnn": {f"{kind}{i}" for kind in ("conv", "bn", "pool", "elu") for i in range(1, 5)}}


@pytest.mark.parametrize("arch", ["cnn", "crnn"])
@pytest.mark.parametrize("precision, atol", [("mixed_bfloat16", 1e-2), ("mixed_float16", 1e-3)])
def test_mixed_precision_computes_the_convolutions_in_16_bits_only(arch, precision, atol):
    """Under a mixed precision the convolutional part computes in 16 bits with float32 weights; the front
    end, the GRUs and the outputs stay float32; the float32 model's weights give its probabilities
    within 16-bit rounding; every weight gets a finite gradient; the CRNN leaves the float32-only
    tap-gradient path."""
    rng = np.random.default_rng(4)
    if arch == "cnn":
        def build(p):
            return build_cnn(5, 6400, filters=8, dense_units=16, precision=p)
        x = rng.uniform(-1, 1, (3, 10, 6400)).astype(np.float32)
    else:
        def build(p):
            return build_crnn(5, 48000, gru_units=8, filters=(8, 8, 8, 8), precision=p)
        x = rng.uniform(-1, 1, (3, 48000)).astype(np.float32)
    reference, model = build("float32"), build(precision)
    model.set_weights([w + 0.01 for w in reference.get_weights()])
    reference.set_weights(model.get_weights())
    half = precision.removeprefix("mixed_")
    assert {layer.name for layer in model.layers if layer.compute_dtype == half} == SIXTEEN_BIT[arch]
    assert {layer.compute_dtype for layer in model.layers} == {"float32", half}
    assert {w.dtype for w in model.weights} == {"float32"}
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        probs = model(x, training=True)
        loss = tf.reduce_mean(keras.losses.binary_crossentropy(tf.ones_like(probs), probs))
    grads = tape.gradient(loss, model.trainable_weights)
    assert probs.dtype == tf.float32
    np.testing.assert_allclose(probs.numpy(), reference(x, training=True).numpy(), atol=atol)
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)
    if arch == "crnn":
        graph = tf.function(model).get_concrete_function(tf.TensorSpec(x.shape)).graph
        assert not [op for op in graph.get_operations() if op.type == "IdentityN"]


def test_crnn_gru_units_flag():
    model = build_crnn(50, MTAT_CLIP, gru_units=15)
    gru = 3 * (128 * 15 + 15 * 15 + 2 * 15) + 3 * (15 * 15 + 15 * 15 + 2 * 15)
    assert model.count_params() == 640 + 73856 + 147584 + 147584 + 4 * 448 + gru + 15 * 50 + 50


def test_too_short_input_is_refused():
    from tagger.models import DoesNotFit
    with pytest.raises(DoesNotFit, match="does not fit sub-clips of 0.62 s"):
        build_cnn(10, 10000, 1024, 1024)
    with pytest.raises(DoesNotFit, match="pool"):
        build_crnn(10, 4000)


@pytest.mark.parametrize("arch", ["cnn", "crnn"])
def test_overfits_one_batch(arch):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if arch == "cnn":
        model = build_cnn(6, 6400, filters=8, dense_units=32)
        x = rng.uniform(-1, 1, (8, 10, 6400)).astype(np.float32)
    else:
        model = build_crnn(6, 64000, gru_units=16, filters=(8, 16, 16, 16), bn_momentum=0.5)
        x = rng.uniform(-1, 1, (8, 64000)).astype(np.float32)
    y = (rng.uniform(size=(8, 6)) < 0.5).astype(np.float32)
    model.compile(keras.optimizers.Adam(3e-3), "binary_crossentropy")
    first = model.evaluate(x, y, verbose=0)
    batch = tf.data.Dataset.from_tensors((x, y)).repeat()
    model.fit(batch, steps_per_epoch=250, epochs=1, verbose=0)
    assert first > 0.5
    assert model.evaluate(x, y, verbose=0) < 0.05
