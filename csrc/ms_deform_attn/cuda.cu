// Multi-scale deformable attention (MSDeformAttn) on CUDA: forward and backward kernels.
//
// Same semantics and layouts as cpu.cpp (see there): bilinear sampling with zero padding and
// align_corners=False, value [N, S, M, D], sampling_loc [N, Lq, M, L, P, 2], attn_weight
// [N, Lq, M, L, P], output [N, Lq, M * D]. dtypes: float32, float64, float16 and bfloat16; all the
// arithmetic is done in at::acc_type (float for the 16-bit types), and only loads/stores use scalar_t.
//
// Work split (the structure of Deformable-DETR's kernel, rewritten):
//   forward  - one thread per output element (n, q, m, d): neighbouring threads read neighbouring
//              channels of the same pixel, so the loads of a warp are coalesced.
//   backward - one warp per (n, q, m): lanes stride over the D channels, the four per-corner dot
//              products <grad_out, pixel> are reduced with warp shuffles, and lane 0 writes the
//              sample's grad_loc / grad_attn. grad_value gets atomicAdd into an acc_type buffer
//              (cast to value's dtype at the end), since many queries sample the same pixel.
//
// Only c10/cuda headers, not ATen/cuda/CUDAContext.h: that one pulls in cuBLAS/cuSPARSE headers,
// which a minimal CUDA toolkit (nvcc + cudart) lacks and these kernels do not need.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

namespace msda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

struct Dims {
  int64_t N, S, M, D, L, P, Lq;
};

Dims dims_of(const at::Tensor& value, const at::Tensor& sampling_loc) {
  return Dims{value.size(0), value.size(1), value.size(2), value.size(3),
              sampling_loc.size(3), sampling_loc.size(4), sampling_loc.size(1)};
}

// Corner offsets (rows inside the level, -1 = padding) and bilinear weights of one sample; false
// when no corner is inside the map (see corners_of in cpu.cpp).
template <typename acc_t>
struct Corners {
  int64_t off[4];  // top-left, top-right, bottom-left, bottom-right
  acc_t w[4];
  acc_t lh, lw, hh, hw;
};

template <typename acc_t>
__device__ __forceinline__ bool corners_of(acc_t x, acc_t y, int64_t H, int64_t W,
                                           Corners<acc_t>& c) {
  const acc_t h = y * static_cast<acc_t>(H) - acc_t(0.5);
  const acc_t w = x * static_cast<acc_t>(W) - acc_t(0.5);
  if (!(h > acc_t(-1) && w > acc_t(-1) && h < static_cast<acc_t>(H) && w < static_cast<acc_t>(W)))
    return false;
  const int64_t h0 = static_cast<int64_t>(floor(h));
  const int64_t w0 = static_cast<int64_t>(floor(w));
  c.lh = h - static_cast<acc_t>(h0);
  c.lw = w - static_cast<acc_t>(w0);
  c.hh = acc_t(1) - c.lh;
  c.hw = acc_t(1) - c.lw;
  const bool top = h0 >= 0, bottom = h0 + 1 < H, left = w0 >= 0, right = w0 + 1 < W;
  c.off[0] = (top && left) ? h0 * W + w0 : -1;
  c.off[1] = (top && right) ? h0 * W + w0 + 1 : -1;
  c.off[2] = (bottom && left) ? (h0 + 1) * W + w0 : -1;
  c.off[3] = (bottom && right) ? (h0 + 1) * W + w0 + 1 : -1;
  c.w[0] = c.hh * c.hw;
  c.w[1] = c.hh * c.lw;
  c.w[2] = c.lh * c.hw;
  c.w[3] = c.lh * c.lw;
  return true;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int delta = kWarp / 2; delta > 0; delta /= 2) v += __shfl_xor_sync(0xffffffffu, v, delta);
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts,
                               const scalar_t* __restrict__ loc, const scalar_t* __restrict__ attn,
                               scalar_t* __restrict__ out, Dims k) {
  const int64_t total = k.N * k.Lq * k.M * k.D;
  const int64_t row = k.M * k.D;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i % k.D, nqm = i / k.D;
    const int64_t m = nqm % k.M, n = nqm / (k.M * k.Lq);
    acc_t acc = acc_t(0);
    Corners<acc_t> c;
    for (int64_t l = 0; l < k.L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
      const scalar_t* v = value + ((n * k.S + starts[l]) * k.M + m) * k.D + d;
      for (int64_t p = 0; p < k.P; ++p) {
        const int64_t s = (nqm * k.L + l) * k.P + p;
        const acc_t x = static_cast<acc_t>(loc[2 * s]), y = static_cast<acc_t>(loc[2 * s + 1]);
        if (!corners_of(x, y, H, W, c)) continue;
        acc_t sample = acc_t(0);
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (c.off[j] >= 0) sample += c.w[j] * static_cast<acc_t>(v[c.off[j] * row]);
        acc += static_cast<acc_t>(attn[s]) * sample;
      }
    }
    out[i] = static_cast<scalar_t>(acc);
  }
}

