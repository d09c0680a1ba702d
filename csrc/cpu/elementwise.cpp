// Per-token KL estimators (forward and backward), PPO reward shaping and masked whitening on
// CPU.
//
// The same math as rlhf_kernels/ops/kl.py and ops/rewards.py (their module docstrings), fp32
// arithmetic on fp32 / fp64 / bf16 / fp16 inputs (each row staged as fp32: one kernel body for
// every combination of dtypes), rows of a (rows, cols) strided view spread over threads. Each is one pass over its inputs (reward shaping reads the mask twice: once right to
// left to find the row's last valid token, once to write). Whitening reduces over the whole
// tensor: fixed 4096-element chunks (so the bits do not depend on the thread count), fp64 sums,
// the mean first and then the centred sum of squares (no E[x^2] - E[x]^2 cancellation).
#include "common.h"

#include <vector>

namespace rlhf_native {
namespace {

inline float kl_estimate(float d, int64_t estimator) {
  switch (estimator) {
    case 0: return d;
    case 1: return 0.5f * d * d;
    case 2: return k3(d);  // common.h: a few ulps also where |d| << 1
    default: return std::fabs(d);
  }
}

// clamp to [-bound, bound] that keeps a NaN (as torch.clamp)
inline float clamp_sym(float x, float bound) { return std::min(std::max(x, -bound), bound); }

int64_t grain_for(int64_t n_cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n_cols)); }

// The skeleton of the row kernels below: body(row, lp, rp, scratch) for every row, rows over
// threads, with the row of logp and of ref_logp as contiguous fp32 (f32_row: their own memory
// when they are contiguous fp32, else converted into a per-task buffer) and a scratch row of
// n_cols floats. One fp32 body per kernel, whatever the inputs' dtypes.
template <typename F>
void for_each_row(const Strided2d& logp, const Strided2d& ref, int64_t n_rows, int64_t n_cols,
                  F&& body) {
  at::parallel_for(0, n_rows, grain_for(n_cols), [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(3 * static_cast<size_t>(n_cols));
    for (int64_t row = begin; row < end; ++row) {
      body(row, f32_row(logp, row, 0, n_cols, buffer.data()),
           f32_row(ref, row, 0, n_cols, buffer.data() + n_cols), buffer.data() + 2 * n_cols);
    }
  });
}

}  // namespace

void kl_fwd(const Strided2d& logp, const Strided2d& ref, float* out, int64_t out_stride_row,
            int64_t n_rows, int64_t n_cols, const KlOptions& o) {
  for_each_row(logp, ref, n_rows, n_cols, [&](int64_t row, const float* lp, const float* rp,
                                               float*) {
    float* op = out + row * out_stride_row;
    for (int64_t t = 0; t < n_cols; ++t) {
      float d = lp[t] - rp[t];
      if (o.has_log_ratio_clamp) d = clamp_sym(d, o.log_ratio_clamp);
      float kl = kl_estimate(d, o.estimator);
      if (o.has_clamp) kl = clamp_sym(kl, o.clamp);
      op[t] = kl;
    }
  });
}

void kl_bwd(const Strided2d& grad, const Strided2d& logp, const Strided2d& ref, void* grad_logp,
            void* grad_ref, int64_t out_stride_row, int64_t n_rows, int64_t n_cols,
            const KlOptions& o) {
  // d KL / d logp goes to scratch (then rounded to grad_logp's dtype and -scratch to grad_ref's),
  // or straight into an fp32 output
  const bool direct = grad_logp ? logp.dtype == Dtype::f32 : ref.dtype == Dtype::f32;
  const bool negate = grad_logp == nullptr;
  for_each_row(logp, ref, n_rows, n_cols, [&](int64_t row, const float* lp, const float* rp,
                                               float* scratch) {
    const float* gp = static_cast<const float*>(grad.data) + row * grad.stride_row;
    char* gl = grad_logp ? static_cast<char*>(grad_logp) +
                               row * out_stride_row * element_size(logp.dtype) : nullptr;
    char* gr = grad_ref ? static_cast<char*>(grad_ref) +
                              row * out_stride_row * element_size(ref.dtype) : nullptr;
    float* dst = direct ? reinterpret_cast<float*>(negate ? gr : gl) : scratch;
    for (int64_t t = 0; t < n_cols; ++t) {
      float g = gp[t * grad.stride_col];
      float d = lp[t] - rp[t];
      // torch.clamp passes the gradient where lo <= x <= hi (bounds included)
      if (o.has_log_ratio_clamp) {
        if (!(d >= -o.log_ratio_clamp && d <= o.log_ratio_clamp)) g = 0.f;
        d = clamp_sym(d, o.log_ratio_clamp);
      }
      if (o.has_clamp) {
        const float kl = kl_estimate(d, o.estimator);
        if (!(kl >= -o.clamp && kl <= o.clamp)) g = 0.f;
      }
      float dkl;
      switch (o.estimator) {
        case 0: dkl = g; break;
        case 1: dkl = g * d; break;
        case 2: dkl = g * k3_grad(d); break;  // common.h: 1 - e^-d, a few ulps at any d
        default: dkl = d > 0.f ? g : (d < 0.f ? -g : 0.f);
      }
      dst[t] = negate ? -dkl : dkl;
    }
    if (gl && !direct) convert_from_f32(dst, gl, logp.dtype, n_cols);
    if (gr) {
      if (!negate) {  // grad_ref = -grad_logp, rounded to ref's dtype
        for (int64_t t = 0; t < n_cols; ++t) scratch[t] = -dst[t];
        convert_from_f32(scratch, gr, ref.dtype, n_cols);
      } else if (!direct) {
        convert_from_f32(dst, gr, ref.dtype, n_cols);
      }
    }
  });
}

