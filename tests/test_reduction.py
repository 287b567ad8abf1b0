"""Reduction to torch.optim (DESIGN §7, first row; STYLE "reduction tests").

With the hyper-optimizer's learning rate at zero nothing learned ever moves, so HyperSGD,
HyperAdam and HyperAdamW must *be* torch.optim.SGD, Adam and AdamW, step for step: a small tanh
MLP trained for ``STEPS`` steps with a closure and a validation closure has the same weights
after every step, whatever the flags, the hypergradient method (which calls the closure again
for finite-difference Hessian-vector products and must restore the weights and gradients) and
the foreach setting.  One value per group reads the group's own float, so the kernels are
torch's and the trajectories are bitwise equal; one value per tensor or per weight multiplies
element-wise (``exp(log λ)`` need not be λ's float either), so those agree to ``GRANULAR_RTOL``.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from hyperopt_optim import HyperAdam, HyperAdamW, HyperSGD

STEPS = 30
UPDATE_INTERVAL = 5
BATCH = 8
DTYPE = torch.float64

GRANULAR_RTOL = 1e-12
"""Per-tensor / per-element values: element-wise kernels round unlike torch's scalar ones."""

METHODS = {
    "ift": {"method": "ift", "neumann_steps": 2},
    "greedy": {"method": "greedy"},
    "hd": {"method": "hd"},
}

HYPER_OF = {
    torch.optim.SGD: HyperSGD,
    torch.optim.Adam: HyperAdam,
    torch.optim.AdamW: HyperAdamW,
}


def frozen_hyper_optimizer(params: list[Tensor]) -> torch.optim.Optimizer:
    """The hyper-optimizer with learning rate zero: learned values never move."""
    return torch.optim.Adam(params, lr=0.0)


# --- the problem ---------------------------------------------------------------------------

_gen = torch.Generator().manual_seed(1234)
TRAIN = [
    (
        torch.randn(BATCH, 3, generator=_gen, dtype=DTYPE),
        torch.randn(BATCH, 1, generator=_gen, dtype=DTYPE),
    )
    for _ in range(STEPS)
]
VALID = (
    torch.randn(16, 3, generator=_gen, dtype=DTYPE),
    torch.randn(16, 1, generator=_gen, dtype=DTYPE),
)


def make_model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).to(DTYPE)


MODEL = make_model()


def train(
    make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
    *,
    validation: bool,
    loss_only_closure: bool = False,
) -> tuple[list[list[Tensor]], torch.optim.Optimizer]:
    """Train a copy of MODEL for STEPS steps; the weights after every step, and the optimizer."""
    model = copy.deepcopy(MODEL)
    params = list(model.parameters())
    opt = make_optimizer(params)

    def val_closure() -> Tensor:
        x, y = VALID
        return nn.functional.mse_loss(model(x), y)

    trajectory = []
    for x, y in TRAIN:

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            if not loss_only_closure:
                loss.backward()
            return loss

        if validation:
            opt.step(closure, val_closure=val_closure)
        else:
            opt.step(closure)
        trajectory.append([p.detach().clone() for p in params])
    return trajectory, opt


def torch_trajectory(torch_cls: type, kwargs: dict[str, Any]) -> list[list[Tensor]]:
    return _torch_trajectory(torch_cls, tuple(kwargs.items()))


@functools.cache
def _torch_trajectory(torch_cls: type, kwargs: tuple[tuple[str, Any], ...]) -> list[list[Tensor]]:
    """Cached: the three hypergradient methods are compared with the same torch run."""
    trajectory, _ = train(lambda ps: torch_cls(ps, **dict(kwargs)), validation=False)
    return trajectory


def hyper_run(
    torch_cls: type,
    kwargs: dict[str, Any],
    *,
    method: str,
    learn: tuple[str, ...],
    granularity: str = "scalar",
    loss_only_closure: bool = False,
) -> tuple[list[list[Tensor]], torch.optim.Optimizer]:
    hyper_cls = HYPER_OF[torch_cls]

    def make(ps: list[Tensor]) -> torch.optim.Optimizer:
        return hyper_cls(
            ps,
            **kwargs,
            learn=learn,
            granularity=granularity,
            update_interval=UPDATE_INTERVAL,
            hyper_optimizer=frozen_hyper_optimizer,
            **METHODS[method],
        )

    return train(make, validation=True, loss_only_closure=loss_only_closure)


def positive_names(torch_cls: type, kwargs: dict[str, Any]) -> tuple[str, ...]:
    """Every learnable name whose starting value is positive (a learned value must be)."""
    if torch_cls is torch.optim.SGD:
        names = ("lr", "momentum", "weight_decay")
        return tuple(n for n in names if kwargs.get(n, 0) > 0)
    wd = kwargs.get("weight_decay", 1e-2 if torch_cls is torch.optim.AdamW else 0)
    return ("lr", "beta1", "beta2", "eps") + (("weight_decay",) if wd > 0 else ())


