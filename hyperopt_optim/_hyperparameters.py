"""The learned hyperparameters of an optimizer, and what its method may do with them.

:class:`LearnedHyperparameters` holds every param group's learned values
(:class:`~hyperopt_optim._learned.LearnedValue`), keeps the float each shows in its param
group (and takes up a float written there from outside, by a scheduler or the user), reduces
element-wise hypergradients to each value's granularity, chains them into the unconstrained
values ``φ`` and steps those with the hyper-optimizer, and counts steps, hyper-steps and skipped
ones.  It is the :class:`~hyperopt_optim.hypergradients.Host` a hypergradient method works
with, so a method never reaches into the optimizer itself.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._closures import validation_gradient
from ._learned import LearnedValue, clone_values
from ._writes import WriteWatch
from .hypergradients._base import Closure, ElementwiseHypergradients, NaturalHypergradients
from .rules._base import Hyper

if TYPE_CHECKING:
    from .optimizer import HyperOptimizer

__all__ = ["COUNTERS", "LearnedHyperparameters"]

COUNTERS = (
    "step",
    "hyper_steps",
    "skipped_hyper_steps",
    "divergences",
    "scaler_skipped_steps",
    "overridden_hyper_steps",
)
"""``hyper_state``'s counters (a state dict of an older version lacks the later ones: zero)."""


class LearnedHyperparameters:
    """The learned values of every param group of ``optimizer``.

    Attributes:
        groups: per param group, name -> the learned value.
        counters: ``step``, ``hyper_steps`` and ``skipped_hyper_steps``.
        last: the hypergradients of the last hyper-step, in natural units.
    """

    def __init__(self, optimizer: HyperOptimizer) -> None:
        # a proxy, not a reference: no cycle keeps the optimizer (and its state) alive
        self._opt = cast("HyperOptimizer", weakref.proxy(optimizer))
        self.name = type(optimizer).__name__
        self.groups: list[dict[str, LearnedValue]] = []
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.last: NaturalHypergradients = []
        #: whether a scheduler's writes undo the hyper-steps
        self.writes = WriteWatch()
        self.validation_loss: float | None = None  # the last one evaluated in this step

    # -- the Host interface ---------------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._opt.param_groups

    @property
    def state(self) -> Any:
        return self._opt.state

    @property
    def hyper_optimizer(self) -> Optimizer | None:
        return self._opt.hyper_optimizer

    @property
    def learned(self) -> list[dict[str, LearnedValue]]:
        return self.groups

    def show(self, index: int, name: str) -> None:
        """Recompute the values of ``name`` in group ``index`` from ``φ`` and show them."""
        group, lv = self.param_groups[index], self.groups[index][name]
        lv.values = []
        shown = lv.refresh(group["params"])
        assert shown is not None
        self._write(group, lv, shown)

    def _write(self, group: dict[str, Any], lv: LearnedValue, shown: float) -> None:
        """Show ``shown`` in the param group, as the float this value last wrote there."""
        self._opt._set_group_value(group, lv.name, shown)
        lv.shown = shown

    def skip(self, why: str) -> None:
        self.counters["skipped_hyper_steps"] += 1
        warnings.warn(
            f"{self.name}: {why}; this hyper-update is skipped (the learned hyperparameters are "
            "unchanged)",
            RuntimeWarning,
            stacklevel=5,
        )

    def validation_gradient(
        self, val_closure: Closure, params: list[Tensor]
    ) -> list[Tensor] | None:
        closures = self._opt._closures
        return validation_gradient(
            val_closure,
            params,
            self.skip,
            self._seen,
            replicas=closures.replicas,
            scale=closures.scale,
        )

    def shared_validation_loss(self, val_closure: Closure) -> float:
        """The validation loss, without its gradient (averaged over data-parallel ranks)."""
        with torch.no_grad():
            value = val_closure().detach()
        replicas = self._opt._closures.replicas
        return float(value if replicas is None else replicas.mean_loss(value))

    def _seen(self, value: float) -> None:
        self.validation_loss = value

    def record_hypergradients(self, natural: NaturalHypergradients) -> None:
        self.last = clone_values(natural)

    def step_learned(
        self,
        natural: NaturalHypergradients,
        *,
        record: bool = True,
        loss: list[Tensor] | None = None,
    ) -> bool:
        """Chain ``dL/dλ`` (one value per learned value) into ``φ`` and step the hyper-optimizer,
        and the loss hyperparameters along ``loss``; ``False`` (skipped, counted and warned,
        nothing stepped) when a hypergradient is not finite."""
        flat = [x for group in natural for xs in group.values() for x in xs]
        if not _all_finite(flat + (loss or [])):
            self.skip("a hypergradient is not finite")
            return False
        if loss is not None:
            loss_hyper = self._opt._loss_hyper
            assert loss_hyper is not None
            loss_hyper.step(loss)
        if record:
            self.record_hypergradients(natural)
        optimizer = self.hyper_optimizer
        assert optimizer is not None
        value_of = self._opt._group_value
        before = []
        for group, learned, grads in zip(self.param_groups, self.groups, natural, strict=True):
            for name, lv in learned.items():
                for phi, g in zip(
                    lv.phi, lv.chain(grads[name], value_of(group, name)), strict=True
                ):
                    phi.grad = g.to(phi.dtype)
                    # one value on the host: its float (no tensor operations to compare)
                    before.append(float(phi) if _host_scalar(phi) else phi.clone())
        with torch.no_grad():
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        moved = iter(before)
        for index, (group, learned) in enumerate(zip(self.param_groups, self.groups, strict=True)):
            for lv in learned.values():
                lv.clip_()
                changed = [_moved(phi, next(moved)) for phi in lv.phi]
                shown = lv.refresh(group["params"], changed)
                if shown is not None:
                    self.writes.moved((index, lv.name), lv.shown, shown)
                    self._write(group, lv, shown)
        self.counters["hyper_steps"] += 1
        return True

    # -- what the optimizer asks --------------------------------------------------------------

    def apply(
        self, elementwise: ElementwiseHypergradients | None, loss: list[Tensor] | None = None
    ) -> bool:
        """Reduce element-wise ``dL/dλ`` to each value's granularity and step (and the loss
        hyperparameters along ``loss``, when given); whether the learned values moved."""
        if elementwise is None:
            return False
        natural: NaturalHypergradients = []
        for group, learned, hg in zip(self.param_groups, self.groups, elementwise, strict=True):
            reduced = {}
            for name, lv in learned.items():
                reduced[name] = lv.reduce(_place(hg.values[name], hg.indices, group["params"], lv))
            natural.append(reduced)
        return self.step_learned(natural, loss=loss)

    def take_external_writes(self) -> set[tuple[int, str]]:
        """Take up values written into the param groups from outside; returns which.  Each
        write, or its absence, is shown to :attr:`writes`."""
        taken = set()
        for index, (group, learned) in enumerate(zip(self.param_groups, self.groups, strict=True)):
            for name, lv in learned.items():
                key = (index, name)
                value = self._opt._group_value(group, name)
                written = value != lv.shown
                self.writes.judge(key, lv, value if written else None)
                if written:
                    self._write(group, lv, lv.take_external(value, group["params"]))
                    taken.add(key)
        return taken

    def keys(self) -> list[tuple[int, str]]:
        """Every learned value, as ``(group index, name)``."""
        return [(i, name) for i, learned in enumerate(self.groups) for name in learned]

    def values(
        self, index: int, indices: list[int], learnable: tuple[str, ...]
    ) -> dict[str, Hyper]:
        """The values the update of group ``index`` reads, for the parameters at ``indices``:
        the group's float for a scalar (or unlearned) name, else one tensor per parameter."""
        group = self.param_groups[index]
        learned = self.groups[index]
        hp: dict[str, Hyper] = {}
        for name in learnable:
            lv = learned.get(name)
            if lv is None or lv.granularity == "scalar":
                hp[name] = self._opt._group_value(group, name)
            else:
                hp[name] = [lv.values[i] for i in indices]
        return hp

    def natural(self) -> list[dict[str, Tensor | list[Tensor]]]:
        """The learned values in natural units (what ``hyperparameters()`` returns)."""
        value_of = self._opt._group_value
        return [
            {name: lv.public(lv.natural_values(value_of(group, name))) for name, lv in g.items()}
            for group, g in zip(self.param_groups, self.groups, strict=True)
        ]

    def hypergradients(self) -> list[dict[str, Tensor | list[Tensor]]]:
        """The last hypergradients, shaped like :meth:`natural`."""
        return [
            {name: g[name].public(xs) for name, xs in grads.items()}
            for grads, g in zip(clone_values(self.last), self.groups, strict=True)
        ]

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "phi": [{k: [x.clone() for x in lv.phi] for k, lv in g.items()} for g in self.groups],
            "shown": [{k: lv.shown for k, lv in g.items()} for g in self.groups],
            "counters": dict(self.counters),
            "hypergradients": clone_values(self.last),
        }

    def load_state_dict(self, hyper: dict[str, Any]) -> None:
        with torch.no_grad():
            for learned, saved, shown in zip(
                self.groups, hyper["phi"], hyper["shown"], strict=True
            ):
                for name, lv in learned.items():
                    for phi, x in zip(lv.phi, saved[name], strict=True):
                        phi.copy_(x)
                    lv.shown = float(shown[name])
        for group, learned in zip(self.param_groups, self.groups, strict=True):
            for lv in learned.values():
                if lv.granularity != "scalar":
                    lv.values = []
                    lv.refresh(group["params"])
        self.counters = {**dict.fromkeys(COUNTERS, 0), **hyper["counters"]}
        self.writes.reset()
        self.last = clone_values(hyper["hypergradients"])


