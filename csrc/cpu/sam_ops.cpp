// CPU kernels of the SAM ops: norm_sq_, row_norm_, perturb_, restore_ (math: fastsam/ops/reference.py).
// Before any include, so every function of this file is compiled alike: no contraction of a*b+c
// into an fma that torch's kernels do not do (g++ contracts by default, even with -std=c++17).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <torch/library.h>

#include "multi_tensor.h"

namespace fastsam::cpu {
namespace {

// Reductions: every chunk sums into its own double (see sum_range), and the chunk sums are added in
// chunk order, so a result does not depend on the number of threads.
void norm_sq(const at::Tensor& acc, at::TensorList grads, at::TensorList params, at::TensorList row_scales,
             int64_t mode, double eta) {
  const Check check("norm_sq_", params, "params");
  check.like(grads, "grads");
  check.f32_scalar(acc, "acc");
  check.mode(mode);
  if (mode == kRow) check.row_vectors(row_scales, "row_scales");
  if (params.empty()) return;
  const auto chunks = make_chunks(params);
  const TArgs ta(params, row_scales, mode, eta);
  std::vector<double> partial(chunks.size());
  dispatch_dtype(params[0].scalar_type(), "norm_sq_", [&](auto io) {
    using IO = decltype(io);
    using S = typename IO::S;
    const auto g = data_ptrs<const S>(grads), w = data_ptrs<const S>(params);
    with_int<3>(mode, [&](auto m) {
      constexpr int M = decltype(m)::value;
      run_chunks(chunks, [&](const Chunk& c, int64_t i, auto) {
        const S *gp = g[c.t], *wp = w[c.t];
        double sum = 0;
        for_t_runs<M>(c, ta, [&](int64_t b, int64_t e, float tc) {
          sum += sum_range(b, e, [&](int64_t k) {
            const float x = t_op<M>(IO::ld(wp[k]), tc) * IO::ld(gp[k]);  // no load of w when T = 1
            return x * x;
          });
        });
        partial[i] = sum;
      });
    });
  });
  double total = 0;
  for (const double p : partial) total += p;
  float* a = acc.data_ptr<float>();
  *a += float(total);
}

void row_norm(at::TensorList out, at::TensorList params, double eta) {
  const Check check("row_norm_", params, "params");
  check.row_vectors(out, "out");
  if (params.empty()) return;
  const float eta_f = float(eta);
  std::vector<int64_t> inner(params.size());
  for (const auto j : c10::irange(params.size()))
    inner[j] = rows_of(params[j]) > 0 ? params[j].numel() / rows_of(params[j]) : 0;
  // A chunk holds whole rows, or one piece of a row longer than a chunk (summed in a second stage).
  const auto chunks = make_chunks(params, &inner);
  const auto o = data_ptrs<float>(out);
  const auto finish = [eta_f](double sum_sq) { return std::sqrt(float(sum_sq)) + eta_f; };
  std::vector<double> partial(chunks.size());
  dispatch_dtype(params[0].scalar_type(), "row_norm_", [&](auto io) {
    using IO = decltype(io);
    using S = typename IO::S;
    const auto w = data_ptrs<const S>(params);
    run_chunks(chunks, [&](const Chunk& c, int64_t i, auto) {
      const S* wp = w[c.t];
      const int64_t n = inner[c.t];
      for (int64_t b = c.begin; b < c.end; b += n) {
        const double s = sum_range(b, std::min(b + n, c.end), [&](int64_t k) {
          const float x = IO::ld(wp[k]);
          return x * x;
        });
        if (n > kChunk) partial[i] = s;
        else o[c.t][b / n] = finish(s);
      }
    });
  });
  double row_sum = 0;
  for (const auto i : c10::irange(chunks.size())) {
    const Chunk& c = chunks[i];
    const int64_t n = inner[c.t];
    if (n <= kChunk) continue;
    row_sum += partial[i];
    if (c.end % n == 0) {
      o[c.t][c.end / n - 1] = finish(row_sum);
      row_sum = 0;
    }
  }
  for (const auto j : c10::irange(params.size()))  // rows of no elements have norm 0
    if (params[j].numel() == 0) std::fill(o[j], o[j] + out[j].numel(), eta_f);
}

void perturb(at::TensorList params, at::TensorList grads, at::TensorList backups, at::TensorList row_scales,
             const at::Tensor& norm_sq, double rho, double eps, int64_t mode, double eta, bool sign) {
  const Check check("perturb_", params, "params");
  check.like(grads, "grads");
  check.like(backups, "backups");
  check.f32_scalar(norm_sq, "norm_sq");
  check.mode(mode);
  if (mode == kRow) check.row_vectors(row_scales, "row_scales");
  if (params.empty()) return;
  const auto chunks = make_chunks(params);
  const TArgs ta(params, row_scales, mode, eta);
  const float rho_f = float(rho);
  // torch evaluates rho / (sqrt(n) + eps) on an fp32 tensor as reciprocal(sqrt(n) + eps) * rho.
  const float scale = sign ? 0.f : 1.f / (std::sqrt(*norm_sq.data_ptr<float>()) + float(eps)) * rho_f;
  dispatch_dtype(params[0].scalar_type(), "perturb_", [&](auto io) {
    using IO = decltype(io);
    using S = typename IO::S;
    const auto w = data_ptrs<S>(params), b = data_ptrs<S>(backups);
    const auto g = data_ptrs<const S>(grads);
    with_int<3>(mode, [&](auto m) {
      with_bool(sign, [&](auto sign_c) {
        constexpr int M = decltype(m)::value;
        constexpr bool kSign = decltype(sign_c)::value;
        run_chunks(chunks, [&, rho_f, scale](const Chunk& c, int64_t, auto) {
          S *wp = w[c.t], *bp = b[c.t];
          const S* gp = g[c.t];
          for_t_runs<M>(c, ta, [&](int64_t lo, int64_t hi, float tc) {
#pragma omp simd
            for (int64_t k = lo; k < hi; ++k) {
              const S raw = wp[k];
              bp[k] = raw;
              const float x = IO::ld(raw), t = t_op<M>(x, tc), gv = IO::ld(gp[k]);
              float e;
              if constexpr (kSign) e = (rho_f * t) * (float(gv > 0.f) - float(gv < 0.f));
              else e = (scale * (t * t)) * gv;
              wp[k] = IO::st(x + e);
            }
          });
        });
      });
    });
  });
}

void restore(at::TensorList params, at::TensorList backups) {
  const Check check("restore_", params, "params");
  check.like(backups, "backups");
  if (params.empty()) return;
  const int64_t size = params[0].element_size();
  const auto w = data_ptrs<char>(params);
  const auto b = data_ptrs<const char>(backups);
  run_chunks(make_chunks(params), [&](const Chunk& c, int64_t, auto) {
    std::memcpy(w[c.t] + c.begin * size, b[c.t] + c.begin * size, (c.end - c.begin) * size);
  });
}

}  // namespace
}  // namespace fastsam::cpu

TORCH_LIBRARY_IMPL(fastsam, CPU, m) {
  m.impl("norm_sq_", &fastsam::cpu::norm_sq);
  m.impl("row_norm_", &fastsam::cpu::row_norm);
  m.impl("perturb_", &fastsam::cpu::perturb);
  m.impl("restore_", &fastsam::cpu::restore);
}
