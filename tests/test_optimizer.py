"""Behavioural tests of the optimizers, driven by the table of cases in ``cases.py``.

Every test trains a small MLP (or, where the maths needs it, a linear model) on random data
with torch's training closure (zero_grad, loss, backward, return the loss) and a validation
closure that returns the loss and does not call backward.  The numerical correctness of the
hypergradients is tested against exact oracles elsewhere; here: the public API (DESIGN §8),
param groups, state dicts, LR schedulers, closures, bad input, non-finite values, memory and
devices.  Equalities that the design promises bit for bit are checked with ``torch.equal``.
"""

from __future__ import annotations

import copy
import gc
import io
import math
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from cases import CASES, GRANULARITIES, METHODS, OptimizerCase
from conftest import DEVICES
from torch import Tensor, nn
from torch.nn.functional import mse_loss

from hyperopt_optim import HyperAdam, HyperAdamW, HyperOptimizer, HyperSGD

HYPER_LR = 0.05  # HyperSGD's default hyper-optimizer: torch.optim.Adam(lr=0.05)
ADAM_HYPER_LR = 0.1  # HyperAdam's and HyperAdamW's: torch.optim.Adam(lr=0.1)
DEVIATION_LR = 0.002  # with per-weight values: SharedAdam(lr=0.05, deviation_lr=0.002)
LOGIT_NAMES = frozenset({"momentum", "beta1", "beta2"})

# -- the problem: a small MLP on random data --------------------------------------------------


@dataclass
class Data:
    batches: list[tuple[Tensor, Tensor]]
    val: tuple[Tensor, Tensor]


def make_model(
    seed: int = 0, *, dtype: torch.dtype = torch.float32, device: str = "cpu", hidden: int = 8
) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))
    return model.to(dtype=dtype, device=device)


def make_data(
    steps: int,
    seed: int = 1,
    *,
    batch: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Data:
    gen = torch.Generator().manual_seed(seed)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, 4, generator=gen, dtype=dtype)
        y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=gen, dtype=dtype)
        return x.to(device), y.to(device)

    return Data([draw(batch) for _ in range(steps)], draw(32))


def train_closure(
    opt: torch.optim.Optimizer,
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    *,
    backward: bool = True,
) -> Callable[[], Tensor]:
    """torch's convention (``backward=True``) or a closure that only returns the loss."""
    x, y = batch

    def closure() -> Tensor:
        if backward:
            opt.zero_grad()
        loss = mse_loss(model(x), y)
        if backward:
            loss.backward()
        return loss

    return closure


def val_closure(model: nn.Module, data: Data) -> Callable[[], Tensor]:
    x, y = data.val
    return lambda: mse_loss(model(x), y)


def train(
    opt: torch.optim.Optimizer,
    model: nn.Module,
    data: Data,
    steps: range,
    *,
    backward: bool = True,
    val: Callable[[], Tensor] | None = None,
) -> None:
    """Steps ``steps`` (indices into ``data.batches``), passing a validation closure."""
    val = val or val_closure(model, data)
    for t in steps:
        closure = train_closure(opt, model, data.batches[t], backward=backward)
        if isinstance(opt, HyperOptimizer):
            opt.step(closure, val_closure=val)
        else:
            opt.step(closure)


def frozen(params: list[Tensor]) -> torch.optim.Optimizer:
    """A hyper-optimizer that never moves the learned values (plain training)."""
    return torch.optim.SGD(params, lr=0.0)


# -- comparisons ------------------------------------------------------------------------------


def flat(values: list[dict[str, Tensor | list[Tensor]]]) -> Iterator[tuple[str, Tensor]]:
    """(label, tensor) for every tensor of hyperparameters() or hypergradients()."""
    for i, entry in enumerate(values):
        for name, v in entry.items():
            for j, x in enumerate([v] if isinstance(v, Tensor) else v):
                yield f"group {i} {name}[{j}]", x


def assert_equal_values(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert [sorted(e) for e in a] == [sorted(e) for e in b]
    for (label, x), (_, y) in zip(flat(a), flat(b), strict=True):
        assert torch.equal(x, y), label


def assert_equal_params(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y), name


def assert_equal_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    pa = [p for g in a.param_groups for p in g["params"]]
    pb = [p for g in b.param_groups for p in g["params"]]
    for x, y in zip(pa, pb, strict=True):
        sa, sb = a.state[x], b.state[y]
        assert sorted(sa) == sorted(sb)
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key


def unconstrained(name: str, value: Tensor) -> Tensor:
    """φ = log λ, or logit λ for fractions, in float64."""
    v = value.double()
    return torch.logit(v) if name in LOGIT_NAMES else torch.log(v)


def natural_derivative(name: str, value: Tensor) -> Tensor:
    """dλ/dφ written with λ, in float64."""
    v = value.double()
    return v * (1 - v) if name in LOGIT_NAMES else v


def first_hyper_step_interval(method: str) -> int:
    """``update_interval`` that puts the first hyper-step on the second step (index 1)."""
    return 1 if method == "hd" else 2


# -- 1. the hyperparameter API ----------------------------------------------------------------


def assert_structure(
    values: list[dict[str, Tensor | list[Tensor]]],
    opt: HyperOptimizer,
    learn: tuple[str, ...],
    granularity: str,
) -> None:
    assert isinstance(values, list)
    assert len(values) == len(opt.param_groups)
    for entry, group in zip(values, opt.param_groups, strict=True):
        assert isinstance(entry, dict)
        assert sorted(entry) == sorted(learn)
        for name, v in entry.items():
            if granularity == "scalar":
                assert isinstance(v, Tensor), name
                assert v.dim() == 0, name
                continue
            assert isinstance(v, list), name
            assert len(v) == len(group["params"]), name
            for x, p in zip(v, group["params"], strict=True):
                assert isinstance(x, Tensor), name
                assert x.shape == (torch.Size() if granularity == "tensor" else p.shape), name
                assert x.device == p.device, name


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_hyperparameter_api_shapes_and_counters(
    case: OptimizerCase, method: str, granularity: str
) -> None:
    model, data = make_model(), make_data(12)
    opt = case.make(model.parameters(), method=method, granularity=granularity)
    assert opt.hyper_state == {
        "step": 0,
        "hyper_steps": 0,
        "skipped_hyper_steps": 0,
        "divergences": 0,
        "scaler_skipped_steps": 0,
        "overridden_hyper_steps": 0,
    }

    before = opt.hyperparameters()
    assert_structure(before, opt, case.learn, granularity)
    assert_structure(opt.hypergradients(), opt, case.learn, granularity)
    for label, g in flat(opt.hypergradients()):
        assert not g.any(), f"{label}: hypergradients before the first hyper-step must be zero"
    for label, v in flat(before):  # the initial values are the constructor's
        name = label.split()[2].split("[")[0]
        expected = case.kwargs.get(name)
        if name in ("beta1", "beta2"):
            expected = case.kwargs.get("betas", (0.9, 0.999))[name == "beta2"]
        if expected is not None:
            assert torch.allclose(v.double(), torch.tensor(float(expected), dtype=torch.float64))

    train(opt, model, data, range(12))

    hyper_steps = 11 if method == "hd" else 1  # hd: every step from the second; else T = 10
    assert opt.hyper_state == {
        "step": 12,
        "hyper_steps": hyper_steps,
        "skipped_hyper_steps": 0,
        "divergences": 0,
        "scaler_skipped_steps": 0,
        "overridden_hyper_steps": 0,
    }
    after, grads = opt.hyperparameters(), opt.hypergradients()
    assert_structure(after, opt, case.learn, granularity)
    assert_structure(grads, opt, case.learn, granularity)
    for name in case.learn:
        moved = [
            bool((x != y).any())
            for (label, x), (_, y) in zip(flat(before), flat(after), strict=True)
            if f" {name}[" in label
        ]
        nonzero = [bool(g.any()) for label, g in flat(grads) if f" {name}[" in label]
        assert any(nonzero), f"{name}: no non-zero hypergradient after a hyper-step"
        assert any(moved), f"{name}: the learned value did not move"
    for label, x in [*flat(after), *flat(grads)]:
        assert torch.isfinite(x).all(), label
        assert x.grad_fn is None, label
        assert not x.requires_grad, label


@pytest.mark.parametrize("method", ["ift", "greedy"])
def test_granularity_per_name(method: str) -> None:
    """``granularity={"lr": "element"}``: one lr per weight, momentum and weight decay per
    group; each name's values and hypergradients equal those of the run with that name's
    granularity for every name (same data, same first hyper-step)."""
    case = CASES[0]  # SGD learning lr, momentum and weight decay
    runs = {}
    for key, granularity in [
        ("mixed", {"lr": "element"}),
        ("element", "element"),
        ("scalar", "scalar"),
    ]:
        model, data = make_model(), make_data(10)
        opt = case.make(model.parameters(), method=method, granularity=granularity)
        assert opt.granularity_of("lr") == ("scalar" if key == "scalar" else "element")
        assert opt.granularity_of("momentum") == ("element" if key == "element" else "scalar")
        train(opt, model, data, range(10))  # one hyper-step, at the end
        runs[key] = (opt.hyperparameters()[0], opt.hypergradients()[0])
    values, grads = runs["mixed"]
    assert isinstance(values["lr"], list)
    assert isinstance(values["momentum"], Tensor)
    assert values["momentum"].dim() == 0
    for name in case.learn:
        ref_values, ref_grads = runs["element" if name == "lr" else "scalar"]
        for (label, x), (_, y) in zip(
            flat([{name: grads[name]}]), flat([{name: ref_grads[name]}]), strict=True
        ):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-9), label
        for (label, x), (_, y) in zip(
            flat([{name: values[name]}]), flat([{name: ref_values[name]}]), strict=True
        ):
            assert torch.allclose(x.double(), y.double(), rtol=1e-6), label


