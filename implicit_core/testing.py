"""The shared problem set, and the conformance checks a backend or solver plugin runs on itself.

A new backend or solver is tested by running these checks in its own test suite (as array
libraries run the array-API tests), not by editing this project's tests::

    import pytest
    from implicit_core.testing import BACKEND_CHECKS, SOLVER_CHECKS

    @pytest.mark.parametrize("check", BACKEND_CHECKS, ids=lambda c: c.__name__)
    def test_my_backend(check):
        check(MyBackend())

    @pytest.mark.parametrize("check", SOLVER_CHECKS, ids=lambda c: c.__name__)
    def test_my_solver(check):
        check(MySolver(), backend="numpy")

or in one call, :func:`check_backend` / :func:`check_solver`, which run every check and raise
one :class:`ConformanceError` listing each that failed. A backend that is not usable here
(``available()`` is false) raises :class:`~implicit_core.BackendUnavailableError`, which a test
turns into a skip.

The problem set is plain NumPy in float64 (convert with ``backend.xp.asarray``), so every
backend solves the very same numbers: :func:`tanh_problem` (a contractive ``tanh`` cell with
its solution and its exact gradient in closed form) and :func:`reference_work` (the
benchmarks' workload). Nothing here imports a framework.
"""

from __future__ import annotations

import functools
from collections import namedtuple
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ._backend import Backend
from ._errors import BackendUnavailableError
from ._plugin_base import Solver
from .cells import tanh_cell, tanh_cell_vjp

__all__ = [
    "TanhProblem", "tanh_problem", "reference_work",
    "ConformanceError", "BACKEND_CHECKS", "SOLVER_CHECKS", "check_backend", "check_solver",
]


class ConformanceError(AssertionError):
    """A plugin does not meet the contract; the message names the check and what differed."""


