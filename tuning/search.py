"""Hyperparameter searches with KerasTuner: the study's Table I (CNN) and Fig. 7 (CRNN), and the
same for any registered family.

    python -m tuning.search --arch cnn [--data DIR] [--epochs N] [--momentum 0.99,0.97,0.95,0.9,0]
                            [--lr 0.001,0.002,0.005,0.01,0.02] [--length 256 --stride 256]
    python -m tuning.search --arch crnn [--data DIR] [--epochs N] [--lr 1e-4,2e-4,5e-4,1e-3,2e-3]

A grid search (KerasTuner's GridSearch) with objective val_auc (max) over a constant learning rate:
the family's search optimizer and grid (`Family.search`: SGD momentum x learning rate for the CNN,
Adam's learning rate for the others) unless --lr / --momentum give another. The models come from
the same builders as tagger.train. Every trial is a TensorBoard run with its hyperparameters (the HParams tab). Running
the same command again after an interruption goes on with the trials not yet done. Scale-out: set
KERASTUNER_TUNER_ID (chief, tuner0, tuner1, ...), KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT
and start the same command once per process (see the README).
"""
import argparse
import dataclasses
import math
import os
import sys

from tagger import config as configs
from tagger import files, train
from tagger.cli import (EXIT_OK, ArgumentParser, UsageError, main_guard, positive_float, positive_int,
                        quiet_tensorflow)

PROG = "python -m tuning.search"


