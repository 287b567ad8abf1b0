"""The method interface: a method is one module with a registered class, and the optimizer
runs it with no knowledge of which method it is.

``LastStep`` below is written only against :mod:`hyperopt_optim.hypergradients`' public
interface: every ``update_interval`` steps it asks for a snapshot of ``z_t`` and returns
``∇L_V(w_{t+1}) · ∂w_{t+1}/∂λ`` — the exact derivative of the validation loss after one step,
which is what ``method="greedy"`` computes.  Registered under a new name, it must give greedy's
hypergradients and trajectory exactly.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from hyperopt_optim import HyperAdam, HyperSGD
from hyperopt_optim._checks import check_positive_int
from hyperopt_optim.hypergradients import (
    METHODS,
    ElementwiseHypergradients,
    GroupHypergradients,
    HypergradientMethod,
    MethodOptions,
    StepContext,
    StepPlan,
)


class LastStep(HypergradientMethod):
    """Greedy, written from scratch against the interface."""

    @classmethod
    def from_options(cls, options: MethodOptions) -> LastStep:
        method = cls()
        method.update_interval = check_positive_int("update_interval", options.update_interval, 7)
        return method

    def plan(self, step: int) -> StepPlan:
        return StepPlan(snapshot=(step + 1) % self.update_interval == 0)

    def after_update(self, ctx: StepContext) -> ElementwiseHypergradients | None:
        if ctx.groups is None:
            return None
        outer = ctx.validation_gradient([p for g in ctx.groups for p in g.live])
        if outer is None:
            return None
        out, start = [], 0
        for g in ctx.groups:
            cotangent = outer[start : start + len(g.live)]
            start += len(g.live)
            # the interface's reduced products, as greedy takes them (sums per parameter by
            # inner products where the rule has them: the same rounding as greedy's)
            out.append(GroupHypergradients(list(g.indices), g.reduced_hyper_vjp(cotangent, {})))
        return out


def _problem() -> tuple[list[torch.nn.Parameter], object, object]:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 4, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    av = torch.randn(6, 4, generator=g, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))
    v = torch.nn.Parameter(torch.randn(1, generator=g, dtype=torch.float64))

    def closure() -> Tensor:
        return (torch.tanh(a @ w + v) - b).pow(2).mean()

    def val_closure() -> Tensor:
        return (torch.tanh(av @ w + v) - b).pow(2).mean()

    return [w, v], closure, val_closure


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (HyperSGD, {"lr": 0.1, "momentum": 0.8, "learn": ("lr", "momentum")}),
        (HyperAdam, {"lr": 0.05, "learn": ("lr", "beta1", "beta2")}),
    ],
)
@pytest.mark.parametrize("granularity", ["scalar", "element"])
def test_a_registered_method_runs_through_the_same_step(
    monkeypatch: pytest.MonkeyPatch, cls: type, kwargs: dict[str, object], granularity: str
) -> None:
    monkeypatch.setitem(METHODS, "last_step", LastStep)
    runs = {}
    for method in ("greedy", "last_step"):
        params, closure, val_closure = _problem()
        opt = cls(params, **kwargs, method=method, update_interval=3, granularity=granularity)
        for _ in range(12):
            opt.step(closure, val_closure=val_closure)
        runs[method] = (params, opt.hyperparameters(), opt.hypergradients(), opt.hyper_state)
    (p1, h1, g1, s1), (p2, h2, g2, s2) = runs["greedy"], runs["last_step"]
    assert s1 == s2
    assert s1["hyper_steps"] == 4
    lr_grads = (
        g1[0]["lr"] if granularity == "scalar" else torch.cat([x.flatten() for x in g1[0]["lr"]])
    )
    assert bool((lr_grads != 0).any())  # the values did move: the comparison is not trivial
    for a, b in zip(p1, p2, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(h1, h2, rtol=0, atol=0)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_a_registered_method_checks_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """A method's defaults and checks are its own; options belong to the methods that declare
    them, and the error names the owner."""
    monkeypatch.setitem(METHODS, "last_step", LastStep)
    params, _, _ = _problem()
    assert HyperSGD(params, lr=0.1, method="last_step").update_interval == 7
    with pytest.raises(ValueError, match="update_interval must be an integer >= 1, got 0"):
        HyperSGD(params, lr=0.1, method="last_step", update_interval=0)
    with pytest.raises(
        ValueError,
        match=r"horizon=5 is an option of one of the methods \('forward', 'reversible'\)",
    ):
        HyperSGD(params, lr=0.1, method="last_step", horizon=5)
    with pytest.raises(ValueError, match=r"method must be one of .*'last_step'"):
        HyperSGD(params, lr=0.1, method="nope")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        # the product provider first, then the method's own options, then other methods'
        ({"method": "hd", "neumann_steps": 2, "horizon": 3}, ValueError, "takes no Neumann"),
        ({"hvp": "autograd_batched", "horizon": 4}, ValueError, "one batched backward: it is for"),
        (
            {"method": "forward", "horizon": 4, "update_interval": 0, "clamps": {"x": 1}},
            ValueError,
            "clamps: 'x' is not a clamp",
        ),
        (
            {"method": "forward", "horizon": 4, "clamps": {"x": 1}, "backtrack": "y"},
            ValueError,
            "clamps: 'x' is not a clamp",
        ),
        ({"fused": True, "differentiable": True}, ValueError, "differentiable=True"),
        ({"hvp": "bogus"}, ValueError, r"\('auto', 'autograd', 'autograd_batched', 'finite_"),
    ],
)
def test_which_bad_argument_is_named_first(
    kwargs: dict[str, object], error: type, match: str
) -> None:
    params, _, _ = _problem()
    with pytest.raises(error, match=match):
        HyperSGD(params, lr=0.1, **kwargs)  # type: ignore[arg-type]


def test_setting_hvp_on_the_optimizer_takes_effect() -> None:
    """``opt.hvp`` is the provider the next step uses, as it was set."""
    params, closure, val_closure = _problem()
    opt = HyperSGD(params, lr=0.1, method="ift", update_interval=1)
    opt.hvp = "autograd"

    def torch_closure() -> Tensor:
        opt.zero_grad()
        loss = closure()  # type: ignore[operator]
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="hvp='autograd' needs a closure that returns the loss"):
        opt.step(torch_closure, val_closure=val_closure)
    with pytest.raises(ValueError, match="hvp must be one of"):
        opt.hvp = "nope"


# --- parameters the step does not differentiate --------------------------------------------


@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
def test_a_frozen_parameter_with_a_stale_gradient_moves_as_torch_moves_it(hvp: str) -> None:
    """torch's optimizers update a parameter with ``requires_grad=False`` whose ``.grad`` was
    left over; so does HyperSGD, and the hypergradient treats it as a constant of the loss
    (zero products and validation gradient) instead of failing in autograd."""
    runs = []
    for cls in (HyperSGD, torch.optim.SGD):
        w = torch.nn.Parameter(torch.linspace(0.5, 1.5, 3, dtype=torch.float64))
        f = torch.nn.Parameter(torch.ones(3, dtype=torch.float64), requires_grad=False)
        f.grad = torch.full((3,), 0.3, dtype=torch.float64)

        def loss(w: Tensor = w, f: Tensor = f) -> Tensor:
            return ((w * f) ** 2).sum() + (w**3).sum()

        if cls is HyperSGD:
            opt = HyperSGD(
                [w, f],
                lr=0.01,
                momentum=0.9,
                update_interval=2,
                hvp=hvp,
                hyper_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0),
            )
        else:
            opt = torch.optim.SGD([w, f], lr=0.01, momentum=0.9)

        def closure(w: Tensor = w, loss: Any = loss, cls: type = cls) -> Tensor:
            if hvp == "autograd" and cls is HyperSGD:
                return loss()  # the optimizer differentiates it
            w.grad = None  # only w's: the stale .grad of f stays
            value = loss()
            value.backward()
            return value

        for _ in range(6):
            if cls is HyperSGD:
                opt.step(closure, val_closure=loss)
            else:
                opt.step(closure)
        runs.append((w.detach().clone(), f.detach().clone(), opt))
    (w1, f1, hyper), (w2, f2, _) = runs
    assert torch.equal(w1, w2)
    assert torch.equal(f1, f2)
    assert not torch.equal(f1, torch.ones(3, dtype=torch.float64))  # f did move
    assert hyper.hyper_state["hyper_steps"] == 3
    assert bool(
        torch.isfinite(hyper.hypergradients()[0]["lr"]) & (hyper.hypergradients()[0]["lr"] != 0)
    )


def test_forward_mode_with_a_group_that_has_no_gradient() -> None:
    """A param group none of whose parameters has a gradient takes no step: its tangents stay
    zero, and the other group's hypergradients are those of an optimizer without it."""
    got = []
    for with_idle in (True, False):
        a = torch.nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=torch.float64))
        idle = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
        groups: list[dict[str, Any]] = [{"params": [a]}] + (
            [{"params": [idle]}] if with_idle else []
        )
        opt = HyperSGD(
            groups,
            lr=0.05,
            momentum=0.8,
            learn=("lr", "momentum"),
            method="forward",
            horizon=8,
            windows=2,
            update_interval=4,
        )

        def loss(a: Tensor = a) -> Tensor:
            return (torch.tanh(a) ** 2).sum() + (a**4).sum()

        for _ in range(8):
            opt.step(loss, val_closure=loss)
        got.append((a.detach().clone(), opt.hypergradients()[0], opt.schedules()[0]))
        if with_idle:
            assert torch.equal(idle, torch.ones(2, dtype=torch.float64))
            for value in opt.hypergradients()[1].values():
                assert torch.equal(value, torch.zeros_like(value))  # type: ignore[arg-type]
    (a1, h1, s1), (a2, h2, s2) = got
    assert torch.equal(a1, a2)
    torch.testing.assert_close(h1, h2, rtol=0, atol=0)
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)
    assert bool((h1["lr"] != 0).any())  # type: ignore[union-attr]
