"""Loss hyperparameters: overfitting a small validation set, and per-weight decay on noisy labels.

``loss_hyperparameters=[mu]`` lets HyperSGD (``method="ift"``) learn tensors that the training
loss reads, by implicit differentiation (Lorraine, Vicol & Duvenaud 2020, arXiv 1911.02590).
Here ``mu`` is a log weight decay: the training loss is

    L_T(w, mu) = CE(train) + 1/2 * sum_i exp(mu_i) * w_i^2

over every weight and bias of the model, with either ONE ``mu`` (a global weight decay, a
scalar broadcast over the weights) or one ``mu_i`` PER WEIGHT (as many loss hyperparameters as
weights).  The hyper-objective is the cross-entropy on the validation set.

Data: scikit-learn's digits (1,797 8x8 images, pixels / 16), one fixed stratified split:
50% train (898), 10% validation (179: small, so that it can be overfit) and 40% test (720).
Model: an MLP 64-50-10 with ReLU (3,760 weights and biases).  Every run is full-batch SGD
(lr 0.1, momentum 0.9) on the whole training set, so the only randomness is the
initialisation (and, in experiment 2, which labels are flipped).  HyperSGD takes a hyper-step
every T = 10 steps with ``learn=()`` (the lr and momentum stay fixed: only ``mu`` learns), by
default with ``solver="neumann"`` and K = 4 terms; ``mu`` starts at log(1e-4) and is stepped
by ``torch.optim.Adam`` with each step of ``Settings.hyper_lrs`` (0.01 is the package's
default).  The closure returns the loss without calling ``backward()``, so the products are
exact (double backward).  HyperSGD's divergence guard stays on; its restores are counted.

0. Check (a few seconds): on a logistic regression trained to a stationary point (float64),
   the package's hypergradient ``dL_V/dmu`` of a per-weight decay against the exact one of
   the implicit function theorem, ``-grad L_V^T H^-1 d(grad_w L_T)/dmu``, with the Hessian
   formed and solved densely (``solver="cg"``, and the K-term Neumann series).

1. Capacity (Lorraine et al.'s "overfitting the validation set"): clean labels, seed 0; a
   global decay against a per-weight decay, with each solver (Neumann K = 4, cg K = 20) and
   every hyper-optimizer lr.  The train, validation and test losses are recorded along the
   run; the figure shows, per variant, the hyper-optimizer lr that reached the lowest final
   validation loss (the hyper-objective).

2. Noisy labels: 20% of the TRAINING labels are replaced by a random wrong class (validation
   and test labels are clean); per seed (initialisation and flipped labels): (a) no weight
   decay, (b) a learned global decay, (c) a learned per-weight decay, both with the Neumann
   series (K = 4), (b') and (c') the same with ``solver="cg"`` (K = 20 conjugate-gradient
   iterations), and (d) the best fixed global decay in hindsight: a log-spaced grid of 9
   values, picked per seed by final validation loss and reported on test.  The learned
   variants run every hyper-optimizer lr; the one reported is picked by mean final
   validation loss over the seeds (never by test loss); the tables list every one.

Run (from the repository root; one thread):

    python benchmarks/loss_hyper_capacity.py            # the full run (about 15 min)
    python benchmarks/loss_hyper_capacity.py --quick    # a smoke run (< 60 s), *_quick outputs

``--seeds N`` changes experiment 2's seeds (default 3); ``--out DIR`` the results folder;
``--replot`` rewrites the report and the figures from the saved JSON without rerunning.

Outputs (``--out``, default ``benchmarks/results``): ``loss_hyper_capacity.json`` (settings,
machine, every curve and number), ``loss_hyper_capacity.md`` (the tables),
``loss_hyper_capacity.png`` (experiment 1) and ``loss_hyper_noisy_labels.png`` (experiment 2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

from hyperopt_optim import HyperSGD

RESULTS = Path(__file__).resolve().parent / "results"
SPLIT_SEED = 0
CLASSES = 10
HIDDEN = 50
DIVERGED = r".*the training loss diverged.*"  # HyperSGD's divergence guard (counted instead)
# experiment 2's learned variants: (name, a decay per weight, solver)
VARIANTS = (
    ("global", False, "neumann"),
    ("per_weight", True, "neumann"),
    ("global_cg", False, "cg"),
    ("per_weight_cg", True, "cg"),
)


@dataclass(frozen=True)
class Settings:
    steps_capacity: int = 10_000
    steps_noisy: int = 4_000
    seeds: int = 3
    hyper_lrs: tuple[float, ...] = (0.01, 0.03, 0.1)
    grid: tuple[float, ...] = tuple(float(x) for x in np.logspace(-5, -1, 9))
    lr: float = 0.1
    momentum: float = 0.9
    neumann_steps: int = 4
    cg_steps: int = 20
    update_interval: int = 10
    init_decay: float = 1e-4
    noise: float = 0.2
    record_every: int = 50


QUICK = Settings(
    steps_capacity=100,
    steps_noisy=100,
    seeds=2,
    hyper_lrs=(0.1,),
    grid=(1e-3, 1e-2),
    record_every=20,
)


# -- data and model ------------------------------------------------------------------------------


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits_split() -> Data:
    """Digits, pixels / 16, split 50/10/40 (stratified, fixed seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, train_size=0.5, random_state=SPLIT_SEED, stratify=y
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, train_size=0.2, random_state=SPLIT_SEED, stratify=y_rest
    )

    def features(a: np.ndarray) -> Tensor:
        return torch.tensor(a, dtype=torch.float32)

    def labels(a: np.ndarray) -> Tensor:
        return torch.tensor(a, dtype=torch.long)

    return Data(
        features(x_train),
        labels(y_train),
        features(x_val),
        labels(y_val),
        features(x_test),
        labels(y_test),
    )


