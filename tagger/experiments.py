"""The study's experiments, and every family side by side, one command each.

    python -m tagger.experiments table2 [--data DIR] [--runs 5] [--epochs N] [training flags]
    python -m tagger.experiments repeat --arch crnn [--runs 5] [--data DIR] [training flags]
    python -m tagger.experiments zoo [--archs cnn,crnn,...] [--runs 3] [--data DIR] [training flags]
    python -m tagger.experiments compare NAME_OR_PATH NAME_OR_PATH [--bootstrap 1000]

table2: the CNN at the five length/stride pairs, N seeds each; test ROC-AUC and PR-AUC mean ± std
per pair (the study's Table II). repeat: one configuration over N seeds (the headline figure). zoo:
every registered family (or those of --archs) with its own presets, N seeds each: parameters, FLOPs
per clip, test ROC-AUC and PR-AUC mean ± std, training time and speed in one table. compare: per-tag
test ROC-AUC of two exports side by side with each tag's train count (Fig. 5), and a paired bootstrap
of their saved test predictions (eval-test/predictions.npz): the difference of macro ROC-AUC and
PR-AUC, its 95 % interval and the share of resamples in which the first is ahead. The runs are
ordinary tagger.train runs (runs/<name>/, saved_models/<name>/), named from their settings and seed;
a run whose export already exists with the same settings is reused. Any flag of tagger.train (--lr,
--optimizer, --batch-size, --width, ...) passes through to every run.
"""
import dataclasses
import json
import math
import os
import sys
import warnings

from tagger import files, models
from tagger.config import arch_list
from tagger.cli import (EXIT_FAILED, EXIT_OK, ArgumentParser, UsageError, add_models_dir_flag, main_guard,
                        positive_int, quiet_tensorflow)
from tagger.models import cnn

PROG = "python -m tagger.experiments"
PAIRS = cnn.STUDY_PAIRS


def parse_args(argv):
    """(args, configs): the experiment's own flags and the training Config of every run, all checked
    before anything is imported or trained."""
    from tagger import train
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{table2,repeat,zoo,compare}")
    for name, text, runs in (("table2", "the CNN at the five length/stride pairs (Table II)", 5),
                             ("repeat", "one configuration over several seeds", 5),
                             ("zoo", "every family with its presets, side by side", 3)):
        s = sub.add_parser(name, help=text, description=text, prog=f"{PROG} {name}")
        s.error = p.error
        s.add_argument("--runs", type=positive_int, default=runs, help=f"seeds per configuration (default {runs})")
        s.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
        s.add_argument("--out", help="folder for the tables (default: under runs/experiments/)")
        train.add_output_flags(s)
        if name == "zoo":
            s.add_argument("--archs", type=arch_list, default=models.names(),
                           help=f"comma-separated families (default: all, {','.join(models.names())})")
    c = sub.add_parser("compare", help="per-tag ROC-AUC of two exports (Fig. 5)", prog=f"{PROG} compare")
    c.error = p.error
    c.add_argument("models", nargs=2, metavar="MODEL", help="two exports: folders, or names in the models folder")
    c.add_argument("--out", help="folder for the chart and table (default: runs/compare/A-vs-B)")
    c.add_argument("--bootstrap", type=positive_int, default=1000, metavar="N",
                   help="paired resamples (of artists where the test data names them, else of clips)")
    c.add_argument("--seed", type=int, default=0, help="seeds the bootstrap")
    add_models_dir_flag(c)
    args, rest = p.parse_known_args(argv)
    if args.command == "compare":
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        return args, []
    itself = {"table2": ("--arch", "--length", "--stride"), "zoo": ("--arch",)}.get(args.command, ())
    for flag in ("--seed", "--run-name") + itself:
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            p.error(f"{flag} is set by '{args.command}' itself")
    prog = f"{PROG} {args.command}"
    rest = [*rest, "--runs-dir", args.runs_dir, "--models-dir", args.models_dir]
    if args.command == "table2":
        rest = ["--arch", cnn.FAMILY.name, *rest]
        grid = [["--length", str(length), "--stride", str(stride)] for length, stride in PAIRS]
    elif args.command == "zoo":
        grid = [["--arch", name] for name in args.archs]
    else:
        grid = [[]]
    configs = [train.config_from_args([*rest, *shape, "--seed", str(args.seed + i)], prog=prog)
               for shape in grid for i in range(args.runs)]
    return args, configs


