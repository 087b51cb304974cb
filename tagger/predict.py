"""Tag audio files with an exported model.

    python -m tagger.predict song.mp3 music/ [--model NAME_OR_PATH] [--models-dir DIR] [--top-k 5]
                             [--threshold X] [--format table|json|csv] [--timeline] [--hop SECONDS]
                             [--embeddings DIR] [--plot DIR]

Files or folders (searched recursively for mp3, wav, flac, ogg), any rate and channel count. A
track longer than the model's window (the clip it was trained on, the chunk of the short-chunk
families, musicnn's 3 s patch) is cut into windows (every --hop seconds, the last window aligned to
the end of the track, or dropped when partial as musicnn does); a shorter one is zero-padded. Windows
from all files go through the model in batches and are averaged per track, as the SavedModel's
`tag_track` does. --embeddings writes each file's penultimate features (and an index.csv of which
file each name is), --plot its taggram.
"""
import csv
import json
import math
import os
import sys

from tagger import audio, files
from tagger.audio import EXTENSIONS, SAMPLE_RATE
from tagger.cli import (EXIT_FAILED, EXIT_OK, ArgumentParser, UsageError, add_models_dir_flag, main_guard,
                        nonnegative_int, plural, positive_float, positive_int, quiet_tensorflow)

PROG = "python -m tagger.predict"


def parse_args(argv):
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", metavar="PATH", help="audio files or folders")
    p.add_argument("--model", metavar="NAME_OR_PATH", help="an export folder, or the name of one in the models "
                   "folder: a trained run's, or musicnn-mtt, vgg-mtt, musicnn-msd, vgg-msd once converted "
                   "(python -m tagger.convert musicnn WHEEL); default: the newest export there")
    add_models_dir_flag(p)
    audio.add_decoder_flag(p)
    p.add_argument("--top-k", type=nonnegative_int, default=5, help="at most this many of the decided tags per "
                   "file and per window, most probable first, in every format (0: no cap; default 5)")
    p.add_argument("--threshold", type=float, help="decide every tag at this probability (0-1) instead of the "
                   "export's per-tag thresholds (default: those; an export without them keeps the --top-k tags)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table",
                   help="table: one line a file; json: a list of {path, duration, tags}; csv: one row per kept tag "
                   "(path, duration or start, rank, tag, probability)")
    p.add_argument("--timeline", action="store_true", help="also each window's start and top tags")
    p.add_argument("--hop", type=positive_float, help="seconds between windows (default: the window length)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per model call (default 8)")
    p.add_argument("--embeddings", metavar="DIR", help="also write each file's per-window penultimate features and "
                   "their mean (NAME.windows.npy, NAME.mean.npy) to DIR")
    p.add_argument("--plot", metavar="DIR", help="also draw each file's taggram (tags over time) as DIR/NAME.png: "
                   "the --top-k tags, all with --top-k 0")
    args = p.parse_args(argv)
    audio.check_decoder_flag(p, args)
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        p.error(f"--threshold {args.threshold} must be between 0 and 1")
    for flag, folder in (("--embeddings", args.embeddings), ("--plot", args.plot)):
        if folder and os.path.exists(folder) and not os.path.isdir(folder):
            p.error(f"{flag} {folder} is a file: name a folder (created if missing)")
    return args


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


def file_windows(paths, window, hop, decoder=None):
    """For each file: ("file", path, result) with its duration and window starts, then ("window", path,
    samples) for each window, or ("error", path, (reason, result or None)) where it cannot be decoded
    (also midway, after its "file"). `decoder`: as tagger.audio.Stream's."""
    from tagger.audio import AudioError, Stream
    from tagger.export import window_starts

    for path in paths:
        result = None
        try:
            stream = Stream(path, SAMPLE_RATE, decoder=decoder)
            starts = window_starts(len(stream), window["samples"], hop, window["lead"], window["end_aligned"])
            result = {"path": path, "duration": round(len(stream) / SAMPLE_RATE, 3),
                      "starts": [s / SAMPLE_RATE for s in starts]}
            yield "file", path, result
            for samples in track_windows(stream, len(stream), window["samples"], starts, window["lead"]):
                yield "window", path, samples
        except AudioError as e:
            yield "error", path, (str(e), result)


