"""Hyperparameters inside the training loss (``loss_hyperparameters=``, Lorraine et al. 2020).

The oracle differentiates, in float64 with ``torch.func``, the rules' reference step with the
training gradient ``∇_w L_T(w, μ)`` as a pure function of ``μ``: with ``K = 0`` the exact
derivative of the validation loss after the step; with ``K > 0`` the one-pass series over the
dense state Jacobian, ``Σ_j v_0 J^j ∂U/∂μ``, plus the validation loss's own ``∂L_V/∂μ``.  At
the optimum of ridge regression with a penalty per feature, the series (many terms) and
conjugate gradient give the closed-form implicit gradient.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import oracle
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.func import grad, jacrev

from hyperopt_optim import HyperAdam, HyperAdamW, HyperSGD

EXACT_RTOL = 1e-9  # exact products (double backward) against the oracle, float64
FD_RTOL = 1e-5  # forward differences of torch's closure, float64 (central ones: ~1e-8)

# -- the problem: a small MLP whose training loss reads two loss hyperparameters --------------


class LossProblem:
    """``L_T(w, μ) = (1 + ½ tanh s)·MSE_T(w) + ½ Σ exp(d) ⊙ w_0²``: a loss weight ``s`` (a
    scalar) and a weight decay per weight ``d`` of the first layer; the validation loss is
    ``MSE_V(w) + direct·s²`` (``direct``: ``μ`` read by the validation loss too)."""

    def __init__(self, seed: int, direct: float = 0.0) -> None:
        self.base = oracle.mlp_problem(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        shape = self.base.params[0].shape
        self.mus = [
            (0.5 * torch.randn((), generator=gen, dtype=torch.float64)).requires_grad_(),
            (torch.randn(shape, generator=gen, dtype=torch.float64) - 3.0).requires_grad_(),
        ]
        self.direct = direct

    def train_loss(self, ps: Sequence[Tensor], mus: Sequence[Tensor]) -> Tensor:
        s, d = mus
        penalty = 0.5 * (d.exp() * ps[0] ** 2).sum()
        return (1 + 0.5 * torch.tanh(s)) * self.base.train_loss(ps) + penalty

    def val_loss(self, ps: Sequence[Tensor], mus: Sequence[Tensor]) -> Tensor:
        return self.base.val_loss(ps) + self.direct * mus[0] ** 2

    @property
    def params(self) -> list[Tensor]:
        return self.base.params

    def closure(self, opt: Any, torch_closure: bool) -> Callable[[], Tensor]:
        def loss_only() -> Tensor:
            return self.train_loss(self.params, self.mus)

        def with_backward() -> Tensor:
            opt.zero_grad()
            loss = self.train_loss(self.params, self.mus)
            loss.backward()
            return loss

        return with_backward if torch_closure else loss_only

    def val_closure(self) -> Tensor:
        return self.val_loss(self.params, self.mus)

    def at(self, mus: Sequence[Tensor]) -> oracle.Problem:
        """The oracle's problem with ``μ`` fixed to ``mus`` (tensors ``torch.func`` may trace)."""
        return oracle.Problem(
            self.params,
            lambda ps: self.train_loss(ps, mus),
            lambda ps: self.val_loss(ps, mus),
        )


def _unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, pos = [], 0
    for x in like:
        out.append(flat[pos : pos + x.numel()].reshape(x.shape))
        pos += x.numel()
    return out


