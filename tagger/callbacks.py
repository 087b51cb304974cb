"""Training callbacks: crash-safe epoch checkpoints for resuming, the NaN guard, and run state."""
import json
import math
import time

import keras
import tensorflow as tf

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


def load_weights(model, path):
    load_via_local(model.load_weights, path)


class EpochCheckpoint(keras.callbacks.Callback):
    """After each epoch: model and optimizer weights to a new file, then state.json naming it, then
    the previous file removed. A crash at any point leaves the previous epoch's state and weights
    intact. Also keeps the best `monitor` epoch's weights (for --restore-best) and the history.
    """

    def __init__(self, checkpoint_dir, monitor="val_auc", state=None):
        super().__init__()
        self.dir = checkpoint_dir
        self.monitor = monitor
        state = state or {}
        self.history = state.get("history", [])
        self.best = state.get("best")
        self.weights = state.get("weights")
        self.prior_seconds = state.get("train_seconds", 0.0)   # spent before a resume
        self.train_seconds = self.prior_seconds
        self.skip = False  # set by the NaN guard: never checkpoint a diverged model

    def on_train_begin(self, logs=None):
        self.started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        if self.skip:
            return
        tf.io.gfile.makedirs(self.dir)
        logs = {k: float(v) for k, v in (logs or {}).items()}
        self.history.append({"epoch": epoch + 1, **logs})
        value = logs.get(self.monitor)
        if value is not None and (self.best is None or value > self.best["value"]):
            name = f"best-epoch-{epoch + 1:04d}.weights.h5"
            save_via_local(self.model.save_weights, f"{self.dir}/{name}")
            old_best, self.best = self.best, {"epoch": epoch + 1, "value": value, "weights": name}
        else:
            old_best = None
        name = f"epoch-{epoch + 1:04d}.weights.h5"
        save_via_local(self.model.save_weights, f"{self.dir}/{name}")
        old, self.weights = self.weights, name
        self.train_seconds = self.prior_seconds + time.time() - self.started
        _atomic_json(f"{self.dir}/{STATE}", {"epoch": epoch + 1, "weights": name, "history": self.history,
                                              "best": self.best, "train_seconds": self.train_seconds})
        for stale in (old, old_best and old_best["weights"]):
            if stale and stale not in (self.weights, self.best and self.best["weights"]):
                path = f"{self.dir}/{stale}"
                if tf.io.gfile.exists(path):
                    tf.io.gfile.remove(path)


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
