"""The spec: every rlhf_kernels op in plain PyTorch.

No Triton import; everything runs on the CPU and in float64. Tests and benchmarks compare the
kernels with these functions, so they are written for clarity, not speed. Conventions
(docs/design.md §1):

* per-token outputs are float32 (float64 when the inputs are float64);
* masks are bool/int/float, 1 = this token counts; masked positions output 0 and get 0 gradient;
* masked positions never contaminate anything: padding may hold NaN or inf, so values there are
  replaced by 0 with ``torch.where`` *before* any arithmetic (``_zero_masked``). Multiplying by
  the mask would not do (0 * NaN is NaN), nor would selecting only the result, because autograd
  multiplies the zero gradient of the unselected branch by that branch's NaN local derivative;
* "sequences" are all leading dims, the last dim is time (``T``) for the sequence reductions;
* an empty mask (no valid token) gives a loss of 0, never NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rlhf_kernels._checks import (
    REDUCTIONS,
    as_mask,
    check_advantages_shape,
    check_normalizer,
    check_policy_options,
    check_reduction,
    int_setting,
    sapo_taus,
)

__all__ = [
    "logprobs",
    "linear_logprobs",
    "kl_penalty",
    "shape_rewards",
    "gae",
    "masked_whiten",
    "masked_mean",
    "reduce_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "bradley_terry_loss",
    "ppo_loss_from_logits",
    "linear_ppo_loss",
    "group_advantages",
    "logprob_stats",
    "linear_logprobs_stats",
    "KL_ESTIMATORS",
    "LOGPROB_STATS",
    "REDUCTIONS",
]

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _zero_masked(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x where ``valid`` (bool, broadcastable to x), 0 elsewhere, whatever x holds there.

    Applied to inputs before any arithmetic, so that NaN / inf padding reaches neither the
    forward nor autograd's backward (the gradient at a masked position is exactly 0).
    """
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))


# --------------------------------------------------------------------------------------------
# log-probabilities of chosen tokens
# --------------------------------------------------------------------------------------------
def _int64_labels(labels: torch.Tensor) -> torch.Tensor:
    """int32 labels as int64: compared with an int32 tensor, an ignore_index outside the int32
    range wraps (2**32 - 100 matched the label -100), where the kernels compare in int64."""
    return labels if labels.dtype == torch.int64 else labels.long()


def logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """logits (..., V), labels (...) int64 -> logp (...) [, entropy (...)] in fp32 (fp64 in).

    logp = log_softmax(logits / temperature)[label]; entropy = -sum p log p of the same tempered
    distribution. Positions with label == ignore_index give 0 for both (and zero gradient).
    A label outside [0, V) that is not ignore_index gives NaN logp (no read out of bounds, no
    host sync).
    """
    dtype = _compute_dtype(logits)
    labels = _int64_labels(labels)
    valid = labels != ignore_index
    # An ignored row's logits may be anything (padding): they never enter the math.
    z = _zero_masked(logits.to(dtype), valid.unsqueeze(-1)) / temperature
    log_p = torch.log_softmax(z, dim=-1)
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    safe_labels = torch.where(valid & in_range, labels, torch.zeros_like(labels))
    logp = log_p.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(in_range, logp, torch.full_like(logp, float("nan")))
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    p = log_p.exp()
    # 0 * log 0 is 0 (banned vocabulary entries at -inf). log p is replaced by 0 there before
    # the product: p * (-inf) would be NaN, and so would its gradient even behind a where.
    entropy = -(p * _zero_masked(log_p, p > 0)).sum(-1)
    # A row whose logits are all -inf has no distribution: log_softmax gives NaN, and 0 log 0 = 0
    # makes its entropy 0 (as the kernels write); ignored rows give 0 as well.
    counted = valid & ~torch.isneginf(z).all(-1)
    entropy = torch.where(counted, entropy, torch.zeros_like(entropy))
    return logp, entropy


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """hidden (..., H), weight (V, H), lora_a (r, H), lora_b (V, r), bias (V,) -> as ``logprobs``
    of ``hidden @ (weight + lora_scale * lora_b @ lora_a).T + bias``."""
    dtype = _compute_dtype(hidden, weight)
    labels = _int64_labels(labels)
    # An ignored row's hidden state may be anything (padding): it must not reach the weight's
    # gradient (that sums over rows, so one NaN row would poison all of it).
    h = _zero_masked(hidden.to(dtype), (labels != ignore_index).unsqueeze(-1))
    logits = h @ weight.to(dtype).t()
    if lora_a is not None or lora_b is not None:
        if lora_a is None or lora_b is None:
            raise ValueError("lora_a and lora_b must be given together")
        logits = logits + lora_scale * ((h @ lora_a.to(dtype).t()) @ lora_b.to(dtype).t())
    if bias is not None:
        logits = logits + bias.to(dtype)
    return logprobs(logits, labels, temperature, ignore_index, return_entropy)


# --------------------------------------------------------------------------------------------
# per-token statistics of the logits (linear_logprobs' ``stats``; TRL's fused-head outputs)
# --------------------------------------------------------------------------------------------
LOGPROB_STATS = ("log_sum_sq_probs", "mean_logits", "is_top1")


