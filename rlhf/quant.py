"""Quantized bases (QLoRA-style) and the adapters' optimizer: the logic behind the
``quantization`` and ``optimizer`` settings of every stage (docs/quantization.md).

``quantization``:
  ``none``  the base in its own dtype (bf16 / fp32), as before;
  ``nf4``   4-bit NormalFloat base weights (QLoRA), double-quantized absmax constants;
  ``fp4``   4-bit float base weights, double-quantized;
  ``int8``  LLM.int8() base weights (8-bit rows with fp16 outlier columns above 6.0).

What is quantized: every ``nn.Linear`` of the decoder layers (attention and MLP), through
bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` as ``transformers`` loads them. What stays in
higher precision, and why:

* the **lm_head** (and the input embeddings it may be tied to): ``token_logprobs`` and the RL
  update feed ``lm_head.weight`` as a dense ``(V, H)`` matrix to the fused
  ``rlhf_kernels.linear_logprobs`` / ``linear_ppo_loss``, which never build ``(B, T, V)``
  logits; a 4-bit packed weight cannot be read that way, and the head is the layer whose
  rounding moves every log-prob (the ratio, the KL to the reference). It is also small next to
  the layers (0.5 B of Llama-3-8B's 8 B parameters). A user who quantizes it anyway
  (``bnb_config(..., quantize_lm_head=True)``) still gets the fused path: ``dense_weight``
  dequantizes the whole head to the compute dtype per call (a transient ``V x H`` tensor, which
  the planner counts), so the log-probs equal the quantized model's own unfused logits.
* the **LoRA adapters** (fp32, PEFT's adapter dtype) and the **value / reward heads** (fp32
  ``Linear(H, 1)``): they train; bitsandbytes' layers cannot.
* norms and embeddings: not ``nn.Linear``; bitsandbytes leaves them in the load dtype.

Training a quantized base is impossible (its weights are integers): every stage that trains
weights of the base must do so through LoRA (``check_trainable``). Checkpoints never hold the
quantized base: they name the full-precision base and record the quantization, and loading
re-quantizes it (deterministic: the same bits every time).

``optimizer`` (``make_optimizer``): ``adamw`` (torch), ``adamw8bit`` (bitsandbytes' blockwise
8-bit moments; runs on the CPU too), ``paged_adamw`` / ``paged_adamw8bit`` (moments in CUDA
unified memory that the driver pages to the host under memory pressure; CUDA only, an error on
the CPU where there is nothing to page to). bitsandbytes keeps 32-bit moments for tensors under
4096 elements (``min_8bit_size``), so a small adapter saves nothing: ``state_bytes`` measures it.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["OPTIMIZERS", "QUANTIZATIONS", "bnb_config", "check_optimizer", "check_quantization",
           "check_trainable", "compute_dtype", "dense_weight", "describe", "is_quantized_linear",
           "keep_4bit_layers_trainable_on_cpu",
           "make_optimizer", "merge_lora_into_dense", "out_features", "quant_state_tensors",
           "quantization_of", "resolve_auto", "state_bytes"]

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
# bytes per parameter of a quantized linear weight, as bitsandbytes stores it: 4-bit = 0.5 byte
# + one absmax per 64-weight block (double quant: an 8-bit absmax + one fp32 per 256 blocks
# = 8/64 + 32/(64*256) bits); int8 = 1 byte + one fp32 scale per output row (counted apart)
BITS_PER_WEIGHT = {"nf4": 4 + 8 / 64 + 32 / (64 * 256), "fp4": 4 + 8 / 64 + 32 / (64 * 256),
                   "int8": 8}


def check_quantization(value, setting: str = "quantization") -> str:
    """``value`` if it is one of QUANTIZATIONS, else one ValueError naming the setting."""
    if value not in QUANTIZATIONS:
        raise ValueError(f"{setting}={value!r} is not a quantization; expected one of "
                         f"{QUANTIZATIONS} (none: the base in its own dtype)")
    return value


def check_optimizer(value, setting: str = "optimizer", device=None) -> str:
    """``value`` if it is one of OPTIMIZERS, else one ValueError naming the setting. With
    ``device`` (a stage's ``device`` setting or a torch.device), a paged optimizer where there is
    no GPU to page from is refused too: ``cpu`` (``auto`` only once ``resolve_auto`` says where it
    runs, at the start of a run: a config file may serve a GPU machine and a laptop), so that the
    run stops before its model loads, not at the optimizer, after it."""
    if value not in OPTIMIZERS:
        raise ValueError(f"{setting}={value!r} is not an optimizer; expected one of {OPTIMIZERS}")
    kind = torch.device(device).type if isinstance(device, torch.device) else \
        str(device).split(":")[0] if device is not None else None
    if value.startswith("paged") and kind == "cpu":
        raise ValueError(_no_paging(value, setting, kind))
    return value


def resolve_auto(device) -> str:
    """A ``device`` setting as the run will resolve it: ``auto`` is cuda where there is one."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _no_paging(name: str, setting: str, kind: str) -> str:
    return (f"{setting}={name!r} pages optimizer state between the GPU and the host; on device "
            f"{kind!r} there is nothing to page; use {setting}=adamw8bit (8-bit moments, runs "
            f"on the CPU), or use {setting}=adamw")


def check_trainable(quantization: str, lora_rank: int, stage: str) -> None:
    """Refuse full-weight training (``lora_rank`` 0) of a quantized base."""
    if quantization != "none" and not lora_rank:
        raise ValueError(
            f"{stage}: quantization={quantization!r} with lora_rank=0 (full-weight training): a "
            f"{quantization} base cannot be trained, its weights are integers. Train LoRA "
            f"adapters on it (lora_rank > 0, QLoRA) or set quantization=none")


def _bitsandbytes(what: str):
    try:
        import bitsandbytes
    except ImportError as error:
        raise ValueError(f"{what} needs bitsandbytes, which is not installed; pip install "
                         f"'rlhf-kernels[quant]' (or pip install bitsandbytes)") from error
    return bitsandbytes


def compute_dtype(device: torch.device | str | None = None, torch_dtype=None) -> torch.dtype:
    """The dtype the quantized matmuls run in: ``torch_dtype`` when given; else bf16 on a CUDA
    device that supports it (QLoRA's choice: bf16 range, fast tensor cores), fp32 on the CPU
    (bitsandbytes dequantizes and runs a plain matmul there; fp32 keeps the tests' numbers
    tight and the CPU has no fast bf16 path)."""
    if torch_dtype is not None:
        if isinstance(torch_dtype, str):
            torch_dtype = getattr(torch, torch_dtype)
        return torch_dtype
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def bnb_config(quantization: str, *, dtype: torch.dtype = torch.float32,
               quantize_lm_head: bool = False, double_quant: bool = True):
    """The ``transformers.BitsAndBytesConfig`` of ``quantization`` (not "none").

    ``dtype``: the compute dtype (``compute_dtype``). ``quantize_lm_head=False`` leaves the
    lm_head (and whatever it is tied to) dense: transformers' own skip list, which names the
    output embeddings. ``double_quant`` quantizes the 4-bit absmax constants too (0.37 bit per
    weight less, 0.3 GiB on an 8B model, no measurable quality cost in the QLoRA paper).
    """
    check_quantization(quantization)
    if quantization == "none":
        raise ValueError("bnb_config is for a quantized base; quantization='none' needs none")
    _bitsandbytes(f"quantization={quantization!r}")
    from transformers import BitsAndBytesConfig

    # None: transformers' defaults (the lm_head and tied weights stay dense); []: nothing skipped
    skip = [] if quantize_lm_head else None
    if quantization == "int8":
        if quantize_lm_head:
            raise ValueError("quantize_lm_head=True with quantization='int8': LLM.int8() "
                             "quantizes the lm_head's inputs too, which the fused log-prob path "
                             "cannot reproduce; keep the lm_head dense or use nf4 / fp4")
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                              bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=double_quant,
                              llm_int8_skip_modules=skip)


