"""Wall-time and peak-memory overhead of HyperSGD against torch.optim.SGD.

The same model, data and number of steps are run with ``torch.optim.SGD`` and with HyperSGD
in several configurations (``method`` greedy and ift with K=4 Neumann terms every T=10 steps;
scalar and per-element hyperparameters; each Hessian-vector-product provider), in
interleaved repeats within one process.  Reported per configuration: the median time per
step, the median over repeats of its ratio to torch.optim.SGD's time in the same repeat, the
peak memory above what the model and data already hold, and the arithmetic floor of the
time ratio (DESIGN.md §9)::

    floor = 1 + (1 + c·K) / T

one validation forward-backward and K Hessian-vector products every T steps, each product
costing c forward-backward passes: c = 1 for forward differences, 2 for central differences,
and for double backward (``hvp="autograd"``) c is measured here by timing one product against
one forward-backward of the same model and batch.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the run, above what was allocated
before the optimizer was built.  On CPU, the peak resident set size (``VmHWM``, Linux) of a
fresh subprocess that runs one configuration, above its resident set size once the model
and data are built (the peak is reset there through ``/proc/self/clear_refs``; torch's lazy
initialisation is done before, and glibc's mmap threshold is fixed at 64 KiB so freed tensors
leave the resident set); elsewhere 'n/a'.

    python benchmarks/overhead.py                 # CPU, full configuration (several minutes)
    python benchmarks/overhead.py --quick         # a smoke run, under 30 s
    python benchmarks/overhead.py --device cuda   # on a GPU

Results go to ``benchmarks/results/overhead_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

import hyperopt_optim
from hyperopt_optim import HyperAdam, HyperOptimizer, HyperSGD
from hyperopt_optim.hypergradients import onepass

RESULTS = Path(__file__).resolve().parent / "results"
NEUMANN_STEPS = 4  # K
UPDATE_INTERVAL = 10  # T
FORWARD_HORIZON = 60  # forward mode's horizon: the default warm-up and timed steps
LEARN = ("lr", "momentum", "weight_decay")
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4
ADAM_LR = 1e-3  # HyperAdam against torch.optim.Adam: lr learned (the default), weight decay 1e-4
BATCH = 128


# -- workloads -------------------------------------------------------------------------------


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


def wide_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 2048),
        nn.ReLU(),
        nn.Linear(2048, 2048),
        nn.ReLU(),
        nn.Linear(2048, 10),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "mlp": (mlp, "MLP 784-256-256-10, ReLU"),
    "cnn": (cnn, "CNN conv16-pool-conv32-pool-fc10 on 1x28x28"),
    # above onepass.LEAN_ELEMENTS: the lean series is the default there (not in the default run)
    "wide_mlp": (wide_mlp, "MLP 784-2048-2048-10, ReLU"),
}


@dataclass
class Workload:
    name: str
    init: dict[str, Tensor]
    make: Callable[[], nn.Module]
    x: Tensor
    y: Tensor
    x_val: Tensor
    y_val: Tensor

    def model(self, device: torch.device) -> nn.Module:
        model = self.make().to(device)
        model.load_state_dict(self.init)
        return model


def workload(name: str, device: torch.device) -> Workload:
    """Random inputs and labels (batch 128, a validation batch of the same size), fixed init."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    make = MODELS[name][0]
    init = {k: v.to(device) for k, v in make().state_dict().items()}

    def batch() -> tuple[Tensor, Tensor]:
        x = torch.randn(BATCH, 1, 28, 28, generator=generator)
        y = torch.randint(0, 10, (BATCH,), generator=generator)
        return x.to(device), y.to(device)

    (x, y), (x_val, y_val) = batch(), batch()
    return Workload(name, init, make, x, y, x_val, y_val)


