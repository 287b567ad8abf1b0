"""``HyperAdam`` and ``HyperAdamW``: torch's Adam and AdamW with learned hyperparameters."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from ._checks import check_fused, check_real, check_torch_flags
from .optimizer import HyperOptimizer, HyperOptimizerFactory
from .rules.adam import AdamRule

__all__ = ["HyperAdam", "HyperAdamW"]

_BETA_INDEX = {"beta1": 0, "beta2": 1}


class HyperAdam(HyperOptimizer):
    r"""Adam that tunes its own learning rate, betas, eps and weight decay.

    The update is ``torch.optim.Adam``'s (``decoupled_weight_decay=True``: AdamW's), to the
    last bit while the learned values stand still:

    .. math::

        m_t = \beta_1 m_{t-1} + (1-\beta_1)\hat g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2)\hat g_t^2,\quad
        w_t = w_{t-1} - \eta\,\frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon},

    with :math:`\hat g_t = g_t + \xi w_{t-1}` (or, decoupled, :math:`w_{t-1}` first scaled by
    :math:`1 - \eta\xi`) and AMSGrad's running maximum of :math:`v_t` when ``amsgrad``.
    The hypergradients differentiate the bias corrections too, so ``beta1`` and ``beta2``
    get their whole gradient.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: learning rate :math:`\eta` (default: 1e-3).
        betas: :math:`(\beta_1, \beta_2)` (default: (0.9, 0.999)); learned as ``"beta1"`` and
            ``"beta2"``, each on its own.
        eps: :math:`\epsilon` (default: 1e-8).
        weight_decay: :math:`\xi` (default: 0).
        amsgrad: AMSGrad (default: False).
        foreach: ``False`` updates one tensor at a time; otherwise ``torch._foreach`` kernels
            (default: None).
        maximize: maximize the objective (default: False).
        capturable, differentiable, fused: must keep torch's defaults (False, False, None).
        decoupled_weight_decay: AdamW's decoupled weight decay (default: False).
        learn: any of ``"lr"``, ``"beta1"``, ``"beta2"``, ``"eps"``, ``"weight_decay"``
            (default: ``("lr",)``).
        granularity, method, neumann_steps, update_interval, hyper_optimizer, hvp, bounds,
        horizon, windows, mode, clamps, backtrack, divergence_guard, keep_best, process_group,
        grad_scaler, hvp_batch_fraction, loss_hyperparameters, loss_hyper_optimizer, solver:
            as for :class:`~hyperopt_optim.HyperSGD`; the default bounds are lr [1e-8, 10],
            weight decay [1e-10, 10], eps [1e-16, 1], betas [1e-6, 1 - 1e-6].
    """

    rule = AdamRule()
    flag_names = ("amsgrad", "maximize", "decoupled_weight_decay")
    # on the tuning suite a step of 0.1 on log lr beat 0.05 for Adam (docs/choosing.md)
    default_hyper_lr = 0.1

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        learn: str | Iterable[str] = ("lr",),
        granularity: str | Mapping[str, str] = "scalar",
        method: str = "greedy",
        neumann_steps: int | None = None,
        update_interval: int | None = None,
        hyper_optimizer: HyperOptimizerFactory | None = None,
        hvp: str = "auto",
        bounds: Mapping[str, tuple[float, float]] | None = None,
        horizon: int | None = None,
        windows: int | None = None,
        mode: str | None = None,
        clamps: Mapping[str, float] | None = None,
        backtrack: bool | None = None,
        divergence_guard: bool | None = None,
        keep_best: bool = False,
        process_group: Any = None,
        grad_scaler: Any = None,
        hvp_batch_fraction: float = 1.0,
        loss_hyperparameters: Iterable[Tensor] | None = None,
        loss_hyper_optimizer: HyperOptimizerFactory | None = None,
        solver: str = "neumann",
    ) -> None:
        flags = {
            "amsgrad": amsgrad,
            "maximize": maximize,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        check_torch_flags(flags, foreach)
        for name, value in (("capturable", capturable), ("differentiable", differentiable)):
            if value is not False:
                raise ValueError(
                    f"{name}={value!r} is not supported by {type(self).__name__}; leave it False"
                )
        check_fused(type(self).__name__, fused)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": False,
            "differentiable": False,
            "fused": None,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        self._check_group(defaults, None)
        super().__init__(
            params,
            defaults,
            learn=learn,
            granularity=granularity,
            method=method,
            neumann_steps=neumann_steps,
            update_interval=update_interval,
            hyper_optimizer=hyper_optimizer,
            hvp=hvp,
            bounds=bounds,
            horizon=horizon,
            windows=windows,
            mode=mode,
            clamps=clamps,
            backtrack=backtrack,
            divergence_guard=divergence_guard,
            keep_best=keep_best,
            process_group=process_group,
            grad_scaler=grad_scaler,
            hvp_batch_fraction=hvp_batch_fraction,
            loss_hyperparameters=loss_hyperparameters,
            loss_hyper_optimizer=loss_hyper_optimizer,
            solver=solver,
        )

    def _check_group(self, group: dict[str, Any], index: int | None) -> None:
        where = "" if index is None else f"param group {index}: "
        for name in ("lr", "eps", "weight_decay"):
            if check_real(name, group[name], where) < 0:
                raise ValueError(f"{where}Invalid {name} value: {group[name]!r} (must be >= 0)")
        betas = group["betas"]
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise TypeError(f"{where}betas must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            if not 0.0 <= check_real(f"betas[{i}]", beta, where) < 1.0:
                raise ValueError(
                    f"{where}Invalid beta parameter at index {i}: {beta!r} (must be in [0, 1))"
                )
        group["betas"] = (float(betas[0]), float(betas[1]))

    def _group_value(self, group: dict[str, Any], name: str) -> float:
        if name in _BETA_INDEX:
            return float(group["betas"][_BETA_INDEX[name]])
        return float(group[name])

    def _set_group_value(self, group: dict[str, Any], name: str, value: float) -> None:
        if name in _BETA_INDEX:
            betas = list(group["betas"])
            betas[_BETA_INDEX[name]] = value
            group["betas"] = (betas[0], betas[1])
        else:
            group[name] = value

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", False)


class HyperAdamW(HyperAdam):
    r"""AdamW (Loshchilov & Hutter) that tunes its own hyperparameters.

    :class:`HyperAdam` with ``decoupled_weight_decay=True`` and torch's AdamW default
    ``weight_decay=1e-2``: the weights are first scaled by :math:`1 - \eta\xi`, and the
    gradient carries no decay term.  Arguments as for :class:`HyperAdam`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        learn: str | Iterable[str] = ("lr",),
        granularity: str | Mapping[str, str] = "scalar",
        method: str = "greedy",
        neumann_steps: int | None = None,
        update_interval: int | None = None,
        hyper_optimizer: HyperOptimizerFactory | None = None,
        hvp: str = "auto",
        bounds: Mapping[str, tuple[float, float]] | None = None,
        horizon: int | None = None,
        windows: int | None = None,
        mode: str | None = None,
        clamps: Mapping[str, float] | None = None,
        backtrack: bool | None = None,
        divergence_guard: bool | None = None,
        keep_best: bool = False,
        process_group: Any = None,
        grad_scaler: Any = None,
        hvp_batch_fraction: float = 1.0,
        loss_hyperparameters: Iterable[Tensor] | None = None,
        loss_hyper_optimizer: HyperOptimizerFactory | None = None,
        solver: str = "neumann",
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad,
            foreach=foreach, maximize=maximize, capturable=capturable,
            differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            learn=learn, granularity=granularity, method=method, neumann_steps=neumann_steps,
            update_interval=update_interval, hyper_optimizer=hyper_optimizer, hvp=hvp,
            bounds=bounds, horizon=horizon, windows=windows, mode=mode, clamps=clamps,
            backtrack=backtrack,
            divergence_guard=divergence_guard,
            keep_best=keep_best,
            process_group=process_group,
            grad_scaler=grad_scaler,
            hvp_batch_fraction=hvp_batch_fraction,
            loss_hyperparameters=loss_hyperparameters,
            loss_hyper_optimizer=loss_hyper_optimizer,
            solver=solver,
        )  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's AdamW in 2.5 and earlier saves no "decoupled_weight_decay" (it was a class of its
        # own): a group loaded from its state dict is AdamW's, not Adam's with L2
        for group in state.get("param_groups", []):
            group.setdefault("decoupled_weight_decay", True)
        super().__setstate__(state)
