"""The CUDA kernels compile cleanly for A100 (sm_80) and H100/H200 (sm_90) without a GPU or CUDA PyTorch.

- Every ``.cu`` in csrc/cuda is compiled with ``nvcc -c -Xptxas -v`` for both architectures, once with the
  macros torch's extension builds add (``__CUDA_NO_HALF_CONVERSIONS__`` and friends) and once plain; any
  error, any warning (nvcc, ptxas or host compiler) or any register spill reported by ptxas fails.
- The C ABI header is valid C (the binding is the only file that sees torch).
- The radix-select state machine shared by the selection kernels (csrc/cuda/radix_select.cuh, written
  ``__host__ __device__``) is replayed on the host pass by pass against a sort, bit for bit: ties, zeros,
  subnormals, +-inf, NaN (ordered above +inf), n = 1, ratios 0 and 1, and one sample past 2^24 elements.

Skipped only where nvcc (resp. a C/C++ compiler) is absent. Kernel behaviour on a GPU: test_fused_step.py
and test_cuda_backend.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # nvcc runs
ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CU_FILES = sorted((CSRC / "cuda").glob("*.cu"))
ARCHS = ("80", "90")
# What torch.utils.cpp_extension passes to nvcc: the kernels must not rely on implicit half conversions.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME)")

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return names
    proc = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = proc.stdout.splitlines()
    return out if proc.returncode == 0 and len(out) == len(names) else names


def ptxas_report(output: str) -> list[dict]:
    """[{kernel, arch, regs, stack, spill_stores, spill_loads}] from `-Xptxas -v` output."""
    rows: list[dict] = []
    cur: dict | None = None
    for line in output.splitlines():
        if m := _ENTRY.search(line):
            cur = {"kernel": m.group(1), "arch": m.group(2)}
            rows.append(cur)
        elif cur is not None and (m := _SPILL.search(line)):
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif cur is not None and (m := _REGS.search(line)):
            cur["regs"] = int(m.group(1))
    return rows


def obj_path(out_dir: Path, src: Path, arch: str, torch_defines: bool) -> Path:
    return out_dir / f"{src.stem}_sm{arch}_{int(torch_defines)}.o"


def compile_cu(src: Path, arch: str, torch_defines: bool, out_dir: Path) -> tuple[int, str]:
    cmd = [NVCC, "-c", str(src), "-o", str(obj_path(out_dir, src, arch, torch_defines)),
           "-std=c++17", "-O3", "-fmad=false", f"-I{CSRC}", "-Xptxas", "-v", "-Werror", "all-warnings",
           "-Xcompiler=-Wall,-Wextra", "-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    if torch_defines:
        cmd += TORCH_NVCC_DEFINES
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def cu_builds(tmp_path_factory):
    """Every .cu for every arch, with and without torch's defines: one nvcc process each, two at a time."""
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    jobs = [(src, arch, flavour) for src in CU_FILES for arch in ARCHS for flavour in (True, False)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: compile_cu(*job, out_dir), jobs))
    return out_dir, dict(zip(jobs, results, strict=True))


