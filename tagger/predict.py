"""Tag audio files with an exported model.

    python -m tagger.predict song.mp3 music/ [--model saved_models/NAME] [--top-k 5] [--threshold X]
                             [--format table|json|csv] [--timeline] [--hop SECONDS]

Files or folders (searched recursively for mp3, wav, flac, ogg), any rate and channel count. A
track longer than the model's window (the clip it was trained on, or the chunk of the short-chunk
families) is cut into windows (every --hop seconds, the last window aligned to the end of the track);
a shorter one is zero-padded. Windows from all files go through the model in batches and are
averaged per track, as the SavedModel's `tag_track` does.
"""
import csv
import json
import os
import sys

from tagger import files
from tagger.audio import EXTENSIONS, SAMPLE_RATE
from tagger.cli import (EXIT_FAILED, EXIT_OK, ArgumentParser, UsageError, main_guard, positive_float,
                        positive_int, quiet_tensorflow)

PROG = "python -m tagger.predict"


def parse_args(argv):
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", metavar="PATH", help="audio files or folders")
    p.add_argument("--model", metavar="NAME_OR_PATH", help="an export folder, or the name of one in the models "
                   "folder: a trained run's, or musicnn-mtt, vgg-mtt, musicnn-msd, vgg-msd once converted "
                   "(python -m tagger.convert musicnn WHEEL); default: the newest export there")
    p.add_argument("--models-dir", default=os.environ.get("TAGGER_MODELS_DIR", "saved_models"),
                   help="the models folder (default: $TAGGER_MODELS_DIR or saved_models)")
    p.add_argument("--top-k", type=positive_int, default=5)
    p.add_argument("--threshold", type=float, help="only tags at or above this probability (0-1)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--timeline", action="store_true", help="also each window's start and top tags")
    p.add_argument("--hop", type=positive_float, help="seconds between windows (default: the window length)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per model call")
    args = p.parse_args(argv)
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        p.error(f"--threshold {args.threshold} must be between 0 and 1")
    return args


def is_export(folder):
    return files.exists(f"{folder}/config.json") and files.exists(f"{folder}/saved_model.pb")


def resolve_model(name_or_path, models_dir):
    """An export folder from a path, or from a name in the models folder; one line naming the fix."""
    for candidate in (name_or_path, os.path.join(models_dir, name_or_path)):
        if is_export(candidate.rstrip("/")):
            return candidate.rstrip("/")
    names = sorted(d for d in (os.listdir(models_dir) if os.path.isdir(models_dir) else [])
                   if is_export(os.path.join(models_dir, d)))
    raise UsageError(f"{name_or_path} is neither a tagger export nor the name of one in {models_dir}/ "
                     f"(there: {', '.join(names) or 'none'}): pass an export folder, train one, or convert "
                     "musicnn's (python -m tagger.convert musicnn WHEEL)")


def newest_model(models_dir="saved_models"):
    exports = [os.path.join(models_dir, d) for d in (os.listdir(models_dir) if os.path.isdir(models_dir) else [])
               if os.path.isfile(os.path.join(models_dir, d, "config.json"))
               and os.path.isfile(os.path.join(models_dir, d, "saved_model.pb"))]
    if not exports:
        raise UsageError(f"no exported model under {models_dir}/: train one (python -m tagger.train) "
                         "or pass --model")
    return max(exports, key=os.path.getmtime)


def collect_files(paths):
    found = []
    for path in paths:
        if os.path.isdir(path):
            for root, _, names in sorted(os.walk(path)):
                found += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(EXTENSIONS)]
        elif os.path.exists(path):
            found.append(path)
        else:
            raise UsageError(f"{path} does not exist: pass audio files or folders")
    if not found:
        raise UsageError(f"no audio files ({', '.join(e[1:] for e in EXTENSIONS)}) in {' '.join(paths)}")
    return found


def track_windows(blocks, length, window_samples, starts, lead=0):
    """The windows of `window_samples` at `starts` of a track of `length` samples read as `blocks`,
    with `lead` zeros before it and zeros past its end (starts count the leading zeros). Holds at most
    one window and one block of the track at a time.
    """
    import itertools

    import numpy as np

    blocks = itertools.chain([np.zeros(lead, np.float32)], blocks)
    length += lead
    buf, buf_start = np.zeros(0, np.float32), 0
    for s in starts:
        buf, buf_start = buf[max(0, s - buf_start):], max(s, buf_start)
        end = min(s + window_samples, length)
        while buf_start + len(buf) < end:
            block = next(blocks, None)
            if block is None:
                break
            buf = np.concatenate([buf, block])
        window = buf[s - buf_start:s - buf_start + window_samples]
        yield np.pad(window, (0, window_samples - len(window)))


