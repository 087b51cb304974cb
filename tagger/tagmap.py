"""Tag maps: merge near-synonym tags (classic -> classical) or drop tags, and the report that finds them.

A map is a text file, one `old -> new` a line; `old ->` or `old -> -` drops the tag; blank lines and
lines starting with `#` are ignored. Tags the map does not name keep their names. Merged labels are
OR-ed (scores: the maximum), before the output tags are chosen (tagger.prepare --tag-map) or when
scoring a model against other tags. Nothing here imports TensorFlow.
"""
import difflib
import itertools
import os

import numpy as np

from tagger import files
from tagger.cli import UsageError

ARROW = "->"
DROP = "-"
# Candidate near-synonyms (tag_report): names alike (difflib ratio, or one the other plus a short
# suffix: vocal/vocals, classic/classical) that co-occur more than chance would have them (male vocal /
# female vocal are alike by name and rarely together), or tags that co-occur far more than chance.
NAME_RATIO = 0.8
NAME_SUFFIX = 2
NAME_LIFT = 2.0
SHARE_OF_RARER = 0.5
SHARE_OF_COMMON = 0.3
CO_LIFT = 10.0


def read(path, known_tags, known_from="the data's tags"):
    """{old: new, or None where the tag is dropped} from a tag map file.

    Every problem is a UsageError of one line naming it and the fix: no file, a line that is not
    `old -> new`, an old tag not among `known_tags` (`known_from` says where those come from), a tag
    mapped twice.
    """
    path = str(path)
    if not (files.exists(path) and (files.is_remote(path) or os.path.isfile(path))):
        raise UsageError(f"no tag map at {path}: pass --tag-map a text file of `old -> new` lines")
    try:
        text = files.read_text(path)
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a text file: a tag map is UTF-8 text, `old -> new` a line") from None
    known = set(known_tags)
    mapping, where = {}, {}
    for line_no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        old, arrow, new = (part.strip() for part in line.partition(ARROW))
        if not arrow or not old or ARROW in new:
            raise UsageError(f"{path} line {line_no}: {line!r} is not `old -> new`: write one tag a line, "
                             f"`old -> new` to rename or merge, `old ->` or `old -> -` to drop it")
        if old not in known:
            close = difflib.get_close_matches(old, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"{path} line {line_no}: {old!r} is not a tag of {known_from}{hint}: "
                             "correct the name or remove the line")
        if old in mapping:
            raise UsageError(f"{path} line {line_no}: {old!r} is mapped again (first on line {where[old]}): "
                             "keep one line per tag")
        mapping[old] = None if new in ("", DROP) else new
        where[old] = line_no
    return mapping


def apply(tags, mapping):
    """The tags after the map: (new_tags, groups).

    new_tags: the mapped names in the order each first appears, dropped tags left out; groups:
    {new_tag: [indices into tags]} of the tags merged into each.
    """
    new_tags, groups = [], {}
    for i, tag in enumerate(tags):
        new = mapping.get(tag, tag)
        if new is None:
            continue
        if new not in groups:
            groups[new] = []
            new_tags.append(new)
        groups[new].append(i)
    return new_tags, groups


def merge(matrix, tags, mapping):
    """Columns of `matrix` (... x len(tags), labels or scores) merged by the map, each group's maximum
    (OR for 0/1 labels). Returns (merged matrix, new_tags)."""
    matrix = np.asarray(matrix)
    new_tags, groups = apply(tags, mapping)
    if not new_tags:
        return np.zeros(matrix.shape[:-1] + (0,), matrix.dtype), new_tags
    return np.stack([matrix[..., groups[t]].max(axis=-1) for t in new_tags], axis=-1), new_tags


def relabel(labels, mapping):
    """A clip's set of tags after the map (merged tags once, dropped ones gone)."""
    return frozenset(mapping.get(t, t) for t in labels) - {None}


