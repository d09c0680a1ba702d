"""TRL drop-ins: the log-probability and entropy helpers of ``trl.trainer.utils``, the fused lm
head of TRL's trainers, and GRPOTrainer's loss.

Checked against trl 1.16 (tests/integrations/test_integrations.py,
tests/integrations/test_framework_contracts.py, tests/integrations/test_trl_grpo.py).
``patch_trl()`` installs all of them (its docstring lists the targets); ``unpatch_trl()`` or the
returned ``Patch`` restores TRL.

Trainers (GRPOTrainer, RLOOTrainer, SFTTrainer, DPOTrainer, KTOTrainer): their log-probabilities
come from TRL's fused lm head, whose math (``_ChunkedLogProbFunction``) the drop-in
``ChunkedLogProbFunction`` computes with ``rlhf_kernels.linear_logprobs``, every output TRL asks
for (log_probs, entropy, and, through linear_logprobs' ``stats``, SFT's / DPO's is_top1, DPO's
and KTO's mean_logits, DPO's log_sum_sq_probs), a PEFT LoRA adapter on lm_head included (TRL
refuses that adapter; under the patch its trainers accept it and train it).
GRPOTrainer's ``_compute_loss`` becomes ``grpo_compute_loss``:
``rlhf_kernels.ppo_policy_loss`` for loss_type grpo / bnpo / dr_grpo / dapo / luspo / cispo /
sapo / vespo at importance_sampling_level token or sequence, with vLLM's importance-sampling
correction and TRL's off-policy and high-entropy masks, TRL's own code for the other options.
Values and gradients are TRL's up to fp32 rounding (the fused head is fp32 like TRL's; in bf16
autocast the matmuls run in bf16 as TRL's do).

The utils helpers have the same signatures as TRL, plus a keyword-only ``keep_fp32``:

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

fp64 logits are computed in fp64 (``backend="reference"``: TRL's eager path keeps them in fp64,
the kernels would round to fp32).

Falls back to TRL's function for a top-K ``index`` of shape (..., K), for a ``row_mask`` that
does not broadcast to ``index`` and for a NaN or infinite temperature (TRL divides by it).
An ``index`` outside [0, V) other than -100 gives NaN for its row where TRL's eager path raises
(a check would cost a host sync per call).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import sys
import types
import warnings

import torch

from rlhf_kernels.integrations import (
    Patch,
    _is_dropin,
    apply_patch,
    dropin,
    original,
    unpatch_trl,
)
from rlhf_kernels.integrations._contract import (
    bind_keep_fp32,
    exact_backend,
    finish,
    installed,
    is_dtensor,
    weighted_advantages,
)
from rlhf_kernels.ops.kl import kl_penalty
from rlhf_kernels.ops.linear_logprobs import (
    STATS,
    linear_logprobs,
    logits_stats,
    stats_bits,
    stats_outputs,
)
from rlhf_kernels.ops.logprobs import logprobs
from rlhf_kernels.ops.policy_loss import ppo_policy_loss

__all__ = [
    "GRPO_LOSS_TYPES",
    "ChunkedLogProbFunction",
    "add_fused_lm_head",
    "entropy_from_logits",
    "grpo_compute_loss",
    "grpo_loss_fallback_reason",
    "patch_trl",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
    "unpatch_trl",
]

_UTILS = "trl.trainer.utils"
_IGNORE_INDEX = -100
# TRL uses its Triton kernel only where triton is installed; read once, at import, so that the
# per-call dtype decision is plain attribute reads (nothing for torch.compile to trip on).
_TRITON_INSTALLED = installed("triton")
_TRL_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRL_MASK_DTYPES = (torch.bool, torch.int32, torch.int64)


def _check_temperature(temperature: float) -> bool:
    """TRL's check (ValueError for temperature <= 0); False for a NaN or infinite temperature,
    which TRL divides by (NaN outputs; inf: the uniform distribution) and the kernels refuse:
    such a call runs TRL's own function."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return math.isfinite(temperature)


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
    if is_dtensor(logits):
        return False  # sharded logits (tensor parallelism): TRL's torch code runs on DTensors
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
    if not _kernel_covers(logits, index, row_mask) or not _check_temperature(temperature):
        return original(_UTILS, "selective_log_softmax")(logits, index, temperature, row_mask)
    logp = logprobs(logits, _labels(index, row_mask), temperature, _IGNORE_INDEX,
                    backend=exact_backend(logits))
    return finish(logp, _trl_dtype(logits, index, row_mask), keep_fp32)


