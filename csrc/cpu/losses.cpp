// The (B, T) losses and the group advantages on CPU: clipped policy loss (PPO, the GRPO family,
// GSPO, CISPO, SAPO's gate, optional KL term), clipped value loss, Bradley-Terry, group-relative advantages.
//
// The same math as rlhf_kernels/ops/policy_loss.py, value_loss.py, bradley_terry.py and
// advantages.py (their module docstrings; rlhf_kernels.reference is the spec), with the same
// "gradient in the forward" design: a loss writes w_row * m * d loss_t / d x per element (the
// saved gradient, fp32) while it computes the loss, and returns the stats with the backward's
// scale as their last entry, so the backward is the backends' shared saved * grad * scale
// (Bradley-Terry's 1/N is known on the host: its saved gradient carries it, no scale entry).
//
// Per-element arithmetic is fp32, as in the Triton kernels. The sums are fp64: per row (or per
// fixed chunk of pairs / scores), then added in row order, so the bits do not depend on the
// thread count and the long sums (a loss over 1M tokens, a variance of returns with a large
// mean) lose nothing to fp32 accumulation.
#include "common.h"

#include <initializer_list>
#include <unordered_map>
#include <vector>

namespace rlhf_native {
namespace {

// torch.maximum / torch.minimum: a NaN in either argument gives NaN
inline float nan_min(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return kNaN;
  return a < b ? a : b;
}

// torch.clamp(x, lo, hi) (NaN stays NaN)
inline float clamp(float x, float lo, float hi) { return std::min(std::max(x, lo), hi); }

// The KL estimate of dk = logp - ref_logp and its derivative (kl code 1 k1, 2 k2, 3 k3, 4 abs),
// as torch autograd of reference.kl_penalty
inline void kl_and_grad(float dk, int64_t code, float* kl, float* dkl) {
  switch (code) {
    case 1: *kl = dk; *dkl = 1.f; break;
    case 2: *kl = 0.5f * dk * dk; *dkl = dk; break;
    case 3: k3_and_grad(dk, kl, dkl); break;  // common.h: a few ulps also where |dk| << 1
    default: *kl = std::fabs(dk); *dkl = dk > 0.f ? 1.f : (dk < 0.f ? -1.f : 0.f);
  }
}

// 1 / scale of the reductions (rlhf_kernels/ops/_reduce.py, module docstring)
double reduction_denominator(double n_tokens, double n_rows, int64_t T, int64_t reduction) {
  switch (reduction) {
    case 0: return std::max(n_tokens, 1.0);
    case 3: return std::max(static_cast<double>(T), 1.0);
    case 4: return 1.0;
    default: return std::max(n_rows, 1.0);
  }
}

// Rows spread over threads, per-row results into per-row slots (summed afterwards in order).
// body(row, rows) gets the row's n_inputs inputs as fp32 (f32_row: the input's own memory when
// it is contiguous fp32, else converted into a per-task buffer of n_inputs x T floats); an
// input whose data is nullptr (not read) gets nullptr.
template <typename F>
void over_rows(int64_t n_rows, int64_t T, std::initializer_list<const Strided2d*> inputs,
               F&& body) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, T));
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(inputs.size() * static_cast<size_t>(T));
    const float* rows[4] = {};
    for (int64_t row = begin; row < end; ++row) {
      size_t k = 0;
      for (const Strided2d* x : inputs) {
        rows[k] = x->data ? f32_row(*x, row, 0, T, buffer.data() + k * T) : nullptr;
        ++k;
      }
      body(row, rows);
    }
  });
}

// ---- policy loss ------------------------------------------------------------------------
enum PolicySums { kLoss, kTokens, kClip, kHalfD2, kNegD, kRatio, kDual, kKl, kNPolicySums };

