// The native CPU kernels as operators of the private namespace rlhf_kernels_native.
//
// These are not the public ops: the launchers of rlhf_kernels.ops.* call them (on CPU tensors,
// when the native backend is selected) inside the rlhf_kernels:: custom ops and inside the eager
// fast path, so torch.compile and autograd still see one rlhf_kernels:: op per function. Every
// output buffer is allocated by the Python launcher and written here (the (a!) annotations).
// The checks below guard the launcher contract (memory safety), not user input: the user-facing
// checks run in Python before dispatch, the same for every backend.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>

#include "common.h"

namespace rlhf_native {
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

void gae_op(const at::Tensor& rewards, const at::Tensor& values,
            const std::optional<at::Tensor>& mask, const at::Tensor& advantages,
            const at::Tensor& returns, double gamma, double lam) {
  for (const at::Tensor* t : {&rewards, &values, &advantages, &returns}) check_cpu(*t, "input");
  TORCH_CHECK(rewards.dim() == 2 && values.sizes() == rewards.sizes() &&
                  advantages.sizes() == rewards.sizes() && returns.sizes() == rewards.sizes(),
              "rlhf_kernels_native: gae takes (rows, T) tensors of one shape");
  TORCH_CHECK(advantages.scalar_type() == at::kFloat && returns.scalar_type() == at::kFloat &&
                  advantages.stride(1) == 1 && returns.strides() == advantages.strides(),
              "rlhf_kernels_native: gae outputs must be fp32 rows with stride(-1) == 1");
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
  if (rewards.numel() == 0) return;
  Strided2d r{rewards.data_ptr(), float_dtype(rewards, "rewards"), rewards.stride(0),
              rewards.stride(1)};
  Strided2d v{values.data_ptr(), float_dtype(values, "values"), values.stride(0),
              values.stride(1)};
  gae(r, v, mask_ptr, msr, msc, rewards.size(0), rewards.size(1), static_cast<float>(gamma),
      static_cast<float>(lam), advantages.data_ptr<float>(), returns.data_ptr<float>(),
      advantages.stride(0));
}

}  // namespace
}  // namespace rlhf_native

TORCH_LIBRARY(rlhf_kernels_native, m) {
  m.def("logprobs_fwd(Tensor logits, Tensor labels, Tensor(a!) logp, Tensor(b!)? entropy, "
        "Tensor(c!) lse, Tensor(d!)? saved_entropy, float inv_temperature, int ignore_index) -> ()",
        &rlhf_native::logprobs_fwd_op);
  m.def("logprobs_bwd(Tensor logits, Tensor labels, Tensor lse, Tensor? entropy, "
        "Tensor? grad_logp, Tensor? grad_entropy, Tensor(a!) out, float inv_temperature, "
        "int ignore_index) -> ()",
        &rlhf_native::logprobs_bwd_op);
  m.def("gae(Tensor rewards, Tensor values, Tensor? mask, Tensor(a!) advantages, "
        "Tensor(b!) returns, float gamma, float lam) -> ()",
        &rlhf_native::gae_op);
}
