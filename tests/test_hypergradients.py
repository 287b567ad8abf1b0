"""The mathematics of the hypergradients against an exact oracle (DESIGN §4 and §7).

The oracle (:mod:`oracle`) differentiates the unrolled training — the rules' out-of-place
``reference`` maps, with each step's gradient by ``torch.func.grad`` of a functional loss —
with ``torch.func`` in float64.  ``higher`` is a second oracle for SGD's lr, momentum and
weight decay.  Learned values are kept still by a hyper-optimizer with learning rate 0, so
the optimizer walks the same trajectory as the oracle's reference maps and the hyper-step
only records ``hypergradients()``.

Every claim names its conditions: K = 0 is exact anywhere; the K-term series equals the
(K+1)-step unrolled derivative only at a fixed point of U (full batch); the limit K → ∞ is
checked on a strongly convex quadratic.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import oracle
import pytest
import torch
from conftest import DEVICES
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hyperopt_optim import HyperAdam, HyperAdamW, HyperOptimizer, HyperSGD
from hyperopt_optim.hypergradients import AutogradHVP, FiniteDifferenceHVP
from hyperopt_optim.hypergradients.hvp import products_in_a_row

# --- tolerances (DESIGN §7) ------------------------------------------------------------------

# K = 0 is one exact derivative of the same float64 arithmetic: agreement to rounding error,
# judged against the largest entry of each hypergradient.
K0_RTOL = 1e-9
# Some hypergradients are exactly zero (Adam's β1 on its first step: m'/(1 − β1) = ĝ whatever
# β1), leaving only the rounding of the O(1) terms that cancel: judged with an absolute floor.
ZERO_ATOL = 1e-15
# The K-term series at a fixed point of U against the (K+1)-step unrolled derivative.
FIXED_POINT_RTOL = 1e-8
# The one-pass series against the same series summed with dense linear algebra (both exact).
DENSE_RTOL = 1e-9
# Finite-difference Hessian-vector products against exact ones: the step balances truncation
# and rounding error, leaving about u^(2/3) (central) or u^(1/2) (forward) of ‖Hd‖.
FD_RTOL = {torch.float64: 1e-6, torch.float32: 1e-3}
# Two exact Hessian-vector products (double backward, forward over reverse): rounding only.
EXACT_HVP_RTOL = 1e-12
# A float32 run (CPU or CUDA) against the float64 oracle from the same (float32) point: one
# step, one validation gradient and the hyper products in float32, about 1e-7 relative each,
# amplified by cancellation in sums over a few dozen weights (observed: up to 2e-6); 1e-4
# leaves a margin and still catches any wrong term (those are O(1) relative).
FLOAT32_RTOL = 1e-4
# higher's differentiable SGD is another float64 computation of the same derivative.
HIGHER_RTOL = 1e-9
# Baydin's Eq. 3 is a dot product of two gradients computed two ways (autograd, torch.func).
HD_RTOL = 1e-10
# The oracle against central differences of the whole unrolled map (step h ~ 1e-5 λ: the
# truncation error is O(h²) and the rounding error O(u/h), both ~1e-10 relative).
ORACLE_FD_RTOL = 1e-6

GRANULARITIES = ("scalar", "tensor", "element")

# torch 2.13 warns from inside torch.func.jvp's own decompositions (not from this package).
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


def frozen(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """A hyper-optimizer that leaves the learned values exactly where they are."""
    return torch.optim.SGD(params, lr=0.0)


def check_hypergradients(
    opt: HyperOptimizer,
    expected: list[oracle.Learned],
    rtol: float,
    scale: float | None = None,
) -> None:
    """``opt.hypergradients()`` against the oracle's, name by name and group by group."""
    got = opt.hypergradients()
    assert len(got) == len(expected)
    for index, (got_group, expected_group) in enumerate(zip(got, expected, strict=True)):
        assert set(got_group) == set(expected_group)
        for name, value in expected_group.items():
            g = got_group[name]
            if isinstance(value, torch.Tensor):  # scalar granularity: one 0-dim tensor
                assert isinstance(g, torch.Tensor)
                assert g.dim() == 0
            else:  # one tensor per parameter, shaped like the learned value
                assert isinstance(g, list)
                assert [x.shape for x in g] == [x.shape for x in value]
            oracle.assert_close(g, value, rtol, scale, what=f"group {index} {name}", atol=ZERO_ATOL)


def run_to_last_hyper_step(
    opt: HyperOptimizer,
    problem: oracle.Problem,
    steps: int,
    torch_closure: bool = False,
) -> tuple[oracle.Start, list[oracle.Learned]]:
    """Take ``steps`` steps; return ``z_t`` and the learned values before the last one."""
    closure = problem.torch_closure(opt) if torch_closure else problem.closure
    start, learned = None, None
    for step in range(steps):
        if step == steps - 1:
            start, learned = oracle.capture(opt), oracle.learned_tensors(opt)
        opt.step(closure, val_closure=problem.val_closure)
    assert start is not None
    assert learned is not None
    return start, learned


