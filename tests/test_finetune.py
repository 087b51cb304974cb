"""Fine-tuning: tagger.train --init NAME_OR_PATH [--freeze body], from a converted musicnn model and from
an export trained here, on tiny TFRecords."""
import json
import shutil

import numpy as np
import pytest

from conftest import run_cli
from tagger import models


def _retagged(records, folder):
    """A copy of the records whose manifest calls its first tag "late-night": the same labels, and a tag
    no export knows."""
    shutil.copytree(records, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["tags"][0] = "late-night"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _weights(model):
    """{layer path/weight name: array}, nested networks included."""
    return {w.path: w.numpy() for w in model.weights}


def test_the_output_layer_is_rebuilt_for_the_datas_tags_keeping_shared_rows(converted, tiny_records, tmp_path):
    """musicnn-mtt (50 tags) for the tiny data's 11: the 10 tags MTAT has keep their rows of the output
    layer (found by name, wherever they were), the new tag gets a fresh row; the body is the export's;
    with freeze="body" only the output layer trains."""
    from tagger.finetune import init_model
    from tagger.models import load_model
    folder = converted / "musicnn-mtt"
    info = json.loads((folder / "config.json").read_text())
    manifest = _retagged(tiny_records, tmp_path / "data")
    family = models.get("musicnn")
    model, shared = init_model(str(folder), info, family, manifest, "body")
    source = load_model(str(folder / "model.keras"))
    old, new = info["tags"], manifest["tags"]
    assert shared == [(old.index(t), j) for j, t in enumerate(new) if t != "late-night"] and len(shared) == 10

    head, old_head = (m.get_layer("musicnn_network").get_layer(family.head) for m in (model, source))
    kernel, bias = (w.numpy() for w in head.weights)
    old_kernel, old_bias = (w.numpy() for w in old_head.weights)
    assert kernel.shape == (old_kernel.shape[0], 11)
    for i, j in shared:
        np.testing.assert_array_equal(kernel[:, j], old_kernel[:, i])
        assert bias[j] == old_bias[i]
    assert not any(np.allclose(kernel[:, 0], old_kernel[:, i]) for i in range(50))
    ours, theirs = _weights(model), _weights(source)
    body = [k for k in ours if not k.startswith(f"{family.head}/")]
    assert len(body) == len(theirs) - 2
    for key in body:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    assert sorted(w.path for w in model.trainable_weights) == sorted(w.path for w in head.weights)

    unfrozen, _ = init_model(str(folder), info, family, manifest, "")
    assert len(unfrozen.trainable_weights) == len(source.trainable_weights)


def test_a_frozen_body_stays_the_exports_through_training(converted, tiny_records, tmp_path):
    """A linear probe on musicnn-mtt: after an epoch at the preset's learning rate every weight and
    batch-norm statistic of the body is the converted model's, bit for bit, and the output layer moved."""
    from tagger.models import load_model
    _retagged(tiny_records, tmp_path / "data")
    r = run_cli("tagger.train", "--init", converted / "musicnn-mtt", "--freeze", "body", "--data", tmp_path / "data",
                "--epochs", "1", "--batch-size", "4", "--runs-dir", tmp_path / "runs", "--models-dir",
                tmp_path / "models")
    assert r.returncode == 0, r.stderr[-3000:]
    (export,) = (tmp_path / "models").iterdir()
    assert export.name.endswith("-from-musicnn-mtt-frozenbody"), export.name
    config = json.loads((export / "config.json").read_text())
    assert config["config"]["freeze"] == "body" and config["config"]["init"] == str(converted / "musicnn-mtt")
    assert config["config"]["lr"] == models.get("musicnn").preset(False)["lr"]
    assert json.loads((export / "tags.json").read_text())[0] == "late-night"
    tuned, source = (_weights(load_model(str(m / "model.keras"))) for m in (export, converted / "musicnn-mtt"))
    head = [k for k in tuned if k.startswith("tags/")]
    assert len(head) == 2 and len(tuned) == len(source)
    for key in tuned.keys() - set(head):
        np.testing.assert_array_equal(tuned[key], source[key], err_msg=key)
    old_tags = json.loads((converted / "musicnn-mtt" / "tags.json").read_text())
    rows = [old_tags.index(t) for t in json.loads((export / "tags.json").read_text())[1:]]
    assert tuned["tags/kernel"].shape == (200, 11)
    assert np.abs(tuned["tags/kernel"][:, 1:] - source["tags/kernel"][:, rows]).max() > 1e-4    # it trained


def test_fine_tuning_a_trained_export_trains_every_layer_at_a_tenth_of_the_rate(crnn_run, tiny_records, tmp_path):
    """The same tags: the export's model as it is; every layer moves; the learning rate is the preset's
    tenth; the run name and config.json say where it started."""
    from tagger.models import load_model
    start = crnn_run[0] / "models" / "crnn"
    r = run_cli("tagger.train", "--init", start, "--data", tiny_records, "--epochs", "1", "--batch-size", "4",
                "--runs-dir", tmp_path / "runs", "--models-dir", tmp_path / "models")
    assert r.returncode == 0, r.stderr[-3000:]
    (export,) = (tmp_path / "models").iterdir()
    config = json.loads((export / "config.json").read_text())["config"]
    assert export.name.endswith("-from-crnn") and config["width"] == 0.125
    assert config["lr"] == pytest.approx(models.get("crnn").preset(False)["lr"] / 10)
    tuned, source = (_weights(load_model(str(m / "model.keras"))) for m in (export, start))
    assert tuned.keys() == source.keys()
    trained = [k for k in tuned if not k.endswith(("moving_mean", "moving_variance", "seed_generator_state"))]
    unchanged = [k for k in trained if np.array_equal(tuned[k], source[k])]
    assert not unchanged, unchanged


@pytest.mark.parametrize("args, message", [
    (["--freeze", "body"], "--freeze goes with --init"),
    (["--init", "/no/such/export"], "is neither a tagger export nor the name of one"),
    (["--init", "START", "--arch", "cnn"], "is a crnn model: leave out --arch cnn"),
    (["--init", "START", "--width", "0.5"], "--width with --init: the architecture is the export's"),
    (["--init", "START", "--gru-units", "8"], "--gru-units with --init"),
    (["--init", "START", "--freeze", "head"], "invalid choice"),
])
def test_usage_errors(args, message, crnn_run):
    args = [str(crnn_run[0] / "models" / "crnn") if a == "START" else a for a in args]
    r = run_cli("tagger.train", *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
