"""The MagnaTagATune release: its annotations file, the canonical 50 tags, artists and the splits.

`annotations_final.csv` is tab-separated with every field double-quoted and CRLF line endings:
`clip_id`, 188 tag columns, `mp3_path`. Audio lives in 16 part folders (0-9, a-f), named by the
first character of `mp3_path`.
"""
import csv
import io
import re
from collections import Counter
from dataclasses import dataclass

# The 50 most frequent tags in the order musicnn, Won et al. (2020) and JukeMIR use: frequency
# order with ties as listed here, so our output columns line up with theirs.
CANONICAL_TAGS = (
    "guitar", "classical", "slow", "techno", "strings", "drums", "electronic", "rock", "fast",
    "piano", "ambient", "beat", "violin", "vocal", "synth", "female", "indian", "opera", "male",
    "singing", "vocals", "no vocals", "harpsichord", "loud", "quiet", "flute", "woman", "male vocal",
    "no vocal", "pop", "soft", "sitar", "solo", "man", "classic", "choir", "voice", "new age", "dance",
    "male voice", "female vocal", "beats", "harp", "cello", "no voice", "weird", "country", "metal",
    "female voice", "choral",
)

# Documented as corrupt in the release; left out of every split.
CORRUPT_CLIPS = {
    35644: "6/norine_braun-now_and_zen-08-gently-117-146.mp3",
    55753: "8/jacob_heringman-josquin_des_prez_lute_settings-19-gintzler__pater_noster-204-233.mp3",
    57881: "9/american_baroque-dances_and_suites_of_rameau_and_couperin-25-le_petit_rien_xiveme_ordre"
           "_couperin-88-117.mp3",
}

PARTS = {**{p: "train" for p in "0123456789ab"}, "c": "valid", **{p: "test" for p in "def"}}
SPLITS = ("train", "valid", "test")
SPLIT_RULES = ("folder", "clean", "artist")
SPLIT_HELP = ("folder: the release's part folders (train 0-b, valid c, test d-f), every clip; clean: the same, only "
              "clips with at least one of the tags; artist: whole artists to each split (seeded by --seed), stratified "
              "by tag, in the folder split's proportions, so no artist is in two splits")


class AnnotationError(ValueError):
    """The annotations file is missing a column, malformed or empty."""


@dataclass(frozen=True)
class Clip:
    clip_id: int
    path: str           # relative to the audio root, as in the annotations (e.g. "f/x-y-0-29.mp3")
    labels: frozenset   # the clip's tags, all 188 of them

    @property
    def part(self):
        return self.path.split("/", 1)[0]


def artist(path):
    """The artist of an MTAT clip: its file name up to the first `-`, runs of `_` as one (the release
    spells some artists both ways: c__layne and c_layne)."""
    return re.sub("_+", "_", path.rsplit("/", 1)[-1].split("-", 1)[0])


def read_annotations(text):
    """Parse the text of `annotations_final.csv`. Returns (tag_columns, [Clip])."""
    rows = list(csv.reader(io.StringIO(text.replace("\r\n", "\n")), delimiter="\t"))
    if not rows or not rows[0]:
        raise AnnotationError("the annotations file is empty")
    header = rows[0]
    if header[0] != "clip_id" or header[-1] != "mp3_path" or len(header) < 3:
        raise AnnotationError("expected a tab-separated header `clip_id <tags...> mp3_path`, got "
                              f"{' '.join(header[:2])} ... {header[-1]}")
    tags = header[1:-1]
    clips = []
    for line_no, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != len(header):
            raise AnnotationError(f"line {line_no} has {len(row)} fields, the header {len(header)}")
        try:
            clip_id = int(row[0])
            flags = [int(v) for v in row[1:-1]]
        except ValueError:
            raise AnnotationError(f"line {line_no}: clip_id and tag fields must be integers") from None
        clips.append(Clip(clip_id, row[-1], frozenset(t for t, f in zip(tags, flags) if f)))
    if not clips:
        raise AnnotationError("the annotations file lists no clips")
    return tags, clips


def load_annotations(path):
    """Read `annotations_final.csv` (or a `.gz` of it) from a local or gfile path."""
    if str(path).endswith(".gz"):
        import gzip
        with open(path, "rb") as f:
            return read_annotations(gzip.decompress(f.read()).decode("utf-8"))
    with open(path, encoding="utf-8", newline="") as f:
        return read_annotations(f.read())


def tag_counts(clips):
    return Counter(t for c in clips for t in c.labels)


def select_tags(tag_columns, clips, top_n=50, canonical=True):
    """The model's output tags, in output order.

    The real release gets the canonical 50 (CANONICAL_TAGS); any other annotations (the demo, a
    subset, or the release's labels after a tag map: `canonical` False) get their `top_n` most
    frequent tags, ties in column order.
    """
    if canonical and top_n == 50 and set(CANONICAL_TAGS) <= set(tag_columns):
        return list(CANONICAL_TAGS)
    counts = tag_counts(clips)
    order = sorted(range(len(tag_columns)), key=lambda i: (-counts[tag_columns[i]], i))
    return [tag_columns[i] for i in order[:top_n] if counts[tag_columns[i]] > 0]


def split_clips(clips, tags, rule="folder", seed=0, artist_of=artist):
    """Assign clips to train, valid and test.

    rule "folder": parts 0-b train, c valid, d-f test, every clip; "clean": the same, only clips with at
    least one of `tags`; "artist": the folder split's clips, each artist (`artist_of(path)`) whole in
    one split, seeded, stratified by `tags` (tagger.artists.stratified_split) in the folder split's
    proportions. The release's three corrupt clips are always left out. Returns {split: [Clip]} in
    file order.
    """
    if rule not in SPLIT_RULES:
        raise ValueError(f"unknown split rule {rule!r}: choose one of {', '.join(SPLIT_RULES)}")
    wanted = set(tags)
    out = {s: [] for s in SPLITS}
    kept = []
    for clip in clips:
        split = PARTS.get(clip.part)
        if split is None or CORRUPT_CLIPS.get(clip.clip_id) == clip.path:
            continue
        if rule == "clean" and not clip.labels & wanted:
            continue
        out[split].append(clip)
        kept.append(clip)
    if rule == "artist" and kept:
        from tagger.artists import stratified_split
        labels = [[t in c.labels for t in tags] for c in kept]
        where = stratified_split([artist_of(c.path) for c in kept], labels, [len(out[s]) for s in SPLITS], seed)
        out = {s: [c for c, w in zip(kept, where) if w == i] for i, s in enumerate(SPLITS)}
    return out
