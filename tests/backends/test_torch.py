"""What only the torch backend does: closures over module parameters, no_grad, gradcheck."""

import pytest

import implicit_core as ic

torch = pytest.importorskip("torch")


class Cell(torch.nn.Module):
    def __init__(self, n=6):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(n, n).double()
        with torch.no_grad():
            self.lin.weight *= 0.7 / torch.linalg.matrix_norm(self.lin.weight, 2)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_gradcheck_through_fixed_point(solver):
    cell = Cell()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    gradient = ic.get_gradient("ift", solver=solver, tol=1e-12, max_iter=300)

    def layer(x):
        z, _ = ic.fixed_point(cell, torch.zeros(3, 6, dtype=torch.float64), x, solver=solver,
                              gradient=gradient, tol=1e-12, max_iter=300)
        return z

    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-6)


def test_closure_captured_parameters_receive_gradients():
    cell = Cell()
    x = torch.randn(4, 6, dtype=torch.float64)
    z, _ = ic.fixed_point(lambda z, _: cell(z, x), torch.zeros(4, 6, dtype=torch.float64), tol=1e-12, max_iter=200)
    z.sum().backward()
    assert cell.lin.weight.grad is not None and cell.lin.weight.grad.abs().sum() > 0
    # against finite differences on one weight entry
    w = cell.lin.weight
    h = 1e-6
    with torch.no_grad():
        vals = []
        for sign in (1, -1):
            w[0, 1] += sign * h
            zs, _ = ic.fixed_point(lambda z, _: cell(z, x), torch.zeros(4, 6, dtype=torch.float64), tol=1e-13, max_iter=300)
            vals.append(zs.sum().item())
            w[0, 1] -= sign * h
    fd = (vals[0] - vals[1]) / (2 * h)
    assert abs(cell.lin.weight.grad[0, 1].item() - fd) < 1e-6 * max(1.0, abs(fd))


def test_no_grad_forward_keeps_no_graph_and_eval_mode_still_differentiates():
    cell = Cell().eval()
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        z, info = ic.fixed_point(cell, torch.zeros(2, 6, dtype=torch.float64), x, tol=1e-10)
    assert not z.requires_grad and info.converged.all()
    z, _ = ic.fixed_point(cell, torch.zeros(2, 6, dtype=torch.float64), x, tol=1e-10)
    (gx,) = torch.autograd.grad(z.sum(), x)
    assert torch.isfinite(gx).all()


def test_float32_solve_and_info_tensors():
    cell = Cell().float()
    x = torch.randn(5, 6)
    z, info = ic.fixed_point(cell, torch.zeros(5, 6), x, tol=1e-5, solver="broyden", gradient="shine")
    assert z.dtype == torch.float32 and isinstance(info.steps, torch.Tensor)
    assert info.converged.all()


def _tight(gradient):
    return ic.get_gradient("ift", tol=1e-12, max_iter=300) if gradient == "ift" else gradient


def _gradients(cell, x, gradient, create_graph, higher_order=True, solver="anderson"):
    z, _ = ic.fixed_point(cell, torch.zeros(4, 6, dtype=torch.float64), x, solver=solver, gradient=_tight(gradient),
                          tol=1e-12, max_iter=300, higher_order=higher_order)
    loss = (z**3).sum() + (z * x).sum()
    return torch.autograd.grad(loss, [cell.lin.weight, x], create_graph=create_graph)


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
@pytest.mark.parametrize("gradient", ["ift", "jfb", "phantom"])
def test_second_derivatives_are_the_derivative_of_the_gradient(gradient, solver):
    """create_graph=True, then the VJP ``vᵀ D`` of the gradient's Jacobian ``D``, checked against
    central differences of the first-order gradient along ``d``: ``(vᵀ D) d = vᵀ (D d)``
    (float64). Exact for ift; for jfb / phantom, the derivative of the estimator's formula."""
    cell = Cell()
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    gW, gx = _gradients(cell, x, gradient, create_graph=True, solver=solver)
    vW, dW = (torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in (2, 3))
    vx, dx = (torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in (4, 5))
    hW, hx = torch.autograd.grad((gW * vW).sum() + (gx * vx).sum(), [cell.lin.weight, x])
    h = 1e-5
    with torch.no_grad():
        W0 = cell.lin.weight.clone()

    def directional(sign):  # the gradient at (W + s h dW, x + s h dx)
        with torch.no_grad():
            cell.lin.weight.copy_(W0 + sign * h * dW)
        xs = (x + sign * h * dx).detach().requires_grad_(True)
        return _gradients(cell, xs, gradient, create_graph=False, higher_order=False, solver=solver)

    (pW, px), (mW, mx) = directional(1), directional(-1)
    with torch.no_grad():
        cell.lin.weight.copy_(W0)
    fd = ((pW - mW) * vW).sum() / (2 * h) + ((px - mx) * vx).sum() / (2 * h)
    got = (hW * dW).sum() + (hx * dx).sum()
    assert abs(float(got - fd)) < 1e-5 * abs(float(fd)), (float(got), float(fd))


