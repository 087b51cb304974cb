"""Train the study's CNN or CRNN, evaluate it on the test split and export a SavedModel.

    python -m tagger.train --arch crnn                      # the demo: tfrecords/demo, made if missing
    python -m tagger.train --arch cnn --data tfrecords/mtat # the study's presets on MagnaTagATune

Without --data the demo dataset and the demo's own settings are used (printed at the start);
explicit flags override every preset. Killed at any moment, the same command resumes from the last
completed epoch.
"""
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

from tagger import files
from tagger.cli import (EXIT_FAILED, EXIT_OK, ArgumentParser, UsageError, main_guard, positive_float,
                        positive_int, quiet_tensorflow)

PROG = "python -m tagger.train"
DEMO_DATA = "tfrecords/demo"

# The study's settings (Dieleman & Schrauwen 2014 as replicated; Choi et al. 2017).
STUDY = {
    "cnn": dict(optimizer="sgd", lr=0.005, momentum=0.99, batch_size=10, epochs=20),
    "crnn": dict(optimizer="adam", lr=1e-4, momentum=0.0, batch_size=16, epochs=20, bn_momentum=0.99),
}
# The demo's own settings: a few hundred short synthetic clips on a laptop CPU. Adam (1e-3 for the
# CNN, 2e-3 for the CRNN) and a faster batch-norm average converge in the few hundred steps the demo
# affords; the study's SGD and 1e-4 do not. The CRNN's fifth epoch is margin: after four, its test
# ROC-AUC moved between 0.845 and 0.869 with the float32 rounding of front-end changes.
DEMO = {
    "cnn": dict(optimizer="adam", lr=1e-3, epochs=40),
    "crnn": dict(lr=2e-3, bn_momentum=0.9, epochs=5),
}
# Keras dtype policies for the convolutional layers (models.py): float32, or 16-bit arithmetic with
# float32 weights for GPUs and CPUs with 16-bit matrix units; what each adds to a run's name.
PRECISIONS = {"float32": "", "mixed_bfloat16": "-bf16", "mixed_float16": "-fp16"}


@dataclass(frozen=True)
class Config:
    arch: str
    data: str
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    seed: int = 0
    length: int = 256           # CNN: strided convolution's filter length and stride
    stride: int = 256
    gru_units: int = 32         # CRNN
    bn_momentum: float = 0.99   # CRNN
    width: float = 1.0          # channel multiplier, < 1 for quick tests
    restore_best: bool = False
    shuffle_buffer: int = 512
    strategy: str = "default"   # or "mirrored": tf.distribute.MirroredStrategy over --devices
    devices: int = 0            # mirrored: how many GPUs (0: all), or CPU logical devices without a GPU
    scale_lr: bool = False      # mirrored: multiply lr by the number of replicas
    precision: str = "float32"  # or mixed_bfloat16 / mixed_float16 (PRECISIONS)
    run_name: str = ""
    runs_dir: str = "runs"
    models_dir: str = "saved_models"
    demo: bool = False

    def default_run_name(self):
        data = os.path.basename(self.data.rstrip("/"))
        shape = f"-l{self.length}s{self.stride}" if self.arch == "cnn" else f"-gru{self.gru_units}"
        width = f"-w{self.width:g}" if self.width != 1 else ""
        best = "-best" if self.restore_best else ""
        mirrored = (f"-mirrored{self.devices or ''}" + ("-scaledlr" if self.scale_lr else "")
                    if self.strategy == "mirrored" else "")
        return (f"{self.arch}{shape}{width}-{data}-{self.optimizer}-lr{self.lr:g}"
                + (f"-m{self.momentum:g}" if self.optimizer == "sgd" else "")
                + f"-b{self.batch_size}-e{self.epochs}-s{self.seed}{PRECISIONS[self.precision]}{best}{mirrored}")


