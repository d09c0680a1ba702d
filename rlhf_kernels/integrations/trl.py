"""TRL drop-ins: the log-probability and entropy helpers of ``trl.trainer.utils``.

Checked against trl 1.16 (tests/test_integrations.py). Same signatures as TRL:

    selective_log_softmax(logits, index, temperature=1.0, row_mask=None) -> logp
    entropy_from_logits(logits, chunk_size=128) -> entropy
    selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True,
                                      temperature=1.0, row_mask=None) -> (logp, entropy)

logits (..., V) fp16/bf16/fp32, index (...) int64/int32, row_mask (...) (0 = row skipped)
-> (...) fp32, computed by ``rlhf_kernels.logprobs`` in one pass over the vocabulary, with no
(..., V) temporary in the forward and the logits gradient written directly in the backward.

Differences from TRL, on purpose:

* outputs are fp32 for any logits dtype (TRL's own Triton kernel, used on GPU, returns fp32 as
  well; its eager fallback returns the logits' dtype);
* rows skipped by ``row_mask`` are read as ``ignore_index`` rows: logp (and entropy) 0 with zero
  gradient, as in TRL. An ``index`` equal to -100 (the ignore index) gives 0 where TRL raises an
  indexing error;
* ``chunk_size`` of ``entropy_from_logits`` is accepted and unused: the kernel never holds more
  than one block of a row.

Falls back to TRL's function for a top-K ``index`` of shape (..., K) and for a ``row_mask`` whose
shape differs from ``index``.
"""

from __future__ import annotations

import torch

from rlhf_kernels.integrations import Patch, apply_patch, dropin, original
from rlhf_kernels.ops.logprobs import logprobs

__all__ = [
    "entropy_from_logits",
    "patch_trl",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
]

_UTILS = "trl.trainer.utils"
_IGNORE_INDEX = -100


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def _labels(index: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    """TRL's row_mask (0 = skip the row) as ignore_index labels for the kernel."""
    if row_mask is None:
        return index
    return index.masked_fill(row_mask == 0, _IGNORE_INDEX)


def _kernel_covers(
    logits: torch.Tensor, index: torch.Tensor, row_mask: torch.Tensor | None
) -> bool:
    return index.shape == logits.shape[:-1] and (row_mask is None or row_mask.shape == index.shape)


@dropin
def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """log_softmax(logits / temperature) gathered at ``index``: logits (..., V), index (...)
    -> (...) fp32; rows where ``row_mask == 0`` give 0. A (..., K) index goes to TRL's own."""
    if not _kernel_covers(logits, index, row_mask):
        return original(_UTILS, "selective_log_softmax")(logits, index, temperature, row_mask)
    _check_temperature(temperature)
    return logprobs(logits, _labels(index, row_mask), temperature, _IGNORE_INDEX)


@dropin
def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Entropy of softmax(logits) per row: logits (..., V) -> (...) fp32, differentiable.
    ``chunk_size`` is accepted for TRL's signature; the kernel needs no chunking."""
    del chunk_size
    # Any valid label works; the log-probability output is simply not used.
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    _, entropy = logprobs(logits, labels, return_entropy=True, check_labels=False)
    return entropy


@dropin
def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy) of the tempered distribution in one pass: logits (..., V), index (...)
    -> two (...) fp32 tensors; rows where ``row_mask == 0`` give 0 for both."""
    if not _kernel_covers(logits, index, row_mask):
        fallback = original(_UTILS, "selective_log_softmax_and_entropy")
        return fallback(logits, index, entropy_requires_grad, temperature, row_mask)
    _check_temperature(temperature)
    logp, entropy = logprobs(
        logits, _labels(index, row_mask), temperature, _IGNORE_INDEX, return_entropy=True
    )
    return logp, entropy if entropy_requires_grad else entropy.detach()


def patch_trl() -> Patch:
    """Swap the drop-ins into ``trl.trainer.utils`` and every loaded ``trl`` module that
    imported them by name. Returns a ``Patch``: call ``undo()`` or use it as a context manager.
    Functions absent from the installed TRL version are skipped (listed in ``Patch.skipped``)."""
    return apply_patch(
        "TRL",
        "trl",
        [
            (_UTILS, "selective_log_softmax", selective_log_softmax),
            (_UTILS, "entropy_from_logits", entropy_from_logits),
            (_UTILS, "selective_log_softmax_and_entropy", selective_log_softmax_and_entropy),
        ],
    )
