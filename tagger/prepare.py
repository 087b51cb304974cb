"""Convert audio into sharded TFRecords: MagnaTagATune, the synthetic demo, or your own CSV.

    python -m tagger.prepare --source mtat --mtat-dir DIR --out tfrecords/mtat [--split folder|clean]
    python -m tagger.prepare --source mtat --mtat-dir DIR --out tfrecords/mtat --plan
    python -m tagger.prepare --source demo --out tfrecords/demo [--seed S]
    python -m tagger.prepare --source csv --csv FILE --audio-root DIR --out tfrecords/NAME

Writes `<split>-NNNNN-of-NNNNN.tfrecord` shards, `tags.json` and `manifest.json` under --out. Each
shard's clips are fixed by the plan, and a shard is written under a temporary name and renamed when
complete, so running the same command again after an interruption finishes the job.
"""
import hashlib
import json
import os
import random
import sys
import time
from collections import Counter

from tagger import audio, files, mtat
from tagger.cli import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, ArgumentParser, Progress, UsageError, main_guard,
                        nonnegative_float, positive_float, positive_int, quiet_tensorflow)

PROG = "python -m tagger.prepare"
SAMPLE_RATE = 16000
MTAT_CLIP_SAMPLES = 466000          # 29.125 s at 16 kHz
SETTINGS_FILE = "prepare_settings.json"
PROGRESS_DIR = "progress"


def parse_args(argv):
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--source", choices=("mtat", "demo", "csv"), default="mtat",
                   help="mtat: the MagnaTagATune release; demo: the synthetic demo release (written first); csv: "
                   "your own audio listed in a CSV")
    p.add_argument("--out", required=True, help="output folder (local path or gs://...)")
    p.add_argument("--mtat-dir", help="--source mtat: the release, annotations_final.csv and part folders 0-f")
    p.add_argument("--split", choices=mtat.SPLIT_RULES, default="folder",
                   help="folder: every clip; clean: only clips with at least one of the tags")
    p.add_argument("--csv", help="--source csv: a CSV with columns path, tags (';'-separated), [split]")
    p.add_argument("--audio-root", help="--source csv: folder the CSV's paths are relative to")
    p.add_argument("--clip-seconds", type=positive_float, help="clip length (default: mtat and csv 29.125, demo 10.24)")
    p.add_argument("--clip-offset", type=clip_offset, default=0.0, metavar="SECONDS|middle",
                   help="where in a longer file the clip starts: seconds from its start (earlier where the file "
                   "ends before a whole clip), or middle; MTAT's files are one clip each")
    p.add_argument("--min-seconds", type=nonnegative_float,
                   help="skip files shorter than this (default: 90%% of the clip)")
    p.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, help="decoder processes")
    p.add_argument("--shard-mb", type=positive_float, help="target shard size (default 150, demo 16)")
    p.add_argument("--top-tags", type=positive_int, default=50, help="number of output tags")
    p.add_argument("--seed", type=int, default=0, help="demo audio and the csv source's random split")
    p.add_argument("--plan", action="store_true", help="write plan.tsv and tags.json, and count the planned audio "
                   "files that are missing or empty (listed in missing.tsv; exit status 1 if any); nothing decoded")
    audio.add_decoder_flag(p)
    args = p.parse_args(argv)
    try:
        args.decoder = args.decoder or audio.requested_decoder()
    except UsageError as e:
        p.error(str(e))
    if args.source == "mtat" and not args.mtat_dir:
        p.error("--source mtat needs --mtat-dir DIR (the unzipped release with annotations_final.csv)")
    if args.source == "csv" and not (args.csv and args.audio_root):
        p.error("--source csv needs --csv FILE and --audio-root DIR")
    return args


def clip_offset(text):
    """argparse type: 'middle', or seconds (0 or more)."""
    if text == "middle":
        return text
    return nonnegative_float(text)