def finished_metrics(config):
    """The metrics.json of an export made with exactly this config, or None."""
    from tagger import train
    done = train.finished_export(config)
    return done[1] if done else None


def train_all(configs):
    """Train (or reuse) every config in this process. Returns [(config, metrics or None)]."""
    from tagger import train
    results = []
    for i, config in enumerate(configs, 1):
        metrics = finished_metrics(config)
        if metrics is not None:
            print(f"[{i}/{len(configs)}] {config.run_name}: reused (its export exists with the same settings)",
                  file=sys.stderr)
        else:
            print(f"[{i}/{len(configs)}] {config.run_name}: training", file=sys.stderr)
            status = train.run(config)
            import keras
            keras.backend.clear_session()
            metrics = finished_metrics(config) if status == EXIT_OK else None
            if metrics is None:
                print(f"[{i}/{len(configs)}] {config.run_name}: failed (status {status}); left out of the "
                      "statistics", file=sys.stderr)
        results.append((config, metrics))
    return results


def mean_std(values):
    """Mean and sample standard deviation (n - 1; 0 for a single value), as the study reports ±."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def summarize(groups):
    """groups: [(label dict, [(config, metrics)])] -> table rows with mean ± std."""
    rows = []
    for label, runs in groups:
        done = [m for _, m in runs if m is not None]
        roc = mean_std([m["test"]["roc_auc"] for m in done])
        pr = mean_std([m["test"]["pr_auc"] for m in done])
        rows.append({**label, "runs": len(done), "failed": len(runs) - len(done),
                     "roc_auc_mean": roc[0], "roc_auc_std": roc[1], "pr_auc_mean": pr[0], "pr_auc_std": pr[1],
                     "run_names": " ".join(c.run_name for c, _ in runs)})
    return rows


def write_tables(out, name, rows, label_keys, title):
    """name.csv and name.md under out; returns the Markdown table."""
    files.makedirs(out)
    keys = list(rows[0])
    files.write_text(f"{out}/{name}.csv", files.csv_text(
        [keys] + [[f"{row[k]:.4f}" if isinstance(row[k], float) else row[k] for k in keys] for row in rows]))
    lines = ["| " + " | ".join(label_keys) + " | runs | test ROC-AUC | test PR-AUC |",
             "|---" * (len(label_keys) + 3) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(row[k]) for k in label_keys) + f" | {row['runs']}"
                     + (f" ({row['failed']} failed)" if row["failed"] else "")
                     + f" | {row['roc_auc_mean']:.4f} ± {row['roc_auc_std']:.4f}"
                     + f" | {row['pr_auc_mean']:.4f} ± {row['pr_auc_std']:.4f} |")
    text = "\n".join(lines) + "\n"
    files.write_text(f"{out}/{name}.md", f"{title}\n\n{text}")
    return text


def series_name(config, runs, first_seed, varied=False):
    """A run name without its seed (and its family settings where the series `varied` them), for the
    folder of a series of runs."""
    name = config.run_name.rsplit(f"-s{config.seed}", 1)[0]
    if varied:
        name = name.replace(config.family.run_name.format(**config.option_values()), "")
    return f"{name}-seeds{first_seed}-{first_seed + runs - 1}"


def run_series(args, configs):
    from tagger import train
    first = configs[0]
    train.choose_cpu_kernels(first)
    if first.demo:
        train.ensure_demo_data(first)
    quiet_tensorflow()
    from tagger import data
    manifest = data.load_manifest(first.data)
    for config in {dataclasses.replace(c, seed=0, run_name=""): c for c in configs}.values():
        train.build_model(config, manifest)   # a length/stride that does not fit: one line, before training
    results = train_all(configs)
    if args.command == "zoo":
        return write_zoo(args, results)
    if args.command == "table2":
        groups = [({"length": length, "stride": stride},
                   [(c, m) for c, m in results if c.option_values() == {"length": length, "stride": stride}])
                  for length, stride in PAIRS]
        keys, title = ["length", "stride"], "CNN test ROC-AUC and PR-AUC, mean ± sample std over seeds (Table II)"
    else:
        shape = ", ".join(f"{k} {v}" for k, v in first.options) or "-"
        groups = [({"arch": first.arch, "settings": shape}, results)]
        keys, title = ["arch", "settings"], f"{first.arch} test ROC-AUC and PR-AUC, mean ± sample std over seeds"
    series = series_name(first, args.runs, args.seed, varied=args.command == "table2")
    out = args.out or f"{first.runs_dir}/experiments/{args.command}-{series}"
    rows = summarize(groups)
    table = write_tables(out, args.command, rows, keys, title)
    if args.command == "repeat":
        files.write_text(f"{out}/runs.csv", files.csv_text(
            [["run", "seed", "test_roc_auc", "test_pr_auc"]]
            + [[c.run_name, c.seed, *((f"{m['test']['roc_auc']:.4f}", f"{m['test']['pr_auc']:.4f}") if m else ("", ""))]
               for c, m in results]))
    print(f"\n{title}:\n\n{table}")
    print(f"Wrote {out}/{args.command}.md and {args.command}.csv" + (" and runs.csv" if args.command == "repeat" else "")
          + f"; the runs are under {first.runs_dir}/ and {first.models_dir}/")
    return EXIT_FAILED if any(m is None for _, m in results) else EXIT_OK


def write_zoo(args, results):
    """zoo.md and zoo.csv: one row per family. Returns the exit status."""
    first = results[0][0]
    rows = []
    for name in args.archs:
        runs = [(c, m) for c, m in results if c.arch == name]
        done = [m for _, m in runs if m is not None]
        (row,) = summarize([({"family": name}, runs)])

        def mean(key):
            values = [m[key] for m in done if m.get(key) is not None]
            return sum(values) / len(values) if values else math.nan

        flops = done[0].get("forward_flops_per_clip") if done else None
        rows.append({**row, "trainable_params": done[0].get("trainable_params") if done else None,
                     "forward_flops_per_clip": flops, "train_seconds": round(mean("train_seconds"), 1),
                     "train_clips_per_s": round(mean("train_clips_per_s"), 2), "epochs": runs[0][0].epochs})
    data = os.path.basename(first.data.rstrip("/"))
    out = (args.out or f"{first.runs_dir}/experiments/zoo-{data}-seeds{args.seed}-{args.seed + args.runs - 1}").rstrip("/")
    files.makedirs(out)
    keys = ["family", "trainable_params", "forward_flops_per_clip", "runs", "failed", "roc_auc_mean", "roc_auc_std",
            "pr_auc_mean", "pr_auc_std", "epochs", "train_seconds", "train_clips_per_s", "run_names"]
    files.write_text(f"{out}/zoo.csv", files.csv_text(
        [keys] + [[f"{row[k]:.4f}" if k.startswith(("roc", "pr")) else row[k] for k in keys] for row in rows]))
    lines = ["| family | parameters | GFLOP / clip | runs | test ROC-AUC | test PR-AUC | epochs | training | "
             "clips/s |", "|---|---:|---:|---:|---|---|---:|---:|---:|"]
    for row in rows:
        params = "n/a" if row["trainable_params"] is None else f"{row['trainable_params']:,}"
        gflops = "n/a" if row["forward_flops_per_clip"] is None else f"{row['forward_flops_per_clip'] / 1e9:.3g}"
        minutes, seconds = divmod(round(row["train_seconds"]), 60) if row["runs"] else (0, 0)
        lines.append(f"| {row['family']} | {params} | {gflops} | {row['runs']}"
                     + (f" ({row['failed']} failed)" if row["failed"] else "")
                     + f" | {row['roc_auc_mean']:.4f} ± {row['roc_auc_std']:.4f}"
                     + f" | {row['pr_auc_mean']:.4f} ± {row['pr_auc_std']:.4f} | {row['epochs']}"
                     + f" | {minutes} m {seconds:02d} s | {row['train_clips_per_s']:.1f} |")
    table = "\n".join(lines) + "\n"
    title = (f"Every family with its own settings on {first.data}: test ROC-AUC and PR-AUC, mean ± sample std over "
             "seeds; parameters (trainable), forward FLOPs per test clip, training time and training clips per "
             "second (means over the runs).")
    files.write_text(f"{out}/zoo.md", f"{title}\n\n{table}")
    print(f"\n{title}\n\n{table}")
    print(f"Wrote {out}/zoo.md and zoo.csv; the runs are under {first.runs_dir}/ and {first.models_dir}/")
    return EXIT_FAILED if any(m is None for _, m in results) else EXIT_OK


def load_export_metrics(folder):
    """(test per-tag metrics, train counts) of an export."""
    if not files.exists(f"{folder}/metrics.json"):
        raise UsageError(f"{folder} has no test metrics (metrics.json: a converted model?): compare exports "
                         "trained by tagger.train")
    metrics = json.loads(files.read_text(f"{folder}/metrics.json"))
    config = json.loads(files.read_text(f"{folder}/config.json"))
    counts = metrics.get("train_tag_counts")
    if counts is None:
        manifest = f"{config.get('data', '')}/manifest.json"
        if not files.exists(manifest):
            raise UsageError(f"{folder} does not record its train tag counts and its data "
                             f"{config.get('data')} is gone: retrain it, or restore the data")
        counts = json.loads(files.read_text(manifest))["tag_counts"]["train"]
    return metrics["test"]["per_tag"], counts


def compare(args):
    a, b = (files.find_export(m, args.models_dir) for m in args.models)
    (tags_a, counts), (tags_b, _) = load_export_metrics(a), load_export_metrics(b)
    if list(tags_a) != list(tags_b):
        raise UsageError(f"{a} and {b} have different tags: compare models trained on the same tag set")
    name_a, name_b = os.path.basename(a), os.path.basename(b)
    out = (args.out or f"runs/compare/{name_a}-vs-{name_b}").rstrip("/")
    files.makedirs(out)
    tags = sorted(tags_a, key=lambda t: -counts.get(t, 0))
    rows = [["tag", "train_count", f"roc_auc_{name_a}", f"roc_auc_{name_b}", "difference"]]
    for t in tags:
        ra, rb = tags_a[t]["roc_auc"], tags_b[t]["roc_auc"]
        rows.append([t, counts.get(t, 0), "" if ra is None else f"{ra:.4f}", "" if rb is None else f"{rb:.4f}",
                     "" if None in (ra, rb) else f"{rb - ra:+.4f}"])
    files.write_text(f"{out}/per_tag.csv", files.csv_text(rows))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = range(len(tags))
    fig, ax = plt.subplots(figsize=(max(7, 0.32 * len(tags) + 2), 4.5))
    ax.bar([i - 0.2 for i in x], [tags_a[t]["roc_auc"] or 0 for t in tags], 0.4, color="tab:red", label=name_a)
    ax.bar([i + 0.2 for i in x], [tags_b[t]["roc_auc"] or 0 for t in tags], 0.4, color="tab:green", label=name_b)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("test ROC-AUC")
    ax.set_xticks(list(x), tags, rotation=90, fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(list(x), [counts.get(t, 0) for t in tags], "o-", color="tab:blue", ms=3, label="train count")
    ax2.set_ylabel("clips in train split")
    ax.legend(loc="lower left", fontsize=7)
    ax.set_title("Per-tag test ROC-AUC (bars) and train count (line)", fontsize=9)
    fig.tight_layout()
    files.write_bytes(f"{out}/per_tag.png", files.figure_png(fig))
    wins = sum(1 for t in tags if None not in (tags_a[t]["roc_auc"], tags_b[t]["roc_auc"])
               and tags_b[t]["roc_auc"] > tags_a[t]["roc_auc"])
    print(f"{name_b} beats {name_a} on {wins} of {len(tags)} tags")
    written = paired_bootstrap(a, b, name_a, name_b, out, args.bootstrap, args.seed)
    print(f"Wrote {out}/per_tag.csv, {out}/per_tag.png" + (f" and {written}" if written else ""))
    return EXIT_OK


def paired_bootstrap(a, b, name_a, name_b, out, resamples, seed):
    """The paired bootstrap of two exports' saved test predictions: both scored on the same resamples.
    Prints and writes paired.json; returns its path (None where a model has no saved predictions)."""
    import numpy as np

    from tagger import decisions, evaluate
    pa, pb = (evaluate.load_predictions(f"{m}/eval-test/{evaluate.PREDICTIONS}") for m in (a, b))
    for folder, pred in ((a, pa), (b, pb)):
        if pred is None:
            print(f"No paired bootstrap: {folder} has no saved test predictions (eval-test/{evaluate.PREDICTIONS}): "
                  f"python -m tagger.evaluate --model {folder} writes them")
            return None
    for folder, pred in ((a, pa), (b, pb)):
        if str(pred["split"]) != "test":
            raise UsageError(f"{folder}/eval-test/{evaluate.PREDICTIONS} holds predictions of the {pred['split']} split: "
                             f"python -m tagger.evaluate --model {folder} writes the test split's")
    if len(pa["clip_id"]) != len(pb["clip_id"]) or set(pa["clip_id"].tolist()) != set(pb["clip_id"].tolist()):
        raise UsageError(f"{a} and {b} were evaluated on different test clips ({pa['data']}, {pb['data']}): "
                         "evaluate both on the same --data with python -m tagger.evaluate")
    if pa["tags"] != pb["tags"]:
        raise UsageError(f"{a} and {b} were evaluated on different tags: evaluate both with the same --tag-map")
    where = {c: i for i, c in enumerate(pb["clip_id"].tolist())}
    order = np.array([where[c] for c in pa["clip_id"].tolist()])
    y, groups = pa["labels"], pa["group"]
    if not np.array_equal(pb["labels"][order], y):
        raise UsageError(f"{a} and {b} were evaluated on test clips with different labels: evaluate both on the "
                         "same --data")
    boot = decisions.bootstrap(y, pa["probabilities"], groups, resamples, seed, extra=[pb["probabilities"][order]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # tags with one class: said by tagger.evaluate already
        point_a, point_b = (evaluate.tag_metrics(y, p, pa["tags"]) for p in (pa["probabilities"], pb["probabilities"][order]))
    unit = str(pa["unit"])
    result = {"a": a, "b": b, "data": str(pa["data"]), "split": "test", "resamples": resamples, "seed": seed,
              "unit": unit, "groups": int(len(set(groups.tolist()))), "clips": int(len(y))}
    print(f"Paired bootstrap over {resamples} resamples of {result['groups']} {unit}s ({len(y)} test clips); "
          f"A = {name_a}, B = {name_b}:")
    for key, name in (("roc_auc", "ROC-AUC"), ("pr_auc", "PR-AUC")):
        va, vb = point_a[key], point_b[key]
        diff = boot[f"macro_{key}"] - boot["extra"][0][f"macro_{key}"]
        diff = diff[np.isfinite(diff)]
        low, high = decisions.interval(diff)
        share, tied = float(np.mean(diff > 0)), float(np.mean(diff == 0))
        result[key] = {"a": va, "b": vb, "difference": va - vb, "interval": [low, high],
                       "share_of_resamples_a_ahead": share, "share_of_resamples_tied": tied}
        print(f"  macro {name}: A {va:.4f}, B {vb:.4f}; A - B {va - vb:+.4f} [95 % interval {low:+.4f}, {high:+.4f}]; "
              f"the share of resamples in which A is ahead: {share:.3f}" + (f" (tied: {tied:.3f})" if tied else ""))
    files.write_text(f"{out}/paired.json", json.dumps(result, indent=1))
    return f"{out}/paired.json"


def run(parsed):
    args, configs = parsed
    if args.command == "compare":
        return compare(args)
    from tagger import train
    for config in {c.data: c for c in configs}.values():
        train.check_data_folder(config)
    return run_series(args, configs)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return main_guard(PROG, run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
