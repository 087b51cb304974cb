"""An embedding store: a music library's per-window embeddings and probabilities from one model, kept on
disk so the library is embedded once and probes and thresholds are fitted on it many times.

Written in shards of many tracks; a run that is killed loses only the tracks it had not committed, and
the next run embeds just those and the files added or changed since (`Store.pending`).

A store is a local folder (it appends to its index and fsyncs; write it locally, copy it afterwards):

    store.json        {"format": "tagger-embedding-store", "version": 1, "model": {...}}: the model's
                      name, path, fingerprint (sha256 of its config.json and its weights' checksums,
                      variables/variables.index), tags, window and hop seconds, embedding size (set by
                      the first commit where unknown at creation)
    index.jsonl       one JSON object a line, appended at each commit. A track:
                      {"path", "size", "mtime_ns", "duration", "shard", "row", "windows"}; a file that
                      could not be embedded: {"path", "size", "mtime_ns", "failed": reason} (size and
                      mtime_ns null where unknown). A path's latest line is its outcome: a changed
                      file's earlier line is superseded, its rows stay in their shard unused.
    shard-NNNNN.npz   the tracks of one commit, uncompressed (float32 does not compress): "paths" (n,),
                      "durations" (n,) float64, "means" (n, d) float32 (each track's windows' mean),
                      "offsets" (n + 1,) int64 (track i's windows are rows offsets[i]:offsets[i + 1]
                      of:), "window_starts" (w,) float64 seconds, "window_embeddings" (w, d) float32,
                      "window_probabilities" (w, tags) float32
    writer.lock       held (flock) by the one process writing

A commit writes its shard under a temporary name, fsyncs it and renames it into place, and only then
appends its tracks to the index (one write, fsynced): an index line never names a shard that is not
whole. Reading ignores what a kill can leave: an unfinished last index line, lines whose shard is missing,
temporary shard files.

numpy only: no TensorFlow here.
"""
import dataclasses
import glob
import hashlib
import json
import os
import re
import sys
import zipfile

import numpy as np

from tagger import files
from tagger.cli import UsageError, plural

FORMAT, VERSION = "tagger-embedding-store", 1
SHARD_TRACKS = 256
_SHARD = re.compile(r"shard-(\d{5,})\.npz$")

try:
    import fcntl
except ImportError:                  # not on Windows: one writer at a time is then the caller's care
    fcntl = None


@dataclasses.dataclass(frozen=True)
class Model:
    """What a store's embeddings come from. Two stores hold comparable embeddings when their fingerprints
    and hops agree; `name` and `path` are for people."""
    name: str
    fingerprint: str
    tags: tuple
    window_seconds: float
    hop_seconds: float
    path: str = None
    embedding_size: int = None

    def to_json(self):
        return {**dataclasses.asdict(self), "tags": list(self.tags)}

    @classmethod
    def from_json(cls, d):
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in d.items() if k in fields}, "tags": tuple(d["tags"])})


def model_info(export_dir, hop_seconds=None):
    """The Model of an export folder (local or gs://), read without TensorFlow. `hop_seconds`: the hop
    the windows are cut at (default: the export's own, as tagger.predict uses).

    The fingerprint hashes config.json and variables/variables.index, which holds a checksum of every
    weight: a model retrained into the same folder is another model."""
    digest = hashlib.sha256(files.read_bytes(f"{export_dir}/config.json"))
    config = json.loads(files.read_text(f"{export_dir}/config.json"))
    if files.exists(f"{export_dir}/variables/variables.index"):
        digest.update(files.read_bytes(f"{export_dir}/variables/variables.index"))
    rate = config.get("sample_rate", 16000)
    # Exports made before "window" existed took clip-length windows (as tagger.predict.load_tagger).
    window = config.get("window", {"samples": config["clip_samples"], "hop": config["clip_samples"]})
    return Model(name=os.path.basename(str(export_dir).rstrip("/")), fingerprint=digest.hexdigest(),
                 tags=tuple(config["tags"]), window_seconds=window["samples"] / rate,
                 hop_seconds=hop_seconds or window["hop"] / rate, path=str(export_dir))


def file_stamp(path):
    """(size, mtime_ns) of a local file: what the index keys a track by besides its path."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@dataclasses.dataclass(frozen=True)
class Track:
    """A committed track: where its arrays are, and the file they were computed from."""
    path: str
    size: int
    mtime_ns: int
    duration: float
    shard: str
    row: int
    windows: int


def _fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:                  # some filesystems cannot sync a folder; the rename still happened
        pass
    finally:
        os.close(fd)


def atomic_write(path, data):
    """Write bytes to a local file whole or not at all: a temporary name, fsync, rename, fsync the folder."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_folder(os.path.dirname(path) or ".")


