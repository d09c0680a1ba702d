"""The fused PPO step: from the policy's logits or hidden states to the scalar loss, with the
gradient produced in the same sweep as the forward.

Math (``rlhf_kernels.reference.ppo_loss_from_logits`` / ``linear_ppo_loss`` are the spec). Per
token i of row (sequence) s, with logp_i, entropy_i (tempered distribution, see
ops/logprobs.py) and the rollout's old_logp, advantage A (per token, or one per sequence
broadcast over its tokens), optional ref_logp; c = log_ratio_clamp, n_s = counted tokens of s::

    ratio_level="token":     r_i = exp(clamp(logp_i - old_i, +-c))
    ratio_level="sequence":  r_i = r_s = exp(clamp(sum_{j in s} (logp_j - old_j) / n_s, +-c))
    loss_type="ppo":   pg_i = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
                       [min(., -A dual_clip) where A < 0, with dual_clip]
    loss_type="cispo": pg_i = -sg(clip(r, 1 - clip_low, 1 + clip_high)) A logp_i  (sg: no grad)
    loss_type="sapo":  pg_i = -sigmoid(tau (r - 1)) (4 / tau) A, tau = sapo_tau_pos where A > 0,
                       sapo_tau_neg where A <= 0
    kl_i  = estimator(logp_i - ref_logp_i)       (k1, k2, k3, abs; always per token)
    loss  = reduce(pg) + kl_coef * reduce(kl) - entropy_coef * reduce(entropy)

Every reduction is linear in the per-token values: ``reduce(x) = sum_i w_i x_i`` with weights w
fixed by the mask and the normalizer alone (``reduction_weights``), e.g. w = m / sum(m) for
token-mean, m for token-sum, m / normalizer when a number replaces the outer denominator. A
tensor normalizer (maybe an all-reduced count still on the device: never read, no gradient
through it) divides after the sum, as the reference's does: the weights are those of a
normalizer of 1, and the sweeps divide the summed loss and the per-token derivatives by it on
the device (``_divide_by_normalizer``), so a count of 0 gives the reference's +-inf / NaN and
masked tokens keep a zero gradient. So
``d loss / d entropy_i = -entropy_coef w_i``, and ``d loss / d logp_i`` (``per_token_terms``,
which follows torch autograd through the reference: ties of max / min split the gradient,
clamp bounds count as inside) is known

* at token level, once token i's logp is known (PPO: w_i dpg_i/dr_i r_i [d_i inside the
  clamp]; SAPO: -4 w_i A_i r_i s(x) s(-x) [d_i inside the clamp], x = tau (r_i - 1), s the
  sigmoid; CISPO: -w_i sg(clip(r_i)) A_i; plus w_i kl_coef dkl_i);
* at sequence level, once every logp of row s is known: the row's ratio moves with each of its
  counted tokens (d dbar_s / d logp_i = 1 / n_s), so PPO (and SAPO alike) gives
  (sum_{j in s} w_j dpg_j/dr) r_s [dbar_s inside the clamp] / n_s + w_i kl_coef dkl_i. CISPO's
  derivative is local, but its weight needs r_s.

Sweeps. Token level, or one chunk that holds every row (then all of logp is known before any
derivative), one sweep: the backward of the logits runs right after the forward on the same
chunk:

    per chunk: logits (matmul) -> fwd kernel (logp, entropy, lse) -> per-token derivatives ->
               bwd kernel writes d logits in place -> d hidden, d weight, ... accumulated

The autograd backward only multiplies the saved gradients by the incoming scalar (in place), so
no matmul is recomputed: linear_ppo_loss costs the unfused "forward + backward" matmuls (3 per
chunk: logits, d hidden, d weight, plus the LoRA ones) and two passes of the logprobs kernels
over each chunk. linear_ppo_loss at sequence level over several chunks with a gradient, where a
row may straddle two chunks, takes two sweeps:

    sweep 1, per chunk: logits (matmul) -> fwd kernel (logp, entropy, lse: N floats each kept)
    then:               the derivatives of all N tokens, rows whole (N floats each)
    sweep 2, per chunk: logits again (matmul) -> bwd kernel in place -> gradients accumulated
                        (``linear_logprobs``' backward sweep: over slices of the
                        vocabulary instead of chunks of rows when d weight is wanted, N < V)

that is 4 matmuls per chunk instead of 3 (the logits one, with its LoRA part, twice): 2 N V H
more flops (1/3 more than the one-sweep
path's 6 N V H), and three passes of the logprobs kernels; the memory is the same (one chunk
of logits). Without a gradient, sweep 1 alone at any level. From logits nothing is chunked
(rows are independent and the kernels hold no (N, V) temporary): logp is known for every row
before the derivatives, so one sweep at either level; it reads the (N, V) logits twice (forward
and backward kernel) and writes d logits once: 3 N V elements.

Per-sequence advantages travel as a (B, 1) column. Where the derivatives see whole rows (from
logits, or one chunk) they run on (B, T) views and the column broadcasts, never copied. The
chunked token-level linear sweep works on flat token ranges, where an expand + reshape of the
column to (N,) would copy it: instead each chunk gathers its tokens' row advantages (a
temporary of the chunk's size, like the chunk's other per-token temporaries); the two-sweep
path's derivatives run on (B, T) views again.

Masked tokens (mask 0 or label == ignore_index, i.e. weight 0) are handed to the kernels as
ignored rows: their logits are never read, their d logits are written as exactly 0, and (for the
lm_head) their hidden rows are zeroed before the d weight / d LoRA matmuls, so NaN or inf there
contributes 0 rather than 0 * NaN.

Memory: one chunk of logits (see ops/linear_logprobs.py for the chunk size) plus the gradients.
A consequence of the saved, pre-scaled gradients: backward through the same graph twice
(``retain_graph=True``) raises an error naming the op.

Stats are those of the reference (pg_loss, kl, entropy, clipfrac, approx_kl, ratio_mean; at
sequence level clipfrac and ratio_mean are over tokens of the row ratio, approx_kl stays per
token), from the per-token logp / entropy. At token level on the Triton path they are one more
launch of the token-terms kernel in its stats mode over all N tokens (``_ppo_terms.token_stats``,
plus a one-program finish past 1024 tokens; its own custom op ``rlhf_kernels::ppo_token_stats``,
so compiled and eager calls give the same bits): sums in another order than the reference's, so
within fp32 rounding of it. With a tensor normalizer the kernel's pg_loss / kl sums use the
weights before it and are then divided by it (one more torch kernel), as the reference divides:
a 0 or NaN normalizer gives its +-inf / NaN. Otherwise (sequence level, fp64, the native CPU
kernels) ``_stats`` computes them with the reference's own formulas, to its bits: about 35
small torch kernels, each a launch on a GPU.

Dispatch: each op is a ``torch.library`` custom op for torch.compile, export, torch.func and
fake tensors; in plain eager mode (``rlhf_kernels.backend.launch_directly``) the same sweep runs
directly, under a ``torch.autograd.Function`` when a gradient is wanted (same bits, less host
time). Without a gradient the sweep skips the per-token derivatives (``per_token_terms``).
"""

from __future__ import annotations

import inspect
import math

import torch

from rlhf_kernels import reference
from rlhf_kernels._alloc import empty
from rlhf_kernels._checks import (
    ENTROPY_COEF_MEANING,
    KL_COEF_MEANING,
    as_mask,
    check_advantages_shape,
    check_float,
    check_kl_reference,
    check_normalizer,
    check_policy_options,
    check_reduction,
    check_same_shape,
    finite_setting,
    int_setting,
    normalizer_setting,
    real_setting,
    sapo_taus,
)
from rlhf_kernels.backend import direct_apply, launch_directly, resolve_backend
from rlhf_kernels.ops import linear_logprobs as head
from rlhf_kernels.ops._reduce import anchor_output, no_double_backward
from rlhf_kernels.ops.kl import k3_torch

__all__ = ["linear_ppo_loss", "ppo_loss_from_logits", "reduction_weights"]

_EMPTY = (0,)