// logp, old, adv, ref: the row's inputs as fp32 (ref: nullptr without a KL term)
void policy_row(const PolicyLossArgs& p, int64_t row, const float* logp_row,
                const float* old_row, const float* adv_row, const float* ref_row, float* saved,
                double* sums, float* ratio_max) {
  const int64_t T = p.T;
  const float c = p.log_ratio_clamp;
  auto valid = [&](int64_t t) {
    return p.mask == nullptr || p.mask[row * p.mask_stride_row + t * p.mask_stride_col] != 0;
  };
  float* out = saved + row * T;
  // tokens of the row (and, for GSPO, its mean log-ratio)
  double n_row = 0.0, d_sum = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    if (!valid(t)) continue;
    n_row += 1.0;
    if (p.sequence) d_sum += logp_row[t] - old_row[t];
  }
  const float row_w = p.reduction == 1 ? static_cast<float>(1.0 / std::max(n_row, 1.0)) : 1.f;
  float seq_ratio = 0.f, seq_grad_scale = 0.f;
  if (p.sequence) {
    const float seq_d = static_cast<float>(d_sum / std::max(n_row, 1.0));
    seq_ratio = std::exp(clamp(seq_d, -c, c));
    // d mean / d logp_t = 1 / n inside the clamp (bounds included, as torch.clamp)
    seq_grad_scale = (seq_d >= -c && seq_d <= c)
                         ? static_cast<float>(1.0 / std::max(n_row, 1.0)) : 0.f;
  }
  double s[kNPolicySums] = {};
  double seq_grad = 0.0;  // GSPO: sum over the row of w * d loss_u / d log s
  float r_max = 0.f;
  for (int64_t t = 0; t < T; ++t) {
    if (!valid(t)) {
      out[t] = 0.f;
      continue;
    }
    const float logp = logp_row[t];
    const float adv = adv_row[t];
    const float d_raw = logp - old_row[t];
    const float d = clamp(d_raw, -c, c);
    const float ratio = p.sequence ? seq_ratio : std::exp(d);
    const float clipped_ratio = clamp(ratio, p.ratio_low, p.ratio_high);
    float loss, dlogp;
    bool clipped;
    if (p.cispo) {
      // the clipped ratio is a constant weight: no gradient through the ratio
      clipped = ratio < p.ratio_low || ratio > p.ratio_high;
      dlogp = -clipped_ratio * adv;
      loss = dlogp * logp;
    } else {
      float dloss;
      if (p.sapo) {
        // the gate sigmoid(tau (r - 1)) 4 / tau, tau by the sign of A; d loss / d log r =
        // -4 A r s(x) s(-x), 0 where the gate saturates (also where r overflowed to inf)
        clipped = ratio < p.ratio_low || ratio > p.ratio_high;
        const float tau = adv > 0.f ? p.tau_pos : p.tau_neg;
        const float x = tau * (ratio - 1.f);
        const float s_pos = 1.f / (1.f + std::exp(-x)), s_neg = 1.f / (1.f + std::exp(x));
        loss = -adv * (4.f / tau) * s_pos;
        const float slope = s_pos * s_neg;
        dloss = slope == 0.f ? 0.f : -4.f * adv * ratio * slope;
      } else {
        const float loss1 = -adv * ratio, loss2 = -adv * clipped_ratio;
        clipped = loss2 > loss1;
        loss = nan_max(loss1, loss2);
        // d loss / d log(ratio); inside the clip range both terms agree (no halving needed)
        dloss = clipped ? 0.f : loss1;
      }
      if (p.has_dual) {
        const float loss3 = -adv * p.dual_clip;
        const bool negative = adv < 0.f;
        const bool dual = negative && loss3 < loss;
        const bool tie = negative && loss3 == loss;
        loss = dual ? loss3 : loss;
        dloss = dual ? 0.f : (tie ? 0.5f * dloss : dloss);
        s[kDual] += dual ? 1.0 : 0.0;
      }
      if (p.sequence) {
        seq_grad += static_cast<double>(dloss * row_w);
        dlogp = 0.f;
      } else {
        dlogp = (d_raw >= -c && d_raw <= c) ? dloss : 0.f;
      }
    }
    if (p.kl != 0) {
      float kl, dkl;
      kl_and_grad(logp - ref_row[t], p.kl, &kl, &dkl);
      s[kKl] += static_cast<double>(kl * row_w);
      dlogp = dlogp + p.kl_coef * dkl;
    }
    out[t] = dlogp * row_w;  // GSPO with PPO terms: rewritten below
    s[kLoss] += static_cast<double>(loss * row_w);
    s[kTokens] += 1.0;
    s[kClip] += clipped ? 1.0 : 0.0;
    s[kHalfD2] += static_cast<double>(0.5f * d * d);
    s[kNegD] += static_cast<double>(-d);
    s[kRatio] += static_cast<double>(ratio);
    r_max = nan_max(r_max, ratio);
  }
  if (p.sequence && !p.cispo) {
    // every valid token gets the row's summed policy gradient / n (0 where the clamp of the
    // mean bites), plus its own KL gradient
    const float row_grad = static_cast<float>(seq_grad) * seq_grad_scale;
    for (int64_t t = 0; t < T; ++t) {
      if (!valid(t)) continue;
      float grad = row_grad;
      if (p.kl != 0) {
        float kl, dkl;
        kl_and_grad(logp_row[t] - ref_row[t], p.kl, &kl, &dkl);
        grad = grad + (p.kl_coef * dkl) * row_w;
      }
      out[t] = grad;
    }
  }
  for (int k = 0; k < kNPolicySums; ++k) sums[k] = s[k];
  *ratio_max = r_max;
}

}  // namespace