@dropin
def entropy_from_logits(
    logits: torch.Tensor, chunk_size: int = 128, *, keep_fp32: bool = False
) -> torch.Tensor:
    """Entropy of softmax(logits) per row: logits (..., V) -> (...) in TRL's dtype for this call
    (fp32 with ``keep_fp32``), differentiable. ``chunk_size`` is accepted for TRL's signature;
    the kernel needs no chunking."""
    if is_dtensor(logits):  # sharded logits: TRL's torch code runs on DTensors
        return original(_UTILS, "entropy_from_logits")(logits, chunk_size)
    # Any valid label works; the log-probability output is simply not used.
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    _, entropy = logprobs(logits, labels, return_entropy=True, check_labels=False,
                          backend=exact_backend(logits))
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
    if not _kernel_covers(logits, index, row_mask) or not _check_temperature(temperature):
        fallback = original(_UTILS, "selective_log_softmax_and_entropy")
        return fallback(logits, index, entropy_requires_grad, temperature, row_mask)
    logp, entropy = logprobs(
        logits, _labels(index, row_mask), temperature, _IGNORE_INDEX, return_entropy=True,
        backend=exact_backend(logits),
    )
    dtype = _trl_dtype(logits, index, row_mask)
    logp, entropy = finish(logp, dtype, keep_fp32), finish(entropy, dtype, keep_fp32)
    return logp, entropy if entropy_requires_grad else entropy.detach()


# --------------------------------------------------------------------------------------------
# The fused lm head of TRL's trainers (trl.trainer.utils.add_fused_lm_head)
# --------------------------------------------------------------------------------------------
_CHUNKED = "_ChunkedLogProbFunction"
_FUSED_HEAD = "add_fused_lm_head"
# TRL's default for ``outputs`` (every per-token field), all computed by the drop-in; the last
# three are linear_logprobs' ``stats`` (the same names)
_TRL_DEFAULT_OUTPUTS = ("log_probs", "entropy", *STATS)
# The model whose fused forward is running (set by our add_fused_lm_head's wrapper): the chunked
# log-prob function only receives the head's weight and bias, and needs the module to see a
# PEFT adapter on it.
_FUSED_MODEL: contextvars.ContextVar = contextvars.ContextVar("rlhf_kernels_trl_fused_model",
                                                              default=None)


def _lm_head_adapter(head, weight: torch.Tensor):
    """What ``head`` (the model's output embeddings) adds to ``weight`` (what TRL passed):

    None: nothing (a plain Linear, or a PEFT layer with its adapters off or none active);
    (lora_a (r, H), lora_b (V, r), scale): one plain LoRA adapter, which linear_logprobs takes;
    the module itself: anything else (several active adapters, DoRA and other LoRA variants,
    dropout in training mode, a LoRA bias, a merged adapter, another PEFT tuner, a weight that
    is not the layer's own parameter, e.g. FSDP2's gathered copy): run through the module.
    """
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    if not isinstance(head, BaseTunerLayer):
        return None
    if not isinstance(head, LoraLayer) or head.merged:
        return head
    if head.disable_adapters:
        return None
    active = [name for name in head.active_adapters if name in head.lora_A]
    if not active:
        return None
    name = active[0]
    lora_a, lora_b = head.lora_A[name], head.lora_B[name]
    dropout = head.lora_dropout[name]
    plain = (
        len(active) == 1
        and name not in getattr(head, "lora_variant", {})
        and head.get_base_layer().weight is weight
        and isinstance(lora_a, torch.nn.Linear) and isinstance(lora_b, torch.nn.Linear)
        and lora_a.bias is None and lora_b.bias is None
        and (isinstance(dropout, torch.nn.Identity) or not dropout.training or dropout.p == 0)
    )
    return (lora_a.weight, lora_b.weight, float(head.scaling[name])) if plain else head


def _through_module(head, hidden, targets, temperature, softcap, logit_scale, entropy, stats):
    """TRL's five outputs from the head module's own forward: the full (N, V) logits are made,
    once, for an adapter configuration linear_logprobs does not take; log-probs (and entropy) by
    ``rlhf_kernels.logprobs``, the statistics by linear_logprobs' per-chunk code on them."""
    logits = head(hidden).float() * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if not 0 < temperature < math.inf:  # TRL's 1 / temperature (0 raises), outside the op
        logits, temperature = logits * (1 / temperature), 1.0
    out = logprobs(logits, targets, temperature, _IGNORE_INDEX, return_entropy=entropy)
    logp, entropy = out if entropy else (out, None)
    extras = stats_outputs(targets, torch.float32, stats_bits(stats))
    if stats:
        logits_stats(logits.detach().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                     temperature, _IGNORE_INDEX,
                     tuple(None if t is None else t.view(-1) for t in extras))
    return (logp, entropy, *extras)


