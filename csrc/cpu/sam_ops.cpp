// CPU kernels of the SAM ops: norm_sq_, row_norm_, perturb_, reflect_, dot_norm_sq_, restore_
// (math: fastsam/ops/reference.py).
// Before any include, so every function of this file is compiled alike: no contraction of a*b+c
// into an fma that torch's kernels do not do (g++ contracts by default, even with -std=c++17).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <torch/library.h>

#include "multi_tensor.h"

namespace fastsam::cpu {
namespace {

// Reductions: every chunk sums into its own doubles (see sum_ranges), and the chunk sums are added
// in chunk order, so a result does not depend on the number of threads.
template <size_t N>
void add_chunk_sums(const at::Tensor& acc, const std::vector<std::array<double, N>>& partial) {
  std::array<double, N> total{};
  for (const auto& p : partial)
    for (size_t s = 0; s < N; ++s) total[s] += p[s];
  float* a = acc.data_ptr<float>();
  for (size_t s = 0; s < N; ++s) a[s] += float(total[s]);
}

// The direction of the SAM step is d = g - sigma * m, with m Friendly SAM's EMA of past grads, when
// `uses_ema` (kDir in the loops); otherwise d is g itself, exactly, and m is not loaded.
bool uses_ema(at::TensorList ema, double sigma) { return !ema.empty() && sigma != 0; }

// rho / (sqrt(norm_sq) + eps) as torch evaluates it on an fp32 tensor: reciprocal(sqrt(n) + eps) * rho.
float step_scale(const at::Tensor& norm_sq, double rho, double eps) {
  return 1.f / (std::sqrt(*norm_sq.data_ptr<float>()) + float(eps)) * float(rho);
}

void norm_sq(const at::Tensor& acc, at::TensorList grads, at::TensorList params, at::TensorList row_scales,
             int64_t mode, double eta, at::TensorList ema, double sigma, const std::optional<at::Tensor>& inv_scale) {
  const Check check("norm_sq_", params, "params");
  check.like(grads, "grads");
  check.optional_like(ema, "ema");
  check.fp32(acc, "acc", 1);
  const auto inv = check.f32_scalar(inv_scale, "inv_scale");
  check_mode("norm_sq_", mode);
  if (mode == kRow) check.per_row(row_scales, "row_scales");
  if (params.empty()) return;
  const auto chunks = make_chunks(params);
  const TArgs ta(params, row_scales, mode, eta);
  const float sigma_f = float(sigma);
  std::vector<std::array<double, 1>> partial(chunks.size());
  dispatch_dtype(params[0].scalar_type(), "norm_sq_", [&](auto io) {
    using IO = decltype(io);
    using S = typename IO::S;
    const auto g = data_ptrs<const S>(grads), w = data_ptrs<const S>(params), m = data_ptrs<const S>(ema);
    with_int<3>(mode, [&](auto mode_c) {
      with_bool(uses_ema(ema, sigma), [&](auto dir_c) {
        with_bool(inv.has_value(), [&](auto scaled_c) {
          constexpr int M = decltype(mode_c)::value;
          constexpr bool kDir = decltype(dir_c)::value, kScaled = decltype(scaled_c)::value;
          run_chunks(chunks, [&, sigma_f](const Chunk& c, int64_t i, auto) {
            const GradIn<IO, kScaled> grad{g[c.t], inv.value_or(1.f)};
            const S *wp = w[c.t], *mp = kDir ? m[c.t] : nullptr;
            double sum = 0;
            for_t_runs<M>(c, ta, [&](int64_t b, int64_t e, float tc) {
              sum += sum_range(b, e, [&](int64_t k) {
                const float gv = grad(k), d = kDir ? gv - sigma_f * IO::ld(mp[k]) : gv;
                const float x = t_op<M>(IO::ld(wp[k]), tc) * d;  // no load of w when T = 1
                return x * x;
              });
            });
            partial[i] = {sum};
          });
        });
      });
    });
  });
  add_chunk_sums(acc, partial);
}

void row_norm(at::TensorList out, at::TensorList params, double eta) {
  const Check check("row_norm_", params, "params");
  check.per_row(out, "out");
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

// What perturb_ writes to the EMA list: nothing (no list), the grad (lmbda = 0: a bit-exact copy, the
// old m is not even loaded unless the direction needs it), or lmbda * m + (1 - lmbda) * g.
enum EmaUpdate : int { kNoEma = 0, kCopyGrad = 1, kBlend = 2 };

void perturb(at::TensorList params, at::TensorList grads, at::TensorList backups, at::TensorList row_scales,
             const at::Tensor& norm_sq, double rho, double eps, int64_t mode, double eta, bool sign,
             at::TensorList ema, double sigma, double lmbda, const std::optional<at::Tensor>& inv_scale,
             const std::optional<at::Tensor>& found_inf) {
  const Check check("perturb_", params, "params");
  check.like(grads, "grads");
  check.like(backups, "backups");
  check.optional_like(ema, "ema");
  check.fp32(norm_sq, "norm_sq", 1);
  check_mode("perturb_", mode);
  if (mode == kRow) check.per_row(row_scales, "row_scales");
  const auto inv = check.f32_scalar(inv_scale, "inv_scale");
  // A skipped step still backs w up: the step's later ops restore w from the backups.
  if (skipped(check.f32_scalar(found_inf, "found_inf"))) return copy_tensors(backups, params);
  if (params.empty()) return;
  const auto chunks = make_chunks(params);
  const TArgs ta(params, row_scales, mode, eta);
  struct {
    float rho, scale, sigma, keep, take;  // keep, take: the weights of m and g in the new EMA
  } const k{float(rho), sign ? 0.f : step_scale(norm_sq, rho, eps), float(sigma), float(lmbda), float(1 - lmbda)};
  const int64_t update = ema.empty() ? kNoEma : lmbda == 0 ? kCopyGrad : kBlend;
  dispatch_dtype(params[0].scalar_type(), "perturb_", [&](auto io) {
    using IO = decltype(io);
    using S = typename IO::S;
    const auto w = data_ptrs<S>(params), b = data_ptrs<S>(backups), m = data_ptrs<S>(ema);
    const auto g = data_ptrs<const S>(grads);
    with_int<3>(mode, [&](auto mode_c) {
      with_bool(sign, [&](auto sign_c) {
        with_int<3>(update, [&](auto update_c) {
          with_bool(uses_ema(ema, sigma), [&](auto dir_c) {
            with_bool(inv.has_value(), [&](auto scaled_c) {
              constexpr int M = decltype(mode_c)::value, kUpdate = decltype(update_c)::value;
              constexpr bool kSign = decltype(sign_c)::value, kDir = decltype(dir_c)::value;
              constexpr bool kScaled = decltype(scaled_c)::value;
              run_chunks(chunks, [&, k](const Chunk& c, int64_t, auto) {
                S *wp = w[c.t], *bp = b[c.t], *mp = kDir || kUpdate != kNoEma ? m[c.t] : nullptr;
                const GradIn<IO, kScaled> grad{g[c.t], inv.value_or(1.f)};
                for_t_runs<M>(c, ta, [&](int64_t lo, int64_t hi, float tc) {
#pragma omp simd
                  for (int64_t i = lo; i < hi; ++i) {
                    const S raw = wp[i];
                    bp[i] = raw;
                    const float x = IO::ld(raw), t = t_op<M>(x, tc), gv = grad(i);
                    const float mv = kDir || kUpdate == kBlend ? IO::ld(mp[i]) : 0.f;
                    const float d = kDir ? gv - k.sigma * mv : gv;
                    float e;
                    if constexpr (kSign) e = (k.rho * t) * (float(d > 0.f) - float(d < 0.f));
                    else e = (k.scale * (t * t)) * d;
                    wp[i] = IO::st(x + e);
                    if constexpr (kUpdate == kCopyGrad) mp[i] = grad.stored(i);
                    if constexpr (kUpdate == kBlend) mp[i] = IO::st(mv * k.keep + gv * k.take);
                  }
                });
              });
            });
          });
        });
      });
    });
  });
}

void reflect(at::TensorList params, at::TensorList backups, at::TensorList dirs, const at::Tensor& norm_sq,
             double rho, double eps, at::TensorList grads, at::TensorList grad_copies,
             const std::optional<at::Tensor>& inv_scale, const std::optional<at::Tensor>& found_inf) {
  const Check check("reflect_", params, "params");
  check.like(backups, "backups");
  check.like(dirs, "dirs");
  check.fp32(norm_sq, "norm_sq", 1);
  // grads and grad_copies come together: a check of both fails on the one that is missing.
  const bool copy = !grads.empty() || !grad_copies.empty();
  if (copy) {
    check.like(grads, "grads");
    check.like(grad_copies, "grad_copies");
  }
  const auto inv = check.f32_scalar(inv_scale, "inv_scale");
  // A skipped step puts w back where it began, and still makes the copies (the grads are kept either way).
  const bool skip = skipped(check.f32_scalar(found_inf, "found_inf"));
  if (params.empty()) return;
  const auto chunks = make_chunks(params);
  const float scale = step_scale(norm_sq, rho, eps);
  dispatch_dtype(params[0].scalar_type(), "reflect_", [&](auto io) {
    using IO = decltype(io);
    using S = typename IO::S;
    const auto w = data_ptrs<S>(params), gc = data_ptrs<S>(grad_copies);
    const auto b = data_ptrs<const S>(backups), d = data_ptrs<const S>(dirs), g = data_ptrs<const S>(grads);
    with_bool(copy, [&](auto copy_c) {
      with_bool(skip, [&](auto skip_c) {
        with_bool(inv.has_value(), [&](auto scaled_c) {
          constexpr bool kCopy = decltype(copy_c)::value, kSkip = decltype(skip_c)::value;
          constexpr bool kScaled = decltype(scaled_c)::value;
          run_chunks(chunks, [&, scale](const Chunk& c, int64_t, auto) {
            S *wp = w[c.t], *cp = kCopy ? gc[c.t] : nullptr;
            const S *bp = b[c.t], *dp = d[c.t];
            const GradIn<IO, kScaled> grad{kCopy ? g[c.t] : nullptr, inv.value_or(1.f)};
#pragma omp simd
            for (int64_t i = c.begin; i < c.end; ++i) {
              wp[i] = kSkip ? bp[i] : IO::st(IO::ld(bp[i]) - scale * IO::ld(dp[i]));
              if constexpr (kCopy) cp[i] = grad.stored(i);
            }
          });
        });
      });
    });
  });
}

void dot_norm_sq(const at::Tensor& acc, at::TensorList a, at::TensorList b) {
  const Check check("dot_norm_sq_", a, "a");
  check.like(b, "b");
  check.fp32(acc, "acc", 2);
  if (a.empty()) return;
  const auto chunks = make_chunks(a);
  std::vector<std::array<double, 2>> partial(chunks.size());
  dispatch_dtype(a[0].scalar_type(), "dot_norm_sq_", [&](auto io) {
    using IO = decltype(io);
    using S = typename IO::S;
    const auto x = data_ptrs<const S>(a), y = data_ptrs<const S>(b);
    run_chunks(chunks, [&](const Chunk& c, int64_t i, auto) {
      const S *xp = x[c.t], *yp = y[c.t];
      partial[i] = sum_ranges(
          c.begin, c.end, [&](int64_t k) { return IO::ld(xp[k]) * IO::ld(yp[k]); },
          [&](int64_t k) {
            const float v = IO::ld(yp[k]);
            return v * v;
          });
    });
  });
  add_chunk_sums(acc, partial);
}

void restore(at::TensorList params, at::TensorList backups) {
  const Check check("restore_", params, "params");
  check.like(backups, "backups");
  copy_tensors(params, backups);
}

}  // namespace
}  // namespace fastsam::cpu

TORCH_LIBRARY_IMPL(fastsam, CPU, m) {
  m.impl("norm_sq_", &fastsam::cpu::norm_sq);
  m.impl("row_norm_", &fastsam::cpu::row_norm);
  m.impl("perturb_", &fastsam::cpu::perturb);
  m.impl("reflect_", &fastsam::cpu::reflect);
  m.impl("dot_norm_sq_", &fastsam::cpu::dot_norm_sq);
  m.impl("restore_", &fastsam::cpu::restore);
}
