// Error messages as one fixed-size C string, formatted with snprintf: no iostreams anywhere on an error path.
//
// TORCH_CHECK_* given several message parts joins them with c10::str, an std::ostringstream instantiated in the
// extension's own code. On the 2026-11 GPU image (its g++ 13.3 / libstdc++ against torch 2.11) writing a number
// to such a stream crashed the process (SIGSEGV) instead of raising. Given exactly one C string, TORCH_CHECK_*
// passes it through untouched, so every check here hands it Text(...).c_str(). Torch-free (torch types are turned
// into C strings and Dims by the caller), so a plain C++ test can exercise it.
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <type_traits>

namespace dpm_text {

// A shape, printed as torch prints an IntArrayRef: [2, 8].
struct Dims {
  const int64_t* data;
  int64_t size;
};

// The parts of a message joined in a buffer: C strings, integers (%lld), floating point numbers (%g: what an
// ostream prints by default: 6 significant digits, nan, inf) and Dims. A message longer than the buffer is
// truncated, never overflowed.
class Text {
 public:
  template <typename... Parts>
  explicit Text(const Parts&... parts) {
    buf_[0] = '\0';
    (add(parts), ...);
  }

  const char* c_str() const { return buf_; }

 private:
  static constexpr size_t kSize = 512;

  void add(const char* s) { put("%s", s != nullptr ? s : "(null)"); }
  void add(double v) { put("%g", v); }
  template <typename I, typename std::enable_if_t<std::is_integral_v<I> && !std::is_same_v<I, bool>, int> = 0>
  void add(I v) {
    put("%lld", static_cast<long long>(v));
  }
  void add(const Dims& d) {
    put("%s", "[");
    for (int64_t i = 0; i < d.size; ++i) put(i == 0 ? "%lld" : ", %lld", static_cast<long long>(d.data[i]));
    put("%s", "]");
  }

  template <typename V>
  void put(const char* fmt, V v) {
    if (len_ + 1 >= kSize) return;
    const int n = snprintf(buf_ + len_, kSize - len_, fmt, v);
    if (n > 0) len_ = len_ + static_cast<size_t>(n) < kSize ? len_ + static_cast<size_t>(n) : kSize - 1;
  }

  char buf_[kSize];
  size_t len_ = 0;
};

}  // namespace dpm_text
