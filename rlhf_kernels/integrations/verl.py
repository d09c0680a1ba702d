"""veRL drop-ins: GAE and the critic-free advantage estimators, KL penalty, the PPO / GSPO /
CISPO / SAPO policy losses and the value loss, log-probs and entropy.

Checked against veRL 0.9.1 (``verl.trainer.ppo.core_algos`` and ``verl.utils.torch_functional``);
same signatures and return values as veRL's, plus a keyword-only ``keep_fp32``:

    compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam)
        -> (advantages, returns)               GAE by the parallel scan (rlhf_kernels.gae)
    kl_penalty(logprob, ref_logprob, kl_penalty) -> kl          (rlhf_kernels.kl_penalty)
    compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask,
                                loss_agg_mode="token-mean", config=None, rollout_is_weights=None)
        -> (pg_loss, metrics)                  (rlhf_kernels.ppo_policy_loss, dual clip on)
    compute_policy_loss_gspo(... same arguments, loss_agg_mode="seq-mean-token-mean" ...)
        -> (pg_loss, metrics)                  (ratio_level="sequence")
    compute_policy_loss_cispo(... same arguments ...) -> (pg_loss, metrics)  (loss_type="cispo")
    compute_policy_loss_sapo(... same arguments, loss_agg_mode="seq-mean-token-mean" ...)
        -> (pg_loss, metrics)                  (loss_type="sapo")
    compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                   norm_adv_by_std_in_grpo=True, config=None)
        -> (advantages, returns)               (rlhf_kernels.group_advantages); likewise
    compute_grpo_vectorized_outcome_advantage, compute_rloo_outcome_advantage,
    compute_rloo_vectorized_outcome_advantage,
    compute_reinforce_plus_plus_baseline_outcome_advantage (+ rlhf_kernels.masked_whiten) and
    compute_reinforce_plus_plus_outcome_advantage(token_level_rewards, response_mask, config)
                                               (rlhf_kernels.gae with values 0, lam 1 + whiten)
    compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None,
                        cliprange_low=None, cliprange_high=None, clip_ratio_c=3.0,
                        loss_agg_mode="token-mean")
        -> (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)        (the deprecated form)
    compute_value_loss(vpreds, returns, values, response_mask, cliprange_value,
                       loss_agg_mode="token-mean", dp_size=1, batch_num_tokens=None,
                       global_batch_size=None, loss_scale_factor=None)
        -> (vf_loss, vf_clipfrac)              (rlhf_kernels.ppo_value_loss)
    logprobs_from_logits(logits, labels, inplace_backward=True) -> logp  (rlhf_kernels.logprobs)
    entropy_from_logits(logits), entropy_from_logits_with_chunking(logits, chunk_size=2048)

Conversions (veRL's semantics are kept; see docs/integrations.md for the full list):

* GAE: veRL skips masked positions exactly as our kernel does, but leaves the running advantage
  on them (ours: 0); the drop-in copies it back (the advantage of the next valid position, 0 when
  none) and whitens with veRL's formula over the valid tokens, so every position matches.
* Loss aggregation: our reductions normalise by local counts; veRL's ``agg_loss`` may normalise
  by global counts (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
  ``loss_scale_factor``) and its "seq-mean-token-sum-norm" divides by the number of sequences as
  well as by the horizon. Each is a factor that depends on the mask only, applied to our loss.
* k3 ("low_var_kl"): log-ratio clamped to +-20 and the result to +-10, as veRL; the "+" variants
  (straight-through k2 gradient) are built from two kernel calls.
* Output dtype and shape: those of veRL's own function for the same call. The kernels compute in
  fp32 (fp64 for fp64 inputs) and the drop-in rounds once to veRL's dtype: for the losses, KL and
  GAE the type promotion of the inputs veRL computes with (fp32 for the seq-mean modes' loss and
  for the clip fractions, which veRL builds with ``.float()``); for ``logprobs_from_logits`` fp32
  where veRL would use flash-attn's cross entropy (CUDA logits, flash-attn's cross entropy
  imports, VERL_DISABLE_FLASH_ATTN_CE unset) and the logits' dtype otherwise, with shape
  ``logits.shape[:-1]`` and labels of any shape with one label per row (as veRL's flash-attn
  path); ``entropy_from_logits`` the logits' dtype; ``..._with_chunking`` fp32. ``keep_fp32=True``
  returns the kernels' fp32 (fp64) result unrounded.
* Masks are read as 0/1 (nonzero counts), where veRL multiplies by the mask's value; an
  all-masked micro-batch gives loss 0 (veRL: NaN).
* Advantage estimators (``ADVANTAGE_ESTIMATORS``, by veRL's registry names): the prompt ids in
  ``index`` are mapped to integer group ids once, on the host; scores are summed in fp32 at
  least. Groups of one as each veRL function treats them (grpo: mean 0, std 1; rloo: the score
  itself; rloo_vectorized: 0).
* GSPO: the kernels' sequence ratio is veRL's GSPO-token form when the advantages are one value
  per row; other calls, and rows whose mean log-ratio is below -10, go to veRL's own function.

Rollout correction weights (``rollout_is_weights``, vanilla, CISPO and SAPO): they multiply
each token's policy loss and are never negative, so the op is given A x w (exact: the losses are
positively homogeneous in A; SAPO's temperature follows the sign of A, which w > 0 keeps, and a
token of weight 0 adds 0 either way); vanilla's clip fractions are counted on the unweighted A,
as veRL.

Falls back to veRL's own function for: GSPO with ``rollout_is_weights``, SAPO temperatures that
are not finite numbers > 0, a distributed call
without the global counts veRL requires, KL modes other than k1/k2/k3/abs (and their aliases /
"+" forms), the calls veRL itself rejects (fewer than 2 valid tokens to whiten, no config), and
the GSPO cases above.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from rlhf_kernels._checks import REDUCTIONS
from rlhf_kernels.integrations import Patch, apply_patch, dropin, original, unpatch_verl
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
from rlhf_kernels.integrations.verl_fused_linear import TARGET_MODULE as FUSED_LINEAR_MODULE
from rlhf_kernels.integrations.verl_fused_linear import (
    FusedLinearForPPOFunction,
    FusedLinearForPPOFunctionFP32,
)
from rlhf_kernels.ops.advantages import group_advantages
from rlhf_kernels.ops.gae import gae
from rlhf_kernels.ops.kl import kl_penalty as kl_estimate
from rlhf_kernels.ops.logprobs import is_or_views_a_grad_leaf, logprobs
from rlhf_kernels.ops.policy_loss import ppo_policy_loss
from rlhf_kernels.ops.value_loss import ppo_value_loss
from rlhf_kernels.ops.whiten import masked_whiten

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "POLICY_LOSSES",
    "compute_gae_advantage_return",
    "compute_grpo_outcome_advantage",
    "compute_grpo_vectorized_outcome_advantage",
    "compute_policy_loss",
    "compute_policy_loss_cispo",
    "compute_policy_loss_gspo",
    "compute_policy_loss_sapo",
    "compute_policy_loss_vanilla",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_reinforce_plus_plus_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_rloo_vectorized_outcome_advantage",
    "compute_value_loss",
    "FusedLinearForPPOFunction",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "kl_penalty",
    "logprobs_from_logits",
    "patch_verl",
    "unpatch_verl",
]

_CORE = "verl.trainer.ppo.core_algos"
_TORCH_F = "verl.utils.torch_functional"

# veRL's KL mode names -> (our estimator, clamp of the result, clamp of the log-ratio).
_KL_MODES = {
    "kl": ("k1", None, None),
    "k1": ("k1", None, None),
    "abs": ("abs", None, None),
    "mse": ("k2", None, None),
    "k2": ("k2", None, None),
    "low_var_kl": ("k3", 10.0, 20.0),
    "k3": ("k3", 10.0, 20.0),
}
_WHITEN_EPS = 1e-8  # veRL's masked_whiten: (x - mean) * rsqrt(var + 1e-8)


# --------------------------------------------------------------------------------------------
# loss aggregation: veRL's agg_loss as a factor on our (locally normalised) reductions
# --------------------------------------------------------------------------------------------
def _kernel_aggregates(
    loss_agg_mode: str, dp_size: int, batch_num_tokens, global_batch_size
) -> bool:
    """Whether our reductions (times ``_agg_factor``) give veRL's agg_loss for these options."""
    if loss_agg_mode not in REDUCTIONS:
        return False  # names veRL rejects: its own function says so
    if dp_size > 1 and loss_agg_mode != "token-sum":  # veRL raises without the global count
        needed = batch_num_tokens if loss_agg_mode == "token-mean" else global_batch_size
        return needed is not None
    return True