# --------------------------------------------------------------------------------------------
# the loss as a weighted sum of per-token terms, and its derivative per token
# --------------------------------------------------------------------------------------------
def reduction_weights(mask: torch.Tensor, reduction: str,
                      normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """(..., T) 0/1 float mask -> (..., T) fp32 weights w with
    reduce_loss(x, mask, reduction, normalizer) = sum(w x).

    ``normalizer`` replaces the outer denominator (see ``reference.reduce_loss``): a number, or
    a 0-d tensor used without a gradient, on the mask's device or the CPU (a host scalar).
    Computed on the device (no host sync); rows and tensors without a valid token weigh 0.
    """
    check_reduction(reduction)
    m = mask.to(torch.float32)
    if normalizer is not None:
        if isinstance(normalizer, torch.Tensor):
            normalizer = normalizer.detach()
            if normalizer.dtype != torch.float32:
                normalizer = normalizer.to(torch.float32)
            # A 0-d CPU tensor stays where it is: torch reads it as a host scalar in CUDA ops,
            # while moving it would be a synchronous copy. Another device: moved to the mask's.
            if normalizer.device != m.device and normalizer.device.type != "cpu":
                normalizer = normalizer.to(m.device)
        if reduction == "seq-mean-token-mean":
            return m / (m.sum(-1, keepdim=True).clamp_min(1) * normalizer)
        return m / normalizer
    if reduction == "token-sum":
        return m
    if reduction == "token-mean":
        return m / m.sum().clamp_min(1)
    if reduction == "seq-mean-token-sum-norm":
        return m / m.shape[-1]
    tokens_per_row = m.sum(-1, keepdim=True)
    n_rows = (tokens_per_row > 0).to(torch.float32).sum().clamp_min(1)
    if reduction == "seq-mean-token-mean":
        return m / (tokens_per_row.clamp_min(1) * n_rows)
    return m / n_rows  # seq-mean-token-sum


def _max_grads(a, b):
    """d max(a, b) / d (a, b) as torch.maximum's backward: ties split the gradient in half."""
    ga = torch.where(a > b, 1.0, torch.where(a < b, 0.0, 0.5))
    return ga, 1.0 - ga


def _fp32(t: torch.Tensor) -> torch.Tensor:
    # .to() of a tensor already in fp32 returns it, but after a microsecond of dispatch.
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def per_token_terms(logp, entropy, old_logp, advantages, weights, ref_logp, kl_coef,
                    kl_estimator, entropy_coef, clip_low, clip_high, dual_clip, log_ratio_clamp,
                    derivatives=True, ratio_level="token", loss_type="ppo", fused=True,
                    taus=(1.0, 1.0)):
    """Per-token logp / entropy -> (w * per-token loss, d loss/d logp, d loss/d entropy or None),
    following torch autograd through the reference (torch.maximum / minimum ties split the
    gradient in half, clamp bounds are inclusive).

    logp, entropy, old_logp, weights, ref_logp: one shape S, logp / entropy fp32 (fp64 for fp64
    matmuls); advantages: S or broadcastable to it (a (rows, 1) column of per-sequence
    advantages against (rows, T) tokens: broadcast, never copied). ratio_level="token": any S
    (a chunk of tokens). ratio_level="sequence": S = (rows, T), every row a whole sequence (the
    row's ratio and its derivative need all its tokens). Tokens with weight 0 do not count: they
    may hold anything (NaN, inf) and add exactly 0. The outputs have shape S.

    derivatives=False (no gradient wanted): the same per-token loss, and None for both
    derivatives (they are not computed). taus: SAPO's (tau for A > 0, tau for A <= 0), read
    with loss_type="sapo" only.

    At token level on the Triton path (fp32 logp, contiguous inputs) this is one kernel
    (``ops/_ppo_terms.py``, the same arithmetic, its own exp) instead of about 25 torch ops;
    ``fused=False`` keeps the torch ops.
    """
    terms = _ppo_terms_module() if fused else None
    if fused and terms.can_fuse(logp, entropy, old_logp, advantages, weights, ref_logp,
                                ratio_level):
        return terms.token_terms(logp, entropy, old_logp, advantages, weights, ref_logp,
                                 kl_coef, kl_estimator, entropy_coef, clip_low, clip_high,
                                 dual_clip, log_ratio_clamp, derivatives, loss_type, taus)
    f32 = torch.float32
    w = _fp32(weights)
    counts = w != 0
    A = _fp32(advantages)
    d = logp - _fp32(old_logp)
    sequence = ratio_level == "sequence"
    if sequence:
        # GSPO: one log-ratio per row, the mean over its counted tokens (where, not multiply:
        # a token that does not count may hold NaN); (rows, 1), broadcast over the row below.
        n = counts.sum(-1, keepdim=True).clamp_min(1).to(f32)
        d = torch.where(counts, d, 0.0).sum(-1, keepdim=True) / n
    d_grad = None  # d clamp(d) / d d, where the clamp is on
    if log_ratio_clamp is not None:
        if derivatives:
            d_grad = ((d >= -log_ratio_clamp) & (d <= log_ratio_clamp)).to(f32)
        d = d.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(d)
    low, high = 1.0 - clip_low, 1.0 + clip_high
    local = None  # d per-token loss / d logp_t through this token alone (unweighted)
    row = None  # sequence level: the weighted d loss / d logp_t through the row's ratio
    if loss_type == "cispo":
        # the clipped ratio is a weight without gradient: d/d logp = -weight * A, whatever the
        # ratio level (the ratio's own dependence on logp is cut)
        weight = ratio.clamp(low, high)
        per_token = -weight * A * logp
        if derivatives:
            local = -weight * A
    else:
        if loss_type == "sapo":
            # the gate sigmoid(tau (r - 1)) 4 / tau, tau by the sign of A; d / d log r is
            # -4 A r s(x) s(-x): 0 where the gate saturates, even where r overflowed to inf
            tau = torch.where(A > 0, taus[0], taus[1])
            x = tau * (ratio - 1.0)
            gate = torch.sigmoid(x)
            per_token = -(4.0 / tau) * gate * A
            if derivatives:
                slope = gate * torch.sigmoid(-x)
                d_log_ratio = torch.where(slope == 0, 0.0, -4.0 * A * ratio * slope)
        else:
            loss1 = -A * ratio
            loss2 = -A * ratio.clamp(low, high)
            per_token = torch.maximum(loss1, loss2)
            if derivatives:
                clip_grad = ((ratio >= low) & (ratio <= high)).to(f32)
                g1, g2 = _max_grads(loss1, loss2)
                d_ratio = -A * (g1 + g2 * clip_grad)  # d per_token / d ratio
            if dual_clip is not None:
                loss3 = -A * dual_clip
                if derivatives:
                    # minimum(per, loss3) = -max(-per, -loss3)
                    keep, _ = _max_grads(loss3, per_token)
                    d_ratio = torch.where(A < 0, d_ratio * keep, d_ratio)
                per_token = torch.where(A < 0, torch.minimum(per_token, loss3), per_token)
            if derivatives:
                d_log_ratio = d_ratio * ratio
        if derivatives:
            through_ratio = d_log_ratio if d_grad is None else d_log_ratio * d_grad
            if sequence:
                # every counted token of the row moves the row's ratio: d dbar / d logp_t = 1 / n
                row = torch.where(counts, w * through_ratio, 0.0).sum(-1, keepdim=True) / n
            else:
                local = through_ratio
    total = per_token
    if ref_logp is not None and kl_coef:
        dk = logp - _fp32(ref_logp)
        if kl_estimator == "k1":
            kl, dkl = dk, (torch.ones_like(dk) if derivatives else None)
        elif kl_estimator == "k2":
            kl, dkl = 0.5 * dk * dk, dk
        elif kl_estimator == "k3":
            kl, dkl = k3_torch(dk, derivatives)  # fp32's e^-d + d - 1 cancels at small |dk|
        else:
            kl, dkl = dk.abs(), (torch.sign(dk) if derivatives else None)
        total = total + kl_coef * kl
        if derivatives:
            local = kl_coef * dkl if local is None else local + kl_coef * dkl
    d_entropy = None
    if entropy_coef:
        total = total - entropy_coef * entropy
        if derivatives:
            d_entropy = torch.where(counts, -entropy_coef * w, 0.0)
    # where, not multiply: masked tokens may hold anything (inf ratios), they must add exactly 0
    contribution = torch.where(counts, w * total, 0.0)
    if not derivatives:
        return contribution, None, None
    if row is None:
        d_logp = w * local
    else:  # sequence-level PPO: the row's part, plus the KL term's own where it is on
        d_logp = row if local is None else w * local + row
    return contribution, torch.where(counts, d_logp, 0.0), d_entropy


# --------------------------------------------------------------------------------------------
# the sweeps
# --------------------------------------------------------------------------------------------
def _masked_as_ignored(labels, counted, ignore_index, check_labels, vocab):
    """Labels with every token that does not count (``counted``: weight != 0; masked or ignored
    tokens weigh 0) set to ignore_index: the kernels then skip those rows (no bytes read) and
    write exactly 0 as their d logits, whatever the logits hold there (0 * NaN would be NaN)."""
    if check_labels:
        head.check_label_range(labels, vocab, ignore_index)
    return torch.where(counted, labels, ignore_index)


def _any_head_grad(needs, bias, lora_a) -> bool:
    """Whether ``HeadGrads(..., needs, ...)`` would compute anything (without allocating it)."""
    need_h, need_w, need_b, need_a, need_lb = needs
    return bool(need_h or need_w or (need_b and bias is not None)
                or ((need_a or need_lb) and lora_a is not None))


def _chunk_advantages(advantages, seq_len, start, stop):
    """(B, T) per-token or (B, 1) per-sequence advantages -> those of flat tokens start:stop.

    Per sequence, the chunk's tokens gather their row's advantage: a temporary of the chunk's
    size, like the chunk's other per-token temporaries, and never a (B, T) copy.
    """
    if advantages.shape[1] == seq_len:  # per token (T == 1: both forms are the same)
        return advantages.reshape(-1)[start:stop]
    tokens = torch.arange(start, stop, device=advantages.device)
    return advantages.reshape(-1)[tokens // seq_len]


def _linear_sweep(hidden, weight, labels, bias, lora_a, lora_b, old_logp, advantages, weights,
                  ref_logp, lora_scale, kl_coef, kl_estimator, entropy_coef, temperature,
                  clip_low, clip_high, dual_clip, log_ratio_clamp, ignore_index, chunk_size,
                  memory_budget_bytes, needs, check_labels=False, seq_len=1,
                  ratio_level="token", loss_type="ppo", tau_pos=1.0, tau_neg=1.0,
                  normalizer=None, placeholder=True):
    """-> (loss, logp, entropy, d hidden, d weight, d bias, d lora_a, d lora_b); a gradient
    that is not wanted is an empty tensor (what the custom op returns), or None with
    ``placeholder=False``.

    hidden (N, H) with N = B * seq_len tokens, B sequences of seq_len; labels, old_logp,
    weights, ref_logp (N,); advantages (B, seq_len) per token or (B, 1) per sequence.
    One sweep (forward, derivatives, backward chunk by chunk) at token level or when one chunk
    holds every row; ratio_level="sequence" over several chunks with a gradient: a forward
    sweep, the derivatives of all rows, then ``linear_logprobs``' backward sweep (module
    docstring). normalizer: None, or a 0-d tensor that divides the loss and the per-token
    derivatives made with ``weights`` (``_divide_by_normalizer``).
    """
    logprobs_fwd, logprobs_bwd = head._logprob_kernels()
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    counted = weights != 0
    labels = _masked_as_ignored(labels, counted, ignore_index, check_labels, vocab)
    dtype = head.compute_dtype(hidden, weight)
    w, b, a, lb = head.cast_head(dtype, weight, bias, lora_a, lora_b)
    h = head.cast_to(hidden, dtype)
    rows = head.choose_chunk_rows(n_rows, vocab, h.element_size(), device, chunk_size,
                                  memory_budget_bytes)
    # One chunk (the common case at small N) takes the whole tensors: no per-chunk slicing.
    single = rows >= n_rows
    n_seq = advantages.shape[0]
    as_seqs = lambda t: None if t is None else t.view(n_seq, seq_len)  # noqa: E731
    # A sequence ratio needs the logp of the whole row before any derivative: over several
    # chunks a row may straddle two, so the derivatives wait for the end of the forward sweep.
    per_chunk = single or ratio_level == "token"
    grads = head.HeadGrads(n_rows, hidden, weight, bias, lora_a, lora_b,
                           needs if per_chunk else (False,) * 5, dtype, single)
    need_grads = grads.any()
    if grads.reads_rows():
        h = head.zero_rows(h, counted)  # masked rows add exactly 0, even for NaN h
    out = head.out_dtype(dtype)
    logp = empty((n_rows,), out, device)
    entropy = empty((n_rows,), out, device)
    lse = empty((n_rows,), torch.float32, device)
    contribution = None if single or not per_chunk else empty((n_rows,), out, device)
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        sl = slice(start, stop)
        rows_of = (lambda t: t) if single else (lambda t, sl=sl: None if t is None else t[sl])
        h_c, labels_c = rows_of(h), rows_of(labels)
        logits, u = head.chunk_logits(h_c, w, b, a, lb, lora_scale)
        lp_c, ent_c, lse_c = logprobs_fwd(logits, labels_c, temperature, ignore_index, True,
                                          out=(rows_of(logp), rows_of(entropy), rows_of(lse)))
        if per_chunk:
            # one chunk: the whole (B, T) batch (per-sequence advantages broadcast, no copy)
            view = as_seqs if single else (lambda t: t)
            contribution_c, d_logp, d_entropy = per_token_terms(
                view(lp_c), view(ent_c), view(rows_of(old_logp)),
                advantages if single else _chunk_advantages(advantages, seq_len, start, stop),
                view(rows_of(weights)), view(rows_of(ref_logp)), kl_coef, kl_estimator,
                entropy_coef, clip_low, clip_high, dual_clip, log_ratio_clamp, need_grads,
                ratio_level, loss_type, taus=(tau_pos, tau_neg))
            if normalizer is not None and need_grads:
                d_logp, d_entropy = _divide_by_normalizer(normalizer, d_logp, d_entropy)
            if contribution is None:  # one chunk: its result is the whole
                contribution = (contribution_c if contribution_c.dtype == out
                                else contribution_c.to(out))
            else:
                contribution[sl] = contribution_c
            if need_grads:
                logprobs_bwd(logits, labels_c, lse_c, ent_c if d_entropy is not None else None,
                             d_logp, d_entropy, temperature, ignore_index, logits)
                grads.accumulate(start, logits, h_c, u, w, a, lb, lora_scale)
        del logits, u
    if per_chunk:
        loss = contribution.sum() if n_rows > 0 else logp.new_zeros(())
        if normalizer is not None:
            loss = loss / normalizer.to(loss.dtype)
        return (loss, logp, entropy) + grads.outputs(hidden, weight, bias, lora_a, lora_b,
                                                     placeholder)
    # sequence ratio over several chunks: every row's logp is known now
    wanted = _any_head_grad(needs, bias, lora_a)
    contribution, d_logp, d_entropy = per_token_terms(
        as_seqs(logp), as_seqs(entropy), as_seqs(old_logp), advantages, as_seqs(weights),
        as_seqs(ref_logp), kl_coef, kl_estimator, entropy_coef, clip_low, clip_high, dual_clip,
        log_ratio_clamp, wanted, ratio_level, loss_type, taus=(tau_pos, tau_neg))
    loss = contribution.sum().to(out)
    if normalizer is not None:
        loss = loss / normalizer.to(loss.dtype)
        if wanted:
            d_logp, d_entropy = _divide_by_normalizer(normalizer, d_logp, d_entropy)
    if not wanted:
        return (loss, logp, entropy) + grads.outputs(hidden, weight, bias, lora_a, lora_b,
                                                     placeholder)
    # the second sweep recomputes each chunk's logits (one more matmul per chunk)
    return (loss, logp, entropy) + head._backward_sweep(
        d_logp.view(-1), None if d_entropy is None else d_entropy.view(-1), hidden, weight,
        labels, bias, lora_a, lora_b, lse, entropy, lora_scale, temperature, ignore_index,
        chunk_size, memory_budget_bytes, needs, placeholder)


def _logits_sweep(logits3d, labels, old_logp, advantages, weights, ref_logp, kl_coef,
                  kl_estimator, entropy_coef, temperature, clip_low, clip_high, dual_clip,
                  log_ratio_clamp, ignore_index, need_grad, check_labels=False,
                  ratio_level="token", loss_type="ppo", tau_pos=1.0, tau_neg=1.0,
                  normalizer=None):
    """logits (B, T, V); labels, old_logp, weights, ref_logp (N,) = (B * T,); advantages
    (B, T) per token or (B, 1) per sequence -> (loss, logp, entropy, d logits or (0,)).
    normalizer: as in ``_linear_sweep``."""
    # Rows are independent and the kernels hold no (N, V) temporary, so no chunking is needed;
    # logp is known for every row before the derivatives, whatever the ratio level. The kernels
    # address rows through the (B, T) strides, so a causal shift logits[:, :-1, :] is one launch
    # for the whole batch, read in place (no per-row launches, no copy).
    lp = _logprobs_module()
    B, T, V = logits3d.shape
    n_rows = B * T
    labels = _masked_as_ignored(labels, weights != 0, ignore_index, check_labels, V)
    device = logits3d.device
    logits3d = lp._rows3d(logits3d)  # a copy only for stride(-1) != 1
    temperature, ignore_index = float(temperature), int(ignore_index)
    out = head.out_dtype(logits3d.dtype)
    logp = empty((n_rows,), out, device)
    entropy = empty((n_rows,), out, device)
    lse = empty((n_rows,), torch.float32, device)
    lp._fwd3d(logits3d, labels, temperature, ignore_index, logp, entropy, lse, None)
    # (B, T) views: per-sequence advantages (B, 1) broadcast over T without a copy
    as_seqs = lambda t: None if t is None else t.view(B, T)  # noqa: E731
    contribution, d_logp, d_entropy = per_token_terms(
        as_seqs(logp), as_seqs(entropy), as_seqs(old_logp), advantages, as_seqs(weights),
        as_seqs(ref_logp), kl_coef, kl_estimator, entropy_coef, clip_low, clip_high, dual_clip,
        log_ratio_clamp, need_grad, ratio_level, loss_type, taus=(tau_pos, tau_neg))
    loss = contribution.sum()
    if normalizer is not None:
        loss = loss / normalizer.to(loss.dtype)
    if not need_grad:
        return loss, logp, entropy, logits3d.new_empty(_EMPTY)
    if normalizer is not None:
        d_logp, d_entropy = _divide_by_normalizer(normalizer, d_logp, d_entropy)
    d_logits = empty((B, T, V), logits3d.dtype, device)
    # (the launch view of the logits may be (1, B * T, V): the gradient viewed the same way)
    lp._bwd3d(logits3d, labels, lse, entropy if d_entropy is not None else None,
              lp._flat_fp32(d_logp), lp._flat_fp32(d_entropy), temperature, ignore_index,
              d_logits.view(logits3d.shape))
    return loss, logp, entropy, d_logits


def _divide_by_normalizer(normalizer, d_logp, d_entropy):
    """Per-token derivatives made with the weights of a normalizer of 1, divided by the tensor
    normalizer (the reference divides the reduced sum by it). A derivative that is exactly 0
    (a token that does not count, a clipped one) stays 0 whatever the normalizer, as in the
    reference's autograd (its selects give 0 there): a normalizer of 0 or NaN makes the others
    +-inf / NaN, never a masked token's (0 / 0 would be NaN)."""
    def divide(d):
        if d is None:
            return None
        return torch.where(d == 0, 0.0, d / normalizer.to(d.dtype))
    return divide(d_logp), divide(d_entropy)


_LOGPROBS = None
_PPO_TERMS = None


def _ppo_terms_module():
    # Imported on first use (it defines a @triton.jit kernel), then kept.
    global _PPO_TERMS
    if _PPO_TERMS is None:
        from rlhf_kernels.ops import _ppo_terms

        _PPO_TERMS = _ppo_terms
    return _PPO_TERMS


def _logprobs_module():
    # Imported on first use (it defines @triton.jit kernels), then kept: an import per call
    # costs host time.
    global _LOGPROBS
    if _LOGPROBS is None:
        from rlhf_kernels.ops import logprobs

        _LOGPROBS = logprobs
    return _LOGPROBS


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
def _linear_ppo_impl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    ref_logp: torch.Tensor | None,
    lora_scale: float,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    temperature: float,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    log_ratio_clamp: float | None,
    ignore_index: int,
    chunk_size: int,
    memory_budget_bytes: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    need_lora_a: bool,
    need_lora_b: bool,
    check_labels: bool,
    seq_len: int,
    ratio_level: str,
    loss_type: str,
    tau_pos: float,
    tau_neg: float,
    normalizer: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """hidden (N, H), N = B * seq_len; advantages (B, seq_len) or (B, 1) -> (loss (), logp (N,),
    entropy (N,), d hidden, d weight, d bias, d lora_a, d lora_b); loss / logp / entropy fp32
    (fp64 when the matmuls are fp64)."""
    needs = (need_hidden, need_weight, need_bias, need_lora_a, need_lora_b)
    return _linear_sweep(hidden, weight, labels, bias, lora_a, lora_b, old_logp, advantages,
                         weights, ref_logp, lora_scale, kl_coef, kl_estimator, entropy_coef,
                         temperature, clip_low, clip_high, dual_clip, log_ratio_clamp,
                         ignore_index, chunk_size, memory_budget_bytes, needs, check_labels,
                         seq_len, ratio_level, loss_type, tau_pos, tau_neg, normalizer)


# the op's inputs by name: setup_context and backward find an input by its name, not by a
# position that a new option would shift
_LINEAR_PARAMS = tuple(inspect.signature(_linear_ppo_impl).parameters)
_linear_ppo_op = torch.library.custom_op("rlhf_kernels::linear_ppo_loss",
                                         mutates_args=())(_linear_ppo_impl)


@_linear_ppo_op.register_fake
def _(hidden, weight, labels, bias, lora_a, lora_b, old_logp, advantages, weights, ref_logp,
      lora_scale, kl_coef, kl_estimator, entropy_coef, temperature, clip_low, clip_high,
      dual_clip, log_ratio_clamp, ignore_index, chunk_size, memory_budget_bytes, need_hidden,
      need_weight, need_bias, need_lora_a, need_lora_b, check_labels, seq_len, ratio_level,
      loss_type, tau_pos, tau_neg, normalizer):
    n = hidden.shape[0]
    out = head.out_dtype(head.compute_dtype(hidden, weight))
    needs = (need_hidden, need_weight, need_bias, need_lora_a, need_lora_b)
    return (hidden.new_empty((), dtype=out), hidden.new_empty((n,), dtype=out),
            hidden.new_empty((n,), dtype=out)) + head.fake_head_grads(
                hidden, weight, bias, lora_a, lora_b, needs)


_LINEAR_NEEDS = slice(_LINEAR_PARAMS.index("need_hidden"),
                      _LINEAR_PARAMS.index("need_lora_b") + 1)


def _linear_setup_context(ctx, inputs, output):
    ctx.needs = inputs[_LINEAR_NEEDS]
    # logp / entropy are statistics: no gradient flows through them (one that did would be
    # dropped by the backward below). The gradients are the backward's state, outputs nobody
    # else sees: left differentiable, saved they carry the op's node, which no_double_backward
    # links its error to (they get no gradient either).
    ctx.mark_non_differentiable(*output[1:3])
    ctx.save_for_backward(*output[3:])


# inputs of the linear op (and of _LinearPPOFunction) after hidden, weight, labels, bias,
# lora_a, lora_b: the rollout tensors and options, none differentiable
_LINEAR_OTHER_INPUTS = len(_LINEAR_PARAMS) - _LINEAR_PARAMS.index("old_logp")


def _scale(grad: torch.Tensor, grad_loss: torch.Tensor, in_place: bool) -> torch.Tensor:
    """A gradient made in the forward sweep for a unit upstream gradient, times the upstream
    one. In place on the eager path (no second logits-sized buffer; the version bump makes a
    second backward through the graph fail loudly). Out of place for the custom op: there the
    saved gradient is also one of the op's outputs, which its backward must not change (AOT
    autograd cannot partition a backward that mutates a forward output; under torch.compile the
    in-place product was a product plus a copy anyway)."""
    return grad.mul_(grad_loss) if in_place else grad * grad_loss


@no_double_backward("linear_ppo_loss")
def _linear_op_backward(ctx, grad_loss, *_unused):
    return _linear_backward(ctx, grad_loss)


def _linear_backward(ctx, grad_loss, *_unused, in_place=False):
    grads = ctx.saved_tensors
    out = []
    for g, needed in zip(grads, ctx.needs):
        out.append(_scale(g, grad_loss, in_place) if needed else None)
    d_hidden, d_weight, d_bias, d_a, d_b = out
    return (d_hidden, d_weight, None, d_bias, d_a, d_b) + (None,) * _LINEAR_OTHER_INPUTS


_linear_ppo_op.register_autograd(_linear_op_backward, setup_context=_linear_setup_context)


def _logits_ppo_impl(
    logits3d: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    ref_logp: torch.Tensor | None,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    temperature: float,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    log_ratio_clamp: float | None,
    ignore_index: int,
    need_grad: bool,
    check_labels: bool,
    ratio_level: str,
    loss_type: str,
    tau_pos: float,
    tau_neg: float,
    normalizer: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (B, T, V), advantages (B, T) or (B, 1) -> (loss (), logp (N,), entropy (N,),
    d logits (B, T, V) or (0,)); loss / logp / entropy fp32 (fp64 for fp64 logits)."""
    return _logits_sweep(logits3d, labels, old_logp, advantages, weights, ref_logp, kl_coef,
                         kl_estimator, entropy_coef, temperature, clip_low, clip_high, dual_clip,
                         log_ratio_clamp, ignore_index, need_grad, check_labels, ratio_level,
                         loss_type, tau_pos, tau_neg, normalizer)


_LOGITS_PARAMS = tuple(inspect.signature(_logits_ppo_impl).parameters)
_LOGITS_NEED_GRAD = _LOGITS_PARAMS.index("need_grad")
# inputs of the logits op (and of _LogitsPPOFunction) after the logits
_LOGITS_OTHER_INPUTS = len(_LOGITS_PARAMS) - 1
_logits_ppo_op = torch.library.custom_op("rlhf_kernels::ppo_loss_from_logits",
                                         mutates_args=())(_logits_ppo_impl)


@_logits_ppo_op.register_fake
def _(logits3d, labels, old_logp, advantages, weights, ref_logp, kl_coef, kl_estimator,
      entropy_coef, temperature, clip_low, clip_high, dual_clip, log_ratio_clamp, ignore_index,
      need_grad, check_labels, ratio_level, loss_type, tau_pos, tau_neg, normalizer):
    n = logits3d.shape[0] * logits3d.shape[1]
    out = head.out_dtype(logits3d.dtype)
    return (logits3d.new_empty((), dtype=out), logits3d.new_empty((n,), dtype=out),
            logits3d.new_empty((n,), dtype=out),
            logits3d.new_empty(logits3d.shape if need_grad else _EMPTY))


def _logits_setup_context(ctx, inputs, output):
    ctx.need_grad = inputs[_LOGITS_NEED_GRAD]
    ctx.mark_non_differentiable(*output[1:3])  # as in _linear_setup_context
    ctx.save_for_backward(output[3])


@no_double_backward("ppo_loss_from_logits")
def _logits_op_backward(ctx, grad_loss, *_unused):
    return _logits_backward(ctx, grad_loss)


def _logits_backward(ctx, grad_loss, *_unused, in_place=False):
    d_logits = ctx.saved_tensors[0]
    d_logits = _scale(d_logits, grad_loss, in_place) if ctx.need_grad else None
    return (d_logits,) + (None,) * _LOGITS_OTHER_INPUTS


_logits_ppo_op.register_autograd(_logits_op_backward, setup_context=_logits_setup_context)


# --------------------------------------------------------------------------------------------
# the eager path (``launch_directly``): the sweeps under an autograd Function, without the
# custom ops' dispatch and autograd host time; same kernels, same matmuls, same bits
# --------------------------------------------------------------------------------------------
class _LinearPPOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, lora_a, lora_b, *rest):
        (old_logp, advantages, weights, ref_logp, lora_scale, kl_coef, kl_estimator,
         entropy_coef, temperature, clip_low, clip_high, dual_clip, log_ratio_clamp,
         ignore_index, chunk_size, memory_budget_bytes, need_hidden, need_weight, need_bias,
         need_lora_a, need_lora_b, check_labels, seq_len, ratio_level, loss_type, tau_pos,
         tau_neg, normalizer) = rest
        needs = (need_hidden, need_weight, need_bias, need_lora_a, need_lora_b)
        # hidden (..., H) is flattened here, not by the caller: no view node in the graph.
        hidden_shape = hidden.shape
        hidden = hidden.reshape(-1, hidden_shape[-1])
        loss, logp, entropy, *grads = _linear_sweep(
            hidden, weight, labels, bias, lora_a, lora_b, old_logp, advantages, weights,
            ref_logp, lora_scale, kl_coef, kl_estimator, entropy_coef, temperature, clip_low,
            clip_high, dual_clip, log_ratio_clamp, ignore_index, chunk_size,
            memory_budget_bytes, needs, check_labels, seq_len, ratio_level, loss_type, tau_pos,
            tau_neg, normalizer, placeholder=False)
        if need_hidden:
            grads[0] = grads[0].view(hidden_shape)
        ctx.mark_non_differentiable(logp, entropy)
        ctx.needs = needs
        anchor = anchor_output(loss)  # for no_double_backward, not for the user
        ctx.save_for_backward(*grads, anchor)
        return loss, logp, entropy, anchor

    @staticmethod
    @no_double_backward("linear_ppo_loss")
    def backward(ctx, grad_loss, *_unused):
        _refuse_second_backward(ctx, "linear_ppo_loss")
        grads = _linear_backward(ctx, grad_loss, in_place=True)
        ctx.scaled_in_place = True
        return grads


_apply_linear_ppo = direct_apply(_LinearPPOFunction)


class _LogitsPPOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, *rest):
        # logits (..., T, V) are made (B, T, V) here, not by the caller: no view node.
        loss, logp, entropy, d_logits = _logits_sweep(_as_3d(logits), *rest)
        ctx.mark_non_differentiable(logp, entropy)
        ctx.need_grad = rest[_LOGITS_NEED_GRAD - 1]  # rest: the op's inputs after the logits
        anchor = anchor_output(loss)  # for no_double_backward, not for the user
        ctx.save_for_backward(d_logits.view(logits.shape) if ctx.need_grad else d_logits,
                              anchor)
        return loss, logp, entropy, anchor

    @staticmethod
    @no_double_backward("ppo_loss_from_logits")
    def backward(ctx, grad_loss, *_unused):
        _refuse_second_backward(ctx, "ppo_loss_from_logits")
        grads = _logits_backward(ctx, grad_loss, in_place=True)
        ctx.scaled_in_place = True
        return grads


_apply_logits_ppo = direct_apply(_LogitsPPOFunction)


def _refuse_second_backward(ctx, op: str) -> None:
    """A second backward through the eager path's graph (``retain_graph=True``) would read the
    gradients the first one scaled in place: one error naming the op and the way out, instead
    of autograd's version-counter message about an anonymous tensor (its words are kept)."""
    if getattr(ctx, "scaled_in_place", False):
        raise RuntimeError(
            f"rlhf_kernels.{op}: a second backward through the same graph (retain_graph=True) "
            "is not supported: the gradients are made in the forward and the first backward "
            "scaled them in place (they were modified by an inplace operation). Call the op "
            "again for another backward, or use backend='reference'"
        )


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------
def _check_rollout(labels, old_logp, advantages, mask, ref_logp, kl_estimator, clip_low,
                   clip_high, dual_clip, log_ratio_clamp, reduction, ratio_level, loss_type,
                   normalizer):
    check_float("old_logp", old_logp)
    check_float("advantages", advantages)
    check_same_shape("old_logp", old_logp, "labels", labels)
    if labels.dim() < 1:
        raise ValueError("labels must have at least one (time) dimension, got a 0-d tensor")
    check_advantages_shape(advantages, labels, "labels")
    if ref_logp is not None:
        check_float("ref_logp", ref_logp)
        check_same_shape("ref_logp", ref_logp, "labels", labels)
    if kl_estimator not in reference.KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={kl_estimator!r} is not supported; expected one of "
                         f"{reference.KL_ESTIMATORS}")
    # written so that NaN is refused too (it made the loss NaN; ppo_policy_loss refuses it)
    if not (clip_low >= 0 and clip_high >= 0):
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low}, {clip_high}")
    if log_ratio_clamp is not None and not log_ratio_clamp > 0:
        raise ValueError(f"log_ratio_clamp must be > 0 or None, got {log_ratio_clamp}")
    check_reduction(reduction)
    check_policy_options(ratio_level, loss_type, dual_clip)
    check_normalizer(normalizer)
    devices = {t.device for t in (labels, old_logp, advantages, mask, ref_logp)
               if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def _policy_settings(kl_coef, entropy_coef, clip_low, clip_high, dual_clip, log_ratio_clamp,
                     ignore_index, normalizer):
    """The fused losses' scalar settings as Python floats / ints (from Python or numpy numbers
    or 0-d tensors; the normalizer may stay a 0-d tensor); ranges are checked by
    ``_check_rollout``."""
    return (finite_setting("kl_coef", kl_coef, KL_COEF_MEANING),
            finite_setting("entropy_coef", entropy_coef, ENTROPY_COEF_MEANING),
            real_setting("clip_low", clip_low), real_setting("clip_high", clip_high),
            real_setting("dual_clip", dual_clip, none_ok=True),
            real_setting("log_ratio_clamp", log_ratio_clamp, none_ok=True),
            int_setting("ignore_index", ignore_index), normalizer_setting(normalizer))


def _refuse_rollout_grads(old_logp, advantages, ref_logp) -> None:
    """The fused ops differentiate with respect to the policy only (as ppo_policy_loss): a
    rollout tensor that requires grad would silently get none, so it is refused."""
    if not torch.is_grad_enabled():
        return
    for name, tensor in (("old_logp", old_logp), ("advantages", advantages),
                         ("ref_logp", ref_logp)):
        if tensor is not None and tensor.requires_grad:
            raise ValueError(
                f"{name} requires grad, but the fused kernel differentiates with respect to the "
                f"policy's logits / lm_head only (rollout data are constants in PPO); pass "
                f"{name}.detach(), or backend='reference' if you really need that gradient"
            )


def _mask_and_weights(labels, old_logp, mask, ignore_index, reduction, normalizer):
    """-> (the 0/1 fp32 mask, the flat weights of the loss). With a tensor normalizer the
    weights are those of a normalizer of 1 and the sweeps divide by it after the sum (as the
    reference's reduce_loss): weights m / normalizer would be +-inf / NaN for a normalizer of 0
    (an all-reduced count of 0), and their weighted sum NaN where the reference gives +-inf."""
    m = as_mask(mask, old_logp) * (labels != ignore_index).to(torch.float32)
    if isinstance(normalizer, torch.Tensor):
        normalizer = 1.0
    return m, reduction_weights(m, reduction, normalizer).reshape(-1)


def _normalizer_tensor(normalizer):
    """The sweeps' ``normalizer``: a tensor normalizer, detached (no gradient into a count), on
    the device of the loss or the CPU (a host scalar); None for a number (it is in the
    weights)."""
    return normalizer.detach() if isinstance(normalizer, torch.Tensor) else None


def _advantages_2d(advantages, labels):
    """(..., T) per-token advantages -> (B, T); (...) per-sequence ones -> (B, 1), a view where
    the leading dims merge (the sweeps broadcast the column over T, never copying it to (B, T))."""
    n_seq = math.prod(labels.shape[:-1])
    if advantages.shape == labels.shape:
        return advantages.reshape(n_seq, labels.shape[-1])
    return advantages.reshape(n_seq, 1)


def _stats(logp, entropy, labels, old_logp, advantages, m, ref_logp, kl_coef, kl_estimator,
           entropy_coef, clip_low, clip_high, dual_clip, log_ratio_clamp, reduction, ratio_level,
           loss_type, normalizer, taus=None):
    """The stats of ``reference._ppo_total`` (same ops in the same order: the same bits) without
    its work that the stats do not need: the total loss and its entropy term, the option checks
    (done by the caller), a zero scalar and a mask compare per masked op, and the token count
    once per masked mean (it is the same count each time). m: the 0/1 fp32 mask."""
    lead = labels.shape
    with torch.no_grad():
        logp = logp.detach().view(lead)
        dtype = logp.dtype
        valid = m > 0
        if m.dtype != dtype:
            m = m.to(dtype)
        A = advantages if advantages.shape == lead else advantages.unsqueeze(-1).expand(lead)
        zero = torch.zeros((), dtype=dtype, device=logp.device)

        def zero_masked(t):  # reference._zero_masked(t.to(dtype), valid)
            return torch.where(valid, t if t.dtype == dtype else t.to(dtype), zero)

        logp, entropy, old_logp, A = (zero_masked(t) for t in
                                      (logp, entropy.detach().view(lead), old_logp, A))
        per_token, ratio, d, clipped, _ = reference._policy_terms(
            logp, old_logp, A, m, clip_low, clip_high, dual_clip, log_ratio_clamp, ratio_level,
            loss_type, taus)
        count = m.sum().clamp_min(1)  # masked_mean's denominator (and token-mean's)
        if reduction == "token-mean" and normalizer is None:
            pg_loss = torch.where(valid, per_token, zero).sum() / count  # reduce_loss's steps
        else:
            pg_loss = reference.reduce_loss(per_token, m, reduction, normalizer)
        stats = {"pg_loss": pg_loss}
        if ref_logp is not None and kl_coef:
            kl = reference.kl_penalty(logp, zero_masked(ref_logp), kl_estimator)
            stats["kl"] = reference.reduce_loss(kl, m, reduction, normalizer)
        # reference.masked_mean(x, m) = where(m > 0, x, 0).sum() / m.sum().clamp_min(1)
        for name, x in (("entropy", entropy), ("clipfrac", clipped.to(dtype)),
                        ("approx_kl", 0.5 * d * d), ("ratio_mean", ratio)):
            stats[name] = torch.where(valid, x, zero).sum() / count
    return stats


_STAT_ORDER = ("pg_loss", "kl", "entropy", "clipfrac", "approx_kl", "ratio_mean")


def _token_stats_impl(logp: torch.Tensor, entropy: torch.Tensor, old_logp: torch.Tensor,
                      advantages: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor,
                      ref_logp: torch.Tensor | None, kl_coef: float, kl_estimator: str,
                      clip_low: float, clip_high: float, dual_clip: float | None,
                      log_ratio_clamp: float | None, loss_type: str, tau_pos: float,
                      tau_neg: float) -> torch.Tensor:
    """``_ppo_terms.token_stats`` (its docstring): (B, T) inputs, advantages (B, T) or (B, 1)."""
    return _ppo_terms_module().token_stats(
        logp, entropy, old_logp, advantages, weights, mask, ref_logp, kl_coef, kl_estimator,
        clip_low, clip_high, dual_clip, log_ratio_clamp, loss_type, (tau_pos, tau_neg))


_token_stats_op = torch.library.custom_op("rlhf_kernels::ppo_token_stats",
                                          mutates_args=())(_token_stats_impl)


@_token_stats_op.register_fake
def _(logp, entropy, old_logp, advantages, weights, mask, ref_logp, kl_coef, kl_estimator,
      clip_low, clip_high, dual_clip, log_ratio_clamp, loss_type, tau_pos, tau_neg):
    return logp.new_empty((len(_STAT_ORDER),), dtype=torch.float32)


def _fused_or_torch_stats(logp, entropy, labels, old_logp, advantages, m, weights, ref_logp,
                          kl_coef, kl_estimator, entropy_coef, clip_low, clip_high, dual_clip,
                          log_ratio_clamp, reduction, ratio_level, loss_type, normalizer, taus):
    """The stats of the fused ops: at token level on the Triton path (fp32 logp, contiguous
    inputs: ``_ppo_terms.can_fuse``) one kernel over the tokens and the weights (a custom op,
    called directly in plain eager mode: the same launch, the same bits); otherwise ``_stats``'s
    torch ops, the bits of the reference."""
    lead = labels.shape
    rows = math.prod(lead[:-1])
    seqs = (rows, lead[-1])
    as_seqs = lambda t: None if t is None else t.reshape(seqs)  # noqa: E731
    use_kl = ref_logp is not None and bool(kl_coef)
    inputs = (as_seqs(logp), as_seqs(entropy), as_seqs(old_logp),
              _advantages_2d(advantages, labels), as_seqs(weights),
              as_seqs(ref_logp) if use_kl else None)
    m2 = as_seqs(m)
    if not (_ppo_terms_module().can_fuse(*inputs, ratio_level)
            and m2.dtype == torch.float32 and m2.is_contiguous()):
        return _stats(logp, entropy, labels, old_logp, advantages, m, ref_logp, kl_coef,
                      kl_estimator, entropy_coef, clip_low, clip_high, dual_clip,
                      log_ratio_clamp, reduction, ratio_level, loss_type, normalizer, taus)
    tau_pos, tau_neg = taus or (1.0, 1.0)
    stat_weights = inputs[4]
    # With a tensor normalizer the weights are those of a normalizer of 1
    # (``_mask_and_weights``): the kernel sums with them and the division by the normalizer
    # follows, as the reference's reduce_loss divides (+-inf for a count of 0, NaN for 0 / 0).
    divide = isinstance(normalizer, torch.Tensor)
    args = (*inputs[:4], stat_weights, m2, inputs[5], kl_coef, kl_estimator, clip_low,
            clip_high, dual_clip, log_ratio_clamp, loss_type, tau_pos, tau_neg)
    if launch_directly(*inputs, m2):
        values = _token_stats_impl(*args)
    else:
        values = _token_stats_op(*args)
    if divide:
        values = torch.cat((values[:2] / _fp32(normalizer.detach()), values[2:]))
    stats = dict(zip(_STAT_ORDER, values.unbind(0)))
    if not use_kl:
        del stats["kl"]
    return stats


class _ValueOf(torch.autograd.Function):
    """``value`` as the output, ``loss``'s gradient: the backward passes the incoming gradient
    to ``loss`` unchanged."""

    @staticmethod
    def forward(ctx, loss, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ValueOfUnderTransforms(_ValueOf):
    """``_ValueOf`` (its backward) for torch.func transforms (vmap runs the ops' custom-op path,
    then this), which refuse a Function without ``setup_context``; not the eager default, whose
    ``Function.apply`` then binds arguments by signature (about 50 us more per call)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(loss, value):
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass


def _value_of(loss, value):
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        return _ValueOfUnderTransforms.apply(loss, value)
    return _ValueOf.apply(loss, value)


def _loss_of_a_zero_normalizer(loss, stats, entropy, weights, entropy_coef, kl_coef,
                               normalizer):
    """The fused loss with a tensor normalizer, whose value is the reference's where that
    normalizer is 0.

    The reference divides each term's reduced sum by the normalizer and then combines them
    (``reference._ppo_total``: pg + kl_coef kl - entropy_coef H): over a normalizer of 0 each
    term is +-inf (NaN for a sum of 0) and the total follows IEEE (inf - inf is NaN). The sweeps
    divide the one weighted sum of the combined per-token terms, whose kind can differ (+inf
    where the reference has NaN). The terms' quotients are at hand: the stats' pg_loss and kl
    (each divided by the normalizer as the reference divides) and the entropy's weighted sum,
    one more reduction over the tokens. Elsewhere (a normalizer that is not 0) the value is the
    sweep's, to its bits; the gradient is the sweep's always (no host sync either way)."""
    n = normalizer.detach()
    zero = None
    if n.device != loss.device:
        if torch.compiler.is_compiling():
            n = n.to(loss.device)
        elif float(n) != 0:  # a 0-d CPU tensor for a loss on a GPU: host memory, no sync
            return loss
        else:
            zero = True
    value = stats["pg_loss"].to(loss.dtype)
    if "kl" in stats:
        value = value + kl_coef * stats["kl"].to(loss.dtype)
    if entropy_coef:
        value = value - entropy_coef * ((weights * entropy).sum().to(loss.dtype)
                                        / n.to(loss.dtype))
    if zero is None:
        value = torch.where(n == 0, value, loss.detach())
    return _value_of(loss, value)


def _as_3d(logits):
    """(..., T, V) -> (B, T, V), B the product of the leading dims (a view where possible)."""
    return logits.reshape(math.prod(logits.shape[:-2]), *logits.shape[-2:])


def _flat(t):
    return None if t is None else t.reshape(-1)


def ppo_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    log_ratio_clamp: float | None = 20.0,
    reduction: str = "token-mean",
    ignore_index: int = -100,
    *,
    ratio_level: str = "token",
    loss_type: str = "ppo",
    normalizer: float | torch.Tensor | None = None,
    check_labels: bool = False,
    sapo_tau_pos: float | None = None,
    sapo_tau_neg: float | None = None,
    backend: str | None = None,
):
    """The PPO loss from the policy's logits, d logits computed in the forward sweep.

    logits (..., T, V) fp16/bf16/fp32/fp64, labels (..., T) int64, old_logp / mask / ref_logp
    (..., T), advantages (..., T) per token or (...) per sequence (broadcast over T, not copied)
    -> (loss (), stats dict of detached scalars), fp32 (fp64 for fp64 logits, on both backends;
    the Triton path's math is fp32). Same math, options and stats as
    ``reference.ppo_loss_from_logits``: ratio_level "token" | "sequence" (GSPO's geometric-mean
    ratio per sequence), loss_type "ppo" | "cispo" | "sapo" (with sapo_tau_pos / sapo_tau_neg,
    as ``ppo_policy_loss``), the reductions of ``reference.reduce_loss``
    ("token-sum" included) and ``normalizer`` (None, a number > 0 or a 0-d tensor, which may
    live on the device: no host sync, no gradient), which replaces the reduction's outer
    denominator for every term. Tokens whose label is ignore_index are masked out, and a
    masked token contributes exactly 0 to the loss and the gradient whatever its logits hold
    (NaN / inf included). The gradient w.r.t. logits (allocated like logits) is made in the
    forward call. Differentiable w.r.t. logits only on the Triton path: old_logp / advantages /
    ref_logp that require grad are refused there (use backend="reference" for those gradients).
    The KL term needs ref_logp: a kl_coef != 0 without it is an error.

    check_labels: False (default): no host sync; a counted token whose label is outside [0, V)
    gives a NaN loss (never an out-of-bounds read). True: raise a ValueError naming the label,
    at the cost of one host sync.
    """
    check_float("logits", logits)
    if logits.dim() < 2 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., T, V) with V >= 1, got "
                         f"{tuple(logits.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an int64 (or int32) tensor, got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but logits has leading shape "
                         f"{tuple(logits.shape[:-1])}; they must match")
    (kl_coef, entropy_coef, clip_low, clip_high, dual_clip, log_ratio_clamp, ignore_index,
     normalizer) = _policy_settings(kl_coef, entropy_coef, clip_low, clip_high, dual_clip,
                                    log_ratio_clamp, ignore_index, normalizer)
    _check_rollout(labels, old_logp, advantages, mask, ref_logp, kl_estimator, clip_low,
                   clip_high, dual_clip, log_ratio_clamp, reduction, ratio_level, loss_type,
                   normalizer)
    check_kl_reference(kl_coef, ref_logp)
    taus = sapo_taus(loss_type, sapo_tau_pos, sapo_tau_neg)
    tau_pos, tau_neg = taus or (1.0, 1.0)
    if logits.device != labels.device:
        raise ValueError(f"logits on {logits.device} but labels on {labels.device}")
    temperature = head.check_temperature(temperature)
    if resolve_backend(logits, backend, "ppo_loss_from_logits") == "reference":
        if check_labels:
            head.check_label_range(labels, logits.shape[-1], ignore_index)
        return reference.ppo_loss_from_logits(
            logits, labels, old_logp, advantages, mask, ref_logp, kl_coef, kl_estimator,
            entropy_coef, temperature, clip_low, clip_high, dual_clip, log_ratio_clamp,
            reduction, ignore_index, ratio_level, loss_type, normalizer,
            sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg)
    use_kl = ref_logp is not None and bool(kl_coef)
    _refuse_rollout_grads(old_logp, advantages, ref_logp if use_kl else None)
    m, weights = _mask_and_weights(labels, old_logp, mask, ignore_index, reduction, normalizer)
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    rest = (
        labels.reshape(-1).long(), _flat(old_logp),
        _advantages_2d(advantages, labels), weights, _flat(ref_logp) if use_kl else None,
        kl_coef, kl_estimator, entropy_coef, temperature, clip_low, clip_high, dual_clip,
        log_ratio_clamp, ignore_index, need_grad, bool(check_labels), ratio_level, loss_type,
        tau_pos, tau_neg, _normalizer_tensor(normalizer))
    if not launch_directly(logits, labels, old_logp, advantages, mask, ref_logp):
        loss, logp, entropy, _ = _logits_ppo_op(_as_3d(logits), *rest)
    elif need_grad:
        loss, logp, entropy, _ = _apply_logits_ppo(logits, *rest)
    else:
        loss, logp, entropy, _ = _logits_sweep(_as_3d(logits), *rest)
    stats = _fused_or_torch_stats(logp, entropy, labels, old_logp, advantages, m, weights,
                                  ref_logp, kl_coef, kl_estimator, entropy_coef, clip_low,
                                  clip_high, dual_clip, log_ratio_clamp, reduction, ratio_level,
                                  loss_type, normalizer, taus)
    if isinstance(normalizer, torch.Tensor):
        loss = _loss_of_a_zero_normalizer(loss, stats, entropy, weights, entropy_coef, kl_coef,
                                          normalizer)
    return loss, stats


def linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    log_ratio_clamp: float | None = 20.0,
    reduction: str = "token-mean",
    ignore_index: int = -100,
    chunk_size: int | None = None,
    memory_budget_bytes: int | None = None,
    *,
    ratio_level: str = "token",
    loss_type: str = "ppo",
    normalizer: float | torch.Tensor | None = None,
    check_labels: bool = False,
    sapo_tau_pos: float | None = None,
    sapo_tau_neg: float | None = None,
    backend: str | None = None,
):
    """The PPO loss straight from the policy's hidden states, never holding the (N, V) logits.

    hidden (..., T, H), weight (V, H), bias (V,), lora_a (r, H), lora_b (V, r), labels (..., T)
    int64, old_logp / mask / ref_logp (..., T), advantages (..., T) or (...) -> (loss (), stats
    dict), fp32 (fp64 when hidden or weight is fp64, on both backends). Same math, options
    (ratio_level, loss_type, normalizer, sapo_tau_pos / sapo_tau_neg: as
    ``ppo_loss_from_logits``) and stats as
    ``reference.linear_ppo_loss``; the chunking options are those of ``linear_logprobs``. All
    gradients (hidden, weight, bias, lora_a, lora_b: those that require grad) are made during
    the forward call, chunk by chunk; backward only scales them. With ratio_level="sequence"
    and more than one chunk, the gradients take a second sweep that recomputes each chunk's
    logits (one more matmul per chunk; module docstring). A masked or ignored token adds
    exactly 0 to the loss and every gradient, even with a NaN / inf hidden state. Under autocast
    the matmuls run in the autocast dtype, eagerly and compiled alike. On the Triton
    path old_logp / advantages / ref_logp that require grad are refused (they would get no
    gradient); backend="reference" differentiates them. check_labels: as in
    ``ppo_loss_from_logits``.
    """
    head.check_head_inputs(hidden, weight, labels, bias, lora_a, lora_b)
    (hidden, weight, bias, lora_a, lora_b), autocast_on = head.autocast_head(hidden, weight, bias,
                                                                             lora_a, lora_b)
    if autocast_on:  # the matmuls in the autocast dtype, eagerly and compiled alike
        with torch.autocast(hidden.device.type, enabled=False):
            return linear_ppo_loss(
                hidden, weight, labels, old_logp, advantages, mask, bias, lora_a, lora_b,
                lora_scale, ref_logp, kl_coef, kl_estimator, entropy_coef, temperature,
                clip_low, clip_high, dual_clip, log_ratio_clamp, reduction, ignore_index,
                chunk_size, memory_budget_bytes, ratio_level=ratio_level, loss_type=loss_type,
                normalizer=normalizer, check_labels=check_labels, sapo_tau_pos=sapo_tau_pos,
                sapo_tau_neg=sapo_tau_neg, backend=backend)
    lora_scale, temperature, ignore_index, chunk_size, memory_budget_bytes = head.head_settings(
        lora_scale, temperature, ignore_index, chunk_size, memory_budget_bytes)
    (kl_coef, entropy_coef, clip_low, clip_high, dual_clip, log_ratio_clamp, ignore_index,
     normalizer) = _policy_settings(kl_coef, entropy_coef, clip_low, clip_high, dual_clip,
                                    log_ratio_clamp, ignore_index, normalizer)
    _check_rollout(labels, old_logp, advantages, mask, ref_logp, kl_estimator, clip_low,
                   clip_high, dual_clip, log_ratio_clamp, reduction, ratio_level, loss_type,
                   normalizer)
    check_kl_reference(kl_coef, ref_logp)
    taus = sapo_taus(loss_type, sapo_tau_pos, sapo_tau_neg)
    tau_pos, tau_neg = taus or (1.0, 1.0)
    if old_logp.device != hidden.device:
        raise ValueError(f"hidden on {hidden.device} but old_logp on {old_logp.device}")
    if resolve_backend(hidden, backend, "linear_ppo_loss") == "reference":
        if check_labels:
            head.check_label_range(labels, weight.shape[0], ignore_index)
        return reference.linear_ppo_loss(
            hidden, weight, labels, old_logp, advantages, mask, bias, lora_a, lora_b, lora_scale,
            ref_logp, kl_coef, kl_estimator, entropy_coef, temperature, clip_low, clip_high,
            dual_clip, log_ratio_clamp, reduction, ignore_index, ratio_level=ratio_level,
            loss_type=loss_type, normalizer=normalizer, sapo_tau_pos=sapo_tau_pos,
            sapo_tau_neg=sapo_tau_neg)
    use_kl = ref_logp is not None and bool(kl_coef)
    _refuse_rollout_grads(old_logp, advantages, ref_logp if use_kl else None)
    m, weights = _mask_and_weights(labels, old_logp, mask, ignore_index, reduction, normalizer)
    grad_on = torch.is_grad_enabled()
    wants = lambda t: grad_on and t is not None and t.requires_grad
    needs = (wants(hidden), wants(weight), wants(bias), wants(lora_a), wants(lora_b))
    args = (
        hidden, weight, labels.reshape(-1).long(), bias, lora_a, lora_b, _flat(old_logp),
        _advantages_2d(advantages, labels), weights, _flat(ref_logp) if use_kl else None,
        lora_scale, kl_coef, kl_estimator, entropy_coef, temperature, clip_low, clip_high,
        dual_clip, log_ratio_clamp, ignore_index, chunk_size or 0, memory_budget_bytes or 0,
        *needs, bool(check_labels), int(labels.shape[-1]), ratio_level, loss_type, tau_pos,
        tau_neg, _normalizer_tensor(normalizer))
    if not launch_directly(hidden, weight, labels, bias, lora_a, lora_b, old_logp, advantages,
                           mask, ref_logp):
        loss, logp, entropy, *_ = _linear_ppo_op(hidden.reshape(-1, hidden.shape[-1]), *args[1:])
    elif any(needs):
        loss, logp, entropy, _ = _apply_linear_ppo(*args)  # it flattens hidden itself
    else:
        loss, logp, entropy, *_ = _linear_sweep(hidden.reshape(-1, hidden.shape[-1]),
                                                *args[1:22], needs, *args[27:],
                                                placeholder=False)
    stats = _fused_or_torch_stats(logp, entropy, labels, old_logp, advantages, m, weights,
                                  ref_logp, kl_coef, kl_estimator, entropy_coef, clip_low,
                                  clip_high, dual_clip, log_ratio_clamp, reduction, ratio_level,
                                  loss_type, normalizer, taus)
    if isinstance(normalizer, torch.Tensor):
        loss = _loss_of_a_zero_normalizer(loss, stats, entropy, weights, entropy_coef, kl_coef,
                                          normalizer)
    return loss, stats
