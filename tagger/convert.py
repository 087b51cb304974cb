"""Bring published models into tagger as ordinary exports.

    python -m tagger.convert musicnn WHEEL [--models MTT_musicnn,MTT_vgg,MSD_musicnn,MSD_vgg] [--models-dir DIR]
                                           [--force]

WHEEL is musicnn's PyPI wheel (`pip download --no-deps musicnn==0.1.0 -d wheels`; ISC license): its four
trained models are TensorFlow checkpoints inside it. They are read out of the wheel (no musicnn code is
imported or installed), every variable (weights and batch-norm statistics) is mapped onto the Keras
layers of the `musicnn` and `vgg` families by name, each used exactly once, and the models are written
to the models folder as `musicnn-mtt`, `vgg-mtt`, `musicnn-msd` and `vgg-msd`: the usual SavedModel
signatures, `tags.json` in musicnn's label order, and a `config.json` recording the source, the
authors' reported test figures and the licenses. An export already there is left alone unless --force.
"""
import ast
import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import zipfile
import zlib

from tagger import files
from tagger.cli import EXIT_OK, ArgumentParser, UsageError, add_models_dir_flag, main_guard, quiet_tensorflow

PROG = "python -m tagger.convert"
MODELS = {"MTT_musicnn": "musicnn-mtt", "MTT_vgg": "vgg-mtt", "MSD_musicnn": "musicnn-msd", "MSD_vgg": "vgg-msd"}
CHECKPOINT_FILES = (".index", ".data-00000-of-00001")
# Where the README's and the test command's `pip download --no-deps musicnn==0.1.0 -d wheels` put the wheel,
# in the current folder: the benchmark's default.
WHEEL = os.environ.get("TAGGER_MUSICNN_WHEEL") or os.path.join("wheels", "musicnn-0.1.0-py3-none-any.whl")
LICENSES = {"code": "ISC (musicnn, Music Technology Group, Universitat Pompeu Fabra)",
            "MTT": "MagnaTagATune: CC BY-NC-SA 3.0", "MSD": "Million Song Dataset tags from Last.fm"}
DATASETS = {"MTT": "MagnaTagATune (50 tags)", "MSD": "Million Song Dataset (50 Last.fm tags)"}


def parse_args(argv):
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("source", choices=("musicnn",), help="what to convert")
    p.add_argument("wheel", help="musicnn's wheel, musicnn-0.1.0-py3-none-any.whl (pip download --no-deps "
                   "musicnn==0.1.0 -d DIR)")
    p.add_argument("--models", default=",".join(MODELS), help=f"which (default: {','.join(MODELS)})")
    add_models_dir_flag(p)
    p.add_argument("--force", action="store_true", help="replace exports that are already there")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"--models {','.join(unknown) or '(none)'}: choose from {', '.join(MODELS)}")
    return args


def read_wheel(path):
    """{"labels": {"MTT": [...], "MSD": [...]}, "files": names} of musicnn's wheel; a UsageError naming
    what is wrong with a missing, damaged or other file."""
    if not os.path.isfile(path):
        raise UsageError(f"{path} does not exist: fetch it with pip download --no-deps musicnn==0.1.0 -d DIR")
    try:
        with zipfile.ZipFile(path) as wheel:
            names = set(wheel.namelist())
            if "musicnn/configuration.py" not in names:
                raise UsageError(f"{path} is not musicnn's wheel (no musicnn/configuration.py in it): fetch "
                                 "musicnn==0.1.0 with pip download --no-deps")
            try:
                bad = wheel.testzip()
            except (zlib.error, EOFError) as e:
                bad = f"{e}"
            if bad:
                raise UsageError(f"{path} is damaged ({bad}): download it again")
            labels = _labels(wheel.read("musicnn/configuration.py").decode())
    except zipfile.BadZipFile:
        raise UsageError(f"{path} is not a wheel (not a zip file): fetch musicnn==0.1.0 with pip download "
                         "--no-deps") from None
    return {"labels": labels, "files": names}


