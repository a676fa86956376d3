// Device building blocks shared by the fused-update and the threshold-select kernels.
//
// Storage <-> arithmetic conversions, 16-byte group loads/stores with a scalar fallback, and the one
// place that evaluates y = convert(guided(...)) from the inputs: the select passes and the update
// pass call the same function, so every pass of one step sees the same y for the same element.
// The history tensors (hist1, hist2, hist3, hist_out) have their own storage type H: S, or float for half S
// (History<H>); only the update kernel sees them, the selection never reads history.
// Conversions use explicit intrinsics because torch extension builds define __CUDA_NO_HALF_CONVERSIONS__
// and __CUDA_NO_BFLOAT16_CONVERSIONS__ (implicit half <-> float would not compile there).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "dpm_math.h"
#include "fused_step_kernels.cuh"

namespace dpm_cuda {

// Storage type S: arithmetic type T, elements per 16-byte vector V, and lossless bit unpacking from /
// round-to-nearest-even packing into 32-bit words (little-endian: element j of a uint4 sits in word
// j * sizeof(S) / 4, low half first).
template <typename S>
struct Traits;

template <>
struct Traits<__half> {
  using T = float;
  using Key = uint32_t;
  static constexpr int V = 8;
  static __device__ __forceinline__ T get(const uint32_t* w, int j) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w[j >> 1] >> (16 * (j & 1)))));
  }
  static __device__ __forceinline__ void put(uint32_t* w, int j, T v) {
    const uint32_t bits = __half_as_ushort(__float2half_rn(v));
    w[j >> 1] = (j & 1) ? (w[j >> 1] | (bits << 16)) : bits;
  }
  static __device__ __forceinline__ T load1(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store1(__half* p, T v) { *p = __float2half_rn(v); }
};

template <>
struct Traits<__nv_bfloat16> {
  using T = float;
  using Key = uint32_t;
  static constexpr int V = 8;
  static __device__ __forceinline__ T get(const uint32_t* w, int j) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w[j >> 1] >> (16 * (j & 1)))));
  }
  static __device__ __forceinline__ void put(uint32_t* w, int j, T v) {
    const uint32_t bits = __bfloat16_as_ushort(__float2bfloat16_rn(v));
    w[j >> 1] = (j & 1) ? (w[j >> 1] | (bits << 16)) : bits;
  }
  static __device__ __forceinline__ T load1(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void store1(__nv_bfloat16* p, T v) { *p = __float2bfloat16_rn(v); }
};

template <>
struct Traits<float> {
  using T = float;
  using Key = uint32_t;
  static constexpr int V = 4;
  static __device__ __forceinline__ T get(const uint32_t* w, int j) { return __uint_as_float(w[j]); }
  static __device__ __forceinline__ void put(uint32_t* w, int j, T v) { w[j] = __float_as_uint(v); }
  static __device__ __forceinline__ T load1(const float* p) { return *p; }
  static __device__ __forceinline__ void store1(float* p, T v) { *p = v; }
};

template <>
struct Traits<double> {
  using T = double;
  using Key = uint64_t;
  static constexpr int V = 2;
  static __device__ __forceinline__ T get(const uint32_t* w, int j) {
    return __hiloint2double(static_cast<int>(w[2 * j + 1]), static_cast<int>(w[2 * j]));
  }
  static __device__ __forceinline__ void put(uint32_t* w, int j, T v) {
    w[2 * j] = static_cast<uint32_t>(__double2loint(v));
    w[2 * j + 1] = static_cast<uint32_t>(__double2hiint(v));
  }
  static __device__ __forceinline__ T load1(const double* p) { return *p; }
  static __device__ __forceinline__ void store1(double* p, T v) { *p = v; }
};

// Typed views of DpmStepArgs' tensors in the sample's storage type S. No __restrict__: out may be x or
// x_eval itself.
template <typename S>
struct Tensors {
  const S* x;
  const S* mo;  // model_out (the unconditional half when guided)
  const S* mc;  // conditional output when guided (model_cond, or model_out + B*n when stacked / stacked3)
  const S* mp;  // perturbed output: model_out + 2*B*n when stacked3, else nullptr
  const S* xe;  // x_eval, or nullptr for x
  const S* z;
  S* out;
};

// The history tensors in their storage type H (S, or float for __half / __nv_bfloat16 samples).
template <typename H>
struct History {
  const H* h1;
  const H* h2;
  const H* h3;
  H* hout;
};

struct StepShape {
  int64_t batch;        // samples actually iterated (1 when a shared row and no thresholding flatten them)
  int64_t n;            // elements per iterated sample
  const double* coef;   // device coefficient rows
  int64_t coef_stride;  // 0 (one shared row) or NCOEF (a row per sample)
  bool guided;          // cfg != none
  bool perturbed;       // cfg == stacked3 (then guided too)
  bool vec;             // every pointer (history included) 16-byte aligned, every sample starts on a group
                        // boundary (n % Traits<S>::V == 0, or one flat sample)
};

