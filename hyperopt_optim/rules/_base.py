"""The small interface between update rules and hypergradient methods.

An *update rule* is the map one optimizer step applies, ``z' = U(z, g(w), λ)``, with
``z = (w, s)`` the weights and the optimizer's per-parameter state (DESIGN §3).  Every rule
provides, as pure functions over lists of tensors (one entry per parameter of a group):

``step``
    the fast, in-place update used for training (``torch._foreach_*`` kernels);
``reference``
    the same map written out of place with ordinary differentiable ops: the slow,
    obviously correct version that the tests differentiate with autograd and ``torch.func``;
``state_vjp``
    ``a ↦ a·∂U/∂z`` with the gradient ``g`` held fixed, plus ``r = a·∂U/∂g``.  A hypergradient
    method completes the full state-Jacobian product ``a·J`` by adding the Hessian-vector
    product ``H r`` to the weight block: exactly one Hessian-vector product per product;
``hyper_vjp``
    ``a ↦ a·∂U/∂λ`` element by element (one tensor of the parameter's shape per parameter and
    learned name); reducing to one value per group or per tensor is the caller's business.

Hyperparameter values reach the kernels as :data:`Hyper`: a Python ``float`` when one value
serves the whole group (torch's own case, so the fast path is torch's arithmetic), or a list
with one tensor per parameter, either 0-dim (one value per tensor) or of the parameter's shape
(one value per weight).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, TypeAlias

import torch
from torch import Tensor

__all__ = [
    "Hyper",
    "Parametrisation",
    "RuleState",
    "StateCotangent",
    "UpdateRule",
    "add_scaled",
    "add_scaled_",
    "as_list",
    "inner",
    "is_zero",
    "linearise",
    "one_minus",
    "present",
    "state_vjp",
    "sub_scaled_",
    "sums_by_inner_products",
]

Hyper: TypeAlias = float | list[Tensor]
"""A hyperparameter's value: one float for the group, or one tensor per parameter."""

RuleState: TypeAlias = dict[str, list[Tensor | None]]
"""The optimizer state that is part of ``z``: state name -> one tensor per parameter.

``None`` marks a buffer that does not exist yet (torch's SGD creates its momentum buffer on a
parameter's first step, as a copy of the gradient)."""


@dataclass(frozen=True)
class Parametrisation:
    """How a learnable hyperparameter is kept unconstrained, and its default bounds.

    Attributes:
        fraction: kept as ``logit λ`` (a value in (0, 1): momentum, betas) rather than
            ``log λ`` (a positive scale: learning rate, weight decay, eps).
        low, high: the closed range, in natural units, learned values are clipped to.
    """

    fraction: bool
    low: float
    high: float


@dataclass
class StateCotangent:
    """The result of :meth:`UpdateRule.state_vjp` for one cotangent ``a = (a_w, a_s)``.

    Attributes:
        params: ``a·∂U/∂w`` with the gradient held fixed (no Hessian term).
        state: ``a·∂U/∂s`` for each state buffer, keyed like the rule's state.
        grads: ``r = a·∂U/∂g``, the cotangent of the raw training gradient; the full
            product adds ``H r`` to ``params``.
    """

    params: list[Tensor]
    state: RuleState
    grads: list[Tensor]


class UpdateRule(Protocol):
    """What a hypergradient method needs from an optimizer's update map.

    ``parametrisation`` says, for each learnable name, whether it is a fraction or a scale and
    where it is clipped.  ``hp`` maps each hyperparameter name (torch's param-group keys,
    with Adam's ``betas`` split into ``beta1`` and ``beta2``) to a :data:`Hyper`; ``flags``
    holds the structural, non-learnable options (``nesterov``, ``maximize``, ``amsgrad``...).
    ``state`` is the state *before* the step.  ``step`` and ``reference`` must compute the same map.
    """

    learnable: tuple[str, ...]
    state_names: tuple[str, ...]
    parametrisation: Mapping[str, Parametrisation]

    def init_state(self, params: list[Tensor], flags: dict[str, object]) -> RuleState:
        """Fresh state for parameters that have not been stepped yet."""
        ...

    def step(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: RuleState,
        hp: dict[str, Hyper],
        flags: dict[str, object],
    ) -> None:
        """Apply one update in place to ``params`` and ``state``."""
        ...

    def reference(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: RuleState,
        hp: dict[str, Hyper],
        flags: dict[str, object],
    ) -> tuple[list[Tensor], RuleState]:
        """The same update, out of place and differentiable in every input."""
        ...

    def state_vjp(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: RuleState,
        hp: dict[str, Hyper],
        flags: dict[str, object],
        cotangent_params: list[Tensor],
        cotangent_state: RuleState,
    ) -> StateCotangent:
        """``a·∂U/∂z`` (gradient fixed) and ``a·∂U/∂g`` at the pre-step point."""
        ...

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
        """``a·∂U/∂λ`` element-wise, one tensor of each parameter's shape per name."""
        ...


