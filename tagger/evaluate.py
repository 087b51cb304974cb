"""Evaluation as the literature reports it, and how far it can be trusted: sklearn macro ROC-AUC and
PR-AUC over tags on the test split, F1 at per-tag thresholds, 95 % bootstrap intervals.

    python -m tagger.evaluate --model NAME_OR_PATH [--data tfrecords/NAME] [--split test] [--models-dir DIR]
                              [--bootstrap 1000] [--threshold-rule RULE] [--tag-map FILE]

Writes metrics.json, per-tag ROC-AUC / PR-AUC / precision / recall / F1 with each tag's train count
and intervals (per_tag.csv), a per-tag chart (per_tag.png, and a TensorBoard image when a log folder
is given) and the predictions with clip ids and artists (predictions.npz, what `tagger.experiments
compare` pairs). A tag with one class only in the split has no AUC: it is reported as null and left
out of the macro averages, with a warning. F1 is reported at the export's stored thresholds (chosen
on the validation split after training; never rewritten here), or at thresholds chosen for this
report with --threshold-rule; never on the split the thresholds were chosen on.
"""
import io
import json
import os
import sys
import warnings

import numpy as np

from tagger import decisions, files
from tagger.cli import (EXIT_OK, ArgumentParser, UsageError, add_models_dir_flag, main_guard, plural,
                        positive_int, quiet_tensorflow)

PROG = "python -m tagger.evaluate"
PREDICTIONS = "predictions.npz"
THRESHOLDS = "thresholds.json"


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


def _number(value):
    return None if value is None or not np.isfinite(value) else float(value)


def decision_metrics(metrics, y, p, tags, thresholds):
    """Add per-tag threshold, precision, recall and F1, and macro and micro F1, to `metrics`."""
    vector = decisions.threshold_vector(thresholds, tags)
    point = decisions.figures(np.ones((1, len(y))), y, p, vector)
    for i, tag in enumerate(tags):
        metrics["per_tag"][tag].update({"threshold": _number(vector[i]), **{
            key: _number(point[key][0, i]) for key in ("precision", "recall", "f1")}})
    metrics["macro_f1"] = _number(decisions.macro(point["f1"])[0])
    metrics["micro_f1"] = _number(point["micro_f1"][0])
    metrics["thresholds"] = {"rule": thresholds["rule"], "chosen_on": thresholds["split"],
                             "data": thresholds.get("data"), "source": thresholds.get("source", "export"),
                             "without": sorted(decisions.without_threshold(thresholds))}
    return vector


def add_intervals(metrics, y, p, tags, groups, unit, resamples, seed, vector=None):
    """95 % bootstrap percentile intervals of every figure in `metrics` (resampling `groups`)."""
    boot = decisions.bootstrap(y, p, groups, resamples, seed, vector)
    for key, samples in (("roc_auc", "macro_roc_auc"), ("pr_auc", "macro_pr_auc"), ("macro_f1", "macro_f1"),
                         ("micro_f1", "micro_f1")):
        if metrics.get(key) is not None:
            metrics[f"{key}_ci"] = decisions.interval(boot[samples])
    for i, tag in enumerate(tags):
        m = metrics["per_tag"][tag]
        for key in ("roc_auc", "pr_auc", "precision", "recall", "f1"):
            if m.get(key) is not None:
                m[f"{key}_ci"] = decisions.interval(boot[key][:, i])
    defined = [i for i, t in enumerate(tags) if metrics["per_tag"][t]["roc_auc"] is not None]
    lost = np.isnan(boot["roc_auc"][:, defined])
    metrics["bootstrap"] = {
        "resamples": resamples, "seed": seed, "level": 0.95, "unit": unit, "groups": int(len(set(groups))),
        "left_out": {tags[i]: int(n) for i, n in zip(defined, lost.sum(axis=0)) if n},
        "resamples_with_a_tag_left_out": int(lost.any(axis=1).sum())}
    return metrics


