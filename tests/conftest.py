import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import BACKENDS, backend_or_skip  # noqa: E402


@pytest.fixture(params=BACKENDS)
def be(request):
    """Each available backend in turn (unavailable ones are skipped with the reason)."""
    return backend_or_skip(request.param)
