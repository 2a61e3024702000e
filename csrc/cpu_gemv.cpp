// CPU linear layers shaped for decoding: y[m, o] = sum_i x[m, i] * W[o, i] (+ bias[o]), x and y fp32.
//
// Weight formats (each op's suffix):
//   f32, f16, bf16    dense [out, in] tensors of that dtype.
//   q8_0, q4_0, q4_1  ggml blocks of 32 consecutive input columns, byte for byte as in a GGUF file, held as
//                     uint8 [out, in / 32 * block_bytes] (the blocks of one output row back to back):
//                       q8_0, 34 bytes: fp16 d, int8 q[32]             w = d * q
//                       q4_0, 18 bytes: fp16 d, uint8 qs[16]           w = d * q - 8 d
//                       q4_1, 20 bytes: fp16 d, fp16 m, uint8 qs[16]   w = d * q + m
//                     where qs[j] holds element j in its low nibble and element j + 16 in its high nibble.
//                     The scales stay fp16, as GGUF stores them, so GGUF tensors are used without repacking.
//
// Up to kGemvMaxRows activation rows (decode): a fused GEMV. Dense weights are converted to fp32 in
// registers and multiplied with x by FMA. For block formats x is first quantised per block of 32 to int16
// (x ~ sx * xq, sx = max|x| / 32767 over the block: each x is off by at most 1.5e-5 of the largest
// magnitude in its block); the
// dot of a block's integer values q with xq is then an exact int32 sum of pairwise int16 products
// (_mm256_madd_epi16), scaled by d * sx into an fp32 accumulator. The offset of the 4-bit formats (-8 d,
// or m) contributes offset * (sum of x over the block), from per-block sums of the unquantised x. Both x
// preparations run once per call.
// More rows (prefill): tiles of output rows are dequantised to fp32 and ATen's GEMM does the rest.
// Parallelism is at::parallel_for (torch's thread pool) over contiguous ranges of output rows, so each
// thread streams its own part of the weight. x86-64 builds carry AVX2 + FMA + F16C kernels picked at run
// time (functions compiled with target attributes, so the build needs only the baseline ISA); portable
// loops run elsewhere. Bindings are TORCH_LIBRARY ops (torch.ops.llmdrop_cpu_gemv.*), registered when
// the shared object is imported as the Python module llmdrop_rt._cpu_gemv.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LLMDROP_HAVE_X86_SIMD 1
#define LLMDROP_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace {

constexpr int64_t kGemvMaxRows = 8;  // more activation rows than this: dequantised tiles + GEMM
constexpr int64_t kRowBlock = 4;     // activation rows sharing one decode of a weight row in the GEMV
constexpr int64_t kBlock = 32;       // input columns per quantisation block
constexpr int64_t kChunkBytes = 32 << 10;  // weight bytes a thread claims at a time in the GEMV
constexpr int64_t kPrefetchAhead = 2048;  // bytes of the weight stream requested ahead of use

