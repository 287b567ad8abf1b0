r"""Reversible learning: exact reverse-mode hypergradients through a whole episode, by running
training backwards (Maclaurin, Duvenaud & Adams 2015, arXiv 1502.03492).

The ``T`` steps of an episode are torch's SGD with momentum (dampening, weight decay,
``maximize``; not Nesterov), run in exact fixed-point arithmetic:

.. math::

    \hat g_t = \sigma\nabla L_t(w_t) + \xi_k w_t,\quad
    b_{t+1} = \mu_k b_t + (1-\tau)\hat g_t\ (b_1 = \hat g_0),\quad
    w_{t+1} = w_t - \eta_k b_{t+1},

with :math:`k = k(t)` the window of step ``t``.  ``w`` and ``b`` are held as integers
``W = w\cdot 2^{52}`` (int64, so ``|w|, |b| < 2^{11}``).  Adding a rounded float to an integer
and subtracting the same float again is exact, so every part of the step is invertible given
``w_{t+1}`` and ``b_{t+1}`` — ``w_t = w_{t+1} + \eta_k b_{t+1}`` and the batch's gradient at
``w_t`` is recomputed — except the multiplication by the momentum, which rounds.  The momentum
a step uses is the rational :math:`\mu = n/d` with ``d = 2^16`` and ``n = round(μ d)`` in
``[1, d]`` (the learned value, whatever window it comes from, quantised to 16 bits), and the
product :math:`B\cdot n/d` is made exactly invertible by an *information buffer* ``Q`` per
element, an unbounded natural number:

* forward: ``q, x = divmod(B, d)``; ``r = Q mod n``, ``Q ← Q div n`` (pop a digit in base
  ``n``); ``y = x n + r``; ``Q ← Q d + (y mod d)`` (push a digit in base ``d``);
  ``B' = q n + y div d``, which is ``B n/d`` rounded to the grid;
* backward: ``q, h = divmod(B', n)``; pop ``l`` in base ``d``; ``y = h d + l``; push
  ``y mod n`` in base ``n``; ``B = q d + y div n``.

Each step adds about :math:`\log_2(1/\mu)` bits to ``Q`` (0.15 at ``μ = 0.9``), which is what
the reversal must keep; the weights, the velocity and ``Q`` return exactly to where the episode
began.  ``Q`` is held in limbs of 47 bits (int64), as many per element as its bound needs.

The reverse pass accumulates, from ``dw = ∇L_V(w_T)`` and ``db = 0``, for ``t = T-1, …, 0``:

.. math::

    \partial\eta_k \mathrel{+}= -\langle dw, b_{t+1}\rangle,\quad
    \bar b = db - \eta_k\,dw,\quad
    \partial\mu_k \mathrel{+}= \langle \bar b, b_t\rangle,\quad
    \bar g = (1-\tau)\bar b,\quad
    \partial\xi_k \mathrel{+}= \langle \bar g, w_t\rangle,

    db \leftarrow \mu_k \bar b,\quad dw \leftarrow dw + \xi_k\bar g + \sigma H_t\bar g,

one Hessian-vector product per step (autograd with a closure that returns the loss, or
differences of gradients with torch's closure).  What remains in ``dw`` is ``dL_V/dw_0``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._checks import check_neumann_steps, check_schedule_options
from .._learned import LearnedValue
from ..schedules import ScheduleOptions, Schedules
from ._base import (
    HVP_PROVIDERS,
    Closure,
    Host,
    HypergradientMethod,
    MethodOptions,
    NaturalHypergradients,
    StepPlan,
)
from .forward import _sign_step
from .hvp import FiniteDifferenceHVP

if TYPE_CHECKING:
    from ..optimizer import HyperOptimizer

__all__ = [
    "DENOMINATOR",
    "FRACTION_BITS",
    "InformationBuffer",
    "ReversibleMode",
    "from_fixed",
    "quantise_momentum",
    "to_fixed",
]

FRACTION_BITS = 52
"""The weights and the velocity are integers in units of ``2^-52``."""
_SCALE = float(2**FRACTION_BITS)
_UNIT = 1.0 / _SCALE
RANGE = 1024.0
"""Every value put into fixed point (a weight, a velocity, a gradient, a weight's change) must
be below this in magnitude: ``2^10 · 2^52`` leaves a bit of headroom below int64's ``2^63``."""
DENOMINATOR_BITS = 16
DENOMINATOR = 1 << DENOMINATOR_BITS
"""The momentum a step uses is ``n / 2^16``."""
LIMB_BITS = 47
"""Bits per int64 limb of the information buffer: a limb times a base up to ``2^16``, plus a
carry, stays below ``2^63``."""
_LIMB_MASK = (1 << LIMB_BITS) - 1
_NARROW = ((torch.int8, 7), (torch.int16, 15), (torch.int32, 31))
"""The types the top limb is held in between operations, with the bits each holds."""


def to_fixed(x: Tensor) -> Tensor:
    """``round(x · 2^52)`` as int64 (``x`` float64, ``|x| < 2^11``)."""
    return torch.round(x * _SCALE).to(torch.int64)


def from_fixed(x: Tensor) -> Tensor:
    """``x · 2^-52`` in float64 (rounded to 53 bits where ``|x| ≥ 2^53``: deterministic)."""
    return x.to(torch.float64) * _UNIT


def quantise_momentum(momentum: float) -> int:
    """``n`` of the momentum ``n / 2^16`` a step uses: ``round(μ 2^16)`` in ``[1, 2^16]``."""
    return min(DENOMINATOR, max(1, round(momentum * DENOMINATOR)))


class InformationBuffer:
    """One unbounded natural number per element, in limbs of :data:`LIMB_BITS` bits.

    ``push(x, base)``: ``Q ← Q·base + x`` (``0 ≤ x < base``); ``pop(base)``: returns
    ``Q mod base`` and sets ``Q ← Q div base``.  ``bound`` is an exact host-side bound on
    every element, which decides how many limbs are kept (no synchronisation), and the
    integer type of the top one between operations (int8 to int64).
    """

    def __init__(self, numel: int, device: torch.device) -> None:
        self.numel = numel
        self.device = device
        self.limbs: list[Tensor] = []  # least significant first
        #: an exact bound on every element, ``Q <= bound``, kept on the host as a Python
        #: integer: the worst case of the pushes and pops so far
        self.bound = 0

    @property
    def bits(self) -> int:
        """Bits that hold the largest ``Q`` possible."""
        return self.bound.bit_length()

    def _grow(self) -> None:
        while len(self.limbs) * LIMB_BITS < self.bits:
            self.limbs.append(torch.zeros(self.numel, dtype=torch.int64, device=self.device))

    def _trim(self) -> None:
        while self.limbs and (len(self.limbs) - 1) * LIMB_BITS >= self.bits:
            self.limbs.pop()  # zero: below the bound

    def _unpack(self) -> None:
        if self.limbs and self.limbs[-1].dtype != torch.int64:
            self.limbs[-1] = self.limbs[-1].to(torch.int64)

    def _pack(self) -> None:
        """Hold the top limb in the narrowest integer type its bound fits (between steps the
        top limb is often far from full: 15 bits of a 47-bit limb at momentum 0.9 after 100
        steps)."""
        if not self.limbs:
            return
        top = self.bits - LIMB_BITS * (len(self.limbs) - 1)
        for dtype, bits in _NARROW:
            if top <= bits:
                self.limbs[-1] = self.limbs[-1].to(dtype)
                return

    def push(self, x: Tensor, base: int) -> None:
        if base == 1:
            return
        self._unpack()
        self.bound = self.bound * base + base - 1
        self._grow()
        carry = x
        for i, limb in enumerate(self.limbs):
            t = limb * base + carry
            self.limbs[i] = t & _LIMB_MASK
            carry = t >> LIMB_BITS
        self._pack()

    def pop(self, base: int) -> Tensor:
        rest = torch.zeros(self.numel, dtype=torch.int64, device=self.device)
        if base == 1:
            return rest
        self._unpack()
        for i in range(len(self.limbs) - 1, -1, -1):
            t = rest * (1 << LIMB_BITS) + self.limbs[i]
            q = torch.div(t, base, rounding_mode="floor")
            rest = t - q * base
            self.limbs[i] = q
        self.bound //= base
        self._trim()
        self._pack()
        return rest

    def is_zero(self) -> Tensor:
        zero = torch.ones((), dtype=torch.bool, device=self.device)
        for limb in self.limbs:
            zero = zero & (limb == 0).all()
        return zero

    def nbytes(self) -> int:
        return sum(limb.numel() * limb.element_size() for limb in self.limbs)

    def state_dict(self) -> dict[str, Any]:
        return {"limbs": [x.clone() for x in self.limbs], "bound": self.bound}

    @classmethod
    def from_state(cls, state: dict[str, Any], numel: int, device: torch.device) -> Any:
        buffer = cls(numel, device)
        buffer.limbs = [x.to(device=device).clone() for x in state["limbs"]]
        buffer.bound = int(state["bound"])
        return buffer


def multiply(b: Tensor, n: int, buffer: InformationBuffer) -> Tensor:
    """``B n / 2^16`` rounded to the grid, exactly invertible by :func:`divide` with ``buffer``."""
    if n == DENOMINATOR:
        return b
    q = b >> DENOMINATOR_BITS  # floor division by 2^16 (arithmetic shift)
    x = b & (DENOMINATOR - 1)
    y = x * n + buffer.pop(n)
    buffer.push(y & (DENOMINATOR - 1), DENOMINATOR)
    return q * n + (y >> DENOMINATOR_BITS)


def divide(b: Tensor, n: int, buffer: InformationBuffer) -> Tensor:
    """The inverse of :func:`multiply`."""
    if n == DENOMINATOR:
        return b
    q = torch.div(b, n, rounding_mode="floor")
    high = b - q * n
    y = high * DENOMINATOR + buffer.pop(DENOMINATOR)
    x = torch.div(y, n, rounding_mode="floor")
    buffer.push(y - x * n, n)
    return q * DENOMINATOR + x


def _checksum(w: Tensor) -> Tensor:
    """Four exact, order-free sums of 16-bit pieces of ``w`` (int64)."""
    return torch.stack([((w >> s) & 0xFFFF).sum() for s in (0, 16, 32, 48)])


@dataclass
class _Hyper:
    """What one parameter's update used on one step."""

    lr: float
    n: int  # momentum n / 2^16
    weight_decay: float
    dampening: float  # the factor on the gradient: 1 on the first update, else 1 - dampening
    sign: float  # -1 with maximize
    window: int
    #: the parameter's first update of the episode: its velocity is zero (torch's buffer is
    #: created from this gradient), so there is no momentum product to undo
    first: bool = False


@dataclass
class _Episode:
    """The fixed-point state of the episode, per trainable parameter (flattened)."""

    params: list[Tensor]
    w: list[Tensor]
    b: list[Tensor]
    buffers: list[InformationBuffer]
    checksum: list[Tensor]
    #: per step: the training loss seen, and per parameter what its update used (None: it
    #: had no gradient and stood still)
    losses: list[float] = field(default_factory=list)
    hypers: list[list[_Hyper | None]] = field(default_factory=list)
    #: per parameter: whether it has been updated in this episode
    started: list[bool] = field(default_factory=list)


@dataclass
class _Reverse:
    """A reverse pass under way: the adjoints and the sums so far; ``t`` is the next step to
    undo."""

    t: int
    dw: list[Tensor]
    db: list[Tensor]
    sums: list[dict[str, list[Tensor]]]
    validation_loss: float
    finite: bool
    #: (trainable index, name) -> (group index, index of the learned value)
    where: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)


