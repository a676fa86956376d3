"""The per-step coefficient row shared by every backend (mirrored by `csrc/dpm_math.h`, `enum CoefIndex`).

A fused step is, per element (docs/math.md; `csrc/dpm_math.h` has the formulas):

    raw = model_out                                   (no guidance)
        | uncond + GUIDE * (cond - uncond)            (classifier-free guidance: pair, stacked)
        | uncond + GUIDE * (cond - uncond) + GUIDE2 * (cond - perturbed)     (stacked3: CFG + perturbed attention)
    y   = PX * x_eval + PM * raw                      (conversion to the solver's prediction, or to x0)
    if thresholding:  y = clamp(y, -s, s) / s;  y = QX * x_eval + QM * y     (s: per-sample quantile)
    m   = y                                           (written to hist_out)
    out = A * x + C0 * m + C1 * hist1 + C2 * hist2 + C3 * hist3 + CN * noise

The row is float64 on the host and on the device; kernels read it once per program and compute in float32
(float64 for float64 tensors). A coefficient tensor is [NCOEF] (one row for the batch) or [B, NCOEF]
(one row per sample: per-sample times). Slots added later sit at the end, so earlier indices never move.
"""

GUIDE = 0
PX = 1
PM = 2
QX = 3
QM = 4
A = 5
C0 = 6
C1 = 7
C2 = 8
CN = 9
C3 = 10
GUIDE2 = 11
NCOEF = 12

NAMES = ("guide", "px", "pm", "qx", "qm", "a", "c0", "c1", "c2", "cn", "c3", "guide2")
C_SLOTS = (C0, C1, C2, C3)  # the weight of m, hist1, hist2, hist3 (newest output first)

# guidance layouts of the raw model output
CFG_NONE = 0  # model_out is the prediction
CFG_PAIR = 1  # model_out = uncond, model_cond = cond, both [B, ...]
CFG_STACKED = 2  # model_out = cat([uncond, cond]) along dim 0: [2B, ...] (the authors' and diffusers' order)
CFG_STACKED3 = 3  # model_out = cat([uncond, cond, perturbed]) along dim 0: [3B, ...] (diffusers' PAG pipelines, Sana)
CFG_MODES = {"none": CFG_NONE, "pair": CFG_PAIR, "stacked": CFG_STACKED, "stacked3": CFG_STACKED3}
CFG_ROWS = {CFG_NONE: 1, CFG_PAIR: 1, CFG_STACKED: 2, CFG_STACKED3: 3}  # model_out's leading dim, in batches B
