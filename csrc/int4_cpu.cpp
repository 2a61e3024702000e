// CPU int4 linear: y[m, o] = sum_i x[m, i] * (q[o, i] - zero[o, g(i)]) * scale[o, g(i)].
//
// Layout (built by llmdrop_rt.quant.QuantLinear): qweight int32 [out, in/8], word k of row o holds
// q[o, 8k + j] in bits 4j..4j+3; scales / zeros [out, groups] (fp16, bf16 or fp32), g(i) = i / group_size.
//
// Few rows (decode): a fused GEMV that never materialises weights. It uses
// sum_i (q_i - z_g) s_g x_i = sum_g s_g (sum_{i in g} q_i x_i) - sum_g s_g z_g (sum_{i in g} x_i):
// the inner loop only decodes nibbles and multiplies them with x, the per-group sums of x are
// computed once per call, and the zero term is a short scalar loop per output row. Many rows (prefill): dequantise a tile of output rows to fp32 and let
// ATen's GEMM do the rest. Parallelism is at::parallel_for (torch's OpenMP pool) over output rows.
// x86-64 builds carry AVX2+FMA and AVX-512 versions selected at run time (functions compiled with
// target attributes, so the build itself needs only the baseline ISA); elsewhere portable loops run.
// Bindings are TORCH_LIBRARY ops (torch.ops.llmdrop_int4_cpu.*); importing the shared object as the
// Python module llmdrop_rt._int4_cpu registers them. ATen-only headers keep the build short.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "x86_simd.h"

namespace {

constexpr int64_t kGemvMaxRows = 8;  // more activation rows than this: dequantised tiles + GEMM
constexpr int64_t kRowBlock = 4;     // activation rows per pass of the GEMV inner loop (scaled_row_dot_*_rows)

// Problem description shared by the drivers; all pointers are to contiguous data. Scales and
// zero * scale are converted to fp32 once per call (a bulk ATen conversion, ~1/64 of the weight
// traffic), so the kernels never convert fp16/bf16 scalars.
struct Int4Problem {
  const float* x;            // [rows, in]
  const int32_t* qweight;    // [out, in/8]
  const float* scales;       // [out, groups]
  const float* zero_scaled;  // [out, groups], zero * scale
  float* y;                  // [rows, out]
  int64_t rows, in, out, groups, group_size;
};

// ---------------------------------------------------------------------------------------------
// Portable kernels
// ---------------------------------------------------------------------------------------------
// Sum of q_j * x_j over words [k_begin, k_end) of one packed row, for one activation row.
inline float packed_dot_portable(const int32_t* qrow, const float* x, int64_t k_begin, int64_t k_end) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t k = k_begin; k < k_end; ++k) {
    const uint32_t word = static_cast<uint32_t>(qrow[k]);
    const float* xk = x + 8 * k;
    for (int j = 0; j < 8; ++j) acc[j] += static_cast<float>((word >> (4 * j)) & 0xF) * xk[j];
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// dots[r] = sum_g scale[g] * sum_{k in g} q . x[r] over a whole packed row, for `nrows` activation rows.
inline void scaled_row_dot_portable(const int32_t* qrow, const float* x, int64_t ldx, int64_t nrows, int64_t words,
                                    int64_t words_per_group, const float* scale, float* dots) {
  for (int64_t r = 0; r < nrows; ++r) {
    float total = 0.f;
    for (int64_t k0 = 0, g = 0; k0 < words; k0 += words_per_group, ++g)
      total += scale[g] * packed_dot_portable(qrow, x + r * ldx, k0, std::min(words, k0 + words_per_group));
    dots[r] = total;
  }
}

inline void dequant_row_portable(const int32_t* qrow, const float* scale, const float* zero_scaled,
                                 int64_t words, int64_t group_size, float* w) {
  for (int64_t k = 0; k < words; ++k) {
    const uint32_t word = static_cast<uint32_t>(qrow[k]);
    const int64_t g = (8 * k) / group_size;
    for (int j = 0; j < 8; ++j)
      w[8 * k + j] = static_cast<float>((word >> (4 * j)) & 0xF) * scale[g] - zero_scaled[g];
  }
}

#ifdef LLMDROP_HAVE_X86_SIMD
// ---------------------------------------------------------------------------------------------
// AVX2 + FMA kernels (used only when the CPU reports them, x86_simd.h)
// ---------------------------------------------------------------------------------------------
LLMDROP_AVX2 inline __m256 nibbles_avx2(int32_t word) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i mask = _mm256_set1_epi32(0xF);
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), mask));
}

