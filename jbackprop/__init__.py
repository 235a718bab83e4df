"""jbackprop: neural-network modules with hand-written backward functions, wired into JAX.

Every module is a pure forward plus the backward function B[M, z] (and B[M, θ]) of the course
notes and its forward-mode twin, the JVP J_M ż, both written by hand and wired into JAX by
``jb.custom_rules`` (``jax.grad`` runs the backward; ``jax.jvp``, ``jax.jacfwd`` and
``jax.hessian`` run the JVP). Each module works on one example
in the notes' convention and is batched with ``jax.vmap`` (or extra leading axes).
``jb.backward(module)`` and ``jb.tangent(module)`` give the two hand-written rules in the
notes' form. See ``docs/``.

Subpackages: ``jbackprop.modules`` (the modules and their registry), ``jbackprop.check``
(verification), ``jbackprop.train`` (training), ``jbackprop.bench`` (benchmarks);
``jbackprop.reference`` (the pure-jnp mathematics) and ``jbackprop.testing`` (pytest helper).
The modules are re-exported from their family's ``__all__``.
"""
from jbackprop import check, reference, testing
from jbackprop.modules import combinators
from jbackprop.modules.activations import *  # noqa: F401,F403
from jbackprop.modules.attention import *  # noqa: F401,F403
from jbackprop.modules.combinators import Layer, serial
from jbackprop.modules.convolution import *  # noqa: F401,F403
from jbackprop.modules.fused_loss import *  # noqa: F401,F403
from jbackprop.modules.linear import *  # noqa: F401,F403
from jbackprop.modules.losses import *  # noqa: F401,F403
from jbackprop.modules.models import *  # noqa: F401,F403
from jbackprop.modules.normalisation import *  # noqa: F401,F403
from jbackprop.modules.pooling import *  # noqa: F401,F403
from jbackprop.modules.regularisation import *  # noqa: F401,F403
from jbackprop.modules.rules import custom_rules
from jbackprop.modules.transformer import *  # noqa: F401,F403
from jbackprop.modules.wiring import backward, tangent


def _public(*families: str) -> list[str]:
    """The ``__all__`` of each family's module, in order."""
    import importlib
    return [n for f in families for n in importlib.import_module(f"jbackprop.modules.{f}").__all__]


__version__ = "0.1.0"

__all__ = ["backward", "tangent", "custom_rules", "check", "testing", "combinators", "reference",
           "Layer", "serial",
           *_public("linear", "activations", "normalisation", "convolution", "pooling", "losses",
                    "fused_loss", "attention", "regularisation", "models", "transformer")]
