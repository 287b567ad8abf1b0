"""State dicts saved by hyperopt_optim 0.1.0 (commit 9b1abf6) still load, and training goes on
from them exactly as it did in the code that saved them.

The records are made by :mod:`legacy_state_dicts` (see its docstring).  A loaded run is compared
with the recorded continuation at 1e-12 relative: the same arithmetic, where a sum reordered by
a refactor may move the last bits (float64).
"""

from __future__ import annotations

from typing import Any

import legacy_state_dicts as legacy
import pytest
import torch

RTOL, ATOL = 1e-12, 1e-15


@pytest.fixture(scope="module")
def records() -> dict[str, Any]:
    return torch.load(legacy.DATA, weights_only=True)


def _close(actual: Any, expected: Any, where: str) -> None:
    if isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for k in expected:
            _close(actual[k], expected[k], f"{where}.{k}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _close(a, e, f"{where}[{i}]")
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=where)
    else:
        assert actual == expected, where


@pytest.mark.parametrize("case", legacy.CASES, ids=lambda c: c.name)
def test_a_state_dict_saved_by_0_1_0_loads_and_training_goes_on_as_it_did(
    case: legacy.LegacyCase, records: dict[str, Any]
) -> None:
    torch.set_num_threads(1)
    record = records[case.name]
    net = legacy.model()
    opt = case.make(list(net.parameters()))
    net.load_state_dict(record["model"])
    opt.load_state_dict(record["optimizer"])
    legacy.train(case, net, opt, case.after, case.before)
    outcome = legacy.outcome(net, opt)
    # counters added since 0.1.0 (the divergence guard's, the gradient scaler's) start at zero
    assert outcome["hyper_state"].pop("divergences") == 0
    assert outcome["hyper_state"].pop("scaler_skipped_steps") == 0
    assert outcome["hyper_state"].pop("overridden_hyper_steps") == 0
    _close(outcome, record["expected"], case.name)


def test_the_records_cover_a_backtrack_and_a_hyper_step_each(records: dict[str, Any]) -> None:
    """The saved states are not trivial: every run had taken hyper-steps, and the episodic
    Adam run had backtracked, before it was saved."""
    for case in legacy.CASES:
        hyper = records[case.name]["optimizer"]["hyper"]
        assert hyper["counters"]["hyper_steps"] >= 1, case.name
    method = records["adam_forward_episodic_backtrack"]["optimizer"]["hyper"]["method"]
    assert method["backtracks"] >= 1
    assert method["position"] != 0  # saved mid-episode