def expected_hypergradients(
    problem: LossProblem,
    start: oracle.Start,
    mus: list[Tensor],
    state_names: tuple[str, ...],
    neumann_steps: int,
) -> list[Tensor]:
    """``p·∂U/∂μ + ∂L_V/∂μ`` at ``(z_t, μ)`` with ``p = Σ_{j≤K} v_0 J^j``, ``v_0 = (∇_w
    L_V(w_{t+1}), 0)``, densely from the reference step (``K = 0``: the exact derivative
    through the step)."""
    m0 = torch.cat([x.reshape(-1) for x in mus])

    def flat_map(m: Tensor) -> oracle.FlatMap:
        return oracle.FlatMap(start, problem.at(_unflatten(m, mus)), state_names)

    fm = flat_map(m0)
    z0 = fm.z0()
    z1 = fm.step(z0)
    v = fm.val_gradient(z1)
    p = v.clone()
    if neumann_steps:
        jacobian = fm.jacobian()
        for _ in range(neumann_steps):
            v = v @ jacobian
            p = p + v
    d_step = jacrev(lambda m: flat_map(m).step(z0))(m0)  # (|z|, |μ|)
    params1 = fm.unflatten(z1).params
    direct = grad(lambda m: problem.val_loss(params1, _unflatten(m, mus)))(m0)
    return _unflatten(p @ d_step + direct, mus)


def assert_close_lists(got: Sequence[Tensor], expected: Sequence[Tensor], rtol: float) -> None:
    scale = max(float(oracle.flat(list(expected)).abs().max()), 1e-12)
    error = oracle.max_error(list(got), list(expected))
    assert error <= rtol * scale, f"max error {error:.3g} > {rtol:g} * {scale:.3g}"


def _run(
    opt: Any, problem: LossProblem, torch_closure: bool, steps: int
) -> tuple[oracle.Start, list[Tensor]]:
    """``steps`` steps, the last a hyper-step; the point before it and ``μ`` there."""
    opt.register_validation_closure(problem.val_closure)
    for _ in range(steps - 1):
        opt.step(problem.closure(opt, torch_closure))
    start = oracle.capture(opt)
    mus = [x.detach().clone() for x in problem.mus]
    opt.step(problem.closure(opt, torch_closure))
    return start, mus


# -- 1. against the oracle -----------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**16),
    lr=st.floats(0.01, 0.3),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    nesterov=st.booleans(),
    weight_decay=st.sampled_from([0.0, 1e-2]),
    neumann_steps=st.integers(0, 3),
    update_interval=st.integers(1, 3),
    hyper_steps=st.integers(1, 2),
    direct=st.sampled_from([0.0, 0.3]),
    groups=st.booleans(),
    learn=st.sampled_from([(), ("lr",), ("lr", "momentum")]),
)
@settings(max_examples=25)
def test_sgd_series_equals_the_oracle(
    seed: int,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    neumann_steps: int,
    update_interval: int,
    hyper_steps: int,
    direct: float,
    groups: bool,
    learn: tuple[str, ...],
) -> None:
    """HyperSGD, exact products: after several steps (momentum buffers, μ already stepped by
    Adam), the hyper-step's ``loss_hypergradients()`` are the oracle's, with one or two param
    groups, learning the optimizer's own values too or not."""
    if nesterov and momentum == 0.0:
        nesterov = False
    if "momentum" in learn and momentum == 0.0:
        momentum = 0.5
    problem = LossProblem(seed, direct)
    ps = problem.params
    params: Any = [{"params": ps[:2]}, {"params": ps[2:], "lr": lr / 2}] if groups else ps
    opt = HyperSGD(
        params,
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        method="ift" if neumann_steps else "greedy",
        neumann_steps=neumann_steps if neumann_steps else None,
        update_interval=update_interval,
        learn=learn,
        loss_hyperparameters=problem.mus,
        loss_hyper_optimizer=lambda xs: torch.optim.Adam(xs, lr=0.05),
    )
    steps = max(2, update_interval * hyper_steps)  # the buffers exist at the point
    start, mus = _run(opt, problem, False, steps)
    expected = expected_hypergradients(problem, start, mus, ("momentum_buffer",), neumann_steps)
    assert opt.hyper_state["hyper_steps"] == steps // update_interval
    assert_close_lists(opt.loss_hypergradients(), expected, EXACT_RTOL)


