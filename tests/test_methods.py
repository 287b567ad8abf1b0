"""The method interface: a method is one module with a registered class, and the optimizer
runs it with no knowledge of which method it is.

``LastStep`` below is written only against :mod:`hyperopt_optim.hypergradients`' public
interface: every ``update_interval`` steps it asks for a snapshot of ``z_t`` and returns
``∇L_V(w_{t+1}) · ∂w_{t+1}/∂λ`` — the exact derivative of the validation loss after one step,
which is what ``method="greedy"`` computes.  Registered under a new name, it must give greedy's
hypergradients and trajectory exactly.
"""

from __future__ import annotations

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
            out.append(GroupHypergradients(list(g.indices), g.hyper_vjp(cotangent, {})))
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
    with pytest.raises(ValueError, match=r"horizon=5 is an option of method='forward'"):
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
    opt = HyperSGD(params, lr=0.1, update_interval=1)
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
