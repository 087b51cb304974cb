"""Artist-aware splits on a synthetic catalogue, the leakage report, artists.tsv."""
import numpy as np
import pytest

from tagger import artists
from tagger.cli import UsageError

FRACTIONS = (0.7, 0.1, 0.2)


def _catalogue(seed=0, groups=150, tags=8):
    """Artists of 1 to 60 clips, each with its own leaning towards each tag, so tags cluster by artist;
    the last tag only five artists use (as MTAT's choral or sitar: a few artists carry most of them)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 61, groups)
    leaning = rng.beta(0.3, 2.0, (groups, tags))
    leaning[:, -1] = 0
    leaning[rng.choice(groups, 5, replace=False), -1] = 0.5
    group_of = np.repeat(np.arange(groups), sizes)
    labels = rng.random((len(group_of), tags)) < leaning[group_of]
    return [f"artist{g}" for g in group_of], labels.astype(int)


def _chi2(where, labels, fractions):
    """Squared distance from proportional tag counts: sum over splits and tags of (n - expected)^2 / expected."""
    total = labels.sum(0)
    return sum((((labels[where == s].sum(0) - f * total) ** 2) / (f * total)).sum() for s, f in enumerate(fractions))


def test_stratified_split_keeps_artists_whole_in_proportion_and_stratified():
    groups, labels = _catalogue()
    where = artists.stratified_split(groups, labels, FRACTIONS, seed=0)
    assert where.shape == (len(groups),)
    split_of = {}
    for g, s in zip(groups, where):
        assert split_of.setdefault(g, s) == s, f"{g} is in two splits"
    shares = np.bincount(where, minlength=3) / len(where)
    np.testing.assert_allclose(shares, FRACTIONS, atol=0.01)
    for s in (1, 2):
        assert labels[where == s].sum(0).min() >= artists.MIN_POSITIVES
    # better stratified than whole artists dealt out at random in the same proportions
    rng = np.random.default_rng(1)
    names = sorted(set(groups))
    random_chi2 = []
    for _ in range(20):
        order = rng.permutation(names)
        cut = np.cumsum([groups.count(g) for g in order]) / len(groups)
        split_of = {g: int(np.searchsorted(np.cumsum(FRACTIONS), c - 1e-9)) for g, c in zip(order, cut)}
        random_chi2.append(_chi2(np.array([split_of[g] for g in groups]), labels, FRACTIONS))
    assert _chi2(where, labels, FRACTIONS) < min(random_chi2)


def test_stratified_split_is_deterministic_for_a_seed():
    groups, labels = _catalogue(seed=3)
    first = artists.stratified_split(groups, labels, FRACTIONS, seed=7)
    np.testing.assert_array_equal(first, artists.stratified_split(groups, labels, FRACTIONS, seed=7))
    assert (first != artists.stratified_split(groups, labels, FRACTIONS, seed=8)).any()


def test_a_split_with_no_share_stays_empty():
    groups, labels = _catalogue(groups=40)
    where = artists.stratified_split(groups, labels, (0.8, 0.0, 0.2))
    assert not (where == 1).any() and (where == 0).any() and (where == 2).any()


def test_leakage_counts_artists_across_splits():
    # a: train and test; b: all three; c: valid only; d: test only
    plan = {"train": [(1, "", []), (2, "", []), (3, "", [])], "valid": [(4, "", []), (5, "", [])],
            "test": [(6, "", []), (7, "", []), (8, "", []), (9, "", [])]}
    by = {1: "a", 2: "b", 3: "b", 4: "b", 5: "c", 6: "a", 7: "b", 8: "d", 9: "d"}
    assert artists.leakage(plan, by) == {
        "artists": 4, "shared": 2, "shared_by_pair": {"train/valid": 1, "train/test": 2, "valid/test": 1},
        "test_clips": 4, "test_clips_with_train_artist": 2}
    assert artists.leakage(plan, None) is None
    assert "not known" in artists.leakage_line(None)


def test_artists_tsv_round_trip(tmp_path):
    plan = {"train": [(3, "0/x.mp3", [])], "valid": [(1, "c/y.mp3", [])], "test": [(2, "d/z.mp3", [])]}
    by = {3: "c_layne", 1: "the artist", 2: "c_layne"}
    assert artists.read_artists(tmp_path) is None
    (tmp_path / artists.FILE).write_text(artists.tsv_text(plan, by))
    assert (tmp_path / artists.FILE).read_text().splitlines()[:2] == ["clip_id\tartist", "3\tc_layne"]
    assert artists.read_artists(str(tmp_path) + "/") == by
    (tmp_path / artists.FILE).write_text("id,artist\n1,a\n")
    with pytest.raises(UsageError, match="not an artists file"):
        artists.read_artists(tmp_path)
