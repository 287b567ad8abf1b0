r"""Forward-mode hypergradients with sharing (Micaelli & Storkey 2021, arXiv 2007.07869).

Each learned hyperparameter has a *schedule* of ``N`` values shared over ``N`` contiguous
windows of a horizon of ``T`` steps (:mod:`hyperopt_optim.schedules`): step ``t`` uses value
:math:`k(t) = \lfloor N t / T \rfloor`.  The method carries the tangents
:math:`Z = \partial z / \partial \lambda`, one column per learned value of every window,
through the whole state :math:`z = (w, s)` (:mod:`~hyperopt_optim.hypergradients.tangents`):
before each update, at :math:`z_t`,

.. math::

    Z_{t+1} = J_t Z_t + \frac{\partial U}{\partial \lambda_{k(t)}} e_{k(t)}^\top,

one Hessian-vector product per active column.  The hypergradient of every window's value,
:math:`\nabla_w L_V \cdot Z_w`, is exact over the whole episode (online: the run), and the
schedule steps with it — online every ``update_interval`` steps (the current window's value),
episodic at the end of each episode (the whole schedule; then the tangents and the optimizer's
buffers restart).

Tangents are kept in natural units (``∂z/∂λ``); the schedule multiplies by ``dλ/dφ`` when it
steps the unconstrained values ``φ``, which gives ``∂z/∂φ`` exactly whenever the values were
held fixed over the episode.  The paper's two clamps are options: the training gradient
clipped element-wise to ``±grad`` (the tangents then see the clip's derivative, zero where it
binds) and each :math:`H Z` product clipped to ``±tangent``.  Both are off by default.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .._checks import check_neumann_steps, check_schedule_options
from .._learned import LearnedValue
from ..schedules import MODES, ScheduleOptions, Schedules, window_of
from ..sign_step import SignStep
from ._base import (
    HVP_PROVIDERS,
    Closure,
    ElementwiseHypergradients,
    Host,
    HypergradientMethod,
    MethodOptions,
    NaturalHypergradients,
    StepContext,
    StepPlan,
)
from .hvp import batched_products
from .tangents import PARAM, Column, StepJacobian, Tangents, propagate, step_jacobian

__all__ = [
    "DEFAULT_SIGN_STEP",
    "MODES",
    "ForwardMode",
    "batched_products",
    "window_of",
]

DEFAULT_SIGN_STEP = 0.3
DEFAULT_UPDATE_INTERVAL = 10


def _sign_step(params: list[Tensor]) -> Optimizer:
    return SignStep(params, lr=DEFAULT_SIGN_STEP)  # the paper's outer update


class ForwardMode(HypergradientMethod):
    """``method="forward"``: exact hypergradients of schedules by forward-mode tangents.

    Args:
        options: the schedules' horizon, windows, mode, update interval and backtracking.
        grad_clamp, tangent_clamp: the paper's clamps, or ``None``.
    """

    options = ("horizon", "windows", "mode", "clamps", "backtrack")
    hvp_providers = (*HVP_PROVIDERS, "autograd_batched")
    # the products' errors accumulate in the tangents over the horizon: after 50 steps of an
    # MLP in float32, forward differences were 5e-4 off the exact hypergradient and central
    # ones 3e-5 (docs/choosing.md), so "auto" keeps central ones here
    auto_differences = "finite_difference"
    requires_closure = (
        "the tangents take a Hessian-vector product of the training loss per learned value"
    )
    accepts_loss_fn = True
    learns_schedules = True
    restartable = False  # the tangents follow the weights

    @classmethod
    def from_options(cls, options: MethodOptions) -> ForwardMode:
        check_neumann_steps(options.neumann_steps, options.method, 0)
        extra = options.extra
        schedule, clamps = check_schedule_options(
            options.method,
            options.granularity,
            extra.get("horizon"),
            extra.get("windows"),
            extra.get("mode"),
            options.update_interval,
            extra.get("clamps"),
            extra.get("backtrack"),
            default_update_interval=DEFAULT_UPDATE_INTERVAL,
        )
        return cls(schedule, *clamps, owner=options.method)

    def __init__(
        self,
        options: ScheduleOptions,
        grad_clamp: float | None,
        tangent_clamp: float | None,
        owner: str = "forward",
    ) -> None:
        self.schedule: Schedules = Schedules(options, owner)
        self.update_interval = options.update_interval
        self.grad_clamp = grad_clamp
        self.tangent_clamp = tangent_clamp
        self.tangents = Tangents(options.windows)
        self.default_hyper_optimizer = _sign_step if self.schedule.episodic else None
        self._window = 0

    # -- the step -----------------------------------------------------------------------------

    def plan(self, step: int) -> StepPlan:
        # The products are taken before the update, so the snapshot may be the live tensors.
        return StepPlan(snapshot=True, copy=False, products=max(1, self.tangents.size))

    def begin_step(self, host: Host, written: set[tuple[int, str]]) -> None:
        self._window = self.schedule.enter_step(host, written)

    def before_update(self, ctx: StepContext) -> ElementwiseHypergradients | None:
        """Propagate the tangents through this step's update, at ``z_t``."""
        groups, products = ctx.groups, ctx.hvp
        assert groups is not None and products is not None
        masks = None
        if self.grad_clamp is not None:  # the update and the tangents see the clipped gradient
            c = self.grad_clamp
            masks = [[g.abs() < c for g in group.grads] for group in groups]
            for group in groups:
                group.grads = [g.clamp(-c, c) for g in group.grads]
        with torch.no_grad():  # a group none of whose parameters has a gradient: no step
            jacobians = [
                step_jacobian(g.rule, g.params, g.grads, g.state, g.hp, g.flags, g.names)
                if g.live
                else None
                for g in groups
            ]
        outputs = {o for jac in jacobians if jac is not None for o in jac.outputs}
        blocks = sorted(outputs, key=lambda b: b != PARAM)
        self.tangents.allocate([group["params"] for group in ctx.host.param_groups], blocks)
        tensors = self.tangents.tensors
        assert tensors is not None
        active = self.tangents.active(self._window)
        directions = [
            tensors[i][j][PARAM][:active] for i, g in enumerate(groups) for j in g.indices
        ]
        hz = products.columns(directions)
        ctx.hvp = products = None  # frees the loss's graph before the propagation and update
        if self.tangent_clamp is not None:
            for x in hz:
                x.clamp_(-self.tangent_clamp, self.tangent_clamp)
        with torch.no_grad():
            start = 0
            for i, (group, jac) in enumerate(zip(groups, jacobians, strict=True)):
                if jac is None:  # its weights and buffers stand still: so do their tangents
                    continue
                entries = [tensors[i][j] for j in group.indices]
                propagate(
                    jac,
                    {b: [e[b] for e in entries] for b in jac.outputs},
                    hz[start : start + len(group.indices)],
                    active,
                    grad_mask=None if masks is None else masks[i],
                )
                start += len(group.indices)
                self._add_sources(ctx.host.learned[i], i, group.indices, jac, entries)
        return None

    def _add_sources(
        self,
        learned: dict[str, LearnedValue],
        index: int,
        indices: list[int],
        jac: StepJacobian,
        entries: list[dict[str, Tensor]],
    ) -> None:
        """``Z[:, k·V + v] += ∂z'/∂λ_v`` for the values of param group ``index``."""
        base = self._window * self.tangents.values_per_window
        for v, column in enumerate(self.tangents.columns):
            if column.group != index:
                continue
            lv = learned[column.name]
            for n, j in enumerate(indices):
                if lv.granularity != "scalar" and j != column.value:
                    continue
                for block in jac.outputs:
                    entries[n][block][base + v].add_(jac.hyper[block][column.name][n])

    def after_update(self, ctx: StepContext) -> ElementwiseHypergradients | None:
        """The schedule's hyper-step when one is due; at an episode's end, the restart."""
        assert ctx.val_closure is not None
        val_closure, host = ctx.val_closure, ctx.host
        if self.schedule.hyper_step_due(ctx.step):
            self.schedule.hyper_step(
                host, self._window, lambda: self._hypergradients(host, val_closure), val_closure
            )
        if self.schedule.advance():  # the episode ended: tangents and buffers restart
            self.tangents.zero()
            host.state.clear()
        return None

    def _hypergradients(self, host: Host, val_closure: Closure) -> NaturalHypergradients | None:
        """``∇L_V · Z`` per value and window, recorded as the last hypergradients; ``None``
        (and the tangents restart) when it is not finite."""
        if self.tangents.tensors is None:
            return [self.schedule.zero_hypergradients(i) for i in range(len(host.learned))]
        params = [p for group in host.param_groups for p in group["params"] if p.requires_grad]
        grads = host.validation_gradient(val_closure, params)
        if grads is None:
            return None
        by_param = {id(p): g for p, g in zip(params, grads, strict=True)}
        val_grads = [[by_param.get(id(p)) for p in group["params"]] for group in host.param_groups]
        vector = self.tangents.hypergradient(val_grads)
        if not bool(torch.isfinite(vector).all()):
            host.skip("a hypergradient is not finite (the tangents restart from zero)")
            self.tangents.zero()
            return None
        per_value = self.tangents.split(vector)
        natural = [
            {
                name: [per_value[Column(g, name, j)].to(phi.device) for j, phi in enumerate(lv.phi)]
                for name, lv in learned.items()
            }
            for g, learned in enumerate(host.learned)
        ]
        host.record_hypergradients(natural)
        return natural

    def compute_hypergradients(self, host: Host, val_closure: Closure) -> None:
        self._hypergradients(host, val_closure)

    # -- param groups and what the hyper-optimizer steps -------------------------------------

    def add_group(self, host: Host, index: int) -> None:
        self.schedule.add_group(host.learned[index])
        self.tangents.set_columns(
            [
                Column(g, name, j)
                for g, learned in enumerate(host.learned)
                for name, lv in learned.items()
                for j in range(len(lv.phi))
            ]
        )

    def stepped_values(self, index: int, learned: dict[str, LearnedValue]) -> list[Tensor]:
        return self.schedule.stepped_values(index, learned)

    def zero_hypergradients(
        self, index: int, learned: dict[str, LearnedValue]
    ) -> dict[str, list[Tensor]]:
        return self.schedule.zero_hypergradients(index)

    def memory(self) -> int:
        return self.tangents.memory()

    # -- state --------------------------------------------------------------------------------

    def restart(self, learned: list[dict[str, LearnedValue]]) -> None:
        self.schedule.restart(learned)

    def check_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.check_state_dict(state.get("schedule"))
        self.tangents.check_state_dict(state.get("tangents"))

    def state_dict(self) -> dict[str, Any]:
        return {"tangents": self.tangents.state_dict(), "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any], params: list[list[Tensor]]) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self.tangents.load_state_dict(state["tangents"], params)
