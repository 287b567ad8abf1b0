"""State dicts saved by hyperopt_optim 0.1.0 as it was at commit 9b1abf6 (before the
architecture change that moved forward mode out of ``optimizer.py``), and how each run went on.

Each case builds a float64 model and an optimizer, trains ``before`` steps, saves the model's
and the optimizer's state dicts, trains ``after`` more steps and records where it ended.
``tests/data/state_dicts_0.1.0.pt`` holds those records; ``test_legacy_state_dicts.py`` loads
each saved state into a fresh optimizer of today's code, trains the same ``after`` steps and
checks it ends at the same place.

The file was written once, by ``python tests/legacy_state_dicts.py`` at commit 9b1abf6; running
it again writes the records of the code it runs against (so never overwrite the committed file
unless a format change is intended and documented).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hyperopt_optim import HyperAdam, HyperAdamW, HyperOptimizer, HyperSGD

DATA = Path(__file__).resolve().parent / "data" / "state_dicts_0.1.0.pt"


@dataclass(frozen=True)
class LegacyCase:
    name: str
    make: Callable[[list[Tensor]], HyperOptimizer]
    before: int
    after: int
    backward: bool = False  # torch's closure (backward inside) rather than the loss alone
    episode: int | None = None  # episodic forward mode: reload the initial weights every episode
    loss_fn: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)


CASES = (
    LegacyCase(
        "sgd_ift_scalar",
        lambda p: HyperSGD(
            p,
            lr=0.05,
            momentum=0.9,
            weight_decay=1e-3,
            learn=("lr", "momentum", "weight_decay"),
            method="ift",  # the default in 0.1.0
        ),
        before=25,
        after=17,
    ),
    LegacyCase(
        "adam_ift_tensor_fd",
        lambda p: HyperAdam(
            p,
            lr=1e-2,
            betas=(0.9, 0.99),
            learn=("lr", "beta1", "beta2"),
            granularity="tensor",
            method="ift",  # the default in 0.1.0
        ),
        before=23,
        after=19,
        backward=True,
    ),
    LegacyCase(
        "sgd_greedy_element",
        lambda p: HyperSGD(
            p,
            lr=0.05,
            momentum=0.5,
            learn=("lr", "momentum"),
            granularity={"lr": "element"},
            method="greedy",
        ),
        before=21,
        after=20,
    ),
    LegacyCase(
        "adamw_hd",
        lambda p: HyperAdamW(p, lr=1e-2, learn=("lr", "weight_decay"), method="hd"),
        before=7,
        after=6,
        backward=True,
    ),
    LegacyCase(
        "sgd_forward_online_tensor",
        lambda p: HyperSGD(
            p,
            lr=0.05,
            momentum=0.9,
            learn=("lr", "momentum"),
            granularity="tensor",
            method="forward",
            horizon=40,
            windows=4,
            update_interval=5,
        ),
        before=17,
        after=30,
    ),
    LegacyCase(
        "adam_forward_episodic_backtrack",
        lambda p: HyperAdam(
            p,
            lr=0.3,
            learn="lr",
            method="forward",
            horizon=12,
            windows=3,
            mode="episodic",
            hyper_optimizer=lambda xs: torch.optim.SGD(xs, lr=30.0),
        ),
        before=12 * 4 + 5,
        after=12 * 3,
        episode=12,
    ),
    LegacyCase(
        "sgd_forward_episodic_loss_fn",
        lambda p: HyperSGD(
            p,
            lr=0.05,
            momentum=0.9,
            weight_decay=1e-3,
            learn=("lr", "weight_decay"),
            method="forward",
            horizon=10,
            windows=2,
            mode="episodic",
        ),
        before=10 * 2 + 4,
        after=10 * 2,
        episode=10,
        loss_fn=True,
    ),
)


def data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(4, 2, generator=g, dtype=torch.float64))
    return x[:32], y[:32], x[32:], y[32:]


def mse(out: Tensor, target: Tensor) -> Tensor:
    # not nn.functional.mse_loss: torch 2.13's forward-mode AD of its backward fails under
    # torch.func (jvp of grad: "ZeroTensors are immutable"), which loss_fn's products need
    return ((out - target) ** 2).mean()


def model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def train(case: LegacyCase, net: nn.Module, opt: HyperOptimizer, steps: int, start: int) -> None:
    """Steps ``start .. start + steps - 1`` of the case (a batch of 8 chosen by the step)."""
    x, y, xv, yv = data()
    init = {k: v.clone() for k, v in model().state_dict().items()}

    def val_closure() -> Tensor:
        return mse(net(xv), yv)

    for t in range(start, start + steps):
        if case.episode is not None and t % case.episode == 0:
            net.load_state_dict(init)
        rows = slice(8 * (t % 4), 8 * (t % 4) + 8)

        def closure(rows: slice = rows) -> Tensor:
            loss = mse(net(x[rows]), y[rows])
            if case.backward:
                opt.zero_grad()
                loss.backward()
            return loss

        def loss_fn(ps: list[Tensor], rows: slice = rows) -> Tensor:
            names = [name for name, _ in net.named_parameters()]
            out = torch.func.functional_call(net, dict(zip(names, ps, strict=True)), (x[rows],))
            return mse(out, y[rows])

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # backtracking says so
            if case.loss_fn:
                opt.step(loss_fn=loss_fn, val_closure=val_closure)
            else:
                opt.step(closure, val_closure=val_closure)


def outcome(net: nn.Module, opt: HyperOptimizer) -> dict[str, Any]:
    out: dict[str, Any] = {
        "weights": [p.detach().clone() for p in net.parameters()],
        "hyperparameters": opt.hyperparameters(),
        "hypergradients": opt.hypergradients(),
        "hyper_state": opt.hyper_state,
    }
    if opt.method == "forward":
        out["schedules"] = opt.schedules()
    return out


def record() -> dict[str, Any]:
    records = {}
    for case in CASES:
        net = model()
        opt = case.make(list(net.parameters()))
        train(case, net, opt, case.before, 0)
        # deep copies: torch's state dicts hold references to the live buffers
        blob = {"model": copy.deepcopy(net.state_dict())}
        blob["optimizer"] = copy.deepcopy(opt.state_dict())
        train(case, net, opt, case.after, case.before)
        blob["expected"] = outcome(net, opt)
        records[case.name] = blob
    return records


if __name__ == "__main__":
    torch.set_num_threads(1)
    DATA.parent.mkdir(exist_ok=True)
    torch.save(record(), DATA)
    print(f"wrote {DATA}")
