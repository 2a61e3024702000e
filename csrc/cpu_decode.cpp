// One decoder layer's decode step on the CPU (1 token per row, fp32 activations) in a single call, so the dozens of
// small ops between the matrix products cost no Python or ATen dispatch each.
//
// The layer is the model's own (llmdrop_rt/model/layers.py, DecoderLayer.forward_fused): the residual stream x is
// updated in place and the sub-block output is returned as `pending` for the next layer to add. Present modules:
//   attention: x += pending; h = rms_norm(x) * attn_norm; q|k|v = qkv(h); rotate q, k (rotate-half RoPE); write k,
//              v at cache index `start`; softmax(q k^T / sqrt(d)) v over keys 0..start under the mask; o_proj.
//   MLP:       x += pending; h = rms_norm(x) * mlp_norm; g|u = gate_up(h); down(silu(g) * u).
// The projections run the GEMV ops of llmdrop_rt._cpu_gemv (torch.ops.llmdrop_cpu_gemv.gemv_<fmt>), looked up
// once through the dispatcher. Caches are [B, Hkv, S, D] slots (llmdrop_rt/model/cache.py) of fp32, fp16 or bf16,
// read as fp32.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "x86_simd.h"

namespace {

// ---------------------------------------------------------------------------------------------
// The vector loops between the projections: AVX2 where the CPU has it (x86_simd.h), portable loops with the same
// independent partial sums elsewhere.
// ---------------------------------------------------------------------------------------------
#ifdef LLMDROP_HAVE_X86_SIMD
using llmdrop::load8;

template <typename T>
LLMDROP_AVX2 float dot_avx2(const float* a, const T* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
  float total = llmdrop::hsum_avx2(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) total += a[i] * static_cast<float>(b[i]);
  return total;
}

// e^x for eight lanes: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor-like polynomial (Cephes'
// expf coefficients, ~2 ulp), scaled by 2^n through the exponent bits. Below -87.3 the result is 0 (where
// std::exp would give a subnormal), above 88.7 infinity; NaN stays NaN.
LLMDROP_AVX2 __m256 exp8_avx2(__m256 x) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // 2^n in two factors, so that n up to 128 (x up to 88.7) does not overflow the exponent field.
  const __m256i half = _mm256_srai_epi32(_mm256_cvtps_epi32(n), 1);
  const __m256i rest = _mm256_sub_epi32(_mm256_cvtps_epi32(n), half);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 scale_a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const __m256 scale_b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(rest, bias), 23));
  y = _mm256_mul_ps(_mm256_mul_ps(y, scale_a), scale_b);
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                       _mm256_cmp_ps(x, _mm256_set1_ps(88.7f), _CMP_GT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

LLMDROP_AVX2 void softmax_avx2(float* s, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) best = std::max(best, s[j]);
  const __m256 shift = _mm256_set1_ps(best);
  __m256 sum8 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), shift));
    _mm256_storeu_ps(s + j, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, sum8);
  float total = 0.f;
  for (float lane : lanes) total += lane;
  for (; j < n; ++j) total += (s[j] = std::exp(s[j] - best));
  const __m256 inverse = _mm256_set1_ps(1.f / total);
  for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), inverse));
  for (; j < n; ++j) s[j] /= total;
}