def flip_labels(data: Data, fraction: float, seed: int) -> tuple[Data, int]:
    """``data`` with ``round(fraction * n)`` training labels replaced by a random wrong class
    (the validation and test labels untouched); the number flipped."""
    rng = np.random.default_rng(1000 + seed)
    y = data.y_train.numpy().copy()
    flipped = rng.choice(len(y), size=round(fraction * len(y)), replace=False)
    y[flipped] = (y[flipped] + rng.integers(1, CLASSES, size=len(flipped))) % CLASSES
    noisy = Data(
        data.x_train,
        torch.tensor(y, dtype=torch.long),
        data.x_val,
        data.y_val,
        data.x_test,
        data.y_test,
    )
    return noisy, len(flipped)


def make_mlp(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def penalty(params: Sequence[Tensor], mu: Tensor) -> Tensor:
    """``1/2 sum_i exp(mu_i) w_i^2`` over every weight (``mu`` a scalar or one per weight)."""
    flat = torch.cat([p.reshape(-1) for p in params])
    return 0.5 * (mu.exp() * flat.square()).sum()


# -- training --------------------------------------------------------------------------------


@dataclass
class Curves:
    step: list[int]
    train: list[float]
    val: list[float]
    test: list[float]
    test_acc: list[float]
    decay_median: list[float]
    decay_min: list[float]
    decay_max: list[float]


def new_curves() -> Curves:
    return Curves([], [], [], [], [], [], [], [])


@torch.no_grad()
def record(curves: Curves, step: int, model: nn.Module, data: Data, decay: Tensor) -> None:
    curves.step.append(step)
    curves.train.append(float(cross_entropy(model(data.x_train), data.y_train)))
    curves.val.append(float(cross_entropy(model(data.x_val), data.y_val)))
    logits = model(data.x_test)
    curves.test.append(float(cross_entropy(logits, data.y_test)))
    curves.test_acc.append(float((logits.argmax(1) == data.y_test).float().mean()))
    curves.decay_median.append(float(decay.median()))
    curves.decay_min.append(float(decay.min()))
    curves.decay_max.append(float(decay.max()))


def final(curves: Curves) -> dict[str, float]:
    return {
        "train": curves.train[-1],
        "val": curves.val[-1],
        "test": curves.test[-1],
        "test_acc": curves.test_acc[-1],
        "test_min": min(curves.test),
        "test_min_step": curves.step[int(np.argmin(curves.test))],
        "decay_median": curves.decay_median[-1],
    }


def train_fixed(data: Data, seed: int, decay: float, steps: int, s: Settings) -> dict[str, Any]:
    """``torch.optim.SGD`` on ``CE + decay/2 |w|^2`` (``decay = 0``: no weight decay)."""
    model = make_mlp(seed)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum)
    mu = torch.tensor(math.log(decay) if decay > 0 else -math.inf)
    curves = new_curves()
    start = time.perf_counter()
    for t in range(steps):
        if t % s.record_every == 0:
            record(curves, t, model, data, mu.exp())
        opt.zero_grad()
        loss = cross_entropy(model(data.x_train), data.y_train)
        if decay > 0:
            loss = loss + penalty(params, mu)
        loss.backward()
        opt.step()
    record(curves, steps, model, data, mu.exp())
    return {
        "decay": decay,
        "curves": asdict(curves),
        "final": final(curves),
        "seconds": time.perf_counter() - start,
    }


