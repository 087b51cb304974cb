"""tf.data input pipelines over the converter's TFRecord shards.

Shards are read in parallel (interleaved), records parsed, int16 PCM scaled to float32 in [-1, 1]
(divided by 32768, the study's feature scaling), arranged as the model family's layout asks (whole
clips, sub-clips or chunks: `tagger.models.family`), shuffled (training only, seeded), batched and
prefetched.
"""
import json

import tensorflow as tf

from tagger.cli import UsageError

AUTOTUNE = tf.data.AUTOTUNE
NUM_SUB_CLIPS = 10


def load_manifest(data_dir):
    """The converter's manifest.json of a TFRecords folder (local or gs://)."""
    path = f"{data_dir.rstrip('/')}/manifest.json"
    if not tf.io.gfile.exists(path):
        raise UsageError(f"{data_dir} has no manifest.json: it is not a finished tagger.prepare output "
                         "(run python -m tagger.prepare ... --out " f"{data_dir}, or pass another --data)")
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def read_tags(data_dir):
    with tf.io.gfile.GFile(f"{data_dir.rstrip('/')}/tags.json") as f:
        return json.load(f)


def shard_paths(data_dir, manifest, split):
    return [f"{data_dir.rstrip('/')}/{name}" for name in manifest["splits"][split]["shards"]]


def parse_example(serialized, num_tags, clip_samples=None):
    features = tf.io.parse_single_example(serialized, {
        "audio": tf.io.FixedLenFeature([], tf.string),
        "labels": tf.io.FixedLenFeature([num_tags], tf.int64),
        "clip_id": tf.io.FixedLenFeature([], tf.int64),
        "path": tf.io.FixedLenFeature([], tf.string),
    })
    pcm = tf.io.decode_raw(features["audio"], tf.int16, little_endian=True)
    if clip_samples:
        pcm = tf.ensure_shape(pcm, [clip_samples])
    return pcm, tf.cast(features["labels"], tf.float32), features["clip_id"], features["path"]


def scale(pcm):
    """int16 PCM -> float32 in [-1, 1)."""
    return tf.cast(pcm, tf.float32) / 32768.0


def to_sub_clips(waveform, num_sub_clips=NUM_SUB_CLIPS, keep=None):
    """(..., samples) -> (..., num_sub_clips, keep): equal consecutive pieces of samples // num_sub_clips
    (the remainder, if any, dropped), each cut to its first `keep` samples (default: all; the CNN's
    input length, `tagger.models.cnn.cnn_input_samples`)."""
    samples = waveform.shape[-1]
    if samples is None:
        sub = tf.shape(waveform)[-1] // num_sub_clips
        shape = tf.concat([tf.shape(waveform)[:-1], [num_sub_clips, sub]], 0)
    else:  # static, so the model sees a known input shape
        sub = samples // num_sub_clips
        shape = [-1 if d is None else d for d in waveform.shape[:-1]] + [num_sub_clips, sub]
    pieces = tf.reshape(waveform[..., :num_sub_clips * sub], shape)
    return pieces if keep is None else pieces[..., :keep]


def dataset(data_dir, split, layout, batch_size, manifest=None, shuffle_seed=None, shuffle_buffer=1024,
            with_ids=False, drop_remainder=False, input_shape=None):
    """Batches of (model inputs, labels) from one split.

    Args:
      layout: the family's layout (`tagger.models.family`), which turns a clip into the model's input.
      input_shape: the model's input shape (`model.input_shape`), which some layouts need.
      shuffle_seed: None for evaluation (file order, no randomness); an int shuffles shards and
        records with that seed, anew each epoch.
      with_ids: also yield (clip_id, path) per clip, for per-clip outputs.
    """
    manifest = manifest or load_manifest(data_dir)
    num_tags = len(manifest["tags"])
    files = shard_paths(data_dir, manifest, split)
    if not files:
        raise UsageError(f"{data_dir} has no {split} clips: prepare it with clips in that split")
    training = shuffle_seed is not None
    ds = tf.data.Dataset.from_tensor_slices(files)
    if training:
        ds = ds.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 8), block_length=1,
                       num_parallel_calls=AUTOTUNE, deterministic=True)
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed + 1, reshuffle_each_iteration=True)

    def prepare(serialized):
        pcm, labels, clip_id, path = parse_example(serialized, num_tags, manifest["clip_samples"])
        waves = layout.model_input(scale(pcm), input_shape, training=training)
        return ((waves, labels, clip_id, path) if with_ids else (waves, labels))

    ds = ds.map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    # The manifest knows the clip count: a known length gives Keras its progress bar and epoch end.
    clips = manifest["splits"][split]["clips"]
    batches = clips // batch_size if drop_remainder else -(-clips // batch_size)
    ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
    return ds.prefetch(AUTOTUNE)
