r"""Stochastic gradient descent with momentum, as ``torch.optim.SGD`` computes it.

With :math:`\sigma = -1` when maximizing (else 1), weight decay :math:`\xi`, momentum
:math:`\mu`, dampening :math:`\tau` and learning rate :math:`\eta`:

.. math::

    \hat g = \sigma g + \xi w,\qquad
    b' = \begin{cases}\hat g & \text{first step}\\ \mu b + (1-\tau)\hat g & \text{after}\end{cases},
    \qquad d = \begin{cases}\hat g + \mu b' & \text{Nesterov}\\ b' & \text{else}\end{cases},
    \qquad w' = w - \eta d.

Without momentum (:math:`\mu = 0`, not learned) there is no buffer and :math:`d = \hat g`.
The closed-form products (DESIGN §3), for a cotangent :math:`(a_w, a_b)` on :math:`(w', b')`:
:math:`c_{b'} = a_b - \eta a_w` (Nesterov: :math:`a_b - \eta\mu a_w`, and
:math:`c_{\hat g} \mathrel{+}= -\eta a_w`), :math:`c_{\hat g} \mathrel{+}= (1-\tau) c_{b'}`,
then :math:`a·∂U/∂w = a_w + \xi c_{\hat g}`, :math:`a·∂U/∂b = \mu c_{b'}`,
:math:`r = \sigma c_{\hat g}`; and :math:`a·∂U/∂\eta = -a_w d`,
:math:`a·∂U/∂\mu = c_{b'} b\ (- \eta a_w b'` with Nesterov), :math:`a·∂U/∂\xi = c_{\hat g} w`.
"""

from __future__ import annotations

import functools
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
    add_scaled_,
    as_list,
    inner,
    is_zero,
    present,
    sub_scaled_,
    sums_by_inner_products,
)

__all__ = ["SGDRule"]

_BUFFER = "momentum_buffer"


def _uses_buffer(hp: dict[str, Hyper]) -> bool:
    return not is_zero(hp["momentum"])


@dataclass
class _Backward:
    """One parameter's forward quantities and cotangents (see the module docstring)."""

    direction: Tensor  # d
    new_buffer: Tensor | None  # b'
    cot_new_buffer: Tensor | None  # c_{b'}
    cot_grad_hat: Tensor  # c_{ĝ}


