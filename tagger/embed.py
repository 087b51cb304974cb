"""Embed a whole music library into an embedding store, resumably.

    python -m tagger.embed LIBRARY... --model NAME_OR_PATH --out STORE [--list FILE] [--models-dir DIR]
                           [--hop SECONDS] [--batch-size 8] [--workers N] [--commit-every 256]
                           [--retry-failed] [--decoder auto|tfio|soundfile]

LIBRARY: audio files or folders (searched recursively for mp3, wav, flac, ogg), and/or --list FILE, one
path a line (blank lines skipped; relative paths from the current folder, as on the command line).
Every file's windows (cut as `tagger.predict` cuts them: the export's window, every --hop seconds, the
last aligned to the end of the track) go through the export's `embed` signature, in batches across
files; each track's per-window embeddings and probabilities, window starts and duration go to the
store at STORE (tagger.store: store.json, index.jsonl, shard-NNNNN.npz), a shard every --commit-every
tracks and at the end. A track's windows equal `tagger.predict FILE --embeddings DIR` on it.

Paths are recorded absolute, their folders' symlinks resolved and the file's own name kept (a symlinked
file, git-annex's, is recorded by its name, not its target's): a rerun from another folder, or with the
library named another way (music/, ./music/, a symlink to it), finds the same tracks.

Resumable: a rerun embeds only the files not in the store yet, or changed since (size or mtime); a
finished library embeds nothing (and loads no model: a second or so). A kill loses only the tracks not committed yet (at most
--commit-every); Ctrl-C commits the tracks already finished. A file that cannot be decoded is recorded
as failed with its reason, listed at the end, and skipped by later runs until it changes
(--retry-failed tries them again); the exit status is still 0: every file was dealt with.

Decoding runs in --workers processes (tagger.pool: a decoder that crashes costs only its file). A
worker decodes a whole file block by block into a scratch file of float32 samples in STORE/.decoding-*
(removed at the end, and by the next run after a kill), and the main process reads its windows from
there a block at a time: memory holds a block and a few batches whatever the tracks' lengths, and the
disk the decoded samples of at most --workers files (an hour at 16 kHz: 230 MB). A worker gets its next
file once the main process has taken its last one: with --workers 1, decoding and the model take turns.

The arguments, the export's config.json and the store are checked before TensorFlow is imported: a
store of another model or hop at STORE is refused in one line (exit status 2).
"""
import contextlib
import functools
import glob
import os
import shutil
import signal
import sys
import tempfile
import time

from tagger import audio, files, store
from tagger.audio import SAMPLE_RATE
from tagger.cli import (EXIT_OK, ArgumentParser, Progress, UsageError, add_models_dir_flag, main_guard, plural,
                        positive_float, positive_int)
from tagger.predict import collect_files, track_windows

PROG = "python -m tagger.embed"
SCRATCH_PREFIX = ".decoding-"
READ_SAMPLES = int(audio.BLOCK_SECONDS * SAMPLE_RATE)   # a scratch file is read this many samples at a time
SHOW_FAILED = 10


def parse_args(argv):
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="*", metavar="LIBRARY", help="audio files or folders (searched recursively)")
    p.add_argument("--list", metavar="FILE", help="also the paths in FILE, one a line (files or folders; relative "
                   "ones from the current folder)")
    p.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                   help="an export folder, or the name of one in the models folder")
    add_models_dir_flag(p)
    p.add_argument("--out", required=True, metavar="STORE", help="the embedding store folder: created if missing, "
                   "continued if it holds this model's embeddings at this hop")
    p.add_argument("--hop", type=positive_float, metavar="SECONDS", help="seconds between windows (default: the export's hop)")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="windows per model call")
    p.add_argument("--workers", type=positive_int, default=min(4, os.cpu_count() or 1), metavar="N",
                   help="decoding processes (default: the CPU count, at most 4)")
    p.add_argument("--commit-every", type=positive_int, default=store.SHARD_TRACKS, metavar="N",
                   help="tracks per shard: a kill loses at most this many tracks' work")
    p.add_argument("--retry-failed", action="store_true", help="try the files that failed before again, "
                   "also where they have not changed")
    audio.add_decoder_flag(p)
    args = p.parse_args(argv)
    audio.check_decoder_flag(p, args)
    if not args.paths and not args.list:
        p.error("name the library: audio files or folders, or --list FILE")
    if args.list and not os.path.isfile(args.list):
        p.error(f"--list {args.list} is not a file: pass a text file of paths, one a line")
    if args.hop is not None and round(args.hop * SAMPLE_RATE) < 1:
        p.error(f"--hop {args.hop:g} is shorter than a sample (1/{SAMPLE_RATE} s)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file: name a folder for the store (created if missing)")
    return args


