"""The MTAT reader on the real annotations file (skipped where ../shared is absent) and on fixtures."""
import gzip
import os
from collections import Counter

import pytest

from conftest import SHARED_ANNOTATIONS
from tagger import artists, mtat

needs_real = pytest.mark.skipif(not os.path.exists(SHARED_ANNOTATIONS),
                                reason="the real annotations file (../shared/mtat) is not here")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    path = tmp_path_factory.mktemp("mtat") / "annotations_final.csv"
    path.write_bytes(gzip.decompress(open(SHARED_ANNOTATIONS, "rb").read()))
    return mtat.load_annotations(str(path))


@needs_real
def test_real_file_format(real):
    columns, clips = real
    assert len(columns) == 188
    assert len(clips) == 25863
    assert all(c.path.endswith(".mp3") and c.part in mtat.PARTS for c in clips)


@needs_real
def test_canonical_tags_are_the_50_most_frequent_in_frequency_order(real):
    columns, clips = real
    tags = mtat.select_tags(columns, clips)
    assert tags == list(mtat.CANONICAL_TAGS)
    counts = mtat.tag_counts(clips)
    by_frequency = sorted(columns, key=lambda t: -counts[t])
    assert set(tags) == set(by_frequency[:50])
    assert counts[by_frequency[49]] > counts[by_frequency[50]]  # no tie at the cut
    freqs = [counts[t] for t in tags]
    assert freqs == sorted(freqs, reverse=True)


@needs_real
@pytest.mark.parametrize("rule, sizes", [("folder", (18706, 1825, 5329)), ("clean", (15247, 1529, 4332))])
def test_split_sizes_match_the_literature(real, rule, sizes):
    columns, clips = real
    splits = mtat.split_clips(clips, mtat.CANONICAL_TAGS, rule)
    assert tuple(len(splits[s]) for s in mtat.SPLITS) == sizes
    ids = [c.clip_id for s in splits.values() for c in s]
    assert not set(ids) & set(mtat.CORRUPT_CLIPS)
    assert len(ids) == len(set(ids))
    assert {c.part for c in splits["valid"]} == {"c"}
    assert {c.part for c in splits["test"]} == set("def")
    if rule == "clean":
        assert all(c.labels & set(mtat.CANONICAL_TAGS) for s in splits.values() for c in s)


@needs_real
def test_corrupt_clips_are_in_the_release_and_left_out(real):
    _, clips = real
    by_id = {c.clip_id: c.path for c in clips}
    for clip_id, path in mtat.CORRUPT_CLIPS.items():
        assert by_id[clip_id] == path


def test_artist_is_the_file_names_first_field_with_underscores_collapsed():
    assert mtat.artist("f/american_bach_soloists-j_s__bach_solo_cantatas-01-bwv54__i_aria-30-59.mp3") == \
        "american_bach_soloists"
    assert mtat.artist("3/c__layne-the_sun_will_come_out-01-x-0-29.mp3") == mtat.artist("c/c_layne-y-02-z-30-59.mp3")
    assert mtat.artist("a/solace-balance-04-dulcimer_dance-146-175.mp3") == "solace"


def _plan(splits):
    return {s: [(c.clip_id, c.path, sorted(c.labels)) for c in cs] for s, cs in splits.items()}


@needs_real
def test_the_folder_split_shares_artists(real):
    """229 artists, 57 of them in more than one split; 3,328 of the 5,329 test clips are by an artist
    also in train."""
    _, clips = real
    plan = _plan(mtat.split_clips(clips, mtat.CANONICAL_TAGS, "folder"))
    report = artists.leakage(plan, {c.clip_id: mtat.artist(c.path) for c in clips})
    assert (report["artists"], report["shared"]) == (229, 57)
    assert (report["test_clips_with_train_artist"], report["test_clips"]) == (3328, 5329)
    assert sum(report["shared_by_pair"].values()) >= report["shared"]


