"""PPO reward shaping: per-token KL penalty plus the sequence score, one kernel per row.

    rewards[b, t] = -kl_coef * kl(logp[b, t], ref_logp[b, t]) * mask[b, t]
    rewards[b, score_index[b]] += clip(scores[b], -score_clip, score_clip)

``score_index[b]`` defaults to the last valid token of row b; a row with no valid token then gets
all-zero rewards (its score has nowhere to go). When ``score_index`` is given the score is added
there whatever the mask says, as the reference does; an index outside [0, T) makes the whole row
NaN (checked on the device: the score is never lost silently and nothing syncs with the host).

One program per row walks the row in blocks from right to left, so the last valid token is known
by the time the block that holds it is written: a single pass, reading logp, ref_logp and the mask
once (2 x itemsize + mask itemsize per token) and writing fp32 rewards (4 B per token).

Not differentiable: rewards are data in PPO (inputs are detached). Float64 inputs go to the
float64 reference; the Triton path computes in fp32.
"""


import torch
import triton
import triton.language as tl

from rlhf_kernels import _native, reference
from rlhf_kernels._alloc import empty
from rlhf_kernels._checks import (
    check_float,
    check_same_device,
    check_same_shape,
    finite_setting,
    real_setting,
)
from rlhf_kernels.backend import launch_directly, native_cpu_kernels, resolve_backend
from rlhf_kernels.ops._launch import CachedLaunch
from rlhf_kernels.ops._reduce import NAN, next_power_of_2
from rlhf_kernels.ops.kl import KL_ESTIMATOR_CODES, check_kl_options, kl_estimate

__all__ = ["shape_rewards"]

_MAX_BLOCK = 1024