# ----------------------------------------------------------------------------- problem set
@dataclass(frozen=True)
class TanhProblem:
    """``z = tanh(z Wᵀ + c)`` per sample, with ``||W||₂ = norm < 1`` (a contraction).

    ``z_star`` is the solution to machine precision; :meth:`gradient` is the exact gradient
    of ``L = Σ w ⊙ z*`` with respect to ``(W, c)``, from the implicit function theorem:
    ``u = (I - Jᵀ)⁻¹ w`` per sample with ``J = D W``, ``D = diag(1 - z*²)``; then
    ``dL/dc = D u`` and ``dL/dW = Σ_b (D u) z*ᵀ``.
    """

    W: np.ndarray
    c: np.ndarray

    f = staticmethod(tanh_cell)
    vjp = staticmethod(tanh_cell_vjp)

    @property
    def args(self) -> tuple[np.ndarray, np.ndarray]:
        return self.W, self.c

    def z0(self) -> np.ndarray:
        return np.zeros_like(self.c)

    @functools.cached_property
    def z_star(self) -> np.ndarray:
        """The solution, by fixed-point iteration to machine precision (a contraction)."""
        z = self.z0()
        for _ in range(100_000):
            z_next = np.tanh(z @ self.W.T + self.c)
            if np.max(np.abs(z_next - z)) <= 1e-15:
                return z_next
            z = z_next
        raise ValueError("the tanh problem did not converge: ||W||₂ must be below 1")

    def gradient(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        D = 1.0 - self.z_star**2
        n = self.W.shape[0]
        Du = np.empty_like(w)
        for b in range(w.shape[0]):
            J = D[b][:, None] * self.W
            Du[b] = D[b] * np.linalg.solve(np.eye(n) - J.T, w[b])
        return Du.T @ self.z_star, Du


def tanh_problem(batch: int = 5, n: int = 8, norm: float = 0.8, seed: int = 0, input_scale: float = 1.0) -> TanhProblem:
    """A :class:`TanhProblem` with Gaussian ``W`` (rescaled to ``||W||₂ = norm``) and ``c``."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, n))
    W *= norm / np.linalg.norm(W, 2)
    c = input_scale * rng.standard_normal((batch, n))
    return TanhProblem(W, c)


def reference_work(n: int = 256, batch: int = 512, seed: int = 0) -> dict[str, np.ndarray]:
    """The benchmarks' workload ``f(z, x) = tanh(z Wᵀ + x Uᵀ + b)`` in float64 NumPy.

    ``X`` (batch, 64): scikit-learn's digits features scaled to [0, 1] when scikit-learn is
    installed (uniform noise otherwise); ``W`` (n, n) with ``||W||₂ = 0.9``; ``U`` (n, 64);
    ``b`` (n,); ``w`` (batch, n), a loss weight for ``L = Σ w ⊙ z*``.
    """
    rng = np.random.default_rng(seed)
    try:
        from sklearn.datasets import load_digits

        X = load_digits().data[:batch] / 16.0
    except ImportError:
        X = rng.random((batch, 64))
    W = rng.standard_normal((n, n))
    W *= 0.9 / np.linalg.norm(W, 2)
    U = rng.standard_normal((n, X.shape[1])) / np.sqrt(X.shape[1])
    b = 0.1 * rng.standard_normal(n)
    w = np.random.default_rng(seed + 1).standard_normal((batch, n))
    return {"X": X, "W": W, "U": U, "b": b, "w": w}


# ----------------------------------------------------------------------------- helpers
def _usable(backend: Backend | str) -> Backend:
    from ._registry import get_backend

    be = get_backend(backend) if isinstance(backend, str) else backend
    ok, reason = be.available()
    if not ok:
        raise BackendUnavailableError(f"backend {be.name!r} is not usable here: {reason}")
    return be


def _host(be: Backend, x: Any) -> np.ndarray:
    return np.asarray(be.to_python(x), dtype=float)


def _close(what: str, got: Any, want: np.ndarray, atol: float) -> None:
    got = np.asarray(got, dtype=float)
    if got.shape != want.shape:
        raise ConformanceError(f"{what}: shape {got.shape}, expected {want.shape}")
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    if not err <= atol:
        raise ConformanceError(f"{what}: off by {err:.3g} (tolerance {atol:.1g})")


def _arrays(be: Backend, p: TanhProblem, dtype: str = "float64") -> tuple[Any, tuple]:
    """``(z0, args)`` of the problem as the backend's arrays of ``dtype``."""
    xp = be.xp
    args = tuple(xp.asarray(a.astype(dtype)) for a in p.args)
    if str(args[0].dtype).rsplit(".", 1)[-1] != dtype:
        raise ConformanceError(
            f"xp.asarray of a {dtype} array gave {args[0].dtype}: the checks need {dtype} arrays "
            "(JAX: jax.config.update('jax_enable_x64', True) before any array exists)"
        )
    return xp.asarray(p.z0().astype(dtype)), args


def _solve(be: Backend, p: TanhProblem, dtype: str = "float64", args: Any = None, **options: Any) -> tuple[Any, Any, tuple]:
    from ._api import fixed_point

    z0, own = _arrays(be, p, dtype)
    args = own if args is None else args
    options.setdefault("on_fail", "ignore")
    vjp = tanh_cell_vjp if be.explicit_vjp else None
    z, info = fixed_point(tanh_cell, z0, args, backend=be.name, vjp=vjp, **options)
    return z, info, args


# ----------------------------------------------------------------------------- backend checks
def discovery(backend: Backend) -> None:
    """``name``, ``requires`` and ``available()`` follow the contract."""
    if not isinstance(backend.name, str) or not backend.name.isidentifier():
        raise ConformanceError(f"name must be an identifier users pass as backend=..., got {backend.name!r}")
    if not isinstance(backend.requires, tuple) or not all(isinstance(m, str) for m in backend.requires):
        raise ConformanceError(f"requires must be a tuple of module names, got {backend.requires!r}")
    out = backend.available()
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], bool) and isinstance(out[1], str)):
        raise ConformanceError(f"available() must return (bool, reason: str), got {out!r}")
    if not out[0] and not out[1]:
        raise ConformanceError("available() says unusable without saying why")


