"""``SharedAdam``, the default hyper-optimizer for per-weight learned values (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from hyperopt_optim import SharedAdam

BETAS = (0.9, 0.999)
EPS = 1e-8


def reference(phi: Tensor, grads: list[Tensor], lr: float, deviation_lr: float) -> Tensor:
    """The update written out: Adam on the sum, Adam on the deviations from the mean."""
    phi = phi.clone()
    m_c = v_c = torch.zeros((), dtype=phi.dtype)
    m_d = v_d = torch.zeros_like(phi)
    b1, b2 = BETAS
    for t, g in enumerate(grads, start=1):
        c, d = g.sum(), g - g.mean()
        m_c, v_c = b1 * m_c + (1 - b1) * c, b2 * v_c + (1 - b2) * c * c
        m_d, v_d = b1 * m_d + (1 - b1) * d, b2 * v_d + (1 - b2) * d * d
        shared = (m_c / (1 - b1**t)) / ((v_c / (1 - b2**t)).sqrt() + EPS)
        deviation = (m_d / (1 - b1**t)) / ((v_d / (1 - b2**t)).sqrt() + EPS)
        phi = phi - lr * shared - (deviation_lr * deviation if phi.numel() > 1 else 0)
    return phi


def run(phi: Tensor, grads: list[Tensor], **kwargs: float) -> Tensor:
    x = phi.clone().requires_grad_()
    opt = SharedAdam([x], **kwargs)
    for g in grads:
        x.grad = g.clone()
        opt.step()
    return x.detach()


shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)


@given(shape=shapes, seed=st.integers(0, 2**16), steps=st.integers(1, 6))
def test_matches_the_written_out_update(shape: tuple[int, ...], seed: int, steps: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    phi = torch.randn(shape, generator=gen, dtype=torch.float64)
    scale = 10 ** torch.empty(steps).uniform_(-6, 1, generator=gen)
    grads = [s * torch.randn(shape, generator=gen, dtype=torch.float64) for s in scale]
    got = run(phi, grads, lr=0.05, deviation_lr=0.01)
    torch.testing.assert_close(got, reference(phi, grads, 0.05, 0.01), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_a_single_value_is_adam(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    phi = torch.randn(shape, generator=gen, dtype=torch.float64)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(8)]
    x = phi.clone().requires_grad_()
    adam = torch.optim.Adam([x], lr=0.05)
    for g in grads:
        x.grad = g.clone()
        adam.step()
    torch.testing.assert_close(run(phi, grads), x.detach(), rtol=1e-12, atol=1e-14)


def test_zero_deviation_lr_keeps_the_spread_and_moves_the_shift_by_adam_on_the_sum() -> None:
    gen = torch.Generator().manual_seed(1)
    phi = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(5)]
    got = run(phi, grads, lr=0.05, deviation_lr=0.0)
    torch.testing.assert_close(got - got.mean(), phi - phi.mean(), rtol=0, atol=1e-14)
    shift = run(torch.zeros((), dtype=torch.float64), [g.sum() for g in grads], lr=0.05)
    torch.testing.assert_close(got.mean() - phi.mean(), shift.double(), rtol=1e-6, atol=1e-9)


def test_a_weak_noisy_deviation_moves_less_than_adam_would() -> None:
    """The point of the split: with a shared signal and noise per value, Adam moves every
    value by ~lr per step; SharedAdam moves them together by lr and apart by ≤ deviation_lr."""
    gen = torch.Generator().manual_seed(2)
    phi = torch.zeros(1000, dtype=torch.float64)
    grads = [1e-3 + 1e-2 * torch.randn(1000, generator=gen, dtype=torch.float64) for _ in range(20)]
    shared = run(phi, grads, lr=0.05, deviation_lr=0.01)
    x = phi.clone().requires_grad_()
    adam = torch.optim.Adam([x], lr=0.05)
    for g in grads:
        x.grad = g.clone()
        adam.step()
    assert float(shared.mean()) == pytest.approx(-20 * 0.05, rel=0.05)  # together, full rate
    # deviations move at deviation_lr / lr = 1/5 of Adam's rate (both noise-driven)
    assert float(shared.std()) <= 0.25 * float(x.detach().std())
    assert float(x.detach().mean()) > -0.5  # Adam: the shared signal is lost in the noise


def test_state_dict_resumes_exactly() -> None:
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(6)]
    a = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = SharedAdam([a])
    for g in grads[:3]:
        a.grad = g.clone()
        opt.step()
    b = a.detach().clone().requires_grad_()
    resumed = SharedAdam([b])
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for g in grads[3:]:
        a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        resumed.step()
    assert torch.equal(a, b)


def test_another_optimizers_state_restarts_the_moments() -> None:
    """A state dict of torch.optim.Adam (a checkpoint from before SharedAdam was the default
    for per-weight values) loads; the step then starts SharedAdam's moments afresh, with the
    loaded group's lr (torch's rule: Adam's 1e-3 here) and the default deviation_lr."""
    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([x])
    x.grad = torch.ones(4, dtype=torch.float64)
    adam.step()
    y = x.detach().clone().requires_grad_()
    opt = SharedAdam([y])
    opt.load_state_dict(adam.state_dict())
    g = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    y.grad = g.clone()
    opt.step()
    assert opt.param_groups[0]["lr"] == 1e-3
    torch.testing.assert_close(y.detach(), reference(x.detach(), [g], 1e-3, 0.002))


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"lr": -1.0}, ValueError, "lr"),
        ({"lr": "0.1"}, TypeError, "lr"),
        ({"deviation_lr": float("nan")}, ValueError, "deviation_lr"),
        ({"eps": -1e-8}, ValueError, "eps"),
        ({"betas": (0.9, 1.0)}, ValueError, "betas"),
        ({"betas": (0.9,)}, ValueError, "betas"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        SharedAdam([torch.zeros(3, requires_grad=True)], **kwargs)  # type: ignore[arg-type]
