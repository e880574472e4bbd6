// CUDA implementations of the fastsam ops (schemas in fastsam/ops/op_table.py, math in fastsam/ops/reference.py):
// validation, packing of the tensor lists into fastsam::cuda::TensorArgs, and launch on the current stream.
// Nothing here synchronizes with the device or reads device memory, so a step stays asynchronous and
// CUDA-graph capturable.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <vector>

#include "checks.h"
#include "kernels.h"

namespace {

namespace fc = fastsam::cuda;
using at::Tensor;
using at::TensorList;

using fastsam::rows_of;
int64_t inner_of(const Tensor& w) {
  const int64_t rows = rows_of(w);
  return rows > 0 ? w.numel() / rows : 0;
}

struct NamedList {
  const char* name;
  TensorList list;
};

// True when the call has no tensors: a no-op, once the lists are known to agree in length.
bool no_tensors(const char* op, NamedList first, std::initializer_list<NamedList> others) {
  for (const NamedList& l : others)
    TORCH_CHECK(l.list.size() == first.list.size(), op, ": ", l.name, " has ", l.list.size(), " tensors, expected ",
                first.list.size(), " (one per tensor of ", first.name, ")");
  return first.list.empty();
}

// Checks (csrc/checks.h) by the CUDA kernels' rules: every tensor on the device of the first list's first tensor
// (params, or `a` for dot_norm_sq_) and contiguous; the scalars' device pointers go to the kernels.
class Checker : public fastsam::Checks {
 public:
  Checker(const char* op, TensorList params, const char* name = "params")
      : Checks(op, params, name, fastsam::kCudaRules) {}

