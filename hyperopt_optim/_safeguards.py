"""What keeps a learning run safe: the divergence guard and the best weights kept.

:class:`DivergenceGuard` watches the training loss the closure returns.  Every ``interval``
steps it compares the interval's mean loss with the lowest seen (the first step's loss, or an
earlier interval's mean).  A mean that is not finite, or ``factor`` times the lowest, means the
run is diverging: the weights go back to the last healthy point (the weights at which a
healthy check's closure was evaluated, with a loss of their own at most ``|L_0|`` above the
lowest), the optimizer's
per-parameter state (momentum buffers, Adam's moments) restarts as a fresh torch optimizer's
would, the learned learning rate is divided by ``1 / backoff`` and the hyper-optimizer's state
is cleared, so its momentum does not push the learning rate straight back.  The step that
detects it does not update anything else.  Each back-off is counted
(``hyper_state["divergences"]``) and warned about.

:class:`BestWeights` keeps one copy of the trainable parameters at the lowest validation loss
a hyper-step has evaluated: early stopping on the validation split for the price of one copy,
since the hyper-steps evaluate that loss anyway.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

__all__ = ["BestWeights", "DivergenceGuard", "WeightCopy"]


class WeightCopy:
    """One copy of the trainable parameters, and which tensors it was taken from (so a param
    group added later, or a switched ``requires_grad``, is noticed)."""

    def __init__(self) -> None:
        self.tensors: list[Tensor] | None = None
        self._of: tuple[int, ...] = ()

    def holds(self, params: list[Tensor]) -> bool:
        """Whether this is a copy of exactly ``params``."""
        return self.tensors is not None and self._of == tuple(map(id, params))

    def keep(self, params: list[Tensor]) -> None:
        """Copy ``params`` (in place when it already holds them)."""
        with torch.no_grad():
            if self.holds(params):
                assert self.tensors is not None
                for x, p in zip(self.tensors, params, strict=True):
                    x.copy_(p.detach())
            else:
                self.tensors = [p.detach().clone() for p in params]
                self._of = tuple(map(id, params))

    def extend(self, params: list[Tensor]) -> None:
        """Hold ``params``: keep the copy of those already held, copy the others as they are
        now (a param group was added)."""
        if self.tensors is None:
            return
        held = dict(zip(self._of, self.tensors, strict=True))
        with torch.no_grad():
            self.tensors = [held[id(p)] if id(p) in held else p.detach().clone() for p in params]
        self._of = tuple(map(id, params))

    def restore(self, params: list[Tensor]) -> None:
        """Put the copy back into ``params``, which it must hold."""
        assert self.tensors is not None and self.holds(params)
        with torch.no_grad():
            for p, x in zip(params, self.tensors, strict=True):
                p.copy_(x)

    def state_dict(self) -> list[Tensor] | None:
        return None if self.tensors is None else [x.clone() for x in self.tensors]

    def load_state_dict(self, saved: list[Tensor] | None, params: list[Tensor]) -> None:
        """Take a saved copy, on each parameter's device and in its dtype."""
        if saved is None:
            self.tensors, self._of = None, ()
            return
        self.tensors = [
            x.to(device=p.device, dtype=p.dtype).clone() for x, p in zip(saved, params, strict=True)
        ]
        self._of = tuple(map(id, params))


