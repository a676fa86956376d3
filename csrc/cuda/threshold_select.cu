// Per-sample dynamic-thresholding scale s[b] = clamp(quantile(|y_b|, ratio), lo, hi), on the device.
//
// Exact order statistics by radix select (radix_select.cuh): no sort, no host round trip, so a whole
// thresholded step can be captured in a CUDA graph. y is recomputed from the inputs in every pass
// (predict_group) instead of being stored: a pass reads the 2-3 inputs y depends on.
//
// Two regimes, chosen from the shapes alone (so the workspace size depends only on them):
// - small (n <= 2^17, or B >= 64 samples to fill the GPU): one block per sample runs every pass with its
//   histogram in shared memory and writes s[b]; 1 launch.
// - huge (few large samples): each pass is a launch of many blocks per sample that histogram their
//   chunk in shared memory and add the non-zero bins into a global histogram of that pass. Blocks of
//   pass p re-derive the prefix from the (complete: earlier launch) histogram of pass p - 1; a finalize
//   launch turns the last one into s[b]. 1 memset + 3 passes (6 for float64) + 1 finalize launch.
#include <cuda_runtime.h>

#include "radix_select.cuh"
#include "step_device.cuh"

namespace dpm_cuda {
namespace {

constexpr int kSmallThreads = 1024;
constexpr int kPassThreads = 512;
constexpr int kFinalThreads = 64;  // two warps: one per target
constexpr int64_t kSmallMaxN = int64_t(1) << 17;
constexpr int64_t kSmallMinBatch = 64;
constexpr int64_t kMinGroupsPerBlock = 4096;  // huge regime: enough work per block to amortise its setup

bool small_regime(int64_t batch, int64_t n) {
  // Shared-memory counts are 32-bit: one block may count at most 2^31 keys.
  return n < (int64_t(1) << 31) && (n <= kSmallMaxN || batch >= kSmallMinBatch);
}

size_t align256(size_t v) { return (v + 255) & ~size_t(255); }

int passes_for(int dtype) { return dtype == DPM_F64 ? Digits<uint64_t>::kPasses : Digits<uint32_t>::kPasses; }

struct Scratch {
  SelectState* state;        // [passes, B]: the state each pass started from
  unsigned long long* hist;  // [passes, B, 2, kBins]
};

// Histogram the keys of groups [g_begin, ng) step g_step of one sample into hist (shared, 2*kBins).
// Loop bounds are block-uniform so that every lane reaches hist_add's warp votes.
template <typename S>
__device__ void count_keys(const Tensors<S>& t, const StepShape& sh, const dpm::Coef<typename Traits<S>::T>& c,
                           int64_t base, const SelectState& cur, int pass, int64_t g_begin, int64_t g_step,
                           uint32_t* hist) {
  using T = typename Traits<S>::T;
  using K = typename Traits<S>::Key;
  constexpr int V = Traits<S>::V;
  const bool diverged = select_diverged(cur);
  const DigitPos pos = digit_pos<K>(pass);
  const int64_t ng = (sh.n + V - 1) / V;
  for (int64_t g0 = g_begin; g0 < ng; g0 += g_step) {
    const int64_t g = g0 + threadIdx.x;
    const int cnt = g < ng ? static_cast<int>(sh.n - g * V < V ? sh.n - g * V : V) : 0;
    T xe[V], y[V];
    if (cnt > 0) predict_group<S>(t, sh, c, base + g * V, cnt, xe, y);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int slot = j < cnt ? select_slot<K>(cur, diverged, pos, dpm::abs_key(y[j])) : -1;
      hist_add(hist, slot);
    }
  }
}

template <typename S>
__global__ void __launch_bounds__(kSmallThreads)
    select_small_kernel(Tensors<S> t, StepShape sh, SelectArgs a, typename Traits<S>::T* scale) {
  using T = typename Traits<S>::T;
  using K = typename Traits<S>::Key;
  __shared__ uint32_t hist[2 * kBins];
  __shared__ SelectState st;
  for (int64_t b = blockIdx.x; b < sh.batch; b += gridDim.x) {
    const dpm::Coef<T> c = dpm::load_coef<T>(sh.coef + b * sh.coef_stride);
    if (threadIdx.x == 0) st = select_init(a.k0, a.k1);
    for (int pass = 0; pass < Digits<K>::kPasses; ++pass) {
      for (int i = threadIdx.x; i < 2 * kBins; i += blockDim.x) hist[i] = 0u;
      __syncthreads();  // hist zeroed, st written (by thread 0 or by the previous pass's warps 0/1)
      const SelectState cur = st;
      count_keys<S>(t, sh, c, b * sh.n, cur, pass, 0, blockDim.x, hist);
      __syncthreads();  // hist complete; everyone has read st
      warps_advance<K>(&st, cur, hist, hist + kBins, pass);
      __syncthreads();  // st advanced before the next pass reads it and hist is re-zeroed
    }
    if (threadIdx.x == 0) scale[b] = select_scale<K>(st, a.w, a.w1, a.lo, a.hi);
    // Only thread 0 touches st before the next sample's first barrier: no further barrier needed.
  }
}

// The state pass `pass` starts from: the initial one, or pass - 1's advanced by its global histogram.
template <typename K>
__device__ void derive_state(SelectState* st, const Scratch& w, const SelectArgs& a, int64_t batch, int64_t b,
                             int pass) {
  if (pass == 0) {
    if (threadIdx.x == 0) *st = select_init(a.k0, a.k1);
    return;
  }
  const int64_t slot = static_cast<int64_t>(pass - 1) * batch + b;
  const SelectState prev = w.state[slot];
  const unsigned long long* h = w.hist + slot * 2 * kBins;
  warps_advance<K>(st, prev, h, h + kBins, pass - 1);
}

template <typename S>
__global__ void __launch_bounds__(kPassThreads, 2)
    select_pass_kernel(Tensors<S> t, StepShape sh, SelectArgs a, Scratch w, int pass) {
  using T = typename Traits<S>::T;
  using K = typename Traits<S>::Key;
  __shared__ uint32_t hist[2 * kBins];
  __shared__ SelectState st;
  for (int64_t b = blockIdx.y; b < sh.batch; b += gridDim.y) {
    const dpm::Coef<T> c = dpm::load_coef<T>(sh.coef + b * sh.coef_stride);
    derive_state<K>(&st, w, a, sh.batch, b, pass);
    for (int i = threadIdx.x; i < 2 * kBins; i += blockDim.x) hist[i] = 0u;
    __syncthreads();
    const SelectState cur = st;
    const int64_t slot = static_cast<int64_t>(pass) * sh.batch + b;
    if (blockIdx.x == 0 && threadIdx.x == 0) w.state[slot] = cur;  // for pass + 1 (a later launch)
    const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
    count_keys<S>(t, sh, c, b * sh.n, cur, pass, static_cast<int64_t>(blockIdx.x) * blockDim.x, step, hist);
    __syncthreads();
    // Only non-empty bins: after pass 0 few keys share the prefix, so few global atomics.
    unsigned long long* g = w.hist + slot * 2 * kBins;
    const int used = select_diverged(cur) ? 2 * kBins : kBins;
    for (int i = threadIdx.x; i < used; i += blockDim.x) {
      const uint32_t v = hist[i];
      if (v != 0u) atomicAdd(g + i, static_cast<unsigned long long>(v));
    }
    __syncthreads();  // hist and st are reused for the next sample
  }
}

template <typename T, typename K>
__global__ void __launch_bounds__(kFinalThreads)
    select_finalize_kernel(Scratch w, SelectArgs a, int64_t batch, T* scale) {
  __shared__ SelectState st;
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    derive_state<K>(&st, w, a, batch, b, Digits<K>::kPasses);
    __syncthreads();
    if (threadIdx.x == 0) scale[b] = select_scale<K>(st, a.w, a.w1, a.lo, a.hi);
    __syncthreads();
  }
}

