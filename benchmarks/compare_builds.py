"""Two builds of hyperopt_optim side by side on the overhead benchmark's workloads.

The package as it is in the work tree ("after") and as it was at a git revision ("before",
unpacked with ``git archive`` into a temporary folder and imported as ``hyperopt_optim_before``)
run the same configurations of ``benchmarks/overhead.py`` (same models, data, steps and
hyperparameters), interleaved in one process: every repeat runs torch.optim.SGD and each
configuration with each build once, in a shuffled order.  Reported per configuration: the median
over repeats of each build's time per step divided by torch.optim.SGD's in the same repeat, and
the median over repeats of after / before.  A refactor that leaves the arithmetic alone should
show after / before ≈ 1 within the noise of the machine (the min–max over repeats says how much).

    python benchmarks/compare_builds.py --before 9b1abf6 --threads 1

Results go to ``benchmarks/results/compare_builds.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead

ROOT = Path(__file__).resolve().parent.parent


def load_before(revision: str, folder: Path) -> Any:
    """The package at ``revision``, imported as ``hyperopt_optim_before``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "hyperopt_optim"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "hyperopt_optim").rename(folder / "hyperopt_optim_before")
    sys.path.insert(0, str(folder))
    return importlib.import_module("hyperopt_optim_before")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the git revision to compare against")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=overhead.MODELS)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=overhead.UPDATE_INTERVAL)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--variants", nargs="*", default=None, help="names (default: all)")
    parser.add_argument("--out", type=Path, default=overhead.RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    after = (overhead.HyperSGD, overhead.HyperAdam)
    with tempfile.TemporaryDirectory() as tmp:
        package = load_before(args.before, Path(tmp))
        builds = {"before": (package.HyperSGD, package.HyperAdam), "after": after}
        # each build's own series module, which overhead.lean_series patches for "lean" rows
        series = {"before": package.hypergradients.onepass, "after": overhead.onepass}
        baselines = {v.name for v in overhead.VARIANTS if v.method is None}
        variants = [
            v
            for v in overhead.VARIANTS
            if v.name not in baselines and (not args.variants or v.name in args.variants)
        ]
        torch_runs = {overhead.baseline(v) for v in variants}
        order = random.Random(0)
        report: dict[str, Any] = {
            "machine": overhead.machine(device),
            "config": {**vars(args), "out": str(args.out), "batch": overhead.BATCH},
            "models": {},
        }
        for name in args.models:
            work = overhead.workload(name, device)
            ratios: dict[str, dict[str, list[float]]] = {
                v.name: {"before": [], "after": [], "after/before": []} for v in variants
            }
            for r in range(args.repeats):
                runs: list[tuple[Any, str | None]] = [(t, None) for t in torch_runs]
                runs += [(v, b) for v in variants for b in builds]
                order.shuffle(runs)
                here: dict[tuple[str, str], float] = {}
                for v, build in runs:
                    overhead.HyperSGD, overhead.HyperAdam = builds[build] if build else after
                    overhead.onepass = series[build or "after"]
                    out = overhead.run(v, work, device, args.warmup, args.steps)
                    here[(v.name, build or "torch")] = out["seconds_per_step"]
                for v in variants:
                    base = here[(overhead.baseline(v).name, "torch")]
                    b, a = here[(v.name, "before")], here[(v.name, "after")]
                    ratios[v.name]["before"].append(b / base)
                    ratios[v.name]["after"].append(a / base)
                    ratios[v.name]["after/before"].append(a / b)
                print(f"{name}: repeat {r + 1}/{args.repeats} done", flush=True)
            report["models"][name] = {
                v: {k: {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
                    for k, xs in d.items()}
                for v, d in ratios.items()
            }  # fmt: skip
        overhead.HyperSGD, overhead.HyperAdam = after
        overhead.onepass = series["after"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare_builds.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "compare_builds.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    m, c = report["machine"], report["config"]
    lines = [
        f"# hyperopt_optim at {c['before']} (before) and the work tree (after), side by side",
        "",
        f"- date: {m['date']}; {m.get('cpu_model', m['processor'])}, os.cpu_count() = "
        f"{m['cpu_count']}, torch threads = {m['torch_threads']}; torch {m['torch']}",
        f"- load average at start: {m.get('load_average_at_start')}",
        f"- protocol: {c['repeats']} repeats; each runs torch.optim.SGD and every configuration "
        f"with each build once, shuffled; {c['warmup']} warm-up and {c['steps']} timed steps "
        f"per run, batch {c['batch']} (the workloads and configurations of overhead.py)",
        "- time ratios: median over repeats [min-max] of time per step / the torch optimizer's "
        "(SGD; Adam for the rows marked Adam) in the same repeat; after/before: median over "
        "repeats of the two builds' ratio",
        "",
    ]
    for name, rows in report["models"].items():
        lines += [
            f"## {name}",
            "",
            "| configuration | before / torch | after / torch | after / before |",
            "|---|---:|---:|---:|",
        ]
        for variant, d in rows.items():
            cells = [
                f"{d[k]['median']:.3f} [{d[k]['min']:.2f}-{d[k]['max']:.2f}]"
                for k in ("before", "after", "after/before")
            ]
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
