"""What a model family is: its builder, its presets, its own settings and how it reads a clip.

Nothing here imports TensorFlow at import time, so the commands can list families, fill in presets
and check flags in a fraction of a second; the layouts' TensorFlow functions import it when they run
(inside tf.data pipelines and exported graphs).
"""
from dataclasses import dataclass, field
from typing import Callable


class DoesNotFit(ValueError):
    """The clips are too short, or otherwise unsuited, for a family with these settings."""


@dataclass(frozen=True)
class Option:
    """A setting of one family, given on the command line as --name (underscores as dashes)."""
    name: str
    type: Callable
    default: object
    help: str
    low: float = None            # the value must be >= low (and < high where high is given)
    high: float = None

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")

    def check(self, value):
        """None, or what is wrong with the value."""
        if self.low is not None and value < self.low or self.high is not None and value >= self.high:
            bounds = f"in [{self.low:g}, {self.high:g})" if self.high is not None else f"at least {self.low:g}"
            return f"{self.flag} {value} must be {bounds}"
        return None


# ------------------------------------------------------------------------------------------------
# Input layouts: what the model takes, how a clip becomes that input in training and in evaluation,
# and what window a long track is cut into. Each works on (..., samples): one clip in a tf.data map,
# or a batch in an exported graph.

@dataclass(frozen=True)
class WholeClip:
    """The model reads the whole clip, (batch, clip_samples), and predicts it."""
    name = "whole_clip"

    # How a long track is cut into windows (tag_track, tagger.predict): `lead` zeros before it, windows
    # of window_samples every hop samples, and one more aligned to the end where the last one stops short.
    lead = 0
    end_aligned = True
    any_length = False            # the model takes clips of one length (WholeClip, SubClips); pieces: any

    def window_samples(self, clip_samples):
        return clip_samples

    def default_hop(self, window_samples):
        return window_samples

    def windowing(self, clip_samples):
        """How tag_track and tagger.predict cut a track (config.json's "window")."""
        samples = self.window_samples(clip_samples)
        return {"samples": samples, "hop": self.default_hop(samples), "lead": self.lead,
                "end_aligned": self.end_aligned}

    def pieces(self, clip_samples):
        """Model inputs per clip (what the forward FLOPs per clip multiply)."""
        return 1

    def check(self, clip_samples):
        pass

    def training_piece(self, pcm, clip_id, seed):
        """What training keeps of a clip, cut before the shuffle buffer."""
        return pcm

    def model_input(self, waves, input_shape, training=False):
        return waves

    def window_input(self, windows, input_shape):
        """Clip-length windows of a long track (batch, window_samples) -> model input."""
        return self.model_input(windows, input_shape)

    def pool_pieces(self, features, model_input):
        """A layer's output inside the model -> one vector per clip, as the probabilities are pooled."""
        return features


@dataclass(frozen=True)
class SubClips(WholeClip):
    """The clip cut into `count` consecutive sub-clips, (batch, count, samples), whose predictions the
    model averages; each sub-clip keeps its first input_shape[-1] samples (the CNN's input length)."""
    name = "sub_clips"
    count: int = 10


    def model_input(self, waves, input_shape, training=False):
        from tagger.data import to_sub_clips
        return to_sub_clips(waves, self.count, input_shape[-1])

    def pool_pieces(self, features, model_input):
        import keras
        return keras.layers.GlobalAveragePooling1D(name="embedding_mean")(features)


