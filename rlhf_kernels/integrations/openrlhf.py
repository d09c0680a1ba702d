"""OpenRLHF drop-ins: KL estimate, log-probs, entropy, PPO / GSPO / value / reward-model losses,
GAE and the group baselines of the critic-free estimators.

Checked against OpenRLHF 0.11.2. Functions of ``openrlhf.models.utils`` with its signatures (every
drop-in also takes a keyword-only ``keep_fp32``):

    compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1",
                      unbiased_gradient=False) -> kl                (rlhf_kernels.kl_penalty)
    log_probs_from_logits(logits, labels, temperature=1.0) -> logp   (rlhf_kernels.logprobs)
    compute_entropy(logits) -> entropy                               (rlhf_kernels.logprobs)

and methods, patched on their classes (so every instance, old or new, uses them):

    PolicyLoss.forward(self, log_probs, old_log_probs, advantages, action_mask=None,
                       rollout_log_probs=None, dp_size=1, batch_num_tokens=None,
                       global_batch_size=None)
        -> (loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)
    ValueLoss.forward(self, values, old_values, returns, action_mask=None, dp_size=1,
                      batch_num_tokens=None, global_batch_size=None) -> loss
    PairWiseLoss.forward / LogExpLoss.forward(self, chosen_reward, reject_reward, margin=None)
    RemoteExperienceMaker.get_advantages_and_returns(self, values, rewards, action_mask, gamma,
                                                     lambd) -> (advantages, returns)
    RemoteExperienceMaker.get_cumulative_returns(self, rewards, action_mask, gamma) -> returns

and, with no OpenRLHF function of its own to replace:

    group_baseline_rewards(rewards, n_samples_per_prompt, estimator, indices=None) -> rewards

Conversions (OpenRLHF's semantics are kept; full list in docs/integrations.md):

* GAE: OpenRLHF zeroes rewards and values on masked positions and then runs the plain loop over
  every position (no skipping). That is our kernel with ``mask=None`` on the masked inputs, so
  the drop-in calls it that way; the REINFORCE returns are the same scan with values 0, lam 1.
* k3 bounds the log-ratio from below at -10 only, then clamps the result to +-10. Since the
  result clamp bites for every |log-ratio| >= 11 anyway, a symmetric log-ratio clamp at 11 gives
  the same values and gradients everywhere.
* Loss aggregation: ``token_level_loss`` True is our "token-mean", False our
  "seq-mean-token-mean"; the global normalisers (batch_num_tokens / global_batch_size with
  dp_size) are a factor on our loss that depends on the mask only.
* ``log_probs_from_logits`` divides the caller's logits by the temperature in place, as
  OpenRLHF's does (its caller relies on the scaled logits).
* Output dtype and shape: those of OpenRLHF's own function for the same call. The kernels compute
  in fp32 (fp64 for fp64 inputs) and the drop-in rounds once to OpenRLHF's dtype:
  ``compute_approx_kl`` fp32 (OpenRLHF computes on ``.float()`` inputs); ``log_probs_from_logits``
  the logits' dtype, except fp32 for fp64 logits where flash-attn's cross entropy imports
  (OpenRLHF then uses it; an installed flash-attn that fails to import does not count), with shape
  ``logits.shape[:-1]``; ``compute_entropy`` the logits' dtype; the losses and GAE the type
  promotion of the inputs OpenRLHF computes with (at least fp32 for the sequence-level loss and
  the clip ratio, which OpenRLHF builds with ``.float()``). ``keep_fp32=True`` returns the
  kernels' fp32 (fp64) result unrounded.
* Masks are read as 0/1; an all-masked batch gives 0 where OpenRLHF divides 0 by 0; PPO's
  ``ppo_kl`` uses the unclamped log-ratio, as OpenRLHF's (computed with torch, it is a detached
  statistic).
* GSPO (policy_loss_type "gspo"): OpenRLHF's ratio is the row's exp(mean log-ratio), unclamped,
  with the gradient through the mean: the kernels' ratio_level="sequence" without a clamp.
* The train/rollout importance-sampling correction (``is_correction_level`` token / seq, modes
  mask / clip, gatings ratio / binary_kl / tv): for "ppo" OpenRLHF multiplies each token's loss
  by a coefficient that is never negative (a clamped ratio, or the token's ratio or 0), so the
  op is given A x coefficient (exact: the clipped surrogate and the dual clip are positively
  homogeneous in A); clip_ratio is counted on the unweighted A, and vllm_kl / is_filter_ratio
  are computed as OpenRLHF does. For "gspo" OpenRLHF takes the ratio against the rollout
  log-probs instead of the old ones: the op is given them as its old log-probs.
* The critic-free estimators (group_norm, dr_grpo, rloo, reinforce_baseline) are computed inline
  in OpenRLHF's ``compute_advantages_and_returns``, so there is nothing to patch; their baseline
  step is ``group_baseline_rewards`` here (rlhf_kernels.group_advantages).

Falls back to OpenRLHF's own method for policy_loss_type other than "ppo" and "gspo", the
train/rollout importance-sampling correction without rollout_log_probs or action_mask, KL estimators
other than k1/k2/k3, and calls OpenRLHF itself cannot evaluate (no action_mask with a
sequence-level or global normalisation, or for GSPO). ``compute_reward`` is not replaced: its
input is the already computed KL, so there is nothing left to fuse
(``rlhf_kernels.shape_rewards`` fuses the estimate itself).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_kernels._checks import int_setting
from rlhf_kernels.integrations import Patch, apply_patch, dropin, original, unpatch_openrlhf
from rlhf_kernels.integrations._contract import (
    autocast_sum,
    bind_keep_fp32,
    broadcast_advantages,
    dtype_under_autocast,
    entropy_formula,
    exact_backend,
    finish,
    flash_attn_cross_entropy_imports,
    in_unit_interval,
    is_dtensor,
    log_softmax_last,
    nonnegative,
    promoted,
    weighted_advantages,
    widened_under_autocast,
)
from rlhf_kernels.ops.advantages import group_advantages
from rlhf_kernels.ops.bradley_terry import bradley_terry_loss
from rlhf_kernels.ops.gae import gae
from rlhf_kernels.ops.kl import kl_penalty as kl_estimate
from rlhf_kernels.ops.logprobs import logprobs
from rlhf_kernels.ops.policy_loss import ppo_policy_loss
from rlhf_kernels.ops.value_loss import ppo_value_loss

__all__ = [
    "compute_approx_kl",
    "compute_entropy",
    "get_advantages_and_returns",
    "get_cumulative_returns",
    "group_baseline_rewards",
    "log_exp_loss_forward",
    "log_probs_from_logits",
    "pairwise_loss_forward",
    "patch_openrlhf",
    "policy_loss_forward",
    "unpatch_openrlhf",
    "value_loss_forward",
]

_UTILS = "openrlhf.models.utils"
_LOSS = "openrlhf.models.loss"
_EXPERIENCE = "openrlhf.trainer.ppo_utils.experience_maker"

_KL_CLAMP = 10.0  # OpenRLHF clamps every estimator's value to +-10
# policy_loss_type -> (the kernels' ratio_level, log-ratio clamp) as OpenRLHF computes the ratio:
# PPO clamps the token log-ratio to +-20, GSPO leaves the sequence mean unclamped.
_POLICY_RATIO = {"ppo": ("token", 20.0), "gspo": ("sequence", None)}
_K3_LOG_RATIO_BOUND = 11.0  # see the module docstring: equivalent to OpenRLHF's min=-10 bound
_IS_WEIGHT_CLIP = 10.0  # OpenRLHF's KL_IS_WEIGHT_CLIP for the unbiased-gradient correction


# --------------------------------------------------------------------------------------------
# openrlhf.models.utils
# --------------------------------------------------------------------------------------------
@dropin
def compute_approx_kl(
    log_probs: torch.Tensor,
    log_probs_base: torch.Tensor,
    log_probs_old: torch.Tensor | None = None,
    kl_estimator: str = "k1",
    unbiased_gradient: bool = False,
    *,
    keep_fp32: bool = False,
) -> torch.Tensor:
    """OpenRLHF's KL estimate (k1 / k2 / k3, clamped to +-10): (...) -> (...) fp32 for every
    input dtype, as OpenRLHF (fp64 inputs: fp64 with ``keep_fp32``).

    unbiased_gradient: forward value of the estimator, gradient of w * k2 (straight-through)
    with w = exp(log_probs - log_probs_old) clamped to <= 10 and detached (w = 1 without
    log_probs_old): OpenRLHF's importance-weighted reverse-KL gradient.
    """
    if kl_estimator not in ("k1", "k2", "k3"):
        return original(_UTILS, "compute_approx_kl")(
            log_probs, log_probs_base, log_probs_old, kl_estimator, unbiased_gradient
        )
    log_ratio_clamp = _K3_LOG_RATIO_BOUND if kl_estimator == "k3" else None
    value = kl_estimate(log_probs, log_probs_base, kl_estimator, _KL_CLAMP, log_ratio_clamp)
    if not unbiased_gradient:
        return finish(value, torch.float32, keep_fp32)
    if log_probs_old is None:
        weight = 1.0
    else:
        log_w = log_probs.detach().float() - log_probs_old.detach().float()
        weight = log_w.exp().clamp(max=_IS_WEIGHT_CLIP)
    surrogate = weight * kl_estimate(log_probs, log_probs_base, "k2")
    return finish(value.detach() + surrogate - surrogate.detach(), torch.float32, keep_fp32)


@dropin
def log_probs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    *,
    keep_fp32: bool = False,
) -> torch.Tensor:
    """logits (..., V), labels with one label per row (any shape, as OpenRLHF's flash-attn path
    reshapes them) -> logp ``logits.shape[:-1]`` of softmax(logits / temperature), in the logits'
    dtype (fp32 for fp64 logits where flash-attn's cross entropy imports), as OpenRLHF; fp32 with
    ``keep_fp32``. Like OpenRLHF's, a temperature != 1 divides ``logits`` in place first. Labels
    equal to -100 give 0 (as OpenRLHF's flash-attn path). A DTensor (logits sharded under tensor
    parallelism) goes to OpenRLHF's own function."""
    if is_dtensor(logits):
        return original(_UTILS, "log_probs_from_logits")(logits, labels, temperature)
    rows = logits.shape[:-1]
    if labels.shape != rows:
        if labels.numel() != rows.numel():
            raise ValueError(
                f"labels has shape {tuple(labels.shape)} ({labels.numel()} labels) but logits has "
                f"shape {tuple(logits.shape)} ({rows.numel()} rows of {logits.shape[-1]} logits); "
                f"log_probs_from_logits needs one label per row of logits"
            )
        labels = labels.reshape(rows)
    if temperature != 1.0:
        logits.div_(temperature)
    if _openrlhf_uses_flash_ce(logits):
        dtype = torch.float32
    elif logits.dtype in (torch.float32, torch.float64):
        dtype = logits.dtype  # OpenRLHF gathers and subtracts a logsumexp in the logits' dtype
    else:  # a log-softmax per row: fp32 under CUDA's autocast
        dtype = dtype_under_autocast(log_softmax_last, logits)
    return finish(logprobs(logits, labels, backend=exact_backend(logits)), dtype, keep_fp32)


def _openrlhf_uses_flash_ce(logits: torch.Tensor) -> bool:
    """Whether OpenRLHF 0.11.2's log_probs_from_logits would take flash-attn's cross entropy
    (which returns fp32): fp32 / fp64 logits and its import of that function succeeds (an
    installed flash-attn that fails to import does not count); else the logits' dtype."""
    return logits.dtype in (torch.float32, torch.float64) and flash_attn_cross_entropy_imports()


@dropin
def compute_entropy(logits: torch.Tensor, *, keep_fp32: bool = False) -> torch.Tensor:
    """Entropy of softmax(logits): (..., V) -> (...) in the logits' dtype, as OpenRLHF (fp32
    with ``keep_fp32``), differentiable. A DTensor goes to OpenRLHF's own function."""
    if is_dtensor(logits):
        return original(_UTILS, "compute_entropy")(logits)
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    _, entropy = logprobs(logits, labels, return_entropy=True, check_labels=False,
                          backend=exact_backend(logits))
    return finish(entropy, dtype_under_autocast(entropy_formula, logits), keep_fp32)


# --------------------------------------------------------------------------------------------
# openrlhf.models.loss
# --------------------------------------------------------------------------------------------
def _aggregation(action_mask, token_level_loss, dp_size, batch_num_tokens, global_batch_size):
    """(our reduction, factor or None, covered) for OpenRLHF's aggregate_loss options."""
    reduction = "token-mean" if token_level_loss else "seq-mean-token-mean"
    global_count = batch_num_tokens if token_level_loss else global_batch_size
    if action_mask is None:
        # OpenRLHF: a plain mean when token-level and local; anything else fails there.
        return reduction, None, token_level_loss and global_count is None
    if global_count is None:
        return reduction, None, True  # OpenRLHF ignores dp_size here
    valid = (action_mask != 0).to(torch.float32)
    local = valid.sum() if token_level_loss else (valid.sum(-1) > 0).to(torch.float32).sum()
    return reduction, local.clamp_min(1) * dp_size / global_count, True


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    return (x * mask).sum() / mask.sum()


def _loss_dtype(token_level_loss: bool, batch_num_tokens, global_batch_size,
                *tensors: torch.Tensor | None) -> torch.dtype:
    """OpenRLHF's loss dtype: its inputs' promotion, at least fp32 for the sequence-level loss
    (aggregate_loss builds the sequence mask with ``.float()``), and the global count it divides
    by when that is a tensor: OpenRLHF 0.11.2's trainers pass batch_num_tokens and
    global_batch_size as 0-d fp32 tensors, and a 0-d bf16 sum over a 0-d fp32 count is fp32;
    widened as its sums are under autocast (fp32 under CUDA's)."""
    count = batch_num_tokens if token_level_loss else global_batch_size
    count = count if isinstance(count, torch.Tensor) else None
    dtype = (promoted(count, *tensors) if token_level_loss
             else promoted(torch.float32, count, *tensors))
    # aggregate_loss sums: under autocast the sum may run in fp32 (CUDA's)
    device = next(t.device for t in tensors if isinstance(t, torch.Tensor))
    return widened_under_autocast(dtype, device, autocast_sum)


def _rollout_correction(self, old_log_probs, rollout_log_probs, action_mask):
    """OpenRLHF's train/rollout correction of the "ppo" loss -> (coefficient >= 0 per token,
    (B, T) or (B, 1) broadcast against it, is_filter_ratio, vllm_kl), detached. The statistic
    gated (the ratio pi_train / pi_rollout, or the sampled token's binary KL or total variation
    between the two) is per token, or per sequence (the ratio's geometric mean, a divergence's
    mean); "clip" clamps it into the band, "mask" keeps the token's own ratio inside the band and
    0 outside."""
    low, high = self.is_correction_threshold
    per_sequence = self.is_correction_level == "seq"

    def row_mean(x):
        return ((x * action_mask).sum(-1) / action_mask.sum(-1)).unsqueeze(-1)

    with torch.no_grad():
        log_ratio = old_log_probs - rollout_log_probs  # log(pi_train / pi_rollout)
        token_ratio = log_ratio.exp()
        if self.is_correction_gating == "ratio":
            statistic = (row_mean(log_ratio) if per_sequence else log_ratio).exp()
        else:
            p = rollout_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            q = old_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            if self.is_correction_gating == "binary_kl":
                statistic = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:  # tv
                statistic = (p - q).abs()
            statistic = row_mean(statistic) if per_sequence else statistic
        if self.is_correction_mode == "clip":
            coefficient = statistic.clamp(min=low, max=high)
            filtered = (statistic < low) | (statistic > high)
        else:
            kept = (statistic >= low) & (statistic <= high)
            coefficient = torch.where(kept, token_ratio, torch.zeros_like(token_ratio))
            filtered = ~kept
        filter_ratio = (filtered.float().mean() if per_sequence
                        else _masked_mean(filtered.float(), action_mask))
        vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, action_mask)
    return coefficient, filter_ratio, vllm_kl