class ReversibleMode(HypergradientMethod):
    """``method="reversible"``: exact reverse-mode hypergradients of schedules over an episode
    (Maclaurin et al. 2015), by running training backwards in exact arithmetic.

    Args:
        options: the schedules' horizon and windows (episodic only) and backtracking.
    """

    options = ("horizon", "windows", "mode", "backtrack")
    hvp_providers = HVP_PROVIDERS
    auto_differences = "finite_difference"  # the products' errors add up over the episode
    requires_closure = (
        "each step runs in fixed-point arithmetic from the training gradient, and reverse() "
        "recomputes it"
    )
    learns_schedules = True
    restartable = False
    runs_steps = True

    @classmethod
    def from_options(cls, options: MethodOptions) -> ReversibleMode:
        check_neumann_steps(options.neumann_steps, options.method, 0)
        extra = options.extra
        mode = extra.get("mode")
        if mode is not None and mode != "episodic":
            raise ValueError(
                f"method='reversible' runs in mode='episodic' only, got mode={mode!r}: the "
                "reverse pass needs the whole episode, run with schedules that stand still"
            )
        if options.update_interval is not None:
            raise ValueError(
                f"update_interval={options.update_interval!r} does not apply to "
                "method='reversible': the schedules step once per episode, in reverse()"
            )
        schedule, _ = check_schedule_options(
            options.method,
            options.granularity,
            extra.get("horizon"),
            extra.get("windows"),
            "episodic",
            None,
            None,
            extra.get("backtrack"),
            default_update_interval=1,
        )
        return cls(schedule)

    def __init__(self, options: ScheduleOptions) -> None:
        self.schedule: Schedules = Schedules(options, "reversible")
        self.horizon = options.horizon
        self.update_interval = options.horizon
        self.default_hyper_optimizer = _sign_step
        self._episode: _Episode | None = None
        self._reverse: _Reverse | None = None
        self._initial: list[Tensor] | None = None

    def plan(self, step: int) -> StepPlan:
        return StepPlan()

    # -- checks -------------------------------------------------------------------------------

    def check_optimizer(self, opt: HyperOptimizer) -> None:
        """Refuse, at construction, what cannot be run backwards exactly."""
        from ..rules.sgd import SGDRule

        if not isinstance(opt.rule, SGDRule):
            raise ValueError(
                f"method='reversible' is for HyperSGD, not {type(opt).__name__}: Adam's update "
                "divides by a running root mean square of the gradients, whose rounding cannot "
                "be undone exactly; use method='forward' for schedules of Adam"
            )
        if opt._best is not None:
            raise ValueError(
                "keep_best=True is not available with method='reversible': the weights are "
                "run back to where the episode began"
            )
        if opt.grad_scaler is not None:
            raise ValueError(
                "method='reversible' needs exact gradients in float32 or float64: a grad_scaler "
                "(mixed precision) cannot be used"
            )
        if opt._loss_hyper is not None:
            raise ValueError("method='reversible' does not take loss_hyperparameters")
        for index, group in enumerate(opt.param_groups):
            self.check_group(opt, group, index)

    def check_group(self, opt: HyperOptimizer, group: dict[str, Any], index: int) -> None:
        where = f"param group {index}"
        if group.get("nesterov"):
            raise ValueError(
                f"method='reversible' cannot run Nesterov momentum backwards ({where}): its "
                "step from w_t reads the gradient at w_t itself, which is unknown until w_t is"
            )
        learned = index < len(opt._hyper.groups) and "momentum" in opt._hyper.groups[index]
        momentum = group.get("momentum", 0.0)
        if not learned and not 0.0 < float(momentum) <= 1.0:
            raise ValueError(
                f"method='reversible' needs momentum in (0, 1] ({where} has {momentum!r}): a "
                "step undone divides the velocity by the momentum"
            )
        for p in group["params"]:
            if p.dtype not in (torch.float32, torch.float64):
                raise ValueError(
                    f"method='reversible' needs float32 or float64 parameters ({where} has one "
                    f"of dtype {p.dtype}): half precision's gradients are not exact enough to "
                    "run back through"
                )

    # -- the forward steps ----------------------------------------------------------------------

    def run_step(self, opt: HyperOptimizer, closure: Closure) -> Any:
        """One step of the episode in fixed-point arithmetic; returns the closure's loss."""
        if self._reverse is not None:
            raise RuntimeError(
                "a reverse pass is under way (an earlier reverse() raised): call reverse() "
                "again with the right closure_at to finish it before stepping"
            )
        episode = self._episode
        t = 0 if episode is None else len(episode.losses)
        if t >= self.horizon:
            raise RuntimeError(
                f"the episode's {self.horizon} steps (horizon) are done: call "
                "opt.reverse(val_closure, closure_at) before the next step"
            )
        if opt._closures.replicas is not None:
            raise ValueError("method='reversible' does not support data-parallel training yet")
        host = opt._hyper
        self.schedule.position = t
        window = self.schedule.enter_step(host, host.take_external_writes())
        trainable = opt._trainable()
        if episode is None:
            for index, group in enumerate(opt.param_groups):
                self.check_group(opt, group, index)
            episode = self._start(trainable)
        elif [id(p) for p in episode.params] != [id(p) for p in trainable]:
            raise RuntimeError(
                "the trainable parameters changed in the middle of an episode of "
                "method='reversible'"
            )
        loss = _evaluate(opt, closure, trainable)
        value = _loss_value(loss)
        hypers = self._hypers(opt, trainable, t, window)
        with torch.no_grad():
            updates: list[Tensor | None] = [
                None if h is None else _decayed(episode.params[j], h) for j, h in enumerate(hypers)
            ]
            _check_range([g for g in updates if g is not None], "a gradient")
            moves: list[tuple[int, Tensor, Tensor]] = []  # (j, b_{t+1}, eta b_{t+1})
            for j, (h, g) in enumerate(zip(hypers, updates, strict=True)):
                if h is None or g is None:
                    continue
                b = episode.b[j]
                if not h.first:
                    b = multiply(b, h.n, episode.buffers[j])
                b = b + to_fixed(g)
                moves.append((j, b, h.lr * from_fixed(b)))
            # one check (one synchronisation) for the whole step, before any weight moves
            _check_range(
                [x for _, b, step in moves for x in (step, from_fixed(b))],
                "the velocity or a weight's change",
            )
            for j, b, step in moves:
                episode.started[j] = True
                episode.b[j] = b
                episode.w[j] = episode.w[j] - to_fixed(step)
                _write(episode.params[j], episode.w[j])
        episode.losses.append(value)
        episode.hypers.append(hypers)
        host.counters["step"] += 1
        self.schedule.position = t + 1
        return loss

    def _start(self, trainable: list[Tensor]) -> _Episode:
        with torch.no_grad():
            flat = [p.detach().reshape(-1).to(torch.float64) for p in trainable]
            _check_range(flat, "a weight")
            w = [to_fixed(x) for x in flat]
            for p, x in zip(trainable, w, strict=True):  # onto the grid
                _write(p, x)
        episode = _Episode(
            params=list(trainable),
            w=w,
            b=[torch.zeros_like(x) for x in w],
            buffers=[InformationBuffer(x.numel(), x.device) for x in w],
            checksum=[_checksum(x) for x in w],
            started=[False] * len(w),
        )
        self._episode = episode
        self._initial = None
        return episode

    def _hypers(
        self, opt: HyperOptimizer, trainable: list[Tensor], t: int, window: int
    ) -> list[_Hyper | None]:
        """What each trainable parameter's update uses on step ``t`` (``None``: no gradient)."""
        by_id: dict[int, _Hyper | None] = {}
        for index, group in enumerate(opt.param_groups):
            indices = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            hp = opt._hyper_values(index, indices)
            for k, i in enumerate(indices):

                def value(name: str, k: int = k, hp: dict[str, Any] = hp) -> float:
                    x = hp[name]
                    return float(x) if isinstance(x, float | int) else float(x[k])

                by_id[id(group["params"][i])] = _Hyper(
                    lr=value("lr"),
                    n=quantise_momentum(value("momentum")),
                    weight_decay=value("weight_decay"),
                    dampening=1.0 - float(group["dampening"]),
                    sign=-1.0 if group["maximize"] else 1.0,
                    window=window,
                )
        hypers = [by_id.get(id(p)) for p in trainable]
        episode = self._episode
        assert episode is not None
        for j, h in enumerate(hypers):
            if h is not None and not episode.started[j]:
                h.first, h.dampening = True, 1.0
        return hypers

    # -- the reverse pass -------------------------------------------------------------------------

    def reverse(
        self, opt: HyperOptimizer, val_closure: Closure, closure_at: Callable[[int], Closure]
    ) -> None:
        """Run the episode backwards to its start, accumulating the hypergradients; then step
        the schedules (see :meth:`HyperOptimizer.reverse`)."""
        episode = self._episode
        steps = 0 if episode is None else len(episode.losses)
        if episode is None or steps < self.horizon:
            raise RuntimeError(
                f"reverse() needs a complete episode: {steps} of its {self.horizon} steps "
                "(horizon) were taken"
            )
        host = opt._hyper
        if self._reverse is None:
            self._reverse = self._begin_reverse(host, episode, val_closure)
        rev = self._reverse
        rev.where = self._where(opt)
        trainable = episode.params
        with torch.no_grad():
            for t in range(rev.t, -1, -1):
                self._undo(opt, episode, rev, t, closure_at(t))
                rev.t = t - 1
        ok = [bool(buffer.is_zero()) for buffer in episode.buffers]
        same = [
            bool((_checksum(w) == c).all()) and not bool(b.any())
            for w, b, c in zip(episode.w, episode.b, episode.checksum, strict=True)
        ]
        self._reverse = None
        self._episode = None
        if not (all(ok) and all(same)):
            raise RuntimeError(
                "the reverse pass did not come back exactly to the episode's first weights: "
                "the training closure is not deterministic (use "
                "torch.use_deterministic_algorithms(True) and the same batches)"
            )
        self._initial = [d.reshape(p.shape).clone() for d, p in zip(rev.dw, trainable, strict=True)]
        natural = self._natural(host, rev) if rev.finite else None
        if natural is not None:
            host.record_hypergradients(natural)
        loss = rev.validation_loss

        def validation() -> Tensor:
            return torch.tensor(loss, dtype=torch.float64)

        self.schedule.position = self.horizon - 1
        self.schedule.hyper_step(host, self.schedule.window(), lambda: natural, validation)
        self.schedule.advance()
        opt.state.clear()

    def _begin_reverse(self, host: Host, episode: _Episode, val_closure: Closure) -> _Reverse:
        loss = host.shared_validation_loss(val_closure)
        grads = host.validation_gradient(val_closure, episode.params)
        finite = grads is not None
        found: list[Tensor | None] = list(grads) if grads is not None else [None] * len(episode.w)
        dw = [
            (torch.zeros_like(w, dtype=torch.float64) if g is None else g.detach().reshape(-1))
            .to(torch.float64)
            .clone()
            for w, g in zip(episode.w, found, strict=True)
        ]
        device = episode.params[0].device if episode.params else torch.device("cpu")
        sums = [
            {
                name: [
                    torch.zeros(self.schedule.windows, dtype=torch.float64, device=device)
                    for _ in lv.phi
                ]
                for name, lv in learned.items()
            }
            for learned in host.learned
        ]
        return _Reverse(
            t=self.horizon - 1,
            dw=dw,
            db=[torch.zeros_like(x) for x in dw],
            sums=sums,
            validation_loss=loss,
            finite=finite,
        )

    def _undo(
        self, opt: HyperOptimizer, episode: _Episode, rev: _Reverse, t: int, closure: Closure
    ) -> None:
        """Step ``t`` backwards: ``w_t``, the gradient there, ``b_t``; the adjoints through it."""
        hypers = episode.hypers[t]
        trainable = episode.params
        moved = []
        for j, h in enumerate(hypers):
            if h is None:
                continue
            step = to_fixed(h.lr * from_fixed(episode.b[j]))
            episode.w[j] = episode.w[j] + step
            _write(trainable[j], episode.w[j])
            moved.append((j, step))
        with torch.enable_grad():
            loss = _evaluate(opt, closure, trainable)
        seen = _loss_value(loss)
        had = [p.grad is not None for p in trainable]
        if seen != episode.losses[t] or had != [h is not None for h in hypers]:
            for j, step in moved:  # back to w_{t+1}: a reverse() with the right closure resumes
                episode.w[j] = episode.w[j] - step
                _write(trainable[j], episode.w[j])
            raise ValueError(
                f"closure_at({t}) is not step {t}'s training closure: its loss at the recomputed "
                f"weights (known exactly) is {seen!r}, going forward it was "
                f"{episode.losses[t]!r}; closure_at(t) must evaluate the same batch as step t's "
                "closure did (reverse() can be called again to resume)"
            )
        grads = [p.grad.detach().clone() if p.grad is not None else None for p in trainable]
        b_after = [from_fixed(b) for b in episode.b]
        directions: list[Tensor] = []
        live = []
        for j, h in enumerate(hypers):
            if h is None:
                continue
            p, g = trainable[j], grads[j]
            assert g is not None
            fixed_g = to_fixed(_decayed(p, h, g))
            b = episode.b[j] - fixed_g
            episode.b[j] = b if h.first else divide(b, h.n, episode.buffers[j])
            # the adjoints, in float64
            mu = h.n / DENOMINATOR
            a = rev.dw[j]
            w_t = p.detach().reshape(-1).to(torch.float64)
            b_t = from_fixed(episode.b[j])
            bar_b = rev.db[j] - h.lr * a
            bar_g = h.dampening * bar_b
            self._add(opt, j, h.window, "lr", -torch.dot(a, b_after[j]), rev)
            self._add(opt, j, h.window, "momentum", torch.dot(bar_b, b_t), rev)
            self._add(opt, j, h.window, "weight_decay", torch.dot(bar_g, w_t), rev)
            rev.db[j] = mu * bar_b
            rev.dw[j] = a + h.weight_decay * bar_g
            directions.append((h.sign * bar_g).reshape(p.shape).to(p.dtype))
            live.append(j)
        products = _products(opt, closure, trainable, grads, live, directions, episode)
        for j, hv in zip(live, products, strict=True):
            rev.dw[j] = rev.dw[j] + hv.reshape(-1).to(torch.float64)

    def _add(
        self, opt: HyperOptimizer, j: int, window: int, name: str, x: Tensor, rev: _Reverse
    ) -> None:
        """Add ``x`` to window ``window`` of the sum of learned ``name`` that parameter ``j``'s
        update read (if it is learned)."""
        where = rev.where.get((j, name))
        if where is None:
            return
        group, value = where
        rev.sums[group][name][value][window] += x.to(rev.sums[group][name][value].device)

    def _where(self, opt: HyperOptimizer) -> dict[tuple[int, str], tuple[int, int]]:
        """(trainable index, name) -> (group index, index of the learned value)."""
        out: dict[tuple[int, str], tuple[int, int]] = {}
        position = {id(p): j for j, p in enumerate(opt._trainable())}
        for index, (group, learned) in enumerate(
            zip(opt.param_groups, opt._hyper.groups, strict=True)
        ):
            for i, p in enumerate(group["params"]):
                j = position.get(id(p))
                if j is None:
                    continue
                for name, lv in learned.items():
                    out[(j, name)] = (index, 0 if lv.granularity == "scalar" else i)
        return out

    def _natural(self, host: Host, rev: _Reverse) -> NaturalHypergradients:
        return [
            {
                name: [x.to(v.device, copy=True) for x, v in zip(xs, values[name], strict=True)]
                for name, xs in sums.items()
            }
            for sums, values in zip(rev.sums, self.schedule.values, strict=True)
        ]

    # -- what the optimizer exposes -------------------------------------------------------------

    def initial_weight_hypergradients(self) -> list[Tensor]:
        if self._initial is None:
            raise RuntimeError(
                "initial_weight_hypergradients() is known after a reverse pass: call "
                "opt.reverse(val_closure, closure_at) at the end of an episode first"
            )
        return [x.clone() for x in self._initial]

    def compute_hypergradients(self, host: Host, val_closure: Closure) -> None:
        raise RuntimeError(
            "method='reversible' computes hypergradients by running the episode backwards: "
            "call opt.reverse(val_closure, closure_at) at the end of the episode"
        )

    def add_group(self, host: Host, index: int) -> None:
        if self._episode is not None:
            raise RuntimeError(
                "method='reversible' can take a new param group only between episodes"
            )
        self.schedule.add_group(host.learned[index])

    def stepped_values(self, index: int, learned: dict[str, LearnedValue]) -> list[Tensor]:
        return self.schedule.stepped_values(index, learned)

    def zero_hypergradients(
        self, index: int, learned: dict[str, LearnedValue]
    ) -> dict[str, list[Tensor]]:
        return self.schedule.zero_hypergradients(index)

    def memory(self) -> int:
        """Bytes kept for the reversal: the fixed-point weights and velocity, the information
        buffers, and per step the loss and what the update used."""
        episode = self._episode
        if episode is None:
            return 0
        fixed = sum(x.numel() * 8 for x in episode.w) * 2
        return fixed + self.buffer_memory() + 8 * len(episode.losses)

    def buffer_memory(self) -> int:
        """Bytes of the information buffers alone."""
        episode = self._episode
        return 0 if episode is None else sum(b.nbytes() for b in episode.buffers)

    # -- state --------------------------------------------------------------------------------

    def restart(self, learned: list[dict[str, LearnedValue]]) -> None:
        self._episode = None
        self._reverse = None
        self.schedule.restart(learned)
        self.schedule.position = 0
        self.schedule.loaded_window = None

    def check_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.check_state_dict(state.get("schedule"))
        if "episode" not in state:
            raise ValueError("the state dict was not saved by method='reversible'")

    def state_dict(self) -> dict[str, Any]:
        episode = self._episode
        saved: dict[str, Any] | None = None
        if episode is not None:
            saved = {
                "w": [x.clone() for x in episode.w],
                "b": [x.clone() for x in episode.b],
                "buffers": [b.state_dict() for b in episode.buffers],
                "checksum": [x.clone() for x in episode.checksum],
                "losses": list(episode.losses),
                "started": list(episode.started),
                "hypers": [
                    [None if h is None else dict(vars(h)) for h in step] for step in episode.hypers
                ],
            }
        rev = self._reverse
        return {
            "schedule": self.schedule.state_dict(),
            "episode": saved,
            "reverse": None
            if rev is None
            else {
                "t": rev.t,
                "dw": [x.clone() for x in rev.dw],
                "db": [x.clone() for x in rev.db],
                "sums": [{k: [x.clone() for x in v] for k, v in s.items()} for s in rev.sums],
                "validation_loss": rev.validation_loss,
                "finite": rev.finite,
            },
            "initial": None if self._initial is None else [x.clone() for x in self._initial],
        }

    def load_state_dict(self, state: dict[str, Any], params: list[list[Tensor]]) -> None:
        self.schedule.load_state_dict(state["schedule"])
        trainable = [p for group in params for p in group if p.requires_grad]
        saved = state["episode"]
        self._episode = None
        if saved is not None:
            if len(saved["w"]) != len(trainable):
                raise ValueError(
                    f"the state dict's episode has {len(saved['w'])} trainable parameters, "
                    f"this optimizer {len(trainable)}"
                )
            devices = [p.device for p in trainable]
            self._episode = _Episode(
                params=list(trainable),
                w=[x.to(d) for x, d in zip(saved["w"], devices, strict=True)],
                b=[x.to(d) for x, d in zip(saved["b"], devices, strict=True)],
                buffers=[
                    InformationBuffer.from_state(s, p.numel(), p.device)
                    for s, p in zip(saved["buffers"], trainable, strict=True)
                ],
                checksum=[x.to(d) for x, d in zip(saved["checksum"], devices, strict=True)],
                losses=[float(x) for x in saved["losses"]],
                started=[bool(x) for x in saved["started"]],
                hypers=[
                    [None if h is None else _Hyper(**h) for h in step] for step in saved["hypers"]
                ],
            )
            with torch.no_grad():
                for p, w in zip(trainable, self._episode.w, strict=True):
                    _write(p, w)
        rev = state.get("reverse")
        self._reverse = None
        if rev is not None:
            self._reverse = _Reverse(
                t=int(rev["t"]),
                dw=[x.clone() for x in rev["dw"]],
                db=[x.clone() for x in rev["db"]],
                sums=[{k: [x.clone() for x in v] for k, v in s.items()} for s in rev["sums"]],
                validation_loss=float(rev["validation_loss"]),
                finite=bool(rev["finite"]),
            )
        initial = state.get("initial")
        self._initial = None if initial is None else [x.clone() for x in initial]


