"""Clipped PPO value loss, forward and backward fused into one sweep over the tokens.

Per valid token, with v the values, R the returns and o the old values:

    l1 = (v - R)^2,  v_c = o + clip(v - o, -clip, clip),  l2 = (v_c - R)^2,  l = max(l1, l2) / 2

    dl/dv = v - R                   where l1 > l2
            (v_c - R) [|v - o| <= clip]   where l2 > l1 (0 once the clip bites)
            the mean of both        on a tie (torch.maximum halves the gradient)

Without ``clip`` l = (v - R)^2 / 2. The loss is a masked weighted sum of l (see ``_reduce``): the
forward kernel stores ``w_row * m * dl/dv`` per token and per-program partials of the loss and
the stats; a one-program kernel finishes them on the device, dividing by the reduction's outer
denominator or by ``normalizer`` in its place (a tensor normalizer is loaded there: no host
sync); the backward is ``saved * grad_loss * scale``. Gradients flow to ``values`` only.

Stats: clipfrac, explained_variance = 1 - Var(R - v) / Var(R) (biased variances over valid
tokens, 0 when Var(R) == 0), value_mean, return_mean. The variances are exact-merge Welford:
every lane of a program keeps (count, mean, M2) over its time steps, a program merges its lanes
and the finish kernel merges the programs (Chan et al.), so there is no E[x^2] - E[x]^2
cancellation however large the returns' mean.

Bytes per token: forward reads values, old_values, returns (itemsize each; old_values not at
all without clip) and the mask (1 B for bool; twice for seq-mean-token-mean), writes the fp32
saved gradient (4 B); backward reads it and writes the gradient in values' dtype.

Precision: the Triton path loads fp16/bf16/fp32 and computes in fp32 (loss and stats fp32);
float64 inputs go to the float64 reference.
"""

import torch
import triton
import triton.language as tl

from rlhf_kernels import _native_losses, reference
from rlhf_kernels._alloc import empty
from rlhf_kernels._checks import (
    check_float,
    check_same_device,
    check_same_shape,
    normalizer_setting,
    real_setting,
)
from rlhf_kernels.backend import launch_directly, native_cpu_kernels, resolve_backend
from rlhf_kernels.ops._launch import CachedLaunch
from rlhf_kernels.ops._reduce import (
    NAN,
    NORMALIZER_NONE,
    apply_saved_grad_loss,
    as_rows,
    check_mask,
    loss_denominator,
    mask_for_kernel,
    next_power_of_2,
    no_double_backward,
    normalizer_args,
    reduction_code,
    row_tiles,
    row_token_count,
    saved_grad_scale,
)

__all__ = ["ppo_value_loss"]

# Per-program partials (rows of the (_N_PARTIALS, programs) buffer): loss, tokens, rows with a
# token, clipped tokens, sum of v, then (mean, M2) of the error R - v and of the returns R.
_N_PARTIALS = 9
_STAT_NAMES = ("clipfrac", "explained_variance", "value_mean", "return_mean")
_S_SCALE = len(_STAT_NAMES)
_N_STATS = _S_SCALE + 1
_FINISH_BLOCK_MAX = 1024


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _welford_lanes(count, mean, m2, x, valid):
    """Add x to every lane's running (count, mean, M2) where valid; count already includes x."""
    delta = x - mean
    mean = mean + tl.where(valid, delta / tl.maximum(count, 1.0), 0.0)
    m2 = m2 + tl.where(valid, delta * (x - mean), 0.0)
    return mean, m2


@triton.jit
def _merge_lanes(count, mean, m2, total):
    """Chan's merge of per-lane (count, mean, M2) tiles into one (mean, M2)."""
    merged_mean = tl.sum(tl.sum(count * mean, axis=1), axis=0) / tl.maximum(total, 1.0)
    spread = count * (mean - merged_mean) * (mean - merged_mean)
    merged_m2 = tl.sum(tl.sum(m2 + spread, axis=1), axis=0)
    return merged_mean, merged_m2


