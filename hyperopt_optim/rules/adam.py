r"""Adam and AdamW, as ``torch.optim.Adam`` / ``torch.optim.AdamW`` compute them.

With :math:`\sigma = -1` when maximizing (else 1), step count :math:`t` (after increment),
coupled weight decay :math:`\xi_c` (Adam) or decoupled :math:`\xi_d` (AdamW):

.. math::

    \tilde w = (1 - \eta\xi_d) w,\quad \hat g = \sigma g + \xi_c w,\quad
    m' = \beta_1 m + (1-\beta_1)\hat g,\quad v' = \beta_2 v + (1-\beta_2)\hat g^2,\\
    \bar v' = \max(\bar v, v') \text{ (AMSGrad, else } \bar v' = v'),\quad
    q = \sqrt{\bar v' / (1-\beta_2^t)},\quad D = q + \epsilon,\quad
    w' = \tilde w - \eta\, \frac{m'}{(1-\beta_1^t) D}.

Closed-form products for a cotangent :math:`(a_w, a_m, a_v, a_{\bar v})`, with
:math:`k = \eta m' / ((1-\beta_1^t) D^2)` and :math:`\partial q/\partial \bar v' = 1/(2\sqrt{\bar v'
(1-\beta_2^t)})` (taken as 0 where :math:`\bar v' = 0`):
:math:`c_m = a_m - a_w \eta/((1-\beta_1^t)D)`, :math:`c_{\bar v} = a_{\bar v} + a_w k\,
\partial q/\partial \bar v'`, routed to :math:`v'` where :math:`v' > \bar v` (else to the old
:math:`\bar v`), :math:`c_{\hat g} = (1-\beta_1) c_m + 2(1-\beta_2)\hat g\, c_v`; then
:math:`a·∂U/∂w = (1-\eta\xi_d) a_w + \xi_c c_{\hat g}`, :math:`a·∂U/∂m = \beta_1 c_m`,
:math:`a·∂U/∂v = \beta_2 c_v`, :math:`r = \sigma c_{\hat g}`.  For the hyperparameters:
:math:`∂w'/∂\eta = -\xi_d w - m'/((1-\beta_1^t)D)`, :math:`∂w'/∂\epsilon = k`,
:math:`a·∂U/∂\beta_1 = c_m (m - \hat g) - a_w \eta m' t \beta_1^{t-1} / ((1-\beta_1^t)^2 D)`,
:math:`a·∂U/∂\beta_2 = c_v (v - \hat g^2) + a_w k q t \beta_2^{t-1} / (2(1-\beta_2^t))` — the
bias-correction terms are the part of β's gradient that ``higher`` drops.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

from ._base import (
    Hyper,
    Parametrisation,
    RuleState,
    StateCotangent,
    add_scaled,
    as_list,
    inner,
    is_zero,
    one_minus,
    present,
    sums_by_inner_products,
)

__all__ = ["AdamRule"]

_M, _V, _VMAX, _STEP = "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"


@dataclass
class _Linear:
    """What :meth:`AdamRule.state_vjp` needs of one parameter's step at a point, kept across
    the products taken there (the Neumann series' terms, forward mode's Jacobian blocks):
    ``a·∂m'/∂…`` through the step is ``−a·η/(bc1 D)`` (``step_coef``), ``a·∂v'/∂…`` is
    ``a·k·∂q/∂v'`` (``second_coef``), and ``ĝ`` enters the cotangent of the gradient as
    ``2(1−β₂)ĝ`` (``g_hat_2``)."""

    step_coef: Tensor
    second_coef: Tensor
    g_hat_2: Tensor
    to_new: Tensor | None  # AMSGrad: where v' became the maximum
    b1: Tensor | float
    b2: Tensor | float
    lr: Tensor | float
    wd: Tensor | float


@dataclass
class _Point:
    """One parameter's step at the point: its :class:`_Linear` part and what the hyper
    products read besides."""

    linear: _Linear
    g_hat: Tensor
    new_m: Tensor
    bc1: Tensor | float
    denom: Tensor  # D
    q: Tensor
    k: Tensor  # η m' / (bc1 D²)
    step: float


@dataclass
class _Backward:
    """One parameter's point and its cotangents (see the module docstring)."""

    point: _Point
    cot_m: Tensor  # c_m
    cot_v: Tensor  # c_v, cotangent of v'
    cot_vmax_old: Tensor | None
    cot_g_hat: Tensor


