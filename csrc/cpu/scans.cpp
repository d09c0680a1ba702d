// Per-row scans on CPU: GAE as one right-to-left pass per row, rows over threads.
//
//   next_value_t = values at the nearest valid position s > t (0 when there is none)
//   delta_t      = r_t + gamma * next_value_t - v_t
//   A_t          = delta_t + gamma * lam * A_next      (A_next: A at that same position)
//   returns_t    = A_t + v_t;   masked positions output A = 0 and returns = 0.
//
// The Triton kernel runs the same recurrence as two associative scans across a GPU block; on a
// CPU core the sequential loop is the fast form (one multiply-add per token, the row in cache).
#include "common.h"

#include <vector>

namespace rlhf_native {
namespace {

// rows [begin, end): each row's rewards and values as fp32 (f32_row: their own memory when they
// are contiguous fp32, else converted into buffer, 2 x n_cols floats)
void gae_rows(const Strided2d& rewards, const Strided2d& values, const uint8_t* mask,
              int64_t msr, int64_t msc, int64_t begin, int64_t end, int64_t n_cols, float gamma,
              float lam, float* adv, float* ret, int64_t out_stride_row, float* buffer) {
  const float gamma_lam = gamma * lam;
  for (int64_t row = begin; row < end; ++row) {
    const float* r = f32_row(rewards, row, 0, n_cols, buffer);
    const float* v = f32_row(values, row, 0, n_cols, buffer + n_cols);
    const uint8_t* m = mask ? mask + row * msr : nullptr;
    float* a_out = adv + row * out_stride_row;
    float* r_out = ret + row * out_stride_row;
    float next_value = 0.f, adv_next = 0.f;
    for (int64_t t = n_cols - 1; t >= 0; --t) {
      if (m && m[t * msc] == 0) {
        a_out[t] = 0.f;
        r_out[t] = 0.f;
        continue;
      }
      const float value = v[t];
      const float delta = r[t] + gamma * next_value - value;
      const float a = delta + gamma_lam * adv_next;
      a_out[t] = a;
      r_out[t] = a + value;
      next_value = value;
      adv_next = a;
    }
  }
}

}  // namespace

void gae(const Strided2d& rewards, const Strided2d& values, const uint8_t* mask,
         int64_t mask_stride_row, int64_t mask_stride_col, int64_t n_rows, int64_t n_cols,
         float gamma, float lam, float* adv, float* ret, int64_t out_stride_row) {
  // ~2 ns per token on one core: a task of 2^20 tokens is ~2 ms, enough to pay for a
  // fork/join (which on a loaded machine waits for the other thread to be scheduled:
  // measured 8 ms of CPU time spinning for a 1.7 ms pass at 512 x 2048 with 2 threads)
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, n_cols));
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(2 * static_cast<size_t>(n_cols));
    gae_rows(rewards, values, mask, mask_stride_row, mask_stride_col, begin, end, n_cols, gamma,
             lam, adv, ret, out_stride_row, buffer.data());
  });
}

}  // namespace rlhf_native
