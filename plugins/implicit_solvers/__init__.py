"""The built-in solvers, registered through the ``implicit_core`` entry-point group."""

from implicit_core import hookimpl

from .anderson import Anderson
from .broyden import Broyden
from .fixed_point import FixedPointIteration

__all__ = ["Anderson", "Broyden", "FixedPointIteration"]


@hookimpl
def implicit_core_solvers(register):
    register(FixedPointIteration)
    register(Anderson)
    register(Broyden)