@dropin
class ChunkedLogProbFunction:
    """Drop-in for ``trl.kernels.ChunkedLogProbFunction``, the per-token log-probabilities
    (and the other per-token outputs) of ``hidden @ weight.T + bias`` that TRL's fused lm head
    (``add_fused_lm_head``, used by GRPOTrainer, RLOOTrainer, SFTTrainer, DPOTrainer, KTOTrainer)
    computes without the (N, V) logits.

    ``apply(hidden (N, H), weight (V, H), bias (V,) | None, targets (N,) int64, temperature,
    chunk_size, final_logit_softcapping=None, logit_scale=1.0, outputs=...)`` -> the 5-tuple
    TRL returns: (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), each (N,), fp32
    (bool for is_top1), None where not in ``outputs`` (log_probs always). All five come from one
    ``rlhf_kernels.linear_logprobs`` call (its ``stats`` for the last three), the logits scaled
    by ``logit_scale / temperature``, so that, as TRL's: entropy, log_sum_sq_probs = log sum_j
    p_j^2 and mean_logits = the mean over the vocabulary are those of the scaled, tempered
    logits; is_top1 is "the target is the first argmax" (a tie with an earlier token is not
    top-1); only log_probs and entropy are differentiable. ``chunk_size`` is unused (the op
    chooses its chunk). As TRL, the matmuls run in the autocast dtype when autocast is on, else
    in ``hidden``'s dtype. SFTTrainer (entropy, is_top1), DPOTrainer (entropy, mean_logits,
    is_top1, log_sum_sq_probs for WPO; its reference model log_probs) and KTOTrainer (entropy,
    mean_logits) are served here.

    A PEFT LoRA adapter on the lm head (which TRL's own function ignores: it reads
    ``lm_head.weight``) is included, for every output: one plain adapter goes into
    linear_logprobs' LoRA inputs, with gradients to lora_A and lora_B; any other adapter
    configuration runs through the head module itself (exact, but the full logits are made).

    Falls back to TRL's function, when the head carries no adapter, for
    ``final_logit_softcapping`` (Gemma 2), a temperature or ``logit_scale`` that is not finite
    and > 0 (TRL's arithmetic: inf gives the uniform distribution, temperature 0 its
    ZeroDivisionError) and output names TRL does not know either; with an adapter the first two
    go through the head module and unknown names raise (TRL would ignore the adapter). The
    outputs are fp32 whatever the hidden states' dtype, as TRL's.

    Differs from TRL for a direct call with a target of -100 (TRL's trainers never pass one:
    they drop or clamp those positions): such a row gives 0 (False) for every output, where
    TRL's give numbers of no meaning.
    """

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size,
              final_logit_softcapping=None, logit_scale=1.0, outputs=None):
        outputs = tuple(_TRL_DEFAULT_OUTPUTS if outputs is None else outputs)
        unknown = [name for name in outputs if name not in _TRL_DEFAULT_OUTPUTS]
        stats = tuple(name for name in STATS if name in outputs)
        model = _FUSED_MODEL.get()
        head = model.get_output_embeddings() if model is not None else None
        adapter = _lm_head_adapter(head, weight)
        want_entropy = "entropy" in outputs
        # TRL divides by the temperature and multiplies by logit_scale whatever they are (0:
        # ZeroDivisionError; inf, NaN, < 0: its numbers); the op takes a finite ratio > 0
        plain_scales = 0 < temperature < math.inf and 0 < logit_scale < math.inf
        if adapter is None:
            if unknown or final_logit_softcapping is not None or not plain_scales:
                fallback = original(_UTILS, _CHUNKED).apply
                return fallback(hidden, weight, bias, targets, temperature, chunk_size,
                                final_logit_softcapping, logit_scale, outputs)
        elif unknown:
            raise ValueError(
                f"the fused lm head was asked for {unknown} with a PEFT adapter on the lm head; "
                f"patch_trl computes {_TRL_DEFAULT_OUTPUTS} with the adapter, and TRL's own "
                "function would ignore it. Remove the adapter from lm_head (target_modules)"
            )
        elif (isinstance(adapter, torch.nn.Module) or final_logit_softcapping is not None
              or not plain_scales):
            return _through_module(head, hidden, targets, temperature, final_logit_softcapping,
                                   logit_scale, want_entropy, stats)
        device = hidden.device
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else hidden.dtype)
        lora_a, lora_b, scale = adapter if adapter is not None else (None, None, 1.0)
        out = linear_logprobs(
            hidden.to(dtype), weight.to(dtype), targets, None if bias is None else bias.to(dtype),
            lora_a, lora_b, scale, temperature / logit_scale, _IGNORE_INDEX,
            return_entropy=want_entropy, stats=stats,
        )
        # TRL's outputs are fp32 whatever the hidden states' dtype (fp64 ones fold in fp32)
        return (*(None if t is None else t.to(torch.float32)
                  for t in (out.logp, out.entropy, out.log_sum_sq_probs, out.mean_logits)),
                out.is_top1)


@dropin
def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """TRL's ``add_fused_lm_head`` (same signature, it installs TRL's fused forward), with the
    forward wrapped so that the chunked log-prob function sees the model's lm head module (to
    include a PEFT adapter on it). A model patched this way whose lm head carries an adapter
    refuses a fused forward once patch_trl is undone: TRL's function would ignore the adapter.
    """
    original(_UTILS, _FUSED_HEAD)(model, temperature, cast_lm_head_to_fp32, outputs)
    fused = model.forward
    # TRL binds its fused forward to the model (types.MethodType), so that a copy of the model
    # (copy.deepcopy) runs the copy's backbone and head; ours is bound the same way and calls
    # TRL's function for the model it is bound to
    fused_func = getattr(fused, "__func__", None)
    if fused_func is None or getattr(fused, "__self__", None) is not model:
        fused_func = None

    @functools.wraps(fused_func if fused_func is not None else fused)
    def forward(self, *args, **kwargs):
        run = fused if fused_func is None else functools.partial(fused_func, self)
        if not kwargs.get("fused_lm_head", False):
            return run(*args, **kwargs)
        utils = sys.modules[_UTILS]
        if (not _is_dropin(getattr(utils, _CHUNKED, None))
                and _lm_head_adapter(self.get_output_embeddings(), None) is not None):
            raise RuntimeError(
                "this model's lm head carries a PEFT adapter and its fused lm head was added "
                "under patch_trl(), which is now undone: TRL's own fused lm head would ignore "
                "the adapter. Train under patch_trl(), or remove the adapter from lm_head"
            )
        token = _FUSED_MODEL.set(self)
        try:
            return run(*args, **kwargs)
        finally:
            _FUSED_MODEL.reset(token)

    model.forward = types.MethodType(forward, model)