def _clip_ratio(log_probs, old_log_probs, advantages, action_mask, clip_low, clip_high):
    """OpenRLHF's clip_ratio of the "ppo" loss (the token ratio against the old log-probs,
    log-ratio clamped to +-20), counted on the advantages as given."""
    with torch.no_grad():
        ratio = (log_probs - old_log_probs).clamp(-20.0, 20.0).exp()
        surr1 = ratio * advantages
        surr2 = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
        return _masked_mean((surr2 < surr1).float(), action_mask)


@dropin
def policy_loss_forward(
    self,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor | None = None,
    rollout_log_probs: torch.Tensor | None = None,
    dp_size: int = 1,
    batch_num_tokens: float | None = None,
    global_batch_size: float | None = None,
    *,
    keep_fp32: bool = False,
):
    """OpenRLHF ``PolicyLoss.forward`` for policy_loss_type "ppo" (token ratio, log-ratio
    clamped to +-20) and "gspo" (every token of a row takes the row's geometric-mean ratio
    exp(mean over valid tokens of logp - old), unclamped, the gradient through the mean: the
    kernels' ratio_level="sequence"), with or without the train/rollout correction (module
    docstring): (B, T) tensors -> (loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio), () tensors
    in OpenRLHF's dtypes (fp32 with ``keep_fp32``); the last two None without the correction or
    for "gspo", as OpenRLHF. Dual clip as configured, for both."""
    advantages = broadcast_advantages(advantages, log_probs)
    reduction, factor, covered = _aggregation(
        action_mask, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size
    )
    correcting = getattr(self, "is_correction_level", "off") != "off"
    loss_type = self.policy_loss_type
    clips_in_domain = (nonnegative(self.clip_eps_low) and nonnegative(self.clip_eps_high)
                       and (self.dual_clip is None or self.dual_clip > 1.0))
    if (loss_type not in _POLICY_RATIO or not covered or not clips_in_domain
            or (loss_type == "gspo" and action_mask is None)  # OpenRLHF's GSPO needs a mask
            or (correcting and (rollout_log_probs is None or action_mask is None))):
        return original(_LOSS, "PolicyLoss.forward")(
            self, log_probs, old_log_probs, advantages, action_mask, rollout_log_probs, dp_size,
            batch_num_tokens, global_batch_size,
        )
    ratio_level, log_ratio_clamp = _POLICY_RATIO[loss_type]
    ratio_base, weighted, coefficient = old_log_probs, advantages, None
    vllm_kl = filter_ratio = None
    if correcting and loss_type == "gspo":  # the ratio against the rollout policy
        ratio_base = rollout_log_probs
    elif correcting:
        coefficient, filter_ratio, vllm_kl = _rollout_correction(
            self, old_log_probs, rollout_log_probs, action_mask)
        weighted = weighted_advantages(advantages, coefficient)
    loss, stats = ppo_policy_loss(
        log_probs, ratio_base, weighted, action_mask,
        clip_low=self.clip_eps_low, clip_high=self.clip_eps_high, dual_clip=self.dual_clip,
        log_ratio_clamp=log_ratio_clamp, reduction=reduction, ratio_level=ratio_level,
    )
    if factor is not None:
        loss = loss * factor
    # masked_mean: a sum, widened under autocast as the loss's
    kl_dtype = widened_under_autocast(promoted(log_probs, old_log_probs, action_mask),
                                      log_probs.device, autocast_sum)
    with torch.no_grad():  # OpenRLHF reports ppo_kl from the unclamped log-ratio
        work = torch.promote_types(kl_dtype, torch.float32)
        ppo_kl = _masked_mean(old_log_probs.to(work) - log_probs.to(work), action_mask)
    loss_dtype = _loss_dtype(self.token_level_loss, batch_num_tokens, global_batch_size,
                             log_probs, ratio_base, advantages, action_mask, coefficient)
    clip_ratio = stats["clipfrac"] if coefficient is None else _clip_ratio(
        log_probs, old_log_probs, advantages, action_mask, self.clip_eps_low, self.clip_eps_high)
    frac_dtype = promoted(torch.float32, action_mask)
    if vllm_kl is not None:
        vllm_kl = finish(vllm_kl, promoted(rollout_log_probs, old_log_probs, action_mask),
                         keep_fp32)
        filter_ratio = finish(filter_ratio, frac_dtype, keep_fp32)
    return (finish(loss, loss_dtype, keep_fp32), finish(clip_ratio, frac_dtype, keep_fp32),
            finish(ppo_kl, kl_dtype, keep_fp32), vllm_kl, filter_ratio)