# --- 0. the oracle itself --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (HyperSGD, {"lr": 0.1, "momentum": 0.8, "weight_decay": 0.02}, "momentum"),
        (HyperSGD, {"lr": 0.1, "momentum": 0.8, "weight_decay": 0.02}, "lr"),
        (HyperAdam, {"lr": 0.02, "betas": (0.8, 0.9), "eps": 1e-3}, "beta2"),
        (HyperAdamW, {"lr": 0.02, "betas": (0.8, 0.9), "eps": 1e-3}, "eps"),
    ],
)
@pytest.mark.parametrize("steps", [1, 3])
def test_oracle_matches_central_differences(
    cls: type[HyperOptimizer], kwargs: dict[str, Any], name: str, steps: int
) -> None:
    """The oracle's ``dL_V/dλ`` through ``steps`` unrolled steps equals central differences
    of ``L_V`` after the same steps (the oracle is cross-checked before it judges)."""
    problem = oracle.mlp_problem(seed=3)
    opt = cls(problem.params, **kwargs, learn=(name,), hyper_optimizer=frozen)
    for _ in range(3):  # a non-trivial state (momentum buffer, Adam moments)
        opt.step(problem.closure, val_closure=problem.val_closure)
    start, learned = oracle.capture(opt), oracle.learned_tensors(opt)
    expected = float(oracle.hypergradients(start, problem, learned, steps)[0][name])

    def val_after(value: float) -> float:
        values = [{name: torch.tensor(value, dtype=torch.float64)}]
        params, _ = oracle.unroll(start, problem.train_grad, steps, values)
        return float(problem.val_loss(params))

    value = float(learned[0][name])
    h = 1e-5 * min(value, 1 - value) if name in ("momentum", "beta2") else 1e-5 * value
    numeric = oracle.central_difference(val_after, value, h)
    assert abs(expected) > 1e-6  # a derivative worth checking
    assert math.isclose(expected, numeric, rel_tol=ORACLE_FD_RTOL), (expected, numeric)


# --- 1. K = 0 is exact, anywhere -------------------------------------------------------------


@given(
    seed=st.integers(0, 2**16),
    lr=st.floats(1e-3, 0.3),
    momentum=st.floats(0.05, 0.95),
    weight_decay=st.floats(1e-4, 0.1),
    variant=st.sampled_from(["no momentum", "heavy ball", "nesterov", "dampening"]),
    dampening=st.floats(0.05, 0.9),
    maximize=st.booleans(),
    granularity=st.sampled_from(GRANULARITIES),
    update_interval=st.integers(1, 3),
    torch_closure=st.booleans(),
    method=st.sampled_from(["greedy", "ift"]),
    hyper_steps=st.integers(1, 3),
)
@example(  # the very first step: torch's buffer is created as b' = ĝ
    seed=0, lr=0.1, momentum=0.9, weight_decay=0.01, variant="nesterov", dampening=0.5,
    maximize=False, granularity="element", update_interval=1, torch_closure=False,
    method="greedy", hyper_steps=1,
)  # fmt: skip
def test_greedy_sgd_equals_one_step_derivative(
    seed: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    variant: str,
    dampening: float,
    maximize: bool,
    granularity: str,
    update_interval: int,
    torch_closure: bool,
    method: str,
    hyper_steps: int,
) -> None:
    """HyperSGD, method="greedy" (or "ift" with neumann_steps=0, the same thing): after the
    hyper-step, ``hypergradients()`` equals ``d L_V(w_{t+1}) / dλ`` for every learned name (lr,
    momentum, weight decay), from an arbitrary pre-step state (the first step, with no momentum
    buffer yet, included), at every granularity (per element: the derivative with respect to
    a per-element hyperparameter tensor)."""
    problem = oracle.mlp_problem(seed)
    if variant == "no momentum":
        kwargs: dict[str, Any] = {"momentum": 0.0}
        learn: tuple[str, ...] = ("lr", "weight_decay")
    else:
        kwargs = {
            "momentum": momentum,
            "nesterov": variant == "nesterov",
            "dampening": dampening if variant == "dampening" else 0.0,
        }
        learn = ("lr", "momentum", "weight_decay")
    opt = HyperSGD(
        problem.params,
        lr=lr,
        weight_decay=weight_decay,
        maximize=maximize,
        **kwargs,
        learn=learn,
        granularity=granularity,
        method=method,
        neumann_steps=0,
        update_interval=update_interval,
        hyper_optimizer=frozen,
    )
    steps = hyper_steps * update_interval
    start, learned = run_to_last_hyper_step(opt, problem, steps, torch_closure)
    check_hypergradients(opt, oracle.hypergradients(start, problem, learned), K0_RTOL)