def ahead(items, size):
    """The items of an iterator, produced by a thread up to `size` items ahead of the consumer (the
    decoder works while the model runs: both release the GIL); its exceptions are raised here."""
    import queue
    import threading

    q, done, stop = queue.Queue(maxsize=size), object(), threading.Event()

    def put(entry):
        while not stop.is_set():
            try:
                return q.put(entry, timeout=0.1)
            except queue.Full:
                pass

    def produce():
        try:
            for item in items:
                put((item, None))
                if stop.is_set():
                    return
            put((done, None))
        except BaseException as e:          # handed to the consumer, which raises it
            put((done, e))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:                                # also when the consumer stops early: the thread ends
        stop.set()
        thread.join()


def tag_files(paths, serving, window, hop, batch_size, on_error, decoder=None):
    """Window every file, run the windows through `serving` in batches across files.

    `serving(windows)` returns {"probabilities": ..., and optionally "embedding": ...}, one row a window.
    Files are decoded block by block (`tagger.audio.Stream`) in a thread that runs ahead of the model by
    at most four batches of windows, so memory holds a block and a few batches whatever the tracks'
    lengths. Returns [{"path", "duration", "starts", "window_probabilities", "probabilities"}] (and
    "window_embedding", "embedding" when `serving` gives them; the plain keys are the means over
    windows) for the files that decoded; `on_error(path, reason)` is called for the others. `decoder`:
    as tagger.audio.Stream's.
    """
    import numpy as np

    results, batch, current = [], [], None

    def flush():
        if batch:
            outputs = serving(np.stack([w for _, w in batch]))
            for key, rows in outputs.items():
                for (result, _), row in zip(batch, rows):
                    result.setdefault(f"window_{key}", []).append(row)
            batch.clear()

    for kind, path, item in ahead(file_windows(paths, window, hop, decoder), 4 * batch_size):
        if kind == "file":
            current = item
            results.append(current)
        elif kind == "window":
            batch.append((current, item))
            if len(batch) >= batch_size:
                flush()
        else:
            reason, started = item
            if started is not None:                 # failed midway: forget its windows
                results.remove(started)
                batch[:] = [(r, w) for r, w in batch if r is not started]
            current = None
            on_error(path, reason)
    flush()
    for r in results:
        for key in [k for k in r if k.startswith("window_")]:
            r[key] = np.stack(r[key])
            r[key[len("window_"):]] = r[key].mean(axis=0)
    return results


def output_names(results):
    """A file name stem per result: the audio file's, or numbered (stem-2, stem-3, ...) where an earlier
    one took it, compared without case (a.wav, a.mp3 and A.flac are a, a-2, A-3)."""
    taken, names = set(), []
    for r in results:
        stem = name = os.path.splitext(os.path.basename(r["path"]))[0]
        number = 1
        while name.lower() in taken:
            number += 1
            name = f"{stem}-{number}"
        taken.add(name.lower())
        names.append(name)
    return names


