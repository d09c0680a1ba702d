"""PEFT LoRA linears in two GEMMs under autocast.

PEFT's ``lora.Linear.forward`` runs ``result + lora_B(lora_A(dropout(x.to(fp32)))) * scaling``.
Under ``torch.autocast`` (the trainer's bf16 mode on a GPU) that is eight kernels per adapted
linear: the input cast to the adapters' fp32 and back by autocast, the two weight casts, the two
GEMMs, the scaling multiply and the add, each rounded to bf16. A decode step of a 0.5B model has
168 adapted linears, and the first H200 profile had the step at 6.8 ms of GPU time for a 0.23 ms
weight-read floor, most of it these small kernels (``benchmarks/e2e_ppo.py --profile-stages``).

``install`` gives each plain ``peft.tuners.lora.layer.Linear`` a forward that, when autocast is
on for the input's device and one vanilla adapter is active (no dropout in training, not merged,
no per-row adapters), computes

    out = addmm(base_layer(x), x @ A^T, B^T, alpha=scaling)

in the autocast dtype: the weight casts, one GEMM and one GEMM whose epilogue adds the scaled
product to the base output (one rounding instead of three). Anything else runs PEFT's own
forward, unchanged; so does every call without autocast (the CPU trainer's fp32 path keeps
PEFT's arithmetic to the last bit).
"""

from __future__ import annotations

import types

import torch
from torch import nn

__all__ = ["install", "fast_path_applies"]


def fast_path_applies(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether ``layer``'s call on ``x`` can take the two-GEMM path (see the module docstring)."""
    if args or kwargs or layer.merged or layer.disable_adapters:
        return False
    if not torch.is_autocast_enabled(x.device.type):
        return False
    active = layer.active_adapters
    if len(active) != 1:
        return False
    name = active[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return False
    dropout = layer.lora_dropout[name]
    if layer.training and not isinstance(dropout, nn.Identity) and dropout.p > 0:
        return False
    return x.shape[-1] == layer.lora_A[name].weight.shape[1]


def _forward(self, x: torch.Tensor, *args, **kwargs):
    if not fast_path_applies(self, x, args, kwargs):
        return self._rlhf_peft_forward(x, *args, **kwargs)
    name = self.active_adapters[0]
    result = self.base_layer(x)
    a = self.lora_A[name].weight  # (r, in)
    b = self.lora_B[name].weight  # (out, r)
    flat = result.reshape(-1, result.shape[-1])
    # under autocast: bf16 GEMMs (fp32 accumulation), the scaled product added in the epilogue
    projected = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), a)
    out = torch.addmm(flat, projected, b.t(), alpha=self.scaling[name])
    return out.view(result.shape).to(result.dtype)


def install(layers) -> int:
    """Give every plain PEFT LoRA ``Linear`` among ``layers`` the autocast fast path (once per
    layer); returns how many layers have it."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for layer in layers:
        if type(layer) is not Linear:  # quantized and other LoRA layer types keep PEFT's own
            continue
        if not hasattr(layer, "_rlhf_peft_forward"):
            layer._rlhf_peft_forward = layer.forward
            layer.forward = types.MethodType(_forward, layer)
        count += 1
    return count
