// The CPU linear layers' ops over the kernels of cpu_gemv.h: gemv_<fmt> (y = x W^T + bias) for each weight format,
// rows_<fmt> (rows of a weight as fp32: a CpuEmbedding's table) and read_sum (the read rate the GEMVs can reach).
// Bindings are TORCH_LIBRARY ops (torch.ops.llmdrop_cpu_gemv.*), registered when the shared object is imported as
// the Python module llmdrop_rt._cpu_gemv.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu_gemv.h"

namespace {

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
  const int64_t rows = x_any.size(0), out = weight.size(0);
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kFloat && y.is_contiguous() &&
                  y.sizes() == at::IntArrayRef({rows, out}),
              "gemv_", Format::kName, ": out must be a contiguous float32 [", rows, ", ", out, "] CPU tensor, got ",
              y.scalar_type(), " ", y.sizes());
  if (rows == 0 || out == 0) return y;
  const c10::optional<at::Tensor> bias = bias_any ? c10::optional<at::Tensor>(bias_any->contiguous()) : c10::nullopt;
  linear<Format>(x_any.contiguous(), weight, bias, y);
  return y;
}

template <class Format>
at::Tensor gemv_op(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  at::Tensor y = at::empty({x.dim() == 2 ? x.size(0) : 0, weight.dim() == 2 ? weight.size(0) : 0},
                           x.options().dtype(at::kFloat));
  return gemv_out<Format>(x, weight, bias, y);
}

// Rows `index` of a weight held in the kernels' layout, as fp32 [len(index), in]: an embedding lookup that reads
// only the looked-up rows' blocks, wherever the interleaved layout put them.
template <class Format>
at::Tensor rows_op(const at::Tensor& weight, const at::Tensor& index) {
  const std::string op = std::string("rows_") + Format::kName;
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.is_contiguous(), op,
              ": weight must be a contiguous 2-D CPU tensor, got ", weight.sizes());
  at::ScalarType stored = at::kByte;
  int64_t in = weight.size(1);
  if constexpr (Format::kBlocked) {
    TORCH_CHECK(weight.size(1) % Format::kBytes == 0, op, ": weight has ", weight.size(1),
                " bytes per row, not a whole number of ", Format::kBytes, "-byte blocks");
    in = weight.size(1) / Format::kBytes * kBlock;
  } else {
    stored = Format::kDtype;
  }
  TORCH_CHECK(weight.scalar_type() == stored, op, ": weight must be ", stored, ", got ", weight.scalar_type());
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, op, ": index must be int64 [n], got ",
              index.scalar_type(), " ", index.sizes());
  const int64_t out = weight.size(0);
  const at::Tensor rows = index.contiguous();
  const int64_t* wanted = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.size(0); ++i)
    TORCH_CHECK(wanted[i] >= 0 && wanted[i] < out, op, ": index ", wanted[i], " outside the weight's ", out, " rows");
  at::Tensor result = at::empty({rows.size(0), in}, weight.options().dtype(at::kFloat));
  const Problem<Format> p{nullptr, static_cast<const uint8_t*>(weight.data_ptr()), nullptr, nullptr, 0, in, out,
                          nullptr, nullptr, nullptr, nullptr};
  float* data = result.data_ptr<float>();
  for (int64_t i = 0; i < rows.size(0); ++i) dequant_row_portable<Format>(p, wanted[i], data + i * in);
  return result;
}

// The sum of a float32 tensor, read the way the GEMVs read a weight: each thread a contiguous range, as
// kMaxStreams stretches read in turn, 32 floats of each at a time. Timing it measures the read rate our kernels can
// reach (llmdrop_rt.bench's floor); the float sum keeps the reads from being optimised away.
#ifdef LLMDROP_HAVE_X86_SIMD
LLMDROP_AVX2 double stretches_sum_avx2(const float* data, int64_t stretch, int64_t streams) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= stretch; i += 32)
    for (int64_t s = 0; s < streams; ++s)
      for (int c = 0; c < 4; ++c) acc[c] = _mm256_add_ps(acc[c], _mm256_loadu_ps(data + s * stretch + i + 8 * c));
  double total = hsum_avx2(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (int64_t s = 0; s < streams; ++s)
    for (int64_t j = i; j < stretch; ++j) total += data[s * stretch + j];
  return total;
}
#endif

double stretches_sum(const float* data, int64_t n) {
  const int64_t stretch = n / kMaxStreams;
  double total = 0.;
#ifdef LLMDROP_HAVE_X86_SIMD
  if (simd_bits() >= 256) {
    total = stretches_sum_avx2(data, stretch, kMaxStreams);
  } else
#endif
  {
    for (int64_t i = 0; i < stretch * kMaxStreams; ++i) total += data[i];
  }
  for (int64_t i = stretch * kMaxStreams; i < n; ++i) total += data[i];
  return total;
}

double read_sum(const at::Tensor& data) {
  TORCH_CHECK(data.device().is_cpu() && data.scalar_type() == at::kFloat && data.is_contiguous(),
              "read_sum: data must be a contiguous float32 CPU tensor, got ", data.scalar_type(), " ", data.sizes());
  const float* values = data.data_ptr<float>();
  const int64_t n = data.numel(), workers = std::max<int64_t>(1, at::get_num_threads());
  std::vector<double> partial(workers, 0.);
  at::parallel_for(0, workers, 1, [&](int64_t first, int64_t last) {
    for (int64_t w = first; w < last; ++w)
      partial[w] = stretches_sum(values + n * w / workers, n * (w + 1) / workers - n * w / workers);
  });
  double total = 0.;
  for (double part : partial) total += part;
  return total;
}

template <class Format>
void define_ops(torch::Library& m) {
  const std::string name = std::string("gemv_") + Format::kName;
  m.def((name + "(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor").c_str(), &gemv_op<Format>);
  m.def((name + ".out(Tensor x, Tensor weight, Tensor? bias, *, Tensor(a!) out) -> Tensor(a!)").c_str(),
        &gemv_out<Format>);
  m.def((std::string("rows_") + Format::kName + "(Tensor weight, Tensor index) -> Tensor").c_str(), &rows_op<Format>);
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
  m.def("read_sum(Tensor data) -> float", &read_sum);
}

// An empty Python module: importing it loads this library, which registers the ops above.
extern "C" PyMODINIT_FUNC PyInit__cpu_gemv(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_gemv",
                               "llmdrop-rt decode-shaped CPU linear kernels (torch.ops.llmdrop_cpu_gemv)", -1, nullptr};
  return PyModule_Create(&module);
}
