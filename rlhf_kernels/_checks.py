"""Input validation shared by the ops: errors that say what was wrong and what is expected."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a floating tensor (fp16, bf16, fp32 or fp64), got {tensor.dtype}"
        )


def check_same_shape(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tensor.shape != ref.shape:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but {ref_name} has shape "
            f"{tuple(ref.shape)}; they must match"
        )


def check_same_device(*named: tuple[str, torch.Tensor]) -> None:
    devices = {t.device for _, t in named if t is not None}
    if len(devices) > 1:
        listing = ", ".join(f"{n} on {t.device}" for n, t in named if t is not None)
        raise ValueError(f"all inputs must be on one device, got {listing}")


def as_mask(mask: torch.Tensor | None, like: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """A (…) bool/float mask -> float32 tensor of 0/1 with the shape of ``like`` (1 = counts)."""
    if mask is None:
        return torch.ones(like.shape, dtype=torch.float32, device=like.device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    check_same_shape(name, mask, "the values", like)
    if mask.dtype == torch.bool:
        return mask.to(torch.float32)
    if mask.dtype.is_floating_point or mask.dtype in (torch.int8, torch.int16, torch.int32,
                                                      torch.int64, torch.uint8):
        return (mask != 0).to(torch.float32)
    raise ValueError(f"{name} must be bool, integer or floating, got {mask.dtype}")


REDUCTIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; expected one of {REDUCTIONS}")
