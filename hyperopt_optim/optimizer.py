"""The base class of the hyperparameter-learning optimizers.

:class:`HyperOptimizer` is a ``torch.optim.Optimizer`` that owns an update rule (the
mathematics, :mod:`hyperopt_optim.rules`), a hypergradient method
(:mod:`hyperopt_optim.hypergradients`) and the learned values of every param group
(:mod:`hyperopt_optim._learned`), and orchestrates one step:

1. evaluate the training closure (keeping a graph only when exact Hessian-vector products
   will be needed on this step);
2. let the method apply a pending hyper-update (hypergradient descent);
3. keep the pre-step point ``z_t`` when the method asks for it;
4. apply the fast in-place update of every group;
5. let the method compute hypergradients at the new point, then step the learned values.

A NaN or infinite validation loss or hypergradient skips that hyper-update: the learned values
and the hyper-optimizer's state are left as they are (the step's ordinary weight update,
which used only the training gradient, stands), a ``RuntimeWarning`` says why and
``hyper_state["skipped_hyper_steps"]`` counts it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext, suppress
from typing import Any, ClassVar, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._learned import GRANULARITIES, Granularity, LearnedValue
from .hypergradients._base import (
    ElementwiseHypergradients,
    GroupSnapshot,
    HypergradientMethod,
    StepContext,
)
from .hypergradients.descent import HypergradientDescent
from .hypergradients.hvp import AutogradHVP, FiniteDifferenceHVP, clone_parameter_saves
from .hypergradients.onepass import OnePass
from .rules._base import Hyper, Parametrisation, RuleState, UpdateRule
from .shared_adam import SharedAdam

__all__ = ["HVP_PROVIDERS", "METHODS", "HyperOptimizer"]

METHODS = ("ift", "greedy", "hd")
HVP_PROVIDERS = ("auto", "autograd", "finite_difference", "forward_difference")
DEFAULT_NEUMANN_STEPS = 4
DEFAULT_UPDATE_INTERVAL = {"ift": 10, "greedy": 10, "hd": 1}
DEFAULT_HYPER_LR = 0.05

Closure = Callable[[], Any]
HyperOptimizerFactory = Callable[[list[Tensor]], Optimizer]


def _default_hyper_optimizer(params: list[Tensor]) -> Optimizer:
    return torch.optim.Adam(params, lr=DEFAULT_HYPER_LR)


def _default_element_hyper_optimizer(params: list[Tensor]) -> Optimizer:
    return SharedAdam(params, lr=DEFAULT_HYPER_LR)  # and its default deviation_lr


def _grad(
    output: Tensor, inputs: list[Tensor], *, create_graph: bool = False
) -> list[Tensor | None]:
    """``torch.autograd.grad`` with ``None`` for inputs the output does not depend on."""
    grads = torch.autograd.grad(output, inputs, create_graph=create_graph, allow_unused=True)
    return cast(list[Tensor | None], list(grads))


def _zeros_for_none(grads: list[Tensor | None], like: list[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) if g is None else g for p, g in zip(like, grads, strict=True)]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class HyperOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` whose hyperparameters learn by hypergradient descent.

    Subclasses set :attr:`rule` (the update map) and :attr:`flag_names` (the group keys that
    are structural options of the map) and build ``defaults`` with torch's own arguments.
    The keyword-only arguments are documented on :class:`~hyperopt_optim.HyperSGD`.
    """

    rule: ClassVar[UpdateRule]
    flag_names: ClassVar[tuple[str, ...]]

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
    ) -> None:
        self.learn = _check_learn(learn, self.rule.learnable)
        self.granularity = _check_granularity(granularity, self.learn)
        self.method = _check_choice("method", method, METHODS)
        self.hvp = _check_choice("hvp", hvp, HVP_PROVIDERS)
        self.neumann_steps = _check_neumann_steps(neumann_steps, method)
        self.update_interval = _check_positive_int(
            "update_interval", update_interval, DEFAULT_UPDATE_INTERVAL[method]
        )
        if hyper_optimizer is not None and not callable(hyper_optimizer):
            raise TypeError(
                "hyper_optimizer must be a callable taking a list of tensors and returning a "
                f"torch.optim.Optimizer, got {hyper_optimizer!r}"
            )
        self.bounds = _check_bounds(bounds, self.rule.parametrisation)
        self._hyper_method: HypergradientMethod = (
            HypergradientDescent(self.update_interval)
            if method == "hd"
            else OnePass(self.neumann_steps, self.update_interval)
        )
        self._learned: list[dict[str, LearnedValue]] = []
        self._backward_count = [0]
        self._hook_handles: list[Any] = []
        self._validation_closure: Closure | None = None
        self._resolved_hvp: str | None = None if hvp == "auto" else hvp
        self._warned_no_closure = False
        self.hyper_optimizer: Optimizer | None = None
        super().__init__(params, defaults)
        factory = hyper_optimizer
        if factory is None:
            per_weight = any(self.granularity_of(name) == "element" for name in self.learn)
            factory = _default_element_hyper_optimizer if per_weight else _default_hyper_optimizer
        built = factory([phi for group in self._learned for lv in group.values() for phi in lv.phi])
        if not isinstance(built, Optimizer):
            raise TypeError(
                f"hyper_optimizer must return a torch.optim.Optimizer, got {type(built).__name__}"
            )
        self.hyper_optimizer = built
        self._counters = {"step": 0, "hyper_steps": 0, "skipped_hyper_steps": 0}
        self._last_hypergradients: list[dict[str, list[Tensor]]] = [
            {name: [torch.zeros_like(phi) for phi in lv.phi] for name, lv in group.items()}
            for group in self._learned
        ]

    # -- param groups ----------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        index = len(self.param_groups) - 1
        for p in group["params"]:
            if p.is_complex():
                raise TypeError(f"{type(self).__name__} does not support complex parameters")
            if p.requires_grad:
                counter = self._backward_count
                self._hook_handles.append(
                    p.register_post_accumulate_grad_hook(
                        lambda _p, c=counter: c.__setitem__(0, c[0] + 1)
                    )
                )
        self._check_group(group, index)
        learned = {}
        for name in self.learn:
            value = self._group_value(group, name)
            fraction = self.rule.parametrisation[name].fraction
            _check_learnable_value(name, value, self.bounds[name], fraction, index)
            learned[name] = LearnedValue.create(
                name, value, group["params"], self.granularity_of(name), self.bounds[name], fraction
            )
        self._learned.append(learned)
        if self.hyper_optimizer is not None:
            self.hyper_optimizer.add_param_group(
                {"params": [phi for lv in learned.values() for phi in lv.phi]}
            )
            self._last_hypergradients.append(
                {name: [torch.zeros_like(phi) for phi in lv.phi] for name, lv in learned.items()}
            )

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
        if not callable(val_closure):
            raise TypeError(f"val_closure must be callable, got {val_closure!r}")
        self._validation_closure = val_closure

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
        out: list[dict[str, Tensor | list[Tensor]]] = []
        for group, learned in zip(self.param_groups, self._learned, strict=True):
            entry: dict[str, Tensor | list[Tensor]] = {}
            for name, lv in learned.items():
                values = lv.natural_values(self._group_value(group, name))
                entry[name] = values[0] if lv.granularity == "scalar" else values
            out.append(entry)
        return out

    def hypergradients(self) -> list[dict[str, Tensor | list[Tensor]]]:
        """``dL/dλ`` in natural units from the last hyper-step, shaped like
        :meth:`hyperparameters` (zeros before the first hyper-step).

        ``L`` is the validation loss (``"ift"``, ``"greedy"``) or the training loss at the
        next step (``"hd"``).
        """
        out: list[dict[str, Tensor | list[Tensor]]] = []
        for grads in self._last_hypergradients:
            entry: dict[str, Tensor | list[Tensor]] = {}
            for name, g in grads.items():
                scalar = self.granularity_of(name) == "scalar"
                entry[name] = g[0].clone() if scalar else [x.clone() for x in g]
            out.append(entry)
        return out

    @property
    def hyper_state(self) -> dict[str, int]:
        """Counters: ``step``, ``hyper_steps`` taken and ``skipped_hyper_steps`` (non-finite)."""
        return dict(self._counters)

    # -- the step --------------------------------------------------------------------------

    def step(self, closure: Closure | None = None, *, val_closure: Closure | None = None) -> Any:
        """One update of the weights and, every ``update_interval`` steps, of the learned values.

        Args:
            closure: re-evaluates the training loss on the current batch.  Either torch's
                convention (zero the gradients, compute the loss, call ``backward()``, return
                the loss) or one that only returns the loss, in which case the optimizer
                differentiates it (and, with ``hvp="autograd"`` or ``"auto"``, can take exact
                Hessian-vector products).  Without a closure the gradients must already be in
                ``.grad`` and only ``neumann_steps=0`` is possible.
            val_closure: returns the validation loss (a scalar tensor, gradients enabled, no
                ``backward()``); defaults to the one registered with
                :meth:`register_validation_closure`.  Needed by ``"ift"`` and ``"greedy"``.
        Returns:
            What the closure returned, as torch's optimizers do.
        """
        val_closure = val_closure if val_closure is not None else self._validation_closure
        if val_closure is not None and not callable(val_closure):
            raise TypeError(f"val_closure must be callable, got {val_closure!r}")
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be callable, got {closure!r}")
        if self._hyper_method.uses_validation and val_closure is None:
            raise ValueError(
                f"method={self.method!r} needs a validation closure: call "
                "step(closure, val_closure=fn) or register_validation_closure(fn)"
            )
        self._take_external_writes()
        t = self._counters["step"]
        keep = self._hyper_method.wants_snapshot(t)
        neumann = self._hyper_method.neumann_steps(t)
        if neumann > 0 and closure is None:
            if not self._warned_no_closure:
                warnings.warn(
                    f"{type(self).__name__}.step() was called without a training closure, so no "
                    "Hessian-vector product can be taken: hyper-steps use neumann_steps=0 "
                    "(greedy) until a closure is passed",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._warned_no_closure = True
            neumann = 0
        graph_wanted = neumann > 0 and self._resolved_hvp in (None, "autograd")
        loss, graph = None, None
        if closure is not None:
            loss, graph = self._evaluate(closure, graph_wanted)
        ctx = StepContext(t, None, self._gradients_of, self._no_validation, None)
        pending = self._hyper_method.before_update(ctx)
        if pending is not None:
            self._apply_hypergradients(pending)
        views = [self._gather(i) for i in range(len(self.param_groups))]
        # The closure calls of finite differences overwrite .grad, so the step's gradient is
        # copied then; otherwise nothing writes to it before the hyper-step is done.
        copy_grads = neumann > 0
        snapshot = (
            [self._snapshot(i, *view, copy_grads=copy_grads) for i, view in enumerate(views)]
            if keep
            else None
        )
        with torch.no_grad():
            for i, (indices, params, grads, state) in enumerate(views):
                self._update(i, indices, params, grads, state)
        self._counters["step"] = t + 1
        if snapshot is not None:
            assert val_closure is not None or not self._hyper_method.uses_validation
            ctx.groups = snapshot
            if neumann > 0 and closure is not None:
                ctx.hvp = self._make_hvp(snapshot, closure, graph)
            if val_closure is not None:
                ctx.validation_gradient = lambda live: self._validation_gradient(val_closure, live)
            try:
                result = self._hyper_method.after_update(ctx)
            finally:
                if copy_grads:  # put back what the finite differences' closure calls overwrote
                    for g in snapshot:
                        for p, grad in zip(g.live, g.grads, strict=True):
                            p.grad = grad
            del graph, ctx
            if result is not None:
                self._apply_hypergradients(result)
        return loss

    def _update(
        self,
        index: int,
        indices: list[int],
        params: list[Tensor],
        grads: list[Tensor],
        state: RuleState,
    ) -> None:
        group = self.param_groups[index]
        hp = self._hyper_values(index, indices)
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
        group = self.param_groups[index]
        learned = self._learned[index]
        hp: dict[str, Hyper] = {}
        for name in self.rule.learnable:
            lv = learned.get(name)
            if lv is None or lv.granularity == "scalar":
                hp[name] = self._group_value(group, name)
            else:
                hp[name] = [lv.values[i] for i in indices]
        return hp

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
        *,
        copy_grads: bool,
    ) -> GroupSnapshot:
        group = self.param_groups[index]
        with torch.no_grad():
            return GroupSnapshot(
                rule=self.rule,
                live=list(params),
                indices=list(indices),
                params=[p.detach().clone() for p in params],
                grads=[g.detach().clone() if copy_grads else g.detach() for g in grads],
                state={
                    k: [None if x is None else x.clone() for x in xs] for k, xs in state.items()
                },
                hp=self._hyper_values(index, indices),
                flags={k: group[k] for k in self.flag_names},
                names=tuple(self._learned[index]),
            )

    # -- closures --------------------------------------------------------------------------

    def _trainable(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _evaluate(
        self, closure: Closure, graph_wanted: bool
    ) -> tuple[Any, dict[int, Tensor] | None]:
        """Run the training closure; make sure ``.grad`` holds this batch's gradient."""
        params = self._trainable()
        before = self._backward_count[0]
        saves = clone_parameter_saves(params) if graph_wanted else nullcontext()
        with torch.enable_grad(), saves:
            loss = closure()
            if self._backward_count[0] != before:  # torch's convention: backward was called
                if self.hvp == "autograd" and graph_wanted:
                    raise RuntimeError(
                        "hvp='autograd' needs a closure that returns the loss without calling "
                        "backward(); use hvp='finite_difference' with torch's ordinary closure"
                    )
                if self.hvp == "auto":  # decided by the closure in hand, step by step
                    self._resolved_hvp = "finite_difference"
                return loss, None
            loss_tensor = _check_training_loss(loss)
            grads = _grad(loss_tensor, params, create_graph=graph_wanted)
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.detach()
        if self.hvp == "auto":
            self._resolved_hvp = "autograd"
        if not graph_wanted:
            return loss, None
        return loss, {id(p): g for p, g in zip(params, grads, strict=True) if g is not None}

    def _closure_gradient(self, closure: Closure, live: list[Tensor]) -> list[Tensor]:
        """The training gradient of ``live`` at the parameters' current values."""
        before = self._backward_count[0]
        with torch.enable_grad():
            loss = closure()
            if self._backward_count[0] != before:
                return [torch.zeros_like(p) if p.grad is None else p.grad for p in live]
            grads = _grad(_check_training_loss(loss), live)
        return _zeros_for_none(grads, live)

    def _make_hvp(
        self, snapshot: list[GroupSnapshot], closure: Closure, graph: dict[int, Tensor] | None
    ) -> Callable[[list[Tensor]], list[Tensor]]:
        live = [p for g in snapshot for p in g.live]
        if graph is not None:
            return AutogradHVP(live, [graph.get(id(p), torch.zeros_like(p)) for p in live])
        return FiniteDifferenceHVP(
            live,
            [x for g in snapshot for x in g.params],
            [x for g in snapshot for x in g.grads],
            lambda: self._closure_gradient(closure, live),
            central=self._resolved_hvp != "forward_difference",
        )

    def _gradients_of(self, index: int, indices: list[int]) -> list[Tensor]:
        params = self.param_groups[index]["params"]
        return [
            torch.zeros_like(params[i]) if params[i].grad is None else params[i].grad
            for i in indices
        ]

    @staticmethod
    def _no_validation(live: list[Tensor]) -> list[Tensor] | None:
        raise RuntimeError("no validation closure")

    def _validation_gradient(self, val_closure: Closure, live: list[Tensor]) -> list[Tensor] | None:
        with torch.enable_grad():
            value = val_closure()
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"val_closure must return the validation loss as a scalar tensor, got "
                    f"{type(value).__name__}"
                )
            if value.numel() != 1:
                raise ValueError(
                    "val_closure must return the validation loss as a scalar tensor, got a "
                    f"tensor of shape {tuple(value.shape)}"
                )
            if not value.requires_grad:
                raise ValueError(
                    "val_closure returned a loss that does not depend on the parameters "
                    "(requires_grad=False): compute it from the model with gradients enabled"
                )
            if not bool(torch.isfinite(value.detach()).all()):
                self._skip(f"the validation loss is {float(value.detach())}")
                return None
            grads = _grad(value.reshape(()), live)
        return _zeros_for_none(grads, live)

    # -- hyper-updates ---------------------------------------------------------------------

    def _skip(self, why: str) -> None:
        self._counters["skipped_hyper_steps"] += 1
        warnings.warn(
            f"{type(self).__name__}: {why}; this hyper-update is skipped (the learned "
            "hyperparameters are unchanged)",
            RuntimeWarning,
            stacklevel=4,
        )

    def _apply_hypergradients(self, elementwise: ElementwiseHypergradients) -> None:
        natural: list[dict[str, list[Tensor]]] = []
        for group, learned, hg in zip(self.param_groups, self._learned, elementwise, strict=True):
            reduced = {}
            for name, lv in learned.items():
                reduced[name] = lv.reduce(_place(hg.values[name], hg.indices, group["params"], lv))
            natural.append(reduced)
        flat = [x for group in natural for xs in group.values() for x in xs]
        if flat and not bool(torch.stack([torch.isfinite(x).all().cpu() for x in flat]).all()):
            self._skip("a hypergradient is not finite")
            return
        self._last_hypergradients = [
            {k: [x.detach().clone() for x in v] for k, v in g.items()} for g in natural
        ]
        assert self.hyper_optimizer is not None
        before = []
        for group, learned, grads in zip(self.param_groups, self._learned, natural, strict=True):
            for name, lv in learned.items():
                for phi, g in zip(
                    lv.phi, lv.chain(grads[name], self._group_value(group, name)), strict=True
                ):
                    phi.grad = g.to(phi.dtype)
                    before.append(phi.clone())
        with torch.no_grad():
            self.hyper_optimizer.step()
        self.hyper_optimizer.zero_grad(set_to_none=True)
        moved = iter(before)
        for group, learned in zip(self.param_groups, self._learned, strict=True):
            for name, lv in learned.items():
                lv.clip_()
                changed = [phi != next(moved) for phi in lv.phi]
                shown = lv.refresh(group["params"], changed)
                if shown is not None:
                    self._set_group_value(group, name, shown)
                    lv.shown = shown
        self._counters["hyper_steps"] += 1

    def _take_external_writes(self) -> None:
        for group, learned in zip(self.param_groups, self._learned, strict=True):
            for name, lv in learned.items():
                value = self._group_value(group, name)
                if value != lv.shown:
                    shown = lv.take_external(value, group["params"])
                    self._set_group_value(group, name, shown)
                    lv.shown = shown

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``"hyper"``: the learned values, the hyper-optimizer's
        state, the counters and any pending hypergradient-descent partials."""
        state = super().state_dict()
        assert self.hyper_optimizer is not None
        state["hyper"] = {
            "phi": [{k: [x.clone() for x in lv.phi] for k, lv in g.items()} for g in self._learned],
            "shown": [{k: lv.shown for k, lv in g.items()} for g in self._learned],
            "hyper_optimizer": self.hyper_optimizer.state_dict(),
            "counters": dict(self._counters),
            "hypergradients": [
                {k: [x.clone() for x in v] for k, v in g.items()} for g in self._last_hypergradients
            ],
            "method": self._hyper_method.state_dict(),
            "resolved_hvp": self._resolved_hvp,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class, or torch's own optimizer's.

        From torch's (``torch.optim.SGD(...).state_dict()`` for :class:`HyperSGD`), the
        buffers and hyperparameters load and the learned values restart from the loaded
        hyperparameters, as if a scheduler had written them.
        """
        state_dict = dict(state_dict)
        hyper = state_dict.pop("hyper", None)
        if hyper is not None:  # check before anything loads
            if len(hyper["phi"]) != len(self._learned):
                raise ValueError(
                    f"the state dict has {len(hyper['phi'])} param groups of learned values, this "
                    f"optimizer {len(self._learned)}"
                )
            _check_saved_shapes(self._learned, hyper["phi"])
        super().load_state_dict(state_dict)
        if hyper is None:
            self._take_external_writes()
            return
        with torch.no_grad():
            for learned, saved, shown in zip(
                self._learned, hyper["phi"], hyper["shown"], strict=True
            ):
                for name, lv in learned.items():
                    for phi, x in zip(lv.phi, saved[name], strict=True):
                        phi.copy_(x)
                    lv.shown = float(shown[name])
        for group, learned in zip(self.param_groups, self._learned, strict=True):
            for lv in learned.values():
                if lv.granularity != "scalar":
                    lv.values = []
                    lv.refresh(group["params"])
        assert self.hyper_optimizer is not None
        self.hyper_optimizer.load_state_dict(hyper["hyper_optimizer"])
        self._counters = dict(hyper["counters"])
        self._last_hypergradients = [
            {k: [x.clone() for x in v] for k, v in g.items()} for g in hyper["hypergradients"]
        ]
        self._hyper_method.load_state_dict(hyper["method"])
        if self.hvp == "auto":
            self._resolved_hvp = hyper.get("resolved_hvp")

    def __del__(self) -> None:
        # the hooks that tell whether a closure called backward() live on the parameters
        with suppress(Exception):  # at interpreter shutdown torch may be gone already
            for handle in getattr(self, "_hook_handles", []):
                handle.remove()