@dropin
def value_loss_forward(
    self,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    action_mask: torch.Tensor | None = None,
    dp_size: int = 1,
    batch_num_tokens: float | None = None,
    global_batch_size: float | None = None,
    *,
    keep_fp32: bool = False,
) -> torch.Tensor:
    """OpenRLHF ``ValueLoss.forward``: (B, T) tensors -> loss () in OpenRLHF's dtype (fp32 with
    ``keep_fp32``); gradient to values."""
    reduction, factor, covered = _aggregation(
        action_mask, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size
    )
    if not covered or not (self.clip_eps is None or nonnegative(self.clip_eps)):
        return original(_LOSS, "ValueLoss.forward")(
            self, values, old_values, returns, action_mask, dp_size, batch_num_tokens,
            global_batch_size,
        )
    loss, _ = ppo_value_loss(values, old_values, returns, action_mask, clip=self.clip_eps,
                             reduction=reduction)
    loss = loss if factor is None else loss * factor
    dtype = _loss_dtype(self.token_level_loss, batch_num_tokens, global_batch_size, values,
                        old_values, returns, action_mask)
    return finish(loss, dtype, keep_fp32)


@dropin
def pairwise_loss_forward(
    self,
    chosen_reward: torch.Tensor,
    reject_reward: torch.Tensor,
    margin: torch.Tensor | None = None,
    *,
    keep_fp32: bool = False,
) -> torch.Tensor:
    """OpenRLHF ``PairWiseLoss.forward``: mean(-log sigmoid(r_c - r_r - margin)), () in the
    promotion of the inputs' dtypes (fp32 with ``keep_fp32``)."""
    loss, _ = bradley_terry_loss(chosen_reward, reject_reward, margin)
    return finish(loss, promoted(chosen_reward, reject_reward, margin), keep_fp32)