inline float fp16_bits_to_float(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// Element j of the 32 nibbles in qs[16].
inline int nibble(const uint8_t* qs, int j) { return j < 16 ? qs[j] & 0xF : qs[j - 16] >> 4; }

// ---------------------------------------------------------------------------------------------
// Formats. Dense ones say how to read elements; block ones where d and the values sit in a block, what
// integer value element j has, and the block's offset: w = d * value + offset, the offset being
// kOffsetPerD * d, or the fp16 m at byte 2 (kStoredOffset). |value| <= 128, so a block's dot with int16
// activations fits int32 with room to spare.
// ---------------------------------------------------------------------------------------------
struct F32 {
  using Element = float;
  static constexpr bool kBlocked = false;
  static constexpr const char* kName = "f32";
  static constexpr at::ScalarType kDtype = at::kFloat;
  static float to_float(float w) { return w; }
};

struct F16 {
  using Element = at::Half;
  static constexpr bool kBlocked = false;
  static constexpr const char* kName = "f16";
  static constexpr at::ScalarType kDtype = at::kHalf;
  static float to_float(at::Half w) { return static_cast<float>(w); }
};

struct BF16 {
  using Element = at::BFloat16;
  static constexpr bool kBlocked = false;
  static constexpr const char* kName = "bf16";
  static constexpr at::ScalarType kDtype = at::kBFloat16;
  static float to_float(at::BFloat16 w) { return static_cast<float>(w); }
};

struct Q8_0 {
  static constexpr bool kBlocked = true;
  static constexpr const char* kName = "q8_0";
  static constexpr int64_t kBytes = 34;
  static constexpr int64_t kValuesAt = 2;  // byte offset of the values; d is at 0
  static constexpr float kOffsetPerD = 0.f;
  static constexpr bool kStoredOffset = false;
  static int value(const uint8_t* values, int j) { return static_cast<int8_t>(values[j]); }
};

struct Q4_0 {
  static constexpr bool kBlocked = true;
  static constexpr const char* kName = "q4_0";
  static constexpr int64_t kBytes = 18;
  static constexpr int64_t kValuesAt = 2;
  static constexpr float kOffsetPerD = -8.f;
  static constexpr bool kStoredOffset = false;
  static int value(const uint8_t* values, int j) { return nibble(values, j); }
};

struct Q4_1 {
  static constexpr bool kBlocked = true;
  static constexpr const char* kName = "q4_1";
  static constexpr int64_t kBytes = 20;
  static constexpr int64_t kValuesAt = 4;
  static constexpr float kOffsetPerD = 0.f;
  static constexpr bool kStoredOffset = true;
  static int value(const uint8_t* values, int j) { return nibble(values, j); }
};

// The offset term of the 4-bit formats needs the sums of x over each block.
template <class Format>
constexpr bool has_offset() {
  if constexpr (Format::kBlocked) {
    return Format::kStoredOffset || Format::kOffsetPerD != 0.f;
  } else {
    return false;
  }
}

template <class Format>
float block_offset(const uint8_t* block, float d) {
  return Format::kStoredOffset ? fp16_bits_to_float(block + 2) : Format::kOffsetPerD * d;
}

template <class Format>
int64_t row_bytes(int64_t in) {
  if constexpr (Format::kBlocked) {
    return in / kBlock * Format::kBytes;
  } else {
    return in * static_cast<int64_t>(sizeof(typename Format::Element));
  }
}

// Everything a kernel needs; pointers are to contiguous data.
struct Problem {
  const float* x;          // [rows, in]
  const uint8_t* weight;   // [out, row_bytes]
  const float* bias;       // [out] or nullptr
  float* y;                // [rows, out]
  int64_t rows, in, out;
  // The GEMV of block formats reads x as QuantizedX (quantize_x below) instead, block-major so that the
  // activation rows of one block lie together:
  const int16_t* xq;       // [in / 32, rows, 32]
  const float* xscale;     // [in / 32, rows], x ~ xscale * xq per block
  const float* xsums;      // [in / 32, rows], sums of x over each block (4-bit formats only)
};

// x [rows, in] quantised per block of 32 columns to int16 (see the top of the file).
struct QuantizedX {
  std::vector<int16_t> values;
  std::vector<float> scales, sums;
};

QuantizedX quantize_x(const float* x, int64_t rows, int64_t in, bool with_sums) {
  const int64_t blocks = in / kBlock;
  QuantizedX q{std::vector<int16_t>(rows * in), std::vector<float>(rows * blocks),
               std::vector<float>(with_sums ? rows * blocks : 0)};
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = x + m * in + b * kBlock;
      float largest = 0.f, sum = 0.f;
      for (int j = 0; j < kBlock; ++j) {
        largest = std::max(largest, std::fabs(xb[j]));
        sum += xb[j];
      }
      // A NaN or infinity in the block: its scale becomes NaN, so every output it touches is NaN.
      const bool finite = std::isfinite(largest) && !std::isnan(sum);
      const float inverse = finite && largest > 0.f ? 32767.f / largest : 0.f;
      int16_t* values = q.values.data() + (b * rows + m) * kBlock;
      for (int j = 0; j < kBlock; ++j)  // round half away from zero
        values[j] = finite ? static_cast<int16_t>(xb[j] * inverse + std::copysign(0.5f, xb[j])) : 0;
      q.scales[b * rows + m] = finite ? largest / 32767.f : std::numeric_limits<float>::quiet_NaN();
      if (with_sums) q.sums[b * rows + m] = sum;
    }
  }
  return q;
}