@needs_real
def test_the_artist_split_keeps_artists_apart_in_the_folder_proportions(real):
    _, clips = real
    tags = mtat.CANONICAL_TAGS
    folder = mtat.split_clips(clips, tags, "folder")
    split = mtat.split_clips(clips, tags, "artist", seed=0)
    by_artist = {c.clip_id: mtat.artist(c.path) for c in clips}
    report = artists.leakage(_plan(split), by_artist)
    assert (report["shared"], report["test_clips_with_train_artist"]) == (0, 0)
    assert report["artists"] == 229
    # every clip of the folder split (all but the 3 corrupt ones), each once
    assert sorted(c.clip_id for s in split.values() for c in s) == sorted(c.clip_id for s in folder.values() for c in s)
    total = sum(len(s) for s in folder.values())
    for s in mtat.SPLITS:
        assert abs(len(split[s]) - len(folder[s])) / total <= 0.01, s
        assert [c.clip_id for c in split[s]] == sorted(c.clip_id for c in split[s])      # file order
    for s in ("valid", "test"):
        positives = {t: sum(t in c.labels for c in split[s]) for t in tags}
        assert min(positives.values()) >= artists.MIN_POSITIVES, (s, positives)
    again = mtat.split_clips(clips, tags, "artist", seed=0)
    assert all([c.clip_id for c in again[s]] == [c.clip_id for c in split[s]] for s in mtat.SPLITS)
    other = mtat.split_clips(clips, tags, "artist", seed=1)
    assert any([c.clip_id for c in other[s]] != [c.clip_id for c in split[s]] for s in mtat.SPLITS)


def test_the_artist_split_of_a_tiny_release():
    """One clip an artist: every clip placed, in the folder split's proportions."""
    clips = [mtat.Clip(i, f"{part}/a{i}-album-01-x-0-29.mp3", frozenset({"rock"} if i % 2 else {"piano"}))
             for i, part in enumerate("0000000000cddd")]
    split = mtat.split_clips(clips, ["rock", "piano"], "artist", seed=0, artist_of=mtat.artist)
    assert [len(split[s]) for s in mtat.SPLITS] == [10, 1, 3]
    assert sorted(c.clip_id for s in split.values() for c in s) == list(range(14))


def _write(tmp_path, text):
    p = tmp_path / "annotations_final.csv"
    p.write_bytes(text.encode())
    return str(p)


def test_fixture_in_release_format(tmp_path):
    rows = ['"clip_id"\t"rock"\t"piano"\t"mp3_path"', '"1"\t"1"\t"0"\t"0/a.mp3"', '"2"\t"1"\t"1"\t"c/b.mp3"',
            '"3"\t"0"\t"0"\t"f/c.mp3"']
    columns, clips = mtat.load_annotations(_write(tmp_path, "\r\n".join(rows) + "\r\n"))
    assert columns == ["rock", "piano"]
    assert [c.labels for c in clips] == [{"rock"}, {"rock", "piano"}, set()]
    tags = mtat.select_tags(columns, clips)
    assert tags == ["rock", "piano"]
    folder = mtat.split_clips(clips, tags, "folder")
    assert Counter({s: len(v) for s, v in folder.items()}) == Counter(train=1, valid=1, test=1)
    assert len(mtat.split_clips(clips, tags, "clean")["test"]) == 0


@pytest.mark.parametrize("text", ["", '"clip_id"\t"a"\r\n', '"id"\t"rock"\t"mp3_path"\r\n"1"\t"1"\t"0/a.mp3"\r\n',
                                  '"clip_id"\t"rock"\t"mp3_path"\r\n"1"\t"x"\t"0/a.mp3"\r\n',
                                  '"clip_id"\t"rock"\t"mp3_path"\r\n"1"\t"0/a.mp3"\r\n'])
def test_malformed_annotations_are_refused(tmp_path, text):
    with pytest.raises(mtat.AnnotationError):
        mtat.load_annotations(_write(tmp_path, text))
