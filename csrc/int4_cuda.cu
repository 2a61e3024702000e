// CUDA int4 linear, same packed layout as csrc/int4_cpu.cpp (built by llmdrop_rt.quant.QuantLinear):
// qweight int32 [out, in/8], word k of row o holds q[o, 8k + j] in bits 4j..4j+3; scales / zeros
// [out, groups], group of input column i = i / group_size.
//
// Decode (rows <= 8): a GEMV with one warp per output row. Lanes stride over the row's packed words,
// dequantise the 8 nibbles in registers, accumulate in fp32 for up to 4 activation rows at a time,
// and reduce with warp shuffles. Prefill (more rows): a kernel dequantises the weight to the
// activation dtype once, then cuBLAS (via at::matmul) runs the GEMM on tensor cores.
// Bindings are TORCH_LIBRARY ops (torch.ops.llmdrop_int4_cuda.*), registered when the Python module
// llmdrop_rt._int4_cuda is imported.
#include <Python.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <torch/library.h>

#include <cstdint>

namespace {

constexpr int kGemvMaxRows = 8;     // more activation rows than this: dequantise + cuBLAS
constexpr int kRowBlock = 4;        // activation rows per GEMV block (blockIdx.y walks the rest)
constexpr int kWarpsPerBlock = 8;   // output rows per GEMV block

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// T: activation / output type; S: scale and zero type.
template <typename T, typename S>
__global__ void int4_gemv_kernel(const T* __restrict__ x, const int32_t* __restrict__ qweight,
                                 const S* __restrict__ scales, const S* __restrict__ zeros, T* __restrict__ y,
                                 int rows, int in, int out, int groups, int group_size) {
  const int lane = threadIdx.x % 32;
  const int o = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  const int m0 = blockIdx.y * kRowBlock;
  if (o >= out) return;
  const int words = in / 8;
  const int32_t* qrow = qweight + static_cast<int64_t>(o) * words;

  float acc[kRowBlock] = {0.f, 0.f, 0.f, 0.f};
  for (int k = lane; k < words; k += 32) {
    const uint32_t word = static_cast<uint32_t>(__ldg(qrow + k));
    const int g = (8 * k) / group_size;
    const float s = to_f(scales[static_cast<int64_t>(o) * groups + g]);
    const float zs = to_f(zeros[static_cast<int64_t>(o) * groups + g]) * s;
    float w[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) w[j] = static_cast<float>((word >> (4 * j)) & 0xF) * s - zs;
#pragma unroll
    for (int r = 0; r < kRowBlock; ++r) {
      if (m0 + r < rows) {
        const T* xr = x + static_cast<int64_t>(m0 + r) * in + 8 * k;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[r] += w[j] * to_f(xr[j]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowBlock; ++r) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], offset);
    if (lane == 0 && m0 + r < rows) y[static_cast<int64_t>(m0 + r) * out + o] = from_f<T>(acc[r]);
  }
}

// w[o, 8k + j] = (q - zero) * scale in T, one thread per packed word.
template <typename T, typename S>
__global__ void int4_dequantize_kernel(const int32_t* __restrict__ qweight, const S* __restrict__ scales,
                                       const S* __restrict__ zeros, T* __restrict__ w, int in, int out, int groups,
                                       int group_size) {
  const int words = in / 8;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= static_cast<int64_t>(out) * words) return;
  const int o = static_cast<int>(index / words);
  const int k = static_cast<int>(index % words);
  const uint32_t word = static_cast<uint32_t>(qweight[index]);
  const int g = (8 * k) / group_size;
  const float s = to_f(scales[static_cast<int64_t>(o) * groups + g]);
  const float z = to_f(zeros[static_cast<int64_t>(o) * groups + g]);
  T* wrow = w + static_cast<int64_t>(o) * in + 8 * k;
#pragma unroll
  for (int j = 0; j < 8; ++j) wrow[j] = from_f<T>((static_cast<float>((word >> (4 * j)) & 0xF) - z) * s);
}

// fp32, fp16 and bf16 only (no fp64 kernels).
#define INT4_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                     \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

void check_inputs(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                  const at::Tensor& zeros, int64_t group_size) {
  TORCH_CHECK(x.is_cuda() && qweight.is_cuda() && scales.is_cuda() && zeros.is_cuda(),
              "int4_linear (cuda): all tensors must be CUDA tensors");
  TORCH_CHECK(x.get_device() == qweight.get_device() && x.get_device() == scales.get_device() &&
                  x.get_device() == zeros.get_device(), "int4_linear (cuda): all tensors must be on one device");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "int4_linear: x must be contiguous 2-D [rows, in], got ", x.sizes());
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt && qweight.is_contiguous(),
              "int4_linear: qweight must be contiguous int32 [out, in/8], got ", qweight.scalar_type(), " ",
              qweight.sizes());
  const int64_t in = x.size(1), out = qweight.size(0);
  TORCH_CHECK(qweight.size(1) * 8 == in, "int4_linear: qweight has ", qweight.size(1), " words per row, x has ",
              in, " features");
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0, "int4_linear: group_size must be a positive multiple of 8, got ",
              group_size);
  const int64_t groups = (in + group_size - 1) / group_size;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == out && scales.size(1) == groups && scales.is_contiguous(),
              "int4_linear: scales must be contiguous [", out, ", ", groups, "], got ", scales.sizes());
  TORCH_CHECK(zeros.sizes() == scales.sizes() && zeros.scalar_type() == scales.scalar_type() && zeros.is_contiguous(),
              "int4_linear: zeros must match scales' shape and dtype");
  TORCH_CHECK(in < (int64_t{1} << 31) && out < (int64_t{1} << 31), "int4_linear: dimensions too large");
}

