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
// x86-64 builds carry an AVX2+FMA version selected at run time; everything else uses portable loops.
// Bindings are TORCH_LIBRARY ops (torch.ops.llmdrop_int4_cpu.*); importing the shared object as the
// Python module llmdrop_rt._int4_cpu registers them. ATen-only headers keep the build short.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LLMDROP_HAVE_AVX2_PATH 1
#endif

namespace {

constexpr int64_t kGemvMaxRows = 8;  // more activation rows than this: dequantised tiles + GEMM
constexpr int64_t kRowBlock = 4;     // activation rows per pass of the GEMV inner loop (scaled_row_dot_avx2_rows)

template <typename S>
inline float to_float(S v) { return static_cast<float>(v); }

// Problem description shared by the kernels; pointers are to contiguous fp32 / int32 data except
// scales and zeros, which keep their checkpoint dtype S.
template <typename S>
struct Int4Problem {
  const float* x;        // [rows, in]
  const int32_t* qweight;  // [out, in/8]
  const S* scales;       // [out, groups]
  const S* zeros;        // [out, groups]
  float* y;              // [rows, out]
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

#ifdef LLMDROP_HAVE_AVX2_PATH
// ---------------------------------------------------------------------------------------------
// AVX2 + FMA kernels (compiled for x86-64 baseline, used only when the CPU reports avx2 and fma)
// ---------------------------------------------------------------------------------------------
__attribute__((target("avx2,fma"))) inline __m256 nibbles_avx2(int32_t word) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i mask = _mm256_set1_epi32(0xF);
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), mask));
}

