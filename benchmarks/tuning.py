"""Clarke, Oldewage & Hernández-Lobato (2022)'s tuning experiment on scikit-learn's datasets.

For each dataset (digits, breast cancer, wine: classification with cross-entropy; diabetes:
regression with mean squared error on standardised targets) the data are split once (fixed
seed) into 60% training, 20% validation and 20% test, and standardised on the training part.
A small MLP (one hidden layer of 50 ReLU units) is trained for a fixed budget of minibatch
steps. For each seed, initial hyperparameters are drawn from the paper's ranges::

    log10 lr ~ U[-6, -1],   log10 weight_decay ~ U[-7, -2],   momentum ~ U[0, 1]

and every method trains once from them, from the same initial weights and with the same
minibatch order:

==========================  ===============================================================
``fixed``                   ``torch.optim.SGD`` with momentum; the initial values kept
                            (the paper's "Random")
``hd``                      ``HyperSGD(method="hd")`` learning lr (Baydin et al., 2018)
``greedy``                  ``HyperSGD(method="greedy")``: K = 0, lr, momentum, weight decay
``ift_wd_lr``               ``HyperSGD(method="ift")``, K = 4, T = 10; lr and weight decay
``ift_wd_lr_m``             the same; lr, momentum and weight decay
``ift_wd_elementlr_m``      the same with one learning rate per weight
                            (``granularity={"lr": "element"}``; HyperSGD's default
                            hyper-optimizer for per-weight values, ``SharedAdam``)
``ift_wd_elementlr_m_adam`` the same with plain ``torch.optim.Adam(lr=0.05)`` on every
                            per-weight value, as in the paper (and in HyperSGD before
                            ``SharedAdam``): kept to show why per-weight values lost
``unrolled_5``              exact reverse-mode differentiation through the last 5 of every
                            10 steps (the paper's "Diff-through-Opt"), written here with
                            ``torch.func.functional_call``; lr, momentum, weight decay
``random_search``           black-box search over the same ranges with the compute the
                            ``ift_wd_lr_m`` run took: ``ceil(its seconds / fixed's seconds)``
                            trials, each a full training with fixed values; the trial with
                            the best final *validation* loss is reported (its test loss)
``tpe``                     the same budget for Optuna's TPE sampler
==========================  ===============================================================

Every learning method updates the unconstrained values (log lr, log weight decay, logit
momentum) with the package's default hyper-optimizer (``torch.optim.Adam(lr=0.05)``; for
per-weight values ``SharedAdam(lr=0.05, deviation_lr=0.002)``) on the full validation set,
every T = 10 steps (every step for ``hd``). The ift methods take their Hessian-vector
products by forward differences (``hvp="forward_difference"``, one closure call each; see
``--hvp``).

Reported per dataset and method over the seeds: mean, median and quartiles of the final test
loss, the number of runs whose final test loss is not finite (``diverged``; they count as
+inf in the median and quartiles and are left out of the mean), and ``seconds_ratio``, the
median over seeds of the method's wall time over ``fixed``'s in the same process.

::

    python benchmarks/tuning.py                    # the full configuration (see --help)
    python benchmarks/tuning.py --smoke            # 2 seeds, 40 steps, digits: seconds
    python benchmarks/tuning.py --workers 2        # seeds in parallel processes

Raw records go to ``results/tuning_runs.jsonl`` (one line per dataset and seed); a rerun with
the same configuration skips the seeds already there, so an interrupted run resumes. The
summary goes to ``results/tuning.json`` (``{dataset: {method: {...}}}``), ``tuning_meta.json``
(configuration, machine, versions), ``tuning.md`` (the table) and two figures,
``tuning_boxplots.png`` and ``tuning_trajectories.png``. ``--smoke`` writes ``tuning_smoke*``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.functional import cross_entropy, mse_loss

RESULTS = Path(__file__).resolve().parent / "results"
DATASETS = ("digits", "breast_cancer", "wine", "diabetes")
METHODS = (
    "fixed",
    "hd",
    "greedy",
    "ift_wd_lr",
    "ift_wd_lr_m",
    "ift_wd_elementlr_m",
    "unrolled_5",
    "random_search",
    "tpe",
    "ift_wd_elementlr_m_adam",
)
LEARNED = ("lr", "momentum", "weight_decay")
LOG10_LR = (-6.0, -1.0)
LOG10_WD = (-7.0, -2.0)
MOMENTUM = (0.0, 1.0)
# HyperSGD learns a value only strictly inside its bounds (momentum in [1e-6, 1 - 1e-6]); a
# uniform draw is inside with probability ~1 - 2e-6, the clip only guards the edge.
MOMENTUM_CLIP = (1e-6, 1 - 1e-6)
# The bounds HyperSGD clips learned values to (its defaults), applied to unrolled_5 as well.
BOUNDS = {"lr": (1e-8, 10.0), "momentum": (1e-6, 1 - 1e-6), "weight_decay": (1e-10, 10.0)}
HIDDEN = 50
DEFAULT_HYPER_LR = 0.05  # HyperSGD's default hyper-optimizer step
SPLIT_SEED = 0


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    steps: int = 2000
    batch_size: int = 64
    update_interval: int = 10  # T
    neumann_steps: int = 4  # K
    unroll: int = 5  # unrolled_5 differentiates through this many of every T steps
    hyper_lr: float = DEFAULT_HYPER_LR  # the hyper-optimizer's step on the unconstrained values
    deviation_lr: float = 0.002  # SharedAdam's, for per-weight values (HyperSGD's default)
    hvp: str = "forward_difference"  # c = 1 product per closure call: the cheapest floor
    trajectory_every: int = 10
    trajectory_seeds: int = 3

    def key(self) -> str:
        """A short hash: records made under another configuration are not mixed in."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# -- data and model --------------------------------------------------------------------------