def logprob_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
):
    """logits (..., V), labels (...) int64 -> (log_sum_sq_probs, mean_logits, is_top1), each
    (...), of the tempered logits ``z = logits / temperature`` and ``p = softmax(z)``:

    * log_sum_sq_probs = log sum_j p_j^2 (the log-probability that two samples agree; DPO's WPO
      weight in TRL);
    * mean_logits = (1/V) sum_j z_j (the tempered logits' mean over the vocabulary, as TRL's);
    * is_top1 = the label is the first index where z is largest (a tie with an earlier entry
      is not top-1, as torch.argmax).

    fp32 (fp64 for fp64 logits), fp32 (fp64) and bool. Rows whose label is ignore_index give
    0, 0 and False. Not differentiable: computed from the logits detached.
    """
    dtype = _compute_dtype(logits)
    labels = _int64_labels(labels)
    valid = labels != ignore_index
    z = _zero_masked(logits.detach().to(dtype), valid.unsqueeze(-1)) / temperature
    log_p = torch.log_softmax(z, dim=-1)
    log_sum_sq = torch.logsumexp(2 * log_p, dim=-1)
    mean = z.mean(-1)
    vocab = z.shape[-1]
    index = torch.arange(vocab, device=z.device)
    first_max = torch.where(z == z.amax(-1, keepdim=True), index, vocab).amin(-1)
    is_top1 = (first_max == labels) & valid
    zero = torch.zeros((), dtype=dtype, device=z.device)
    return torch.where(valid, log_sum_sq, zero), torch.where(valid, mean, zero), is_top1


def linear_logprobs_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    stats: tuple[str, ...] = LOGPROB_STATS,
):
    """``linear_logprobs`` with its ``stats``: -> (logp, entropy or None, log_sum_sq_probs,
    mean_logits, is_top1), each (...); a statistic not named in ``stats`` is None. The
    statistics are ``logprob_stats`` of the same logits
    ``hidden @ (weight + lora_scale * lora_b @ lora_a).T + bias``."""
    unknown = [name for name in stats if name not in LOGPROB_STATS]
    if unknown:
        raise ValueError(f"stats: {unknown} unknown; expected names among {LOGPROB_STATS}")
    dtype = _compute_dtype(hidden, weight)
    labels = _int64_labels(labels)
    h = _zero_masked(hidden.to(dtype), (labels != ignore_index).unsqueeze(-1))
    logits = h @ weight.to(dtype).t()
    if lora_a is not None:
        logits = logits + lora_scale * ((h @ lora_a.to(dtype).t()) @ lora_b.to(dtype).t())
    if bias is not None:
        logits = logits + bias.to(dtype)
    out = logprobs(logits, labels, temperature, ignore_index, return_entropy)
    logp, entropy = out if return_entropy else (out, None)
    values = dict(zip(LOGPROB_STATS, logprob_stats(logits, labels, temperature, ignore_index)))
    return (logp, entropy, *(values[name] if name in stats else None for name in LOGPROB_STATS))


# --------------------------------------------------------------------------------------------
# KL estimators and reward shaping
# --------------------------------------------------------------------------------------------
def kl_penalty(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: str = "k1",
    clamp: float | None = None,
    log_ratio_clamp: float | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token, d = logp - ref_logp.

    k1 = d; k2 = d^2 / 2; k3 = exp(-d) + d - 1; abs = |d|. ``log_ratio_clamp`` clamps d before
    the estimator (veRL clamps d to +-20 inside k3); ``clamp`` clamps the result (OpenRLHF and
    veRL use +-10). Clamped elements get zero gradient, as with ``torch.clamp``.

    k3 is evaluated as expm1(-d) + d in float64 whatever the inputs' dtype, then rounded to it:
    the literal exp(-d) + d - 1 cancels where |d| << 1 (in fp32 at |d| ~ 1e-3 few of its digits
    are right, in float64 it is off by about 1e-16 / d^2), float64 expm1 keeps about 2e-16 / |d|
    relative (2e-12 at |d| = 1e-4) for the value and for autograd's gradient.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"estimator={estimator!r} is not supported; expected one of {KL_ESTIMATORS}"
        )
    dtype = _compute_dtype(logp, ref_logp)
    d = logp.to(dtype) - ref_logp.to(dtype)
    if log_ratio_clamp is not None:
        d = d.clamp(-log_ratio_clamp, log_ratio_clamp)
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * d * d
    elif estimator == "k3":
        d64 = d.double()
        kl = (torch.expm1(-d64) + d64).to(dtype)
    else:
        kl = d.abs()
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return kl


def _last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """(…, T) 0/1 mask -> (…) index of the last valid position (-1 when the row has none)."""
    T = mask.shape[-1]
    positions = torch.arange(T, device=mask.device).expand(mask.shape)
    return torch.where(mask > 0, positions, torch.full_like(positions, -1)).amax(-1)