def _labels(configuration):
    """MTT_LABELS and MSD_LABELS from musicnn's configuration.py, read as literals (not imported)."""
    labels = {}
    for node in ast.parse(configuration).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and getattr(node.targets[0], "id", "").endswith(
                "_LABELS"):
            labels[node.targets[0].id[:-len("_LABELS")]] = ast.literal_eval(node.value)
    return labels


def reported_figures(text):
    """The test ROC-AUC and PR-AUC an `experiment.result` file reports (two numbers, in that order)."""
    numbers = [float(x) for x in re.findall(r"(?:AUC|ROC-AUC|PR-AUC):\s*([0-9.]+)", text)]
    return {"roc_auc": numbers[0], "pr_auc": numbers[1]} if len(numbers) >= 2 else {}


def _variable_map(kind, network):
    """[(checkpoint variable name, Keras weight)] for one network, in musicnn's creation order."""
    def bn(layer, index):
        prefix = "batch_normalization" + (f"_{index}" if index else "")
        return [(f"{prefix}/{v}", w) for v, w in zip(("gamma", "beta", "moving_mean", "moving_variance"),
                                                     network.get_layer(layer).weights)]

    def dense(layer, prefix):
        return [(f"{prefix}/{v}", w) for v, w in zip(("kernel", "bias"), network.get_layer(layer).weights)]

    if kind == "vgg":
        pairs = bn("input_bn", 0)
        for i in range(1, 6):
            pairs += dense(f"conv{i}", f"{i}CNN") + bn(f"bn{i}", i)
        return pairs + dense("tags", "dense")
    convs = ["timbral74", "timbral77", "temporal128", "temporal64", "temporal32", "midend1", "midend2", "midend3"]
    pairs = bn("input_bn", 0)
    for i, part in enumerate(convs):
        pairs += dense(f"{part}_conv", "conv2d" + (f"_{i}" if i else "")) + bn(f"{part}_bn", i + 1)
    return pairs + bn("backend_bn", 9) + dense("penultimate_dense", "dense") + bn("embedding", 10) + dense(
        "tags", "dense_1")


def assign_checkpoint(kind, network, reader):
    """Every trainable and statistical variable of the checkpoint onto the network's weights, each used
    exactly once; the optimizer's slots and counters are left out. Returns the names used."""
    import numpy as np
    shapes = reader.get_variable_to_shape_map()
    model_vars = {n for n in shapes if not re.search(r"/Adam(_1)?$|^beta[12]_power$|global_step", n)}
    pairs = _variable_map(kind, network)
    used = [name for name, _ in pairs]
    if sorted(used) != sorted(model_vars) or len(set(used)) != len(used):
        raise ValueError(f"the checkpoint's variables and the {kind} network's do not match one to one: "
                         f"unused {sorted(model_vars - set(used))}, missing {sorted(set(used) - model_vars)}")
    for name, weight in pairs:
        value = reader.get_tensor(name)
        weight.assign(np.reshape(value, weight.shape))     # the mid-end's [7, C, 1, F] kernels: Conv1D's [7, C, F]
    return used


def graph_pools(meta):
    """((ksize), (strides)) of each max pooling of a .meta graph, in the order musicnn created them
    (max_pooling2d, max_pooling2d_1, ...), time first."""
    from tensorflow.core.protobuf import meta_graph_pb2
    graph = meta_graph_pb2.MetaGraphDef.FromString(meta).graph_def
    pools = {n.name: n for n in graph.node if n.op == "MaxPool" and n.name.startswith("model/max_pooling2d")}

    def order(name):
        scope = name.split("/")[1]
        return int(scope.rsplit("_", 1)[1]) if scope != "max_pooling2d" else 0

    return tuple((tuple(pools[k].attr["ksize"].list.i[1:3]), tuple(pools[k].attr["strides"].list.i[1:3]))
                 for k in sorted(pools, key=order))


