"""What every command shares: help lines with defaults, the README's commands, progress, the installed
package, the oneDNN setting of child processes."""
import argparse
import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT
from tagger.cli import Progress, plural

# The flags that have no default value (an output not written, a filter not applied, a start not given).
NO_DEFAULT = {"--json", "--peer", "--embeddings", "--plot", "--threshold", "--audio-root", "--csv", "--mtat-dir",
              "--freeze", "--init", "--stop-after", "--list", "--labels", "--max-miss", "--max-fdr", "--confidence"}
COMMANDS = ("tagger.train", "tagger.predict", "tagger.evaluate", "tagger.prepare", "tagger.experiments",
            "tagger.bench", "tagger.convert", "tagger.embed", "tagger.probe", "tuning.search")


def _parsers(module, monkeypatch):
    """Every ArgumentParser (subcommands' too) a command builds when asked for --help."""
    made = []
    original = argparse.ArgumentParser.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)
    monkeypatch.setattr(argparse.ArgumentParser, "__init__", init)
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--help"])
    assert e.value.code == 0
    monkeypatch.undo()
    return made


@pytest.mark.parametrize("module", COMMANDS)
def test_every_flag_has_a_help_line_that_shows_its_default(module, monkeypatch):
    parsers = _parsers(module, monkeypatch)
    assert parsers
    for parser in parsers:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{parser.prog} {action.option_strings[0]} has no help line"
            if not isinstance(action, argparse._StoreTrueAction) and not action.required:
                shown = formatter._get_help_string(action)
                assert "default" in shown, f"{parser.prog} {action.option_strings[0]}: {shown}"
                # "none" only where there is no default: not where a preset or a rule applies
                assert not shown.endswith("(default: none)") or action.option_strings[0] in NO_DEFAULT, shown
    sub = {"tagger.experiments": ["zoo"], "tagger.probe": ["suggest"]}.get(module, [])
    text = subprocess.run([sys.executable, "-m", module, *sub, "--help"], capture_output=True, text=True,
                          cwd=ROOT).stdout
    assert "(default: " in text


def _readme_commands():
    """Each `python -m MODULE ...` command in the README and docs, code blocks and table cells alike."""
    found = []
    for name in ["README.md"] + [os.path.join("docs", n) for n in sorted(os.listdir(os.path.join(ROOT, "docs")))
                                 if n.endswith(".md")]:
        text = open(os.path.join(ROOT, name), encoding="utf-8").read().replace("\\|", "|")
        for m in re.finditer(r"python -m ([\w.]+)([^`\n]*)", text):
            found.append((name, m.group(1), m.group(2)))
    return found


def test_the_readmes_commands_name_modules_and_flags_that_exist(monkeypatch):
    commands = _readme_commands()
    modules = {module for _, module, _ in commands}
    assert {"tagger.train", "tagger.predict", "tagger.prepare", "tagger.convert", "tagger.evaluate",
            "tagger.experiments", "tagger.bench", "tuning.search"} <= modules
    flags = {}
    for module in modules - {"venv", "pytest", "pip"}:
        flags[module] = {o for p in _parsers(module, monkeypatch) for a in p._actions for o in a.option_strings}
    # experiments passes any training flag through to tagger.train
    flags["tagger.experiments"] |= flags.get("tagger.train") or {
        o for p in _parsers("tagger.train", monkeypatch) for a in p._actions for o in a.option_strings}
    for name, module, rest in commands:
        if module in ("venv", "pytest", "pip"):
            continue
        used = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest))
        assert used <= flags[module], f"{name}: python -m {module}{rest}: unknown {used - flags[module]}"


def test_the_test_command_is_ci_and_the_readmes():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().strip().splitlines()
    assert ci[-1] == "scripts/test" and "\n    scripts/test\n" in readme
    quick = next(line.strip() for line in readme.splitlines() if "tagger.train --arch crnn" in line and "venv" in line)
    assert shlex.split(quick)[:4] == ["python3", "-m", "venv", ".venv"]