// grad_value_acc, grad_loc and grad_attn arrive zeroed (samples outside the map are skipped).
template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts,
                                const scalar_t* __restrict__ loc, const scalar_t* __restrict__ attn,
                                const scalar_t* __restrict__ grad_out, acc_t* grad_value_acc,
                                scalar_t* __restrict__ grad_loc, scalar_t* __restrict__ grad_attn,
                                Dims k) {
  const int64_t n_warps = k.N * k.Lq * k.M;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_grid = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  const int64_t row = k.M * k.D;
  // The warp index is uniform across a warp, so whole warps leave the loop together and every
  // shuffle below runs with all 32 lanes present.
  for (int64_t nqm = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
       nqm < n_warps; nqm += warps_per_grid) {
    const int64_t m = nqm % k.M, n = nqm / (k.M * k.Lq);
    const scalar_t* go = grad_out + nqm * k.D;
    Corners<acc_t> c;
    for (int64_t l = 0; l < k.L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
      const int64_t base = ((n * k.S + starts[l]) * k.M + m) * k.D;
      for (int64_t p = 0; p < k.P; ++p) {
        const int64_t s = (nqm * k.L + l) * k.P + p;
        const acc_t x = static_cast<acc_t>(loc[2 * s]), y = static_cast<acc_t>(loc[2 * s + 1]);
        if (!corners_of(x, y, H, W, c)) continue;  // same outcome for every lane of the warp
        const acc_t a = static_cast<acc_t>(attn[s]);
        acc_t g[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
        for (int64_t d = lane; d < k.D; d += kWarp) {
          const acc_t god = static_cast<acc_t>(go[d]);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (c.off[j] < 0) continue;
            const int64_t idx = base + c.off[j] * row + d;
            g[j] += god * static_cast<acc_t>(value[idx]);
            atomicAdd(grad_value_acc + idx, a * c.w[j] * god);
          }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) g[j] = warp_sum(g[j]);
        if (lane == 0) {
          grad_attn[s] = static_cast<scalar_t>(c.w[0] * g[0] + c.w[1] * g[1] + c.w[2] * g[2] +
                                                c.w[3] * g[3]);
          grad_loc[2 * s] = static_cast<scalar_t>(
              a * static_cast<acc_t>(W) * (c.hh * (g[1] - g[0]) + c.lh * (g[3] - g[2])));
          grad_loc[2 * s + 1] = static_cast<scalar_t>(
              a * static_cast<acc_t>(H) * (c.hw * (g[2] - g[0]) + c.lw * (g[3] - g[1])));
        }
      }
    }
  }
}

// Enough blocks to fill the GPU several times over; the kernels stride over the rest.
int blocks_for(int64_t threads_needed) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                        c10::cuda::current_device()));
  const int64_t wanted = (threads_needed + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t{sms} * 32)));
}

}  // namespace

at::Tensor cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                        const at::Tensor& attn_weight) {
  const c10::cuda::CUDAGuard guard(value.device());
  const Dims k = dims_of(value, sampling_loc);
  auto out = at::empty({k.N, k.Lq, k.M * k.D}, value.options());
  if (out.numel() == 0) return out;
  const int blocks = blocks_for(out.numel());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "msda_cuda_forward",
                                  [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    forward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
        level_start_index.data_ptr<int64_t>(), sampling_loc.data_ptr<scalar_t>(),
        attn_weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> cuda_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_loc, const at::Tensor& attn_weight,
                                      const at::Tensor& grad_output) {
  const c10::cuda::CUDAGuard guard(value.device());
  const Dims k = dims_of(value, sampling_loc);
  const auto acc_dtype = at::toAccumulateType(value.scalar_type(), at::kCUDA);
  auto grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  auto grad_loc = at::zeros_like(sampling_loc);
  auto grad_attn = at::zeros_like(attn_weight);
  const int64_t n_warps = k.N * k.Lq * k.M;
  if (n_warps > 0 && value.numel() > 0) {
    const int blocks = blocks_for(n_warps * kWarp);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                    "msda_cuda_backward", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      backward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
          level_start_index.data_ptr<int64_t>(), sampling_loc.data_ptr<scalar_t>(),
          attn_weight.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
          grad_value_acc.data_ptr<acc_t>(), grad_loc.data_ptr<scalar_t>(),
          grad_attn.data_ptr<scalar_t>(), k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_value_acc.to(value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace msda
