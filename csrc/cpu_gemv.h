// CPU linear layers shaped for decoding: y[m, o] = sum_i x[m, i] * W[o, i] (+ bias[o]), x and y fp32.
//
// Weight formats (each op's suffix):
//   f32, f16, bf16    dense [out, in] tensors of that dtype.
//   q8_0, q4_0, q4_1  ggml's blocks of 32 consecutive input columns (GGUF's bytes):
//                       q8_0, 34 bytes: fp16 d, int8 q[32]             w = d * q
//                       q4_0, 18 bytes: fp16 d, uint8 qs[16]           w = d * q - 8 d
//                       q4_1, 20 bytes: fp16 d, fp16 m, uint8 qs[16]   w = d * q + m
//                     where qs[j] holds element j in its low nibble and element j + 16 in its high nibble,
//                     held as uint8 [out, in / 32 * block_bytes] in the row-interleaved layout below.
//
// Row-interleaved layout (llmdrop_rt.quant.cpu_linear.interleave): every full group of 8 output rows stores,
// for each block column b, one group block of 8 * block_bytes bytes: the 8 rows' d (8 fp16), for q4_1 their
// 8 m, then their quantised values in lanes: lane k holds bytes k*L .. k*L+L-1 of each row's values, row 0 to
// row 7 (L = 4 for the 4-bit formats, 2 for q8_0). One 256-bit load then holds the same few columns of 8 rows,
// so a kernel multiplies them with one broadcast piece of x and ends with the 8 rows' sums in the 8 lanes of a
// vector, with no horizontal sums. The last out % 8 rows stay as plain GGUF rows.
//
// Up to kGemvMaxRows activation rows (decode), and any number for the block formats (see fused_kernels_for): a
// fused GEMV. Dense weights are converted to fp32 in
// registers and multiplied with x by FMA. For block formats x is first quantised per block of 32 (x ~ sx * xq,
// sx = max|x| / 127 over the block into int8 for the 4-bit formats, as llama.cpp quantises activations for
// them; / 32767 into int16 for q8_0, whose int8 weights would otherwise dominate its error less than x's);
// the dot of a block's integer values with xq is an exact integer sum (_mm256_maddubs_epi16 / _mm256_madd_epi16),
// scaled by d * sx into an fp32 accumulator. A group block's values are unpacked once for up to 8 activation
// rows (kRowsPerPass), which is what makes several rows cheaper per row than one. The offset of the 4-bit
// formats contributes to the integer dot exactly for q4_0 (-8 * the sum of xq over the block, offset_term) and as
// m * sx * (sum of xq) for q4_1: the kernels compute W times the quantised x, so the error is that of x's rounding
// times w, not times the 0..15 stored values the offset would otherwise cancel. x is quantised once per call.
// More rows of a dense format (prefill): tiles of output rows are dequantised to fp32 and ATen's GEMM does the rest.
// A GEMV tile reads several distant stretches of the weight in turn (streams_for), and each
// thread of at::parallel_for (torch's thread pool) walks its own contiguous range of tiles (ChunkRanges), so every
// core keeps several long sequential streams in flight: one stream per core reads well below the memory's rate.
// x86-64 builds carry AVX2 + FMA + F16C kernels picked at run time, and AVX-512 VNNI ones for the block formats at
// several activation rows, where integer multiply-adds rather than memory bound the GEMV, and for the 4-bit formats
// at one row, where half of AVX2's instructions per byte let a core read closer to its rate (functions compiled
// with target attributes, so the build needs only the baseline ISA); portable loops run elsewhere, and for the
// plain rows after the last full group.
//
// This header is the kernels themselves, shared by the extensions that call them (cpu_gemv.cpp's ops, the decode
// step of cpu_decode.cpp), each compiling its own private copy (an anonymous namespace).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "x86_simd.h"

