"""A plugin that misbehaves at solve time gets a PluginError naming it; the others keep working."""

import dataclasses

import numpy as np
import pytest

import implicit_core as ic
from helpers import tanh_case


def host(be, x):
    return np.asarray(be.to_python(x))


@dataclasses.dataclass(eq=False)
class Faulty(ic.Solver):
    name = "faulty"
    fault: str = "not_a_dict"

    def init(self, problem, z0):
        if self.fault == "init_raises":
            raise ZeroDivisionError("bug in init")
        return {"z": z0, "fz": problem.F(z0)}

    def step(self, problem, state, k, active):
        xp = problem.xp
        return {
            "not_a_dict": lambda: state["z"],
            "missing_fz": lambda: {"z": state["fz"]},
            "wrong_shape": lambda: {"z": state["z"][:, :3], "fz": state["fz"][:, :3]},
            "wrong_dtype": lambda: {"z": xp.astype(state["fz"], xp.float32), "fz": xp.astype(state["fz"], xp.float32)},
            "wrong_residual": lambda: {"z": state["fz"], "fz": problem.F(state["fz"]), "g": state["fz"][:, :3]},
            "step_raises": lambda: 1 / 0,
        }[self.fault]()


@dataclasses.dataclass(eq=False)
class FaultyGradient(ic.GradientEstimator):
    name = "faulty_gradient"
    fault: str = "wrong_shape"

    def estimate(self, ctx):
        return {"wrong_shape": lambda: ctx.g[:, :3], "returns_none": lambda: None,
                "raises": lambda: [][1]}[self.fault]()


SOLVER_FAULTS = [
    ("not_a_dict", "step\\(\\) must return a dict with 'z' and 'fz'"),
    ("missing_fz", "must return a dict with 'z' and 'fz', got \\['z'\\]"),
    ("wrong_shape", "step\\(\\)\\['z'\\] has shape \\(5, 3\\)"),
    ("wrong_dtype", "step\\(\\)\\['z'\\] has shape \\(5, 8\\) and dtype (\\w+\\.)?float32; expected"),
    ("wrong_residual", "step\\(\\)\\['g'\\] has shape \\(5, 3\\)"),
    ("step_raises", "raised ZeroDivisionError in step\\(\\)"),
    ("init_raises", "raised ZeroDivisionError in init\\(\\): bug in init"),
]
GRADIENT_FAULTS = [
    ("wrong_shape", "estimate\\(\\) has shape \\(5, 3\\)"),
    ("returns_none", "estimate\\(\\) has a NoneType"),
    ("raises", "raised IndexError in estimate\\(\\)"),
]


@pytest.fixture
def faulty_plugins():
    ic.register(Faulty)
    ic.register(FaultyGradient)
    yield
    ic.unregister("faulty")
    ic.unregister("faulty_gradient")


@pytest.mark.parametrize("fault, message", SOLVER_FAULTS, ids=[f for f, _ in SOLVER_FAULTS])
def test_faulty_solver_is_named_and_the_others_still_work(be, faulty_plugins, fault, message):
    case = tanh_case(be)
    with pytest.raises(ic.PluginError, match=f"solver 'faulty' \\(test_plugin_faults.Faulty\\).*{message}"):
        ic.fixed_point(case.f, case.z0, case.args, solver=ic.get_solver("faulty", fault=fault), vjp=case.vjp)
    z, info = ic.fixed_point(case.f, case.z0, case.args, solver="anderson", tol=1e-8, vjp=case.vjp)
    assert host(be, info.converged).all()


@dataclasses.dataclass(eq=False)
class MisreportedResidual(ic.Solver):
    """Fixed-point steps whose state claims a zero residual ``g``."""

    name = "misreported_residual"

    def init(self, problem, z0):
        return {"z": z0, "fz": problem.F(z0), "g": z0 * 0}

    def step(self, problem, state, k, active):
        return {"z": state["fz"], "fz": problem.F(state["fz"]), "g": state["fz"] * 0}


def test_a_residual_the_solver_misreports_is_caught_by_the_recheck(be):
    """The loop measures convergence on the solver's own ``g``; the final re-check on the
    returned batch does not take its word: no sample is reported converged."""
    case = tanh_case(be)
    z, info = ic.fixed_point(case.f, case.z0, case.args, solver=MisreportedResidual(), tol=1e-8, on_fail="ignore")
    assert not host(be, info.converged).any()
    assert (host(be, info.status) == 5).all()  # met tol while iterating, not when re-measured
    assert (host(be, info.residual) > 1e-3).all()


@pytest.mark.parametrize("fault, message", GRADIENT_FAULTS, ids=[f for f, _ in GRADIENT_FAULTS])
def test_faulty_gradient_estimator_is_named(be, faulty_plugins, fault, message):
    case = tanh_case(be)
    w = be.xp.ones_like(case.z0)
    with pytest.raises(ic.PluginError, match=f"gradient estimator 'faulty_gradient'.*{message}"):
        z, info = ic.fixed_point(case.f, case.z0, case.args, gradient=ic.get_gradient("faulty_gradient", fault=fault),
                                 tol=1e-8, vjp=case.vjp)
        case.grad(z, info, w)
    z, info = ic.fixed_point(case.f, case.z0, case.args, gradient="ift", tol=1e-8, vjp=case.vjp)
    assert all(np.isfinite(host(be, g)).all() for g in case.grad(z, info, w))


def test_the_users_own_function_failing_mid_solve_is_not_blamed_on_the_solver(be):
    case = tanh_case(be)
    calls = []

    def f(z, args):
        calls.append(1)
        if len(calls) > 1:  # the first call (the output check) passes
            raise KeyError("the user's bug")
        return case.f(z, args)

    with pytest.raises(ic.UserFunctionError, match="f\\(z, args\\) raised KeyError during the solve"):
        ic.fixed_point(f, case.z0, case.args, tol=1e-12, vjp=case.vjp)