def number_list(low, high, what):
    """argparse type: comma-separated numbers, each in [low, high)."""
    def parse(text):
        try:
            values = tuple(float(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
        bad = [v for v in values if not low <= v < high]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"{what} must be in [{low:g}, {high:g}): {text!r}")
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{text!r} repeats a value")
        return values
    return parse


def parse_args(argv):
    """(args, family, the family's options given)."""
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    configs.add_family_flags(p)
    p.add_argument("--data", help="TFRecords folder (default: the demo, tfrecords/demo, created if missing)")
    p.add_argument("--epochs", type=positive_int, help="per trial (default: the family's preset; on the demo "
                   "its search's demo_epochs: cnn 10, the others 2)")
    p.add_argument("--momentum", type=number_list(0, 1, "momenta"),
                   help="SGD momenta, for a family whose search uses SGD (default: the CNN's grid, "
                   "0.99,0.97,0.95,0.9,0)")
    p.add_argument("--lr", type=number_list(1e-12, math.inf, "learning rates"),
                   help="learning rates (default: the family's grid; CNN 0.001,0.002,0.005,0.01,0.02, the "
                   "others 1e-4,2e-4,5e-4,1e-3,2e-3)")
    p.add_argument("--batch-size", type=positive_int, help="clips per step (default: the family's preset)")
    p.add_argument("--width", type=positive_float, help="multiply channel counts (tests, quick checks; default: "
                   "the family's preset, 1 outside the demo)")
    p.add_argument("--precision", choices=tuple(configs.PRECISIONS), help="as tagger.train's (default: float32)")
    p.add_argument("--seed", type=int, default=0, help="seeds every trial's training")
    p.add_argument("--out", help="search folder (default: runs/search-<arch>-<data>-...)")
    p.add_argument("--runs-dir", default="runs", help="where the default --out goes")
    args = p.parse_args(argv)
    family, given = configs.check_family_flags(p, args)
    if args.momentum and "momentum" not in family.search:
        p.error(f"--momentum goes with a search over SGD; the {family.name} search tunes "
                f"{family.search['optimizer']}'s --lr only")
    return args, family, given


def search_config(parsed):
    """The base training Config of every trial (the grid replaces lr and momentum) and the grid."""
    args, family, given = parsed
    search = family.search
    settings = {k: getattr(args, k) for k in ("batch_size", "width", "precision") if getattr(args, k) is not None}
    base = configs.preset_config(family, args.data)
    config = configs.preset_config(
        family, args.data, **settings, **given, seed=args.seed, runs_dir=args.runs_dir, schedule="constant",
        optimizer=search["optimizer"], epochs=args.epochs or (search["demo_epochs"] if base.demo else base.epochs))
    grid = {"lr": args.lr or search["lr"]}
    if "momentum" in search:
        grid = {"momentum": args.momentum or search["momentum"], **grid}
    return config, grid


def default_out(config):
    data = os.path.basename(config.data.rstrip("/"))
    width = f"-w{config.width:g}" if config.width != 1 else ""
    shape = config.family.run_name.format(**config.option_values())
    return (f"{config.runs_dir}/search-{config.arch}{shape}{width}-{data}-{config.optimizer}-b{config.batch_size}"
            f"-e{config.epochs}-s{config.seed}{configs.PRECISIONS[config.precision]}")


def search_settings(config, grid):
    """What search.json records of a search: the trials' training settings and the grid."""
    return {"config": configs.compared_settings(config), "grid": {k: list(v) for k, v in grid.items()}}


def check_search_folder(out, config, grid):
    """The same search resumes (also one recorded before a training setting existed: it had the
    default); a folder holding another search is refused."""
    files.makedirs(out)
    diff = files.recorded_settings_differ(f"{out}/search.json", search_settings(config, grid),
                                          {"config": configs.config_defaults()})
    if diff:
        raise UsageError(f"{out} holds a search with other settings ({', '.join(diff)} differ): pass "
                         "another --out, or the flags of that search to resume it")


def make_tuner(config, grid, manifest, out):
    """A GridSearch over `grid` whose models come from tagger.train's builders."""
    import keras
    import keras_tuner as kt

    ResumableGridSearchOracle = _resumable_grid_oracle()

    class TaggerHyperModel(kt.HyperModel):
        def build(self, hp):
            values = {"lr": hp.Choice("lr", list(grid["lr"]))}
            if "momentum" in grid:
                values["momentum"] = hp.Choice("momentum", list(grid["momentum"]))
            trial_config = dataclasses.replace(config, **values)
            keras.utils.set_random_seed(config.seed)
            return train.compile_model(train.build_model(trial_config, manifest), trial_config)

    class TaggerSearch(kt.Tuner):
        def run_trial(self, trial, *args, **kwargs):
            """Fit once; report the best val_auc of the epochs before any divergence, and every
            epoch's val_auc (for the learning-rate curves) as metrics of the trial."""
            history = super().run_trial(trial, *args, **kwargs)
            history = (history[0] if isinstance(history, list) else history).history
            losses, aucs = history.get("loss", []), history.get("val_auc", [])
            finite = [a for loss, a in zip(losses, aucs) if math.isfinite(loss) and math.isfinite(a)]
            metrics = {"val_auc": max(finite) if finite else 0.0, "epochs_run": float(len(aucs)),
                       "diverged": float(len(finite) < len(aucs) or len(aucs) < len(losses))}
            metrics.update({f"val_auc_epoch_{i + 1:03d}": float(a) for i, a in enumerate(aucs)})
            return metrics

    oracle = ResumableGridSearchOracle(objective=kt.Objective("val_auc", "max"), max_consecutive_failed_trials=1000)
    return TaggerSearch(oracle=oracle, hypermodel=TaggerHyperModel(), directory=out, project_name="tuner",
                        overwrite=False)


def _resumable_grid_oracle():
    import functools

    import keras_tuner as kt
    from keras_tuner.src.tuners.gridsearch import LinkedList

    class ResumableGridSearchOracle(kt.oracles.GridSearchOracle):
        """GridSearchOracle that can resume: KerasTuner 1.4.7 does not save the order of the tried
        combinations, so a reloaded grid search either stops early or fails (KeyError) on the trial
        that was cut off. Rebuild that order from the trials on disk."""

        def reload(self):
            super().reload()
            order = functools.cmp_to_key(lambda a, b: self._compare(self.trials[a].hyperparameters.values,
                                                                    self.trials[b].hyperparameters.values))
            ids = sorted(self.trials, key=order)
            self._ordered_ids = LinkedList()
            for trial_id in ids:
                self._ordered_ids.insert(trial_id)
            self._populate_next = list(ids)

    return ResumableGridSearchOracle


def collect(trials, grid):
    """{(momentum or None, lr): {"val_auc", "diverged", "curve": [per-epoch val_auc], "trial"}}."""
    cells = {}
    for trial in trials:
        if trial.status != "COMPLETED":
            continue
        hp = trial.hyperparameters.values
        m = trial.metrics
        epochs = sorted(k for k in m.metrics if k.startswith("val_auc_epoch_"))
        cells[(hp.get("momentum"), hp["lr"])] = {
            "val_auc": m.get_best_value("val_auc"), "diverged": bool(m.get_best_value("diverged")),
            "curve": [m.get_best_value(k) for k in epochs], "trial": trial.trial_id}
    return cells


def write_table(out, cells, grid, config):
    """Table I: rows momentum (or the optimizer), columns learning rate, cells the best validation
    ROC-AUC of the trial; the best cell in bold. CSV and Markdown; returns the Markdown."""
    rows = grid.get("momentum", (None,))
    done = {k: v for k, v in cells.items() if not v["diverged"] or v["val_auc"] > 0}
    best = max(done, key=lambda k: done[k]["val_auc"]) if done else None

    def cell(key, bold):
        c = cells.get(key)
        if c is None:
            return "not run"
        text = f"{c['val_auc']:.4f}" + (" (diverged)" if c["diverged"] else "")
        return f"**{text}**" if bold and key == best else text

    sgd = "momentum" in grid
    head = "momentum \\ lr" if sgd else "optimizer \\ lr"
    label = (lambda m: f"{m:g}") if sgd else (lambda m: config.optimizer)
    lines = [f"| {head} | " + " | ".join(f"{lr:g}" for lr in grid["lr"]) + " |",
             "|---" * (len(grid["lr"]) + 1) + "|"]
    rows_csv = [["momentum" if sgd else "optimizer"] + [f"{lr:g}" for lr in grid["lr"]]]
    for m in rows:
        rows_csv.append([label(m)] + [cell((m, lr), False) for lr in grid["lr"]])
        lines.append(f"| {label(m)} | " + " | ".join(cell((m, lr), True) for lr in grid["lr"]) + " |")
    files.write_text(f"{out}/table.csv", files.csv_text(rows_csv))
    text = "\n".join(lines) + "\n"
    files.write_text(f"{out}/table.md", f"Best validation ROC-AUC per trial ({config.arch}); bold: the best trial.\n\n{text}")
    return text, best


def write_curves(out, cells, grid, config):
    """The study's Fig. 7: validation ROC-AUC per epoch for each learning rate, CSV and PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = {lr: cells[(None, lr)]["curve"] for lr in grid["lr"] if (None, lr) in cells}
    epochs = max((len(c) for c in curves.values()), default=0)
    files.write_text(f"{out}/val_auc_per_epoch.csv", files.csv_text(
        [["epoch"] + [f"lr={lr:g}" for lr in curves]]
        + [[e + 1] + [f"{c[e]:.4f}" if e < len(c) else "" for c in curves.values()] for e in range(epochs)]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for lr, c in curves.items():
        ax.plot(range(1, len(c) + 1), c, "o-", ms=3, label=f"lr {lr:g}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation ROC-AUC")
    ax.set_title(f"{config.arch}, {config.optimizer}: validation ROC-AUC per epoch")
    ax.legend()
    fig.tight_layout()
    files.write_bytes(f"{out}/val_auc_per_epoch.png", files.figure_png(fig))


def run(parsed):
    config, grid = search_config(parsed)
    args = parsed[0]
    train.check_data_folder(config)
    out = (args.out or default_out(config)).rstrip("/")
    tuner_id = os.environ.get("KERASTUNER_TUNER_ID")
    if "KERASTUNER_ORACLE_IP" in os.environ and (not tuner_id or "KERASTUNER_ORACLE_PORT" not in os.environ):
        raise UsageError("KERASTUNER_ORACLE_IP is set: set KERASTUNER_ORACLE_PORT and KERASTUNER_TUNER_ID "
                         "(chief on one process, tuner0, tuner1, ... on the others) too")
    distributed = "KERASTUNER_ORACLE_IP" in os.environ
    chief = not distributed or "chief" in tuner_id
    print(f"Search ({'chief' if chief and distributed else tuner_id or 'one process'}): {config.arch}, "
          + ", ".join(f"{k} {', '.join(f'{v:g}' for v in vs)}" for k, vs in grid.items())
          + f"; {config.epochs} epochs per trial, batch {config.batch_size}, data {config.data}; in {out}",
          file=sys.stderr)
    if config.demo:
        train.ensure_demo_data(config)
    quiet_tensorflow()
    import keras

    from tagger import data
    manifest = data.load_manifest(config.data)
    model = train.build_model(config, manifest)    # a length/stride that does not fit the clips: one line now
    check_search_folder(out, config, grid)
    tuner = make_tuner(config, grid, manifest, out)
    layout = config.family.layout
    train_ds = data.training_dataset(config.data, layout, config.batch_size, manifest, model.input_shape, config.seed,
                                     shuffle_buffer=config.shuffle_buffer)
    valid_ds = data.dataset(config.data, "valid", layout, config.batch_size, manifest, input_shape=model.input_shape)
    tuner.search(train_ds, validation_data=valid_ds, epochs=config.epochs,
                 steps_per_epoch=data.steps_per_epoch(manifest, "train", config.batch_size),
                 verbose=1 if sys.stdout.isatty() else 2, shuffle=False,        # tagger.data shuffles
                 callbacks=[keras.callbacks.TensorBoard(f"{out}/tensorboard", update_freq="epoch", profile_batch=0),
                            keras.callbacks.TerminateOnNaN()])
    if not chief:
        print(f"Worker {tuner_id}: no trials left; the chief writes the tables")
        return EXIT_OK
    cells = collect(tuner.oracle.trials.values(), grid)
    table, best = write_table(out, cells, grid, config)
    print("\nBest validation ROC-AUC per trial:\n\n" + table)
    if best:
        what = (f"momentum {best[0]:g}, " if best[0] is not None else "") + f"lr {best[1]:g}"
        print(f"Best: {what} (validation ROC-AUC {cells[best]['val_auc']:.4f}, trial {cells[best]['trial']})")
    written = [f"{out}/table.md", f"{out}/table.csv"]
    if "momentum" not in grid:
        write_curves(out, cells, grid, config)
        written += [f"{out}/val_auc_per_epoch.csv", f"{out}/val_auc_per_epoch.png"]
    print("Wrote " + ", ".join(written))
    print(f"  trials and their curves with hyperparameters: tensorboard --logdir {out}/tensorboard (HParams tab)")
    return EXIT_OK


def main(argv=None):
    return main_guard(PROG, run, parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
