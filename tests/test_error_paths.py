"""The C++ op's error paths cannot take the process down: each bad call ends as a Python exception.

On the 2026-11 GPU image the JIT-built extension died (SIGSEGV) whenever an error message formatted a number: C++
messages joined by TORCH_CHECK go through an ostringstream, which that image's toolchain broke. The checks now
format every message themselves (csrc/error_text.h) and hand TORCH_CHECK one C string. Here a child process calls
the compiled op (no Python checks in front) with arguments that fail every kind of check -- integers, doubles,
NaN, shapes, dtype and device names in the message -- catches each, and ends with one uncaught: the parent
asserts the child's exit code is Python's (1, not a signal), its last line is that exception, and every caught
message is exactly the expected text. CPU here; the same test on CUDA is marked gpu (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpm_kernels.backends import registry

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, math, sys
import torch
from dpm_kernels import layout as L
from dpm_kernels.backends import registry

dev = sys.argv[1]
registry.prepare(dev, dev)
op = torch.ops.dpm_kernels.fused_step.default
ARGS = ("x", "model_out", "model_cond", "x_eval", "hist1", "hist2", "hist3", "noise", "coef", "cfg", "threshold",
        "thr_ratio", "thr_min", "thr_max", "out", "hist_out")


def good():
    r = lambda *s: torch.randn(*s, device=dev)
    coef = torch.zeros(L.NCOEF, dtype=torch.float64, device=dev)
    return dict(x=r(2, 8), model_out=r(2, 8), model_cond=None, x_eval=None, hist1=r(2, 8), hist2=None, hist3=None,
                noise=None, coef=coef, cfg=0, threshold=False, thr_ratio=0.5, thr_min=1.0, thr_max=1.0,
                out=r(2, 8), hist_out=r(2, 8))


def nan_coef(a):
    a["coef"][L.C1] = math.nan


CASES = {
    "x-dtype": dict(x=torch.ones(2, 8, dtype=torch.int32, device=dev)),
    "cfg": dict(cfg=7),
    "model_out-shape": dict(model_out=torch.randn(2, 9, device=dev)),
    "stacked3-shape": dict(cfg=L.CFG_STACKED3),
    "hist1-dtype": lambda a: a.update(hist1=a["hist1"].double()),
    "noise-dtype": dict(noise=torch.zeros(2, 8, dtype=torch.float16, device=dev)),
    "hist3-alone": lambda a: a.update(hist3=a["hist1"].clone()),
    "coef-dtype": lambda a: a.update(coef=a["coef"].float()),
    "coef-shape": dict(coef=torch.zeros(3, L.NCOEF, dtype=torch.float64, device=dev)),
    "thr_ratio": dict(threshold=True, thr_ratio=1.5),
    "thr_min": dict(threshold=True, thr_min=-1.0, thr_max=2.5),
    "thr_nan": dict(threshold=True, thr_max=math.nan),
    "hist_out-aliases-hist3": lambda a: a.update(hist2=a["hist1"].clone(), hist3=a["hist_out"]),
    "out-overlaps-model_out": lambda a: a.update(out=a["model_out"]),
}
if dev == "cpu":
    CASES["coef-nan"] = nan_coef  # coefficient values are read on the host only
else:
    CASES["model_out-device"] = dict(model_out=torch.randn(2, 8))
    CASES["coef-device"] = lambda a: a.update(coef=a["coef"].cpu())


def call(which):
    a = good()
    change = CASES[which]
    change(a) if callable(change) else a.update(change)
    op(*[a[k] for k in ARGS])


for which in CASES:
    try:
        call(which)
        print(json.dumps([which, None, "no error"]), flush=True)
    except Exception as e:
        print(json.dumps([which, type(e).__name__, str(e).splitlines()[0]]), flush=True)
call(sys.argv[2])  # the last one uncaught: the process must end with this Python exception
"""

EXPECTED = {
    "x-dtype": ("TypeError", "x: expected float16, bfloat16, float32 or float64, got Int"),
    "cfg": ("ValueError", "cfg: expected 0 (none), 1 (pair), 2 (stacked) or 3 (stacked3), got 7"),
    "model_out-shape": ("ValueError", "model_out: shape [2, 9] does not match the expected [2, 8]"),
    "stacked3-shape": ("ValueError", "model_out: shape [2, 8] does not match the expected [6, 8]"),
    "hist1-dtype": ("TypeError", "hist1: dtype Double: history tensors share one dtype, x's (Float) or float32 when "
                                 "x is float16/bfloat16"),
    "noise-dtype": ("TypeError", "noise: dtype Half does not match x's dtype Float"),
    "hist3-alone": ("ValueError", "hist3: given without hist2 (history entries are newest first)"),
    "coef-dtype": ("TypeError", "coef: expected float64 coefficients, got Float"),
    "coef-shape": ("ValueError", "coef: expected shape (12,) or (2, 12), got [3, 12]"),
    "thr_ratio": ("ValueError", "thr_ratio: the thresholding quantile must lie in [0, 1], got 1.5"),
    "thr_min": ("ValueError", "thr_min: thresholding bounds must be > 0, got (-1, 2.5)"),
    "thr_nan": ("ValueError", "thr_min: thresholding bounds must be > 0, got (1, nan)"),
    "hist_out-aliases-hist3": ("ValueError", "hist_out: overlaps hist3; the history slot written must not be read"),
    "out-overlaps-model_out": ("ValueError", "out: overlaps model_out; out may be x or x_eval itself, nothing else "
                                             "it reads"),
    "coef-nan": ("ValueError", "coef: non-finite coefficient at flat index 7"),
    "model_out-device": ("ValueError", "model_out: on device cpu, but x is on cuda:0"),
    "coef-device": ("ValueError", "coef: on device cpu, but x is on cuda:0"),
}
LAST = "thr_ratio"  # a double in the message: the kind of message that crashed


