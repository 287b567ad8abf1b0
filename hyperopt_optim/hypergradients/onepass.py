r"""One-pass implicit hypergradients (Clarke, Oldewage & Hernández-Lobato 2022).

Every ``update_interval`` steps, after the step :math:`z_{t+1} = U(z_t, g(w_t), \lambda)`:

.. math::

    v_0 = \Big(\frac{\partial L_V(w_{t+1})}{\partial w_{t+1}}, 0\Big),\qquad
    v_j = v_{j-1} J,\quad J = \frac{dU}{dz}(z_t, \lambda),\qquad
    p = \sum_{j=0}^{K} v_j,\qquad
    \frac{dL_V}{d\lambda} \approx p\,\frac{\partial U}{\partial \lambda}(z_t, \lambda).

``J`` is the Jacobian of the *whole* state (weights and optimizer buffers), each product
costing one Hessian-vector product on the step's training batch (see
:mod:`hyperopt_optim.rules`).  ``K = 0`` (``method="greedy"``) is the exact derivative of the
validation loss after this one step; at a fixed point of ``U`` the ``K``-term sum is exactly
the derivative through ``K + 1`` unrolled steps from there, and as ``K → ∞`` it tends to the
implicit-function-theorem hypergradient :math:`-\partial_z L_V (J - I)^{-1} \partial_\lambda U`
(the paper's Eq. 5 and its Neumann truncation, Eq. 6; the paper keeps the weight block only).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import check_neumann_steps, check_positive_int
from ..rules._base import RuleState, StateCotangent, as_list
from ._base import (
    ElementwiseHypergradients,
    GroupHypergradients,
    GroupSnapshot,
    HypergradientMethod,
    MethodOptions,
    StepContext,
    StepPlan,
)
from .hvp import products_in_a_row

DEFAULT_NEUMANN_STEPS = 4
DEFAULT_UPDATE_INTERVAL = 10

__all__ = ["OnePass", "conjugate_gradient", "neumann_hypergradient", "neumann_series"]


def neumann_hypergradient(
    groups: list[GroupSnapshot],
    outer: list[Tensor],
    hvp: Callable[[list[Tensor]], list[Tensor]] | None,
    neumann_steps: int,
) -> ElementwiseHypergradients:
    """``p·∂U/∂λ`` with ``p = Σ_{j≤K} v_0 J^j`` and ``v_0 = (outer, 0)``.

    Args:
        groups: the snapshot of every param group at ``z_t``.
        outer: ``∂L/∂w_{t+1}`` for the concatenation of every group's ``live`` parameters.
        hvp: Hessian-vector products at ``w_t`` over the same concatenation (needed when
            ``neumann_steps > 0``).
        neumann_steps: ``K``.
    Returns:
        Per group, the element-wise hypergradient of every learned name.
    """
    return neumann_series(groups, outer, hvp, neumann_steps)[0]


def neumann_series(
    groups: list[GroupSnapshot],
    outer: list[Tensor],
    hvp: Callable[[list[Tensor]], list[Tensor]] | None,
    neumann_steps: int,
    *,
    gradient_cotangent: bool = False,
) -> tuple[ElementwiseHypergradients, list[Tensor] | None]:
    r""":func:`neumann_hypergradient`, and with ``gradient_cotangent`` the cotangent of the
    step's training gradient, :math:`R = p\,\partial U/\partial g` over the live parameters
    (``None`` without): the hypergradient of a hyperparameter :math:`\mu` that the training
    loss reads is then the mixed product :math:`\partial_\mu \langle R, \nabla_w L_T(w_t,
    \mu)\rangle` (Lorraine et al. 2020 with the whole state's series; see
    :meth:`OnePass.loss_hypergradients`)."""
    sizes = [len(g.live) for g in groups]
    if neumann_steps > 0 and hvp is None:
        raise ValueError("neumann_steps > 0 needs Hessian-vector products")
    if neumann_steps > 0 and _lean(groups):
        assert hvp is not None
        return _term_by_term(groups, outer, hvp, neumann_steps, gradient_cotangent)
    v_params = _split(outer, sizes)
    v_state: list[RuleState] = [{} for _ in groups]
    # p = Σ v_j accumulates in v_0's tensors (``outer`` is consumed); each later v_j joins
    # the sum before its product, which is then written into its tensors: the sum, one term
    # and the product's direction are all the series holds
    p_params = [[_writable(x) for x in vp] for vp in v_params] if neumann_steps else v_params
    p_state: list[RuleState] = [{} for _ in groups]
    for j in range(neumann_steps):
        assert hvp is not None
        if j > 0:
            _add_term(p_params, p_state, v_params, v_state, own=False)
        parts = [
            g.state_vjp(vp, vs, overwrite=j > 0)  # v_0's tensors are the sum's
            for g, vp, vs in zip(groups, v_params, v_state, strict=True)
        ]
        del v_params, v_state
        v_params, v_state = _complete(parts, hvp, sizes)
        del parts
    if neumann_steps > 0:
        _add_term(p_params, p_state, v_params, v_state)
    cotangent = None
    if gradient_cotangent:  # R = p ∂U/∂g, by linearity the sum of every term's
        cotangent = [
            r
            for g, pp, ps in zip(groups, p_params, p_state, strict=True)
            for r in g.state_vjp(pp, ps).grads
        ]
    hypergradients = [
        GroupHypergradients(list(g.indices), g.reduced_hyper_vjp(pp, ps))
        for g, pp, ps in zip(groups, p_params, p_state, strict=True)
    ]
    return hypergradients, cotangent


def conjugate_gradient(
    hvp: Callable[[list[Tensor]], list[Tensor]], b: list[Tensor], iterations: int
) -> list[Tensor]:
    r"""``p ≈ H^{-1} b`` by ``iterations`` steps of conjugate gradient from ``p = 0``, one
    Hessian-vector product each (Lorraine, Vicol & Duvenaud 2020, §4: the classical implicit
    function theorem at a stationary point of the training loss).  Stops early at a direction of
    zero, negative or non-finite curvature (the Hessian is not positive definite there), or
    when the residual vanishes.

    Args:
        hvp: ``d ↦ H d`` over the live parameters.
        b: the right-hand side, ``∇_w L_V``.
        iterations: the products at most.
    """
    p = [torch.zeros_like(x) for x in b]
    r = [x.clone() for x in b]
    d = [x.clone() for x in b]
    rr = _dot(r, r)
    for _ in range(iterations):
        if rr == 0.0 or not math.isfinite(rr):
            break
        hd = hvp(d)
        curvature = _dot(d, hd)
        if not (math.isfinite(curvature) and curvature > 0.0):
            break
        alpha = rr / curvature
        torch._foreach_add_(p, d, alpha=alpha)
        torch._foreach_add_(r, hd, alpha=-alpha)
        rr_next = _dot(r, r)
        torch._foreach_mul_(d, rr_next / rr)
        torch._foreach_add_(d, r)
        rr = rr_next
    return p


def _with_decay(
    groups: list[GroupSnapshot], hvp: Callable[[list[Tensor]], list[Tensor]]
) -> Callable[[list[Tensor]], list[Tensor]]:
    """``d ↦ (H + ξ) d``: the Hessian of the loss the optimizer's fixed point is stationary
    for, ``L_T + ½ Σ ξ w²`` with each group's coupled ``weight_decay`` ``ξ`` (a float, or one
    tensor per parameter, broadcast).  A decoupled weight decay (AdamW's) moves the fixed point
    off any such loss; the optimizer refuses it with ``solver="cg"``."""
    decays: list[Tensor | float] = []
    for g in groups:
        wd = g.hp.get("weight_decay", 0.0)
        if g.flags.get("decoupled_weight_decay") and not _zero(wd):
            raise ValueError(
                "solver='cg' assumes a stationary point of the training loss, which AdamW's "
                "decoupled weight_decay moves (its fixed point is preconditioned by Adam's "
                "second moment): set weight_decay=0 (decay inside the closure's loss instead), "
                "or use solver='neumann'"
            )
        decays.extend(as_list(wd, g.live))
    if all(_zero(x) for x in decays):
        return hvp

    def operator(d: list[Tensor]) -> list[Tensor]:
        out = [_writable(h) for h in hvp(d)]
        for h, x, wd in zip(out, d, decays, strict=True):
            if not _zero(wd):
                h.add_(x * wd)
        return out

    return operator


def _zero(wd: object) -> bool:
    if isinstance(wd, float | int):
        return wd == 0
    if isinstance(wd, Tensor):
        return bool((wd == 0).all())
    return all(_zero(x) for x in wd)  # type: ignore[attr-defined]


def _dot(xs: list[Tensor], ys: list[Tensor]) -> float:
    """``Σ ⟨x, y⟩`` in float64 on the host."""
    if not xs:
        return 0.0
    return float(
        sum(
            torch.vdot(x.reshape(-1), y.reshape(-1)).double().cpu()
            for x, y in zip(xs, ys, strict=True)
        )
    )


def _complete(
    parts: list[StateCotangent],
    hvp: Callable[[list[Tensor]], list[Tensor]],
    sizes: list[int],
) -> tuple[list[list[Tensor]], list[RuleState]]:
    """The next term from each group's ``state_vjp``: ``H r`` added to the weight block
    (``state_vjp``'s own new tensors); ``r`` is dropped on return."""
    directions = [r for part in parts for r in part.grads]
    add = getattr(hvp, "add_to", None)
    if add is not None:  # into state_vjp's own new tensors, without a separate product
        add(directions, [x for part in parts for x in part.params])
    else:
        products = _split(hvp(directions), sizes)
        for part, hr in zip(parts, products, strict=True):
            torch._foreach_add_(part.params, hr)
    return [part.params for part in parts], [part.state for part in parts]


def _writable(x: Tensor) -> Tensor:
    """``x``, or a copy when elements share memory (autograd may return an expanded tensor,
    such as the gradient of a sum), so that it can be added to in place."""
    if any(stride == 0 and size > 1 for stride, size in zip(x.stride(), x.shape, strict=True)):
        return x.clone()
    return x


def _add_term(
    p_params: list[list[Tensor]],
    p_state: list[RuleState],
    v_params: list[list[Tensor]],
    v_state: list[RuleState],
    *,
    own: bool = True,
) -> None:
    """``p += v``, group by group; ``own``: ``v`` is not used again, so its state tensors
    may become ``p``'s (else they are copied)."""
    for acc, vp in zip(p_params, v_params, strict=True):
        torch._foreach_add_(acc, vp)
    for acc_s, vs in zip(p_state, v_state, strict=True):
        _accumulate(acc_s, vs, own=own)


LEAN_ELEMENTS = 1 << 22
"""From this many elements in the step's live parameters (16 MiB of float32), a series whose
learned values are all per group or per tensor is reduced term by term
(:func:`_term_by_term`): two or three parameter-sized sums fewer and, for Adam, no
linearisation kept (three more), for ``K`` more ``∂U/∂λ`` products and Adam's step recomputed
per term, piece by piece.  On an MLP of 269k weights (below it) that work cost 25% of a
HyperAdam step for 7 parameter-sized copies of 1 MiB; on a large model the copies are what
runs out first, and the Python calls per piece are amortised."""


def _lean(groups: list[GroupSnapshot]) -> bool:
    every_reduced = all(set(g.names) <= g.reduced for g in groups)
    return every_reduced and sum(p.numel() for g in groups for p in g.live) >= LEAN_ELEMENTS


def _term_by_term(
    groups: list[GroupSnapshot],
    outer: list[Tensor],
    hvp: Callable[[list[Tensor]], list[Tensor]],
    neumann_steps: int,
    gradient_cotangent: bool = False,
) -> tuple[ElementwiseHypergradients, list[Tensor] | None]:
    """The series with each term's ``v_j·∂U/∂λ`` reduced as it is made (by linearity, their
    sum is ``p·∂U/∂λ``), so that no sum ``p`` is kept: the term, the product's direction and
    its gradients are what the series holds; a rule with an in-place ``state_vjp_`` writes
    each term into the previous one's tensors."""
    sizes = [len(g.live) for g in groups]
    v_params = [[_writable(x) for x in vp] for vp in _split(outer, sizes)]
    v_state: list[RuleState] = [{} for _ in groups]
    total = [
        g.reduced_hyper_vjp(vp, vs) for g, vp, vs in zip(groups, v_params, v_state, strict=True)
    ]
    cotangent: list[Tensor] | None = None
    for _ in range(neumann_steps):
        parts = [
            g.state_vjp(vp, vs, overwrite=True, keep_linear=False)
            for g, vp, vs in zip(groups, v_params, v_state, strict=True)
        ]
        if gradient_cotangent:  # R = Σ_j r_j: each term's own, before its product
            cotangent = _sum_into(cotangent, [r for part in parts for r in part.grads])
        del v_params, v_state
        v_params, v_state = _complete(parts, hvp, sizes)
        del parts
        for acc, g, vp, vs in zip(total, groups, v_params, v_state, strict=True):
            for name, values in g.reduced_hyper_vjp(vp, vs).items():
                for held, x in zip(acc[name], values, strict=True):
                    held.add_(x)
    if gradient_cotangent:  # and the last term's
        last = [
            r
            for g, vp, vs in zip(groups, v_params, v_state, strict=True)
            for r in g.state_vjp(vp, vs).grads
        ]
        cotangent = _sum_into(cotangent, last)
    hypergradients = [
        GroupHypergradients(list(g.indices), t) for g, t in zip(groups, total, strict=True)
    ]
    return hypergradients, cotangent


def _sum_into(acc: list[Tensor] | None, xs: list[Tensor]) -> list[Tensor]:
    """``acc + xs`` in ``acc``'s tensors (copies of ``xs`` the first time)."""
    if acc is None:
        return [x.clone() for x in xs]
    torch._foreach_add_(acc, xs)
    return acc


def _split(xs: list[Tensor], sizes: list[int]) -> list[list[Tensor]]:
    out, start = [], 0
    for n in sizes:
        out.append(list(xs[start : start + n]))
        start += n
    return out


def _accumulate(acc: RuleState, add: RuleState, *, own: bool = True) -> None:
    """``acc += add`` buffer by buffer: in place where ``acc`` has a tensor, else ``add``'s
    own (which the caller does not use again)."""
    for name, xs in add.items():
        current = acc.setdefault(name, [None] * len(xs))
        for i, x in enumerate(xs):
            if x is None:
                continue
            held = current[i]
            if held is None:
                current[i] = x if own else x.clone()  # own: a term's tensor, not used again
            else:
                held.add_(x)


class OnePass(HypergradientMethod):
    """``method="ift"`` (``K ≥ 0`` Neumann terms) and ``method="greedy"`` (``K = 0``).

    Args:
        neumann_steps: ``K``, the number of state-Jacobian products in the series.
        update_interval: ``T``; the hyper-step follows steps ``T−1, 2T−1, …``.
    """

    uses_validation = True

    @classmethod
    def from_options(cls, options: MethodOptions) -> OnePass:
        default = DEFAULT_NEUMANN_STEPS if options.method == "ift" else 0
        return cls(
            check_neumann_steps(options.neumann_steps, options.method, default),
            check_positive_int("update_interval", options.update_interval, DEFAULT_UPDATE_INTERVAL),
        )

    takes_loss_hyperparameters = True

    def __init__(self, neumann_steps: int, update_interval: int) -> None:
        self.neumann_steps = neumann_steps
        self.update_interval = update_interval
        #: the optimizer has loss hyperparameters: a hyper-step takes their mixed product
        self.loss_hyperparameters = False
        #: ``"neumann"`` (the series) or ``"cg"`` (conjugate gradient on the weights' Hessian,
        #: loss hyperparameters only)
        self.solver = "neumann"

    def plan(self, step: int) -> StepPlan:
        if (step + 1) % self.update_interval != 0:
            return StepPlan()
        if self.loss_hyperparameters:  # their mixed product is taken at the point
            return StepPlan(snapshot=True, copy=True, products=max(self.neumann_steps, 1))
        # greedy: one ∂U/∂λ product after the update, which some rules take from the state it
        # leaves (no copy of the point)
        return StepPlan(
            snapshot=True, copy=True, products=self.neumann_steps, after=self.neumann_steps == 0
        )

    def after_update(self, ctx: StepContext) -> ElementwiseHypergradients | None:
        if ctx.groups is None:
            return None
        live = [p for g in ctx.groups for p in g.live]
        mus = ctx.loss_hyperparameters
        outer = ctx.validation_gradient(live + mus)
        if outer is None:
            return None
        outer, direct = outer[: len(live)], outer[len(live) :]
        steps = self.neumann_steps if ctx.hvp is not None else 0
        if any(g.after for g in ctx.groups):
            steps = 0  # the snapshot holds no point (a greedy plan)
        # every product below reads the snapshot's copies, never the live weights: finite
        # differences put them back once, after the last product, not after each
        with products_in_a_row():
            return self._solve(ctx, outer, direct, steps)

    def _solve(
        self, ctx: StepContext, outer: list[Tensor], direct: list[Tensor], steps: int
    ) -> ElementwiseHypergradients:
        assert ctx.groups is not None
        mus = ctx.loss_hyperparameters
        if not mus:
            return neumann_hypergradient(ctx.groups, outer, ctx.hvp, steps)
        if ctx.hvp is None:
            raise RuntimeError("loss hyperparameters need the step's products")
        if self.solver == "cg":
            solved = conjugate_gradient(_with_decay(ctx.groups, ctx.hvp), outer, self.neumann_steps)
            torch._foreach_neg_(solved)
            mixed = ctx.hvp.mixed(solved, mus)
            hypergradients = [GroupHypergradients(list(g.indices), {}) for g in ctx.groups]
        else:
            hypergradients, cotangent = neumann_series(
                ctx.groups, outer, ctx.hvp, steps, gradient_cotangent=True
            )
            assert cotangent is not None
            mixed = ctx.hvp.mixed(cotangent, mus)
        torch._foreach_add_(mixed, direct)
        ctx.loss_hypergradients = mixed
        return hypergradients
