"""The short-chunk ResNet (Won et al., "Evaluation of CNN-based automatic music tagging models", SMC
2020; `ShortChunkCNN_Res` in minzwon/sota-music-tagging-models), the best model trained from scratch
on MagnaTagATune in that comparison (ROC-AUC 0.9129, PR-AUC 0.4614).

A chunk of 59,049 samples at 16 kHz (3.69 s) becomes a 128-band log-mel spectrogram (STFT 512, hop
256, 0 to 8 kHz, power in dB: 128 x 231), normalised by one batch norm; seven residual blocks, each
[Conv2D 3x3 stride 2 -> batch norm -> ReLU -> Conv2D 3x3 -> batch norm] plus a [Conv2D 3x3 stride 2
-> batch norm] shortcut, ReLU after the sum, with 128, 128, 256, 256, 256, 256 and 512 channels,
bring it to 1 x 2; global max pooling over time; Dense 512 -> batch norm -> ReLU -> dropout 0.5 ->
Dense sigmoid. 12,104,244 trainable parameters for 50 tags, as the reference. A clip is tagged as the
mean of its chunks' probabilities (`Chunks`).

The front end is tagger's `LogMelSpectrogram`, librosa's log-mel (Slaney mel scale, area-normalised
filters, zero padding of the centred frames), not torchaudio's defaults that the reference uses (HTK
mel scale, unnormalised filters, reflect padding): it is the one front end this project tests
against its reference (librosa), the PyTorch peer of ../shared/bench computes the same, and the
difference is a fixed filterbank (a per-band gain, which the first convolution learns around) and
the padding of the first and last frames. Batch norm as PyTorch's defaults (Keras momentum 0.9,
epsilon 1e-5). The stride-2 convolutions pad as Keras's "same" (one zero row after, none before, on
even sizes), the reference one on each side: the same shapes, the sampling grid shifted by one.
"""
from tagger.models.family import Chunks, Family
from tagger.schedules import WON2020_PRESET

CHUNK_SAMPLES = 59049
CHANNELS = 128
WIDTHS = (1, 1, 2, 2, 2, 2, 4)        # block channels, in multiples of `channels`


def build_shortres(num_tags, chunk_samples=CHUNK_SAMPLES, channels=CHANNELS, num_mel_bins=128, fft_length=512,
                   sequence_stride=256, fmax=8000.0, dropout=0.5, bn_momentum=0.9, bn_epsilon=1e-5,
                   precision="float32", name="shortres"):
    """(batch, chunks, chunk_samples) -> (batch, num_tags): the mean over chunks of LogMelSpectrogram
    -> BatchNorm -> 7 residual blocks (`channels` x WIDTHS) -> max over time -> Dense -> BatchNorm ->
    ReLU -> Dropout -> Dense(num_tags, sigmoid). The batch norms are `FusedBatchNormalization`
    (tagger.kernels)."""
    import keras
    from keras import layers

    from tagger.features import LogMelSpectrogram
    from tagger.kernels import FusedBatchNormalization
    from tagger.models.layers import FoldChunks, MeanOverChunks

    def bn(name, dtype=precision):
        return FusedBatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon, name=name, dtype=dtype)

    def residual(x, i, f):
        y = layers.Conv2D(f, 3, strides=2, padding="same", name=f"res{i}_conv1", dtype=precision)(x)
        y = layers.ReLU(name=f"res{i}_relu1", dtype=precision)(bn(f"res{i}_bn1")(y))
        y = bn(f"res{i}_bn2")(layers.Conv2D(f, 3, padding="same", name=f"res{i}_conv2", dtype=precision)(y))
        shortcut = layers.Conv2D(f, 3, strides=2, padding="same", name=f"res{i}_conv3", dtype=precision)(x)
        y = layers.Add(name=f"res{i}_add", dtype=precision)([y, bn(f"res{i}_bn3")(shortcut)])
        return layers.ReLU(name=f"res{i}_relu", dtype=precision)(y)

    f32 = dict(dtype="float32")
    chunks = keras.Input((None, chunk_samples), name="waveform")
    x = FoldChunks(name="fold_chunks")(chunks)
    x = LogMelSpectrogram(16000, fft_length, sequence_stride, num_mel_bins, fmax=fmax, name="log_mel", **f32)(x)
    x = layers.Reshape((num_mel_bins, -1, 1), name="add_channel", **f32)(x)
    x = bn("spec_bn", "float32")(x)
    for i, w in enumerate(WIDTHS, 1):
        x = residual(x, i, channels * w)
    x = layers.GlobalMaxPooling2D(name="max_over_time", dtype=precision)(x)      # 1 x 2 after the blocks
    x = layers.Dense(channels * WIDTHS[-1], name="dense1", dtype=precision)(x)
    x = layers.ReLU(name="dense1_relu", dtype=precision)(bn("dense1_bn")(x))
    x = layers.Dropout(dropout, name="dropout")(x)
    x = layers.Dense(num_tags, activation="sigmoid", name="chunk_probabilities", **f32)(x)
    probs = MeanOverChunks(name="probabilities", **f32)([x, chunks])
    return keras.Model(chunks, probs, name=name)


def build(num_tags, clip_samples, width=1.0, precision="float32"):
    FAMILY.layout.check(clip_samples)
    return build_shortres(num_tags, channels=max(1, round(CHANNELS * width)), precision=precision)


FAMILY = Family(
    name="shortres",
    summary="Won et al. 2020: short-chunk ResNet, seven residual blocks on 128-band log-mels of 3.69 s chunks",
    build=build,
    layout=Chunks(CHUNK_SAMPLES, eval_count=16),
    study=WON2020_PRESET,        # Won et al. 2020's recipe (tagger.schedules)
    # A quarter of the channels and Adam at 1e-3 for 30 epochs: test ROC-AUC above 0.85 on the demo in under
    # 3 minutes on 2 cores (README).
    demo=dict(lr=1e-3, epochs=30, width=0.25, schedule="constant"),
    embedding="dense1_relu",
    head="chunk_probabilities",
)
