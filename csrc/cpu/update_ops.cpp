// CPU kernels of the fused restore + optimizer step ops: restore_sgd_, restore_adam_
// (math: fastsam/ops/reference.py). One pass per element: w is read from the backup, and from params
// only when there is no backup to restore. Where ATen fuses a multiply-add (add with alpha, lerp,
// addcmul) the kernels do too, and they keep ATen's order of the other fp32 operations, so fp32
// results match torch's bit for bit where both use FMA. Adam's sqrt is the correctly rounded one;
// torch's (MKL VML on x86) is one ulp off for ~1% of inputs. The Adam loop vectorizes only with
// -fno-math-errno (sqrt sets errno).
//
// Before any include, so every function of this file is compiled alike: no contraction of a*b+c
// into an fma that torch's kernels do not do (g++ contracts by default, even with -std=c++17).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <torch/library.h>

#include "multi_tensor.h"

namespace fastsam::cpu {
namespace {

// The grad of one tensor in a loop compiled for 1 + kExtra terms: g0 c0 + g1 c1 + g2 c2, each product
// rounded, as reference._grad_combination does it with separate tensor ops (so no fma).
template <class IO, int kExtra>
struct Grad {
  const typename IO::S *g0, *g1, *g2;
  float c0, c1, c2;  // by value: a pointer to them could alias the fp32 stores of the loop
  float operator()(int64_t i) const {
    float d = IO::ld(g0[i]) * c0;
    if constexpr (kExtra > 0) d = d + IO::ld(g1[i]) * c1;
    if constexpr (kExtra > 1) d = d + IO::ld(g2[i]) * c2;
    return d;
  }
};

// The grad a fused update uses: coef[0] g + coef[1] g_b + coef[2] g_c, or g without coef; an empty list
// drops its term. The lists given are packed first (kExtra of them besides g), and maximize's sign is
// folded into the coefficients, which is exact: negation commutes with every rounding. inv_scale, which
// unscales g only (g_b and g_c were kept unscaled), is folded into g's coefficient too, at no cost in the
// loop: g (inv_scale coef[0]) is the reference's (g inv_scale) coef[0] to rounding, and exact without coef.
class GradTerms {
 public:
  GradTerms(const Check& check, at::TensorList grads, at::TensorList grads_b, at::TensorList grads_c,
            const std::optional<at::Tensor>& coef, const std::optional<at::Tensor>& inv_scale, bool maximize) {
    check.like(grads, "grads");
    check.optional_like(grads_b, "grads_b");
    check.optional_like(grads_c, "grads_c");
    const float sign = maximize ? -1.f : 1.f, inv = check.f32_scalar(inv_scale, "inv_scale").value_or(1.f);
    if (!coef) {
      add(grads, inv * sign);
      return;
    }
    check.fp32(*coef, "coef", 3);
    const float* cf = coef->data_ptr<float>();
    add(grads, cf[0] * inv * sign);
    if (!grads_b.empty()) add(grads_b, cf[1] * sign);
    if (!grads_c.empty()) add(grads_c, cf[2] * sign);
  }

  int64_t extra() const { return n_ - 1; }

  template <class IO, int kExtra>
  Grad<IO, kExtra> of(int64_t t) const {
    using S = typename IO::S;
    const auto p = [&](int n) { return n <= kExtra ? static_cast<const S*>(ptrs_[n][t]) : nullptr; };
    return {p(0), p(1), p(2), coef_[0], coef_[1], coef_[2]};
  }

 private:
  void add(at::TensorList ts, float c) {
    ptrs_[n_] = data_ptrs<const void>(ts);
    coef_[n_++] = c;
  }

