"""Output allocation for kernel launchers.

``empty`` is torch.empty, except that with RLHF_KERNELS_POISON=1 (the test suite sets it) the
buffer is filled with NaN (or the dtype's minimum for integers), so an element a kernel forgets
to write fails the comparison with the reference instead of passing by luck.

The variable is read once, when rlhf_kernels is imported (set it before, as TRITON_INTERPRET):
reading the environment on every allocation cost about 1 us of host time each, several times
per op call.
"""

from __future__ import annotations

import os

import torch

_POISON = os.environ.get("RLHF_KERNELS_POISON", "0") == "1"


def poison_enabled() -> bool:
    return _POISON


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON:
        if dtype.is_floating_point:
            out.fill_(float("nan"))
        else:
            out.fill_(torch.iinfo(dtype).min)
    return out


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return empty(t.shape, dtype or t.dtype, t.device)
