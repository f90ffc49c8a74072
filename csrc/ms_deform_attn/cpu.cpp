// Multi-scale deformable attention (MSDeformAttn) on the CPU: forward and backward.
//
// Semantics are those of the PyTorch reference `ms_deform_attn_reference` (model/ms_deform_attn.py):
// for every (batch n, query q, head m) the output row of D channels is
//     out[n, q, m, :] = sum_{l, p} attn[n, q, m, l, p] * bilinear(value level l of head m, loc[n, q, m, l, p])
// with F.grid_sample's conventions: bilinear, zero padding, align_corners=False, i.e. the pixel
// coordinate of a normalised location (x, y) in a level of H x W pixels is (x * W - 0.5, y * H - 0.5)
// and every corner that falls outside the map contributes 0.
//
// Layouts (all contiguous; checked by bindings.cpp):
//   value              [N, S, M, D]       S = sum_l H_l * W_l, levels stacked along S
//   spatial_shapes     [L, 2] int64       (H_l, W_l)
//   level_start_index  [L] int64          first row of level l in S
//   sampling_loc       [N, Lq, M, L, P, 2] (x, y), normalised to 0..1
//   attn_weight        [N, Lq, M, L, P]
//   output             [N, Lq, M * D]
//
// Parallelism (at::parallel_for, i.e. torch's OpenMP pool, honours torch.set_num_threads):
//   forward  - over the N * Lq queries: every task writes its own output rows.
//   backward - over the N * M * L (batch, head, level) triples: the rows of grad_value that a triple
//              touches (level l of head m of image n) are touched by no other triple, and every
//              sample's grad_loc / grad_attn belongs to exactly one triple, so there is no race and no
//              atomics; the result is also independent of the number of threads. Every level costs
//              the same (Lq * P samples), so the tasks are balanced.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace msda {
namespace {

// Sizes of one call, read once from the tensors.
struct Dims {
  int64_t N, S, M, D, L, P, Lq;
};

Dims dims_of(const at::Tensor& value, const at::Tensor& sampling_loc) {
  return Dims{value.size(0), value.size(1), value.size(2), value.size(3),
              sampling_loc.size(3), sampling_loc.size(4), sampling_loc.size(1)};
}

// The (up to) four pixels a sample reads, as row offsets inside its level (-1: outside the map, reads
// zero), with their bilinear weights and the fractional parts needed for the location gradient.
template <typename T>
struct Corners {
  int64_t off[4];  // top-left, top-right, bottom-left, bottom-right
  T w[4];
  T lh, lw, hh, hw;  // lh/lw: fractional row/column; hh = 1 - lh, hw = 1 - lw
};

// Fills `c` for the normalised location (x, y) in an H x W map; false when the sample lies wholly
// outside (no corner inside), in which case it contributes nothing and has zero gradient. The early
// rejection also keeps floor() of huge or NaN coordinates away from the int64 conversion.
template <typename T>
inline bool corners_of(T x, T y, int64_t H, int64_t W, Corners<T>& c) {
  const T h = y * static_cast<T>(H) - T(0.5);
  const T w = x * static_cast<T>(W) - T(0.5);
  if (!(h > T(-1) && w > T(-1) && h < static_cast<T>(H) && w < static_cast<T>(W))) return false;
  const int64_t h0 = static_cast<int64_t>(std::floor(h));
  const int64_t w0 = static_cast<int64_t>(std::floor(w));
  c.lh = h - static_cast<T>(h0);
  c.lw = w - static_cast<T>(w0);
  c.hh = T(1) - c.lh;
  c.hw = T(1) - c.lw;
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

// out[d] += a * v[d]; the channel loop is contiguous, so it vectorises.
template <typename T>
inline void axpy(T* __restrict__ out, const T* __restrict__ v, T a, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] += a * v[d];
}

// Returns sum_d go[d] * v[d] and does gv[d] += a * go[d] in the same pass over the channels.
template <typename T>
inline T dot_and_axpy(const T* __restrict__ go, const T* __restrict__ v, T* __restrict__ gv, T a,
                      int64_t D) {
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) {
    s += go[d] * v[d];
    gv[d] += a * go[d];
  }
  return s;
}

