"""Reversible learning (``method="reversible"``): exactness of the reversal and of the
hypergradients against unrolled reverse mode and forward mode, state dicts, refusals."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from hyperopt_optim import HyperAdam, HyperAdamW, HyperSGD
from hyperopt_optim.hypergradients.reversible import (
    DENOMINATOR,
    InformationBuffer,
    divide,
    from_fixed,
    multiply,
    quantise_momentum,
    to_fixed,
)

NAMES = ("lr", "momentum", "weight_decay")


def _frozen(lr: float = 0.0) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    return lambda ps: torch.optim.SGD(ps, lr=lr)


class Problem:
    """A small tanh network in float64 with fixed batches per step and a validation set."""

    def __init__(self, seed: int, width: int = 6, steps: int = 12, dtype: Any = torch.float64):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(40, 4, generator=g, dtype=dtype)
        self.y = torch.randn(40, 2, generator=g, dtype=dtype)
        self.xv = torch.randn(16, 4, generator=g, dtype=dtype)
        self.yv = torch.randn(16, 2, generator=g, dtype=dtype)
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 2)).to(dtype)
        self.batches = [torch.randint(0, 40, (8,), generator=g) for _ in range(steps)]
        self.names = [n for n, _ in self.model.named_parameters()]

    def loss(self, params: list[Tensor], idx: Tensor) -> Tensor:
        out = torch.func.functional_call(
            self.model, dict(zip(self.names, params, strict=True)), (self.x[idx],)
        )
        return ((out - self.y[idx]) ** 2).mean()

    def val_loss(self, params: list[Tensor]) -> Tensor:
        out = torch.func.functional_call(
            self.model, dict(zip(self.names, params, strict=True)), (self.xv,)
        )
        return ((out - self.yv) ** 2).mean()

    def closure_at(self, t: int, torch_style: bool = False) -> Callable[[], Tensor]:
        params = list(self.model.parameters())

        def loss_only() -> Tensor:
            return self.loss(params, self.batches[t])

        def with_backward() -> Tensor:
            for p in params:
                p.grad = None
            loss = self.loss(params, self.batches[t])
            loss.backward()
            return loss

        return with_backward if torch_style else loss_only

    def val(self) -> Tensor:
        return self.val_loss(list(self.model.parameters()))


def unrolled(
    problem: Problem,
    w0: list[Tensor],
    steps: int,
    windows: int,
    values: dict[str, Tensor],
    *,
    dampening: float = 0.0,
    maximize: bool = False,
    per_tensor: bool = False,
) -> tuple[dict[str, Tensor], list[Tensor], list[Tensor]]:
    """The oracle: torch's SGD unrolled with autograd through every step, the momentum of each
    window quantised as the method uses it.  ``values[name]``: ``(windows,)`` or, per tensor,
    ``(tensors, windows)``.  Returns dL_V/d(values), dL_V/dw_0 and w_T."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in values.items()}
    w = [x.clone().requires_grad_(True) for x in w0]
    start = w
    b: list[Tensor] = []
    sign = -1.0 if maximize else 1.0
    for t in range(steps):
        k = min(windows - 1, windows * t // steps)

        def at(name: str, j: int, k: int = k) -> Tensor:
            x = leaves[name]
            return x[j, k] if per_tensor else x[k]

        g = torch.autograd.grad(problem.loss(w, problem.batches[t]), w, create_graph=True)
        gh = [
            sign * gi + at("weight_decay", j) * wi
            for j, (gi, wi) in enumerate(zip(g, w, strict=True))
        ]
        if t == 0:
            b = gh
        else:
            b = [
                at("momentum", j) * bj + (1 - dampening) * gj
                for j, (bj, gj) in enumerate(zip(b, gh, strict=True))
            ]
        w = [wj - at("lr", j) * bj for j, (wj, bj) in enumerate(zip(w, b, strict=True))]
    inputs = [*leaves.values(), *start]
    found = torch.autograd.grad(problem.val_loss(w), inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, found, strict=True)]
    named = dict(zip(leaves, grads[: len(leaves)], strict=True))
    return named, list(grads[len(leaves) :]), [x.detach() for x in w]


