import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import BACKENDS, backend_or_skip  # noqa: E402

try:  # the shared problem set is float64: JAX needs it switched on before any array exists
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:
    pass


@pytest.fixture(params=BACKENDS)
def be(request):
    """Each available backend in turn (unavailable ones are skipped with the reason)."""
    return backend_or_skip(request.param)
