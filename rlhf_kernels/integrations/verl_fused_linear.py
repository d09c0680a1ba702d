"""veRL drop-in for the fused lm head of its actor: ``FusedLinearForPPOFunction``.

With ``actor_rollout_ref.model.use_fused_kernels=True`` and ``fused_kernel_options.impl_backend``
"torch" (veRL's default backend), veRL 0.9.1's patched model forward never makes the
``(tokens, V)`` logits: ``verl.utils.experimental.FusedLinearForPPO`` calls
``FusedLinearForPPOFunction.apply(hidden_states, lm_head.weight, rolled_input_ids, temperature,
chunk_size=512)``, which computes ``logits = hidden @ weight.T / temperature`` chunk by chunk in
torch (the softmax and the entropy in fp32, the matmuls in the hidden states' dtype) and does
the same again in its backward.

The drop-in computes the same two outputs with ``rlhf_kernels.linear_logprobs``: log-prob of
each label and entropy of the tempered distribution, gradients to the hidden states and the
weight, no logits kept between forward and backward. ``patch_verl()`` installs it.

    FusedLinearForPPOFunction.apply(hidden_states (T, H) or (B, T, H), vocab_weights (V, H),
                                    input_ids (T,) or (B, T), temperature=1.0, chunk_size=512)
        -> (log_probs, entropy), each of input_ids' shape

Contract kept (veRL's): log_probs fp32; entropy in the hidden states' dtype (veRL writes each
chunk's fp32 entropy into a buffer of that dtype), fp32 with ``keep_fp32=True``; the matmuls run
in the autocast dtype when autocast is on, else in the hidden states' dtype. Differences, on
purpose: the logits are divided by the temperature in fp32 (veRL divides the bf16 logits and
rounds), so ours are as close to exact as fp32 allows; ``chunk_size`` is unused (the op chooses
its chunk from the free memory, see ``linear_logprobs``); a label of -100 gives log-prob and
entropy 0 and no gradient (veRL's gather would fail on it). A temperature that is not a
finite number > 0 (veRL divides the logits by it all the same: 0 gives NaN) runs veRL's own
function.

The other fused backends ("triton": veRL's own vocabulary-parallel kernel; "liger") are left to
veRL.
"""

from __future__ import annotations

import torch

from rlhf_kernels.integrations import dropin, original
from rlhf_kernels.integrations._contract import finish, promoted
from rlhf_kernels.ops.linear_logprobs import linear_logprobs

__all__ = ["FusedLinearForPPOFunction", "FusedLinearForPPOFunctionFP32", "TARGET_MODULE"]

TARGET_MODULE = "verl.utils.experimental.torch_functional"
_IGNORE_INDEX = -100


def _check(hidden_states: torch.Tensor, vocab_weights: torch.Tensor,
           input_ids: torch.Tensor) -> None:
    if hidden_states.dim() not in (2, 3):
        raise ValueError(
            f"FusedLinearForPPOFunction: hidden_states must be (tokens, hidden) or "
            f"(batch, tokens, hidden), got shape {tuple(hidden_states.shape)}")
    if tuple(input_ids.shape) != tuple(hidden_states.shape[:-1]):
        raise ValueError(
            f"FusedLinearForPPOFunction: input_ids of shape {tuple(input_ids.shape)} do not match "
            f"hidden_states {tuple(hidden_states.shape)}: expected "
            f"{tuple(hidden_states.shape[:-1])}")
    if vocab_weights.dim() != 2 or vocab_weights.shape[1] != hidden_states.shape[-1]:
        raise ValueError(
            f"FusedLinearForPPOFunction: vocab_weights must be (vocab, {hidden_states.shape[-1]}), "
            f"got shape {tuple(vocab_weights.shape)}")


def _positive_finite(temperature) -> bool:
    try:
        return bool(0.0 < float(temperature) < float("inf"))
    except (TypeError, ValueError, RuntimeError):
        return False


def _fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature, keep_fp32):
    _check(hidden_states, vocab_weights, input_ids)
    device = hidden_states.device
    dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
             else promoted(hidden_states, vocab_weights))
    # the op's matmuls run in the dtype given: leave autocast so it does not recast them
    with torch.autocast(device.type, enabled=False):
        logp, entropy = linear_logprobs(
            hidden_states.to(dtype), vocab_weights.to(dtype), input_ids.to(torch.int64),
            temperature=float(temperature), ignore_index=_IGNORE_INDEX, return_entropy=True)
    logp = finish(logp, torch.float32, keep_fp32)
    return logp, finish(entropy, hidden_states.dtype, keep_fp32)


@dropin
class FusedLinearForPPOFunction:
    """Drop-in for ``verl.utils.experimental.torch_functional.FusedLinearForPPOFunction``
    (module docstring): ``apply(hidden_states, vocab_weights, input_ids, temperature=1.0,
    chunk_size=512) -> (log_probs fp32, entropy in hidden_states' dtype)``."""

    keep_fp32 = False

    @classmethod
    def apply(cls, hidden_states: torch.Tensor, vocab_weights: torch.Tensor,
              input_ids: torch.Tensor, temperature: float = 1.0, chunk_size: int = 512):
        if not _positive_finite(temperature):  # veRL divides by it anyway; the op refuses it
            return original(TARGET_MODULE, "FusedLinearForPPOFunction").apply(
                hidden_states, vocab_weights, input_ids, temperature, chunk_size)
        del chunk_size  # the op chooses its chunk (module docstring)
        return _fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature,
                                     cls.keep_fp32)


@dropin
class FusedLinearForPPOFunctionFP32(FusedLinearForPPOFunction):
    """The same, entropy returned in fp32 (fp64 for fp64 inputs) unrounded: what
    ``patch_verl(keep_fp32=True)`` installs."""

    keep_fp32 = True