def _on_grid(ws: list[Tensor]) -> list[Tensor]:
    return [from_fixed(to_fixed(x.to(torch.float64))).to(x.dtype) for x in ws]


def run_episode(
    problem: Problem, steps: int, *, torch_style: bool = False, **kwargs: Any
) -> tuple[HyperSGD, list[Tensor]]:
    kwargs.setdefault("hyper_optimizer", _frozen())
    opt = HyperSGD(problem.model.parameters(), method="reversible", horizon=steps, **kwargs)
    w0 = _on_grid([p.detach().clone() for p in problem.model.parameters()])
    for t in range(steps):
        opt.step(problem.closure_at(t, torch_style))
    opt.reverse(problem.val, lambda t: problem.closure_at(t, torch_style))
    return opt, w0


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# -- the arithmetic --------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    momenta=st.lists(st.floats(1e-4, 1.0), min_size=1, max_size=40),
    scale=st.sampled_from([1e-12, 1e-3, 1.0, 500.0]),
)
def test_the_momentum_product_is_undone_exactly(
    seed: int, momenta: list[float], scale: float
) -> None:
    """``multiply`` then ``divide`` in reverse order gives back every velocity and an empty
    buffer, bit for bit, for any momenta; each product is ``B n/2^16`` to within one unit."""
    g = torch.Generator().manual_seed(seed)
    b0 = to_fixed(torch.randn(257, generator=g, dtype=torch.float64) * scale)
    buffer = InformationBuffer(257, torch.device("cpu"))
    b, seen = b0, []
    for mu in momenta:
        n = quantise_momentum(mu)
        after = multiply(b, n, buffer)
        exact = b.to(torch.float64) * n / DENOMINATOR
        assert (
            float((after.to(torch.float64) - exact).abs().max())
            <= 1.0 + abs(float(exact.abs().max())) * 2**-52
        )
        seen.append((b, n))
        b = after
    for before, n in reversed(seen):
        b = divide(b, n, buffer)
        assert torch.equal(b, before)
    assert bool(buffer.is_zero())
    assert torch.equal(b, b0)


def test_the_buffer_grows_by_about_log2_of_one_over_the_momentum() -> None:
    buffer = InformationBuffer(10_000, torch.device("cpu"))
    b = to_fixed(torch.randn(10_000, dtype=torch.float64))
    n = quantise_momentum(0.9)
    for _ in range(200):
        b = multiply(b, n, buffer)
    # the information: 16 bits of the last push plus log2(1/0.9) = 0.152 bits per step
    ideal = 199 * math.log2(DENOMINATOR / n) + 16
    held = [
        sum(int(limb[i]) << (47 * k) for k, limb in enumerate(buffer.limbs))
        for i in range(0, 10_000, 97)
    ]
    assert max(q.bit_length() for q in held) >= ideal - 8  # it is all there (random remainders)
    assert all(q <= buffer.bound for q in held), "the host-side bound holds"
    # and is tight: the worst case adds the geometric sum of the pushes' 2^16 - 1, a factor
    # 1 / (1 - n/2^16), to the ideal
    assert buffer.bits <= ideal + math.log2(1 / (1 - n / DENOMINATOR)) + 1
    assert len(buffer.limbs) == math.ceil(buffer.bits / 47)


