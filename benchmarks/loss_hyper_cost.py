"""What loss hyperparameters cost: time and memory of HyperSGD's hyper-step with 0, 1 and ~1M.

An MLP 784-1024-1024-10 (1.86M weights) on a fixed random batch (128 inputs, 10 classes;
a validation batch of 128), HyperSGD(lr=0.01, momentum=0.9, method="ift", K=4, T=10), with
an L2 penalty on the big layer's weight (1024x1024, 1,048,576 weights) in the training loss,
0.5 * exp(rho) * ||W||^2, in three configurations:

- (a) no loss hyperparameters: ``learn=("lr",)``, rho a constant (a Python float);
- (b) one loss hyperparameter: rho a scalar tensor (a log weight decay), also ``learn=("lr",)``;
- (c) ~1M loss hyperparameters: rho a 1024x1024 tensor, a log weight decay per weight of the
  big layer (0.5 * sum(exp(rho) * W^2)), also ``learn=("lr",)``;

and, for the use without any of the optimizer's own values (dataset distillation), (b) and (c)
with ``learn=()``.  Each with torch's closure (zero_grad, loss, backward: ``hvp="auto"`` takes
forward differences) and with a closure that returns the loss without ``backward()`` (exact
products by double backward).

Time: in one process, ``--repeats`` interleaved repeats, each running every configuration once
in a shuffled order from the same initial weights: ``--warmup`` untimed steps (one hyper-step
interval), then ``--steps`` timed steps (whole intervals), each step timed on its own.  Per
configuration: the mean time per training step over the timed intervals, and the time of the
steps that take a hyper-step minus the median of the others (the hyper-step's own cost);
each as the median over repeats of its ratio to (a) with the same closure in the same repeat.

Memory: the peak of live tensor memory during one hyper-step (step 2T, the second) above what
was live before it, from the CPU allocator's events (``torch.profiler``, ``profile_memory``),
as in ``benchmarks/overhead.py``'s ``hyper_step_bytes``; in parameter-sized copies (float32
weights of the whole model) and MB; also the same for the plain step before it (step 2T-1),
and the memory the optimizer keeps for the loss hyperparameters between steps (their
hyper-optimizer's state and the last hypergradients; the tensors themselves are the user's).

    python benchmarks/loss_hyper_cost.py            # full run (a few minutes, one thread)
    python benchmarks/loss_hyper_cost.py --quick    # a smoke run (< 60 s; width 256, 1 repeat)

Results: ``benchmarks/results/loss_hyper_cost.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead

from hyperopt_optim import HyperSGD

RESULTS = Path(__file__).resolve().parent / "results"
NEUMANN_STEPS = 4  # K
UPDATE_INTERVAL = 10  # T
LR, MOMENTUM = 0.01, 0.9
LOG_WEIGHT_DECAY = math.log(1e-4)  # rho's starting (or constant) value
BATCH = 128
WIDTH = 1024  # the hidden layers' width (--quick: 256)


def make_model(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def big_layer(model: nn.Sequential) -> Tensor:
    """The width x width weight, which the penalty (and rho) is on."""
    weight = model[2].weight
    assert isinstance(weight, Tensor)
    return weight


@dataclass
class Workload:
    width: int
    init: dict[str, Tensor]
    x: Tensor
    y: Tensor
    x_val: Tensor
    y_val: Tensor


def workload(width: int) -> Workload:
    """A fixed random batch and validation batch, fixed initial weights."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    init = make_model(width).state_dict()
    x, x_val = (torch.randn(BATCH, 784, generator=generator) for _ in range(2))
    y, y_val = (torch.randint(0, 10, (BATCH,), generator=generator) for _ in range(2))
    return Workload(width, init, x, y, x_val, y_val)


@dataclass(frozen=True)
class Config:
    name: str
    loss_hyper: str  # "none": rho constant; "scalar": one tensor; "per_weight": width x width
    torch_closure: bool  # True: zero_grad + backward inside (forward differences)
    learn: tuple[str, ...] = ("lr",)

    @property
    def closure_name(self) -> str:
        return "torch (backward inside)" if self.torch_closure else "loss only"

    @property
    def baseline(self) -> str:
        """The name of (a) with the same closure."""
        return f"(a) none, {'torch' if self.torch_closure else 'loss-only'} closure"


