"""Hypergradient methods, the interface they share, and Hessian-vector product providers.

Every method is registered here by name; ``HyperSGD(..., method=name)`` builds it through
:func:`build_method`.  A new method is one new module with a
:class:`~hyperopt_optim.hypergradients.HypergradientMethod` subclass, and one line below.
"""

from ._base import (
    ElementwiseHypergradients,
    GroupHypergradients,
    GroupSnapshot,
    Host,
    HypergradientMethod,
    MethodOptions,
    NaturalHypergradients,
    StepContext,
    StepPlan,
)
from ._registry import METHODS, build_method, methods_where, register_method
from .descent import HypergradientDescent
from .forward import ForwardMode
from .hvp import AutogradHVP, FiniteDifferenceHVP, FunctionalHVP
from .onepass import OnePass, neumann_hypergradient
from .reversible import ReversibleMode

register_method("ift", OnePass)
register_method("greedy", OnePass)
register_method("hd", HypergradientDescent)
register_method("forward", ForwardMode)
register_method("reversible", ReversibleMode)

__all__ = [
    "METHODS",
    "AutogradHVP",
    "ElementwiseHypergradients",
    "FiniteDifferenceHVP",
    "ForwardMode",
    "FunctionalHVP",
    "GroupHypergradients",
    "GroupSnapshot",
    "Host",
    "HypergradientDescent",
    "HypergradientMethod",
    "MethodOptions",
    "NaturalHypergradients",
    "OnePass",
    "ReversibleMode",
    "StepContext",
    "StepPlan",
    "build_method",
    "methods_where",
    "neumann_hypergradient",
    "register_method",
]
