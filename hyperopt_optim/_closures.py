"""The training and validation closures, and the Hessian-vector products they give.

A training closure follows torch's convention (it calls ``backward()``) or only returns the
loss, in which case the optimizer differentiates it — keeping the graph when exact products
will be taken.  Which one a closure is shows in the post-accumulate-grad hooks of the
parameters.  ``hvp="auto"`` resolves, closure by closure, to ``"autograd"`` (the loss alone)
or to differences (torch's convention): forward ones for ``"greedy"``/``"ift"``, central
ones for ``"forward"`` (``HypergradientMethod.auto_differences``).  ``step(loss_fn=...)``
gives the loss as a pure function of the parameters, for exact batched products by
``torch.func``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, cast

import torch
from torch import Tensor

from ._checks import check_batch_fraction_closure, check_training_loss, check_validation_loss
from ._distributed import Replicas
from .hypergradients._base import Closure, GroupSnapshot
from .hypergradients.hvp import (
    AutogradHVP,
    FiniteDifferenceHVP,
    FunctionalHVP,
    batched_products,
    clone_parameter_saves,
)

__all__ = ["EXACT_HVPS", "Closures", "LossFn", "StepProducts", "grad", "validation_gradient"]

EXACT_HVPS = ("autograd", "autograd_batched")
DIFFERENCES = ("finite_difference", "forward_difference")
LossFn = Callable[[list[Tensor]], Tensor]
HVP = Callable[[list[Tensor]], list[Tensor]]


def grad(
    output: Tensor, inputs: list[Tensor], *, create_graph: bool = False
) -> list[Tensor | None]:
    """``torch.autograd.grad`` with ``None`` for inputs the output does not depend on."""
    grads = torch.autograd.grad(output, inputs, create_graph=create_graph, allow_unused=True)
    return cast(list[Tensor | None], list(grads))


def _zeros_for_none(grads: list[Tensor | None], like: list[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) if g is None else g for p, g in zip(like, grads, strict=True)]


def _grads_of(xs: list[Tensor]) -> list[Tensor]:
    """The ``.grad`` of each of ``xs`` (zeros for none), detached."""
    return [torch.zeros_like(x) if x.grad is None else x.grad.detach() for x in xs]


def validation_gradient(
    val_closure: Closure,
    params: list[Tensor],
    skip: Callable[[str], None],
    seen: Callable[[float], None] | None = None,
    *,
    replicas: Replicas | None = None,
    scale: float | None = None,
) -> list[Tensor] | None:
    """``∇_w L_V`` for ``params``; ``None`` after ``skip(why)`` when the loss is not finite.
    A parameter that does not require a gradient (frozen) gets zeros; ``seen`` is given the
    finite loss.

    Args:
        replicas: data-parallel ranks: the loss and the gradient are their averages (a
            non-finite loss on any rank skips on every rank).
        scale: a gradient scaler's scale: the loss is multiplied by it before it is
            differentiated and the gradient divided by it after (exact for a power of two), so
            that half-precision intermediates keep their range.
    """
    variable = [p for p in params if p.requires_grad]
    with torch.enable_grad():
        value = check_validation_loss(val_closure())
        shared = value.detach() if replicas is None else replicas.mean_loss(value)
        number = float(shared)
        if not math.isfinite(number):
            skip(f"the validation loss is {number}")
            return None
        if seen is not None:
            seen(number)
        try:
            scaled = value if scale is None else value * scale
            grads = dict(zip(map(id, variable), grad(scaled, variable), strict=True))
        except RuntimeError as err:
            if "second time" not in str(err):
                raise
            raise RuntimeError(
                "val_closure must return the validation loss without calling backward(): the "
                "optimizer differentiates it itself, and a backward() inside the closure has "
                "already freed its graph (torch: 'Trying to backward through the graph a second "
                "time')"
            ) from err
    out = [torch.zeros_like(p) if (g := grads.get(id(p))) is None else g for p in params]
    return _shared(out, replicas, scale)


def _shared(grads: list[Tensor], replicas: Replicas | None, scale: float | None) -> list[Tensor]:
    """Gradients the optimizer took itself, unscaled and averaged over the ranks."""
    if scale is not None and grads:
        grads = list(torch._foreach_div(grads, scale))
    if replicas is not None:
        replicas.mean_(grads)
    return grads


class StepProducts:
    """Hessian-vector products at ``w_t`` on one step's batch, over ``live`` (the
    concatenation of every group's live parameters).

    Args:
        make: builds the one-direction product when it is first asked for (finite differences
            keep the weights of that moment, to put back after each product).
        columns: products of many columns at once, when the provider batches them.
    """

    def __init__(self, make: Callable[[], HVP], columns: HVP | None = None) -> None:
        self._make = make
        self._single: HVP | None = None
        self._columns = columns

    def __call__(self, directions: list[Tensor]) -> list[Tensor]:
        if self._single is None:
            self._single = self._make()
        return self._single(directions)

    def columns(self, directions: list[Tensor]) -> list[Tensor]:
        if self._columns is not None:
            return self._columns(directions)
        return batched_products(self, directions)

    def mixed(self, directions: list[Tensor], wrt: list[Tensor]) -> list[Tensor]:
        r"""``∂/∂λ ⟨d, ∇_w L(w, λ)⟩`` for the tensors ``wrt`` the training loss reads."""
        if self._single is None:
            self._single = self._make()
        mixed = getattr(self._single, "mixed", None)
        if mixed is None:
            raise RuntimeError("these Hessian-vector products give no mixed products")
        return cast(list[Tensor], mixed(directions, wrt))

    def add_to(self, directions: list[Tensor], targets: list[Tensor]) -> None:
        """``targets += H d``, through the provider's own ``add_to`` where it has one
        (finite differences: one gradient held at a time), else by adding the product."""
        if type(self) is StepProducts:
            if self._single is None:
                self._single = self._make()
            add = getattr(self._single, "add_to", None)
            if add is not None:
                add(directions, targets)
                return
        torch._foreach_add_(targets, self(directions))


class Closures:
    """Runs the closures of one optimizer and builds the products of each step.

    Args:
        hvp: the provider the user asked for (``"auto"`` resolves per closure).
    """

    def __init__(
        self,
        hvp: str,
        replicas: Replicas | None = None,
        auto_differences: str = "finite_difference",
    ) -> None:
        self.hvp = hvp
        self.resolved: str | None = None if hvp == "auto" else hvp
        #: the differences ``hvp="auto"`` takes where products cannot be exact (the method's
        #: ``HypergradientMethod.auto_differences``)
        self.auto_differences = auto_differences
        #: data-parallel ranks to average what the optimizer takes itself over
        self.replicas = replicas
        #: the gradient scaler of this step (``None``: none): a closure's ``backward()`` leaves
        #: gradients of the scaled loss, and the optimizer scales the losses it differentiates
        #: itself the same way (the scaler's ``scale`` initialises its factor on their device)
        self.scaler: Any = None
        self._scale: float | None = None
        #: the model cannot be differentiated twice (torch.compile): no exact products
        self.no_double_backward = False
        self._count = [0]
        self._handles: list[Any] = []
        self._graph: dict[int, Tensor] | None = None
        self._functional: tuple[FunctionalHVP, list[Tensor]] | None = None
        #: the products are taken on this fraction of the step's batch (``hvp_batch_fraction``)
        self.batch_fraction = 1.0
        #: this step's closure returned the loss without calling backward()
        self._loss_only = False
        #: the step's update is done: finite differences put the weights back by redoing it
        self.updated = False
        #: tensors the training loss reads whose hypergradients are taken (the optimizer's
        #: ``loss_hyperparameters``): the products also give their mixed products
        self.loss_hyper: list[Tensor] = []
        #: their gradient at the step's point (raw: of the scaled loss, this rank's), and at
        #: the last evaluation for a product (unscaled, averaged over the ranks)
        self._extra_at_point: list[Tensor] | None = None
        self._extra_last: list[Tensor] = []

    def watch(self, p: Tensor) -> None:
        """Count the backward passes that reach ``p`` (torch's closure calls ``backward()``)."""
        counter = self._count
        hook = p.register_post_accumulate_grad_hook  # untyped in torch
        self._handles.append(hook(lambda _p, c=counter: c.__setitem__(0, c[0] + 1)))  # type: ignore[no-untyped-call]

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def finite_differences(self) -> bool:
        """Whether this step's products are differences of gradients."""
        return self._graph is None and self._functional is None

    # -- the training closure ----------------------------------------------------------------

    def run(
        self, closure: Closure | None, loss_fn: LossFn | None, trainable: list[Tensor], exact: bool
    ) -> Any:
        """Evaluate the step's training loss and leave its gradient in ``.grad``.

        Args:
            closure, loss_fn: the step's training closure or loss function (at most one).
            trainable: every parameter that requires a gradient, in the groups' order.
            exact: products will be taken on this step: keep what exact ones need.
        Returns:
            what the closure or ``loss_fn`` returned.
        """
        self._graph, self._functional = None, None
        self.updated = False
        self._extra_at_point = None
        for x in self.loss_hyper:  # a closure's backward() adds to them: this step's alone
            x.grad = None
        if loss_fn is not None:
            with torch.enable_grad():
                loss = check_training_loss(loss_fn(trainable))
                grads = grad(self._scaled(loss), trainable)
            self._set_gradients(trainable, grads)  # unused: skipped, as torch does
            if exact:
                self._functional = (FunctionalHVP(loss_fn, trainable), trainable)
            return loss
        if closure is None:  # the gradients are in .grad already: DDP must have averaged them
            if self.replicas is not None:
                self.replicas.check_gradients([p.grad for p in trainable if p.grad is not None])
            return None
        graph_wanted = (
            exact
            and self.batch_fraction == 1.0
            and not self.no_double_backward
            and self.resolved in (None, *EXACT_HVPS)
        )
        self._loss_only = False
        before = self._count[0]
        saves = clone_parameter_saves(trainable) if graph_wanted else nullcontext()
        with torch.enable_grad(), saves:
            loss = closure()
            if self._count[0] != before:  # torch's convention: backward was called
                if self.hvp in EXACT_HVPS and graph_wanted:
                    raise RuntimeError(
                        f"hvp={self.hvp!r} needs a closure that returns the loss without calling "
                        "backward(); use hvp='finite_difference' with torch's ordinary closure"
                    )
                if self.hvp == "auto":  # decided by the closure in hand, step by step
                    self.resolved = self._auto_differences()
                if self.replicas is not None:  # DDP's backward() must have averaged them
                    self.replicas.check_gradients([p.grad for p in trainable if p.grad is not None])
                if exact and self.loss_hyper:
                    self._extra_at_point = _grads_of(self.loss_hyper)
                return loss
            self._loss_only = True
            scaled = self._scaled(check_training_loss(loss))
            extra = self.loss_hyper if exact else []
            try:
                grads = grad(scaled, trainable + extra, create_graph=graph_wanted)
            except RuntimeError as err:
                if not (graph_wanted and _no_double_backward(err)):
                    raise
                self.fall_back(err)
                return self.run(closure, loss_fn, trainable, exact)  # again, without a graph
        if extra:
            grads, at_point = grads[: len(trainable)], grads[len(trainable) :]
            self._extra_at_point = _zeros_for_none(
                [g.detach() if g is not None else None for g in at_point], extra
            )
        self._set_gradients(trainable, grads)
        if self.hvp == "auto":
            self.resolved = self._auto_differences() if self.no_double_backward else "autograd"
        if graph_wanted:
            self._graph = {id(p): g for p, g in zip(trainable, grads, strict=True) if g is not None}
        return loss

    def _auto_differences(self) -> str:
        """The differences ``hvp="auto"`` takes: those it took before where a loaded state dict
        says so (central ones, saved by 0.1.0's ``"auto"``: the run goes on as it did), else
        the method's ``auto_differences``."""
        if self.resolved in DIFFERENCES:
            return self.resolved
        return self.auto_differences

    @property
    def _auto_central(self) -> bool:
        return self._auto_differences() == "finite_difference"

    def fall_back(self, err: RuntimeError) -> None:
        """The model cannot be differentiated twice (a ``torch.compile``-d model): with
        ``hvp="auto"``, warn once and take its differences from now on; with an exact
        provider asked for by name, say what to use instead."""
        if self.hvp != "auto":
            raise RuntimeError(
                f"hvp={self.hvp!r} takes exact Hessian-vector products by double backward, "
                "which this model does not support (a torch.compile-d model, or a function "
                "marked @once_differentiable, does not); use "
                "hvp='finite_difference' or 'forward_difference' (or hvp='auto', which falls "
                "back to differences)"
            ) from err
        self.no_double_backward = True
        self.resolved = self._auto_differences()
        warnings.warn(
            "the model cannot be differentiated twice (torch.compile does not support double "
            "backward, nor does a function marked @once_differentiable), so exact "
            "Hessian-vector products are impossible: hvp='auto' takes "
            f"{'central' if self._auto_central else 'forward'} finite differences from now on "
            f"(torch: {str(err).splitlines()[0][:160]})",
            RuntimeWarning,
            stacklevel=2,
        )

    def use_scaler(self, scaler: Any) -> None:
        """The gradient scaler of this step (``None``: none)."""
        self.scaler, self._scale = scaler, None

    @property
    def scale(self) -> float | None:
        """The scaler's factor as a float, read (a host sync) only when a hyper-step needs it."""
        if self.scaler is None:
            return None
        if self._scale is None:
            self._scale = float(self.scaler.get_scale())
        return self._scale

    def _scaled(self, loss: Tensor) -> Tensor:
        if self.scaler is None:
            return loss
        return cast(Tensor, self.scaler.scale(loss))

    def _set_gradients(self, trainable: list[Tensor], grads: list[Tensor | None]) -> None:
        """Leave the gradients the optimizer took in ``.grad``, averaged over the ranks (still
        of the scaled loss, as a closure's ``backward()`` under a gradient scaler leaves them)."""
        detached = [None if g is None else g.detach() for g in grads]
        if self.replicas is not None:  # copies: a kept graph holds these very tensors
            taken = iter(self.replicas.mean([g for g in detached if g is not None]))
            detached = [None if g is None else next(taken) for g in detached]
        for p, g in zip(trainable, detached, strict=True):
            p.grad = g

    def gradient(self, closure: Closure, live: list[Tensor]) -> list[Tensor]:
        """The training gradient of ``live`` at the parameters' current values (unscaled, and
        averaged over the ranks)."""
        before = self._count[0]
        extra = self.loss_hyper
        for p in (*live, *extra):  # a closure that does not zero them (gradient accumulation)
            p.grad = None  # adds to them; the step's own gradient is kept elsewhere
        with torch.enable_grad():
            loss = closure()
            if self._count[0] != before:  # averaged by DDP's backward(), if distributed
                grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in live]
                if extra:  # this rank's (the loss's hyperparameters are not DDP's)
                    self._extra_last = _shared(_grads_of(extra), self.replicas, self.scale)
                    for x in extra:
                        x.grad = None
                return _shared(grads, None, self.scale)
            loss = self._scaled(check_training_loss(loss))
            grads = _zeros_for_none(grad(loss, live + extra), live + extra)
        if extra:
            grads, lam = grads[: len(live)], grads[len(live) :]
            self._extra_last = _shared(lam, self.replicas, self.scale)
        return _shared(grads, self.replicas, self.scale)

    def extra_at_point(self) -> list[Tensor] | None:
        """The gradient of the loss's hyperparameters at the step's point (unscaled, averaged
        over the ranks), when the step's evaluation gave it."""
        if self._extra_at_point is None:
            return None
        return _shared([x.clone() for x in self._extra_at_point], self.replicas, self.scale)

    def _exact(self, products: StepProducts, *, scaled: bool = True) -> StepProducts:
        """Exact products of this rank's loss (``scaled``: of the scaled loss): unscaled and
        averaged over the ranks."""
        scale = self.scale if scaled else None
        if scale is None and self.replicas is None:
            return products
        replicas = self.replicas
        return _Mapped(products, lambda xs: _shared(xs, replicas, scale))

    # -- the products ------------------------------------------------------------------------

    def products(self, closure: Closure | None, groups: list[GroupSnapshot]) -> StepProducts | None:
        """The step's products over the groups' live parameters, at the snapshot's point;
        ``None`` without a training closure or ``loss_fn``.

        A live parameter that does not require a gradient (frozen, with a stale ``.grad`` that
        the update still uses, as torch's optimizers do) is not a variable of the loss: its
        products are zero, and finite differences leave it where it is.
        """
        live = [p for g in groups for p in g.live]
        variable = [i for i, p in enumerate(live) if p.requires_grad]
        products = self._products(closure, groups, variable)
        if products is None or len(variable) == len(live):
            return products
        return _Scattered(products, variable)

    def _products(
        self, closure: Closure | None, groups: list[GroupSnapshot], variable: list[int]
    ) -> StepProducts | None:
        """The products over the live parameters at positions ``variable``."""

        def pick(xs: list[Tensor]) -> list[Tensor]:
            return [xs[i] for i in variable]

        live = pick([p for g in groups for p in g.live])
        if self._functional is not None:
            # the products own what they need: dropping them frees it (see StepContext.hvp)
            (functional, trainable), self._functional = self._functional, None
            columns = _functional_columns(functional, trainable, live)
            # loss_fn itself is not scaled: its products are averaged, not unscaled
            return self._exact(StepProducts(lambda: _one_column(columns), columns), scaled=False)
        if closure is not None and self.batch_fraction < 1.0:
            return self._sub_batch(closure, groups, pick)
        if self._graph is not None:
            graph, self._graph = self._graph, None
            provider = AutogradHVP(live, [graph.get(id(p), torch.zeros_like(p)) for p in live])
            batched = provider.batched if self.hvp == "autograd_batched" else None
            exact = self._exact(StepProducts(lambda: provider, batched))
            if closure is None:
                return exact
            fallback = self._differences(closure, groups, pick, central=self._auto_central)
            return _Fallback(self, exact, fallback)
        if closure is None:
            return None
        central = self.resolved != "forward_difference"
        return self._differences(closure, groups, pick, central=central)

    def _sub_batch(
        self,
        closure: Closure,
        groups: list[GroupSnapshot],
        pick: Callable[[list[Tensor]], list[Tensor]],
    ) -> StepProducts:
        """Products on a fraction of the step's batch: ``closure(batch_fraction=f)``
        evaluates the training loss on it.  Exact ones (a closure that returns the loss alone)
        differentiate that loss with a graph, at the pre-step weights (the update that follows
        does not disturb the graph's copies); differences evaluate it at moved weights, and
        forward differences at the point too, since the step's own gradient is of the whole
        batch."""
        check_batch_fraction_closure(closure)
        fraction = self.batch_fraction

        def sub() -> Any:
            return closure(batch_fraction=fraction)  # type: ignore[call-arg]

        forward = self.resolved == "forward_difference"
        exact = self._loss_only and not self.no_double_backward and self.resolved in EXACT_HVPS
        if not exact:
            return self._differences(sub, groups, pick, central=not forward, at_point=False)
        live = pick([p for g in groups for p in g.live])
        before = self._count[0]
        with torch.enable_grad(), clone_parameter_saves(live):
            loss = sub()
            if self._count[0] != before:
                raise RuntimeError(
                    "closure(batch_fraction=...) called backward() where the step's closure "
                    "did not: a closure must do the same with and without batch_fraction"
                )
            try:
                grads = grad(self._scaled(check_training_loss(loss)), live, create_graph=True)
            except RuntimeError as err:
                if not _no_double_backward(err):
                    raise
                self.fall_back(err)
                return self._differences(
                    sub, groups, pick, central=self._auto_central, at_point=False
                )
        provider = AutogradHVP(live, _zeros_for_none(grads, live))
        exact_products = self._exact(StepProducts(lambda: provider))
        fallback = self._differences(sub, groups, pick, central=self._auto_central, at_point=False)
        return _Fallback(self, exact_products, fallback)

    def _differences(
        self,
        closure: Closure,
        groups: list[GroupSnapshot],
        pick: Callable[[list[Tensor]], list[Tensor]],
        *,
        central: bool,
        at_point: bool = True,
    ) -> StepProducts:
        """Differences of ``closure``'s gradient; ``at_point``: the step's own gradient is
        that gradient at the point (else forward differences evaluate it there)."""
        live = pick([p for g in groups for p in g.live])
        point = pick([x for g in groups for x in g.params])
        # the step's own, unclipped
        grad_at_point = pick([x for g in groups for x in g.grads]) if at_point else None
        # without replicas, every evaluation's gradient is new (``gradient`` clears .grad
        # first); DDP may write the next one into the same buckets
        fresh = self.replicas is None

        def redo() -> None:
            for g in groups:
                g.redo()

        def make() -> FiniteDifferenceHVP:
            # after the update, the weights it made are put back by redoing it from the point
            # (bit for bit) rather than from a copy of them
            can_redo = self.updated and all(g.can_redo for g in groups)
            return FiniteDifferenceHVP(
                live,
                point,
                grad_at_point,
                lambda: self.gradient(closure, live),
                central=central,
                fresh=fresh,
                restore=redo if can_redo else None,
                extra=(lambda: self._extra_last) if self.loss_hyper else None,
                extra_at_point=self.extra_at_point() if at_point and self.loss_hyper else None,
            )

        return StepProducts(make)

    def release(self) -> None:
        """Drop the step's graph."""
        self._graph, self._functional = None, None


