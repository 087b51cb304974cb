"""Artists: splits that keep each artist's clips together, the leakage report, and artists.tsv.

A model tested on clips by artists it was trained on is partly recognising the artists (their voice,
their studio), so its scores on such a split are optimistic. MTAT's folder split puts 57 of its 229
artists in more than one split, and 3,328 of its 5,329 test clips are by an artist also in train.
`stratified_split` assigns whole artists to the splits, stratified by tag; `leakage` counts what a
split shares. Nothing here imports TensorFlow.
"""
import numpy as np

from tagger import files
from tagger.cli import UsageError

FILE = "artists.tsv"
SPLITS = ("train", "valid", "test")
MIN_POSITIVES = 10


# ----------------------------------------------------------------------------------------------
# The split

def stratified_split(groups, labels, fractions, seed=0, min_positives=MIN_POSITIVES):
    """Assign each group (an artist) whole to one split, stratified by tag.

    First greedy iterative stratification over the groups (Sechidis et al. 2011): the tag with the
    fewest positives left first, its groups (the largest first) each to the split that most lacks that
    tag. Then a local search moves and swaps groups between splits while that lowers its cost: first
    clips beyond half a percentage point of each split's share, then positives missing below
    `min_positives` of each tag in each split, then the squared distance from proportional tag and
    clip counts. The seed orders groups that tie.

    Args:
        groups: the group of each clip (N hashable values).
        labels: N x T array of 0/1 labels.
        fractions: each split's share of the clips (a split with share 0 stays empty).
    Returns:
        the split index (into `fractions`) of each clip, an int array.
    """
    labels = np.asarray(labels, dtype=float).reshape(len(groups), -1)
    names = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    member = np.array([names[g] for g in groups], dtype=int)
    count = len(names)
    size = np.bincount(member, minlength=count).astype(float)
    pos = np.zeros((count, labels.shape[1]))
    np.add.at(pos, member, labels)
    frac = np.asarray(fractions, dtype=float) / sum(fractions)
    cost = _Cost(frac, pos.sum(0), size.sum(), min_positives)
    assign = _greedy(pos, size, cost, np.random.default_rng(seed))
    assign = _local_search(pos, size, assign, cost)
    return assign[member]