def read_list(path):
    """The paths in a list file, one a line (only the line end stripped: a name may begin or end with
    spaces), blank lines skipped."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f if line.strip()]


def library_files(paths, list_file=None):
    """The audio files under `paths` and those `list_file` names, absolute (symlinks kept), each once, in
    the order found. Missing paths and a library without audio files are UsageErrors."""
    listed = read_list(list_file) if list_file else []
    missing = [p for p in listed if not os.path.exists(p)]
    if missing:
        raise UsageError(f"{list_file}: {plural(len(missing), 'path')} missing (the first: {missing[0]}): "
                         "fix the list")
    if list_file and not paths and not listed:
        raise UsageError(f"{list_file} names no paths: one path a line")
    found = collect_files([*paths, *listed])
    real_folder = functools.lru_cache(maxsize=None)(os.path.realpath)      # a library has few folders
    return list(dict.fromkeys(store_path(p, real_folder) for p in found))


def store_path(path, real_folder=os.path.realpath):
    """The key a file is recorded by: absolute, its folder's symlinks resolved, its own name kept."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(real_folder(folder), name)


def decode_to_file(path, samples_file, decoder):
    """In a worker process: decode `path` to 16 kHz mono float32 samples, written raw to `samples_file`
    block by block. Returns (size, mtime_ns, samples): the file's stamp, taken before decoding it, and
    the track's length. Raises AudioError (or OSError) with a one-line reason."""
    # The main process answers Ctrl-C (it commits what is finished, then stops us): a worker killed
    # by it mid-file would be reported as a crashing decoder.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        size, mtime_ns = store.file_stamp(path)
    except OSError as e:
        raise audio.AudioError(f"cannot read it ({e.strerror})") from None
    stream = audio.Stream(path, SAMPLE_RATE, decoder=decoder)
    try:
        with open(samples_file, "wb") as f:
            for block in stream:
                f.write(block.tobytes())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(samples_file)
        raise
    return size, mtime_ns, len(stream)


def _blocks(f):
    import numpy as np
    while True:
        block = np.fromfile(f, np.float32, count=READ_SAMPLES)
        if not len(block):
            return
        yield block


def embed_files(paths, serving, window, hop, batch_size, workers, decoder, scratch, on_track, on_error):
    """Decode `paths` in `workers` processes (into `scratch`, a folder) and run their windows through
    `serving` in batches across files.

    `serving(windows)` returns {"embedding", "probabilities"}, one row a window (predict.load_tagger with
    embeddings=True). `window`: the export's {"samples", "lead", "end_aligned"}; `hop` in samples.
    Each finished track goes to `on_track({"path", "size", "mtime_ns", "duration", "starts",
    "embeddings", "probabilities"})` (starts in seconds; per-window arrays), in the order the files
    finish decoding; `on_error(path, reason)` gets the others."""
    import numpy as np

    from tagger.export import window_starts
    from tagger.pool import run_tasks

    batch, waiting = [], []          # (track, window) for the model; tracks not yet whole, oldest first

    def flush():
        if batch:
            out = serving(np.stack([w for _, w in batch]))
            for (track, _), embedding, probabilities in zip(batch, out["embedding"], out["probabilities"]):
                track["embeddings"].append(embedding)
                track["probabilities"].append(probabilities)
            batch.clear()
        while waiting and len(waiting[0]["embeddings"]) == len(waiting[0]["starts"]):
            track = waiting.pop(0)
            on_track({**track, "embeddings": np.stack(track["embeddings"]),
                      "probabilities": np.stack(track["probabilities"])})

    tasks = [(path, os.path.join(scratch, f"{i}.f32"), decoder) for i, path in enumerate(paths)]
    with contextlib.closing(run_tasks(decode_to_file, tasks, workers)) as replies:
        for index, ok, value in replies:
            path, samples_file, _ = tasks[index]
            try:
                if not ok:
                    on_error(path, value)
                    continue
                size, mtime_ns, length = value
                starts = window_starts(length, window["samples"], hop, window["lead"], window["end_aligned"])
                track = {"path": path, "size": size, "mtime_ns": mtime_ns,
                         "duration": round(length / SAMPLE_RATE, 3),       # as tagger.predict reports it
                         "starts": [s / SAMPLE_RATE for s in starts], "embeddings": [], "probabilities": []}
                waiting.append(track)
                with open(samples_file, "rb") as f:
                    for w in track_windows(_blocks(f), length, window["samples"], starts, window["lead"]):
                        batch.append((track, w))
                        if len(batch) >= batch_size:
                            flush()
            finally:
                with contextlib.suppress(OSError):
                    os.remove(samples_file)
        flush()


