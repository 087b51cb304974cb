"""Benchmark: clips per second of each stage, on random data of MagnaTagATune's real shapes.

    python -m tagger.bench [--json PATH] [--quick] [--peer PYTHON] [--rounds N] [--precision P]

Clips of 29.125 s (466,000 samples at 16 kHz) and 50 tags, through the project's own code: TFRecord
shards written as tagger.prepare writes them and read by tagger.data's pipeline; the CRNN's front
end (LogMelSpectrogram with its resampling); tagger.train's models, compiled as tagger.train
compiles them and stepped by model.fit (from tensors in memory, so the step alone is timed); the
exported SavedModel's serving_default. Each stage runs in its own process after a warm-up, so its peak
resident memory is its own. The stages but predict and matmul run in --rounds rounds; with --peer,
../shared/bench/peer_torch.py (the same two models in PyTorch) runs under that interpreter after ours
in each round. Speeds are medians over the rounds, ratios medians of each round's ratio.
--precision mixed_bfloat16 or mixed_float16 times the training stages with tagger.train's
--precision (the peer stays float32; exports are float32 either way). Speed goals live here, never in
the tests.
"""
import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from tagger.cli import EXIT_OK, ArgumentParser, UsageError, main_guard, positive_int, quiet_tensorflow
from tagger.train import PRECISIONS

PROG = "python -m tagger.bench"
CLIP_SAMPLES = 466_000
NUM_TAGS = 50
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.path.join(ROOT, "..", "shared", "bench", "peer_torch.py")
# (full, quick) sizes of each stage: timed steps after the warm-up
SIZES = {"pipeline_clips": (96, 40), "pipeline_seconds": (4.0, 1.5), "frontend_steps": (16, 2),
         "librosa_clips": (16, 2), "cnn_steps": (40, 15), "crnn_steps": (4, 2), "predict_steps": (3, 1)}
STAGES = ("pipeline", "frontend", "librosa", "cnn_train", "crnn_train", "predict", "matmul")


def parse_args(argv):
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--quick", action="store_true", help="fewer steps (about 3 minutes on 2 cores)")
    p.add_argument("--peer", metavar="PYTHON", help="an interpreter with torch 2.13 for ../shared/bench/peer_torch.py")
    p.add_argument("--rounds", type=positive_int, help="rounds of the stages (all but predict and matmul), each "
                   "followed by the peer's; default 2, 1 with --quick")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1, help="threads for the peer")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="float32",
                   help="tagger.train's --precision for the training stages (default: float32)")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)   # one stage, run by the driver
    args = p.parse_args(argv)
    if args.peer and not os.path.isfile(PEER):
        p.error(f"--peer needs {os.path.normpath(PEER)}, which is missing")
    if args.peer and not os.access(args.peer, os.X_OK):
        p.error(f"--peer {args.peer} is not an executable Python interpreter")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json}: its folder does not exist")
    return args


def _size(name, quick):
    return SIZES[name][1 if quick else 0]


def peak_rss_mb():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ---------------------------------------------------------------------------------------------
# Stages (each runs in its own process: python -m tagger.bench --stage NAME)

