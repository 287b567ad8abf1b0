"""Argument checks shared by every optimizer, method and component.

Bad input gets a ``ValueError`` or ``TypeError`` that names the argument and the value.  The
optimizer classes check torch's own arguments here (:func:`check_torch_flags`,
:func:`check_real`), :class:`~hyperopt_optim.optimizer.HyperOptimizer` the hypergradient
arguments, and each hypergradient method the options it owns (:func:`check_neumann_steps`,
:func:`check_schedule_options`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, cast

from torch import Tensor
from torch.optim import Optimizer

from ._learned import GRANULARITIES, Granularity, LearnedValue, to_unconstrained
from .rules._base import Parametrisation
from .schedules import MODES, ScheduleOptions

if TYPE_CHECKING:
    from .hypergradients._base import HypergradientMethod

__all__ = [
    "CLAMP_NAMES",
    "DEFAULT_WINDOWS",
    "check_bool",
    "check_bounds",
    "check_callable",
    "check_choice",
    "check_clamps",
    "check_fused",
    "check_granularity",
    "check_learn",
    "check_learnable_value",
    "check_neumann_steps",
    "check_positive_int",
    "check_real",
    "check_saved_shapes",
    "check_schedule_options",
    "check_state_dict_entries",
    "check_torch_flags",
    "check_training_loss",
    "check_validation_loss",
    "is_int",
]

DEFAULT_WINDOWS = 10
CLAMP_NAMES = ("grad", "tangent")


def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# -- torch's own arguments -------------------------------------------------------------------


def check_real(argument: str, value: object, where: str = "") -> float:
    """A real number (a float, an int or a 0-dim real tensor), else a TypeError."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{where}{argument} must be a real number, got {value!r}")
    if math.isnan(value):
        raise ValueError(f"{where}{argument} must be a number, got {value!r}")
    return float(value)


def check_bool(argument: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{argument} must be a bool, got {value!r}")
    return value


def check_torch_flags(flags: Mapping[str, object], foreach: object) -> None:
    """torch's structural flags: ``flags`` must be bools, ``foreach`` None or a bool."""
    for name, flag in flags.items():
        check_bool(name, flag)
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"foreach must be None or a bool, got {foreach!r}")


def check_fused(owner: str, fused: object) -> None:
    """``fused`` must be unset: no fused kernel."""
    if fused:
        raise ValueError(f"fused={fused!r} is not supported: {owner} has no fused kernel")


def check_callable(argument: str, value: object) -> None:
    if not callable(value):
        raise TypeError(f"{argument} must be callable, got {value!r}")


def check_hvp_batch_fraction(value: object, method: HypergradientMethod) -> float:
    """``hvp_batch_fraction``: a number in (0, 1]; below 1 only where products are taken on
    a step's batch by a closure (``method="ift"``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"hvp_batch_fraction must be a number in (0, 1], got {value!r}")
    fraction = float(value)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"hvp_batch_fraction must be in (0, 1], got {value!r}")
    if fraction < 1.0 and (method.name != "ift" or method.neumann_steps == 0):
        raise ValueError(
            f"hvp_batch_fraction={value!r} is taken by method='ift' with neumann_steps > 0 "
            f"(the Hessian-vector products of its series), not method={method.name!r} with "
            f"neumann_steps={method.neumann_steps}"
        )
    return fraction


def check_batch_fraction_closure(closure: object) -> None:
    """With ``hvp_batch_fraction`` below 1, the training closure is called as
    ``closure(batch_fraction=f)`` for the products: it must take that keyword."""
    try:
        signature = inspect.signature(closure)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return  # a builtin or C callable: let the call say
    params = signature.parameters
    if "batch_fraction" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    ):
        return
    raise TypeError(
        "hvp_batch_fraction < 1 calls the training closure as closure(batch_fraction=f) for "
        "the Hessian-vector products, evaluating the loss on that fraction of the batch (e.g. "
        "its first ceil(f * len(batch)) examples), but this closure takes no batch_fraction "
        "keyword: def closure(batch_fraction=1.0): ..."
    )


def check_divergence_guard(value: object, method: HypergradientMethod) -> bool:
    """Whether the guard is on: ``None`` means on wherever the method allows it."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"divergence_guard must be True, False or None, got {value!r}")
    if value and not method.restartable:
        raise ValueError(
            f"divergence_guard=True is not available with method={method.name!r}: restoring "
            "the weights would break what the method carries from step to step"
        )
    return method.restartable if value is None else value