def with_interval(metrics, key):
    """A figure of metrics.json as text, its 95 % interval beside it where it has one."""
    value, ci = metrics.get(key), metrics.get(f"{key}_ci")
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def summary(metrics, split, clips):
    """The lines a report prints: figures with their intervals, and what the intervals and F1 rest on."""
    def figure(name, key):
        return f"{name} {with_interval(metrics, key)}"
    lines = [f"{split}: {figure('ROC-AUC', 'roc_auc')}  {figure('PR-AUC', 'pr_auc')}  ({plural(clips, 'clip')})"]
    if metrics.get("macro_f1") is not None or metrics.get("micro_f1") is not None:
        t = metrics["thresholds"]
        none = f"; {plural(len(t['without']), 'tag')} without one" if t["without"] else ""
        lines.append(f"  {figure('macro F1', 'macro_f1')}  {figure('micro F1', 'micro_f1')}  at per-tag "
                     f"thresholds chosen on {t['chosen_on']} by the {t['rule']} rule{none}")
    elif metrics.get("f1_note"):
        lines.append(f"  no F1: {metrics['f1_note']}")
    b = metrics.get("bootstrap")
    if b:
        left = b["resamples_with_a_tag_left_out"]
        lines.append(f"  [95 % bootstrap intervals, {b['resamples']} resamples of {plural(b['groups'], b['unit'])}"
                     + (f"; in {left} a tag had no positive or negative clip and was left out of the averages"
                        if left else "") + "]")
    return lines


def write_per_tag_csv(path, metrics, train_counts):
    def number(value):
        return "" if value is None else f"{value:.4f}"

    def ci(value):
        return ["", ""] if not value else [f"{value[0]:.4f}", f"{value[1]:.4f}"]
    figures = ("roc_auc", "pr_auc", "precision", "recall", "f1")
    rows = [["tag", *(f"{k}{end}" for k in figures[:2] for end in ("", "_low", "_high")), "threshold",
             *(f"{k}{end}" for k in figures[2:] for end in ("", "_low", "_high")), "positives", "train_count"]]
    for tag, m in metrics["per_tag"].items():
        values = {k: [number(m.get(k)), *ci(m.get(f"{k}_ci"))] for k in figures}
        rows.append([tag, *values["roc_auc"], *values["pr_auc"],
                     "" if m.get("threshold") is None else f"{m['threshold']:.6g}",
                     *values["precision"], *values["recall"], *values["f1"], m["positives"], train_counts.get(tag, 0)])
    files.write_text(path, files.csv_text(rows))


def per_tag_figure(metrics, train_counts, title):
    """Per-tag ROC-AUC bars with their intervals, F1 at the thresholds as dots, and each tag's train
    count on a second axis (the study's Fig. 5). PNG bytes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tags = list(metrics["per_tag"])
    per_tag = [metrics["per_tag"][t] for t in tags]
    auc = [m["roc_auc"] or 0.0 for m in per_tag]
    errors = np.maximum(0.0, np.array([[a - (m.get("roc_auc_ci") or [a, a])[0], (m.get("roc_auc_ci") or [a, a])[1] - a]
                                       for a, m in zip(auc, per_tag)]).T)
    f1 = [m.get("f1") for m in per_tag]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(tags) + 2), 4.2))
    ax.bar(range(len(tags)), auc, color="tab:red", label="ROC-AUC", yerr=errors, error_kw={"lw": 0.6})
    if any(v is not None for v in f1):
        ax.plot(range(len(tags)), [np.nan if v is None else v for v in f1], "D", color="black", ms=3,
                label="F1 at the threshold")
        ax.set_ylim(0.0, 1.0)
        ax.legend(loc="lower left", fontsize=7)
    else:
        ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("test ROC-AUC" + (" / F1" if any(v is not None for v in f1) else ""))
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


# ----------------------------------------------------------------------------------------------
# Predictions with clip ids, and the artists behind them

def predict_split(predict_batch, data_dir, split, layout, batch_size, manifest, input_shape=None):
    """Run `predict_batch(inputs) -> probabilities` over a split. Returns {"clip_id", "path", "labels",
    "probabilities"} as arrays in file order."""
    from tagger import data
    ds = data.dataset(data_dir, split, layout, batch_size, manifest, input_shape=input_shape, with_ids=True)
    parts = {"labels": [], "probabilities": [], "clip_id": [], "path": []}
    for inputs, labels, clip_ids, paths in ds:
        parts["probabilities"].append(np.asarray(predict_batch(inputs)))
        parts["labels"].append(labels.numpy())
        parts["clip_id"].append(clip_ids.numpy())
        parts["path"].append(np.char.decode(paths.numpy().astype(bytes), "utf-8"))
    return {k: np.concatenate(v) for k, v in parts.items()}


def artists(data_dir, manifest, clip_ids, paths):
    """(group per clip, unit): the clips' artists where the data names them (prepare's artists.tsv, or
    MTAT's file names), else each clip on its own."""
    from tagger import artists as artist_files, demo, mtat
    named = artist_files.read_artists(data_dir)
    if named is not None and all(int(c) in named for c in clip_ids):
        return np.array([named[int(c)] for c in clip_ids]), "artist"
    rule = {"mtat": mtat.artist, "demo": demo.artist}.get(manifest.get("source"))
    if rule:                # data prepared before artists.tsv existed
        return np.array([rule(p) for p in paths]), "artist"
    return np.array([str(c) for c in clip_ids]), "clip"