def _agg_factor(
    mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
) -> torch.Tensor | None:
    """f with veRL agg_loss(l, mask, mode, ...) == f * rlhf_kernels' reduction of l (None: 1).

    Ours divides by max(local count, 1), veRL by the global count (default: the local one) times
    1 / dp_size; "seq-mean-token-sum-norm" is ours sum / T and veRL's sum / n_seq / scale.
    """
    local_default = dp_size == 1 and batch_num_tokens is None and global_batch_size is None
    if loss_agg_mode != "seq-mean-token-sum-norm" and local_default:
        return None
    if loss_agg_mode == "token-sum":  # veRL: sum * dp_size (DDP averages over the ranks)
        return torch.tensor(float(dp_size), device=mask.device)
    valid = (mask != 0).to(torch.float32)
    if loss_agg_mode == "token-mean":
        local = valid.sum().clamp_min(1)
        global_count = local if batch_num_tokens is None else batch_num_tokens
        return local * dp_size / global_count
    rows = (valid.sum(-1) > 0).to(torch.float32).sum().clamp_min(1)
    global_rows = rows if global_batch_size is None else global_batch_size
    factor = rows * dp_size / global_rows
    if loss_agg_mode == "seq-mean-token-sum-norm":
        horizon = mask.shape[-1]
        scale = horizon if loss_scale_factor is None else loss_scale_factor
        # ours: sum / horizon; veRL: sum / rows / scale
        factor = horizon * dp_size / (global_rows * scale)
    return factor


