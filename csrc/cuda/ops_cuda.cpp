// CUDA implementations of the fastsam ops (schemas in csrc/ops.cpp, math in fastsam/ops/reference.py):
// validation, packing of the tensor lists into fastsam::cuda::TensorArgs, and launch on the current stream.
// Nothing here synchronizes with the device or reads device memory, so a step stays asynchronous and
// CUDA-graph capturable.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <initializer_list>
#include <ostream>
#include <vector>

#include "kernels.h"

namespace {

namespace fc = fastsam::cuda;
using at::Tensor;
using at::TensorList;

// Names a tensor in error messages: "grads[3]", or "acc" for a single tensor (j < 0).
struct Label {
  const char* what;
  int64_t j;
};
std::ostream& operator<<(std::ostream& os, const Label& l) {
  os << l.what;
  if (l.j >= 0) os << '[' << l.j << ']';
  return os;
}

// A 0-dim parameter is one row of one element, as in reference._t_operator.
int64_t rows_of(const Tensor& w) { return w.dim() > 0 ? w.size(0) : 1; }
int64_t inner_of(const Tensor& w) {
  const int64_t rows = rows_of(w);
  return rows > 0 ? w.numel() / rows : 0;
}

void check_mode(const char* op, int64_t mode) {
  TORCH_CHECK(mode == fc::kModeIdentity || mode == fc::kModeAbs || mode == fc::kModeRow, op,
              ": mode must be 0 (identity), 1 (abs) or 2 (row), got ", mode);
}

// True when the call has no tensors: a no-op, once the lists are known to agree in length.
bool no_tensors(const char* op, TensorList params, std::initializer_list<TensorList> others) {
  for (const TensorList& l : others)
    TORCH_CHECK(l.size() == params.size(), op, ": tensor lists differ in length (", l.size(), " vs ",
                params.size(), " params)");
  return params.empty();
}

// Validates the tensors of a call against params: every tensor on params[0]'s device and contiguous;
// lists parallel to params of the param dtype and shapes, fp32 for per-row and scalar tensors.
class Checker {
 public:
  Checker(const char* op, TensorList params) : op_(op), params_(params) {
    TORCH_CHECK(params[0].defined() && params[0].is_cuda(), op, ": params[0] must be a CUDA tensor");
    device_ = params[0].device();
    dtype_ = params[0].scalar_type();
    TORCH_CHECK(dtype_ == at::kFloat || dtype_ == at::kBFloat16 || dtype_ == at::kHalf, op,
                ": params must be float32, bfloat16 or float16, got ", dtype_);
    like(params, "params");
  }

  fc::DType dtype() const {
    return dtype_ == at::kFloat ? fc::DType::kFloat32 : dtype_ == at::kBFloat16 ? fc::DType::kBFloat16
                                                                                : fc::DType::kFloat16;
  }

  void like(TensorList l, const char* what) const {
    length(l, what);
    for (size_t j = 0; j < l.size(); ++j) {
      tensor(l[j], {what, int64_t(j)}, dtype_);
      TORCH_CHECK(l[j].sizes() == params_[j].sizes(), op_, ": ", Label{what, int64_t(j)}, " has shape ",
                  l[j].sizes(), ", params[", j, "] has shape ", params_[j].sizes());
    }
  }

  void per_row(TensorList l, const char* what) const {
    length(l, what);
    for (size_t j = 0; j < l.size(); ++j) {
      tensor(l[j], {what, int64_t(j)}, at::kFloat);
      TORCH_CHECK(l[j].numel() == rows_of(params_[j]), op_, ": ", Label{what, int64_t(j)}, " has ", l[j].numel(),
                  " elements, expected one per row of params[", j, "] (", rows_of(params_[j]), ")");
    }
  }

  void scalar(const Tensor& t, const char* what) const {
    tensor(t, {what, -1}, at::kFloat);
    TORCH_CHECK(t.numel() == 1, op_, ": ", what, " must have one element, got shape ", t.sizes());
  }

 private:
  void length(TensorList l, const char* what) const {
    TORCH_CHECK(l.size() == params_.size(), op_, ": ", what, " has ", l.size(), " tensors, expected ",
                params_.size());
  }
  void tensor(const Tensor& t, const Label& label, at::ScalarType dtype) const {
    TORCH_CHECK(t.defined(), op_, ": ", label, " is undefined");
    TORCH_CHECK(t.device() == device_, op_, ": ", label, " is on ", t.device(), ", expected ", device_);
    TORCH_CHECK(t.scalar_type() == dtype, op_, ": ", label, " has dtype ", t.scalar_type(), ", expected ", dtype);
    TORCH_CHECK(t.is_contiguous(), op_, ": ", label, " must be contiguous");
  }

  const char* op_;
  TensorList params_;
  at::Device device_{at::kCUDA};
  at::ScalarType dtype_;
};

// TensorArgs of the tensors that have elements; lists[l][j] is tensor j of list l, n and inner come
// from lists[0][j].
std::vector<fc::TensorArgs> gather(std::initializer_list<TensorList> lists, TensorList row_scales = {}) {
  TORCH_INTERNAL_ASSERT(lists.size() <= size_t(fc::kMaxLists));
  const TensorList first = *lists.begin();
  std::vector<fc::TensorArgs> out;
  out.reserve(first.size());
  for (size_t j = 0; j < first.size(); ++j) {
    if (first[j].numel() == 0) continue;
    fc::TensorArgs a{};
    int l = 0;
    for (const TensorList& list : lists) a.ptr[l++] = list[j].data_ptr();
    a.n = first[j].numel();
    a.inner = inner_of(first[j]);
    a.row_scale = row_scales.empty() ? nullptr : row_scales[j].data_ptr<float>();
    out.push_back(a);
  }
  return out;
}

cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }

void norm_sq_cuda(const Tensor& acc, TensorList grads, TensorList params, TensorList row_scales, int64_t mode,
                  double eta) {
  check_mode("norm_sq_", mode);
  if (no_tensors("norm_sq_", params, {grads})) return;
  const Checker c("norm_sq_", params);
  c.like(grads, "grads");
  c.scalar(acc, "acc");
  const bool row = mode == fc::kModeRow;
  if (row) c.per_row(row_scales, "row_scales");
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto args = gather({grads, params}, row ? row_scales : TensorList());
  const int64_t num_partials = fc::norm_sq_partials(args.data(), int(args.size()));
  if (num_partials == 0) return;
  // Stage-1 scratch: from the caching allocator, reused in stream order once the call's kernels ran.
  const Tensor partials = at::empty({num_partials}, acc.options());
  fc::launch_norm_sq(c.dtype(), args.data(), int(args.size()), int(mode), float(eta), partials.data_ptr<float>(),
                     acc.data_ptr<float>(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void row_norm_cuda(TensorList out, TensorList params, double eta) {
  if (no_tensors("row_norm_", params, {out})) return;
  const Checker c("row_norm_", params);
  c.per_row(out, "out");
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<fc::TensorArgs> args;
  args.reserve(params.size());
  for (size_t j = 0; j < params.size(); ++j) {
    if (rows_of(params[j]) == 0) continue;
    fc::TensorArgs a{};
    a.ptr[0] = params[j].data_ptr();
    a.ptr[1] = out[j].data_ptr();
    a.n = rows_of(params[j]);
    a.inner = inner_of(params[j]);  // 0 for a [rows, 0, ...] tensor: its rows get norm 0
    args.push_back(a);
  }
  fc::launch_row_norm(c.dtype(), args.data(), int(args.size()), float(eta), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void perturb_cuda(TensorList params, TensorList grads, TensorList backups, TensorList row_scales,
                  const Tensor& norm_sq, double rho, double eps, int64_t mode, double eta, bool sign) {
  check_mode("perturb_", mode);
  if (no_tensors("perturb_", params, {grads, backups})) return;
  const Checker c("perturb_", params);
  c.like(grads, "grads");
  c.like(backups, "backups");
  const bool row = mode == fc::kModeRow;
  if (row) c.per_row(row_scales, "row_scales");
  if (!sign) c.scalar(norm_sq, "norm_sq");
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto args = gather({params, grads, backups}, row ? row_scales : TensorList());
  fc::launch_perturb(c.dtype(), args.data(), int(args.size()), sign ? nullptr : norm_sq.data_ptr<float>(),
                     float(rho), float(eps), int(mode), float(eta), sign, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void restore_cuda(TensorList params, TensorList backups) {
  if (no_tensors("restore_", params, {backups})) return;
  const Checker c("restore_", params);
  c.like(backups, "backups");
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto args = gather({params, backups});
  fc::launch_restore(c.dtype(), args.data(), int(args.size()), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void restore_sgd_cuda(TensorList params, TensorList grads, TensorList backups, TensorList momentum_buffers,
                      double lr, double weight_decay, double momentum, double dampening, bool nesterov,
                      bool maximize, bool init_momentum) {
  if (no_tensors("restore_sgd_", params, {grads, backups})) return;
  const Checker c("restore_sgd_", params);
  c.like(grads, "grads");
  c.like(backups, "backups");
  const bool use_momentum = momentum != 0;
  if (use_momentum) c.like(momentum_buffers, "momentum_buffers");  // ignored otherwise, as in the reference
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto args = use_momentum ? gather({params, grads, backups, momentum_buffers}) : gather({params, grads, backups});
  const fc::SgdArgs a{float(lr),     float(weight_decay), float(momentum), float(1 - dampening),
                      use_momentum, nesterov,            maximize,        init_momentum};
  fc::launch_restore_sgd(c.dtype(), args.data(), int(args.size()), a, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void restore_adam_cuda(TensorList params, TensorList grads, TensorList backups, TensorList exp_avgs,
                       TensorList exp_avg_sqs, double lr, double beta1, double beta2, double weight_decay,
                       double eps, bool decoupled, bool maximize, double step) {
  if (no_tensors("restore_adam_", params, {grads, backups, exp_avgs, exp_avg_sqs})) return;
  const Checker c("restore_adam_", params);
  c.like(grads, "grads");
  c.like(backups, "backups");
  c.like(exp_avgs, "exp_avgs");
  c.like(exp_avg_sqs, "exp_avg_sqs");
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto args = gather({params, grads, backups, exp_avgs, exp_avg_sqs});
  // Bias corrections in double once per call, as the reference computes them in Python.
  const double bias_correction1 = 1 - std::pow(beta1, step);
  const double bias_correction2_sqrt = std::sqrt(1 - std::pow(beta2, step));
  const fc::AdamArgs a{float(1 - beta1), float(beta2),
                       float(1 - beta2), float(weight_decay),
                       float(1 - lr * weight_decay), float(eps),
                       float(-(lr / bias_correction1)), float(bias_correction2_sqrt),
                       decoupled, maximize};
  fc::launch_restore_adam(c.dtype(), args.data(), int(args.size()), a, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsam, CUDA, m) {
  m.impl("norm_sq_", &norm_sq_cuda);
  m.impl("row_norm_", &row_norm_cuda);
  m.impl("perturb_", &perturb_cuda);
  m.impl("restore_", &restore_cuda);
  m.impl("restore_sgd_", &restore_sgd_cuda);
  m.impl("restore_adam_", &restore_adam_cuda);
}
