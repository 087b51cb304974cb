"""The benchmark's arithmetic and arguments (its speeds are measured by running it, never asserted)."""
import pytest

from conftest import run_cli
from tagger.bench import summarize, table
from tagger.models.cnn import build_cnn
from tagger.models.flops import forward_flops


def test_cnn_flops_per_clip_worked_out_by_hand():
    # 10 sub-clips of 46,600 samples, 256/256: 182 frames -> 45 -> 11 time steps, 32 filters.
    strided = 2 * 256 * 32 * 182
    conv1 = 2 * 8 * 32 * 32 * 182
    conv2 = 2 * 8 * 32 * 32 * 45
    dense = 2 * 11 * 32 * 100 + 2 * 100 * 50
    assert forward_flops(build_cnn(50, 46600)) == 10 * (strided + conv1 + conv2 + dense)


def _round(stage, key, values, rss, **extra):
    return [{f"{key}_clips_per_s": v, f"{stage}_peak_rss_mb": m, **extra} for v, m in zip(values, rss)]


def test_summary_takes_medians_and_ratios_round_by_round():
    """Rounds run minutes apart on a machine whose speed drifts: each ratio compares one round's runs."""
    runs = {
        "pipeline": [{"pipeline_sub_clips_clips_per_s": c, "pipeline_whole_clip_clips_per_s": c + 1,
                      "pipeline_sub_clips_shape": "10x46592", "pipeline_peak_rss_mb": 600.0} for c in (400.0, 900.0, 500.0)],
        "frontend": _round("frontend", "frontend", (100.0, 300.0, 120.0), (500.0, 520.0, 510.0)),
        "librosa": _round("librosa", "librosa", (10.0, 20.0, 50.0), (200.0, 200.0, 200.0)),
        "cnn_train": _round("cnn_train", "cnn_train", (300.0, 600.0, 330.0), (580.0, 590.0, 585.0),
                            cnn_forward_flops_per_clip=1e8),
        "crnn_train": _round("crnn_train", "crnn_train", (4.0, 8.0, 5.0), (3600.0, 3700.0, 3650.0),
                             crnn_forward_flops_per_clip=6e9),
        "musicnn_predict": [{"musicnn_predict_files_per_s": v, "musicnn_predict_audio_x_realtime": 180 * v,
                             "musicnn_predict_peak_rss_mb": 900.0, "musicnn_predict_decoder": "tensorflow-io"}
                            for v in (0.5, 0.4, 0.3)],
        "musicnn_predict_soundfile": [{"musicnn_predict_soundfile_files_per_s": v,
                                       "musicnn_predict_soundfile_decoder": "soundfile"} for v in (0.6, 0.6, 0.2)],
        "musicnn_reference": [{"musicnn_reference_files_per_s": v, "musicnn_reference_audio_x_realtime": 180 * v,
                               "musicnn_reference_peak_rss_mb": 800.0} for v in (0.25, 0.4, 0.1)],
    }
    peer = [{"cnn": 200.0, "crnn": 2.0, "version": "2.13.0"}, {"cnn": 300.0, "crnn": 2.0, "version": "2.13.0"},
            {"cnn": 300.0, "crnn": 2.0, "version": "2.13.0"}]
    r = summarize({"matmul_gflops": 100.0}, runs, peer)
    assert r["archs"] == ["cnn", "crnn"]
    assert r["frontend_clips_per_s"] == 120.0 and r["frontend_runs"] == [100.0, 300.0, 120.0]
    assert r["frontend_peak_rss_mb"] == 520.0 and r["matmul_gflops"] == 100.0
    assert r["frontend_vs_librosa"] == 10.0             # rounds 10, 15, 2.4; the ratio of medians would be 6
    assert r["pipeline_vs_crnn_train"] == 100.25        # rounds 100.25, 112.6, 100.2 (whole clips / CRNN)
    assert r["pipeline_vs_cnn_train"] == 1.5            # rounds 1.33, 1.5, 1.52 (sub-clips / CNN)
    assert r["cnn_train_vs_peer"] == 1.5                # rounds 1.5, 2.0, 1.1; of medians: 330 / 300 = 1.1
    assert r["crnn_train_vs_peer"] == 2.5               # rounds 2, 4, 2.5
    assert r["peer"]["cnn_train_clips_per_s"] == 300.0 and r["peer"]["torch"] == "2.13.0"
    assert r["cnn_train_gflops"] == 3 * 1e8 * 330.0 / 1e9
    assert r["musicnn_predict_vs_reference"] == 2.0     # rounds 2, 1, 3; of medians: 0.4 / 0.25 = 1.6
    assert r["musicnn_predict_files_per_s"] == 0.4 and r["musicnn_predict_runs"] == [0.5, 0.4, 0.3]
    assert r["musicnn_reference_audio_x_realtime"] == 180 * 0.25
    assert r["musicnn_predict_soundfile_vs_reference"] == 2.0       # rounds 2.4, 1.5, 2
    assert r["musicnn_predict_decoder"] == "tensorflow-io"
    missing = {**runs, "librosa": [{"librosa_clips_per_s": None, "librosa_note": "not installed"}]}
    r = summarize({}, missing, [])
    assert r["librosa_clips_per_s"] is None and "frontend_vs_librosa" not in r and "peer" not in r
    # A family the peer does not time has no ratio.
    r = summarize({}, runs, [{"cnn": 200.0, "version": "2.13.0"}] * 3)
    assert "crnn_train_vs_peer" not in r and r["cnn_train_vs_peer"] == 1.65     # rounds 1.5, 3, 1.65


