"""The one interface between the optimizer and a way of computing hypergradients.

Every method — one-pass (``"ift"``, ``"greedy"``), hypergradient descent (``"hd"``), forward
mode (``"forward"``) — is a :class:`HypergradientMethod`, and the optimizer's ``step`` runs the
same sequence for each::

    plan = method.plan(t)                  # what the step needs: a snapshot of z_t, products
    method.begin_step(host, written)       # e.g. show the current window of a schedule
    <the training closure: .grad, and a graph when exact products are planned>
    method.before_update(ctx)              # may return hypergradients (hd), or carry tangents
    <the fast in-place update of every group, with the snapshot's gradients>
    method.after_update(ctx)               # may return hypergradients (ift, greedy)

Hypergradients returned by a hook are element-wise ``dL/dλ`` (one tensor per parameter and
learned name) that the optimizer reduces to the granularity, chains into the unconstrained
values and hands to the hyper-optimizer.  A method that learns schedules steps them itself
through its :class:`~hyperopt_optim.schedules.Schedules` and the :class:`Host` — what the
optimizer offers a method outside the step's context.  A new method is one new module with a
subclass registered in :mod:`hyperopt_optim.hypergradients`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from .._learned import LearnedValue
from ..rules._base import (
    Hyper,
    RuleState,
    StateCotangent,
    UpdateRule,
    linearise,
    present,
    state_vjp,
)

if TYPE_CHECKING:
    from ..schedules import Schedules

__all__ = [
    "HVP_PROVIDERS",
    "Closure",
    "ElementwiseHypergradients",
    "GroupHypergradients",
    "GroupSnapshot",
    "Host",
    "HyperOptimizerFactory",
    "HypergradientMethod",
    "MethodOptions",
    "NaturalHypergradients",
    "StepContext",
    "StepPlan",
]

HVP_PROVIDERS = ("auto", "autograd", "finite_difference", "forward_difference")
"""How Hessian-vector products may be taken, for every method (a method may add its own)."""

Closure = Callable[[], Any]
HyperOptimizerFactory = Callable[[list[Tensor]], Optimizer]


@dataclass
class GroupHypergradients:
    """Element-wise ``dL/dλ`` of one param group.

    Attributes:
        indices: the positions, in ``group["params"]``, of the parameters covered.
        values: learned name -> one tensor per covered parameter, of its shape.
    """

    indices: list[int]
    values: dict[str, list[Tensor]]


ElementwiseHypergradients = list[GroupHypergradients]
"""One entry per param group."""

NaturalHypergradients = list[dict[str, list[Tensor]]]
"""Per param group, learned name -> one tensor per learned value, in natural units (reduced to
the granularity; for a schedule, of shape ``(windows,)``)."""


@dataclass
class GroupSnapshot:
    """One param group at the pre-step point ``z_t`` of a step.

    Attributes:
        rule: the group's update map.
        live: the parameter tensors themselves (those with a gradient this step).
        indices: their positions in ``group["params"]``.
        params, grads, state: ``w_t``, ``g(w_t)`` and the state before the update — copies
            when the plan asked for them, else the live tensors.  The update uses ``grads``,
            which ``before_update`` may replace (forward mode's gradient clamp).
        hp: the hyperparameter values the update used.
        flags: the group's structural options.
        names: the learned names.
    """

    rule: UpdateRule
    live: list[Tensor]
    indices: list[int]
    params: list[Tensor]
    grads: list[Tensor]
    state: RuleState
    hp: dict[str, Hyper]
    flags: dict[str, object]
    names: tuple[str, ...]
    #: the live state the update writes (the optimizer's buffers), which after the update
    #: holds the state after the step (see :meth:`redo`)
    live_state: RuleState = field(default_factory=dict)
    #: ``params`` and ``state`` are the live tensors, read after the update: ``∂U/∂λ``
    #: products come from the rule's ``hyper_vjp_after`` (no copy of the point was taken)
    after: bool = False
    #: the learned names whose hypergradient is reduced to one value per tensor (scalar and
    #: tensor granularity): :meth:`reduced_hyper_vjp` sums them as it makes them
    reduced: frozenset[str] = frozenset()
    #: what the rule's products read of the step at this point (:func:`linearise`), computed
    #: at the first product and kept for the others while the snapshot lives
    linear: Any = None
    linearised: bool = False

    def state_vjp(
        self,
        cotangent_params: list[Tensor],
        cotangent_state: RuleState,
        *,
        overwrite: bool = False,
        keep_linear: bool = True,
    ) -> Any:
        """The rule's ``state_vjp`` at this point, every product from one linearisation;
        ``overwrite``: the caller gives up the cotangent, which a rule with an in-place
        ``state_vjp_`` (SGD's, Adam's) writes the result into, on pieces of the flattened
        tensors.  ``keep_linear=False`` (with ``overwrite``): no linearisation is kept, each
        piece recomputes its step (the memory of one piece, for more element-wise work)."""
        in_place = getattr(self.rule, "state_vjp_", None) if overwrite else None
        if in_place is not None and not (keep_linear and _linearises(self.rule)):
            return self._in_pieces(in_place, cotangent_params, cotangent_state)
        if not self.linearised:
            self.linear = linearise(
                self.rule, self.params, self.grads, self.state, self.hp, self.flags
            )
            self.linearised = True
        if in_place is not None:  # in pieces, each reading its slice of the linearisation
            return self._in_pieces(in_place, cotangent_params, cotangent_state, self.linear)
        return state_vjp(
            self.rule, self.params, self.grads, self.state, self.hp, self.flags,
            cotangent_params, cotangent_state, self.linear,
        )  # fmt: skip

    @property
    def can_redo(self) -> bool:
        """Whether the rule has a ``redo`` (:meth:`redo`)."""
        return hasattr(self.rule, "redo")

    def redo(self) -> None:
        """Write into the live weights, after the update, the weights the update made: the
        rule's ``redo`` from the point, the step's gradients and the state after it."""
        self.rule.redo(  # type: ignore[attr-defined]  # an optional method (see can_redo)
            self.live, self.params, self.grads, self.live_state, self.hp, self.flags
        )

    def hyper_vjp(
        self, cotangent_params: list[Tensor], cotangent_state: RuleState
    ) -> dict[str, list[Tensor]]:
        """The rule's ``hyper_vjp`` at this point: element-wise, one tensor per parameter."""
        if self.after:
            raise RuntimeError("a snapshot of the live tensors takes reduced_hyper_vjp only")
        return self.rule.hyper_vjp(
            self.params, self.grads, self.state, self.hp, self.flags,
            cotangent_params, cotangent_state, self.names,
        )  # fmt: skip

    def _slicing(
        self, cotangent_params: list[Tensor], cotangent_state: RuleState
    ) -> tuple[list[int], list[list[tuple[int, int, int]]]]:
        """The parameters' sizes and the calls of :func:`_pieces` for this group: pieces of
        about an eighth of it, at least :data:`REDUCE_CHUNK` elements."""
        numels = [p.numel() for p in self.params]
        chunk = max(REDUCE_CHUNK, -(-sum(numels) // 8))
        if sum(numels) <= chunk:  # one call on the whole tensors
            return numels, [[(i, 0, n) for i, n in enumerate(numels)]]
        buffers = [*self.state.values(), *cotangent_state.values()]
        learned = [h for h in self.hp.values() if not isinstance(h, float | int)]
        sliceable = [
            all(_sliceable(x, n) for x in (p, g, c))
            and all(_sliceable(xs[i], n) for xs in buffers)
            and all(_sliceable(h[i], n) for h in learned)
            for i, (n, p, g, c) in enumerate(
                zip(numels, self.params, self.grads, cotangent_params, strict=True)
            )
        ]
        return numels, _pieces(numels, sliceable, chunk)

    def _in_pieces(
        self,
        in_place: Callable[..., StateCotangent],
        cotangent_params: list[Tensor],
        cotangent_state: RuleState,
        linear: Any = None,
    ) -> StateCotangent:
        """A rule's in-place ``state_vjp_`` on pieces of the flattened tensors (the rules are
        element-wise): the temporaries of one piece at a time, however large a tensor.  The
        weights' and given state blocks are written through the pieces' views; ``r`` and new
        state blocks are put together."""
        kept = {} if linear is None else {"linear": linear}
        whole = getattr(self.rule, "state_vjp_whole", None)
        if whole is not None and whole(self.flags, linear is not None):  # no temporary to bound
            return in_place(
                self.params, self.grads, self.state, self.hp, self.flags,
                cotangent_params, cotangent_state, **kept,
            )  # fmt: skip
        numels, calls = self._slicing(cotangent_params, cotangent_state)
        if len(calls) <= 1:
            return in_place(
                self.params, self.grads, self.state, self.hp, self.flags,
                cotangent_params, cotangent_state, **kept,
            )  # fmt: skip
        count = len(self.params)
        grads: list[Tensor | None] = [None] * count
        state: dict[str, list[Tensor | None]] = {}
        for pieces in calls:
            view = _View(pieces, numels)
            given = view.state(cotangent_state)
            if linear is not None:
                kept = {"linear": view.linearisation(linear)}
            part = in_place(
                view.tensors(self.params), view.tensors(self.grads), view.state(self.state),
                view.hyper(self.hp), self.flags, view.tensors(cotangent_params), given, **kept,
            )  # fmt: skip
            targets = view.tensors(cotangent_params)
            for target, x in zip(targets, part.params, strict=True):
                if x.data_ptr() != target.data_ptr():
                    target.copy_(x)
            _place_pieces(grads, pieces, part.grads, self.params)
            for name, xs in part.state.items():
                held = given.get(name)
                full = state.setdefault(name, list(cotangent_state.get(name, [None] * count)))
                for k, ((i, a, b), y) in enumerate(zip(pieces, xs, strict=True)):
                    into = None if held is None else held[k]
                    if y is None:
                        continue
                    if into is not None:
                        if y.data_ptr() != into.data_ptr():
                            into.copy_(y)
                        continue
                    _place_pieces(full, [(i, a, b)], [y], self.params)
            del part, given, targets
        return StateCotangent(list(cotangent_params), state, present(grads))

    def reduced_hyper_vjp(
        self, cotangent_params: list[Tensor], cotangent_state: RuleState
    ) -> dict[str, list[Tensor]]:
        """:meth:`hyper_vjp` with the names in :attr:`reduced` summed per parameter (a 0-dim
        float64 tensor each) as they are made.

        The update rules are element-wise, so the product can be taken on slices of the
        flattened tensors: it runs on pieces of about an eighth of the group (at least
        :data:`REDUCE_CHUNK` elements), and the parameter-sized temporaries of a rule's
        ``hyper_vjp`` (several per learned name) shrink to those of one piece.  Names at
        ``"element"`` granularity are written into tensors of the parameters' shapes.
        """
        if not self.params or (not self.reduced and not self.after):
            return self.hyper_vjp(cotangent_params, cotangent_state)
        sums_of = getattr(self.rule, "hyper_vjp_sums", None)
        if sums_of is not None and not self.after and self.reduced >= set(self.names):
            kept = {} if self.linear is None else {"linear": self.linear}
            summed = sums_of(
                self.params, self.grads, self.state, self.hp, self.flags,
                cotangent_params, cotangent_state, self.names, **kept,
            )  # fmt: skip
            if summed is not None:  # every name from inner products: no temporaries
                return cast(dict[str, list[Tensor]], summed)
        numels, calls = self._slicing(cotangent_params, cotangent_state)
        sums: dict[str, list[Tensor]] = {}
        full: dict[str, list[Tensor | None]] = {}
        for name in self.names:
            if name in self.reduced:
                sums[name] = [
                    torch.zeros((), dtype=torch.float64, device=p.device) for p in self.params
                ]
            else:
                full[name] = [None] * len(self.params)
        for pieces in calls:
            view = _View(pieces, numels)
            if self.after:
                out = self.rule.hyper_vjp_after(  # type: ignore[attr-defined]
                    view.tensors(self.params), view.tensors(self.grads), view.state(self.state),
                    view.hyper(self.hp), self.flags, view.tensors(cotangent_params), self.names,
                )  # fmt: skip
            else:
                out = self.rule.hyper_vjp(
                    view.tensors(self.params), view.tensors(self.grads), view.state(self.state),
                    view.hyper(self.hp), self.flags, view.tensors(cotangent_params),
                    view.state(cotangent_state), self.names,
                )  # fmt: skip
            for name, values in out.items():
                for (i, a, b), x in zip(pieces, values, strict=True):
                    if name in sums:
                        sums[name][i] += x.sum(dtype=torch.float64)
                    else:
                        _place_pieces(full[name], [(i, a, b)], [x], self.params)
            del out
        return {name: sums[name] if name in sums else present(full[name]) for name in self.names}


REDUCE_CHUNK = 1 << 15
"""The smallest piece, in elements, that :meth:`GroupSnapshot.reduced_hyper_vjp` and the
in-place products slice a group into: a group below it runs in one piece (one call, no Python
loop on the hot path); a larger one in pieces of about an eighth of it, so that the
temporaries of a product are about an eighth of theirs on the whole group (eight calls)."""


def _linearises(rule: UpdateRule) -> bool:
    """Whether the rule's products read a linearisation (:func:`linearise`)."""
    return getattr(rule, "linearise", None) is not None


def _place_pieces(
    full: list[Tensor | None],
    pieces: list[tuple[int, int, int]],
    xs: list[Tensor],
    like: list[Tensor],
) -> None:
    """Put each piece's tensor where it belongs in ``full`` (one tensor per parameter): a
    whole parameter's as it is, a slice into a new tensor of the parameter's shape."""
    for (i, a, b), x in zip(pieces, xs, strict=True):
        if a == 0 and b == like[i].numel():
            full[i] = x
            continue
        target = full[i]
        if target is None:
            target = torch.empty(like[i].shape, dtype=x.dtype, device=x.device)
            full[i] = target
        target.view(-1)[a:b].copy_(x.reshape(-1))


def _pieces(
    numels: list[int], sliceable: list[bool], chunk: int
) -> list[list[tuple[int, int, int]]]:
    """Slices ``(parameter index, start, stop)`` of the flattened parameters, packed into
    calls of about ``chunk`` elements; a parameter that is not ``sliceable`` stays whole."""
    calls: list[list[tuple[int, int, int]]] = [[]]
    size = 0
    for i, (n, ok) in enumerate(zip(numels, sliceable, strict=True)):
        bounds = [(a, min(a + chunk, n)) for a in range(0, n, chunk)] if ok and n else [(0, n)]
        for a, b in bounds:
            if size and size + (b - a) > chunk:
                calls.append([])
                size = 0
            calls[-1].append((i, a, b))
            size += b - a
    return [c for c in calls if c]


def _sliceable(x: Tensor | None, numel: int) -> bool:
    """A tensor of a parameter's values that can be sliced like the flattened parameter."""
    return x is None or x.dim() == 0 or (x.numel() == numel and x.is_contiguous())


class _View:
    """The tensors of a group restricted to some slices of its flattened parameters."""

    def __init__(self, pieces: list[tuple[int, int, int]], numels: list[int]) -> None:
        self.pieces = pieces
        self.numels = numels

    def _one(self, x: Tensor | None, i: int, a: int, b: int) -> Tensor | None:
        if x is None or x.dim() == 0 or (a == 0 and b == self.numels[i]):
            return x
        return x.view(-1)[a:b]

    def tensors(self, xs: list[Tensor]) -> list[Tensor]:
        return [cast(Tensor, self._one(xs[i], i, a, b)) for i, a, b in self.pieces]

    def state(self, state: RuleState) -> RuleState:
        return {
            name: [self._one(xs[i], i, a, b) for i, a, b in self.pieces]
            for name, xs in state.items()
        }

    def linearisation(self, linear: list[Any]) -> list[Any]:
        """A rule's kept linearisation (one dataclass per parameter) for the pieces: each
        field of a parameter's size sliced like the parameter, the others as they are."""
        out = []
        for i, a, b in self.pieces:
            f = linear[i]
            out.append(
                dataclasses.replace(
                    f,
                    **{
                        field.name: self._one(value, i, a, b)
                        for field in dataclasses.fields(f)
                        if isinstance(value := getattr(f, field.name), Tensor)
                        and value.dim() > 0
                        and value.numel() == self.numels[i]
                    },
                )
            )
        return out

    def hyper(self, hp: dict[str, Hyper]) -> dict[str, Hyper]:
        return {
            name: h if isinstance(h, float | int) else self.tensors(h) for name, h in hp.items()
        }


@dataclass(frozen=True)
class StepPlan:
    """What a method needs from one step.

    Attributes:
        snapshot: offer the pre-step point of every group (``ctx.groups``) to the hooks.
        copy: the snapshot holds copies of ``w_t`` and the state (needed by hooks that use
            them after the update); else the live tensors (read before the update only).
        products: Hessian-vector products the method will take on this step's batch (0:
            none); decides whether the closure keeps a graph for exact products.
        after: the hooks take ``∂U/∂λ`` products only through
            :meth:`GroupSnapshot.reduced_hyper_vjp` after the update, so where the rule can
            take them from the state the update leaves (``hyper_vjp_after``), the snapshot
            holds the live tensors instead of copies (:attr:`GroupSnapshot.after`).
    """

    snapshot: bool = False
    copy: bool = True
    products: int = 0
    after: bool = False


class Products(Protocol):
    """Hessian-vector products on this step's training batch, over the concatenation of every
    group's ``live`` parameters (:mod:`hyperopt_optim._closures`)."""

    def __call__(self, directions: list[Tensor]) -> list[Tensor]:
        """``H d`` for one direction (one tensor per parameter)."""

    def columns(self, directions: list[Tensor]) -> list[Tensor]:
        """``H d`` for every leading column of ``directions`` (tensors ``(C, *shape)``)."""

    def mixed(self, directions: list[Tensor], wrt: list[Tensor]) -> list[Tensor]:
        """``∂/∂μ ⟨d, ∇_w L(w, μ)⟩`` for tensors ``wrt`` that the training loss reads."""


@dataclass
class StepContext:
    """What the optimizer offers a method during one step.

    Attributes:
        host: the optimizer.
        step: the index of this step (0 for the first).
        groups: the snapshot of every param group, when the plan asked for one.
        gradients: this step's training gradients of a group's parameters, given the group's
            index and the parameters' positions in it (zeros where a parameter has none).
        val_closure: the validation closure, when there is one.
        hvp: Hessian-vector products at ``w_t`` on this step's batch, when the plan asked for
            them and a training closure was given; else ``None``.  They hold the training
            loss's graph (exact products): a method done with them sets ``ctx.hvp = None`` so
            that the graph is freed before the update.
    """

    host: Host
    step: int
    groups: list[GroupSnapshot] | None
    gradients: Callable[[int, list[int]], list[Tensor]]
    val_closure: Closure | None = None
    hvp: Products | None = None
    #: tensors the training loss reads whose hypergradients the method takes (the optimizer's
    #: ``loss_hyperparameters``), and what it found for them on this step (``None``: none)
    loss_hyperparameters: list[Tensor] = field(default_factory=list)
    loss_hypergradients: list[Tensor] | None = None

    def validation_gradient(self, params: list[Tensor]) -> list[Tensor] | None:
        """``∇_w L_V`` at the current weights for ``params``, or ``None`` when the validation
        loss is not finite (counted and warned as a skipped hyper-step)."""
        if self.val_closure is None:
            raise RuntimeError("no validation closure")
        return self.host.validation_gradient(self.val_closure, params)


class Host(Protocol):
    """What the optimizer offers a method beyond one step's context."""

    #: the optimizer's class name, for messages
    name: str

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's param groups."""

    @property
    def state(self) -> Any:
        """The optimizer's per-parameter state (``torch.optim.Optimizer.state``)."""

    @property
    def hyper_optimizer(self) -> Optimizer | None:
        """The optimizer of the learned values (or of the schedules)."""

    @property
    def learned(self) -> list[dict[str, LearnedValue]]:
        """Per param group, name -> the learned value."""

    @property
    def counters(self) -> dict[str, int]:
        """``step``, ``hyper_steps`` and ``skipped_hyper_steps``, to update in place."""

    def show(self, index: int, name: str) -> None:
        """Recompute group ``index``'s values of ``name`` from ``φ`` and show them in the group."""

    def step_learned(self, natural: NaturalHypergradients, *, record: bool = True) -> bool:
        """Chain ``dL/dλ`` into ``φ``, step the hyper-optimizer and show the new values;
        ``False`` (skipped) when a hypergradient is not finite."""

    def record_hypergradients(self, natural: NaturalHypergradients) -> None:
        """What :meth:`~hyperopt_optim.HyperOptimizer.hypergradients` returns from now on."""

    def skip(self, why: str) -> None:
        """Count and warn about a skipped hyper-step."""

    def validation_gradient(
        self, val_closure: Closure, params: list[Tensor]
    ) -> list[Tensor] | None:
        """``∇_w L_V`` for ``params``; ``None`` (skipped) when the loss is not finite."""

    def shared_validation_loss(self, val_closure: Closure) -> float:
        """The validation loss (the same number on every data-parallel rank)."""


@dataclass(frozen=True)
class MethodOptions:
    """The hypergradient arguments of an optimizer, as the user gave them (``None``: not
    given).  Each method checks and takes its own; :func:`build_method` refuses the options
    that belong to other methods."""

    method: str
    granularity: Any
    hvp: str
    neumann_steps: object = None
    update_interval: object = None
    extra: dict[str, object] = field(default_factory=dict)


class HypergradientMethod(ABC):
    """The interface between the optimizer and a way of computing hypergradients.

    Class attributes describe the method to the optimizer; instances keep the method's state
    (saved in the optimizer's ``state_dict`` under ``"method"``).
    """

    #: whether the method differentiates a validation loss (else the training loss)
    uses_validation: ClassVar[bool] = True
    #: the keyword arguments of the optimizer that only this method takes (with their
    #: ``None`` default), checked by :meth:`from_options`
    options: ClassVar[tuple[str, ...]] = ()
    #: the Hessian-vector product providers the method can use
    hvp_providers: ClassVar[tuple[str, ...]] = HVP_PROVIDERS
    #: the differences ``hvp="auto"`` takes where products cannot be exact (torch's closure, a
    #: compiled model): forward ones, one gradient per product where central ones take two;
    #: they tune as well on the tuning suite (benchmarks/results/suite_forwarddiff.md), at an
    #: error of about u^(1/2) against u^(2/3) (docs/choosing.md)
    auto_differences: ClassVar[str] = "forward_difference"
    #: the method takes hypergradients of tensors the training loss reads
    #: (``loss_hyperparameters``); else the optimizer refuses them
    takes_loss_hyperparameters: ClassVar[bool] = False
    #: the method needs a training closure (or ``loss_fn``) on every step, and why
    requires_closure: ClassVar[str | None] = None
    #: the method takes ``step(loss_fn=...)`` instead of a closure
    accepts_loss_fn: ClassVar[bool] = False
    #: the method has :meth:`compute_hypergradients` and schedules
    learns_schedules: ClassVar[bool] = False
    #: the optimizer may restore the weights and restart its state mid-run (the divergence
    #: guard): the method keeps nothing that follows the weights from step to step
    restartable: ClassVar[bool] = True
    #: the method runs the optimizer's steps itself (:meth:`run_step`; reversible learning)
    runs_steps: ClassVar[bool] = False

    name: str = ""
    update_interval: int = 1
    neumann_steps: int = 0
    #: the schedules it learns, if any
    schedule: Schedules | None = None
    #: the hyper-optimizer to use when the user gives none (``None``: the optimizer's default)
    default_hyper_optimizer: HyperOptimizerFactory | None = None

    @classmethod
    @abstractmethod
    def from_options(cls, options: MethodOptions) -> HypergradientMethod:
        """Check the method's own options and build it."""

    # -- the step ---------------------------------------------------------------------------

    @abstractmethod
    def plan(self, step: int) -> StepPlan:
        """What step ``step`` needs."""

    def begin_step(self, host: Host, written: set[tuple[int, str]]) -> None:
        """Called first in every step, after values written into the param groups from
        outside (``written``: ``(group index, name)``) were taken up."""
        return None

    def before_update(self, ctx: StepContext) -> ElementwiseHypergradients | None:
        """Called after the gradient is known and before the update; may return hypergradients."""
        return None

    def after_update(self, ctx: StepContext) -> ElementwiseHypergradients | None:
        """Called after the update; may return hypergradients."""
        return None

    # -- param groups and what the hyper-optimizer steps -------------------------------------

    def add_group(self, host: Host, index: int) -> None:
        """Param group ``index`` was added (its learned values are ``host.learned[index]``)."""
        return None

    def stepped_values(self, index: int, learned: dict[str, LearnedValue]) -> list[Tensor]:
        """The tensors the hyper-optimizer steps for param group ``index``."""
        return [phi for lv in learned.values() for phi in lv.phi]

    def zero_hypergradients(
        self, index: int, learned: dict[str, LearnedValue]
    ) -> dict[str, list[Tensor]]:
        """``hypergradients()`` of group ``index`` before the first hyper-step, in natural units."""
        return {name: [torch.zeros_like(phi) for phi in lv.phi] for name, lv in learned.items()}

    def check_optimizer(self, opt: Any) -> None:
        """Refuse, at construction, an optimizer or settings the method cannot serve."""
        return None

    def check_group(self, opt: Any, group: dict[str, Any], index: int) -> None:
        """Refuse a param group (``add_param_group``) the method cannot serve."""
        return None

    def run_step(self, opt: Any, closure: Closure) -> Any:
        """A method with :attr:`runs_steps`: one step of the optimizer."""
        raise NotImplementedError

    # -- exact hypergradients on demand --------------------------------------------------------

    def compute_hypergradients(self, host: Host, val_closure: Closure) -> None:
        """Record the hypergradients at the current point, without a hyper-step."""
        raise RuntimeError(
            f"compute_hypergradients() needs a method with schedules, not method={self.name!r}"
        )

    def memory(self) -> int:
        """Bytes the method keeps between steps beyond the optimizer's state (tangents)."""
        return 0

    # -- state ------------------------------------------------------------------------------

    def restart(self, learned: list[dict[str, LearnedValue]]) -> None:
        """torch's own state dict was loaded: restart from the loaded learned values."""
        return None

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse, before anything loads, a state the method cannot take."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], params: list[list[Tensor]]) -> None:
        """Load :meth:`state_dict`'s output; ``params``: each group's parameters (to move
        tensors to their device and dtype, as torch does with optimizer state)."""
        return None
