"""The command line: demo, sample, bench and info run and say what they did; bad input is one line on stderr with
exit status 2, decided before any work is done; every --help shows the defaults."""

from __future__ import annotations

import csv
import os
import re
import sys

import pytest

from dpm_kernels import benchmark
from dpm_kernels.__main__ import COMMANDS, PROG, main


@pytest.fixture(autouse=True, scope="module")
def _kernels_built():
    """Any one-time build happens here, not inside a command whose stderr a test reads line by line."""
    if os.environ.get("DPM_KERNELS_NO_EXT") != "1":
        from dpm_kernels.backends import registry

        registry.prepare("cpu", "cpu")


def run(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own exits (errors, --help)
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_demo_prints_errors_and_writes_png(tmp_path, capsys):
    png = tmp_path / "demo.png"
    rc, out, _ = run(["demo", "--samples", "200", "--png", str(png), "--no-progress", "--backend", "torch"], capsys)
    assert rc == 0
    head = next(line for line in out.splitlines() if line.startswith("| solver"))
    nfes = [int(c.split()[0]) for c in head.strip("|").split("|")[1:]]
    rows = {line.split("|")[1].strip(): [float(c) for c in line.strip("|").split("|")[1:]]
            for line in out.splitlines() if line.startswith("| DPM") or line.startswith("| DDIM")}
    err = {(name, n): e for name, es in rows.items() for n, e in zip(nfes, es, strict=True)}
    assert len(rows) == 4 and 10 in nfes and 50 in nfes
    # the claims the demo prints: higher order at low NFE beats DDIM at the same and at 2.5x the NFE
    assert err[("DPM-Solver++(3M)", 10)] < err[("DDIM", 10)]
    assert err[("DPM-Solver++(3M)", 20)] < err[("DDIM", 50)]
    for name in rows:  # from 10 NFE on, every solver's error falls with NFE (the table shows no lucky dip)
        es = [err[(name, n)] for n in nfes]
        assert es == sorted(es, reverse=True), (name, es)
    assert png.stat().st_size > 10_000 and f"wrote {png}" in out


def test_sample_reports_what_ran(capsys):
    rc, out, _ = run(["sample", "--order", "3", "--steps", "12", "--samples", "64", "--backend", "torch"], capsys)
    assert rc == 0
    assert "order=3 NFE=12" in out and "backend=torch" in out
    err = float(out.split("exact ODE solution:")[1].split()[0])
    assert err < 0.1


def test_sample_explains_a_changed_nfe_and_eta_zero(capsys):
    rc, out, _ = run(["sample", "--method", "singlestep_fixed", "--order", "3", "--steps", "7", "--samples", "16",
                      "--backend", "torch"], capsys)
    assert rc == 0 and "NFE=6 (singlestep_fixed runs whole blocks: 7 steps // order 3 = 2 block(s)" in out
    rc, out, _ = run(["sample", "--algorithm", "sde-dpmsolver++", "--eta", "0", "--samples", "16", "--backend",
                      "torch"], capsys)
    assert rc == 0 and "eta = 0: the SDE solver is the ODE" in out
    rc, out, _ = run(["sample", "--algorithm", "sde-dpmsolver++", "--samples", "16", "--backend", "torch"], capsys)
    assert rc == 0 and "no exact per-sample endpoint" in out


BAD = {
    "backend-not-here": (["demo", "--backend", "cuda"], "--backend"),
    "steps-zero": (["sample", "--steps", "0"], "--steps"),
    "skip-type": (["sample", "--skip-type", "bogus"], "--skip-type"),
    "png-dir-missing": (["demo", "--png", "missing/dir/x.png"], "--png"),
    "eta-negative": (["sample", "--eta", "-1"], "--eta"),
    "sde-singlestep": (["sample", "--method", "singlestep", "--algorithm", "sde-dpmsolver++"], "--method"),
    "bench-sizes": (["bench", "--sizes", "x"], "--sizes"),
    "bench-dtype": (["bench", "--dtypes", "float8"], "--dtypes"),
    "bench-order": (["bench", "--orders", "4"], "--orders"),
    "eta-with-an-ode-solver": (["sample", "--eta", "0.5"], "--eta"),
    "bench-sizes-range": (["bench", "--sizes", "40"], "--sizes"),
    "unknown-command": (["frobnicate"], "command: invalid choice"),
}


@pytest.mark.parametrize("which", list(BAD))
def test_bad_input_is_one_line_and_status_2(which, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, name = BAD[which]
    if "cuda" in argv and __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present: --backend cuda is no error here")
    rc, out, err = run(argv, capsys)
    assert rc == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and name in err and "Traceback" not in err, err
    assert out == ""  # refused before any work
    # one format for every command, whether argparse or a later check refused: the command, then the option
    prog = PROG + (f" {argv[0]}" if argv[0] in COMMANDS else "")
    assert err.startswith(f"{prog}: error: {name}") and err.endswith(f" (see {prog} --help)\n"), err


def test_demo_without_matplotlib_says_what_to_install(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc, out, err = run(["demo", "--png", str(tmp_path / "x.png")], capsys)
    assert rc == 2 and "dpm_kernels[plot]" in err and out == ""


@pytest.mark.parametrize("cmd", [["demo"], ["sample"], ["bench"], ["info"]])
def test_help_shows_defaults(cmd, capsys):
    rc, out, _ = run(cmd + ["--help"], capsys)
    assert rc == 0
    options = re.findall(r"^  +(--[a-z-]+)", out, re.M)
    assert out.count("(default:") >= len([o for o in options if o != "--help"]), out
    if cmd == ["sample"]:
        assert "uniform_lambda" in out
    if cmd == ["bench"]:
        assert "(default: 14,16,18,20,22,24)" in " ".join(out.split())


def test_bench_writes_csv_and_table(tmp_path, capsys):
    rc, out, _ = run(["bench", "--sizes", "12", "--orders", "2", "--dtypes", "float32", "--providers", "fused,eager",
                      "--out", str(tmp_path), "--min-time", "0.01", "--no-progress"], capsys)
    assert rc == 0
    assert "x floor" in out and "measurements suspect" in out
    files = list(tmp_path.glob("fused_step-*.csv"))
    assert len(files) == 1
    rows = list(csv.DictReader(files[0].open()))
    expect = {"eager"} if os.environ.get("DPM_KERNELS_NO_EXT") == "1" else {"eager", "cpu"}
    assert {r["provider"] for r in rows} >= expect and all(float(r["median_ms"]) > 0 for r in rows)
    assert all(r["torch"] and r["device"] and r["date"] and r["spread"] for r in rows)
    assert all(0 < float(r["floor_q20_ms"]) <= float(r["floor_ms"]) <= float(r["floor_q80_ms"]) and r["run"]
               for r in rows)
    assert rows[0]["device"] == benchmark.device_name(__import__("torch").device("cpu"))
    md = files[0].with_suffix(".md").read_text()
    assert f"device: {rows[0]['device']};" in md and "load average" in md


def test_bench_compares_the_copy_floor_with_earlier_runs_on_the_device(tmp_path, capsys):
    """The wiring of the run-level check: an earlier run on this device recorded 1000x this machine's copy bandwidth,
    so this run is labelled DISTURBED and the reason named, on stdout, stderr and in the table."""
    import torch

    dev = torch.device("cpu")
    fake = {"date": "2026-12-01", "device": benchmark.device_name(dev), "dtype": "float32", "n": 4096, "order": 2,
            "thresholding": 0, "provider": "eager", "copy_GBps": 1e6, "run": "2026-12-01T08:00:00"}
    benchmark.results_csv([fake], tmp_path, "fused_step", dev).rename(
        tmp_path / f"fused_step-{benchmark.device_slug(dev)}-2026-12-01.csv")
    rc, out, err = run(["bench", "--sizes", "12", "--orders", "2", "--dtypes", "float32", "--providers", "eager",
                        "--thresholding", "off", "--out", str(tmp_path), "--min-time", "0.01", "--no-progress"], capsys)
    assert rc == 0
    assert "DISTURBED RUN" in out and "below 1 earlier run(s) on this device (2026-12-01T08:00:00" in out
    assert "DISTURBED RUN" in err
    md = next(p for p in tmp_path.glob("fused_step-*.md"))
    assert md.read_text().startswith("# Fused step benchmark (DISTURBED RUN)")


def test_bench_default_output_leaves_the_working_directory_clean(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rc, out, _ = run(["bench", "--sizes", "10", "--orders", "1", "--dtypes", "float32", "--providers", "eager",
                      "--min-time", "0.01", "--no-progress", "--thresholding", "off"], capsys)
    assert rc == 0
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
    assert list((tmp_path / "cache" / "dpm_kernels" / "benchmarks").glob("fused_step-*.csv"))


def test_noisy_measurements_are_marked_and_a_noisy_run_labelled():
    def row(provider, med, lo, hi, x_floor=1.0):
        return {"dtype": "float32", "n": 1 << 20, "order": 2, "thresholding": 0, "provider": provider,
                "median_ms": med, "floor_ms": 1.0, "x_floor": x_floor,
                "suspect": int(benchmark.is_noisy(med, lo, hi) or x_floor < benchmark.IMPLAUSIBLE_X_FLOOR)}

    quiet = [row("cpu", 1.0, 0.95, 1.05), row("eager", 5.0, 4.9, 5.2)]
    assert "?" not in benchmark.markdown(quiet) and not benchmark.noise_summary(quiet)[0]
    loud = [row("cpu", 1.0, 0.2, 3.0), row("eager", 5.0, 4.9, 5.2)]
    table = benchmark.markdown(loud)
    assert "1.000?" in table and "5.0x?" in table
    noisy, line = benchmark.noise_summary(loud)  # only spreads: noisy, not disturbed
    assert noisy and line.startswith("NOISY RUN") and benchmark.run_label(line) == " (NOISY RUN)"
    assert benchmark.markdown([row("cpu", 0.01, 0.01, 0.011, x_floor=0.01)]).count("?") >= 1  # 100x faster than copy


def test_info_lists_backends_and_says_where_the_kernels_are(capsys):
    rc, out, _ = run(["info"], capsys)
    assert rc == 0
    lines = out.splitlines()
    listed = [i for i, line in enumerate(lines) if re.match(r"^  (cuda|triton|cpu|torch) ", line)]
    assert [lines[i].split()[0] for i in listed] == ["cuda", "triton", "cpu", "torch"]
    # before the backends are checked (which may build the kernels), it says so
    assert any("builds them" in line for line in lines[:listed[0]]), out
    if os.environ.get("DPM_KERNELS_NO_EXT") != "1":  # the CPU kernels: where they were loaded from
        cpu = lines[listed[2]]
        path = re.search(r"available \((.+)\)$", cpu).group(1)
        assert os.path.isfile(path), cpu
    assert re.search(r"CPU kernels are built in (/\S+)", out)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_help_starts_with_what_it_does(cmd, capsys):
    """A subcommand's --help had only its usage and options; its first paragraph now says what it does."""
    rc, out, _ = run([cmd, "--help"], capsys)
    assert rc == 0
    paragraphs = out.split("\n\n")
    assert paragraphs[0].startswith(f"usage: {PROG} {cmd}")
    assert re.match(r"^[A-Z][a-z].{20,}\.$", paragraphs[1].replace("\n", " ")), paragraphs[1]


def test_demo_picture_shows_every_point_and_says_why_few_steps_lose(monkeypatch):
    """The middle panel clipped endpoints at its edge, and the right panel showed DPM-Solver-3 at 6 NFE worse than
    DDIM without a word: every drawn point now lies in view, and the panel says why below 10 NFE."""
    import numpy as np

    from dpm_kernels import demo

    drawn = []
    monkeypatch.setattr(demo, "save_png", lambda path, *args: drawn.append(args))
    results, _ = demo.run_demo(n=300, seed=0, backend="torch", progress=False, png="unused")
    fig = demo.figure(*drawn[0])
    mid = fig.axes[1]
    pts = np.concatenate([np.asarray(c.get_offsets()) for c in mid.collections if len(c.get_offsets()) > 1] +
                         [np.concatenate(c.get_segments()) for c in mid.collections if hasattr(c, "get_segments")])
    (x0, x1), (y0, y1) = mid.get_xlim(), mid.get_ylim()
    assert len(pts) > 100 and ((pts[:, 0] > x0) & (pts[:, 0] < x1) & (pts[:, 1] > y0) & (pts[:, 1] < y1)).all()
    err = {(r.name, r.nfe): r.error for r in results}
    assert err[("DPM-Solver-3 (singlestep)", 6)] > err[("DDIM", 6)]  # what the note explains
    note = " ".join(t.get_text() for t in fig.axes[2].texts)
    assert "below 10 NFE" in note and "DPM-Solver-3 at 6 NFE" in note and "DDIM" in note


def test_a_closed_pipe_ends_a_command_quietly():
    """`python -m dpm_kernels info | head -1` ended with "error: [Errno 32] Broken pipe": a reader that leaves now
    stops the command without a word on stderr."""
    import subprocess

    p = subprocess.Popen([sys.executable, "-m", "dpm_kernels", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().startswith(b"dpm_kernels ")
    p.stdout.close()  # while info is still checking the backends
    err = p.stderr.read()
    p.wait(timeout=300)
    assert b"Broken pipe" not in err and b"Traceback" not in err and b"Exception ignored" not in err, err