@dataclass
class Data:
    name: str
    task: str  # "classification" or "regression"
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    outputs: int


def load(name: str) -> Data:
    """One of scikit-learn's bundled datasets, split 60/20/20 with a fixed seed and
    standardised on the training part (inputs; and the target, for regression)."""
    from sklearn import datasets

    loaders = {
        "digits": datasets.load_digits,
        "breast_cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
        "diabetes": datasets.load_diabetes,
    }
    if name not in loaders:
        raise ValueError(f"dataset must be one of {sorted(loaders)}, got {name!r}")
    x, y = loaders[name](return_X_y=True)
    return split(x, y, "regression" if name == "diabetes" else "classification", name)


def split(x: np.ndarray, y: np.ndarray, task: str, name: str) -> Data:
    """``(x, y)`` split 60/20/20 with a fixed seed (stratified for classification) and
    standardised on the training part: the inputs, and the target for ``task="regression"``."""
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    stratify = y if task == "classification" else None
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=0.2, random_state=SPLIT_SEED, stratify=stratify
    )
    stratify = y_rest if task == "classification" else None
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=0.25, random_state=SPLIT_SEED, stratify=stratify
    )
    scaler = StandardScaler().fit(x_train)

    def features(a: np.ndarray) -> Tensor:
        return torch.tensor(scaler.transform(a), dtype=torch.float32)

    if task == "classification":

        def targets(a: np.ndarray) -> Tensor:
            return torch.tensor(a, dtype=torch.long)

        outputs = int(y.max()) + 1
    else:
        mean, std = float(y_train.mean()), float(y_train.std())

        def targets(a: np.ndarray) -> Tensor:
            return torch.tensor((a - mean) / std, dtype=torch.float32).unsqueeze(1)

        outputs = 1
    return Data(
        name,
        task,
        features(x_train),
        targets(y_train),
        features(x_val),
        targets(y_val),
        features(x_test),
        targets(y_test),
        outputs,
    )


def loss_fn(data: Data) -> Callable[[Tensor, Tensor], Tensor]:
    return cross_entropy if data.task == "classification" else mse_loss


def make_model(data: Data, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(data.x_train.shape[1], HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, data.outputs)
        )