# -- hypergradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("dampening", [0.0, 0.3])
@pytest.mark.parametrize("maximize", [False, True])
def test_hypergradients_equal_unrolled_reverse_mode(dampening: float, maximize: bool) -> None:
    """Every window's lr, momentum and weight decay, and the initial weights: float64, exact
    products (a closure that returns the loss)."""
    problem = Problem(0, steps=12)
    lr, mu, wd = 0.05, 0.9, 0.01
    if maximize:  # the validation loss is then minimised by climbing the training loss
        lr = 0.01
    opt, w0 = run_episode(
        problem, 12, lr=lr, momentum=mu, weight_decay=wd, dampening=dampening,
        maximize=maximize, windows=4, learn=NAMES,
    )  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(problem.model.parameters(), w0, strict=True)), (
        "w_0 exactly"
    )
    values = {
        "lr": torch.full((4,), lr, dtype=torch.float64),
        "momentum": torch.full((4,), quantise_momentum(mu) / DENOMINATOR, dtype=torch.float64),
        "weight_decay": torch.full((4,), wd, dtype=torch.float64),
    }
    expected, initial, _ = unrolled(
        problem, w0, 12, 4, values, dampening=dampening, maximize=maximize
    )
    got = opt.hypergradients()[0]
    for name in NAMES:
        assert got[name].shape == (4,)
        assert _rel(got[name], expected[name]) < 1e-10, name
    for a, b in zip(opt.initial_weight_hypergradients(), initial, strict=True):
        assert a.shape == b.shape
        assert _rel(a, b) < 1e-10


def test_per_tensor_schedules_equal_unrolled_reverse_mode() -> None:
    problem = Problem(1, steps=10)
    opt, w0 = run_episode(
        problem, 10, lr=0.05, momentum=0.5, weight_decay=0.001, windows=5,
        learn=NAMES, granularity="tensor",
    )  # fmt: skip
    tensors = len(w0)
    values = {
        "lr": torch.full((tensors, 5), 0.05, dtype=torch.float64),
        "momentum": torch.full(
            (tensors, 5), quantise_momentum(0.5) / DENOMINATOR, dtype=torch.float64
        ),
        "weight_decay": torch.full((tensors, 5), 0.001, dtype=torch.float64),
    }
    expected, _, _ = unrolled(problem, w0, 10, 5, values, per_tensor=True)
    got = opt.hypergradients()[0]
    for name in NAMES:
        assert len(got[name]) == tensors
        for j in range(tensors):
            assert got[name][j].shape == (5,)
            assert _rel(got[name][j], expected[name][j]) < 1e-10, (name, j)


def test_a_schedule_that_differs_between_windows() -> None:
    """Windows with other values (the schedule after a hyper-step), momentum among them."""
    problem = Problem(2, steps=9)
    opt = HyperSGD(
        problem.model.parameters(), lr=0.05, momentum=0.8, method="reversible", horizon=9,
        windows=3, learn=("lr", "momentum"), hyper_optimizer=_frozen(),
    )  # fmt: skip
    sched = opt._method.schedule.values[0]  # type: ignore[attr-defined]
    with torch.no_grad():
        sched["lr"][0].copy_(
            torch.log(torch.tensor([0.02, 0.08, 0.04], dtype=sched["lr"][0].dtype))
        )
        mus = torch.tensor([0.95, 0.5, 0.7], dtype=torch.float64)
        sched["momentum"][0].copy_(torch.logit(mus).to(sched["momentum"][0].dtype))
    lrs = [float(x) for x in opt.schedules()[0]["lr"]]
    momenta = [float(x) for x in opt.schedules()[0]["momentum"]]
    w0 = _on_grid([p.detach().clone() for p in problem.model.parameters()])
    for t in range(9):
        opt.step(problem.closure_at(t))
    opt.reverse(problem.val, problem.closure_at)
    values = {
        "lr": torch.tensor(lrs, dtype=torch.float64),
        "momentum": torch.tensor(
            [quantise_momentum(m) / DENOMINATOR for m in momenta], dtype=torch.float64
        ),
        "weight_decay": torch.zeros(3, dtype=torch.float64),
    }
    expected, _, _ = unrolled(problem, w0, 9, 3, values)
    got = opt.hypergradients()[0]
    for name in ("lr", "momentum"):
        assert _rel(got[name], expected[name]) < 1e-10, name
    assert all(torch.equal(a, b) for a, b in zip(problem.model.parameters(), w0, strict=True))


