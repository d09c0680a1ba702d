"""Clipped PPO policy loss, forward and backward fused into one sweep over the tokens.

Per valid token, with d = clamp(logp - old_logp, +-log_ratio_clamp) and r = e^d:

    l1 = -A r,  l2 = -A clip(r, 1 - clip_low, 1 + clip_high),  l = max(l1, l2)
    dual clip c (A < 0 only):  l = min(l, -A c)

    dl/dlogp = -A r  where the unclipped term l1 is taken (l2 <= l1; inside the clip range
               l1 == l2 and both terms give -A r), 0 where l2 > l1 (the clip bites),
               0 where the dual clip bites (-A c < l) and 0 where the log-ratio clamp bites.

Ties follow torch.maximum / torch.minimum (half the gradient to each side); the clamp bounds
themselves pass the gradient, as with torch.clamp. The loss is a masked weighted sum of l (see
``_reduce``): the forward kernel stores ``w_row * m * dl/dlogp`` per token and per-program
partial sums of the loss and of the stats (clipfrac, approx_kl = mean(d^2)/2, ppo_kl = mean(-d),
ratio mean / max, dual_clipfrac); a one-program kernel finishes them on the device. The backward
is ``saved * grad_loss * scale``. Gradients flow to ``logp`` only: old_logp, advantages and the
mask are rollout data.

Bytes per token: forward reads logp, old_logp, advantages (itemsize each) and the mask (1 B for
bool; read twice for seq-mean-token-mean), writes the fp32 saved gradient (4 B); backward reads
it and writes the gradient in logp's dtype. For bf16 inputs and a bool mask that is 11 + 6 =
17 B/token; at 64K tokens (1.1 MB) the op is launch-bound: two forward kernels, and a backward
that is one kernel under torch.compile and, in eager mode, two torch multiplies (plus a cast for
fp16/bf16 logp), cheaper on the host than an allocation and a Triton launch.

Precision: the Triton path loads fp16/bf16/fp32 and computes in fp32 (loss and stats are fp32);
float64 inputs go to the float64 reference.
"""


import torch
import triton
import triton.language as tl

from rlhf_kernels import reference
from rlhf_kernels._alloc import empty
from rlhf_kernels._checks import check_float, check_same_device, check_same_shape
from rlhf_kernels.backend import launch_directly, resolve_backend
from rlhf_kernels.ops._reduce import (
    SavedGradLoss,
    as_rows,
    check_mask,
    mask_for_kernel,
    next_power_of_2,
    reduction_code,
    reduction_denominator,
    row_tiles,
    row_token_count,
    saved_grad_scale,
)

__all__ = ["ppo_policy_loss"]

# Per-program partial sums, one column each (partials buffer is (_N_PARTIALS, programs)).
_P_LOSS, _P_TOKENS, _P_ROWS, _P_CLIP, _P_HALF_D2, _P_NEG_D, _P_RATIO, _P_RATIO_MAX, _P_DUAL = (
    range(9))
