"""What a hypergradient method sees of the optimizer, and what it gives back.

A method decides *when* the optimizer keeps the pre-step point ``z_t`` (a
:class:`GroupSnapshot` per param group) and turns it, after or before an update, into
element-wise hypergradients ``dL/dλ`` — one tensor per parameter and learned name — which
the optimizer reduces to the granularity, chains into the unconstrained values and hands to
the hyper-optimizer.  A new method is one new module implementing
:class:`HypergradientMethod`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..rules._base import Hyper, RuleState, UpdateRule

__all__ = [
    "ElementwiseHypergradients",
    "GroupHypergradients",
    "GroupSnapshot",
    "HypergradientMethod",
    "StepContext",
]


@dataclass
class GroupHypergradients:
    """Element-wise ``dL/dλ`` of one param group.

    Attributes:
        indices: the positions, in ``group["params"]``, of the parameters covered.
        values: learned name -> one tensor per covered parameter, of its shape.
    """

    indices: list[int]
    values: dict[str, list[Tensor]]


ElementwiseHypergradients = list[GroupHypergradients]
"""One entry per param group."""


@dataclass
class GroupSnapshot:
    """One param group at the pre-step point ``z_t`` of a step.

    Attributes:
        rule: the group's update map.
        live: the parameter tensors themselves (those with a gradient this step).
        indices: their positions in ``group["params"]``.
        params, grads, state: copies of ``w_t``, ``g(w_t)`` and the state before the update.
        hp: the hyperparameter values the update used.
        flags: the group's structural options.
        names: the learned names.
        maximize: whether the group maximizes its objective.
    """

    rule: UpdateRule
    live: list[Tensor]
    indices: list[int]
    params: list[Tensor]
    grads: list[Tensor]
    state: RuleState
    hp: dict[str, Hyper]
    flags: dict[str, object]
    names: tuple[str, ...]

    def hyper_vjp(
        self, cotangent_params: list[Tensor], cotangent_state: RuleState
    ) -> dict[str, list[Tensor]]:
        return self.rule.hyper_vjp(
            self.params, self.grads, self.state, self.hp, self.flags,
            cotangent_params, cotangent_state, self.names,
        )  # fmt: skip


@dataclass
class StepContext:
    """What the optimizer offers a method during one step.

    Attributes:
        step: the index of this step (0 for the first).
        groups: the snapshot of every param group, when the method asked for one.
        gradients: this step's training gradients of a group's parameters, given the group's
            index and the parameters' positions in it (zeros where a parameter has none).
        validation_gradient: ``∇_w L_V`` at the current weights for the given parameters, or
            ``None`` when the validation loss is not finite (the hyper-update is skipped).
        hvp: Hessian-vector products at the snapshot's point on this step's batch, over the
            concatenation of every group's ``live`` parameters; ``None`` without a closure.
    """

    step: int
    groups: list[GroupSnapshot] | None
    gradients: Callable[[int, list[int]], list[Tensor]]
    validation_gradient: Callable[[list[Tensor]], list[Tensor] | None]
    hvp: Callable[[list[Tensor]], list[Tensor]] | None


class HypergradientMethod(ABC):
    """The interface between the optimizer and a way of computing hypergradients."""

    #: whether the method differentiates a validation loss (else the training loss)
    uses_validation: bool = True

    @abstractmethod
    def wants_snapshot(self, step: int) -> bool:
        """Whether the optimizer should keep ``z_t`` (and the step's gradient) at ``step``."""

    def neumann_steps(self, step: int) -> int:
        """How many Hessian-vector products the method will ask for at ``step``."""
        return 0

    def before_update(self, ctx: StepContext) -> ElementwiseHypergradients | None:
        """Called after the gradient is known and before the update; may return hypergradients."""
        return None

    def after_update(self, ctx: StepContext) -> ElementwiseHypergradients | None:
        """Called after the update; may return hypergradients."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
