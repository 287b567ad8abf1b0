"""The tuning suite: is a Hyper optimizer safe to switch on, and does it help?

Nine small tasks, each split once into training, validation and test sets:

===================  ==========================================================================
``digits``           scikit-learn's digits, MLP 64-50-10 (cross-entropy)
``breast_cancer``    scikit-learn's breast cancer, MLP 30-50-2
``wine``             scikit-learn's wine, MLP 13-50-3
``diabetes``         scikit-learn's diabetes, MLP 10-50-1, mean squared error (regression)
``digits_cnn_noisy`` digits as 8x8 images, a small CNN (8 and 16 channels), 20% of the *training*
                     labels replaced by another class (validation and test labels are clean)
``mnist1d_mlp``      MNIST-1D (the ``mnist1d`` package builds it locally), MLP 40-100-100-10
``mnist1d_cnn``      MNIST-1D, a 1-d CNN (3 convolutions, 16 channels)
``classification``   ``make_classification`` with 300 samples and 100 features (10 informative):
                     an over-parametrised MLP 100-100-2 that needs regularisation
``friedman``         ``make_friedman1`` regression with noise, MLP 10-50-1
===================  ==========================================================================

For every task and seed (the seed fixes the initial weights, the minibatch order and the random
start), three families run side by side in one process, one torch thread:
``sgd`` (``torch.optim.SGD`` / ``HyperSGD``), ``adam`` (``Adam`` / ``HyperAdam``) and ``adamw``
(``AdamW`` / ``HyperAdamW``).  Per family:

=================  ==========================================================================
``fixed``          torch's optimizer at the usual values (SGD lr 0.01, momentum 0.9, weight
                   decay 1e-4; Adam lr 1e-3, weight decay 1e-4; AdamW lr 1e-3, weight decay
                   1e-2)
``fixed_es``       the same run, early-stopped: the test loss at the lowest validation loss of
                   an evaluation every 10 steps
``hyper``          the Hyper optimizer at the same values with every default (``learn=("lr",)``)
``hyper_all``      the same learning lr and weight decay (and momentum, SGD)
``*_best``         the same run's weights restored with ``keep_best=True`` (``restore_best()``)
``grid``           torch's optimizer at each lr of a grid (other values usual); the summary
                   reports the lr whose median test loss over seeds is lowest: the best fixed
                   value in hindsight
``random_search``  ``ceil(time(hyper_all) / time(fixed))`` trainings with values drawn from the
                   ranges below; the lowest final validation loss wins
``fixed@random``,  a random start per seed, drawn from the ranges (SGD lr 1e-5…5, Adam lr
``hyper@random``,  1e-6…1e-1, weight decay 1e-7…1e-1, momentum 0…0.99): torch's optimizer kept
``hyper_all@random`` there, and the Hyper optimizer starting there
=================  ==========================================================================

and once per task what users pick instead of tuning, at their packages' defaults:
schedule-free AdamW (``schedulefree.AdamWScheduleFree``), Prodigy (``prodigyopt``) and
D-Adaptation Adam (``dadaptation.DAdaptAdam``).

Every learning run uses the whole validation split as its validation closure and torch's
closure (zero, forward, backward) for training.  ``--variants`` adds configurations of the Hyper
optimizers (the levers: method, K, hyper-lr, the guard, validation minibatches) from the usual
and the random starts.

::

    python benchmarks/suite.py                  # the default run: 9 tasks x 5 seeds, 2 workers
    python benchmarks/suite.py --smoke          # 1 task, 1 seed, 60 steps: seconds
    python benchmarks/suite.py --tasks digits wine --seeds 3 --variants greedy k1

Outputs in ``results/``: ``suite_runs.jsonl`` (one line per task and seed, resumable),
``suite.json`` (medians, targets), ``suite.md`` (the tables) and ``suite.png``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import multiprocessing
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy, mse_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tuning

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = (
    "digits",
    "breast_cancer",
    "wine",
    "diabetes",
    "digits_cnn_noisy",
    "mnist1d_mlp",
    "mnist1d_cnn",
    "classification",
    "friedman",
)
FAMILIES = ("sgd", "adam", "adamw")
USUAL: dict[str, dict[str, float]] = {
    "sgd": {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4},
    "adam": {"lr": 1e-3, "weight_decay": 1e-4},
    "adamw": {"lr": 1e-3, "weight_decay": 1e-2},
}
LEARN_ALL = {
    "sgd": ("lr", "momentum", "weight_decay"),
    "adam": ("lr", "weight_decay"),
    "adamw": ("lr", "weight_decay"),
}
LOG10_LR = {"sgd": (-5.0, math.log10(5.0)), "adam": (-6.0, -1.0), "adamw": (-6.0, -1.0)}
LOG10_WD = (-7.0, -1.0)
MOMENTUM = (0.0, 0.99)
GRID = {
    "sgd": (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0),
    "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "adamw": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
}
EVAL_EVERY = 10
# the levers: keyword arguments of the Hyper optimizers, added to a learning run's own
VARIANTS: dict[str, dict[str, Any]] = {
    "ift": {"method": "ift"},
    "greedy": {"method": "greedy"},
    "k1": {"method": "ift", "neumann_steps": 1},
    "k2": {"method": "ift", "neumann_steps": 2},
    "fd1": {"method": "ift", "hvp": "forward_difference"},
    "hlr02": {"hyper_lr": 0.02},
    "hlr10": {"hyper_lr": 0.1},
    "hlr20": {"hyper_lr": 0.2},
    "rprop": {"hyper_rprop": (0.05, 1.0)},
    "greedy_rprop": {"method": "greedy", "hyper_rprop": (0.05, 1.0)},
    "greedy_hlr10": {"method": "greedy", "hyper_lr": 0.1},
    "greedy_hlr20": {"method": "greedy", "hyper_lr": 0.2},
    "greedy_hlr40": {"method": "greedy", "hyper_lr": 0.4},
    "noguard": {"divergence_guard": False},
    "valbatch": {"val_batch": 64},
    "t20": {"update_interval": 20},
    "ift_bf50": {"method": "ift", "hvp_batch_fraction": 0.5},
    "ift_bf25": {"method": "ift", "hvp_batch_fraction": 0.25},
}


# -- tasks -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    name: str
    steps: int
    batch_size: int = 64


TASK_SPECS = {
    "digits": Task("digits", 1000),
    "breast_cancer": Task("breast_cancer", 1000),
    "wine": Task("wine", 1000),
    "diabetes": Task("diabetes", 1000),
    "digits_cnn_noisy": Task("digits_cnn_noisy", 800),
    "mnist1d_mlp": Task("mnist1d_mlp", 1500),
    "mnist1d_cnn": Task("mnist1d_cnn", 1000),
    "classification": Task("classification", 1000),
    "friedman": Task("friedman", 1000),
}


def load(name: str) -> tuning.Data:
    if name in tuning.DATASETS:
        return tuning.load(name)
    if name == "digits_cnn_noisy":
        data = tuning.load("digits")
        rng = np.random.default_rng(0)
        y = data.y_train.clone()
        flip = rng.random(len(y)) < 0.2
        other = torch.tensor(rng.integers(1, 10, size=len(y)))
        y[torch.tensor(flip)] = (y[torch.tensor(flip)] + other[torch.tensor(flip)]) % 10
        return replace(
            data,
            name=name,
            x_train=data.x_train.reshape(-1, 1, 8, 8),
            y_train=y,
            x_val=data.x_val.reshape(-1, 1, 8, 8),
            x_test=data.x_test.reshape(-1, 1, 8, 8),
        )
    if name.startswith("mnist1d"):
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        raw = make_dataset(args)  # 4000 training + 1000 test examples, generated here
        x = np.concatenate([raw["x"], raw["x_test"]])
        y = np.concatenate([raw["y"], raw["y_test"]])
        data = tuning.split(x, y, "classification", name)
        if name == "mnist1d_cnn":
            data = replace(
                data,
                x_train=data.x_train.unsqueeze(1),
                x_val=data.x_val.unsqueeze(1),
                x_test=data.x_test.unsqueeze(1),
            )
        return data
    if name == "classification":
        from sklearn.datasets import make_classification

        x, y = make_classification(
            n_samples=300, n_features=100, n_informative=10, flip_y=0.05, random_state=0
        )
        return tuning.split(x, y, "classification", name)
    if name == "friedman":
        from sklearn.datasets import make_friedman1

        x, y = make_friedman1(n_samples=600, noise=1.0, random_state=0)
        return tuning.split(x, y, "regression", name)
    raise ValueError(f"task must be one of {TASKS}, got {name!r}")


def make_model(data: tuning.Data, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if data.name == "digits_cnn_noisy":
            return nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(8, 16, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(16 * 16, 10),
            )
        if data.name == "mnist1d_cnn":
            return nn.Sequential(
                nn.Conv1d(1, 16, 5, padding=2),
                nn.ReLU(),
                nn.Conv1d(16, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv1d(16, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(16 * 10, 10),
            )
        inputs = data.x_train.shape[1]
        if data.name == "mnist1d_mlp":
            return nn.Sequential(
                nn.Linear(inputs, 100),
                nn.ReLU(),
                nn.Linear(100, 100),
                nn.ReLU(),
                nn.Linear(100, data.outputs),
            )
        hidden = 100 if data.name == "classification" else 50
        return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, data.outputs))


def loss_of(data: tuning.Data) -> Callable[[Tensor, Tensor], Tensor]:
    return cross_entropy if data.task == "classification" else mse_loss


# -- runs ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    test: float
    val: float
    seconds: float
    es_test: float | None = None  # at the lowest validation loss of the evaluations
    best_test: float | None = None  # restore_best()
    final: dict[str, float] | None = None
    at_bound: list[str] | None = None
    divergences: int = 0
    trials: int = 1


def finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def evaluate(model: nn.Module, data: tuning.Data) -> tuple[float, float]:
    fn = loss_of(data)
    with torch.no_grad():
        val = float(fn(model(data.x_val), data.y_val))
        test = float(fn(model(data.x_test), data.y_test))
    return finite(val), finite(test)


def build(
    family: str,
    kind: str,
    model: nn.Module,
    values: dict[str, float],
    options: dict[str, Any],
) -> torch.optim.Optimizer:
    """``kind``: "torch", "hyper" or a baseline's name."""
    import hyperopt_optim as ho

    params = model.parameters()
    if kind == "torch":
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
        return cls[family](params, **values)
    if kind == "hyper":
        hcls = {"sgd": ho.HyperSGD, "adam": ho.HyperAdam, "adamw": ho.HyperAdamW}[family]
        options = dict(options)
        hyper_lr = options.pop("hyper_lr", None)
        if hyper_lr is not None:
            options["hyper_optimizer"] = lambda ps: torch.optim.Adam(ps, lr=hyper_lr)
        rprop = options.pop("hyper_rprop", None)
        if rprop is not None:  # (initial step, largest step) on the unconstrained values
            first, largest = rprop
            options["hyper_optimizer"] = lambda ps: torch.optim.Rprop(
                ps, lr=first, etas=(0.5, 1.2), step_sizes=(1e-4, largest)
            )
        options.pop("val_batch", None)
        return hcls(params, **values, **options)
    if kind == "schedulefree":
        import schedulefree

        return schedulefree.AdamWScheduleFree(params)
    if kind == "prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(params)
    if kind == "dadaptation":
        import dadaptation

        return dadaptation.DAdaptAdam(params)
    raise ValueError(kind)