# -- checks ----------------------------------------------------------------------------------


def _place(
    values: list[Tensor], indices: list[int], params: list[Tensor], lv: LearnedValue
) -> list[Tensor]:
    """Element-wise values for the covered parameters, zeros for the rest of the group."""
    if lv.granularity == "scalar" and len(indices) == len(params):
        return values
    full = [torch.zeros_like(p) for p in params]
    for i, v in zip(indices, values, strict=True):
        full[i] = v
    return full


def _check_saved_shapes(
    learned: list[dict[str, LearnedValue]], saved: list[dict[str, list[Tensor]]]
) -> None:
    """A state dict's learned values must have this optimizer's shapes (granularity)."""
    for group, values in zip(learned, saved, strict=True):
        if set(values) != set(group):
            raise ValueError(
                f"the state dict learns {sorted(values)}, this optimizer {sorted(group)}"
            )
        for name, lv in group.items():
            if len(values[name]) != len(lv.phi) or any(
                phi.shape != x.shape for phi, x in zip(lv.phi, values[name], strict=True)
            ):
                shapes = [tuple(x.shape) for x in values[name]]
                raise ValueError(
                    f"the state dict's learned {name!r} has shapes {shapes}, this optimizer's "
                    f"{[tuple(p.shape) for p in lv.phi]} (granularity {lv.granularity!r}): was it "
                    "saved with another granularity?"
                )