// Lane t of the result = the sum of v[t]'s eight lanes.
LLMDROP_AVX2 inline __m256 hsum8_avx2(const __m256 (&v)[8]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// Attention of H query heads that read the same KV head (grouped-query attention): each cached key and value
// vector is loaded, and widened from fp16 / bf16, once for all H heads.

// out[n] = the sum of acc[n]'s eight lanes, for N vectors, eight at a time.
template <int N>
LLMDROP_AVX2 inline void store_sums(const __m256 (&acc)[N], float* out) {
  for (int first = 0; first < N; first += 8) {
    __m256 chunk[8];
    for (int n = 0; n < 8; ++n) chunk[n] = first + n < N ? acc[first + n] : _mm256_setzero_ps();
    alignas(32) float sums[8];
    _mm256_store_ps(sums, hsum8_avx2(chunk));
    for (int n = 0; n < 8 && first + n < N; ++n) out[first + n] = sums[n];
  }
}

// scores[h][j] = scale * q[h] . k[j] for every key, kKeys keys at a time so that the accumulators (kKeys x H), the
// keys' vectors and one of q stay in the 16 registers. The values v[j] are prefetched meanwhile: the values pass
// then reads them from the core's caches instead of streaming them in alone.
template <int H, typename T>
LLMDROP_AVX2 void grouped_scores_avx2(const float* const* q, const T* k, const T* v, int64_t keys, int64_t d,
                                      float scale, float* const* scores) {
  constexpr int kKeys = H == 1 ? 8 : H == 2 ? 4 : 3;
  const int64_t whole = d / 8 * 8;
  int64_t j = 0;
  for (; j + kKeys <= keys; j += kKeys) {
    __m256 acc[kKeys * H];
    for (auto& a : acc) a = _mm256_setzero_ps();
    for (int64_t i = 0; i < whole; i += 8) {
      __m256 key[kKeys];
      for (int t = 0; t < kKeys; ++t) key[t] = load8(k + (j + t) * d + i);
      if (i * sizeof(T) % 64 == 0)  // once per cache line
        for (int t = 0; t < kKeys; ++t) _mm_prefetch(reinterpret_cast<const char*>(v + (j + t) * d + i), _MM_HINT_T0);
      for (int h = 0; h < H; ++h) {
        const __m256 qv = _mm256_loadu_ps(q[h] + i);
        for (int t = 0; t < kKeys; ++t) acc[t * H + h] = _mm256_fmadd_ps(key[t], qv, acc[t * H + h]);
      }
    }
    float dots[kKeys * H];
    store_sums(acc, dots);
    for (int t = 0; t < kKeys; ++t)
      for (int h = 0; h < H; ++h) {
        float dot = dots[t * H + h];
        for (int64_t i = whole; i < d; ++i) dot += q[h][i] * static_cast<float>(k[(j + t) * d + i]);
        scores[h][j + t] = dot * scale;
      }
  }
  for (; j < keys; ++j)
    for (int h = 0; h < H; ++h) scores[h][j] = dot_avx2(q[h], k + j * d, d) * scale;
}

// o[h][c .. c + 8 * C) += sum_j p[h][j] v[j][c .. c + 8 * C) over the keys the mask shows (all when it is null;
// hidden keys' cache slots may hold anything), in H x C registers.
template <int H, int C, typename T>
LLMDROP_AVX2 inline void grouped_values_avx2(const float* const* p, const T* v, const bool* visible, int64_t keys,
                                             int64_t d, int64_t c, float* const* o) {
  __m256 acc[H][C];
  for (int h = 0; h < H; ++h)
    for (int t = 0; t < C; ++t) acc[h][t] = _mm256_loadu_ps(o[h] + c + 8 * t);
  for (int64_t j = 0; j < keys; ++j) {
    if (visible && !visible[j]) continue;
    __m256 value[C];
    for (int t = 0; t < C; ++t) value[t] = load8(v + j * d + c + 8 * t);
    for (int h = 0; h < H; ++h) {
      const __m256 pj = _mm256_set1_ps(p[h][j]);
      for (int t = 0; t < C; ++t) acc[h][t] = _mm256_fmadd_ps(pj, value[t], acc[h][t]);
    }
  }
  for (int h = 0; h < H; ++h)
    for (int t = 0; t < C; ++t) _mm256_storeu_ps(o[h] + c + 8 * t, acc[h][t]);
}

// o[h] = sum_j p[h][j] v[j] (o zeroed by the caller): as many columns at a time as registers hold for H heads.
template <int H, typename T>
LLMDROP_AVX2 void grouped_attention_values_avx2(const float* const* p, const T* v, const bool* visible, int64_t keys,
                                                int64_t d, float* const* o) {
  constexpr int kColumns = H == 1 ? 8 : H == 2 ? 4 : 3;  // vectors of 8 columns: H x kColumns + kColumns + 1 <= 16
  int64_t c = 0;
  for (; c + 8 * kColumns <= d; c += 8 * kColumns) grouped_values_avx2<H, kColumns>(p, v, visible, keys, d, c, o);
  if constexpr (kColumns > 2)
    for (; c + 16 <= d; c += 16) grouped_values_avx2<H, 2>(p, v, visible, keys, d, c, o);
  for (; c + 8 <= d; c += 8) grouped_values_avx2<H, 1>(p, v, visible, keys, d, c, o);
  for (int64_t j = 0; j < keys; ++j)
    if (!visible || visible[j])
      for (int h = 0; h < H; ++h)
        for (int64_t i = c; i < d; ++i) o[h][i] += p[h][j] * static_cast<float>(v[j * d + i]);
}

LLMDROP_AVX2 void silu_mul_avx2(const float* gate, const float* up, float* out, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 sigmoid = _mm256_div_ps(one, _mm256_add_ps(one, exp8_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

#endif

// Tests cap the vector width (256: AVX2 + FMA + F16C, 0: the portable loops) to run both paths on one machine.
std::atomic<int> simd_bits_cap{256};

int simd_bits() {
#ifdef LLMDROP_HAVE_X86_SIMD
  if (llmdrop::cpu_has_avx2()) return std::min(256, simd_bits_cap.load());
#endif
  return 0;
}

bool use_avx2() { return simd_bits() >= 256; }

// Cap the vector width of the loops between the projections (256 or 0 bits); returns the width now in use.
int64_t set_max_simd_bits(int64_t bits) {
  simd_bits_cap.store(static_cast<int>(bits));
  return simd_bits();
}

// sum a[i] * b[i]: eight partial sums, so the additions do not wait on each other.
template <typename T>
float dot(const float* a, const T* b, int64_t n) {
#ifdef LLMDROP_HAVE_X86_SIMD
  if (use_avx2()) return dot_avx2(a, b, n);
#endif
  float partial[8] = {0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) partial[k] += a[i + k] * static_cast<float>(b[i + k]);
  float total = 0.f;
  for (float p : partial) total += p;
  for (; i < n; ++i) total += a[i] * static_cast<float>(b[i]);
  return total;
}

// Masked scores (-inf) become probability 0; a row of them only (no visible key) gives NaN, as 0 / 0.
void softmax_in_place(float* s, int64_t n) {
#ifdef LLMDROP_HAVE_X86_SIMD
  if (use_avx2()) return softmax_avx2(s, n);
#endif
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) best = std::max(best, s[j]);
  float total = 0.f;
  for (int64_t j = 0; j < n; ++j) total += (s[j] = std::exp(s[j] - best));
  for (int64_t j = 0; j < n; ++j) s[j] /= total;
}

// out = silu(gate) * up
void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
#ifdef LLMDROP_HAVE_X86_SIMD
  if (use_avx2()) return silu_mul_avx2(gate, up, out, n);
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

// One pass over a KV head's cached keys and values serves up to this many of its query heads.
constexpr int kMaxGroupedHeads = 4;

// Calls run(std::integral_constant<int, H>{}) for H = heads (1 .. kMaxGroupedHeads).
template <typename Run>
void with_heads(int heads, Run&& run) {
  switch (heads) {
    case 1: return run(std::integral_constant<int, 1>{});
    case 2: return run(std::integral_constant<int, 2>{});
    case 3: return run(std::integral_constant<int, 3>{});
    default: return run(std::integral_constant<int, 4>{});
  }
}

// out[h] = softmax(scale * q[h] k^T) v over keys 0 .. keys - 1 (rows d apart) for `heads` query heads of one KV
// head, leaving out the keys the mask hides (visible[j] false; null: none hidden). scores[h]: scratch of `keys`.
template <typename T>
void attend_heads(int heads, const float* const* q, const T* k, const T* v, const bool* visible, int64_t keys,
                  int64_t d, float scale, float* const* scores, float* const* out) {
#ifdef LLMDROP_HAVE_X86_SIMD
  const bool avx2 = use_avx2();
  if (avx2)
    with_heads(heads, [&](auto h) { grouped_scores_avx2<decltype(h)::value>(q, k, v, keys, d, scale, scores); });
#else
  const bool avx2 = false;
#endif
  for (int h = 0; h < heads; ++h) {
    if (!avx2)
      for (int64_t j = 0; j < keys; ++j) scores[h][j] = dot(q[h], k + j * d, d) * scale;
    if (visible)
      for (int64_t j = 0; j < keys; ++j)
        if (!visible[j]) scores[h][j] = -std::numeric_limits<float>::infinity();
    softmax_in_place(scores[h], keys);
    std::fill(out[h], out[h] + d, 0.f);
  }
#ifdef LLMDROP_HAVE_X86_SIMD
  if (avx2)
    return with_heads(heads, [&](auto h) {
      grouped_attention_values_avx2<decltype(h)::value>(scores, v, visible, keys, d, out);
    });
#endif
  for (int h = 0; h < heads; ++h)
    for (int64_t j = 0; j < keys; ++j)
      if (!visible || visible[j])
        for (int64_t i = 0; i < d; ++i) out[h][i] += scores[h][j] * static_cast<float>(v[j * d + i]);
}

// Multiply-adds of a step's attention (rows x heads x keys x head size) above which heads are spread over threads.
constexpr int64_t kParallelAttentionWork = 1 << 16;

using GemvOp = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&);

c10::TypedOperatorHandle<GemvOp> gemv_op(const std::string& fmt) {
  static std::mutex lock;
  static std::unordered_map<std::string, c10::TypedOperatorHandle<GemvOp>> handles;
  std::lock_guard<std::mutex> guard(lock);
  auto found = handles.find(fmt);
  if (found == handles.end()) {
    auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(("llmdrop_cpu_gemv::gemv_" + fmt).c_str(), "");
    found = handles.emplace(fmt, handle.typed<GemvOp>()).first;
  }
  return found->second;
}

at::Tensor project(const at::Tensor& x, const at::Tensor& weight, const std::string& fmt,
                   const std::optional<at::Tensor>& bias) {
  return gemv_op(fmt).call(x, weight, bias);
}

// out[r] = x[r] / rms(x[r]) * weight, accumulated in fp32 (the runtime's fp32 RMSNorm).
void rms_norm_rows(const float* x, const float* weight, float* out, int64_t rows, int64_t hidden, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * hidden;
    const float sum = dot(xr, xr, hidden);
    const float scale = 1.f / std::sqrt(sum / static_cast<float>(hidden) + static_cast<float>(eps));
    for (int64_t i = 0; i < hidden; ++i) out[r * hidden + i] = weight[i] * (xr[i] * scale);
  }
}

void add_in_place(float* x, const float* delta, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += delta[i];
}

// Rotate-half RoPE of `heads` vectors of size d at one position: x1*cos - x2*sin, x2*cos + x1*sin.
void rotate(float* v, int64_t heads, int64_t d, const float* cos, const float* sin) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* x = v + h * d;
    for (int64_t i = 0; i < half; ++i) {
      const float a = x[i], b = x[i + half];
      x[i] = a * cos[i] - b * sin[i];
      x[i + half] = b * cos[i] + a * sin[i];
    }
  }
}

