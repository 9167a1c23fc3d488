"""implicit-core on JAX: the backend plugin (:mod:`implicit_jax.backend`).

A solve is a pure function of its inputs that composes with ``jit``, ``vmap``, ``grad``,
``jvp`` and ``lax.scan``; there is nothing else to import: ``implicit_core.fixed_point`` on
JAX arrays is the JAX API.
"""

from __future__ import annotations

from .backend import JaxBackend, implicit_core_backends

__all__ = ["JaxBackend", "implicit_core_backends"]
