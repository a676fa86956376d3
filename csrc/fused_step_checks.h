// Argument checks of dpm_kernels::fused_step, shared by the CPU and the CUDA bindings.
//
// The same rules and messages as dpm_kernels/opdef.py `check_step_args` (messages start with the argument's
// name; TORCH_CHECK_TYPE / TORCH_CHECK_VALUE surface as TypeError / ValueError in Python), so the Python
// wrapper can leave these checks to the C++ ops. Every check runs before anything is written. Torch-side
// code (ATen headers); the kernels themselves stay torch-free.
//
// Every message is formatted by error_text.h into one C string (DPM_CHECK_VALUE / DPM_CHECK_TYPE), never by
// TORCH_CHECK's own joining of several parts, which goes through an ostringstream (error_text.h says why);
// tests/test_error_paths.py checks that no other TORCH_CHECK form appears in csrc/.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <cstdlib>
#include <optional>
#include <utility>
#include <vector>

#include "dpm_math.h"
#include "error_text.h"

#define DPM_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::dpm_text::Text(__VA_ARGS__).c_str())
#define DPM_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::dpm_text::Text(__VA_ARGS__).c_str())

namespace dpm_checks {

// Torch values as the parts error_text.h formats (a Device as d.str().c_str(): the temporary string lives until
// the check's throw has copied the message).
inline const char* dtype_name(at::ScalarType t) { return c10::toString(t); }
inline dpm_text::Dims dims(at::IntArrayRef s) { return {s.data(), static_cast<int64_t>(s.size())}; }

using OptTensor = std::optional<at::Tensor>;

inline const at::Tensor* present(const OptTensor& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

inline bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides();
}

// Whether the byte spans of two views intersect: conservative for strided views, metadata only, each
// tensor sized by its own element size (the history may be float32 beside half tensors).
inline bool overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) return false;
  auto span = [](const at::Tensor& t) {
    int64_t extent = 0;
    for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * std::abs(t.stride(d));
    const char* lo = static_cast<const char*>(t.data_ptr());
    return std::make_pair(lo, lo + (extent + 1) * static_cast<int64_t>(t.element_size()));
  };
  const auto sa = span(a), sb = span(b);
  return sa.first < sb.second && sb.first < sa.second;
}

inline bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

inline bool is_float(at::ScalarType t) { return is_half(t) || t == at::kFloat || t == at::kDouble; }

// The dtype history tensors (hist1, hist2, hist3, hist_out) share, as opdef.history_dtype: the first given one's
// when it is x's, or float32 for a float16/bfloat16 x; else x's (the check then names the offending tensor).
inline at::ScalarType history_dtype(at::ScalarType xt, const OptTensor& hist1, const OptTensor& hist2,
                                    const OptTensor& hist3, const OptTensor& hist_out) {
  for (const OptTensor* t : {&hist1, &hist2, &hist3, &hist_out}) {
    if (const at::Tensor* h = present(*t)) {
      const at::ScalarType ht = h->scalar_type();
      return ht == xt || (ht == at::kFloat && is_half(xt)) ? ht : xt;
    }
  }
  return xt;
}