# -- helpers --------------------------------------------------------------------------------------


def _write(p: Tensor, w: Tensor) -> None:
    with torch.no_grad():
        p.copy_(from_fixed(w).view(p.shape))


def _decayed(p: Tensor, h: _Hyper, g: Tensor | None = None) -> Tensor:
    """``(1-τ)(σ g + ξ w)`` in float64, flattened (torch's order: decay, then the factor)."""
    grad = p.grad if g is None else g
    assert grad is not None
    x = grad.detach().reshape(-1).to(torch.float64) * h.sign
    if h.weight_decay != 0:
        x = x + h.weight_decay * p.detach().reshape(-1).to(torch.float64)
    if h.dampening != 1.0:
        x = x * h.dampening
    return x


def _check_range(xs: list[Tensor], what: str) -> None:
    if not xs:
        return
    largest = (
        float(torch.stack([x.abs().max() for x in xs if x.numel()]).max())
        if any(x.numel() for x in xs)
        else 0.0
    )
    if not largest < RANGE:
        raise FloatingPointError(
            f"method='reversible': {what} reached {largest!r}, outside the fixed-point range "
            f"(|x| < {RANGE:g}): the run diverged, or the model needs rescaling"
        )


def _loss_value(loss: Any) -> float:
    if isinstance(loss, Tensor):
        return float(loss.detach().to(torch.float64))
    return float(loss)