using llmdrop::hsum_avx2;

// dots[r] = sum_g scale[g] * sum_{k in g} q . x[r] over a whole packed row, for NROWS activation rows
// (compile-time, so the accumulators stay in registers; one horizontal sum per row, not per group).
template <int NROWS>
LLMDROP_AVX2 void scaled_row_dot_avx2(const int32_t* qrow, const float* x, int64_t ldx,
                                                             int64_t words, int64_t words_per_group,
                                                             const float* scale, float* dots) {
  __m256 total[NROWS];
  for (int r = 0; r < NROWS; ++r) total[r] = _mm256_setzero_ps();
  for (int64_t k0 = 0, g = 0; k0 < words; k0 += words_per_group, ++g) {
    const int64_t k_end = std::min(words, k0 + words_per_group);
    __m256 acc_even[NROWS], acc_odd[NROWS];  // two chains per row hide the FMA latency
    for (int r = 0; r < NROWS; ++r) acc_even[r] = acc_odd[r] = _mm256_setzero_ps();
    int64_t k = k0;
    for (; k + 1 < k_end; k += 2) {
      const __m256 q0 = nibbles_avx2(qrow[k]);
      const __m256 q1 = nibbles_avx2(qrow[k + 1]);
      for (int r = 0; r < NROWS; ++r) {
        const float* xr = x + r * ldx + 8 * k;
        acc_even[r] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(xr), acc_even[r]);
        acc_odd[r] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xr + 8), acc_odd[r]);
      }
    }
    if (k < k_end) {
      const __m256 q0 = nibbles_avx2(qrow[k]);
      for (int r = 0; r < NROWS; ++r)
        acc_even[r] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(x + r * ldx + 8 * k), acc_even[r]);
    }
    const __m256 s = _mm256_set1_ps(scale[g]);
    for (int r = 0; r < NROWS; ++r) total[r] = _mm256_fmadd_ps(_mm256_add_ps(acc_even[r], acc_odd[r]), s, total[r]);
  }
  for (int r = 0; r < NROWS; ++r) dots[r] = hsum_avx2(total[r]);
}

void scaled_row_dot_avx2_rows(const int32_t* qrow, const float* x, int64_t ldx, int64_t nrows, int64_t words,
                              int64_t words_per_group, const float* scale, float* dots) {
  switch (nrows) {
    case 1: scaled_row_dot_avx2<1>(qrow, x, ldx, words, words_per_group, scale, dots); break;
    case 2: scaled_row_dot_avx2<2>(qrow, x, ldx, words, words_per_group, scale, dots); break;
    case 3: scaled_row_dot_avx2<3>(qrow, x, ldx, words, words_per_group, scale, dots); break;
    default: scaled_row_dot_avx2<4>(qrow, x, ldx, words, words_per_group, scale, dots); break;
  }
}

LLMDROP_AVX2 void dequant_row_avx2(const int32_t* qrow, const float* scale,
                                                          const float* zero_scaled, int64_t words,
                                                          int64_t group_size, float* w) {
  for (int64_t k = 0; k < words; ++k) {
    const int64_t g = (8 * k) / group_size;
    const __m256 q = nibbles_avx2(qrow[k]);
    _mm256_storeu_ps(w + 8 * k, _mm256_fmsub_ps(q, _mm256_set1_ps(scale[g]), _mm256_set1_ps(zero_scaled[g])));
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512 GEMV (twice the lanes per nibble decode). One 64-bit broadcast puts words k and k+1 in
// alternate lanes; shifting lane pair j by 4j gives lanes [q(8k), q(8k+8), q(8k+1), q(8k+9), ...], so
// x is interleaved the same way once per call (interleave_pairs) instead of shuffling every word.
// Needs group_size and in to be multiples of 16 (whole word pairs per group).
// ---------------------------------------------------------------------------------------------
__attribute__((target("avx512f"))) inline __m512 nibble_pairs_avx512(const int32_t* two_words) {
  int64_t pair;
  std::memcpy(&pair, two_words, sizeof(pair));
  const __m512i shifts = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i nibbles = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi64(pair), shifts), _mm512_set1_epi32(0xF));
  return _mm512_cvtepi32_ps(nibbles);
}