_N_PARTIALS = 9
# Layout of the stats output: the public stats, then the backward's scale.
_STAT_NAMES = ("clipfrac", "approx_kl", "ppo_kl", "ratio_mean", "ratio_max", "dual_clipfrac")
_S_SCALE = len(_STAT_NAMES)
_N_STATS = _S_SCALE + 1
_FINISH_BLOCK_MAX = 1024


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _ppo_policy_loss_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, saved_grad_ptr, partial_ptr,
    stride_lr, stride_lt, stride_or, stride_ot, stride_ar, stride_at, stride_mr, stride_mt,
    n_rows, T, n_programs,
    ratio_low, ratio_high, dual_clip, log_ratio_clamp,
    REDUCTION: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DUAL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_T)

    # Per-row weight of the reduction: only seq-mean-token-mean needs the row's token count
    # before the first gradient can be written, hence one pass over the row's mask first.
    if REDUCTION == 1:
        n_row = row_token_count(mask_ptr, rows * stride_mr, stride_mt, row_ok, T,
                                HAS_MASK, BLOCK_R, BLOCK_T)
        row_w = 1.0 / tl.maximum(n_row, 1.0)
    else:
        row_w = tl.full([BLOCK_R], 1.0, dtype=tl.float32)

    # Elementwise accumulators, reduced once at the end.
    acc_loss = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    acc_tokens = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    acc_clip = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    acc_half_d2 = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    acc_neg_d = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    acc_ratio = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    acc_ratio_max = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    acc_dual = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = (t0 + cols).to(tl.int64)
        inb = row_ok[:, None] & (t < T)[None, :]
        logp = tl.load(logp_ptr + rows[:, None] * stride_lr + t[None, :] * stride_lt, mask=inb,
                       other=0.0).to(tl.float32)
        old = tl.load(old_ptr + rows[:, None] * stride_or + t[None, :] * stride_ot, mask=inb,
                      other=0.0).to(tl.float32)
        adv = tl.load(adv_ptr + rows[:, None] * stride_ar + t[None, :] * stride_at, mask=inb,
                      other=0.0).to(tl.float32)
        if HAS_MASK:
            m = tl.load(mask_ptr + rows[:, None] * stride_mr + t[None, :] * stride_mt, mask=inb,
                        other=0)
            valid = inb & (m != 0)
        else:
            valid = inb

        d_raw = logp - old
        d = tl.minimum(tl.maximum(d_raw, -log_ratio_clamp), log_ratio_clamp)
        ratio = tl.exp(d)
        loss1 = -adv * ratio
        loss2 = -adv * tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
        clipped = loss2 > loss1
        loss = tl.maximum(loss1, loss2)
        # Inside the clip range l1 == l2 with equal gradients, so a tie needs no halving here.
        dloss = tl.where(clipped, 0.0, loss1)
        if HAS_DUAL:
            loss3 = -adv * dual_clip
            negative = adv < 0.0
            dual = negative & (loss3 < loss)
            tie = negative & (loss3 == loss)
            loss = tl.where(dual, loss3, loss)
            dloss = tl.where(dual, 0.0, tl.where(tie, 0.5 * dloss, dloss))
            acc_dual += tl.where(valid & dual, 1.0, 0.0)
        in_clamp = (d_raw >= -log_ratio_clamp) & (d_raw <= log_ratio_clamp)
        w = tl.where(valid, row_w[:, None], 0.0)
        grad = tl.where(valid & in_clamp, dloss * w, 0.0)
        tl.store(saved_grad_ptr + rows[:, None] * T + t[None, :], grad, mask=inb)

        # tl.where, not a multiply by the mask: padding may hold inf / NaN.
        acc_loss += tl.where(valid, loss * w, 0.0)
        acc_tokens += tl.where(valid, 1.0, 0.0)
        acc_clip += tl.where(valid & clipped, 1.0, 0.0)
        acc_half_d2 += tl.where(valid, 0.5 * d * d, 0.0)
        acc_neg_d += tl.where(valid, -d, 0.0)
        acc_ratio += tl.where(valid, ratio, 0.0)
        acc_ratio_max = tl.maximum(acc_ratio_max, tl.where(valid, ratio, 0.0))

    row_tokens = tl.sum(acc_tokens, axis=1)
    out = partial_ptr + pid
    tl.store(out + 0 * n_programs, tl.sum(tl.sum(acc_loss, axis=1), axis=0))
    tl.store(out + 1 * n_programs, tl.sum(row_tokens, axis=0))
    tl.store(out + 2 * n_programs, tl.sum(tl.where(row_tokens > 0, 1.0, 0.0), axis=0))
    tl.store(out + 3 * n_programs, tl.sum(tl.sum(acc_clip, axis=1), axis=0))
    tl.store(out + 4 * n_programs, tl.sum(tl.sum(acc_half_d2, axis=1), axis=0))
    tl.store(out + 5 * n_programs, tl.sum(tl.sum(acc_neg_d, axis=1), axis=0))
    tl.store(out + 6 * n_programs, tl.sum(tl.sum(acc_ratio, axis=1), axis=0))
    tl.store(out + 7 * n_programs, tl.max(tl.max(acc_ratio_max, axis=1), axis=0))
    tl.store(out + 8 * n_programs, tl.sum(tl.sum(acc_dual, axis=1), axis=0))