@dropin
def log_exp_loss_forward(
    self,
    chosen_reward: torch.Tensor,
    reject_reward: torch.Tensor,
    margin: torch.Tensor | None = None,
    *,
    keep_fp32: bool = False,
) -> torch.Tensor:
    """OpenRLHF ``LogExpLoss.forward``: mean(log(1 + exp(r_r - r_c))), () in the promotion of
    the two rewards' dtypes, widened as OpenRLHF's exp / log under autocast (fp32 with
    ``keep_fp32``). The margin is ignored, as OpenRLHF's;
    unlike its exp, the kernel does not overflow for large gaps."""
    del margin
    loss, _ = bradley_terry_loss(chosen_reward, reject_reward)
    # OpenRLHF's exp and log run in fp32 under CUDA's autocast
    dtype = widened_under_autocast(promoted(chosen_reward, reject_reward), chosen_reward.device,
                                   torch.exp, torch.log)
    return finish(loss, dtype, keep_fp32)


# --------------------------------------------------------------------------------------------
# openrlhf.trainer.ppo_utils.experience_maker.RemoteExperienceMaker
# --------------------------------------------------------------------------------------------
# estimator -> (the kernels' estimator, norm, eps) for OpenRLHF's group baselines (eps is used
# by "group" scaling only)
_GROUP_ESTIMATORS = {
    "group_norm": ("grpo", "group", 1e-9),  # (r - mean) / (unbiased std + 1e-9)
    "dr_grpo": ("dr_grpo", "none", 1e-6),  # r - mean
    "reinforce_baseline": ("dr_grpo", "none", 1e-6),  # r - mean (whitened later by OpenRLHF)
    "rloo": ("rloo", "none", 1e-6),  # r - mean of the other samples of the prompt
}
_NO_GROUP_BASELINE = ("gae", "reinforce")  # rewards pass unchanged