template <int NROWS>
__attribute__((target("avx512f"))) void scaled_row_dot_avx512(const int32_t* qrow, const float* x_pairs, int64_t ldx,
                                                               int64_t words, int64_t words_per_group,
                                                               const float* scale, float* dots) {
  __m512 total[NROWS];
  for (int r = 0; r < NROWS; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t k0 = 0, g = 0; k0 < words; k0 += words_per_group, ++g) {
    const int64_t k_end = std::min(words, k0 + words_per_group);
    __m512 acc_a[NROWS], acc_b[NROWS];
    for (int r = 0; r < NROWS; ++r) acc_a[r] = acc_b[r] = _mm512_setzero_ps();
    int64_t k = k0;
    for (; k + 3 < k_end; k += 4) {
      const __m512 q0 = nibble_pairs_avx512(qrow + k);
      const __m512 q1 = nibble_pairs_avx512(qrow + k + 2);
      for (int r = 0; r < NROWS; ++r) {
        const float* xr = x_pairs + r * ldx + 8 * k;
        acc_a[r] = _mm512_fmadd_ps(q0, _mm512_loadu_ps(xr), acc_a[r]);
        acc_b[r] = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xr + 16), acc_b[r]);
      }
    }
    if (k < k_end) {  // one word pair left
      const __m512 q0 = nibble_pairs_avx512(qrow + k);
      for (int r = 0; r < NROWS; ++r)
        acc_a[r] = _mm512_fmadd_ps(q0, _mm512_loadu_ps(x_pairs + r * ldx + 8 * k), acc_a[r]);
    }
    const __m512 s = _mm512_set1_ps(scale[g]);
    for (int r = 0; r < NROWS; ++r) total[r] = _mm512_fmadd_ps(_mm512_add_ps(acc_a[r], acc_b[r]), s, total[r]);
  }
  for (int r = 0; r < NROWS; ++r) dots[r] = _mm512_reduce_add_ps(total[r]);
}

void scaled_row_dot_avx512_rows(const int32_t* qrow, const float* x_pairs, int64_t ldx, int64_t nrows, int64_t words,
                                int64_t words_per_group, const float* scale, float* dots) {
  switch (nrows) {
    case 1: scaled_row_dot_avx512<1>(qrow, x_pairs, ldx, words, words_per_group, scale, dots); break;
    case 2: scaled_row_dot_avx512<2>(qrow, x_pairs, ldx, words, words_per_group, scale, dots); break;
    case 3: scaled_row_dot_avx512<3>(qrow, x_pairs, ldx, words, words_per_group, scale, dots); break;
    default: scaled_row_dot_avx512<4>(qrow, x_pairs, ldx, words, words_per_group, scale, dots); break;
  }
}

int cpu_simd_bits() {
  static const int bits = __builtin_cpu_supports("avx512f")                                 ? 512
                          : llmdrop::cpu_has_avx2()                                         ? 256
                                                                                              : 0;
  return bits;
}
#else
int cpu_simd_bits() { return 0; }
#endif

// Tests cap the vector width to exercise every path (AVX-512, AVX2, portable) on one machine.
std::atomic<int> simd_bits_cap{512};

// 512: AVX-512 GEMV (+ AVX2 dequantisation), 256: AVX2 + FMA, 0: portable loops.
int simd_bits() { return std::min(cpu_simd_bits(), simd_bits_cap.load()); }

// x [rows, in] -> the lane order of nibble_pairs_avx512: within each block of 16 inputs,
// [x0, x8, x1, x9, ..., x7, x15].
std::vector<float> interleave_pairs(const float* x, int64_t rows, int64_t in) {
  std::vector<float> out(rows * in);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t b = 0; b < in; b += 16)
      for (int64_t i = 0; i < 8; ++i) {
        out[m * in + b + 2 * i] = x[m * in + b + i];
        out[m * in + b + 2 * i + 1] = x[m * in + b + 8 + i];
      }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Drivers
