// Input checks of the fused ops, shared by the CPU kernels (csrc/cpu) and the CUDA host code (csrc/cuda/ops_cuda.cpp).
// A call's tensor lists are checked against its lead list (params, or `a` of dot_norm_sq_), position by position;
// every message names the op, the list and the index. What the two differ in is a Rules value.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/irange.h>

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>

namespace fastsam {

// Names a tensor in error messages: "grads[3]", or "acc" for a single tensor (j < 0).
struct Label {
  const char* what;
  int64_t j;
};
inline std::ostream& operator<<(std::ostream& os, const Label& l) {
  os << l.what;
  if (l.j >= 0) os << '[' << l.j << ']';
  return os;
}

// A 0-dim tensor is one row of one element, as in reference._t_operator.
inline int64_t rows_of(const at::Tensor& t) { return t.dim() > 0 ? t.size(0) : 1; }

// reference.py MODE_*.
inline void check_mode(const char* op, int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, op, ": mode must be 0 (identity), 1 (abs) or 2 (row), got ", mode);
}

struct Rules {
  // kCPU: every tensor on the CPU. kCUDA: every tensor on the device of the lead's first tensor.
  at::DeviceType device;
  // The CPU kernels walk each tensor's storage as one flat array: a tensor may be dense in any layout, laid out
  // like the lead tensor of its position (of equal numel). Otherwise (CUDA) it must be contiguous, of its shape.
  bool dense;
};
inline constexpr Rules kCpuRules{at::kCPU, true};
inline constexpr Rules kCudaRules{at::kCUDA, false};

