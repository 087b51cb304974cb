"""Training from an export's weights: `tagger.train --init NAME_OR_PATH [--freeze body]`.

The model is the export's own architecture (its model.keras), so a converted musicnn model keeps
exactly the layers its weights were trained in. When the data's tags differ from the export's, the
output layer is rebuilt for the data's tags: the rows (weights and bias) of the tags both sets share
are kept, the others start as a fresh layer's. `--freeze body` trains the output layer alone (a linear
probe on the penultimate features); otherwise every layer trains, at a tenth of the family's learning
rate unless --lr says otherwise.
"""
import json

from tagger import files
from tagger.cli import UsageError

FREEZE = ("body",)


def read_init(name_or_path, models_dir):
    """(export folder, its config.json) for --init, checked before TensorFlow loads."""
    folder = files.find_export(name_or_path, models_dir)
    if not files.exists(f"{folder}/model.keras"):
        raise UsageError(f"--init {name_or_path}: {folder} has no model.keras to start from: export it again with "
                         "this tagger")
    return folder, json.loads(files.read_text(f"{folder}/config.json"))


def _set_units(config, name, units):
    """Set the `units` of the layer called `name` in a (nested) Keras model config; True if found."""
    for layer in config.get("layers", []):
        if layer["config"].get("name") == name and "units" in layer["config"]:
            layer["config"]["units"] = units
            return True
        if _set_units(layer["config"], name, units):
            return True
    return False


def _copy_weights(source, target, head, shared):
    """Every layer's weights from `source` to `target` (same names, nested models too), the head's
    only for the `shared` (old index, new index) tag pairs."""
    import keras
    for layer in target.layers:
        old = source.get_layer(layer.name)
        if isinstance(layer, keras.Model):
            _copy_weights(old, layer, head, shared)
        elif layer.name == head and shared is not None:
            kernel, bias = (w.numpy() for w in layer.weights)
            old_kernel, old_bias = (w.numpy() for w in old.weights)
            for i, j in shared:
                kernel[:, j], bias[j] = old_kernel[:, i], old_bias[i]
            layer.set_weights([kernel, bias])
        elif layer.weights:
            layer.set_weights(old.get_weights())


def _freeze_body(model, head):
    import keras
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _freeze_body(layer, head)
        elif layer.name != head:
            layer.trainable = False


def init_model(folder, info, family, manifest, freeze):
    """The export's model for the data's tags, its weights loaded; the body frozen for freeze="body"."""
    import keras

    from tagger.models import load_model
    clip = manifest["clip_samples"]
    if not family.layout.any_length and info.get("clip_samples") != clip:
        raise UsageError(f"--init {folder} takes clips of {info.get('clip_samples'):,} samples and the data's are "
                         f"{clip:,}: prepare the data with --clip-seconds {info.get('clip_samples', 0) / 16000:g}")
    source = load_model(f"{folder}/model.keras")
    old_tags, new_tags = info["tags"], manifest["tags"]
    shared = None
    if old_tags != new_tags:
        config = source.get_config()
        if not _set_units(config, family.head, len(new_tags)):
            raise UsageError(f"--init {folder}: no output layer {family.head!r} in it to rebuild for the data's tags")
        model = keras.Model.from_config(config)
        shared = [(old_tags.index(t), j) for j, t in enumerate(new_tags) if t in old_tags]
        _copy_weights(source, model, family.head, shared)
    else:
        model = source
    if freeze == "body":
        _freeze_body(model, family.head)
    return model, shared