def save_predictions(path, pred, tags, groups, unit, data_dir, split):
    buffer = io.BytesIO()
    np.savez_compressed(buffer, clip_id=pred["clip_id"].astype(np.int64), path=np.asarray(pred["path"], dtype=str),
                        group=np.asarray(groups, dtype=str), unit=np.array(unit),
                        labels=pred["labels"].astype(np.uint8), probabilities=pred["probabilities"].astype(np.float32),
                        tags=np.array(tags, dtype=str), data=np.array(str(data_dir)), split=np.array(split))
    files.write_bytes(path, buffer.getvalue())


def load_predictions(path):
    """A predictions.npz as a dict of arrays ("tags" a list), None where there is none."""
    if not files.exists(path):
        return None
    with np.load(io.BytesIO(files.read_bytes(path)), allow_pickle=False) as npz:
        out = {k: npz[k] for k in npz.files}
    out["tags"] = [str(t) for t in out["tags"]]
    return out


def evaluate_split(pred, tags, groups, unit, thresholds=None, resamples=1000, seed=0, f1_note=None):
    """metrics.json's figures for one split: point figures (sklearn), F1 at `thresholds` when given,
    and bootstrap intervals of all of them."""
    y, p = pred["labels"], pred["probabilities"]
    metrics = tag_metrics(y, p, tags)
    vector = decision_metrics(metrics, y, p, tags, thresholds) if thresholds else None
    if f1_note:
        metrics["f1_note"] = f1_note
    return add_intervals(metrics, y, p, tags, groups, unit, resamples, seed, vector)


def write_evaluation(out, metrics, pred, tags, groups, unit, train_counts, title, data_dir, split, extra=None,
                     tensorboard_dir=None, step=0):
    """Everything a report folder holds: metrics.json, per_tag.csv, per_tag.png, predictions.npz."""
    write_report(out, metrics, train_counts, title, tensorboard_dir, step)
    save_predictions(f"{out}/{PREDICTIONS}", pred, tags, groups, unit, data_dir, split)
    files.write_text(f"{out}/metrics.json", json.dumps({split: metrics, **(extra or {})}, indent=1))


# ----------------------------------------------------------------------------------------------