def shape_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
    score_index: torch.Tensor | None = None,
    score_clip: float | None = None,
    kl_clamp: float | None = None,
) -> torch.Tensor:
    """scores (B,), logp/ref_logp/mask (B, T) -> per-token rewards (B, T) fp32.

    rewards = -kl_coef * kl on valid tokens; the (optionally clipped) sequence score is added at
    ``score_index[b]`` (default: the last valid token of row b). A row with no valid token gets
    all-zero rewards (its score has nowhere to go). A ``score_index[b]`` outside [0, T) makes the
    whole row b NaN (the score must not be lost silently; checking on the host would cost a
    sync). Not differentiable: rewards are data in PPO.
    """
    m = as_mask(mask, logp)
    valid = m > 0
    dtype = _compute_dtype(logp, ref_logp, scores)
    kl = kl_penalty(_zero_masked(logp, valid), _zero_masked(ref_logp, valid), estimator,
                    clamp=kl_clamp)
    rewards = _zero_masked(-kl_coef * kl.to(dtype), valid)
    s = scores.to(dtype)
    if score_clip is not None:
        s = s.clamp(-score_clip, score_clip)
    T = logp.shape[-1]
    if score_index is None:
        index = _last_valid_index(m)
        has_target = index >= 0
        out_of_range = torch.zeros_like(has_target)
    else:
        index = score_index.to(torch.int64)
        out_of_range = (index < 0) | (index >= T)
        has_target = ~out_of_range
    rewards = rewards.scatter_add(
        -1, _zero_masked(index, has_target).unsqueeze(-1), _zero_masked(s, has_target).unsqueeze(-1)
    )
    rewards = torch.where(out_of_range.unsqueeze(-1), torch.full_like(rewards, float("nan")),
                          rewards)
    return rewards.detach()


# --------------------------------------------------------------------------------------------
# GAE and whitening
# --------------------------------------------------------------------------------------------
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
):
    """rewards, values, mask (..., T) -> (advantages, returns) (..., T) fp32, no gradient.

    The textbook backward loop, with masked positions skipped (veRL semantics): "next" means the
    next *valid* position; a masked position outputs advantage 0 and return 0 and carries the
    running next-value and advantage through unchanged. The value after the last valid token is 0.
    """
    dtype = _compute_dtype(rewards, values)
    valid_mask = as_mask(mask, rewards) > 0
    r = _zero_masked(rewards.to(dtype), valid_mask)
    v = _zero_masked(values.to(dtype), valid_mask)
    T = r.shape[-1]
    next_value = torch.zeros(r.shape[:-1], dtype=dtype, device=r.device)
    next_adv = torch.zeros_like(next_value)
    advantages = torch.zeros_like(r)
    for t in reversed(range(T)):
        valid = valid_mask[..., t]
        delta = r[..., t] + gamma * next_value - v[..., t]
        adv = delta + gamma * lam * next_adv
        advantages[..., t] = torch.where(valid, adv, torch.zeros_like(adv))
        next_value = torch.where(valid, v[..., t], next_value)
        next_adv = torch.where(valid, adv, next_adv)
    returns = _zero_masked(advantages + v, valid_mask)
    return advantages.detach(), returns.detach()


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Normalise x over its valid tokens (one mean/variance over the whole tensor, as TRL/veRL).

    whitened = (x - mean) / sqrt(var + eps), plus mean back when ``shift_mean`` is False.
    var is unbiased (n - 1) when ``unbiased`` and n > 1. Masked positions output 0; no valid token
    at all gives all zeros.
    """
    dtype = _compute_dtype(x)
    valid = as_mask(mask, x) > 0
    xv = _zero_masked(x.to(dtype), valid)
    n = valid.sum().to(dtype)
    mean = xv.sum() / n.clamp_min(1)
    centered = _zero_masked(xv - mean, valid)
    denom = (n - 1).clamp_min(1) if unbiased else n.clamp_min(1)
    var = (centered * centered).sum() / denom
    out = (xv - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _zero_masked(out, valid)


# --------------------------------------------------------------------------------------------
# Loss reductions
# --------------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over valid tokens (mask: 0/1); 0 when there is none."""
    return _zero_masked(x, mask > 0).sum() / mask.sum().clamp_min(1)