// Rotate each row's q and k heads at its position and store k, v at cache index `start` in the cache's type (the
// rounding torch's conversion to it does, so prefill's and decode's cached keys agree); `out` [rows, heads * d] =
// softmax(q k^T / sqrt(d)) v over keys 0 .. start under the mask.
template <typename T>
void rotate_store_attend(float* qkv_data, int64_t width, const float* cos_data, const float* sin_data, T* k_data,
                         T* v_data, int64_t max_len, int64_t start, const bool* mask_data, int64_t mask_stride,
                         int64_t rows, int64_t heads, int64_t kv_heads, int64_t d, float* out_data) {
  const int64_t keys = start + 1;
  for (int64_t b = 0; b < rows; ++b) {
    float* row = qkv_data + b * width;
    rotate(row, heads + kv_heads, d, cos_data + b * (d / 2), sin_data + b * (d / 2));  // q and k are adjacent
    for (int64_t g = 0; g < kv_heads; ++g) {
      const int64_t slot = ((b * kv_heads + g) * max_len + start) * d;
      const float* k_new = row + (heads + g) * d;
      const float* v_new = row + (heads + kv_heads + g) * d;
      for (int64_t i = 0; i < d; ++i) {
        k_data[slot + i] = static_cast<T>(k_new[i]);
        v_data[slot + i] = static_cast<T>(v_new[i]);
      }
    }
  }
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const int64_t group = heads / kv_heads;  // query heads g * group .. g * group + group - 1 read KV head g
  const int64_t chunks = (group + kMaxGroupedHeads - 1) / kMaxGroupedHeads;  // of a group's heads, one pass each
  // One task per (row, KV head, chunk of its query heads). Waking the thread pool costs more than a short
  // context's attention: the tasks are spread over threads only when there is enough work.
  const int64_t tasks = rows * kv_heads * chunks;
  const int64_t grain = rows * heads * keys * d >= kParallelAttentionWork ? 1 : tasks;
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(kMaxGroupedHeads * keys);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (kv_heads * chunks), g = task / chunks % kv_heads, chunk = task % chunks;
      const int64_t first = g * group + chunk * kMaxGroupedHeads;
      const int count = static_cast<int>(std::min<int64_t>(kMaxGroupedHeads, (g + 1) * group - first));
      const float* q[kMaxGroupedHeads];
      float* scores[kMaxGroupedHeads];
      float* out[kMaxGroupedHeads];
      for (int h = 0; h < count; ++h) {
        q[h] = qkv_data + b * width + (first + h) * d;
        scores[h] = scratch.data() + h * keys;
        out[h] = out_data + (b * heads + first + h) * d;
      }
      const int64_t cached = (b * kv_heads + g) * max_len * d;
      attend_heads(count, q, k_data + cached, v_data + cached, mask_data ? mask_data + b * mask_stride : nullptr,
                   keys, d, scale, scores, out);
    }
  });
}