@given(
    seed=st.integers(0, 2**16),
    lr=st.floats(1e-3, 0.05),
    beta1=st.floats(0.5, 0.95),
    beta2=st.floats(0.8, 0.999),
    log10_eps=st.floats(-6, -1),
    weight_decay=st.floats(1e-4, 0.1),
    decoupled=st.booleans(),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
    granularity=st.sampled_from(GRANULARITIES),
    update_interval=st.integers(1, 3),
    hyper_steps=st.integers(1, 3),
)
@example(  # the very first step: m = v = 0, t = 1
    seed=0, lr=0.01, beta1=0.9, beta2=0.99, log10_eps=-3.0, weight_decay=0.01, decoupled=False,
    amsgrad=True, maximize=False, granularity="scalar", update_interval=1, hyper_steps=1,
)  # fmt: skip
def test_greedy_adam_equals_one_step_derivative(
    seed: int,
    lr: float,
    beta1: float,
    beta2: float,
    log10_eps: float,
    weight_decay: float,
    decoupled: bool,
    amsgrad: bool,
    maximize: bool,
    granularity: str,
    update_interval: int,
    hyper_steps: int,
) -> None:
    """HyperAdam / HyperAdamW (AMSGrad on and off), method="greedy": ``hypergradients()``
    equals ``d L_V(w_{t+1}) / dλ`` for lr, beta1, beta2 (bias corrections included), eps and
    weight decay, from the first step or a state a few steps in, at every granularity."""
    problem = oracle.mlp_problem(seed)
    cls = HyperAdamW if decoupled else HyperAdam
    opt = cls(
        problem.params,
        lr=lr,
        betas=(beta1, beta2),
        eps=10**log10_eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        learn=("lr", "beta1", "beta2", "eps", "weight_decay"),
        granularity=granularity,
        method="greedy",
        update_interval=update_interval,
        hyper_optimizer=frozen,
    )
    start, learned = run_to_last_hyper_step(opt, problem, hyper_steps * update_interval)
    check_hypergradients(opt, oracle.hypergradients(start, problem, learned), K0_RTOL)


def test_greedy_with_two_param_groups() -> None:
    """Each param group gets the derivative with respect to its own values, though the
    validation loss couples them."""
    problem = oracle.mlp_problem(seed=11)
    first, second = problem.params[:2], problem.params[2:]
    opt = HyperSGD(
        [
            {"params": first, "lr": 0.05, "momentum": 0.9},
            {"params": second, "lr": 0.2, "momentum": 0.5, "nesterov": True},
        ],
        weight_decay=0.01,
        learn=("lr", "momentum", "weight_decay"),
        method="greedy",
        update_interval=2,
        hyper_optimizer=frozen,
    )
    start, learned = run_to_last_hyper_step(opt, problem, 4)
    check_hypergradients(opt, oracle.hypergradients(start, problem, learned), K0_RTOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("cls", "kwargs", "learn"),
    [
        (
            HyperSGD,
            {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True},
            ("lr", "momentum", "weight_decay"),
        ),
        (
            HyperAdam,
            {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.01, "amsgrad": True},
            ("lr", "beta1", "beta2", "eps", "weight_decay"),
        ),
        (
            HyperAdamW,
            {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.01},
            ("lr", "beta1", "beta2", "eps", "weight_decay"),
        ),
    ],
    ids=["sgd", "adam", "adamw"],
)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_greedy_float32(
    device: str,
    cls: type[HyperOptimizer],
    kwargs: dict[str, Any],
    learn: tuple[str, ...],
    granularity: str,
) -> None:
    """The K = 0 check in float32, on the CPU and on CUDA (where there is one): the float64
    oracle from the same float32 pre-step point, to FLOAT32_RTOL."""
    seed = 5
    problem = oracle.mlp_problem(seed, dtype=torch.float32, device=device)
    opt = cls(
        problem.params,
        **kwargs,
        learn=learn,
        granularity=granularity,
        method="greedy",
        update_interval=2,
        hyper_optimizer=frozen,
    )
    start, learned = run_to_last_hyper_step(opt, problem, 4)
    start64 = start.to(torch.float64)
    learned64 = [
        {
            k: v.to("cpu", torch.float64)
            if isinstance(v, torch.Tensor)
            else [x.to("cpu", torch.float64) for x in v]
            for k, v in g.items()
        }
        for g in learned
    ]
    problem64 = oracle.mlp_problem(seed)
    check_hypergradients(opt, oracle.hypergradients(start64, problem64, learned64), FLOAT32_RTOL)


# --- 2. the K-term series at a fixed point is the (K+1)-step unrolled derivative -------------
# Adam is left out: with m = 0 and ∇L_T(w*) = 0 the weights stay put, but v' = β2 v shrinks
# (and the bias corrections change with the step count), so no (w, m, v) with v > 0 is a
# fixed point of Adam's map.