def _forward_one(
    w: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    vmax: Tensor | None,
    t: float,
    lr: Tensor | float,
    b1: Tensor | float,
    b2: Tensor | float,
    eps: Tensor | float,
    wd: Tensor | float,
    *,
    decoupled: bool,
    maximize: bool,
    weights: bool = True,
) -> tuple[
    Tensor | None, Tensor, Tensor, Tensor, Tensor | None, Tensor, Tensor | float, Tensor | float
]:
    """Out-of-place Adam for one parameter: (w', ĝ, m', v', v̄', q, bc1, bc2); ``w'`` is
    ``None`` without ``weights`` (a linearisation reads the rest: five passes fewer)."""
    g = -g if maximize else g
    if decoupled:
        w_tilde, g_hat = w * (1 - lr * wd), g
    else:
        w_tilde, g_hat = w, g + wd * w
    new_m = b1 * m + (1 - b1) * g_hat
    new_v = b2 * v + (1 - b2) * g_hat * g_hat
    new_vmax = None if vmax is None else torch.maximum(vmax, new_v)
    bc1 = 1 - b1**t
    bc2 = 1 - b2**t
    src = new_v if new_vmax is None else new_vmax
    q = src.sqrt() / bc2**0.5
    new_w = w_tilde - lr * new_m / (bc1 * (q + eps)) if weights else None
    return new_w, g_hat, new_m, new_v, new_vmax, q, bc1, bc2


def _g_hat(w: Tensor, g: Tensor, wd: Tensor | float, *, decoupled: bool, maximize: bool) -> Tensor:
    """``ĝ = σg + ξ_c w``: ``g`` itself when that is all it is, else a new tensor."""
    g_hat = -g if maximize else g
    if not decoupled and not _zero(wd):
        g_hat = torch.add(g_hat, w, alpha=wd) if isinstance(wd, float) else g_hat + wd * w
    return g_hat


def _linear_one(
    w: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    t: float,
    lr: Tensor | float,
    b1: float,
    b2: float,
    eps: Tensor | float,
    wd: Tensor | float,
    *,
    decoupled: bool,
    maximize: bool,
) -> _Linear:
    r"""One parameter's :class:`_Linear` without AMSGrad and with β₁, β₂ numbers, in fused
    passes (14 over the parameter without coupled decay, against about 25 for
    :meth:`AdamRule._point`): with :math:`\hat v = v'/(1-\beta_2^t)` made in one
    ``addcmul``, :math:`q = \sqrt{\hat v}`, ``step_coef`` :math:`= \eta/((1-\beta_1^t) D)`
    and, since :math:`\sqrt{v' (1-\beta_2^t)} = q (1-\beta_2^t)`, ``second_coef``
    :math:`= \text{step\_coef}\; m' / (D q) \cdot 1/(2(1-\beta_2^t))` (0 where
    :math:`q = 0`).  The same quantities as ``_point``'s, rounded in another order."""
    g_hat = _g_hat(w, g, wd, decoupled=decoupled, maximize=maximize)
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    q = torch.mul(v, b2 / bc2).addcmul_(g_hat, g_hat, value=(1 - b2) / bc2).sqrt_()
    denom = torch.add(q, eps)  # D
    step_coef = torch.reciprocal(denom).mul_(lr / bc1)
    second = torch.lerp(m, g_hat, 1 - b1).mul_(step_coef).div_(denom).div_(q)
    del denom
    second.mul_(0.5 / bc2).masked_fill_(q == 0, 0.0)
    del q
    g_hat_2 = g_hat.mul_(2 * (1 - b2)) if g_hat is not g else g_hat * (2 * (1 - b2))
    return _Linear(step_coef, second, g_hat_2, None, b1, b2, lr, wd)


