// CPU kernels of the fused restore + optimizer step ops: restore_sgd_, restore_adam_
// (math: fastsam/ops/reference.py). One pass per element: w is read from the backup, never from
// params. Where ATen fuses a multiply-add (add with alpha, lerp, addcmul) the kernels do too, and
// they keep ATen's order of the other fp32 operations, so fp32 results match torch's bit for bit
// where both use FMA. Adam's sqrt is the correctly rounded one; torch's (MKL VML on x86) is one ulp
// off for ~1% of inputs. The Adam loop vectorizes only with -fno-math-errno (sqrt sets errno).
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

void restore_sgd(at::TensorList params, at::TensorList grads, at::TensorList backups,
                 at::TensorList momentum_buffers, double lr, double weight_decay, double momentum, double dampening,
                 bool nesterov, bool maximize, bool init_momentum) {
  const Check check("restore_sgd_", params, "params");
  check.like(grads, "grads");
  check.like(backups, "backups");
  if (momentum != 0) check.like(momentum_buffers, "momentum_buffers");
  if (params.empty()) return;
  const auto chunks = make_chunks(params);
  struct {
    float gsign, wd, mom, damp, neg_lr;
  } const k{maximize ? -1.f : 1.f, float(weight_decay), float(momentum), float(1 - dampening), float(-lr)};
  // 0: no momentum; 1: first step, buf = d_p; 2: buf = momentum * buf + (1 - dampening) * d_p
  const int64_t buf_kind = momentum == 0 ? 0 : init_momentum ? 1 : 2;
  dispatch_dtype(params[0].scalar_type(), "restore_sgd_", [&](auto io) {
    using IO = decltype(io);
    using S = typename IO::S;
    const auto w = data_ptrs<S>(params), m = data_ptrs<S>(momentum_buffers);
    const auto g = data_ptrs<const S>(grads), b = data_ptrs<const S>(backups);
    with_int<3>(buf_kind, [&](auto buf_c) {
      with_bool(weight_decay != 0, [&](auto wd_c) {
        with_bool(nesterov && momentum != 0, [&](auto nesterov_c) {
          constexpr int kBuf = decltype(buf_c)::value;
          constexpr bool kWd = decltype(wd_c)::value, kNesterov = decltype(nesterov_c)::value;
          run_chunks(chunks, [&, k](const Chunk& c, int64_t, auto isa) {
            S* wp = w[c.t];
            S* mp = kBuf ? m[c.t] : nullptr;
            const S *gp = g[c.t], *bp = b[c.t];
#pragma omp simd
            for (int64_t i = c.begin; i < c.end; ++i) {
              const float x = IO::ld(bp[i]);
              float d = IO::ld(gp[i]) * k.gsign;
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
}

void restore_adam(at::TensorList params, at::TensorList grads, at::TensorList backups, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, double lr, double beta1, double beta2, double weight_decay, double eps,
                  bool decoupled, bool maximize, double step) {
  const Check check("restore_adam_", params, "params");
  check.like(grads, "grads");
  check.like(backups, "backups");
  check.like(exp_avgs, "exp_avgs");
  check.like(exp_avg_sqs, "exp_avg_sqs");
  if (params.empty()) return;
  const auto chunks = make_chunks(params);
  // Scalars as torch.optim.Adam derives them: in double, then rounded to fp32 where a tensor op uses them.
  const double bias_correction1 = 1 - std::pow(beta1, step);
  const double bias_correction2_sqrt = std::sqrt(1 - std::pow(beta2, step));
  const float lerp_weight = float(1 - beta1);
  // ATen's lerp: start + w * (end - start) for |w| < 0.5, else end + (w - 1) * (end - start).
  const bool small_weight = std::fabs(lerp_weight) < 0.5f;
  struct {
    float gsign, wd, decay, lerp_coeff, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size;
  } const k{maximize ? -1.f : 1.f,
            float(weight_decay),
            float(1 - lr * weight_decay),
            small_weight ? lerp_weight : lerp_weight - 1.f,
            float(beta2),
            float(1 - beta2),
            float(bias_correction2_sqrt),
            float(eps),
            float(-(lr / bias_correction1))};
  // 0: none; 1: L2 on the gradient (Adam); 2: decoupled decay of w (AdamW)
  const int64_t wd_kind = weight_decay == 0 ? 0 : decoupled ? 2 : 1;
  dispatch_dtype(params[0].scalar_type(), "restore_adam_", [&](auto io) {
    using IO = decltype(io);
    using S = typename IO::S;
    const auto w = data_ptrs<S>(params), m = data_ptrs<S>(exp_avgs), v = data_ptrs<S>(exp_avg_sqs);
    const auto g = data_ptrs<const S>(grads), b = data_ptrs<const S>(backups);
    with_int<3>(wd_kind, [&](auto wd_c) {
      with_bool(small_weight, [&](auto small_c) {
        constexpr int kWd = decltype(wd_c)::value;
        constexpr bool kSmall = decltype(small_c)::value;
        run_chunks(chunks, [&, k](const Chunk& c, int64_t, auto isa) {
          S *wp = w[c.t], *mp = m[c.t], *vp = v[c.t];
          const S *gp = g[c.t], *bp = b[c.t];
#pragma omp simd
          for (int64_t i = c.begin; i < c.end; ++i) {
            float x = IO::ld(bp[i]);
            float gv = IO::ld(gp[i]) * k.gsign;
            if constexpr (kWd == 1) gv = isa.fma(x, k.wd, gv);
            if constexpr (kWd == 2) x = x * k.decay;
            const float m0 = IO::ld(mp[i]);
            const float m1 = isa.fma(k.lerp_coeff, gv - m0, kSmall ? m0 : gv);
            const float v1 = isa.fma(k.one_minus_beta2 * gv, gv, IO::ld(vp[i]) * k.beta2);
            mp[i] = IO::st(m1);
            vp[i] = IO::st(v1);
            const float denom = std::sqrt(v1) / k.bc2_sqrt + k.eps;
            wp[i] = IO::st(x + k.neg_step_size * m1 / denom);
          }
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