class _Cost:
    """A split's cost, for the rows of its tag counts `p` (... x T) and clip counts `n` (...)."""

    SHARE = 1e6        # a clip beyond the share's tolerance: the proportions first,
    FLOOR = 1e3        # then a positive missing below the floor, then the squared distances
    TOLERANCE = 0.005  # of all clips: half a percentage point

    def __init__(self, frac, totals, clips, min_positives):
        self.want_pos = frac[:, None] * totals[None, :]
        self.want_size = frac * clips
        # where a tag has too few positives for every split's floor, the floor is what it can reach
        used = max(1, int((frac > 0).sum()))
        self.need = np.where(frac[:, None] > 0, np.minimum(min_positives, totals[None, :] // used), 0)
        self.tolerance = self.TOLERANCE * clips

    def __call__(self, s, p, n):
        want_pos, want_size = self.want_pos[s], self.want_size[s]
        return (self.FLOOR * np.maximum(self.need[s] - p, 0).sum(-1)
                + self.SHARE * np.maximum(np.abs(n - want_size) - self.tolerance, 0)
                + ((p - want_pos) ** 2 / np.maximum(want_pos, 1)).sum(-1)
                + (n - want_size) ** 2 / np.maximum(want_size, 1))


def _greedy(pos, size, cost, rng):
    splits = len(cost.want_size)
    assign = np.full(len(size), -1)
    cur_pos = np.zeros((splits, pos.shape[1]))
    cur_size = np.zeros(splits)
    order = rng.permutation(len(size))

    def place(g, s):
        assign[g] = s
        cur_pos[s] += pos[g]
        cur_size[s] += size[g]

    while (assign < 0).any():
        left = order[assign[order] < 0]
        remaining = pos[left].sum(0)
        if remaining.any():
            tag = int(np.argmin(np.where(remaining > 0, remaining, np.inf)))
            carriers = sorted((g for g in left if pos[g, tag] > 0), key=lambda g: -pos[g, tag])  # stable: ties by seed
            for g in carriers:
                demand = np.maximum(cost.want_pos[:, tag], cost.need[:, tag]) - cur_pos[:, tag]
                room = cost.want_size - cur_size
                place(g, int(np.lexsort((-room, -demand))[0]))
        else:
            for g in sorted(left, key=lambda g: -size[g]):
                place(g, int(np.argmax(cost.want_size - cur_size)))
    return assign


def _local_search(pos, size, assign, cost, max_steps=2000):
    """Best-improvement moves of one group, then swaps of two, until neither lowers the cost."""
    splits = len(cost.want_size)
    cur_pos = np.stack([pos[assign == s].sum(0) for s in range(splits)])
    cur_size = np.array([size[assign == s].sum() for s in range(splits)])
    for _ in range(max_steps):
        base = np.array([cost(s, cur_pos[s], cur_size[s]) for s in range(splits)])
        best, change = -1e-9, None
        for b in range(splits):                         # move g from its split a to b
            a = assign
            delta = (cost(a, cur_pos[a] - pos, cur_size[a] - size) + cost(b, cur_pos[b] + pos, cur_size[b] + size)
                     - base[a] - base[b])
            delta[a == b] = np.inf
            g = int(np.argmin(delta))
            if delta[g] < best:
                best, change = delta[g], ((g, b),)
        if change is None:
            for a in range(splits):                     # swap g (in a) and h (in b)
                for b in range(a + 1, splits):
                    ga, gb = np.flatnonzero(assign == a), np.flatnonzero(assign == b)
                    if not len(ga) or not len(gb):
                        continue
                    dp = pos[ga][:, None, :] - pos[gb][None, :, :]
                    dn = size[ga][:, None] - size[gb][None, :]
                    delta = (cost(a, cur_pos[a] - dp, cur_size[a] - dn) + cost(b, cur_pos[b] + dp, cur_size[b] + dn)
                             - base[a] - base[b])
                    i, j = np.unravel_index(int(np.argmin(delta)), delta.shape)
                    if delta[i, j] < best:
                        best, change = delta[i, j], ((ga[i], b), (gb[j], a))
        if change is None:
            break
        for g, b in change:
            cur_pos[assign[g]] -= pos[g]
            cur_size[assign[g]] -= size[g]
            cur_pos[b] += pos[g]
            cur_size[b] += size[g]
            assign[g] = b
    return assign


def short_tags(plan, tags, minimum=MIN_POSITIVES):
    """{tag: {split: positives}} for the tags with fewer than `minimum` positives in valid or test."""
    short = {}
    for t in tags:
        counts = {s: sum(t in labels for _, _, labels in plan[s]) for s in ("valid", "test")}
        if min(counts.values()) < minimum:
            short[t] = counts
    return short


# ----------------------------------------------------------------------------------------------
# What a split shares

def leakage(plan, artists):
    """What the splits of `plan` ({split: [(clip_id, path, labels)]}) share, by `artists` ({clip_id:
    artist}); None where the artists are unknown.

    Returns {"artists": how many, "shared": artists in more than one split, "shared_by_pair":
    {"train/valid": n, "train/test": n, "valid/test": n}, "test_clips": n, "test_clips_with_train_artist": n}.
    """
    if artists is None:
        return None
    by_split = {s: {artists[clip_id] for clip_id, _, _ in plan[s]} for s in SPLITS}
    every = set().union(*by_split.values())
    pairs = [(a, b) for i, a in enumerate(SPLITS) for b in SPLITS[i + 1:]]
    return {
        "artists": len(every),
        "shared": sum(sum(a in by_split[s] for s in SPLITS) > 1 for a in every),
        "shared_by_pair": {f"{a}/{b}": len(by_split[a] & by_split[b]) for a, b in pairs},
        "test_clips": len(plan["test"]),
        "test_clips_with_train_artist": sum(artists[c] in by_split["train"] for c, _, _ in plan["test"]),
    }


def leakage_line(report, unknown_why="artists unknown"):
    """The leakage report in a line, for the terminal."""
    if report is None:
        return f"Artist leakage: not known ({unknown_why})"
    pairs = ", ".join(f"{k} {v:,}" for k, v in report["shared_by_pair"].items())
    return (f"Artist leakage: {report['shared']:,} of {report['artists']:,} artists in more than one split ({pairs}); "
            f"{report['test_clips_with_train_artist']:,} of {report['test_clips']:,} test clips by an artist also "
            "in train")


# ----------------------------------------------------------------------------------------------
# artists.tsv beside the TFRecords

def tsv_text(plan, artists):
    """artists.tsv: `clip_id<TAB>artist`, one line per planned clip, train then valid then test."""
    return "clip_id\tartist\n" + "".join(f"{clip_id}\t{artists[clip_id]}\n"
                                         for s in SPLITS for clip_id, _, _ in plan[s])


def read_artists(data_dir):
    """{clip_id: artist} from `data_dir`/artists.tsv (written by tagger.prepare), None where there is none.

    `data_dir` may be local or gs://... (read through tf.io.gfile, imported only then).
    """
    path = f"{str(data_dir).rstrip('/')}/{FILE}"
    if not files.exists(path):
        return None
    lines = files.read_text(path).splitlines()
    if not lines or lines[0] != "clip_id\tartist":
        raise UsageError(f"{path} is not an artists file (header clip_id<TAB>artist): prepare the data again")
    out = {}
    for line_no, line in enumerate(lines[1:], 2):
        clip_id, sep, artist = line.partition("\t")
        if not sep or not clip_id.isdigit():
            raise UsageError(f"{path} line {line_no} is not `clip_id<TAB>artist`: prepare the data again")
        out[int(clip_id)] = artist
    return out