namespace {


constexpr int64_t kGemvMaxRows = 8;  // more activation rows than this: dequantised tiles + GEMM
constexpr int64_t kRowsPerPass = 8;  // activation rows sharing one pass over (and decode of) the weights
constexpr int64_t kBlock = 32;       // input columns per quantisation block
constexpr int64_t kGroupRows = 8;    // output rows interleaved in the block formats' layout
constexpr int64_t kChunkBytes = 32 << 10;  // weight bytes a thread claims at a time in the GEMV
// Bytes of a block-format weight stream requested ahead of use. Dense rows are left to the hardware prefetchers:
// SmolLM2's fp32 and fp16 GEMVs ran 10-20 % faster without software prefetches, its q4 ones slower. q8_0 at one
// activation row (34 bytes per 32 weights, streamed almost like a dense row) also ran faster without them.
constexpr int64_t kPrefetchAhead = 2048;

inline float fp16_bits_to_float(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// ---------------------------------------------------------------------------------------------
// Formats. Dense ones say how to read elements. Block ones say where d, m and the values sit in a plain
// block, how wide a lane of the interleaved layout is, what integer value element j has (from the block's
// value bytes), the block's offset (w = d * value + offset: d * kValueOffset, or the fp16 m at byte 2), and
// the integer type x is quantised to for them.
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
  using XInt = int16_t;
  static constexpr float kXMax = 32767.f;
  static constexpr bool kBlocked = true;
  static constexpr const char* kName = "q8_0";
  static constexpr int64_t kBytes = 34;
  static constexpr int64_t kValuesAt = 2;  // byte offset of the values; d is at 0
  static constexpr int64_t kLaneBytes = 2;
  static constexpr int kValueOffset = 0;
  static constexpr bool kStoredOffset = false;
  template <class Bytes>
  static int value(const Bytes& byte, int j) { return static_cast<int8_t>(byte(j)); }
};

// Element j of the 32 nibbles in 16 value bytes.
template <class Bytes>
inline int nibble(const Bytes& byte, int j) { return j < 16 ? byte(j) & 0xF : byte(j - 16) >> 4; }

struct Q4_0 {
  using XInt = int8_t;
  static constexpr float kXMax = 127.f;
  static constexpr bool kBlocked = true;
  static constexpr const char* kName = "q4_0";
  static constexpr int64_t kBytes = 18;
  static constexpr int64_t kValuesAt = 2;
  static constexpr int64_t kLaneBytes = 4;
  static constexpr int kValueOffset = -8;
  static constexpr bool kStoredOffset = false;
  template <class Bytes>
  static int value(const Bytes& byte, int j) { return nibble(byte, j); }
};

struct Q4_1 {
  using XInt = int8_t;
  static constexpr float kXMax = 127.f;
  static constexpr bool kBlocked = true;
  static constexpr const char* kName = "q4_1";
  static constexpr int64_t kBytes = 20;
  static constexpr int64_t kValuesAt = 4;
  static constexpr int64_t kLaneBytes = 4;
  static constexpr int kValueOffset = 0;
  static constexpr bool kStoredOffset = true;
  template <class Bytes>
  static int value(const Bytes& byte, int j) { return nibble(byte, j); }
};

// The offset term of the 4-bit formats needs the sums of the quantised x over each block: as floats times x's scale
// for a stored offset (q4_1's m), as integers times the offset for a value offset (q4_0's -8).
template <class Format>
constexpr bool has_stored_offset() {
  if constexpr (Format::kBlocked) {
    return Format::kStoredOffset;
  } else {
    return false;
  }
}

template <class Format>
constexpr bool has_value_offset() {
  if constexpr (Format::kBlocked) {
    return Format::kValueOffset != 0;
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

// One output row's block b, wherever the layout puts its parts.
template <class Format>
struct BlockRef {
  const uint8_t* d;       // fp16
  const uint8_t* m;       // fp16, q4_1 only
  const uint8_t* values;  // the value bytes, or lane 0 of the group block
  int64_t lane_row;       // row within its group (-1: a plain GGUF block, values contiguous)

  uint8_t byte(int64_t k) const {
    if (lane_row < 0) return values[k];
    constexpr int64_t lane = Format::kLaneBytes;
    return values[(k / lane) * kGroupRows * lane + lane_row * lane + k % lane];
  }
  int value(int j) const {
    return Format::value([this](int k) { return byte(k); }, j);
  }
  float offset(float scale) const {
    return Format::kStoredOffset ? fp16_bits_to_float(m) : static_cast<float>(Format::kValueOffset) * scale;
  }
};

template <class Format>
BlockRef<Format> block_ref(const uint8_t* weight, int64_t in, int64_t out, int64_t o, int64_t b) {
  const int64_t bytes = row_bytes<Format>(in);
  if (o < out / kGroupRows * kGroupRows) {
    const int64_t r = o % kGroupRows;
    const uint8_t* group_block = weight + (o - r) * bytes + b * kGroupRows * Format::kBytes;
    return {group_block + 2 * r, group_block + 2 * kGroupRows + 2 * r,
            group_block + kGroupRows * Format::kValuesAt, r};
  }
  const uint8_t* block = weight + o * bytes + b * Format::kBytes;
  return {block, block + 2, block + Format::kValuesAt, -1};
}

// Everything a kernel needs; pointers are to contiguous data.
template <class Format>
struct Problem {
  const float* x;          // [rows, in]
  const uint8_t* weight;   // [out, row_bytes]
  const float* bias;       // [out] or nullptr
  float* y;                // [rows, out]
  int64_t rows, in, out;
  // The GEMV of block formats reads x as QuantizedX (quantize_x below) instead, block-major so that the
  // activation rows of one block lie together:
  const void* xq;          // [in / 32, rows, 32] of the format's XInt
  const float* xscale;     // [in / 32, rows], x ~ xscale * xq per block
  const float* xsums;      // [in / 32, rows], q4_1: the sums of the quantised x over each block times its scale
  const int32_t* xoffsets; // [in / 32, rows], q4_0: kValueOffset times the sum of the quantised x over each block
};

// For formats whose offset is a whole number of d (q4_0's -8 d), the offset's part of block xb's integer dot,
// which joins it exactly: sum(q * xq) + kValueOffset * sum(xq) = sum((q + kValueOffset) * xq), so the large
// opposite terms never meet in floating point. 0 for the other formats.
template <class Format>
inline int32_t offset_term(const Problem<Format>& p, int64_t xb) {
  if constexpr (Format::kValueOffset != 0) return p.xoffsets[xb];
  return 0;
}

template <class XInt>
struct QuantizedX {
  std::vector<XInt> values;
  std::vector<float> scales, sums;
  std::vector<int32_t> offsets;
};

// One block of 32 values of x quantised into XInt: values, and returns the scale; *sum = the values' sum. A NaN
// or infinity in the block makes the scale NaN (so every output it touches is NaN) and the values 0.
template <class Format>
float quantize_block_portable(const float* xb, typename Format::XInt* values, int32_t* sum) {
  using XInt = typename Format::XInt;
  float largest = 0.f;
  bool finite = true;
  for (int j = 0; j < kBlock; ++j) {
    finite = finite && std::isfinite(xb[j]);
    largest = std::max(largest, std::fabs(xb[j]));
  }
  const float inverse = finite && largest > 0.f ? Format::kXMax / largest : 0.f;
  *sum = 0;
  for (int j = 0; j < kBlock; ++j) {  // round half away from zero
    values[j] = finite ? static_cast<XInt>(xb[j] * inverse + std::copysign(0.5f, xb[j])) : 0;
    *sum += values[j];
  }
  return finite ? largest / Format::kXMax : std::numeric_limits<float>::quiet_NaN();
}

#ifdef LLMDROP_HAVE_X86_SIMD
// The same, eight lanes at a time, with the same roundings (a product, then the sum with +-0.5, truncated).
template <class Format>
LLMDROP_AVX2 float quantize_block_avx2(const float* xb, typename Format::XInt* values, int32_t* sum) {
  const __m256 sign_bit = _mm256_set1_ps(-0.f), infinity = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 x[4], largest = _mm256_setzero_ps(), not_finite = _mm256_setzero_ps();
  for (int k = 0; k < 4; ++k) {
    x[k] = _mm256_loadu_ps(xb + 8 * k);
    const __m256 magnitude = _mm256_andnot_ps(sign_bit, x[k]);
    not_finite = _mm256_or_ps(not_finite, _mm256_cmp_ps(magnitude, infinity, _CMP_NLT_UQ));  // inf or NaN
    largest = _mm256_max_ps(largest, magnitude);
  }
  __m128 top = _mm_max_ps(_mm256_castps256_ps128(largest), _mm256_extractf128_ps(largest, 1));
  top = _mm_max_ps(top, _mm_movehl_ps(top, top));
  const float largest_scalar = _mm_cvtss_f32(_mm_max_ss(top, _mm_shuffle_ps(top, top, 1)));
  if (_mm256_movemask_ps(not_finite)) {
    std::fill(values, values + kBlock, 0);
    *sum = 0;
    return std::numeric_limits<float>::quiet_NaN();
  }
  const __m256 inverse = _mm256_set1_ps(largest_scalar > 0.f ? Format::kXMax / largest_scalar : 0.f);
  __m256i q[4];
  for (int k = 0; k < 4; ++k) {
    const __m256 half = _mm256_or_ps(_mm256_set1_ps(0.5f), _mm256_and_ps(sign_bit, x[k]));
    q[k] = _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(x[k], inverse), half));
  }
  const __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  *sum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
  // packs work within 128-bit halves: the permutes put the 32 values back in order.
  const __m256i low16 = _mm256_packs_epi32(q[0], q[1]), high16 = _mm256_packs_epi32(q[2], q[3]);
  if constexpr (std::is_same_v<typename Format::XInt, int16_t>) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(values), _mm256_permute4x64_epi64(low16, 0xD8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(values + 16), _mm256_permute4x64_epi64(high16, 0xD8));
  } else {
    const __m256i bytes = _mm256_packs_epi16(low16, high16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(values),
                        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
  return largest_scalar / Format::kXMax;
}
#endif

// ---------------------------------------------------------------------------------------------
// Portable kernels
// ---------------------------------------------------------------------------------------------
// dots[r] = W[o] . x[m0 + r] for output row o and nrows activation rows.
template <class Format>
void row_dots_portable(const Problem<Format>& p, int64_t o, int64_t m0, int64_t nrows, float* dots) {
  for (int64_t r = 0; r < nrows; ++r) {
    float total = 0.f;
    if constexpr (Format::kBlocked) {
      const auto* xq_all = static_cast<const typename Format::XInt*>(p.xq);
      for (int64_t b = 0; b < p.in / kBlock; ++b) {
        const BlockRef<Format> block = block_ref<Format>(p.weight, p.in, p.out, o, b);
        const int64_t xb = b * p.rows + m0 + r;
        const auto* xq = xq_all + xb * kBlock;
        int32_t block_dot = offset_term(p, xb);
        for (int j = 0; j < kBlock; ++j) block_dot += block.value(j) * xq[j];
        const float d = fp16_bits_to_float(block.d);
        total += static_cast<float>(block_dot) * (d * p.xscale[xb]);
        if constexpr (Format::kStoredOffset) total += block.offset(d) * p.xsums[xb];
      }
    } else {
      const auto* w = reinterpret_cast<const typename Format::Element*>(p.weight + o * row_bytes<Format>(p.in));
      const float* x = p.x + (m0 + r) * p.in;
      for (int64_t i = 0; i < p.in; ++i) total += Format::to_float(w[i]) * x[i];
    }
    dots[r] = total;
  }
}

template <class Format>
void dequant_row_portable(const Problem<Format>& p, int64_t o, float* w) {
  if constexpr (Format::kBlocked) {
    for (int64_t b = 0; b < p.in / kBlock; ++b) {
      const BlockRef<Format> block = block_ref<Format>(p.weight, p.in, p.out, o, b);
      const float d = fp16_bits_to_float(block.d);
      const float offset = block.offset(d);
      for (int j = 0; j < kBlock; ++j) w[b * kBlock + j] = d * block.value(j) + offset;
    }
  } else {
    const auto* elements = reinterpret_cast<const typename Format::Element*>(p.weight + o * row_bytes<Format>(p.in));
    for (int64_t i = 0; i < p.in; ++i) w[i] = Format::to_float(elements[i]);
  }
}

#ifdef LLMDROP_HAVE_X86_SIMD
// ---------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C kernels (used only when the CPU reports all three)
// ---------------------------------------------------------------------------------------------
using llmdrop::hsum_avx2;

using llmdrop::load8;

// Eight fp16 values (the 8 rows' d or m of a group block) as fp32.
LLMDROP_AVX2 inline __m256 load8_fp16(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Four bytes (int8 x) or two int16 x values, the same in all eight 32-bit lanes.
LLMDROP_AVX2 inline __m256i broadcast32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm256_set1_epi32(v);
}

// Independent accumulators per (weight row, activation row) pair: enough chains in all to hide the FMA latency.
constexpr int chains_for(int pairs) { return pairs >= 4 ? 1 : 4 / pairs; }

// The 4-bit values of one group block, unpacked once so that every activation row's dot reuses them: lane c of
// the block holds columns 4c..4c+3 of each of the 8 rows in its low nibbles and 16+4c..19+4c in its high ones.
struct NibbleGroup {
  __m256i low[4], high[4];
  LLMDROP_AVX2 explicit NibbleGroup(const uint8_t* values) {
    const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
    for (int c = 0; c < 4; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + 32 * c));
      low[c] = _mm256_and_si256(v, low_nibbles);
      high[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low_nibbles);
    }
  }
  // Lane k: the integer dot of row k's 32 values with the int8 xq[0 .. 32). maddubs makes int16 sums of pairs of
  // products; 8 of them per lane stay below 2^15 (8 * 2 * 15 * 127).
  LLMDROP_AVX2 __m256i dot(const int8_t* xq) const {
    __m256i pairs[4];
    for (int c = 0; c < 4; ++c)
      pairs[c] = _mm256_add_epi16(_mm256_maddubs_epi16(low[c], broadcast32(xq + 4 * c)),
                                  _mm256_maddubs_epi16(high[c], broadcast32(xq + 16 + 4 * c)));
    const __m256i total = _mm256_add_epi16(_mm256_add_epi16(pairs[0], pairs[1]), _mm256_add_epi16(pairs[2], pairs[3]));
    return _mm256_madd_epi16(total, _mm256_set1_epi16(1));
  }
};

