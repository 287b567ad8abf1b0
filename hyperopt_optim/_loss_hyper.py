r"""Hyperparameters inside the training loss (Lorraine, Vicol & Duvenaud 2020).

Tensors ``μ`` that the training closure reads — a weight decay per weight, loss-term weights,
an augmentation network, a distilled training set — and that are not the optimizer's trained
parameters.  After each hyper-step the optimizer steps them with their own hyper-optimizer
along

.. math::

    \frac{dL_V}{d\mu} = \frac{\partial L_V}{\partial \mu}
        + \frac{\partial}{\partial \mu}\big\langle R,\ \nabla_w L_T(w_t, \mu)\big\rangle,
    \qquad R = p\,\frac{\partial U}{\partial g},

where ``p`` is the one-pass series' sum (:func:`~hyperopt_optim.hypergradients.onepass.
neumann_series`) and ``R`` its cotangent on the step's training gradient: one mixed
second-derivative product per hyper-step, whatever the number of values.  With
``solver="cg"`` the classical implicit function theorem at a stationary point replaces the
series: :math:`-\partial_\mu\langle H^{-1}\nabla_w L_V, \nabla_w L_T\rangle`, ``H^{-1}`` by
conjugate gradient.  The tensors stay the user's: they are not in the state dict (the
hyper-optimizer's state is).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["DEFAULT_LOSS_HYPER_LR", "LossHyperparameters", "check_loss_hyperparameters"]

DEFAULT_LOSS_HYPER_LR = 0.01
"""The step of the default hyper-optimizer of loss hyperparameters, ``torch.optim.Adam``: they
are stepped in their own units, whatever those are (a log weight decay, a pixel, a network's
weight), so a smaller step than the learned values' 0.05 on their log or logit scale."""

HyperOptimizerFactory = Callable[[list[Tensor]], Optimizer]


def check_loss_hyperparameters(values: object, trained: list[Tensor]) -> list[Tensor]:
    """The loss hyperparameters as a list: leaf floating-point tensors that require a gradient,
    none of them a trained parameter of the optimizer nor given twice."""
    if values is None:
        return []
    if isinstance(values, Tensor) or not isinstance(values, Iterable):
        raise TypeError(
            "loss_hyperparameters must be an iterable of tensors (e.g. [mu] or "
            f"module.parameters()), got {type(values).__name__}"
        )
    out = list(values)
    trained_ids = {id(p) for p in trained}
    seen: set[int] = set()
    for i, x in enumerate(out):
        where = f"loss_hyperparameters[{i}]"
        if not isinstance(x, Tensor):
            raise TypeError(f"{where} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{where} must be a floating-point tensor, got dtype {x.dtype}")
        if not x.requires_grad:
            raise ValueError(
                f"{where} does not require a gradient: create it with requires_grad=True "
                "(its hypergradient is taken through the training loss)"
            )
        if not x.is_leaf:
            raise ValueError(
                f"{where} is not a leaf tensor (it was computed from others): pass the tensor "
                "the optimizer should step, e.g. torch.zeros(n, requires_grad=True), and "
                "compute from it inside the closure"
            )
        if id(x) in trained_ids:
            raise ValueError(
                f"{where} is a trained parameter of this optimizer: a loss hyperparameter is "
                "stepped on the validation loss, not trained; remove it from the param groups"
            )
        if id(x) in seen:
            raise ValueError(f"{where} is given twice")
        seen.add(id(x))
    return out


class LossHyperparameters:
    """The loss hyperparameters of one optimizer, their hyper-optimizer and last hypergradients.

    Args:
        tensors: the user's tensors (stepped in place).
        factory: builds their hyper-optimizer.
    """

    def __init__(self, tensors: list[Tensor], factory: HyperOptimizerFactory) -> None:
        self.tensors = tensors
        built = factory(tensors)
        if not isinstance(built, Optimizer):
            raise TypeError(
                "the loss hyperparameters' hyper-optimizer factory must return a "
                f"torch.optim.Optimizer, got {type(built).__name__}"
            )
        self.optimizer = built
        self.last = [torch.zeros_like(x, memory_format=torch.preserve_format) for x in tensors]

    def step(self, hypergradients: list[Tensor]) -> None:
        """Step the tensors along ``dL_V/dμ`` (finite: checked by the caller)."""
        for x, g in zip(self.tensors, hypergradients, strict=True):
            x.grad = g.detach().to(x.dtype)
        with torch.no_grad():
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # a closure's backward() adds to them
        self.last = [g.detach().clone() for g in hypergradients]

    def hypergradients(self) -> list[Tensor]:
        return [g.clone() for g in self.last]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "hypergradients": self.hypergradients()}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse a saved state of other loss hyperparameters (before anything loads)."""
        saved = state["hypergradients"]
        shapes = [tuple(x.shape) for x in self.tensors]
        if [tuple(g.shape) for g in saved] != shapes:
            raise ValueError(
                "load_state_dict: the saved loss hyperparameters have shapes "
                f"{[tuple(g.shape) for g in saved]}, this optimizer's {shapes}"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_dict(state)
        saved = state["hypergradients"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.last = [g.detach().clone().to(x) for g, x in zip(saved, self.tensors, strict=True)]