def check_keep_best(value: object, method: HypergradientMethod) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"keep_best must be True or False, got {value!r}")
    if value and not method.uses_validation:
        raise ValueError(
            f"keep_best=True needs a method that evaluates a validation loss, not "
            f"method={method.name!r}"
        )
    return value


def check_choice(argument: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{argument} must be one of {choices}, got {value!r}")
    return value


def check_positive_int(argument: str, value: object, default: int) -> int:
    if value is None:
        return default
    if not is_int(value) or cast(int, value) < 1:
        raise ValueError(f"{argument} must be an integer >= 1, got {value!r}")
    return cast(int, value)


# -- what is learned ---------------------------------------------------------------------------


def check_learn(
    learn: object, learnable: tuple[str, ...], *, allow_empty: bool = False
) -> tuple[str, ...]:
    """``learn`` as a tuple of learnable names; empty only where ``allow_empty`` (the optimizer
    has loss hyperparameters to learn instead)."""
    names = (learn,) if isinstance(learn, str) else learn
    if not isinstance(names, Iterable):
        raise TypeError(f"learn must be a name or a sequence of names, got {learn!r}")
    names = tuple(names)
    if not names and not allow_empty:
        raise ValueError(
            f"learn must name at least one of {learnable}, got {learn!r} (learn=() is allowed "
            "with loss_hyperparameters=[...])"
        )
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"learn must hold names (str), got {name!r} in {learn!r}")
        if name not in learnable:
            hint = " (Adam's betas are learned as 'beta1' and 'beta2')" if name == "betas" else ""
            raise ValueError(
                f"learn: {name!r} is not learnable here; choose from {learnable}{hint}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"learn names a hyperparameter twice: {learn!r}")
    return names


def check_granularity(
    granularity: object, learn: tuple[str, ...]
) -> Granularity | dict[str, Granularity]:
    """One granularity for every learned name, or a mapping ``{name: granularity}``.

    Names the mapping leaves out are ``"scalar"``; names it gives must be learned.
    """
    if isinstance(granularity, str):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        return cast(Granularity, granularity)
    if not isinstance(granularity, Mapping):
        raise TypeError(
            f"granularity must be a string or a mapping from learned names to strings, "
            f"got {granularity!r}"
        )
    out: dict[str, Granularity] = {}
    for name, value in granularity.items():
        if name not in learn:
            raise ValueError(
                f"granularity names {name!r}, which is not learned; learn is {list(learn)}"
            )
        if value not in GRANULARITIES:
            raise ValueError(f"granularity[{name!r}] must be one of {GRANULARITIES}, got {value!r}")
        out[name] = cast(Granularity, value)
    return {name: out.get(name, "scalar") for name in learn}


def check_bounds(
    bounds: Mapping[str, tuple[float, float]] | None,
    parametrisation: Mapping[str, Parametrisation],
) -> dict[str, tuple[float, float]]:
    out = {name: (p.low, p.high) for name, p in parametrisation.items()}
    if bounds is None:
        return out
    if not isinstance(bounds, Mapping):
        raise TypeError(f"bounds must be a mapping from name to (low, high), got {bounds!r}")
    for name, pair in bounds.items():
        if name not in parametrisation:
            raise ValueError(
                f"bounds: {name!r} is not learnable here; choose from {tuple(parametrisation)}"
            )
        try:
            low, high = (float(x) for x in pair)
        except (TypeError, ValueError):
            raise TypeError(f"bounds[{name!r}] must be a pair of numbers, got {pair!r}") from None
        fraction = parametrisation[name].fraction
        top = 1.0 if fraction else math.inf
        if not (0 < low < high < top):
            raise ValueError(
                f"bounds[{name!r}] must satisfy 0 < low < high{' < 1' if fraction else ''}, "
                f"got {pair!r}"
            )
        out[name] = (low, high)
    return out


def check_learnable_value(
    name: str, value: float, bounds: tuple[float, float], fraction: bool, group: int
) -> None:
    low, high = bounds
    if not (low <= value <= high):
        kind = "a fraction in (0, 1)" if fraction else "positive"
        raise ValueError(
            f"param group {group}: {name}={value!r} cannot be learned: a learned {name} must be "
            f"{kind} and within its bounds [{low:g}, {high:g}] (set bounds={{{name!r}: (low, "
            f"high)}} to change them)"
        )


# -- the methods' options ----------------------------------------------------------------------


def check_neumann_steps(value: object, method: str, default: int) -> int:
    """``K``: ``default`` when not given; a method whose default is 0 takes none."""
    if value is None:
        return default
    if not is_int(value) or cast(int, value) < 0:
        raise ValueError(f"neumann_steps must be an integer >= 0, got {value!r}")
    if default == 0 and value != 0:
        raise ValueError(f"method={method!r} takes no Neumann terms, got neumann_steps={value!r}")
    return cast(int, value)


def check_schedule_options(
    method: str,
    granularity: Granularity | dict[str, Granularity],
    horizon: object,
    windows: object,
    mode: object,
    update_interval: object,
    clamps: object,
    backtrack: object,
    *,
    default_update_interval: int,
) -> tuple[ScheduleOptions, tuple[float | None, float | None]]:
    """The options of a method that learns schedules over windows (``method="forward"``), and
    its clamps (:func:`check_clamps`)."""
    grans = [granularity] if isinstance(granularity, str) else list(granularity.values())
    if "element" in grans:
        raise ValueError(
            f"method={method!r} does not learn per-weight values (granularity 'element'): it "
            "carries one tangent the size of the whole optimizer state per learned value, so a "
            "value per weight would need memory of the number of weights squared; use "
            "granularity 'scalar' or 'tensor', or method='ift' for per-weight values"
        )
    if horizon is None:
        raise ValueError(
            f"method={method!r} needs horizon: the number of steps of the run (online) or of "
            "each episode (episodic), over which the windows are laid"
        )
    if not is_int(horizon) or cast(int, horizon) < 1:
        raise ValueError(f"horizon must be an integer >= 1, got {horizon!r}")
    h = cast(int, horizon)
    if windows is None:
        windows = min(DEFAULT_WINDOWS, h)
    if not is_int(windows) or not 1 <= cast(int, windows) <= h:
        raise ValueError(f"windows must be an integer in [1, horizon={h}], got {windows!r}")
    mode = check_choice("mode", "online" if mode is None else mode, MODES)
    if mode == "episodic" and update_interval is not None:
        raise ValueError(
            f"update_interval={update_interval!r} does not apply to mode='episodic': the "
            "schedule is updated once, at the end of each episode of horizon steps"
        )
    clamp_values = check_clamps(clamps)
    if backtrack is not None and not isinstance(backtrack, bool):
        raise TypeError(f"backtrack must be a bool, got {backtrack!r}")
    if backtrack and mode != "episodic":
        raise ValueError("backtrack=True applies to mode='episodic' only (whole reruns to compare)")
    interval = h if mode == "episodic" else update_interval
    options = ScheduleOptions(
        horizon=h,
        windows=cast(int, windows),
        mode=mode,
        update_interval=check_positive_int("update_interval", interval, default_update_interval),
        backtrack=mode == "episodic" if backtrack is None else backtrack,
    )
    return options, clamp_values


def check_clamps(clamps: object) -> tuple[float | None, float | None]:
    """Forward mode's clamps ``{"grad": c, "tangent": c}``: ``(grad, tangent)``, ``None`` if off."""
    bounds: dict[str, float | None] = {"grad": None, "tangent": None}
    if clamps is not None:
        if not isinstance(clamps, Mapping):
            raise TypeError(
                f"clamps must be a mapping like {{'grad': 3.0, 'tangent': 1.0}}, got {clamps!r}"
            )
        for name, value in clamps.items():
            if name not in CLAMP_NAMES:
                raise ValueError(f"clamps: {name!r} is not a clamp; choose from {CLAMP_NAMES}")
            c = check_real(f"clamps[{name!r}]", value)
            if not c > 0:
                raise ValueError(f"clamps[{name!r}] must be positive, got {value!r}")
            bounds[name] = c
    return bounds["grad"], bounds["tangent"]


# -- closures and state dicts --------------------------------------------------------------------


def check_training_loss(loss: object) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(
            "a closure that does not call backward() must return the training loss as a scalar "
            f"tensor, got {loss if not isinstance(loss, Tensor) else tuple(loss.shape)!r}"
        )
    if not loss.requires_grad:
        raise ValueError(
            "the closure's loss does not depend on the parameters (requires_grad=False) and "
            "the closure did not call backward()"
        )
    return loss.reshape(())


def check_validation_loss(value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(
            "val_closure must return the validation loss as a scalar tensor, got "
            f"{type(value).__name__}"
        )
    if value.numel() != 1:
        raise ValueError(
            "val_closure must return the validation loss as a scalar tensor, got a tensor of "
            f"shape {tuple(value.shape)}"
        )
    if not value.requires_grad:
        raise ValueError(
            "val_closure returned a loss that does not depend on the parameters "
            "(requires_grad=False): compute it from the model with gradients enabled"
        )
    return value.reshape(())


def check_saved_shapes(
    learned: list[dict[str, LearnedValue]], saved: list[dict[str, list[Tensor]]]
) -> None:
    """A state dict's learned values must have this optimizer's shapes (granularity)."""
    if len(saved) != len(learned):
        raise ValueError(
            f"the state dict has {len(saved)} param groups of learned values, this optimizer "
            f"{len(learned)}"
        )
    for group, values in zip(learned, saved, strict=True):
        if set(values) != set(group):
            raise ValueError(
                f"the state dict learns {sorted(values)}, this optimizer {sorted(group)}"
            )
        for name, lv in group.items():
            if len(values[name]) != len(lv.phi) or any(
                phi.shape != x.shape for phi, x in zip(lv.phi, values[name], strict=True)
            ):
                shapes = [tuple(x.shape) for x in values[name]]
                raise ValueError(
                    f"the state dict's learned {name!r} has shapes {shapes}, this optimizer's "
                    f"{[tuple(p.shape) for p in lv.phi]} (granularity {lv.granularity!r}): was it "
                    "saved with another granularity?"
                )


def check_saved_values(
    learned: list[dict[str, LearnedValue]],
    saved: list[dict[str, list[Tensor]]],
    groups: list[dict[str, object]],
) -> None:
    """Refuse a state dict whose learned values (``φ``) are not finite or lie outside this
    optimizer's bounds, or whose param groups hold a learned name's value that is not finite or
    is negative, naming the first one found (before anything loads)."""
    for index, (group, values) in enumerate(zip(learned, saved, strict=True)):
        for name, lv in group.items():
            lo, hi = (to_unconstrained(b, lv.fraction) for b in lv.bounds)
            slack = 1e-9 * max(1.0, abs(lo), abs(hi))
            for x in values[name]:
                x = x.detach().double()
                if not bool(x.isfinite().all()):
                    raise ValueError(
                        f"the state dict's learned {name!r} of param group {index} is not finite: "
                        "it would turn the weights non-finite at the next step; refusing to load it"
                    )
                if bool((x < lo - slack).any()) or bool((x > hi + slack).any()):
                    raise ValueError(
                        f"the state dict's learned {name!r} of param group {index} lies outside "
                        f"this optimizer's bounds {lv.bounds}: pass bounds= to match the run that "
                        "saved it"
                    )
    check_saved_group_values(learned, groups)


def check_saved_group_values(
    learned: list[dict[str, LearnedValue]], groups: list[dict[str, object]]
) -> None:
    """Refuse a state dict (this optimizer's or torch's) whose param groups hold a learned
    name's value that is not finite or is negative."""
    for index, (saved_group, learned_names) in enumerate(zip(groups, learned, strict=False)):
        for name in learned_names:
            value = saved_group.get(name)
            if isinstance(value, int | float) and (not math.isfinite(value) or value < 0):
                raise ValueError(
                    f"the state dict's param group {index} has {name}={value!r}: a learned value "
                    "must be finite and non-negative"
                )


#: torch's own entries of an optimizer's state dict
STATE_DICT_ENTRIES = ("state", "param_groups")
#: the entries of a state dict's ``"hyper"`` that every version wrote and that loading reads
#: (``"resolved_hvp"``, ``"guard"`` and ``"best"`` may be absent: older versions lacked them)
HYPER_ENTRIES = ("phi", "shown", "counters", "hypergradients", "hyper_optimizer", "method")
#: the counters in ``hyper["counters"]`` that every version saved (``"divergences"`` came later)
COUNTER_ENTRIES = ("step", "hyper_steps", "skipped_hyper_steps")
#: what 0.1.0 kept in forward mode's method state and
#: :func:`~hyperopt_optim.schedules.upgrade_state_dict` moves into the schedule's
LEGACY_SCHEDULE_ENTRIES = ("position", "episodes", "loaded_window")
#: the entries of the divergence guard's and ``keep_best``'s states, when saved
SAFEGUARD_ENTRIES = {"guard": ("lowest", "scale", "good"), "best": ("loss", "step", "params")}

_NOTHING_LOADED = "Nothing was loaded."


def _mapping(where: str, value: object, hint: str = "") -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise TypeError(
            f"load_state_dict: {where} must be a dict, got {type(value).__name__}{hint}. "
            f"{_NOTHING_LOADED}"
        )
    return value


def _entries(where: str, saved: Mapping[str, object], names: Iterable[str], hint: str = "") -> None:
    missing = [name for name in names if name not in saved]
    if missing:
        raise ValueError(
            f"load_state_dict: {where} lacks {', '.join(map(repr, missing))}{hint}; it has "
            f"{sorted(map(str, saved))}. {_NOTHING_LOADED}"
        )


def _torch_entries(where: str, saved: object, hint: str = "") -> list[Mapping[str, object]]:
    """torch's entries of an optimizer's state dict; returns its param groups."""
    saved = _mapping(where, saved)
    _entries(where, saved, STATE_DICT_ENTRIES, hint)
    _mapping(f"{where}['state']", saved["state"])
    groups = saved["param_groups"]
    if not isinstance(groups, list | tuple) or not all(
        isinstance(g, Mapping) and isinstance(g.get("params"), list | tuple) for g in groups
    ):
        raise TypeError(
            f"load_state_dict: {where}['param_groups'] must be a list of dicts, each with its "
            f"'params'. {_NOTHING_LOADED}"
        )
    return list(groups)


def _per_group(
    where: str, value: object, learned: list[dict[str, LearnedValue]]
) -> list[Mapping[str, object]]:
    """A list with one ``{learned name: ...}`` per param group, naming this optimizer's."""
    if not isinstance(value, list | tuple):
        raise TypeError(
            f"load_state_dict: {where} must be a list with one dict per param group, got "
            f"{type(value).__name__}. {_NOTHING_LOADED}"
        )
    if len(value) != len(learned):
        raise ValueError(
            f"load_state_dict: {where} has {len(value)} param groups of learned values, this "
            f"optimizer {len(learned)}. {_NOTHING_LOADED}"
        )
    groups = []
    for index, (saved, names) in enumerate(zip(value, learned, strict=True)):
        saved = _mapping(f"{where}[{index}]", saved)
        if set(saved) != set(names):
            raise ValueError(
                f"load_state_dict: {where}[{index}] learns {sorted(map(str, saved))}, this "
                f"optimizer {sorted(names)}. {_NOTHING_LOADED}"
            )
        groups.append(saved)
    return groups


def check_state_dict_entries(
    state_dict: object,
    learned: list[dict[str, LearnedValue]],
    hyper_optimizer: Optimizer | None,
    trainable: list[Tensor] | None = None,
) -> None:
    """Refuse, before anything loads, a state dict that lacks entries that loading reads.

    ``state_dict`` must be a mapping (else ``TypeError``) with torch's ``"state"`` and
    ``"param_groups"`` (else ``ValueError`` naming the missing one).  Without ``"hyper"`` it is
    torch's own optimizer's state dict, which loads.  A ``"hyper"`` entry must be a dict
    holding :data:`HYPER_ENTRIES`, in the layout of this version or of an earlier one (it is
    checked before :func:`~hyperopt_optim.schedules.upgrade_state_dict`): ``"phi"``,
    ``"shown"`` and ``"hypergradients"`` with one dict of this optimizer's learned names per
    param group of ``learned``, the counters, the method's dict, and the hyper-optimizer's
    state dict with ``hyper_optimizer``'s group sizes (torch would refuse other sizes only
    after the rest had loaded).  The divergence guard's and ``keep_best``'s weights, when
    saved, must hold one tensor per parameter of ``trainable``.  The values themselves are
    :func:`check_saved_shapes`' and :func:`check_saved_values`' part; the method's own state,
    the method's (``check_state_dict``).
    """
    where = "the state dict"
    state_dict = _mapping(where, state_dict)
    _torch_entries(where, state_dict, " (torch's part of every optimizer's state dict): is it one?")
    if "hyper" not in state_dict:
        return
    hyper = _mapping(
        "the state dict's 'hyper' entry",
        state_dict["hyper"],
        " (a torch optimizer's state dict has no 'hyper' entry at all)",
    )
    _entries(
        "the state dict's 'hyper' entry",
        hyper,
        HYPER_ENTRIES,
        " (the learned values and the state that learns them, which this optimizer saves)",
    )
    where = "the state dict's 'hyper'"
    for index, values in enumerate(_per_group(f"{where}['phi']", hyper["phi"], learned)):
        for name, xs in values.items():
            if not isinstance(xs, list | tuple) or not all(isinstance(x, Tensor) for x in xs):
                raise TypeError(
                    f"load_state_dict: the state dict's learned {name!r} of param group {index} "
                    f"must be a list of tensors. {_NOTHING_LOADED}"
                )
    # another granularity's values: said as such, before the hyper-optimizer's sizes differ too
    check_saved_shapes(learned, cast(list[dict[str, list[Tensor]]], hyper["phi"]))
    for index, shown in enumerate(_per_group(f"{where}['shown']", hyper["shown"], learned)):
        for name, value in shown.items():
            check_real(f"{where}['shown'][{index}][{name!r}]", value, "load_state_dict: ")
    _per_group(f"{where}['hypergradients']", hyper["hypergradients"], learned)
    counters = _mapping(f"{where}['counters']", hyper["counters"])
    _entries(f"{where}['counters']", counters, COUNTER_ENTRIES)
    method = _mapping(f"{where}['method']", hyper["method"])
    if "schedules" in hyper:  # 0.1.0's layout of forward mode's state
        _entries(f"{where}['method'] (0.1.0's layout)", method, LEGACY_SCHEDULE_ENTRIES)
    saved_groups = _torch_entries(f"{where}['hyper_optimizer']", hyper["hyper_optimizer"])
    if hyper_optimizer is not None:
        sizes = [len(g["params"]) for g in hyper_optimizer.param_groups]
        saved_sizes = [len(cast(list[object], g["params"])) for g in saved_groups]
        if saved_sizes != sizes:
            raise ValueError(
                f"load_state_dict: {where}['hyper_optimizer'] has param groups of {saved_sizes} "
                f"tensors, this optimizer's hyper-optimizer {sizes}: was it saved over other "
                f"parameters or learned values? {_NOTHING_LOADED}"
            )
    for key, names in SAFEGUARD_ENTRIES.items():
        if hyper.get(key) is None:
            continue
        saved = _mapping(f"{where}[{key!r}]", hyper[key])
        _entries(f"{where}[{key!r}]", saved, names)
        weights = saved[names[-1]]
        if weights is None or trainable is None:
            continue
        if not isinstance(weights, list | tuple) or not all(isinstance(x, Tensor) for x in weights):
            raise TypeError(
                f"load_state_dict: {where}[{key!r}] must hold a list of tensors, got "
                f"{type(weights).__name__}. {_NOTHING_LOADED}"
            )
