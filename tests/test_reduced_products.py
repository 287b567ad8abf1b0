"""The hyper-step's lean arithmetic: ``∂U/∂λ`` products summed piece by piece as they are
made (``GroupSnapshot.reduced_hyper_vjp``) give the hypergradients of the whole-tensor
products, for every rule, granularity and layout (a parameter that is not contiguous stays
whole), and the series' sum kept in its own terms' tensors leaves the caller's gradients
alone where autograd returns them expanded."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from hyperopt_optim import HyperAdam, HyperAdamW, HyperSGD
from hyperopt_optim.hypergradients import _base

SGD_ALL = ("lr", "momentum", "weight_decay")
ADAM_ALL = ("lr", "beta1", "beta2", "eps", "weight_decay")
CASES = [
    (HyperSGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}, SGD_ALL),
    (HyperSGD, {"lr": 0.05, "momentum": 0.8, "nesterov": True}, ("lr", "momentum")),
    (HyperAdam, {"lr": 0.01, "weight_decay": 0.01, "amsgrad": True}, ADAM_ALL),
    (HyperAdamW, {"lr": 0.01, "weight_decay": 0.01}, ("lr", "eps", "weight_decay")),
]


class _Model(nn.Module):
    """Two layers, the first weight a transposed (non-contiguous) tensor."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(7, 5, generator=gen, dtype=torch.float64).t())
        self.b1 = nn.Parameter(torch.randn(7, generator=gen, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(2, 7, generator=gen, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w1 + self.b1) @ self.w2.t()


def _run(cls: type, kwargs: dict[str, Any], learn: tuple[str, ...], granularity: str,
         method: str) -> list[dict[str, Any]]:  # fmt: skip
    model = _Model()
    assert not model.w1.is_contiguous()
    gen = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(16, 5, generator=gen, dtype=torch.float64),
        torch.randn(16, 2, generator=gen, dtype=torch.float64),
    )
    xv, yv = (
        torch.randn(8, 5, generator=gen, dtype=torch.float64),
        torch.randn(8, 2, generator=gen, dtype=torch.float64),
    )
    opt = cls(model.parameters(), **kwargs, learn=learn, granularity=granularity, method=method,
              update_interval=2, hvp="autograd")  # fmt: skip
    for _ in range(6):
        opt.step(
            lambda: ((model(x) - y) ** 2).mean(), val_closure=lambda: ((model(xv) - yv) ** 2).mean()
        )
    return [
        opt.hypergradients(),
        opt.hyperparameters(),
        [p.detach().clone() for p in model.parameters()],
    ]


@pytest.mark.parametrize(
    ("cls", "kwargs", "learn"), CASES, ids=["sgd", "nesterov", "adam", "adamw"]
)
@pytest.mark.parametrize("granularity", ["scalar", "tensor", "element"])
@pytest.mark.parametrize("method", ["greedy", "ift"])
def test_pieces_give_the_whole_products(
    monkeypatch: pytest.MonkeyPatch, cls: type, kwargs: dict[str, Any], learn: tuple[str, ...],
    granularity: str, method: str,
) -> None:  # fmt: skip
    whole = _run(cls, kwargs, learn, granularity, method)  # the groups are below one piece
    monkeypatch.setattr(_base, "REDUCE_CHUNK", 3)  # pieces of 3 elements, and slices of tensors
    pieces = _run(cls, kwargs, learn, granularity, method)
    for got_group, want_group in zip(pieces[0], whole[0], strict=True):
        for name, want in want_group.items():
            got = got_group[name]
            if isinstance(want, Tensor):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
            else:
                for g, w in zip(got, want, strict=True):
                    torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-15)
    for got, want in zip(pieces[2], whole[2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_pieces_cover_every_element_once() -> None:
    numels = [10, 1, 0, 7, 4]
    calls = _base._pieces(numels, [True, True, True, False, True], 3)
    covered = [[0] * n for n in numels]
    for call in calls:
        assert sum(b - a for _, a, b in call) <= 3 or len(call) == 1
        for i, a, b in call:
            for k in range(a, b):
                covered[i][k] += 1
    assert all(c == [1] * n for c, n in zip(covered, numels, strict=True))
    assert (3, 0, 7) in [piece for call in calls for piece in call]  # not sliceable: whole


def test_series_sum_does_not_write_into_an_expanded_gradient() -> None:
    """The validation gradient of a sum is an expanded tensor (one element in memory): the
    series accumulates in a copy of it."""
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    opt = HyperSGD([w], lr=0.1, momentum=0.5, learn=("lr", "momentum"), method="ift",
                   update_interval=1, neumann_steps=2, hvp="autograd")  # fmt: skip
    val = torch.autograd.grad(w.sum(), w)[0]
    assert val.stride() == (0,)  # what autograd gives for a sum
    for _ in range(3):
        opt.step(lambda: ((w * x) ** 2).sum(), val_closure=lambda: w.sum())
    assert all(torch.isfinite(v).all() for v in opt.hypergradients()[0].values())