# ----------------------------------------------------------------------------------------------
# Plans: which clips go into which split, with which labels

def mtat_plan(annotations_path, split_rule, top_tags):
    """{split: [(clip_id, path, [tag, ...])]} and the tag list, from an MTAT-format annotations file."""
    if not os.path.isfile(annotations_path):
        raise UsageError(f"no annotations file at {annotations_path}: point --mtat-dir at the unzipped "
                         "release (annotations_final.csv beside the part folders 0-f)")
    try:
        columns, clips = mtat.load_annotations(annotations_path)
    except (mtat.AnnotationError, UnicodeDecodeError) as e:
        raise UsageError(f"{annotations_path} is not a MagnaTagATune annotations file: {e}") from None
    tags = mtat.select_tags(columns, clips, top_tags)
    splits = mtat.split_clips(clips, tags, split_rule)
    wanted = set(tags)
    return {s: [(c.clip_id, c.path, sorted(c.labels & wanted, key=tags.index)) for c in cs]
            for s, cs in splits.items()}, tags


def csv_plan(csv_path, seed, top_tags):
    """{split: [...]} and tags from a user CSV: columns path, tags (';'-separated), optional split."""
    import csv
    if not os.path.isfile(csv_path):
        raise UsageError(f"no CSV file at {csv_path}: pass --csv with a file of columns path,tags[,split]")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "tags"} <= set(reader.fieldnames):
            raise UsageError(f"{csv_path} needs a header with columns path and tags (and optionally split)")
        rows = list(reader)
    if not rows:
        raise UsageError(f"{csv_path} lists no files")
    entries = []
    for i, row in enumerate(rows, 1):
        labels = [t.strip() for t in (row.get("tags") or "").split(";") if t.strip()]
        split = (row.get("split") or "").strip()
        if split and split not in mtat.SPLITS:
            raise UsageError(f"{csv_path} line {i + 1}: split {split!r} must be train, valid or test")
        entries.append((i, row["path"].strip(), labels, split))
    counts = Counter(t for e in entries for t in e[2])
    tags = sorted(counts, key=lambda t: (-counts[t], t))[:top_tags]
    rng = random.Random(seed)
    plan = {s: [] for s in mtat.SPLITS}
    for clip_id, path, labels, split in entries:
        if not split:
            r = rng.random()
            split = "train" if r < 0.8 else "valid" if r < 0.9 else "test"
        plan[split].append((clip_id, path, [t for t in tags if t in labels]))
    return plan, tags


def missing_files(plan, audio_root):
    """{split: [path]} of the planned files that do not exist or are empty (stat only, nothing read)."""
    missing = {}
    for split in mtat.SPLITS:
        missing[split] = []
        for _, rel, _ in plan[split]:
            path = os.path.join(audio_root, rel)
            try:
                empty = os.stat(path).st_size == 0
            except OSError:
                empty = True
            if empty:
                missing[split].append(rel)
    return missing


def warn_empty_splits(counts, what):
    empty = [s for s in mtat.SPLITS if not counts[s]]
    if empty:
        sys.stderr.write(f"{PROG}: warning: {what} no clips in the {' and '.join(empty)} split"
                         f"{'s' if len(empty) > 1 else ''}: tagger.train needs clips in train, valid and test\n")


def write_plan_tsv(path, plan):
    files.write_text(path, "split\tclip_id\tmp3_path\n" + "".join(
        f"{split}\t{clip_id}\t{rel}\n" for split in mtat.SPLITS for clip_id, rel, _ in plan[split]))