at::Tensor attention_block(at::Tensor& x, const at::Tensor& normed, const at::Tensor& qkv_weight,
                           const std::string& qkv_fmt, const std::optional<at::Tensor>& qkv_bias,
                           const at::Tensor& o_weight, const std::string& o_fmt,
                           const std::optional<at::Tensor>& o_bias, at::Tensor& k_cache, at::Tensor& v_cache,
                           int64_t start, const at::Tensor& cos, const at::Tensor& sin,
                           const std::optional<at::Tensor>& mask, int64_t heads, int64_t kv_heads, int64_t d) {
  const int64_t rows = x.size(0), keys = start + 1, max_len = k_cache.size(2);
  const auto cache_type = k_cache.scalar_type();
  TORCH_CHECK(start >= 0 && start < max_len, "decode_layer: start ", start, " outside the cache of ", max_len);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.size(0) == rows &&
                  k_cache.size(1) == kv_heads && k_cache.size(3) == d && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.scalar_type() == cache_type &&
                  (cache_type == at::kFloat || cache_type == at::kHalf || cache_type == at::kBFloat16),
              "decode_layer: caches must be contiguous fp32, fp16 or bf16 [B, Hkv, S, D] slots of one dtype");
  at::Tensor qkv = project(normed, qkv_weight, qkv_fmt, qkv_bias).contiguous();
  const int64_t width = (heads + 2 * kv_heads) * d;
  TORCH_CHECK(qkv.size(1) == width, "decode_layer: qkv gives ", qkv.size(1), " features, expected ", width);
  const bool* mask_data = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  const int64_t mask_stride = mask.has_value() ? mask->size(1) : 0;
  TORCH_CHECK(!mask.has_value() || (mask->size(0) == rows && mask_stride >= keys),
              "decode_layer: mask must be [B, >= start + 1]");
  at::Tensor out = at::empty({rows, heads * d}, x.options());
  auto run = [&](auto* k_data, auto* v_data) {
    rotate_store_attend(qkv.data_ptr<float>(), width, cos.data_ptr<float>(), sin.data_ptr<float>(), k_data, v_data,
                        max_len, start, mask_data, mask_stride, rows, heads, kv_heads, d, out.data_ptr<float>());
  };
  if (cache_type == at::kHalf)
    run(k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>());
  else if (cache_type == at::kBFloat16)
    run(k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>());
  else
    run(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  return project(out, o_weight, o_fmt, o_bias);
}

