// What the CPU extensions share about x86 vector code: functions compiled for AVX2 + FMA + F16C with target
// attributes (so the build needs only the baseline ISA), the run-time check that picks them, and the horizontal sum.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LLMDROP_HAVE_X86_SIMD 1
#define LLMDROP_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace llmdrop {

inline bool cpu_has_avx2() {
  static const bool avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return avx2;
}

LLMDROP_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

}  // namespace llmdrop
#endif