def build_parser(prog=PROG):
    p = ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=("cnn", "crnn"), default="crnn")
    p.add_argument("--data", help=f"TFRecords folder from tagger.prepare (default: {DEMO_DATA}, created if missing)")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--optimizer", choices=("sgd", "adam"))
    p.add_argument("--lr", type=positive_float, help="learning rate")
    p.add_argument("--momentum", type=float, help="SGD momentum, in [0, 1)")
    p.add_argument("--length", type=positive_int, help="CNN: filter length of the strided convolution")
    p.add_argument("--stride", type=positive_int, help="CNN: its stride")
    p.add_argument("--gru-units", type=positive_int, help="CRNN: units of each GRU layer (default 32)")
    p.add_argument("--bn-momentum", type=float, help="CRNN: batch-norm moving-average momentum")
    p.add_argument("--width", type=positive_float, help="multiply channel counts (tests, quick checks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategy", choices=("default", "mirrored"),
                   help="mirrored: data-parallel over local GPUs (tf.distribute.MirroredStrategy)")
    p.add_argument("--devices", type=positive_int, help="mirrored: use this many GPUs (default: all); "
                   "with no GPU, split the CPU into this many devices (for testing)")
    p.add_argument("--scale-lr", action="store_true", help="mirrored: multiply --lr by the number of replicas "
                   "(the global batch is --batch-size x replicas)")
    p.add_argument("--precision", choices=tuple(PRECISIONS), help="mixed_bfloat16 / mixed_float16: 16-bit "
                   "convolutions and dense layers with float32 weights, for GPUs (and CPUs with AVX-512 BF16 "
                   "or AMX); the front end, GRUs and outputs stay float32, and the test evaluation and export use "
                   "a float32 copy (default: float32)")
    p.add_argument("--run-name", help="name under runs/ and saved_models/ (default: from the settings)")
    p.add_argument("--restore-best", action="store_true", help="export the best val_auc epoch, not the last")
    p.add_argument("--shuffle-buffer", type=positive_int, help="records in the shuffle buffer (default 512)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--models-dir", default="saved_models")
    return p