@dataclass(frozen=True)
class Chunks(WholeClip):
    """Short chunks of `samples` samples (Won et al. 2020): the model takes (batch, chunks, samples) and
    averages the chunks' predictions. Training reads one chunk per clip, at an offset drawn anew each
    epoch from (seed, epoch, clip id); evaluation and export read `eval_count` chunks evenly spaced
    from the clip's start to its end (16 for a 29 s MTAT clip, as Won et al.; the same 16 for any
    length); a long track is tagged chunk by chunk."""
    name = "chunks"
    any_length = True
    samples: int = 59049
    eval_count: int = 16


    def window_samples(self, clip_samples):
        return self.samples

    def pieces(self, clip_samples):
        return self.eval_count

    def check(self, clip_samples):
        if clip_samples < self.samples:
            raise DoesNotFit(f"clips of {clip_samples:,} samples are shorter than a chunk of {self.samples:,} "
                             f"({self.samples / 16000:.2f} s at 16 kHz)")

    def starts(self, clip_samples):
        """The evaluation chunks' first samples: evenly spaced, the first at 0, the last ending the clip."""
        span = clip_samples - self.samples
        if self.eval_count == 1:
            return [span // 2]
        return [round(i * span / (self.eval_count - 1)) for i in range(self.eval_count)]

    def training_piece(self, pcm, clip_id, seed):
        import tensorflow as tf
        span = tf.shape(pcm)[-1] - self.samples + 1
        offset = tf.random.stateless_uniform([], tf.stack([tf.cast(seed, tf.int64), clip_id]), 0, span, tf.int32)
        return tf.ensure_shape(pcm[offset:offset + self.samples], [self.samples])

    def model_input(self, waves, input_shape, training=False):
        import tensorflow as tf
        if training:                             # the training piece: one chunk
            return waves[..., None, :]
        starts = tf.constant(self.starts(waves.shape[-1]), tf.int32)
        return tf.gather(waves, starts[:, None] + tf.range(self.samples)[None, :], axis=-1)

    def window_input(self, windows, input_shape):
        return windows[:, None, :]

    def pool_pieces(self, features, model_input):
        from tagger.models.layers import MeanOverChunks
        return MeanOverChunks(name="embedding_mean")([features, model_input])


@dataclass(frozen=True)
class Patches(WholeClip):
    """musicnn's patches (Pons & Serra 2019): `frames` frames of a centred 16 kHz spectrogram (hop
    `hop`, FFT `fft`), cut from the whole clip's or track's spectrogram without overlap, the partial last
    one dropped (a clip shorter than one patch is zero-padded to one). The model takes (batch, patches,
    samples) raw samples, each patch with the `fft // 2` samples of context on either side that its
    centred frames read (48,128 samples for 187 frames: uncentred frames of them are the centred frames
    of the whole), and averages the patches' predictions. Training reads one patch per clip at an
    offset drawn from (seed, epoch, clip id)."""
    name = "patches"
    any_length = True
    end_aligned = False          # musicnn drops the partial last patch
    frames: int = 187
    hop: int = 256
    fft: int = 512


    @property
    def lead(self):
        """Zeros before a track: the centring of its first frame."""
        return self.fft // 2

    @property
    def samples(self):
        """Samples of one patch with its context: 48,128 for 187 frames."""
        return (self.frames - 1) * self.hop + self.fft

    def window_samples(self, clip_samples):
        return self.samples

    def default_hop(self, window_samples):
        return self.frames * self.hop          # the next patch's first frame: 47,872 samples

    def shortest_clip(self):
        """The shortest clip with one whole patch: 186 hops, 47,616 samples."""
        return (self.frames - 1) * self.hop

    def count(self, clip_samples, hop=None):
        hop = hop or self.default_hop(self.samples)
        return max(1, (clip_samples + 2 * self.lead - self.samples) // hop + 1)

    def pieces(self, clip_samples):
        return self.count(clip_samples)

    def check(self, clip_samples):
        if clip_samples < self.shortest_clip():
            raise DoesNotFit(f"clips of {clip_samples:,} samples are shorter than one patch of {self.frames} frames "
                             f"({self.shortest_clip():,} samples)")

    def training_piece(self, pcm, clip_id, seed):
        import tensorflow as tf
        padded = tf.pad(pcm, [[self.lead, self.lead]])
        span = tf.shape(padded)[-1] - self.samples + 1
        offset = tf.random.stateless_uniform([], tf.stack([tf.cast(seed, tf.int64), clip_id]), 0, span, tf.int32)
        return tf.ensure_shape(padded[offset:offset + self.samples], [self.samples])

    def model_input(self, waves, input_shape, training=False):
        import tensorflow as tf
        if training:
            return waves[..., None, :]
        n = waves.shape[-1]
        hop = self.default_hop(self.samples)
        count = self.count(n)
        end = (count - 1) * hop + self.samples - self.lead - n       # zeros after the clip
        rank = len(waves.shape)
        padded = tf.pad(waves, [[0, 0]] * (rank - 1) + [[self.lead, max(end, self.lead)]])
        starts = tf.constant([k * hop for k in range(count)], tf.int32)
        return tf.gather(padded, starts[:, None] + tf.range(self.samples)[None, :], axis=-1)

    def window_input(self, windows, input_shape):
        return windows[:, None, :]

    pool_pieces = Chunks.pool_pieces


# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """A registered architecture.

    Attributes:
      name: what --arch takes.
      summary: one line: the paper and what the model is.
      build: `build(num_tags, clip_samples, width=1.0, precision="float32", **options)` -> keras.Model,
        raising DoesNotFit for clips it cannot take. Imports TensorFlow when called.
      layout: WholeClip, SubClips or Chunks.
      study: the paper's training preset (MTAT): optimizer, lr, momentum, batch_size, epochs, and any
        of schedule, weight_decay, width and the family's options.
      demo: what changes on the built-in synthetic demo.
      options: the family's own settings (Option), defaults as the paper.
      run_name: how the options appear in a run's name, e.g. "-l{length}s{stride}".
      search: tuning.search's default grid: {"optimizer": ..., "lr": (...), "momentum": (...)} (momentum
        only for SGD), and "demo_epochs", the epochs per trial on the demo.
      validate: `validate(given)` -> None or an error line, for the options given on the command line.
      embedding: the layer whose output (pooled over a clip's pieces) is the model's embedding, the
        penultimate features (`embed` signature, tagger.predict --embeddings).
      head: the output layer (a Dense of one unit a tag), which fine-tuning on other tags rebuilds.
    """
    name: str
    summary: str
    build: Callable
    layout: WholeClip
    study: dict
    demo: dict = field(default_factory=dict)
    options: tuple = ()
    run_name: str = ""
    search: dict = field(default_factory=lambda: {"optimizer": "adam", "lr": (1e-4, 2e-4, 5e-4, 1e-3, 2e-3),
                                                  "demo_epochs": 2})
    validate: Callable = lambda given: None
    embedding: str = None
    head: str = "probabilities"

    def option_defaults(self):
        return {o.name: o.default for o in self.options}

    def preset(self, demo):
        """The training settings before flags: the options' defaults, the study's preset, then the demo's."""
        return {**self.option_defaults(), **self.study, **(self.demo if demo else {})}

