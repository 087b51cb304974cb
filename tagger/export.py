"""SavedModel export: self-contained, loadable with TensorFlow alone, written atomically.

`saved_models/<run>/` holds the SavedModel (serving signatures below), `tags.json`, `config.json`,
`metrics.json` and `model.keras` (for fine-tuning). Signatures:
- `serving_default`: float32 waveforms (batch, clip_samples) at 16 kHz in [-1, 1] ->
  {"probabilities": (batch, num_tags)}; the family's layout happens inside (the CNN's sub-clips, the
  short-chunk families' evenly spaced chunks).
- `tag_track`: one 16 kHz waveform of any length (samples,) and `hop_seconds` (scalar; 0 means the
  family's hop) -> {"probabilities": (num_tags,), "window_probabilities": (windows, num_tags),
  "window_starts": (windows,) seconds}. The track is cut into windows as its family says
  (config.json's "window": the clip, or the chunk of the short-chunk families, the last window aligned
  to the end of the track; musicnn's patches of 187 frames with their context, the partial last
  dropped); a track shorter than a window is zero-padded. Windows go through the model WINDOW_BATCH
  at a time in a loop, so a long track never sits in the model at once.
- `tag_windows`: windows (batch, window samples) -> {"probabilities": (batch, num_tags)}, each
  window tagged as `tag_track` tags it (what tagger.predict calls).
- `embed`: windows (batch, window samples) -> {"embedding": (batch, features), "probabilities"}, the
  model's penultimate features (its family's `embedding` layer) pooled over each window's pieces, and
  the window's probabilities as `tag_windows` gives them, from one pass.
- `tag_names`: no input -> {"tags": (num_tags,) string}, the output order.
- `decide` (exports with per-tag thresholds, thresholds.json): waveforms as `serving_default` ->
  {"decisions": (batch, num_tags) bool, probability at or above the tag's threshold; "probabilities";
  "thresholds": (num_tags,), +inf for a tag without one (never decided)}.
"""
import contextlib
import io
import json
import os
import shutil
import tempfile

import keras
import tensorflow as tf

from tagger.files import is_remote

SAMPLE_RATE = 16000
WINDOW_BATCH = 8


def padded_length(num_samples, window_samples, lead=0):
    """A track's length with `lead` zeros before and after it, at least one window."""
    return max(num_samples + 2 * lead, window_samples)


def window_starts(num_samples, window_samples, hop, lead=0, end_aligned=True):
    """Window starts over a track with `lead` zeros before and after it (in those padded samples): every
    `hop` samples while a whole window fits, then, if `end_aligned`, one more aligned to the end where
    the last window stopped short of it. A track shorter than a window has one window at 0. Shared by
    the SavedModel's `tag_track` and `tagger.predict`.
    """
    length = padded_length(num_samples, window_samples, lead)
    starts = list(range(0, length - window_samples + 1, hop))
    if end_aligned and starts[-1] + window_samples < length:
        starts.append(length - window_samples)
    return starts


