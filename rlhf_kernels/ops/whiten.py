"""Masked whitening: one mean and variance over all valid tokens of the tensor, then normalise.

    n = sum(mask);  mean = sum(x * mask) / max(n, 1)
    var = sum(((x - mean) * mask)^2) / max(n - 1, 1)   (/ max(n, 1) when unbiased=False)
    out = ((x - mean) * rsqrt(var + eps) [+ mean when shift_mean=False]) * mask

Two launches and no host synchronisation:

1. ``_whiten_partials_kernel``: P programs (P <= 1024), each over a contiguous range of the
   flattened tensor, write (count, mean, M2) of their valid tokens. Within a block the sums are
   taken relative to the block's first valid value and M2 is a centred sum (no E[x^2] - E[x]^2
   cancellation, no large offset swamping the spread); blocks merge with Chan's parallel formula,
   in fp64 (scalar work only), so the global mean is not limited to fp32 resolution.
2. ``_whiten_fwd_kernel``: every program first merges the P partials itself (a fixed-order
   ``tl.reduce`` over at most 1024 triples, served from L2), then normalises its block.

Deterministic: no atomics; the reduction order depends only on the tensor size, so the same input
gives the same bits on every run. Every program of pass 2 computes the identical statistics.

Bytes: x and the mask are read twice (statistics, then normalisation) and the fp32 output is
written once: 2 x (itemsize + mask itemsize) + 4 B per token.

Not differentiable (it normalises advantages, which are data in PPO; inputs are detached).
Float64 inputs go to the float64 reference; the Triton path computes in fp32 (fp64 for the few
scalars of the statistics). Non-contiguous inputs are copied once into a contiguous buffer.
"""

import math

import torch
import triton
import triton.language as tl

from rlhf_kernels import _native, reference
from rlhf_kernels._alloc import empty
from rlhf_kernels._checks import check_float, check_same_device, check_same_shape, real_setting
from rlhf_kernels.backend import launch_directly, native_cpu_kernels, resolve_backend
from rlhf_kernels.ops._launch import CachedLaunch
from rlhf_kernels.ops._reduce import cdiv, next_power_of_2

__all__ = ["masked_whiten"]

_PARTIAL_BLOCK = 1024
_MAX_PARTIALS = 1024
_BLOCK = 2048