// ---------------------------------------------------------------------------------------------
// Portable kernels
// ---------------------------------------------------------------------------------------------
// dots[r] = W[o] . x[m0 + r] for the weight row wrow and nrows activation rows.
template <class Format>
void row_dots_portable(const Problem& p, const uint8_t* wrow, int64_t m0, int64_t nrows, float* dots) {
  for (int64_t r = 0; r < nrows; ++r) {
    float total = 0.f;
    if constexpr (Format::kBlocked) {
      const int64_t blocks = p.in / kBlock;
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* block = wrow + b * Format::kBytes;
        const int64_t xb = b * p.rows + m0 + r;
        const int16_t* xq = p.xq + xb * kBlock;
        int32_t block_dot = 0;
        for (int j = 0; j < kBlock; ++j) block_dot += Format::value(block + Format::kValuesAt, j) * xq[j];
        const float d = fp16_bits_to_float(block);
        total += static_cast<float>(block_dot) * (d * p.xscale[xb]);
        if constexpr (has_offset<Format>()) total += block_offset<Format>(block, d) * p.xsums[xb];
      }
    } else {
      const auto* w = reinterpret_cast<const typename Format::Element*>(wrow);
      const float* x = p.x + (m0 + r) * p.in;
      for (int64_t i = 0; i < p.in; ++i) total += Format::to_float(w[i]) * x[i];
    }
    dots[r] = total;
  }
}

template <class Format>
void dequant_row_portable(const uint8_t* wrow, int64_t in, float* w) {
  if constexpr (Format::kBlocked) {
    for (int64_t b = 0; b < in / kBlock; ++b) {
      const uint8_t* block = wrow + b * Format::kBytes;
      const float d = fp16_bits_to_float(block);
      const float offset = block_offset<Format>(block, d);
      for (int j = 0; j < kBlock; ++j) w[b * kBlock + j] = d * Format::value(block + Format::kValuesAt, j) + offset;
    }
  } else {
    const auto* elements = reinterpret_cast<const typename Format::Element*>(wrow);
    for (int64_t i = 0; i < in; ++i) w[i] = Format::to_float(elements[i]);
  }
}

#ifdef LLMDROP_HAVE_X86_SIMD
// ---------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C kernels (used only when the CPU reports all three)
// ---------------------------------------------------------------------------------------------
LLMDROP_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

LLMDROP_AVX2 inline float fp16_bits_to_float_f16c(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return _cvtsh_ss(bits);
}

template <class Format>
LLMDROP_AVX2 inline float block_offset_f16c(const uint8_t* block, float d) {
  return Format::kStoredOffset ? fp16_bits_to_float_f16c(block + 2) : Format::kOffsetPerD * d;
}

// Eight consecutive dense weights as fp32.
LLMDROP_AVX2 inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
LLMDROP_AVX2 inline __m256 load8(const at::Half* w) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
}
LLMDROP_AVX2 inline __m256 load8(const at::BFloat16* w) {  // bf16 is the top half of an fp32
  const __m256i halves = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(halves, 16));
}

// Sixteen int8 (kSigned) or uint8 lanes as int16.
template <bool kSigned>
LLMDROP_AVX2 inline __m256i bytes_to_int16(__m128i v) {
  return kSigned ? _mm256_cvtepi8_epi16(v) : _mm256_cvtepu8_epi16(v);
}

// The 32 integer values of a block as int16: elements 0-15 in q[0], 16-31 in q[1].
LLMDROP_AVX2 inline void block_values_avx2(Q8_0, const uint8_t* values, __m256i q[2]) {
  for (int half = 0; half < 2; ++half)
    q[half] = bytes_to_int16<true>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(values + 16 * half)));
}

// Zero-extending qs[16] to 16-bit lanes puts byte j in lane j: its low nibble is element j, its high nibble
// (all that is left after a shift by 4) element j + 16.
LLMDROP_AVX2 inline void nibble_values_avx2(const uint8_t* values, __m256i q[2]) {
  const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(values)));
  q[0] = _mm256_and_si256(bytes, _mm256_set1_epi16(0x0F));
  q[1] = _mm256_srli_epi16(bytes, 4);
}
LLMDROP_AVX2 inline void block_values_avx2(Q4_0, const uint8_t* values, __m256i q[2]) { nibble_values_avx2(values, q); }
LLMDROP_AVX2 inline void block_values_avx2(Q4_1, const uint8_t* values, __m256i q[2]) { nibble_values_avx2(values, q); }

// Independent accumulators per (weight row, activation row) pair: enough chains in all to hide the FMA latency.
constexpr int chains_for(int pairs) { return pairs >= 4 ? 1 : 4 / pairs; }