def _host_scalar(x: Tensor) -> bool:
    return x.dim() == 0 and x.device.type == "cpu"


def _all_finite(xs: list[Tensor]) -> bool:
    """Whether every tensor is finite: floats for values on the host (a scalar per group),
    one reduction per device otherwise, and one host sync."""
    if all(_host_scalar(x) for x in xs):
        return all(math.isfinite(float(x)) for x in xs)
    return bool(torch.stack([torch.isfinite(x).all().cpu() for x in xs]).all())


def _moved(phi: Tensor, before: Tensor | float) -> Tensor | bool:
    """Where the hyper-optimizer moved ``φ``: a bool tensor, or a bool for a host scalar."""
    if isinstance(before, float):
        return float(phi) != before
    return phi != before


def _place(
    values: list[Tensor], indices: list[int], params: list[Tensor], lv: LearnedValue
) -> list[Tensor]:
    """Element-wise values for the covered parameters, zeros for the rest of the group."""
    if lv.granularity == "scalar" and len(indices) == len(params):
        return values
    if values and all(v.dim() == 0 for v in values) and lv.granularity != "element":
        # already summed per parameter (GroupSnapshot.reduced_hyper_vjp)
        full = [torch.zeros((), dtype=values[0].dtype, device=p.device) for p in params]
    else:
        full = [torch.zeros_like(p) for p in params]
    for i, v in zip(indices, values, strict=True):
        full[i] = v
    return full