@pytest.mark.parametrize("neumann_steps", range(5))
@pytest.mark.parametrize("variant", ["heavy_ball", "nesterov", "dampening"])
@given(
    seed=st.integers(0, 2**16),
    lr=st.floats(0.01, 0.3),
    momentum=st.floats(0.1, 0.95),
    weight_decay=st.floats(1e-3, 0.5),
    dampening=st.floats(0.05, 0.9),
)
@settings(max_examples=5)
def test_series_at_fixed_point_equals_unrolled_derivative(
    neumann_steps: int,
    variant: str,
    seed: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    dampening: float,
) -> None:
    """Full-batch quadratic, SGD with momentum and weight decay ξ, started at its fixed point
    (w* the minimizer of L_T + ξ/2 |w|², buffer b = 0): with method="ift" and K Neumann terms,
    ``hypergradients()`` equals the derivative of L_V after K + 1 unrolled steps from there,
    with λ used in all of them.

    At this fixed point ∂w'/∂η = −b' = 0 and ∂w'/∂μ = −ηb = 0, so the lr and momentum
    hypergradients are zero (checked against the weight decay's scale); the weight decay's
    is the non-trivial one.
    """
    quad = oracle.quadratic(seed)
    problem = quad.problem(quad.minimizer(weight_decay))
    opt = HyperSGD(
        problem.params,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=variant == "nesterov",
        dampening=dampening if variant == "dampening" else 0.0,
        learn=("lr", "momentum", "weight_decay"),
        method="ift",
        neumann_steps=neumann_steps,
        update_interval=1,
        hvp="autograd",
        hyper_optimizer=frozen,
    )
    for p in problem.params:  # a buffer of zeros, not torch's first-step "buffer = gradient"
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    start, learned = oracle.capture(opt), oracle.learned_tensors(opt)

    # it is a fixed point of the reference map, to rounding
    params, states = oracle.unroll(start, problem.train_grad, 1)
    assert oracle.max_error(params, start.params) <= 1e-12 * oracle.scale_of(start.params)
    assert oracle.scale_of(states[0]["momentum_buffer"]) <= 1e-12 * oracle.scale_of(quad.A)

    opt.step(problem.closure, val_closure=problem.val_closure)
    expected = oracle.hypergradients(start, problem, learned, steps=neumann_steps + 1)
    scale = oracle.scale_of(expected[0]["weight_decay"])
    assert scale > 0  # a non-trivial derivative
    check_hypergradients(opt, expected, FIXED_POINT_RTOL, scale=scale)


# --- 3. the series away from a fixed point, and K → ∞ on a strongly convex quadratic ---------


def dense_series(
    start: oracle.Start,
    problem: oracle.Problem,
    learned: list[oracle.Learned],
    state_names: tuple[str, ...],
    neumann_steps: int,
) -> list[dict[str, float]]:
    """``v0 Σ_{j≤K} J^j ∂U/∂λ`` with dense matrices, for every group's (scalar) learned
    names."""
    flat_map = oracle.FlatMap(start, problem, state_names)
    J = flat_map.jacobian()
    p = flat_map.val_gradient(flat_map.step(flat_map.z0()))
    total = p.clone()
    for _ in range(neumann_steps):
        p = p @ J
        total = total + p
    return [
        {name: float(total @ flat_map.hyper_jacobian(learned, i, name)) for name in group}
        for i, group in enumerate(learned)
    ]


@pytest.mark.parametrize("neumann_steps", [1, 3])
@pytest.mark.parametrize(
    ("cls", "kwargs", "learn"),
    [
        (
            HyperSGD,
            {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True},
            ("lr", "momentum", "weight_decay"),
        ),
        (
            HyperSGD,
            {"lr": 0.1, "momentum": 0.7, "dampening": 0.3, "maximize": True},
            ("lr", "momentum"),
        ),
        (
            HyperAdam,
            {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.01, "amsgrad": True},
            ("lr", "beta1", "beta2", "eps", "weight_decay"),
        ),
        (
            HyperAdamW,
            {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.01},
            ("lr", "beta1", "beta2", "eps", "weight_decay"),
        ),
    ],
    ids=["sgd_nesterov", "sgd_dampening_maximize", "adam_amsgrad", "adamw"],
)
def test_series_equals_dense_neumann_sum(
    neumann_steps: int, cls: type[HyperOptimizer], kwargs: dict[str, Any], learn: tuple[str, ...]
) -> None:
    """Anywhere (an MLP, a few steps in, not a fixed point), the K-term hypergradient is
    v0 Σ_{j≤K} J^j ∂U/∂λ with J = dU/dz the full state Jacobian at z_t (weights and every
    buffer: momentum; Adam's m, v and AMSGrad's running maximum) and v0 = (∇L_V(w_{t+1}), 0),
    all taken densely by the oracle.  This is what checks Adam's Jacobian products, which
    have no fixed point to be checked at."""
    problem = oracle.mlp_problem(seed=6)
    opt = cls(
        problem.params,
        **kwargs,
        learn=learn,
        method="ift",
        neumann_steps=neumann_steps,
        update_interval=3,
        hvp="autograd",
        hyper_optimizer=frozen,
    )
    start, learned = run_to_last_hyper_step(opt, problem, 6)
    expected = dense_series(start, problem, learned, opt.rule.state_names, neumann_steps)
    check_hypergradients(
        opt,
        [{k: torch.tensor(v, dtype=torch.float64) for k, v in g.items()} for g in expected],
        DENSE_RTOL,
    )