// The integer dots of one q8_0 group block with NROWS activation rows' int16 x: sums[r] lane k = row k's dot.
// Lane k of the block holds columns 2k, 2k+1 of each row; each widened vector serves all the rows at once.
template <int NROWS>
LLMDROP_AVX2 inline void group_block_dots_q8(const uint8_t* values, const int16_t* xq, int64_t row_stride,
                                             __m256i (&sums)[NROWS]) {
  for (int r = 0; r < NROWS; ++r) sums[r] = _mm256_setzero_si256();
  for (int k = 0; k < 16; ++k) {
    const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(values + 16 * k)));
    for (int r = 0; r < NROWS; ++r)
      sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(w, broadcast32(xq + r * row_stride + 2 * k)));
  }
}

// acc += one group block's contribution for one activation row (block xb of QuantizedX): the integer dots `sum`
// of its 8 rows (q4_0's offset joined in, offset_term) scaled by d and x's scale, and for q4_1 the rows' m times
// the sum of x over the block.
template <class Format>
LLMDROP_AVX2 inline void accumulate_block(__m256& acc, __m256 d, __m256 m, __m256i sum, const Problem<Format>& p,
                                          int64_t xb) {
  if constexpr (Format::kValueOffset != 0)
    sum = _mm256_add_epi32(sum, _mm256_set1_epi32(offset_term(p, xb)));
  acc = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(p.xscale[xb])), _mm256_cvtepi32_ps(sum), acc);
  if constexpr (Format::kStoredOffset) acc = _mm256_fmadd_ps(m, _mm256_set1_ps(p.xsums[xb]), acc);
}

// The 8 rows' m in a group block of q4_1 (zeros for the other formats, which do not read them).
template <class Format>
LLMDROP_AVX2 inline __m256 group_mins(const uint8_t* block) {
  if constexpr (Format::kStoredOffset) return load8_fp16(block + 2 * kGroupRows);
  return _mm256_setzero_ps();
}

