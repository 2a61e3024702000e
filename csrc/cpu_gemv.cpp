// CPU linear layers shaped for decoding: y[m, o] = sum_i x[m, i] * W[o, i] (+ bias[o]), x and y fp32.
//
// Weight formats (each op's suffix):
//   f32, f16, bf16    dense [out, in] tensors of that dtype.
//   q8_0, q4_0, q4_1  ggml blocks of 32 consecutive input columns, byte for byte as in a GGUF file, held as
//                     uint8 [out, in / 32 * block_bytes] (the blocks of one output row back to back):
//                       q8_0, 34 bytes: fp16 d, int8 q[32]             w = d * q
//                       q4_0, 18 bytes: fp16 d, uint8 qs[16]           w = d * (q - 8)
//                       q4_1, 20 bytes: fp16 d, fp16 m, uint8 qs[16]   w = d * q + m
//                     where qs[j] holds element j in its low nibble and element j + 16 in its high nibble.
//                     The scales stay fp16, as GGUF stores them, so GGUF tensors are used without repacking.
//
// Up to kGemvMaxRows activation rows (decode): a fused GEMV. Dense weights are converted to fp32 in
// registers and multiplied with x by FMA. For block formats x is first quantised per block of 32 to int16
// (x ~ sx * xq, sx = max|x| / 32767 over the block: each x is off by at most 1.5e-5 of the largest
// magnitude in its block); the
// dot of a block's integer values (q, or q - 8) with xq is then an exact int32 sum of pairwise int16
// products (_mm256_madd_epi16), scaled by d * sx into an fp32 accumulator. q4_1's m contributes
// m * (sum of x over the block), from per-block sums of the unquantised x. Both steps run once per call.
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
constexpr int64_t kMinTaskBytes = 32 << 10;  // weight bytes per thread below which threading does not pay

inline float fp16_bits_to_float(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// Element j of the 32 nibbles in qs[16].
inline int nibble(const uint8_t* qs, int j) { return j < 16 ? qs[j] >> 4 : qs[j - 16] & 0xF; }

// ---------------------------------------------------------------------------------------------
// Formats. Dense ones say how to read elements; block ones where d, m and the values sit in a
// block and what integer value element j has (its weight is d * value, plus m for q4_1).
// |value| <= 128, so a block's dot with int16 activations fits int32 with room to spare.
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
  static constexpr bool kHasMin = false;
  static int value(const uint8_t* values, int j) { return static_cast<int8_t>(values[j]); }
};

struct Q4_0 {
  static constexpr bool kBlocked = true;
  static constexpr const char* kName = "q4_0";
  static constexpr int64_t kBytes = 18;
  static constexpr int64_t kValuesAt = 2;
  static constexpr bool kHasMin = false;
  static int value(const uint8_t* values, int j) { return nibble(values, j) - 8; }
};

struct Q4_1 {
  static constexpr bool kBlocked = true;
  static constexpr const char* kName = "q4_1";
  static constexpr int64_t kBytes = 20;
  static constexpr int64_t kValuesAt = 4;
  static constexpr bool kHasMin = true;  // m, fp16 at byte 2
  static int value(const uint8_t* values, int j) { return nibble(values, j); }
};

// q4_1's m term needs the sums of x over each block.
template <class Format>
constexpr bool needs_block_sums() {
  if constexpr (Format::kBlocked) {
    return Format::kHasMin;
  } else {
    return false;
  }
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
  // The GEMV of block formats reads x as QuantizedX (quantize_x below) instead:
  const int16_t* xq;       // [rows, in]
  const float* xscale;     // [rows, in / 32], x ~ xscale * xq per block
  const float* xsums;      // [rows, in / 32], sums of x over each block (q4_1 only)
};

// x [rows, in] quantised per block of 32 columns to int16 (see the top of the file).
struct QuantizedX {
  std::vector<int16_t> values;
  std::vector<float> scales, sums;
};

