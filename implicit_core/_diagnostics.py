"""Backend-neutral quantities around a solve: Jacobian regularisation and spectral radius."""

from __future__ import annotations

from typing import Any, Callable

from ._api import _build_problem, _resolve_backend
from ._ops import bnorm
from ._plugin_base import check_positive_int
from ._problem import FIXED_POINT


def _problem(f, z, args, backend, vjp):
    be = _resolve_backend(backend, z, args)
    return _build_problem(be, f, z, args, FIXED_POINT, vjp)


def jacobian_regularisation(
    f: Callable[[Any, Any], Any], z: Any, args: Any = None, *, seed: int = 0, backend: str | None = None, vjp: Any = None
) -> Any:
    """Hutchinson estimate of ``||J||_F^2 / n`` per sample, ``J = df/dz`` at ``z``.

    ``E_e ||e^T J||^2 = ||J||_F^2`` for a standard normal probe ``e`` (Bai et al., 2021), so
    one VJP gives an unbiased estimate. On autodiff backends the result is differentiable with
    respect to the parameters of ``f`` (add ``gamma * mean(...)`` to the loss); on NumPy/CuPy
    it is a value computed with the ``vjp=`` the user provides.
    """
    problem = _problem(f, z, args, backend, vjp)
    return problem.backend.jacobian_penalty(problem, problem.flatten(z), seed)


def spectral_radius(
    f: Callable[[Any, Any], Any], z: Any, args: Any = None, *, n_iter: int = 30, seed: int = 0,
    backend: str | None = None, vjp: Any = None,
) -> Any:
    """Power-iteration estimate of the spectral radius of ``J = df/dz`` at ``z``, per sample.

    Iterates ``v <- J^T v / ||J^T v||`` and returns ``||J^T v||`` (``n_iter`` VJPs). It
    converges to ``|lambda_max|`` when the dominant eigenvalue is unique in modulus; values
    ``>= 1`` warn that fixed-point iteration will not converge near ``z``.
    """
    check_positive_int("spectral_radius", "n_iter", n_iter)
    problem = _problem(f, z, args, backend, vjp)
    be, xp = problem.backend, problem.xp
    z_flat = be.stop_gradient(problem.flatten(z))
    with be.forward_context():
        lin = be.linearise(problem, z_flat)
        v = be.random_normal(z_flat, seed)
        v = v / bnorm(xp, v)[:, None]
        estimate = bnorm(xp, v)
        for _ in range(n_iter):
            w = lin(v)
            estimate = bnorm(xp, w)
            v = w / (estimate[:, None] + problem.eps)
    return estimate
