// The fused DPM-Solver step on CUDA: one elementwise pass (plus the threshold selection when asked),
// behind the C ABI of fused_step_kernels.cuh. The per-element formulas are dpm_math.h's.
//
// Update kernel: blocks of up to 256 threads walk tiles of blockDim.x * V elements, a tile never
// straddling two samples, so the coefficient row and the threshold scale are per tile (read from
// device memory: one captured graph replays every step with new coefficients). Each thread does one
// group of V elements per tile (V = 16 bytes of the sample's dtype): one 16-byte load per input and
// store per output when every pointer is 16-byte aligned and samples start on vector boundaries, else
// V scalar accesses. float32 history with float16/bfloat16 samples (fused_update_kernel<S, float>): the
// history tensors' 8-element groups are two 16-byte accesses each (step_device.cuh, load_group). Grid:
// the device's resident blocks (occupancy query x SMs), grid-stride over tiles; 64-bit offsets.
//
// Launches per step: this kernel alone; with thresholding the selection of threshold_select.cu first
// (1 launch for small samples, a few for huge ones), all on the caller's stream, no host round trip.
#include <cuda_runtime.h>

#include <type_traits>

#include "step_device.cuh"

namespace dpm_cuda {
namespace {

constexpr int kUpdateThreads = 256;

// acc += w * p[group]: one extra input (history in H, noise in S) live at a time.
template <typename P, typename T, int N>
__device__ __forceinline__ void add_input(T (&acc)[N], const P* p, const T w, int64_t off, int cnt, bool vec) {
  T v[N];
  load_group<P>(p, off, cnt, vec, v);
#pragma unroll
  for (int j = 0; j < N; ++j) acc[j] = dpm::add_term(acc[j], w, v[j]);
}

// S: the samples' storage type; H: the history's (S, or float for __half / __nv_bfloat16 samples). The
// arithmetic type T is the same for both, so m reaches hist_out rounded once, from T, to H.
template <typename S, typename H>
__device__ __forceinline__ void update_group(const Tensors<S>& t, const History<H>& hs, const StepShape& sh,
                                             const dpm::Coef<typename Traits<S>::T>& c, const bool thr,
                                             const typename Traits<S>::T s, int64_t off, int cnt) {
  using T = typename Traits<S>::T;
  constexpr int V = Traits<S>::V;
  static_assert(std::is_same<T, typename Traits<H>::T>::value, "history and samples share the arithmetic type");
  T xe[V], m[V];
  predict_group<S>(t, sh, c, off, cnt, xe, m);
  if (thr) {
#pragma unroll
    for (int j = 0; j < V; ++j) m[j] = dpm::threshold(xe[j], m[j], s, c.qx, c.qm);
  }
  if (hs.hout != nullptr) store_group<H>(hs.hout, off, cnt, sh.vec, m);
  T acc[V];
  if (t.xe != nullptr) {
    load_group<S>(t.x, off, cnt, sh.vec, acc);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = xe[j];  // x_eval is x: already loaded
  }
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = dpm::combine(acc[j], m[j], c.a, c.c0);
  // Same accumulation order as the reference: + c1*h1, + c2*h2, + c3*h3, + cn*z.
  if (hs.h1 != nullptr) add_input<H>(acc, hs.h1, c.c1, off, cnt, sh.vec);
  if (hs.h2 != nullptr) add_input<H>(acc, hs.h2, c.c2, off, cnt, sh.vec);
  if (hs.h3 != nullptr) add_input<H>(acc, hs.h3, c.c3, off, cnt, sh.vec);
  if (t.z != nullptr) add_input<S>(acc, t.z, c.cn, off, cnt, sh.vec);
  store_group<S>(t.out, off, cnt, sh.vec, acc);
}

template <typename S, typename H>
__global__ void __launch_bounds__(kUpdateThreads)
    fused_update_kernel(Tensors<S> t, History<H> hs, StepShape sh, const typename Traits<S>::T* scale) {
  using T = typename Traits<S>::T;
  constexpr int V = Traits<S>::V;
  const int64_t tile = static_cast<int64_t>(blockDim.x) * V;
  const int64_t tiles = (sh.n + tile - 1) / tile;  // per sample
  const int64_t total = sh.batch * tiles;
  const int64_t stride = gridDim.x;
  // (sample, tile) of the current tile, advanced by the grid stride without a division per step.
  const int64_t db = stride / tiles, dr = stride % tiles;
  int64_t b = blockIdx.x / tiles, r = blockIdx.x % tiles;
  int64_t row = -1;
  dpm::Coef<T> c{};
  T s = T(1);
  for (int64_t tix = blockIdx.x; tix < total; tix += stride) {
    if (b != row) {
      row = b;
      c = dpm::load_coef<T>(sh.coef + b * sh.coef_stride);
      if (scale != nullptr) s = scale[b];
    }
    const int64_t i = r * tile + static_cast<int64_t>(threadIdx.x) * V;
    if (i < sh.n) {
      const int cnt = static_cast<int>(sh.n - i < V ? sh.n - i : V);
      update_group<S, H>(t, hs, sh, c, scale != nullptr, s, b * sh.n + i, cnt);
    }
    r += dr;
    b += db;
    if (r >= tiles) {
      r -= tiles;
      ++b;
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// S: the samples' storage type, H: the history's (valid() checked the pair against a.dtype/a.hist_dtype).
template <typename S, typename H>
cudaError_t run(const DpmStepArgs& a, void* workspace, int num_sms, cudaStream_t stream) {
  using T = typename Traits<S>::T;
  constexpr int V = Traits<S>::V;
  Tensors<S> t;
  t.x = static_cast<const S*>(a.x);
  t.mo = static_cast<const S*>(a.model_out);
  t.mc = dpm::cfg_rows(a.cfg) > 1     ? t.mo + a.batch * a.numel
         : a.cfg == dpm::CFG_PAIR ? static_cast<const S*>(a.model_cond)
                                  : nullptr;
  t.mp = a.cfg == dpm::CFG_STACKED3 ? t.mo + 2 * a.batch * a.numel : nullptr;
  t.xe = static_cast<const S*>(a.x_eval);
  t.z = static_cast<const S*>(a.noise);
  t.out = static_cast<S*>(a.out);
  History<H> hs;
  hs.h1 = static_cast<const H*>(a.hist1);
  hs.h2 = static_cast<const H*>(a.hist2);
  hs.h3 = static_cast<const H*>(a.hist3);
  hs.hout = static_cast<H*>(a.hist_out);

  StepShape sh;
  sh.batch = a.batch;
  sh.n = a.numel;
  sh.coef = a.coef;
  sh.coef_stride = a.coef_per_sample ? dpm::NCOEF : 0;
  sh.guided = a.cfg != dpm::CFG_NONE;
  sh.perturbed = a.cfg == dpm::CFG_STACKED3;
  if (!a.threshold && !a.coef_per_sample) {
    sh.n = a.batch * a.numel;  // nothing per sample: one flat run vectorises across sample borders
    sh.batch = 1;
  }
  // Every tensor's own base address is checked, the float32 history's as well as the half samples' (one
  // misaligned tensor sends the whole step to the scalar path): group offsets are multiples of V, which
  // keeps an aligned base aligned for either element size.
  const void* ptrs[] = {t.x, t.mo, t.mc, t.mp, t.xe, t.z, t.out, hs.h1, hs.h2, hs.h3, hs.hout};
  bool ok = sh.n % V == 0 || sh.batch == 1;  // every sample starts on a vector boundary
  for (const void* p : ptrs) ok = ok && aligned16(p);  // nullptr counts as aligned
  sh.vec = ok;

  const T* scale = nullptr;
  if (a.threshold) {
    const dpm::QuantileRank q = dpm::quantile_rank(a.numel, a.thr_ratio);
    SelectArgs sa;
    sa.k0 = static_cast<uint64_t>(q.k);
    sa.k1 = static_cast<uint64_t>(q.k + 1 < a.numel ? q.k + 1 : a.numel - 1);
    sa.w = q.w;
    sa.w1 = q.w1;
    sa.lo = a.thr_min;
    sa.hi = a.thr_max;
    const cudaError_t e = launch_select<S>(t, sh, sa, workspace, num_sms, stream, &scale);
    if (e != cudaSuccess) return e;
  }

  // Block size: 256 threads, less when that would leave SMs idle (aim at >= 2 blocks per SM, e.g. for a
  // 1x4x128x128 latent) or tiles mostly empty (tiny samples); a multiple of 32 in [32, 256].
  const int64_t groups = (sh.n + V - 1) / V;  // per sample
  int64_t threads = (sh.batch * groups + 2 * num_sms - 1) / (2 * static_cast<int64_t>(num_sms));
  if (threads > groups) threads = groups;
  threads = (threads + 31) / 32 * 32;
  threads = threads < 32 ? 32 : threads > kUpdateThreads ? kUpdateThreads : threads;
  int per_sm = 1;
  cudaError_t e = resident_blocks(fused_update_kernel<S, H>, static_cast<int>(threads), &per_sm);
  if (e != cudaSuccess) return e;
  const int64_t tiles = sh.batch * ((sh.n + threads * V - 1) / (threads * V));
  int64_t grid = static_cast<int64_t>(num_sms) * per_sm;
  if (grid > tiles) grid = tiles;
  if (grid > 0x7fffffff) grid = 0x7fffffff;
  fused_update_kernel<S, H>
      <<<static_cast<unsigned>(grid), static_cast<unsigned>(threads), 0, stream>>>(t, hs, sh, scale);
  return cudaGetLastError();
}

// The history's dtype: the samples', or float32 for float16/bfloat16 samples.
bool valid_hist_dtype(int dtype, int hist_dtype) {
  return hist_dtype == dtype || (hist_dtype == DPM_F32 && (dtype == DPM_F16 || dtype == DPM_BF16));
}

bool valid(const DpmStepArgs* a) {
  if (a == nullptr || a->dtype < DPM_F16 || a->dtype > DPM_F64 || a->batch < 0 || a->numel < 0) return false;
  if (!valid_hist_dtype(a->dtype, a->hist_dtype)) return false;
  if (a->numel > 0 && a->batch > (INT64_MAX / 4) / a->numel) return false;  // 3B*n and offsets fit
  if (a->x == nullptr || a->model_out == nullptr || a->out == nullptr || a->coef == nullptr) return false;
  if (!dpm::valid_cfg(a->cfg)) return false;
  if (a->cfg == dpm::CFG_PAIR && a->model_cond == nullptr) return false;
  if (a->hist2 != nullptr && a->hist1 == nullptr) return false;
  if (a->hist3 != nullptr && a->hist2 == nullptr) return false;
  if (a->threshold) {
    if (!(a->thr_ratio >= 0.0 && a->thr_ratio <= 1.0)) return false;
    if (!(a->thr_min > 0.0) || !(a->thr_max > 0.0)) return false;  // also refuses NaN
  }
  return true;
}

}  // namespace
}  // namespace dpm_cuda

extern "C" size_t dpm_cuda_fused_step_workspace_bytes(int64_t batch, int64_t numel, int dtype, int threshold) {
  if (!threshold) return 0;
  return dpm_cuda::select_workspace_bytes(batch, numel, dtype);
}

extern "C" cudaError_t dpm_cuda_fused_step(const DpmStepArgs* args, void* workspace, size_t workspace_bytes,
                                           int num_sms, cudaStream_t stream) {
  using namespace dpm_cuda;
  if (!valid(args)) return cudaErrorInvalidValue;
  if (args->batch == 0 || args->numel == 0) return cudaSuccess;
  if (args->threshold) {
    const size_t need = dpm_cuda_fused_step_workspace_bytes(args->batch, args->numel, args->dtype, 1);
    if (workspace == nullptr || workspace_bytes < need || !aligned16(workspace)) return cudaErrorInvalidValue;
  }
  if (num_sms <= 0) {
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, dev);
    if (e != cudaSuccess) return e;
  }
  const bool f32_hist = args->hist_dtype != args->dtype;  // valid(): float32 history, half samples
  switch (args->dtype) {
    case DPM_F16:
      return f32_hist ? run<__half, float>(*args, workspace, num_sms, stream)
                      : run<__half, __half>(*args, workspace, num_sms, stream);
    case DPM_BF16:
      return f32_hist ? run<__nv_bfloat16, float>(*args, workspace, num_sms, stream)
                      : run<__nv_bfloat16, __nv_bfloat16>(*args, workspace, num_sms, stream);
    case DPM_F32:
      return run<float, float>(*args, workspace, num_sms, stream);
    default:
      return run<double, double>(*args, workspace, num_sms, stream);
  }
}
