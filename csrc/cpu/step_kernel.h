// The elementwise body of the fused step on contiguous memory (CPU).
//
// Two forms of the same per-element math (the functions of dpm_math.h, nothing else):
// - float/double: explicit SIMD with GCC vector extensions. The dpm:: functions are templates, so they run
//   unchanged on a vector T (+ - * / and `a < b ? b : a` are lane-wise; no FMA is ever formed: IEEE
//   results identical to the scalar form). One pass per vector: load every input, compute, store.
//   An AVX2 build of it is chosen at run time (target attribute, no -mavx2 for the rest of the library).
// - half/bfloat16 (history in the same dtype or in float) and the tails: blocks of kBlock elements, each stage a short loop between memory and a
//   block-local array, which GCC vectorizes without alias checks.
// In both, all inputs of an element group are read before its outputs are written: that is what makes
// `out` aliasing `x` or `x_eval` exactly well defined, with no `restrict` promise to break.
#pragma once

// Vector-typed instantiations of the dpm:: helpers warn about an ABI change; they are always inlined, so no
// call crosses that ABI. The warning is issued at instantiation, located in dpm_math.h: the pragma has to
// precede that header's first inclusion, and it cannot be popped.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dpm_math.h"

namespace dpm_cpu {

// 64 elements: 256 B per float block array, so a block's working set stays in L1 whatever the dtype.
constexpr int kBlock = 64;

#define DPM_CPU_INLINE inline __attribute__((always_inline))
#define DPM_CPU_LAMBDA_INLINE __attribute__((always_inline))  // after a lambda's parameter list

// Base pointers of B * n contiguous elements each (element i of sample b is at b * n + i); null when the
// tensor is absent. `cond` is model_cond (cfg pair) or the second half of model_out (cfg stacked).
// S is x's dtype; H the history's (hist1, hist2, hist_out): S, or float for half/bfloat16 x.
template <typename S, typename H = S>
struct StepPtrs {
  const S* x = nullptr;
  const S* xe = nullptr;  // x_eval, or x when none is given
  const S* uncond = nullptr;
  const S* cond = nullptr;
  const H* h1 = nullptr;
  const H* h2 = nullptr;
  const S* z = nullptr;
  S* out = nullptr;
  H* hout = nullptr;
};

// y = convert(guided(raw)) for elements [i, i + len): the value thresholding selects on and the history
// stores. The selection passes and the final pass compute it with the same functions: bit-identical y.
template <typename S, typename H, typename T>
DPM_CPU_INLINE void convert_block(const StepPtrs<S, H>& p, int64_t i, int len, const dpm::Coef<T>& c, T* y) {
  const S* u = p.uncond + i;
  const S* xe = p.xe + i;
  if (p.cond != nullptr) {
    const S* g = p.cond + i;
    for (int j = 0; j < len; ++j) {
      const T raw = dpm::guided(static_cast<T>(u[j]), static_cast<T>(g[j]), c.guide);
      y[j] = dpm::convert(static_cast<T>(xe[j]), raw, c.px, c.pm);
    }
  } else {
    for (int j = 0; j < len; ++j) y[j] = dpm::convert(static_cast<T>(xe[j]), static_cast<T>(u[j]), c.px, c.pm);
  }
}

// One block of the whole step. `s` is the sample's threshold scale (used only when `thr`).
template <typename S, typename H, typename T>
DPM_CPU_INLINE void step_block(const StepPtrs<S, H>& p, int64_t i, int len, const dpm::Coef<T>& c, bool thr,
                               T s) {
  T y[kBlock];
  T acc[kBlock];
  convert_block(p, i, len, c, y);
  if (thr) {
    const S* xe = p.xe + i;
    for (int j = 0; j < len; ++j) y[j] = dpm::threshold(static_cast<T>(xe[j]), y[j], s, c.qx, c.qm);
  }
  const S* x = p.x + i;
  for (int j = 0; j < len; ++j) acc[j] = dpm::combine(static_cast<T>(x[j]), y[j], c.a, c.c0);
  if (p.h1 != nullptr) {
    const H* h = p.h1 + i;
    for (int j = 0; j < len; ++j) acc[j] = dpm::add_term(acc[j], c.c1, static_cast<T>(h[j]));
  }
  if (p.h2 != nullptr) {
    const H* h = p.h2 + i;
    for (int j = 0; j < len; ++j) acc[j] = dpm::add_term(acc[j], c.c2, static_cast<T>(h[j]));
  }
  if (p.z != nullptr) {
    const S* z = p.z + i;
    for (int j = 0; j < len; ++j) acc[j] = dpm::add_term(acc[j], c.cn, static_cast<T>(z[j]));
  }
  // Stores last: every read of this block (x, x_eval included) has happened.
  if (p.hout != nullptr) {
    H* h = p.hout + i;
    for (int j = 0; j < len; ++j) h[j] = static_cast<H>(y[j]);
  }
  S* o = p.out + i;
  for (int j = 0; j < len; ++j) o[j] = static_cast<S>(acc[j]);
}

// Elements [begin, end) of one sample (one coefficient row, one scale), any dtype.
template <typename S, typename H, typename T>
DPM_CPU_INLINE void block_range(const StepPtrs<S, H>& pp, int64_t begin, int64_t end, const dpm::Coef<T>& c,
                                bool thr, T s) {
  const StepPtrs<S, H> p = pp;  // a local copy: the stores below cannot alias it, so no pointer reloads
  int64_t i = begin;
  for (; i + kBlock <= end; i += kBlock) step_block(p, i, kBlock, c, thr, s);
  if (i < end) step_block(p, i, static_cast<int>(end - i), c, thr, s);
}

// ---- explicit SIMD for float / double ----

template <typename T, int N>
struct SimdOf {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};

template <typename V, typename T>
DPM_CPU_INLINE V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));  // unaligned load
  return v;
}

