r"""Tangents of forward mode: :math:`Z = \partial z / \partial \lambda` through the whole state.

One column per learned value of every window (``M = N·V`` columns, ``V`` values per window),
for every block of :math:`z = (w, s)` — weights and buffers — and every step:

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
propagated.  :class:`Tangents` holds them and reads the exact hypergradient off them:

.. math::

    \frac{d L_V(w_t)}{d \lambda_k} = \nabla_w L_V(w_t) \cdot Z_{w,t}[:, k],

with memory ``M·|z|`` whatever the horizon.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..rules._base import Hyper, RuleState, UpdateRule, linearise, state_vjp

__all__ = ["PARAM", "Column", "StepJacobian", "Tangents", "propagate", "step_jacobian"]

PARAM = "param"
"""The name of the weight block of ``z`` among the state blocks."""


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
    linear = linearise(rule, params, grads, state, hp, flags)  # once for every block
    first = state_vjp(rule, params, grads, state, hp, flags, ones, {}, linear)
    buffers = tuple(first.state)
    outputs = (PARAM, *buffers)
    jac = StepJacobian(outputs, {}, {}, {})
    for o in outputs:
        a_w = ones if o == PARAM else zeros
        a_s: RuleState = {s: list(ones if s == o else zeros) for s in buffers}
        part = (
            first
            if o == PARAM
            else state_vjp(rule, params, grads, state, hp, flags, a_w, a_s, linear)
        )
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


class Tangents:
    """The tangent columns of every parameter and state block.

    Args:
        windows: ``N``, the windows of the schedules.
    """

    def __init__(self, windows: int) -> None:
        self.windows = windows
        self.columns: list[Column] = []
        #: per param group, per parameter position: block -> (M, *shape) tangent
        self.tensors: list[list[dict[str, Tensor]]] | None = None

    def set_columns(self, columns: list[Column]) -> None:
        """The values of one window, in order; column ``k·V + v`` is value ``v`` of window ``k``."""
        self.columns = list(columns)
        self.tensors = None

    @property
    def values_per_window(self) -> int:
        return len(self.columns)

    @property
    def size(self) -> int:
        """``M``: how many tangent columns."""
        return self.windows * len(self.columns)

    def active(self, window: int) -> int:
        """How many leading columns can be non-zero during ``window``."""
        return (window + 1) * len(self.columns)

    def allocate(self, groups: Sequence[Sequence[Tensor]], blocks: Sequence[str]) -> None:
        """Zero tangents ``(M, *shape)`` for every parameter and block, if not there yet."""
        if self.tensors is None:
            self.tensors = [[{} for _ in params] for params in groups]
        for per_group, params in zip(self.tensors, groups, strict=True):
            for entry, p in zip(per_group, params, strict=True):
                for block in blocks:
                    if block not in entry:
                        entry[block] = torch.zeros(
                            (self.size, *p.shape), dtype=p.dtype, device=p.device
                        )

    def zero(self) -> None:
        if self.tensors is None:
            return
        for per_group in self.tensors:
            for entry in per_group:
                for z in entry.values():
                    z.zero_()

    def memory(self) -> int:
        """Bytes held in tangents."""
        if self.tensors is None:
            return 0
        return sum(
            z.numel() * z.element_size() for g in self.tensors for e in g for z in e.values()
        )

    def hypergradient(self, val_grads: list[list[Tensor | None]]) -> Tensor:
        """``∇_w L_V · Z_w`` for every column: a float64 vector of length ``M``.

        Args:
            val_grads: per group, per parameter position, ``∇L_V`` (``None`` for none).
        """
        total: Tensor | None = None
        assert self.tensors is not None
        for per_group, grads in zip(self.tensors, val_grads, strict=True):
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

    def state_dict(self) -> Any:
        if self.tensors is None:
            return None
        return [[{k: z.clone() for k, z in e.items()} for e in g] for g in self.tensors]

    def check_state_dict(self, saved: Any) -> None:
        if saved and any(z.shape[0] != self.size for g in saved for e in g for z in e.values()):
            raise ValueError(
                f"the state dict's tangents have another number of columns than this "
                f"optimizer's M = {self.size} (windows times learned values): was it saved with "
                "other windows, learned names or granularity?"
            )

    def load_state_dict(self, saved: Any, params: list[list[Tensor]]) -> None:
        """Load tangents, moved to their parameter's device and dtype (as torch moves
        optimizer state)."""
        if saved is None:
            self.tensors = None
            return
        self.check_state_dict(saved)
        self.tensors = [
            [
                {k: z.to(device=p.device, dtype=p.dtype, copy=True) for k, z in e.items()}
                for e, p in zip(per_group, group, strict=True)
            ]
            for per_group, group in zip(saved, params, strict=True)
        ]
