"""A multiscale convolutional DEQ on the digit images (MDEQ's setting at laptop scale).

The state is a tuple of two resolutions, ``z1: (c, 8, 8)`` and ``z2: (2c, 4, 4)``. One
application of the cell (Bai, Koltun & Kolter, *Multiscale Deep Equilibrium Models*, 2020):

    b_i = ReLU(conv(ReLU(GN(conv(z_i)))) + x_i)          a block per scale, with the input injection x_i
    z1' = GN(b1 + upsample(conv1x1(b2)))                 multiscale fusion, normalised per group
    z2' = GN(b2 + conv3x3_stride2(b1))

Unlike MDEQ's blocks, the state does not skip past the convolutions (``z + block(z)``): with
GroupNorm after it, such a skip makes the cell's Jacobian close to the identity and the solve
slow; here the convolutions' scale against the injection's sets the contraction.

``x_1, x_2`` are computed once per input (a convolution of the image and its stride-2
downsampling). The head reads both scales (flattened: at 8×8, pooling would discard the
spatial layout that tells the digits apart).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

import implicit_core as ic
from implicit_torch import DEQ

from ..data import load_digits
from .torch_training import TorchTask, memory_against_depth, memory_table, run_task, unrolled_memory


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(4, channels, affine=False)


class Branch(nn.Module):
    """The residual block of one scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(z))) + x)


class MultiscaleCell(nn.Module):
    """``(z1, z2), (x1, x2) -> (z1', z2')``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.branch1, self.branch2 = Branch(channels), Branch(2 * channels)
        self.up = nn.Conv2d(2 * channels, channels, 1, bias=False)
        self.down = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
        self.fuse1, self.fuse2 = _gn(channels), _gn(2 * channels)

    def forward(self, z: tuple[torch.Tensor, torch.Tensor], x: tuple[torch.Tensor, torch.Tensor]):
        b1, b2 = self.branch1(z[0], x[0]), self.branch2(z[1], x[1])
        up = nn.functional.interpolate(self.up(b2), scale_factor=2, mode="nearest")
        return self.fuse1(b1 + up), self.fuse2(b2 + self.down(b1))


class MultiscaleDEQ(nn.Module):
    """Injection → the multiscale cell (as a DEQ, or unrolled ``depth`` times from zero) → head."""

    def __init__(self, channels: int, n_classes: int, solve: dict[str, Any], depth: int | None = None) -> None:
        super().__init__()
        self.depth = depth
        c = channels
        self.inject1 = nn.Conv2d(1, c, 3, padding=1)
        self.inject2 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.deq = DEQ(MultiscaleCell(c), solver="broyden", on_fail="ignore",
                       init=lambda x: (torch.zeros_like(x[0]), torch.zeros_like(x[1])), **solve)
        self.head = nn.Linear(c * 64 + 2 * c * 16, n_classes)
        for module in self.deq.cell.modules():  # small weights: the cell starts well inside contraction
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.05)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x1 = self.inject1(images)
        x = (x1, self.inject2(x1))
        if self.depth is None:
            z1, z2 = self.deq(x)
        else:  # the explicit weight-tied network: backpropagation through every layer
            z1, z2 = torch.zeros_like(x[0]), torch.zeros_like(x[1])
            for _ in range(self.depth):
                z1, z2 = self.deq.cell((z1, z2), x)
        return self.head(torch.cat([z1.flatten(1), z2.flatten(1)], dim=1))


class MultiscaleTask(TorchTask):
    name = "mdeq"
    metric = "test accuracy"

    def __init__(self, seed: int = 0, channels: int = 8, batch_size: int = 64, train_samples: int | None = None) -> None:
        super().__init__(seed)
        data = load_digits(seed)
        as_images = lambda x: torch.from_numpy(x).reshape(-1, 1, 8, 8)  # noqa: E731
        keep = slice(None, train_samples)  # a smaller training set for quick runs
        self.x_train, self.x_test = as_images(data.x_train[keep]), as_images(data.x_test)
        self.y_train, self.y_test = torch.from_numpy(data.y_train[keep]), torch.from_numpy(data.y_test)
        self.channels, self.batch_size, self.n_classes = channels, batch_size, data.n_classes

    def build(self, depth: int | None = None) -> MultiscaleDEQ:
        return MultiscaleDEQ(self.channels, self.n_classes, self.solve, depth)

    def batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        order = rng.permutation(len(self.y_train))
        return [order[i : i + self.batch_size] for i in range(0, len(order) - self.batch_size + 1, self.batch_size)]

    def loss(self, model: torch.nn.Module, batch: np.ndarray) -> torch.Tensor:
        i = torch.as_tensor(batch)
        return nn.functional.cross_entropy(model(self.x_train[i]), self.y_train[i])

    def evaluate(self, model: torch.nn.Module) -> float:
        return float((model(self.x_test).argmax(1) == self.y_test).float().mean())

    def probe(self) -> np.ndarray:
        return np.arange(min(256, len(self.y_train)))

    def extra(self, model: torch.nn.Module, row: dict[str, Any]) -> None:
        """Memory of the explicit cell unrolled to the DEQ's mean forward steps, same weights."""
        unrolled_memory(self, model, row)


#: The solvers the memory-against-depth table compares (IFT's adjoint: Anderson unless said):
#: the workload's Broyden, Anderson, whose history does not grow with the steps, and
#: fixed-point iteration both ways, which keeps no history at all
DEPTH_SOLVERS = {"DEQ, Broyden m = 30": "broyden", "DEQ, Anderson m = 5": "anderson",
                 "DEQ, fixed point (adjoint too)": ("fixed_point", ic.get_gradient("ift", solver="fixed_point"))}


def extra_report(rows: list[dict[str, Any]], out: Any, seed: int = 0) -> str:
    """Memory of one training step against depth: the DEQ held to ``depth`` steps vs the unrolled cell."""
    return ("One training step's peak memory (KiB) against depth: the DEQ held to exactly `depth` solver steps "
            "(IFT backward) vs the explicit multiscale cell applied `depth` times (same weights, "
            "backpropagation through every layer):\n\n"
            + memory_table(memory_against_depth(MultiscaleTask(seed), DEPTH_SOLVERS, depths=(4, 8, 16, 32))))


def run(gradients, epochs: int | None = None, seed: int = 0, show_progress: bool = True, **size: Any):
    return run_task(MultiscaleTask(seed, **size), gradients, epochs or 4, show_progress)
