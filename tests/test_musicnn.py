"""musicnn's published models in tagger's layers: the conversion, and equality with the authors' own
TensorFlow graph (imported from the wheel's .meta files) on the same log-mel patches.

The wheel is fetched by the test command (`pip download --no-deps musicnn==0.1.0 -d wheels`); without it
these tests fail, naming the command."""
import os
import zipfile

import numpy as np
import pytest

from conftest import run_cli
from tagger.convert import MODELS
from tagger.reference import AuthorsGraph, musicnn_patches, musicnn_tags



def _patches():
    """Log-mel patches (187 frames x 96 bands, log10(10000 x + 1)) of silence, a loud noise burst, a
    chord and random levels: several inputs musicnn's models see in practice."""
    from tagger.features import LogMelSpectrogram
    rng = np.random.default_rng(7)
    t = np.arange(47616) / 16000
    chord = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6)) / 3
    waves = np.stack([np.zeros_like(t), np.clip(rng.standard_normal(t.size), -1, 1), 0.5 * chord,
                      0.05 * rng.standard_normal(t.size)]).astype(np.float32)
    mel = LogMelSpectrogram(16000, 512, 256, 96, compression="musicnn")(waves).numpy()
    return np.transpose(mel, (0, 2, 1))            # (batch, 187, 96), time first as musicnn


@pytest.mark.parametrize("model_name", list(MODELS))
def test_converted_models_equal_the_authors_graph(model_name, wheel, converted, tmp_path):
    """All four models, layer for layer with the checkpoint's values: the authors' graph and the
    converted export's network give the same probabilities (to 1e-5), on silence and loud input too;
    the variables are counted from the checkpoint."""
    from tagger.models import load_model
    original = AuthorsGraph(wheel, model_name)
    model = load_model(str(converted / MODELS[model_name] / "model.keras"))
    network = model.get_layer(f"{model_name.split('_')[1]}_network")
    patches = _patches()
    want = original(patches)
    got = network(patches, training=False).numpy()
    assert got.shape == want.shape == (4, 50)
    assert np.abs(got - want).max() <= 1e-5, np.abs(got - want).max()
    trainable = [v for v in original.variables if not v.endswith(("moving_mean", "moving_variance"))]
    assert len(trainable) == len(network.trainable_weights)
    count = sum(int(np.prod(original.shapes[v])) for v in trainable)
    assert count == sum(int(np.prod(w.shape)) for w in network.trainable_weights)
    assert (len(trainable), count) == {"musicnn": (42, 787159), "vgg": (24, 605748)}[model_name.split("_")[1]]


def test_conversion_records_source_figures_and_licenses(converted, wheel):
    import hashlib
    import json
    config = json.loads((converted / "musicnn-mtt" / "config.json").read_text())
    assert config["source"]["sha256"] == hashlib.sha256(open(wheel, "rb").read()).hexdigest()
    assert config["source"]["checkpoint"] == "musicnn/MTT_musicnn"
    assert config["reported_by_authors"]["roc_auc"] == pytest.approx(0.9066769, abs=1e-6)
    assert "not measured" in config["reported_by_authors"]["note"]
    assert "ISC" in config["licenses"]["code"] and "CC BY-NC-SA" in config["licenses"]["data"]
    assert json.loads((converted / "vgg-msd" / "config.json").read_text())["licenses"]["data"].endswith("Last.fm")
    tags = json.loads((converted / "musicnn-mtt" / "tags.json").read_text())
    assert tags[:3] == ["guitar", "classical", "slow"] and len(tags) == 50
    assert config["clip_samples"] == 47616 and config["window"]["samples"] == 48128


@pytest.mark.parametrize("args, message", [
    (["musicnn", "/no/such.whl"], "does not exist: fetch it with pip download"),
    (["musicnn", __file__], "is not a wheel"),
    (["musicnn", "WHEEL", "--models", "MTT_resnet"], "--models MTT_resnet: choose from"),
    (["essentia", "WHEEL"], "invalid choice"),
])
def test_convert_usage_errors(args, message, tmp_path, wheel):
    args = [wheel if a == "WHEEL" else a for a in args]
    r = run_cli("tagger.convert", *args, "--models-dir", tmp_path)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_convert_refuses_a_damaged_wheel_and_keeps_what_is_there(converted, wheel, tmp_path):
    data = bytearray(open(wheel, "rb").read())
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo("musicnn/MTT_musicnn/.index")
    data[info.header_offset + 30 + len(info.filename) + 10] ^= 0xFF      # a byte inside the stored data
    damaged = tmp_path / "damaged.whl"
    damaged.write_bytes(bytes(data))
    r = run_cli("tagger.convert", "musicnn", damaged, "--models-dir", tmp_path)
    assert r.returncode == 2 and "is damaged" in r.stderr and "download it again" in r.stderr, r.stderr
    before = os.path.getmtime(converted / "musicnn-mtt" / "saved_model.pb")
    r = run_cli("tagger.convert", "musicnn", wheel, "--models", "MTT_musicnn", "--models-dir", converted)
    assert r.returncode == 0 and "already there" in r.stderr
    assert os.path.getmtime(converted / "musicnn-mtt" / "saved_model.pb") == before


