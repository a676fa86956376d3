// CUDA implementation of dpm_kernels::fused_step for the dispatcher (schema: dpm_kernels/opdef.py).
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
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <optional>

#include "fused_step_checks.h"
#include "fused_step_kernels.cuh"

namespace {

using dpm_checks::history_dtype;
using dpm_checks::OptTensor;
using dpm_checks::present;

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

void fused_step_cuda(const at::Tensor& x, const at::Tensor& model_out, const OptTensor& model_cond,
                     const OptTensor& x_eval, const OptTensor& hist1, const OptTensor& hist2, const OptTensor& hist3,
                     const OptTensor& noise, const at::Tensor& coef, int64_t cfg, bool threshold, double thr_ratio,
                     double thr_min, double thr_max, const at::Tensor& out, const OptTensor& hist_out) {
  dpm_checks::check_step_args(x, model_out, model_cond, x_eval, hist1, hist2, hist3, noise, coef, cfg, threshold,
                              thr_ratio, thr_min, thr_max, out, hist_out, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t nb = x.size(0);
  if (x.numel() == 0) return;
  const int64_t n = x.numel() / nb;

  // Strided inputs are read through contiguous copies and strided outputs written through contiguous
  // temporaries, copied back after the kernels (which have read every input by then: out may be x).
  auto contig = [](const OptTensor& t) { return present(t) != nullptr ? t->contiguous() : at::Tensor(); };
  const at::Tensor xc = x.contiguous(), moc = model_out.contiguous(), cc = coef.contiguous();
  const at::Tensor mcc = contig(model_cond), xec = contig(x_eval), h1c = contig(hist1), h2c = contig(hist2),
                   h3c = contig(hist3), zc = contig(noise);
  const at::Tensor* ho = present(hist_out);
  const at::Tensor oc = out.is_contiguous() ? out : at::empty_like(out, at::MemoryFormat::Contiguous);
  at::Tensor hoc;
  if (ho != nullptr) hoc = ho->is_contiguous() ? *ho : at::empty_like(*ho, at::MemoryFormat::Contiguous);

  auto ptr = [](const at::Tensor& t) -> const void* { return t.defined() ? t.const_data_ptr() : nullptr; };
  DpmStepArgs a{};
  a.dtype = dtype_code(x.scalar_type());
  // check_args: every present history tensor has this dtype (x's, or float32 for a half x)
  a.hist_dtype = dtype_code(history_dtype(x.scalar_type(), hist1, hist2, hist3, hist_out));
  a.batch = nb;
  a.numel = n;
  a.x = ptr(xc);
  a.model_out = ptr(moc);
  a.model_cond = ptr(mcc);
  a.x_eval = ptr(xec);
  a.hist1 = ptr(h1c);
  a.hist2 = ptr(h2c);
  a.hist3 = ptr(h3c);
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
  // A CUDA error's message is formatted inside libc10_cuda (c10_cuda_check_implementation), not in this file's
  // code, so it stays clear of the iostream problem error_text.h avoids; it keeps torch's exception type and
  // device-side assertion report.
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  C10_CUDA_CHECK(dpm_cuda_fused_step(&a, ws.defined() ? ws.mutable_data_ptr() : nullptr, ws_bytes, sms,
                                     c10::cuda::getCurrentCUDAStream().stream()));
  if (!oc.is_same(out)) out.copy_(oc);
  if (ho != nullptr && !hoc.is_same(*ho)) ho->copy_(hoc);
}

}  // namespace

TORCH_LIBRARY_IMPL(dpm_kernels, CUDA, m) { m.impl("fused_step", &fused_step_cuda); }

#include "pymodule_stub.h"
