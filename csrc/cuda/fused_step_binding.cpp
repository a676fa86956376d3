// CUDA implementation of dpm_kernels::fused_step for the dispatcher (schema: dpm_kernels/ops.py).
//
// The thin torch side: check the arguments (every check before any write, messages start with the
// argument's name), stage strided tensors through contiguous ones, take the workspace from the caching
// allocator, and enqueue the torch-free kernels (fused_step_kernels.cuh) on the current stream of x's
// device. Nothing here synchronises with the host, so steps can be captured in a CUDA graph; for the
// same reason coefficient values (device memory) are not checked here: the planner or the eager Python
// entry point checks them.
//
// Only c10/cuda headers on the CUDA side: ATen/cuda/CUDAContext.h would pull in cuSPARSE/cuBLAS/cuSOLVER
// headers, which a minimal CUDA toolkit (nvcc + cudart, e.g. from pip) lacks. c10::cuda's current stream
// is the one at::cuda::getCurrentCUDAStream() returns.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include "fused_step_kernels.cuh"

namespace {

using OptTensor = std::optional<at::Tensor>;

constexpr int64_t kNcoef = 10;  // dpm::NCOEF (dpm_kernels/layout.py)
constexpr int64_t kCfgNone = 0, kCfgPair = 1, kCfgStacked = 2;

const at::Tensor* present(const OptTensor& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return DPM_F16;
    case at::kBFloat16:
      return DPM_BF16;
    case at::kFloat:
      return DPM_F32;
    case at::kDouble:
      return DPM_F64;
    default:
      return -1;
  }
}

// The dtype the history tensors (hist1, hist2, hist_out) must share, as ops.history_dtype: the first
// present one's when it is x's or float32 for a float16/bfloat16 x, else x's (the check then names it).
at::ScalarType history_dtype(at::ScalarType x, std::initializer_list<const at::Tensor*> hist) {
  for (const at::Tensor* t : hist) {
    if (t == nullptr) continue;
    const at::ScalarType h = t->scalar_type();
    const bool ok = h == x || (h == at::kFloat && (x == at::kHalf || x == at::kBFloat16));
    return ok ? h : x;
  }
  return x;
}

bool is_history(const char* name) {
  return std::strcmp(name, "hist1") == 0 || std::strcmp(name, "hist2") == 0 || std::strcmp(name, "hist_out") == 0;
}

// Conservative intersection of the byte spans of two views (as ops._overlap): metadata only.
bool spans_overlap(const at::Tensor& a, const at::Tensor& b) {
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

bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides();
}

