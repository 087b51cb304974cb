"""Train a model family, evaluate it on the test split and export a SavedModel.

    python -m tagger.train --arch crnn                      # the demo: tfrecords/demo, made if missing
    python -m tagger.train --arch cnn --data tfrecords/mtat # the study's presets on MagnaTagATune

Without --data the demo dataset and the family's demo settings are used (printed at the start);
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

from tagger import config, decisions, files, models, schedules
from tagger.cli import (EXIT_FAILED, EXIT_OK, ArgumentParser, UsageError, add_models_dir_flag, main_guard,
                        plural, positive_int, quiet_tensorflow)
from tagger.finetune import FREEZE, read_init
from tagger.models import DoesNotFit

PROG = "python -m tagger.train"


def build_parser(prog=PROG):
    p = ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    config.add_family_flags(p, default=None)          # None: the --init export's, or models.DEFAULT
    p.add_argument("--data", help=f"TFRecords folder from tagger.prepare (default: {config.DEMO_DATA}, created if "
                   "missing, with the family's demo settings)")
    config.add_training_flags(p)
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the shuffle and the random pieces")
    p.add_argument("--strategy", choices=("default", "mirrored"), default="default",
                   help="mirrored: data-parallel over local GPUs (tf.distribute.MirroredStrategy)")
    p.add_argument("--devices", type=positive_int, help="mirrored: use this many GPUs (default: all); "
                   "with no GPU, split the CPU into this many devices (for testing)")
    p.add_argument("--scale-lr", action="store_true", help="mirrored: multiply --lr by the number of replicas "
                   "(the global batch is --batch-size x replicas)")
    p.add_argument("--run-name", help="name of the run's folder and of its export (default: from the settings)")
    p.add_argument("--restore-best", action="store_true", help="export the best val_auc epoch, not the last")
    p.add_argument("--threshold-rule", type=decisions.parse_rule, metavar="RULE",
                   help=f"how each tag's decision threshold is chosen on the valid split after training: "
                   f"{decisions.RULES_HELP}; stored with the export (default f1)")
    p.add_argument("--stop-after", type=positive_int, metavar="EPOCH", help="stop once this epoch is done, "
                   "checkpointed: the same command without it (or with a later one) goes on from there")
    p.add_argument("--init", metavar="NAME_OR_PATH", help="start from an export's weights (its architecture, in "
                   "float32; the output layer rebuilt when the data's tags differ, shared tags kept); a constant "
                   "learning rate, a tenth of the family's unless --lr or --freeze body")
    p.add_argument("--freeze", choices=FREEZE, help="with --init: body = train the output layer alone")
    p.add_argument("--shuffle-buffer", type=positive_int, help="records in the shuffle buffer (default 512)")
    add_output_flags(p)
    return p


def add_output_flags(parser):
    """--runs-dir and --models-dir: where a run's checkpoints and curves, and its export, go."""
    parser.add_argument("--runs-dir", default="runs", metavar="DIR",
                        help="checkpoints, TensorBoard curves and reports, one folder per run")
    add_models_dir_flag(parser)


