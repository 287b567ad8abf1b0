"""torch's learning-rate schedulers with learned values, one kind at a time.

- Chainable (StepLR, ExponentialLR, CosineAnnealingLR, MultiplicativeLR): each write scales the
  value in the group, which is the learned one, so learning and the schedule compose.
- ReduceLROnPlateau: a rare chainable write (times ``factor``), taken up the same way.
- Absolute (OneCycleLR, CyclicLR, LambdaLR): each write is the schedule's own value, which
  throws away what the hyper-step learned.  Written on every step, that is said once with a
  warning, and the hyper-steps whose result would be thrown away are not taken (counted);
  they resume once a step comes without a write.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy
from torch.optim import lr_scheduler

from hyperopt_optim import HyperAdam, HyperOptimizer, HyperSGD
from hyperopt_optim._writes import UNDONE

STEPS = 200


class Run:
    """A small classifier trained for ``STEPS`` steps with a scheduler stepped every step."""

    def __init__(
        self,
        make_scheduler: Callable[[Any], Any] | None,
        *,
        cls: type = HyperSGD,
        steps: int = STEPS,
        write: Callable[[Any, int], None] | None = None,
        **kwargs: Any,
    ) -> None:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(64, 6, generator=gen), torch.randint(0, 3, (64,), generator=gen)
        xv, yv = torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        hyper = issubclass(cls, HyperOptimizer)
        if hyper:
            kwargs = {"update_interval": 5, **kwargs}
        opt = cls(net.parameters(), **kwargs)
        self.validations = 0

        def val_closure() -> Tensor:
            self.validations += 1
            return cross_entropy(net(xv), yv)

        if hyper:
            opt.register_validation_closure(val_closure)
        scheduler = None if make_scheduler is None else make_scheduler(opt)
        self.lrs: list[float] = []
        self.before_scheduler: list[float] = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for t in range(steps):
                self.lrs.append(opt.param_groups[0]["lr"])

                def closure() -> Tensor:
                    opt.zero_grad()
                    loss = cross_entropy(net(x), y)
                    loss.backward()
                    return loss

                loss = opt.step(closure)
                self.before_scheduler.append(opt.param_groups[0]["lr"])
                if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(float(loss) + t)  # a rising loss: a plateau every step
                elif scheduler is not None:
                    scheduler.step()
                if write is not None:
                    write(opt, t)
        self.warnings = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        self.opt = opt


def _overridden_warnings(run: Run) -> list[str]:
    return [m for m in run.warnings if "overwrites the learned" in m]


ABSOLUTE = {
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(
        opt, max_lr=0.5, total_steps=STEPS, cycle_momentum=False
    ),
    "CyclicLR": lambda opt: lr_scheduler.CyclicLR(
        opt, base_lr=0.01, max_lr=0.5, step_size_up=50, cycle_momentum=False
    ),
    "LambdaLR": lambda opt: lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t)),
}


@pytest.mark.parametrize("kind", ABSOLUTE)
def test_an_absolute_scheduler_is_said_once_and_its_thrown_away_hyper_steps_are_not_paid(
    kind: str,
) -> None:
    learning = Run(ABSOLUTE[kind], lr=0.1)
    fixed = Run(ABSOLUTE[kind], cls=torch.optim.SGD, lr=0.1)
    assert len(_overridden_warnings(learning)) == 1
    assert "'lr' of param group 0" in _overridden_warnings(learning)[0]
    state = learning.opt.hyper_state
    # three hyper-steps are undone before it is recognised; after that only the probes are
    # taken (after 2, 4, 8, ... skipped ones), and every other one is not
    probes = len([k for k in range(1, 8) if sum(2**j for j in range(1, k + 1)) + k <= 40])
    assert UNDONE <= state["hyper_steps"] <= UNDONE + 1 + probes
    assert state["overridden_hyper_steps"] == STEPS // 5 - state["hyper_steps"]
    assert state["overridden_hyper_steps"] >= STEPS // 5 - UNDONE - 1 - probes
    assert learning.validations == state["hyper_steps"]
    # the lr each step used is the schedule's, exactly as with torch's SGD: the learning
    # was thrown away
    assert learning.lrs == fixed.lrs


def test_cycle_momentum_overwrites_both_learned_values() -> None:
    run = Run(
        lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=STEPS),
        lr=0.1,
        momentum=0.9,
        learn=("lr", "momentum"),
    )
    messages = " ".join(_overridden_warnings(run))
    assert "'lr' of param group 0" in messages
    assert "'momentum' of param group 0" in messages
    assert len(_overridden_warnings(run)) <= 2  # once for each
    # the cycle's turn (at 30% of the steps) can make a write look chainable and restart the
    # count once; every hyper-step after the recognition is skipped
    state = run.opt.hyper_state
    assert state["overridden_hyper_steps"] > 0
    assert state["hyper_steps"] + state["overridden_hyper_steps"] == STEPS // 5


def test_a_value_not_overwritten_keeps_learning() -> None:
    """OneCycleLR without cycle_momentum overwrites the lr only: the learned momentum still
    needs its hyper-steps, so they are taken (and the lr's warning given)."""
    run = Run(ABSOLUTE["OneCycleLR"], lr=0.1, momentum=0.9, learn=("lr", "momentum"))
    assert len(_overridden_warnings(run)) == 1
    assert run.opt.hyper_state["hyper_steps"] == STEPS // 5
    assert run.opt.hyper_state["overridden_hyper_steps"] == 0


def test_hyper_steps_resume_when_the_writes_stop() -> None:
    def write(opt: Any, t: int) -> None:
        if t < 30:
            opt.param_groups[0]["lr"] = 0.05 + 0.001 * t  # absolute, every step

    run = Run(None, write=write, lr=0.05)
    state = run.opt.hyper_state
    # skipped from the fourth hyper-step until a probe finds its move kept (by step 45)
    assert 1 <= state["overridden_hyper_steps"] <= 5
    assert state["hyper_steps"] + state["overridden_hyper_steps"] == STEPS // 5
    assert len(set(run.lrs[50:])) >= (STEPS - 50) // 5  # learning again: every hyper-step moves it


CHAINABLE = {
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=20, gamma=0.5),
    "ExponentialLR": lambda opt: lr_scheduler.ExponentialLR(opt, gamma=0.99),
    "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
    "MultiplicativeLR": lambda opt: lr_scheduler.MultiplicativeLR(opt, lambda t: 0.98),
    "ReduceLROnPlateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, factor=0.97, patience=0),
}