def shard_layout(plan, clip_samples, shard_mb):
    """[(split, shard_name, [entries])]: contiguous runs of each split's clips, ~shard_mb each."""
    per_shard = max(1, int(shard_mb * 1e6 // (2 * clip_samples + 200)))
    shards = []
    for split in mtat.SPLITS:
        entries = plan[split]
        count = max(1, -(-len(entries) // per_shard)) if entries else 0
        for k in range(count):
            part = entries[k * len(entries) // count:(k + 1) * len(entries) // count]
            shards.append((split, f"{split}-{k:05d}-of-{count:05d}.tfrecord", part))
    return shards


# ----------------------------------------------------------------------------------------------
# Conversion

def _example(tf, pcm, labels_multi_hot, clip_id, path):
    feature = {
        "audio": tf.train.Feature(bytes_list=tf.train.BytesList(value=[pcm.astype("<i2").tobytes()])),
        "labels": tf.train.Feature(int64_list=tf.train.Int64List(value=labels_multi_hot)),
        "clip_id": tf.train.Feature(int64_list=tf.train.Int64List(value=[clip_id])),
        "path": tf.train.Feature(bytes_list=tf.train.BytesList(value=[path.encode()])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def convert(plan, tags, out, audio_root, settings, workers, shard_mb):
    """Decode every planned clip in worker processes and write the shards that are not done yet.

    Returns the manifest (also written to <out>/manifest.json).
    """
    quiet_tensorflow()
    import tensorflow as tf
    from tagger.pool import run_tasks

    gfile = tf.io.gfile
    clip_samples = settings["clip_samples"]
    min_samples = settings["min_samples"]
    shards = shard_layout(plan, clip_samples, shard_mb)
    progress_dir = f"{out}/{PROGRESS_DIR}"
    gfile.makedirs(progress_dir)
    pending = [s for s in shards if not gfile.exists(f"{out}/{s[1]}")]
    done_before = len(shards) - len(pending)
    if done_before:
        print(f"Resuming: {done_before} of {len(shards)} shards already written, {len(pending)} to go",
              file=sys.stderr)
    tag_index = {t: i for i, t in enumerate(tags)}

    tasks, owners = [], []
    for shard_no, (_, _, entries) in enumerate(pending):
        for pos, (_, rel, _) in enumerate(entries):
            tasks.append((os.path.join(audio_root, rel), clip_samples, min_samples, settings["clip_offset"],
                          settings["decoder"]))
            owners.append((shard_no, pos))
    results = [{} for _ in pending]
    bar = Progress(len(tasks), "decoding")
    for index, ok, value in run_tasks(audio.load_clip, tasks, workers):
        shard_no, pos = owners[index]
        results[shard_no][pos] = (ok, value)
        bar.update()
        split, name, entries = pending[shard_no]
        if len(results[shard_no]) == len(entries):
            _write_shard(tf, out, progress_dir, name, entries, results[shard_no], tag_index, tags)
            results[shard_no] = None
    bar.close()
    return write_manifest(tf, out, shards, tags, settings)


def _write_shard(tf, out, progress_dir, name, entries, results, tag_index, tags):
    skipped, padded, counts, written = [], 0, Counter(), 0
    tmp = f"{out}/{name}.tmp-{os.getpid()}"
    with tf.io.TFRecordWriter(tmp) as writer:
        for pos, (clip_id, rel, labels) in enumerate(entries):
            ok, value = results[pos]
            if not ok:
                skipped.append({"path": rel, "reason": value})
                continue
            pcm, info = value
            multi_hot = [0] * len(tags)
            for t in labels:
                multi_hot[tag_index[t]] = 1
            writer.write(_example(tf, pcm, multi_hot, clip_id, rel))
            counts.update(labels)
            padded += info["padded"] > 0
            written += 1
    summary = {"clips": written, "skipped": skipped, "padded": padded, "tag_counts": dict(counts)}
    # The summary first, then the shard: a shard that exists always has its summary.
    files.atomic_write_text(f"{progress_dir}/{name}.json", json.dumps(summary))
    tf.io.gfile.rename(tmp, f"{out}/{name}", overwrite=True)


def write_manifest(tf, out, shards, tags, settings):
    splits = {s: {"clips": 0, "shards": []} for s in mtat.SPLITS}
    tag_counts = {s: {t: 0 for t in tags} for s in mtat.SPLITS}
    skipped, padded = [], 0
    for split, name, _ in shards:
        with tf.io.gfile.GFile(f"{out}/{PROGRESS_DIR}/{name}.json") as f:
            summary = json.load(f)
        splits[split]["clips"] += summary["clips"]
        splits[split]["shards"].append(name)
        for t, n in summary["tag_counts"].items():
            tag_counts[split][t] += n
        skipped += summary["skipped"]
        padded += summary["padded"]
    manifest = {
        "source": settings["source"], "split": settings["split"], "sample_rate": settings["sample_rate"],
        "clip_samples": settings["clip_samples"], "clip_offset": settings["clip_offset"], "tags": tags,
        "splits": splits, "padded": padded,
        "skipped": skipped, "tag_counts": tag_counts, "min_samples": settings["min_samples"],
        "annotations_sha256": settings["annotations_sha256"], "decoder": audio.decoder_info(settings["decoder"]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    files.atomic_write_text(f"{out}/manifest.json", json.dumps(manifest, indent=1))
    return manifest


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_settings(out, settings):
    """Refuse to continue a folder that was started with other settings; record them otherwise."""
    import tensorflow as tf
    path = f"{out}/{SETTINGS_FILE}"
    try:
        tf.io.gfile.makedirs(out)
    except tf.errors.OpError as e:
        raise UsageError(f"cannot create the output folder {out} ({e.message}): choose a writable --out") from None
    try:
        diff = files.recorded_settings_differ(path, settings, {"clip_offset": 0.0, "decoder": "tfio"})
    except tf.errors.OpError as e:
        raise UsageError(f"cannot write to {out} ({e.message}): choose a writable --out") from None
    if diff:
        hint = " (its decoder is in prepare_settings.json: pass that --decoder to finish it)" if "decoder" in diff else ""
        raise UsageError(f"{out} was prepared with other settings ({', '.join(diff)} differ): use a new "
                         f"--out folder, or delete this one to start over{hint}")


def _ensure_writable(out):
    """A local output folder that cannot be created or written to is a usage error, found first."""
    if files.is_remote(out):
        return  # remote folders are checked when TensorFlow's filesystem opens them
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"cannot write to the output folder {out} ({e.strerror}): choose a writable --out") from None


def prepare(args):
    """Plan, then convert; returns the exit status."""
    out = args.out.rstrip("/")
    _ensure_writable(out)
    if args.source == "demo":
        from tagger import demo
        audio_root = f"{out}/source"
        clip_samples = demo.CLIP_SAMPLES
        if not os.path.isfile(f"{audio_root}/annotations_final.csv"):
            total = sum(demo.DEFAULT_CLIPS_PER_PART.values())
            print(f"Writing the synthetic demo release ({total} clips of {demo.CLIP_SECONDS} s) to {audio_root}",
                  file=sys.stderr)
            bar = Progress(total, "writing the demo release")
            demo.write_demo(audio_root, args.seed, args.workers, progress=bar.update)
            bar.close()
        plan, tags = mtat_plan(f"{audio_root}/annotations_final.csv", args.split, args.top_tags)
        annotations = f"{audio_root}/annotations_final.csv"
    elif args.source == "mtat":
        audio_root = args.mtat_dir
        clip_samples = MTAT_CLIP_SAMPLES
        annotations = os.path.join(audio_root, "annotations_final.csv")
        plan, tags = mtat_plan(annotations, args.split, args.top_tags)
    else:
        audio_root = args.audio_root
        clip_samples = MTAT_CLIP_SAMPLES
        annotations = args.csv
        plan, tags = csv_plan(args.csv, args.seed, args.top_tags)
    if args.clip_seconds:
        clip_samples = int(round(args.clip_seconds * SAMPLE_RATE))
    min_samples = int(round(args.min_seconds * SAMPLE_RATE)) if args.min_seconds is not None \
        else int(0.9 * clip_samples)
    counts = {s: len(plan[s]) for s in mtat.SPLITS}
    if not sum(counts.values()):
        raise UsageError(f"no clips to convert in {annotations}: check the file, --split and --top-tags")
    if not tags:
        raise UsageError(f"{annotations} tags no clip: a tagger needs at least one tag")

    if args.plan:
        files.makedirs(out)
        write_plan_tsv(f"{out}/plan.tsv", plan)
        files.write_text(f"{out}/tags.json", json.dumps(tags, indent=1))
        print(f"Plan ({args.split} split, {len(tags)} tags): " +
              ", ".join(f"{s} {n:,}" for s, n in counts.items()) + " clips")
        warn_empty_splits(counts, "the plan has")
        missing = missing_files(plan, audio_root)
        absent = sum(len(m) for m in missing.values())
        written = f"{out}/plan.tsv and {out}/tags.json"
        if absent:
            files.write_text(f"{out}/missing.tsv", "split\tpath\n" + "".join(
                f"{s}\t{rel}\n" for s in mtat.SPLITS for rel in missing[s]))
            print(f"Missing or empty audio files under {audio_root}: " +
                  ", ".join(f"{s} {len(m):,} of {counts[s]:,}" for s, m in missing.items()) +
                  f" (e.g. {next(r for m in missing.values() for r in m)})")
            written += f" and {out}/missing.tsv"
        else:
            print(f"All {sum(counts.values()):,} planned audio files are there (none empty)")
        print(f"Wrote {written}")
        return EXIT_FAILED if absent else EXIT_OK

    if args.source != "demo" and not os.path.isdir(audio_root):
        raise UsageError(f"audio folder {audio_root} does not exist: point it at the folder holding the audio")
    quiet_tensorflow()
    import tensorflow as tf
    decoder = audio.resolve_decoder(args.decoder)
    settings = {"source": args.source, "split": args.split, "sample_rate": SAMPLE_RATE,
                "clip_samples": clip_samples, "clip_offset": args.clip_offset, "min_samples": min_samples,
                "tags": tags, "decoder": decoder,
                "annotations_sha256": _sha256(annotations),
                "shard_mb": args.shard_mb or (16 if args.source == "demo" else 150)}
    _check_settings(out, settings)
    with tf.io.gfile.GFile(f"{out}/tags.json", "w") as f:
        json.dump(tags, f, indent=1)
    started = time.time()
    info = audio.decoder_info(decoder)
    print(f"Decoding with {info['name']} {info['version']}", file=sys.stderr)
    manifest = convert(plan, tags, out, audio_root, settings, args.workers, settings["shard_mb"])
    converted = sum(s["clips"] for s in manifest["splits"].values())
    warn_empty_splits({s: v["clips"] for s, v in manifest["splits"].items()}, "the converted data has")
    print(f"\nConverted {converted:,} clips in {time.time() - started:.0f} s to {out}/ ({len(tags)} tags):")
    for split, info in manifest["splits"].items():
        print(f"  {split:5s} {info['clips']:6,} clips in {len(info['shards'])} shards")
    if manifest["padded"]:
        print(f"  {manifest['padded']} clips were shorter than {clip_samples / SAMPLE_RATE} s and zero-padded")
    if manifest["skipped"]:
        print(f"  {len(manifest['skipped'])} files skipped (listed in manifest.json), e.g.:")
        for s in manifest["skipped"][:5]:
            print(f"    {s['path']}: {s['reason']}")
    print(f"  wrote {out}/manifest.json and {out}/tags.json")
    if not converted:
        sys.stderr.write(f"{PROG}: error: none of the {len(manifest['skipped'])} files could be converted "
                         "(reasons in manifest.json): check the audio folder\n")
        return EXIT_USAGE
    return EXIT_OK


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return main_guard(PROG, prepare, args)


if __name__ == "__main__":
    sys.exit(main())