#: what autograd says when a graph cannot be differentiated twice: AOTAutograd (torch.compile),
#: with and without donated buffers; ``@once_differentiable`` functions, when torch notices (a
#: function whose saved inputs are the only path to a parameter gives a zero product silently)
_NO_DOUBLE_BACKWARD = ("double backward", "donated buffers", "differentiate twice")


def _no_double_backward(err: RuntimeError) -> bool:
    """Whether ``err`` is autograd saying the graph cannot be differentiated twice."""
    text = str(err)
    return any(words in text for words in _NO_DOUBLE_BACKWARD)


class _Fallback(StepProducts):
    """Exact products, or ``hvp="auto"``'s differences from the first one that double backward
    refuses (a compiled model whose first backward with a graph succeeded)."""

    def __init__(self, owner: Closures, exact: StepProducts, differences: StepProducts) -> None:
        self._owner = owner
        self._exact: StepProducts | None = exact
        self._differences = differences

    def _run(self, how: Callable[[StepProducts], list[Tensor]]) -> list[Tensor]:
        if self._exact is not None:
            try:
                return how(self._exact)
            except RuntimeError as err:
                if not _no_double_backward(err):
                    raise
                self._owner.fall_back(err)
                self._exact = None
        return how(self._differences)

    def __call__(self, directions: list[Tensor]) -> list[Tensor]:
        return self._run(lambda products: products(directions))

    def columns(self, directions: list[Tensor]) -> list[Tensor]:
        return self._run(lambda products: products.columns(directions))

    def mixed(self, directions: list[Tensor], wrt: list[Tensor]) -> list[Tensor]:
        return self._run(lambda products: products.mixed(directions, wrt))

    def add_to(self, directions: list[Tensor], targets: list[Tensor]) -> None:
        if self._exact is None:
            self._differences.add_to(directions, targets)
        else:
            torch._foreach_add_(targets, self(directions))