void ppo_policy_loss(const PolicyLossArgs& p, float* saved_grad, float* loss, float* stats) {
  std::vector<double> sums(static_cast<size_t>(p.n_rows) * kNPolicySums, 0.0);
  std::vector<float> maxima(static_cast<size_t>(p.n_rows), 0.f);
  const Strided2d no_ref{};  // ref_logp is read only with a KL term
  over_rows(p.n_rows, p.T, {&p.logp, &p.old, &p.adv, p.kl != 0 ? &p.ref : &no_ref},
            [&](int64_t row, const float* const* x) {
              policy_row(p, row, x[0], x[1], x[2], x[3], saved_grad,
                         sums.data() + row * kNPolicySums, maxima.data() + row);
            });
  double s[kNPolicySums] = {}, rows_with_tokens = 0.0;
  float ratio_max = 0.f;
  for (int64_t row = 0; row < p.n_rows; ++row) {
    const double* r = sums.data() + row * kNPolicySums;
    for (int k = 0; k < kNPolicySums; ++k) s[k] += r[k];
    rows_with_tokens += r[kTokens] > 0.0 ? 1.0 : 0.0;
    ratio_max = nan_max(ratio_max, maxima[row]);
  }
  const double denom = p.has_normalizer
                           ? p.normalizer
                           : reduction_denominator(s[kTokens], rows_with_tokens, p.T, p.reduction);
  // stats are means over valid tokens, 0 when there is none (their numerators are 0 then)
  const double n_safe = std::max(s[kTokens], 1.0);
  int64_t i = 0;
  stats[i++] = static_cast<float>(s[kClip] / n_safe);
  stats[i++] = static_cast<float>(s[kHalfD2] / n_safe);
  stats[i++] = static_cast<float>(s[kNegD] / n_safe);
  stats[i++] = static_cast<float>(s[kRatio] / n_safe);
  stats[i++] = ratio_max;
  if (p.has_dual) stats[i++] = static_cast<float>(s[kDual] / n_safe);
  const double pg_loss = s[kLoss] / denom;
  if (p.kl != 0) {
    *loss = static_cast<float>((s[kLoss] + static_cast<double>(p.kl_coef) * s[kKl]) / denom);
    stats[i++] = static_cast<float>(pg_loss);
    stats[i++] = static_cast<float>(s[kKl] / denom);
  } else {
    *loss = static_cast<float>(pg_loss);
  }
  stats[i] = static_cast<float>(1.0 / denom);
}

// ---- value loss -------------------------------------------------------------------------
namespace {

// running (count, mean, M2) in fp64; Chan's merge
struct Moments {
  double n = 0.0, mean = 0.0, m2 = 0.0;
  void add(double x) {
    n += 1.0;
    const double delta = x - mean;
    mean += delta / n;
    m2 += delta * (x - mean);
  }
  void merge(const Moments& o) {
    if (o.n == 0.0) return;
    const double total = n + o.n, delta = o.mean - mean;
    mean += delta * o.n / total;
    m2 += o.m2 + delta * delta * n * o.n / total;
    n = total;
  }
};

struct ValueRow {
  double loss = 0.0, clip = 0.0, values = 0.0;
  Moments err, ret;
};

// values, old, returns: the row's inputs as fp32 (old: nullptr without a clip)
void value_row(const ValueLossArgs& p, int64_t row, const float* values_row,
               const float* old_row, const float* returns_row, float* saved, ValueRow* acc) {
  const int64_t T = p.T;
  auto valid = [&](int64_t t) {
    return p.mask == nullptr || p.mask[row * p.mask_stride_row + t * p.mask_stride_col] != 0;
  };
  float row_w = 1.f;
  if (p.reduction == 1) {
    double n_row = 0.0;
    for (int64_t t = 0; t < T; ++t) n_row += valid(t) ? 1.0 : 0.0;
    row_w = static_cast<float>(1.0 / std::max(n_row, 1.0));
  }
  float* out = saved + row * T;
  ValueRow a;
  for (int64_t t = 0; t < T; ++t) {
    if (!valid(t)) {
      out[t] = 0.f;
      continue;
    }
    const float v = values_row[t], ret = returns_row[t];
    const float err = v - ret, loss1 = err * err;
    float loss, dloss;
    if (p.has_clip) {
      const float old = old_row[t];
      const float step = v - old;
      const float err_clipped = (old + clamp(step, -p.clip, p.clip)) - ret;
      const float loss2 = err_clipped * err_clipped;
      // torch.clamp passes the gradient on [-clip, clip], bounds included
      const float grad2 = (step >= -p.clip && step <= p.clip) ? err_clipped : 0.f;
      const bool clipped = loss2 > loss1;
      loss = 0.5f * nan_max(loss1, loss2);
      // torch.maximum halves the gradient on a tie
      dloss = clipped ? grad2 : (loss1 > loss2 ? err : 0.5f * (err + grad2));
      a.clip += clipped ? 1.0 : 0.0;
    } else {
      loss = 0.5f * loss1;
      dloss = err;
    }
    out[t] = dloss * row_w;
    a.loss += static_cast<double>(loss * row_w);
    a.values += static_cast<double>(v);
    a.err.add(static_cast<double>(ret) - static_cast<double>(v));
    a.ret.add(static_cast<double>(ret));
  }
  *acc = a;
}

}  // namespace