@given(
    seed=st.integers(0, 2**16),
    lr=st.floats(1e-3, 0.05),
    amsgrad=st.booleans(),
    decoupled=st.booleans(),
    neumann_steps=st.integers(0, 2),
    update_interval=st.integers(1, 3),
    learn=st.sampled_from([(), ("lr",)]),
)
@settings(max_examples=15)
def test_adam_series_equals_the_oracle(
    seed: int,
    lr: float,
    amsgrad: bool,
    decoupled: bool,
    neumann_steps: int,
    update_interval: int,
    learn: tuple[str, ...],
) -> None:
    """HyperAdam / HyperAdamW: the full state's series (both moments; AMSGrad's maximum)."""
    problem = LossProblem(seed, 0.2)
    cls = HyperAdamW if decoupled else HyperAdam
    opt = cls(
        problem.params,
        lr=lr,
        amsgrad=amsgrad,
        weight_decay=1e-2,
        method="ift" if neumann_steps else "greedy",
        neumann_steps=neumann_steps if neumann_steps else None,
        update_interval=update_interval,
        learn=learn,
        loss_hyperparameters=problem.mus,
    )
    start, mus = _run(opt, problem, False, 2 * update_interval)
    expected = expected_hypergradients(problem, start, mus, opt.rule.state_names, neumann_steps)
    assert_close_lists(opt.loss_hypergradients(), expected, EXACT_RTOL)


@pytest.mark.parametrize("hvp", ["finite_difference", "forward_difference", "auto"])
@pytest.mark.parametrize("method", ["greedy", "ift"])
def test_torchs_closure_by_differences(hvp: str, method: str) -> None:
    """torch's closure: the mixed product by differences of ``μ``'s gradient, which the
    closure's ``backward()`` leaves in ``μ.grad`` (the optimizer clears it before each
    evaluation: else the closure's backward would add to it)."""
    problem = LossProblem(3, 0.2)
    opt = HyperSGD(
        problem.params,
        lr=0.1,
        momentum=0.9,
        method=method,
        update_interval=3,
        hvp=hvp,
        loss_hyperparameters=problem.mus,
    )
    start, mus = _run(opt, problem, True, 6)
    steps = 4 if method == "ift" else 0
    expected = expected_hypergradients(problem, start, mus, ("momentum_buffer",), steps)
    assert_close_lists(opt.loss_hypergradients(), expected, FD_RTOL)


def test_hypergradients_of_the_optimizers_values_are_unchanged_by_loss_hyperparameters() -> None:
    """The learned lr's hypergradient is the same with and without loss hyperparameters (the
    loss reads μ either way; only whether μ is learned differs)."""

    def run(with_mus: bool) -> Tensor:
        problem = LossProblem(5)
        kwargs: dict[str, Any] = {"loss_hyperparameters": problem.mus} if with_mus else {}
        opt = HyperSGD(
            problem.params, lr=0.1, momentum=0.5, method="ift", update_interval=2, **kwargs
        )
        opt.register_validation_closure(problem.val_closure)
        opt.step(problem.closure(opt, False))
        opt.step(problem.closure(opt, False))
        return opt.hypergradients()[0]["lr"]  # type: ignore[return-value]

    assert torch.equal(run(True), run(False))


# -- 2. the implicit gradient at an optimum --------------------------------------------------------


