// The native CPU kernels as operators of the private namespace rlhf_kernels_native.
//
// These are not the public ops: the launchers of rlhf_kernels.ops.* call them (on CPU tensors,
// when the native backend is selected) inside the rlhf_kernels:: custom ops and inside the eager
// fast path, so torch.compile and autograd still see one rlhf_kernels:: op per function. Every
// output buffer is allocated by the Python launcher and written here (the (a!) annotations).
// The checks below guard the launcher contract (memory safety), not user input: the user-facing
// checks run in Python before dispatch, the same for every backend.
#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <deque>
#include <mutex>
#include <optional>
#include <tuple>

#include "common.h"

namespace rlhf_native {

// allocator.cpp: whether its block cache is torch's CPU allocator (installed once, for good)
bool cpu_block_cache_installed();

namespace {

Dtype float_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::f32;
    case at::kDouble: return Dtype::f64;
    case at::kBFloat16: return Dtype::bf16;
    case at::kHalf: return Dtype::f16;
    default: TORCH_CHECK(false, "rlhf_kernels_native: ", name, " must be fp32/fp64/bf16/fp16, got ",
                         t.scalar_type());
  }
  return Dtype::f32;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "rlhf_kernels_native: ", name, " must be on the CPU, got ",
              t.device());
}

const float* fp32_vector(const std::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value()) return nullptr;
  check_cpu(*t, name);
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n,
              "rlhf_kernels_native: ", name, " must be ", n, " contiguous fp32 elements, got ",
              t->sizes(), " ", t->scalar_type());
  return t->data_ptr<float>();
}

float* fp32_out(const at::Tensor& t, int64_t n, const char* name) {
  return const_cast<float*>(fp32_vector(t, n, name));
}

void* row_out(const std::optional<at::Tensor>& t, int64_t n, const char* name, Dtype* dtype) {
  if (!t.has_value()) return nullptr;
  check_cpu(*t, name);
  TORCH_CHECK(t->is_contiguous() && t->numel() == n, "rlhf_kernels_native: ", name, " must be ",
              n, " contiguous elements, got ", t->sizes());
  *dtype = float_dtype(*t, name);
  return t->data_ptr();
}

LogprobsRows rows_of(const at::Tensor& logits, const at::Tensor& labels, double inv_temperature,
                     int64_t ignore_index) {
  check_cpu(logits, "logits");
  check_cpu(labels, "labels");
  TORCH_CHECK(logits.dim() == 3 && logits.stride(2) == 1,
              "rlhf_kernels_native: logits must be (B, T, V) with stride(-1) == 1, got ",
              logits.sizes(), " strides ", logits.strides());
  const int64_t n_rows = logits.size(0) * logits.size(1);
  TORCH_CHECK((labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt) &&
                  labels.is_contiguous() && labels.numel() == n_rows,
              "rlhf_kernels_native: labels must be ", n_rows, " contiguous int64/int32, got ",
              labels.sizes(), " ", labels.scalar_type());
  LogprobsRows r;
  r.logits = logits.data_ptr();
  r.dtype = float_dtype(logits, "logits");
  r.n_rows = n_rows;
  r.n_inner = logits.size(1);
  r.V = logits.size(2);
  r.stride_outer = logits.stride(0);
  r.stride_inner = logits.stride(1);
  r.labels = labels.data_ptr();
  r.int64_labels = labels.scalar_type() == at::kLong;
  r.inv_temperature = static_cast<float>(inv_temperature);
  r.ignore_index = ignore_index;
  return r;
}

void logprobs_fwd_op(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& logp,
                     const std::optional<at::Tensor>& entropy, const at::Tensor& lse,
                     const std::optional<at::Tensor>& saved_entropy, double inv_temperature,
                     int64_t ignore_index) {
  const LogprobsRows r = rows_of(logits, labels, inv_temperature, ignore_index);
  if (r.n_rows == 0) return;
  Dtype logp_dtype = Dtype::f32, entropy_dtype = Dtype::f32;
  void* logp_ptr = row_out(logp, r.n_rows, "logp", &logp_dtype);
  void* entropy_ptr = row_out(entropy, r.n_rows, "entropy", &entropy_dtype);
  float* lse_ptr = fp32_out(lse, r.n_rows, "lse");
  float* saved_ptr = entropy_ptr ? const_cast<float*>(
      fp32_vector(saved_entropy, r.n_rows, "saved_entropy")) : nullptr;
  logprobs_fwd(r, logp_ptr, logp_dtype, entropy_ptr, entropy_dtype, lse_ptr, saved_ptr);
}

