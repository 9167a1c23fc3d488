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