// acc[g][r] lane k += W[row k of group g] . x[m0 + r] for G groups of 8 rows (starting at groups[g]) and NROWS
// activation rows; the groups' blocks are read in turn, so G streams of the weight are in flight. A 4-bit group
// block is unpacked once and then serves the rows one after the other, each row's dot finished before the next
// begins, so that few vectors are live at a time.
template <class Format, int G, int NROWS>
LLMDROP_AVX2 void group_dots_avx2(const Problem<Format>& p, const uint8_t* const* groups, int64_t m0,
                                  __m256 (&acc)[G][NROWS]) {
  using XInt = typename Format::XInt;
  const auto* xq_all = static_cast<const XInt*>(p.xq);
  for (int g = 0; g < G; ++g)
    for (int r = 0; r < NROWS; ++r) acc[g][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < p.in / kBlock; ++b) {
    const int64_t x0 = b * p.rows + m0;  // QuantizedX index of (block b, row m0)
    const XInt* xq = xq_all + x0 * kBlock;
    for (int g = 0; g < G; ++g) {
      const uint8_t* block = groups[g] + b * kGroupRows * Format::kBytes;
      if constexpr (NROWS > 1 || !std::is_same_v<Format, Q8_0>)  // see kPrefetchAhead
        for (int64_t line = 0; line < kGroupRows * Format::kBytes; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(block) + kPrefetchAhead + line, _MM_HINT_T0);
      const uint8_t* values = block + kGroupRows * Format::kValuesAt;
      const __m256 d = load8_fp16(block), m = group_mins<Format>(block);
      if constexpr (std::is_same_v<Format, Q8_0>) {
        __m256i sums[NROWS];
        group_block_dots_q8<NROWS>(values, xq, kBlock, sums);
        for (int r = 0; r < NROWS; ++r) accumulate_block<Format>(acc[g][r], d, m, sums[r], p, x0 + r);
      } else {
        const NibbleGroup nibbles(values);
        for (int r = 0; r < NROWS; ++r)
          accumulate_block<Format>(acc[g][r], d, m, nibbles.dot(xq + r * kBlock), p, x0 + r);
      }
    }
  }
}

// dots[g][r][k] = row k of group g . x[m0 + r].
template <class Format, int G, int NROWS>
LLMDROP_AVX2 void group_tile_avx2(const Problem<Format>& p, const uint8_t* const* groups, int64_t m0,
                                  float (*dots)[kRowsPerPass][kGroupRows]) {
  __m256 acc[G][NROWS];
  group_dots_avx2<Format, G, NROWS>(p, groups, m0, acc);
  for (int g = 0; g < G; ++g)
    for (int r = 0; r < NROWS; ++r) _mm256_storeu_ps(dots[g][r], acc[g][r]);
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI kernels for several activation rows, where the block formats' GEMV is bound by integer multiplies
// rather than by memory: two groups of 8 rows are read together, one 256-bit half each, so that one zmm
// instruction (vpdpbusd: u8 x s8, vpdpwssd: s16 x s16, each summing into int32 lanes) serves 16 output rows with
// the same broadcast piece of x.
// ---------------------------------------------------------------------------------------------
// GCC 12's own AVX-512 intrinsics pass an "undefined" vector along and then warn that it is uninitialized (GCC bug
// 105593): silenced for these kernels only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

LLMDROP_AVX512_VNNI inline __m512i join_halves(__m256i low, __m256i high) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
}

LLMDROP_AVX512_VNNI inline __m512 join_halves(__m256 low, __m256 high) {
  return _mm512_castsi512_ps(join_halves(_mm256_castps_si256(low), _mm256_castps_si256(high)));
}

LLMDROP_AVX512_VNNI inline __m256 half_of(__m512 v, int half) {
  return _mm256_castsi256_ps(half ? _mm512_extracti64x4_epi64(_mm512_castps_si512(v), 1)
                                  : _mm512_extracti64x4_epi64(_mm512_castps_si512(v), 0));
}

LLMDROP_AVX512_VNNI inline __m512i broadcast32_zmm(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_set1_epi32(v);
}

// acc + vpdpbusd / vpdpwssd of `w` with the 4 bytes at p broadcast to every lane, the broadcast folded into the
// instruction's memory operand: GCC emits a separate broadcast for the intrinsics, one more instruction per
// multiply-add where the integer kernels issue little else.
LLMDROP_AVX512_VNNI inline __m512i dpbusd_broadcast(__m512i acc, __m512i w, const void* p) {
#if defined(__GNUC__)
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*static_cast<const int32_t*>(p)));
  return acc;
#else
  return _mm512_dpbusd_epi32(acc, w, broadcast32_zmm(p));
#endif
}

LLMDROP_AVX512_VNNI inline __m512i dpwssd_broadcast(__m512i acc, __m512i w, const void* p) {
#if defined(__GNUC__)
  asm("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*static_cast<const int32_t*>(p)));
  return acc;
#else
  return _mm512_dpwssd_epi32(acc, w, broadcast32_zmm(p));
#endif
}

// The 4-bit values of group blocks `values[0]`, `values[1]` unpacked once for all rows (NibbleGroup's lanes, the
// first group in the low half of each vector).
struct NibbleGroupPair {
  __m512i low[4], high[4];
  LLMDROP_AVX512_VNNI explicit NibbleGroupPair(const uint8_t* const (&values)[2]) {
    const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
    for (int c = 0; c < 4; ++c) {
      const __m512i v = join_halves(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(values[0] + 32 * c)),
                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values[1] + 32 * c)));
      low[c] = _mm512_and_si512(v, low_nibbles);
      high[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low_nibbles);
    }
  }
  // Lane k: start + the integer dot of (group k / 8, row k % 8)'s 32 values with the int8 xq[0 .. 32).
  LLMDROP_AVX512_VNNI __m512i dot(const int8_t* xq, __m512i start) const {
    __m512i from_low = start, from_high = _mm512_setzero_si512();
    for (int c = 0; c < 4; ++c) {
      from_low = dpbusd_broadcast(from_low, low[c], xq + 4 * c);
      from_high = dpbusd_broadcast(from_high, high[c], xq + 16 + 4 * c);
    }
    return _mm512_add_epi32(from_low, from_high);
  }
};

// The integer dots of two q8_0 group blocks with NROWS activation rows' int16 x: sums[r] lane k = (group k / 8,
// row k % 8)'s dot.
template <int NROWS>
LLMDROP_AVX512_VNNI inline void group_pair_dots_q8(const uint8_t* const (&values)[2], const int16_t* xq,
                                                   __m512i (&sums)[NROWS]) {
  for (int r = 0; r < NROWS; ++r) sums[r] = _mm512_setzero_si512();
  for (int k = 0; k < 16; ++k) {
    const __m256i both = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(values[0] + 16 * k))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(values[1] + 16 * k)), 1);
    const __m512i w = _mm512_cvtepi8_epi16(both);
    for (int r = 0; r < NROWS; ++r)
      sums[r] = dpwssd_broadcast(sums[r], w, xq + r * kBlock + 2 * k);
  }
}