__attribute__((target("avx2,fma"))) inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// dots[r] = sum_g scale[g] * sum_{k in g} q . x[r] over a whole packed row, for NROWS activation rows
// (compile-time, so the accumulators stay in registers; one horizontal sum per row, not per group).
template <int NROWS>
__attribute__((target("avx2,fma"))) void scaled_row_dot_avx2(const int32_t* qrow, const float* x, int64_t ldx,
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

__attribute__((target("avx2,fma"))) void dequant_row_avx2(const int32_t* qrow, const float* scale,
                                                          const float* zero_scaled, int64_t words,
                                                          int64_t group_size, float* w) {
  for (int64_t k = 0; k < words; ++k) {
    const int64_t g = (8 * k) / group_size;
    const __m256 q = nibbles_avx2(qrow[k]);
    _mm256_storeu_ps(w + 8 * k, _mm256_fmsub_ps(q, _mm256_set1_ps(scale[g]), _mm256_set1_ps(zero_scaled[g])));
  }
}

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#else
bool cpu_has_avx2_fma() { return false; }
#endif

// Tests switch the AVX2 kernels off to exercise the portable ones on AVX2 machines.
std::atomic<bool> avx2_allowed{true};

bool use_avx2() { return avx2_allowed.load() && cpu_has_avx2_fma(); }

// ---------------------------------------------------------------------------------------------
// Drivers
// ---------------------------------------------------------------------------------------------
template <typename S>
void int4_gemv(const Int4Problem<S>& p) {
  const int64_t words = p.in / 8, words_per_group = p.group_size / 8;
  // Per-(row, group) sums of x, for the zero-point term.
  std::vector<float> xsum(p.rows * p.groups, 0.f);
  for (int64_t m = 0; m < p.rows; ++m)
    for (int64_t i = 0; i < p.in; ++i) xsum[m * p.groups + i / p.group_size] += p.x[m * p.in + i];
  const bool avx2 = use_avx2();

  at::parallel_for(0, p.out, 16, [&](int64_t o_begin, int64_t o_end) {
    std::vector<float> scale(p.groups), zero_scaled(p.groups);
    for (int64_t o = o_begin; o < o_end; ++o) {
      for (int64_t g = 0; g < p.groups; ++g) {
        scale[g] = to_float(p.scales[o * p.groups + g]);
        zero_scaled[g] = to_float(p.zeros[o * p.groups + g]) * scale[g];
      }
      const int32_t* qrow = p.qweight + o * words;
      for (int64_t m0 = 0; m0 < p.rows; m0 += kRowBlock) {
        const int64_t nrows = std::min(kRowBlock, p.rows - m0);
        float dots[kRowBlock];
#ifdef LLMDROP_HAVE_AVX2_PATH
        if (avx2) {
          scaled_row_dot_avx2_rows(qrow, p.x + m0 * p.in, p.in, nrows, words, words_per_group, scale.data(), dots);
        } else
#endif
        {
          scaled_row_dot_portable(qrow, p.x + m0 * p.in, p.in, nrows, words, words_per_group, scale.data(), dots);
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
template <typename S>
void dequant_rows(const Int4Problem<S>& p, int64_t o_begin, int64_t o_end, float* w) {
  const int64_t words = p.in / 8;
  const bool avx2 = use_avx2();
  at::parallel_for(o_begin, o_end, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> scale(p.groups), zero_scaled(p.groups);
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t g = 0; g < p.groups; ++g) {
        scale[g] = to_float(p.scales[o * p.groups + g]);
        zero_scaled[g] = to_float(p.zeros[o * p.groups + g]) * scale[g];
      }
      float* wrow = w + (o - o_begin) * p.in;
#ifdef LLMDROP_HAVE_AVX2_PATH
      if (avx2) {
        dequant_row_avx2(p.qweight + o * words, scale.data(), zero_scaled.data(), words, p.group_size, wrow);
        continue;
      }
#endif
      dequant_row_portable(p.qweight + o * words, scale.data(), zero_scaled.data(), words, p.group_size, wrow);
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

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scales.scalar_type(), "int4_linear_cpu", [&] {
    Int4Problem<scalar_t> p{xf.data_ptr<float>(), qweight.data_ptr<int32_t>(), scales.data_ptr<scalar_t>(),
                            zeros.data_ptr<scalar_t>(), y.data_ptr<float>(), rows, in, out, groups, group_size};
    if (rows <= kGemvMaxRows) {
      int4_gemv(p);
      return;
    }
    // ~4M floats (16 MB) of dequantised weights per tile, at least 64 output rows.
    const int64_t tile = std::max<int64_t>(64, ((int64_t{1} << 22) / in) / 8 * 8);
    at::Tensor w = at::empty({std::min(tile, out), in}, xf.options());
    for (int64_t o0 = 0; o0 < out; o0 += tile) {
      const int64_t o1 = std::min(out, o0 + tile);
      dequant_rows(p, o0, o1, w.data_ptr<float>());
      y.narrow(1, o0, o1 - o0).copy_(at::mm(xf, w.narrow(0, 0, o1 - o0).t()));
    }
  });
  return out_dtype == at::kFloat ? y : y.to(out_dtype);
}

// The fp32 weight [out, in] of the packed layout (tests and debugging).
at::Tensor int4_dequantize(at::Tensor qweight, at::Tensor scales, at::Tensor zeros, int64_t group_size) {
  const int64_t in = qweight.size(1) * 8;
  check_inputs(at::empty({0, in}), qweight, scales, zeros, group_size);
  const int64_t out = qweight.size(0), groups = (in + group_size - 1) / group_size;
  at::Tensor w = at::empty({out, in}, at::kFloat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scales.scalar_type(), "int4_dequantize_cpu", [&] {
    Int4Problem<scalar_t> p{nullptr, qweight.data_ptr<int32_t>(), scales.data_ptr<scalar_t>(),
                            zeros.data_ptr<scalar_t>(), nullptr, 0, in, out, groups, group_size};
    dequant_rows(p, 0, out, w.data_ptr<float>());
  });
  return w;
}

// Allow or forbid the AVX2 kernels; returns whether they are now in use.
bool set_avx2_enabled(bool enabled) {
  avx2_allowed.store(enabled);
  return use_avx2();
}

bool uses_avx2() { return use_avx2(); }

TORCH_LIBRARY(llmdrop_int4_cpu, m) {
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor", &int4_linear);
  m.def("int4_dequantize(Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor", &int4_dequantize);
  m.def("uses_avx2() -> bool", &uses_avx2);
  m.def("set_avx2_enabled(bool enabled) -> bool", &set_avx2_enabled);
}

// An empty Python module: importing it loads this library, which registers the ops above.
extern "C" PyMODINIT_FUNC PyInit__int4_cpu(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_int4_cpu", "llmdrop-rt int4 CPU kernels (torch.ops.llmdrop_int4_cpu)", -1, nullptr};
  return PyModule_Create(&module);
}
