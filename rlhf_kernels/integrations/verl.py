"""veRL drop-ins: GAE, KL penalty, clipped policy / value losses, log-probs and entropy.

Checked against veRL 0.9.1 (``verl.trainer.ppo.core_algos`` and ``verl.utils.torch_functional``);
same signatures and return values as veRL's:

    compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam)
        -> (advantages, returns)               GAE by the parallel scan (rlhf_kernels.gae)
    kl_penalty(logprob, ref_logprob, kl_penalty) -> kl          (rlhf_kernels.kl_penalty)
    compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask,
                                loss_agg_mode="token-mean", config=None, rollout_is_weights=None)
        -> (pg_loss, metrics)                  (rlhf_kernels.ppo_policy_loss, dual clip on)
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
* Outputs are fp32 (veRL's keep the inputs' dtype); masks are read as 0/1 (nonzero counts),
  where veRL multiplies by the mask's value; an all-masked micro-batch gives loss 0 (veRL: NaN).

Falls back to veRL's own function for: ``loss_agg_mode="token-sum"``, ``rollout_is_weights``,
a distributed call without the global counts veRL requires, KL modes other than
k1/k2/k3/abs (and their aliases / "+" forms), and arguments veRL itself rejects.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_kernels._checks import REDUCTIONS
from rlhf_kernels.integrations import Patch, apply_patch, dropin, original
from rlhf_kernels.ops.gae import gae
from rlhf_kernels.ops.kl import kl_penalty as kl_estimate
from rlhf_kernels.ops.logprobs import logprobs
from rlhf_kernels.ops.policy_loss import ppo_policy_loss
from rlhf_kernels.ops.value_loss import ppo_value_loss

__all__ = [
    "compute_gae_advantage_return",
    "compute_policy_loss",
    "compute_policy_loss_vanilla",
    "compute_value_loss",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "kl_penalty",
    "logprobs_from_logits",
    "patch_verl",
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
        return False  # "token-sum" and names veRL rejects
    if dp_size > 1:  # veRL raises without the global count of the mode
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """veRL's GAE: rewards, values, response_mask (B, T) -> (whitened advantages, returns)
    (B, T) fp32, no gradient. Masked positions are skipped; they hold the running advantage
    (veRL's convention) in both outputs. Fewer than 2 valid tokens: veRL's own (it raises)."""
    with torch.no_grad():
        valid = response_mask != 0
        n_valid = valid.sum()
        if int(n_valid) < 2:  # veRL's masked_var raises for these; let it say so
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
    return advantages, returns


# --------------------------------------------------------------------------------------------
# KL penalty
# --------------------------------------------------------------------------------------------
@dropin
def kl_penalty(
    logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str
) -> torch.Tensor:
    """veRL's per-token KL estimate: logprob, ref_logprob (...) -> (...) fp32, differentiable.

    kl_penalty: "kl"/"k1", "abs", "mse"/"k2", "low_var_kl"/"k3", optionally with a "+" suffix
    (value of that estimator, gradient of k2: straight-through). Other modes: veRL's own.
    """
    mode = kl_penalty
    base = mode[:-1] if mode.endswith("+") else mode
    if base not in _KL_MODES:
        return original(_CORE, "kl_penalty")(logprob, ref_logprob, mode)
    estimator, clamp, log_ratio_clamp = _KL_MODES[base]
    value = kl_estimate(logprob, ref_logprob, estimator, clamp, log_ratio_clamp)
    if not mode.endswith("+") or mode in ("mse", "k2"):
        return value
    # Straight-through: the forward value of the chosen estimator, the gradient of k2.
    k2 = kl_estimate(logprob, ref_logprob, "k2")
    return k2 - k2.detach() + value.detach()


# --------------------------------------------------------------------------------------------
# Policy and value losses
# --------------------------------------------------------------------------------------------
def _config_value(config: Any, name: str, default: Any) -> Any:
    getter = getattr(config, "get", None)
    if callable(getter):
        return getter(name, default)
    return getattr(config, name, default)


def _policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high,
                 clip_ratio_c, loss_agg_mode, global_batch_info):
    loss, stats = ppo_policy_loss(
        log_prob, old_log_prob, advantages, response_mask,
        clip_low=clip_low, clip_high=clip_high, dual_clip=clip_ratio_c,
        log_ratio_clamp=20.0, reduction=loss_agg_mode,
    )
    return _scaled(loss, _agg_factor(response_mask, loss_agg_mode, **global_batch_info)), stats


@dropin
def compute_policy_loss_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """veRL's "vanilla" clipped PPO loss (dual clip with config.clip_ratio_c, default 3).

    (B, T) tensors -> (pg_loss () fp32, {"actor/pg_clipfrac", "actor/ppo_kl",
    "actor/pg_clipfrac_lower"} floats). Reads clip_ratio, clip_ratio_low / _high,
    clip_ratio_c and global_batch_info from ``config``, as veRL does.
    """
    global_batch_info = dict(_config_value(config, "global_batch_info", None) or {})
    clip_ratio = getattr(config, "clip_ratio", None)
    clip_low = getattr(config, "clip_ratio_low", None)
    clip_high = getattr(config, "clip_ratio_high", None)
    clip_low = clip_ratio if clip_low is None else clip_low
    clip_high = clip_ratio if clip_high is None else clip_high
    clip_ratio_c = _config_value(config, "clip_ratio_c", 3.0) if config is not None else 3.0
    covered = (
        config is not None
        and rollout_is_weights is None
        and clip_low is not None
        and clip_high is not None
        and clip_ratio_c > 1.0
        and set(global_batch_info) <= {"dp_size", "batch_num_tokens", "global_batch_size",
                                       "loss_scale_factor"}
        and _kernel_aggregates(loss_agg_mode, global_batch_info.get("dp_size", 1),
                               global_batch_info.get("batch_num_tokens"),
                               global_batch_info.get("global_batch_size"))
    )
    if not covered:
        return original(_CORE, "compute_policy_loss_vanilla")(
            old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
            rollout_is_weights,
        )
    loss, stats = _policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_low,
                               clip_high, clip_ratio_c, loss_agg_mode, global_batch_info)
    metrics = {
        "actor/pg_clipfrac": stats["clipfrac"].item(),
        "actor/ppo_kl": stats["ppo_kl"].item(),
        "actor/pg_clipfrac_lower": stats["dual_clipfrac"].item(),
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """veRL's older (deprecated) policy-loss entry point: (B, T) tensors -> (pg_loss,
    pg_clipfrac, ppo_kl, pg_clipfrac_lower), all () fp32 tensors."""
    clip_low = cliprange if cliprange_low is None else cliprange_low
    clip_high = cliprange if cliprange_high is None else cliprange_high
    if (clip_low is None or clip_high is None or not clip_ratio_c > 1.0
            or not _kernel_aggregates(loss_agg_mode, 1, None, None)):
        return original(_CORE, "compute_policy_loss")(
            old_log_prob, log_prob, advantages, response_mask, cliprange, cliprange_low,
            cliprange_high, clip_ratio_c, loss_agg_mode,
        )
    loss, stats = _policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_low,
                               clip_high, clip_ratio_c, loss_agg_mode, {})
    return loss, stats["clipfrac"], stats["ppo_kl"], stats["dual_clipfrac"]


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """veRL's clipped value loss: vpreds, returns, values (old), response_mask (B, T)
    -> (vf_loss () fp32, vf_clipfrac () fp32); gradient to ``vpreds``."""
    if cliprange_value is None or not _kernel_aggregates(
        loss_agg_mode, dp_size, batch_num_tokens, global_batch_size
    ):
        return original(_CORE, "compute_value_loss")(
            vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode, dp_size,
            batch_num_tokens, global_batch_size, loss_scale_factor,
        )
    loss, stats = ppo_value_loss(vpreds, values, returns, response_mask, clip=cliprange_value,
                                 reduction=loss_agg_mode)
    factor = _agg_factor(response_mask, loss_agg_mode, dp_size, batch_num_tokens,
                         global_batch_size, loss_scale_factor)
    return _scaled(loss, factor), stats["clipfrac"]


# --------------------------------------------------------------------------------------------
# log-probabilities and entropy (verl.utils.torch_functional)
# --------------------------------------------------------------------------------------------
@dropin
def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True
) -> torch.Tensor:
    """logits (..., V), labels (...) -> logp (...) fp32. Labels equal to -100 give 0 (as veRL's
    flash-attn path). ``inplace_backward`` writes d logits into the logits buffer, as
    flash-attn's; it is turned off for a leaf tensor that requires grad (its .grad would alias)."""
    inplace = bool(inplace_backward) and not (logits.is_leaf and logits.requires_grad)
    return logprobs(logits, labels, inplace_backward=inplace)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    _, entropy = logprobs(logits, labels, return_entropy=True, check_labels=False)
    return entropy


