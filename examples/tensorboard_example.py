"""Every learned hyperparameter and hypergradient in TensorBoard, through a hyper-step hook.

A 64-64-10 tanh MLP on scikit-learn's handwritten digits is trained by ``HyperSGD`` with two
param groups (the weight matrices and the biases), learning lr, momentum and weight decay.
``opt.register_hyper_step_hook`` logs, after every hyper-step, each learned value and its
hypergradient ``dL_V/dλ``:

- ``--granularity scalar``: one value per group and name, tags ``hyper/lr/group0``,
  ``hypergrad/lr/group0``, ...;
- ``--granularity tensor``: one value per parameter tensor, tags ``hyper/lr/group0/1`` (the
  group's second parameter), ...;
- ``--granularity element``: one value per weight, a histogram per parameter tensor under the
  same tags, and its mean as a scalar under ``.../mean``.

The training loss of every step (``loss/train``) and the validation loss every ``--eval-every``
steps (``loss/validation``) go to the same run::

    python examples/tensorboard_example.py                          # examples/output/tensorboard
    python examples/tensorboard_example.py --granularity tensor --logdir /tmp/tb
    tensorboard --logdir examples/output/tensorboard
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn
from torch.nn.functional import cross_entropy
from torch.utils.tensorboard import SummaryWriter

from hyperopt_optim import HyperOptimizer, HyperSGD

SPLIT_SEED = 0  # the train/validation split is fixed; --seed moves the init and batch order
BATCH_SIZE = 64
LEARNED = ("lr", "momentum", "weight_decay")
DEFAULT_LOGDIR = Path(__file__).resolve().parent / "output" / "tensorboard"


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor


def load_data() -> Data:
    """Digits (1797 8x8 images, 10 classes): 80% training, 20% validation, standardised on the
    training part."""
    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.2, random_state=SPLIT_SEED, stratify=y
    )
    scaler = StandardScaler().fit(x_train)

    def features(a: Any) -> Tensor:
        return torch.tensor(scaler.transform(a), dtype=torch.float32)

    def labels(a: Any) -> Tensor:
        return torch.tensor(a, dtype=torch.long)

    return Data(features(x_train), labels(y_train), features(x_val), labels(y_val))


def batches(n: int, seed: int):
    """Endless minibatch indices: shuffled epochs in an order fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - BATCH_SIZE + 1, BATCH_SIZE):
            yield perm[start : start + BATCH_SIZE]