def arrays(backend: Backend) -> None:
    """The namespace makes arrays the backend owns; host round trips, devices and copies hold."""
    be = _usable(backend)
    xp = be.xp
    host = np.arange(6.0).reshape(2, 3)
    x = xp.asarray(host)
    if not be.owns(x):
        raise ConformanceError("owns() is false for an array of the backend's own namespace")
    if be.owns([1.0, 2.0]) or be.owns(1.0):
        raise ConformanceError("owns() must be false for Python lists and floats")
    _close("to_python(asarray(x))", be.to_python(x), host, 0.0)
    _close("stop_gradient(x)", _host(be, be.stop_gradient(x)), host, 0.0)
    if be.device(xp.zeros((2,), dtype=x.dtype, device=be.device(x))) != be.device(x):
        raise ConformanceError("an array allocated with device=backend.device(x) is not on x's device")
    probe = be.random_normal(x, seed=0)
    if tuple(probe.shape) != (2, 3) or probe.dtype != x.dtype:
        raise ConformanceError("random_normal(like) must match like's shape and dtype")
    bad = xp.asarray(np.array([1.0, np.nan]))
    if be.all_finite(bad) is True or be.all_finite(x) is False:
        raise ConformanceError("all_finite() must be False (or None when unknown) with a NaN, True without")
    mask = xp.asarray(np.array([True, False]))
    if be.all_on_host(mask):
        raise ConformanceError("all_on_host() answered True for a mask with a False entry")
    view = be.host_view(x)
    if view is not None:  # (the solve loop then keeps its bookkeeping in NumPy)
        if not isinstance(view, np.ndarray):
            raise ConformanceError(f"host_view(x) must be a numpy.ndarray or None, got {type(view).__name__}")
        _close("host_view(x)", view, host, 0.0)
        if view.flags.writeable:  # (written through by at_set_where: it must be x's memory)
            buffer = xp.asarray(np.zeros((2, 3)), dtype=x.dtype, device=be.device(x))
            written = be.host_view(buffer)
            written[1, 2] = 1.0
            if be.to_python(buffer)[1][2] != 1.0:
                raise ConformanceError("host_view(x) is writeable but not x's memory: return a read-only view or None")
        back = be.from_host(np.array([1, 0, 2], dtype=np.int32), x)
        if not be.owns(back) or be.device(back) != be.device(x):
            raise ConformanceError("from_host(a, like) must return the backend's array on like's device")
        _close("from_host(a, like)", _host(be, back), np.array([1, 0, 2]), 0.0)


def at_set(backend: Backend) -> None:
    """``at_set`` writes a slot (int or 0-d integer array index) and returns the buffer;
    ``at_set_where`` writes one for the masked samples only, on either axis."""
    be = _usable(backend)
    xp = be.xp
    for slot in (1, xp.asarray(1, dtype=xp.int32)):
        buffer = xp.zeros((2, 3, 2), dtype=xp.float64)
        out = be.at_set(buffer, (slice(None), slot, ...), xp.ones((2, 2), dtype=xp.float64))
        want = np.zeros((2, 3, 2))
        want[:, 1] = 1.0
        _close(f"at_set(buffer, (:, {type(slot).__name__} 1), 1)", _host(be, out), want, 0.0)
    # at_set_where: one slot rewritten for the masked samples only, on either axis of a (batch, m, m) buffer
    start = np.arange(27, dtype=np.float64).reshape(3, 3, 3)
    mask = xp.asarray(np.array([[True], [False], [True]]))
    value = np.arange(9, dtype=np.float64).reshape(3, 3) - 10.0
    for axis in (1, 2):
        for slot in (2, xp.asarray(2, dtype=xp.int32)):
            out = be.at_set_where(xp.asarray(start.copy()), axis, slot, xp.asarray(value), mask)
            want = start.copy()
            for sample in (0, 2):
                want[(sample,) + (slice(None),) * (axis - 1) + (2,)] = value[sample]
            _close(f"at_set_where(buffer, axis={axis}, {type(slot).__name__} 2, value, [True, False, True])",
                   _host(be, out), want, 0.0)


def trees(backend: Backend) -> None:
    """``tree_flatten`` / ``tree_unflatten`` round-trip arrays, tuples, named tuples and dicts."""
    be = _usable(backend)
    xp = be.xp
    Pair = namedtuple("Pair", "a b")
    a, b, c = (xp.asarray(np.full((2, k + 1), float(k))) for k in range(3))
    for tree in (a, (a, b), [a, (b, c)], {"x": a, "y": {"z": b}}, Pair(a, c)):
        leaves, treedef = be.tree_flatten(tree)
        if not all(be.owns(leaf) for leaf in leaves):
            raise ConformanceError(f"tree_flatten({type(tree).__name__}) returned leaves that are not arrays")
        back = be.tree_unflatten(treedef, leaves)
        if type(back) is not type(tree):
            raise ConformanceError(f"tree_unflatten gave a {type(back).__name__} for a {type(tree).__name__}")
        if len(be.tree_flatten(back)[0]) != len(leaves):
            raise ConformanceError(f"a {type(tree).__name__} lost leaves in a round trip")