# The other trainers whose only use of peft's BaseTunerLayer is the refusal of an adapter on
# lm_head; patch_trl lifts it as for GRPOTrainer and RLOOTrainer (every output of their fused
# head includes the adapter).
_LM_HEAD_ADAPTER_TRAINERS = (("trl.trainer.sft_trainer", "SFTTrainer"),
                             ("trl.trainer.dpo_trainer", "DPOTrainer"),
                             ("trl.trainer.kto_trainer", "KTOTrainer"))


class _NoTunerLayer:
    """Stands for peft's BaseTunerLayer inside a trainer's __init__ while it runs under
    patch_trl: nothing is an instance of it, so the trainer's refusal of an adapter on lm_head
    (TRL's fused head would ignore it; ours trains it) does not fire."""


def _accepting_adapter_on_lm_head(module_name: str, cls_name: str):
    """A wrapper of ``<module>.<cls>.__init__`` that lifts the trainer's refusal of a PEFT adapter
    on lm_head (its only use of BaseTunerLayer when ``cast_lm_head_to_fp32`` is off; with it on,
    TRL's refusal stands: the fp32 cast replaces the head's forward and would drop the adapter
    at generation)."""

    @dropin
    def __init__(self, *args, **kwargs):
        init = original(module_name, f"{cls_name}.__init__")
        module = sys.modules[module_name]
        bound = inspect.signature(init).bind_partial(self, *args, **kwargs)
        config = bound.arguments.get("args")
        lift = hasattr(module, "BaseTunerLayer") and not getattr(
            config, "cast_lm_head_to_fp32", False)
        if not lift:
            return init(self, *args, **kwargs)
        tuner_layer = module.BaseTunerLayer
        module.BaseTunerLayer = _NoTunerLayer
        try:
            return init(self, *args, **kwargs)
        finally:
            if module.BaseTunerLayer is _NoTunerLayer:
                module.BaseTunerLayer = tuner_layer

    return __init__


# --------------------------------------------------------------------------------------------
# GRPOTrainer's loss (trl.trainer.grpo_trainer.GRPOTrainer._compute_loss)
# --------------------------------------------------------------------------------------------
_GRPO = "trl.trainer.grpo_trainer"
_RLOO = "trl.trainer.rloo_trainer"
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
# the losses with TRL's clip (epsilon / epsilon_high, and delta)
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# The _compute_loss this drop-in mirrors is TRL 1.16's; another version keeps its own.
_CHECKED_TRL_MINOR = "1.16"
_MODEL_INPUTS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                 "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                 "mm_token_type_ids", "image_position_ids")


def grpo_loss_fallback_reason(trainer, inputs=None) -> str | None:
    """Why the drop-in hands this GRPOTrainer's loss to TRL's own ``_compute_loss`` (None: the
    drop-in computes it). The drop-in covers loss_type grpo / bnpo / dr_grpo / dapo / luspo /
    cispo / sapo / vespo, importance_sampling_level token / sequence, epsilon / epsilon_high,
    delta (for the clipped losses, when delta >= 1 + epsilon_high and delta > 1: then TRL's
    two-sided clip equals the dual clip; sapo and vespo have neither clip nor delta),
    sapo_temperature_pos / _neg (finite, > 0), vespo's gamma weights (TRL's own
    get_gamma_weights), a finite beta with TRL's k3 KL (with or without use_bias_correction_kl), the
    per-token weights TRL puts on the policy term (vLLM importance-sampling correction,
    off_policy_mask_threshold, top_entropy_quantile < 1), tool masks and the MoE auxiliary
    loss."""
    args = trainer.args
    if trainer.loss_type not in GRPO_LOSS_TYPES:
        return f"loss_type={trainer.loss_type!r} (covered: {GRPO_LOSS_TYPES})"
    if not math.isfinite(trainer.beta):  # TRL's loss is NaN; the op refuses a non-finite kl_coef
        return f"beta={trainer.beta} (not finite)"
    if trainer.importance_sampling_level not in ("token", "sequence"):
        return f"importance_sampling_level={trainer.importance_sampling_level!r}"
    if trainer.loss_type == "sapo":
        taus = (args.sapo_temperature_pos, args.sapo_temperature_neg)
        if not all(isinstance(t, (int, float)) and 0 < t < float("inf") for t in taus):
            return f"sapo temperatures {taus} (the op takes finite ones > 0)"
    if trainer.loss_type == "cispo" and not trainer.epsilon_high >= 1.0:
        return f"cispo with epsilon_high={trainer.epsilon_high} < 1"
    if trainer.loss_type in _CLIPPED:
        if not trainer.epsilon_low >= 0 or not trainer.epsilon_high >= 0:
            return f"a negative epsilon ({trainer.epsilon_low}, {trainer.epsilon_high})"
        if args.delta is not None and not (args.delta > 1.0
                                           and args.delta >= 1.0 + trainer.epsilon_high):
            return f"delta={args.delta} below 1 + epsilon_high"
    if inputs is not None:
        advantages, completion = inputs["advantages"], inputs["completion_ids"]
        if advantages.shape not in (completion.shape[:1], completion.shape):
            return f"advantages of shape {tuple(advantages.shape)}"
        if _vllm_correction(trainer):
            ratio = inputs.get("importance_sampling_ratio")
            rows, length = completion.shape
            if ratio is None or ratio.shape not in ((rows, length), (rows, 1)):
                shape = None if ratio is None else tuple(ratio.shape)
                return f"importance_sampling_ratio of shape {shape}"
    return None


