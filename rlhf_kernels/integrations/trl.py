"""TRL drop-ins: the log-probability and entropy helpers of ``trl.trainer.utils``.

Checked against trl 1.16 (tests/test_integrations.py, tests/test_framework_contracts.py). Same
signatures as TRL, plus a keyword-only ``keep_fp32``:

    selective_log_softmax(logits, index, temperature=1.0, row_mask=None) -> logp
    entropy_from_logits(logits, chunk_size=128) -> entropy
    selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True,
                                      temperature=1.0, row_mask=None) -> (logp, entropy)

logits (..., V) fp16/bf16/fp32/fp64 (any strides), index (...) int64/int32, row_mask broadcastable
to index (0 = row skipped) -> (...), computed by ``rlhf_kernels.logprobs`` in one pass over the
vocabulary in fp32 (fp64 for fp64 logits), with no (..., V) temporary in the forward.

Output dtype: what TRL itself returns for the same call, the fp32 result rounded once to it.
TRL 1.16 dispatches on the call: its Triton kernel (logits on CUDA/XPU, fp16/bf16/fp32, 1 to 3
dims, stride(-1) == 1, index of the logits' leading shape, row_mask of the index's shape) returns
fp32; its eager path returns the logits' dtype. The drop-in returns the same dtype as TRL would
for that call. ``keep_fp32=True`` returns the fp32 result (fp64 for fp64 logits) unrounded.

Differences from TRL, on purpose:

* values are computed in fp32 and rounded once, where TRL's eager path computes in the logits'
  dtype (its log_softmax of bf16 logits rounds along the way): ours are as close to exact as the
  output dtype allows;
* rows skipped by ``row_mask`` are read as ``ignore_index`` rows: logp (and entropy) 0 with zero
  gradient, as in TRL. An ``index`` equal to -100 (the ignore index) gives 0 where TRL raises an
  indexing error; an int32 ``index`` is accepted where TRL's eager path (torch.gather) raises;
* ``chunk_size`` of ``entropy_from_logits`` is accepted and unused: the kernel never holds more
  than one block of a row.

Falls back to TRL's function for a top-K ``index`` of shape (..., K) and for a ``row_mask`` that
does not broadcast to ``index``.
"""

from __future__ import annotations

import torch

from rlhf_kernels.integrations import Patch, apply_patch, dropin, original
from rlhf_kernels.integrations._contract import bind_keep_fp32, finish, installed
from rlhf_kernels.ops.logprobs import logprobs

__all__ = [
    "entropy_from_logits",
    "patch_trl",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
]

_UTILS = "trl.trainer.utils"
_IGNORE_INDEX = -100
# TRL uses its Triton kernel only where triton is installed; read once, at import, so that the
# per-call dtype decision is plain attribute reads (nothing for torch.compile to trip on).
_TRITON_INSTALLED = installed("triton")
_TRL_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRL_MASK_DTYPES = (torch.bool, torch.int32, torch.int64)


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def trl_uses_its_kernel(
    logits: torch.Tensor, index: torch.Tensor | None = None, row_mask: torch.Tensor | None = None
) -> bool:
    """Whether TRL 1.16 would run its own Triton kernel for this call (``_supports_trl_loss_kernel``
    and triton installed): then TRL returns fp32, otherwise the logits' dtype."""
    supported = (
        _TRITON_INSTALLED
        and logits.device.type in ("cuda", "xpu")
        and logits.dtype in _TRL_KERNEL_DTYPES
        and 1 <= logits.ndim <= 3
        and logits.stride(-1) == 1
        and logits.shape[-1] > 0
    )
    if index is not None:
        supported = (
            supported
            and index.shape == logits.shape[:-1]
            and index.dtype in (torch.int32, torch.int64)
            and index.device == logits.device
        )
    if row_mask is not None:
        supported = (
            supported
            and index is not None
            and row_mask.shape == index.shape
            and row_mask.dtype in _TRL_MASK_DTYPES
            and row_mask.device == logits.device
        )
    return supported


