"""SavedModel export: self-contained, loadable with TensorFlow alone, written atomically.

`saved_models/<run>/` holds the SavedModel (serving signatures below), `tags.json`, `config.json`,
`metrics.json` and `model.keras` (for fine-tuning). Signatures:
- `serving_default`: float32 waveforms (batch, clip_samples) at 16 kHz in [-1, 1] ->
  {"probabilities": (batch, num_tags)}; for the CNN the sub-clip cut happens inside.
- `tag_names`: no input -> {"tags": (num_tags,) string}, the output order.
"""
import contextlib
import io
import json
import os
import shutil

import keras
import tensorflow as tf

from tagger.data import NUM_SUB_CLIPS, to_sub_clips


def serving_functions(model, arch, clip_samples, tags):
    """The tf.functions the export serves, closed over the Keras model."""

    @tf.function(input_signature=[tf.TensorSpec([None, clip_samples], tf.float32, name="waveform")])
    def serve(waveform):
        x = to_sub_clips(waveform, NUM_SUB_CLIPS) if arch == "cnn" else waveform
        return {"probabilities": model(x, training=False)}

    tag_constant = tf.constant(tags)

    @tf.function(input_signature=[])
    def tag_names():
        return {"tags": tag_constant}

    return {"serving_default": serve, "tag_names": tag_names}


def export(model, arch, out_dir, tags, clip_samples, files):
    """Write the export to `out_dir` via a temporary folder renamed at the end, so nothing
    half-written is ever picked up. `files`: {name: json-able} written beside the SavedModel."""
    out_dir = out_dir.rstrip("/")
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    if tf.io.gfile.exists(tmp):
        tf.io.gfile.rmtree(tmp)
    archive = keras.export.ExportArchive()
    archive.track(model)
    for name, fn in serving_functions(model, arch, clip_samples, tags).items():
        archive.add_endpoint(name, fn)
    with contextlib.redirect_stdout(io.StringIO()):  # Keras prints the endpoints whatever `verbose` says
        archive.write_out(tmp, verbose=False)
    for name, content in {"tags.json": tags, **files}.items():
        with tf.io.gfile.GFile(f"{tmp}/{name}", "w") as f:
            json.dump(content, f, indent=1)
    keras_path = f"{tmp}/model.keras"
    if "://" in keras_path:  # Keras writes local files; copy it up
        local = f"/tmp/model-{os.getpid()}.keras"
        model.save(local)
        tf.io.gfile.copy(local, keras_path, overwrite=True)
        os.remove(local)
    else:
        model.save(keras_path)
    if tf.io.gfile.exists(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        tf.io.gfile.rename(out_dir, old)
        tf.io.gfile.rename(tmp, out_dir)
        (shutil.rmtree if "://" not in old else tf.io.gfile.rmtree)(old)
    else:
        tf.io.gfile.rename(tmp, out_dir)
    return out_dir