def test_create_graph_without_higher_order_is_a_typed_error():
    cell = Cell()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ic.ConfigurationError, match="higher_order=True"):
        _gradients(cell, x, "ift", create_graph=True, higher_order=False)


@pytest.mark.parametrize("gradient", ["shine", "broyden_reuse"])
def test_second_derivatives_through_inverse_reuse_are_refused(gradient):
    cell = Cell()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ic.ConfigurationError, match="no derivative"):
        _gradients(cell, x, gradient, create_graph=True, solver="broyden")


def test_torch_func_transforms_are_refused_with_a_typed_error():
    cell = Cell()
    x = torch.randn(4, 6, dtype=torch.float64)
    solve = lambda x: ic.fixed_point(cell, torch.zeros(4, 6, dtype=torch.float64), x)[0]  # noqa: E731
    with pytest.raises(ic.ConfigurationError, match="torch.func transform"):
        torch.func.vmap(lambda row: solve(row.expand(4, 6)))(x)
    with pytest.raises(ic.ConfigurationError, match="torch.func transform"):
        torch.func.jacrev(solve)(x)


@pytest.mark.parametrize("k,lam", [(1, 1.0), (3, 0.6), (6, 0.8)])
def test_phantom_is_the_gradient_of_k_damped_steps_unrolled_from_the_solution(k, lam):
    """Geng et al. / TorchDEQ's phantom gradient: backpropagate through k steps
    z <- lam f(z) + (1 - lam) z from z*; the estimator gives the same parameter gradients."""
    cell = Cell()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    z, _ = ic.fixed_point(cell, torch.zeros(4, 6, dtype=torch.float64), x, tol=1e-13, max_iter=300,
                          gradient=ic.get_gradient("phantom", k=k, damping=lam))
    ours = torch.autograd.grad((z**2).sum(), [cell.lin.weight, x])
    u = z.detach()
    for _ in range(k):
        u = lam * cell(u, x) + (1 - lam) * u
    unrolled = torch.autograd.grad((u**2).sum(), [cell.lin.weight, x])
    for a, b in zip(ours, unrolled):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_deq_gradient_penalty_with_higher_order():
    """A gradient penalty on a DEQ's input gradient trains like any other loss term."""
    from implicit_torch import DEQ

    deq = DEQ(Cell(), tol=1e-10, max_iter=200, higher_order=True, state_shape=(6,))
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(deq(x).pow(2).sum(), x, create_graph=True)
    gx.pow(2).sum().backward()
    assert deq.cell.lin.weight.grad is not None and torch.isfinite(deq.cell.lin.weight.grad).all()


def test_host_views_are_shared_memory_and_never_of_recorded_tensors():
    """The loop writes history rows through host views (CPU tensors): a view must be the
    tensor's memory, and a tensor autograd records gets none (a write would bypass autograd)."""
    be = ic.get_backend("torch")
    x = torch.zeros(3, 2)
    be.host_view(x)[1, 0] = 5.0
    assert x[1, 0].item() == 5.0
    assert be.host_view(torch.zeros(3, 2, requires_grad=True)) is None
    assert be.host_view(torch.zeros(3, 2, dtype=torch.bfloat16)) is None
    buffer, value = torch.zeros(3, 4, 2), torch.ones(3, 2, requires_grad=True)
    out = be.at_set_where(buffer, 1, 2, value, torch.tensor([[True], [False], [True]]))
    assert out.requires_grad and out[:, 2, 0].tolist() == [1.0, 0.0, 1.0]