void logprobs_bwd_op(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                     const std::optional<at::Tensor>& entropy,
                     const std::optional<at::Tensor>& grad_logp,
                     const std::optional<at::Tensor>& grad_entropy, const at::Tensor& out,
                     double inv_temperature, int64_t ignore_index) {
  const LogprobsRows r = rows_of(logits, labels, inv_temperature, ignore_index);
  if (r.n_rows == 0) return;
  check_cpu(out, "out");
  TORCH_CHECK(out.dim() == 3 && out.stride(2) == 1 && out.sizes() == logits.sizes(),
              "rlhf_kernels_native: out must be (B, T, V) like the logits with stride(-1) == 1, "
              "got ", out.sizes(), " strides ", out.strides());
  TORCH_CHECK(!grad_entropy.has_value() || entropy.has_value(),
              "rlhf_kernels_native: grad_entropy needs entropy");
  logprobs_bwd(r, fp32_vector(lse, r.n_rows, "lse"), fp32_vector(entropy, r.n_rows, "entropy"),
               fp32_vector(grad_logp, r.n_rows, "grad_logp"),
               fp32_vector(grad_entropy, r.n_rows, "grad_entropy"), out.data_ptr(),
               float_dtype(out, "out"), out.stride(0), out.stride(1));
}

// Output buffers of a few MiB that stay mapped between calls. glibc hands a freed block of that
// size back to the kernel (munmap, or a trim of the heap's top), so the next call's fresh output
// page-faults all over again: on a VM whose freed pages go back to the host that costs ~15 us a
// 4 KiB page, 13 ms for GAE's two 4 MiB outputs at 512 x 2048 against a 2 ms pass (measured on
// the development machine). This allocator keeps up to kMaxBlocks freed blocks of at least
// kMinBytes (kMaxBytes in all) and hands one back to the next request of the same size: a
// training loop's outputs keep their shapes from step to step. Smaller requests and a full cache
// go straight to c10's CPU allocation. The tensors are ordinary CPU tensors (resizable: a resize
// allocates through here again).
//
// Once allocator.cpp's block cache is installed as torch's CPU allocator, it does this job for
// every tensor under one cap (RLHF_CPU_CACHE_MIB) that counts what it keeps: the outputs then
// come from it (cached_fp32), and this cache frees what it held (release_all, called at the
// install) and what is given back to it afterwards, so it keeps nothing beside the block cache.
class OutputCache final : public c10::Allocator {
 public:
  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();  // never destroyed: tensors may outlive exit
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    void* ptr = nullptr;
    if (n >= kMinBytes) {
      std::lock_guard<std::mutex> guard(mutex_);
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {  // the most recent first
        if (it->bytes == n) {
          ptr = it->ptr;
          cached_bytes_ -= n;
          free_.erase(std::next(it).base());
          break;
        }
      }
    }
    if (ptr == nullptr && n > 0) ptr = c10::alloc_cpu(n);
    return {ptr, new Block{ptr, n}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // frees every cached block (the block cache was installed: it caches from now on)
  void release_all() {
    std::deque<Block> cached;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      cached.swap(free_);
      cached_bytes_ = 0;
    }
    for (const Block& block : cached) c10::free_cpu(block.ptr);
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };
  static constexpr size_t kMinBytes = size_t{1} << 20;
  static constexpr size_t kMaxBytes = size_t{64} << 20;
  static constexpr size_t kMaxBlocks = 8;

  static void release(void* context) {
    Block* block = static_cast<Block*>(context);
    get().give_back(*block);
    delete block;
  }