void check_args(const at::Tensor& x, const at::Tensor& model_out, const OptTensor& model_cond,
                const OptTensor& x_eval, const OptTensor& hist1, const OptTensor& hist2, const OptTensor& noise,
                const at::Tensor& coef, int64_t cfg, bool threshold, double ratio, double lo, double hi,
                const at::Tensor& out, const OptTensor& hist_out) {
  TORCH_CHECK_TYPE(dtype_code(x.scalar_type()) >= 0, "x: expected float16, bfloat16, float32 or float64, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, "x: expected a tensor with a batch dimension, got a 0-d tensor");
  TORCH_CHECK_VALUE(x.is_cuda(), "x: the CUDA kernel got a tensor on ", x.device());
  TORCH_CHECK_VALUE(cfg == kCfgNone || cfg == kCfgPair || cfg == kCfgStacked,
                    "cfg: expected 0 (none), 1 (pair) or 2 (stacked), got ", cfg);
  const int64_t b = x.size(0);
  const at::ScalarType hist_dtype =
      history_dtype(x.scalar_type(), {present(hist1), present(hist2), present(hist_out)});
  const std::pair<const char*, const at::Tensor*> like_x[] = {
      {"model_out", &model_out}, {"model_cond", present(model_cond)}, {"x_eval", present(x_eval)},
      {"hist1", present(hist1)},  {"hist2", present(hist2)},           {"noise", present(noise)},
      {"out", &out},              {"hist_out", present(hist_out)}};
  for (const auto& [name, t] : like_x) {
    if (t == nullptr) continue;
    if (is_history(name)) {
      TORCH_CHECK_TYPE(t->scalar_type() == hist_dtype, name, ": dtype ", t->scalar_type(),
                       ": history tensors share one dtype, x's (", x.scalar_type(),
                       ") or float32 when x is float16/bfloat16");
    } else {
      TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), name, ": dtype ", t->scalar_type(),
                       " does not match x's dtype ", x.scalar_type());
    }
    TORCH_CHECK_VALUE(t->device() == x.device(), name, ": on device ", t->device(), ", but x is on ", x.device());
    std::vector<int64_t> want = x.sizes().vec();
    if (t == &model_out && cfg == kCfgStacked) want[0] = 2 * b;
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(want), name, ": shape ", t->sizes(),
                      " does not match the expected ", at::IntArrayRef(want));
  }
  TORCH_CHECK_VALUE(cfg != kCfgPair || present(model_cond) != nullptr,
                    "model_cond: cfg='pair' needs the conditional output in model_cond");
  TORCH_CHECK_VALUE(cfg == kCfgPair || present(model_cond) == nullptr, "model_cond: given, but cfg is not 'pair'");
  TORCH_CHECK_VALUE(present(hist2) == nullptr || present(hist1) != nullptr,
                    "hist2: given without hist1 (history entries are newest first)");
  TORCH_CHECK_TYPE(coef.scalar_type() == at::kDouble, "coef: expected float64 coefficients, got ", coef.scalar_type());
  TORCH_CHECK_VALUE(coef.device() == x.device(), "coef: on device ", coef.device(), ", but x is on ", x.device());
  TORCH_CHECK_VALUE((coef.dim() == 1 && coef.size(0) == kNcoef) ||
                        (coef.dim() == 2 && coef.size(0) == b && coef.size(1) == kNcoef),
                    "coef: expected shape (", kNcoef, ",) or (", b, ", ", kNcoef, "), got ", coef.sizes());
  if (threshold) {
    TORCH_CHECK_VALUE(ratio >= 0.0 && ratio <= 1.0, "thr_ratio: the thresholding quantile must lie in [0, 1], got ",
                      ratio);
    TORCH_CHECK_VALUE(lo > 0.0 && hi > 0.0, "thr_min: thresholding bounds must be > 0, got (", lo, ", ", hi, ")");
  }
  const std::pair<const char*, const at::Tensor*> inputs[] = {
      {"x", &x},           {"model_out", &model_out}, {"model_cond", present(model_cond)},
      {"x_eval", present(x_eval)}, {"hist1", present(hist1)}, {"hist2", present(hist2)},
      {"noise", present(noise)},   {"coef", &coef}};
  TORCH_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes, "out: has elements sharing memory");
  if (const at::Tensor* ho = present(hist_out)) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(*ho) != at::MemOverlap::Yes, "hist_out: has elements sharing memory");
    TORCH_CHECK_VALUE(!spans_overlap(*ho, out), "hist_out: overlaps out");
    for (const auto& [name, t] : inputs) {
      TORCH_CHECK_VALUE(t == nullptr || !spans_overlap(*ho, *t), "hist_out: overlaps ", name,
                        "; the history slot written must not be read");
    }
  }
  for (const auto& [name, t] : inputs) {
    if (t == nullptr) continue;
    const bool may_alias = (t == &x || t == present(x_eval)) && same_view(out, *t);
    TORCH_CHECK_VALUE(may_alias || !spans_overlap(out, *t), "out: overlaps ", name,
                      "; out may be x or x_eval itself, nothing else it reads");
  }
}

