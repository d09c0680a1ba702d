// Shared declarations of the native CPU kernels: the element types, NaN-propagating max, fp32
// rows of inputs of any dtype (f32_row), the kernels' raw-pointer entry points. Only ATen's
// parallel header: no c10 dtype or vector headers (dtypes.h has those, for the files that work
// on bf16 / fp16 values themselves), no Tensor, no dispatcher, so the kernel translation units
// compile quickly (the registration lives in register.cpp).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace rlhf_native {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Element types the kernels read (logits, rewards, values) and write (gradients).
enum class Dtype : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

inline int64_t element_size(Dtype dtype) {
  return dtype == Dtype::f64 ? 8 : (dtype == Dtype::f32 ? 4 : 2);
}

// The k3 KL estimate e^-d + d - 1 of an fp32 log-ratio d and its derivative 1 - e^-d, each to a
// few ulps for every d (the same split as rlhf_kernels/ops/kl.py's kernels). Written literally
// k3 cancels where |d| << 1: the rounding of e^-d (about 6e-8) is all that is left of a result
// of about d^2 / 2, several percent on average at |d| ~ 1e-3; expm1(-d) + d still keeps expm1's
// rounding, about 1e-4 of the result there. For |d| <= 1 the Taylor series d^2 (1/2 - d/6 + ...
// + (-d)^9 / 11!) by Horner (the truncated terms are below 2^-27 of the result) and the
// derivative d - k3 (|k3| <= 0.72 |d| there: no cancellation); for |d| > 1, e^-d + d - 1 >=
// 0.36 |d| and 1 - e^-d (>= 0.63 in size): e^-d's rounding costs an ulp or two. No expm1:
// glibc's expm1f is several times slower than its expf (the backward took 1.7x as long).
inline float k3_series(float x) {
  float p = -2.505210838544172e-08f * x + 2.755731922398589e-07f;  // -1/11!, 1/10!
  p = p * x - 2.7557319223985893e-06f;  // -1/9!
  p = p * x + 2.48015873015873e-05f;    // 1/8!
  p = p * x - 0.0001984126984126984f;   // -1/7!
  p = p * x + 0.001388888888888889f;    // 1/6!
  p = p * x - 0.008333333333333333f;    // -1/5!
  p = p * x + 0.041666666666666664f;    // 1/4!
  p = p * x - 0.16666666666666666f;     // -1/3!
  p = p * x + 0.5f;                     // 1/2!
  return x * x * p;
}

// (NaN takes the far side: NaN, as the literal formula)
inline float k3(float d) { return std::fabs(d) <= 1.f ? k3_series(d) : std::exp(-d) + d - 1.f; }

inline float k3_grad(float d) {
  return std::fabs(d) <= 1.f ? d - k3_series(d) : 1.f - std::exp(-d);
}

inline void k3_and_grad(float d, float* kl, float* dkl) {
  if (std::fabs(d) <= 1.f) {
    *kl = k3_series(d);
    *dkl = d - *kl;
  } else {
    const float e = std::exp(-d);
    *kl = e + d - 1.f;
    *dkl = 1.f - e;
  }
}

// max that keeps a NaN (std::max drops it when it is the second argument)
inline float nan_max(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return kNaN;
  return a > b ? a : b;
}

// dst[i] = float(src[i * stride]) for i < n. Exact for bf16 / fp16 (each of their values is an
// fp32); fp64 takes the one rounding of static_cast<float>, the same as a per-element read. The
// kernels stage a row (or a block of one) of an input of any dtype this way and then run one
// fp32 body: 4 instantiations of this loop instead of one kernel body per combination of the
// inputs' dtypes (which made losses.cpp take 44 s to compile), with the same values and bits.
// Defined in logprobs.cpp, the file that includes c10's dtype headers anyway.
void convert_to_f32(const void* src, Dtype dtype, int64_t stride, int64_t n, float* dst);

// dst[i] = src[i] rounded to the dtype (contiguous), as a per-element static_cast would.
void convert_from_f32(const float* src, void* dst, Dtype dtype, int64_t n);

inline int64_t load_label(const void* labels, bool int64_labels, int64_t row) {
  return int64_labels ? static_cast<const int64_t*>(labels)[row]
                      : static_cast<const int32_t*>(labels)[row];
}

// ---- kernel entry points (raw pointers; register.cpp unpacks the tensors) ----------------

struct LogprobsRows {
  const void* logits;     // (B, T, V) with stride(-1) == 1
  Dtype dtype;
  int64_t n_rows, n_inner, V, stride_outer, stride_inner;
  const void* labels;     // (N,) int64 or int32, contiguous
  bool int64_labels;
  float inv_temperature;
  int64_t ignore_index;
};

void logprobs_fwd(const LogprobsRows& rows, void* logp, Dtype logp_dtype, void* entropy,
                  Dtype entropy_dtype, float* lse, float* saved_entropy);

void logprobs_bwd(const LogprobsRows& rows, const float* lse, const float* entropy,
                  const float* grad_logp, const float* grad_entropy, void* out, Dtype out_dtype,
                  int64_t out_stride_outer, int64_t out_stride_inner);

struct Strided2d {
  const void* data;
  Dtype dtype;
  int64_t stride_row, stride_col;
};