// `device`: the device type the calling kernel serves. Coefficient values are checked only when they live
// in host memory (reading device memory would synchronise; the planner checks them where it computes them).
inline void check_step_args(const at::Tensor& x, const at::Tensor& model_out, const OptTensor& model_cond,
                            const OptTensor& x_eval, const OptTensor& hist1, const OptTensor& hist2,
                            const OptTensor& hist3, const OptTensor& noise, const at::Tensor& coef, int64_t cfg,
                            bool threshold, double ratio, double lo, double hi, const at::Tensor& out,
                            const OptTensor& hist_out, c10::DeviceType device) {
  const auto dt = x.scalar_type();
  DPM_CHECK_TYPE(is_float(dt), "x: expected float16, bfloat16, float32 or float64, got ", dtype_name(dt));
  DPM_CHECK_VALUE(x.dim() >= 1, "x: expected a tensor with a batch dimension, got a 0-d tensor");
  DPM_CHECK_VALUE(x.device().type() == device, "x: the ", c10::DeviceTypeName(device).c_str(),
                  " kernel got a tensor on ", x.device().str().c_str());
  DPM_CHECK_VALUE(dpm::valid_cfg(cfg), "cfg: expected 0 (none), 1 (pair), 2 (stacked) or 3 (stacked3), got ", cfg);
  const int64_t b = x.size(0);
  const auto hdt = history_dtype(dt, hist1, hist2, hist3, hist_out);
  const std::pair<const char*, const at::Tensor*> like_x[] = {
      {"model_out", &model_out}, {"model_cond", present(model_cond)}, {"x_eval", present(x_eval)},
      {"hist1", present(hist1)}, {"hist2", present(hist2)}, {"hist3", present(hist3)}, {"noise", present(noise)},
      {"out", &out}, {"hist_out", present(hist_out)}};
  for (const auto& [name, t] : like_x) {
    if (t == nullptr) continue;
    const bool history = t == present(hist1) || t == present(hist2) || t == present(hist3) || t == present(hist_out);
    if (history) {
      DPM_CHECK_TYPE(t->scalar_type() == hdt, name, ": dtype ", dtype_name(t->scalar_type()),
                     ": history tensors share one dtype, x's (", dtype_name(dt), ") or float32 when x is ",
                     "float16/bfloat16");
    } else {
      DPM_CHECK_TYPE(t->scalar_type() == dt, name, ": dtype ", dtype_name(t->scalar_type()),
                     " does not match x's dtype ", dtype_name(dt));
    }
    DPM_CHECK_VALUE(t->device() == x.device(), name, ": on device ", t->device().str().c_str(), ", but x is on ",
                    x.device().str().c_str());
    std::vector<int64_t> want = x.sizes().vec();
    if (t == &model_out) want[0] = dpm::cfg_rows(cfg) * b;
    DPM_CHECK_VALUE(t->sizes() == at::IntArrayRef(want), name, ": shape ", dims(t->sizes()),
                    " does not match the expected ", dims(want));
  }
  DPM_CHECK_VALUE(cfg != dpm::CFG_PAIR || present(model_cond),
                  "model_cond: cfg='pair' needs the conditional output in model_cond");
  DPM_CHECK_VALUE(cfg == dpm::CFG_PAIR || !present(model_cond), "model_cond: given, but cfg is not 'pair'");
  DPM_CHECK_VALUE(!present(hist2) || present(hist1), "hist2: given without hist1 (history entries are newest first)");
  DPM_CHECK_VALUE(!present(hist3) || present(hist2), "hist3: given without hist2 (history entries are newest first)");
  DPM_CHECK_TYPE(coef.scalar_type() == at::kDouble, "coef: expected float64 coefficients, got ",
                 dtype_name(coef.scalar_type()));
  DPM_CHECK_VALUE(coef.device() == x.device(), "coef: on device ", coef.device().str().c_str(), ", but x is on ",
                  x.device().str().c_str());
  DPM_CHECK_VALUE((coef.dim() == 1 && coef.size(0) == dpm::NCOEF) ||
                      (coef.dim() == 2 && coef.size(0) == b && coef.size(1) == dpm::NCOEF),
                  "coef: expected shape (", int(dpm::NCOEF), ",) or (", b, ", ", int(dpm::NCOEF), "), got ",
                  dims(coef.sizes()));
  if (threshold) {
    DPM_CHECK_VALUE(ratio >= 0.0 && ratio <= 1.0, "thr_ratio: the thresholding quantile must lie in [0, 1], got ",
                    ratio);
    DPM_CHECK_VALUE(lo > 0.0 && hi > 0.0, "thr_min: thresholding bounds must be > 0, got (", lo, ", ", hi, ")");
  }
  const std::pair<const char*, const at::Tensor*> inputs[] = {
      {"x", &x}, {"model_out", &model_out}, {"model_cond", present(model_cond)}, {"x_eval", present(x_eval)},
      {"hist1", present(hist1)}, {"hist2", present(hist2)}, {"hist3", present(hist3)}, {"noise", present(noise)},
      {"coef", &coef}};
  DPM_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes, "out: has elements sharing memory");
  if (const at::Tensor* ho = present(hist_out)) {
    DPM_CHECK_VALUE(at::has_internal_overlap(*ho) != at::MemOverlap::Yes, "hist_out: has elements sharing memory");
    DPM_CHECK_VALUE(!overlap(*ho, out), "hist_out: overlaps out");
    for (const auto& [name, t] : inputs) {
      DPM_CHECK_VALUE(t == nullptr || !overlap(*ho, *t), "hist_out: overlaps ", name,
                      "; the history slot written must not be read");
    }
  }
  for (const auto& [name, t] : inputs) {
    if (t == nullptr) continue;
    const bool may_alias = (t == &x || t == present(x_eval)) && same_view(out, *t);
    DPM_CHECK_VALUE(may_alias || !overlap(out, *t), "out: overlaps ", name,
                    "; out may be x or x_eval itself, nothing else it reads");
  }
  if (coef.device().is_cpu()) {
    const at::Tensor cc = coef.contiguous();
    const double* cd = cc.const_data_ptr<double>();
    for (int64_t i = 0; i < cc.numel(); ++i) {
      DPM_CHECK_VALUE(std::isfinite(cd[i]), "coef: non-finite coefficient at flat index ", i);
    }
  }
}

}  // namespace dpm_checks