class DivergenceGuard:
    """Back off the learning rate and restore the weights when the training loss explodes.

    Every ``interval`` steps the mean training loss of the interval is compared with the
    lowest seen so far (the first step's loss, or an earlier interval's mean).  The run is
    diverging when the mean is not finite, or when it exceeds the lowest by ``factor`` times the
    scale of the first loss, ``|L_0|``: a rise of an order of magnitude of the loss the run
    started from.  Measuring the rise against ``|L_0|`` rather than as a ratio to the lowest
    keeps a loss near zero (a fitted training set), whose noise is many times its own size, or a
    negative loss, from looking like a divergence.  When the objective is maximised only a
    loss that is not finite counts.

    Per step the guard only adds the loss to a sum on its device (:meth:`add`); the host sync,
    the verdict and the weights are touched once an interval (:meth:`check`).

    Args:
        interval: steps between checks (the method's ``update_interval``, at least 10).
    """

    factor = 10.0
    backoff = 0.1

    def __init__(self, interval: int) -> None:
        self.interval = max(int(interval), 10)
        self._sum: Tensor | None = None  # the losses of this interval, summed on their device
        self._last: Tensor | None = None  # this step's loss
        self._count = 0
        self.current_ok = False  # at the last check: this step's own loss was good
        self.lowest = math.inf
        self.scale = math.nan  # |L_0|
        self.good = WeightCopy()  # the point to come back to

    def add(self, loss: Any, first: bool) -> bool:
        """Add this step's training loss; whether an interval ends here (always ``False``
        when the closure returned no loss).  ``first``: the loss at the initial weights, which
        sets the scale."""
        if isinstance(loss, Tensor) and loss.numel() == 1:
            value = loss.detach().reshape(()).to(torch.float64)
        elif isinstance(loss, float | int):
            value = torch.tensor(float(loss), dtype=torch.float64)
        else:
            return False
        if first:
            first_value = float(value)
            if math.isfinite(first_value):
                self.lowest = min(self.lowest, first_value)
                self.scale = abs(first_value)
        self._sum = value if self._sum is None else self._sum + value
        self._last = value
        self._count += 1
        return self._count >= self.interval

    def check(self, rises_only_if_infinite: bool) -> bool:
        """At the end of an interval: whether the run diverged; also sets :attr:`current_ok`.

        Args:
            rises_only_if_infinite: the objective is maximised: only a loss that is not finite
                counts as a divergence.
        """
        assert self._sum is not None and self._last is not None
        mean = float(self._sum) / self._count
        current = float(self._last)  # the loss at the weights the step is about to update
        self._sum, self._last, self._count = None, None, 0
        self.current_ok = False
        if not math.isfinite(mean):
            return True
        if rises_only_if_infinite:
            self.current_ok = math.isfinite(current)
            return False
        if math.isnan(self.scale):  # the first loss was not seen: this mean sets the scale
            self.scale = abs(mean)
        if mean > self.lowest + self.factor * self.scale:
            return True
        self.lowest = min(self.lowest, mean)
        # a point to come back to must itself be good, not merely short of a divergence
        self.current_ok = math.isfinite(current) and current <= self.lowest + self.scale
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "lowest": self.lowest,
            "scale": self.scale,
            "good": self.good.state_dict(),
            # the interval under way, so a resumed run checks where the uninterrupted one would
            "interval": {
                "sum": None if self._sum is None else float(self._sum),
                "last": None if self._last is None else float(self._last),
                "count": self._count,
            },
        }

    def load_state_dict(self, state: dict[str, Any], params: list[Tensor]) -> None:
        self.lowest = float(state["lowest"])
        self.scale = float(state["scale"])
        self.good.load_state_dict(state["good"], params)
        interval = state.get("interval") or {}  # absent before 0.2: a new interval starts
        self._sum, self._last = (
            None
            if interval.get(key) is None
            else torch.tensor(float(interval[key]), dtype=torch.float64)
            for key in ("sum", "last")
        )
        self._count = int(interval.get("count", 0)) if self._sum is not None else 0


def warn_divergence(name: str, step: int, backed_off: bool, loss_hyper: bool = False) -> None:
    what = (
        "the learned learning rate was divided by 10"
        if backed_off
        else "the learning rate is not learned, so it stays"
    )
    how = f"not finite, or risen by {DivergenceGuard.factor:g}x the first loss"
    restored = "the weights and the loss hyperparameters were" if loss_hyper else "the weights were"
    warnings.warn(
        f"{name}: the training loss diverged in the steps before step {step} ({how}); "
        f"{restored} restored to the last healthy point, the optimizer state restarted and {what} "
        "(hyper_state['divergences'] counts this; divergence_guard=False turns it off)",
        RuntimeWarning,
        stacklevel=4,
    )


class BestWeights:
    """The trainable parameters at the lowest validation loss seen at a hyper-step."""

    def __init__(self) -> None:
        self.loss = math.inf
        self.step: int | None = None
        self.weights = WeightCopy()

    @property
    def kept(self) -> bool:
        return self.weights.tensors is not None

    def offer(self, loss: float, step: int, params: list[Tensor]) -> None:
        """Keep ``params`` if ``loss`` (evaluated at them) is the lowest so far.  When the
        trainable parameters changed since the last kept point, it starts again from this one."""
        if self.kept and not self.weights.holds(params):
            self.weights, self.loss, self.step = WeightCopy(), math.inf, None
        if not math.isfinite(loss) or loss >= self.loss:
            return
        self.weights.keep(params)
        self.loss, self.step = loss, step

    def restore(self, params: list[Tensor]) -> None:
        if not self.weights.holds(params):
            raise RuntimeError(
                "restore_best(): the trainable parameters changed since the best weights were "
                "kept (a param group was added, or requires_grad switched)"
            )
        self.weights.restore(params)

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "step": self.step, "params": self.weights.state_dict()}

    def load_state_dict(self, state: dict[str, Any], params: list[Tensor]) -> None:
        self.loss, self.step = float(state["loss"]), state["step"]
        self.weights.load_state_dict(state["params"], params)