class AdamRule:
    """The update map of ``torch.optim.Adam`` and ``AdamW`` (maths in the module docstring).

    ``flags``: ``amsgrad``, ``maximize``, ``decoupled_weight_decay`` (bool).  The state holds
    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (AMSGrad only) and ``step``, the
    per-parameter step count as torch keeps it: a 0-dim float tensor, counted before the
    update, not differentiated.
    """

    parametrisation: Mapping[str, Parametrisation] = MappingProxyType(
        {
            "lr": Parametrisation(fraction=False, low=1e-8, high=10.0),
            "beta1": Parametrisation(fraction=True, low=1e-6, high=1 - 1e-6),
            "beta2": Parametrisation(fraction=True, low=1e-6, high=1 - 1e-6),
            "eps": Parametrisation(fraction=False, low=1e-16, high=1.0),
            "weight_decay": Parametrisation(fraction=False, low=1e-10, high=10.0),
        }
    )
    learnable: tuple[str, ...] = tuple(parametrisation)
    state_names: tuple[str, ...] = (_M, _V, _VMAX)

    def init_state(self, params: list[Tensor], flags: dict[str, object]) -> RuleState:
        state: RuleState = {
            _STEP: [torch.tensor(0.0) for _ in params],
            _M: [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params],
            _V: [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params],
        }
        if flags["amsgrad"]:
            state[_VMAX] = [
                torch.zeros_like(p, memory_format=torch.preserve_format) for p in params
            ]
        return state

    def step(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: RuleState,
        hp: dict[str, Hyper],
        flags: dict[str, object],
    ) -> None:
        # torch's arithmetic (its single-tensor Adam, element for element) with foreach kernels;
        # the bias corrections are Python floats per parameter, as torch computes them.
        if not params:
            return
        lr, b1, b2, wd = (hp[k] for k in ("lr", "beta1", "beta2", "weight_decay"))
        steps = present(state[_STEP])
        exp_avgs, exp_avg_sqs = present(state[_M]), present(state[_V])
        torch._foreach_add_(steps, 1)
        ts = [float(s.item()) for s in steps]  # CPU tensors: no device synchronisation
        g: list[Tensor] = list(torch._foreach_neg(grads)) if flags["maximize"] else grads
        if not is_zero(wd):
            if flags["decoupled_weight_decay"]:
                if isinstance(lr, float) and isinstance(wd, float):
                    torch._foreach_mul_(params, 1 - lr * wd)
                else:
                    factors = [
                        1 - x * y
                        for x, y in zip(as_list(lr, params), as_list(wd, params), strict=True)
                    ]
                    torch._foreach_mul_(params, factors)  # type: ignore[arg-type]
            else:
                g = add_scaled(g, params, wd)
        torch._foreach_lerp_(exp_avgs, g, one_minus(b1))
        torch._foreach_mul_(exp_avg_sqs, b2)
        if isinstance(b2, float):
            torch._foreach_addcmul_(exp_avg_sqs, g, g, value=1 - b2)
        else:
            torch._foreach_addcmul_(exp_avg_sqs, torch._foreach_mul(g, one_minus(b2)), g)
        if flags["amsgrad"]:
            torch._foreach_maximum_(present(state[_VMAX]), exp_avg_sqs)
        _move(params, state, hp, flags, ts)

    def can_vjp_after(
        self, names: tuple[str, ...], hp: dict[str, Hyper], flags: dict[str, object]
    ) -> bool:
        """Whether :meth:`hyper_vjp_after` gives ``names``' products: lr and eps act on the
        weights through ``m'`` and ``v'`` alone (AdamW's decay of lr also reads ``w``)."""
        decays = flags["decoupled_weight_decay"] and not is_zero(hp["weight_decay"])
        return set(names) <= {"lr", "eps"} and not ("lr" in names and decays)

    def hyper_vjp_after(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state_after: RuleState,
        hp: dict[str, Hyper],
        flags: dict[str, object],
        cotangent_params: list[Tensor],
        names: tuple[str, ...],
    ) -> dict[str, list[Tensor]]:
        """``a·∂U/∂λ`` for lr and eps from the moments the step left (``m'``, ``v'`` or
        AMSGrad's maximum, the step count after it): :func:`_direct_hyper_vjp`'s closed forms
        on the very tensors it recomputes."""
        if not self.can_vjp_after(names, hp, flags):
            raise ValueError(f"Adam's products from the state after the step do not cover {names}")
        src_name = _VMAX if flags["amsgrad"] else _V
        out: dict[str, list[Tensor]] = {name: [] for name in names}
        for i, a_w in enumerate(cotangent_params):
            t = float(present(state_after[_STEP])[i])
            lr, b1, b2, eps, _ = AdamRule._hyper_at(hp, params, i)
            bc1 = 1 - b1**t
            denom = present(state_after[src_name])[i].sqrt().div_((1 - b2**t) ** 0.5).add_(eps)
            scaled = present(state_after[_M])[i].mul(a_w).div_(denom)
            for name in names:
                out[name].append(-scaled / bc1 if name == "lr" else scaled * (lr / bc1) / denom)
        return out

    def redo(
        self,
        params: list[Tensor],
        point: list[Tensor],
        grads: list[Tensor],
        state_after: RuleState,
        hp: dict[str, Hyper],
        flags: dict[str, object],
    ) -> None:
        """Write into ``params`` the weights :meth:`step` made from ``point``, given the state
        it left (``m'``, ``v'`` and the step count after it): the same operations, so the same
        bits, without a copy of the stepped weights."""
        if not params:
            return
        torch._foreach_copy_(params, point)
        lr, wd = hp["lr"], hp["weight_decay"]
        if not is_zero(wd) and flags["decoupled_weight_decay"]:
            if isinstance(lr, float) and isinstance(wd, float):
                torch._foreach_mul_(params, 1 - lr * wd)
            else:
                factors = [
                    1 - x * y for x, y in zip(as_list(lr, params), as_list(wd, params), strict=True)
                ]
                torch._foreach_mul_(params, factors)  # type: ignore[arg-type]
        ts = [float(s.item()) for s in present(state_after[_STEP])]
        _move(params, state_after, hp, flags, ts)

    def reference(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: RuleState,
        hp: dict[str, Hyper],
        flags: dict[str, object],
    ) -> tuple[list[Tensor], RuleState]:
        amsgrad = bool(flags["amsgrad"])
        out: RuleState = {_STEP: [], _M: [], _V: []}
        if amsgrad:
            out[_VMAX] = []
        new_params = []
        vmaxs = state[_VMAX] if amsgrad else [None] * len(params)
        for i, (w, g) in enumerate(zip(params, grads, strict=True)):
            step = present(state[_STEP])[i]
            new_w, _, m, v, vmax, *_ = _forward_one(
                w, g, present(state[_M])[i], present(state[_V])[i], vmaxs[i],
                float(step) + 1, *self._hyper_at(hp, params, i),
                decoupled=bool(flags["decoupled_weight_decay"]),
                maximize=bool(flags["maximize"]),
            )  # fmt: skip
            assert new_w is not None
            new_params.append(new_w)
            out[_STEP].append(step + 1)
            out[_M].append(m)
            out[_V].append(v)
            if amsgrad:
                out[_VMAX].append(vmax)
        return new_params, out

    @staticmethod
    def _hyper_at(hp: dict[str, Hyper], params: list[Tensor], i: int) -> tuple[Tensor | float, ...]:
        return tuple(
            as_list(hp[k], params)[i] for k in ("lr", "beta1", "beta2", "eps", "weight_decay")
        )

    def _point(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: RuleState,
        hp: dict[str, Hyper],
        flags: dict[str, object],
        i: int,
    ) -> _Point:
        """Parameter ``i``'s step at the point, with what its products read."""
        t = float(present(state[_STEP])[i]) + 1
        lr, b1, b2, eps, wd = self._hyper_at(hp, params, i)
        old_vmax = state[_VMAX][i] if flags["amsgrad"] else None
        _, g_hat, new_m, new_v, new_vmax, q, bc1, bc2 = _forward_one(
            params[i], grads[i], present(state[_M])[i], present(state[_V])[i], old_vmax, t,
            lr, b1, b2, eps, wd, decoupled=bool(flags["decoupled_weight_decay"]),
            maximize=bool(flags["maximize"]), weights=False,
        )  # fmt: skip
        src = new_v if new_vmax is None else new_vmax
        denom = q + eps
        k = lr * new_m / (bc1 * denom * denom)
        dq_dsrc = torch.where(src > 0, 0.5 / (src * bc2).clamp_min(1e-300).sqrt(), 0.0)
        linear = _Linear(
            lr / (bc1 * denom),
            k * dq_dsrc,
            2 * (1 - b2) * g_hat,
            None if old_vmax is None else new_v > old_vmax,
            b1,
            b2,
            lr,
            wd,
        )
        return _Point(linear, g_hat, new_m, bc1, denom, q, k, t)

    def _linear(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: RuleState,
        hp: dict[str, Hyper],
        flags: dict[str, object],
        i: int,
    ) -> _Linear:
        """Parameter ``i``'s :class:`_Linear` at the point: :func:`_linear_one`'s fused passes
        where β₁ and β₂ are plain numbers and AMSGrad is off, else :meth:`_point`'s."""
        lr, b1, b2, eps, wd = self._hyper_at(hp, params, i)
        if flags["amsgrad"] or not isinstance(b1, float) or not isinstance(b2, float):
            return self._point(params, grads, state, hp, flags, i).linear
        return _linear_one(
            params[i], grads[i], present(state[_M])[i], present(state[_V])[i],
            float(present(state[_STEP])[i]) + 1, lr, b1, b2, eps, wd,
            decoupled=bool(flags["decoupled_weight_decay"]), maximize=bool(flags["maximize"]),
        )  # fmt: skip

    def hyper_vjp_sums(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: RuleState,
        hp: dict[str, Hyper],
        flags: dict[str, object],
        cotangent_params: list[Tensor],
        cotangent_state: RuleState,
        names: tuple[str, ...],
        linear: list[_Linear] | None = None,
    ) -> dict[str, list[Tensor]] | None:
        r""":meth:`hyper_vjp` summed over each parameter for the names that act on ``w'``
        alone (lr, eps, AdamW's weight decay), from a kept linearisation and inner products.

        With ``step_coef`` :math:`s = \eta/((1-\beta_1^t) D)` and
        :math:`x = s\,m'` (the step's move, one temporary: ``m'`` made by ``lerp`` and scaled
        in place), :math:`\sum a·∂U/∂\eta = -⟨a_w, x⟩/\eta - \xi_d⟨a_w, w⟩`,
        :math:`\sum a·∂U/\partial\epsilon = ⟨a_w, x s⟩ (1-\beta_1^t)/\eta` (:math:`x/D`) and
        :math:`\sum a·∂U/∂\xi_d = -\eta⟨a_w, w⟩`: three or four passes over a parameter where
        the element-wise products take about ten.  ``None`` (the caller takes those) without a
        linearisation, for other names, for a value per element, for half-precision weights or
        for a fixed ``lr = 0`` (the sums divide by η; a learned η is positive).  0-dim float64
        results; the inner products accumulate in the tensors' dtype, as
        :func:`~.sgd.hyper_dots`'s do."""
        decoupled = bool(flags["decoupled_weight_decay"])
        direct = {"lr", "eps"} | ({"weight_decay"} if decoupled else set())
        if linear is None or not set(names) <= direct or is_zero(hp["lr"]):
            return None
        if not sums_by_inner_products(params, hp):
            return None
        maximize = bool(flags["maximize"])
        out: dict[str, list[Tensor]] = {name: [] for name in names}
        rows = zip(params, grads, present(state[_M]), cotangent_params, linear, strict=True)
        for i, (w, g, m, a_w, f) in enumerate(rows):
            lr, b1, wd = f.lr, f.b1, f.wd
            sums: dict[str, Tensor] = {}
            if "weight_decay" in names or (decoupled and not _zero(wd) and "lr" in names):
                a_w_w = inner(a_w, w)
                sums["weight_decay"] = -lr * a_w_w
            if "lr" in names or "eps" in names:
                g_hat = _g_hat(w, g, wd, decoupled=decoupled, maximize=maximize)
                if isinstance(b1, float):
                    moved = torch.lerp(m, g_hat, 1 - b1)
                else:
                    moved = m + (1 - b1) * (g_hat - m)
                del g_hat
                moved.mul_(f.step_coef)  # x = η m'/(bc1 D)
                if "lr" in names:
                    sums["lr"] = -inner(a_w, moved) / lr
                    if decoupled and not _zero(wd):
                        sums["lr"] = sums["lr"] - wd * a_w_w
                if "eps" in names:  # x s (1 - β₁^t)/η = η m'/(bc1 D²)
                    bc1 = 1 - b1 ** (float(present(state[_STEP])[i]) + 1)
                    sums["eps"] = inner(a_w, moved.mul_(f.step_coef)) * (bc1 / lr)
                del moved
            for name in names:
                out[name].append(sums[name].to(torch.float64).reshape(()))
        return out

    def _backward(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: RuleState,
        hp: dict[str, Hyper],
        flags: dict[str, object],
        cotangent_params: list[Tensor],
        cotangent_state: RuleState,
    ) -> list[_Backward]:
        out = []
        for i, a_w in enumerate(cotangent_params):
            point = self._point(params, grads, state, hp, flags, i)
            cot = _cotangents(point.linear, a_w, cotangent_state, i)
            out.append(_Backward(point, *cot))
        return out

    def linearise(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: RuleState,
        hp: dict[str, Hyper],
        flags: dict[str, object],
    ) -> list[_Linear]:
        """The forward quantities :meth:`state_vjp` reads at this point, for ``linear=``:
        three parameter-sized tensors per parameter, which save recomputing the step (about
        two thirds of a product's element-wise work) on every product taken there."""
        return [self._linear(params, grads, state, hp, flags, i) for i in range(len(params))]

    def state_vjp(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: RuleState,
        hp: dict[str, Hyper],
        flags: dict[str, object],
        cotangent_params: list[Tensor],
        cotangent_state: RuleState,
        linear: list[_Linear] | None = None,
    ) -> StateCotangent:
        return self._state_vjp(
            params, grads, state, hp, flags, cotangent_params, cotangent_state, linear,
            in_place=False,
        )  # fmt: skip

    def state_vjp_whole(self, flags: dict[str, object], linearised: bool) -> bool:
        """From a kept linearisation and without AMSGrad, :meth:`state_vjp_` makes no
        temporary but ``r`` (:func:`_fused_state_vjp`): whole tensors, not pieces.  Else it
        recomputes the step or routes AMSGrad's maximum, with temporaries that pieces bound."""
        return linearised and not flags["amsgrad"]

    def state_vjp_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: RuleState,
        hp: dict[str, Hyper],
        flags: dict[str, object],
        cotangent_params: list[Tensor],
        cotangent_state: RuleState,
        linear: list[_Linear] | None = None,
    ) -> StateCotangent:
        """:meth:`state_vjp` written into the cotangent's own tensors: beyond the cotangent,
        ``r`` (and the state blocks of a first term, which has none) is all it allocates.
        The caller gives up the cotangent."""
        return self._state_vjp(
            params, grads, state, hp, flags, cotangent_params, cotangent_state, linear,
            in_place=True,
        )  # fmt: skip

    def _state_vjp(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: RuleState,
        hp: dict[str, Hyper],
        flags: dict[str, object],
        cotangent_params: list[Tensor],
        cotangent_state: RuleState,
        linear: list[_Linear] | None,
        *,
        in_place: bool,
    ) -> StateCotangent:
        """The products parameter by parameter.  ``linear``: a kept linearisation
        (:meth:`linearise`); without one, each parameter's step is recomputed when it is
        needed (no linearisation is held).  ``in_place``: into the cotangent's tensors."""
        decoupled = bool(flags["decoupled_weight_decay"])
        sign = -1.0 if flags["maximize"] else 1.0
        if self.state_vjp_whole(flags, linear is not None):
            assert linear is not None
            return _fused_state_vjp(
                linear, cotangent_params, cotangent_state, in_place=in_place,
                decoupled=decoupled, sign=sign,
            )  # fmt: skip
        given_m = cotangent_state.get(_M) if in_place else None
        given_v = cotangent_state.get(_V) if in_place else None
        cot_params: list[Tensor] = []
        cot_m: list[Tensor | None] = []
        cot_v: list[Tensor | None] = []
        cot_vmax: list[Tensor | None] = []
        cot_grads: list[Tensor] = []
        for i, a_w in enumerate(cotangent_params):
            f = self._linear(params, grads, state, hp, flags, i) if linear is None else linear[i]
            c_m, c_v, c_vmax_old, c_g_hat = _cotangents(f, a_w, cotangent_state, i)
            if decoupled:
                factor = 1 - f.lr * f.wd
                cot_params.append(a_w.mul_(factor) if in_place else a_w * factor)
            else:
                term = f.wd * c_g_hat
                cot_params.append(a_w.add_(term) if in_place else a_w + term)
            cot_m.append(_scaled_into(given_m, i, c_m, f.b1))
            cot_v.append(_scaled_into(given_v, i, c_v, f.b2))
            cot_vmax.append(c_vmax_old)
            cot_grads.append(c_g_hat.mul_(sign) if sign != 1.0 else c_g_hat)
            del f, c_m, c_v, c_vmax_old, c_g_hat
        out_state: RuleState = {_M: cot_m, _V: cot_v}
        if flags["amsgrad"]:
            out_state[_VMAX] = cot_vmax
        return StateCotangent(cot_params, out_state, cot_grads)

    def hyper_vjp(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: RuleState,
        hp: dict[str, Hyper],
        flags: dict[str, object],
        cotangent_params: list[Tensor],
        cotangent_state: RuleState,
        names: tuple[str, ...],
    ) -> dict[str, list[Tensor]]:
        # lr, eps and AdamW's weight decay act on w' alone (m' and v' do not read them): their
        # products need only the weights' cotangent, whatever the state's
        direct = {"lr", "eps"} | ({"weight_decay"} if flags["decoupled_weight_decay"] else set())
        if set(names) <= direct:
            return _direct_hyper_vjp(params, grads, state, hp, flags, cotangent_params, names)
        parts = self._backward(params, grads, state, hp, flags, cotangent_params, cotangent_state)
        decoupled = bool(flags["decoupled_weight_decay"])
        out: dict[str, list[Tensor]] = {name: [] for name in names}
        for i, (w, a_w, part) in enumerate(zip(params, cotangent_params, parts, strict=True)):
            lr, b1, b2, _, wd = self._hyper_at(hp, params, i)
            p = part.point
            t = p.step
            for name in names:
                if name == "lr":
                    d_w = -p.new_m / (p.bc1 * p.denom)
                    if decoupled:
                        d_w = d_w - wd * w
                    val = a_w * d_w
                elif name == "eps":
                    val = a_w * p.k
                elif name == "weight_decay":
                    val = -lr * a_w * w if decoupled else part.cot_g_hat * w
                elif name == "beta1":
                    m = present(state[_M])[i]
                    val = (
                        part.cot_m * (m - p.g_hat) - a_w * p.k * p.denom * t * b1 ** (t - 1) / p.bc1
                    )
                elif name == "beta2":
                    v = present(state[_V])[i]
                    bc2 = 1 - b2**t
                    val = part.cot_v * (v - p.g_hat * p.g_hat) + a_w * p.k * p.q * t * b2 ** (
                        t - 1
                    ) / (2 * bc2)
                else:
                    raise ValueError(f"Adam has no learnable hyperparameter {name!r}")
                out[name].append(val)
        return out