def check_compatible(model_info, manifest, model_dir, data_dir, mapping=None):
    """Refuse a model and data that disagree on tags (after the tag map), sample rate or clip length."""
    from tagger import tagmap
    for key, what in (("sample_rate", "sample rate"), ("clip_samples", "clip length")):
        if model_info.get(key) != manifest.get(key):
            raise UsageError(f"the model {model_dir} and the data {data_dir} disagree on {what}: evaluate "
                             "a model on TFRecords prepared the way its training data was")
    model_tags, data_tags = model_info.get("tags"), manifest.get("tags")
    if mapping:
        model_tags, data_tags = tagmap.apply(model_tags, mapping)[0], tagmap.apply(data_tags, mapping)[0]
        if set(model_tags) != set(data_tags):
            raise UsageError(f"after the tag map the model {model_dir} and the data {data_dir} still disagree on "
                             f"tags ({', '.join(sorted(set(model_tags) ^ set(data_tags))[:5])}): map those too")
    elif model_tags != data_tags:
        raise UsageError(f"the model {model_dir} and the data {data_dir} disagree on tags: evaluate a model on "
                         "TFRecords prepared with its tags, or pass --tag-map")


def parse_args(argv):
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                   help="an export folder, or the name of one in the models folder")
    add_models_dir_flag(p)
    p.add_argument("--data", help="TFRecords folder (default: the one the model was trained on)")
    p.add_argument("--split", choices=("train", "valid", "test"), default="test", help="the split to evaluate on")
    p.add_argument("--batch-size", type=positive_int, default=16, help="clips per model call")
    p.add_argument("--bootstrap", type=positive_int, default=1000, metavar="N",
                   help="resamples behind the 95 %% intervals (of artists where the data names them, else of clips)")
    p.add_argument("--seed", type=int, default=0, help="seeds the bootstrap")
    p.add_argument("--threshold-rule", type=decisions.parse_rule, metavar="RULE",
                   help=f"choose per-tag thresholds on the valid split by RULE ({decisions.RULES_HELP}) for this "
                   "report's F1 (written to its thresholds.json; the export's own are never rewritten); default: "
                   "the export's stored thresholds")
    p.add_argument("--tag-map", metavar="FILE", help="'old -> new' lines: labels merged by OR, the model's scores by "
                   "max ('old ->' drops a tag); default: the tags as they are")
    p.add_argument("--out", help="report folder (default: <model>/eval-<split>)")
    args = p.parse_args(argv)
    if args.threshold_rule and args.split == "valid":
        p.error("--threshold-rule chooses thresholds on the valid split, where F1 would flatter them: evaluate "
                "on --split test (or train)")
    return args


def chosen_on(thresholds, pred, data_dir, split):
    """Whether any of the predicted clips is one the thresholds were chosen on (thresholds recorded
    before clip keys existed: the same data folder and split)."""
    if "clip_keys" in thresholds:
        return not set(thresholds["clip_keys"]).isdisjoint(decisions.clip_keys(pred))
    same = os.path.normpath(str(thresholds.get("data"))) == os.path.normpath(str(data_dir))
    return same and thresholds.get("split") == split


def mapped_thresholds(thresholds, model_tags, mapping):
    """The export's thresholds for the tags after a tag map: a renamed tag keeps its own; a merged tag
    (its score the maximum of several) has none."""
    from tagger import tagmap
    per_tag = {}
    for new, group in tagmap.apply(model_tags, mapping)[1].items():
        if len(group) == 1:
            per_tag[new] = thresholds["tags"].get(model_tags[group[0]], {"threshold": None, "note": "not stored"})
        else:
            per_tag[new] = {"threshold": None, "positives": None, "note": "merged by the tag map"}
    return {**thresholds, "tags": per_tag}


def stored_thresholds(model_dir):
    path = f"{model_dir}/{THRESHOLDS}"
    return json.loads(files.read_text(path)) if files.exists(path) else None