  void give_back(Block block) {
    if (block.ptr == nullptr) return;
    if (block.bytes >= kMinBytes && block.bytes <= kMaxBytes) {
      std::lock_guard<std::mutex> guard(mutex_);
      // read under the lock: the install sets the flag before release_all takes this lock, so
      // a block is either seen by release_all or not cached at all
      if (cpu_block_cache_installed()) {
        c10::free_cpu(block.ptr);
        return;
      }
      free_.push_back(block);
      cached_bytes_ += block.bytes;
      while (cached_bytes_ > kMaxBytes || free_.size() > kMaxBlocks) {  // the oldest goes
        cached_bytes_ -= free_.front().bytes;
        c10::free_cpu(free_.front().ptr);
        free_.pop_front();
      }
      return;
    }
    c10::free_cpu(block.ptr);
  }

  std::mutex mutex_;
  std::deque<Block> free_;
  size_t cached_bytes_ = 0;
};

// GAE's outputs: from the block cache when it is installed, else from OutputCache
at::Tensor cached_fp32(at::IntArrayRef sizes) {
  c10::Allocator* allocator =
      cpu_block_cache_installed() ? c10::GetCPUAllocator() : &OutputCache::get();
  return at::detail::empty_generic(sizes, allocator,
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), at::kFloat,
                                   std::nullopt);
}

// -> (advantages, returns): (rows, T) fp32 contiguous, from cached_fp32
std::tuple<at::Tensor, at::Tensor> gae_op(const at::Tensor& rewards, const at::Tensor& values,
                                          const std::optional<at::Tensor>& mask, double gamma,
                                          double lam) {
  for (const at::Tensor* t : {&rewards, &values}) check_cpu(*t, "input");
  TORCH_CHECK(rewards.dim() == 2 && values.sizes() == rewards.sizes(),
              "rlhf_kernels_native: gae takes (rows, T) tensors of one shape");
  at::Tensor advantages = cached_fp32(rewards.sizes());
  at::Tensor returns = cached_fp32(rewards.sizes());
  const uint8_t* mask_ptr = nullptr;
  int64_t msr = 0, msc = 0;
  if (mask.has_value()) {
    check_cpu(*mask, "mask");
    TORCH_CHECK((mask->scalar_type() == at::kBool || mask->scalar_type() == at::kByte) &&
                    mask->sizes() == rewards.sizes(),
                "rlhf_kernels_native: gae mask must be bool/uint8 of the rewards' shape");
    mask_ptr = static_cast<const uint8_t*>(mask->data_ptr());
    msr = mask->stride(0);
    msc = mask->stride(1);
  }
  if (rewards.numel() == 0) return {advantages, returns};
  Strided2d r{rewards.data_ptr(), float_dtype(rewards, "rewards"), rewards.stride(0),
              rewards.stride(1)};
  Strided2d v{values.data_ptr(), float_dtype(values, "values"), values.stride(0),
              values.stride(1)};
  gae(r, v, mask_ptr, msr, msc, rewards.size(0), rewards.size(1), static_cast<float>(gamma),
      static_cast<float>(lam), advantages.data_ptr<float>(), returns.data_ptr<float>(),
      advantages.stride(0));
  return {advantages, returns};
}

Strided2d strided(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 2, "rlhf_kernels_native: ", name, " must be (rows, cols), got ",
              t.sizes());
  return Strided2d{t.data_ptr(), float_dtype(t, name), t.stride(0), t.stride(1)};
}

void check_rows_out(const at::Tensor& out, const at::Tensor& like, const char* name) {
  check_cpu(out, name);
  TORCH_CHECK(out.dim() == 2 && out.sizes() == like.sizes() && out.stride(1) == 1,
              "rlhf_kernels_native: ", name, " must be rows of ", like.sizes(),
              " with stride(-1) == 1, got ", out.sizes(), " strides ", out.strides());
}

KlOptions kl_options(int64_t estimator, std::optional<double> clamp,
                     std::optional<double> log_ratio_clamp) {
  TORCH_CHECK(estimator >= 0 && estimator <= 3, "rlhf_kernels_native: estimator code ",
              estimator, " is not in [0, 3]");
  return KlOptions{estimator, clamp.has_value(), log_ratio_clamp.has_value(),
                   static_cast<float>(clamp.value_or(0.0)),
                   static_cast<float>(log_ratio_clamp.value_or(0.0))};
}