@torch.no_grad()
def group_baseline_rewards(
    rewards: torch.Tensor,
    n_samples_per_prompt: int,
    estimator: str,
    indices: torch.Tensor | None = None,
    *,
    keep_fp32: bool = False,
) -> torch.Tensor:
    """OpenRLHF's reward shaping by baseline subtraction, the step of
    ``compute_advantages_and_returns`` that makes its critic-free estimators (OpenRLHF 0.11.2).

    rewards: (N,) one scalar reward per sample, in experience order; indices: (N,) each
    sample's position in prompt order (OpenRLHF's ``experience.index`` of every experience,
    concatenated), or None when ``rewards`` is in prompt order already. OpenRLHF puts the
    rewards in prompt order, views them as (N / n, n) rows of one prompt's samples and puts
    them back; that grouping is group id = indices // n, computed here without the reorder.

    estimator: "group_norm" (r - mean) / (unbiased std + 1e-9); "dr_grpo" and
    "reinforce_baseline" r - mean; "rloo" r - mean of the other n - 1 samples;
    "flash_reinforce" r - the batch mean; "gae" and "reinforce" no baseline.
    Returns (N,) in experience order, fp32 at least (OpenRLHF promotes the rewards to fp32
    first; fp64 stays fp64), no gradient. OpenRLHF applies its length penalties before this
    step and the KL shaping and cumulative returns after it.

    n_samples_per_prompt = 1: "group_norm" and "rloo" divide by zero in OpenRLHF (NaN); here
    they raise ValueError.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (N,) one reward per sample, got shape "
                         f"{tuple(rewards.shape)}")
    n = int_setting("n_samples_per_prompt", n_samples_per_prompt, expected="an int >= 1")
    if n < 1:
        raise ValueError(f"n_samples_per_prompt must be an int >= 1, got {n_samples_per_prompt!r}")
    if rewards.shape[0] % n:
        raise ValueError(f"{rewards.shape[0]} rewards do not make whole groups of "
                         f"n_samples_per_prompt={n} (OpenRLHF reshapes them to (-1, {n}))")
    if indices is not None and tuple(indices.shape) != tuple(rewards.shape):
        raise ValueError(f"indices must be (N,) like rewards {tuple(rewards.shape)}, got "
                         f"{tuple(indices.shape)}")
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    if estimator in _NO_GROUP_BASELINE:
        return finish(rewards.to(dtype), dtype, keep_fp32)
    if estimator == "flash_reinforce":
        shaped = rewards.to(dtype)
        return finish(shaped - shaped.mean(), dtype, keep_fp32)
    if estimator not in _GROUP_ESTIMATORS:
        raise ValueError(
            f"estimator={estimator!r} is not one of OpenRLHF's: "
            f"{sorted(_GROUP_ESTIMATORS) + ['flash_reinforce', *_NO_GROUP_BASELINE]}"
        )
    ours, norm, eps = _GROUP_ESTIMATORS[estimator]
    if n == 1 and estimator in ("group_norm", "rloo"):
        raise ValueError(
            f"estimator={estimator!r} needs n_samples_per_prompt > 1: with one sample per "
            "prompt OpenRLHF divides by zero (the std of one sample / n - 1 = 0)"
        )
    if indices is None:
        adv = group_advantages(rewards, group_size=n, estimator=ours, norm=norm, eps=eps)
    else:
        group_ids = torch.div(indices.to(device=rewards.device, dtype=torch.int64), n,
                              rounding_mode="floor")
        adv = group_advantages(rewards, group_ids=group_ids, estimator=ours, norm=norm, eps=eps)
    return finish(adv, dtype, keep_fp32)


@dropin
@torch.no_grad()
def get_advantages_and_returns(
    self,
    values: torch.Tensor,
    rewards: torch.Tensor,
    action_mask: torch.Tensor | None,
    gamma: float,
    lambd: float,
    *,
    keep_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenRLHF's GAE: values, rewards, action_mask (B, T) -> (advantages, returns) (B, T) in
    the promotion of the inputs' dtypes (fp32 with ``keep_fp32``). Masked rewards and values are
    zeroed and every position takes part (no skipping). A gamma or lambd outside [0, 1]
    (OpenRLHF computes with it, the op refuses it): OpenRLHF's own method."""
    if not (in_unit_interval(gamma) and in_unit_interval(lambd)):
        return original(_EXPERIENCE, "RemoteExperienceMaker.get_advantages_and_returns")(
            self, values, rewards, action_mask, gamma, lambd)
    dtype = promoted(values, rewards, action_mask)
    if action_mask is not None:
        values = action_mask * values
        rewards = action_mask * rewards
    advantages, returns = gae(rewards, values, None, float(gamma), float(lambd))
    return finish(advantages, dtype, keep_fp32), finish(returns, dtype, keep_fp32)


