"""Forward-mode hypergradients with sharing (``method="forward"``, DESIGN §5 and §7).

The oracle (:func:`oracle.schedule_hypergradients`) differentiates the unrolled training —
the rules' ``reference`` maps, each step's gradient by ``torch.func.grad``, step ``t`` using
window ``⌊N t / T⌋`` of each schedule — by reverse mode in float64.  Schedules are kept still
by a hyper-optimizer with learning rate 0 (episodic: the hyper-step at the episode's end only
records ``hypergradients()``), so the optimizer walks the oracle's trajectory.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import oracle
import pytest
import torch
from conftest import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from hyperopt_optim import HyperAdam, HyperAdamW, HyperOptimizer, HyperSGD, SignStep
from hyperopt_optim.hypergradients.forward import window_of

# --- tolerances (DESIGN §7) ------------------------------------------------------------------

# Forward mode over T steps against reverse mode over the same steps: two exact float64
# derivatives of the same arithmetic, judged against the largest entry of each schedule's
# hypergradient (observed: 1e-13 for Adam, 1e-15 for SGD).
EXACT_RTOL = 1e-8
# Some hypergradients are exactly zero (Adam's β2 on its first step), leaving the rounding of
# the O(1) terms that cancel (observed: 7e-15): an absolute floor for those.
ZERO_ATOL = 1e-13
# Tangents by central finite-difference products against exact ones: each product carries
# about u^(2/3) ≈ 4e-11 relative error, accumulated over T steps (observed: 2e-10 at T = 12).
FD_RTOL = 1e-6
# The oracle against central differences of the whole unrolled map (step 1e-5 λ).
ORACLE_FD_RTOL = 1e-6

FROZEN = {"hyper_optimizer": lambda params: torch.optim.SGD(params, lr=0.0)}

CASES: dict[str, tuple[type[HyperOptimizer], dict[str, Any], tuple[str, ...]]] = {
    "sgd_momentum_wd": (
        HyperSGD,
        {"lr": 0.1, "momentum": 0.8, "weight_decay": 0.01},
        ("lr", "momentum", "weight_decay"),
    ),
    "sgd_nesterov": (
        HyperSGD,
        {"lr": 0.05, "momentum": 0.7, "weight_decay": 0.02, "nesterov": True},
        ("lr", "momentum", "weight_decay"),
    ),
    "sgd_dampening_maximize": (
        HyperSGD,
        {"lr": 0.05, "momentum": 0.6, "dampening": 0.3, "weight_decay": 0.01, "maximize": True},
        ("lr", "momentum", "weight_decay"),
    ),
    "adam": (
        HyperAdam,
        {"lr": 0.01, "weight_decay": 0.01},
        ("lr", "beta1", "beta2", "weight_decay"),
    ),
    "adamw_amsgrad": (
        HyperAdamW,
        {"lr": 0.01, "weight_decay": 0.05, "amsgrad": True},
        ("lr", "beta1", "weight_decay", "eps"),
    ),
}


def _step(opt: HyperOptimizer, problem: oracle.Problem, how: str) -> Any:
    if how == "functional":
        return opt.step(loss_fn=problem.train_loss, val_closure=problem.val_closure)
    if how == "finite_difference":
        return opt.step(problem.torch_closure(opt), val_closure=problem.val_closure)
    return opt.step(problem.closure, val_closure=problem.val_closure)  # autograd(_batched)


def _make(
    case: str,
    problem: oracle.Problem,
    *,
    steps: int,
    windows: int,
    granularity: str = "scalar",
    how: str = "autograd",
    horizon: int | None = None,
    **extra: Any,
) -> HyperOptimizer:
    cls, kwargs, learn = CASES[case]
    options = {**FROZEN, **extra}
    return cls(
        problem.params,
        **kwargs,
        learn=learn,
        granularity=granularity,
        method="forward",
        horizon=steps if horizon is None else horizon,
        windows=windows,
        mode="episodic",
        hvp={"finite_difference": "finite_difference", "autograd_batched": "autograd_batched"}.get(
            how, "auto"
        ),
        **options,
    )


def _schedules(opt: HyperOptimizer) -> list[oracle.Learned]:
    return [
        {k: v.clone() if isinstance(v, Tensor) else [x.clone() for x in v] for k, v in g.items()}
        for g in opt.schedules()
    ]


def _relative_error(got: Tensor | list[Tensor], want: Tensor | list[Tensor]) -> float:
    got_list = [got] if isinstance(got, Tensor) else got
    want_list = [want] if isinstance(want, Tensor) else want
    scale = max(float(w.abs().max()) for w in want_list)
    assert scale > 0, "a hypergradient that is exactly zero tests nothing"
    return max(float((g - w).abs().max()) for g, w in zip(got_list, want_list, strict=True)) / scale


def _forward_and_oracle(
    case: str,
    seed: int,
    steps: int,
    windows: int,
    granularity: str,
    how: str,
    horizon: int | None = None,
) -> tuple[list[dict[str, Any]], list[oracle.Learned]]:
    problem = oracle.mlp_problem(seed)
    # the horizon is the episode: a longer one leaves the episode open, so no reset
    opt = _make(
        case, problem, steps=steps, windows=windows, granularity=granularity, how=how,
        horizon=horizon,
    )  # fmt: skip
    start = oracle.capture(opt)
    schedules = _schedules(opt)
    for _ in range(steps):
        _step(opt, problem, how)
    if horizon is not None and horizon > steps:  # no episode end yet: read the tangents now
        opt.compute_hypergradients(problem.val_closure)
    want = oracle.schedule_hypergradients(start, problem, schedules, steps, horizon)
    return opt.hypergradients(), want


def _hypergradients_after(
    case: str, seed: int, steps: int, windows: int, **extra: Any
) -> dict[str, Any]:
    """Group 0's hypergradients after ``steps`` steps with exact products."""
    problem = oracle.mlp_problem(seed)
    opt = _make(case, problem, steps=steps, windows=windows, **extra)
    for _ in range(steps):
        _step(opt, problem, "autograd")
    return opt.hypergradients()[0]