def train_learned(
    data: Data,
    seed: int,
    per_weight: bool,
    hyper_lr: float,
    steps: int,
    s: Settings,
    keep_decays: bool = False,
    solver: str = "neumann",
    neumann_steps: int | None = None,
) -> dict[str, Any]:
    """HyperSGD, ``method="ift"``, learning ``mu`` (one, or one per weight) and nothing else."""
    model = make_mlp(seed)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    mu = torch.full((n,) if per_weight else (), math.log(s.init_decay), requires_grad=True)

    def hyper_optimizer(ps: list[Tensor]) -> torch.optim.Optimizer:
        return torch.optim.Adam(ps, lr=hyper_lr)

    opt = HyperSGD(
        params,
        lr=s.lr,
        momentum=s.momentum,
        method="ift",
        learn=(),
        loss_hyperparameters=[mu],
        loss_hyper_optimizer=hyper_optimizer,
        neumann_steps=s.neumann_steps if neumann_steps is None else neumann_steps,
        update_interval=s.update_interval,
        solver=solver,
    )
    opt.register_validation_closure(lambda: cross_entropy(model(data.x_val), data.y_val))

    def closure() -> Tensor:  # no backward(): exact products by double backward
        return cross_entropy(model(data.x_train), data.y_train) + penalty(params, mu)

    curves = new_curves()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DIVERGED, category=RuntimeWarning)
        for t in range(steps):
            if t % s.record_every == 0:
                record(curves, t, model, data, mu.detach().exp())
            opt.step(closure)
    record(curves, steps, model, data, mu.detach().exp())
    seconds = time.perf_counter() - start
    decays = mu.detach().exp()
    # SGD with momentum on 1/2 decay w^2 is unstable past lr * decay = 2 (1 + momentum)
    unstable = 2 * (1 + s.momentum) / s.lr
    out: dict[str, Any] = {
        "per_weight": per_weight,
        "hyper_lr": hyper_lr,
        "solver": solver,
        "neumann_steps": s.neumann_steps if neumann_steps is None else neumann_steps,
        "curves": asdict(curves),
        "final": final(curves),
        "seconds": seconds,
        "counters": opt.hyper_state,
        "decay_quantiles": {
            str(q): float(decays.reshape(-1).quantile(q)) for q in (0.0, 0.1, 0.5, 0.9, 1.0)
        },
        "decays_past_stability": int((decays > unstable).sum()),
        "stability_bound": unstable,
    }
    if keep_decays:
        out["decays"] = decays.reshape(-1).tolist()
    return out


# -- experiment 0: the hypergradient against a dense solve -----------------------------------


