"""Second derivatives through a torch solve (``higher_order=True``).

A first-order backward pass applies the chosen estimator through the graph of ``F(z*)``
recorded at forward time, whose ``z`` is a constant. When that pass is itself recorded
(``create_graph=True``), the gradient it produces depends on the parameters also through
``z*``: differentiating it needs ``dz*/dθ``. So ``z`` in that graph is ``z* + gate``, where the
gate is zero in value and, in the backward passes that differentiate the first-order gradient
(never in the first-order pass itself), maps a cotangent ``c`` to ``u = (I - Jᵀ)⁻¹ c`` through a
second graph of ``F`` at ``z*`` (exact IFT). The estimator's own computation is recorded too,
so the second derivative is the derivative of the estimator's formula; ``ift``'s adjoint solve
is differentiated implicitly again (:meth:`Differentiable.adjoint`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

import implicit_core as ic
from implicit_core import ConfigurationError


class Orders:
    """Which backward passes through one solution are first-order ones.

    The first-order pass applies the chosen estimator and recorded its graph
    (``create_graph=True``); the gate in front of the second graph of ``F`` then passes nothing
    in that pass, and converts cotangents by exact IFT in every later pass (those differentiate
    the first-order gradient: they need ``dz*/dθ`` exactly).
    """

    def __init__(self) -> None:
        self.tasks: set[int] = set()
        self.anchor: Any = None

    def first_order(self, task: int) -> None:
        self.tasks.add(task)

    def differentiated(self) -> bool:
        return bool(self.tasks) and torch._C._current_graph_task_id() not in self.tasks

    def in_first_order_pass(self) -> bool:
        return torch._C._current_graph_task_id() in self.tasks or not self.tasks


class Anchor:
    """``F`` at a leaf copy of ``z*`` with its graph: ``J^T v`` and ``J v`` for exact IFT."""

    def __init__(self, z: Any, out: Any, problem: Any, order: Orders) -> None:
        self.z, self.out, self.problem, self.order = z, out, problem, order
        order.anchor = self

    def JT(self, v: Any, create_graph: bool = False) -> Any:
        (jt,) = torch.autograd.grad(self.out, self.z, v, retain_graph=True, create_graph=create_graph)
        return jt

    def J(self, v: Any) -> Any:
        """``J v`` by differentiating ``s -> J^T s`` (linear in ``s``) in the direction ``v``."""
        with torch.enable_grad():
            s = torch.zeros_like(v, requires_grad=True)
            (jv,) = torch.autograd.grad(self.JT(s, create_graph=True), s, v)
        return jv

    def solve(self, flat_fn: Callable[[Any], Any], like: Any) -> Any:
        """The fixed point of a linear map ``x -> flat_fn(x)`` on flat arrays, to a tight
        relative tol (Anderson for fixed points; Broyden for root problems, whose ``J`` need not
        be contractive)."""
        solver = "broyden" if self.problem.form == "root" else "anderson"
        with torch.no_grad():
            u, _ = ic.fixed_point(lambda x, _: flat_fn(x), like.detach().clone(), None, solver=solver,
                                  gradient="jfb", tol=1e-10, stop_mode="rel", max_iter=500, on_fail="warn")
        return u


class Gate(torch.autograd.Function):
    """Zero in value; in backward passes that differentiate a first-order gradient, turns the
    cotangent ``c`` reaching ``z*`` into ``u = (I - Jᵀ)⁻¹ c`` on the second graph of ``F``."""

    @staticmethod
    def forward(ctx, anchor, holder):
        ctx.holder = holder
        return anchor.detach() * 0

    @staticmethod
    def backward(ctx, c):
        holder = ctx.holder
        if holder.order.in_first_order_pass():
            return None, None
        if torch.is_grad_enabled():
            raise ConfigurationError(
                "third and higher derivatives through a torch solve are not supported; "
                "JAX differentiates fixed_point/root to every order"
            )
        return holder.solve(lambda u: c + holder.JT(u), c), None


class Differentiable:
    """What the estimator sees when its backward pass is recorded (``create_graph=True``)."""

    def __init__(self, JT: Callable[[Any], Any], anchor: Anchor) -> None:
        self.JT = JT
        self.anchor = anchor

    def adjoint(self, u: Any, g: Any) -> Any:
        """``u = (I - Jᵀ)⁻¹ g`` (a value) made differentiable: ``du = (I - Jᵀ)⁻¹ (dg + dJᵀ u)``.

        ``T(u) = g + Jᵀ u`` varies exactly by ``dg + dJᵀ u`` at fixed ``u``; the hook applies
        ``(I - Jᵀ)⁻¹`` to that variation in reverse mode, i.e. ``(I - J)⁻¹`` to the cotangent.
        """
        u = u.detach()
        T = g + self.JT(u)
        out = u + (T - T.detach())
        anchor = self.anchor
        out.register_hook(lambda w: None if w is None else anchor.solve(lambda x: w + anchor.J(x), w))
        return out