def _evaluate(opt: HyperOptimizer, closure: Closure, trainable: list[Tensor]) -> Any:
    """The training loss and its gradient in ``.grad``, the same way forwards and backwards."""
    for p in trainable:
        p.grad = None
    return opt._closures.run(closure, None, trainable, False)


def _products(
    opt: HyperOptimizer,
    closure: Closure,
    trainable: list[Tensor],
    grads: list[Tensor | None],
    live: list[int],
    directions: list[Tensor],
    episode: _Episode,
) -> list[Tensor]:
    """``H_t d`` at ``w_t`` (the live weights) on step ``t``'s batch, for the parameters
    ``live``: autograd with a closure that returns the loss, else differences of gradients."""
    if not live:
        return []
    params = [trainable[j] for j in live]
    closures = opt._closures
    hvp = opt.hvp
    loss_only = closures._loss_only
    if hvp == "autograd" and not loss_only:
        raise RuntimeError(
            "hvp='autograd' needs a closure that returns the loss without calling backward(); "
            "use hvp='finite_difference' with torch's ordinary closure"
        )
    if loss_only and hvp in ("auto", "autograd"):
        with torch.enable_grad():
            loss = closure()
            first: list[Tensor | None] = list(
                torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            )
            pairs = [(g, d) for g, d in zip(first, directions, strict=True) if g is not None]
            out: list[Tensor | None] = [None] * len(params)
            if pairs:
                out = list(
                    torch.autograd.grad(
                        [g for g, _ in pairs], params, [d for _, d in pairs], allow_unused=True
                    )
                )
        return [
            torch.zeros_like(p) if x is None else x.detach()
            for p, x in zip(params, out, strict=True)
        ]

    def gradient() -> list[Tensor]:
        _evaluate(opt, closure, trainable)
        found = [trainable[j].grad for j in live]
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, found, strict=True)]

    def restore() -> None:
        for j in live:
            _write(trainable[j], episode.w[j])

    at_point = [g for g in (grads[j] for j in live) if g is not None]  # live: all have one
    products = FiniteDifferenceHVP(
        params,
        [p.detach().clone() for p in params],
        at_point,
        gradient,
        central=hvp != "forward_difference",
        restore=restore,
    )
    result = products(directions)
    restore()
    for p, g in zip(trainable, grads, strict=True):
        p.grad = g
    return [x.detach() for x in result]