def _backward_one(
    w: Tensor,
    g: Tensor,
    b: Tensor | None,
    a_w: Tensor,
    a_b: Tensor | None,
    lr: Tensor | float,
    mu: Tensor | float,
    wd: Tensor | float,
    *,
    use_buffer: bool,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> _Backward:
    g_hat = (-g if maximize else g) + wd * w
    if not use_buffer:
        return _Backward(g_hat, None, None, -lr * a_w)
    new_b = g_hat if b is None else mu * b + (1 - dampening) * g_hat
    cot_b_in = a_b if a_b is not None else torch.zeros_like(w)
    if nesterov:
        direction = g_hat + mu * new_b
        cot_new_b = cot_b_in - lr * mu * a_w
        cot_g_hat = -lr * a_w
    else:
        direction = new_b
        cot_new_b = cot_b_in - lr * a_w
        cot_g_hat = torch.zeros_like(w)
    cot_g_hat = cot_g_hat + (cot_new_b if b is None else (1 - dampening) * cot_new_b)
    return _Backward(direction, new_b, cot_new_b, cot_g_hat)


def _negate(h: Hyper) -> Hyper:
    return -h if isinstance(h, float | int) else [-x for x in h]


def _product(a: Hyper, b: Hyper) -> Hyper:
    if isinstance(a, float | int):
        return a * b if isinstance(b, float | int) else [a * y for y in b]
    return (
        [x * b for x in a]
        if isinstance(b, float | int)
        else [x * y for x, y in zip(a, b, strict=True)]
    )


def _cotangents_foreach(
    hp: dict[str, Hyper],
    flags: dict[str, object],
    a_w: list[Tensor],
    cotangent_state: RuleState,
    *,
    in_place: bool = False,
) -> tuple[list[Tensor] | None, list[Tensor]]:
    """``(c_{b'}, c_{ĝ})`` for every parameter; ``c_{b'}`` is ``None`` without momentum.
    ``in_place``: ``c_{b'}`` is written into the given buffer cotangent, if any."""
    neg_lr = _negate(hp["lr"])
    if not _uses_buffer(hp):
        return None, list(torch._foreach_mul(a_w, neg_lr))
    dampening = float(flags["dampening"])  # type: ignore[arg-type]
    a_b = cotangent_state.get(_BUFFER)
    coefficient = _product(neg_lr, hp["momentum"]) if flags["nesterov"] else neg_lr
    if a_b is None:  # v_0 has no state block
        cot_new_b = list(torch._foreach_mul(a_w, coefficient))
    elif in_place:
        cot_new_b = present(a_b)
        add_scaled_(cot_new_b, a_w, coefficient)
    else:
        cot_new_b = add_scaled(present(a_b), a_w, coefficient)
    cot_g_hat = list(torch._foreach_mul(cot_new_b, 1 - dampening))
    if flags["nesterov"]:
        add_scaled_(cot_g_hat, a_w, neg_lr)
    return cot_new_b, cot_g_hat


def _hyper_vjp_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    hp: dict[str, Hyper],
    flags: dict[str, object],
    a_w: list[Tensor],
    cotangent_state: RuleState,
    names: tuple[str, ...],
) -> dict[str, list[Tensor]]:
    """``a·∂U/∂λ`` element-wise with foreach kernels, every buffer present."""
    mu, wd = hp["momentum"], hp["weight_decay"]
    # the cotangents through the buffer and the gradient only where a name needs them (lr
    # needs neither: two parameter-sized temporaries fewer when it is learned alone)
    cot_new_b: list[Tensor] | None = None
    cot_g_hat: list[Tensor] = []
    if "weight_decay" in names or "momentum" in names:
        cot_new_b, cot_g_hat = _cotangents_foreach(hp, flags, a_w, cotangent_state)
    out: dict[str, list[Tensor]] = {}
    new_b: list[Tensor] | None = None
    if "lr" in names or ("momentum" in names and flags["nesterov"]):
        g = list(torch._foreach_neg(grads)) if flags["maximize"] else grads
        g_hat = list(g) if is_zero(wd) else add_scaled(g, params, wd)
        direction = g_hat
        # whether ``direction`` is a temporary of this call, which the product may overwrite
        fresh = bool(flags["maximize"]) or not is_zero(wd)
        if _uses_buffer(hp):
            new_b = list(torch._foreach_mul(bufs, mu))
            add_scaled_(new_b, g_hat, 1 - float(flags["dampening"]))  # type: ignore[arg-type]
            if flags["nesterov"]:
                direction, fresh = add_scaled(g_hat, new_b, mu), True
            else:  # new_b is needed again only by Nesterov's momentum term
                direction, fresh = new_b, True
        if fresh and "lr" in names:
            torch._foreach_mul_(direction, a_w)
            out["lr"] = direction
        else:
            out["lr"] = list(torch._foreach_mul(a_w, direction))
        torch._foreach_neg_(out["lr"])
    if "weight_decay" in names:
        out["weight_decay"] = list(torch._foreach_mul(cot_g_hat, params))
    if "momentum" in names:
        if cot_new_b is None:
            raise ValueError("momentum is learned but SGD has no momentum buffer")
        out["momentum"] = list(torch._foreach_mul(cot_new_b, bufs))
        if flags["nesterov"]:
            assert new_b is not None
            term = list(torch._foreach_mul(a_w, new_b))
            add_scaled_(out["momentum"], term, _negate(hp["lr"]))
    for name in names:
        if name not in SGDRule.learnable:
            raise ValueError(f"SGD has no learnable hyperparameter {name!r}")
    return {name: out[name] for name in names}