at::Tensor mlp_block(const at::Tensor& normed, const at::Tensor& gate_up_weight, const std::string& gate_up_fmt,
                     const std::optional<at::Tensor>& gate_up_bias, const at::Tensor& down_weight,
                     const std::string& down_fmt, const std::optional<at::Tensor>& down_bias) {
  at::Tensor gate_up = project(normed, gate_up_weight, gate_up_fmt, gate_up_bias).contiguous();
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::Tensor act = at::empty({rows, inter}, gate_up.options());
  const float* gu = gate_up.data_ptr<float>();
  float* a = act.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) silu_mul(gu + r * 2 * inter, gu + r * 2 * inter + inter, a + r * inter, inter);
  return project(act, down_weight, down_fmt, down_bias);
}

// See the file comment. Absent modules are passed as undefined weights (None from Python).
at::Tensor decode_layer(at::Tensor x, const std::optional<at::Tensor>& pending,
                        const std::optional<at::Tensor>& attn_norm, const std::optional<at::Tensor>& qkv_weight,
                        std::string qkv_fmt, const std::optional<at::Tensor>& qkv_bias,
                        const std::optional<at::Tensor>& o_weight, std::string o_fmt,
                        const std::optional<at::Tensor>& o_bias, const std::optional<at::Tensor>& k_cache,
                        const std::optional<at::Tensor>& v_cache, int64_t start,
                        const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                        const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& mlp_norm,
                        const std::optional<at::Tensor>& gate_up_weight, std::string gate_up_fmt,
                        const std::optional<at::Tensor>& gate_up_bias, const std::optional<at::Tensor>& down_weight,
                        std::string down_fmt, const std::optional<at::Tensor>& down_bias, double eps, int64_t heads,
                        int64_t kv_heads, int64_t head_dim) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "decode_layer: x must be a contiguous fp32 [B, hidden] residual stream");
  const int64_t rows = x.size(0), hidden = x.size(1);
  float* x_data = x.data_ptr<float>();
  at::Tensor normed = at::empty_like(x);
  std::optional<at::Tensor> out = pending;
  auto add_pending = [&]() {
    if (out.has_value()) add_in_place(x_data, out->contiguous().data_ptr<float>(), rows * hidden);
  };
  if (qkv_weight.has_value()) {
    add_pending();
    rms_norm_rows(x_data, attn_norm->data_ptr<float>(), normed.data_ptr<float>(), rows, hidden, eps);
    at::Tensor k = *k_cache, v = *v_cache;
    out = attention_block(x, normed, *qkv_weight, qkv_fmt, qkv_bias, *o_weight, o_fmt, o_bias, k, v, start,
                          cos->contiguous(), sin->contiguous(), mask, heads, kv_heads, head_dim);
  }
  if (gate_up_weight.has_value()) {
    add_pending();
    rms_norm_rows(x_data, mlp_norm->data_ptr<float>(), normed.data_ptr<float>(), rows, hidden, eps);
    out = mlp_block(normed, *gate_up_weight, gate_up_fmt, gate_up_bias, *down_weight, down_fmt, down_bias);
  }
  TORCH_CHECK(out.has_value(), "decode_layer: a layer with neither attention nor MLP");
  return *out;
}

}  // namespace

