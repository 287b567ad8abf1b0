"""``HyperSGD``: ``torch.optim.SGD`` whose learning rate, momentum and weight decay learn."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from ._checks import check_fused, check_real, check_torch_flags
from .optimizer import HyperOptimizer, HyperOptimizerFactory
from .rules.sgd import SGDRule

__all__ = ["HyperSGD"]


class HyperSGD(HyperOptimizer):
    r"""Stochastic gradient descent (with momentum) that tunes its own hyperparameters.

    The update is ``torch.optim.SGD``'s, bit for bit while the learned values stand still:

    .. math::

        \hat g_t = \sigma g_t + \xi w_t,\quad
        b_{t+1} = \mu b_t + (1-\tau)\hat g_t\ (b_1 = \hat g_0),\quad
        w_{t+1} = w_t - \eta\,(b_{t+1} \text{ or, Nesterov, } \hat g_t + \mu b_{t+1}).

    Every ``update_interval`` steps the values named in ``learn`` take one step of the
    hyper-optimizer along the hypergradient of the validation loss (``method="ift"``:
    Clarke et al. 2022, arXiv 2110.10461; ``"greedy"``: its ``K = 0`` case) or of the next
    training loss (``"hd"``: Baydin et al. 2018, arXiv 1703.04782).  ``method="forward"``
    (Micaelli & Storkey 2021, arXiv 2007.07869) learns a schedule of ``windows`` values per
    name over ``horizon`` steps with exact forward-mode hypergradients (online, or episodic
    with the schedule stepped at the end of each rerun).  ``method="reversible"``
    (Maclaurin, Duvenaud & Adams 2015, arXiv 1502.03492) learns the same schedules with
    exact reverse-mode hypergradients: the ``horizon`` steps of an episode run in exact
    fixed-point arithmetic, and :meth:`reverse` runs them backwards to the first weights.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: learning rate :math:`\eta` (default: 1e-3).
        momentum: momentum factor :math:`\mu` (default: 0).
        dampening: dampening :math:`\tau` for momentum (default: 0).
        weight_decay: L2 penalty :math:`\xi` (default: 0).
        nesterov: Nesterov momentum (default: False).
        maximize: maximize the objective instead of minimizing it (default: False).
        foreach: ``False`` updates one tensor at a time (less temporary memory); otherwise
            ``torch._foreach`` kernels (default: None).
        differentiable: must be False: the optimizer differentiates its own update.
        fused: must be None or False: no fused kernel.
        learn: the hyperparameters to learn, any of ``"lr"``, ``"momentum"``,
            ``"weight_decay"`` (default: ``("lr",)``).  A learned value must start inside its
            bounds: positive for lr and weight decay, in (0, 1) for momentum.
        granularity: ``"scalar"`` (one value per param group), ``"tensor"`` (one per
            parameter tensor) or ``"element"`` (one per weight) (default: ``"scalar"``); or
            a mapping ``{name: granularity}`` for different granularities per learned name,
            e.g. ``{"lr": "element"}`` (names left out are ``"scalar"``).
        method: ``"greedy"``, ``"ift"``, ``"hd"``, ``"forward"`` or ``"reversible"``
            (default: ``"greedy"``:
            as good as ``"ift"`` on the tuning suite at about half its cost; see
            docs/choosing.md).
        neumann_steps: ``K``, the terms of the Neumann series after the first (default: 4
            for ``"ift"``; must be 0 for the others).
        update_interval: ``T``, steps between hyper-steps (default: 10; 1 for ``"hd"``).
        hyper_optimizer: a callable taking the list of unconstrained learned values
            (``log`` of lr and weight decay, ``logit`` of momentum) and returning a torch
            optimizer over them (default: ``torch.optim.Adam(params, lr=0.05)``; ``HyperAdam``
            and ``HyperAdamW`` use lr 0.1 with ``"greedy"`` and ``"ift"``; per-weight values
            ``SharedAdam(params, lr=0.05)``).
        hvp: how Hessian-vector products are taken: ``"autograd"`` (exact; the closure must
            return the loss without calling ``backward()``), ``"finite_difference"`` (central
            differences of the gradient, two closure calls per product, any closure),
            ``"forward_difference"`` (one closure call per product, reusing the step's
            gradient), or ``"auto"``: autograd when the closure leaves ``backward()`` to the
            optimizer, else central differences (default: ``"auto"``).  ``method="forward"``
            also takes ``"autograd_batched"``: the products of all tangent columns in one
            batched double backward (faster on small models, memory of one product per column).
        bounds: ``{name: (low, high)}`` in natural units, overriding the defaults
            (lr [1e-8, 10], weight decay [1e-10, 10], momentum [1e-6, 1 - 1e-6]).
        horizon: ``method="forward"`` and ``"reversible"``, required: the steps of the run
            (online) or of each episode (episodic).
        windows: ``"forward"`` and ``"reversible"``: values per learned name over the horizon;
            step ``t`` uses value ``⌊windows·t/horizon⌋`` (default: ``min(10, horizon)``).
        mode: ``method="forward"``: ``"online"`` (default) or ``"episodic"``;
            ``"reversible"``: ``"episodic"`` only.
        clamps: ``method="forward"`` only: ``{"grad": c, "tangent": c}``, the paper's clamps
            of the training gradient and of each Hessian-tangent product (default: none).
        backtrack: episodic ``"forward"`` and ``"reversible"``: an episode that ends with a
            validation loss not below the best episode's returns to the best schedule and
            steps again along its hypergradient with halved outer steps (default: True).
        divergence_guard: watch the training loss the closure returns; when the mean over
            ``max(update_interval, 10)`` steps is not finite, or above the lowest seen (the
            first step's loss or an earlier interval's mean) by 10 times the first loss
            ``|L_0|`` (when maximising: only not finite), put the weights back to the last
            healthy point (the weights a healthy check's closure was evaluated at, their own
            loss at most ``|L_0|`` above the lowest), restart the per-parameter state (momentum
            buffers) as a fresh torch optimizer would, divide a learned learning rate by 10 and
            clear the hyper-optimizer's state; counted in ``hyper_state["divergences"]`` and warned.
            Keeps one copy of the trainable weights.  Default: on for ``"ift"``, ``"greedy"``
            and ``"hd"``; ``method="forward"`` refuses it (its tangents follow the weights).
        keep_best: keep one copy of the trainable weights at the lowest validation loss a
            hyper-step evaluated; :meth:`restore_best` puts them back (early stopping for the
            price of one copy; default: False).
        process_group: data-parallel training: average over these ranks everything that
            decides the learned values (the gradients and Hessian-vector products the
            optimizer takes itself, the validation loss and gradient, every skip and guard
            decision), so that weights and learned values stay bitwise identical on every rank
            with per-rank training and validation shards.  ``None`` (default): the default
            group when ``torch.distributed`` is initialised with more than one rank; ``True``:
            the default group, which must be; ``False``: none (each rank learns on its own);
            or a ``torch.distributed.ProcessGroup``.  A gradient that the closure's
            ``backward()`` leaves must be averaged already (wrap the model in
            ``DistributedDataParallel``); this is checked on the first step, and the weights
            every 100 steps.  Sharded parameters (FSDP, DTensor) are refused.
        grad_scaler: a ``torch.amp.GradScaler`` for mixed precision: the closure calls
            ``scaler.scale(loss).backward()`` (or returns the loss, which the optimizer scales),
            the optimizer unscales the gradients, skips the whole step when the scaler finds an
            inf or NaN (``hyper_state["scaler_skipped_steps"]``), scales the losses it
            differentiates itself the same way and unscales the products; call
            ``opt.step(closure)`` and then ``scaler.update()``, not ``scaler.step(opt)``
            (default: None).
        hvp_batch_fraction: ``method="ift"``: take the Hessian-vector products of the series
            on this fraction of the step's batch (default: 1, the whole batch).  Below 1 the
            optimizer calls ``closure(batch_fraction=f)`` for them, and the closure evaluates
            the loss on that part of its batch (e.g. the first ``ceil(f * len(batch))``
            examples, the same ones each time); the update still uses the whole batch's
            gradient.  A product then costs about ``f`` of one on the whole batch.
        loss_hyperparameters: tensors the training closure reads (a weight decay per weight,
            loss-term weights, a distilled training set...) that ``"greedy"``/``"ift"`` learn
            too, by one mixed second-derivative product per hyper-step (Lorraine, Vicol &
            Duvenaud 2020): floating-point leaf tensors with ``requires_grad=True`` that are
            not trained here.  They are stepped in place; save them as you save the model.
        loss_hyper_optimizer: a factory like ``hyper_optimizer`` for them (default:
            ``hyper_optimizer`` if given, else ``torch.optim.Adam(params, lr=0.01)``).
        solver: ``"neumann"`` (the one-pass series) or ``"cg"`` (the implicit function
            theorem at a stationary point, ``neumann_steps`` conjugate-gradient iterations;
            ``method="ift"`` and ``learn=()`` only).

    Example:
        >>> import torch
        >>> from hyperopt_optim import HyperSGD
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y, xv, yv = (
        ...     torch.randn(32, 3),
        ...     torch.randn(32, 1),
        ...     torch.randn(16, 3),
        ...     torch.randn(16, 1),
        ... )
        >>> opt = HyperSGD(
        ...     model.parameters(),
        ...     lr=0.01,
        ...     momentum=0.9,
        ...     weight_decay=1e-4,
        ...     learn=("lr", "momentum", "weight_decay"),
        ... )
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> def val_closure():
        ...     return torch.nn.functional.mse_loss(model(xv), yv)
        >>> for _ in range(20):
        ...     _ = opt.step(closure, val_closure=val_closure)
        >>> sorted(opt.hyperparameters()[0])
        ['lr', 'momentum', 'weight_decay']

        Forward mode, episodic: a schedule of 4 learning rates over 20-step episodes, rerun
        from the same weights; the whole schedule steps after each episode.

        >>> init = {k: v.clone() for k, v in model.state_dict().items()}
        >>> opt = HyperSGD(
        ...     model.parameters(),
        ...     lr=0.01,
        ...     momentum=0.9,
        ...     learn="lr",
        ...     method="forward",
        ...     horizon=20,
        ...     windows=4,
        ...     mode="episodic",
        ... )
        >>> def train_loss():  # no backward(): exact batched Hessian-vector products
        ...     return torch.nn.functional.mse_loss(model(x), y)
        >>> for episode in range(3):
        ...     _ = model.load_state_dict(init)
        ...     for _ in range(20):
        ...         _ = opt.step(train_loss, val_closure=val_closure)
        >>> tuple(opt.schedules()[0]["lr"].shape), tuple(opt.hypergradients()[0]["lr"].shape)
        ((4,), (4,))
    """

    rule = SGDRule()
    flag_names = ("dampening", "nesterov", "maximize")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
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
        check_torch_flags({"nesterov": nesterov, "maximize": maximize}, foreach)
        if differentiable is not False:
            raise ValueError(
                f"differentiable={differentiable!r} is not supported: HyperSGD differentiates "
                "its own update"
            )
        check_fused("HyperSGD", fused)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": False,
            "fused": None,
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
        for name in ("lr", "momentum", "dampening", "weight_decay"):
            value = check_real(name, group[name], where)
            if value < 0:
                raise ValueError(f"{where}Invalid {name} value: {value!r} (must be >= 0)")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"{where}Nesterov momentum requires a momentum and zero dampening, got "
                f"momentum={group['momentum']!r}, dampening={group['dampening']!r}"
            )
        if "momentum" in getattr(self, "learn", ()) and group["momentum"] == 0:
            raise ValueError(
                f"{where}momentum=0 cannot be learned: start it in (0, 1), e.g. momentum=0.9"
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