class Checks {
 public:
  // `lead` fixes the device and dtype of the call (float32, bfloat16 or float16) and the shape and layout of each
  // position. The CUDA host code answers calls without tensors before it checks.
  Checks(const char* op, at::TensorList lead, const char* name, Rules rules)
      : op_(op), name_(name), lead_(lead), rules_(rules),
        device_(rules.device == at::kCUDA && !lead.empty() && lead[0].defined() ? lead[0].device()
                                                                                  : at::Device(rules.device)) {
    each(lead, name, false, [&](const at::Tensor& t, const at::Tensor&, const Label& l) {
      TORCH_CHECK(t.scalar_type() == lead[0].scalar_type(), op_, ": ", l, " has dtype ", t.scalar_type(), " but ",
                  name, "[0] has ", lead[0].scalar_type(), " (one dtype per call)");
      laid_out(t, l);
    });
    if (lead.empty()) return;
    const at::ScalarType dt = lead[0].scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op_, ": ", name,
                " has unsupported dtype ", dt, "; expected float32, bfloat16 or float16");
  }

  // The call's dtype; only with lead tensors.
  at::ScalarType dtype() const { return lead_[0].scalar_type(); }

  // One tensor like each lead tensor: its dtype, numel and layout.
  void like(at::TensorList ts, const char* name) const { like(ts, name, false); }

  // A list that may be left empty (the op goes without it), else like(); returns whether it is given.
  bool optional_like(at::TensorList ts, const char* name) const {
    if (ts.empty()) return false;
    like(ts, name, true);
    return true;
  }

  // One fp32 value per row (slice along dim 0) of each lead tensor; the rows must be contiguous blocks of storage,
  // so that element i of the flat storage lies in row i / (numel / rows).
  void per_row(at::TensorList rs, const char* name) const {
    each(rs, name, false, [&](const at::Tensor& r, const at::Tensor& l, const Label& label) {
      TORCH_CHECK(r.scalar_type() == at::kFloat && r.is_contiguous() && r.numel() == rows_of(l), op_, ": ", label,
                  " must be a contiguous float32 tensor with ", rows_of(l),
                  " elements (one per row of a tensor of sizes ", l.sizes(), "), got ", r.scalar_type(), " ",
                  r.sizes());
      TORCH_CHECK(l.dim() == 0 || l.size(0) <= 1 || l.numel() == 0 || l.stride(0) == l.numel() / l.size(0), op_,
                  ": tensor ", label.j, " (sizes ", l.sizes(), ", strides ", l.strides(),
                  ") must store its dim-0 rows as contiguous blocks");
    });
  }

  // n contiguous fp32 values that the kernels read or write (acc, norm_sq, coef).
  void fp32(const at::Tensor& t, const char* name, int64_t n) const {
    placed(t, {name, -1});
    values(t, {name, -1}, n);
  }

  // An optional fp32 one-element tensor (inv_scale, found_inf): its data, null when not given. The CPU kernels
  // read it on the host (no device sync: it lies in host memory), the CUDA kernels on the device.
  const float* optional_scalar(const std::optional<at::Tensor>& t, const char* name) const {
    if (!t.has_value()) return nullptr;
    fp32(*t, name, 1);
    return t->data_ptr<float>();
  }

  // An optional list of fp32 one-element tensors, one per lead tensor (restore_adam_'s steps); returns whether
  // it is given.
  bool optional_scalars(at::TensorList ts, const char* name) const {
    if (ts.empty()) return false;
    each(ts, name, true, [&](const at::Tensor& t, const at::Tensor&, const Label& l) { values(t, l, 1); });
    return true;
  }

 private:
  // Checks the length of `ts` (none is allowed when `optional`) and where each of its tensors lies, then calls
  // f(tensor, lead tensor of its position, label).
  template <class F>
  void each(at::TensorList ts, const char* name, bool optional, F&& f) const {
    TORCH_CHECK(ts.size() == lead_.size(), op_, ": ", name, " has ", ts.size(), " tensors, expected ",
                optional ? "none or " : "", lead_.size());
    for (const auto j : c10::irange(ts.size())) {
      const Label label{name, int64_t(j)};
      placed(ts[j], label);
      f(ts[j], lead_[j], label);
    }
  }
  void like(at::TensorList ts, const char* name, bool optional) const {
    each(ts, name, optional, [&](const at::Tensor& t, const at::Tensor& l, const Label& label) {
      TORCH_CHECK(t.scalar_type() == l.scalar_type(), op_, ": ", label, " has dtype ", t.scalar_type(),
                  ", expected ", l.scalar_type());
      TORCH_CHECK(t.numel() == l.numel(), op_, ": ", label, " has ", t.numel(), " elements, expected ", l.numel());
      if (rules_.dense) {
        TORCH_CHECK(same_layout(t, l), op_, ": ", label, " (sizes ", t.sizes(), ", strides ", t.strides(),
                    ") is not laid out like the matching tensor (sizes ", l.sizes(), ", strides ", l.strides(),
                    "); make both contiguous");
      } else {
        laid_out(t, label);
        TORCH_CHECK(t.sizes() == l.sizes(), op_, ": ", label, " has shape ", t.sizes(), ", ", Label{name_, label.j},
                    " has shape ", l.sizes());
      }
    });
  }
  void placed(const at::Tensor& t, const Label& l) const {
    TORCH_CHECK(t.defined(), op_, ": ", l, " is undefined");
    TORCH_CHECK(t.device().type() == rules_.device, op_, ": ", l, " must be a ", c10::DeviceTypeName(rules_.device),
                " tensor, got one on ", t.device());
    TORCH_CHECK(t.device() == device_, op_, ": ", l, " is on ", t.device(), ", expected ", device_,
                " (one device per call)");
  }
  void laid_out(const at::Tensor& t, const Label& l) const {
    TORCH_CHECK(rules_.dense ? t.is_non_overlapping_and_dense() : t.is_contiguous(), op_, ": ", l,
                rules_.dense ? " must be contiguous (or dense in another layout); call .contiguous() on it"
                             : " must be contiguous");
  }
  // placed() is checked by the caller.
  void values(const at::Tensor& t, const Label& l, int64_t n) const {
    const std::string count = n == 1 ? "one element" : std::to_string(n) + " elements";
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == n && t.is_contiguous(), op_, ": ", l,
                " must be a float32 tensor with ", count, " (contiguous), got ", t.scalar_type(), " of shape ",
                t.sizes(), " and strides ", t.strides());
  }
  // Same position of every element in storage: equal strides on the dims that are not of size 1.
  static bool same_layout(const at::Tensor& a, const at::Tensor& b) {
    if (a.is_contiguous() && b.is_contiguous()) return true;
    if (a.sizes() != b.sizes() || !a.is_non_overlapping_and_dense()) return false;
    for (const auto d : c10::irange(a.dim()))
      if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
    return true;
  }

  const char* op_;
  const char* name_;
  at::TensorList lead_;
  Rules rules_;
  at::Device device_;
};

}  // namespace fastsam