def test_finite_differences_with_torch_closure() -> None:
    problem = Problem(3, steps=8)
    opt, w0 = run_episode(
        problem, 8, torch_style=True, lr=0.05, momentum=0.9, windows=2, learn=("lr", "momentum")
    )
    values = {
        "lr": torch.full((2,), 0.05, dtype=torch.float64),
        "momentum": torch.full((2,), quantise_momentum(0.9) / DENOMINATOR, dtype=torch.float64),
        "weight_decay": torch.zeros(2, dtype=torch.float64),
    }
    expected, _, _ = unrolled(problem, w0, 8, 2, values)
    got = opt.hypergradients()[0]
    for name in ("lr", "momentum"):
        assert _rel(got[name], expected[name]) < 1e-6, name
    assert all(torch.equal(a, b) for a, b in zip(problem.model.parameters(), w0, strict=True))


def test_equals_forward_mode_on_the_same_run() -> None:
    """Forward mode's episodic hypergradients of the same schedules (a momentum of 7/8, which
    both represent exactly)."""
    steps, windows = 10, 5
    forward = Problem(4, steps=steps)
    opt_f = HyperSGD(
        forward.model.parameters(), lr=0.05, momentum=0.875, weight_decay=0.002,
        method="forward", mode="episodic", horizon=steps, windows=windows, learn=NAMES,
        hyper_optimizer=_frozen(), hvp="autograd",
    )  # fmt: skip
    reverse = Problem(4, steps=steps)
    with torch.no_grad():  # the same, on the grid
        for p in forward.model.parameters():
            p.copy_(_on_grid([p])[0])
    for t in range(steps):
        opt_f.step(forward.closure_at(t), val_closure=forward.val)
    opt_r, _ = run_episode(
        reverse, steps, lr=0.05, momentum=0.875, weight_decay=0.002, windows=windows, learn=NAMES
    )
    f, r = opt_f.hypergradients()[0], opt_r.hypergradients()[0]
    for name in NAMES:
        assert _rel(r[name], f[name]) < 1e-8, name


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    width=st.integers(1, 5),
    steps=st.integers(1, 9),
    data=st.data(),
)
def test_property_hypergradients_and_restoration(
    seed: int, width: int, steps: int, data: Any
) -> None:
    windows = data.draw(st.integers(1, steps))
    lr = data.draw(st.floats(0.001, 0.2))
    mu = data.draw(st.floats(0.05, 0.999))
    wd = data.draw(st.sampled_from([1e-4, 1e-3, 0.1]))
    problem = Problem(seed, width=width, steps=steps)
    opt, w0 = run_episode(
        problem, steps, lr=lr, momentum=mu, weight_decay=wd, windows=windows, learn=NAMES
    )
    assert all(torch.equal(a, b) for a, b in zip(problem.model.parameters(), w0, strict=True))
    n = quantise_momentum(mu) / DENOMINATOR
    values = {
        "lr": torch.full((windows,), lr, dtype=torch.float64),
        "momentum": torch.full((windows,), n, dtype=torch.float64),
        "weight_decay": torch.full((windows,), wd, dtype=torch.float64),
    }
    expected, initial, _ = unrolled(problem, w0, steps, windows, values)
    got = opt.hypergradients()[0]
    for name in NAMES:
        scale = float(expected[name].abs().max())
        assert float((got[name] - expected[name]).abs().max()) <= 1e-9 * max(scale, 1e-6), name
    for a, b in zip(opt.initial_weight_hypergradients(), initial, strict=True):
        assert float((a - b).abs().max()) <= 1e-9 * max(float(b.abs().max()), 1e-6)


# -- the reversal ----------------------------------------------------------------------------------


