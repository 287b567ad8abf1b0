r"""Hessian-vector products of the training loss, on the step's training batch.

Two interchangeable providers (DESIGN §4), both called with one direction per active
parameter and returning :math:`H d` in the same layout:

* :class:`AutogradHVP` — exact: double backward through the gradient of the step's loss,
  computed with ``create_graph=True``.  Needs a closure that returns the loss *without*
  calling ``backward()`` and every op of the model to support double backward.
* :class:`FiniteDifferenceHVP` — :math:`H d \approx (\nabla L(w + \epsilon d) - \nabla L(w -
  \epsilon d)) / 2\epsilon` (``central``), or :math:`(\nabla L(w + \epsilon d) - g)/\epsilon`
  reusing the step's own gradient ``g`` (``forward``: one closure call per product).  Works
  with torch's ordinary closure, which runs backward itself, and so with any op, fused
  kernel, AMP or DDP.  :math:`\epsilon = \delta \max(1, \lVert w\rVert)/\lVert d\rVert`
  with :math:`\delta = u^{1/3}` (central) or :math:`u^{1/2}` (forward), ``u`` the unit
  roundoff of the parameters' dtype: the step that balances truncation and rounding error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

__all__ = [
    "AutogradHVP",
    "FiniteDifferenceHVP",
    "FunctionalHVP",
    "batched_products",
    "clone_parameter_saves",
    "products_in_a_row",
]

_pending: ContextVar[list[FiniteDifferenceHVP] | None] = ContextVar("_pending", default=None)
"""The finite-difference providers whose weights wait to be put back by the innermost open
:func:`products_in_a_row` of this thread (a context variable: another thread's products, or
another task's, are not deferred by it)."""


@contextmanager
def products_in_a_row() -> Iterator[None]:
    """Finite-difference products taken inside put the weights back once, on leaving.

    Each product starts by writing ``w + εd`` over the live weights from the point, so putting
    them back after every product (the step redone from the point: several passes over the
    weights) is needed only before something else reads them.  Use it around a sequence of
    products with nothing in between that reads the live weights (the Neumann series, which
    works on the snapshot's copies).  The weights are put back however the block is left.
    """
    pending: list[FiniteDifferenceHVP] = []
    token = _pending.set(pending)
    try:
        yield
    finally:
        _pending.reset(token)
        for provider in pending:  # (into an enclosing block's list, if one is open)
            provider._put_back()


@contextmanager
def clone_parameter_saves(params: list[Tensor]) -> Iterator[None]:
    """Make autograd save copies of the parameters (and their views) in the graph built here.

    The step then updates the parameters in place while the graph of the pre-step loss stays
    valid for the Hessian-vector products that follow.  Other saved tensors are kept as
    detached aliases (no copy): an op that saves its own output (tanh, sigmoid...) would
    otherwise hold its graph node through the tensor and leak the graph in a reference cycle
    that Python's collector cannot see; autograd restores the history when it unpacks.
    """
    pointers = {p.untyped_storage().data_ptr() for p in params}

    def pack(t: Tensor) -> Tensor:
        try:
            shared = t.untyped_storage().data_ptr() in pointers
        except (RuntimeError, NotImplementedError):  # tensors without storage
            shared = False
        return t.detach().clone() if shared else t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


class AutogradHVP:
    """Exact products by double backward.

    Args:
        params: the parameters, as leaves of the graph.
        grads: their gradient at the pre-step point, computed with ``create_graph=True``.
    """

    def __init__(self, params: list[Tensor], grads: list[Tensor]) -> None:
        self._pairs = [(p, g) for p, g in zip(params, grads, strict=True) if g.requires_grad]
        self._params = params

    def __call__(self, directions: list[Tensor]) -> list[Tensor]:
        index = {id(p): i for i, p in enumerate(self._params)}
        if not self._pairs:
            return [torch.zeros_like(d) for d in directions]
        inputs = [p for p, _ in self._pairs]
        outputs = [g for _, g in self._pairs]
        grad_outputs = [directions[index[id(p)]] for p in inputs]
        products: list[Tensor | None] = list(
            torch.autograd.grad(
                outputs, self._params, grad_outputs, retain_graph=True, allow_unused=True
            )
        )
        del inputs
        return [
            torch.zeros_like(d) if hd is None else hd.detach()
            for hd, d in zip(products, directions, strict=True)
        ]

    def mixed(self, directions: list[Tensor], wrt: list[Tensor]) -> list[Tensor]:
        r"""The mixed products :math:`\partial_\lambda \langle d, \nabla_w L(w, \lambda)\rangle`
        for the tensors ``wrt`` that the loss reads (its hyperparameters): the same double
        backward as a product, to other leaves of the graph."""
        index = {id(p): i for i, p in enumerate(self._params)}
        if not self._pairs or not wrt:
            return [torch.zeros_like(x) for x in wrt]
        outputs = [g for _, g in self._pairs]
        grad_outputs = [directions[index[id(p)]] for p, _ in self._pairs]
        products: list[Tensor | None] = list(
            torch.autograd.grad(outputs, wrt, grad_outputs, retain_graph=True, allow_unused=True)
        )
        return [
            torch.zeros_like(x) if m is None else m.detach()
            for m, x in zip(products, wrt, strict=True)
        ]

    def batched(self, directions: list[Tensor]) -> list[Tensor]:
        """``H d`` for every leading column of ``directions`` in one batched double backward
        (``is_grads_batched``: autograd maps the backward over the columns)."""
        index = {id(p): i for i, p in enumerate(self._params)}
        if not self._pairs or not directions or directions[0].shape[0] == 0:
            return [torch.zeros_like(d) for d in directions]
        outputs = [g for _, g in self._pairs]
        grad_outputs = [directions[index[id(p)]] for p, _ in self._pairs]
        products: list[Tensor | None] = list(
            torch.autograd.grad(
                outputs,
                self._params,
                grad_outputs,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        )
        return [
            torch.zeros_like(d) if hd is None else hd.detach()
            for hd, d in zip(products, directions, strict=True)
        ]


class FiniteDifferenceHVP:
    """Products by differences of gradients; restores the parameters afterwards.

    Args:
        params: the live parameter tensors (they are moved and put back).
        point: the weights to differentiate at (the pre-step weights).
        grad_at_point: the gradient there (reused by ``forward`` differences); ``None``: they
            evaluate it at the first product.
        gradient: evaluates the training gradient at the parameters' current values.
        central: central differences (two gradient evaluations per product) or forward ones.
        fresh: ``gradient`` returns new tensors that nothing writes to afterwards (else they
            are copied: DDP's gradient buckets are reused by the next backward).
        restore: puts the parameters back after each product (e.g. by redoing the step from
            the point, bit for bit); ``None``: a copy of their values now is put back.
        extra: the gradient of the loss's hyperparameters at the last evaluation of
            ``gradient`` (for :meth:`mixed`); ``extra_at_point``: theirs at the point, when the
            step's own evaluation gave it.
    """

    def __init__(
        self,
        params: list[Tensor],
        point: list[Tensor],
        grad_at_point: list[Tensor] | None,
        gradient: Callable[[], list[Tensor]],
        *,
        central: bool = True,
        fresh: bool = False,
        restore: Callable[[], None] | None = None,
        extra: Callable[[], list[Tensor]] | None = None,
        extra_at_point: list[Tensor] | None = None,
    ) -> None:
        self._params = params
        self._extra = extra
        self._extra_at_point = extra_at_point
        self._fresh = fresh
        self._point = point
        self._grad = grad_at_point
        self._gradient = gradient
        self._central = central
        roundoff = max(torch.finfo(p.dtype).eps for p in params) / 2 if params else 1.0
        self._delta = roundoff ** (1 / 3) if central else roundoff**0.5
        self._point_norm = _norm(point)
        aliased = any(x.data_ptr() == p.data_ptr() for x, p in zip(point, params, strict=True))
        self._restore = None if aliased else restore
        self._current: list[Tensor] = []
        self._moved = False  # the live weights are off the point's (put back when False)
        if self._restore is None:
            with torch.no_grad():  # the weights to put back after each product
                self._current = [p.detach().clone() for p in params]
            # a point that is the live weights themselves (no copy was planned) would move
            # with them: differentiate at the copy taken now instead
            self._point = [
                c if x.data_ptr() == p.data_ptr() else x
                for x, p, c in zip(point, params, self._current, strict=True)
            ]

    def _eps(self, directions: list[Tensor]) -> float | None:
        """The step along ``directions``; ``None`` for a zero or non-finite direction, whose
        product is taken as zero."""
        d_norm = _norm(directions)
        if d_norm == 0 or not math.isfinite(d_norm):
            return None
        return float(self._delta * max(1.0, self._point_norm) / d_norm)

    def __call__(self, directions: list[Tensor]) -> list[Tensor]:
        eps = self._eps(directions)
        if eps is None:
            return [torch.zeros_like(d) for d in directions]
        try:
            plus = self._at(directions, eps)
            if self._central:  # one gradient besides the result at a time
                torch._foreach_sub_(plus, self._at(directions, -eps))
                torch._foreach_div_(plus, 2 * eps)
            else:
                if self._grad is None:
                    self._grad = self._at(directions, 0.0)
                torch._foreach_sub_(plus, self._grad)
                torch._foreach_div_(plus, eps)
        finally:
            self._put_back()
        return plus

    def add_to(self, directions: list[Tensor], targets: list[Tensor]) -> None:
        """``targets += H d``.  Central differences with the gradient at the point at hand
        add ``(∇L(w + εd) − g)/2ε`` and then subtract ``(∇L(w − εd) − g)/2ε``, so that one
        gradient is held at a time (the same difference, rounded in another order)."""
        if not self._central:  # (∇L(w + εd) − g)/ε, the difference scaled as it is added
            eps = self._eps(directions)
            if eps is None:
                return
            try:
                if self._grad is None:
                    self._grad = self._at(directions, 0.0)
                moved = self._at(directions, eps)
                torch._foreach_sub_(moved, self._grad)
                torch._foreach_add_(targets, moved, alpha=1 / eps)
                del moved
            finally:
                self._put_back()
            return
        if self._grad is None:
            torch._foreach_add_(targets, self(directions))
            return
        eps = self._eps(directions)
        if eps is None:
            return
        try:
            for sign in (1.0, -1.0):
                moved = self._at(directions, sign * eps)
                torch._foreach_sub_(moved, self._grad)
                torch._foreach_add_(targets, moved, alpha=sign / (2 * eps))
                del moved
        finally:
            self._put_back()

    def mixed(self, directions: list[Tensor], wrt: list[Tensor]) -> list[Tensor]:
        r"""The mixed products :math:`\partial_\lambda \langle d, \nabla_w L\rangle` for the
        loss's hyperparameters ``wrt``, by differences of their gradient along ``d``:
        :math:`(\nabla_\lambda L(w + \epsilon d) - \nabla_\lambda L(w - \epsilon d))/2\epsilon`,
        or forward ones from their gradient at the point, with the products' step."""
        if self._extra is None:
            raise RuntimeError("mixed products need the gradient of the loss's hyperparameters")
        eps = self._eps(directions)
        if eps is None:
            return [torch.zeros_like(x) for x in wrt]
        try:
            plus = self._extra_at(directions, eps)
            if self._central:
                minus = self._extra_at(directions, -eps)
                torch._foreach_sub_(plus, minus)
                torch._foreach_div_(plus, 2 * eps)
            else:
                if self._extra_at_point is None:
                    self._extra_at_point = self._extra_at(directions, 0.0)
                torch._foreach_sub_(plus, self._extra_at_point)
                torch._foreach_div_(plus, eps)
        finally:
            self._put_back()
        return plus

    def _extra_at(self, directions: list[Tensor], eps: float) -> list[Tensor]:
        assert self._extra is not None
        self._at(directions, eps)
        return [x.detach().clone() for x in self._extra()]

    def _put_back(self) -> None:
        """The parameters back where they were when the products began; inside
        :func:`products_in_a_row`, when it is left."""
        if not self._moved:
            return
        pending = _pending.get()
        if pending is not None:
            if all(p is not self for p in pending):
                pending.append(self)
            return
        self._moved = False
        with torch.no_grad():
            if self._restore is not None:
                self._restore()
            else:
                torch._foreach_copy_(self._params, self._current)

    def _at(self, directions: list[Tensor], eps: float) -> list[Tensor]:
        self._moved = True
        with torch.no_grad():
            torch._foreach_copy_(self._params, self._point)
            torch._foreach_add_(self._params, directions, alpha=eps)
        grads = [
            (g.detach() if g.requires_grad else g) if self._fresh else g.detach().clone()
            for g in self._gradient()
        ]
        for p in self._params:  # a closure's backward() left them there: held here alone
            p.grad = None
        return grads


def _norm(xs: list[Tensor]) -> float:
    if not xs:
        return 0.0
    norms = list(torch._foreach_norm(xs))
    if len({(n.device, n.dtype) for n in norms}) > 1:  # one stack of float64 host numbers
        norms = [n.to(device="cpu", dtype=torch.float64) for n in norms]
    return float(torch.linalg.vector_norm(torch.stack(norms).to(torch.float64)))


_NO_FORWARD_AD = ("ZeroTensors are immutable", "Trying to use forward AD with")
"""What torch says when an op's backward has no forward-mode derivative."""


class FunctionalHVP:
    """Exact products for many directions at once, by forward-over-reverse.

    ``H D`` for a batch of directions ``D`` (leading dimension: one column per direction) is
    ``vmap`` over columns of ``jvp`` of ``torch.func.grad`` of the training loss, written as a
    pure function of the parameters' values.

    Args:
        loss_fn: the training loss on the step's batch as a function of a list of tensors
            (the parameters, in order); it must be a pure function (``functional_call``).
        point: the parameters' values to differentiate at.
        chunk_size: columns per ``vmap`` call (``None``: all at once).
    """

    def __init__(
        self,
        loss_fn: Callable[[list[Tensor]], Tensor],
        point: list[Tensor],
        chunk_size: int | None = None,
    ) -> None:
        self._point = tuple(p.detach() for p in point)
        self._chunk_size = chunk_size

        def gradient(*ws: Tensor) -> tuple[Tensor, ...]:
            return tuple(torch.func.grad(lambda xs: loss_fn(list(xs)))(ws))

        def product(*vs: Tensor) -> tuple[Tensor, ...]:
            return tuple(torch.func.jvp(gradient, self._point, vs)[1])

        self._product = product

    def __call__(self, directions: list[Tensor]) -> list[Tensor]:
        """``H d`` for every leading column of ``directions`` (one tensor per parameter)."""
        if not directions or directions[0].shape[0] == 0:
            return [d.clone() for d in directions]
        batched = torch.func.vmap(self._product, chunk_size=self._chunk_size)
        try:
            products = batched(*directions)
        except RuntimeError as error:
            if any(sign in str(error) for sign in _NO_FORWARD_AD):
                raise RuntimeError(
                    "torch.func cannot take the forward-mode derivative of this loss's backward "
                    "(in torch 2.13: nn.functional.mse_loss and huber_loss, among others), which "
                    "exact products with loss_fn need: write the loss with elementary operations, "
                    "e.g. ((out - target) ** 2).mean(), or pass a closure that returns the loss "
                    "without backward() (exact products by double backward)"
                ) from error
            if "mutate a captured Tensor" not in str(error):
                raise
            raise RuntimeError(
                "loss_fn must be a pure function of the parameters for torch.func, but it "
                "changes a tensor in place (batch norm in training mode updates its running "
                "statistics): pass the module's buffers as copies, call "
                "torch.func.replace_all_batch_norm_modules_(model), or use a closure that "
                "returns the loss without backward() (exact batched double backward)"
            ) from error
        return [x.detach() for x in products]


def batched_products(
    product: Callable[[list[Tensor]], list[Tensor]], directions: list[Tensor]
) -> list[Tensor]:
    """A one-direction Hessian-vector product applied to each leading column of ``directions``.

    An all-zero column is skipped (``H·0 = 0``): a window whose value has not acted yet.
    """
    if not directions:
        return []
    out = [torch.zeros_like(d) for d in directions]
    for c in range(directions[0].shape[0]):
        column = [d[c] for d in directions]
        if not any(bool(x.any()) for x in column):
            continue
        for target, hd in zip(out, product(column), strict=True):
            target[c].copy_(hd)
    return out
