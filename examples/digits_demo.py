"""HyperSGD against torch.optim.SGD on scikit-learn's handwritten digits.

A 64-64-10 tanh MLP is trained twice from the same initialisation and the same minibatch
order, starting from the same deliberately poor hyperparameters (lr=1e-3, momentum=0.5,
weight_decay=1e-4): once with ``torch.optim.SGD`` and once with ``HyperSGD``, which learns
its learning rate, momentum and weight decay on a held-out validation set while it trains
(one-pass implicit hypergradients, K=4 Neumann terms, a hyper-step every 10 steps).

A third run, torch.optim.SGD at the values HyperSGD *ended* with, is a hindsight reference:
it tells whether the learned values are good ones, or whether HyperSGD only profited from
changing them along the way.

The script prints a table of final test loss and accuracy and saves a figure of the learned
hyperparameters and of the validation loss of every run::

    python examples/digits_demo.py               # or: tox -e demo
    python examples/digits_demo.py --steps 3000 --seed 1 --out /tmp/digits.png
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn
from torch.nn.functional import cross_entropy
from tqdm import tqdm

from hyperopt_optim import HyperSGD

# The deliberately poor starting point, shared by every run.
LR, MOMENTUM, WEIGHT_DECAY = 1e-3, 0.5, 1e-4
BATCH_SIZE = 64
EVAL_EVERY = 10  # steps between recorded validation losses
SPLIT_SEED = 0  # the train/validation/test split is fixed; --seed moves init and batch order
DEFAULT_OUT = Path(__file__).resolve().parent / "output" / "digits_hyperparameters.png"
LEARNED = ("lr", "momentum", "weight_decay")


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass
class Run:
    name: str
    steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    hyper: dict[str, list[float]] = field(default_factory=dict)
    test_loss: float = float("nan")
    test_accuracy: float = float("nan")
    final: dict[str, float] = field(default_factory=dict)
    seconds: float = float("nan")


def load_data() -> Data:
    """Digits (1797 8x8 images), split 60/20/20 and standardised on the training part."""
    x, y = load_digits(return_X_y=True)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=0.2, random_state=SPLIT_SEED, stratify=y
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=0.25, random_state=SPLIT_SEED, stratify=y_rest
    )
    scaler = StandardScaler().fit(x_train)

    def features(a):
        return torch.tensor(scaler.transform(a), dtype=torch.float32)

    def labels(a):
        return torch.tensor(a, dtype=torch.long)

    return Data(
        features(x_train),
        labels(y_train),
        features(x_val),
        labels(y_val),
        features(x_test),
        labels(y_test),
    )


def batches(n: int, seed: int):
    """Endless minibatch indices: shuffled epochs, the same order for every run."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - BATCH_SIZE + 1, BATCH_SIZE):
            yield perm[start : start + BATCH_SIZE]


def train(
    name: str,
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    data: Data,
    steps: int,
    seed: int,
) -> Run:
    opt = make_optimizer(model)
    learns = isinstance(opt, HyperSGD)
    run = Run(name, hyper={k: [] for k in LEARNED})

    def val_closure() -> Tensor:
        return cross_entropy(model(data.x_val), data.y_val)

    def record(step: int) -> None:
        with torch.no_grad():
            run.steps.append(step)
            run.val_loss.append(float(val_closure()))
        if learns:
            for k, v in opt.hyperparameters()[0].items():
                run.hyper[k].append(float(v))

    record(0)
    order = batches(len(data.x_train), seed)
    bar = tqdm(range(1, steps + 1), desc=name, leave=False, mininterval=0.5)
    start = time.perf_counter()
    for step in bar:
        index = next(order)
        x, y = data.x_train[index], data.y_train[index]

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            # torch's closure convention, unchanged for HyperSGD: with hvp="auto" it then
            # takes its Hessian-vector products by forward finite differences.
            opt.zero_grad()
            loss = cross_entropy(model(x), y)
            loss.backward()
            return loss

        if learns:
            opt.step(closure, val_closure=val_closure)
        else:
            opt.step(closure)
        if step % EVAL_EVERY == 0 or step == steps:
            record(step)
            lr = opt.param_groups[0]["lr"]
            bar.set_postfix(val_loss=f"{run.val_loss[-1]:.3f}", lr=f"{lr:.2g}", refresh=False)
    run.seconds = time.perf_counter() - start
    bar.close()

    with torch.no_grad():
        logits = model(data.x_test)
        run.test_loss = float(cross_entropy(logits, data.y_test))
        run.test_accuracy = float((logits.argmax(1) == data.y_test).float().mean())
    group = opt.param_groups[0]
    run.final = {k: float(group[k]) for k in LEARNED}
    if learns:
        run.final = {k: float(v) for k, v in opt.hyperparameters()[0].items()}
        skipped = opt.hyper_state["skipped_hyper_steps"]
        if skipped:
            print(f"note: {name} skipped {skipped} non-finite hyper-steps")
    return run