def _check_granularity(
    granularity: object, learn: tuple[str, ...]
) -> Granularity | dict[str, Granularity]:
    """One granularity for every learned name, or a mapping ``{name: granularity}``.

    Names the mapping leaves out are ``"scalar"``; names it gives must be learned.
    """
    if isinstance(granularity, str):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        return cast(Granularity, granularity)
    if not isinstance(granularity, Mapping):
        raise TypeError(
            f"granularity must be a string or a mapping from learned names to strings, "
            f"got {granularity!r}"
        )
    out: dict[str, Granularity] = {}
    for name, value in granularity.items():
        if name not in learn:
            raise ValueError(
                f"granularity names {name!r}, which is not learned; learn is {list(learn)}"
            )
        if value not in GRANULARITIES:
            raise ValueError(f"granularity[{name!r}] must be one of {GRANULARITIES}, got {value!r}")
        out[name] = cast(Granularity, value)
    return {name: out.get(name, "scalar") for name in learn}


def _check_real(argument: str, value: object, where: str = "") -> float:
    """A real number (a float, an int or a 0-dim real tensor), else a TypeError."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{where}{argument} must be a real number, got {value!r}")
    if math.isnan(value):
        raise ValueError(f"{where}{argument} must be a number, got {value!r}")
    return float(value)


def _check_training_loss(loss: object) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(
            "a closure that does not call backward() must return the training loss as a scalar "
            f"tensor, got {loss if not isinstance(loss, Tensor) else tuple(loss.shape)!r}"
        )
    if not loss.requires_grad:
        raise ValueError(
            "the closure's loss does not depend on the parameters (requires_grad=False) and "
            "the closure did not call backward()"
        )
    return loss.reshape(())


def _check_choice(argument: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{argument} must be one of {choices}, got {value!r}")
    return value


def _check_learn(learn: object, learnable: tuple[str, ...]) -> tuple[str, ...]:
    names = (learn,) if isinstance(learn, str) else learn
    if not isinstance(names, Iterable):
        raise TypeError(f"learn must be a name or a sequence of names, got {learn!r}")
    names = tuple(names)
    if not names:
        raise ValueError(f"learn must name at least one of {learnable}, got {learn!r}")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"learn must hold names (str), got {name!r} in {learn!r}")
        if name not in learnable:
            hint = " (Adam's betas are learned as 'beta1' and 'beta2')" if name == "betas" else ""
            raise ValueError(
                f"learn: {name!r} is not learnable here; choose from {learnable}{hint}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"learn names a hyperparameter twice: {learn!r}")
    return names


def _check_neumann_steps(value: object, method: str) -> int:
    if value is None:
        return DEFAULT_NEUMANN_STEPS if method == "ift" else 0
    if not _is_int(value) or cast(int, value) < 0:
        raise ValueError(f"neumann_steps must be an integer >= 0, got {value!r}")
    if method != "ift" and value != 0:
        raise ValueError(f"method={method!r} takes no Neumann terms, got neumann_steps={value!r}")
    return cast(int, value)


def _check_positive_int(argument: str, value: object, default: int) -> int:
    if value is None:
        return default
    if not _is_int(value) or cast(int, value) < 1:
        raise ValueError(f"{argument} must be an integer >= 1, got {value!r}")
    return cast(int, value)


def _check_bounds(
    bounds: Mapping[str, tuple[float, float]] | None,
    parametrisation: Mapping[str, Parametrisation],
) -> dict[str, tuple[float, float]]:
    out = {name: (p.low, p.high) for name, p in parametrisation.items()}
    if bounds is None:
        return out
    if not isinstance(bounds, Mapping):
        raise TypeError(f"bounds must be a mapping from name to (low, high), got {bounds!r}")
    for name, pair in bounds.items():
        if name not in parametrisation:
            raise ValueError(
                f"bounds: {name!r} is not learnable here; choose from {tuple(parametrisation)}"
            )
        try:
            low, high = (float(x) for x in pair)
        except (TypeError, ValueError):
            raise TypeError(f"bounds[{name!r}] must be a pair of numbers, got {pair!r}") from None
        fraction = parametrisation[name].fraction
        top = 1.0 if fraction else math.inf
        if not (0 < low < high < top):
            raise ValueError(
                f"bounds[{name!r}] must satisfy 0 < low < high{' < 1' if fraction else ''}, "
                f"got {pair!r}"
            )
        out[name] = (low, high)
    return out


def _check_learnable_value(
    name: str, value: float, bounds: tuple[float, float], fraction: bool, group: int
) -> None:
    low, high = bounds
    if not (low <= value <= high):
        kind = "a fraction in (0, 1)" if fraction else "positive"
        raise ValueError(
            f"param group {group}: {name}={value!r} cannot be learned: a learned {name} must be "
            f"{kind} and within its bounds [{low:g}, {high:g}] (set bounds={{{name!r}: (low, "
            f"high)}} to change them)"
        )