  fc::DType kernel_dtype() const {
    return dtype() == at::kFloat ? fc::DType::kFloat32 : dtype() == at::kBFloat16 ? fc::DType::kBFloat16
                                                                                  : fc::DType::kFloat16;
  }
};

// A list of a call and its position among the op's lists (List::kParams, ...: the op's list enum, kernels.h).
struct Placed {
  int at;
  TensorList list;
};

// TensorArgs of the tensors that have elements, every list of the op `List` placed once: ptr[l] is tensor j of
// the list at position l (null for an empty list: one the call leaves out), n and inner come from the list at
// position 0, aux from `aux` (fp32) when given.
template <class List>
std::vector<fc::TensorArgs> gather(std::initializer_list<Placed> placed, TensorList aux = {}) {
  TensorList lists[List::kCount];
  bool given[List::kCount] = {};
  TORCH_INTERNAL_ASSERT(placed.size() == size_t(List::kCount));
  for (const Placed& p : placed) {
    TORCH_INTERNAL_ASSERT(p.at >= 0 && p.at < List::kCount && !given[p.at]);
    given[p.at] = true;
    lists[p.at] = p.list;
  }
  const TensorList first = lists[0];
  std::vector<fc::TensorArgs> out;
  out.reserve(first.size());
  for (size_t j = 0; j < first.size(); ++j) {
    if (first[j].numel() == 0) continue;
    fc::TensorArgs a{};
    for (int l = 0; l < List::kCount; ++l) a.ptr[l] = lists[l].empty() ? nullptr : lists[l][j].data_ptr();
    a.n = first[j].numel();
    a.inner = inner_of(first[j]);
    a.aux = aux.empty() ? nullptr : aux[j].data_ptr<float>();
    out.push_back(a);
  }
  return out;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// Scratch of the first stage of a reduction: from the caching allocator, reused in stream order once the
// call's kernels ran.
Tensor reduction_scratch(const std::vector<fc::TensorArgs>& args, int64_t sums_per_block, const Tensor& acc) {
  return at::empty({fc::reduction_blocks(args.data(), int(args.size())) * sums_per_block}, acc.options());
}

// The grad of the fused updates: g, or the combination with coef (left on the device).
fc::GradArgs grad_terms(const Checker& c, TensorList grads_b, TensorList grads_c, const std::optional<Tensor>& coef) {
  if (!coef.has_value()) return {0, nullptr};
  c.fp32(*coef, "coef", 3);
  unsigned terms = fc::kTermCoef;
  if (c.optional_like(grads_b, "grads_b")) terms |= fc::kTermB;
  if (c.optional_like(grads_c, "grads_c")) terms |= fc::kTermC;
  return {terms, coef->data_ptr<float>()};
}

// Loss scaling and skipped steps: the tensors stay on the device, read by the kernels only.
fc::AmpArgs amp_args(const Checker& c, const std::optional<Tensor>& inv_scale,
                     const std::optional<Tensor>& found_inf) {
  return {c.optional_scalar(inv_scale, "inv_scale"), c.optional_scalar(found_inf, "found_inf")};
}

void norm_sq_cuda(const Tensor& acc, TensorList grads, TensorList params, TensorList row_scales, int64_t mode,
                  double eta, TensorList ema, double sigma, const std::optional<Tensor>& inv_scale) {
  fastsam::check_mode("norm_sq_", mode);
  if (no_tensors("norm_sq_", {"params", params}, {{"grads", grads}})) return;
  const Checker c("norm_sq_", params);
  c.like(grads, "grads");
  c.fp32(acc, "acc", 1);
  const bool row = mode == fc::kModeRow;
  if (row) c.per_row(row_scales, "row_scales");
  const bool sub = c.optional_like(ema, "ema") && sigma != 0;
  const float* inv = c.optional_scalar(inv_scale, "inv_scale");
  const c10::cuda::CUDAGuard guard(params[0].device());
  using L = fc::NormSqList;
  const auto args = gather<L>({{L::kGrads, grads}, {L::kParams, params}, {L::kEma, sub ? ema : TensorList()}},
                              row ? row_scales : TensorList());
  const Tensor partials = reduction_scratch(args, 1, acc);
  fc::launch_norm_sq(c.kernel_dtype(), args.data(), int(args.size()), int(mode), float(eta), sub, float(sigma), inv,
                     partials.data_ptr<float>(), acc.data_ptr<float>(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void row_norm_cuda(TensorList out, TensorList params, double eta) {
  if (no_tensors("row_norm_", {"params", params}, {{"out", out}})) return;
  const Checker c("row_norm_", params);
  c.per_row(out, "out");
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<fc::TensorArgs> args;
  args.reserve(params.size());
  for (size_t j = 0; j < params.size(); ++j) {
    if (rows_of(params[j]) == 0) continue;
    fc::TensorArgs a{};
    a.ptr[fc::RowNormList::kParams] = params[j].data_ptr();
    a.ptr[fc::RowNormList::kOut] = out[j].data_ptr();
    a.n = rows_of(params[j]);
    a.inner = inner_of(params[j]);  // 0 for a [rows, 0, ...] tensor: its rows get norm 0
    args.push_back(a);
  }
  fc::launch_row_norm(c.kernel_dtype(), args.data(), int(args.size()), float(eta), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void perturb_cuda(TensorList params, TensorList grads, TensorList backups, TensorList row_scales,
                  const Tensor& norm_sq, double rho, double eps, int64_t mode, double eta, bool sign,
                  TensorList ema, double sigma, double lmbda, const std::optional<Tensor>& inv_scale,
                  const std::optional<Tensor>& found_inf) {
  fastsam::check_mode("perturb_", mode);
  if (no_tensors("perturb_", {"params", params}, {{"grads", grads}, {"backups", backups}})) return;
  const Checker c("perturb_", params);
  c.like(grads, "grads");
  c.like(backups, "backups");
  const bool row = mode == fc::kModeRow;
  if (row) c.per_row(row_scales, "row_scales");
  if (!sign) c.fp32(norm_sq, "norm_sq", 1);
  fc::EmaArgs e{fc::EmaKind::kNone, sigma != 0, lmbda == 0, float(sigma), float(lmbda), float(1 - lmbda)};
  if (c.optional_like(ema, "ema")) e.kind = e.sub || !e.copy ? fc::EmaKind::kFull : fc::EmaKind::kCopy;
  const fc::AmpArgs amp = amp_args(c, inv_scale, found_inf);
  const c10::cuda::CUDAGuard guard(params[0].device());
  using L = fc::PerturbList;
  const auto args = gather<L>({{L::kParams, params}, {L::kGrads, grads}, {L::kBackups, backups}, {L::kEma, ema}},
                              row ? row_scales : TensorList());
  fc::launch_perturb(c.kernel_dtype(), args.data(), int(args.size()), sign ? nullptr : norm_sq.data_ptr<float>(),
                     float(rho), float(eps), int(mode), float(eta), sign, e, amp, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void reflect_cuda(TensorList params, TensorList backups, TensorList dirs, const Tensor& norm_sq, double rho,
                  double eps, TensorList grads, TensorList grad_copies, const std::optional<Tensor>& inv_scale,
                  const std::optional<Tensor>& found_inf) {
  if (no_tensors("reflect_", {"params", params}, {{"backups", backups}, {"dirs", dirs}})) return;
  const Checker c("reflect_", params);
  c.like(backups, "backups");
  c.like(dirs, "dirs");
  c.fp32(norm_sq, "norm_sq", 1);
  const bool copy = c.optional_like(grads, "grads"), copies = c.optional_like(grad_copies, "grad_copies");
  TORCH_CHECK(copy == copies, "reflect_: grads and grad_copies must both be given or both be empty, got ",
              grads.size(), " and ", grad_copies.size(), " tensors");
  const fc::AmpArgs amp = amp_args(c, inv_scale, found_inf);
  const c10::cuda::CUDAGuard guard(params[0].device());
  using L = fc::ReflectList;
  const auto args = gather<L>({{L::kParams, params}, {L::kBackups, backups}, {L::kDirs, dirs}, {L::kGrads, grads},
                               {L::kGradCopies, grad_copies}});
  fc::launch_reflect(c.kernel_dtype(), args.data(), int(args.size()), norm_sq.data_ptr<float>(), float(rho), float(eps),
                     copy, amp, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dot_norm_sq_cuda(const Tensor& acc, TensorList a, TensorList b) {
  if (no_tensors("dot_norm_sq_", {"a", a}, {{"b", b}})) return;
  const Checker c("dot_norm_sq_", a, "a");
  c.like(b, "b");
  c.fp32(acc, "acc", 2);
  const c10::cuda::CUDAGuard guard(a[0].device());
  using L = fc::DotNormSqList;
  const auto args = gather<L>({{L::kA, a}, {L::kB, b}});
  const Tensor partials = reduction_scratch(args, 2, acc);
  fc::launch_dot_norm_sq(c.kernel_dtype(), args.data(), int(args.size()), partials.data_ptr<float>(),
                         acc.data_ptr<float>(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void restore_cuda(TensorList params, TensorList backups) {
  if (no_tensors("restore_", {"params", params}, {{"backups", backups}})) return;
  const Checker c("restore_", params);
  c.like(backups, "backups");
  const c10::cuda::CUDAGuard guard(params[0].device());
  using L = fc::RestoreList;
  const auto args = gather<L>({{L::kParams, params}, {L::kBackups, backups}});
  fc::launch_restore(c.kernel_dtype(), args.data(), int(args.size()), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Without backups there is nothing to restore: the params stand in for them, so the kernels read w from the
// same list either way, at no extra memory traffic.
TensorList backups_or(TensorList backups, TensorList params) { return backups.empty() ? params : backups; }

void restore_sgd_cuda(TensorList params, TensorList grads, TensorList backups, TensorList momentum_buffers,
                      double lr, double weight_decay, double momentum, double dampening, bool nesterov,
                      bool maximize, bool init_momentum, TensorList grads_b, TensorList grads_c,
                      const std::optional<Tensor>& coef, const std::optional<Tensor>& inv_scale,
                      const std::optional<Tensor>& found_inf) {
  if (no_tensors("restore_sgd_", {"params", params}, {{"grads", grads}})) return;
  const Checker c("restore_sgd_", params);
  c.like(grads, "grads");
  c.optional_like(backups, "backups");
  const bool use_momentum = momentum != 0;
  if (use_momentum) c.like(momentum_buffers, "momentum_buffers");  // ignored otherwise, as in the reference
  const fc::GradArgs g = grad_terms(c, grads_b, grads_c, coef);
  const fc::AmpArgs amp = amp_args(c, inv_scale, found_inf);
  const c10::cuda::CUDAGuard guard(params[0].device());
  using L = fc::SgdList;
  const auto args = gather<L>({{L::kParams, params}, {L::kGrads, grads}, {L::kBackups, backups_or(backups, params)},
                               {L::kGradsB, g.terms & fc::kTermB ? grads_b : TensorList()},
                               {L::kGradsC, g.terms & fc::kTermC ? grads_c : TensorList()},
                               {L::kMomentumBuffers, use_momentum ? momentum_buffers : TensorList()}});
  const fc::SgdArgs a{float(lr),     float(weight_decay), float(momentum), float(1 - dampening),
                      use_momentum, nesterov,            maximize,        init_momentum};
  fc::launch_restore_sgd(c.kernel_dtype(), args.data(), int(args.size()), g, a, amp, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void restore_adam_cuda(TensorList params, TensorList grads, TensorList backups, TensorList exp_avgs,
                       TensorList exp_avg_sqs, double lr, double beta1, double beta2, double weight_decay,
                       double eps, bool decoupled, bool maximize, double step, TensorList grads_b,
                       TensorList grads_c, const std::optional<Tensor>& coef, const std::optional<Tensor>& inv_scale,
                       const std::optional<Tensor>& found_inf, TensorList steps) {
  if (no_tensors("restore_adam_", {"params", params},
                 {{"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}))
    return;
  const Checker c("restore_adam_", params);
  c.like(grads, "grads");
  c.optional_like(backups, "backups");
  c.like(exp_avgs, "exp_avgs");
  c.like(exp_avg_sqs, "exp_avg_sqs");
  const fc::GradArgs g = grad_terms(c, grads_b, grads_c, coef);
  const fc::AmpArgs amp = amp_args(c, inv_scale, found_inf);
  const bool device_steps = c.optional_scalars(steps, "steps");
  const c10::cuda::CUDAGuard guard(params[0].device());
  using L = fc::AdamList;
  const auto args = gather<L>({{L::kParams, params}, {L::kGrads, grads}, {L::kBackups, backups_or(backups, params)},
                               {L::kGradsB, g.terms & fc::kTermB ? grads_b : TensorList()},
                               {L::kGradsC, g.terms & fc::kTermC ? grads_c : TensorList()},
                               {L::kExpAvgs, exp_avgs}, {L::kExpAvgSqs, exp_avg_sqs}},
                              steps);
  fc::AdamArgs a{float(1 - beta1), float(beta2),
                 float(1 - beta2), float(weight_decay),
                 float(1 - lr * weight_decay), float(eps),
                 0.f, 0.f,  // set_step
                 decoupled, maximize,
                 device_steps, {lr, beta1, beta2}};
  // With device steps each block sets them from its tensor's step instead.
  if (!device_steps) a.set_step(step);
  fc::launch_restore_adam(c.kernel_dtype(), args.data(), int(args.size()), g, a, amp, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsam, CUDA, m) {
  m.impl("norm_sq_", &norm_sq_cuda);
  m.impl("row_norm_", &row_norm_cuda);
  m.impl("perturb_", &perturb_cuda);
  m.impl("reflect_", &reflect_cuda);
  m.impl("dot_norm_sq_", &dot_norm_sq_cuda);
  m.impl("restore_", &restore_cuda);
  m.impl("restore_sgd_", &restore_sgd_cuda);
  m.impl("restore_adam_", &restore_adam_cuda);
}