# --------------------------------------------------------------------------------------------
# what a loaded model holds
# --------------------------------------------------------------------------------------------
def _bnb_loaded():
    # importing bitsandbytes costs seconds: a model can only hold its layers once it is loaded
    return sys.modules.get("bitsandbytes")


def is_quantized_linear(module: nn.Module) -> bool:
    bnb = _bnb_loaded()
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def _kind(module: nn.Module) -> str:
    bnb = _bnb_loaded()
    if bnb is None:
        return "none"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    if isinstance(module, bnb.nn.Linear4bit):
        return getattr(module.weight, "quant_type", None) or "nf4"
    return "none"


def quantization_of(model: nn.Module) -> str:
    """"nf4" / "fp4" / "int8" when ``model`` holds bitsandbytes layers of that kind, else
    "none"."""
    for module in model.modules():
        kind = _kind(module)
        if kind != "none":
            return kind
    return "none"


def describe(model: nn.Module) -> dict:
    """{"quantization", "quantized_linears", "dense_linears": [names of nn.Linear left dense]}."""
    quantized, dense = 0, []
    for name, module in model.named_modules():
        if is_quantized_linear(module):
            quantized += 1
        elif type(module) is nn.Linear:
            dense.append(name)
    return {"quantization": quantization_of(model), "quantized_linears": quantized,
            "dense_linears": dense}


