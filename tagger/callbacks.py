"""Training callbacks: crash-safe epoch checkpoints for resuming, the NaN guard, and run state."""
import json
import math
import time

import keras
import tensorflow as tf

from tagger.cli import plural
from tagger.files import atomic_write_text, load_via_local, save_via_local

STATE = "state.json"


def _atomic_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=1))


def read_state(checkpoint_dir):
    """The last completed epoch's state ({"epoch", "weights", "history", "best"}), or None."""
    path = f"{checkpoint_dir}/{STATE}"
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def load_weights(model, path, model_only=False):
    """Load a checkpoint's weights; `model_only` leaves the optimizer's state as it is (the file may
    hold another optimizer's: a schedule changes optimizers between phases)."""
    skip = {"objects_to_skip": [model.optimizer]} if model_only and model.optimizer is not None else {}
    load_via_local(lambda local: model.load_weights(local, **skip), path)


class EpochCheckpoint(keras.callbacks.Callback):
    """After each epoch: model and optimizer weights to a new file, then state.json naming it, then
    the previous file removed. A crash at any point leaves the previous epoch's state and weights
    intact. Also keeps the weights of the best epoch by `monitor` (for --restore-best) and of the one
    with the lowest validation loss (a schedule's reloads), and the history.
    """

    def __init__(self, checkpoint_dir, monitor="val_auc", state=None):
        super().__init__()
        self.dir = checkpoint_dir
        self.monitor = monitor
        state = state or {}
        self.history = state.get("history", [])
        self.best = state.get("best")
        self.best_loss = state.get("best_loss")
        self.weights = state.get("weights")
        self.prior_seconds = state.get("train_seconds", 0.0)   # spent before a resume
        self.train_seconds = self.prior_seconds
        self.skip = False  # set by the NaN guard: never checkpoint a diverged model

    def on_train_begin(self, logs=None):      # once per model.fit: a schedule runs one per phase
        self.prior_seconds = self.train_seconds
        self.started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        if self.skip:
            return
        tf.io.gfile.makedirs(self.dir)
        logs = {k: float(v) for k, v in (logs or {}).items()}
        self.history.append({"epoch": epoch + 1, **logs})
        stale = [self.weights]
        self.weights = f"epoch-{epoch + 1:04d}.weights.h5"
        save_via_local(self.model.save_weights, f"{self.dir}/{self.weights}")
        value, loss = logs.get(self.monitor), logs.get("val_loss")
        if value is not None and (self.best is None or value > self.best["value"]):
            stale.append(self.best and self.best["weights"])
            self.best = self._keep(epoch, "best", value)
        if loss is not None and (self.best_loss is None or loss < self.best_loss["value"]):
            stale.append(self.best_loss and self.best_loss["weights"])
            self.best_loss = self._keep(epoch, "best-loss", loss)
        self.train_seconds = self.prior_seconds + time.time() - self.started
        _atomic_json(f"{self.dir}/{STATE}", {"epoch": epoch + 1, "weights": self.weights, "history": self.history,
                                              "best": self.best, "best_loss": self.best_loss,
                                              "train_seconds": self.train_seconds})
        kept = {self.weights, self.best and self.best["weights"], self.best_loss and self.best_loss["weights"]}
        for name in stale:
            if name and name not in kept and tf.io.gfile.exists(f"{self.dir}/{name}"):
                tf.io.gfile.remove(f"{self.dir}/{name}")

    def _keep(self, epoch, kind, value):
        """A copy of this epoch's weights file, kept as the best by `kind`."""
        name = f"{kind}-epoch-{epoch + 1:04d}.weights.h5"
        tf.io.gfile.copy(f"{self.dir}/{self.weights}", f"{self.dir}/{name}", overwrite=True)
        return {"epoch": epoch + 1, "value": value, "weights": name}


class NanGuard(keras.callbacks.Callback):
    """Stops training at the first NaN or infinite loss and remembers where it happened."""

    def __init__(self, checkpoint):
        super().__init__()
        self.checkpoint = checkpoint
        self.epoch = 0
        self.where = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.where = (self.epoch + 1, batch + 1)
            self.checkpoint.skip = True
            self.model.stop_training = True


class EpochEstimate(keras.callbacks.Callback):
    """Once, early in the first epoch of a session: the time an epoch will take, measured over the
    steps after the first (which builds the graph), when it will be long (a CPU on MTAT: hours)."""

    def __init__(self, steps_per_epoch, epochs_left, long_seconds=120.0, measure_steps=5, say=print):
        super().__init__()
        self.steps, self.epochs_left, self.long = steps_per_epoch, epochs_left, long_seconds
        self.measure, self.say = measure_steps, say
        self.start = None
        self.done = steps_per_epoch <= 1 + measure_steps

    def on_train_batch_end(self, batch, logs=None):
        if self.done:
            return
        if batch == 0:
            self.start = time.time()
        elif batch >= self.measure:
            self.done = True
            epoch = (time.time() - self.start) / batch * self.steps
            if epoch >= self.long:
                self.say(f"Estimated {_duration(epoch)} an epoch on this machine, about "
                         f"{_duration(epoch * self.epochs_left)} for the {plural(self.epochs_left, 'epoch')} to go "
                         "(a GPU takes a fraction of that: README, GPU)")


def _duration(seconds):
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
