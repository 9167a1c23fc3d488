"""How many threads the math libraries may use (``--threads`` / ``IMPLICIT_CORE_THREADS``).

torch, BLAS and XLA each start one thread per core. The demo's model is small (64 units): it
gains nothing from more threads, and when the cores are busy with other work (a test run, a
second job) those threads wait on each other: torch then runs 10-50x slower than with one
thread. So the programs default to half the cores this process may use (at least one) and
let the user choose.
"""

from __future__ import annotations

import os
import sys

ENV = "IMPLICIT_CORE_THREADS"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform reports it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads() -> int:
    """``$IMPLICIT_CORE_THREADS`` if set, else half the usable cores (at least 1)."""
    value = os.environ.get(ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            from implicit_core import ConfigurationError

            raise ConfigurationError(f"{ENV} must be a whole number >= 1, got {value!r}")
        return int(value)
    return max(1, usable_cores() // 2)


def limit_threads(n: int) -> None:
    """Cap torch's, BLAS's and (when JAX is not imported yet) XLA's CPU threads at ``n``."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)  # libraries loaded from here on (torch reads OMP_NUM_THREADS at import)
    if "jax" not in sys.modules and n == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if "intra_op_parallelism_threads" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1".strip()
    try:
        from threadpoolctl import threadpool_limits  # BLAS already loaded by NumPy (ships with scikit-learn)
    except ImportError:
        pass
    else:
        threadpool_limits(n)
    if "torch" in sys.modules:  # already imported: it no longer reads the environment
        sys.modules["torch"].set_num_threads(n)