// ---------------------------------------------------------------------------------------------
void int4_gemv(const Int4Problem& p) {
  const int64_t words = p.in / 8, words_per_group = p.group_size / 8;
  // Per-(row, group) sums of x, for the zero-point term.
  std::vector<float> xsum(p.rows * p.groups, 0.f);
  for (int64_t m = 0; m < p.rows; ++m)
    for (int64_t i = 0; i < p.in; ++i) xsum[m * p.groups + i / p.group_size] += p.x[m * p.in + i];
  const int bits = simd_bits();
  const bool wide = bits >= 512 && p.group_size % 16 == 0 && p.in % 16 == 0;
  const std::vector<float> x_pairs = wide ? interleave_pairs(p.x, p.rows, p.in) : std::vector<float>();

  at::parallel_for(0, p.out, 16, [&](int64_t o_begin, int64_t o_end) {
    for (int64_t o = o_begin; o < o_end; ++o) {
      const float* scale = p.scales + o * p.groups;
      const float* zero_scaled = p.zero_scaled + o * p.groups;
      const int32_t* qrow = p.qweight + o * words;
      for (int64_t m0 = 0; m0 < p.rows; m0 += kRowBlock) {
        const int64_t nrows = std::min(kRowBlock, p.rows - m0);
        float dots[kRowBlock];
#ifdef LLMDROP_HAVE_X86_SIMD
        if (wide) {
          scaled_row_dot_avx512_rows(qrow, x_pairs.data() + m0 * p.in, p.in, nrows, words, words_per_group, scale,
                                     dots);
        } else if (bits >= 256) {
          scaled_row_dot_avx2_rows(qrow, p.x + m0 * p.in, p.in, nrows, words, words_per_group, scale, dots);
        } else
#endif
        {
          scaled_row_dot_portable(qrow, p.x + m0 * p.in, p.in, nrows, words, words_per_group, scale, dots);
        }
        for (int64_t r = 0; r < nrows; ++r) {
          const float* xs = xsum.data() + (m0 + r) * p.groups;
          float zero_term = 0.f;
          for (int64_t g = 0; g < p.groups; ++g) zero_term += zero_scaled[g] * xs[g];
          p.y[(m0 + r) * p.out + o] = dots[r] - zero_term;
        }
      }
    }
  });
}

// Dequantise rows [o_begin, o_end) of the weight into w (fp32, [o_end - o_begin, in]).
void dequant_rows(const Int4Problem& p, int64_t o_begin, int64_t o_end, float* w) {
  const int64_t words = p.in / 8;
  const bool avx2 = simd_bits() >= 256;
  at::parallel_for(o_begin, o_end, 8, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const float* scale = p.scales + o * p.groups;
      const float* zero_scaled = p.zero_scaled + o * p.groups;
      float* wrow = w + (o - o_begin) * p.in;
#ifdef LLMDROP_HAVE_X86_SIMD
      if (avx2) {
        dequant_row_avx2(p.qweight + o * words, scale, zero_scaled, words, p.group_size, wrow);
        continue;
      }
#endif
      dequant_row_portable(p.qweight + o * words, scale, zero_scaled, words, p.group_size, wrow);
    }
  });
}

void check_inputs(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                  const at::Tensor& zeros, int64_t group_size) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && scales.device().is_cpu() &&
                  zeros.device().is_cpu(), "int4_linear (cpu): all tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2, "int4_linear: x must be 2-D [rows, in], got ", x.sizes());
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt && qweight.is_contiguous(),
              "int4_linear: qweight must be contiguous int32 [out, in/8], got ", qweight.scalar_type(), " ",
              qweight.sizes());
  const int64_t in = x.size(1), out = qweight.size(0);
  TORCH_CHECK(qweight.size(1) * 8 == in, "int4_linear: qweight has ", qweight.size(1), " words per row, x has ",
              in, " features (expected ", in / 8, ")");
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0, "int4_linear: group_size must be a positive multiple of 8, got ",
              group_size);
  const int64_t groups = (in + group_size - 1) / group_size;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == out && scales.size(1) == groups && scales.is_contiguous(),
              "int4_linear: scales must be contiguous [", out, ", ", groups, "], got ", scales.sizes());
  TORCH_CHECK(zeros.sizes() == scales.sizes() && zeros.scalar_type() == scales.scalar_type() && zeros.is_contiguous(),
              "int4_linear: zeros must match scales' shape and dtype, got ", zeros.sizes(), " ", zeros.scalar_type());
}

}  // namespace