def test_the_package_installs_and_runs_from_any_folder(crnn_run, tmp_path):
    """scripts/test installs tagger (pip install -e .): its commands run outside the clone, without
    PYTHONPATH, and find a model by name in $TAGGER_MODELS_DIR as in --models-dir."""
    import wave

    import numpy as np
    with wave.open(str(tmp_path / "a.wav"), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(16000)
        f.writeframes((np.sin(np.arange(32000) / 5) * 8000).astype("<i2").tobytes())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for extra_env, extra_args in (({"TAGGER_MODELS_DIR": str(crnn_run[0] / "models")}, []),
                                  ({}, ["--models-dir", str(crnn_run[0] / "models")])):
        r = subprocess.run([sys.executable, "-m", "tagger.predict", "a.wav", "--model", "crnn", *extra_args],
                           cwd=tmp_path, env={**env, **extra_env, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.startswith("a.wav  (2.0 s)"), r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "tagger.evaluate", "--model", "nothing-here"], cwd=tmp_path,
                       env={**env, "TAGGER_MODELS_DIR": str(crnn_run[0] / "models")}, capture_output=True, text=True)
    assert r.returncode == 2 and f"in {crnn_run[0] / 'models'}/ (there: crnn)" in r.stderr, r.stderr


def test_an_installed_copy_runs_without_the_clone(tmp_path):
    """pip install (not editable) puts a copy that needs nothing of the clone: its commands answer from
    another folder, and a run records no commit (the copy is no clone's)."""
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), ROOT],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(target)}
    code = ("import sys, tagger.train as t; print(t.__file__); "
            "print(t.provenance(sys.argv[1])['git_commit'])")
    r = subprocess.run([sys.executable, "-c", code, __file__], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    where, commit = r.stdout.split()
    assert where.startswith(str(target)) and commit == "None"
    r = subprocess.run([sys.executable, "-m", "tagger.predict", "--help"], cwd=tmp_path, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "--models-dir DIR" in r.stdout
    r = subprocess.run([sys.executable, "-c", code, __file__], cwd=ROOT, capture_output=True, text=True,
                       env={**env, "PYTHONPATH": ROOT})                 # from the clone: its commit
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert r.stdout.split()[1] == head, r.stderr[-2000:]


def test_progress_estimates_only_after_a_few_items():
    out = io.StringIO()
    bar = Progress(10, "decoding", stream=out, every=0)
    lines = []
    for _ in range(10):
        bar.update()
        lines.append(out.getvalue().splitlines()[-1])
    assert all("estimating time left" in line and " s left" not in line for line in lines[:Progress.ESTIMATE_AFTER - 1])
    assert all(" s left" in line for line in lines[Progress.ESTIMATE_AFTER - 1:9])
    assert "10/10" in lines[-1] and "done in" in lines[-1]


def test_plural():
    assert [plural(n, "file") for n in (0, 1, 2, 1500)] == ["0 files", "1 file", "2 files", "1,500 files"]


@pytest.mark.parametrize("env, expected", [
    ({}, "1"),                                                        # our default
    ({"TF_ENABLE_ONEDNN_OPTS": "0"}, "0"),                           # the user's choice
    ({"TF_ENABLE_ONEDNN_OPTS": "0", "TAGGER_ONEDNN_DEFAULT": "1"}, "0"),   # a mirrored run's child, or the user's
    ({"TF_ENABLE_ONEDNN_OPTS": "1", "TAGGER_ONEDNN_DEFAULT": "1"}, "1"),   # our default, inherited
])
def test_onednn_default_never_overrides_an_explicit_setting(env, expected):
    base = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "TAGGER_ONEDNN_DEFAULT")}
    r = subprocess.run([sys.executable, "-c", "import os, tagger; print(os.environ['TF_ENABLE_ONEDNN_OPTS'])"],
                       env={**base, **env, "PYTHONPATH": ROOT}, capture_output=True, text=True)
    assert r.stdout.strip() == expected, r.stderr


def test_epoch_estimate_speaks_once_and_only_for_long_epochs():
    from tagger.callbacks import EpochEstimate
    said = []
    for long_seconds in (0.0, 1e9):
        estimate = EpochEstimate(steps_per_epoch=1000, epochs_left=20, long_seconds=long_seconds, say=said.append)
        for batch in range(12):
            estimate.on_train_batch_end(batch)
    assert len(said) == 1 and said[0].startswith("Estimated ") and "for the 20 epochs to go" in said[0]


def test_tensorflows_import_chatter_is_dropped_and_nothing_else():
    from tagger.cli import TF_NOISE
    noise = [b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
             b"I0000 00:00:1796005522.469864   14096 port.cc:153] oneDNN custom operations are on.\n",
             b"W0000 00:00:1796005522.471939   14096 cudart_stub.cc:31] Could not find cuda drivers\n",
             b"2026-11-30 01:01:25.962367: I tensorflow/core/util/port.cc:113] oneDNN custom operations are on.\n"]
    kept = [b"E0000 00:00:1796003527.900511    3500 cuda_platform.cc:52] failed call to cuInit\n",
            b"2026-11-30 01:01:26.263467: E external/local_xla/xla/stream_executor/cuda/cuda_fft.cc:479] Unable\n",
            b"Traceback (most recent call last):\n", b"ImportError: libcudart.so.12: cannot open shared object\n",
            b"python -m tagger.train: error: --data x is not a TFRecords folder\n"]
    assert all(TF_NOISE.match(line) for line in noise) and not any(TF_NOISE.match(line) for line in kept)
    r = subprocess.run([sys.executable, "-c", "from tagger.cli import quiet_tensorflow; quiet_tensorflow(); "
                        "import sys; sys.stderr.write('after\\n')"], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"} | {"PYTHONPATH": ROOT})
    assert r.returncode == 0 and r.stderr == "after\n", r.stderr
