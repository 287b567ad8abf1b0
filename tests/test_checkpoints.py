"""Checkpoints: ``load_state_dict`` refuses a state dict that lacks the entries it reads, before
anything loads, and still takes torch's own optimizer's state dict (issue 12, item 5).

A refused state dict must leave the optimizer exactly as it was: its torch state, param groups,
learned values, counters, hyper-optimizer state and weights (compared through ``state_dict()``,
tensors with ``torch.equal``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.functional import mse_loss

from hyperopt_optim import HyperAdam, HyperSGD
from hyperopt_optim.optimizer import HyperOptimizer

torch.set_num_threads(1)


def trained(family: str) -> tuple[nn.Module, HyperOptimizer]:
    """A float64 model and an optimizer that has taken steps and hyper-steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    opt: HyperOptimizer
    if family == "sgd":
        opt = HyperSGD(
            model.parameters(),
            lr=0.05,
            momentum=0.9,
            learn=("lr", "momentum"),
            update_interval=2,
            keep_best=True,
        )
    else:
        opt = HyperAdam(
            model.parameters(),
            lr=0.01,
            learn=("lr", "beta1"),
            granularity="tensor",
            update_interval=2,
        )
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=gen, dtype=torch.float64)
    y = x[:, :1] - x[:, 1:2]

    def closure() -> Tensor:
        opt.zero_grad()
        loss = mse_loss(model(x[:24]), y[:24])
        loss.backward()
        return loss

    def val() -> Tensor:
        return mse_loss(model(x[24:]), y[24:])

    for _ in range(6):
        opt.step(closure, val_closure=val)
    assert opt.hyper_state["hyper_steps"] >= 2
    return model, opt


def assert_same(actual: Any, expected: Any, where: str = "state_dict") -> None:
    """Equal structure, and equal values (tensors bit for bit)."""
    if isinstance(expected, Tensor):
        assert isinstance(actual, Tensor), where
        assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), where
        assert set(actual) == set(expected), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert isinstance(actual, list | tuple), where
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


def snapshot(model: nn.Module, opt: HyperOptimizer) -> dict[str, Any]:
    return copy.deepcopy(
        {
            "optimizer": opt.state_dict(),
            "weights": [p.detach() for p in model.parameters()],
            "hyperparameters": opt.hyperparameters(),
            "hypergradients": opt.hypergradients(),
        }
    )


def assert_unchanged(model: nn.Module, opt: HyperOptimizer, before: dict[str, Any]) -> None:
    assert_same(snapshot(model, opt), before, "optimizer")


Corrupt = Callable[[dict[str, Any]], None]

# (what is wrong, how to make it so, the error, a name its message must hold)
MALFORMED: list[tuple[str, Corrupt, type[Exception], str]] = [
    ("no_param_groups", lambda s: s.pop("param_groups"), ValueError, "'param_groups'"),
    ("no_state", lambda s: s.pop("state"), ValueError, "'state'"),
    ("state_not_a_dict", lambda s: s.__setitem__("state", []), TypeError, "'state'"),
    (
        "param_groups_without_params",
        lambda s: s["param_groups"][0].pop("params"),
        TypeError,
        "'params'",
    ),
    ("hyper_none", lambda s: s.__setitem__("hyper", None), TypeError, "'hyper'"),
    ("hyper_a_list", lambda s: s.__setitem__("hyper", []), TypeError, "'hyper'"),
    *[
        (f"hyper_no_{name}", lambda s, name=name: s["hyper"].pop(name), ValueError, f"'{name}'")
        for name in ("phi", "shown", "counters", "hypergradients", "hyper_optimizer", "method")
    ],
    (
        "method_not_a_dict",
        lambda s: s["hyper"].__setitem__("method", None),
        TypeError,
        "'method'",
    ),
    (
        "phi_one_group_too_many",
        lambda s: s["hyper"]["phi"].append(s["hyper"]["phi"][0]),
        ValueError,
        "'phi'",
    ),
    (
        "shown_lacks_a_name",
        lambda s: s["hyper"]["shown"][0].pop("lr"),
        ValueError,
        "'shown'",
    ),
    (
        "hypergradients_not_a_list",
        lambda s: s["hyper"].__setitem__("hypergradients", {}),
        TypeError,
        "'hypergradients'",
    ),
    (
        "counters_lack_step",
        lambda s: s["hyper"]["counters"].pop("step"),
        ValueError,
        "'step'",
    ),
    (
        "hyper_optimizer_lacks_its_state",
        lambda s: s["hyper"]["hyper_optimizer"].pop("state"),
        ValueError,
        "'state'",
    ),
    (
        "hyper_optimizer_of_other_values",
        lambda s: s["hyper"]["hyper_optimizer"]["param_groups"][0]["params"].append(99),
        ValueError,
        "'hyper_optimizer'",
    ),
    (
        "legacy_layout_without_the_position",
        lambda s: s["hyper"].__setitem__("schedules", []),
        ValueError,
        "'position'",
    ),
    (
        "guard_lacks_its_lowest_loss",
        lambda s: s["hyper"]["guard"].pop("lowest"),
        ValueError,
        "'lowest'",
    ),
    (
        "guard_weights_not_tensors",
        lambda s: s["hyper"]["guard"].__setitem__("good", "weights"),
        TypeError,
        "'guard'",
    ),
    # already refused before this change; kept here so that every refusal leaves it unchanged
    (
        "nan_learned_value",
        lambda s: s["hyper"]["phi"][0]["lr"][0].fill_(math.nan),
        ValueError,
        "'lr'",
    ),
    ("nan_group_lr", lambda s: s["param_groups"][0].__setitem__("lr", math.nan), ValueError, "lr"),
]