def _move(
    params: list[Tensor],
    state: RuleState,
    hp: dict[str, Hyper],
    flags: dict[str, object],
    ts: list[float],
) -> None:
    """The weights' move of torch's Adam from the moments after the step (``ts``: the step
    counts after it): ``w −= lr/bc1 · m' / (sqrt(v')/sqrt(bc2) + eps)``, with AMSGrad's running
    maximum for ``v'``.  Shared by :meth:`AdamRule.step` and :meth:`AdamRule.redo`."""
    lr, b1, b2, eps = (hp[k] for k in ("lr", "beta1", "beta2", "eps"))
    exp_avgs = present(state[_M])
    src = present(state[_VMAX]) if flags["amsgrad"] else present(state[_V])
    b1s, b2s, lrs = as_list(b1, params), as_list(b2, params), as_list(lr, params)
    bc2_sqrt = [(1 - b**t) ** 0.5 for b, t in zip(b2s, ts, strict=True)]
    step_size = [x / (1 - b**t) for x, b, t in zip(lrs, b1s, ts, strict=True)]
    denom = list(torch._foreach_sqrt(src))
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    scalar_sizes = [s for s in step_size if isinstance(s, float)]
    if len(scalar_sizes) == len(step_size):
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-s for s in scalar_sizes])
    else:
        update = list(torch._foreach_div(exp_avgs, denom))
        torch._foreach_mul_(update, step_size)
        torch._foreach_sub_(params, update)


