"""``SharedAdam``: the default hyper-optimizer for per-weight learned values.

With ``granularity="element"`` every weight has its own learning rate (say), and plain Adam on
the unconstrained values moves each of them by about its learning rate per hyper-step,
whatever the size of its own hypergradient: a value whose hypergradient is mostly noise moves
as fast as one with a clear signal. On held-out data that ships with scikit-learn
(``benchmarks/tuning.py``, ``docs/results.md``) this made per-weight learning rates *worse*
than one per group, as Clarke et al. (2022) also report: the thousands of values fit the
validation set (validation loss far below the test loss) and, from a very small initial
learning rate, the per-weight hypergradients were too weak and noisy to raise the learning
rates together, so the runs stalled where one shared value learned.

``SharedAdam`` splits each tensor's step in two. For a tensor of unconstrained values
:math:`\\varphi\\in\\mathbb R^n` with hypergradient :math:`g`:

.. math::

    c = \\textstyle\\sum_i g_i \\qquad\\text{(the derivative for a shared shift }
    \\varphi_i \\leftarrow \\varphi_i + s\\text{)},\\qquad
    d_i = g_i - \\tfrac1n \\textstyle\\sum_j g_j ,

    \\varphi \\leftarrow \\varphi
      - \\alpha\\,\\frac{\\hat m_c}{\\sqrt{\\hat v_c} + \\epsilon}
      - \\alpha_d\\,\\frac{\\hat m_d}{\\sqrt{\\hat v_d} + \\epsilon},

where :math:`\\hat m, \\hat v` are Adam's bias-corrected moment estimates, kept for the shared
component :math:`c` (one scalar per tensor) and element-wise for the deviations :math:`d`.
The shared shift learns as fast as a single value per tensor would (it gets the summed
hypergradient, so its signal grows with the tensor's size), and the deviations, at the smaller
rate :math:`\\alpha_d` (``deviation_lr``), can only specialise the values slowly. With
``deviation_lr=0`` the values keep their initial spread and the update is Adam on the
per-tensor value; for a 0-dim tensor (``"scalar"``, ``"tensor"``) :math:`d = 0` and the
update is Adam's.

The deviation step is normalised value by value, so its mean over the tensor is not exactly
zero: besides the shared step, the values' mean can move by up to :math:`\\alpha_d` per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


class SharedAdam(Optimizer):
    """Adam on each tensor's shared shift, plus slower Adam on the per-value deviations.

    Args:
        params: the tensors of unconstrained learned values (or param groups).
        lr: :math:`\\alpha`, the step of the shared shift (default: 0.05).
        deviation_lr: :math:`\\alpha_d`, the step of the per-value deviations (default:
            0.002); 0 freezes the spread of the values.
        betas: Adam's moment decay rates (default: (0.9, 0.999)).
        eps: Adam's :math:`\\epsilon` (default: 1e-8).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.05,
        deviation_lr: float = 0.002,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        for argument, value in (("lr", lr), ("deviation_lr", deviation_lr), ("eps", eps)):
            if not _number(value):
                raise TypeError(f"{argument} must be a real number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{argument} must be finite and >= 0, got {value!r}")
        given: object = betas
        if (
            not isinstance(given, tuple | list)
            or len(given) != 2
            or not all(_number(b) and math.isfinite(b) and 0 <= b < 1 for b in given)
        ):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        defaults = {"lr": lr, "deviation_lr": deviation_lr, "betas": tuple(betas), "eps": eps}
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict replaces the groups by the saved ones: a state dict of
        # another optimizer (Adam's, from a checkpoint made before SharedAdam was the default
        # for per-weight values) lacks deviation_lr, which keeps its default then.
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, deviation_lr, eps = group["lr"], group["deviation_lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("SharedAdam does not support sparse gradients")
                state = self.state[p]
                spread = p.numel() > 1
                if "shared_avg" not in state:  # first step (or another optimizer's state)
                    state.clear()
                    state["step"] = 0
                    state["shared_avg"] = torch.zeros((), dtype=p.dtype, device=p.device)
                    state["shared_avg_sq"] = torch.zeros((), dtype=p.dtype, device=p.device)
                    if spread:
                        state["deviation_avg"] = torch.zeros_like(p)
                        state["deviation_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                correction1 = 1 - beta1**t
                correction2 = 1 - beta2**t
                shared = g.sum()
                m, v = state["shared_avg"], state["shared_avg_sq"]
                m.lerp_(shared, 1 - beta1)
                v.mul_(beta2).addcmul_(shared, shared, value=1 - beta2)
                p.sub_(lr * (m / correction1) / ((v / correction2).sqrt() + eps))
                if spread:
                    deviation = g - g.mean()
                    m, v = state["deviation_avg"], state["deviation_avg_sq"]
                    m.lerp_(deviation, 1 - beta1)
                    v.mul_(beta2).addcmul_(deviation, deviation, value=1 - beta2)
                    if deviation_lr:
                        denom = (v / correction2).sqrt_().add_(eps)
                        p.addcdiv_(m, denom, value=-deviation_lr / correction1)
        return loss