# --- exactness -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["autograd", "autograd_batched", "functional"])
@pytest.mark.parametrize("granularity", ["scalar", "tensor"])
@pytest.mark.parametrize("windows", [1, 3, 5])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_equals_reverse_mode_unrolled(
    case: str, windows: int, granularity: str, how: str
) -> None:
    """After T steps with N shared windows, every window's hypergradient equals reverse mode
    through the same T steps (exact Hessian-vector products: double backward column by column
    or batched, or vmap/jvp)."""
    got, want = _forward_and_oracle(case, 0, 10, windows, granularity, how)
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w)
        for name in g:
            shapes = [x.shape for x in (g[name] if isinstance(g[name], list) else [g[name]])]
            assert all(s == (windows,) for s in shapes)
            assert _relative_error(g[name], w[name]) < EXACT_RTOL, name


@pytest.mark.parametrize("case", ["sgd_momentum_wd", "adam"])
def test_forward_with_two_param_groups(case: str) -> None:
    """Each group's schedule has its own columns; groups with different values are exact."""
    problem = oracle.mlp_problem(3)
    cls, kwargs, learn = CASES[case]
    groups = [
        {"params": problem.params[:2]},
        {"params": problem.params[2:], "lr": kwargs["lr"] * 0.5},
    ]
    opt = cls(
        groups, **kwargs, learn=learn, method="forward", horizon=9, windows=3, mode="episodic",
        **FROZEN,
    )  # fmt: skip
    start = oracle.capture(opt)
    schedules = _schedules(opt)
    for _ in range(9):
        _step(opt, problem, "autograd")
    want = oracle.schedule_hypergradients(start, problem, schedules, 9)
    for g, w in zip(opt.hypergradients(), want, strict=True):
        for name in g:
            assert _relative_error(g[name], w[name]) < EXACT_RTOL, name


@settings(max_examples=12)
@given(
    seed=st.integers(0, 10_000),
    steps=st.integers(1, 9),
    extra=st.integers(0, 6),
    windows=st.integers(1, 6),
    case=st.sampled_from(sorted(CASES)),
    granularity=st.sampled_from(["scalar", "tensor"]),
)
def test_forward_exact_property(
    seed: int, steps: int, extra: int, windows: int, case: str, granularity: str
) -> None:
    """Any seed, T, horizon ≥ T and N ≤ horizon: exact through the steps taken so far;
    windows not reached yet have a hypergradient of exactly zero."""
    horizon = steps + extra
    windows = min(windows, horizon)
    got, want = _forward_and_oracle(case, seed, steps, windows, granularity, "autograd", horizon)
    reached = window_of(steps - 1, horizon, windows) + 1
    for g, w in zip(got, want, strict=True):
        for name in g:
            gs = g[name] if isinstance(g[name], list) else [g[name]]
            ws = w[name] if isinstance(w[name], list) else [w[name]]
            for x, y in zip(gs, ws, strict=True):
                assert bool((x[reached:] == 0).all())
                scale = max(float(y.abs().max()), 1e-300)
                assert float((x - y).abs().max()) <= EXACT_RTOL * scale + ZERO_ATOL, name


@pytest.mark.parametrize("case", ["sgd_momentum_wd", "adam"])
def test_finite_difference_tangents_agree_with_exact(case: str) -> None:
    """Tangents propagated with central finite-difference products (torch's closure, which
    calls backward) agree with those propagated with exact products."""
    exact, _ = _forward_and_oracle(case, 1, 12, 3, "scalar", "autograd")
    fd, _ = _forward_and_oracle(case, 1, 12, 3, "scalar", "finite_difference")
    for e, f in zip(exact, fd, strict=True):
        for name in e:
            assert _relative_error(f[name], e[name]) < FD_RTOL, name


def test_schedule_oracle_matches_central_differences() -> None:
    """The oracle itself: its derivative for one window equals central differences of the
    unrolled validation loss."""
    problem = oracle.mlp_problem(2)
    opt = _make("sgd_momentum_wd", problem, steps=6, windows=3)
    start = oracle.capture(opt)
    schedules = _schedules(opt)
    want = oracle.schedule_hypergradients(start, problem, schedules, 6)[0]

    def loss_at(values: list[oracle.Learned]) -> float:
        def at(k: int) -> list[oracle.Learned]:
            return [{n: v[k] for n, v in g.items()} for g in values]  # type: ignore[index]

        params, states = list(start.params), list(start.states)
        for t in range(6):
            k = window_of(t, 6, 3)
            params, states = oracle.unroll(
                oracle.Start(params, states, start.specs), problem.train_grad, 1, at(k)
            )
        return float(problem.val_loss(params))

    for name in ("lr", "momentum"):
        for k in range(3):
            h = 1e-5 * float(schedules[0][name][k])  # type: ignore[index]
            plus, minus = copy.deepcopy(schedules), copy.deepcopy(schedules)
            plus[0][name][k] += h  # type: ignore[index]
            minus[0][name][k] -= h  # type: ignore[index]
            central = (loss_at(plus) - loss_at(minus)) / (2 * h)
            assert float(want[name][k]) == pytest.approx(central, rel=ORACLE_FD_RTOL)  # type: ignore[index]


