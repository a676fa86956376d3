// Vector loads and stores with dtype conversion for the CPU kernels, and the run-time choice of instruction set.
//
// A kernel is a template on W, the vector width in bytes: 16 (SSE2, every x86-64 CPU; or any GCC target) or 32
// (an AVX2 + F16C build of the same code, chosen at run time by isa_call). Lanes hold the arithmetic type T
// (float or double); memory holds the storage type S, converted on load and store:
// - float / double: plain unaligned vector loads and stores;
// - bfloat16: a load is a shift of the 16 bits into the top of a float (exact); a store rounds to nearest even
//   with integer adds, bit for bit c10::BFloat16(float) (NaN -> 0x7FC0 whatever its sign and payload);
// - float16: F16C's vcvtph2ps / vcvtps2ph (round to nearest even), in the W = 32 build only. A store first
//   replaces each NaN by the quiet NaN of its sign, so that it gives c10::Half(float)'s sign | 0x7E00 instead
//   of the hardware's truncated payload. (A load of a signaling NaN gives the quiet NaN both ways.)
// The exhaustive check of every float and every 16-bit pattern against c10 is tests/test_cpu_backend.py's
// test_vector_conversions_match_c10.
//
// Code with the F16C intrinsics only compiles inside a function built for that target: the helpers that use
// them carry the target attribute and are plain `inline` (not always_inline, which GCC would reject when
// it inlines them into a generic template first); isa_call's `flatten` then inlines them into the AVX2 build.
// Torch-free: the binding tells which storage types are bfloat16 and float16 (StorageFormat below).
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vector arguments of always-inlined helpers: no ABI crossed
#endif

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(DPM_CPU_NO_AVX2)  // -DDPM_CPU_NO_AVX2: test the base
#define DPM_CPU_HAVE_AVX2_PATH 1
#include <immintrin.h>
#endif

namespace dpm_cpu {

#define DPM_CPU_INLINE inline __attribute__((always_inline))
#define DPM_CPU_LAMBDA_INLINE __attribute__((always_inline))  // after a lambda's parameter list

template <typename T, int N>
struct SimdOf {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};

// How a storage type holds its values; the binding specializes StorageFormat for c10::BFloat16 and c10::Half.
enum class Fmt { kNative, kBF16, kF16 };
template <typename S>
struct StorageFormat {
  static constexpr Fmt value = Fmt::kNative;
};
template <typename S>
constexpr Fmt kFmt = StorageFormat<S>::value;

// Whether the W-byte build converts S in vectors (float16 needs F16C: the W = 32 build).
template <int W, typename S>
constexpr bool kVectorIo = kFmt<S> != Fmt::kF16 || W == 32;

template <typename V, typename T>
DPM_CPU_INLINE V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));  // unaligned load
  return v;
}

template <typename V, typename T>
DPM_CPU_INLINE void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename V, typename T>
DPM_CPU_INLINE V splat(T s) {
  V v;
  for (int k = 0; k < static_cast<int>(sizeof(V) / sizeof(T)); ++k) v[k] = s;  // exact copy, -0.0 included
  return v;
}

#ifdef DPM_CPU_HAVE_AVX2_PATH
typedef float F8 __attribute__((vector_size(32)));
typedef uint32_t U8 __attribute__((vector_size(32)));

__attribute__((target("avx2,f16c"))) inline F8 f16x8_to_float(const void* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
}

__attribute__((target("avx2,f16c"))) inline void float_to_f16x8(void* p, F8 v) {
  U8 u = reinterpret_cast<U8>(v);
  u = v != v ? (u & 0x80000000u) | 0x7fc00000u : u;  // NaN -> quiet NaN of the same sign, no payload
  _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_cvtps_ph(reinterpret_cast<__m256>(u), _MM_FROUND_TO_NEAREST_INT));
}

// bfloat16 in the AVX2 build: one widening load, and a store that packs with unsigned saturation (the rounded
// values fit 16 bits) instead of the generic truncation's mask, pack and permute.
__attribute__((target("avx2,f16c"))) inline F8 bf16x8_to_float(const void* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  return reinterpret_cast<F8>(_mm256_slli_epi32(w, 16));
}

