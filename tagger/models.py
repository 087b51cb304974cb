"""The study's two architectures as Keras functional models, chosen by name through `BUILDERS`.

Both take 16 kHz float32 waveforms in [-1, 1]:
- `build_cnn`: Dieleman & Schrauwen (2014) on raw audio; input (batch, 10, sub_clip_samples), the
  clip cut into 10 consecutive sub-clips whose predictions are averaged inside the model. It reads
  the 16 kHz samples directly, as the PyTorch peer in ../shared/bench does (`sample_rate=12000`
  resamples first, inside the model).
- `build_crnn`: Choi et al. (2017) on log-mel spectrograms of the clip resampled to 12 kHz inside
  the model; input (batch, clip_samples).
"""
import keras
import tensorflow as tf
from keras import layers

from tagger.features import LogMelSpectrogram, Resample

INPUT_RATE = 16000


@keras.saving.register_keras_serializable(package="tagger")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras's BatchNormalization over the channels of NHWC images, computed by TensorFlow's fused
    kernel (one op forward, one backward) instead of Keras 3's moments-and-arithmetic graph, which
    costs the CRNN most of its CPU training time. Same variables, same update rule.
    """

    def call(self, inputs, training=None, mask=None):
        if len(inputs.shape) != 4 or self.axis not in (-1, 3) or mask is not None:
            return super().call(inputs, training=training, mask=mask)
        gamma = self.gamma if self.scale else tf.ones_like(self.moving_mean)
        beta = self.beta if self.center else tf.zeros_like(self.moving_mean)
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, epsilon=self.epsilon, is_training=True)
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(
                self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
            return outputs
        outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
            inputs, gamma, beta, mean=self.moving_mean, variance=self.moving_variance,
            epsilon=self.epsilon, is_training=False)
        return outputs


def cnn_frames(sub_clip_samples, length, stride, sample_rate=INPUT_RATE, input_rate=INPUT_RATE):
    """Time steps left after the strided convolution and the two poolings (0: the clip is too short)."""
    n = -(-sub_clip_samples * sample_rate // input_rate) if sample_rate != input_rate else sub_clip_samples
    frames = (n - length) // stride + 1 if n >= length else 0
    return frames // 4 // 4


def build_cnn(num_tags, sub_clip_samples, length=256, stride=256, num_sub_clips=10, filters=32,
              dense_units=100, sample_rate=INPUT_RATE, input_rate=INPUT_RATE, name="cnn"):
    """Raw-audio CNN: Conv1D(filters, length, stride) -> [Conv1D(filters, 8, same) -> MaxPool(4)] x 2
    -> Dense(dense_units) -> Dense(num_tags, sigmoid), ReLU after the convolutions and the first dense
    layer, applied to each sub-clip; the sub-clip probabilities are averaged.

    The 1-D layers run as 2-D layers with a kernel height of 1 over (sub-clip, time), so the 10
    sub-clips need no reshape into the batch: the weights and arithmetic are exactly Conv1D's.
    """
    if cnn_frames(sub_clip_samples, length, stride, sample_rate, input_rate) < 1:
        raise ValueError(f"sub-clips of {sub_clip_samples} samples are too short for length {length} / "
                         f"stride {stride}: the two poolings leave no time step")
    waves = keras.Input((num_sub_clips, sub_clip_samples), name="waveform")
    x = Resample(input_rate, sample_rate, name="resample")(waves) if sample_rate != input_rate else waves
    x = layers.Reshape((num_sub_clips, -1, 1), name="add_channel")(x)
    x = layers.Conv2D(filters, (1, length), strides=(1, stride), activation="relu", name="strided_conv")(x)
    for i in (1, 2):
        x = layers.Conv2D(filters, (1, 8), padding="same", activation="relu", name=f"conv{i}")(x)
        x = layers.MaxPooling2D((1, 4), name=f"pool{i}")(x)
    x = layers.Reshape((num_sub_clips, -1), name="flatten")(x)
    x = layers.Dense(dense_units, activation="relu", name="dense")(x)
    x = layers.Dense(num_tags, activation="sigmoid", name="sub_clip_probabilities")(x)
    probs = layers.GlobalAveragePooling1D(name="probabilities")(x)
    return keras.Model(waves, probs, name=name)


def build_crnn(num_tags, clip_samples, gru_units=32, filters=(64, 128, 128, 128),
               pools=((2, 2), (3, 3), (4, 4), (4, 4)), num_mel_bins=96, fft_length=512,
               sequence_stride=256, pad_frames=37, sample_rate=12000, input_rate=INPUT_RATE,
               bn_momentum=0.99, name="crnn"):
    """CRNN: Resample -> LogMelSpectrogram -> `pad_frames` zero frames at each end of time (Choi et
    al.'s ZeroPadding2D) -> four [Conv2D 3x3 -> BatchNorm -> ELU -> MaxPool] blocks -> two GRU
    layers over time, each followed by an ELU layer -> Dense(num_tags, sigmoid).

    The GRUs keep their default tanh/sigmoid so that cuDNN serves them on a GPU.
    """
    waves = keras.Input((clip_samples,), name="waveform")
    x = Resample(input_rate, sample_rate, name="resample")(waves) if sample_rate != input_rate else waves
    x = LogMelSpectrogram(sample_rate, fft_length, sequence_stride, num_mel_bins, name="log_mel")(x)
    x = layers.Reshape((num_mel_bins, -1, 1), name="add_channel")(x)
    x = layers.ZeroPadding2D(((0, 0), (pad_frames, pad_frames)), name="pad_time")(x)
    for i, (f, pool) in enumerate(zip(filters, pools), 1):
        x = layers.Conv2D(f, 3, padding="same", name=f"conv{i}")(x)
        x = FusedBatchNormalization(momentum=bn_momentum, name=f"bn{i}")(x)
        # ELU then max pooling, computed in the other order: ELU is strictly increasing, so it
        # commutes with max (same values, same argmax, same gradients) and runs on a tensor 4 to 16
        # times smaller.
        x = layers.MaxPooling2D(pool, name=f"pool{i}")(x)
        x = layers.ELU(name=f"elu{i}")(x)
    if x.shape[1] != 1 or not x.shape[2]:
        raise ValueError(f"{num_mel_bins} mel bins / {clip_samples} samples do not pool down to one "
                         f"frequency row and at least one time step (got {x.shape[1]} x {x.shape[2]})")
    x = layers.Reshape((x.shape[2], filters[-1]), name="to_sequence")(x)
    x = layers.GRU(gru_units, return_sequences=True, name="gru1")(x)
    x = layers.ELU(name="gru1_elu")(x)
    x = layers.GRU(gru_units, name="gru2")(x)
    x = layers.ELU(name="gru2_elu")(x)
    probs = layers.Dense(num_tags, activation="sigmoid", name="probabilities")(x)
    return keras.Model(waves, probs, name=name)


BUILDERS = {"cnn": build_cnn, "crnn": build_crnn}
