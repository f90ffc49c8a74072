// Python bindings of the multi-scale deformable attention kernels (built by csrc/build.py).
//
// `forward` and `backward` check their arguments, make them contiguous and dispatch on the device of
// `value`: the CPU kernel (cpu.cpp) always, the CUDA kernel (cuda.cu) only in a build compiled with
// -DWITH_CUDA, so the CPU build needs no nvcc and no CUDA headers.
//
// Shapes: value [N, S, M, D], spatial_shapes [L, 2] int64 (H, W), level_start_index [L] int64,
// sampling_loc [N, Lq, M, L, P, 2] (x, y in 0..1), attn_weight [N, Lq, M, L, P] -> output
// [N, Lq, M * D]; backward returns [grad_value, grad_sampling_loc, grad_attn_weight].
#include <torch/extension.h>

#include <vector>

namespace msda {

at::Tensor cpu_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                       const at::Tensor& attn_weight);
std::vector<at::Tensor> cpu_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                     const at::Tensor& level_start_index,
                                     const at::Tensor& sampling_loc, const at::Tensor& attn_weight,
                                     const at::Tensor& grad_output);
#ifdef WITH_CUDA
at::Tensor cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                        const at::Tensor& attn_weight);
std::vector<at::Tensor> cuda_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_loc, const at::Tensor& attn_weight,
                                      const at::Tensor& grad_output);
#endif

namespace {

// Shape, dtype and device agreement of the inputs. The kernels index raw pointers, so a mismatch
// here would otherwise be an out-of-bounds read rather than an error.
void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                  const at::Tensor& attn_weight) {
  TORCH_CHECK(value.dim() == 4, "value must be [N, S, M, D], got ", value.sizes());
  TORCH_CHECK(sampling_loc.dim() == 6 && sampling_loc.size(5) == 2,
              "sampling_loc must be [N, Lq, M, L, P, 2], got ", sampling_loc.sizes());
  TORCH_CHECK(attn_weight.dim() == 5, "attn_weight must be [N, Lq, M, L, P], got ",
              attn_weight.sizes());
  const int64_t N = value.size(0), M = value.size(2), L = sampling_loc.size(3);
  TORCH_CHECK(sampling_loc.size(0) == N && sampling_loc.size(2) == M,
              "sampling_loc ", sampling_loc.sizes(), " does not match value ", value.sizes());
  TORCH_CHECK(attn_weight.sizes() == sampling_loc.sizes().slice(0, 5), "attn_weight ",
              attn_weight.sizes(), " does not match sampling_loc ", sampling_loc.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == L && spatial_shapes.size(1) == 2,
              "spatial_shapes must be [L, 2] with L = ", L, ", got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L,
              "level_start_index must be [L] with L = ", L, ", got ", level_start_index.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(sampling_loc.scalar_type() == value.scalar_type() &&
                  attn_weight.scalar_type() == value.scalar_type(),
              "value, sampling_loc and attn_weight must share one dtype, got ", value.scalar_type(),
              ", ", sampling_loc.scalar_type(), ", ", attn_weight.scalar_type());
  const auto device = value.device();
  TORCH_CHECK(sampling_loc.device() == device && attn_weight.device() == device &&
                  spatial_shapes.device() == device && level_start_index.device() == device,
              "all inputs must be on ", device);
}

// On the CPU the level table is cheap to read: check that every level lies inside S. (On CUDA that
// would cost a device->host copy per call; the caller builds the table from the same shapes.)
void check_levels_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                      const at::Tensor& level_start_index) {
  const int64_t* hw = spatial_shapes.data_ptr<int64_t>();
  const int64_t* start = level_start_index.data_ptr<int64_t>();
  for (int64_t l = 0; l < spatial_shapes.size(0); ++l) {
    TORCH_CHECK(hw[2 * l] >= 0 && hw[2 * l + 1] >= 0 && start[l] >= 0 &&
                    start[l] + hw[2 * l] * hw[2 * l + 1] <= value.size(1),
                "level ", l, " (", hw[2 * l], " x ", hw[2 * l + 1], " from row ", start[l],
                ") does not fit in value's S = ", value.size(1));
  }
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                   const at::Tensor& attn_weight) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  const auto v = value.contiguous(), hw = spatial_shapes.contiguous();
  const auto start = level_start_index.contiguous(), loc = sampling_loc.contiguous();
  const auto attn = attn_weight.contiguous();
  if (v.is_cuda()) {
#ifdef WITH_CUDA
    return cuda_forward(v, hw, start, loc, attn);
#else
    TORCH_CHECK(false, "this build of the MSDeformAttn extension has no CUDA kernel");
#endif
  }
  TORCH_CHECK(v.device().is_cpu(), "unsupported device ", v.device());
  check_levels_cpu(v, hw, start);
  return cpu_forward(v, hw, start, loc, attn);
}

std::vector<at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                                 const at::Tensor& attn_weight, const at::Tensor& grad_output) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  const int64_t N = value.size(0), Lq = sampling_loc.size(1), MD = value.size(2) * value.size(3);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == N && grad_output.size(1) == Lq &&
                  grad_output.size(2) == MD,
              "grad_output must be [N, Lq, M * D] = [", N, ", ", Lq, ", ", MD, "], got ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type() &&
                  grad_output.device() == value.device(),
              "grad_output must have value's dtype and device");
  const auto v = value.contiguous(), hw = spatial_shapes.contiguous();
  const auto start = level_start_index.contiguous(), loc = sampling_loc.contiguous();
  const auto attn = attn_weight.contiguous(), go = grad_output.contiguous();
  if (v.is_cuda()) {
#ifdef WITH_CUDA
    return cuda_backward(v, hw, start, loc, attn, go);
#else
    TORCH_CHECK(false, "this build of the MSDeformAttn extension has no CUDA kernel");
#endif
  }
  TORCH_CHECK(v.device().is_cpu(), "unsupported device ", v.device());
  check_levels_cpu(v, hw, start);
  return cpu_backward(v, hw, start, loc, attn, go);
}

}  // namespace
}  // namespace msda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-scale deformable attention kernels (CPU; CUDA when built with WITH_CUDA)";
  m.def("forward", &msda::forward,
        "forward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight) -> "
        "output [N, Lq, M*D]",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_loc"), py::arg("attn_weight"));
  m.def("backward", &msda::backward,
        "backward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, "
        "grad_output) -> [grad_value, grad_sampling_loc, grad_attn_weight]",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_loc"), py::arg("attn_weight"), py::arg("grad_output"));
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