def stage_pipeline(quick):
    """TFRecord shards on disk -> batched, scaled, sliced tensors, for both layouts."""
    import numpy as np
    import tensorflow as tf

    from tagger import data, prepare
    from tagger.data import NUM_SUB_CLIPS
    from tagger.models import cnn_input_samples
    clips = _size("pipeline_clips", quick)
    rng = np.random.default_rng(0)
    result = {}
    with tempfile.TemporaryDirectory(prefix="tagger-bench-") as tmp:
        names = []
        per_shard = 16
        for s in range(0, clips, per_shard):
            name = f"train-{s // per_shard:05d}.tfrecord"
            with tf.io.TFRecordWriter(f"{tmp}/{name}") as w:
                for i in range(s, min(s + per_shard, clips)):
                    pcm = rng.integers(-20000, 20000, CLIP_SAMPLES).astype(np.int16)
                    labels = (rng.uniform(size=NUM_TAGS) < 0.1).astype(int).tolist()
                    w.write(prepare._example(tf, pcm, labels, i, f"{i}.mp3"))
            names.append(name)
        manifest = {"tags": [f"tag{i}" for i in range(NUM_TAGS)], "clip_samples": CLIP_SAMPLES,
                    "sample_rate": 16000, "splits": {"train": {"clips": clips, "shards": names}}}
        keep = cnn_input_samples(CLIP_SAMPLES // NUM_SUB_CLIPS, 256, 256)
        for layout, batch in (("cnn", 10), ("crnn", 16)):
            ds = data.dataset(tmp, "train", layout, batch, manifest, shuffle_seed=0, shuffle_buffer=64,
                              sub_clip_samples=keep if layout == "cnn" else None)
            for _ in ds.take(2):       # warm-up: open files, start threads
                pass
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < _size("pipeline_seconds", quick):
                for waves, _ in ds:
                    n += int(waves.shape[0])
            result[f"pipeline_{layout}_clips_per_s"] = n / (time.perf_counter() - start)
    result["pipeline_clips_per_s"] = min(result["pipeline_cnn_clips_per_s"], result["pipeline_crnn_clips_per_s"])
    return result


def _time_calls(fn, steps, warmup=1):
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def stage_frontend(quick):
    """The CRNN's front end, resampling (16 -> 12 kHz) + log-mel, on batches of 16 whole clips."""
    import numpy as np
    import tensorflow as tf

    from tagger.features import LogMelSpectrogram
    logmel = LogMelSpectrogram(12000, 512, 256, 96, input_rate=16000)
    x = tf.constant(np.random.default_rng(0).uniform(-1, 1, (16, CLIP_SAMPLES)).astype(np.float32))
    front = tf.function(logmel)
    # 16 calls after 2 (half a second on 2 cores): 4 after 1 varied from 245 to 492 clips/s within a run.
    seconds = _time_calls(lambda: front(x).numpy(), _size("frontend_steps", quick), warmup=2)
    return {"frontend_clips_per_s": 16 / seconds}


def stage_librosa(quick):
    """librosa doing the same work per clip: resample_poly 3/4, melspectrogram, power_to_db."""
    try:
        import librosa
    except ImportError:
        return {"librosa_clips_per_s": None, "librosa_note": "librosa is not installed (requirements-test.txt)"}
    import numpy as np
    from scipy.signal import resample_poly
    clips = np.random.default_rng(0).uniform(-1, 1, (_size("librosa_clips", quick), CLIP_SAMPLES)).astype(np.float32)

    def one(x):
        y = resample_poly(x, 3, 4)
        return librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=12000, n_fft=512, hop_length=256,
                                                                  n_mels=96), ref=1.0, amin=1e-10, top_db=None)
    one(clips[0])
    start = time.perf_counter()
    for x in clips:
        one(x)
    return {"librosa_clips_per_s": len(clips) / (time.perf_counter() - start)}


def _model_and_batch(arch, precision):
    import dataclasses

    import numpy as np

    from tagger import train
    config = train.Config(arch=arch, data="bench", **{**train.STUDY[arch], "epochs": 1})
    config = dataclasses.replace(config, length=256, stride=256, precision=precision)
    manifest = {"tags": [f"t{i}" for i in range(NUM_TAGS)], "clip_samples": CLIP_SAMPLES}
    model = train.compile_model(train.build_model(config, manifest), config)
    rng = np.random.default_rng(0)
    batch = config.batch_size
    x = rng.uniform(-1, 1, (batch, *model.input_shape[1:])).astype(np.float32)
    y = (rng.uniform(size=(batch, NUM_TAGS)) < 0.1).astype(np.float32)
    return model, config, x, y


