"""Layers the families share to read a clip in pieces (pure TensorFlow, saved with the model)."""
import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="tagger")
class FoldChunks(keras.layers.Layer):
    """(batch, chunks, samples) -> (batch * chunks, samples): every chunk through the model as one example."""

    def call(self, x):
        return tf.reshape(x, [-1, x.shape[-1]])

    def compute_output_shape(self, input_shape):
        return (None, input_shape[-1])


@keras.saving.register_keras_serializable(package="tagger")
class MeanOverChunks(keras.layers.Layer):
    """[(batch * chunks, tags) predictions, the (batch, chunks, samples) input] -> (batch, tags): each
    clip's prediction is the mean of its chunks'."""

    def call(self, inputs):
        per_chunk, chunks = inputs
        shape = tf.shape(chunks)
        return tf.reduce_mean(tf.reshape(per_chunk, [shape[0], shape[1], per_chunk.shape[-1]]), axis=1)

    def compute_output_shape(self, input_shapes):
        return (input_shapes[1][0], input_shapes[0][-1])


def patch_model(network, layout, name):
    """Waveform patches (batch, patches, layout.samples) -> the mean over patches of `network`, a
    Keras model from (frames, 96) log-mel patches, musicnn's front end (16 kHz, FFT 512, hop 256, 96
    Slaney mel bands, log10(10000 x + 1)) computed inside as uncentred frames of each patch, which are
    the centred frames of the whole (`Patches`)."""
    from tagger.features import LogMelSpectrogram

    patches = keras.Input((None, layout.samples), name="waveform")
    x = FoldChunks(name="fold_patches")(patches)
    x = LogMelSpectrogram(16000, layout.fft, layout.hop, 96, center=False, compression="musicnn", name="log_mel",
                          dtype="float32")(x)
    x = keras.layers.Permute((2, 1), name="time_major", dtype="float32")(x)       # (frames, mel), as musicnn
    probs = network(x)
    return keras.Model(patches, MeanOverChunks(name="probabilities", dtype="float32")([probs, patches]), name=name)


def embedding_model(model, layer_name, layout, with_probabilities=False):
    """A model from `model`'s input to the output of its layer `layer_name` (also inside a nested
    network), pooled over a clip's pieces as the probabilities are: one vector per model input; with
    `with_probabilities`, [that, the model's probabilities] from one pass."""
    names = [layer.name for layer in model.layers]
    if layer_name in names:
        features, probabilities = model.get_layer(layer_name).output, model.output
    else:
        # A nested network is patch_model's, its output pooled by the model's last layer: one pass of
        # the network gives both its layer's output and the probabilities (pooled by that same layer).
        network = next(layer for layer in model.layers if isinstance(layer, keras.Model)
                       and layer_name in [inner.name for inner in layer.layers])
        inner = keras.Model(network.input, [network.get_layer(layer_name).output, network.output])
        features, pieces = inner(network._inbound_nodes[0].input_tensors[0])  # what feeds it in `model`
        probabilities = model.layers[-1]([pieces, model.input])
    pooled = layout.pool_pieces(features, model.input)
    return keras.Model(model.input, [pooled, probabilities] if with_probabilities else pooled,
                       name=f"{model.name}_embedding")
