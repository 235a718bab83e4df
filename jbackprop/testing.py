"""pytest helpers: ``assert_vjp_correct`` and ``assert_jvp_correct`` fail with a message that
names the leaf, the worst index, both values and the tolerance."""
from __future__ import annotations

from typing import Any, Callable

from jbackprop.check import verify_jvp, verify_vjp
from jbackprop.check.report import Report


def assert_vjp_correct(fn: Callable, *args: Any, reference: Callable | None = None,
                       **options: Any) -> Report:
    """Assert that ``fn``'s hand-written VJP passes ``jbackprop.check.verify_vjp``.

    Example::

        def test_my_lse():
            assert_vjp_correct(my_lse, jnp.array([1.0, 2.0, 3.0]), reference=naive_lse)

    Args:
      fn, *args, reference, **options: as for ``verify_vjp`` (``backward=``, ``argnums=``,
        ``batch_argnums=``, ``rtol=``, ``checks=``, ``seed=``).

    Returns:
      The ``Report``, for further assertions.

    Raises:
      AssertionError: listing every failed part, e.g. ``"mm: z vs autodiff: error 0.83 > tol
        1e-09; worst at index (2,): hand-written 1.5, expected -0.25"``, then the table.
    """
    __tracebackhide__ = True  # pytest: point at the caller
    report = verify_vjp(fn, *args, reference=reference, **options)
    if not report.passed:
        raise AssertionError("hand-written VJP is wrong:\n" + "\n".join(report.failures())
                             + "\n\n" + str(report))
    return report


def assert_jvp_correct(fn: Callable, *args: Any, reference: Callable | None = None,
                       **options: Any) -> Report:
    """Assert that ``fn``'s hand-written JVP passes ``jbackprop.check.verify_jvp`` (against the
    reference and finite differences, and against the hand-written VJP by the adjoint identity).

    Args:
      fn, *args, reference, **options: as for ``verify_jvp`` (``tangent=``, ``argnums=``,
        ``rtol=``, ``checks=``, ``seed=``).

    Raises:
      AssertionError: listing every failed part, then the table.
    """
    __tracebackhide__ = True
    report = verify_jvp(fn, *args, reference=reference, **options)
    if not report.passed:
        raise AssertionError("hand-written JVP is wrong:\n" + "\n".join(report.failures())
                             + "\n\n" + str(report))
    return report