def tag_files(paths, serving, window, hop, batch_size, on_error):
    """Window every file, run the windows through `serving` in batches across files.

    Files are decoded block by block (`tagger.audio.Stream`), so memory holds one block and one
    batch of windows whatever the tracks' lengths. Returns [{"path", "duration", "starts",
    "window_probabilities", "probabilities"}] for the files that decoded; `on_error(path, reason)`
    is called for the others.
    """
    import numpy as np

    from tagger.audio import AudioError, Stream
    from tagger.export import window_starts

    results, batch = [], []

    def flush():
        if batch:
            probs = serving(np.stack([w for _, w in batch]))
            for (result, _), p in zip(batch, probs):
                result["window_probabilities"].append(p)
            batch.clear()

    for path in paths:
        result = None
        try:
            stream = Stream(path, SAMPLE_RATE)
            starts = window_starts(len(stream), window["samples"], hop, window["lead"], window["end_aligned"])
            result = {"path": path, "duration": round(len(stream) / SAMPLE_RATE, 3),
                      "starts": [s / SAMPLE_RATE for s in starts], "window_probabilities": []}
            results.append(result)
            for samples in track_windows(stream, len(stream), window["samples"], starts, window["lead"]):
                batch.append((result, samples))
                if len(batch) >= batch_size:
                    flush()
        except AudioError as e:
            if result is not None:      # failed midway: forget its windows
                results.remove(result)
                batch[:] = [(r, w) for r, w in batch if r is not result]
            on_error(path, str(e))
    flush()
    for r in results:
        r["window_probabilities"] = np.stack(r["window_probabilities"])
        r["probabilities"] = r["window_probabilities"].mean(axis=0)
    return results


def top_tags(probs, tags, k, threshold):
    order = sorted(range(len(tags)), key=lambda i: -probs[i])[:k]
    return [(tags[i], float(probs[i])) for i in order if threshold is None or probs[i] >= threshold]


def write_output(results, tags, args, out=sys.stdout):
    if args.format == "json":
        doc = []
        for r in results:
            item = {"path": r["path"], "duration": r["duration"],
                    "tags": {t: round(float(p), 6) for t, p in zip(tags, r["probabilities"])}}
            if args.timeline:
                item["windows"] = [{"start": s, "tags": {t: round(float(p), 6) for t, p in zip(tags, wp)}}
                                   for s, wp in zip(r["starts"], r["window_probabilities"])]
            doc.append(item)
        json.dump(doc, out, indent=1)
        out.write("\n")
    elif args.format == "csv":
        w = csv.writer(out)
        w.writerow(["path", "start" if args.timeline else "duration", *tags])
        for r in results:
            rows = zip(r["starts"], r["window_probabilities"]) if args.timeline else [(r["duration"], r["probabilities"])]
            for first, probs in rows:
                w.writerow([r["path"], first, *(f"{p:.6f}" for p in probs)])
    else:
        for r in results:
            top = ", ".join(f"{t} {p:.2f}" for t, p in top_tags(r["probabilities"], tags, args.top_k, args.threshold))
            out.write(f"{r['path']}  ({r['duration']:.1f} s)  {top or '(no tag above the threshold)'}\n")
            if args.timeline:
                for s, probs in zip(r["starts"], r["window_probabilities"]):
                    top = ", ".join(f"{t} {p:.2f}" for t, p in top_tags(probs, tags, args.top_k, args.threshold))
                    out.write(f"    {int(s // 60):02d}:{s % 60:05.2f}  {top}\n")


def run(args):
    if args.model is None:
        model_dir = newest_model(args.models_dir)
        print(f"Using the newest model, {model_dir}", file=sys.stderr)
    else:
        model_dir = resolve_model(args.model, args.models_dir)
    audio_files = collect_files(args.paths)
    config = json.loads(files.read_text(f"{model_dir}/config.json"))
    tags = config["tags"]
    # Exports made before "window" existed took clip-length windows through serving_default.
    window = config.get("window", {"samples": config["clip_samples"], "hop": config["clip_samples"], "lead": 0,
                                   "end_aligned": True})
    hop = int(round(args.hop * SAMPLE_RATE)) if args.hop else window["hop"]
    quiet_tensorflow()
    import tensorflow as tf
    signatures = tf.saved_model.load(model_dir).signatures
    serve = signatures["tag_windows"] if "tag_windows" in signatures else signatures["serving_default"]
    failures = []

    def on_error(path, reason):
        failures.append(path)
        print(f"{path}: {reason}", file=sys.stderr)

    results = tag_files(audio_files, lambda w: serve(waveform=tf.constant(w))["probabilities"].numpy(),
                        window, hop, args.batch_size, on_error)
    write_output(results, tags, args)
    if failures:
        print(f"{len(failures)} of {len(audio_files)} files could not be tagged", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv=None):
    return main_guard(PROG, run, parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
