"""Model families, chosen by name.

    from tagger import models
    family = models.get("crnn")          # presets, options, layout: no TensorFlow imported
    model = family.build(num_tags=50, clip_samples=466000)

Each family is one module of this package defining FAMILY (a `family.Family`); REGISTRY names them.
Adding an architecture is one module and one line here (docs/architectures.md). Every command asks
this registry; none tests a family's name.
"""
import importlib

from tagger.models.family import Chunks, DoesNotFit, Family, Option, Patches, SubClips, WholeClip

__all__ = ["Chunks", "DoesNotFit", "Family", "Option", "Patches", "SubClips", "WholeClip", "REGISTRY", "DEFAULT", "names", "get",
           "families", "all_options", "load_model"]

REGISTRY = {
    "cnn": "tagger.models.cnn",              # Dieleman & Schrauwen 2014, raw audio, 10 sub-clips
    "crnn": "tagger.models.crnn",            # Choi et al. 2017, log-mel, whole clips
    "samplecnn": "tagger.models.samplecnn",  # Lee et al. 2017, raw audio, short chunks
    "shortres": "tagger.models.shortres",    # Won et al. 2020, log-mel short-chunk ResNet
    "musicnn": "tagger.models.musicnn",      # Pons & Serra 2019, log-mel patches, timbral/temporal filters
    "vgg": "tagger.models.vgg",              # Pons & Serra 2019, log-mel patches, VGG-like baseline
}
DEFAULT = "crnn"


def names():
    return tuple(REGISTRY)


def get(name):
    """The Family registered as `name` (KeyError for another name)."""
    return importlib.import_module(REGISTRY[name]).FAMILY


def families():
    return [get(name) for name in REGISTRY]


def all_options():
    """{option name: (Option, [family names])} over every family, for the commands' parsers."""
    found = {}
    for family in families():
        for option in family.options:
            found.setdefault(option.name, (option, []))[1].append(family.name)
    return found


def load_model(path):
    """A `model.keras` saved by tagger (its custom layers registered first), uncompiled: the training
    state it was saved with (an optimizer class made for that run) is not needed to use or fine-tune
    it. Imports TensorFlow."""
    import keras

    import tagger.features  # noqa: F401  (registers the layers)
    import tagger.kernels  # noqa: F401
    import tagger.models.layers  # noqa: F401
    return keras.saving.load_model(path, compile=False)