@pytest.mark.parametrize("family", ["sgd", "adam"])
@pytest.mark.parametrize(
    ("corrupt", "error", "name"),
    [pytest.param(c, e, n, id=i) for i, c, e, n in MALFORMED],
)
def test_a_state_dict_lacking_an_entry_is_refused_before_anything_loads(
    family: str, corrupt: Corrupt, error: type[Exception], name: str
) -> None:
    _, opt = trained(family)
    saved = copy.deepcopy(opt.state_dict())
    corrupt(saved)
    fresh_model, fresh = trained(family)
    before = snapshot(fresh_model, fresh)
    with pytest.raises(error, match="load_state_dict" if error is TypeError else None) as info:
        fresh.load_state_dict(saved)
    assert name in str(info.value)
    assert_unchanged(fresh_model, fresh, before)


def test_a_state_dict_that_is_not_a_mapping_is_a_type_error() -> None:
    model, opt = trained("sgd")
    before = snapshot(model, opt)
    with pytest.raises(TypeError, match="the state dict must be a dict, got list"):
        opt.load_state_dict(list(opt.state_dict().items()))  # type: ignore[arg-type]
    assert_unchanged(model, opt, before)


def test_the_message_names_what_is_missing() -> None:
    _, opt = trained("sgd")
    saved = copy.deepcopy(opt.state_dict())
    del saved["param_groups"]
    with pytest.raises(ValueError, match=r"^load_state_dict: the state dict lacks 'param_groups'"):
        opt.load_state_dict(saved)
    saved = copy.deepcopy(opt.state_dict())
    del saved["hyper"]["phi"], saved["hyper"]["method"]
    with pytest.raises(ValueError, match=r"'hyper' entry lacks 'phi', 'method'"):
        opt.load_state_dict(saved)


@pytest.mark.parametrize("optional", ["resolved_hvp", "guard", "best"])
def test_the_optional_hyper_entries_may_be_absent(optional: str) -> None:
    """Earlier versions did not save them: their absence loads as before."""
    _, opt = trained("sgd")
    saved = copy.deepcopy(opt.state_dict())
    del saved["hyper"][optional]
    _, fresh = trained("sgd")
    fresh.load_state_dict(saved)
    assert_same(fresh.hyperparameters(), opt.hyperparameters())


@pytest.mark.parametrize("family", ["sgd", "adam"])
def test_torch_own_state_dict_still_loads(family: str) -> None:
    """No ``"hyper"`` entry at all: torch's optimizer's, documented to load, the learned values
    restarting from the loaded hyperparameters."""
    model, opt = trained(family)
    if family == "sgd":
        plain: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
        expected = {"lr": 0.2, "momentum": 0.5}
    else:
        plain = torch.optim.Adam(model.parameters(), lr=0.003, betas=(0.8, 0.99))
        expected = {"lr": 0.003, "beta1": 0.8}
    opt.load_state_dict(plain.state_dict())
    group = opt.param_groups[0]
    shown = {
        "lr": group["lr"],
        "momentum": group.get("momentum"),
        "beta1": group.get("betas", (None,))[0],
    }
    for name, value in expected.items():
        # per tensor, the group shows the mean (a scale is multiplied, a fraction set)
        assert shown[name] == pytest.approx(value)
        learned = opt.hyperparameters()[0][name]
        if name != "lr":
            for v in learned if isinstance(learned, list) else [learned]:
                assert float(v) == pytest.approx(value)
