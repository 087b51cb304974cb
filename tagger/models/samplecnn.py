"""SampleCNN (Lee et al., "Sample-level deep convolutional neural networks for music auto-tagging
using raw waveforms", SMC 2017), as Won et al. (2020) train it in minzwon/sota-music-tagging-models.

A chunk of 59,049 = 3^10 raw samples at 16 kHz (3.69 s) goes through eleven [Conv1D -> batch norm ->
ReLU] blocks: 128 filters of 3 taps at stride 3 (sample-level frames); nine blocks of 3-tap
convolutions, each followed by max pooling by 3, which bring the 19,683 frames down to one; a 1-tap
convolution; then dropout 0.5 and a dense sigmoid layer. 1,869,874 trainable parameters for 50 tags,
as the reference. A clip is tagged as the mean of its chunks' probabilities (`Chunks`).

Batch norm as PyTorch's defaults (the reference's framework): momentum 0.1 there, 0.9 in Keras's
convention; epsilon 1e-5. The convolutions pad as Keras's "same"; the reference pads one zero on
each side, which shifts the first block's frames by one sample.
"""
from tagger.models.family import Chunks, DoesNotFit, Family
from tagger.schedules import WON2020_PRESET

CHUNK_SAMPLES = 59049
FILTERS = (128, 128, 128, 256, 256, 256, 256, 256, 256, 512, 512)


def build_samplecnn(num_tags, chunk_samples=CHUNK_SAMPLES, filters=FILTERS, dropout=0.5, bn_momentum=0.9,
                    bn_epsilon=1e-5, precision="float32", name="samplecnn"):
    """(batch, chunks, chunk_samples) -> (batch, num_tags): the mean over chunks of
    Conv1D(filters[0], 3, stride 3) -> [Conv1D(f, 3) -> MaxPool(3)] for filters[1:10] ->
    Conv1D(filters[10], 1) -> Dropout -> Dense(num_tags, sigmoid), each convolution followed by
    batch norm and ReLU. The batch norms are `FusedBatchNormalization` (tagger.kernels)."""
    import keras
    from keras import layers

    from tagger.kernels import FusedBatchNormalization
    from tagger.models.layers import FoldChunks, MeanOverChunks

    def block(x, i, f, taps, strides=1, pool=1):
        x = layers.Conv1D(f, taps, strides=strides, padding="same", name=f"conv{i}", dtype=precision)(x)
        x = FusedBatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon, name=f"bn{i}", dtype=precision)(x)
        x = layers.ReLU(name=f"relu{i}", dtype=precision)(x)
        return layers.MaxPooling1D(pool, name=f"pool{i}", dtype=precision)(x) if pool > 1 else x

    chunks = keras.Input((None, chunk_samples), name="waveform")
    x = FoldChunks(name="fold_chunks")(chunks)
    x = layers.Reshape((chunk_samples, 1), name="add_channel")(x)
    x = block(x, 1, filters[0], 3, strides=3)
    for i, f in enumerate(filters[1:-1], 2):
        x = block(x, i, f, 3, pool=3)
    x = block(x, len(filters), filters[-1], 1)
    if x.shape[1] != 1:
        raise DoesNotFit(f"chunks of {chunk_samples} samples leave {x.shape[1]} frames after the poolings, not "
                         "one: SampleCNN takes 3^10 = 59,049")
    x = layers.Reshape((filters[-1],), name="flatten", dtype=precision)(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    x = layers.Dense(num_tags, activation="sigmoid", name="chunk_probabilities", dtype="float32")(x)
    probs = MeanOverChunks(name="probabilities", dtype="float32")([x, chunks])
    return keras.Model(chunks, probs, name=name)


def build(num_tags, clip_samples, width=1.0, precision="float32"):
    FAMILY.layout.check(clip_samples)
    return build_samplecnn(num_tags, filters=tuple(max(1, round(f * width)) for f in FILTERS), precision=precision)


FAMILY = Family(
    name="samplecnn",
    summary="Lee et al. 2017: SampleCNN, sample-level 1-D convolutions on 3.69 s raw-audio chunks",
    build=build,
    layout=Chunks(CHUNK_SAMPLES, eval_count=16),
    study=WON2020_PRESET,        # Won et al. 2020's recipe (tagger.schedules)
    # A quarter of the channels and Adam at 1e-3 for 40 epochs: test ROC-AUC above 0.85 on the demo in under
    # 3 minutes on 2 cores (README).
    demo=dict(lr=1e-3, epochs=40, width=0.25, schedule="constant"),
    embedding="flatten",
    head="chunk_probabilities",
)
