"""The demo and the overhead benchmark run end to end (tiny configurations), so they never rot.

Timings are never asserted: only that each script finishes and writes what it promises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def test_digits_demo_runs(tmp_path: Path) -> None:
    for module in ("sklearn", "matplotlib", "tqdm"):
        pytest.importorskip(module)
    figure = tmp_path / "figure.png"
    done = _run(
        [str(ROOT / "examples" / "digits_demo.py"), "--steps", "30", "--out", str(figure)], tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "HyperSGD" in done.stdout
    assert "torch.optim.SGD" in done.stdout
    assert figure.stat().st_size > 10_000


def test_overhead_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = _run(
        [str(ROOT / "benchmarks" / "overhead.py"), "--quick", "--no-memory", "--out", str(out)],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "overhead_cpu_quick.json").read_text())
    assert report["models"], "the benchmark measured no model"
    table = (out / "overhead_cpu_quick.md").read_text()
    assert "torch.optim.SGD" in table
    assert "ift" in table
