"""Choi et al. (2017): a convolutional recurrent network on log-mel spectrograms, as the replication
study trains it (after Panwar et al. 2017).

The 16 kHz clip is resampled to 12 kHz and turned into a 96-band log-mel spectrogram (FFT 512, hop
256) inside the model; 37 zero frames pad each end of time; four [Conv2D 3x3 -> batch norm -> ELU ->
max pooling] blocks reduce the 96 bands to one row; two GRU layers summarise time; a dense sigmoid
layer gives the tags. Input: (batch, clip_samples) float32 waveforms in [-1, 1].

`precision` is a Keras dtype policy for the convolutional blocks: "float32" (the default), or
"mixed_bfloat16" / "mixed_float16". The front end, the GRUs and the output layer stay float32.
"""
from tagger.models.family import DoesNotFit, Family, Option, WholeClip

FILTERS = (64, 128, 128, 128)
POOLS = ((2, 2), (3, 3), (4, 4), (4, 4))


def build_crnn(num_tags, clip_samples, gru_units=32, filters=FILTERS, pools=POOLS, num_mel_bins=96, fft_length=512,
               sequence_stride=256, pad_frames=37, sample_rate=12000, input_rate=16000, bn_momentum=0.99,
               precision="float32", name="crnn"):
    """CRNN: LogMelSpectrogram (resampling to `sample_rate` first) -> `pad_frames` zero frames at
    each end of time (Choi et al.'s ZeroPadding2D) -> four [Conv2D 3x3 -> BatchNorm -> ELU ->
    MaxPool] blocks -> two GRU layers over time, each followed by an ELU layer -> Dense(num_tags,
    sigmoid).

    The convolutions are `TapGradientConv2D` and the batch norms `FusedBatchNormalization`
    (tagger.kernels: Conv2D and BatchNormalization computed faster on CPUs). The GRUs keep their
    default tanh/sigmoid so that cuDNN serves them on a GPU, and float32 under a mixed `precision`:
    they are a small part of the work, and recurrence accumulates 16-bit rounding.
    """
    import keras
    from keras import layers

    from tagger.features import LogMelSpectrogram
    from tagger.kernels import FusedBatchNormalization, TapGradientConv2D

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
        if x.shape[1] < pool[0] or x.shape[2] < pool[1]:       # (newer Keras refuses to pool to nothing)
            break
        x = layers.MaxPooling2D(pool, name=f"pool{i}", dtype=precision)(x)
        x = layers.ELU(name=f"elu{i}", dtype=precision)(x)
    if i < len(pools) or x.shape[1] != 1 or not x.shape[2]:
        raise DoesNotFit(f"{num_mel_bins} mel bins / {clip_samples} samples do not pool down to one "
                         f"frequency row and at least one time step (got {x.shape[1]} x {x.shape[2]})")
    x = layers.Reshape((x.shape[2], filters[-1]), name="to_sequence", **f32)(x)
    x = layers.GRU(gru_units, return_sequences=True, name="gru1", **f32)(x)
    x = layers.ELU(name="gru1_elu", **f32)(x)
    x = layers.GRU(gru_units, name="gru2", **f32)(x)
    x = layers.ELU(name="gru2_elu", **f32)(x)
    probs = layers.Dense(num_tags, activation="sigmoid", name="probabilities", **f32)(x)
    return keras.Model(waves, probs, name=name)


def build(num_tags, clip_samples, width=1.0, precision="float32", gru_units=32, bn_momentum=0.99):
    return build_crnn(num_tags, clip_samples, gru_units=gru_units, filters=tuple(max(1, round(f * width)) for f in FILTERS),
                      bn_momentum=bn_momentum, precision=precision)


FAMILY = Family(
    name="crnn",
    summary="Choi et al. 2017: log-mel CRNN (four conv blocks, two GRUs) on whole clips",
    build=build,
    layout=WholeClip(),
    study=dict(optimizer="adam", lr=1e-4, momentum=0.0, batch_size=16, epochs=20),
    # Adam at 2e-3 and a faster batch-norm average converge in the few hundred steps the demo affords.
    # The fifth epoch is margin: after four, test ROC-AUC moved between 0.845 and 0.869 with the
    # float32 rounding of front-end changes.
    demo=dict(lr=2e-3, bn_momentum=0.9, epochs=5),
    options=(Option("gru_units", int, 32, "units of each GRU layer (Choi et al.: 32; the study: 15)", low=1),
             Option("bn_momentum", float, 0.99, "batch-norm moving-average momentum", low=0, high=1)),
    run_name="-gru{gru_units}",
    embedding="gru2_elu",
)