# -- configurations --------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    method: str | None = None  # None: torch.optim.SGD
    granularity: str = "scalar"
    hvp: str = "auto"
    update_interval: int = UPDATE_INTERVAL
    windows: int | None = None  # method="forward": values per name over FORWARD_HORIZON steps
    family: str = "sgd"  # "sgd": HyperSGD against torch.optim.SGD; "adam": HyperAdam, Adam
    learn: tuple[str, ...] | None = None  # HyperSGD: None for LEARN
    batch_fraction: float = 1.0  # hvp_batch_fraction
    # the lean series that models from onepass.LEAN_ELEMENTS weights take, forced on this model
    lean: bool = False

    @property
    def neumann_steps(self) -> int:
        return NEUMANN_STEPS if self.method == "ift" else 0

    @property
    def torch_closure(self) -> bool:
        """torch's closure (zero_grad, loss, backward) unless autograd products need the graph."""
        return self.hvp not in ("autograd", "autograd_batched")

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        if self.family == "adam":
            if self.method is None:
                return torch.optim.Adam(model.parameters(), lr=ADAM_LR, weight_decay=WEIGHT_DECAY)
            return HyperAdam(
                model.parameters(),
                lr=ADAM_LR,
                weight_decay=WEIGHT_DECAY,
                method=self.method,
                update_interval=self.update_interval,
                hvp=self.hvp,
                granularity=self.granularity,
                neumann_steps=self.neumann_steps,
            )
        if self.method is None:
            return torch.optim.SGD(
                model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
            )
        extra: dict[str, Any] = (
            {"horizon": FORWARD_HORIZON, "windows": self.windows}
            if self.method == "forward"
            else {"granularity": self.granularity, "neumann_steps": self.neumann_steps}
        )
        if self.batch_fraction != 1.0:
            extra["hvp_batch_fraction"] = self.batch_fraction
        return HyperSGD(
            model.parameters(),
            lr=LR,
            momentum=MOMENTUM,
            weight_decay=WEIGHT_DECAY,
            learn=LEARN if self.learn is None else self.learn,
            method=self.method,
            update_interval=self.update_interval,
            hvp=self.hvp,
            **extra,
        )

    def floor(self, c: dict[str, float]) -> float | None:
        """1 + (1 + c·K)/T forward-backward passes per step, relative to torch.optim.SGD."""
        if self.method is None:
            return 1.0
        if self.update_interval > 10**6:
            return 1.0
        if self.method == "forward":
            # the gradient keeps its graph, one product per active column (unbatched), and a
            # validation forward-backward every T steps
            product = c["autograd"] if self.hvp == "autograd_batched" else c[self.hvp]
            return c["graph_factor"] + product * c["forward_active"] + 1 / self.update_interval
        k, t, f = self.neumann_steps, self.update_interval, self.batch_fraction
        cost = c[self.hvp] if k else 0.0
        # on a part of the batch, forward differences also evaluate its gradient at the point
        at_point = f if f < 1 and k and self.hvp == "forward_difference" else 0.0
        return 1 + (1 + cost * k * f + at_point) / t


