// CPU kernel of dpm_kernels::fused_step (schema: dpm_kernels/ops.py; math: csrc/dpm_math.h).
//
// One pass over memory for a plain step; with dynamic thresholding the per-sample quantile first needs a
// selection pass (rarely more) that reads only the inputs of y (quantile_select.h). Arithmetic in float for
// half/bfloat16/float tensors and in double for double tensors, stored in the input dtype; the history
// (hist1, hist2, hist_out) may be float32 for half/bfloat16 inputs.
// The schema is defined from Python, so this file registers only the CPU implementation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "step_kernel.h"  // first: it must precede dpm_math.h (see there)
#include "quantile_select.h"
#include "dpm_math.h"

namespace {

using OptTensor = std::optional<at::Tensor>;

const at::Tensor* present(const OptTensor& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides();
}

// Whether the address spans of a and b intersect: conservative for strided views, like ops._overlap (and
// independent of which storage objects hold them: two storages may wrap the same memory).
bool overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  auto span = [](const at::Tensor& t) {
    int64_t extent = 0;
    for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * std::abs(t.stride(d));
    const char* lo = static_cast<const char*>(t.data_ptr());
    return std::make_pair(lo, lo + (extent + 1) * static_cast<int64_t>(t.element_size()));
  };
  const auto sa = span(a), sb = span(b);
  return sa.first < sb.second && sb.first < sa.second;
}

bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// The dtype history tensors (hist1, hist2, hist_out) share: the first given one's when it is x's, or float32
// for a float16/bfloat16 x (a low-precision solver keeps a much more accurate history in float32); else x's.
at::ScalarType history_dtype(at::ScalarType xt, const OptTensor& hist1, const OptTensor& hist2,
                             const OptTensor& hist_out) {
  for (const OptTensor* t : {&hist1, &hist2, &hist_out}) {
    if (const at::Tensor* h = present(*t)) {
      const at::ScalarType ht = h->scalar_type();
      return ht == xt || (ht == at::kFloat && is_half(xt)) ? ht : xt;
    }
  }
  return xt;
}