@contextlib.contextmanager
def checkpoint_reader(wheel_path, folder):
    """A TensorFlow checkpoint reader of the wheel's checkpoint `folder` (e.g. musicnn/MTT_musicnn),
    its files extracted to a temporary folder for the reader's life. The folder's own `checkpoint` file
    points into the authors' home, so the files are read by prefix."""
    import tensorflow as tf
    with zipfile.ZipFile(wheel_path) as wheel, tempfile.TemporaryDirectory(prefix="tagger-musicnn-") as tmp:
        for name in CHECKPOINT_FILES:
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(wheel.read(f"{folder}/{name}"))
        yield tf.compat.v1.train.NewCheckpointReader(tmp + "/")


def convert(wheel_path, info, model_name, out_dir):
    """Write one export; returns its folder."""
    from tagger import export, models
    from tagger.models.layers import patch_model
    from tagger.models.musicnn import build_musicnn_network
    from tagger.models.vgg import build_vgg_network
    dataset, kind = model_name.split("_")
    tags = info["labels"][dataset]
    folder = f"musicnn/{model_name}"
    missing = [f"{folder}/{n}" for n in CHECKPOINT_FILES + (".meta", "experiment.result") if f"{folder}/{n}" not in
               info["files"]]
    if missing:
        raise UsageError(f"{wheel_path} lacks {', '.join(missing)}: it is not musicnn 0.1.0's wheel")
    family = models.get(kind)
    with zipfile.ZipFile(wheel_path) as wheel:
        meta = wheel.read(f"{folder}/.meta")
        reported = reported_figures(wheel.read(f"{folder}/experiment.result").decode())
    # The pooling of the graph the weights were trained in (musicnn's code differs from it for MSD_vgg).
    network = (build_vgg_network(len(tags), pools=graph_pools(meta)) if kind == "vgg"
               else build_musicnn_network(len(tags)))
    with checkpoint_reader(wheel_path, folder) as reader:
        used = assign_checkpoint(kind, network, reader)
    model = patch_model(network, family.layout, kind)
    clip = family.layout.shortest_clip()
    with open(wheel_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    config = {"family": kind, "arch": kind, "tags": tags, "sample_rate": 16000, "clip_samples": clip,
              "window": family.layout.windowing(clip), "converted": True,
              "source": {"wheel": os.path.basename(wheel_path), "sha256": sha, "checkpoint": folder,
                         "variables": len(used), "model": model_name},
              "trained_on": DATASETS[dataset],
              "reported_by_authors": {**reported, "split": "test", "note": "reported by the authors in "
                                      f"{folder}/experiment.result, not measured by tagger"},
              "licenses": {"code": LICENSES["code"], "data": LICENSES[dataset]}}
    return export.export(model, family.layout, out_dir, tags, clip, {"config.json": config}, family.embedding)


def run(args):
    info = read_wheel(args.wheel)
    todo = [(m, f"{args.models_dir.rstrip('/')}/{MODELS[m]}") for m in args.models]
    quiet_tensorflow()
    written, kept = [], []
    for model_name, out in todo:
        if files.is_export(out) and not args.force:
            kept.append(out)
            print(f"{out}: already there (--force replaces it)", file=sys.stderr)
            continue
        print(f"Converting {model_name} -> {out}", file=sys.stderr)
        convert(args.wheel, info, model_name, out)
        written.append(out)
    for out in written:
        reported = json.load(open(f"{out}/config.json"))["reported_by_authors"]
        print(f"Wrote {out}/ (the authors report test ROC-AUC {reported['roc_auc']:.4f}, "
              f"PR-AUC {reported['pr_auc']:.4f})")
    if written:
        print(f"Tag music with one: python -m tagger.predict song.mp3 --model {os.path.basename(written[0])}")
    return EXIT_OK


def main(argv=None):
    return main_guard(PROG, run, parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