def train(
    data: tuning.Data,
    task: Task,
    seed: int,
    family: str,
    kind: str,
    values: dict[str, float],
    options: dict[str, Any] | None = None,
    track: bool = True,
) -> Outcome:
    """One training run; ``track``: evaluate every 10 steps for the early-stopped loss."""
    options = options or {}
    model = make_model(data, seed)
    fn = loss_of(data)
    opt = build(family, kind, model, values, options)
    schedule_free = kind == "schedulefree"
    if kind == "hyper":
        val_batch = options.get("val_batch")
        if val_batch:  # fresh validation minibatches, one per hyper-step
            val_order = tuning.batches(len(data.x_val), val_batch, seed + 1)

            def val_closure() -> Tensor:
                index = next(val_order)
                return fn(model(data.x_val[index]), data.y_val[index])
        else:

            def val_closure() -> Tensor:
                return fn(model(data.x_val), data.y_val)

        opt.register_validation_closure(val_closure)  # type: ignore[attr-defined]
    order = tuning.batches(len(data.x_train), task.batch_size, seed)
    best_val, es_test = math.inf, math.inf
    spent = 0.0
    if schedule_free:
        opt.train()  # type: ignore[attr-defined]
    for t in range(task.steps):
        index = next(order)
        x, y = data.x_train[index], data.y_train[index]

        def closure(x: Tensor = x, y: Tensor = y, batch_fraction: float = 1.0) -> Tensor:
            # batch_fraction: hvp_batch_fraction's products on the batch's first part
            n = math.ceil(batch_fraction * len(x))
            opt.zero_grad()
            loss = fn(model(x[:n]), y[:n])
            loss.backward()
            return loss

        start = time.perf_counter()
        opt.step(closure)
        spent += time.perf_counter() - start
        if track and (t + 1) % EVAL_EVERY == 0:
            if schedule_free:
                opt.eval()  # type: ignore[attr-defined]
            val, test = evaluate(model, data)
            if schedule_free:
                opt.train()  # type: ignore[attr-defined]
            if val < best_val:
                best_val, es_test = val, test
    if schedule_free:
        opt.eval()  # type: ignore[attr-defined]
    val, test = evaluate(model, data)
    out = Outcome(test, val, spent, es_test=es_test if track else None)
    if kind == "hyper":
        hp = opt.hyperparameters()[0]  # type: ignore[attr-defined]
        out.final = {k: float(v) for k, v in hp.items() if isinstance(v, Tensor)}
        bounds = opt.bounds  # type: ignore[attr-defined]
        out.at_bound = [
            k
            for k, v in out.final.items()
            if math.isclose(v, bounds[k][0], rel_tol=1e-3)
            or math.isclose(v, bounds[k][1], rel_tol=1e-3)
        ]
        out.divergences = opt.hyper_state.get("divergences", 0)  # type: ignore[attr-defined]
        if opt.best_validation_loss is not None:  # type: ignore[attr-defined]
            opt.restore_best()  # type: ignore[attr-defined]
            out.best_test = evaluate(model, data)[1]
    return out


