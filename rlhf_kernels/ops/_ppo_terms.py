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

__all__ = ["token_terms", "can_fuse"]

_BLOCK = 1024
# torch.maximum / minimum / clamp propagate NaN (a NaN logp must make the loss NaN, never a
# finite wrong number); Triton's default min / max return the other operand.
NAN = tl.constexpr(tl.PropagateNan.ALL)


@triton.jit
def _max_grad(a, b):
    """d max(a, b) / d a as torch.maximum's backward: 1, 0, or 0.5 at a tie."""
    return tl.where(a > b, 1.0, tl.where(a < b, 0.0, 0.5))


@triton.jit
def _ppo_token_terms_kernel(
    logp_ptr, entropy_ptr, old_ptr, adv_ptr, w_ptr, ref_ptr,
    contrib_ptr, d_logp_ptr, d_entropy_ptr,
    n, n_cols, stride_adv_row, stride_adv_col,
    clip_low, clip_high, dual_clip, log_ratio_clamp, kl_coef, entropy_coef, tau_pos, tau_neg,
    CISPO: tl.constexpr, SAPO: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
    HAS_LOG_RATIO_CLAMP: tl.constexpr,
    KL: tl.constexpr, HAS_ENTROPY: tl.constexpr, DERIVATIVES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # KL: -1 without a KL term, else the estimator code (kl.KL_ESTIMATOR_CODES).
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
    # where, not multiply: tokens that do not count may hold anything (inf ratios)
    tl.store(contrib_ptr + offs, tl.where(counts, w * total, 0.0), mask=inb)
    if DERIVATIVES:
        tl.store(d_logp_ptr + offs, tl.where(counts, w * local, 0.0), mask=inb)
        if HAS_ENTROPY:
            tl.store(d_entropy_ptr + offs, tl.where(counts, -entropy_coef * w, 0.0), mask=inb)


_launch = CachedLaunch(globals(), "_ppo_token_terms_kernel")


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
        ref_logp if kl >= 0 else logp,
        contribution, d_logp if derivatives else contribution,
        d_entropy if d_entropy is not None else contribution,
        n, cols, adv.stride(0), adv.stride(1),
        float(clip_low), float(clip_high), 0.0 if dual_clip is None else float(dual_clip),
        0.0 if log_ratio_clamp is None else float(log_ratio_clamp),
        float(kl_coef or 0.0), float(entropy_coef or 0.0), float(taus[0]), float(taus[1]),
        loss_type == "cispo", loss_type == "sapo", dual_clip is not None and loss_type == "ppo",
        log_ratio_clamp is not None, kl, has_entropy, bool(derivatives), _BLOCK,
        num_warps=4,
    )
    return contribution, d_logp, d_entropy
