"""The modules: each a pure forward with a hand-written backward, declared once in the registry.

One file per family — ``linear``, ``activations``, ``normalisation``, ``convolution``,
``losses``, ``models`` (the residual block, MLP, ResNet-S, a CNN) — and ``combinators`` (stax-like
layers). ``wiring`` connects a module to JAX (``custom_vjp``, the ``vmap`` dispatch, the notes-form
backward); ``arguments`` holds the argument checks; ``registry`` the declarations.
"""