// dots[g][r][k] = row k of group g . x[m0 + r] for the 2 * PAIRS groups at groups[0 ..) and NROWS activation
// rows: group_dots_avx2's sums, 16 output rows per vector. The pairs' blocks are read in turn (several pairs at
// batch 1, where more streams in flight read faster).
template <class Format, int PAIRS, int NROWS>
LLMDROP_AVX512_VNNI void group_pair_tile_avx512(const Problem<Format>& p, const uint8_t* const* groups, int64_t m0,
                                                float (*dots)[kRowsPerPass][kGroupRows]) {
  using XInt = typename Format::XInt;
  const auto* xq_all = static_cast<const XInt*>(p.xq);
  __m512 acc[PAIRS][NROWS];
  for (int q = 0; q < PAIRS; ++q)
    for (int r = 0; r < NROWS; ++r) acc[q][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < p.in / kBlock; ++b) {
    const int64_t x0 = b * p.rows + m0;
    const XInt* xq = xq_all + x0 * kBlock;
    for (int q = 0; q < PAIRS; ++q) {
      const uint8_t* blocks[2], * values[2];
      for (int g = 0; g < 2; ++g) {
        blocks[g] = groups[2 * q + g] + b * kGroupRows * Format::kBytes;
        values[g] = blocks[g] + kGroupRows * Format::kValuesAt;
        for (int64_t line = 0; line < kGroupRows * Format::kBytes; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(blocks[g]) + kPrefetchAhead + line, _MM_HINT_T0);
      }
      const __m512 d = join_halves(load8_fp16(blocks[0]), load8_fp16(blocks[1]));
      const __m512 m = join_halves(group_mins<Format>(blocks[0]), group_mins<Format>(blocks[1]));
      // accumulate_block's sums (q4_0's offset already in them), 16 output rows at a time.
      auto accumulate = [&](__m512& into, __m512i sum, int64_t xb) LLMDROP_AVX512_VNNI {
        into = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(p.xscale[xb])), _mm512_cvtepi32_ps(sum), into);
        if constexpr (Format::kStoredOffset) into = _mm512_fmadd_ps(m, _mm512_set1_ps(p.xsums[xb]), into);
      };
      if constexpr (std::is_same_v<Format, Q8_0>) {
        __m512i sums[NROWS];
        group_pair_dots_q8<NROWS>(values, xq, sums);
        for (int r = 0; r < NROWS; ++r) accumulate(acc[q][r], sums[r], x0 + r);
      } else {
        const NibbleGroupPair nibbles(values);
        for (int r = 0; r < NROWS; ++r)
          accumulate(acc[q][r], nibbles.dot(xq + r * kBlock, _mm512_set1_epi32(offset_term(p, x0 + r))), x0 + r);
      }
    }
  }
  for (int q = 0; q < PAIRS; ++q) {
    for (int r = 0; r < NROWS; ++r) {
      _mm256_storeu_ps(dots[2 * q][r], half_of(acc[q][r], 0));
      _mm256_storeu_ps(dots[2 * q + 1][r], half_of(acc[q][r], 1));
    }
  }
}

#pragma GCC diagnostic pop

// dots[k][r] = (weight row at wrow + k * stride bytes) . x[m0 + r] for WROWS rows of a dense weight and NROWS
// activation rows (compile-time, so the accumulators stay in registers). The rows are read in turn, a few vectors
// of each, so WROWS streams of the weight are in flight, and each load of x serves all of them.
template <class Format, int WROWS, int NROWS>
LLMDROP_AVX2 void dense_tile_dots_avx2(const Problem<Format>& p, const uint8_t* wrow, int64_t stride, int64_t m0,
                                       float (*dots)[kRowsPerPass]) {
  constexpr int chains = chains_for(WROWS * NROWS);
  using Element = typename Format::Element;
  const float* x = p.x + m0 * p.in;
  const int64_t in = p.in;
  auto weights = [&](int k) { return reinterpret_cast<const Element*>(wrow + k * stride); };
  __m256 acc[WROWS][NROWS][chains];  // chain c accumulates columns 8c..8c+7 of every 8 * chains
  for (int k = 0; k < WROWS; ++k)
    for (int r = 0; r < NROWS; ++r)
      for (int c = 0; c < chains; ++c) acc[k][r][c] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 * chains <= in; i += 8 * chains) {
    __m256 wv[WROWS][chains];
    for (int k = 0; k < WROWS; ++k) {
      // Several activation rows make a tile slow enough that the hardware prefetchers fall behind one stream.
      if constexpr (NROWS > 1)
        _mm_prefetch(reinterpret_cast<const char*>(weights(k) + i) + kPrefetchAhead, _MM_HINT_T0);
      for (int c = 0; c < chains; ++c) wv[k][c] = load8(weights(k) + i + 8 * c);
    }
    for (int r = 0; r < NROWS; ++r) {
      for (int c = 0; c < chains; ++c) {
        __m256 xv = _mm256_loadu_ps(x + r * in + i + 8 * c);
        // One load of x for all WROWS multiply-adds: GCC would fold it into each of them, and with several
        // activation rows the loads rather than the multiply-adds would bound the loop.
        if constexpr (WROWS > 1 && NROWS > 1) asm("" : "+v"(xv));
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

#ifdef LLMDROP_HAVE_X86_SIMD
#pragma GCC diagnostic push  // GCC bug 105593, as for the kernels above
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Sixteen consecutive weights as fp32.
LLMDROP_AVX512_VNNI inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
LLMDROP_AVX512_VNNI inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
LLMDROP_AVX512_VNNI inline __m512 load16(const c10::BFloat16* p) {
  const __m512i halves = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(halves, 16));
}

// dense_tile_dots_avx2 with 16-wide vectors, for several activation rows, where the FMAs rather than memory bound
// a dense GEMV: twice the multiply-adds per instruction, and 32 registers hold two weight rows' accumulators for up
// to 8 activation rows.
template <class Format, int WROWS, int NROWS>
LLMDROP_AVX512_VNNI void dense_tile_dots_avx512(const Problem<Format>& p, const uint8_t* wrow, int64_t stride,
                                                int64_t m0, float (*dots)[kRowsPerPass]) {
  using Element = typename Format::Element;
  const float* x = p.x + m0 * p.in;
  const int64_t in = p.in;
  auto weights = [&](int k) { return reinterpret_cast<const Element*>(wrow + k * stride); };
  __m512 acc[WROWS][NROWS];
  for (int k = 0; k < WROWS; ++k)
    for (int r = 0; r < NROWS; ++r) acc[k][r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= in; i += 16) {
    __m512 wv[WROWS];
    for (int k = 0; k < WROWS; ++k) {
      if constexpr (NROWS > 1)  // as in dense_tile_dots_avx2
        _mm_prefetch(reinterpret_cast<const char*>(weights(k) + i) + kPrefetchAhead, _MM_HINT_T0);
      wv[k] = load16(weights(k) + i);
    }
    for (int r = 0; r < NROWS; ++r) {
      __m512 xv = _mm512_loadu_ps(x + r * in + i);
      if constexpr (WROWS > 1 && NROWS > 1) asm("" : "+v"(xv));  // as in dense_tile_dots_avx2
      for (int k = 0; k < WROWS; ++k) acc[k][r] = _mm512_fmadd_ps(wv[k], xv, acc[k][r]);
    }
  }
  for (int k = 0; k < WROWS; ++k) {
    for (int r = 0; r < NROWS; ++r) {
      float total = _mm512_reduce_add_ps(acc[k][r]);
      for (int64_t t = i; t < in; ++t) total += Format::to_float(weights(k)[t]) * x[r * in + t];
      dots[k][r] = total;
    }
  }
}

#pragma GCC diagnostic pop
#endif

// The 8 rows of group block `block` as 8 plain GGUF blocks, into plain[8][kBytes].
template <class Format>
inline void ungroup_block(const uint8_t* block, uint8_t* plain) {
  constexpr int64_t lane = Format::kLaneBytes, value_bytes = Format::kBytes - Format::kValuesAt;
  for (int64_t r = 0; r < kGroupRows; ++r) {
    uint8_t* out = plain + r * Format::kBytes;
    std::memcpy(out, block + 2 * r, 2);
    if constexpr (Format::kStoredOffset) std::memcpy(out + 2, block + 2 * kGroupRows + 2 * r, 2);
    const uint8_t* values = block + kGroupRows * Format::kValuesAt;
    for (int64_t k = 0; k < value_bytes / lane; ++k)
      std::memcpy(out + Format::kValuesAt + k * lane, values + (k * kGroupRows + r) * lane, lane);
  }
}

// w[0 .. 32) = the 32 weights of the plain GGUF block `block`.
template <class Format>
LLMDROP_AVX2 inline void dequant_plain_block_avx2(const uint8_t* block, float* w) {
  __m256i q[2];  // the 32 values as int16: elements 0-15, 16-31
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + Format::kValuesAt));
  if constexpr (std::is_same_v<Format, Q8_0>) {
    q[0] = _mm256_cvtepi8_epi16(bytes);
    q[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + Format::kValuesAt + 16)));
  } else {
    const __m256i wide = _mm256_cvtepu8_epi16(bytes);
    q[0] = _mm256_and_si256(wide, _mm256_set1_epi16(0x0F));
    q[1] = _mm256_srli_epi16(wide, 4);
  }
  const float d_scalar = fp16_bits_to_float(block);
  const float offset_scalar =
      Format::kStoredOffset ? fp16_bits_to_float(block + 2) : static_cast<float>(Format::kValueOffset) * d_scalar;
  const __m256 d = _mm256_set1_ps(d_scalar), offset = _mm256_set1_ps(offset_scalar);
  for (int k = 0; k < 4; ++k) {
    const __m128i eight = k % 2 ? _mm256_extracti128_si256(q[k / 2], 1) : _mm256_castsi256_si128(q[k / 2]);
    const __m256 values = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(eight));
    _mm256_storeu_ps(w + 8 * k, _mm256_fmadd_ps(values, d, offset));
  }
}