def default_hyper_lr(opt: HyperOptimizer, granularity: str) -> float:
    """The default hyper-optimizer's lr: SharedAdam's 0.05 for per-weight values, 0.05 for
    "hd" and "forward", else the optimizer's own (0.1 for the Adams)."""
    if granularity == "element" or isinstance(opt, HyperSGD) or opt.method not in ("greedy", "ift"):
        return HYPER_LR
    return ADAM_HYPER_LR


def assert_moved_against_hypergradient(
    before: list[dict[str, Any]],
    after: list[dict[str, Any]],
    grads: list[dict[str, Any]],
    hyper_lr: float,
) -> None:
    """The first step of the default hyper-optimizer on φ, with ``g = dL/dλ · dλ/dφ``.

    Scalar and per-tensor values (``torch.optim.Adam(lr=hyper_lr)``, 0.05 for HyperSGD and
    0.1 for HyperAdam/HyperAdamW): ``-hyper_lr · g / (|g| + 1e-8)``, each value moves by the
    hyper learning rate against its own hypergradient (per-weight values: SharedAdam at 0.05
    for every optimizer). Per-weight
    values (:class:`SharedAdam`, lr 0.05, deviation_lr 0.002): the tensor's shared shift
    ``-0.05 · c / (|c| + 1e-8)`` with ``c = Σ g``, plus ``-0.002 · d / (|d| + 1e-8)`` with
    ``d = g - mean(g)``.
    """
    for (label, x0), (_, x1), (_, g) in zip(flat(before), flat(after), flat(grads), strict=True):
        name = label.split()[2].split("[")[0]
        g_phi = g.double() * natural_derivative(name, x0)
        expected = -hyper_lr * g_phi / (g_phi.abs() + 1e-8)
        if g_phi.numel() > 1:  # element granularity: SharedAdam (hyper_lr is its 0.05)
            shared = g_phi.sum()
            deviation = g_phi - g_phi.mean()
            expected = -HYPER_LR * shared / (shared.abs() + 1e-8) - DEVIATION_LR * deviation / (
                deviation.abs() + 1e-8
            )
        moved = unconstrained(name, x1) - unconstrained(name, x0)
        # φ is recomputed here from values stored in the parameters' dtype: allow two
        # roundings of λ each side, carried to φ by dφ/dλ (large for a β near 1), and 1e-6
        # for Adam's ε against |g|.
        rounding = 4 * torch.finfo(x0.dtype).eps * x0.double().abs()
        tol = rounding / natural_derivative(name, x0) + 1e-6
        assert ((moved - expected).abs() <= tol).all(), (label, moved, expected)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_first_hyper_step_moves_each_value_against_its_hypergradient(
    case: OptimizerCase, method: str, granularity: str
) -> None:
    model, data = make_model(), make_data(2)
    opt = case.make(
        model.parameters(),
        method=method,
        granularity=granularity,
        update_interval=first_hyper_step_interval(method),
    )
    train(opt, model, data, range(1))
    before = opt.hyperparameters()
    train(opt, model, data, range(1, 2))
    assert opt.hyper_state["hyper_steps"] == 1
    assert_moved_against_hypergradient(
        before, opt.hyperparameters(), opt.hypergradients(), default_hyper_lr(opt, granularity)
    )


# -- 2. param groups --------------------------------------------------------------------------


def two_groups(case: OptimizerCase, model: nn.Module) -> list[dict[str, Any]]:
    first, second = model[0], model[2]
    return [
        {"params": list(first.parameters())},
        {"params": list(second.parameters()), "lr": 3 * case.kwargs["lr"]},
    ]


