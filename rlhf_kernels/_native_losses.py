"""CPU launchers of the (B, T) losses and the group advantages on the native kernels.

Each function takes the arguments of its op module's ``_launch`` and returns what that returns
(the loss ops: ``(loss () fp32, stats fp32, saved gradient fp32)`` in the module's stats layout,
the scale last), computed by ``csrc/cpu/losses.cpp`` instead of the Triton kernels. The op
modules call them from ``_launch`` when ``native_cpu_kernels`` says so, so the custom ops, their
fake impls and autograd (the shared saved-gradient backward) are the same on every backend.
User input is checked before, in the public functions.
"""

from __future__ import annotations

import math

import torch

from rlhf_kernels import _native

__all__ = ["bradley_terry_loss", "group_advantages", "ppo_policy_loss", "ppo_value_loss"]


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (rows, T), a view where the leading dims merge (``_reduce.as_rows``; not
    imported from there: the op modules import this one)."""
    return x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _byte_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels read a mask as 0 / nonzero bytes (as the Triton loads' ``!= 0``)."""
    if mask is None or mask.dtype in (torch.bool, torch.uint8):
        return mask
    return mask != 0


def ppo_policy_loss(logp, old_logp, advantages, mask, ref_logp, normalizer, clip_low, clip_high,
                    dual_clip, log_ratio_clamp, reduction, policy, kl_coef, normalizer_value,
                    tau_pos, tau_neg):
    """``rlhf_kernels.ops.policy_loss._launch`` on the native kernel."""
    T = logp.shape[-1]
    logp2, old2 = as_rows(logp), as_rows(old_logp)
    n_rows = logp2.shape[0]
    if advantages.dim() == logp.dim():
        adv2 = as_rows(advantages)
    else:  # one per sequence: a stride-0 view along T, never expanded in memory
        adv2 = advantages.reshape(n_rows, 1).expand(n_rows, T)
    mask = _byte_mask(mask)
    norm = normalizer_value if normalizer is None else float(normalizer)
    loss, stats, saved = _native.ops().ppo_policy_loss(
        logp2, old2, adv2, None if mask is None else as_rows(mask),
        None if ref_logp is None else as_rows(ref_logp), 1.0 - clip_low, 1.0 + clip_high,
        dual_clip, math.inf if log_ratio_clamp is None else log_ratio_clamp, kl_coef, reduction,
        policy, norm, tau_pos, tau_neg)
    if ref_logp is not None and norm == 0.0:
        # A normalizer of 0 (a tensor, here read on the host): the reference's pg_loss +
        # kl_coef * kl of the two quotients (+-inf each, NaN for 0 / 0; inf - inf is NaN), not
        # the kind of the kernel's one sum's quotient. The stats end pg_loss, kl, scale.
        loss = stats[-3] + kl_coef * stats[-2]
    return loss, stats, saved.view(logp.shape)


def ppo_value_loss(values, old_values, returns, mask, normalizer, clip, reduction,
                   normalizer_value):
    """``rlhf_kernels.ops.value_loss._launch`` on the native kernel."""
    mask = _byte_mask(mask)
    norm = normalizer_value if normalizer is None else float(normalizer)
    loss, stats, saved = _native.ops().ppo_value_loss(
        as_rows(values), as_rows(old_values), as_rows(returns),
        None if mask is None else as_rows(mask), clip, reduction, norm)
    return loss, stats, saved.view(values.shape)


def bradley_terry_loss(chosen, rejected, margin_tensor, margin, center_coef):
    """``rlhf_kernels.ops.bradley_terry._launch`` on the native kernel."""
    margin1 = (None if margin_tensor is None
               else margin_tensor.expand(chosen.shape).reshape(-1))
    loss, stats, saved = _native.ops().bradley_terry(
        chosen.reshape(-1), rejected.reshape(-1), margin1, margin, center_coef)
    return loss, stats, saved.view(2, *chosen.shape)


def group_advantages(scores, group_ids, group_size, estimator, norm, eps):
    """``rlhf_kernels.ops.advantages._launch`` on the native kernel."""
    from rlhf_kernels.ops.advantages import ESTIMATOR_CODES, NORM_CODES

    ids = None if group_ids is None else group_ids.to(torch.int64)
    return _native.ops().group_advantages(scores, ids, max(int(group_size), 1),
                                          ESTIMATOR_CODES[estimator], NORM_CODES[norm],
                                          float(eps))
