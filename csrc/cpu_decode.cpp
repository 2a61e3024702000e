// One decoder layer's decode step on the CPU (1 token per row, fp32 activations) in a single call, so the dozens of
// small ops between the matrix products cost no Python or ATen dispatch each.
//
// The layer is the model's own (llmdrop_rt/model/layers.py, DecoderLayer.forward_fused): the residual stream x is
// updated in place and the sub-block output is returned as `pending` for the next layer to add. Present modules:
//   attention: x += pending; h = rms_norm(x) * attn_norm; q|k|v = qkv(h); rotate q, k (rotate-half RoPE); write k,
//              v at cache index `start`; softmax(q k^T / sqrt(d)) v over keys 0..start under the mask; o_proj.
//   MLP:       x += pending; h = rms_norm(x) * mlp_norm; g|u = gate_up(h); down(silu(g) * u).
// The projections call the GEMV kernels of cpu_gemv.h directly. Caches are [B, Hkv, S, D] slots
// (llmdrop_rt/model/cache.py) of fp32, fp16 or bf16, read as fp32. DecodeStack runs a model's whole decode step in one
// call, from the token ids (embedding lookup, rotary tables, mask) through all of its layers to the final norm and
// output head, on one team of threads (Crew).
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_gemv.h"
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

bool use_avx2() { return simd_bits() >= 256; }

// Cap the vector width of this extension's loops and GEMV kernels (512, 256 or 0 bits); returns the width now in
// use.
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

// Work of a phase (the attention's multiply-adds, rows x heads x keys x head size; SiLU's elements) above which
// its tasks are spread over torch's threads when no team runs the step (waking the pool costs more than a short
// context's attention).
constexpr int64_t kWorthThreadsWork = 1 << 16;

// ---------------------------------------------------------------------------------------------
// The step's threads
// ---------------------------------------------------------------------------------------------
// Waits a thread spins before it yields its core, so that more threads than cores still make progress.
constexpr int kSpinsBeforeYield = 1 << 10;

inline void cpu_relax() {
#ifdef LLMDROP_HAVE_X86_SIMD
  _mm_pause();
#endif
}

// A barrier for a fixed number of threads, which spin rather than sleep: a decode step's phases last microseconds,
// about what putting a thread to sleep and waking it costs.
class SpinBarrier {
 public:
  explicit SpinBarrier(int threads) : threads_(threads) {}

  void wait() {
    const unsigned generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(generation + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins < kSpinsBeforeYield)
        cpu_relax();
      else
        std::this_thread::yield();
    }
  }

 private:
  const int threads_;
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<unsigned> generation_{0};
};

// Who runs a decode step's phases. A team: `workers` threads of one parallel region (ids 0 .. workers - 1) going
// through the same phases, each phase's work split between them and a barrier after it (none for a team of one),
// so a step pays no fork/join, and no thread-pool call, per projection. Or one thread whose phases use torch's
// thread pool themselves, for the steps a team does not take: more rows than the fused GEMV serves.
class Crew {
 public:
  static Crew member(int id, int workers, SpinBarrier* barrier) { return Crew(id, workers, barrier, true); }
  static Crew on_torch_threads() { return Crew(0, 1, nullptr, false); }

  bool team() const { return team_; }
  int id() const { return id_; }
  void sync() {
    if (barrier_) barrier_->wait();
  }

  // f() on one thread.
  template <class F>
  void alone(F&& f) {
    if (id_ == 0) f();
    sync();
  }

  // f(begin, end) over [0, n) in shares; without a team on torch's threads when `worth_threads`.
  template <class F>
  void share(int64_t n, bool worth_threads, F&& f) {
    if (!team()) return at::parallel_for(0, n, worth_threads ? 1 : std::max<int64_t>(n, 1), f);
    const int64_t begin = n * id_ / workers_, end = n * (id_ + 1) / workers_;
    if (begin < end) f(begin, end);
    sync();
  }

 private:
  Crew(int id, int workers, SpinBarrier* barrier, bool team)
      : id_(id), workers_(workers), barrier_(barrier), team_(team) {}

  int id_, workers_;
  SpinBarrier* barrier_;
  bool team_;
};

// ---------------------------------------------------------------------------------------------
// A layer's projections
// ---------------------------------------------------------------------------------------------
enum class WeightFormat { kF32, kF16, kBF16, kQ8_0, kQ4_0, kQ4_1 };

