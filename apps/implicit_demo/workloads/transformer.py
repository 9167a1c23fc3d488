"""A sequence DEQ: a weight-tied transformer block as the implicit layer, character-level LM.

The text is the docstrings of a fixed list of standard-library modules (it ships with Python:
nothing is downloaded), as printable ASCII characters. For a window of ``T`` characters with
embedding ``x = E[c] + P`` (token and position), the cell is a pre-norm-free transformer block
with the input injected at every application (Bai, Kolter & Koltun, *Deep Equilibrium Models*,
2019, whose sequence DEQs are this construction):

    h  = LN(z + CausalSelfAttention(z) + x)
    z' = LN(h + MLP(h))

and the logits are a linear read-out of ``z*``. The score is bits per character on held-out text. The
explicit baseline applies the same block (the same weights) ``L`` times from ``z = 0`` with
backpropagation through every layer: its training memory grows with ``L``, the DEQ's does not.
"""

from __future__ import annotations

import importlib
import inspect
import math
import string
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

import implicit_core as ic
from implicit_torch import DEQ

from .torch_training import TorchTask, memory_against_depth, memory_table, run_task, unrolled_memory

#: modules whose docstrings make the corpus (English prose about programs, ~0.5 MB)
MODULES = ("argparse", "collections", "functools", "itertools", "json", "pathlib", "subprocess", "logging",
           "unittest", "typing", "dataclasses", "inspect", "re", "string", "random", "statistics", "decimal",
           "fractions", "datetime", "calendar", "heapq", "bisect", "csv", "shutil", "tempfile", "threading",
           "textwrap", "difflib", "pickle", "email.message", "http.client", "urllib.parse", "zipfile", "tarfile",
           "socket", "asyncio", "contextlib", "enum", "abc", "operator", "os", "codecs", "io", "locale", "gettext")
ALPHABET = string.printable  # 100 characters; everything else becomes a space