// Elements [col, col + n) of row `row` of x as fp32: x's own memory when it is fp32 with
// stride_col 1 (no copy), else converted into buf (room for n floats).
inline const float* f32_row(const Strided2d& x, int64_t row, int64_t col, int64_t n,
                            float* buf) {
  if (x.dtype == Dtype::f32 && x.stride_col == 1) {
    return static_cast<const float*>(x.data) + row * x.stride_row + col;
  }
  const char* start = static_cast<const char*>(x.data) +
                      (row * x.stride_row + col * x.stride_col) * element_size(x.dtype);
  convert_to_f32(start, x.dtype, x.stride_col, n, buf);
  return buf;
}

// mask: uint8 (0 / nonzero) with its strides, or data == nullptr (all valid)
void gae(const Strided2d& rewards, const Strided2d& values, const uint8_t* mask,
         int64_t mask_stride_row, int64_t mask_stride_col, int64_t n_rows, int64_t n_cols,
         float gamma, float lam, float* adv, float* ret, int64_t out_stride_row);

struct KlOptions {
  int64_t estimator;  // 0 k1, 1 k2, 2 k3, 3 abs (rlhf_kernels.ops.kl.KL_ESTIMATOR_CODES)
  bool has_clamp, has_log_ratio_clamp;
  float clamp, log_ratio_clamp;
};

// out: (rows, cols) fp32 with stride(-1) == 1
void kl_fwd(const Strided2d& logp, const Strided2d& ref, float* out, int64_t out_stride_row,
            int64_t n_rows, int64_t n_cols, const KlOptions& options);

// grad: fp32 (any strides, e.g. expanded); grad_logp / grad_ref: nullptr (not wanted) or rows
// with stride(-1) == 1 in logp's / ref's dtype
void kl_bwd(const Strided2d& grad, const Strided2d& logp, const Strided2d& ref, void* grad_logp,
            void* grad_ref, int64_t out_stride_row, int64_t n_rows, int64_t n_cols,
            const KlOptions& options);

struct RewardOptions {
  float kl_coef;
  int64_t estimator;
  bool has_score_clip, has_kl_clamp;
  float score_clip, kl_clamp;
};

// scores: (rows,) fp32 contiguous; score_index: (rows,) int64 contiguous or nullptr (the last
// valid token); mask: uint8 0 / nonzero; out: fp32 rows with stride(-1) == 1
void shape_rewards(const float* scores, const Strided2d& logp, const Strided2d& ref,
                   const uint8_t* mask, int64_t mask_stride_row, int64_t mask_stride_col,
                   const int64_t* score_index, float* out, int64_t out_stride_row,
                   int64_t n_rows, int64_t n_cols, const RewardOptions& options);

// x: n contiguous elements; mask: n contiguous 0 / nonzero bytes or nullptr; out: n fp32
void masked_whiten(const void* x, Dtype dtype, const uint8_t* mask, int64_t n, bool shift_mean,
                   bool unbiased, float eps, float* out);

// ---- the (B, T) losses and group advantages (losses.cpp) ---------------------------------
// Each loss writes its saved gradient (rows x T fp32 contiguous; Bradley-Terry: 2 x pairs), the
// fp32 loss and the stats in the layout of its Python module (_STAT_NAMES, then the scale).

struct PolicyLossArgs {
  Strided2d logp, old, adv, ref;  // (rows, T) views; adv may have stride_col 0; ref: KL only
  const uint8_t* mask;            // 0 / nonzero bytes, or nullptr (all valid)
  int64_t mask_stride_row, mask_stride_col;
  int64_t n_rows, T;
  float ratio_low, ratio_high, dual_clip, log_ratio_clamp, kl_coef;
  float tau_pos, tau_neg;  // SAPO's gate temperatures (A > 0, A <= 0)
  bool has_dual, sequence, cispo, sapo;
  int64_t kl;         // 0: no KL term; 1 k1, 2 k2, 3 k3, 4 abs
  int64_t reduction;  // rlhf_kernels.ops._reduce.REDUCTION_CODES
  bool has_normalizer;
  double normalizer;
};

void ppo_policy_loss(const PolicyLossArgs& args, float* saved_grad, float* loss, float* stats);

struct ValueLossArgs {
  Strided2d values, old, returns;  // old: read only with a clip
  const uint8_t* mask;
  int64_t mask_stride_row, mask_stride_col;
  int64_t n_rows, T;
  bool has_clip;
  float clip;
  int64_t reduction;
  bool has_normalizer;  // replaces the reduction's outer denominator
  double normalizer;
};

void ppo_value_loss(const ValueLossArgs& args, float* saved_grad, float* loss, float* stats);

struct BradleyTerryArgs {
  Strided2d chosen, rejected, margin;  // 1-D: stride_col; margin.data nullptr: none
  int64_t n_pairs;
  float margin_value, center_coef;
};

void bradley_terry(const BradleyTerryArgs& args, float* saved_grad, float* loss, float* stats);

struct GroupAdvantagesArgs {
  Strided2d scores;  // 1-D: stride_col
  const int64_t* ids;  // nullptr: consecutive groups of group_size
  int64_t ids_stride;
  int64_t n, group_size;
  int64_t estimator;  // 0 grpo, 1 dr_grpo, 2 rloo
  int64_t norm;       // 0 none, 1 group, 2 batch
  double eps;
};

void group_advantages(const GroupAdvantagesArgs& args, float* out);

}  // namespace rlhf_native
