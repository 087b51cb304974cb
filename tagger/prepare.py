"""Convert audio into sharded TFRecords: MagnaTagATune, the synthetic demo, or your own CSV.

    python -m tagger.prepare --source mtat --mtat-dir DIR --out tfrecords/mtat [--split folder|clean|artist]
    python -m tagger.prepare --source mtat --mtat-dir DIR --out tfrecords/mtat --plan [--tag-report]
    python -m tagger.prepare --source demo --out tfrecords/demo [--seed S]
    python -m tagger.prepare --source csv --csv FILE --audio-root DIR --out tfrecords/NAME

Writes `<split>-NNNNN-of-NNNNN.tfrecord` shards, `tags.json`, `manifest.json` and, where the artists
are known, `artists.tsv` under --out. Each shard's clips are fixed by the plan, and a shard is written
under a temporary name and renamed when complete, so running the same command again after an
interruption finishes the job.
"""
import hashlib
import json
import os
import sys
import time
from collections import Counter

from tagger import artists, audio, demo, files, mtat, plans, tagmap
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
    p.add_argument("--split", choices=mtat.SPLIT_RULES, default="folder", help=mtat.SPLIT_HELP)
    p.add_argument("--csv", help="--source csv: a CSV with columns path, tags (';'-separated), [split], [artist]")
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
    p.add_argument("--tag-map", metavar="FILE", help="merge or drop tags before the output tags are chosen: "
                   "`old -> new` lines, `old ->` drops (docs/mtat.md; default: the tags as annotated)")
    p.add_argument("--min-count", type=positive_int, metavar="N",
                   help="leave out output tags with fewer than N positives in the train split (default: keep all)")
    p.add_argument("--seed", type=int, default=0, help="demo audio, --split artist, and the csv source's random "
                   "split")
    p.add_argument("--tag-report", action="store_true", help="print the output tags' positives per split and "
                   "candidate near-synonyms among them (also tag_counts.tsv and tag_pairs.tsv)")
    p.add_argument("--plan", action="store_true", help="write plan.tsv, tags.json and (artists known) artists.tsv, "
                   "and count the planned audio files that are missing or empty (listed in missing.tsv; exit status 1 "
                   "if any); nothing decoded")
    audio.add_decoder_flag(p)
    args = p.parse_args(argv)
    audio.check_decoder_flag(p, args)
    if args.source == "mtat" and not args.mtat_dir:
        p.error("--source mtat needs --mtat-dir DIR (the unzipped release with annotations_final.csv)")
    if args.source == "csv" and not (args.csv and args.audio_root):
        p.error("--source csv needs --csv FILE and --audio-root DIR")
    if args.source == "csv" and args.split != "folder":
        p.error(f"--split {args.split} is for --source mtat and demo: a CSV's split column decides, else a seeded "
                "80/10/10 split (artist by artist where it has an artist column)")
    return args


def clip_offset(text):
    """argparse type: 'middle', or seconds (0 or more)."""
    if text == "middle":
        return text
    return nonnegative_float(text)


# ----------------------------------------------------------------------------------------------
# The plan's files and messages (tagger.plans makes the plan)

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


def convert(plan, tags, out, audio_root, settings, workers, shard_mb, notes=None):
    """Decode every planned clip in worker processes and write the shards that are not done yet.

    Returns the manifest (also written to <out>/manifest.json, with `notes`, tagger.plans.notes).
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
    return write_manifest(tf, out, shards, tags, settings, notes)


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


def write_manifest(tf, out, shards, tags, settings, notes=None):
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
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(notes or {}),
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
        # a record from before a setting existed: what the command did then (its seed: not recorded, taken as given)
        diff = files.recorded_settings_differ(path, settings, {"clip_offset": 0.0, "decoder": "tfio", "tag_map": None,
                                                               "min_count": None, "seed": settings.get("seed")})
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


def _say_plan_notes(args, plan, notes, out):
    """The plan's tag map, dropped tags, leakage and (--tag-report) tag report, on the terminal."""
    if plan.tag_map is not None:
        merged = len(plan.tag_map) - sum(v is None for v in plan.tag_map.values())
        print(f"Tag map {args.tag_map}: {merged} tags renamed or merged, "
              f"{sum(v is None for v in plan.tag_map.values())} dropped")
    if plan.dropped:
        print(f"--min-count {args.min_count} left out {len(plan.dropped)} tags (fewer positives in train): "
              + ", ".join(plan.dropped))
    print(artists.leakage_line(notes["leakage"], "the CSV has no artist column"))
    short = notes["few_positives"]["tags"]
    if short and args.split == "artist":
        sys.stderr.write(f"{PROG}: warning: the artist split leaves {len(short)} tags with fewer than "
                         f"{artists.MIN_POSITIVES} positives in valid or test: " +
                         ", ".join(f"{t} (valid {c['valid']}, test {c['test']})" for t, c in short.items()) + "\n")
    if args.tag_report:
        lines, counts_tsv, pairs_tsv = tagmap.report(plan.splits, plan.tags)
        print("\n".join(lines))
        files.write_text(f"{out}/tag_counts.tsv", counts_tsv)
        files.write_text(f"{out}/tag_pairs.tsv", pairs_tsv)
        print(f"Wrote {out}/tag_counts.tsv and {out}/tag_pairs.tsv")


