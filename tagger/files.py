"""Writing files through tf.io.gfile, so every output path may be local or remote (gs://...).

TensorFlow is imported when first needed, so the command-line modules can import this before they
have checked their arguments.
"""
import os


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
    if "://" not in path:
        save(path)
        return
    import tensorflow as tf
    local = f"/tmp/{os.getpid()}-{os.path.basename(path)}"
    save(local)
    tf.io.gfile.copy(local, path, overwrite=True)
    os.remove(local)


def load_via_local(load, path):
    """`load(local_path)` for a file that may be remote."""
    if "://" not in path:
        return load(path)
    import tensorflow as tf
    local = f"/tmp/{os.getpid()}-{os.path.basename(path)}"
    tf.io.gfile.copy(path, local, overwrite=True)
    try:
        return load(local)
    finally:
        os.remove(local)
