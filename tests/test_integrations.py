"""Integrations: PyTorch Lightning (``examples/lightning_example.py``), the hyper-step hook, and
TensorBoard (``examples/tensorboard_example.py``).

The examples are imported by path and run in process (tiny configurations), so the code the
README points to is the code tested.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import importlib.util
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

from hyperopt_optim import HyperAdam, HyperSGD

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def _example(name: str) -> Any:
    """``examples/<name>.py`` as a module (not run as a script)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _lightning_example() -> Any:
    for module in ("lightning", "sklearn"):
        pytest.importorskip(module)
    return _example("lightning_example")


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's advice that does not apply to these tiny in-memory runs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # lightning 2.6 vs torch 2.13
        warnings.filterwarnings("ignore", message=r".*no `val_dataloader`.*")
        yield


def _torch_closure(opt: torch.optim.Optimizer, model: nn.Module, x: Tensor, y: Tensor) -> Any:
    def closure() -> Tensor:  # torch's convention: zero, forward, backward, return
        opt.zero_grad()
        loss = cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


# -- Lightning ----------------------------------------------------------------------------------


def test_lightning_example_learns_with_ift_products(tmp_path: Path) -> None:
    """30 steps of ``Trainer.fit`` with ift, K=4, T=10: three hyper-steps, the learned lr moved,
    and the products were taken, by forward differences of Lightning's closure: 4 more calls of
    ``training_step`` per hyper-step (1 per product). The hook's ``self.log`` reaches the CSV
    logger."""
    example = _lightning_example()
    with _quiet_lightning():
        summary = example.main(["--steps", "30", "--csv", str(tmp_path)])
    state = summary["hyper_state"]
    assert state["step"] == 30
    assert state["hyper_steps"] == 3
    assert state["skipped_hyper_steps"] == 0
    assert summary["neumann_steps"] == 4
    assert summary["resolved_hvp"] == "forward_difference"
    assert summary["loss_evaluations"] == 30 + 3 * 4
    assert summary["learned"]["lr"] != pytest.approx(0.01, rel=1e-3)
    assert summary["learned"]["momentum"] != pytest.approx(0.5, rel=1e-3)
    assert all(g != 0.0 for g in summary["hypergradients"].values())
    (metrics,) = tmp_path.glob("lightning_example/version_*/metrics.csv")
    rows = metrics.read_text().splitlines()
    assert "hyper/lr" in rows[0].split(",")
    logged = [row for row in rows[1:] if row.split(",")[rows[0].split(",").index("hyper/lr")]]
    assert len(logged) == 3  # one row per hyper-step


def test_lightning_manual_optimization_takes_exact_products() -> None:
    """``--manual``: a closure that leaves ``backward()`` to the optimizer resolves ``hvp="auto"``
    to exact autograd products, one loss evaluation per step; the run matches the automatic
    one's (forward differences) closely."""
    example = _lightning_example()
    with _quiet_lightning():
        manual = example.main(["--steps", "30", "--manual"])
        automatic = example.main(["--steps", "30"])
    assert manual["resolved_hvp"] == "autograd"
    assert manual["loss_evaluations"] == 30
    assert manual["hyper_state"]["hyper_steps"] == 3
    for name in ("lr", "momentum"):
        exact, differences = manual["hypergradients"][name], automatic["hypergradients"][name]
        assert exact == pytest.approx(differences, rel=1e-3), name
        assert manual["learned"][name] == pytest.approx(automatic["learned"][name], rel=1e-4)


def _plain_loop(example: Any, module: Any, data: Any, steps: int, seed: int) -> Any:
    """The same steps as ``Trainer.fit(max_steps=steps)``, in a plain PyTorch loop."""
    opt = module.build_optimizer()
    done = 0
    loader = example.train_loader(data, seed)
    while done < steps:
        for x, y in loader:  # a new pass over the loader per epoch, as Lightning's
            opt.step(_torch_closure(opt, module.net, x, y))
            done += 1
            if done == steps:
                break
    return opt