def serving_functions(model, layout, clip_samples, tags, embedding=None, thresholds=None):
    """The tf.functions the export serves, closed over the Keras model and the family's layout;
    `embedding` names the layer of the `embed` signature; `thresholds` (per tag, +inf for none) makes
    the `decide` signature."""
    windowing = layout.windowing(clip_samples)
    window, lead = windowing["samples"], windowing["lead"]

    @tf.function(input_signature=[tf.TensorSpec([None, clip_samples], tf.float32, name="waveform")])
    def serve(waveform):
        return {"probabilities": model(layout.model_input(waveform, model.input_shape), training=False)}

    @tf.function(input_signature=[tf.TensorSpec([None, window], tf.float32, name="waveform")])
    def tag_windows(waveform):
        return {"probabilities": model(layout.window_input(waveform, model.input_shape), training=False)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="waveform"),
                                  tf.TensorSpec([], tf.float32, name="hop_seconds")])
    def tag_track(waveform, hop_seconds):
        n = tf.shape(waveform)[0]
        hop = tf.cast(tf.round(hop_seconds * SAMPLE_RATE), tf.int32)
        hop = tf.where(hop > 0, hop, windowing["hop"])
        length = tf.maximum(n + 2 * lead, window)         # padded_length
        padded = tf.pad(waveform, [[lead, length - n - lead]])
        starts = tf.range(0, length - window + 1, hop)
        if windowing["end_aligned"]:
            starts = tf.cond(starts[-1] + window < length,
                             lambda: tf.concat([starts, [length - window]], 0), lambda: starts)
        count = tf.shape(starts)[0]
        offsets = tf.range(window)

        def body(i, out):
            chunk = starts[i:i + WINDOW_BATCH]
            windows = tf.gather(padded, chunk[:, None] + offsets[None, :])
            return i + WINDOW_BATCH, out.write(i // WINDOW_BATCH, tag_windows(windows)["probabilities"])

        out = tf.TensorArray(tf.float32, size=0, dynamic_size=True, infer_shape=False,
                             element_shape=tf.TensorShape([None, len(tags)]))
        _, out = tf.while_loop(lambda i, _: i < count, body, [tf.constant(0), out])
        per_window = out.concat()
        return {"probabilities": tf.reduce_mean(per_window, 0), "window_probabilities": per_window,
                "window_starts": tf.cast(starts, tf.float32) / SAMPLE_RATE}

    tag_constant = tf.constant(tags)

    @tf.function(input_signature=[])
    def tag_names():
        return {"tags": tag_constant}

    functions = {"serving_default": serve, "tag_track": tag_track, "tag_windows": tag_windows, "tag_names": tag_names}
    if thresholds is not None:
        cut = tf.constant(thresholds, tf.float32)

        @tf.function(input_signature=[tf.TensorSpec([None, clip_samples], tf.float32, name="waveform")])
        def decide(waveform):
            probabilities = serve(waveform)["probabilities"]
            return {"decisions": probabilities >= cut, "probabilities": probabilities, "thresholds": cut}

        functions["decide"] = decide
    if embedding:
        from tagger.models.layers import embedding_model
        embedder = embedding_model(model, embedding, layout, with_probabilities=True)

        @tf.function(input_signature=[tf.TensorSpec([None, window], tf.float32, name="waveform")])
        def embed(waveform):
            features, probabilities = embedder(layout.window_input(waveform, model.input_shape), training=False)
            return {"embedding": features, "probabilities": probabilities}

        functions["embed"] = embed
    return functions


def export(model, layout, out_dir, tags, clip_samples, files, embedding=None, thresholds=None):
    """Write the export to `out_dir` via a temporary folder, so nothing half-written is ever picked
    up. `files`: {name: json-able} written beside the SavedModel; `thresholds`: per tag (+inf for
    none), for the `decide` signature.

    Local: the temporary folder is renamed into place. Remote (gs://, where folders cannot be
    renamed): written locally, then copied with saved_model.pb last, which is what readers check for.
    """
    out_dir = out_dir.rstrip("/")
    remote = is_remote(out_dir)
    tmp = tempfile.mkdtemp(prefix="tagger-export-") if remote else f"{out_dir}.tmp-{os.getpid()}"
    if tf.io.gfile.exists(tmp):
        tf.io.gfile.rmtree(tmp)
    archive = keras.export.ExportArchive()
    archive.track(model)
    for name, fn in serving_functions(model, layout, clip_samples, tags, embedding, thresholds).items():
        archive.add_endpoint(name, fn)
    with contextlib.redirect_stdout(io.StringIO()):  # Keras prints the endpoints whatever `verbose` says
        archive.write_out(tmp, verbose=False)
    for name, content in {"tags.json": tags, **files}.items():
        with open(f"{tmp}/{name}", "w") as f:
            json.dump(content, f, indent=1)
    model.save(f"{tmp}/model.keras")
    if remote:
        _copy_tree(tmp, out_dir)
        shutil.rmtree(tmp)
    elif os.path.exists(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)
    return out_dir


def _copy_tree(local, remote):
    """Copy a local folder over a remote one (replacing it), saved_model.pb last."""
    if tf.io.gfile.exists(f"{remote}/saved_model.pb"):
        tf.io.gfile.remove(f"{remote}/saved_model.pb")     # readers stop seeing an export first
    if tf.io.gfile.exists(remote):
        tf.io.gfile.rmtree(remote)
    paths = []
    for root, _, names in os.walk(local):
        rel = os.path.relpath(root, local)
        tf.io.gfile.makedirs(remote if rel == "." else f"{remote}/{rel}")
        paths += [os.path.join(rel, n) if rel != "." else n for n in names]
    for rel in sorted(paths, key=lambda p: p == "saved_model.pb"):
        tf.io.gfile.copy(os.path.join(local, rel), f"{remote}/{rel}", overwrite=True)