class Store:
    """An open store: its model, its committed tracks and failures (read at open), its arrays (read from
    the shards when asked). Get one with `Store.create`, `Store.open` or `Store.from_track`."""

    def __init__(self, folder, model):
        self.folder, self.model = folder, model
        self._latest = {}            # path -> Track or {"failed": reason, "size", "mtime_ns"}
        self._cache = (None, {})     # the last shard read: (name, {member: array})
        self.ignored = 0             # index lines left out at open (unfinished, or their shard missing)
        self._read_index()

    @classmethod
    def create(cls, folder, model):
        """A new store in `folder` (created if missing; it must be empty), or the store already there when
        it holds `model`'s embeddings (to go on with it). `model`: a Model (`model_info`)."""
        _local(folder)
        if os.path.exists(os.path.join(folder, "store.json")):
            return cls.open(folder, model)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UsageError(f"{folder} is a file: name a folder for the store (created if missing)")
        if os.path.isdir(folder) and os.listdir(folder):
            raise UsageError(f"{folder} is not empty and holds no embedding store (no store.json): use another --out")
        os.makedirs(folder, exist_ok=True)
        atomic_write(os.path.join(folder, "store.json"), _store_json(model))
        return cls(folder, model)

    @classmethod
    def open(cls, folder, model=None):
        """The store in `folder`; with `model`, refused (UsageError) unless its embeddings are that
        model's, windowed at the same hop."""
        _local(folder)
        path = os.path.join(folder, "store.json")
        if not os.path.exists(path):
            raise UsageError(f"{folder} is not an embedding store (no store.json): pass the folder an embedding "
                             "run wrote")
        try:
            with open(path, "rb") as f:
                doc = json.loads(f.read())
            version, stored = doc["version"], Model.from_json(doc["model"])
            if doc["format"] != FORMAT:
                raise ValueError(doc["format"])
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{path} is not a tagger embedding store's ({type(e).__name__}: {e}): "
                             "use another --out") from None
        if version > VERSION:
            raise UsageError(f"{folder} was written by a newer tagger (store format {version}): update tagger")
        if model is not None:
            _check_same_model(folder, stored, model)
        return cls(folder, stored)

    @classmethod
    def from_track(cls, folder, model, path, size, mtime_ns, duration, window_starts, window_embeddings,
                   window_probabilities):
        """A store of one track (a new folder): one file's embeddings, read as a library's are."""
        store = cls.create(folder, model)
        with store.writer() as w:
            w.add(path, size, mtime_ns, duration, window_starts, window_embeddings, window_probabilities)
        return store

    def _read_index(self):
        path = os.path.join(self.folder, "index.jsonl")
        if not os.path.exists(path):
            return
        shards = {}
        with open(path, "rb") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    if "failed" in entry:
                        outcome = {k: entry[k] for k in ("failed", "size", "mtime_ns")}
                    else:
                        outcome = Track(**entry)
                        if outcome.shard not in shards:
                            shards[outcome.shard] = os.path.exists(os.path.join(self.folder, outcome.shard))
                        if not shards[outcome.shard]:
                            raise FileNotFoundError(outcome.shard)
                except (ValueError, KeyError, TypeError, FileNotFoundError):
                    self.ignored += 1
                    continue
                self._latest.pop(entry["path"], None)    # re-inserted: the latest outcome's place
                self._latest[entry["path"]] = outcome
        if self.ignored:
            print(f"{self.folder}: left out {plural(self.ignored, 'index line')} (an interrupted commit or a "
                  "missing shard); their files count as not embedded", file=sys.stderr)

    def _apply(self, entries):
        for entry in entries:
            self._latest.pop(entry.path if isinstance(entry, Track) else entry["path"], None)
            if isinstance(entry, Track):
                self._latest[entry.path] = entry
            else:
                self._latest[entry["path"]] = {k: entry[k] for k in ("failed", "size", "mtime_ns")}

    def pending(self, paths, retry_failed=False):
        """The paths (local files, in the order given) that have no committed track, or whose size or
        mtime_ns differ from it: to embed. A file that failed is pending again once it changes, or with
        `retry_failed`. A path that cannot be read is pending (embedding it reports why it fails).
        Paths are keys as given: pass them the same way each run."""
        out = []
        for path in paths:
            try:
                stamp = file_stamp(path)
            except OSError:
                out.append(path)
                continue
            outcome = self._latest.get(path)
            if outcome is None:
                out.append(path)
            elif isinstance(outcome, Track):
                if (outcome.size, outcome.mtime_ns) != stamp:
                    out.append(path)
            elif retry_failed or (outcome["size"], outcome["mtime_ns"]) != stamp:
                out.append(path)
        return out

    def tracks(self):
        """The committed tracks (a path's latest, where that is not a failure), oldest commit first."""
        return [t for t in self._latest.values() if isinstance(t, Track)]

    def failed(self):
        """{path: reason} of the files whose latest outcome is a failure."""
        return {p: o["failed"] for p, o in self._latest.items() if not isinstance(o, Track)}

    def means(self):
        """(paths, (tracks, d) float32): each track's mean embedding over its windows, in `tracks()` order."""
        tracks = self.tracks()
        d = self.model.embedding_size or 0
        out = np.zeros((len(tracks), d), np.float32)
        by_shard = {}
        for i, t in enumerate(tracks):
            by_shard.setdefault(t.shard, []).append(i)
        for shard, rows in by_shard.items():
            means, wanted = self._read(shard, "means"), [tracks[i].row for i in rows]
            if max(wanted) >= len(means) or means.shape[1] != d:
                self._damaged(shard, f"its means are {means.shape}, the index wants row {max(wanted)} of {d}")
            out[rows] = means[wanted]
        return [t.path for t in tracks], out

    def windows(self, path):
        """(window_starts (w,) seconds, window_embeddings (w, d) float32, window_probabilities (w, tags)
        float32) of a committed track; KeyError for a path without one."""
        track = self._latest.get(path)
        if not isinstance(track, Track):
            raise KeyError(path)
        offsets = self._read(track.shard, "offsets")
        lo, hi = offsets[track.row], offsets[track.row + 1]
        if hi - lo != track.windows:
            self._damaged(track.shard, f"track {track.row} has {hi - lo} windows, the index says {track.windows}")
        return tuple(self._read(track.shard, key)[lo:hi]
                     for key in ("window_starts", "window_embeddings", "window_probabilities"))

    def _read(self, shard, member):
        name, arrays = self._cache
        if name != shard:
            name, arrays = shard, {}
            self._cache = (name, arrays)
        if member not in arrays:
            try:
                with np.load(os.path.join(self.folder, shard), allow_pickle=False) as z:
                    arrays[member] = z[member]
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                self._damaged(shard, f"{type(e).__name__}: {e}")
        return arrays[member]

    def _damaged(self, shard, why):
        raise UsageError(f"{os.path.join(self.folder, shard)} is damaged ({why}): delete it and run again to "
                         "embed its tracks again")

    def writer(self, shard_tracks=SHARD_TRACKS):
        """A Writer adding to this store (one at a time: a second is refused while the first is open)."""
        return Writer(self, shard_tracks)