void shape_rewards(const float* scores, const Strided2d& logp, const Strided2d& ref,
                   const uint8_t* mask, int64_t mask_stride_row, int64_t mask_stride_col,
                   const int64_t* score_index, float* out, int64_t out_stride_row,
                   int64_t n_rows, int64_t n_cols, const RewardOptions& o) {
  for_each_row(logp, ref, n_rows, n_cols, [&](int64_t row, const float* lp, const float* rp,
                                               float*) {
    const uint8_t* m = mask + row * mask_stride_row;
    float* op = out + row * out_stride_row;
    float score = scores[row];
    if (o.has_score_clip) score = clamp_sym(score, o.score_clip);
    int64_t target = -1;  // the column that receives the score (-1: none)
    if (score_index) {
      target = score_index[row];
      if (target < 0 || target >= n_cols) {  // never lost silently: a NaN row
        std::fill(op, op + n_cols, kNaN);
        return;
      }
    } else {
      for (int64_t t = n_cols - 1; t >= 0; --t) {
        if (m[t * mask_stride_col] != 0) {
          target = t;
          break;
        }
      }
    }
    for (int64_t t = 0; t < n_cols; ++t) {
      float r = 0.f;
      if (m[t * mask_stride_col] != 0) {
        float kl = kl_estimate(lp[t] - rp[t], o.estimator);
        if (o.has_kl_clamp) kl = clamp_sym(kl, o.kl_clamp);
        r = -o.kl_coef * kl;
      }
      if (t == target) r += score;
      op[t] = r;
    }
  });
}

void masked_whiten(const void* x, Dtype dtype, const uint8_t* mask, int64_t n, bool shift_mean,
                   bool unbiased, float eps, float* out) {
  constexpr int64_t kChunk = 4096;
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> sums(n_chunks), counts(n_chunks), squares(n_chunks);
  const Strided2d xs{x, dtype, 0, 1};  // read kChunk elements at a time as fp32 (f32_row)
  // each kChunk-element block of x staged as fp32, with its part of the mask, on some thread
  auto over_chunks = [&](auto&& body) {
    at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(kChunk);
      for (int64_t c = begin; c < end; ++c) {
        const int64_t first = c * kChunk, count = std::min(kChunk, n - first);
        body(c, f32_row(xs, 0, first, count, buffer.data()), mask ? mask + first : nullptr,
             count);
      }
    });
  };
  over_chunks([&](int64_t c, const float* v, const uint8_t* m, int64_t count) {
    double sum = 0.0, valid = 0.0;
    for (int64_t j = 0; j < count; ++j) {
      if (m == nullptr || m[j] != 0) {
        sum += static_cast<double>(v[j]);
        valid += 1.0;
      }
    }
    sums[c] = sum;
    counts[c] = valid;
  });
  double total = 0.0, count = 0.0;
  for (int64_t c = 0; c < n_chunks; ++c) {
    total += sums[c];
    count += counts[c];
  }
  const double mean = total / std::max(count, 1.0);
  over_chunks([&](int64_t c, const float* v, const uint8_t* m, int64_t count) {
    double sq = 0.0;
    for (int64_t j = 0; j < count; ++j) {
      if (m == nullptr || m[j] != 0) {
        const double d = static_cast<double>(v[j]) - mean;
        sq += d * d;
      }
    }
    squares[c] = sq;
  });
  double m2 = 0.0;
  for (int64_t c = 0; c < n_chunks; ++c) m2 += squares[c];
  const double var = m2 / std::max(unbiased ? count - 1.0 : count, 1.0);
  const double rstd = 1.0 / std::sqrt(var + static_cast<double>(eps));
  over_chunks([&](int64_t c, const float* v, const uint8_t* m, int64_t count) {
    float* o = out + c * kChunk;
    for (int64_t j = 0; j < count; ++j) {
      double w = (static_cast<double>(v[j]) - mean) * rstd;
      if (!shift_mean) w += mean;
      o[j] = (m == nullptr || m[j] != 0) ? static_cast<float>(w) : 0.f;
    }
  });
}

}  // namespace rlhf_native
