"""jbackprop: neural-network modules with hand-written backward functions, wired into JAX.

Every module is a pure forward plus the backward function B[M, z] (and B[M, θ]) of the course
notes, written by hand and registered with ``jax.custom_vjp``. Each module works on one example
in the notes' convention and is batched with ``jax.vmap`` (or extra leading axes).
``jb.backward(module)`` gives the hand-written backward in the notes' form. See ``docs/``.
"""
from jbackprop import check, combinators, reference, testing
from jbackprop._module import backward
from jbackprop.activations import elu, gelu, leaky_relu, relu, sigmoid, softplus, tanh
from jbackprop.combinators import Layer, serial
from jbackprop.convolution import conv1d, conv1d_s, conv2d, conv2d_s
from jbackprop.linear import mm
from jbackprop.losses import cross_entropy_loss, logistic_loss, mse_loss
from jbackprop.models import conv_net, mlp, mlp_init, residual, resnet_s, resnet_s_init
from jbackprop.normalisation import layer_norm, layer_norm_s

__version__ = "0.1.0"

__all__ = [
    "backward", "check", "testing", "combinators", "reference", "Layer", "serial",
    "mm",
    "relu", "sigmoid", "tanh", "leaky_relu", "gelu", "softplus", "elu",
    "layer_norm_s", "layer_norm",
    "conv1d_s", "conv1d", "conv2d_s", "conv2d",
    "mse_loss", "logistic_loss", "cross_entropy_loss",
    "residual", "mlp_init", "mlp", "resnet_s_init", "resnet_s", "conv_net",
]