@triton.jit
def _ppo_policy_loss_finish_kernel(
    partial_ptr, loss_ptr, stats_ptr,
    n_programs, T,
    REDUCTION: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One program: column sums of the (9, n_programs) partials, then the scalar formulas.
    offs = tl.arange(0, BLOCK_P)
    s_loss = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_tokens = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_rows = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_clip = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_half_d2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_neg_d = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_ratio = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_ratio_max = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_dual = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, n_programs, BLOCK_P):
        p = p0 + offs
        ok = p < n_programs
        s_loss += tl.load(partial_ptr + 0 * n_programs + p, mask=ok, other=0.0)
        s_tokens += tl.load(partial_ptr + 1 * n_programs + p, mask=ok, other=0.0)
        s_rows += tl.load(partial_ptr + 2 * n_programs + p, mask=ok, other=0.0)
        s_clip += tl.load(partial_ptr + 3 * n_programs + p, mask=ok, other=0.0)
        s_half_d2 += tl.load(partial_ptr + 4 * n_programs + p, mask=ok, other=0.0)
        s_neg_d += tl.load(partial_ptr + 5 * n_programs + p, mask=ok, other=0.0)
        s_ratio += tl.load(partial_ptr + 6 * n_programs + p, mask=ok, other=0.0)
        s_ratio_max = tl.maximum(
            s_ratio_max, tl.load(partial_ptr + 7 * n_programs + p, mask=ok, other=0.0))
        s_dual += tl.load(partial_ptr + 8 * n_programs + p, mask=ok, other=0.0)
    n_tokens = tl.sum(s_tokens, axis=0)
    denom = reduction_denominator(n_tokens, tl.sum(s_rows, axis=0), T, REDUCTION)
    # Stats are means over valid tokens, 0 when there is none (numerators are 0 then too).
    n_safe = tl.maximum(n_tokens, 1.0)
    tl.store(loss_ptr, tl.sum(s_loss, axis=0) / denom)
    tl.store(stats_ptr + 0, tl.sum(s_clip, axis=0) / n_safe)
    tl.store(stats_ptr + 1, tl.sum(s_half_d2, axis=0) / n_safe)
    tl.store(stats_ptr + 2, tl.sum(s_neg_d, axis=0) / n_safe)
    tl.store(stats_ptr + 3, tl.sum(s_ratio, axis=0) / n_safe)
    tl.store(stats_ptr + 4, tl.max(s_ratio_max, axis=0))
    tl.store(stats_ptr + 5, tl.sum(s_dual, axis=0) / n_safe)
    tl.store(stats_ptr + 6, 1.0 / denom)


