// What the CPU extensions share about x86 vector code: functions compiled for AVX2 + FMA + F16C (or AVX-512 VNNI)
// with target attributes (so the build needs only the baseline ISA), the run-time checks that pick them, and the
// horizontal sum, and eight fp32 / fp16 / bf16 values loaded as fp32.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LLMDROP_HAVE_X86_SIMD 1
#define LLMDROP_AVX2 __attribute__((target("avx2,fma,f16c")))
// AVX-512 (F, BW, VL) with VNNI's integer dot products, for kernels that also use the AVX2 helpers.
#define LLMDROP_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

namespace llmdrop {

inline bool cpu_has_avx2() {
  static const bool avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return avx2;
}

inline bool cpu_has_avx512_vnni() {
  static const bool avx512 = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                             __builtin_cpu_supports("avx512vnni");
  return avx512;
}

LLMDROP_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Eight consecutive values as fp32.
LLMDROP_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
LLMDROP_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
LLMDROP_AVX2 inline __m256 load8(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
  const __m256i halves = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(halves, 16));
}

}  // namespace llmdrop
#endif