@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
def test_series_with_two_param_groups(hvp: str) -> None:
    """The Hessian-vector products run over the concatenation of every group's parameters
    and the series couples the groups: each group's K-term hypergradient is still
    v0 Σ_{j≤K} J^j ∂U/∂λ_group (dense, on the state of both groups)."""
    problem = oracle.mlp_problem(seed=12)
    opt = HyperSGD(
        [
            {"params": problem.params[1::2], "lr": 0.05, "momentum": 0.9},
            {"params": problem.params[0::2], "lr": 0.2, "momentum": 0.5, "nesterov": True},
        ],
        weight_decay=0.01,
        learn=("lr", "momentum", "weight_decay"),
        method="ift",
        neumann_steps=2,
        update_interval=2,
        hvp=hvp,
        hyper_optimizer=frozen,
    )
    start, learned = run_to_last_hyper_step(opt, problem, 4)
    # the oracle's parameters are in the groups' order: put the losses in that order too
    order = [*range(1, len(problem.params), 2), *range(0, len(problem.params), 2)]

    def reorder(loss: oracle.Loss) -> oracle.Loss:
        def in_group_order(ps: Any) -> torch.Tensor:
            original = [None] * len(ps)
            for position, index in enumerate(order):
                original[index] = ps[position]
            return loss(original)

        return in_group_order

    grouped = oracle.Problem(
        [problem.params[i] for i in order],
        reorder(problem.train_loss),
        reorder(problem.val_loss),
    )
    expected = dense_series(start, grouped, learned, opt.rule.state_names, 2)
    rtol = DENSE_RTOL if hvp == "autograd" else FD_RTOL[torch.float64]
    check_hypergradients(
        opt,
        [{k: torch.tensor(v, dtype=torch.float64) for k, v in g.items()} for g in expected],
        rtol,
    )


@pytest.mark.parametrize(
    ("seed", "momentum", "nesterov"),
    [(2, 0.5, False), (3, 0.8, False), (4, 0.7, True)],
    ids=["heavy_ball_0.5", "heavy_ball_0.8", "nesterov_0.7"],
)
def test_series_tends_to_ift_hypergradient_geometrically(
    seed: int, momentum: float, nesterov: bool
) -> None:
    """Strongly convex quadratic, SGD with momentum and weight decay, an arbitrary point
    z_t = (w, b), method="ift", hvp="autograd".  With J = dU/dz (dense, on the full state),
    u = ∂U/∂λ and v0 = (∇L_V(w_{t+1}), 0):

    * the K-term hypergradient equals v0 Σ_{j≤K} J^j u (dense linear algebra), K = 0..30;
    * its error against the IFT hypergradient −v0 (J − I)⁻¹ u is
      e_K = v0 J^{K+1} (I − J)⁻¹ u, so with J = V diag(ζ) V⁻¹, a = v0 V, c = V⁻¹ (I − J)⁻¹ u:
      |e_K| ≤ C ρ^K with C = ρ Σ_i |a_i c_i| and ρ = max |ζ_i| < 1, the spectral radius.
      (C is fitted from the modes rather than from |e_0| alone: the eigenvalues of the
      momentum map are complex, so |e_K| oscillates and |e_0| need not bound it.)
    """
    weight_decay, lr = 0.01, 0.1
    quad = oracle.quadratic(seed)
    gen = torch.Generator().manual_seed(seed)
    problem = quad.problem(torch.randn(quad.dim, generator=gen, dtype=torch.float64))
    buffers = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in problem.params]
    learn = ("lr", "momentum", "weight_decay")

    def make(neumann_steps: int) -> tuple[oracle.Problem, HyperSGD]:
        local = oracle.Problem(
            [p.detach().clone().requires_grad_() for p in problem.params],
            quad.train_loss,
            quad.val_loss,
        )
        opt = HyperSGD(
            local.params,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            learn=learn,
            method="ift",
            neumann_steps=neumann_steps,
            update_interval=1,
            hvp="autograd",
            hyper_optimizer=frozen,
        )
        for p, b in zip(local.params, buffers, strict=True):
            opt.state[p]["momentum_buffer"] = b.clone()
        return local, opt

    local, opt = make(0)
    start, learned = oracle.capture(opt), oracle.learned_tensors(opt)
    flat_map = oracle.FlatMap(start, local, ("momentum_buffer",))
    J = flat_map.jacobian()
    eye = torch.eye(J.shape[0], dtype=J.dtype)
    zeta, V = torch.linalg.eig(J)
    rho = float(zeta.abs().max())
    assert rho**30 < 0.05  # so the bound below forces convergence by K = 30
    v0 = flat_map.val_gradient(flat_map.step(flat_map.z0()))
    u = {name: flat_map.hyper_jacobian(learned, 0, name) for name in learn}
    ift = {name: float(-v0 @ torch.linalg.solve(J - eye, u[name])) for name in learn}
    a = v0.to(V.dtype) @ V
    constant = {}
    for name in learn:
        c = torch.linalg.solve(V, torch.linalg.solve(eye - J, u[name]).to(V.dtype))
        constant[name] = rho * float((a * c).abs().sum())

    partial = {name: u[name].clone() for name in learn}  # J^K u
    series = {name: float(v0 @ u[name]) for name in learn}  # v0 Σ_{j≤K} J^j u
    for neumann_steps in range(31):
        if neumann_steps > 0:
            for name in learn:
                partial[name] = J @ partial[name]
                series[name] += float(v0 @ partial[name])
        local, opt = make(neumann_steps)
        opt.step(local.closure, val_closure=local.val_closure)
        got = opt.hypergradients()[0]
        for name in learn:
            value = float(got[name])
            scale = max(abs(series[name]), abs(ift[name]))
            assert abs(value - series[name]) <= DENSE_RTOL * scale, (name, neumann_steps)
            error = abs(value - ift[name])
            bound = constant[name] * rho**neumann_steps + DENSE_RTOL * scale
            assert error <= bound, (name, neumann_steps, error, bound)