// total[r] += W[o, block b] . x[m0 + r], its offset term into offset_term[r], for NROWS activation rows.
template <class Format, int NROWS>
LLMDROP_AVX2 inline void accumulate_block_avx2(const Problem& p, const uint8_t* wrow, int64_t m0, int64_t b,
                                               __m256 (&total)[NROWS], float (&offset_term)[NROWS]) {
  const uint8_t* block = wrow + b * Format::kBytes;
  _mm_prefetch(reinterpret_cast<const char*>(block) + kPrefetchAhead, _MM_HINT_T0);
  __m256i q[2];
  block_values_avx2(Format{}, block + Format::kValuesAt, q);
  const float d = fp16_bits_to_float_f16c(block);
  const float offset = has_offset<Format>() ? block_offset_f16c<Format>(block, d) : 0.f;
  const int64_t x0 = b * p.rows + m0;  // QuantizedX index of (block b, row m0)
  for (int r = 0; r < NROWS; ++r) {
    const int16_t* xq = p.xq + (x0 + r) * kBlock;
    const __m256i block_dot =
        _mm256_add_epi32(_mm256_madd_epi16(q[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq))),
                         _mm256_madd_epi16(q[1], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16))));
    total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot), _mm256_set1_ps(d * p.xscale[x0 + r]), total[r]);
    if constexpr (has_offset<Format>()) offset_term[r] += offset * p.xsums[x0 + r];
  }
}

// dots[k][r] = W[o + k] . x[m0 + r] for WROWS consecutive weight rows from wrow and NROWS activation rows
// (compile-time, so the accumulators stay in registers). With several activation rows the dense formats take
// two weight rows at a time, so that each load of fp32 x serves both; for the block formats (int16 x, half
// the bytes) that measured slower, so they take one.
template <class Format, int WROWS, int NROWS>
LLMDROP_AVX2 void tile_dots_avx2(const Problem& p, const uint8_t* wrow, int64_t m0, float (*dots)[kRowBlock]) {
  constexpr int chains = chains_for(WROWS * NROWS);
  if constexpr (Format::kBlocked) {
    static_assert(WROWS == 1, "block formats decode one weight row at a time");
    const int64_t blocks = p.in / kBlock;
    __m256 total[chains][NROWS];  // chain c accumulates blocks c, c + chains, ...
    float offset_term[chains][NROWS];
    for (int c = 0; c < chains; ++c) {
      for (int r = 0; r < NROWS; ++r) {
        total[c][r] = _mm256_setzero_ps();
        offset_term[c][r] = 0.f;
      }
    }
    int64_t b = 0;
    for (; b + chains <= blocks; b += chains) {
      for (int c = 0; c < chains; ++c)
        accumulate_block_avx2<Format, NROWS>(p, wrow, m0, b + c, total[c], offset_term[c]);
    }
    for (; b < blocks; ++b) accumulate_block_avx2<Format, NROWS>(p, wrow, m0, b, total[0], offset_term[0]);
    for (int r = 0; r < NROWS; ++r) {
      for (int c = 1; c < chains; ++c) {
        total[0][r] = _mm256_add_ps(total[0][r], total[c][r]);
        offset_term[0][r] += offset_term[c][r];
      }
      dots[0][r] = hsum_avx2(total[0][r]) + offset_term[0][r];
    }
  } else {
    using Element = typename Format::Element;
    const float* x = p.x + m0 * p.in;
    const int64_t in = p.in, bytes = row_bytes<Format>(in);
    auto weights = [&](int k) { return reinterpret_cast<const Element*>(wrow + k * bytes); };
    __m256 acc[WROWS][NROWS][chains];  // chain c accumulates columns 8c..8c+7 of every 8 * chains
    for (int k = 0; k < WROWS; ++k)
      for (int r = 0; r < NROWS; ++r)
        for (int c = 0; c < chains; ++c) acc[k][r][c] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 * chains <= in; i += 8 * chains) {
      __m256 wv[WROWS][chains];
      for (int k = 0; k < WROWS; ++k) {
        _mm_prefetch(reinterpret_cast<const char*>(weights(k) + i) + kPrefetchAhead, _MM_HINT_T0);
        for (int c = 0; c < chains; ++c) wv[k][c] = load8(weights(k) + i + 8 * c);
      }
      for (int r = 0; r < NROWS; ++r) {
        for (int c = 0; c < chains; ++c) {
          const __m256 xv = _mm256_loadu_ps(x + r * in + i + 8 * c);
          for (int k = 0; k < WROWS; ++k) acc[k][r][c] = _mm256_fmadd_ps(wv[k][c], xv, acc[k][r][c]);
        }
      }
    }
    for (; i + 8 <= in; i += 8) {
      for (int r = 0; r < NROWS; ++r) {
        const __m256 xv = _mm256_loadu_ps(x + r * in + i);
        for (int k = 0; k < WROWS; ++k) acc[k][r][0] = _mm256_fmadd_ps(load8(weights(k) + i), xv, acc[k][r][0]);
      }
    }
    for (int k = 0; k < WROWS; ++k) {
      for (int r = 0; r < NROWS; ++r) {
        for (int c = 1; c < chains; ++c) acc[k][r][0] = _mm256_add_ps(acc[k][r][0], acc[k][r][c]);
        float total = hsum_avx2(acc[k][r][0]);
        for (int64_t t = i; t < in; ++t) total += Format::to_float(weights(k)[t]) * x[r * in + t];
        dots[k][r] = total;
      }
    }
  }
}

