"""Generalised advantage estimation as a parallel reverse scan over time.

The textbook loop, with masked positions skipped (veRL semantics, reference.gae):

    next_value_t = values at the nearest *valid* position s > t (0 when there is none)
    delta_t      = r_t + gamma * next_value_t - v_t
    A_t          = delta_t + gamma * lam * A_next        (A_next: A at that same position)
    returns_t    = A_t + v_t;   masked positions output A = 0 and returns = 0.

Both sequential dependencies are scans, run right to left with
``tl.associative_scan(..., reverse=True)``:

1. next_value: each position holds (is_valid, value) of the position one step to its right; the
   combine keeps the left-most valid one ("nearest valid to the right"). Loading the inputs shifted
   by one position makes the inclusive scan exclusive without shuffling registers.
2. A_t = b_t + a_t * A_{t+1} with (a, b) = (gamma * lam, delta_t) on valid positions and (1, 0)
   on masked ones (they pass A through unchanged). Affine maps compose associatively:
   (a_l, b_l) after (a_r, b_r) = (a_l * a_r, b_l + a_l * b_r).

Each program owns BLOCK_R rows (one for long rows, several for short ones) and walks them in
BLOCK_T-wide chunks from the right, carrying the next valid value and A_next across chunks, so T
is unbounded. gamma and lam are runtime floats (no recompilation per value).

Bytes per token: read rewards and values (itemsize each) and the mask, write fp32 advantages and
returns (8 B). The values/mask are read a second time at offset +1, which the caches serve.
Float64 inputs go to the float64 reference; the Triton path computes in fp32.
"""

import functools

import torch
import triton
import triton.language as tl

from rlhf_kernels import _native, reference
from rlhf_kernels._alloc import empty
from rlhf_kernels._checks import check_float, check_same_device, check_same_shape, real_setting
from rlhf_kernels.backend import launch_directly, native_cpu_kernels, resolve_backend
from rlhf_kernels.ops._launch import CachedLaunch
from rlhf_kernels.ops._reduce import cdiv, next_power_of_2

__all__ = ["gae"]

# One chunk covers T = 2048 (the main PPO shape) in a single sweep.
_MAX_BLOCK_T = 2048
# Elements per program when several short rows share one.
_ROW_PACK = 2048


@triton.jit
def _nearest_valid_combine(right_valid, right_value, left_valid, left_value):
    # Reverse scan: the accumulated (right) side comes first; keep the left-most valid entry.
    return tl.maximum(left_valid, right_valid), tl.where(left_valid != 0, left_value, right_value)


@triton.jit
def _affine_combine(right_a, right_b, left_a, left_b):
    # A = b_l + a_l * (b_r + a_r * A_beyond): compose the right map into the left one.
    return left_a * right_a, left_b + left_a * right_b