def hypergradient_check() -> list[dict[str, Any]]:
    """The package's ``dL_V/dmu`` at a stationary point against the implicit function
    theorem with the dense Hessian (logistic regression 64x10, 300 digits, float64)."""
    data = load_digits_split()
    x_tr, y_tr = data.x_train[:200].double(), data.y_train[:200]
    x_v, y_v = data.x_val[:100].double(), data.y_val[:100]
    mu = torch.full((64, 10), -3.0, dtype=torch.float64, requires_grad=True)
    lr = 0.5

    def train_loss(w: Tensor) -> Tensor:
        return cross_entropy(x_tr @ w, y_tr) + 0.5 * (mu.exp() * w.square()).sum()

    def val_loss(w: Tensor) -> Tensor:
        return cross_entropy(x_v @ w, y_v)

    w = torch.zeros(64, 10, dtype=torch.float64, requires_grad=True)
    plain = torch.optim.SGD([w], lr=lr)
    for _ in range(3000):
        plain.zero_grad()
        train_loss(w).backward()
        plain.step()
    point = w.detach().clone()
    # the dense reference at the point
    wf = point.clone().requires_grad_(True)
    g = torch.autograd.grad(train_loss(wf), wf, create_graph=True)[0].reshape(-1)
    eye = torch.eye(g.numel(), dtype=torch.float64)
    H = torch.stack([torch.autograd.grad(g, wf, e, retain_graph=True)[0].reshape(-1) for e in eye])
    gv = torch.autograd.grad(val_loss(wf), wf)[0].reshape(-1)
    exact = torch.autograd.grad(g, mu, -torch.linalg.solve(H, gv), retain_graph=True)[0]

    def series(k: int) -> Tensor:
        """The K-term Neumann series SGD's one-pass method sums: lr sum_j (I - lr H)^j."""
        term, total = gv.clone(), gv.clone()
        for _ in range(k):
            term = term - lr * (H @ term)
            total = total + term
        return torch.autograd.grad(g, mu, -lr * total, retain_graph=True)[0]

    def relative(a: Tensor, b: Tensor) -> float:
        return float((a - b).norm() / b.norm())

    def cosine(a: Tensor, b: Tensor) -> float:
        return float(torch.cosine_similarity(a.reshape(-1), b.reshape(-1), dim=0))

    rows = []
    for solver, k, products in (
        ("cg", 50, "autograd"),
        ("cg", 50, "finite differences"),
        ("neumann", 4, "autograd"),
        ("neumann", 4, "finite differences"),
        ("neumann", 200, "autograd"),
    ):
        with torch.no_grad():
            w.copy_(point)
        opt = HyperSGD(
            [w],
            lr=lr,
            method="ift",
            learn=(),
            loss_hyperparameters=[mu],
            loss_hyper_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0),
            neumann_steps=k,
            update_interval=1,
            solver=solver,
        )
        opt.register_validation_closure(lambda: val_loss(w))
        if products == "autograd":

            def closure() -> Tensor:
                return train_loss(w)

        else:

            def closure() -> Tensor:  # torch's: forward finite differences
                w.grad = None
                loss = train_loss(w)
                loss.backward()
                return loss

        opt.step(closure)
        got = opt.loss_hypergradients()[0]
        rows.append(
            {
                "solver": solver,
                "K": k,
                "products": products,
                "rel_err_vs_exact": relative(got, exact),
                "cos_vs_exact": cosine(got, exact),
                "rel_err_vs_own_series": relative(got, series(k)) if solver == "neumann" else None,
                "gradient_norm_at_point": float(g.detach().norm()),
            }
        )
    return rows


# -- the experiments ---------------------------------------------------------------------------


def argmin(values: Sequence[float]) -> int:
    """The index of the smallest value (the first, on ties)."""
    return int(np.argmin(values))


def capacity(data: Data, s: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in VARIANTS}
    for name, per_weight, solver in VARIANTS:
        k = s.cg_steps if solver == "cg" else s.neumann_steps
        for hyper_lr in s.hyper_lrs:
            run = train_learned(
                data, 0, per_weight, hyper_lr, s.steps_capacity, s, per_weight, solver, k
            )
            runs[name].append(run)
            f = run["final"]
            log(
                f"capacity {name:13s} hyper lr {hyper_lr:g}: train {f['train']:.4f} val "
                f"{f['val']:.4f} test {f['test']:.4f} ({run['seconds']:.0f} s)"
            )
    chosen = {name: argmin([run["final"]["val"] for run in rs]) for name, rs in runs.items()}
    return {"runs": runs, "chosen": chosen}


