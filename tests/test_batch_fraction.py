"""``hvp_batch_fraction``: the series' Hessian-vector products on a part of the step's batch.

The hypergradient with products on the first ``ceil(f·B)`` examples is, exactly, the series
whose Jacobian holds that part's Hessian, while the update and ``∂U/∂λ`` keep the whole
batch's gradient: checked in float64 against a dense closed form, for every provider.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from hyperopt_optim import HyperAdam, HyperSGD

LR = 0.05

# torch.func.hessian warns from inside its own decompositions (not from this package).
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


def _problem(seed: int = 0) -> tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
    xv, yv = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    return model, x, y, xv, yv


def _closure(
    opt: torch.optim.Optimizer, model: nn.Module, x: Tensor, y: Tensor, backward: bool,
    calls: list[float] | None = None,
) -> Callable[..., Tensor]:  # fmt: skip
    """The training closure on the first ``ceil(batch_fraction·B)`` examples: torch's
    (``backward``) or the loss alone; ``calls`` records the fractions it was called with."""

    def closure(batch_fraction: float = 1.0) -> Tensor:
        if calls is not None:
            calls.append(batch_fraction)
        n = math.ceil(batch_fraction * len(x))
        loss = ((model(x[:n]) - y[:n]) ** 2).mean()
        if backward:
            opt.zero_grad()
            loss.backward()
        return loss

    return closure


def _dense_expected(
    model: nn.Module, w0: list[Tensor], x: Tensor, y: Tensor, xv: Tensor, yv: Tensor,
    fraction: float, neumann_steps: int,
) -> float:  # fmt: skip
    """dL_V/dη for one plain SGD step from ``w0``: ``-(v0 Σ_j (I - ηH_f)^j)·g``, with ``g``
    the whole batch's gradient and ``H_f`` the Hessian of the loss on the first part."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in w0]
    sizes = [p.numel() for p in w0]

    def unflat(flat: Tensor) -> dict[str, Tensor]:
        return {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes, strict=True)}

    def loss(flat: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        return ((functional_call(model, unflat(flat), (xb,)) - yb) ** 2).mean()

    n = math.ceil(fraction * len(x))
    flat0 = torch.cat([p.reshape(-1) for p in w0])
    g = torch.func.grad(loss)(flat0, x, y)
    h_part = torch.func.hessian(loss)(flat0, x[:n], y[:n])
    v = torch.func.grad(loss)(flat0 - LR * g, xv, yv)
    jacobian = torch.eye(len(flat0), dtype=torch.float64) - LR * h_part
    total, term = v.clone(), v
    for _ in range(neumann_steps):
        term = term @ jacobian
        total = total + term
    return float(-(total @ g))


@pytest.mark.parametrize(
    ("hvp", "backward", "rtol"),
    [
        ("autograd", False, 1e-10),
        ("auto", False, 1e-10),
        ("finite_difference", True, 1e-6),
        ("forward_difference", True, 1e-4),
        ("finite_difference", False, 1e-6),
    ],
)
@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("neumann_steps", [1, 3])
def test_series_uses_the_part_of_the_batch(
    hvp: str, backward: bool, rtol: float, fraction: float, neumann_steps: int
) -> None:
    model, x, y, xv, yv = _problem()
    opt = HyperSGD(
        model.parameters(), lr=LR, learn="lr", method="ift", neumann_steps=neumann_steps,
        update_interval=1, hvp=hvp, hvp_batch_fraction=fraction,
        hyper_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0),
    )  # fmt: skip
    calls: list[float] = []
    closure = _closure(opt, model, x, y, backward, calls)
    w0 = [p.detach().clone() for p in model.parameters()]
    opt.step(closure, val_closure=lambda: ((model(xv) - yv) ** 2).mean())
    got = float(opt.hypergradients()[0]["lr"])
    expected = _dense_expected(model, w0, x, y, xv, yv, fraction, neumann_steps)
    assert got == pytest.approx(expected, rel=rtol)
    # the step's own evaluation on the whole batch; then what the products needed
    assert calls[0] == 1.0
    parts = calls[1:]
    if fraction == 1.0:
        assert not parts or set(parts) == {1.0}
    else:
        assert set(parts) == {fraction}
        exact = hvp in ("autograd", "auto") and not backward
        central = hvp in ("finite_difference", "auto")
        per_series = 1 if exact else (2 * neumann_steps if central else neumann_steps + 1)
        assert len(parts) == per_series


