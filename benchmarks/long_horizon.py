"""Long horizons: forward-mode schedules against one-pass, greedy and random search.

The reproduction harness (:mod:`tuning`) runs 2,000 steps; here every run is ``--steps``
(default 10,000) minibatch steps of SGD on digits (scikit-learn's bundled copy: 1,078
training, 360 validation and 360 test images), the same 50-unit MLP, batches of 64, and every
method starts from the same hyperparameters (``START``).  Per seed, in one process, side by
side:

``fixed``
    ``torch.optim.SGD`` at the start values: the cost unit.
``greedy``, ``ift``
    HyperSGD's one-pass methods (``K = 0`` and ``K = 4``, ``T = 10``), learning lr, momentum
    and weight decay during the one run, as in the reproduction harness.
``forward_online``
    ``method="forward"``, ``mode="online"``: one run, ``--windows`` values per hyperparameter,
    the current window's value stepped every 10 steps with Adam(0.05), tangents carried on.
``forward_episodic``
    ``mode="episodic"``, the paper's protocol: ``--episodes`` reruns of the whole horizon from
    the same initial weights and batch order, the schedule stepped at each episode's end with
    the paper's sign steps (``SignStep(lr=--outer-lr)``, halved on each sign flip), and
    HyperSGD's default backtracking (an episode that ends worse than the best goes back to
    the best schedule with halved steps; ``--no-backtrack``: the paper's steps regardless).
    The reported result is the last episode's run.
``random_search``
    black-box search at equal compute: as many full ``fixed`` trainings, with values drawn
    from the reproduction harness's ranges, as fit in ``forward_episodic``'s wall time; the
    best final validation loss wins.  Every trial's time and losses are kept, to say how long
    random search takes to match forward mode.

Timings are ratios to ``fixed`` measured in the same process.  Results:
``results/long_horizon_runs.jsonl`` (one record per seed, resumable),
``results/long_horizon.json`` (summary), ``results/long_horizon.md`` (tables) and
``results/long_horizon_schedules.png`` (the learned schedules).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tuning

RESULTS = tuning.RESULTS
METHODS = ("fixed", "greedy", "ift", "forward_online", "forward_episodic", "random_search")
START = {"lr": 0.003, "momentum": 0.5, "weight_decay": 1e-4}
LEARNED = ("lr", "momentum", "weight_decay")


@dataclass(frozen=True)
class Setup:
    steps: int = 10_000
    windows: int = 5
    episodes: int = 10
    outer_lr: float = 0.5
    backtrack: bool = True
    batch_size: int = 64
    update_interval: int = 10
    neumann_steps: int = 4
    record_every: int = 100

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class Result:
    val_loss: float
    test_loss: float
    seconds: float
    final: dict[str, float]
    trajectory: dict[str, list[float]] = field(default_factory=dict)
    episodes: list[dict[str, Any]] = field(default_factory=list)
    trials: list[dict[str, float]] = field(default_factory=list)


def _values(opt: torch.optim.Optimizer) -> dict[str, float]:
    group = opt.param_groups[0]
    return {name: float(group[name]) for name in LEARNED}


def train(
    data: tuning.Data,
    seed: int,
    setup: Setup,
    init: dict[str, float],
    options: dict[str, Any] | None,
    *,
    episodes: int = 1,
    record: bool = True,
) -> Result:
    """One run (or ``episodes`` reruns from the same start) of ``setup.steps`` steps.

    ``options=None`` is torch's SGD; otherwise HyperSGD(**options).  Forward mode gets a
    closure that leaves ``backward()`` to the optimizer, so its tangents take exact
    Hessian-vector products by one batched double backward (``hvp="autograd_batched"``); the
    one-pass methods get torch's ordinary closure, as in the reproduction harness.
    """
    model = tuning.make_model(data, seed)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fn = tuning.loss_fn(data)
    forward = options is not None and options.get("method") == "forward"
    opt = tuning.make_optimizer(model, data, init, options)
    trajectory: dict[str, list[float]] = {name: [] for name in ("step", *LEARNED)}
    history: list[dict[str, Any]] = []
    start = time.perf_counter()
    for episode in range(episodes):
        if episode:
            model.load_state_dict(initial)
        used = opt.schedules()[0] if forward and episodes > 1 else None  # type: ignore[attr-defined]
        order = tuning.batches(len(data.x_train), setup.batch_size, seed)
        for t in range(setup.steps):
            index = next(order)
            x, y = data.x_train[index], data.y_train[index]
            if forward:  # the loss only: the optimizer differentiates it (exact products)

                def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                    return fn(model(x), y)

                opt.step(closure)
            else:
                opt.step(tuning.torch_closure(opt, model, fn, x, y))
            last = episode == episodes - 1
            if record and last and (t + 1) % setup.record_every == 0:
                trajectory["step"].append(t + 1)
                for name, value in _values(opt).items():
                    trajectory[name].append(value)
        if episodes > 1:
            val, test = tuning.evaluate(model, data)
            assert used is not None
            history.append(
                {
                    "episode": episode,
                    "val_loss": val,
                    "test_loss": test,
                    "seconds": time.perf_counter() - start,
                    "schedule": {k: [float(x) for x in v] for k, v in used.items()},  # type: ignore[union-attr]
                }
            )
    seconds = time.perf_counter() - start
    val, test = tuning.evaluate(model, data)
    return Result(val, test, seconds, _values(opt), trajectory if record else {}, history)


def random_search(data: tuning.Data, seed: int, setup: Setup, budget: float, base: float) -> Result:
    """Full fixed-value trainings drawn from the harness's ranges until ``budget`` seconds
    (at least one); the best validation loss wins."""
    rng = np.random.default_rng([seed, 2])
    trials: list[dict[str, float]] = []
    best: Result | None = None
    start = time.perf_counter()
    count = max(1, round(budget / base))
    for _ in range(count):
        init = tuning.draw_hyperparameters(rng)
        run = train(data, seed, setup, init, None, record=False)
        trials.append(
            {"seconds": time.perf_counter() - start, "val_loss": run.val_loss,
             "test_loss": run.test_loss, **init}
        )  # fmt: skip
        if best is None or (math.isfinite(run.val_loss) and run.val_loss < best.val_loss):
            best = run
    assert best is not None
    return Result(
        best.val_loss, best.test_loss, time.perf_counter() - start, best.final, {}, [], trials
    )


def options_for(method: str, setup: Setup) -> dict[str, Any]:
    from hyperopt_optim import SignStep

    if method in ("greedy", "ift"):
        return {
            "learn": LEARNED,
            "method": method,
            "update_interval": setup.update_interval,
            **({"neumann_steps": setup.neumann_steps, "hvp": "forward_difference"}
               if method == "ift" else {}),
        }  # fmt: skip
    common = {
        "learn": LEARNED,
        "method": "forward",
        "horizon": setup.steps,
        "windows": setup.windows,
        # on this 50-unit MLP one batched backward for all columns is 2.6x faster than a loop
        "hvp": "autograd_batched",
    }
    if method == "forward_online":
        return {**common, "mode": "online", "update_interval": setup.update_interval}
    outer = setup.outer_lr
    return {
        **common,
        "mode": "episodic",
        "hyper_optimizer": lambda params: SignStep(params, lr=outer),
        "backtrack": setup.backtrack,
    }


def run_seed(job: tuple[int, Setup, tuple[str, ...]]) -> dict[str, Any]:
    seed, setup, methods = job
    torch.set_num_threads(1)
    data = tuning.load("digits")
    warm = Setup(steps=20, windows=2, episodes=1)
    train(data, 0, warm, START, options_for("forward_online", warm), record=False)
    results: dict[str, Result] = {}
    for method in METHODS:
        if method not in methods and not (method == "fixed" and "random_search" in methods):
            continue
        if method == "fixed":
            results[method] = train(data, seed, setup, START, None)
        elif method == "random_search":
            budget = results["forward_episodic"].seconds
            results[method] = random_search(data, seed, setup, budget, results["fixed"].seconds)
        else:
            episodes = setup.episodes if method == "forward_episodic" else 1
            results[method] = train(
                data, seed, setup, START, options_for(method, setup), episodes=episodes
            )
    return {
        "seed": seed,
        "setup": setup.key(),
        "runs": {m: asdict(r) for m, r in results.items()},
    }


# -- summary ---------------------------------------------------------------------------------


def best_episode(record: dict[str, Any]) -> dict[str, Any]:
    """Episodic forward mode's result: the episode with the lowest final validation loss,
    selected by validation as random search selects its best trial (the last episode may be
    one that backtracking rejected)."""
    episodes = record["runs"]["forward_episodic"]["episodes"]
    return min(episodes, key=lambda e: e["val_loss"] if math.isfinite(e["val_loss"]) else math.inf)


def _first_time(pairs: list[tuple[float, float]], target: float) -> float | None:
    """The first cumulative time at which the running best loss is at or below ``target``."""
    best = math.inf
    for seconds, loss in pairs:
        best = min(best, loss if math.isfinite(loss) else math.inf)
        if best <= target:
            return seconds
    return None


def search_race(record: dict[str, Any]) -> dict[str, float | None]:
    """Episodic forward mode against random search, each by its running best validation
    loss over its own cumulative time (same process, same budget).

    ``speedup``: the time random search took to reach its best over the time forward mode
    took to reach that loss (``None`` if forward mode never did). ``search_to_match``: the
    time random search took to reach forward mode's best, over forward mode's time to reach
    it (``None`` if random search never did within the budget).
    """
    runs = record["runs"]
    episodes = [(e["seconds"], e["val_loss"]) for e in runs["forward_episodic"]["episodes"]]
    trials = [(t["seconds"], t["val_loss"]) for t in runs["random_search"]["trials"]]
    search_best = min(v for _, v in trials if math.isfinite(v))
    forward_best = best_episode(record)["val_loss"]
    search_time = _first_time(trials, search_best)
    forward_time = _first_time(episodes, search_best)
    forward_own = _first_time(episodes, forward_best)
    search_match = _first_time(trials, forward_best)
    assert search_time is not None and forward_own is not None
    return {
        "speedup": None if forward_time is None else search_time / forward_time,
        "search_to_match": None if search_match is None else search_match / forward_own,
    }


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    methods = [m for m in METHODS if all(m in r["runs"] for r in records)]
    out: dict[str, Any] = {"seeds": len(records), "methods": {}}
    for m in methods:
        chosen = [best_episode(r) if m == "forward_episodic" else r["runs"][m] for r in records]
        tests = [c["test_loss"] for c in chosen]
        vals = [c["val_loss"] for c in chosen]
        ratios = [r["runs"][m]["seconds"] / r["runs"]["fixed"]["seconds"] for r in records]
        out["methods"][m] = {
            "test_median": statistics.median(tests),
            "val_median": statistics.median(vals),
            "test": tests,
            "time_ratio_median": statistics.median(ratios),
        }
        if m == "forward_episodic":
            per_episode = [
                r["runs"][m]["seconds"] / len(r["runs"][m]["episodes"])
                / r["runs"]["fixed"]["seconds"]
                for r in records
            ]  # fmt: skip
            out["methods"][m]["episode_ratio_median"] = statistics.median(per_episode)
            out["methods"][m]["best_episode"] = [best_episode(r)["episode"] for r in records]
            out["methods"][m]["last_episode_test"] = [r["runs"][m]["test_loss"] for r in records]
        if m == "random_search":
            out["methods"][m]["trials_median"] = statistics.median(
                len(r["runs"][m]["trials"]) for r in records
            )
    if "random_search" in methods and "forward_episodic" in methods:
        out["race"] = [search_race(r) for r in records]
    if "random_search" in methods and "forward_online" in methods:
        prefix = [search_prefix(r, "forward_online") for r in records]
        out["random_search_at_online_budget"] = {
            "trials": [p["trials"] for p in prefix],
            "test_median": statistics.median(p["test_loss"] for p in prefix),
            "val_median": statistics.median(p["val_loss"] for p in prefix),
        }
    if "forward_episodic" in methods:
        curves = [r["runs"]["forward_episodic"]["episodes"] for r in records]
        out["episodes"] = [
            {
                "episode": e,
                "test_median": statistics.median(c[e]["test_loss"] for c in curves),
                "val_median": statistics.median(c[e]["val_loss"] for c in curves),
            }
            for e in range(min(len(c) for c in curves))
        ]
    return out


def search_prefix(record: dict[str, Any], method: str) -> dict[str, float]:
    """Random search cut at ``method``'s compute: the best of the first
    ``round(time(method) / time(fixed))`` trials (at least one)."""
    runs = record["runs"]
    count = max(1, round(runs[method]["seconds"] / runs["fixed"]["seconds"]))
    trials = runs["random_search"]["trials"][:count]
    best = min(trials, key=lambda t: t["val_loss"] if math.isfinite(t["val_loss"]) else math.inf)
    return {"trials": len(trials), "test_loss": best["test_loss"], "val_loss": best["val_loss"]}


def table(summary: dict[str, Any]) -> str:
    lines = [
        "| method | median test loss | median val loss | wall time / fixed |",
        "|---|---:|---:|---:|",
    ]
    for m, s in summary["methods"].items():
        label = f"{m} (best episode by val)" if m == "forward_episodic" else m
        lines.append(
            f"| {label} | {s['test_median']:.4g} | {s['val_median']:.4g} | "
            f"{s['time_ratio_median']:.2f}x |"
        )
    return "\n".join(lines)


def _ratio(x: float | None) -> str:
    return "never" if x is None else f"{x:.2f}x"


def plot(records: list[dict[str, Any]], out: Path) -> None:
    import matplotlib.pyplot as plt

    record = records[0]
    runs = record["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, name in zip(axes, LEARNED, strict=True):
        for m, style in (("greedy", ":"), ("ift", "--"), ("forward_online", "-")):
            if m in runs and runs[m]["trajectory"]:
                traj = runs[m]["trajectory"]
                ax.plot(traj["step"], traj[name], style, label=m)
        if "forward_episodic" in runs:
            episodes = runs["forward_episodic"]["episodes"]
            horizon = runs["forward_episodic"]["trajectory"]["step"][-1]
            best = best_episode(record)["episode"]
            for e in episodes:
                sched = e["schedule"][name]
                edges = np.linspace(0, horizon, len(sched) + 1)
                if e["episode"] == best:
                    ax.stairs(
                        sched, edges, baseline=None, color="black", linewidth=2.5,
                        label=f"forward_episodic (best: episode {best})",
                    )  # fmt: skip
                else:
                    ax.stairs(
                        sched, edges, baseline=None, color="tab:purple", alpha=0.25,
                        label="forward_episodic (other episodes)" if e["episode"] == 0 else None,
                    )  # fmt: skip
        ax.set_title(name)
        ax.set_xlabel("step")
        if name != "momentum":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"digits, seed {record['seed']}: learned values over a 10,000-step run (episodic: the "
        "schedule each episode used)"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=Setup.steps)
    parser.add_argument("--windows", type=int, default=Setup.windows)
    parser.add_argument("--episodes", type=int, default=Setup.episodes)
    parser.add_argument("--outer-lr", type=float, default=Setup.outer_lr)
    parser.add_argument(
        "--no-backtrack",
        action="store_true",
        help="episodic: the paper's sign steps whatever the episode's loss (outputs named "
        "long_horizon_no_backtrack.*)",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true", help="1 seed, 60 steps, 2 episodes")
    args = parser.parse_args(argv)
    setup = Setup(args.steps, args.windows, args.episodes, args.outer_lr, not args.no_backtrack)
    if args.smoke:
        setup = Setup(steps=60, windows=3, episodes=2, record_every=10)
        args.seeds = 1
    name = "long_horizon" if setup.backtrack else "long_horizon_no_backtrack"
    if "random_search" in args.methods and "forward_episodic" not in args.methods:
        parser.error("random_search's budget is forward_episodic's time: run both")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "long_horizon_runs.jsonl"
    done: dict[int, dict[str, Any]] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if record["setup"] == setup.key():
                done[record["seed"]] = record
    methods = tuple(args.methods)
    jobs = [(s, setup, methods) for s in range(args.seeds) if s not in done]
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for record in pool.imap_unordered(run_seed, jobs):
            with log.open("a") as f:
                f.write(json.dumps(record) + "\n")
            done[record["seed"]] = record
            print(f"seed {record['seed']} done", flush=True)
    records = [done[s] for s in sorted(done) if s < args.seeds]
    summary = summarise(records)
    summary["setup"] = asdict(setup)
    summary["start"] = START
    summary["machine"] = tuning.machine()
    summary["summarised_at"] = started  # when this summary was written (the runs: the records)
    (args.out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = f"# Long horizons: digits, {setup.steps} steps, {len(records)} seeds"
    if not setup.backtrack:
        title += " (episodic without backtracking: the paper's steps)"
    md = [title, "", table(summary)]
    if "episodes" in summary:
        md += ["", "| episode | median test loss | median val loss |", "|---:|---:|---:|"]
        md += [
            f"| {e['episode']} | {e['test_median']:.4g} | {e['val_median']:.4g} |"
            for e in summary["episodes"]
        ]
    if "random_search_at_online_budget" in summary:
        online = summary["random_search_at_online_budget"]
        md += [
            "",
            f"random search at forward_online's compute ({online['trials']} trials): median "
            f"test {online['test_median']:.4g}, val {online['val_median']:.4g}",
        ]
    if "race" in summary:
        md += ["", "| seed | forward_episodic speed-up over random search | random search time to "
               "match forward_episodic |", "|---:|---:|---:|"]  # fmt: skip
        for r, race in zip(records, summary["race"], strict=True):
            md.append(
                f"| {r['seed']} | {_ratio(race['speedup'])} | {_ratio(race['search_to_match'])} |"
            )
    (args.out / f"{name}.md").write_text("\n".join(md) + "\n")
    plot(records, args.out / f"{name}_schedules.png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