def batches(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless minibatch indices: shuffled epochs (last partial batch dropped)."""
    size = min(batch_size, n)
    generator = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - size + 1, size):
            yield perm[start : start + size]


def draw_hyperparameters(rng: np.random.Generator) -> dict[str, float]:
    """The paper's ranges: log-uniform lr and weight decay, uniform momentum."""
    return {
        "lr": float(10 ** rng.uniform(*LOG10_LR)),
        "momentum": float(np.clip(rng.uniform(*MOMENTUM), *MOMENTUM_CLIP)),
        "weight_decay": float(10 ** rng.uniform(*LOG10_WD)),
    }


# -- one training run ------------------------------------------------------------------------


@dataclass
class Run:
    test_loss: float
    val_loss: float
    seconds: float
    final: dict[str, float]
    trajectory: dict[str, list[float]] = field(default_factory=dict)
    trials: int = 1


def evaluate(model: nn.Module, data: Data) -> tuple[float, float]:
    """(validation loss, test loss) of the model; inf when not finite."""
    fn = loss_fn(data)
    with torch.no_grad():
        val = float(fn(model(data.x_val), data.y_val))
        test = float(fn(model(data.x_test), data.y_test))
    return (val if math.isfinite(val) else math.inf, test if math.isfinite(test) else math.inf)


def group_values(opt: torch.optim.Optimizer) -> dict[str, float]:
    group = opt.param_groups[0]
    return {name: float(group[name]) for name in LEARNED}


def make_optimizer(
    model: nn.Module, data: Data, init: dict[str, float], options: dict[str, Any] | None
) -> torch.optim.Optimizer:
    """``options=None``: torch.optim.SGD at ``init``; else HyperSGD(**init, **options) with the
    full validation set as its validation closure."""
    from hyperopt_optim import HyperSGD

    if options is None:
        return torch.optim.SGD(model.parameters(), **init)
    fn = loss_fn(data)
    hyper = HyperSGD(model.parameters(), **init, **options)
    hyper.register_validation_closure(lambda: fn(model(data.x_val), data.y_val))
    return hyper


def torch_closure(
    opt: torch.optim.Optimizer,
    model: nn.Module,
    fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
) -> Callable[[], Tensor]:
    """torch's closure on one batch: zero the gradients, compute the loss, backward."""

    def closure() -> Tensor:
        opt.zero_grad()
        loss = fn(model(x), y)
        loss.backward()
        return loss

    return closure


def train_torch_or_hyper(
    data: Data,
    seed: int,
    init: dict[str, float],
    config: Config,
    options: dict[str, Any] | None,
    record: bool,
) -> Run:
    """``options=None``: torch.optim.SGD with ``init`` kept; else HyperSGD(**options)."""
    model = make_model(data, seed)
    fn = loss_fn(data)
    opt = make_optimizer(model, data, init, options)
    order = batches(len(data.x_train), config.batch_size, seed)
    trajectory: dict[str, list[float]] = {name: [] for name in ("step", *LEARNED)}
    start = time.perf_counter()
    for t in range(config.steps):
        index = next(order)
        x, y = data.x_train[index], data.y_train[index]
        opt.step(torch_closure(opt, model, fn, x, y))
        if record and (t + 1) % config.trajectory_every == 0:
            trajectory["step"].append(t + 1)
            for name, value in group_values(opt).items():
                trajectory[name].append(value)
    seconds = time.perf_counter() - start
    val, test = evaluate(model, data)
    return Run(test, val, seconds, group_values(opt), trajectory if record else {})


def natural(phi: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """λ from φ: ``exp`` of log lr and log weight decay, ``sigmoid`` of logit momentum."""
    return {
        "lr": phi["lr"].exp().to(dtype),
        "momentum": torch.sigmoid(phi["momentum"]).to(dtype),
        "weight_decay": phi["weight_decay"].exp().to(dtype),
    }


def sgd_step(
    model: nn.Module,
    fn: Callable[[Tensor, Tensor], Tensor],
    weights: list[Tensor],
    buffers: list[Tensor] | None,
    lam: dict[str, Tensor],
    batch: tuple[Tensor, Tensor],
    create_graph: bool,
) -> tuple[list[Tensor], list[Tensor]]:
    """One step of torch's SGD (dampening 0) as a function of the weights, the momentum
    buffers (``None`` before the first step) and λ: ``b ← μ b + (g + ξ w)`` (``b = g + ξ w``
    first), ``w ← w − η b``; differentiable in all of them when ``create_graph``."""
    names = [n for n, _ in model.named_parameters()]
    x, y = batch
    loss = fn(functional_call(model, dict(zip(names, weights, strict=True)), (x,)), y)
    grads = torch.autograd.grad(loss, weights, create_graph=create_graph)
    directions = [g + lam["weight_decay"] * w for g, w in zip(grads, weights, strict=True)]
    if buffers is None:
        buffers = directions
    else:
        buffers = [lam["momentum"] * b + d for b, d in zip(buffers, directions, strict=True)]
    return [w - lam["lr"] * b for w, b in zip(weights, buffers, strict=True)], buffers


def to_phi(init: dict[str, float]) -> dict[str, Tensor]:
    """The unconstrained float64 leaves φ for λ = ``init``."""
    m = init["momentum"]
    values = {
        "lr": math.log(init["lr"]),
        "momentum": math.log(m / (1 - m)),
        "weight_decay": math.log(init["weight_decay"]),
    }
    return {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in values.items()}


def train_unrolled(
    data: Data,
    seed: int,
    init: dict[str, float],
    config: Config,
    record: bool,
    hyper_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
) -> Run:
    """SGD with momentum whose lr, momentum and weight decay learn by exact reverse-mode
    differentiation through the last ``config.unroll`` of every ``T`` steps.

    The weights and buffers are detached ``unroll`` steps before each hyper-step; the
    following steps (:func:`sgd_step`) are taken with ``create_graph=True``, so the validation
    loss after them differentiates exactly to φ = (log η, logit μ, log ξ), which the same
    hyper-optimizer as HyperSGD's (Adam, clipped to the same bounds) then steps
    (``hyper_optimizer`` replaces it, for tests).
    """
    model = make_model(data, seed)
    fn = loss_fn(data)
    names = [n for n, _ in model.named_parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    buffers: list[Tensor] | None = None
    phi = to_phi(init)
    hyper_opt = (hyper_optimizer or (lambda ps: torch.optim.Adam(ps, lr=config.hyper_lr)))(
        list(phi.values())
    )
    low = to_phi({k: v[0] for k, v in BOUNDS.items()})
    high = to_phi({k: v[1] for k, v in BOUNDS.items()})
    interval = config.update_interval
    order = batches(len(data.x_train), config.batch_size, seed)
    trajectory: dict[str, list[float]] = {name: [] for name in ("step", *LEARNED)}
    start = time.perf_counter()
    for t in range(config.steps):
        tracked = t % interval >= interval - config.unroll
        if not tracked or t % interval == interval - config.unroll:
            weights = [w.detach().requires_grad_() for w in weights]
            buffers = None if buffers is None else [b.detach() for b in buffers]
        lam = natural(phi)
        if not tracked:
            lam = {k: v.detach() for k, v in lam.items()}
        index = next(order)
        batch = (data.x_train[index], data.y_train[index])
        weights, buffers = sgd_step(model, fn, weights, buffers, lam, batch, tracked)
        if (t + 1) % interval == 0:
            val_out = functional_call(model, dict(zip(names, weights, strict=True)), (data.x_val,))
            val = fn(val_out, data.y_val)
            hypergradients = torch.autograd.grad(val, list(phi.values()), allow_unused=True)
            if all(h is not None and bool(torch.isfinite(h)) for h in hypergradients):
                for p, h in zip(phi.values(), hypergradients, strict=True):
                    p.grad = h
                hyper_opt.step()
                with torch.no_grad():
                    for name, p in phi.items():
                        p.clamp_(low[name], high[name])
        if record and (t + 1) % config.trajectory_every == 0:
            trajectory["step"].append(t + 1)
            for name, value in natural(phi).items():
                trajectory[name].append(float(value.detach()))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights, strict=True):
            p.copy_(w)
    val_loss, test_loss = evaluate(model, data)
    final = {name: float(v.detach()) for name, v in natural(phi).items()}
    return Run(test_loss, val_loss, seconds, final, trajectory if record else {})


def search(data: Data, seed: int, config: Config, trials: int, sampler: str) -> Run:
    """Black-box search: ``trials`` full trainings with fixed values drawn from the ranges
    (``random``) or proposed by Optuna's TPE (``tpe``); the best final validation loss wins."""
    runs: list[Run] = []
    start = time.perf_counter()
    if sampler == "random":
        rng = np.random.default_rng([seed, 1])
        for _ in range(trials):
            init = draw_hyperparameters(rng)
            runs.append(train_torch_or_hyper(data, seed, init, config, None, False))
    else:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Optuna's default: the first 10 trials are drawn at random, the model-based proposals
        # start after them. At equal compute (a few trials) that is all TPE gets to do; the
        # default is kept, as a user would run it (see docs/results.md).
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))

        def objective(trial: optuna.Trial) -> float:
            init = {
                "lr": trial.suggest_float("lr", 10 ** LOG10_LR[0], 10 ** LOG10_LR[1], log=True),
                "momentum": trial.suggest_float("momentum", *MOMENTUM_CLIP),
                "weight_decay": trial.suggest_float(
                    "weight_decay", 10 ** LOG10_WD[0], 10 ** LOG10_WD[1], log=True
                ),
            }
            run = train_torch_or_hyper(data, seed, init, config, None, False)
            runs.append(run)
            return run.val_loss if math.isfinite(run.val_loss) else 1e300

        study.optimize(objective, n_trials=trials)
    seconds = time.perf_counter() - start
    best = min(runs, key=lambda r: r.val_loss)
    return Run(best.test_loss, best.val_loss, seconds, best.final, {}, trials)


