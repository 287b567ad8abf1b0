"""The base class of the hyperparameter-learning optimizers.

:class:`HyperOptimizer` is a ``torch.optim.Optimizer`` that owns an update rule (the
mathematics, :mod:`hyperopt_optim.rules`), a hypergradient method
(:mod:`hyperopt_optim.hypergradients`, behind one interface) and the learned values of every
param group (:mod:`hyperopt_optim._learned`), and runs one step the same way for every method:

1. take up values written into the param groups from outside (a scheduler), and ask the
   method what this step needs (:class:`~hyperopt_optim.hypergradients.StepPlan`);
2. evaluate the training closure (keeping a graph only when exact Hessian-vector products
   will be taken on this step);
3. keep the pre-step point ``z_t`` when the method asks for it, and let the method act before
   the update (a pending hyper-update of hypergradient descent; forward mode's tangents);
4. apply the fast in-place update of every group;
5. let the method act after the update (one-pass hypergradients; a schedule's hyper-step),
   and step the learned values with the hyper-optimizer.

A NaN or infinite validation loss or hypergradient skips that hyper-update: the learned values
and the hyper-optimizer's state are left as they are (the step's ordinary weight update,
which used only the training gradient, stands), a ``RuntimeWarning`` says why and
``hyper_state["skipped_hyper_steps"]`` counts it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from ._amp import check_grad_scaler, found_inf
from ._checks import (
    check_bounds,
    check_callable,
    check_choice,
    check_divergence_guard,
    check_granularity,
    check_hvp_batch_fraction,
    check_keep_best,
    check_learn,
    check_learnable_value,
    check_saved_group_values,
    check_saved_shapes,
    check_saved_values,
    check_state_dict_entries,
)
from ._closures import Closures, LossFn
from ._distributed import check_not_sharded, resolve_process_group
from ._hyperparameters import LearnedHyperparameters
from ._learned import Granularity, LearnedValue
from ._loss_hyper import (
    DEFAULT_LOSS_HYPER_LR,
    LossHyperparameters,
    check_loss_hyperparameters,
)
from ._safeguards import BestWeights, DivergenceGuard, warn_divergence
from .hypergradients import (
    METHODS,
    GroupSnapshot,
    MethodOptions,
    StepContext,
    StepPlan,
    build_method,
    methods_where,
)
from .hypergradients._base import Closure, HyperOptimizerFactory
from .rules._base import Hyper, RuleState, UpdateRule
from .schedules import upgrade_state_dict
from .shared_adam import SharedAdam

__all__ = [
    "DEFAULT_HYPER_LR",
    "HVP_PROVIDERS",
    "METHODS",
    "HyperOptimizer",
    "HyperOptimizerFactory",
    "HyperStepHook",
]

HyperStepHook = Callable[["HyperOptimizer", list[dict[str, Any]], list[dict[str, Any]]], None]
"""``hook(optimizer, hyperparameters, hypergradients)``, called after each hyper-step with
what :meth:`HyperOptimizer.hyperparameters` and :meth:`HyperOptimizer.hypergradients` return."""

DEFAULT_HYPER_LR = 0.05
"""The default hyper-optimizer's step (Adam's lr on the unconstrained values) for ``HyperSGD``,
for every optimizer's per-weight values (``SharedAdam``), and for ``"hd"`` and ``"forward"``;
``HyperAdam`` and ``HyperAdamW`` with ``"greedy"``/``"ift"`` use
:attr:`HyperOptimizer.default_hyper_lr` (0.1), chosen on the tuning suite."""

SOLVERS = ("neumann", "cg")
"""How the hypergradient of loss hyperparameters is solved for (``solver=``)."""


def _default_element_hyper_optimizer(params: list[Tensor]) -> Optimizer:
    return SharedAdam(params, lr=DEFAULT_HYPER_LR)  # and its default deviation_lr


def _hvp_providers() -> tuple[str, ...]:
    return tuple(sorted({p for cls in METHODS.values() for p in cls.hvp_providers}))


def _schedule_methods() -> str:
    return methods_where(lambda cls: cls.learns_schedules)


def _covering(saved: dict[str, Any], key: str, params: list[Tensor], what: str) -> dict[str, Any]:
    """A saved safeguard state whose copy of the weights covers ``params``; else the state
    without its copy, with a warning (they were saved before ``requires_grad`` switched)."""
    weights = saved.get(key)
    if weights is None or len(weights) == len(params):
        return saved
    warnings.warn(
        f"load_state_dict: the {what}'s copy holds {len(weights)} tensors but {len(params)} "
        "parameters are trainable now (requires_grad switched since it was saved): it is "
        "dropped, and a new copy is taken as training goes on",
        RuntimeWarning,
        stacklevel=3,
    )
    return {**saved, key: None}


def _no_values(params: list[Tensor]) -> Optimizer:
    """The hyper-optimizer of no learned values (``learn=()``): never has anything to step."""
    return torch.optim.Adam([{"params": list(params)}], lr=DEFAULT_HYPER_LR)


def _default_loss_hyper_optimizer(params: list[Tensor]) -> Optimizer:
    return torch.optim.Adam(params, lr=DEFAULT_LOSS_HYPER_LR)


def _remove_hooks(closures: Closures) -> None:
    with suppress(Exception):  # at interpreter shutdown torch may be gone already
        closures.remove_hooks()


HVP_PROVIDERS = _hvp_providers()
"""The product providers of the methods registered when this module was imported."""


class HyperOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` whose hyperparameters learn by hypergradient descent.

    Subclasses set :attr:`rule` (the update map) and :attr:`flag_names` (the group keys that
    are structural options of the map) and build ``defaults`` with torch's own arguments.
    The keyword-only arguments are documented on :class:`~hyperopt_optim.HyperSGD`.
    """

    rule: ClassVar[UpdateRule]
    flag_names: ClassVar[tuple[str, ...]]
    #: the default hyper-optimizer's learning rate with ``"greedy"`` and ``"ift"``:
    #: ``torch.optim.Adam(φ, lr=default_hyper_lr)`` for scalar and per-tensor values (other
    #: methods: :data:`DEFAULT_HYPER_LR`)
    default_hyper_lr: ClassVar[float] = DEFAULT_HYPER_LR

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        learn: str | Iterable[str],
        granularity: str | Mapping[str, str],
        method: str,
        neumann_steps: int | None,
        update_interval: int | None,
        hyper_optimizer: HyperOptimizerFactory | None,
        hvp: str,
        bounds: Mapping[str, tuple[float, float]] | None,
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
        self.learn = check_learn(
            learn, self.rule.learnable, allow_empty=loss_hyperparameters is not None
        )
        self.granularity = check_granularity(granularity, self.learn)
        self.method = check_choice("method", method, tuple(METHODS))
        # the default (None) is resolved at the first step: the process group may be
        # initialised after the optimizer is built
        self._process_group = process_group
        replicas = None if process_group is None else resolve_process_group(process_group)
        self.grad_scaler = check_grad_scaler(grad_scaler)
        self._closures = Closures(check_choice("hvp", hvp, _hvp_providers()), replicas)
        # the hooks that tell whether a closure called backward() live on the parameters: they
        # go with this optimizer (a finalizer, not __del__, which a wrapper class that copies
        # this class's methods, as Lightning's LightningOptimizer does, would run too)
        weakref.finalize(self, _remove_hooks, self._closures)
        extra: dict[str, object] = {
            "horizon": horizon,
            "windows": windows,
            "mode": mode,
            "clamps": clamps,
            "backtrack": backtrack,
        }
        self._method = build_method(
            MethodOptions(method, self.granularity, hvp, neumann_steps, update_interval, extra)
        )
        self._closures.auto_differences = self._method.auto_differences
        self.neumann_steps = self._method.neumann_steps
        self.hvp_batch_fraction = check_hvp_batch_fraction(hvp_batch_fraction, self._method)
        self._closures.batch_fraction = self.hvp_batch_fraction
        self.update_interval = self._method.update_interval
        if hyper_optimizer is not None and not callable(hyper_optimizer):
            raise TypeError(
                "hyper_optimizer must be a callable taking a list of tensors and returning a "
                f"torch.optim.Optimizer, got {hyper_optimizer!r}"
            )
        self.bounds = check_bounds(bounds, self.rule.parametrisation)
        self._guard = (
            DivergenceGuard(self.update_interval)
            if check_divergence_guard(divergence_guard, self._method)
            else None
        )
        self._best = BestWeights() if check_keep_best(keep_best, self._method) else None
        self._hyper = LearnedHyperparameters(self)
        self._validation_closure: Closure | None = None
        self._warned_no_closure = False
        self._hyper_step_hooks: OrderedDict[int, HyperStepHook] = OrderedDict()
        self.hyper_optimizer: Optimizer | None = None
        super().__init__(params, defaults)
        self._loss_hyper = self._build_loss_hyperparameters(
            loss_hyperparameters, loss_hyper_optimizer or hyper_optimizer, solver
        )
        factory = hyper_optimizer
        if not self.learn:  # loss hyperparameters alone: nothing of the optimizer's to step
            factory = _no_values
        elif factory is None:
            factory = self._method.default_hyper_optimizer
        if factory is None:
            per_weight = any(self.granularity_of(name) == "element" for name in self.learn)
            factory = (
                _default_element_hyper_optimizer if per_weight else self._default_hyper_optimizer
            )
        built = factory(
            [
                x
                for i, lv in enumerate(self._hyper.groups)
                for x in self._method.stepped_values(i, lv)
            ]
        )
        if not isinstance(built, Optimizer):
            raise TypeError(
                f"hyper_optimizer must return a torch.optim.Optimizer, got {type(built).__name__}"
            )
        self.hyper_optimizer = built
        self._method.check_optimizer(self)
        self._hyper.last = [
            self._method.zero_hypergradients(i, lv) for i, lv in enumerate(self._hyper.groups)
        ]

    def _build_loss_hyperparameters(
        self,
        values: Iterable[Tensor] | None,
        factory: HyperOptimizerFactory | None,
        solver: str,
    ) -> LossHyperparameters | None:
        """Check ``loss_hyperparameters`` and ``solver`` against the method and ``learn``; the
        tensors with their hyper-optimizer, or ``None`` without any."""
        solver = check_choice("solver", solver, SOLVERS)
        tensors = check_loss_hyperparameters(values, self._trainable_all())
        method = self._method
        if not tensors:
            if not self.learn:
                raise ValueError(
                    "learn=() learns none of the optimizer's hyperparameters: it needs "
                    "loss_hyperparameters=[...] to have something to learn"
                )
            if solver != "neumann":
                raise ValueError(
                    f"solver={solver!r} solves for loss hyperparameters only: pass "
                    "loss_hyperparameters=[...], or leave solver='neumann'"
                )
            return None
        if not method.takes_loss_hyperparameters:
            takers = methods_where(lambda cls: cls.takes_loss_hyperparameters)
            raise ValueError(
                f"method={self.method!r} does not learn loss_hyperparameters"
                + (" (it has no validation loss)" if not method.uses_validation else "")
                + f": use {takers}"
            )
        if solver == "cg":
            if self.method != "ift":
                raise ValueError(
                    f"solver='cg' is the implicit function theorem of method='ift', not "
                    f"method={self.method!r}"
                )
            if self.learn:
                raise ValueError(
                    f"solver='cg' assumes a stationary point of the training loss, which the "
                    f"optimizer's own hyperparameters do not move: pass learn=() (got learn="
                    f"{self.learn!r}), or use solver='neumann' to learn both"
                )
            if method.neumann_steps < 1:
                raise ValueError("solver='cg' needs neumann_steps >= 1 (its iterations)")
            for i, group in enumerate(self.param_groups):
                if group.get("decoupled_weight_decay") and group.get("weight_decay", 0) != 0:
                    raise ValueError(
                        f"solver='cg' assumes a stationary point of the training loss, which "
                        f"a decoupled weight_decay moves (param group {i}: weight_decay="
                        f"{group['weight_decay']!r}): set weight_decay=0 and decay in the "
                        "closure's loss, or use solver='neumann'"
                    )
        if factory is not None and not callable(factory):
            raise TypeError(
                "loss_hyper_optimizer must be a callable taking a list of tensors and returning "
                f"a torch.optim.Optimizer, got {factory!r}"
            )
        method.loss_hyperparameters = True  # type: ignore[attr-defined]  # a one-pass method
        method.solver = solver  # type: ignore[attr-defined]
        self._closures.loss_hyper = tensors
        return LossHyperparameters(tensors, factory or _default_loss_hyper_optimizer)

    def _check_saved_loss_hyper(self, saved: dict[str, Any] | None) -> None:
        """A saved state of loss hyperparameters fits this optimizer's (or there is none)."""
        if saved is None:
            return
        if self._loss_hyper is None:
            raise ValueError(
                "load_state_dict: the state dict holds the hyper-optimizer state of "
                f"{len(saved['hypergradients'])} loss hyperparameters, and this optimizer has "
                "none: build it with the same loss_hyperparameters=[...]"
            )
        self._loss_hyper.check_state_dict(saved)

    def _trainable_all(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def loss_hypergradients(self) -> list[Tensor]:
        """``dL_V/dμ`` of the last hyper-step for each of ``loss_hyperparameters``, shaped
        like them (zeros before the first; ``[]`` without loss hyperparameters)."""
        return [] if self._loss_hyper is None else self._loss_hyper.hypergradients()

    @property
    def loss_hyperparameters(self) -> list[Tensor]:
        """The tensors given as ``loss_hyperparameters`` (the user's own, stepped in place)."""
        return [] if self._loss_hyper is None else list(self._loss_hyper.tensors)

    @property
    def loss_hyper_optimizer(self) -> Optimizer | None:
        """The hyper-optimizer of the loss hyperparameters (``None`` without any)."""
        return None if self._loss_hyper is None else self._loss_hyper.optimizer

    def _default_hyper_optimizer(self, params: list[Tensor]) -> Optimizer:
        # the suite chose default_hyper_lr for the methods that step one value per name on the
        # validation loss (greedy, ift); "hd" and forward mode keep the step they were measured with
        one_pass = self._method.uses_validation and not self._method.learns_schedules
        return torch.optim.Adam(params, lr=self.default_hyper_lr if one_pass else DEFAULT_HYPER_LR)

    @property
    def hvp(self) -> str:
        """How Hessian-vector products are taken (``"auto"`` resolves closure by closure)."""
        return self._closures.hvp

    @hvp.setter
    def hvp(self, value: str) -> None:
        self._closures.hvp = check_choice("hvp", value, _hvp_providers())

    # -- param groups ----------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        index = len(self.param_groups) - 1
        try:
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError(f"{type(self).__name__} does not support complex parameters")
                check_not_sharded(p, type(self).__name__)
        except Exception:  # refused whole: the group does not stay
            self.param_groups.pop()
            raise
        for p in group["params"]:
            if p.requires_grad:
                self._closures.watch(p)
        self._check_group(group, index)
        learned = {}
        for name in self.learn:
            value = self._group_value(group, name)
            fraction = self.rule.parametrisation[name].fraction
            check_learnable_value(name, value, self.bounds[name], fraction, index)
            learned[name] = LearnedValue.create(
                name, value, group["params"], self.granularity_of(name), self.bounds[name], fraction
            )
        self._hyper.groups.append(learned)
        try:
            if self.hyper_optimizer is not None:  # built: the groups after the first ones
                self._method.check_group(self, group, index)
            self._method.add_group(self._hyper, index)
        except Exception:  # refused whole: neither the group nor its values stay
            self._hyper.groups.pop()
            self.param_groups.pop()
            raise
        if self._guard is not None:  # its point to come back to covers the new group too (the
            self._guard.good.extend(self._guarded())  # others keep their healthy copy)
        if self._best is not None:  # a loss seen without the new group is no longer comparable
            self._best = BestWeights()
        if self.hyper_optimizer is not None:
            self.hyper_optimizer.add_param_group(
                {"params": self._method.stepped_values(index, learned)}
            )
            self._hyper.last.append(self._method.zero_hypergradients(index, learned))

    def _check_group(self, group: dict[str, Any], index: int | None) -> None:
        """Check a group's own values (torch's checks); subclasses extend."""

    def _group_value(self, group: dict[str, Any], name: str) -> float:
        return float(group[name])

    def _set_group_value(self, group: dict[str, Any], name: str, value: float) -> None:
        group[name] = value

    # -- the public hyperparameter API -----------------------------------------------------

    def register_validation_closure(self, val_closure: Closure) -> None:
        """Use ``val_closure`` whenever :meth:`step` is called without one.

        Args:
            val_closure: returns the validation loss as a scalar tensor computed from the
                model's current parameters, with gradients enabled; it must not call
                ``backward()``.
        """
        check_callable("val_closure", val_closure)
        self._validation_closure = val_closure

    def register_hyper_step_hook(self, hook: HyperStepHook) -> RemovableHandle:
        """Call ``hook(optimizer, hyperparameters, hypergradients)`` after every hyper-step
        that moved the learned values (a skipped one, counted in :attr:`hyper_state`, does
        not call it), e.g. to log them.

        ``hyperparameters`` and ``hypergradients`` are what :meth:`hyperparameters` and
        :meth:`hypergradients` return at that moment (copies: the hook may keep them);
        ``optimizer.hyper_state["step"]`` is the step count.  For ``method="forward"`` the
        hook runs after each stepped schedule.

        Returns:
            a handle whose ``remove()`` unregisters the hook, as torch's hooks do.
        """
        check_callable("hook", hook)
        handle = RemovableHandle(self._hyper_step_hooks)
        self._hyper_step_hooks[handle.id] = hook
        return handle

    def _call_hyper_step_hooks(self) -> None:
        if not self._hyper_step_hooks:
            return
        values, grads = self.hyperparameters(), self.hypergradients()
        for hook in list(self._hyper_step_hooks.values()):
            hook(self, values, grads)

    def granularity_of(self, name: str) -> Granularity:
        """The granularity of the learned hyperparameter ``name``."""
        if isinstance(self.granularity, str):
            return self.granularity
        return self.granularity[name]

    def hyperparameters(self) -> list[dict[str, Tensor | list[Tensor]]]:
        """The learned values in natural units, one dict per param group.

        A 0-dim tensor per name for ``granularity="scalar"``; for ``"tensor"`` and
        ``"element"`` a list with one tensor per parameter of the group (0-dim, or the
        parameter's shape).
        """
        return self._hyper.natural()

    def hypergradients(self) -> list[dict[str, Tensor | list[Tensor]]]:
        """``dL/dλ`` in natural units from the last hyper-step, shaped like
        :meth:`hyperparameters` (zeros before the first hyper-step).

        ``L`` is the validation loss (``"ift"``, ``"greedy"``, ``"forward"``) or the training
        loss at the next step (``"hd"``).  For ``"forward"`` each value is a tensor of shape
        ``(windows,)``: the derivative with respect to each window's value, through every step
        of the episode (online: of the run) so far, at the last hyper-step.
        """
        return self._hyper.hypergradients()

    def schedules(self) -> list[dict[str, Tensor | list[Tensor]]]:
        """``method="forward"``: every window's value in natural units, one dict per group.

        A tensor of shape ``(windows,)`` per name for ``granularity="scalar"``; for
        ``"tensor"`` a list with one such tensor per parameter of the group.  Online, windows
        passed show the value each ended with and the current one its latest value; a window
        not reached yet shows the initial value, but will start from the value the window
        before it ends with.
        """
        schedule = self._method.schedule
        if schedule is None:
            raise RuntimeError(f"schedules() needs {_schedule_methods()}, not {self.method!r}")
        return schedule.natural(self._hyper.groups)

    def compute_hypergradients(
        self, val_closure: Closure | None = None
    ) -> list[dict[str, Tensor | list[Tensor]]]:
        """``method="forward"``: the hypergradients now, without a hyper-step.

        ``dL_V/dλ_k`` at the current weights for every window ``k``, through every step of the
        episode (online: of the run) so far, shaped like :meth:`hypergradients` (which
        returns them from now on).  Windows not reached yet have zeros.

        Args:
            val_closure: the validation loss; defaults to the registered one.
        """
        if not self._method.learns_schedules:
            raise RuntimeError(
                f"compute_hypergradients() needs {_schedule_methods()}, not {self.method!r}"
            )
        val_closure = val_closure if val_closure is not None else self._validation_closure
        if val_closure is None or not callable(val_closure):
            raise ValueError(
                "compute_hypergradients() needs a validation closure: pass one or register it"
            )
        self._method.compute_hypergradients(self._hyper, val_closure)
        return self.hypergradients()

    def reverse(self, val_closure: Closure | None, closure_at: Callable[[int], Closure]) -> None:
        """``method="reversible"``: run the episode backwards and step the schedules.

        At the end of an episode (``horizon`` calls of :meth:`step`), training runs backwards
        from step ``T`` to step 0 in exact fixed-point arithmetic, one step at a time, and
        accumulates the exact reverse-mode hypergradient of every window's value and of the
        initial weights (Maclaurin et al. 2015).  Afterwards :meth:`hypergradients` holds one
        tensor of shape ``(windows,)`` per learned value, :meth:`initial_weight_hypergradients`
        ``dL_V/dw_0``, the weights are back at the episode's first weights exactly (on the
        grid of ``2^-52``), and the hyper-optimizer has stepped the schedules; the next
        :meth:`step` starts the next episode.

        Args:
            val_closure: the validation loss at the episode's last weights (a scalar tensor,
                no ``backward()``); defaults to the registered one.
            closure_at: ``closure_at(t)`` returns step ``t``'s training closure, on the same
                batch.  Its loss at the recomputed weights must equal the one seen going
                forward, bit for bit: a different one raises ``ValueError`` (and ``reverse``
                can be called again with the right one to resume).
        """
        if not self._method.runs_steps:
            raise RuntimeError(f"reverse() is for method='reversible', not {self.method!r}")
        val_closure = val_closure if val_closure is not None else self._validation_closure
        if val_closure is None:
            raise ValueError("reverse() needs a validation closure: pass one or register it")
        check_callable("val_closure", val_closure)
        check_callable("closure_at", closure_at)
        hyper_steps = self._hyper.counters["hyper_steps"]
        self._method.reverse(self, val_closure, closure_at)  # type: ignore[attr-defined]
        if self._hyper.counters["hyper_steps"] != hyper_steps:
            self._call_hyper_step_hooks()

    def initial_weight_hypergradients(self) -> list[Tensor]:
        """``method="reversible"``: ``dL_V/dw_0`` from the last :meth:`reverse`, one float64
        tensor per trainable parameter (in the order of the param groups), shaped like it."""
        if not self._method.runs_steps:
            raise RuntimeError(
                f"initial_weight_hypergradients() is for method='reversible', not {self.method!r}"
            )
        return self._method.initial_weight_hypergradients()  # type: ignore[attr-defined, no-any-return]

    def tangent_memory(self) -> int:
        """``method="forward"``: bytes held in tangents, ``M·|z|`` elements once every state
        buffer exists (``M`` = windows × learned values, ``|z|`` = weights and buffers);
        0 for the other methods."""
        return self._method.memory()

    @property
    def hyper_state(self) -> dict[str, int]:
        """Counters: ``step``, ``hyper_steps`` taken and ``skipped_hyper_steps`` (non-finite)."""
        return dict(self._hyper.counters)

    # -- the step --------------------------------------------------------------------------

    def step(
        self,
        closure: Closure | None = None,
        *,
        val_closure: Closure | None = None,
        loss_fn: LossFn | None = None,
    ) -> Any:
        """One update of the weights and, when one is due, of the learned values.

        Args:
            closure: re-evaluates the training loss on the current batch.  Either torch's
                convention (zero the gradients, compute the loss, call ``backward()``, return
                the loss) or one that only returns the loss, in which case the optimizer
                differentiates it (and, with ``hvp="autograd"`` or ``"auto"``, can take exact
                Hessian-vector products).  Without a closure the gradients must already be in
                ``.grad`` and only ``neumann_steps=0`` is possible.
            val_closure: returns the validation loss (a scalar tensor, gradients enabled, no
                ``backward()``); defaults to the one registered with
                :meth:`register_validation_closure`.  Needed by ``"ift"``, ``"greedy"`` and
                ``"forward"``.
            loss_fn: ``method="forward"`` only, instead of ``closure``: the training loss on
                this step's batch as a pure function of the list of trainable parameters (in
                the order of the param groups), e.g. through ``torch.func.functional_call``.
                The optimizer then takes the gradient itself and exact Hessian-vector products
                for every tangent column at once (``vmap`` of ``jvp`` of the gradient).
        Returns:
            What the closure (or ``loss_fn``) returned, as torch's optimizers do.
        """
        if self._method.runs_steps:  # reversible learning: its own arithmetic
            if closure is None or loss_fn is not None:
                raise ValueError(
                    f"method={self.method!r} needs a training closure on every step: "
                    f"{self._method.requires_closure}"
                )
            check_callable("closure", closure)
            if self._process_group is None:  # the default: the group initialised by now, if any
                self._closures.replicas = resolve_process_group(None)
                self._process_group = self._closures.replicas is not None
            return self._method.run_step(self, closure)
        val_closure = self._check_step(closure, val_closure, loss_fn)
        t = self._hyper.counters["step"]
        hyper_steps = self._hyper.counters["hyper_steps"]
        plan = self._method.plan(t)
        if plan.snapshot and self._loss_hyper is not None and closure is None:
            raise ValueError(
                "loss_hyperparameters need a training closure on every hyper-step: their "
                "hypergradient differentiates the training loss again; pass step(closure)"
            )
        if plan.products and closure is None and loss_fn is None:
            self._warn_no_closure()
            plan = dataclasses.replace(plan, products=0)
        self._method.begin_step(self._hyper, self._hyper.take_external_writes())
        overridden = plan.snapshot and self._overridden()
        if overridden:  # its result would be thrown away
            plan = StepPlan()
        if self._process_group is None:  # the default: the group initialised by now, if any
            self._closures.replicas = resolve_process_group(None)
            self._process_group = self._closures.replicas is not None
        trainable = self._trainable()
        if self._closures.replicas is not None:
            self._closures.replicas.check_weights(trainable, t)
        scaler = self.grad_scaler
        if scaler is not None and not scaler.is_enabled():
            scaler = None
        self._closures.use_scaler(scaler)
        loss = self._closures.run(closure, loss_fn, trainable, plan.products > 0)
        if scaler is not None and self._unscale(scaler):
            self._closures.release()  # an inf or NaN gradient: the step is skipped, as torch's
            self._hyper.counters["scaler_skipped_steps"] += 1  # scaler.step(opt) would
            return loss
        if overridden:
            self._hyper.counters["overridden_hyper_steps"] += 1
        diverged = self._watch(loss, t)
        if diverged:
            self._back_off(t)
            return loss
        self._hyper.validation_loss = None
        ctx = StepContext(self._hyper, t, None, self._gradients_of, val_closure)
        if self._loss_hyper is not None:
            ctx.loss_hyperparameters = self._loss_hyper.tensors
        views = [self._gather(i) for i in range(len(self.param_groups))]
        # Finite differences move the live weights and call the closure: they need a copy of
        # the point.  The closure's backward writes new .grad tensors (they are cleared
        # before each evaluation), so the step's own gradients are kept by reference, but
        # under DDP, whose buckets the next backward may write into in place.
        fd = plan.products > 0 and self._closures.finite_differences
        distributed = self._closures.replicas is not None
        copies = {
            "params": plan.copy or fd,
            "state": plan.copy,
            "grads": fd and distributed,
            "after": plan.after and not plan.products,
        }
        try:
            if plan.snapshot:
                ctx.groups = [self._snapshot(i, *view, copies) for i, view in enumerate(views)]
                if plan.products:
                    ctx.hvp = self._closures.products(closure, ctx.groups)
            if self._hyper.apply(self._method.before_update(ctx)) and ctx.groups:
                for i, g in enumerate(ctx.groups):  # the update uses the new values
                    g.hp = self._hyper_values(i, g.indices)
            with torch.no_grad():
                for i, (indices, params, grads, state) in enumerate(views):
                    if ctx.groups is None:
                        self._update(i, params, grads, state, self._hyper_values(i, indices))
                    else:  # the snapshot's gradients and values (a method may have set them)
                        g = ctx.groups[i]
                        self._update(i, params, g.grads, state, g.hp)
            self._hyper.counters["step"] = t + 1
            self._closures.updated = True
            self._hyper.apply(self._method.after_update(ctx), ctx.loss_hypergradients)
            self._after_step(t + 1)
        finally:
            self._closures.release()
            if ctx.groups is not None and plan.products:  # what the products overwrote
                for g in ctx.groups:
                    for p, grad in zip(g.live, g.grads, strict=True):
                        p.grad = grad
        if self._hyper.counters["hyper_steps"] != hyper_steps:
            self._call_hyper_step_hooks()
        return loss

    def _overridden(self) -> bool:
        """Whether something (an absolute scheduler) overwrites every learned value on every
        step, undoing each hyper-step (:mod:`hyperopt_optim._writes`): warn once per value; skip
        the hyper-steps while it does, but for probes (not for a method that learns schedules,
        whose own state follows every step)."""
        writes = self._hyper.writes
        overridden = writes.newly_overridden()
        if overridden:
            names = ", ".join(f"{name!r} of param group {i}" for i, name in overridden)
            warnings.warn(
                f"{type(self).__name__}: something (a scheduler such as OneCycleLR, CyclicLR or "
                f"LambdaLR, or cycle_momentum) overwrites the learned {names} on every step, "
                "undoing each hyper-step; while every learned value is overwritten so, "
                "hyper-steps are skipped (hyper_state['overridden_hyper_steps'] counts them). "
                "A chainable scheduler (StepLR, ExponentialLR, CosineAnnealingLR, "
                "ReduceLROnPlateau) scales the learned value instead; or stop learning it",
                RuntimeWarning,
                stacklevel=4,
            )
        return not self._method.learns_schedules and writes.skip(self._hyper.keys())

    def _unscale(self, scaler: Any) -> bool:
        """Unscale the gradients in ``.grad``; whether the scaler found an inf or NaN."""
        try:
            scaler.unscale_(self)
        except RuntimeError as err:
            if "already been called" not in str(err):
                raise
            raise RuntimeError(
                f"{type(self).__name__}(grad_scaler=...) unscales the gradients itself: call "
                "opt.step(closure) and then scaler.update(), not scaler.step(opt), and do not "
                "call scaler.unscale_(opt) in the closure"
            ) from err
        return found_inf(scaler, self)

    def _guarded(self) -> list[Tensor]:
        """What the divergence guard keeps and restores: the trainable parameters, and the
        loss hyperparameters (which a divergence may have come from)."""
        loss_hyper = getattr(self, "_loss_hyper", None)  # None while torch's __init__ runs
        extra = [] if loss_hyper is None else list(loss_hyper.tensors)
        return self._trainable() + extra

    def _watch(self, loss: Any, t: int) -> bool | None:
        """Give the divergence guard this step's training loss; at the end of an interval,
        whether the run diverged (``None`` between checks).  Between checks this only adds the
        loss to a sum on its device: the weights and the host are touched once an interval."""
        guard = self._guard
        if guard is None:
            return None
        if guard.good.tensors is None:  # the first point to come back to (again after
            guard.good.keep(self._guarded())  # add_param_group): the weights now
        replicas = self._closures.replicas
        if replicas is not None and isinstance(loss, float | int) and not isinstance(loss, bool):
            device = next(iter(self._trainable()), torch.empty(0)).device
            loss = torch.tensor(float(loss), dtype=torch.float64, device=device)
        if replicas is not None and isinstance(loss, Tensor) and loss.numel() == 1:
            loss = replicas.mean_loss(loss)  # one verdict for every rank
        if not guard.add(loss, t == 0):
            return None
        maximize = any(group.get("maximize", False) for group in self.param_groups)
        diverged = guard.check(maximize)
        if not diverged and guard.current_ok:
            guard.good.keep(self._guarded())  # w_t (and μ), whose loss the closure just gave
        return diverged

    def _back_off(self, t: int) -> None:
        """The guard saw a divergence: restore, restart the state, divide a learned lr."""
        assert self._guard is not None and self.hyper_optimizer is not None
        self._closures.release()
        guarded = self._guarded()
        if not self._guard.good.holds(guarded):  # requires_grad switched since the last check:
            self._guard.good.keep(guarded)  # nothing to go back to but where it is
        self._guard.good.restore(guarded)  # the weights, and loss hyperparameters with them
        for p in self._trainable():
            self.state.pop(p, None)
        if self._loss_hyper is not None:
            self._loss_hyper.optimizer.state.clear()
        backed_off = False
        for index, learned in enumerate(self._hyper.groups):
            lv = learned.get("lr")
            if lv is None:
                continue
            with torch.no_grad():
                for phi in lv.phi:
                    phi.add_(math.log(self._guard.backoff))
            lv.clip_()
            self._hyper.show(index, "lr")
            backed_off = True
        if backed_off:
            self.hyper_optimizer.state.clear()
        self._method.restart(self._hyper.groups)
        self._hyper.counters["divergences"] += 1
        self._hyper.counters["step"] = t + 1
        warn_divergence(type(self).__name__, t + 1, backed_off, self._loss_hyper is not None)

    def _after_step(self, step: int) -> None:
        """Keep the best weights seen."""
        seen = self._hyper.validation_loss
        if self._best is not None and seen is not None:
            self._best.offer(seen, step, self._trainable())

    def restore_best(self) -> float:
        """``keep_best=True``: put back the weights with the lowest validation loss seen.

        The trainable parameters (in place) take the values they had when a hyper-step
        evaluated the lowest validation loss so far; the optimizer's state and the learned
        values are left as they are, so call it when training ends (or to evaluate).  Module
        buffers that are not parameters (batch norm's running statistics) are not the
        optimizer's and are not restored.

        Returns:
            That validation loss.
        """
        if self._best is None:
            raise RuntimeError("restore_best() needs keep_best=True when the optimizer is built")
        if not self._best.kept:
            raise RuntimeError(
                "restore_best(): no weights kept yet (no hyper-step has evaluated a finite "
                "validation loss)"
            )
        self._best.restore(self._trainable())
        return self._best.loss

    @property
    def best_validation_loss(self) -> float | None:
        """``keep_best=True``: the lowest validation loss seen at a hyper-step (``None``
        before the first, or without ``keep_best``)."""
        if self._best is None or not self._best.kept:
            return None
        return self._best.loss

    @property
    def best_step(self) -> int | None:
        """``keep_best=True``: the step count at which the kept weights were reached."""
        return None if self._best is None else self._best.step

    def _check_step(
        self, closure: Closure | None, val_closure: Closure | None, loss_fn: LossFn | None
    ) -> Closure | None:
        val_closure = val_closure if val_closure is not None else self._validation_closure
        if val_closure is not None:
            check_callable("val_closure", val_closure)
        if closure is not None:
            check_callable("closure", closure)
        if self._method.uses_validation and val_closure is None:
            raise ValueError(
                f"method={self.method!r} needs a validation closure: call "
                "step(closure, val_closure=fn) or register_validation_closure(fn)"
            )
        if loss_fn is not None:
            check_callable("loss_fn", loss_fn)
            if not self._method.accepts_loss_fn:
                takers = methods_where(lambda cls: cls.accepts_loss_fn)
                raise ValueError(
                    f"loss_fn is taken by {takers} only, not method={self.method!r}: pass a closure"
                )
            if closure is not None:
                raise ValueError("pass either closure or loss_fn to step(), not both")
        why = self._method.requires_closure
        if why is not None and closure is None and loss_fn is None:
            raise ValueError(
                f"method={self.method!r} needs a training closure or loss_fn on every step: {why}"
            )
        return val_closure

    def _warn_no_closure(self) -> None:
        if self._warned_no_closure:
            return
        warnings.warn(
            f"{type(self).__name__}.step() was called without a training closure, so no "
            "Hessian-vector product can be taken: hyper-steps use neumann_steps=0 "
            "(greedy) until a closure is passed (with a GradScaler: pass it as grad_scaler= "
            "and call opt.step(closure), then scaler.update(), instead of scaler.step(opt))",
            RuntimeWarning,
            stacklevel=4,
        )
        self._warned_no_closure = True

    def _update(
        self,
        index: int,
        params: list[Tensor],
        grads: list[Tensor],
        state: RuleState,
        hp: dict[str, Hyper],
    ) -> None:
        group = self.param_groups[index]
        flags = {k: group[k] for k in self.flag_names}
        if group.get("foreach") is False:
            for j in range(len(params)):
                one_hp = {k: v if isinstance(v, float) else [v[j]] for k, v in hp.items()}
                one_state = {k: [xs[j]] for k, xs in state.items()}
                self.rule.step([params[j]], [grads[j]], one_state, one_hp, flags)
                for k, xs in one_state.items():
                    state[k][j] = xs[0]
        else:
            self.rule.step(params, grads, state, hp, flags)
        for name, xs in state.items():
            for p, x in zip(params, xs, strict=True):
                if x is not None:
                    self.state[p][name] = x

    def _hyper_values(self, index: int, indices: list[int]) -> dict[str, Hyper]:
        return self._hyper.values(index, indices, self.rule.learnable)

    def _gather(self, index: int) -> tuple[list[int], list[Tensor], list[Tensor], RuleState]:
        group = self.param_groups[index]
        flags = {k: group[k] for k in self.flag_names}
        indices, params, grads = [], [], []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            indices.append(i)
            params.append(p)
            grads.append(p.grad)
        state: RuleState = {}
        for p in params:
            if not self.state[p]:
                for name, xs in self.rule.init_state([p], flags).items():
                    if xs[0] is not None:
                        self.state[p][name] = xs[0]
        for name in self.rule.init_state([], flags):
            state[name] = [self.state[p].get(name) for p in params]
        return indices, params, grads, state

    def _snapshot(
        self,
        index: int,
        indices: list[int],
        params: list[Tensor],
        grads: list[Tensor],
        state: RuleState,
        copies: dict[str, bool],
    ) -> GroupSnapshot:
        """Group ``index`` at ``z_t``: copies of the parts ``copies`` names, else the live
        tensors."""
        group = self.param_groups[index]
        names = tuple(self._hyper.groups[index])
        flags = {k: group[k] for k in self.flag_names}
        hp = self._hyper_values(index, indices)
        can_after = getattr(self.rule, "can_vjp_after", None)
        if copies["after"] and can_after is not None and can_after(names, hp, flags):
            copies = {**copies, "params": False, "state": False}  # read after the update
        else:
            copies = {**copies, "after": False}
        with torch.no_grad():
            return GroupSnapshot(
                rule=self.rule,
                live=list(params),
                indices=list(indices),
                params=[p.detach().clone() if copies["params"] else p.detach() for p in params],
                grads=[g.detach().clone() if copies["grads"] else g.detach() for g in grads],
                state=state  # the live buffers, read after the update
                if copies["after"]
                else {
                    k: [x.clone() if copies["state"] and x is not None else x for x in xs]
                    for k, xs in state.items()
                },
                hp=hp,
                flags=flags,
                names=names,
                live_state=state,
                after=copies["after"],
                reduced=frozenset(
                    name
                    for name, lv in self._hyper.groups[index].items()
                    if lv.granularity != "element"
                ),
            )

    def _trainable(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _gradients_of(self, index: int, indices: list[int]) -> list[Tensor]:
        params = self.param_groups[index]["params"]
        return [
            torch.zeros_like(params[i]) if params[i].grad is None else params[i].grad
            for i in indices
        ]

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``"hyper"``: the learned values, the hyper-optimizer's
        state, the counters and the method's own state (pending hypergradient-descent
        partials; forward mode's tangents and schedules)."""
        state = super().state_dict()
        assert self.hyper_optimizer is not None
        state["hyper"] = {
            **self._hyper.state_dict(),
            "hyper_optimizer": self.hyper_optimizer.state_dict(),
            "method": self._method.state_dict(),
            "resolved_hvp": self._closures.resolved,
            "no_double_backward": self._closures.no_double_backward,
            "guard": None if self._guard is None else self._guard.state_dict(),
            "best": None if self._best is None else self._best.state_dict(),
            "loss_hyper": None if self._loss_hyper is None else self._loss_hyper.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class (of this version or an earlier one), or torch's
        own optimizer's.

        From torch's (``torch.optim.SGD(...).state_dict()`` for :class:`HyperSGD`), the
        buffers and hyperparameters load and the learned values restart from the loaded
        hyperparameters, as if a scheduler had written them.

        A state dict that lacks an entry loading reads (torch's, or one of ``"hyper"``'s) is
        refused before anything loads.
        """
        check_state_dict_entries(
            state_dict, self._hyper.groups, self.hyper_optimizer, self._trainable()
        )
        state_dict = dict(state_dict)
        hyper = state_dict.pop("hyper", None)
        if hyper is not None:  # check before anything loads
            hyper = upgrade_state_dict(hyper)
            check_saved_shapes(self._hyper.groups, hyper["phi"])
            check_saved_values(self._hyper.groups, hyper["phi"], state_dict.get("param_groups", []))
            self._method.check_state_dict(hyper["method"])
            self._check_saved_loss_hyper(hyper.get("loss_hyper"))
        else:
            check_saved_group_values(self._hyper.groups, state_dict.get("param_groups", []))
        super().load_state_dict(state_dict)
        if hyper is None:
            self._hyper.take_external_writes()
            self._hyper.writes.reset()
            self._method.restart(self._hyper.groups)
            return
        self._hyper.load_state_dict(hyper)
        assert self.hyper_optimizer is not None
        self.hyper_optimizer.load_state_dict(hyper["hyper_optimizer"])
        if self._loss_hyper is not None and hyper.get("loss_hyper") is not None:
            self._loss_hyper.load_state_dict(hyper["loss_hyper"])
        self._method.load_state_dict(hyper["method"], [g["params"] for g in self.param_groups])
        if self.hvp == "auto":
            self._closures.resolved = hyper.get("resolved_hvp")
        self._closures.no_double_backward = bool(hyper.get("no_double_backward", False))
        params = self._trainable()
        if self._guard is not None and hyper.get("guard") is not None:
            guarded = self._guarded()
            self._guard.load_state_dict(
                _covering(hyper["guard"], "good", guarded, "guard"), guarded
            )
        if self._best is not None and hyper.get("best") is not None:
            best = _covering(hyper["best"], "params", params, "keep_best")
            if best["params"] is None:
                self._best = BestWeights()  # nothing to compare a new loss with
            else:
                self._best.load_state_dict(best, params)