void kl_fwd_op(const at::Tensor& logp, const at::Tensor& ref, const at::Tensor& out,
               int64_t estimator, std::optional<double> clamp,
               std::optional<double> log_ratio_clamp) {
  const Strided2d l = strided(logp, "logp"), r = strided(ref, "ref_logp");
  TORCH_CHECK(ref.sizes() == logp.sizes(), "rlhf_kernels_native: logp and ref_logp differ");
  check_rows_out(out, logp, "out");
  TORCH_CHECK(out.scalar_type() == at::kFloat, "rlhf_kernels_native: kl out must be fp32");
  if (logp.numel() == 0) return;
  kl_fwd(l, r, out.data_ptr<float>(), out.stride(0), logp.size(0), logp.size(1),
         kl_options(estimator, clamp, log_ratio_clamp));
}

void kl_bwd_op(const at::Tensor& grad, const at::Tensor& logp, const at::Tensor& ref,
               const std::optional<at::Tensor>& grad_logp,
               const std::optional<at::Tensor>& grad_ref, int64_t estimator,
               std::optional<double> clamp, std::optional<double> log_ratio_clamp) {
  const Strided2d l = strided(logp, "logp"), r = strided(ref, "ref_logp");
  const Strided2d g = strided(grad, "grad");
  TORCH_CHECK(g.dtype == Dtype::f32 && grad.sizes() == logp.sizes() &&
                  ref.sizes() == logp.sizes(),
              "rlhf_kernels_native: kl_bwd takes an fp32 grad and inputs of one shape");
  int64_t out_stride = 0;
  void* gl = nullptr;
  void* gr = nullptr;
  if (grad_logp.has_value()) {
    check_rows_out(*grad_logp, logp, "grad_logp");
    TORCH_CHECK(grad_logp->scalar_type() == logp.scalar_type(), "grad_logp dtype");
    gl = grad_logp->data_ptr();
    out_stride = grad_logp->stride(0);
  }
  if (grad_ref.has_value()) {
    check_rows_out(*grad_ref, ref, "grad_ref");
    TORCH_CHECK(grad_ref->scalar_type() == ref.scalar_type(), "grad_ref dtype");
    TORCH_CHECK(!gl || grad_ref->stride(0) == out_stride, "gradient row strides differ");
    gr = grad_ref->data_ptr();
    out_stride = grad_ref->stride(0);
  }
  if (logp.numel() == 0 || (!gl && !gr)) return;
  kl_bwd(g, l, r, gl, gr, out_stride, logp.size(0), logp.size(1),
         kl_options(estimator, clamp, log_ratio_clamp));
}

void shape_rewards_op(const at::Tensor& scores, const at::Tensor& logp, const at::Tensor& ref,
                      const at::Tensor& mask, const std::optional<at::Tensor>& score_index,
                      const at::Tensor& out, double kl_coef, int64_t estimator,
                      std::optional<double> score_clip, std::optional<double> kl_clamp) {
  const Strided2d l = strided(logp, "logp"), r = strided(ref, "ref_logp");
  const int64_t n_rows = logp.size(0);
  TORCH_CHECK(ref.sizes() == logp.sizes(), "rlhf_kernels_native: logp and ref_logp differ");
  check_rows_out(out, logp, "out");
  TORCH_CHECK(out.scalar_type() == at::kFloat, "rlhf_kernels_native: rewards must be fp32");
  check_cpu(mask, "mask");
  TORCH_CHECK((mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte) &&
                  mask.sizes() == logp.sizes(),
              "rlhf_kernels_native: the mask must be bool/uint8 of logp's shape");
  fp32_vector(scores, n_rows, "scores");
  const int64_t* index = nullptr;
  if (score_index.has_value()) {
    check_cpu(*score_index, "score_index");
    TORCH_CHECK(score_index->scalar_type() == at::kLong && score_index->is_contiguous() &&
                    score_index->numel() == n_rows,
                "rlhf_kernels_native: score_index must be ", n_rows, " contiguous int64");
    index = score_index->data_ptr<int64_t>();
  }
  if (logp.numel() == 0) return;
  TORCH_CHECK(estimator >= 0 && estimator <= 3, "rlhf_kernels_native: estimator code");
  RewardOptions o{static_cast<float>(kl_coef), estimator, score_clip.has_value(),
                  kl_clamp.has_value(), static_cast<float>(score_clip.value_or(0.0)),
                  static_cast<float>(kl_clamp.value_or(0.0))};
  shape_rewards(scores.data_ptr<float>(), l, r, static_cast<const uint8_t*>(mask.data_ptr()),
                mask.stride(0), mask.stride(1), index, out.data_ptr<float>(), out.stride(0),
                n_rows, logp.size(1), o);
}

