"""Mixed precision: autocast and a GradScaler given to the optimizer keep K > 0.

The scale is a power of two, so where nothing overflows a run with the scaler takes exactly the
steps of the same run without it: every gradient, product and hypergradient is the unscaled one
times the scale, divided back exactly.  A step whose scaled gradient has an inf or NaN is
skipped whole, as ``scaler.step(opt)`` would skip it, and counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import DEVICES
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

from hyperopt_optim import HyperAdam, HyperSGD

DTYPE = {"cpu": torch.bfloat16, "cuda": torch.float16}


def _setup(device: str) -> tuple[nn.Module, list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(device)
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen))
        for _ in range(20)
    ]
    val = (torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen))
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    return net, batches, (val[0].to(device), val[1].to(device))


def _run(
    device: str,
    scaled: bool,
    *,
    backward: bool,
    cls: type = HyperSGD,
    inf_at: int | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, Any, Any]:
    net, batches, (xv, yv) = _setup(device)
    scaler = (
        torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=10**6) if scaled else None
    )
    opt = cls(net.parameters(), grad_scaler=scaler, **kwargs)

    def autocast() -> Any:
        return torch.autocast(device, dtype=DTYPE[device])

    def val_closure() -> Tensor:
        with autocast():
            return cross_entropy(net(xv), yv)

    opt.register_validation_closure(val_closure)
    for t, (x, y) in enumerate(batches):
        if t == inf_at:
            x = x.clone()
            x[0, 0] = math.inf

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            with autocast():
                loss = cross_entropy(net(x), y)
            if backward:
                opt.zero_grad()
                (scaler.scale(loss) if scaler is not None else loss).backward()
            return loss

        opt.step(closure)
        if scaler is not None:
            scaler.update()
    return net, opt, scaler


CONFIGS: list[tuple[str, bool, dict[str, Any]]] = [
    ("ift-central-differences", True, {"method": "ift", "lr": 0.1, "momentum": 0.9}),
    ("ift-autograd", False, {"method": "ift", "lr": 0.1, "momentum": 0.9}),
    ("greedy", True, {"lr": 0.1, "learn": ("lr", "weight_decay"), "weight_decay": 1e-3}),
    ("ift-forward-differences", True, {"method": "ift", "lr": 0.1, "hvp": "forward_difference"}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "backward", "kwargs"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_a_scaled_run_takes_exactly_the_unscaled_steps(
    device: str, name: str, backward: bool, kwargs: dict[str, Any]
) -> None:
    plain_net, plain, _ = _run(device, False, backward=backward, update_interval=5, **kwargs)
    net, opt, _ = _run(device, True, backward=backward, update_interval=5, **kwargs)
    assert opt.hyper_state == plain.hyper_state
    assert opt.hyper_state["hyper_steps"] == 4
    for a, b in zip(net.parameters(), plain_net.parameters(), strict=True):
        assert torch.equal(a, b)
    learned, reference = opt.hypergradients()[0], plain.hypergradients()[0]
    for a, b in zip(learned.values(), reference.values(), strict=True):
        assert torch.equal(a, b)
        assert float(a) != 0.0  # there was a hypergradient (with products, for ift)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backward", [True, False])
def test_a_step_the_scaler_finds_inf_in_is_skipped_and_counted(device: str, backward: bool) -> None:
    net, opt, scaler = _run(
        device, True, backward=backward, method="ift", lr=0.1, update_interval=5, inf_at=4
    )
    state = opt.hyper_state
    assert state["scaler_skipped_steps"] == 1
    assert state["step"] == 19  # the skipped step is not a step, as with scaler.step(opt)
    assert state["hyper_steps"] == 3  # the hyper-step due then came one call later
    assert state["divergences"] == 0  # the guard never saw the skipped step's loss
    assert scaler.get_scale() == 2.0**11  # update() halved it: the inf was recorded
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
    assert math.isfinite(float(opt.hyperparameters()[0]["lr"]))


def test_the_skipped_step_leaves_weights_and_state_as_they_were() -> None:
    net, batches, (xv, yv) = _setup("cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = HyperAdam(net.parameters(), lr=0.01, grad_scaler=scaler, method="ift")
    opt.register_validation_closure(lambda: cross_entropy(net(xv), yv))
    x, y = batches[0]
    for _ in range(3):
        opt.step(lambda: cross_entropy(net(x), y))
        scaler.update()
    before = [p.detach().clone() for p in net.parameters()]
    moments = [opt.state[p]["exp_avg"].clone() for p in net.parameters()]
    bad = x.clone()
    bad[0] = math.nan
    opt.step(lambda: cross_entropy(net(bad), y))
    for p, b, m in zip(net.parameters(), before, moments, strict=True):
        assert torch.equal(p, b)
        assert torch.equal(opt.state[p]["exp_avg"], m)
    assert opt.hyper_state["scaler_skipped_steps"] == 1


def test_scaler_step_with_a_scaler_given_to_the_optimizer_names_the_fix() -> None:
    net, batches, (xv, yv) = _setup("cpu")
    scaler = torch.amp.GradScaler("cpu")
    opt = HyperSGD(net.parameters(), lr=0.1, grad_scaler=scaler)
    opt.register_validation_closure(lambda: cross_entropy(net(xv), yv))
    x, y = batches[0]
    scaler.scale(cross_entropy(net(x), y)).backward()
    with pytest.raises(RuntimeError, match=r"opt.step\(closure\) and then scaler.update\(\)"):
        scaler.step(opt)


def test_grad_scaler_is_checked() -> None:
    with pytest.raises(TypeError, match="grad_scaler"):
        HyperSGD([nn.Parameter(torch.zeros(2))], lr=0.1, grad_scaler=2.0)


def test_a_disabled_scaler_changes_nothing() -> None:
    """``GradScaler(enabled=False)`` (AMP code on a machine without fp16): plain steps."""
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", enabled=False)):
        net, batches, (xv, yv) = _setup("cpu")
        opt = HyperSGD(net.parameters(), lr=0.1, method="ift", grad_scaler=scaler)
        opt.register_validation_closure(lambda net=net, xv=xv, yv=yv: cross_entropy(net(xv), yv))
        for x, y in batches:
            opt.step(lambda net=net, x=x, y=y: cross_entropy(net(x), y))
        runs.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


Closure = Callable[[], Tensor]


def test_forward_mode_with_loss_fn_and_a_scaler_takes_the_unscaled_steps() -> None:
    """``loss_fn``'s products differentiate ``loss_fn`` itself, which is not scaled: they must
    not be divided by the scale (they once were)."""
    from torch.func import functional_call

    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        net, batches, (xv, yv) = _setup("cpu")
        names = [n for n, _ in net.named_parameters()]
        opt = HyperSGD(
            net.parameters(),
            lr=0.1,
            momentum=0.9,
            method="forward",
            horizon=len(batches),
            windows=4,
            grad_scaler=scaler,
        )
        opt.register_validation_closure(lambda net=net, xv=xv, yv=yv: cross_entropy(net(xv), yv))
        for x, y in batches:

            def loss_fn(
                params: list[Tensor],
                net: nn.Module = net,
                x: Tensor = x,
                y: Tensor = y,
                names: list[str] = names,
            ) -> Tensor:
                return cross_entropy(
                    functional_call(net, dict(zip(names, params, strict=True)), (x,)), y
                )

            opt.step(loss_fn=loss_fn)
            if scaler is not None:
                scaler.update()
        runs.append((opt.hypergradients()[0]["lr"], [p.detach().clone() for p in net.parameters()]))
    (h_plain, w_plain), (h_scaled, w_scaled) = runs
    assert torch.equal(h_plain, h_scaled)
    for a, b in zip(w_plain, w_scaled, strict=True):
        assert torch.equal(a, b)