def config_from_args(argv, prog=PROG):
    """Presets (study, then demo when --data is omitted), overridden by explicit flags."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.momentum is not None and not 0 <= args.momentum < 1:
        parser.error(f"--momentum {args.momentum} must be in [0, 1)")
    if args.bn_momentum is not None and not 0 <= args.bn_momentum < 1:
        parser.error(f"--bn-momentum {args.bn_momentum} must be in [0, 1)")
    if (args.devices or args.scale_lr) and args.strategy != "mirrored":
        parser.error("--devices and --scale-lr go with --strategy mirrored")
    if (args.length is None) != (args.stride is None):
        parser.error("give --length and --stride together (the study's pairs: 1024/1024, 1024/512, "
                     "512/512, 512/256, 256/256)")
    demo = args.data is None
    values = {**STUDY[args.arch], **(DEMO[args.arch] if demo else {})}
    flags = {k: v for k, v in vars(args).items() if v is not None and k in {f.name for f in dataclasses.fields(Config)}}
    values.update(flags)
    values.update(arch=args.arch, data=args.data or DEMO_DATA, demo=demo)
    config = Config(**values)
    if not config.run_name:
        config = dataclasses.replace(config, run_name=config.default_run_name())
    return config


# ----------------------------------------------------------------------------------------------

def provenance(manifest_path):
    """Library versions, git commit, data manifest hash: what config.json and metrics.json record."""
    import hashlib

    import keras
    import numpy as np
    import sklearn
    import tensorflow as tf
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    with tf.io.gfile.GFile(manifest_path, "rb") as f:
        manifest_sha = hashlib.sha256(f.read()).hexdigest()
    return {"versions": {"python": platform.python_version(), "tensorflow": tf.__version__,
                         "keras": keras.__version__, "numpy": np.__version__, "sklearn": sklearn.__version__},
            "git_commit": commit, "manifest_sha256": manifest_sha, "machine": platform.machine()}


def build_model(config, manifest):
    from tagger import models
    num_tags, clip = len(manifest["tags"]), manifest["clip_samples"]
    if config.arch == "cnn":
        sub = clip // 10
        if models.cnn_frames(sub, config.length, config.stride) < 1:
            raise UsageError(f"length {config.length} / stride {config.stride} does not fit sub-clips of "
                             f"{sub / manifest['sample_rate']:.2f} s: the poolings leave no time step; use a "
                             "smaller --length/--stride or longer clips")
        return models.build_cnn(num_tags, sub, config.length, config.stride,
                                filters=max(1, round(32 * config.width)),
                                dense_units=max(1, round(100 * config.width)), precision=config.precision)
    filters = tuple(max(1, round(f * config.width)) for f in (64, 128, 128, 128))
    try:
        return models.build_crnn(num_tags, clip, gru_units=config.gru_units, filters=filters,
                                 bn_momentum=config.bn_momentum, precision=config.precision)
    except ValueError as e:
        raise UsageError(f"the CRNN does not fit clips of {clip} samples: {e}") from None


def compile_model(model, config, replicas=1):
    import keras

    def make(cls, *args, **kwargs):
        return (_replica_mean(cls, replicas) if replicas > 1 else cls)(*args, **kwargs)

    cls = keras.optimizers.SGD if config.optimizer == "sgd" else keras.optimizers.Adam
    kwargs = {"momentum": config.momentum} if config.optimizer == "sgd" else {}
    if config.precision == "mixed_float16":
        # float16 gradients underflow without loss scaling; Keras adds it only for a model built under a
        # global mixed_float16 policy, and ours sets the policy per layer.
        optimizer = make(keras.optimizers.LossScaleOptimizer, cls(config.lr, **kwargs))
    else:
        optimizer = make(cls, config.lr, **kwargs)
    model.compile(optimizer=optimizer, loss="binary_crossentropy",
                  metrics=[keras.metrics.AUC(multi_label=True, curve="ROC", name="auc"),
                           keras.metrics.AUC(multi_label=True, curve="PR", name="pr_auc")])
    return model


def _replica_mean(optimizer_class, replicas):
    """The optimizer with its loss divided by the number of replicas before the gradients.

    Keras 3.6 averages the loss over each replica's batch and then sums the replicas' gradients, so
    under MirroredStrategy every update is `replicas` times too large (keras-team/keras#19891, fixed
    upstream by keras-team/keras#20609). Dividing here makes the update the mean over the global
    batch, as on one device; the logged loss is taken before this scaling and stays the true mean.
    A Keras with the fix needs this removed: test_mirrored_training_updates_like_one_device fails.
    """
    class ReplicaMean(optimizer_class):
        def scale_loss(self, loss):
            return super().scale_loss(loss) / replicas

    ReplicaMean.__name__ = f"ReplicaMean{optimizer_class.__name__}"
    return ReplicaMean


def ensure_demo_data(config):
    if os.path.isfile(os.path.join(config.data, "manifest.json")):
        return
    from tagger import prepare
    print(f"Creating the demo dataset in {config.data} (once)", file=sys.stderr)
    status = prepare.main(["--source", "demo", "--out", config.data])
    if status != EXIT_OK:
        raise UsageError(f"could not create the demo dataset in {config.data}")


def compared_settings(config):
    """The fields two runs (or searches) must share to be the same: all but the output folders."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in ("runs_dir", "models_dir")}


def config_defaults():
    """Each Config field's default: the value of a field that a record written before it existed lacks."""
    return {f.name: f.default for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING}


def settings_differ(before, config):
    """The fields of `config` that differ from a recorded config (config.json's "config"); a field
    the record lacks (written by an older version) counts as its default. Output folders don't count."""
    defaults = config_defaults()
    return [k for k, v in compared_settings(config).items() if before.get(k, defaults.get(k)) != v]


def recorded_config(folder):
    """The "config" of the config.json in a run or export folder; None where there is none."""
    import tensorflow as tf
    path = f"{folder}/config.json"
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f).get("config", {})


def check_run_folder(run_dir, config):
    """A run folder with another configuration is refused; the same one is resumed."""
    before = recorded_config(run_dir)
    diff = settings_differ(before, config) if before is not None else []
    if diff:
        raise UsageError(f"{run_dir} holds a run with other settings ({', '.join(diff)} differ): choose "
                         "another --run-name")


