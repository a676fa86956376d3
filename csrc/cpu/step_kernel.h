// The elementwise body of the fused step on contiguous memory (CPU).
//
// Two forms of the same per-element math (the functions of dpm_math.h, nothing else):
// - simd_range: explicit SIMD with GCC vector extensions, for every dtype (loads and stores convert between the
//   storage type and the arithmetic type, simd_io.h). The dpm:: functions are templates, so they run unchanged on
//   a vector T (+ - * / and `a < b ? b : a` are lane-wise; no FMA is ever formed: IEEE results identical to the
//   scalar form). One pass per vector: load every input, compute, store. Built for 16-byte vectors and, chosen
//   at run time, for AVX2 + F16C (simd_io.h's isa_call; no -mavx2 for the rest of the library).
// - block_range: the tails, and float16 on a CPU without F16C: blocks of kBlock elements, each stage a short loop
//   between memory and a block-local array, with c10's scalar conversions.
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
#include "simd_io.h"

namespace dpm_cpu {

// 64 elements: 256 B per float block array, so a block's working set stays in L1 whatever the dtype.
constexpr int kBlock = 64;

// Base pointers of B * n contiguous elements each (element i of sample b is at b * n + i); null when the
// tensor is absent. `cond` is model_cond (cfg pair) or the second batch of model_out (cfg stacked, stacked3);
// `perturbed` the third batch of model_out (cfg stacked3 only).
// S is x's dtype; H the history's (hist1, hist2, hist3, hist_out): S, or float for half/bfloat16 x.
template <typename S, typename H = S>
struct StepPtrs {
  const S* x = nullptr;
  const S* xe = nullptr;  // x_eval, or x when none is given
  const S* uncond = nullptr;
  const S* cond = nullptr;
  const S* perturbed = nullptr;
  const H* h1 = nullptr;
  const H* h2 = nullptr;
  const H* h3 = nullptr;
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
  if (p.perturbed != nullptr) {
    const S* g = p.cond + i;
    const S* q = p.perturbed + i;
    for (int j = 0; j < len; ++j) {
      const T raw = dpm::guided3(static_cast<T>(u[j]), static_cast<T>(g[j]), static_cast<T>(q[j]), c.guide, c.guide2);
      y[j] = dpm::convert(static_cast<T>(xe[j]), raw, c.px, c.pm);
    }
  } else if (p.cond != nullptr) {
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
  if (p.h3 != nullptr) {
    const H* h = p.h3 + i;
    for (int j = 0; j < len; ++j) acc[j] = dpm::add_term(acc[j], c.c3, static_cast<T>(h[j]));
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

// ---- explicit SIMD, every dtype ----

// The coefficients splat into vectors once per range.
template <typename V, typename T>
DPM_CPU_INLINE dpm::Coef<V> splat_coef(const dpm::Coef<T>& c) {
  return dpm::Coef<V>{splat<V>(c.guide), splat<V>(c.px), splat<V>(c.pm), splat<V>(c.qx),
                      splat<V>(c.qm),    splat<V>(c.a),  splat<V>(c.c0), splat<V>(c.c1),
                      splat<V>(c.c2),    splat<V>(c.cn), splat<V>(c.c3), splat<V>(c.guide2)};
}

// y = convert(guided(raw)) of the N elements at i, as convert_block computes them lane by lane.
template <typename V, typename S, typename H>
DPM_CPU_INLINE V convert_vec(const StepPtrs<S, H>& p, int64_t i, const dpm::Coef<V>& k, V& xe) {
  V raw = load_as<V>(p.uncond + i);
  if (p.perturbed != nullptr) {
    raw = dpm::guided3(raw, load_as<V>(p.cond + i), load_as<V>(p.perturbed + i), k.guide, k.guide2);
  } else if (p.cond != nullptr) {
    raw = dpm::guided(raw, load_as<V>(p.cond + i), k.guide);
  }
  xe = load_as<V>(p.xe + i);
  return dpm::convert(xe, raw, k.px, k.pm);
}

// Elements [begin, end) of one sample with W-byte vectors of T (N = W / sizeof(T) lanes).
template <int W, typename S, typename H, typename T>
DPM_CPU_INLINE void simd_range(const StepPtrs<S, H>& pp, int64_t begin, int64_t end, const dpm::Coef<T>& c,
                               bool thr, T s) {
  constexpr int N = W / sizeof(T);
  using V = typename SimdOf<T, N>::type;
  const StepPtrs<S, H> p = pp;
  const dpm::Coef<V> k = splat_coef<V>(c);
  const V sv = splat<V>(s);
  int64_t i = begin;
  for (; i + N <= end; i += N) {
    V xe;
    V y = convert_vec(p, i, k, xe);
    if (thr) y = dpm::threshold(xe, y, sv, k.qx, k.qm);
    V acc = dpm::combine(load_as<V>(p.x + i), y, k.a, k.c0);
    if (p.h1 != nullptr) acc = dpm::add_term(acc, k.c1, load_as<V>(p.h1 + i));
    if (p.h2 != nullptr) acc = dpm::add_term(acc, k.c2, load_as<V>(p.h2 + i));
    if (p.h3 != nullptr) acc = dpm::add_term(acc, k.c3, load_as<V>(p.h3 + i));
    if (p.z != nullptr) acc = dpm::add_term(acc, k.cn, load_as<V>(p.z + i));
    if (p.hout != nullptr) store_as(p.hout + i, y);
    store_as(p.out + i, acc);
  }
  if (i < end) block_range(p, i, end, c, thr, s);
}

// The y of elements [i, i + len) of one sample (len <= kBlock) into y, in W-byte vectors where S allows.
template <int W, typename S, typename H, typename T>
DPM_CPU_INLINE void convert_range(const StepPtrs<S, H>& p, int64_t i, int len, const dpm::Coef<T>& c, T* y) {
  constexpr int N = W / sizeof(T);
  using V = typename SimdOf<T, N>::type;
  if constexpr (kVectorIo<W, S>) {
    const dpm::Coef<V> k = splat_coef<V>(c);
    int j = 0;
    for (; j + N <= len; j += N) {
      V xe;
      vstore(y + j, convert_vec(p, i + j, k, xe));
    }
    if (j < len) convert_block(p, i + j, len - j, c, y + j);
  } else {
    convert_block(p, i, len, c, y);
  }
}

// Elements [begin, end) of one sample: the fastest form for the dtype and the CPU (`w`: best_width()).
template <typename S, typename H, typename T>
void step_range(const StepPtrs<S, H>& p, int64_t begin, int64_t end, const dpm::Coef<T>& c, bool thr, T s, int w) {
  isa_call(w, [&](auto wc) DPM_CPU_LAMBDA_INLINE {
    constexpr int W = decltype(wc)::value;
    if constexpr (kVectorIo<W, S> && kVectorIo<W, H>) {
      simd_range<W>(p, begin, end, c, thr, s);
    } else {
      block_range(p, begin, end, c, thr, s);
    }
  });
}

}  // namespace dpm_cpu