// f(Format{}) for the kernels' format type.
template <class F>
void with_format(WeightFormat fmt, F&& f) {
  switch (fmt) {
    case WeightFormat::kF32: return f(F32{});
    case WeightFormat::kF16: return f(F16{});
    case WeightFormat::kBF16: return f(BF16{});
    case WeightFormat::kQ8_0: return f(Q8_0{});
    case WeightFormat::kQ4_0: return f(Q4_0{});
    case WeightFormat::kQ4_1: return f(Q4_1{});
  }
}

WeightFormat format_named(const std::string& name) {
  static const std::pair<const char*, WeightFormat> names[] = {
      {"f32", WeightFormat::kF32},   {"f16", WeightFormat::kF16},   {"bf16", WeightFormat::kBF16},
      {"q8_0", WeightFormat::kQ8_0}, {"q4_0", WeightFormat::kQ4_0}, {"q4_1", WeightFormat::kQ4_1}};
  for (const auto& [known, fmt] : names)
    if (name == known) return fmt;
  TORCH_CHECK(false, "DecodeStack: unknown weight format '", name, "' (expected f32, f16, bf16, q8_0, q4_0, q4_1)");
}

// One CpuLinear: y [rows, out] = x [rows, in] W^T + bias, W as the GEMV kernels (cpu_gemv.h) store it.
struct Projection {
  WeightFormat fmt;
  at::Tensor weight;
  std::optional<at::Tensor> bias;  // contiguous fp32 [out]
  int64_t in, out;

  Projection(const std::string& name, const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t in_features,
             const char* role)
      : fmt(format_named(name)), weight(w), in(in_features), out(w.size(0)) {
    if (b.has_value()) bias = b->contiguous();
    with_format(fmt, [&](auto format) {
      using Format = decltype(format);
      const int64_t expected_cols = row_bytes<Format>(in);
      TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous(), "DecodeStack: ", role,
                  " weight must be a contiguous 2-D CPU tensor, got ", w.sizes());
      if constexpr (Format::kBlocked) {
        TORCH_CHECK(w.scalar_type() == at::kByte && in % kBlock == 0 && w.size(1) == expected_cols,
                    "DecodeStack: ", role, " weight must be uint8 ", Format::kName, " blocks [out, ", expected_cols,
                    "] for ", in, " input features, got ", w.scalar_type(), " ", w.sizes());
      } else {
        TORCH_CHECK(w.scalar_type() == Format::kDtype && w.size(1) == in, "DecodeStack: ", role, " weight must be ",
                    Format::kDtype, " [out, ", in, "], got ", w.scalar_type(), " ", w.sizes());
      }
    });
    TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == out),
                "DecodeStack: ", role, " bias must be fp32 [", out, "]");
  }

  // How `rows` rows' GEMV is cut into chunks for a team of `workers`.
  void deal(ChunkRanges& ranges, int64_t rows, int workers) const {
    with_format(fmt, [&](auto format) {
      using Format = decltype(format);
      ranges.reset(GemvWork<Format>(rows, in, out).chunks, workers);
    });
  }

  // Row o of W as fp32 [in] (an embedding lookup).
  void row(int64_t o, float* w) const {
    with_format(fmt, [&](auto format) {
      using Format = decltype(format);
      const Problem<Format> p{nullptr, static_cast<const uint8_t*>(weight.data_ptr()), nullptr, nullptr, 0, in, out,
                              nullptr, nullptr, nullptr, nullptr};
      dequant_row_portable<Format>(p, o, w);
    });
  }

  // y = x W^T + bias for x [rows, in], y [rows, out] (contiguous): in a team, this worker's chunks of `ranges`.
  void apply(Crew& crew, const at::Tensor& x, at::Tensor& y, ChunkRanges& ranges) const {
    with_format(fmt, [&](auto format) {
      using Format = decltype(format);
      if (!crew.team()) return linear<Format>(x, weight, bias, y);
      const int64_t rows = x.size(0);
      const Problem<Format> p{x.data_ptr<float>(), static_cast<const uint8_t*>(weight.data_ptr()),
                              bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), rows, in, out,
                              nullptr, nullptr, nullptr, nullptr};
      const GemvWork<Format> work(rows, in, out);
      with_kernel_x<Format>(p, [&](const Problem<Format>& q) { gemv_worker<Format>(q, work, ranges, crew.id()); });
    });
    crew.sync();
  }
};

