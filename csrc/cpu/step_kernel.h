// The elementwise body of the fused step on contiguous memory (CPU).
//
// Elements are processed in blocks of kBlock: each stage is a short loop from memory into a block-local
// array (or back), so GCC vectorizes every stage without alias checks and without `restrict`. All inputs of
// a block are read before any output of that block is written, which is what makes `out` aliasing `x` or
// `x_eval` exactly well defined. The per-element formulas are the ones of dpm_math.h, nothing else.
#pragma once

#include <algorithm>
#include <cstdint>

#include "dpm_math.h"

namespace dpm_cpu {

// 64 elements: 256 B per float block array, so a block's working set stays in L1 whatever the dtype.
constexpr int kBlock = 64;

#define DPM_CPU_INLINE inline __attribute__((always_inline))

// Base pointers of B * n contiguous elements each (element i of sample b is at b * n + i); null when the
// tensor is absent. `cond` is model_cond (cfg pair) or the second half of model_out (cfg stacked).
template <typename S>
struct StepPtrs {
  const S* x = nullptr;
  const S* xe = nullptr;  // x_eval, or x when none is given
  const S* uncond = nullptr;
  const S* cond = nullptr;
  const S* h1 = nullptr;
  const S* h2 = nullptr;
  const S* z = nullptr;
  S* out = nullptr;
  S* hout = nullptr;
};

// y = convert(guided(raw)) for elements [i, i + len): the value thresholding selects on and the history
// stores. Shared by the selection passes and the final pass so that both see bit-identical y.
template <typename S, typename T>
DPM_CPU_INLINE void convert_block(const StepPtrs<S>& p, int64_t i, int len, const dpm::Coef<T>& c, T* y) {
  const S* u = p.uncond + i;
  if (p.cond != nullptr) {
    const S* g = p.cond + i;
    for (int j = 0; j < len; ++j) y[j] = dpm::guided(static_cast<T>(u[j]), static_cast<T>(g[j]), c.guide);
  } else {
    for (int j = 0; j < len; ++j) y[j] = static_cast<T>(u[j]);
  }
  const S* xe = p.xe + i;
  for (int j = 0; j < len; ++j) y[j] = dpm::convert(static_cast<T>(xe[j]), y[j], c.px, c.pm);
}

// One block of the whole step. `s` is the sample's threshold scale (used only when `thr`).
template <typename S, typename T>
DPM_CPU_INLINE void step_block(const StepPtrs<S>& p, int64_t i, int len, const dpm::Coef<T>& c, bool thr, T s) {
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
    const S* h = p.h1 + i;
    for (int j = 0; j < len; ++j) acc[j] = dpm::add_term(acc[j], c.c1, static_cast<T>(h[j]));
  }
  if (p.h2 != nullptr) {
    const S* h = p.h2 + i;
    for (int j = 0; j < len; ++j) acc[j] = dpm::add_term(acc[j], c.c2, static_cast<T>(h[j]));
  }
  if (p.z != nullptr) {
    const S* z = p.z + i;
    for (int j = 0; j < len; ++j) acc[j] = dpm::add_term(acc[j], c.cn, static_cast<T>(z[j]));
  }
  // Stores last: every read of this block (x, x_eval included) has happened.
  if (p.hout != nullptr) {
    S* h = p.hout + i;
    for (int j = 0; j < len; ++j) h[j] = static_cast<S>(y[j]);
  }
  S* o = p.out + i;
  for (int j = 0; j < len; ++j) o[j] = static_cast<S>(acc[j]);
}

// Elements [begin, end), all of one sample (one coefficient row, one scale).
template <typename S, typename T>
void step_range(const StepPtrs<S>& p, int64_t begin, int64_t end, const dpm::Coef<T>& c, bool thr, T s) {
  int64_t i = begin;
  for (; i + kBlock <= end; i += kBlock) step_block(p, i, kBlock, c, thr, s);
  if (i < end) step_block(p, i, static_cast<int>(end - i), c, thr, s);
}

}  // namespace dpm_cpu