// Every check runs before anything is written; messages start with the argument's name.
void check_args(const at::Tensor& x, const at::Tensor& model_out, const OptTensor& model_cond,
                const OptTensor& x_eval, const OptTensor& hist1, const OptTensor& hist2, const OptTensor& noise,
                const at::Tensor& coef, int64_t cfg, bool threshold, double ratio, double lo, double hi,
                const at::Tensor& out, const OptTensor& hist_out) {
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble,
                   "x: expected float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK_VALUE(x.dim() >= 1, "x: expected a tensor with a batch dimension, got a 0-d tensor");
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x: the CPU kernel got a tensor on ", x.device());
  TORCH_CHECK_VALUE(cfg == dpm::CFG_NONE || cfg == dpm::CFG_PAIR || cfg == dpm::CFG_STACKED,
                    "cfg: expected 0 (none), 1 (pair) or 2 (stacked), got ", cfg);
  const int64_t b = x.size(0);
  const auto hdt = history_dtype(dt, hist1, hist2, hist_out);
  const std::pair<const char*, const at::Tensor*> like_x[] = {
      {"model_out", &model_out}, {"model_cond", present(model_cond)}, {"x_eval", present(x_eval)},
      {"hist1", present(hist1)}, {"hist2", present(hist2)}, {"noise", present(noise)},
      {"out", &out}, {"hist_out", present(hist_out)}};
  for (const auto& [name, t] : like_x) {
    if (t == nullptr) continue;
    const bool history = t == present(hist1) || t == present(hist2) || t == present(hist_out);
    if (history) {
      TORCH_CHECK_TYPE(t->scalar_type() == hdt, name, ": dtype ", t->scalar_type(), ": history tensors share one ",
                       "dtype, x's (", dt, ") or float32 when x is float16/bfloat16");
    } else {
      TORCH_CHECK_TYPE(t->scalar_type() == dt, name, ": dtype ", t->scalar_type(), " does not match x's dtype ", dt);
    }
    TORCH_CHECK_VALUE(t->device() == x.device(), name, ": on device ", t->device(), ", but x is on ", x.device());
    std::vector<int64_t> want = x.sizes().vec();
    if (t == &model_out && cfg == dpm::CFG_STACKED) want[0] = 2 * b;
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(want), name, ": shape ", t->sizes(),
                      " does not match the expected ", at::IntArrayRef(want));
  }
  TORCH_CHECK_VALUE(cfg != dpm::CFG_PAIR || present(model_cond),
                    "model_cond: cfg='pair' needs the conditional output in model_cond");
  TORCH_CHECK_VALUE(cfg == dpm::CFG_PAIR || !present(model_cond), "model_cond: given, but cfg is not 'pair'");
  TORCH_CHECK_VALUE(!present(hist2) || present(hist1), "hist2: given without hist1 (history entries are newest first)");
  TORCH_CHECK_TYPE(coef.scalar_type() == at::kDouble, "coef: expected float64 coefficients, got ", coef.scalar_type());
  TORCH_CHECK_VALUE(coef.device() == x.device(), "coef: on device ", coef.device(), ", but x is on ", x.device());
  TORCH_CHECK_VALUE((coef.dim() == 1 && coef.size(0) == dpm::NCOEF) ||
                        (coef.dim() == 2 && coef.size(0) == b && coef.size(1) == dpm::NCOEF),
                    "coef: expected shape (", int(dpm::NCOEF), ",) or (", b, ", ", int(dpm::NCOEF), "), got ",
                    coef.sizes());
  if (threshold) {
    TORCH_CHECK_VALUE(ratio >= 0.0 && ratio <= 1.0, "thr_ratio: the thresholding quantile must lie in [0, 1], got ",
                      ratio);
    TORCH_CHECK_VALUE(lo > 0.0 && hi > 0.0, "thr_min: thresholding bounds must be > 0, got (", lo, ", ", hi, ")");
  }
  const std::pair<const char*, const at::Tensor*> inputs[] = {
      {"x", &x}, {"model_out", &model_out}, {"model_cond", present(model_cond)}, {"x_eval", present(x_eval)},
      {"hist1", present(hist1)}, {"hist2", present(hist2)}, {"noise", present(noise)}, {"coef", &coef}};
  TORCH_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes, "out: has elements sharing memory");
  if (const at::Tensor* ho = present(hist_out)) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(*ho) != at::MemOverlap::Yes, "hist_out: has elements sharing memory");
    TORCH_CHECK_VALUE(!overlap(*ho, out), "hist_out: overlaps out");
    for (const auto& [name, t] : inputs) {
      TORCH_CHECK_VALUE(t == nullptr || !overlap(*ho, *t), "hist_out: overlaps ", name,
                        "; the history slot written must not be read");
    }
  }
  for (const auto& [name, t] : inputs) {
    if (t == nullptr) continue;
    const bool may_alias = (t == &x || t == present(x_eval)) && same_view(out, *t);
    TORCH_CHECK_VALUE(may_alias || !overlap(out, *t), "out: overlaps ", name,
                      "; out may be x or x_eval itself, nothing else it reads");
  }
  const at::Tensor cc = coef.contiguous();
  const double* cd = cc.data_ptr<double>();
  for (int64_t i = 0; i < cc.numel(); ++i) {
    TORCH_CHECK_VALUE(std::isfinite(cd[i]), "coef: non-finite coefficient at flat index ", i);
  }
}

// Per-sample thresholding scales s = clamp(quantile(|y|, ratio), lo, hi).
template <typename S, typename H, typename T>
void threshold_scales(const dpm_cpu::StepPtrs<S, H>& p, int64_t nb, int64_t n, const std::vector<dpm::Coef<T>>& rows,
                      double ratio, double lo, double hi, std::vector<T>& s) {
  auto one = [&](int64_t b) {
    const dpm::Coef<T>& c = rows[rows.size() == 1 ? 0 : b];
    const int64_t base = b * n;
    auto fill = [&](int64_t i, int len, T* y) DPM_CPU_LAMBDA_INLINE { dpm_cpu::convert_block(p, base + i, len, c, y); };
    const T q = dpm_cpu::sample_quantile<T>(n, ratio, fill);
    s[b] = dpm::threshold_scale(q, static_cast<T>(lo), static_cast<T>(hi));
  };
  // Across samples when that balances the threads; else sample by sample, each selection parallel inside
  // (an at::parallel_for nested in a parallel region runs inline, so `one` serves both).
  const int64_t nt = at::get_num_threads();
  if (nb > 1 && (n <= dpm_cpu::kGatherMax || nb % nt == 0 || nb >= 4 * nt)) {
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) one(b);
    });
  } else {
    for (int64_t b = 0; b < nb; ++b) one(b);
  }
}