def assert_bitwise(got: list[list[Tensor]], want: list[list[Tensor]]) -> None:
    for t, (ps, qs) in enumerate(zip(got, want, strict=True)):
        for i, (p, q) in enumerate(zip(ps, qs, strict=True)):
            assert torch.equal(p, q), (
                f"step {t}, parameter {i}: differs from torch.optim by "
                f"{float((p - q).abs().max()):.3e}"
            )


def assert_within(got: list[list[Tensor]], want: list[list[Tensor]], rtol: float) -> None:
    for t, (ps, qs) in enumerate(zip(got, want, strict=True)):
        for i, (p, q) in enumerate(zip(ps, qs, strict=True)):
            err, scale = float((p - q).abs().max()), float(q.abs().max())
            assert err <= rtol * scale, (
                f"step {t}, parameter {i}: {err:.3e} > {rtol:g} x {scale:.3e}"
            )


def assert_hyper_steps_ran(opt: torch.optim.Optimizer) -> None:
    """The comparison means something only if hyper-steps were taken with non-zero
    hypergradients: a learning rate of zero is all that kept the values still."""
    assert opt.hyper_state["hyper_steps"] >= STEPS // UPDATE_INTERVAL - 1
    lr_grad = opt.hypergradients()[0]["lr"]
    total = (
        lr_grad.abs().sum() if isinstance(lr_grad, Tensor) else sum(g.abs().sum() for g in lr_grad)
    )
    assert float(total) > 0


def assert_group_untouched(opt: torch.optim.Optimizer, kwargs: dict[str, Any]) -> None:
    group = opt.param_groups[0]
    for name, value in kwargs.items():
        if name in ("foreach",):
            continue
        assert type(group[name]) is type(value), (name, group[name], value)
        assert group[name] == value, f"group[{name!r}] = {group[name]!r}, the user passed {value!r}"


# --- the cases -----------------------------------------------------------------------------


def _id(kwargs: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"


SGD_CASES = [
    {"lr": 0.1, "momentum": momentum, "dampening": dampening, "nesterov": nesterov,
     "weight_decay": weight_decay, "maximize": maximize}
    for (momentum, dampening, nesterov), weight_decay, maximize in itertools.product(
        [(0.0, 0.0, False), (0.0, 0.1, False), (0.9, 0.0, False), (0.9, 0.1, False),
         (0.9, 0.0, True)],
        [0.0, 1e-3],
        [False, True],
    )
]  # fmt: skip

ADAM_CASES = [
    (
        torch_cls,
        {"lr": 0.01, "amsgrad": amsgrad, "weight_decay": weight_decay, "maximize": maximize},
    )
    for torch_cls, amsgrad, weight_decay, maximize in itertools.product(
        [torch.optim.Adam, torch.optim.AdamW], [False, True], [0.0, 1e-2], [False, True]
    )
]

ALL_CASES = [pytest.param(torch.optim.SGD, kw, id=f"SGD-{_id(kw)}") for kw in SGD_CASES] + [
    pytest.param(cls, kw, id=f"{cls.__name__}-{_id(kw)}") for cls, kw in ADAM_CASES
]

FOREACH = [pytest.param(v, id=f"foreach={v}") for v in (None, True, False)]


# --- 3. scalar granularity: bitwise ----------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize(("torch_cls", "kwargs"), ALL_CASES)
def test_frozen_scalar_hyperparameters_are_torch_bitwise(
    torch_cls: type, kwargs: dict[str, Any], foreach: bool | None, method: str
) -> None:
    kwargs = {**kwargs, "foreach": foreach}
    want = torch_trajectory(torch_cls, kwargs)
    got, opt = hyper_run(torch_cls, kwargs, method=method, learn=positive_names(torch_cls, kwargs))
    assert_bitwise(got, want)
    assert_hyper_steps_ran(opt)
    assert_group_untouched(opt, kwargs)


# --- 4. per-tensor and per-element values ----------------------------------------------------

# SGD's element-wise kernels (``addcmul`` with the value tensor) turn out to round exactly like
# torch's scalar ``add(alpha=...)`` here, so SGD stays bitwise; Adam's step size and bias
# corrections are multiplied element-wise in another order and agree to GRANULAR_RTOL.
GRANULAR_CASES = [
    pytest.param(torch.optim.SGD, {"lr": 0.1}, True, id="SGD-plain"),
    pytest.param(
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-3, "maximize": True},
        True,
        id="SGD-momentum-dampening-wd-maximize",
    ),
    pytest.param(
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
        True,
        id="SGD-nesterov-wd",
    ),
    pytest.param(
        torch.optim.Adam,
        {"lr": 0.01, "amsgrad": True, "weight_decay": 1e-2},
        False,
        id="Adam-amsgrad-wd",
    ),
    pytest.param(torch.optim.Adam, {"lr": 0.01, "maximize": True}, False, id="Adam-maximize"),
    pytest.param(
        torch.optim.AdamW,
        {"lr": 0.01, "amsgrad": True, "maximize": True, "weight_decay": 1e-2},
        False,
        id="AdamW-amsgrad-maximize",
    ),
]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("foreach", [pytest.param(v, id=f"foreach={v}") for v in (None, False)])
@pytest.mark.parametrize("granularity", ["tensor", "element"])
@pytest.mark.parametrize(("torch_cls", "kwargs", "bitwise"), GRANULAR_CASES)
def test_frozen_granular_hyperparameters_follow_torch(
    torch_cls: type,
    kwargs: dict[str, Any],
    bitwise: bool,
    granularity: str,
    foreach: bool | None,
    method: str,
) -> None:
    kwargs = {**kwargs, "foreach": foreach}
    want = torch_trajectory(torch_cls, kwargs)
    got, opt = hyper_run(
        torch_cls,
        kwargs,
        method=method,
        learn=positive_names(torch_cls, kwargs),
        granularity=granularity,
    )
    if bitwise:
        assert_bitwise(got, want)
    else:
        assert_within(got, want, GRANULAR_RTOL)
    assert_hyper_steps_ran(opt)


