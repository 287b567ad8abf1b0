"""The table of optimizer cases that drives the generic tests (STYLE.md: torch's ``optim_db``).

Each case is one optimizer class with torch's own arguments, the hyperparameters it learns and
the ``torch.optim`` optimizer it reduces to when nothing is learned.  Tests cross the table with
:data:`METHODS` and :data:`GRANULARITIES`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from hyperopt_optim import HyperAdam, HyperAdamW, HyperOptimizer, HyperSGD

METHODS = ("ift", "greedy", "hd")
GRANULARITIES = ("scalar", "tensor", "element")


@dataclass(frozen=True)
class OptimizerCase:
    """One row of the table.

    Attributes:
        name: the readable test id.
        cls: the hyperparameter-learning optimizer.
        torch_cls: the ``torch.optim`` optimizer with the same update.
        kwargs: torch's own arguments, shared by both.
        learn: the hyperparameters learned.
    """

    name: str
    cls: type[HyperOptimizer]
    torch_cls: type[torch.optim.Optimizer]
    kwargs: dict[str, Any] = field(default_factory=dict)
    learn: tuple[str, ...] = ("lr",)

    def make(self, params: Iterable[Any], **overrides: Any) -> HyperOptimizer:
        """The optimizer over ``params``; ``overrides`` replace any argument of the case."""
        kwargs: dict[str, Any] = {**self.kwargs, "learn": self.learn, **overrides}
        return self.cls(params, **kwargs)

    def make_torch(self, params: Iterable[Any], **overrides: Any) -> torch.optim.Optimizer:
        """The ``torch.optim`` optimizer with the case's (fixed) hyperparameters."""
        return self.torch_cls(params, **{**self.kwargs, **overrides})

    def __str__(self) -> str:
        return self.name


CASES = (
    OptimizerCase(
        "sgd_momentum_wd",
        HyperSGD,
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
        ("lr", "momentum", "weight_decay"),
    ),
    OptimizerCase(
        "sgd_nesterov",
        HyperSGD,
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.8, "nesterov": True},
        ("lr", "momentum"),
    ),
    OptimizerCase(
        "adam",
        HyperAdam,
        torch.optim.Adam,
        {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 1e-4},
        ("lr", "beta1", "beta2", "eps", "weight_decay"),
    ),
    OptimizerCase(
        "adam_amsgrad",
        HyperAdam,
        torch.optim.Adam,
        {"lr": 1e-2, "betas": (0.8, 0.99), "amsgrad": True},
        ("lr", "beta1"),
    ),
    OptimizerCase(
        "adamw",
        HyperAdamW,
        torch.optim.AdamW,
        {"lr": 1e-2, "weight_decay": 1e-2},
        ("lr", "beta2", "weight_decay"),
    ),
)
"""Every optimizer class, with each of its flags that changes the update map."""

CASES_BY_NAME = {case.name: case for case in CASES}
