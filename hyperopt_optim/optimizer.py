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

from ._learned import GRANULARITIES, Granularity, LearnedValue, natural_derivative, to_natural
from .hypergradients._base import (
    ElementwiseHypergradients,
    GroupSnapshot,
    HypergradientMethod,
    StepContext,
)
from .hypergradients.descent import HypergradientDescent
from .hypergradients.forward import (
    MODES,
    PARAM,
    Column,
    ForwardMode,
    batched_products,
    propagate,
    step_jacobian,
)
from .hypergradients.hvp import (
    AutogradHVP,
    FiniteDifferenceHVP,
    FunctionalHVP,
    clone_parameter_saves,
)
from .hypergradients.onepass import OnePass
from .rules._base import Hyper, Parametrisation, RuleState, UpdateRule
from .shared_adam import SharedAdam
from .sign_step import SignStep

__all__ = ["HVP_PROVIDERS", "METHODS", "HyperOptimizer"]

METHODS = ("ift", "greedy", "hd", "forward")
HVP_PROVIDERS = ("auto", "autograd", "autograd_batched", "finite_difference", "forward_difference")
EXACT_HVPS = ("autograd", "autograd_batched")
DEFAULT_NEUMANN_STEPS = 4
DEFAULT_UPDATE_INTERVAL = {"ift": 10, "greedy": 10, "hd": 1, "forward": 10}
DEFAULT_HYPER_LR = 0.05
DEFAULT_WINDOWS = 10
DEFAULT_SIGN_STEP = 0.3
CLAMP_NAMES = ("grad", "tangent")

Closure = Callable[[], Any]
HyperOptimizerFactory = Callable[[list[Tensor]], Optimizer]


def _default_hyper_optimizer(params: list[Tensor]) -> Optimizer:
    return torch.optim.Adam(params, lr=DEFAULT_HYPER_LR)


def _default_element_hyper_optimizer(params: list[Tensor]) -> Optimizer:
    return SharedAdam(params, lr=DEFAULT_HYPER_LR)  # and its default deviation_lr