def quant_state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The tensors bitsandbytes keeps beside the quantized weights (absmax, codes, offsets, int8
    row scales): not parameters or buffers, so a byte count of those misses them."""
    tensors = []
    for module in model.modules():
        if not is_quantized_linear(module):
            continue
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        while state is not None:
            tensors += [t for t in (state.absmax, state.code, getattr(state, "offset", None))
                        if isinstance(t, torch.Tensor)]
            state = state.state2 if getattr(state, "nested", False) else None
        scale = getattr(weight, "SCB", None)
        if isinstance(scale, torch.Tensor):
            tensors.append(scale)
    return tensors


def out_features(linear: nn.Module) -> int:
    """Rows of a linear's weight (a 4-bit weight is stored packed, so its shape does not say)."""
    if hasattr(linear, "out_features"):
        return int(linear.out_features)
    return int(linear.weight.shape[0])


def keep_4bit_layers_trainable_on_cpu(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU weight repacking on every 4-bit layer of ``model``; returns
    how many layers had it on.

    On a CPU with AVX512-BF16 (bitsandbytes >= 0.48), a ``Linear4bit``'s first no-grad forward
    in eval mode repacks its weight, in place, into an inference-only format (bf16 block
    scales, a gemv kernel). From then on the layer computes other numbers than the dequantized
    matrix (``dense_weight``: the fused log-probs stop matching the model's logits), and a
    training forward fails ("a view of a leaf Variable that requires grad is being used in an
    in-place operation"). The trainer alternates sampling (eval, no grad) and updates, so the
    layers keep the unpacked format: every forward dequantizes the stored weight, on any CPU.
    A model with int8 layers also gets bitsandbytes' per-matmul fp16 cast notice said once
    (``_say_int8_cast_once``) instead of at every call.
    """
    bnb = _bnb_loaded()
    if bnb is None:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) \
                and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
        if isinstance(module, bnb.nn.Linear8bitLt):
            _say_int8_cast_once()
    return count


class _OnceFilter(logging.Filter):
    """Lets the first record that starts with ``prefix`` through, drops the later ones."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


INT8_CAST_NOTICE = "MatMul8bitLt: inputs will be cast"


def _say_int8_cast_once() -> None:
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast from torch.float32 to float16" at
    every int8 matmul whose input is not fp16 (every call on the CPU, where the compute dtype is
    fp32): a hundred lines per RL iteration of a 2-layer model. It is said once per process."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) and f.prefix == INT8_CAST_NOTICE
               for f in logger.filters):
        logger.addFilter(_OnceFilter(INT8_CAST_NOTICE))


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of ``linear`` as a dense tensor: the parameter itself for a plain
    layer; for a 4-bit bitsandbytes layer its dequantized values in the compute dtype (a new
    tensor, no gradient: a quantized weight is frozen), exactly the matrix the layer's own
    forward multiplies by, so the fused log-probs equal the layer's logits. An int8 layer is a
    ValueError (its forward quantizes the inputs too)."""
    if not is_quantized_linear(linear):
        return linear.weight
    bnb = _bnb_loaded()
    weight = linear.weight
    if isinstance(linear, bnb.nn.Linear4bit):
        with torch.no_grad():
            state = weight.quant_state
            dense = bnb.functional.dequantize_4bit(weight.data, state)
            return dense.to(linear.compute_dtype or state.dtype)
    # LLM.int8() quantizes the activations of its matmul as well (int8 x int8 with fp16
    # outlier columns): no dense weight reproduces its logits, so the fused path refuses it.
    raise ValueError(
        f"the lm_head is an int8 {type(linear).__name__}: LLM.int8() quantizes the matmul's "
        f"inputs too, so the fused log-probs (a dense weight) could not equal the model's own "
        f"logits. Keep the lm_head dense (the default: quantize_lm_head=False) or use a 4-bit "
        f"quantization (nf4, fp4), whose lm_head the fused path dequantizes exactly")


# --------------------------------------------------------------------------------------------
# SFT with LoRA on a quantized base: the adapter folded into the full-precision base
# --------------------------------------------------------------------------------------------
def merge_lora_into_dense(peft_model, dense_base: nn.Module) -> nn.Module:
    """``dense_base`` (the same checkpoint loaded without quantization) + the LoRA adapter that
    ``peft_model`` (on the quantized base) trained, merged in full precision.

    Merging into the 4-bit weights themselves would round the sum back to 4 bits and lose most
    of the update; the next stage quantizes the merged model when it loads it instead.
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from rlhf.models import _quiet_peft

    name = peft_model.active_adapter
    name = name[0] if isinstance(name, (list, tuple)) else name
    config = peft_model.peft_config[name]
    trained = get_peft_model_state_dict(peft_model, adapter_name=name)
    with _quiet_peft():
        dense = get_peft_model(dense_base, config, adapter_name=name)
        result = set_peft_model_state_dict(dense, trained, adapter_name=name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"the trained adapter does not fit the full-precision base: "
                         f"{unexpected[:3]} ... have no place in it")
    return dense.merge_and_unload()


# --------------------------------------------------------------------------------------------
# the adapters' optimizer
# --------------------------------------------------------------------------------------------
def make_optimizer(params, name: str, device: torch.device | str, **kwargs):
    """AdamW over ``params`` (a list of tensors or of param groups) as ``name`` says.

    kwargs go to the optimizer (lr, betas, eps, weight_decay). ``adamw`` is torch's (``fused``
    on CUDA); the others are bitsandbytes'. ``paged_*`` on the CPU is a ValueError.
    """
    check_optimizer(name)
    device = torch.device(device)
    if name == "adamw":
        return torch.optim.AdamW(params, fused=device.type == "cuda" or None, **kwargs)
    if name.startswith("paged") and device.type != "cuda":
        raise ValueError(_no_paging(name, "optimizer", device.type))
    bnb = _bitsandbytes(f"optimizer={name!r}")
    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        return cls(params, **kwargs)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's per-parameter state tensors (moments, 8-bit maps and absmax);
    0-d step counters are left out (4 bytes per parameter tensor in torch's AdamW)."""
    return sum(value.numel() * value.element_size()
               for state in optimizer.state.values() for value in state.values()
               if isinstance(value, torch.Tensor) and value.dim() > 0)


def adapter_optimizer_bytes(shapes: Iterable[tuple[int, ...]], name: str,
                            device: str = "cpu") -> int:
    """Measured optimizer-state bytes of ``name`` for parameters of these shapes, after one step
    (the state exists from the first step on). Used by docs/quantization.md's figures."""
    params = [nn.Parameter(torch.zeros(shape, device=device)) for shape in shapes]
    optimizer = make_optimizer(params, name, device, lr=1e-4)
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    return state_bytes(optimizer)
