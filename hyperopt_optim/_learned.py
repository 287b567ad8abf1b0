"""Learned hyperparameters: their unconstrained form, bounds and granularity.

A learned value is kept as ``φ`` — ``log λ`` for scale hyperparameters (lr, weight decay,
eps) and ``logit λ`` for fractions (momentum, Adam's betas) — so that the hyper-optimizer
can take any step without leaving the valid range; ``φ`` is clipped to the bounds after
every hyper-step.  Granularity decides how many values there are:

* ``"scalar"``: one per param group.  ``φ`` is a 0-dim float64 tensor on the CPU and the
  group's own float (``group["lr"]``...) is what the update reads, so the fast path is
  torch's arithmetic exactly.
* ``"tensor"``: one per parameter tensor (a list of 0-dim tensors on the parameter's device).
* ``"element"``: one per weight (a list of tensors of the parameters' shapes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "GRANULARITIES",
    "Granularity",
    "LearnedValue",
    "clone_values",
    "natural_derivative",
    "to_natural",
    "to_unconstrained",
]

GRANULARITIES = ("scalar", "tensor", "element")
Granularity = Literal["scalar", "tensor", "element"]


def clone_values(values: list[dict[str, list[Tensor]]]) -> list[dict[str, list[Tensor]]]:
    """Detached copies of per-group ``{name: [tensor per learned value]}`` (learned values,
    their hypergradients, schedules)."""
    return [{k: [x.detach().clone() for x in v] for k, v in g.items()} for g in values]


def to_unconstrained(value: float, fraction: bool) -> float:
    """``φ = logit λ`` for a fraction, ``log λ`` for a scale."""
    if fraction:
        return math.log(value) - math.log1p(-value)
    return math.log(value)


def to_natural(phi: Tensor, fraction: bool) -> Tensor:
    """``λ = sigmoid φ`` for a fraction, ``exp φ`` for a scale."""
    return torch.sigmoid(phi) if fraction else torch.exp(phi)


def natural_derivative(value: Tensor, fraction: bool) -> Tensor:
    """``dλ/dφ`` written with ``λ``."""
    return value * (1 - value) if fraction else value


@dataclass
class LearnedValue:
    """One learned hyperparameter of one param group.

    Attributes:
        name: the hyperparameter (``"lr"``, ``"beta2"``...).
        fraction: kept as ``logit λ`` (momentum, betas) rather than ``log λ``.
        granularity: ``"scalar"``, ``"tensor"`` or ``"element"``.
        bounds: the closed range in natural units.
        phi: the unconstrained values the hyper-optimizer steps: one tensor for
            ``"scalar"``, else one per parameter of the group.
        values: the natural values the update reads, one per parameter in the parameter's
            dtype (``"tensor"``, ``"element"``); empty for ``"scalar"``, which reads the group.
        shown: the float last written to the param group; a different float found there was
            written by someone else (a learning-rate scheduler) and is taken up.
    """

    name: str
    fraction: bool
    granularity: Granularity
    bounds: tuple[float, float]
    phi: list[Tensor]
    shown: float
    values: list[Tensor] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        name: str,
        value: float,
        params: list[Tensor],
        granularity: Granularity,
        bounds: tuple[float, float],
        fraction: bool,
    ) -> LearnedValue:
        phi0 = to_unconstrained(value, fraction)
        if granularity == "scalar":
            phi = [torch.tensor(phi0, dtype=torch.float64)]
        else:
            phi = []
            for p in params:
                dtype = torch.promote_types(p.dtype, torch.float32)
                shape = () if granularity == "tensor" else p.shape
                phi.append(torch.full(shape, phi0, dtype=dtype, device=p.device))
        learned = cls(name, fraction, granularity, bounds, phi, float(value))
        if granularity != "scalar":  # the user's own float, not exp(log(value))
            learned.values = [
                torch.full_like(x, value, dtype=p.dtype) for x, p in zip(phi, params, strict=True)
            ]
        return learned

    # -- the values -------------------------------------------------------------------------

    def refresh(
        self, params: list[Tensor], changed: Sequence[Tensor | bool] | None = None
    ) -> float | None:
        """Recompute the natural values from ``φ``.

        ``changed`` (one bool tensor per ``φ``, or a bool for a 0-dim one) limits the update
        to the entries the hyper-optimizer moved, so an unmoved value keeps its exact float.
        Returns the float to show in the param group, or ``None`` when nothing moved.
        """
        if self.granularity == "scalar":
            if changed is not None and not bool(changed[0]):
                return None
            return float(to_natural(self.phi[0], self.fraction))
        masks = None
        if changed is not None:
            masks = [c if isinstance(c, Tensor) else torch.tensor(c) for c in changed]
        if masks is not None and self.values and not any(bool(c.any()) for c in masks):
            return None
        new_values = []
        for i, (phi, p) in enumerate(zip(self.phi, params, strict=True)):
            value = to_natural(phi, self.fraction).to(p.dtype)
            if masks is not None and self.values:
                value = torch.where(masks[i], value, self.values[i])
            new_values.append(value)
        self.values = new_values
        total = sum(
            v.double().sum() * (p.numel() if v.dim() == 0 else 1)
            for v, p in zip(self.values, params, strict=True)
        )
        return float(total) / max(1, sum(p.numel() for p in params))

    def clip_(self, tensors: list[Tensor] | None = None) -> None:
        """Clip ``φ`` (or other tensors of this value's ``φ``: forward mode's schedules) to
        the bounds."""
        lo, hi = (to_unconstrained(b, self.fraction) for b in self.bounds)
        for phi in self.phi if tensors is None else tensors:
            phi.clamp_(lo, hi)

    def take_external(self, new: float, params: list[Tensor]) -> float:
        """Take up a value someone else wrote into the param group; returns what to show
        there (the new value, or for ``"tensor"``/``"element"`` the new mean).

        For ``"scalar"`` the value replaces the learned one.  For ``"tensor"`` and
        ``"element"``, a scale hyperparameter (lr, weight decay, eps) is multiplied by
        ``new / shown`` everywhere — a scheduler's decay applies to every learned value —
        and a fraction (momentum, betas) is set to ``new`` everywhere.  Either way the result
        is clipped to the bounds.
        """
        lo, hi = self.bounds
        new = min(max(new, lo), hi)
        with torch.no_grad():
            if self.granularity == "scalar" or self.fraction or self.shown <= 0:
                for phi in self.phi:
                    phi.fill_(to_unconstrained(new, self.fraction))
            else:
                shift = math.log(new) - math.log(self.shown)
                for phi in self.phi:
                    phi.add_(shift)
            self.clip_()
        if self.granularity == "scalar":
            return new
        self.values = []
        shown = self.refresh(params)
        assert shown is not None
        return shown

    # -- hypergradients ---------------------------------------------------------------------

    def reduce(self, elementwise: list[Tensor]) -> list[Tensor]:
        """Sum element-wise ``dL/dλ`` contributions to this value's granularity."""
        if self.granularity == "scalar":
            by_device: dict[torch.device, list[Tensor]] = {}
            for e in elementwise:  # a float64 number is its own sum (the reduced products')
                one = e if e.dim() == 0 and e.dtype == torch.float64 else e.sum(dtype=torch.float64)
                by_device.setdefault(e.device, []).append(one)
            totals = [torch.stack(sums).sum().cpu() for sums in by_device.values()]
            if not totals:
                return [torch.zeros((), dtype=torch.float64)]
            return [totals[0] if len(totals) == 1 else torch.stack(totals).sum()]
        if self.granularity == "tensor":
            return [e.sum().to(phi.dtype) for e, phi in zip(elementwise, self.phi, strict=True)]
        return [e.to(phi.dtype) for e, phi in zip(elementwise, self.phi, strict=True)]

    def public(self, values: list[Tensor]) -> Tensor | list[Tensor]:
        """One tensor per learned value, as the public API returns it: the tensor itself for
        ``"scalar"``, else the list (one per parameter)."""
        return values[0] if self.granularity == "scalar" else values

    def natural_values(self, group_value: float) -> list[Tensor]:
        """The current values as tensors (``"scalar"``: one 0-dim tensor of the group's)."""
        if self.granularity == "scalar":
            return [torch.tensor(group_value, dtype=torch.float64)]
        return [v.detach().clone() for v in self.values]

    def chain(self, natural_grads: list[Tensor], group_value: float) -> list[Tensor]:
        """``dL/dφ = dL/dλ · dλ/dφ``."""
        values = self.natural_values(group_value)
        return [
            g * natural_derivative(v.to(g.dtype), self.fraction).to(g.device)
            for g, v in zip(natural_grads, values, strict=True)
        ]