@triton.jit
def _chan_combine(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    # Merge two (count, mean, M2) summaries; empty ones (count 0) leave the other unchanged.
    count = count_a + count_b
    scale = 1.0 / tl.maximum(count, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * count_b * scale
    m2 = m2_a + m2_b + delta * delta * count_a * count_b * scale
    return count, mean, m2


@triton.jit
def _whiten_partials_kernel(
    x_ptr, mask_ptr, partials_ptr,
    n_elements, blocks_per_program, n_partials,
    HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    # The running summary is fp64: it costs nothing (a few scalars per block) and keeps the
    # global mean exact enough that whitening is limited by fp32 rounding of the output only.
    count = tl.zeros((), tl.float64)
    mean = tl.zeros((), tl.float64)
    m2 = tl.zeros((), tl.float64)
    for i in range(0, blocks_per_program):
        offsets = (pid.to(tl.int64) * blocks_per_program + i) * BLOCK + tl.arange(0, BLOCK)
        in_range = offsets < n_elements
        x = tl.load(x_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
        if HAS_MASK:
            valid = in_range & (tl.load(mask_ptr + offsets, mask=in_range, other=0) != 0)
        else:
            valid = in_range
        # Sums are taken relative to a pivot (the block's first valid value) so that a large
        # common offset (e.g. returns around 1000) does not swamp the spread in fp32.
        lane = tl.arange(0, BLOCK)
        first = tl.min(tl.where(valid, lane, BLOCK), axis=0)
        pivot = tl.sum(tl.where(lane == first, x, 0.0), axis=0)
        shifted = tl.where(valid, x - pivot, 0.0)
        block_count = tl.sum(valid.to(tl.float32), axis=0)
        shifted_mean = tl.sum(shifted, axis=0) / tl.maximum(block_count, 1.0)
        centred = tl.where(valid, shifted - shifted_mean, 0.0)
        block_m2 = tl.sum(centred * centred, axis=0)
        block_mean = pivot.to(tl.float64) + shifted_mean.to(tl.float64)
        count, mean, m2 = _chan_combine(count, mean, m2, block_count.to(tl.float64), block_mean,
                                        block_m2.to(tl.float64))
    tl.store(partials_ptr + pid, count)
    tl.store(partials_ptr + n_partials + pid, mean)
    tl.store(partials_ptr + 2 * n_partials + pid, m2)


@triton.jit
def _whiten_fwd_kernel(
    x_ptr, mask_ptr, partials_ptr, out_ptr,
    n_elements, n_partials,
    eps,
    SHIFT_MEAN: tl.constexpr, UNBIASED: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr, PARTIALS_BLOCK: tl.constexpr,
):
    p = tl.arange(0, PARTIALS_BLOCK)
    p_ok = p < n_partials
    counts = tl.load(partials_ptr + p, mask=p_ok, other=0.0)
    means = tl.load(partials_ptr + n_partials + p, mask=p_ok, other=0.0)
    m2s = tl.load(partials_ptr + 2 * n_partials + p, mask=p_ok, other=0.0)
    count, mean, m2 = tl.reduce((counts, means, m2s), 0, _chan_combine)
    if UNBIASED:
        var = m2 / tl.maximum(count - 1.0, 1.0)
    else:
        var = m2 / tl.maximum(count, 1.0)
    rstd = (1.0 / tl.sqrt(var + eps)).to(tl.float32)
    # x - mean as (x - mean_hi) - mean_lo: the fp64 mean split into two fp32 parts.
    mean_hi = mean.to(tl.float32)
    mean_lo = (mean - mean_hi.to(tl.float64)).to(tl.float32)

    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    if HAS_MASK:
        valid = tl.load(mask_ptr + offsets, mask=in_range, other=0) != 0
    else:
        valid = in_range
    out = ((x - mean_hi) - mean_lo) * rstd
    if not SHIFT_MEAN:
        out = out + mean_hi
    tl.store(out_ptr + offsets, tl.where(valid, out, 0.0), mask=in_range)


# Launches without Triton's per-call binding (ops/_launch.py)
_whiten_partials = CachedLaunch(globals(), "_whiten_partials_kernel")
_whiten_fwd = CachedLaunch(globals(), "_whiten_fwd_kernel")


def _launch(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    shift_mean: bool,
    unbiased: bool,
    eps: float,
    max_partials: int = 0,
) -> torch.Tensor:
    out = empty(x.shape, torch.float32, x.device)
    n_elements = x.numel()
    if n_elements == 0:
        return out
    # The kernels index the flattened tensor: a contiguous one is passed as it is (only its
    # pointer matters), anything else is copied once.
    x1 = x if x.is_contiguous() else x.reshape(-1).contiguous()
    if native_cpu_kernels(x):  # csrc/cpu/elementwise.cpp
        if mask is not None:
            if mask.dtype not in (torch.bool, torch.uint8):
                mask = mask != 0  # the kernel reads 0 / nonzero bytes (as the Triton load's != 0)
            mask = mask if mask.is_contiguous() else mask.contiguous()
        _native.ops().masked_whiten(x1, mask, out, shift_mean, unbiased, float(eps))
        return out
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes; Triton loads it as 0/1
    if mask is None:
        mask1 = x1  # placeholder pointer
    else:
        mask1 = mask if mask.is_contiguous() else mask.reshape(-1).contiguous()
    n_blocks = cdiv(n_elements, _PARTIAL_BLOCK)
    # Tests pass a small max_partials to make each program of pass 1 loop over several blocks.
    n_partials = min(n_blocks, max_partials or _MAX_PARTIALS)
    blocks_per_program = cdiv(n_blocks, n_partials)
    n_partials = cdiv(n_blocks, blocks_per_program)  # no program without work
    # Every slot is written by pass 1, so no poisoning is needed.
    partials = torch.empty(3 * n_partials, dtype=torch.float64, device=x.device)
    _whiten_partials((n_partials,),
        x1, mask1, partials,
        n_elements, blocks_per_program, n_partials,
        HAS_MASK=mask is not None, BLOCK=_PARTIAL_BLOCK, num_warps=4,
    )
    _whiten_fwd((cdiv(n_elements, _BLOCK),),
        x1, mask1, partials, out,
        n_elements, n_partials,
        float(eps),
        SHIFT_MEAN=shift_mean, UNBIASED=unbiased, HAS_MASK=mask is not None,
        BLOCK=_BLOCK, PARTIALS_BLOCK=next_power_of_2(n_partials), num_warps=8,
    )
    return out


@torch.library.custom_op("rlhf_kernels::masked_whiten", mutates_args=())
def _masked_whiten_op(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    shift_mean: bool,
    unbiased: bool,
    eps: float,
    max_partials: int = 0,
) -> torch.Tensor:
    """``_launch`` as a custom op: what torch.compile / export / torch.func see."""
    return _launch(x, mask, shift_mean, unbiased, eps, max_partials)


@_masked_whiten_op.register_fake
def _(x, mask, shift_mean, unbiased, eps, max_partials=0):
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Normalise x over its valid tokens (one mean / variance over the whole tensor, as TRL/veRL).

    x: (...) fp16/bf16/fp32/fp64; mask: same shape, bool/int/float or None (all valid)
    -> (...) fp32 (fp64 for fp64 input), no gradient. Masked positions output 0; no valid token
    at all gives all zeros; one valid token gives 0 there (x itself when shift_mean is False).
    """
    check_float("x", x)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        check_same_shape("mask", mask, "x", x)
        if not (mask.dtype == torch.bool or mask.dtype.is_floating_point
                or mask.dtype in _INT_DTYPES):
            raise ValueError(f"mask must be bool, integer or floating, got {mask.dtype}")
    check_same_device(("x", x), ("mask", mask))
    eps = real_setting("eps", eps)
    if not (0.0 <= eps < math.inf):
        raise ValueError(f"eps={eps} must be a finite number >= 0 (it is added to the variance;"
                         f" inf made every output 0)")
    if resolve_backend(x, backend, "masked_whiten") == "reference" or x.dtype == torch.float64:
        # detached as the kernel paths' output (no gradient, whatever the backend or dtype)
        return reference.masked_whiten(x.detach(), mask, shift_mean, unbiased, eps)
    if launch_directly(x, mask):
        # A fresh output with no autograd history: nothing to detach.
        return _launch(x, mask, bool(shift_mean), bool(unbiased), eps)
    return _masked_whiten_op(x.detach(), mask, bool(shift_mean), bool(unbiased), eps)