def test_table_reports_ratios_and_missing_values():
    r = {"machine": {"cpu": "Test CPU", "cores": 2, "gpus": [], "tensorflow": "2.16.2", "onednn": True,
                     "keras": "3.6.0", "python": "3.11.7", "decoder": "soundfile 0.14.0"},
         "matmul_gflops": 100.0, "archs": ["cnn", "crnn"],
         "pipeline_sub_clips_clips_per_s": 400.0, "pipeline_sub_clips_shape": "10x46592",
         "pipeline_whole_clip_clips_per_s": 500.0, "pipeline_whole_clip_shape": "466000",
         "pipeline_vs_cnn_train": 1.33, "pipeline_vs_crnn_train": 200.0,
         "frontend_clips_per_s": 100.0, "librosa_clips_per_s": None, "librosa_note": "not installed",
         "cnn_train_clips_per_s": 300.0, "cnn_forward_flops_per_clip": 68e6, "cnn_train_gflops": 61.2,
         "cnn_train_batch": [10, 10, 46592],
         "crnn_train_clips_per_s": 2.0, "crnn_forward_flops_per_clip": 6.6e9, "crnn_train_gflops": 39.6,
         "crnn_train_batch": [16, 466000], "predict_clips_per_s": 9.0, "predict_family": "crnn",
         "peer": {"cnn_train_clips_per_s": 200.0}, "cnn_train_vs_peer": 1.5}
    text = table(r)
    assert ("Test CPU, 2 cores; TensorFlow 2.16.2 with oneDNN, Keras 3.6.0, Python 3.11.7, decoder soundfile 0.14.0; "
            in text)
    assert "| librosa (resample_poly + melspectrogram + dB) | n/a |" in text
    assert "| pipeline, sub clips (10x46592 per clip) | 400.00 |" in text and "feeds 1.33 x cnn training" in text
    assert "| pipeline, whole clip (466000 per clip) | 500.00 |" in text and "feeds 200 x crnn training" in text
    assert "| cnn training, batches of 10 x 10 x 46592 | 300.00 |" in text
    assert "1.50 x PyTorch (200.00 examples/s)" in text and text.count("x PyTorch") == 1
    assert "predict, exported crnn" in text and "precision" not in text
    missing = table({**r, "musicnn_note": "soundfile not installed"})
    assert "| tagger.predict (auto) | n/a |  |  | soundfile not installed |" in missing
    both = table({**r, "musicnn_predict_files_per_s": 0.5, "musicnn_predict_audio_x_realtime": 90.0,
                  "musicnn_predict_peak_rss_mb": 900.0, "musicnn_reference_files_per_s": 0.25,
                  "musicnn_predict_vs_reference": 2.0, "musicnn_predict_decoder": "tensorflow-io",
                  "musicnn_predict_soundfile_files_per_s": 0.6, "musicnn_predict_soundfile_vs_reference": 2.4})
    assert "| tagger.predict (tensorflow-io) | 0.500 | 90 | 900.0 | 2.00 x musicnn's own path |" in both
    assert "| tagger.predict (soundfile) | 0.600 |  |  | 2.40 x musicnn's own path |" in both
    assert "| musicnn's own path (librosa, float16, TF1 graph) | 0.250 |  |  |  |" in both
    assert "training in mixed_bfloat16 (the peer in float32)" in table({**r, "precision": "mixed_bfloat16"})
    assert "Bootstrap" not in text
    assert ("50 tags, 1000 resamples: 8.5 s, peak RSS 700.0 MB" in
            table({**r, "bootstrap_seconds": 8.46, "bootstrap_resamples": 1000, "bootstrap_peak_rss_mb": 700.0}))


@pytest.mark.parametrize("args, message", [
    (["--peer", "/no/such/python"], "not an executable"),
    (["--rounds", "0"], "at least 1"),
    (["--json", "/no/such/dir/out.json"], "folder does not exist"),
    (["--precision", "float64"], "invalid choice"),
    (["--archs", "cnn,resnet"], "unknown family resnet (registered: cnn, crnn"),
])
def test_usage_errors(args, message):
    r = run_cli("tagger.bench", *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
