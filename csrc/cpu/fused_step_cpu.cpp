// CPU kernel of dpm_kernels::fused_step (schema: dpm_kernels/ops.py; math: csrc/dpm_math.h).
//
// One pass over memory for a plain step; with dynamic thresholding the per-sample quantile first needs a
// selection pass (rarely more) that reads only the inputs of y (quantile_select.h). Arithmetic in float for
// half/bfloat16/float tensors and in double for double tensors, stored in the input dtype; the history
// (hist1, hist2, hist3, hist_out) may be float32 for half/bfloat16 inputs.
// The schema is defined from Python, so this file registers only the CPU implementation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
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
#include "fused_step_checks.h"

namespace dpm_cpu {
template <>
struct StorageFormat<at::BFloat16> {
  static constexpr Fmt value = Fmt::kBF16;
};
template <>
struct StorageFormat<at::Half> {
  static constexpr Fmt value = Fmt::kF16;
};
}  // namespace dpm_cpu

namespace {

using dpm_checks::history_dtype;
using dpm_checks::is_half;
using dpm_checks::OptTensor;
using dpm_checks::present;

// Per-sample thresholding scales s = clamp(quantile(|y|, ratio), lo, hi).
template <typename S, typename H, typename T>
void threshold_scales(const dpm_cpu::StepPtrs<S, H>& p, int64_t nb, int64_t n, const std::vector<dpm::Coef<T>>& rows,
                      double ratio, double lo, double hi, int w, std::vector<T>& s) {
  auto one = [&](int64_t b) {
    const dpm::Coef<T>& c = rows[rows.size() == 1 ? 0 : b];
    const int64_t base = b * n;
    auto fill = [&](auto wc, int64_t i, int len, T* y) DPM_CPU_LAMBDA_INLINE {
      dpm_cpu::convert_range<decltype(wc)::value>(p, base + i, len, c, y);
    };
    const T q = dpm_cpu::sample_quantile<T>(n, ratio, w, fill);
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
  const int w = dpm_cpu::best_width();
  std::vector<T> s;
  if (threshold) {
    s.assign(nb, T(1));
    threshold_scales<S, H, T>(p, nb, n, rows, ratio, lo, hi, w, s);
  }
  at::parallel_for(0, nb * n, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    while (begin < end) {  // split at sample boundaries: one coefficient row and one scale per piece
      const int64_t b = begin / n;
      const int64_t stop = std::min(end, (b + 1) * n);
      dpm_cpu::step_range<S, H, T>(p, begin, stop, rows[rows.size() == 1 ? 0 : b], threshold,
                                threshold ? s[b] : T(1), w);
      begin = stop;
    }
  });
}

void fused_step_cpu(const at::Tensor& x, const at::Tensor& model_out, const OptTensor& model_cond,
                    const OptTensor& x_eval, const OptTensor& hist1, const OptTensor& hist2, const OptTensor& hist3,
                    const OptTensor& noise, const at::Tensor& coef, int64_t cfg, bool threshold, double thr_ratio,
                    double thr_min, double thr_max, const at::Tensor& out, const OptTensor& hist_out) {
  dpm_checks::check_step_args(x, model_out, model_cond, x_eval, hist1, hist2, hist3, noise, coef, cfg, threshold,
                              thr_ratio, thr_min, thr_max, out, hist_out, c10::DeviceType::CPU);
  const int64_t nb = x.size(0);
  if (x.numel() == 0) return;
  const int64_t n = x.numel() / nb;
  // Strided inputs are read through contiguous copies, strided outputs written through contiguous
  // temporaries copied back at the end (after every input was read: out may be x or x_eval).
  auto contig = [](const OptTensor& t) { return present(t) ? t->contiguous() : at::Tensor(); };
  const at::Tensor xc = x.contiguous(), moc = model_out.contiguous(), mcc = contig(model_cond),
                   xec = contig(x_eval), h1c = contig(hist1), h2c = contig(hist2), h3c = contig(hist3),
                   zc = contig(noise);
  const at::Tensor* ho = present(hist_out);
  at::Tensor oc = out.is_contiguous() ? out : at::empty_like(out, at::MemoryFormat::Contiguous);
  at::Tensor hoc;
  if (ho != nullptr) hoc = ho->is_contiguous() ? *ho : at::empty_like(*ho, at::MemoryFormat::Contiguous);

  const bool float_history =
      is_half(x.scalar_type()) && history_dtype(x.scalar_type(), hist1, hist2, hist3, hist_out) == at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_step_cpu", [&] {
    auto launch = [&](auto history_zero) {
      using H = decltype(history_zero);
      auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
      auto hptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<H>() : nullptr; };
      dpm_cpu::StepPtrs<scalar_t, H> p;
      p.x = ptr(xc);
      p.xe = xec.defined() ? ptr(xec) : p.x;
      p.uncond = ptr(moc);
      p.cond = cfg == dpm::CFG_PAIR ? ptr(mcc) : dpm::cfg_rows(cfg) > 1 ? p.uncond + nb * n : nullptr;
      p.perturbed = cfg == dpm::CFG_STACKED3 ? p.uncond + 2 * nb * n : nullptr;
      p.h1 = hptr(h1c);
      p.h2 = hptr(h2c);
      p.h3 = hptr(h3c);
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

#include "pymodule_stub.h"