template <class Format>
LLMDROP_AVX2 void dequant_row_avx2(const uint8_t* wrow, int64_t in, float* w) {
  if constexpr (Format::kBlocked) {
    for (int64_t b = 0; b < in / kBlock; ++b) {
      const uint8_t* block = wrow + b * Format::kBytes;
      __m256i q[2];
      block_values_avx2(Format{}, block + Format::kValuesAt, q);
      const float d_scalar = fp16_bits_to_float_f16c(block);
      const __m256 d = _mm256_set1_ps(d_scalar), offset = _mm256_set1_ps(block_offset_f16c<Format>(block, d_scalar));
      for (int k = 0; k < 4; ++k) {
        const __m128i eight = k % 2 ? _mm256_extracti128_si256(q[k / 2], 1) : _mm256_castsi256_si128(q[k / 2]);
        const __m256 values = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(eight));
        _mm256_storeu_ps(w + b * kBlock + 8 * k, _mm256_fmadd_ps(values, d, offset));
      }
    }
  } else {
    const auto* elements = reinterpret_cast<const typename Format::Element*>(wrow);
    int64_t i = 0;
    for (; i + 8 <= in; i += 8) _mm256_storeu_ps(w + i, load8(elements + i));
    for (; i < in; ++i) w[i] = Format::to_float(elements[i]);
  }
}

int cpu_simd_bits() {
  static const int bits =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") ? 256 : 0;
  return bits;
}
#else
int cpu_simd_bits() { return 0; }
#endif

// Tests cap the vector width to exercise both paths (AVX2, portable) on one machine.
std::atomic<int> simd_bits_cap{256};

// 256: AVX2 + FMA + F16C, 0: portable loops.
int simd_bits() { return std::min(cpu_simd_bits(), simd_bits_cap.load()); }

// ---------------------------------------------------------------------------------------------
// Drivers
// ---------------------------------------------------------------------------------------------
// dots[k][r] = W[o + k] . x[m0 + r] for WROWS weight rows from wrow and NROWS activation rows.
template <class Format, int WROWS, int NROWS>
void tile_dots(bool avx2, const Problem& p, const uint8_t* wrow, int64_t m0, float (*dots)[kRowBlock]) {
#ifdef LLMDROP_HAVE_X86_SIMD
  if (avx2) return tile_dots_avx2<Format, WROWS, NROWS>(p, wrow, m0, dots);
#endif
  for (int k = 0; k < WROWS; ++k)
    row_dots_portable<Format>(p, wrow + k * row_bytes<Format>(p.in), m0, NROWS, dots[k]);
}

template <class Format, int WROWS>
void tile_dots(bool avx2, const Problem& p, const uint8_t* wrow, int64_t m0, int64_t nrows, float (*dots)[kRowBlock]) {
  switch (nrows) {
    case 1: return tile_dots<Format, WROWS, 1>(avx2, p, wrow, m0, dots);
    case 2: return tile_dots<Format, WROWS, 2>(avx2, p, wrow, m0, dots);
    case 3: return tile_dots<Format, WROWS, 3>(avx2, p, wrow, m0, dots);
    default: return tile_dots<Format, WROWS, 4>(avx2, p, wrow, m0, dots);
  }
}