HYPER_OPTIONS: dict[str, dict[str, Any]] = {
    "hd": {"learn": ("lr",), "method": "hd"},
    "greedy": {"learn": LEARNED, "method": "greedy"},
    "ift_wd_lr": {"learn": ("lr", "weight_decay"), "method": "ift"},
    "ift_wd_lr_m": {"learn": LEARNED, "method": "ift"},
    "ift_wd_elementlr_m": {"learn": LEARNED, "method": "ift", "granularity": {"lr": "element"}},
}
# the same run, with plain Adam as the hyper-optimizer (hyper_options tells them apart)
HYPER_OPTIONS["ift_wd_elementlr_m_adam"] = HYPER_OPTIONS["ift_wd_elementlr_m"]


def hyper_options(method: str, config: Config) -> dict[str, Any]:
    from hyperopt_optim import SharedAdam

    options = dict(HYPER_OPTIONS[method])
    lr = config.hyper_lr
    if method.endswith("_adam"):  # plain Adam on every per-weight value, as the paper did
        options["hyper_optimizer"] = lambda params: torch.optim.Adam(params, lr=lr)
    elif "granularity" in options:  # per-weight lr: SharedAdam, spelled out for the record
        deviation_lr = config.deviation_lr
        options["hyper_optimizer"] = lambda params: SharedAdam(
            params, lr=lr, deviation_lr=deviation_lr
        )
    elif lr != DEFAULT_HYPER_LR:  # else: HyperSGD's own default
        options["hyper_optimizer"] = lambda params: torch.optim.Adam(params, lr=lr)
    if method != "hd":
        options["update_interval"] = config.update_interval
    if options["method"] == "ift":
        options["neumann_steps"] = config.neumann_steps
        options["hvp"] = config.hvp
    return options


