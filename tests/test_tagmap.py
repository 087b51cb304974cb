"""Tag maps: reading (and refusing) map files, applying and merging, near-synonym candidates."""
import numpy as np
import pytest

from tagger import tagmap
from tagger.cli import UsageError

KNOWN = ["classic", "classical", "woman", "female", "vocals", "vocal", "rock"]


def _map(tmp_path, text):
    path = tmp_path / "synonyms.tagmap"
    path.write_text(text)
    return str(path)


def test_read_takes_renames_merges_drops_and_ignores_comments(tmp_path):
    path = _map(tmp_path, "# merge the synonyms\n\n  classic ->   classical \nwoman->female\nvocals ->\n"
                          "  # indented comment\nrock -> -\n")
    assert tagmap.read(path, KNOWN) == {"classic": "classical", "woman": "female", "vocals": None, "rock": None}


@pytest.mark.parametrize("text, words", [
    (None, ["no tag map at", "--tag-map"]),
    ("classic -> classical\nwoman = female\n", ["line 2", "'woman = female'", "old -> new"]),
    ("classic -> classical\n -> rock\n", ["line 2"]),
    ("classic -> classical -> old\n", ["line 1"]),
    ("clasical -> classical\n", ["line 1", "'clasical'", "annotations_final.csv (its tag columns)",
                                 "did you mean 'classical'"]),
    ("classic -> classical\nwoman -> female\nclassic -> -\n", ["line 3", "'classic' is mapped again", "line 1"]),
])
def test_read_refuses_a_bad_map_in_one_line(tmp_path, text, words):
    path = str(tmp_path / "absent.tagmap") if text is None else _map(tmp_path, text)
    with pytest.raises(UsageError) as e:
        tagmap.read(path, KNOWN, "annotations_final.csv (its tag columns)")
    message = str(e.value)
    assert "\n" not in message and path in message
    assert all(w in message for w in words), message


def test_apply_orders_by_first_appearance_and_groups_the_merged():
    new_tags, groups = tagmap.apply(KNOWN, {"classic": "classical", "woman": "female", "vocals": None,
                                            "rock": "stone"})
    assert new_tags == ["classical", "female", "vocal", "stone"]
    assert groups == {"classical": [0, 1], "female": [2, 3], "vocal": [5], "stone": [6]}
    assert tagmap.apply(KNOWN, {}) == (KNOWN, {t: [i] for i, t in enumerate(KNOWN)})


def test_merge_is_or_for_labels_and_max_for_scores():
    rng = np.random.default_rng(0)
    mapping = {"classic": "classical", "woman": "female", "vocals": None}
    members = {"classical": ["classic", "classical"], "female": ["woman", "female"], "vocal": ["vocal"],
               "rock": ["rock"]}
    labels = rng.integers(0, 2, (40, len(KNOWN)))
    merged, new_tags = tagmap.merge(labels, KNOWN, mapping)
    assert new_tags == list(members)
    for j, t in enumerate(new_tags):
        expected = np.zeros(40, bool)
        for old in members[t]:
            expected |= labels[:, KNOWN.index(old)].astype(bool)
        np.testing.assert_array_equal(merged[:, j], expected.astype(labels.dtype))
    scores = rng.random((3, 5, len(KNOWN))).astype(np.float32)      # any leading shape: clips, pieces
    merged, _ = tagmap.merge(scores, KNOWN, mapping)
    assert merged.dtype == np.float32 and merged.shape == (3, 5, 4)
    np.testing.assert_array_equal(merged[..., 1], np.maximum(scores[..., 2], scores[..., 3]))
    empty, none = tagmap.merge(scores, KNOWN, {t: None for t in KNOWN})
    assert none == [] and empty.shape == (3, 5, 0)


def test_relabel_merges_and_drops():
    assert tagmap.relabel({"classic", "classical", "vocals", "rock"}, {"classic": "classical", "vocals": None}) == \
        {"classical", "rock"}


def test_near_synonyms_by_name_need_co_occurrence():
    """vocal/vocals are alike and often together; male vocal/female vocal are alike and never together;
    choir/choral are unalike by name and nearly always together."""
    tags = ["vocal", "vocals", "male vocal", "female vocal", "choir", "choral", "rock"]
    clips = ([{"vocal", "vocals"}] * 30 + [{"vocal"}] * 30 + [{"vocals"}] * 20 + [{"male vocal"}] * 40
             + [{"female vocal"}] * 40 + [{"choir", "choral"}] * 9 + [{"choir"}] * 3 + [{"rock"}] * 300)
    found = {(p["tag"], p["other"]): p for p in tagmap.near_synonyms(tags, clips)}
    assert set(found) == {("vocals", "vocal"), ("choral", "choir")}
    assert found["vocals", "vocal"]["found_by"] == "name"
    assert found["vocals", "vocal"]["share_of_tag"] == 30 / 50 and found["vocals", "vocal"]["share_of_other"] == 30 / 60
    assert found["choral", "choir"]["found_by"] == "co-occurrence" and found["choral", "choir"]["both"] == 9