_PROVIDERS = (("autograd", False), ("finite_difference", True))


def _adam_on_part(hvp: str, backward: bool) -> dict[str, Any]:
    model, x, y, xv, yv = _problem(seed=3)
    opt = HyperAdam(
        model.parameters(), lr=0.01, learn=("lr", "beta1", "beta2"), method="ift",
        update_interval=2, hvp=hvp, hvp_batch_fraction=0.3, granularity="tensor",
    )  # fmt: skip
    closure = _closure(opt, model, x, y, backward)
    for _ in range(6):
        opt.step(closure, val_closure=lambda: ((model(xv) - yv) ** 2).mean())
    return opt.hypergradients()[0]


def test_adam_series_on_part_matches_between_providers() -> None:
    """HyperAdam's full-state series on a part of the batch: exact products and central
    differences agree."""
    results = [_adam_on_part(hvp, backward) for hvp, backward in _PROVIDERS]
    for name in results[0]:
        for a, b in zip(results[0][name], results[1][name], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.5, float("nan")])
def test_bad_fraction_is_a_value_error(value: float) -> None:
    model, *_ = _problem()
    with pytest.raises(ValueError, match="hvp_batch_fraction"):
        HyperSGD(model.parameters(), lr=0.1, method="ift", hvp_batch_fraction=value)


@pytest.mark.parametrize("value", ["0.5", True, None])
def test_fraction_of_the_wrong_type_is_a_type_error(value: Any) -> None:
    model, *_ = _problem()
    with pytest.raises(TypeError, match="hvp_batch_fraction"):
        HyperSGD(model.parameters(), lr=0.1, method="ift", hvp_batch_fraction=value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "greedy"},
        {"method": "hd"},
        {"method": "ift", "neumann_steps": 0},
        {"method": "forward", "horizon": 10},
    ],
)
def test_fraction_without_a_series_is_refused(kwargs: dict[str, Any]) -> None:
    model, *_ = _problem()
    with pytest.raises(ValueError, match=r"hvp_batch_fraction=0\.5 is taken by method='ift'"):
        HyperSGD(model.parameters(), lr=0.1, hvp_batch_fraction=0.5, **kwargs)
    HyperSGD(model.parameters(), lr=0.1, hvp_batch_fraction=1.0, **kwargs)  # the default: fine


def test_closure_without_the_keyword_is_refused_by_name() -> None:
    model, x, y, xv, yv = _problem()
    opt = HyperSGD(model.parameters(), lr=0.1, method="ift", update_interval=1,
                   hvp_batch_fraction=0.5)  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="batch_fraction"):
        opt.step(
            lambda: ((model(x) - y) ** 2).mean(),
            val_closure=lambda: ((model(xv) - yv) ** 2).mean(),
        )
    for p, b in zip(model.parameters(), before, strict=True):  # refused before the update
        assert torch.equal(p.detach(), b)


def test_closure_taking_keywords_is_accepted() -> None:
    model, x, y, xv, yv = _problem()
    opt = HyperSGD(model.parameters(), lr=0.1, method="ift", update_interval=1,
                   hvp_batch_fraction=0.5)  # fmt: skip
    seen: list[dict[str, Any]] = []

    def closure(**kwargs: Any) -> Tensor:
        seen.append(kwargs)
        n = math.ceil(kwargs.get("batch_fraction", 1.0) * len(x))
        return ((model(x[:n]) - y[:n]) ** 2).mean()

    opt.step(closure, val_closure=lambda: ((model(xv) - yv) ** 2).mean())
    assert {"batch_fraction": 0.5} in seen