# --- 4. finite-difference Hessian-vector products against autograd ---------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(
    ("cls", "kwargs", "learn"),
    [
        (
            HyperSGD,
            {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
            ("lr", "momentum", "weight_decay"),
        ),
        (
            HyperAdam,
            {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.01},
            ("lr", "beta1", "beta2", "eps", "weight_decay"),
        ),
    ],
    ids=["sgd", "adam"],
)
def test_finite_difference_hvp_hypergradients_match_autograd(
    dtype: torch.dtype, cls: type[HyperOptimizer], kwargs: dict[str, Any], learn: tuple[str, ...]
) -> None:
    """The same state, method="ift", K = 3: hvp="finite_difference" and "forward_difference"
    (with torch's closure, which calls backward) agree with hvp="autograd" to FD_RTOL."""
    results = {}
    for hvp in ("autograd", "finite_difference", "forward_difference"):
        problem = oracle.mlp_problem(seed=4, dtype=dtype)
        opt = cls(
            problem.params,
            **kwargs,
            learn=learn,
            method="ift",
            neumann_steps=3,
            update_interval=3,
            hvp=hvp,
            hyper_optimizer=frozen,
        )
        closure = problem.closure if hvp == "autograd" else problem.torch_closure(opt)
        for _ in range(6):
            opt.step(closure, val_closure=problem.val_closure)
        results[hvp] = opt.hypergradients()[0]
    for hvp in ("finite_difference", "forward_difference"):
        for name in learn:
            oracle.assert_close(
                results[hvp][name], results["autograd"][name], FD_RTOL[dtype], what=f"{hvp} {name}"
            )


def relative_error(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return float(
        torch.linalg.vector_norm(oracle.flat(got) - oracle.flat(expected))
        / torch.linalg.vector_norm(oracle.flat(expected))
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("central", [True, False], ids=["central", "forward"])
@pytest.mark.parametrize("seed", range(3))
def test_finite_difference_hvp_class(dtype: torch.dtype, central: bool, seed: int) -> None:
    """``FiniteDifferenceHVP`` on an MLP equals torch.func's exact H d to FD_RTOL of ‖H d‖,
    and puts the parameters back bit for bit (they sit at another point, as after a step)."""
    problem = oracle.mlp_problem(seed, dtype=dtype)
    gen = torch.Generator().manual_seed(100 + seed)
    point = [p.detach().clone() for p in problem.params]
    directions = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype) for p in point]
    with torch.no_grad():  # the live parameters are elsewhere, as they are after a step
        for p in problem.params:
            p.add_(0.1)
    moved = [p.detach().clone() for p in problem.params]

    def gradient() -> list[torch.Tensor]:
        return list(torch.autograd.grad(problem.closure(), problem.params))

    grad_at_point = problem.train_grad(point)
    products = FiniteDifferenceHVP(problem.params, point, grad_at_point, gradient, central=central)(
        directions
    )
    exact = oracle.hvp(  # in float64, on the same data
        oracle.mlp_problem(seed).train_loss,
        [p.double() for p in point],
        [d.double() for d in directions],
    )
    assert relative_error(products, exact) <= FD_RTOL[dtype]
    for p, before in zip(problem.params, moved, strict=True):
        assert torch.equal(p.detach(), before)