@pytest.mark.parametrize("granularity", ["scalar", "element"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_param_groups_learn_separately(case: OptimizerCase, method: str, granularity: str) -> None:
    model, data = make_model(), make_data(2)
    opt = case.make(
        two_groups(case, model),
        method=method,
        granularity=granularity,
        update_interval=first_hyper_step_interval(method),
    )
    before = opt.hyperparameters()
    assert len(before) == 2
    assert torch.allclose(flat_first(before[0]["lr"]), torch.tensor(case.kwargs["lr"]).double())
    assert torch.allclose(flat_first(before[1]["lr"]), torch.tensor(3 * case.kwargs["lr"]).double())
    assert opt.param_groups[1]["lr"] == pytest.approx(3 * case.kwargs["lr"])
    train(opt, model, data, range(1))
    before = opt.hyperparameters()
    train(opt, model, data, range(1, 2))
    after, grads = opt.hyperparameters(), opt.hypergradients()
    assert_moved_against_hypergradient(before, after, grads, default_hyper_lr(opt, granularity))
    # each group's values moved from that group's own starting point
    assert not torch.equal(flat_first(after[0]["lr"]), flat_first(after[1]["lr"]))


def flat_first(v: Tensor | list[Tensor]) -> Tensor:
    """The first tensor of a hyperparameters() value (the value itself for scalars)."""
    x = v if isinstance(v, Tensor) else v[0]
    return x.double().reshape(-1)[0]


@pytest.mark.parametrize("granularity", ["scalar", "element"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_add_param_group_after_construction(
    case: OptimizerCase, method: str, granularity: str
) -> None:
    model, data = make_model(), make_data(6)
    groups = two_groups(case, model)
    opt = case.make([groups[0]], method=method, granularity=granularity, update_interval=2)
    per_group = len(case.learn) * (1 if granularity == "scalar" else 2)  # weight and bias
    assert opt.hyper_optimizer is not None
    assert sum(len(g["params"]) for g in opt.hyper_optimizer.param_groups) == per_group
    train(opt, model, data, range(1))  # the second layer has no optimizer yet

    opt.add_param_group(groups[1])
    assert len(opt.param_groups) == 2
    assert sum(len(g["params"]) for g in opt.hyper_optimizer.param_groups) == 2 * per_group
    values = opt.hyperparameters()
    assert_structure(values, opt, case.learn, granularity)
    assert_structure(opt.hypergradients(), opt, case.learn, granularity)
    assert torch.allclose(
        flat_first(values[1]["lr"]), torch.tensor(3 * case.kwargs["lr"], dtype=torch.float64)
    )

    new_before = opt.hyperparameters()[1]
    train(opt, model, data, range(1, 6))  # momentum: from the group's second step
    assert opt.hyper_state["hyper_steps"] >= 1
    new_after, new_grads = opt.hyperparameters()[1], opt.hypergradients()[1]
    for name in case.learn:
        assert any(g.any() for _, g in flat([{name: new_grads[name]}])), name
        assert any(
            not torch.equal(x, y)
            for (_, x), (_, y) in zip(
                flat([{name: new_before[name]}]), flat([{name: new_after[name]}]), strict=True
            )
        ), f"{name} of the added group did not move"


def test_add_param_group_checks_the_new_group() -> None:
    model = make_model()
    opt = HyperSGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"param group 1: Invalid lr value: -1\.0"):
        opt.add_param_group({"params": list(model[2].parameters()), "lr": -1.0})
    opt = HyperSGD(model[0].parameters(), lr=0.1, momentum=0.9, learn=("momentum",))
    with pytest.raises(ValueError, match=r"param group 1: momentum=0"):
        opt.add_param_group({"params": list(model[2].parameters()), "momentum": 0.0})


# -- 3. state dict ----------------------------------------------------------------------------


def resume_matches(
    case: OptimizerCase,
    *,
    through: Callable[[dict[str, Any]], dict[str, Any]] = copy.deepcopy,
    backward: bool = True,
    **options: Any,
) -> None:
    """Train 12 steps, save, build a fresh model and optimizer, load, and continue both runs
    12 more steps on the same data: everything is bitwise equal."""
    data = make_data(24)
    model = make_model()
    opt = case.make(model.parameters(), **options)
    train(opt, model, data, range(12), backward=backward)
    sd = through(opt.state_dict())

    resumed_model = make_model(seed=123)  # different weights, overwritten by the load
    resumed = case.make(resumed_model.parameters(), **options)
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(sd)
    assert resumed.hyper_state == opt.hyper_state
    assert_equal_values(resumed.hyperparameters(), opt.hyperparameters())
    assert_equal_values(resumed.hypergradients(), opt.hypergradients())

    train(opt, model, data, range(12, 24), backward=backward)
    train(resumed, resumed_model, data, range(12, 24), backward=backward)
    assert opt.hyper_state["hyper_steps"] >= 2
    assert resumed.hyper_state == opt.hyper_state
    assert_equal_params(resumed_model, model)
    assert_equal_values(resumed.hyperparameters(), opt.hyperparameters())
    assert_equal_values(resumed.hypergradients(), opt.hypergradients())
    assert_equal_state(resumed, opt)
    for ga, gb in zip(resumed.param_groups, opt.param_groups, strict=True):
        assert {k: v for k, v in ga.items() if k != "params"} == {
            k: v for k, v in gb.items() if k != "params"
        }


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_state_dict_round_trip_continues_bit_for_bit(
    case: OptimizerCase, method: str, granularity: str
) -> None:
    interval = None if method == "hd" else 5  # hyper-steps both before and after the save
    resume_matches(case, method=method, granularity=granularity, update_interval=interval)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_state_dict_keeps_pending_hypergradient_descent_partials(
    case: OptimizerCase, granularity: str
) -> None:
    # hd with T = 3 keeps ∂w'/∂λ after steps 2, 5, 8, 11 and applies them one step later: the
    # save after step index 11 has partials pending.
    resume_matches(case, method="hd", granularity=granularity, update_interval=3)


def test_state_dict_of_another_granularity_is_refused_before_anything_loads() -> None:
    case = CASES[0]
    model, data = make_model(), make_data(6)
    saved = case.make(model.parameters(), granularity="tensor", update_interval=2)
    train(saved, model, data, range(6))
    target = case.make(make_model(1).parameters(), granularity={"lr": "element"})
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"'lr'.*another granularity"):
        target.load_state_dict(saved.state_dict())
    after = target.state_dict()
    assert after["state"] == before["state"] == {}
    assert after["param_groups"] == before["param_groups"]
    assert_equal_values(
        [dict(g) for g in after["hyper"]["phi"]],
        [dict(g) for g in before["hyper"]["phi"]],
    )


def through_bytes(sd: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("backward", [True, False], ids=["torch_closure", "loss_only_closure"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_state_dict_through_torch_save(case: OptimizerCase, backward: bool) -> None:
    resume_matches(
        case,
        through=through_bytes,
        backward=backward,
        method="ift",
        granularity="element",
        update_interval=5,
    )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_state_dict_loads(case: OptimizerCase) -> None:
    """torch.optim's own state dict loads: the buffers, and the group values, which the
    learned values take up; the runs then agree until the first hyper-step, which starts
    from the loaded value."""
    data = make_data(10, dtype=torch.float64)
    model = make_model(dtype=torch.float64)
    reference = case.make_torch(model.parameters())
    train(reference, model, data, range(6))

    resumed_model = make_model(seed=5, dtype=torch.float64)
    resumed_model.load_state_dict(model.state_dict())
    resumed = case.make(resumed_model.parameters(), lr=case.kwargs["lr"] / 7, update_interval=4)
    resumed.load_state_dict(copy.deepcopy(reference.state_dict()))
    assert_equal_state(resumed, reference)

    train(reference, model, data, range(6, 9))
    train(resumed, resumed_model, data, range(6, 9))
    assert resumed.hyper_state["hyper_steps"] == 0
    assert float(resumed.hyperparameters()[0]["lr"]) == case.kwargs["lr"]
    for (name, x), y in zip(model.named_parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-12, msg=name)  # DESIGN §7
    train(resumed, resumed_model, data, range(9, 10))
    assert resumed.hyper_state["hyper_steps"] == 1
    learned = float(resumed.hyperparameters()[0]["lr"])
    assert abs(math.log(learned / case.kwargs["lr"])) <= 4 * HYPER_LR


# -- 4. LR schedulers -------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
def test_step_lr_decays_the_learned_scalar(case: OptimizerCase) -> None:
    """The scheduler multiplies the learned lr; the next steps train with, and learn from,
    the decayed value (scalar: the update reads ``group["lr"]``)."""
    model, data = make_model(), make_data(25)
    opt = case.make(model.parameters(), learn=("lr",), update_interval=3)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    val = val_closure(model, data)
    decayed = None
    for t in range(25):
        opt.step(train_closure(opt, model, data.batches[t]), val_closure=val)
        learned = float(opt.hyperparameters()[0]["lr"])
        assert opt.param_groups[0]["lr"] == learned
        if decayed is not None:  # the step after a decay started from the decayed value
            if t % 3 == 2:  # a hyper-step: one Adam step of φ = log lr away from it
                assert abs(math.log(learned / decayed)) <= 4 * HYPER_LR
            else:
                assert learned == decayed
        scheduler.step()
        decayed = None
        if (t + 1) % 5 == 0:
            decayed = learned * 0.5
            assert opt.param_groups[0]["lr"] == decayed
        else:
            assert opt.param_groups[0]["lr"] == learned
    assert opt.hyper_state["hyper_steps"] == 8


@pytest.mark.parametrize("granularity", ["tensor", "element"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_step_lr_multiplies_every_learned_value(case: OptimizerCase, granularity: str) -> None:
    model, data = make_model(), make_data(8)
    opt = case.make(model.parameters(), learn=("lr",), granularity=granularity, update_interval=4)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    val = val_closure(model, data)
    for t in range(5):
        opt.step(train_closure(opt, model, data.batches[t]), val_closure=val)
        scheduler.step()
    # step 3 was a hyper-step: the per-weight values differ; steps 5 and 6 are not ones
    values = opt.hyperparameters()[0]["lr"]
    initial = torch.tensor(case.kwargs["lr"])
    assert all(not torch.allclose(v, initial.to(v.dtype)) for v in values)
    opt.step(train_closure(opt, model, data.batches[5]), val_closure=val)
    decayed = opt.hyperparameters()[0]["lr"]
    for before, after in zip(values, decayed, strict=True):
        torch.testing.assert_close(after, before * 0.5, rtol=1e-6, atol=0)  # float32 exp(φ)
    # training goes on from the decayed values: the next hyper-step (7) starts there
    for t in (6, 7):
        opt.step(train_closure(opt, model, data.batches[t]), val_closure=val)
    assert opt.hyper_state["hyper_steps"] == 2
    for before, after in zip(decayed, opt.hyperparameters()[0]["lr"], strict=True):
        assert (after.log() - before.log()).abs().max() <= 4 * HYPER_LR


# -- 5. closures ------------------------------------------------------------------------------


@pytest.mark.parametrize("hvp", ["auto", "autograd"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_loss_only_closure(case: OptimizerCase, hvp: str) -> None:
    model, data = make_model(), make_data(10)
    opt = case.make(model.parameters(), hvp=hvp, update_interval=5)
    before = opt.hyperparameters()
    val = val_closure(model, data)
    for t in range(10):
        x, y = data.batches[t]
        expected = mse_loss(model(x), y)
        closure = train_closure(opt, model, data.batches[t], backward=False)
        loss = opt.step(closure, val_closure=val)
        assert torch.equal(loss, expected)  # step returns what the closure returned
        for p in model.parameters():
            assert p.grad is not None
            assert p.grad.grad_fn is None
    assert opt.hyper_state["hyper_steps"] == 2
    for name in case.learn:
        assert not torch.equal(
            flat_first(opt.hyperparameters()[0][name]), flat_first(before[0][name])
        ), name


@pytest.mark.parametrize("case", CASES, ids=str)
def test_autograd_hvp_rejects_a_closure_that_calls_backward(case: OptimizerCase) -> None:
    model, data = make_model(), make_data(1)
    opt = case.make(model.parameters(), method="ift", hvp="autograd", update_interval=1)
    with pytest.raises(RuntimeError, match=r"hvp='autograd'.*backward"):
        train(opt, model, data, range(1))


@pytest.mark.parametrize(
    ("method", "options", "expected", "extra_calls"),
    [
        ("ift", {"update_interval": 4, "neumann_steps": 3}, "forward_difference", 3),
        ("forward", {"horizon": 8, "windows": 2}, "finite_difference", None),
    ],
)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_auto_takes_the_methods_differences_with_torchs_closure(
    case: OptimizerCase, method: str, options: dict[str, Any], expected: str, extra_calls: Any
) -> None:
    """``hvp="auto"`` with torch's closure: one closure call per product in the one-pass methods
    (forward differences), the same hypergradients as ``hvp="forward_difference"`` named;
    central ones in forward mode, where the products' errors accumulate in the tangents."""

    def run(hvp: str) -> tuple[Any, int]:
        model, data = make_model(), make_data(8)
        opt = case.make(model.parameters(), method=method, hvp=hvp, **options)
        calls = [0]

        def counted(closure: Any) -> Any:
            def wrapper() -> Any:
                calls[0] += 1
                return closure()

            return wrapper

        val = val_closure(model, data)
        for t in range(8):
            opt.step(counted(train_closure(opt, model, data.batches[t])), val_closure=val)
        assert opt.state_dict()["hyper"]["resolved_hvp"] == (expected if hvp == "auto" else hvp)
        return opt.hypergradients(), calls[0]

    auto, auto_calls = run("auto")
    named, named_calls = run(expected)
    assert auto_calls == named_calls
    if extra_calls is not None:
        assert auto_calls == 8 + 2 * extra_calls  # two hyper-steps, one call per product
    for (name, a), (_, b) in zip(flat(auto), flat(named), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("case", CASES, ids=str)
def test_step_without_closure_warns_once_and_trains(case: OptimizerCase) -> None:
    model, data = make_model(), make_data(6)
    opt = case.make(model.parameters(), method="ift", update_interval=2)
    before = opt.hyperparameters()
    val = val_closure(model, data)

    def run() -> None:
        for t in range(6):
            train_closure(opt, model, data.batches[t])()  # the user calls backward
            assert opt.step(val_closure=val) is None

    with pytest.warns(RuntimeWarning, match=r"without a training closure") as record:
        run()
    relevant = [w for w in record if "without a training closure" in str(w.message)]
    assert len(relevant) == 1
    assert "neumann_steps=0" in str(relevant[0].message)
    assert opt.hyper_state == {
        "step": 6,
        "hyper_steps": 3,
        "skipped_hyper_steps": 0,
        "divergences": 0,
        "scaler_skipped_steps": 0,
        "overridden_hyper_steps": 0,
    }
    assert not torch.equal(flat_first(opt.hyperparameters()[0]["lr"]), flat_first(before[0]["lr"]))


@pytest.mark.parametrize("method", ["greedy", "hd"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_step_without_closure_is_silent_when_no_hessian_is_needed(
    case: OptimizerCase, method: str
) -> None:
    model, data = make_model(), make_data(4)
    opt = case.make(model.parameters(), method=method, update_interval=2)
    val = val_closure(model, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(4):
            train_closure(opt, model, data.batches[t])()
            opt.step(val_closure=val)
    assert opt.hyper_state["hyper_steps"] == (1 if method == "hd" else 2)  # hd: one step late


@pytest.mark.parametrize("method", ["ift", "greedy"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_validation_methods_need_a_validation_closure(case: OptimizerCase, method: str) -> None:
    model, data = make_model(), make_data(1)
    opt = case.make(model.parameters(), method=method)
    with pytest.raises(ValueError, match=rf"method='{method}' needs a validation closure"):
        opt.step(train_closure(opt, model, data.batches[0]))
    assert opt.hyper_state["step"] == 0


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hypergradient_descent_needs_no_validation_closure(case: OptimizerCase) -> None:
    model, data = make_model(), make_data(3)
    opt = case.make(model.parameters(), method="hd")
    for t in range(3):
        opt.step(train_closure(opt, model, data.batches[t]))
    assert opt.hyper_state["hyper_steps"] == 2


@pytest.mark.parametrize("case", CASES, ids=str)
def test_register_validation_closure(case: OptimizerCase) -> None:
    data = make_data(10)
    passed_model, registered_model = make_model(), make_model()
    passed = case.make(passed_model.parameters(), update_interval=5)
    registered = case.make(registered_model.parameters(), update_interval=5)
    with pytest.raises(TypeError, match=r"val_closure must be callable, got 3"):
        registered.register_validation_closure(3)  # type: ignore[arg-type]
    registered.register_validation_closure(val_closure(registered_model, data))
    train(passed, passed_model, data, range(10))
    for t in range(10):
        registered.step(train_closure(registered, registered_model, data.batches[t]))
    assert registered.hyper_state["hyper_steps"] == 2
    assert_equal_params(registered_model, passed_model)
    assert_equal_values(registered.hyperparameters(), passed.hyperparameters())


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        pytest.param(
            lambda loss: 1.0,
            TypeError,
            r"val_closure must return the validation loss as a scalar tensor, got float",
            id="not_a_tensor",
        ),
        pytest.param(
            lambda loss: loss.expand(2, 3),
            ValueError,
            r"val_closure must return .* scalar tensor, got a tensor of shape \(2, 3\)",
            id="not_a_scalar",
        ),
        pytest.param(
            lambda loss: loss.detach(),
            ValueError,
            r"val_closure returned a loss that does not depend on the parameters",
            id="no_dependence",
        ),
    ],
)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_validation_loss(
    case: OptimizerCase, bad: Callable[[Tensor], Any], error: type[Exception], message: str
) -> None:
    model, data = make_model(), make_data(1)
    opt = case.make(model.parameters(), update_interval=1)
    val = val_closure(model, data)
    with pytest.raises(error, match=message):
        opt.step(train_closure(opt, model, data.batches[0]), val_closure=lambda: bad(val()))


@pytest.mark.parametrize(
    ("closure", "error", "message"),
    [
        pytest.param(lambda: 1.0, TypeError, r"scalar tensor, got 1\.0", id="not_a_tensor"),
        pytest.param(
            lambda: torch.tensor(1.0),
            ValueError,
            r"does not depend on the parameters",
            id="no_dependence",
        ),
    ],
)
def test_bad_training_loss(
    closure: Callable[[], Any], error: type[Exception], message: str
) -> None:
    model = make_model()
    opt = HyperSGD(model.parameters(), lr=0.1, method="hd")
    with pytest.raises(error, match=message):
        opt.step(closure)


def test_closures_must_be_callable() -> None:
    opt = HyperSGD(make_model().parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"closure must be callable, got 'loss'"):
        opt.step("loss", val_closure=lambda: torch.zeros(()))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"val_closure must be callable, got 2"):
        opt.step(val_closure=2)  # type: ignore[arg-type]


# -- 6. bad input -----------------------------------------------------------------------------


def _returns_list(params: list[Tensor]) -> Any:
    return list(params)


BAD_INPUT = [
    # (id, class, arguments, exception, pattern naming the argument, the value as written)
    ("sgd_negative_lr", HyperSGD, {"lr": -0.1}, ValueError, "lr", "-0.1"),
    ("sgd_negative_momentum", HyperSGD, {"momentum": -0.5}, ValueError, "momentum", "-0.5"),
    ("sgd_negative_dampening", HyperSGD, {"dampening": -0.1}, ValueError, "dampening", "-0.1"),
    (
        "sgd_negative_weight_decay",
        HyperSGD,
        {"weight_decay": -1e-3},
        ValueError,
        "weight[_ ]decay",
        "-0.001",
    ),
    ("sgd_lr_not_a_number", HyperSGD, {"lr": "0.1"}, TypeError, "lr", "'0.1'"),
    ("sgd_lr_nan", HyperSGD, {"lr": math.nan}, ValueError, "lr", "nan"),
    (
        "sgd_nesterov_with_dampening",
        HyperSGD,
        {"momentum": 0.9, "dampening": 0.1, "nesterov": True},
        ValueError,
        "Nesterov",
        "dampening=0.1",
    ),
    (
        "sgd_nesterov_without_momentum",
        HyperSGD,
        {"nesterov": True},
        ValueError,
        "Nesterov",
        "momentum=0",
    ),
    ("sgd_nesterov_not_bool", HyperSGD, {"nesterov": 1}, TypeError, "nesterov", "1"),
    ("adam_negative_lr", HyperAdam, {"lr": -1e-3}, ValueError, "lr", "-0.001"),
    ("adam_negative_eps", HyperAdam, {"eps": -1e-8}, ValueError, "eps", "-1e-08"),
    (
        "adamw_negative_weight_decay",
        HyperAdamW,
        {"weight_decay": -0.01},
        ValueError,
        "weight[_ ]decay",
        "-0.01",
    ),
    ("adam_beta1_one", HyperAdam, {"betas": (1.0, 0.999)}, ValueError, "beta", "1.0"),
    ("adam_beta2_negative", HyperAdam, {"betas": (0.9, -0.1)}, ValueError, "beta", "-0.1"),
    ("adam_betas_one_value", HyperAdam, {"betas": (0.9,)}, TypeError, "betas", "(0.9,)"),
    (
        "adam_betas_three_values",
        HyperAdam,
        {"betas": (0.9, 0.99, 0.999)},
        TypeError,
        "betas",
        "(0.9, 0.99, 0.999)",
    ),
    ("adam_betas_a_float", HyperAdam, {"betas": 0.9}, TypeError, "betas", "0.9"),
    ("sgd_learn_unknown", HyperSGD, {"learn": ("beta1",)}, ValueError, "learn", "'beta1'"),
    (
        "adam_learn_unknown",
        HyperAdam,
        {"learn": ("lr", "momentum")},
        ValueError,
        "learn",
        "'momentum'",
    ),
    ("adam_learn_betas", HyperAdam, {"learn": ("betas",)}, ValueError, "learn", "'betas'"),
    ("learn_empty", HyperSGD, {"learn": ()}, ValueError, "learn", "()"),
    ("learn_duplicate", HyperSGD, {"learn": ("lr", "lr")}, ValueError, "learn", "('lr', 'lr')"),
    ("learn_not_str", HyperSGD, {"learn": ("lr", 1)}, TypeError, "learn", "1"),
    ("learn_not_iterable", HyperSGD, {"learn": 3}, TypeError, "learn", "3"),
    (
        "learn_momentum_zero",
        HyperSGD,
        {"learn": ("momentum",)},
        ValueError,
        "momentum",
        "momentum=0",
    ),
    (
        "sgd_learn_weight_decay_zero",
        HyperSGD,
        {"learn": ("weight_decay",)},
        ValueError,
        "weight_decay",
        "weight_decay=0",
    ),
    (
        "adam_learn_weight_decay_zero",
        HyperAdam,
        {"learn": ("lr", "weight_decay")},
        ValueError,
        "weight_decay",
        "weight_decay=0",
    ),
    ("learn_lr_outside_bounds", HyperSGD, {"lr": 100.0}, ValueError, "lr", "lr=100.0"),
    (
        "learn_momentum_outside_bounds",
        HyperSGD,
        {"momentum": 1.0, "learn": ("momentum",)},
        ValueError,
        "momentum",
        "momentum=1.0",
    ),
    ("granularity_unknown", HyperSGD, {"granularity": "row"}, ValueError, "granularity", "'row'"),
    ("method_unknown", HyperAdam, {"method": "unrolled"}, ValueError, "method", "'unrolled'"),
    ("hvp_unknown", HyperSGD, {"hvp": "exact"}, ValueError, "hvp", "'exact'"),
    ("neumann_steps_negative", HyperSGD, {"neumann_steps": -1}, ValueError, "neumann_steps", "-1"),
    (
        "neumann_steps_float",
        HyperSGD,
        {"neumann_steps": 2.0},
        (TypeError, ValueError),
        "neumann_steps",
        "2.0",
    ),
    (
        "neumann_steps_bool",
        HyperSGD,
        {"neumann_steps": True},
        (TypeError, ValueError),
        "neumann_steps",
        "True",
    ),
    (
        "neumann_steps_with_greedy",
        HyperSGD,
        {"method": "greedy", "neumann_steps": 2},
        ValueError,
        "neumann_steps",
        "2",
    ),
    (
        "neumann_steps_with_hd",
        HyperAdam,
        {"method": "hd", "neumann_steps": 1},
        ValueError,
        "neumann_steps",
        "1",
    ),
    ("update_interval_zero", HyperSGD, {"update_interval": 0}, ValueError, "update_interval", "0"),
    (
        "update_interval_float",
        HyperAdam,
        {"update_interval": 2.5},
        (TypeError, ValueError),
        "update_interval",
        "2.5",
    ),
    (
        "hyper_optimizer_not_callable",
        HyperSGD,
        {"hyper_optimizer": "adam"},
        TypeError,
        "hyper_optimizer",
        "'adam'",
    ),
    (
        "hyper_optimizer_returns_a_list",
        HyperSGD,
        {"hyper_optimizer": _returns_list},
        TypeError,
        "hyper_optimizer",
        "list",
    ),
    (
        "bounds_low_above_high",
        HyperSGD,
        {"bounds": {"lr": (1.0, 0.1)}},
        ValueError,
        "bounds",
        "(1.0, 0.1)",
    ),
    (
        "bounds_low_equals_high",
        HyperSGD,
        {"bounds": {"lr": (0.1, 0.1)}},
        ValueError,
        "bounds",
        "(0.1, 0.1)",
    ),
    (
        "bounds_low_negative",
        HyperSGD,
        {"bounds": {"lr": (-1.0, 1.0)}},
        ValueError,
        "bounds",
        "(-1.0, 1.0)",
    ),
    (
        "bounds_logit_reaches_one",
        HyperSGD,
        {"momentum": 0.9, "bounds": {"momentum": (0.1, 1.0)}},
        ValueError,
        "bounds",
        "(0.1, 1.0)",
    ),
    (
        "bounds_unknown_name",
        HyperSGD,
        {"bounds": {"beta1": (0.1, 0.9)}},
        ValueError,
        "bounds",
        "'beta1'",
    ),
    ("bounds_not_a_pair", HyperSGD, {"bounds": {"lr": 0.1}}, TypeError, "bounds", "0.1"),
    ("bounds_not_a_mapping", HyperSGD, {"bounds": [("lr", (0.1, 1.0))]}, TypeError, "bounds", "[("),
    (
        "sgd_differentiable",
        HyperSGD,
        {"differentiable": True},
        ValueError,
        "differentiable",
        "True",
    ),
    ("sgd_fused", HyperSGD, {"fused": True}, ValueError, "fused", "True"),
    (
        "adam_differentiable",
        HyperAdam,
        {"differentiable": True},
        ValueError,
        "differentiable",
        "True",
    ),
    ("adam_fused", HyperAdam, {"fused": True}, ValueError, "fused", "True"),
    ("adam_capturable", HyperAdam, {"capturable": True}, ValueError, "capturable", "True"),
    ("adamw_fused", HyperAdamW, {"fused": True}, ValueError, "fused", "True"),
    ("adamw_capturable", HyperAdamW, {"capturable": True}, ValueError, "capturable", "True"),
    ("sgd_foreach_not_bool", HyperSGD, {"foreach": "yes"}, TypeError, "foreach", "'yes'"),
    (
        "sgd_granularity_not_a_mapping",
        HyperSGD,
        {"granularity": 3},
        TypeError,
        "granularity",
        "3",
    ),
    (
        "sgd_granularity_names_unlearned",
        HyperSGD,
        {"momentum": 0.9, "granularity": {"momentum": "element"}},
        ValueError,
        "granularity",
        "'momentum'",
    ),
    (
        "sgd_granularity_mapping_bad_value",
        HyperSGD,
        {"granularity": {"lr": "weight"}},
        ValueError,
        "granularity",
        "'weight'",
    ),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "argument", "value"),
    [pytest.param(*row[1:], id=row[0]) for row in BAD_INPUT],
)
def test_bad_constructor_argument(
    cls: type[HyperOptimizer],
    kwargs: dict[str, Any],
    error: type[Exception] | tuple[type[Exception], ...],
    argument: str,
    value: str,
) -> None:
    with pytest.raises(error) as info:
        cls(make_model().parameters(), **kwargs)
    message = str(info.value)
    assert re.search(argument, message), f"{message!r} does not name {argument!r}"
    assert value in message, f"{message!r} does not show the value {value!r}"


def test_learn_betas_hints_at_beta1_and_beta2() -> None:
    with pytest.raises(ValueError, match=r"'beta1' and 'beta2'"):
        HyperAdam(make_model().parameters(), learn="betas")


# -- 7. non-finite values ---------------------------------------------------------------------


def assert_skipped(
    opt: HyperOptimizer,
    model: nn.Module,
    plain: HyperOptimizer,
    plain_model: nn.Module,
    initial: list[dict[str, Any]],
    skipped: int,
) -> None:
    assert opt.hyper_state["hyper_steps"] == 0
    assert opt.hyper_state["skipped_hyper_steps"] == skipped
    assert_equal_values(opt.hyperparameters(), initial)
    for _, g in flat(opt.hypergradients()):
        assert not g.any()
    assert_equal_params(model, plain_model)  # the weights took their ordinary steps
    assert_equal_values(plain.hyperparameters(), initial)


@pytest.mark.parametrize("granularity", ["scalar", "element"])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("method", ["ift", "greedy"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_nonfinite_validation_loss_skips_the_hyper_update(
    case: OptimizerCase, method: str, value: float, granularity: str
) -> None:
    data = make_data(9)
    model, plain_model = make_model(), make_model()
    options = {"method": method, "granularity": granularity, "update_interval": 3}
    opt = case.make(model.parameters(), **options)
    plain = case.make(plain_model.parameters(), hyper_optimizer=frozen, **options)
    initial = opt.hyperparameters()
    val = val_closure(model, data)
    with pytest.warns(RuntimeWarning, match=rf"validation loss is {value}") as record:
        train(opt, model, data, range(6), val=lambda: val() + value)
    assert sum("is skipped" in str(w.message) for w in record) == 2
    train(plain, plain_model, data, range(6))
    assert_skipped(opt, model, plain, plain_model, initial, skipped=2)
    # a finite validation loss again: hyper-steps resume
    train(opt, model, data, range(6, 9))
    assert opt.hyper_state["hyper_steps"] == 1
    assert opt.hyper_state["skipped_hyper_steps"] == 2


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_infinite_hypergradient_skips_the_hyper_update(
    case: OptimizerCase, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_data(6)
    model, plain_model = make_model(), make_model()
    options = {"method": method, "update_interval": 1 if method == "hd" else 3}
    opt = case.make(model.parameters(), **options)
    plain = case.make(plain_model.parameters(), hyper_optimizer=frozen, **options)
    initial = opt.hyperparameters()
    rule = type(opt.rule)
    original = rule.hyper_vjp

    def infinite(self: Any, *args: Any, **kwargs: Any) -> dict[str, list[Tensor]]:
        out = original(self, *args, **kwargs)
        return {k: [torch.full_like(x, math.inf) for x in v] for k, v in out.items()}

    monkeypatch.setattr(rule, "hyper_vjp", infinite)
    sums = getattr(rule, "hyper_vjp_sums", None)
    if sums is not None:  # the per-parameter sums by inner products (SGD's)

        def infinite_sums(self: Any, *args: Any, **kwargs: Any) -> dict[str, list[Tensor]] | None:
            out = sums(self, *args, **kwargs)
            if out is None:
                return None
            return {k: [torch.full_like(x, math.inf) for x in v] for k, v in out.items()}

        monkeypatch.setattr(rule, "hyper_vjp_sums", infinite_sums)
    with pytest.warns(RuntimeWarning, match=r"a hypergradient is not finite"):
        train(opt, model, data, range(6))
    monkeypatch.undo()
    train(plain, plain_model, data, range(6))
    assert_skipped(opt, model, plain, plain_model, initial, skipped=5 if method == "hd" else 2)


@pytest.mark.parametrize("method", ["ift", "greedy"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_validation_gradient_overflow_skips_the_hyper_update(
    case: OptimizerCase, method: str
) -> None:
    """A finite validation loss whose gradient is infinite: √u at u = 0."""
    data = make_data(6)
    model, plain_model = make_model(), make_model()
    options = {"method": method, "update_interval": 3}
    opt = case.make(model.parameters(), **options)
    plain = case.make(plain_model.parameters(), hyper_optimizer=frozen, **options)
    initial = opt.hyperparameters()
    val = val_closure(model, data)

    def overflowing() -> Tensor:
        s = sum(p.sum() for p in model.parameters())
        return val() + torch.sqrt(s - s.detach())

    with pytest.warns(RuntimeWarning, match=r"is skipped"):
        train(opt, model, data, range(6), val=overflowing)
    train(plain, plain_model, data, range(6))
    assert_skipped(opt, model, plain, plain_model, initial, skipped=2)


# -- 8. memory --------------------------------------------------------------------------------


def live_tensors() -> int:
    gc.collect()
    kinds = {Tensor, nn.Parameter}  # exact types: isinstance() on every object is slow
    return sum(type(o) in kinds for o in gc.get_objects())


def assert_no_graph(opt: HyperOptimizer, model: nn.Module) -> None:
    for p in model.parameters():
        assert p.grad is None or p.grad.grad_fn is None
    for state in opt.state.values():
        for key, x in state.items():
            if isinstance(x, Tensor):
                assert x.grad_fn is None, key
                assert not x.requires_grad, key
    for label, x in [*flat(opt.hyperparameters()), *flat(opt.hypergradients())]:
        assert x.grad_fn is None, label
    assert opt.hyper_optimizer is not None
    for group in opt.hyper_optimizer.param_groups:
        for phi in group["params"]:
            assert phi.grad_fn is None
            assert phi.grad is None
    for state in opt.hyper_optimizer.state.values():
        for x in state.values():
            assert not isinstance(x, Tensor) or x.grad_fn is None


def assert_flat_memory(
    case: OptimizerCase, steps: int, *, method: str, hvp: str, granularity: str
) -> None:
    backward = hvp != "autograd"
    model = make_model(hidden=4)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)
    xv, yv = torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)
    opt = case.make(model.parameters(), method=method, hvp=hvp, granularity=granularity)

    def val() -> Tensor:
        return mse_loss(model(xv), yv)

    closure = train_closure(opt, model, (x, y), backward=backward)
    counts = {}
    for t in range(1, steps + 1):
        opt.step(closure, val_closure=val)
        assert_no_graph(opt, model)
        if t in (100, steps):  # both right after a hyper-step (T = 10 or 1)
            counts[t] = live_tensors()
    assert opt.hyper_state["skipped_hyper_steps"] == 0
    assert opt.hyper_state["hyper_steps"] > 0
    assert counts[steps] == counts[100], counts


MEMORY_GRID = [  # the autograd graph is kept only with hvp="autograd"; granularity barely matters
    *(pytest.param(c, "ift", "auto", "element", id=f"{c}-ift-auto-element") for c in CASES),
    *(pytest.param(c, "ift", "autograd", "scalar", id=f"{c}-ift-autograd-scalar") for c in CASES),
    pytest.param(CASES[0], "ift", "autograd", "element", id=f"{CASES[0]}-ift-autograd-element"),
    pytest.param(CASES[0], "hd", "auto", "element", id=f"{CASES[0]}-hd-element"),
    pytest.param(CASES[2], "hd", "auto", "scalar", id=f"{CASES[2]}-hd-scalar"),
]


@pytest.mark.parametrize(("case", "method", "hvp", "granularity"), MEMORY_GRID)
def test_nothing_of_the_graph_survives_a_step(
    case: OptimizerCase, method: str, hvp: str, granularity: str
) -> None:
    assert_flat_memory(case, 300, method=method, hvp=hvp, granularity=granularity)


@pytest.mark.slow
@pytest.mark.parametrize(("case", "method", "hvp", "granularity"), MEMORY_GRID)
def test_nothing_of_the_graph_survives_ten_thousand_steps(
    case: OptimizerCase, method: str, hvp: str, granularity: str
) -> None:
    assert_flat_memory(case, 10_000, method=method, hvp=hvp, granularity=granularity)


# -- 9. parameters without gradients ---------------------------------------------------------


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()
        self.unused = nn.Parameter(torch.linspace(-1.0, 1.0, 6).reshape(2, 3))
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) + self.frozen.sum()


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("method", ["ift", "hd"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_parameters_without_gradient_are_skipped(
    case: OptimizerCase, method: str, granularity: str
) -> None:
    data = make_data(8)
    model = WithUnused()
    opt = case.make(model.parameters(), method=method, granularity=granularity, update_interval=2)
    initial = opt.hyperparameters()
    train(opt, model, data, range(8))
    assert opt.hyper_state["hyper_steps"] >= 3
    assert torch.equal(model.unused, torch.linspace(-1.0, 1.0, 6).reshape(2, 3))
    assert torch.equal(model.frozen, torch.ones(3))
    assert model.unused.grad is None
    assert model.unused not in opt.state or not opt.state[model.unused]
    assert model.frozen not in opt.state or not opt.state[model.frozen]
    if granularity != "scalar":
        index = {id(p): i for i, p in enumerate(opt.param_groups[0]["params"])}
        after = opt.hyperparameters()[0]
        for name in case.learn:
            for p in (model.unused, model.frozen):
                i = index[id(p)]
                assert torch.equal(after[name][i], initial[0][name][i]), name
            i = index[id(model.net[0].weight)]
            assert not torch.equal(after[name][i], initial[0][name][i]), name


@pytest.mark.parametrize("case", CASES, ids=str)
def test_parameters_without_gradient_match_torch(case: OptimizerCase) -> None:
    """The weights of a model with an unused and a frozen parameter follow torch's optimizer
    while nothing is learned."""
    data = make_data(5, dtype=torch.float64)
    model = WithUnused().double()
    reference_model = copy.deepcopy(model)
    opt = case.make(model.parameters(), hyper_optimizer=frozen, update_interval=2)
    reference = case.make_torch(reference_model.parameters())
    train(opt, model, data, range(5))
    train(reference, reference_model, data, range(5))
    for (name, x), y in zip(model.named_parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12, msg=name)  # DESIGN §7


# -- 10. devices ------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["scalar", "element"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_training_on_device(case: OptimizerCase, device: str, granularity: str) -> None:
    model, data = make_model(device=device), make_data(12, device=device)
    opt = case.make(model.parameters(), granularity=granularity, update_interval=4)
    before = opt.hyperparameters()
    losses = []
    for t in range(12):
        closure = train_closure(opt, model, data.batches[t])
        losses.append(float(opt.step(closure, val_closure=val_closure(model, data))))
    assert opt.hyper_state == {
        "step": 12,
        "hyper_steps": 3,
        "skipped_hyper_steps": 0,
        "divergences": 0,
        "scaler_skipped_steps": 0,
        "overridden_hyper_steps": 0,
    }
    assert all(math.isfinite(loss) for loss in losses)
    after = opt.hyperparameters()
    assert_structure(after, opt, case.learn, granularity)
    for p in model.parameters():
        assert p.device.type == device
        assert torch.isfinite(p).all()
        for x in opt.state[p].values():
            if isinstance(x, Tensor) and x.dim() > 0:
                assert x.device == p.device
    for name in case.learn:
        assert not torch.equal(flat_first(after[0][name]).cpu(), flat_first(before[0][name]).cpu())


# -- 11. the hypergradient points somewhere useful ------------------------------------------


def test_ift_raises_a_far_too_small_learning_rate() -> None:
    """Linear regression with lr = 1e-4, a hundredfold too small: the validation loss falls
    faster with a larger lr, and 200 steps (a hyper-step every second one) raise it ≥ 10×."""
    gen = torch.Generator().manual_seed(0)
    w_true = torch.randn(5, 1, generator=gen)
    x, xv = torch.randn(64, 5, generator=gen), torch.randn(64, 5, generator=gen)
    y = x @ w_true + 0.01 * torch.randn(64, 1, generator=gen)
    yv = xv @ w_true + 0.01 * torch.randn(64, 1, generator=gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Linear(5, 1)
    opt = HyperSGD(model.parameters(), lr=1e-4, method="ift", update_interval=2)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(200):
        opt.step(closure, val_closure=lambda: mse_loss(model(xv), yv))
    assert opt.hyper_state["skipped_hyper_steps"] == 0
    assert float(opt.hyperparameters()[0]["lr"]) >= 1e-3
    assert opt.param_groups[0]["lr"] >= 1e-3


@pytest.mark.parametrize("hvp", ["finite_difference", "forward_difference"])
def test_differences_of_a_closure_that_does_not_zero_the_gradients(hvp: str) -> None:
    """Lightning's closure under gradient accumulation calls backward() without zeroing: each
    gradient taken for a product must still be the gradient at its own point, not added to the
    previous one (it once was: products 25 times too large)."""

    def run(zeroes: bool) -> tuple[Tensor, list[Tensor]]:
        model, data = make_model(), make_data(12)
        opt = HyperSGD(model.parameters(), lr=0.05, method="ift", hvp=hvp, update_interval=4)
        for x, y in data.batches:

            def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                if zeroes:
                    opt.zero_grad()
                loss = mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.zero_grad()  # the step's own gradient is the same in both runs
            opt.step(closure, val_closure=val_closure(model, data))
        return opt.hypergradients()[0]["lr"], [p.detach().clone() for p in model.parameters()]

    (h_zeroed, w_zeroed), (h_kept, w_kept) = run(True), run(False)
    assert torch.equal(h_zeroed, h_kept)
    for a, b in zip(w_zeroed, w_kept, strict=True):
        assert torch.equal(a, b)


def test_an_adamw_state_dict_without_the_decoupled_flag_stays_adamw() -> None:
    """torch's AdamW in 2.5 and earlier was a class of its own and saved no
    ``decoupled_weight_decay``: loaded into HyperAdamW, the groups stay decoupled (not Adam
    with an L2 penalty), and the run continues as torch's AdamW."""
    data = make_data(8, dtype=torch.float64)
    model = make_model(dtype=torch.float64)
    reference = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    train(reference, model, data, range(4))
    saved = copy.deepcopy(reference.state_dict())
    for group in saved["param_groups"]:
        group.pop("decoupled_weight_decay", None)
    resumed_model = make_model(seed=5, dtype=torch.float64)
    resumed_model.load_state_dict(model.state_dict())
    resumed = HyperAdamW(resumed_model.parameters(), lr=0.01, weight_decay=0.1, update_interval=50)
    resumed.load_state_dict(saved)
    assert all(group["decoupled_weight_decay"] for group in resumed.param_groups)
    train(reference, model, data, range(4, 8))
    train(resumed, resumed_model, data, range(4, 8))
    for x, y in zip(model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-12)
