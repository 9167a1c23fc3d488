"""The built-in gradient estimators, registered through the ``implicit_core`` entry points."""

from implicit_core import hookimpl

from .broyden_reuse import BroydenReuse
from .ift import IFT
from .jfb import JFB
from .phantom import Phantom
from .shine import SHINE

__all__ = ["IFT", "JFB", "Phantom", "SHINE", "BroydenReuse"]


@hookimpl
def implicit_core_gradients(register):
    for estimator in (IFT, JFB, Phantom, SHINE, BroydenReuse):
        register(estimator)