def plot(runs: list[Run], hyper_run: Run, out: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    panels = [
        ("lr", "learning rate", True),
        ("momentum", "momentum", False),
        ("weight_decay", "weight decay", True),
    ]
    for ax, (key, label, log) in zip(axes.flat, panels, strict=False):
        ax.plot(hyper_run.steps, hyper_run.hyper[key], color="C1", label="HyperSGD (learned)")
        ax.axhline(
            {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}[key],
            color="C0",
            linestyle="--",
            label="torch.optim.SGD (fixed)",
        )
        ax.set_title(label)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(loc="best")
    ax = axes.flat[3]
    styles = ["C0", "C1", "C2"]
    for run, color in zip(runs, styles, strict=False):
        linestyle = ":" if run is runs[-1] and len(runs) > 2 else "-"
        ax.plot(run.steps, run.val_loss, color=color, linestyle=linestyle, label=run.name)
    ax.set_title("validation loss (cross-entropy)")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best")
    fig.suptitle(
        f"digits, 64-64-10 tanh MLP, batch {BATCH_SIZE}: HyperSGD learning lr, momentum and "
        f"weight decay\nfrom lr={LR:g}, momentum={MOMENTUM:g}, weight_decay={WEIGHT_DECAY:g}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default: 1500)")
    parser.add_argument("--seed", type=int, default=0, help="init and batch-order seed")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch's intra-op threads (default: 1; on this small model more threads only "
        "contend, and on a busy machine they slow the run several times)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"figure path (default: {DEFAULT_OUT})"
    )
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)

    begin = time.perf_counter()
    data = load_data()
    torch.manual_seed(args.seed)
    init = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))

    def sgd(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        )

    def hyper_sgd(model: nn.Module) -> torch.optim.Optimizer:
        return HyperSGD(
            model.parameters(),
            lr=LR,
            momentum=MOMENTUM,
            weight_decay=WEIGHT_DECAY,
            learn=LEARNED,
            method="ift",
            neumann_steps=4,
            update_interval=10,
        )

    baseline = train("torch.optim.SGD", copy.deepcopy(init), sgd, data, args.steps, args.seed)
    hyper = train("HyperSGD", copy.deepcopy(init), hyper_sgd, data, args.steps, args.seed)
    learned = hyper.final

    def hindsight(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            model.parameters(),
            lr=learned["lr"],
            momentum=learned["momentum"],
            weight_decay=learned["weight_decay"],
        )

    reference = train(
        "SGD at HyperSGD's final", copy.deepcopy(init), hindsight, data, args.steps, args.seed
    )
    runs = [baseline, hyper, reference]

    n_train, n_val, n_test = len(data.x_train), len(data.x_val), len(data.x_test)
    print(
        f"digits: {n_train} train / {n_val} validation / {n_test} test, {args.steps} steps "
        f"of batch {BATCH_SIZE}, seed {args.seed}"
    )
    header = (
        f"{'optimizer':<30} {'test loss':>9} {'test acc':>8} {'lr':>9} {'momentum':>8} "
        f"{'wd':>9} {'time':>6}"
    )
    print(header)
    print("-" * len(header))
    for run in runs:
        f = run.final
        print(
            f"{run.name:<30} {run.test_loss:>9.4f} {run.test_accuracy:>8.2%} "
            f"{f['lr']:>9.3g} {f['momentum']:>8.3f} {f['weight_decay']:>9.2g} "
            f"{run.seconds:>5.1f}s"
        )
    plot(runs, hyper, args.out)
    print(f"figure: {args.out}")
    print(f"total time: {time.perf_counter() - begin:.1f} s")


if __name__ == "__main__":
    main()
