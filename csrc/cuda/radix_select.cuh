// Radix selection of two adjacent order statistics of |y| per sample (torch.quantile 'linear').
//
// Keys are dpm::abs_key(y): the bits of |y| read as an unsigned integer, monotone in |y| with NaN above
// +inf (torch.sort's order). Selecting the rank-k key digit by digit from the top: each pass histograms
// the next digit of the keys that share the prefix chosen so far, and the bin holding rank k (counted
// within that prefix) extends the prefix. Two targets run together, k0 = k and k1 = min(k + 1, n - 1):
// while their prefixes agree one histogram serves both; once they differ the key sets are disjoint
// (k0 < k1) and each gets its own histogram. Ties need nothing special: equal keys share every bin.
//
// The state machine below is __host__ __device__ (DPM_HD) so the host check in
// tests/test_cuda_compile.py can replay it against std::sort.
#pragma once

#include <stdint.h>

#include "dpm_math.h"

namespace dpm_cuda {

constexpr int kBins = 2048;  // 11-bit digits at most

// Digit schedule: abs_key clears the top bit, so 32-bit keys have 31 significant bits (11 + 10 + 10,
// 3 passes) and 64-bit keys 63 (11 + 11 + 11 + 10 + 10 + 10, 6 passes).
template <typename K>
struct Digits {
  static constexpr int kBitsTotal = static_cast<int>(8 * sizeof(K)) - 1;
  static constexpr int kPasses = (kBitsTotal + 10) / 11;
  static constexpr int kWide = kBitsTotal - 10 * kPasses;  // passes with 11 bits, then 10-bit ones
  DPM_HD static int bits(int pass) { return pass < kWide ? 11 : 10; }
  DPM_HD static int shift(int pass) {
    int s = kBitsTotal;
    for (int q = 0; q <= pass; ++q) s -= bits(q);
    return s;
  }
};

struct SelectState {
  uint64_t prefix[2];  // key bits fixed so far (lower bits zero); the full keys after the last pass
  uint64_t rank[2];    // rank of each target among the keys that share its prefix
};

DPM_HD SelectState select_init(uint64_t k0, uint64_t k1) {
  SelectState s;
  s.prefix[0] = s.prefix[1] = 0;
  s.rank[0] = k0;
  s.rank[1] = k1;
  return s;
}

DPM_HD bool select_diverged(const SelectState& s) { return s.prefix[0] != s.prefix[1]; }

// Where pass `pass` reads its digit: bits [shift, shift + bits) of the key. Computed once per pass.
struct DigitPos {
  int shift, bits;
};

template <typename K>
DPM_HD DigitPos digit_pos(int pass) {
  DigitPos p;
  p.shift = Digits<K>::shift(pass);
  p.bits = Digits<K>::bits(pass);
  return p;
}

// Histogram slot of `key` in a pass: slot * kBins + digit, or -1 when it shares neither prefix.
// Target 1 has a histogram of its own only once diverged.
template <typename K>
DPM_HD int select_slot(const SelectState& s, bool diverged, DigitPos pos, K key) {
  const int hi = pos.shift + pos.bits;  // <= 63: the shifts below are defined
  const uint64_t k = static_cast<uint64_t>(key);
  const int digit = static_cast<int>((k >> pos.shift) & static_cast<uint64_t>((1 << pos.bits) - 1));
  const uint64_t top = k >> hi;
  if (top == (s.prefix[0] >> hi)) return digit;
  if (diverged && top == (s.prefix[1] >> hi)) return kBins + digit;
  return -1;
}

// The target's state after pass `pass` chose `bin`, with `below` keys of its prefix in lower bins.
template <typename K>
DPM_HD void select_advance(uint64_t& prefix, uint64_t& rank, int pass, int bin, uint64_t below) {
  prefix |= static_cast<uint64_t>(bin) << Digits<K>::shift(pass);
  rank -= below;
}

// Serial bin search (the host check's and the device's reference): the bin whose cumulative count
// first exceeds rank r, and the count below it.
template <typename C>
DPM_HD int find_bin_serial(const C* h, uint64_t r, uint64_t& below) {
  uint64_t acc = 0;
  for (int i = 0; i < kBins; ++i) {
    const uint64_t c = static_cast<uint64_t>(h[i]);
    if (r < acc + c) {
      below = acc;
      return i;
    }
    acc += c;
  }
  below = acc;  // inconsistent counts (cannot happen): an in-range, finite answer rather than a fault
  return kBins - 1;
}

// s = threshold_scale(lerp_torch(v[k0], v[k1], w, w1), lo, hi) from the two selected full keys.
template <typename K>
DPM_HD auto select_scale(const SelectState& s, double w, double w1, double lo, double hi)
    -> decltype(dpm::key_value(static_cast<K>(0))) {
  using T = decltype(dpm::key_value(static_cast<K>(0)));
  const T v0 = dpm::key_value(static_cast<K>(s.prefix[0]));
  const T v1 = dpm::key_value(static_cast<K>(s.prefix[1]));
  return dpm::threshold_scale(dpm::lerp_torch(v0, v1, w, w1), static_cast<T>(lo), static_cast<T>(hi));
}

#if defined(__CUDACC__)
// One warp finds find_bin_serial's answer: lanes own 64 consecutive bins, sum them (read rotated by
// lane so shared-memory reads hit 32 distinct banks), scan the sums, and the lane whose range holds r
// walks its bins. Every lane of the warp must call it; all get the result.
template <typename C>
__device__ __forceinline__ int warp_find_bin(const C* h, uint64_t r, uint64_t& below) {
  constexpr int kPer = kBins / 32;
  const int lane = threadIdx.x & 31;
  const C* mine = h + lane * kPer;
  uint64_t sum = 0;
#pragma unroll 16
  for (int j = 0; j < kPer; ++j) sum += static_cast<uint64_t>(mine[(j + lane) & (kPer - 1)]);
  uint64_t incl = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint64_t v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  const uint64_t excl = incl - sum;
  const unsigned owners = __ballot_sync(0xffffffffu, excl <= r && r < incl);
  const int src = owners != 0u ? __ffs(owners) - 1 : 31;
  int bin = kBins - 1;
  uint64_t acc = excl;
  if (lane == src) {
    for (int j = 0; j < kPer; ++j) {
      const uint64_t c = static_cast<uint64_t>(mine[j]);
      if (r < acc + c) {
        bin = lane * kPer + j;
        break;
      }
      acc += c;
    }
  }
  below = __shfl_sync(0xffffffffu, acc, src);
  return __shfl_sync(0xffffffffu, bin, src);
}

// Warps 0 and 1 advance targets 0 and 1 from `prev` with the histograms of pass `pass` (h1 is read
// only once the targets diverged) and write the new state to `dst` (shared memory). Called by the
// whole block; the caller synchronises before anyone reads dst.
template <typename K, typename C>
__device__ __forceinline__ void warps_advance(SelectState* dst, const SelectState& prev, const C* h0, const C* h1,
                                              int pass) {
  const int warp = threadIdx.x >> 5;
  if (warp >= 2) return;
  const bool own = warp == 1 && select_diverged(prev);
  uint64_t prefix = warp == 0 ? prev.prefix[0] : prev.prefix[1];
  uint64_t rank = warp == 0 ? prev.rank[0] : prev.rank[1];
  uint64_t below = 0;
  const int bin = warp_find_bin(own ? h1 : h0, rank, below);
  select_advance<K>(prefix, rank, pass, bin, below);
  if ((threadIdx.x & 31) == 0) {
    dst->prefix[warp] = prefix;
    dst->rank[warp] = rank;
  }
}

// Add one key's slot to a shared histogram. When the whole warp hits the same slot (constant or
// clustered data) one atomic adds 32 instead of 32 serialised ones. Every lane must call it.
__device__ __forceinline__ void hist_add(uint32_t* hist, int slot) {
  const int lead = __shfl_sync(0xffffffffu, slot, 0);
  if (__all_sync(0xffffffffu, slot == lead)) {
    if ((threadIdx.x & 31) == 0 && lead >= 0) atomicAdd(&hist[lead], 32u);
  } else if (slot >= 0) {
    atomicAdd(&hist[slot], 1u);
  }
}
#endif

}  // namespace dpm_cuda
