"""The command line: demo, sample, bench and info run and say what they did."""

from __future__ import annotations

import csv
import os

from dpm_kernels.__main__ import main


def test_demo_prints_errors_and_writes_png(tmp_path, capsys):
    png = tmp_path / "demo.png"
    assert main(["demo", "--samples", "200", "--png", str(png), "--no-progress", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| DPM") or line.startswith("| DDIM")]
    errors = {(r.split("|")[1].strip(), int(r.split("|")[2])): float(r.split("|")[3]) for r in rows}
    assert len(errors) == 8
    # the claim the demo prints: higher order at low NFE beats DDIM at the same and at 2.5x the NFE
    assert errors[("DPM-Solver++(3M)", 10)] < errors[("DDIM", 10)]
    assert errors[("DPM-Solver++(3M)", 20)] < errors[("DDIM", 50)]
    assert png.stat().st_size > 10_000


def test_sample_reports_what_ran(capsys):
    assert main(["sample", "--order", "3", "--steps", "12", "--samples", "64", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "order=3 NFE=12" in out and "backend=torch" in out
    err = float(out.split("exact ODE solution:")[1].split()[0])
    assert err < 0.1


def test_bench_writes_csv_and_table(tmp_path, capsys):
    assert main(["bench", "--sizes", "12", "--orders", "2", "--dtypes", "float32", "--providers", "fused,eager",
                 "--out", str(tmp_path), "--min-time", "0.01", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "x floor" in out
    files = list(tmp_path.glob("fused_step-*.csv"))
    assert len(files) == 1
    rows = list(csv.DictReader(files[0].open()))
    expect = {"eager"} if os.environ.get("DPM_KERNELS_NO_EXT") == "1" else {"eager", "cpu"}
    assert {r["provider"] for r in rows} >= expect and all(float(r["median_ms"]) > 0 for r in rows)
    assert all(r["torch"] and r["device"] and r["date"] for r in rows)


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "cpu", "cuda", "triton"):
        assert name in out
