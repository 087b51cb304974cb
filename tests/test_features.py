"""The front-end layers against scipy and librosa, run live: eagerly and inside tf.data."""
import librosa
import numpy as np
import pytest
import scipy.signal
import tensorflow as tf

from tagger.features import PARALLEL_CLIPS, LogMelSpectrogram, Resample, slaney_mel_matrix


def _signals(n, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    chirp = 0.9 * scipy.signal.chirp(t, 50, max(t[-1], 1e-3), 7900)
    noise = rng.uniform(-1, 1, n)
    clipped = np.clip(3 * np.sin(2 * np.pi * 440 * t), -1, 1)   # full scale, sharp corners
    return np.stack([chirp, noise, clipped][:batch]).astype(np.float32)


@pytest.mark.parametrize("n", [1, 7, 1000, 1001, 1002, 1003, 46600, 64000])
def test_resample_equals_scipy_resample_poly(n):
    x = _signals(n)
    y = Resample(16000, 12000)(x).numpy()
    ref = scipy.signal.resample_poly(x.astype(np.float64), 3, 4, axis=-1)
    assert y.shape == ref.shape
    assert np.max(np.abs(y - ref)) < 1e-5


@pytest.mark.parametrize("rates", [(22050, 16000), (44100, 16000), (8000, 12000)])
def test_resample_other_rates(rates):
    x = _signals(4410)
    a, b = rates
    g = np.gcd(a, b)
    ref = scipy.signal.resample_poly(x.astype(np.float64), b // g, a // g, axis=-1)
    assert np.max(np.abs(Resample(a, b)(x).numpy() - ref)) < 1e-5


def test_resample_keeps_leading_axes():
    x = _signals(4000).reshape(3, 1, 4000).repeat(2, axis=1)
    y = Resample()(x).numpy()
    assert y.shape == (3, 2, 3000)
    np.testing.assert_allclose(y[:, 1], scipy.signal.resample_poly(x[:, 1], 3, 4, axis=-1), atol=1e-5)


def _librosa_log_mel(x):
    mel = librosa.feature.melspectrogram(y=x, sr=12000, n_fft=512, hop_length=256, n_mels=96)
    return librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)


def _assert_close_where_audible(y, ref):
    for got, want in zip(y, ref):
        audible = want > want.max() - 80.0
        assert audible.sum() >= 0.1 * audible.size   # the comparison covers a real part of the image
        assert np.max(np.abs(got - want)[audible]) < 0.01


@pytest.mark.parametrize("n", [12000, 12345, 34950])
def test_log_mel_equals_librosa(n):
    x = _signals(n)
    y = LogMelSpectrogram()(x).numpy()
    ref = np.stack([_librosa_log_mel(v) for v in x])
    assert y.shape == ref.shape == (3, 96, 1 + n // 256)
    _assert_close_where_audible(y, ref)


def test_log_mel_uncentred_with_musicnn_compression_equals_librosa():
    """musicnn's front end at 16 kHz: librosa's mel power (here uncentred frames, center=False) and
    log10(10000 x + 1); with the centring's 256 zeros added by hand, the centred spectrogram's frames."""
    x = _signals(16000)
    layer = LogMelSpectrogram(16000, 512, 256, 96, center=False, compression="musicnn")
    y = layer(x).numpy()
    for got, v in zip(y, x):
        mel = librosa.feature.melspectrogram(y=v, sr=16000, n_fft=512, hop_length=256, n_mels=96, center=False)
        want = np.log10(10000 * mel + 1)
        assert got.shape == want.shape == (96, 1 + (16000 - 512) // 256)
        np.testing.assert_allclose(got, want, atol=2e-3 * want.max())
    padded = LogMelSpectrogram(16000, 512, 256, 96, center=False, compression="musicnn")(np.pad(x, [(0, 0), (256, 256)]))
    centred = LogMelSpectrogram(16000, 512, 256, 96, compression="musicnn")(x)
    np.testing.assert_allclose(padded.numpy(), centred.numpy(), atol=1e-4)


def test_mel_matrix_equals_librosa():
    ref = librosa.filters.mel(sr=12000, n_fft=512, n_mels=96)
    np.testing.assert_allclose(slaney_mel_matrix(12000, 512, 96).T, ref, atol=1e-7)


def test_layers_inside_dataset_map_match_eager():
    x = _signals(16000)
    resample, log_mel = Resample(), LogMelSpectrogram()
    eager = log_mel(resample(x)).numpy()
    ds = tf.data.Dataset.from_tensor_slices(x).batch(3).map(lambda w: log_mel(resample(w)))
    mapped = next(iter(ds)).numpy()
    np.testing.assert_allclose(mapped, eager, atol=1e-4)
    ref = np.stack([_librosa_log_mel(scipy.signal.resample_poly(v, 3, 4)) for v in x])
    _assert_close_where_audible(mapped, ref)


def test_log_mel_with_input_rate_resamples_first():
    """The CRNN's front end: one layer taking 16 kHz, equal to librosa on scipy's resampling."""
    x = _signals(16000)
    layer = LogMelSpectrogram(input_rate=16000)
    y = layer(x).numpy()
    ref = np.stack([_librosa_log_mel(scipy.signal.resample_poly(v, 3, 4)) for v in x])
    assert y.shape == ref.shape == (3, 96, layer.num_frames(16000)) == (3, 96, 1 + 12000 // 256)
    _assert_close_where_audible(y, ref)
    # float32 FFT rounding differs with the batch size; it shows in dB only far below a clip's peak
    # (0.002 dB at -80 dB, 0.3 dB at powers of 1e-10), so compare where audible, as against librosa.
    _assert_close_where_audible(y, LogMelSpectrogram().batched(Resample()(x)).numpy())


@pytest.mark.parametrize("input_rate", [None, 16000])
def test_log_mel_clip_by_clip_equals_batched(input_rate):
    """On a CPU the traced layer loops over the clips, PARALLEL_CLIPS at a time; each keeps its place
    and its batched values, for any batch size the graph is called with."""
    layer = LogMelSpectrogram(input_rate=input_rate)
    fn = tf.function(layer, input_signature=[tf.TensorSpec((None, 12000), tf.float32)])
    ops = {op.type for op in fn.get_concrete_function().graph.get_operations()}
    assert "While" in ops or "StatelessWhile" in ops
    n = PARALLEL_CLIPS + 3
    gains = np.linspace(1.0, 0.2, n, dtype=np.float32)[:, None]      # n different clips
    x = np.concatenate([_signals(12000, seed=s) for s in range(-(-n // 3))])[:n] * gains
    for batch in (x[:1], x[:5], x[:PARALLEL_CLIPS], x):
        got = fn(batch).numpy()
        assert got.shape[0] == len(batch)
        _assert_close_where_audible(got, layer.batched(batch).numpy())


def test_layers_serialize():
    for layer in (Resample(22050, 16000), LogMelSpectrogram(16000, 1024, 512, 64),
                  LogMelSpectrogram(16000, 1024, 512, 64, input_rate=22050)):
        clone = type(layer).from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()
    x = _signals(5000)
    clone = LogMelSpectrogram.from_config(LogMelSpectrogram().get_config())
    np.testing.assert_allclose(clone(x).numpy(), LogMelSpectrogram()(x).numpy(), atol=1e-4)
