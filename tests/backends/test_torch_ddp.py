"""A DEQ inside DistributedDataParallel: 2 CPU processes (gloo) average to the whole-batch gradient."""

import os
import socket
import sys

import pytest

pytestmark = pytest.mark.slow  # end-to-end: trains, installs or spawns processes

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

BATCH, N, D = 8, 12, 5


def _model():
    from implicit_torch import DEQ

    torch.manual_seed(0)

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.inj = torch.nn.Linear(N, N), torch.nn.Linear(D, N)
            with torch.no_grad():
                self.lin.weight *= 0.8 / torch.linalg.matrix_norm(self.lin.weight, 2)

        def forward(self, z, x):
            return torch.tanh(self.lin(z) + self.inj(x))

    head = torch.nn.Linear(N, 3)
    deq = DEQ(Cell(), solver="broyden", gradient="ift", tol=1e-12, max_iter=200, state_shape=(N,))
    return torch.nn.Sequential(deq, head).double()


def _data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (BATCH,), generator=gen)
    return x, y


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        x, y = _data()
        shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        loss = torch.nn.functional.cross_entropy(model(x[shard]), y[shard])
        loss.backward()  # DDP averages over the processes: the mean over the whole batch
        torch.save(_grads(model.module), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(sys.platform == "win32", reason="gloo over TCP on localhost")
def test_ddp_gradients_equal_single_process_on_the_whole_batch(tmp_path):
    world = 2
    torch.multiprocessing.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    model = _model()
    x, y = _data()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    expected = _grads(model)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-11, msg=name)