def control_flow(backend: Backend) -> None:
    """``while_loop``, ``cond`` and ``switch`` run the loop body and pick the branch (eager or traced)."""
    be = _usable(backend)
    xp = be.xp
    carry = {"k": xp.asarray(0, dtype=xp.int32), "x": xp.zeros((3,), dtype=xp.float64)}
    out = be.while_loop(lambda c: c["k"] < 5, lambda c: {"k": c["k"] + 1, "x": c["x"] + 2.0}, carry)
    _close("while_loop: 5 steps of x += 2", _host(be, out["x"]), np.full(3, 10.0), 0.0)
    for pred, want in ((True, 1.0), (False, -1.0)):
        got = be.cond(xp.asarray(pred), lambda: xp.ones((2,)), lambda: -xp.ones((2,)))
        _close(f"cond({pred})", _host(be, got), np.full(2, want), 0.0)
    for index in range(3):
        got = be.switch(xp.asarray(index, dtype=xp.int32), [lambda i=i: xp.full((2,), float(i)) for i in range(3)])
        _close(f"switch({index})", _host(be, got), np.full(2, float(index)), 0.0)


def solves(backend: Backend) -> None:
    """Every built-in solver reaches the known solution (float64, to 1e-9) and reports it."""
    be = _usable(backend)
    p = tanh_problem()
    for solver in ("fixed_point", "anderson", "broyden"):
        z, info, _ = _solve(be, p, solver=solver, tol=1e-11, max_iter=300)
        _close(f"solver {solver!r} on the tanh problem", _host(be, z), p.z_star, 1e-9)
        if not bool(np.all(_host(be, info.converged))):
            raise ConformanceError(f"solver {solver!r} converged but info.converged says otherwise")


def vector_jacobian_products(backend: Backend) -> None:
    """``linearise(problem, z)(v) = J_F(z)ᵀ v``, checked against central finite differences."""
    from ._api import _build_problem
    from ._problem import FIXED_POINT

    be = _usable(backend)
    xp = be.xp
    p = tanh_problem(batch=3, n=5)
    args = tuple(xp.asarray(a) for a in p.args)
    z_host = 0.3 * np.random.default_rng(1).standard_normal(p.c.shape)
    z = xp.asarray(z_host)
    problem = _build_problem(be, tanh_cell, z, args, FIXED_POINT, tanh_cell_vjp if be.explicit_vjp else None)
    v = np.random.default_rng(2).standard_normal(z_host.shape)
    got = _host(be, be.linearise(problem, problem.flatten(z))(xp.asarray(v)))
    h, want = 1e-6, np.empty_like(z_host)
    for i in range(z_host.shape[1]):
        e = np.zeros_like(z_host)
        e[:, i] = h
        fp, fm = (np.tanh((z_host + s * e) @ p.W.T + p.c) for s in (1, -1))
        want[:, i] = np.sum(v * (fp - fm), axis=1) / (2 * h)
    _close("linearise(problem, z)(v) against finite differences", got, want, 1e-7)


def gradients(backend: Backend, gradient_of: Callable[[Callable[[Any], Any], Any, np.ndarray], Any] | None = None) -> None:
    """IFT gradients of ``L = Σ w ⊙ z*`` equal the closed form (float64, to 1e-8).

    Read from ``info.vjp(w)`` where the backend returns one. An autodiff backend without it
    passes ``gradient_of(solve, args, w) -> (dL/dW, dL/dc)``, computed with its framework for
    ``L = Σ w ⊙ solve(args)`` (torch: ``args`` with ``requires_grad``, then ``autograd.grad``).
    """
    be = _usable(backend)
    p = tanh_problem()
    w = np.random.default_rng(3).standard_normal(p.z_star.shape)
    rule = {"gradient": "ift", "tol": 1e-12, "max_iter": 300}
    if gradient_of is not None:
        got = gradient_of(lambda args: _solve(be, p, args=args, **rule)[0], _arrays(be, p)[1], w)
    else:
        _, info, _ = _solve(be, p, **rule)
        if getattr(info, "vjp", None) is None:
            raise ConformanceError(
                "the backend returns no info.vjp: pass gradient_of(solve, args, w) computing "
                "dL/dargs of L = sum(w * solve(args)) with its framework's autodiff"
            )
        got = info.vjp(be.xp.asarray(w))
    for name, g, want in zip(("dL/dW", "dL/dc"), got, p.gradient(w)):
        _close(f"IFT {name}", _host(be, g), want, 1e-8)


BACKEND_CHECKS: tuple[Callable[..., None], ...] = (
    discovery, arrays, at_set, trees, control_flow, solves, vector_jacobian_products, gradients,
)


def check_backend(backend: Backend | str, gradient_of: Callable[..., Any] | None = None) -> None:
    """Run every check in :data:`BACKEND_CHECKS`; one :class:`ConformanceError` lists the failures."""
    be = _usable(backend)
    failures = []
    for check in BACKEND_CHECKS:
        try:
            check(be, gradient_of) if check is gradients else check(be)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, per check
            failures.append(f"{check.__name__}: {type(exc).__name__}: {exc}")
    if failures:
        raise ConformanceError(f"backend {be.name!r} fails {len(failures)} check(s):\n  " + "\n  ".join(failures))