def _ridge(seed: int, n: int = 40, d: int = 5, decay: float = 0.0) -> tuple[Any, ...]:
    """Ridge regression with a penalty ``exp(μ_i)`` per feature; ``decay``: the optimizer's own
    (coupled) weight decay, which adds ``decay`` to every penalty at its fixed point."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(d, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(
        n, generator=gen, dtype=torch.float64
    )
    xv = torch.randn(30, d, generator=gen, dtype=torch.float64)
    yv = xv @ torch.randn(d, generator=gen, dtype=torch.float64)
    mu = (torch.randn(d, generator=gen, dtype=torch.float64) - 1.0).requires_grad_()

    def train(w: Tensor, m: Tensor) -> Tensor:
        return ((x @ w - y) ** 2).mean() / 2 + 0.5 * (m.exp() * w * w).sum()

    def val(w: Tensor) -> Tensor:
        return ((xv @ w - yv) ** 2).mean() / 2

    def optimum(m: Tensor) -> Tensor:
        return torch.linalg.solve(x.T @ x / n + torch.diag(m.exp() + decay), x.T @ y / n)

    m0 = mu.detach().clone().requires_grad_()
    implicit = torch.autograd.grad(val(optimum(m0)), m0)[0]  # the closed form, exactly
    return mu, train, val, optimum, implicit


@given(seed=st.integers(0, 2**16), momentum=st.sampled_from([0.0, 0.5]))
@settings(max_examples=10)
def test_neumann_series_at_the_ridge_optimum_is_the_implicit_gradient(
    seed: int, momentum: float
) -> None:
    """From the optimum, the one-pass series of many terms is ``-∇L_V H⁻¹ ∂²L_T/∂w∂μ``
    (SGD; with momentum the whole state's series converges to the same)."""
    mu, train, val, optimum, implicit = _ridge(seed)
    w = optimum(mu.detach()).clone().requires_grad_()
    opt = HyperSGD(
        [w], lr=0.3, momentum=momentum, method="ift", neumann_steps=400, update_interval=1,
        learn=(), loss_hyperparameters=[mu],
        loss_hyper_optimizer=lambda xs: torch.optim.SGD(xs, lr=0.0),
    )  # fmt: skip
    opt.register_validation_closure(lambda: val(w))
    opt.step(lambda: train(w, mu))
    assert_close_lists(opt.loss_hypergradients(), [implicit], 1e-9)


@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
@given(seed=st.integers(0, 2**16))
@settings(max_examples=10)
def test_conjugate_gradient_at_the_ridge_optimum_is_the_implicit_gradient(
    hvp: str, seed: int
) -> None:
    """``solver="cg"``: ``d`` iterations of conjugate gradient solve the ``d``-dimensional
    system exactly (in exact arithmetic)."""
    mu, train, val, optimum, implicit = _ridge(seed)
    w = optimum(mu.detach()).clone().requires_grad_()
    opt = HyperSGD(
        [w], lr=0.1, method="ift", neumann_steps=5, update_interval=1, learn=(),
        loss_hyperparameters=[mu], solver="cg", hvp=hvp,
        loss_hyper_optimizer=lambda xs: torch.optim.SGD(xs, lr=0.0),
    )  # fmt: skip
    opt.register_validation_closure(lambda: val(w))
    if hvp == "autograd":
        opt.step(lambda: train(w, mu))
    else:

        def closure() -> Tensor:
            opt.zero_grad()
            loss = train(w, mu)
            loss.backward()
            return loss

        opt.step(closure)
    assert_close_lists(opt.loss_hypergradients(), [implicit], 1e-7)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@given(seed=st.integers(0, 2**16), decay=st.sampled_from([0.05, 0.5]))
@settings(max_examples=5)
def test_conjugate_gradient_includes_the_optimizers_own_weight_decay(
    optimizer: str, seed: int, decay: float
) -> None:
    """A coupled ``weight_decay`` ``ξ`` moves the fixed point to the stationary point of
    ``L_T + ½ξ‖w‖²``: conjugate gradient solves with ``H + ξI`` (SGD's and Adam's)."""
    mu, train, val, optimum, implicit = _ridge(seed, decay=decay)
    w = optimum(mu.detach()).clone().requires_grad_()
    common: dict[str, Any] = {
        "method": "ift", "neumann_steps": 5, "update_interval": 1, "learn": (),
        "loss_hyperparameters": [mu], "solver": "cg", "weight_decay": decay,
        "loss_hyper_optimizer": lambda xs: torch.optim.SGD(xs, lr=0.0),
    }  # fmt: skip
    # Adam's step at the optimum is lr·g/(|g| + eps): with a gradient of 1e-16, a step of
    # lr·1e-8 at eps=1e-8 moves the validation gradient by that much; eps=1e-2 keeps it ~1e-15
    opt = (
        HyperSGD([w], lr=0.1, **common)
        if optimizer == "sgd"
        else HyperAdam([w], lr=0.1, eps=1e-2, **common)
    )
    opt.register_validation_closure(lambda: val(w))
    opt.step(lambda: train(w, mu))
    assert_close_lists(opt.loss_hypergradients(), [implicit], 1e-9)


def test_the_series_includes_the_optimizers_own_weight_decay() -> None:
    mu, train, val, optimum, implicit = _ridge(3, decay=0.2)
    w = optimum(mu.detach()).clone().requires_grad_()
    opt = HyperSGD(
        [w], lr=0.3, weight_decay=0.2, method="ift", neumann_steps=400, update_interval=1,
        learn=(), loss_hyperparameters=[mu],
        loss_hyper_optimizer=lambda xs: torch.optim.SGD(xs, lr=0.0),
    )  # fmt: skip
    opt.register_validation_closure(lambda: val(w))
    opt.step(lambda: train(w, mu))
    assert_close_lists(opt.loss_hypergradients(), [implicit], 1e-9)


def test_conjugate_gradient_refuses_a_decoupled_weight_decay() -> None:
    mu = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"decoupled weight_decay moves .*param group 0"):
        HyperAdamW([w], method="ift", learn=(), loss_hyperparameters=[mu], solver="cg")
    opt = HyperAdamW(
        [w], weight_decay=0.0, method="ift", learn=(), loss_hyperparameters=[mu], solver="cg"
    )
    opt.param_groups[0]["weight_decay"] = 0.1  # set later: refused at the hyper-step
    opt.register_validation_closure(lambda: (w**2).sum())

    def train() -> None:
        for _ in range(10):
            opt.step(lambda: ((w - 1) ** 2).sum() + (mu * w).sum())

    with pytest.raises(ValueError, match="decoupled weight_decay"):
        train()


