r"""Forward-mode hypergradients with sharing (Micaelli & Storkey 2021, arXiv 2007.07869).

Each learned hyperparameter has a *schedule* of ``N`` values shared over ``N`` contiguous
windows of a horizon of ``T`` steps: step ``t`` uses value :math:`k(t) = \lfloor N t / T
\rfloor`.  The optimizer carries the tangents :math:`Z = \partial z / \partial \lambda`, one
column per learned value (``M = N·V`` columns, ``V`` values per window), through the whole
state :math:`z = (w, s)` — weights and buffers — and every step:

.. math::

    Z_{t+1} = J_t Z_t + \frac{\partial U}{\partial \lambda_{k(t)}} e_{k(t)}^\top,\qquad
    J_t = \frac{\partial U}{\partial z} + \frac{\partial U}{\partial g} H_t
    \frac{\partial w}{\partial z}.

For the element-wise update rules of :mod:`hyperopt_optim.rules`, every block of
:math:`\partial U/\partial z`, :math:`\partial U/\partial g` and :math:`\partial U/\partial
\lambda` is diagonal, so :func:`step_jacobian` reads the diagonals off the rules' own
closed-form products (``state_vjp``, ``hyper_vjp``) with unit cotangents, once per step
whatever ``M``; :func:`propagate` then costs element-wise arithmetic plus one
Hessian-vector product :math:`H Z_w` per active column.  Columns are laid out window by
window, so at window ``k`` only the first ``(k+1)·V`` columns are non-zero and only those are
propagated.  At any step the hypergradient of every window's value is exact:

.. math::

    \frac{d L_V(w_t)}{d \lambda_k} = \nabla_w L_V(w_t) \cdot Z_{w,t}[:, k],

with memory ``M·|z|`` whatever the horizon.  Tangents are kept in natural units (``∂z/∂λ``);
the optimizer multiplies by ``dλ/dφ`` when it steps the unconstrained values ``φ``, which
gives ``∂z/∂φ`` exactly whenever the values were held fixed over the episode.

The paper's two clamps are options: the training gradient clipped element-wise to
``±grad`` (the tangent then sees the clip's derivative, zero where it binds) and each
:math:`H Z` product clipped to ``±tangent``.  Both are off by default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..rules._base import Hyper, RuleState, UpdateRule
from ._base import HypergradientMethod

__all__ = [
    "PARAM",
    "Column",
    "ForwardMode",
    "StepJacobian",
    "batched_products",
    "propagate",
    "step_jacobian",
    "window_of",
]

PARAM = "param"
"""The name of the weight block of ``z`` among the state blocks."""

MODES = ("online", "episodic")


def window_of(step: int, horizon: int, windows: int) -> int:
    """``k(t) = ⌊N t / T⌋``, held at the last window past the horizon."""
    return min(windows - 1, windows * step // horizon)


@dataclass
class StepJacobian:
    """The diagonals of one step's Jacobians for the live parameters of one param group.

    Attributes:
        outputs: the blocks of ``z`` the step writes: ``"param"``, then the rule's state
            buffers (the same blocks, before the step, are the inputs).
        state: ``state[o][i]`` is :math:`\\partial o'/\\partial i`, one tensor per parameter.
        grad: :math:`\\partial o'/\\partial g` per output block.
        hyper: :math:`\\partial o'/\\partial \\lambda` per output block and learned name.
    """

    outputs: tuple[str, ...]
    state: dict[str, dict[str, list[Tensor]]]
    grad: dict[str, list[Tensor]]
    hyper: dict[str, dict[str, list[Tensor]]]


def step_jacobian(
    rule: UpdateRule,
    params: list[Tensor],
    grads: list[Tensor],
    state: RuleState,
    hp: dict[str, Hyper],
    flags: dict[str, object],
    names: tuple[str, ...],
) -> StepJacobian:
    """Read the diagonal Jacobian blocks of ``U`` at ``z_t`` off the rule's products.

    One ``state_vjp`` and one ``hyper_vjp`` per output block, with a cotangent of ones on that
    block and zeros elsewhere: for an element-wise map, row ``o`` of every block is then its
    diagonal.
    """
    ones = [torch.ones_like(p) for p in params]
    zeros = [torch.zeros_like(p) for p in params]
    first = rule.state_vjp(params, grads, state, hp, flags, ones, {})
    buffers = tuple(first.state)
    outputs = (PARAM, *buffers)
    jac = StepJacobian(outputs, {}, {}, {})
    for o in outputs:
        a_w = ones if o == PARAM else zeros
        a_s: RuleState = {s: list(ones if s == o else zeros) for s in buffers}
        part = first if o == PARAM else rule.state_vjp(params, grads, state, hp, flags, a_w, a_s)
        blocks = {PARAM: part.params}
        for s in buffers:
            blocks[s] = [z if x is None else x for x, z in zip(part.state[s], zeros, strict=True)]
        jac.state[o] = blocks
        jac.grad[o] = part.grads
        jac.hyper[o] = rule.hyper_vjp(params, grads, state, hp, flags, a_w, a_s, names)
    return jac


def propagate(
    jac: StepJacobian,
    tangents: dict[str, list[Tensor]],
    hz: list[Tensor],
    active: int,
    *,
    grad_mask: list[Tensor] | None = None,
) -> None:
    """``Z[:active] ← J Z[:active]`` in place, for one group's live parameters.

    Args:
        jac: the step's diagonals.
        tangents: block -> one tensor ``(M, *shape)`` per parameter (a missing block is zero).
        hz: ``H Z_w[:active]``, one ``(active, *shape)`` tensor per parameter.
        active: how many leading columns can be non-zero.
        grad_mask: where the clipped training gradient moves with ``w`` (the clamp's
            derivative), one tensor per parameter; ``None`` without the clamp.
    """
    n = len(hz)
    new: dict[str, list[Tensor]] = {o: [] for o in jac.outputs}
    for j in range(n):
        drive = hz[j] if grad_mask is None else hz[j] * grad_mask[j]
        for o in jac.outputs:
            value = drive * jac.grad[o][j]
            for i in jac.outputs:
                carried = tangents.get(i)
                if carried is not None:
                    value.addcmul_(carried[j][:active], jac.state[o][i][j])
            new[o].append(value)
    for o, values in new.items():
        for target, value in zip(tangents[o], values, strict=True):
            target[:active].copy_(value)


@dataclass(frozen=True)
class Column:
    """One learned value within a window: param group, name and index in its ``φ`` list."""

    group: int
    name: str
    value: int


class ForwardMode(HypergradientMethod):
    """The state of ``method="forward"``: the schedule layout, the tangents, the position.

    The optimizer drives it step by step (it needs a Hessian-vector product per column on
    every step, which the one-pass interface does not offer); this class keeps what must be
    saved and the arithmetic that does not touch the optimizer.

    Args:
        horizon: ``T``, the number of steps in an episode (the run, online).
        windows: ``N``, values per learned hyperparameter over the horizon.
        mode: ``"online"`` (one run, the current window's value steps every
            ``update_interval`` steps) or ``"episodic"`` (the schedule steps at the end of
            each episode of ``horizon`` steps, then the tangents and buffers restart).
        update_interval: steps between online hyper-steps.
        grad_clamp, tangent_clamp: the paper's clamps, or ``None``.
    """

    uses_validation = True

    def __init__(
        self,
        horizon: int,
        windows: int,
        mode: str,
        update_interval: int,
        grad_clamp: float | None,
        tangent_clamp: float | None,
    ) -> None:
        self.horizon = horizon
        self.windows = windows
        self.mode = mode
        self.update_interval = update_interval
        self.grad_clamp = grad_clamp
        self.tangent_clamp = tangent_clamp
        self.columns: list[Column] = []
        #: per param group, per parameter position: block -> (M, *shape) tangent
        self.tangents: list[list[dict[str, Tensor]]] | None = None
        #: the step within the episode (online: within the run)
        self.position = 0
        self.episodes = 0
        self.loaded_window: int | None = None
        #: episodic backtracking: the best end-of-episode validation loss and its schedules
        self.backtrack = False
        self.best_loss: float | None = None
        self.best_schedules: list[dict[str, list[Tensor]]] | None = None
        self.best_natural: list[dict[str, list[Tensor]]] | None = None
        self.backtracks = 0

    # -- the layout -------------------------------------------------------------------------

    def set_columns(self, columns: list[Column]) -> None:
        """The values of one window, in order; column ``k·V + v`` is value ``v`` of window ``k``."""
        self.columns = list(columns)
        self.tangents = None

    @property
    def values_per_window(self) -> int:
        return len(self.columns)

    @property
    def size(self) -> int:
        """``M``: how many tangent columns."""
        return self.windows * len(self.columns)

    def window(self) -> int:
        return window_of(self.position, self.horizon, self.windows)

    def active(self, window: int) -> int:
        """How many leading columns can be non-zero during ``window``."""
        return (window + 1) * len(self.columns)

    def episode_ends(self) -> bool:
        return self.mode == "episodic" and self.position == self.horizon - 1

    def online_due(self, step: int) -> bool:
        return self.mode == "online" and (step + 1) % self.update_interval == 0

    def allocate(self, groups: Sequence[Sequence[Tensor]], blocks: Sequence[str]) -> None:
        """Zero tangents ``(M, *shape)`` for every parameter and block, if not there yet."""
        if self.tangents is None:
            self.tangents = [[{} for _ in params] for params in groups]
        for per_group, params in zip(self.tangents, groups, strict=True):
            for entry, p in zip(per_group, params, strict=True):
                for block in blocks:
                    if block not in entry:
                        entry[block] = torch.zeros(
                            (self.size, *p.shape), dtype=p.dtype, device=p.device
                        )

    def forget_best(self) -> None:
        """Episodic backtracking starts afresh (the schedules changed shape or value)."""
        self.best_loss = None
        self.best_schedules = None
        self.best_natural = None

    def zero_tangents(self) -> None:
        if self.tangents is None:
            return
        for per_group in self.tangents:
            for entry in per_group:
                for z in entry.values():
                    z.zero_()

    # -- hypergradients ---------------------------------------------------------------------

    def hypergradient(self, val_grads: list[list[Tensor | None]]) -> Tensor:
        """``∇_w L_V · Z_w`` for every column: a float64 vector of length ``M``.

        Args:
            val_grads: per group, per parameter position, ``∇L_V`` (``None`` for none).
        """
        total: Tensor | None = None
        assert self.tangents is not None
        for per_group, grads in zip(self.tangents, val_grads, strict=True):
            for entry, g in zip(per_group, grads, strict=True):
                z = entry.get(PARAM)
                if g is None or z is None:
                    continue
                dots = (z.reshape(self.size, -1) @ g.reshape(-1).to(z.dtype)).to(torch.float64)
                total = dots if total is None else total + dots.to(total.device)
        if total is None:
            return torch.zeros(self.size, dtype=torch.float64)
        return total.cpu()  # one transfer

    def split(self, vector: Tensor) -> dict[Column, Tensor]:
        """A length-``M`` vector as one length-``N`` vector per value (its schedule)."""
        by_window = vector.reshape(self.windows, len(self.columns))
        return {c: by_window[:, v] for v, c in enumerate(self.columns)}

    # -- state ------------------------------------------------------------------------------

    def wants_snapshot(self, step: int) -> bool:
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "episodes": self.episodes,
            "loaded_window": self.loaded_window,
            "best_loss": self.best_loss,
            "best_schedules": self.best_schedules,
            "best_natural": self.best_natural,
            "backtracks": self.backtracks,
            "tangents": None
            if self.tangents is None
            else [[{k: z.clone() for k, z in e.items()} for e in g] for g in self.tangents],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        self.episodes = int(state["episodes"])
        self.loaded_window = state["loaded_window"]
        self.best_loss = state.get("best_loss")
        best = state.get("best_schedules")
        self.best_schedules = (
            None
            if best is None
            else [{k: [x.clone() for x in v] for k, v in g.items()} for g in best]
        )
        natural = state.get("best_natural")
        self.best_natural = (
            None
            if natural is None
            else [{k: [x.clone() for x in v] for k, v in g.items()} for g in natural]
        )
        self.backtracks = int(state.get("backtracks", 0))
        saved = state["tangents"]
        if saved is None:
            self.tangents = None
            return
        if len(saved) and any(
            z.shape[0] != self.size for g in saved for e in g for z in e.values()
        ):
            raise ValueError(
                f"the state dict's tangents have another number of columns than this "
                f"optimizer's M = {self.size} (windows times learned values): was it saved with "
                "other windows, learned names or granularity?"
            )
        self.tangents = [[{k: z.clone() for k, z in e.items()} for e in g] for g in saved]


def batched_products(
    product: Callable[[list[Tensor]], list[Tensor]], directions: list[Tensor]
) -> list[Tensor]:
    """A one-direction Hessian-vector product applied to each leading column of ``directions``.

    An all-zero column is skipped (``H·0 = 0``): a window whose value has not acted yet.
    """
    if not directions:
        return []
    out = [torch.zeros_like(d) for d in directions]
    for c in range(directions[0].shape[0]):
        column = [d[c] for d in directions]
        if not any(bool(x.any()) for x in column):
            continue
        for target, hd in zip(out, product(column), strict=True):
            target[c].copy_(hd)
    return out
