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

__all__ = ["BestWeights", "DivergenceGuard"]


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

    Args:
        interval: steps between checks (the method's ``update_interval``, at least 10).
    """

    factor = 10.0
    backoff = 0.1

    def __init__(self, interval: int) -> None:
        self.interval = max(int(interval), 10)
        self._sum: Tensor | None = None  # the losses of this interval, summed on their device
        self._count = 0
        self.current_ok = False  # at the last check: this step's own loss was good
        self.lowest = math.inf
        self.scale = math.nan  # |L_0|
        self.good: list[Tensor] | None = None  # the weights at the last healthy check
        self._of: tuple[int, ...] = ()  # which parameters ``good`` holds

    def start(self, params: list[Tensor]) -> None:
        """Keep the initial weights, the first healthy point (once; again when the trainable
        parameters change, e.g. after ``add_param_group``)."""
        if self.good is None or self._of != tuple(map(id, params)):
            with torch.no_grad():
                self.good = [p.detach().clone() for p in params]
            self._of = tuple(map(id, params))

    def observe(self, loss: Any, first: bool, rises_only_if_infinite: bool) -> bool | None:
        """Add this step's training loss; at the end of an interval, whether the run diverged
        (``None`` between checks, and when the closure returned no loss).

        Args:
            first: this is the loss at the initial weights (it sets the scale).
            rises_only_if_infinite: the objective is maximised: only a loss that is not finite
                counts as a divergence.
        """
        if isinstance(loss, Tensor) and loss.numel() == 1:
            value = loss.detach().reshape(()).to(torch.float64)
        elif isinstance(loss, float | int):
            value = torch.tensor(float(loss), dtype=torch.float64)
        else:
            return None
        if first:
            first_value = float(value)
            if math.isfinite(first_value):
                self.lowest = min(self.lowest, first_value)
                self.scale = abs(first_value)
        self._sum = value if self._sum is None else self._sum + value
        self._count += 1
        if self._count < self.interval:
            return None
        mean = float(self._sum) / self._count
        self._sum, self._count = None, 0
        current = float(value)  # the loss at the weights the step is about to update
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

    def healthy(self, params: list[Tensor]) -> None:
        """Keep ``params`` as the point to come back to: the weights at which this step's
        closure was just evaluated, after a healthy interval, with a loss of their own no more
        than ``|L_0|`` above the lowest (:attr:`current_ok`).  Keeping the weights *before*
        the step's update, whose loss is known, rather than after it, means a last update that
        blew up can never become the point restored."""
        if self.good is None or self._of != tuple(map(id, params)):
            self.start(params)
            return
        with torch.no_grad():
            for g, p in zip(self.good, params, strict=True):
                g.copy_(p.detach())

    def restore(self, params: list[Tensor]) -> None:
        """Put the last healthy weights back."""
        assert self.good is not None
        with torch.no_grad():
            for p, g in zip(params, self.good, strict=True):
                p.copy_(g)

    def state_dict(self) -> dict[str, Any]:
        return {
            "lowest": self.lowest,
            "scale": self.scale,
            "good": None if self.good is None else [x.clone() for x in self.good],
        }

    def load_state_dict(self, state: dict[str, Any], params: list[Tensor]) -> None:
        self.lowest = float(state["lowest"])
        self.scale = float(state["scale"])
        good = state["good"]
        self.good = (
            None if good is None else [_like(x, p) for x, p in zip(good, params, strict=True)]
        )
        self._of = tuple(map(id, params))
        self._sum, self._count = None, 0


def warn_divergence(name: str, step: int, backed_off: bool) -> None:
    what = (
        "the learned learning rate was divided by 10"
        if backed_off
        else "the learning rate is not learned, so it stays"
    )
    warnings.warn(
        f"{name}: the training loss diverged in the steps before step {step} (not finite, or "
        f"risen by {DivergenceGuard.factor:g}x the first loss); the weights were restored to the "
        f"last healthy point, the optimizer state restarted and {what} "
        "(hyper_state['divergences'] counts this; divergence_guard=False turns it off)",
        RuntimeWarning,
        stacklevel=4,
    )


class BestWeights:
    """The trainable parameters at the lowest validation loss seen at a hyper-step."""

    def __init__(self) -> None:
        self.loss = math.inf
        self.step: int | None = None
        self.params: list[Tensor] | None = None
        self._of: tuple[int, ...] = ()  # which parameters ``params`` holds

    def offer(self, loss: float, step: int, params: list[Tensor]) -> None:
        """Keep ``params`` if ``loss`` (evaluated at them) is the lowest so far.  When the
        trainable parameters changed since the last kept point, it starts again from this one."""
        if self.params is not None and self._of != tuple(map(id, params)):
            self.params, self.loss, self.step = None, math.inf, None
        if not math.isfinite(loss) or loss >= self.loss:
            return
        with torch.no_grad():
            if self.params is None:
                self.params = [p.detach().clone() for p in params]
                self._of = tuple(map(id, params))
            else:
                for x, p in zip(self.params, params, strict=True):
                    x.copy_(p.detach())
        self.loss, self.step = loss, step

    def restore(self, params: list[Tensor]) -> None:
        assert self.params is not None
        if self._of != tuple(map(id, params)):
            raise RuntimeError(
                "restore_best(): the trainable parameters changed since the best weights were "
                "kept (a param group was added, or requires_grad switched)"
            )
        with torch.no_grad():
            for p, x in zip(params, self.params, strict=True):
                p.copy_(x)

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "step": self.step,
            "params": None if self.params is None else [x.clone() for x in self.params],
        }

    def load_state_dict(self, state: dict[str, Any], params: list[Tensor]) -> None:
        self.loss, self.step = float(state["loss"]), state["step"]
        saved = state["params"]
        self.params = (
            None if saved is None else [_like(x, p) for x, p in zip(saved, params, strict=True)]
        )
        self._of = tuple(map(id, params))


def _like(saved: Tensor, param: Tensor) -> Tensor:
    """A saved copy on the parameter's device and in its dtype."""
    return saved.to(device=param.device, dtype=param.dtype).clone()