def _vllm_correction(trainer) -> bool:
    return bool(trainer.use_vllm and trainer.vllm_importance_sampling_correction)


def _vespo_weights(trainer, inputs, mask, advantages, logps, old):
    """VESPO's gamma weights phi(w) of each row's importance ratio w (vLLM's ratio folded in),
    by the trainer's own get_gamma_weights: (B, 1) (or (B, T) for per-token advantages), >= 0,
    gradient-free; TRL's per-token VESPO loss is -phi A logp."""
    args = trainer.args
    per_row_advantages = advantages if advantages.dim() > 1 else advantages.unsqueeze(1)
    with torch.no_grad():
        return trainer.get_gamma_weights(
            advantages=per_row_advantages, log_ratio_per_token=logps.detach() - old, mask=mask,
            importance_sampling_ratio=inputs.get("importance_sampling_ratio"),
            k_pos=args.vespo_k_pos, lambda_pos=args.vespo_lambda_pos, k_neg=args.vespo_k_neg,
            lambda_neg=args.vespo_lambda_neg)


def _policy_weights(trainer, inputs, mask, advantages, logps, old, entropy_mask, phi=None):
    """The product of the non-negative, gradient-free per-token factors TRL 1.16 multiplies its
    policy term by (not the KL term), (B, T) or (B, 1), or None when there is none: the
    off-policy sequence mask (DeepSeek-V3.2), the high-entropy token mask and vLLM's
    importance-sampling ratio (for VESPO, its gamma weights ``phi`` instead, which hold that
    ratio), each computed by the trainer's own methods and inputs."""
    factors = [] if phi is None else [phi]
    if trainer.off_policy_mask_threshold is not None:
        sampling = inputs.get("sampling_per_token_logps", old)
        per_row_advantages = advantages if advantages.dim() > 1 else advantages.unsqueeze(1)
        factors.append(trainer.get_off_policy_mask(
            advantages=per_row_advantages, per_token_logps=logps,
            sampling_per_token_logps=sampling, mask=mask,
            off_policy_threshold=trainer.off_policy_mask_threshold))
    if entropy_mask is not None:
        factors.append(entropy_mask)
    if _vllm_correction(trainer) and phi is None:
        factors.append(inputs["importance_sampling_ratio"])
    if not factors:
        return None
    weights = factors[0].to(torch.float32)
    for factor in factors[1:]:
        weights = weights * factor.to(torch.float32)
    return weights.detach()


def _grpo_reduction(trainer, inputs, mask: torch.Tensor, mode: str):
    """(reduction, normalizer) of the op that give TRL's loss for the trainer's loss_type,
    the gradient-accumulation division included."""
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    rows = mask.shape[0]
    if trainer.loss_type in ("grpo", "sapo"):  # mean over rows of each row's token mean
        return "seq-mean-token-mean", float(rows * accumulation)
    if trainer.loss_type == "luspo":  # mean over rows of each row's token sum
        return "seq-mean-token-sum", float(rows * accumulation)
    if trainer.loss_type == "bnpo":  # token mean over the micro-batch
        return "token-sum", mask.sum().clamp(min=1.0) * accumulation
    if trainer.loss_type == "dr_grpo":  # a constant: rows x max_completion_length
        return "token-sum", float(rows * trainer.max_completion_length * accumulation)
    # dapo, cispo, vespo: the token count of the generation batch, over processes and
    # micro-batches
    normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
    if mode == "train":
        normalizer = (normalizer * trainer.current_gradient_accumulation_steps
                      / trainer.args.steps_per_generation)
    return "token-sum", normalizer


def _reduce_like(values: torch.Tensor, mask: torch.Tensor, reduction: str, normalizer):
    """The op's reduction, in torch, for a term the op does not compute (the importance-weighted
    KL of use_bias_correction_kl)."""
    if reduction == "seq-mean-token-mean":
        rows = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return rows.sum() / normalizer
    return (values * mask).sum() / normalizer


