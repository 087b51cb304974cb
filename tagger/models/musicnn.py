"""musicnn (Pons & Serra, "musicnn: pre-trained convolutional neural networks for music audio tagging",
ISMIR 2019 LBD; Pons et al. 2018), layer for layer as its `models.py` defines `build_musicnn`.

A patch of 187 frames (3 s) x 96 mel bands of log10(10000 x + 1) mel power, after a batch norm, goes
through musicnn's front end of timbral filters (204 of 7 frames x 38 and x 67 bands) and temporal
filters (51 of 128, 64 and 32 frames x 1 band), each max-pooled over frequency; a mid-end of three
7-frame convolutions of 64 filters with residual connections, whose outputs are concatenated with the
front end's (dense connections); a back-end of max and mean pooling over time, batch norm, a dense layer
of 200 units (the penultimate features: `embedding`) and the output layer. Each convolution is followed
by ReLU and batch norm, as musicnn's. The front end's convolutions of the one-channel spectrogram are
`SingleChannelConv2D` (tagger.kernels: Conv2D with a faster input gradient on CPUs). 787,159 trainable
parameters in 42 tensors for 50 tags, as the authors' MTT and MSD checkpoints (tagger.convert musicnn).
A clip or track is tagged as the mean of its patches (`Patches`).
"""
from tagger.models.family import Family, Option, Patches

LAYOUT = Patches(frames=187, hop=256, fft=512)
NUM_MEL_BINS = 96


def build_musicnn_network(num_tags, frames=187, num_mel_bins=NUM_MEL_BINS, timbral_filters=204, temporal_filters=51,
                          midend_filters=64, backend_units=200, precision="float32", name="musicnn_network"):
    """(batch, frames, num_mel_bins) log-mel patches -> (batch, num_tags) probabilities. The layers are
    named after the parts of musicnn's diagram; `tagger.convert` maps the authors' variables onto them."""
    import keras
    from keras import layers

    from tagger.kernels import SingleChannelConv2D

    def bn(name):
        return layers.BatchNormalization(name=name, dtype=precision)

    def max_over_frequency(x, name):
        x = layers.MaxPooling2D((1, x.shape[2]), name=f"{name}_pool", dtype=precision)(x)
        return layers.Reshape((frames, x.shape[-1]), name=f"{name}_squeeze", dtype=precision)(x)

    patches = keras.Input((frames, num_mel_bins), name="log_mel")
    x = layers.Reshape((frames, num_mel_bins, 1), name="add_channel")(patches)
    x = bn("input_bn")(x)
    front = []
    padded = layers.ZeroPadding2D(((3, 3), (0, 0)), name="timbral_pad", dtype=precision)(x)
    for part, share in (("timbral74", 0.4), ("timbral77", 0.7)):      # 7 frames x 40 % or 70 % of the bands
        y = SingleChannelConv2D(timbral_filters, (7, int(share * num_mel_bins)), activation="relu",
                                name=f"{part}_conv", dtype=precision)(padded)
        front.append(max_over_frequency(bn(f"{part}_bn")(y), part))
    for length in (128, 64, 32):
        part = f"temporal{length}"
        y = SingleChannelConv2D(temporal_filters, (length, 1), padding="same", activation="relu",
                                name=f"{part}_conv", dtype=precision)(x)
        front.append(max_over_frequency(bn(f"{part}_bn")(y), part))
    front = layers.Concatenate(name="frontend", dtype=precision)(front)
    mid = [front]
    for i in (1, 2, 3):
        y = layers.Conv1D(midend_filters, 7, padding="same", activation="relu", name=f"midend{i}_conv",
                          dtype=precision)(mid[-1])
        y = bn(f"midend{i}_bn")(y)
        mid.append(y if i == 1 else layers.Add(name=f"midend{i}_residual", dtype=precision)([y, mid[-1]]))
    features = layers.Concatenate(name="midend", dtype=precision)(mid)
    pools = [layers.Reshape((features.shape[-1], 1), name=f"{kind}_pool_column", dtype=precision)(pool(
        name=f"{kind}_pool", dtype=precision)(features)) for kind, pool in (
            ("max", layers.GlobalMaxPooling1D), ("mean", layers.GlobalAveragePooling1D))]
    # musicnn flattens (features, [max, mean]): each feature's max and mean side by side.
    pooled = layers.Flatten(name="temporal_pool", dtype=precision)(
        layers.Concatenate(name="max_and_mean", dtype=precision)(pools))
    x = layers.Dropout(0.5, name="backend_dropout")(bn("backend_bn")(pooled))
    x = layers.Dense(backend_units, activation="relu", name="penultimate_dense", dtype=precision)(x)
    x = bn("embedding")(x)
    x = layers.Dropout(0.5, name="penultimate_dropout")(x)
    probs = layers.Dense(num_tags, activation="sigmoid", name="tags", dtype="float32")(x)
    return keras.Model(patches, probs, name=name)


def build(num_tags, clip_samples, width=1.0, precision="float32", midend_filters=64, backend_units=200):
    from tagger.models.layers import patch_model
    LAYOUT.check(clip_samples)
    network = build_musicnn_network(num_tags, timbral_filters=max(1, round(204 * width)),
                                    temporal_filters=max(1, round(51 * width)),
                                    midend_filters=max(1, round(midend_filters * width)),
                                    backend_units=max(1, round(backend_units * width)), precision=precision)
    return patch_model(network, LAYOUT, "musicnn")


FAMILY = Family(
    name="musicnn",
    summary="Pons & Serra 2019: musicnn, timbral and temporal filters on 3 s log-mel patches",
    build=build,
    layout=LAYOUT,
    # musicnn-training's settings (Adam 1e-3, batch 32, L2 1e-5; it also halves the learning rate after
    # 75 epochs without improvement, not reproduced here).
    study=dict(optimizer="adam", lr=1e-3, momentum=0.0, batch_size=32, epochs=200, weight_decay=1e-5),
    # A quarter of the filters and Adam at 2e-3: test ROC-AUC 0.87 on the demo in under 4 minutes on 2 cores.
    demo=dict(epochs=20, width=0.25, lr=2e-3),
    options=(Option("midend_filters", int, 64, "filters of each mid-end convolution (MSD_musicnn_big: 512)", low=1),
             Option("backend_units", int, 200, "units of the penultimate dense layer (MSD_musicnn_big: 500)", low=1)),
    embedding="embedding",
    head="tags",
)
