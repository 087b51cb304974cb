"""musicnn's VGG-like baseline (Pons & Serra, ISMIR 2019 LBD), layer for layer as its `models.py`
defines `vgg`: a batch norm on the 187 x 96 log-mel patch, five [3x3 convolution of 128 filters, ReLU,
batch norm, max pooling] blocks (pooling 4x1 at stride 2x2, then 2x2 three times at stride 2, then 4x4
at stride 4; the MSD checkpoint's own graph pools 4x1 then 1x4 first, see `build_vgg_network`),
dropout 0.25 between blocks, the flattened 2 x 1 x 128 map (the `embedding`) through dropout 0.5 and
the output layer. 605,748 trainable parameters in 24 tensors for 50 tags, as the authors' MTT and MSD
checkpoints (tagger.convert musicnn). A clip or track is tagged as the mean of its patches (`Patches`).
"""
from tagger.models.family import Family, Option
from tagger.models.musicnn import LAYOUT, NUM_MEL_BINS

POOLS = (((4, 1), (2, 2)), ((2, 2), (2, 2)), ((2, 2), (2, 2)), ((2, 2), (2, 2)), ((4, 4), (4, 4)))


def build_vgg_network(num_tags, frames=187, num_mel_bins=NUM_MEL_BINS, filters=128, pools=POOLS, bn_momentum=0.99,
                      precision="float32", name="vgg_network"):
    """(batch, frames, num_mel_bins) log-mel patches -> (batch, num_tags) probabilities; `pools`: each
    block's ((pool height, width), (strides)), time first. musicnn's code pools as POOLS; its MSD_vgg
    checkpoint was trained with 4x1 then 1x4 (each at its own stride), as its .meta graph records and
    tagger.convert reads."""
    import keras
    from keras import layers

    from tagger.kernels import SingleChannelConv2D

    patches = keras.Input((frames, num_mel_bins), name="log_mel")
    x = layers.Reshape((frames, num_mel_bins, 1), name="add_channel")(patches)
    x = layers.BatchNormalization(momentum=bn_momentum, name="input_bn", dtype=precision)(x)
    for i, (pool, strides) in enumerate(pools, 1):
        if i > 1:
            x = layers.Dropout(0.25, name=f"dropout{i - 1}")(x)
        conv = SingleChannelConv2D if i == 1 else layers.Conv2D        # the first reads the one-channel input
        x = conv(filters, 3, padding="same", activation="relu", name=f"conv{i}", dtype=precision)(x)
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"bn{i}", dtype=precision)(x)
        x = layers.MaxPooling2D(pool, strides, name=f"pool{i}", dtype=precision)(x)
    x = layers.Flatten(name="embedding", dtype=precision)(x)
    x = layers.Dropout(0.5, name="dropout5")(x)
    probs = layers.Dense(num_tags, activation="sigmoid", name="tags", dtype="float32")(x)
    return keras.Model(patches, probs, name=name)


def build(num_tags, clip_samples, width=1.0, precision="float32", bn_momentum=0.99):
    from tagger.models.layers import patch_model
    LAYOUT.check(clip_samples)
    network = build_vgg_network(num_tags, filters=max(1, round(128 * width)), bn_momentum=bn_momentum,
                                precision=precision)
    return patch_model(network, LAYOUT, "vgg")


FAMILY = Family(
    name="vgg",
    summary="Pons & Serra 2019: musicnn's VGG-like baseline, five 3x3 convolution blocks on 3 s log-mel patches",
    build=build,
    layout=LAYOUT,
    study=dict(optimizer="adam", lr=1e-3, momentum=0.0, batch_size=32, epochs=200, weight_decay=1e-5),
    # Half the filters, batches of 16 and a faster batch-norm average (with 0.99 the moving statistics
    # lag the few hundred demo steps: test ROC-AUC 0.76 instead of 0.89): under 2 minutes on 2 cores.
    demo=dict(epochs=20, width=0.5, batch_size=16, lr=2e-3, bn_momentum=0.9),
    options=(Option("bn_momentum", float, 0.99, "batch-norm moving-average momentum", low=0, high=1),),
    embedding="embedding",
    head="tags",
)