def _importance_weights(log_ratio: torch.Tensor, mask: torch.Tensor, level: str):
    """TRL's coef_1: exp of the per-token log-ratio (B, T), or of the row's mean (B, 1)."""
    if level == "token":
        return torch.exp(log_ratio)
    mean = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return torch.exp(mean).unsqueeze(-1)


@dropin
def grpo_compute_loss(self, model, inputs):
    """Drop-in for TRL 1.16's ``GRPOTrainer._compute_loss``: the same forward (the trainer's
    ``_get_per_token_logps_and_entropies``, i.e. the fused lm head), then the policy loss by
    ``rlhf_kernels.ppo_policy_loss`` and the metrics TRL logs (kl, entropy, clip_ratio/* or
    cispo_clip_ratio (none for sapo), aux_loss).

    Mapping (TRL -> the op): loss_type grpo / bnpo / dr_grpo / dapo -> loss_type "ppo",
    clip_low = epsilon, clip_high = epsilon_high, dual_clip = delta (TRL clamps the ratio at
    delta before the min; for delta >= 1 + epsilon_high that is the dual clip of A < 0 tokens
    and leaves A > 0 tokens unchanged); cispo -> loss_type "cispo", clip_low = 1 (no lower
    bound), clip_high = epsilon_high - 1 (TRL's clamp(ratio, max=epsilon_high), detached);
    sapo -> loss_type "sapo", sapo_tau_pos / sapo_tau_neg = sapo_temperature_pos / _neg (TRL's
    gate sigmoid(tau (coef_1 - 1)) 4 / tau, tau by the sign of the advantage; TRL logs no clip
    metric for it); vespo (-phi A logp, phi the gamma weight of the row's importance ratio,
    from the trainer's own get_gamma_weights with vLLM's ratio folded in) -> loss_type "cispo"
    at token level with clip_low = clip_high = 0 (the weight clip(r, 1, 1) is 1) and the
    advantages times phi (exact: phi >= 0, gradient-free), vespo/phi_seq_mean as TRL logs it;
    importance_sampling_level -> ratio_level; no log-ratio clamp (TRL has none);
    normalisers: grpo, sapo -> "seq-mean-token-mean" over the rows, luspo ->
    "seq-mean-token-sum" over the rows, bnpo -> the micro-batch's token count, dr_grpo ->
    rows x max_completion_length, dapo / cispo / vespo -> num_items_in_batch / num_processes
    (x accumulation / steps_per_generation in training), each times the
    gradient-accumulation steps as TRL divides; beta -> kl_coef with the k3 estimator, or, with
    use_bias_correction_kl (TRL's default), the KL term weighted by the importance ratio in
    torch (the op has no ratio-weighted KL) with the same reduction. The per-token weights TRL
    puts on the policy term alone (vLLM's importance-sampling ratio, the off-policy sequence
    mask, the high-entropy token mask; all >= 0 and gradient-free) scale the advantages given to
    the op, which is exact (``_contract.weighted_advantages``; for sapo too: w > 0 keeps the
    sign of A, so the temperature, and w = 0 zeroes the term either way); the KL term is not
    weighted, as in TRL, and the clip metrics see the unweighted advantages, as TRL's.

    The entropy bonus (entropy_coef, use_adaptive_entropy) is TRL's, in torch, on the fused
    head's differentiable entropies (``_entropy_bonus``). Anything else (see
    ``grpo_loss_fallback_reason``: other loss types, a delta below 1 + epsilon_high, ...) runs
    TRL's own ``_compute_loss`` for that call.
    """
    if grpo_loss_fallback_reason(self, inputs) is not None:
        return original(_GRPO, "GRPOTrainer._compute_loss")(self, model, inputs)
    utils = sys.modules[_UTILS]
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
        model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
        compute_aux_loss=self.aux_loss_enabled, **{k: inputs.get(k) for k in _MODEL_INPUTS})

    advantages = inputs["advantages"]
    old = inputs.get("old_per_token_logps")
    old = per_token_logps.detach() if old is None else old
    mode = "train" if self.model.training else "eval"
    level = self.importance_sampling_level
    reduction, normalizer = _grpo_reduction(self, inputs, mask, mode)
    cispo, vespo = self.loss_type == "cispo", self.loss_type == "vespo"
    phi = _vespo_weights(self, inputs, mask, advantages, per_token_logps, old) if vespo else None
    if cispo:
        clip = dict(clip_low=1.0, clip_high=self.epsilon_high - 1.0, dual_clip=None)
    elif vespo:  # -phi A logp: CISPO's weight clipped to [1, 1] is 1, phi is in the advantages
        clip = dict(clip_low=0.0, clip_high=0.0, dual_clip=None)
        level = "token"  # no ratio in VESPO's policy term (the KL's weights keep TRL's level)
    elif self.loss_type == "sapo":  # no clip: the gate's temperatures instead
        clip = dict(dual_clip=None, sapo_tau_pos=self.args.sapo_temperature_pos,
                    sapo_tau_neg=self.args.sapo_temperature_neg)
    else:
        clip = dict(clip_low=self.epsilon_low, clip_high=self.epsilon_high,
                    dual_clip=self.args.delta)
    kl_in_op = self.beta != 0.0 and not self.args.use_bias_correction_kl
    ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
    entropy_mask = (self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
                    if self.top_entropy_quantile < 1.0 else None)
    weights = _policy_weights(self, inputs, mask, advantages, per_token_logps, old,
                              entropy_mask, phi)
    loss, _ = ppo_policy_loss(
        per_token_logps, old, weighted_advantages(advantages, weights), mask,
        log_ratio_clamp=None, reduction=reduction, ratio_level=level,
        loss_type="cispo" if vespo else (
            self.loss_type if self.loss_type in ("cispo", "sapo") else "ppo"),
        normalizer=normalizer,
        ref_logp=ref if kl_in_op else None, kl_coef=self.beta if kl_in_op else 0.0,
        kl_estimator="k3", **clip)

    per_token_kl = None
    if self.beta != 0.0:
        # TRL's exp(ref - logp) - (ref - logp) - 1 is k3 of logp - ref: the op's, which keeps
        # its digits where |logp - ref| << 1 (fp32's literal formula does not)
        if kl_in_op:
            with torch.no_grad():  # for the metric
                per_token_kl = kl_penalty(per_token_logps.detach(), ref, "k3")
        else:
            weights = _importance_weights(per_token_logps - old, mask,
                                          self.importance_sampling_level)
            per_token_kl = kl_penalty(per_token_logps, ref, "k3") * weights
            loss = loss + self.beta * _reduce_like(per_token_kl, mask, reduction, normalizer)

    if getattr(self, "_entropy_bonus_enabled", False):
        loss = _entropy_bonus(self, loss, entropies, mask, entropy_mask, mode)
    if self.aux_loss_enabled:  # scaled for accumulation, as TRL does
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
        self._metrics[mode]["aux_loss"].append(
            self.accelerator.gather_for_metrics(aux_loss).mean().item())
    _log_grpo_metrics(self, mode, mask, advantages, per_token_logps.detach(), old, entropies,
                      per_token_kl, utils, phi)
    return loss


