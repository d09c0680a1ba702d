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

``rollout_copies`` (the rollout engine, around each generate()): the adapters are frozen while
sampling, so their casts are the same in every decode step. Inside it, no-grad calls read
autocast-dtype copies of the active adapters made once on entry, into buffers kept on the layer
(the same addresses every time, which a captured decode graph reads), instead of casting both
weights in every step: two kernels less per adapted linear per token, and bit-identical
results.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

__all__ = ["install", "fast_path_applies", "rollout_copies"]


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
        return False  # DoRA and the other variants: PEFT's forward
    if getattr(layer, "use_dora", {}).get(name, False) or layer.lora_B[name].bias is not None:
        return False  # (DoRA in PEFT releases without lora_variant; lora_bias=True)
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
    if self._rlhf_copies_on and not torch.is_grad_enabled():
        held = self._rlhf_copies.get((name, torch.get_autocast_dtype(x.device.type)))
        if held is not None:  # the rollout's copies: no cast kernels
            a, b = held
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
            layer._rlhf_copies = {}  # (adapter, dtype) -> (A, B) in that dtype
            layer._rlhf_copies_on = False
        count += 1
    return count


@contextlib.contextmanager
def rollout_copies(module: nn.Module, dtype: torch.dtype):
    """While inside, no-grad fast-path calls of ``module``'s LoRA layers read ``dtype`` copies of
    their active adapters, refreshed on entry (in place: a graph captured inside an earlier
    call reads the refreshed values). For sampling only: the weights must not change inside."""
    layers = [m for m in module.modules() if hasattr(m, "_rlhf_copies")]
    with torch.no_grad():
        for layer in layers:
            for name in layer.active_adapters:
                if name not in layer.lora_A:
                    continue
                weights = (layer.lora_A[name].weight, layer.lora_B[name].weight)
                held = layer._rlhf_copies.get((name, dtype))
                if held is None or any(c.shape != w.shape or c.device != w.device
                                       for c, w in zip(held, weights)):
                    held = tuple(torch.empty_like(w, dtype=dtype) for w in weights)
                    layer._rlhf_copies[(name, dtype)] = held
                for copy, weight in zip(held, weights):
                    copy.copy_(weight)
            layer._rlhf_copies_on = True
    try:
        yield
    finally:
        for layer in layers:
            layer._rlhf_copies_on = False