def hyper_dots(
    params: list[Tensor],
    grads: list[Tensor],
    state: RuleState,
    hp: dict[str, Hyper],
    flags: dict[str, object],
    cotangent_params: list[Tensor],
    cotangent_state: RuleState,
    names: tuple[str, ...],
) -> dict[str, list[Tensor]] | None:
    r"""``a·∂U/∂λ`` summed over each parameter's elements, from inner products alone.

    With every value one number per parameter, the sums of the module docstring's products
    expand into a few inner products of the tensors at hand (no element-wise temporary; each
    tensor read once per product), with :math:`c = 1 - \tau` and :math:`a_b = 0` for the
    first term's missing state block:

    * :math:`\sum a·∂U/∂\eta = -(\mu⟨a_w, b⟩ + c\sigma⟨a_w, g⟩ + c\xi⟨a_w, w⟩)`
      (without momentum :math:`-(\sigma⟨a_w, g⟩ + \xi⟨a_w, w⟩)`);
    * :math:`\sum a·∂U/∂\xi = c(⟨a_b, w⟩ - \eta⟨a_w, w⟩)` (without momentum
      :math:`-\eta⟨a_w, w⟩`);
    * :math:`\sum a·∂U/∂\mu = ⟨a_b, b⟩ - \eta⟨a_w, b⟩`.

    Returns ``None`` where this does not apply (Nesterov's momentum, a value per element, a
    parameter's first step without a buffer, half-precision weights): the caller takes the
    element-wise products.
    The results are 0-dim float64 tensors; each inner product accumulates in the tensors' own
    dtype (BLAS's blocked sum: about 1e-7 relative in float32, where the element-wise path
    summed float32 products in float64).
    """
    if flags["nesterov"] or any(n not in SGDRule.learnable for n in names):
        return None
    if not sums_by_inner_products(params, hp):
        return None
    momentum = _uses_buffer(hp)
    bufs = state.get(_BUFFER, [None] * len(params)) if momentum else [None] * len(params)
    if momentum and any(b is None for b in bufs):
        return None
    a_bs = cotangent_state.get(_BUFFER) if momentum else None
    sign = -1.0 if flags["maximize"] else 1.0
    c = 1.0 - float(flags["dampening"])  # type: ignore[arg-type]
    rows = zip(
        params,
        grads,
        bufs,
        cotangent_params,
        a_bs if a_bs is not None else [None] * len(params),
        as_list(hp["lr"], params),
        as_list(hp["momentum"], params),
        as_list(hp["weight_decay"], params),
        strict=True,
    )
    # each sum as terms (coefficient, inner product), name by name and parameter by parameter
    terms: dict[str, list[list[tuple[Tensor | float, Tensor]]]] = {name: [] for name in names}
    for w, g, b, a_w, a_b, lr, mu, wd in rows:
        dots: dict[str, Tensor] = {}
        dot = functools.partial(_memo_inner, dots)
        k = c if b is not None else 1.0  # the buffer's share of the step's gradient term
        for name in names:
            t: list[tuple[Tensor | float, Tensor]]
            if name == "lr":
                t = [(-k * sign, dot("a_w g", a_w, g))]
                if not is_zero(wd):
                    t.append((-k * wd, dot("a_w w", a_w, w)))
                if b is not None:
                    t.append((-mu, dot("a_w b", a_w, b)))
            elif name == "weight_decay":
                t = [(-k * lr, dot("a_w w", a_w, w))]
                if b is not None and a_b is not None:
                    t.append((c, dot("a_b w", a_b, w)))
            else:  # momentum
                assert b is not None
                t = [(-lr, dot("a_w b", a_w, b))]
                if a_b is not None:
                    t.append((1.0, dot("a_b b", a_b, b)))
            terms[name].append(t)
    return {name: _combine(ts) for name, ts in terms.items()}


def _memo_inner(dots: dict[str, Tensor], key: str, x: Tensor, y: Tensor) -> Tensor:
    """``⟨x, y⟩``, made once per ``key`` in ``dots``."""
    if key not in dots:
        dots[key] = inner(x, y)
    return dots[key]


