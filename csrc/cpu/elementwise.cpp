// Per-token KL estimators (forward and backward), PPO reward shaping and masked whitening on
// CPU.
//
// The same math as rlhf_kernels/ops/kl.py and ops/rewards.py (their module docstrings), fp32
// arithmetic on fp32 / bf16 / fp16 inputs, rows of a (rows, cols) strided view spread over
// threads. Each is one pass over its inputs (reward shaping reads the mask twice: once right to
// left to find the row's last valid token, once to write). Whitening reduces over the whole
// tensor: fixed 4096-element chunks (so the bits do not depend on the thread count), fp64 sums,
// the mean first and then the centred sum of squares (no E[x^2] - E[x]^2 cancellation).
#include "common.h"

#include <type_traits>
#include <vector>

namespace rlhf_native {
namespace {

inline float kl_estimate(float d, int64_t estimator) {
  switch (estimator) {
    case 0: return d;
    case 1: return 0.5f * d * d;
    case 2: return std::exp(-d) + d - 1.f;
    default: return std::fabs(d);
  }
}

// clamp to [-bound, bound] that keeps a NaN (as torch.clamp)
inline float clamp_sym(float x, float bound) { return std::min(std::max(x, -bound), bound); }

int64_t grain_for(int64_t n_cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n_cols)); }

// The skeleton of the row kernels below: resolve the element types of two inputs (logp's and
// ref_logp's) at run time, then call body(L*, R*, row) for every row, rows over threads.
// body is a generic lambda; its two typed null pointers name the types (decltype).
template <typename F>
void for_each_row(Dtype first, Dtype second, int64_t n_rows, int64_t n_cols, F&& body) {
  dispatch_float(first, [&](auto* first_tag) {
    dispatch_float(second, [&](auto* second_tag) {
      at::parallel_for(0, n_rows, grain_for(n_cols), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) body(first_tag, second_tag, row);
      });
    });
  });
}

template <typename P>
using elem_t = std::remove_pointer_t<P>;

}  // namespace

void kl_fwd(const Strided2d& logp, const Strided2d& ref, float* out, int64_t out_stride_row,
            int64_t n_rows, int64_t n_cols, const KlOptions& o) {
  for_each_row(logp.dtype, ref.dtype, n_rows, n_cols, [&](auto* ltag, auto* rtag, int64_t row) {
    using L = elem_t<decltype(ltag)>;
    using R = elem_t<decltype(rtag)>;
    const L* lp = static_cast<const L*>(logp.data) + row * logp.stride_row;
    const R* rp = static_cast<const R*>(ref.data) + row * ref.stride_row;
    float* op = out + row * out_stride_row;
    for (int64_t t = 0; t < n_cols; ++t) {
      float d = to_f32(lp[t * logp.stride_col]) - to_f32(rp[t * ref.stride_col]);
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
  for_each_row(logp.dtype, ref.dtype, n_rows, n_cols, [&](auto* ltag, auto* rtag, int64_t row) {
    using L = elem_t<decltype(ltag)>;
    using R = elem_t<decltype(rtag)>;
    const float* gp = static_cast<const float*>(grad.data) + row * grad.stride_row;
    const L* lp = static_cast<const L*>(logp.data) + row * logp.stride_row;
    const R* rp = static_cast<const R*>(ref.data) + row * ref.stride_row;
    L* gl = grad_logp ? static_cast<L*>(grad_logp) + row * out_stride_row : nullptr;
    R* gr = grad_ref ? static_cast<R*>(grad_ref) + row * out_stride_row : nullptr;
    for (int64_t t = 0; t < n_cols; ++t) {
      float g = gp[t * grad.stride_col];
      float d = to_f32(lp[t * logp.stride_col]) - to_f32(rp[t * ref.stride_col]);
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
        case 2: dkl = g * (1.f - std::exp(-d)); break;
        default: dkl = d > 0.f ? g : (d < 0.f ? -g : 0.f);
      }
      if (gl) gl[t] = from_f32<L>(dkl);
      if (gr) gr[t] = from_f32<R>(-dkl);
    }
  });
}

void shape_rewards(const float* scores, const Strided2d& logp, const Strided2d& ref,
                   const uint8_t* mask, int64_t mask_stride_row, int64_t mask_stride_col,
                   const int64_t* score_index, float* out, int64_t out_stride_row,
                   int64_t n_rows, int64_t n_cols, const RewardOptions& o) {
  for_each_row(logp.dtype, ref.dtype, n_rows, n_cols, [&](auto* ltag, auto* rtag, int64_t row) {
    using L = elem_t<decltype(ltag)>;
    using R = elem_t<decltype(rtag)>;
    const L* lp = static_cast<const L*>(logp.data) + row * logp.stride_row;
    const R* rp = static_cast<const R*>(ref.data) + row * ref.stride_row;
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
        float kl = kl_estimate(
            to_f32(lp[t * logp.stride_col]) - to_f32(rp[t * ref.stride_col]), o.estimator);
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
  dispatch_float(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xs = static_cast<const T*>(x);
    auto valid = [&](int64_t i) { return mask == nullptr || mask[i] != 0; };
    at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double sum = 0.0, count = 0.0;
        for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) {
          if (valid(i)) {
            sum += static_cast<double>(to_f32(xs[i]));
            count += 1.0;
          }
        }
        sums[c] = sum;
        counts[c] = count;
      }
    });
    double total = 0.0, count = 0.0;
    for (int64_t c = 0; c < n_chunks; ++c) {
      total += sums[c];
      count += counts[c];
    }
    const double mean = total / std::max(count, 1.0);
    at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double sq = 0.0;
        for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) {
          if (valid(i)) {
            const double d = static_cast<double>(to_f32(xs[i])) - mean;
            sq += d * d;
          }
        }
        squares[c] = sq;
      }
    });
    double m2 = 0.0;
    for (int64_t c = 0; c < n_chunks; ++c) m2 += squares[c];
    const double var = m2 / std::max(unbiased ? count - 1.0 : count, 1.0);
    const double rstd = 1.0 / std::sqrt(var + static_cast<double>(eps));
    at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (!valid(i)) {
          out[i] = 0.f;
          continue;
        }
        double w = (static_cast<double>(to_f32(xs[i])) - mean) * rstd;
        if (!shift_mean) w += mean;
        out[i] = static_cast<float>(w);
      }
    });
  });
}

}  // namespace rlhf_native