@triton.jit
def _gae_fwd_kernel(
    rewards_ptr, values_ptr, mask_ptr, adv_ptr, ret_ptr,
    stride_r_row, stride_r_col, stride_v_row, stride_v_col, stride_m_row, stride_m_col,
    stride_out_row,
    n_rows, n_cols,
    gamma, lam,
    HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows2 = rows[:, None]
    lane = tl.arange(0, BLOCK_T)
    gamma_lam = gamma * lam
    # Carried across chunks, per row: the value at the nearest valid position right of the chunk
    # (0 past the end) and A at that position (0 past the end).
    carry_value = tl.zeros((BLOCK_R,), tl.float32)
    carry_adv = tl.zeros((BLOCK_R,), tl.float32)
    n_chunks = tl.cdiv(n_cols, BLOCK_T)
    for i in range(0, n_chunks):
        start = (n_chunks - 1 - i).to(tl.int64) * BLOCK_T
        cols = (start + lane)[None, :]
        ok = row_ok[:, None] & (cols < n_cols)
        r = tl.load(rewards_ptr + rows2 * stride_r_row + cols * stride_r_col, mask=ok,
                    other=0.0).to(tl.float32)
        v = tl.load(values_ptr + rows2 * stride_v_row + cols * stride_v_col, mask=ok,
                    other=0.0).to(tl.float32)
        # The same inputs one position to the right (for the exclusive "next valid" scan).
        ok_next = row_ok[:, None] & (cols + 1 < n_cols)
        v_next = tl.load(values_ptr + rows2 * stride_v_row + (cols + 1) * stride_v_col,
                         mask=ok_next, other=0.0).to(tl.float32)
        if HAS_MASK:
            valid = ok & (tl.load(mask_ptr + rows2 * stride_m_row + cols * stride_m_col,
                                  mask=ok, other=0) != 0)
            valid_next = ok_next & (tl.load(
                mask_ptr + rows2 * stride_m_row + (cols + 1) * stride_m_col, mask=ok_next,
                other=0) != 0)
        else:
            valid = ok
            valid_next = ok_next
        valid_next_i = valid_next.to(tl.int32)
        has_next, next_value = tl.associative_scan(
            (valid_next_i, tl.where(valid_next, v_next, 0.0)), 1, _nearest_valid_combine,
            reverse=True)
        next_value = tl.where(has_next != 0, next_value, carry_value[:, None])

        delta = r + gamma * next_value - v
        a = tl.where(valid, gamma_lam, 1.0)
        b = tl.where(valid, delta, 0.0)
        a_acc, b_acc = tl.associative_scan((a, b), 1, _affine_combine, reverse=True)
        adv = b_acc + a_acc * carry_adv[:, None]

        out_offsets = rows2 * stride_out_row + cols
        tl.store(adv_ptr + out_offsets, tl.where(valid, adv, 0.0), mask=ok)
        tl.store(ret_ptr + out_offsets, tl.where(valid, adv + v, 0.0), mask=ok)

        # Next chunk to the left, read off the chunk's first position: A there (a masked one
        # carries A through) and the nearest valid value at or right of it.
        first = lane[None, :] == 0
        carry_adv = tl.sum(tl.where(first, adv, 0.0), axis=1)
        carry_value = tl.sum(tl.where(first, tl.where(valid, v, next_value), 0.0), axis=1)


# Launches without Triton's per-call binding (ops/_launch.py)
_gae_fwd = CachedLaunch(globals(), "_gae_fwd_kernel")


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(..., T) -> (rows, T) view (a copy only when the leading dims cannot be merged)."""
    return t if t.dim() == 2 else t.reshape(-1, n_cols)


@functools.lru_cache(maxsize=1024)
def _block_sizes(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_T, num_warps), cached per shape (a training loop has a handful)."""
    block_t = min(next_power_of_2(n_cols), _MAX_BLOCK_T)
    block_r = max(1, min(_ROW_PACK // block_t, next_power_of_2(n_rows)))
    num_warps = 8 if block_r * block_t >= 2048 else 4
    return block_r, block_t, num_warps


def _launch(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    gamma: float,
    lam: float,
    block_t: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    n_cols = rewards.shape[-1]
    if native_cpu_kernels(rewards) and rewards.numel():  # csrc/cpu/scans.cpp, one pass per row
        if mask is not None and mask.dtype not in (torch.bool, torch.uint8):
            mask = mask != 0  # the kernel reads 0 / nonzero bytes (as the Triton load's != 0)
        # it allocates the outputs (csrc/cpu/register.cpp: OutputCache keeps them mapped)
        advantages, returns = _native.ops().gae(
            *(None if t is None else _rows(t, n_cols) for t in (rewards, values, mask)),
            float(gamma), float(lam))
        return advantages.view(rewards.shape), returns.view(rewards.shape)
    advantages = empty(rewards.shape, torch.float32, rewards.device)
    returns = empty(rewards.shape, torch.float32, rewards.device)
    if rewards.numel() == 0:
        return advantages, returns
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes; Triton loads it as 0/1
    r2, v2, adv2, ret2 = (_rows(t, n_cols) for t in (rewards, values, advantages, returns))
    m2 = r2 if mask is None else _rows(mask, n_cols)  # placeholder pointer when there is none
    n_rows = r2.shape[0]
    block_r, auto_block_t, num_warps = _block_sizes(n_rows, n_cols)
    if block_t:  # tests force small chunks to exercise the carry across chunks
        block_r, auto_block_t = 1, block_t
    _gae_fwd((cdiv(n_rows, block_r),),
        r2, v2, m2, adv2, ret2,
        r2.stride(0), r2.stride(1), v2.stride(0), v2.stride(1), m2.stride(0), m2.stride(1),
        adv2.stride(0),
        n_rows, n_cols,
        float(gamma), float(lam),
        HAS_MASK=mask is not None, BLOCK_R=block_r, BLOCK_T=auto_block_t, num_warps=num_warps,
    )
    return advantages, returns


@torch.library.custom_op("rlhf_kernels::gae", mutates_args=())
def _gae_op(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    gamma: float,
    lam: float,
    block_t: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_launch`` as a custom op: what torch.compile / export / torch.func see."""
    return _launch(rewards, values, mask, gamma, lam, block_t)


@_gae_op.register_fake
def _(rewards, values, mask, gamma, lam, block_t=0):
    like = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    return like, torch.empty_like(like)


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns by GAE, masked positions skipped.

    rewards, values: (..., T) fp16/bf16/fp32/fp64; mask: (..., T) bool/int/float or None (all
    valid) -> (advantages, returns), each (..., T) fp32 (fp64 for fp64 input), no gradient.
    Masked positions output 0 in both; "next" means the next valid position; the value after a
    row's last valid token is 0. Any T; left/right padding and interior holes alike. gamma and
    lam are numbers in [0, 1].
    """
    check_float("rewards", rewards)
    check_float("values", values)
    if rewards.dim() == 0:
        raise ValueError("rewards must have a time dimension: expected (..., T), got a scalar")
    check_same_shape("values", values, "rewards", rewards)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        check_same_shape("mask", mask, "rewards", rewards)
        if not (mask.dtype == torch.bool or mask.dtype.is_floating_point
                or mask.dtype in _INT_DTYPES):
            raise ValueError(f"mask must be bool, integer or floating, got {mask.dtype}")
    check_same_device(("rewards", rewards), ("values", values), ("mask", mask))
    gamma, lam = real_setting("gamma", gamma), real_setting("lam", lam)
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= value <= 1.0:  # also refuses NaN, which made every advantage NaN
            raise ValueError(
                f"{name}={value} must be in [0, 1] (the discount gamma and the GAE lambda; "
                "PPO uses gamma 1.0 and lam 0.95)"
            )
    use_reference = torch.float64 in (rewards.dtype, values.dtype)
    if resolve_backend(rewards, backend, "gae") == "reference" or use_reference:
        return reference.gae(rewards, values, mask, gamma, lam)
    if launch_directly(rewards, values, mask):
        # Fresh outputs with no autograd history: nothing to detach.
        return _launch(rewards, values, mask, gamma, lam)
    return _gae_op(rewards.detach(), values.detach(), mask, gamma, lam)
