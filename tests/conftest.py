import os
import sys

# One thread per math library in every test process: the suite runs in parallel
# (pytest-xdist, one worker per core), and torch's or BLAS's own thread pools on top of that
# oversubscribe the cores and slow everything down many times over.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))


EXAMPLE_BACKEND = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "array_api_backend_plugin")


STRICT_INSTALLED = __import__("importlib.util").util.find_spec("array_api_strict") is not None


def _register_example_backend() -> None:
    """The example third-party backend (array_api_strict: the array API standard and nothing
    more) joins the registered backends, so the whole suite also runs on it: proof that the
    core, the solvers and the estimators use standard operations only. Installed as a package
    it arrives through its entry point instead (tests/test_examples.py checks that path)."""
    if not STRICT_INSTALLED:
        return
    import implicit_core as ic

    try:
        ic.get_backend("strict")
        return  # installed, or registered already
    except ic.UnknownPluginError:
        pass
    if EXAMPLE_BACKEND not in sys.path:
        sys.path.insert(0, EXAMPLE_BACKEND)
    import implicit_strict

    ic.register_plugin(implicit_strict)


_register_example_backend()

from helpers import BACKENDS, backend_or_skip  # noqa: E402

try:  # the shared problem set is float64: JAX needs it switched on before any array exists
    import jax

    jax.config.update("jax_enable_x64", True)
    # Many tests lower the same solve to the same XLA program (one per solver, shape and
    # estimator, from new Python closures each time): a compilation cache keyed by the program
    # compiles each once per run and shares it between the parallel workers. The JAX tests'
    # time is mostly XLA compilation; this cuts it by about a third.
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), os.pardir,
                                                                ".pytest_cache", "jax-compilation"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
except ImportError:
    pass

try:
    import torch

    torch.set_num_threads(1)
except ImportError:
    pass


@pytest.fixture(params=BACKENDS)
def be(request):
    """Each available backend in turn (unavailable ones are skipped with the reason)."""
    return backend_or_skip(request.param)


def pytest_terminal_summary(terminalreporter):
    """Skips counted once per reason (``-ra`` would print one line per test location)."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple):
            reason = report.longrepr[2].removeprefix("Skipped: ")
            reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        terminalreporter.section("skipped, by reason")
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
            terminalreporter.line(f"{count:4d}  {reason}")


@pytest.fixture(autouse=True)
def _example_backend_registered():
    """Tests that reload the registry drop run-time registrations: the example backend comes back."""
    _register_example_backend()


@pytest.fixture(autouse=True)
def _same_random_state():
    """Every test starts from the same global random state (NumPy's legacy generator, torch's),
    whatever ran before it on its worker: an unseeded ``torch.randn`` or ``nn.Linear`` in a test
    draws the same numbers in every run, however xdist hands the tests out."""
    import numpy as np

    np.random.seed(0)
    if "torch" in sys.modules:  # (imported by the test's module if it uses torch)
        sys.modules["torch"].manual_seed(0)