template <typename S, typename H>
void run(const dpm_cpu::StepPtrs<S, H>& p, int64_t nb, int64_t n, const at::Tensor& coef, bool threshold,
         double ratio, double lo, double hi) {
  using T = at::opmath_type<S>;
  const at::Tensor cc = coef.contiguous();
  const double* cd = cc.data_ptr<double>();
  std::vector<dpm::Coef<T>> rows(coef.dim() == 2 ? nb : 1);
  for (size_t r = 0; r < rows.size(); ++r) rows[r] = dpm::load_coef<T>(cd + r * dpm::NCOEF);
  std::vector<T> s;
  if (threshold) {
    s.assign(nb, T(1));
    threshold_scales<S, H, T>(p, nb, n, rows, ratio, lo, hi, s);
  }
  at::parallel_for(0, nb * n, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    while (begin < end) {  // split at sample boundaries: one coefficient row and one scale per piece
      const int64_t b = begin / n;
      const int64_t stop = std::min(end, (b + 1) * n);
      dpm_cpu::step_range<S, H, T>(p, begin, stop, rows[rows.size() == 1 ? 0 : b], threshold,
                                threshold ? s[b] : T(1));
      begin = stop;
    }
  });
}

void fused_step_cpu(const at::Tensor& x, const at::Tensor& model_out, const OptTensor& model_cond,
                    const OptTensor& x_eval, const OptTensor& hist1, const OptTensor& hist2, const OptTensor& noise,
                    const at::Tensor& coef, int64_t cfg, bool threshold, double thr_ratio, double thr_min,
                    double thr_max, const at::Tensor& out, const OptTensor& hist_out) {
  check_args(x, model_out, model_cond, x_eval, hist1, hist2, noise, coef, cfg, threshold, thr_ratio, thr_min,
             thr_max, out, hist_out);
  const int64_t nb = x.size(0);
  if (x.numel() == 0) return;
  const int64_t n = x.numel() / nb;
  // Strided inputs are read through contiguous copies, strided outputs written through contiguous
  // temporaries copied back at the end (after every input was read: out may be x or x_eval).
  auto contig = [](const OptTensor& t) { return present(t) ? t->contiguous() : at::Tensor(); };
  const at::Tensor xc = x.contiguous(), moc = model_out.contiguous(), mcc = contig(model_cond),
                   xec = contig(x_eval), h1c = contig(hist1), h2c = contig(hist2), zc = contig(noise);
  const at::Tensor* ho = present(hist_out);
  at::Tensor oc = out.is_contiguous() ? out : at::empty_like(out, at::MemoryFormat::Contiguous);
  at::Tensor hoc;
  if (ho != nullptr) hoc = ho->is_contiguous() ? *ho : at::empty_like(*ho, at::MemoryFormat::Contiguous);

  const bool float_history = is_half(x.scalar_type()) && history_dtype(x.scalar_type(), hist1, hist2, hist_out) ==
                                                            at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_step_cpu", [&] {
    auto launch = [&](auto history_zero) {
      using H = decltype(history_zero);
      auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
      auto hptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<H>() : nullptr; };
      dpm_cpu::StepPtrs<scalar_t, H> p;
      p.x = ptr(xc);
      p.xe = xec.defined() ? ptr(xec) : p.x;
      p.uncond = ptr(moc);
      p.cond = cfg == dpm::CFG_PAIR ? ptr(mcc) : cfg == dpm::CFG_STACKED ? p.uncond + nb * n : nullptr;
      p.h1 = hptr(h1c);
      p.h2 = hptr(h2c);
      p.z = ptr(zc);
      p.out = oc.mutable_data_ptr<scalar_t>();
      p.hout = hoc.defined() ? hoc.mutable_data_ptr<H>() : nullptr;
      run<scalar_t, H>(p, nb, n, coef, threshold, thr_ratio, thr_min, thr_max);
    };
    if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
      if (float_history) return launch(float());
    }
    launch(scalar_t());
  });
  if (!oc.is_same(out)) out.copy_(oc);
  if (ho != nullptr && !hoc.is_same(*ho)) ho->copy_(hoc);
}

}  // namespace

TORCH_LIBRARY_IMPL(dpm_kernels, CPU, m) { m.impl("fused_step", &fused_step_cpu); }

#ifdef DPM_KERNELS_PYMODULE
// Ahead-of-time build (setup.py): `import dpm_kernels._cpu` loads this library, which registers the kernel
// above; the module itself is empty.
#include <Python.h>

#define DPM_CAT_(a, b) a##b
#define DPM_CAT(a, b) DPM_CAT_(a, b)
#define DPM_STR_(a) #a
#define DPM_STR(a) DPM_STR_(a)

extern "C" PyMODINIT_FUNC DPM_CAT(PyInit_, DPM_KERNELS_PYMODULE)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, DPM_STR(DPM_KERNELS_PYMODULE), nullptr, -1, nullptr,
                             nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
#endif
