// CUDA implementations of the CVaR ops (schemas in fastsam/ops/op_table.py, math in fastsam/ops/cvar_reference.py):
// validation, allocation of the outputs and of the kernels' scratch, and launch on the current stream (the
// kernels and their design: cvar_kernels.cu). Nothing here synchronizes with the device or reads device
// memory: the count of valid losses, k and the threshold never leave the device, so a call is asynchronous
// and CUDA-graph capturable. Decided on the host from the shapes alone: the selection path (one block for
// few losses, a multi-kernel radix select for many) and the launch grids.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "cvar_kernels.h"

namespace {

namespace fc = fastsam::cuda;
using at::Tensor;
using Result = std::tuple<Tensor, Tensor, Tensor>;

constexpr int64_t kMaxInt = std::numeric_limits<int32_t>::max();

void check_alpha(const char* op, double alpha) {
  TORCH_CHECK_VALUE(alpha > 0.0 && alpha <= 1.0, op, ": alpha must be in (0, 1], got ", alpha);
}

// A defined, contiguous CUDA tensor on `device` (when given: the device of the op's first tensor).
void check_tensor(const char* op, const char* what, const Tensor& t, const std::optional<at::Device>& device) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", what, " is undefined");
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", what, " must be a CUDA tensor, got one on ", t.device());
  if (device.has_value())
    TORCH_CHECK_VALUE(t.device() == *device, op, ": ", what, " is on ", t.device(), ", expected ", *device,
                      " (one device for all the tensors of the call)");
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", what, " must be contiguous");
}

fc::DType float_dtype(const char* op, const char* what, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return fc::DType::kFloat32;
    case at::kBFloat16: return fc::DType::kBFloat16;
    case at::kHalf: return fc::DType::kFloat16;
    case at::kDouble: return fc::DType::kFloat64;
    default: break;
  }
  TORCH_CHECK_TYPE(false, op, ": ", what, " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  return fc::DType::kFloat32;  // unreachable
}

// logits: 2-D [n, cols] with cols >= 1; returns cols.
int64_t check_logits(const char* op, const char* cols_name, const Tensor& logits) {
  check_tensor(op, "logits", logits, std::nullopt);
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) >= 1, op, ": logits must be 2-D [n, ", cols_name, "] with ",
                    cols_name, " >= 1, got shape ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) <= kMaxInt, op, ": logits has ", logits.size(1), " ", cols_name,
                    " per row, at most ", kMaxInt, " are supported");
  return logits.size(1);
}

at::ScalarType opmath_of(fc::DType dt) { return dt == fc::DType::kFloat64 ? at::kDouble : at::kFloat; }

// value, var (0-dim, opmath) and the per-slot output like `input`; NaN / NaN / empty without rows.
struct Outputs {
  Tensor value, var, out;
  Outputs(const Tensor& input, fc::DType dt)
      : value(at::empty({}, input.options().dtype(opmath_of(dt)))),
        var(at::empty({}, input.options().dtype(opmath_of(dt)))),
        out(at::empty_like(input, at::MemoryFormat::Contiguous)) {}
  fc::CvarOutputs raw() const { return {value.data_ptr(), var.data_ptr(), out.data_ptr()}; }
  Result result() const { return {value, var, out}; }
  // No rows, so no launch of the op's kernels: value and var are NaN (torch's mean over nothing).
  Result empty() {
    value.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return result();
  }
};