def load_corpus() -> str:
    """The docstrings of :data:`MODULES` and their public members, in a fixed order."""
    parts: list[str] = []
    for name in MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            with warnings.catch_warnings():  # deprecated members (typing.io) warn when read
                warnings.simplefilter("ignore", DeprecationWarning)
                obj = getattr(module, attr)
                if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                    continue
                parts.append(inspect.getdoc(obj) or "")
    text = "\n\n".join(p for p in parts if p)
    return "".join(c if c in ALPHABET else " " for c in text)


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, t, d = z.shape
        q, k, v = self.qkv(z).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # Written out rather than the fused kernel: Jacobian regularisation differentiates
        # the block twice, which torch's fused CPU attention does not support.
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=z.device).tril()
        y = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """``z, x -> LN(h + MLP(h))`` with ``h = LN(z + Attention(z) + x)``."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.attention = CausalSelfAttention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(z + self.attention(z) + x)
        return self.ln2(h + self.mlp(h))


class CharModel(nn.Module):
    """Embedding → the block (as a DEQ, or unrolled ``depth`` times) → linear read-out."""

    def __init__(self, vocab: int, d: int, heads: int, window: int, solve: dict[str, Any], depth: int | None = None,
                 batch_size: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.position = nn.Parameter(torch.randn(window, d) * 0.02)
        self.depth = depth
        # Jacobian regularisation keeps the block contractive as it trains (without it the
        # forward solve stops converging: 30 steps, bits per char 3.77 instead of 3.69). On a
        # quarter of the batch: the same regulariser in expectation, a quarter of its memory.
        self.deq = DEQ(Block(d, heads), solver="broyden", on_fail="ignore", state_shape=(window, d),
                       jac_reg=depth is None, jac_samples=max(1, batch_size // 4), **solve)
        self.read_out = nn.Linear(d, vocab)

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        x = self.embed(chars) + self.position
        if self.depth is None:
            z = self.deq(x)
        else:  # the explicit weight-tied network: backpropagation through every layer
            z = torch.zeros_like(x)
            for _ in range(self.depth):
                z = self.deq.cell(z, x)
        return self.read_out(z)


class CharTask(TorchTask):
    name = "transformer"
    metric = "bits per char"
    lr = 3e-3
    #: weight of the Jacobian penalty ``||∂f/∂z||_F² / n`` in the training loss
    jac_gamma = 1.0

    def __init__(self, seed: int = 0, d: int = 64, heads: int = 4, window: int = 32, batch_size: int = 32,
                 batches_per_epoch: int = 75, chars: int = 200_000) -> None:
        super().__init__(seed)
        text = load_corpus()[: chars + chars // 10]
        codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        lookup = np.zeros(256, dtype=np.int64)
        lookup[np.frombuffer(ALPHABET.encode(), dtype=np.uint8)] = np.arange(len(ALPHABET))
        data = lookup[codes]
        # Every 11th block of 1000 characters is held out: test text from the same modules.
        held_out = (np.arange(len(data)) // 1000) % 11 == 10
        self.train_text, self.test_text = torch.from_numpy(data[~held_out]), torch.from_numpy(data[held_out])
        self.d, self.heads, self.window, self.batch_size = d, heads, window, batch_size
        self.batches_per_epoch = batches_per_epoch

    def build(self, depth: int | None = None) -> CharModel:
        return CharModel(len(ALPHABET), self.d, self.heads, self.window, self.solve, depth, self.batch_size)

    def _windows(self, text: torch.Tensor, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(starts)[:, None] + torch.arange(self.window + 1)
        chunk = text[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        high = len(self.train_text) - self.window - 1
        return [rng.integers(0, high, self.batch_size) for _ in range(self.batches_per_epoch)]

    def loss(self, model: torch.nn.Module, batch: np.ndarray, text: torch.Tensor | None = None) -> torch.Tensor:
        inputs, targets = self._windows(self.train_text if text is None else text, batch)
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        jac_loss = model.deq.jac_loss if model.depth is None and model.training else None
        return loss if jac_loss is None else loss + self.jac_gamma * jac_loss

    def evaluate(self, model: torch.nn.Module) -> float:
        starts = np.arange(0, len(self.test_text) - self.window - 1, self.window)
        losses = [float(self.loss(model, starts[i : i + 256], self.test_text)) * len(starts[i : i + 256])
                  for i in range(0, len(starts), 256)]
        return sum(losses) / len(starts) / math.log(2)

    def probe(self) -> np.ndarray:
        return np.random.default_rng(self.seed + 1).integers(0, len(self.train_text) - self.window - 1, 64)

    def extra(self, model: torch.nn.Module, row: dict[str, Any]) -> None:
        """Memory of the explicit block unrolled to the DEQ's mean forward steps, same weights."""
        unrolled_memory(self, model, row)


#: The forward solvers the memory-against-depth table compares: the training default (Broyden,
#: m = 30, the sequence-DEQ papers' limit) and a 12-column history, flat from the first step
DEPTH_SOLVERS = {"DEQ, Broyden m = 30": "broyden", "DEQ, Broyden m = 12": ic.get_solver("broyden", m=12)}


def extra_report(rows: list[dict[str, Any]], out: Any, seed: int = 0) -> str:
    """Memory of one training step against depth: the DEQ held to ``depth`` steps vs the unrolled block."""
    return ("One training step's peak memory (KiB) against depth: the DEQ held to exactly `depth` solver steps "
            "(IFT backward) vs the explicit weight-tied block unrolled `depth` times (same weights, "
            "backpropagation through every layer):\n\n" + memory_table(memory_against_depth(CharTask(seed), DEPTH_SOLVERS)))


def run(gradients, epochs: int | None = None, seed: int = 0, show_progress: bool = True, **size: Any):
    return run_task(CharTask(seed, **size), gradients, epochs or 4, show_progress)