def noisy_labels(data: Data, s: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    seeds: list[dict[str, Any]] = []
    for seed in range(s.seeds):
        noisy, flipped = flip_labels(data, s.noise, seed)
        none = train_fixed(noisy, seed, 0.0, s.steps_noisy, s)
        grid = [train_fixed(noisy, seed, decay, s.steps_noisy, s) for decay in s.grid]
        learned: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in VARIANTS}
        for name, per_weight, solver in VARIANTS:
            k = s.cg_steps if solver == "cg" else s.neumann_steps
            for hyper_lr in s.hyper_lrs:
                learned[name].append(
                    train_learned(
                        noisy, seed, per_weight, hyper_lr, s.steps_noisy, s, False, solver, k
                    )
                )
        for runs in (grid, *learned.values()):
            for run in runs:  # the curves of the grid and of every hyper-optimizer lr: finals only
                run.pop("curves")
        best = argmin([run["final"]["val"] for run in grid])
        seeds.append(
            {
                "seed": seed,
                "flipped": flipped,
                "none": none,
                "grid": grid,
                "grid_best": best,
                "learned": learned,
            }
        )
        log(
            f"noisy seed {seed}: none {none['final']['test']:.3f}, grid best "
            f"{s.grid[best]:.2g} {grid[best]['final']['test']:.3f}; learned (per hyper lr) "
            + "; ".join(
                f"{name} " + ", ".join(f"{r['final']['test']:.3f}" for r in runs)
                for name, runs in learned.items()
            )
        )
    chosen = {
        name: argmin(
            [
                statistics.fmean(r["learned"][name][i]["final"]["val"] for r in seeds)
                for i in range(len(s.hyper_lrs))
            ]
        )
        for name, _, _ in VARIANTS
    }
    return {"seeds": seeds, "chosen": chosen}


def noisy_methods(result: dict[str, Any], s: Settings) -> dict[str, list[dict[str, float]]]:
    """Per method, each seed's final numbers: the four methods of the table."""
    chosen = result["chosen"]
    seeds = result["seeds"]

    def learned(name: str) -> list[dict[str, float]]:
        return [r["learned"][name][chosen[name]]["final"] for r in seeds]

    def label(name: str) -> str:
        solver = f"cg K={s.cg_steps}" if name.endswith("_cg") else f"Neumann K={s.neumann_steps}"
        return f"{solver}, Adam {s.hyper_lrs[chosen[name]]:g}"

    return {
        "(a) no weight decay": [r["none"]["final"] for r in seeds],
        f"(b) learned global ({label('global')})": learned("global"),
        f"(c) learned per weight ({label('per_weight')})": learned("per_weight"),
        f"(b') learned global ({label('global_cg')})": learned("global_cg"),
        f"(c') learned per weight ({label('per_weight_cg')})": learned("per_weight_cg"),
        "(d) best fixed global in hindsight": [r["grid"][r["grid_best"]]["final"] for r in seeds],
    }


# -- reporting ---------------------------------------------------------------------------------


