"""Clipped policy-gradient losses (PPO, the GRPO family, GSPO, CISPO) and SAPO's gated one,
with an optional KL term, forward and backward fused into one sweep over each row.

Math (``rlhf_kernels.reference.ppo_policy_loss`` is the spec). Per valid token t of row i, with
m the mask, n_i the valid tokens of row i and A_t the advantage (one per token, or the row's one
value, read with stride 0 along T and never expanded in memory):

    ratio_level="token":     d_t = clamp(logp_t - old_t, +-c),  r_t = e^d_t
    ratio_level="sequence":  D_i = sum_t m_t (logp_t - old_t) / max(n_i, 1),
                             r_t = s_i = e^clamp(D_i, +-c) for every token of row i (GSPO)
    loss_type="ppo":         l1 = -A r,  l2 = -A clip(r, 1 - clip_low, 1 + clip_high),
                             l_t = max(l1, l2);  dual clip k (A < 0 only): l_t = min(l_t, -A k)
    loss_type="cispo":       l_t = -sg(clip(r, 1 - clip_low, 1 + clip_high)) A_t logp_t
    loss_type="sapo":        l_t = -sigmoid(tau_t (r - 1)) (4 / tau_t) A_t, tau_t = tau_pos
                             where A_t > 0, tau_neg where A_t <= 0 (no clip, no dual clip)
    KL term:                 q_t = est(logp_t - ref_t): k1 x, k2 x^2 / 2, k3 e^-x + x - 1, abs |x|

    loss = scale * sum_i w_i sum_t m_t (l_t + kl_coef q_t)

(c = log_ratio_clamp, sg = stop-gradient; w_i and scale are the reduction's, see ``_reduce``; a
``normalizer`` replaces scale by 1 / normalizer.) The stats approx_kl = mean d^2 / 2 and ppo_kl =
mean -d always use the per-token d; clipfrac (l2 > l1, or for CISPO and SAPO r outside the clip
range), ratio_mean and ratio_max use the ratio the loss used.

Gradient. For PPO let g_t = d l_t / d log r (the derivative through the ratio):

    g_t = -A_t r  where the unclipped term is taken (inside the clip range l1 == l2 and both
                  give -A r; the clip bounds pass the gradient, as torch.clamp),
          0       where the clip bites (l2 > l1) or the dual clip bites (-A k < l),
          g_t / 2 on a dual-clip tie (torch.minimum halves it).
    SAPO:            g_t = -4 A_t r s(x) s(-x), x = tau_t (r - 1), s = sigmoid (= -A_t r at
                     r = 1, PPO's; 0 where the gate saturates, also where r overflowed to
                     inf), then through the ratio as PPO's g_t (token or sequence ratio).

    token ratio:     d l_t / d logp_t = g_t [|logp_t - old_t| <= c]
    sequence ratio:  l_u depends on logp_t only through s_i, and d s_i / d logp_t =
                     s_i m_t [|D_i| <= c] / n_i, so (g_u = (d l_u / d s_i) s_i)
                         d loss / d logp_t = scale m_t [|D_i| <= c] / n_i * sum_u w_i m_u g_u:
                     the row's summed policy gradient, spread evenly over its valid tokens (0
                     for all of them when the clamp of the mean bites; with per-sequence
                     advantages and seq-mean-token-mean this is veRL's GSPO-token gradient).
    CISPO:           d l_t / d logp_t = -clip(r) A_t: the weight is a constant, so neither the
                     clip nor the log-ratio clamp cuts the gradient, and a sequence ratio only
                     sets the weight (no gradient through the row mean).
    KL term:         kl_coef d q / d x: k1 1, k2 x, k3 1 - e^-x, abs sign(x) (0 at 0); per token,
                     whatever the ratio level.

Kernels. The forward kernel's programs own whole rows. It stores ``w_i m_t d loss_t / d logp_t``
per token (fp32, the "saved gradient") and per-program partial sums of the loss, the KL term and
the stats; a one-program kernel finishes them on the device into the loss, the stats and
``scale`` (a tensor normalizer is loaded there: no host sync). The backward is
``saved * grad_loss * scale``. For seq-mean-token-mean a first pass counts each row's tokens
(w_i = 1 / n_i). GSPO needs the whole row before any gradient: pass 1 sums the row's log-ratios
and counts its tokens, pass 2 computes the loss and stats and G_i = sum_u w_i m_u g_u, pass 3
writes m_t [|D_i| <= c] G_i / n_i plus the token's own KL gradient. Gradients flow to ``logp``
only: old_logp, advantages, ref_logp and the mask are rollout data.

Bytes per token (b = itemsize of the float inputs, 1 B bool mask). Token ratio: the forward reads
logp, old_logp, advantages (3b; 2b with per-sequence advantages, one read per row served from
cache) and the mask (twice for seq-mean-token-mean), ref_logp with the KL term (+b), and writes
the 4 B saved gradient; the backward reads it and writes the b-byte gradient. bf16, per-token
advantages, no KL: 11 + 6 = 17 B/token. Sequence ratio (PPO): pass 1 reads logp, old_logp and
the mask (2b + 1), pass 2 as above without the write, pass 3 the mask (and logp, ref_logp with
the KL term) and writes 4 B: bf16 with per-sequence advantages, no KL, 15 + 6 = 21 B/token (the
re-reads of a program's rows are often cache hits). At 64K tokens the op is launch-bound: two
forward kernels, and a backward that is one kernel under torch.compile and, in eager mode, two
torch multiplies (plus a cast for fp16/bf16 logp), cheaper on the host than an allocation and a
Triton launch. The policy options reach each kernel packed in one compile-time int (POLICY,
OPTIONS): every constexpr launch argument costs host time in Triton's binder.

Precision: the Triton path loads fp16/bf16/fp32 and computes in fp32 (loss and stats are fp32);
float64 inputs go to the float64 reference.
"""

import inspect

import torch
import triton
import triton.language as tl

from rlhf_kernels import _native_losses, reference
from rlhf_kernels._alloc import empty
from rlhf_kernels._checks import (
    KL_COEF_MEANING,
    check_advantages_shape,
    check_dual_clip,
    check_float,
    check_kl_reference,
    check_policy_options,
    check_same_device,
    check_same_shape,
    finite_setting,
    normalizer_setting,
    real_setting,
    sapo_taus,
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
from rlhf_kernels.ops.kl import k3_and_grad

__all__ = ["ppo_policy_loss"]

# Per-program partial sums, one row each of the (_N_PARTIALS, programs) buffer: policy loss,
# tokens, rows with a token, clipped, d^2 / 2, -d, ratio, ratio max, dual clipped, then with the
# KL term: KL and policy + kl_coef * KL (so the finish kernel needs no kl_coef argument).
_N_PARTIALS = 11
# Layout of the stats output: the stats returned for the options of the call (dual_clipfrac
# with dual_clip, pg_loss and kl with the KL term), then the backward's scale. Only what is
# returned is written and unbound: host time per call counts at these sizes.
_STAT_NAMES = {
    (False, False): ("clipfrac", "approx_kl", "ppo_kl", "ratio_mean", "ratio_max"),
    (True, False): ("clipfrac", "approx_kl", "ppo_kl", "ratio_mean", "ratio_max", "dual_clipfrac"),
    (False, True): ("clipfrac", "approx_kl", "ppo_kl", "ratio_mean", "ratio_max", "pg_loss", "kl"),
    (True, True): ("clipfrac", "approx_kl", "ppo_kl", "ratio_mean", "ratio_max", "dual_clipfrac",
                   "pg_loss", "kl"),
}
_FINISH_BLOCK_MAX = 1024
# Compile-time codes of the KL estimators (0: no KL term).
_KL_CODES = {"k1": 1, "k2": 2, "k3": 3, "abs": 4}
# The policy options reach the kernels as one compile-time int (each constexpr argument of a
# launch costs host time in Triton's binder): bit 0 dual clip, bit 1 sequence ratio, bit 2
# CISPO, bit 3 SAPO, bits 4+ the KL estimator code (the native kernel reads the same bits). The
# finish kernel's: bits 0-2 the reduction code, bits 3-4 the normalizer (_reduce.NORMALIZER_*),
# bit 5 dual clip, bit 6 KL term.
_DUAL, _SEQUENCE, _CISPO, _SAPO, _KL_SHIFT = 1, 2, 4, 8, 4
_LOSS_TYPE_BITS = {"ppo": 0, "cispo": _CISPO, "sapo": _SAPO}


def _scale_index(has_dual: bool, has_kl: bool) -> int:
    """Where the finish kernel writes the backward's scale: right after the returned stats."""
    return 5 + has_dual + 2 * has_kl


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def kl_estimator_and_grad(dk, KL: tl.constexpr):
    """Per-token KL estimate of dk = logp - ref_logp and its derivative in dk, as torch autograd
    of ``reference.kl_penalty``: k1 = dk (1), k2 = dk^2 / 2 (dk), k3 = e^-dk + dk - 1 (1 - e^-dk),
    abs = |dk| (sign(dk), 0 at 0). KL: 1, 2, 3, 4 for k1, k2, k3, abs."""
    if KL == 1:
        kl = dk
        dkl = tl.zeros_like(dk) + 1.0  # 1 also where dk is +-inf / NaN (dk * 0 + 1 was NaN)
    elif KL == 2:
        kl = 0.5 * dk * dk
        dkl = dk
    elif KL == 3:
        kl, dkl = k3_and_grad(dk)  # a few ulps also where |dk| << 1 (ops/kl.py)
    else:
        kl = tl.abs(dk)
        dkl = tl.where(dk > 0.0, 1.0, tl.where(dk < 0.0, -1.0, 0.0))
    return kl, dkl


@triton.jit
def _ppo_policy_loss_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, saved_grad_ptr, partial_ptr,
    stride_lr, stride_lt, stride_or, stride_ot, stride_ar, stride_at, stride_mr, stride_mt,
    stride_rr, stride_rt,
    n_rows, T, n_programs,
    ratio_low, ratio_high, dual_clip, log_ratio_clamp, kl_coef, tau_pos, tau_neg,
    REDUCTION: tl.constexpr, HAS_MASK: tl.constexpr, POLICY: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    HAS_DUAL: tl.constexpr = (POLICY & 1) != 0
    SEQUENCE: tl.constexpr = (POLICY & 2) != 0
    CISPO: tl.constexpr = (POLICY & 4) != 0
    SAPO: tl.constexpr = (POLICY & 8) != 0
    KL: tl.constexpr = POLICY >> 4
    # Per-sequence advantages arrive with stride_at == 0 (one value per row, never expanded).
    pid = tl.program_id(0)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_T)

    if SEQUENCE:
        # Pass 1 (GSPO): the row's mean log-ratio over its valid tokens, needed by every token.
        acc_n = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
        acc_d = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = (t0 + cols).to(tl.int64)
            inb = row_ok[:, None] & (t < T)[None, :]
            logp = tl.load(logp_ptr + rows[:, None] * stride_lr + t[None, :] * stride_lt,
                           mask=inb, other=0.0).to(tl.float32)
            old = tl.load(old_ptr + rows[:, None] * stride_or + t[None, :] * stride_ot,
                          mask=inb, other=0.0).to(tl.float32)
            if HAS_MASK:
                m = tl.load(mask_ptr + rows[:, None] * stride_mr + t[None, :] * stride_mt,
                            mask=inb, other=0)
                valid = inb & (m != 0)
            else:
                valid = inb
            acc_n += tl.where(valid, 1.0, 0.0)
            acc_d += tl.where(valid, logp - old, 0.0)
        n_row = tl.sum(acc_n, axis=1)
        seq_d_raw = tl.sum(acc_d, axis=1) / tl.maximum(n_row, 1.0)
        seq_ratio = tl.exp(tl.minimum(tl.maximum(seq_d_raw, -log_ratio_clamp, NAN),
                                      log_ratio_clamp, NAN))
        # d mean / d logp_t = 1 / n inside the clamp (bounds included, as torch.clamp), else 0.
        seq_grad_scale = tl.where(
            (seq_d_raw >= -log_ratio_clamp) & (seq_d_raw <= log_ratio_clamp),
            1.0 / tl.maximum(n_row, 1.0), 0.0)
    elif REDUCTION == 1:
        n_row = row_token_count(mask_ptr, rows * stride_mr, stride_mt, row_ok, T,
                                HAS_MASK, BLOCK_R, BLOCK_T)
    # Per-row weight of the reduction: only seq-mean-token-mean needs the row's token count
    # before the first gradient can be written, hence one pass over the row's mask first.
    if REDUCTION == 1:
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
    acc_kl = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    # GSPO: sum over the row of w * d loss_u / d s * s, the gradient every token shares.
    acc_seq_grad = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
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
        w = tl.where(valid, row_w[:, None], 0.0)

        d_raw = logp - old
        d = tl.minimum(tl.maximum(d_raw, -log_ratio_clamp, NAN), log_ratio_clamp, NAN)
        if SEQUENCE:
            ratio = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32) + seq_ratio[:, None]
        else:
            ratio = tl.exp(d)
        clipped_ratio = tl.minimum(tl.maximum(ratio, ratio_low, NAN), ratio_high, NAN)
        if CISPO:
            # The clipped ratio is a constant weight: d loss / d logp = -weight * A, whatever
            # the log-ratio clamp (no gradient flows through the ratio).
            clipped = (ratio < ratio_low) | (ratio > ratio_high)
            dlogp = -clipped_ratio * adv
            loss = dlogp * logp
        else:
            if SAPO:
                # The gate sigmoid(tau (r - 1)) 4 / tau in place of the clip, tau by the sign
                # of A. d loss / d log r = -4 A r s(x) s(-x), x = tau (r - 1): s(-x), not
                # 1 - s(x), keeps its relative precision where the gate saturates, and a
                # saturated gate passes 0 even where r overflowed to inf (0 * inf is NaN).
                clipped = (ratio < ratio_low) | (ratio > ratio_high)
                tau = tl.where(adv > 0.0, tau_pos, tau_neg)
                x = tau * (ratio - 1.0)
                loss = -adv * (4.0 / tau) * tl.sigmoid(x)
                slope = tl.sigmoid(x) * tl.sigmoid(-x)
                dloss = tl.where(slope == 0.0, 0.0, -4.0 * adv * ratio * slope)
            else:
                loss1 = -adv * ratio
                loss2 = -adv * clipped_ratio
                clipped = loss2 > loss1
                loss = tl.maximum(loss1, loss2, NAN)
                # dloss = d loss / d log(ratio). Inside the clip range l1 == l2 with equal
                # gradients, so a tie needs no halving here.
                dloss = tl.where(clipped, 0.0, loss1)
            if HAS_DUAL:
                loss3 = -adv * dual_clip
                negative = adv < 0.0
                dual = negative & (loss3 < loss)
                tie = negative & (loss3 == loss)
                loss = tl.where(dual, loss3, loss)
                dloss = tl.where(dual, 0.0, tl.where(tie, 0.5 * dloss, dloss))
                acc_dual += tl.where(valid & dual, 1.0, 0.0)
            if SEQUENCE:
                # Written in pass 3, once the whole row's sum is known.
                acc_seq_grad += tl.where(valid, dloss * w, 0.0)
                dlogp = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
            else:
                in_clamp = (d_raw >= -log_ratio_clamp) & (d_raw <= log_ratio_clamp)
                dlogp = tl.where(in_clamp, dloss, 0.0)
        if KL != 0:
            ref = tl.load(ref_ptr + rows[:, None] * stride_rr + t[None, :] * stride_rt,
                          mask=inb, other=0.0).to(tl.float32)
            kl, dkl = kl_estimator_and_grad(logp - ref, KL)
            acc_kl += tl.where(valid, kl * w, 0.0)
            dlogp = dlogp + kl_coef * dkl
        if SEQUENCE:
            if CISPO:
                tl.store(saved_grad_ptr + rows[:, None] * T + t[None, :],
                         tl.where(valid, dlogp * w, 0.0), mask=inb)
        else:
            tl.store(saved_grad_ptr + rows[:, None] * T + t[None, :],
                     tl.where(valid, dlogp * w, 0.0), mask=inb)

        # tl.where, not a multiply by the mask: padding may hold inf / NaN.
        acc_loss += tl.where(valid, loss * w, 0.0)
        acc_tokens += tl.where(valid, 1.0, 0.0)
        acc_clip += tl.where(valid & clipped, 1.0, 0.0)
        acc_half_d2 += tl.where(valid, 0.5 * d * d, 0.0)
        acc_neg_d += tl.where(valid, -d, 0.0)
        acc_ratio += tl.where(valid, ratio, 0.0)
        acc_ratio_max = tl.maximum(acc_ratio_max, tl.where(valid, ratio, 0.0))

    if SEQUENCE:
        if not CISPO:
            # Pass 3 (GSPO): every valid token of the row gets sum_u(w dloss_u) / n_row
            # (0 where the clamp of the mean bites), plus its own KL term.
            row_grad = tl.sum(acc_seq_grad, axis=1) * seq_grad_scale
            for t0 in range(0, T, BLOCK_T):
                t = (t0 + cols).to(tl.int64)
                inb = row_ok[:, None] & (t < T)[None, :]
                if HAS_MASK:
                    m = tl.load(mask_ptr + rows[:, None] * stride_mr + t[None, :] * stride_mt,
                                mask=inb, other=0)
                    valid = inb & (m != 0)
                else:
                    valid = inb
                grad = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32) + row_grad[:, None]
                if KL != 0:
                    logp = tl.load(logp_ptr + rows[:, None] * stride_lr + t[None, :] * stride_lt,
                                   mask=inb, other=0.0).to(tl.float32)
                    ref = tl.load(ref_ptr + rows[:, None] * stride_rr + t[None, :] * stride_rt,
                                  mask=inb, other=0.0).to(tl.float32)
                    kl, dkl = kl_estimator_and_grad(logp - ref, KL)
                    grad = grad + (kl_coef * dkl) * row_w[:, None]
                tl.store(saved_grad_ptr + rows[:, None] * T + t[None, :],
                         tl.where(valid, grad, 0.0), mask=inb)

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
    if KL != 0:
        kl_sum = tl.sum(tl.sum(acc_kl, axis=1), axis=0)
        tl.store(out + 9 * n_programs, kl_sum)
        tl.store(out + 10 * n_programs, tl.sum(tl.sum(acc_loss, axis=1), axis=0) + kl_coef * kl_sum)


@triton.jit
def _ppo_policy_loss_finish_kernel(
    partial_ptr, loss_ptr, stats_ptr, norm_ptr,
    n_programs, T, norm_value, kl_coef,
    OPTIONS: tl.constexpr, BLOCK_P: tl.constexpr,
):
    REDUCTION: tl.constexpr = OPTIONS & 7
    NORMALIZER: tl.constexpr = (OPTIONS >> 3) & 3
    HAS_DUAL: tl.constexpr = (OPTIONS >> 5) & 1  # 0 / 1: also the dual stat's slot count
    HAS_KL: tl.constexpr = (OPTIONS >> 6) & 1
    # One program: column sums of the (_N_PARTIALS, n_programs) partials, then the scalars.
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
    s_kl = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_total = tl.zeros([BLOCK_P], dtype=tl.float32)
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
        if HAS_KL:
            s_kl += tl.load(partial_ptr + 9 * n_programs + p, mask=ok, other=0.0)
            s_total += tl.load(partial_ptr + 10 * n_programs + p, mask=ok, other=0.0)
    n_tokens = tl.sum(s_tokens, axis=0)
    denom = loss_denominator(n_tokens, tl.sum(s_rows, axis=0), T, norm_value, norm_ptr,
                             REDUCTION, NORMALIZER)
    # Stats are means over valid tokens, 0 when there is none (numerators are 0 then too).
    n_safe = tl.maximum(n_tokens, 1.0)
    pg_loss = tl.sum(s_loss, axis=0) / denom
    tl.store(stats_ptr + 0, tl.sum(s_clip, axis=0) / n_safe)
    tl.store(stats_ptr + 1, tl.sum(s_half_d2, axis=0) / n_safe)
    tl.store(stats_ptr + 2, tl.sum(s_neg_d, axis=0) / n_safe)
    ratio_sum = tl.sum(s_ratio, axis=0)
    tl.store(stats_ptr + 3, ratio_sum / n_safe)
    # tl.max drops NaN; the sum of the (non-negative) ratios is NaN exactly when one of them is.
    tl.store(stats_ptr + 4,
             tl.where(ratio_sum != ratio_sum, ratio_sum, tl.max(s_ratio_max, axis=0)))
    # The optional stats follow in the order of _STAT_NAMES, then the scale (_scale_index).
    if HAS_DUAL:
        tl.store(stats_ptr + 5, tl.sum(s_dual, axis=0) / n_safe)
    if HAS_KL:
        kl = tl.sum(s_kl, axis=0) / denom
        loss = tl.sum(s_total, axis=0) / denom
        if NORMALIZER != 0:
            # A normalizer of 0 (a tensor, used unread): the reference's pg_loss + kl_coef * kl
            # of the two quotients (+-inf each, or NaN for 0 / 0; inf - inf is NaN), not the
            # kind of the one sum's quotient.
            loss = tl.where(denom == 0.0, pg_loss + kl_coef * kl, loss)
        tl.store(loss_ptr, loss)
        tl.store(stats_ptr + 5 + HAS_DUAL, pg_loss)
        tl.store(stats_ptr + 6 + HAS_DUAL, kl)
        tl.store(stats_ptr + 7 + HAS_DUAL, 1.0 / denom)
    else:
        tl.store(loss_ptr, pg_loss)
        tl.store(stats_ptr + 5 + HAS_DUAL, 1.0 / denom)


# Launches without Triton's per-call binding (ops/_launch.py)
_policy_fwd = CachedLaunch(globals(), "_ppo_policy_loss_fwd_kernel")
_policy_finish = CachedLaunch(globals(), "_ppo_policy_loss_finish_kernel")


# --------------------------------------------------------------------------------------------
# launchers and autograd
# --------------------------------------------------------------------------------------------
def _launch(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    normalizer: torch.Tensor | None,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    log_ratio_clamp: float | None,
    reduction: int,
    policy: int,
    kl_coef: float,
    normalizer_value: float | None,
    tau_pos: float,
    tau_neg: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> loss () fp32, stats (_scale_index + 1,) fp32, saved gradient (logp.shape) fp32
    contiguous.

    policy: _SEQUENCE | _CISPO or _SAPO | kl code << _KL_SHIFT; ref_logp is given exactly when
    the kl code is nonzero. normalizer (a 0-d tensor) or normalizer_value replaces the
    reduction's denominator (``_reduce.normalizer_args``). tau_pos / tau_neg: SAPO's gate
    temperatures (read only with _SAPO).
    """
    if native_cpu_kernels(logp):  # csrc/cpu/losses.cpp
        return _native_losses.ppo_policy_loss(
            logp, old_logp, advantages, mask, ref_logp, normalizer, clip_low, clip_high,
            dual_clip, log_ratio_clamp, reduction, policy, kl_coef, normalizer_value, tau_pos,
            tau_neg)
    device = logp.device
    T = logp.shape[-1]
    logp2, old2 = as_rows(logp), as_rows(old_logp)
    n_rows = logp2.shape[0]
    if advantages.dim() == logp.dim():
        adv2 = as_rows(advantages)
        stride_ar, stride_at = adv2.stride(0), adv2.stride(1)
    else:  # one per sequence: stride 0 along T, never expanded in memory
        adv2 = advantages.reshape(n_rows)
        stride_ar, stride_at = adv2.stride(0), 0
    mask = mask_for_kernel(mask)
    mask2 = as_rows(mask) if mask is not None else logp2
    has_kl = ref_logp is not None
    if has_kl:
        ref2 = as_rows(ref_logp)
        stride_rr, stride_rt = ref2.stride(0), ref2.stride(1)
    else:
        ref2, stride_rr, stride_rt = None, 0, 0
    has_dual = dual_clip is not None
    if normalizer is None and normalizer_value is None:
        norm_flag, norm_value = NORMALIZER_NONE, 0.0
    else:
        norm_flag, norm_value, normalizer = normalizer_args(
            normalizer if normalizer is not None else normalizer_value, device)
    finish = reduction | norm_flag << 3 | has_dual << 5 | has_kl << 6
    block_r, block_t, n_programs = row_tiles(n_rows, T)

    loss = empty((), torch.float32, device)
    stats = empty((_scale_index(has_dual, has_kl) + 1,), torch.float32, device)
    saved_grad = empty(logp.shape, torch.float32, device)
    partials = empty((_N_PARTIALS, n_programs), torch.float32, device)
    _policy_fwd((n_programs,),
        logp2, old2, adv2, mask2, ref2, saved_grad, partials,
        logp2.stride(0), logp2.stride(1), old2.stride(0), old2.stride(1),
        stride_ar, stride_at, mask2.stride(0), mask2.stride(1), stride_rr, stride_rt,
        n_rows, T, n_programs,
        1.0 - clip_low, 1.0 + clip_high,
        0.0 if dual_clip is None else dual_clip,
        float("inf") if log_ratio_clamp is None else log_ratio_clamp,
        kl_coef, tau_pos, tau_neg,
        REDUCTION=reduction, HAS_MASK=mask is not None, POLICY=policy | has_dual,
        BLOCK_R=block_r, BLOCK_T=block_t, num_warps=8 if block_r * block_t >= 2048 else 4,
    )
    _policy_finish((1,),
        partials, loss, stats, normalizer, n_programs, T, norm_value, kl_coef,
        OPTIONS=finish,
        BLOCK_P=min(next_power_of_2(n_programs), _FINISH_BLOCK_MAX), num_warps=4,
    )
    return loss, stats, saved_grad


def _launch_packed(logp, rest):
    """``_launch(logp, *rest)``: the eager autograd path's launcher (see ``ppo_policy_loss``)."""
    return _launch(logp, *rest)


def _ppo_policy_loss_impl(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    normalizer: torch.Tensor | None,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    log_ratio_clamp: float | None,
    reduction: int,
    policy: int,
    kl_coef: float,
    normalizer_value: float | None,
    tau_pos: float,
    tau_neg: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_launch`` as a custom op: what torch.compile / export / torch.func see."""
    return _launch(logp, old_logp, advantages, mask, ref_logp, normalizer, clip_low, clip_high,
                   dual_clip, log_ratio_clamp, reduction, policy, kl_coef, normalizer_value,
                   tau_pos, tau_neg)


# the op's inputs by name (setup_context and backward find them by name, not by position)
_OP_PARAMS = tuple(inspect.signature(_ppo_policy_loss_impl).parameters)
_DUAL_CLIP, _REF_LOGP = _OP_PARAMS.index("dual_clip"), _OP_PARAMS.index("ref_logp")
_NORMALIZER = _OP_PARAMS.index("normalizer")
_ppo_policy_loss_op = torch.library.custom_op("rlhf_kernels::ppo_policy_loss",
                                              mutates_args=())(_ppo_policy_loss_impl)


@_ppo_policy_loss_op.register_fake
def _(logp, old_logp, advantages, mask, ref_logp, normalizer, clip_low, clip_high, dual_clip,
      log_ratio_clamp, reduction, policy, kl_coef, normalizer_value, tau_pos, tau_neg):
    n_stats = _scale_index(dual_clip is not None, ref_logp is not None) + 1
    return (
        logp.new_empty((), dtype=torch.float32),
        logp.new_empty((n_stats,), dtype=torch.float32),
        logp.new_empty(logp.shape, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    logp = inputs[0]
    _, stats, saved_grad = output
    # saved_grad stays a differentiable output (the public function drops it, so nobody edits
    # it): saved, it carries the op's node, which no_double_backward links its error to
    ctx.mark_non_differentiable(stats)
    # Only the loss gets a gradient; don't let autograd build zero tensors for the others.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(saved_grad, stats)
    ctx.logp_dtype = logp.dtype
    ctx.select = inputs[_NORMALIZER] is not None  # a tensor normalizer (scale_saved_grad)
    ctx.scale_index = _scale_index(inputs[_DUAL_CLIP] is not None,
                                   inputs[_REF_LOGP] is not None)


_N_OP_ARGS = len(_OP_PARAMS)


@no_double_backward("ppo_policy_loss")
def _backward(ctx, grad_loss, grad_stats, grad_saved):
    saved_grad, stats = ctx.saved_tensors
    grad_logp = None
    if grad_loss is not None and ctx.needs_input_grad[0]:
        grad_logp = saved_grad_scale(saved_grad, grad_loss, stats, ctx.scale_index,
                                     ctx.logp_dtype, ctx.select)
    return (grad_logp,) + (None,) * (_N_OP_ARGS - 1)


_ppo_policy_loss_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------
def _check_options(clip_low, clip_high, dual_clip, log_ratio_clamp) -> None:
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high)):
        if not value >= 0.0:
            raise ValueError(
                f"{name}={value} must be >= 0 (the ratio is clipped to "
                "[1 - clip_low, 1 + clip_high]; PPO uses 0.2)"
            )
    check_dual_clip(dual_clip)
    if log_ratio_clamp is not None and not log_ratio_clamp > 0.0:
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
    ratio_level: str = "token",
    loss_type: str = "ppo",
    normalizer: float | torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    *,
    sapo_tau_pos: float | None = None,
    sapo_tau_neg: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss (PPO, GRPO family, GSPO, CISPO) or SAPO's gated one, and
    its stats, from per-token log-probabilities.

    logp, old_logp: (..., T) fp16/bf16/fp32/fp64, same shape; advantages: (..., T) one per token,
    or (...) one per sequence (broadcast over T, never expanded in memory); mask: (..., T) bool /
    integer / float (nonzero = the token counts) or None (all count); ref_logp: (..., T) or None.
    Sequences are all leading dims, T the last one.

    Returns ``(loss, stats)``: loss () fp32 (fp64 for fp64 input), differentiable with respect to
    ``logp`` only; stats (detached () tensors over valid tokens, 0 when there is none):
    clipfrac (where the clip bites), approx_kl (mean d^2 / 2) and ppo_kl (mean -d) of the
    per-token clamped log-ratio d, ratio_mean and ratio_max of the ratio used, dual_clipfrac
    when ``dual_clip`` is set, pg_loss and kl (the reduced KL term) when the KL term is on.

    clip_low / clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
    dual_clip: c > 1; tokens with A < 0 take min(loss, -A c) (veRL: 3.0; loss_type "ppo" only).
    log_ratio_clamp: log-ratios are clamped to +-this before exp (None: no clamp).
    reduction: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
    "seq-mean-token-sum-norm" or "token-sum" (see ``rlhf_kernels.reference.reduce_loss``).
    ratio_level: "token" (PPO) or "sequence" (GSPO: every token of a row takes the row's
    geometric-mean ratio exp(mean over its valid tokens of logp - old_logp), the gradient
    flowing through that mean). loss_type: "ppo" (clipped surrogate), "cispo" (the clipped
    ratio as a stop-gradient weight on -A logp) or "sapo" (Soft Adaptive Policy Optimization:
    -sigmoid(tau (r - 1)) (4 / tau) A per token, tau = sapo_tau_pos where A > 0 and
    sapo_tau_neg where A <= 0, finite and > 0, default 1.0 and 1.05 as TRL and veRL; no clip
    and no dual clip: clip_low / clip_high only set the range outside which clipfrac counts a
    token; the temperatures are an error with another loss_type). normalizer: None, a number
    > 0 or a 0-d tensor (e.g. a token count all-reduced over ranks, read on the device, no
    host sync, no gradient) that replaces the reduction's outer denominator; under
    torch.compile pass a count that changes from step to step as a tensor (a Python number is
    a constant of the graph).
    ref_logp, kl_coef, kl_estimator ("k1", "k2", "k3", "abs"): adds
    kl_coef * reduce(estimator(logp - ref_logp)), same reduction and normalizer, when ref_logp
    is given and kl_coef != 0 (a kl_coef != 0 without ref_logp is an error). backend:
    "triton", "reference" or "auto". A fully masked row contributes 0 and an all-masked batch
    gives loss 0 with zero gradients.
    """
    for name, tensor in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages)):
        check_float(name, tensor)
    check_same_shape("old_logp", old_logp, "logp", logp)
    check_advantages_shape(advantages, logp)
    check_mask(mask, "logp", logp)
    if ref_logp is not None:
        check_float("ref_logp", ref_logp)
        check_same_shape("ref_logp", ref_logp, "logp", logp)
    device = logp.device
    if (old_logp.device != device or advantages.device != device
            or (mask is not None and mask.device != device)
            or (ref_logp is not None and ref_logp.device != device)):
        check_same_device(("logp", logp), ("old_logp", old_logp), ("advantages", advantages),
                          ("mask", mask), ("ref_logp", ref_logp))
    if logp.dim() == 0:
        raise ValueError("logp must have at least one dim (..., T); got a 0-d tensor")
    code = reduction_code(reduction)
    # Python or numpy numbers, or 0-d tensors -> floats
    clip_low, clip_high = real_setting("clip_low", clip_low), real_setting("clip_high", clip_high)
    dual_clip = real_setting("dual_clip", dual_clip, none_ok=True)
    log_ratio_clamp = real_setting("log_ratio_clamp", log_ratio_clamp, none_ok=True)
    _check_options(clip_low, clip_high, dual_clip, log_ratio_clamp)
    # The defaults need no check (host time per call counts for this op).
    tau_pos = tau_neg = 1.0  # unread unless SAPO
    if ratio_level != "token" or loss_type != "ppo":
        check_policy_options(ratio_level, loss_type, dual_clip)
        if loss_type == "sapo":
            tau_pos, tau_neg = sapo_taus(loss_type, sapo_tau_pos, sapo_tau_neg)
    if (sapo_tau_pos is not None or sapo_tau_neg is not None) and loss_type != "sapo":
        sapo_taus(loss_type, sapo_tau_pos, sapo_tau_neg)  # raises: they would go unused
    if normalizer is not None:
        normalizer = normalizer_setting(normalizer)
    kl_code = _KL_CODES.get(kl_estimator)
    if kl_code is None:
        raise ValueError(
            f"kl_estimator={kl_estimator!r} is not supported; expected one of "
            f"{tuple(_KL_CODES)}"
        )
    kl_coef = finite_setting("kl_coef", kl_coef, KL_COEF_MEANING)
    if ref_logp is None and kl_coef != 0.0:
        check_kl_reference(kl_coef, ref_logp)
    with_kl = ref_logp is not None and kl_coef != 0.0

    use_reference = torch.float64 in (logp.dtype, old_logp.dtype, advantages.dtype) or (
        with_kl and ref_logp.dtype == torch.float64)
    if resolve_backend(logp, backend, "ppo_policy_loss") == "reference" or use_reference:
        return reference.ppo_policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high,
                                         dual_clip, log_ratio_clamp, reduction, ratio_level,
                                         loss_type, normalizer, ref_logp, kl_coef, kl_estimator,
                                         sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg)
    if torch.is_grad_enabled():
        for name, tensor in (("old_logp", old_logp), ("advantages", advantages),
                             ("ref_logp", ref_logp if with_kl else None)):
            if tensor is not None and tensor.requires_grad:
                raise ValueError(
                    f"{name} requires grad, but the fused kernel differentiates with respect to "
                    f"logp only (rollout data are constants in PPO); pass {name}.detach(), or "
                    "backend='reference' if you really need that gradient"
                )
    norm_value = norm_tensor = None
    if isinstance(normalizer, torch.Tensor):
        norm_tensor = normalizer.detach()  # no gradient into a count
    elif normalizer is not None:
        norm_value = normalizer
    policy = ((ratio_level == "sequence") * _SEQUENCE | _LOSS_TYPE_BITS[loss_type]
              | (kl_code << _KL_SHIFT if with_kl else 0))
    args = (logp, old_logp, advantages, mask, ref_logp if with_kl else None, norm_tensor,
            clip_low, clip_high, dual_clip, log_ratio_clamp, code, policy, kl_coef, norm_value,
            tau_pos, tau_neg)
    if not launch_directly(logp, old_logp, advantages, mask, ref_logp, norm_tensor):
        loss, stats, _ = _ppo_policy_loss_op(*args)
    elif torch.is_grad_enabled() and logp.requires_grad:
        # logp and the rest as one tuple: autograd.Function.apply costs host time per argument.
        loss, stats = apply_saved_grad_loss(_launch_packed,
                                            _scale_index(dual_clip is not None, with_kl),
                                            norm_tensor is not None, logp, args[1:])
    else:
        loss, stats, _ = _launch(*args)
    # One unbind (not one indexing call per stat): host overhead matters at 64K tokens. zip
    # stops before the trailing scale.
    return loss, dict(zip(_STAT_NAMES[dual_clip is not None, with_kl], stats.unbind(0)))