__attribute__((target("avx2,f16c"))) inline void store_u16x8(void* p, U8 r) {
  const __m256i ri = reinterpret_cast<__m256i>(r);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(ri), _mm256_extracti128_si256(ri, 1));
  _mm_storeu_si128(static_cast<__m128i*>(p), packed);
}
#endif

// The bfloat16 bits of each lane of v (in the low 16 bits of a 32-bit lane), rounded to nearest even.
template <typename V, typename U32 = typename SimdOf<uint32_t, sizeof(V) / 4>::type>
DPM_CPU_INLINE U32 bf16_bits(const V& v) {
  U32 u = reinterpret_cast<U32>(v);
  u = v != v ? U32{} + 0x7fc00000u : u;  // rounds to 0x7FC0, c10's NaN
  return (u + (((u >> 16) & 1u) + 0x7fffu)) >> 16;
}

// N values of S as a vector V of N lanes of the arithmetic type.
template <typename V, typename S>
DPM_CPU_INLINE V load_as(const S* p) {
  constexpr int N = sizeof(V) / sizeof(V{}[0]);
  if constexpr (kFmt<S> == Fmt::kNative) {
    return vload<V>(p);
  } else if constexpr (kFmt<S> == Fmt::kBF16) {
#ifdef DPM_CPU_HAVE_AVX2_PATH
    if constexpr (N == 8) return bf16x8_to_float(p);
#endif
    using U16 = typename SimdOf<uint16_t, N>::type;
    using U32 = typename SimdOf<uint32_t, N>::type;
    return reinterpret_cast<V>(__builtin_convertvector(vload<U16>(p), U32) << 16);
  } else {
#ifdef DPM_CPU_HAVE_AVX2_PATH
    static_assert(N == 8, "float16 vectors: 8 lanes (F16C)");
    return f16x8_to_float(p);
#else
    static_assert(N == 0, "float16 vectors need the AVX2 + F16C build");
#endif
  }
}

// Stores the N lanes of v as S, rounded to nearest even.
template <typename S, typename V>
DPM_CPU_INLINE void store_as(S* p, const V& v) {
  constexpr int N = sizeof(V) / sizeof(V{}[0]);
  if constexpr (kFmt<S> == Fmt::kNative) {
    vstore(p, v);
  } else if constexpr (kFmt<S> == Fmt::kBF16) {
    const auto r = bf16_bits(v);
#ifdef DPM_CPU_HAVE_AVX2_PATH
    if constexpr (N == 8) return store_u16x8(p, r);
#endif
    vstore(p, __builtin_convertvector(r, typename SimdOf<uint16_t, N>::type));
  } else {
#ifdef DPM_CPU_HAVE_AVX2_PATH
    static_assert(N == 8, "float16 vectors: 8 lanes (F16C)");
    float_to_f16x8(p, v);
#else
    static_assert(N == 0, "float16 vectors need the AVX2 + F16C build");
#endif
  }
}

// ---- run-time choice of the build ----

#ifdef DPM_CPU_HAVE_AVX2_PATH
// `flatten` inlines everything f calls, so all of it is compiled for AVX2 + F16C (no FMA: no contraction).
template <typename F>
__attribute__((target("avx2,f16c"), flatten, noinline)) void call_avx2(const F& f) {
  f();
}

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return has;
}
#endif

// The widest vector width this CPU runs: 32 (AVX2 + F16C) or 16. DPM_KERNELS_CPU_WIDTH=16 in the environment
// forces the 16-byte build (read on every call, so the tests can run both builds in one process).
inline int best_width() {
  const char* env = std::getenv("DPM_KERNELS_CPU_WIDTH");
  if (env != nullptr && std::strcmp(env, "16") == 0) return 16;
#ifdef DPM_CPU_HAVE_AVX2_PATH
  if (cpu_has_avx2()) return 32;
#endif
  return 16;
}

// Runs f<W>() built for W: f is a generic lambda taking std::integral_constant<int, W>.
template <typename F>
DPM_CPU_INLINE void isa_call(int w, const F& f) {
#ifdef DPM_CPU_HAVE_AVX2_PATH
  if (w == 32) return call_avx2([&] { f(std::integral_constant<int, 32>()); });
#endif
  (void)w;
  f(std::integral_constant<int, 16>());
}

}  // namespace dpm_cpu