template <class Format>
void gemv(const Problem& p) {
  const bool avx2 = simd_bits() >= 256;
  const int64_t bytes = row_bytes<Format>(p.in);
  // One activation row, or a block format: one weight row per tile. Several rows of dense formats: two.
  // A tile is computed the same way whichever thread takes it, so results do not depend on the thread count.
  const int64_t tile_rows = p.rows > 1 && !Format::kBlocked ? 2 : 1;
  const int64_t tiles = (p.out + tile_rows - 1) / tile_rows;
  const int64_t tiles_per_chunk = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(tile_rows * bytes, 1));
  const int64_t chunks = (tiles + tiles_per_chunk - 1) / tiles_per_chunk;
  // Threads claim chunks from a shared counter instead of taking one fixed share each: on a busy machine a
  // thread that loses its core for a while holds up only the chunk it is on.
  std::atomic<int64_t> next_chunk{0};
  at::parallel_for(0, chunks, 1, [&](int64_t, int64_t) {
    for (int64_t chunk; (chunk = next_chunk.fetch_add(1)) < chunks;) {
      for (int64_t t = chunk * tiles_per_chunk; t < std::min(tiles, (chunk + 1) * tiles_per_chunk); ++t) {
        const int64_t o = t * tile_rows, weight_rows = std::min(tile_rows, p.out - o);
        const uint8_t* wrow = p.weight + o * bytes;
        for (int64_t m0 = 0; m0 < p.rows; m0 += kRowBlock) {
          const int64_t nrows = std::min(kRowBlock, p.rows - m0);
          float dots[2][kRowBlock];
          if (weight_rows == 1) {
            tile_dots<Format, 1>(avx2, p, wrow, m0, nrows, dots);
          } else if constexpr (!Format::kBlocked) {
            tile_dots<Format, 2>(avx2, p, wrow, m0, nrows, dots);
          }
          for (int64_t k = 0; k < weight_rows; ++k) {
            const float bias = p.bias ? p.bias[o + k] : 0.f;
            for (int64_t r = 0; r < nrows; ++r) p.y[(m0 + r) * p.out + o + k] = dots[k][r] + bias;
          }
        }
      }
    }
  });
}

// Rows [o_begin, o_end) of the weight as fp32, into w [o_end - o_begin, in].
template <class Format>
void dequant_rows(const Problem& p, int64_t o_begin, int64_t o_end, float* w) {
  const bool avx2 = simd_bits() >= 256;
  const int64_t bytes = row_bytes<Format>(p.in);
  at::parallel_for(o_begin, o_end, 8, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      float* wrow = w + (o - o_begin) * p.in;
#ifdef LLMDROP_HAVE_X86_SIMD
      if (avx2) {
        dequant_row_avx2<Format>(p.weight + o * bytes, p.in, wrow);
        continue;
      }
#endif
      dequant_row_portable<Format>(p.weight + o * bytes, p.in, wrow);
    }
  });
}

// Many rows: y = x @ W.T one tile of output rows at a time (about 1 MB of fp32, so it stays in cache
// between dequantisation and GEMM).
template <class Format>
void tiled_matmul(const Problem& p, const at::Tensor& x, at::Tensor& y) {
  const int64_t tile = std::max<int64_t>(16, ((int64_t{1} << 18) / p.in) / 16 * 16);
  at::Tensor w = at::empty({std::min(tile, p.out), p.in}, x.options());
  for (int64_t o0 = 0; o0 < p.out; o0 += tile) {
    const int64_t o1 = std::min(p.out, o0 + tile);
    dequant_rows<Format>(p, o0, o1, w.data_ptr<float>());
    at::Tensor y_tile = y.narrow(1, o0, o1 - o0);
    at::mm_out(y_tile, x, w.narrow(0, 0, o1 - o0).t());
  }
}

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------
template <class Format>
void check_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const std::string op = std::string("gemv_") + Format::kName;
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && (!bias || bias->device().is_cpu()), op,
              ": all tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, op, ": x must be float32 [rows, in], got ",
              x.scalar_type(), " ", x.sizes());
  const int64_t in = x.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), op, ": weight must be a contiguous 2-D tensor, got ",
              weight.sizes(), weight.is_contiguous() ? "" : " (not contiguous)");
  if constexpr (Format::kBlocked) {
    TORCH_CHECK(weight.scalar_type() == at::kByte, op, ": weight must be uint8 blocks [out, in / 32 * ",
                Format::kBytes, "], got ", weight.scalar_type());
    TORCH_CHECK(in % kBlock == 0, op, ": in (", in, ") must be a multiple of the block size 32");
    TORCH_CHECK(weight.size(1) == row_bytes<Format>(in), op, ": weight has ", weight.size(1),
                " bytes per row, x has ", in, " features (expected ", row_bytes<Format>(in), " bytes: ",
                in / kBlock, " blocks of ", Format::kBytes, ")");
  } else {
    TORCH_CHECK(weight.scalar_type() == Format::kDtype, op, ": weight must be ", Format::kDtype, ", got ",
                weight.scalar_type());
    TORCH_CHECK(weight.size(1) == in, op, ": weight has ", weight.size(1), " input features, x has ", in);
  }
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == at::kFloat),
              op, ": bias must be float32 [", weight.size(0), "], got ", bias ? bias->scalar_type() : at::kFloat,
              " ", bias ? bias->sizes() : at::IntArrayRef{});
}