template <class Format>
LLMDROP_AVX2 void dequant_dense_row_avx2(const uint8_t* wrow, int64_t in, float* w) {
  const auto* elements = reinterpret_cast<const typename Format::Element*>(wrow);
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) _mm256_storeu_ps(w + i, load8(elements + i));
  for (; i < in; ++i) w[i] = Format::to_float(elements[i]);
}

int cpu_simd_bits() {
  if (llmdrop::cpu_has_avx512_vnni()) return 512;
  return llmdrop::cpu_has_avx2() ? 256 : 0;
}
#else
int cpu_simd_bits() { return 0; }
#endif

// Tests cap the vector width to exercise both paths (AVX2, portable) on one machine.
std::atomic<int> simd_bits_cap{512};

// 512: AVX-512 VNNI as well (the block formats' kernels for several activation rows), 256: AVX2 + FMA + F16C,
// 0: portable loops.
int simd_bits() { return std::min(cpu_simd_bits(), simd_bits_cap.load()); }

// x [rows, in] quantised per block of 32 columns into XInt (see the top of the file), into q's buffers.
template <class Format>
void quantize_x(const float* x, int64_t rows, int64_t in, QuantizedX<typename Format::XInt>& q) {
  const int64_t blocks = in / kBlock;
  q.values.resize(rows * in), q.scales.resize(rows * blocks);
  q.sums.resize(has_stored_offset<Format>() ? rows * blocks : 0);
  q.offsets.resize(has_value_offset<Format>() ? rows * blocks : 0);
  [[maybe_unused]] const bool avx2 = simd_bits() >= 256;
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = x + m * in + b * kBlock;
      auto* values = q.values.data() + (b * rows + m) * kBlock;
      int32_t sum = 0;
      float scale;
#ifdef LLMDROP_HAVE_X86_SIMD
      if (avx2) {
        scale = quantize_block_avx2<Format>(xb, values, &sum);
      } else
#endif
      {
        scale = quantize_block_portable<Format>(xb, values, &sum);
      }
      q.scales[b * rows + m] = scale;
      // q4_1's offset m multiplies the sum of x, q4_0's joins the integer dot (offset_term).
      if constexpr (has_stored_offset<Format>()) q.sums[b * rows + m] = scale * static_cast<float>(sum);
      if constexpr (has_value_offset<Format>()) q.offsets[b * rows + m] = Format::kValueOffset * sum;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Drivers
// ---------------------------------------------------------------------------------------------
// f(std::integral_constant<int, n>{}) for n = min(count, Max), count >= 1: a run-time count as a template argument.
template <int Max, class F>
void with_count(int64_t count, F&& f) {
  if constexpr (Max > 1) {
    if (count < Max) return with_count<Max - 1>(count, f);
  }
  f(std::integral_constant<int, Max>{});
}

// The GEMV's unit of work: output rows of a dense format, groups of 8 output rows of a block format. A tile is
// `count` units spaced `spacing` units apart (units t, t + spacing, ...), read together: a core reading one
// sequential stream has too few reads in flight to reach the memory's bandwidth, and several distant streams
// read in turn come much closer. A tile is computed the same way whichever thread takes it, so results do not
// depend on the thread count.
constexpr int64_t kMaxStreams = 4;

// Units per tile. At batch 1: four groups of a block format, two rows of a dense format (a core read the dense
// formats' batch-1 step 10-15 % faster from two streams than from four, as fast at two threads). With several
// activation rows: two groups of a block format (the AVX-512 kernels read them as one), and for a dense format two
// rows, except with AVX2 from 5 activation rows on, one (its accumulators take most of AVX2's 16 registers).
constexpr int64_t kDenseTwoStreamRows = 4;

template <class Format>
int64_t streams_for(int64_t rows, int simd) {
  if (rows == 1) return Format::kBlocked ? kMaxStreams : 2;
  return Format::kBlocked || rows <= kDenseTwoStreamRows || simd >= 512 ? 2 : 1;
}

// y for the units of tile t and activation rows [m0, m0 + nrows).
template <class Format>
void tile(int simd, const Problem<Format>& p, int64_t t, int64_t count, int64_t spacing, int64_t m0,
          int64_t nrows) {
  const int64_t bytes = row_bytes<Format>(p.in);
  const bool avx2 = simd >= 256;
  auto store = [&](int64_t o, int64_t r, float dot) {
    p.y[(m0 + r) * p.out + o] = dot + (p.bias ? p.bias[o] : 0.f);
  };
  if constexpr (Format::kBlocked) {
#ifdef LLMDROP_HAVE_X86_SIMD
    if (avx2) {
      const uint8_t* groups[kMaxStreams];
      for (int64_t k = 0; k < count; ++k) groups[k] = p.weight + (t + k * spacing) * kGroupRows * bytes;
      float dots[kMaxStreams][kRowsPerPass][kGroupRows];
      // Several streams at batch 1; a pair of groups with up to 8 rows otherwise (streams_for). At batch 1 the
      // 4-bit formats run faster in pairs through AVX-512; q8_0's AVX2 kernel measured as fast on one thread and
      // faster on two.
      if (nrows == 1 && simd >= 512 && count == kMaxStreams && !std::is_same_v<Format, Q8_0>) {
        group_pair_tile_avx512<Format, kMaxStreams / 2, 1>(p, groups, m0, dots);
      } else if (nrows == 1) {
        with_count<kMaxStreams>(count, [&](auto g) { group_tile_avx2<Format, g.value, 1>(p, groups, m0, dots); });
      } else if (simd >= 512 && count == 2) {
        with_count<kRowsPerPass>(nrows, [&](auto r) {
          group_pair_tile_avx512<Format, 1, r.value>(p, groups, m0, dots);
        });
      } else {
        with_count<2>(count, [&](auto g) {
          with_count<kRowsPerPass>(nrows, [&](auto r) {
            group_tile_avx2<Format, g.value, r.value>(p, groups, m0, dots);
          });
        });
      }
      for (int64_t k = 0; k < count; ++k)
        for (int64_t r = 0; r < nrows; ++r)
          for (int64_t row = 0; row < kGroupRows; ++row) store((t + k * spacing) * kGroupRows + row, r, dots[k][r][row]);
      return;
    }
#endif
    for (int64_t k = 0; k < count; ++k) {
      for (int64_t row = 0; row < kGroupRows; ++row) {
        const int64_t o = (t + k * spacing) * kGroupRows + row;
        float dots[kRowsPerPass];
        row_dots_portable<Format>(p, o, m0, nrows, dots);
        for (int64_t r = 0; r < nrows; ++r) store(o, r, dots[r]);
      }
    }
  } else {
    float dots[kMaxStreams][kRowsPerPass];
#ifdef LLMDROP_HAVE_X86_SIMD
    if (avx2) {
      const uint8_t* first = p.weight + t * bytes;
      if (nrows == 1 && simd >= 512) {
        with_count<kMaxStreams>(count, [&](auto w) {
          dense_tile_dots_avx512<Format, w.value, 1>(p, first, spacing * bytes, m0, dots);
        });
      } else if (nrows == 1) {
        with_count<kMaxStreams>(count, [&](auto w) {
          dense_tile_dots_avx2<Format, w.value, 1>(p, first, spacing * bytes, m0, dots);
        });
      } else if (simd >= 512) {
        with_count<2>(count, [&](auto w) {
          with_count<kRowsPerPass>(nrows, [&](auto r) {
            dense_tile_dots_avx512<Format, w.value, r.value>(p, first, spacing * bytes, m0, dots);
          });
        });
      } else if (count == 1) {
        with_count<kRowsPerPass>(nrows, [&](auto r) {
          dense_tile_dots_avx2<Format, 1, r.value>(p, first, spacing * bytes, m0, dots);
        });
      } else {
        with_count<kDenseTwoStreamRows>(nrows, [&](auto r) {
          dense_tile_dots_avx2<Format, 2, r.value>(p, first, spacing * bytes, m0, dots);
        });
      }
    }
#endif
    if (!avx2)
      for (int64_t k = 0; k < count; ++k) row_dots_portable<Format>(p, t + k * spacing, m0, nrows, dots[k]);
    for (int64_t k = 0; k < count; ++k)
      for (int64_t r = 0; r < nrows; ++r) store(t + k * spacing, r, dots[k][r]);
  }
}

// Chunks [0, chunks) dealt out as one contiguous range per worker, each walked from its start, so that a thread
// streams long contiguous stretches of the weight (what the hardware prefetchers follow: claiming chunks from one
// shared counter, the threads' chunks interleave and both GEMV threads read at a fraction of the rate). A worker
// that has finished its range takes chunks from the end of the others', so a thread that lost its core for a while
// on a busy machine holds up the rest by about one chunk.
class ChunkRanges {
 public:
  ChunkRanges() = default;
  ChunkRanges(int64_t chunks, int64_t workers) { reset(chunks, workers); }

  // Deal out `chunks` afresh to `workers`; no worker may be taking chunks meanwhile.
  void reset(int64_t chunks, int64_t workers) {
    if (workers > capacity_) ranges_.reset(new std::atomic<uint64_t>[workers]), capacity_ = workers;
    workers_ = workers;
    for (int64_t w = 0; w < workers; ++w) ranges_[w].store(pack(chunks * w / workers, chunks * (w + 1) / workers));
  }
  int64_t workers() const { return workers_; }

  // The next chunk for worker w (its own first, then the others' last), or -1 when none is left.
  int64_t take(int64_t w) {
    int64_t chunk = take_from(w, /*front=*/true);
    for (int64_t k = 1; chunk < 0 && k < workers_; ++k) chunk = take_from((w + k) % workers_, /*front=*/false);
    return chunk;
  }

 private:
  static uint64_t pack(int64_t next, int64_t end) { return static_cast<uint64_t>(next) << 32 | static_cast<uint64_t>(end); }

  int64_t take_from(int64_t w, bool front) {
    uint64_t range = ranges_[w].load();
    for (;;) {
      const int64_t next = static_cast<int64_t>(range >> 32), end = static_cast<int64_t>(range & 0xFFFFFFFFu);
      if (next >= end) return -1;
      const uint64_t rest = front ? pack(next + 1, end) : pack(next, end - 1);
      if (ranges_[w].compare_exchange_weak(range, rest)) return front ? next : end - 1;
    }
  }

  int64_t workers_ = 0, capacity_ = 0;
  std::unique_ptr<std::atomic<uint64_t>[]> ranges_;
};

// How a GEMV of `rows` activation rows is cut: tiles of `streams` units, work items (the tiles, then for block
// formats the plain rows after the last full group, one each) and chunks of items, the unit threads claim.
template <class Format>
struct GemvWork {
  int64_t units, streams, spacing, tiles, items, items_per_chunk, chunks;

  GemvWork(int64_t rows, int64_t in, int64_t out) {
    const int64_t unit_rows = Format::kBlocked ? kGroupRows : 1;
    units = out / unit_rows, streams = streams_for<Format>(rows, simd_bits());
    spacing = (units + streams - 1) / streams, tiles = spacing;
    items = tiles + (out - units * unit_rows);
    const int64_t tile_bytes = streams * unit_rows * row_bytes<Format>(in);
    items_per_chunk = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(tile_bytes, 1));
    chunks = (items + items_per_chunk - 1) / items_per_chunk;
  }
};