def make_strategy(config):
    """MirroredStrategy over the first --devices GPUs (all by default); with no GPU, over the CPU split
    into --devices logical devices (a test of the multi-device path on any machine). None for the
    default strategy."""
    if config.strategy != "mirrored":
        return None
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        n = config.devices or len(gpus)
        if n > len(gpus):
            raise UsageError(f"--devices {n}: this machine has {len(gpus)} GPU(s); pass at most {len(gpus)}")
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(n)])
    n = config.devices or 1
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError:   # TensorFlow already started in this process (several runs in one process)
        if len(tf.config.list_logical_devices("CPU")) < n:
            raise UsageError(f"--devices {n}: the CPU was already split into fewer devices in this process; "
                             "run this training in its own process") from None
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(n)])


def check_data_folder(config):
    """--data must be a finished tagger.prepare output (the demo is made when missing): one line, exit 2."""
    if not config.demo and not files.exists(f"{config.data}/manifest.json"):
        raise UsageError(f"--data {config.data} is not a TFRecords folder from tagger.prepare (no "
                         "manifest.json there): prepare it first, or check the path")


def choose_cpu_kernels(config):
    """Call before TensorFlow is imported. Under MirroredStrategy, TF 2.16's oneDNN kernels fail in the
    CRNN's batch norm on the second replica ("scale must have the same number of elements as the
    channels of x", as in tensorflow/tensorflow#61496), so a mirrored run uses TensorFlow's own CPU
    kernels unless the user set TF_ENABLE_ONEDNN_OPTS (GPU kernels are not affected either way)."""
    import tagger
    if config.strategy == "mirrored" and tagger.ONEDNN_DEFAULTED and "tensorflow" not in sys.modules:
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"