def stage_train(arch, quick, precision):
    """Training steps of tagger.train's model and compile (CNN 256/256, 10 clips; CRNN 16 clips)."""
    import tensorflow as tf
    model, config, x, y = _model_and_batch(arch, precision)
    import keras
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    steps = _size(f"{arch}_steps", quick)
    ends = []
    clock = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: ends.append(time.perf_counter()))
    # The first steps trace and allocate; the timed steps run from the end of the warm-up to the end
    # of the last step, inside one fit, as an epoch of tagger.train does.
    warmup = 3 if arch == "cnn" else 1
    model.fit(ds, steps_per_epoch=warmup + steps, epochs=1, verbose=0, callbacks=[clock])
    seconds = ends[-1] - ends[warmup - 1]
    return {f"{arch}_train_clips_per_s": steps * config.batch_size / seconds,
            f"{arch}_forward_flops_per_clip": forward_flops(model)}


def stage_predict(quick):
    """The exported CRNN SavedModel's serving_default on batches of 16 clips."""
    import tensorflow as tf

    from tagger import export
    model, _, x, _ = _model_and_batch("crnn", "float32")    # tagger.train exports float32 always
    with tempfile.TemporaryDirectory(prefix="tagger-bench-") as tmp:
        out = export.export(model, "crnn", f"{tmp}/crnn", [f"t{i}" for i in range(NUM_TAGS)], CLIP_SAMPLES, {})
        serve = tf.saved_model.load(out).signatures["serving_default"]
        x = tf.constant(x)
        seconds = _time_calls(lambda: serve(waveform=x)["probabilities"].numpy(), _size("predict_steps", quick))
    return {"predict_clips_per_s": 16 / seconds}


def stage_matmul(quick):
    """float32 matmul GFLOP/s: what this machine's cores can do at best, through TensorFlow."""
    import tensorflow as tf
    n = 2048
    a = tf.random.uniform((n, n))
    b = tf.random.uniform((n, n))
    mm = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    seconds = _time_calls(lambda: mm().numpy(), 5 if quick else 20, warmup=2)
    return {"matmul_gflops": 2 * n ** 3 / seconds / 1e9}