unsigned grid_cap(int64_t want, int64_t cap) {
  const int64_t g = want < cap ? want : cap;
  return static_cast<unsigned>(g < 1 ? 1 : g);
}

}  // namespace

size_t select_workspace_bytes(int64_t batch, int64_t n, int dtype) {
  if (batch <= 0 || n <= 0) return 0;
  const size_t scale = align256(static_cast<size_t>(batch) * sizeof(double));
  if (small_regime(batch, n)) return scale;
  const size_t slots = static_cast<size_t>(passes_for(dtype)) * static_cast<size_t>(batch);
  return scale + align256(slots * sizeof(SelectState)) + slots * 2 * kBins * sizeof(unsigned long long);
}

template <typename S>
cudaError_t launch_select(const Tensors<S>& t, const StepShape& sh, const SelectArgs& a, void* workspace,
                          int num_sms, cudaStream_t stream, const typename Traits<S>::T** scale_out) {
  using T = typename Traits<S>::T;
  using K = typename Traits<S>::Key;
  constexpr int V = Traits<S>::V;
  char* ws = static_cast<char*>(workspace);
  T* scale = reinterpret_cast<T*>(ws);
  *scale_out = scale;
  const int64_t max_grid = 0x7fffffff;
  if (small_regime(sh.batch, sh.n)) {
    // Tiny samples get a smaller block: zeroing and scanning 4096 bins per pass is the fixed cost.
    int64_t threads = ((sh.n + V - 1) / V + 31) / 32 * 32;
    threads = threads < 128 ? 128 : threads > kSmallThreads ? kSmallThreads : threads;
    select_small_kernel<S><<<grid_cap(sh.batch, max_grid), static_cast<unsigned>(threads), 0, stream>>>(t, sh, a,
                                                                                                     scale);
    return cudaGetLastError();
  }
  const int passes = Digits<K>::kPasses;
  const size_t slots = static_cast<size_t>(passes) * static_cast<size_t>(sh.batch);
  Scratch w;
  w.state = reinterpret_cast<SelectState*>(ws + align256(static_cast<size_t>(sh.batch) * sizeof(double)));
  w.hist = reinterpret_cast<unsigned long long*>(reinterpret_cast<char*>(w.state) +
                                                 align256(slots * sizeof(SelectState)));
  cudaError_t e = cudaMemsetAsync(w.hist, 0, slots * 2 * kBins * sizeof(unsigned long long), stream);
  if (e != cudaSuccess) return e;
  int per_sm = 1;
  if ((e = resident_blocks(select_pass_kernel<S>, kPassThreads, &per_sm)) != cudaSuccess) return e;
  // Blocks per sample: the device's resident blocks shared among the samples, but no more than the
  // groups justify, and enough that no block counts 2^31 keys (32-bit shared counts).
  const int64_t ng = (sh.n + V - 1) / V;
  int64_t per_sample = static_cast<int64_t>(num_sms) * per_sm / sh.batch;
  const int64_t by_work = (ng + kMinGroupsPerBlock - 1) / kMinGroupsPerBlock;
  if (per_sample > by_work) per_sample = by_work;
  const int64_t by_count = (sh.n >> 31) + 1;
  if (per_sample < by_count) per_sample = by_count;
  const dim3 grid(grid_cap(per_sample, max_grid), grid_cap(sh.batch, 65535));
  for (int pass = 0; pass < passes; ++pass) {
    select_pass_kernel<S><<<grid, kPassThreads, 0, stream>>>(t, sh, a, w, pass);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  select_finalize_kernel<T, K><<<grid_cap(sh.batch, max_grid), kFinalThreads, 0, stream>>>(w, a, sh.batch, scale);
  return cudaGetLastError();
}

#define DPM_INSTANTIATE_SELECT(S)                                                                        \
  template cudaError_t launch_select<S>(const Tensors<S>&, const StepShape&, const SelectArgs&, void*, int, \
                                        cudaStream_t, const Traits<S>::T**);
DPM_INSTANTIATE_SELECT(__half)
DPM_INSTANTIATE_SELECT(__nv_bfloat16)
DPM_INSTANTIATE_SELECT(float)
DPM_INSTANTIATE_SELECT(double)
#undef DPM_INSTANTIATE_SELECT

}  // namespace dpm_cuda