def test_finite_difference_hvp_restores_parameters_on_error() -> None:
    """A gradient evaluation that raises still leaves the parameters as they were, bit for
    bit."""
    problem = oracle.mlp_problem(seed=0)
    before = [p.detach().clone() for p in problem.params]
    calls = []

    def gradient() -> list[torch.Tensor]:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return list(torch.autograd.grad(problem.closure(), problem.params))

    point = [p.detach().clone() + 0.3 for p in problem.params]
    hvp = FiniteDifferenceHVP(problem.params, point, problem.train_grad(point), gradient)
    with pytest.raises(RuntimeError, match="boom"):
        hvp([torch.ones_like(p) for p in point])
    for p, b in zip(problem.params, before, strict=True):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("central", [False, True])
@pytest.mark.parametrize("fail", [False, True])
def test_products_in_a_row_put_the_weights_back_once(central: bool, fail: bool) -> None:
    """Inside ``products_in_a_row`` the products (through add_to) are those taken one by one,
    the weights are put back once on leaving (also when a product raises), and not before."""
    problem = oracle.mlp_problem(seed=1)
    before = [p.detach().clone() for p in problem.params]
    point = [p.detach().clone() + 0.2 for p in problem.params]
    gen = torch.Generator().manual_seed(5)
    directions = [
        [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in point] for _ in range(3)
    ]
    restores: list[int] = []
    raise_at: list[int] = []  # the evaluation count at which the gradient raises

    def gradient() -> list[torch.Tensor]:
        if raise_at and raise_at[0] == 0:
            raise RuntimeError("boom")
        if raise_at:
            raise_at[0] -= 1
        return list(torch.autograd.grad(problem.closure(), problem.params))

    def restore() -> None:
        restores.append(1)
        with torch.no_grad():
            for p, b in zip(problem.params, before, strict=True):
                p.copy_(b)

    def make() -> FiniteDifferenceHVP:
        return FiniteDifferenceHVP(
            problem.params, point, problem.train_grad(point), gradient, central=central,
            restore=restore,
        )  # fmt: skip

    one_by_one = make()
    want = [[t.clone() for t in one_by_one(d)] for d in directions]
    assert len(restores) == len(directions)  # each product puts them back
    restores.clear()
    in_a_row = make()
    got: list[list[torch.Tensor]] = []

    def products() -> None:
        with products_in_a_row():
            for d in directions:
                targets = [torch.zeros_like(x) for x in d]
                in_a_row.add_to(d, targets)
                got.append(targets)
                assert not restores  # the weights stay moved inside

    if fail:
        raise_at.append(3 if central else 1)  # during the second product
        with pytest.raises(RuntimeError, match="boom"):
            products()
        assert len(got) == 1
    else:
        products()
    assert len(restores) == 1  # once, on leaving
    for p, b in zip(problem.params, before, strict=True):
        assert torch.equal(p.detach(), b)
    for products_got, exact in zip(got, want, strict=False):
        # add_to scales the difference as it adds it (a rounding of 1/ε apart)
        assert relative_error(products_got, exact) <= 1e-12


def test_products_in_a_row_defer_only_this_threads_products() -> None:
    """A block open in one thread leaves another thread's products as they are: put back
    after each product."""
    problem = oracle.mlp_problem(seed=2)
    before = [p.detach().clone() for p in problem.params]
    point = [p.detach().clone() + 0.1 for p in problem.params]
    restores: list[int] = []

    def restore() -> None:
        restores.append(1)
        with torch.no_grad():
            for p, b in zip(problem.params, before, strict=True):
                p.copy_(b)

    hvp = FiniteDifferenceHVP(
        problem.params, point, problem.train_grad(point),
        lambda: list(torch.autograd.grad(problem.closure(), problem.params)), restore=restore,
    )  # fmt: skip
    with products_in_a_row():
        worker = threading.Thread(target=lambda: hvp([torch.ones_like(p) for p in point]))
        worker.start()
        worker.join()
        assert len(restores) == 1  # the other thread's product put them back itself
    assert len(restores) == 1