def forward_flops(model):
    """Multiply-adds x 2 of one clip's forward pass, counted layer by layer from the output shapes:
    convolutions, dense layers, GRUs, the resampling filter, the STFT (5 N log2 N per frame) and the
    mel projection. Elementwise work (batch norm, activations, pooling) is left out."""
    import math

    import keras
    import numpy as np

    from tagger.features import LogMelSpectrogram, Resample
    from tagger.models import StridedConv1D

    def resampling(resample, input_shape):       # `width` multiply-adds per output sample
        return 2 * resample.width * int(np.prod(resample.compute_output_shape(input_shape)[1:]))

    total = 0
    for layer in model.layers:
        out = layer.output.shape
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            cin = layer.input.shape[-1]
            total += 2 * kh * kw * cin * layer.filters * int(np.prod(out[1:-1]))
        elif isinstance(layer, StridedConv1D):
            total += 2 * layer.length * layer.filters * int(np.prod(out[1:-1]))
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units * int(np.prod(out[1:-1] or [1]))
        elif isinstance(layer, keras.layers.GRU):
            steps, cin = layer.input.shape[1], layer.input.shape[2]
            total += steps * 3 * 2 * (cin * layer.units + layer.units * layer.units)
        elif isinstance(layer, Resample):
            total += resampling(layer, layer.input.shape)
        elif isinstance(layer, LogMelSpectrogram):
            frames, n = out[-1], layer.fft_length
            total += frames * (5 * n * math.log2(n) + 2 * (n // 2 + 1) * layer.num_mel_bins)
            if layer.resample is not None:
                total += resampling(layer.resample, layer.input.shape)
    return int(total)


def run_stage(name, quick, precision):
    quiet_tensorflow()
    fn = {"pipeline": stage_pipeline, "frontend": stage_frontend, "librosa": stage_librosa,
          "cnn_train": lambda q: stage_train("cnn", q, precision),
          "crnn_train": lambda q: stage_train("crnn", q, precision),
          "predict": stage_predict, "matmul": stage_matmul}[name]
    result = fn(quick)
    result[f"{name}_peak_rss_mb"] = peak_rss_mb()
    print("BENCH " + json.dumps(result))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# The driver: every stage in its own process, in rounds alternating with the peer

def _subprocess(cmd, label, cwd=None):
    print(f"  {label} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UsageError(f"the {label} stage failed (exit {r.returncode}): {tail}")
    print(f"  {label}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return r.stdout


def our_stage(name, quick, precision):
    cmd = [sys.executable, "-m", "tagger.bench", "--stage", name, "--precision", precision]
    cmd += ["--quick"] if quick else []
    out = _subprocess(cmd, name, cwd=ROOT)
    line = [ln for ln in out.splitlines() if ln.startswith("BENCH ")][-1]
    return json.loads(line[len("BENCH "):])


def peer_run(python, threads):
    out = _subprocess([python, PEER, str(threads)], "peer (PyTorch)")
    values = {}
    for key, pattern in (("cnn", r"cnn\s+train clips/s ([0-9.]+)"), ("crnn", r"crnn train clips/s ([0-9.]+)"),
                         ("version", r"torch (\S+)")):
        m = re.search(pattern, out)
        values[key] = (m.group(1) if key == "version" else float(m.group(1))) if m else None
    return values


def machine():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = re.search(r"model name\s*:\s*(.+)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        pass
    import tensorflow as tf

    from tagger.models import CPU_16BIT_FLAGS, cpu_flags, onednn_cpu
    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    return {"cpu": model, "cores": os.cpu_count(), "gpus": gpus, "tensorflow": tf.__version__,
            "python": platform.python_version(), "onednn": onednn_cpu(),
            "bf16": bool(cpu_flags() & set(CPU_16BIT_FLAGS["mixed_bfloat16"]))}


# Stages run in every round, alternating with the peer, so that each ratio compares runs made in the
# same minutes (these machines' speed drifts by 2 x within an hour); predict and matmul run once.
ROUND_STAGES = ("pipeline", "frontend", "librosa", "cnn_train", "crnn_train")


def run(args):
    if args.stage:
        return run_stage(args.stage, args.quick, args.precision)
    quick = args.quick
    rounds = args.rounds or (1 if quick else 2)
    print(f"Benchmark ({'quick' if quick else 'full'}, {rounds} round(s)"
          + (f" alternating with {args.peer}" if args.peer else "") + "):", file=sys.stderr)
    once = {}
    for name in ("predict", "matmul"):
        once.update(our_stage(name, quick, args.precision))
    runs, peer_runs = {name: [] for name in ROUND_STAGES}, []
    for _ in range(rounds):
        for name in ROUND_STAGES:
            runs[name].append(our_stage(name, quick, args.precision))
        if args.peer:
            peer_runs.append(peer_run(args.peer, args.threads))
    results = summarize(once, runs, peer_runs)
    if peer_runs:
        results["peer"]["threads"] = args.threads
    quiet_tensorflow()
    results["machine"] = machine()
    results["quick"] = quick
    results["precision"] = args.precision
    results["date"] = time.strftime("%Y-%m-%d %H:%M")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"Wrote {args.json}")
    return EXIT_OK


def summarize(once, runs, peer_runs):
    """The results from the stages' outputs: `once` (one dict), `runs` (stage -> one dict per round) and
    the peer's rounds. Speeds are medians over the rounds; a ratio is the median of the ratios within
    each round (runs minutes apart), not the ratio of the medians. Peak memory is the largest."""
    results = dict(once)
    for stage_runs in runs.values():
        for key in stage_runs[0]:
            values = [r[key] for r in stage_runs]
            if key.endswith("_peak_rss_mb"):
                results[key] = max(values)
            elif key.endswith("_clips_per_s") and None not in values:
                results[key] = statistics.median(values)
                results[key.replace("_clips_per_s", "_runs")] = values
            else:
                results[key] = values[0]

    def per_round(a, a_stage, b, b_stage):
        return statistics.median(x[a] / y[b] for x, y in zip(runs[a_stage], runs[b_stage]))

    for arch in ("cnn", "crnn"):
        flops = 3 * results[f"{arch}_forward_flops_per_clip"]    # forward + backward
        results[f"{arch}_train_gflops"] = flops * results[f"{arch}_train_clips_per_s"] / 1e9
    if peer_runs:
        results["peer"] = {"torch": peer_runs[0]["version"],
                           "cnn_train_clips_per_s": statistics.median(p["cnn"] for p in peer_runs),
                           "crnn_train_clips_per_s": statistics.median(p["crnn"] for p in peer_runs),
                           "runs": peer_runs}
        for arch in ("cnn", "crnn"):
            results[f"{arch}_train_vs_peer"] = statistics.median(
                ours[f"{arch}_train_clips_per_s"] / p[arch] for ours, p in zip(runs[f"{arch}_train"], peer_runs))
    if results.get("librosa_clips_per_s"):
        results["frontend_vs_librosa"] = per_round("frontend_clips_per_s", "frontend", "librosa_clips_per_s", "librosa")
    results["pipeline_vs_crnn_train"] = per_round("pipeline_clips_per_s", "pipeline", "crnn_train_clips_per_s",
                                                  "crnn_train")
    return results


def table(r):
    m = r["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores{', GPUs: ' + ', '.join(m['gpus']) if m['gpus'] else ''}; "
             f"TensorFlow {m['tensorflow']}{' with oneDNN' if m['onednn'] else ''}; "
             f"matmul {r['matmul_gflops']:.0f} GFLOP/s (float32)"
             + (f"; training in {r['precision']} (the peer in float32)"
                if r.get("precision", "float32") != "float32" else ""), "",
             "| stage | clips/s | peak RSS (MB) | note |", "|---|---:|---:|---|"]

    def row(label, key, rss, note=""):
        value = r.get(key)
        lines.append(f"| {label} | {'n/a' if value is None else f'{value:.2f}'} | {r.get(rss, '')} | {note} |")

    row("pipeline, CNN layout (10 x 46,592)", "pipeline_cnn_clips_per_s", "pipeline_peak_rss_mb")
    row("pipeline, CRNN layout (466,000)", "pipeline_crnn_clips_per_s", "pipeline_peak_rss_mb",
        f"{r['pipeline_vs_crnn_train']:.0f} x CRNN training")
    row("front end (resample + log-mel)", "frontend_clips_per_s", "frontend_peak_rss_mb",
        f"{r['frontend_vs_librosa']:.1f} x librosa" if r.get("frontend_vs_librosa") else "")
    row("librosa (resample_poly + melspectrogram + dB)", "librosa_clips_per_s", "librosa_peak_rss_mb",
        r.get("librosa_note", ""))
    for arch, batch in (("cnn", 10), ("crnn", 16)):
        note = (f"{r[arch + '_forward_flops_per_clip'] / 1e9:.2f} GFLOP forward/clip, "
                f"{r[arch + '_train_gflops']:.1f} GFLOP/s achieved")
        if "peer" in r:
            note += f"; {r[arch + '_train_vs_peer']:.2f} x PyTorch ({r['peer'][arch + '_train_clips_per_s']:.2f} clips/s)"
        row(f"{arch.upper()} training, {batch} clips a batch", f"{arch}_train_clips_per_s", f"{arch}_train_peak_rss_mb",
            note)
    row("predict, exported CRNN (serving_default, 16 clips)", "predict_clips_per_s", "predict_peak_rss_mb")
    return "\n".join(lines)


def main(argv=None):
    return main_guard(PROG, run, parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