// y for the items of one chunk.
template <class Format>
void gemv_chunk(int simd, const Problem<Format>& p, const GemvWork<Format>& work, int64_t chunk) {
  const int64_t unit_rows = Format::kBlocked ? kGroupRows : 1;
  for (int64_t i = chunk * work.items_per_chunk; i < std::min(work.items, (chunk + 1) * work.items_per_chunk); ++i) {
    for (int64_t m0 = 0; m0 < p.rows; m0 += kRowsPerPass) {
      const int64_t nrows = std::min(kRowsPerPass, p.rows - m0);
      if (i < work.tiles) {
        const int64_t count = std::min(work.streams, (work.units - i + work.spacing - 1) / work.spacing);
        tile<Format>(simd, p, i, count, work.spacing, m0, nrows);
      } else {
        const int64_t o = work.units * unit_rows + (i - work.tiles);
        float dots[kRowsPerPass];
        row_dots_portable<Format>(p, o, m0, nrows, dots);
        for (int64_t r = 0; r < nrows; ++r) p.y[(m0 + r) * p.out + o] = dots[r] + (p.bias ? p.bias[o] : 0.f);
      }
    }
  }
}

// Worker w's share of a GEMV whose chunks `ranges` deals out (its own range, then what the others have left).
template <class Format>
void gemv_worker(const Problem<Format>& p, const GemvWork<Format>& work, ChunkRanges& ranges, int64_t w) {
  const int simd = simd_bits();
  for (int64_t chunk; (chunk = ranges.take(w)) >= 0;) gemv_chunk<Format>(simd, p, work, chunk);
}

