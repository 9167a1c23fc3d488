"""The ``DEQ`` nn.Module: gradients (gradcheck), modes, tuple states, diagnostics, errors."""

import pytest

import implicit_core as ic

torch = pytest.importorskip("torch")
from implicit_torch import DEQ  # noqa: E402

SOLVERS = ["fixed_point", "anderson", "broyden"]


class TanhCell(torch.nn.Module):
    """``z -> tanh(W z + U x + b)`` with ``||W||_2 = norm``."""

    def __init__(self, n=6, d=4, norm=0.7, seed=0, dtype=torch.float64):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(n, n, generator=gen, dtype=dtype)
        self.W = torch.nn.Parameter(W * norm / torch.linalg.matrix_norm(W, 2))
        self.U = torch.nn.Parameter(torch.randn(n, d, generator=gen, dtype=dtype) / d**0.5)
        self.b = torch.nn.Parameter(0.1 * torch.randn(n, generator=gen, dtype=dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def _x(batch=3, d=4, seed=1, dtype=torch.float64):
    return torch.randn(batch, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _exact_ift_grads(cell, x, w):
    """``dL/dθ`` for ``L = sum(w z*)`` by a dense solve of ``(I - J)^T u = w`` per sample."""
    with torch.no_grad():
        z, _ = ic.fixed_point(cell, torch.zeros(x.shape[0], cell.W.shape[0], dtype=x.dtype), x,
                              tol=1e-13, max_iter=500)
    us = []
    for i in range(x.shape[0]):
        J = torch.autograd.functional.jacobian(lambda zi: cell(zi[None], x[i : i + 1])[0], z[i])
        us.append(torch.linalg.solve((torch.eye(J.shape[0], dtype=J.dtype) - J).T, w[i]))
    u = torch.stack(us)
    out = cell(z, x)
    return torch.autograd.grad(out, list(cell.parameters()), u)


@pytest.mark.parametrize("backward_solver", SOLVERS)
@pytest.mark.parametrize("solver", SOLVERS)
def test_gradcheck_through_deq_with_ift(solver, backward_solver):
    cell = TanhCell()
    gradient = ic.get_gradient("ift", solver=backward_solver, tol=1e-12, max_iter=300)
    deq = DEQ(cell, solver=solver, gradient=gradient, tol=1e-12, max_iter=300, state_shape=(6,))
    x = _x().requires_grad_(True)
    W = cell.W.detach().clone().requires_grad_(True)

    def layer(x, W):  # W enters through the module's parameter, as in training
        return torch.func.functional_call(deq, {"cell.W": W}, (x,))

    assert torch.autograd.gradcheck(layer, (x, W), eps=1e-6, atol=1e-6)


def test_tuple_states_gradcheck():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    A = 0.6 * A / torch.linalg.matrix_norm(A, 2)
    B = 0.3 * torch.randn(4, 2 * 3, generator=gen, dtype=torch.float64)

    def cell(z, x):  # a coarse (batch, 4) and a fine (batch, 2, 3) state, coupled
        a, b = z
        a_new = torch.tanh(a @ A.T + b.reshape(len(b), 6) @ B.T / 4 + x)
        b_new = torch.tanh(0.5 * b + 0.2 * a_new[:, :2, None])
        return a_new, b_new

    deq = DEQ(cell, tol=1e-12, max_iter=300, state_shape=((4,), (2, 3)))
    x = _x(d=4).requires_grad_(True)
    z = deq(x)
    assert isinstance(z, tuple) and z[0].shape == (3, 4) and z[1].shape == (3, 2, 3)
    assert torch.autograd.gradcheck(lambda x: deq(x), (x,), eps=1e-6, atol=1e-6)


def test_parameters_and_input_receive_ift_gradients():
    cell = TanhCell()
    deq = DEQ(cell, tol=1e-12, max_iter=300, gradient=ic.get_gradient("ift", tol=1e-12, max_iter=300))
    x = _x()
    w = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    z = deq(x, torch.zeros(3, 6, dtype=torch.float64))
    (z * w).sum().backward()
    for p, ref in zip(cell.parameters(), _exact_ift_grads(cell, x, w)):
        assert torch.allclose(p.grad, ref, atol=1e-9, rtol=1e-8)
    assert deq.info.backward is not None and bool(deq.info.backward.converged.all())


def _cosine(a, b):
    a = torch.cat([t.flatten() for t in a])
    b = torch.cat([t.flatten() for t in b])
    return float(a @ b / (a.norm() * b.norm()))


# Thresholds documented in the README (torch section): on a contractive tanh cell
# (||W|| = 0.7, n = 16) every approximate estimator points within these cosines of exact IFT.
COSINE_FLOOR = {"jfb": 0.8, "phantom": 0.99, "shine": 0.9, "broyden_reuse": 0.9}


@pytest.mark.parametrize("gradient", sorted(COSINE_FLOOR))
def test_approximate_estimators_point_along_the_exact_gradient(gradient):
    cell = TanhCell(n=16, d=8, norm=0.7, seed=3)
    x = _x(batch=8, d=8, seed=4)
    w = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    options = {"update": "adjoint"} if gradient in ("shine", "broyden_reuse") else {}
    deq = DEQ(cell, solver="broyden", gradient=gradient, tol=1e-10, max_iter=100, state_shape=(16,), **options)
    cell.zero_grad()
    (deq(x) * w).sum().backward()
    approx = [p.grad.clone() for p in cell.parameters()]
    assert _cosine(approx, _exact_ift_grads(cell, x, w)) >= COSINE_FLOOR[gradient]


def test_eval_mode_still_differentiates_and_no_grad_keeps_no_graph():
    cell = TanhCell()
    deq = DEQ(cell, tol=1e-10, state_shape=(6,)).eval()
    x = _x().requires_grad_(True)
    z = deq(x)
    z.sum().backward()
    assert x.grad is not None and cell.W.grad is not None
    with torch.no_grad():
        z = deq(x)
    assert z.grad_fn is None and not z.requires_grad
    assert bool(deq.info.converged.all())


def test_info_is_kept_and_on_fail_is_honoured():
    cell = TanhCell()
    deq = DEQ(cell, tol=1e-12, max_iter=2, on_fail="raise", state_shape=(6,))
    with pytest.raises(ic.ConvergenceError) as err:
        deq(_x())
    assert err.value.info.failed == [0, 1, 2]
    deq = DEQ(cell, tol=1e-12, max_iter=2, on_fail="ignore", state_shape=(6,), trace=True)
    deq(_x())
    assert deq.info.failed == [0, 1, 2] and deq.info.trace.shape == (3, 3)


def test_initial_state_options():
    cell = TanhCell()
    x = _x()
    assert DEQ(cell, state_shape=6).initial_state(x).shape == (3, 6)
    learned = torch.nn.Linear(4, 6).double()
    deq = DEQ(cell, init=learned)
    assert torch.equal(deq.initial_state(x), learned(x))
    assert DEQ(lambda z, x: torch.tanh(0.5 * z + x)).initial_state(x).shape == x.shape


def test_jacobian_regularisation_term():
    cell = TanhCell()
    deq = DEQ(cell, jac_reg=True, state_shape=(6,))
    x = _x()
    deq(x)
    assert deq.jac_loss is not None and deq.jac_loss.ndim == 0
    (grad_W,) = torch.autograd.grad(deq.jac_loss, [cell.W])
    assert grad_W.abs().sum() > 0
    deq.eval()
    deq(x)
    assert deq.jac_loss is None


def test_jacobian_regularisation_is_unbiased_on_a_linear_cell():
    gen = torch.Generator().manual_seed(0)
    A = 0.5 * torch.randn(5, 5, generator=gen, dtype=torch.float64) / 5**0.5
    deq = DEQ(lambda z, x: z @ A.T + x, jac_reg=True, state_shape=(5,))
    torch.manual_seed(0)
    estimates = []
    for _ in range(400):
        deq(_x(batch=8, d=5))
        estimates.append(float(deq.jac_loss))
    exact = float((A * A).sum() / 5)
    assert abs(sum(estimates) / len(estimates) - exact) < 0.05 * exact


def test_spectral_radius_diagnostic():
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    A = Q @ torch.diag(torch.tensor([0.9, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=torch.float64)) @ Q.T
    deq = DEQ(lambda z, x: z @ A.T + x, state_shape=(6,), tol=1e-10)
    rho = deq.spectral_radius(_x(d=6), n_iter=200)
    assert torch.allclose(rho, torch.full((3,), 0.9, dtype=torch.float64), atol=1e-6)
    assert deq.info is None  # the diagnostic does not overwrite the last forward's info


def test_configuration_errors_at_construction():
    cell = TanhCell()
    with pytest.raises(ic.UnknownPluginError, match="anderson"):
        DEQ(cell, solver="andersen")
    with pytest.raises(ic.ConfigurationError, match="Did you mean 'm'"):
        DEQ(cell, solver="anderson", mm=5)
    with pytest.raises(ic.ConfigurationError, match="inverse"):
        DEQ(cell, solver="anderson", gradient="shine")
    with pytest.raises(ic.ConfigurationError, match="state_shape"):
        DEQ(cell, state_shape=(6, -1))
    with pytest.raises(ic.ConfigurationError, match="callable"):
        DEQ("not a cell")


def test_cell_errors_are_typed():
    x = _x()
    deq = DEQ(lambda z, x: torch.tanh(z + x[:, :1]).float(), state_shape=(6,))
    with pytest.raises(ic.DTypeError, match="dtype"):
        deq(x)  # state float64, cell output float32
    deq = DEQ(lambda z, x: torch.tanh(z[:, :5]), state_shape=(6,))
    with pytest.raises(ic.ShapeError):
        deq(x)
    deq = DEQ(TanhCell(dtype=torch.float32), state_shape=(6,))
    with pytest.raises(ic.UserFunctionError, match="dtype"):
        deq(x)  # float64 input into a float32 cell: the cell's own error, named as such


def test_deq_is_an_ordinary_module():
    deq = DEQ(TanhCell(), solver="broyden", gradient="shine")
    names = {n for n, _ in deq.named_parameters()}
    assert names == {"cell.W", "cell.U", "cell.b"}
    assert "solver='broyden'" in repr(deq) and "gradient='shine'" in repr(deq)
    assert set(deq.state_dict()) == names


def test_jacobian_penalty_reuses_the_recorded_graph():
    """The same value and parameter gradients as a separate penalty, without evaluating the cell again."""
    cell = TanhCell()
    calls = []
    cell.register_forward_hook(lambda *_: calls.append(1))
    x = _x()
    z, info = ic.fixed_point(cell, torch.zeros(3, 6, dtype=torch.float64), x, tol=1e-10, jac_reg=True, jac_seed=7)
    with_penalty = len(calls)
    ic.fixed_point(cell, torch.zeros(3, 6, dtype=torch.float64), x, tol=1e-10)
    assert with_penalty == len(calls) - with_penalty
    separate = ic.jacobian_regularisation(cell, z, x, seed=7)
    torch.testing.assert_close(info.jac_loss, separate, rtol=1e-12, atol=0)
    shared_grad = torch.autograd.grad(info.jac_loss.sum(), [cell.W])[0]
    separate_grad = torch.autograd.grad(separate.sum(), [cell.W])[0]
    torch.testing.assert_close(shared_grad, separate_grad, rtol=1e-12, atol=1e-15)


def test_jacobian_penalty_on_a_subset_of_the_batch_is_unbiased():
    """``jac_samples=k``: the penalty of k random samples estimates the same batch mean."""
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    A *= 0.3 / torch.linalg.matrix_norm(A, 2)
    cell = lambda z, x: x[:, :1] * (z @ A.T) + x  # noqa: E731  (J = x_0 A: the samples differ)
    deq = DEQ(cell, jac_reg=True, jac_samples=2, state_shape=(5,), tol=1e-10)
    x = torch.tensor([[0.5], [1.0], [2.0], [3.0]], dtype=torch.float64) * torch.ones(4, 5, dtype=torch.float64)
    torch.manual_seed(0)
    estimates = []
    for _ in range(250):
        deq(x)
        estimates.append(float(deq.jac_loss))
    exact = float((x[:, 0] ** 2).mean() * (A * A).sum() / 5)
    assert abs(sum(estimates) / len(estimates) - exact) < 0.05 * exact
    with pytest.raises(ic.ConfigurationError, match="jac_samples"):
        DEQ(cell, jac_reg=True, jac_samples=0)
    with pytest.raises(ic.ConfigurationError, match="batched=False"):
        DEQ(cell, jac_reg=True, jac_samples=2, batched=False)


@pytest.mark.parametrize("form", ["fixed_point", "root"])
def test_a_state_of_several_tensors_is_differentiated_tensor_by_tensor(form):
    """``J^T v`` for a tuple state is one gradient per tensor: the backward builds no zero-padded
    ``(batch, n)`` gradient per slice of the flat state (``slice_backward``), and the gradients
    are those of finite differences (root form too: ``F = z - g`` with ``z`` from the tensors)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    gen = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    A = 0.6 * A / torch.linalg.matrix_norm(A, 2)
    P = torch.eye(4, 2, dtype=torch.float64)

    def f(z, x):
        a, b = z
        # (no slicing in the cell: its own slices would have their zero-padded gradients)
        return torch.tanh(a @ A.T + b.sum((1, 2))[:, None] / 8 + x), torch.tanh(0.5 * b + 0.2 * (a @ P)[..., None])

    def g(z, x):  # the same solution as a root problem
        return tuple(zi - fi for zi, fi in zip(z, f(z, x)))

    z0 = (torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, 2, 3, dtype=torch.float64))
    solve = ic.fixed_point if form == "fixed_point" else ic.root
    fn = f if form == "fixed_point" else g

    def layer(x):
        z, _ = solve(fn, z0, x, solver="broyden", tol=1e-12, max_iter=300,
                     gradient=ic.get_gradient("ift", tol=1e-12, max_iter=300))
        return z

    ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    x = _x(d=4).requires_grad_(True)
    a, b = layer(x)
    loss = (a**2).sum() + b.sum()
    with Record():
        loss.backward()
    assert ops and not any(name.startswith("slice_backward") for name in ops), sorted(set(ops))
    assert torch.autograd.gradcheck(lambda x: layer(x), (x.detach().requires_grad_(True),), eps=1e-6, atol=1e-6)