void masked_whiten_op(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                      const at::Tensor& out, bool shift_mean, bool unbiased, double eps) {
  check_cpu(x, "x");
  const int64_t n = x.numel();
  TORCH_CHECK(x.is_contiguous(), "rlhf_kernels_native: x must be contiguous");
  fp32_vector(out, n, "out");
  const uint8_t* mask_ptr = nullptr;
  if (mask.has_value()) {
    check_cpu(*mask, "mask");
    TORCH_CHECK((mask->scalar_type() == at::kBool || mask->scalar_type() == at::kByte) &&
                    mask->is_contiguous() && mask->numel() == n,
                "rlhf_kernels_native: the mask must be ", n, " contiguous bool/uint8");
    mask_ptr = static_cast<const uint8_t*>(mask->data_ptr());
  }
  if (n == 0) return;
  masked_whiten(x.data_ptr(), float_dtype(x, "x"), mask_ptr, n, shift_mean, unbiased,
                static_cast<float>(eps), out.data_ptr<float>());
}

// ---- losses.cpp ---------------------------------------------------------------------------
const uint8_t* mask_rows(const std::optional<at::Tensor>& mask, const at::Tensor& like,
                         int64_t* stride_row, int64_t* stride_col) {
  *stride_row = *stride_col = 0;
  if (!mask.has_value()) return nullptr;
  check_cpu(*mask, "mask");
  TORCH_CHECK((mask->scalar_type() == at::kBool || mask->scalar_type() == at::kByte) &&
                  mask->sizes() == like.sizes(),
              "rlhf_kernels_native: the mask must be bool/uint8 of shape ", like.sizes(),
              ", got ", mask->sizes(), " ", mask->scalar_type());
  *stride_row = mask->stride(0);
  *stride_col = mask->stride(1);
  return static_cast<const uint8_t*>(mask->data_ptr());
}

void check_like(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.sizes() == like.sizes(), "rlhf_kernels_native: ", name, " has shape ", t.sizes(),
              ", expected ", like.sizes());
}

at::Tensor fp32_empty(at::IntArrayRef sizes) { return at::detail::empty_cpu(sizes, at::kFloat,
                                                                            false, std::nullopt); }