@dropin
@torch.no_grad()
def get_cumulative_returns(
    self,
    rewards: torch.Tensor,
    action_mask: torch.Tensor | None,
    gamma: float,
    *,
    keep_fp32: bool = False,
) -> torch.Tensor:
    """OpenRLHF's REINFORCE returns: sum_k gamma^k r_{t+k} of the masked rewards, (B, T) in the
    rewards' dtype, as OpenRLHF's buffer (fp32 with ``keep_fp32``). A gamma outside [0, 1]:
    OpenRLHF's own method."""
    if not in_unit_interval(gamma):
        return original(_EXPERIENCE, "RemoteExperienceMaker.get_cumulative_returns")(
            self, rewards, action_mask, gamma)
    dtype = rewards.dtype
    if action_mask is not None:
        rewards = action_mask * rewards
    returns, _ = gae(rewards, torch.zeros_like(rewards), None, float(gamma), 1.0)
    return finish(returns, dtype, keep_fp32)


def patch_openrlhf(keep_fp32: bool = False) -> Patch:
    """Swap the drop-ins into ``openrlhf.models.utils`` (and every loaded ``openrlhf`` module
    that imported them by name), the loss classes' ``forward`` and ``RemoteExperienceMaker``'s
    GAE methods. Returns a ``Patch`` (``undo()`` or context manager); ``unpatch_openrlhf()``
    undoes every active one. A module that cannot be imported (e.g. the experience maker
    without Ray) is skipped with a warning.

    keep_fp32: the patched functions return the kernels' fp32 results (fp64 for fp64 inputs)
    instead of OpenRLHF's dtype for the call.

    Run it in every process that computes losses: OpenRLHF's actors and critics are Ray
    workers, so call it from their setup, not only in the driver.
    """
    return apply_patch("OpenRLHF", "openrlhf", _patch_targets(keep_fp32))


def _patch_targets(keep_fp32: bool) -> list[tuple[str, str, Callable]]:
    """(module, attribute path, drop-in) for every target of ``patch_openrlhf``."""
    targets = [
        (_UTILS, "compute_approx_kl", compute_approx_kl),
        (_UTILS, "log_probs_from_logits", log_probs_from_logits),
        (_UTILS, "compute_entropy", compute_entropy),
        (_LOSS, "PolicyLoss.forward", policy_loss_forward),
        (_LOSS, "ValueLoss.forward", value_loss_forward),
        (_LOSS, "PairWiseLoss.forward", pairwise_loss_forward),
        (_LOSS, "LogExpLoss.forward", log_exp_loss_forward),
        (_EXPERIENCE, "RemoteExperienceMaker.get_advantages_and_returns",
         get_advantages_and_returns),
        (_EXPERIENCE, "RemoteExperienceMaker.get_cumulative_returns", get_cumulative_returns),
    ]
    return [(module, path, bind_keep_fp32(fn) if keep_fp32 else fn)
            for module, path, fn in targets]