def reduce_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    reduction: str,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Aggregate a (..., T) per-token loss (veRL's loss_agg_mode names, plus token-sum).

    token-mean:              sum(l * m) / sum(m)
    seq-mean-token-mean:     mean over rows with a valid token of sum_t(l * m) / sum_t(m)
    seq-mean-token-sum:      mean over rows with a valid token of sum_t(l * m)
    seq-mean-token-sum-norm: sum(l * m) / T  (Dr. GRPO: a constant normaliser, T = last dim)
    token-sum:               sum(l * m)

    ``normalizer`` (a number > 0 or a 0-d tensor, no gradient through it) replaces the outer
    denominator: sum(m) for token-mean, the number of rows with a token for the seq-mean
    reductions, T for seq-mean-token-sum-norm, and 1 for token-sum. That is how a loss is
    normalised by a count over more than this batch: DAPO's token count over every micro-batch
    and rank of the step, Dr. GRPO's constant (rows x max length).
    """
    check_reduction(reduction)
    check_normalizer(normalizer)
    lm = _zero_masked(per_token, mask > 0)
    if reduction in ("token-mean", "seq-mean-token-sum-norm", "token-sum"):
        total = lm.sum()
        if normalizer is not None:
            return total / _as_normalizer(normalizer, total)
        if reduction == "token-mean":
            return total / mask.sum().clamp_min(1)
        if reduction == "seq-mean-token-sum-norm":
            return total / max(per_token.shape[-1], 1)
        return total
    tokens_per_row = mask.sum(-1)
    row_has_tokens = (tokens_per_row > 0).to(per_token.dtype)
    if reduction == "seq-mean-token-mean":
        row_loss = lm.sum(-1) / tokens_per_row.clamp_min(1)
    else:
        row_loss = lm.sum(-1)
    total = (row_loss * row_has_tokens).sum()
    if normalizer is not None:
        return total / _as_normalizer(normalizer, total)
    return total / row_has_tokens.sum().clamp_min(1)


class _GradientOverNormalizer(torch.autograd.Function):
    """x as it is. In the backward, where ``bad`` (the normalizer n is 0 or NaN) its gradient g
    becomes g / n with an exactly-0 g kept 0 (a token that does not count, a clipped one, one
    whose loss does not move); elsewhere g itself (an identity at every order, so a second
    derivative is that of the plain formula)."""

    generate_vmap_rule = True  # torch.func transforms need it (and setup_context)

    @staticmethod
    def forward(x, n, bad):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1], inputs[2])

    @staticmethod
    def backward(ctx, grad):
        n, bad = ctx.saved_tensors
        over_n = torch.where(grad == 0, torch.zeros_like(grad), grad / n.to(grad.dtype))
        return torch.where(bad, over_n, grad), None, None


class _ValueWithGradientOf(torch.autograd.Function):
    """``value``'s value, ``source``'s gradient (the incoming gradient goes to ``source``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(source, value):
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _tensor_normalizer(normalizer, inputs):
    """-> (n, bad, inputs): a tensor ``normalizer=`` n (else None), whether it is 0 or NaN (a
    0-d bool tensor, never read on the host), and the inputs routed for its gradient rule.

    The loss's value divides each term's reduced sum by n (``reduce_loss``) and adds the terms:
    IEEE arithmetic, so n = 0 gives each term +-inf (NaN for a sum of 0) and their sum NaN where
    two have opposite signs. Its gradient for n = 0 or NaN is the gradient with n = 1 divided by
    n, an exactly-0 gradient kept 0 (``_GradientOverNormalizer`` on every input that requires
    grad, and ``_normalized_loss``): +-inf / NaN where the derivative is not 0, 0 where it is,
    as the kernels give. Autograd through the division would instead send inf into every
    branch of each term's formula, where inf * 0 and inf - inf make NaN of derivatives that are
    0 or finite (k3's e^-d and 1, a zero advantage, a saturated SAPO gate): an artifact of how
    the formula is written, which no kernel could follow. Any other n: the plain formula.
    """
    if not isinstance(normalizer, torch.Tensor):
        return None, None, inputs
    n = normalizer.detach().clone()  # saved for the backward: not an inference tensor
    bad = (n == 0) | torch.isnan(n)
    return n, bad, tuple(_GradientOverNormalizer.apply(x, n, bad)
                         if x is not None and x.requires_grad else x for x in inputs)


def _normalized_loss(loss, n, bad, terms, m, reduction):
    """The loss of a tensor normalizer n (``_tensor_normalizer``): ``loss`` (the terms reduced
    with n and combined) as the value; differentiated as sum(coef * reduce_loss(x, m,
    reduction, n')) over ``terms`` [(coef, x)], with n' = n, or 1 where n is 0 or NaN. ``loss``
    itself when n is None."""
    if n is None:
        return loss
    graph_n = torch.where(bad, torch.ones_like(n), n)
    graph = sum(coef * reduce_loss(x, m, reduction, graph_n) for coef, x in terms)
    return _ValueWithGradientOf.apply(graph, torch.where(bad, loss, graph))


def _as_normalizer(normalizer, like: torch.Tensor) -> torch.Tensor:
    if isinstance(normalizer, torch.Tensor):
        # a copy: a count made under torch.inference_mode() (an inference tensor) cannot be
        # saved for the backward, which the division does; .to returns it as it is in the
        # loss's dtype and device
        return normalizer.detach().to(dtype=like.dtype, device=like.device, copy=True)
    # a fill, not torch.tensor(...): building a CUDA tensor from a Python number is a
    # host-to-device copy that waits for the device
    return torch.full((), float(normalizer), dtype=like.dtype, device=like.device)


def _per_token_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(..., T) per-token advantages, or (...) per-sequence ones broadcast over T (a view)."""
    check_advantages_shape(advantages, like)
    if advantages.shape == like.shape:
        return advantages
    return advantages.unsqueeze(-1).expand(like.shape)


# --------------------------------------------------------------------------------------------
# PPO losses
# --------------------------------------------------------------------------------------------
def _policy_terms(logp, old_logp, A, m, clip_low, clip_high, dual_clip, log_ratio_clamp,
                  ratio_level, loss_type, taus=None):
    """The clipped policy objective per token, shared by every policy-loss op.

    logp, old_logp, A: (..., T) with masked positions already 0; m: 0/1 mask in their dtype;
    taus: SAPO's (tau for A > 0, tau for A <= 0).
    -> (per-token loss, ratio used, per-token clamped log-ratio d, clipped (bool), dual (bool or
    None)). The gradient flows to logp only (through the ratio, and through logp itself for
    CISPO). For SAPO, which does not clip, "clipped" is the ratio outside [1 - clip_low,
    1 + clip_high] (as CISPO's: where PPO's clip range would end).
    """
    d = logp - old_logp
    d_token = d if log_ratio_clamp is None else d.clamp(-log_ratio_clamp, log_ratio_clamp)
    if ratio_level == "sequence":
        # GSPO: the geometric mean of the token ratios of the row, for every token of the row.
        n = m.sum(-1, keepdim=True).clamp_min(1)
        d_seq = d.sum(-1, keepdim=True) / n
        if log_ratio_clamp is not None:
            d_seq = d_seq.clamp(-log_ratio_clamp, log_ratio_clamp)
        ratio = torch.exp(d_seq).expand(d.shape)
    else:
        ratio = torch.exp(d_token)
    low, high = 1.0 - clip_low, 1.0 + clip_high
    dual = None
    if loss_type == "cispo":
        # CISPO: the clipped ratio is a weight without gradient on the REINFORCE term.
        clipped = (ratio < low) | (ratio > high)
        per_token = -ratio.clamp(low, high).detach() * A * logp
        return per_token, ratio, d_token, clipped, dual
    if loss_type == "sapo":
        # SAPO: a smooth gate in place of the clip, its temperature chosen by the sign of A.
        tau_pos, tau_neg = taus
        tau = torch.where(A > 0, torch.full_like(A, tau_pos), torch.full_like(A, tau_neg))
        clipped = (ratio < low) | (ratio > high)
        per_token = -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * A
        return per_token, ratio, d_token, clipped, dual
    loss1 = -A * ratio
    loss2 = -A * ratio.clamp(low, high)
    per_token = torch.maximum(loss1, loss2)
    clipped = loss2 > loss1
    if dual_clip is not None:
        loss3 = -A * dual_clip
        dual = (A < 0) & (loss3 < per_token)
        per_token = torch.where(A < 0, torch.minimum(per_token, loss3), per_token)
    return per_token, ratio, d_token, clipped, dual


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
):
    """Clipped surrogate loss. logp, old_logp, mask (..., T); advantages (..., T) per token or
    (...) per sequence -> (loss (), stats).

    ratio_level="token": d = clamp(logp - old_logp, +-log_ratio_clamp), r = exp(d) per token.
    ratio_level="sequence" (GSPO): every valid token of a row takes the row's geometric-mean
    ratio r = exp(clamp(mean over the row's valid tokens of (logp - old_logp))), the gradient
    flowing through that mean to every token of the row.
    loss_type="ppo": per-token loss = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)); with
    dual_clip = c > 1, tokens with A < 0 take min(that, -A c).
    loss_type="cispo": per-token loss = -sg(clip(r, 1 - clip_low, 1 + clip_high)) A logp
    (sg: no gradient through the weight).
    loss_type="sapo" (Soft Adaptive Policy Optimization): per-token loss =
    -sigmoid(tau (r - 1)) (4 / tau) A, tau = sapo_tau_pos where A > 0 and sapo_tau_neg where
    A <= 0 (None: 1.0 and 1.05, TRL's and veRL's defaults); no clip (clip_low / clip_high only
    set what clipfrac counts) and no dual clip. At r = 1 its gradient is PPO's, -A r.
    With ref_logp and kl_coef, kl_coef * reduce(kl_estimator(logp - ref_logp)) is added (per
    token, the same reduction).
    stats (detached, over valid tokens): clipfrac (fraction where the clip bites), approx_kl =
    mean(d^2) / 2 and ppo_kl = mean(-d) of the per-token d, ratio_mean, ratio_max (of the ratio
    used; 0 when no token), dual_clipfrac when dual_clip is set, pg_loss and kl when the KL term
    is on.
    """
    check_policy_options(ratio_level, loss_type, dual_clip)
    taus = sapo_taus(loss_type, sapo_tau_pos, sapo_tau_neg)
    dtype = _compute_dtype(logp, old_logp, advantages)
    m = as_mask(mask, logp).to(dtype)
    valid = m > 0
    n, bad, (logp, old_logp, advantages, ref_logp) = _tensor_normalizer(
        normalizer, (logp, old_logp, advantages, ref_logp))
    A = _per_token_advantages(advantages, logp)
    logp, old_logp, A = (_zero_masked(t.to(dtype), valid) for t in (logp, old_logp, A))
    per_token, ratio, d, clipped, dual = _policy_terms(
        logp, old_logp, A, m, clip_low, clip_high, dual_clip, log_ratio_clamp, ratio_level,
        loss_type, taus)
    stats = {}
    if dual is not None:
        stats["dual_clipfrac"] = masked_mean(dual.to(dtype), m).detach()
    loss = reduce_loss(per_token, m, reduction, normalizer)
    terms = [(1.0, per_token)]
    if ref_logp is not None and kl_coef:
        stats["pg_loss"] = loss.detach()
        kl = kl_penalty(logp, _zero_masked(ref_logp.to(dtype), valid), kl_estimator)
        kl_loss = reduce_loss(kl, m, reduction, normalizer)
        loss = loss + kl_coef * kl_loss
        stats["kl"] = kl_loss.detach()
        terms.append((kl_coef, kl))
    loss = _normalized_loss(loss, n, bad, terms, m, reduction)
    with torch.no_grad():
        stats["clipfrac"] = masked_mean(clipped.to(dtype), m)
        stats["approx_kl"] = masked_mean(0.5 * d * d, m)
        stats["ppo_kl"] = masked_mean(-d, m)
        stats["ratio_mean"] = masked_mean(ratio, m)
        masked_ratio = torch.where(m > 0, ratio, torch.zeros_like(ratio))
        stats["ratio_max"] = masked_ratio.amax() if m.numel() else ratio.new_zeros(())
    # the kernels' order (the docstring's), so a caller that stacks the values gets the same
    # layout on every backend
    return loss, {k: stats[k].detach() for k in _POLICY_STATS if k in stats}


_POLICY_STATS = ("clipfrac", "approx_kl", "ppo_kl", "ratio_mean", "ratio_max", "dual_clipfrac",
                 "pg_loss", "kl")


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor | None = None,
    clip: float | None = 0.2,
    reduction: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
):
    """Clipped value loss. values, old_values, returns, mask (..., T) -> (loss (), stats).

    per-token loss = 1/2 max((v - R)^2, (old + clip(v - old, -clip, clip) - R)^2); no clipping
    when ``clip`` is None; reduced as ``reduce_loss(per_token, mask, reduction, normalizer)``
    (the normalizer replaces the reduction's outer denominator, as in ``ppo_policy_loss``).
    stats: clipfrac, explained_variance = 1 - Var(R - v) / Var(R) over valid tokens (biased
    variances; 0 when Var(R) == 0), value_mean, return_mean.
    """
    dtype = _compute_dtype(values, old_values, returns)
    m = as_mask(mask, values).to(dtype)
    n, bad, (values, old_values, returns) = _tensor_normalizer(normalizer,
                                                               (values, old_values, returns))
    v, old, R = (_zero_masked(t.to(dtype), m > 0) for t in (values, old_values, returns))
    loss1 = (v - R) ** 2
    if clip is not None:
        v_clipped = old + (v - old).clamp(-clip, clip)
        loss2 = (v_clipped - R) ** 2
        per_token = 0.5 * torch.maximum(loss1, loss2)
        clipped = (loss2 > loss1).to(dtype)
    else:
        per_token = 0.5 * loss1
        clipped = torch.zeros_like(loss1)
    loss = _normalized_loss(reduce_loss(per_token, m, reduction, normalizer), n, bad,
                            [(1.0, per_token)], m, reduction)
    with torch.no_grad():
        err = R - v
        err_mean = masked_mean(err, m)
        var_err = masked_mean((err - err_mean) ** 2, m)
        ret_mean = masked_mean(R, m)
        var_ret = masked_mean((R - ret_mean) ** 2, m)
        ev = torch.where(
            var_ret > 0, 1.0 - var_err / var_ret.clamp_min(1e-30), torch.zeros_like(var_ret)
        )
        stats = {
            "clipfrac": masked_mean(clipped, m),
            "explained_variance": ev,
            "value_mean": masked_mean(v, m),
            "return_mean": ret_mean,
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
):
    """Reward-model loss over pairs. chosen/rejected (...,) -> (loss (), stats).

    loss = mean(-log sigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2);
    stats: accuracy = mean(r_c > r_r) (margin not subtracted), reward_margin = mean(r_c - r_r),
    chosen_mean, rejected_mean.
    """
    dtype = _compute_dtype(chosen_rewards, rejected_rewards)
    c = chosen_rewards.to(dtype)
    r = rejected_rewards.to(dtype)
    diff = c - r
    logits = diff
    if margin is not None:
        logits = diff - torch.as_tensor(margin, dtype=dtype, device=c.device)
    loss = -F.logsigmoid(logits).mean()
    if center_coef:
        loss = loss + center_coef * ((c + r) ** 2).mean()
    with torch.no_grad():
        stats = {
            "accuracy": (diff > 0).to(dtype).mean(),
            "reward_margin": diff.mean(),
            "chosen_mean": c.mean(),
            "rejected_mean": r.mean(),
        }
    return loss, stats


# --------------------------------------------------------------------------------------------
# The fused PPO step (one call from logits / hidden states to the loss)
# --------------------------------------------------------------------------------------------
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
    ratio_level: str = "token",
    loss_type: str = "ppo",
    normalizer: float | torch.Tensor | None = None,
    *,
    sapo_tau_pos: float | None = None,
    sapo_tau_neg: float | None = None,
):
    """logits (..., T, V) and rollout tensors (..., T) (advantages (..., T) or (...)) ->
    (loss (), stats).

    loss = reduce(policy_loss + kl_coef * kl(logp, ref_logp) - entropy_coef * entropy), the
    policy loss as ``ppo_policy_loss`` (ratio_level, loss_type, dual_clip, sapo_tau_pos /
    sapo_tau_neg), every term with the
    same reduction and normalizer. Tokens whose label is ignore_index are masked out as well.
    The logits of a token that does not count (masked or ignored) never enter the math,
    whatever they hold.
    """
    labels, m = _counted_labels(labels, mask, ignore_index)
    logp, entropy = logprobs(logits, labels, temperature, ignore_index, return_entropy=True)
    return _ppo_total(logp, entropy, old_logp, advantages, m, ref_logp, kl_coef, kl_estimator,
                      entropy_coef, clip_low, clip_high, dual_clip, log_ratio_clamp, reduction,
                      ratio_level, loss_type, normalizer, sapo_tau_pos, sapo_tau_neg)


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
    *,  # keyword-only as in the op, whose next positional arguments are its chunking
    ratio_level: str = "token",
    loss_type: str = "ppo",
    normalizer: float | torch.Tensor | None = None,
    sapo_tau_pos: float | None = None,
    sapo_tau_neg: float | None = None,
):
    """hidden (..., T, H), weight (V, H) and rollout tensors (..., T) (advantages (..., T) or
    (...)) -> (loss (), stats), as ``ppo_loss_from_logits`` of the lm_head's logits."""
    labels, m = _counted_labels(labels, mask, ignore_index)
    logp, entropy = linear_logprobs(hidden, weight, labels, bias, lora_a, lora_b, lora_scale,
                                    temperature, ignore_index, return_entropy=True)
    return _ppo_total(logp, entropy, old_logp, advantages, m, ref_logp, kl_coef, kl_estimator,
                      entropy_coef, clip_low, clip_high, dual_clip, log_ratio_clamp, reduction,
                      ratio_level, loss_type, normalizer, sapo_tau_pos, sapo_tau_neg)


def _counted_labels(labels, mask, ignore_index):
    """-> (labels with every token that does not count set to ignore_index, 0/1 float mask)."""
    labels = _int64_labels(labels)
    counted = (as_mask(mask, labels) > 0) & (labels != ignore_index)
    labels = torch.where(counted, labels, torch.full_like(labels, ignore_index))
    return labels, counted.to(torch.float32)


def _ppo_total(logp, entropy, old_logp, advantages, m, ref_logp, kl_coef, kl_estimator,
               entropy_coef, clip_low, clip_high, dual_clip, log_ratio_clamp, reduction,
               ratio_level="token", loss_type="ppo", normalizer=None, sapo_tau_pos=None,
               sapo_tau_neg=None):
    """The loss and stats of the fused ops from per-token logp / entropy; m: 0/1 float mask."""
    check_policy_options(ratio_level, loss_type, dual_clip)
    taus = sapo_taus(loss_type, sapo_tau_pos, sapo_tau_neg)
    dtype = logp.dtype
    valid = m > 0
    m = m.to(dtype)
    # a tensor normalizer's gradient rule (_tensor_normalizer) applies at the per-token
    # log-probs and entropies, as the kernels divide their derivatives there
    n, bad, (logp, entropy, old_logp, advantages, ref_logp) = _tensor_normalizer(
        normalizer, (logp, entropy, old_logp, advantages, ref_logp))
    A = _per_token_advantages(advantages, logp)
    logp, entropy, old_logp, A = (_zero_masked(t.to(dtype), valid)
                                  for t in (logp, entropy, old_logp, A))
    per_token, ratio, d, clipped, _ = _policy_terms(
        logp, old_logp, A, m, clip_low, clip_high, dual_clip, log_ratio_clamp, ratio_level,
        loss_type, taus)
    pg_loss = reduce_loss(per_token, m, reduction, normalizer)
    total = pg_loss
    terms = [(1.0, per_token)]
    stats = {"pg_loss": pg_loss.detach()}
    if ref_logp is not None and kl_coef:
        kl = kl_penalty(logp, _zero_masked(ref_logp.to(dtype), valid), kl_estimator)
        kl_loss = reduce_loss(kl, m, reduction, normalizer)
        total = total + kl_coef * kl_loss
        stats["kl"] = kl_loss.detach()
        terms.append((kl_coef, kl))
    if entropy_coef:
        total = total - entropy_coef * reduce_loss(entropy, m, reduction, normalizer)
        terms.append((-entropy_coef, entropy))
    total = _normalized_loss(total, n, bad, terms, m, reduction)
    with torch.no_grad():
        stats["entropy"] = masked_mean(entropy, m)
        stats["clipfrac"] = masked_mean(clipped.to(dtype), m)
        stats["approx_kl"] = masked_mean(0.5 * d * d, m)
        stats["ratio_mean"] = masked_mean(ratio, m)
    return total, {k: v.detach() for k, v in stats.items()}


# --------------------------------------------------------------------------------------------
# Group-relative advantages (critic-free RL: GRPO, Dr. GRPO, RLOO)
# --------------------------------------------------------------------------------------------
ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
ADVANTAGE_NORMS = ("group", "batch", "none")
# norm=None: the estimator's own scaling (GRPO divides by the group's std, the others do not).
DEFAULT_ADVANTAGE_NORM = {"grpo": "group", "dr_grpo": "none", "rloo": "none"}
GROUP_ID_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_group_advantages(
    scores: torch.Tensor,
    group_size: int | None,
    group_ids: torch.Tensor | None,
    estimator: str,
    norm: str | None,
    eps: float,
) -> str:
    """Validate group_advantages' arguments (shapes and dtypes only: no host sync); return the
    scaling actually used ("group", "batch" or "none")."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(
            f"scores must be a floating tensor (fp16, bf16, fp32 or fp64), got {scores.dtype}")
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, one score per sequence: expected (B,), got shape "
                         f"{tuple(scores.shape)}")
    n = scores.shape[0]
    if (group_size is None) == (group_ids is None):
        given = "both" if group_size is not None else "neither"
        raise ValueError(f"pass exactly one of group_size (consecutive groups of that many "
                         f"scores) or group_ids (a (B,) integer tensor, equal id = same group); "
                         f"got {given}")
    if group_ids is None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
        if n % group_size:
            raise ValueError(f"B={n} scores do not split into groups of group_size={group_size} "
                             f"({n} % {group_size} = {n % group_size}); B must be a multiple "
                             "of group_size, or pass group_ids")
    else:
        if not isinstance(group_ids, torch.Tensor):
            raise ValueError(f"group_ids must be a (B,) integer torch.Tensor, got "
                             f"{type(group_ids).__name__}")
        if group_ids.dtype not in GROUP_ID_DTYPES:
            raise ValueError(f"group_ids must be an integer tensor (int8, int16, int32, int64 or "
                             f"uint8), got {group_ids.dtype}")
        if group_ids.shape != scores.shape:
            raise ValueError(f"group_ids has shape {tuple(group_ids.shape)} but scores has shape "
                             f"{tuple(scores.shape)}; expected one id per score, (B,)")
        if group_ids.device != scores.device:
            raise ValueError(f"all inputs must be on one device, got scores on {scores.device}, "
                             f"group_ids on {group_ids.device}")
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not supported; expected one of "
                         f"{ADVANTAGE_ESTIMATORS}")
    if norm is not None and norm not in ADVANTAGE_NORMS:
        raise ValueError(f"norm={norm!r} is not supported; expected None (the estimator's "
                         f"default: {DEFAULT_ADVANTAGE_NORM}) or one of {ADVANTAGE_NORMS}")
    if not (0.0 <= float(eps) < math.inf):
        raise ValueError(f"eps={eps} must be a finite number >= 0 (it is added to the std; inf "
                         f"made every advantage 0)")
    return DEFAULT_ADVANTAGE_NORM[estimator] if norm is None else norm


def _group_index(n: int, group_size: int | None, group_ids: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
    """(B,) int64 index in [0, B) of each score's group: equal index <=> same group."""
    if group_ids is None:
        return torch.arange(n, device=device) // group_size
    # Renumber arbitrary ids densely without a host sync (no torch.unique): sort them and start
    # a new index wherever the sorted id changes, then put the indices back in input order.
    sorted_ids, order = torch.sort(group_ids)
    starts = torch.ones(n, dtype=torch.int64, device=device)
    starts[1:] = (sorted_ids[1:] != sorted_ids[:-1]).to(torch.int64)
    index_in_sorted_order = starts.cumsum(0) - 1
    return torch.empty_like(index_in_sorted_order).scatter_(0, order, index_in_sorted_order)


def _group_total(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """For each element, the sum of x over its group ((B,) -> (B,))."""
    return torch.zeros_like(x).index_add_(0, index, x)[index]


def group_advantages(
    scores: torch.Tensor,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    estimator: str = "grpo",
    norm: str | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages of critic-free RL: scores (B,) -> advantages (B,) fp32 (fp64
    for fp64 input), no gradient (rollout data: the result is detached).

    Groups: exactly one of ``group_size`` (consecutive groups of that many scores; B must be a
    multiple) or ``group_ids`` ((B,) integer tensor, any values in any order; equal id = same
    group). For score r_i in a group g of n = n_g scores with mean mean_g:

        baseline  b_i = mean_g                              grpo, dr_grpo
                  b_i = (sum_g - r_i) / (n - 1)             rloo (mean of the other members)
        centred   c_i = r_i - b_i                           (rloo: c_i = n / (n - 1) (r_i - mean_g))
        scale     "group": unbiased std of the group's scores;  "batch": unbiased std of all B
                  scores (TRL's scale_rewards="batch");  "none": no scaling
        A_i       = c_i / (scale + eps), or c_i for "none"

    ``norm=None`` is the estimator's default: "group" for grpo, "none" for dr_grpo and rloo.
    Groups of one: grpo takes mean 0 and std 1 for them (veRL's compute_grpo_outcome_advantage:
    A = r / (1 + eps) with "group"; the mean stays 0 under "batch" too); dr_grpo and rloo give
    A = 0. The batch std of a single score (B = 1) is 1. A group whose scores are all equal has
    std 0: A = 0 / eps = 0 (NaN when eps = 0).
    """
    if group_size is not None:  # numpy integers and 0-d tensors too, as the kernel path
        group_size = int_setting("group_size", group_size, expected="an int >= 1")
    norm = check_group_advantages(scores, group_size, group_ids, estimator, norm, eps)
    dtype = _compute_dtype(scores)
    r = scores.detach().to(dtype)
    n = r.shape[0]
    index = _group_index(n, group_size, group_ids, r.device)
    count = _group_total(torch.ones_like(r), index)
    total = _group_total(r, index)
    mean = total / count
    alone = count == 1
    zero = torch.zeros((), dtype=dtype, device=r.device)
    if estimator == "grpo":
        centred = torch.where(alone, r, r - mean)  # a lone score's mean is taken as 0
    elif estimator == "dr_grpo":
        centred = torch.where(alone, zero, r - mean)
    else:  # rloo: leave-one-out baseline, the mean of the n - 1 others
        others_mean = (total - r) / (count - 1).clamp_min(1)
        centred = torch.where(alone, zero, r - others_mean)
    if norm == "none":
        return centred
    if norm == "group":
        deviation = r - mean  # two-pass: the variance sums squares of deviations from the mean
        var = _group_total(deviation * deviation, index) / (count - 1).clamp_min(1)
        std = torch.where(alone, torch.ones((), dtype=dtype, device=r.device), var.sqrt())
    else:  # batch
        if n > 1:
            deviation = r - r.mean()
            std = ((deviation * deviation).sum() / (n - 1)).sqrt()
        else:
            std = torch.ones((), dtype=dtype, device=r.device)
    return centred / (std + eps)