// -> (loss () fp32, stats fp32, saved gradient (rows, T) fp32 contiguous)
std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_op(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& ref_logp,
    double ratio_low, double ratio_high, std::optional<double> dual_clip, double log_ratio_clamp,
    double kl_coef, int64_t reduction, int64_t policy, std::optional<double> normalizer,
    double tau_pos, double tau_neg) {
  PolicyLossArgs p{};
  p.logp = strided(logp, "logp");
  p.old = strided(old_logp, "old_logp");
  p.adv = strided(advantages, "advantages");
  check_like(old_logp, logp, "old_logp");
  check_like(advantages, logp, "advantages");
  p.kl = policy >> 4;  // bits as rlhf_kernels/ops/policy_loss.py's POLICY
  TORCH_CHECK(p.kl >= 0 && p.kl <= 4 && (p.kl == 0) != ref_logp.has_value(),
              "rlhf_kernels_native: ref_logp goes with a KL code (policy ", policy, ")");
  if (ref_logp.has_value()) {
    p.ref = strided(*ref_logp, "ref_logp");
    check_like(*ref_logp, logp, "ref_logp");
  }
  TORCH_CHECK(reduction >= 0 && reduction <= 4, "rlhf_kernels_native: reduction code ",
              reduction);
  p.mask = mask_rows(mask, logp, &p.mask_stride_row, &p.mask_stride_col);
  p.n_rows = logp.size(0);
  p.T = logp.size(1);
  p.ratio_low = static_cast<float>(ratio_low);
  p.ratio_high = static_cast<float>(ratio_high);
  p.has_dual = dual_clip.has_value();
  p.dual_clip = static_cast<float>(dual_clip.value_or(0.0));
  p.log_ratio_clamp = static_cast<float>(log_ratio_clamp);
  p.kl_coef = static_cast<float>(kl_coef);
  p.sequence = (policy & 2) != 0;
  p.cispo = (policy & 4) != 0;
  p.sapo = (policy & 8) != 0;
  p.tau_pos = static_cast<float>(tau_pos);
  p.tau_neg = static_cast<float>(tau_neg);
  p.reduction = reduction;
  p.has_normalizer = normalizer.has_value();
  p.normalizer = normalizer.value_or(0.0);
  const int64_t n_stats = 6 + (p.has_dual ? 1 : 0) + (p.kl != 0 ? 2 : 0);
  at::Tensor loss = fp32_empty({}), stats = fp32_empty({n_stats});
  at::Tensor saved = fp32_empty({p.n_rows, p.T});
  ppo_policy_loss(p, saved.data_ptr<float>(), loss.data_ptr<float>(), stats.data_ptr<float>());
  return {loss, stats, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_value_loss_op(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
    const std::optional<at::Tensor>& mask, std::optional<double> clip, int64_t reduction,
    std::optional<double> normalizer) {
  ValueLossArgs p{};
  p.values = strided(values, "values");
  p.old = strided(old_values, "old_values");
  p.returns = strided(returns, "returns");
  check_like(old_values, values, "old_values");
  check_like(returns, values, "returns");
  TORCH_CHECK(reduction >= 0 && reduction <= 4, "rlhf_kernels_native: reduction code ",
              reduction);
  p.mask = mask_rows(mask, values, &p.mask_stride_row, &p.mask_stride_col);
  p.n_rows = values.size(0);
  p.T = values.size(1);
  p.has_clip = clip.has_value();
  p.clip = static_cast<float>(clip.value_or(0.0));
  p.reduction = reduction;
  p.has_normalizer = normalizer.has_value();
  p.normalizer = normalizer.value_or(0.0);
  at::Tensor loss = fp32_empty({}), stats = fp32_empty({5});
  at::Tensor saved = fp32_empty({p.n_rows, p.T});
  ppo_value_loss(p, saved.data_ptr<float>(), loss.data_ptr<float>(), stats.data_ptr<float>());
  return {loss, stats, saved};
}

Strided2d strided1d(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 1, "rlhf_kernels_native: ", name, " must be 1-D, got ", t.sizes());
  return Strided2d{t.data_ptr(), float_dtype(t, name), 0, t.stride(0)};
}

// -> (loss, stats (4), saved gradients (2, pairs): d loss / d chosen, then d loss / d rejected)
std::tuple<at::Tensor, at::Tensor, at::Tensor> bradley_terry_op(
    const at::Tensor& chosen, const at::Tensor& rejected, const std::optional<at::Tensor>& margin,
    double margin_value, double center_coef) {
  BradleyTerryArgs p{};
  p.chosen = strided1d(chosen, "chosen");
  p.rejected = strided1d(rejected, "rejected");
  check_like(rejected, chosen, "rejected");
  if (margin.has_value()) {
    p.margin = strided1d(*margin, "margin");
    check_like(*margin, chosen, "margin");
  }
  p.n_pairs = chosen.size(0);
  TORCH_CHECK(p.n_pairs > 0, "rlhf_kernels_native: bradley_terry needs a pair");
  p.margin_value = static_cast<float>(margin_value);
  p.center_coef = static_cast<float>(center_coef);
  at::Tensor loss = fp32_empty({}), stats = fp32_empty({4});
  at::Tensor saved = fp32_empty({2, p.n_pairs});
  bradley_terry(p, saved.data_ptr<float>(), loss.data_ptr<float>(), stats.data_ptr<float>());
  return {loss, stats, saved};
}

at::Tensor group_advantages_op(const at::Tensor& scores, const std::optional<at::Tensor>& ids,
                               int64_t group_size, int64_t estimator, int64_t norm, double eps) {
  GroupAdvantagesArgs p{};
  p.scores = strided1d(scores, "scores");
  p.n = scores.size(0);
  if (ids.has_value()) {
    check_cpu(*ids, "group_ids");
    TORCH_CHECK(ids->scalar_type() == at::kLong && ids->dim() == 1 && ids->size(0) == p.n,
                "rlhf_kernels_native: group_ids must be (", p.n, ",) int64, got ", ids->sizes(),
                " ", ids->scalar_type());
    p.ids = ids->data_ptr<int64_t>();
    p.ids_stride = ids->stride(0);
  } else {
    TORCH_CHECK(group_size >= 1, "rlhf_kernels_native: group_size ", group_size);
  }
  TORCH_CHECK(estimator >= 0 && estimator <= 2 && norm >= 0 && norm <= 2,
              "rlhf_kernels_native: estimator / norm code");
  p.group_size = group_size;
  p.estimator = estimator;
  p.norm = norm;
  p.eps = eps;
  at::Tensor out = fp32_empty({p.n});
  group_advantages(p, out.data_ptr<float>());
  return out;
}

}  // namespace

