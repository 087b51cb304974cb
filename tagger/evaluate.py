"""Evaluation as the literature reports it: sklearn macro ROC-AUC and PR-AUC over tags, on the test split.

    python -m tagger.evaluate --model NAME_OR_PATH [--data tfrecords/NAME] [--split test] [--models-dir DIR]

Writes per-tag ROC-AUC / PR-AUC with each tag's train count (CSV), a per-tag bar chart (PNG, and a
TensorBoard image when a log folder is given) and metrics.json. A tag with one class only in the
split has no AUC: it is reported as null and left out of the macro averages, with a warning.
"""
import json
import sys
import warnings

import numpy as np

from tagger import files
from tagger.cli import (EXIT_OK, ArgumentParser, UsageError, add_models_dir_flag, main_guard, plural,
                        positive_int, quiet_tensorflow)

PROG = "python -m tagger.evaluate"


def tag_metrics(y_true, y_prob, tags):
    """Macro ROC-AUC and PR-AUC (average precision) over the tags that have both classes.

    Returns {"roc_auc", "pr_auc", "per_tag": {tag: {"roc_auc", "pr_auc", "positives"}},
    "undefined": [tags]}.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob)
    per_tag, undefined = {}, []
    for i, tag in enumerate(tags):
        positives = int(y_true[:, i].sum())
        if 0 < positives < len(y_true):
            roc = float(roc_auc_score(y_true[:, i], y_prob[:, i]))
            pr = float(average_precision_score(y_true[:, i], y_prob[:, i]))
        else:
            roc = pr = None
            undefined.append(tag)
        per_tag[tag] = {"roc_auc": roc, "pr_auc": pr, "positives": positives}
    if undefined:
        warnings.warn(f"{plural(len(undefined), 'tag')} with only one class in this split and no AUC; left out "
                      f"of the macro averages: {', '.join(undefined)}", stacklevel=2)
    defined = [m for m in per_tag.values() if m["roc_auc"] is not None]
    mean = (lambda key: float(np.mean([m[key] for m in defined]))) if defined else (lambda key: None)
    return {"roc_auc": mean("roc_auc"), "pr_auc": mean("pr_auc"), "per_tag": per_tag,
            "undefined": undefined}


def write_per_tag_csv(path, metrics, train_counts):
    rows = [["tag", "roc_auc", "pr_auc", "test_positives", "train_count"]]
    for tag, m in metrics["per_tag"].items():
        rows.append([tag, "" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}",
                     "" if m["pr_auc"] is None else f"{m['pr_auc']:.4f}", m["positives"], train_counts.get(tag, 0)])
    files.write_text(path, files.csv_text(rows))


def per_tag_figure(metrics, train_counts, title):
    """Per-tag ROC-AUC bars with each tag's train count on a second axis (the study's Fig. 5). PNG bytes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tags = list(metrics["per_tag"])
    auc = [metrics["per_tag"][t]["roc_auc"] or 0.0 for t in tags]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(tags) + 2), 4.2))
    ax.bar(range(len(tags)), auc, color="tab:red", label="ROC-AUC")
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("test ROC-AUC")
    ax.set_xticks(range(len(tags)), tags, rotation=90, fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(range(len(tags)), [train_counts.get(t, 0) for t in tags], "o-", color="tab:blue", ms=3,
             label="train count")
    ax2.set_ylabel("clips in train split")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return files.figure_png(fig)


def write_report(out_dir, metrics, train_counts, title, tensorboard_dir=None, step=0):
    """per_tag.csv and per_tag.png under out_dir; the figure as a TensorBoard image too."""
    files.makedirs(out_dir)
    write_per_tag_csv(f"{out_dir}/per_tag.csv", metrics, train_counts)
    png = per_tag_figure(metrics, train_counts, title)
    files.write_bytes(f"{out_dir}/per_tag.png", png)
    if tensorboard_dir:
        import tensorflow as tf
        with tf.summary.create_file_writer(tensorboard_dir).as_default():
            tf.summary.image("test/per_tag_roc_auc", tf.image.decode_png(png)[None], step=step)
            tf.summary.scalar("test/roc_auc", metrics["roc_auc"] or 0.0, step=step)
            tf.summary.scalar("test/pr_auc", metrics["pr_auc"] or 0.0, step=step)


def predict_dataset(predict_batch, ds):
    """Run `predict_batch(waves) -> probabilities` over a dataset of (waves, labels). Returns (y, p)."""
    ys, ps = [], []
    for waves, labels in ds:
        ps.append(np.asarray(predict_batch(waves)))
        ys.append(labels.numpy())
    return np.concatenate(ys), np.concatenate(ps)


def check_compatible(model_info, manifest, model_dir, data_dir):
    """Refuse a model and data that disagree on tags, sample rate or clip length."""
    for key, what in (("tags", "tags"), ("sample_rate", "sample rate"), ("clip_samples", "clip length")):
        if model_info.get(key) != manifest.get(key):
            raise UsageError(f"the model {model_dir} and the data {data_dir} disagree on {what}: evaluate "
                             "a model on TFRecords prepared the way its training data was")


def parse_args(argv):
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                   help="an export folder, or the name of one in the models folder")
    add_models_dir_flag(p)
    p.add_argument("--data", help="TFRecords folder (default: the one the model was trained on)")
    p.add_argument("--split", choices=("train", "valid", "test"), default="test", help="the split to evaluate on")
    p.add_argument("--batch-size", type=positive_int, default=16, help="clips per model call")
    p.add_argument("--out", help="report folder (default: <model>/eval-<split>)")
    return p.parse_args(argv)


def run(args):
    model_dir = files.find_export(args.model, args.models_dir)
    config = json.loads(files.read_text(f"{model_dir}/config.json"))
    data_dir = args.data or config.get("data")
    if not data_dir:
        raise UsageError(f"{model_dir} records no training data (a converted model): pass --data, TFRecords "
                         "prepared with its tags")
    quiet_tensorflow()
    import tensorflow as tf
    from tagger import data
    from tagger.models import WholeClip
    manifest = data.load_manifest(data_dir)
    check_compatible(config, manifest, model_dir, data_dir)
    if not manifest["splits"][args.split]["clips"]:
        raise UsageError(f"the {args.split} split of {data_dir} is empty: choose another --split")
    serving = tf.saved_model.load(model_dir).signatures["serving_default"]
    # Whole clips: the export's serving_default arranges them as its family does.
    ds = data.dataset(data_dir, args.split, WholeClip(), args.batch_size, manifest=manifest)
    y, p = predict_dataset(lambda w: serving(waveform=w)["probabilities"], ds)
    metrics = tag_metrics(y, p, manifest["tags"])
    out = (args.out or f"{model_dir}/eval-{args.split}").rstrip("/")
    write_report(out, metrics, manifest["tag_counts"]["train"], f"{model_dir} on {data_dir} ({args.split})")
    files.write_text(f"{out}/metrics.json", json.dumps({args.split: metrics, "data": data_dir, "model": model_dir},
                                                        indent=1))
    print(f"{args.split}: ROC-AUC {metrics['roc_auc']:.4f}  PR-AUC {metrics['pr_auc']:.4f}  ({plural(len(y), 'clip')})")
    print(f"Wrote {out}/metrics.json, per_tag.csv and per_tag.png")
    return EXIT_OK


def main(argv=None):
    return main_guard(PROG, run, parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
