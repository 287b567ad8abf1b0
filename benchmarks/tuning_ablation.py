"""Per-weight learning rates: how far apart may they move? ``SharedAdam``'s ``deviation_lr``.

A companion of ``tuning.py`` (same data, splits, model, seeds, drawn hyperparameters and
batch order): ``ift_wd_elementlr_m`` (K = 4, T = 10, one lr per weight, momentum and weight
decay per group) with ``SharedAdam(lr=0.05, deviation_lr=d)`` for several ``d``, and plain
``Adam(lr=0.05)``. The reference on each seed is the scalar run ``ift_wd_lr_m`` read from
``results/tuning_runs.jsonl`` (run ``tuning.py`` first). Reported per dataset and setting:
the median final test and validation loss, and over seeds the median ratio of the test loss
to the scalar run's and the fraction of seeds on which it is no worse::

    python benchmarks/tuning_ablation.py --workers 2            # 20 seeds, d in 0, 0.002, 0.01
    python benchmarks/tuning_ablation.py --seeds 5 --deviation-lrs 0.01

Writes ``results/tuning_ablation_runs.jsonl`` (one line per run; a rerun resumes),
``results/tuning_ablation.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tuning

from hyperopt_optim import SharedAdam


def run_one(job: tuple[str, int, str, tuning.Config]) -> dict[str, Any]:
    name, seed, setting, config = job
    torch.set_num_threads(1)
    data = tuning.load(name)
    init = tuning.draw_hyperparameters(np.random.default_rng([seed, 0]))
    options = tuning.hyper_options("ift_wd_elementlr_m", config)
    if setting == "adam":
        options["hyper_optimizer"] = lambda ps: torch.optim.Adam(ps, lr=config.hyper_lr)
    else:
        d = float(setting)
        options["hyper_optimizer"] = lambda ps: SharedAdam(ps, lr=config.hyper_lr, deviation_lr=d)
    run = tuning.train_torch_or_hyper(data, seed, init, config, options, False)
    return {
        "dataset": name,
        "seed": seed,
        "setting": setting,
        "test": run.test_loss,
        "val": run.val_loss,
    }


def ratio(loss: float, reference: float) -> float:
    """loss / reference; a loss of exactly 0 (float32 underflow on wine) against 0 is 1."""
    if not math.isfinite(loss):
        return math.inf
    if reference == 0:
        return 1.0 if loss == 0 else math.inf
    return loss / reference


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(tuning.DATASETS))
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--deviation-lrs", nargs="+", default=["0", "0.002", "0.01"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=tuning.RESULTS)
    args = parser.parse_args(argv)
    config = tuning.Config()
    reference: dict[tuple[str, int], dict[str, float]] = {}
    for line in (args.out / "tuning_runs.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["config"] == config.key():
            scalar = r["runs"]["ift_wd_lr_m"]
            reference[(r["dataset"], r["seed"])] = {
                "test": scalar["test_loss"],
                "val": scalar["val_loss"],
            }
    settings = [*args.deviation_lrs, "adam"]
    jobs = [
        (name, seed, setting, config)
        for name in args.datasets
        for seed in range(args.seeds)
        for setting in settings
        if (name, seed) in reference
    ]
    from tqdm import tqdm

    raw = args.out / "tuning_ablation_runs.jsonl"  # resumable: rows already there are kept
    rows = [json.loads(line) for line in raw.read_text().splitlines()] if raw.exists() else []
    done = {(r["dataset"], r["seed"], r["setting"]) for r in rows}
    jobs = [job for job in jobs if job[:3] not in done]
    with raw.open("a") as f:
        if args.workers > 1:
            with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
                for row in tqdm(pool.imap_unordered(run_one, jobs), total=len(jobs)):
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    rows.append(row)
        else:
            for job in tqdm(jobs):
                row = run_one(job)
                f.write(json.dumps(row) + "\n")
                f.flush()
                rows.append(row)
    rows = [r for r in rows if r["dataset"] in args.datasets and r["seed"] < args.seeds]

    summary: dict[str, Any] = {}
    lines = [
        "| dataset | setting | seeds | median test | median validation | median test / scalar "
        "| no worse than scalar |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in args.datasets:
        seeds = sorted({r["seed"] for r in rows if r["dataset"] == name})
        scalar_test = [reference[(name, s)]["test"] for s in seeds]
        scalar_val = [reference[(name, s)]["val"] for s in seeds]
        summary[name] = {
            "scalar": {
                "median_test": statistics.median(scalar_test),
                "median_val": statistics.median(scalar_val),
            }
        }
        lines.append(
            f"| {name} | scalar lr (`ift_wd_lr_m`) | {len(seeds)} | "
            f"{statistics.median(scalar_test):.4g} | {statistics.median(scalar_val):.4g} | 1 | — |"
        )
        for setting in settings:
            got = {r["seed"]: r for r in rows if r["dataset"] == name and r["setting"] == setting}
            tests = [got[s]["test"] for s in seeds]
            vals = [got[s]["val"] for s in seeds]
            ratios = [ratio(got[s]["test"], reference[(name, s)]["test"]) for s in seeds]
            no_worse = sum(
                got[s]["test"] <= reference[(name, s)]["test"] * (1 + 1e-3) for s in seeds
            ) / len(seeds)
            summary[name][setting] = {
                "median_test": tuning.quantile(tests, 0.5),
                "median_val": tuning.quantile(vals, 0.5),
                "median_ratio_to_scalar": tuning.quantile(ratios, 0.5),
                "fraction_no_worse": no_worse,
            }
            label = "Adam" if setting == "adam" else f"SharedAdam, deviation_lr {setting}"
            lines.append(
                f"| {name} | {label} | {len(seeds)} | {tuning.quantile(tests, 0.5):.4g} | "
                f"{tuning.quantile(vals, 0.5):.4g} | {tuning.quantile(ratios, 0.5):.3f} | "
                f"{no_worse:.0%} |"
            )
    (args.out / "tuning_ablation.json").write_text(json.dumps(summary, indent=1) + "\n")
    m = tuning.machine()
    header = (
        f"Per-weight learning rates, ift_wd_elementlr_m, {config.steps} steps; measured on "
        f"{m['cpu']} ({m['cores']} cores), torch {m['torch']}. 'no worse' = test loss at most "
        "0.1% above the scalar run's on the same seed.\n\n"
    )
    (args.out / "tuning_ablation.md").write_text(header + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
