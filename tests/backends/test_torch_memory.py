"""A training step's peak memory does not grow with the number of solver iterations.

CPU: :class:`implicit_torch.memory.PeakMemory` counts every tensor storage created inside the
step from its allocation to its release (forward, saved-for-backward and backward tensors).
CUDA: ``torch.cuda.max_memory_allocated``.
"""

import pytest

torch = pytest.importorskip("torch")
import implicit_core as ic  # noqa: E402
from implicit_torch import DEQ  # noqa: E402
from implicit_torch.memory import PeakMemory  # noqa: E402

N, D, BATCH = 64, 32, 128
PAIRS = [(s, g) for s in ("fixed_point", "anderson", "broyden") for g in ("ift", "jfb", "phantom")]
PAIRS += [("broyden", "shine"), ("broyden", "broyden_reuse")]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])]


class Cell(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.inj = torch.nn.Linear(N, N, bias=False), torch.nn.Linear(D, N, bias=False)
        with torch.no_grad():
            self.lin.weight *= 0.9 / torch.linalg.matrix_norm(self.lin.weight, 2)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + self.inj(x))


def _training_step_peak(solver, gradient, iterations, device):
    # tol below reach: samples run `iterations` steps (unless one hits a residual of exactly 0)
    deq = DEQ(Cell(), solver=solver, gradient=gradient, tol=1e-30, max_iter=iterations, on_fail="ignore",
              state_shape=(N,)).to(device)
    x = torch.randn(BATCH, D, generator=torch.Generator().manual_seed(1)).to(device)
    # Sample 0 (x = 0) starts at its fixed point z = 0, so every run takes the per-sample
    # masked path from the first step: runs of different lengths compare like with like.
    x[0] = 0
    deq(x).square().mean().backward()  # warm-up: CUDA libraries allocate workspaces on first use
    with PeakMemory(device) as memory:
        deq(x).square().mean().backward()
    assert int(deq.info.steps.max()) == iterations and int(deq.info.steps[0]) == 0
    return memory.peak


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver,gradient", PAIRS)
def test_peak_memory_does_not_grow_with_iterations(solver, gradient, device):
    # From 40 iterations on, every history slot (Broyden: m = 30) is in use: beyond, no growth.
    # (A shorter solve allocates fewer slots, so it peaks lower still.)
    few, many = (_training_step_peak(solver, gradient, k, device) for k in (40, 200))
    assert many <= 1.10 * few, f"peak {few} B at 40 iterations, {many} B at 200"


@pytest.mark.parametrize("device", DEVICES)
def test_the_meter_sees_a_graph_kept_across_iterations(device):
    """Control: unrolled (backprop-through-the-solver) iterations do grow, and are counted."""
    cell = Cell().to(device)
    x = torch.randn(BATCH, D).to(device)
    peaks = []
    for iterations in (10, 100):
        with PeakMemory(device) as memory:
            z = torch.zeros(BATCH, N, device=device)
            for _ in range(iterations):
                z = cell(z, x)
            z.square().mean().backward()
        peaks.append(memory.peak)
    assert peaks[1] > 5 * peaks[0]


def test_the_cpu_meter_counts_new_storage_not_views_of_existing_tensors():
    weight = torch.zeros(256, 256)  # 256 KiB, made before the block: a parameter, say
    with PeakMemory("cpu") as memory:
        transposed = weight.t()  # a view: nothing allocated
        product = torch.ones(16, 256) @ transposed  # two new 16 KiB storages, the first freed early
        del transposed
    assert memory.peak == 2 * 16 * 256 * 4 and product.shape == (16, 256)


def test_an_anderson_solve_holds_its_history_and_a_few_vectors():
    """Anderson's 2m history rows, and besides them: the solve's copy of z0, the best iterate,
    the next iterate, F(z) and its residual while measured, f's own temporaries. Not the first
    step's state (the loop hands its carry over), nor copies of the newest z and F(z) beside the
    histories' rows (``measured_only``): those were three vectors more."""
    torch.manual_seed(0)
    batch, n, m = 64, 256, 5
    A = torch.randn(n, n)
    A *= 0.9 / torch.linalg.matrix_norm(A, 2)
    b, z0 = torch.randn(batch, n), torch.zeros(batch, n)
    with PeakMemory("cpu") as memory:
        ic.fixed_point(lambda z, a: torch.tanh(z @ a.T + b), z0, A, solver="anderson", m=m,
                       tol=1e-30, max_iter=20, on_fail="ignore")
    vectors = memory.peak / (batch * n * 4)
    assert 2 * m < vectors <= 2 * m + 6, f"{vectors:.2f} vectors of (batch, n) at m = {m}"


@pytest.mark.parametrize("gradient", ["ift", "jfb", "phantom"])
def test_the_backward_pass_holds_the_graph_of_f_at_the_solution_not_its_value(gradient):
    """The backward pass runs through the graph of ``F`` recorded at ``z*`` and needs its edge,
    not the value ``F(z*)``: that (a state-sized tensor no backward node saves, here) is freed
    when the solve returns, not held until the backward pass."""
    import weakref

    torch.manual_seed(0)
    W = (0.5 * torch.randn(N, N) / N**0.5).requires_grad_()
    x = torch.randn(BATCH, N)
    outputs = []

    def f(z, x):
        out = z @ W.T + x  # (the sum is saved by no backward node: only its graph is needed)
        outputs.append(weakref.ref(out))
        return out

    z, _ = ic.fixed_point(f, torch.zeros(BATCH, N), x, gradient=gradient, tol=1e-4, max_iter=100)
    recorded = outputs[-1]  # F(z*), evaluated with a graph after the solve
    seen = []
    W.register_hook(lambda g: seen.append(recorded() is None))
    z.square().sum().backward()
    assert seen == [True] and W.grad is not None