QuantizedX quantize_x(const float* x, int64_t rows, int64_t in, bool with_sums) {
  const int64_t blocks = rows * (in / kBlock);
  QuantizedX q{std::vector<int16_t>(rows * in), std::vector<float>(blocks), std::vector<float>(with_sums ? blocks : 0)};
  for (int64_t b = 0; b < blocks; ++b) {
    const float* xb = x + b * kBlock;
    float largest = 0.f, sum = 0.f;
    for (int j = 0; j < kBlock; ++j) {
      largest = std::max(largest, std::fabs(xb[j]));
      sum += xb[j];
    }
    const float inverse = largest > 0.f ? 32767.f / largest : 0.f;
    for (int j = 0; j < kBlock; ++j)  // round half away from zero
      q.values[b * kBlock + j] = static_cast<int16_t>(xb[j] * inverse + std::copysign(0.5f, xb[j]));
    q.scales[b] = largest / 32767.f;
    if (with_sums) q.sums[b] = sum;
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
        const int16_t* xq = p.xq + (m0 + r) * p.in + b * kBlock;
        int32_t block_dot = 0;
        for (int j = 0; j < kBlock; ++j) block_dot += Format::value(block + Format::kValuesAt, j) * xq[j];
        const int64_t xb = (m0 + r) * blocks + b;
        total += static_cast<float>(block_dot) * (fp16_bits_to_float(block) * p.xscale[xb]);
        if constexpr (Format::kHasMin) total += fp16_bits_to_float(block + 2) * p.xsums[xb];
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
      const float m = Format::kHasMin ? fp16_bits_to_float(block + 2) : 0.f;
      for (int j = 0; j < kBlock; ++j) w[b * kBlock + j] = d * Format::value(block + Format::kValuesAt, j) + m;
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

// The low nibbles of qs are elements 0-15, the high ones 16-31; `offset` is subtracted from each.
template <bool kSigned>
LLMDROP_AVX2 inline void nibble_values_avx2(const uint8_t* values, int offset, __m256i q[2]) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(values));
  const __m128i low_mask = _mm_set1_epi8(0x0F), bias = _mm_set1_epi8(static_cast<char>(offset));
  q[1] = bytes_to_int16<kSigned>(_mm_sub_epi8(_mm_and_si128(packed, low_mask), bias));
  q[0] = bytes_to_int16<kSigned>(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(packed, 4), low_mask), bias));
}
LLMDROP_AVX2 inline void block_values_avx2(Q4_0, const uint8_t* values, __m256i q[2]) {
  nibble_values_avx2<true>(values, 8, q);
}
LLMDROP_AVX2 inline void block_values_avx2(Q4_1, const uint8_t* values, __m256i q[2]) {
  nibble_values_avx2<false>(values, 0, q);
}

// Independent accumulators per activation row: enough chains to hide the FMA latency with few rows.
template <int NROWS>
constexpr int kChains = NROWS == 1 ? 4 : 2;

// total[r] += W[o, block b] . x[m0 + r], the m term (q4_1) into min_term[r], for NROWS activation rows.
template <class Format, int NROWS>
LLMDROP_AVX2 inline void accumulate_block_avx2(const Problem& p, const uint8_t* wrow, int64_t m0, int64_t b,
                                               __m256 (&total)[NROWS], float (&min_term)[NROWS]) {
  const int64_t blocks = p.in / kBlock;
  const uint8_t* block = wrow + b * Format::kBytes;
  __m256i q[2];
  block_values_avx2(Format{}, block + Format::kValuesAt, q);
  const __m256 d = _mm256_set1_ps(fp16_bits_to_float_f16c(block));
  for (int r = 0; r < NROWS; ++r) {
    const int16_t* xq = p.xq + (m0 + r) * p.in + b * kBlock;
    const int64_t xb = (m0 + r) * blocks + b;
    const __m256i block_dot =
        _mm256_add_epi32(_mm256_madd_epi16(q[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq))),
                         _mm256_madd_epi16(q[1], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16))));
    total[r] =
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot), _mm256_mul_ps(d, _mm256_broadcast_ss(p.xscale + xb)), total[r]);
    if constexpr (Format::kHasMin) min_term[r] += fp16_bits_to_float_f16c(block + 2) * p.xsums[xb];
  }
}