// ---------------------------------------------------------------------------------------------
// The layer's loops between the projections
// ---------------------------------------------------------------------------------------------
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

// What a step's attention reads: the new q|k|v rows, the rotary tables, one layer's K/V cache slot, the mask.
template <typename T>
struct AttentionStep {
  float* qkv;  // [rows, (heads + 2 kv_heads) d]
  const float *cos, *sin;  // [rows, d / 2]
  T *k, *v;  // [rows, kv_heads, max_len, d]
  int64_t max_len, start;
  const bool* mask;  // [rows, mask_stride] or null
  int64_t mask_stride, heads, kv_heads, d;
  float* out;  // [rows, heads d]
};

// KV head g of row b: rotate its query heads and its key at the row's position, and store the key and value at
// cache index `start` in the cache's type (the rounding torch's conversion to it does, so prefill's and decode's
// cached keys agree).
template <typename T>
void rotate_and_store(const AttentionStep<T>& s, int64_t b, int64_t g) {
  const int64_t d = s.d, group = s.heads / s.kv_heads;  // query heads g * group .. g * group + group - 1 read g
  float* row = s.qkv + b * (s.heads + 2 * s.kv_heads) * d;
  const float *cos = s.cos + b * (d / 2), *sin = s.sin + b * (d / 2);
  rotate(row + g * group * d, group, d, cos, sin);
  float* k_new = row + (s.heads + g) * d;
  rotate(k_new, 1, d, cos, sin);
  const float* v_new = row + (s.heads + s.kv_heads + g) * d;
  const int64_t at = ((b * s.kv_heads + g) * s.max_len + s.start) * d;
  for (int64_t i = 0; i < d; ++i) {
    s.k[at + i] = static_cast<T>(k_new[i]);
    s.v[at + i] = static_cast<T>(v_new[i]);
  }
}

// out = softmax(q k^T / sqrt(d)) v over keys 0 .. start under the mask for `count` query heads from `first` of row
// b, all reading KV head g's cache in one pass.
template <typename T>
void attend_heads_of(const AttentionStep<T>& s, int64_t b, int64_t g, int64_t first, int count,
                     std::vector<float>& scratch) {
  const int64_t keys = s.start + 1, d = s.d;
  const float* row = s.qkv + b * (s.heads + 2 * s.kv_heads) * d;
  scratch.resize(count * keys);
  const float* q[kMaxGroupedHeads];
  float* scores[kMaxGroupedHeads];
  float* out[kMaxGroupedHeads];
  for (int h = 0; h < count; ++h) {
    q[h] = row + (first + h) * d;
    scores[h] = scratch.data() + h * keys;
    out[h] = s.out + (b * s.heads + first + h) * d;
  }
  const int64_t cached = (b * s.kv_heads + g) * s.max_len * d;
  attend_heads(count, q, s.k + cached, s.v + cached, s.mask ? s.mask + b * s.mask_stride : nullptr, keys, d,
               1.f / std::sqrt(static_cast<float>(d)), scores, out);
}

// Fewer (row, KV head) pairs than this: their query heads are served two per pass, so that a small batch's
// attention splits evenly between threads (SmolLM2 at batch 1: 3 KV heads, 6 tasks instead of 3).
constexpr int64_t kFewKvTasks = 8;

// Rotate and store (one task per row and KV head), then attend: one task per row, KV head and pass over its cache
// of up to kMaxGroupedHeads of its query heads (2 for a small batch). How the heads are cut depends only on the
// shapes, so the results do not depend on the thread count.
template <typename T>
void attend(Crew& crew, const AttentionStep<T>& s, int64_t rows) {
  const int64_t kv_tasks = rows * s.kv_heads, group = s.heads / s.kv_heads;
  const bool worth_threads = rows * s.heads * (s.start + 1) * s.d >= kWorthThreadsWork;
  crew.share(kv_tasks, worth_threads, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) rotate_and_store(s, task / s.kv_heads, task % s.kv_heads);
  });
  const int64_t per_pass = kv_tasks < kFewKvTasks ? std::min<int64_t>(2, kMaxGroupedHeads) : kMaxGroupedHeads;
  const int64_t passes = (group + per_pass - 1) / per_pass;  // of each KV head
  crew.share(kv_tasks * passes, worth_threads, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kv_task = task / passes, b = kv_task / s.kv_heads, g = kv_task % s.kv_heads;
      const int64_t first = g * group + task % passes * per_pass;
      attend_heads_of(s, b, g, first, static_cast<int>(std::min(per_pass, (g + 1) * group - first)), scratch);
    }
  });
}