def test_grad_clamp_is_differentiated_exactly() -> None:
    """With the paper's gradient clamp, the tangents see the clamp (zero derivative where it
    binds): equal to reverse mode through the clamped training gradient."""
    problem = oracle.mlp_problem(4)
    opt = _make("sgd_momentum_wd", problem, steps=8, windows=2, clamps={"grad": 0.05})
    start = oracle.capture(opt)
    schedules = _schedules(opt)
    for _ in range(8):
        _step(opt, problem, "autograd")
    clamped = oracle.Problem(problem.params, problem.train_loss, problem.val_loss)
    plain_grad = problem.train_grad
    clamped.train_grad = lambda ps: [g.clamp(-0.05, 0.05) for g in plain_grad(ps)]  # type: ignore[method-assign]
    raw = [g.abs().max() for g in plain_grad(start.params)]
    assert max(float(r) for r in raw) > 0.05, "the clamp must bind for the test to mean anything"
    want = oracle.schedule_hypergradients(start, clamped, schedules, 8)[0]
    got = opt.hypergradients()[0]
    for name in got:
        assert _relative_error(got[name], want[name]) < EXACT_RTOL, name


def test_clamps_that_never_bind_change_nothing() -> None:
    runs = [
        _hypergradients_after("sgd_momentum_wd", 5, 6, 2, clamps=clamps)
        for clamps in (None, {"grad": 1e6, "tangent": 1e6})
    ]
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name])


def test_tangent_clamp_bounds_each_product() -> None:
    """A tangent clamp that binds changes the hypergradient (the paper's ±1 on H·Z)."""
    results = [
        _hypergradients_after("sgd_momentum_wd", 5, 6, 2, clamps=clamps)["lr"]
        for clamps in (None, {"tangent": 1e-4})
    ]
    assert not torch.allclose(results[0], results[1])


# --- memory ----------------------------------------------------------------------------------


def _tiny_run(steps: int, horizon: int) -> tuple[HyperOptimizer, int]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    opt = HyperSGD(
        model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3,
        learn=("lr", "momentum", "weight_decay"), method="forward", horizon=horizon, windows=5,
    )  # fmt: skip

    def closure() -> Tensor:
        return ((model(x) - y) ** 2).mean()

    for _ in range(steps):
        opt.step(closure, val_closure=closure)
    state_numel = sum(p.numel() for p in model.parameters()) * 2  # weights and momentum
    return opt, state_numel


def test_tangent_memory_is_m_times_state_and_flat_over_the_horizon() -> None:
    """M·|z| bytes (M = windows × learned values, |z| = weights + momentum buffers), the same
    after 100 and after 10,000 steps, and nothing else in the state grows."""
    short, z = _tiny_run(100, 10_000)
    long, _ = _tiny_run(10_000, 10_000)
    m = 5 * 3
    assert short.tangent_memory() == m * z * 8
    assert long.tangent_memory() == short.tangent_memory()

    def saved_bytes(opt: HyperOptimizer) -> int:
        total = 0

        def walk(x: Any) -> None:
            nonlocal total
            if isinstance(x, Tensor):
                total += x.numel() * x.element_size()
            elif isinstance(x, dict):
                for v in x.values():
                    walk(v)
            elif isinstance(x, list | tuple):
                for v in x:
                    walk(v)

        walk(opt.state_dict())
        return total

    assert saved_bytes(long) == saved_bytes(short)
    assert long.hyper_state["hyper_steps"] == 1000


# --- modes -----------------------------------------------------------------------------------


def _quadratic_run(mode: str, **kwargs: Any) -> tuple[HyperSGD, Callable[[], Tensor]]:
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    target = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)

    def loss() -> Tensor:
        return ((w - target) ** 2).sum()

    opt = HyperSGD([w], lr=0.01, learn="lr", method="forward", mode=mode, **kwargs)
    return opt, loss


def test_online_mode_learns_the_current_window_and_records_the_schedule() -> None:
    """Online: the current window's value steps every update_interval steps (a too-small lr
    on a quadratic grows); windows not reached keep their start; tangents carry on."""
    opt, loss = _quadratic_run("online", horizon=40, windows=4, update_interval=5)
    start = float(opt.param_groups[0]["lr"])
    for _ in range(20):
        opt.step(loss, val_closure=loss)
    schedule = opt.schedules()[0]["lr"]
    assert isinstance(schedule, Tensor)
    assert schedule.shape == (4,)
    assert float(schedule[0]) > start
    assert float(schedule[1]) > float(schedule[0])
    assert float(schedule[2]) == pytest.approx(start)
    assert float(schedule[3]) == pytest.approx(start)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(float(schedule[1]))
    grads = opt.hypergradients()[0]["lr"]
    assert grads.shape == (4,)
    assert float(grads[1]) < 0
    assert bool((grads[2:] == 0).all())
    assert opt.hyper_state["hyper_steps"] == 4


def test_online_mode_runs_past_the_horizon_in_the_last_window() -> None:
    opt, loss = _quadratic_run("online", horizon=10, windows=2, update_interval=5)
    for _ in range(30):
        opt.step(loss, val_closure=loss)
    assert opt.hyper_state["hyper_steps"] == 6
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(float(opt.schedules()[0]["lr"][1]))  # type: ignore[index]