// dots[r] = W[o] . x[m0 + r] for NROWS activation rows (compile-time, so the accumulators stay in registers).
template <class Format, int NROWS>
LLMDROP_AVX2 void row_dots_avx2(const Problem& p, const uint8_t* wrow, int64_t m0, float* dots) {
  constexpr int chains = kChains<NROWS>;
  if constexpr (Format::kBlocked) {
    const int64_t blocks = p.in / kBlock;
    __m256 total[chains][NROWS];  // chain c accumulates blocks c, c + chains, ...
    float min_term[chains][NROWS];
    for (int c = 0; c < chains; ++c) {
      for (int r = 0; r < NROWS; ++r) {
        total[c][r] = _mm256_setzero_ps();
        min_term[c][r] = 0.f;
      }
    }
    int64_t b = 0;
    for (; b + chains <= blocks; b += chains)
      for (int c = 0; c < chains; ++c) accumulate_block_avx2<Format, NROWS>(p, wrow, m0, b + c, total[c], min_term[c]);
    for (; b < blocks; ++b) accumulate_block_avx2<Format, NROWS>(p, wrow, m0, b, total[0], min_term[0]);
    for (int r = 0; r < NROWS; ++r) {
      for (int c = 1; c < chains; ++c) {
        total[0][r] = _mm256_add_ps(total[0][r], total[c][r]);
        min_term[0][r] += min_term[c][r];
      }
      dots[r] = hsum_avx2(total[0][r]) + min_term[0][r];
    }
  } else {
    const auto* w = reinterpret_cast<const typename Format::Element*>(wrow);
    const float* x = p.x + m0 * p.in;
    const int64_t in = p.in;
    __m256 acc[NROWS][chains];  // chain c accumulates columns 8c..8c+7 of every 8 * chains
    for (int r = 0; r < NROWS; ++r)
      for (int c = 0; c < chains; ++c) acc[r][c] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 * chains <= in; i += 8 * chains) {
      __m256 wv[chains];
      for (int c = 0; c < chains; ++c) wv[c] = load8(w + i + 8 * c);
      for (int r = 0; r < NROWS; ++r)
        for (int c = 0; c < chains; ++c)
          acc[r][c] = _mm256_fmadd_ps(wv[c], _mm256_loadu_ps(x + r * in + i + 8 * c), acc[r][c]);
    }
    for (; i + 8 <= in; i += 8) {
      const __m256 wv = load8(w + i);
      for (int r = 0; r < NROWS; ++r) acc[r][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * in + i), acc[r][0]);
    }
    for (int r = 0; r < NROWS; ++r) {
      for (int c = 1; c < chains; ++c) acc[r][0] = _mm256_add_ps(acc[r][0], acc[r][c]);
      float total = hsum_avx2(acc[r][0]);
      for (int64_t t = i; t < in; ++t) total += Format::to_float(w[t]) * x[r * in + t];
      dots[r] = total;
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
      const __m256 d = _mm256_set1_ps(fp16_bits_to_float_f16c(block));
      const __m256 m = _mm256_set1_ps(Format::kHasMin ? fp16_bits_to_float_f16c(block + 2) : 0.f);
      for (int k = 0; k < 4; ++k) {
        const __m128i eight = k % 2 ? _mm256_extracti128_si256(q[k / 2], 1) : _mm256_castsi256_si128(q[k / 2]);
        const __m256 values = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(eight));
        _mm256_storeu_ps(w + b * kBlock + 8 * k, _mm256_fmadd_ps(values, d, m));
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
template <class Format, int NROWS>
void row_dots(bool avx2, const Problem& p, const uint8_t* wrow, int64_t m0, float* dots) {
#ifdef LLMDROP_HAVE_X86_SIMD
  if (avx2) return row_dots_avx2<Format, NROWS>(p, wrow, m0, dots);
#endif
  row_dots_portable<Format>(p, wrow, m0, NROWS, dots);
}

template <class Format>
void gemv(const Problem& p) {
  const bool avx2 = simd_bits() >= 256;
  const int64_t bytes = row_bytes<Format>(p.in);
  at::parallel_for(0, p.out, std::max<int64_t>(1, kMinTaskBytes / std::max<int64_t>(bytes, 1)),
                   [&](int64_t o_begin, int64_t o_end) {
    for (int64_t o = o_begin; o < o_end; ++o) {
      const uint8_t* wrow = p.weight + o * bytes;
      const float bias = p.bias ? p.bias[o] : 0.f;
      for (int64_t m0 = 0; m0 < p.rows; m0 += kRowBlock) {
        float dots[kRowBlock];
        switch (std::min(kRowBlock, p.rows - m0)) {
          case 1: row_dots<Format, 1>(avx2, p, wrow, m0, dots); break;
          case 2: row_dots<Format, 2>(avx2, p, wrow, m0, dots); break;
          case 3: row_dots<Format, 3>(avx2, p, wrow, m0, dots); break;
          default: row_dots<Format, 4>(avx2, p, wrow, m0, dots); break;
        }
        for (int64_t r = 0; r < std::min(kRowBlock, p.rows - m0); ++r) p.y[(m0 + r) * p.out + o] = dots[r] + bias;
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
      xq = quantize_x(p.x, rows, in, needs_block_sums<Format>());
      p.xq = xq.values.data(), p.xscale = xq.scales.data(), p.xsums = xq.sums.data();
    }
    gemv<Format>(p);
  } else {
    tiled_matmul<Format>(p, x, y);
    (void)0;
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