def _scaled(loss: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    return loss if factor is None else loss * factor


# --------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------
def _carry_from_next_valid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(..., T) -> x at the nearest valid position at or after each t (0 when there is none)."""
    T = x.shape[-1]
    positions = torch.arange(T, device=x.device).expand(x.shape)
    nearest = torch.where(valid, positions, torch.full_like(positions, T))
    nearest = nearest.flip(-1).cummin(-1).values.flip(-1)
    padded = torch.cat([x, x.new_zeros(x.shape[:-1] + (1,))], dim=-1)
    return padded.gather(-1, nearest)


@dropin
def compute_gae_advantage_return(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float | torch.Tensor,
    lam: float | torch.Tensor,
    *,
    keep_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """veRL's GAE: rewards, values, response_mask (B, T) -> (whitened advantages, returns)
    (B, T) in veRL's dtype (the promotion of the three inputs; fp32 with ``keep_fp32``), no
    gradient. Masked positions are skipped; they hold the running advantage (veRL's convention)
    in both outputs. Fewer than 2 valid tokens: veRL's own (it raises)."""
    with torch.no_grad():
        valid = response_mask != 0
        n_valid = valid.sum()
        # veRL's masked_var raises for fewer than 2 tokens (let it say so); a gamma or lam
        # outside [0, 1] veRL computes with, where the op refuses it
        if int(n_valid) < 2 or not (in_unit_interval(gamma) and in_unit_interval(lam)):
            return original(_CORE, "compute_gae_advantage_return")(
                token_level_rewards, values, response_mask, gamma, lam
            )
        advantages, _ = gae(token_level_rewards, values, response_mask, float(gamma), float(lam))
        advantages = _carry_from_next_valid(advantages, valid)
        returns = advantages + values
        # veRL's masked_whiten: mean and unbiased variance over valid tokens, applied everywhere.
        weights = valid.to(advantages.dtype)
        n = n_valid.to(advantages.dtype)
        mean = (advantages * weights).sum() / (n + 1e-8)
        var = ((advantages - mean) ** 2 * weights).sum() / (n + 1e-8) * (n / (n - 1))
        advantages = (advantages - mean) * torch.rsqrt(var + _WHITEN_EPS)
    dtype = promoted(token_level_rewards, values, response_mask)
    return finish(advantages, dtype, keep_fp32), finish(returns, dtype, keep_fp32)


# --------------------------------------------------------------------------------------------
# Critic-free (outcome-reward) advantage estimators: one score per response, groups by prompt
# --------------------------------------------------------------------------------------------
def _group_ids(index: Any, batch: int, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """veRL's ``index`` (one prompt uid per response: a numpy array of strings in veRL, or any
    sequence / tensor of hashable labels) -> (group ids (B,) int64 on ``device``, the size of
    each response's group (B,) on the host).

    Labels are grouped by equality, as veRL's dict-based estimators group them (a tensor's
    elements by value). Done once on the host: B is at most a few thousand.
    """
    labels = index.tolist() if hasattr(index, "tolist") else list(index)
    if not isinstance(labels, list) or len(labels) != batch:
        count = len(labels) if isinstance(labels, list) else 1
        raise ValueError(
            f"index must hold one prompt id per response: got {count} id(s) for {batch} "
            f"responses (token_level_rewards has {batch} rows)"
        )
    first_seen: dict[Any, int] = {}
    try:
        ids = np.array([first_seen.setdefault(label, len(first_seen)) for label in labels],
                       dtype=np.int64)
    except TypeError as err:
        raise TypeError(f"index must hold hashable prompt ids (e.g. uid strings): {err}") from err
    sizes = np.bincount(ids)[ids] if batch else ids
    return torch.from_numpy(ids).to(device), sizes


def _scores(token_level_rewards: torch.Tensor) -> torch.Tensor:
    """One score per response: the sum of its token rewards over every position (veRL sums all
    positions), accumulated in fp32 at least."""
    return token_level_rewards.sum(-1, dtype=promoted(token_level_rewards, torch.float32))


def _adv_dtype(token_level_rewards: torch.Tensor, *others) -> torch.dtype:
    """veRL's advantage dtype: the promotion of the rewards and the others, widened as its
    row sums of the rewards (or whitening sums) are under autocast (fp32 under CUDA's)."""
    return widened_under_autocast(promoted(token_level_rewards, *others),
                                  token_level_rewards.device, autocast_sum)


def _broadcast(per_sequence: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, T): the value on every valid token, 0 elsewhere."""
    return per_sequence.unsqueeze(-1) * (response_mask != 0).to(per_sequence.dtype)


def _grpo_covers(epsilon, norm_adv_by_std_in_grpo) -> bool:
    """veRL adds epsilon to the std only when it divides by it; the op takes a finite epsilon
    >= 0 (veRL computes with any: NaN, inf, a negative one)."""
    if not norm_adv_by_std_in_grpo:
        return True
    return nonnegative(epsilon) and float(epsilon) < float("inf")


def _grpo(token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo):
    if not norm_adv_by_std_in_grpo:
        epsilon = 0.0  # unused without the division (veRL reads it only there)
    with torch.no_grad():
        scores = _scores(token_level_rewards)
        ids, _ = _group_ids(index, scores.shape[0], scores.device)
        # veRL: a group of one has mean 0 and std 1; "grpo" keeps that with or without the std.
        per_seq = group_advantages(scores, group_ids=ids, estimator="grpo",
                                   norm="group" if norm_adv_by_std_in_grpo else "none",
                                   eps=epsilon)
        return _broadcast(per_seq, response_mask)


@dropin
def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
    *,
    keep_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """veRL's GRPO ("grpo"): token_level_rewards, response_mask (B, T), index (B,) prompt uids
    -> (advantages, advantages) (B, T): score = sum of the row's rewards, A = (score - group
    mean) / (unbiased group std + epsilon) (no division without norm_adv_by_std_in_grpo) on
    every valid token, 0 on masked ones; a group of one has mean 0, std 1. veRL's dtype (the
    promotion of rewards and mask; fp32 with ``keep_fp32``), no gradient."""
    if not _grpo_covers(epsilon, norm_adv_by_std_in_grpo):
        return original(_CORE, "compute_grpo_outcome_advantage")(
            token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo, config)
    adv = _grpo(token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo)
    adv = finish(adv, _adv_dtype(token_level_rewards, response_mask), keep_fp32)
    return adv, adv


@dropin
def compute_grpo_vectorized_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
    *,
    keep_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """veRL's "grpo_vectorized": the values of ``compute_grpo_outcome_advantage``; dtype at
    least fp32 (veRL's group statistics are fp32)."""
    if not _grpo_covers(epsilon, norm_adv_by_std_in_grpo):
        return original(_CORE, "compute_grpo_vectorized_outcome_advantage")(
            token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo, config)
    adv = _grpo(token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo)
    adv = finish(adv, _adv_dtype(token_level_rewards, torch.float32, response_mask), keep_fp32)
    return adv, adv


def _rloo(token_level_rewards, response_mask, index, singleton_keeps_score):
    with torch.no_grad():
        scores = _scores(token_level_rewards)
        ids, sizes = _group_ids(index, scores.shape[0], scores.device)
        per_seq = group_advantages(scores, group_ids=ids, estimator="rloo")
        if singleton_keeps_score and (sizes == 1).any():
            alone = torch.from_numpy(sizes == 1).to(scores.device)
            per_seq = torch.where(alone, scores.to(per_seq.dtype), per_seq)
        return _broadcast(per_seq, response_mask)


@dropin
def compute_rloo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    config: Any = None,
    *,
    keep_fp32: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """veRL's RLOO ("rloo"): A = score - mean of the OTHER responses of the prompt, on every
    valid token; a response alone in its group keeps its score (veRL's loop leaves it
    unchanged). (B, T) in veRL's dtype (rewards and mask promoted), no gradient."""
    del epsilon, config, kwargs
    adv = _rloo(token_level_rewards, response_mask, index, singleton_keeps_score=True)
    adv = finish(adv, _adv_dtype(token_level_rewards, response_mask), keep_fp32)
    return adv, adv


@dropin
def compute_rloo_vectorized_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    config: Any = None,
    *,
    keep_fp32: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """veRL's "rloo_vectorized": as ``compute_rloo_outcome_advantage`` except that a response
    alone in its group gets 0 (veRL's vectorized form). Dtype: veRL's, which goes through
    ``torch.bincount`` weights (fp32 for fp32 row scores, fp64 for every other dtype)."""
    del epsilon, config, kwargs
    adv = _rloo(token_level_rewards, response_mask, index, singleton_keeps_score=False)
    # the weights take the dtype of the row scores (the rewards' sums: fp32 under CUDA's
    # autocast, whatever the rewards)
    scores = _adv_dtype(token_level_rewards)
    bincount = torch.float32 if scores == torch.float32 else torch.float64
    adv = finish(adv, promoted(scores, bincount, response_mask), keep_fp32)
    return adv, adv


def _whiten_over_valid(x: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """veRL's masked_whiten(x, mask) * mask: mean and unbiased variance over the valid tokens,
    (x - mean) * rsqrt(var + 1e-8) on valid tokens, 0 on masked ones."""
    return masked_whiten(x, response_mask, shift_mean=True, unbiased=True, eps=_WHITEN_EPS)


@dropin
def compute_reinforce_plus_plus_baseline_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    config: Any = None,
    *,
    keep_fp32: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """veRL's "reinforce_plus_plus_baseline": score - group mean (a group of one: mean 0) on
    every valid token, then whitened over all valid tokens of the batch. (B, T) in veRL's dtype
    (rewards and mask promoted), no gradient. Fewer than 2 valid tokens: veRL's own function
    (its whitening raises)."""
    del epsilon, config, kwargs
    with torch.no_grad():
        if int((response_mask != 0).sum()) < 2:
            return original(_CORE, "compute_reinforce_plus_plus_baseline_outcome_advantage")(
                token_level_rewards, response_mask, index)
        scores = _scores(token_level_rewards)
        ids, _ = _group_ids(index, scores.shape[0], scores.device)
        centred = group_advantages(scores, group_ids=ids, estimator="grpo", norm="none")
        adv = _whiten_over_valid(_broadcast(centred, response_mask), response_mask)
    adv = finish(adv, _adv_dtype(token_level_rewards, response_mask), keep_fp32)
    return adv, adv


@dropin
def compute_reinforce_plus_plus_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any = None,
    *,
    keep_fp32: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """veRL's "reinforce_plus_plus": returns G_t = r_t + gamma * G_next over the valid tokens
    (masked positions skipped and set to 0; gamma = config.gamma), advantages = the returns
    whitened over all valid tokens. -> (advantages (B, T) in the promotion of rewards and mask,
    returns (B, T) in the rewards' dtype; fp32 with ``keep_fp32``), no gradient. Without a
    config or with fewer than 2 valid tokens: veRL's own function (it raises)."""
    del kwargs
    with torch.no_grad():
        if (config is None or int((response_mask != 0).sum()) < 2
                or not in_unit_interval(_config_value(config, "gamma", None))):
            return original(_CORE, "compute_reinforce_plus_plus_outcome_advantage")(
                token_level_rewards, response_mask, config)
        # GAE with values 0 and lambda 1 is the discounted return, skipping masked positions.
        returns, _ = gae(token_level_rewards, torch.zeros_like(token_level_rewards),
                         response_mask, float(config.gamma), 1.0)
        adv = _whiten_over_valid(returns, response_mask)
    return (finish(adv, promoted(token_level_rewards, response_mask), keep_fp32),
            finish(returns, token_level_rewards.dtype, keep_fp32))


# --------------------------------------------------------------------------------------------
# KL penalty
# --------------------------------------------------------------------------------------------
@dropin
def kl_penalty(
    logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str, *, keep_fp32: bool = False
) -> torch.Tensor:
    """veRL's per-token KL estimate: logprob, ref_logprob (...) -> (...) in the promotion of the
    two dtypes, as veRL (fp32 with ``keep_fp32``), differentiable.

    kl_penalty: "kl"/"k1", "abs", "mse"/"k2", "low_var_kl"/"k3", optionally with a "+" suffix
    (value of that estimator, gradient of k2: straight-through). Other modes: veRL's own.
    """
    mode = kl_penalty
    base = mode[:-1] if mode.endswith("+") else mode
    if base not in _KL_MODES:
        return original(_CORE, "kl_penalty")(logprob, ref_logprob, mode)
    estimator, clamp, log_ratio_clamp = _KL_MODES[base]
    value = kl_estimate(logprob, ref_logprob, estimator, clamp, log_ratio_clamp)
    if mode.endswith("+") and mode not in ("mse", "k2"):
        # Straight-through: the forward value of the chosen estimator, the gradient of k2.
        k2 = kl_estimate(logprob, ref_logprob, "k2")
        value = k2 - k2.detach() + value.detach()
    ops = _KL_AUTOCAST_OPS.get(base, ())
    if mode.endswith("+"):
        ops = (*ops, _square)  # the straight-through k2
    dtype = widened_under_autocast(promoted(logprob, ref_logprob), logprob.device, *ops)
    return finish(value, dtype, keep_fp32)


def _square(t: torch.Tensor) -> torch.Tensor:
    return t.square()


# The ops of veRL's KL estimators that autocast may run in fp32 (widened_under_autocast): k3's
# exp of the clamped log-ratio, k2's square (torch's pow); k1 and abs have none.
_KL_AUTOCAST_OPS = {"low_var_kl": (torch.exp,), "k3": (torch.exp,), "mse": (_square,),
                    "k2": (_square,)}


# --------------------------------------------------------------------------------------------
# Policy and value losses
# --------------------------------------------------------------------------------------------
def _config_value(config: Any, name: str, default: Any) -> Any:
    getter = getattr(config, "get", None)
    if callable(getter):
        return getter(name, default)
    return getattr(config, name, default)


def _loss_dtype(loss_agg_mode: str, *tensors: torch.Tensor) -> torch.dtype:
    """veRL's loss dtype: its inputs' promotion, and fp32 at least in the seq-mean modes (agg_loss
    builds the sequence mask with ``.float()``), widened as agg_loss's sum is under autocast."""
    dtype = promoted(*tensors)
    if loss_agg_mode not in ("token-mean", "token-sum"):
        dtype = torch.promote_types(dtype, torch.float32)
    # agg_loss sums: under autocast the sum may run in fp32 (CUDA's)
    device = next(t.device for t in tensors if isinstance(t, torch.Tensor))
    return widened_under_autocast(dtype, device, autocast_sum)


def _masked_mean_dtype(mask: torch.Tensor, *values: torch.Tensor) -> torch.dtype:
    """The dtype of veRL's ``masked_mean(x, mask)`` (a masked sum over ``mask.sum() + 1e-8``):
    the values' promotion with a floating mask's dtype, or with fp32 for a bool / integer mask
    (its count plus 1e-8 is an fp32 scalar), widened as the sums are under autocast."""
    count = mask if mask.is_floating_point() else torch.float32
    return widened_under_autocast(promoted(*values, count), mask.device, autocast_sum)


def _policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high,
                 clip_ratio_c, loss_agg_mode, global_batch_info, keep_fp32, weights=None,
                 callers_old=None, **options):
    """ppo_policy_loss with veRL's aggregation and dtype (``weights``: the rollout correction
    weights, already in ``advantages``, for the dtype only; ``callers_old``: the caller's old
    log-probs where ``old_log_prob`` is derived from them, e.g. GSPO's fp32 shifted ones, for the
    dtype only); ``options``: the op's ratio_level, loss_type, log_ratio_clamp (default 20,
    veRL's token log-ratio clamp)."""
    options.setdefault("log_ratio_clamp", 20.0)
    loss, stats = ppo_policy_loss(
        log_prob, old_log_prob, advantages, response_mask,
        clip_low=clip_low, clip_high=clip_high, dual_clip=clip_ratio_c,
        reduction=loss_agg_mode, **options,
    )
    loss = _scaled(loss, _agg_factor(response_mask, loss_agg_mode, **global_batch_info))
    dtype = _loss_dtype(loss_agg_mode, log_prob,
                        old_log_prob if callers_old is None else callers_old, advantages,
                        response_mask, weights)
    return finish(loss, dtype, keep_fp32), stats


def _aggregation_options(config: Any, loss_agg_mode: str, rollout_is_weights, advantages):
    """(global_batch_info, covered): covered when there is a config, rollout correction weights
    are absent or of the advantages' shape and never negative, and ``_agg_factor`` converts the
    aggregation.

    The weights go into the advantages (``weighted_advantages``), exact for weights >= 0 only:
    veRL's own are truncated ratios (>= 0), but a caller's weight w < 0 would give
    min(r wA, c wA) where veRL computes w min(rA, cA), so such a call is veRL's (one host check
    of the weights; these losses fetch their metrics to the host anyway)."""
    global_batch_info = dict(_config_value(config, "global_batch_info", None) or {})
    covered = (
        config is not None
        and (rollout_is_weights is None or rollout_is_weights.shape == advantages.shape)
        and set(global_batch_info) <= {"dp_size", "batch_num_tokens", "global_batch_size",
                                       "loss_scale_factor"}
        and _kernel_aggregates(loss_agg_mode, global_batch_info.get("dp_size", 1),
                               global_batch_info.get("batch_num_tokens"),
                               global_batch_info.get("global_batch_size"))
    )
    if covered and rollout_is_weights is not None:
        covered = not bool((rollout_is_weights.detach() < 0).any())
    return global_batch_info, covered


def _actor_options(config: Any, loss_agg_mode: str, rollout_is_weights, advantages):
    """(clip_low, clip_high, global_batch_info, covered) read from veRL's actor config as its
    policy losses read them; covered: whether the kernels compute this call (a config with both
    clip ranges, and ``_aggregation_options``' conditions)."""
    global_batch_info, covered = _aggregation_options(config, loss_agg_mode, rollout_is_weights,
                                                      advantages)
    clip_ratio = getattr(config, "clip_ratio", None)
    clip_low = getattr(config, "clip_ratio_low", None)
    clip_high = getattr(config, "clip_ratio_high", None)
    clip_low = clip_ratio if clip_low is None else clip_low
    clip_high = clip_ratio if clip_high is None else clip_high
    # a negative or NaN clip range: veRL computes with it, the op would refuse it
    covered = covered and nonnegative(clip_low) and nonnegative(clip_high)
    return clip_low, clip_high, global_batch_info, covered


def _vanilla_clip_fractions(old_log_prob, log_prob, advantages, response_mask, clip_low,
                            clip_high, clip_ratio_c):
    """veRL's pg_clipfrac and pg_clipfrac_lower, counted on the unweighted advantages as veRL
    counts them (the op, given A x w, would not count a token whose weight is 0)."""
    with torch.no_grad():
        mask = (response_mask != 0).to(torch.float32)
        work = promoted(log_prob, old_log_prob, advantages, torch.float32)
        ratio = torch.exp((log_prob.detach().to(work) - old_log_prob.to(work)).clamp(-20.0, 20.0))
        a = advantages.to(work)
        loss1, loss2 = -a * ratio, -a * ratio.clamp(1 - clip_low, 1 + clip_high)
        clipped = (loss2 > loss1).to(torch.float32)
        lower = ((torch.maximum(loss1, loss2) > -a * clip_ratio_c) & (a < 0)).to(torch.float32)
        count = mask.sum().clamp_min(1.0)
        return torch.stack([(clipped * mask).sum() / count, (lower * mask).sum() / count])


@dropin
def compute_policy_loss_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    *,
    keep_fp32: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """veRL's "vanilla" clipped PPO loss (dual clip with config.clip_ratio_c, default 3).

    (B, T) tensors -> (pg_loss () in veRL's dtype, {"actor/pg_clipfrac", "actor/ppo_kl",
    "actor/pg_clipfrac_lower"} floats). Reads clip_ratio, clip_ratio_low / _high,
    clip_ratio_c and global_batch_info from ``config``, as veRL does.
    """
    advantages = broadcast_advantages(advantages, log_prob)
    clip_low, clip_high, global_batch_info, covered = _actor_options(
        config, loss_agg_mode, rollout_is_weights, advantages)
    clip_ratio_c = _config_value(config, "clip_ratio_c", 3.0) if config is not None else 3.0
    if not (covered and clip_ratio_c > 1.0):
        return original(_CORE, "compute_policy_loss_vanilla")(
            old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
            rollout_is_weights,
        )
    weighted = weighted_advantages(advantages, rollout_is_weights)
    loss, stats = _policy_loss(old_log_prob, log_prob, weighted, response_mask, clip_low,
                               clip_high, clip_ratio_c, loss_agg_mode, global_batch_info,
                               keep_fp32, weights=rollout_is_weights)
    if rollout_is_weights is None:
        fractions = torch.stack([stats["clipfrac"], stats["dual_clipfrac"]])
    else:
        fractions = _vanilla_clip_fractions(old_log_prob, log_prob, advantages, response_mask,
                                            clip_low, clip_high, clip_ratio_c)
    clipfrac, ppo_kl, lower = torch.cat([fractions[:1], stats["ppo_kl"].reshape(1).to(
        fractions.dtype), fractions[1:]]).tolist()
    metrics = {
        "actor/pg_clipfrac": clipfrac,
        "actor/ppo_kl": ppo_kl,
        "actor/pg_clipfrac_lower": lower,
    }
    return loss, metrics


@dropin
def compute_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange: float | None = None,
    cliprange_low: float | None = None,
    cliprange_high: float | None = None,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
    *,
    keep_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """veRL's older (deprecated) policy-loss entry point: (B, T) tensors -> (pg_loss,
    pg_clipfrac, ppo_kl, pg_clipfrac_lower), () tensors in veRL's dtypes (the clip fractions at
    least fp32; fp32 with ``keep_fp32``)."""
    advantages = broadcast_advantages(advantages, log_prob)
    clip_low = cliprange if cliprange_low is None else cliprange_low
    clip_high = cliprange if cliprange_high is None else cliprange_high
    if (not (nonnegative(clip_low) and nonnegative(clip_high)) or not clip_ratio_c > 1.0
            or not _kernel_aggregates(loss_agg_mode, 1, None, None)):
        return original(_CORE, "compute_policy_loss")(
            old_log_prob, log_prob, advantages, response_mask, cliprange, cliprange_low,
            cliprange_high, clip_ratio_c, loss_agg_mode,
        )
    loss, stats = _policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_low,
                               clip_high, clip_ratio_c, loss_agg_mode, {}, keep_fp32)
    frac_dtype = promoted(torch.float32, response_mask)
    kl_dtype = _masked_mean_dtype(response_mask, log_prob, old_log_prob)
    return (loss, finish(stats["clipfrac"], frac_dtype, keep_fp32),
            finish(stats["ppo_kl"], kl_dtype, keep_fp32),
            finish(stats["dual_clipfrac"], frac_dtype, keep_fp32))


_GSPO_LOG_RATIO_CLAMP = 10.0  # veRL bounds the sequence log-ratio by +10 (from above only)


def _gspo_row_stats(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high):
    """Detached facts of veRL's GSPO: (row mean log-ratio (B,) fp32, and one stacked tensor for
    a single host sync: pg_clipfrac, ppo_kl, whether a row's mean is above +10, whether one is
    below -10). Counted as veRL counts them: the row mean over the mask, the clip fraction of
    the ratio bounded by +10 and of the unweighted advantages, ppo_kl the masked mean of
    -(logp - old) without a clamp."""
    valid = response_mask != 0
    work = promoted(log_prob, old_log_prob, torch.float32)
    m = valid.to(work)
    d = torch.where(valid, log_prob.detach().to(work) - old_log_prob.detach().to(work),
                    torch.zeros((), dtype=work, device=m.device))
    n = m.sum(-1)
    row_mean = d.sum(-1) / n.clamp_min(1)
    ratio = torch.exp(row_mean.clamp(max=_GSPO_LOG_RATIO_CLAMP))
    a = advantages.detach().to(work)
    a = a if a.dim() == 2 else a[:, None]
    loss1 = -a * ratio[:, None]
    loss2 = -a * ratio.clamp(1 - clip_low, 1 + clip_high)[:, None]
    count = m.sum().clamp_min(1)
    clipfrac = ((loss2 > loss1).to(work) * m).sum() / count
    ppo_kl = -d.sum() / count
    has = n > 0
    high = ((row_mean > _GSPO_LOG_RATIO_CLAMP) & has).any().to(work)
    low = ((row_mean < -_GSPO_LOG_RATIO_CLAMP) & has).any().to(work)
    return row_mean, torch.stack([clipfrac, ppo_kl, high, low])


@dropin
def compute_policy_loss_gspo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    *,
    keep_fp32: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """veRL's GSPO loss (POLICY_LOSS_REGISTRY["gspo"]) in its GSPO-token form: every token of a
    row takes the row's ratio s = exp(min(mean over valid tokens of logp - old, 10)) as its
    value and the gradient of its own log-prob (log s_t = sg(log s) + logp_t - sg(logp_t)),
    clipped to [1 - clip_ratio_low, 1 + clip_ratio_high]; no dual clip; times the rollout
    correction weights; aggregated with ``loss_agg_mode`` and config.global_batch_info, as
    veRL 0.9.1's GSPO (its default argument is "seq-mean-token-mean"; veRL's actor passes
    config.loss_agg_mode).

    (B, T) tensors -> (pg_loss () in veRL's dtype, {"actor/pg_clipfrac", "actor/ppo_kl",
    "actor/pg_clipfrac_lower" (0)} floats). That is the token-level clipped loss against
    shifted old log-probs old'_t = sg(logp_t) - mean log-ratio of the row, whose ratio
    exp(logp_t - old'_t) has exactly that value and gradient: ``rlhf_kernels.ppo_policy_loss``
    at token level computes it for any advantages (per token or per row) and rollout weights
    (in the advantages: ``weighted_advantages``, exact for weights >= 0), with the +10 bound as
    its log-ratio clamp where a row reaches it. veRL leaves the row mean unbounded below, so a
    call with one row above +10 and another below -10 (the op's clamp is symmetric) is computed
    by veRL's own function; the check rides on the host sync that the float metrics need
    anyway.
    """
    advantages = broadcast_advantages(advantages, log_prob)
    clip_low, clip_high, global_batch_info, covered = _actor_options(
        config, loss_agg_mode, rollout_is_weights, advantages)

    def theirs():
        return original(_CORE, "compute_policy_loss_gspo")(
            old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
            rollout_is_weights,
        )

    if not covered:
        return theirs()
    with torch.no_grad():
        row_mean, facts = _gspo_row_stats(old_log_prob, log_prob, advantages, response_mask,
                                          clip_low, clip_high)
    clipfrac, ppo_kl, high, low = facts.tolist()
    if high and low:
        return theirs()
    shifted_old = log_prob.detach().to(row_mean.dtype) - row_mean[:, None]
    loss, _ = _policy_loss(shifted_old, log_prob, weighted_advantages(advantages,
                                                                      rollout_is_weights),
                           response_mask, clip_low, clip_high, None, loss_agg_mode,
                           global_batch_info, keep_fp32, weights=rollout_is_weights,
                           callers_old=old_log_prob,
                           log_ratio_clamp=_GSPO_LOG_RATIO_CLAMP if high else None)
    metrics = {"actor/pg_clipfrac": clipfrac, "actor/ppo_kl": ppo_kl,
               "actor/pg_clipfrac_lower": 0.0}
    return loss, metrics


@dropin
def compute_policy_loss_cispo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    *,
    keep_fp32: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """veRL's CISPO loss (POLICY_LOSS_REGISTRY["cispo"]): per token -sg(clip(r)) * A * logp
    with r = exp(clamp(logp - old, +-20)) clipped to [1 - clip_ratio_low, 1 + clip_ratio_high]
    and no gradient through the weight (rlhf_kernels.ppo_policy_loss, loss_type="cispo").

    (B, T) tensors -> (pg_loss () in veRL's dtype, {"actor/pg_clipfrac" (fraction of valid
    tokens whose ratio is outside the range), "actor/ppo_kl", "actor/pg_clipfrac_lower" (0)}
    floats).
    """
    advantages = broadcast_advantages(advantages, log_prob)
    clip_low, clip_high, global_batch_info, covered = _actor_options(
        config, loss_agg_mode, rollout_is_weights, advantages)
    if not covered:
        return original(_CORE, "compute_policy_loss_cispo")(
            old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
            rollout_is_weights,
        )
    weighted = weighted_advantages(advantages, rollout_is_weights)
    loss, stats = _policy_loss(old_log_prob, log_prob, weighted, response_mask, clip_low,
                               clip_high, None, loss_agg_mode, global_batch_info, keep_fp32,
                               weights=rollout_is_weights,
                               loss_type="cispo")
    clipfrac, ppo_kl = torch.stack([stats["clipfrac"], stats["ppo_kl"]]).tolist()
    metrics = {"actor/pg_clipfrac": clipfrac, "actor/ppo_kl": ppo_kl,
               "actor/pg_clipfrac_lower": 0.0}
    return loss, metrics


_SAPO_AGGREGATION = "seq-mean-token-mean"  # veRL 0.9.1's SAPO ignores loss_agg_mode


def _sapo_temperature(config: Any, name: str, dtype: torch.dtype) -> float | None:
    """config.tau_pos / tau_neg as veRL uses it (a tensor in the advantages' dtype), or None
    when it is not a finite number > 0 (the op's range: veRL's own function takes the call)."""
    value = _config_value(config, name, None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(torch.tensor(float(value), dtype=dtype))  # veRL: as_tensor(tau, A's dtype)
    return value if 0.0 < value < float("inf") else None


@dropin
def compute_policy_loss_sapo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    *,
    keep_fp32: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """veRL's SAPO loss (POLICY_LOSS_REGISTRY["sapo"]): per token -sigmoid(tau (r - 1)) 4 / tau
    A with r = exp(clamp(logp - old, +-20)) and tau = config.tau_pos where A > 0, config.tau_neg
    elsewhere (rlhf_kernels.ppo_policy_loss, loss_type="sapo"), times ``rollout_is_weights``;
    always aggregated "seq-mean-token-mean" with config.global_batch_info, whatever
    ``loss_agg_mode`` says, as veRL 0.9.1's.

    (B, T) tensors -> (pg_loss () in veRL's dtype, {"actor/pg_clipfrac" (0),
    "actor/ppo_kl", "actor/pg_clipfrac_lower" (0)} floats): SAPO clips nothing, and veRL
    reports 0 for both clip fractions. A config whose temperatures are not finite numbers > 0
    goes to veRL's own function.
    """
    advantages = broadcast_advantages(advantages, log_prob)
    global_batch_info, covered = _aggregation_options(config, _SAPO_AGGREGATION,
                                                      rollout_is_weights, advantages)
    tau_pos = _sapo_temperature(config, "tau_pos", advantages.dtype) if covered else None
    tau_neg = _sapo_temperature(config, "tau_neg", advantages.dtype) if covered else None
    if tau_pos is None or tau_neg is None:
        return original(_CORE, "compute_policy_loss_sapo")(
            old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
            rollout_is_weights,
        )
    weighted = weighted_advantages(advantages, rollout_is_weights)
    loss, stats = _policy_loss(old_log_prob, log_prob, weighted, response_mask, 0.2, 0.2, None,
                               _SAPO_AGGREGATION, global_batch_info, keep_fp32,
                               weights=rollout_is_weights, loss_type="sapo",
                               sapo_tau_pos=tau_pos, sapo_tau_neg=tau_neg)
    metrics = {"actor/pg_clipfrac": 0.0, "actor/ppo_kl": stats["ppo_kl"].item(),
               "actor/pg_clipfrac_lower": 0.0}
    return loss, metrics


@dropin
def compute_value_loss(
    vpreds: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
    dp_size: int = 1,
    batch_num_tokens: int | None = None,
    global_batch_size: int | None = None,
    loss_scale_factor: int | None = None,
    *,
    keep_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """veRL's clipped value loss: vpreds, returns, values (old), response_mask (B, T)
    -> (vf_loss (), vf_clipfrac ()) in veRL's dtypes (fp32 with ``keep_fp32``); gradient to
    ``vpreds``."""
    if not nonnegative(cliprange_value) or not _kernel_aggregates(
        loss_agg_mode, dp_size, batch_num_tokens, global_batch_size
    ):
        return original(_CORE, "compute_value_loss")(
            vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode, dp_size,
            batch_num_tokens, global_batch_size, loss_scale_factor,
        )
    loss, _ = ppo_value_loss(vpreds, values, returns, response_mask, clip=cliprange_value,
                             reduction=loss_agg_mode)
    factor = _agg_factor(response_mask, loss_agg_mode, dp_size, batch_num_tokens,
                         global_batch_size, loss_scale_factor)
    dtype = _loss_dtype(loss_agg_mode, vpreds, returns, values, response_mask)
    clipfrac = _value_clipfrac(vpreds, returns, values, response_mask, cliprange_value)
    return (finish(_scaled(loss, factor), dtype, keep_fp32),
            finish(clipfrac, promoted(torch.float32, response_mask), keep_fp32))


def _value_clipfrac(vpreds, returns, values, response_mask, cliprange_value) -> torch.Tensor:
    """veRL's vf_clipfrac: the share of valid tokens where the prediction clamped into
    ``values +- cliprange_value`` has the larger squared error. The op's clipfrac clips as
    ``old + clamp(v - old)`` (OpenRLHF's form), which can land an ulp away from an unclipped v
    (v = -0.0221, old = 0.1632 in fp32) and then counts that token as clipped; veRL's clamp
    returns v itself. Elementwise on (B, T), no host sync."""
    with torch.no_grad():
        v = vpreds.detach()
        clipped = torch.maximum(torch.minimum(v, values + cliprange_value),
                                values - cliprange_value)
        over = (clipped - returns) ** 2 > (v - returns) ** 2
        valid = response_mask != 0
        # the kernels' precision (what keep_fp32 returns): fp64 for fp64 inputs, else fp32
        wide = any(t.dtype == torch.float64 for t in (vpreds, returns, values))
        dtype = torch.float64 if wide else torch.float32
        return (over & valid).sum(dtype=dtype) / valid.sum(dtype=dtype).clamp_min(1)


# --------------------------------------------------------------------------------------------
# log-probabilities and entropy (verl.utils.torch_functional)
# --------------------------------------------------------------------------------------------
def _verl_uses_flash_ce(logits: torch.Tensor) -> bool:
    """Whether veRL 0.9.1's logprobs_from_logits would take flash-attn's cross entropy (which
    returns fp32) for these logits; its PyTorch path returns the logits' dtype. veRL's
    condition: its import of flash-attn's cross entropy succeeded (not merely flash-attn
    installed) and VERL_DISABLE_FLASH_ATTN_CE is not "1"; and CUDA logits, the only ones that
    kernel takes."""
    return (
        logits.device.type == "cuda"
        and os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") != "1"
        and flash_attn_cross_entropy_imports()
    )


@dropin
def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inplace_backward: bool = True,
    *,
    keep_fp32: bool = False,
) -> torch.Tensor:
    """logits (..., V), labels with one label per row of logits (any shape, e.g. (1, N) for
    (N, V) logits, as veRL's flash-attn path reshapes both) -> logp ``logits.shape[:-1]``, fp32
    where veRL would use flash-attn's cross entropy and otherwise the dtype of veRL's
    log-softmax: the logits' dtype, or fp32 for bf16 / fp16 logits under CUDA's autocast, where
    veRL's engines call it (fp32 with ``keep_fp32``). Labels equal to -100 give 0 (as
    flash-attn). ``inplace_backward`` writes d logits into the logits buffer, as flash-attn's
    does, only where veRL would take flash-attn's cross entropy: on its PyTorch path veRL
    ignores the flag and the logits keep their values (another op may have saved them for its
    backward). It is also turned off for a leaf tensor that requires grad or a view of one (the
    backward would overwrite the leaf's data). A DTensor (logits sharded under tensor
    parallelism) goes to veRL's own function."""
    if is_dtensor(logits):
        return original(_TORCH_F, "logprobs_from_logits")(logits, labels, inplace_backward)
    rows = logits.shape[:-1]
    if labels.shape != rows:
        if labels.numel() != rows.numel():
            raise ValueError(
                f"labels has shape {tuple(labels.shape)} ({labels.numel()} labels) but logits has "
                f"shape {tuple(logits.shape)} ({rows.numel()} rows of {logits.shape[-1]} logits); "
                f"logprobs_from_logits needs one label per row of logits"
            )
        labels = labels.reshape(rows)
    flash_ce = _verl_uses_flash_ce(logits)
    inplace = bool(inplace_backward) and flash_ce and not is_or_views_a_grad_leaf(logits)
    logp = logprobs(logits, labels, inplace_backward=inplace, backend=exact_backend(logits))
    # veRL's PyTorch path: a log-softmax, fp32 under CUDA's autocast (veRL's engines run it there)
    dtype = torch.float32 if flash_ce else dtype_under_autocast(log_softmax_last, logits)
    return finish(logp, dtype, keep_fp32)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    _, entropy = logprobs(logits, labels, return_entropy=True, check_labels=False,
                          backend=exact_backend(logits))
    return entropy


@dropin
def entropy_from_logits(logits: torch.Tensor, *, keep_fp32: bool = False) -> torch.Tensor:
    """Entropy of softmax(logits): (..., V) -> (...) in the logits' dtype, as veRL (fp32 with
    ``keep_fp32``; under autocast the dtype veRL's formula gets there, e.g. fp32 for bf16 logits
    under CUDA's autocast, where veRL's engines call it), differentiable. A DTensor goes to
    veRL's own function."""
    if is_dtensor(logits):
        return original(_TORCH_F, "entropy_from_logits")(logits)
    return finish(_entropy(logits), dtype_under_autocast(entropy_formula, logits), keep_fp32)


@dropin
def entropy_from_logits_with_chunking(
    logits: torch.Tensor, chunk_size: int = 2048, *, keep_fp32: bool = False
) -> torch.Tensor:
    """As ``entropy_from_logits`` but fp32 for every logits dtype, as veRL's (which accumulates
    into an fp32 buffer); ``chunk_size`` is accepted and unused (no chunking needed). A DTensor
    goes to veRL's own function."""
    if is_dtensor(logits):
        return original(_TORCH_F, "entropy_from_logits_with_chunking")(logits, chunk_size)
    return finish(_entropy(logits), torch.float32, keep_fp32)


# The drop-ins under the names veRL registers them by (ADV_ESTIMATOR_REGISTRY,
# POLICY_LOSS_REGISTRY; every function keeps its veRL name in core_algos too). patch_verl puts
# them in veRL's registries; without veRL they are plain functions, looked up here by those names.
ADVANTAGE_ESTIMATORS = {
    "gae": compute_gae_advantage_return,
    "grpo": compute_grpo_outcome_advantage,
    "grpo_vectorized": compute_grpo_vectorized_outcome_advantage,
    "rloo": compute_rloo_outcome_advantage,
    "rloo_vectorized": compute_rloo_vectorized_outcome_advantage,
    "reinforce_plus_plus": compute_reinforce_plus_plus_outcome_advantage,
    "reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline_outcome_advantage,
}
POLICY_LOSSES = {
    "vanilla": compute_policy_loss_vanilla,
    "gspo": compute_policy_loss_gspo,
    "cispo": compute_policy_loss_cispo,
    "sapo": compute_policy_loss_sapo,
}


def patch_verl(keep_fp32: bool = False) -> Patch:
    """Swap the drop-ins into ``verl.trainer.ppo.core_algos`` / ``verl.utils.torch_functional``,
    into veRL's policy-loss and advantage-estimator registries, and into every loaded ``verl``
    module that imported them by name. Returns a ``Patch`` (``undo()`` or context manager);
    ``unpatch_verl()`` undoes every active one.

    keep_fp32: the patched functions return the kernels' fp32 results (fp64 for fp64 inputs)
    instead of veRL's dtype for the call.

    Run it in every process that computes losses: veRL's actor / critic workers are Ray
    processes, so call it from their setup (e.g. a worker_process_setup_hook), not only in
    the driver.
    """
    return apply_patch("veRL", "verl", _patch_targets(keep_fp32))


def _patch_targets(keep_fp32: bool) -> list[tuple[str, str, Any]]:
    """(module, attribute, drop-in) for every target of ``patch_verl``."""
    targets = [
        *((_CORE, fn) for fn in ADVANTAGE_ESTIMATORS.values()),
        *((_CORE, fn) for fn in POLICY_LOSSES.values()),
        (_CORE, kl_penalty),
        (_CORE, compute_policy_loss),
        (_CORE, compute_value_loss),
        (_TORCH_F, logprobs_from_logits),
        (_TORCH_F, entropy_from_logits),
        (_TORCH_F, entropy_from_logits_with_chunking),
    ]
    # the actor's fused lm head (use_fused_kernels, torch backend): rlhf_kernels.linear_logprobs
    fused_head = FusedLinearForPPOFunctionFP32 if keep_fp32 else FusedLinearForPPOFunction
    return ([(module, fn.__name__, bind_keep_fp32(fn) if keep_fp32 else fn)
             for module, fn in targets]
            + [(FUSED_LINEAR_MODULE, "FusedLinearForPPOFunction", fused_head)])