def _combine(sums: list[list[tuple[Tensor | float, Tensor]]]) -> list[Tensor]:
    """Each ``Σ coefficient · inner product`` as a 0-dim float64 tensor.  With every
    coefficient a number (values per group): one stack of the products, one matrix of the
    coefficients and one product of the two, in float64 (a few tensor operations, not several
    per sum: the Python cost of a small model's hyper-step); else term by term."""
    if all(isinstance(a, float | int) for t in sums for a, _ in t):
        index: dict[int, int] = {}
        products: list[Tensor] = []
        for t in sums:
            for _, x in t:
                if id(x) not in index:
                    index[id(x)] = len(products)
                    products.append(x)
        matrix = [[0.0] * len(products) for _ in sums]
        for row, t in zip(matrix, sums, strict=True):
            for a, x in t:
                row[index[id(x)]] += float(a)
        stacked = torch.stack(products).to(torch.float64)
        weights = torch.tensor(matrix, dtype=torch.float64, device=stacked.device)
        return list((weights @ stacked).unbind(0))
    out = []
    for t in sums:
        total = sum((a * x for a, x in t[1:]), t[0][0] * t[0][1])
        out.append(torch.as_tensor(total).to(torch.float64).reshape(()))  # (1,)-shaped values
    return out


class SGDRule:
    """The update map of ``torch.optim.SGD`` (see the module docstring for the maths).

    ``flags``: ``dampening`` (float), ``nesterov`` and ``maximize`` (bool).  The state holds
    ``momentum_buffer`` only when momentum is used; a ``None`` entry is a parameter whose
    buffer torch has not created yet.
    """

    parametrisation: Mapping[str, Parametrisation] = MappingProxyType(
        {
            "lr": Parametrisation(fraction=False, low=1e-8, high=10.0),
            "momentum": Parametrisation(fraction=True, low=1e-6, high=1 - 1e-6),
            "weight_decay": Parametrisation(fraction=False, low=1e-10, high=10.0),
        }
    )
    learnable: tuple[str, ...] = tuple(parametrisation)
    state_names: tuple[str, ...] = (_BUFFER,)

    def init_state(self, params: list[Tensor], flags: dict[str, object]) -> RuleState:
        return {_BUFFER: [None] * len(params)}

    def step(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: RuleState,
        hp: dict[str, Hyper],
        flags: dict[str, object],
    ) -> None:
        # The operations and their order are torch's `_multi_tensor_sgd`, so a float
        # hyperparameter gives torch's result to the last bit; the user's gradients are
        # never written to.
        if not params:
            return
        lr, mu, wd = hp["lr"], hp["momentum"], hp["weight_decay"]
        dampening = float(flags["dampening"])  # type: ignore[arg-type]
        d: list[Tensor] = list(torch._foreach_neg(grads)) if flags["maximize"] else grads
        if not is_zero(wd):
            d = add_scaled(d, params, wd)
        if _uses_buffer(hp):
            bufs = state.setdefault(_BUFFER, [None] * len(params))
            if all(b is not None for b in bufs):
                present_bufs: list[Tensor] = [b for b in bufs if b is not None]
                torch._foreach_mul_(present_bufs, mu)
                torch._foreach_add_(present_bufs, d, alpha=1 - dampening)
            else:
                for i, (b, mu_i) in enumerate(zip(bufs, as_list(mu, params), strict=True)):
                    if b is None:
                        bufs[i] = d[i].detach().clone()
                    else:
                        b.mul_(mu_i).add_(d[i], alpha=1 - dampening)
                present_bufs = [b for b in bufs if b is not None]
            d = add_scaled(d, present_bufs, mu) if flags["nesterov"] else present_bufs
        sub_scaled_(params, d, lr)

    def can_vjp_after(
        self, names: tuple[str, ...], hp: dict[str, Hyper], flags: dict[str, object]
    ) -> bool:
        """Whether :meth:`hyper_vjp_after` gives ``names``' products: the learning rate alone
        with heavy-ball momentum, whose step's direction is the buffer the update leaves."""
        return tuple(names) == ("lr",) and _uses_buffer(hp) and not flags["nesterov"]

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
        """``a_w·∂w'/∂η = −a_w·b'`` from the buffer after the step (see :meth:`can_vjp_after`):
        the same bits as :meth:`hyper_vjp` at the point, which recomputes ``b'``."""
        if not self.can_vjp_after(names, hp, flags):
            raise ValueError(f"SGD's products from the state after the step do not cover {names}")
        out = list(torch._foreach_mul(present(state_after[_BUFFER]), cotangent_params))
        torch._foreach_neg_(out)
        return {"lr": out}

    def redo(
        self,
        params: list[Tensor],
        point: list[Tensor],
        grads: list[Tensor],
        state_after: RuleState,
        hp: dict[str, Hyper],
        flags: dict[str, object],
    ) -> None:
        """Write into ``params`` the weights :meth:`step` made from ``point`` and ``grads``,
        given the buffers it left: the same operations, so the same bits, without a copy of
        the stepped weights."""
        if not params:
            return
        torch._foreach_copy_(params, point)
        lr, mu, wd = hp["lr"], hp["momentum"], hp["weight_decay"]
        uses_buffer = _uses_buffer(hp)
        if uses_buffer and not flags["nesterov"]:
            d = present(state_after[_BUFFER])
        else:
            d = list(torch._foreach_neg(grads)) if flags["maximize"] else grads
            if not is_zero(wd):
                d = add_scaled(d, params, wd)
            if uses_buffer:
                d = add_scaled(d, present(state_after[_BUFFER]), mu)
        sub_scaled_(params, d, lr)

    def reference(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: RuleState,
        hp: dict[str, Hyper],
        flags: dict[str, object],
    ) -> tuple[list[Tensor], RuleState]:
        use_buffer = _uses_buffer(hp)
        bufs = state.get(_BUFFER, [None] * len(params))
        new_params: list[Tensor] = []
        new_bufs: list[Tensor | None] = []
        for w, g, b, lr, mu, wd in zip(
            params,
            grads,
            bufs,
            as_list(hp["lr"], params),
            as_list(hp["momentum"], params),
            as_list(hp["weight_decay"], params),
            strict=True,
        ):
            g_hat = (-g if flags["maximize"] else g) + wd * w
            if use_buffer:
                new_b = g_hat if b is None else mu * b + (1 - flags["dampening"]) * g_hat  # type: ignore[operator]
                d = g_hat + mu * new_b if flags["nesterov"] else new_b
                new_bufs.append(new_b)
            else:
                d = g_hat
            new_params.append(w - lr * d)
        return new_params, ({_BUFFER: new_bufs} if use_buffer else {})

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
        use_buffer = _uses_buffer(hp)
        bufs = state.get(_BUFFER, [None] * len(params))
        cot_bufs = cotangent_state.get(_BUFFER, [None] * len(params))
        return [
            _backward_one(
                w, g, b, a_w, a_b, lr, mu, wd,
                use_buffer=use_buffer,
                dampening=float(flags["dampening"]),  # type: ignore[arg-type]
                nesterov=bool(flags["nesterov"]),
                maximize=bool(flags["maximize"]),
            )
            for w, g, b, a_w, a_b, lr, mu, wd in zip(
                params,
                grads,
                bufs,
                cotangent_params,
                cot_bufs,
                as_list(hp["lr"], params),
                as_list(hp["momentum"], params),
                as_list(hp["weight_decay"], params),
                strict=True,
            )
        ]  # fmt: skip

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
        bufs = state.get(_BUFFER, [None] * len(params))
        if not _uses_buffer(hp) or all(b is not None for b in bufs):
            return self._state_vjp_foreach(hp, flags, cotangent_params, cotangent_state)
        # a parameter's first step (no buffer yet): one tensor at a time
        parts = self._backward(params, grads, state, hp, flags, cotangent_params, cotangent_state)
        sign = -1.0 if flags["maximize"] else 1.0
        wds = as_list(hp["weight_decay"], params)
        cot_params = [
            a_w + wd * p.cot_grad_hat
            for a_w, wd, p in zip(cotangent_params, wds, parts, strict=True)
        ]
        out_state: RuleState = {}
        if _uses_buffer(hp):
            bufs = state.get(_BUFFER, [None] * len(params))
            cot_bufs: list[Tensor | None] = []
            for a_w, b, mu, p in zip(
                cotangent_params, bufs, as_list(hp["momentum"], params), parts, strict=True
            ):
                assert p.cot_new_buffer is not None
                cot_bufs.append(torch.zeros_like(a_w) if b is None else mu * p.cot_new_buffer)
            out_state[_BUFFER] = cot_bufs
        return StateCotangent(cot_params, out_state, [sign * p.cot_grad_hat for p in parts])

    def _state_vjp_foreach(
        self,
        hp: dict[str, Hyper],
        flags: dict[str, object],
        cotangent_params: list[Tensor],
        cotangent_state: RuleState,
        *,
        in_place: bool = False,
    ) -> StateCotangent:
        """The products of the module docstring with foreach kernels, every buffer present;
        ``in_place``: written into the cotangent's weight and buffer blocks (``r`` is new).

        They are linear in the cotangent and need none of the step's forward quantities.
        """
        mu, wd = hp["momentum"], hp["weight_decay"]
        a_w = cotangent_params
        cot_new_b, cot_g_hat = _cotangents_foreach(
            hp, flags, a_w, cotangent_state, in_place=in_place
        )
        out_state: RuleState = {}
        if cot_new_b is not None:
            if in_place:
                torch._foreach_mul_(cot_new_b, mu)
            else:
                cot_new_b = list(torch._foreach_mul(cot_new_b, mu))
            out_state[_BUFFER] = list(cot_new_b)
        if in_place:
            cot_params = list(a_w)
            if not is_zero(wd):
                add_scaled_(cot_params, cot_g_hat, wd)
        else:
            cot_params = [x.clone() for x in a_w] if is_zero(wd) else add_scaled(a_w, cot_g_hat, wd)
        if flags["maximize"]:  # c_ĝ is this call's own tensor
            torch._foreach_neg_(cot_g_hat)
        return StateCotangent(cot_params, out_state, cot_g_hat)

    def state_vjp_whole(self, flags: dict[str, object], linearised: bool) -> bool:
        """:meth:`state_vjp_` makes no temporary but its result ``r``: it runs on the whole
        tensors, not in pieces (which would only add a copy of ``r`` into whole tensors)."""
        return True

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
    ) -> dict[str, list[Tensor]] | None:
        """:meth:`hyper_vjp` summed over each parameter, by inner products
        (:func:`hyper_dots`); ``None`` where that does not apply."""
        return hyper_dots(params, grads, state, hp, flags, cotangent_params, cotangent_state, names)

    def state_vjp_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: RuleState,
        hp: dict[str, Hyper],
        flags: dict[str, object],
        cotangent_params: list[Tensor],
        cotangent_state: RuleState,
    ) -> StateCotangent:
        """:meth:`state_vjp` written into the cotangent's own tensors where it can (the
        weights' and the buffer's blocks): one new parameter-sized tensor, ``r``.  The caller
        gives up the cotangent."""
        bufs = state.get(_BUFFER, [None] * len(params))
        if _uses_buffer(hp) and not all(b is not None for b in bufs):
            return self.state_vjp(
                params, grads, state, hp, flags, cotangent_params, cotangent_state
            )
        return self._state_vjp_foreach(hp, flags, cotangent_params, cotangent_state, in_place=True)

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
        bufs = state.get(_BUFFER, [None] * len(params))
        if not _uses_buffer(hp):
            return _hyper_vjp_foreach(
                params, grads, [], hp, flags, cotangent_params, cotangent_state, names
            )
        if all(b is not None for b in bufs):
            return _hyper_vjp_foreach(
                params, grads, present(bufs), hp, flags, cotangent_params, cotangent_state, names
            )
        # a parameter's first step (no buffer yet): one tensor at a time
        parts = self._backward(params, grads, state, hp, flags, cotangent_params, cotangent_state)
        out: dict[str, list[Tensor]] = {}
        for name in names:
            if name == "lr":
                out[name] = [
                    -a_w * p.direction for a_w, p in zip(cotangent_params, parts, strict=True)
                ]
            elif name == "weight_decay":
                out[name] = [p.cot_grad_hat * w for w, p in zip(params, parts, strict=True)]
            elif name == "momentum":
                terms = []
                for a_w, b, lr, p in zip(
                    cotangent_params, bufs, as_list(hp["lr"], params), parts, strict=True
                ):
                    assert p.cot_new_buffer is not None and p.new_buffer is not None
                    term = torch.zeros_like(a_w) if b is None else p.cot_new_buffer * b
                    if flags["nesterov"]:
                        term = term - lr * a_w * p.new_buffer
                    terms.append(term)
                out[name] = terms
            else:
                raise ValueError(f"SGD has no learnable hyperparameter {name!r}")
        return out
