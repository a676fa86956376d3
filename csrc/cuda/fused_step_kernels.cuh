// C ABI of the CUDA fused-step kernels: plain pointers, sizes, flags and a stream; no torch headers.
//
// Keeping the kernels behind this interface lets `nvcc` compile (and ptxas check) them on a machine
// without CUDA PyTorch; fused_step_binding.cpp is the only file that sees both worlds.
//
// Every tensor is dense row-major over [B, n] (n = elements per sample) and has the storage dtype
// `dtype`, except the history tensors (hist1, hist2, hist3, hist_out), which share `hist_dtype`: `dtype`
// itself, or DPM_F32 when `dtype` is DPM_F16 / DPM_BF16 (mixed precision: half samples, float32 history; m
// is rounded once, from the float32 arithmetic, to the history dtype). model_out is [2B, n] = [uncond, cond]
// with cfg == 2 (stacked) and [3B, n] = [uncond, cond, perturbed] with cfg == 3 (stacked3).
// Semantics: dpm_kernels/layout.py, csrc/dpm_math.h.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum DpmDtype { DPM_F16 = 0, DPM_BF16 = 1, DPM_F32 = 2, DPM_F64 = 3 };

typedef struct DpmStepArgs {
  int dtype;          // DpmDtype of every tensor below but the history
  int hist_dtype;     // DpmDtype of hist1-3, hist_out: dtype, or DPM_F32 with a DPM_F16/DPM_BF16 dtype
  int64_t batch;      // B
  int64_t numel;      // n: elements per sample
  const void* x;           // [B, n]
  const void* model_out;   // [B, n], [2B, n] when cfg == 2 (stacked), [3B, n] when cfg == 3 (stacked3)
  const void* model_cond;  // [B, n] when cfg == 1 (pair), else NULL
  const void* x_eval;      // [B, n] or NULL (then x)
  const void* hist1;       // [B, n] or NULL (hist_dtype)
  const void* hist2;       // [B, n] or NULL (hist_dtype; NULL when hist1 is)
  const void* hist3;       // [B, n] or NULL (hist_dtype; NULL when hist2 is)
  const void* noise;       // [B, n] or NULL
  const double* coef;      // device float64: [NCOEF] (coef_per_sample == 0) or [B, NCOEF]
  int coef_per_sample;
  int cfg;                 // 0 none, 1 pair, 2 stacked, 3 stacked3 (dpm::CfgMode)
  int threshold;           // dynamic thresholding on/off
  double thr_ratio;        // quantile in [0, 1]
  double thr_min;          // s = clamp(quantile, thr_min, thr_max)
  double thr_max;
  void* out;               // [B, n]; may be x or x_eval itself, nothing else read
  void* hist_out;          // [B, n] or NULL (hist_dtype)
} DpmStepArgs;

// Bytes of device scratch that dpm_cuda_fused_step needs; depends only on the shapes, dtype and flag.
// 0 without thresholding. Any 16-byte aligned buffer of that size works; its contents need no init.
size_t dpm_cuda_fused_step_workspace_bytes(int64_t batch, int64_t numel, int dtype, int threshold);

// Enqueue one fused step on `stream` (no host synchronisation, capturable in a CUDA graph).
// `num_sms` is the device's multiprocessor count (<= 0: queried from the current device).
// Returns cudaSuccess, cudaErrorInvalidValue for bad arguments (nothing enqueued; among them a dtype /
// hist_dtype pair not listed above), or a launch error.
cudaError_t dpm_cuda_fused_step(const DpmStepArgs* args, void* workspace, size_t workspace_bytes, int num_sms,
                                cudaStream_t stream);

#ifdef __cplusplus
}
#endif