_WARM = False


def run_seed(job: tuple[str, int, Config, tuple[str, ...]]) -> dict[str, Any]:
    """Every method on one dataset and one seed, in this process (timings side by side)."""
    name, seed, config, methods = job
    torch.set_num_threads(1)
    data = load(name)
    global _WARM
    if not _WARM:  # the first torch calls of a process are slow: not in anyone's timing
        warm = Config(steps=2 * config.update_interval, batch_size=config.batch_size)
        train_torch_or_hyper(
            data,
            0,
            {"lr": 1e-3, "momentum": 0.5, "weight_decay": 1e-4},
            warm,
            hyper_options("ift_wd_lr_m", warm),
            False,
        )
        _WARM = True
    init = draw_hyperparameters(np.random.default_rng([seed, 0]))
    record = seed < config.trajectory_seeds
    runs: dict[str, Run] = {}
    # fixed and ift_wd_lr_m first: they set the black-box searches' budget
    order = sorted(methods, key=lambda m: (m not in ("fixed", "ift_wd_lr_m"), METHODS.index(m)))
    for method in order:
        if method == "fixed":
            runs[method] = train_torch_or_hyper(data, seed, init, config, None, record)
        elif method == "unrolled_5":
            runs[method] = train_unrolled(data, seed, init, config, record)
        elif method in ("random_search", "tpe"):
            ratio = runs["ift_wd_lr_m"].seconds / runs["fixed"].seconds
            trials = max(1, math.ceil(ratio))
            sampler = "random" if method == "random_search" else "tpe"
            runs[method] = search(data, seed, config, trials, sampler)
        else:
            options = hyper_options(method, config)
            runs[method] = train_torch_or_hyper(data, seed, init, config, options, record)
    return {
        "dataset": name,
        "seed": seed,
        "config": config.key(),
        "init": init,
        "runs": {m: asdict(runs[m]) for m in methods},
    }


