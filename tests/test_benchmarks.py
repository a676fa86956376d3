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


# ---- result files name the machine; a disturbed run says so (fake clocks and rows: no real timing) ----

def test_result_files_name_the_cpu_model_and_cores(tmp_path):
    """Result files said "x86_64 CPU": they name /proc/cpuinfo's model, the logical cores and the threads used."""
    import os

    import torch

    from dpm_kernels import benchmark

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\n")
    assert benchmark.cpu_model(str(info)) == "AMD EPYC 9654 96-Core Processor"
    assert benchmark.cpu_model(str(tmp_path / "missing")) != ""  # platform's guess elsewhere
    name = benchmark.device_name(torch.device("cpu"))
    assert name == f"{benchmark.cpu_model()} ({os.cpu_count()} logical cores), {torch.get_num_threads()} threads"
    if Path("/proc/cpuinfo").exists():
        assert "model name" not in benchmark.cpu_model() and "x86_64 CPU" not in name
    path = benchmark.results_csv([{"a": 1}], tmp_path, "kind", torch.device("cpu"))
    assert path.name.startswith("kind-" + benchmark.device_slug(torch.device("cpu"))) and "--" not in path.name


class FakeClock:
    """Time that passes only when a fake workload says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def work(self, seconds):
        def fn():
            self.now += seconds() if callable(seconds) else seconds
        return fn


def test_providers_are_timed_round_by_round():
    import torch

    from dpm_kernels.benchmark import measure_rounds

    clock, calls = FakeClock(), []
    def workload(name, seconds):
        work = clock.work(seconds)
        return lambda: (calls.append(name), work())

    fns = {k: workload(k, c) for k, c in (("a", 1e-3), ("b", 2e-3), ("c", 3e-3))}
    times = measure_rounds(fns, torch.device("cpu"), min_time=0.01, min_reps=3, clock=clock)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    rounds = [calls[3 + 3 * r:6 + 3 * r] for r in range(3)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]  # interleaved, the order rotating
    assert times["b"] == pytest.approx([2e-3] * len(times["b"])) and len(times["a"]) == len(times["c"]) >= 3


def _fake_run(monkeypatch, slow_after: int | None):
    """`run` on a fake clock: the copy floor takes 1 ms, or 8 ms once the step has run `slow_after` times (another
    process started during the row); the step always 2 ms."""
    import torch

    from dpm_kernels import benchmark

    clock, state = FakeClock(), {"steps": 0}
    copy = clock.work(lambda: 8e-3 if slow_after is not None and state["steps"] > slow_after else 1e-3)
    step = clock.work(2e-3)
    monkeypatch.setattr(benchmark, "copy_case", lambda footprint, dtype, device: (copy, 10**6))
    monkeypatch.setattr(benchmark.StepCase, "eager",
                        lambda self: lambda: (state.update(steps=state["steps"] + 1), step()))
    return benchmark.run([10], [2], ["float32"], [False], ["eager"], torch.device("cpu"), None, progress=False,
                         min_time=0.02, clock=clock)


def test_the_floor_is_timed_with_the_providers_and_a_floor_that_moves_marks_the_row(monkeypatch):
    from dpm_kernels import benchmark

    quiet = _fake_run(monkeypatch, slow_after=None)
    assert [(r["floor_q20_ms"], r["floor_q80_ms"], r["suspect"], r["why"]) for r in quiet] == [
        (pytest.approx(0.02048), pytest.approx(0.02048), 0, "")]
    # 5 tensors of 2^10 float32 elements moved at the fake copy's 1 GB/s (10^6 bytes a millisecond): 0.02048 ms
    assert quiet[0]["median_ms"] == pytest.approx(2.0) and quiet[0]["floor_ms"] == pytest.approx(0.02048)
    # slower from the start of the row on (the warm-up call already): the floor was timed under the same conditions
    # as the step, so the ratio to it holds and nothing moved within the row
    slow = _fake_run(monkeypatch, slow_after=0)
    assert slow[0]["floor_ms"] == pytest.approx(8 * 0.02048) and slow[0]["suspect"] == 0
    loud = _fake_run(monkeypatch, slow_after=4)  # slower from the fourth round on: the floor moved within the row
    assert loud[0]["suspect"] == 1 and "copy floor moved 8.00x during the row" in loud[0]["why"], loud[0]["why"]
    flagged, line = benchmark.noise_summary(loud, cpus=2, threads=2)
    assert flagged and line.startswith("NOISY RUN") and "?" in benchmark.markdown(loud)


def _rows(copy_gbps, load_start=0.5, load_end=1.5, run="2026-12-05T10:00:00"):
    return [{"dtype": "float32", "n": 1 << 22, "order": o, "thresholding": 0, "provider": "cpu", "median_ms": 1.0,
             "floor_ms": 1.0, "x_floor": 1.0, "suspect": 0, "copy_GBps": copy_gbps, "load_start": load_start,
             "load_end": load_end, "run": run, "date": run[:10]} for o in (2, 3)]


def test_a_slow_or_crowded_run_is_labelled_against_the_load_and_the_earlier_runs():
    """Three `bench --quick` runs gave 7.99, 1.14 and 1.15 ms for one step (copy floor 9.99 vs 1.27 ms) and the slow
    one said "0 of 32 measurements suspect": a run slower than the earlier ones on the same device, or begun on a
    machine whose load fills its cores, is labelled DISTURBED with the reason."""
    from dpm_kernels import benchmark

    earlier = _rows(16.0, run="2026-12-01T09:00:00") + _rows(15.0, run="2026-12-03T09:00:00")
    assert benchmark.run_reasons(_rows(15.5), earlier, (0.5, 1.5), 2, 2) == []
    slow = benchmark.run_reasons(_rows(2.0), earlier, (0.5, 1.5), 2, 2)
    assert slow == ["copy bandwidth 7.8x below 2 earlier run(s) on this device (2026-12-01T09:00:00 .. "
                    "2026-12-03T09:00:00): this run was slowed down"]
    assert "above" in benchmark.run_reasons(_rows(150.0), earlier, (0.5, 1.5), 2, 2)[0]
    crowded = benchmark.run_reasons(_rows(15.5), [], (3.9, 4.1), 2, 2)
    assert crowded == ["load average 3.9 on 2 cores when the run began (other processes were running)",
                       "load average 4.1 on 2 cores at the end (more than this run's 2 threads)"]
    disturbed, line = benchmark.noise_summary(_rows(2.0), earlier, cpus=2, threads=2)
    assert disturbed and line.startswith("DISTURBED RUN") and "7.8x below" in line
    assert not benchmark.noise_summary(_rows(15.5), earlier, cpus=2, threads=2)[0]