def configs(width: int) -> list[Config]:
    """(a), (b), (c), (b'), (c') with each closure."""
    n = f"{width * width:,}"
    return [
        Config(f"{tag}, {kind} closure", hyper, torch_closure, learn)
        for torch_closure, kind in ((True, "torch"), (False, "loss-only"))
        for tag, hyper, learn in (
            ("(a) none", "none", ("lr",)),
            ("(b) 1 (scalar log wd)", "scalar", ("lr",)),
            (f"(c) {n} (log wd per weight)", "per_weight", ("lr",)),
            ("(b') 1, learn=()", "scalar", ()),
            (f"(c') {n}, learn=()", "per_weight", ()),
        )
    ]


class Run:
    """A model from the workload's initial weights, the configuration's optimizer and closure."""

    def __init__(self, config: Config, work: Workload) -> None:
        self.config = config
        self.model = make_model(work.width)
        self.model.load_state_dict(work.init)
        weight = big_layer(self.model)
        self.rho: Tensor | float = LOG_WEIGHT_DECAY
        hyper: list[Tensor] = []
        if config.loss_hyper != "none":
            shape = () if config.loss_hyper == "scalar" else tuple(weight.shape)
            self.rho = torch.full(shape, LOG_WEIGHT_DECAY, requires_grad=True)
            hyper = [self.rho]
        self.opt = HyperSGD(
            self.model.parameters(),
            lr=LR,
            momentum=MOMENTUM,
            method="ift",
            learn=config.learn,
            neumann_steps=NEUMANN_STEPS,
            update_interval=UPDATE_INTERVAL,
            loss_hyperparameters=hyper or None,
        )
        model, opt = self.model, self.opt

        def penalty() -> Tensor:
            if isinstance(self.rho, float):
                return 0.5 * math.exp(self.rho) * weight.square().sum()
            return 0.5 * (self.rho.exp() * weight.square()).sum()

        def closure() -> Tensor:
            loss = cross_entropy(model(work.x), work.y) + penalty()
            if config.torch_closure:
                opt.zero_grad()
                loss.backward()
            return loss

        self.closure = closure
        opt.register_validation_closure(lambda: cross_entropy(model(work.x_val), work.y_val))

    def step(self) -> None:
        self.opt.step(self.closure)

    def kept_bytes(self) -> int:
        """What the optimizer keeps for the loss hyperparameters between steps: their
        hyper-optimizer's state and the last hypergradients (not the user's tensors)."""
        hyper_opt = self.opt.loss_hyper_optimizer
        if hyper_opt is None:
            return 0
        state = [v for s in hyper_opt.state.values() for v in s.values() if torch.is_tensor(v)]
        last = self.opt.loss_hypergradients()
        return sum(t.numel() * t.element_size() for t in [*state, *last])


def timed_run(config: Config, work: Workload, warmup: int, steps: int) -> dict[str, Any]:
    """``warmup`` untimed steps, then ``steps`` steps timed one by one."""
    run = Run(config, work)
    for _ in range(warmup):
        run.step()
    times: list[float] = []
    hyper: list[bool] = []
    for t in range(warmup, warmup + steps):
        start = time.perf_counter()
        run.step()
        times.append(time.perf_counter() - start)
        hyper.append((t + 1) % UPDATE_INTERVAL == 0)
    plain = statistics.median(x for x, h in zip(times, hyper, strict=True) if not h)
    with_hyper = [x for x, h in zip(times, hyper, strict=True) if h]
    state = run.opt.hyper_state
    return {
        "seconds_per_step": sum(times) / steps,
        "plain_step_s": plain,
        "hyper_step_s": statistics.fmean(with_hyper) - plain,
        "hyper_steps": state["hyper_steps"],
        "skipped_hyper_steps": state["skipped_hyper_steps"],
    }


