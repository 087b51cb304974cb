"""Benchmark: clips per second of each stage, on random data of MagnaTagATune's real shapes.

    python -m tagger.bench [--json PATH] [--quick] [--peer PYTHON [--peer-script PATH]] [--rounds N] [--archs a,b]

Clips of 29.125 s (466,000 samples at 16 kHz) and 50 tags, through the project's own code: TFRecord
shards written as tagger.prepare writes them and read by tagger.data's training pipeline, in each
family's layout; the CRNN's front end (LogMelSpectrogram with its resampling); every registered
family's model (or those of --archs) with its study preset, compiled as tagger.train compiles it and
stepped by model.fit (from tensors in memory, so the step alone is timed; a short-chunk family's
examples are chunks); the default family's exported SavedModel's serving_default. Each stage runs in
its own process after a warm-up, so its peak resident memory is its own. The stages but predict and
matmul run in --rounds rounds; with --peer, the peer script (--peer-script: the same families written in
PyTorch, timed the same way) runs under that interpreter after ours in each round. Speeds are medians
over the rounds, ratios medians of each round's ratio. With musicnn's wheel (wheels/, or
$TAGGER_MUSICNN_WHEEL) and librosa, more stages per round tag the same 3-minute mp3s with musicnn-mtt,
in files per second: tagger.predict's path (with the default decoder, and with soundfile where the
default is tensorflow-io) and musicnn's own (tagger.reference). --precision mixed_bfloat16 or
mixed_float16 times the training stages with tagger.train's --precision (the peer stays float32;
exports are float32 either way). Speed goals live here, never in the tests.
"""
import argparse
import importlib.util
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

from tagger import models
from tagger.cli import EXIT_OK, ArgumentParser, UsageError, main_guard, plural, positive_int, quiet_tensorflow
from tagger.config import PRECISIONS, arch_list
from tagger.convert import WHEEL as MUSICNN_WHEEL

PROG = "python -m tagger.bench"
CLIP_SAMPLES = 466_000
NUM_TAGS = 50
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The PyTorch peer beside a clone of the project, where there is one.
PEER = os.path.normpath(os.path.join(ROOT, "..", "shared", "bench", "peer_torch.py"))
# (full, quick) sizes of each stage: timed steps after the warm-up; training runs steps for at least
# train_seconds (and train_steps) after warm-up steps of at least warmup_seconds.
SIZES = {"pipeline_clips": (96, 40), "pipeline_seconds": (4.0, 1.5), "frontend_steps": (16, 2),
         "librosa_clips": (16, 2), "train_seconds": (10.0, 3.0), "train_steps": (3, 2), "warmup_seconds": (1.0, 0.5),
         "predict_steps": (3, 1), "tracks": (4, 2)}
TRACK_SECONDS = 180
STAGES = ("pipeline", "frontend", "librosa", *(f"{name}_train" for name in models.names()), "predict", "matmul",
          "bootstrap", "musicnn_predict", "musicnn_predict_soundfile", "musicnn_reference")


def parse_args(argv):
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--quick", action="store_true", help="fewer steps (about 3 minutes on 2 cores)")
    p.add_argument("--peer", metavar="PYTHON", help="an interpreter with torch 2.13 to run the peer script under")
    p.add_argument("--peer-script", metavar="PATH", default=PEER if os.path.isfile(PEER) else None,
                   help="the PyTorch peer: the families in PyTorch, printing '<family> train clips/s N' lines "
                   f"(default: {PEER} where it exists)")
    p.add_argument("--rounds", type=positive_int, help="rounds of the stages (all but predict and matmul), each "
                   "followed by the peer's; default 2, 1 with --quick")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1, help="threads for the peer "
                   "(default: the machine's cores)")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="float32",
                   help="tagger.train's --precision for the training stages (default: float32)")
    p.add_argument("--archs", type=arch_list, default=models.names(),
                   help=f"the families whose training is timed (default: all, {','.join(models.names())})")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)   # one stage, run by the driver
    args = p.parse_args(argv)
    if args.peer and not (args.peer_script and os.path.isfile(args.peer_script)):
        p.error(f"--peer needs the peer script: {args.peer_script or PEER} is missing (pass --peer-script PATH)")
    if args.peer and not os.access(args.peer, os.X_OK):
        p.error(f"--peer {args.peer} is not an executable Python interpreter")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json}: its folder does not exist")
    return args