// A model's decoder layers for the decode step, each layer's fixed arguments gathered once (`add_layer`), so that
// a step is one call (`run`) however many layers the model has.
class DecodeStack : public torch::CustomClassHolder {
 public:
  DecodeStack(double eps, int64_t heads, int64_t kv_heads, int64_t head_dim)
      : eps_(eps), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim) {}

  // The next layer, as decode_layer takes it; `slot`: its attention's index in the caches' first dimension (its
  // attention absent: -1).
  void add_layer(std::optional<at::Tensor> attn_norm, std::optional<at::Tensor> qkv_weight, std::string qkv_fmt,
                 std::optional<at::Tensor> qkv_bias, std::optional<at::Tensor> o_weight, std::string o_fmt,
                 std::optional<at::Tensor> o_bias, std::optional<at::Tensor> mlp_norm,
                 std::optional<at::Tensor> gate_up_weight, std::string gate_up_fmt,
                 std::optional<at::Tensor> gate_up_bias, std::optional<at::Tensor> down_weight, std::string down_fmt,
                 std::optional<at::Tensor> down_bias, int64_t slot) {
    TORCH_CHECK(qkv_weight.has_value() == (slot >= 0), "DecodeStack: a cache slot for each layer with attention");
    layers_.push_back({attn_norm, qkv_weight, qkv_fmt, qkv_bias, o_weight, o_fmt, o_bias, mlp_norm, gate_up_weight,
                       gate_up_fmt, gate_up_bias, down_weight, down_fmt, down_bias, slot});
  }

  // Every layer's decode step on the residual stream x [B, hidden] (updated in place), with the caches
  // [kept attention layers, B, Hkv, S, D]; returns the last layer's pending output.
  at::Tensor run(at::Tensor x, at::Tensor k_caches, at::Tensor v_caches, int64_t start, at::Tensor cos,
                 at::Tensor sin, std::optional<at::Tensor> mask) {
    std::optional<at::Tensor> pending;
    for (const Layer& layer : layers_) {
      std::optional<at::Tensor> k, v;
      if (layer.slot >= 0) k = k_caches.select(0, layer.slot), v = v_caches.select(0, layer.slot);
      pending = decode_layer(x, pending, layer.attn_norm, layer.qkv_weight, layer.qkv_fmt, layer.qkv_bias,
                             layer.o_weight, layer.o_fmt, layer.o_bias, k, v, start, cos, sin, mask, layer.mlp_norm,
                             layer.gate_up_weight, layer.gate_up_fmt, layer.gate_up_bias, layer.down_weight,
                             layer.down_fmt, layer.down_bias, eps_, heads_, kv_heads_, head_dim_);
    }
    TORCH_CHECK(pending.has_value(), "DecodeStack: no layers");
    return *pending;
  }

 private:
  struct Layer {
    std::optional<at::Tensor> attn_norm, qkv_weight;
    std::string qkv_fmt;
    std::optional<at::Tensor> qkv_bias, o_weight;
    std::string o_fmt;
    std::optional<at::Tensor> o_bias, mlp_norm, gate_up_weight;
    std::string gate_up_fmt;
    std::optional<at::Tensor> gate_up_bias, down_weight;
    std::string down_fmt;
    std::optional<at::Tensor> down_bias;
    int64_t slot;
  };
  double eps_;
  int64_t heads_, kv_heads_, head_dim_;
  std::vector<Layer> layers_;
};