# the loss types whose TRL policy_loss metric is taken before the division by the accumulation
_POLICY_LOSS_BEFORE_ACCUMULATION = ("grpo", "sapo", "bnpo", "dr_grpo", "luspo")


def _entropy_bonus(trainer, loss, entropies, mask, entropy_mask, mode: str) -> torch.Tensor:
    """``loss`` minus TRL 1.16's entropy bonus, with its metrics and, under
    use_adaptive_entropy, its controller's update, as GRPOTrainer._compute_loss does them: the
    bonus is the coefficient times the mean entropy over the tokens the policy term acts on
    (the high-entropy mask included), divided by the accumulation steps in training; the
    adaptive coefficient applies while the last window's world entropy is at most
    entropy_target, and moves by entropy_coef_delta at each optimizer step."""
    args = trainer.args
    metrics = trainer._metrics[mode]
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    # TRL's policy_loss metric: the loss so far, before the accumulation division for the
    # per-row / per-batch means, after it for the token-count normalisers
    policy_loss = loss.detach()
    if trainer.loss_type in _POLICY_LOSS_BEFORE_ACCUMULATION:
        policy_loss = policy_loss * accumulation
    effective = mask if entropy_mask is None else mask * entropy_mask
    entropy_loss = (entropies * effective).sum() / effective.sum().clamp(min=1.0) / accumulation
    if trainer.use_adaptive_entropy:
        coef = (trainer.entropy_coef if trainer._last_world_entropy <= args.entropy_target
                else 0.0)
    else:
        coef = trainer.entropy_coef
    loss = loss - coef * entropy_loss
    metrics["policy_loss"].append(trainer.accelerator.gather(policy_loss).nanmean().item())
    if trainer.use_adaptive_entropy and mode == "train":
        stats = torch.stack([(entropies * effective).sum(), effective.sum()]).detach()
        window = trainer._entropy_window_stats
        trainer._entropy_window_stats = stats if window is None else window + stats
        if trainer.accelerator.sync_gradients:
            totals = trainer.accelerator.reduce(trainer._entropy_window_stats, reduction="sum")
            world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
            if world_entropy <= args.entropy_target:
                trainer.entropy_coef = min(trainer.entropy_coef + args.entropy_coef_delta,
                                           args.entropy_coef_max)
            else:
                trainer.entropy_coef = max(trainer.entropy_coef - args.entropy_coef_delta,
                                           args.entropy_coef_min)
            trainer._last_world_entropy = world_entropy
            trainer._entropy_window_stats = None
    if mode == "train" and trainer.accelerator.sync_gradients:
        metrics["entropy_coef"].append(trainer.entropy_coef)
    return loss