def peak_live_bytes(fn: Callable[[], None]) -> int:
    """The peak of live tensor memory while ``fn`` runs, above what was live before, from the
    CPU allocator's events (``torch.profiler`` with ``profile_memory``): the approach of
    ``overhead.hyper_step_bytes``, for any step function."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int]] = []

    def walk(node: Any) -> None:
        if node.tag == torch._C._profiler._EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def memory(config: Config, work: Workload) -> dict[str, int]:
    """The live peak of step 2T-1 (plain) and of step 2T (the second hyper-step)."""
    run = Run(config, work)
    for _ in range(2 * UPDATE_INTERVAL - 2):
        run.step()
    plain = peak_live_bytes(run.step)
    hyper = peak_live_bytes(run.step)
    assert run.opt.hyper_state["hyper_steps"] == 2, run.opt.hyper_state
    return {"plain_step_bytes": plain, "hyper_step_bytes": hyper, "kept_bytes": run.kept_bytes()}


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    width = args.width
    work = workload(width)
    model = make_model(width)
    chosen = configs(width)
    n_params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    results: dict[str, Any] = {
        "machine": overhead.machine(torch.device("cpu")),
        "config": {
            "quick": args.quick,
            "model": f"MLP 784-{width}-{width}-10, ReLU",
            "parameters": n_params,
            "parameter_bytes": param_bytes,
            "big_layer": width * width,
            "batch": BATCH,
            "lr": LR,
            "momentum": MOMENTUM,
            "log_weight_decay": LOG_WEIGHT_DECAY,
            "neumann_steps": NEUMANN_STEPS,
            "update_interval": UPDATE_INTERVAL,
            "warmup": args.warmup,
            "steps": args.steps,
            "repeats": args.repeats,
        },
    }
    print(f"MLP 784-{width}-{width}-10: {n_params:,} parameters, batch {BATCH}", flush=True)
    order = random.Random(0)
    start = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in chosen}
    for r in range(args.repeats):
        shuffled = list(chosen)
        order.shuffle(shuffled)
        for config in shuffled:
            runs[config.name].append(timed_run(config, work, args.warmup, args.steps))
        print(f"  repeat {r + 1}/{args.repeats} done ({time.perf_counter() - start:.0f} s)")
    rows = []
    for config in chosen:
        here, base = runs[config.name], runs[config.baseline]

        def ratios(key: str, here: list[dict[str, Any]] = here, base: list[Any] = base) -> Any:
            values = [h[key] / b[key] for h, b in zip(here, base, strict=True)]
            return {"median": statistics.median(values), "min": min(values), "max": max(values)}

        mem = memory(config, work)
        rows.append(
            {
                "name": config.name,
                "loss_hyperparameters": {"none": 0, "scalar": 1, "per_weight": width * width}[
                    config.loss_hyper
                ],
                "learn": list(config.learn),
                "closure": config.closure_name,
                "against": config.baseline,
                "ms_per_step": 1e3 * statistics.median(h["seconds_per_step"] for h in here),
                "ms_plain_step": 1e3 * statistics.median(h["plain_step_s"] for h in here),
                "ms_hyper_step": 1e3 * statistics.median(h["hyper_step_s"] for h in here),
                "step_ratio": ratios("seconds_per_step"),
                "hyper_step_ratio": ratios("hyper_step_s"),
                "skipped_hyper_steps": sum(h["skipped_hyper_steps"] for h in here),
                **mem,
                "hyper_step_copies": mem["hyper_step_bytes"] / param_bytes,
                "plain_step_copies": mem["plain_step_bytes"] / param_bytes,
                "kept_copies": mem["kept_bytes"] / param_bytes,
                "runs": here,
            }
        )
    results["rows"] = rows
    results["seconds"] = time.perf_counter() - start
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def markdown(results: dict[str, Any]) -> str:
    m, cfg = results["machine"], results["config"]
    mb = 2**20
    lines = [
        "# The cost of loss hyperparameters (HyperSGD, ift, CPU)"
        + (" (quick smoke run)" if cfg["quick"] else ""),
        "",
        f"- date: {m['date']}",
        f"- machine: {m.get('cpu_model', m['processor'])}, os.cpu_count() = {m['cpu_count']}, "
        f"torch threads = {m['torch_threads']}; {m['platform']}, Python {m['python']}, torch "
        f"{m['torch']}, hyperopt_optim {m['hyperopt_optim']}",
        f"- load average (1, 5, 15 min) at start {m.get('load_average_at_start')}, at end "
        f"{m.get('load_average_at_end')}; run time {results['seconds']:.0f} s",
        f"- model: {cfg['model']}, {cfg['parameters']:,} parameters "
        f"({cfg['parameter_bytes'] / mb:.1f} MB in float32 = one copy), random batch "
        f"{cfg['batch']}, validation batch {cfg['batch']}",
        f"- HyperSGD(lr={cfg['lr']}, momentum={cfg['momentum']}, method='ift', "
        f"K={cfg['neumann_steps']}, T={cfg['update_interval']}); training loss = cross-entropy "
        f"+ 0.5·exp(rho)·‖W‖² on the big layer's {cfg['big_layer']:,} weights, rho starting at "
        f"log(1e-4): (a) a constant, (b) a scalar loss hyperparameter, (c) one per weight; "
        "(b'), (c'): the same with learn=() (nothing of the optimizer's own learned)",
        "- closures: torch's (backward inside: hvp='auto' takes forward differences, the mixed "
        "product too) and loss-only (exact products and mixed product by double backward)",
        f"- time: {cfg['repeats']} interleaved repeats (every configuration once per repeat, "
        f"shuffled), each {cfg['warmup']} untimed + {cfg['steps']} timed steps timed one by "
        "one; 'ms / step': mean over the timed steps (hyper-steps included); 'hyper-step ms': "
        "the steps that take one minus the median plain step; ratios: median over repeats of "
        "the ratio to (a) with the same closure in the same repeat [min-max]",
        "- memory: the peak of live tensor memory during a step above what was live before it "
        "(torch.profiler, profile_memory; the approach of overhead.py's hyper_step_bytes), at "
        "step 2T (the second hyper-step) and at the plain step 2T-1 before it, in copies of "
        "the model's parameters; 'kept': what the optimizer holds between steps for the loss "
        "hyperparameters (their Adam state and last hypergradients)",
        "",
        "| configuration | ms / step | step ratio to (a) | plain step ms | hyper-step ms | "
        "hyper-step ratio to (a) | plain step peak (copies) | hyper-step peak (copies) | "
        "hyper-step peak MB | kept MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        step, hyper = row["step_ratio"], row["hyper_step_ratio"]
        lines.append(
            f"| {row['name']} | {row['ms_per_step']:.1f} | {step['median']:.2f} "
            f"[{step['min']:.2f}-{step['max']:.2f}] | {row['ms_plain_step']:.1f} | "
            f"{row['ms_hyper_step']:.1f} | "
            f"{hyper['median']:.2f} [{hyper['min']:.2f}-{hyper['max']:.2f}] | "
            f"{row['plain_step_copies']:.2f} | {row['hyper_step_copies']:.2f} | "
            f"{row['hyper_step_bytes'] / mb:.1f} | {row['kept_bytes'] / mb:.1f} |"
        )
    rows = {row["name"]: row for row in results["rows"]}
    lines += ["", "Differences from (a) with the same closure (medians; memory exact):", ""]
    for row in results["rows"]:
        base = rows[row["against"]]
        if row is base:
            continue
        lines.append(
            f"- {row['name']}: plain step {row['ms_plain_step'] - base['ms_plain_step']:+.1f} "
            f"ms, hyper-step {row['ms_hyper_step'] - base['ms_hyper_step']:+.1f} ms; peak "
            f"{row['plain_step_copies'] - base['plain_step_copies']:+.2f} copies at a plain "
            f"step, {row['hyper_step_copies'] - base['hyper_step_copies']:+.2f} at the "
            f"hyper-step; kept {row['kept_copies']:.2f} copies"
        )
    lines += [
        "",
        "Reading: a plain step's extra time and memory are the closure's (its graph through rho "
        "and, with torch's closure, rho's gradient), not the optimizer's; the hyper-step adds "
        "one mixed product (one more gradient evaluation, or one more double backward), the "
        "cotangent R, and the hypergradient of rho; what the optimizer keeps between steps is "
        "the hyper-optimizer's state (Adam: two tensors of rho's size) and the last "
        "hypergradient (one).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (< 60 s)")
    parser.add_argument("--repeats", type=int, default=None, help="default 7 (quick: 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps, default 30")
    parser.add_argument("--warmup", type=int, default=UPDATE_INTERVAL, help="untimed steps")
    parser.add_argument("--width", type=int, default=None, help=f"default {WIDTH} (quick: 256)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.width = args.width or (256 if args.quick else WIDTH)
    args.repeats = args.repeats or (1 if args.quick else 7)
    args.steps = args.steps or (UPDATE_INTERVAL if args.quick else 3 * UPDATE_INTERVAL)
    if args.steps % UPDATE_INTERVAL:
        parser.error(f"--steps must be a multiple of T={UPDATE_INTERVAL}")
    results = benchmark(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "loss_hyper_cost" + ("_quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {args.out / stem}.{{json,md}}")


if __name__ == "__main__":
    main()
