"""What a solve reports, per sample."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ._errors import ConfigurationError, ConvergenceError, ConvergenceWarning

# Per-sample status codes (``SolveInfo.status``).
RUNNING, CONVERGED, MAX_ITER, NON_FINITE, DIVERGED, RECHECK_FAILED = 0, 1, 2, 3, 4, 5
STATUS_NAMES = {
    RUNNING: "running",
    CONVERGED: "converged",
    MAX_ITER: "max_iter reached",
    NON_FINITE: "non-finite values",
    DIVERGED: "diverged",
    RECHECK_FAILED: "residual above tol when re-measured on the whole batch",
}
#: Said when a sample fails the final re-measurement: the usual cause.
COUPLED_HINT = (
    "Samples that met tol while iterating failed it when the returned batch was evaluated as a "
    "whole: they depend on each other (batch statistics, attention across the batch, or one "
    "unbatched system). Pass batched=False to solve the whole state as one system."
)
ON_FAIL = ("warn", "raise", "ignore")


@dataclass
class SolveInfo:
    """Per-sample outcome of a solve; arrays are of the backend's type, length ``batch``.

    Attributes:
        steps: solver iterations each sample took before it stopped.
        residual: ``||F(z*) - z*||`` of the returned (lowest-residual) iterate.
        rel_residual: ``residual / (||F(z*)|| + eps)``.
        converged: ``residual`` (or ``rel_residual``, by ``stop_mode``) ``<= tol``.
        status: ``1`` converged, ``2`` max_iter reached, ``3`` non-finite values, ``4`` diverged,
            ``5`` met ``tol`` while iterating but not when re-measured on the returned batch.
        trace: ``(iterations + 1, batch)`` absolute residuals when ``trace=True``.
        backward: the :class:`SolveInfo` of the last backward solve (``ift``, refinements).
        extras: estimator reports, e.g. ``extras["fallback"]`` for ``shine``.
        vjp: on backends without autodiff, ``vjp(g) -> dL/dargs`` by the chosen estimator.
        jac_loss: with ``jac_reg=True``, the per-sample Hutchinson estimate of
            ``||df/dz||_F^2 / n`` at ``z*`` (differentiable on autodiff backends).
    """

    steps: Any
    residual: Any
    rel_residual: Any
    converged: Any
    status: Any
    solver: str = ""
    gradient: str = ""
    trace: Any = None
    backward: "SolveInfo | None" = None
    extras: dict[str, Any] = field(default_factory=dict)
    vjp: Callable[[Any], Any] | None = None
    jac_loss: Any = None
    to_python: Callable[[Any], Any] = field(default=lambda x: x.tolist(), repr=False)

    def _host(self, name: str) -> "np.ndarray":
        return np.asarray(self.to_python(getattr(self, name)))

    @property
    def failed(self) -> list:
        """Indices of the samples that did not converge.

        Ints for one solve; index tuples when the arrays have more axes (a ``SolveInfo``
        returned through ``jax.vmap`` has the mapped axes first, the samples last).
        """
        ok = self._host("converged")
        if ok.ndim <= 1:
            return [int(i) for i in np.flatnonzero(~ok.astype(bool))]
        return [tuple(int(j) for j in idx) for idx in np.argwhere(~ok.astype(bool))]

    def reasons(self) -> dict:
        """``{sample: why it failed}`` for every failed sample."""
        codes = self._host("status")
        return {i: STATUS_NAMES.get(int(codes[i]), "unknown") for i in self.failed}

    def summary(self) -> str:
        steps = self._host("steps")
        res = self._host("residual")
        batch = int(steps.size)
        fails = self.reasons()
        text = (
            f"{self.solver or 'solve'}: {batch - len(fails)}/{batch} converged, "
            f"steps max {int(steps.max()) if batch else 0}, residual max {float(res.max()) if batch else 0:.3g}"
        )
        if fails:
            kinds: dict[str, list[int]] = {}
            for i, why in fails.items():
                kinds.setdefault(why, []).append(i)
            parts = [f"{why}: samples {_short(idx)}" for why, idx in kinds.items()]
            text += " — failed (" + "; ".join(parts) + ")"
        return text


def _short(idx: list[int], limit: int = 8) -> str:
    head = ", ".join(str(i) for i in idx[:limit])
    return f"[{head}{', …' if len(idx) > limit else ''}] ({len(idx)})"


def check_on_fail(on_fail: str) -> str:
    if on_fail not in ON_FAIL:
        from ._errors import did_you_mean

        raise ConfigurationError(f"on_fail must be one of {ON_FAIL}, got {on_fail!r}.{did_you_mean(on_fail, ON_FAIL)}")
    return on_fail


def report(info: SolveInfo, on_fail: str, stage: str = "forward") -> None:
    """Warn or raise when some samples failed, as ``on_fail`` asks (host-side check)."""
    if on_fail == "ignore":
        return
    failed = info.failed
    if not failed:
        return
    coupled = RECHECK_FAILED in np.asarray(info.to_python(info.status))
    advice = COUPLED_HINT if coupled else (
        "Raise max_iter, relax tol, try another solver, or inspect info.status / info.residual."
    )
    message = (
        f"{stage} solve did not converge for {len(failed)} sample(s): {info.summary()}. "
        f"{advice} on_fail='ignore' silences this."
    )
    if on_fail == "raise":
        raise ConvergenceError(message, info)
    warnings.warn(message, ConvergenceWarning, stacklevel=user_stacklevel())


#: Modules whose frames are not the user's: this library and its plugins, and the frameworks
#: whose machinery runs a solve (an autograd engine, a JAX transformation, an Equinox wrapper).
_LIBRARY_PREFIXES = ("implicit_", "torch", "jax", "jaxlib", "equinox", "contextlib", "functools", "threading")


def user_stacklevel() -> int:
    """``stacklevel`` that attributes a warning to the first frame outside the library."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not name.startswith(_LIBRARY_PREFIXES):
            return level
        frame, level = frame.f_back, level + 1
    return 1
