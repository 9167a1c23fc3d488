"""The comparison's workloads beyond the digits MLP: the settings the seed papers measured on.

* ``mdeq``: a multiscale convolutional DEQ (two resolutions, GroupNorm, residual conv cells)
  on the digit images: MDEQ's image-classification setting at laptop scale;
* ``transformer``: a weight-tied transformer block (causal self-attention + MLP) as the DEQ
  cell, a character-level language model on text that ships with Python: the sequence-DEQ
  setting, with its memory against the explicit block unrolled to the same depth;
* ``hyperparameter``: the bi-level problem of SHINE's paper (the L2 penalty of a logistic
  regression tuned on validation loss through the inner problem's optimality condition).

Every workload trains (or optimises) once per gradient estimator from the same initialisation
and seed, then measures on the result the estimator's gradient against the exact implicit one.
"""

from __future__ import annotations

import importlib
import pathlib
from typing import Any, Callable, Sequence

#: name -> (module, backend it runs on, title of its table)
WORKLOADS: dict[str, tuple[str, str, str]] = {
    "mdeq": (".mdeq", "torch", "Multiscale convolutional DEQ on the digit images (torch, Broyden forward, rel. tol 1e-3)"),
    "transformer": (".transformer", "torch",
                    "Weight-tied transformer DEQ, character-level LM on Python's docstrings (torch, Broyden forward, "
                    "rel. tol 1e-3, Jacobian regularisation on 8 of 32 windows)"),
    "hyperparameter": (".hyperparameter", "numpy",
                       "Bi-level tuning of 31 per-feature L2 penalties of a logistic regression (numpy, Broyden inner "
                       "solve to 1e-8, 40 outer steps)"),
}


def run_workload(name: str, gradients: Sequence[str], epochs: int | None = None, seed: int = 0,
                 out: str | pathlib.Path = "implicit-core-compare", show_progress: bool = True,
                 echo: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    """Run workload ``name`` once per estimator; write ``compare_<name>.csv/.md/.png``; print the table."""
    from implicit_core import get_backend, require_available

    from . import report

    module_name, backend, title = WORKLOADS[name]
    require_available(get_backend(backend))  # a clear error when the framework is missing
    module = importlib.import_module(module_name, __name__)
    rows = module.run(list(gradients), epochs=epochs, seed=seed, show_progress=show_progress)
    out = pathlib.Path(out)
    paths = report.write(rows, out, title)
    echo(f"{title}\n\n{report.to_markdown(rows)}")
    if hasattr(module, "extra_report"):
        text = module.extra_report(rows, out, seed)
        echo("\n" + text)
        with paths[1].open("a") as fh:
            fh.write("\n" + text + "\n")
    echo("\nwritten " + ", ".join(str(p) for p in paths))
    return rows
