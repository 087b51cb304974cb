"""Dieleman & Schrauwen (ICASSP 2014): a CNN on raw audio, as the replication study trains it.

Each clip is cut into 10 consecutive sub-clips; each sub-clip goes through a strided convolution
(the learned front end), two [convolution -> max pooling] blocks and two dense layers; the model
averages the 10 sub-clips' tag probabilities. Input: 16 kHz float32 waveforms in [-1, 1] as
(batch, 10, samples), each sub-clip without the few samples after the strided convolution's last
frame (`cnn_input_samples`); it reads the 16 kHz samples directly, as the PyTorch peer in
../shared/bench does (`sample_rate=12000` resamples first, inside the model).

`precision` is a Keras dtype policy for the convolutional and hidden dense layers: "float32" (the
default), or "mixed_bfloat16" / "mixed_float16" for GPUs and CPUs with 16-bit matrix units. The
output layers stay float32.
"""
from tagger.models.family import DoesNotFit, Family, Option, SubClips

INPUT_RATE = 16000
NUM_SUB_CLIPS = 10
# The study's (filter length, stride) pairs of the strided convolution (its Table II).
STUDY_PAIRS = ((1024, 1024), (1024, 512), (512, 512), (512, 256), (256, 256))


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
    every batch, and without that copy the CNN trains 1.13 x faster on 16 CPU cores
    (docs/performance.md). Resampling inside the model (`sample_rate` != `input_rate`) needs every
    sample.
    """
    if sample_rate != input_rate or sub_clip_samples < length:
        return sub_clip_samples
    return sub_clip_samples - (sub_clip_samples - length) % stride


def build_cnn(num_tags, sub_clip_samples, length=256, stride=256, num_sub_clips=NUM_SUB_CLIPS, filters=32,
              dense_units=100, sample_rate=INPUT_RATE, input_rate=INPUT_RATE, precision="float32", name="cnn"):
    """Raw-audio CNN: Conv1D(filters, length, stride) -> [Conv1D(filters, 8, same) -> MaxPool(4)] x 2
    -> Dense(dense_units) -> Dense(num_tags, sigmoid), ReLU after the convolutions and the first dense
    layer, applied to each sub-clip; the sub-clip probabilities are averaged. Sub-clips of
    `sub_clip_samples`; the input is (batch, num_sub_clips, cnn_input_samples(...)), their first samples.

    The strided convolution is `StridedConv1D` (Conv1D's weights and arithmetic as matrix products);
    the other 1-D layers run as 2-D layers with a kernel height of 1 over (sub-clip, time), so the 10
    sub-clips need no reshape into the batch: the weights and arithmetic are exactly Conv1D's.
    """
    import keras
    from keras import layers

    from tagger.features import Resample
    from tagger.kernels import StridedConv1D

    if cnn_frames(sub_clip_samples, length, stride, sample_rate, input_rate) < 1:
        raise DoesNotFit(f"length {length} / stride {stride} does not fit sub-clips of "
                         f"{sub_clip_samples / input_rate:.2f} s: the poolings leave no time step; use a smaller "
                         "--length/--stride or longer clips")
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


def build(num_tags, clip_samples, width=1.0, precision="float32", length=256, stride=256):
    return build_cnn(num_tags, clip_samples // NUM_SUB_CLIPS, length, stride,
                     filters=max(1, round(32 * width)), dense_units=max(1, round(100 * width)), precision=precision)


def validate(given):
    if ("length" in given) != ("stride" in given):
        return ("give --length and --stride together (the study's pairs: "
                + ", ".join(f"{a}/{b}" for a, b in STUDY_PAIRS) + ")")
    return None


FAMILY = Family(
    name="cnn",
    summary="Dieleman & Schrauwen 2014: strided convolution on raw audio, 10 sub-clips averaged",
    build=build,
    layout=SubClips(NUM_SUB_CLIPS),
    # The replication study's settings (its Table I's best cell).
    study=dict(optimizer="sgd", lr=0.005, momentum=0.99, batch_size=10, epochs=20),
    # A few hundred short synthetic clips on a laptop CPU: Adam converges in the steps the demo affords;
    # the study's SGD does not.
    demo=dict(optimizer="adam", lr=1e-3, epochs=40),
    options=(Option("length", int, 256, "filter length of the strided convolution", low=1),
             Option("stride", int, 256, "its stride", low=1)),
    run_name="-l{length}s{stride}",
    search={"optimizer": "sgd", "momentum": (0.99, 0.97, 0.95, 0.9, 0.0), "lr": (0.001, 0.002, 0.005, 0.01, 0.02),
            "demo_epochs": 10},
    validate=validate,
    embedding="dense",
    head="sub_clip_probabilities",
)
