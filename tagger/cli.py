"""What every command shares: one-line usage errors (exit 2), progress on stderr, quiet TensorFlow.

Nothing here imports TensorFlow, so a command checks its arguments in a fraction of a second.
"""
import argparse
import math
import os
import re
import sys
import time

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
MODELS_DIR_ENV = "TAGGER_MODELS_DIR"


def models_dir_default():
    """Where exports are written and model names are looked up: $TAGGER_MODELS_DIR, else saved_models/
    of the current folder. Every command that reads or writes exports takes it as --models-dir."""
    return os.environ.get(MODELS_DIR_ENV) or "saved_models"


def add_models_dir_flag(parser):
    parser.add_argument("--models-dir", default=models_dir_default(), metavar="DIR",
                        help=f"the models folder: exports are written there and model names looked up there "
                        f"(default: ${MODELS_DIR_ENV}, else saved_models; now {models_dir_default()})".replace("%", "%%"))


class HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default where its help line does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.required or action.default is argparse.SUPPRESS
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction))):
            return text
        shown = "none" if action.default is None else str(action.default).replace("%", "%%")
        return text + f" (default: {shown})"


class UsageError(Exception):
    """A problem the user can fix (bad flag, missing path, data and model that disagree)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line naming the fix, exit status 2, and takes flags
    whole (no abbreviations: --arch is not --archs)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def _whole_number(text, low, requirement):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} {requirement}")
    return value


def positive_int(text):
    return _whole_number(text, 1, "must be at least 1")


def nonnegative_int(text):
    return _whole_number(text, 0, "must be 0 or more")


def positive_float(text):
    value = _finite(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a (finite) number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return value


def nonnegative_float(text):
    value = _finite(text)
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number, 0 or more")
    return value


def _finite(text):
    """float(text) when it is a finite number, else None (not nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def plural(n, word, words=None):
    """'1 file', '3 files'."""
    return f"{n:,} {word if n == 1 else words or word + 's'}"


def main_guard(prog, run, args):
    """Run `run(args)`; a UsageError or Ctrl-C ends in one line on stderr, not a traceback."""
    try:
        return run(args)
    except UsageError as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{prog}: interrupted; finished work is kept, run the same command to go on\n")
        return 130
    except BrokenPipeError:
        # The reader of stdout stopped (`| head`): no traceback, and no second error when Python flushes.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


# The info and warning lines TensorFlow's C++ side writes while it is imported: absl's (TF 2.17 and later),
# and TensorFlow's own format (2.16, where TF_CPP_MIN_LOG_LEVEL silences them).
TF_NOISE = re.compile(rb"WARNING: All log messages before absl::InitializeLog\(\)|[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ "
                      rb"\S+:\d+\] |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IW] ")


def quiet_tensorflow():
    """Import TensorFlow without its C++ start-up chatter (CUDA probing, oneDNN notes) on the terminal.

    TF_CPP_MIN_LOG_LEVEL=3 (unless the user set another level) silences TensorFlow 2.16; later versions
    log through absl before reading it, so the import runs with the process's stderr passed through a
    filter that drops absl's and TensorFlow's info and warning lines and keeps everything else (errors,
    Python's warnings, the reason of a failed import). Call before the first `import tensorflow`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules or os.environ["TF_CPP_MIN_LOG_LEVEL"] not in ("2", "3"):
        return
    import importlib
    import threading
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()

    def forward():
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if not TF_NOISE.match(line):
                    os.write(saved, line)
    thread = threading.Thread(target=forward, daemon=True, name="tagger-stderr")
    thread.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        importlib.import_module("tensorflow")
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)              # the pipe's last write end closes: the filter reads to its end
        thread.join(timeout=5)
        os.close(saved)


class Progress:
    """A one-line progress bar on stderr: count, rate and time left (once a few items are done: the first
    ones carry start-up costs); plain lines when not a terminal."""

    ESTIMATE_AFTER = 3

    def __init__(self, total, label, stream=sys.stderr, every=2.0):
        self.total, self.label, self.stream = total, label, stream
        self.done = 0
        self.start = self.last = time.time()
        self.tty = stream.isatty()
        self.every = 0.2 if self.tty else every

    def update(self, n=1, note=""):
        self.done += n
        now = time.time()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            if self.done >= self.total:
                pace = f"{rate:.1f}/s, done in {now - self.start:.0f} s"
            elif self.done >= min(self.ESTIMATE_AFTER, self.total):
                pace = f"{rate:.1f}/s, {(self.total - self.done) / rate:.0f} s left"
            else:
                pace = "estimating time left"
            width = 24
            filled = int(width * self.done / max(self.total, 1))
            line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {pace} {note}"
            self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
            self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()