BASELINE = Variant("torch.optim.SGD")
VARIANTS = [
    BASELINE,
    # HyperSGD's plain step with no hyper-step inside the timed window: its fixed cost per step.
    Variant("HyperSGD, no hyper-step", "greedy", update_interval=10**9),
    Variant("greedy, scalar", "greedy"),
    Variant("greedy, scalar, lr only", "greedy", learn=("lr",)),
    Variant("greedy, element", "greedy", granularity="element"),
    *(
        Variant(f"ift, {g}, {h}", "ift", granularity=g, hvp=h)
        for g in ("scalar", "element")
        for h in ("autograd", "finite_difference", "forward_difference")
    ),
    # the lean series of models from 4M weights, forced here
    Variant("ift, scalar, finite_difference, lean", "ift", hvp="finite_difference", lean=True),
    # the series' products on a quarter of the batch (hvp_batch_fraction)
    *(
        Variant(f"ift, scalar, {h}, 1/4 batch", "ift", hvp=h, batch_fraction=0.25)
        for h in ("finite_difference", "forward_difference")
    ),
    # forward mode, online: 3 names x 5 windows = 15 tangent columns over a horizon of 60
    # steps (warm-up + timed), exact products by double backward, column by column or batched
    Variant("forward, scalar, 5 windows", "forward", hvp="autograd", windows=5),
    Variant("forward, scalar, 5 windows, batched", "forward", hvp="autograd_batched", windows=5),
    # HyperAdam against torch.optim.Adam, learning the lr (its default)
    ADAM_BASELINE := Variant("torch.optim.Adam", family="adam"),
    Variant("Adam: greedy, scalar", "greedy", family="adam"),
    Variant("Adam: greedy, element", "greedy", granularity="element", family="adam"),
    *(
        Variant(f"Adam: ift, scalar, {h}", "ift", hvp=h, family="adam")
        for h in ("autograd", "finite_difference", "forward_difference")
    ),
    Variant(
        "Adam: ift, scalar, finite_difference, lean",
        "ift",
        hvp="finite_difference",
        family="adam",
        lean=True,
    ),
    Variant(
        "Adam: ift, element, finite_difference",
        "ift",
        granularity="element",
        hvp="finite_difference",
        family="adam",
    ),
]


def baseline(variant: Variant) -> Variant:
    """The torch optimizer a configuration is measured against."""
    return ADAM_BASELINE if variant.family == "adam" else BASELINE


# -- one run ---------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stepper(
    variant: Variant, work: Workload, model: nn.Module, opt: torch.optim.Optimizer
) -> Callable[[], None]:
    """One training step of ``variant`` on the workload's batch."""
    x, y = work.x, work.y

    def closure(batch_fraction: float = 1.0) -> Tensor:
        n = math.ceil(batch_fraction * len(x))  # hvp_batch_fraction: the batch's first part
        loss = cross_entropy(model(x[:n]), y[:n])
        if variant.torch_closure:
            opt.zero_grad()
            loss.backward()
        return loss

    def val_closure() -> Tensor:
        return cross_entropy(model(work.x_val), work.y_val)

    def step() -> None:
        if variant.method is None:
            opt.step(closure)
        elif variant.lean:
            with lean_series():
                opt.step(closure, val_closure=val_closure)
        else:
            opt.step(closure, val_closure=val_closure)

    return step


@contextlib.contextmanager
def lean_series() -> Iterator[None]:
    """The memory-lean hyper-step of large models (the series reduced term by term, products
    in pieces), whatever the model's size."""
    saved = onepass.LEAN_ELEMENTS
    onepass.LEAN_ELEMENTS = 0
    try:
        yield
    finally:
        onepass.LEAN_ELEMENTS = saved


def hyper_step_bytes(variant: Variant, work: Workload, device: torch.device) -> int | None:
    """The peak of live tensor memory during one hyper-step, above what was live before it:
    on CPU from the allocator's events (``torch.profiler`` with ``profile_memory``), on CUDA
    ``max_memory_allocated``.  Exact and deterministic, unlike the resident set: what the
    step itself holds at once, in bytes.  The step measured is the second hyper-step (step
    ``2T``), after as many plain steps; for torch's optimizers, the same step."""
    model = work.model(device)
    opt = variant.build(model)
    step = stepper(variant, work, model, opt)
    for _ in range(2 * UPDATE_INTERVAL - 1):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events: list[tuple[int, int]] = []

    def walk(node: Any) -> None:
        if node.tag == torch._C._profiler._EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():  # type: ignore[union-attr]
        walk(root)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def run(
    variant: Variant,
    work: Workload,
    device: torch.device,
    warmup: int,
    steps: int,
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """Build the optimizer (and the model unless given), take ``warmup`` steps, then time
    ``steps`` steps."""
    model = work.model(device) if model is None else model
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        memory_before = torch.cuda.memory_allocated(device)
    opt = variant.build(model)

    step = stepper(variant, work, model, opt)

    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {"seconds_per_step": seconds / steps}
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device) - memory_before
    if isinstance(opt, HyperOptimizer):
        out["hyper_state"] = opt.hyper_state
    return out