# -- 3. stepping, state, safety --------------------------------------------------------------------


def test_the_hyper_optimizer_steps_the_users_tensors_in_place() -> None:
    problem = LossProblem(7)
    decay = problem.mus[1]
    before = decay.detach().clone()
    opt = HyperSGD(
        problem.params,
        lr=0.1,
        method="ift",
        update_interval=2,
        learn=(),
        loss_hyperparameters=problem.mus,
        loss_hyper_optimizer=lambda xs: torch.optim.SGD(xs, lr=0.5),
    )
    _run(opt, problem, True, 2)
    assert problem.mus[1] is decay
    step = opt.loss_hypergradients()[1]
    torch.testing.assert_close(decay.detach(), before - 0.5 * step, rtol=1e-12, atol=0)
    assert all(x.grad is None for x in problem.mus)  # the hyper-optimizer's gradients cleared
    assert opt.hyperparameters()[0] == {}
    assert opt.param_groups[0]["lr"] == 0.1


def test_default_hyper_optimizers() -> None:
    """``hyper_optimizer=`` applies to the loss hyperparameters too (a separate instance);
    ``loss_hyper_optimizer=`` overrides it; else Adam with lr 0.01."""
    problem = LossProblem(0)
    opt = HyperSGD(problem.params, lr=0.1, method="ift", loss_hyperparameters=problem.mus)
    assert isinstance(opt.loss_hyper_optimizer, torch.optim.Adam)
    assert opt.loss_hyper_optimizer.param_groups[0]["lr"] == 0.01
    opt = HyperSGD(
        problem.params,
        lr=0.1,
        loss_hyperparameters=problem.mus,
        hyper_optimizer=lambda xs: torch.optim.SGD(xs, lr=0.2),
    )
    assert isinstance(opt.loss_hyper_optimizer, torch.optim.SGD)
    assert opt.loss_hyper_optimizer is not opt.hyper_optimizer
    opt = HyperSGD(
        problem.params,
        lr=0.1,
        loss_hyperparameters=problem.mus,
        hyper_optimizer=lambda xs: torch.optim.SGD(xs, lr=0.2),
        loss_hyper_optimizer=lambda xs: torch.optim.RMSprop(xs, lr=0.3),
    )
    assert isinstance(opt.loss_hyper_optimizer, torch.optim.RMSprop)
    assert opt.loss_hypergradients()[1].shape == problem.mus[1].shape
    assert all(not g.any() for g in opt.loss_hypergradients())  # zeros before a hyper-step