template <class Format>
at::Tensor& gemv_out(const at::Tensor& x_any, const at::Tensor& weight, const c10::optional<at::Tensor>& bias_any,
                     at::Tensor& y) {
  check_args<Format>(x_any, weight, bias_any);
  const int64_t rows = x_any.size(0), in = x_any.size(1), out = weight.size(0);
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kFloat && y.is_contiguous() &&
                  y.sizes() == at::IntArrayRef({rows, out}),
              "gemv_", Format::kName, ": out must be a contiguous float32 [", rows, ", ", out, "] CPU tensor, got ",
              y.scalar_type(), " ", y.sizes());
  if (rows == 0 || out == 0) return y;
  const at::Tensor x = x_any.contiguous();
  const c10::optional<at::Tensor> bias = bias_any ? c10::optional<at::Tensor>(bias_any->contiguous()) : c10::nullopt;
  if constexpr (std::is_same_v<Format, F32>) {  // a dense fp32 weight already is what a GEMM wants
    if (rows > kGemvMaxRows) {
      if (bias) return at::addmm_out(y, *bias, x, weight.t());
      return at::mm_out(y, x, weight.t());
    }
  }
  Problem p{x.data_ptr<float>(), static_cast<const uint8_t*>(weight.data_ptr()),
            bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), rows, in, out, nullptr, nullptr, nullptr};
  if (rows <= kGemvMaxRows) {
    QuantizedX xq;
    if constexpr (Format::kBlocked) {
      xq = quantize_x(p.x, rows, in, has_offset<Format>());
      p.xq = xq.values.data(), p.xscale = xq.scales.data(), p.xsums = xq.sums.data();
    }
    gemv<Format>(p);
  } else {
    tiled_matmul<Format>(p, x, y);
    if (bias) y.add_(*bias);
  }
  return y;
}

template <class Format>
at::Tensor gemv_op(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  at::Tensor y = at::empty({x.dim() == 2 ? x.size(0) : 0, weight.dim() == 2 ? weight.size(0) : 0},
                           x.options().dtype(at::kFloat));
  return gemv_out<Format>(x, weight, bias, y);
}

template <class Format>
void define_ops(torch::Library& m) {
  const std::string name = std::string("gemv_") + Format::kName;
  m.def((name + "(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor").c_str(), &gemv_op<Format>);
  m.def((name + ".out(Tensor x, Tensor weight, Tensor? bias, *, Tensor(a!) out) -> Tensor(a!)").c_str(),
        &gemv_out<Format>);
}

// Cap the vector width the kernels may use (256 or 0 bits); returns the width now in use.
int64_t set_max_simd_bits(int64_t bits) {
  simd_bits_cap.store(static_cast<int>(bits));
  return simd_bits();
}

int64_t simd_width() { return simd_bits(); }

}  // namespace

TORCH_LIBRARY(llmdrop_cpu_gemv, m) {
  define_ops<F32>(m);
  define_ops<F16>(m);
  define_ops<BF16>(m);
  define_ops<Q8_0>(m);
  define_ops<Q4_0>(m);
  define_ops<Q4_1>(m);
  m.def("simd_width() -> int", &simd_width);
  m.def("set_max_simd_bits(int bits) -> int", &set_max_simd_bits);
}

// An empty Python module: importing it loads this library, which registers the ops above.
extern "C" PyMODINIT_FUNC PyInit__cpu_gemv(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_gemv",
                               "llmdrop-rt decode-shaped CPU linear kernels (torch.ops.llmdrop_cpu_gemv)", -1, nullptr};
  return PyModule_Create(&module);
}