def _fused_state_vjp(
    linear: list[_Linear],
    cotangent_params: list[Tensor],
    cotangent_state: RuleState,
    *,
    in_place: bool,
    decoupled: bool,
    sign: float,
) -> StateCotangent:
    """:meth:`AdamRule.state_vjp` from a kept linearisation, without AMSGrad, in fused
    element-wise operations: ``c_m = a_m − a_w·step_coef`` and ``c_v = a_v + a_w·second_coef``
    (one ``addcmul`` each, into the given state blocks when ``in_place``), ``r = (1−β₁)c_m +
    2(1−β₂)ĝ·c_v`` (the one new tensor), then the blocks scaled in place.  Seven passes over
    each parameter and no temporary besides ``r``; the same products as the general path."""
    ms = cotangent_state.get(_M, [None] * len(cotangent_params))
    vs = cotangent_state.get(_V, [None] * len(cotangent_params))
    cot_params: list[Tensor] = []
    cot_m: list[Tensor | None] = []
    cot_v: list[Tensor | None] = []
    cot_grads: list[Tensor] = []
    for f, a_w, a_m, a_v in zip(linear, cotangent_params, ms, vs, strict=True):
        if a_m is None:
            c_m = torch.mul(a_w, f.step_coef).neg_()
        elif in_place:
            c_m = a_m.addcmul_(a_w, f.step_coef, value=-1)
        else:
            c_m = torch.addcmul(a_m, a_w, f.step_coef, value=-1)
        if a_v is None:
            c_v = torch.mul(a_w, f.second_coef)
        elif in_place:
            c_v = a_v.addcmul_(a_w, f.second_coef)
        else:
            c_v = torch.addcmul(a_v, a_w, f.second_coef)
        r = torch.mul(c_m, 1 - f.b1).addcmul_(f.g_hat_2, c_v)  # c_ĝ
        if decoupled:
            factor = 1 - f.lr * f.wd
            cot_params.append(a_w.mul_(factor) if in_place else a_w * factor)
        elif isinstance(f.wd, float | int):
            if f.wd == 0:
                cot_params.append(a_w if in_place else a_w.clone())
            else:
                cot_params.append(
                    a_w.add_(r, alpha=f.wd) if in_place else torch.add(a_w, r, alpha=f.wd)
                )
        else:
            cot_params.append(a_w.addcmul_(r, f.wd) if in_place else torch.addcmul(a_w, r, f.wd))
        cot_m.append(c_m.mul_(f.b1))
        cot_v.append(c_v.mul_(f.b2))
        cot_grads.append(r.neg_() if sign != 1.0 else r)
    return StateCotangent(cot_params, {_M: cot_m, _V: cot_v}, cot_grads)