# ----------------------------------------------------------------------------- solver checks
#: One stopping rule for every solver check: a traced backend then compiles each shape once.
_SOLVER_RULE = {"tol": 1e-10, "max_iter": 500}


def solver_converges(solver: Solver, backend: Backend | str = "numpy") -> None:
    """The solver reaches the tanh problem's solution (float64, to 1e-9) and says so."""
    be = _usable(backend)
    p = tanh_problem()
    z, info, _ = _solve(be, p, solver=solver, **_SOLVER_RULE)
    _close(f"solver {solver.name!r} on the tanh problem", _host(be, z), p.z_star, 1e-9)


def solver_keeps_dtype(solver: Solver, backend: Backend | str = "numpy") -> None:
    """A float32 solve stays float32 (no promotion by a Python or NumPy scalar in ``step``)."""
    be = _usable(backend)
    z, info, _ = _solve(be, tanh_problem(), dtype="float32", solver=solver, tol=1e-5, max_iter=500)
    if z.dtype != be.xp.float32:
        raise ConformanceError(f"a float32 state came back as {z.dtype}")
    _close(f"solver {solver.name!r} in float32", _host(be, z), tanh_problem().z_star, 1e-4)


def solver_samples_are_independent(solver: Solver, backend: Backend | str = "numpy") -> None:
    """A sample's result does not depend on its batch-mates (it stops and is frozen on its own)."""
    be = _usable(backend)
    p = tanh_problem()
    easy = TanhProblem(p.W, np.concatenate([p.c[:2], 0.01 * p.c[2:]]))  # three samples converge sooner
    together, _, _ = _solve(be, easy, solver=solver, **_SOLVER_RULE)
    together = _host(be, together)
    for b in range(p.c.shape[0]):
        alone = TanhProblem(p.W, easy.c[b : b + 1])
        z, _, _ = _solve(be, alone, solver=solver, **_SOLVER_RULE)
        _close(f"sample {b} solved with its batch-mates vs alone", together[b : b + 1], _host(be, z), 1e-8)


def solver_state_contract(solver: Solver, backend: Backend | str = "numpy") -> None:
    """``init``/``step`` return dicts with ``z`` and ``F(z)`` shaped like the iterate."""
    from ._api import _build_problem
    from ._problem import FIXED_POINT

    be = _usable(backend)
    xp = be.xp
    p = tanh_problem(batch=3, n=5)
    args = tuple(xp.asarray(a) for a in p.args)
    z0 = xp.asarray(p.z0())
    problem = _build_problem(be, tanh_cell, z0, args, FIXED_POINT, tanh_cell_vjp if be.explicit_vjp else None)
    problem.max_steps = 20
    state = solver.init(problem, z0)
    for k in range(3):
        if not (isinstance(state, dict) and "z" in state and "fz" in state):
            raise ConformanceError(f"state after {k} steps must be a dict with 'z' and 'fz'")
        _close(f"state['fz'] after {k} steps", _host(be, state["fz"]), np.tanh(_host(be, state["z"]) @ p.W.T + p.c), 1e-12)
        active = xp.asarray(np.array([True, False, True]))
        state = solver.step(problem, state, xp.asarray(k, dtype=xp.int32), active)


SOLVER_CHECKS: tuple[Callable[..., None], ...] = (
    solver_state_contract, solver_converges, solver_keeps_dtype, solver_samples_are_independent,
)


def check_solver(solver: Solver, backends: tuple[str, ...] | None = None) -> None:
    """Run :data:`SOLVER_CHECKS` on every usable backend in ``backends`` (default: all registered).

    Traced backends (JAX) run the solver under ``jit``, so Python control flow on the step
    counter or on array values is caught here rather than by a user.
    """
    from ._registry import available_backends

    names = list(backends) if backends is not None else list(available_backends())
    failures = []
    for name in names:
        for check in SOLVER_CHECKS:
            try:
                check(solver, name)
            except BackendUnavailableError:
                break
            except Exception as exc:  # noqa: BLE001 - reported per check
                failures.append(f"{name} / {check.__name__}: {type(exc).__name__}: {exc}")
    if failures:
        raise ConformanceError(f"solver {solver.name!r} fails {len(failures)} check(s):\n  " + "\n  ".join(failures))