template <typename T>
void forward_impl(const T* value, const int64_t* shapes, const int64_t* starts, const T* loc,
                  const T* attn, T* out, const Dims& k) {
  const int64_t row = k.M * k.D;  // distance between two pixels of one head in `value`
  // ~M*L*P*4*D multiply-adds per query: a handful of queries per task amortises the scheduling.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, k.M * k.L * k.P * k.D));
  at::parallel_for(0, k.N * k.Lq, grain, [&](int64_t begin, int64_t end) {
    Corners<T> c;
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / k.Lq;
      for (int64_t m = 0; m < k.M; ++m) {
        const int64_t nqm = nq * k.M + m;
        T* o = out + nqm * k.D;
        std::fill(o, o + k.D, T(0));
        for (int64_t l = 0; l < k.L; ++l) {
          const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
          const T* v = value + ((n * k.S + starts[l]) * k.M + m) * k.D;
          for (int64_t p = 0; p < k.P; ++p) {
            const int64_t s = (nqm * k.L + l) * k.P + p;
            if (!corners_of(loc[2 * s], loc[2 * s + 1], H, W, c)) continue;
            const T a = attn[s];
            for (int i = 0; i < 4; ++i)
              if (c.off[i] >= 0) axpy(o, v + c.off[i] * row, a * c.w[i], k.D);
          }
        }
      }
    }
  });
}

// grad_value, grad_loc and grad_attn must arrive zeroed: samples outside the map are skipped.
template <typename T>
void backward_impl(const T* value, const int64_t* shapes, const int64_t* starts, const T* loc,
                   const T* attn, const T* grad_out, T* grad_value, T* grad_loc, T* grad_attn,
                   const Dims& k) {
  const int64_t row = k.M * k.D;
  at::parallel_for(0, k.N * k.M * k.L, 1, [&](int64_t begin, int64_t end) {
    Corners<T> c;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t l = t % k.L, m = (t / k.L) % k.M, n = t / (k.L * k.M);
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
      const int64_t base = ((n * k.S + starts[l]) * k.M + m) * k.D;
      const T* v = value + base;
      T* gv = grad_value + base;
      for (int64_t q = 0; q < k.Lq; ++q) {
        const int64_t nqm = (n * k.Lq + q) * k.M + m;
        const T* go = grad_out + nqm * k.D;
        for (int64_t p = 0; p < k.P; ++p) {
          const int64_t s = (nqm * k.L + l) * k.P + p;
          if (!corners_of(loc[2 * s], loc[2 * s + 1], H, W, c)) continue;
          const T a = attn[s];
          T g[4] = {T(0), T(0), T(0), T(0)};  // <grad_out, corner pixel>, 0 for padding
          for (int i = 0; i < 4; ++i)
            if (c.off[i] >= 0)
              g[i] = dot_and_axpy(go, v + c.off[i] * row, gv + c.off[i] * row, a * c.w[i], k.D);
          grad_attn[s] = c.w[0] * g[0] + c.w[1] * g[1] + c.w[2] * g[2] + c.w[3] * g[3];
          // d(bilinear)/d(lw) and /d(lh), times d(lw)/dx = W and d(lh)/dy = H.
          grad_loc[2 * s] = a * static_cast<T>(W) * (c.hh * (g[1] - g[0]) + c.lh * (g[3] - g[2]));
          grad_loc[2 * s + 1] = a * static_cast<T>(H) * (c.hw * (g[2] - g[0]) + c.lw * (g[3] - g[1]));
        }
      }
    }
  });
}

}  // namespace

// Entry points called by bindings.cpp, which has checked devices, dtypes, shapes and contiguity.
at::Tensor cpu_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                       const at::Tensor& attn_weight) {
  const Dims k = dims_of(value, sampling_loc);
  auto out = at::empty({k.N, k.Lq, k.M * k.D}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "msda_cpu_forward", [&] {
    forward_impl<scalar_t>(value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                           level_start_index.data_ptr<int64_t>(), sampling_loc.data_ptr<scalar_t>(),
                           attn_weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), k);
  });
  return out;
}

std::vector<at::Tensor> cpu_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                     const at::Tensor& level_start_index,
                                     const at::Tensor& sampling_loc, const at::Tensor& attn_weight,
                                     const at::Tensor& grad_output) {
  const Dims k = dims_of(value, sampling_loc);
  auto grad_value = at::zeros_like(value);
  auto grad_loc = at::zeros_like(sampling_loc);
  auto grad_attn = at::zeros_like(attn_weight);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "msda_cpu_backward", [&] {
    backward_impl<scalar_t>(value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                            level_start_index.data_ptr<int64_t>(),
                            sampling_loc.data_ptr<scalar_t>(), attn_weight.data_ptr<scalar_t>(),
                            grad_output.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(),
                            grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>(), k);
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace msda
