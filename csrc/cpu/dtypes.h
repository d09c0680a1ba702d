// The element types themselves (c10::BFloat16 / c10::Half, fp32 vectors) for the kernels that
// work on them directly (logprobs.cpp: the vocabulary sweeps). The other kernels read their
// inputs through f32_row (common.h) and do not include this header: c10's dtype and vector
// headers cost more than a second of compile time per file.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "common.h"

namespace rlhf_native {

using Vec = at::vec::Vectorized<float>;

template <typename T>
inline float to_f32(T x) { return static_cast<float>(x); }

template <typename T>
inline T from_f32(float x) { return static_cast<T>(x); }

inline float hsum(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float total = 0.f;
  for (int i = 0; i < Vec::size(); ++i) total += lanes[i];
  return total;
}

inline float hmax(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float m = -kInf;
  for (int i = 0; i < Vec::size(); ++i) m = nan_max(m, lanes[i]);
  return m;
}

// dst[i] = float(src[i]) * scale, the block of a row the kernels work on (it stays in L1).
template <typename T>
inline void load_scaled(const T* __restrict src, float* __restrict dst, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_f32(src[i]) * scale;
}

template <typename T>
inline void store_from_f32(const float* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_f32<T>(src[i]);
}

// Calls f with a typed null pointer of the element type (dispatch on a runtime dtype).
template <typename F>
inline void dispatch_float(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::f32: f(static_cast<float*>(nullptr)); break;
    case Dtype::f64: f(static_cast<double*>(nullptr)); break;
    case Dtype::bf16: f(static_cast<c10::BFloat16*>(nullptr)); break;
    case Dtype::f16: f(static_cast<c10::Half*>(nullptr)); break;
  }
}

// Writes one fp32 value into an element of a buffer of the given dtype.
inline void store_one(void* base, Dtype dtype, int64_t i, float x) {
  dispatch_float(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    static_cast<T*>(base)[i] = from_f32<T>(x);
  });
}

}  // namespace rlhf_native