template <class Format>
void gemv(const Problem<Format>& p) {
  const GemvWork<Format> work(p.rows, p.in, p.out);
  ChunkRanges ranges(work.chunks, std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work.chunks)));
  at::parallel_for(0, ranges.workers(), 1, [&](int64_t first_worker, int64_t last_worker) {
    for (int64_t w = first_worker; w < last_worker; ++w) gemv_worker<Format>(p, work, ranges, w);
  });
}

// Rows [o_begin, o_end) of the weight as fp32, into w [o_end - o_begin, in]. o_begin is a multiple of 8.
template <class Format>
void dequant_rows(const Problem<Format>& p, int64_t o_begin, int64_t o_end, float* w) {
  const bool avx2 = simd_bits() >= 256;
  const int64_t bytes = row_bytes<Format>(p.in);
  // With AVX2, whole groups of a block format: each group block ungrouped into 8 plain blocks, then dequantised.
  const int64_t groups_end = Format::kBlocked && avx2 ? std::min(o_end, p.out / kGroupRows * kGroupRows) : o_begin;
#ifdef LLMDROP_HAVE_X86_SIMD
  if constexpr (Format::kBlocked) {
    at::parallel_for(o_begin / kGroupRows, groups_end / kGroupRows, 1, [&](int64_t begin, int64_t end) {
      uint8_t plain[kGroupRows * Format::kBytes];
      for (int64_t g = begin; g < end; ++g) {
        float* rows = w + (g * kGroupRows - o_begin) * p.in;
        for (int64_t b = 0; b < p.in / kBlock; ++b) {
          ungroup_block<Format>(p.weight + g * kGroupRows * bytes + b * kGroupRows * Format::kBytes, plain);
          for (int64_t r = 0; r < kGroupRows; ++r)
            dequant_plain_block_avx2<Format>(plain + r * Format::kBytes, rows + r * p.in + b * kBlock);
        }
      }
    });
  }
#endif
  // The other rows one at a time (block_ref finds a grouped row's blocks for the portable loop).
  at::parallel_for(std::max(o_begin, groups_end), o_end, 8, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      float* row = w + (o - o_begin) * p.in;
#ifdef LLMDROP_HAVE_X86_SIMD
      if constexpr (!Format::kBlocked) {
        if (avx2) {
          dequant_dense_row_avx2<Format>(p.weight + o * bytes, p.in, row);
          continue;
        }
      }
#endif
      dequant_row_portable<Format>(p, o, row);
    }
  });
}

// Many rows: y = x @ W.T one tile of output rows at a time (about 1 MB of fp32, so it stays in cache
// between dequantisation and GEMM).
template <class Format>
void tiled_matmul(const Problem<Format>& p, const at::Tensor& x, at::Tensor& y) {
  const int64_t tile = std::max<int64_t>(16, ((int64_t{1} << 18) / p.in) / 16 * 16);
  at::Tensor w = at::empty({std::min(tile, p.out), p.in}, x.options());
  for (int64_t o0 = 0; o0 < p.out; o0 += tile) {
    const int64_t o1 = std::min(p.out, o0 + tile);
    dequant_rows<Format>(p, o0, o1, w.data_ptr<float>());
    at::Tensor y_tile = y.narrow(1, o0, o1 - o0);
    at::mm_out(y_tile, x, w.narrow(0, 0, o1 - o0).t());
  }
}

// Whether `rows` activation rows run the fused kernels rather than dequantised tiles + ATen's GEMM: up to
// kGemvMaxRows always. Above, the block formats' integer kernels (measured on SmolLM2's shapes at 128 rows: q4_0
// 1.2x the tiles' speed on one thread, 2.4x on two, whose GEMMs of one tile hardly split; with AVX-512 VNNI about
// 2x on one thread), except q8_0 on one thread without AVX-512 VNNI, where the tiles ran 1.3x faster.
template <class Format>
bool fused_kernels_for(int64_t rows) {
  if (rows <= kGemvMaxRows) return true;
  if constexpr (Format::kBlocked) {
    return !(std::is_same_v<Format, Q8_0> && at::get_num_threads() == 1 && simd_bits() < 512);
  } else {
    return false;
  }
}

// The quantised x of a decode step's GEMVs: each thread's own buffers, reused rather than allocated per call.
template <class Format>
QuantizedX<typename Format::XInt>& decode_buffers() {
  thread_local QuantizedX<typename Format::XInt> buffers;
  return buffers;
}

// f(p) with p reading x as the kernels want it: quantised for block formats (up to kGemvMaxRows rows into this
// thread's decode buffers), as it is for dense ones.
template <class Format, class F>
void with_kernel_x(Problem<Format> p, F&& f) {
  if constexpr (Format::kBlocked) {
    QuantizedX<typename Format::XInt> buffers;
    auto& xq = p.rows <= kGemvMaxRows ? decode_buffers<Format>() : buffers;
    quantize_x<Format>(p.x, p.rows, p.in, xq);
    p.xq = xq.values.data(), p.xscale = xq.scales.data(), p.xsums = xq.sums.data(), p.xoffsets = xq.offsets.data();
    f(p);
  } else {
    f(p);
  }
}

// y = x W^T (+ bias) with x [rows, in], y [rows, out] and bias contiguous fp32: the fused GEMV on torch's threads,
// or dequantised tiles + ATen's GEMM (fused_kernels_for).
template <class Format>
void linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t rows = x.size(0), in = x.size(1), out = weight.size(0);
  if constexpr (std::is_same_v<Format, F32>) {  // a dense fp32 weight already is what a GEMM wants
    if (rows > kGemvMaxRows) {
      if (bias) at::addmm_out(y, *bias, x, weight.t());
      else at::mm_out(y, x, weight.t());
      return;
    }
  }
  Problem<Format> p{x.data_ptr<float>(), static_cast<const uint8_t*>(weight.data_ptr()),
                    bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), rows, in, out,
                    nullptr, nullptr, nullptr, nullptr};
  if (fused_kernels_for<Format>(rows)) {
    with_kernel_x<Format>(p, [](const Problem<Format>& q) { gemv<Format>(q); });
  } else {
    tiled_matmul<Format>(p, x, y);
    if (bias) y.add_(*bias);
  }
}

}  // namespace