def write_embeddings(results, folder):
    """<name>.windows.npy (windows, features) and <name>.mean.npy (features,) per file, and index.csv
    (name, path, windows) saying which file each name is. Returns the mean files' paths."""
    import numpy as np
    os.makedirs(folder, exist_ok=True)
    written, rows = [], []
    for r, name in zip(results, output_names(results)):
        for suffix, array in ((".windows.npy", r["window_embedding"]), (".mean.npy", r["embedding"])):
            np.save(os.path.join(folder, name + suffix), array.astype(np.float32))
        written.append(os.path.join(folder, name + ".mean.npy"))
        rows.append((name, r["path"], len(r["window_embedding"])))
    with open(os.path.join(folder, "index.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("name", "path", "windows"), *rows])
    return written


def plot_taggrams(results, tags, folder, top_k):
    """<name>.png per file: the tags (the track's top_k, or all with 0) over time, window by window, as
    musicnn's taggrams show them; the track's top tags (the top five) marked. Returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    os.makedirs(folder, exist_ok=True)
    written = []
    for r, name in zip(results, output_names(results)):
        order = np.argsort(-r["probabilities"])
        shown = order if top_k == 0 else order[:top_k]
        grid = r["window_probabilities"][:, shown].T                   # (tags, windows)
        starts = np.array(r["starts"])
        step = starts[1] - starts[0] if len(starts) > 1 else r["duration"] or 1.0
        fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(starts) + 3), max(2.5, 0.22 * len(shown) + 1)))
        # Each window from its own start to the next one's (the last aligned to the track's end starts
        # closer than a hop), the last for a hop.
        edges = np.append(starts, starts[-1] + step)
        image = ax.pcolormesh(edges, np.arange(len(shown) + 1) - 0.5, grid, cmap="Blues", vmin=0, vmax=1)
        ax.invert_yaxis()
        top = set(order[:5].tolist())
        ax.set_yticks(range(len(shown)), [f"{tags[i]} *" if i in top else tags[i] for i in shown], fontsize=8)
        for tick, i in zip(ax.get_yticklabels(), shown):
            tick.set_fontweight("bold" if i in top else "normal")
        ax.set_xlabel("time (s)")
        ax.set_title(f"{os.path.basename(r['path'])}: tags over time (* the track's top 5)", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.03, label="probability")
        fig.tight_layout()
        path = os.path.join(folder, name + ".png")
        files.write_bytes(path, files.figure_png(fig))
        written.append(path)
    return written


def top_tags(probs, tags, k, thresholds=None):
    """The decided tags (probability at or above the tag's threshold; every tag where `thresholds` is
    None), most probable first, at most k of them (all for k = 0), as (tag, probability)."""
    order = sorted(range(len(tags)), key=lambda i: -probs[i])
    kept = [i for i in order if thresholds is None or probs[i] >= thresholds[i]]
    return [(tags[i], float(probs[i])) for i in kept[:k or None]]


def decision_thresholds(model_dir, tags, threshold):
    """The per-tag thresholds predict decides by: --threshold for every tag when given, else the
    export's stored ones (+inf for a tag without one), else None (the top-k alone). Says once on
    stderr when an export has none, or tags without one."""
    from tagger import decisions, evaluate
    if threshold is not None:
        return [threshold] * len(tags)
    stored = evaluate.stored_thresholds(model_dir)
    if stored is None:
        print(f"{model_dir} has no per-tag thresholds (a converted model or an older export): showing the most "
              "probable tags (--top-k; --threshold X decides every tag at X)", file=sys.stderr)
        return None
    vector = decisions.threshold_vector(stored, tags)
    missing = int((vector == math.inf).sum())
    if missing:
        print(f"{missing} of the {len(tags)} tags have no threshold and are never decided (thresholds.json says "
              "why; --threshold X decides every tag at X)", file=sys.stderr)
    return vector.tolist()


def write_output(results, tags, args, thresholds=None, out=sys.stdout):
    """Every format keeps the same tags: those decided by `thresholds` (decision_thresholds), at most
    --top-k of them (0: no cap), by descending probability; each window's in the timeline likewise."""
    def kept(probs):
        return top_tags(probs, tags, args.top_k, thresholds)

    if args.format == "json":
        doc = []
        for r in results:
            item = {"path": r["path"], "duration": round(r["duration"], 6),
                    "tags": {t: round(p, 6) for t, p in kept(r["probabilities"])}}
            if args.timeline:
                item["windows"] = [{"start": round(s, 6), "tags": {t: round(p, 6) for t, p in kept(wp)}}
                                   for s, wp in zip(r["starts"], r["window_probabilities"])]
            doc.append(item)
        json.dump(doc, out, indent=1)
        out.write("\n")
    elif args.format == "csv":
        # One row per kept tag (long format), so the filters apply as they do to the table.
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["path", "start" if args.timeline else "duration", "rank", "tag", "probability"])
        for r in results:
            rows = zip(r["starts"], r["window_probabilities"]) if args.timeline else [(r["duration"], r["probabilities"])]
            for first, probs in rows:
                for rank, (t, p) in enumerate(kept(probs), 1):
                    w.writerow([r["path"], f"{first:.6f}", rank, t, f"{p:.6f}"])
    else:
        for r in results:
            top = ", ".join(f"{t} {p:.2f}" for t, p in kept(r["probabilities"]))
            out.write(f"{r['path']}  ({r['duration']:.1f} s)  {top or '(no tag decided)'}\n")
            if args.timeline:
                for s, probs in zip(r["starts"], r["window_probabilities"]):
                    top = ", ".join(f"{t} {p:.2f}" for t, p in kept(probs))
                    out.write(f"    {int(s // 60):02d}:{s % 60:05.2f}  {top}\n")


def load_tagger(model_dir, embeddings=False):
    """(tags, window, serving) of an export: `serving(windows)` gives {"probabilities"} (and
    {"embedding"} with `embeddings`) for a batch of windows as `tag_files` wants it."""
    config = json.loads(files.read_text(f"{model_dir}/config.json"))
    # Exports made before "window" existed took clip-length windows through serving_default.
    window = config.get("window", {"samples": config["clip_samples"], "hop": config["clip_samples"], "lead": 0,
                                   "end_aligned": True})
    quiet_tensorflow()
    import tensorflow as tf
    signatures = tf.saved_model.load(model_dir).signatures
    serve = signatures["tag_windows"] if "tag_windows" in signatures else signatures["serving_default"]
    embed = signatures.get("embed") if embeddings else None
    if embeddings and embed is None:
        raise UsageError(f"{model_dir} has no embed signature (exported by an older tagger): export it again")

    def serving(windows):
        x = tf.constant(windows)
        out = dict((embed or serve)(waveform=x))
        if "probabilities" not in out:          # an export whose embed gives the embedding alone
            out.update(serve(waveform=x))
        return {key: value.numpy() for key, value in out.items()}
    return config["tags"], window, serving


def run(args):
    if args.model is None:
        model_dir = files.newest_export(args.models_dir)
        print(f"Using the newest model, {model_dir}", file=sys.stderr)
    else:
        model_dir = files.find_export(args.model, args.models_dir)
    audio_files = collect_files(args.paths)
    decoder = audio.resolve_decoder(args.decoder)
    tags, window, serving = load_tagger(model_dir, embeddings=bool(args.embeddings))
    thresholds = decision_thresholds(model_dir, tags, args.threshold)
    hop = int(round(args.hop * SAMPLE_RATE)) if args.hop else window["hop"]
    failures = []

    def on_error(path, reason):
        failures.append(path)
        print(f"{path}: {reason}", file=sys.stderr)

    results = tag_files(audio_files, serving, window, hop, args.batch_size, on_error, decoder)
    write_output(results, tags, args, thresholds)
    if args.embeddings and results:
        write_embeddings(results, args.embeddings)
        print(f"Wrote the embeddings of {plural(len(results), 'file')} to {os.path.normpath(args.embeddings)}/ "
              "(NAME.windows.npy, NAME.mean.npy, index.csv)", file=sys.stderr)
    if args.plot and results:
        plot_taggrams(results, tags, args.plot, args.top_k)
        print(f"Wrote the taggrams of {plural(len(results), 'file')} to {os.path.normpath(args.plot)}/", file=sys.stderr)
    if failures:
        print("The file could not be tagged" if len(audio_files) == 1 else
              f"{len(failures)} of the {len(audio_files)} files could not be tagged", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv=None):
    return main_guard(PROG, run, parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
