"""The embedded demo dataset: synthetic music in MagnaTagATune's on-disk layout (numpy only).

`write_demo(root, seed)` writes `annotations_final.csv` in the release's exact format and one WAV
file a clip in the part folders 0-f, so the MTAT reader, the folder split and the converter take it
exactly as they take the real release. Its tags are heard, not guessed: seven instrument-like
timbres, each present or not at random, a tempo (fast, slow or neither) and a loudness (loud, quiet
or neither), all drawn independently. A model trained on it knows only these synthetic sounds.
"""
import os
import re
import wave

import numpy as np

SAMPLE_RATE = 16000
# 10.24 s: the shortest clip whose 10 sub-clips of 16,384 samples still leave the CNN's longest
# filter (1024/1024) one time step after its two poolings (16 frames -> 4 -> 1).
CLIP_SECONDS = 10.24
CLIP_SAMPLES = 163840
INSTRUMENTS = ("guitar", "strings", "piano", "drums", "vocal", "synth", "flute")
TAGS = INSTRUMENTS + ("fast", "slow", "loud", "quiet")
# Clips per part folder: parts 0-b train, c validation, d-f test.
DEFAULT_CLIPS_PER_PART = {**{p: 16 for p in "0123456789ab"}, "c": 32, **{p: 24 for p in "def"}}

TEMPI = {"slow": (45, 60), None: (90, 110), "fast": (170, 200)}
LEVELS = {"quiet": 0.05, None: 0.25, "loud": 0.9}
SCALE = np.array([0, 2, 4, 5, 7, 9, 11])  # major scale, in semitones


def _midi_hz(m):
    return 440.0 * 2.0 ** ((m - 69) / 12.0)


TABLE_SIZE = 2048