@dropin
def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits): (..., V) -> (...) fp32, differentiable."""
    return _entropy(logits)


@dropin
def entropy_from_logits_with_chunking(logits: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """As ``entropy_from_logits``; ``chunk_size`` is accepted and unused (no chunking needed)."""
    del chunk_size
    return _entropy(logits)


def patch_verl() -> Patch:
    """Swap the drop-ins into ``verl.trainer.ppo.core_algos`` / ``verl.utils.torch_functional``,
    into veRL's policy-loss and advantage-estimator registries, and into every loaded ``verl``
    module that imported them by name. Returns a ``Patch`` (``undo()`` or context manager).

    Run it in every process that computes losses: veRL's actor / critic workers are Ray
    processes, so call it from their setup (e.g. a worker_process_setup_hook), not only in
    the driver.
    """
    return apply_patch(
        "veRL",
        "verl",
        [
            (_CORE, "compute_gae_advantage_return", compute_gae_advantage_return),
            (_CORE, "kl_penalty", kl_penalty),
            (_CORE, "compute_policy_loss_vanilla", compute_policy_loss_vanilla),
            (_CORE, "compute_policy_loss", compute_policy_loss),
            (_CORE, "compute_value_loss", compute_value_loss),
            (_TORCH_F, "logprobs_from_logits", logprobs_from_logits),
            (_TORCH_F, "entropy_from_logits", entropy_from_logits),
            (_TORCH_F, "entropy_from_logits_with_chunking", entropy_from_logits_with_chunking),
        ],
    )