@pytest.mark.parametrize("seed", range(3))
def test_autograd_hvp_class(seed: int) -> None:
    """``AutogradHVP`` (double backward) equals torch.func's forward-over-reverse H d; a
    parameter the loss does not use gets a zero product."""
    problem = oracle.mlp_problem(seed)
    unused = torch.randn(4, dtype=torch.float64, requires_grad=True)
    params = [*problem.params, unused]
    gen = torch.Generator().manual_seed(200 + seed)
    directions = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    grads = torch.autograd.grad(problem.closure(), problem.params, create_graph=True)
    products = AutogradHVP(params, [*grads, torch.zeros_like(unused)])(directions)
    exact = oracle.hvp(problem.train_loss, problem.params, directions[:-1])
    assert relative_error(products[:-1], exact) <= EXACT_HVP_RTOL
    assert torch.equal(products[-1], torch.zeros_like(unused))
    # a second call on the same graph gives the same products
    again = AutogradHVP(params, [*grads, torch.zeros_like(unused)])(directions)
    assert all(torch.equal(x, y) for x, y in zip(products, again, strict=True))


# --- 5. higher as a second oracle (SGD: lr, momentum, weight decay) --------------------------


@pytest.mark.parametrize(
    "variant",
    [{"momentum": 0.9}, {"momentum": 0.7, "nesterov": True}, {"momentum": 0.6, "dampening": 0.2}],
    ids=["heavy_ball", "nesterov", "dampening"],
)
def test_greedy_sgd_equals_higher(variant: dict[str, Any]) -> None:
    """The K = 0 hypergradient of HyperSGD equals the gradient through one
    ``higher.innerloop_ctx`` differentiable SGD step with respect to the lr, momentum and
    weight-decay tensors passed via ``override`` (higher is never used for Adam's β2)."""
    higher = pytest.importorskip("higher")
    problem = oracle.mlp_problem(seed=8)
    opt = HyperSGD(
        problem.params,
        lr=0.1,
        weight_decay=0.02,
        **variant,
        learn=("lr", "momentum", "weight_decay"),
        method="greedy",
        update_interval=3,
        hyper_optimizer=frozen,
    )
    start, _ = run_to_last_hyper_step(opt, problem, 6)

    module = problem.module
    assert module is not None
    with torch.no_grad():
        for p, w in zip(module.parameters(), start.params, strict=True):
            p.copy_(w)
    sgd = torch.optim.SGD(module.parameters(), lr=0.1, weight_decay=0.02, **variant)
    for p, b in zip(module.parameters(), start.states[0]["momentum_buffer"], strict=True):
        assert b is not None
        sgd.state[p]["momentum_buffer"] = b.clone()
    hyper = {
        name: torch.tensor(value, dtype=torch.float64, requires_grad=True)
        for name, value in (("lr", 0.1), ("momentum", variant["momentum"]), ("weight_decay", 0.02))
    }
    (x, y), (xv, yv) = problem.batches["train"], problem.batches["val"]
    with higher.innerloop_ctx(
        module, sgd, override={k: [v] for k, v in hyper.items()}, copy_initial_weights=True
    ) as (fmodel, diffopt):
        diffopt.step(((fmodel(x) - y) ** 2).mean())
        val = ((fmodel(xv) - yv) ** 2).mean()
        expected = torch.autograd.grad(val, list(hyper.values()))
    got = opt.hypergradients()[0]
    for name, value in zip(hyper, expected, strict=True):
        oracle.assert_close(got[name], value, HIGHER_RTOL, what=name)


# --- 6. hypergradient descent (Baydin et al.) ------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("torch_closure", [False, True], ids=["no_backward", "backward"])
def test_hd_is_minus_gradient_dot_previous_gradient(granularity: str, torch_closure: bool) -> None:
    """method="hd", update_interval=1, SGD without momentum, a fixed batch: the lr
    hypergradient after step t + 1 is d L_T(w_{t+1}) / dη = −∇L_T(w_{t+1}) · ∇L_T(w_t)
    (Baydin et al. 2018, Eq. 3, natural units), element by element before reduction."""
    problem = oracle.mlp_problem(seed=9)
    opt = HyperSGD(
        problem.params,
        lr=0.05,
        learn="lr",
        granularity=granularity,
        method="hd",
        update_interval=1,
        hyper_optimizer=lambda ps: torch.optim.SGD(ps, lr=1e-3),  # the lr does move
    )
    closure = problem.torch_closure(opt) if torch_closure else problem.closure
    previous = None
    for step in range(6):
        gradient = problem.train_grad([p.detach() for p in problem.params])
        opt.step(closure)
        if previous is not None:
            products = [-g1 * g0 for g1, g0 in zip(gradient, previous, strict=True)]
            got = opt.hypergradients()[0]["lr"]
            if granularity == "scalar":
                expected: Any = sum(x.sum() for x in products)
            elif granularity == "tensor":
                expected = [x.sum() for x in products]
            else:
                expected = products
            oracle.assert_close(got, expected, HD_RTOL, what=f"step {step}")
        previous = gradient