def mean_std(values: Sequence[float], fmt: str = ".4f") -> str:
    if len(values) < 2:
        return format(values[0], fmt)
    return f"{format(statistics.fmean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def report(results: dict[str, Any], s: Settings) -> str:
    m = results["machine"]
    lines = [
        "# Loss hyperparameters: capacity and noisy labels",
        "",
        f"Generated by `{results['command']}` on {results['date']}: {m['cpu']} "
        f"({m['cores']} cores, torch threads {m['threads']}), Python {m['python']}, torch "
        f"{m['torch']}; total {results['seconds'] / 60:.1f} min.",
        "",
        "Settings: digits (pixels/16), split 50/10/40 "
        f"({results['sizes']}), MLP 64-{HIDDEN}-10 ReLU, full batch, "
        f"SGD lr {s.lr} momentum {s.momentum}; HyperSGD method='ift', learn=(), "
        f"solver='neumann' K={s.neumann_steps} and solver='cg' K={s.cg_steps}, "
        f"T={s.update_interval}, exact products (closure without "
        f"backward); training loss CE + 1/2 sum exp(mu) w^2 over all weights and biases, "
        f"mu from log({s.init_decay:g}); hyper-optimizer torch.optim.Adam with lr in "
        f"{list(s.hyper_lrs)}. Full settings in the JSON.",
        "",
        "## 0. Hypergradient check (logistic regression at a stationary point, float64)",
        "",
        "| solver | K | products | rel. error vs dense IFT | cosine | rel. error vs own "
        "K-term series |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["check"]:
        own = row["rel_err_vs_own_series"]
        lines.append(
            f"| {row['solver']} | {row['K']} | {row['products']} | "
            f"{row['rel_err_vs_exact']:.2e} | {row['cos_vs_exact']:.6f} | "
            f"{'-' if own is None else f'{own:.2e}'} |"
        )
    cap = results["capacity"]
    lines += [
        "",
        f"## 1. Capacity: global vs per-weight decay, clean labels, {s.steps_capacity} steps, "
        "seed 0",
        "",
        "Final losses (cross-entropy; train on the training set without the penalty). "
        "`test min` is the lowest test loss along the run (recorded every "
        f"{s.record_every} steps). Marked *: the Adam lr with the lowest final validation "
        "loss (plotted).",
        "",
        "| decay | solver | Adam lr | train | val | test | test min (step) | test acc | "
        "median decay | decays > stability bound | divergences (guard) | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in cap["runs"].items():
        for i, run in enumerate(runs):
            f = run["final"]
            mark = "*" if cap["chosen"][name] == i else ""
            lines.append(
                f"| {name.removesuffix('_cg')}{mark} | {run['solver']} K={run['neumann_steps']} | "
                f"{run['hyper_lr']:g} | {f['train']:.4f} | {f['val']:.4f} | "
                f"{f['test']:.4f} | {f['test_min']:.4f} ({f['test_min_step']}) | "
                f"{f['test_acc']:.3f} | {f['decay_median']:.2e} | "
                f"{run['decays_past_stability']} | {run['counters'].get('divergences', 0)} | "
                f"{run['seconds']:.0f} |"
            )
    lines.append("")
    for suffix, solver in (("", "neumann"), ("_cg", "cg")):
        g = cap["runs"]["global" + suffix][cap["chosen"]["global" + suffix]]["final"]
        p = cap["runs"]["per_weight" + suffix][cap["chosen"]["per_weight" + suffix]]["final"]
        lines.append(
            f"Plotted runs, solver {solver}: the per-weight decay ends at validation loss "
            f"{p['val']:.4f}, {g['val'] / p['val']:.0f}x below the global decay's {g['val']:.4f}; "
            f"its test loss is {p['test']:.4f} against {g['test']:.4f} (lowest along the run "
            f"{p['test_min']:.4f}, at step {p['test_min_step']}); test minus validation loss: "
            f"{p['test'] - p['val']:.4f} against {g['test'] - g['val']:.4f}."
        )
    lines += [
        "",
        "`divergences (guard)`: hyper-intervals at whose end HyperSGD's divergence guard "
        "restored the weights. SGD with momentum on the penalty alone is unstable past "
        "lr x decay = 2 (1 + momentum), i.e. a decay of "
        f"{2 * (1 + s.momentum) / s.lr:.0f} here (`decays > stability bound`); the guard restores "
        "the loss hyperparameters with the weights, so a decay past the bound is undone.",
    ]
    noisy = results["noisy"]
    methods = noisy_methods(noisy, s)
    lines += [
        "",
        f"## 2. Noisy labels ({s.noise:.0%} of the training labels flipped), "
        f"{s.steps_noisy} steps, {s.seeds} seeds",
        "",
        "Mean ± std over seeds of the final values (each seed: its own initialisation and "
        "flipped labels). (b), (c), (b'), (c'): the Adam lr with the lowest mean final validation "
        "loss; (d): per seed, the grid value with the lowest final validation loss "
        f"(grid {[f'{g:.2g}' for g in s.grid]}).",
        "",
        "| method | test loss | test acc | val loss | train loss (noisy labels) |",
        "|---|---|---|---|---|",
    ]
    for name, finals in methods.items():
        lines.append(
            f"| {name} | {mean_std([f['test'] for f in finals])} | "
            f"{mean_std([f['test_acc'] for f in finals])} | "
            f"{mean_std([f['val'] for f in finals])} | {mean_std([f['train'] for f in finals])} |"
        )
    picks = [f"{s.grid[r['grid_best']]:.2g}" for r in noisy["seeds"]]
    lines += ["", f"(d) picked per seed: {', '.join(picks)}.", ""]
    lines += [
        "Every Adam lr of the learned variants (mean ± std over seeds; * = reported above):",
        "",
        "| decay | solver | Adam lr | val loss | test loss | test acc | median learned decay | "
        "divergences (guard, total) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, _, solver in VARIANTS:
        k = s.cg_steps if solver == "cg" else s.neumann_steps
        for i, hyper_lr in enumerate(s.hyper_lrs):
            runs = [r["learned"][name][i] for r in noisy["seeds"]]
            mark = "*" if noisy["chosen"][name] == i else ""
            lines.append(
                f"| {name.removesuffix('_cg')}{mark} | {solver} K={k} | {hyper_lr:g} | "
                f"{mean_std([r['final']['val'] for r in runs])} | "
                f"{mean_std([r['final']['test'] for r in runs])} | "
                f"{mean_std([r['final']['test_acc'] for r in runs])} | "
                f"{mean_std([r['final']['decay_median'] for r in runs], '.2e')} | "
                f"{sum(r['counters'].get('divergences', 0) for r in runs)} |"
            )
    lines += [
        "",
        "The fixed-decay grid (mean ± std over seeds):",
        "",
        "| decay | val loss | test loss | test acc |",
        "|---|---|---|---|",
    ]
    for i, decay in enumerate(s.grid):
        runs = [r["grid"][i] for r in noisy["seeds"]]
        lines.append(
            f"| {decay:.2g} | {mean_std([r['final']['val'] for r in runs])} | "
            f"{mean_std([r['final']['test'] for r in runs])} | "
            f"{mean_std([r['final']['test_acc'] for r in runs])} |"
        )
    return "\n".join(lines) + "\n"


def plot_capacity(results: dict[str, Any], s: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cap = results["capacity"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    chosen = {name: cap["runs"][name][cap["chosen"][name]] for name in cap["runs"]}
    top = max(max(run["curves"]["test"]) for run in chosen.values())
    bottom = min(min(run["curves"][k]) for run in chosen.values() for k in ("train", "val"))
    for row, suffix in zip(axes, ("", "_cg"), strict=True):
        for ax, name in zip(row[:2], ("global" + suffix, "per_weight" + suffix), strict=True):
            run = chosen[name]
            c = run["curves"]
            for key, color in (("train", "tab:blue"), ("val", "tab:orange"), ("test", "tab:green")):
                ax.plot(c["step"], c[key], color=color, label=key)
            ax.set_yscale("log")
            ax.set_ylim(bottom * 0.8, top * 1.2)
            ax.set_xlabel("step")
            ax.set_ylabel("cross-entropy")
            n = len(run["decays"]) if "decays" in run else 1
            label = "one global decay" if n == 1 else f"a decay per weight ({n:,})"
            solver = f"{run['solver']} K={run['neumann_steps']}"
            ax.set_title(f"{label}, {solver}, Adam lr {run['hyper_lr']:g}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        ax = row[2]
        per_weight = chosen["per_weight" + suffix]
        decays = np.asarray(per_weight["decays"])
        bins = np.logspace(np.log10(decays.min()), np.log10(decays.max()), 50)
        ax.hist(decays, bins=bins, color="tab:purple", alpha=0.7, label="per weight (final)")
        ax.axvline(s.init_decay, color="k", ls=":", label="start")
        global_decay = chosen["global" + suffix]["final"]["decay_median"]
        ax.axvline(global_decay, color="tab:red", label="global (final)")
        ax.axvline(per_weight["stability_bound"], color="grey", ls="--", label="SGD bound")
        ax.set_xscale("log")
        ax.set_xlabel("learned weight decay exp(mu)")
        ax.set_ylabel("weights")
        ax.set_title(f"learned decays, {per_weight['solver']}", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Digits MLP, clean labels, validation set of {results['sizes']['val']}: one learned "
        "global weight decay vs a learned decay per weight (method='ift')",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_noisy(results: dict[str, Any], s: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noisy = results["noisy"]
    methods = noisy_methods(noisy, s)
    fig, axes = plt.subplots(1, 2, figsize=(15, 5))
    ax = axes[0]
    colors = ["tab:grey", "tab:red", "tab:purple", "salmon", "plum", "tab:blue"]
    for i, finals in enumerate(methods.values()):
        values = [f["test"] for f in finals]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        ax.bar(i, statistics.fmean(values), yerr=std, color=colors[i], alpha=0.6, capsize=4)
        ax.scatter([i] * len(values), values, color="k", s=12, zorder=3)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([textwrap.fill(n, 16) for n in methods], fontsize=7)
    ax.set_ylabel("final test cross-entropy")
    ax.set_title(f"{s.noise:.0%} training labels flipped: mean ± std over {s.seeds} seeds")
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1]
    for key, color in (("val", "tab:orange"), ("test", "tab:green")):
        per_decay = [
            [r["grid"][i]["final"][key] for r in noisy["seeds"]] for i in range(len(s.grid))
        ]
        means = [statistics.fmean(v) for v in per_decay]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_decay]
        ax.errorbar(s.grid, means, yerr=stds, color=color, marker="o", label=f"fixed decay: {key}")
    for (name, per_weight, solver), color in zip(VARIANTS, colors[1:5], strict=True):
        runs = [r["learned"][name][noisy["chosen"][name]] for r in noisy["seeds"]]
        test = statistics.fmean(r["final"]["test"] for r in runs)
        what = f"learned {'per weight' if per_weight else 'global'}, {solver}"
        ax.axhline(test, color=color, ls="--", label=f"{what}: test (mean)")
        if not per_weight:
            ax.scatter(
                [r["final"]["decay_median"] for r in runs],
                [r["final"]["test"] for r in runs],
                color=color,
                marker="x",
                zorder=3,
                label=f"{what}: final decay and test, per seed",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("weight decay")
    ax.set_ylabel("final cross-entropy")
    ax.set_title("the grid of fixed global decays (mean ± std over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (< 60 s), *_quick")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--seeds", type=int, help="experiment 2's seeds (default 3)")
    parser.add_argument(
        "--replot", action="store_true", help="only rewrite the .md and figures from the .json"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    s = QUICK if args.quick else Settings()
    if args.seeds is not None:
        s = Settings(**{**asdict(s), "seeds": args.seeds})
    suffix = "_quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any]
    if args.replot:
        results = json.loads((args.out / f"loss_hyper_capacity{suffix}.json").read_text())
        saved = results["settings"]
        s = Settings(
            **{**saved, "hyper_lrs": tuple(saved["hyper_lrs"]), "grid": tuple(saved["grid"])}
        )
        write_outputs(results, s, args.out, suffix)
        return
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)

    data = load_digits_split()
    sizes = {"train": len(data.y_train), "val": len(data.y_val), "test": len(data.y_test)}
    check = hypergradient_check()
    for row in check:
        log(
            f"check {row['solver']} K={row['K']} {row['products']}: rel. error "
            f"{row['rel_err_vs_exact']:.2e}, cosine {row['cos_vs_exact']:.6f}"
        )
    results = {
        "settings": asdict(s),
        "sizes": sizes,
        "check": check,
        "capacity": capacity(data, s, log),
        "noisy": noisy_labels(data, s, log),
    }
    results.update(
        machine=machine(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(["python", "benchmarks/loss_hyper_capacity.py", *(argv or sys.argv[1:])]),
        seconds=time.perf_counter() - start,
    )
    (args.out / f"loss_hyper_capacity{suffix}.json").write_text(json.dumps(results) + "\n")
    write_outputs(results, s, args.out, suffix)
    log("done")


def write_outputs(results: dict[str, Any], s: Settings, out: Path, suffix: str) -> None:
    """The report and the two figures, from the results."""
    text = report(results, s)
    (out / f"loss_hyper_capacity{suffix}.md").write_text(text)
    plot_capacity(results, s, out / f"loss_hyper_capacity{suffix}.png")
    plot_noisy(results, s, out / f"loss_hyper_noisy_labels{suffix}.png")
    print(text)


if __name__ == "__main__":
    main()
