"""Reading and writing files through tf.io.gfile, so every output path may be local or remote (gs://...).

TensorFlow is imported when first needed, so the command-line modules can import this before they
have checked their arguments.
"""
import os

from tagger.cli import UsageError


def atomic_write_text(path, text):
    """Write to a temporary name beside `path`, then rename: readers see the old file or the new one,
    never half of one."""
    import tensorflow as tf
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def save_via_local(save, path):
    """Keras saves only to local files: `save(local_path)`, then copy to a remote `path`."""
    if not is_remote(path):
        save(path)
        return
    import tensorflow as tf
    local = f"/tmp/{os.getpid()}-{os.path.basename(path)}"
    save(local)
    tf.io.gfile.copy(local, path, overwrite=True)
    os.remove(local)


def load_via_local(load, path):
    """`load(local_path)` for a file that may be remote."""
    if not is_remote(path):
        return load(path)
    import tensorflow as tf
    local = f"/tmp/{os.getpid()}-{os.path.basename(path)}"
    tf.io.gfile.copy(path, local, overwrite=True)
    try:
        return load(local)
    finally:
        os.remove(local)


def is_remote(path):
    return "://" in str(path)


def makedirs(path):
    """Create a folder (and its parents), local or remote."""
    if is_remote(path):
        import tensorflow as tf
        tf.io.gfile.makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path):
    if is_remote(path):
        import tensorflow as tf
        return tf.io.gfile.exists(path)
    return os.path.exists(path)


def write_bytes(path, data):
    """Write a whole file, local or remote (through tf.io.gfile)."""
    if is_remote(path):
        import tensorflow as tf
        if tf.io.gfile.exists(path):      # TensorFlow's ram:// filesystem keeps a longer old file's tail
            tf.io.gfile.remove(path)
        with tf.io.gfile.GFile(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def write_text(path, text):
    write_bytes(path, text.encode("utf-8"))


def read_bytes(path):
    """A whole file, local or remote (through tf.io.gfile)."""
    if is_remote(path):
        import tensorflow as tf
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def read_text(path):
    return read_bytes(path).decode("utf-8")


def read_local_manifest(data_dir):
    """A TFRecords folder's manifest.json, read without TensorFlow, so a command refuses a folder that is
    not one before TensorFlow loads; None for a remote folder (read once TensorFlow has loaded)."""
    import json
    if is_remote(data_dir):
        return None
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(path):
        raise UsageError(f"--data {data_dir} is not a TFRecords folder from tagger.prepare (no manifest.json "
                         "there): prepare it first, or check the path")
    try:
        return json.loads(read_text(path))
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} cannot be read ({e}): prepare the data again") from None


def csv_text(rows):
    """Rows (lists) as CSV text, for write_text."""
    import csv
    import io
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def figure_png(fig):
    """A matplotlib figure as PNG bytes (then closed), for write_bytes."""
    import io

    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def recorded_settings_differ(path, settings, defaults=None):
    """Compare `settings` with those recorded in the JSON file `path`: the keys whose values differ.
    When there is no record yet, write one (atomically) and return []. `defaults` maps a key whose
    value is a dict to the values of its fields that a record may lack (written by an older version),
    and another key to its value where a record lacks it; only the fields `settings` has count (an
    older record may also hold settings since dropped)."""
    import json

    import tensorflow as tf
    if not tf.io.gfile.exists(path):
        atomic_write_text(path, json.dumps(settings, indent=1))
        return []
    with tf.io.gfile.GFile(path) as f:
        before = json.load(f)
    for key, fields in (defaults or {}).items():
        if isinstance(before.get(key), dict) and isinstance(settings.get(key), dict):
            before[key] = {k: before[key].get(k, fields.get(k)) for k in settings[key]}
        elif not isinstance(fields, dict):
            before.setdefault(key, fields)
    return [k for k in settings if before.get(k) != settings[k]]


def is_export(folder):
    """True for a tagger export (a SavedModel with its config.json)."""
    return exists(f"{folder}/config.json") and exists(f"{folder}/saved_model.pb")


def find_export(name_or_path, models_dir):
    """An export folder from a path, or from a name in the models folder; one line naming the fix."""
    for candidate in (name_or_path, os.path.join(models_dir, name_or_path)):
        if is_export(candidate.rstrip("/")):
            return candidate.rstrip("/")
    names = sorted(d for d in (os.listdir(models_dir) if os.path.isdir(models_dir) else [])
                   if is_export(os.path.join(models_dir, d)))
    there = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "") if names else "none"
    raise UsageError(f"{name_or_path} is neither a tagger export nor the name of one in {models_dir}/ "
                     f"(there: {there}): pass an export folder, train one, or convert musicnn's "
                     "(python -m tagger.convert musicnn WHEEL)")


def newest_export(models_dir="saved_models"):
    """The most recently written export in the models folder."""
    exports = [os.path.join(models_dir, d) for d in (os.listdir(models_dir) if os.path.isdir(models_dir) else [])
               if is_export(os.path.join(models_dir, d))]
    if not exports:
        raise UsageError(f"no exported model under {models_dir}/: train one (python -m tagger.train) "
                         "or pass --model")
    return max(exports, key=os.path.getmtime)