template <typename T, typename S>
void launch_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                       at::Tensor& w, int group_size, cudaStream_t stream) {
  const int in = static_cast<int>(w.size(1)), out = static_cast<int>(w.size(0));
  const int groups = static_cast<int>(scales.size(1));
  const int64_t total = static_cast<int64_t>(out) * (in / 8);
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  int4_dequantize_kernel<typename CudaType<T>::type, typename CudaType<S>::type><<<blocks, threads, 0, stream>>>(
      qweight.data_ptr<int32_t>(), reinterpret_cast<const typename CudaType<S>::type*>(scales.data_ptr<S>()),
      reinterpret_cast<const typename CudaType<S>::type*>(zeros.data_ptr<S>()),
      reinterpret_cast<typename CudaType<T>::type*>(w.data_ptr<T>()), in, out, groups, group_size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// y = x @ W.T for the packed int4 W; x is fp16, bf16 or fp32 [rows, in], y has x's dtype.
at::Tensor int4_linear(at::Tensor x, at::Tensor qweight, at::Tensor scales, at::Tensor zeros,
                          int64_t group_size) {
  check_inputs(x, qweight, scales, zeros, group_size);
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int rows = static_cast<int>(x.size(0)), in = static_cast<int>(x.size(1));
  const int out = static_cast<int>(qweight.size(0)), groups = static_cast<int>(scales.size(1));
  at::Tensor y = at::empty({rows, out}, x.options());
  if (rows == 0) return y;

  INT4_DISPATCH_FLOAT_TYPES(x.scalar_type(), "int4_linear_cuda_x", [&] {
    using XT = scalar_t;
    INT4_DISPATCH_FLOAT_TYPES(scales.scalar_type(), "int4_linear_cuda_s", [&] {
      using ST = scalar_t;
      if (rows <= kGemvMaxRows) {
        const dim3 grid((out + kWarpsPerBlock - 1) / kWarpsPerBlock, (rows + kRowBlock - 1) / kRowBlock);
        int4_gemv_kernel<typename CudaType<XT>::type, typename CudaType<ST>::type>
            <<<grid, kWarpsPerBlock * 32, 0, stream>>>(
                reinterpret_cast<const typename CudaType<XT>::type*>(x.data_ptr<XT>()), qweight.data_ptr<int32_t>(),
                reinterpret_cast<const typename CudaType<ST>::type*>(scales.data_ptr<ST>()),
                reinterpret_cast<const typename CudaType<ST>::type*>(zeros.data_ptr<ST>()),
                reinterpret_cast<typename CudaType<XT>::type*>(y.data_ptr<XT>()), rows, in, out, groups,
                static_cast<int>(group_size));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        at::Tensor w = at::empty({out, in}, x.options());
        launch_dequantize<XT, ST>(qweight, scales, zeros, w, static_cast<int>(group_size), stream);
        y = at::matmul(x, w.t());
      }
    });
  });
  return y;
}

// The weight [out, in] of the packed layout in `dtype` (tests and debugging).
at::Tensor int4_dequantize(at::Tensor qweight, at::Tensor scales, at::Tensor zeros, int64_t group_size,
                              c10::ScalarType dtype) {
  const int64_t in = qweight.size(1) * 8;
  check_inputs(at::empty({0, in}, scales.options().dtype(dtype)), qweight, scales, zeros, group_size);
  const c10::cuda::CUDAGuard guard(qweight.device());
  at::Tensor w = at::empty({qweight.size(0), in}, scales.options().dtype(dtype));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  INT4_DISPATCH_FLOAT_TYPES(dtype, "int4_dequantize_cuda_w", [&] {
    using WT = scalar_t;
    INT4_DISPATCH_FLOAT_TYPES(scales.scalar_type(), "int4_dequantize_cuda_s", [&] {
      launch_dequantize<WT, scalar_t>(qweight, scales, zeros, w, static_cast<int>(group_size), stream);
    });
  });
  return w;
}

TORCH_LIBRARY(llmdrop_int4_cuda, m) {
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor", &int4_linear);
  m.def("int4_dequantize(Tensor qweight, Tensor scales, Tensor zeros, int group_size, ScalarType dtype) -> Tensor",
        &int4_dequantize);
}

// An empty Python module: importing it loads this library, which registers the ops above.
extern "C" PyMODINIT_FUNC PyInit__int4_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_int4_cuda", "llmdrop-rt int4 CUDA kernels (torch.ops.llmdrop_int4_cuda)", -1, nullptr};
  return PyModule_Create(&module);
}