@pytest.mark.parametrize("method", ["ift", "greedy"])
def test_lightning_equals_a_plain_loop(method: str) -> None:
    """Lightning's closure (training_step, zero_grad, backward) is torch's closure: 25 steps
    (over an epoch boundary, three hyper-steps at T=8) under ``Trainer.fit`` give the weights,
    learned values and hypergradients of the same steps in a plain loop."""
    example = _lightning_example()
    import lightning

    data = example.load_data()
    torch.manual_seed(0)
    module = example.DigitsModule(data.x_val, data.y_val, method=method, update_interval=8)
    plain = copy.deepcopy(module)
    trainer = lightning.Trainer(
        max_steps=25,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with _quiet_lightning():
        trainer.fit(module, example.train_loader(data, 0))
    fitted = trainer.optimizers[0]
    opt = _plain_loop(example, plain, data, 25, 0)

    assert fitted.hyper_state == opt.hyper_state
    assert fitted.hyper_state["hyper_steps"] == 3
    close = functools.partial(torch.testing.assert_close, rtol=1e-6, atol=1e-9)
    close(fitted.hyperparameters(), opt.hyperparameters())
    close(fitted.hypergradients(), opt.hypergradients())
    close(list(module.net.parameters()), list(plain.net.parameters()))
    assert float(fitted.hyperparameters()[0]["lr"]) != pytest.approx(0.01, rel=1e-3)
    calls = 25 + (3 * 4 if method == "ift" else 0)  # forward differences: one per product
    assert module.loss_evaluations == calls


def test_a_collected_lightning_wrapper_leaves_the_optimizer_working() -> None:
    """Lightning wraps the optimizer in a ``LightningOptimizer``, an object of a class derived
    from the optimizer's own that forwards attribute reads to it, and replaces the wrapper
    during ``Trainer.fit``'s set-up. Collecting the old wrapper must not disturb the optimizer
    (it once ran ``HyperOptimizer.__del__`` on the wrapper, which removed the optimizer's
    backward hooks: every later step with torch's closure failed)."""
    pytest.importorskip("lightning")
    from lightning.pytorch.core.optimizer import LightningOptimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt = HyperSGD(model.parameters(), lr=0.05, method="ift", update_interval=2)
    opt.register_validation_closure(lambda: cross_entropy(model(x), y))
    wrapper = LightningOptimizer(opt)
    del wrapper
    gc.collect()
    for _ in range(4):
        opt.step(_torch_closure(opt, model, x, y))
    assert opt.hyper_state["hyper_steps"] == 2
    assert opt.state_dict()["hyper"]["resolved_hvp"] == "forward_difference"


# -- the hyper-step hook ------------------------------------------------------------------------


def _two_groups(granularity: str, optimizer: type = HyperSGD) -> tuple[Any, Any, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    learn = ("lr", "weight_decay")
    opt = optimizer(
        [{"params": weights}, {"params": biases, "lr": 0.02}],
        lr=0.05,
        weight_decay=1e-3,
        learn=learn,
        granularity=granularity,
        update_interval=2,
    )
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    x_val, y_val = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt.register_validation_closure(lambda: cross_entropy(model(x_val), y_val))
    return model, opt, (x, y)


@pytest.mark.parametrize(
    ("optimizer", "granularity"),
    [(HyperSGD, "scalar"), (HyperSGD, "tensor"), (HyperAdam, "element")],
)
def test_hook_is_called_once_per_hyper_step(optimizer: type, granularity: str) -> None:
    model, opt, (x, y) = _two_groups(granularity, optimizer)
    calls: list[tuple[Any, int, Any, Any]] = []

    def hook(o: Any, hyperparameters: Any, hypergradients: Any) -> None:
        calls.append((o, o.hyper_state["step"], hyperparameters, hypergradients))
        assert o.hyper_state["hyper_steps"] == len(calls)
        torch.testing.assert_close(hyperparameters, o.hyperparameters())
        torch.testing.assert_close(hypergradients, o.hypergradients())

    handle = opt.register_hyper_step_hook(hook)
    for _ in range(7):
        opt.step(_torch_closure(opt, model, x, y))
    assert [step for _, step, _, _ in calls] == [2, 4, 6]
    assert all(o is opt for o, _, _, _ in calls)

    groups = opt.param_groups
    for _, _, values, grads in calls:
        for structure in (values, grads):
            assert isinstance(structure, list)
            assert len(structure) == 2  # one dict per param group
            for group, by_name in zip(groups, structure, strict=True):
                assert set(by_name) == {"lr", "weight_decay"}
                for value in by_name.values():
                    if granularity == "scalar":
                        assert isinstance(value, Tensor)
                        assert value.dim() == 0
                    else:  # a list with one tensor per parameter of the group
                        assert isinstance(value, list)
                        shapes = [v.shape for v in value]
                        if granularity == "tensor":
                            assert shapes == [torch.Size([])] * len(group["params"])
                        else:
                            assert shapes == [p.shape for p in group["params"]]
    first, last = calls[0][2], calls[-1][2]
    lr_first, lr_last = first[0]["lr"], last[0]["lr"]
    if granularity == "scalar":
        assert float(lr_first) != float(lr_last)  # kept copies, not live views
    else:
        assert not torch.equal(lr_first[0], lr_last[0])
    for group in (0, 1):  # the hypergradients are those of a real hyper-step
        g = calls[-1][3][group]["lr"]
        assert any(float(t.abs().sum()) > 0 for t in (g if isinstance(g, list) else [g]))

    handle.remove()
    for _ in range(4):
        opt.step(_torch_closure(opt, model, x, y))
    assert opt.hyper_state["hyper_steps"] == 5
    assert len(calls) == 3


def test_hooks_run_in_order_and_skipped_hyper_steps_call_none() -> None:
    model, opt, (x, y) = _two_groups("scalar")
    order: list[str] = []
    opt.register_hyper_step_hook(lambda *_: order.append("first"))
    opt.register_hyper_step_hook(lambda *_: order.append("second"))
    for _ in range(2):
        opt.step(_torch_closure(opt, model, x, y))
    assert order == ["first", "second"]
    nan = torch.tensor(float("nan"), requires_grad=True)
    opt.step(_torch_closure(opt, model, x, y))
    with pytest.warns(RuntimeWarning):  # the skip says why
        opt.step(_torch_closure(opt, model, x, y), val_closure=lambda: nan * 1.0)
    assert opt.hyper_state["skipped_hyper_steps"] == 1
    assert order == ["first", "second"]


@pytest.mark.parametrize("hook", [None, 3, "hook"])
def test_a_hook_that_is_not_callable_is_refused(hook: Any) -> None:
    _, opt, _ = _two_groups("scalar")
    with pytest.raises(TypeError, match="hook"):
        opt.register_hyper_step_hook(hook)


# -- TensorBoard --------------------------------------------------------------------------------


def _tensorboard_example() -> Any:
    for module in ("tensorboard", "sklearn"):
        pytest.importorskip(module)
    return _example("tensorboard_example")


def _read_events(logdir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


@pytest.mark.parametrize("granularity", ["scalar", "tensor", "element"])
def test_tensorboard_example_logs_every_learned_value(tmp_path: Path, granularity: str) -> None:
    example = _tensorboard_example()
    argv = ["--steps", "20", "--update-interval", "5", "--eval-every", "10"]
    summary = example.main([*argv, "--granularity", granularity, "--logdir", str(tmp_path)])
    assert summary["hyper_steps_logged"] == summary["hyper_state"]["hyper_steps"] == 4
    assert any(f.stat().st_size > 0 for f in tmp_path.glob("events.out.tfevents.*"))
    events = _read_events(tmp_path)
    scalars = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/validation"} <= scalars
    assert [e.step for e in events.Scalars("loss/train")] == list(range(1, 21))
    assert [e.step for e in events.Scalars("loss/validation")] == [10, 20]
    learned = summary["learned"]
    names = ("lr", "momentum", "weight_decay")
    if granularity == "scalar":
        for group in (0, 1):
            for name in names:
                assert f"hyper/{name}/group{group}" in scalars
                assert f"hypergrad/{name}/group{group}" in scalars
        lr = events.Scalars("hyper/lr/group0")
        assert [e.step for e in lr] == [0, 5, 10, 15, 20]
        assert lr[0].value == pytest.approx(0.01)
        assert lr[-1].value == pytest.approx(float(learned[0]["lr"]), rel=1e-6)
        assert lr[-1].value != pytest.approx(0.01, rel=1e-3)
    elif granularity == "tensor":  # two parameter tensors in each group
        for group in (0, 1):
            for index in (0, 1):
                assert f"hyper/lr/group{group}/{index}" in scalars
                assert f"hypergrad/weight_decay/group{group}/{index}" in scalars
        lr = events.Scalars("hyper/lr/group1/1")
        assert lr[-1].value == pytest.approx(float(learned[1]["lr"][1]), rel=1e-6)
    else:
        histograms = set(events.Tags()["histograms"])
        assert {"hyper/lr/group0/0", "hypergrad/lr/group0/0"} <= histograms
        mean = events.Scalars("hyper/lr/group0/0/mean")
        assert mean[-1].value == pytest.approx(float(learned[0]["lr"][0].mean()), rel=1e-6)