def test_state_dict_resumes_bit_for_bit() -> None:
    """The hyper-optimizer's state of the loss hyperparameters is saved; the tensors are the
    user's (restored like weights)."""

    def build(problem: LossProblem) -> Any:
        opt = HyperAdam(
            problem.params,
            lr=0.01,
            method="ift",
            update_interval=2,
            loss_hyperparameters=problem.mus,
        )
        opt.register_validation_closure(problem.val_closure)
        return opt

    whole = LossProblem(11)
    opt = build(whole)
    for _ in range(8):
        opt.step(whole.closure(opt, True))

    first = LossProblem(11)
    opt1 = build(first)
    for _ in range(4):
        opt1.step(first.closure(opt1, True))
    saved = opt1.state_dict()
    weights = [x.detach().clone() for x in first.params + first.mus]
    assert saved["hyper"]["loss_hyper"]["optimizer"]["state"]  # Adam's moments of μ
    second = LossProblem(11)
    with torch.no_grad():
        for x, y in zip(second.params + second.mus, weights, strict=True):
            x.copy_(y)
    opt2 = build(second)
    opt2.load_state_dict(saved)
    for _ in range(4):
        opt2.step(second.closure(opt2, True))
    for x, y in zip(second.params + second.mus, whole.params + whole.mus, strict=True):
        assert torch.equal(x, y)
    for x, y in zip(opt2.loss_hypergradients(), opt.loss_hypergradients(), strict=True):
        assert torch.equal(x, y)


def test_a_state_dict_of_other_loss_hyperparameters_is_refused() -> None:
    problem = LossProblem(0)
    opt = HyperSGD(problem.params, lr=0.1, loss_hyperparameters=problem.mus)
    saved = opt.state_dict()
    other = HyperSGD(problem.params, lr=0.1, loss_hyperparameters=problem.mus[:1])
    with pytest.raises(ValueError, match="loss hyperparameters have shapes"):
        other.load_state_dict(saved)
    plain = HyperSGD(problem.params, lr=0.1)
    with pytest.raises(ValueError, match="loss_hyperparameters"):
        plain.load_state_dict(saved)


def test_a_non_finite_hypergradient_changes_nothing() -> None:
    """``∂/∂μ ⟨R, ∇_w (√μ ‖w‖²)⟩ = ⟨R, w⟩/√μ`` is infinite at ``μ = 0``: the hyper-step is
    skipped, counted and warned; μ and the learned lr stay."""
    problem = LossProblem(2)
    mu = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = HyperSGD(
        problem.params, lr=0.1, method="greedy", update_interval=1, loss_hyperparameters=[mu]
    )
    opt.register_validation_closure(problem.val_closure)

    def closure() -> Tensor:
        return problem.base.train_loss(problem.params) + mu.sqrt() * (problem.params[0] ** 2).sum()

    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.step(closure)
    assert opt.hyper_state["skipped_hyper_steps"] == 1
    assert float(mu.detach()) == 0.0
    assert opt.param_groups[0]["lr"] == 0.1
    assert all(torch.isfinite(p).all() for p in problem.params)