@triton.jit
def _ppo_value_loss_fwd_kernel(
    values_ptr, old_ptr, returns_ptr, mask_ptr, saved_grad_ptr, partial_ptr,
    stride_vr, stride_vt, stride_or, stride_ot, stride_rr, stride_rt, stride_mr, stride_mt,
    n_rows, T, n_programs,
    clip,
    REDUCTION: tl.constexpr, HAS_MASK: tl.constexpr, HAS_CLIP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_T)

    if REDUCTION == 1:
        n_row = row_token_count(mask_ptr, rows * stride_mr, stride_mt, row_ok, T,
                                HAS_MASK, BLOCK_R, BLOCK_T)
        row_w = 1.0 / tl.maximum(n_row, 1.0)
    else:
        row_w = tl.full([BLOCK_R], 1.0, dtype=tl.float32)

    acc_loss = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    acc_clip = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    acc_values = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    count = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    err_mean = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    err_m2 = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    ret_mean = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    ret_m2 = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = (t0 + cols).to(tl.int64)
        inb = row_ok[:, None] & (t < T)[None, :]
        v = tl.load(values_ptr + rows[:, None] * stride_vr + t[None, :] * stride_vt, mask=inb,
                    other=0.0).to(tl.float32)
        ret = tl.load(returns_ptr + rows[:, None] * stride_rr + t[None, :] * stride_rt,
                      mask=inb, other=0.0).to(tl.float32)
        if HAS_MASK:
            m = tl.load(mask_ptr + rows[:, None] * stride_mr + t[None, :] * stride_mt, mask=inb,
                        other=0)
            valid = inb & (m != 0)
        else:
            valid = inb

        err = v - ret
        loss1 = err * err
        if HAS_CLIP:
            old = tl.load(old_ptr + rows[:, None] * stride_or + t[None, :] * stride_ot,
                          mask=inb, other=0.0).to(tl.float32)
            step = v - old
            v_clipped = old + tl.minimum(tl.maximum(step, -clip, NAN), clip, NAN)
            err_clipped = v_clipped - ret
            loss2 = err_clipped * err_clipped
            # torch.clamp passes the gradient on [-clip, clip], bounds included.
            grad2 = tl.where((step >= -clip) & (step <= clip), err_clipped, 0.0)
            clipped = loss2 > loss1
            loss = 0.5 * tl.maximum(loss1, loss2, NAN)
            dloss = tl.where(clipped, grad2, tl.where(loss1 > loss2, err, 0.5 * (err + grad2)))
            acc_clip += tl.where(valid & clipped, 1.0, 0.0)
        else:
            loss = 0.5 * loss1
            dloss = err
        w = tl.where(valid, row_w[:, None], 0.0)
        tl.store(saved_grad_ptr + rows[:, None] * T + t[None, :], tl.where(valid, dloss * w, 0.0),
                 mask=inb)

        acc_loss += tl.where(valid, loss * w, 0.0)
        acc_values += tl.where(valid, v, 0.0)
        count += tl.where(valid, 1.0, 0.0)
        err_mean, err_m2 = _welford_lanes(count, err_mean, err_m2, ret - v, valid)
        ret_mean, ret_m2 = _welford_lanes(count, ret_mean, ret_m2, ret, valid)

    row_tokens = tl.sum(count, axis=1)
    n_tokens = tl.sum(row_tokens, axis=0)
    err_mean_p, err_m2_p = _merge_lanes(count, err_mean, err_m2, n_tokens)
    ret_mean_p, ret_m2_p = _merge_lanes(count, ret_mean, ret_m2, n_tokens)
    out = partial_ptr + pid
    tl.store(out + 0 * n_programs, tl.sum(tl.sum(acc_loss, axis=1), axis=0))
    tl.store(out + 1 * n_programs, n_tokens)
    tl.store(out + 2 * n_programs, tl.sum(tl.where(row_tokens > 0, 1.0, 0.0), axis=0))
    tl.store(out + 3 * n_programs, tl.sum(tl.sum(acc_clip, axis=1), axis=0))
    tl.store(out + 4 * n_programs, tl.sum(tl.sum(acc_values, axis=1), axis=0))
    tl.store(out + 5 * n_programs, err_mean_p)
    tl.store(out + 6 * n_programs, err_m2_p)
    tl.store(out + 7 * n_programs, ret_mean_p)
    tl.store(out + 8 * n_programs, ret_m2_p)


