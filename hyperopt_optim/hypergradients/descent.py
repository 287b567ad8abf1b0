r"""Hypergradient descent (Baydin et al. 2018, arXiv 1703.04782): the standard baseline.

The derivative of the *training* loss at the next step with respect to the hyperparameters
of this one, :math:`\nabla L_T(w_{t+1}) \cdot \partial w_{t+1}/\partial\lambda` — for plain
SGD's learning rate :math:`-\nabla L_T(w_{t+1}) \cdot \nabla L_T(w_t)` (the paper's Eq. 3) and
for Adam's the product with the previous update direction.  It needs no validation data and
no Hessian, and arrives one step late: the partials :math:`\partial w_{t+1}/\partial\lambda`
are kept (one tensor per parameter and learned name) until the next step's gradient is known,
and the hyper-update is applied before that step's update.

Unlike the paper, which steps :math:`\lambda` additively with plain SGD, the hypergradient is
handed to the optimizer's hyper-optimizer over the unconstrained value (``log η``), like every
other method here, so bounds and the choice of hyper-optimizer carry over.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import check_neumann_steps, check_positive_int
from ._base import (
    ElementwiseHypergradients,
    GroupHypergradients,
    HypergradientMethod,
    MethodOptions,
    StepContext,
    StepPlan,
)

__all__ = ["HypergradientDescent"]


class HypergradientDescent(HypergradientMethod):
    """``method="hd"``: the next step's training gradient times ``∂w_{t+1}/∂λ``.

    Args:
        update_interval: ``T``; the partials are kept after steps ``T−1, 2T−1, …`` and the
            hyper-update follows at the next step (``T = 1``: every step, as in the paper).
    """

    uses_validation = False

    @classmethod
    def from_options(cls, options: MethodOptions) -> HypergradientDescent:
        check_neumann_steps(options.neumann_steps, options.method, 0)
        return cls(check_positive_int("update_interval", options.update_interval, 1))

    def __init__(self, update_interval: int) -> None:
        self.update_interval = update_interval
        # (step, per group: (indices of its parameters, name -> ∂w'/∂λ per parameter))
        self._pending: tuple[int, list[tuple[list[int], dict[str, list[Tensor]]]]] | None = None

    def plan(self, step: int) -> StepPlan:
        return StepPlan(snapshot=(step + 1) % self.update_interval == 0)

    def before_update(self, ctx: StepContext) -> ElementwiseHypergradients | None:
        pending, self._pending = self._pending, None
        if pending is None or pending[0] != ctx.step - 1:
            return None
        out: ElementwiseHypergradients = []
        for group_index, (indices, partials) in enumerate(pending[1]):
            grads = ctx.gradients(group_index, indices)
            values = {name: list(torch._foreach_mul(d, grads)) for name, d in partials.items()}
            out.append(GroupHypergradients(list(indices), values))
        return out

    def after_update(self, ctx: StepContext) -> ElementwiseHypergradients | None:
        if ctx.groups is None:
            return None
        kept = []
        for g in ctx.groups:
            # U is element-wise, so a cotangent of ones on w' (zero on the state) gives the
            # element-wise partials ∂w'/∂λ; the hypergradient is their product with ∇L_T(w').
            ones = [torch.ones_like(p) for p in g.params]
            partials = g.hyper_vjp(ones, {})
            if g.flags.get("maximize"):
                partials = {k: list(torch._foreach_neg(v)) for k, v in partials.items()}
            kept.append((list(g.indices), partials))
        self._pending = (ctx.step, kept)
        return None

    def state_dict(self) -> dict[str, Any]:
        if self._pending is None:
            return {"pending": None}
        step, kept = self._pending
        groups = [
            {"indices": list(idx), "partials": {k: [x.clone() for x in v] for k, v in d.items()}}
            for idx, d in kept
        ]
        return {"pending": {"step": step, "groups": groups}}

    def load_state_dict(self, state: dict[str, Any], params: list[list[Tensor]]) -> None:
        pending = state.get("pending")
        if pending is None:
            self._pending = None
            return
        kept = [
            (list(g["indices"]), {k: [x.clone() for x in v] for k, v in g["partials"].items()})
            for g in pending["groups"]
        ]
        self._pending = (int(pending["step"]), kept)