def linearise(
    rule: UpdateRule,
    params: list[Tensor],
    grads: list[Tensor],
    state: RuleState,
    hp: dict[str, Hyper],
    flags: dict[str, object],
) -> object | None:
    """What ``rule.state_vjp`` reads of the step at this point, computed once for several
    products there, when the rule offers it (an optional ``linearise`` method, as Adam's, whose
    ``state_vjp`` then takes ``linear=``); ``None`` for a rule that recomputes it each time."""
    method = getattr(rule, "linearise", None)
    return None if method is None else method(params, grads, state, hp, flags)


def state_vjp(
    rule: UpdateRule,
    params: list[Tensor],
    grads: list[Tensor],
    state: RuleState,
    hp: dict[str, Hyper],
    flags: dict[str, object],
    cotangent_params: list[Tensor],
    cotangent_state: RuleState,
    linear: object | None,
) -> StateCotangent:
    """``rule.state_vjp``, from :func:`linearise`'s result when there is one."""
    if linear is None:
        return rule.state_vjp(params, grads, state, hp, flags, cotangent_params, cotangent_state)
    return rule.state_vjp(  # type: ignore[call-arg]  # linearise's companion keyword
        params, grads, state, hp, flags, cotangent_params, cotangent_state, linear=linear
    )


# --- arithmetic on Hyper values -------------------------------------------------------------
# A float keeps torch's own kernels (and so torch's rounding); a list multiplies element-wise.


def is_zero(h: Hyper) -> bool:
    """True for the float ``0`` (torch skips the work then); a learned value never is."""
    return isinstance(h, float | int) and h == 0


def inner(x: Tensor, y: Tensor) -> Tensor:
    """``Σ x·y`` over every element: one read of each and no temporary (BLAS's ``dot``),
    accumulated in the tensors' dtype (see :func:`sums_by_inner_products`)."""
    return torch.dot(x.reshape(-1), y.reshape(-1))


def sums_by_inner_products(params: list[Tensor], hp: dict[str, Hyper]) -> bool:
    """Whether a rule's ``hyper_vjp_sums`` may sum by :func:`inner`: every value one number
    per parameter, and weights of float32 or wider.  A half-precision sum overflows
    (float16's largest number is 65504) or keeps three digits (bfloat16), where the
    element-wise products sum in float64."""
    if not all(x.dtype.itemsize >= 4 for x in params):
        return False
    return all(isinstance(h, float | int) or all(x.numel() == 1 for x in h) for h in hp.values())


def as_list(h: Hyper, like: list[Tensor]) -> list[Tensor | float]:
    """One entry per parameter: the float repeated, or the tensors themselves."""
    return [h] * len(like) if isinstance(h, float | int) else list(h)


def present(xs: list[Tensor | None]) -> list[Tensor]:
    """The list itself, checked to hold no missing buffer."""
    out: list[Tensor] = []
    for x in xs:
        if x is None:
            raise RuntimeError("an optimizer state buffer is missing")
        out.append(x)
    return out


def one_minus(h: Hyper) -> Hyper:
    """``1 − h``."""
    if isinstance(h, float | int):
        return 1.0 - h
    return [1 - x for x in h]


def add_scaled(ys: list[Tensor], xs: list[Tensor], h: Hyper) -> list[Tensor]:
    """``ys + h · xs`` as new tensors."""
    if isinstance(h, float | int):
        return list(torch._foreach_add(ys, xs, alpha=h))
    return list(torch._foreach_addcmul(ys, xs, h))


def add_scaled_(ys: list[Tensor], xs: list[Tensor], h: Hyper) -> None:
    """``ys += h · xs`` in place."""
    if isinstance(h, float | int):
        torch._foreach_add_(ys, xs, alpha=h)
    else:
        torch._foreach_addcmul_(ys, xs, h)


def sub_scaled_(ys: list[Tensor], xs: list[Tensor], h: Hyper) -> None:
    """``ys −= h · xs`` in place."""
    if isinstance(h, float | int):
        torch._foreach_add_(ys, xs, alpha=-h)
    else:
        torch._foreach_addcmul_(ys, xs, h, value=-1)