def draw(family: str, rng: np.random.Generator) -> dict[str, float]:
    values = {
        "lr": float(10 ** rng.uniform(*LOG10_LR[family])),
        "weight_decay": float(10 ** rng.uniform(*LOG10_WD)),
    }
    if family == "sgd":
        values["momentum"] = float(rng.uniform(*MOMENTUM))
    return values


def learnable_start(values: dict[str, float]) -> dict[str, float]:
    """A learned momentum must start inside (0, 1)."""
    out = dict(values)
    if "momentum" in out:
        out["momentum"] = min(max(out["momentum"], 1e-3), 0.99)
    return out


@dataclass(frozen=True)
class Config:
    steps_scale: float = 1.0
    grid: bool = True
    search: bool = True
    baselines: bool = True
    random_starts: bool = True
    families: tuple[str, ...] = FAMILIES
    variants: tuple[str, ...] = ()

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


_WARM: set[str] = set()


def run_seed(job: tuple[str, int, Config]) -> dict[str, Any]:
    """Every configuration of one task and seed in this process (times side by side)."""
    name, seed, config = job
    torch.set_num_threads(1)
    # the guard's and skipped hyper-steps' warnings: counted in the records instead
    warnings.simplefilter("ignore")
    data = load(name)
    spec = TASK_SPECS[name]
    task = replace(spec, steps=max(20, int(spec.steps * config.steps_scale)))
    if name not in _WARM:  # the first calls of a process are slow: in no one's timing
        warm = replace(task, steps=20)
        train(data, warm, 0, "adam", "hyper", USUAL["adam"], {"keep_best": True})
        _WARM.add(name)
    rng = np.random.default_rng([seed, TASKS.index(name), 11])  # a start per task and seed
    runs: dict[str, Any] = {}

    def record(label: str, out: Outcome) -> Outcome:
        runs[label] = asdict(out)
        return out

    for family in config.families:
        usual = USUAL[family]
        start = learnable_start(draw(family, rng))
        fixed = record(f"{family}:fixed", train(data, task, seed, family, "torch", usual))
        record(f"{family}:hyper", train(data, task, seed, family, "hyper", usual, _keep()))
        every = {"learn": LEARN_ALL[family], **_keep()}
        best_all = record(
            f"{family}:hyper_all", train(data, task, seed, family, "hyper", usual, every)
        )
        for v in config.variants:
            options = {**every, **VARIANTS[v]}
            record(
                f"{family}:hyper_all~{v}", train(data, task, seed, family, "hyper", usual, options)
            )
            if config.random_starts:
                record(
                    f"{family}:hyper_all@random~{v}",
                    train(data, task, seed, family, "hyper", start, options),
                )
        if config.random_starts:
            record(f"{family}:fixed@random", train(data, task, seed, family, "torch", start))
            record(
                f"{family}:hyper@random", train(data, task, seed, family, "hyper", start, _keep())
            )
            record(
                f"{family}:hyper_all@random",
                train(data, task, seed, family, "hyper", start, every),
            )
            runs[f"{family}:start"] = start
            for end, lr in zip(("low", "high"), LOG10_LR[family], strict=True):
                values = {**usual, "lr": 10**lr}  # the ends of the lr range, other values usual
                record(f"{family}:fixed@lr_{end}", train(data, task, seed, family, "torch", values))
                record(
                    f"{family}:hyper@lr_{end}",
                    train(data, task, seed, family, "hyper", values, _keep()),
                )
        if config.grid:
            for lr in GRID[family]:
                values = {**usual, "lr": lr}
                out = train(data, task, seed, family, "torch", values, track=False)
                record(f"{family}:grid:{lr:g}", out)
        if config.search:
            trials = max(1, math.ceil(best_all.seconds / fixed.seconds))
            outs = []
            clock = 0.0
            for _ in range(trials):
                values = draw(family, rng)
                out = train(data, task, seed, family, "torch", values, track=False)
                clock += out.seconds
                outs.append(out)
            best = min(outs, key=lambda o: o.val)
            record(
                f"{family}:random_search",
                Outcome(best.test, best.val, clock, trials=trials),
            )
    if config.baselines:
        for kind in ("schedulefree", "prodigy", "dadaptation"):
            record(kind, train(data, task, seed, "adam", kind, {}))
    return {"task": name, "seed": seed, "config": config.key(), "runs": runs}


