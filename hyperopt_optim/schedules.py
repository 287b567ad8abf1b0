r"""Schedules: one value per window of a horizon for each learned hyperparameter.

A method that differentiates through many steps (forward mode, Micaelli & Storkey 2021,
arXiv 2007.07869; reversible learning, Maclaurin et al. 2015) learns, for every learned
value, a *schedule* of ``N`` values shared over ``N`` contiguous windows of a horizon of
``T`` steps: step ``t`` of an episode uses value :math:`k(t) = \lfloor N t / T \rfloor`.

:class:`Schedules` is that component, whatever the method:

* the layout: ``values[group][name]`` is one tensor of shape ``(N,)`` of unconstrained values
  ``φ`` per learned value (one per group, or per parameter tensor);
* the current window's value is the learned value the update reads and the param group shows;
  a value written into the group from outside (a scheduler, the user) becomes the window's;
* the position within the episode, and the episode's end;
* the outer update: online, the current window's value steps like any learned value (every
  ``update_interval`` steps); episodic, the whole schedule steps at the end of each episode,
  with the hyper-optimizer (default :class:`~hyperopt_optim.SignStep`, the paper's) and, by
  default, backtracking — an episode that ends worse than the best so far (or diverges) sends
  the schedule back to the best one, which steps again along its hypergradient with halved
  outer steps;
* its part of the optimizer's ``state_dict``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._learned import LearnedValue, clone_values, natural_derivative, to_natural
from .sign_step import SignStep

if TYPE_CHECKING:
    from .hypergradients._base import Host, NaturalHypergradients

__all__ = ["MODES", "ScheduleOptions", "Schedules", "upgrade_state_dict", "window_of"]

MODES = ("online", "episodic")


def window_of(step: int, horizon: int, windows: int) -> int:
    """``k(t) = ⌊N t / T⌋``, held at the last window past the horizon."""
    return min(windows - 1, windows * step // horizon)


@dataclass(frozen=True)
class ScheduleOptions:
    """The checked options of a schedule (:func:`hyperopt_optim._checks.check_schedule_options`).

    Attributes:
        horizon: ``T``, the steps of an episode (online: of the run).
        windows: ``N``, values per learned value over the horizon.
        mode: ``"online"`` or ``"episodic"``.
        update_interval: steps between online hyper-steps (episodic: the horizon).
        backtrack: episodic backtracking.
    """

    horizon: int
    windows: int
    mode: str
    update_interval: int
    backtrack: bool


def _clone(values: list[dict[str, list[Tensor]]] | None) -> list[dict[str, list[Tensor]]] | None:
    return None if values is None else clone_values(values)


class Schedules:
    """The schedules of every param group, the position in the episode and the outer update.

    Args:
        options: the horizon, windows, mode, update interval and backtracking.
        owner: the method's name, for messages.
    """

    def __init__(self, options: ScheduleOptions, owner: str) -> None:
        self.horizon = options.horizon
        self.windows = options.windows
        self.mode = options.mode
        self.update_interval = options.update_interval
        self.backtrack = options.backtrack
        self.owner = owner
        #: per group, name -> one (N,) tensor of φ per learned value
        self.values: list[dict[str, list[Tensor]]] = []
        #: the step within the episode (online: within the run)
        self.position = 0
        self.episodes = 0
        self.loaded_window: int | None = None
        #: episodic backtracking: the best end-of-episode validation loss, its schedules and
        #: their hypergradient
        self.best_loss: float | None = None
        self.best_values: list[dict[str, list[Tensor]]] | None = None
        self.best_natural: NaturalHypergradients | None = None
        self.backtracks = 0

    @property
    def episodic(self) -> bool:
        return self.mode == "episodic"

    # -- the layout ---------------------------------------------------------------------------

    def add_group(self, learned: dict[str, LearnedValue]) -> None:
        """A new param group's schedules, every window at its current value."""
        if self.position != 0:
            raise RuntimeError(
                f"method={self.owner!r} can take a new param group only before the first step "
                "of an episode (the episode's schedules and hypergradients cover the learned "
                "values it started with)"
            )
        self.values.append(
            {
                name: [phi.detach().repeat(self.windows) for phi in lv.phi]
                for name, lv in learned.items()
            }
        )
        self.forget_best()  # its schedules lack the new group

    def stepped_values(self, index: int, learned: dict[str, LearnedValue]) -> list[Tensor]:
        """What the hyper-optimizer steps for group ``index``: the schedules (episodic) or the
        current window's ``φ`` (online)."""
        if self.episodic:
            return [x for xs in self.values[index].values() for x in xs]
        return [phi for lv in learned.values() for phi in lv.phi]

    def zero_hypergradients(self, index: int) -> dict[str, list[Tensor]]:
        return {
            name: [torch.zeros(xs.shape, dtype=torch.float64, device=xs.device) for xs in sched]
            for name, sched in self.values[index].items()
        }

    def natural(
        self, learned: list[dict[str, LearnedValue]]
    ) -> list[dict[str, Tensor | list[Tensor]]]:
        """Every window's value in natural units, shaped as ``schedules()`` returns them."""
        return [
            {
                name: group[name].public([to_natural(x.detach(), group[name].fraction) for x in xs])
                for name, xs in values.items()
            }
            for group, values in zip(learned, self.values, strict=True)
        ]

    # -- the step -----------------------------------------------------------------------------

    def window(self) -> int:
        return window_of(self.position, self.horizon, self.windows)

    def enter_step(self, host: Host, written: set[tuple[int, str]]) -> int:
        """Make the current window's values the learned ones; returns the window.

        ``written`` names the values just written into the param groups from outside: they
        become the current window's.  Episodic, entering a window loads its schedule entry;
        online, a new window starts from the value the window before it ended with.
        """
        window = self.window()
        entering = self.loaded_window != window
        if self.episodic and entering:
            self._show(host, window, keep=written)
        self.loaded_window = window
        if entering or written:
            self.record(host.learned, window)
        return window

    def _show(self, host: Host, window: int, keep: set[tuple[int, str]]) -> None:
        for index, (learned, values) in enumerate(zip(host.learned, self.values, strict=True)):
            for name, lv in learned.items():
                if (index, name) in keep:
                    continue
                sched = values[name]
                if all(bool(phi == x[window]) for phi, x in zip(lv.phi, sched, strict=True)):
                    continue  # unchanged: keep the exact float shown (the user's own at first)
                with torch.no_grad():
                    for phi, x in zip(lv.phi, sched, strict=True):
                        phi.copy_(x[window])
                host.show(index, name)

    def record(self, learned: list[dict[str, LearnedValue]], window: int) -> None:
        """Write the current learned values into ``window``'s entry of the schedules."""
        with torch.no_grad():
            for group, values in zip(learned, self.values, strict=True):
                for name, lv in group.items():
                    for phi, x in zip(lv.phi, values[name], strict=True):
                        x[window] = phi.to(x.dtype)

    def episode_ends(self) -> bool:
        return self.episodic and self.position == self.horizon - 1

    def hyper_step_due(self, step: int) -> bool:
        """Whether this step (index ``step`` of the run) ends with a hyper-step."""
        if self.episodic:
            return self.episode_ends()
        return (step + 1) % self.update_interval == 0

    def advance(self) -> bool:
        """Move to the next step; returns whether the episode just ended (and restarted)."""
        if self.episode_ends():
            self.position = 0
            self.episodes += 1
            self.loaded_window = None
            return True
        self.position += 1
        return False

    # -- the outer update ---------------------------------------------------------------------

    def hyper_step(
        self,
        host: Host,
        window: int,
        hypergradients: Callable[[], NaturalHypergradients | None],
        val_closure: Callable[[], Any],
    ) -> None:
        """Step the schedules along ``hypergradients()`` (``dL/dλ`` of every window's value,
        or ``None`` when it is not finite: nothing moves)."""
        if self.episodic and self.backtrack:
            self._step_with_backtracking(host, hypergradients, val_closure)
            return
        natural = hypergradients()
        if natural is None:
            return
        if self.episodic:
            self.step_values(host, natural)
            return
        current = [{k: [x[window] for x in v] for k, v in g.items()} for g in natural]
        if host.step_learned(current, record=False):
            self.record(host.learned, window)

    def step_values(self, host: Host, natural: NaturalHypergradients) -> None:
        """Episodic: chain each window's ``dL/dλ`` into ``φ`` and step the whole schedule."""
        optimizer = host.hyper_optimizer
        assert optimizer is not None
        for learned, values, grads in zip(host.learned, self.values, natural, strict=True):
            for name, lv in learned.items():
                for sched, h in zip(values[name], grads[name], strict=True):
                    slope = natural_derivative(to_natural(sched.detach(), lv.fraction), lv.fraction)
                    sched.grad = (h.to(sched.device) * slope.to(h.dtype)).to(sched.dtype)
        with torch.no_grad():
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for learned, values in zip(host.learned, self.values, strict=True):
                for name, lv in learned.items():
                    lv.clip_(values[name])
        host.counters["hyper_steps"] += 1

    def _step_with_backtracking(
        self,
        host: Host,
        hypergradients: Callable[[], NaturalHypergradients | None],
        val_closure: Callable[[], Any],
    ) -> None:
        """An episode whose final validation loss is not finite or not below the best
        episode's so far sends the schedule back to that episode's, halves the outer steps
        and steps again from there along that episode's hypergradient (a backtracking line
        search; no episode is spent rerunning the best schedule).  Else, if its hypergradient
        is finite, this episode becomes the best and the schedule steps."""
        loss = host.shared_validation_loss(val_closure)
        best = self.best_loss
        if math.isfinite(loss) and (best is None or loss < best):
            natural = hypergradients()
            if natural is None:  # skipped and counted: this episode cannot be a best
                return
            self.best_loss = loss
            self.best_values = _clone(self.values)
            self.best_natural = natural
            self.step_values(host, natural)
            return
        if self.best_values is None or self.best_natural is None:  # nothing to go back to
            host.skip(f"the episode's validation loss is {loss}")
            return
        with torch.no_grad():
            for values, saved in zip(self.values, self.best_values, strict=True):
                for name, xs in values.items():
                    for x, y in zip(xs, saved[name], strict=True):
                        x.copy_(y)
        optimizer = host.hyper_optimizer
        assert optimizer is not None
        if isinstance(optimizer, SignStep):
            for state in optimizer.state.values():
                if "step_size" in state:
                    state["step_size"].mul_(0.5)
        else:
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * 0.5
        self.backtracks += 1
        warnings.warn(
            f"{host.name}: this episode's validation loss {loss:.6g} is not below the "
            f"best episode's {best:.6g}: the schedule goes back to that episode's and steps "
            "again from there with the outer steps halved (backtrack=False takes the paper's "
            "steps regardless)",
            RuntimeWarning,
            stacklevel=6,
        )
        self.step_values(host, self.best_natural)

    def forget_best(self) -> None:
        """Backtracking starts afresh (the schedules changed shape or value)."""
        self.best_loss = None
        self.best_values = None
        self.best_natural = None

    def restart(self, learned: list[dict[str, LearnedValue]]) -> None:
        """Every window takes the current learned value (torch's own state dict was loaded)."""
        with torch.no_grad():
            for group, values in zip(learned, self.values, strict=True):
                for name, lv in group.items():
                    for phi, x in zip(lv.phi, values[name], strict=True):
                        x.fill_(float(phi))
        self.forget_best()

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "values": _clone(self.values),
            "position": self.position,
            "episodes": self.episodes,
            "loaded_window": self.loaded_window,
            "best_loss": self.best_loss,
            "best_values": _clone(self.best_values),
            "best_natural": _clone(self.best_natural),
            "backtracks": self.backtracks,
        }

    def check_state_dict(self, state: dict[str, Any] | None) -> None:
        """Refuse, before anything loads, a state dict without schedules or with other windows."""
        if state is None:
            raise ValueError(
                f"the state dict has no schedules: it was not saved by method={self.owner!r}"
            )
        mode = state.get("mode")  # 0.1.0 did not save it
        if mode is not None and mode != self.mode:
            raise ValueError(
                f"the state dict's schedules were learned in mode={mode!r}, this optimizer's "
                f"mode is {self.mode!r}"
            )
        for group, saved in zip(self.values, state["values"], strict=True):
            for name, xs in group.items():
                shapes = [tuple(x.shape) for x in saved.get(name, [])]
                if shapes != [tuple(x.shape) for x in xs]:
                    raise ValueError(
                        f"the state dict's schedule of {name!r} has shapes {shapes}, this "
                        f"optimizer's {[tuple(x.shape) for x in xs]}: was it saved with other "
                        "windows?"
                    )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for values, saved in zip(self.values, state["values"], strict=True):
                for name, xs in values.items():
                    for x, y in zip(xs, saved[name], strict=True):
                        x.copy_(y)
        self.position = int(state["position"])
        self.episodes = int(state["episodes"])
        self.loaded_window = state["loaded_window"]
        self.best_loss = state.get("best_loss")
        self.best_values = _clone(state.get("best_values"))
        self.best_natural = _clone(state.get("best_natural"))
        self.backtracks = int(state.get("backtracks", 0))


def upgrade_state_dict(hyper: dict[str, Any]) -> dict[str, Any]:
    """The ``"hyper"`` entry of a state dict saved by 0.1.0, in today's layout.

    0.1.0 kept forward mode's schedules beside the method's state (``hyper["schedules"]``)
    and the schedule's position, episodes and backtracking inside it; today the method's
    state holds the tangents and the schedule's own state (:meth:`Schedules.state_dict`).
    Any other state dict is returned as it is.
    """
    if "schedules" not in hyper:
        return hyper
    hyper = dict(hyper)
    method = dict(hyper["method"])
    values = hyper.pop("schedules")
    schedule = {
        "values": values,
        "position": method.pop("position"),
        "episodes": method.pop("episodes"),
        "loaded_window": method.pop("loaded_window"),
        "best_loss": method.pop("best_loss", None),
        "best_values": method.pop("best_schedules", None),
        "best_natural": method.pop("best_natural", None),
        "backtracks": method.pop("backtracks", 0),
    }
    hyper["method"] = {"tangents": method.get("tangents"), "schedule": schedule}
    return hyper