def test_weights_restored_exactly_after_hundreds_of_steps() -> None:
    """300 steps of a float32 MLP at momentum 0.9: float arithmetic could not run them back
    (dividing by 0.9 three hundred times); fixed point does, bit for bit."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    w0 = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(_on_grid(w0), w0, strict=True)), (
        "float32 weights are on it"
    )
    steps = 300
    batches = [torch.randint(0, 64, (16,), generator=g) for _ in range(steps)]

    def closure_at(t: int) -> Callable[[], Tensor]:
        def closure() -> Tensor:
            model.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batches[t]]), y[batches[t]])
            loss.backward()
            return loss

        return closure

    opt = HyperSGD(
        model.parameters(), lr=0.1, momentum=0.9, method="reversible", horizon=steps,
        windows=10, learn=("lr", "momentum"),
    )  # fmt: skip
    for t in range(steps):
        opt.step(closure_at(t))
    moved = [p.detach().clone() for p in model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(moved, w0, strict=True))
    kept = opt._method.buffer_memory()  # type: ignore[attr-defined]
    trajectory = steps * sum(p.numel() * p.element_size() for p in model.parameters())
    assert 0 < kept < trajectory / 20
    schedules = opt.schedules()[0]["lr"]
    opt.reverse(lambda: nn.functional.cross_entropy(model(x), y), closure_at)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), w0, strict=True))
    assert opt.hyper_state["hyper_steps"] == 1
    assert not torch.equal(opt.schedules()[0]["lr"], schedules), "the schedule stepped"
    # the next episode starts from the same weights and runs with the new schedule
    for t in range(steps):
        opt.step(closure_at(t))
    opt.reverse(lambda: nn.functional.cross_entropy(model(x), y), closure_at)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), w0, strict=True))
    assert opt.hyper_state["hyper_steps"] == 2


def test_state_dict_mid_episode() -> None:
    """Saved after 5 of 10 steps and loaded into a fresh optimizer and model: the episode
    finishes and reverses to the same hypergradients and the same first weights."""
    whole = Problem(5, steps=10)
    opt, w0 = run_episode(
        whole, 10, lr=0.05, momentum=0.9, weight_decay=0.01, windows=2, learn=NAMES
    )
    expected = opt.hypergradients()[0]

    first = Problem(5, steps=10)
    kwargs: dict[str, Any] = dict(  # noqa: C408
        lr=0.05, momentum=0.9, weight_decay=0.01, method="reversible", horizon=10, windows=2,
        learn=NAMES, hyper_optimizer=_frozen(),
    )  # fmt: skip
    opt1 = HyperSGD(first.model.parameters(), **kwargs)
    for t in range(5):
        opt1.step(first.closure_at(t))
    saved = copy.deepcopy(opt1.state_dict())
    weights = copy.deepcopy(first.model.state_dict())

    second = Problem(5, steps=10)
    second.model.load_state_dict(weights)
    opt2 = HyperSGD(second.model.parameters(), **kwargs)
    opt2.load_state_dict(saved)
    for t in range(5, 10):
        opt2.step(second.closure_at(t))
    opt2.reverse(second.val, second.closure_at)
    got = opt2.hypergradients()[0]
    for name in NAMES:
        assert torch.equal(got[name], expected[name]), name
    assert all(torch.equal(a, b) for a, b in zip(second.model.parameters(), w0, strict=True))


def test_a_wrong_closure_at_is_detected_and_reverse_resumes() -> None:
    problem = Problem(6, steps=6)
    opt = HyperSGD(
        problem.model.parameters(), lr=0.05, momentum=0.9, method="reversible", horizon=6,
        windows=3, learn=("lr",), hyper_optimizer=_frozen(),
    )  # fmt: skip
    w0 = _on_grid([p.detach().clone() for p in problem.model.parameters()])
    for t in range(6):
        opt.step(problem.closure_at(t))

    def wrong(t: int) -> Callable[[], Tensor]:
        return problem.closure_at(0 if t == 3 else t)  # step 3's batch swapped

    with pytest.raises(ValueError, match=r"closure_at\(3\) is not step 3's"):
        opt.reverse(problem.val, wrong)
    with pytest.raises(RuntimeError, match="reverse pass is under way"):
        opt.step(problem.closure_at(0))
    opt.reverse(problem.val, problem.closure_at)
    assert all(torch.equal(a, b) for a, b in zip(problem.model.parameters(), w0, strict=True))
    reference, _ = run_episode(
        Problem(6, steps=6), 6, lr=0.05, momentum=0.9, windows=3, learn=("lr",)
    )
    assert torch.equal(opt.hypergradients()[0]["lr"], reference.hypergradients()[0]["lr"])


def test_a_non_finite_validation_loss_skips_the_hyper_step_but_restores() -> None:
    problem = Problem(7, steps=4)
    opt = HyperSGD(
        problem.model.parameters(), lr=0.05, momentum=0.9, method="reversible", horizon=4,
        windows=2, backtrack=False,
    )  # fmt: skip
    w0 = _on_grid([p.detach().clone() for p in problem.model.parameters()])
    before = opt.schedules()[0]["lr"].clone()
    for t in range(4):
        opt.step(problem.closure_at(t))
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.reverse(lambda: problem.val() * math.nan, problem.closure_at)
    assert all(torch.equal(a, b) for a, b in zip(problem.model.parameters(), w0, strict=True))
    assert torch.equal(opt.schedules()[0]["lr"], before)
    assert opt.hyper_state["skipped_hyper_steps"] == 1


# -- what is refused -------------------------------------------------------------------------------


def _model(dtype: Any = torch.float64) -> nn.Module:
    return nn.Linear(3, 2).to(dtype)


@pytest.mark.parametrize("cls", [HyperAdam, HyperAdamW])
def test_adam_is_refused(cls: Any) -> None:
    with pytest.raises(ValueError, match="method='reversible' is for HyperSGD"):
        cls(_model().parameters(), method="reversible", horizon=5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"nesterov": True}, ValueError, "Nesterov"),
        ({"momentum": 0.0}, ValueError, r"momentum in \(0, 1\]"),
        ({"mode": "online"}, ValueError, "runs in mode='episodic' only"),
        ({"update_interval": 5}, ValueError, "update_interval"),
        ({"granularity": "element"}, ValueError, "per-weight"),
        ({"keep_best": True}, ValueError, "keep_best"),
        ({"clamps": {"grad": 1.0}}, ValueError, "clamps"),
    ],
)
def test_refused_options(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    kwargs = {"momentum": 0.9, **kwargs}
    with pytest.raises(error, match=match):
        HyperSGD(_model().parameters(), lr=0.1, method="reversible", horizon=5, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused(dtype: Any) -> None:
    with pytest.raises(ValueError, match="float32 or float64"):
        HyperSGD(_model(dtype).parameters(), lr=0.1, momentum=0.9, method="reversible", horizon=5)


def test_reverse_needs_a_complete_episode_and_a_step_needs_a_reverse() -> None:
    problem = Problem(8, steps=3)
    opt = HyperSGD(
        problem.model.parameters(), lr=0.05, momentum=0.9, method="reversible", horizon=3
    )
    with pytest.raises(RuntimeError, match="complete episode: 0 of its 3"):
        opt.reverse(problem.val, problem.closure_at)
    for t in range(2):
        opt.step(problem.closure_at(t))
    with pytest.raises(RuntimeError, match="complete episode: 2 of its 3"):
        opt.reverse(problem.val, problem.closure_at)
    opt.step(problem.closure_at(2))
    with pytest.raises(RuntimeError, match=r"call opt.reverse"):
        opt.step(problem.closure_at(0))
    with pytest.raises(ValueError, match="training closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="after a reverse pass"):
        opt.initial_weight_hypergradients()
    with pytest.raises(RuntimeError, match="running the episode backwards"):
        opt.compute_hypergradients(problem.val)
    opt.reverse(problem.val, problem.closure_at)
    assert len(opt.initial_weight_hypergradients()) == 4


def test_other_methods_have_no_reverse() -> None:
    opt = HyperSGD(_model().parameters(), lr=0.1, method="greedy")
    with pytest.raises(RuntimeError, match="method='reversible'"):
        opt.reverse(lambda: torch.zeros(()), lambda t: lambda: torch.zeros(()))
    with pytest.raises(RuntimeError, match="method='reversible'"):
        opt.initial_weight_hypergradients()


def test_a_diverging_run_is_stopped_before_it_leaves_the_fixed_point_range() -> None:
    problem = Problem(9, steps=50)
    opt = HyperSGD(
        problem.model.parameters(), lr=9.0, momentum=0.99, method="reversible", horizon=50
    )

    def train() -> None:
        for t in range(50):
            opt.step(problem.closure_at(t))

    with pytest.raises(FloatingPointError, match="fixed-point range"):
        train()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reversible_on_cuda() -> None:
    torch.use_deterministic_algorithms(True, warn_only=True)
    problem = Problem(10, steps=20)
    problem.model.cuda()
    for name in ("x", "y", "xv", "yv"):
        setattr(problem, name, getattr(problem, name).cuda())
    problem.batches = [b.cuda() for b in problem.batches]
    opt, w0 = run_episode(problem, 20, lr=0.05, momentum=0.9, windows=4, learn=NAMES)
    assert all(torch.equal(a, b) for a, b in zip(problem.model.parameters(), w0, strict=True))
    values = {
        "lr": torch.full((4,), 0.05, dtype=torch.float64, device="cuda"),
        "momentum": torch.full(
            (4,), quantise_momentum(0.9) / DENOMINATOR, dtype=torch.float64, device="cuda"
        ),
        "weight_decay": torch.zeros(4, dtype=torch.float64, device="cuda"),
    }
    expected, _, _ = unrolled(problem, w0, 20, 4, values)
    for name in NAMES:
        assert _rel(opt.hypergradients()[0][name].cuda(), expected[name]) < 1e-9


def test_an_episode_is_torch_sgd_up_to_the_grid() -> None:
    """The forward steps follow torch.optim.SGD (dampening, weight decay, a parameter without a
    gradient on the first steps, whose buffer torch creates at its first update) to within
    the rounding to 2^-52; reversed, they come back exactly."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    start = [torch.randn(3, generator=g, dtype=torch.float64) for _ in range(2)]

    def run(make: Callable[[list[Tensor]], Any]) -> tuple[list[Tensor], Any, Callable[..., Any]]:
        a, b = (nn.Parameter(s.clone()) for s in start)

        def closure_at(t: int) -> Callable[[], Tensor]:
            def closure() -> Tensor:
                a.grad, b.grad = None, None
                loss = ((x @ a - 1) ** 2).mean()
                if t >= 2:  # b has no gradient on steps 0 and 1
                    loss = loss + ((x @ b) ** 2).mean() + (a * b).sum()
                loss.backward()
                return loss

            return closure

        opt = make([a, b])
        for t in range(8):
            opt.step(closure_at(t))
        return [a, b], opt, closure_at

    # a momentum of 3/4 is exactly n/2^16; another one is quantised (0.8 -> 0.800003)
    kwargs = {"lr": 0.1, "momentum": 0.75, "dampening": 0.3, "weight_decay": 0.05}
    ours, opt, closure_at = run(
        lambda ps: HyperSGD(ps, method="reversible", horizon=8, windows=2, **kwargs)
    )
    theirs, _, _ = run(lambda ps: torch.optim.SGD(ps, **kwargs))
    for p, q in zip(ours, theirs, strict=True):
        assert float((p - q).detach().abs().max()) < 1e-13
    assert abs(quantise_momentum(0.8) / DENOMINATOR - 0.8) < 2**-17
    opt.reverse(lambda: (ours[0] ** 2).sum() + (ours[1] ** 2).sum(), closure_at)
    for p, s in zip(ours, start, strict=True):
        assert torch.equal(p.detach(), _on_grid([s])[0])
