"""Plans: which clips go into which split, with which labels, from MTAT-format annotations or a CSV.

The tag map is applied to each clip's labels first, then the output tags are chosen, the split made,
and --min-count applied to the train split's counts. Nothing here imports TensorFlow.
"""
import os
import random
from collections import Counter
from dataclasses import dataclass, field, replace

from tagger import artists, demo, mtat, tagmap
from tagger.cli import UsageError


@dataclass
class Plan:
    """What will be converted: {split: [(clip_id, path, [tag, ...])]} and the output tags, with what
    the manifest says about them."""
    splits: dict
    tags: list
    artists: dict = None         # {clip_id: artist}; None where unknown
    tag_map: dict = None         # the map applied, {old: new or None}
    seeded: bool = False         # the split depends on --seed
    dropped: list = field(default_factory=list)    # output tags below --min-count


def mtat_plan(annotations_path, split_rule, top_tags, seed=0, tag_map=None):
    """The plan of an MTAT-format annotations file; `tag_map` is a map file's path."""
    if not os.path.isfile(annotations_path):
        raise UsageError(f"no annotations file at {annotations_path}: point --mtat-dir at the unzipped "
                         "release (annotations_final.csv beside the part folders 0-f)")
    try:
        columns, clips = mtat.load_annotations(annotations_path)
    except (mtat.AnnotationError, UnicodeDecodeError) as e:
        raise UsageError(f"{annotations_path} is not a MagnaTagATune annotations file: {e}") from None
    mapping = None
    if tag_map:
        mapping = tagmap.read(tag_map, columns, f"{annotations_path} (its tag columns)")
        columns = tagmap.apply(columns, mapping)[0]
        clips = [replace(c, labels=tagmap.relabel(c.labels, mapping)) for c in clips]
    # a release the demo generator wrote (--source demo, or --source mtat on its folder): a clip an artist
    artist_of = demo.artist if demo.is_demo_release(c.path for c in clips) else mtat.artist
    tags = mtat.select_tags(columns, clips, top_tags, canonical=mapping is None)
    splits = mtat.split_clips(clips, tags, split_rule, seed, artist_of)
    wanted = set(tags)
    return Plan({s: [(c.clip_id, c.path, sorted(c.labels & wanted, key=tags.index)) for c in cs]
                 for s, cs in splits.items()}, tags,
                artists={c.clip_id: artist_of(c.path) for cs in splits.values() for c in cs},
                tag_map=mapping, seeded=split_rule == "artist")


def csv_plan(csv_path, seed, top_tags, tag_map=None):
    """The plan of a user CSV: columns path, tags (';'-separated), optional split and artist.

    Rows without a split get a seeded 80/10/10 one: row by row, or where the CSV names artists, artist
    by artist, so that no artist is in two splits by chance.
    """
    import csv
    if not os.path.isfile(csv_path):
        raise UsageError(f"no CSV file at {csv_path}: pass --csv with a file of columns path,tags[,split][,artist]")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "tags"} <= set(reader.fieldnames):
            raise UsageError(f"{csv_path} needs a header with columns path and tags (and optionally split, artist)")
        has_artist = "artist" in reader.fieldnames
        rows = list(reader)
    if not rows:
        raise UsageError(f"{csv_path} lists no files")
    entries = []
    for i, row in enumerate(rows, 1):
        labels = [t.strip() for t in (row.get("tags") or "").split(";") if t.strip()]
        split = (row.get("split") or "").strip()
        if split and split not in mtat.SPLITS:
            raise UsageError(f"{csv_path} line {i + 1}: split {split!r} must be train, valid or test")
        artist = " ".join((row.get("artist") or "").split())
        if has_artist and not artist:
            raise UsageError(f"{csv_path} line {i + 1} names no artist: fill in every row's artist, or leave the "
                             "artist column out")
        entries.append((i, row["path"].strip(), labels, split, artist))
    mapping = None
    if tag_map:
        mapping = tagmap.read(tag_map, {t for e in entries for t in e[2]}, f"{csv_path} (its tags column)")
        entries = [(i, path, sorted(tagmap.relabel(labels, mapping)), split, artist)
                   for i, path, labels, split, artist in entries]
    counts = Counter(t for e in entries for t in e[2])
    tags = sorted(counts, key=lambda t: (-counts[t], t))[:top_tags]
    rng = random.Random(seed)
    drawn = {}

    def draw():
        r = rng.random()
        return "train" if r < 0.8 else "valid" if r < 0.9 else "test"
    plan = {s: [] for s in mtat.SPLITS}
    for clip_id, path, labels, split, artist in entries:
        if not split:
            split = drawn.setdefault(artist, draw()) if has_artist else draw()
        plan[split].append((clip_id, path, [t for t in tags if t in labels]))
    return Plan(plan, tags, artists={e[0]: e[4] for e in entries} if has_artist else None, tag_map=mapping,
                seeded=any(not e[3] for e in entries))


def apply_min_count(plan, min_count):
    """Leave out the output tags with fewer than `min_count` positives in the train split."""
    if not min_count:
        return plan
    train = Counter(t for _, _, labels in plan.splits["train"] for t in labels)
    kept = [t for t in plan.tags if train[t] >= min_count]
    if plan.tags and not kept:
        most = max(train.values(), default=0)
        raise UsageError(f"--min-count {min_count} leaves no tag (the most frequent has {most} positives in train): "
                         "lower it")
    keep = set(kept)
    splits = {s: [(i, path, [t for t in labels if t in keep]) for i, path, labels in entries]
              for s, entries in plan.splits.items()}
    return replace(plan, splits=splits, tags=kept, dropped=[t for t in plan.tags if t not in keep])


def notes(plan, min_count):
    """What the manifest records of the plan beyond its clips: artist leakage, the tag map, --min-count,
    and the tags with few positives in valid or test."""
    return {"leakage": artists.leakage(plan.splits, plan.artists), "tag_map": plan.tag_map, "min_count": min_count,
            "tags_dropped": plan.dropped,
            "few_positives": {"minimum": artists.MIN_POSITIVES,
                              "tags": artists.short_tags(plan.splits, plan.tags, artists.MIN_POSITIVES)}}
