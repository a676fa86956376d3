"""The benchmark scripts run (their --smoke mode: tiny shapes, one trajectory) and report every provider; the
numbers themselves are recorded by running them in full (benchmarks/README.md), never asserted here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torchsde clamps queries at the tree's ends


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_diffusers_step_benchmark_covers_every_drop_in(capsys):
    mod = _load("bench_diffusers_step")
    assert mod.main(["--smoke", "--out", "", "--schedulers", "all", "--orders", "2", "--thresholding", "off"]) == 0
    table = capsys.readouterr().out
    for name in mod.SCHEDULERS:
        row = f"| {name} | 1x4x8x8 | 2 | off |"
        assert f"{row} diffusers |" in table and f"{row} fused-" in table


def test_overhead_benchmark_runs(capsys):
    assert _load("bench_overhead").main(["--smoke", "--out", ""]) == 0
    assert "bare" in capsys.readouterr().out


def test_results_csv_widens_instead_of_misaligning(tmp_path):
    import csv

    import torch

    from dpm_kernels.benchmark import results_csv

    dev = torch.device("cpu")
    p = results_csv([{"a": 1, "b": 2}], tmp_path, "kind", dev)
    assert results_csv([{"a": 3, "b": 4}], tmp_path, "kind", dev) == p
    results_csv([{"a": 5, "c": 6, "b": 7}], tmp_path, "kind", dev)  # a new column, another order
    with p.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "4", "c": ""}, {"a": "5", "b": "7", "c": "6"}]