def _scratch_folder(folder):
    """A fresh scratch folder in the store; those of killed runs are removed (we hold the writer's lock)."""
    for old in glob.glob(os.path.join(glob.escape(folder), SCRATCH_PREFIX + "*")):
        shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=folder)


def _shards(folder):
    return len(glob.glob(os.path.join(glob.escape(folder), "shard-*.npz")))


def run(args):
    start = time.time()
    export_dir = files.find_export(args.model, args.models_dir)
    model = store.model_info(export_dir, args.hop)
    paths = library_files(args.paths, args.list)
    out = store.Store.create(args.out, model)
    where = os.path.normpath(args.out)
    with out.writer(args.commit_every) as writer:
        pending = out.pending(paths, retry_failed=args.retry_failed)
        failed_before, waiting = out.failed(), set(pending)
        skipped_failed = sum(p in failed_before for p in paths if p not in waiting)
        there = len(paths) - len(pending) - skipped_failed
        retry = (f"{plural(skipped_failed, 'file')} that failed before and did not change since (--retry-failed "
                 "tries again)") if skipped_failed else ""
        if not pending:
            print(f"all {plural(there, 'track')} are in {where} already: nothing to embed"
                  + (f"; skipped {retry}" if retry else ""), file=sys.stderr)
            return EXIT_OK
        print(f"Embedding {plural(len(pending), 'file')} of {len(paths):,} with {model.name} into {where}/ "
              f"({there:,} there already)", file=sys.stderr)
        from tagger.predict import load_tagger
        decoder = audio.resolve_decoder(args.decoder)
        _, window, serving = load_tagger(export_dir, embeddings=True)
        hop = int(round(args.hop * SAMPLE_RATE)) if args.hop else window["hop"]
        failures, embedded = [], 0
        bar = Progress(len(pending), "embedding")

        def on_track(t):
            nonlocal embedded
            writer.add(t["path"], t["size"], t["mtime_ns"], t["duration"], t["starts"], t["embeddings"],
                       t["probabilities"])
            embedded += 1
            bar.update(note=f"{len(failures)} failed" if failures else "")

        def on_error(path, reason):
            try:
                stamp = store.file_stamp(path)
            except OSError:
                stamp = (None, None)           # unreadable now: pending again next run
            writer.fail(path, reason, *stamp)
            failures.append((path, reason))
            bar.update(note=f"{len(failures)} failed")

        scratch = _scratch_folder(out.folder)
        began = time.time()
        try:
            embed_files(pending, serving, window, hop, args.batch_size, min(args.workers, len(pending)), decoder,
                        scratch, on_track, on_error)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            bar.close()
        seconds = time.time() - began
    print(f"Embedded {plural(embedded, 'track')} in {seconds:.1f} s ({embedded / max(seconds, 1e-9):.1f} tracks/s; "
          f"{time.time() - start:.1f} s in all), {len(failures):,} failed, {there:,} already in the store"
          + (f"; skipped {retry}" if retry else ""), file=sys.stderr)
    print(f"Store: {where}/ (index.jsonl and {plural(_shards(out.folder), 'shard')}): "
          f"{plural(len(out.tracks()), 'track')}, {len(out.failed()):,} failed in all", file=sys.stderr)
    if failures:
        print(f"{plural(len(failures), 'file')} could not be embedded (recorded in the store and skipped until "
              "changed; --retry-failed tries again):", file=sys.stderr)
        for path, reason in failures[:SHOW_FAILED]:
            print(f"  {path}: {reason}", file=sys.stderr)
        if len(failures) > SHOW_FAILED:
            print(f"  ... and {len(failures) - SHOW_FAILED:,} more (the index's \"failed\" lines)", file=sys.stderr)
    return EXIT_OK


def main(argv=None):
    return main_guard(PROG, run, parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
