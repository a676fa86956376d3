// Device building blocks shared by the fused-update and the threshold-select kernels.
//
// Storage <-> arithmetic conversions, 16-byte group loads/stores with a scalar fallback, and the one
// place that evaluates y = convert(guided(...)) from the inputs: the select passes and the update
// pass call the same function, so every pass of one step sees the same y for the same element.
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

// Typed views of DpmStepArgs' tensors. No __restrict__: out may be x or x_eval itself.
template <typename S>
struct Tensors {
  const S* x;
  const S* mo;  // model_out (the unconditional half when guided)
  const S* mc;  // conditional output when guided (model_cond, or model_out + B*n when stacked)
  const S* xe;  // x_eval, or nullptr for x
  const S* h1;
  const S* h2;
  const S* z;
  S* out;
  S* hout;
};

struct StepShape {
  int64_t batch;        // samples actually iterated (1 when a shared row and no thresholding flatten them)
  int64_t n;            // elements per iterated sample
  const double* coef;   // device coefficient rows
  int64_t coef_stride;  // 0 (one shared row) or NCOEF (a row per sample)
  bool guided;          // cfg != none
  bool vec;             // every pointer 16-byte aligned and every sample starts on a vector boundary
};

// Group g of a sample holds elements [g*V, g*V + cnt), cnt = min(V, n - g*V). A full group on the vector
// path is one 16-byte access; otherwise cnt scalar accesses (unaligned tensors, the sample's tail).
template <typename S>
__device__ __forceinline__ void load_group(const S* p, int64_t off, int cnt, bool vec,
                                           typename Traits<S>::T (&v)[Traits<S>::V]) {
  using Tr = Traits<S>;
  if (vec && cnt == Tr::V) {
    const uint4 u = *reinterpret_cast<const uint4*>(p + off);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < Tr::V; ++j) v[j] = Tr::get(w, j);
  } else {
#pragma unroll
    for (int j = 0; j < Tr::V; ++j) v[j] = j < cnt ? Tr::load1(p + off + j) : typename Tr::T(0);
  }
}

template <typename S>
__device__ __forceinline__ void store_group(S* p, int64_t off, int cnt, bool vec,
                                            const typename Traits<S>::T (&v)[Traits<S>::V]) {
  using Tr = Traits<S>;
  if (vec && cnt == Tr::V) {
    uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int j = 0; j < Tr::V; ++j) Tr::put(w, j, v[j]);
    *reinterpret_cast<uint4*>(p + off) = make_uint4(w[0], w[1], w[2], w[3]);
  } else {
#pragma unroll
    for (int j = 0; j < Tr::V; ++j)
      if (j < cnt) Tr::store1(p + off + j, v[j]);
  }
}

// y (before thresholding) for one group: raw = model_out or guided(uncond, cond); y = convert(x_eval, raw).
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
#pragma unroll
    for (int j = 0; j < V; ++j) y[j] = dpm::guided(y[j], cond[j], c.guide);
  }
#pragma unroll
  for (int j = 0; j < V; ++j) y[j] = dpm::convert(xe[j], y[j], c.px, c.pm);
}

// The selection of the per-sample scale (threshold_select.cu) and the sizes it needs.
struct SelectArgs {
  uint64_t k0, k1;        // order statistics to select (0-based), k1 = min(k0 + 1, n - 1)
  double w, lo, hi;       // lerp weight and clamp bounds of dpm::threshold_scale
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
