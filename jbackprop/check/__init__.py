"""Verification of hand-written VJPs and JVPs.

* ``verify_vjp`` (``engine.py``): one function's VJP against independent evidence, as a report;
* ``verify_jvp`` (``forward.py``): its JVP, and the two hand-written rules against each other
  (the adjoint identity ``⟨J ż, v⟩ = ⟨ż, Jᵀ v⟩``);
* ``locate_nonfinite`` (``nonfinite.py``): the first module whose backward turns a finite
  cotangent into NaN or Inf, with the leaf and the step of the chain;
* ``jbackprop.check.report``: the report (per-leaf rows, whole-function checks, table, JSON);
* ``jbackprop.check.cases``: the library's own cases, from the module registry, run by
  ``jbackprop check`` and by the test-suite.
"""
from jbackprop.check.engine import ALL_CHECKS, FD_TOL, TOLERANCES, verify_vjp
from jbackprop.check.forward import JVP_CHECKS, verify_jvp
from jbackprop.check.nonfinite import NonFiniteReport, locate_nonfinite
from jbackprop.check.report import Report

__all__ = ["verify_vjp", "verify_jvp", "JVP_CHECKS", "Report", "ALL_CHECKS", "TOLERANCES",
           "FD_TOL", "locate_nonfinite", "NonFiniteReport"]
