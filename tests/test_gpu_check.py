"""benchmarks/gpu_check.sh, the one-call GPU verification, dry-run on the CPU so that it cannot rot where no GPU is
lent: the same pipeline (build, one pytest process per test file, op benchmark, host-cost benchmark, profile) with
tiny sizes and collect-only tests. It must leave at most the 8 files the device tool returns, and report a failing,
erroring or crashing test file as such in its summary (and in its exit status)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
pytestmark = pytest.mark.slow


def _dry_run(out: Path, files: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["GPU_CHECK_TEST_FILES"] = " ".join(files)
    env["PYTHON"] = sys.executable  # this interpreter, whatever `python3` is on the PATH
    return subprocess.run([str(SCRIPT), str(out), "--dry-run"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)


def test_dry_run_produces_every_output_and_reports_broken_test_files(tmp_path):
    """One dry run over two real test files (a GPU file run whole; another with -k "cuda or gpu", which selects
    nothing on a CPU) and two broken ones: everything is produced, and the broken ones fail the check."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "test_raises.py").write_text("raise RuntimeError('broken at import')\n")
    (src / "test_aborts.py").write_text("import os\nos.abort()\n")
    out = tmp_path / "out"
    res = _dry_run(out, ["tests/test_cuda_backend.py", "tests/test_registry.py", str(src / "test_raises.py"),
                         str(src / "test_aborts.py")])
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= 8 and all(p.is_file() for p in out.iterdir()), names
    assert {"summary.md", "logs.tar.gz", "profile.txt"} <= set(names)
    assert any(n.startswith("fused_step-") and n.endswith(".csv") for n in names)
    assert any(n.startswith("overhead-") and n.endswith(".md") for n in names)
    summary = (out / "summary.md").read_text()
    for section in ("## build", "## tests", "## op benchmark", "## host cost per step", "## profile", "status: 1"):
        assert section in summary, section
    assert "| test_cuda_backend.py | 0 | " in summary and " tests collected" in summary
    assert "| test_registry.py | 5 | no tests collected" in summary
    assert "| test_raises.py | 2 | ERROR (pytest rc 2)" in summary
    assert "| test_aborts.py | 134 | CRASHED (rc 134)" in summary
    assert "first-use" in summary and "fused-scheduler" in summary and "| float32 | 2^10 |" in summary
    with tarfile.open(out / "logs.tar.gz") as tar:
        members = set(tar.getnames())
    assert {"tests/test_cuda_backend.log", "tests/test_aborts.log", "bench.log", "overhead.log"} <= members
    assert res.stdout.rstrip().endswith("status: 1")  # the summary is printed last