void fused_step_cuda(const at::Tensor& x, const at::Tensor& model_out, const OptTensor& model_cond,
                     const OptTensor& x_eval, const OptTensor& hist1, const OptTensor& hist2, const OptTensor& noise,
                     const at::Tensor& coef, int64_t cfg, bool threshold, double thr_ratio, double thr_min,
                     double thr_max, const at::Tensor& out, const OptTensor& hist_out) {
  check_args(x, model_out, model_cond, x_eval, hist1, hist2, noise, coef, cfg, threshold, thr_ratio, thr_min,
             thr_max, out, hist_out);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t nb = x.size(0);
  if (x.numel() == 0) return;
  const int64_t n = x.numel() / nb;

  // Strided inputs are read through contiguous copies and strided outputs written through contiguous
  // temporaries, copied back after the kernels (which have read every input by then: out may be x).
  auto contig = [](const OptTensor& t) { return present(t) != nullptr ? t->contiguous() : at::Tensor(); };
  const at::Tensor xc = x.contiguous(), moc = model_out.contiguous(), cc = coef.contiguous();
  const at::Tensor mcc = contig(model_cond), xec = contig(x_eval), h1c = contig(hist1), h2c = contig(hist2),
                   zc = contig(noise);
  const at::Tensor* ho = present(hist_out);
  const at::Tensor oc = out.is_contiguous() ? out : at::empty_like(out, at::MemoryFormat::Contiguous);
  at::Tensor hoc;
  if (ho != nullptr) hoc = ho->is_contiguous() ? *ho : at::empty_like(*ho, at::MemoryFormat::Contiguous);

  auto ptr = [](const at::Tensor& t) -> const void* { return t.defined() ? t.const_data_ptr() : nullptr; };
  DpmStepArgs a{};
  a.dtype = dtype_code(x.scalar_type());
  // check_args: every present history tensor has this dtype (x's, or float32 for a half x)
  a.hist_dtype = dtype_code(history_dtype(x.scalar_type(), {present(hist1), present(hist2), present(hist_out)}));
  a.batch = nb;
  a.numel = n;
  a.x = ptr(xc);
  a.model_out = ptr(moc);
  a.model_cond = ptr(mcc);
  a.x_eval = ptr(xec);
  a.hist1 = ptr(h1c);
  a.hist2 = ptr(h2c);
  a.noise = ptr(zc);
  a.coef = cc.const_data_ptr<double>();
  a.coef_per_sample = cc.dim() == 2 ? 1 : 0;
  a.cfg = static_cast<int>(cfg);
  a.threshold = threshold ? 1 : 0;
  a.thr_ratio = thr_ratio;
  a.thr_min = thr_min;
  a.thr_max = thr_max;
  a.out = oc.mutable_data_ptr();
  a.hist_out = hoc.defined() ? hoc.mutable_data_ptr() : nullptr;

  // Scratch from the caching allocator: stream-ordered, so it may be freed when this function returns.
  const size_t ws_bytes = dpm_cuda_fused_step_workspace_bytes(nb, n, a.dtype, a.threshold);
  at::Tensor ws;
  if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  C10_CUDA_CHECK(dpm_cuda_fused_step(&a, ws.defined() ? ws.mutable_data_ptr() : nullptr, ws_bytes, sms,
                                     c10::cuda::getCurrentCUDAStream().stream()));
  if (!oc.is_same(out)) out.copy_(oc);
  if (ho != nullptr && !hoc.is_same(*ho)) ho->copy_(hoc);
}

}  // namespace

TORCH_LIBRARY_IMPL(dpm_kernels, CUDA, m) { m.impl("fused_step", &fused_step_cuda); }

#ifdef DPM_KERNELS_PYMODULE
// Ahead-of-time build (setup.py): `import dpm_kernels._cuda` loads this library, whose static initialiser
// above registers the kernel; the Python module itself is empty.
#include <Python.h>

#define DPM_CUDA_CAT_(a, b) a##b
#define DPM_CUDA_CAT(a, b) DPM_CUDA_CAT_(a, b)
#define DPM_CUDA_STR_(a) #a
#define DPM_CUDA_STR(a) DPM_CUDA_STR_(a)

extern "C" PyMODINIT_FUNC DPM_CUDA_CAT(PyInit_, DPM_KERNELS_PYMODULE)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, DPM_CUDA_STR(DPM_KERNELS_PYMODULE), nullptr, -1, nullptr,
                            nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
#endif