def _local(folder):
    if files.is_remote(folder):
        raise UsageError(f"{folder} is remote: an embedding store is a local folder (it appends to its index "
                         "and syncs it); write it locally, then copy it")


def _store_json(model):
    return json.dumps({"format": FORMAT, "version": VERSION, "model": model.to_json()}, indent=1).encode()


def _check_same_model(folder, stored, model):
    if stored.fingerprint != model.fingerprint:
        a, b = stored.name, model.name
        if a == b:                   # the same name, other weights: tell them apart
            a, b = f"{a} (fingerprint {stored.fingerprint[:12]})", f"{b} ({model.fingerprint[:12]})"
        raise UsageError(f"{folder} holds embeddings of {a}, not {b}: use another --out")
    if not np.isclose(stored.hop_seconds, model.hop_seconds, rtol=0, atol=1e-9):
        raise UsageError(f"{folder} holds windows every {stored.hop_seconds:g} s, not {model.hop_seconds:g} s: "
                         f"use another --out, or --hop {stored.hop_seconds:g}")


class Writer:
    """Adds tracks to a store, a shard at a time. `add` and `fail` buffer; `commit` (every `shard_tracks`
    tracks, and on close, also when leaving its `with` block by an exception: what was added is whole)
    makes them durable. A kill loses the buffered tracks and nothing else."""

    def __init__(self, store, shard_tracks=SHARD_TRACKS):
        if shard_tracks < 1:
            raise ValueError(f"shard_tracks must be at least 1, not {shard_tracks}")
        self.store, self.shard_tracks = store, shard_tracks
        self.folder = store.folder
        self._lock = open(os.path.join(self.folder, "writer.lock"), "a")
        if fcntl is not None:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lock.close()
                raise UsageError(f"{self.folder} is being written by another process: wait for it to end, "
                                 "or use another --out") from None
        for tmp in glob.glob(os.path.join(glob.escape(self.folder), "*.tmp-*")):
            os.remove(tmp)            # a killed writer's unfinished files; we hold the lock
        # Another writer may have fixed the embedding size since this store was opened.
        with open(os.path.join(self.folder, "store.json"), "rb") as f:
            store.model = Model.from_json(json.loads(f.read())["model"])
        self._end_index_with_newline()
        numbers = [int(m.group(1)) for m in map(_SHARD.match, os.listdir(self.folder)) if m]
        self._next_shard = max(numbers, default=-1) + 1
        self._entries, self._arrays = [], []
        self.committed = 0           # tracks committed by this writer

    def _end_index_with_newline(self):
        """A kill mid-append can leave a last line without its end: cut it, or the next line would join it."""
        path = os.path.join(self.folder, "index.jsonl")
        if not os.path.exists(path):
            return
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
                f.flush()
                os.fsync(f.fileno())

    def add(self, path, size, mtime_ns, duration, window_starts, window_embeddings, window_probabilities):
        """Buffer one track: its file's size and mtime_ns (taken before decoding it), its duration in
        seconds, its windows' starts (w,) seconds, embeddings (w, d) and probabilities (w, tags)."""
        starts = np.asarray(window_starts, np.float64)
        emb = np.asarray(window_embeddings, np.float32)
        probs = np.asarray(window_probabilities, np.float32)
        d = self.store.model.embedding_size or (self._arrays[0][1].shape[1] if self._arrays else emb.shape[-1])
        tags = len(self.store.model.tags)
        if emb.ndim != 2 or not len(emb) or emb.shape[1] != d or probs.shape != (len(emb), tags) \
                or starts.shape != (len(emb),):
            raise ValueError(f"{path}: window arrays of shapes {starts.shape}, {emb.shape}, {probs.shape} do not "
                             f"fit this store: (w,), (w, {d}), (w, {tags}) with w >= 1")
        self._entries.append({"path": str(path), "size": int(size), "mtime_ns": int(mtime_ns),
                              "duration": float(duration), "windows": len(emb)})
        self._arrays.append((starts, emb, probs))
        if len(self._arrays) >= self.shard_tracks:
            self.commit()

    def fail(self, path, reason, size=None, mtime_ns=None):
        """Buffer a failure: `reason` in one line. With the file's size and mtime_ns, `pending` skips it
        until it changes; without, it is pending on every run."""
        self._entries.append({"path": str(path), "size": size, "mtime_ns": mtime_ns,
                              "failed": " ".join(str(reason).split())})

    def commit(self):
        """Write the buffered tracks' shard (temporary name, fsync, rename), then append them and the
        buffered failures to the index (fsynced)."""
        if not self._entries:
            return
        shard, lines, entries = None, [], []
        if self._arrays:
            shard = f"shard-{self._next_shard:05d}.npz"
            self._write_shard(shard)
            self._next_shard += 1
        row = 0
        for e in self._entries:
            if "failed" in e:
                entries.append(e)
            else:
                e = Track(shard=shard, row=row, **e)
                row += 1
                entries.append(e)
            lines.append(json.dumps(dataclasses.asdict(e) if isinstance(e, Track) else e) + "\n")
        with open(os.path.join(self.folder, "index.jsonl"), "ab") as f:
            f.write("".join(lines).encode())
            f.flush()
            os.fsync(f.fileno())
        self.store._apply(entries)
        self.committed += row
        self._entries, self._arrays = [], []

    def _write_shard(self, shard):
        starts, emb, probs = (np.concatenate(a) for a in zip(*self._arrays))
        model = self.store.model
        if model.embedding_size is None:        # the first commit fixes it (we hold the lock)
            model = self.store.model = dataclasses.replace(model, embedding_size=int(emb.shape[1]))
            atomic_write(os.path.join(self.folder, "store.json"), _store_json(model))
        tracks = [e for e in self._entries if "failed" not in e]
        path = os.path.join(self.folder, shard)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, paths=np.array([e["path"] for e in tracks], dtype=str),
                     durations=np.array([e["duration"] for e in tracks], np.float64),
                     means=np.stack([e.mean(axis=0) for _, e, _ in self._arrays]),   # as tag_files averages
                     offsets=np.cumsum([0] + [len(s) for s, _, _ in self._arrays]).astype(np.int64),
                     window_starts=starts, window_embeddings=emb, window_probabilities=probs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(self.folder)

    def close(self):
        """Commit what is buffered and let another writer in."""
        if self._lock.closed:
            return
        try:
            self.commit()
        finally:
            self._lock.close()       # closing the file releases the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
