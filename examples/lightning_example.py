"""HyperSGD inside PyTorch Lightning: learning the learning rate and momentum while
``Trainer.fit`` trains a small MLP on scikit-learn's handwritten digits.

The whole integration is ``configure_optimizers``: it returns a ``HyperSGD`` on which a
validation closure is registered (the validation loss of the module's current parameters, no
``backward()``), and a hyper-step hook that logs the learned values with ``self.log``.

Lightning's automatic optimization is used as it is: Lightning calls
``optimizer.step(closure=...)``, where its closure runs ``training_step``, ``zero_grad`` and
``backward``. That is torch's closure convention, so ``hvp="auto"`` takes the Hessian-vector
products of ``method="ift"`` by forward finite differences, each costing one more call of the
closure (so ``training_step`` runs ``1 + K`` times on a step that ends with a hyper-step).
``--manual`` shows the alternative: manual optimization with a closure that returns the loss
without ``backward()``, for exact products by double backward and one evaluation per step::

    python examples/lightning_example.py                       # 10 epochs, 230 steps
    python examples/lightning_example.py --manual              # exact (autograd) products
    python examples/lightning_example.py --max-epochs 20 --method greedy --csv /tmp/logs
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn
from torch.nn.functional import cross_entropy
from torch.utils.data import DataLoader, TensorDataset

from hyperopt_optim import HyperOptimizer, HyperSGD

SPLIT_SEED = 0  # the train/validation split is fixed; --seed moves the init and batch order
BATCH_SIZE = 64
LEARNED = ("lr", "momentum")


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


def train_loader(data: Data, seed: int) -> DataLoader:
    """Shuffled minibatches, in an order fixed by ``seed``."""
    dataset = TensorDataset(data.x_train, data.y_train)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, generator=generator)


def val_loader(data: Data) -> DataLoader:
    return DataLoader(TensorDataset(data.x_val, data.y_val), batch_size=len(data.x_val))


class DigitsModule(lightning.LightningModule):
    """A 64-``hidden``-10 tanh MLP trained by ``HyperSGD``.

    The validation split is held as (non-persistent) buffers, so it moves with the module to
    Lightning's device and the validation closure can evaluate it in one batch.
    """

    def __init__(
        self,
        x_val: Tensor,
        y_val: Tensor,
        *,
        lr: float = 0.01,
        momentum: float = 0.5,
        method: str = "ift",
        neumann_steps: int | None = None,
        update_interval: int = 10,
        hidden: int = 64,
        manual: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["x_val", "y_val"])
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
        self.register_buffer("x_val", x_val, persistent=False)
        self.register_buffer("y_val", y_val, persistent=False)
        self.automatic_optimization = not manual
        self.loss_evaluations = 0  # the training closure's calls, the products' included
        self.history: list[dict[str, float]] = []  # the learned values at each hyper-step

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def validation_loss(self) -> Tensor:
        """The validation closure: the loss of the current parameters on the whole validation
        split, with gradients enabled and without ``backward()`` (the optimizer differentiates
        it)."""
        return cross_entropy(self.net(self.x_val), self.y_val)

    def build_optimizer(self) -> HyperOptimizer:
        """The optimizer with its validation closure: all that Lightning needs, and what a plain
        PyTorch loop would use."""
        h = self.hparams
        opt = HyperSGD(
            self.net.parameters(),
            lr=h.lr,
            momentum=h.momentum,
            learn=LEARNED,
            method=h.method,
            neumann_steps=h.neumann_steps,
            update_interval=h.update_interval,
        )
        opt.register_validation_closure(self.validation_loss)
        return opt

    def configure_optimizers(self) -> HyperOptimizer:
        opt = self.build_optimizer()
        opt.register_hyper_step_hook(self.on_hyper_step)
        return opt

    def on_hyper_step(
        self,
        optimizer: HyperOptimizer,
        hyperparameters: list[dict[str, Any]],
        hypergradients: list[dict[str, Any]],
    ) -> None:
        """The hyper-step hook. It runs inside ``optimizer.step``, so inside Lightning's
        ``optimizer_step`` hook (or ``training_step``, with ``--manual``), where ``self.log`` is
        allowed. One param group, scalar granularity: one 0-dim tensor per learned name."""
        values, grads = hyperparameters[0], hypergradients[0]
        record = {"step": float(optimizer.hyper_state["step"])}
        for name in values:
            record[name] = float(values[name])
            self.log(f"hyper/{name}", record[name])
            self.log(f"hypergrad/{name}", float(grads[name]))
        self.history.append(record)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        x, y = batch
        if self.automatic_optimization:  # Lightning's closure: this, zero_grad, backward
            loss = self.training_loss(x, y)
            # On a step with a hyper-step the finite-difference products call this again at
            # perturbed weights; on_step logging keeps the last call's value (off by O(eps)).
            self.log("train_loss", loss)
            return loss
        # --manual: our own closure returns the loss without backward(), so hvp="auto" takes
        # exact products by double backward, and the loss is evaluated once per step.
        opt = self.optimizers()
        loss = opt.step(closure=lambda: self.training_loss(x, y))
        self.log("train_loss", loss)
        return None

    def training_loss(self, x: Tensor, y: Tensor) -> Tensor:
        self.loss_evaluations += 1  # the steps' and the products' evaluations
        return cross_entropy(self.net(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())


def make_trainer(args: argparse.Namespace) -> lightning.Trainer:
    logger: Any = False
    if args.csv is not None:
        logger = lightning.pytorch.loggers.CSVLogger(args.csv, name="lightning_example")
    return lightning.Trainer(
        max_epochs=args.max_epochs,
        max_steps=args.steps,
        accelerator=args.accelerator,
        devices=1,
        logger=logger,
        log_every_n_steps=args.update_interval,  # the logger writes every hyper-step
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-epochs", type=int, default=10, help="epochs (default: 10)")
    parser.add_argument(
        "--steps", type=int, default=-1, help="stop after this many steps (default: -1, no limit)"
    )
    parser.add_argument("--method", choices=("ift", "greedy"), default="ift")
    parser.add_argument(
        "--neumann-steps", type=int, default=None, help="K (default: 4 for ift, 0 for greedy)"
    )
    parser.add_argument("--update-interval", type=int, default=10, help="T (default: 10)")
    parser.add_argument("--lr", type=float, default=0.01, help="starting lr (default: 0.01)")
    parser.add_argument("--momentum", type=float, default=0.5, help="starting momentum")
    parser.add_argument("--seed", type=int, default=0, help="init and batch-order seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--accelerator", default="cpu", help="Lightning's accelerator")
    parser.add_argument(
        "--manual",
        action="store_true",
        help="manual optimization with a closure that leaves backward() to the optimizer: "
        "exact (autograd) Hessian-vector products, one loss evaluation per step",
    )
    parser.add_argument(
        "--csv", type=Path, default=None, help="write Lightning's CSV logs under this folder"
    )
    args = parser.parse_args(argv)
    if args.max_epochs < 1:
        parser.error(f"--max-epochs must be >= 1, got {args.max_epochs}")
    if args.update_interval < 1:
        parser.error(f"--update-interval must be >= 1, got {args.update_interval}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, print a summary and return it (the tests read it)."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    data = load_data()
    torch.manual_seed(args.seed)
    module = DigitsModule(
        data.x_val,
        data.y_val,
        lr=args.lr,
        momentum=args.momentum,
        method=args.method,
        neumann_steps=args.neumann_steps,
        update_interval=args.update_interval,
        manual=args.manual,
    )
    trainer = make_trainer(args)
    trainer.fit(module, train_loader(data, args.seed), val_loader(data))
    (metrics,) = trainer.validate(module, val_loader(data), verbose=False)

    opt = trainer.optimizers[0]  # the HyperSGD itself (Lightning wraps it only while stepping)
    assert isinstance(opt, HyperOptimizer)
    learned = {k: float(v) for k, v in opt.hyperparameters()[0].items()}
    summary = {
        "val_acc": float(metrics["val_acc"]),
        "val_loss": float(metrics["val_loss"]),
        "learned": learned,
        "hypergradients": {k: float(v) for k, v in opt.hypergradients()[0].items()},
        "hyper_state": opt.hyper_state,
        "resolved_hvp": opt.state_dict()["hyper"]["resolved_hvp"],
        "neumann_steps": opt.neumann_steps,
        "loss_evaluations": module.loss_evaluations,
        "history": module.history,
        "seconds": time.perf_counter() - begin,
    }
    state = opt.hyper_state
    products = f"products by {summary['resolved_hvp']}" if opt.neumann_steps else "no products"
    print(
        f"validation accuracy {summary['val_acc']:.2%}, validation loss {summary['val_loss']:.4f}"
    )
    print(
        f"learned lr {learned['lr']:.4g} (from {args.lr:g}), momentum "
        f"{learned['momentum']:.4g} (from {args.momentum:g})"
    )
    print(
        f"{state['step']} steps, {state['hyper_steps']} hyper-steps "
        f"({state['skipped_hyper_steps']} skipped), method {opt.method!r} with K="
        f"{opt.neumann_steps}, {products}; the training loss was "
        f"evaluated {module.loss_evaluations} times; {summary['seconds']:.1f} s (imports excluded)"
    )
    return summary


if __name__ == "__main__":
    main()
