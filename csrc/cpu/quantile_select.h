// Per-sample quantile of |y| for dynamic thresholding (CPU): torch.quantile's 'linear' interpolation
// between order statistics k and k + 1, found by an O(n) most-significant-digit radix select.
//
// Keys are dpm::abs_key(y): the bits of |y| as an unsigned integer, monotone in |y| with NaN above +inf,
// which is the order torch.sort gives. y is never stored: each pass recomputes it from the inputs (a pass
// reads the step's inputs once, cheaper than writing and re-reading a buffer of y).
//
// Each pass either
//   - histograms the next digit (16 bits) of the keys that share the prefix found so far with the target
//     order statistic, then descends into the bucket that holds it; or
//   - once that group is small (kGatherMax), gathers its keys and finishes in memory (radix_select_in).
// float keys have 31 bits: at most two histogram passes pin a key exactly, so the worst case (ties, all
// values in one bucket) stays linear. double keys have 63 bits: at most four.
// Before those, one pass tries an interval of keys guessed from a strided sample: when it holds both ranks
// (nearly always) that pass is the only one; when it misses, the radix passes follow.
// Counts are integers and the answer is a key value, so the result does not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include "dpm_math.h"
#include "step_kernel.h"

namespace dpm_cpu {

constexpr int64_t kGatherMax = int64_t(1) << 15;  // groups of at most this many keys are selected in memory
constexpr int kDigitBits = 16;
constexpr int64_t kSelectGrain = int64_t(1) << 15;  // elements per thread, at least, within one sample
constexpr int64_t kMaxLocal = int64_t(1) << 31;     // uint32 local counts are merged before this many
constexpr bool kLittleEndian = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;

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

// The key of sorted position `at` among src[0, m): an MSD radix select in memory, 8-bit digits. Each pass
// histograms the next digit and copies the bucket holding the rank into `work` (branch-free; in place from the
// second copy on), so the work shrinks with the group and src is left as it was; nth_element finishes once few
// keys remain. No comparison-based partition of the whole group: those mispredict a branch on every other key.
template <typename Key>
Key radix_select_in(const Key* src, int64_t m, int64_t at, std::vector<Key>& work) {
  constexpr int kKeyBits = sizeof(Key) * 8 - 1;  // the sign bit is always clear
  constexpr int kBits = 8;
  work.resize(static_cast<size_t>(m));
  Key* const dst = work.data();
  const Key* k = src;
  int shift = kKeyBits;  // the keys in k[0, m) share their bits above `shift`
  while (m > 64 && shift > 0) {
    const int bits = std::min(kBits, shift);
    shift -= bits;
    const Key mask = static_cast<Key>((Key(1) << bits) - 1);
    // Four interleaved histograms: runs of keys in one bucket (the usual case: few exponents hold most keys)
    // would otherwise chain every increment through the same counter in memory.
    int32_t h4[4][1 << kBits] = {};
    int64_t j = 0;
    for (; j + 4 <= m; j += 4) {
      ++h4[0][(k[j] >> shift) & mask];
      ++h4[1][(k[j + 1] >> shift) & mask];
      ++h4[2][(k[j + 2] >> shift) & mask];
      ++h4[3][(k[j + 3] >> shift) & mask];
    }
    for (; j < m; ++j) ++h4[0][(k[j] >> shift) & mask];
    int64_t h[1 << kBits];
    for (int b = 0; b < (1 << kBits); ++b) h[b] = int64_t(h4[0][b]) + h4[1][b] + h4[2][b] + h4[3][b];
    int64_t d = 0, below = 0;
    while (below + h[d] <= at) below += h[d++];
    if (h[d] == m) continue;  // the whole group is in that bucket
    int64_t c = 0;
    const Key want = static_cast<Key>(d);
    for (j = 0; j < m; ++j) {  // in place (k == dst): c <= j, each key is read before its slot is written
      const Key x = k[j];
      dst[c] = x;
      c += ((x >> shift) & mask) == want;
    }
    k = dst;
    m = c;
    at -= below;
  }
  if (k != dst) std::copy(k, k + m, dst);
  std::nth_element(dst, dst + at, dst + m);
  return dst[at];
}

// The keys at sorted positions `at` and (when `next`) at + 1 of keys[0, m).
template <typename Key>
void select_in(const Key* keys, int64_t m, int64_t at, bool next, Key& v1, Key& v2) {
  std::vector<Key> work;
  v1 = v2 = radix_select_in(keys, m, at, work);
  if (!next) return;
  // Position at + 1: v1 again when more than at + 1 keys are <= v1, else the smallest key above v1.
  int64_t le = 0;
  Key above = std::numeric_limits<Key>::max();
  for (int64_t j = 0; j < m; ++j) {
    const Key x = keys[j];
    le += x <= v1;
    above = x > v1 && x < above ? x : above;
  }
  if (le <= at + 1) v2 = above;
}

// fill(wc, i, len, y): y (arithmetic type T) of the sample's elements [i, i + len), len <= kBlock, computed with
// wc::value-byte vectors. Calls body(local, keys, len) on the keys of every block of the sample, in parallel
// chunks unless already inside a parallel region; each chunk gets its own state from make_local(), merged under a
// lock. A chunk's loop runs in the build for vector width w (best_width(): AVX2 + F16C where the CPU has them).
// The bodies copy what they capture into locals first: the compiler keeps those in registers, where a
// captured reference would be reloaded after every store into a histogram or a vector.
template <typename T, typename Fill, typename MakeLocal, typename Body, typename Merge>
void for_each_key_block(int64_t n, int w, const Fill& fill, const MakeLocal& make_local, const Body& body,
                        const Merge& merge) {
  using Key = decltype(dpm::abs_key(T()));
  std::mutex mu;
  at::parallel_for(0, n, kSelectGrain, [&](int64_t b0, int64_t b1) {
    for (int64_t s0 = b0; s0 < b1; s0 += kMaxLocal) {
      const int64_t s1 = std::min(b1, s0 + kMaxLocal);
      auto local = make_local();
      isa_call(w, [&](auto wc) DPM_CPU_LAMBDA_INLINE {
        T y[kBlock];
        Key keys[kBlock];
        // Full blocks see a constant length once everything is inlined: loops without remainder code.
        auto block = [&](int64_t i, int len) DPM_CPU_LAMBDA_INLINE {
          fill(wc, i, len, y);
          for (int j = 0; j < len; ++j) keys[j] = dpm::abs_key(y[j]);
          body(local, keys, len);
        };
        int64_t i = s0;
        for (; i + kBlock <= s1; i += kBlock) block(i, kBlock);
        if (i < s1) block(i, static_cast<int>(s1 - i));
      });
      std::lock_guard<std::mutex> lock(mu);
      merge(local);
    }
  });
}

// A key interval [lo, hi] that holds rank k1 of the n keys and the next one with high probability: the
// sample rank of k1 among m evenly strided keys, widened by 3 standard deviations and a margin.
// m ~ 2 sqrt(n) keeps both costs sublinear: the m probes (cache misses) and the keys that fall inside the
// interval, about (6 sqrt(m p (1 - p)) + 17) / m of them (11% for a median at m = 1024, 5% at m = 4096;
// 2% for the usual p = 0.995).
template <typename T, typename Fill>
void guess_interval(int64_t n, int64_t k1, const Fill& fill, decltype(dpm::abs_key(T()))& lo,
                    decltype(dpm::abs_key(T()))& hi, int64_t& expect) {
  using Key = decltype(dpm::abs_key(T()));
  const int64_t m = std::clamp<int64_t>(static_cast<int64_t>(2.0 * std::sqrt(static_cast<double>(n))), 1024, 8192);
  std::vector<Key> s(m);
  for (int64_t j = 0; j < m; ++j) {
    T y;
    fill(std::integral_constant<int, 16>(), j * n / m, 1, &y);
    s[j] = dpm::abs_key(y);
  }
  const double p = static_cast<double>(k1) / static_cast<double>(n - 1);
  const double r = p * static_cast<double>(m - 1);
  const double d = 3.0 * std::sqrt(static_cast<double>(m) * p * (1.0 - p)) + 8.0;
  const int64_t ilo = static_cast<int64_t>(std::floor(r - d)), ihi = static_cast<int64_t>(std::ceil(r + 1.0 + d));
  lo = 0;
  hi = std::numeric_limits<Key>::max() >> 1;  // the largest key (sign bit clear)
  if (ilo > 0) {
    std::nth_element(s.begin(), s.begin() + ilo, s.end());
    lo = s[ilo];
  }
  if (ihi < m - 1) {
    std::nth_element(s.begin() + std::max<int64_t>(ilo, 0), s.begin() + ihi, s.end());  // keys from ilo on are >= lo
    hi = s[ihi];
  }
  expect = n / m * (std::min(ihi, m - 1) - std::max<int64_t>(ilo, 0) + 1);
}

// One pass that settles the selection when the ranks k1 and k2 fall inside a guessed key interval [lo, hi]:
// counts the keys below lo, equal to lo, equal to hi, and gathers those strictly inside (few by design).
// Keys equal to an edge are counted, not stored: a big tie group at the quantile costs no memory.
// Returns false (nothing settled, one pass spent) when the guess missed.
template <typename T, typename Fill>
bool select_in_guess(int64_t n, int64_t k1, int64_t k2, int w, const Fill& fill, decltype(dpm::abs_key(T()))& v1,
                     decltype(dpm::abs_key(T()))& v2) {
  using Key = decltype(dpm::abs_key(T()));
  using SKey = std::make_signed_t<Key>;  // keys have a clear top bit: signed compares vectorize on SSE2
  Key lo, hi;
  int64_t expect;
  guess_interval<T>(n, k1, fill, lo, hi, expect);
  const size_t cap = static_cast<size_t>(2 * expect + kGatherMax);  // per chunk: bounds time and memory
  std::vector<Key> mid;
  int64_t below = 0, at_lo = 0, at_hi = 0;
  bool overflow = false;
  struct Local {
    std::vector<Key> mid;
    int64_t below = 0, at_lo = 0, at_hi = 0;
    bool overflow = false;
  };
  for_each_key_block<T>(
      n, w, fill, [] { return Local(); },
      [lo, hi, cap](Local& loc, const Key* keys, int len) DPM_CPU_LAMBDA_INLINE {
        const SKey a = static_cast<SKey>(lo), b = static_cast<SKey>(hi);
        int32_t nbelow = 0, nlo = 0, nhi = 0, inside = 0;
        alignas(8) uint8_t in[kBlock];
        for (int j = 0; j < len; ++j) {  // branch-free and vectorized: most keys only pass through here
          const SKey k = static_cast<SKey>(keys[j]);
          nbelow += k < a;
          nlo += k == a;
          nhi += k == b;
          in[j] = (k > a) & (k < b);
          inside += in[j];
        }
        loc.below += nbelow;
        loc.at_lo += nlo;
        loc.at_hi += nhi;
        if (inside == 0) return;
        if (loc.mid.size() + inside > cap) {
          loc.overflow = true;
          return;
        }
        // Visit only the flagged keys: 8 flags per 64-bit word, one set bit per flagged byte.
        for (int j = len; j < kBlock; ++j) in[j] = 0;
        for (int g = 0; g < len; g += 8) {
          uint64_t w;
          std::memcpy(&w, in + g, sizeof(w));
          for (; w != 0; w &= w - 1) {
            const int byte = __builtin_ctzll(w) >> 3;
            loc.mid.push_back(keys[g + (kLittleEndian ? byte : 7 - byte)]);
          }
        }
      },
      [&](Local& loc) {
        below += loc.below;
        at_lo += loc.at_lo;
        at_hi += loc.at_hi;
        overflow = overflow || loc.overflow;
        if (!overflow) mid.insert(mid.end(), loc.mid.begin(), loc.mid.end());
      });
  if (hi == lo) at_hi = 0;
  // Ranks below, below + 1, ... hold at_lo times lo, then the sorted `mid`, then at_hi times hi.
  const int64_t nmid = static_cast<int64_t>(mid.size());
  if (overflow || k1 < below || k2 >= below + at_lo + nmid + at_hi) return false;
  std::vector<Key> work;
  auto pick = [&](int64_t r) {  // radix_select_in leaves `mid` as it is: pick twice
    r -= below;
    if (r < at_lo) return lo;
    r -= at_lo;
    if (r >= nmid) return hi;
    return radix_select_in(mid.data(), nmid, r, work);
  };
  v1 = pick(k1);
  v2 = k2 == k1 ? v1 : pick(k2);
  return true;
}

// The keys of order statistics k1 and k2 = k1 + 1 (or k1 when k1 is the last) among the n keys.
template <typename T, typename Fill>
void select_keys(int64_t n, int64_t k1, int64_t k2, int w, const Fill& fill, decltype(dpm::abs_key(T()))& v1,
                 decltype(dpm::abs_key(T()))& v2) {
  using Key = decltype(dpm::abs_key(T()));
  constexpr int kKeyBits = sizeof(Key) * 8 - 1;  // the sign bit is always clear
  if (n <= kGatherMax) {  // a small sample: every key into one array, no predicate, no merging
    std::vector<Key> keys(static_cast<size_t>(n));
    isa_call(w, [&](auto wc) DPM_CPU_LAMBDA_INLINE {
      T y[kBlock];
      for (int64_t i = 0; i < n; i += kBlock) {
        const int len = static_cast<int>(std::min<int64_t>(kBlock, n - i));
        fill(wc, i, len, y);
        for (int j = 0; j < len; ++j) keys[i + j] = dpm::abs_key(y[j]);
      }
    });
    select_in(keys.data(), n, k1, k2 != k1, v1, v2);
    return;
  }
  if (select_in_guess<T>(n, k1, k2, w, fill, v1, v2)) return;
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
      for_each_key_block<T>(
          n, w, fill, [] { return std::vector<Key>(); },
          [gshift, p1, p2](std::vector<Key>& loc, const Key* keys, int len) DPM_CPU_LAMBDA_INLINE {
            const int gs = gshift;
            const Key q1 = p1, q2 = p2;
            for (int j = 0; j < len; ++j) {
              const Key g = keys[j] >> gs;
              if (g == q1 || g == q2) loc.push_back(keys[j]);
            }
          },
          [&](std::vector<Key>& loc) { cand.insert(cand.end(), loc.begin(), loc.end()); });
      select_in(cand.data(), static_cast<int64_t>(cand.size()), k1 - g1.below, k2 != k1, v1, v2);
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
    for_each_key_block<T>(
        n, w, fill, [&] { return Local{std::vector<uint32_t>(nb, 0), std::vector<uint32_t>(same ? 0 : nb, 0)}; },
        [gshift, shift, mask, p1, p2](Local& loc, const Key* keys, int len) DPM_CPU_LAMBDA_INLINE {
          const int gs = gshift, sh = shift;
          const Key m = mask, q1 = p1, q2 = p2;
          uint32_t* const l1 = loc.c1.data();
          uint32_t* const l2 = loc.c2.data();
          for (int j = 0; j < len; ++j) {
            const Key g = keys[j] >> gs;
            const size_t d = static_cast<size_t>((keys[j] >> sh) & m);
            if (g == q1) {
              ++l1[d];
            } else if (g == q2) {
              ++l2[d];
            }
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
T sample_quantile(int64_t n, double ratio, int w, const Fill& fill) {
  const dpm::QuantileRank r = dpm::quantile_rank(n, ratio);
  decltype(dpm::abs_key(T())) v1, v2;
  select_keys<T>(n, r.k, std::min(r.k + 1, n - 1), w, fill, v1, v2);
  return dpm::lerp_torch(dpm::key_value(v1), dpm::key_value(v2), r.w, r.w1);
}

}  // namespace dpm_cpu