def _log_grpo_metrics(trainer, mode, mask, advantages, logps, old, entropies, per_token_kl,
                      utils, phi=None) -> None:
    """The metrics TRL 1.16's _compute_loss logs, from detached tensors, with TRL's formulas."""
    metrics = trainer._metrics[mode]
    with torch.no_grad():
        coef_1 = _importance_weights(logps - old, mask, trainer.importance_sampling_level)
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)

        def masked_seq_mean(x):
            if x.shape[1] == 1:  # sequence level: one value per row already
                return x.squeeze(1)
            return (x * mask).sum(-1) / mask.sum(-1)

        def global_masked_mean(x):
            if x.shape[1] == 1:
                local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
            else:
                local_sum, local_count = (x * mask).sum(), mask.sum().float()
            totals = trainer.accelerator.reduce(torch.stack([local_sum, local_count]),
                                                reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if per_token_kl is not None:
            metrics["kl"].append(global_masked_mean(per_token_kl.detach()))
        metrics["entropy"].append(global_masked_mean(entropies))
        if trainer.loss_type == "sapo":  # TRL logs no clip metric for SAPO
            return
        if trainer.loss_type == "vespo":
            metrics["vespo/phi_seq_mean"].append(global_masked_mean(phi))
            return
        if trainer.loss_type == "cispo":
            clipped = (coef_1 > trainer.epsilon_high) & (advantages > 0)
            metrics["cispo_clip_ratio"].append(global_masked_mean(clipped.float()))
            return
        if trainer.args.delta is not None:  # TRL counts the clips on the ratio clamped at delta
            coef_1 = coef_1.clamp(max=trainer.args.delta)
        low = (coef_1 < 1 - trainer.epsilon_low) & (advantages < 0)
        high = (coef_1 > 1 + trainer.epsilon_high) & (advantages > 0)
        metrics["clip_ratio/low_mean"].append(global_masked_mean(low.float()))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(high.float()))
        metrics["clip_ratio/region_mean"].append(global_masked_mean((low | high).float()))
        gathered_low = trainer.accelerator.gather(masked_seq_mean(low.float()))
        metrics["clip_ratio/low_min"].append(utils.nanmin(gathered_low).item())
        gathered_high = trainer.accelerator.gather(masked_seq_mean(high.float()))
        metrics["clip_ratio/high_max"].append(utils.nanmax(gathered_high).item())


# --------------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------------
def _trl_minor() -> str | None:
    try:
        from importlib.metadata import version

        return ".".join(version("trl").split(".")[:2])
    except Exception:  # noqa: BLE001 - not installed, or no metadata: nothing is patched anyway
        return None


def patch_trl(keep_fp32: bool = False) -> Patch:
    """Swap the drop-ins into TRL and every loaded ``trl`` module that imported them by name.
    Returns a ``Patch``: call ``undo()`` (or ``unpatch_trl()``) or use it as a context manager.
    Targets absent from the installed TRL version are skipped (listed in ``Patch.skipped``).

    Patched:

    * ``trl.trainer.utils``: selective_log_softmax, entropy_from_logits,
      selective_log_softmax_and_entropy (above);
    * the fused lm head of the trainers: ``_ChunkedLogProbFunction`` (the math, by
      ``linear_logprobs``; trainers built before the patch use it too) and ``add_fused_lm_head``
      (for trainers built under the patch: includes a PEFT adapter on lm_head);
    * ``GRPOTrainer.__init__`` and ``RLOOTrainer.__init__`` (and SFTTrainer's, DPOTrainer's,
      KTOTrainer's): a PEFT adapter on lm_head is accepted (TRL refuses it because its fused
      head ignores the adapter);
    * ``GRPOTrainer._compute_loss`` (TRL 1.16 only; another version keeps its own, with a
      warning): ``grpo_compute_loss``. RLOOTrainer's loss is left to TRL: it is a per-sequence
      scalar over B values (its log-probabilities come through the patched fused head).

    keep_fp32: the patched utils functions return the kernels' fp32 result (fp64 for fp64
    logits) instead of TRL's dtype for the call (see the module docstring); the fused head and
    the loss are fp32 either way, as TRL's."""
    fns = [selective_log_softmax, entropy_from_logits, selective_log_softmax_and_entropy]
    if keep_fp32:
        fns = [bind_keep_fp32(fn) for fn in fns]
    targets = [(_UTILS, fn.__name__, fn) for fn in fns]
    targets += [(_UTILS, _CHUNKED, ChunkedLogProbFunction),
                (_UTILS, _FUSED_HEAD, add_fused_lm_head)]
    for module_name, cls_name in ((_GRPO, "GRPOTrainer"), (_RLOO, "RLOOTrainer"),
                                  *_LM_HEAD_ADAPTER_TRAINERS):
        targets.append((module_name, f"{cls_name}.__init__",
                        _accepting_adapter_on_lm_head(module_name, cls_name)))
    minor = _trl_minor()
    if minor == _CHECKED_TRL_MINOR:
        targets.append((_GRPO, "GRPOTrainer._compute_loss", grpo_compute_loss))
    elif minor is not None:
        warnings.warn(
            f"patch_trl: GRPOTrainer._compute_loss left to TRL: the drop-in mirrors trl "
            f"{_CHECKED_TRL_MINOR}, this is trl {minor}", stacklevel=2)
    return apply_patch("TRL", "trl", targets)
