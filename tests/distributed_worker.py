"""The data-parallel scenarios of tests/test_distributed.py, run by every rank of a gloo group.

Each scenario trains a small float64 MLP from the same initial weights on every rank, each rank
on its own shard of the training batches and of the validation set (the halves of one set), and
saves what it ended with; the tests compare the ranks, and some scenarios against one process
trained on the whole of every batch (the mean over equal shards is the whole batch's mean).
"""

from __future__ import annotations

import math
import os
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.functional import cross_entropy
from torch.nn.parallel import DistributedDataParallel

from hyperopt_optim import HyperAdam, HyperAdamW, HyperSGD

STEPS = 12
WORLD = 2
BATCH = 8  # per rank


@dataclass(frozen=True)
class Scenario:
    name: str
    cls: type = HyperSGD
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: "backward" (torch's closure through DDP), "loss" (returns the loss), "loss_fn", "none"
    #: (backward() before a step() without a closure)
    closure: str = "backward"
    ddp: bool = True
    #: a step at which rank 1's validation loss is NaN
    nan_validation_at: int | None = None
    #: a step at which the training loss rank 1's closure returns is NaN (its gradient is not)
    nan_training_at: int | None = None
    #: the closure returns the loss as a Python float
    float_loss: bool = False
    #: compared with one process trained on the whole batches
    reference: bool = False
    #: the training loss reads loss hyperparameters (a log weight decay, and one per weight of
    #: the first layer) that the optimizer learns; they end the run with the weights
    loss_hyper: bool = False


SGD = {"lr": 0.05, "momentum": 0.9, "update_interval": 4}
ADAM = {"lr": 0.01, "update_interval": 4}

SCENARIOS = [
    Scenario("sgd-greedy-backward", kwargs={**SGD, "learn": ("lr", "momentum")}, reference=True),
    Scenario("sgd-ift-autograd", kwargs={**SGD, "method": "ift"}, closure="loss", reference=True),
    Scenario("sgd-ift-central-differences", kwargs={**SGD, "method": "ift"}, reference=True),
    Scenario(
        "sgd-ift-forward-differences",
        kwargs={**SGD, "method": "ift", "hvp": "forward_difference", "weight_decay": 1e-3},
    ),
    Scenario(
        "sgd-ift-differences-of-loss",
        kwargs={**SGD, "method": "ift", "hvp": "finite_difference"},
        closure="loss",
    ),
    Scenario(
        "adam-ift-element",
        HyperAdam,
        {**ADAM, "method": "ift", "granularity": "element"},
        closure="loss",
        reference=True,
    ),
    Scenario(
        "adamw-ift-tensor",
        HyperAdamW,
        {**ADAM, "method": "ift", "granularity": "tensor", "learn": ("lr", "weight_decay")},
    ),
    Scenario("sgd-hd", kwargs={**SGD, "method": "hd", "update_interval": None}, reference=True),
    Scenario(
        "sgd-forward-online",
        kwargs={**SGD, "method": "forward", "horizon": STEPS, "windows": 3, "hvp": "autograd"},
        closure="loss",
        reference=True,
    ),
    Scenario(
        "sgd-forward-episodic-loss-fn",
        kwargs={
            **SGD,
            "method": "forward",
            "horizon": 4,
            "windows": 2,
            "mode": "episodic",
            "update_interval": None,
            "hvp": "autograd_batched",
        },
        closure="loss_fn",
    ),
    Scenario(
        "sgd-forward-differences",
        kwargs={**SGD, "method": "forward", "horizon": STEPS, "windows": 2},
    ),
    Scenario(
        "sgd-keep-best-nan-validation",
        kwargs={**SGD, "method": "ift", "keep_best": True},
        closure="loss",
        nan_validation_at=7,
    ),
    Scenario("guard-float-loss-nan-on-one-rank", kwargs=SGD, nan_training_at=5, float_loss=True),
    Scenario("not-ddp", kwargs=SGD, ddp=False),
    Scenario("not-ddp-no-closure", kwargs=SGD, ddp=False, closure="none"),
    Scenario("sgd-greedy-no-closure", kwargs=SGD, closure="none", reference=True),
    Scenario(
        "sgd-ift-loss-hyperparameters-differences",
        kwargs={**SGD, "method": "ift"},
        reference=True,
        loss_hyper=True,
    ),
    Scenario(
        "adam-greedy-loss-hyperparameters-autograd",
        HyperAdam,
        ADAM,
        closure="loss",
        reference=True,
        loss_hyper=True,
    ),
]


def data(seed: int = 1) -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    """Every step's whole batch (both ranks' shards) and the whole validation set."""
    gen = torch.Generator().manual_seed(seed)
    batches = [
        (
            torch.randn(WORLD * BATCH, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (WORLD * BATCH,), generator=gen),
        )
        for _ in range(STEPS)
    ]
    val = (
        torch.randn(WORLD * 12, 4, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (WORLD * 12,), generator=gen),
    )
    return batches, val


def shard(x: Tensor, rank: int, world: int) -> Tensor:
    n = x.shape[0] // world
    return x[rank * n : (rank + 1) * n]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def train(scenario: Scenario, rank: int, world: int) -> dict[str, Any]:
    """Train ``scenario`` on shard ``rank`` of ``world`` (``world=1``: the whole batches)."""
    net = model()
    wrapped: nn.Module = DistributedDataParallel(net) if scenario.ddp and world > 1 else net
    mus: list[Tensor] = []
    kwargs = dict(scenario.kwargs)
    if scenario.loss_hyper:
        mus = [
            torch.full((), math.log(1e-2), dtype=torch.float64, requires_grad=True),
            torch.full_like(net[0].weight, math.log(1e-2)).requires_grad_(),
        ]
        kwargs["loss_hyperparameters"] = mus
        kwargs["loss_hyper_optimizer"] = lambda xs: torch.optim.Adam(xs, lr=0.1)
    opt = scenario.cls(net.parameters(), **kwargs)

    def penalty() -> Tensor | float:
        if not mus:
            return 0.0
        square = sum((p**2).sum() for p in net.parameters())
        return mus[0].exp() * square + 0.5 * (mus[1].exp() * net[0].weight ** 2).sum()

    batches, (xv, yv) = data()
    xv, yv = shard(xv, rank, world), shard(yv, rank, world)
    step = [0]

    def val_closure() -> Tensor:
        loss = cross_entropy(net(xv), yv)
        if step[0] == scenario.nan_validation_at and rank == 1:
            return loss * math.nan
        return loss

    opt.register_validation_closure(val_closure)
    names = [name for name, _ in net.named_parameters()]
    for t in range(STEPS):
        step[0] = t
        x, y = (shard(z, rank, world) for z in batches[t])
        if scenario.closure == "loss_fn":

            def loss_fn(params: list[Tensor], x: Tensor = x, y: Tensor = y) -> Tensor:
                out = functional_call(net, dict(zip(names, params, strict=True)), (x,))
                return cross_entropy(out, y)

            opt.step(loss_fn=loss_fn)
            continue

        def closure(x: Tensor = x, y: Tensor = y, t: int = t) -> Any:
            loss = cross_entropy(wrapped(x), y) + penalty()
            if scenario.closure in ("backward", "none"):
                opt.zero_grad()
                loss.backward()
            if t == scenario.nan_training_at and rank == 1:  # the loss it reports, not its
                loss = loss.detach() * math.nan  # gradient: only rank 1's guard sees it
            return float(loss) if scenario.float_loss else loss

        if scenario.closure == "none":  # torch's usual loop: backward, then step()
            closure()
            opt.step()
        else:
            opt.step(closure)
    return {
        "weights": [p.detach().clone() for p in [*net.parameters(), *mus]],
        "learned": opt.hyperparameters(),
        "hyper_state": opt.hyper_state,
        "best": opt.best_validation_loss if scenario.kwargs.get("keep_best") else None,
    }


def worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: every scenario in turn; an error is saved as its outcome."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for scenario in SCENARIOS:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    outcome = train(scenario, rank, world)
            except Exception as err:  # the test reads it
                outcome = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
            torch.save(outcome, Path(out) / f"{scenario.name}-{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # no interpreter teardown, where gloo's threads can abort a busy process


def by_name() -> dict[str, Scenario]:
    return {s.name: s for s in SCENARIOS}


Run = Callable[[Scenario, int, int], dict[str, Any]]