def config_from_args(argv, prog=PROG):
    """Presets (the family's study settings, then its demo settings when --data is omitted), overridden
    by explicit flags."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.freeze and not args.init:
        parser.error("--freeze goes with --init")
    fixed = {}
    if args.init:
        try:
            folder, info = read_init(args.init, args.models_dir)
        except UsageError as e:
            parser.error(str(e))
        arch = info.get("arch") or info.get("family")
        if arch not in models.names():
            parser.error(f"--init {args.init}: its config.json names no family of this tagger ({arch}): export "
                         "it again with this tagger")
        if args.arch not in (None, arch):
            parser.error(f"--init {args.init} is a {arch} model: leave out --arch {args.arch}, or pass --arch {arch}")
        args.arch = arch
        shaped = [flag for flag, value in (("--width", args.width), ("--precision", args.precision)) if value]
        shaped += [o.flag for name, (o, _) in models.all_options().items() if getattr(args, name) is not None]
        if shaped:
            parser.error(f"{', '.join(shaped)} with --init: the architecture is the export's, {folder}")
        # The model is the export's model.keras: its width and options (a trained export's config records
        # them; a converted one has none), in float32 as every export is kept. One constant learning rate
        # unless --schedule says otherwise (won2020's later phases have fixed rates made for a fresh start).
        recorded = info.get("config", {})
        fixed = {"init": folder, "freeze": args.freeze or "", "width": recorded.get("width", 1.0),
                 "precision": "float32", "schedule": args.schedule or "constant",
                 **{o.name: recorded[o.name] for o in models.get(arch).options if o.name in recorded}}
    args.arch = args.arch or models.DEFAULT
    family, given = config.check_family_flags(parser, args)
    config.check_training_flags(parser, args)
    if (args.devices or args.scale_lr) and args.strategy != "mirrored":
        parser.error("--devices and --scale-lr go with --strategy mirrored")
    if args.init and args.lr is None and not args.freeze:
        preset = family.preset(args.data is None)
        fixed["lr"] = preset["lr"] / 10
    return config.make_config(family, args, given, **fixed)


# ----------------------------------------------------------------------------------------------

def provenance(manifest_path):
    """Library versions, git commit, data manifest hash: what config.json and metrics.json record."""
    import hashlib

    import keras
    import numpy as np
    import sklearn
    import tensorflow as tf
    source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:                   # the commit of the clone tagger runs from (none for an installed copy)
        top, commit = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                                     text=True, timeout=5, cwd=source).stdout.split() or (None, None)
        commit = commit if top and os.path.realpath(top) == os.path.realpath(source) else None
    except (OSError, subprocess.SubprocessError, ValueError):
        commit = None
    with tf.io.gfile.GFile(manifest_path, "rb") as f:
        manifest_sha = hashlib.sha256(f.read()).hexdigest()
    return {"versions": {"python": platform.python_version(), "tensorflow": tf.__version__,
                         "keras": keras.__version__, "numpy": np.__version__, "sklearn": sklearn.__version__},
            "git_commit": commit, "manifest_sha256": manifest_sha, "machine": platform.machine()}


def build_model(cfg, manifest):
    """The family's model for the data's tags and clip length (or the --init export's, its weights
    loaded); a clip it cannot take is a usage error."""
    if cfg.init:
        from tagger.finetune import init_model
        info = json.loads(files.read_text(f"{cfg.init}/config.json"))
        return init_model(cfg.init, info, cfg.family, manifest, cfg.freeze)[0]
    try:
        return cfg.family.build(len(manifest["tags"]), manifest["clip_samples"], width=cfg.width,
                                precision=cfg.precision, **cfg.option_values())
    except DoesNotFit as e:
        raise UsageError(f"{cfg.arch}: {e}") from None


def compile_model(model, cfg, replicas=1, phase=None):
    """Compile with the optimizer of `phase` (default: the run's first), BCE and Keras's multi-label AUCs."""
    import keras

    from tagger.optimizers import make_optimizer
    phase = phase or schedules.phases(cfg.schedule, cfg.optimizer, cfg.lr, cfg.momentum, cfg.epochs)[0]
    model.compile(optimizer=make_optimizer(phase, cfg.weight_decay, cfg.precision, replicas),
                  loss="binary_crossentropy",
                  metrics=[keras.metrics.AUC(multi_label=True, curve="ROC", name="auc"),
                           keras.metrics.AUC(multi_label=True, curve="PR", name="pr_auc")])
    return model


def ensure_demo_data(cfg):
    if os.path.isfile(os.path.join(cfg.data, "manifest.json")):
        return
    from tagger import prepare
    print(f"Creating the demo dataset in {cfg.data} (once)", file=sys.stderr)
    status = prepare.main(["--source", "demo", "--out", cfg.data])
    if status != EXIT_OK:
        raise UsageError(f"could not create the demo dataset in {cfg.data}")


def recorded_config(folder):
    """The "config" of the config.json in a run or export folder; None where there is none."""
    import tensorflow as tf
    path = f"{folder}/config.json"
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f).get("config", {})


def check_run_folder(run_dir, cfg):
    """A run folder with another configuration is refused; the same one is resumed."""
    before = recorded_config(run_dir)
    diff = config.settings_differ(before, cfg) if before is not None else []
    if diff:
        raise UsageError(f"{run_dir} holds a run with other settings ({', '.join(diff)} differ): choose "
                         "another --run-name")


def make_strategy(cfg):
    """MirroredStrategy over the first --devices GPUs (all by default); with no GPU, over the CPU split
    into --devices logical devices (a test of the multi-device path on any machine). None for the
    default strategy."""
    if cfg.strategy != "mirrored":
        return None
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        n = cfg.devices or len(gpus)
        if n > len(gpus):
            raise UsageError(f"--devices {n}: this machine has {plural(len(gpus), 'GPU')}; pass at most {len(gpus)}")
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(n)])
    n = cfg.devices or 1
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError:   # TensorFlow already started in this process (several runs in one process)
        if len(tf.config.list_logical_devices("CPU")) < n:
            raise UsageError(f"--devices {n}: the CPU was already split into fewer devices in this process; "
                             "run this training in its own process") from None
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(n)])


def check_data_folder(cfg):
    """--data must be a finished tagger.prepare output (the demo is made when missing) with clips in
    every split: one line, exit 2. A local folder is read here, before TensorFlow loads; a remote one
    by check_splits once it has."""
    manifest = None if cfg.demo else files.read_local_manifest(cfg.data)
    if manifest is not None:
        check_splits(cfg.data, manifest)


def check_splits(data, manifest):
    """Training needs clips in train and validation, and the test report in test."""
    empty = [s for s in ("train", "valid", "test") if not manifest.get("splits", {}).get(s, {}).get("clips")]
    if empty:
        raise UsageError(f"--data {data}: the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} "
                         "empty (manifest.json): prepare the data again with clips in every split (see "
                         "tagger.prepare --plan)")


def finished_export(cfg):
    """(export folder, its metrics) when this exact run is finished and exported, else None. Local
    folders are read without TensorFlow."""
    folder = f"{cfg.models_dir}/{cfg.run_name}"
    if not (files.exists(f"{folder}/metrics.json") and files.is_export(folder)):
        return None
    try:
        before = json.loads(files.read_text(f"{folder}/config.json")).get("config", {})
        metrics = json.loads(files.read_text(f"{folder}/metrics.json"))
    except (OSError, ValueError):
        return None
    if config.settings_differ(before, cfg) or metrics.get("epochs") != cfg.epochs:
        return None
    return folder, metrics


def choose_cpu_kernels(cfg):
    """Call before TensorFlow is imported. Under MirroredStrategy, TF 2.16's oneDNN kernels fail in the
    CRNN's batch norm on the second replica ("scale must have the same number of elements as the
    channels of x", as in tensorflow/tensorflow#61496), so a mirrored run uses TensorFlow's own CPU
    kernels unless the user set TF_ENABLE_ONEDNN_OPTS (GPU kernels are not affected either way)."""
    import tagger
    if cfg.strategy == "mirrored" and tagger.ONEDNN_DEFAULTED and "tensorflow" not in sys.modules:
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"


def run(cfg):
    """Train, evaluate, export. Returns the exit status."""
    started = time.time()
    check_data_folder(cfg)
    done = None if cfg.stop_after else finished_export(cfg)
    if done:
        folder, metrics = done
        test = metrics["test"]
        from tagger.evaluate import with_interval
        print(f"{cfg.run_name} is finished: test ROC-AUC {with_interval(test, 'roc_auc')}, PR-AUC "
              f"{with_interval(test, 'pr_auc')}; its "
              f"export is {folder}/ (nothing changed; --run-name or other settings start another run)")
        return EXIT_OK
    print(("Demo settings (no --data): " if cfg.demo else "Settings: ") + ", ".join(
        f"{k}={v}" for k, v in cfg.settings().items() if k != "momentum" or cfg.optimizer == "sgd"), file=sys.stderr)
    choose_cpu_kernels(cfg)
    if cfg.demo:
        ensure_demo_data(cfg)
    quiet_tensorflow()
    import keras
    import tensorflow as tf

    from tagger import callbacks, data, evaluate, export, kernels
    from tagger.models.flops import forward_flops

    strategy = make_strategy(cfg)      # before anything starts TensorFlow's runtime
    if kernels.emulated_precision(cfg.precision):
        print(f"Note: this CPU has no units for --precision {cfg.precision} "
              f"({' or '.join(kernels.CPU_16BIT_FLAGS[cfg.precision])}), so TensorFlow converts in software: "
              "expect it slower than float32. It pays on GPUs.", file=sys.stderr)
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
        print(f"Devices: {plural(len(gpus), 'GPU')}: {', '.join(names)}", file=sys.stderr)
    else:
        print(f"Devices: CPU only, {kernels.cpu_cores()} cores (a GPU would be found if TensorFlow saw one: "
              "README, GPU)", file=sys.stderr)
    replicas = strategy.num_replicas_in_sync if strategy else 1
    global_batch = cfg.batch_size * replicas
    lr = cfg.lr * replicas if cfg.scale_lr else cfg.lr
    if strategy:
        print(f"Training on {replicas} replicas ({', '.join(strategy.extended.worker_devices)}): global batch "
              f"{global_batch}, learning rate {lr:g}", file=sys.stderr)
    manifest = data.load_manifest(cfg.data)
    check_splits(cfg.data, manifest)
    run_dir = f"{cfg.runs_dir}/{cfg.run_name}"
    check_run_folder(run_dir, cfg)
    family = cfg.family
    phases = schedules.phases(cfg.schedule, cfg.optimizer, lr, cfg.momentum, cfg.epochs)
    keras.utils.set_random_seed(cfg.seed)
    scope = strategy.scope if strategy else contextlib.nullcontext
    with scope():
        model = build_model(cfg, manifest)
    info = {"config": cfg.settings(), "data_split": manifest["split"], "seed": cfg.seed,
            "replicas": replicas, "global_batch_size": global_batch, "learning_rate": lr,
            "sample_rate": manifest["sample_rate"], "clip_samples": manifest["clip_samples"],
            "window": family.layout.windowing(manifest["clip_samples"]),
            "tags": manifest["tags"], "data": cfg.data, "decoder": manifest.get("decoder"), "arch": cfg.arch,
            **provenance(f"{cfg.data}/manifest.json")}
    tf.io.gfile.makedirs(run_dir)
    with tf.io.gfile.GFile(f"{run_dir}/config.json", "w") as f:
        json.dump(info, f, indent=1)

    layout, input_shape = family.layout, model.input_shape
    valid_ds = data.dataset(cfg.data, "valid", layout, global_batch, manifest, input_shape=input_shape)
    ckpt_dir = f"{run_dir}/checkpoint"
    state = callbacks.read_state(ckpt_dir)
    initial_epoch = state["epoch"] if state else 0
    # The optimizer of the last completed epoch, whose state the checkpoint holds.
    previous = next(p for p in phases if p.start <= max(initial_epoch - 1, 0) < p.end)
    with scope():
        compile_model(model, cfg, replicas, previous)
        if state:
            model.optimizer.build(model.trainable_variables)
            callbacks.load_weights(model, f"{ckpt_dir}/{state['weights']}")
            print(f"Resuming from epoch {initial_epoch} of {cfg.epochs}", file=sys.stderr)
    checkpoint = callbacks.EpochCheckpoint(ckpt_dir, state=state)
    guard = callbacks.NanGuard(checkpoint)
    board = keras.callbacks.TensorBoard(run_dir, update_freq="epoch", profile_batch=0)
    last = min(cfg.epochs, cfg.stop_after or cfg.epochs)
    steps = data.steps_per_epoch(manifest, "train", global_batch)
    watch = [] if gpus else [callbacks.EpochEstimate(steps, last - initial_epoch,
                                                     say=lambda text: print(text, file=sys.stderr))]
    for phase in phases:
        if phase.end <= initial_epoch or phase.start >= last or guard.where:
            continue
        first, end = max(phase.start, initial_epoch), min(phase.end, last)
        if phase != previous:
            with scope():
                switch_phase(model, cfg, replicas, phase, previous, checkpoint, ckpt_dir)
        train_ds = data.training_dataset(cfg.data, layout, global_batch, manifest, input_shape, cfg.seed, first,
                                         cfg.shuffle_buffer)
        model.fit(train_ds, validation_data=valid_ds, epochs=end, initial_epoch=first,
                  steps_per_epoch=steps, verbose=1 if sys.stdout.isatty() else 2, shuffle=False,  # tagger.data shuffles
                  callbacks=[board, checkpoint, guard, *watch])
        previous = phase
    train_seconds = checkpoint.train_seconds
    if guard.where:
        epoch, batch = guard.where
        last = checkpoint.history[-1]["epoch"] if checkpoint.history else 0
        sys.stderr.write(f"{PROG}: error: the loss became NaN or infinite in epoch {epoch}, batch {batch}; "
                         f"training stopped (last good checkpoint: epoch {last} in {ckpt_dir}). Try a lower "
                         f"--lr (now {cfg.lr:g}).\n")
        return EXIT_FAILED
    if last < cfg.epochs:
        print(f"Stopped after epoch {last} of {cfg.epochs} (--stop-after); the checkpoint is in {ckpt_dir}: the "
              "same command without --stop-after goes on from there", file=sys.stderr)
        return EXIT_OK
    exported_epoch = cfg.epochs
    if cfg.restore_best and checkpoint.best:
        callbacks.load_weights(model, f"{ckpt_dir}/{checkpoint.best['weights']}", model_only=True)
        exported_epoch = checkpoint.best["epoch"]

    if strategy or cfg.precision != "float32":
        # Evaluate and export a float32 copy built outside any strategy: a model built inside
        # strategy.scope() does not export on TF 2.16 ("a function referencing variables which have
        # been deleted"), and a 16-bit model would serve slowly wherever there are no 16-bit units. The
        # weights are float32 either way, so the copy is exact and the export computes in float32.
        trained, model = model, build_model(dataclasses.replace(cfg, precision="float32"), manifest)
        model.set_weights(trained.get_weights())
    test_clips = manifest["splits"]["test"]["clips"]
    print(f"Choosing per-tag thresholds on the valid split ({cfg.threshold_rule} rule), then evaluating on the "
          f"test split ({test_clips:,} clips)...", file=sys.stderr)
    tags = manifest["tags"]
    valid = evaluate.predict_split(model.predict_on_batch, cfg.data, "valid", layout, cfg.batch_size, manifest,
                                   input_shape)
    thresholds = decisions.choose_thresholds(valid["labels"], valid["probabilities"], tags, cfg.threshold_rule,
                                             "valid", cfg.data, clip_keys=decisions.clip_keys(valid))
    pred = evaluate.predict_split(model.predict_on_batch, cfg.data, "test", layout, cfg.batch_size, manifest,
                                  input_shape)
    groups, unit = evaluate.artists(cfg.data, manifest, pred["clip_id"], pred["path"])
    test = evaluate.evaluate_split(pred, tags, groups, unit, thresholds)
    evaluate.write_report(run_dir, test, manifest["tag_counts"]["train"],
                          f"{cfg.run_name}: test ROC-AUC {test['roc_auc']:.4f}",
                          tensorboard_dir=f"{run_dir}/test", step=cfg.epochs)
    train_clips = manifest["splits"]["train"]["clips"]
    metrics = {"test": test, "epochs": cfg.epochs, "exported_epoch": exported_epoch,
               "restore_best": cfg.restore_best, "train_seconds": round(train_seconds, 1),
               "train_clips_per_s": round(train_clips * len(checkpoint.history) / max(train_seconds, 1e-9), 2),
               "trainable_params": int(sum(w.numpy().size for w in model.trainable_weights)),
               "forward_flops_per_clip": forward_flops(model) * layout.pieces(manifest["clip_samples"]),
               "history": checkpoint.history, "test_clips": int(len(pred["labels"])),
               "train_tag_counts": manifest["tag_counts"]["train"],
               "seed": cfg.seed, "data_split": manifest["split"],
               "manifest_sha256": info["manifest_sha256"], "git_commit": info["git_commit"],
               "versions": info["versions"]}
    with tf.io.gfile.GFile(f"{run_dir}/metrics.json", "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"Exporting the SavedModel to {cfg.models_dir}/{cfg.run_name}/...", file=sys.stderr)
    out = export.export(model, layout, f"{cfg.models_dir}/{cfg.run_name}", tags, manifest["clip_samples"],
                        {"config.json": info, "metrics.json": metrics, evaluate.THRESHOLDS: thresholds},
                        family.embedding, decisions.threshold_vector(thresholds, tags).tolist())
    # The test report in the export, as tagger.evaluate writes it (what experiments compare pairs).
    evaluate.write_evaluation(f"{out}/eval-test", test, pred, tags, groups, unit, manifest["tag_counts"]["train"],
                              f"{cfg.run_name} on {cfg.data} (test)", cfg.data, "test",
                              {"data": cfg.data, "model": out})
    print(f"\nTest ROC-AUC {evaluate.with_interval(test, 'roc_auc')}, PR-AUC {evaluate.with_interval(test, 'pr_auc')} "
          f"on {len(pred['labels'])} clips "
          f"({cfg.arch}, epoch {exported_epoch} of {cfg.epochs}, {train_seconds:.0f} s training, "
          f"{time.time() - started:.0f} s in all)")
    print("\n".join(evaluate.summary(test, "  test", len(pred["labels"]))[1:]))
    without = decisions.without_threshold(thresholds)
    if without:
        print(f"  {plural(len(without), 'tag')} without a threshold: " +
              ", ".join(f"{t} ({why})" for t, why in list(without.items())[:5]) + (", ..." if len(without) > 5 else ""))
    print(f"  SavedModel, tags, thresholds, config and metrics: {out}/ (test report and predictions in eval-test/)")
    print(f"  TensorBoard curves: tensorboard --logdir {run_dir}")
    print(f"  per-tag table and chart: {run_dir}/per_tag.csv, {run_dir}/per_tag.png")
    return EXIT_OK


def switch_phase(model, cfg, replicas, phase, previous, checkpoint, ckpt_dir):
    """Enter a new phase of the schedule: reload the best epoch's weights by validation loss where the
    phase asks for it, then change the learning rate (same optimizer) or the optimizer."""
    from tagger import callbacks
    note = ""
    if phase.reload_best and checkpoint.best_loss:
        callbacks.load_weights(model, f"{ckpt_dir}/{checkpoint.best_loss['weights']}", model_only=True)
        note = f"; weights of epoch {checkpoint.best_loss['epoch']} (lowest validation loss) reloaded"
    if phase.same_optimizer(previous):
        model.optimizer.learning_rate = phase.lr
    else:
        compile_model(model, cfg, replicas, phase)
    what = f"{phase.optimizer}{' (Nesterov)' if phase.nesterov else ''}" + (
        f", momentum {phase.momentum:g}" if phase.optimizer == "sgd" else "")
    print(f"Schedule {cfg.schedule}: from epoch {phase.start + 1}, {what} at learning rate {phase.lr:g}{note}",
          file=sys.stderr)


def main(argv=None):
    return main_guard(PROG, run, config_from_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