template <typename V, typename T>
DPM_CPU_INLINE void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename V, typename T>
DPM_CPU_INLINE V splat(T s) {
  V v;
  for (int k = 0; k < static_cast<int>(sizeof(V) / sizeof(T)); ++k) v[k] = s;  // exact copy, -0.0 included
  return v;
}

// N lanes of T per vector: 16 bytes (SSE2, every x86-64 CPU) or 32 bytes (the AVX2 build below).
template <typename T, int N>
DPM_CPU_INLINE void simd_range(const StepPtrs<T>& pp, int64_t begin, int64_t end, const dpm::Coef<T>& c, bool thr,
                               T s) {
  using V = typename SimdOf<T, N>::type;
  const StepPtrs<T> p = pp;
  const dpm::Coef<V> k{splat<V>(c.guide), splat<V>(c.px), splat<V>(c.pm), splat<V>(c.qx), splat<V>(c.qm),
                       splat<V>(c.a),     splat<V>(c.c0), splat<V>(c.c1), splat<V>(c.c2), splat<V>(c.cn)};
  const V sv = splat<V>(s);
  int64_t i = begin;
  for (; i + N <= end; i += N) {
    V raw = vload<V>(p.uncond + i);
    if (p.cond != nullptr) raw = dpm::guided(raw, vload<V>(p.cond + i), k.guide);
    const V xe = vload<V>(p.xe + i);
    V y = dpm::convert(xe, raw, k.px, k.pm);
    if (thr) y = dpm::threshold(xe, y, sv, k.qx, k.qm);
    V acc = dpm::combine(vload<V>(p.x + i), y, k.a, k.c0);
    if (p.h1 != nullptr) acc = dpm::add_term(acc, k.c1, vload<V>(p.h1 + i));
    if (p.h2 != nullptr) acc = dpm::add_term(acc, k.c2, vload<V>(p.h2 + i));
    if (p.z != nullptr) acc = dpm::add_term(acc, k.cn, vload<V>(p.z + i));
    if (p.hout != nullptr) vstore(p.hout + i, y);
    vstore(p.out + i, acc);
  }
  if (i < end) block_range(p, i, end, c, thr, s);
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(DPM_CPU_NO_AVX2)  // -DDPM_CPU_NO_AVX2: test the SSE form
#define DPM_CPU_HAVE_AVX2_PATH 1
// `flatten` inlines the whole kernel here, so all of it is compiled for AVX2 (without FMA: no contraction).
template <typename T>
__attribute__((target("avx2"), flatten, noinline)) void simd_range_avx2(const StepPtrs<T>& p, int64_t begin,
                                                                        int64_t end, const dpm::Coef<T>& c, bool thr,
                                                                        T s) {
  simd_range<T, 32 / sizeof(T)>(p, begin, end, c, thr, s);
}

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

// Elements [begin, end) of one sample: the fastest form for the dtype and the CPU.
template <typename S, typename H, typename T>
void step_range(const StepPtrs<S, H>& p, int64_t begin, int64_t end, const dpm::Coef<T>& c, bool thr, T s) {
  if constexpr (std::is_same_v<S, T> && std::is_same_v<H, T>) {
#ifdef DPM_CPU_HAVE_AVX2_PATH
    if (cpu_has_avx2()) return simd_range_avx2<T>(p, begin, end, c, thr, s);
#endif
    simd_range<T, 16 / sizeof(T)>(p, begin, end, c, thr, s);
  } else {
    block_range(p, begin, end, c, thr, s);
  }
}

}  // namespace dpm_cpu