// Group g of a sample holds elements [g*N, g*N + cnt), cnt = min(N, n - g*N), N = Traits<S>::V of the
// sample's storage type S. A full group on the vector path is N / Traits<P>::V 16-byte accesses of a
// tensor of storage type P: one for the sample's tensors, two for float32 history with half samples (the
// group's 8 floats, 32 contiguous bytes: a warp's first access covers the first half of each 32-byte
// sector, its second the other half, so DRAM still moves whole sectors and only the L1/L2 requests for
// these tensors double; the alternative, 8-byte accesses for every half tensor, was not measured).
// Otherwise cnt scalar accesses (unaligned tensors, the sample's tail). The vector path needs p + off
// 16-byte aligned: p is (checked on the host for every tensor), and off is a multiple of N, so off *
// sizeof(P) is a multiple of N * sizeof(P) >= 16 for every P with Traits<P>::V dividing N.
template <typename P, int N>
__device__ __forceinline__ void load_group(const P* p, int64_t off, int cnt, bool vec,
                                           typename Traits<P>::T (&v)[N]) {
  using Tr = Traits<P>;
  static_assert(N % Tr::V == 0, "a group is whole 16-byte vectors of every tensor");
  if (vec && cnt == N) {
    const uint4* q = reinterpret_cast<const uint4*>(p + off);
#pragma unroll
    for (int k = 0; k < N / Tr::V; ++k) {
      const uint4 u = q[k];
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int j = 0; j < Tr::V; ++j) v[k * Tr::V + j] = Tr::get(w, j);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = j < cnt ? Tr::load1(p + off + j) : typename Tr::T(0);
  }
}

// One 16-byte global store. NVVM split a plain `*q = u` of a uint4 into four 4-byte stores (CUDA 13.0,
// sm_80/sm_90: STG.E x4 in the SASS of every single-vector group and of the first vector of a two-vector
// one); __stwb keeps the width but makes it a strong store (STG.E.128.STRONG.SM). This is the plain weak
// STG.E.128 (p is device global memory: the binding passes tensor storage).
__device__ __forceinline__ void store16(uint4* q, const uint4 u) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(__cvta_generic_to_global(q)), "r"(u.x), "r"(u.y),
               "r"(u.z), "r"(u.w)
               : "memory");
}

template <typename P, int N>
__device__ __forceinline__ void store_group(P* p, int64_t off, int cnt, bool vec,
                                            const typename Traits<P>::T (&v)[N]) {
  using Tr = Traits<P>;
  static_assert(N % Tr::V == 0, "a group is whole 16-byte vectors of every tensor");
  if (vec && cnt == N) {
    uint4* q = reinterpret_cast<uint4*>(p + off);
#pragma unroll
    for (int k = 0; k < N / Tr::V; ++k) {
      uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
      for (int j = 0; j < Tr::V; ++j) Tr::put(w, j, v[k * Tr::V + j]);
      store16(q + k, make_uint4(w[0], w[1], w[2], w[3]));
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (j < cnt) Tr::store1(p + off + j, v[j]);
  }
}

// y (before thresholding) for one group: raw = model_out, guided(uncond, cond) or guided3(uncond, cond,
// perturbed); y = convert(x_eval, raw).
// Also returns x_eval's values, which thresholding needs again.
template <typename S>
__device__ __forceinline__ void predict_group(const Tensors<S>& t, const StepShape& sh,
                                              const dpm::Coef<typename Traits<S>::T>& c, int64_t off, int cnt,
                                              typename Traits<S>::T (&xe)[Traits<S>::V],
                                              typename Traits<S>::T (&y)[Traits<S>::V]) {
  using T = typename Traits<S>::T;
  constexpr int V = Traits<S>::V;
  load_group<S>(t.xe != nullptr ? t.xe : t.x, off, cnt, sh.vec, xe);
  load_group<S>(t.mo, off, cnt, sh.vec, y);
  if (sh.guided) {
    T cond[V];
    load_group<S>(t.mc, off, cnt, sh.vec, cond);
    // One load of cond for both layouts: written as two loads in two branches, ptxas spilled the f32-history
    // update kernels on sm_90 (CUDA 13.0).
    if (sh.perturbed) {
      T pert[V];
      load_group<S>(t.mp, off, cnt, sh.vec, pert);
#pragma unroll
      for (int j = 0; j < V; ++j) y[j] = dpm::guided3(y[j], cond[j], pert[j], c.guide, c.guide2);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) y[j] = dpm::guided(y[j], cond[j], c.guide);
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) y[j] = dpm::convert(xe[j], y[j], c.px, c.pm);
}

// The selection of the per-sample scale (threshold_select.cu) and the sizes it needs.
struct SelectArgs {
  uint64_t k0, k1;        // order statistics to select (0-based), k1 = min(k0 + 1, n - 1)
  double w, w1, lo, hi;   // lerp weights (w1 = 1 - w) and clamp bounds of dpm::threshold_scale
};

// Workspace layout: [scale: B values of T][selection scratch, huge regime only]. Offsets 256-aligned.
size_t select_workspace_bytes(int64_t batch, int64_t n, int dtype);

// Enqueue the selection; on success *scale points at B arithmetic-type values inside `workspace`.
template <typename S>
cudaError_t launch_select(const Tensors<S>& t, const StepShape& sh, const SelectArgs& a, void* workspace,
                          int num_sms, cudaStream_t stream, const typename Traits<S>::T** scale);

// Resident blocks per SM of `kernel` at `threads` threads (>= 1); a failing query is returned as the error.
template <typename Kernel>
inline cudaError_t resident_blocks(Kernel kernel, int threads, int* blocks) {
  int v = 0;
  const cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, kernel, threads, 0);
  *blocks = v > 0 ? v : 1;
  return e;
}

}  // namespace dpm_cuda