# ----------------------------------------------------------------------------------------------
# The tag report: counts per split and candidate near-synonyms, for a person to judge

def near_synonyms(tags, label_sets):
    """Candidate near-synonym pairs among `tags`, by name and by co-occurrence in `label_sets` (each
    clip's tags): [dict] with rarer `tag` and commoner `other`, `found_by`, their clip counts, `both`,
    `share_of_tag` (of the rarer's clips, those also tagged the other) and `share_of_other`."""
    counts = {t: 0 for t in tags}
    both = {}
    for labels in label_sets:
        present = [t for t in tags if t in labels]
        for t in present:
            counts[t] += 1
        for pair in itertools.combinations(present, 2):
            both[pair] = both.get(pair, 0) + 1
    clips = len(label_sets)
    pairs = []
    for a, b in itertools.combinations(tags, 2):
        n = both.get((a, b), 0)
        if not n:
            continue
        rare, common = (b, a) if counts[b] <= counts[a] else (a, b)
        lift = n * clips / (counts[a] * counts[b])
        share_rare, share_common = n / counts[rare], n / counts[common]
        found = []
        if _alike(a, b) and lift >= NAME_LIFT:
            found.append("name")
        if share_rare >= SHARE_OF_RARER and share_common >= SHARE_OF_COMMON and lift >= CO_LIFT:
            found.append("co-occurrence")
        if found:
            pairs.append({"tag": rare, "other": common, "found_by": " and ".join(found), "tag_clips": counts[rare],
                          "other_clips": counts[common], "both": n, "share_of_tag": share_rare,
                          "share_of_other": share_common})
    return sorted(pairs, key=lambda p: (p["found_by"] != "name and co-occurrence", p["found_by"] != "name",
                                        -p["share_of_tag"]))


def _alike(a, b):
    short, long = sorted((a, b), key=len)
    return (long.startswith(short) and len(long) - len(short) <= NAME_SUFFIX
            or difflib.SequenceMatcher(None, a, b).ratio() >= NAME_RATIO)


def report(plan, tags):
    """The tag report of a plan ({split: [(clip_id, path, labels)]}): (lines to print, tag_counts.tsv
    text, tag_pairs.tsv text)."""
    splits = list(plan)
    counts = {t: {s: 0 for s in splits} for t in tags}
    for s in splits:
        for _, _, labels in plan[s]:
            for t in labels:
                counts[t][s] += 1
    width = max([len(t) for t in tags] + [3])
    lines = ["Tags, positives per split:", f"  {'tag':{width}s} " + " ".join(f"{s:>7s}" for s in splits)]
    lines += [f"  {t:{width}s} " + " ".join(f"{counts[t][s]:7,}" for s in splits) for t in tags]
    pairs = near_synonyms(tags, [set(labels) for s in splits for _, _, labels in plan[s]])
    if pairs:
        lines.append("Candidate near-synonyms among them, for you to judge (merge with --tag-map FILE):")
        for p in pairs:
            lines.append(f"  {p['tag']} ~ {p['other']} (by {p['found_by']}): {p['both']:,} clips carry both, "
                         f"{p['share_of_tag']:.0%} of the {p['tag_clips']:,} {p['tag']} clips and "
                         f"{p['share_of_other']:.0%} of the {p['other_clips']:,} {p['other']} clips")
    else:
        lines.append("No candidate near-synonyms among them")
    counts_tsv = "tag\t" + "\t".join(splits) + "\n" + "".join(
        f"{t}\t" + "\t".join(str(counts[t][s]) for s in splits) + "\n" for t in tags)
    keys = ("tag", "other", "found_by", "tag_clips", "other_clips", "both", "share_of_tag", "share_of_other")
    pairs_tsv = "\t".join(keys) + "\n" + "".join(
        "\t".join(f"{p[k]:.4f}" if isinstance(p[k], float) else str(p[k]) for k in keys) + "\n" for p in pairs)
    return lines, counts_tsv, pairs_tsv