def _write_artists(out, plan):
    """artists.tsv where the artists are known; a stale one from an earlier plan is removed."""
    path = f"{out}/{artists.FILE}"
    if plan.artists is not None:
        files.write_text(path, artists.tsv_text(plan.splits, plan.artists))
        return path
    if not files.is_remote(out) and os.path.exists(path):
        os.remove(path)
    return None


def prepare(args):
    """Plan, then convert; returns the exit status."""
    out = args.out.rstrip("/")
    _ensure_writable(out)
    if args.source == "demo":
        audio_root = f"{out}/source"
        clip_samples = demo.CLIP_SAMPLES
        if not os.path.isfile(f"{audio_root}/annotations_final.csv"):
            total = sum(demo.DEFAULT_CLIPS_PER_PART.values())
            print(f"Writing the synthetic demo release ({total} clips of {demo.CLIP_SECONDS} s) to {audio_root}",
                  file=sys.stderr)
            bar = Progress(total, "writing the demo release")
            demo.write_demo(audio_root, args.seed, args.workers, progress=bar.update)
            bar.close()
        annotations = f"{audio_root}/annotations_final.csv"
        plan = plans.mtat_plan(annotations, args.split, args.top_tags, args.seed, args.tag_map)
    elif args.source == "mtat":
        audio_root = args.mtat_dir
        clip_samples = MTAT_CLIP_SAMPLES
        annotations = os.path.join(audio_root, "annotations_final.csv")
        plan = plans.mtat_plan(annotations, args.split, args.top_tags, args.seed, args.tag_map)
    else:
        audio_root = args.audio_root
        clip_samples = MTAT_CLIP_SAMPLES
        annotations = args.csv
        plan = plans.csv_plan(args.csv, args.seed, args.top_tags, args.tag_map)
    plan = plans.apply_min_count(plan, args.min_count)
    tags = plan.tags
    if args.clip_seconds:
        clip_samples = int(round(args.clip_seconds * SAMPLE_RATE))
    min_samples = int(round(args.min_seconds * SAMPLE_RATE)) if args.min_seconds is not None \
        else int(0.9 * clip_samples)
    counts = {s: len(plan.splits[s]) for s in mtat.SPLITS}
    if not sum(counts.values()):
        raise UsageError(f"no clips to convert in {annotations}: check the file, --split and --top-tags")
    if not tags:
        raise UsageError(f"{annotations} tags no clip: a tagger needs at least one tag")
    notes = plans.notes(plan, args.min_count)

    if args.plan:
        files.makedirs(out)
        write_plan_tsv(f"{out}/plan.tsv", plan.splits)
        files.write_text(f"{out}/tags.json", json.dumps(tags, indent=1))
        print(f"Plan ({args.split} split, {len(tags)} tags): " +
              ", ".join(f"{s} {n:,}" for s, n in counts.items()) + " clips")
        warn_empty_splits(counts, "the plan has")
        _say_plan_notes(args, plan, notes, out)
        missing = missing_files(plan.splits, audio_root)
        absent = sum(len(m) for m in missing.values())
        written = [f"{out}/plan.tsv", f"{out}/tags.json"] + [p for p in [_write_artists(out, plan)] if p]
        if absent:
            files.write_text(f"{out}/missing.tsv", "split\tpath\n" + "".join(
                f"{s}\t{rel}\n" for s in mtat.SPLITS for rel in missing[s]))
            print(f"Missing or empty audio files under {audio_root}: " +
                  ", ".join(f"{s} {len(m):,} of {counts[s]:,}" for s, m in missing.items()) +
                  f" (e.g. {next(r for m in missing.values() for r in m)})")
            written.append(f"{out}/missing.tsv")
        else:
            print(f"All {sum(counts.values()):,} planned audio files are there (none empty)")
        print(f"Wrote {', '.join(written[:-1])} and {written[-1]}")
        return EXIT_FAILED if absent else EXIT_OK

    if args.source != "demo" and not os.path.isdir(audio_root):
        raise UsageError(f"audio folder {audio_root} does not exist: point it at the folder holding the audio")
    _say_plan_notes(args, plan, notes, out)
    quiet_tensorflow()
    import tensorflow as tf
    decoder = audio.resolve_decoder(args.decoder)
    settings = {"source": args.source, "split": args.split, "sample_rate": SAMPLE_RATE,
                "clip_samples": clip_samples, "clip_offset": args.clip_offset, "min_samples": min_samples,
                "tags": tags, "decoder": decoder,
                "annotations_sha256": _sha256(annotations),
                "shard_mb": args.shard_mb or (16 if args.source == "demo" else 150),
                # a list of pairs, not a dict: recorded_settings_differ compares a dict field by field
                "tag_map": None if plan.tag_map is None else [[k, v] for k, v in sorted(plan.tag_map.items())],
                "min_count": args.min_count, "seed": args.seed if plan.seeded else None}
    _check_settings(out, settings)
    with tf.io.gfile.GFile(f"{out}/tags.json", "w") as f:
        json.dump(tags, f, indent=1)
    _write_artists(out, plan)
    started = time.time()
    info = audio.decoder_info(decoder)
    print(f"Decoding with {info['name']} {info['version']}", file=sys.stderr)
    manifest = convert(plan.splits, tags, out, audio_root, settings, args.workers, settings["shard_mb"], notes)
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
    print(f"  wrote {out}/manifest.json and {out}/tags.json" + (f" and {out}/{artists.FILE}" if plan.artists else ""))
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