def test_episodic_mode_updates_the_schedule_at_the_end_and_restarts() -> None:
    """Episodic: values stand still within an episode; at its end the whole schedule steps
    (the paper's sign steps by default), tangents and buffers restart, and reruns from the
    same start reach a lower validation loss."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    target = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    scales = torch.tensor([1.0, 3.0, 0.3], dtype=torch.float64)

    def loss() -> Tensor:
        return ((scales * (w - target)) ** 2).sum()

    opt = HyperSGD(
        [w], lr=0.01, momentum=0.5, learn=("lr", "momentum"), method="forward", horizon=20,
        windows=4, mode="episodic",
    )  # fmt: skip
    assert isinstance(opt.hyper_optimizer, SignStep)
    finals = []
    for episode in range(6):
        with torch.no_grad():
            w.zero_()
        before = opt.schedules()[0]["lr"].clone()  # type: ignore[union-attr]
        for t in range(20):
            opt.step(loss, val_closure=loss)
            if t < 19:
                assert torch.equal(opt.schedules()[0]["lr"], before)  # type: ignore[arg-type]
        finals.append(float(loss()))
        assert opt._method.schedule.position == 0
        assert opt._method.schedule.episodes == episode + 1
        assert opt.tangent_memory() > 0
        assert not opt.state
        assert not torch.equal(opt.schedules()[0]["lr"], before)  # type: ignore[arg-type]
    assert finals[-1] < 0.5 * finals[0]
    assert opt.hyper_state["hyper_steps"] == 6


def test_episodic_values_follow_the_windows() -> None:
    """Step t uses window ⌊N t / T⌋ of the schedule (written here by hand)."""
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = HyperSGD(
        [w], lr=0.1, learn="lr", method="forward", horizon=6, windows=3, mode="episodic",
        **FROZEN,
    )  # fmt: skip
    with torch.no_grad():
        opt._method.schedule.values[0]["lr"][0].copy_(torch.log(torch.tensor([0.1, 0.2, 0.3])))
    seen = []
    for _ in range(6):
        opt.step(lambda: (w**2).sum(), val_closure=lambda: (w**2).sum())
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.3, 0.3])


def test_frozen_forward_mode_trains_exactly_as_torch() -> None:
    """With the schedule standing still, the weights follow torch.optim.SGD bit for bit."""
    problem = oracle.mlp_problem(6)
    twin = [p.detach().clone().requires_grad_() for p in problem.params]
    opt = HyperSGD(
        problem.params, lr=0.1, momentum=0.9, weight_decay=0.01,
        learn=("lr", "momentum", "weight_decay"), method="forward", horizon=10, windows=2,
        mode="online", **FROZEN,
    )  # fmt: skip
    ref = torch.optim.SGD(twin, lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(10):
        opt.step(problem.closure, val_closure=problem.val_closure)
        ref.zero_grad()
        problem.train_loss(twin).backward()
        ref.step()
    for p, q in zip(problem.params, twin, strict=True):
        assert torch.equal(p, q)


# --- robustness and state --------------------------------------------------------------------


def test_non_finite_validation_loss_skips_and_keeps_the_schedule() -> None:
    opt, loss = _quadratic_run("online", horizon=10, windows=2, update_interval=2)
    before = opt.schedules()[0]["lr"].clone()  # type: ignore[union-attr]
    opt.step(loss, val_closure=lambda: loss() * float("nan"))
    with pytest.warns(RuntimeWarning, match="validation loss is nan"):
        opt.step(loss, val_closure=lambda: loss() * float("nan"))
    assert torch.equal(opt.schedules()[0]["lr"], before)  # type: ignore[arg-type]
    assert opt.hyper_state["skipped_hyper_steps"] == 1


def test_non_finite_tangents_restart_from_zero() -> None:
    opt, loss = _quadratic_run("online", horizon=10, windows=2, update_interval=2)
    for _ in range(1):
        opt.step(loss, val_closure=loss)
    assert opt._method.tangents.tensors is not None
    opt._method.tangents.tensors[0][0]["param"].fill_(float("inf"))
    before = opt.schedules()[0]["lr"].clone()  # type: ignore[union-attr]
    with pytest.warns(RuntimeWarning, match="tangents restart"):
        opt.step(loss, val_closure=loss)
    assert torch.equal(opt.schedules()[0]["lr"], before)  # type: ignore[arg-type]
    assert all(bool(torch.isfinite(z).all()) for z in opt._method.tangents.tensors[0][0].values())
    assert math.isfinite(float(opt.param_groups[0]["lr"]))


@pytest.mark.parametrize("mode", ["online", "episodic"])
def test_state_dict_round_trips_mid_episode(mode: str) -> None:
    """Saved mid-episode (tangents, schedules, position) and loaded into a fresh optimizer,
    the run continues exactly as the uninterrupted one."""

    def make(problem: oracle.Problem) -> HyperOptimizer:
        return HyperSGD(
            problem.params, lr=0.05, momentum=0.8, learn=("lr", "momentum"),
            method="forward", horizon=8, windows=4, mode=mode,
            **({"update_interval": 3} if mode == "online" else {}),
        )  # fmt: skip

    a = oracle.mlp_problem(7)
    opt_a = make(a)
    for _ in range(13):
        _step(opt_a, a, "autograd")
    b = oracle.mlp_problem(7)
    opt_b = make(b)
    for _ in range(5):
        _step(opt_b, b, "autograd")
    saved = copy.deepcopy(opt_b.state_dict())
    with torch.no_grad():
        weights = [p.clone() for p in b.params]
    c = oracle.mlp_problem(7)
    with torch.no_grad():
        for p, x in zip(c.params, weights, strict=True):
            p.copy_(x)
    opt_c = make(c)
    opt_c.load_state_dict(saved)
    for _ in range(8):
        _step(opt_c, c, "autograd")
    for p, q in zip(a.params, c.params, strict=True):
        assert torch.equal(p, q)
    for name in ("lr", "momentum"):
        assert torch.equal(opt_a.schedules()[0][name], opt_c.schedules()[0][name])  # type: ignore[arg-type]
        assert torch.equal(opt_a.hypergradients()[0][name], opt_c.hypergradients()[0][name])  # type: ignore[arg-type]


def test_state_dict_with_other_windows_is_refused() -> None:
    problem = oracle.mlp_problem(0)
    opt = _make("sgd_momentum_wd", problem, steps=6, windows=3)
    _step(opt, problem, "autograd")
    other = _make("sgd_momentum_wd", oracle.mlp_problem(0), steps=6, windows=2)
    with pytest.raises(ValueError, match="shapes"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize(("saved", "loaded"), [("online", "episodic"), ("episodic", "online")])
def test_state_dict_of_the_other_mode_is_refused_before_anything_loads(
    saved: str, loaded: str
) -> None:
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))

    def loss() -> Tensor:
        return (w**2).sum()

    opt = HyperSGD([w], lr=0.1, method="forward", horizon=4, windows=2, mode=saved)
    for _ in range(5):
        opt.step(loss, val_closure=loss)
    other = HyperSGD([w], lr=0.1, method="forward", horizon=4, windows=2, mode=loaded)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=f"learned in mode='{saved}', this optimizer's mode"):
        other.load_state_dict(opt.state_dict())
    after = other.state_dict()
    assert after["hyper"]["counters"] == before["hyper"]["counters"]
    assert after["state"] == before["state"]


# --- arguments -------------------------------------------------------------------------------


def _w() -> list[Tensor]:
    return [torch.nn.Parameter(torch.zeros(2))]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"granularity": "element"}, ValueError, "one tangent the size of the whole"),
        ({"granularity": {"lr": "element"}}, ValueError, "granularity 'element'"),
        ({"horizon": None}, ValueError, "needs horizon"),
        ({"horizon": 0}, ValueError, "horizon must be an integer >= 1, got 0"),
        ({"horizon": 2.5}, ValueError, "horizon must be an integer"),
        ({"windows": 11}, ValueError, r"windows must be an integer in \[1, horizon=10\], got 11"),
        ({"windows": 0}, ValueError, "windows must be"),
        ({"mode": "batch"}, ValueError, "mode must be one of"),
        ({"mode": "episodic", "update_interval": 5}, ValueError, "does not apply to mode"),
        ({"clamps": {"hz": 1.0}}, ValueError, "'hz' is not a clamp"),
        ({"clamps": {"grad": -1.0}}, ValueError, r"clamps\['grad'\] must be positive"),
        ({"clamps": [3.0, 1.0]}, TypeError, "clamps must be a mapping"),
        ({"neumann_steps": 2}, ValueError, "takes no Neumann terms"),
    ],
)
def test_bad_forward_arguments(kwargs: dict[str, Any], error: type, match: str) -> None:
    options: dict[str, Any] = {"method": "forward", "horizon": 10, **kwargs}
    with pytest.raises(error, match=match):
        HyperSGD(_w(), lr=0.1, **options)


@pytest.mark.parametrize("name", ["horizon", "windows", "mode", "clamps"])
def test_forward_options_refused_with_other_methods(name: str) -> None:
    value = {"horizon": 10, "windows": 2, "mode": "online", "clamps": {"grad": 3.0}}[name]
    owners = (
        "method='forward'"
        if name == "clamps"
        else r"one of the methods \('forward', 'reversible'\)"
    )
    with pytest.raises(ValueError, match=f"{name}=.* is an option of {owners}"):
        HyperSGD(_w(), lr=0.1, method="ift", **{name: value})


def test_forward_needs_a_training_closure_or_loss_fn() -> None:
    opt = HyperSGD(_w(), lr=0.1, method="forward", horizon=4)
    with pytest.raises(ValueError, match="needs a training closure or loss_fn"):
        opt.step(val_closure=lambda: torch.zeros(()))


def test_loss_fn_is_for_forward_mode_only() -> None:
    params = _w()
    opt = HyperSGD(params, lr=0.1, method="greedy")
    with pytest.raises(ValueError, match="loss_fn is taken by method='forward' only"):
        opt.step(loss_fn=lambda ps: (ps[0] ** 2).sum(), val_closure=lambda: params[0].sum())


def test_schedules_needs_forward_mode() -> None:
    with pytest.raises(RuntimeError, match=r"needs one of the methods \('forward', 'reversible'\)"):
        HyperSGD(_w(), lr=0.1).schedules()
    with pytest.raises(RuntimeError, match=r"needs one of the methods \('forward', 'reversible'\)"):
        HyperSGD(_w(), lr=0.1).compute_hypergradients(lambda: torch.zeros(()))


def test_compute_hypergradients_mid_episode_takes_no_hyper_step() -> None:
    """Mid-episode, the hypergradients at the current weights, without moving anything."""
    problem = oracle.mlp_problem(11)
    opt = _make("sgd_momentum_wd", problem, steps=4, windows=2, horizon=8)
    assert all(
        bool((x == 0).all()) for x in opt.compute_hypergradients(problem.val_closure)[0].values()
    )  # type: ignore[union-attr]
    before = _schedules(opt)
    for _ in range(4):
        _step(opt, problem, "autograd")
    got = opt.compute_hypergradients(problem.val_closure)[0]
    assert opt.hyper_state["hyper_steps"] == 0
    assert float(got["lr"][0]) != 0  # type: ignore[index]
    assert bool((got["lr"][1:] == 0).all())  # type: ignore[index]
    for name in got:
        assert torch.equal(opt.schedules()[0][name], before[0][name])  # type: ignore[arg-type]
    assert torch.equal(opt.hypergradients()[0]["lr"], got["lr"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a validation closure"):
        HyperSGD(_w(), lr=0.1, method="forward", horizon=3).compute_hypergradients()


def test_new_param_group_mid_episode_is_refused() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    opt = HyperSGD([w], lr=0.1, method="forward", horizon=4, windows=2)
    opt.step(lambda: (w**2).sum(), val_closure=lambda: (w**2).sum())
    with pytest.raises(RuntimeError, match="only before the first step of an episode"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))]})
    # refused whole: the optimizer goes on as it was, with one group
    assert len(opt.param_groups) == 1
    assert len(opt.hyperparameters()) == len(opt.schedules()) == 1
    for _ in range(3):
        opt.step(lambda: (w**2).sum(), val_closure=lambda: (w**2).sum())
    assert opt.hyper_state["step"] == 4


# --- SignStep --------------------------------------------------------------------------------


def test_sign_step_halves_on_each_sign_flip() -> None:
    x = torch.nn.Parameter(torch.zeros(3))
    opt = SignStep([x], lr=0.4)
    steps = []
    for g in ([1.0, -2.0, 0.0], [3.0, 5.0, 0.0], [-1.0, 1.0, 7.0], [-4.0, -1.0, -1.0]):
        before = x.detach().clone()
        x.grad = torch.tensor(g)
        opt.step()
        steps.append((x.detach() - before).tolist())
    assert steps[0] == pytest.approx([-0.4, 0.4, 0.0])
    assert steps[1] == pytest.approx([-0.4, -0.2, 0.0])  # second entry flipped: halved
    assert steps[2] == pytest.approx([0.2, -0.2, -0.4])  # a zero sign is not a flip
    assert steps[3] == pytest.approx([0.2, 0.1, 0.2])


def test_sign_step_maximize_and_checks() -> None:
    x = torch.nn.Parameter(torch.zeros(1))
    opt = SignStep([x], lr=0.1, maximize=True)
    x.grad = torch.ones(1)
    opt.step()
    assert float(x) == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"Invalid decay value: 1\.5"):
        SignStep([x], decay=1.5)
    with pytest.raises(ValueError, match="Invalid lr value: -1"):
        SignStep([x], lr=-1)
    with pytest.raises(TypeError, match="lr must be a real number"):
        SignStep([x], lr="big")  # type: ignore[arg-type]


def test_sign_step_beside_any_optimizer_in_episodic_mode() -> None:
    """The outer update is a choice: Adam on the schedule works the same way."""
    opt, loss = _quadratic_run(
        "episodic", horizon=10, windows=2,
        hyper_optimizer=lambda p: torch.optim.Adam(p, lr=0.1),
    )  # fmt: skip
    assert isinstance(opt.hyper_optimizer, torch.optim.Adam)
    for _ in range(10):
        opt.step(loss, val_closure=loss)
    assert opt.hyper_state["hyper_steps"] == 1
    assert float(opt.schedules()[0]["lr"][0]) == pytest.approx(0.01 * math.exp(0.1))  # type: ignore[index]


# --- devices ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("how", "granularity"),
    [
        ("autograd", "scalar"),
        ("functional", "scalar"),
        ("finite_difference", "scalar"),
        ("autograd", "tensor"),
    ],
)
def test_forward_float32_on_device_against_float64_oracle(
    device: str, how: str, granularity: str
) -> None:
    """A float32 run (CPU or CUDA) matches the float64 oracle from the same point."""
    problem = oracle.mlp_problem(8, dtype=torch.float32, device=device)
    opt = _make("sgd_momentum_wd", problem, steps=6, windows=2, how=how, granularity=granularity)
    start = oracle.capture(opt).to(torch.float64)
    schedules = [
        {
            k: v.double().cpu() if isinstance(v, Tensor) else [x.double().cpu() for x in v]
            for k, v in g.items()
        }
        for g in _schedules(opt)
    ]
    for _ in range(6):
        _step(opt, problem, how)
    twin = oracle.mlp_problem(8)
    want = oracle.schedule_hypergradients(start, twin, schedules, 6)[0]
    got = opt.hypergradients()[0]
    for name, value in got.items():
        values = [value] if isinstance(value, Tensor) else value
        assert all(x.device.type == torch.device(device).type for x in values), name
        cast = [x.double().cpu() for x in values]
        error = _relative_error(cast if isinstance(value, list) else cast[0], want[name])
        assert error < 1e-3, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("granularity", ["scalar", "tensor"])
def test_forward_online_on_device(device: str, granularity: str) -> None:
    """Online forward mode trains on the device: values move and stay finite there."""
    problem = oracle.mlp_problem(9, dtype=torch.float32, device=device)
    cls, kwargs, learn = CASES["adam"]
    opt = cls(
        problem.params, **kwargs, learn=learn, granularity=granularity, method="forward",
        horizon=20, windows=2, update_interval=5,
    )  # fmt: skip
    before = opt.schedules()[0]["lr"]
    for _ in range(20):
        _step(opt, problem, "autograd")
    after = opt.schedules()[0]["lr"]
    assert opt.hyper_state["hyper_steps"] == 4
    pairs = [(before, after)] if isinstance(after, Tensor) else zip(before, after, strict=True)
    for b, a in pairs:
        assert bool(torch.isfinite(a).all())
        assert not torch.equal(a, b)


def test_finite_differences_leave_the_step_gradient_alone() -> None:
    """A closure that zeroes ``.grad`` in place (``set_to_none=False``) is called again by the
    finite differences; the update still uses this step's gradient, so the weights follow
    the run with exact products."""
    runs = []
    for how in ("autograd", "in_place"):
        problem = oracle.mlp_problem(10)
        opt = _make("sgd_momentum_wd", problem, steps=5, windows=2, horizon=50)
        for _ in range(5):
            if how == "autograd":
                opt.step(problem.closure, val_closure=problem.val_closure)
            else:

                def closure(opt: HyperOptimizer = opt, problem: oracle.Problem = problem) -> Tensor:
                    opt.zero_grad(set_to_none=False)
                    loss = problem.train_loss(problem.params)
                    loss.backward()
                    return loss

                opt.step(closure, val_closure=problem.val_closure)
        runs.append([p.detach().clone() for p in problem.params])
    for a, b in zip(*runs, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)


def test_forward_differences_with_the_gradient_clamp() -> None:
    """With the clamp binding, tangents by forward differences of torch's closure agree with
    exact ones (the clamp's zero derivative masks the products where it binds)."""
    results = []
    for how in ("autograd", "forward_difference"):
        problem = oracle.mlp_problem(4)
        opt = _make("sgd_momentum_wd", problem, steps=8, windows=2, clamps={"grad": 0.05})
        if how == "forward_difference":
            opt.hvp = opt._closures.resolved = "forward_difference"
            closure = problem.torch_closure(opt)
        else:
            closure = problem.closure
        for _ in range(8):
            opt.step(closure, val_closure=problem.val_closure)
        results.append(opt.hypergradients()[0])
    for name in results[0]:
        # forward differences: about u^(1/2) relative per product
        assert _relative_error(results[1][name], results[0][name]) < 1e-4, name


def _overshooting_run(backtrack: bool | None) -> tuple[HyperSGD, list[Tensor], list[float]]:
    """Episodes on a quadratic whose outer step is far too large: the second schedule's lr
    makes the run diverge."""
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    target = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)

    def loss() -> Tensor:
        return ((w - target) ** 2).sum()

    opt = HyperSGD(
        [w], lr=0.05, learn="lr", method="forward", horizon=10, windows=2, mode="episodic",
        hyper_optimizer=lambda p: SignStep(p, lr=4.0), backtrack=backtrack,
    )  # fmt: skip
    used, finals = [], []
    for _ in range(3):
        with torch.no_grad():
            w.zero_()
        used.append(opt.schedules()[0]["lr"].clone())  # type: ignore[union-attr]
        for _ in range(10):
            opt.step(loss, val_closure=loss)
        finals.append(float(loss().detach()))
    return opt, used, finals