def run(config):
    """Train, evaluate, export. Returns the exit status."""
    started = time.time()
    check_data_folder(config)
    print(("Demo settings (no --data): " if config.demo else "Settings: ")
          + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items()), file=sys.stderr)
    choose_cpu_kernels(config)
    if config.demo:
        ensure_demo_data(config)
    quiet_tensorflow()
    import keras
    import tensorflow as tf

    from tagger import callbacks, data, evaluate, export, models

    strategy = make_strategy(config)      # before anything starts TensorFlow's runtime
    if models.emulated_precision(config.precision):
        print(f"Note: this CPU has no units for --precision {config.precision} "
              f"({' or '.join(models.CPU_16BIT_FLAGS[config.precision])}), so TensorFlow converts in software: "
              "expect it slower than float32. It pays on GPUs.", file=sys.stderr)
    replicas = strategy.num_replicas_in_sync if strategy else 1
    global_batch = config.batch_size * replicas
    lr = config.lr * replicas if config.scale_lr else config.lr
    if strategy:
        print(f"Training on {replicas} replicas ({', '.join(strategy.extended.worker_devices)}): global batch "
              f"{global_batch}, learning rate {lr:g}", file=sys.stderr)
    manifest = data.load_manifest(config.data)
    run_dir = f"{config.runs_dir}/{config.run_name}"
    check_run_folder(run_dir, config)
    keras.utils.set_random_seed(config.seed)
    scope = strategy.scope if strategy else contextlib.nullcontext
    with scope():
        model = compile_model(build_model(config, manifest), dataclasses.replace(config, lr=lr), replicas)
    info = {"config": dataclasses.asdict(config), "data_split": manifest["split"], "seed": config.seed,
            "replicas": replicas, "global_batch_size": global_batch, "learning_rate": lr,
            "sample_rate": manifest["sample_rate"], "clip_samples": manifest["clip_samples"],
            "tags": manifest["tags"], "data": config.data, "arch": config.arch,
            **provenance(f"{config.data}/manifest.json")}
    tf.io.gfile.makedirs(run_dir)
    with tf.io.gfile.GFile(f"{run_dir}/config.json", "w") as f:
        json.dump(info, f, indent=1)

    layout = config.arch
    # The CNN takes its sub-clips less a tail that no frame reads (models.cnn_input_samples).
    keep = model.input_shape[-1] if layout == "cnn" else None
    train_ds = data.dataset(config.data, "train", layout, global_batch, manifest, shuffle_seed=config.seed,
                            shuffle_buffer=config.shuffle_buffer, sub_clip_samples=keep)
    valid_ds = data.dataset(config.data, "valid", layout, global_batch, manifest, sub_clip_samples=keep)
    ckpt_dir = f"{run_dir}/checkpoint"
    state = callbacks.read_state(ckpt_dir)
    initial_epoch = 0
    if state:
        with scope():
            model.optimizer.build(model.trainable_variables)
            callbacks.load_weights(model, f"{ckpt_dir}/{state['weights']}")
        initial_epoch = state["epoch"]
        print(f"Resuming from epoch {initial_epoch} of {config.epochs}", file=sys.stderr)
    checkpoint = callbacks.EpochCheckpoint(ckpt_dir, state=state)
    guard = callbacks.NanGuard(checkpoint)
    if initial_epoch < config.epochs:
        model.fit(train_ds, validation_data=valid_ds, epochs=config.epochs, initial_epoch=initial_epoch,
                  verbose=1 if sys.stdout.isatty() else 2,
                  callbacks=[keras.callbacks.TensorBoard(run_dir, update_freq="epoch", profile_batch=0),
                             checkpoint, guard])
    train_seconds = checkpoint.train_seconds
    if guard.where:
        epoch, batch = guard.where
        last = checkpoint.history[-1]["epoch"] if checkpoint.history else 0
        sys.stderr.write(f"{PROG}: error: the loss became NaN or infinite in epoch {epoch}, batch {batch}; "
                         f"training stopped (last good checkpoint: epoch {last} in {ckpt_dir}). Try a lower "
                         f"--lr (now {config.lr:g}).\n")
        return EXIT_FAILED
    exported_epoch = config.epochs
    if config.restore_best and checkpoint.best:
        callbacks.load_weights(model, f"{ckpt_dir}/{checkpoint.best['weights']}")
        exported_epoch = checkpoint.best["epoch"]

    if strategy or config.precision != "float32":
        # Evaluate and export a float32 copy built outside any strategy: a model built inside
        # strategy.scope() does not export on TF 2.16 ("a function referencing variables which have
        # been deleted"), and a 16-bit model would serve slowly wherever there are no 16-bit units. The
        # weights are float32 either way, so the copy is exact and the export computes in float32.
        trained, model = model, build_model(dataclasses.replace(config, precision="float32"), manifest)
        model.set_weights(trained.get_weights())
    test_ds = data.dataset(config.data, "test", layout, config.batch_size, manifest, sub_clip_samples=keep)
    y, p = evaluate.predict_dataset(model.predict_on_batch, test_ds)
    test = evaluate.tag_metrics(y, p, manifest["tags"])
    evaluate.write_report(run_dir, test, manifest["tag_counts"]["train"],
                          f"{config.run_name}: test ROC-AUC {test['roc_auc']:.4f}",
                          tensorboard_dir=f"{run_dir}/test", step=config.epochs)
    metrics = {"test": test, "epochs": config.epochs, "exported_epoch": exported_epoch,
               "restore_best": config.restore_best, "train_seconds": round(train_seconds, 1),
               "history": checkpoint.history, "test_clips": int(len(y)),
               "train_tag_counts": manifest["tag_counts"]["train"],
               "seed": config.seed, "data_split": manifest["split"],
               "manifest_sha256": info["manifest_sha256"], "git_commit": info["git_commit"],
               "versions": info["versions"]}
    with tf.io.gfile.GFile(f"{run_dir}/metrics.json", "w") as f:
        json.dump(metrics, f, indent=1)
    out = export.export(model, config.arch, f"{config.models_dir}/{config.run_name}", manifest["tags"],
                        manifest["clip_samples"], {"config.json": info, "metrics.json": metrics})
    print(f"\nTest ROC-AUC {test['roc_auc']:.4f}, PR-AUC {test['pr_auc']:.4f} on {len(y)} clips "
          f"({config.arch}, epoch {exported_epoch} of {config.epochs}, {train_seconds:.0f} s training, "
          f"{time.time() - started:.0f} s in all)")
    print(f"  SavedModel, tags, config and metrics: {out}/")
    print(f"  TensorBoard curves: tensorboard --logdir {run_dir}")
    print(f"  per-tag table and chart: {run_dir}/per_tag.csv, {run_dir}/per_tag.png")
    return EXIT_OK


def main(argv=None):
    config = config_from_args(sys.argv[1:] if argv is None else argv)
    return main_guard(PROG, run, config)


if __name__ == "__main__":
    sys.exit(main())