def _scaled_into(
    given: list[Tensor | None] | None, i: int, c: Tensor, scale: Tensor | float
) -> Tensor:
    """``scale·c``, written into the given cotangent's tensor ``i`` where there is one (it
    is not read again), else a new tensor."""
    held = None if given is None else given[i]
    if held is None:
        return scale * c
    return torch.mul(c, scale, out=held) if isinstance(scale, float) else held.copy_(c).mul_(scale)


def _cotangents(
    f: _Linear, a_w: Tensor, cotangent_state: RuleState, i: int
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """``(c_m, c_v, c_v̄, c_ĝ)`` of parameter ``i`` (see the module docstring): the cotangents of
    ``m'``, ``v'``, AMSGrad's old maximum and ``ĝ``, for a cotangent ``(a_w, a_s)`` on the step's
    output."""
    c_m = _cot(cotangent_state, _M, i, a_w) - a_w * f.step_coef
    c_src = a_w * f.second_coef
    c_vmax_old = None
    if f.to_new is not None:  # AMSGrad
        c_src = c_src + _cot(cotangent_state, _VMAX, i, a_w)
        c_vmax_old = torch.where(f.to_new, 0.0, c_src)
        c_src = torch.where(f.to_new, c_src, 0.0)
    c_v = _cot(cotangent_state, _V, i, a_w) + c_src
    return c_m, c_v, c_vmax_old, (1 - f.b1) * c_m + f.g_hat_2 * c_v


def _direct_hyper_vjp(
    params: list[Tensor],
    grads: list[Tensor],
    state: RuleState,
    hp: dict[str, Hyper],
    flags: dict[str, object],
    cotangent_params: list[Tensor],
    names: tuple[str, ...],
) -> dict[str, list[Tensor]]:
    """``a·∂U/∂λ`` for names that act on ``w'`` alone (``m'`` and ``v'`` do not read them), so
    that only the weights' cotangent ``a_w`` enters: ``lr`` (``a·∂w'/∂η = −a_w·m'/(bc1 D)``,
    AdamW also ``−a_w·ξ w``), ``eps`` (``a_w·k``, ``k = η m'/(bc1 D²)``) and AdamW's decoupled
    weight decay (``−η a_w·w``).  The same closed forms as :meth:`AdamRule.hyper_vjp`, without
    the state's cotangents, which do not enter: a third of the element-wise work."""
    decoupled = bool(flags["decoupled_weight_decay"])
    vmaxs = state[_VMAX] if flags["amsgrad"] else [None] * len(params)
    out: dict[str, list[Tensor]] = {name: [] for name in names}
    for i, (w, g, a_w) in enumerate(zip(params, grads, cotangent_params, strict=True)):
        t = float(present(state[_STEP])[i]) + 1
        lr, b1, b2, eps, wd = AdamRule._hyper_at(hp, params, i)
        g = -g if flags["maximize"] else g
        g_hat = g if decoupled or _zero(wd) else g + wd * w
        new_m = torch.lerp(present(state[_M])[i], g_hat, 1 - b1)  # as the fast step does
        if isinstance(b2, float):
            src = torch.addcmul(present(state[_V])[i] * b2, g_hat, g_hat, value=1 - b2)
        else:
            src = b2 * present(state[_V])[i] + (1 - b2) * g_hat * g_hat
        old_vmax = vmaxs[i]
        if old_vmax is not None:
            src = torch.maximum(old_vmax, src)
        bc1 = 1 - b1**t
        denom = src.sqrt_().div_((1 - b2**t) ** 0.5).add_(eps)  # D, in src's memory
        scaled = new_m.mul_(a_w).div_(denom)  # a·m'/D, in new_m's memory
        for name in names:
            if name == "lr":
                val = -scaled / bc1
                if decoupled and not _zero(wd):
                    val = val - wd * a_w * w
            elif name == "eps":
                val = scaled * (lr / bc1) / denom
            else:  # decoupled weight decay
                val = -lr * a_w * w
            out[name].append(val)
    return out


def _zero(x: Tensor | float) -> bool:
    """torch's float "off" (an unlearned zero), not a learned value that happens to be 0."""
    return isinstance(x, float) and x == 0.0


def _cot(cotangent_state: RuleState, name: str, i: int, like: Tensor) -> Tensor:
    """The cotangent of state buffer ``name`` of parameter ``i``; zero when absent."""
    xs = cotangent_state.get(name)
    x = None if xs is None else xs[i]
    return torch.zeros_like(like) if x is None else x