void ppo_value_loss(const ValueLossArgs& p, float* saved_grad, float* loss, float* stats) {
  std::vector<ValueRow> rows(static_cast<size_t>(p.n_rows));
  const Strided2d no_old{};  // old_values is read only with a clip
  over_rows(p.n_rows, p.T, {&p.values, p.has_clip ? &p.old : &no_old, &p.returns},
            [&](int64_t row, const float* const* x) {
              value_row(p, row, x[0], x[1], x[2], saved_grad, rows.data() + row);
            });
  ValueRow total;
  double rows_with_tokens = 0.0;
  for (const ValueRow& r : rows) {
    total.loss += r.loss;
    total.clip += r.clip;
    total.values += r.values;
    total.err.merge(r.err);
    total.ret.merge(r.ret);
    rows_with_tokens += r.err.n > 0.0 ? 1.0 : 0.0;
  }
  const double n_tokens = total.err.n, n_safe = std::max(n_tokens, 1.0);
  const double var_err = total.err.m2 / n_safe, var_ret = total.ret.m2 / n_safe;
  const double denom = p.has_normalizer
                           ? p.normalizer
                           : reduction_denominator(n_tokens, rows_with_tokens, p.T, p.reduction);
  *loss = static_cast<float>(total.loss / denom);
  stats[0] = static_cast<float>(total.clip / n_safe);
  stats[1] = var_ret > 0.0 ? static_cast<float>(1.0 - var_err / std::max(var_ret, 1e-30)) : 0.f;
  stats[2] = static_cast<float>(total.values / n_safe);
  stats[3] = static_cast<float>(total.ret.mean);
  stats[4] = static_cast<float>(1.0 / denom);
}