def _size(name, quick):
    return SIZES[name][1 if quick else 0]


def peak_rss_mb():
    """This process's peak resident memory in MB: Linux's VmHWM, the high-water mark of this program's
    own memory (ru_maxrss would start from the parent's resident size at the fork: the driver's,
    TensorFlow included, in every stage); elsewhere ru_maxrss (KiB, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            hwm = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
        if hwm:
            return round(int(hwm.group(1)) / 1024, 1)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


# ---------------------------------------------------------------------------------------------
# Stages (each runs in its own process: python -m tagger.bench --stage NAME)

def stage_pipeline(quick, archs):
    """TFRecord shards on disk -> batched, scaled, arranged training tensors, in each family's layout."""
    import numpy as np
    import tensorflow as tf

    from tagger import data, prepare
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
        for family in {models.get(name).layout: models.get(name) for name in archs}.values():
            model, config, _, _ = _model_and_batch(family, "float32")
            ds = data.training_dataset(tmp, family.layout, config.batch_size, manifest, model.input_shape, 0,
                                       shuffle_buffer=64)
            batches = iter(ds)
            for _ in range(2):       # warm-up: open files, start threads
                next(batches)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < _size("pipeline_seconds", quick):
                waves, _ = next(batches)
                n += int(waves.shape[0])
            result[f"pipeline_{family.layout.name}_clips_per_s"] = n / (time.perf_counter() - start)
            result[f"pipeline_{family.layout.name}_shape"] = "x".join(str(d) for d in waves.shape[1:])
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


def _model_and_batch(family, precision):
    """The family's model with its study preset (the CNN at 256/256), compiled as tagger.train does,
    and a batch of random inputs of MTAT's shapes (one chunk per example for the chunk families)."""
    import numpy as np

    from tagger import config as configs
    from tagger import train
    config = configs.preset_config(family, "bench", epochs=1, precision=precision)
    manifest = {"tags": [f"t{i}" for i in range(NUM_TAGS)], "clip_samples": CLIP_SAMPLES}
    model = train.compile_model(train.build_model(config, manifest), config)
    rng = np.random.default_rng(0)
    batch = config.batch_size
    x = rng.uniform(-1, 1, (batch, *(1 if d is None else d for d in model.input_shape[1:]))).astype(np.float32)
    y = (rng.uniform(size=(batch, NUM_TAGS)) < 0.1).astype(np.float32)
    return model, config, x, y


def stage_train(name, quick, precision):
    """Training steps of tagger.train's model and compile, for at least `train_seconds`."""
    import keras
    import tensorflow as tf

    from tagger.models.flops import forward_flops
    model, config, x, y = _model_and_batch(models.get(name), precision)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    ends = []

    def on_batch_end(batch, logs):
        # The first steps trace and allocate (warm-up: the first step and those within warmup_seconds of
        # its end); the timed steps run from the end of the warm-up to the end of the last step, inside
        # one fit, as an epoch of tagger.train does.
        ends.append(time.perf_counter())
        warm = [i for i, t in enumerate(ends) if i and t - ends[0] >= _size("warmup_seconds", quick)]
        if warm and len(ends) - 1 - warm[0] >= _size("train_steps", quick) and (
                ends[-1] - ends[warm[0]] >= _size("train_seconds", quick)):
            model.stop_training = True

    model.fit(ds, steps_per_epoch=100_000, epochs=1, verbose=0, shuffle=False,
              callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=on_batch_end)])
    first = next(i for i, t in enumerate(ends) if i and t - ends[0] >= _size("warmup_seconds", quick))
    steps = len(ends) - 1 - first
    return {f"{name}_train_clips_per_s": steps * config.batch_size / (ends[-1] - ends[first]),
            f"{name}_train_batch": [config.batch_size, *x.shape[1:]],
            f"{name}_forward_flops_per_clip": forward_flops(model)}