@triton.jit
def _ppo_value_loss_finish_kernel(
    partial_ptr, loss_ptr, stats_ptr, norm_ptr,
    n_programs, T, norm_value,
    REDUCTION: tl.constexpr, NORMALIZER: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One program. First pass: sums and the global means; second: merge the programs' M2.
    offs = tl.arange(0, BLOCK_P)
    s_loss = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_tokens = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_rows = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_clip = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_values = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_err = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_ret = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, n_programs, BLOCK_P):
        p = p0 + offs
        ok = p < n_programs
        n_p = tl.load(partial_ptr + 1 * n_programs + p, mask=ok, other=0.0)
        s_loss += tl.load(partial_ptr + 0 * n_programs + p, mask=ok, other=0.0)
        s_tokens += n_p
        s_rows += tl.load(partial_ptr + 2 * n_programs + p, mask=ok, other=0.0)
        s_clip += tl.load(partial_ptr + 3 * n_programs + p, mask=ok, other=0.0)
        s_values += tl.load(partial_ptr + 4 * n_programs + p, mask=ok, other=0.0)
        s_err += n_p * tl.load(partial_ptr + 5 * n_programs + p, mask=ok, other=0.0)
        s_ret += n_p * tl.load(partial_ptr + 7 * n_programs + p, mask=ok, other=0.0)
    n_tokens = tl.sum(s_tokens, axis=0)
    n_safe = tl.maximum(n_tokens, 1.0)
    err_mean = tl.sum(s_err, axis=0) / n_safe
    ret_mean = tl.sum(s_ret, axis=0) / n_safe

    s_err_m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_ret_m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, n_programs, BLOCK_P):
        p = p0 + offs
        ok = p < n_programs
        n_p = tl.load(partial_ptr + 1 * n_programs + p, mask=ok, other=0.0)
        d_err = tl.load(partial_ptr + 5 * n_programs + p, mask=ok, other=0.0) - err_mean
        d_ret = tl.load(partial_ptr + 7 * n_programs + p, mask=ok, other=0.0) - ret_mean
        s_err_m2 += tl.load(partial_ptr + 6 * n_programs + p, mask=ok, other=0.0)
        s_err_m2 += n_p * d_err * d_err
        s_ret_m2 += tl.load(partial_ptr + 8 * n_programs + p, mask=ok, other=0.0)
        s_ret_m2 += n_p * d_ret * d_ret
    var_err = tl.sum(s_err_m2, axis=0) / n_safe
    var_ret = tl.sum(s_ret_m2, axis=0) / n_safe
    explained = tl.where(var_ret > 0.0, 1.0 - var_err / tl.maximum(var_ret, 1e-30), 0.0)

    denom = loss_denominator(n_tokens, tl.sum(s_rows, axis=0), T, norm_value, norm_ptr,
                             REDUCTION, NORMALIZER)
    tl.store(loss_ptr, tl.sum(s_loss, axis=0) / denom)
    tl.store(stats_ptr + 0, tl.sum(s_clip, axis=0) / n_safe)
    tl.store(stats_ptr + 1, explained)
    tl.store(stats_ptr + 2, tl.sum(s_values, axis=0) / n_safe)
    tl.store(stats_ptr + 3, ret_mean)
    tl.store(stats_ptr + 4, 1.0 / denom)


# Launches without Triton's per-call binding (ops/_launch.py)
_value_fwd = CachedLaunch(globals(), "_ppo_value_loss_fwd_kernel")
_value_finish = CachedLaunch(globals(), "_ppo_value_loss_finish_kernel")