# -- summary ---------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile in which +inf (a diverged run) sorts last."""
    xs = sorted(values)
    h = (len(xs) - 1) * q
    lo, hi = math.floor(h), math.ceil(h)
    if lo == hi or xs[lo] == xs[hi]:
        return xs[lo]
    if math.isinf(xs[hi]):
        return math.inf
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def summarise(records: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in DATASETS:
        rows = [r for r in records if r["dataset"] == name]
        if not rows:
            continue
        out[name] = {}
        for method in methods:
            losses = [r["runs"][method]["test_loss"] for r in rows]
            finite = [x for x in losses if math.isfinite(x)]
            ratios = [r["runs"][method]["seconds"] / r["runs"]["fixed"]["seconds"] for r in rows]
            out[name][method] = {
                "mean": finite_or_none(statistics.fmean(finite)) if finite else None,
                "median": finite_or_none(quantile(losses, 0.5)),
                "q25": finite_or_none(quantile(losses, 0.25)),
                "q75": finite_or_none(quantile(losses, 0.75)),
                "diverged": len(losses) - len(finite),
                "seconds_ratio": statistics.median(ratios),
            }
    return out


def number(x: float | None) -> str:
    return "∞" if x is None else f"{x:.3g}"


def table(summary: dict[str, Any], records: list[dict[str, Any]]) -> str:
    lines = []
    for name, methods in summary.items():
        seeds = sum(1 for r in records if r["dataset"] == name)
        lines += [
            f"**{name}** ({seeds} seeds; final test loss)",
            "",
            "| method | median | q25 | q75 | mean (finite) | diverged | time / fixed |",
            "|---|---|---|---|---|---|---|",
        ]
        for method, s in methods.items():
            lines.append(
                f"| `{method}` | {number(s['median'])} | {number(s['q25'])} | "
                f"{number(s['q75'])} | {number(s['mean'])} | {s['diverged']} | "
                f"{s['seconds_ratio']:.2f}x |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], methods: Sequence[str], out: Path, prefix: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in DATASETS if any(r["dataset"] == n for r in records)]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rows = [r for r in records if r["dataset"] == name]
        data = []
        for method in methods:
            losses = [r["runs"][method]["test_loss"] for r in rows]
            data.append([x for x in losses if math.isfinite(x)] or [math.nan])
            diverged = len(losses) - sum(math.isfinite(x) for x in losses)
            if diverged:
                ax.annotate(
                    f"{diverged}✗",
                    (len(data), 1.0),
                    xycoords=("data", "axes fraction"),
                    ha="center",
                    va="bottom",
                    color="red",
                    fontsize=8,
                )
        ax.boxplot(data, showfliers=True)
        ax.set_xticks(range(1, len(methods) + 1), methods, rotation=60, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{name} ({len(rows)} seeds)")
        ax.set_ylabel("final test loss")
    fig.tight_layout()
    fig.savefig(out / f"{prefix}_boxplots.png", dpi=110)
    plt.close(fig)

    learners = [m for m in methods if m not in ("fixed", "random_search", "tpe")]
    traced = [r for r in records if r["runs"][learners[0]]["trajectory"]] if learners else []
    if not traced:
        return
    traced.sort(key=lambda r: (DATASETS.index(r["dataset"]), r["seed"]))
    dataset = traced[0]["dataset"]
    traced = [r for r in traced if r["dataset"] == dataset][:3]
    fig, axes = plt.subplots(
        len(traced), 3, figsize=(13, 3.2 * len(traced)), squeeze=False, sharex=True
    )
    colours = plt.get_cmap("tab10")
    for row, r in zip(axes, traced, strict=True):
        for col, hp in enumerate(LEARNED):
            ax = row[col]
            for i, method in enumerate(learners):
                tr = r["runs"][method]["trajectory"]
                ax.plot(tr["step"], tr[hp], label=method, color=colours(i), lw=1.2)
            ax.set_yscale("logit" if hp == "momentum" else "log")
            shown = f"{hp} (per-weight: the mean)" if hp == "lr" else hp
            ax.set_title(f"{dataset}, seed {r['seed']}: {shown}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / f"{prefix}_trajectories.png", dpi=110)
    plt.close(fig)


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else open(os.devnull) as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, default=50, help="initialisations per dataset")
    parser.add_argument("--steps", type=int, default=Config.steps)
    parser.add_argument("--batch-size", type=int, default=Config.batch_size)
    parser.add_argument("--hvp", default=Config.hvp, help="HyperSGD's hvp for the ift methods")
    parser.add_argument("--workers", type=int, default=1, help="processes (one thread each)")
    parser.add_argument("--smoke", action="store_true", help="2 seeds, 40 steps, digits")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="a remark on the machine, kept in the meta")
    args = parser.parse_args(argv)

    methods = tuple(m for m in METHODS if m in args.methods)
    if {"random_search", "tpe"} & set(methods):
        methods = tuple(m for m in METHODS if m in {*methods, "fixed", "ift_wd_lr_m"})
    elif "fixed" not in methods:
        methods = ("fixed", *methods)  # the reference of every time ratio
    if args.smoke:
        args.datasets, args.seeds, args.steps = ["digits"], 2, 40
    config = Config(steps=args.steps, batch_size=args.batch_size, hvp=args.hvp)
    prefix = "tuning_smoke" if args.smoke else "tuning"
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / f"{prefix}_runs.jsonl"

    kept: dict[tuple[str, int], dict[str, Any]] = {}  # the last record of each dataset-seed
    if raw.exists():
        for line in raw.read_text().splitlines():
            r = json.loads(line)
            if r["config"] == config.key() and set(methods) <= set(r["runs"]):
                kept[(r["dataset"], r["seed"])] = r
    records = list(kept.values())
    done = set(kept)
    jobs = [
        (name, seed, config, methods)
        for seed in range(args.seeds)
        for name in args.datasets
        if (name, seed) not in done
    ]
    from tqdm import tqdm

    print(f"{len(done)} dataset-seeds already in {raw}; {len(jobs)} to run", file=sys.stderr)
    with raw.open("a") as f:
        if args.workers > 1:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(args.workers) as pool:
                results = pool.imap_unordered(run_seed, jobs)
                for record in tqdm(results, total=len(jobs), desc="dataset-seeds"):
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    records.append(record)
        else:
            for job in tqdm(jobs, desc="dataset-seeds"):
                record = run_seed(job)
                f.write(json.dumps(record) + "\n")
                f.flush()
                records.append(record)

    records = [r for r in records if r["dataset"] in args.datasets and r["seed"] < args.seeds]
    summary = summarise(records, methods)
    (args.out / f"{prefix}.json").write_text(json.dumps(summary, indent=1) + "\n")
    searches = [m for m in ("random_search", "tpe") if m in methods]
    trials = [r["runs"][m]["trials"] for r in records for m in searches]
    meta = {
        "config": asdict(config),
        "config_key": config.key(),
        "datasets": args.datasets,
        "seeds": args.seeds,
        "methods": list(methods),
        "black_box_trials": {  # per search (random_search and tpe have the same budget)
            "min": min(trials, default=0),
            "median": statistics.median(trials) if trials else 0,
            "max": max(trials, default=0),
        },
        "machine": machine(),
        "note": args.note,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/tuning.py", *(argv or sys.argv[1:])]),
    }
    (args.out / f"{prefix}_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    m = meta["machine"]
    header = (
        f"Measured on {m['cpu']} ({m['cores']} cores), Python {m['python']}, torch "
        f"{m['torch']}, {meta['date']}; configuration {config.key()}: {asdict(config)}.\n\n"
    )
    (args.out / f"{prefix}.md").write_text(header + table(summary, records))
    plot(records, methods, args.out, prefix)
    print(table(summary, records))


if __name__ == "__main__":
    main()