@triton.jit
def _shape_rewards_fwd_kernel(
    scores_ptr, logp_ptr, ref_ptr, mask_ptr, index_ptr, out_ptr,
    stride_scores, stride_index,
    stride_logp_row, stride_logp_col, stride_ref_row, stride_ref_col,
    stride_mask_row, stride_mask_col, stride_out_row,
    n_cols,
    kl_coef, score_clip, kl_clamp,
    ESTIMATOR: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_SCORE_CLIP: tl.constexpr,
    HAS_KL_CLAMP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    score = tl.load(scores_ptr + row * stride_scores).to(tl.float32)
    if HAS_SCORE_CLIP:
        score = tl.minimum(tl.maximum(score, -score_clip, NAN), score_clip, NAN)
    # target: the column that receives the score; -1 = not known yet (or the row has none).
    if HAS_INDEX:
        target = tl.load(index_ptr + row * stride_index).to(tl.int64)
    else:
        target = tl.full((), -1, tl.int64)
    n_blocks = tl.cdiv(n_cols, BLOCK)
    for i in range(0, n_blocks):
        # Right to left: the first block with a valid token holds the row's last valid token.
        cols = (n_blocks - 1 - i).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_row = cols < n_cols
        logp = tl.load(logp_ptr + row * stride_logp_row + cols * stride_logp_col, mask=in_row,
                       other=0.0).to(tl.float32)
        ref = tl.load(ref_ptr + row * stride_ref_row + cols * stride_ref_col, mask=in_row,
                      other=0.0).to(tl.float32)
        valid = tl.load(mask_ptr + row * stride_mask_row + cols * stride_mask_col, mask=in_row,
                        other=0) != 0
        valid = valid & in_row
        kl = kl_estimate(logp - ref, ESTIMATOR)
        if HAS_KL_CLAMP:
            kl = tl.minimum(tl.maximum(kl, -kl_clamp, NAN), kl_clamp, NAN)
        rewards = tl.where(valid, -kl_coef * kl, 0.0)
        if not HAS_INDEX:
            last_here = tl.max(tl.where(valid, cols, -1), axis=0)
            target = tl.where(target < 0, last_here, target)
        rewards += tl.where(cols == target, score, 0.0)
        if HAS_INDEX:
            rewards = tl.where((target < 0) | (target >= n_cols), float("nan"), rewards)
        tl.store(out_ptr + row * stride_out_row + cols, rewards, mask=in_row)


# Launches without Triton's per-call binding (ops/_launch.py)
_rewards_fwd = CachedLaunch(globals(), "_shape_rewards_fwd_kernel")


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(..., T) -> (rows, T) view (a copy only when the leading dims cannot be merged)."""
    return t if t.dim() == 2 else t.reshape(-1, n_cols)


def _launch(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: int,
    score_index: torch.Tensor | None,
    score_clip: float | None,
    kl_clamp: float | None,
) -> torch.Tensor:
    out = empty(logp.shape, torch.float32, logp.device)
    if logp.numel() == 0:
        return out
    n_cols = logp.shape[-1]
    if native_cpu_kernels(logp):  # csrc/cpu/elementwise.cpp
        if mask.dtype not in (torch.bool, torch.uint8):
            mask = mask != 0  # the kernel reads 0 / nonzero bytes (as the Triton load's != 0)
        scores1 = scores.reshape(-1).to(torch.float32).contiguous()
        index1 = (None if score_index is None
                  else score_index.reshape(-1).to(torch.int64).contiguous())
        _native.ops().shape_rewards(
            scores1, *(_rows(t, n_cols) for t in (logp, ref_logp, mask)), index1,
            _rows(out, n_cols), float(kl_coef), estimator, score_clip, kl_clamp)
        return out
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes; Triton loads it as 0/1
    logp2, ref2, mask2, out2 = (_rows(t, n_cols) for t in (logp, ref_logp, mask, out))
    scores1 = scores.reshape(-1)
    index1 = scores1 if score_index is None else score_index.reshape(-1)
    _rewards_fwd((logp2.shape[0],),
        scores1, logp2, ref2, mask2, index1, out2,
        scores1.stride(0), index1.stride(0),
        logp2.stride(0), logp2.stride(1), ref2.stride(0), ref2.stride(1),
        mask2.stride(0), mask2.stride(1), out2.stride(0),
        n_cols,
        float(kl_coef), 0.0 if score_clip is None else float(score_clip),
        0.0 if kl_clamp is None else float(kl_clamp),
        ESTIMATOR=estimator, HAS_INDEX=score_index is not None,
        HAS_SCORE_CLIP=score_clip is not None, HAS_KL_CLAMP=kl_clamp is not None,
        BLOCK=min(next_power_of_2(n_cols), _MAX_BLOCK), num_warps=4,
    )
    return out


@torch.library.custom_op("rlhf_kernels::shape_rewards", mutates_args=())
def _shape_rewards_op(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: int,
    score_index: torch.Tensor | None,
    score_clip: float | None,
    kl_clamp: float | None,
) -> torch.Tensor:
    """``_launch`` as a custom op: what torch.compile / export / torch.func see."""
    return _launch(scores, logp, ref_logp, mask, kl_coef, estimator, score_index, score_clip,
                   kl_clamp)


@_shape_rewards_op.register_fake
def _(scores, logp, ref_logp, mask, kl_coef, estimator, score_index, score_clip, kl_clamp):
    return torch.empty(logp.shape, dtype=torch.float32, device=logp.device)


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_inputs(scores, logp, ref_logp, mask, score_index, score_clip, check_index) -> None:
    check_float("scores", scores)
    check_float("logp", logp)
    check_float("ref_logp", ref_logp)
    if logp.dim() == 0:
        raise ValueError("logp must have a time dimension: expected (..., T), got a scalar")
    check_same_shape("ref_logp", ref_logp, "logp", logp)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    check_same_shape("mask", mask, "logp", logp)
    if not (mask.dtype == torch.bool or mask.dtype.is_floating_point or mask.dtype in _INT_DTYPES):
        raise ValueError(f"mask must be bool, integer or floating, got {mask.dtype}")
    if scores.shape != logp.shape[:-1]:
        raise ValueError(
            f"scores has shape {tuple(scores.shape)} but logp has shape {tuple(logp.shape)}; "
            f"expected one score per sequence, shape {tuple(logp.shape[:-1])}"
        )
    if score_index is not None and not isinstance(score_index, torch.Tensor):
        raise TypeError(f"score_index must be a (B,) integer torch.Tensor or None, got "
                        f"{type(score_index).__name__}")
    check_same_device(("scores", scores), ("logp", logp), ("ref_logp", ref_logp),
                      ("mask", mask), ("score_index", score_index))
    if score_clip is not None and not (score_clip >= 0.0):
        raise ValueError(f"score_clip={score_clip} must be a non-negative bound, or None")
    if score_index is None:
        return
    if score_index.dtype not in _INT_DTYPES:
        raise ValueError(f"score_index must be an integer tensor, got {score_index.dtype}")
    if score_index.shape != scores.shape:
        raise ValueError(
            f"score_index has shape {tuple(score_index.shape)} but scores has shape "
            f"{tuple(scores.shape)}; they must match (one position per sequence)"
        )
    # A range check needs the values on the host (one sync), so it is opt-in; without it an
    # out-of-range index gives a NaN row on the device (never a read out of bounds).
    if check_index and score_index.numel():
        T = logp.shape[-1]
        lo, hi = int(score_index.min()), int(score_index.max())
        if lo < 0 or hi >= T:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"score_index holds {bad}, outside [0, {T}) for sequences of length T={T}; "
                "score_index[b] is the position in row b that receives the score"
            )


def shape_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor | None,
    kl_coef: float,
    estimator: str = "k1",
    score_index: torch.Tensor | None = None,
    score_clip: float | None = None,
    kl_clamp: float | None = None,
    *,
    check_index: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-token PPO rewards: KL penalty on valid tokens plus the sequence score.

    scores: (...) fp16/bf16/fp32/fp64, one per sequence; logp, ref_logp: (..., T) float;
    mask: (..., T) bool/int/float (1 = valid), or None (every token valid); score_index: (...)
    integer in [0, T) or None (the last valid token of each row) -> rewards (..., T) fp32 (fp64
    for fp64 input), no grad.

    estimator: KL estimator as in ``kl_penalty``; kl_clamp clamps the per-token KL to +-kl_clamp;
    score_clip clamps the score to +-score_clip. Works with left or right padding and with masked
    holes inside a row; an all-masked row gets all-zero rewards (unless score_index is given).
    Masked positions may hold anything (NaN, inf): they output 0 and affect nothing else.

    A ``score_index`` outside [0, T) makes its whole row NaN (no host sync by default);
    ``check_index=True`` instead raises a ValueError naming the bad index, at the cost of one
    host sync (one min/max reduction) per call.
    """
    kl_coef = finite_setting("kl_coef", kl_coef, "the weight of the KL penalty in the rewards; "
                             "0 for none")
    score_clip = real_setting("score_clip", score_clip, none_ok=True)
    kl_clamp = real_setting("kl_clamp", kl_clamp, none_ok=True)
    if mask is None and isinstance(logp, torch.Tensor):  # every token counts (design §1.1)
        mask = torch.ones(logp.shape, dtype=torch.bool, device=logp.device)
    _check_inputs(scores, logp, ref_logp, mask, score_index, score_clip, check_index)
    check_kl_options(estimator, kl_clamp=kl_clamp)
    use_reference = torch.float64 in (scores.dtype, logp.dtype, ref_logp.dtype)
    if resolve_backend(logp, backend, "shape_rewards") == "reference" or use_reference:
        return reference.shape_rewards(scores, logp, ref_logp, mask, kl_coef, estimator,
                                       score_index, score_clip, kl_clamp)
    options = (kl_coef, KL_ESTIMATOR_CODES[estimator], score_index, score_clip, kl_clamp)
    if launch_directly(scores, logp, ref_logp, mask, score_index):
        # Fresh output with no autograd history: nothing to detach.
        return _launch(scores, logp, ref_logp, mask, *options)
    return _shape_rewards_op(scores.detach(), logp.detach(), ref_logp.detach(), mask, *options)
