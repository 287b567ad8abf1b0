r"""``SignStep``: the outer update of Micaelli & Storkey (2021, arXiv 2007.07869).

Each value moves by its own step size in the direction opposite to the sign of its gradient,
and the step size is multiplied by ``decay`` (one half in the paper) each time that sign flips:

.. math::

    s_t = \operatorname{sign}(g_t),\qquad
    \alpha_t = \alpha_{t-1} \cdot \begin{cases} \text{decay} & s_t s_{t-1} < 0 \\
    1 & \text{else} \end{cases},\qquad
    \phi_{t+1} = \phi_t - \alpha_t s_t,

with :math:`\alpha_0` the ``lr``.  A zero gradient neither moves the value nor counts as a
flip next time.  The sign makes the step independent of the hypergradient's scale, which
for schedules learned over long horizons spans orders of magnitude between windows; the
halving lets it settle in about ten outer steps.  The paper steps natural units with one
initial step size per hyperparameter kind; here the step is on whatever tensors it is given
— with :mod:`hyperopt_optim` that is ``φ``, the log of a learning rate or weight decay and the
logit of a momentum, so ``lr=0.3`` multiplies a learning rate by at most ``e^{0.3}`` per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["SignStep"]


class SignStep(Optimizer):
    """Sign-of-gradient steps, each value's step halved whenever its gradient's sign flips.

    Args:
        params: tensors or param groups.
        lr: the initial step size :math:`\\alpha_0` (default: 0.3).
        decay: the factor applied to a value's step size when its gradient's sign flips, in
            (0, 1] (default: 0.5, the paper's halving).
        maximize: step along the sign instead of against it (default: False).

    The step sizes are per-value state, initialised from ``lr`` at a value's first step;
    changing ``lr`` afterwards does not rescale them.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.3,
        decay: float = 0.5,
        *,
        maximize: bool = False,
    ) -> None:
        for name, value in (("lr", lr), ("decay", decay)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a real number, got {value!r}")
        if not lr >= 0:
            raise ValueError(f"Invalid lr value: {lr!r} (must be >= 0)")
        if not 0 < decay <= 1:
            raise ValueError(f"Invalid decay value: {decay!r} (must be in (0, 1])")
        if not isinstance(maximize, bool):
            raise TypeError(f"maximize must be a bool, got {maximize!r}")
        super().__init__(params, {"lr": float(lr), "decay": float(decay), "maximize": maximize})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SignStep does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step_size"] = torch.full_like(p, group["lr"])
                    state["sign"] = torch.zeros_like(p)
                sign = torch.sign(p.grad)
                if group["maximize"]:
                    sign.neg_()
                flipped = sign * state["sign"] < 0
                size = state["step_size"]
                size.copy_(torch.where(flipped, size * group["decay"], size))
                p.addcmul_(size, sign, value=-1)
                state["sign"].copy_(sign)
        return loss