Tensor workspace(const Tensor& like, fc::CvarOp op, fc::DType dt, int64_t rows, int64_t cols) {
  const size_t bytes = fc::cvar_workspace_bytes(op, dt, rows, cols);
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

Result cvar_select_cuda(const Tensor& losses, double alpha) {
  constexpr const char* op = "cvar_select";
  check_tensor(op, "losses", losses, std::nullopt);
  const fc::DType dt = float_dtype(op, "losses", losses);
  TORCH_CHECK_VALUE(losses.dim() == 1, op, ": losses must be 1-D [n], got shape ", losses.sizes());
  check_alpha(op, alpha);
  const c10::cuda::CUDAGuard guard(losses.device());
  Outputs o(losses, dt);
  const int64_t n = losses.size(0);
  if (n == 0) return o.empty();
  const Tensor ws = workspace(losses, fc::CvarOp::kSelect, dt, n, 1);
  C10_CUDA_CHECK(fc::launch_cvar_select(dt, losses.data_ptr(), n, alpha, o.raw(), ws.data_ptr(), current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return o.result();
}

Result cvar_cross_entropy_cuda(const Tensor& logits, const Tensor& target, double alpha, int64_t ignore_index,
                               double label_smoothing) {
  constexpr const char* op = "cvar_cross_entropy";
  const int64_t c = check_logits(op, "C", logits);
  const fc::DType dt = float_dtype(op, "logits", logits);
  check_tensor(op, "target", target, logits.device());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op, ": target must be int64 class indices, got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == logits.size(0), op, ": target must have shape [",
                    logits.size(0), "] (one class per row of logits ", logits.sizes(), "), got ", target.sizes());
  check_alpha(op, alpha);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
                    ": label_smoothing must be in [0, 1], got ", label_smoothing);
  const c10::cuda::CUDAGuard guard(logits.device());
  Outputs o(logits, dt);
  const int64_t n = logits.size(0);
  if (n == 0) return o.empty();
  const Tensor ws = workspace(logits, fc::CvarOp::kCrossEntropy, dt, n, c);
  C10_CUDA_CHECK(fc::launch_cvar_cross_entropy(dt, logits.data_ptr(), target.data_ptr<int64_t>(), n, c, alpha,
                                               ignore_index, label_smoothing, o.raw(), ws.data_ptr(),
                                               current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return o.result();
}

// ignore_index as torch compares it with a target of dtype `dt`: the Python float rounded to float, then to dt.
double ignore_in(fc::DType dt, double ignore_index) {
  switch (dt) {
    case fc::DType::kFloat32: return static_cast<float>(ignore_index);
    case fc::DType::kFloat16: return static_cast<float>(c10::Half(static_cast<float>(ignore_index)));
    case fc::DType::kBFloat16: return static_cast<float>(c10::BFloat16(static_cast<float>(ignore_index)));
    case fc::DType::kFloat64: break;
  }
  return ignore_index;
}

Result cvar_bce_with_logits_cuda(const Tensor& logits, const Tensor& target, const std::optional<Tensor>& pos_weight,
                                 double alpha, bool per_sample, double ignore_index) {
  constexpr const char* op = "cvar_bce_with_logits";
  const int64_t l = check_logits(op, "L", logits);
  const fc::DType dt = float_dtype(op, "logits", logits);
  check_tensor(op, "target", target, logits.device());
  TORCH_CHECK_TYPE(target.scalar_type() == logits.scalar_type(), op, ": target must have the dtype of logits (",
                   logits.scalar_type(), "), got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.sizes() == logits.sizes(), op, ": target must have the shape of logits (",
                    logits.sizes(), "), got ", target.sizes());
  const float* pw = nullptr;
  if (pos_weight.has_value() && pos_weight->defined()) {
    check_tensor(op, "pos_weight", *pos_weight, logits.device());
    TORCH_CHECK_TYPE(pos_weight->scalar_type() == at::kFloat, op, ": pos_weight must be float32, got ",
                     pos_weight->scalar_type());
    TORCH_CHECK_VALUE(pos_weight->dim() == 1 && pos_weight->size(0) == l, op, ": pos_weight must have shape [", l,
                      "] (one weight per label), got ", pos_weight->sizes());
    pw = pos_weight->data_ptr<float>();
  }
  check_alpha(op, alpha);
  const c10::cuda::CUDAGuard guard(logits.device());
  Outputs o(logits, dt);
  const int64_t n = logits.size(0);
  if (n == 0) return o.empty();
  const Tensor ws =
      workspace(logits, per_sample ? fc::CvarOp::kBceSample : fc::CvarOp::kBceElement, dt, n, l);
  C10_CUDA_CHECK(fc::launch_cvar_bce_with_logits(dt, logits.data_ptr(), target.data_ptr(), pw, n, l, alpha,
                                                 per_sample, ignore_in(dt, ignore_index), o.raw(), ws.data_ptr(),
                                                 current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return o.result();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsam, CUDA, m) {
  m.impl("cvar_select", &cvar_select_cuda);
  m.impl("cvar_cross_entropy", &cvar_cross_entropy_cuda);
  m.impl("cvar_bce_with_logits", &cvar_bce_with_logits_cuda);
}