# --------------------------------------------------------------------------------------------
# launchers and autograd
# --------------------------------------------------------------------------------------------
def _launch(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor | None,
    normalizer: torch.Tensor | None,
    clip: float | None,
    reduction: int,
    normalizer_value: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> loss () fp32, stats (_N_STATS,) fp32, saved gradient (values.shape) fp32 contiguous.

    normalizer (a 0-d tensor) or normalizer_value replaces the reduction's outer denominator
    (``_reduce.normalizer_args``); both None: the reduction's own."""
    if native_cpu_kernels(values):  # csrc/cpu/losses.cpp
        return _native_losses.ppo_value_loss(values, old_values, returns, mask, normalizer, clip,
                                             reduction, normalizer_value)
    device = values.device
    T = values.shape[-1]
    values2, old2, returns2 = as_rows(values), as_rows(old_values), as_rows(returns)
    mask = mask_for_kernel(mask)
    mask2 = as_rows(mask) if mask is not None else values2
    n_rows = values2.shape[0]
    block_r, block_t, n_programs = row_tiles(n_rows, T)
    if normalizer is None and normalizer_value is None:
        norm_flag, norm_value = NORMALIZER_NONE, 0.0
    else:
        norm_flag, norm_value, normalizer = normalizer_args(
            normalizer if normalizer is not None else normalizer_value, device)

    loss = empty((), torch.float32, device)
    stats = empty((_N_STATS,), torch.float32, device)
    saved_grad = empty(values.shape, torch.float32, device)
    partials = empty((_N_PARTIALS, n_programs), torch.float32, device)
    _value_fwd((n_programs,),
        values2, old2, returns2, mask2, saved_grad, partials,
        values2.stride(0), values2.stride(1), old2.stride(0), old2.stride(1),
        returns2.stride(0), returns2.stride(1), mask2.stride(0), mask2.stride(1),
        n_rows, T, n_programs,
        0.0 if clip is None else clip,
        REDUCTION=reduction, HAS_MASK=mask is not None, HAS_CLIP=clip is not None,
        BLOCK_R=block_r, BLOCK_T=block_t, num_warps=8 if block_r * block_t >= 2048 else 4,
    )
    _value_finish((1,),
        partials, loss, stats, normalizer, n_programs, T, norm_value,
        REDUCTION=reduction, NORMALIZER=norm_flag,
        BLOCK_P=min(next_power_of_2(n_programs), _FINISH_BLOCK_MAX), num_warps=4,
    )
    return loss, stats, saved_grad


@torch.library.custom_op("rlhf_kernels::ppo_value_loss", mutates_args=())
def _ppo_value_loss_op(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor | None,
    normalizer: torch.Tensor | None,
    clip: float | None,
    reduction: int,
    normalizer_value: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_launch`` as a custom op: what torch.compile / export / torch.func see."""
    return _launch(values, old_values, returns, mask, normalizer, clip, reduction,
                   normalizer_value)


@_ppo_value_loss_op.register_fake
def _(values, old_values, returns, mask, normalizer, clip, reduction, normalizer_value):
    return (
        values.new_empty((), dtype=torch.float32),
        values.new_empty((_N_STATS,), dtype=torch.float32),
        values.new_empty(values.shape, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    _, stats, saved_grad = output
    ctx.mark_non_differentiable(stats)  # saved_grad: as in policy_loss._setup_context
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(saved_grad, stats)
    ctx.values_dtype = inputs[0].dtype
    ctx.select = inputs[4] is not None  # a tensor normalizer (_reduce.scale_saved_grad)


@no_double_backward("ppo_value_loss")
def _backward(ctx, grad_loss, grad_stats, grad_saved):
    saved_grad, stats = ctx.saved_tensors
    grad_values = None
    if grad_loss is not None and ctx.needs_input_grad[0]:
        grad_values = saved_grad_scale(saved_grad, grad_loss, stats, _S_SCALE, ctx.values_dtype,
                                       ctx.select)
    return grad_values, None, None, None, None, None, None, None


_ppo_value_loss_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------
def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor | None = None,
    clip: float | None = 0.2,
    reduction: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO value loss and its stats.

    values, old_values, returns: (..., T) fp16/bf16/fp32/fp64, same shape; mask: (..., T) bool /
    integer / float (nonzero = the token counts) or None. Sequences are all leading dims.

    Returns ``(loss, stats)``: loss () fp32 (fp64 for fp64 input), differentiable with respect to
    ``values`` only; stats (detached () tensors): clipfrac, explained_variance, value_mean,
    return_mean (over valid tokens; 0 when there is none).

    clip: the values may move at most this far from old_values before the clipped term takes
    over (None: plain (v - R)^2 / 2). reduction and normalizer: as ``ppo_policy_loss``
    (normalizer: None, a number > 0 or a 0-d tensor, e.g. the optimizer step's token count
    all-reduced over ranks, read on the device, no host sync, no gradient, that replaces the
    reduction's outer denominator). backend: "triton", "reference" or "auto". A fully masked row
    contributes 0; an all-masked batch gives loss 0.
    """
    for name, tensor in (("values", values), ("old_values", old_values), ("returns", returns)):
        check_float(name, tensor)
    check_same_shape("old_values", old_values, "values", values)
    check_same_shape("returns", returns, "values", values)
    check_mask(mask, "values", values)
    check_same_device(("values", values), ("old_values", old_values), ("returns", returns),
                      ("mask", mask))
    if values.dim() == 0:
        raise ValueError("values must have at least one dim (..., T); got a 0-d tensor")
    code = reduction_code(reduction)
    clip = real_setting("clip", clip, none_ok=True)
    if clip is not None and not clip >= 0.0:
        raise ValueError(
            f"clip={clip} must be >= 0 (values are kept within old_values +- clip), or None "
            "for no clipping"
        )
    if normalizer is not None:
        normalizer = normalizer_setting(normalizer)

    use_reference = torch.float64 in (values.dtype, old_values.dtype, returns.dtype)
    if resolve_backend(values, backend, "ppo_value_loss") == "reference" or use_reference:
        return reference.ppo_value_loss(values, old_values, returns, mask, clip, reduction,
                                        normalizer)
    if torch.is_grad_enabled():
        for name, tensor in (("old_values", old_values), ("returns", returns)):
            if tensor.requires_grad:
                raise ValueError(
                    f"{name} requires grad, but the fused kernel differentiates with respect to "
                    f"values only (rollout data are constants in PPO); pass {name}.detach(), or "
                    "backend='reference' if you really need that gradient"
                )
    norm_value = norm_tensor = None
    if isinstance(normalizer, torch.Tensor):
        norm_tensor = normalizer.detach()  # no gradient into a count
    elif normalizer is not None:
        norm_value = normalizer
    args = (values, old_values, returns, mask, norm_tensor, clip, code, norm_value)
    if not launch_directly(values, old_values, returns, mask, norm_tensor):
        loss, stats, _ = _ppo_value_loss_op(*args)
    elif torch.is_grad_enabled() and values.requires_grad:
        loss, stats = apply_saved_grad_loss(_launch, _S_SCALE, norm_tensor is not None, *args)
    else:
        loss, stats, _ = _launch(*args)
    return loss, dict(zip(_STAT_NAMES, stats.unbind(0)))
