"""The torch backend on a CUDA device (skipped without one)."""

import numpy as np
import pytest

import implicit_core as ic

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

from implicit_torch import DEQ  # noqa: E402

PAIRS = [(s, g) for s in ("fixed_point", "anderson", "broyden") for g in ("ift", "jfb", "phantom")]
PAIRS += [("broyden", "shine"), ("broyden", "broyden_reuse")]


class Cell(torch.nn.Module):
    def __init__(self, n=32, d=8, dtype=torch.float64):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        W = torch.randn(n, n, generator=gen, dtype=torch.float64)
        self.W = torch.nn.Parameter((W * 0.8 / torch.linalg.matrix_norm(W, 2)).to(dtype))
        self.U = torch.nn.Parameter((torch.randn(n, d, generator=gen, dtype=torch.float64) / d**0.5).to(dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T)


def _step(device, dtype, solver, gradient):
    cell = Cell(dtype=dtype).to(device)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, dtype)
    deq = DEQ(cell, solver=solver, gradient=gradient, tol=1e-6 if dtype == torch.float64 else 1e-4,
              max_iter=100, state_shape=(32,))
    z = deq(x)
    (z.float().square().sum()).backward()
    return z.detach().double().cpu(), cell.W.grad.double().cpu(), deq.info


@pytest.mark.parametrize("solver,gradient", PAIRS)
def test_cuda_float64_equals_cpu_float64(solver, gradient):
    z_cpu, g_cpu, _ = _step("cpu", torch.float64, solver, gradient)
    z_gpu, g_gpu, info = _step("cuda", torch.float64, solver, gradient)
    assert info.steps.device.type == "cuda"
    torch.testing.assert_close(z_gpu, z_cpu, rtol=0, atol=1e-10)
    torch.testing.assert_close(g_gpu, g_cpu, rtol=0, atol=1e-9)


@pytest.mark.parametrize("solver,gradient", PAIRS)
def test_cuda_float32_training_step(solver, gradient):
    z_ref, g_ref, _ = _step("cpu", torch.float64, solver, gradient)
    z, g, info = _step("cuda", torch.float32, solver, gradient)
    assert bool(info.converged.all())
    assert float((z - z_ref).abs().max()) < 1e-3
    cos = float((g * g_ref).sum() / (g.norm() * g_ref.norm()))
    # SHINE and Broyden reuse read an inverse estimate built from float32 secants: their
    # float32 gradient is close to, not equal to, their float64 one.
    assert cos > (0.99 if gradient in ("shine", "broyden_reuse") else 0.999)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_cell(dtype):
    z_ref, g_ref, _ = _step("cpu", torch.float64, "anderson", "ift")
    cell = Cell(dtype=dtype).cuda()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to("cuda", dtype)
    deq = DEQ(cell, tol=1e-2, stop_mode="rel", state_shape=(32,))
    z = deq(x)
    z.float().square().sum().backward()
    assert z.dtype == dtype and deq.info.residual.dtype == torch.float32
    assert float((z.detach().double().cpu() - z_ref).abs().max()) < 5e-2
    g = cell.W.grad.double().cpu()
    assert float((g * g_ref).sum() / (g.norm() * g_ref.norm())) > 0.98


def test_gradcheck_on_cuda():
    cell = Cell().cuda()
    deq = DEQ(cell, gradient=ic.get_gradient("ift", tol=1e-12, max_iter=300), tol=1e-12, max_iter=300,
              state_shape=(32,))
    x = torch.randn(3, 8, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: deq(x), (x,), eps=1e-6, atol=1e-6)


def test_device_mismatch_errors():
    cell = Cell().cuda()
    x = torch.randn(4, 8, dtype=torch.float64, device="cuda")
    with pytest.raises(ic.DeviceMismatchError, match="device"):
        ic.fixed_point(lambda z, a: torch.tanh(z + a), torch.zeros(4, 8, dtype=torch.float64), x)
    with pytest.raises(ic.DeviceMismatchError, match="device"):
        ic.fixed_point(lambda z, a: torch.tanh(z).cpu(), torch.zeros(4, 8, dtype=torch.float64, device="cuda"), x)
    with pytest.raises(ic.UserFunctionError):
        DEQ(cell, state_shape=(32,))(x.cpu())  # CPU input into a CUDA cell: the cell's own error, typed


def test_cuda_and_numpy_give_the_same_answer():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((10, 10))
    A *= 0.8 / np.linalg.norm(A, 2)
    b = rng.standard_normal((4, 10))
    z_np, _ = ic.fixed_point(lambda z, a: np.tanh(z @ a[0].T + a[1]), np.zeros((4, 10)), (A, b), tol=1e-6)
    At, bt = torch.tensor(A, device="cuda"), torch.tensor(b, device="cuda")
    z_t, _ = ic.fixed_point(lambda z, a: torch.tanh(z @ a[0].T + a[1]), torch.zeros(4, 10, dtype=torch.float64,
                            device="cuda"), (At, bt), tol=1e-6)
    np.testing.assert_allclose(z_t.cpu().numpy(), z_np, rtol=0, atol=1e-10)