def test_a_divergence_restores_the_loss_hyperparameters_with_the_weights() -> None:
    problem = LossProblem(4)
    opt = HyperSGD(
        problem.params, lr=0.05, method="greedy", update_interval=5,
        loss_hyperparameters=problem.mus,
    )  # fmt: skip
    opt.register_validation_closure(problem.val_closure)
    history: list[list[Tensor]] = []
    for _ in range(25):
        history.append([m.detach().clone() for m in problem.mus])
        opt.step(problem.closure(opt, False))
    history.append([m.detach().clone() for m in problem.mus])

    def diverged() -> Tensor:  # a loss that is not finite, up to the guard's check at step 30
        return problem.train_loss(problem.params, problem.mus) * math.nan

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            opt.step(diverged)
    assert any("weights and the loss hyperparameters were" in str(w.message) for w in caught)
    assert opt.hyper_state["divergences"] == 1
    restored = [m.detach() for m in problem.mus]
    assert all(torch.isfinite(m).all() for m in restored)
    assert all(torch.isfinite(p).all() for p in problem.params)
    assert any(
        all(torch.equal(a, b) for a, b in zip(kept, restored, strict=True)) for kept in history[:26]
    ), "the loss hyperparameters are back at a value they had before the divergence"
    assert not all(torch.equal(a, b) for a, b in zip(history[-1], restored, strict=True)), (
        "they moved back"
    )


# -- 4. what is refused ---------------------------------------------------------------------------


def _refused(error: type[Exception], match: str, **kwargs: Any) -> None:
    problem = LossProblem(0)
    with pytest.raises(error, match=match):
        HyperSGD(problem.params, lr=0.1, **kwargs)


def test_bad_loss_hyperparameters_are_refused_by_name() -> None:
    problem = LossProblem(0)
    mu = problem.mus[0]
    _refused(TypeError, "iterable of tensors", loss_hyperparameters=mu)
    _refused(
        TypeError, r"loss_hyperparameters\[1\] must be a tensor", loss_hyperparameters=[mu, 1.0]
    )
    _refused(
        TypeError,
        r"loss_hyperparameters\[0\] must be a floating-point",
        loss_hyperparameters=[torch.zeros(3, dtype=torch.long)],
    )
    _refused(
        ValueError,
        r"loss_hyperparameters\[0\] does not require a gradient",
        loss_hyperparameters=[torch.zeros(3)],
    )
    _refused(
        ValueError,
        r"loss_hyperparameters\[0\] is not a leaf",
        loss_hyperparameters=[torch.zeros(3, requires_grad=True) * 2],
    )
    _refused(ValueError, r"loss_hyperparameters\[1\] is given twice", loss_hyperparameters=[mu, mu])
    with pytest.raises(ValueError, match=r"loss_hyperparameters\[0\] is a trained parameter"):
        HyperSGD(problem.params, lr=0.1, loss_hyperparameters=[problem.params[1]])


def test_inconsistent_options_are_refused() -> None:
    mus = LossProblem(0).mus
    _refused(ValueError, r"learn=\(\) is allowed with loss_hyperparameters", learn=())
    _refused(ValueError, "solver must be one of", solver="newton", loss_hyperparameters=mus)
    _refused(ValueError, "solver='cg' solves for loss hyperparameters only", solver="cg")
    _refused(
        ValueError,
        "stationary point",
        solver="cg",
        method="ift",
        learn=("lr",),
        loss_hyperparameters=mus,
    )
    _refused(ValueError, "not method='greedy'", solver="cg", learn=(), loss_hyperparameters=mus)
    _refused(
        ValueError,
        "method='hd' does not learn loss_hyperparameters .*no validation loss",
        method="hd",
        loss_hyperparameters=mus,
    )
    _refused(
        ValueError,
        "method='forward' does not learn loss_hyperparameters",
        method="forward",
        horizon=10,
        loss_hyperparameters=mus,
    )
    _refused(TypeError, "loss_hyper_optimizer must be a callable", loss_hyperparameters=mus,
             loss_hyper_optimizer=3)  # fmt: skip


def test_a_hyper_step_without_a_training_closure_is_refused() -> None:
    problem = LossProblem(0)
    opt = HyperSGD(problem.params, lr=0.1, update_interval=1, loss_hyperparameters=problem.mus)
    opt.register_validation_closure(problem.val_closure)
    problem.closure(opt, True)()
    with pytest.raises(ValueError, match="need a training closure"):
        opt.step()