class _Mapped(StepProducts):
    """Products passed through ``after`` (unscaling, averaging over the ranks)."""

    def __init__(self, inner: StepProducts, after: Callable[[list[Tensor]], list[Tensor]]) -> None:
        self._inner = inner
        self._after = after

    def __call__(self, directions: list[Tensor]) -> list[Tensor]:
        return self._after(self._inner(directions))

    def columns(self, directions: list[Tensor]) -> list[Tensor]:
        return self._after(self._inner.columns(directions))

    def mixed(self, directions: list[Tensor], wrt: list[Tensor]) -> list[Tensor]:
        return self._after(self._inner.mixed(directions, wrt))


class _Scattered(StepProducts):
    """Products over a subset of the live parameters, zero for the others."""

    def __init__(self, inner: StepProducts, variable: list[int]) -> None:
        self._inner = inner
        self._variable = variable

    def _scatter(self, directions: list[Tensor], products: list[Tensor]) -> list[Tensor]:
        out = [torch.zeros_like(d) for d in directions]
        for i, x in zip(self._variable, products, strict=True):
            out[i] = x
        return out

    def __call__(self, directions: list[Tensor]) -> list[Tensor]:
        if not self._variable:
            return [torch.zeros_like(d) for d in directions]
        return self._scatter(directions, self._inner([directions[i] for i in self._variable]))

    def columns(self, directions: list[Tensor]) -> list[Tensor]:
        if not self._variable:
            return [torch.zeros_like(d) for d in directions]
        inner = self._inner.columns([directions[i] for i in self._variable])
        return self._scatter(directions, inner)

    def mixed(self, directions: list[Tensor], wrt: list[Tensor]) -> list[Tensor]:
        if not self._variable:
            return [torch.zeros_like(x) for x in wrt]
        return self._inner.mixed([directions[i] for i in self._variable], wrt)


def _one_column(columns: HVP) -> HVP:
    """A one-direction product from a batched one: the direction as a batch of one column."""
    return lambda d: [x[0] for x in columns([y.unsqueeze(0) for y in d])]


def _functional_columns(
    functional: FunctionalHVP, trainable: list[Tensor], live: list[Tensor]
) -> HVP:
    """``loss_fn``'s batched products for the live parameters: the trainable ones that are not
    live (the loss did not use them this step) get zero directions."""
    position = {id(p): n for n, p in enumerate(trainable)}

    def columns(directions: list[Tensor]) -> list[Tensor]:
        if not directions:
            return []
        by_id = {id(p): d for p, d in zip(live, directions, strict=True)}
        count = directions[0].shape[0]
        full = [
            by_id[id(p)] if id(p) in by_id else p.new_zeros((count, *p.shape)) for p in trainable
        ]
        products = functional(full)
        return [
            products[position[id(p)]] if id(p) in position else torch.zeros_like(d)
            for p, d in zip(live, directions, strict=True)
        ]

    return columns
