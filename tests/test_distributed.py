"""Data-parallel training on 2 gloo processes on 127.0.0.1: weights and learned values stay
bitwise identical on every rank with per-rank training and validation shards, for every method
and product provider, and equal (to rounding) one process trained on the whole batches."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import distributed_worker as dw
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hyperopt_optim import HyperSGD

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every scenario's outcome on each of the two ranks (one spawn for all of them)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(dw.worker, args=(dw.WORLD, _free_port(), str(out)), nprocs=dw.WORLD, join=True)
    return {
        s.name: [torch.load(Path(out) / f"{s.name}-{r}.pt") for r in range(dw.WORLD)]
        for s in dw.SCENARIOS
    }


def _flat(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _flat(x[k])]
    if isinstance(x, list | tuple):
        return [t for v in x for t in _flat(v)]
    return []


def _ok(outcome: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in outcome, outcome.get("trace")
    return outcome


SAME = [s.name for s in dw.SCENARIOS if s.ddp]


@pytest.mark.parametrize("name", SAME)
def test_every_rank_ends_bitwise_identical(
    outcomes: dict[str, list[dict[str, Any]]], name: str
) -> None:
    first, second = (_ok(o) for o in outcomes[name])
    for a, b in zip(_flat(first["weights"]), _flat(second["weights"]), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(_flat(first["learned"]), _flat(second["learned"]), strict=True):
        assert torch.equal(a, b)
    assert first["hyper_state"] == second["hyper_state"]
    assert first["hyper_state"]["hyper_steps"] > 0
    # the learned values moved: there was something to agree on
    start = dw.by_name()[name].kwargs["lr"]
    lrs = _flat([g["lr"] for g in first["learned"]])
    assert any(float(x.flatten()[0]) != start for x in lrs)


@pytest.mark.parametrize("name", [s.name for s in dw.SCENARIOS if s.reference])
def test_equals_one_process_on_the_whole_batches(
    outcomes: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """Averaging over equal shards is the whole batch's mean: the distributed run is the run
    of one process on the whole of every batch and of the validation set."""
    scenario = dw.by_name()[name]
    torch.set_num_threads(1)
    alone = dw.train(scenario, 0, 1)
    ranked = _ok(outcomes[name][0])
    for a, b in zip(_flat(ranked["weights"]), _flat(alone["weights"]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for a, b in zip(_flat(ranked["learned"]), _flat(alone["learned"]), strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", [s.name for s in dw.SCENARIOS if s.loss_hyper])
def test_loss_hyperparameters_are_learned_alike_on_every_rank(
    outcomes: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """The loss hyperparameters end with the weights (compared bitwise across ranks and with
    one process above): here, that they moved."""
    first = _ok(outcomes[name][0])
    mu, per_weight = first["weights"][-2:]
    assert float(mu) != pytest.approx(math.log(1e-2), abs=1e-9)
    assert not torch.allclose(per_weight, torch.full_like(per_weight, math.log(1e-2)))


def test_a_nan_validation_loss_on_one_rank_skips_the_hyper_step_on_both(
    outcomes: dict[str, list[dict[str, Any]]],
) -> None:
    first, second = (_ok(o) for o in outcomes["sgd-keep-best-nan-validation"])
    assert first["hyper_state"]["skipped_hyper_steps"] == 1
    assert second["hyper_state"]["skipped_hyper_steps"] == 1
    assert first["best"] == second["best"]  # the kept weights were judged on the mean loss


def test_the_guard_judges_the_mean_loss_even_when_the_closure_returns_a_float(
    outcomes: dict[str, list[dict[str, Any]]],
) -> None:
    """A NaN loss reported by rank 1 only, as a Python float: both ranks back off together (the
    float was once judged on each rank alone: rank 1 backed off, rank 0 did not)."""
    first, second = (_ok(o) for o in outcomes["guard-float-loss-nan-on-one-rank"])
    assert first["hyper_state"]["divergences"] == second["hyper_state"]["divergences"] == 1


def test_gradients_that_backward_did_not_average_are_refused(
    outcomes: dict[str, list[dict[str, Any]]],
) -> None:
    """A model not wrapped in DistributedDataParallel: its closure's backward() leaves each
    rank's own gradient, and the first step says so on every rank instead of drifting."""
    for outcome in outcomes["not-ddp"] + outcomes["not-ddp-no-closure"]:
        assert "error" in outcome
        assert "DistributedDataParallel" in outcome["error"]
        assert "differ between the ranks" in outcome["error"]


def test_process_group_argument_is_checked() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(TypeError, match="process_group"):
        HyperSGD(params, lr=0.1, process_group="world")
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="initialised"):
            HyperSGD(params, lr=0.1, process_group=True)
        HyperSGD(params, lr=0.1, process_group=False)  # no group: nothing to average over


def test_sharded_parameters_are_refused() -> None:
    flat = torch.nn.Parameter(torch.zeros(3))
    flat._is_flat_param = True  # type: ignore[attr-defined]  # FSDP's FlatParameter marks itself so
    with pytest.raises(TypeError, match="FullyShardedDataParallel"):
        HyperSGD([flat], lr=0.1)


def test_the_ddp_example_runs_and_its_replicas_agree() -> None:
    """examples/ddp_example.py, as the docs give it, with fewer steps."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "examples" / "ddp_example.py"), "--steps", "30"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "identical on every rank: True" in done.stdout
    assert "3 hyper-steps" in done.stdout