def stage_predict(quick):
    """The default family's exported SavedModel, serving_default on batches of 16 clips."""
    import tensorflow as tf

    from tagger import export
    family = models.get(models.DEFAULT)
    model, _, _, _ = _model_and_batch(family, "float32")    # tagger.train exports float32 always
    x = tf.random.uniform((16, CLIP_SAMPLES), -1, 1, seed=0)
    with tempfile.TemporaryDirectory(prefix="tagger-bench-") as tmp:
        out = export.export(model, family.layout, f"{tmp}/model", [f"t{i}" for i in range(NUM_TAGS)],
                            CLIP_SAMPLES, {})
        serve = tf.saved_model.load(out).signatures["serving_default"]
        seconds = _time_calls(lambda: serve(waveform=x)["probabilities"].numpy(), _size("predict_steps", quick))
    return {"predict_clips_per_s": 16 / seconds, "predict_family": family.name}


def write_tracks(folder, count):
    """`count` 3-minute mp3s (44.1 kHz stereo, as music comes) of chords and drum hits, and one more for
    the warm-up (as long, so that both sides have met every batch shape they will see): the files both
    musicnn stages tag."""
    import numpy as np
    import soundfile as sf
    rng = np.random.default_rng(0)
    sr = 44100
    paths = []
    for i, seconds in enumerate([TRACK_SECONDS] * (count + 1)):
        t = np.arange(seconds * sr) / sr
        root = 110 * 2 ** (rng.integers(0, 12, seconds // 2 + 1) / 12)[(t // 2).astype(int)]
        tone = sum(np.sin(2 * np.pi * root * k * t + k) / k for k in (1, 1.26, 1.5, 2)) * np.exp(-(t % 2))
        beat = rng.standard_normal(t.size) * np.exp(-(t % 0.5) * 40)
        x = 0.1 * np.stack([tone + 0.3 * beat, 0.8 * tone + 0.5 * beat], 1)
        paths.append(os.path.join(folder, f"{'warmup' if i == 0 else f'track{i}'}.mp3"))
        sf.write(paths[-1], x.astype(np.float32), sr, format="MP3")
    return paths


def _tracks():
    """(warm-up file, timed files) written by the driver, or None when the musicnn stages cannot run."""
    folder = os.environ.get("TAGGER_BENCH_TRACKS")
    if not folder:
        return None
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    return paths[-1], paths[:-1]                  # "warmup.mp3" sorts after "trackN.mp3"


def stage_musicnn_predict(quick, decoder=None, key="musicnn_predict"):
    """tagger.predict's path with musicnn-mtt converted from the wheel: decoding (block by block, with
    `decoder`: the default, auto, unless given), resampling, windows batched across files, the
    SavedModel's tag_windows (front end inside)."""
    tracks = _tracks()
    if tracks is None:
        return {f"{key}_files_per_s": None}
    from tagger import audio, convert, predict
    decoder = audio.resolve_decoder(decoder)
    warmup, timed = tracks
    with tempfile.TemporaryDirectory(prefix="tagger-bench-") as tmp:
        convert.main(["musicnn", MUSICNN_WHEEL, "--models", "MTT_musicnn", "--models-dir", tmp])
        tags, window, serving = predict.load_tagger(f"{tmp}/musicnn-mtt")
        failed = []

        def tag(paths):
            return predict.tag_files(paths, serving, window, window["hop"], 8, lambda p, why: failed.append(why),
                                     decoder)
        tag([warmup])
        start = time.perf_counter()
        results = tag(timed)
        seconds = time.perf_counter() - start
    if failed or len(results) != len(timed):
        raise UsageError(f"{key}: {failed}")
    return {f"{key}_files_per_s": len(timed) / seconds, f"{key}_audio_x_realtime": len(timed) * TRACK_SECONDS / seconds,
            f"{key}_decoder": audio.NAMES[decoder]}


def stage_musicnn_predict_soundfile(quick):
    """The same with the soundfile decoder (where auto is tensorflow-io)."""
    return stage_musicnn_predict(quick, "soundfile", "musicnn_predict_soundfile")


def stage_musicnn_reference(quick):
    """musicnn's own path on the same files (tagger.reference: librosa.load at 16 kHz, its mel
    spectrogram, float16, log compression, patches, the authors' graph in a TF1 session, the mean)."""
    tracks = _tracks()
    if tracks is None:
        return {"musicnn_reference_files_per_s": None}
    from tagger.reference import AuthorsGraph, musicnn_tags
    warmup, timed = tracks
    graph = AuthorsGraph(MUSICNN_WHEEL, "MTT_musicnn")
    musicnn_tags(graph, warmup)
    start = time.perf_counter()
    for path in timed:
        musicnn_tags(graph, path)
    seconds = time.perf_counter() - start
    return {"musicnn_reference_files_per_s": len(timed) / seconds,
            "musicnn_reference_audio_x_realtime": len(timed) * TRACK_SECONDS / seconds}


def stage_matmul(quick):
    """float32 matmul GFLOP/s: what this machine's cores can do at best, through TensorFlow."""
    import tensorflow as tf
    n = 2048
    a = tf.random.uniform((n, n))
    b = tf.random.uniform((n, n))
    mm = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    seconds = _time_calls(lambda: mm().numpy(), 5 if quick else 20, warmup=2)
    return {"matmul_gflops": 2 * n ** 3 / seconds / 1e9}


def stage_bootstrap(quick):
    """tagger.evaluate's bootstrap on MTAT's test shape: 5,329 clips in 100 artists, 50 tags, every figure
    (ROC-AUC, PR-AUC, F1 at thresholds) on 1000 resamples (quick: 100)."""
    import numpy as np

    from tagger import decisions
    rng = np.random.default_rng(0)
    clips, resamples = 5329, 100 if quick else 1000
    y = (rng.random((clips, NUM_TAGS)) < 0.06).astype(np.uint8)
    p = rng.random((clips, NUM_TAGS)).astype(np.float32)
    start = time.perf_counter()
    decisions.bootstrap(y, p, rng.integers(0, 100, clips), resamples, thresholds=np.full(NUM_TAGS, 0.5))
    return {"bootstrap_seconds": time.perf_counter() - start, "bootstrap_resamples": resamples}


def run_stage(name, quick, precision, archs):
    if name != "bootstrap":          # numpy alone: its memory figure is the bootstrap's, not TensorFlow's
        quiet_tensorflow()
    if name.endswith("_train"):
        result = stage_train(name[:-len("_train")], quick, precision)
    else:
        fn = {"pipeline": lambda q: stage_pipeline(q, archs), "frontend": stage_frontend, "librosa": stage_librosa,
              "predict": stage_predict, "matmul": stage_matmul, "bootstrap": stage_bootstrap,
              "musicnn_predict": stage_musicnn_predict,
              "musicnn_predict_soundfile": stage_musicnn_predict_soundfile,
              "musicnn_reference": stage_musicnn_reference}[name]
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


def our_stage(name, quick, precision, archs):
    cmd = [sys.executable, "-m", "tagger.bench", "--stage", name, "--precision", precision, "--archs", ",".join(archs)]
    cmd += ["--quick"] if quick else []
    out = _subprocess(cmd, name)
    line = [ln for ln in out.splitlines() if ln.startswith("BENCH ")][-1]
    return json.loads(line[len("BENCH "):])


def peer_run(python, script, threads):
    """{family name: train clips/s, "version": torch version} from the peer's output (`zoo`: all its models)."""
    out = _subprocess([python, script, str(threads), "zoo"], "peer (PyTorch)")
    values = {name: float(rate) for name, rate in re.findall(r"^(\w+)\s+train clips/s ([0-9.]+)", out, re.M)}
    version = re.search(r"torch (\S+)", out)
    return {**values, "version": version.group(1) if version else None}


def machine():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = re.search(r"model name\s*:\s*(.+)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        pass
    import tensorflow as tf

    from tagger import audio
    from tagger.kernels import CPU_16BIT_FLAGS, cpu_flags, onednn_cpu
    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    decoder = audio.decoder_info(audio.resolve_decoder())
    return {"cpu": model, "cores": os.cpu_count(), "gpus": gpus, "tensorflow": tf.__version__,
            "keras": __import__("keras").__version__, "decoder": f"{decoder['name']} {decoder['version']}",
            "python": platform.python_version(), "onednn": onednn_cpu(),
            "bf16": bool(cpu_flags() & set(CPU_16BIT_FLAGS["mixed_bfloat16"]))}


def round_stages(archs):
    """Stages run in every round, alternating with the peer, so that each ratio compares runs made in
    the same minutes (these machines' speed drifts by 2 x within an hour); predict, matmul and bootstrap
    run once."""
    from tagger import audio
    other = ("musicnn_predict_soundfile",) if audio.resolve_decoder() != "soundfile" else ()
    return ("pipeline", "frontend", "librosa", *(f"{name}_train" for name in archs), "musicnn_predict", *other,
            "musicnn_reference")


def musicnn_setup(folder, quick):
    """Writes the musicnn stages' tracks into `folder`; None if they can run, else why not."""
    missing = [m for m in ("soundfile", "librosa") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (requirements-test.txt)"
    if not os.path.isfile(MUSICNN_WHEEL):
        return (f"no {os.path.relpath(MUSICNN_WHEEL)} (pip download --no-deps musicnn==0.1.0 -d wheels, or "
                "$TAGGER_MUSICNN_WHEEL)")
    print(f"  writing {_size('tracks', quick)} tracks of {TRACK_SECONDS} s (mp3, 44.1 kHz stereo) ...",
          file=sys.stderr, flush=True)
    write_tracks(folder, _size("tracks", quick))
    return None


def run(args):
    if args.stage:
        return run_stage(args.stage, args.quick, args.precision, args.archs)
    quick = args.quick
    rounds = args.rounds or (1 if quick else 2)
    print(f"Benchmark ({'quick' if quick else 'full'}, {plural(rounds, 'round')}"
          + (f" alternating with {args.peer}" if args.peer else "") + "):", file=sys.stderr)
    once = {}
    for name in ("predict", "matmul", "bootstrap"):
        once.update(our_stage(name, quick, args.precision, args.archs))
    runs, peer_runs = {name: [] for name in round_stages(args.archs)}, []
    with tempfile.TemporaryDirectory(prefix="tagger-bench-tracks-") as tracks:
        why_not = musicnn_setup(tracks, quick)
        if why_not:
            runs = {name: stage for name, stage in runs.items() if not name.startswith("musicnn_")}
        os.environ["TAGGER_BENCH_TRACKS"] = tracks
        for _ in range(rounds):
            for name in runs:
                runs[name].append(our_stage(name, quick, args.precision, args.archs))
            if args.peer:
                peer_runs.append(peer_run(args.peer, args.peer_script, args.threads))
    results = summarize(once, runs, peer_runs)
    if why_not:
        results["musicnn_note"] = why_not
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
            elif key.endswith(("_clips_per_s", "_files_per_s", "_x_realtime")) and None not in values:
                results[key] = statistics.median(values)
                if not key.endswith("_x_realtime"):
                    results[re.sub(r"_(clips|files)_per_s$", "_runs", key)] = values
            else:
                results[key] = values[0]

    def per_round(a, a_stage, b, b_stage):
        return statistics.median(x[a] / y[b] for x, y in zip(runs[a_stage], runs[b_stage]))

    archs = [stage[:-len("_train")] for stage in runs if stage.endswith("_train")]
    results["archs"] = archs
    for name in archs:
        flops = 3 * results[f"{name}_forward_flops_per_clip"]    # forward + backward
        results[f"{name}_train_gflops"] = flops * results[f"{name}_train_clips_per_s"] / 1e9
        pipeline = f"pipeline_{models.get(name).layout.name}_clips_per_s"
        if pipeline in results:
            results[f"pipeline_vs_{name}_train"] = per_round(pipeline, "pipeline", f"{name}_train_clips_per_s",
                                                             f"{name}_train")
    if peer_runs:
        results["peer"] = {"torch": peer_runs[0]["version"], "runs": peer_runs}
        for name in archs:
            if all(p.get(name) for p in peer_runs):
                results["peer"][f"{name}_train_clips_per_s"] = statistics.median(p[name] for p in peer_runs)
                results[f"{name}_train_vs_peer"] = statistics.median(
                    ours[f"{name}_train_clips_per_s"] / p[name] for ours, p in zip(runs[f"{name}_train"], peer_runs))
    for stage in ("musicnn_predict", "musicnn_predict_soundfile"):
        if stage in runs:
            results[f"{stage}_vs_reference"] = per_round(f"{stage}_files_per_s", stage,
                                                         "musicnn_reference_files_per_s", "musicnn_reference")
    if results.get("librosa_clips_per_s"):
        results["frontend_vs_librosa"] = per_round("frontend_clips_per_s", "frontend", "librosa_clips_per_s", "librosa")
    return results


def table(r):
    m = r["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores{', GPUs: ' + ', '.join(m['gpus']) if m['gpus'] else ''}; "
             f"TensorFlow {m['tensorflow']}{' with oneDNN' if m['onednn'] else ''}"
             + (f", Keras {m['keras']}, Python {m['python']}, decoder {m['decoder']}" if "decoder" in m else "") + "; "
             f"matmul {r['matmul_gflops']:.0f} GFLOP/s (float32)"
             + (f"; training in {r['precision']} (the peer in float32)"
                if r.get("precision", "float32") != "float32" else ""), "",
             "| stage | clips/s | peak RSS (MB) | note |", "|---|---:|---:|---|"]

    def row(label, key, rss, note=""):
        value = r.get(key)
        lines.append(f"| {label} | {'n/a' if value is None else f'{value:.2f}'} | {r.get(rss, '')} | {note} |")

    layouts = {}
    for name in r["archs"]:
        layouts.setdefault(models.get(name).layout.name, []).append(name)
    for layout, names in layouts.items():
        feeds = ", ".join(f"{r[f'pipeline_vs_{n}_train']:.3g} x {n}" for n in names if f"pipeline_vs_{n}_train" in r)
        row(f"pipeline, {layout.replace('_', ' ')} ({r.get(f'pipeline_{layout}_shape', '?')} per clip)",
            f"pipeline_{layout}_clips_per_s", "pipeline_peak_rss_mb", f"feeds {feeds} training" if feeds else "")
    row("front end (resample + log-mel)", "frontend_clips_per_s", "frontend_peak_rss_mb",
        f"{r['frontend_vs_librosa']:.1f} x librosa" if r.get("frontend_vs_librosa") else "")
    row("librosa (resample_poly + melspectrogram + dB)", "librosa_clips_per_s", "librosa_peak_rss_mb",
        r.get("librosa_note", ""))
    for name in r["archs"]:
        batch = r.get(f"{name}_train_batch") or ["?"]
        note = (f"{r[name + '_forward_flops_per_clip'] / 1e9:.2f} GFLOP forward/example, "
                f"{r[name + '_train_gflops']:.1f} GFLOP/s achieved")
        if f"{name}_train_vs_peer" in r:
            note += (f"; {r[name + '_train_vs_peer']:.2f} x PyTorch "
                     f"({r['peer'][name + '_train_clips_per_s']:.2f} examples/s)")
        row(f"{name} training, batches of {' x '.join(str(d) for d in batch)}", f"{name}_train_clips_per_s",
            f"{name}_train_peak_rss_mb", note)
    row(f"predict, exported {r.get('predict_family', '')} (serving_default, 16 clips)", "predict_clips_per_s",
        "predict_peak_rss_mb")
    lines += ["", "| tagging 3-minute mp3s with musicnn-mtt | files/s | x real time | peak RSS (MB) | note |",
              "|---|---:|---:|---:|---|"]
    stages = [(f"tagger.predict ({r.get('musicnn_predict_decoder', 'auto')})", "musicnn_predict"),
              *([("tagger.predict (soundfile)", "musicnn_predict_soundfile")]
                if r.get("musicnn_predict_soundfile_files_per_s") else [])]
    for label, stage, note in (
            *((label, stage, f"{r[stage + '_vs_reference']:.2f} x musicnn's own path"
               if r.get(stage + "_vs_reference") else r.get("musicnn_note", "")) for label, stage in stages),
            ("musicnn's own path (librosa, float16, TF1 graph)", "musicnn_reference", "")):
        files_per_s, realtime = r.get(f"{stage}_files_per_s"), r.get(f"{stage}_audio_x_realtime")
        lines.append(f"| {label} | {'n/a' if files_per_s is None else f'{files_per_s:.3f}'} | "
                     f"{'' if realtime is None else f'{realtime:.0f}'} | {r.get(stage + '_peak_rss_mb', '')} | "
                     f"{note} |")
    if r.get("bootstrap_seconds") is not None:
        lines += ["", f"Bootstrap intervals of every test figure (tagger.evaluate) on MTAT's test shape, 5,329 clips "
                  f"and 50 tags, {r['bootstrap_resamples']} resamples: {r['bootstrap_seconds']:.1f} s, peak RSS "
                  f"{r.get('bootstrap_peak_rss_mb', '?')} MB"]
    return "\n".join(lines)


def main(argv=None):
    return main_guard(PROG, run, parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
