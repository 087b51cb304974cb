"""The benchmark's arithmetic and arguments (its speeds are measured by running it, never asserted)."""
import pytest

from conftest import run_cli
from tagger.bench import forward_flops, table
from tagger.models import build_cnn


def test_cnn_flops_per_clip_worked_out_by_hand():
    # 10 sub-clips of 46,600 samples, 256/256: 182 frames -> 45 -> 11 time steps, 32 filters.
    strided = 2 * 256 * 32 * 182
    conv1 = 2 * 8 * 32 * 32 * 182
    conv2 = 2 * 8 * 32 * 32 * 45
    dense = 2 * 11 * 32 * 100 + 2 * 100 * 50
    assert forward_flops(build_cnn(50, 46600)) == 10 * (strided + conv1 + conv2 + dense)


def test_table_reports_ratios_and_missing_values():
    r = {"machine": {"cpu": "Test CPU", "cores": 2, "gpus": [], "tensorflow": "2.16.2",
                     "onednn": True}, "matmul_gflops": 100.0,
         "pipeline_cnn_clips_per_s": 400.0, "pipeline_crnn_clips_per_s": 500.0, "pipeline_vs_crnn_train": 200.0,
         "frontend_clips_per_s": 100.0, "librosa_clips_per_s": None, "librosa_note": "not installed",
         "cnn_train_clips_per_s": 300.0, "cnn_forward_flops_per_clip": 68e6, "cnn_train_gflops": 61.2,
         "crnn_train_clips_per_s": 2.0, "crnn_forward_flops_per_clip": 6.6e9, "crnn_train_gflops": 39.6,
         "predict_clips_per_s": 9.0, "peer": {"cnn_train_clips_per_s": 200.0, "crnn_train_clips_per_s": 1.6},
         "cnn_train_vs_peer": 1.5, "crnn_train_vs_peer": 1.25}
    text = table(r)
    assert "Test CPU, 2 cores; TensorFlow 2.16.2 with oneDNN" in text
    assert "| librosa (resample_poly + melspectrogram + dB) | n/a |" in text
    assert "1.50 x PyTorch (200.00 clips/s)" in text and "1.25 x PyTorch" in text and "200 x CRNN training" in text
    assert "precision" not in text
    assert "training in mixed_bfloat16 (the peer in float32)" in table({**r, "precision": "mixed_bfloat16"})


@pytest.mark.parametrize("args, message", [
    (["--peer", "/no/such/python"], "not an executable"),
    (["--rounds", "0"], "at least 1"),
    (["--json", "/no/such/dir/out.json"], "folder does not exist"),
    (["--precision", "float64"], "invalid choice"),
])
def test_usage_errors(args, message):
    r = run_cli("tagger.bench", *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