TORCH = {HyperSGD: torch.optim.SGD, HyperAdam: torch.optim.Adam}


@pytest.mark.parametrize("kind", CHAINABLE)
@pytest.mark.parametrize("cls", [HyperSGD, HyperAdam])
def test_a_chainable_scheduler_composes_with_learning(kind: str, cls: type) -> None:
    lr = 0.1 if cls is HyperSGD else 0.01
    learning = Run(CHAINABLE[kind], cls=cls, lr=lr)
    fixed = Run(CHAINABLE[kind], cls=TORCH[cls], lr=lr)
    assert _overridden_warnings(learning) == []
    assert learning.opt.hyper_state["hyper_steps"] == STEPS // 5
    assert learning.opt.hyper_state["overridden_hyper_steps"] == 0
    # every write scaled the learned value by the schedule's own factor for that step
    for t in range(STEPS - 1):
        factor = fixed.lrs[t + 1] / fixed.before_scheduler[t]
        torch.testing.assert_close(
            learning.lrs[t + 1], learning.before_scheduler[t] * factor, rtol=1e-9, atol=0.0
        )
    assert learning.lrs != fixed.lrs  # and the hyper-steps moved it


def test_step_lr_halves_the_learned_value_at_its_boundary() -> None:
    run = Run(CHAINABLE["StepLR"], lr=0.1)
    assert run.lrs[20] == run.before_scheduler[19] * 0.5
    assert run.lrs[40] == run.before_scheduler[39] * 0.5


EVERY_STEP = {
    "ExponentialLR": lambda opt: lr_scheduler.ExponentialLR(opt, gamma=0.99),
    "LinearLR": lambda opt: lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=100),
    "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
    "SequentialLR": lambda opt: lr_scheduler.SequentialLR(
        opt,
        [
            lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=20),
            lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS - 20),
        ],
        milestones=[20],
    ),
}


@pytest.mark.parametrize("kind", EVERY_STEP)
@pytest.mark.parametrize(
    "kwargs",
    [{"method": "hd", "update_interval": None}, {"method": "greedy", "update_interval": 1}],
    ids=["hd", "greedy-every-step"],
)
def test_a_chainable_scheduler_with_a_hyper_step_every_step_is_not_taken_for_absolute(
    kind: str, kwargs: dict[str, Any]
) -> None:
    """A write on the step after every hyper-step: the schedule's own shift is only known from
    writes already judged, and warm-up then cosine turns fast.  Such schedules must not be
    taken for absolute (they once were, and learning stopped)."""
    run = Run(EVERY_STEP[kind], lr=0.05, **kwargs)
    assert _overridden_warnings(run) == []
    assert run.opt.hyper_state["overridden_hyper_steps"] == 0


def test_an_absolute_scheduler_that_writes_a_constant_is_recognised() -> None:
    """Warm-up, then the same value written on every step (LambdaLR's constant schedule with
    warm-up): the writes after the warm-up change nothing but undo every hyper-step."""
    run = Run(lambda opt: lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 10)), lr=0.05)
    assert len(_overridden_warnings(run)) == 1
    assert run.opt.hyper_state["overridden_hyper_steps"] > STEPS // 5 // 2