// act [rows, inter] = silu(gate) * up of gate_up [rows, 2 inter], in pieces of 8 columns from each row's start, so
// that every piece is computed as the whole row would be.
void silu_rows(Crew& crew, const float* gate_up, float* act, int64_t rows, int64_t inter) {
  const int64_t pieces_per_row = (inter + 7) / 8;
  crew.share(rows * pieces_per_row, rows * inter >= kWorthThreadsWork, [&](int64_t begin, int64_t end) {
    for (int64_t piece = begin; piece < end;) {
      const int64_t r = piece / pieces_per_row, first = piece % pieces_per_row;
      const int64_t last = std::min(end, (r + 1) * pieces_per_row) - r * pieces_per_row;  // this row's pieces
      const int64_t i = first * 8, n = std::min(inter, last * 8) - i;
      silu_mul(gate_up + r * 2 * inter + i, gate_up + r * 2 * inter + inter + i, act + r * inter + i, n);
      piece += last - first;
    }
  });
}

// A model's decoder layers for the decode step (see the file comment), each layer's weights gathered once
// (`add_layer`), then optionally the final norm and output head (`set_output`) and the embedding and rotary
// frequencies (`set_input`), so that a step is one call (`decode`) however many layers the model has. Up to kGemvMaxRows rows, one team of torch's threads (however many it has)
// runs the whole step.
class DecodeStack : public torch::CustomClassHolder {
 public:
  DecodeStack(double eps, int64_t heads, int64_t kv_heads, int64_t head_dim)
      : eps_(eps), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim) {
    TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0 && head_dim % 2 == 0,
                "DecodeStack: heads (", heads, ") must be a multiple of kv_heads (", kv_heads,
                ") and head_dim (", head_dim, ") even");
  }

  // The next layer: its norms' weights and projections (weight, format name, bias; None for an absent module);
  // `slot`: its attention's index in the caches' first dimension (its attention absent: -1).
  void add_layer(std::optional<at::Tensor> attn_norm, std::optional<at::Tensor> qkv_weight, std::string qkv_fmt,
                 std::optional<at::Tensor> qkv_bias, std::optional<at::Tensor> o_weight, std::string o_fmt,
                 std::optional<at::Tensor> o_bias, std::optional<at::Tensor> mlp_norm,
                 std::optional<at::Tensor> gate_up_weight, std::string gate_up_fmt,
                 std::optional<at::Tensor> gate_up_bias, std::optional<at::Tensor> down_weight, std::string down_fmt,
                 std::optional<at::Tensor> down_bias, int64_t slot) {
    TORCH_CHECK(qkv_weight.has_value() == (slot >= 0), "DecodeStack: a cache slot for each layer with attention");
    if (!qkv_weight.has_value() && !gate_up_weight.has_value()) return;  // a dropped block: nothing to run
    Layer layer{slot};
    if (qkv_weight.has_value()) {
      TORCH_CHECK(attn_norm.has_value() && o_weight.has_value(), "DecodeStack: attention needs its norm and o_proj");
      layer.attn_norm = fp32_vector(*attn_norm, "attention norm");
      hidden_ = checked_size(hidden_, layer.attn_norm.size(0), "hidden size");
      layer.qkv.emplace(qkv_fmt, *qkv_weight, qkv_bias, hidden_, "qkv");
      TORCH_CHECK(layer.qkv->out == (heads_ + 2 * kv_heads_) * head_dim_, "DecodeStack: qkv gives ", layer.qkv->out,
                  " features, expected ", (heads_ + 2 * kv_heads_) * head_dim_);
      layer.o.emplace(o_fmt, *o_weight, o_bias, heads_ * head_dim_, "o_proj");
      checked_size(hidden_, layer.o->out, "o_proj output");
    }
    if (gate_up_weight.has_value()) {
      TORCH_CHECK(mlp_norm.has_value() && down_weight.has_value(), "DecodeStack: an MLP needs its norm and down");
      layer.mlp_norm = fp32_vector(*mlp_norm, "MLP norm");
      hidden_ = checked_size(hidden_, layer.mlp_norm.size(0), "hidden size");
      layer.gate_up.emplace(gate_up_fmt, *gate_up_weight, gate_up_bias, hidden_, "gate_up");
      inter_ = checked_size(inter_, layer.gate_up->out / 2, "intermediate size");
      layer.down.emplace(down_fmt, *down_weight, down_bias, inter_, "down");
      checked_size(hidden_, layer.down->out, "down output");
    }
    layers_.push_back(std::move(layer));
  }

  // The model's final norm and output head, after the last layer: run() then returns the logits.
  void set_output(at::Tensor norm, at::Tensor head_weight, std::string head_fmt,
                  std::optional<at::Tensor> head_bias) {
    TORCH_CHECK(hidden_ > 0, "DecodeStack: set_output needs the layers first");
    at::Tensor norm_weight = fp32_vector(norm, "final norm");
    checked_size(hidden_, norm_weight.size(0), "final norm size");
    Projection head(head_fmt, head_weight, head_bias, hidden_, "lm_head");
    output_norm_ = norm_weight;  // only once both are checked
    head_.emplace(std::move(head));
  }

  // What `decode` starts from: the token embedding (a weight in one of the GEMV formats, [vocab, hidden]), the
  // rotary inverse frequencies [head_dim / 2] and the attention window (0: none; a key is visible iff
  // query index - window < key index).
  void set_input(at::Tensor embedding, std::string fmt, at::Tensor inv_freq, int64_t sliding_window) {
    TORCH_CHECK(hidden_ > 0, "DecodeStack: set_input needs the layers first");
    Projection table(fmt, embedding, std::nullopt, hidden_, "embedding");
    TORCH_CHECK(inv_freq.dim() == 1 && inv_freq.size(0) == head_dim_ / 2 && inv_freq.scalar_type() == at::kFloat,
                "DecodeStack: inv_freq must be fp32 [", head_dim_ / 2, "], got ", inv_freq.scalar_type(), " ",
                inv_freq.sizes());
    TORCH_CHECK(sliding_window >= 0, "DecodeStack: sliding_window must be >= 0, got ", sliding_window);
    inv_freq_ = inv_freq.contiguous();  // only once all three are checked
    window_ = sliding_window;
    embedding_.emplace(std::move(table));
  }

  // The decode step of `tokens` [B] at rotary `positions` [B]: embeds them, runs every layer with the caches
  // [kept attention layers, B, Hkv, S, D] (new keys and values written at cache index `start`, attention over
  // 0 .. start; `key_valid` [B, >= start + 1], False = padding, hides keys), and returns the logits [B, vocab]
  // (set_output) or else the last layer's pending output. The model's own modules compute the same
  // (Transformer.forward with one token per row).
  at::Tensor decode(const at::Tensor& tokens, const at::Tensor& positions, const at::Tensor& k_caches,
                    const at::Tensor& v_caches, int64_t start, const std::optional<at::Tensor>& key_valid) {
    TORCH_CHECK(embedding_, "DecodeStack: decode needs set_input first");
    TORCH_CHECK(tokens.dim() == 1 && positions.sizes() == tokens.sizes(), "DecodeStack: tokens and positions must "
                "be [B] of one size, got ", tokens.sizes(), " and ", positions.sizes());
    const int64_t rows = tokens.size(0);
    const at::Tensor ids = tokens.to(at::kLong).contiguous(), at_positions = positions.to(at::kLong).contiguous();
    const int64_t *id = ids.data_ptr<int64_t>(), *position = at_positions.data_ptr<int64_t>();
    at::Tensor x = at::empty({rows, hidden_}, inv_freq_.options());
    for (int64_t r = 0; r < rows; ++r) {
      TORCH_CHECK(id[r] >= 0 && id[r] < embedding_->out, "DecodeStack: token id ", id[r],
                  " outside the vocabulary (ids 0..", embedding_->out - 1, ")");
      embedding_->row(id[r], x.data_ptr<float>() + r * hidden_);
    }
    const int64_t half = head_dim_ / 2;
    at::Tensor cos = at::empty({rows, half}, x.options()), sin = at::empty({rows, half}, x.options());
    const float* inv_freq = inv_freq_.data_ptr<float>();
    float *cos_data = cos.data_ptr<float>(), *sin_data = sin.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < half; ++i) {  // the angle in fp32, as the modules' rotary tables compute it
        const float angle = static_cast<float>(position[r]) * inv_freq[i];
        cos_data[r * half + i] = std::cos(angle);
        sin_data[r * half + i] = std::sin(angle);
      }
    return step(x, std::nullopt, k_caches, v_caches, start, cos, sin, decode_mask(rows, start, key_valid));
  }

  // A decode step from the residual stream x [B, hidden] (updated in place) and a pending output of an earlier
  // layer (absent: none), with the rotary tables cos, sin [B, head_dim / 2] and the keys each row sees, mask
  // [B, >= start + 1] (absent: all of 0 .. start).
  at::Tensor step(at::Tensor& x, const std::optional<at::Tensor>& pending, const at::Tensor& k_caches,
                  const at::Tensor& v_caches, int64_t start, const at::Tensor& cos, const at::Tensor& sin,
                  const std::optional<at::Tensor>& mask) {
    TORCH_CHECK(!layers_.empty(), "DecodeStack: no attention or MLP in any layer");
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.size(1) == hidden_,
                "DecodeStack: x must be a contiguous fp32 [B, ", hidden_, "] residual stream, got ", x.scalar_type(),
                " ", x.sizes());
    const int64_t rows = x.size(0);
    Buffers buffers = allocate(x, pending);
    const bool attention = std::any_of(layers_.begin(), layers_.end(), [](const Layer& l) { return l.qkv; });
    const auto cache_type = k_caches.scalar_type();
    if (attention) check_attention_inputs(rows, k_caches, v_caches, start, cos, sin, mask);
    auto run_with = [&](auto* k_data, auto* v_data) {
      using T = std::remove_pointer_t<decltype(k_data)>;
      AttentionStep<T> s{buffers.qkv.data_ptr<float>(), nullptr, nullptr, k_data, v_data, 0, start,
                         mask ? mask->data_ptr<bool>() : nullptr, mask ? mask->size(1) : 0, heads_, kv_heads_,
                         head_dim_, buffers.attn.data_ptr<float>()};
      if (attention) {
        s.cos = cos.data_ptr<float>(), s.sin = sin.data_ptr<float>(), s.max_len = k_caches.size(3);
      }
      const int64_t slot_elements = attention ? k_caches.stride(0) : 0;
      if (rows > kGemvMaxRows) {
        Crew pool = Crew::on_torch_threads();
        return run_layers(pool, s, slot_elements, buffers, x.data_ptr<float>(), rows);
      }
      const int threads = at::get_num_threads();
#ifdef _OPENMP
      if (threads > 1) {
        std::optional<SpinBarrier> barrier;
#pragma omp parallel num_threads(threads)
        {
#pragma omp single
          {
            barrier.emplace(omp_get_num_threads());
            deal(rows, omp_get_num_threads());
          }
          Crew crew = Crew::member(omp_get_thread_num(), omp_get_num_threads(), &*barrier);
          run_layers(crew, s, slot_elements, buffers, x.data_ptr<float>(), rows);
        }
        return;
      }
#endif
      if (threads > 1) {  // no OpenMP: each phase on torch's pool
        Crew pool = Crew::on_torch_threads();
        return run_layers(pool, s, slot_elements, buffers, x.data_ptr<float>(), rows);
      }
      deal(rows, 1);
      Crew alone = Crew::member(0, 1, nullptr);
      run_layers(alone, s, slot_elements, buffers, x.data_ptr<float>(), rows);
    };
    if (!attention)
      run_with(static_cast<float*>(nullptr), static_cast<float*>(nullptr));
    else if (cache_type == at::kHalf)
      run_with(k_caches.data_ptr<at::Half>(), v_caches.data_ptr<at::Half>());
    else if (cache_type == at::kBFloat16)
      run_with(k_caches.data_ptr<at::BFloat16>(), v_caches.data_ptr<at::BFloat16>());
    else
      run_with(k_caches.data_ptr<float>(), v_caches.data_ptr<float>());
    return head_ ? buffers.logits : buffers.out;
  }

 private:
  struct Layer {
    int64_t slot;
    at::Tensor attn_norm, mlp_norm;
    std::optional<Projection> qkv, o, gate_up, down;
    std::array<ChunkRanges, 4> ranges;  // a team's chunks of each projection, in the order above

    void deal(int64_t rows, int workers) {
      const std::optional<Projection>* projections[] = {&qkv, &o, &gate_up, &down};
      for (int i = 0; i < 4; ++i)
        if (*projections[i]) (*projections[i])->deal(ranges[i], rows, workers);
    }
  };

  // The step's activations between the phases.
  struct Buffers {
    at::Tensor normed, qkv, attn, gate_up, act, out, logits;  // logits: with set_output only
    bool has_out;  // whether `out` starts with a sub-block's output still to be added to x
  };

  // Which of keys 0 .. start each row's query sees (null: all): padding hidden, the window applied, the row's own
  // key always visible (a query on padding then still has one key, so softmax stays finite).
  std::optional<at::Tensor> decode_mask(int64_t rows, int64_t start, const std::optional<at::Tensor>& key_valid) const {
    const bool window_bites = window_ > 0 && start + 1 > window_;
    if (!key_valid && !window_bites) return std::nullopt;
    at::Tensor valid;
    if (key_valid) {
      valid = key_valid->to(at::kBool).contiguous();
      TORCH_CHECK(valid.dim() == 2 && valid.size(0) == rows && valid.size(1) >= start + 1, "DecodeStack: key_valid "
                  "must be [", rows, ", >= ", start + 1, "], got ", key_valid->sizes());
    }
    at::Tensor mask = at::empty({rows, start + 1}, inv_freq_.options().dtype(at::kBool));
    bool* visible = mask.data_ptr<bool>();
    const bool* padding_kept = key_valid ? valid.data_ptr<bool>() : nullptr;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j <= start; ++j)
        visible[r * (start + 1) + j] = j == start || ((!padding_kept || padding_kept[r * valid.size(1) + j]) &&
                                                      (!window_bites || j > start - window_));
    return mask;
  }

  // Every projection's chunks between a team's `workers`.
  void deal(int64_t rows, int workers) {
    for (Layer& layer : layers_) layer.deal(rows, workers);
    if (head_) head_->deal(head_ranges_, rows, workers);
  }

  static at::Tensor fp32_vector(const at::Tensor& t, const char* role) {
    TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kFloat && t.device().is_cpu(), "DecodeStack: ", role,
                " weight must be fp32 [hidden] on the CPU, got ", t.scalar_type(), " ", t.sizes());
    return t.contiguous();
  }

  // The size every layer must share: `known` (0: none yet) or `size`.
  static int64_t checked_size(int64_t known, int64_t size, const char* what) {
    TORCH_CHECK(known == 0 || known == size, "DecodeStack: ", what, " ", size, " differs from an earlier layer's ",
                known);
    return size;
  }

  Buffers allocate(const at::Tensor& x, const std::optional<at::Tensor>& pending) const {
    const int64_t rows = x.size(0);
    auto empty = [&](int64_t width) { return at::empty({rows, width}, x.options()); };
    Buffers b{empty(hidden_), empty((heads_ + 2 * kv_heads_) * head_dim_), empty(heads_ * head_dim_),
              empty(2 * inter_), empty(inter_), empty(hidden_), head_ ? empty(head_->out) : at::Tensor(),
              pending.has_value()};
    if (pending.has_value()) {
      TORCH_CHECK(pending->sizes() == x.sizes() && pending->scalar_type() == at::kFloat,
                  "DecodeStack: pending must be fp32 ", x.sizes(), ", got ", pending->scalar_type(), " ",
                  pending->sizes());
      b.out.copy_(*pending);
    }
    return b;
  }

  void check_attention_inputs(int64_t rows, const at::Tensor& k, const at::Tensor& v, int64_t start,
                              const at::Tensor& cos, const at::Tensor& sin,
                              const std::optional<at::Tensor>& mask) const {
    const auto type = k.scalar_type();
    TORCH_CHECK(k.dim() == 5 && k.size(1) == rows && k.size(2) == kv_heads_ && k.size(4) == head_dim_ &&
                    v.sizes() == k.sizes() && v.strides() == k.strides() && k.select(0, 0).is_contiguous() &&
                    v.scalar_type() == type && (type == at::kFloat || type == at::kHalf || type == at::kBFloat16),
                "DecodeStack: caches must be fp32, fp16 or bf16 [layers, ", rows, ", ", kv_heads_, ", S, ",
                head_dim_, "] of one dtype and layout, each layer's slot contiguous, got ", type, " ", k.sizes());
    for (const Layer& layer : layers_)
      TORCH_CHECK(layer.slot < k.size(0), "DecodeStack: cache slot ", layer.slot, " outside the ", k.size(0),
                  " cached layers");
    TORCH_CHECK(start >= 0 && start < k.size(3), "DecodeStack: start ", start, " outside the cache of ", k.size(3));
    for (const at::Tensor* table : {&cos, &sin})
      TORCH_CHECK(table->defined() && table->is_contiguous() && table->scalar_type() == at::kFloat &&
                      table->sizes() == at::IntArrayRef({rows, head_dim_ / 2}),
                  "DecodeStack: cos and sin must be contiguous fp32 [", rows, ", ", head_dim_ / 2, "]");
    TORCH_CHECK(!mask || (mask->dim() == 2 && mask->is_contiguous() && mask->scalar_type() == at::kBool &&
                          mask->size(0) == rows && mask->size(1) >= start + 1),
                "DecodeStack: mask must be a contiguous bool [", rows, ", >= ", start + 1, "]");
  }

  // The step's phases for every layer, on this crew's thread (see Crew).
  template <typename T>
  void run_layers(Crew& crew, AttentionStep<T> s, int64_t slot_elements, Buffers& b, float* x, int64_t rows) {
    bool has_out = b.has_out;  // this thread's copy
    auto add_and_norm = [&](const at::Tensor& norm) {
      crew.alone([&] {
        if (has_out) add_in_place(x, b.out.data_ptr<float>(), rows * hidden_);
        rms_norm_rows(x, norm.data_ptr<float>(), b.normed.data_ptr<float>(), rows, hidden_, eps_);
      });
      has_out = true;  // the sub-block about to run writes `out`
    };
    T* const k_base = s.k;
    T* const v_base = s.v;
    for (Layer& layer : layers_) {
      if (layer.qkv) {
        add_and_norm(layer.attn_norm);
        layer.qkv->apply(crew, b.normed, b.qkv, layer.ranges[0]);
        s.k = k_base + layer.slot * slot_elements, s.v = v_base + layer.slot * slot_elements;
        attend(crew, s, rows);
        layer.o->apply(crew, b.attn, b.out, layer.ranges[1]);
      }
      if (layer.gate_up) {
        add_and_norm(layer.mlp_norm);
        layer.gate_up->apply(crew, b.normed, b.gate_up, layer.ranges[2]);
        silu_rows(crew, b.gate_up.data_ptr<float>(), b.act.data_ptr<float>(), rows, inter_);
        layer.down->apply(crew, b.act, b.out, layer.ranges[3]);
      }
    }
    if (head_) {
      add_and_norm(output_norm_);
      head_->apply(crew, b.normed, b.logits, head_ranges_);
    }
  }

  double eps_;
  int64_t heads_, kv_heads_, head_dim_, hidden_ = 0, inter_ = 0;
  std::vector<Layer> layers_;
  at::Tensor output_norm_;
  std::optional<Projection> head_;
  ChunkRanges head_ranges_;
  std::optional<Projection> embedding_;  // set_input's
  at::Tensor inv_freq_;
  int64_t window_ = 0;
};