// ---- Bradley-Terry ----------------------------------------------------------------------
void bradley_terry(const BradleyTerryArgs& p, float* saved_grad, float* loss, float* stats) {
  constexpr int64_t kChunk = 4096;  // fixed: the same sums for any thread count
  enum { kSoftplus, kCenter, kCorrect, kDiff, kChosen, kRejected, kN };
  const int64_t n = p.n_pairs, n_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(n_chunks) * kN, 0.0);
  // the saved gradients carry the 1/N (computed in fp64, rounded to fp32: as the Triton
  // launcher passes it)
  const float inv_n = static_cast<float>(1.0 / static_cast<double>(n));
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    // the chunk's pairs as fp32 (f32_row: no copy for contiguous fp32)
    std::vector<float> buffer(3 * kChunk);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = chunk * kChunk, count = std::min(n - first, kChunk);
      const float* chosen_x = f32_row(p.chosen, 0, first, count, buffer.data());
      const float* rejected_x = f32_row(p.rejected, 0, first, count, buffer.data() + kChunk);
      const float* margin_x =
          p.margin.data ? f32_row(p.margin, 0, first, count, buffer.data() + 2 * kChunk)
                        : nullptr;
      double s[kN] = {};
      for (int64_t j = 0; j < count; ++j) {
        const int64_t i = first + j;
        const float chosen = chosen_x[j], rejected = rejected_x[j];
        const float diff = chosen - rejected;
        float z = diff - p.margin_value;
        if (margin_x) z = z - margin_x[j];
        // softplus(-z) = max(-z, 0) + log1p(e^-|z|): no overflow, no lost tail
        const float e = std::exp(-std::fabs(z));
        const float softplus = std::max(-z, 0.f) + std::log1p(e);
        const float sigmoid_neg_z = z >= 0.f ? e / (1.f + e) : 1.f / (1.f + e);
        const float total = chosen + rejected;
        // no centering term when center_coef is 0 (not 0 * total: NaN for an infinite reward)
        const float center_grad = p.center_coef != 0.f ? 2.f * p.center_coef * total : 0.f;
        saved_grad[i] = (center_grad - sigmoid_neg_z) * inv_n;
        saved_grad[n + i] = (center_grad + sigmoid_neg_z) * inv_n;
        s[kSoftplus] += softplus;
        s[kCenter] += static_cast<double>(total) * total;
        s[kCorrect] += diff > 0.f ? 1.0 : 0.0;
        s[kDiff] += diff;
        s[kChosen] += chosen;
        s[kRejected] += rejected;
      }
      std::copy(s, s + kN, partial.data() + chunk * kN);
    }
  });
  double s[kN] = {};
  for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
    for (int k = 0; k < kN; ++k) s[k] += partial[chunk * kN + k];
  }
  const double pairs = static_cast<double>(n);
  double total = s[kSoftplus] / pairs;
  // as the reference: the centering term only exists when center_coef is nonzero
  if (p.center_coef != 0.f) total += static_cast<double>(p.center_coef) * (s[kCenter] / pairs);
  *loss = static_cast<float>(total);
  stats[0] = static_cast<float>(s[kCorrect] / pairs);
  stats[1] = static_cast<float>(s[kDiff] / pairs);
  stats[2] = static_cast<float>(s[kChosen] / pairs);
  stats[3] = static_cast<float>(s[kRejected] / pairs);
}

// ---- group advantages -------------------------------------------------------------------
void group_advantages(const GroupAdvantagesArgs& p, float* out) {
  const int64_t n = p.n;
  std::vector<float> staged(static_cast<size_t>(n));
  const float* scores = f32_row(p.scores, 0, 0, n, staged.data());
  const std::vector<double> r(scores, scores + n);
  // the group of each score: i / group_size, or the rank of its id's first appearance
  std::vector<int64_t> group(static_cast<size_t>(n));
  int64_t n_groups = 0;
  if (p.ids) {
    std::unordered_map<int64_t, int64_t> index;
    index.reserve(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      auto found = index.emplace(p.ids[i * p.ids_stride], n_groups);
      if (found.second) ++n_groups;
      group[i] = found.first->second;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) group[i] = i / p.group_size;
    n_groups = n == 0 ? 0 : group[n - 1] + 1;
  }
  // two passes in fp64: the group means, then the squared deviations from them
  std::vector<double> count(static_cast<size_t>(n_groups), 0.0), mean(count), squares(count);
  for (int64_t i = 0; i < n; ++i) {
    count[group[i]] += 1.0;
    mean[group[i]] += r[i];
  }
  for (int64_t g = 0; g < n_groups; ++g) mean[g] /= std::max(count[g], 1.0);
  for (int64_t i = 0; i < n; ++i) {
    const double d = r[i] - mean[group[i]];
    squares[group[i]] += d * d;
  }
  double batch_std = 1.0;
  if (p.norm == 2 && n > 1) {
    double total = 0.0, sq = 0.0;
    for (int64_t i = 0; i < n; ++i) total += r[i];
    const double batch_mean = total / static_cast<double>(n);
    for (int64_t i = 0; i < n; ++i) sq += (r[i] - batch_mean) * (r[i] - batch_mean);
    batch_std = std::sqrt(sq / static_cast<double>(n - 1));
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = group[i];
    const double size = count[g];
    const bool alone = size <= 1.0;
    double centred;
    switch (p.estimator) {
      case 0: centred = alone ? r[i] : r[i] - mean[g]; break;  // grpo: a lone score's mean is 0
      case 1: centred = alone ? 0.0 : r[i] - mean[g]; break;   // dr_grpo
      default:  // rloo: r_i - mean of the n - 1 others = n / (n - 1) (r_i - mean)
        centred = alone ? 0.0 : (r[i] - mean[g]) * size / (size - 1.0);
    }
    double a = centred;
    if (p.norm == 1) {
      const double std_g = alone ? 1.0 : std::sqrt(squares[g] / std::max(size - 1.0, 1.0));
      a = centred / (std_g + p.eps);
    } else if (p.norm == 2) {
      a = centred / (batch_std + p.eps);
    }
    out[i] = static_cast<float>(a);
  }
}

}  // namespace rlhf_native
