"""Reversible learning on digits (Maclaurin, Duvenaud & Adams 2015): learned per-layer
schedules, the memory kept for the reversal, and the time per episode against forward mode.

The paper's experiment, scaled to scikit-learn's digits: an MLP 64-50-50-50-10 (tanh), one
param group per layer, ``HyperSGD(method="reversible", horizon=100, windows=100,
learn=("lr", "momentum"))``: a learning-rate and a momentum schedule per layer with one
window per step (800 hyperparameters).  Each meta-iteration runs one episode of 100 SGD steps
(batches of 64 from the training split, drawn afresh per episode) from the same initial
weights, runs it backwards with ``reverse()`` (exact products: the closures return the loss)
and steps the schedules with Adam, without backtracking (the episodes see different batches,
so a worse episode may be noise).  The validation loss is the cross-entropy on the
validation split after the episode; the test split is reported only.

1. Check: on one episode, reversible's hypergradients against forward mode's (episodic,
   exact products) on the same schedules (relative difference).
2. Meta-learning: ``--meta`` meta-iterations (default 50); the learned schedules per layer
   (figure), the validation loss per meta-iteration, and the test loss of the first and the
   last schedule.
3. Memory kept for the reversal at the end of an episode (the information buffers; the
   fixed-point weights and velocity), against storing the trajectory (the weights, and the
   weights and velocity, of every step in float32), at momentum 0.9 and at the learned
   schedules.
4. Time per episode (forward steps and the reverse pass) against forward mode (episodic,
   exact batched products, the same schedules) with 1 to 100 windows, in one process, and
   the number of hyperparameters at which reversible becomes the cheaper.

    python benchmarks/reversible.py            # ~10 min on one thread
    python benchmarks/reversible.py --quick    # a smoke run (< 60 s), *_quick

Results: ``benchmarks/results/reversible.{json,md}`` and ``reversible_schedules.png``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_hyper_capacity import machine  # the machine's description, as the others write it

from hyperopt_optim import HyperSGD

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = (64, 50, 50, 50, 10)


@dataclass(frozen=True)
class Settings:
    steps: int = 100
    batch: int = 64
    lr: float = 0.05
    momentum: float = 0.5
    meta: int = 50
    meta_lr: float = 0.05
    windows_timed: tuple[int, ...] = (1, 2, 5, 10, 25, 50, 100)
    repeats: int = 3
    seed: int = 0
    long_steps: int = 1000


QUICK = Settings(steps=20, meta=3, windows_timed=(1, 5, 20), repeats=1, long_steps=40)


def load_digits_split() -> dict[str, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    a, b = int(0.5 * len(y)), int(0.7 * len(y))
    return {"x": x[:a], "y": y[:a], "xv": x[a:b], "yv": y[a:b], "xt": x[b:], "yt": y[b:]}


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(SIZES)):
        layers.append(nn.Linear(a, b))
        if i < len(SIZES) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def layer_groups(model: nn.Sequential) -> list[dict[str, Any]]:
    return [{"params": list(m.parameters())} for m in model if isinstance(m, nn.Linear)]


class Task:
    """The batches of one episode and the closures over them."""

    def __init__(self, data: dict[str, Tensor], model: nn.Module, s: Settings, episode: int):
        g = torch.Generator().manual_seed(1000 + episode)
        n = len(data["y"])
        self.batches = [torch.randint(0, n, (s.batch,), generator=g) for _ in range(s.steps)]
        self.data, self.model = data, model

    def closure_at(self, t: int) -> Callable[[], Tensor]:
        idx = self.batches[t]

        def closure() -> Tensor:  # returns the loss: the products are exact (double backward)
            return cross_entropy(self.model(self.data["x"][idx]), self.data["y"][idx])

        return closure

    def loss_fn(self, t: int) -> Callable[[list[Tensor]], Tensor]:
        idx = self.batches[t]
        names = [n for n, _ in self.model.named_parameters()]

        def loss(params: list[Tensor]) -> Tensor:
            out = torch.func.functional_call(
                self.model, dict(zip(names, params, strict=True)), (self.data["x"][idx],)
            )
            return cross_entropy(out, self.data["y"][idx])

        return loss

    def val(self) -> Tensor:
        return cross_entropy(self.model(self.data["xv"]), self.data["yv"])

    def test(self) -> tuple[float, float]:
        with torch.no_grad():
            out = self.model(self.data["xt"])
            return float(cross_entropy(out, self.data["yt"])), float(
                (out.argmax(1) == self.data["yt"]).float().mean()
            )


def reversible(model: nn.Module, s: Settings, windows: int, **kwargs: Any) -> HyperSGD:
    return HyperSGD(
        layer_groups(model), lr=s.lr, momentum=s.momentum, method="reversible",
        horizon=s.steps, windows=windows, learn=("lr", "momentum"), **kwargs,
    )  # fmt: skip


def forward_mode(model: nn.Module, s: Settings, windows: int, **kwargs: Any) -> HyperSGD:
    return HyperSGD(
        layer_groups(model), lr=s.lr, momentum=s.momentum, method="forward", mode="episodic",
        horizon=s.steps, windows=windows, learn=("lr", "momentum"), hvp="autograd_batched",
        **kwargs,
    )  # fmt: skip


def frozen(params: list[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.0)


# -- 1. the check --------------------------------------------------------------------------------


def check(data: dict[str, Tensor], s: Settings) -> dict[str, Any]:
    """One episode, windows = steps / 5: reversible against forward mode's hypergradients."""
    windows = max(1, s.steps // 5)
    results: dict[str, Any] = {"windows": windows}
    grads = {}
    for name in ("reversible", "forward"):
        model = make_model(s.seed)
        task = Task(data, model, s, 0)
        if name == "reversible":
            opt = reversible(model, s, windows, hyper_optimizer=frozen)
            for t in range(s.steps):
                opt.step(task.closure_at(t))
            opt.reverse(task.val, task.closure_at)
        else:
            opt = forward_mode(model, s, windows, hyper_optimizer=frozen)
            with torch.no_grad():  # the same weights, on reversible's grid
                for p in model.parameters():
                    p.copy_((p.double() * 2.0**52).round() / 2.0**52)
            for t in range(s.steps):
                opt.step(loss_fn=task.loss_fn(t), val_closure=task.val)
        grads[name] = torch.cat(
            [torch.stack(list(g[k])) if isinstance(g[k], list) else g[k].reshape(1, -1)
             for g in opt.hypergradients() for k in ("lr", "momentum")]
        )  # fmt: skip
    diff = (grads["reversible"] - grads["forward"]).abs().max() / grads["forward"].abs().max()
    results["relative_difference"] = float(diff)
    results["largest"] = float(grads["forward"].abs().max())
    return results


# -- 2. meta-learning ------------------------------------------------------------------------------


def meta_learning(
    data: dict[str, Tensor], s: Settings, log: Callable[[str], None]
) -> dict[str, Any]:
    model = make_model(s.seed)
    opt = reversible(  # the batches differ between episodes: no backtracking (the paper's steps)
        model,
        s,
        s.steps,
        hyper_optimizer=lambda ps: torch.optim.Adam(ps, lr=s.meta_lr),
        backtrack=False,
    )
    episodes: list[dict[str, Any]] = []
    memory: dict[str, Any] = {}
    initial = None
    for episode in range(s.meta):
        task = Task(data, model, s, episode)
        start = time.perf_counter()
        for t in range(s.steps):
            opt.step(task.closure_at(t))
        forward_s = time.perf_counter() - start
        with torch.no_grad():
            val = float(task.val())
        test_loss, test_acc = task.test()
        if episode == 0:
            memory = measure_memory(opt, model, s)
            initial = {"test_loss": test_loss, "test_accuracy": test_acc, "val": val}
        start = time.perf_counter()
        opt.reverse(task.val, task.closure_at)
        reverse_s = time.perf_counter() - start
        episodes.append(
            {
                "episode": episode, "val": val, "test_loss": test_loss, "test_accuracy": test_acc,
                "forward_s": forward_s, "reverse_s": reverse_s,
                "backtracks": opt._method.schedule.backtracks,  # type: ignore[union-attr]
            }
        )  # fmt: skip
        log(
            f"episode {episode}: val {val:.4f} test {test_loss:.4f} ({test_acc:.3f}); "
            f"forward {forward_s:.2f} s, reverse {reverse_s:.2f} s"
        )
    schedules = [
        {k: [float(x) for x in g[k]] for k in ("lr", "momentum")}  # type: ignore[union-attr]
        for g in opt.schedules()
    ]
    best = min(episodes, key=lambda e: e["val"])
    return {
        "episodes": episodes,
        "schedules": schedules,
        "initial": initial,
        "best": best,
        "memory_learned": measure_after(opt, model, data, s),
        "memory_first_episode": memory,
    }


def measure_memory(opt: HyperSGD, model: nn.Module, s: Settings) -> dict[str, Any]:
    """What the optimizer keeps for the reversal, at the end of an episode, against storing
    the trajectory in float32."""
    params = sum(p.numel() for p in model.parameters())
    method = opt._method
    buffer = method.buffer_memory()  # type: ignore[attr-defined]
    kept = method.memory()
    weights_only = s.steps * params * 4
    return {
        "parameters": params,
        "steps": s.steps,
        "buffer_bytes": buffer,
        "kept_bytes": kept,
        "buffer_bits_per_parameter_per_step": 8 * buffer / params / s.steps,
        "trajectory_weights_bytes": weights_only,
        "trajectory_weights_and_velocity_bytes": 2 * weights_only,
        "ratio_weights_to_buffer": weights_only / buffer if buffer else None,
        "ratio_weights_and_velocity_to_buffer": 2 * weights_only / buffer if buffer else None,
        "ratio_weights_and_velocity_to_kept": 2 * weights_only / kept if kept else None,
    }


def measure_after(
    opt: HyperSGD, model: nn.Module, data: dict[str, Tensor], s: Settings
) -> dict[str, Any]:
    """One more episode with the learned schedules: its memory, and its test loss."""
    task = Task(data, model, s, s.meta)
    for t in range(s.steps):
        opt.step(task.closure_at(t))
    out = measure_memory(opt, model, s)
    out["test_loss"], out["test_accuracy"] = task.test()
    with torch.no_grad():
        out["val"] = float(task.val())
    opt.reverse(task.val, task.closure_at)
    return out


def memory_at_momentum(
    data: dict[str, Tensor], s: Settings, momentum: float, steps: int
) -> dict[str, Any]:
    s = Settings(**{**asdict(s), "steps": steps})
    model = make_model(s.seed)
    opt = HyperSGD(
        layer_groups(model), lr=s.lr, momentum=momentum, method="reversible",
        horizon=s.steps, windows=1, learn=("lr",),
    )  # fmt: skip
    task = Task(data, model, s, 0)
    for t in range(s.steps):
        opt.step(task.closure_at(t))
    out = measure_memory(opt, model, s)
    out["momentum"] = momentum
    opt.reverse(task.val, task.closure_at)
    return out


# -- 4. time ---------------------------------------------------------------------------------------


def timing(data: dict[str, Tensor], s: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """Seconds per episode: torch's SGD, reversible (forward steps + reverse) and forward
    mode with each number of windows, interleaved repeats in one process."""
    rows: dict[str, list[float]] = {"torch.optim.SGD": [], "reversible": []}
    for w in s.windows_timed:
        rows[f"forward, {w} windows"] = []
    for repeat in range(s.repeats):
        model = make_model(s.seed)
        start_weights = [p.detach().clone() for p in model.parameters()]

        def reset(model: nn.Module = model, start: list[Tensor] = start_weights) -> None:
            with torch.no_grad():
                for p, w0 in zip(model.parameters(), start, strict=True):
                    p.copy_(w0)

        task = Task(data, model, s, repeat)
        reset()
        sgd = torch.optim.SGD(layer_groups(model), lr=s.lr, momentum=s.momentum)
        start = time.perf_counter()
        for t in range(s.steps):
            sgd.zero_grad()
            task.closure_at(t)().backward()
            sgd.step()
        rows["torch.optim.SGD"].append(time.perf_counter() - start)
        reset()
        opt = reversible(model, s, s.steps, hyper_optimizer=frozen)
        start = time.perf_counter()
        for t in range(s.steps):
            opt.step(task.closure_at(t))
        opt.reverse(task.val, task.closure_at)
        rows["reversible"].append(time.perf_counter() - start)
        for w in s.windows_timed:
            reset()
            fwd = forward_mode(model, s, w, hyper_optimizer=frozen)
            start = time.perf_counter()
            for t in range(s.steps):
                fwd.step(loss_fn=task.loss_fn(t), val_closure=task.val)
            rows[f"forward, {w} windows"].append(time.perf_counter() - start)
        log(f"timing repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in rows.items()))
    medians = {k: sorted(v)[len(v) // 2] for k, v in rows.items()}
    values_per_window = 2 * (len(SIZES) - 1)
    crossover = next(
        (w * values_per_window for w in s.windows_timed
         if medians[f"forward, {w} windows"] > medians["reversible"]),
        None,
    )  # fmt: skip
    return {
        "seconds": rows,
        "median_seconds": medians,
        "values_per_window": values_per_window,
        "crossover_hyperparameters": crossover,
    }


# -- report ----------------------------------------------------------------------------------------


def report(r: dict[str, Any], s: Settings) -> str:
    m = r["machine"]
    meta = r["meta"]
    first, after = meta["initial"], meta["memory_learned"]
    mem9 = r["memory_momentum_09"]
    learned = meta["memory_learned"]
    t = r["timing"]
    sgd = t["median_seconds"]["torch.optim.SGD"]
    lines = [
        "# Reversible learning on digits",
        "",
        f"Generated by `{r['command']}` on {r['date']}: {m['cpu']} ({m['cores']} cores, torch "
        f"threads {m['threads']}), Python {m['python']}, torch {m['torch']}; total "
        f"{r['seconds'] / 60:.1f} min.",
        "",
        f"Settings: {json.dumps(asdict(s))}. MLP {'-'.join(map(str, SIZES))} tanh, one param "
        "group per layer; lr and momentum schedules per layer, one window per step; closures "
        "that return the loss (exact products).",
        "",
        "## 1. Check against forward mode",
        "",
        f"One episode of {s.steps} steps, {r['check']['windows']} windows: the largest "
        f"relative difference between reversible's and forward mode's hypergradients is "
        f"{r['check']['relative_difference']:.2e} (float32 model).",
        "",
        f"## 2. Meta-learning: {s.meta} meta-iterations with Adam (lr {s.meta_lr})",
        "",
        "| schedule | validation loss | test loss | test accuracy |",
        "|---|---:|---:|---:|",
        f"| initial (lr {s.lr}, momentum {s.momentum} everywhere) | {first['val']:.4f} | "
        f"{first['test_loss']:.4f} | {first['test_accuracy']:.3f} |",
        f"| best episode ({meta['best']['episode']}) | {meta['best']['val']:.4f} | "
        f"{meta['best']['test_loss']:.4f} | {meta['best']['test_accuracy']:.3f} |",
        f"| learned (after the last meta-iteration) | {after['val']:.4f} | "
        f"{after['test_loss']:.4f} | {after['test_accuracy']:.3f} |",
        "",
        "![schedules](reversible_schedules.png)",
        "",
        "## 3. Memory kept for the reversal (end of an episode)",
        "",
        "| run | information buffers | bits / parameter / step | all kept (buffers, fixed-point "
        "w and b, per-step records) | trajectory, w of every step (float32) | ratio | "
        "trajectory, w and b | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    runs = (
        (f"momentum 0.9 throughout, {s.steps} steps", mem9),
        (f"momentum 0.9 throughout, {s.long_steps} steps", r["memory_momentum_09_long"]),
        (f"the learned schedules, {s.steps} steps", learned),
    )
    for name, x in runs:
        lines.append(
            f"| {name} | {x['buffer_bytes']:,} B | {x['buffer_bits_per_parameter_per_step']:.2f} | "
            f"{x['kept_bytes']:,} B | {x['trajectory_weights_bytes']:,} B | "
            f"{x['ratio_weights_to_buffer']:.0f}x | "
            f"{x['trajectory_weights_and_velocity_bytes']:,} B "
            f"| {x['ratio_weights_and_velocity_to_buffer']:.0f}x |"
        )
    lines += [
        "",
        "The buffers are held in 47-bit limbs of int64, a whole number of limbs per element, "
        "the top one in the narrowest integer type (8 to 64 bits) its bound fits; the "
        "information itself is about log2(1/momentum) bits per step (0.15 at 0.9) plus the "
        "16 bits of the last push. `all kept` adds the fixed-point weights and velocity (two "
        "int64 copies of the weights), which do not grow with the steps.",
        "",
        f"## 4. Time per episode (median of {s.repeats} interleaved repeats)",
        "",
        "| run | hyperparameters | seconds | / torch.optim.SGD |",
        "|---|---:|---:|---:|",
        f"| torch.optim.SGD | 0 | {sgd:.2f} | 1 |",
        f"| reversible (forward + reverse) | {t['values_per_window'] * s.steps} | "
        f"{t['median_seconds']['reversible']:.2f} | "
        f"{t['median_seconds']['reversible'] / sgd:.1f}x |",
    ]
    for w in s.windows_timed:
        sec = t["median_seconds"][f"forward, {w} windows"]
        lines.append(
            f"| forward mode, {w} windows | {t['values_per_window'] * w} | {sec:.2f} | "
            f"{sec / sgd:.1f}x |"
        )
    cross = t["crossover_hyperparameters"]
    lines += [
        "",
        "Reversible's cost does not depend on the number of windows (any schedule of lr and "
        "momentum costs one forward pass of the steps and one backward pass with a gradient "
        "and a Hessian-vector product per step); forward mode's grows with the active tangent "
        "columns. "
        + (
            f"Reversible is the cheaper from {cross} hyperparameters on "
            f"({cross // t['values_per_window']} "
            "windows)."
            if cross is not None
            else "Forward mode stayed the cheaper over the windows timed."
        ),
    ]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], s: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    steps = range(s.steps)
    for i, sched in enumerate(r["meta"]["schedules"]):
        axes[0].plot(steps, sched["lr"], label=f"layer {i + 1}")
        axes[1].plot(steps, sched["momentum"], label=f"layer {i + 1}")
    axes[0].set(title="learned learning-rate schedules", xlabel="step", ylabel="lr", yscale="log")
    axes[1].set(title="learned momentum schedules", xlabel="step", ylabel="momentum")
    for ax in axes[:2]:
        ax.axhline(s.lr if ax is axes[0] else s.momentum, color="gray", ls=":", label="initial")
        ax.legend(fontsize=8)
    eps = r["meta"]["episodes"]
    axes[2].plot([e["episode"] for e in eps], [e["val"] for e in eps], label="validation")
    axes[2].plot([e["episode"] for e in eps], [e["test_loss"] for e in eps], label="test")
    axes[2].set(title="loss after each episode", xlabel="meta-iteration", ylabel="cross-entropy")
    axes[2].legend()
    fig.suptitle(
        f"Reversible learning, digits MLP {'-'.join(map(str, SIZES))}, {s.steps} steps, "
        f"{s.meta} meta-iterations (Adam {s.meta_lr})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (< 60 s), *_quick")
    parser.add_argument("--meta", type=int, help="meta-iterations (default 50)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else Settings()
    if args.meta is not None:
        s = Settings(**{**asdict(s), "meta": args.meta})
    suffix = "_quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)

    data = load_digits_split()
    results: dict[str, Any] = {"settings": asdict(s)}
    results["check"] = check(data, s)
    log(f"check: relative difference {results['check']['relative_difference']:.2e}")
    results["memory_momentum_09"] = memory_at_momentum(data, s, 0.9, s.steps)
    results["memory_momentum_09_long"] = memory_at_momentum(data, s, 0.9, s.long_steps)
    log("memory measured")
    results["meta"] = meta_learning(data, s, log)
    results["timing"] = timing(data, s, log)
    results.update(
        machine=machine(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(["python", "benchmarks/reversible.py", *(argv or sys.argv[1:])]),
        seconds=time.perf_counter() - start,
    )
    (args.out / f"reversible{suffix}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"reversible{suffix}.md").write_text(report(results, s))
    plot(results, s, args.out / f"reversible{suffix}_schedules.png")
    log("done")


if __name__ == "__main__":
    main()