def _trl_dtype(logits, index=None, row_mask=None) -> torch.dtype:
    return torch.float32 if trl_uses_its_kernel(logits, index, row_mask) else logits.dtype


def _labels(index: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    """TRL's row_mask (0 = skip the row; broadcast to index, as TRL's masked_fill does) as
    ignore_index labels for the kernel."""
    if row_mask is None:
        return index
    return index.masked_fill(row_mask == 0, _IGNORE_INDEX)


def _kernel_covers(
    logits: torch.Tensor, index: torch.Tensor, row_mask: torch.Tensor | None
) -> bool:
    if index.shape != logits.shape[:-1]:
        return False  # a top-K index (..., K)
    if row_mask is None:
        return True
    try:  # TRL's eager path applies the mask with masked_fill, which broadcasts it
        return torch.broadcast_shapes(row_mask.shape, index.shape) == index.shape
    except RuntimeError:
        return False


@dropin
def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
    *,
    keep_fp32: bool = False,
) -> torch.Tensor:
    """log_softmax(logits / temperature) gathered at ``index``: logits (..., V), index (...)
    -> (...) in TRL's dtype for this call (fp32 with ``keep_fp32``; see the module docstring);
    rows where ``row_mask == 0`` give 0. A (..., K) index goes to TRL's own."""
    if not _kernel_covers(logits, index, row_mask):
        return original(_UTILS, "selective_log_softmax")(logits, index, temperature, row_mask)
    _check_temperature(temperature)
    logp = logprobs(logits, _labels(index, row_mask), temperature, _IGNORE_INDEX)
    return finish(logp, _trl_dtype(logits, index, row_mask), keep_fp32)


@dropin
def entropy_from_logits(
    logits: torch.Tensor, chunk_size: int = 128, *, keep_fp32: bool = False
) -> torch.Tensor:
    """Entropy of softmax(logits) per row: logits (..., V) -> (...) in TRL's dtype for this call
    (fp32 with ``keep_fp32``), differentiable. ``chunk_size`` is accepted for TRL's signature;
    the kernel needs no chunking."""
    del chunk_size
    # Any valid label works; the log-probability output is simply not used.
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    _, entropy = logprobs(logits, labels, return_entropy=True, check_labels=False)
    return finish(entropy, _trl_dtype(logits), keep_fp32)


@dropin
def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
    *,
    keep_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy) of the tempered distribution in one pass: logits (..., V), index (...)
    -> two (...) tensors in TRL's dtype for this call (fp32 with ``keep_fp32``); rows where
    ``row_mask == 0`` give 0 for both."""
    if not _kernel_covers(logits, index, row_mask):
        fallback = original(_UTILS, "selective_log_softmax_and_entropy")
        return fallback(logits, index, entropy_requires_grad, temperature, row_mask)
    _check_temperature(temperature)
    logp, entropy = logprobs(
        logits, _labels(index, row_mask), temperature, _IGNORE_INDEX, return_entropy=True
    )
    dtype = _trl_dtype(logits, index, row_mask)
    logp, entropy = finish(logp, dtype, keep_fp32), finish(entropy, dtype, keep_fp32)
    return logp, entropy if entropy_requires_grad else entropy.detach()


def patch_trl(keep_fp32: bool = False) -> Patch:
    """Swap the drop-ins into ``trl.trainer.utils`` and every loaded ``trl`` module that
    imported them by name. Returns a ``Patch``: call ``undo()`` or use it as a context manager.
    Functions absent from the installed TRL version are skipped (listed in ``Patch.skipped``).

    keep_fp32: the patched functions return the kernels' fp32 result (fp64 for fp64 logits)
    instead of TRL's dtype for the call (see the module docstring)."""
    fns = [selective_log_softmax, entropy_from_logits, selective_log_softmax_and_entropy]
    if keep_fp32:
        fns = [bind_keep_fp32(fn) for fn in fns]
    return apply_patch("TRL", "trl", [(_UTILS, fn.__name__, fn) for fn in fns])
