// logprobs (+ entropy) forward and backward on CPU: one sweep over each row's vocabulary.
//
// Same math as the Triton kernels (rlhf_kernels/ops/logprobs.py, module docstring): per row,
// z = logits / T; the forward keeps a running max m, s = sum exp(z - m) and
// a = sum exp(z - m) (z - m), rescaled when m moves; lse = m + log s, entropy = log s - a / s.
// The backward writes d logits from the saved lse / entropy:
//   dz_j = g_logp (onehot_j - p_j) - g_H p_j (log p_j + H),  d logit_j = dz_j / T.
//
// A row is walked in blocks of kBlock elements: each block is converted to fp32 into a buffer
// that stays in L1, its max taken, then the exponentials summed from the buffer. So the logits
// are read from memory once per pass, each element costs one exp, and nothing of size (N, V)
// is allocated. Rows are spread over threads with at::parallel_for.
#include "dtypes.h"

namespace rlhf_native {
namespace {

constexpr int64_t kBlock = 2048;
constexpr int kLanes = Vec::size();

inline const char* row_ptr(const LogprobsRows& r, int64_t row, int64_t elem) {
  const int64_t outer = row / r.n_inner, inner = row % r.n_inner;
  return static_cast<const char*>(r.logits) + (outer * r.stride_outer + inner * r.stride_inner) * elem;
}

// dst[i] = float(src[i]) * scale for the logits' dtype: the only per-dtype code of the sweeps,
// so their vector bodies are compiled once (not once per input / output dtype pair)
void load_block(const char* src, Dtype dtype, float* __restrict dst, int64_t n, float scale) {
  dispatch_float(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    load_scaled(reinterpret_cast<const T*>(src), dst, n, scale);
  });
}

void fill_row(char* dst, Dtype dtype, int64_t n, float value) {
  dispatch_float(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    std::fill(reinterpret_cast<T*>(dst), reinterpret_cast<T*>(dst) + n, from_f32<T>(value));
  });
}

void fwd_rows(const LogprobsRows& r, int64_t begin, int64_t end, void* logp, Dtype logp_dtype,
              void* entropy, Dtype entropy_dtype, float* lse_out, float* saved_entropy) {
  alignas(64) float buf[kBlock];
  const bool want_entropy = entropy != nullptr;
  const int64_t esize = element_size(r.dtype);
  const int64_t V = r.V;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t label = load_label(r.labels, r.int64_labels, row);
    if (label == r.ignore_index) {  // no sweep: zeros out
      store_one(logp, logp_dtype, row, 0.f);
      lse_out[row] = 0.f;
      if (want_entropy) {
        store_one(entropy, entropy_dtype, row, 0.f);
        if (saved_entropy) saved_entropy[row] = 0.f;
      }
      continue;
    }
    const char* x = row_ptr(r, row, esize);
    float m = -kInf, s = 0.f, a = 0.f;
    for (int64_t start = 0; start < V; start += kBlock) {
      const int64_t n = std::min(kBlock, V - start);
      load_block(x + start * esize, r.dtype, buf, n, r.inv_temperature);
      Vec vmax(-kInf);
      int64_t i = 0;
      for (; i + kLanes <= n; i += kLanes) vmax = at::vec::maximum(vmax, Vec::loadu(buf + i));
      float block_max = hmax(vmax);
      for (; i < n; ++i) block_max = nan_max(block_max, buf[i]);
      const float m_new = nan_max(m, block_max);
      if (m_new == -kInf) continue;  // every entry so far is -inf: nothing to add yet
      const float scale = std::exp(m - m_new);  // 0 while m == -inf
      if (want_entropy) a = (a + (s > 0.f ? (m - m_new) * s : 0.f)) * scale;
      s *= scale;
      // exp_u20 (ATen's inlined polynomial, 20 ulp, ~1.3x the speed of SLEEF's call) maps NaN
      // to a number: only while the max is finite (then d <= 0 or -inf, never NaN)
      const bool fast = std::isfinite(m_new);
      const Vec vm(m_new), zero(0.f);
      Vec vs(0.f), va(0.f);
      i = 0;
      for (; i + kLanes <= n; i += kLanes) {
        const Vec d = Vec::loadu(buf + i) - vm;
        const Vec e = fast ? d.exp_u20() : d.exp();
        vs = vs + e;
        // -inf entries: e == 0 and d == -inf; their term is 0 (0 log 0 = 0), not NaN
        if (want_entropy) va = va + Vec::blendv(zero, e * d, e > zero);
      }
      float bs = hsum(vs), ba = want_entropy ? hsum(va) : 0.f;
      for (; i < n; ++i) {
        const float d = buf[i] - m_new, e = std::exp(d);
        bs += e;
        if (want_entropy && e > 0.f) ba += e * d;
      }
      s += bs;
      a += ba;
      m = m_new;
    }
    const float lse = m + std::log(s);  // all -inf: -inf (logp NaN, as log_softmax)
    const bool label_ok = label >= 0 && label < V;  // else NaN, never an out-of-bounds read
    float logit = 0.f;
    if (label_ok) convert_to_f32(x + label * esize, r.dtype, 1, 1, &logit);
    const float logp_value = label_ok ? logit * r.inv_temperature - lse : kNaN;
    store_one(logp, logp_dtype, row, logp_value);
    lse_out[row] = lse;
    if (want_entropy) {
      // s == 0: all -inf (0 log 0 = 0, as the reference); a NaN s stays NaN
      const float h = s == 0.f ? 0.f : std::log(s) - a / s;
      store_one(entropy, entropy_dtype, row, h);
      if (saved_entropy) saved_entropy[row] = h;
    }
  }
}

