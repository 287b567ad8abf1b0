"""Hypergradient methods and Hessian-vector product providers."""

from ._base import (
    ElementwiseHypergradients,
    GroupHypergradients,
    GroupSnapshot,
    HypergradientMethod,
    StepContext,
)
from .descent import HypergradientDescent
from .hvp import AutogradHVP, FiniteDifferenceHVP
from .onepass import OnePass, neumann_hypergradient

__all__ = [
    "AutogradHVP",
    "ElementwiseHypergradients",
    "FiniteDifferenceHVP",
    "GroupHypergradients",
    "GroupSnapshot",
    "HypergradientDescent",
    "HypergradientMethod",
    "OnePass",
    "StepContext",
    "neumann_hypergradient",
]