// One layer's decode step (see the file comment); absent modules are passed as undefined weights (None from
// Python). The op for a single layer, where DecodeStack runs them all.
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
  DecodeStack stack(eps, heads, kv_heads, head_dim);
  const bool attention = qkv_weight.has_value();
  stack.add_layer(attn_norm, qkv_weight, qkv_fmt, qkv_bias, o_weight, o_fmt, o_bias, mlp_norm, gate_up_weight,
                  gate_up_fmt, gate_up_bias, down_weight, down_fmt, down_bias, attention ? 0 : -1);
  TORCH_CHECK(!attention || (k_cache && v_cache && cos && sin), "decode_layer: attention needs caches, cos and sin");
  const at::Tensor none;
  return stack.step(x, pending, attention ? k_cache->unsqueeze(0) : none, attention ? v_cache->unsqueeze(0) : none,
                    start, attention ? cos->contiguous() : none, attention ? sin->contiguous() : none, mask);
}

}  // namespace

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
      .def("set_output", &DecodeStack::set_output)
      .def("set_input", &DecodeStack::set_input)
      .def("decode", &DecodeStack::decode);
}

TORCH_LIBRARY_IMPL(llmdrop_cpu_decode, CPU, m) { m.impl("decode_layer", &decode_layer); }

// Importing the shared object as a Python module registers the ops above.
PyMODINIT_FUNC PyInit__cpu_decode(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_decode", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