def test_episodic_backtracks_to_the_best_schedule_with_halved_steps() -> None:
    """An episode that ends worse than the best (here: the first step overshoots) sends the
    schedule back to the best episode's and steps again from there, along that episode's
    hypergradient, with the sign steps halved."""
    with pytest.warns(RuntimeWarning, match="goes back to that episode's"):
        opt, used, finals = _overshooting_run(None)
    assert finals[1] > finals[0]  # the overshoot
    first_step = torch.log(used[1]) - torch.log(used[0])
    retry = torch.log(used[2]) - torch.log(used[0])
    assert torch.allclose(retry, first_step / 2)  # the same direction, half the step
    assert finals[2] < finals[0]
    assert opt._method.schedule.backtracks == 1


def test_episodic_without_backtracking_takes_the_papers_steps() -> None:
    opt, used, finals = _overshooting_run(False)
    assert finals[1] > finals[0]
    assert not torch.equal(used[2], used[0])
    assert opt._method.schedule.backtracks == 0


def test_backtrack_argument_checks() -> None:
    with pytest.raises(ValueError, match="applies to mode='episodic' only"):
        HyperSGD(_w(), lr=0.1, method="forward", horizon=4, backtrack=True)
    with pytest.raises(TypeError, match="backtrack must be a bool"):
        HyperSGD(_w(), lr=0.1, method="forward", horizon=4, mode="episodic", backtrack=1)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=r"backtrack=False is an option of one of the methods \('forward', 'reversible'\)",
    ):
        HyperSGD(_w(), lr=0.1, backtrack=False)


