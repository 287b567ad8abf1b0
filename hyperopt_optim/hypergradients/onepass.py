r"""One-pass implicit hypergradients (Clarke, Oldewage & Hernández-Lobato 2022).

Every ``update_interval`` steps, after the step :math:`z_{t+1} = U(z_t, g(w_t), \lambda)`:

.. math::

    v_0 = \Big(\frac{\partial L_V(w_{t+1})}{\partial w_{t+1}}, 0\Big),\qquad
    v_j = v_{j-1} J,\quad J = \frac{dU}{dz}(z_t, \lambda),\qquad
    p = \sum_{j=0}^{K} v_j,\qquad
    \frac{dL_V}{d\lambda} \approx p\,\frac{\partial U}{\partial \lambda}(z_t, \lambda).

``J`` is the Jacobian of the *whole* state (weights and optimizer buffers), each product
costing one Hessian-vector product on the step's training batch (see
:mod:`hyperopt_optim.rules`).  ``K = 0`` (``method="greedy"``) is the exact derivative of the
validation loss after this one step; at a fixed point of ``U`` the ``K``-term sum is exactly
the derivative through ``K + 1`` unrolled steps from there, and as ``K → ∞`` it tends to the
implicit-function-theorem hypergradient :math:`-\partial_z L_V (J - I)^{-1} \partial_\lambda U`
(the paper's Eq. 5 and its Neumann truncation, Eq. 6; the paper keeps the weight block only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import check_neumann_steps, check_positive_int
from ..rules._base import RuleState
from ._base import (
    ElementwiseHypergradients,
    GroupHypergradients,
    GroupSnapshot,
    HypergradientMethod,
    MethodOptions,
    StepContext,
    StepPlan,
)

DEFAULT_NEUMANN_STEPS = 4
DEFAULT_UPDATE_INTERVAL = 10

__all__ = ["OnePass", "neumann_hypergradient"]


def neumann_hypergradient(
    groups: list[GroupSnapshot],
    outer: list[Tensor],
    hvp: Callable[[list[Tensor]], list[Tensor]] | None,
    neumann_steps: int,
) -> ElementwiseHypergradients:
    """``p·∂U/∂λ`` with ``p = Σ_{j≤K} v_0 J^j`` and ``v_0 = (outer, 0)``.

    Args:
        groups: the snapshot of every param group at ``z_t``.
        outer: ``∂L/∂w_{t+1}`` for the concatenation of every group's ``live`` parameters.
        hvp: Hessian-vector products at ``w_t`` over the same concatenation (needed when
            ``neumann_steps > 0``).
        neumann_steps: ``K``.
    Returns:
        Per group, the element-wise hypergradient of every learned name.
    """
    sizes = [len(g.live) for g in groups]
    v_params = _split(outer, sizes)
    v_state: list[RuleState] = [{} for _ in groups]
    p_params = [[x.clone() for x in vs] for vs in v_params]
    p_state: list[RuleState] = [{} for _ in groups]
    for _ in range(neumann_steps):
        if hvp is None:
            raise ValueError("neumann_steps > 0 needs Hessian-vector products")
        parts = [g.state_vjp(vp, vs) for g, vp, vs in zip(groups, v_params, v_state, strict=True)]
        products = _split(hvp([r for part in parts for r in part.grads]), sizes)
        v_params = [
            list(torch._foreach_add(part.params, hr))
            for part, hr in zip(parts, products, strict=True)
        ]
        v_state = [part.state for part in parts]
        for acc, vp in zip(p_params, v_params, strict=True):
            torch._foreach_add_(acc, vp)
        for acc_s, vs in zip(p_state, v_state, strict=True):
            _accumulate(acc_s, vs)
    return [
        GroupHypergradients(list(g.indices), g.hyper_vjp(pp, ps))
        for g, pp, ps in zip(groups, p_params, p_state, strict=True)
    ]


def _split(xs: list[Tensor], sizes: list[int]) -> list[list[Tensor]]:
    out, start = [], 0
    for n in sizes:
        out.append(list(xs[start : start + n]))
        start += n
    return out


def _accumulate(acc: RuleState, add: RuleState) -> None:
    for name, xs in add.items():
        if name not in acc:
            acc[name] = [None if x is None else x.clone() for x in xs]
            continue
        for i, x in enumerate(xs):
            if x is None:
                continue
            current = acc[name][i]
            acc[name][i] = x.clone() if current is None else current + x


class OnePass(HypergradientMethod):
    """``method="ift"`` (``K ≥ 0`` Neumann terms) and ``method="greedy"`` (``K = 0``).

    Args:
        neumann_steps: ``K``, the number of state-Jacobian products in the series.
        update_interval: ``T``; the hyper-step follows steps ``T−1, 2T−1, …``.
    """

    uses_validation = True

    @classmethod
    def from_options(cls, options: MethodOptions) -> OnePass:
        default = DEFAULT_NEUMANN_STEPS if options.method == "ift" else 0
        return cls(
            check_neumann_steps(options.neumann_steps, options.method, default),
            check_positive_int("update_interval", options.update_interval, DEFAULT_UPDATE_INTERVAL),
        )

    def __init__(self, neumann_steps: int, update_interval: int) -> None:
        self.neumann_steps = neumann_steps
        self.update_interval = update_interval

    def plan(self, step: int) -> StepPlan:
        if (step + 1) % self.update_interval != 0:
            return StepPlan()
        return StepPlan(snapshot=True, copy=True, products=self.neumann_steps)

    def after_update(self, ctx: StepContext) -> ElementwiseHypergradients | None:
        if ctx.groups is None:
            return None
        live = [p for g in ctx.groups for p in g.live]
        outer = ctx.validation_gradient(live)
        if outer is None:
            return None
        steps = self.neumann_steps if ctx.hvp is not None else 0
        return neumann_hypergradient(ctx.groups, outer, ctx.hvp, steps)