TORCH_LIBRARY(llmdrop_cpu_decode, m) {
  m.def("decode_layer(Tensor(a!) x, Tensor? pending, Tensor? attn_norm, Tensor? qkv_weight, str qkv_fmt, "
        "Tensor? qkv_bias, Tensor? o_weight, str o_fmt, Tensor? o_bias, Tensor(b!)? k_cache, Tensor(c!)? v_cache, "
        "int start, Tensor? cos, Tensor? sin, Tensor? mask, Tensor? mlp_norm, Tensor? gate_up_weight, "
        "str gate_up_fmt, Tensor? gate_up_bias, Tensor? down_weight, str down_fmt, Tensor? down_bias, float eps, "
        "int heads, int kv_heads, int head_dim) -> Tensor");
  m.def("set_max_simd_bits(int bits) -> int", &set_max_simd_bits);
  m.class_<DecodeStack>("DecodeStack")
      .def(torch::init<double, int64_t, int64_t, int64_t>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("run", &DecodeStack::run);
}

TORCH_LIBRARY_IMPL(llmdrop_cpu_decode, CPU, m) { m.impl("decode_layer", &decode_layer); }

// Importing the shared object as a Python module registers the ops above.
PyMODINIT_FUNC PyInit__cpu_decode(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_decode", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