# -- the floor's c for double backward --------------------------------------------------------


class FloorCosts:
    """Times one forward-backward, one forward-backward keeping the graph for double backward,
    and one double-backward product of the same model and batch.

    Each :meth:`round` times ``inner`` calls of each, back to back; the benchmark runs one
    round per repeat, so these timings are interleaved with the optimizer runs like everything
    else, and ``c`` is the median over rounds of the per-round ratio.
    """

    def __init__(self, work: Workload, device: torch.device, inner: int = 5) -> None:
        self.device, self.inner, self.work = device, inner, work
        self.model = work.model(device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.directions = [torch.randn_like(p) for p in self.params]
        self.grads = self.with_graph()
        self.rounds: list[dict[str, float]] = []
        for fn in (self.forward_backward, self.with_graph, self.product):  # warm up
            self.timed(fn)

    def forward_backward(self) -> None:
        for p in self.params:
            p.grad = None
        cross_entropy(self.model(self.work.x), self.work.y).backward()

    def with_graph(self) -> tuple[Tensor, ...]:
        loss = cross_entropy(self.model(self.work.x), self.work.y)
        return torch.autograd.grad(loss, self.params, create_graph=True)

    def product(self) -> None:
        torch.autograd.grad(self.grads, self.params, self.directions, retain_graph=True)

    def timed(self, fn: Callable[[], Any]) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(self.inner):
            fn()
        synchronize(self.device)
        return (time.perf_counter() - start) / self.inner

    def round(self) -> None:
        fb = self.timed(self.forward_backward)
        graph = self.timed(self.with_graph)
        hvp = self.timed(self.product)
        self.rounds.append({"forward_backward_s": fb, "with_graph_s": graph, "hvp_s": hvp})

    def summary(self) -> dict[str, float]:
        def median(f: Callable[[dict[str, float]], float]) -> float:
            return statistics.median(f(r) for r in self.rounds)

        return {
            "forward_backward_s": median(lambda r: r["forward_backward_s"]),
            "forward_backward_with_graph_s": median(lambda r: r["with_graph_s"]),
            "hvp_autograd_s": median(lambda r: r["hvp_s"]),
            "c_autograd": median(lambda r: r["hvp_s"] / r["forward_backward_s"]),
            "graph_factor": median(lambda r: r["with_graph_s"] / r["forward_backward_s"]),
            "rounds": len(self.rounds),
        }


# -- CPU peak memory in a fresh process ------------------------------------------------------


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    if match is None:
        raise OSError(f"no {field} in /proc/self/status")
    return int(match.group(1))


def memory_probe(model_name: str, variant_name: str, warmup: int, steps: int) -> None:
    """(Runs in a subprocess.) Print the peak RSS above the RSS after building model and data."""
    device = torch.device("cpu")
    work = workload(model_name, device)
    variant = next(v for v in VARIANTS if v.name == variant_name)
    # Load torch's lazily initialised code and thread pools (forward, backward, double
    # backward, an optimizer step) on a throwaway copy, then hand the freed heap back to the
    # OS, so the peak below is the run's own memory.
    scratch = FloorCosts(work, device, inner=1)
    scratch.round()
    torch.optim.SGD(scratch.params, lr=LR, momentum=MOMENTUM).step()
    del scratch
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    model = work.model(device)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    run(variant, work, device, warmup, steps, model)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_bytes": (peak - before) * 1024}))


def cpu_memory(
    model_name: str, variant: Variant, warmup: int, steps: int, threads: int
) -> int | None:
    if not Path("/proc/self/clear_refs").exists():
        return None
    command = [sys.executable, __file__, "--memory-probe", model_name, variant.name]
    command += ["--warmup", str(warmup), "--steps", str(steps), "--threads", str(threads)]
    # A fixed mmap threshold turns off glibc's adaptive one, so every large tensor is mapped on
    # allocation and unmapped on free: the resident set then follows live tensor memory instead
    # of what the heap keeps cached.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        print(f"memory probe failed for {model_name} / {variant.name}:\n{done.stderr}")
        return None
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"])


# -- the benchmark ---------------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hyperopt_optim": hyperopt_optim.__version__,
        "device": str(device),
    }
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if match:
            info["cpu_model"] = match.group(1).strip()
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def forward_active(warmup: int, steps: int, windows: int = 5) -> float:
    """The mean number of active tangent columns over the timed steps of the forward variant."""
    values = len(LEARN)
    active = [
        (min(windows - 1, windows * t // FORWARD_HORIZON) + 1) * values
        for t in range(warmup, warmup + steps)
    ]
    return sum(active) / len(active)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    order = random.Random(0)
    results: dict[str, Any] = {
        "machine": machine(device),
        "config": {
            "models": args.models,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "batch": BATCH,
            "neumann_steps": NEUMANN_STEPS,
            "update_interval": UPDATE_INTERVAL,
            "learn": list(LEARN),
            "lr": LR,
            "momentum": MOMENTUM,
            "weight_decay": WEIGHT_DECAY,
            "memory": args.memory,
        },
        "models": {},
    }
    chosen = [v for v in VARIANTS if not args.variants or v.name in args.variants]
    # every configuration with its torch optimizer
    variants = [v for v in VARIANTS if v in chosen or any(baseline(c) is v for c in chosen)]
    for name in args.models:
        work = workload(name, device)
        n_params = sum(p.numel() for p in work.model(device).parameters())
        print(f"\n{name}: {MODELS[name][1]}, {n_params:,} parameters, batch {BATCH}")
        floor_costs = FloorCosts(work, device)
        times: dict[str, list[float]] = {v.name: [] for v in variants}
        ratios: dict[str, list[float]] = {v.name: [] for v in variants}
        peaks: dict[str, list[int]] = {v.name: [] for v in variants}
        states: dict[str, Any] = {}
        for r in range(args.repeats):
            shuffled: list[Variant | None] = [*variants, None]  # None: a round of FloorCosts
            order.shuffle(shuffled)
            here: dict[str, float] = {}
            for variant in shuffled:
                if variant is None:
                    floor_costs.round()
                    continue
                out = run(variant, work, device, args.warmup, args.steps)
                here[variant.name] = out["seconds_per_step"]
                if "peak_bytes" in out:
                    peaks[variant.name].append(out["peak_bytes"])
                if "hyper_state" in out:
                    states[variant.name] = out["hyper_state"]
            for variant in variants:
                times[variant.name].append(here[variant.name])
                ratios[variant.name].append(here[variant.name] / here[baseline(variant).name])
            print(f"  repeat {r + 1}/{args.repeats} done")
        c = floor_costs.summary()
        print(
            f"  one forward-backward {c['forward_backward_s'] * 1e3:.2f} ms; keeping the graph "
            f"x{c['graph_factor']:.2f}; one double-backward product x{c['c_autograd']:.2f} "
            "(c for autograd)"
        )
        costs = {"autograd": c["c_autograd"], "finite_difference": 2.0, "forward_difference": 1.0}
        costs["auto"] = costs["finite_difference"]
        costs["graph_factor"] = c["graph_factor"]
        costs["forward_active"] = forward_active(args.warmup, args.steps)
        if device.type == "cpu" and args.memory:
            for variant in variants:
                peak = cpu_memory(name, variant, args.warmup, args.steps, torch.get_num_threads())
                if peak is not None:
                    peaks[variant.name].append(peak)
        param_bytes = sum(p.numel() * p.element_size() for p in work.model(device).parameters())
        step_bytes = {v.name: hyper_step_bytes(v, work, device) for v in variants}
        rows = []
        for variant in variants:
            held = step_bytes[variant.name]
            held_base = step_bytes[baseline(variant).name]
            base = peaks[baseline(variant).name]
            base_peak = statistics.median(base) if base else None
            peak = statistics.median(peaks[variant.name]) if peaks[variant.name] else None
            floor = variant.floor(costs)
            ratio = statistics.median(ratios[variant.name])
            rows.append(
                {
                    "variant": variant.name,
                    "against": baseline(variant).name,
                    **{k: v for k, v in asdict(variant).items() if k != "name"},
                    "neumann_steps": variant.neumann_steps,
                    "closure": "torch (backward inside)" if variant.torch_closure else "loss only",
                    "seconds_per_step_median": statistics.median(times[variant.name]),
                    "seconds_per_step": times[variant.name],
                    "time_ratio_median": ratio,
                    "time_ratio_min": min(ratios[variant.name]),
                    "time_ratio_max": max(ratios[variant.name]),
                    "floor": floor,
                    "ratio_over_floor": None if floor is None else ratio / floor,
                    "peak_bytes": peak,
                    "memory_ratio": None if peak is None or not base_peak else peak / base_peak,
                    "hyper_step_bytes": held,
                    "hyper_step_copies": None if held is None else held / param_bytes,
                    "copies_beyond_torch": None
                    if held is None or held_base is None
                    else (held - held_base) / param_bytes,
                    "hyper_state_after_last_run": states.get(variant.name),
                }
            )
        results["models"][name] = {
            "description": MODELS[name][1],
            "parameters": n_params,
            "floor_costs": c,
            "rows": rows,
        }
    return results


# -- reporting -------------------------------------------------------------------------------


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def _x(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    m, cfg = results["machine"], results["config"]
    memory = (
        "`torch.cuda.max_memory_allocated` above the memory allocated before the optimizer "
        "was built"
        if m["device"].startswith("cuda")
        else "peak RSS (VmHWM) of a fresh process running that configuration alone, above its "
        "RSS once model and data exist and torch is warmed up (glibc mmap threshold fixed at "
        "64 KiB so freed tensors leave the RSS); one probe per configuration"
    )
    lines = [
        f"# HyperSGD and HyperAdam overhead against torch.optim.SGD and Adam ({m['device']})",
        "",
        f"- date: {m['date']}",
        f"- machine: {m.get('cpu_model', m['processor'])} (platform.processor(): "
        f"`{m['processor']}`), os.cpu_count() = {m['cpu_count']}, torch threads = "
        f"{m['torch_threads']}" + (f", GPU: {m['gpu']}" if "gpu" in m else ""),
        f"- software: {m['platform']}, Python {m['python']}, torch {m['torch']}, "
        f"hyperopt_optim {m['hyperopt_optim']}",
        f"- load average (1, 5, 15 min) at start: {m.get('load_average_at_start', 'n/a')}, "
        f"at end: {m.get('load_average_at_end', 'n/a')}",
        *([f"- note: {m['note']}"] if m.get("note") else []),
        f"- protocol: batch {cfg['batch']}, {cfg['warmup']} warm-up steps then {cfg['steps']} "
        f"timed steps per run; {cfg['repeats']} repeats, every configuration once per repeat "
        "in a shuffled order; time ratio = median over repeats of (time / the torch "
        "optimizer's time in the same repeat: SGD for HyperSGD, Adam for the rows marked "
        "Adam), [min-max] over repeats",
        f"- HyperSGD: learn {', '.join(cfg['learn'])} from lr={cfg['lr']}, "
        f"momentum={cfg['momentum']}, weight_decay={cfg['weight_decay']}; ift with "
        f"K={cfg['neumann_steps']}, T={cfg['update_interval']}; greedy T="
        f"{cfg['update_interval']}",
        f"- HyperAdam (rows 'Adam: ...'): learn lr (the default) from lr={ADAM_LR}, "
        f"weight_decay={cfg['weight_decay']}; the same K and T; memory ratio against Adam's",
        f"- peak memory: {memory}",
        "- copies at a hyper-step: the peak of live tensor memory during one hyper-step (the "
        "second, step 2T) above what was live before it, in parameter-sized copies (float32 "
        "weights); on CPU from the allocator's events (torch.profiler, profile_memory), on "
        "CUDA max_memory_allocated; deterministic. 'beyond torch's step': that minus the same "
        "figure for the torch optimizer's step (SGD or Adam): what the hyper-step holds that "
        "torch.optim's step does not",
        "- '1/4 batch': hvp_batch_fraction=0.25, the series' products on the batch's first "
        "quarter; floor 1 + (1 + c·K/4 (+ 1/4 for forward differences' gradient at the "
        "point))/T",
        "- floor: 1 + (1 + c·K)/T forward-backward passes per step; c = 1 (forward "
        "differences), 2 (central), measured for autograd (below); greedy: 1 + 1/T; forward "
        "mode: (keeping the graph) + c·(mean active tangent columns) + 1/T, products counted "
        "one by one (the batched product can beat it)",
    ]
    for name, block in results["models"].items():
        c = block["floor_costs"]
        lines += [
            "",
            f"## {name}: {block['description']} ({block['parameters']:,} parameters)",
            "",
            f"One forward-backward: {c['forward_backward_s'] * 1e3:.2f} ms. Keeping the graph "
            f"for double backward: x{c['graph_factor']:.2f}. One double-backward product: "
            f"x{c['c_autograd']:.2f} a forward-backward, so c(autograd) = {c['c_autograd']:.2f}.",
            "",
            "| configuration | hvp | closure | ms / step | time ratio [min-max] | floor "
            "| ratio / floor | peak MB | memory ratio | copies at a hyper-step "
            "| beyond torch's step |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in block["rows"]:
            hvp = row["hvp"] if row["method"] in ("ift", "forward") else "-"
            lines.append(
                f"| {row['variant']} | {hvp} | {row['closure']} "
                f"| {row['seconds_per_step_median'] * 1e3:.2f} "
                f"| {row['time_ratio_median']:.2f} [{row['time_ratio_min']:.2f}-"
                f"{row['time_ratio_max']:.2f}] | {_x(row['floor'])} "
                f"| {_x(row['ratio_over_floor'])} | {_mb(row['peak_bytes'])} "
                f"| {_x(row['memory_ratio'])} | {_x(row.get('hyper_step_copies'), 1)} "
                f"| {_x(row.get('copies_beyond_torch'), 1)} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=UPDATE_INTERVAL, help="untimed steps")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats")
    parser.add_argument(
        "--models", nargs="+", choices=sorted(MODELS), default=None, help="default: mlp cnn"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke configuration (< 30 s)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip memory")
    parser.add_argument("--note", default="", help="a remark on the machine, for the report")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=[v.name for v in VARIANTS if v is not BASELINE],
        default=None,
        help="only these configurations (and torch.optim.SGD); default: all",
    )
    parser.add_argument("--tag", default="", help="a suffix for the output files' names")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--memory-probe", nargs=2, metavar=("MODEL", "VARIANT"), help="internal")
    args = parser.parse_args()

    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(*args.memory_probe, args.warmup, args.steps)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    if args.quick:
        args.steps = args.steps or 20
        args.repeats = args.repeats or 3
        args.models = args.models or ["mlp"]
        args.memory = False
    args.steps = args.steps or 50
    args.repeats = args.repeats or 5
    args.models = args.models or ["mlp", "cnn"]
    if args.steps % UPDATE_INTERVAL or args.warmup % UPDATE_INTERVAL:
        parser.error(
            f"--steps and --warmup must be multiples of T={UPDATE_INTERVAL}, so the timed "
            "window holds whole hyper-intervals"
        )
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    begin = time.perf_counter()
    results = benchmark(args)
    results["machine"]["note"] = args.note
    results["wall_seconds"] = time.perf_counter() - begin
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    table = markdown(results)
    print("\n" + table)
    device = torch.device(args.device).type
    suffix = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"overhead_{device}{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"overhead_{device}{suffix}.md").write_text(table)
    print(f"wrote {args.out / f'overhead_{device}{suffix}.md'} and .json")
    print(f"total time: {results['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