def test_float32_runs_and_learns() -> None:
    """A float32 model with torch's closure: the loss weight moves, nothing is non-finite."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    xv, yv = torch.randn(32, 4), torch.randn(32, 1)
    log_decay = torch.full((), math.log(1e-2), requires_grad=True)
    opt = HyperSGD(
        model.parameters(), lr=0.05, momentum=0.9, method="ift", update_interval=5,
        loss_hyperparameters=[log_decay],
    )  # fmt: skip
    opt.register_validation_closure(lambda: ((model(xv) - yv) ** 2).mean())

    def closure() -> Tensor:
        opt.zero_grad()
        penalty = sum((p**2).sum() for p in model.parameters())
        loss = ((model(x) - y) ** 2).mean() + log_decay.exp() * penalty
        loss.backward()
        return loss

    for _ in range(20):
        opt.step(closure)
    assert opt.hyper_state["hyper_steps"] == 4
    assert opt.hyper_state["skipped_hyper_steps"] == 0
    assert float(log_decay.detach()) != pytest.approx(math.log(1e-2), abs=1e-6)
    assert torch.isfinite(opt.loss_hypergradients()[0]).all()


# -- 5. the paths products take -------------------------------------------------------------------


def _hypergradients_of_a_run(
    torch_closure: bool, *, fraction: float = 1.0, scale: float | None = None, **kwargs: Any
) -> list[Tensor]:
    """Six steps of HyperSGD (ift, T = 3) with loss hyperparameters; their hypergradients."""
    problem = LossProblem(9, 0.2)
    scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
    opt = HyperSGD(
        problem.params, lr=0.1, momentum=0.9, method="ift", update_interval=3,
        loss_hyperparameters=problem.mus, grad_scaler=scaler, hvp_batch_fraction=fraction,
        **kwargs,
    )  # fmt: skip
    opt.register_validation_closure(problem.val_closure)

    def closure(batch_fraction: float = 1.0) -> Tensor:  # the same loss on "every part"
        loss = problem.train_loss(problem.params, problem.mus)
        if torch_closure:
            opt.zero_grad()
            (loss if scaler is None else scaler.scale(loss)).backward()
        return loss

    for _ in range(6):
        opt.step(closure)
        if scaler is not None:
            scaler.update()
    return opt.loss_hypergradients()


@pytest.mark.parametrize("torch_closure", [False, True])
def test_the_lean_series_gives_the_same_cotangent(
    torch_closure: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lean series (large models) sums each term's gradient cotangent as it goes."""
    from hyperopt_optim.hypergradients import onepass

    whole = _hypergradients_of_a_run(torch_closure)
    monkeypatch.setattr(onepass, "LEAN_ELEMENTS", 0)
    lean = _hypergradients_of_a_run(torch_closure)
    assert_close_lists(lean, whole, 1e-12)


@pytest.mark.parametrize("torch_closure", [False, True])
def test_products_on_a_part_of_the_batch_take_the_mixed_product_there(torch_closure: bool) -> None:
    """``hvp_batch_fraction``: with a closure that evaluates the same loss on its "part", the
    hypergradients are those of the whole batch (the part's graph, or differences there)."""
    whole = _hypergradients_of_a_run(torch_closure)
    part = _hypergradients_of_a_run(torch_closure, fraction=0.5)
    rtol = 1e-5 if torch_closure else 1e-12
    assert_close_lists(part, whole, rtol)


@pytest.mark.parametrize("torch_closure", [False, True])
def test_a_gradient_scaler_changes_nothing(torch_closure: bool) -> None:
    """A power-of-two scale: the mixed products (and μ's gradient at the point) are unscaled
    like the weights' products, so the run is the unscaled one."""
    plain = _hypergradients_of_a_run(torch_closure)
    scaled = _hypergradients_of_a_run(torch_closure, scale=2.0**10)
    assert_close_lists(scaled, plain, 1e-12)
