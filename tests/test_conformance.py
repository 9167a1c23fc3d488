"""The public conformance suite (implicit_core.testing) on every registered backend and solver,
and proof that it catches what it is for."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import implicit_core as ic
from implicit_core.plugin import Solver
from implicit_core.testing import (
    BACKEND_CHECKS,
    ConformanceError,
    check_backend,
    check_solver,
    gradients,
    solver_keeps_dtype,
    tanh_problem,
)
from helpers import BACKENDS, backend_or_skip


def torch_gradient(solve, args, w):
    import torch

    args = tuple(a.detach().requires_grad_(True) for a in args)
    return torch.autograd.grad((solve(args) * torch.as_tensor(w)).sum(), args)


#: Autodiff backends that return no info.vjp say how their framework differentiates.
GRADIENT_OF = {"torch": torch_gradient}


@pytest.mark.parametrize("check", BACKEND_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", BACKENDS)
def test_every_registered_backend_conforms(name, check):
    be = backend_or_skip(name)
    if check is gradients:
        check(be, GRADIENT_OF.get(name))
    else:
        check(be)


@pytest.mark.parametrize("backend", ["numpy", "jax"], ids=["eager", "traced"])
@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_built_in_solvers_conform_on_eager_and_traced_backends(solver, backend):
    backend_or_skip(backend)
    check_solver(ic.get_solver(solver), backends=(backend,))


def test_tanh_problem_knows_its_solution_and_gradient():
    p = tanh_problem(batch=3, n=4)
    np.testing.assert_allclose(np.tanh(p.z_star @ p.W.T + p.c), p.z_star, atol=1e-15)
    w = np.random.default_rng(0).standard_normal(p.c.shape)
    dW, dc = p.gradient(w)
    # against central differences of L(c) = sum(w * z*(c)), through fresh solves
    h, fd = 1e-6, np.empty_like(p.c)
    for b in range(3):
        for i in range(4):
            e = np.zeros_like(p.c)
            e[b, i] = h
            plus, minus = (np.sum(w * ic.testing.TanhProblem(p.W, p.c + s * e).z_star) for s in (1, -1))
            fd[b, i] = (plus - minus) / (2 * h)
    np.testing.assert_allclose(dc, fd, atol=1e-8)


# ----------------------------------------------------------------------------- it catches
def test_a_backend_that_drops_writes_fails_the_suite():
    from implicit_numpy import NumpyBackend

    class Forgetful(NumpyBackend):
        name = "forgetful"

        def at_set(self, buffer, index, value):
            return buffer  # the write is lost

    with pytest.raises(ConformanceError, match="at_set"):
        check_backend(Forgetful())


class _FixedPointStep(Solver):
    """``z <- step_map(state)``, one evaluation of ``F`` per step; subclasses break the contract."""

    def init(self, problem, z0):
        return {"z": z0, "fz": problem.F(z0)}

    def step(self, problem, state, k, active):
        z = self.step_map(state, k)
        return {"z": z, "fz": problem.F(z)}


@dataclass(eq=False)
class EagerOnly(_FixedPointStep):
    """Branches in Python on the step counter: fine eagerly, impossible under jit."""

    name = "eager_only"

    def step_map(self, state, k):
        return state["fz"] if k > 0 else 0.5 * (state["z"] + state["fz"])


@dataclass(eq=False)
class Promoting(_FixedPointStep):
    """Mixes a NumPy float64 scalar into the state: a float32 solve comes back float64."""

    name = "promoting"

    def step_map(self, state, k):
        return np.float64(1.0) * state["fz"]


def test_a_solver_with_python_control_flow_on_k_fails_under_jit():
    pytest.importorskip("jax")
    backend_or_skip("jax")
    check_solver(EagerOnly(), backends=("numpy",))  # eagerly it works
    with pytest.raises(ConformanceError, match="jax / solver"):
        check_solver(EagerOnly(), backends=("jax",))


def test_a_solver_that_promotes_the_dtype_fails():
    with pytest.raises(Exception, match="float64|dtype"):
        solver_keeps_dtype(Promoting(), "numpy")
