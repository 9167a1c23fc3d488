"""The PyTorch backend: VJPs by ``torch.autograd``, gradients delivered through a hook.

The forward solve runs under ``torch.no_grad()`` (no graph across iterations). One more
evaluation ``F(z*)`` is recorded by autograd; the solution carries the value ``z*`` and that
evaluation's graph, with a hook that swaps the incoming ``dL/dz*`` for the estimator's ``u``:
autograd then carries ``u^T dF/dθ`` to every tensor ``F`` depends on — ``args`` and
parameters captured in closures (an ``nn.Module``'s weights) alike.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import array_api_compat

from implicit_core import Backend, ConfigurationError, hookimpl


class TorchBackend(Backend):
    name = "torch"
    requires = ("torch",)
    install_hint = "pip install torch, then 'implicit-core[torch]'"

    def owns(self, x: Any) -> bool:
        return array_api_compat.is_torch_array(x)

    def namespace(self) -> Any:
        from array_api_compat import torch as xp_torch

        return xp_torch

    def all_on_host(self, mask: Any) -> bool:
        # On CUDA, reading the flag would synchronise the device: take the masked path.
        return mask.device.type == "cpu" and bool(mask.all())

    def host_view(self, x: Any) -> Any:
        # CPU tensors share their memory with NumPy (not bfloat16, which NumPy lacks); one that
        # autograd records would lose its record through the view (and writes would bypass it).
        import torch

        if x.device.type != "cpu" or x.dtype == torch.bfloat16 or x.requires_grad:
            return None
        return x.numpy()

    def from_host(self, a: Any, like: Any) -> Any:
        import torch

        return torch.from_numpy(a)

    def stop_gradient(self, x: Any) -> Any:
        return x.detach()

    def split_columns(self, flat: Any, sizes: Any) -> list[Any]:
        # torch.split's backward concatenates the pieces' gradients into one (batch, n) tensor;
        # through slices, every piece's gradient is padded with zeros to (batch, n) and the
        # paddings added: for a two-tensor state two vectors more at a VJP's peak, and 5 % of
        # its time (a multiscale DEQ's adjoint solve).
        import torch

        return list(torch.split(flat, list(sizes), dim=1))

    def to_python(self, x: Any) -> Any:
        return x.detach().cpu().tolist()

    def random_normal(self, like: Any, seed: int) -> Any:
        import torch

        gen = torch.Generator(device=like.device).manual_seed(seed)
        return torch.randn(like.shape, generator=gen, dtype=like.dtype, device=like.device)

    def _check_context(self) -> None:
        import torch

        if torch._C._functorch.maybe_current_level() is not None:
            raise ConfigurationError(
                "fixed_point/root cannot run inside a torch.func transform (vmap, grad, vjp, jacrev, "
                "jacfwd): the solve loop decides per step in Python, which those transforms do not "
                "allow. Put independent problems on the batch axis instead of vmap, and take "
                "derivatives with torch.autograd (loss.backward(), torch.autograd.grad, or "
                "torch.autograd.functional.hvp with higher_order=True)"
            )

    def forward_context(self) -> contextlib.AbstractContextManager:
        import torch

        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(_solver_precision())
        return stack

    def wrap_function(self, fn: Callable[[Any, Any], Any], z0: Any) -> Callable[[Any, Any], Any]:
        import torch

        self._check_context()

        enabled = [(d, torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]
        if not enabled:
            return fn
        dtypes = [getattr(leaf, "dtype", None) for leaf in self.tree_flatten(z0)[0]]

        def under_autocast(z: Any, args: Any) -> Any:
            # The caller's autocast applies to their function, not to the solver's arithmetic:
            # the cell runs in reduced precision, its output is handed back in the state's dtype.
            with contextlib.ExitStack() as stack:
                for device, dtype in enabled:
                    stack.enter_context(torch.autocast(device, dtype=dtype))
                out = fn(z, args)
            leaves, treedef = self.tree_flatten(out)
            if len(leaves) != len(dtypes):
                return out  # a wrong structure: the output check says so
            cast = [x.to(d) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != d else x
                    for x, d in zip(leaves, dtypes)]
            return self.tree_unflatten(treedef, cast)

        return under_autocast

    def _graph(self, problem, z: Any, differentiable_in_z: bool = True) -> tuple[Any, Any]:
        """``F`` re-evaluated at a detached ``z`` with autograd recording."""
        import torch

        z_in = z.detach().requires_grad_(differentiable_in_z)
        with torch.enable_grad():
            out = problem.F(z_in)
        return z_in, out

    def linearise(self, problem, z: Any) -> Callable[[Any], Any]:
        return self.value_and_linearise(problem, z)[1]

    def value_and_linearise(self, problem, z: Any) -> tuple[Any, Callable[[Any], Any]]:
        import torch

        z_in, out = self._graph(problem, z)

        def JT(v: Any) -> Any:
            (jt,) = torch.autograd.grad(out, z_in, v, retain_graph=True, allow_unused=True)
            return torch.zeros_like(v) if jt is None else jt

        return out.detach(), JT

    def vjp_at(self, problem, z: Any, v: Any, create_graph: bool = False) -> Any:
        import torch

        if not create_graph:
            return self.linearise(problem, z)(v)
        z_in, out = self._graph(problem, z)
        with torch.enable_grad():
            (jt,) = torch.autograd.grad(out, z_in, v, create_graph=True, allow_unused=True)
        return torch.zeros_like(v) if jt is None else jt

    def jacobian_penalty(self, problem, z: Any, seed: int) -> Any:
        """From the graph of ``F`` that :meth:`attach` recorded at ``z*``, when there is one:
        the penalty then costs its double-backward graph only, not another evaluation of ``F``."""
        import torch

        recorded = problem.recorded.pop("graph", None)  # (not held on into the backward pass)
        if recorded is None or not torch.is_grad_enabled():
            return super().jacobian_penalty(problem, z, seed)
        z_in, out = recorded
        probe = self.random_normal(out, seed)
        (jt,) = torch.autograd.grad(out, z_in, probe, retain_graph=True, create_graph=True)
        return (jt * jt).sum(-1) / problem.layout.n

    def attach(
        self, problem, z_star: Any, backward: Callable[..., Any], with_jacobian: bool = True
    ) -> tuple[Any, Any]:
        import torch

        if not torch.is_grad_enabled():
            return problem.unflatten(z_star), None
        order = z_in = None
        if problem.higher_order:
            from ._higher_order import Anchor, Differentiable, Gate, Orders

            # z* once more, carrying dz*/dθ for second derivatives only: a second graph of F,
            # behind a gate that passes nothing in a first-order backward pass.
            order = Orders()
            z_anchor, anchor = self._graph(problem, z_star)
            z_in = z_star.detach() + Gate.apply(anchor, Anchor(z_anchor, anchor, problem, order))
        # One graph of F at z*, recorded now: the outer backward runs through it to the
        # parameters, and the estimator's J^T v products reuse it. Recording it at forward
        # time keeps the backward consistent with the parameters of this call (e.g. under
        # torch.func.functional_call) and saves re-evaluating F in the backward.
        if z_in is None:
            z_in, out = self._graph(problem, z_star, differentiable_in_z=with_jacobian or problem.jac_reg)
            if problem.jac_reg:  # (read once, by jacobian_penalty, right after the solve)
                problem.recorded["graph"] = (z_in, out)
        else:
            with torch.enable_grad():
                out = problem.F(z_in)
        if not _reaches_other_leaves(out, z_in):
            return problem.unflatten(z_star), None
        # The value is exactly z* (as on every backend); the gradient flows through ``out``.
        # The hook sits on ``result``, so JT's own passes through ``out`` do not trigger it.
        result = z_in.detach() + (out - out.detach())
        # The backward needs F(z*)'s graph, not its values: a first-order pass holds only the
        # edge into that graph, so F(z*) itself (a state-sized vector) is freed once the solve
        # returns instead of staying until the backward pass (a multiscale DEQ's training
        # step: 1 of its 11.6 state-sized vectors at the peak).
        root = torch.autograd.graph.get_gradient_edge(out)
        graph_out = out if order is not None else None  # (second derivatives differentiate through out)
        del out

        def JT(v: Any) -> Any:
            (jt,) = torch.autograd.grad(root, z_in, v, retain_graph=True)
            return jt

        def hook(g: Any) -> Any:
            if g is None:  # an undefined incoming gradient stays undefined
                return None
            with _solver_precision():
                return estimate(g)

        def estimate(g: Any) -> Any:
            lin = JT if with_jacobian else None
            if not torch.is_grad_enabled():  # first-order pass (no create_graph)
                if order is not None and order.differentiated():
                    return g  # differentiating a create_graph pass: z* enters exactly via the gate
                return backward(g, lin)
            if order is None:
                raise ConfigurationError(
                    "this backward pass is being recorded (create_graph=True, e.g. for a gradient "
                    "penalty or a Hessian-vector product), but the solve was not set up for second "
                    "derivatives: pass higher_order=True to fixed_point/root (or DEQ(..., "
                    "higher_order=True)), which records what the exact second derivatives need"
                )
            if order.differentiated():
                raise ConfigurationError(
                    "third and higher derivatives through a torch solve are not supported; "
                    "JAX differentiates fixed_point/root to every order"
                )
            order.first_order(torch._C._current_graph_task_id())

            def JT_graph(v: Any) -> Any:
                (jt,) = torch.autograd.grad(graph_out, z_in, v, retain_graph=True, create_graph=True)
                return jt

            return backward(g, lin, Differentiable(JT_graph, order.anchor))

        result.register_hook(hook)
        return problem.unflatten(result), None


#: Device types whose autocast state the solve respects (the user's function) and suspends (the solver).
_AUTOCAST_DEVICES = ("cpu", "cuda")


def _solver_precision() -> contextlib.AbstractContextManager:
    """The solver's own arithmetic outside any autocast region (it keeps the state's dtype)."""
    import torch

    stack = contextlib.ExitStack()
    for device in _AUTOCAST_DEVICES:
        if torch.is_autocast_enabled(device):
            stack.enter_context(torch.autocast(device, enabled=False))
    return stack


def _reaches_other_leaves(out: Any, z_in: Any) -> bool:
    """Whether ``out``'s graph leads to any tensor requiring grad other than ``z_in``."""
    if not out.requires_grad:
        return False
    stack, seen = [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None and variable is not z_in:
            return True
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return False


@hookimpl
def implicit_core_backends(register):
    register(TorchBackend)
