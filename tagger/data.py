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


def _records(data_dir, manifest, split, file_seed=None):
    """The split's serialized records, its shards read 8 at a time (in an order drawn from `file_seed`,
    a [2] seed tensor)."""
    files = shard_paths(data_dir, manifest, split)
    if not files:
        raise UsageError(f"{data_dir} has no {split} clips: prepare it with clips in that split")
    paths = tf.constant(files)
    if file_seed is not None:
        paths = tf.random.experimental.stateless_shuffle(paths, file_seed)
    return tf.data.Dataset.from_tensor_slices(paths).interleave(
        tf.data.TFRecordDataset, cycle_length=min(len(files), 8), block_length=1, num_parallel_calls=AUTOTUNE,
        deterministic=True)


def steps_per_epoch(manifest, split, batch_size):
    return -(-manifest["splits"][split]["clips"] // batch_size)


def dataset(data_dir, split, layout, batch_size, manifest=None, input_shape=None, with_ids=False):
    """Batches of (model inputs, labels) of one split in file order, as evaluation reads them (no
    randomness): each clip arranged by the family's layout (`tagger.models.family`) for a model of
    input shape `input_shape` (`model.input_shape`, which some layouts need). `with_ids`: (model
    inputs, labels, clip ids, paths)."""
    manifest = manifest or load_manifest(data_dir)
    num_tags, clip_samples = len(manifest["tags"]), manifest["clip_samples"]

    def prepare(serialized):
        pcm, labels, clip_id, path = parse_example(serialized, num_tags, clip_samples)
        inputs = layout.model_input(scale(pcm), input_shape)
        return (inputs, labels, clip_id, path) if with_ids else (inputs, labels)

    ds = _records(data_dir, manifest, split).map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
    # The manifest knows the clip count: a known length gives Keras its progress bar and epoch end.
    batches = tf.data.experimental.assert_cardinality(steps_per_epoch(manifest, split, batch_size))
    return ds.batch(batch_size).apply(batches).prefetch(AUTOTUNE)


def epoch_seed(seed, epoch):
    """The seed of one epoch's randomness (shard order, shuffle, the layout's random pieces)."""
    return tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64)


def window_shuffle(ds, size, seed):
    """Each run of `size` consecutive elements in an order drawn from (seed, its index): a stateless
    shuffle, the same for the same seed whatever was drawn before (tf.data's shuffle takes its seed
    from TensorFlow's global seed as well, which a resumed run cannot replay). Holds about two windows
    at a time, as a shuffle buffer of `size` holds one."""
    def permute(index, window):
        # The second half of the key is negative: clip ids (the layouts' pieces) take the others.
        key = tf.stack([seed, -2 - index])
        order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(window[0])[0]), key)
        return tuple(tf.gather(part, order) for part in window)

    return ds.batch(size).enumerate().map(permute, num_parallel_calls=AUTOTUNE, deterministic=True).unbatch()


def training_dataset(data_dir, layout, batch_size, manifest, input_shape, seed, first_epoch=0, shuffle_buffer=512):
    """Training batches of epochs first_epoch, first_epoch + 1, ..., one epoch after the other without
    end (fit it with `steps_per_epoch(manifest, "train", batch_size)`). Each epoch's shard order,
    shuffle (windows of `shuffle_buffer` records) and the layout's random pieces (a short-chunk
    family's chunks) are drawn from (seed, epoch) alone, so a run resumed at epoch K reads exactly the
    batches an uninterrupted run reads from epoch K on. The layout's piece is cut from the int16 clip
    before the shuffle, which holds what training keeps of each clip."""
    num_tags, clip_samples = len(manifest["tags"]), manifest["clip_samples"]

    def one_epoch(epoch):
        epoch_rng = epoch_seed(seed, epoch)

        def piece(serialized):
            pcm, labels, clip_id, _ = parse_example(serialized, num_tags, clip_samples)
            return layout.training_piece(pcm, clip_id, epoch_rng), labels

        def arrange(pcm, labels):
            return layout.model_input(scale(pcm), input_shape, training=True), labels

        ds = _records(data_dir, manifest, "train", file_seed=tf.stack([epoch_rng, -1]))
        ds = ds.map(piece, num_parallel_calls=AUTOTUNE, deterministic=True)
        ds = window_shuffle(ds, shuffle_buffer, epoch_rng)
        ds = ds.map(arrange, num_parallel_calls=AUTOTUNE, deterministic=True)
        return ds.batch(batch_size)

    # Endless, epoch after epoch, whatever the run's length: under MirroredStrategy, Keras 3.6's iterator
    # loses the last batch of a finite dataset, and the last step of a fit depends on what follows it
    # in the dataset (TF 2.16); with what follows always the next epoch, a run stopped and resumed at
    # any epoch computes the very steps of an uninterrupted one.
    return tf.data.Dataset.counter(first_epoch).flat_map(one_epoch).prefetch(AUTOTUNE)