def _default_episodic_hyper_optimizer(params: list[Tensor]) -> Optimizer:
    return SignStep(params, lr=DEFAULT_SIGN_STEP)  # the paper's outer update


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
        horizon: int | None = None,
        windows: int | None = None,
        mode: str | None = None,
        clamps: Mapping[str, float] | None = None,
        backtrack: bool | None = None,
    ) -> None:
        self.learn = _check_learn(learn, self.rule.learnable)
        self.granularity = _check_granularity(granularity, self.learn)
        self.method = _check_choice("method", method, METHODS)
        self.hvp = _check_choice("hvp", hvp, HVP_PROVIDERS)
        if hvp == "autograd_batched" and method != "forward":
            raise ValueError(
                "hvp='autograd_batched' takes the products of all tangent columns in one batched "
                f"backward: it is for method='forward', not method={method!r} (use 'autograd')"
            )
        self.neumann_steps = _check_neumann_steps(neumann_steps, method)
        self._forward: ForwardMode | None = _check_forward(
            method, self.granularity, horizon, windows, mode, update_interval, clamps, backtrack
        )
        if self._forward is not None and self._forward.mode == "episodic":
            update_interval = self._forward.horizon
        self.update_interval = _check_positive_int(
            "update_interval", update_interval, DEFAULT_UPDATE_INTERVAL[method]
        )
        if hyper_optimizer is not None and not callable(hyper_optimizer):
            raise TypeError(
                "hyper_optimizer must be a callable taking a list of tensors and returning a "
                f"torch.optim.Optimizer, got {hyper_optimizer!r}"
            )
        self.bounds = _check_bounds(bounds, self.rule.parametrisation)
        self._hyper_method: HypergradientMethod
        if self._forward is not None:
            self._forward.update_interval = self.update_interval
            self._hyper_method = self._forward
        elif method == "hd":
            self._hyper_method = HypergradientDescent(self.update_interval)
        else:
            self._hyper_method = OnePass(self.neumann_steps, self.update_interval)
        self._learned: list[dict[str, LearnedValue]] = []
        #: forward mode: per group, name -> one (N,) tensor of φ per learned value
        self._schedules: list[dict[str, list[Tensor]]] = []
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
            if self._forward is not None and self._forward.mode == "episodic":
                factory = _default_episodic_hyper_optimizer
        built = factory([x for i in range(len(self._learned)) for x in self._stepped_values(i)])
        if not isinstance(built, Optimizer):
            raise TypeError(
                f"hyper_optimizer must return a torch.optim.Optimizer, got {type(built).__name__}"
            )
        self.hyper_optimizer = built
        self._counters = {"step": 0, "hyper_steps": 0, "skipped_hyper_steps": 0}
        self._last_hypergradients: list[dict[str, list[Tensor]]] = [
            self._zero_hypergradients(i) for i in range(len(self._learned))
        ]

    def _stepped_values(self, index: int) -> list[Tensor]:
        """The tensors the hyper-optimizer steps for param group ``index``: the learned ``φ``,
        or in episodic forward mode the schedules of ``φ``."""
        if self._forward is not None and self._forward.mode == "episodic":
            return [x for xs in self._schedules[index].values() for x in xs]
        return [phi for lv in self._learned[index].values() for phi in lv.phi]

    def _zero_hypergradients(self, index: int) -> dict[str, list[Tensor]]:
        if self._forward is not None:
            return {
                name: [torch.zeros(xs.shape, dtype=torch.float64, device=xs.device) for xs in sched]
                for name, sched in self._schedules[index].items()
            }
        return {
            name: [torch.zeros_like(phi) for phi in lv.phi]
            for name, lv in self._learned[index].items()
        }

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
        if self._forward is not None:
            if self._forward.position != 0:
                raise RuntimeError(
                    "method='forward' can take a new param group only before the first step of "
                    "an episode (its tangents have one column per learned value)"
                )
            self._schedules.append(
                {
                    name: [phi.detach().repeat(self._forward.windows) for phi in lv.phi]
                    for name, lv in learned.items()
                }
            )
        self._learned.append(learned)
        if self._forward is not None:
            self._forward.set_columns(self._columns())
            self._forward.forget_best()  # its schedules lack the new group
        if self.hyper_optimizer is not None:
            self.hyper_optimizer.add_param_group({"params": self._stepped_values(index)})
            self._last_hypergradients.append(self._zero_hypergradients(index))

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

        ``L`` is the validation loss (``"ift"``, ``"greedy"``, ``"forward"``) or the training
        loss at the next step (``"hd"``).  For ``"forward"`` each value is a tensor of shape
        ``(windows,)``: the derivative with respect to each window's value, through every step
        of the episode (online: of the run) so far, at the last hyper-step.
        """
        out: list[dict[str, Tensor | list[Tensor]]] = []
        for grads in self._last_hypergradients:
            entry: dict[str, Tensor | list[Tensor]] = {}
            for name, g in grads.items():
                scalar = self.granularity_of(name) == "scalar"
                entry[name] = g[0].clone() if scalar else [x.clone() for x in g]
            out.append(entry)
        return out

    def schedules(self) -> list[dict[str, Tensor | list[Tensor]]]:
        """``method="forward"``: every window's value in natural units, one dict per group.

        A tensor of shape ``(windows,)`` per name for ``granularity="scalar"``; for
        ``"tensor"`` a list with one such tensor per parameter of the group.  Online, windows
        passed show the value each ended with and the current one its latest value; a window
        not reached yet shows the initial value, but will start from the value the window
        before it ends with.
        """
        if self._forward is None:
            raise RuntimeError(f"schedules() needs method='forward', not {self.method!r}")
        out: list[dict[str, Tensor | list[Tensor]]] = []
        for learned, schedules in zip(self._learned, self._schedules, strict=True):
            entry: dict[str, Tensor | list[Tensor]] = {}
            for name, sched in schedules.items():
                lv = learned[name]
                values = [to_natural(x.detach(), lv.fraction) for x in sched]
                entry[name] = values[0] if lv.granularity == "scalar" else values
            out.append(entry)
        return out

    @property
    def hyper_state(self) -> dict[str, int]:
        """Counters: ``step``, ``hyper_steps`` taken and ``skipped_hyper_steps`` (non-finite)."""
        return dict(self._counters)

    # -- the step --------------------------------------------------------------------------

    def step(
        self,
        closure: Closure | None = None,
        *,
        val_closure: Closure | None = None,
        loss_fn: Callable[[list[Tensor]], Tensor] | None = None,
    ) -> Any:
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
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        if self._forward is not None:
            assert val_closure is not None
            return self._forward_step(closure, val_closure, loss_fn)
        if loss_fn is not None:
            raise ValueError(
                f"loss_fn is taken by method='forward' only, not method={self.method!r}: pass "
                "a closure"
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
                if self.hvp in EXACT_HVPS and graph_wanted:
                    raise RuntimeError(
                        f"hvp={self.hvp!r} needs a closure that returns the loss without calling "
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
        self._step_learned(natural)

    def _step_learned(self, natural: list[dict[str, list[Tensor]]], *, record: bool = True) -> bool:
        """Chain ``dL/dλ`` (one value per learned value) into ``φ`` and step the hyper-optimizer."""
        flat = [x for group in natural for xs in group.values() for x in xs]
        if flat and not bool(torch.stack([torch.isfinite(x).all().cpu() for x in flat]).all()):
            self._skip("a hypergradient is not finite")
            return False
        if record:
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
        return True

    def _take_external_writes(self) -> set[tuple[int, str]]:
        """Take up values written into the param groups from outside; returns which."""
        taken = set()
        for index, (group, learned) in enumerate(
            zip(self.param_groups, self._learned, strict=True)
        ):
            for name, lv in learned.items():
                value = self._group_value(group, name)
                if value != lv.shown:
                    shown = lv.take_external(value, group["params"])
                    self._set_group_value(group, name, shown)
                    lv.shown = shown
                    taken.add((index, name))
        return taken

    # -- forward mode ----------------------------------------------------------------------

    def _columns(self) -> list[Column]:
        return [
            Column(g, name, j)
            for g, learned in enumerate(self._learned)
            for name, lv in learned.items()
            for j in range(len(lv.phi))
        ]

    def _show_window(self, window: int, keep: set[tuple[int, str]] | None = None) -> None:
        """Make the learned values (and the param groups) those of ``window``'s schedule,
        except the ``keep`` ones (just written from outside: they become the window's)."""
        for index, (group, learned, schedules) in enumerate(
            zip(self.param_groups, self._learned, self._schedules, strict=True)
        ):
            for name, lv in learned.items():
                if keep and (index, name) in keep:
                    continue
                sched = schedules[name]
                if all(bool(phi == x[window]) for phi, x in zip(lv.phi, sched, strict=True)):
                    continue  # unchanged: keep the exact float shown (the user's own at first)
                with torch.no_grad():
                    for phi, x in zip(lv.phi, sched, strict=True):
                        phi.copy_(x[window])
                lv.values = []
                shown = lv.refresh(group["params"])
                assert shown is not None
                self._set_group_value(group, name, shown)
                lv.shown = shown

    def _record_window(self, window: int) -> None:
        """Write the current learned values into ``window``'s entry of the schedules."""
        with torch.no_grad():
            for learned, schedules in zip(self._learned, self._schedules, strict=True):
                for name, lv in learned.items():
                    for phi, x in zip(lv.phi, schedules[name], strict=True):
                        x[window] = phi.to(x.dtype)

    def _forward_step(
        self,
        closure: Closure | None,
        val_closure: Closure,
        loss_fn: Callable[[list[Tensor]], Tensor] | None,
    ) -> Any:
        """One step of ``method="forward"``: propagate the tangents through this step's update
        (before it is applied, at ``z_t``), apply it, and take the hyper-step when one is due.
        """
        fm = self._forward
        assert fm is not None
        if closure is None and loss_fn is None:
            raise ValueError(
                "method='forward' needs a training closure or loss_fn on every step: the tangents "
                "take a Hessian-vector product of the training loss per learned value"
            )
        if closure is not None and loss_fn is not None:
            raise ValueError("pass either closure or loss_fn to step(), not both")
        window = fm.window()
        written = self._take_external_writes()  # a scheduler's write: this window's value
        entering = fm.loaded_window != window
        if fm.mode == "episodic" and entering:
            self._show_window(window, keep=written)
        fm.loaded_window = window
        if entering or written:  # online, a new window starts from the value carried over
            self._record_window(window)
        t = self._counters["step"]

        trainable = [p for group in self.param_groups for p in group["params"]]
        graph: dict[int, Tensor] | None = None
        functional: FunctionalHVP | None = None
        if loss_fn is not None:
            live_all = [p for p in trainable if p.requires_grad]
            with torch.enable_grad():
                loss = _check_training_loss(loss_fn(live_all))
                grads = _grad(loss, live_all)
            for p, g in zip(live_all, grads, strict=True):
                p.grad = None if g is None else g.detach()  # unused: skipped, as torch does
            functional = FunctionalHVP(loss_fn, live_all)
        else:
            assert closure is not None
            graph_wanted = self._resolved_hvp in (None, *EXACT_HVPS)
            loss, graph = self._evaluate(closure, graph_wanted)

        views = [self._gather(i) for i in range(len(self.param_groups))]
        # Finite differences call the closure again, which may overwrite .grad (even in place):
        # they get the unclipped gradient at w_t (forward differences subtract it) and the
        # update a copy of this step's; exact products leave .grad alone.
        differences = functional is None and graph is None
        raw_grads = [g.detach().clone() for view in views for g in view[2]] if differences else []
        if fm.grad_clamp is not None:
            with torch.no_grad():
                masks = [[g.abs() < fm.grad_clamp for g in view[2]] for view in views]
                for view in views:
                    for g in view[2]:
                        g.clamp_(-fm.grad_clamp, fm.grad_clamp)
        jacobians = []
        with torch.no_grad():
            for i, (indices, params, grads_i, state) in enumerate(views):
                group = self.param_groups[i]
                jacobians.append(
                    step_jacobian(
                        self.rule,
                        [p.detach() for p in params],
                        [g.detach() for g in grads_i],
                        state,
                        self._hyper_values(i, indices),
                        {k: group[k] for k in self.flag_names},
                        tuple(self._learned[i]),
                    )
                )
        blocks = sorted({o for jac in jacobians for o in jac.outputs}, key=lambda b: b != PARAM)
        fm.allocate([group["params"] for group in self.param_groups], blocks)
        assert fm.tangents is not None
        active = fm.active(window)
        live = [p for view in views for p in view[1]]
        directions = [
            fm.tangents[i][j][PARAM][:active] for i, view in enumerate(views) for j in view[0]
        ]
        step_grads = [  # clipped, if so
            g.detach().clone() if differences else g for view in views for g in view[2]
        ]
        try:
            if functional is not None:
                position = {id(p): n for n, p in enumerate(live_all)}
                full = [
                    fm.tangents[i][j][PARAM][:active]
                    for i, group in enumerate(self.param_groups)
                    for j, p in enumerate(group["params"])
                    if p.requires_grad
                ]
                products = functional(full)
                # a parameter outside loss_fn's list (frozen, with a stale .grad): H·Z = 0
                hz = [
                    products[position[id(p)]] if id(p) in position else torch.zeros_like(d)
                    for p, d in zip(live, directions, strict=True)
                ]
            elif graph is not None:
                provider = AutogradHVP(live, [graph.get(id(p), torch.zeros_like(p)) for p in live])
                if self.hvp == "autograd_batched":  # one backward for all columns
                    hz = provider.batched(directions)
                else:  # one backward per column: memory of one product, often faster
                    hz = batched_products(provider, directions)
            else:
                assert closure is not None
                provider_fd = FiniteDifferenceHVP(
                    live,
                    [p.detach().clone() for p in live],
                    raw_grads,
                    lambda: self._closure_gradient(closure, live),
                    central=self._resolved_hvp != "forward_difference",
                )
                hz = batched_products(provider_fd, directions)
        finally:
            for p, g in zip(live, step_grads, strict=True):
                p.grad = g
        del graph
        if fm.tangent_clamp is not None:
            for x in hz:
                x.clamp_(-fm.tangent_clamp, fm.tangent_clamp)
        with torch.no_grad():
            start = 0
            for i, ((indices, params, _, _), jac) in enumerate(zip(views, jacobians, strict=True)):
                entries = [fm.tangents[i][j] for j in indices]
                tangents = {b: [e[b] for e in entries] for b in jac.outputs}
                propagate(
                    jac,
                    tangents,
                    hz[start : start + len(params)],
                    active,
                    grad_mask=None if fm.grad_clamp is None else masks[i],
                )
                start += len(params)
                self._add_sources(i, indices, jac, entries, window)
            start = 0
            for i, (indices, params, _, state) in enumerate(views):
                grads_i = step_grads[start : start + len(params)]
                start += len(params)
                self._update(i, indices, params, grads_i, state)
        self._counters["step"] = t + 1

        if fm.episode_ends() or fm.online_due(t):
            self._forward_hyper_step(val_closure, window)
        if fm.episode_ends():
            self._end_episode()
        else:
            fm.position += 1
        return loss

    def _add_sources(
        self,
        index: int,
        indices: list[int],
        jac: Any,
        entries: list[dict[str, Tensor]],
        window: int,
    ) -> None:
        """``Z[:, k·V + v] += ∂z'/∂λ_v`` for the values of param group ``index``."""
        fm = self._forward
        assert fm is not None
        base = window * fm.values_per_window
        for v, column in enumerate(fm.columns):
            if column.group != index:
                continue
            lv = self._learned[index][column.name]
            for n, j in enumerate(indices):
                if lv.granularity != "scalar" and j != column.value:
                    continue
                for block in jac.outputs:
                    entries[n][block][base + v].add_(jac.hyper[block][column.name][n])

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
        fm = self._forward
        if fm is None:
            raise RuntimeError(
                f"compute_hypergradients() needs method='forward', not {self.method!r}"
            )
        val_closure = val_closure if val_closure is not None else self._validation_closure
        if val_closure is None or not callable(val_closure):
            raise ValueError(
                "compute_hypergradients() needs a validation closure: pass one or register it"
            )
        self._forward_natural(val_closure)
        return self.hypergradients()

    def _forward_natural(self, val_closure: Closure) -> list[dict[str, list[Tensor]]] | None:
        """``∇L_V · Z`` per value and window, recorded as the last hypergradients; ``None``
        (and the tangents restart) when it is not finite."""
        fm = self._forward
        assert fm is not None
        if fm.tangents is None:
            return [
                {k: [torch.zeros_like(x) for x in v] for k, v in g.items()}
                for g in self._last_hypergradients
            ]
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        grads = self._validation_gradient(val_closure, params)
        if grads is None:
            return None
        by_param = {id(p): g for p, g in zip(params, grads, strict=True)}
        val_grads = [[by_param.get(id(p)) for p in group["params"]] for group in self.param_groups]
        vector = fm.hypergradient(val_grads)
        if not bool(torch.isfinite(vector).all()):
            self._skip("a hypergradient is not finite (the tangents restart from zero)")
            fm.zero_tangents()
            return None
        per_value = fm.split(vector)
        natural: list[dict[str, list[Tensor]]] = [
            {
                name: [per_value[Column(g, name, j)].to(phi.device) for j, phi in enumerate(lv.phi)]
                for name, lv in learned.items()
            }
            for g, learned in enumerate(self._learned)
        ]
        self._last_hypergradients = [
            {k: [x.clone() for x in v] for k, v in g.items()} for g in natural
        ]
        return natural

    def _forward_hyper_step(self, val_closure: Closure, window: int) -> None:
        fm = self._forward
        assert fm is not None
        if fm.mode == "episodic" and fm.backtrack:
            self._episodic_with_backtracking(val_closure)
            return
        natural = self._forward_natural(val_closure)
        if natural is None:
            return
        if fm.mode == "online":
            current = [{k: [x[window] for x in v] for k, v in g.items()} for g in natural]
            if self._step_learned(current, record=False):
                self._record_window(window)
            return
        self._step_schedules(natural)

    def _step_schedules(self, natural: list[dict[str, list[Tensor]]]) -> None:
        """Episodic: chain each window's ``dL/dλ`` into ``φ`` and step the whole schedule."""
        assert self.hyper_optimizer is not None
        for learned, schedules, grads_g in zip(
            self._learned, self._schedules, natural, strict=True
        ):
            for name, lv in learned.items():
                for sched, h in zip(schedules[name], grads_g[name], strict=True):
                    slope = natural_derivative(to_natural(sched.detach(), lv.fraction), lv.fraction)
                    sched.grad = (h.to(sched.device) * slope.to(h.dtype)).to(sched.dtype)
        with torch.no_grad():
            self.hyper_optimizer.step()
        self.hyper_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for learned, schedules in zip(self._learned, self._schedules, strict=True):
                for name, lv in learned.items():
                    lv.clip_(schedules[name])
        self._counters["hyper_steps"] += 1

    def _episodic_with_backtracking(self, val_closure: Closure) -> None:
        """Episodic backtracking: an episode whose final validation loss is not finite or not
        below the best episode's so far sends the schedule back to that episode's, halves the
        outer steps and steps again from there along that episode's hypergradient (a
        backtracking line search; no episode is spent rerunning the best schedule).  Else, if
        its hypergradient is finite, this episode becomes the best and the schedule steps."""
        fm = self._forward
        assert fm is not None
        with torch.no_grad():
            loss = float(val_closure().detach())
        best = fm.best_loss
        if math.isfinite(loss) and (best is None or loss < best):
            natural = self._forward_natural(val_closure)
            if natural is None:  # skipped and counted: this episode cannot be a best
                return
            fm.best_loss = loss
            fm.best_schedules = [
                {k: [x.detach().clone() for x in v] for k, v in g.items()} for g in self._schedules
            ]
            fm.best_natural = natural
            self._step_schedules(natural)
            return
        if fm.best_schedules is None or fm.best_natural is None:  # nothing to go back to
            self._skip(f"the episode's validation loss is {loss}")
            return
        with torch.no_grad():
            for schedules, saved in zip(self._schedules, fm.best_schedules, strict=True):
                for name, xs in schedules.items():
                    for x, y in zip(xs, saved[name], strict=True):
                        x.copy_(y)
        assert self.hyper_optimizer is not None
        if isinstance(self.hyper_optimizer, SignStep):
            for state in self.hyper_optimizer.state.values():
                if "step_size" in state:
                    state["step_size"].mul_(0.5)
        else:
            for group in self.hyper_optimizer.param_groups:
                group["lr"] = group["lr"] * 0.5
        fm.backtracks += 1
        warnings.warn(
            f"{type(self).__name__}: this episode's validation loss {loss:.6g} is not below the "
            f"best episode's {best:.6g}: the schedule goes back to that episode's and steps "
            "again from there with the outer steps halved (backtrack=False takes the paper's "
            "steps regardless)",
            RuntimeWarning,
            stacklevel=4,
        )
        self._step_schedules(fm.best_natural)

    def _end_episode(self) -> None:
        """Episodic forward mode: restart the tangents, the buffers and the position."""
        fm = self._forward
        assert fm is not None
        fm.zero_tangents()
        self.state.clear()
        fm.position = 0
        fm.episodes += 1
        fm.loaded_window = None

    def tangent_memory(self) -> int:
        """``method="forward"``: bytes held in tangents, ``M·|z|`` elements once every state
        buffer exists (``M`` = windows × learned values, ``|z|`` = weights and buffers)."""
        if self._forward is None or self._forward.tangents is None:
            return 0
        return sum(
            z.numel() * z.element_size()
            for g in self._forward.tangents
            for e in g
            for z in e.values()
        )

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
        if self._forward is not None:
            state["hyper"]["schedules"] = [
                {k: [x.detach().clone() for x in v] for k, v in g.items()} for g in self._schedules
            ]
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
            if self._forward is not None:
                _check_saved_schedules(self._schedules, hyper.get("schedules"))
        super().load_state_dict(state_dict)
        if hyper is None:
            self._take_external_writes()
            if self._forward is not None:  # the schedules restart from the loaded values
                with torch.no_grad():
                    for learned, schedules in zip(self._learned, self._schedules, strict=True):
                        for name, lv in learned.items():
                            for phi, x in zip(lv.phi, schedules[name], strict=True):
                                x.fill_(float(phi))
                self._forward.forget_best()
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
        if self._forward is not None and self._forward.tangents is not None:
            # as torch moves optimizer state to its parameter's device and dtype
            for group, per_group in zip(self.param_groups, self._forward.tangents, strict=True):
                for p, entry in zip(group["params"], per_group, strict=True):
                    for block, z in entry.items():
                        entry[block] = z.to(device=p.device, dtype=p.dtype)
        if self._forward is not None:
            with torch.no_grad():
                for schedules, saved_g in zip(self._schedules, hyper["schedules"], strict=True):
                    for name, xs in schedules.items():
                        for x, saved_x in zip(xs, saved_g[name], strict=True):
                            x.copy_(saved_x)
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


def _check_forward(
    method: str,
    granularity: Granularity | dict[str, Granularity],
    horizon: object,
    windows: object,
    mode: object,
    update_interval: object,
    clamps: object,
    backtrack: object = None,
) -> ForwardMode | None:
    """The options of ``method="forward"``; refused with any other method."""
    if method != "forward":
        for name, value in (
            ("horizon", horizon),
            ("windows", windows),
            ("mode", mode),
            ("clamps", clamps),
            ("backtrack", backtrack),
        ):
            if value is not None:
                raise ValueError(
                    f"{name}={value!r} is an option of method='forward', not method={method!r}"
                )
        return None
    grans = [granularity] if isinstance(granularity, str) else list(granularity.values())
    if "element" in grans:
        raise ValueError(
            "method='forward' does not learn per-weight values (granularity 'element'): it "
            "carries one tangent the size of the whole optimizer state per learned value, so a "
            "value per weight would need memory of the number of weights squared; use "
            "granularity 'scalar' or 'tensor', or method='ift' for per-weight values"
        )
    if horizon is None:
        raise ValueError(
            "method='forward' needs horizon: the number of steps of the run (online) or of each "
            "episode (episodic), over which the windows are laid"
        )
    if not _is_int(horizon) or cast(int, horizon) < 1:
        raise ValueError(f"horizon must be an integer >= 1, got {horizon!r}")
    h = cast(int, horizon)
    if windows is None:
        windows = min(DEFAULT_WINDOWS, h)
    if not _is_int(windows) or not 1 <= cast(int, windows) <= h:
        raise ValueError(f"windows must be an integer in [1, horizon={h}], got {windows!r}")
    mode = "online" if mode is None else mode
    mode = _check_choice("mode", mode, MODES)
    if mode == "episodic" and update_interval is not None:
        raise ValueError(
            f"update_interval={update_interval!r} does not apply to mode='episodic': the "
            "schedule is updated once, at the end of each episode of horizon steps"
        )
    bounds: dict[str, float | None] = {"grad": None, "tangent": None}
    if clamps is not None:
        if not isinstance(clamps, Mapping):
            raise TypeError(
                f"clamps must be a mapping like {{'grad': 3.0, 'tangent': 1.0}}, got {clamps!r}"
            )
        for name, value in clamps.items():
            if name not in CLAMP_NAMES:
                raise ValueError(f"clamps: {name!r} is not a clamp; choose from {CLAMP_NAMES}")
            c = _check_real(f"clamps[{name!r}]", value)
            if not c > 0:
                raise ValueError(f"clamps[{name!r}] must be positive, got {value!r}")
            bounds[name] = c
    if backtrack is not None and not isinstance(backtrack, bool):
        raise TypeError(f"backtrack must be a bool, got {backtrack!r}")
    if backtrack and mode != "episodic":
        raise ValueError("backtrack=True applies to mode='episodic' only (whole reruns to compare)")
    interval = DEFAULT_UPDATE_INTERVAL["forward"] if update_interval is None else update_interval
    forward = ForwardMode(
        h, cast(int, windows), mode, cast(int, interval), bounds["grad"], bounds["tangent"]
    )
    forward.backtrack = mode == "episodic" if backtrack is None else backtrack
    return forward


def _check_saved_schedules(
    schedules: list[dict[str, list[Tensor]]], saved: list[dict[str, list[Tensor]]] | None
) -> None:
    """A forward-mode state dict must hold schedules of this optimizer's windows."""
    if saved is None:
        raise ValueError("the state dict has no schedules: it was not saved by method='forward'")
    for group, values in zip(schedules, saved, strict=True):
        for name, xs in group.items():
            shapes = [tuple(x.shape) for x in values.get(name, [])]
            if shapes != [tuple(x.shape) for x in xs]:
                raise ValueError(
                    f"the state dict's schedule of {name!r} has shapes {shapes}, this optimizer's "
                    f"{[tuple(x.shape) for x in xs]}: was it saved with other windows?"
                )


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