@needs_nvcc
@pytest.mark.parametrize("src", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cu_compiles_without_warnings_or_spills(src, cu_builds):
    for (s, arch, torch_defines), (rc, out) in cu_builds[1].items():
        if s != src:
            continue
        what = f"{src.name} sm_{arch}{' (torch defines)' if torch_defines else ''}"
        assert rc == 0, f"{what}: nvcc failed\n{out}"
        warnings = [ln for ln in out.splitlines() if re.search(r"warning", ln, re.IGNORECASE)]
        assert not warnings, f"{what}: warnings\n" + "\n".join(warnings)
        rows = ptxas_report(out)
        assert rows, f"{what}: no kernel reported by ptxas\n{out}"
        for r, name in zip(rows, demangle([r["kernel"] for r in rows]), strict=True):
            name = re.sub(r"dpm_cuda::(\(anonymous namespace\)::)?", "", name).split("(")[0]
            print(f"{what}: {name} regs={r.get('regs')} stack={r.get('stack')} "
                  f"spill={r.get('spill_stores')}/{r.get('spill_loads')}")
            assert r.get("spill_stores") == 0 and r.get("spill_loads") == 0, f"{what}: register spill in {r}"


def find_cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, else the one Triton ships (a minimal nvcc install may lack it)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(bundled) if bundled.is_file() else None
    except ImportError:
        return None


def sass_functions(obj: Path) -> dict[str, str]:
    """Demangled kernel name -> its SASS, from an object file."""
    out = subprocess.run([find_cuobjdump(), "-sass", str(obj)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    parts = re.split(r"\s+Function : (\S+)", out.stdout)
    names, bodies = parts[1::2], parts[2::2]
    return dict(zip(demangle(names), bodies, strict=True))


# Where the sources claim 16-byte accesses (fused_step_kernels.cu, step_device.cuh): every update kernel loads and
# stores 128 bits at a time on its vector path; the selection kernels (threshold_select.cu) load 128 bits at a time.
VECTOR_CLAIMS = {"fused_step_kernels.cu": ("fused_update_kernel", True), "threshold_select.cu": ("select_", False)}


@needs_nvcc
@pytest.mark.skipif(find_cuobjdump() is None, reason="no cuobjdump (CUDA toolkit or Triton)")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src_name", sorted(VECTOR_CLAIMS))
def test_sass_has_the_claimed_128_bit_accesses(src_name, arch, cu_builds):
    prefix, stores = VECTOR_CLAIMS[src_name]
    funcs = sass_functions(obj_path(cu_builds[0], CSRC / "cuda" / src_name, arch, True))
    claimed = {name: body for name, body in funcs.items() if prefix in name and "finalize" not in name}
    assert len(claimed) >= 4, list(funcs)
    for name, body in claimed.items():
        assert "LDG.E.128" in body, f"sm_{arch} {name}: no 128-bit global load"
        if stores:
            assert "STG.E.128" in body, f"sm_{arch} {name}: no 128-bit global store"


ABI_CHECK = r"""
/* The C ABI from plain C: workspace sizes, and arguments refused before anything is enqueued. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "cuda/fused_step_kernels.cuh"

static int fails = 0;
#define EXPECT(c) do { if (!(c)) { printf("FAIL line %d: %s\n", __LINE__, #c); ++fails; } } while (0)

int main(void) {
  static char ws_buf[1024] __attribute__((aligned(16)));
  DpmStepArgs a;
  int devices = 0;
  /* scratch depends on shapes only: B values when small; + per pass and sample 32 B state, 2 x 2048 counts */
  EXPECT(dpm_cuda_fused_step_workspace_bytes(1, 65536, DPM_F32, 0) == 0);
  EXPECT(dpm_cuda_fused_step_workspace_bytes(1, 65536, DPM_F32, 1) == 256);
  EXPECT(dpm_cuda_fused_step_workspace_bytes(64, 262144, DPM_F32, 1) == 512);
  EXPECT(dpm_cuda_fused_step_workspace_bytes(2, 262144, DPM_F16, 1) == 256 + 256 + 6 * 2 * 2048 * 8);
  EXPECT(dpm_cuda_fused_step_workspace_bytes(1, 262144, DPM_F64, 1) == 256 + 256 + 6 * 2 * 2048 * 8);
  EXPECT(dpm_cuda_fused_step_workspace_bytes(0, 5, DPM_F32, 1) == 0);

  EXPECT(dpm_cuda_fused_step(NULL, NULL, 0, 1, 0) == cudaErrorInvalidValue);
  memset(&a, 0, sizeof a);
  a.dtype = DPM_F32; a.hist_dtype = DPM_F32; a.batch = 2; a.numel = 8;
  a.x = a.model_out = (const void*)0x1000; a.out = (void*)0x2000; a.coef = (const double*)0x3000;
  a.dtype = 7; EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 1, 0) == cudaErrorInvalidValue); a.dtype = DPM_F32;
  /* history: x's dtype, or float32 for float16/bfloat16 samples; nothing else */
  a.hist_dtype = DPM_F16; EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 1, 0) == cudaErrorInvalidValue);
  a.hist_dtype = DPM_F64; EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 1, 0) == cudaErrorInvalidValue);
  a.hist_dtype = -1; EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 1, 0) == cudaErrorInvalidValue);
  a.dtype = DPM_F64; a.hist_dtype = DPM_F32; EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 1, 0) == cudaErrorInvalidValue);
  a.dtype = DPM_F16; a.hist_dtype = DPM_BF16; EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 1, 0) == cudaErrorInvalidValue);
  a.dtype = DPM_BF16; a.hist_dtype = DPM_F64; EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 1, 0) == cudaErrorInvalidValue);
  a.dtype = DPM_F32; a.hist_dtype = DPM_F32;
  a.numel = -1; EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 1, 0) == cudaErrorInvalidValue); a.numel = 8;
  a.cfg = 4; EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 1, 0) == cudaErrorInvalidValue);
  a.cfg = -1; EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 1, 0) == cudaErrorInvalidValue);
  a.cfg = 1; EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 1, 0) == cudaErrorInvalidValue); a.cfg = 0;
  a.hist2 = a.x; EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 1, 0) == cudaErrorInvalidValue); a.hist2 = NULL;
  a.hist1 = a.hist2 = NULL; a.hist3 = a.x;  /* hist3 without hist2 */
  EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 1, 0) == cudaErrorInvalidValue);
  a.hist1 = a.x; EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 1, 0) == cudaErrorInvalidValue);
  a.hist1 = NULL; a.hist3 = NULL;
  a.out = NULL; EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 1, 0) == cudaErrorInvalidValue); a.out = (void*)0x2000;
  a.threshold = 1; a.thr_ratio = 0.5; a.thr_min = 1.0; a.thr_max = INFINITY;
  EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 1, 0) == cudaErrorInvalidValue);          /* no workspace */
  EXPECT(dpm_cuda_fused_step(&a, ws_buf, 8, 1, 0) == cudaErrorInvalidValue);        /* too small */
  EXPECT(dpm_cuda_fused_step(&a, ws_buf + 8, 512, 1, 0) == cudaErrorInvalidValue);  /* misaligned */
  a.thr_ratio = 1.5; EXPECT(dpm_cuda_fused_step(&a, ws_buf, 1024, 1, 0) == cudaErrorInvalidValue);
  a.thr_ratio = 0.5; a.thr_min = nan("");
  EXPECT(dpm_cuda_fused_step(&a, ws_buf, 1024, 1, 0) == cudaErrorInvalidValue);
  a.thr_min = 1.0;
  a.batch = 0; EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 1, 0) == cudaSuccess);  /* nothing to do */
  a.batch = 2;
  /* valid arguments on a machine without a device: the runtime's error, never success, never a crash */
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    a.threshold = 0;
    EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 0, 0) != cudaSuccess);
    EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 132, 0) != cudaSuccess);
    /* mixed precision passes validation (float16/bfloat16 samples, float32 history): the runtime's error */
    a.hist1 = (const void*)0x4000; a.hist_out = (void*)0x5000; a.hist_dtype = DPM_F32;
    a.dtype = DPM_F16; EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 132, 0) != cudaSuccess);
    EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 132, 0) != cudaErrorInvalidValue);
    a.dtype = DPM_BF16; EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 132, 0) != cudaErrorInvalidValue);
    a.dtype = DPM_F16; a.hist_dtype = DPM_F16;
    EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 132, 0) != cudaErrorInvalidValue);
    /* three history entries and the stacked3 layout pass validation too */
    a.hist2 = a.hist3 = (const void*)0x6000; a.cfg = 3;
    EXPECT(dpm_cuda_fused_step(&a, NULL, 0, 132, 0) != cudaErrorInvalidValue);
    a.cfg = 0;
  }
  printf("%s: %d failures\n", fails ? "FAIL" : "OK", fails);
  return fails ? 1 : 0;
}
"""


@needs_nvcc
def test_c_abi_from_plain_c(tmp_path, cu_builds):
    """The header is C; a C program links the sm_90 objects and calls the launcher (no GPU needed)."""
    src, obj, exe = tmp_path / "abi_check.c", tmp_path / "abi_check.o", tmp_path / "abi_check"
    src.write_text(ABI_CHECK)
    # nvcc hands a .c file to the host C compiler, with the CUDA include directory on the path.
    proc = subprocess.run([NVCC, "-c", str(src), "-o", str(obj), f"-I{CSRC}",
                           "-Xcompiler=-std=c99,-Wall,-Wextra,-Werror"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    objs = [str(obj_path(cu_builds[0], s, "90", True)) for s in CU_FILES]
    proc = subprocess.run([NVCC, str(obj), *objs, "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr


HOST_CHECK = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include "cuda/radix_select.cuh"

using namespace dpm_cuda;

template <typename T>
using KeyOf = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;

// The kernels' passes, serially: histogram the slots, then advance both targets from that histogram.
template <typename T>
T radix_scale(const std::vector<T>& y, double ratio, double lo, double hi) {
  using K = KeyOf<T>;
  const int64_t n = static_cast<int64_t>(y.size());
  const dpm::QuantileRank q = dpm::quantile_rank(n, ratio);
  SelectState st = select_init(q.k, q.k + 1 < n ? q.k + 1 : n - 1);
  std::vector<uint64_t> hist(2 * kBins);
  for (int pass = 0; pass < Digits<K>::kPasses; ++pass) {
    std::fill(hist.begin(), hist.end(), 0);
    const bool div = select_diverged(st);
    const DigitPos pos = digit_pos<K>(pass);
    for (T v : y) {
      const int s = select_slot<K>(st, div, pos, dpm::abs_key(v));
      if (s >= 0) ++hist[s];
    }
    SelectState next = st;
    for (int t = 0; t < 2; ++t) {
      const uint64_t* h = hist.data() + ((t == 1 && div) ? kBins : 0);
      uint64_t below = 0;
      const int bin = find_bin_serial(h, st.rank[t], below);
      select_advance<K>(next.prefix[t], next.rank[t], pass, bin, below);
    }
    st = next;
  }
  return select_scale<K>(st, q.w, q.w1, lo, hi);
}

// The reference: sort |y| with NaN last (torch.sort), lerp the two order statistics.
template <typename T>
T sorted_scale(const std::vector<T>& y, double ratio, double lo, double hi) {
  std::vector<T> a(y.size());
  for (size_t i = 0; i < y.size(); ++i) a[i] = std::fabs(y[i]);
  std::sort(a.begin(), a.end(), [](T p, T q) { return (!std::isnan(p) && std::isnan(q)) || p < q; });
  const int64_t n = static_cast<int64_t>(a.size());
  const dpm::QuantileRank r = dpm::quantile_rank(n, ratio);
  const T v = dpm::lerp_torch(a[r.k], a[r.k + 1 < n ? r.k + 1 : n - 1], r.w, r.w1);
  return dpm::threshold_scale(v, static_cast<T>(lo), static_cast<T>(hi));
}

template <typename T>
int check(const char* what, const std::vector<T>& y, double ratio, double lo, double hi) {
  const T got = radix_scale(y, ratio, lo, hi), want = sorted_scale(y, ratio, lo, hi);
  if ((std::isnan(got) && std::isnan(want)) || std::memcmp(&got, &want, sizeof(T)) == 0) return 0;
  std::printf("MISMATCH %s T=%s n=%zu ratio=%g lo=%g: radix %.17g sort %.17g\n", what, sizeof(T) == 4 ? "f32" : "f64",
              y.size(), ratio, lo, static_cast<double>(got), static_cast<double>(want));
  return 1;
}

template <typename T>
int run_all(std::mt19937_64& rng) {
  const T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
  std::normal_distribution<double> normal(0.0, 3.0);
  std::uniform_real_distribution<double> expo(-80.0, 80.0);
  int bad = 0;
  for (int64_t n : {1, 2, 3, 10, 1000, 4097, 65543}) {
    for (int kind = 0; kind < 8; ++kind) {
      std::vector<T> y(n);
      for (int64_t i = 0; i < n; ++i) {
        const double g = normal(rng);
        switch (kind) {
          case 0: y[i] = static_cast<T>(g); break;                                      // continuous
          case 1: y[i] = static_cast<T>(std::round(g)); break;                          // ties, +-0
          case 2: y[i] = static_cast<T>(1.5); break;                                    // all equal
          case 3: y[i] = static_cast<T>(i % 3 == 0 ? -0.0 : g * 1e-40); break;           // zeros, subnormals
          case 4: y[i] = static_cast<T>(std::exp(expo(rng)) * (g < 0 ? -1 : 1)); break;  // wide range, inf
          case 5: y[i] = i % 17 == 5 ? nan : static_cast<T>(g); break;                   // NaN above +inf
          case 6: y[i] = i % 13 == 1 ? (g < 0 ? -inf : inf) : static_cast<T>(g); break;
          default: y[i] = static_cast<T>(i % 2 ? g : -g); break;                         // +-v pairs
        }
      }
      for (double r : {0.0, 0.3, 0.5, 0.995, 1.0}) {
        bad += check("case", y, r, 1e-30, static_cast<double>(inf));
        bad += check("clamped", y, r, 1.0, 1.5);
      }
    }
  }
  return bad;
}

int main() {
  std::mt19937_64 rng(1234);
  int bad = run_all<float>(rng) + run_all<double>(rng);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> big((int64_t(1) << 24) + 3);  // past torch.quantile's limit
  for (float& v : big) v = normal(rng);
  bad += check("big", big, 0.995, 1e-30, 1e30) + check("big", big, 0.0, 1e-30, 1e30);
  std::printf("%s: %d mismatches\n", bad ? "FAIL" : "OK", bad);
  return bad ? 1 : 0;
}
"""


def test_radix_select_state_machine_matches_sort(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src, exe = tmp_path / "radix_host_check.cpp", tmp_path / "radix_host_check"
    src.write_text(HOST_CHECK)
    proc = subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}", str(src), "-o",
                           str(exe)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr
