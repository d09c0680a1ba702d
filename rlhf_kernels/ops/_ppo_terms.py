"""``ppo_fused.per_token_terms`` at token level as one Triton kernel (fewer small launches).

The fused PPO ops (``ppo_loss_from_logits``, ``linear_ppo_loss``) turn each chunk's logp /
entropy into the weighted per-token loss and its derivatives. Written as torch ops that is about
25 elementwise kernels per chunk on a GPU (``benchmarks/static_sass.py`` counts them), each a
launch and a pass over the chunk's tokens; this kernel does the same arithmetic in one pass.

Same math and the same tie and bound rules as ``per_token_terms`` (torch autograd through the
reference): ``torch.maximum`` / ``minimum`` ties split the gradient in half, clamp bounds are
inclusive, tokens of weight 0 add exactly 0 whatever they hold. Token level only (a sequence
ratio needs whole rows: those stay on the torch ops), fp32 inputs, on the Triton path (CUDA, or
the interpreter); the caller keeps the torch ops otherwise.

Inputs: logp, entropy, old_logp, weights, ref_logp contiguous with N elements; advantages of
shape (R, C) with R * C = N, any strides (a (B, 1) per-sequence column expanded to (B, T) has
column stride 0: never copied).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_kernels._alloc import empty
from rlhf_kernels.backend import native_cpu_kernels
from rlhf_kernels.ops._launch import CachedLaunch
from rlhf_kernels.ops._reduce import cdiv
from rlhf_kernels.ops.kl import KL_ESTIMATOR_CODES, k3_and_grad

__all__ = ["N_STATS", "can_fuse", "token_stats", "token_terms"]

_BLOCK = 1024
# torch.maximum / minimum / clamp propagate NaN (a NaN logp must make the loss NaN, never a
# finite wrong number); Triton's default min / max return the other operand.
NAN = tl.constexpr(tl.PropagateNan.ALL)


@triton.jit
def _max_grad(a, b):
    """d max(a, b) / d a as torch.maximum's backward: 1, 0, or 0.5 at a tie."""
    return tl.where(a > b, 1.0, tl.where(a < b, 0.0, 0.5))


@triton.jit
def _store_stats(stats_ptr, s_pg, s_kl, s_entropy, s_clipped, s_approx_kl, s_ratio, s_count):
    """pg_loss, kl (reduced with the weights), entropy, clipfrac, approx_kl, ratio_mean (masked
    means: / max(count, 1), as reference.masked_mean)."""
    count = tl.maximum(s_count, 1.0)
    tl.store(stats_ptr + 0, s_pg)
    tl.store(stats_ptr + 1, s_kl)
    tl.store(stats_ptr + 2, s_entropy / count)
    tl.store(stats_ptr + 3, s_clipped / count)
    tl.store(stats_ptr + 4, s_approx_kl / count)
    tl.store(stats_ptr + 5, s_ratio / count)


@triton.jit
def _ppo_token_stats_finish_kernel(partial_ptr, stats_ptr, n_programs, BLOCK_P: tl.constexpr):
    # the programs' sums (n_programs rows of _N_SUMS), added in program order per lane
    offs = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P, 8], dtype=tl.float32)
    cols = tl.arange(0, 8)
    for p0 in range(0, n_programs, BLOCK_P):
        p = (p0 + offs).to(tl.int64)
        ok = (p < n_programs)[:, None] & (cols < 7)[None, :]
        acc += tl.load(partial_ptr + p[:, None] * 7 + cols[None, :], mask=ok, other=0.0)
    sums = tl.sum(acc, axis=0)
    s_pg = tl.sum(tl.where(cols == 0, sums, 0.0), axis=0)
    s_kl = tl.sum(tl.where(cols == 1, sums, 0.0), axis=0)
    s_entropy = tl.sum(tl.where(cols == 2, sums, 0.0), axis=0)
    s_clipped = tl.sum(tl.where(cols == 3, sums, 0.0), axis=0)
    s_approx_kl = tl.sum(tl.where(cols == 4, sums, 0.0), axis=0)
    s_ratio = tl.sum(tl.where(cols == 5, sums, 0.0), axis=0)
    s_count = tl.sum(tl.where(cols == 6, sums, 0.0), axis=0)
    _store_stats(stats_ptr, s_pg, s_kl, s_entropy, s_clipped, s_approx_kl, s_ratio, s_count)


@triton.jit
def _ppo_token_terms_kernel(
    logp_ptr, entropy_ptr, old_ptr, adv_ptr, w_ptr, ref_ptr, m_ptr,
    contrib_ptr, d_logp_ptr, d_entropy_ptr,
    n, n_cols, stride_adv_row, stride_adv_col,
    clip_low, clip_high, dual_clip, log_ratio_clamp, kl_coef, entropy_coef, tau_pos, tau_neg,
    CISPO: tl.constexpr, SAPO: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
    HAS_LOG_RATIO_CLAMP: tl.constexpr,
    KL: tl.constexpr, HAS_ENTROPY: tl.constexpr, DERIVATIVES: tl.constexpr,
    STATS: tl.constexpr, FINISH: tl.constexpr, BLOCK: tl.constexpr,
):
    # KL: -1 without a KL term, else the estimator code (kl.KL_ESTIMATOR_CODES).
    # STATS: instead of the per-token terms, the program's sums of the stats (_N_SUMS floats at
    # contrib_ptr + pid * _N_SUMS; entropy_ptr is read whatever HAS_ENTROPY says, and the tokens
    # that count are those of the 0/1 mask at m_ptr, read only then); FINISH: this is the only
    # program, it writes the stats themselves (_store_stats) at contrib_ptr.
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    w = tl.load(w_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    counts = w != 0.0
    logp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    A = tl.load(adv_ptr + (offs // n_cols) * stride_adv_row + (offs % n_cols) * stride_adv_col,
                mask=inb, other=0.0).to(tl.float32)
    d = logp - old
    d_grad = 1.0
    if HAS_LOG_RATIO_CLAMP:
        d_grad = tl.where((d >= -log_ratio_clamp) & (d <= log_ratio_clamp), 1.0, 0.0)
        d = tl.minimum(tl.maximum(d, -log_ratio_clamp, NAN), log_ratio_clamp, NAN)
    ratio = tl.exp(d)
    low = 1.0 - clip_low
    high = 1.0 + clip_high
    clipped = tl.minimum(tl.maximum(ratio, low, NAN), high, NAN)
    if CISPO:
        # the clipped ratio is a weight without gradient
        per_token = -clipped * A * logp
        local = -clipped * A
    elif SAPO:
        # the gate sigmoid(tau (r - 1)) 4 / tau, tau by the sign of A; d / d log r is
        # -4 A r s(x) s(-x): 0 where the gate saturates, even where r overflowed to inf
        tau = tl.where(A > 0, tau_pos, tau_neg)
        x = tau * (ratio - 1.0)
        gate = tl.sigmoid(x)
        per_token = -(4.0 / tau) * gate * A
        slope = gate * tl.sigmoid(-x)
        local = tl.where(slope == 0.0, 0.0, -4.0 * A * ratio * slope) * d_grad
    else:
        loss1 = -A * ratio
        loss2 = -A * clipped
        per_token = tl.maximum(loss1, loss2, NAN)
        clip_grad = tl.where((ratio >= low) & (ratio <= high), 1.0, 0.0)
        g1 = _max_grad(loss1, loss2)
        d_ratio = -A * (g1 + (1.0 - g1) * clip_grad)
        if HAS_DUAL_CLIP:
            loss3 = -A * dual_clip
            # minimum(per, loss3) = -max(-per, -loss3): the part that reaches per
            keep = _max_grad(loss3, per_token)
            d_ratio = tl.where(A < 0, d_ratio * keep, d_ratio)
            per_token = tl.where(A < 0, tl.minimum(per_token, loss3, NAN), per_token)
        local = d_ratio * ratio * d_grad
    total = per_token
    if KL >= 0:
        dk = logp - tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        if KL == 0:
            kl = dk
            dkl = tl.full([BLOCK], 1.0, tl.float32)
        elif KL == 1:
            kl = 0.5 * dk * dk
            dkl = dk
        elif KL == 2:
            kl, dkl = k3_and_grad(dk)  # a few ulps also where |dk| << 1 (ops/kl.py)
        else:
            kl = tl.abs(dk)
            dkl = tl.where(dk > 0, 1.0, tl.where(dk < 0, -1.0, 0.0))
        total = total + kl_coef * kl
        local = local + kl_coef * dkl
    if HAS_ENTROPY:
        entropy = tl.load(entropy_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        total = total - entropy_coef * entropy
    if STATS:
        # the stats of ppo_fused._stats: the policy and KL terms reduced with the weights, and
        # masked means over the counted tokens (where, not multiply: see below)
        counts = tl.load(m_ptr + offs, mask=inb, other=0.0) != 0.0
        if CISPO or SAPO:
            clipped_token = (ratio < low) | (ratio > high)
        else:
            clipped_token = -A * clipped > -A * ratio  # loss2 > loss1, as the reference
        s_pg = tl.sum(tl.where(counts, w * per_token, 0.0), axis=0)
        s_kl = 0.0
        if KL >= 0:
            s_kl = tl.sum(tl.where(counts, w * kl, 0.0), axis=0)
        entropy_all = tl.load(entropy_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        s_entropy = tl.sum(tl.where(counts, entropy_all, 0.0), axis=0)
        s_clipped = tl.sum(tl.where(counts & clipped_token, 1.0, 0.0), axis=0)
        s_approx_kl = tl.sum(tl.where(counts, 0.5 * d * d, 0.0), axis=0)
        s_ratio = tl.sum(tl.where(counts, ratio, 0.0), axis=0)
        s_count = tl.sum(tl.where(counts, 1.0, 0.0), axis=0)
        if FINISH:
            _store_stats(contrib_ptr, s_pg, s_kl, s_entropy, s_clipped, s_approx_kl, s_ratio,
                         s_count)
        else:
            out = contrib_ptr + pid * 7
            tl.store(out + 0, s_pg)
            tl.store(out + 1, s_kl)
            tl.store(out + 2, s_entropy)
            tl.store(out + 3, s_clipped)
            tl.store(out + 4, s_approx_kl)
            tl.store(out + 5, s_ratio)
            tl.store(out + 6, s_count)
    else:
        # where, not multiply: tokens that do not count may hold anything (inf ratios)
        tl.store(contrib_ptr + offs, tl.where(counts, w * total, 0.0), mask=inb)
        if DERIVATIVES:
            tl.store(d_logp_ptr + offs, tl.where(counts, w * local, 0.0), mask=inb)
            if HAS_ENTROPY:
                tl.store(d_entropy_ptr + offs, tl.where(counts, -entropy_coef * w, 0.0),
                         mask=inb)


_launch = CachedLaunch(globals(), "_ppo_token_terms_kernel")
_finish = CachedLaunch(globals(), "_ppo_token_stats_finish_kernel")
_N_SUMS = 7  # per program: pg, kl, entropy, clipped, approx_kl, ratio, count
N_STATS = 6  # pg_loss, kl, entropy, clipfrac, approx_kl, ratio_mean
_FINISH_BLOCK = 256


def can_fuse(logp, entropy, old_logp, advantages, weights, ref_logp, ratio_level) -> bool:
    """Whether ``token_terms`` takes these inputs (else ``per_token_terms``' torch ops)."""
    if ratio_level != "token" or logp.dtype != torch.float32 or logp.dim() == 0:
        return False
    if native_cpu_kernels(logp):
        return False
    n = logp.numel()
    for t in (logp, entropy, old_logp, weights, ref_logp):
        if t is not None and (t.shape != logp.shape or not t.is_contiguous()):
            return False
    return (advantages.shape == logp.shape
            or (logp.dim() == 2 and advantages.shape == (logp.shape[0], 1))) and n > 0


def token_terms(logp, entropy, old_logp, advantages, weights, ref_logp, kl_coef, kl_estimator,
                entropy_coef, clip_low, clip_high, dual_clip, log_ratio_clamp,
                derivatives=True, loss_type="ppo", taus=(1.0, 1.0)):
    """``per_token_terms(..., ratio_level="token")`` in one launch (``can_fuse`` must hold):
    -> (contribution, d_logp or None, d_entropy or None), fp32, shaped like logp. taus: SAPO's
    (tau for A > 0, tau for A <= 0), read with loss_type="sapo" only."""
    n = logp.numel()
    device = logp.device
    contribution = empty(logp.shape, torch.float32, device)
    d_logp = empty(logp.shape, torch.float32, device) if derivatives else None
    has_entropy = bool(entropy_coef)
    d_entropy = (empty(logp.shape, torch.float32, device) if derivatives and has_entropy
                 else None)
    if n == 0:
        return contribution, d_logp, d_entropy
    cols = logp.shape[-1]
    # (B, 1) per-sequence advantages: expanded (column stride 0), never copied
    adv = advantages.expand(logp.shape).reshape(-1, cols)
    kl = KL_ESTIMATOR_CODES[kl_estimator] if ref_logp is not None and kl_coef else -1
    _launch(
        (cdiv(n, _BLOCK),),
        logp, entropy if has_entropy else logp, old_logp, adv, weights,
        ref_logp if kl >= 0 else logp, weights,
        contribution, d_logp if derivatives else contribution,
        d_entropy if d_entropy is not None else contribution,
        n, cols, adv.stride(0), adv.stride(1),
        float(clip_low), float(clip_high), 0.0 if dual_clip is None else float(dual_clip),
        0.0 if log_ratio_clamp is None else float(log_ratio_clamp),
        float(kl_coef or 0.0), float(entropy_coef or 0.0), float(taus[0]), float(taus[1]),
        loss_type == "cispo", loss_type == "sapo", dual_clip is not None and loss_type == "ppo",
        log_ratio_clamp is not None, kl, has_entropy, bool(derivatives), False, False, _BLOCK,
        num_warps=4,
    )
    return contribution, d_logp, d_entropy


def token_stats(logp, entropy, old_logp, advantages, weights, mask, ref_logp, kl_coef,
                kl_estimator, clip_low, clip_high, dual_clip, log_ratio_clamp, loss_type="ppo",
                taus=(1.0, 1.0)) -> torch.Tensor:
    """The fused ops' stats at token level (``can_fuse`` must hold for logp, entropy, old_logp,
    advantages, weights, ref_logp; mask: the 0/1 fp32 mask of the tokens that count, logp's
    shape, contiguous): -> (N_STATS,) fp32 = pg_loss, kl (0 without the KL term), entropy,
    clipfrac, approx_kl, ratio_mean, as ``ppo_fused._stats`` computes them with torch ops (one
    or two launches instead of about 35 torch kernels; the sums in another order, so within
    fp32 rounding of those)."""
    n = logp.numel()
    device = logp.device
    stats = empty((N_STATS,), torch.float32, device)
    cols = logp.shape[-1]
    adv = advantages.expand(logp.shape).reshape(-1, cols)
    kl = KL_ESTIMATOR_CODES[kl_estimator] if ref_logp is not None and kl_coef else -1
    n_programs = max(1, cdiv(n, _BLOCK))
    finish = n_programs == 1
    partials = stats if finish else empty((n_programs, _N_SUMS), torch.float32, device)
    _launch(
        (n_programs,),
        logp, entropy, old_logp, adv, weights, ref_logp if kl >= 0 else logp, mask,
        partials, partials, partials,
        n, cols, adv.stride(0), adv.stride(1),
        float(clip_low), float(clip_high), 0.0 if dual_clip is None else float(dual_clip),
        0.0 if log_ratio_clamp is None else float(log_ratio_clamp),
        float(kl_coef or 0.0), 0.0, float(taus[0]), float(taus[1]),
        loss_type == "cispo", loss_type == "sapo", dual_clip is not None and loss_type == "ppo",
        log_ratio_clamp is not None, kl, False, False, True, finish, _BLOCK,
        num_warps=4,
    )
    if not finish:
        _finish((1,), partials, stats, n_programs,
                BLOCK_P=min(_FINISH_BLOCK, 1 << (n_programs - 1).bit_length()), num_warps=4)
    return stats