# Like conftest: a kernel that fails to build fails the test; only an explicit opt-out skips it.
NO_EXT = pytest.mark.skipif(os.environ.get("DPM_KERNELS_NO_EXT") == "1", reason="DPM_KERNELS_NO_EXT=1")
NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = [pytest.param("cpu", marks=NO_EXT), pytest.param("cuda", marks=[NO_EXT, pytest.mark.gpu, NO_GPU])]


@pytest.mark.parametrize("device", DEVICES)
def test_error_paths_end_as_python_exceptions_in_a_child_process(device, tmp_path):
    registry.prepare(device, device)  # built (or loaded) here first: the child only loads it
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TORCH_SHOW_CPP_STACKTRACES"] = "0"
    res = subprocess.run([sys.executable, str(script), device, LAST], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=600)
    assert res.returncode == 1, f"child ended with {res.returncode} (negative: a signal)\n{res.stdout}\n{res.stderr}"
    want_type, want_msg = EXPECTED[LAST]
    last = res.stderr.strip().splitlines()[-1]
    assert last == f"{want_type}: {want_msg}", res.stderr[-3000:]
    got = {which: (kind, msg) for which, kind, msg in map(json.loads, res.stdout.splitlines())}
    elsewhere = {"model_out-device", "coef-device"} if device == "cpu" else {"coef-nan"}
    assert got == {k: v for k, v in EXPECTED.items() if k not in elsewhere}


def test_no_message_reaches_torch_check_in_parts():
    """Every TORCH_CHECK in csrc/ is one of the two wrappers that pass it a single formatted C string; no stream,
    c10::str or AT_ERROR formats a message anywhere in the C++/CUDA sources."""
    found = []
    for f in sorted((ROOT / "csrc").rglob("*")):
        if f.suffix not in (".h", ".cuh", ".cpp", ".cu"):
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("//")[0]
            wrapper = re.match(r"#define DPM_CHECK_(VALUE|TYPE)\(cond, \.\.\.\) TORCH_CHECK_\1\(cond, "
                               r"::dpm_text::Text\(__VA_ARGS__\)\.c_str\(\)\)$", code)
            if wrapper is None and re.search(r"TORCH_CHECK|AT_ERROR|c10::str\(|stringstream|<iostream>|<sstream>|"
                                             r"std::cout|std::cerr", code):
                found.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)


TEXT_CHECK = r"""
#include <stdio.h>
#include <string.h>

#include <cmath>
#include <limits>
#include <string>

#include "error_text.h"

using dpm_text::Dims;
using dpm_text::Text;

int main() {
  const int64_t shape[] = {2, 9, 1};
  const std::string longer(2000, 'x');  // past the buffer: truncated, never overflowed
  printf("%s\n", Text("a ", 7, " b ", int64_t(-3), " c ", size_t(12), " d ", 1.5, " e ", -1.0, " f ", 1e30).c_str());
  printf("%s\n", Text("nan ", std::nan(""), " inf ", std::numeric_limits<double>::infinity(), " small ", 1e-7,
                      " third ", 1.0 / 3.0).c_str());
  printf("%s\n", Text("shape ", Dims{shape, 3}, " empty ", Dims{shape, 0}, " null ", (const char*)nullptr).c_str());
  printf("%s\n", Text("big ", INT64_MAX, " min ", INT64_MIN).c_str());
  printf("%zu\n", strlen(Text(longer.c_str(), " tail ", 5).c_str()));
  printf("%s\n", Text().c_str());
  return 0;
}
"""


def test_error_text_formats_like_torch_and_never_overflows(tmp_path):
    """csrc/error_text.h, torch-free, under AddressSanitizer and UBSan where the compiler has them: integers, doubles
    as an ostream prints them (%g), shapes as torch prints an IntArrayRef, and a message past the buffer cut short."""
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src, exe = tmp_path / "text_check.cpp", tmp_path / "text_check"
    src.write_text(TEXT_CHECK)
    base = [cxx, "-std=c++17", "-O1", "-g", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}", str(src), "-o",
            str(exe)]
    proc = subprocess.run(base + ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"], capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:  # no sanitizer runtime here: the plain build still checks the text
        proc = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines() == [
        "a 7 b -3 c 12 d 1.5 e -1 f 1e+30",
        "nan nan inf inf small 1e-07 third 0.333333",
        "shape [2, 9, 1] empty [] null (null)",
        f"big {2**63 - 1} min {-(2**63)}",
        "511",
        "",
    ]