def test_foreach_false_gives_the_same_tangents() -> None:
    """``foreach=False`` (one tensor at a time) changes nothing in forward mode."""
    results = [_hypergradients_after("adam", 12, 6, 3, foreach=f) for f in (None, False)]
    for name in results[0]:
        assert torch.allclose(results[0][name], results[1][name], rtol=1e-12, atol=1e-15), name


def test_a_scheduler_sets_the_current_windows_value() -> None:
    """A value written into the param group (here by torch's StepLR) becomes the current
    window's value in the schedule; the step uses it."""
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = HyperSGD(
        [w], lr=0.1, learn="lr", method="forward", horizon=8, windows=2, mode="episodic",
        **FROZEN,
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.step(lambda: (w**2).sum(), val_closure=lambda: (w**2).sum())
        scheduler.step()
    opt.step(lambda: (w**2).sum(), val_closure=lambda: (w**2).sum())
    schedule = opt.schedules()[0]["lr"]
    assert float(schedule[0]) == pytest.approx(0.025)  # type: ignore[index]
    assert float(schedule[1]) == pytest.approx(0.1)  # type: ignore[index]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_loss_fn_that_mutates_a_buffer_gets_a_clear_error() -> None:
    """Batch norm in training mode updates its running statistics in place, which torch.func
    refuses inside its transforms: the error says what to do instead."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    names = [n for n, _ in model.named_parameters()]
    buffers = dict(model.named_buffers())
    x = torch.randn(8, 3)
    opt = HyperSGD(model.parameters(), lr=0.1, method="forward", horizon=4)

    def loss_fn(params: list[Tensor]) -> Tensor:
        out = torch.func.functional_call(
            model, {**dict(zip(names, params, strict=True)), **buffers}, (x,)
        )
        return out.pow(2).mean()

    with pytest.raises(RuntimeError, match="replace_all_batch_norm_modules_"):
        opt.step(loss_fn=loss_fn, val_closure=lambda: model(x).pow(2).mean())


@pytest.mark.parametrize("loss", ["mse_loss", "huber_loss"])
def test_loss_fn_with_a_loss_torch_func_cannot_differentiate_twice_gets_a_clear_error(
    loss: str,
) -> None:
    """torch 2.13's forward-mode AD has no rule for the backward of mse_loss and huber_loss,
    which exact products of loss_fn need: the error says what to write instead (where a later
    torch has the rule, the step is taken)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    names = [n for n, _ in model.named_parameters()]
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    opt = HyperSGD(model.parameters(), lr=0.1, method="forward", horizon=4)

    def loss_fn(params: list[Tensor]) -> Tensor:
        out = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (x,))
        return getattr(torch.nn.functional, loss)(out, y)

    def val() -> Tensor:
        return model(x).pow(2).mean()

    def twice(w: Tensor) -> Tensor:  # forward over reverse, as the products take it
        return torch.func.grad(lambda v: getattr(torch.nn.functional, loss)(v, y[:, 0]))(w)

    try:
        torch.func.jvp(twice, (x[:, 0],), (torch.ones_like(x[:, 0]),))
    except RuntimeError:
        with pytest.raises(RuntimeError, match=r"elementary operations, e\.g\. \(\(out - target"):
            opt.step(loss_fn=loss_fn, val_closure=val)
    else:  # a torch with the rule: the step is taken
        opt.step(loss_fn=loss_fn, val_closure=val)
        assert opt.hyper_state["step"] == 1


