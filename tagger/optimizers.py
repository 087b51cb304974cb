"""The optimizers of a training phase: Keras's SGD or Adam, with what tagger adds to them.

- Coupled weight decay (`weight_decay` > 0): `weight_decay * w` added to each weight's gradient before
  the optimizer's update, as PyTorch's `weight_decay` argument does (an L2 penalty on the loss, through
  Adam's moments too). Keras 3's own `weight_decay` is decoupled (AdamW's rule: the weights shrink by
  `lr * weight_decay * w` beside the update), a different rule that recipes from PyTorch papers, such as
  Won et al.'s, do not use.
- Under MirroredStrategy, the loss divided by the number of replicas (`replicas`) where Keras does not
  do it itself: see `_replica_mean`.
- Under mixed_float16, Keras's dynamic loss scaling.
"""
import keras
import tensorflow as tf


def make_optimizer(phase, weight_decay=0.0, precision="float32", replicas=1):
    """The optimizer of a `tagger.schedules.Phase`."""
    if phase.optimizer == "sgd":
        cls, kwargs = keras.optimizers.SGD, {"momentum": phase.momentum, "nesterov": phase.nesterov}
    else:
        cls, kwargs = keras.optimizers.Adam, {}
    if weight_decay:
        cls = _coupled_weight_decay(cls, weight_decay / replicas)
    divide = replicas > 1 and not keras_divides_by_replicas()
    if precision == "mixed_float16":
        # float16 gradients underflow without loss scaling; Keras adds it only for a model built under a
        # global mixed_float16 policy, and ours sets the policy per layer.
        outer, optimizer = keras.optimizers.LossScaleOptimizer, cls(phase.lr, **kwargs)
        return (_replica_mean(outer, replicas) if divide else outer)(optimizer)
    return (_replica_mean(cls, replicas) if divide else cls)(phase.lr, **kwargs)


def keras_divides_by_replicas():
    """True for a Keras that divides each replica's loss by the number of replicas itself (the fix of
    keras-team/keras#19891 in keras-team/keras#20609, Keras 3.8 and later: its
    `scale_loss_for_distribution`); False for one that sums the replicas' mean-loss gradients (3.6)."""
    try:
        from keras.src.losses import loss
    except ImportError:
        return False
    return hasattr(loss, "scale_loss_for_distribution")


def _coupled_weight_decay(optimizer_class, decay):
    """The optimizer with `decay * w` added to the gradient of every weight w before its update.

    Under MirroredStrategy each replica adds its share (`weight_decay / replicas`): Keras sums the
    replicas' gradients, so the update sees `weight_decay * w` once."""
    class CoupledWeightDecay(optimizer_class):
        def apply(self, grads, trainable_variables=None):
            variables = self._trainable_variables if trainable_variables is None else trainable_variables
            grads = [g if g is None else g + tf.cast(decay, g.dtype) * tf.cast(v, g.dtype)
                     for g, v in zip(grads, variables)]
            return super().apply(grads, trainable_variables)

    CoupledWeightDecay.__name__ = f"CoupledWeightDecay{optimizer_class.__name__}"
    return CoupledWeightDecay


def _replica_mean(optimizer_class, replicas):
    """The optimizer with its loss divided by the number of replicas before the gradients.

    Keras 3.6 averages the loss over each replica's batch and then sums the replicas' gradients, so
    under MirroredStrategy every update is `replicas` times too large (keras-team/keras#19891, fixed
    upstream by keras-team/keras#20609). Dividing here makes the update the mean over the global
    batch, as on one device; the logged loss is taken before this scaling and stays the true mean.
    Used only where Keras does not divide itself (`keras_divides_by_replicas`); on both,
    test_mirrored_training_updates_like_one_device compares the update with one device's.
    """
    class ReplicaMean(optimizer_class):
        def scale_loss(self, loss):
            return super().scale_loss(loss) / replicas

    ReplicaMean.__name__ = f"ReplicaMean{optimizer_class.__name__}"
    return ReplicaMean
