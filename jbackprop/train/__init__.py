"""Training with the hand-written backwards.

* ``jbackprop.train`` (this package; the code is in ``loop.py``): the configuration, the model
  and loss, jit-compiled steps and epochs (Algorithm 2), Algorithm 1, per-example gradients,
  evaluation.
* ``jbackprop.train.trainer``: ``fit``, the loop behind ``jbackprop train`` (checkpoints,
  metrics, curves).
* ``jbackprop.train.data``: the built-in datasets and ``.npz`` loading.
* ``jbackprop.train.distributed``: the same steps over several devices (JAX sharding).
"""
from jbackprop.train.loop import (Config, TrainState, algorithm1, evaluate, make_loss,
                                  make_model, make_optimizer, per_example_grads, train_epoch,
                                  train_step)

__all__ = ["Config", "TrainState", "make_model", "make_loss", "make_optimizer", "train_step",
           "train_epoch", "algorithm1", "per_example_grads", "evaluate"]