@pytest.mark.parametrize("granularity", ["tensor", "element"])
@pytest.mark.parametrize(("torch_cls", "kwargs", "bitwise"), GRANULAR_CASES)
def test_frozen_granular_hyperparameters_leave_the_group_floats_alone(
    torch_cls: type, kwargs: dict[str, Any], bitwise: bool, granularity: str
) -> None:
    """Nothing moved, so nothing is written back: the group keeps the user's floats."""
    _, opt = hyper_run(
        torch_cls,
        kwargs,
        method="greedy",
        learn=positive_names(torch_cls, kwargs),
        granularity=granularity,
    )
    assert_hyper_steps_ran(opt)
    assert_group_untouched(opt, kwargs)


# --- 5. Adam's learned betas, eps and weight decay ------------------------------------------


ADAM_LEARN = [
    pytest.param(names, id="+".join(names))
    for names in [
        ("beta1",),
        ("beta2",),
        ("eps",),
        ("weight_decay",),
        ("lr", "beta1", "beta2", "eps", "weight_decay"),
    ]
]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("learn", ADAM_LEARN)
@pytest.mark.parametrize("torch_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_frozen_adam_hyperparameters_are_torch_bitwise(
    torch_cls: type, learn: tuple[str, ...], method: str
) -> None:
    """Each of Adam's learnable names alone (and all together) reduces exactly, and the group
    keeps the user's floats: lr, the betas pair, eps and weight decay."""
    kwargs = {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 1e-2}
    want = torch_trajectory(torch_cls, kwargs)
    got, opt = hyper_run(torch_cls, kwargs, method=method, learn=learn)
    assert_bitwise(got, want)
    assert opt.hyper_state["hyper_steps"] >= STEPS // UPDATE_INTERVAL - 1
    assert_group_untouched(opt, kwargs)
    assert opt.param_groups[0]["lr"] == 0.01


# --- closures that leave backward() to the optimizer (exact Hessian-vector products) --------


@pytest.mark.parametrize(
    ("torch_cls", "kwargs"),
    [
        pytest.param(
            torch.optim.SGD,
            {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
            id="SGD-nesterov-wd",
        ),
        pytest.param(torch.optim.Adam, {"lr": 0.01, "amsgrad": True}, id="Adam-amsgrad"),
        pytest.param(torch.optim.AdamW, {"lr": 0.01, "maximize": True}, id="AdamW-maximize"),
    ],
)
def test_frozen_with_loss_only_closure_is_torch_bitwise(
    torch_cls: type, kwargs: dict[str, Any]
) -> None:
    """The optimizer differentiates the closure's loss itself, keeping the graph for
    autograd Hessian-vector products: the gradients and trajectory are still torch's."""
    want = torch_trajectory(torch_cls, kwargs)
    got, opt = hyper_run(
        torch_cls,
        kwargs,
        method="ift",
        learn=positive_names(torch_cls, kwargs),
        loss_only_closure=True,
    )
    assert_bitwise(got, want)
    assert_hyper_steps_ran(opt)
    assert_group_untouched(opt, kwargs)
