"""The Triton kernels compiled ahead of time for A100 (sm_80) and H100/H200 (sm_90), without a GPU.

The launches are recorded from the backend's own launcher (`triton_select.launch`, through which every kernel of
the backend goes) for a matrix of real steps -- dtypes, mixed-precision history, guidance layouts, thresholding
on both selection paths, per-sample rows, a 2^26-element sample, an odd sample size -- without running them. Each
distinct specialization is then compiled by `triton.compile` for both architectures in a separate process (the
kernels here are the interpreter's; `triton_compile_check.py` compiles the JIT ones), with the runtime's own
alignment hints, and its PTX assembled by ptxas. Asserted: it compiles, no register spills, 128-bit global loads
and stores on the aligned paths the kernels' docs claim, and a 2^26-element sample's selection passes launch at
least as many programs as an H100 has multiprocessors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # a compiler process per architecture

from dpm_kernels import layout as L  # noqa: E402
from dpm_kernels.backends import triton_kernels, triton_select  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
H100_SMS = 132
TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
         torch.int64: "*i64"}
VEC = r"\.v(4\.b32|2\.b64|4\.f32|2\.f64)$"


def _arg(v):
    if isinstance(v, torch.Tensor):
        return TYPES[v.dtype], v.data_ptr() % 16 == 0
    assert isinstance(v, int) and not isinstance(v, bool), type(v)
    return ("i32" if -(2**31) <= v < 2**31 else "i64"), v % 16 == 0


CASES = {
    # name: (shape, x dtype, history dtype, options)
    "f32-plain": ((1, 4, 64, 64), torch.float32, None, dict(hist=1)),
    "f32-thr-per-sample": ((2, 4, 64, 64), torch.float32, None, dict(hist=1, thr=True, per_sample=True)),
    "f32-thr-2^26-sample": ((1, 1 << 26), torch.float32, None, dict(hist=1, thr=True)),
    "bf16-f32hist-everything": ((2, 4, 32, 32), torch.bfloat16, torch.float32,
                                dict(hist=2, thr=True, cfg=L.CFG_STACKED, noise=True, x_eval=True, per_sample=True)),
    "f16-own-history-pair": ((2, 4, 32, 32), torch.float16, None, dict(hist=1, cfg=L.CFG_PAIR)),
    "bf16-f32hist-stacked3-hist3": ((2, 4, 32, 32), torch.bfloat16, torch.float32,
                                    dict(hist=3, thr=True, cfg=L.CFG_STACKED3, noise=True, x_eval=True,
                                         per_sample=True)),
    "f32-stacked3-hist3-huge-path": ((1, 1 << 18), torch.float32, None, dict(hist=3, thr=True, cfg=L.CFG_STACKED3)),
    "f64-thr": ((2, 4, 32, 32), torch.float64, None, dict(hist=2, thr=True)),
    "f64-thr-huge-path": ((2, 1 << 18), torch.float64, None, dict(hist=1, thr=True)),
    "f32-odd-sample": ((2, 1003), torch.float32, None, dict(hist=1, thr=True, per_sample=True)),
}
UNALIGNED = {"f32-odd-sample"}  # n % 16 != 0 per sample: scalar accesses by design (triton_kernels' doc)


def _record_case(shape, dtype, hdt, o, launches):
    e = lambda dt=dtype: torch.empty(shape, dtype=dt)  # noqa: E731  never read: the launches are not run
    hdt = hdt or dtype
    b = shape[0]
    mo = torch.empty((L.CFG_ROWS[o.get("cfg", L.CFG_NONE)] * b, *shape[1:]), dtype=dtype)
    coef = torch.zeros((b, L.NCOEF) if o.get("per_sample") else (L.NCOEF,), dtype=torch.float64)
    hist = [e(hdt) for _ in range(o.get("hist", 0))] + [None, None, None]
    triton_kernels.fused_step(e(), mo, e() if o.get("cfg") == L.CFG_PAIR else None, e() if o.get("x_eval") else None,
                              *hist[:3], e() if o.get("noise") else None, coef, o.get("cfg", L.CFG_NONE),
                              bool(o.get("thr")), 0.995, 1.0, 2.0, e(), e(hdt))


@pytest.fixture(scope="module")
def launches():
    recorded = []

    def record(kernel, grid, *args, **meta):
        warps = meta.pop("num_warps")
        recorded.append({"kernel": getattr(kernel, "fn", kernel).__name__, "grid": list(grid),
                         "args": [_arg(a) for a in args], "meta": meta, "num_warps": warps})

    mp = pytest.MonkeyPatch()
    mp.setattr(triton_select, "launch", record)
    try:
        out = {}
        for name, (shape, dtype, hdt, o) in CASES.items():
            start = len(recorded)
            _record_case(shape, dtype, hdt, o, recorded)
            out[name] = recorded[start:]
    finally:
        mp.undo()
    return out


@pytest.fixture(scope="module", params=["80", "90"])
def compiled(request, launches, tmp_path_factory):
    arch = request.param
    specs = {}
    for case, ls in launches.items():
        for i, spec in enumerate(ls):
            key = json.dumps({k: spec[k] for k in ("kernel", "args", "meta", "num_warps")}, sort_keys=True)
            specs.setdefault(key, dict(spec, cases=[]))["cases"].append(f"{case}#{i}")
    d = tmp_path_factory.mktemp(f"triton_sm{arch}")
    (d / "specs.json").write_text(json.dumps({k: {kk: v[kk] for kk in ("kernel", "args", "meta", "num_warps")}
                                              for k, v in specs.items()}))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what Triton 3.9 does by default, without its warning
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_compile_check.py"), str(d / "specs.json"),
                          arch, str(d / "out.json")], capture_output=True, text=True, env=env, timeout=900,
                         cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((d / "out.json").read_text())
    return arch, {k: (specs[k], results[k]) for k in specs}


def test_every_launch_compiles_without_spills(compiled):
    arch, results = compiled
    assert len(results) >= 10  # the matrix reaches every kernel in several specializations
    assert {s["kernel"] for s, _ in results.values()} == {"_step_kernel", "_select_small", "_hist_pass", "_finalize"}
    for spec, r in results.values():
        assert r["ok"], (arch, spec["cases"], r["ptxas"])
        assert r["regs"] is not None and r["spill_stores"] == 0 and r["spill_loads"] == 0, (arch, spec["cases"], r)


def test_aligned_paths_use_128_bit_global_accesses(compiled):
    import re

    arch, results = compiled
    for spec, r in results.values():
        if spec["kernel"] == "_finalize" or all(c.split("#")[0] in UNALIGNED for c in spec["cases"]):
            continue
        loads = [a for a in r["accesses"] if a.startswith("ld.") and re.search(VEC, a)]
        assert loads, (arch, spec["cases"], r["accesses"])
        if spec["kernel"] == "_step_kernel":
            stores = [a for a in r["accesses"] if a.startswith("st.") and re.search(VEC, a)]
            assert stores, (arch, spec["cases"], r["accesses"])


def test_a_huge_sample_fills_the_gpu(launches):
    passes = [ls for ls in launches["f32-thr-2^26-sample"] if ls["kernel"] == "_hist_pass"]
    assert len(passes) == 4  # float32 keys: 4 digits of 8 bits
    assert all(p["grid"][0] >= H100_SMS for p in passes), [p["grid"] for p in passes]
    step = [ls for ls in launches["f32-thr-2^26-sample"] if ls["kernel"] == "_step_kernel"]
    assert step and step[0]["grid"][0] >= H100_SMS
