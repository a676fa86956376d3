// The per-element math of a fused DPM-Solver step, shared by the CPU and the CUDA kernels.
//
// One formula, two targets: every function is `__host__ __device__` under nvcc and plain inline under a
// host compiler, and uses no torch headers. The Triton kernels mirror these functions one for one
// (dpm_kernels/backends/triton_math.py). The Python side of the contract is dpm_kernels/layout.py.
//
//   raw = model_out                               | uncond + g * (cond - uncond)     (guided)
//       | uncond + g * (cond - uncond) + g2 * (cond - perturbed)                     (guided3: stacked3)
//   y   = px * x_eval + pm * raw                                                     (convert)
//   y   = qx * x_eval + qm * (clamp(y, -s, s) / s)  when thresholding               (threshold)
//   m   = y                                       -> written to the history slot
//   out = a * x + c0 * m + c1 * h1 + c2 * h2 + c3 * h3 + cn * z                      (combine)
//
// T is the arithmetic type: float for half/bfloat16/float inputs, double for double inputs.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define DPM_HD __host__ __device__ __forceinline__
#else
#define DPM_HD inline
#include <string.h>
#endif

namespace dpm {

// Index of each coefficient in a float64 coefficient row (dpm_kernels/layout.py).
// Slots added later sit at the end of the row, so earlier indices never move.
enum CoefIndex : int {
  GUIDE = 0, PX = 1, PM = 2, QX = 3, QM = 4, A = 5, C0 = 6, C1 = 7, C2 = 8, CN = 9, C3 = 10, GUIDE2 = 11, NCOEF = 12
};

// How the guidance outputs are laid out (dpm_kernels/layout.py): model_out holds cfg_rows(cfg) batches.
enum CfgMode : int { CFG_NONE = 0, CFG_PAIR = 1, CFG_STACKED = 2, CFG_STACKED3 = 3 };

DPM_HD bool valid_cfg(int64_t cfg) { return cfg >= CFG_NONE && cfg <= CFG_STACKED3; }
DPM_HD int64_t cfg_rows(int64_t cfg) { return cfg == CFG_STACKED3 ? 3 : cfg == CFG_STACKED ? 2 : 1; }

// In row order.
template <typename T>
struct Coef {
  T guide, px, pm, qx, qm, a, c0, c1, c2, cn, c3, guide2;
};

// Read one float64 row and round it once to the arithmetic type.
template <typename T>
DPM_HD Coef<T> load_coef(const double* row) {
  Coef<T> c;
  c.guide = static_cast<T>(row[GUIDE]);
  c.px = static_cast<T>(row[PX]);
  c.pm = static_cast<T>(row[PM]);
  c.qx = static_cast<T>(row[QX]);
  c.qm = static_cast<T>(row[QM]);
  c.a = static_cast<T>(row[A]);
  c.c0 = static_cast<T>(row[C0]);
  c.c1 = static_cast<T>(row[C1]);
  c.c2 = static_cast<T>(row[C2]);
  c.cn = static_cast<T>(row[CN]);
  c.c3 = static_cast<T>(row[C3]);
  c.guide2 = static_cast<T>(row[GUIDE2]);
  return c;
}

template <typename T>
DPM_HD T min_(T a, T b) { return b < a ? b : a; }
template <typename T>
DPM_HD T max_(T a, T b) { return a < b ? b : a; }

// Classifier-free guidance on the raw outputs (exact: the conversion below is affine with weights summing to 1).
template <typename T>
DPM_HD T guided(T uncond, T cond, T g) { return uncond + g * (cond - uncond); }

// The same plus perturbed-attention guidance (cfg stacked3); with g2 = 0 exactly `guided` for finite inputs.
template <typename T>
DPM_HD T guided3(T uncond, T cond, T perturbed, T g, T g2) { return guided(uncond, cond, g) + g2 * (cond - perturbed); }

// Conversion of a raw output to the solver's prediction (or to x0 before thresholding).
template <typename T>
DPM_HD T convert(T x_eval, T raw, T px, T pm) { return px * x_eval + pm * raw; }

// Dynamic thresholding of one x0 value with the sample's scale s, then conversion to the solver's prediction.
template <typename T>
DPM_HD T threshold(T x_eval, T y, T s, T qx, T qm) {
  T clipped = min_(max_(y, -s), s) / s;
  return qx * x_eval + qm * clipped;
}

// The update, accumulated in the same order as the reference.
template <typename T>
DPM_HD T combine(T x, T m, T a, T c0) { return a * x + c0 * m; }
template <typename T>
DPM_HD T add_term(T acc, T c, T v) { return acc + c * v; }

// ---- the per-sample quantile of |y| (torch.quantile, 'linear' interpolation) ----

struct QuantileRank {
  int64_t k;  // lower order statistic (0-based)
  double w;   // interpolation weight towards order statistic k + 1
  double w1;  // 1 - w, in double
};

// Computed in double on the host from the per-sample size n >= 1.
DPM_HD QuantileRank quantile_rank(int64_t n, double ratio) {
  double pos = ratio * static_cast<double>(n - 1);
  int64_t k = static_cast<int64_t>(pos);
  if (k > n - 1) k = n - 1;
  if (k < 0) k = 0;
  QuantileRank r;
  r.k = k;
  r.w = pos - static_cast<double>(k);
  r.w1 = 1.0 - r.w;
  return r;
}

// torch.lerp's two-branch formula, which torch.quantile uses, with quantile_rank's weights w and w1 = 1 - w:
// the branch is taken on w itself, and each weight is rounded to T once from double (as the reference's float64
// weight is), not 1 - w computed in T.
template <typename T>
DPM_HD T lerp_torch(T lo, T hi, double w, double w1) {
  return w < 0.5 ? lo + static_cast<T>(w) * (hi - lo) : hi - (hi - lo) * static_cast<T>(w1);
}

// s = clamp(q, lo, hi): authors' semantics are (lo = max_val, hi = inf), diffusers' (1, sample_max_value).
template <typename T>
DPM_HD T threshold_scale(T q, T lo, T hi) { return min_(max_(q, lo), hi); }

// Radix-select keys: the bit pattern of |v| read as an unsigned integer is monotone in |v|
// (NaN sorts above +inf, as in torch.sort).
DPM_HD uint32_t abs_key(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v) & 0x7fffffffu;
#else
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u & 0x7fffffffu;
#endif
}

DPM_HD uint64_t abs_key(double v) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(v)) & 0x7fffffffffffffffull;
#else
  uint64_t u;
  memcpy(&u, &v, sizeof(u));
  return u & 0x7fffffffffffffffull;
#endif
}

DPM_HD float key_value(uint32_t k) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(k);
#else
  float v;
  memcpy(&v, &k, sizeof(v));
  return v;
#endif
}

DPM_HD double key_value(uint64_t k) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(k));
#else
  double v;
  memcpy(&v, &k, sizeof(v));
  return v;
#endif
}

}  // namespace dpm