def _keep() -> dict[str, Any]:
    return {"keep_best": True}


# -- summary ---------------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    """The median with +inf (a diverged run) sorting last."""
    return tuning.quantile(list(xs), 0.5)


def summarise(records: list[dict[str, Any]], config: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in TASKS:
        rows = [r for r in records if r["task"] == name]
        if not rows:
            continue
        labels = [k for k in rows[0]["runs"] if not k.endswith(":start")]
        task: dict[str, Any] = {"seeds": len(rows), "configs": {}}
        for label in labels:
            outs = [r["runs"][label] for r in rows if label in r["runs"]]
            family = label.split(":")[0]
            ref = f"{family}:fixed" if family in FAMILIES else "adam:fixed"
            ratios = [
                r["runs"][label]["seconds"] / r["runs"][ref]["seconds"]
                for r in rows
                if label in r["runs"] and ref in r["runs"]
            ]
            entry = {
                "test": median([o["test"] for o in outs]),
                "diverged": sum(not math.isfinite(o["test"]) for o in outs),
                "time_ratio": statistics.median(ratios) if ratios else None,
            }
            for key in ("es_test", "best_test"):
                values = [o[key] for o in outs if o.get(key) is not None]
                if values:
                    entry[key] = median(values)
            at_bound = [b for o in outs for b in (o.get("at_bound") or [])]
            if at_bound:
                entry["at_bound"] = at_bound
            divergences = sum(o.get("divergences", 0) for o in outs)
            if divergences:
                entry["divergences"] = divergences
            task["configs"][label] = entry
        for family in config.families:
            grid = {k: v for k, v in task["configs"].items() if k.startswith(f"{family}:grid:")}
            if grid:
                best = min(grid, key=lambda k: grid[k]["test"])
                task["configs"][f"{family}:grid_best"] = {
                    **grid[best],
                    "lr": float(best.rsplit(":", 1)[1]),
                }
        task["targets"] = targets(task["configs"], config)
        out[name] = task
    return out


def ratio(a: float, b: float) -> float:
    """``a / b`` for losses: a test loss can be exactly 0 in float32 (wine)."""
    if b == 0:
        return 1.0 if a == 0 else math.inf
    return a / b


def targets(c: dict[str, Any], config: Config) -> dict[str, Any]:
    """The issue's four targets, per family, on one task's medians."""
    t: dict[str, Any] = {}
    for family in config.families:
        fixed = c.get(f"{family}:fixed")
        if fixed is None:
            continue
        row: dict[str, Any] = {}
        for h in ("hyper", "hyper_all"):
            if f"{family}:{h}" in c:
                row[f"harm_{h}"] = ratio(c[f"{family}:{h}"]["test"], fixed["test"])
                row[f"cost_{h}"] = c[f"{family}:{h}"]["time_ratio"]
        grid = c.get(f"{family}:grid_best")
        for h in ("hyper@random", "hyper_all@random", "hyper@lr_low", "hyper@lr_high"):
            if grid and f"{family}:{h}" in c:
                row[f"recover_{h}"] = ratio(c[f"{family}:{h}"]["test"], grid["test"])
                row[f"diverged_{h}"] = c[f"{family}:{h}"]["diverged"]
        if grid and f"{family}:fixed@random" in c:
            row["recover_fixed@random"] = ratio(c[f"{family}:fixed@random"]["test"], grid["test"])
        for alt in ("schedulefree", "prodigy", "dadaptation"):
            if alt in c and f"{family}:hyper" in c:
                row[f"vs_{alt}"] = ratio(c[f"{family}:hyper"]["test"], c[alt]["test"])
        t[family] = row
    return t


def lever_table(summary: dict[str, Any]) -> str:
    """Each learning configuration over the tasks: the median of its per-task ratio
    (to ``fixed`` from the usual values; to the best fixed lr in hindsight from the random
    starts), on how many tasks the target holds, the median time ratio, and the runs that
    diverged, ended at a bound or were caught by the guard."""
    rows: list[str] = [
        "| family | configuration | target | median ratio over tasks | tasks meeting it "
        "| time / fixed | diverged | values at a bound | guard back-offs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    labels: list[str] = []
    for task in summary.values():
        for label in task["configs"]:
            if ":hyper" in label and label not in labels:
                labels.append(label)
    for label in labels:
        family, what = label.split(":", 1)
        random_start = "@" in what
        ratios, costs, diverged, bound, guard = [], [], 0, 0, 0
        for task in summary.values():
            c = task["configs"]
            if label not in c:
                continue
            ref = c.get(f"{family}:grid_best" if random_start else f"{family}:fixed")
            if ref is None:
                continue
            ratios.append(ratio(c[label]["test"], ref["test"]))
            costs.append(c[label]["time_ratio"])
            diverged += c[label]["diverged"]
            bound += len(c[label].get("at_bound", []))
            guard += c[label].get("divergences", 0)
        if not ratios:
            continue
        limit = 1.3 if random_start else 1.0
        target = "recover (<= 1.3x best fixed)" if random_start else "do no harm (<= fixed)"
        meeting = sum(r <= limit for r in ratios)
        rows.append(
            f"| {family} | `{what}` | {target} | {fmt(median(ratios))} | "
            f"{meeting}/{len(ratios)} | {fmt(statistics.median(costs))} | {diverged} | {bound} | "
            f"{guard} |"
        )
    return "\n".join(rows) + "\n"


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return "∞" if not math.isfinite(x) else f"{x:.3g}"


def compact(summary: dict[str, Any], family: str) -> str:
    """One family's medians, a row per task: what the issue's targets compare."""
    columns = [
        ("fixed", "fixed", "test"),
        ("fixed, early-stopped", "fixed", "es_test"),
        ("hyper", "hyper", "test"),
        ("hyper, kept best", "hyper", "best_test"),
        ("hyper_all", "hyper_all", "test"),
        ("hyper_all, kept best", "hyper_all", "best_test"),
        ("best fixed lr", "grid_best", "test"),
        ("random search", "random_search", "test"),
        ("fixed@random", "fixed@random", "test"),
        ("hyper@random", "hyper@random", "test"),
        ("hyper_all@random", "hyper_all@random", "test"),
        ("fixed@lr_low", "fixed@lr_low", "test"),
        ("hyper@lr_low", "hyper@lr_low", "test"),
        ("fixed@lr_high", "fixed@lr_high", "test"),
        ("hyper@lr_high", "hyper@lr_high", "test"),
    ]
    alternatives = ("schedulefree", "prodigy", "dadaptation")
    head = [c[0] for c in columns] + list(alternatives)
    lines = ["| task | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, task in summary.items():
        c = task["configs"]
        cells = []
        for _, label, key in columns:
            e = c.get(f"{family}:{label}")
            cells.append(fmt(e.get(key)) if e else "-")
        cells += [fmt(c[a]["test"]) if a in c else "-" for a in alternatives]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdicts(summary: dict[str, Any]) -> str:
    """The targets per task and family: the ratio, and whether it holds."""
    head = [
        "do no harm: hyper / fixed <= 1",
        "recover: hyper@random / best fixed <= 1.3",
        "from the lowest lr",
        "from the highest lr",
        "diverged / at a bound / guard back-offs (hyper@random, @lr_low, @lr_high)",
        "hyper < schedule-free",
        "hyper < Prodigy",
        "cost: time / fixed <= 2",
    ]
    lines = ["| task | family | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|"]

    def mark(x: float | None, ok: bool) -> str:
        return "-" if x is None else f"{fmt(x)} {'yes' if ok else '**no**'}"

    for name, task in summary.items():
        c = task["configs"]
        for family, row in task["targets"].items():
            harm, recover = row.get("harm_hyper"), row.get("recover_hyper@random")
            low, high = row.get("recover_hyper@lr_low"), row.get("recover_hyper@lr_high")
            sf, pr, cost = row.get("vs_schedulefree"), row.get("vs_prodigy"), row.get("cost_hyper")
            starts = [c.get(f"{family}:hyper{at}") for at in ("@random", "@lr_low", "@lr_high")]
            runs = [r for r in starts if r]
            bad = (
                f"{sum(r['diverged'] for r in runs)} / "
                f"{sum(len(r.get('at_bound', [])) for r in runs)} / "
                f"{sum(r.get('divergences', 0) for r in runs)}"
                if runs
                else "-"
            )
            cells = [
                mark(harm, harm is not None and harm <= 1.0),
                mark(recover, recover is not None and recover <= 1.3),
                mark(low, low is not None and low <= 1.3),
                mark(high, high is not None and high <= 1.3),
                bad,
                mark(sf, sf is not None and sf < 1.0),
                mark(pr, pr is not None and pr < 1.0),
                mark(cost, cost is not None and cost <= 2.0),
            ]
            lines.append(f"| {name} | {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tables(summary: dict[str, Any]) -> str:
    lines: list[str] = ["## Medians of the final test loss, per family", ""]
    for family in FAMILIES:
        if any(f"{family}:fixed" in t["configs"] for t in summary.values()):
            lines += [f"### {family}", "", compact(summary, family), ""]
    lines += ["## The targets", "", verdicts(summary), ""]
    lines += ["## Every configuration, per task", ""]
    for name, task in summary.items():
        lines += [
            f"### {name} ({task['seeds']} seeds; median final test loss)",
            "",
            "| configuration | test | early-stopped / kept best | diverged | time / fixed |",
            "|---|---|---|---|---|",
        ]
        for label, e in task["configs"].items():
            if ":grid:" in label:
                continue
            extra = e.get("es_test", e.get("best_test"))
            note = f" (lr {e['lr']:g})" if "lr" in e else ""
            bound = f" at bound: {sorted(set(e['at_bound']))}" if e.get("at_bound") else ""
            lines.append(
                f"| `{label}`{note}{bound} | {fmt(e['test'])} | {fmt(extra)} | {e['diverged']} | "
                f"{fmt(e['time_ratio'])} |"
            )
        lines.append("")
    lines += ["### Every learning configuration over the tasks", "", lever_table(summary), ""]
    lines += ["### Targets (ratios of medians)", ""]
    keys = [
        "harm_hyper",
        "harm_hyper_all",
        "recover_hyper@random",
        "recover_hyper_all@random",
        "recover_fixed@random",
        "vs_schedulefree",
        "vs_prodigy",
        "cost_hyper",
        "cost_hyper_all",
    ]
    lines += ["| task | family | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name, task in summary.items():
        for family, row in task["targets"].items():
            cells = [fmt(row.get(k)) for k in keys]
            lines.append(f"| {name} | {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], out: Path, prefix: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ["fixed", "fixed_es", "hyper", "hyper_best", "hyper_all", "grid_best", "hyper@random"]
    names = list(summary)
    fig, axes = plt.subplots(1, len(FAMILIES), figsize=(15, 4.5), sharey=True, squeeze=False)
    for ax, family in zip(axes[0], FAMILIES, strict=True):
        width = 0.8 / len(shown)
        for j, what in enumerate(shown):
            ys = []
            for name in names:
                c = summary[name]["configs"]
                fixed = c.get(f"{family}:fixed", {}).get("test")
                if what == "fixed_es":
                    y = c.get(f"{family}:fixed", {}).get("es_test")
                elif what == "hyper_best":
                    y = c.get(f"{family}:hyper", {}).get("best_test")
                else:
                    y = c.get(f"{family}:{what}", {}).get("test")
                ys.append(y / fixed if y is not None and fixed else math.nan)
            xs = np.arange(len(names)) + j * width
            ax.bar(xs, np.minimum(ys, 3.0), width, label=what)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(names)) + 0.4, names, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{family}: median test loss / fixed (capped at 3)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{prefix}.png", dpi=100)
    plt.close(fig)


def _without_note(argv: list[str] | None) -> list[str]:
    """The command line as given, less ``--note`` and its text (kept apart)."""
    args = list(argv if argv is not None else sys.argv[1:])
    if "--note" in args:
        i = args.index("--note")
        del args[i : i + 2]
    return args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS))
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scale every task's steps")
    parser.add_argument("--no-grid", action="store_true")
    parser.add_argument("--no-search", action="store_true")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--no-random-starts", action="store_true")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--smoke", action="store_true", help="1 task, 1 seed, 60 steps")
    parser.add_argument(
        "--summarise-only", action="store_true", help="rebuild the outputs from the records"
    )
    parser.add_argument("--tag", default="", help="a suffix for the output files")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="a remark on the run, kept in the outputs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tasks, args.seeds, args.steps_scale, args.workers = ["digits"], 1, 0.06, 1
    config = Config(
        steps_scale=args.steps_scale,
        grid=not args.no_grid,
        search=not args.no_search,
        baselines=not args.no_baselines,
        random_starts=not args.no_random_starts,
        families=tuple(f for f in FAMILIES if f in args.families),
        variants=tuple(args.variants),
    )
    prefix = "suite_smoke" if args.smoke else "suite" + (f"_{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / f"{prefix}_runs.jsonl"
    kept: dict[tuple[str, int], dict[str, Any]] = {}
    if raw.exists():
        for line in raw.read_text().splitlines():
            r = json.loads(line)
            if r["config"] == config.key():
                kept[(r["task"], r["seed"])] = r
    jobs = [
        (name, seed, config)
        for seed in range(args.seeds)
        for name in args.tasks
        if (name, seed) not in kept
    ]
    records = list(kept.values())
    if args.summarise_only:
        jobs = []
    from tqdm import tqdm

    print(f"{len(kept)} task-seeds already in {raw}; {len(jobs)} to run", file=sys.stderr)
    start = time.perf_counter()
    with raw.open("a") as f:
        results: Iterator[dict[str, Any]]
        if args.workers > 1:
            ctx = multiprocessing.get_context("spawn")
            pool = ctx.Pool(args.workers)
            results = pool.imap_unordered(run_seed, jobs)
        else:
            pool = None
            results = map(run_seed, jobs)
        for record in tqdm(results, total=len(jobs), desc="task-seeds"):
            f.write(json.dumps(record) + "\n")
            f.flush()
            records.append(record)
        if pool is not None:
            pool.close()
    wall = time.perf_counter() - start
    records = [r for r in records if r["task"] in args.tasks and r["seed"] < args.seeds]
    summary = summarise(records, config)
    meta = {
        "config": asdict(config),
        "config_key": config.key(),
        "tasks": args.tasks,
        "seeds": args.seeds,
        "machine": tuning.machine(),
        "threads_per_worker": 1,
        "workers": args.workers,
        "wall_seconds_this_invocation": None if args.summarise_only else wall,
        "note": args.note,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/suite.py", *_without_note(argv)]),
    }
    (args.out / f"{prefix}.json").write_text(
        json.dumps({"meta": meta, "tasks": summary}, indent=1) + "\n"
    )
    m = meta["machine"]
    header = (
        f"Measured on {m['cpu']} ({m['cores']} cores), Python {m['python']}, torch {m['torch']}, "
        f"{meta['date']}, {args.workers} worker processes with one torch thread each; "
        f"`{meta['command']}`.{(' ' + args.note) if args.note else ''}\n\n"
    )
    (args.out / f"{prefix}.md").write_text(header + tables(summary))
    plot(summary, args.out, prefix)
    print(tables(summary))


if __name__ == "__main__":
    main()