def log_hyper_step(
    writer: SummaryWriter,
    step: int,
    hyperparameters: list[dict[str, Any]],
    hypergradients: list[dict[str, Any]],
) -> int:
    """Write every learned value under ``hyper/`` and its hypergradient under ``hypergrad/``
    (see the module's docstring for the tags); returns the number of values written."""
    written = 0
    for g, (values, grads) in enumerate(zip(hyperparameters, hypergradients, strict=True)):
        for name, value in values.items():
            tag = f"{name}/group{g}"
            if isinstance(value, Tensor):  # granularity "scalar": one 0-dim tensor
                writer.add_scalar(f"hyper/{tag}", float(value), step)
                writer.add_scalar(f"hypergrad/{tag}", float(grads[name]), step)
                written += 1
                continue
            for i, (v, d) in enumerate(zip(value, grads[name], strict=True)):  # one per tensor
                if v.dim() == 0:  # "tensor"
                    writer.add_scalar(f"hyper/{tag}/{i}", float(v), step)
                    writer.add_scalar(f"hypergrad/{tag}/{i}", float(d), step)
                else:  # "element": a value per weight
                    writer.add_histogram(f"hyper/{tag}/{i}", v, step)
                    writer.add_histogram(f"hypergrad/{tag}/{i}", d, step)
                    writer.add_scalar(f"hyper/{tag}/{i}/mean", float(v.mean()), step)
                written += 1
    return written


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    parser.add_argument("--granularity", choices=("scalar", "tensor", "element"), default="scalar")
    parser.add_argument("--method", choices=("greedy", "ift"), default="greedy")
    parser.add_argument("--update-interval", type=int, default=10, help="T (default: 10)")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between validations")
    parser.add_argument("--seed", type=int, default=0, help="init and batch-order seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument(
        "--logdir", type=Path, default=DEFAULT_LOGDIR, help=f"(default: {DEFAULT_LOGDIR})"
    )
    args = parser.parse_args(argv)
    for name in ("steps", "update_interval", "eval_every", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, write the event files and return a summary (the tests read it)."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    data = load_data()
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    named = list(model.named_parameters())
    groups = [  # two groups, to show the per-group tags
        {"params": [p for n, p in named if n.endswith("weight")]},
        {"params": [p for n, p in named if n.endswith("bias")]},
    ]
    opt = HyperSGD(
        groups,
        lr=0.01,
        momentum=0.5,
        weight_decay=1e-4,
        learn=LEARNED,
        granularity=args.granularity,
        method=args.method,
        update_interval=args.update_interval,
    )

    def val_closure() -> Tensor:  # the validation loss; no backward()
        return cross_entropy(model(data.x_val), data.y_val)

    opt.register_validation_closure(val_closure)

    writer = SummaryWriter(log_dir=str(args.logdir))
    names = {id(p): n for n, p in named}
    legend = [  # which parameter each index of a group is, for the tensor/element tags
        f"group{g}/{i}: {names[id(p)]} {tuple(p.shape)}"
        for g, group in enumerate(opt.param_groups)
        for i, p in enumerate(group["params"])
    ]
    writer.add_text("parameters", "  \n".join(legend), 0)
    counts = {"hyper_steps_logged": 0, "values_logged": 0}

    def hook(
        optimizer: HyperOptimizer,
        hyperparameters: list[dict[str, Any]],
        hypergradients: list[dict[str, Any]],
    ) -> None:
        step = optimizer.hyper_state["step"]
        counts["values_logged"] += log_hyper_step(writer, step, hyperparameters, hypergradients)
        counts["hyper_steps_logged"] += 1

    handle = opt.register_hyper_step_hook(hook)
    log_hyper_step(writer, 0, opt.hyperparameters(), opt.hypergradients())  # the start

    order = batches(len(data.x_train), args.seed)
    for step in range(1, args.steps + 1):
        index = next(order)
        x, y = data.x_train[index], data.y_train[index]

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            opt.zero_grad()
            loss = cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        writer.add_scalar("loss/train", float(loss.detach()), step)
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                writer.add_scalar("loss/validation", float(val_closure()), step)
    handle.remove()
    writer.close()

    with torch.no_grad():
        logits = model(data.x_val)
    learned = opt.hyperparameters()
    summary = {
        "logdir": str(args.logdir),
        "val_loss": float(cross_entropy(logits, data.y_val)),
        "val_acc": float((logits.argmax(1) == data.y_val).float().mean()),
        "hyper_state": opt.hyper_state,
        "lr": [float(torch.as_tensor(g["lr"]).mean()) for g in opt.param_groups],
        "learned": learned,
        "seconds": time.perf_counter() - begin,
        **counts,
    }
    print(
        f"{args.steps} steps, {counts['hyper_steps_logged']} hyper-steps logged "
        f"({counts['values_logged']} values), granularity {args.granularity!r}: validation "
        f"accuracy {summary['val_acc']:.2%}, loss {summary['val_loss']:.4f}"
    )
    print("lr per group:", ", ".join(f"{v:.4g}" for v in summary["lr"]), "(from 0.01)")
    print(f"event files in {args.logdir}; {summary['seconds']:.1f} s (imports excluded)")
    print(f"view them with: tensorboard --logdir {args.logdir}")
    return summary


if __name__ == "__main__":
    main()