void bwd_rows(const LogprobsRows& r, int64_t begin, int64_t end, const float* lse_in,
              const float* entropy_in, const float* grad_logp, const float* grad_entropy,
              void* out, Dtype out_dtype, int64_t out_stride_outer, int64_t out_stride_inner) {
  alignas(64) float buf[kBlock];
  const int64_t V = r.V;
  const float inv_t = r.inv_temperature;
  const bool has_gl = grad_logp != nullptr, has_gh = grad_entropy != nullptr;
  const int64_t esize = element_size(r.dtype), out_esize = element_size(out_dtype);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t outer = row / r.n_inner, inner = row % r.n_inner;
    char* o = static_cast<char*>(out) +
              (outer * out_stride_outer + inner * out_stride_inner) * out_esize;
    const int64_t label = load_label(r.labels, r.int64_labels, row);
    if (label == r.ignore_index) {
      fill_row(o, out_dtype, V, 0.f);
      continue;
    }
    const bool label_ok = label >= 0 && label < V;
    if (has_gl && !label_ok) {  // its logp is NaN: a NaN gradient, not a plausible number
      fill_row(o, out_dtype, V, kNaN);
      continue;
    }
    const char* x = row_ptr(r, row, esize);
    const float lse = lse_in[row];
    const float g = has_gl ? grad_logp[row] : 0.f;
    const float gh = has_gh ? grad_entropy[row] : 0.f;
    const float h = has_gh ? entropy_in[row] : 0.f;
    // exp_u20 as in the forward: only for a finite lse (a NaN / inf row takes SLEEF's exp)
    const bool fast = std::isfinite(lse);
    const Vec vlse(lse), vg(g), vgh(gh), vh(h), vinv(inv_t), zero(0.f);
    // exact fp32 formula of one element (tails and the label's entry)
    auto one = [&](float z, bool is_label) {
      const float log_p = z - lse, p = std::exp(log_p);
      float dz = 0.f;
      if (has_gl) dz = (is_label ? g : 0.f) - g * p;
      if (has_gh) dz -= gh * p * (p > 0.f ? log_p + h : 0.f);
      return dz * inv_t;
    };
    for (int64_t start = 0; start < V; start += kBlock) {
      const int64_t n = std::min(kBlock, V - start);
      // in place (out == logits) is safe: the block is read whole before it is written
      load_block(x + start * esize, r.dtype, buf, n, inv_t);
      const float z_label =
          (label >= start && label < start + n) ? buf[label - start] : 0.f;
      int64_t i = 0;
      for (; i + kLanes <= n; i += kLanes) {
        const Vec log_p = Vec::loadu(buf + i) - vlse;
        const Vec p = fast ? log_p.exp_u20() : log_p.exp();
        Vec dz = zero;
        if (has_gl) dz = zero - vg * p;
        // -inf entries: p == 0 and log p == -inf; the term is 0
        if (has_gh) dz = dz - vgh * p * Vec::blendv(zero, log_p + vh, p > zero);
        (dz * vinv).store(buf + i);
      }
      for (; i < n; ++i) buf[i] = one(buf[i], false);
      if (label >= start && label < start + n) buf[label - start] = one(z_label, true);
      convert_from_f32(buf, o + start * out_esize, out_dtype, n);
    }
  }
}

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, V)); }

}  // namespace

// common.h's conversions (declared there for the kernels that stage rows through f32_row)
void convert_to_f32(const void* src, Dtype dtype, int64_t stride, int64_t n,
                    float* __restrict dst) {
  dispatch_float(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* __restrict s = static_cast<const T*>(src);
    if (stride == 1) {
      for (int64_t i = 0; i < n; ++i) dst[i] = to_f32(s[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = to_f32(s[i * stride]);
    }
  });
}

void convert_from_f32(const float* __restrict src, void* dst, Dtype dtype, int64_t n) {
  dispatch_float(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    store_from_f32(src, static_cast<T*>(dst), n);
  });
}

void logprobs_fwd(const LogprobsRows& rows, void* logp, Dtype logp_dtype, void* entropy,
                  Dtype entropy_dtype, float* lse, float* saved_entropy) {
  at::parallel_for(0, rows.n_rows, grain_rows(rows.V), [&](int64_t begin, int64_t end) {
    fwd_rows(rows, begin, end, logp, logp_dtype, entropy, entropy_dtype, lse, saved_entropy);
  });
}

void logprobs_bwd(const LogprobsRows& rows, const float* lse, const float* entropy,
                  const float* grad_logp, const float* grad_entropy, void* out, Dtype out_dtype,
                  int64_t out_stride_outer, int64_t out_stride_inner) {
  at::parallel_for(0, rows.n_rows, grain_rows(rows.V), [&](int64_t begin, int64_t end) {
    bwd_rows(rows, begin, end, lse, entropy, grad_logp, grad_entropy, out, out_dtype,
             out_stride_outer, out_stride_inner);
  });
}

}  // namespace rlhf_native
