"""A ``torch.compile``-d model with both closure styles.

A compiled model cannot be differentiated twice (AOTAutograd refuses double backward, at the
first backward with a graph when it donated buffers, else at the product itself), so exact
Hessian-vector products are impossible: ``hvp="auto"`` warns once and takes forward finite
differences from then on; ``hvp="autograd"`` asked for by name says what to use instead.  The
fast tests use the ``aot_eager`` backend (AOTAutograd without code generation); the slow one
uses the default (inductor), which needs a C++ compiler.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
import torch._functorch.config
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

from hyperopt_optim import HyperAdam, HyperSGD


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _train(
    backend: str | None, *, backward: bool, steps: int = 12, cls: type = HyperSGD, **kwargs: Any
) -> tuple[nn.Module, Any, list[warnings.WarningMessage]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    model = net if backend is None else torch.compile(net, backend=backend)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    xv, yv = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    opt = cls(net.parameters(), update_interval=5, method="ift", **kwargs)
    opt.register_validation_closure(lambda: cross_entropy(model(xv), yv))

    def closure() -> Tensor:
        loss = cross_entropy(model(x), y)
        if backward:
            opt.zero_grad()
            loss.backward()
        return loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.step(closure)
    return net, opt, _ours(caught)


def _ours(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    """The RuntimeWarnings that are not torch.compile's own notices (on Python 3.13.0 it warns
    on every compilation that its guards may run slower)."""
    return [
        w
        for w in caught
        if issubclass(w.category, RuntimeWarning)
        and not str(w.message).startswith("Guards may run slower")
    ]


def _same_as_eager_differences(net: nn.Module, opt: Any, cls: type = HyperSGD, **kw: Any) -> None:
    eager_net, eager, _ = _train(None, backward=False, cls=cls, hvp="forward_difference", **kw)
    for a, b in zip(net.parameters(), eager_net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        opt.hypergradients()[0]["lr"], eager.hypergradients()[0]["lr"], rtol=1e-3, atol=1e-7
    )


@pytest.mark.parametrize("donated_buffer", [True, False], ids=["donated", "not-donated"])
def test_a_closure_without_backward_falls_back_to_differences_with_one_warning(
    donated_buffer: bool,
) -> None:
    """With donated buffers the first backward with a graph fails; without, the first product:
    either way the run goes on with forward differences and says so once."""
    with torch._functorch.config.patch(donated_buffer=donated_buffer):
        net, opt, caught = _train("aot_eager", backward=False, lr=0.1, momentum=0.9)
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert "double backward" in str(caught[0].message)
    assert "finite differences" in str(caught[0].message)
    assert opt.hvp == "auto"
    assert opt.state_dict()["hyper"]["resolved_hvp"] == "forward_difference"
    assert opt.hyper_state["hyper_steps"] == 2
    assert opt.hyper_state["skipped_hyper_steps"] == 0
    _same_as_eager_differences(net, opt, lr=0.1, momentum=0.9)


def test_torchs_closure_needs_no_fallback() -> None:
    net, opt, caught = _train("aot_eager", backward=True, cls=HyperAdam, lr=0.01)
    assert caught == []
    assert opt.hyper_state["hyper_steps"] == 2
    _same_as_eager_differences(net, opt, cls=HyperAdam, lr=0.01)


def test_exact_products_asked_for_by_name_name_the_fix() -> None:
    with pytest.raises(RuntimeError, match="hvp='finite_difference'"):
        _train("aot_eager", backward=False, lr=0.1, hvp="autograd")


@pytest.mark.slow
def test_inductor() -> None:
    """The default backend (generated C++ on the CPU)."""
    net, opt, caught = _train("inductor", backward=False, lr=0.1, momentum=0.9)
    assert len(caught) == 1
    assert opt.hyper_state["hyper_steps"] == 2
    _same_as_eager_differences(net, opt, lr=0.1, momentum=0.9)


def test_forward_mode_falls_back_at_the_pre_step_point() -> None:
    """Forward mode's snapshot is the live weights (no copy planned); differences that moved
    them moved the point too and gave half the product (they once did).  Against eager central
    differences (what "auto" takes in forward mode), the same run."""
    kwargs: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "horizon": 12, "windows": 3}

    def run(backend: str | None, hvp: str) -> Any:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        model = net if backend is None else torch.compile(net, backend=backend)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        xv, yv = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        opt = HyperSGD(net.parameters(), method="forward", hvp=hvp, **kwargs)
        opt.register_validation_closure(lambda: cross_entropy(model(xv), yv))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(12):
                opt.step(lambda: cross_entropy(model(x), y))
        return opt.hypergradients()[0]["lr"]

    with torch._functorch.config.patch(donated_buffer=False):
        compiled = run("aot_eager", "auto")
    eager = run(None, "finite_difference")
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-7)


def test_the_fallback_is_part_of_the_state_dict() -> None:
    """A resumed run does not try double backward again (warning again, computing the step's
    gradient twice)."""
    net, opt, caught = _train("aot_eager", backward=False, lr=0.1)
    assert len(caught) == 1
    saved = opt.state_dict()
    assert saved["hyper"]["no_double_backward"] is True
    fresh = HyperSGD(net.parameters(), lr=0.1, method="ift", update_interval=5)
    fresh.load_state_dict(saved)
    model = torch.compile(net, backend="aot_eager")
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    fresh.register_validation_closure(lambda: cross_entropy(model(x), y))
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        for _ in range(10):
            fresh.step(lambda: cross_entropy(model(x), y))
    assert _ours(again) == []
    assert fresh.hyper_state["hyper_steps"] == opt.hyper_state["hyper_steps"] + 2