def _oscillator(f0, amps, n, sr, vibrato=0.0, rate=5.0):
    """A wavetable oscillator: harmonics k*f0 with amplitudes `amps` (those below Nyquist), with
    optional vibrato. O(n) whatever the number of harmonics."""
    k = np.arange(1, len(amps) + 1)
    amps = np.where(k * f0 < 0.45 * sr, np.asarray(amps, float), 0.0)
    spectrum = np.zeros(TABLE_SIZE // 2 + 1, complex)
    spectrum[k] = -0.5j * TABLE_SIZE * amps        # sum_k amps[k] sin(2 pi k j / N), by inverse FFT
    table = np.fft.irfft(spectrum, TABLE_SIZE)
    freq = f0 * (1.0 + vibrato * np.sin(2 * np.pi * rate * np.arange(n) / sr)) if vibrato else np.full(n, f0)
    pos = (np.cumsum(freq) / sr % 1.0) * TABLE_SIZE
    i = pos.astype(np.int64)
    frac = pos - i
    return table[i % TABLE_SIZE] * (1 - frac) + table[(i + 1) % TABLE_SIZE] * frac


def _decay(n, sr, seconds):
    return np.exp(-np.arange(n) / (seconds * sr))


def _adsr(n, sr, attack, release):
    env = np.ones(n)
    a, r = min(n, int(attack * sr)), min(n, int(release * sr))
    env[:a] = np.linspace(0, 1, a, endpoint=False)
    if r:
        env[n - r:] *= np.linspace(1, 0, r)
    return env


def _note(instrument, f0, n, sr, rng):
    k = np.arange(1, 16)
    if instrument == "guitar":      # plucked: bright attack whose upper harmonics die first
        x = _oscillator(f0, 1.0 / k, n, sr) * _decay(n, sr, 0.12) + _oscillator(f0, [1, 0.4, 0.2], n, sr) * _decay(n, sr, 0.7)
        burst = min(n, int(0.004 * sr))
        x[:burst] += rng.standard_normal(burst) * 0.3
        return x
    if instrument == "piano":       # struck: darker, long decay, a soft hammer onset
        return (_oscillator(f0, 1.0 / k ** 1.5, n, sr) * _decay(n, sr, 0.35)
                + _oscillator(f0, [1, 0.5, 0.25, 0.1], n, sr) * _decay(n, sr, 1.6)) * _adsr(n, sr, 0.003, 0.02)
    if instrument == "strings":     # bowed: sawtooth-rich, slow attack, vibrato
        return _oscillator(f0, 1.0 / k, n, sr, vibrato=0.006, rate=5.5) * _adsr(n, sr, 0.18, 0.12)
    if instrument == "flute":       # breathy near-sine, high, with vibrato
        x = _oscillator(f0, [1.0, 0.25, 0.08, 0.03], n, sr, vibrato=0.006, rate=4.5)
        x += np.convolve(rng.standard_normal(n), np.ones(4) / 4, "same") * 0.15
        return x * _adsr(n, sr, 0.08, 0.08)
    if instrument == "synth":       # detuned square waves, gated
        odd = np.where(k % 2 == 1, 1.0 / k, 0.0)
        return 0.5 * (_oscillator(f0, odd, n, sr) + _oscillator(f0 * 1.007, odd, n, sr)) * _adsr(n, sr, 0.005, 0.01)
    if instrument == "vocal":       # glottal harmonics under a vowel's formants, sung: wide vibrato, breath
        formants = [(730, 1090, 2440), (270, 2290, 3010), (570, 840, 2410), (300, 870, 2240),
                    (530, 1840, 2480)][rng.integers(5)]
        kk = np.arange(1, 40)
        amps = sum(np.exp(-(((kk * f0) - fm) / 120.0) ** 2) for fm in formants) / kk ** 0.3
        x = _oscillator(f0, amps, n, sr, vibrato=0.03, rate=5.5)
        x += np.diff(rng.standard_normal(n + 1)) * 0.05 * np.abs(x).max()
        return x * _adsr(n, sr, 0.06, 0.1)
    raise ValueError(instrument)


def _drums(beats, beat_len, n, sr, rng):
    x = np.zeros(n)
    t = np.arange(int(0.35 * sr)) / sr
    kick = np.sin(2 * np.pi * (45 * t + 75 * (1 - np.exp(-t / 0.04)) * 0.04)) * np.exp(-t / 0.12)
    snare_n = int(0.2 * sr)
    for i, start in enumerate(beats):
        hit = kick if i % 2 == 0 else (rng.standard_normal(snare_n) * np.exp(-np.arange(snare_n) / (0.05 * sr))
                                       + 0.5 * np.sin(2 * np.pi * 185 * t[:snare_n]) * np.exp(-t[:snare_n] / 0.03))
        end = min(n, start + len(hit))
        x[start:end] += hit[:end - start]
        hat = start + beat_len // 2           # hi-hat on the off-beat
        if hat < n:
            m = min(n - hat, int(0.03 * sr))
            x[hat:hat + m] += np.diff(rng.standard_normal(m + 1)) * 0.15 * np.exp(-np.arange(m) / (0.008 * sr))
    return x


def synthesize(rng, clip_samples=CLIP_SAMPLES, sr=SAMPLE_RATE):
    """One clip: (float waveform in [-1, 1], set of tags)."""
    present = [i for i in INSTRUMENTS if rng.random() < 0.3]
    if not present:
        present = [INSTRUMENTS[rng.integers(len(INSTRUMENTS))]]
    tempo = [None, "fast", "slow"][rng.integers(3)]
    level = [None, "loud", "quiet"][rng.integers(3)]
    bpm = rng.uniform(*TEMPI[tempo])
    beat_len = int(sr * 60.0 / bpm)
    offset = int(rng.integers(beat_len))
    beats = np.arange(offset, clip_samples, beat_len)
    root = 48 + int(rng.integers(12))
    mix = np.zeros(clip_samples)
    for instrument in present:
        if instrument == "drums":
            part = _drums(beats, beat_len, clip_samples, sr, rng)
        else:
            part = np.zeros(clip_samples)
            # Every instrument articulates each beat (the synth each half beat), so tempo is heard in all.
            step = beat_len // 2 if instrument == "synth" else beat_len
            octave = {"vocal": 0, "strings": 12, "flute": 24, "synth": 12}.get(instrument, 12)
            ring = {"guitar": 1.2, "piano": 1.8}.get(instrument)
            for start in range(offset, clip_samples, step):
                n = min(clip_samples - start, int(ring * sr) if ring else step)
                f0 = _midi_hz(root + octave + SCALE[rng.integers(len(SCALE))])
                part[start:start + n] += _note(instrument, f0, n, sr, rng)
        mix += part / (np.sqrt(np.mean(part ** 2)) + 1e-9) * rng.uniform(0.6, 1.0)
    mix += rng.standard_normal(clip_samples) * 0.03       # a noise floor, so silence tells nothing
    mix *= LEVELS[level] * 10 ** (rng.uniform(-1.5, 1.5) / 20) / np.max(np.abs(mix))
    tags = set(present) | {t for t in (tempo, level) if t}
    return np.clip(mix, -1, 1), tags


def _write_wav(path, x, sr, channels=1):
    pcm = np.clip(np.round(x * 32767), -32768, 32767).astype("<i2")
    if channels == 2:
        pcm = np.stack([pcm, pcm], axis=1)
    with wave.open(path, "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(sr)
        f.writeframes(pcm.tobytes())


CLIP_NAME = re.compile(r"[0-9a-f]/demo-\d{5,}\.wav")


def artist(path):
    """A demo clip's synthetic artist: its own file name without the extension ("demo-00001"), so every
    clip is by an artist of its own."""
    return os.path.splitext(os.path.basename(path))[0]


def is_demo_release(paths):
    """True where every path is a demo clip's (<part>/demo-NNNNN.wav), as write_demo names them."""
    return all(CLIP_NAME.fullmatch(p) for p in paths)


def make_clip(root, seed, clip_id, rel, clip_samples=CLIP_SAMPLES):
    """Synthesize clip `clip_id` from its own generator, seeded by (seed, clip_id), and write it to
    root/rel. Every eighth clip is 22.05 kHz stereo, so the converter's resampling and mixing run too.
    Returns its tags."""
    x, tags = synthesize(np.random.default_rng([seed, clip_id]), clip_samples)
    if clip_id % 8 == 0:
        t = np.arange(int(len(x) * 22050 / SAMPLE_RATE)) * (SAMPLE_RATE / 22050)
        _write_wav(os.path.join(root, rel), np.interp(t, np.arange(len(x)), x), 22050, channels=2)
    else:
        _write_wav(os.path.join(root, rel), x, SAMPLE_RATE)
    return sorted(tags)


def write_demo(root, seed=0, workers=1, clips_per_part=None, clip_samples=CLIP_SAMPLES, progress=None):
    """Write the demo release under `root`: <part>/demo-NNNNN.wav, then annotations_final.csv last,
    so a folder with annotations is complete. Deterministic for a seed, whatever `workers`.
    `progress()` is called once per clip written. Returns the annotations path.
    """
    progress = progress or (lambda: None)
    clips_per_part = clips_per_part or DEFAULT_CLIPS_PER_PART
    names = []
    for part, count in clips_per_part.items():
        os.makedirs(os.path.join(root, part), exist_ok=True)
        names += [f"{part}/demo-{len(names) + i + 1:05d}.wav" for i in range(count)]
    tasks = [(root, seed, i + 1, rel, clip_samples) for i, rel in enumerate(names)]
    tags = [None] * len(tasks)
    if workers > 1:
        from tagger.pool import run_tasks
        for index, ok, value in run_tasks(make_clip, tasks, workers):
            if not ok:
                raise RuntimeError(f"demo clip {names[index]}: {value}")
            tags[index] = value
            progress()
    else:
        for index, task in enumerate(tasks):
            tags[index] = make_clip(*task)
            progress()
    quote = lambda row: "\t".join(f'"{v}"' for v in row)  # noqa: E731 - the release quotes every field
    lines = [quote(["clip_id", *TAGS, "mp3_path"])]
    lines += [quote([i + 1] + [int(t in clip_tags) for t in TAGS] + [rel])
              for i, (rel, clip_tags) in enumerate(zip(names, tags))]
    path = os.path.join(root, "annotations_final.csv")
    with open(path + ".tmp", "w", newline="") as f:
        f.write("\r\n".join(lines) + "\r\n")
    os.replace(path + ".tmp", path)
    return path