def run(args):
    model_dir = files.find_export(args.model, args.models_dir)
    config = json.loads(files.read_text(f"{model_dir}/config.json"))
    data_dir = (args.data or config.get("data") or "").rstrip("/")
    if not data_dir:
        raise UsageError(f"{model_dir} records no training data (a converted model): pass --data, TFRecords "
                         "prepared with its tags")
    mapping = None
    local = files.read_local_manifest(data_dir)
    if args.tag_map:
        from tagger import tagmap
        known = set(config.get("tags", [])) | set((local or {}).get("tags", []))
        mapping = tagmap.read(args.tag_map, known, f"the model {model_dir} or the data {data_dir}")
    quiet_tensorflow()
    import tensorflow as tf
    from tagger import data
    from tagger.models import WholeClip
    manifest = local or data.load_manifest(data_dir)
    check_compatible(config, manifest, model_dir, data_dir, mapping)
    if not manifest["splits"][args.split]["clips"]:
        raise UsageError(f"the {args.split} split of {data_dir} is empty: choose another --split")
    if args.threshold_rule and not manifest["splits"]["valid"]["clips"]:
        raise UsageError(f"--threshold-rule needs the valid split of {data_dir}, which is empty")
    serving = tf.saved_model.load(model_dir).signatures["serving_default"]

    def predict(split):
        # Whole clips: the export's serving_default arranges them as its family does.
        pred = predict_split(lambda w: serving(waveform=w)["probabilities"], data_dir, split, WholeClip(),
                             args.batch_size, manifest)
        tags = manifest["tags"]
        if mapping:
            from tagger import tagmap
            pred["labels"], tags = tagmap.merge(pred["labels"], manifest["tags"], mapping)
            scores, model_tags = tagmap.merge(pred["probabilities"], config["tags"], mapping)
            pred["probabilities"] = scores[:, [model_tags.index(t) for t in tags]]
        elif config["tags"] != tags:
            pred["probabilities"] = pred["probabilities"][:, [config["tags"].index(t) for t in tags]]
        return pred, tags

    out = (args.out or f"{model_dir}/eval-{args.split}").rstrip("/")
    thresholds, note = stored_thresholds(model_dir), None
    if args.threshold_rule:
        print(f"Choosing thresholds on the valid split ({args.threshold_rule} rule)...", file=sys.stderr)
        valid, tags = predict("valid")
        thresholds = decisions.choose_thresholds(valid["labels"], valid["probabilities"], tags, args.threshold_rule,
                                                 "valid", data_dir, clip_keys=decisions.clip_keys(valid))
        thresholds["source"] = "tagger.evaluate"
        files.makedirs(out)
        files.write_text(f"{out}/{THRESHOLDS}", json.dumps(thresholds, indent=1))
    elif thresholds is None:
        note = f"{model_dir} stores no thresholds (older or converted): pass --threshold-rule to choose some"
    elif mapping:
        thresholds = mapped_thresholds(thresholds, config["tags"], mapping)
    pred, tags = predict(args.split)
    if thresholds and chosen_on(thresholds, pred, data_dir, args.split):
        thresholds, note = None, (f"the thresholds were chosen on clips of this split ({args.split} of {data_dir}): "
                                  "F1 there would flatter them; evaluate another split")
    groups, unit = artists(data_dir, manifest, pred["clip_id"], pred["path"])
    print(f"Bootstrapping {args.bootstrap} resamples of {plural(len(set(groups)), unit)}...", file=sys.stderr)
    metrics = evaluate_split(pred, tags, groups, unit, thresholds, args.bootstrap, args.seed, note)
    extra = {"data": data_dir, "model": model_dir, **({"tag_map": mapping} if mapping else {})}
    counts = manifest["tag_counts"]["train"]
    if mapping:
        from tagger import tagmap
        counts = {new: sum(counts.get(manifest["tags"][i], 0) for i in group)
                  for new, group in tagmap.apply(manifest["tags"], mapping)[1].items()}
    write_evaluation(out, metrics, pred, tags, groups, unit, counts, f"{model_dir} on {data_dir} ({args.split})",
                     data_dir, args.split, extra)
    print("\n".join(summary(metrics, args.split, len(pred["labels"]))))
    written = f"{out}/metrics.json, per_tag.csv, per_tag.png, {PREDICTIONS}"
    print(f"Wrote {written}" + (f" and {THRESHOLDS}" if args.threshold_rule else ""))
    return EXIT_OK


def main(argv=None):
    return main_guard(PROG, run, parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