// y = x @ W.T for the packed int4 W; x is fp32, fp16 or bf16 [rows, in], y has x's dtype.
at::Tensor int4_linear(at::Tensor x, at::Tensor qweight, at::Tensor scales, at::Tensor zeros,
                          int64_t group_size) {
  check_inputs(x, qweight, scales, zeros, group_size);
  const auto out_dtype = x.scalar_type();
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t rows = xf.size(0), in = xf.size(1), out = qweight.size(0);
  const int64_t groups = (in + group_size - 1) / group_size;
  at::Tensor y = at::empty({rows, out}, xf.options());
  if (rows == 0) return y.to(out_dtype);

  const at::Tensor scale_f = scales.to(at::kFloat).contiguous();
  const at::Tensor zero_scaled = (zeros.to(at::kFloat) * scale_f).contiguous();
  const Int4Problem p{xf.data_ptr<float>(), qweight.data_ptr<int32_t>(), scale_f.data_ptr<float>(),
                      zero_scaled.data_ptr<float>(), y.data_ptr<float>(), rows, in, out, groups, group_size};
  if (rows <= kGemvMaxRows) {
    int4_gemv(p);
  } else {
    // ~4M floats (16 MB) of dequantised weights per tile, at least 64 output rows.
    const int64_t tile = std::max<int64_t>(64, ((int64_t{1} << 22) / in) / 8 * 8);
    at::Tensor w = at::empty({std::min(tile, out), in}, xf.options());
    for (int64_t o0 = 0; o0 < out; o0 += tile) {
      const int64_t o1 = std::min(out, o0 + tile);
      dequant_rows(p, o0, o1, w.data_ptr<float>());
      y.narrow(1, o0, o1 - o0).copy_(at::mm(xf, w.narrow(0, 0, o1 - o0).t()));
    }
  }
  return out_dtype == at::kFloat ? y : y.to(out_dtype);
}

// The fp32 weight [out, in] of the packed layout (tests and debugging).
at::Tensor int4_dequantize(at::Tensor qweight, at::Tensor scales, at::Tensor zeros, int64_t group_size) {
  const int64_t in = qweight.size(1) * 8;
  check_inputs(at::empty({0, in}), qweight, scales, zeros, group_size);
  const int64_t out = qweight.size(0), groups = (in + group_size - 1) / group_size;
  at::Tensor w = at::empty({out, in}, at::kFloat);
  const at::Tensor scale_f = scales.to(at::kFloat).contiguous();
  const at::Tensor zero_scaled = (zeros.to(at::kFloat) * scale_f).contiguous();
  const Int4Problem p{nullptr, qweight.data_ptr<int32_t>(), scale_f.data_ptr<float>(), zero_scaled.data_ptr<float>(),
                      nullptr, 0, in, out, groups, group_size};
  dequant_rows(p, 0, out, w.data_ptr<float>());
  return w;
}

// Cap the vector width the kernels may use (512, 256 or 0 bits); returns the width now in use.
int64_t set_max_simd_bits(int64_t bits) {
  simd_bits_cap.store(static_cast<int>(bits));
  return simd_bits();
}

int64_t simd_width() { return simd_bits(); }

TORCH_LIBRARY(llmdrop_int4_cpu, m) {
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor", &int4_linear);
  m.def("int4_dequantize(Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor", &int4_dequantize);
  m.def("simd_width() -> int", &simd_width);
  m.def("set_max_simd_bits(int bits) -> int", &set_max_simd_bits);
}

// An empty Python module: importing it loads this library, which registers the ops above.
extern "C" PyMODINIT_FUNC PyInit__int4_cpu(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_int4_cpu", "llmdrop-rt int4 CPU kernels (torch.ops.llmdrop_int4_cpu)", -1, nullptr};
  return PyModule_Create(&module);
}