# --------------------------------------------------------------------------------------------
# launchers and autograd
# --------------------------------------------------------------------------------------------
def _launch(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    log_ratio_clamp: float | None,
    reduction: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> loss () fp32, stats (_N_STATS,) fp32, saved gradient (logp.shape) fp32 contiguous."""
    device = logp.device
    T = logp.shape[-1]
    logp2, old2, adv2 = as_rows(logp), as_rows(old_logp), as_rows(advantages)
    mask = mask_for_kernel(mask)
    mask2 = as_rows(mask) if mask is not None else logp2
    n_rows = logp2.shape[0]
    block_r, block_t, n_programs = row_tiles(n_rows, T)

    loss = empty((), torch.float32, device)
    stats = empty((_N_STATS,), torch.float32, device)
    saved_grad = empty(logp.shape, torch.float32, device)
    partials = empty((_N_PARTIALS, n_programs), torch.float32, device)
    _ppo_policy_loss_fwd_kernel[(n_programs,)](
        logp2, old2, adv2, mask2, saved_grad, partials,
        logp2.stride(0), logp2.stride(1), old2.stride(0), old2.stride(1),
        adv2.stride(0), adv2.stride(1), mask2.stride(0), mask2.stride(1),
        n_rows, T, n_programs,
        1.0 - clip_low, 1.0 + clip_high,
        0.0 if dual_clip is None else dual_clip,
        float("inf") if log_ratio_clamp is None else log_ratio_clamp,
        REDUCTION=reduction, HAS_MASK=mask is not None, HAS_DUAL=dual_clip is not None,
        BLOCK_R=block_r, BLOCK_T=block_t, num_warps=8 if block_r * block_t >= 2048 else 4,
    )
    _ppo_policy_loss_finish_kernel[(1,)](
        partials, loss, stats, n_programs, T,
        REDUCTION=reduction,
        BLOCK_P=min(next_power_of_2(n_programs), _FINISH_BLOCK_MAX), num_warps=4,
    )
    return loss, stats, saved_grad


@torch.library.custom_op("rlhf_kernels::ppo_policy_loss", mutates_args=())
def _ppo_policy_loss_op(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    log_ratio_clamp: float | None,
    reduction: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_launch`` as a custom op: what torch.compile / export / torch.func see."""
    return _launch(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip,
                   log_ratio_clamp, reduction)


@_ppo_policy_loss_op.register_fake
def _(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, log_ratio_clamp,
      reduction):
    return (
        logp.new_empty((), dtype=torch.float32),
        logp.new_empty((_N_STATS,), dtype=torch.float32),
        logp.new_empty(logp.shape, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    logp = inputs[0]
    _, stats, saved_grad = output
    ctx.mark_non_differentiable(stats, saved_grad)
    # Only the loss gets a gradient; don't let autograd build zero tensors for the others.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(saved_grad, stats)
    ctx.logp_dtype = logp.dtype


def _backward(ctx, grad_loss, grad_stats, grad_saved):
    saved_grad, stats = ctx.saved_tensors
    grad_logp = None
    if grad_loss is not None and ctx.needs_input_grad[0]:
        grad_logp = saved_grad_scale(saved_grad, grad_loss, stats, _S_SCALE, ctx.logp_dtype)
    return grad_logp, None, None, None, None, None, None, None, None


_ppo_policy_loss_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------
def _check_options(clip_low, clip_high, dual_clip, log_ratio_clamp) -> None:
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high)):
        if not float(value) >= 0.0:
            raise ValueError(
                f"{name}={value} must be >= 0 (the ratio is clipped to "
                "[1 - clip_low, 1 + clip_high]; PPO uses 0.2)"
            )
    if dual_clip is not None and not float(dual_clip) > 1.0:
        raise ValueError(
            f"dual_clip must be > 1 (veRL uses 3.0), got {dual_clip}; pass None to disable it"
        )
    if log_ratio_clamp is not None and not float(log_ratio_clamp) > 0.0:
        raise ValueError(
            f"log_ratio_clamp={log_ratio_clamp} must be > 0 (logp - old_logp is clamped to "
            "+-log_ratio_clamp; the default is 20), or None for no clamp"
        )


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    log_ratio_clamp: float | None = 20.0,
    reduction: str = "token-mean",
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate loss and its stats, from per-token log-probabilities.

    logp, old_logp, advantages: (..., T) fp16/bf16/fp32/fp64, same shape; mask: (..., T) bool /
    integer / float (nonzero = the token counts) or None (all count). Sequences are all leading
    dims, T the last one (for the seq-mean reductions).

    Returns ``(loss, stats)``: loss () fp32 (fp64 for fp64 input), differentiable with respect to
    ``logp`` only; stats (detached () tensors over valid tokens, 0 when there is none):
    clipfrac, approx_kl (mean d^2 / 2), ppo_kl (mean -d), ratio_mean, ratio_max, and
    dual_clipfrac when ``dual_clip`` is set.

    clip_low / clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
    dual_clip: c > 1; tokens with A < 0 take min(loss, -A c) (veRL: 3.0). log_ratio_clamp: d is
    clamped to +-this before exp (None: no clamp). reduction: "token-mean",
    "seq-mean-token-mean", "seq-mean-token-sum" or "seq-mean-token-sum-norm" (veRL names, see
    ``rlhf_kernels.reference.reduce_loss``). backend: "triton", "reference" or "auto".
    A fully masked row contributes 0 and an all-masked batch gives loss 0 with zero gradients.
    """
    for name, tensor in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages)):
        check_float(name, tensor)
    check_same_shape("old_logp", old_logp, "logp", logp)
    check_same_shape("advantages", advantages, "logp", logp)
    check_mask(mask, "logp", logp)
    check_same_device(("logp", logp), ("old_logp", old_logp), ("advantages", advantages),
                      ("mask", mask))
    if logp.dim() == 0:
        raise ValueError("logp must have at least one dim (..., T); got a 0-d tensor")
    code = reduction_code(reduction)
    _check_options(clip_low, clip_high, dual_clip, log_ratio_clamp)

    use_reference = torch.float64 in (logp.dtype, old_logp.dtype, advantages.dtype)
    if resolve_backend(logp, backend) == "reference" or use_reference:
        return reference.ppo_policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high,
                                         dual_clip, log_ratio_clamp, reduction)
    if torch.is_grad_enabled():
        for name, tensor in (("old_logp", old_logp), ("advantages", advantages)):
            if tensor.requires_grad:
                raise ValueError(
                    f"{name} requires grad, but the fused kernel differentiates with respect to "
                    f"logp only (rollout data are constants in PPO); pass {name}.detach(), or "
                    "backend='reference' if you really need that gradient"
                )
    args = (logp, old_logp, advantages, mask, float(clip_low), float(clip_high),
            None if dual_clip is None else float(dual_clip),
            None if log_ratio_clamp is None else float(log_ratio_clamp), code)
    if not launch_directly(logp, old_logp, advantages, mask):
        loss, stats, _ = _ppo_policy_loss_op(*args)
    elif torch.is_grad_enabled() and logp.requires_grad:
        loss, stats = SavedGradLoss.apply(_launch, _S_SCALE, *args)
    else:
        loss, stats, _ = _launch(*args)
    names = _STAT_NAMES if dual_clip is not None else _STAT_NAMES[:-1]
    # One unbind (not one indexing call per stat): host overhead matters at 64K tokens.
    return loss, dict(zip(names, stats.unbind(0)))
