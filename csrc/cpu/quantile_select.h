// Per-sample quantile of |y| for dynamic thresholding (CPU): torch.quantile's 'linear' interpolation
// between order statistics k and k + 1, found by an O(n) most-significant-digit radix select.
//
// Keys are dpm::abs_key(y): the bits of |y| as an unsigned integer, monotone in |y| with NaN above +inf,
// which is the order torch.sort gives. y is never stored: each pass recomputes it from the inputs (a pass
// reads the step's inputs once, cheaper than writing and re-reading a float buffer of y).
//
// Each pass either
//   - histograms the next digit (16 bits) of the keys that share the prefix found so far with the target
//     order statistic, then descends into the bucket that holds it; or
//   - once that group is small (kGatherMax), gathers its keys and finishes with std::nth_element.
// float keys have 31 bits: at most two histogram passes pin a key exactly, so the worst case (ties, all
// values in one bucket) stays linear. double keys have 63 bits: at most four.
// Counts are integers and the answer is a key value, so the result does not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

#include "dpm_math.h"
#include "step_kernel.h"

namespace dpm_cpu {

constexpr int64_t kGatherMax = int64_t(1) << 15;  // nth_element on at most this many keys
constexpr int kDigitBits = 16;
constexpr int64_t kSelectGrain = int64_t(1) << 15;  // elements per thread, at least, within one sample
constexpr int64_t kMaxLocal = int64_t(1) << 31;

// The keys sharing the top `known` bits `prefix` with order statistic `rank` form a group of `count` keys
// whose ranks start at `below`.
template <typename Key>
struct Group {
  Key prefix;
  int64_t below;
  int64_t count;
};

// Descend from group `g` into the bucket of histogram `h` (its keys' next digit) holding rank `rank`.
template <typename Key>
Group<Key> descend(const Group<Key>& g, const std::vector<int64_t>& h, int bits, int64_t rank) {
  int64_t below = g.below;
  size_t d = 0;
  while (below + h[d] <= rank) below += h[d++];
  return Group<Key>{static_cast<Key>((g.prefix << bits) | static_cast<Key>(d)), below, h[d]};
}

// fill(i, len, y): y (arithmetic type T) of the sample's elements [i, i + len), len <= kBlock.
// Visits every key of the sample, in parallel chunks when not already inside a parallel region;
// visit(local_state, key), merge(local_state) under a lock.
template <typename T, typename Fill, typename MakeLocal, typename Visit, typename Merge>
void for_each_key(int64_t n, const Fill& fill, const MakeLocal& make_local, const Visit& visit, const Merge& merge) {
  std::mutex mu;
  at::parallel_for(0, n, kSelectGrain, [&](int64_t b0, int64_t b1) {
    // Local histograms count in uint32 (half the cache footprint): merge before they could overflow.
    for (int64_t s0 = b0; s0 < b1; s0 += kMaxLocal) {
      const int64_t s1 = std::min(b1, s0 + kMaxLocal);
      auto local = make_local();
      T y[kBlock];
      for (int64_t i = s0; i < s1; i += kBlock) {
        const int len = static_cast<int>(std::min<int64_t>(kBlock, s1 - i));
        fill(i, len, y);
        for (int j = 0; j < len; ++j) visit(local, dpm::abs_key(y[j]));
      }
      std::lock_guard<std::mutex> lock(mu);
      merge(local);
    }
  });
}

// The key of order statistics k1 and k2 = k1 + 1 (or k1 when k1 is the last) among the n keys.
template <typename T, typename Fill>
void select_keys(int64_t n, int64_t k1, int64_t k2, const Fill& fill, decltype(dpm::abs_key(T()))& v1,
                 decltype(dpm::abs_key(T()))& v2) {
  using Key = decltype(dpm::abs_key(T()));
  constexpr int kKeyBits = sizeof(Key) * 8 - 1;  // the sign bit is always clear
  Group<Key> g1{0, 0, n}, g2{0, 0, n};
  int known = 0;
  while (known < kKeyBits) {
    const bool same = g1.prefix == g2.prefix;
    const int gshift = kKeyBits - known;  // key >> gshift is a key's group prefix (<= 63: defined)
    const Key p1 = g1.prefix, p2 = g2.prefix;
    if (g1.count + (same ? 0 : g2.count) <= kGatherMax) {
      // Consecutive ranks k1, k2 in two groups means k1 ends group 1 and k2 starts group 2, so the
      // gathered keys hold exactly the ranks g1.below, g1.below + 1, ...
      std::vector<Key> cand;
      cand.reserve(static_cast<size_t>(g1.count + (same ? 0 : g2.count)));
      for_each_key<T>(
          n, fill, [] { return std::vector<Key>(); },
          [&](std::vector<Key>& loc, Key key) {
            const Key g = key >> gshift;
            if (g == p1 || g == p2) loc.push_back(key);
          },
          [&](std::vector<Key>& loc) { cand.insert(cand.end(), loc.begin(), loc.end()); });
      const auto at = cand.begin() + (k1 - g1.below);
      std::nth_element(cand.begin(), at, cand.end());
      v1 = *at;
      v2 = k2 == k1 ? v1 : *std::min_element(at + 1, cand.end());
      return;
    }
    const int bits = std::min(kDigitBits, kKeyBits - known);
    const int shift = gshift - bits;
    const Key mask = static_cast<Key>((Key(1) << bits) - 1);
    const size_t nb = size_t(1) << bits;
    std::vector<int64_t> h1(nb, 0), h2(same ? 0 : nb, 0);
    struct Local {
      std::vector<uint32_t> c1, c2;
    };
    for_each_key<T>(
        n, fill, [&] { return Local{std::vector<uint32_t>(nb, 0), std::vector<uint32_t>(same ? 0 : nb, 0)}; },
        [&](Local& loc, Key key) {
          const Key g = key >> gshift;
          const size_t d = static_cast<size_t>((key >> shift) & mask);
          if (g == p1) {
            ++loc.c1[d];
          } else if (g == p2) {
            ++loc.c2[d];
          }
        },
        [&](Local& loc) {
          for (size_t d = 0; d < nb; ++d) h1[d] += loc.c1[d];
          for (size_t d = 0; d < loc.c2.size(); ++d) h2[d] += loc.c2[d];
        });
    g1 = descend(g1, h1, bits, k1);
    g2 = descend(g2, same ? h1 : h2, bits, k2);
    known += bits;
  }
  // Every bit is known: the groups are sets of equal keys.
  v1 = g1.prefix;
  v2 = g2.prefix;
}

// quantile(|y|, ratio) of one sample of n >= 1 elements, exactly as torch.quantile (rank in double,
// interpolation in T with torch.lerp's formula).
template <typename T, typename Fill>
T sample_quantile(int64_t n, double ratio, const Fill& fill) {
  const dpm::QuantileRank r = dpm::quantile_rank(n, ratio);
  decltype(dpm::abs_key(T())) v1, v2;
  select_keys<T>(n, r.k, std::min(r.k + 1, n - 1), fill, v1, v2);
  return dpm::lerp_torch(dpm::key_value(v1), dpm::key_value(v2), static_cast<T>(r.w));
}

}  // namespace dpm_cpu
