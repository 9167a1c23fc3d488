"""A DEQ classifier in PyTorch: ``implicit_torch.DEQ`` is an ``nn.Module`` like any other.

    python examples/torch_deq.py [--epochs 10] [--threads N]
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

from implicit_demo.threads import ENV, default_threads, limit_threads
from implicit_torch import DEQ


class Cell(nn.Module):
    """f(z, x) = tanh(W z + x): the implicit layer's map; x is the projected input."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width, bias=False)
        nn.init.normal_(self.linear.weight, std=0.25 / width**0.5)  # ||W||₂ ≈ 2·std·√width = 0.5

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(z) + x)


def main(epochs: int = 10, width: int = 64, gradient: str = "ift", seed: int = 0, jac_weight: float = 2.0,
         verbose: bool = True) -> float:
    torch.manual_seed(seed)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor((X - X.mean(0)) / (X.std(0) + 1e-6), dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(y))
    train, test = perm[:1440], perm[1440:]

    model = nn.Sequential(
        nn.Linear(64, width),
        # jac_reg: a Hutchinson estimate of ||∂f/∂z||²_F keeps the cell contractive while it trains
        DEQ(Cell(width), solver="broyden", gradient=gradient, tol=1e-4, max_iter=50, state_shape=(width,),
            jac_reg=True),
        nn.Linear(width, 10),
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    for epoch in range(epochs):
        for idx in train[torch.randperm(len(train))].split(64):
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            loss = loss + jac_weight * model[1].jac_loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            accuracy = (model(X[test]).argmax(1) == y[test]).float().mean().item()
        if verbose:
            info = model[1].info  # per-sample steps, residuals and failures of the last solve
            print(f"epoch {epoch + 1:2d}  loss {loss.item():.3f}  test accuracy {accuracy:.3f}  {info.summary()}")
    return accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--gradient", default="ift")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch threads (default ${ENV}, else half the cores): more threads than free cores "
                             "make this small model many times slower")
    opts = parser.parse_args()
    limit_threads(opts.threads or default_threads())
    main(opts.epochs, gradient=opts.gradient)
