"""Render the README's example recordings: four instruments from a General MIDI sound font (recorded
samples) with fluidsynth as 16 kHz WAV files, and speech with espeak-ng (its own 22.05 kHz).

    sudo apt-get install fluidsynth fluid-soundfont-gm espeak-ng
    python docs/examples/render.py OUT_DIR

Each instrument plays the same 20-second phrase (a C major progression, arpeggiated; the drums a rock
beat), written here as a MIDI file; medley.wav plays the four one after another (the README's taggram).
"""
import os
import struct
import subprocess
import sys
import wave

SOUND_FONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
# General MIDI programs (0-based); the drums play on channel 10 (index 9).
INSTRUMENTS = {"piano": 0, "guitar": 25, "strings": 48, "drums": None}
SPEECH = ("The quick brown fox jumps over the lazy dog. Music tagging models listen to a few seconds at a "
          "time and say what they hear.")


def _varlen(n):
    out = [n & 0x7F]
    while n > 0x7F:
        n >>= 7
        out.insert(0, (n & 0x7F) | 0x80)
    return bytes(out)


def midi(program, ticks=480, tempo_bpm=100):
    """A format-0 MIDI file: 8 bars of quarter notes (chord tones), or a rock beat on the drum channel."""
    events = []                                           # (absolute tick, bytes)
    channel = 9 if program is None else 0
    if program is not None:
        events.append((0, bytes([0xC0 | channel, program])))
        chords = [(60, 64, 67), (57, 60, 64), (53, 57, 60), (55, 59, 62)]       # C, Am, F, G
        for bar in range(8):
            for beat in range(4):
                note = chords[bar % 4][beat % 3] + (12 if beat == 3 else 0)
                start = (bar * 4 + beat) * ticks
                events += [(start, bytes([0x90 | channel, note, 90])),
                           (start + ticks - 20, bytes([0x80 | channel, note, 0]))]
    else:
        for eighth in range(64):
            start = eighth * ticks // 2
            hits = [42] + ([36] if eighth % 4 == 0 else []) + ([38] if eighth % 4 == 2 else [])   # hat, kick, snare
            for note in hits:
                events += [(start, bytes([0x99, note, 100])), (start + ticks // 4, bytes([0x89, note, 0]))]
    tempo = 60_000_000 // tempo_bpm
    track, last = bytearray(b"\x00\xff\x51\x03" + tempo.to_bytes(3, "big")), 0
    for tick, data in sorted(events, key=lambda e: e[0]):
        track += _varlen(tick - last) + data
        last = tick
    track += b"\x00\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, ticks) + b"MTrk" + struct.pack(">I", len(track)) + bytes(track)


def main(out):
    os.makedirs(out, exist_ok=True)
    for name, program in INSTRUMENTS.items():
        with open(os.path.join(out, f"{name}.mid"), "wb") as f:
            f.write(midi(program))
        subprocess.run(["fluidsynth", "-ni", "-g", "0.8", "-r", "16000", "-F", os.path.join(out, f"{name}.wav"),
                        SOUND_FONT, os.path.join(out, f"{name}.mid")], check=True, capture_output=True)
    subprocess.run(["espeak-ng", "-w", os.path.join(out, "speech.wav"), SPEECH], check=True)
    with wave.open(os.path.join(out, "medley.wav"), "wb") as medley:
        for i, name in enumerate(INSTRUMENTS):
            with wave.open(os.path.join(out, f"{name}.wav")) as part:
                if i == 0:
                    medley.setparams(part.getparams())
                medley.writeframes(part.readframes(part.getnframes()))
    print(f"Wrote {', '.join(list(INSTRUMENTS) + ['speech', 'medley'])} .wav files to {out}/")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples")