void release_gae_output_cache() { OutputCache::get().release_all(); }

// allocator.cpp (kept free of torch's operator headers: it compiles in a second)
std::vector<int64_t> cpu_block_cache(int64_t max_cached_bytes);
std::vector<int64_t> cpu_block_cache_stats();
}  // namespace rlhf_native

TORCH_LIBRARY(rlhf_kernels_native, m) {
  m.def("ppo_policy_loss(Tensor logp, Tensor old_logp, Tensor advantages, Tensor? mask, "
        "Tensor? ref_logp, float ratio_low, float ratio_high, float? dual_clip, "
        "float log_ratio_clamp, float kl_coef, int reduction, int policy, float? normalizer, "
        "float tau_pos, float tau_neg) "
        "-> (Tensor, Tensor, Tensor)",
        &rlhf_native::ppo_policy_loss_op);
  m.def("ppo_value_loss(Tensor values, Tensor old_values, Tensor returns, Tensor? mask, "
        "float? clip, int reduction, float? normalizer) -> (Tensor, Tensor, Tensor)",
        &rlhf_native::ppo_value_loss_op);
  m.def("bradley_terry(Tensor chosen, Tensor rejected, Tensor? margin, float margin_value, "
        "float center_coef) -> (Tensor, Tensor, Tensor)",
        &rlhf_native::bradley_terry_op);
  m.def("group_advantages(Tensor scores, Tensor? group_ids, int group_size, int estimator, "
        "int norm, float eps) -> Tensor",
        &rlhf_native::group_advantages_op);
  m.def("logprobs_fwd(Tensor logits, Tensor labels, Tensor(a!) logp, Tensor(b!)? entropy, "
        "Tensor(c!) lse, Tensor(d!)? saved_entropy, float inv_temperature, int ignore_index) -> ()",
        &rlhf_native::logprobs_fwd_op);
  m.def("logprobs_bwd(Tensor logits, Tensor labels, Tensor lse, Tensor? entropy, "
        "Tensor? grad_logp, Tensor? grad_entropy, Tensor(a!) out, float inv_temperature, "
        "int ignore_index) -> ()",
        &rlhf_native::logprobs_bwd_op);
  m.def("gae(Tensor rewards, Tensor values, Tensor? mask, float gamma, float lam) "
        "-> (Tensor, Tensor)",
        &rlhf_native::gae_op);
  m.def("kl_fwd(Tensor logp, Tensor ref_logp, Tensor(a!) out, int estimator, float? clamp, "
        "float? log_ratio_clamp) -> ()",
        &rlhf_native::kl_fwd_op);
  m.def("kl_bwd(Tensor grad, Tensor logp, Tensor ref_logp, Tensor(a!)? grad_logp, "
        "Tensor(b!)? grad_ref, int estimator, float? clamp, float? log_ratio_clamp) -> ()",
        &rlhf_native::kl_bwd_op);
  m.def("shape_rewards(Tensor scores, Tensor logp, Tensor ref_logp, Tensor mask, "
        "Tensor? score_index, Tensor(a!) out, float kl_coef, int estimator, float? score_clip, "
        "float? kl_clamp) -> ()",
        &rlhf_native::shape_rewards_op);
  m.def("masked_whiten(Tensor x, Tensor? mask, Tensor(a!) out, bool shift_mean, bool unbiased, "
        "float eps) -> ()",
        &rlhf_native::masked_whiten_op);
  m.def("cpu_block_cache(int max_cached_bytes) -> int[]", &rlhf_native::cpu_block_cache);
  m.def("cpu_block_cache_stats() -> int[]", &rlhf_native::cpu_block_cache_stats);
}