def _recordings(folder):
    """7 s recordings: a chord, a drum pattern and a sung vowel line (the demo synthesizer's voice) as
    16 kHz mono WAV files, and the chord as a 44.1 kHz stereo mp3."""
    import soundfile as sf

    from tagger import demo
    rng = np.random.default_rng(11)
    sr, n = 16000, 7 * 16000
    t = np.arange(n) / sr
    chord = sum(np.sin(2 * np.pi * f * t) for f in (196.0, 246.9, 293.7, 392.0)) * np.exp(-(t % 1.75)) * 0.08
    drums = np.zeros(n)
    for start in range(0, n, sr // 2):
        hit = np.arange(min(2400, n - start)) / sr
        drums[start:start + hit.size] += (np.sin(2 * np.pi * 60 * hit) + 0.5 * rng.standard_normal(hit.size)) * \
            np.exp(-hit * 30) * 0.4
    voice = np.concatenate([demo._note("vocal", f, sr // 2, sr, rng) for f in (220.0, 246.9, 261.6, 293.7) * 4])[:n]
    voice = 0.2 * voice / np.abs(voice).max()
    paths = {}
    for name, x in (("chord", chord), ("drums", drums), ("voice", voice)):
        paths[name] = str(folder / f"{name}.wav")
        sf.write(paths[name], x.astype(np.float32), sr, subtype="PCM_16")
    t44 = np.arange(7 * 44100) / 44100
    stereo = np.stack([sum(np.sin(2 * np.pi * f * t44) for f in (196.0, 246.9, 293.7)),
                       sum(np.sin(2 * np.pi * f * t44) for f in (246.9, 293.7, 392.0))], 1) * 0.08
    paths["mp3"] = str(folder / "chord44k.mp3")
    sf.write(paths["mp3"], stereo, 44100, format="MP3")
    return paths


@pytest.mark.parametrize("model_name", list(MODELS))
def test_tagger_predict_equals_musicnns_own_pipeline(model_name, wheel, converted, tmp_path):
    """End to end: tagger.predict's tags for whole files equal musicnn's own pipeline's (float16
    rounding of the spectrogram aside) to 1e-3 on 16 kHz mono WAV files, and to 1e-2 on a 44.1 kHz
    stereo mp3 (another decoder and resampler)."""
    import json
    paths = _recordings(tmp_path)
    original = AuthorsGraph(wheel, model_name)
    r = run_cli("tagger.predict", *paths.values(), "--model", converted / MODELS[model_name], "--format", "json",
                "--top-k", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    ours = {item["path"]: item for item in json.loads(r.stdout)}
    tags = json.loads((converted / MODELS[model_name] / "tags.json").read_text())
    for name, path in paths.items():
        got = np.array([ours[path]["tags"][t] for t in tags])
        want = musicnn_tags(original, path)
        assert np.abs(got - want).max() <= (1e-2 if name == "mp3" else 1e-3), (name, np.abs(got - want).max())


def test_predict_takes_a_converted_models_name(converted, tmp_path):
    import soundfile as sf
    sf.write(str(tmp_path / "tone.wav"), 0.1 * np.sin(np.arange(64000) / 8.0).astype(np.float32), 16000)
    r = run_cli("tagger.predict", tmp_path / "tone.wav", "--model", "vgg-mtt", "--models-dir", converted)
    assert r.returncode == 0 and "tone.wav" in r.stdout, r.stderr[-3000:]
    r = run_cli("tagger.predict", tmp_path / "tone.wav", "--model", "musicnn-xyz", "--models-dir", converted)
    assert r.returncode == 2 and "(there: musicnn-msd, musicnn-mtt, vgg-msd, vgg-mtt)" in r.stderr, r.stderr


@pytest.mark.parametrize("model_name", ["MTT_musicnn", "MTT_vgg"])
def test_embeddings_are_the_authors_penultimate_features(model_name, wheel, converted, tmp_path):
    """predict --embeddings: each window's row is the authors' penultimate features on the same patches
    (librosa's mel spectrogram kept in float32 here, so no float16 rounding between the two), the mean
    file their mean; --top-k 0 lists all 50 tags, and --plot draws them: a taller taggram than the top 5's."""
    import json

    import matplotlib.image
    paths = _recordings(tmp_path)
    wavs = [paths["chord"], paths["drums"]]
    original = AuthorsGraph(wheel, model_name)
    r = run_cli("tagger.predict", *wavs, "--model", converted / MODELS[model_name], "--format", "json",
                "--top-k", "0", "--embeddings", tmp_path / "emb", "--plot", tmp_path / "all")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [len(item["tags"]) for item in json.loads(r.stdout)] == [50, 50]
    for path in wavs:
        name = os.path.splitext(os.path.basename(path))[0]
        windows, mean = (np.load(tmp_path / "emb" / f"{name}.{kind}.npy") for kind in ("windows", "mean"))
        patches = musicnn_patches(path, float16=False)
        want = original(patches, original.features)
        assert windows.shape == want.shape and len(windows) == 2, (windows.shape, want.shape)  # 7 s: 2 patches
        assert np.abs(windows - want).max() <= 1e-4 * np.abs(want).max(), np.abs(windows - want).max()
        np.testing.assert_allclose(mean, windows.mean(axis=0), rtol=1e-6, atol=1e-7)
    r = run_cli("tagger.predict", wavs[0], "--model", converted / MODELS[model_name], "--plot", tmp_path / "top")
    assert r.returncode == 0, r.stderr[-3000:]
    tall, short = (matplotlib.image.imread(tmp_path / d / "chord.png") for d in ("all", "top"))
    assert tall.shape[0] > 2 * short.shape[0] and short.shape[1] >= 400 and short.std() > 0.05