def test_autograd_batched_is_for_forward_mode_only() -> None:
    with pytest.raises(ValueError, match=r"hvp='autograd_batched'.*not method='ift'"):
        HyperSGD(_w(), lr=0.1, method="ift", hvp="autograd_batched")


# --- regressions found in review -------------------------------------------------------------


def _square(w: Tensor) -> Callable[[], Tensor]:
    return lambda: (w**2).sum()


def test_a_scheduler_write_at_a_window_boundary_is_the_new_windows_value() -> None:
    """Episodic: a value written just before a window starts becomes that window's value
    (it used to be overwritten by the schedule)."""
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = HyperSGD(
        [w], lr=0.1, learn="lr", method="forward", horizon=8, windows=2, mode="episodic",
        **FROZEN,
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    used = []
    for _ in range(6):
        opt.step(_square(w), val_closure=_square(w))
        used.append(opt.param_groups[0]["lr"])
        scheduler.step()
    assert used == pytest.approx([0.1 * 0.5**k for k in range(6)])


def test_torch_state_dict_restarts_the_episodic_schedule() -> None:
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = HyperSGD(
        [w], lr=0.1, learn="lr", method="forward", horizon=4, windows=2, mode="episodic",
        **FROZEN,
    )  # fmt: skip
    opt.load_state_dict(torch.optim.SGD([w], lr=0.5).state_dict())
    opt.step(_square(w), val_closure=_square(w))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    assert opt.schedules()[0]["lr"].tolist() == pytest.approx([0.5, 0.5])  # type: ignore[union-attr]


def test_loss_fn_skips_unused_parameters_and_frozen_ones() -> None:
    """With loss_fn, a parameter the loss does not use gets no gradient and is not updated
    (as torch does); one frozen with a stale .grad has no Hessian term."""
    a = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = HyperSGD(
        [a, b], lr=0.1, momentum=0.9, weight_decay=0.1, learn="lr", method="forward",
        horizon=6,
    )  # fmt: skip
    opt.step(loss_fn=lambda ps: (ps[0] ** 2).sum(), val_closure=_square(a))
    assert b.grad is None
    assert torch.equal(b.detach(), torch.ones(2, dtype=torch.float64))
    assert not opt.state.get(b)
    opt.step(loss_fn=lambda ps: sum((p**2).sum() for p in ps), val_closure=_square(a))
    b.requires_grad_(False)  # frozen, its .grad left in place
    opt.step(loss_fn=lambda ps: (ps[0] ** 2).sum() + (b**2).sum(), val_closure=_square(a))
    assert opt.hyper_state["step"] == 3


def test_a_non_finite_hypergradient_never_becomes_the_best_episode() -> None:
    """Backtracking records an episode as the best only with a finite hypergradient; an
    episode whose tangents overflowed is skipped and the next one steps normally."""
    target = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def loss() -> Tensor:
        return ((w - target) ** 2).sum()

    opt = HyperSGD([w], lr=0.02, learn="lr", method="forward", horizon=10, windows=2,
                   mode="episodic")  # fmt: skip
    schedules = []
    for episode in range(3):
        with torch.no_grad():
            w.zero_()
        for t in range(10):
            if episode == 0 and t == 9:
                assert opt._method.tangents.tensors is not None
                opt._method.tangents.tensors[0][0]["param"].fill_(float("inf"))
            if episode == 0 and t == 9:
                with pytest.warns(RuntimeWarning, match="not finite"):
                    opt.step(loss, val_closure=loss)
            else:
                opt.step(loss, val_closure=loss)
        schedules.append(opt.schedules()[0]["lr"].clone())  # type: ignore[union-attr]
    assert schedules[0].tolist() == pytest.approx([0.02, 0.02])
    assert float(schedules[1][0]) > 0.02
    assert float(schedules[2][0]) > float(schedules[1][0])


def test_a_param_group_added_between_episodes_resets_backtracking() -> None:
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    v = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def loss() -> Tensor:
        return ((w - 1) ** 2).sum() + ((v + 1) ** 2).sum()

    opt = HyperSGD(
        [w], lr=0.05, learn="lr", method="forward", horizon=5, windows=1, mode="episodic",
        hyper_optimizer=lambda p: SignStep(p, lr=5.0),
    )  # fmt: skip
    for _ in range(5):
        opt.step(loss, val_closure=loss)
    opt.add_param_group({"params": [v]})
    for _ in range(3):  # an overshooting step, then a backtrack over both groups
        with torch.no_grad():
            w.zero_()
            v.zero_()
        for _ in range(5):
            opt.step(loss, val_closure=loss)
    assert len(opt.schedules()) == 2


def test_loaded_tangents_take_the_parameters_dtype() -> None:
    """As torch casts optimizer state to its parameter, loaded tangents follow the model."""
    problem = oracle.mlp_problem(13)
    opt = _make("sgd_momentum_wd", problem, steps=6, windows=2)
    _step(opt, problem, "autograd")
    saved = opt.state_dict()
    twin = oracle.mlp_problem(13, dtype=torch.float32)
    other = _make("sgd_momentum_wd", twin, steps=6, windows=2)
    other.load_state_dict(saved)
    assert other._method.tangents.tensors is not None
    assert all(
        z.dtype == torch.float32
        for g in other._method.tangents.tensors
        for e in g
        for z in e.values()
    )
    _step(other, twin, "autograd")
