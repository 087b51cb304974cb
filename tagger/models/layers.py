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