  std::vector<const void*> ptrs_[3];
  float coef_[3] = {};
  int n_ = 0;
};

// A skipped step (found_inf) only undoes the perturbation: w <- backup, and nothing without backups.
void restore_only(at::TensorList params, at::TensorList backups) {
  if (!backups.empty()) copy_tensors(params, backups);
}

void restore_sgd(at::TensorList params, at::TensorList grads, at::TensorList backups,
                 at::TensorList momentum_buffers, double lr, double weight_decay, double momentum, double dampening,
                 bool nesterov, bool maximize, bool init_momentum, at::TensorList grads_b, at::TensorList grads_c,
                 const std::optional<at::Tensor>& coef, const std::optional<at::Tensor>& inv_scale,
                 const std::optional<at::Tensor>& found_inf) {
  const Check check("restore_sgd_", params, "params");
  const GradTerms terms(check, grads, grads_b, grads_c, coef, inv_scale, maximize);
  check.optional_like(backups, "backups");
  if (momentum != 0) check.like(momentum_buffers, "momentum_buffers");
  if (skipped(check.f32_scalar(found_inf, "found_inf"))) return restore_only(params, backups);
  if (params.empty()) return;
  const auto chunks = make_chunks(params);
  struct {
    float wd, mom, damp, neg_lr;
  } const k{float(weight_decay), float(momentum), float(1 - dampening), float(-lr)};
  // 0: no momentum; 1: first step, buf = d_p; 2: buf = momentum * buf + (1 - dampening) * d_p
  const int64_t buf_kind = momentum == 0 ? 0 : init_momentum ? 1 : 2;
  dispatch_dtype(params[0].scalar_type(), "restore_sgd_", [&](auto io) {
    using IO = decltype(io);
    using S = typename IO::S;
    const auto w = data_ptrs<S>(params), m = data_ptrs<S>(momentum_buffers);
    const auto b = data_ptrs<const S>(backups.empty() ? params : backups);
    with_int<3>(buf_kind, [&](auto buf_c) {
      with_bool(weight_decay != 0, [&](auto wd_c) {
        with_bool(nesterov && momentum != 0, [&](auto nesterov_c) {
          with_int<3>(terms.extra(), [&](auto extra_c) {
            constexpr int kBuf = decltype(buf_c)::value, kExtra = decltype(extra_c)::value;
            constexpr bool kWd = decltype(wd_c)::value, kNesterov = decltype(nesterov_c)::value;
            run_chunks(chunks, [&, k](const Chunk& c, int64_t, auto isa) {
              S* wp = w[c.t];
              S* mp = kBuf ? m[c.t] : nullptr;
              const S* bp = b[c.t];
              const auto grad = terms.of<IO, kExtra>(c.t);
#pragma omp simd
              for (int64_t i = c.begin; i < c.end; ++i) {
                const float x = IO::ld(bp[i]);
                float d = grad(i);
                if constexpr (kWd) d = isa.fma(x, k.wd, d);
                if constexpr (kBuf != 0) {
                  const float buf = kBuf == 1 ? d : isa.fma(d, k.damp, IO::ld(mp[i]) * k.mom);
                  mp[i] = IO::st(buf);
                  d = kNesterov ? isa.fma(buf, k.mom, d) : buf;  // the unrounded buffer, as in torch
                }
                wp[i] = IO::st(isa.fma(d, k.neg_lr, x));
              }
            });
          });
        });
      });
    });
  });
}

void restore_adam(at::TensorList params, at::TensorList grads, at::TensorList backups, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, double lr, double beta1, double beta2, double weight_decay, double eps,
                  bool decoupled, bool maximize, double step, at::TensorList grads_b, at::TensorList grads_c,
                  const std::optional<at::Tensor>& coef, const std::optional<at::Tensor>& inv_scale,
                  const std::optional<at::Tensor>& found_inf, at::TensorList steps) {
  const Check check("restore_adam_", params, "params");
  const GradTerms terms(check, grads, grads_b, grads_c, coef, inv_scale, maximize);
  check.optional_like(backups, "backups");
  check.like(exp_avgs, "exp_avgs");
  check.like(exp_avg_sqs, "exp_avg_sqs");
  const std::vector<float> step_counts = check.f32_scalars(steps, "steps");
  if (skipped(check.f32_scalar(found_inf, "found_inf"))) return restore_only(params, backups);
  if (params.empty()) return;
  const auto chunks = make_chunks(params);
  // Scalars as torch.optim.Adam derives them: in double, then rounded to fp32 where a tensor op uses them.
  // The step-dependent ones are per tensor: with `steps`, each tensor has its own count (torch's
  // capturable layout, where a parameter that joined later has taken fewer steps).
  struct BiasCorrection {
    float bc2_sqrt, neg_step_size;
  };
  std::vector<BiasCorrection> corrections;
  for (const auto j : c10::irange(params.size())) {
    const double s = step_counts.empty() ? step : double(step_counts[j]);
    corrections.push_back({float(std::sqrt(1 - std::pow(beta2, s))), float(-(lr / (1 - std::pow(beta1, s))))});
  }
  const float lerp_weight = float(1 - beta1);
  // ATen's lerp: start + w * (end - start) for |w| < 0.5, else end + (w - 1) * (end - start).
  const bool small_weight = std::fabs(lerp_weight) < 0.5f;
  struct {
    float wd, decay, lerp_coeff, beta2, one_minus_beta2, eps;
  } const k{float(weight_decay),
            float(1 - lr * weight_decay),
            small_weight ? lerp_weight : lerp_weight - 1.f,
            float(beta2),
            float(1 - beta2),
            float(eps)};
  // 0: none; 1: L2 on the gradient (Adam); 2: decoupled decay of w (AdamW)
  const int64_t wd_kind = weight_decay == 0 ? 0 : decoupled ? 2 : 1;
  dispatch_dtype(params[0].scalar_type(), "restore_adam_", [&](auto io) {
    using IO = decltype(io);
    using S = typename IO::S;
    const auto w = data_ptrs<S>(params), m = data_ptrs<S>(exp_avgs), v = data_ptrs<S>(exp_avg_sqs);
    const auto b = data_ptrs<const S>(backups.empty() ? params : backups);
    with_int<3>(wd_kind, [&](auto wd_c) {
      with_bool(small_weight, [&](auto small_c) {
        with_int<3>(terms.extra(), [&](auto extra_c) {
          constexpr int kWd = decltype(wd_c)::value, kExtra = decltype(extra_c)::value;
          constexpr bool kSmall = decltype(small_c)::value;
          run_chunks(chunks, [&, k](const Chunk& c, int64_t, auto isa) {
            S *wp = w[c.t], *mp = m[c.t], *vp = v[c.t];
            const S* bp = b[c.t];
            const auto grad = terms.of<IO, kExtra>(c.t);
            const BiasCorrection bc = corrections[c.t];  // a copy: the loop's stores cannot alias it
#pragma omp simd
            for (int64_t i = c.begin; i < c.end; ++i) {
              float x = IO::ld(bp[i]);
              float gv = grad(i);
              if constexpr (kWd == 1) gv = isa.fma(x, k.wd, gv);
              if constexpr (kWd == 2) x = x * k.decay;
              const float m0 = IO::ld(mp[i]);
              const float m1 = isa.fma(k.lerp_coeff, gv - m0, kSmall ? m0 : gv);
              const float v1 = isa.fma(k.one_minus_beta2 * gv, gv, IO::ld(vp[i]) * k.beta2);
              mp[i] = IO::st(m1);
              vp[i] = IO::st(v1);
              const float denom = std::sqrt(v1) / bc.bc2_sqrt + k.eps;
              wp[i] = IO::st(x + bc.neg_step_size * m1 / denom);
            }
          });
        });
      });
    });
  });
}

}  // namespace
}  // namespace fastsam::cpu

TORCH_LIBRARY_IMPL(fastsam, CPU, m) {
  m.impl("restore_sgd_", &fastsam::cpu::restore_sgd);
  m.impl("restore_adam_", &fastsam::cpu::restore_adam);
}
